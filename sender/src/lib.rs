//! zfsync-send: lists the source tree once, then N workers (one TLS
//! connection each, reused for many datasets) take datasets parent-first
//! from one queue, negotiate with the receiver and stream `zfs send`.
//! After all datasets, one connection asks the receiver to place what it
//! buffered.

pub mod cli;
pub mod retention;
pub mod summary;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use zfsync_common::client::{CleanReport, Client, ClientError, ClientOptions};
use zfsync_common::naming::{format_tool_snapshot, DatasetName, RelPath, SnapClass, SnapshotName};
use zfsync_common::plan::{steps_with_bookmarks, Decision, Step};
use zfsync_common::protocol::{SyncReply, SyncRequest};
use zfsync_common::zfs::{Backend, Dataset, SendFrom, SendWhat, Snapshot, ZfsBackend, ZfsError};

use crate::summary::{human_bytes, Outcome, SendKind, Status};

/// Exit statuses (documented in README).
pub mod exit {
    /// Every dataset is in sync.
    pub const OK: u8 = 0;
    /// One or more datasets failed; the others were synced.
    pub const FAILED: u8 = 1;
    /// Bad command line or configuration; nothing was done.
    pub const USAGE: u8 = 2;
    /// The receiver could not be reached or refused this sender.
    pub const UNREACHABLE: u8 = 3;
}

#[derive(Debug, Error)]
pub enum SendError {
    #[error("source dataset {0} does not exist on this host (`zfs list -r` shows the datasets)")]
    NoSource(DatasetName),
    #[error("listing the source: {0}")]
    List(#[from] ZfsError),
    #[error(transparent)]
    Connect(ClientError),
    #[error("cannot take the snapshot {0}: {1}")]
    Snapshot(String, ZfsError),
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

/// One dataset to sync.
#[derive(Clone, Debug)]
struct Job {
    rel: RelPath,
    dataset: Dataset,
    /// Earlier attempts that found the dataset busy on the receiver.
    tries: u32,
}

/// The result of a run.
#[derive(Default)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
    pub elapsed: Duration,
    pub dry_run: bool,
    /// The snapshot this run took.
    pub snapshot: Option<String>,
    pub retention: retention::Retention,
    /// The receiver's end-of-run report (orphans, deletions).
    pub clean: CleanReport,
    /// Snapshots the receiver destroyed to mirror retention.
    pub mirrored: usize,
    /// Set when the receiver could not be reached at all.
    pub unreachable: Option<String>,
    pub delete: summary::Delete,
}

impl Report {
    pub fn exit_code(&self) -> u8 {
        if self.unreachable.is_some() {
            exit::UNREACHABLE
        } else if self.outcomes.iter().any(Outcome::failed) || !self.retention.errors.is_empty() {
            exit::FAILED
        } else {
            exit::OK
        }
    }
}

/// Lists the source tree in one `zfs` call; returns its datasets
/// parent-first.
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

/// Runs one replication: takes the snapshot (`--snapshot`), lists the
/// tree once, syncs, records what the receiver confirmed, applies retention
/// (`--keep`). Errors only when nothing could be done at all (no source, no
/// snapshot); per-dataset failures and an unreachable receiver are in the
/// report, after retention ran: the confirmed base is never pruned.
pub async fn run(mut opts: Options) -> Result<Report, SendError> {
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
    let prop = zfsync_common::naming::format_confirm_prop(&opts.receiver_id);
    let (jobs, mut outcomes) =
        list_jobs(opts.zfs.as_ref(), &opts.source, &[&prop, "userrefs"]).await?;
    tracing::info!(datasets = jobs.len(), source = %opts.source, "listed the source tree");
    let datasets: Vec<Dataset> = jobs.iter().map(|j| j.dataset.clone()).collect();
    let source_paths: Vec<String> = jobs.iter().map(|j| j.rel.as_str().to_string()).collect();
    // Connect the first worker before anything else, so that an unreachable
    // or refusing receiver is one clear error.
    let first = match Client::connect(&opts.client).await {
        Ok(c) => {
            tracing::info!(
                "the receiver's zfs: {}; sending with {}",
                c.peer_caps(),
                c.path()
            );
            c
        }
        Err(e) => {
            // Retention still runs: it keeps the last confirmed base.
            report.retention = retention::apply(&opts, &datasets, &[]).await;
            report.unreachable = Some(e.to_string());
            report.elapsed = started.elapsed();
            return Ok(report);
        }
    };
    let queue = Arc::new(Mutex::new(jobs.into_iter().collect::<VecDeque<Job>>()));
    let results = Arc::new(Mutex::new(Vec::new()));
    let opts = Arc::new(opts);
    let workers = opts.threads.max(1).min(queue_len(&queue).max(1));
    let mut handles = Vec::new();
    let mut first = Some(first);
    for id in 0..workers {
        let queue = queue.clone();
        let results = results.clone();
        let opts = opts.clone();
        let client = first.take();
        handles.push(tokio::spawn(async move {
            worker(id, client, &opts, &queue, &results).await
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    let mut done: Vec<Outcome> = std::mem::take(&mut *lock(&results));
    // Whatever no worker could take (every connection lost).
    for job in lock(&queue).drain(..) {
        done.push(Outcome {
            dataset: job.dataset.name,
            status: Status::Failed {
                reason: "not attempted: lost every connection to the receiver".into(),
            },
        });
    }
    let delete = opts.delete_missing && !done.iter().any(Outcome::failed);
    if opts.delete_missing && !delete {
        tracing::warn!("--delete-missing skipped: some datasets failed in this run");
    }
    report.delete = match (opts.delete_missing, delete) {
        (false, _) => summary::Delete::NotAsked,
        (true, false) => summary::Delete::Skipped,
        (true, true) => summary::Delete::Done,
    };
    report.clean = clean_buffer(&opts, &mut done, source_paths, delete).await;
    outcomes.extend(done);
    outcomes.sort_by(|a, b| a.dataset.cmp(&b.dataset));
    report.mirrored = outcomes
        .iter()
        .map(|o| match &o.status {
            Status::Sent { mirrored, .. } => *mirrored,
            _ => 0,
        })
        .sum();
    report.retention = retention::apply(&opts, &datasets, &outcomes).await;
    report.outcomes = outcomes;
    report.elapsed = started.elapsed();
    Ok(report)
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
                stamp = chrono::Local::now().format("%y%m%d-%H%M%S").to_string();
            }
            Err(e) => return Err(SendError::Snapshot(snap.to_string(), e)),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn queue_len(q: &Mutex<VecDeque<Job>>) -> usize {
    lock(q).len()
}

/// How often a dataset the receiver calls busy is tried in one run.
const BUSY_TRIES: u32 = 5;

/// Takes jobs until the queue is empty. A lost connection fails the job in
/// progress; the worker reconnects and goes on, or stops and leaves the rest
/// to the other workers. A dataset the receiver calls busy goes back to the
/// end of the queue a few times.
async fn worker(
    id: usize,
    mut client: Option<Client>,
    opts: &Options,
    queue: &Mutex<VecDeque<Job>>,
    results: &Mutex<Vec<Outcome>>,
) {
    loop {
        if client.is_none() {
            match Client::connect(&opts.client).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::warn!(worker = id, "cannot connect: {e}");
                    return;
                }
            }
        }
        let Some(mut job) = lock(queue).pop_front() else {
            if let Some(c) = client {
                c.bye().await;
            }
            return;
        };
        let Some(c) = client.as_mut() else {
            return;
        };
        if job.tries > 0 {
            tokio::time::sleep(Duration::from_secs(u64::from(job.tries))).await;
        }
        let (status, lost, busy) = sync_dataset(c, opts, &job).await;
        if lost {
            client = None;
        }
        if busy && job.tries + 1 < BUSY_TRIES {
            tracing::info!(worker = id, dataset = %job.dataset.name, "busy on the receiver; trying again later");
            job.tries += 1;
            lock(queue).push_back(job);
            continue;
        }
        match &status {
            Status::Failed { reason } => {
                tracing::warn!(worker = id, dataset = %job.dataset.name, "failed: {reason}")
            }
            other => tracing::info!(worker = id, dataset = %job.dataset.name, ?other, "done"),
        }
        lock(results).push(Outcome {
            dataset: job.dataset.name,
            status,
        });
    }
}

/// Syncs one dataset. Returns its status, whether the connection was lost
/// on the way, and whether the receiver called the dataset busy.
async fn sync_dataset(client: &mut Client, opts: &Options, job: &Job) -> (Status, bool, bool) {
    let mut busy = false;
    let (status, lost) = sync_one(client, opts, job, &mut busy).await;
    (status, lost, busy)
}

async fn sync_one(
    client: &mut Client,
    opts: &Options,
    job: &Job,
    busy: &mut bool,
) -> (Status, bool) {
    let snaps = &job.dataset.snapshots;
    if snaps.is_empty() {
        return (Status::NoSnapshots, false);
    }
    let failed = |e: ClientError| {
        let lost = e.is_connection_lost();
        (
            Status::Failed {
                reason: e.to_string(),
            },
            lost,
        )
    };
    if job.dataset.encrypted && !client.path().raw {
        return (
            Status::Failed {
                reason: format!(
                    "{} is encrypted, and the receiver's zfs ({}) cannot receive raw streams (zfs send -w); zfsync never sends decrypted data: run the receiver on OpenZFS 0.8 or later",
                    job.dataset.name,
                    client.peer_caps().version
                ),
            },
            false,
        );
    }
    let bookmarks: &[Snapshot] = if client.path().bookmarks {
        &job.dataset.bookmarks
    } else {
        &[]
    };
    let request = SyncRequest::new(&job.rel, snaps)
        .bookmarks(bookmarks)
        .allow_full(opts.allow_full);
    let mut reply = match client.sync(&request.clone().dry_run(opts.dry_run)).await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    // A transfer cut in an earlier run: go on from where it stopped.
    let mut resumed = 0u64;
    if let SyncReply::Resume { token } = &reply {
        if opts.dry_run {
            return (
                Status::Planned {
                    what: "would resume a cut transfer, then send what is newer".into(),
                },
                false,
            );
        }
        let token = token.clone();
        match resume(client, opts, job, &token).await {
            Ok(bytes) => {
                resumed = bytes;
                reply = match client.sync(&request).await {
                    Ok(r) => r,
                    Err(e) => return failed(e),
                };
            }
            Err(ResumeError::Stale(reason)) => {
                tracing::warn!(dataset = %job.dataset.name, "cannot resume the cut transfer: {reason}; the receiver discards it and the dataset is planned again");
                reply = match client.resume_failed(&reason).await {
                    Ok(r) => r,
                    Err(e) => return failed(e),
                };
            }
            Err(ResumeError::Failed(reason, lost)) => return (Status::Failed { reason }, lost),
        }
    }
    let newest = snaps.last().map(|s| s.name.to_string()).unwrap_or_default();
    if opts.dry_run {
        let what = match &reply {
            SyncReply::Incremental { base_guid, count } => {
                let base = snaps
                    .iter()
                    .find(|s| s.guid == *base_guid)
                    .map(|s| s.name.to_string())
                    .unwrap_or_default();
                Some(format!(
                    "would send incremental @{base}..@{newest}, {count} snapshot(s)"
                ))
            }
            SyncReply::New { buffered } => Some(format!(
                "would send full ..@{newest}, {} snapshot(s){}",
                snaps.len(),
                if *buffered { ", into the buffer" } else { "" }
            )),
            SyncReply::Full {
                reason,
                accepted: true,
            } => Some(format!("would replace the receiver's copy ({reason})")),
            _ => None,
        };
        if let Some(what) = what {
            return (Status::Planned { what }, false);
        }
    }
    let (decision, kind, count) = match reply {
        SyncReply::UpToDate { snapshot } if resumed > 0 => {
            return (
                Status::Sent {
                    kind: SendKind::Incremental,
                    from: None,
                    to: snapshot,
                    snapshots: 1,
                    bytes: resumed,
                    buffered: false,
                    placed: false,
                    mirrored: 0,
                },
                false,
            )
        }
        SyncReply::UpToDate { snapshot } => return (Status::UpToDate { snapshot }, false),
        SyncReply::Incremental { base_guid, count } => (
            Decision::Incremental {
                base_guid,
                count: count as usize,
            },
            SendKind::Incremental,
            count as usize,
        ),
        SyncReply::New { buffered } => (Decision::New { buffered }, SendKind::Full, snaps.len()),
        SyncReply::Full {
            reason,
            accepted: true,
        } => {
            tracing::warn!(dataset = %job.dataset.name, "replacing the receiver's copy (--full): {reason}");
            (
                Decision::Full {
                    reason,
                    accepted: true,
                },
                SendKind::Replaced,
                snaps.len(),
            )
        }
        SyncReply::Full {
            reason,
            accepted: false,
        } => {
            return (
                Status::Failed {
                    reason: format!(
                        "{reason}; run with --full to replace the receiver's copy (it is kept until the new copy is whole)"
                    ),
                },
                false,
            )
        }
        SyncReply::Refused { reason, temporary } => {
            *busy = temporary;
            return (
                Status::Failed {
                    reason: format!("refused by the receiver: {reason}"),
                },
                false,
            )
        }
        SyncReply::Resume { .. } => {
            return (
                Status::Failed {
                    reason: "the receiver offered a resume twice; run again".into(),
                },
                true,
            )
        }
    };
    let plan = steps_with_bookmarks(snaps, bookmarks, &decision);
    let mut bytes = resumed;
    for step in &plan {
        match send_step(client, opts, &job.dataset, step).await {
            Ok(n) => bytes += n,
            Err((reason, lost)) => return (Status::Failed { reason }, lost),
        }
    }
    let finished = match client.finish().await {
        Ok(x) => x,
        Err(e) => return failed(e),
    };
    let from = match &decision {
        Decision::Incremental { base_guid, .. } => snaps
            .iter()
            .find(|s| s.guid == *base_guid)
            .map(|s| s.name.to_string())
            .or_else(|| {
                bookmarks
                    .iter()
                    .find(|b| b.guid == *base_guid)
                    .map(|b| format!("#{}", b.name))
            }),
        _ => None,
    };
    (
        Status::Sent {
            kind,
            from,
            to: newest,
            snapshots: count,
            bytes,
            buffered: finished.buffered,
            placed: false,
            mirrored: finished.pruned.len(),
        },
        false,
    )
}

enum ResumeError {
    /// The token cannot be used here (its snapshot is gone, it names
    /// another dataset): the receiver discards the partial state.
    Stale(String),
    /// The resumed stream failed (reason, connection lost).
    Failed(String, bool),
}

/// Continues a cut transfer with `zfs send -t TOKEN`, after checking that
/// the token names a snapshot of this very dataset that was announced.
async fn resume(
    client: &mut Client,
    opts: &Options,
    job: &Job,
    token: &str,
) -> Result<u64, ResumeError> {
    let info = match opts.zfs.resume_info(token).await {
        Ok(i) => i,
        // The token's snapshot is gone or is another one: stale.
        Err(ZfsError::ResumeTokenStale { stderr, .. }) => {
            return Err(ResumeError::Stale(stderr));
        }
        Err(ZfsError::DoesNotExist { name }) => {
            return Err(ResumeError::Stale(format!("{name} does not exist")))
        }
        // Anything else (a zfs failure, output not understood): keep the
        // receiver's partial state for a later run.
        Err(e) => {
            return Err(ResumeError::Failed(
                format!("cannot read the resume token: {e}"),
                false,
            ))
        }
    };
    let named = SnapshotName::new(&info.to_name)
        .map_err(|e| ResumeError::Stale(format!("the token names {:?}: {e}", info.to_name)))?;
    if named.dataset() != job.dataset.name {
        return Err(ResumeError::Stale(format!(
            "the token names {}, not a snapshot of {}",
            info.to_name, job.dataset.name
        )));
    }
    let Some(to) = job
        .dataset
        .snapshots
        .iter()
        .find(|s| s.guid == info.to_guid)
    else {
        return Err(ResumeError::Stale(format!(
            "{} is no longer here (guid {})",
            info.to_name, info.to_guid
        )));
    };
    tracing::info!(
        dataset = %job.dataset.name,
        to = %to.name,
        done = info.bytes_done.unwrap_or(0),
        left = info.bytes_left.unwrap_or(0),
        "resuming a cut transfer: {} already on the receiver, about {} to go",
        human_bytes(info.bytes_done.unwrap_or(0)),
        human_bytes(info.bytes_left.unwrap_or(0))
    );
    // An encrypted dataset travels raw, whatever the token (it comes from
    // the receiver) asks for: never decrypted.
    if job.dataset.encrypted && !info.raw {
        return Err(ResumeError::Stale(format!(
            "{} is encrypted and the token is not for a raw stream",
            job.dataset.name
        )));
    }
    let flags = if job.dataset.encrypted {
        vec!["-w"]
    } else {
        Vec::new()
    };
    let from_guid = (info.from_guid != 0).then_some(info.from_guid);
    let what = SendWhat::Resume {
        token: token.to_string(),
    };
    let to_name = job
        .dataset
        .name
        .snapshot(&to.name)
        .map_err(|e| ResumeError::Failed(e.to_string(), false))?;
    let bytes = pipe_stream(client, opts, &to_name, &what, &flags, from_guid, to, true)
        .await
        .map_err(|(reason, lost)| ResumeError::Failed(reason, lost))?;
    tracing::info!(dataset = %job.dataset.name, bytes, "resumed transfer complete");
    Ok(bytes)
}

/// One `zfs send` piped to the receiver. Err carries (reason, connection
/// lost).
async fn send_step(
    client: &mut Client,
    opts: &Options,
    dataset: &Dataset,
    step: &Step<'_>,
) -> Result<u64, (String, bool)> {
    let to = dataset
        .name
        .snapshot(&step.to.name)
        .map_err(|e| (e.to_string(), false))?;
    let from = match step.from {
        Some(f) if step.from_bookmark => {
            Some(SendFrom::Bookmark(format!("{}#{}", dataset.name, f.name)))
        }
        Some(f) => Some(SendFrom::Snapshot(
            dataset
                .name
                .snapshot(&f.name)
                .map_err(|e| (e.to_string(), false))?,
        )),
        None => None,
    };
    let flags = client.path().send_flags(dataset.encrypted);
    let what = SendWhat::Snapshot {
        from,
        to: to.clone(),
    };
    pipe_stream(
        client,
        opts,
        &to,
        &what,
        &flags,
        step.from.map(|f| f.guid),
        step.to,
        false,
    )
    .await
}

/// Announces a stream, pipes `zfs send` into it and ends it. Err carries
/// (reason, connection lost).
#[allow(clippy::too_many_arguments)]
async fn pipe_stream(
    client: &mut Client,
    opts: &Options,
    to: &SnapshotName,
    what: &SendWhat,
    flags: &[&str],
    from_guid: Option<u64>,
    to_snap: &Snapshot,
    resume: bool,
) -> Result<u64, (String, bool)> {
    let lost = |e: ClientError| {
        let l = e.is_connection_lost();
        (e.to_string(), l)
    };
    let announced = if resume {
        client.begin_resume(from_guid, to_snap).await
    } else {
        client.begin_stream(from_guid, to_snap).await
    };
    announced.map_err(lost)?;
    let mut child = match opts.zfs.spawn_send(what, flags) {
        Ok(c) => c,
        Err(e) => {
            let _ = client.abort_stream(&e.to_string()).await;
            return Err((e.to_string(), false));
        }
    };
    let started = Instant::now();
    tracing::info!(%to, argv = %child.argv(), "sending");
    let Some(mut stdout) = child.take_stdout() else {
        child.abort().await;
        let _ = client.abort_stream("zfs send has no stdout").await;
        return Err(("zfs send has no stdout".into(), false));
    };
    let pumped = client.pump(&mut stdout, |_| {}).await;
    drop(stdout);
    let bytes = match pumped {
        Ok(n) => n,
        Err(ClientError::Source(e)) => {
            child.abort().await;
            let reason = format!("reading zfs send: {e}");
            return match client.abort_stream(&reason).await {
                Ok(()) => Err((reason, false)),
                Err(e) => Err((reason, e.is_connection_lost())),
            };
        }
        Err(e) => {
            child.abort().await;
            return Err(lost(e));
        }
    };
    if let Err(e) = child.close().await {
        let reason = e.to_string();
        return match client.abort_stream(&reason).await {
            Ok(()) => Err((reason, false)),
            Err(e) => Err((reason, e.is_connection_lost())),
        };
    }
    client.end_stream(bytes).await.map_err(lost)?;
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    tracing::info!(%to, bytes, "sent {} in {secs:.1} s ({}/s)", human_bytes(bytes), human_bytes((bytes as f64 / secs) as u64));
    Ok(bytes)
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
    let report = match Client::connect(&opts.client).await {
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
            for f in &report.failed {
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
            for o in outcomes.iter_mut() {
                if let Status::Sent {
                    buffered: true,
                    placed: false,
                    ..
                } = o.status
                {
                    o.status = Status::Failed {
                        reason: format!("received into the buffer, but cleanbuffer failed: {e}"),
                    };
                }
            }
            CleanReport::default()
        }
    }
}

/// Formats the per-dataset summary for printing.
pub fn summary(opts_source: &DatasetName, receiver: &str, report: &Report) -> String {
    let mut s = String::new();
    if report.dry_run {
        s.push_str("DRY RUN: nothing was changed on either side\n");
    }
    if let Some(snap) = &report.snapshot {
        s.push_str(&format!("snapshot taken: {snap}\n"));
    }
    s.push_str(&summary::render(
        opts_source,
        receiver,
        &report.outcomes,
        report.elapsed,
        50,
    ));
    s.push_str(&summary::render_after(
        &report.retention,
        report.mirrored,
        &report.clean,
        report.dry_run,
        report.delete,
    ));
    s.push_str(&summary::result_line(
        &report.outcomes,
        report.dry_run,
        report.unreachable.as_deref(),
        report.retention.errors.len(),
    ));
    s
}
