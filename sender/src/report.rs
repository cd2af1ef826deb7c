//! What a run did: each dataset's [`Outcome`], what retention did, and the
//! whole [`Report`] with its exit status. Plain data, shared by the run,
//! [`crate::retention`] and [`mod@crate::summary`] (which import this module,
//! never each other).

use std::time::Duration;

use zfsync_common::client::CleanReport;
use zfsync_common::naming::{DatasetName, SnapClass};

use crate::exit;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendKind {
    /// The receiver had no such dataset.
    Full,
    Incremental,
    /// `--full` replaced the receiver's copy.
    Replaced,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    UpToDate {
        snapshot: String,
    },
    Sent {
        kind: SendKind,
        from: Option<String>,
        to: String,
        snapshots: usize,
        /// The streams' bytes.
        bytes: u64,
        /// Their bytes on the wire: fewer with `--compress`, else the same.
        wire: u64,
        /// Received into the buffer; `placed` once cleanbuffer moved it.
        buffered: bool,
        placed: bool,
        /// Snapshots the receiver destroyed to mirror retention.
        mirrored: usize,
    },
    /// `--dry-run`: what would be done.
    Planned {
        what: String,
    },
    NoSnapshots,
    Failed {
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub dataset: DatasetName,
    pub status: Status,
}

impl Outcome {
    pub fn failed(&self) -> bool {
        matches!(self.status, Status::Failed { .. })
    }
}

/// Why a dataset was not attempted: the run was stopped first.
pub(crate) const NOT_ATTEMPTED_STOPPED: &str = "not attempted: the run was stopped";
/// Why a dataset was not attempted: no worker could reach the receiver.
pub(crate) const NOT_ATTEMPTED_NO_CONNECTION: &str =
    "not attempted: lost every connection to the receiver";

/// What became of `--delete-missing`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Delete {
    #[default]
    NotAsked,
    /// Asked for, but a dataset failed: nothing was deleted.
    Skipped,
    Done,
}

/// What retention did (or, in a dry run, would do).
#[derive(Clone, Debug, Default)]
pub struct Retention {
    pub class: Option<SnapClass>,
    pub keep: Option<usize>,
    /// Pruning was asked for (`--keep`) but not done: the run was stopped.
    pub pruning_skipped: bool,
    /// `dataset@snapshot`, destroyed (or, in a dry run, to be destroyed).
    pub pruned: Vec<String>,
    /// Kept against the count: the last snapshot the receiver confirmed.
    pub held_back: Vec<String>,
    /// Kept against the count: someone holds it (`zfs hold`).
    pub held: Vec<String>,
    /// Kept against the count: newer than the last confirmed snapshot (the
    /// receiver may have it from a run that was cut); pruned once confirmed.
    pub unconfirmed: Vec<String>,
    /// Kept against the count: of a dataset the receiver was sent and never
    /// confirmed (or whose confirmed snapshot is gone): a cut first sync
    /// may have left any snapshot there.
    pub never_confirmed: Vec<String>,
    /// Kept against the count: another receiver of the registry may hold it
    /// unconfirmed (its confirmed base or newer).
    pub for_others: Vec<String>,
    /// Those other receivers, by id.
    pub other_receivers: std::collections::BTreeSet<String>,
    /// Datasets whose confirmation moved in this run.
    pub confirmed: usize,
    /// Confirmations, the registry or pruning that failed, and pruning that
    /// a failed hold blocked: the run exits 1.
    pub errors: Vec<String>,
    /// Holds that could not be placed or released (zfs without holds, or
    /// no permission): the base is then protected by the property alone.
    pub warnings: Vec<String>,
}

/// The result of a run.
#[derive(Default)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
    pub elapsed: Duration,
    pub dry_run: bool,
    /// The snapshot this run took.
    pub snapshot: Option<String>,
    pub retention: Retention,
    /// The receiver's end-of-run report (orphans, deletions).
    pub clean: CleanReport,
    /// Snapshots the receiver destroyed to mirror retention.
    pub mirrored: usize,
    /// Set when the receiver could not be reached at all.
    pub unreachable: Option<String>,
    pub delete: Delete,
    /// The run was stopped (shutdown token, SIGTERM/SIGINT) before it was
    /// done: cleanbuffer and pruning did not run.
    pub stopped: bool,
}

impl Report {
    pub fn exit_code(&self) -> u8 {
        if self.unreachable.is_some() {
            exit::UNREACHABLE
        } else if self.stopped
            || self.outcomes.iter().any(Outcome::failed)
            || !self.retention.errors.is_empty()
            || self.clean.delete_failures().next().is_some()
        {
            exit::FAILED
        } else {
            exit::OK
        }
    }
}

/// Lists at most this many names per line of the closing summary.
const LIST: usize = 10;

/// `a, b, c and 4 more`: names for one line of the summary.
pub(crate) fn listed(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(LIST)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > LIST {
        s.push_str(&format!(" and {} more", names.len() - LIST));
    }
    s
}

/// 1536 -> "1.5 KiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// What compression made of `bytes`: "1.2 MiB on the wire, ratio 3.41".
pub fn on_the_wire(bytes: u64, wire: u64) -> String {
    format!(
        "{} on the wire, ratio {:.2}",
        human_bytes(wire),
        bytes as f64 / wire.max(1) as f64
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        assert_eq!(
            on_the_wire(3 << 20, 1 << 20),
            "1.0 MiB on the wire, ratio 3.00"
        );
    }

    fn outcome(status: Status) -> Outcome {
        Outcome {
            dataset: DatasetName::new("p/a").unwrap(),
            status,
        }
    }

    #[test]
    fn exit_codes() {
        let up = || {
            outcome(Status::UpToDate {
                snapshot: "s1".into(),
            })
        };
        let failed = || outcome(Status::Failed { reason: "x".into() });
        let cases: Vec<(&str, Report, u8)> = vec![
            ("empty", Report::default(), exit::OK),
            (
                "in sync",
                Report {
                    outcomes: vec![up()],
                    ..Report::default()
                },
                exit::OK,
            ),
            (
                "a dataset failed",
                Report {
                    outcomes: vec![up(), failed()],
                    ..Report::default()
                },
                exit::FAILED,
            ),
            (
                "retention error",
                Report {
                    outcomes: vec![up()],
                    retention: Retention {
                        errors: vec!["e".into()],
                        ..Retention::default()
                    },
                    ..Report::default()
                },
                exit::FAILED,
            ),
            (
                "stopped after every dataset",
                Report {
                    outcomes: vec![up()],
                    stopped: true,
                    ..Report::default()
                },
                exit::FAILED,
            ),
            (
                "unreachable wins",
                Report {
                    outcomes: vec![failed()],
                    unreachable: Some("no".into()),
                    stopped: true,
                    ..Report::default()
                },
                exit::UNREACHABLE,
            ),
        ];
        for (what, report, code) in cases {
            assert_eq!(report.exit_code(), code, "{what}");
        }
    }
}
