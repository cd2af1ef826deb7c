//! The `zfs` layer: the only code in zfsync that spawns `zfs` or reads its
//! output.
//!
//! [`ZfsBackend`] is what the sender and the receiver see: one method per
//! verb. [`Zfs`] implements it by running the `zfs` command (argv built by
//! the pure functions in [`argv`], output parsed by [`parse`], failures
//! classified into [`ZfsError`] by [`error`]); an in-memory stand-in,
//! `fake::FakeZfs`, implements it for tests (feature `testing`). The same
//! calls work on zfs-fuse and on OpenZFS 2.x: listings use `zfs get -H -p
//! -r`, which both have (zfs-fuse has no `zfs list -p`).

pub mod argv;
pub mod child;
pub mod cli;
pub mod error;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod parse;

use std::sync::Arc;

use async_trait::async_trait;

pub use crate::model::{Dataset, Snapshot, Tree};
pub use argv::{ListExtras, RecvOption, RecvSpec, SendFrom, SendWhat};
pub use child::{ChildReader, ChildWriter, ZfsChild};
pub use cli::{Zfs, DEFAULT_TIMEOUT};
pub use error::{ZfsError, BUSY_TRIES};
pub use parse::{parse_get, parse_resume_info, ResumeInfo};

use crate::caps::Caps;
use crate::naming::{DatasetName, SnapshotName};

/// Every `zfs` verb zfsync uses. Implemented by [`Zfs`] (the command) and,
/// for tests, by `fake::FakeZfs` (an in-memory tree).
#[async_trait]
pub trait ZfsBackend: Send + Sync + std::fmt::Debug {
    /// Finds out what this zfs can do and remembers it (see
    /// [`crate::caps`]); harmless.
    async fn probe(&self) -> Result<Caps, ZfsError>;
    /// What [`ZfsBackend::probe`] found; nothing before it.
    fn caps(&self) -> Caps;
    /// How long a call may run (`--zfs-timeout`); also how long a running
    /// `zfs receive` may take its input or take to exit after it.
    fn call_timeout(&self) -> std::time::Duration {
        DEFAULT_TIMEOUT
    }

    /// Lists whole trees (datasets, snapshots, and bookmarks where zfs has
    /// them) with the given user properties, in one call. Roots that do
    /// not exist are absent from the result. `depth`: `Some(1)` lists only
    /// the roots themselves.
    async fn list(
        &self,
        roots: &[&DatasetName],
        depth: Option<u32>,
        user_props: &[&str],
    ) -> Result<Tree, ZfsError>;

    /// `zfs create -o mountpoint=none ds`.
    async fn create_unmounted(&self, ds: &DatasetName) -> Result<(), ZfsError>;
    /// `zfs rename`, retrying "dataset is busy" a bounded number of times.
    async fn rename(&self, from: &DatasetName, to: &DatasetName) -> Result<(), ZfsError>;
    /// `zfs destroy -r`, with the same busy handling as `rename`.
    async fn destroy_recursive(&self, ds: &DatasetName) -> Result<(), ZfsError>;
    /// `zfs destroy` without `-r`: zfs refuses if `ds` has children or
    /// snapshots.
    async fn destroy_empty(&self, ds: &DatasetName) -> Result<(), ZfsError>;
    async fn unmount(&self, ds: &DatasetName) -> Result<(), ZfsError>;
    /// `zfs rollback snap`, never `-r`: refused when newer snapshots exist.
    async fn rollback(&self, snap: &SnapshotName) -> Result<(), ZfsError>;
    /// One property on many datasets in one call.
    async fn set_many(
        &self,
        datasets: &[DatasetName],
        prop: &str,
        value: &str,
    ) -> Result<(), ZfsError>;
    /// `zfs snapshot -r root@name`: one atomic snapshot of the whole tree.
    async fn snapshot_recursive(&self, snap: &SnapshotName) -> Result<(), ZfsError>;
    /// Destroys one snapshot (`recursive`: that name in every descendant
    /// too). Never a dataset: the name carries `@`.
    async fn destroy_snapshot(&self, snap: &SnapshotName, recursive: bool) -> Result<(), ZfsError>;
    /// `zfs hold TAG snap...`
    async fn hold(&self, tag: &str, snaps: &[SnapshotName]) -> Result<(), ZfsError>;
    /// `zfs release TAG snap...`
    async fn release(&self, tag: &str, snaps: &[SnapshotName]) -> Result<(), ZfsError>;
    /// Releases the hold `tag` on every snapshot under `root` that has it
    /// (before zfsync destroys a tree it made); nothing where holds cannot
    /// be listed.
    async fn release_tag_under(&self, tag: &str, root: &DatasetName) -> Result<(), ZfsError>;
    /// `zfs bookmark ds@snap ds#name`.
    async fn bookmark(&self, snap: &SnapshotName, name: &str) -> Result<(), ZfsError>;
    /// `zfs destroy ds#name`.
    async fn destroy_bookmark(&self, ds: &DatasetName, name: &str) -> Result<(), ZfsError>;

    /// Starts `zfs send`; read the stream from [`ZfsChild::take_stdout`].
    fn spawn_send(&self, what: &SendWhat, flags: &[&str]) -> Result<ZfsChild, ZfsError>;
    /// Starts `zfs receive`; write the stream to [`ZfsChild::take_stdin`].
    fn spawn_receive(&self, dest: &DatasetName, spec: &RecvSpec) -> Result<ZfsChild, ZfsError>;
    /// What a resume token continues, and whether its snapshot is still
    /// here ([`ZfsError::ResumeTokenStale`] if not). Sends nothing.
    async fn resume_info(&self, token: &str) -> Result<ResumeInfo, ZfsError>;
    /// `zfs receive -A dest`: discards a cut resumable receive.
    async fn abort_resumable(&self, dest: &DatasetName) -> Result<(), ZfsError>;

    /// `zfs set PROP=VALUE ds`.
    async fn set(&self, ds: &DatasetName, prop: &str, value: &str) -> Result<(), ZfsError> {
        self.set_many(std::slice::from_ref(ds), prop, value).await
    }

    /// Whole trees (datasets and snapshots) in one call.
    async fn list_trees(&self, roots: &[&DatasetName]) -> Result<Tree, ZfsError> {
        self.list(roots, None, &[]).await
    }

    /// [`ZfsBackend::list_trees`] with user properties, still one call.
    async fn list_trees_with(
        &self,
        roots: &[&DatasetName],
        user_props: &[&str],
    ) -> Result<Tree, ZfsError> {
        self.list(roots, None, user_props).await
    }

    /// One dataset and its snapshots; `None` if it does not exist.
    async fn list_dataset(&self, ds: &DatasetName) -> Result<Option<Dataset>, ZfsError> {
        let mut tree = self.list(&[ds], Some(1), &[]).await?;
        Ok(tree.datasets.remove(ds))
    }
}

/// A backend shared by every task of a process.
pub type Backend = Arc<dyn ZfsBackend>;
