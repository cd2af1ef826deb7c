//! [`FakeZfs`]: an in-memory [`ZfsBackend`](super::ZfsBackend) for the in-process test tier
//! (feature `testing`). It follows real ZFS (zfs-fuse and OpenZFS) wherever
//! zfsync depends on it: the same rules for receive, rollback, rename,
//! destroy and holds, the same error texts, classified by the same
//! [`ZfsError::from_failure`](super::ZfsError::from_failure). Streams are real `dmu_replay_record_t`
//! framing that [`crate::stream::check_head`] accepts (see `fake/stream.rs`).
//!
//! Set-up helpers take `&str` names and panic on a broken set-up; backend
//! calls are recorded ([`FakeZfs::calls`]) as `zfs` argv without `zfs`.
//! Faults can be injected per verb ([`FakeZfs::fail`]).

mod backend;
mod state;
mod stream;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use self::state::{Fault, Snap, State};
use super::ResumeInfo;
use crate::caps::{Cap, Caps};
use crate::model::{Dataset, Snapshot};
use crate::naming::{DatasetName, SnapName, SnapshotName};

/// GUIDs are unique across every `FakeZfs` of the process (a stream's
/// GUIDs travel from one to another, as between real pools).
static GUIDS: AtomicU64 = AtomicU64::new(0);

fn new_guid() -> u64 {
    0x1000_0000_0000 + GUIDS.fetch_add(1, Ordering::Relaxed) * 7919
}

/// An injected failure ([`FakeZfs::fail`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeError {
    /// [`ZfsError::Busy`](super::ZfsError::Busy), as if every retry had been used.
    Busy,
    /// [`ZfsError::DoesNotExist`](super::ZfsError::DoesNotExist) for the argument that matched.
    DoesNotExist,
    /// This stderr text, classified by [`ZfsError::from_failure`](super::ZfsError::from_failure) (so
    /// `"cannot receive: stream has unsupported feature, feature flags =
    /// 4"` is [`ZfsError::UnsupportedStreamFeature`](super::ZfsError::UnsupportedStreamFeature)).
    Other(String),
}

/// Forgets a running receive when its task ends or is aborted.
struct Receiving(FakeZfs, DatasetName);

impl Drop for Receiving {
    fn drop(&mut self) {
        let mut st = self.0.st();
        if let Some(n) = st.receiving.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                st.receiving.remove(&self.1);
            }
        }
    }
}

/// An in-memory ZFS: pools, datasets, snapshots, holds and bookmarks, with
/// real `zfs`'s rules and errors. Clones share the state.
#[derive(Clone, Debug)]
pub struct FakeZfs {
    state: Arc<Mutex<State>>,
}

fn ds(name: &str) -> DatasetName {
    DatasetName::new(name).unwrap_or_else(|e| panic!("{name:?}: {e}"))
}

impl FakeZfs {
    /// An empty ZFS (no pools) with these capabilities; they decide, as
    /// on a real `zfs`, which options and verbs work (`receive -u` needs
    /// [`Cap::RecvUnmounted`], `hold` [`Cap::Holds`], bookmarks
    /// [`Cap::Bookmarks`], ...) and what a listing shows.
    pub fn new(caps: Caps) -> FakeZfs {
        let state = State {
            caps,
            ..State::default()
        };
        FakeZfs {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// What zfs-fuse can do: `receive -u` and `hold`/`release`, no more.
    pub fn zfs_fuse() -> FakeZfs {
        FakeZfs::new(Caps::new(
            "zfs-fuse or older (no `zfs version`)",
            [Cap::RecvUnmounted, Cap::Holds],
        ))
    }

    /// OpenZFS 2.x: every capability.
    pub fn openzfs() -> FakeZfs {
        FakeZfs::new(Caps::all("zfs-2.1.11-1"))
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn create_pool(&self, name: &str) {
        let name = ds(name);
        assert!(name.is_pool_root(), "{name} is not a pool name");
        self.st()
            .create("zpool create", &name, true)
            .expect("create_pool");
    }

    /// `zfs create ds` (the parent must exist).
    pub fn create(&self, name: &str) {
        self.st()
            .create("zfs create", &ds(name), false)
            .expect("create");
    }

    /// `zfs snapshot ds@snap` of one dataset.
    pub fn snapshot(&self, name: &str, snap: &str) -> Snapshot {
        let mut st = self.st();
        let createtxg = st.tick();
        let d = st.ds.get_mut(&ds(name)).expect("snapshot: no such dataset");
        assert!(d.snap(snap).is_none(), "{name}@{snap} exists");
        let s = Snapshot {
            name: SnapName::new(snap).expect("snapshot name"),
            guid: new_guid(),
            createtxg,
        };
        d.snaps.push(Snap {
            s: s.clone(),
            holds: BTreeSet::new(),
        });
        d.modified = false;
        s
    }

    /// Writes to a dataset: it differs from its newest snapshot now.
    pub fn write(&self, name: &str) {
        let mut st = self.st();
        st.tick();
        st.ds
            .get_mut(&ds(name))
            .expect("write: no such dataset")
            .modified = true;
    }

    /// The dataset as a listing shows it, with every local user property,
    /// every hold, bookmark and resume token whatever the capabilities.
    pub fn dataset(&self, name: &str) -> Option<Dataset> {
        let st = self.st();
        let name = ds(name);
        st.ds.get(&name).map(|d| st.view(&name, d, &[], true))
    }

    /// Every dataset's name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.st().ds.keys().map(|d| d.to_string()).collect()
    }

    /// A dataset's snapshots, oldest first (none if it does not exist).
    pub fn snapshots(&self, name: &str) -> Vec<Snapshot> {
        self.dataset(name).map(|d| d.snapshots).unwrap_or_default()
    }

    /// A property set locally (native or user).
    pub fn prop(&self, name: &str, prop: &str) -> Option<String> {
        self.st().ds.get(&ds(name))?.props.get(prop).cloned()
    }

    /// The tags held on `ds@snap`.
    pub fn holds(&self, snap: &str) -> Vec<String> {
        let s = SnapshotName::new(snap).expect("snapshot name");
        let st = self.st();
        let found = st
            .ds
            .get(&s.dataset())
            .and_then(|d| d.snap(s.snap().as_str()));
        found
            .map(|x| x.holds.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every backend call so far, as `zfs` argv without `zfs` (a listing
    /// is `get -r ROOTS` or `get -d 1 ROOTS`).
    pub fn calls(&self) -> Vec<String> {
        self.st().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.st().calls.clear();
    }

    /// The next `times` calls of `verb` (`rename`, `destroy`, `receive`,
    /// `send`, `rollback`, `hold`, `release`, `set`, `snapshot`, `list`,
    /// ...) whose argv contains `dataset_substring` fail with `error`
    /// and change nothing. A receive fails at close, after reading its
    /// stream; a send writes nothing.
    pub fn fail(&self, verb: &str, dataset_substring: &str, times: usize, error: FakeError) {
        if times > 0 {
            self.st().faults.push(Fault {
                verb: verb.to_string(),
                needle: dataset_substring.to_string(),
                left: times,
                error,
            });
        }
    }

    /// Every receive waits this long after the end of its stream before
    /// applying it; meanwhile its destination is busy for rename, destroy
    /// and rollback.
    pub fn delay_receive(&self, delay: Duration) {
        self.st().delay = Some(delay).filter(|d| !d.is_zero());
    }

    /// Every listing reads the tree at once, then takes this long to
    /// return it (as `zfs get -r` of a large tree does): what changed
    /// meanwhile is not in it.
    pub fn delay_listings(&self, delay: Duration) {
        self.st().list_delay = Some(delay).filter(|d| !d.is_zero());
    }

    /// Sets (or clears) a dataset's `receive_resume_token`, as a cut
    /// `zfs receive -s` would leave it.
    pub fn set_resume_token(&self, name: &str, token: Option<&str>) {
        let mut st = self.st();
        let d = st
            .ds
            .get_mut(&ds(name))
            .expect("set_resume_token: no such dataset");
        d.resume_token = token.map(str::to_string);
    }

    /// Makes `zfs send -t token` (and [`ZfsBackend::resume_info`](super::ZfsBackend::resume_info)) know a
    /// token: what it continues. On the sending side.
    pub fn register_resume_token(&self, token: &str, info: ResumeInfo) {
        self.st().tokens.insert(token.to_string(), info);
    }
}
