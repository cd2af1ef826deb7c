//! Answering a `Sync`: validating the request, the resume offer, the lock,
//! the planner's decision, and opening the dataset for its streams.
//!
//! Invariants:
//! - every name from the peer (path, snapshot and bookmark names) is
//!   validated, and a reserved path refused, before anything touches `zfs`;
//! - a real request locks its path before looking at it; a busy path is a
//!   temporary refusal; a dry run locks, creates and destroys nothing;
//! - a cut transfer's state is offered for resuming when both ends can, and
//!   discarded (`zfs receive -A`) only in a real run that cannot resume it;
//! - a dataset arriving before its parent goes to the buffer; a `--full`
//!   replacement is received beside the old copy (see [`crate::replace`]),
//!   except into a dataset without snapshots, which is overwritten (`-F`).

use thiserror::Error;
use zfsync_common::caps::{Cap, Caps};
use zfsync_common::naming::{is_reserved, DatasetName, NameError, RelPath};
use zfsync_common::plan::{negotiate_with_bookmarks, Decision, FullReason, TargetState};
use zfsync_common::protocol::{SyncReply, SyncRequest};
use zfsync_common::zfs::{Snapshot, ZfsError};

use crate::buffer::{self, BufferError};
use crate::open::{Mode, Open};
use crate::replace::{self, ReplaceError};
use crate::state::{DatasetLock, Location, Target};

/// Why a sync request is refused. Only [`SyncError::Busy`] is temporary.
#[derive(Debug, Error)]
pub(crate) enum SyncError {
    #[error("invalid dataset path: {0}")]
    InvalidPath(NameError),
    #[error("{rel} is reserved for the receiver's buffer ({buffer}); rename the source dataset")]
    Reserved { rel: RelPath, buffer: DatasetName },
    #[error("{rel} cannot be placed under the target: {source}")]
    Unplaceable { rel: RelPath, source: NameError },
    #[error("invalid snapshot name for {rel}: {source}")]
    InvalidSnapshot { rel: RelPath, source: NameError },
    #[error("invalid bookmark name for {rel}: {source}")]
    InvalidBookmark { rel: RelPath, source: NameError },
    #[error("{0} has no snapshots to send")]
    NoSnapshots(RelPath),
    #[error("{0} is busy: another connection is receiving into it; try again later")]
    Busy(RelPath),
    #[error("{rel}: {source}")]
    Name { rel: RelPath, source: NameError },
    #[error("{0} holds a cut transfer that this sender cannot resume; a real run discards it (zfs receive -A) and sends again")]
    CannotResume(DatasetName),
    #[error("{dest} holds a cut transfer that cannot be discarded: {source}; run `zfs receive -A {dest}` by hand")]
    Discard { dest: DatasetName, source: ZfsError },
    #[error("{rel} arrived before its parent and its buffer name is too long ({source}); run again once the parent exists")]
    BufferNameTooLong { rel: RelPath, source: NameError },
    #[error("the top dataset cannot be buffered")]
    TopBuffered,
    #[error(transparent)]
    Buffer(#[from] BufferError),
    /// Boxed: the swap's errors carry several names and `zfs` errors.
    #[error(transparent)]
    Replace(Box<ReplaceError>),
    /// A state the planner never produces.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl SyncError {
    /// Worth asking again later (another connection holds the dataset).
    pub(crate) fn is_temporary(&self) -> bool {
        matches!(self, SyncError::Busy(_))
    }
}

impl From<ReplaceError> for SyncError {
    fn from(e: ReplaceError) -> Self {
        SyncError::Replace(Box::new(e))
    }
}

/// An accepted sync request: the answer, and the dataset opened for the
/// streams that follow (none for a dry run or when nothing is to come).
pub(crate) struct Synced {
    /// Never `Refused`: refusals are [`SyncError`]s.
    pub(crate) reply: SyncReply,
    pub(crate) open: Option<Open>,
}

/// A sync request whose names were all checked.
#[derive(Debug)]
struct Valid {
    rel: RelPath,
    in_place: DatasetName,
    /// Oldest first (by the sender's createtxg).
    snapshots: Vec<Snapshot>,
    /// Oldest first.
    bookmarks: Vec<Snapshot>,
}

/// Checks every name in the request; nothing here touches `zfs`.
fn validate(target: &Target, peer: &str, req: &SyncRequest) -> Result<Valid, SyncError> {
    let rel = match RelPath::new(&req.path) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(peer = %peer, "refused dataset path: {e}");
            return Err(SyncError::InvalidPath(e));
        }
    };
    if is_reserved(&target.name, &rel) {
        return Err(SyncError::Reserved {
            rel,
            buffer: target.buffer.clone(),
        });
    }
    let in_place = match target.in_place_name(&rel) {
        Ok(n) => n,
        Err(source) => return Err(SyncError::Unplaceable { rel, source }),
    };
    let mut snapshots = Vec::with_capacity(req.snapshots.len());
    for s in &req.snapshots {
        match s.validate() {
            Ok(s) => snapshots.push(s),
            Err(source) => return Err(SyncError::InvalidSnapshot { rel, source }),
        }
    }
    snapshots.sort_by_key(|s| s.createtxg);
    let mut bookmarks = Vec::with_capacity(req.bookmarks.len());
    for b in &req.bookmarks {
        match b.validate() {
            Ok(b) => bookmarks.push(b),
            Err(source) => return Err(SyncError::InvalidBookmark { rel, source }),
        }
    }
    bookmarks.sort_by_key(|s| s.createtxg);
    if snapshots.is_empty() {
        return Err(SyncError::NoSnapshots(rel));
    }
    Ok(Valid {
        rel,
        in_place,
        snapshots,
        bookmarks,
    })
}

fn locate(target: &Target, rel: &RelPath) -> Result<Location, SyncError> {
    target.locate(rel).map_err(|source| SyncError::Name {
        rel: rel.clone(),
        source,
    })
}

/// The planner's decision as the answer to the sender.
fn answer(decision: &Decision, rel: &RelPath) -> Result<SyncReply, SyncError> {
    Ok(match decision.clone() {
        Decision::NoSnapshots => return Err(SyncError::NoSnapshots(rel.clone())),
        Decision::UpToDate { snapshot } => SyncReply::UpToDate { snapshot },
        Decision::Incremental { base_guid, count } => SyncReply::Incremental {
            base_guid,
            count: count as u64,
        },
        Decision::New { buffered } => SyncReply::New { buffered },
        Decision::Full { reason, accepted } => SyncReply::Full { reason, accepted },
    })
}

/// Answers a sync request. `discard_resume`: the sender could not use
/// the resume offer, so a partial state is thrown away (`receive -A`).
pub(crate) async fn sync(
    target: &Target,
    peer: &str,
    peer_caps: &Caps,
    req: &SyncRequest,
    discard_resume: bool,
) -> Result<Synced, SyncError> {
    let valid = validate(target, peer, req)?;
    let (rel, dry_run) = (&valid.rel, req.dry_run);
    // A dry run takes no lock: it must not make a real run see "busy".
    let lock = if dry_run {
        None
    } else {
        Some(
            target
                .try_lock(rel)
                .ok_or_else(|| SyncError::Busy(rel.clone()))?,
        )
    };
    let mut location = locate(target, rel)?;
    // A transfer cut last time left a resumable state.
    if let Location::InPlace(d) | Location::Buffered(d) = &location {
        if let Some(token) = d.resume_token.clone() {
            let can = peer_caps.has(Cap::SendResume) && target.zfs.caps().can_receive_resumable();
            if can && !discard_resume {
                let buffered = matches!(location, Location::Buffered(_));
                let open = lock.map(|lock| {
                    tracing::info!(peer = %peer, %rel, dest = %d.name, "offering to resume a cut transfer");
                    let mut open = opener(&valid, lock, d.name.clone(), buffered, Mode::Direct);
                    open.resume_offered = true;
                    open
                });
                return Ok(Synced {
                    reply: SyncReply::Resume { token },
                    open,
                });
            }
            if dry_run {
                return Err(SyncError::CannotResume(d.name.clone()));
            }
            let dest = d.name.clone();
            tracing::info!(peer = %peer, %dest, "discarding the partial state of a cut transfer (zfs receive -A)");
            if let Err(source) = target.zfs.abort_resumable(&dest).await {
                return Err(SyncError::Discard { dest, source });
            }
            let _ = target.refresh(&dest).await;
            location = locate(target, rel)?;
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
    let decision =
        negotiate_with_bookmarks(&valid.snapshots, &valid.bookmarks, &state, req.allow_full);
    tracing::debug!(peer = %peer, %rel, ?decision, dry_run, "negotiated");
    let reply = answer(&decision, rel)?;
    if dry_run {
        // The answer alone: nothing is created, locked or destroyed.
        return Ok(Synced { reply, open: None });
    }
    let Some(lock) = lock else {
        return Err(SyncError::Internal("no lock"));
    };
    let open = open_for(target, peer, &valid, lock, decision, current, buffered).await?;
    Ok(Synced { reply, open })
}

/// What a real run opens for the planner's decision: the destination
/// (in place, in the buffer, or a replacement beside the old copy) and
/// how its streams are received. `current` is where the dataset is now,
/// `buffered` whether that is in the buffer.
async fn open_for(
    target: &Target,
    peer: &str,
    valid: &Valid,
    lock: DatasetLock,
    decision: Decision,
    current: Option<DatasetName>,
    buffered: bool,
) -> Result<Option<Open>, SyncError> {
    let rel = &valid.rel;
    let open = |dest, buffered, mode| Some(opener(valid, lock, dest, buffered, mode));
    let open = match decision {
        Decision::NoSnapshots | Decision::UpToDate { .. } => None,
        Decision::Full {
            accepted: false, ..
        } => None,
        Decision::Incremental { .. } => {
            let Some(dest) = current else {
                return Err(SyncError::Internal("incremental without a dataset"));
            };
            open(dest, buffered, Mode::Direct)
        }
        Decision::New { buffered } => {
            let dest = if buffered {
                let name = match target.buffer_name(rel) {
                    Some(Ok(n)) => n,
                    Some(Err(source)) => {
                        return Err(SyncError::BufferNameTooLong {
                            rel: rel.clone(),
                            source,
                        })
                    }
                    None => return Err(SyncError::TopBuffered),
                };
                buffer::ensure(target).await?;
                name
            } else {
                valid.in_place.clone()
            };
            open(dest, buffered, Mode::Direct)
        }
        Decision::Full {
            reason,
            accepted: true,
        } => {
            let Some(replaces) = current else {
                return Err(SyncError::Internal("full without a dataset"));
            };
            if reason == FullReason::TargetHasNoSnapshots {
                tracing::info!(peer = %peer, %rel, "--full into {replaces}, which has no snapshots");
                open(replaces, buffered, Mode::Overwrite)
            } else {
                let temp = replace::prepare(target, rel, &replaces).await?;
                tracing::info!(peer = %peer, %rel, "full replacement requested: {reason}");
                open(temp, buffered, Mode::Replace { replaces })
            }
        }
    };
    Ok(open)
}

fn opener(valid: &Valid, lock: DatasetLock, dest: DatasetName, buffered: bool, mode: Mode) -> Open {
    Open {
        rel: valid.rel.clone(),
        _lock: lock,
        dest,
        buffered,
        mode,
        announced: valid.snapshots.clone(),
        bookmarks: valid.bookmarks.clone(),
        resume_offered: false,
    }
}

#[cfg(test)]
mod tests;
