//! zfsync-send: lists the source tree once, then N workers (one TLS
//! connection each, reused for many datasets) take datasets parent-first
//! from one queue, negotiate with the receiver and stream `zfs send`.
//! After all datasets, one connection asks the receiver to place what it
//! buffered.
//!
//! [`run()`] (run.rs) is one run from start to report; `plan` asks the
//! receiver about the whole tree at once; `worker` holds the
//! queue and the worker loop; `dataset` syncs one dataset; `stream` pipes
//! one `zfs send`; [`report`] is what happened (used by [`retention`] and
//! [`mod@summary`]); [`registry`] names the receivers of the tree, whose
//! unconfirmed snapshots [`retention`] keeps; [`error`] has the typed
//! failures.

pub mod cli;
mod dataset;
pub mod error;
mod plan;
pub mod registry;
pub mod report;
pub mod retention;
mod run;
mod stream;
pub mod summary;
mod worker;

use zfsync_common::client::ClientOptions;
use zfsync_common::naming::{DatasetName, SnapClass};
use zfsync_common::zfs::Backend;

pub use error::{Class, DatasetError, SendError, StreamFailure};
pub use report::{human_bytes, Delete, Outcome, Report, Retention, SendKind, Status};
pub use run::run;
pub use summary::report_text as summary;

/// Exit statuses (documented in README).
pub mod exit {
    /// Every dataset is in sync.
    pub const OK: u8 = 0;
    /// One or more datasets failed, or the run was stopped (SIGTERM,
    /// SIGINT) before the end; the others were synced.
    pub const FAILED: u8 = 1;
    /// Bad command line or configuration; nothing was done.
    pub const USAGE: u8 = 2;
    /// The receiver could not be reached or refused this sender.
    pub const UNREACHABLE: u8 = 3;
}

pub struct Options {
    pub source: DatasetName,
    pub zfs: Backend,
    pub client: ClientOptions,
    pub threads: usize,
    pub allow_full: bool,
    /// Take `SOURCE@<stamp>_<class>` (recursive) before the run.
    pub snapshot: Option<(SnapClass, String)>,
    /// Keep this many tool snapshots of the snapshot's class.
    pub keep: Option<usize>,
    /// Report what would be done; change nothing on either side.
    pub dry_run: bool,
    /// Destroy replicas on the receiver whose source is gone.
    pub delete_missing: bool,
    /// This receiver's name in the confirmation property and hold tag.
    pub receiver_id: String,
}

#[cfg(test)]
mod spawnable {
    /// A library caller can `tokio::spawn` a run: its future is `Send` and
    /// `'static` given owned options.
    #[allow(dead_code)]
    fn run_future_is_spawnable(opts: crate::Options, token: tokio_util::sync::CancellationToken) {
        fn spawnable<F: std::future::Future + Send + 'static>(_: F) {}
        spawnable(crate::run(opts, token));
    }
}
