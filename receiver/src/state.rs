//! The receiver's view of its target: a cache of the target and buffer
//! trees (listed once per sender run, then kept up to date with every
//! change the receiver makes), the per-dataset locks that keep two
//! connections from receiving into the same dataset, the marks and holds
//! still to be set in one batch, and the memory budget all connections
//! share.
//!
//! Invariants: the cache's mutex is never held across an `.await`; a
//! relative path is busy exactly while its [`DatasetLock`] lives; the
//! budget's bytes in use are the sum of the live [`Reservation`]s.
//!
//! The cache is the truth between listings. After a successful `zfs
//! receive` it is updated from what the stream carried (its snapshots,
//! with the sender's names and GUIDs), not listed again; after a failure
//! the dataset is listed again. A snapshot added so gets a `createtxg` one
//! above the dataset's newest: on the receiver a snapshot's `createtxg` is
//! an order key within its dataset only (the planner and mirrored
//! retention compare it only with the same dataset's), never compared
//! with a real txg or the sender's. A dataset a full receive made gets
//! GUID 0 (unknown): nothing reads a receiver dataset's own GUID.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use zfsync_common::naming::{
    buffer_root, format_buffer_leaf, format_replica_mark, format_temp_leaf, parse_buffer_leaf,
    parse_replica_mark, DatasetName, NameError, RelPath, ReplicaMark, SnapName, Temp,
};
pub use zfsync_common::naming::{RECV_HOLD, REPLICA_PROP};
use zfsync_common::zfs::{Backend, Dataset, RecvOption, Snapshot, ZfsError};

/// What the receiver changed in its cache while listings were under way.
#[derive(Debug, Default)]
struct Touched {
    /// Listings under way.
    active: usize,
    /// Bumped by each listing as it starts.
    generation: u64,
    /// Each changed dataset, with the newest generation under way when
    /// it changed.
    names: HashMap<DatasetName, u64>,
}

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
    /// Which runs the cache was listed for. An async mutex so that the
    /// workers of a new run wait for one listing instead of each making one.
    listings: tokio::sync::Mutex<Listings>,
    /// Memory for what requests hold, shared by all connections.
    pub budget: Arc<MemoryBudget>,
    /// New replicas whose `canmount=noauto` and mark are still to be set
    /// (where `zfs receive -o` cannot set them), in one `zfs set` per
    /// property for all (see `finish::flush`). Shared by all connections
    /// (any of them flushes); a std mutex, never held across `.await`.
    pending_marks: Mutex<BTreeSet<DatasetName>>,
    /// Datasets the receiver changed in the cache while a listing was
    /// under way: their cached entry (or absence) is newer than what the
    /// listing saw, and is kept over it (see [`Target::relist`]). Locked
    /// after the cache, never before.
    touched: Mutex<Touched>,
    /// Woken when [`FLUSH_SOON`] marks or holds are pending: the daemon's
    /// flusher task sets them (`finish::flush`) while receives go on.
    pub flush_soon: tokio::sync::Notify,
    /// Datasets whose receiver hold is to move to their newest snapshot,
    /// in one `zfs hold` and one `zfs release` for all. As above.
    pending_holds: Mutex<BTreeSet<DatasetName>>,
    /// One flush at a time (an async mutex, held across the `zfs set`s):
    /// a flush that returns has seen every mark pending when it started
    /// set, also those another connection's flush took first; placement
    /// relies on it before it renames.
    pub(crate) flushing: tokio::sync::Mutex<()>,
}

/// Pending marks or holds beyond this many are set at once, not at the
/// end of the connection.
pub const PENDING_MAX: usize = 256;
/// Pending marks or holds from which the daemon's background flusher
/// sets them while receives go on (a new tree's first run: the `zfs set`
/// calls overlap the receives instead of following them).
pub const FLUSH_SOON: usize = 16;

/// The receiver's default memory budget (`--memory-budget`).
pub const DEFAULT_MEMORY_BUDGET: usize = 256 << 20;

/// Memory that requests may hold at once, across all connections: what a
/// large frame may take while it is read and decoded, and the snapshot
/// lists each session keeps. A request that would exceed it is refused
/// (as busy) before its memory is allocated.
#[derive(Debug)]
pub struct MemoryBudget {
    total: usize,
    /// Bytes held by live reservations. A std mutex: held only to add or
    /// subtract, never across an `.await`.
    used: Mutex<usize>,
}

impl MemoryBudget {
    pub fn new(total: usize) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            total,
            used: Mutex::new(0),
        })
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn used(&self) -> usize {
        *lock(&self.used)
    }

    /// `bytes` for the caller, if that much is free.
    pub fn try_reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        let mut r = Reservation {
            budget: self.clone(),
            bytes: 0,
        };
        r.try_resize(bytes).then_some(r)
    }
}

/// Bytes of a [`MemoryBudget`] in use by one holder; given back on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: usize,
}

impl Reservation {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Moves `bytes` (at most all it has) into a reservation of their own.
    pub fn split_off(&mut self, bytes: usize) -> Reservation {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        Reservation {
            budget: self.budget.clone(),
            bytes,
        }
    }

    /// Takes over what `other` holds (of the same budget).
    pub fn merge(&mut self, mut other: Reservation) {
        debug_assert!(Arc::ptr_eq(&self.budget, &other.budget));
        self.bytes += std::mem::take(&mut other.bytes);
    }

    /// Grows (if the budget has room) or shrinks (always) to `bytes`.
    pub fn try_resize(&mut self, bytes: usize) -> bool {
        let mut used = lock(&self.budget.used);
        let others = *used - self.bytes;
        if bytes > self.bytes && others.saturating_add(bytes) > self.budget.total {
            return false;
        }
        *used = others + bytes;
        self.bytes = bytes;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.try_resize(0);
    }
}

/// How many new runs may have the target listed again per minute. A run's
/// first connection lists the target (after its certificate was checked);
/// beyond this rate a new run works from the cache, which the receiver
/// keeps up to date with its own changes.
const RELISTS_PER_MINUTE: usize = 12;
/// How many run ids are remembered as listed.
const RUNS_REMEMBERED: usize = 64;

/// Which runs had the target listed: each run id at most once, and new
/// runs at most [`RELISTS_PER_MINUTE`].
#[derive(Debug, Default)]
pub struct Listings {
    /// Run ids already served by a listing, newest last.
    runs: VecDeque<String>,
    /// When the listings of the last minute were made.
    recent: VecDeque<Instant>,
    /// The cache holds a listing at all.
    listed: bool,
}

impl Listings {
    /// Does a connection of `run_id` need the target listed (at `now`)?
    /// Records the run either way: it never asks again.
    pub fn wants_listing(&mut self, run_id: &str, now: Instant) -> bool {
        if self.runs.iter().any(|r| r == run_id) {
            return false;
        }
        if self.runs.len() == RUNS_REMEMBERED {
            self.runs.pop_front();
        }
        self.runs.push_back(run_id.to_string());
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            self.recent.pop_front();
        }
        if self.listed && self.recent.len() >= RELISTS_PER_MINUTE {
            return false;
        }
        self.recent.push_back(now);
        true
    }

    /// A listing failed: the run asks again on its next connection.
    fn failed(&mut self, run_id: &str) {
        self.runs.retain(|r| r != run_id);
        self.recent.pop_back();
    }
}

/// Did zfsync create this dataset? It carries the mark, set on the
/// dataset itself: the listing keeps user properties only where their
/// source is `local` (`zfs::parse_get`), so a dataset that merely
/// inherited a parent's mark does not count. An old mark (the dataset's
/// own GUID) counts where it is that GUID.
pub fn is_replica(d: &Dataset) -> bool {
    match d
        .props
        .get(REPLICA_PROP)
        .and_then(|v| parse_replica_mark(v))
    {
        Some(ReplicaMark::Current) => true,
        Some(ReplicaMark::Guid(g)) => g != 0 && g == d.guid,
        None => false,
    }
}

/// What a full receive made, for [`Target::received`]; for an existing
/// dataset only `written` and `marked` count.
#[derive(Clone, Copy, Debug)]
pub struct NewDataset {
    /// `filesystem` or `volume` (from the stream's `drr_type`).
    pub kind: &'static str,
    /// A raw stream (`send -w`) of an encrypted dataset.
    pub encrypted: bool,
    /// The receive set the replica mark (`zfs receive -o`).
    pub marked: bool,
    /// `Some(0)` where zfs has `written`.
    pub written: Option<u64>,
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
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
            listings: tokio::sync::Mutex::new(Listings::default()),
            budget: MemoryBudget::new(DEFAULT_MEMORY_BUDGET),
            pending_marks: Mutex::new(BTreeSet::new()),
            touched: Mutex::new(Touched::default()),
            flush_soon: tokio::sync::Notify::new(),
            pending_holds: Mutex::new(BTreeSet::new()),
            flushing: tokio::sync::Mutex::new(()),
        }
    }

    /// With a memory budget of `bytes` (`--memory-budget`).
    pub fn with_memory_budget(mut self, bytes: usize) -> Self {
        self.budget = MemoryBudget::new(bytes);
        self
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
    /// already did, or too many new runs did in the last minute (see
    /// [`Listings`]).
    pub async fn refresh_for_run(&self, run_id: &str) -> Result<(), ZfsError> {
        let mut listings = self.listings.lock().await;
        if !listings.wants_listing(run_id, Instant::now()) {
            return Ok(());
        }
        if let Err(e) = self.relist().await {
            listings.failed(run_id);
            return Err(e);
        }
        listings.listed = true;
        Ok(())
    }

    /// Lists both trees again (after a replacement, which moves many).
    /// What this receiver changed in the cache meanwhile (a receive into
    /// another dataset, a rename, a destroy: the cache is the truth
    /// between listings) wins over the listing, which may have read those
    /// datasets before the change.
    pub async fn relist(&self) -> Result<(), ZfsError> {
        let started = {
            let mut t = lock(&self.touched);
            t.active += 1;
            t.generation += 1;
            t.generation
        };
        let listed = self
            .zfs
            .list_trees_with(&[&self.name, &self.buffer], &[REPLICA_PROP])
            .await;
        let mut cache = lock(&self.cache);
        let mut t = lock(&self.touched);
        t.active -= 1;
        let result = match listed {
            Ok(tree) => {
                for (name, why) in &tree.skipped {
                    tracing::warn!(%name, %why, "ignoring a dataset zfsync cannot name");
                }
                let mut fresh = tree.datasets;
                for (name, _) in t.names.iter().filter(|(_, g)| **g >= started) {
                    match cache.get(name) {
                        Some(d) => fresh.insert(name.clone(), d.clone()),
                        None => fresh.remove(name),
                    };
                }
                *cache = fresh;
                Ok(())
            }
            Err(e) => Err(e),
        };
        if t.active == 0 {
            t.names.clear();
        }
        result
    }

    /// Notes that the cache entry of `name` changed (with the cache
    /// locked): a listing under way must not overwrite it.
    fn touch<'n>(&self, names: impl IntoIterator<Item = &'n DatasetName>) {
        let mut t = lock(&self.touched);
        if t.active > 0 {
            let g = t.generation;
            for n in names {
                t.names.insert(n.clone(), g);
            }
        }
    }

    /// Re-reads one dataset after it changed.
    pub async fn refresh(&self, ds: &DatasetName) -> Result<Option<Dataset>, ZfsError> {
        let got = self.zfs.list_dataset(ds).await?;
        let mut cache = lock(&self.cache);
        self.touch([ds]);
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

    /// Records that `ds` now carries the replica mark.
    pub fn marked(&self, ds: &DatasetName) {
        let mut cache = lock(&self.cache);
        self.touch([ds]);
        if let Some(d) = cache.get_mut(ds) {
            d.props
                .insert(REPLICA_PROP.to_string(), format_replica_mark());
        }
    }

    /// Records a successful `zfs receive` into `ds` from what the stream
    /// carried, without listing (see the module documentation): `created`
    /// (the sender's names and GUIDs, oldest first) are appended after the
    /// newest snapshot; a dataset the receive created is added (`kind`,
    /// GUID 0, the mark if the receive set it). The receive left `ds` equal
    /// to its newest snapshot: `written` is 0 where zfs has the property.
    pub fn received(&self, ds: &DatasetName, new: NewDataset, created: &[Snapshot]) {
        let mut cache = lock(&self.cache);
        self.touch([ds]);
        let d = cache.entry(ds.clone()).or_insert_with(|| Dataset {
            name: ds.clone(),
            guid: 0,
            kind: new.kind.to_string(),
            snapshots: Vec::new(),
            props: BTreeMap::new(),
            held: BTreeSet::new(),
            bookmarks: Vec::new(),
            resume_token: None,
            encrypted: new.encrypted,
            written: None,
        });
        let after = d.snapshots.last().map_or(0, |s| s.createtxg);
        // (A listing made after the receive may have them already.)
        let created: Vec<&Snapshot> = created
            .iter()
            .filter(|c| !d.snapshots.iter().any(|s| s.guid == c.guid))
            .collect();
        for (txg, s) in (after + 1..).zip(created) {
            d.snapshots.push(Snapshot {
                name: s.name.clone(),
                guid: s.guid,
                createtxg: txg,
            });
        }
        d.resume_token = None;
        d.written = new.written;
        if new.marked {
            d.props
                .insert(REPLICA_PROP.to_string(), format_replica_mark());
        }
    }

    /// Records a rollback of `ds` to its newest snapshot.
    pub fn rolled_back(&self, ds: &DatasetName, written: Option<u64>) {
        let mut cache = lock(&self.cache);
        self.touch([ds]);
        if let Some(d) = cache.get_mut(ds) {
            d.written = written;
        }
    }

    /// Records that these snapshots of `ds` were destroyed.
    pub fn snapshots_destroyed(&self, ds: &DatasetName, names: &[SnapName]) {
        let mut cache = lock(&self.cache);
        self.touch([ds]);
        if let Some(d) = cache.get_mut(ds) {
            d.snapshots.retain(|s| !names.contains(&s.name));
            d.held.retain(|h| !names.iter().any(|n| n.as_str() == h));
        }
    }

    /// Records the receiver's hold moving: `held` is held now, `released`
    /// are not any more.
    pub fn holds_moved(&self, ds: &DatasetName, held: Option<&SnapName>, released: &[SnapName]) {
        let mut cache = lock(&self.cache);
        self.touch([ds]);
        if let Some(d) = cache.get_mut(ds) {
            if let Some(h) = held {
                d.held.insert(h.to_string());
            }
            d.held.retain(|h| !released.iter().any(|r| r.as_str() == h));
        }
    }

    /// `ds` needs its marks set (batched); true when the batch is full
    /// and should be set now.
    pub fn mark_later(&self, ds: &DatasetName) -> bool {
        let mut p = lock(&self.pending_marks);
        p.insert(ds.clone());
        self.soon(p.len())
    }

    /// Asks the background flusher (see [`Target::flush_soon`]) to set a
    /// batch of `pending` while receives go on; true when the batch is
    /// full and the caller sets it now.
    fn soon(&self, pending: usize) -> bool {
        if pending >= FLUSH_SOON {
            self.flush_soon.notify_one();
        }
        pending >= PENDING_MAX
    }

    /// `ds`'s hold is to move to its newest snapshot (batched); true when
    /// the batch is full.
    pub fn hold_later(&self, ds: &DatasetName) -> bool {
        let mut p = lock(&self.pending_holds);
        p.insert(ds.clone());
        self.soon(p.len())
    }

    /// The pending marks, taken.
    pub fn take_pending_marks(&self) -> Vec<DatasetName> {
        std::mem::take(&mut *lock(&self.pending_marks))
            .into_iter()
            .collect()
    }

    /// The pending holds, taken.
    pub fn take_pending_holds(&self) -> Vec<DatasetName> {
        std::mem::take(&mut *lock(&self.pending_holds))
            .into_iter()
            .collect()
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
        for pending in [&self.pending_marks, &self.pending_holds] {
            let mut p = lock(pending);
            let moved: Vec<DatasetName> = p
                .iter()
                .filter(|k| *k == from || k.relative_to(from).is_some())
                .cloned()
                .collect();
            for old in moved {
                p.remove(&old);
                if let Some(new) = old.relative_to(from).and_then(|r| to.join(&r).ok()) {
                    p.insert(new);
                }
            }
        }
        let mut cache = lock(&self.cache);
        let moved: Vec<DatasetName> = cache
            .keys()
            .filter(|k| *k == from || k.relative_to(from).is_some())
            .cloned()
            .collect();
        for old in moved {
            self.touch([&old]);
            if let (Some(mut d), Some(rel)) = (cache.remove(&old), old.relative_to(from)) {
                if let Ok(new) = to.join(&rel) {
                    self.touch([&new]);
                    d.name = new.clone();
                    cache.insert(new, d);
                }
            }
        }
    }

    /// Records that `ds` and everything below it are gone.
    pub fn destroyed(&self, ds: &DatasetName) {
        let gone = |k: &DatasetName| k == ds || k.relative_to(ds).is_some();
        let mut cache = lock(&self.cache);
        self.touch(cache.keys().filter(|k| gone(k)));
        cache.retain(|k, _| !gone(k));
        drop(cache);
        lock(&self.pending_marks).retain(|k| !gone(k));
        lock(&self.pending_holds).retain(|k| !gone(k));
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

    /// Is a connection working on `rel` now? (A peek: nothing is locked.)
    pub fn is_busy(&self, rel: &RelPath) -> bool {
        lock(&self.busy).contains(rel)
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

    /// ST: what the receiver records while a listing is under way (here a
    /// receive into one dataset, a new one, a destroy) wins over the
    /// listing, which read the tree before.
    #[tokio::test]
    async fn changes_made_during_a_listing_survive_it() {
        use zfsync_common::zfs::fake::FakeZfs;
        let fake = FakeZfs::zfs_fuse();
        fake.create_pool("p");
        for d in ["p/t", "p/t/a", "p/t/gone"] {
            fake.create(d);
        }
        let s1 = fake.snapshot("p/t/a", "s1");
        let t = Target::new(ds("p/t"), std::sync::Arc::new(fake.clone()), true);
        t.relist().await.unwrap();
        fake.delay_listings(std::time::Duration::from_millis(200));
        let listing = t.relist();
        let change = async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let s2 = crate::testing::snap("s2", s1.guid + 1, 0);
            let new = NewDataset {
                kind: "filesystem",
                encrypted: false,
                marked: false,
                written: None,
            };
            t.received(&ds("p/t/a"), new, std::slice::from_ref(&s2));
            t.received(&ds("p/t/b"), new, std::slice::from_ref(&s2));
            t.destroyed(&ds("p/t/gone"));
        };
        let (listed, ()) = tokio::join!(listing, change);
        listed.unwrap();
        let names = |d: &str| -> Vec<String> {
            t.get(&ds(d))
                .map(|d| d.snapshots.iter().map(|s| s.name.to_string()).collect())
                .unwrap_or_default()
        };
        assert_eq!(names("p/t/a"), ["s1", "s2"]);
        assert_eq!(names("p/t/b"), ["s2"]);
        assert!(!t.exists(&ds("p/t/gone")));
        // Once no listing is under way, a new one is the truth again.
        fake.delay_listings(std::time::Duration::ZERO);
        t.relist().await.unwrap();
        assert_eq!(names("p/t/a"), ["s1"]);
        assert!(!t.exists(&ds("p/t/b")));
        assert!(t.exists(&ds("p/t/gone")));
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

    /// ST1: a receive updates the cache from the stream: the sender's
    /// names and GUIDs, order keys above the newest; a new dataset with
    /// GUID 0; `written` 0 where zfs has it.
    #[test]
    fn a_receive_updates_the_cache_without_a_listing() {
        use crate::testing::{dataset, snap};
        let mut a = dataset("p/t/a");
        a.snapshots = vec![snap("s1", 11, 500)];
        a.written = Some(4096);
        let t = crate::testing::target_of([a]);
        let new = |marked| NewDataset {
            kind: "filesystem",
            encrypted: false,
            marked,
            written: Some(0),
        };
        // The sender's createtxgs (101, 102) are not kept.
        t.received(
            &ds("p/t/a"),
            new(false),
            &[snap("s2", 12, 101), snap("s3", 13, 102)],
        );
        let a = t.get(&ds("p/t/a")).unwrap();
        let got: Vec<_> = (a.snapshots.iter())
            .map(|s| (s.name.to_string(), s.guid, s.createtxg))
            .collect();
        assert_eq!(
            got,
            [
                ("s1".into(), 11, 500),
                ("s2".into(), 12, 501),
                ("s3".into(), 13, 502)
            ]
        );
        assert_eq!(a.written, Some(0));
        assert!(!is_replica(&a), "an existing dataset keeps its props");
        t.received(
            &ds("p/t/b"),
            NewDataset {
                kind: "volume",
                ..new(true)
            },
            &[snap("s1", 21, 7)],
        );
        let b = t.get(&ds("p/t/b")).unwrap();
        assert_eq!(
            (b.guid, b.kind.as_str(), b.snapshots[0].createtxg),
            (0, "volume", 1)
        );
        assert!(is_replica(&b));
        t.snapshots_destroyed(&ds("p/t/a"), &[SnapName::new("s2").unwrap()]);
        assert_eq!(t.get(&ds("p/t/a")).unwrap().snapshots.len(), 2);
    }

    /// The mark counts where it is set (the listing drops inherited
    /// values): the constant, or an old mark that is the dataset's GUID.
    #[test]
    fn replica_marks_new_and_old() {
        use crate::testing::dataset;
        let with = |v: &str| {
            let mut d = dataset("p/t/a");
            d.guid = 77;
            d.props.insert(REPLICA_PROP.into(), v.into());
            d
        };
        assert!(is_replica(&with("yes")));
        assert!(is_replica(&with("77")));
        assert!(!is_replica(&with("78")));
        assert!(!is_replica(&with("0")));
        assert!(!is_replica(&with("no")));
        assert!(!is_replica(&dataset("p/t/a")));
    }

    /// Pending marks and holds follow renames and vanish with a destroy;
    /// a full batch says so.
    #[test]
    fn pending_marks_follow_renames_and_destroys() {
        let t = target_with(&[]);
        assert!(!t.mark_later(&ds("p/t.zfsyncbuffer/2F61")));
        assert!(!t.mark_later(&ds("p/t.zfsyncbuffer/2F61/x")));
        assert!(!t.hold_later(&ds("p/t/gone")));
        t.renamed(&ds("p/t.zfsyncbuffer/2F61"), &ds("p/t/a"));
        t.destroyed(&ds("p/t/gone"));
        assert_eq!(t.take_pending_marks(), [ds("p/t/a"), ds("p/t/a/x")]);
        assert!(t.take_pending_holds().is_empty());
        assert!(t.take_pending_marks().is_empty(), "taken");
        for i in 1..PENDING_MAX {
            assert!(!t.mark_later(&ds(&format!("p/t/d{i}"))));
        }
        assert!(t.mark_later(&ds("p/t/last")), "the batch is full");
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
    fn a_run_is_listed_once_and_new_runs_at_a_bounded_rate() {
        let mut l = Listings::default();
        let t0 = Instant::now();
        assert!(l.wants_listing("a", t0));
        l.listed = true;
        assert!(!l.wants_listing("a", t0), "the same run twice");
        // Runs taking turns do not list again.
        assert!(l.wants_listing("b", t0));
        assert!(!l.wants_listing("a", t0) && !l.wants_listing("b", t0));
        // New run ids beyond the rate work from the cache, and stay there.
        for i in 2..RELISTS_PER_MINUTE {
            assert!(l.wants_listing(&format!("r{i}"), t0));
        }
        assert!(!l.wants_listing("late", t0));
        assert!(!l.wants_listing("late", t0 + Duration::from_secs(61)));
        // A minute later new runs are listed again.
        assert!(l.wants_listing("next", t0 + Duration::from_secs(61)));
        // A failed listing is tried again by the run's next connection.
        l.failed("next");
        assert!(l.wants_listing("next", t0 + Duration::from_secs(62)));
    }

    #[test]
    fn the_first_listing_is_never_rate_limited() {
        let mut l = Listings::default();
        let t0 = Instant::now();
        for i in 0..RELISTS_PER_MINUTE {
            assert!(l.wants_listing(&format!("r{i}"), t0));
            l.failed(&format!("r{i}"));
        }
        assert!(l.wants_listing("r0", t0), "nothing was listed yet");
    }

    #[test]
    fn reservations_share_the_budget_and_give_it_back() {
        let b = MemoryBudget::new(100);
        let mut a = b.try_reserve(60).unwrap();
        assert!(b.try_reserve(41).is_none());
        let c = b.try_reserve(40).unwrap();
        assert_eq!(b.used(), 100);
        assert!(!a.try_resize(61), "grows only into free room");
        assert!(a.try_resize(10) && b.used() == 50);
        drop(c);
        assert!(a.try_resize(100));
        let mut part = a.split_off(30);
        assert_eq!((a.bytes(), part.bytes(), b.used()), (70, 30, 100));
        part.merge(a);
        assert_eq!((part.bytes(), b.used()), (100, 100));
        drop(part);
        assert_eq!(b.used(), 0);
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
