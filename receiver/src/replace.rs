//! The `--full` swap: a whole new copy is received into
//! `BUF/<HEX>.full`, then swapped in for the old copy at `Finish`.
//!
//! States and invariants:
//! - before a replacement is received ([`prepare`]): a pool's root dataset
//!   with snapshots is never replaced; a stale `.full` without children (a
//!   copy of the source) is destroyed, one with children (the old copy's)
//!   never is;
//! - the swap ([`replace`]), under the locks of every dataset below the old
//!   copy: a stale `.old` without children is destroyed, one with children
//!   never is; the old copy's children move under the new copy, the old
//!   copy moves aside to `.old`, the new copy moves into its place; each
//!   failure moves back what moved, in reverse, and says what could not;
//! - the old copy is destroyed only once the new one is in place and a
//!   listing made just before shows no child left under it; when that
//!   listing fails, the old copy is kept and the log says where;
//! - a pool's root cannot be renamed: a snapshot-less root is filled from
//!   the whole new copy by a local `zfs send | zfs receive -F` (and `-I`)
//!   ([`commit_into_root`]); the new copy is destroyed only once the root
//!   has its newest snapshot;
//! - nothing is destroyed with `-r` unless a listing made just before
//!   shows what is below it ([`remove_if_bare`]);
//! - an unfinished replacement is removed when its connection gives it up
//!   ([`abandon`]); the old copy is never touched then.

use std::time::Duration;

use thiserror::Error;
use zfsync_common::caps::SendPath;
use zfsync_common::naming::{DatasetName, NameError, RelPath, SnapName};
use zfsync_common::zfs::{RecvSpec, SendFrom, SendWhat, ZfsError};

use crate::buffer::{self, BufferError};
use crate::open::{Mode, Open};
use crate::state::{DatasetLock, Target};

mod root;

use root::commit_into_root;

/// How long [`lock_subtree`] waits for each busy dataset: 120 tries,
/// half a second apart.
const LOCK_TRIES: u32 = 120;
const LOCK_PAUSE: Duration = Duration::from_millis(500);

/// Why a replacement cannot be prepared or swapped in. Every text says
/// where each piece is.
#[derive(Debug, Error)]
pub(crate) enum ReplaceError {
    #[error("{0} is a pool's root dataset with snapshots, which cannot be replaced; destroy its snapshots by hand or receive into a dataset below the pool")]
    PoolRoot(DatasetName),
    #[error("{rel}: {source}")]
    TempName { rel: RelPath, source: NameError },
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error("{temp} is left from an interrupted replacement and holds datasets of the old copy; move them back under {replaces} by hand (zfs list -r {temp}), then destroy {temp}")]
    StaleFullHoldsData {
        temp: DatasetName,
        replaces: DatasetName,
    },
    /// A stale `.full` or `.old` could not be destroyed.
    #[error("cannot remove the stale {stale}: {source}")]
    Stale {
        stale: DatasetName,
        source: ZfsError,
    },
    /// A stale `.full` or `.old` could not be listed: nothing is destroyed
    /// unseen.
    #[error("cannot list the stale {stale} to see what it holds: {source}; look with zfs list -r {stale}")]
    StaleList {
        stale: DatasetName,
        source: ZfsError,
    },
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    List(#[from] ZfsError),
    #[error("{0} is left from an interrupted replacement and holds datasets; move them back by hand (zfs list -r {0}), then destroy it")]
    StaleOldHoldsData(DatasetName),
    #[error("{0} is busy with another transfer; the replacement waits for the next run")]
    Busy(RelPath),
    #[error("{source}{stranded}")]
    ChildName {
        source: NameError,
        stranded: Stranded,
    },
    #[error("cannot move {child} under the new copy: {source}{stranded}")]
    MoveChild {
        child: DatasetName,
        source: ZfsError,
        stranded: Stranded,
    },
    #[error("cannot move the old copy {old} aside: {source}{stranded}")]
    MoveOldAside {
        old: DatasetName,
        source: ZfsError,
        stranded: Stranded,
    },
    #[error("cannot move the new copy into place at {old}: {source}{}{stranded}", parked_note(.parked))]
    MoveNewIn {
        old: DatasetName,
        source: ZfsError,
        /// Where the old copy stayed, when it could not be moved back.
        parked: Option<(DatasetName, ZfsError)>,
        stranded: Stranded,
    },
    #[error(
        "the new copy {0} has vanished or has no snapshots; the next --full run sends it again"
    )]
    NewCopyGone(DatasetName),
    /// Filling a pool's root from the whole new copy failed.
    #[error("cannot fill the pool's root {root} from the new copy: {source}; {}; the whole new copy stays at {new}{}", commit_state(.root, .committed), commit_next(.committed))]
    Commit {
        root: DatasetName,
        new: DatasetName,
        /// The root's newest snapshot, if the full stream went in.
        committed: Option<SnapName>,
        source: ZfsError,
    },
}

fn commit_state(root: &DatasetName, committed: &Option<SnapName>) -> String {
    match committed {
        None => format!("{root} is unchanged"),
        Some(s) => format!("{root} has the new copy up to @{s} only"),
    }
}

fn commit_next(committed: &Option<SnapName>) -> &'static str {
    match committed {
        None => " (the next --full run sends it again)",
        Some(_) => " (the next run completes the root from the sender, then removes it)",
    }
}

fn parked_note(parked: &Option<(DatasetName, ZfsError)>) -> String {
    match parked {
        None => String::new(),
        Some((at, e)) => format!("; the old copy is at {at} (cannot move it back: {e})"),
    }
}

/// Children of the old copy that could not be moved back after a failed
/// swap, as "FROM is now at TO"; empty when all went back.
#[derive(Debug, Default)]
pub(crate) struct Stranded(Vec<String>);

impl std::fmt::Display for Stranded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return Ok(());
        }
        write!(f, "; could not move back: {}", self.0.join(", "))
    }
}

/// Gets ready to receive a replacement of `replaces` (the dataset at
/// `rel`): returns the temporary dataset to receive into, which does not
/// exist.
pub(crate) async fn prepare(
    target: &Target,
    rel: &RelPath,
    replaces: &DatasetName,
) -> Result<DatasetName, ReplaceError> {
    // A pool's root cannot be renamed: one without snapshots is filled
    // from the whole new copy (see [`commit_into_root`]); one with
    // snapshots cannot be, as a full stream cannot go over them.
    let root_has_snapshots = || {
        target
            .get(replaces)
            .is_some_and(|d| !d.snapshots.is_empty())
    };
    if replaces.is_pool_root() && root_has_snapshots() {
        return Err(ReplaceError::PoolRoot(replaces.clone()));
    }
    let temp = target
        .full_temp_name(rel)
        .map_err(|source| ReplaceError::TempName {
            rel: rel.clone(),
            source,
        })?;
    buffer::ensure(target).await?;
    if target.exists(&temp) {
        // Left by an interrupted earlier attempt. Without child
        // datasets it is only a copy of the source; with them it
        // holds the old copy's children: never destroy that.
        let holds = || ReplaceError::StaleFullHoldsData {
            temp: temp.clone(),
            replaces: replaces.clone(),
        };
        if !target.children(&temp).is_empty() {
            return Err(holds());
        }
        match remove_if_bare(target, &temp).await {
            Removal::Removed | Removal::Gone => {}
            Removal::Holds(_) => return Err(holds()),
            Removal::ListFailed(source) => {
                return Err(ReplaceError::StaleList {
                    stale: temp,
                    source,
                })
            }
            Removal::DestroyFailed(source) => {
                return Err(ReplaceError::Stale {
                    stale: temp,
                    source,
                })
            }
        }
    }
    Ok(temp)
}

/// What [`remove_if_bare`] did.
#[derive(Debug)]
pub(crate) enum Removal {
    Removed,
    /// It did not exist (any more).
    Gone,
    /// Kept: these datasets lie below it.
    Holds(Vec<String>),
    /// Kept: it could not be listed.
    ListFailed(ZfsError),
    DestroyFailed(ZfsError),
}

/// The datasets below `ds` in a listing made now (names zfsync cannot
/// parse count too); `None` when `ds` does not exist.
async fn fresh_descendants(
    target: &Target,
    ds: &DatasetName,
) -> Result<Option<Vec<String>>, ZfsError> {
    let tree = target.zfs.list_trees(&[ds]).await?;
    if !tree.datasets.contains_key(ds) {
        return Ok(None);
    }
    let below = tree
        .datasets
        .keys()
        .filter(|k| *k != ds)
        .map(|k| k.to_string())
        .chain(
            tree.skipped
                .into_iter()
                .map(|(name, _)| name)
                .filter(|n| !n.contains(['@', '#'])),
        )
        .collect();
    Ok(Some(below))
}

/// Destroys a temporary dataset zfsync made (`.full`, `.old`) with `-r`,
/// but only when a listing made just before shows no dataset below it:
/// `-r` never takes anything unseen.
pub(crate) async fn remove_if_bare(target: &Target, ds: &DatasetName) -> Removal {
    match fresh_descendants(target, ds).await {
        Err(e) => Removal::ListFailed(e),
        Ok(None) => {
            target.destroyed(ds);
            Removal::Gone
        }
        Ok(Some(below)) if !below.is_empty() => Removal::Holds(below),
        Ok(Some(_)) => match target.destroy_tree(ds).await {
            Ok(()) => {
                target.destroyed(ds);
                Removal::Removed
            }
            Err(e) => Removal::DestroyFailed(e),
        },
    }
}

/// Drops the dataset in progress, removing a half-built replacement. The
/// old copy is untouched; the dataset's lock is freed last.
pub(crate) async fn abandon(target: &Target, open: Open) {
    if let Mode::Replace { .. } = open.mode {
        if target.exists(&open.dest) {
            tracing::info!(dest = %open.dest, "removing an unfinished replacement");
            match remove_if_bare(target, &open.dest).await {
                Removal::Removed | Removal::Gone => {}
                Removal::Holds(below) => tracing::warn!(
                    "keeping the unfinished replacement {}: it holds {}",
                    open.dest,
                    below.join(", ")
                ),
                Removal::ListFailed(e) => tracing::warn!(
                    "keeping the unfinished replacement {}: cannot list it: {e}",
                    open.dest
                ),
                Removal::DestroyFailed(e) => tracing::warn!("cannot remove {}: {e}", open.dest),
            }
        }
    }
}

/// Moves every `(from, to)` back, newest first; what cannot move back is
/// reported.
async fn undo(target: &Target, moved: Vec<(DatasetName, DatasetName)>) -> Stranded {
    let mut stranded = Vec::new();
    for (from, to) in moved.into_iter().rev() {
        if let Err(e) = target.zfs.rename(&to, &from).await {
            tracing::error!("cannot move {to} back to {from}: {e}");
            stranded.push(format!("{from} is now at {to}"));
        }
    }
    let _ = target.relist().await;
    Stranded(stranded)
}

/// Swaps a whole new copy (`new`) in for `old`, keeping `old`'s child
/// datasets: they move under the new copy first. The old copy is
/// destroyed only after the new one is in its place, and only once no
/// child dataset is left under it. Every failure undoes what it can and
/// says where each piece is.
pub(crate) async fn replace(
    target: &Target,
    peer: &str,
    new: &DatasetName,
    old: &DatasetName,
    rel: &RelPath,
) -> Result<(), ReplaceError> {
    if old.is_pool_root() {
        return commit_into_root(target, peer, new, old).await;
    }
    let zfs = &target.zfs;
    let parked = target.old_temp_name(rel)?;
    target.relist().await?;
    if target.exists(&parked) {
        if !target.children(&parked).is_empty() {
            return Err(ReplaceError::StaleOldHoldsData(parked));
        }
        // The old copy of a finished replacement whose destroy failed.
        match remove_if_bare(target, &parked).await {
            Removal::Removed | Removal::Gone => {}
            Removal::Holds(_) => return Err(ReplaceError::StaleOldHoldsData(parked)),
            Removal::ListFailed(source) => {
                return Err(ReplaceError::StaleList {
                    stale: parked,
                    source,
                })
            }
            Removal::DestroyFailed(source) => {
                return Err(ReplaceError::Stale {
                    stale: parked,
                    source,
                })
            }
        }
    }
    // Nothing else may work below `old` while it moves.
    let _locks = lock_subtree(target, old).await?;
    let mut moved: Vec<(DatasetName, DatasetName)> = Vec::new();
    for child in target.children(old) {
        let to = match new.child(child.leaf()) {
            Ok(t) => t,
            Err(source) => {
                let stranded = undo(target, moved).await;
                return Err(ReplaceError::ChildName { source, stranded });
            }
        };
        if let Err(source) = zfs.rename(&child, &to).await {
            let stranded = undo(target, moved).await;
            return Err(ReplaceError::MoveChild {
                child,
                source,
                stranded,
            });
        }
        moved.push((child, to));
    }
    if let Err(source) = zfs.rename(old, &parked).await {
        let stranded = undo(target, moved).await;
        return Err(ReplaceError::MoveOldAside {
            old: old.clone(),
            source,
            stranded,
        });
    }
    if let Err(source) = zfs.rename(new, old).await {
        let parked = match zfs.rename(&parked, old).await {
            Ok(()) => None,
            Err(e2) => Some((parked, e2)),
        };
        let stranded = undo(target, moved).await;
        return Err(ReplaceError::MoveNewIn {
            old: old.clone(),
            source,
            parked,
            stranded,
        });
    }
    finish_swap(target, old, &parked).await;
    tracing::info!(peer = %peer, dataset = %old, "replaced by a full copy");
    Ok(target.relist().await?)
}

/// The new copy is in place. A child created below the old copy meanwhile
/// went along with it: bring it over too, and destroy the old copy only
/// when a listing made just before shows it bare. When the old copy
/// cannot be listed it is kept, never destroyed unseen.
async fn finish_swap(target: &Target, old: &DatasetName, parked: &DatasetName) {
    let zfs = &target.zfs;
    let below = match fresh_descendants(target, parked).await {
        Ok(Some(below)) => below,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(
                "the new copy is in place; the old copy stays at {parked}: cannot list it to see whether a child dataset is left under it ({e}); look with zfs list -r {parked}, move any child under {old}, then destroy {parked}"
            );
            return;
        }
    };
    if below.is_empty() {
        // Listed just now: nothing below it.
        if let Err(e) = target.destroy_tree(parked).await {
            tracing::warn!(
                "the new copy is in place, but the old one at {parked} could not be destroyed: {e}"
            );
        }
        return;
    }
    // Only direct children move; what lies below them moves with them.
    let prefix = format!("{parked}/");
    let children = below
        .iter()
        .filter(|n| n.strip_prefix(&prefix).is_some_and(|l| !l.contains('/')));
    let mut kept = Vec::new();
    for child in children {
        let moved = match (DatasetName::new(child), old.child(&child[prefix.len()..])) {
            (Ok(from), Ok(to)) => zfs.rename(&from, &to).await.is_ok(),
            _ => false,
        };
        if !moved {
            kept.push(child.clone());
        }
    }
    if !kept.is_empty() {
        tracing::warn!(
            "the new copy is in place; the old copy stays at {parked} because it still holds {}",
            kept.join(", ")
        );
        return;
    }
    match remove_if_bare(target, parked).await {
        Removal::Removed | Removal::Gone => {}
        Removal::Holds(below) => tracing::warn!(
            "the new copy is in place; the old copy stays at {parked} because it still holds {}",
            below.join(", ")
        ),
        Removal::ListFailed(e) => tracing::warn!(
            "the new copy is in place; the old copy stays at {parked}: cannot list it again ({e}); look with zfs list -r {parked}"
        ),
        Removal::DestroyFailed(e) => tracing::warn!(
            "the new copy is in place, but the old one at {parked} could not be destroyed: {e}"
        ),
    }
}

/// Locks every dataset below `ds` that lies in place under the target,
/// waiting up to a minute for transfers into them to end.
async fn lock_subtree(target: &Target, ds: &DatasetName) -> Result<Vec<DatasetLock>, ReplaceError> {
    let rels: Vec<RelPath> = target
        .descendants(ds)
        .iter()
        .filter_map(|d| d.relative_to(&target.name))
        .collect();
    let mut locks = Vec::new();
    for rel in rels {
        let mut tries = 0;
        loop {
            if let Some(l) = target.try_lock(&rel) {
                locks.push(l);
                break;
            }
            tries += 1;
            if tries > LOCK_TRIES {
                return Err(ReplaceError::Busy(rel));
            }
            tokio::time::sleep(LOCK_PAUSE).await;
        }
    }
    Ok(locks)
}

#[cfg(test)]
mod tests;
