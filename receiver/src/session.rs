//! One client connection: the receiving side's state machine. After the
//! hello ([`handshake`]) it answers one request at a time, hands each to
//! its phase ([`crate::sync`], [`crate::ingest`], [`crate::finish`],
//! [`crate::buffer`]) and turns the phase's error into the typed reply.
//!
//! Invariants:
//! - at most one dataset is open (from `Sync` to `Finish`); a new `Sync`, a
//!   `cleanbuffer` or the end of the connection abandons it: a half-built
//!   replacement is removed, the old copy stays, the lock is freed;
//! - the shutdown token is watched only while waiting for the peer
//!   (between messages, and between a stream's frames, where it aborts the
//!   `zfs receive`), so work in progress ends cleanly;
//! - a `ResumeFailed` is accepted only for an open resume offer; one
//!   `cleanbuffer` per connection;
//! - memory: a large frame is read only when the receiver's memory budget
//!   has room for what decoding it takes ([`Metered`]), else it is read
//!   past unbuffered and refused (as busy when it could fit later); what
//!   the session keeps (the open dataset's snapshot and bookmark lists, one
//!   copy, also across a resume offer) stays charged to the budget while
//!   it is kept.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use zfsync_common::caps::Caps;
use zfsync_common::protocol::{
    handshake, CleanReply, CleanRequest, Connection, FinishReply, Frame, Message, ProtocolError,
    Request, Stored, StreamReply, StreamRequest, SyncReply, SyncRequest,
};

use crate::ingest::{self, Frames, IngestError};
use crate::meter::{Dropped, Metered};
use crate::open::Open;
use crate::state::{Reservation, Target};
use crate::sync::Valid;
use crate::{buffer, finish, replace, sync};

/// What the peer sent next.
enum Incoming {
    /// The peer closed between frames.
    Closed,
    /// A frame, with what its reading was granted if it was large.
    Frame(Frame, Option<Reservation>),
    /// A large message frame that did not fit in the memory budget.
    Dropped(Dropped),
}

/// The connection, read so that a shutdown ends the wait for the peer.
struct Link<S> {
    conn: Connection<Metered<S>>,
    /// Cancelled when the receiver shuts down: a read that waits for the
    /// peer ends with an error, so the session stops at its next safe
    /// point (a running `zfs receive` is aborted, not committed).
    cancel: CancellationToken,
    /// The charges of the last two large data frames of a stream: `zfs
    /// receive` is fed one frame behind, so both may be held.
    data_held: [Option<Reservation>; 2],
}

impl<S: AsyncRead + AsyncWrite + Unpin> Link<S> {
    async fn next_incoming(&mut self) -> Result<Incoming, ProtocolError> {
        let read = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(ProtocolError::Local("the receiver is shutting down".into())),
            f = self.conn.read() => f,
        };
        let meter = self.conn.get_mut();
        let admitted = meter.admitted.take();
        let dropped = meter.dropped.take();
        Ok(match (read?, dropped) {
            (None, _) => Incoming::Closed,
            (Some(_), Some(d)) => Incoming::Dropped(d),
            (Some(f), None) => Incoming::Frame(f, admitted),
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Frames for Link<S> {
    async fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        match self.next_incoming().await? {
            Incoming::Closed => Ok(None),
            Incoming::Frame(f, admitted) => {
                self.data_held.swap(0, 1);
                self.data_held[1] = admitted;
                Ok(Some(f))
            }
            Incoming::Dropped(d) => {
                Err(ProtocolError::Local(d.reason(&self.conn.get_ref().budget)))
            }
        }
    }
}

/// The dataset in progress, and its lists' charge to the memory budget.
struct Held {
    open: Open,
    _charge: Reservation,
}

/// A sync request's lists are kept (once, in the open dataset) while a
/// `Resume` offer is open: a `ResumeFailed` is answered as this request
/// would have been without the offer.
pub struct Session<'a, S> {
    target: &'a Target,
    link: Link<S>,
    peer: String,
    open: Option<Held>,
    /// A connection asks for cleanbuffer once (it ends a run).
    cleaned: bool,
    /// The sender's `zfs` and what it can do (from its Hello).
    peer_caps: Caps,
    /// `allow_full` of the request a `Resume` answered (its lists are the
    /// open dataset's), until the stream or a `ResumeFailed`.
    resume_offer: Option<bool>,
}

fn refused(e: sync::SyncError) -> SyncReply {
    SyncReply::Refused {
        reason: e.to_string(),
        temporary: e.is_temporary(),
    }
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Session<'a, S> {
    pub fn new(
        target: &'a Target,
        conn: Connection<Metered<S>>,
        peer: String,
        cancel: CancellationToken,
    ) -> Self {
        Session {
            target,
            link: Link {
                conn,
                cancel,
                data_held: [None, None],
            },
            peer,
            open: None,
            cleaned: false,
            peer_caps: Caps::default(),
            resume_offer: None,
        }
    }

    /// Serves the connection until the peer says bye, closes, misbehaves or
    /// the receiver shuts down. Always leaves no dataset half-done.
    pub async fn serve(mut self) -> Result<(), ProtocolError> {
        let result = self.serve_inner().await;
        self.abandon().await;
        if let Err(e) = &result {
            // Tell the peer why, if it still listens.
            let _ = self
                .link
                .conn
                .send(Message::Error {
                    reason: e.to_string(),
                })
                .await;
        }
        result
    }

    async fn serve_inner(&mut self) -> Result<(), ProtocolError> {
        let first = match self.link.next_incoming().await? {
            Incoming::Closed => None,
            Incoming::Frame(f, _) => Some(f),
            Incoming::Dropped(d) => {
                return Err(ProtocolError::Unexpected {
                    got: format!("a message of {} bytes", d.len),
                    expected: "hello".into(),
                })
            }
        };
        let Some(hello) = handshake::check_hello(first)? else {
            return Ok(());
        };
        if let Err(e) = self.target.refresh_for_run(&hello.run_id).await {
            tracing::error!(peer = %self.peer, "cannot list the target: {e}");
            return Err(ProtocolError::Local(format!(
                "the receiver cannot list its target: {e}"
            )));
        }
        self.peer_caps = hello.caps;
        tracing::debug!(peer = %self.peer, caps = %self.peer_caps, software = %hello.software, "sender's zfs");
        handshake::welcome(&mut self.link.conn, &self.target.zfs.caps()).await?;
        loop {
            self.link.data_held = [None, None];
            // Held while the request is served (a Sync's charge becomes
            // its lists').
            let (request, mut admitted) = match self.link.next_incoming().await? {
                Incoming::Closed => return Ok(()),
                Incoming::Frame(Frame::Data(_), _) => {
                    return Err(ProtocolError::Unexpected {
                        got: "stream data".into(),
                        expected: "a message (data only after stream)".into(),
                    })
                }
                Incoming::Frame(Frame::Msg(m), admitted) => (Request::try_from(m)?, admitted),
                Incoming::Dropped(d) => {
                    tracing::warn!(peer = %self.peer, bytes = d.len, need = d.need, "refused a request the memory budget has no room for");
                    let reason = d.reason(&self.target.budget);
                    self.link
                        .conn
                        .send(Message::Refused {
                            reason,
                            temporary: !d.forever,
                        })
                        .await?;
                    continue;
                }
            };
            let reply: Message = match request {
                Request::Sync(req) => self.on_sync(req, admitted.take()).await.into(),
                Request::ResumeFailed { reason } => self.on_resume_failed(reason).await?.into(),
                Request::Stream(stream) => self.on_stream(stream).await?,
                Request::Finish => self.on_finish().await?.into(),
                Request::CleanBuffer(clean) => self.on_clean(clean).await?.into(),
                Request::Bye => return Ok(()),
            };
            self.link.conn.send(reply).await?;
        }
    }

    /// `admitted`: what reading the request's frame was granted, if it
    /// was large; it becomes the charge of the lists kept.
    async fn on_sync(&mut self, req: SyncRequest, admitted: Option<Reservation>) -> SyncReply {
        self.resume_offer = None;
        self.abandon().await;
        let valid = match sync::validate(self.target, &self.peer, req) {
            Ok(v) => v,
            Err(e) => return refused(e),
        };
        let charge = match sync::charge(self.target, &valid, admitted) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(peer = %self.peer, "{e}");
                return refused(e);
            }
        };
        let (allow_full, dry_run) = (valid.allow_full, valid.dry_run);
        let reply = self.sync(valid, charge, false).await;
        if matches!(reply, SyncReply::Resume { .. }) && !dry_run {
            self.resume_offer = Some(allow_full);
        }
        reply
    }

    async fn on_resume_failed(&mut self, reason: String) -> Result<SyncReply, ProtocolError> {
        let offered = self.open.as_ref().is_some_and(|h| h.open.resume_offered);
        let (Some(allow_full), true) = (self.resume_offer.take(), offered) else {
            return Err(ProtocolError::Unexpected {
                got: "resume_failed".into(),
                expected: "a resume offer first".into(),
            });
        };
        let Some(Held { mut open, _charge }) = self.open.take() else {
            return Err(ProtocolError::Local(
                "internal error: no open dataset".into(),
            ));
        };
        tracing::warn!(peer = %self.peer, path = %open.rel, "the sender cannot resume: {reason}; discarding the partial receive and planning again");
        // The lists move back from the open dataset, with their charge.
        let valid = Valid::reopen(self.target, &mut open, allow_full);
        replace::abandon(self.target, open).await;
        Ok(match valid {
            Ok(valid) => self.sync(valid, _charge, true).await,
            Err(e) => refused(e),
        })
    }

    /// Answers a validated sync request (see [`sync::sync`]); the dataset
    /// it opens stays open for the streams, with its lists and their
    /// `charge`.
    async fn sync(&mut self, valid: Valid, charge: Reservation, discard_resume: bool) -> SyncReply {
        let synced = sync::sync(
            self.target,
            &self.peer,
            &self.peer_caps,
            valid,
            discard_resume,
        );
        match synced.await {
            Ok(synced) => {
                self.open = synced.open.map(|open| Held {
                    open,
                    _charge: charge,
                });
                synced.reply
            }
            Err(e) => refused(e),
        }
    }

    /// A stream: `StreamFailed` for a refused announcement; else `Ready`,
    /// the stream, and `Stored` (`Err` only when the connection is
    /// unusable).
    async fn on_stream(&mut self, stream: StreamRequest) -> Result<Message, ProtocolError> {
        self.resume_offer = None;
        let Some(Held { open, .. }) = self.open.as_ref() else {
            return Err(ProtocolError::Unexpected {
                got: "stream".into(),
                expected: "sync first".into(),
            });
        };
        let plan = match ingest::check_stream(self.target, open, &stream) {
            Ok(plan) => plan,
            Err(e) => {
                return Ok(StreamReply::Failed {
                    reason: e.to_string(),
                }
                .into())
            }
        };
        self.link.conn.send(StreamReply::Ready.into()).await?;
        let received = ingest::receive(
            self.target,
            &mut self.link,
            &self.peer,
            &self.peer_caps,
            open,
            &plan,
        );
        Ok(match received.await {
            Ok(bytes) => Stored::Received { bytes },
            Err(IngestError::Protocol(e)) => return Err(e),
            Err(e) => Stored::Failed {
                reason: e.to_string(),
                temporary: e.is_temporary(),
            },
        }
        .into())
    }

    async fn on_finish(&mut self) -> Result<FinishReply, ProtocolError> {
        let Some(Held { open, _charge }) = self.open.take() else {
            return Err(ProtocolError::Unexpected {
                got: "finish".into(),
                expected: "sync first".into(),
            });
        };
        Ok(match finish::finish(self.target, &self.peer, open).await {
            Ok(done) => FinishReply::Done(done),
            Err(e) => FinishReply::Refused {
                reason: e.to_string(),
                temporary: false,
            },
        })
    }

    async fn on_clean(&mut self, clean: CleanRequest) -> Result<CleanReply, ProtocolError> {
        if std::mem::replace(&mut self.cleaned, true) {
            return Err(ProtocolError::Unexpected {
                got: "a second cleanbuffer".into(),
                expected: "one cleanbuffer per connection".into(),
            });
        }
        self.abandon().await;
        let mut report = if clean.dry_run {
            buffer::would_place(self.target)
        } else {
            buffer::place(self.target, &self.peer).await
        };
        let delete = clean.delete_missing && !clean.dry_run;
        buffer::orphans(
            self.target,
            &self.peer,
            &clean.source_paths,
            delete,
            &mut report,
        )
        .await;
        Ok(CleanReply::Report(report))
    }

    /// Drops the dataset in progress (if any), removing a half-built
    /// replacement. The old copy is untouched.
    async fn abandon(&mut self) {
        if let Some(held) = self.open.take() {
            replace::abandon(self.target, held.open).await;
        }
    }
}
