//! One replication run from start to report: probe the local zfs, take
//! the run's snapshot, list the tree once, connect, let the workers sync,
//! ask the receiver to place what it buffered, apply retention.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use zfsync_common::client::CleanReport;
use zfsync_common::naming::{format_tool_snapshot, DatasetName, RelPath, SnapClass};
use zfsync_common::zfs::{Dataset, ZfsBackend, ZfsError};

use crate::error::SendError;
use crate::registry::Known;
use crate::report::{
    Delete, Outcome, Report, Status, NOT_ATTEMPTED_NO_CONNECTION, NOT_ATTEMPTED_STOPPED,
};
use crate::retention::{self, Scope};
use crate::worker::{self, Job, Queue};
use crate::Options;

/// Runs one replication: takes the snapshot (`--snapshot`), lists the
/// tree once, syncs, records what the receiver confirmed, applies retention
/// (`--keep`). Errors only when nothing could be done at all (no source, no
/// snapshot); per-dataset failures and an unreachable receiver are in the
/// report, after retention ran: the confirmed base is never pruned.
///
/// `shutdown` stops the run early (the binary cancels it on SIGTERM or
/// SIGINT). Then no dataset is started any more; each worker stops at the
/// next message boundary (between datasets, between the streams of one);
/// a `zfs send` in flight is killed and the receiver told to discard its
/// stream (`abort_stream`), so nothing half-sent is committed; a dataset
/// whose streams all arrived is still finished. Datasets not started are
/// reported failed, "not attempted: the run was stopped". Cleanbuffer
/// (placing, orphans, `--delete-missing`) and retention's pruning are
/// skipped: they act on the whole tree and may take long, and the run
/// is to end promptly. Confirmations of the datasets that did finish are
/// still recorded: that only protects snapshots (the base of the next
/// incremental). A stop during cleanbuffer lets it end and skips the
/// pruning; one during retention lets it end. The report says `stopped`
/// (then the summary so far is printed and the exit status is 1) when
/// anything was skipped.
pub async fn run(mut opts: Options, shutdown: CancellationToken) -> Result<Report, SendError> {
    let started = Instant::now();
    // What the local zfs can do decides the listing (bookmarks,
    // encryption) and, with the receiver's answer, how streams travel.
    let caps = opts.zfs.probe().await?;
    tracing::info!("zfs capabilities: {caps}");
    opts.client.caps = caps;
    let mut report = Report {
        dry_run: opts.dry_run,
        ..Report::default()
    };
    if let (Some((class, stamp)), false) = (&opts.snapshot, opts.dry_run) {
        report.snapshot = Some(take_snapshot(&opts, *class, stamp).await?);
    }
    // Pruning keeps what every receiver of the tree may hold: the registry
    // names them, so that the one listing can ask for their confirmations.
    let mut known = Known::read(
        opts.zfs.as_ref(),
        &opts.source,
        &opts.receiver_id,
        opts.keep.is_some(),
    )
    .await?;
    let mut props = known.listing_props(&opts.receiver_id);
    props.push("userrefs".into());
    let props: Vec<&str> = props.iter().map(String::as_str).collect();
    let (jobs, mut outcomes) = list_jobs(opts.zfs.as_ref(), &opts.source, &props).await?;
    tracing::info!(datasets = jobs.len(), source = %opts.source, "listed the source tree");
    let datasets: Vec<Dataset> = jobs.iter().map(|j| j.dataset.clone()).collect();
    known.listed(&datasets, &opts.source, &opts.receiver_id);
    let source_paths: Vec<String> = jobs.iter().map(|j| j.rel.as_str().to_string()).collect();
    // Connect the first worker before anything else, so that an unreachable
    // or refusing receiver is one clear error.
    let first = match worker::connect(&opts.client, &shutdown).await {
        Some(Ok(c)) => {
            tracing::info!(
                "the receiver's zfs: {}; sending with {}",
                c.peer_caps(),
                c.path()
            );
            known
                .reached(
                    opts.zfs.as_ref(),
                    &opts.source,
                    &opts.receiver_id,
                    opts.dry_run,
                )
                .await;
            Some(c)
        }
        Some(Err(e)) => {
            // Retention still runs: it keeps the last confirmed base.
            report.retention = retention::apply(&scope(&opts, true, &known), &datasets, &[]).await;
            report.unreachable = Some(e.to_string());
            report.elapsed = started.elapsed();
            return Ok(report);
        }
        // Stopped while connecting: every dataset is "not attempted".
        None => None,
    };
    // The whole tree in one negotiation: what needs nothing is settled
    // here, the rest goes to the workers with the receiver's answer.
    let (jobs, settled, first) = match first {
        Some(mut c) if !shutdown.is_cancelled() => {
            let (jobs, settled, error) = crate::plan::plan(&mut c, &opts, jobs).await;
            (jobs, settled, error.is_none().then_some(c))
        }
        first => (jobs, Vec::new(), first),
    };
    let opts = Arc::new(opts);
    let (mut done, left, mut deferred) = pass(&opts, first, jobs, true, &shutdown).await;
    done.extend(settled);
    let stopped = shutdown.is_cancelled();
    // Whatever no worker took: the run was stopped, or every connection
    // was lost.
    not_attempted(&mut done, left, stopped);
    // Datasets the receiver kept busy (a child whose buffer name is too
    // long waits for its parent) are tried once more after cleanbuffer;
    // orphans are judged after them.
    let again = !deferred.is_empty() && !stopped;
    let delete = opts.delete_missing && !stopped && !done.iter().any(Outcome::failed);
    if stopped {
        not_attempted(&mut done, std::mem::take(&mut deferred), true);
        tracing::warn!("the run was stopped: cleanbuffer and retention's pruning are skipped");
        not_placed(
            &mut done,
            "received into the buffer; not placed: the run was stopped before cleanbuffer",
        );
    } else {
        report.clean = clean_buffer(&opts, &mut done, source_paths.clone(), delete && !again).await;
    }
    let mut delete = delete && !again;
    if again {
        tracing::info!(
            datasets = deferred.len(),
            "trying again the datasets the receiver kept busy, now that the buffer is placed"
        );
        let (mut more, left, _) = pass(&opts, None, deferred, false, &shutdown).await;
        let stopped = shutdown.is_cancelled();
        not_attempted(&mut more, left, stopped);
        if !stopped {
            delete = opts.delete_missing && !done.iter().chain(&more).any(Outcome::failed);
            let clean = clean_buffer(&opts, &mut more, source_paths, delete).await;
            report.clean.placed.extend(clean.placed);
            report.clean.failed.extend(clean.failed);
            report.clean.orphans = clean.orphans;
            report.clean.deleted.extend(clean.deleted);
        }
        done.extend(more);
    }
    if opts.delete_missing && !delete {
        tracing::warn!("--delete-missing skipped: some datasets failed in this run");
    }
    report.delete = match (opts.delete_missing, delete) {
        (false, _) => Delete::NotAsked,
        (true, false) => Delete::Skipped,
        (true, true) => Delete::Done,
    };
    outcomes.extend(done);
    outcomes.sort_by(|a, b| a.dataset.cmp(&b.dataset));
    report.mirrored = outcomes
        .iter()
        .map(|o| match &o.status {
            Status::Sent { mirrored, .. } => *mirrored,
            _ => 0,
        })
        .sum();
    // A stop that came during cleanbuffer skips the pruning too.
    let stopped = shutdown.is_cancelled();
    report.retention =
        retention::apply(&scope(&opts, !stopped, &known), &datasets, &outcomes).await;
    if let Some(e) = known.error.take() {
        report.retention.errors.insert(0, e);
    }
    report.outcomes = outcomes;
    report.stopped = stopped;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// One pass of workers over `jobs` (`first`: an open connection for the
/// first worker). Returns what was done, what no worker took, and (with
/// `defer`) what the receiver kept busy, for a second pass.
async fn pass(
    opts: &Arc<Options>,
    first: Option<zfsync_common::client::Client>,
    jobs: Vec<Job>,
    defer: bool,
    shutdown: &CancellationToken,
) -> (Vec<Outcome>, Vec<Job>, Vec<Job>) {
    let queue = Arc::new(Queue::new(jobs, defer));
    let workers = opts.threads.max(1).min(queue.len().max(1));
    let mut handles = Vec::new();
    let mut first = first;
    for id in 0..workers {
        let queue = queue.clone();
        let opts = opts.clone();
        let shutdown = shutdown.clone();
        let client = first.take();
        handles.push(tokio::spawn(async move {
            worker::worker(id, client, &opts, &queue, &shutdown).await
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    let (done, left) = queue.finish();
    (done, left, queue.deferred())
}

/// Reports the jobs no worker took.
fn not_attempted(done: &mut Vec<Outcome>, left: Vec<Job>, stopped: bool) {
    let why = if stopped {
        NOT_ATTEMPTED_STOPPED
    } else {
        NOT_ATTEMPTED_NO_CONNECTION
    };
    done.extend(left.into_iter().map(|job| Outcome {
        dataset: job.dataset.name,
        status: Status::Failed { reason: why.into() },
    }));
}

/// What retention needs of the options; `prune`: false when the run was
/// stopped.
fn scope<'a>(opts: &'a Options, prune: bool, known: &'a Known) -> Scope<'a> {
    Scope {
        zfs: opts.zfs.as_ref(),
        source: &opts.source,
        receiver_id: &opts.receiver_id,
        snapshot: opts.snapshot.as_ref().map(|(c, s)| (*c, s.as_str())),
        keep: opts.keep,
        prune,
        others: &known.others,
        this_known: known.this,
        threads: opts.threads,
        dry_run: opts.dry_run,
    }
}

/// Lists the source tree in one `zfs` call; returns its datasets
/// parent-first, and those that cannot be replicated.
async fn list_jobs(
    zfs: &dyn ZfsBackend,
    source: &DatasetName,
    user_props: &[&str],
) -> Result<(Vec<Job>, Vec<Outcome>), SendError> {
    let tree = zfs.list_trees_with(&[source], user_props).await?;
    if !tree.datasets.contains_key(source) {
        return Err(SendError::NoSource(source.clone()));
    }
    let mut jobs: Vec<Job> = tree
        .datasets
        .into_values()
        .filter_map(|d| {
            d.name.relative_to(source).map(|rel| Job {
                rel,
                dataset: d,
                tries: 0,
                plan: None,
            })
        })
        .collect();
    jobs.sort_by(|a, b| a.rel.tree_order_key().cmp(&b.rel.tree_order_key()));
    let skipped = tree
        .skipped
        .into_iter()
        .filter_map(|(name, why)| {
            tracing::warn!(%name, "cannot replicate: {why}");
            if name.contains('@') {
                return None;
            }
            // Only datasets whose name we can still show as a DatasetName
            // fit the summary; report the others in the log only.
            DatasetName::new(name.split('@').next().unwrap_or(&name))
                .ok()
                .map(|dataset| Outcome {
                    dataset,
                    status: Status::Failed { reason: why },
                })
        })
        .collect();
    Ok((jobs, skipped))
}

/// The local time as it stands in a tool snapshot's name
/// ([`zfsync_common::naming::format_tool_snapshot`]): `yymmdd-HHMMSS`.
pub fn tool_stamp(t: &chrono::DateTime<chrono::Local>) -> String {
    t.format("%y%m%d-%H%M%S").to_string()
}

/// Takes `SOURCE@<stamp>_<class>`. Should the name exist (two runs in one
/// second, or the hour that repeats when clocks go back), it waits for the
/// next second and takes a fresh stamp, a few times.
async fn take_snapshot(opts: &Options, class: SnapClass, stamp: &str) -> Result<String, SendError> {
    let mut stamp = stamp.to_string();
    let mut tries = 0;
    loop {
        let snap = format_tool_snapshot(&stamp, class)
            .and_then(|n| opts.source.snapshot(&n))
            .map_err(|e| {
                SendError::Snapshot(
                    stamp.clone(),
                    ZfsError::Parse {
                        line: stamp.clone(),
                        reason: e.to_string(),
                    },
                )
            })?;
        match opts.zfs.snapshot_recursive(&snap).await {
            Ok(()) => {
                tracing::info!(%snap, "snapshot taken");
                return Ok(snap.to_string());
            }
            Err(ZfsError::SnapshotExists { .. }) if tries < 3 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(1000)).await;
                stamp = tool_stamp(&chrono::Local::now());
            }
            Err(e) => return Err(SendError::Snapshot(snap.to_string(), e)),
        }
    }
}

/// Datasets received into the buffer and not placed are not in place:
/// they fail, with `why`.
fn not_placed(outcomes: &mut [Outcome], why: &str) {
    for o in outcomes.iter_mut() {
        if let Status::Sent {
            buffered: true,
            placed: false,
            ..
        } = o.status
        {
            o.status = Status::Failed { reason: why.into() };
        }
    }
}

/// Asks the receiver to place buffered datasets and folds its report into
/// the outcomes.
async fn clean_buffer(
    opts: &Options,
    outcomes: &mut [Outcome],
    source_paths: Vec<String>,
    delete_missing: bool,
) -> CleanReport {
    // A fresh connection: the workers' may have idled out meanwhile.
    let report = match zfsync_common::client::Client::connect(&opts.client).await {
        Ok(mut c) => {
            let r = c
                .clean_buffer(source_paths, delete_missing, opts.dry_run)
                .await;
            c.bye().await;
            r
        }
        Err(e) => Err(e),
    };
    if opts.dry_run {
        return report.unwrap_or_default();
    }
    let dataset_of = |path: &str| {
        RelPath::new(path)
            .ok()
            .and_then(|rel| opts.source.join(&rel).ok())
    };
    match report {
        Ok(report) => {
            for p in &report.placed {
                let Some(ds) = dataset_of(p) else { continue };
                if let Some(o) = outcomes.iter_mut().find(|o| o.dataset == ds) {
                    if let Status::Sent { placed, .. } = &mut o.status {
                        *placed = true;
                    }
                }
            }
            for f in report.place_failures() {
                let reason = format!("received into the buffer but not placed: {}", f.reason);
                match dataset_of(&f.path)
                    .and_then(|ds| outcomes.iter_mut().find(|o| o.dataset == ds))
                {
                    Some(o) => o.status = Status::Failed { reason },
                    None => {
                        tracing::warn!(path = %f.path, "buffered on the receiver and not placed: {}", f.reason)
                    }
                }
            }
            report
        }
        Err(e) => {
            // Datasets still in the buffer are not in place.
            not_placed(
                outcomes,
                &format!("received into the buffer, but cleanbuffer failed: {e}"),
            );
            CleanReport::default()
        }
    }
}
