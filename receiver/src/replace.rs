//! The `--full` swap: a whole new copy is received into
//! `BUF/<HEX>.full`, then swapped in for the old copy at `Finish`.
//!
//! States and invariants:
//! - before a replacement is received ([`prepare`]): a pool's root dataset
//!   is never replaced; a stale `.full` without children (a copy of the
//!   source) is destroyed, one with children (the old copy's) never is;
//! - the swap ([`replace`]), under the locks of every dataset below the old
//!   copy: a stale `.old` without children is destroyed, one with children
//!   never is; the old copy's children move under the new copy, the old
//!   copy moves aside to `.old`, the new copy moves into its place; each
//!   failure moves back what moved, in reverse, and says what could not;
//! - the old copy is destroyed only once the new one is in place and no
//!   child is left under it;
//! - an unfinished replacement is removed when its connection gives it up
//!   ([`abandon`]); the old copy is never touched then.

use std::time::Duration;

use thiserror::Error;
use zfsync_common::naming::{DatasetName, NameError, RelPath};
use zfsync_common::zfs::ZfsError;

use crate::buffer::{self, BufferError};
use crate::open::{Mode, Open};
use crate::state::{DatasetLock, Target};

/// How long [`lock_subtree`] waits for each busy dataset: 120 tries,
/// half a second apart.
const LOCK_TRIES: u32 = 120;
const LOCK_PAUSE: Duration = Duration::from_millis(500);

/// Why a replacement cannot be prepared or swapped in. Every text says
/// where each piece is.
#[derive(Debug, Error)]
pub(crate) enum ReplaceError {
    #[error("{0} is a pool's root dataset, which cannot be replaced; destroy its snapshots by hand or receive into a dataset below the pool")]
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
    if replaces.is_pool_root() {
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
        if !target.children(&temp).is_empty() {
            return Err(ReplaceError::StaleFullHoldsData {
                temp,
                replaces: replaces.clone(),
            });
        }
        remove_stale(target, &temp).await?;
    }
    Ok(temp)
}

async fn remove_stale(target: &Target, stale: &DatasetName) -> Result<(), ReplaceError> {
    target
        .destroy_tree(stale)
        .await
        .map_err(|source| ReplaceError::Stale {
            stale: stale.clone(),
            source,
        })?;
    target.destroyed(stale);
    Ok(())
}

/// Drops the dataset in progress, removing a half-built replacement. The
/// old copy is untouched; the dataset's lock is freed last.
pub(crate) async fn abandon(target: &Target, open: Open) {
    if let Mode::Replace { .. } = open.mode {
        if target.exists(&open.dest) {
            tracing::info!(dest = %open.dest, "removing an unfinished replacement");
            match target.destroy_tree(&open.dest).await {
                Ok(()) => target.destroyed(&open.dest),
                Err(e) => tracing::warn!("cannot remove {}: {e}", open.dest),
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
    let zfs = &target.zfs;
    let parked = target.old_temp_name(rel)?;
    target.relist().await?;
    if target.exists(&parked) {
        if !target.children(&parked).is_empty() {
            return Err(ReplaceError::StaleOldHoldsData(parked));
        }
        // The old copy of a finished replacement whose destroy failed.
        remove_stale(target, &parked).await?;
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
/// when it is bare.
async fn finish_swap(target: &Target, old: &DatasetName, parked: &DatasetName) {
    let zfs = &target.zfs;
    let leftover = zfs
        .list_trees(&[parked])
        .await
        .map(|t| {
            t.datasets
                .into_keys()
                .filter(|k| k.parent().as_ref() == Some(parked))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let mut kept = Vec::new();
    for child in leftover {
        let moved_ok = match old.child(child.leaf()) {
            Ok(to) => zfs.rename(&child, &to).await.is_ok(),
            Err(_) => false,
        };
        if !moved_ok {
            kept.push(child.to_string());
        }
    }
    if kept.is_empty() {
        if let Err(e) = target.destroy_tree(parked).await {
            tracing::warn!(
                "the new copy is in place, but the old one at {parked} could not be destroyed: {e}"
            );
        }
    } else {
        tracing::warn!(
            "the new copy is in place; the old copy stays at {parked} because it still holds {}",
            kept.join(", ")
        );
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
mod tests {
    use super::*;
    use crate::testing::{ds, target_with};

    #[test]
    fn failure_texts_say_where_each_piece_is() {
        let e = ReplaceError::MoveOldAside {
            old: ds("p/t/a"),
            source: ZfsError::DoesNotExist {
                name: "p/t/a".into(),
            },
            stranded: Stranded(vec!["p/t/a/x is now at p/t.zfsyncbuffer/2F61.full/x".into()]),
        };
        let text = e.to_string();
        assert!(
            text.starts_with("cannot move the old copy p/t/a aside: "),
            "{text}"
        );
        assert!(
            text.ends_with("; could not move back: p/t/a/x is now at p/t.zfsyncbuffer/2F61.full/x"),
            "{text}"
        );
        let e = ReplaceError::MoveChild {
            child: ds("p/t/a/x"),
            source: ZfsError::DoesNotExist {
                name: "p/t/a/x".into(),
            },
            stranded: Stranded::default(),
        };
        assert!(!e.to_string().contains("could not move back"), "{e}");
    }

    #[tokio::test]
    async fn prepare_refuses_a_pool_root_and_a_stale_full_with_children() {
        let t = target_with(&[]);
        let rel = RelPath::new("/a").unwrap();
        let root = prepare(&t, &rel, &ds("p")).await.unwrap_err();
        assert!(matches!(root, ReplaceError::PoolRoot(_)), "{root}");

        let t = target_with(&[
            "p/t",
            "p/t/a",
            "p/t.zfsyncbuffer",
            "p/t.zfsyncbuffer/2F61.full",
            "p/t.zfsyncbuffer/2F61.full/x",
        ]);
        let stale = prepare(&t, &rel, &ds("p/t/a")).await.unwrap_err();
        assert_eq!(
            stale.to_string(),
            "p/t.zfsyncbuffer/2F61.full is left from an interrupted replacement and holds datasets of the old copy; move them back under p/t/a by hand (zfs list -r p/t.zfsyncbuffer/2F61.full), then destroy p/t.zfsyncbuffer/2F61.full"
        );
        assert!(t.exists(&ds("p/t.zfsyncbuffer/2F61.full/x")));
    }

    #[tokio::test]
    async fn lock_subtree_locks_what_lies_below() {
        let t = target_with(&["p/t", "p/t/a", "p/t/a/x", "p/t/a/x/y", "p/t/b"]);
        let locks = lock_subtree(&t, &ds("p/t/a")).await.unwrap();
        assert_eq!(locks.len(), 2);
        let rel = |s| RelPath::new(s).unwrap();
        assert!(t.try_lock(&rel("/a/x")).is_none() && t.try_lock(&rel("/a/x/y")).is_none());
        assert!(t.try_lock(&rel("/a")).is_some() && t.try_lock(&rel("/b")).is_some());
        drop(locks);
        assert!(t.try_lock(&rel("/a/x")).is_some());
    }
}
