//! What zfsync knows of datasets and snapshots: plain data, shared by the
//! planner, the protocol and both ends. No I/O here.

use std::collections::BTreeMap;

use crate::naming::{DatasetName, SnapName};

/// One snapshot as the planner and the protocol see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub name: SnapName,
    pub guid: u64,
    pub createtxg: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    pub name: DatasetName,
    pub guid: u64,
    /// `filesystem` or `volume`.
    pub kind: String,
    /// Sorted oldest first (by createtxg).
    pub snapshots: Vec<Snapshot>,
    /// User properties (`module:name`) that were asked for and are set.
    pub props: BTreeMap<String, String>,
    /// Snapshots with holds (`userrefs` > 0), when `userrefs` was asked for.
    pub held: std::collections::BTreeSet<String>,
    /// Bookmarks (OpenZFS), oldest first; `name` is the part after `#`.
    pub bookmarks: Vec<Snapshot>,
    /// `receive_resume_token`: a cut `zfs receive -s` left partial state.
    pub resume_token: Option<String>,
    /// `encryption` is on (OpenZFS): sent raw (`-w`) or not at all.
    pub encrypted: bool,
    /// `written`: bytes written since the newest snapshot, where zfs has
    /// the property (OpenZFS) and it was listed; `None` otherwise.
    pub written: Option<u64>,
}

impl Dataset {
    pub fn newest(&self) -> Option<&Snapshot> {
        self.snapshots.last()
    }
}

/// A listed tree of datasets with their snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    pub datasets: BTreeMap<DatasetName, Dataset>,
    /// Names zfsync cannot handle (for example with a space), with why.
    pub skipped: Vec<(String, String)>,
}
