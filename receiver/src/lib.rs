//! zfsync-recv: the receiving daemon. [`run`] serves a bound listener until
//! the shutdown future completes; `cli` turns the command line into a call
//! to it.
//!
//! A connection is a [`session::Session`]; the work of each protocol step
//! is a phase module: `sync` (a dataset's request: validation, lock,
//! plan), `ingest` (a stream into `zfs receive`), `finish` (holds,
//! replica marks, mirrored retention), `replace` (the `--full` swap) and
//! `buffer` (cleanbuffer and orphans). [`state::Target`] is what they
//! share: the listing cache, the per-dataset locks and the memory budget.
//! Before a connection is a session, `accept` keeps its TLS handshake from
//! being crowded out by strangers.

mod accept;
mod buffer;
pub mod cli;
mod finish;
mod inflate;
mod ingest;
mod meter;
mod open;
mod replace;
pub mod session;
pub mod state;
mod sync;
#[cfg(test)]
mod testing;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use zfsync_common::caps::Cap;
use zfsync_common::naming::DatasetName;
use zfsync_common::protocol::{Connection, Message};
use zfsync_common::tls::cert_names;
use zfsync_common::zfs::{Backend, RecvOption, ZfsBackend, ZfsError};

use crate::accept::Handshakes;
use crate::meter::Metered;
use crate::session::Session;
use crate::state::{Target, DEFAULT_MEMORY_BUDGET};

/// Shared state of all connections.
struct Shared {
    target: Target,
    /// Names (CN or DNS SAN) allowed to connect; empty: any certificate the
    /// CA signed.
    allow_clients: Vec<String>,
}

pub struct Options {
    pub target: DatasetName,
    pub zfs: Backend,
    /// The TLS configuration; a new value (SIGHUP) applies to connections
    /// accepted from then on, running ones keep theirs.
    pub tls: tokio::sync::watch::Receiver<Arc<rustls::ServerConfig>>,
    pub allow_clients: Vec<String>,
    /// Destroy tool snapshots the sender no longer has (off: keep all).
    pub mirror_retention: bool,
    /// `-o`/`-x` for every `zfs receive` (`--recv-option`).
    pub recv_options: Vec<RecvOption>,
    /// A TLS handshake must complete within this.
    pub handshake_timeout: Duration,
    /// Longest silence from a connected sender.
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// How long a shutdown waits for connections to end.
    pub grace: Duration,
}

/// Limits beyond [`Options`] (which the in-process tests build whole).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Bytes all connections' requests may hold at once (`--memory-budget`).
    pub memory_budget: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_budget: DEFAULT_MEMORY_BUDGET,
        }
    }
}

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("the pool {0} does not exist (zpool list shows the pools)")]
    NoPool(DatasetName),
    #[error("neither the target {target} nor its parent {parent} exists; create the parent with `zfs create -p {parent}`")]
    NoParent {
        target: DatasetName,
        parent: DatasetName,
    },
    #[error("checking the target dataset: {0}")]
    Zfs(#[from] ZfsError),
    #[error("--recv-option {option}: this zfs ({zfs}) has no `zfs receive {flag}`; remove the option, or run the receiver on OpenZFS")]
    Unsupported {
        option: String,
        flag: &'static str,
        zfs: String,
    },
}

/// Checks that the target can be received into: it exists, or its parent
/// does (zfs receive creates it then).
pub async fn check_target(zfs: &dyn ZfsBackend, target: &DatasetName) -> Result<(), ServeError> {
    if zfs.list_dataset(target).await?.is_some() {
        return Ok(());
    }
    match target.parent() {
        None => Err(ServeError::NoPool(target.clone())),
        Some(parent) => {
            if zfs.list_dataset(&parent).await?.is_none() {
                return Err(ServeError::NoParent {
                    target: target.clone(),
                    parent,
                });
            }
            Ok(())
        }
    }
}

/// Serves until `shutdown` completes, then stops accepting, lets every
/// connection end at its next safe point (a running `zfs receive` is
/// killed, so nothing half-sent is committed) and returns.
pub async fn run(
    listener: TcpListener,
    opts: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    run_with(listener, opts, Limits::default(), shutdown).await
}

/// [`run`] with other [`Limits`].
pub async fn run_with(
    listener: TcpListener,
    opts: Options,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let zfs = opts.zfs.clone();
    let caps = zfs.probe().await?;
    tracing::info!("zfs capabilities: {caps}");
    for o in &opts.recv_options {
        let (cap, flag) = match o {
            RecvOption::Set(..) => (Cap::RecvSetProp, "-o"),
            RecvOption::Exclude(_) => (Cap::RecvExcludeProp, "-x"),
        };
        if !caps.has(cap) {
            return Err(ServeError::Unsupported {
                option: o.args().join(" "),
                flag,
                zfs: caps.version.clone(),
            });
        }
    }
    check_target(zfs.as_ref(), &opts.target).await?;
    if let Ok(local) = listener.local_addr() {
        tracing::info!(
            "zfsync-recv listening on {local}, receiving into {}",
            opts.target
        );
    }
    let shared = Arc::new(Shared {
        target: Target::new(opts.target.clone(), zfs, opts.mirror_retention)
            .with_recv_options(opts.recv_options.clone())
            .with_memory_budget(limits.memory_budget),
        allow_clients: opts.allow_clients.clone(),
    });
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    // Sets batches of marks and holds while receives go on.
    tracker.spawn({
        let (shared, cancel) = (shared.clone(), cancel.clone());
        async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = shared.target.flush_soon.notified() => finish::flush(&shared.target).await,
                }
            }
        }
    });
    // Sessions are limited after authentication, so that unauthenticated
    // peers cannot take the senders' places; handshakes have their own
    // places, where a newcomer closes the oldest socket of the source that
    // holds the most (see `accept`), and a timeout.
    let sessions = Arc::new(Semaphore::new(opts.max_connections));
    let handshakes = Handshakes::new(opts.max_connections * 2, opts.handshake_timeout);
    tokio::pin!(shutdown);
    loop {
        // While every handshake place is young, new connections wait in
        // the kernel's queue (half a second at most).
        tokio::select! {
            _ = &mut shutdown => break,
            _ = handshakes.room() => {}
        }
        let (tcp, addr) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait, go on.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        zfsync_common::protocol::keepalive(&tcp);
        let Some(pending) = handshakes.admit(tcp, addr) else {
            continue;
        };
        let sessions = sessions.clone();
        let max = opts.max_connections;
        let acceptor = TlsAcceptor::from(opts.tls.borrow().clone());
        let shared = shared.clone();
        let cancel = cancel.child_token();
        let handshake_timeout = opts.handshake_timeout;
        let idle = opts.idle_timeout;
        tracker.spawn(async move {
            let Some(tls) = pending.handshake(acceptor, handshake_timeout).await else {
                return;
            };
            let names = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(cert_names)
                .unwrap_or_default();
            let who = format!("{addr} ({})", names.first().map(String::as_str).unwrap_or("?"));
            let budget = shared.target.budget.clone();
            let mut conn = Connection::new(Metered::new(tls, budget), idle, idle);
            if !shared.allow_clients.is_empty()
                && !names.iter().any(|n| shared.allow_clients.contains(n))
            {
                tracing::warn!(peer = %who, ?names, "client certificate not in --allow-client; closing");
                let _ = conn
                    .send(Message::Error {
                        reason: format!("certificate names {names:?} are not allowed by this receiver's --allow-client"),
                    })
                    .await;
                return;
            }
            let Ok(place) = sessions.try_acquire_owned() else {
                tracing::warn!(peer = %who, "refusing: {max} connections already open");
                let _ = conn
                    .send(Message::Error {
                        reason: format!("the receiver already serves {max} connections (--max-connections); try again later"),
                    })
                    .await;
                return;
            };
            tracing::info!(peer = %who, "connected");
            match Session::new(&shared.target, conn, who.clone(), cancel).serve().await {
                Ok(()) => tracing::info!(peer = %who, "disconnected"),
                Err(e) => tracing::warn!(peer = %who, "connection ended: {e}"),
            }
            // The connection's place is free for the next (the sender's
            // cleanbuffer comes at once); then the marks and holds its
            // datasets left pending are set, in one batch.
            drop(place);
            finish::flush(&shared.target).await;
        });
    }
    tracing::info!("shutting down: no new connections; ending the open ones");
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(opts.grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open after {:?}; exiting anyway",
            opts.grace
        );
    }
    Ok(())
}
