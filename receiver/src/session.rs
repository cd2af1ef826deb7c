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
//!   `cleanbuffer` per connection.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use zfsync_common::caps::Caps;
use zfsync_common::protocol::{
    handshake, CleanReply, CleanRequest, Connection, FinishReply, Frame, Message, ProtocolError,
    Request, Stored, StreamReply, StreamRequest, SyncReply, SyncRequest,
};

use crate::ingest::{self, Frames, IngestError};
use crate::open::Open;
use crate::state::Target;
use crate::{buffer, finish, replace, sync};

/// The connection, read so that a shutdown ends the wait for the peer.
struct Link<S> {
    conn: Connection<S>,
    /// Cancelled when the receiver shuts down: a read that waits for the
    /// peer ends with an error, so the session stops at its next safe
    /// point (a running `zfs receive` is aborted, not committed).
    cancel: CancellationToken,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Frames for Link<S> {
    async fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(ProtocolError::Local("the receiver is shutting down".into())),
            f = self.conn.read() => f,
        }
    }
}

/// A sync request is kept while a `Resume` offer is open: a `ResumeFailed`
/// is answered as this request would have been without the offer.
pub struct Session<'a, S> {
    target: &'a Target,
    link: Link<S>,
    peer: String,
    open: Option<Open>,
    /// A connection asks for cleanbuffer once (it ends a run).
    cleaned: bool,
    /// The sender's `zfs` and what it can do (from its Hello).
    peer_caps: Caps,
    /// The request a `Resume` answered, until the stream or a
    /// `ResumeFailed`.
    resume_request: Option<SyncRequest>,
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Session<'a, S> {
    pub fn new(
        target: &'a Target,
        conn: Connection<S>,
        peer: String,
        cancel: CancellationToken,
    ) -> Self {
        Session {
            target,
            link: Link { conn, cancel },
            peer,
            open: None,
            cleaned: false,
            peer_caps: Caps::default(),
            resume_request: None,
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
        let first = self.link.next_frame().await?;
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
            let request = match self.link.next_frame().await? {
                None => return Ok(()),
                Some(Frame::Data(_)) => {
                    return Err(ProtocolError::Unexpected {
                        got: "stream data".into(),
                        expected: "a message (data only after stream)".into(),
                    })
                }
                Some(Frame::Msg(m)) => Request::try_from(m)?,
            };
            let reply: Message = match request {
                Request::Sync(req) => self.on_sync(req).await.into(),
                Request::ResumeFailed { reason } => self.on_resume_failed(reason).await?.into(),
                Request::Stream(stream) => self.on_stream(stream).await?,
                Request::Finish => self.on_finish().await?.into(),
                Request::CleanBuffer(clean) => self.on_clean(clean).await?.into(),
                Request::Bye => return Ok(()),
            };
            self.link.conn.send(reply).await?;
        }
    }

    async fn on_sync(&mut self, req: SyncRequest) -> SyncReply {
        self.resume_request = None;
        self.abandon().await;
        let reply = self.sync(&req, false).await;
        if matches!(reply, SyncReply::Resume { .. }) && !req.dry_run {
            self.resume_request = Some(req);
        }
        reply
    }

    async fn on_resume_failed(&mut self, reason: String) -> Result<SyncReply, ProtocolError> {
        let offered = self.open.as_ref().is_some_and(|o| o.resume_offered);
        let Some(req) = self.resume_request.take().filter(|_| offered) else {
            return Err(ProtocolError::Unexpected {
                got: "resume_failed".into(),
                expected: "a resume offer first".into(),
            });
        };
        tracing::warn!(peer = %self.peer, path = %req.path, "the sender cannot resume: {reason}; discarding the partial receive and planning again");
        self.abandon().await;
        let req = SyncRequest {
            dry_run: false,
            ..req
        };
        Ok(self.sync(&req, true).await)
    }

    /// Answers a sync request (see [`sync::sync`]); the dataset it opens
    /// stays open for the streams.
    async fn sync(&mut self, req: &SyncRequest, discard_resume: bool) -> SyncReply {
        let synced = sync::sync(
            self.target,
            &self.peer,
            &self.peer_caps,
            req,
            discard_resume,
        );
        match synced.await {
            Ok(synced) => {
                self.open = synced.open;
                synced.reply
            }
            Err(e) => SyncReply::Refused {
                reason: e.to_string(),
                temporary: e.is_temporary(),
            },
        }
    }

    /// A stream: `StreamFailed` for a refused announcement; else `Ready`,
    /// the stream, and `Stored` (`Err` only when the connection is
    /// unusable).
    async fn on_stream(&mut self, stream: StreamRequest) -> Result<Message, ProtocolError> {
        self.resume_request = None;
        let Some(open) = self.open.as_ref() else {
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
            },
        }
        .into())
    }

    async fn on_finish(&mut self) -> Result<FinishReply, ProtocolError> {
        let Some(open) = self.open.take() else {
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
        if let Some(open) = self.open.take() {
            replace::abandon(self.target, open).await;
        }
    }
}
