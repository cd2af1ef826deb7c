//! The dataset a connection is working on, from `Sync` to `Finish`.
//!
//! Invariants: an [`Open`] exists only for a validated path and holds that
//! path's lock for as long as it lives; `announced` and `bookmarks` are the
//! sender's validated lists, oldest first.

use zfsync_common::naming::{DatasetName, RelPath};
use zfsync_common::zfs::Snapshot;

use crate::state::DatasetLock;

/// How a dataset's streams are being received.
#[derive(Debug)]
pub(crate) enum Mode {
    /// Straight into `dest` (in place or in the buffer).
    Direct,
    /// Into a temporary dataset that replaces `replaces` once whole.
    Replace { replaces: DatasetName },
    /// A full stream with `-F` into a pool's root without snapshots
    /// (`--full`), when that one stream is the whole new copy (the sender
    /// has a single snapshot): zfs swaps it in only once it is complete.
    /// Any other dataset without snapshots is replaced ([`Mode::Replace`];
    /// a pool's root from the whole copy, `replace::commit_into_root`).
    Overwrite,
}

/// The dataset in progress.
pub(crate) struct Open {
    pub(crate) rel: RelPath,
    /// Keeps other connections off this dataset until `Finish` (or until
    /// the connection abandons it).
    pub(crate) _lock: DatasetLock,
    pub(crate) dest: DatasetName,
    pub(crate) buffered: bool,
    pub(crate) mode: Mode,
    /// The sender's snapshots: a stream may only announce one of these.
    pub(crate) announced: Vec<Snapshot>,
    /// The sender's bookmarks: possible bases.
    pub(crate) bookmarks: Vec<Snapshot>,
    /// A cut transfer's state was offered for resuming (`Resume`).
    pub(crate) resume_offered: bool,
}
