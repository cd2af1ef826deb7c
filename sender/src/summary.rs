//! What happened to each dataset, and the summary printed at the end of a
//! run. Pure: rendering is tested without ZFS.

use std::fmt::Write;
use std::time::Duration;

use zfsync_common::naming::DatasetName;

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
        bytes: u64,
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

fn describe(status: &Status) -> String {
    match status {
        Status::UpToDate { snapshot } => format!("up to date (@{snapshot})"),
        Status::Sent {
            kind,
            from,
            to,
            snapshots,
            bytes,
            buffered,
            placed,
            ..
        } => {
            let what = match (kind, from) {
                (SendKind::Incremental, Some(f)) => format!("incremental @{f}..@{to}"),
                (SendKind::Replaced, _) => format!("full (replaced the receiver's copy) ..@{to}"),
                (_, _) => format!("full ..@{to}"),
            };
            let plural = if *snapshots == 1 { "" } else { "s" };
            let mut s = format!(
                "{what}, {snapshots} snapshot{plural}, {}",
                human_bytes(*bytes)
            );
            if *buffered {
                s.push_str(if *placed {
                    ", buffered then placed"
                } else {
                    ", buffered"
                });
            }
            s
        }
        Status::NoSnapshots => {
            "skipped: no snapshots (take one with `zfs snapshot -r`)".to_string()
        }
        Status::Failed { reason } => format!("FAILED: {reason}"),
        Status::Planned { what } => what.clone(),
    }
}

/// The closing summary. Lists every dataset for trees of up to `list_all`
/// datasets; above that, only those that changed or failed.
pub fn render(
    source: &DatasetName,
    receiver: &str,
    outcomes: &[Outcome],
    elapsed: Duration,
    list_all: usize,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "zfsync-send {source} -> {receiver} ({:.1} s)",
        elapsed.as_secs_f64()
    );
    let width = outcomes
        .iter()
        .map(|o| o.dataset.as_str().len())
        .max()
        .unwrap_or(0)
        .min(60);
    let mut hidden = 0;
    for o in outcomes {
        let quiet = matches!(o.status, Status::UpToDate { .. });
        if quiet && outcomes.len() > list_all {
            hidden += 1;
            continue;
        }
        let _ = writeln!(
            out,
            "  {:width$}  {}",
            o.dataset.as_str(),
            describe(&o.status)
        );
    }
    if hidden > 0 {
        let _ = writeln!(out, "  ... and {hidden} more datasets up to date");
    }
    let count = |f: fn(&Status) -> bool| outcomes.iter().filter(|o| f(&o.status)).count();
    let up = count(|s| matches!(s, Status::UpToDate { .. }));
    let sent = count(|s| matches!(s, Status::Sent { .. }));
    let failed = count(|s| matches!(s, Status::Failed { .. }));
    let nosnap = count(|s| matches!(s, Status::NoSnapshots));
    let planned = count(|s| matches!(s, Status::Planned { .. }));
    let (snaps, bytes) = outcomes
        .iter()
        .fold((0usize, 0u64), |(n, b), o| match &o.status {
            Status::Sent {
                snapshots, bytes, ..
            } => (n + snapshots, b + bytes),
            _ => (n, b),
        });
    let mut totals = format!(
        "datasets: {} ({up} up to date, {sent} sent, {failed} failed",
        outcomes.len()
    );
    if planned > 0 {
        let _ = write!(totals, ", {planned} would change");
    }
    if nosnap > 0 {
        let _ = write!(totals, ", {nosnap} without snapshots");
    }
    let _ = writeln!(
        out,
        "{totals}); snapshots sent: {snaps}; bytes sent: {}",
        human_bytes(bytes)
    );
    out
}

/// The closing `result:` line.
pub fn result_line(
    outcomes: &[Outcome],
    dry_run: bool,
    unreachable: Option<&str>,
    retention_errors: usize,
) -> String {
    let failed = outcomes.iter().filter(|o| o.failed()).count();
    if let Some(e) = unreachable {
        return format!("result: receiver unreachable, nothing sent: {e}\n");
    }
    let mut s = if failed > 0 {
        format!("result: {failed} dataset(s) FAILED (see above)")
    } else if dry_run {
        let planned = outcomes
            .iter()
            .filter(|o| matches!(o.status, Status::Planned { .. }))
            .count();
        format!("result: dry run, nothing changed; {planned} dataset(s) would change")
    } else {
        "result: all datasets in sync".to_string()
    };
    if retention_errors > 0 {
        let _ = write!(s, "; {retention_errors} retention error(s) (see above)");
    }
    s.push('\n');
    s
}

/// Lists at most this many names per line of the closing summary.
const LIST: usize = 10;

fn listed(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(LIST)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > LIST {
        let _ = write!(s, " and {} more", names.len() - LIST);
    }
    s
}

/// Retention, mirrored retention and orphans, after the dataset lines.
/// What became of `--delete-missing`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Delete {
    #[default]
    NotAsked,
    /// Asked for, but a dataset failed: nothing was deleted.
    Skipped,
    Done,
}

pub fn render_after(
    r: &crate::retention::Retention,
    mirrored: usize,
    clean: &zfsync_common::client::CleanReport,
    dry_run: bool,
    delete: Delete,
) -> String {
    let mut out = String::new();
    if let (Some(class), Some(keep)) = (r.class, r.keep) {
        let verb = if dry_run { "would prune" } else { "pruned" };
        let _ = write!(
            out,
            "retention (class {}, keep {keep}): {verb} {} snapshot(s)",
            class.letter(),
            r.pruned.len()
        );
        if !r.pruned.is_empty() {
            let _ = write!(out, ": {}", listed(&r.pruned));
        }
        out.push('\n');
        if !r.held_back.is_empty() {
            let _ = writeln!(
                out,
                "retention held back (the last snapshot the receiver confirmed, the next incremental's base): {}",
                listed(&r.held_back)
            );
        }
    }
    if !r.held.is_empty() {
        let _ = writeln!(
            out,
            "retention skipped held snapshots (zfs hold: another receiver's base, or a person's): {}",
            listed(&r.held)
        );
    }
    if !r.unconfirmed.is_empty() {
        let _ = writeln!(
            out,
            "retention kept {} snapshot(s) newer than the last one the receiver confirmed (it may have them; they go once confirmed): {}",
            r.unconfirmed.len(),
            listed(&r.unconfirmed)
        );
    }
    for w in &r.warnings {
        let _ = writeln!(out, "retention warning: {w}");
    }
    for e in &r.errors {
        let _ = writeln!(out, "retention error: {e}");
    }
    if mirrored > 0 {
        let _ = writeln!(
            out,
            "receiver mirrored retention: {mirrored} snapshot(s) it had and this host pruned"
        );
    }
    if !clean.orphans.is_empty() {
        let _ = writeln!(
            out,
            "orphaned on the receiver (source gone, or made there by hand): {}",
            listed(&clean.orphans)
        );
        match delete {
            Delete::NotAsked => {
                let _ = writeln!(out, "  (--delete-missing destroys those zfsync created)");
            }
            Delete::Skipped => {
                let _ = writeln!(
                    out,
                    "  --delete-missing skipped: some datasets failed in this run"
                );
            }
            Delete::Done => {}
        }
    }
    if !clean.deleted.is_empty() {
        let _ = writeln!(
            out,
            "deleted on the receiver (--delete-missing): {}",
            listed(&clean.deleted)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(name: &str, status: Status) -> Outcome {
        Outcome {
            dataset: DatasetName::new(name).unwrap(),
            status,
        }
    }

    #[test]
    fn bytes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }

    #[test]
    fn renders_every_kind() {
        let outcomes = vec![
            o(
                "p/a",
                Status::UpToDate {
                    snapshot: "s3".into(),
                },
            ),
            o(
                "p/a/b",
                Status::Sent {
                    kind: SendKind::Incremental,
                    from: Some("s2".into()),
                    to: "s3".into(),
                    snapshots: 1,
                    bytes: 2048,
                    buffered: false,
                    placed: false,
                    mirrored: 0,
                },
            ),
            o(
                "p/a/c",
                Status::Sent {
                    kind: SendKind::Full,
                    from: None,
                    to: "s3".into(),
                    snapshots: 3,
                    bytes: 10,
                    buffered: true,
                    placed: true,
                    mirrored: 0,
                },
            ),
            o("p/a/d", Status::NoSnapshots),
            o(
                "p/a/e",
                Status::Failed {
                    reason: "no common snapshot; run with --full".into(),
                },
            ),
        ];
        let s = render(
            &DatasetName::new("p/a").unwrap(),
            "host:7878",
            &outcomes,
            Duration::from_millis(1500),
            50,
        );
        assert!(s.contains("up to date (@s3)"), "{s}");
        assert!(
            s.contains("incremental @s2..@s3, 1 snapshot, 2.0 KiB"),
            "{s}"
        );
        assert!(
            s.contains("full ..@s3, 3 snapshots, 10 B, buffered then placed"),
            "{s}"
        );
        assert!(s.contains("skipped: no snapshots"), "{s}");
        assert!(
            s.contains("FAILED: no common snapshot; run with --full"),
            "{s}"
        );
        assert!(s.contains("datasets: 5 (1 up to date, 2 sent, 1 failed, 1 without snapshots); snapshots sent: 4"), "{s}");
        assert!(
            result_line(&outcomes, false, None, 0).contains("1 dataset(s) FAILED"),
            "{s}"
        );
        let short = render(
            &DatasetName::new("p/a").unwrap(),
            "h",
            &outcomes,
            Duration::ZERO,
            2,
        );
        assert!(short.contains("and 1 more datasets up to date"), "{short}");
        assert!(!short.contains("(@s3)"), "{short}");
    }
}
