//! One client connection: the protocol state machine on the receiving side.
//!
//! Every name from the peer is validated here before it touches `zfs`; every
//! stream is written into `zfs receive` one frame behind, so the final bytes
//! (with the stream's END record) reach `zfs` only after the sender's
//! `End{bytes}` has been checked. A cut, an `Abort`, a count mismatch or a
//! shutdown kills the `zfs receive` instead: nothing half-sent is committed.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use zfsync_common::caps::{Cap, Caps};
use zfsync_common::naming::{is_reserved, DatasetName, RelPath};
use zfsync_common::plan::{mirror, negotiate_with_bookmarks, Decision, FullReason, TargetState};
use zfsync_common::protocol::{
    handshake, CleanReport, Connection, FinishReply, Finished, Frame, Message, PlaceFailure,
    ProtocolError, Request, Stored, StreamReply, StreamRequest, SyncReply, SyncRequest,
};
use zfsync_common::stream::{check_head, feature_names, HEAD_MAX};
use zfsync_common::zfs::{RecvSpec, Snapshot, ZfsChild};

/// How long an aborted `zfs receive` may take to clean up before it is
/// killed.
const ABORT_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

use crate::state::{is_replica, DatasetLock, Location, Target, RECV_HOLD, REPLICA_PROP};

/// How a dataset's streams are being received.
enum Mode {
    /// Straight into `dest` (in place or in the buffer).
    Direct,
    /// Into a temporary dataset that replaces `replaces` once whole.
    Replace { replaces: DatasetName },
    /// A full stream with `-F` into an existing dataset that has no
    /// snapshots (`--full`; zfs swaps the new copy in only when it is
    /// whole). The only way to fill a pool's root dataset.
    Overwrite,
}

/// A stream the receiver agreed to.
struct Planned {
    to: Snapshot,
    /// The base's GUID; 0 for a full stream.
    from_guid: u64,
    /// Full stream into an existing dataset without snapshots (`-F`).
    overwrite: bool,
    /// Continues a cut stream (`zfs send -t` on the sender).
    resume: bool,
}

/// The dataset a connection is working on, from `Sync` to `Finish`.
struct Open {
    rel: RelPath,
    /// Keeps other connections off this dataset until `Finish`.
    _lock: DatasetLock,
    dest: DatasetName,
    buffered: bool,
    mode: Mode,
    /// The sender's snapshots: a stream may only announce one of these.
    announced: Vec<Snapshot>,
    /// The sender's bookmarks: possible bases.
    bookmarks: Vec<Snapshot>,
    /// A cut transfer's state was offered for resuming (`Resume`).
    resume_offered: bool,
}

/// A sync request is kept while a `Resume` offer is open: a `ResumeFailed`
/// is answered as this request would have been without the offer.
pub struct Session<'a, S> {
    target: &'a Target,
    conn: Connection<S>,
    peer: String,
    cancel: CancellationToken,
    open: Option<Open>,
    /// A connection asks for cleanbuffer once (it ends a run).
    cleaned: bool,
    /// The sender's `zfs` and what it can do (from its Hello).
    peer_caps: Caps,
    /// The request a `Resume` answered, until the stream or a
    /// `ResumeFailed`.
    resume_request: Option<SyncRequest>,
}

fn refused(reason: impl Into<String>) -> SyncReply {
    SyncReply::refused(reason)
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
            conn,
            peer,
            cancel,
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
                .conn
                .send(Message::Error {
                    reason: e.to_string(),
                })
                .await;
        }
        result
    }

    async fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(ProtocolError::Local("the receiver is shutting down".into())),
            f = self.conn.read() => f,
        }
    }

    async fn serve_inner(&mut self) -> Result<(), ProtocolError> {
        let first = self.next_frame().await?;
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
        handshake::welcome(&mut self.conn, &self.target.zfs.caps()).await?;
        loop {
            let msg = match self.next_frame().await? {
                None => return Ok(()),
                Some(Frame::Data(_)) => {
                    return Err(ProtocolError::Unexpected {
                        got: "stream data".into(),
                        expected: "a message (data only after stream)".into(),
                    })
                }
                Some(Frame::Msg(m)) => Request::try_from(m)?,
            };
            let reply: Message = match msg {
                Request::Sync(req) => {
                    self.resume_request = None;
                    self.abandon().await;
                    let reply = self.sync(&req, false).await;
                    if matches!(reply, SyncReply::Resume { .. }) && !req.dry_run {
                        self.resume_request = Some(req);
                    }
                    reply.into()
                }
                Request::ResumeFailed { reason } => {
                    let offered = self.open.as_ref().is_some_and(|o| o.resume_offered);
                    let Some(req) = self.resume_request.take().filter(|_| offered) else {
                        return Err(ProtocolError::Unexpected {
                            got: "resume_failed".into(),
                            expected: "a resume offer first".into(),
                        });
                    };
                    tracing::warn!(peer = %self.peer, path = %req.path, "the sender cannot resume: {reason}; discarding the partial receive and planning again");
                    self.abandon().await;
                    self.sync(
                        &SyncRequest {
                            dry_run: false,
                            ..req
                        },
                        true,
                    )
                    .await
                    .into()
                }
                Request::Stream(stream) => {
                    self.resume_request = None;
                    if self.open.is_none() {
                        return Err(ProtocolError::Unexpected {
                            got: "stream".into(),
                            expected: "sync first".into(),
                        });
                    }
                    match self.check_stream(&stream) {
                        Err(reason) => StreamReply::Failed { reason }.into(),
                        Ok(plan) => {
                            self.conn.send(StreamReply::Ready.into()).await?;
                            self.receive(plan).await?.into()
                        }
                    }
                }
                Request::Finish => match self.open.take() {
                    None => {
                        return Err(ProtocolError::Unexpected {
                            got: "finish".into(),
                            expected: "sync first".into(),
                        })
                    }
                    Some(open) => self.finish(open).await.into(),
                },
                Request::CleanBuffer(clean) => {
                    if std::mem::replace(&mut self.cleaned, true) {
                        return Err(ProtocolError::Unexpected {
                            got: "a second cleanbuffer".into(),
                            expected: "one cleanbuffer per connection".into(),
                        });
                    }
                    self.abandon().await;
                    let mut report = if clean.dry_run {
                        self.would_place()
                    } else {
                        self.clean_buffer().await
                    };
                    self.orphans(
                        &clean.source_paths,
                        clean.delete_missing && !clean.dry_run,
                        &mut report,
                    )
                    .await;
                    zfsync_common::protocol::CleanReply::Report(report).into()
                }
                Request::Bye => return Ok(()),
            };
            self.conn.send(reply).await?;
        }
    }

    /// Drops the dataset in progress (if any), removing a half-built
    /// replacement. The old copy is untouched.
    async fn abandon(&mut self) {
        if let Some(open) = self.open.take() {
            if let Mode::Replace { .. } = open.mode {
                if self.target.exists(&open.dest) {
                    tracing::info!(dest = %open.dest, "removing an unfinished replacement");
                    match self.target.destroy_tree(&open.dest).await {
                        Ok(()) => self.target.destroyed(&open.dest),
                        Err(e) => tracing::warn!("cannot remove {}: {e}", open.dest),
                    }
                }
            }
        }
    }

    async fn ensure_buffer(&self) -> Result<(), String> {
        let buf = &self.target.buffer;
        if self.target.exists(buf) {
            return Ok(());
        }
        let created = self.target.zfs.create_unmounted(buf).await;
        // Another connection may have created it meanwhile.
        match self.target.refresh(buf).await {
            Ok(Some(_)) => Ok(()),
            _ => Err(match created {
                Err(e) => format!("cannot create the buffer dataset {buf}: {e}"),
                Ok(()) => format!("the buffer dataset {buf} vanished"),
            }),
        }
    }

    /// Answers a sync request. `discard_resume`: the sender could not use
    /// the resume offer, so a partial state is thrown away (`receive -A`).
    async fn sync(&mut self, req: &SyncRequest, discard_resume: bool) -> SyncReply {
        let (path, snapshots, allow_full) = (&req.path, &req.snapshots, req.allow_full);
        let dry_run = req.dry_run;
        let rel = match RelPath::new(path) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(peer = %self.peer, "refused dataset path: {e}");
                return refused(format!("invalid dataset path: {e}"));
            }
        };
        if is_reserved(&self.target.name, &rel) {
            return refused(format!(
                "{rel} is reserved for the receiver's buffer ({}); rename the source dataset",
                self.target.buffer
            ));
        }
        let in_place = match self.target.in_place_name(&rel) {
            Ok(n) => n,
            Err(e) => return refused(format!("{rel} cannot be placed under the target: {e}")),
        };
        let mut snaps = Vec::with_capacity(snapshots.len());
        for s in snapshots {
            match s.validate() {
                Ok(s) => snaps.push(s),
                Err(e) => return refused(format!("invalid snapshot name for {rel}: {e}")),
            }
        }
        snaps.sort_by_key(|s| s.createtxg);
        let mut bookmarks = Vec::with_capacity(req.bookmarks.len());
        for b in &req.bookmarks {
            match b.validate() {
                Ok(b) => bookmarks.push(b),
                Err(e) => return refused(format!("invalid bookmark name for {rel}: {e}")),
            }
        }
        bookmarks.sort_by_key(|s| s.createtxg);
        if snaps.is_empty() {
            return refused(format!("{rel} has no snapshots to send"));
        }
        // A dry run takes no lock: it must not make a real run see "busy".
        let lock = if dry_run {
            None
        } else {
            let Some(lock) = self.target.try_lock(&rel) else {
                return SyncReply::Refused {
                    reason: format!(
                        "{rel} is busy: another connection is receiving into it; try again later"
                    ),
                    temporary: true,
                };
            };
            Some(lock)
        };
        let mut location = match self.target.locate(&rel) {
            Ok(l) => l,
            Err(e) => return refused(format!("{rel}: {e}")),
        };
        // A transfer cut last time left a resumable state.
        if let Location::InPlace(d) | Location::Buffered(d) = &location {
            if let Some(token) = d.resume_token.clone() {
                let can = self.peer_caps.has(Cap::SendResume)
                    && self.target.zfs.caps().can_receive_resumable();
                if can && !discard_resume {
                    if let Some(lock) = lock {
                        tracing::info!(peer = %self.peer, %rel, dest = %d.name, "offering to resume a cut transfer");
                        self.open = Some(Open {
                            rel: rel.clone(),
                            _lock: lock,
                            dest: d.name.clone(),
                            buffered: matches!(location, Location::Buffered(_)),
                            mode: Mode::Direct,
                            announced: snaps,
                            bookmarks,
                            resume_offered: true,
                        });
                    }
                    return SyncReply::Resume { token };
                }
                if dry_run {
                    return refused(format!(
                        "{} holds a cut transfer that this sender cannot resume; a real run discards it (zfs receive -A) and sends again",
                        d.name
                    ));
                }
                let dest = d.name.clone();
                tracing::info!(peer = %self.peer, %dest, "discarding the partial state of a cut transfer (zfs receive -A)");
                if let Err(e) = self.target.zfs.abort_resumable(&dest).await {
                    return refused(format!(
                        "{dest} holds a cut transfer that cannot be discarded: {e}; run `zfs receive -A {dest}` by hand"
                    ));
                }
                let _ = self.target.refresh(&dest).await;
                location = match self.target.locate(&rel) {
                    Ok(l) => l,
                    Err(e) => return refused(format!("{rel}: {e}")),
                };
            }
        }
        let (state, current, buffered) = match &location {
            Location::InPlace(d) => (
                TargetState::Present {
                    snapshots: &d.snapshots,
                },
                Some(d.name.clone()),
                false,
            ),
            Location::Buffered(d) => (
                TargetState::Present {
                    snapshots: &d.snapshots,
                },
                Some(d.name.clone()),
                true,
            ),
            Location::Absent { parent_present } => (
                TargetState::Absent {
                    parent_present: *parent_present,
                },
                None,
                !parent_present,
            ),
        };
        let decision = negotiate_with_bookmarks(&snaps, &bookmarks, &state, allow_full);
        tracing::debug!(peer = %self.peer, %rel, ?decision, dry_run, "negotiated");
        if dry_run {
            // The answer alone: nothing is created, locked or destroyed.
            return match decision {
                Decision::NoSnapshots => refused(format!("{rel} has no snapshots to send")),
                Decision::UpToDate { snapshot } => SyncReply::UpToDate { snapshot },
                Decision::Incremental { base_guid, count } => SyncReply::Incremental {
                    base_guid,
                    count: count as u64,
                },
                Decision::New { buffered } => SyncReply::New { buffered },
                Decision::Full { reason, accepted } => SyncReply::Full { reason, accepted },
            };
        }
        let Some(lock) = lock else {
            return refused("internal error: no lock");
        };
        let open = |dest: DatasetName, buffered: bool, mode: Mode| Open {
            rel: rel.clone(),
            _lock: lock,
            dest,
            buffered,
            mode,
            announced: snaps.clone(),
            bookmarks: bookmarks.clone(),
            resume_offered: false,
        };
        match decision {
            Decision::NoSnapshots => refused(format!("{rel} has no snapshots to send")),
            Decision::UpToDate { snapshot } => SyncReply::UpToDate { snapshot },
            Decision::Incremental { base_guid, count } => {
                let Some(dest) = current else {
                    return refused("internal error: incremental without a dataset");
                };
                self.open = Some(open(dest, buffered, Mode::Direct));
                SyncReply::Incremental {
                    base_guid,
                    count: count as u64,
                }
            }
            Decision::New { buffered } => {
                let dest = if buffered {
                    let name = match self.target.buffer_name(&rel) {
                        Some(Ok(n)) => n,
                        Some(Err(e)) => {
                            return refused(format!(
                                "{rel} arrived before its parent and its buffer name is too long ({e}); run again once the parent exists"
                            ))
                        }
                        None => return refused("the top dataset cannot be buffered"),
                    };
                    if let Err(e) = self.ensure_buffer().await {
                        return refused(e);
                    }
                    name
                } else {
                    in_place
                };
                self.open = Some(open(dest, buffered, Mode::Direct));
                SyncReply::New { buffered }
            }
            Decision::Full {
                reason,
                accepted: false,
            } => SyncReply::Full {
                reason,
                accepted: false,
            },
            Decision::Full {
                reason,
                accepted: true,
            } => {
                let Some(replaces) = current else {
                    return refused("internal error: full without a dataset");
                };
                if reason == FullReason::TargetHasNoSnapshots {
                    tracing::info!(peer = %self.peer, %rel, "--full into {replaces}, which has no snapshots");
                    self.open = Some(open(replaces, buffered, Mode::Overwrite));
                    return SyncReply::Full {
                        reason,
                        accepted: true,
                    };
                }
                if replaces.is_pool_root() {
                    return refused(format!(
                        "{replaces} is a pool's root dataset, which cannot be replaced; destroy its snapshots by hand or receive into a dataset below the pool"
                    ));
                }
                let temp = match self.target.full_temp_name(&rel) {
                    Ok(t) => t,
                    Err(e) => return refused(format!("{rel}: {e}")),
                };
                if let Err(e) = self.ensure_buffer().await {
                    return refused(e);
                }
                if self.target.exists(&temp) {
                    // Left by an interrupted earlier attempt. Without child
                    // datasets it is only a copy of the source; with them it
                    // holds the old copy's children: never destroy that.
                    if !self.target.children(&temp).is_empty() {
                        return refused(format!(
                            "{temp} is left from an interrupted replacement and holds datasets of the old copy; move them back under {replaces} by hand (zfs list -r {temp}), then destroy {temp}"
                        ));
                    }
                    if let Err(e) = self.target.destroy_tree(&temp).await {
                        return refused(format!("cannot remove the stale {temp}: {e}"));
                    }
                    self.target.destroyed(&temp);
                }
                tracing::info!(peer = %self.peer, %rel, "full replacement requested: {reason}");
                self.open = Some(open(temp, buffered, Mode::Replace { replaces }));
                SyncReply::Full {
                    reason,
                    accepted: true,
                }
            }
        }
    }

    /// Checks a stream announcement against the sync request and the
    /// destination: the snapshot must be one the sender announced, and the
    /// stream must start from the destination's newest snapshot (or from
    /// nothing for a new dataset).
    fn check_stream(&self, req: &StreamRequest) -> Result<Planned, String> {
        let (from_guid, to, resume) = (req.from_guid, &req.to, req.resume);
        let open = self.open.as_ref().ok_or("no dataset in progress")?;
        let to = to
            .validate()
            .map_err(|e| format!("invalid snapshot: {e}"))?;
        if !open.announced.contains(&to) {
            return Err(format!("@{} was not in the sync request", to.name));
        }
        if resume != open.resume_offered {
            return Err(if resume {
                "a resumed stream, but no resume was offered".into()
            } else {
                format!("{} holds a cut transfer: resume it first", open.dest)
            });
        }
        let newest = self.target.newest(&open.dest);
        let exists = self.target.exists(&open.dest);
        let planned = |from_guid, overwrite| Planned {
            to: to.clone(),
            from_guid,
            overwrite,
            resume,
        };
        match (from_guid, exists, newest) {
            (None, false, _) => Ok(planned(0, false)),
            // A cut full stream: the dataset exists, with no snapshot yet.
            (None, true, None) if resume => Ok(planned(0, false)),
            (None, true, None) if matches!(open.mode, Mode::Overwrite) => Ok(planned(0, true)),
            (None, true, _) => Err(format!(
                "{} exists: a full stream cannot be received into it",
                open.dest
            )),
            (Some(_), false, _) => Err(format!(
                "{} does not exist: send a full stream first",
                open.dest
            )),
            (Some(g), true, Some(n)) if n.guid == g => {
                // createtxg differs between pools: compare the sender's own.
                // The base may be one of the sender's bookmarks.
                let base = open
                    .announced
                    .iter()
                    .chain(&open.bookmarks)
                    .find(|s| s.guid == g);
                if base.is_none_or(|b| to.createtxg <= b.createtxg) {
                    return Err(format!("@{} is not newer than @{}", to.name, n.name));
                }
                Ok(planned(g, false))
            }
            (Some(_), true, _) => Err(format!(
                "the stream's base is not the newest snapshot of {}",
                open.dest
            )),
        }
    }

    /// Gets the destination ready and starts `zfs receive`. An incremental
    /// is received without `-F`: the destination is first rolled back to
    /// its newest snapshot (without `-r`, so ZFS refuses if a newer one
    /// appeared meanwhile), which drops changes made inside the replica and
    /// can never drop a snapshot.
    async fn start_receive(&self, dest: &DatasetName, plan: &Planned) -> Result<ZfsChild, String> {
        let zfs = &self.target.zfs;
        // (A resumed incremental goes on into `dest/%recv`; rolling `dest`
        // itself back does not touch that.)
        if plan.from_guid != 0 {
            // Fresh, not from the cache: another run may have moved on.
            let fresh = self.target.refresh(dest).await.map_err(|e| e.to_string())?;
            let newest = fresh.as_ref().and_then(|d| d.snapshots.last());
            let Some(newest) = newest.filter(|n| n.guid == plan.from_guid) else {
                return Err(format!(
                    "{dest} changed meanwhile: its newest snapshot is no longer the stream's base; run again"
                ));
            };
            let snap = dest.snapshot(&newest.name).map_err(|e| e.to_string())?;
            zfs.rollback(&snap)
                .await
                .map_err(|e| format!("cannot roll {dest} back to its newest snapshot: {e}"))?;
        }
        if plan.overwrite {
            // zfs swaps the new copy in at the end; a mounted destination
            // makes that fail now and then ("I/O error" on zfs-fuse, about
            // one run in five). The replica stays unmounted, like all.
            if let Err(e) = zfs.unmount(dest).await {
                tracing::debug!(%dest, "unmount before the overwrite: {e}");
            }
        }
        let spec = RecvSpec {
            force: plan.overwrite,
            // A cut transfer keeps what arrived (OpenZFS): the next run
            // goes on from there. Never for -F: a partial overwrite must
            // not linger over the existing dataset.
            resumable: zfs.caps().can_receive_resumable()
                && self.peer_caps.has(Cap::SendResume)
                && !plan.overwrite,
            options: self.target.recv_options.clone(),
        };
        zfs.spawn_receive(dest, &spec).map_err(|e| e.to_string())
    }

    /// Pipes one stream into `zfs receive`. The head of the stream is
    /// checked before `zfs receive` even starts; after that, frames go to
    /// it one behind, so the last (with the END record) waits for `End`.
    /// Protocol errors (the connection is unusable) are returned as `Err`;
    /// a stream that could not be stored is `Ok(StreamFailed)`.
    async fn receive(&mut self, plan: Planned) -> Result<Stored, ProtocolError> {
        let Some(open) = self.open.as_ref() else {
            return Ok(Stored::Failed {
                reason: "no dataset in progress".into(),
            });
        };
        let dest = open.dest.clone();
        let allowed: Vec<u64> = open.announced.iter().map(|s| s.guid).collect();
        let mut head: Vec<u8> = Vec::with_capacity(HEAD_MAX);
        let mut early: Vec<Bytes> = Vec::new();
        let mut running: Option<(ZfsChild, Option<zfsync_common::zfs::ChildWriter>)> = None;
        let mut refused: Option<String> = None;
        let mut pending: Option<Bytes> = None;
        let mut total: u64 = 0;
        let mut write_error: Option<std::io::Error> = None;
        let mut features = 0u64;
        loop {
            let frame = match self.next_frame().await {
                Ok(Some(f)) => f,
                other => {
                    let e = match other {
                        Err(e) => e,
                        _ => ProtocolError::Closed,
                    };
                    if let Some((child, stdin)) = running.take() {
                        abort_receive(stdin, child).await;
                        let _ = self.target.refresh(&dest).await;
                    }
                    tracing::warn!(peer = %self.peer, %dest, "stream cut ({e}); its last snapshot was not committed");
                    return Err(e);
                }
            };
            match frame {
                Frame::Data(b) => {
                    total += b.len() as u64;
                    if refused.is_some() {
                        continue; // draining a refused stream
                    }
                    if let Some((_, stdin)) = running.as_mut() {
                        if let Some(prev) = pending.replace(b) {
                            write(stdin, &prev, &mut write_error).await;
                        }
                        continue;
                    }
                    let room = HEAD_MAX.saturating_sub(head.len()).min(b.len());
                    head.extend_from_slice(&b[..room]);
                    early.push(b);
                    match check_head(&head, plan.from_guid, &allowed) {
                        Ok(None) => {}
                        Err(reason) => {
                            tracing::warn!(peer = %self.peer, %dest, "refused a stream: {reason}");
                            refused = Some(format!("refused stream: {reason}"));
                            early.clear();
                        }
                        Ok(Some(h)) => match self.start_receive(&dest, &plan).await {
                            Err(reason) => {
                                refused = Some(reason);
                                early.clear();
                            }
                            Ok(mut child) => {
                                features = h.features;
                                let mut stdin = child.take_stdin();
                                pending = early.pop();
                                for f in early.drain(..) {
                                    write(&mut stdin, &f, &mut write_error).await;
                                }
                                running = Some((child, stdin));
                            }
                        },
                    }
                }
                Frame::Msg(Message::End { bytes }) => {
                    if let Some(reason) = refused {
                        return Ok(Stored::Failed { reason });
                    }
                    let Some((mut child, mut stdin)) = running.take() else {
                        return Ok(Stored::Failed {
                            reason: "the stream is too short to be a zfs send stream".into(),
                        });
                    };
                    if bytes != total {
                        abort_receive(stdin, child).await;
                        let _ = self.target.refresh(&dest).await;
                        return Ok(Stored::Failed {
                            reason: format!(
                                "the sender announced {bytes} bytes but {total} arrived; the last snapshot was not committed"
                            ),
                        });
                    }
                    if let Some(last) = pending.take() {
                        write(&mut stdin, &last, &mut write_error).await;
                    }
                    drop(stdin);
                    let result = child.close().await;
                    let _ = self.target.refresh(&dest).await;
                    return Ok(match result {
                        Err(e) => {
                            let unsupported =
                                matches!(e, zfsync_common::zfs::ZfsError::UnsupportedStreamFeature { .. });
                            let mut reason = e.to_string();
                            if plan.resume {
                                // zfs itself refused the continuation: the
                                // state is of no use; the next run plans
                                // the dataset afresh.
                                match self.target.zfs.abort_resumable(&dest).await {
                                    Ok(()) => reason.push_str("; the partial state was discarded (zfs receive -A)"),
                                    Err(e2) => tracing::debug!(%dest, "zfs receive -A: {e2}"),
                                }
                                let _ = self.target.refresh(&dest).await;
                            }
                            if unsupported {
                                // Name what the local zfs lacks (zfs-fuse
                                // receiving from OpenZFS, say).
                                reason.push_str(&format!(
                                    "; the stream uses {}, which this receiver's zfs ({}) cannot receive: run the receiver on OpenZFS, or give the source datasets only features it has (for zfs-fuse: zfs create -o version=4)",
                                    feature_names(features).join(", "),
                                    self.target.zfs.caps().version
                                ));
                            }
                            tracing::warn!(peer = %self.peer, %dest, "zfs receive failed: {reason}");
                            Stored::Failed { reason }
                        }
                        Ok(()) => match self.target.newest(&dest) {
                            Some(n) if n.guid == plan.to.guid => {
                                if plan.from_guid == 0 && !plan.overwrite {
                                    self.never_automount(&dest).await;
                                }
                                tracing::info!(peer = %self.peer, %dest, snapshot = %plan.to.name, bytes, "received");
                                Stored::Received { bytes }
                            }
                            _ => Stored::Failed {
                                reason: format!(
                                    "the stream did not end at the announced snapshot @{} (guid {})",
                                    plan.to.name, plan.to.guid
                                ),
                            },
                        },
                    });
                }
                Frame::Msg(Message::Abort { reason }) => {
                    if let Some((child, stdin)) = running.take() {
                        abort_receive(stdin, child).await;
                        let _ = self.target.refresh(&dest).await;
                    }
                    tracing::warn!(peer = %self.peer, %dest, "sender aborted the stream: {reason}");
                    return Ok(Stored::Failed {
                        reason: format!("aborted by the sender: {reason}"),
                    });
                }
                Frame::Msg(other) => {
                    if let Some((child, stdin)) = running.take() {
                        abort_receive(stdin, child).await;
                        let _ = self.target.refresh(&dest).await;
                    }
                    return Err(ProtocolError::Unexpected {
                        got: format!("message {}", other.name()),
                        expected: "stream data, end or abort".into(),
                    });
                }
            }
        }
    }

    /// Holds the newest snapshot of a finished dataset (the base of the
    /// next incremental) and releases this receiver's older holds on it,
    /// so that neither a person nor another tool destroys the base by
    /// accident. Once per dataset and run: one `zfs hold`, and one
    /// `zfs release` only when older snapshots are held (`userrefs` from
    /// the listing; `zfs release` goes on past a snapshot without the tag).
    /// Only where `zfs holds` exists (OpenZFS): without it the receiver
    /// could not find its own holds again before destroying a tree it made.
    async fn move_hold(&self, dest: &DatasetName, newest: &Snapshot) {
        let zfs = &self.target.zfs;
        if !(zfs.caps().has(Cap::Holds) && zfs.caps().has(Cap::HoldsList)) {
            return;
        }
        let Ok(new) = dest.snapshot(&newest.name) else {
            return;
        };
        let Some(d) = self.target.get(dest) else {
            return;
        };
        if !d.held.contains(newest.name.as_str()) {
            if let Err(e) = zfs.hold(RECV_HOLD, std::slice::from_ref(&new)).await {
                tracing::warn!(%new, "cannot hold the received snapshot: {e}");
                return;
            }
        }
        let older: Vec<_> = d
            .snapshots
            .iter()
            .filter(|s| s.guid != newest.guid && d.held.contains(s.name.as_str()))
            .filter_map(|s| dest.snapshot(&s.name).ok())
            .collect();
        if let Err(e) = zfs.release(RECV_HOLD, &older).await {
            // Also when one of them is held by someone else only.
            tracing::debug!(%dest, "releasing the previous holds: {e}");
        }
    }

    /// A dataset zfsync created is set `canmount=noauto`: a replica is
    /// never mounted by a rename, a `zfs mount -a` or a reboot (it would
    /// shadow the receiving host's own paths); `zfs mount` still mounts it.
    /// It is also marked `zfsync:replica=<its own GUID>`, which
    /// `--delete-missing` requires before it destroys anything (the GUID,
    /// because user properties are inherited: a child someone else made
    /// under a replica inherits the mark, but not the GUID).
    async fn never_automount(&self, ds: &DatasetName) {
        let zfs = &self.target.zfs;
        if let Err(e) = zfs.set(ds, "canmount", "noauto").await {
            tracing::warn!(%ds, "cannot set canmount=noauto: {e}");
        }
        let Some(guid) = self
            .target
            .get(ds)
            .map(|d| zfsync_common::naming::format_replica_mark(d.guid))
        else {
            return;
        };
        match zfs.set(ds, REPLICA_PROP, &guid).await {
            Ok(()) => self.target.mark_replica(ds, &guid),
            Err(e) => tracing::warn!(%ds, "cannot set {REPLICA_PROP}: {e}"),
        }
    }

    async fn finish(&mut self, open: Open) -> FinishReply {
        let newest = self.target.newest(&open.dest).map(|n| n.guid);
        if newest != open.announced.last().map(|s| s.guid) {
            let rel = open.rel.clone();
            // A half-built replacement is removed; the old copy stays.
            self.open = Some(open);
            self.abandon().await;
            return FinishReply::Refused {
                reason: format!(
                    "{rel} did not receive every snapshot up to the sender's newest; not finishing it"
                ),
                temporary: false,
            };
        }
        if let Some(newest) = open.announced.last() {
            // Before the mirrored retention, which may destroy the
            // previously held snapshot.
            self.move_hold(&open.dest, newest).await;
        }
        match &open.mode {
            Mode::Direct | Mode::Overwrite => FinishReply::Done(Finished {
                location: open.dest.to_string(),
                buffered: open.buffered,
                pruned: self.mirror_retention(&open.dest, &open.announced).await,
            }),
            Mode::Replace { replaces } => match self.replace(&open.dest, replaces, &open.rel).await
            {
                Ok(()) => FinishReply::Done(Finished {
                    location: replaces.to_string(),
                    buffered: open.buffered,
                    pruned: Vec::new(),
                }),
                Err(reason) => FinishReply::Refused {
                    reason,
                    temporary: false,
                },
            },
        }
    }

    /// Destroys the tool snapshots the sender no longer has (see
    /// [`mirror`]), unless the receiver keeps everything. Each is destroyed
    /// on its own, never with `-r`.
    async fn mirror_retention(&self, dest: &DatasetName, announced: &[Snapshot]) -> Vec<String> {
        if !self.target.mirror {
            return Vec::new();
        }
        let Some(current) = self.target.get(dest) else {
            return Vec::new();
        };
        let mut pruned = Vec::new();
        for name in mirror(&current.snapshots, announced) {
            let Ok(snap) = dest.snapshot(&name) else {
                continue;
            };
            match self.target.zfs.destroy_snapshot(&snap, false).await {
                Ok(()) => pruned.push(name.to_string()),
                Err(e) => tracing::warn!(%snap, "mirrored retention: cannot destroy: {e}"),
            }
        }
        if !pruned.is_empty() {
            tracing::info!(peer = %self.peer, %dest, ?pruned, "mirrored the sender's retention");
            let _ = self.target.refresh(dest).await;
        }
        pruned
    }

    /// Swaps a whole new copy (`new`) in for `old`, keeping `old`'s child
    /// datasets: they move under the new copy first. The old copy is
    /// destroyed only after the new one is in its place, and only once no
    /// child dataset is left under it. Every failure undoes what it can and
    /// says where each piece is.
    async fn replace(
        &self,
        new: &DatasetName,
        old: &DatasetName,
        rel: &RelPath,
    ) -> Result<(), String> {
        let zfs = &self.target.zfs;
        let parked = self.target.old_temp_name(rel).map_err(|e| e.to_string())?;
        self.target.relist().await.map_err(|e| e.to_string())?;
        if self.target.exists(&parked) {
            if !self.target.children(&parked).is_empty() {
                return Err(format!(
                    "{parked} is left from an interrupted replacement and holds datasets; move them back by hand (zfs list -r {parked}), then destroy it"
                ));
            }
            // The old copy of a finished replacement whose destroy failed.
            self.target
                .destroy_tree(&parked)
                .await
                .map_err(|e| format!("cannot remove the stale {parked}: {e}"))?;
            self.target.destroyed(&parked);
        }
        // Nothing else may work below `old` while it moves.
        let _locks = self.lock_subtree(old).await?;
        let mut moved: Vec<(DatasetName, DatasetName)> = Vec::new();
        let undo = |moved: Vec<(DatasetName, DatasetName)>| async move {
            let mut stranded = Vec::new();
            for (from, to) in moved.into_iter().rev() {
                if let Err(e) = zfs.rename(&to, &from).await {
                    tracing::error!("cannot move {to} back to {from}: {e}");
                    stranded.push(format!("{from} is now at {to}"));
                }
            }
            let _ = self.target.relist().await;
            if stranded.is_empty() {
                String::new()
            } else {
                format!("; could not move back: {}", stranded.join(", "))
            }
        };
        for child in self.target.children(old) {
            let leaf = child.leaf().to_string();
            let to = match new.child(&leaf) {
                Ok(t) => t,
                Err(e) => return Err(format!("{e}{}", undo(moved).await)),
            };
            if let Err(e) = zfs.rename(&child, &to).await {
                return Err(format!(
                    "cannot move {child} under the new copy: {e}{}",
                    undo(moved).await
                ));
            }
            moved.push((child, to));
        }
        if let Err(e) = zfs.rename(old, &parked).await {
            return Err(format!(
                "cannot move the old copy {old} aside: {e}{}",
                undo(moved).await
            ));
        }
        if let Err(e) = zfs.rename(new, old).await {
            let back = match zfs.rename(&parked, old).await {
                Ok(()) => String::new(),
                Err(e2) => format!("; the old copy is at {parked} (cannot move it back: {e2})"),
            };
            return Err(format!(
                "cannot move the new copy into place at {old}: {e}{back}{}",
                undo(moved).await
            ));
        }
        // A child created below the old copy meanwhile went along with it:
        // bring it over too, and destroy the old copy only when it is bare.
        let leftover = zfs
            .list_trees(&[&parked])
            .await
            .map(|t| {
                t.datasets
                    .into_keys()
                    .filter(|k| k.parent().as_ref() == Some(&parked))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let mut kept = Vec::new();
        for child in leftover {
            let leaf = child.leaf().to_string();
            let moved_ok = match old.child(&leaf) {
                Ok(to) => zfs.rename(&child, &to).await.is_ok(),
                Err(_) => false,
            };
            if !moved_ok {
                kept.push(child.to_string());
            }
        }
        if kept.is_empty() {
            if let Err(e) = self.target.destroy_tree(&parked).await {
                tracing::warn!("the new copy is in place, but the old one at {parked} could not be destroyed: {e}");
            }
        } else {
            tracing::warn!("the new copy is in place; the old copy stays at {parked} because it still holds {}", kept.join(", "));
        }
        tracing::info!(peer = %self.peer, dataset = %old, "replaced by a full copy");
        self.target.relist().await.map_err(|e| e.to_string())
    }

    /// Locks every dataset below `ds` that lies in place under the target,
    /// waiting up to a minute for transfers into them to end.
    async fn lock_subtree(&self, ds: &DatasetName) -> Result<Vec<DatasetLock>, String> {
        let rels: Vec<RelPath> = self
            .target
            .descendants(ds)
            .iter()
            .filter_map(|d| d.relative_to(&self.target.name))
            .collect();
        let mut locks = Vec::new();
        for rel in rels {
            let mut tries = 0;
            loop {
                if let Some(l) = self.target.try_lock(&rel) {
                    locks.push(l);
                    break;
                }
                tries += 1;
                if tries > 120 {
                    return Err(format!(
                        "{rel} is busy with another transfer; the replacement waits for the next run"
                    ));
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        Ok(locks)
    }

    /// Places buffered datasets, parents first. Keeps going past failures.
    async fn clean_buffer(&mut self) -> CleanReport {
        let mut placed = Vec::new();
        let mut failed = Vec::new();
        for (rel, buffered) in self.target.buffered() {
            let fail = |reason: String| PlaceFailure {
                path: rel.as_str().to_string(),
                reason,
            };
            let Some(_lock) = self.target.try_lock(&rel) else {
                failed.push(fail(
                    "a transfer into it is running; the next run places it".into(),
                ));
                continue;
            };
            let dest = match self.target.in_place_name(&rel) {
                Ok(d) => d,
                Err(e) => {
                    failed.push(fail(e.to_string()));
                    continue;
                }
            };
            if self.target.exists(&dest) {
                failed.push(fail(format!(
                    "{dest} already exists; remove either it or {buffered}"
                )));
                continue;
            }
            if let Some(parent) = dest.parent() {
                if !self.target.exists(&parent) {
                    failed.push(fail(format!(
                        "its parent {parent} is not on the receiver yet (does the parent have a snapshot on the sender?); the run that brings it places this one"
                    )));
                    continue;
                }
            }
            match self.target.zfs.rename(&buffered, &dest).await {
                Ok(()) => {
                    self.target.renamed(&buffered, &dest);
                    tracing::info!(peer = %self.peer, %dest, "placed from the buffer");
                    placed.push(rel.as_str().to_string());
                }
                Err(e) => failed.push(fail(format!("cannot rename {buffered} to {dest}: {e}"))),
            }
        }
        // Remove the buffer dataset once it is empty.
        let buf = &self.target.buffer;
        if self.target.exists(buf) && self.target.children(buf).is_empty() {
            // Not -r: should a new dataset have arrived meanwhile, zfs
            // refuses and the buffer simply stays.
            match self.target.zfs.destroy_empty(buf).await {
                Ok(()) => self.target.destroyed(buf),
                Err(e) => tracing::warn!("cannot remove the empty buffer {buf}: {e}"),
            }
        }
        CleanReport {
            placed,
            failed,
            orphans: Vec::new(),
            deleted: Vec::new(),
        }
    }

    /// What [`Session::clean_buffer`] would place, changing nothing.
    fn would_place(&self) -> CleanReport {
        let buffered = self.target.buffered();
        let waiting: Vec<&RelPath> = buffered.iter().map(|(r, _)| r).collect();
        let mut placed = Vec::new();
        let mut failed = Vec::new();
        for (rel, _) in &buffered {
            let dest = self.target.in_place_name(rel);
            let parent_ok = rel.parent().is_none_or(|p| {
                waiting.contains(&&p)
                    || self
                        .target
                        .in_place_name(&p)
                        .is_ok_and(|d| self.target.exists(&d))
            });
            match dest {
                Ok(d) if !self.target.exists(&d) && parent_ok => placed.push(rel.to_string()),
                _ => failed.push(PlaceFailure {
                    path: rel.as_str().to_string(),
                    reason: "could not be placed now".into(),
                }),
            }
        }
        CleanReport {
            placed,
            failed,
            orphans: Vec::new(),
            deleted: Vec::new(),
        }
    }

    /// Fills in the replicas whose source is gone and, with `delete`,
    /// destroys them: only whole subtrees that zfsync created
    /// (`zfsync:replica` = their GUID) and that are all orphaned.
    async fn orphans(&self, source_paths: &[String], delete: bool, report: &mut CleanReport) {
        let CleanReport {
            orphans, deleted, ..
        } = report;
        let source: std::collections::HashSet<&str> =
            source_paths.iter().map(String::as_str).collect();
        // An honest sender always lists its top dataset: without it the
        // list is wrong, and the whole replica would look orphaned.
        if !source.contains("") {
            tracing::warn!(peer = %self.peer, "cleanbuffer without the top dataset in the source list: no orphans judged");
            return;
        }
        let found = self.target.orphans(&source);
        *orphans = found
            .iter()
            .map(|(rel, _)| rel.as_str().to_string())
            .collect();
        if !delete || found.is_empty() {
            return;
        }
        tracing::warn!(peer = %self.peer, orphans = ?orphans, "--delete-missing: destroying the orphaned replicas zfsync created among these");
        for (rel, ds) in &found {
            // Only the top of an orphaned subtree; -r takes the rest.
            if rel
                .parent()
                .is_some_and(|p| found.iter().any(|(r, _)| *r == p))
            {
                continue;
            }
            let Some(_lock) = self.target.try_lock(rel) else {
                continue;
            };
            // Judge on a fresh listing of this subtree alone: a dataset may
            // have appeared below since this run's listing, and destroy -r
            // would take it.
            let fresh = match self
                .target
                .zfs
                .list_trees_with(&[ds], &[REPLICA_PROP])
                .await
            {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(%ds, "cannot list before deleting: {e}");
                    continue;
                }
            };
            if !fresh.datasets.values().all(is_replica) {
                tracing::warn!(%ds, "orphaned, but not created by zfsync (or holds such a dataset): left alone");
                continue;
            }
            match self.target.destroy_tree(ds).await {
                Ok(()) => {
                    tracing::warn!(peer = %self.peer, %ds, "destroyed an orphaned replica (--delete-missing)");
                    self.target.destroyed(ds);
                    deleted.push(rel.as_str().to_string());
                }
                Err(e) => tracing::warn!(%ds, "cannot destroy the orphaned replica: {e}"),
            }
        }
    }
}

/// Ends a `zfs receive` without committing: its stdin closes before the
/// held-back last frame (with the stream's END record) was written, so zfs
/// sees a truncated stream, fails and cleans up. Waiting for it (rather than
/// killing it) means the cleanup is done when this returns; the kill is the
/// backstop for a `zfs` that hangs.
async fn abort_receive(stdin: Option<zfsync_common::zfs::ChildWriter>, mut child: ZfsChild) {
    drop(stdin);
    let _ = child.close_within(ABORT_WAIT).await;
}

async fn write(
    stdin: &mut Option<zfsync_common::zfs::ChildWriter>,
    data: &[u8],
    error: &mut Option<std::io::Error>,
) {
    if error.is_some() {
        return;
    }
    if let Some(s) = stdin.as_mut() {
        if let Err(e) = s.write_all(data).await {
            // zfs receive stopped reading (it failed); keep draining the
            // connection and report its stderr at End.
            *error = Some(e);
        }
    }
}

/// Shared state of all connections.
pub struct Shared {
    pub target: Target,
    /// Names (CN or DNS SAN) allowed to connect; empty: any certificate the
    /// CA signed.
    pub allow_clients: Vec<String>,
}
