//! Helpers for the unit tests: a [`Target`] whose cache is filled by hand,
//! so that the phases' pure decisions are tested without `zfs`.

use std::sync::Arc;

use zfsync_common::naming::{DatasetName, SnapName};
use zfsync_common::zfs::{Dataset, Snapshot, Zfs};

use crate::state::Target;

pub(crate) fn ds(s: &str) -> DatasetName {
    DatasetName::new(s).unwrap()
}

pub(crate) fn snap(name: &str, guid: u64, createtxg: u64) -> Snapshot {
    Snapshot {
        name: SnapName::new(name).unwrap(),
        guid,
        createtxg,
    }
}

pub(crate) fn dataset(name: &str) -> Dataset {
    Dataset {
        name: ds(name),
        guid: 1,
        kind: "filesystem".into(),
        snapshots: Vec::new(),
        props: Default::default(),
        held: Default::default(),
        bookmarks: Vec::new(),
        resume_token: None,
        encrypted: false,
        written: None,
    }
}

/// A target `p/t` (mirrored retention on) whose cache holds `datasets`.
/// Its backend is the real `zfs` command, never probed: a test that makes
/// it run `zfs` is a wrong test.
pub(crate) fn target_of(datasets: impl IntoIterator<Item = Dataset>) -> Target {
    let t = Target::new(ds("p/t"), Arc::new(Zfs::default()), true);
    t.cache_for_tests(datasets);
    t
}

/// [`target_of`] with snapshot-less datasets of these names.
pub(crate) fn target_with(names: &[&str]) -> Target {
    target_of(names.iter().map(|n| dataset(n)))
}
