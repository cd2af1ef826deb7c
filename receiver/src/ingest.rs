//! Taking in one stream: the announcement check ([`check_stream`]), then
//! [`receive`], which feeds `zfs receive` one frame behind.
//!
//! Invariants:
//! - a stream names a snapshot from the sync request and starts from the
//!   destination's newest snapshot (from nothing for a new dataset); a
//!   resumed stream comes after a resume offer, and only then;
//! - every byte of the stream passes the [`Validator`] before `zfs
//!   receive` sees it: the head before `zfs receive` starts (at most
//!   [`HEAD_MAX`] bytes are kept until then), each later frame when it
//!   arrives, so a frame is written only once it, and the one after it,
//!   passed; a refused stream aborts the receive as a cut does and is
//!   drained, never received;
//! - an empty data frame ends the connection (it carries nothing, and
//!   would only make the receiver work or queue for nothing);
//! - an incremental starts from the destination's newest snapshot per the
//!   cache, which is the truth between listings (no `zfs` call to check);
//!   it is rolled back first (never `-r`) only where zfs has `written` and
//!   the replica changed since that snapshot (or `written` is unknown);
//!   where zfs has no `written` (zfs-fuse) or the change came later, a
//!   `zfs receive` refused because the destination was modified rolls it
//!   back (never `-r`) and answers the stream as a temporary failure, which
//!   the sender sends again; `-F` only for an overwrite, which is unmounted
//!   first and never resumable;
//! - a successful receive updates the cache from what the stream carried
//!   (the snapshots the validator saw, with the sender's names and GUIDs),
//!   without listing; a failed, cut or refused one lists the destination
//!   again; a new replica's marks travel in the receive (`-o`) where zfs
//!   can, else they are set in a batch (`finish::flush`);
//! - the last data frame (with the stream's END record) is held back until
//!   `End{bytes}` matches what arrived; a cut, an `Abort`, a count mismatch,
//!   an unexpected message or a shutdown closes `zfs receive`'s input early
//!   and waits for it (killing it after [`ABORT_WAIT`]): nothing half-sent
//!   is committed.

use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use zfsync_common::caps::{Cap, Caps, SendPath};
use zfsync_common::naming::{DatasetName, NameError, SnapName, REPLICA_MARK};
use zfsync_common::protocol::{Frame, Message, ProtocolError, StreamRequest};
use zfsync_common::stream::{feature_names, is_raw, Allow, Expect, Validator, HEAD_MAX};
use zfsync_common::zfs::{ChildWriter, RecvOption, RecvSpec, Snapshot, ZfsChild, ZfsError};

use crate::finish;
use crate::open::{Mode, Open};
use crate::state::{NewDataset, Target, REPLICA_PROP};

/// How long an aborted `zfs receive` may take to clean up before it is
/// killed.
const ABORT_WAIT: Duration = Duration::from_secs(120);

/// Where a stream's frames come from. The session's connection ends the
/// wait with an error when the receiver shuts down, which aborts the
/// receive.
pub(crate) trait Frames {
    async fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError>;
}

/// A stream the receiver agreed to.
#[derive(Debug)]
pub(crate) struct Planned {
    to: Snapshot,
    /// The base's GUID; 0 for a full stream.
    from_guid: u64,
    /// Full stream into an existing dataset without snapshots (`-F`).
    overwrite: bool,
    /// Continues a cut stream (`zfs send -t` on the sender).
    resume: bool,
    /// Straight into the destination (not a replacement's temporary copy,
    /// not a `-F` overwrite): the steady state, whose cache entry is
    /// updated from the stream.
    direct: bool,
}

/// Why a stream announcement is refused (before any data).
#[derive(Debug, Error)]
pub(crate) enum StreamError {
    #[error("invalid snapshot: {0}")]
    InvalidSnapshot(NameError),
    #[error("@{0} was not in the sync request")]
    NotAnnounced(SnapName),
    #[error("a resumed stream, but no resume was offered")]
    ResumeNotOffered,
    #[error("{0} holds a cut transfer: resume it first")]
    ResumeFirst(DatasetName),
    #[error("{0} exists: a full stream cannot be received into it")]
    FullIntoExisting(DatasetName),
    #[error("{0} does not exist: send a full stream first")]
    IncrementalIntoMissing(DatasetName),
    #[error("@{to} is not newer than @{newest}")]
    NotNewer { to: SnapName, newest: SnapName },
    #[error("the stream's base is not the newest snapshot of {0}")]
    WrongBase(DatasetName),
}

/// Why a stream was not stored. Only [`IngestError::Protocol`] leaves the
/// connection unusable; every other is the answer to the stream.
#[derive(Debug, Error)]
pub(crate) enum IngestError {
    /// The connection was cut, misbehaved, or the receiver shuts down.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The stream validator said no.
    #[error("refused stream: {0}")]
    Refused(String),
    #[error(
        "{0} changed meanwhile: its newest snapshot is no longer the stream's base; run again"
    )]
    BaseGone(DatasetName),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("cannot roll {dest} back to its newest snapshot: {source}")]
    Rollback { dest: DatasetName, source: ZfsError },
    /// `zfs receive` refused because the replica changed since its newest
    /// snapshot; it was rolled back, and the stream goes again.
    #[error("{dest} was changed on the receiver since its newest snapshot; the changes were dropped (rolled back to @{snap}); the sender sends it again")]
    Modified { dest: DatasetName, snap: SnapName },
    #[error(transparent)]
    Spawn(ZfsError),
    #[error("the stream is too short to be a zfs send stream")]
    TooShort,
    #[error("the sender announced {announced} bytes but {arrived} arrived; the last snapshot was not committed")]
    Count { announced: u64, arrived: u64 },
    /// `zfs receive` failed.
    #[error("{source}{}", receive_notes(*.discarded, .unsupported))]
    Receive {
        source: ZfsError,
        /// A resumed receive's partial state was discarded (`receive -A`).
        discarded: bool,
        unsupported: Option<Unsupported>,
    },
    #[error("the stream did not end at the announced snapshot @{name} (guid {guid})")]
    WrongEnd { name: SnapName, guid: u64 },
    #[error("aborted by the sender: {0}")]
    Aborted(String),
}

impl IngestError {
    /// Worth sending again in the same run: the replica was rolled back.
    pub(crate) fn is_temporary(&self) -> bool {
        matches!(self, IngestError::Modified { .. })
    }
}

/// A stream feature the local zfs cannot receive (zfs-fuse receiving from
/// OpenZFS, say): names what it lacks.
#[derive(Debug)]
pub(crate) struct Unsupported {
    features: Vec<String>,
    zfs: String,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the stream uses {}, which this receiver's zfs ({}) cannot receive: run the receiver on OpenZFS, or give the source datasets only features it has (for zfs-fuse: zfs create -o version=4)",
            self.features.join(", "),
            self.zfs
        )
    }
}

fn receive_notes(discarded: bool, unsupported: &Option<Unsupported>) -> String {
    let mut notes = String::new();
    if discarded {
        notes.push_str("; the partial state was discarded (zfs receive -A)");
    }
    if let Some(u) = unsupported {
        notes.push_str(&format!("; {u}"));
    }
    notes
}

/// Checks a stream announcement against the sync request and the
/// destination: the snapshot must be one the sender announced, and the
/// stream must start from the destination's newest snapshot (or from
/// nothing for a new dataset).
pub(crate) fn check_stream(
    target: &Target,
    open: &Open,
    req: &StreamRequest,
) -> Result<Planned, StreamError> {
    let resume = req.resume;
    let to = req.to.validate().map_err(StreamError::InvalidSnapshot)?;
    if !open.announced.contains(&to) {
        return Err(StreamError::NotAnnounced(to.name));
    }
    if resume != open.resume_offered {
        return Err(if resume {
            StreamError::ResumeNotOffered
        } else {
            StreamError::ResumeFirst(open.dest.clone())
        });
    }
    let newest = target.newest(&open.dest);
    let exists = target.exists(&open.dest);
    let planned = |from_guid, overwrite| Planned {
        to: to.clone(),
        from_guid,
        overwrite,
        resume,
        direct: matches!(open.mode, Mode::Direct),
    };
    match (req.from_guid, exists, newest) {
        (None, false, _) => Ok(planned(0, false)),
        // A cut full stream: the dataset exists, with no snapshot yet.
        (None, true, None) if resume => Ok(planned(0, false)),
        (None, true, None) if matches!(open.mode, Mode::Overwrite) => Ok(planned(0, true)),
        (None, true, _) => Err(StreamError::FullIntoExisting(open.dest.clone())),
        (Some(_), false, _) => Err(StreamError::IncrementalIntoMissing(open.dest.clone())),
        (Some(g), true, Some(n)) if n.guid == g => {
            // createtxg differs between pools: compare the sender's own.
            // The base may be one of the sender's bookmarks.
            let base = open
                .announced
                .iter()
                .chain(&open.bookmarks)
                .find(|s| s.guid == g);
            if base.is_none_or(|b| to.createtxg <= b.createtxg) {
                return Err(StreamError::NotNewer {
                    to: to.name.clone(),
                    newest: n.name,
                });
            }
            Ok(planned(g, false))
        }
        (Some(_), true, _) => Err(StreamError::WrongBase(open.dest.clone())),
    }
}

/// Whether an incremental must roll the destination back before `zfs
/// receive`: only where zfs has `written` and it is not 0 (a change since
/// the newest snapshot) or unknown. Without the property (zfs-fuse) the
/// receive goes ahead, and a refusal for a modified destination is
/// answered by a rollback and a second try ([`IngestError::Modified`]).
pub(crate) fn needs_rollback(caps: &Caps, written: Option<u64>) -> bool {
    caps.has(Cap::Written) && written != Some(0)
}

/// The `-o` options that mark a new replica in its first `zfs receive`,
/// where zfs has `receive -o` (OpenZFS): `canmount=noauto` (not for a
/// volume, which has no `canmount`) and the replica mark; none for a
/// resumed or `-F` receive, nor a property the admin's own
/// `--recv-option`s name. Elsewhere the marks are set in a batch
/// afterwards (`finish::flush`).
pub(crate) fn marks_in_receive(
    caps: &Caps,
    plan_new: bool,
    volume: bool,
    admin: &[RecvOption],
) -> Vec<RecvOption> {
    if !(plan_new && caps.has(Cap::RecvSetProp)) {
        return Vec::new();
    }
    let named = |p: &str| {
        admin.iter().any(|o| match o {
            RecvOption::Set(k, _) | RecvOption::Exclude(k) => k == p,
        })
    };
    // `-x canmount` and `-o canmount=noauto` cannot go together: both
    // marks are set after the receive then, in the batch (FI3).
    if admin
        .iter()
        .any(|o| matches!(o, RecvOption::Exclude(k) if k == "canmount"))
    {
        return Vec::new();
    }
    let mut v = Vec::new();
    if !volume && !named("canmount") {
        v.push(RecvOption::Set("canmount".into(), "noauto".into()));
    }
    if !named(REPLICA_PROP) {
        v.push(RecvOption::Set(REPLICA_PROP.into(), REPLICA_MARK.into()));
    }
    v
}

/// Gets the destination ready and starts `zfs receive`. An incremental
/// is received without `-F`, from the newest snapshot the cache shows;
/// the destination is rolled back to it first only when it is known or
/// may have changed ([`needs_rollback`]). A rollback is never `-r`, so
/// ZFS refuses if a newer snapshot appeared meanwhile: it drops changes
/// made inside the replica and can never drop a snapshot. Returns the
/// child and whether the receive sets the replica mark.
async fn start_receive(
    target: &Target,
    peer_caps: &Caps,
    dest: &DatasetName,
    plan: &Planned,
    volume: bool,
) -> Result<(ZfsChild, bool), IngestError> {
    let zfs = &target.zfs;
    let caps = zfs.caps();
    // (A resumed incremental goes on into `dest/%recv`; rolling `dest`
    // itself back does not touch that.)
    if plan.from_guid != 0 {
        let d = target.get(dest);
        let newest = d.as_ref().and_then(|d| d.snapshots.last());
        let Some(newest) = newest.filter(|n| n.guid == plan.from_guid) else {
            return Err(IngestError::BaseGone(dest.clone()));
        };
        if needs_rollback(&caps, d.as_ref().and_then(|d| d.written)) {
            rollback(target, dest, &newest.name).await?;
        }
    }
    if plan.overwrite {
        // zfs swaps the new copy in at the end; a mounted destination
        // makes that fail now and then ("I/O error" on zfs-fuse, about
        // one run in five). The replica stays unmounted, like all.
        if let Err(e) = zfs.unmount(dest).await {
            tracing::debug!(%dest, "unmount before the overwrite: {e}");
        }
    }
    let plan_new = plan.from_guid == 0 && !plan.overwrite && !plan.resume;
    let marks = marks_in_receive(&caps, plan_new, volume, &target.recv_options);
    let marked = marks
        .iter()
        .any(|o| matches!(o, RecvOption::Set(k, _) if k == REPLICA_PROP));
    let mut options = marks;
    options.extend(target.recv_options.iter().cloned());
    let spec = RecvSpec {
        force: plan.overwrite,
        // A cut transfer keeps what arrived (OpenZFS): the next run
        // goes on from there. Never for -F: a partial overwrite must
        // not linger over the existing dataset.
        resumable: caps.can_receive_resumable()
            && peer_caps.has(Cap::SendResume)
            && !plan.overwrite,
        options,
    };
    let child = zfs.spawn_receive(dest, &spec).map_err(IngestError::Spawn)?;
    Ok((child, marked))
}

/// `zfs rollback dest@snap` (never `-r`), recorded in the cache.
async fn rollback(target: &Target, dest: &DatasetName, snap: &SnapName) -> Result<(), IngestError> {
    let full = dest.snapshot(snap)?;
    target
        .zfs
        .rollback(&full)
        .await
        .map_err(|source| IngestError::Rollback {
            dest: dest.clone(),
            source,
        })?;
    let written = target.zfs.caps().has(Cap::Written).then_some(0);
    target.rolled_back(dest, written);
    Ok(())
}

/// `zfs receive`'s input. A failed write means zfs stopped reading (it
/// failed): later writes are skipped, the connection is still drained,
/// and zfs's own error is reported at `End`. A write that does not finish
/// within `limit` (`--zfs-timeout`) counts as failed too: a wedged `zfs
/// receive` must not hold the dataset's lock forever.
struct Input {
    stdin: Option<ChildWriter>,
    failed: bool,
    limit: Duration,
}

impl Input {
    async fn write(&mut self, data: &[u8]) {
        if self.failed {
            return;
        }
        if let Some(s) = self.stdin.as_mut() {
            match tokio::time::timeout(self.limit, s.write_all(data)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => self.failed = true,
                Err(_) => {
                    tracing::warn!(limit = ?self.limit, "zfs receive took no input for too long (--zfs-timeout); it is ended at the stream's end");
                    self.failed = true;
                }
            }
        }
    }
}

/// A running `zfs receive`.
struct Running {
    child: ZfsChild,
    input: Input,
}

impl Running {
    /// Ends a `zfs receive` without committing: its stdin closes before
    /// the held-back last frame (with the stream's END record) was
    /// written, so zfs sees a truncated stream, fails and cleans up.
    /// Waiting for it (rather than killing it) means the cleanup is done
    /// when this returns; the kill is the backstop for a `zfs` that hangs.
    async fn abort(self) {
        let Running { mut child, input } = self;
        drop(input);
        let _ = child.close_within(ABORT_WAIT).await;
    }
}

/// One stream on its way into `zfs receive`.
struct Feed<'a> {
    target: &'a Target,
    peer: &'a str,
    peer_caps: &'a Caps,
    dest: &'a DatasetName,
    plan: &'a Planned,
    /// The sender's snapshots: what the stream may create.
    announced: &'a [Snapshot],
    /// The base's createtxg on the sender (0 for a full stream).
    from_createtxg: u64,
    /// Sees every byte before `zfs receive` does.
    validator: Validator<'a>,
    /// The bytes that arrived before the validator knew the head (fewer
    /// than [`HEAD_MAX`]: it decides within them).
    early: Vec<u8>,
    running: Option<Running>,
    /// Why the stream is refused; the rest of it is drained.
    refused: Option<IngestError>,
    /// The newest data frame, held back until the next one (or `End`).
    pending: Option<Bytes>,
    /// Data bytes that arrived, to compare with `End{bytes}`.
    total: u64,
    /// The stream's feature flags, from its head.
    features: u64,
    /// The receive sets the replica mark itself (`-o`).
    marked: bool,
    /// The stream is of a volume (from its head).
    volume: bool,
}

impl<'a> Feed<'a> {
    /// A stream about to arrive, nothing received yet.
    fn new(
        target: &'a Target,
        peer: &'a str,
        peer_caps: &'a Caps,
        open: &'a Open,
        plan: &'a Planned,
        validator: Validator<'a>,
    ) -> Feed<'a> {
        Feed {
            target,
            peer,
            peer_caps,
            dest: &open.dest,
            plan,
            announced: &open.announced,
            from_createtxg: base_createtxg(open, plan),
            validator,
            early: Vec::new(),
            running: None,
            refused: None,
            pending: None,
            total: 0,
            features: 0,
            marked: false,
            volume: false,
        }
    }

    /// A data frame: validated, then held back while the one before it
    /// goes to `zfs receive` (started once the head passed). An empty
    /// frame is a protocol error.
    async fn data(&mut self, b: Bytes) -> Result<(), ProtocolError> {
        if b.is_empty() {
            return Err(ProtocolError::BadFrame("an empty data frame".into()));
        }
        self.total += b.len() as u64;
        if self.refused.is_some() {
            return Ok(()); // draining a refused stream
        }
        if let Err(refusal) = self.validator.feed(&b) {
            tracing::warn!(peer = %self.peer, dest = %self.dest, "refused a stream: {refusal}");
            self.refuse(IngestError::Refused(refusal.to_string())).await;
            return Ok(());
        }
        if let Some(running) = self.running.as_mut() {
            if let Some(prev) = self.pending.replace(b) {
                running.input.write(&prev).await;
            }
            return Ok(());
        }
        let Some((features, volume)) = self.validator.head().map(|h| (h.features, h.volume)) else {
            if self.early.len() + b.len() >= HEAD_MAX {
                // The validator decides within HEAD_MAX bytes; never here.
                let e = format!("no stream head within its first {HEAD_MAX} bytes");
                self.refuse(IngestError::Refused(e)).await;
            } else {
                self.early.extend_from_slice(&b);
            }
            return Ok(());
        };
        match start_receive(self.target, self.peer_caps, self.dest, self.plan, volume).await {
            Err(e) => self.refuse(e).await,
            Ok((mut child, marked)) => {
                self.features = features;
                self.marked = marked;
                self.volume = volume;
                let mut input = Input {
                    stdin: child.take_stdin(),
                    failed: false,
                    limit: self.target.zfs.call_timeout(),
                };
                if !self.early.is_empty() {
                    input.write(&std::mem::take(&mut self.early)).await;
                }
                self.pending = Some(b);
                self.running = Some(Running { child, input });
            }
        }
        Ok(())
    }

    /// Refuses the rest of the stream: a running `zfs receive` is aborted
    /// before the held-back frame, as for a cut; what follows is drained.
    async fn refuse(&mut self, e: IngestError) {
        self.pending = None;
        self.early = Vec::new();
        self.stop().await;
        self.refused = Some(e);
    }

    /// Aborts a running `zfs receive` (nothing is committed).
    async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.abort().await;
            let _ = self.target.refresh(self.dest).await;
        }
    }

    /// The sender's `End`: the held-back frame goes in only if every byte
    /// arrived.
    async fn end(mut self, bytes: u64) -> Result<u64, IngestError> {
        if let Some(refused) = self.refused.take() {
            return Err(refused);
        }
        let Some(mut running) = self.running.take() else {
            return Err(IngestError::TooShort);
        };
        let (target, dest, plan) = (self.target, self.dest, self.plan);
        if bytes != self.total {
            running.abort().await;
            let _ = target.refresh(dest).await;
            return Err(IngestError::Count {
                announced: bytes,
                arrived: self.total,
            });
        }
        if !self.validator.is_complete() {
            // Valid so far but cut short: zfs sees a truncated stream and
            // says so (snapshots of a package that arrived whole stay).
            tracing::debug!(peer = %self.peer, %dest, "the stream ends before its last END record");
        }
        if let Some(last) = self.pending.take() {
            running.input.write(&last).await;
        }
        let Running { mut child, input } = running;
        drop(input);
        let result = child.close_within(target.zfs.call_timeout()).await;
        if let Err(source) = result {
            return Err(self.failed(source).await);
        }
        // The stream passed the validator whole and zfs took all of it:
        // what it carried is what the destination has now.
        if let Some(snaps) = self.created().filter(|_| plan.direct) {
            let new = plan.from_guid == 0;
            target.received(
                dest,
                NewDataset {
                    kind: if self.volume { "volume" } else { "filesystem" },
                    encrypted: is_raw(self.features),
                    marked: self.marked,
                    written: target.zfs.caps().has(Cap::Written).then_some(0),
                },
                &snaps,
            );
            if new && !self.marked && target.mark_later(dest) {
                finish::flush(target).await;
            }
            tracing::info!(peer = %self.peer, %dest, snapshot = %plan.to.name, bytes, "received");
            return Ok(bytes);
        }
        // A replacement, an overwrite, or a stream zfs took although it
        // did not end where the validator expects: listed again.
        let _ = target.refresh(dest).await;
        match target.newest(dest) {
            Some(n) if n.guid == plan.to.guid => {
                if plan.from_guid == 0 && !plan.overwrite && !self.marked && target.mark_later(dest)
                {
                    finish::flush(target).await;
                }
                tracing::info!(peer = %self.peer, %dest, snapshot = %plan.to.name, bytes, "received");
                Ok(bytes)
            }
            _ => Err(IngestError::WrongEnd {
                name: plan.to.name.clone(),
                guid: plan.to.guid,
            }),
        }
    }

    /// The snapshots a whole stream created, oldest first: the announced
    /// ones after the base up to `to` (by the sender's createtxg), when the
    /// validator saw as many substreams (each newer than the one before,
    /// none past `to`: then exactly these) and the last was `to`.
    fn created(&self) -> Option<Vec<Snapshot>> {
        let v = &self.validator;
        if !v.is_complete() || v.last_created() != self.plan.to.guid {
            return None;
        }
        let to = &self.plan.to;
        let snaps: Vec<Snapshot> = (self.announced.iter())
            .filter(|s| s.createtxg > self.from_createtxg && s.createtxg <= to.createtxg)
            .cloned()
            .collect();
        (snaps.len() as u64 == v.substreams()).then_some(snaps)
    }

    /// `zfs receive` failed: the destination is listed again (not the
    /// steady state). A destination modified since its newest snapshot is
    /// rolled back to it (never `-r`), and the stream is failed as
    /// temporary: the sender sends it again. A snapshot someone else made
    /// meanwhile is "changed meanwhile", nothing rolled back.
    async fn failed(&mut self, source: ZfsError) -> IngestError {
        let (target, dest, plan) = (self.target, self.dest, self.plan);
        let _ = target.refresh(dest).await;
        let newest = target.newest(dest);
        let foreign = newest
            .as_ref()
            .is_some_and(|n| !self.announced.iter().any(|s| s.guid == n.guid));
        if plan.from_guid != 0 && !plan.resume && foreign {
            tracing::warn!(peer = %self.peer, %dest, "zfs receive failed, a snapshot appeared meanwhile: {source}");
            return IngestError::BaseGone(dest.clone());
        }
        if matches!(source, ZfsError::Modified { .. }) && plan.from_guid != 0 {
            if let Some(n) = newest.filter(|n| n.guid == plan.from_guid) {
                return match rollback(target, dest, &n.name).await {
                    Ok(()) => {
                        let e = IngestError::Modified {
                            dest: dest.clone(),
                            snap: n.name,
                        };
                        tracing::warn!(peer = %self.peer, "{e}");
                        e
                    }
                    Err(e) => {
                        tracing::warn!(peer = %self.peer, %dest, "{e}");
                        e
                    }
                };
            }
        }
        let unsupported =
            matches!(source, ZfsError::UnsupportedStreamFeature { .. }).then(|| Unsupported {
                features: feature_names(self.features),
                zfs: target.zfs.caps().version,
            });
        let mut discarded = false;
        if plan.resume {
            // zfs itself refused the continuation: the state is of no
            // use; the next run plans the dataset afresh.
            match target.zfs.abort_resumable(dest).await {
                Ok(()) => discarded = true,
                Err(e2) => tracing::debug!(%dest, "zfs receive -A: {e2}"),
            }
            let _ = target.refresh(dest).await;
        }
        let e = IngestError::Receive {
            source,
            discarded,
            unsupported,
        };
        tracing::warn!(peer = %self.peer, %dest, "zfs receive failed: {e}");
        e
    }

    /// The connection ended mid-stream.
    async fn cut(&mut self, e: ProtocolError) -> IngestError {
        self.stop().await;
        tracing::warn!(peer = %self.peer, dest = %self.dest, "stream cut ({e}); its last snapshot was not committed");
        e.into()
    }
}

/// Reads past a stream refused before its data (an eager `Put`/`More`
/// whose data follows at once): its data frames up to `End` or `Abort`,
/// each dropped as it arrives.
pub(crate) async fn drain(frames: &mut impl Frames) -> Result<(), ProtocolError> {
    loop {
        match frames.next_frame().await? {
            None => return Err(ProtocolError::Closed),
            Some(Frame::Data(b)) if b.is_empty() => {
                return Err(ProtocolError::BadFrame("an empty data frame".into()))
            }
            Some(Frame::Data(_)) => {}
            Some(Frame::Msg(Message::End { .. } | Message::Abort { .. })) => return Ok(()),
            Some(Frame::Msg(other)) => {
                return Err(ProtocolError::Unexpected {
                    got: format!("message {}", other.name()),
                    expected: "stream data, end or abort".into(),
                })
            }
        }
    }
}

/// The base's createtxg on the sender (a snapshot or a bookmark; 0 for a
/// full stream): the stream's snapshots must be newer.
fn base_createtxg(open: &Open, plan: &Planned) -> u64 {
    (open.announced.iter().chain(&open.bookmarks))
        .find(|s| plan.from_guid != 0 && s.guid == plan.from_guid)
        .map_or(0, |s| s.createtxg)
}

/// Pipes one stream (announced, checked into `plan`) into `zfs receive`.
/// Every frame passes the stream validator on arrival; `zfs receive`
/// starts once the head passed, and frames go to it one behind, so the
/// last (with the END record) waits for `End`. Returns the bytes received.
pub(crate) async fn receive(
    target: &Target,
    frames: &mut impl Frames,
    peer: &str,
    peer_caps: &Caps,
    open: &Open,
    plan: &Planned,
) -> Result<u64, IngestError> {
    let local = target.zfs.caps();
    let path = SendPath::choose(peer_caps, &local);
    let expect = Expect {
        from_guid: plan.from_guid,
        from_createtxg: base_createtxg(open, plan),
        to: &plan.to,
        announced: &open.announced,
        allow: Allow {
            resumed: plan.resume,
            raw: path.raw,
            compressed: path.compressed,
        },
    };
    let mut feed = Feed::new(target, peer, peer_caps, open, plan, Validator::new(expect));
    loop {
        let frame = match frames.next_frame().await {
            Ok(Some(f)) => f,
            Ok(None) => return Err(feed.cut(ProtocolError::Closed).await),
            Err(e) => return Err(feed.cut(e).await),
        };
        match frame {
            Frame::Data(b) => {
                if let Err(e) = feed.data(b).await {
                    return Err(feed.cut(e).await);
                }
            }
            Frame::Msg(Message::End { bytes }) => return feed.end(bytes).await,
            Frame::Msg(Message::Abort { reason }) => {
                feed.stop().await;
                tracing::warn!(peer = %peer, dest = %open.dest, "sender aborted the stream: {reason}");
                return Err(IngestError::Aborted(reason));
            }
            Frame::Msg(other) => {
                feed.stop().await;
                return Err(ProtocolError::Unexpected {
                    got: format!("message {}", other.name()),
                    expected: "stream data, end or abort".into(),
                }
                .into());
            }
        }
    }
}

#[cfg(test)]
mod tests;
