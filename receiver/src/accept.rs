//! Connections before they are authenticated: which sockets may take part
//! in a TLS handshake, and which are closed to make room. Authenticated
//! connections (sessions) are counted apart, after the handshake.
//!
//! Two budgets of places, each `2 x --max-connections`:
//! - *silent*: sockets that have sent nothing yet;
//! - *talking*: sockets whose TLS handshake is under way (a TLS client
//!   speaks first, at once: a sender's socket is talking when accepted, or
//!   within a round trip).
//!
//! Invariants:
//! - a new connection is never turned away for want of a place: when its
//!   budget is full, a socket that has held its place for [`GRACE`] is
//!   closed for it: the oldest of the source holding the most places in
//!   that budget (an IPv4 address, an IPv6 /64) that has one so old. So no
//!   source can push out another's handshakes, a silent socket can only
//!   ever displace another silent one, and no socket is closed before it
//!   had time to speak or to finish its handshake;
//! - while a budget is full of younger sockets, the receiver accepts
//!   nothing (the kernel queues new connections) until one is old enough
//!   or leaves: at most [`GRACE`];
//! - a silent socket told to leave that has meanwhile spoken takes a
//!   talking place instead;
//! - every socket leaves its place when its handshake ends, however.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::state::lock;

/// Where unauthenticated connections come from, as far as budgets go: an
/// IPv6 host usually has a whole /64 to choose addresses from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(a) => Source::V4(a.octets()),
            IpAddr::V6(a) => {
                let o = a.octets();
                Source::V6([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Silent,
    Talking,
}

/// How long a socket keeps its place before a newcomer may take it: long
/// enough for a TLS client to speak, and to finish its handshake, over a
/// slow link.
pub(crate) const GRACE: Duration = Duration::from_millis(500);

#[derive(Debug)]
struct Place {
    source: Source,
    class: Class,
    /// When it took this place.
    since: Instant,
    /// Cancelled to close the socket for a newcomer.
    leave: CancellationToken,
}

/// The places taken, oldest first (ids grow).
#[derive(Debug)]
struct Places {
    /// Places per budget.
    per_class: usize,
    taken: BTreeMap<u64, Place>,
    next: u64,
    /// Sockets closed for newcomers since the last report.
    closed: u64,
    last_report: Option<Instant>,
}

impl Places {
    fn new(per_class: usize) -> Places {
        Places {
            per_class: per_class.max(1),
            taken: BTreeMap::new(),
            next: 0,
            closed: 0,
            last_report: None,
        }
    }

    /// The place to give up for a newcomer in `class` at `now`: of the
    /// places held for `grace`, the oldest of the source holding the most
    /// places there (the older one on a tie).
    fn victim(&self, class: Class, now: Instant, grace: Duration) -> Option<u64> {
        let mut held: HashMap<Source, usize> = HashMap::new();
        for p in self.taken.values().filter(|p| p.class == class) {
            *held.entry(p.source).or_default() += 1;
        }
        let mut best: Option<(usize, u64)> = None;
        for (id, p) in &self.taken {
            if p.class != class || now.saturating_duration_since(p.since) < grace {
                continue;
            }
            let n = held[&p.source];
            // Ids grow: the first seen of a source is its oldest.
            if best.is_none_or(|(m, _)| n > m) {
                best = Some((n, *id));
            }
        }
        best.map(|(_, id)| id)
    }

    fn full(&self, class: Class) -> bool {
        self.taken.values().filter(|p| p.class == class).count() >= self.per_class
    }

    /// When a newcomer of either class can have a place, if not now: the
    /// budgets that are full wait for their oldest place to come of age.
    fn room_at(&self, now: Instant, grace: Duration) -> Option<Instant> {
        [Class::Silent, Class::Talking]
            .into_iter()
            .filter(|c| self.full(*c) && self.victim(*c, now, grace).is_none())
            .filter_map(|c| {
                self.taken
                    .values()
                    .filter(|p| p.class == c)
                    .map(|p| p.since + grace)
                    .min()
            })
            .max()
    }

    /// Takes a place in `class`, closing another for it when the budget
    /// is full (over the budget only when none has come of age: a silent
    /// socket that spoke). Returns its id and its leave signal.
    fn take(
        &mut self,
        source: Source,
        class: Class,
        now: Instant,
        grace: Duration,
    ) -> (u64, CancellationToken) {
        if self.full(class) {
            if let Some(p) = self
                .victim(class, now, grace)
                .and_then(|v| self.taken.remove(&v))
            {
                p.leave.cancel();
                self.closed += 1;
            }
        }
        let id = self.next;
        self.next += 1;
        let leave = CancellationToken::new();
        self.taken.insert(
            id,
            Place {
                source,
                class,
                since: now,
                leave: leave.clone(),
            },
        );
        (id, leave)
    }

    fn free(&mut self, id: u64) {
        self.taken.remove(&id);
    }

    /// The sockets closed for newcomers since the last report, at most
    /// every `every`.
    fn report(&mut self, now: Instant, every: Duration) -> Option<u64> {
        if self.closed == 0 || self.last_report.is_some_and(|t| now - t < every) {
            return None;
        }
        self.last_report = Some(now);
        Some(std::mem::take(&mut self.closed))
    }
}

/// The handshake places of the receiver.
#[derive(Clone, Debug)]
pub(crate) struct Handshakes {
    /// A std mutex: held only to take or free a place, never across an
    /// `.await`.
    places: Arc<Mutex<Places>>,
    /// Told when a place is freed: the accept loop may wait for one.
    freed: Arc<Notify>,
    /// [`GRACE`], or less with a short handshake timeout.
    grace: Duration,
}

/// How often the sockets closed for newcomers are logged (one line for
/// all: a crowd would flood the log otherwise).
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// One socket's place; freed when dropped.
struct Ticket {
    handshakes: Handshakes,
    source: Source,
    id: u64,
    leave: CancellationToken,
}

impl Ticket {
    /// Moves to a place in `class` (a silent socket that spoke).
    fn moves_to(&mut self, class: Class) {
        let h = &self.handshakes;
        let mut places = lock(&h.places);
        places.free(self.id);
        (self.id, self.leave) = places.take(self.source, class, Instant::now(), h.grace);
        drop(places);
        h.freed.notify_one();
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.handshakes.places).free(self.id);
        self.handshakes.freed.notify_one();
    }
}

/// Has the peer sent bytes that wait to be read? Checked without waiting.
fn has_bytes(tcp: TcpStream) -> io::Result<(TcpStream, bool)> {
    let std = tcp.into_std()?;
    let mut b = [0u8; 1];
    let talked = match std.peek(&mut b) {
        Ok(n) => n > 0,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(e) => return Err(e),
    };
    Ok((TcpStream::from_std(std)?, talked))
}

impl Handshakes {
    /// `per_class` places for silent sockets, as many for talking ones; a
    /// place is kept at least [`GRACE`] (half `timeout` if that is less).
    pub(crate) fn new(per_class: usize, timeout: Duration) -> Handshakes {
        Handshakes {
            places: Arc::new(Mutex::new(Places::new(per_class))),
            freed: Arc::new(Notify::new()),
            grace: GRACE.min(timeout / 2),
        }
    }

    /// Returns when a new connection can have a place: at once, or when a
    /// place is freed or comes of age.
    pub(crate) async fn room(&self) {
        loop {
            let Some(at) = lock(&self.places).room_at(Instant::now(), self.grace) else {
                return;
            };
            tokio::select! {
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                _ = self.freed.notified() => {}
            }
        }
    }

    /// Takes a place for a socket just accepted (closing another when its
    /// budget is full); `None` when the socket is unusable.
    pub(crate) fn admit(&self, tcp: TcpStream, addr: SocketAddr) -> Option<Pending> {
        let (tcp, talking) = match has_bytes(tcp) {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(peer = %addr, "dropping a connection: {e}");
                return None;
            }
        };
        let source = Source::from(addr.ip());
        let class = if talking {
            Class::Talking
        } else {
            Class::Silent
        };
        let mut places = lock(&self.places);
        let (id, leave) = places.take(source, class, Instant::now(), self.grace);
        if let Some(n) = places.report(Instant::now(), REPORT_EVERY) {
            tracing::warn!(
                "closed {n} unauthenticated connections to make room for newer ones: all handshake places were taken"
            );
        }
        Some(Pending {
            tcp,
            addr,
            talking,
            ticket: Ticket {
                handshakes: self.clone(),
                source,
                id,
                leave,
            },
        })
    }
}

/// An accepted socket in its place, before its TLS handshake.
pub(crate) struct Pending {
    tcp: TcpStream,
    addr: SocketAddr,
    talking: bool,
    ticket: Ticket,
}

impl Pending {
    /// Runs the TLS handshake within `timeout`, in its place (freed at the
    /// end); `None` when it fails, times out or the socket is closed for a
    /// newcomer.
    pub(crate) async fn handshake(
        self,
        acceptor: TlsAcceptor,
        timeout: Duration,
    ) -> Option<TlsStream<TcpStream>> {
        let Pending {
            mut tcp,
            addr,
            talking,
            mut ticket,
        } = self;
        let deadline = tokio::time::Instant::now() + timeout;
        if !talking {
            tokio::select! {
                biased;
                r = tcp.readable() => r.ok()?,
                _ = ticket.leave.cancelled() => {
                    // Bytes that came meanwhile make it a talker.
                    let (t, talked) = has_bytes(tcp).ok()?;
                    if !talked {
                        tracing::trace!(peer = %addr, "closed a silent connection for a newer one");
                        return None;
                    }
                    tcp = t;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(peer = %addr, "TLS handshake timed out");
                    return None;
                }
            }
            ticket.moves_to(Class::Talking);
        }
        tokio::select! {
            biased;
            _ = ticket.leave.cancelled() => {
                tracing::debug!(peer = %addr, "closed a TLS handshake for a newer one");
                None
            }
            r = tokio::time::timeout_at(deadline, acceptor.accept(tcp)) => match r {
                Err(_) => {
                    tracing::warn!(peer = %addr, "TLS handshake timed out");
                    None
                }
                Ok(Err(e)) => {
                    tracing::warn!(peer = %addr, "TLS handshake failed: {e}");
                    None
                }
                Ok(Ok(s)) => Some(s),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(last: u8) -> Source {
        Source::from(IpAddr::from([10, 0, 0, last]))
    }

    const G: Duration = GRACE;

    #[test]
    fn a_full_budget_closes_the_oldest_of_the_largest_source() {
        let mut p = Places::new(4);
        let t0 = Instant::now();
        let (a0, a0_leave) = p.take(v4(1), Class::Silent, t0, G);
        let (_a1, a1_leave) = p.take(v4(1), Class::Silent, t0, G);
        let (_b0, b0_leave) = p.take(v4(2), Class::Silent, t0, G);
        let (_a2, _) = p.take(v4(1), Class::Silent, t0, G);
        assert_eq!(p.room_at(t0, G), Some(t0 + G), "full, none of age");
        let t1 = t0 + G;
        assert_eq!(p.room_at(t1, G), None);
        // A newcomer from 10.0.0.2 displaces 10.0.0.1's oldest.
        let (_b1, _) = p.take(v4(2), Class::Silent, t1, G);
        assert!(a0_leave.is_cancelled() && !p.taken.contains_key(&a0));
        assert!(!a1_leave.is_cancelled() && !b0_leave.is_cancelled());
        // Two each now: the older source's oldest goes (a1 is older than b0).
        let _ = p.take(v4(3), Class::Silent, t1, G);
        assert!(a1_leave.is_cancelled() && !b0_leave.is_cancelled());
        assert_eq!(p.taken.len(), 4);
    }

    #[test]
    fn no_socket_is_closed_before_its_grace() {
        let mut p = Places::new(2);
        let t0 = Instant::now();
        let (_, old) = p.take(v4(1), Class::Silent, t0, G);
        let t1 = t0 + G / 2;
        let (_, young) = p.take(v4(1), Class::Silent, t1, G);
        // Only the old one may go: the newcomer takes its place.
        assert_eq!(p.room_at(t0 + G, G), None);
        let _ = p.take(v4(1), Class::Silent, t0 + G, G);
        assert!(old.is_cancelled() && !young.is_cancelled());
        // Now both are young: wait until the older comes of age.
        assert_eq!(p.room_at(t0 + G, G), Some(t1 + G));
        // A talking newcomer is not held up by the silent budget alone...
        let (_, talker) = p.take(v4(1), Class::Talking, t0 + G, G);
        let _ = p.take(v4(1), Class::Talking, t0 + G, G);
        // ...until that budget is full of young ones too.
        assert_eq!(p.room_at(t0 + G, G), Some(t0 + 2 * G));
        assert!(!talker.is_cancelled());
    }

    #[test]
    fn silent_sockets_never_displace_talking_ones() {
        let mut p = Places::new(2);
        let t0 = Instant::now();
        let (_, sender1) = p.take(v4(1), Class::Talking, t0, G);
        let (_, sender2) = p.take(v4(1), Class::Talking, t0, G);
        for i in 0..100 {
            let _ = p.take(v4(1), Class::Silent, t0 + G * i, G);
        }
        assert!(!sender1.is_cancelled() && !sender2.is_cancelled());
        assert_eq!(p.taken.len(), 4, "two talking, two silent");
        // A third talker from the same source displaces the oldest talker.
        let _ = p.take(v4(1), Class::Talking, t0 + G, G);
        assert!(sender1.is_cancelled() && !sender2.is_cancelled());
    }

    #[test]
    fn an_ipv6_network_is_one_source() {
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        let c: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        assert_eq!(Source::from(a), Source::from(b));
        assert_ne!(Source::from(a), Source::from(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(Source::from(mapped), v4(1));
    }

    #[test]
    fn closings_are_reported_at_most_every_interval() {
        let mut p = Places::new(1);
        let t0 = Instant::now();
        assert_eq!(p.report(t0, REPORT_EVERY), None);
        for i in 0..3 {
            let _ = p.take(v4(1), Class::Silent, t0 + G * i, G);
        }
        assert_eq!(p.report(t0, REPORT_EVERY), Some(2));
        let _ = p.take(v4(1), Class::Silent, t0 + G * 3, G);
        assert_eq!(p.report(t0 + Duration::from_secs(1), REPORT_EVERY), None);
        assert_eq!(
            p.report(t0 + Duration::from_secs(11), REPORT_EVERY),
            Some(1)
        );
    }

    #[tokio::test]
    async fn a_silent_socket_makes_room_and_a_talking_one_keeps_its_place() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let h = Handshakes::new(1, Duration::from_millis(100));
        let acceptor = TlsAcceptor::from(Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new())),
        ));
        let accept = || async { listener.accept().await.unwrap() };
        // A silent stranger.
        let mut stranger = TcpStream::connect(addr).await.unwrap();
        let (tcp, peer) = accept().await;
        let silent = tokio::spawn(
            h.admit(tcp, peer)
                .unwrap()
                .handshake(acceptor.clone(), Duration::from_secs(30)),
        );
        // Another that speaks (a ClientHello's first bytes) stays.
        let mut talker = TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut talker, &[0x16, 0x03, 0x01])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (tcp, peer) = accept().await;
        let talking = tokio::spawn(
            h.admit(tcp, peer)
                .unwrap()
                .handshake(acceptor.clone(), Duration::from_secs(30)),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!silent.is_finished(), "one silent place");
        h.room().await;
        // A second silent stranger takes the first one's place.
        let _second = TcpStream::connect(addr).await.unwrap();
        let (tcp, peer) = accept().await;
        let second = tokio::spawn(
            h.admit(tcp, peer)
                .unwrap()
                .handshake(acceptor, Duration::from_secs(30)),
        );
        assert!(silent.await.unwrap().is_none());
        let mut buf = [0u8; 8];
        let n = tokio::io::AsyncReadExt::read(&mut stranger, &mut buf)
            .await
            .unwrap_or(0);
        assert_eq!(n, 0, "the first stranger was closed");
        assert!(!talking.is_finished(), "the talking socket keeps its place");
        talking.abort();
        second.abort();
    }
}
