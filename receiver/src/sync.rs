//! Answering a `Sync`: validating the request, the resume offer, the lock,
//! the planner's decision, and opening the dataset for its streams.
//!
//! Invariants:
//! - every name from the peer (path, snapshot and bookmark names) is
//!   validated, and a reserved path refused, before anything touches `zfs`;
//! - the request's lists are validated into the typed lists once, and only
//!   those are kept (moved into the [`Open`]), counted in bytes against the
//!   connection's limit and charged to the receiver's memory budget; a
//!   request over the budget is a temporary refusal;
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
use crate::state::{DatasetLock, Location, Reservation, Target};

/// Most snapshots one sync request may list (and, apart, most bookmarks).
pub(crate) const MAX_SNAPSHOTS: usize = 100_000;
/// Most bytes of snapshot and bookmark lists one connection may keep.
/// Within [`MAX_SNAPSHOTS`] and the frame limit a request needs at most
/// about 28 MiB: a backstop.
pub(crate) const MAX_KEPT_BYTES: usize = 32 << 20;

/// Why a sync request is refused. Only [`SyncError::Busy`] and
/// [`SyncError::NoMemory`] are temporary.
#[derive(Debug, Error)]
pub(crate) enum SyncError {
    #[error("invalid dataset path: {0}")]
    InvalidPath(NameError),
    #[error("{rel} has {count} {what}; the receiver takes at most {max} per dataset in one request (prune the source's snapshots, for example with --keep)")]
    TooMany {
        rel: RelPath,
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("{rel}: the snapshot lists take {bytes} bytes; the receiver keeps at most {max} bytes per connection")]
    TooLarge {
        rel: RelPath,
        bytes: usize,
        max: usize,
    },
    #[error("{rel}: the receiver's memory budget is in use by other requests ({used} of {total} bytes, {bytes} more needed); try again later")]
    NoMemory {
        rel: RelPath,
        bytes: usize,
        used: usize,
        total: usize,
    },
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
    /// Temporary: the sender tries again later, by when the parent may be
    /// in place and the dataset is received there, needing no buffer.
    #[error("{rel} arrived before its parent and its buffer name is too long ({source}); it waits for its parent (run again once the parent exists)")]
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
    /// Worth asking again later (another connection holds the dataset,
    /// or other requests hold the memory budget).
    pub(crate) fn is_temporary(&self) -> bool {
        matches!(
            self,
            SyncError::Busy(_) | SyncError::NoMemory { .. } | SyncError::BufferNameTooLong { .. }
        )
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

/// A sync request whose names were all checked: the only copy of its
/// lists the receiver keeps.
#[derive(Debug)]
pub(crate) struct Valid {
    pub(crate) rel: RelPath,
    in_place: DatasetName,
    /// Oldest first (by the sender's createtxg).
    pub(crate) snapshots: Vec<Snapshot>,
    /// Oldest first.
    pub(crate) bookmarks: Vec<Snapshot>,
    /// The sender runs with --full.
    pub(crate) allow_full: bool,
    /// Only say what would be done.
    pub(crate) dry_run: bool,
}

/// Heap bytes of a snapshot list: the list and each name (with the
/// allocator's overhead of a small allocation).
pub(crate) fn list_bytes(list: &[Snapshot]) -> usize {
    std::mem::size_of_val(list)
        + list
            .iter()
            .map(|s| s.name.as_str().len() + 16)
            .sum::<usize>()
}

impl Valid {
    /// What keeping this request's lists costs, in bytes.
    pub(crate) fn bytes(&self) -> usize {
        list_bytes(&self.snapshots) + list_bytes(&self.bookmarks)
    }

    /// The request again from what an open dataset kept (after a resume
    /// offer the sender could not use): its lists are moved, not copied.
    pub(crate) fn reopen(
        target: &Target,
        open: &mut Open,
        allow_full: bool,
    ) -> Result<Valid, SyncError> {
        let rel = open.rel.clone();
        let in_place = match target.in_place_name(&rel) {
            Ok(n) => n,
            Err(source) => return Err(SyncError::Unplaceable { rel, source }),
        };
        Ok(Valid {
            rel,
            in_place,
            snapshots: std::mem::take(&mut open.announced),
            bookmarks: std::mem::take(&mut open.bookmarks),
            allow_full,
            dry_run: false,
        })
    }
}

/// Converts a peer's list into validated snapshots, oldest first; each
/// name is checked and the peer's copy dropped as it goes.
fn validate_list(list: Vec<zfsync_common::protocol::WireSnap>) -> Result<Vec<Snapshot>, NameError> {
    let mut out = Vec::with_capacity(list.len());
    for s in list {
        out.push(s.validate()?);
    }
    out.sort_by_key(|s| s.createtxg);
    Ok(out)
}

/// Checks the request's size and every name in it, and turns it into the
/// typed lists; nothing here touches `zfs`.
pub(crate) fn validate(target: &Target, peer: &str, req: SyncRequest) -> Result<Valid, SyncError> {
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
    for (what, count) in [
        ("snapshots", req.snapshots.len()),
        ("bookmarks", req.bookmarks.len()),
    ] {
        if count > MAX_SNAPSHOTS {
            tracing::warn!(peer = %peer, %rel, count, "refused: too many {what}");
            return Err(SyncError::TooMany {
                rel,
                what,
                count,
                max: MAX_SNAPSHOTS,
            });
        }
    }
    let SyncRequest {
        snapshots,
        bookmarks,
        allow_full,
        dry_run,
        ..
    } = req;
    let snapshots = match validate_list(snapshots) {
        Ok(s) => s,
        Err(source) => return Err(SyncError::InvalidSnapshot { rel, source }),
    };
    let bookmarks = match validate_list(bookmarks) {
        Ok(b) => b,
        Err(source) => return Err(SyncError::InvalidBookmark { rel, source }),
    };
    if snapshots.is_empty() {
        return Err(SyncError::NoSnapshots(rel));
    }
    let valid = Valid {
        rel,
        in_place,
        snapshots,
        bookmarks,
        allow_full,
        dry_run,
    };
    let bytes = valid.bytes();
    if bytes > MAX_KEPT_BYTES {
        return Err(SyncError::TooLarge {
            rel: valid.rel,
            bytes,
            max: MAX_KEPT_BYTES,
        });
    }
    Ok(valid)
}

/// Charges the request's lists to the memory budget: `admitted` (what
/// reading its frame was granted, if it was large) shrinks to them, or a
/// new reservation is taken. Refused (temporary) when the budget is full.
pub(crate) fn charge(
    target: &Target,
    valid: &Valid,
    admitted: Option<Reservation>,
) -> Result<Reservation, SyncError> {
    let bytes = valid.bytes();
    let charged = match admitted {
        Some(mut r) => r.try_resize(bytes).then_some(r),
        None => target.budget.try_reserve(bytes),
    };
    charged.ok_or_else(|| SyncError::NoMemory {
        rel: valid.rel.clone(),
        bytes,
        used: target.budget.used(),
        total: target.budget.total(),
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

/// Answers a validated sync request; an opened dataset takes its lists.
/// `discard_resume`: the sender could not use the resume offer, so a
/// partial state is thrown away (`receive -A`).
pub(crate) async fn sync(
    target: &Target,
    peer: &str,
    peer_caps: &Caps,
    valid: Valid,
    discard_resume: bool,
) -> Result<Synced, SyncError> {
    let rel = &valid.rel.clone();
    let dry_run = valid.dry_run;
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
                let dest = d.name.clone();
                let open = lock.map(|lock| {
                    tracing::info!(peer = %peer, %rel, %dest, "offering to resume a cut transfer");
                    let mut open = opener(valid, lock, dest, buffered, Mode::Direct);
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
        negotiate_with_bookmarks(&valid.snapshots, &valid.bookmarks, &state, valid.allow_full);
    tracing::debug!(peer = %peer, %rel, ?decision, dry_run, "negotiated");
    let reply = answer(&decision, rel)?;
    if dry_run {
        // The answer alone: nothing is created, locked or destroyed.
        return Ok(Synced { reply, open: None });
    }
    let Some(lock) = lock else {
        return Err(SyncError::Internal("no lock"));
    };
    let open = open_for(target, peer, valid, lock, decision, current, buffered).await?;
    Ok(Synced { reply, open })
}

/// What a real run opens for the planner's decision: the destination
/// (in place, in the buffer, or a replacement beside the old copy) and
/// how its streams are received. `current` is where the dataset is now,
/// `buffered` whether that is in the buffer.
async fn open_for(
    target: &Target,
    peer: &str,
    valid: Valid,
    lock: DatasetLock,
    decision: Decision,
    current: Option<DatasetName>,
    buffered: bool,
) -> Result<Option<Open>, SyncError> {
    let rel = &valid.rel.clone();
    let in_place = valid.in_place.clone();
    // One full stream is the whole copy (see the --full arm below).
    let single_stream = valid.snapshots.len() == 1;
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
                in_place
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
            // A dataset without snapshots is replaced like any other:
            // received whole beside it, then swapped in, so its old data
            // stays until the whole new copy is there (a pool's root,
            // which cannot be renamed, is filled from that whole copy:
            // replace::commit_into_root). Only a pool's root that takes a
            // single full stream, which zfs swaps in once complete, is
            // received over directly (-F).
            if reason == FullReason::TargetHasNoSnapshots
                && replaces.is_pool_root()
                && single_stream
            {
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

/// The open dataset takes the request's lists (no copy).
fn opener(valid: Valid, lock: DatasetLock, dest: DatasetName, buffered: bool, mode: Mode) -> Open {
    Open {
        rel: valid.rel,
        _lock: lock,
        dest,
        buffered,
        mode,
        announced: valid.snapshots,
        bookmarks: valid.bookmarks,
        resume_offered: false,
    }
}

#[cfg(test)]
mod tests;
