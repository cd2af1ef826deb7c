//! Finishing a dataset: the hold on the newest snapshot, the marks of a new
//! replica, mirrored retention, and (for `--full`) the swap.
//!
//! Invariants:
//! - a dataset is finished only when its newest snapshot is the sender's
//!   newest; otherwise a half-built replacement is removed and the old
//!   copy stays;
//! - the hold moves to the newest snapshot before mirrored retention runs
//!   (which may destroy the previously held one); holds only where `zfs
//!   holds` exists, so the receiver can always find its own again;
//! - retention destroys only tool snapshots the sender dropped, one at a
//!   time, never with `-r`, and only when the receiver mirrors it;
//! - every dataset zfsync receives into, except a pool's root or another
//!   dataset it overwrote with `-F` (which it did not create), carries
//!   `canmount=noauto` and the replica mark (`zfsync:replica` = the
//!   dataset's own GUID): set after its first full receive, and re-checked
//!   at every Finish from the cached listing (a crash in between leaves
//!   them unset), with no `zfs` call when the mark is right;
//! - a bare `.full` of the dataset left by an earlier attempt is removed
//!   at a Finish that does not use it.

use thiserror::Error;
use zfsync_common::caps::Cap;
use zfsync_common::naming::{format_replica_mark, DatasetName, RelPath};
use zfsync_common::plan::mirror;
use zfsync_common::protocol::Finished;
use zfsync_common::zfs::Snapshot;

use crate::open::{Mode, Open};
use crate::replace::{self, Removal, ReplaceError};
use crate::state::{is_replica, Target, RECV_HOLD, REPLICA_PROP};

/// Why a dataset was not finished.
#[derive(Debug, Error)]
pub(crate) enum FinishError {
    #[error("{0} did not receive every snapshot up to the sender's newest; not finishing it")]
    Incomplete(RelPath),
    #[error(transparent)]
    Replace(#[from] ReplaceError),
}

/// Finishes the open dataset; its lock is freed when this returns.
pub(crate) async fn finish(
    target: &Target,
    peer: &str,
    open: Open,
) -> Result<Finished, FinishError> {
    let newest = target.newest(&open.dest).map(|n| n.guid);
    if newest != open.announced.last().map(|s| s.guid) {
        let rel = open.rel.clone();
        // A half-built replacement is removed; the old copy stays.
        replace::abandon(target, open).await;
        return Err(FinishError::Incomplete(rel));
    }
    if !matches!(open.mode, Mode::Overwrite) {
        // A crash right after the first receive left them unset. (An
        // overwritten dataset is one zfsync did not create.)
        ensure_marks(target, &open.dest).await;
    }
    match &open.mode {
        Mode::Direct | Mode::Overwrite => {
            if let Some(newest) = open.announced.last() {
                // Before the mirrored retention, which may destroy the
                // previously held snapshot.
                move_hold(target, &open.dest, newest).await;
            }
            remove_stale_full(target, &open.rel).await;
            Ok(Finished {
                location: open.dest.to_string(),
                buffered: open.buffered,
                pruned: mirror_retention(target, peer, &open.dest, &open.announced).await,
            })
        }
        Mode::Replace { replaces } => {
            replace::replace(target, peer, &open.dest, replaces, &open.rel).await?;
            if let Some(newest) = open.announced.last() {
                // Held once the new copy is in place (not on the
                // temporary copy, which a pool root's fill destroys).
                move_hold(target, replaces, newest).await;
            }
            Ok(Finished {
                location: replaces.to_string(),
                buffered: open.buffered,
                pruned: Vec::new(),
            })
        }
    }
}

/// `canmount=noauto` and the replica mark, where a crash (or a failed
/// `zfs set`) after the first receive left them unset: from the cache, so
/// with no `zfs` call when the mark is right. A pool's root is never
/// marked (zfsync fills it, but did not create it).
async fn ensure_marks(target: &Target, ds: &DatasetName) {
    if ds.is_pool_root() {
        return;
    }
    let Some(d) = target.get(ds) else {
        return;
    };
    if is_replica(&d) {
        return;
    }
    tracing::info!(%ds, "setting canmount=noauto and the replica mark, which are not set");
    never_automount(target, ds).await;
}

/// A bare `HEX.full` of this dataset left by an earlier replacement (a
/// receiver that died mid-transfer, a failed fill of a pool's root) is of
/// no use once the dataset is finished without it: removed, after a
/// listing made just before; with datasets below it, it stays (RE2). Under
/// the dataset's lock, which every use of its `.full` takes; from the
/// cache, so with no `zfs` call when there is none.
async fn remove_stale_full(target: &Target, rel: &RelPath) {
    let Ok(full) = target.full_temp_name(rel) else {
        return;
    };
    if !target.exists(&full) {
        return;
    }
    match replace::remove_if_bare(target, &full).await {
        Removal::Removed => tracing::info!(%full, "removed a stale replacement"),
        Removal::Gone => {}
        Removal::Holds(below) => tracing::warn!(
            "{full} is left from an interrupted replacement and holds {}; move them back by hand (zfs list -r {full}), then destroy it",
            below.join(", ")
        ),
        Removal::ListFailed(e) | Removal::DestroyFailed(e) => {
            tracing::warn!("cannot remove the stale {full}: {e}")
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
async fn move_hold(target: &Target, dest: &DatasetName, newest: &Snapshot) {
    let zfs = &target.zfs;
    if !(zfs.caps().has(Cap::Holds) && zfs.caps().has(Cap::HoldsList)) {
        return;
    }
    let Ok(new) = dest.snapshot(&newest.name) else {
        return;
    };
    let Some(d) = target.get(dest) else {
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
/// under a replica inherits the mark, but not the GUID). The mark is set
/// only after `canmount`, so a right mark means both are set: the next
/// Finish tries again otherwise ([`ensure_marks`]).
pub(crate) async fn never_automount(target: &Target, ds: &DatasetName) {
    let zfs = &target.zfs;
    if let Err(e) = zfs.set(ds, "canmount", "noauto").await {
        tracing::warn!(%ds, "cannot set canmount=noauto (the next Finish tries again): {e}");
        return;
    }
    let Some(guid) = target.get(ds).map(|d| format_replica_mark(d.guid)) else {
        return;
    };
    match zfs.set(ds, REPLICA_PROP, &guid).await {
        Ok(()) => target.mark_replica(ds, &guid),
        Err(e) => tracing::warn!(%ds, "cannot set {REPLICA_PROP}: {e}"),
    }
}

/// Destroys the tool snapshots the sender no longer has (see
/// [`mirror`]), unless the receiver keeps everything. Each is destroyed
/// on its own, never with `-r`.
async fn mirror_retention(
    target: &Target,
    peer: &str,
    dest: &DatasetName,
    announced: &[Snapshot],
) -> Vec<String> {
    if !target.mirror {
        return Vec::new();
    }
    let Some(current) = target.get(dest) else {
        return Vec::new();
    };
    let mut pruned = Vec::new();
    for name in mirror(&current.snapshots, announced) {
        let Ok(snap) = dest.snapshot(&name) else {
            continue;
        };
        match target.zfs.destroy_snapshot(&snap, false).await {
            Ok(()) => pruned.push(name.to_string()),
            Err(e) => tracing::warn!(%snap, "mirrored retention: cannot destroy: {e}"),
        }
    }
    if !pruned.is_empty() {
        tracing::info!(peer = %peer, %dest, ?pruned, "mirrored the sender's retention");
        let _ = target.refresh(dest).await;
    }
    pruned
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{dataset, ds, snap, target_of};

    fn open(target: &Target, dest: &str, mode: Mode, announced: Vec<Snapshot>) -> Open {
        let rel = RelPath::new("/a").unwrap();
        Open {
            _lock: target.try_lock(&rel).unwrap(),
            rel,
            dest: ds(dest),
            buffered: false,
            mode,
            announced,
            bookmarks: Vec::new(),
            resume_offered: false,
        }
    }

    #[tokio::test]
    async fn an_incomplete_dataset_is_not_finished_and_its_lock_is_freed() {
        let mut a = dataset("p/t/a");
        a.snapshots = vec![snap("s1", 11, 1)];
        let t = target_of([dataset("p/t"), a]);
        let o = open(
            &t,
            "p/t/a",
            Mode::Direct,
            vec![snap("s1", 11, 1), snap("s2", 12, 2)],
        );
        let e = finish(&t, "test", o).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "/a did not receive every snapshot up to the sender's newest; not finishing it"
        );
        assert!(t.exists(&ds("p/t/a")));
        assert!(t.try_lock(&RelPath::new("/a").unwrap()).is_some());
    }

    #[tokio::test]
    async fn a_complete_dataset_keeps_everything_without_mirroring() {
        let mut a = dataset("p/t/a");
        a.snapshots = vec![snap("zfsync_1", 10, 1), snap("s2", 12, 2)];
        // Marked already: Finish needs no `zfs set`.
        a.props
            .insert(REPLICA_PROP.to_string(), format_replica_mark(a.guid));
        let t = Target::new(
            ds("p/t"),
            std::sync::Arc::new(zfsync_common::zfs::Zfs::default()),
            false,
        );
        t.cache_for_tests([a]);
        let o = open(&t, "p/t/a", Mode::Direct, vec![snap("s2", 12, 2)]);
        let done = finish(&t, "test", o).await.unwrap();
        assert_eq!(
            done,
            Finished {
                location: "p/t/a".into(),
                buffered: false,
                pruned: Vec::new(),
            }
        );
    }
}
