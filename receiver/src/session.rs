//! One client connection: the receiving side's state machine. After the
//! hello ([`handshake`]) it answers one request at a time, hands each to
//! its phase ([`crate::sync`], [`crate::ingest`], [`crate::finish`],
//! [`crate::buffer`]) and turns the phase's error into the typed reply.
//!
//! Invariants:
//! - a `Plan` is answered from the cache like a dry-run `Sync`, item by
//!   item: nothing is locked, opened or created, and no `zfs` runs;
//! - at most one dataset is open (from `Sync` or `Put` to `Finish` or the
//!   `End` of a `finish` stream); a new `Sync` or `Put`, a `cleanbuffer`
//!   or the end of the connection abandons it: a half-built replacement
//!   is removed, the old copy stays, the lock is freed;
//! - an eager stream (`Put`, `More`: data without waiting for `Ready`)
//!   that is refused is read past to its `End` or `Abort`, and the refusal
//!   is the answer there: nothing of it reaches `zfs receive`;
//! - the shutdown token is watched only while waiting for the peer
//!   (between messages, and between a stream's frames, where it aborts the
//!   `zfs receive`), so work in progress ends cleanly;
//! - a `ResumeFailed` is accepted only for an open resume offer; one
//!   `cleanbuffer` per connection;
//! - a stream announced `compressed` has its data frames decompressed as
//!   they are read ([`crate::inflate`]), before the stream's phase sees
//!   them; a frame that cannot be is a refused stream, and the connection
//!   ends;
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
    handshake, CleanReply, CleanRequest, Connection, EagerStream, FinishReply, Frame, Landed,
    Message, PlanReply, ProtocolError, Request, Stored, StreamReply, StreamRequest, SyncReply,
    SyncRequest,
};

use crate::inflate::Inflate;
use crate::ingest::{self, Frames, IngestError};
use crate::meter::{Dropped, Metered};
use crate::open::Open;
use crate::state::{Location, Reservation, Target};
use crate::sync::Valid;
use crate::{buffer, finish, replace, sync};

/// Most datasets one `Plan` request may ask about (the sender sends
/// larger trees in several).
pub(crate) const MAX_PLAN: usize = 4096;

/// What a connection asked for, logged when it ends: how many round
/// trips a run cost, per kind of request.
#[derive(Debug, Default)]
struct Served {
    plans: usize,
    /// Datasets asked about in plans.
    planned: usize,
    puts: usize,
    mores: usize,
    syncs: usize,
    streams: usize,
    finishes: usize,
}

impl std::fmt::Display for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "plan {} ({} datasets), put {}, more {}, sync {}, stream {}, finish {}",
            self.plans,
            self.planned,
            self.puts,
            self.mores,
            self.syncs,
            self.streams,
            self.finishes
        )
    }
}

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
    /// Decompresses the data frames of a stream announced `compressed`.
    inflate: Inflate,
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
                let budget = &self.conn.get_ref().budget;
                let (f, admitted) = self.inflate.frame(f, admitted, budget)?;
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
    served: Served,
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
                inflate: Inflate::default(),
            },
            peer,
            open: None,
            cleaned: false,
            peer_caps: Caps::default(),
            resume_offer: None,
            served: Served::default(),
        }
    }

    /// Serves the connection until the peer says bye, closes, misbehaves or
    /// the receiver shuts down. Always leaves no dataset half-done.
    pub async fn serve(mut self) -> Result<(), ProtocolError> {
        let result = self.serve_inner().await;
        self.abandon().await;
        tracing::info!(peer = %self.peer, "requests: {}", self.served);
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
            self.link.inflate.expect(match &request {
                Request::Put(_, s) | Request::More(s) => s.compressed,
                Request::Stream(s) => s.compressed,
                _ => false,
            });
            let served = &mut self.served;
            match &request {
                Request::Plan(items) => {
                    served.plans += 1;
                    served.planned += items.len();
                }
                Request::Put(..) => served.puts += 1,
                Request::More(_) => served.mores += 1,
                Request::Sync(_) => served.syncs += 1,
                Request::Stream(_) => served.streams += 1,
                Request::Finish => served.finishes += 1,
                Request::ResumeFailed { .. } | Request::CleanBuffer(_) | Request::Bye => {}
            }
            let reply: Message = match request {
                Request::Plan(items) => self.on_plan(items).await.into(),
                Request::Put(req, stream) => self.on_put(req, stream, admitted.take()).await?,
                Request::More(stream) => self.on_eager(stream, false).await?,
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

    /// Answers what every dataset of a plan needs, as a dry run answers a
    /// sync: from the cache, with nothing locked, opened or created, and
    /// no `zfs` call. A cut transfer the sender cannot resume is answered
    /// "busy", so the sender asks for that dataset alone (the real sync
    /// discards it).
    async fn on_plan(&mut self, items: Vec<SyncRequest>) -> PlanReply {
        if items.len() > MAX_PLAN {
            tracing::warn!(peer = %self.peer, datasets = items.len(), "refused a plan: too many datasets");
            return PlanReply::Refused {
                reason: format!(
                    "a plan of {} datasets; at most {MAX_PLAN} per request",
                    items.len()
                ),
                temporary: false,
            };
        }
        let mut answers = Vec::with_capacity(items.len());
        for mut item in items {
            let real = !item.dry_run;
            item.dry_run = true;
            let valid = match sync::validate(self.target, &self.peer, item) {
                Ok(v) => v,
                Err(e) => {
                    answers.push(refused(e));
                    continue;
                }
            };
            // Another connection works on it: the sender asks again alone
            // (rather than send a stream that would be refused as busy).
            if self.target.is_busy(&valid.rel) {
                answers.push(refused(sync::SyncError::Busy(valid.rel)));
                continue;
            }
            let rel = valid.rel.clone();
            let answer =
                match sync::sync(self.target, &self.peer, &self.peer_caps, valid, false).await {
                    Ok(synced) => synced.reply,
                    Err(e @ sync::SyncError::CannotResume(_)) => SyncReply::Refused {
                        reason: e.to_string(),
                        temporary: true,
                    },
                    Err(e) => refused(e),
                };
            // An up-to-date replica whose marks a crash left unset gets
            // them with this connection's batch (FI3): no Finish comes.
            if let (SyncReply::UpToDate { .. }, true) = (&answer, real) {
                if let Ok(Location::InPlace(d) | Location::Buffered(d)) = self.target.locate(&rel) {
                    finish::ensure_marks(self.target, &d.name).await;
                }
            }
            answers.push(answer);
        }
        tracing::debug!(peer = %self.peer, datasets = answers.len(), "answered a plan");
        PlanReply::Answers(answers)
    }

    /// A dataset's sync and its first stream at once: the sync is answered
    /// as [`Session::on_sync`] would, and only when it opened the dataset
    /// for a stream does the stream go in; otherwise the stream is read
    /// past and refused with the sync's answer.
    async fn on_put(
        &mut self,
        req: SyncRequest,
        stream: EagerStream,
        admitted: Option<Reservation>,
    ) -> Result<Message, ProtocolError> {
        let reply = self.on_sync(req, admitted).await;
        let refusal = match reply {
            SyncReply::Incremental { .. }
            | SyncReply::New { .. }
            | SyncReply::Full { accepted: true, .. }
                if self.open.is_some() =>
            {
                return self.on_eager(stream, true).await;
            }
            SyncReply::UpToDate { snapshot } => (
                format!("the receiver is already at @{snapshot} (another sender?)"),
                false,
            ),
            SyncReply::Refused { reason, temporary } => (reason, temporary),
            SyncReply::Full { reason, .. } => (
                format!("{reason}; run with --full to replace the receiver's copy"),
                false,
            ),
            // The per-dataset conversation resumes it.
            SyncReply::Resume { .. } => (
                "the dataset holds a cut transfer: resume it first".to_string(),
                true,
            ),
            SyncReply::Incremental { .. } | SyncReply::New { .. } => {
                ("internal error: no open dataset".to_string(), false)
            }
        };
        self.resume_offer = None;
        self.abandon().await;
        ingest::drain(&mut self.link).await?;
        Ok(Stored::Failed {
            reason: refusal.0,
            temporary: refusal.1,
        }
        .into())
    }

    /// A stream of the open dataset whose data follows its announcement at
    /// once (`Put`, `More`): a refused announcement is read past and
    /// answered at its `End`; the last stream (`finish`) also finishes the
    /// dataset. `Err` only when the connection is unusable.
    ///
    /// `put`: the stream came with its `Put`, announced from the tree
    /// plan's answer; a refused announcement is then worth asking about
    /// again (the dataset changed since the plan), so it is temporary.
    async fn on_eager(&mut self, eager: EagerStream, put: bool) -> Result<Message, ProtocolError> {
        self.resume_offer = None;
        let stream = StreamRequest {
            from_guid: eager.from_guid,
            to: eager.to,
            resume: false,
            compressed: eager.compressed,
        };
        let Some(Held { open, .. }) = self.open.as_ref() else {
            return Err(ProtocolError::Unexpected {
                got: "more".into(),
                expected: "put or sync first".into(),
            });
        };
        let plan = match ingest::check_stream(self.target, open, &stream) {
            Ok(plan) => plan,
            Err(e) => {
                ingest::drain(&mut self.link).await?;
                return Ok(Stored::Failed {
                    reason: e.to_string(),
                    temporary: put,
                }
                .into());
            }
        };
        Ok(match self.receive(&plan).await? {
            Stored::Received { .. } if eager.finish => match self.on_finish().await? {
                FinishReply::Done(f) => Landed::Done(f),
                FinishReply::Refused { reason, temporary } => Landed::Refused { reason, temporary },
            }
            .into(),
            stored => stored.into(),
        })
    }

    /// Receives the open dataset's checked stream: the answer to its
    /// `End` (`Err` only when the connection is unusable).
    async fn receive(&mut self, plan: &ingest::Planned) -> Result<Stored, ProtocolError> {
        let Some(Held { open, .. }) = self.open.as_ref() else {
            return Err(ProtocolError::Local(
                "internal error: no open dataset".into(),
            ));
        };
        let received = ingest::receive(
            self.target,
            &mut self.link,
            &self.peer,
            &self.peer_caps,
            open,
            plan,
        );
        match received.await {
            Ok(bytes) => Ok(Stored::Received { bytes }),
            Err(IngestError::Protocol(e)) => Err(e),
            Err(e) => Ok(Stored::Failed {
                temporary: e.is_temporary(),
                reason: e.to_string(),
            }),
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
        Ok(self.receive(&plan).await?.into())
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
