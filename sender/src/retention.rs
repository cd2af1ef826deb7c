//! Retention on the sender: records which snapshot each dataset's receiver
//! confirmed (a user property per receiver, and a hold where `zfs` has
//! holds), then prunes tool snapshots of the run's class beyond `--keep`,
//! never a snapshot any receiver of the tree ([`crate::registry`]) may hold
//! unconfirmed (its confirmed base and newer; everything of a dataset it
//! never confirmed), never a held one and never a snapshot a person made.
//! What to prune is decided by [`zfsync_common::plan::prune`]; a dataset
//! whose new base could not be held is not pruned in that run.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use zfsync_common::caps::Cap;
use zfsync_common::naming::{
    format_bookmark, format_confirm_prop, format_hold_tag, format_tool_snapshot, parse_bookmark,
    DatasetName, HoldTag, SnapClass, SnapName,
};
use zfsync_common::plan::prune;
use zfsync_common::zfs::{Dataset, ZfsBackend};

pub use crate::report::Retention;
use crate::report::{listed, Outcome, Status};

/// What retention works with: the run's options it needs, no more.
pub struct Scope<'a> {
    pub zfs: &'a dyn ZfsBackend,
    /// The top of the tree (one recursive destroy where every copy of a
    /// snapshot name goes).
    pub source: &'a DatasetName,
    /// This receiver's name in the confirmation property, hold tag and
    /// bookmark names.
    pub receiver_id: &'a str,
    /// The run's snapshot class and stamp (`--snapshot`): the class is the
    /// one pruned; a dry run reckons with the snapshot it would take.
    pub snapshot: Option<(SnapClass, &'a str)>,
    /// `--keep`: tool snapshots of the class to keep.
    pub keep: Option<usize>,
    /// False when the run was stopped: confirmations only.
    pub prune: bool,
    /// The tree's other receivers (the registry, without this one): what
    /// they may hold unconfirmed is never pruned.
    pub others: &'a [String],
    /// This receiver has been sent this tree (it is in the registry, or
    /// was reached in this run): a dataset it never confirmed keeps all
    /// its snapshots. Also true where it confirmed any dataset.
    pub this_known: bool,
    /// Bookmarks are made this many datasets at a time.
    pub threads: usize,
    pub dry_run: bool,
}

fn in_sync(o: &Outcome) -> bool {
    match &o.status {
        Status::UpToDate { .. } => true,
        Status::Sent {
            buffered, placed, ..
        } => !buffered || *placed,
        _ => false,
    }
}

fn snap(ds: &DatasetName, name: &str) -> Option<zfsync_common::naming::SnapshotName> {
    SnapName::new(name).ok().and_then(|n| ds.snapshot(&n).ok())
}

/// Bookmarks each newly confirmed base as `mark` ([`format_bookmark`]) and
/// destroys this receiver's previous bookmark of the dataset (`:` cannot
/// occur in a receiver id, so [`parse_bookmark`] tells receivers apart). The
/// `zfs` CLI takes one bookmark per call, so the datasets are worked on
/// `--threads` at a time. Returns the warnings.
async fn move_bookmarks(
    scope: &Scope<'_>,
    mark: &str,
    confirmed: &[zfsync_common::naming::SnapshotName],
    by_name: &BTreeMap<&DatasetName, &Dataset>,
) -> Vec<String> {
    let zfs = scope.zfs;
    // Owned inputs, so that the closure below takes no reference: a
    // closure over `&SnapshotName` makes the whole run's future
    // impossible to `tokio::spawn` (a higher-ranked lifetime rustc cannot
    // prove Send for).
    let items: Vec<(
        zfsync_common::naming::SnapshotName,
        DatasetName,
        Vec<String>,
    )> = confirmed
        .iter()
        .map(|s| {
            let ds = s.dataset();
            let stale: Vec<String> = by_name
                .get(&ds)
                .map(|d| {
                    d.bookmarks
                        .iter()
                        .map(|b| b.name.to_string())
                        .filter(|b| {
                            b != mark
                                && parse_bookmark(b).is_some_and(|(id, _)| id == scope.receiver_id)
                        })
                        .collect()
                })
                .unwrap_or_default();
            (s.clone(), ds, stale)
        })
        .collect();
    let work = items.into_iter().map(move |(s, ds, stale)| async move {
        let mut warnings = Vec::new();
        if let Err(e) = zfs.bookmark(&s, mark).await {
            warnings.push(format!("cannot bookmark {s}: {e}"));
            return warnings;
        }
        for old in stale {
            if let Err(e) = zfs.destroy_bookmark(&ds, &old).await {
                warnings.push(format!("cannot destroy the old bookmark {ds}#{old}: {e}"));
            }
        }
        warnings
    });
    futures::stream::iter(work)
        .buffer_unordered(scope.threads.max(1))
        .collect::<Vec<Vec<String>>>()
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Records this run's confirmations, then prunes. `datasets` is the run's
/// one listing (taken after the run's snapshot); `outcomes` is empty when
/// the receiver could not be reached. Prunes only with `scope.prune`.
pub async fn apply(scope: &Scope<'_>, datasets: &[Dataset], outcomes: &[Outcome]) -> Retention {
    let zfs = scope.zfs;
    let prop = format_confirm_prop(scope.receiver_id);
    let tag = format_hold_tag(HoldTag::Sender(scope.receiver_id));
    let holds = zfs.caps().has(Cap::Holds);
    let mut r = Retention {
        class: scope.snapshot.map(|(c, _)| c),
        keep: scope.keep,
        ..Retention::default()
    };
    let by_name: BTreeMap<&DatasetName, &Dataset> = datasets.iter().map(|d| (&d.name, d)).collect();
    let mut confirmed: BTreeMap<DatasetName, String> = datasets
        .iter()
        .filter_map(|d| d.props.get(&prop).map(|v| (d.name.clone(), v.clone())))
        .collect();

    // Our own holds released in this run: no longer a reason to keep.
    let mut unheld: BTreeMap<DatasetName, String> = BTreeMap::new();
    // Datasets whose new base could not be held: not pruned in this run.
    let mut hold_failed: BTreeSet<DatasetName> = BTreeSet::new();
    // 1. Confirmations: one `zfs set` per snapshot name (a recursive
    // snapshot gives the whole tree one name), only where it moved.
    if !scope.dry_run {
        let mut moved: BTreeMap<String, Vec<DatasetName>> = BTreeMap::new();
        let mut released: Vec<zfsync_common::naming::SnapshotName> = Vec::new();
        for o in outcomes.iter().filter(|o| in_sync(o)) {
            let Some(d) = by_name.get(&o.dataset) else {
                continue;
            };
            let Some(newest) = d.newest() else { continue };
            let newest = newest.name.to_string();
            let old = confirmed.get(&d.name).cloned();
            if old.as_deref() == Some(newest.as_str()) {
                continue;
            }
            if let Some(old) = old {
                // Only where it is held (by us, as a rule): a hold that
                // failed in an earlier run has nothing to release.
                if d.held.contains(&old) {
                    released.extend(snap(&d.name, &old));
                    unheld.insert(d.name.clone(), old);
                }
            }
            moved.entry(newest).or_default().push(d.name.clone());
        }
        for (name, dss) in &moved {
            match zfs.set_many(dss, &prop, name).await {
                Ok(()) => {
                    r.confirmed += dss.len();
                    for d in dss {
                        confirmed.insert(d.clone(), name.clone());
                    }
                }
                Err(e) => {
                    r.errors
                        .push(format!("recording the confirmation @{name}: {e}"));
                    continue;
                }
            }
            let held: Vec<_> = dss.iter().filter_map(|d| snap(d, name)).collect();
            if holds {
                if let Err(e) = zfs.hold(&tag, &held).await {
                    r.warnings
                        .push(format!("cannot hold @{name} (tag {tag}): {e}"));
                    hold_failed.extend(dss.iter().cloned());
                }
            }
            // A bookmark of the confirmed base (OpenZFS) stays a base for
            // the next incremental even if the snapshot is destroyed; the
            // previous one of this receiver goes. `:` cannot occur in a
            // receiver id, so `TAG:` names this receiver's bookmarks only.
            if zfs.caps().has(Cap::Bookmarks) {
                if let Ok(snap) = SnapName::new(name) {
                    let mark = format_bookmark(scope.receiver_id, &snap);
                    r.warnings
                        .extend(move_bookmarks(scope, &mark, &held, &by_name).await);
                }
            }
        }
        if !holds {
            unheld.clear();
        } else if let Err(e) = zfs.release(&tag, &released).await {
            r.warnings.push(format!(
                "cannot release the previous holds (tag {tag}): {e}"
            ));
            unheld.clear();
        }
    }

    // 2. Pruning of the run's class.
    let (Some((class, stamp)), Some(keep)) = (scope.snapshot, scope.keep) else {
        return r;
    };
    if !scope.prune {
        r.pruning_skipped = true;
        return r;
    }
    // A dry run takes no snapshot: reckon with the one a real run would
    // take, and with its confirmation, as if the run succeeded.
    let simulated: Vec<Dataset>;
    let datasets = if scope.dry_run {
        let name = format_tool_snapshot(stamp, class).ok();
        simulated = datasets
            .iter()
            .map(|d| {
                let mut d = d.clone();
                if let (Some(name), Some(last)) = (name.clone(), d.snapshots.last().cloned()) {
                    // ...and with our hold moving off the old base.
                    if let Some(old) = confirmed.insert(d.name.clone(), name.to_string()) {
                        unheld.insert(d.name.clone(), old);
                    }
                    d.snapshots.push(zfsync_common::zfs::Snapshot {
                        name,
                        guid: 0,
                        createtxg: last.createtxg + 1,
                    });
                }
                d
            })
            .collect();
        &simulated[..]
    } else {
        datasets
    };
    // This receiver may hold snapshots it never confirmed once it has been
    // sent the tree; so may every other receiver of the registry.
    let this_known = scope.this_known || !confirmed.is_empty();
    let others: Vec<(&str, String)> = scope
        .others
        .iter()
        .filter(|id| id.as_str() != scope.receiver_id)
        .map(|id| (id.as_str(), format_confirm_prop(id)))
        .collect();
    let mut doomed: BTreeMap<String, Vec<DatasetName>> = BTreeMap::new();
    let mut blocked: Vec<String> = Vec::new();
    for d in datasets {
        let mut held = d.held.clone();
        if let Some(old) = unheld.get(&d.name) {
            held.remove(old);
        }
        let mut receivers: Vec<(&str, Option<&str>)> = Vec::new();
        if this_known {
            receivers.push((
                scope.receiver_id,
                confirmed.get(&d.name).map(String::as_str),
            ));
        }
        for (id, prop) in &others {
            receivers.push((id, d.props.get(prop).map(String::as_str)));
        }
        let plan = prune(
            &d.snapshots,
            class,
            keep,
            scope.receiver_id,
            &receivers,
            &held,
        );
        let full = |n: &SnapName| format!("{}@{n}", d.name);
        if let Some(h) = plan.held_back {
            r.held_back.push(full(&h));
        }
        r.held.extend(plan.held.iter().map(full));
        r.unconfirmed.extend(plan.unconfirmed.iter().map(full));
        r.never_confirmed
            .extend(plan.never_confirmed.iter().map(full));
        for (n, ids) in &plan.for_others {
            r.for_others.push(full(n));
            r.other_receivers.extend(ids.iter().cloned());
        }
        // The new base is protected by the property alone: destroy
        // nothing of this dataset in this run.
        if hold_failed.contains(&d.name) && !plan.destroy.is_empty() {
            blocked.push(d.name.to_string());
            continue;
        }
        for n in plan.destroy {
            doomed
                .entry(n.to_string())
                .or_default()
                .push(d.name.clone());
        }
    }
    if !blocked.is_empty() {
        r.errors.push(format!(
            "pruning skipped for {} dataset(s) whose confirmed base could not be held (zfs hold failed, see the warning; the next run prunes them unless its hold fails too): {}",
            blocked.len(),
            listed(&blocked)
        ));
    }
    for (name, dss) in doomed {
        if scope.dry_run {
            r.pruned.extend(dss.iter().map(|d| format!("{d}@{name}")));
            continue;
        }
        // The whole tree at once where every copy of the name goes.
        let having = datasets
            .iter()
            .filter(|d| d.snapshots.iter().any(|s| s.name.as_str() == name))
            .count();
        let whole = dss.len() == having && dss.contains(scope.source);
        let calls: Vec<(DatasetName, bool)> = if whole {
            vec![(scope.source.clone(), true)]
        } else {
            dss.iter().map(|d| (d.clone(), false)).collect()
        };
        for (ds, recursive) in calls {
            let Some(s) = snap(&ds, &name) else { continue };
            match zfs.destroy_snapshot(&s, recursive).await {
                Ok(()) if recursive => r.pruned.extend(dss.iter().map(|d| format!("{d}@{name}"))),
                Ok(()) => r.pruned.push(s.to_string()),
                // Still held by someone else (another receiver's base).
                Err(e) if e.is_busy() => r.held.push(s.to_string()),
                Err(e) => r.errors.push(format!("pruning {s}: {e}")),
            }
        }
    }
    r
}
