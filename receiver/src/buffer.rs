//! The buffer (`TARGET.zfsyncbuffer`), where a dataset waits when it
//! arrives before its parent: creating it, cleanbuffer's placement (and its
//! dry run), and the orphans judged at the end of a run (`--delete-missing`).
//!
//! Invariants:
//! - placement goes parents first, each dataset under its lock; it never
//!   renames over an existing dataset, nor below a parent that is not in
//!   place; the buffer dataset itself is removed only when empty, never
//!   with `-r`;
//! - [`would_place`] (a dry run) changes nothing;
//! - orphans are judged only when the sender's list names its top dataset;
//!   `--delete-missing` destroys only the top of a wholly orphaned subtree,
//!   and only when a fresh listing shows every dataset in it was made by
//!   zfsync; an orphan it cannot delete (busy, unlisted, refused by zfs) is
//!   reported in `failed`, with a reason that starts "cannot delete the
//!   orphaned replica".

use std::collections::HashSet;

use thiserror::Error;
use zfsync_common::naming::{DatasetName, NameError, RelPath};
use zfsync_common::protocol::{CleanReport, PlaceFailure};
use zfsync_common::zfs::ZfsError;

use crate::state::{is_replica, Target, REPLICA_PROP};

/// Why the buffer dataset is not there.
#[derive(Debug, Error)]
pub(crate) enum BufferError {
    #[error("cannot create the buffer dataset {buf}: {source}")]
    Create { buf: DatasetName, source: ZfsError },
    #[error("the buffer dataset {0} vanished")]
    Vanished(DatasetName),
}

/// Why a buffered dataset was not placed.
#[derive(Debug, Error)]
pub(crate) enum PlaceError {
    #[error("a transfer into it is running; the next run places it")]
    Busy,
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{dest} already exists; remove either it or {buffered}")]
    Exists {
        dest: DatasetName,
        buffered: DatasetName,
    },
    #[error("its parent {0} is not on the receiver yet (does the parent have a snapshot on the sender?); the run that brings it places this one")]
    NoParent(DatasetName),
    #[error("cannot rename {buffered} to {dest}: {source}")]
    Rename {
        buffered: DatasetName,
        dest: DatasetName,
        source: ZfsError,
    },
    /// A dry run's answer: it does not say why.
    #[error("could not be placed now")]
    NotNow,
}

/// Creates the buffer dataset (unmounted) unless it exists.
pub(crate) async fn ensure(target: &Target) -> Result<(), BufferError> {
    let buf = &target.buffer;
    if target.exists(buf) {
        return Ok(());
    }
    let created = target.zfs.create_unmounted(buf).await;
    // Another connection may have created it meanwhile.
    match target.refresh(buf).await {
        Ok(Some(_)) => Ok(()),
        _ => Err(match created {
            Err(source) => BufferError::Create {
                buf: buf.clone(),
                source,
            },
            Ok(()) => BufferError::Vanished(buf.clone()),
        }),
    }
}

/// Why `--delete-missing` did not delete an orphaned replica zfsync made.
/// Reported in the clean report's `failed`; every text starts with
/// [`zfsync_common::protocol::typed::DELETE_FAILED`], which tells them from
/// placements (the protocol has no field of its own for them; a test below
/// holds the texts to it).
#[derive(Debug, Error)]
pub(crate) enum DeleteError {
    #[error("cannot delete the orphaned replica {0} now: a transfer into it is running; the next run with --delete-missing deletes it")]
    Busy(DatasetName),
    #[error("cannot delete the orphaned replica {ds}: cannot list it first: {source}")]
    List { ds: DatasetName, source: ZfsError },
    #[error("cannot delete the orphaned replica {ds}: {source}")]
    Destroy { ds: DatasetName, source: ZfsError },
}

fn failure(rel: &RelPath, e: impl std::fmt::Display) -> PlaceFailure {
    PlaceFailure {
        path: rel.as_str().to_string(),
        reason: e.to_string(),
    }
}

/// Places buffered datasets, parents first. Keeps going past failures.
pub(crate) async fn place(target: &Target, peer: &str) -> CleanReport {
    // Marks first: on zfs-fuse a rename mounts a dataset with canmount=on.
    crate::finish::flush(target).await;
    let mut report = CleanReport::default();
    for (rel, buffered) in target.buffered() {
        match place_one(target, peer, &rel, &buffered).await {
            Ok(()) => report.placed.push(rel.as_str().to_string()),
            Err(e) => report.failed.push(failure(&rel, e)),
        }
    }
    // Remove the buffer dataset once it is empty.
    let buf = &target.buffer;
    if target.exists(buf) && target.children(buf).is_empty() {
        // Not -r: should a new dataset have arrived meanwhile, zfs
        // refuses and the buffer simply stays.
        match target.zfs.destroy_empty(buf).await {
            Ok(()) => target.destroyed(buf),
            Err(e) => tracing::warn!("cannot remove the empty buffer {buf}: {e}"),
        }
    }
    report
}

/// Moves one buffered dataset to its place, under its lock.
async fn place_one(
    target: &Target,
    peer: &str,
    rel: &RelPath,
    buffered: &DatasetName,
) -> Result<(), PlaceError> {
    let Some(_lock) = target.try_lock(rel) else {
        return Err(PlaceError::Busy);
    };
    let dest = target.in_place_name(rel)?;
    if target.exists(&dest) {
        return Err(PlaceError::Exists {
            dest,
            buffered: buffered.clone(),
        });
    }
    if let Some(parent) = dest.parent() {
        if !target.exists(&parent) {
            return Err(PlaceError::NoParent(parent));
        }
    }
    match target.zfs.rename(buffered, &dest).await {
        Ok(()) => {
            target.renamed(buffered, &dest);
            tracing::info!(peer = %peer, %dest, "placed from the buffer");
            Ok(())
        }
        Err(source) => Err(PlaceError::Rename {
            buffered: buffered.clone(),
            dest,
            source,
        }),
    }
}

/// What [`place`] would place, changing nothing: a dataset whose place is
/// free and whose parent is in place or itself waiting in the buffer.
pub(crate) fn would_place(target: &Target) -> CleanReport {
    let buffered = target.buffered();
    let waiting: Vec<&RelPath> = buffered.iter().map(|(r, _)| r).collect();
    let mut report = CleanReport::default();
    for (rel, _) in &buffered {
        let dest = target.in_place_name(rel);
        let parent_ok = rel.parent().is_none_or(|p| {
            waiting.contains(&&p) || target.in_place_name(&p).is_ok_and(|d| target.exists(&d))
        });
        match dest {
            Ok(d) if !target.exists(&d) && parent_ok => report.placed.push(rel.to_string()),
            _ => report.failed.push(failure(rel, PlaceError::NotNow)),
        }
    }
    report
}

/// Fills in the replicas whose source is gone and, with `delete`,
/// destroys them: only whole subtrees that zfsync created
/// (the `zfsync:replica` mark set on each) and that are all orphaned. Each one it
/// cannot destroy is added to `failed` ([`DeleteError`]).
pub(crate) async fn orphans(
    target: &Target,
    peer: &str,
    source_paths: &[String],
    delete: bool,
    report: &mut CleanReport,
) {
    let source: HashSet<&str> = source_paths.iter().map(String::as_str).collect();
    // An honest sender always lists its top dataset: without it the
    // list is wrong, and the whole replica would look orphaned.
    if !source.contains("") {
        tracing::warn!(peer = %peer, "cleanbuffer without the top dataset in the source list: no orphans judged");
        return;
    }
    let found = target.orphans(&source);
    report.orphans = found
        .iter()
        .map(|(rel, _)| rel.as_str().to_string())
        .collect();
    if !delete || found.is_empty() {
        return;
    }
    tracing::warn!(peer = %peer, orphans = ?report.orphans, "--delete-missing: destroying the orphaned replicas zfsync created among these");
    for (rel, ds) in &found {
        // Only the top of an orphaned subtree; -r takes the rest.
        if rel
            .parent()
            .is_some_and(|p| found.iter().any(|(r, _)| *r == p))
        {
            continue;
        }
        match delete_orphan(target, peer, rel, ds).await {
            Ok(true) => report.deleted.push(rel.as_str().to_string()),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(peer = %peer, "{e}");
                report.failed.push(failure(rel, e));
            }
        }
    }
}

/// Destroys one orphaned subtree if zfsync made all of it. `Ok(false)`:
/// someone else made part of it, so it stays (not a failure).
async fn delete_orphan(
    target: &Target,
    peer: &str,
    rel: &RelPath,
    ds: &DatasetName,
) -> Result<bool, DeleteError> {
    let Some(_lock) = target.try_lock(rel) else {
        return Err(DeleteError::Busy(ds.clone()));
    };
    // Judge on a fresh listing of this subtree alone: a dataset may
    // have appeared below since this run's listing, and destroy -r
    // would take it.
    let fresh = target
        .zfs
        .list_trees_with(&[ds], &[REPLICA_PROP])
        .await
        .map_err(|source| DeleteError::List {
            ds: ds.clone(),
            source,
        })?;
    if !fresh.skipped.is_empty() || !fresh.datasets.values().all(is_replica) {
        tracing::warn!(%ds, "orphaned, but not created by zfsync (or holds such a dataset): left alone");
        return Ok(false);
    }
    if fresh.datasets.is_empty() {
        // Gone meanwhile.
        target.destroyed(ds);
        return Ok(false);
    }
    target
        .destroy_tree(ds)
        .await
        .map_err(|source| DeleteError::Destroy {
            ds: ds.clone(),
            source,
        })?;
    tracing::warn!(peer = %peer, %ds, "destroyed an orphaned replica (--delete-missing)");
    target.destroyed(ds);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ds, target_with};

    fn placed_and_failed(r: &CleanReport) -> (Vec<&str>, Vec<&str>) {
        (
            r.placed.iter().map(String::as_str).collect(),
            r.failed.iter().map(|f| f.path.as_str()).collect(),
        )
    }

    #[test]
    fn would_place_needs_a_free_place_and_a_parent() {
        let t = target_with(&[
            "p/t",
            "p/t/a",
            "p/t/b",
            "p/t.zfsyncbuffer",
            // /a/x: parent in place.
            "p/t.zfsyncbuffer/2F612F78",
            // /b: already in place.
            "p/t.zfsyncbuffer/2F62",
            // /c and /c/d: the parent waits in the buffer too.
            "p/t.zfsyncbuffer/2F63",
            "p/t.zfsyncbuffer/2F632F64",
            // /q/r: no parent anywhere.
            "p/t.zfsyncbuffer/2F712F72",
        ]);
        let report = would_place(&t);
        assert_eq!(
            placed_and_failed(&report),
            (vec!["/c", "/a/x", "/c/d"], vec!["/b", "/q/r"])
        );
        assert!(report
            .failed
            .iter()
            .all(|f| f.reason == "could not be placed now"));
        assert!(report.orphans.is_empty() && report.deleted.is_empty());
    }

    #[test]
    fn would_place_changes_and_locks_nothing() {
        let t = target_with(&["p/t", "p/t.zfsyncbuffer", "p/t.zfsyncbuffer/2F61"]);
        assert_eq!(would_place(&t).placed, ["/a"]);
        assert!(t.exists(&ds("p/t.zfsyncbuffer/2F61")) && !t.exists(&ds("p/t/a")));
        assert!(t.try_lock(&RelPath::new("/a").unwrap()).is_some());
    }

    #[tokio::test]
    async fn place_one_refuses_busy_taken_and_parentless_places() {
        let t = target_with(&["p/t", "p/t/a", "p/t.zfsyncbuffer"]);
        let rel = |s| RelPath::new(s).unwrap();
        let buf = ds("p/t.zfsyncbuffer/2F61");
        let lock = t.try_lock(&rel("/a")).unwrap();
        let busy = place_one(&t, "test", &rel("/a"), &buf).await;
        assert!(matches!(busy, Err(PlaceError::Busy)));
        drop(lock);
        let exists = place_one(&t, "test", &rel("/a"), &buf).await.unwrap_err();
        assert_eq!(
            exists.to_string(),
            "p/t/a already exists; remove either it or p/t.zfsyncbuffer/2F61"
        );
        let orphan = place_one(&t, "test", &rel("/q/r"), &ds("p/t.zfsyncbuffer/2F712F72"))
            .await
            .unwrap_err();
        assert!(
            orphan
                .to_string()
                .starts_with("its parent p/t/q is not on the receiver yet"),
            "{orphan}"
        );
    }

    #[tokio::test]
    async fn an_orphan_that_cannot_be_deleted_is_reported_in_failed() {
        let t = target_with(&["p/t", "p/t/a", "p/t/gone", "p/t/gone/x"]);
        // A transfer holds it: nothing is listed or destroyed.
        let lock = t.try_lock(&RelPath::new("/gone").unwrap()).unwrap();
        let mut report = CleanReport::default();
        orphans(&t, "test", &[String::new(), "/a".into()], true, &mut report).await;
        drop(lock);
        assert_eq!(report.orphans, ["/gone", "/gone/x"]);
        assert!(report.deleted.is_empty());
        let failed: Vec<(&str, &str)> = report
            .failed
            .iter()
            .map(|f| (f.path.as_str(), f.reason.as_str()))
            .collect();
        assert_eq!(
            failed,
            [(
                "/gone",
                "cannot delete the orphaned replica p/t/gone now: a transfer into it is running; the next run with --delete-missing deletes it"
            )]
        );
        assert!(t.exists(&ds("p/t/gone/x")));
        let e = DeleteError::Destroy {
            ds: ds("p/t/gone"),
            source: ZfsError::DoesNotExist {
                name: "p/t/gone".into(),
            },
        };
        assert!(e
            .to_string()
            .starts_with("cannot delete the orphaned replica p/t/gone: "));
    }

    #[tokio::test]
    async fn no_orphans_without_the_top_dataset() {
        let t = target_with(&["p/t", "p/t/gone"]);
        let mut report = CleanReport::default();
        orphans(&t, "test", &["/a".to_string()], true, &mut report).await;
        assert!(report.orphans.is_empty() && report.deleted.is_empty());
        orphans(&t, "test", &[String::new()], false, &mut report).await;
        assert_eq!(report.orphans, ["/gone"]);
        assert!(report.deleted.is_empty() && t.exists(&ds("p/t/gone")));
    }
}
