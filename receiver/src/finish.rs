//! Finishing a dataset: the hold on the newest snapshot, the marks of a new
//! replica, mirrored retention, and (for `--full`) the swap; and [`flush`],
//! which sets the marks and moves the holds of many datasets at once.
//!
//! Invariants:
//! - a dataset is finished only when its newest snapshot is the sender's
//!   newest; otherwise a half-built replacement is removed and the old
//!   copy stays;
//! - the receiver's hold moves to the newest snapshot of each finished
//!   dataset, batched ([`flush`]: one `zfs hold` for every newest snapshot
//!   not held yet, then one `zfs release` of the older ones whose dataset's
//!   newest is held); holds only where `zfs holds` exists, so the receiver
//!   can always find its own again; a failed hold loses nothing (the old
//!   hold stays; logged);
//! - retention destroys only tool snapshots the sender dropped, one at a
//!   time, never with `-r`, never one the cache shows held (the receiver's
//!   own previous hold is released only at the flush: such a snapshot goes
//!   at the next run), and only when the receiver mirrors it;
//! - every dataset zfsync receives into, except a pool's root or another
//!   dataset it overwrote with `-F` (which it did not create), carries
//!   `canmount=noauto` (not a volume: it has none) and the replica mark
//!   (`zfsync:replica=yes`, set locally): in the first `zfs receive -o`
//!   where zfs can, else batched by [`flush`] (canmount for all, then the
//!   mark for all: a mark means both are set), and re-checked at every
//!   Finish from the cached listing (a crash in between leaves them unset),
//!   with no `zfs` call when the mark is there;
//! - pending marks are flushed before anything renames a replica (the
//!   buffer's placement, a replacement's swap): on zfs-fuse a rename mounts
//!   a dataset with `canmount=on`;
//! - a bare `.full` of the dataset left by an earlier attempt is removed
//!   at a Finish that does not use it.

use thiserror::Error;
use zfsync_common::caps::Cap;
use zfsync_common::naming::{DatasetName, RelPath, SnapName, SnapshotName, REPLICA_MARK};
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
            // Mirrored retention skips what the cache shows held, so the
            // previous hold keeps its snapshot until the flush released it.
            move_hold(target, &open.dest).await;
            remove_stale_full(target, &open.rel).await;
            Ok(Finished {
                location: open.dest.to_string(),
                buffered: open.buffered,
                pruned: mirror_retention(target, peer, &open.dest, &open.announced).await,
            })
        }
        Mode::Replace { replaces } => {
            // The new copy's marks before it is renamed into place.
            flush(target).await;
            replace::replace(target, peer, &open.dest, replaces, &open.rel).await?;
            // Held once the new copy is in place (not on the temporary
            // copy, which a pool root's fill destroys).
            move_hold(target, replaces).await;
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
/// with no `zfs` call when the mark is there; else they join the batch
/// ([`flush`]). A pool's root is never marked (zfsync fills it, but did
/// not create it).
pub(crate) async fn ensure_marks(target: &Target, ds: &DatasetName) {
    if ds.is_pool_root() {
        return;
    }
    let Some(d) = target.get(ds) else {
        return;
    };
    if is_replica(&d) {
        return;
    }
    tracing::debug!(%ds, "canmount=noauto and the replica mark are to be set");
    if target.mark_later(ds) {
        flush(target).await;
    }
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

/// The receiver's hold is to move to the newest snapshot of a finished
/// dataset (the base of the next incremental), so that neither a person
/// nor another tool destroys the base by accident: batched ([`flush`]).
/// Only where `zfs holds` exists (OpenZFS): without it the receiver could
/// not find its own holds again before destroying a tree it made.
async fn move_hold(target: &Target, dest: &DatasetName) {
    let caps = target.zfs.caps();
    if !(caps.has(Cap::Holds) && caps.has(Cap::HoldsList)) {
        return;
    }
    if target.hold_later(dest) {
        flush(target).await;
    }
}

/// Sets what is pending, for every dataset at once: the marks of new
/// replicas, then the receiver's holds. Called when a connection ends,
/// before the buffer's datasets are placed or a replacement is swapped
/// in, and when a batch is full ([`crate::state::PENDING_MAX`]).
pub(crate) async fn flush(target: &Target) {
    let _one = target.flushing.lock().await;
    flush_marks(target).await;
    flush_holds(target).await;
}

/// `canmount=noauto` on the pending file systems (a volume has no
/// `canmount`), then the mark on those and the volumes: one `zfs set`
/// each. A replica is never mounted by a rename, a `zfs mount -a` or a
/// reboot (it would shadow the receiving host's own paths); `zfs mount`
/// still mounts it. The mark (which `--delete-missing` requires before it
/// destroys anything) goes only where `canmount` was set, so a mark means
/// both are: the next Finish tries again otherwise ([`ensure_marks`]).
async fn flush_marks(target: &Target) {
    let todo: Vec<_> = target
        .take_pending_marks()
        .iter()
        .filter_map(|ds| target.get(ds))
        .filter(|d| !is_replica(d))
        .collect();
    if todo.is_empty() {
        return;
    }
    let filesystems: Vec<DatasetName> = todo
        .iter()
        .filter(|d| d.kind != "volume")
        .map(|d| d.name.clone())
        .collect();
    let unmountable = set_each(target, &filesystems, "canmount", "noauto").await;
    let to_mark: Vec<DatasetName> = todo
        .iter()
        .filter(|d| d.kind == "volume" || unmountable.contains(&d.name))
        .map(|d| d.name.clone())
        .collect();
    for ds in set_each(target, &to_mark, REPLICA_PROP, REPLICA_MARK).await {
        target.marked(&ds);
    }
}

/// One property on many datasets in one `zfs set`; after a failure, one
/// by one, so that one bad dataset does not leave the others unset.
/// Returns those set.
async fn set_each(
    target: &Target,
    datasets: &[DatasetName],
    prop: &str,
    value: &str,
) -> Vec<DatasetName> {
    if datasets.is_empty() {
        return Vec::new();
    }
    let zfs = &target.zfs;
    let e = match zfs.set_many(datasets, prop, value).await {
        Ok(()) => return datasets.to_vec(),
        Err(e) => e,
    };
    if let [ds] = datasets {
        tracing::warn!(%ds, "cannot set {prop}={value} (the next Finish tries again): {e}");
        return Vec::new();
    }
    tracing::debug!(
        "setting {prop}={value} on {} datasets at once: {e}; one by one",
        datasets.len()
    );
    let mut set = Vec::new();
    for ds in datasets {
        match zfs.set(ds, prop, value).await {
            Ok(()) => set.push(ds.clone()),
            Err(e) => {
                tracing::warn!(%ds, "cannot set {prop}={value} (the next Finish tries again): {e}")
            }
        }
    }
    set
}

/// What moving one dataset's hold takes, from the cache.
struct HoldMove {
    ds: DatasetName,
    newest: SnapName,
    /// The newest snapshot is held already.
    held: bool,
    /// Older snapshots held (by anyone: `userrefs`).
    older: Vec<SnapName>,
}

/// Holds the newest snapshot of each pending dataset that is not held yet
/// (one `zfs hold`), then releases this receiver's tag from the older ones
/// of the datasets whose newest is held (one `zfs release`, which goes on
/// past a snapshot without the tag). A failed hold keeps the old holds.
async fn flush_holds(target: &Target) {
    let moves: Vec<HoldMove> = target
        .take_pending_holds()
        .iter()
        .filter_map(|ds| {
            let d = target.get(ds)?;
            let newest = d.snapshots.last()?.name.clone();
            Some(HoldMove {
                ds: ds.clone(),
                held: d.held.contains(newest.as_str()),
                older: (d.snapshots.iter())
                    .filter(|s| s.name != newest && d.held.contains(s.name.as_str()))
                    .map(|s| s.name.clone())
                    .collect(),
                newest,
            })
        })
        .collect();
    let snap = |ds: &DatasetName, n: &SnapName| ds.snapshot(n).ok();
    let to_hold: Vec<SnapshotName> = (moves.iter())
        .filter(|m| !m.held)
        .filter_map(|m| snap(&m.ds, &m.newest))
        .collect();
    let newly = hold_each(target, &to_hold).await;
    let mut release = Vec::new();
    let mut moved = Vec::new();
    for m in &moves {
        let now_held = m.held || snap(&m.ds, &m.newest).is_some_and(|s| newly.contains(&s));
        if !now_held {
            continue;
        }
        target.holds_moved(&m.ds, Some(&m.newest), &[]);
        release.extend(m.older.iter().filter_map(|o| snap(&m.ds, o)));
        moved.push(m);
    }
    if release.is_empty() {
        return;
    }
    match target.zfs.release(RECV_HOLD, &release).await {
        Ok(()) => {
            for m in moved {
                target.holds_moved(&m.ds, None, &m.older);
            }
        }
        // Also when one of them is held by someone else only.
        Err(e) => tracing::debug!("releasing the previous holds: {e}"),
    }
}

/// `zfs hold` of all at once; after a failure, one by one. Returns those
/// held.
async fn hold_each(target: &Target, snaps: &[SnapshotName]) -> Vec<SnapshotName> {
    if snaps.is_empty() {
        return Vec::new();
    }
    let zfs = &target.zfs;
    let e = match zfs.hold(RECV_HOLD, snaps).await {
        Ok(()) => return snaps.to_vec(),
        Err(e) => e,
    };
    if let [one] = snaps {
        tracing::warn!(snapshot = %one, "cannot hold the received snapshot: {e}");
        return Vec::new();
    }
    let mut held = Vec::new();
    for s in snaps {
        match zfs.hold(RECV_HOLD, std::slice::from_ref(s)).await {
            Ok(()) => held.push(s.clone()),
            Err(e) => tracing::warn!(snapshot = %s, "cannot hold the received snapshot: {e}"),
        }
    }
    held
}

/// Destroys the tool snapshots the sender no longer has (see
/// [`mirror`]), unless the receiver keeps everything. Each is destroyed
/// on its own, never with `-r`; one the cache shows held is left for a
/// later run (the receiver's own previous hold is released at the flush).
/// The cache is updated, not listed again.
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
        if current.held.contains(name.as_str()) {
            tracing::debug!(%dest, snapshot = %name, "mirrored retention: held, left for a later run");
            continue;
        }
        let Ok(snap) = dest.snapshot(&name) else {
            continue;
        };
        match target.zfs.destroy_snapshot(&snap, false).await {
            Ok(()) => pruned.push(name),
            Err(e) => tracing::warn!(%snap, "mirrored retention: cannot destroy: {e}"),
        }
    }
    if !pruned.is_empty() {
        tracing::info!(peer = %peer, %dest, ?pruned, "mirrored the sender's retention");
        target.snapshots_destroyed(dest, &pruned);
    }
    pruned.iter().map(|n| n.to_string()).collect()
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
            .insert(REPLICA_PROP.to_string(), REPLICA_MARK.to_string());
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
