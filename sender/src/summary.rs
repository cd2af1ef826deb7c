//! The summary printed at the end of a run: rendering only, of the types
//! in [`crate::report`]. Pure: tested without ZFS.

use std::fmt::Write;
use std::time::Duration;

use zfsync_common::client::CleanReport;
use zfsync_common::naming::DatasetName;

use crate::report::{
    human_bytes, listed, on_the_wire, Delete, Outcome, Report, Retention, SendKind, Status,
};

/// The whole closing summary of a run, as printed (also re-exported as
/// `zfsync_send::summary`).
pub fn report_text(source: &DatasetName, receiver: &str, report: &Report) -> String {
    let mut s = String::new();
    if report.dry_run {
        s.push_str("DRY RUN: nothing was changed on either side\n");
    }
    if let Some(snap) = &report.snapshot {
        s.push_str(&format!("snapshot taken: {snap}\n"));
    }
    s.push_str(&render(
        source,
        receiver,
        &report.outcomes,
        report.elapsed,
        50,
    ));
    s.push_str(&render_after(
        &report.retention,
        report.mirrored,
        &report.clean,
        report.dry_run,
        report.delete,
    ));
    let mut line = result_line(
        &report.outcomes,
        report.dry_run,
        report.unreachable.as_deref(),
        report.retention.errors.len(),
        report.stopped,
    );
    let not_deleted = report.clean.delete_failures().count();
    if not_deleted > 0 && report.unreachable.is_none() {
        line.pop();
        line.push_str(&format!(
            "; {not_deleted} orphan(s) not deleted (see above)\n"
        ));
    }
    s.push_str(&line);
    s
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
            wire,
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
            if wire != bytes {
                let _ = write!(s, " ({})", on_the_wire(*bytes, *wire));
            }
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
    let (snaps, bytes, wire) = outcomes
        .iter()
        .fold((0usize, 0u64, 0u64), |(n, b, w), o| match &o.status {
            Status::Sent {
                snapshots,
                bytes,
                wire,
                ..
            } => (n + snapshots, b + bytes, w + wire),
            _ => (n, b, w),
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
    let _ = write!(
        out,
        "{totals}); snapshots sent: {snaps}; bytes sent: {}",
        human_bytes(bytes)
    );
    if wire != bytes {
        let _ = write!(out, " ({})", on_the_wire(bytes, wire));
    }
    out.push('\n');
    out
}

/// The closing `result:` line. `stopped`: the run was stopped before it
/// was done (its failed datasets include those it did not get to).
pub fn result_line(
    outcomes: &[Outcome],
    dry_run: bool,
    unreachable: Option<&str>,
    retention_errors: usize,
    stopped: bool,
) -> String {
    let failed = outcomes.iter().filter(|o| o.failed()).count();
    if let Some(e) = unreachable {
        return format!("result: receiver unreachable, nothing sent: {e}\n");
    }
    let mut s = if stopped {
        format!("result: STOPPED before the end; {failed} dataset(s) not done (see above)")
    } else if failed > 0 {
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

/// Retention, mirrored retention and orphans, after the dataset lines.
pub fn render_after(
    r: &Retention,
    mirrored: usize,
    clean: &CleanReport,
    dry_run: bool,
    delete: Delete,
) -> String {
    let mut out = String::new();
    if let (Some(class), Some(keep)) = (r.class, r.keep) {
        let verb = if dry_run { "would prune" } else { "pruned" };
        if r.pruning_skipped {
            let _ = writeln!(
                out,
                "retention (class {}, keep {keep}): nothing pruned: the run was stopped",
                class.letter()
            );
        } else {
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
        }
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
    if !r.never_confirmed.is_empty() {
        let _ = writeln!(
            out,
            "retention kept {} snapshot(s) of dataset(s) the receiver never confirmed, or whose confirmed snapshot is gone (a cut sync may have left any of them there; they go once a run confirms): {}",
            r.never_confirmed.len(),
            listed(&r.never_confirmed)
        );
    }
    if !r.for_others.is_empty() {
        let ids: Vec<&str> = r.other_receivers.iter().map(String::as_str).collect();
        let _ = writeln!(
            out,
            "retention kept {} snapshot(s) another receiver may have unconfirmed ({}: its confirmed base or newer; they go once it confirms newer ones): {}",
            r.for_others.len(),
            ids.join(", "),
            listed(&r.for_others)
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
    for f in clean.delete_failures() {
        let _ = writeln!(out, "NOT deleted on the receiver: {}: {}", f.path, f.reason);
    }
    out
}

#[cfg(test)]
mod tests;
