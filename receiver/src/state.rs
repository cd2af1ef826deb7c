//! The receiver's view of its target: a cache of the target and buffer
//! trees (listed once per sender run, refreshed per dataset after each
//! change) and the per-dataset locks that keep two connections from
//! receiving into the same dataset.
//!
//! Invariants: the cache's mutex is never held across an `.await`; a
//! relative path is busy exactly while its [`DatasetLock`] lives.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use zfsync_common::naming::{
    buffer_root, format_buffer_leaf, format_temp_leaf, parse_buffer_leaf, parse_replica_mark,
    DatasetName, NameError, RelPath, Temp,
};
pub use zfsync_common::naming::{RECV_HOLD, REPLICA_PROP};
use zfsync_common::zfs::{Backend, Dataset, RecvOption, Snapshot, ZfsError};

/// Where a relative path currently lives on the receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    InPlace(Dataset),
    Buffered(Dataset),
    Absent { parent_present: bool },
}

pub struct Target {
    pub name: DatasetName,
    /// Mirror the sender's retention (destroy tool snapshots it dropped).
    pub mirror: bool,
    pub buffer: DatasetName,
    pub zfs: Backend,
    /// `-o`/`-x` options for every `zfs receive`.
    pub recv_options: Vec<RecvOption>,
    /// Cache of every dataset under the target and the buffer. Guarded by a
    /// std mutex: it is held only for map operations, never across `.await`.
    cache: Mutex<BTreeMap<DatasetName, Dataset>>,
    /// Relative paths a connection is working on (see [`DatasetLock`]):
    /// two connections never work on one dataset. In an `Arc` so that each
    /// lock frees its path when dropped; a std mutex, never held across
    /// `.await`.
    busy: Arc<Mutex<HashSet<RelPath>>>,
    /// The run whose listing the cache holds. An async mutex so that the
    /// workers of a new run wait for one listing instead of each making one.
    listed_run: tokio::sync::Mutex<Option<String>>,
}

/// Did zfsync create this dataset? Its mark is its own GUID, so a dataset
/// that merely inherited a parent's mark does not count.
pub fn is_replica(d: &Dataset) -> bool {
    d.props
        .get(REPLICA_PROP)
        .and_then(|v| parse_replica_mark(v))
        .is_some_and(|g| g == d.guid)
}

/// Held while a connection works on a dataset; dropping it frees the path.
pub struct DatasetLock {
    rel: RelPath,
    /// The target's set of busy paths, shared so that dropping the lock
    /// (in whichever task) frees the path.
    busy: Arc<Mutex<HashSet<RelPath>>>,
}

impl Drop for DatasetLock {
    fn drop(&mut self) {
        lock(&self.busy).remove(&self.rel);
    }
}

/// A poisoned lock only means another task panicked mid-update of a plain
/// map; the map itself is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Target {
    pub fn new(name: DatasetName, zfs: Backend, mirror: bool) -> Self {
        Target {
            mirror,
            buffer: buffer_root(&name),
            name,
            zfs,
            recv_options: Vec::new(),
            cache: Mutex::new(BTreeMap::new()),
            busy: Arc::new(Mutex::new(HashSet::new())),
            listed_run: tokio::sync::Mutex::new(None),
        }
    }

    pub fn with_recv_options(mut self, options: Vec<RecvOption>) -> Self {
        self.recv_options = options;
        self
    }

    /// Destroys a tree zfsync made, releasing the receiver's own holds in
    /// it first (a held snapshot cannot be destroyed).
    pub async fn destroy_tree(&self, ds: &DatasetName) -> Result<(), ZfsError> {
        if let Err(e) = self.zfs.release_tag_under(RECV_HOLD, ds).await {
            tracing::debug!(%ds, "releasing holds before destroying: {e}");
        }
        self.zfs.destroy_recursive(ds).await
    }

    /// Lists the target and buffer trees in one `zfs` call, unless this run
    /// already did.
    pub async fn refresh_for_run(&self, run_id: &str) -> Result<(), ZfsError> {
        let mut listed = self.listed_run.lock().await;
        if listed.as_deref() == Some(run_id) {
            return Ok(());
        }
        self.relist().await?;
        *listed = Some(run_id.to_string());
        Ok(())
    }

    /// Lists both trees again (after a replacement, which moves many).
    pub async fn relist(&self) -> Result<(), ZfsError> {
        let tree = self
            .zfs
            .list_trees_with(&[&self.name, &self.buffer], &[REPLICA_PROP])
            .await?;
        for (name, why) in &tree.skipped {
            tracing::warn!(%name, %why, "ignoring a dataset zfsync cannot name");
        }
        *lock(&self.cache) = tree.datasets;
        Ok(())
    }

    /// Re-reads one dataset after it changed.
    pub async fn refresh(&self, ds: &DatasetName) -> Result<Option<Dataset>, ZfsError> {
        let got = self.zfs.list_dataset(ds).await?;
        let mut cache = lock(&self.cache);
        match &got {
            Some(d) => {
                // The one-dataset listing has no user properties: keep ours.
                let mut d = d.clone();
                if let Some(old) = cache.get(ds) {
                    d.props = old.props.clone();
                }
                cache.insert(ds.clone(), d);
            }
            None => {
                cache.remove(ds);
            }
        }
        Ok(got)
    }

    pub fn get(&self, ds: &DatasetName) -> Option<Dataset> {
        lock(&self.cache).get(ds).cloned()
    }

    pub fn exists(&self, ds: &DatasetName) -> bool {
        lock(&self.cache).contains_key(ds)
    }

    /// Direct children of `ds` in the cache.
    pub fn children(&self, ds: &DatasetName) -> Vec<DatasetName> {
        lock(&self.cache)
            .keys()
            .filter(|k| k.parent().as_ref() == Some(ds))
            .cloned()
            .collect()
    }

    pub fn mark_replica(&self, ds: &DatasetName, guid: &str) {
        if let Some(d) = lock(&self.cache).get_mut(ds) {
            d.props.insert(REPLICA_PROP.to_string(), guid.to_string());
        }
    }

    /// Datasets in place under the target whose relative path is not in
    /// `source`, parents first. The buffer is never an orphan.
    pub fn orphans(&self, source: &std::collections::HashSet<&str>) -> Vec<(RelPath, DatasetName)> {
        let cache = lock(&self.cache);
        let mut v: Vec<(RelPath, DatasetName)> = cache
            .keys()
            .filter(|k| !(*k == &self.buffer || k.relative_to(&self.buffer).is_some()))
            .filter_map(|k| k.relative_to(&self.name).map(|r| (r, k.clone())))
            .filter(|(r, _)| !source.contains(r.as_str()))
            .collect();
        v.sort_by(|a, b| a.0.tree_order_key().cmp(&b.0.tree_order_key()));
        v
    }

    /// Every dataset below `ds` (not `ds` itself).
    pub fn descendants(&self, ds: &DatasetName) -> Vec<DatasetName> {
        lock(&self.cache)
            .keys()
            .filter(|k| *k != ds && k.relative_to(ds).is_some())
            .cloned()
            .collect()
    }

    /// Records a rename of `from` (and everything below it) to `to`.
    pub fn renamed(&self, from: &DatasetName, to: &DatasetName) {
        let mut cache = lock(&self.cache);
        let moved: Vec<DatasetName> = cache
            .keys()
            .filter(|k| *k == from || k.relative_to(from).is_some())
            .cloned()
            .collect();
        for old in moved {
            if let (Some(mut d), Some(rel)) = (cache.remove(&old), old.relative_to(from)) {
                if let Ok(new) = to.join(&rel) {
                    d.name = new.clone();
                    cache.insert(new, d);
                }
            }
        }
    }

    /// Records that `ds` and everything below it are gone.
    pub fn destroyed(&self, ds: &DatasetName) {
        lock(&self.cache).retain(|k, _| !(k == ds || k.relative_to(ds).is_some()));
    }

    pub fn in_place_name(&self, rel: &RelPath) -> Result<DatasetName, NameError> {
        self.name.join(rel)
    }

    /// `BUF/<HEX>`; `None` for the top dataset, which is never buffered.
    pub fn buffer_name(&self, rel: &RelPath) -> Option<Result<DatasetName, NameError>> {
        format_buffer_leaf(rel).map(|h| self.buffer.child(&h))
    }

    /// Where a `--full` replacement is received until it is whole.
    pub fn full_temp_name(&self, rel: &RelPath) -> Result<DatasetName, NameError> {
        self.buffer.child(&format_temp_leaf(rel, Temp::Full))
    }

    /// Where the old copy waits while a replacement is swapped in.
    pub fn old_temp_name(&self, rel: &RelPath) -> Result<DatasetName, NameError> {
        self.buffer.child(&format_temp_leaf(rel, Temp::Old))
    }

    pub fn locate(&self, rel: &RelPath) -> Result<Location, NameError> {
        let in_place = self.in_place_name(rel)?;
        let cache = lock(&self.cache);
        if let Some(d) = cache.get(&in_place) {
            return Ok(Location::InPlace(d.clone()));
        }
        if let Some(Ok(buf)) = self.buffer_name(rel) {
            if let Some(d) = cache.get(&buf) {
                return Ok(Location::Buffered(d.clone()));
            }
        }
        let parent_present = match rel.parent() {
            // The target's own parent was checked at start-up.
            None => true,
            Some(p) => self.name.join(&p).is_ok_and(|p| cache.contains_key(&p)),
        };
        Ok(Location::Absent { parent_present })
    }

    /// Datasets waiting in the buffer, parents first.
    pub fn buffered(&self) -> Vec<(RelPath, DatasetName)> {
        let cache = lock(&self.cache);
        let mut v: Vec<(RelPath, DatasetName)> = cache
            .keys()
            .filter(|k| k.parent().as_ref() == Some(&self.buffer))
            .filter_map(|k| {
                let leaf = k.as_str().rsplit('/').next()?;
                parse_buffer_leaf(leaf).map(|r| (r, k.clone()))
            })
            .collect();
        v.sort_by(|a, b| a.0.tree_order_key().cmp(&b.0.tree_order_key()));
        v
    }

    pub fn try_lock(&self, rel: &RelPath) -> Option<DatasetLock> {
        let mut busy = lock(&self.busy);
        if !busy.insert(rel.clone()) {
            return None;
        }
        Some(DatasetLock {
            rel: rel.clone(),
            busy: self.busy.clone(),
        })
    }

    /// The newest snapshot of `ds` per the cache.
    pub fn newest(&self, ds: &DatasetName) -> Option<Snapshot> {
        lock(&self.cache)
            .get(ds)
            .and_then(|d| d.snapshots.last().cloned())
    }
}

#[cfg(test)]
impl Target {
    /// Puts `datasets` into the cache, as a listing would.
    pub(crate) fn cache_for_tests(&self, datasets: impl IntoIterator<Item = Dataset>) {
        let mut cache = lock(&self.cache);
        for d in datasets {
            cache.insert(d.name.clone(), d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ds, target_with};

    #[test]
    fn locates_in_place_buffered_and_absent() {
        let t = target_with(&[
            "p/t",
            "p/t/a",
            "p/t.zfsyncbuffer",
            "p/t.zfsyncbuffer/2F622F63",
        ]);
        let rel = |s| RelPath::new(s).unwrap();
        assert!(matches!(
            t.locate(&rel("/a")).unwrap(),
            Location::InPlace(_)
        ));
        assert!(matches!(
            t.locate(&rel("/b/c")).unwrap(),
            Location::Buffered(_)
        ));
        assert_eq!(
            t.locate(&rel("/a/x")).unwrap(),
            Location::Absent {
                parent_present: true
            }
        );
        assert_eq!(
            t.locate(&rel("/q/x")).unwrap(),
            Location::Absent {
                parent_present: false
            }
        );
    }

    #[test]
    fn buffered_lists_parents_first_and_skips_temporaries() {
        let t = target_with(&[
            "p/t.zfsyncbuffer",
            "p/t.zfsyncbuffer/2F612F62",
            "p/t.zfsyncbuffer/2F61",
            "p/t.zfsyncbuffer/2F61.full",
            "p/t.zfsyncbuffer/top.old",
            "p/t.zfsyncbuffer/junk",
        ]);
        let got: Vec<String> = t.buffered().iter().map(|(r, _)| r.to_string()).collect();
        assert_eq!(got, ["/a", "/a/b"]);
    }

    #[test]
    fn rename_moves_descendants_in_the_cache() {
        let t = target_with(&["p/t.zfsyncbuffer/2F61", "p/t.zfsyncbuffer/2F61/x", "p/t"]);
        t.renamed(&ds("p/t.zfsyncbuffer/2F61"), &ds("p/t/a"));
        assert!(t.exists(&ds("p/t/a")) && t.exists(&ds("p/t/a/x")));
        assert!(!t.exists(&ds("p/t.zfsyncbuffer/2F61")));
        t.destroyed(&ds("p/t/a"));
        assert!(!t.exists(&ds("p/t/a/x")) && t.exists(&ds("p/t")));
    }

    #[test]
    fn locks_are_exclusive_and_freed_on_drop() {
        let t = target_with(&[]);
        let r = RelPath::new("/a").unwrap();
        let l = t.try_lock(&r).unwrap();
        assert!(t.try_lock(&r).is_none());
        drop(l);
        assert!(t.try_lock(&r).is_some());
    }

    #[test]
    fn temp_names() {
        let t = target_with(&[]);
        assert_eq!(
            t.full_temp_name(&RelPath::new("/a").unwrap())
                .unwrap()
                .as_str(),
            "p/t.zfsyncbuffer/2F61.full"
        );
        assert_eq!(
            t.old_temp_name(&RelPath::root()).unwrap().as_str(),
            "p/t.zfsyncbuffer/top.old"
        );
    }
}
