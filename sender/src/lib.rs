//! zfsync-send: lists the source tree once, then N workers (one TLS
//! connection each, reused for many datasets) take datasets parent-first
//! from one queue, negotiate with the receiver and stream `zfs send`.
//! After all datasets, one connection asks the receiver to place what it
//! buffered.

pub mod cli;
pub mod summary;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use zfsync_common::client::{Client, ClientError, ClientOptions};
use zfsync_common::naming::{DatasetName, RelPath};
use zfsync_common::plan::{steps, Decision, FullReason, Step};
use zfsync_common::protocol::Message;
use zfsync_common::zfs::{Dataset, Zfs, ZfsError};

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
}

pub struct Options {
    pub source: DatasetName,
    pub zfs: Zfs,
    pub client: ClientOptions,
    pub threads: usize,
    pub allow_full: bool,
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
pub struct Report {
    pub outcomes: Vec<Outcome>,
    pub elapsed: Duration,
}

impl Report {
    pub fn exit_code(&self) -> u8 {
        if self.outcomes.iter().any(Outcome::failed) {
            exit::FAILED
        } else {
            exit::OK
        }
    }
}

/// Lists the source tree in one `zfs` call; returns its datasets
/// parent-first.
async fn list_jobs(zfs: &Zfs, source: &DatasetName) -> Result<(Vec<Job>, Vec<Outcome>), SendError> {
    let tree = zfs.list_trees(&[source]).await?;
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
        .filter(|(name, _)| !name.contains('@'))
        .filter_map(|(name, why)| {
            tracing::warn!(%name, "cannot replicate: {why}");
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

/// Runs one replication. Errors only when nothing could be done at all
/// (no source, receiver unreachable); per-dataset failures are in the
/// report.
pub async fn run(opts: Options) -> Result<Report, SendError> {
    let started = Instant::now();
    let (jobs, mut outcomes) = list_jobs(&opts.zfs, &opts.source).await?;
    tracing::info!(datasets = jobs.len(), source = %opts.source, "listed the source tree");
    // Connect the first worker before anything else, so that an unreachable
    // or refusing receiver is one clear error.
    let first = Client::connect(&opts.client)
        .await
        .map_err(SendError::Connect)?;
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
    clean_buffer(&opts, &mut done).await;
    outcomes.extend(done);
    outcomes.sort_by(|a, b| a.dataset.cmp(&b.dataset));
    Ok(Report {
        outcomes,
        elapsed: started.elapsed(),
    })
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
    let reply = match client.sync(&job.rel, snaps, opts.allow_full).await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let (decision, kind, count) = match reply {
        Message::UpToDate { snapshot } => return (Status::UpToDate { snapshot }, false),
        Message::Incremental { base_guid, count } => (
            Decision::Incremental {
                base_guid,
                count: count as usize,
            },
            SendKind::Incremental,
            count as usize,
        ),
        Message::New { buffered } => (Decision::New { buffered }, SendKind::Full, snaps.len()),
        Message::Full {
            reason,
            accepted: true,
        } => {
            tracing::warn!(dataset = %job.dataset.name, "replacing the receiver's copy (--full): {reason}");
            (
            Decision::Full {
                reason: FullReason::TargetHasNoSnapshots,
                accepted: true,
            },
            SendKind::Replaced,
            snaps.len(),
        )
        }
        Message::Full {
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
        Message::Refused { reason, temporary } => {
            *busy = temporary;
            return (
                Status::Failed {
                    reason: format!("refused by the receiver: {reason}"),
                },
                false,
            )
        }
        other => {
            return (
                Status::Failed {
                    reason: format!("unexpected reply {} from the receiver", other.name()),
                },
                true,
            )
        }
    };
    let plan = steps(snaps, &decision);
    let mut bytes = 0u64;
    for step in &plan {
        match send_step(client, opts, &job.dataset.name, step).await {
            Ok(n) => bytes += n,
            Err((reason, lost)) => return (Status::Failed { reason }, lost),
        }
    }
    let (_, buffered) = match client.finish().await {
        Ok(x) => x,
        Err(e) => return failed(e),
    };
    let from = match &decision {
        Decision::Incremental { base_guid, .. } => snaps
            .iter()
            .find(|s| s.guid == *base_guid)
            .map(|s| s.name.to_string()),
        _ => None,
    };
    let to = snaps.last().map(|s| s.name.to_string()).unwrap_or_default();
    (
        Status::Sent {
            kind,
            from,
            to,
            snapshots: count,
            bytes,
            buffered,
            placed: false,
        },
        false,
    )
}

/// One `zfs send` piped to the receiver. Err carries (reason, connection
/// lost).
async fn send_step(
    client: &mut Client,
    opts: &Options,
    dataset: &DatasetName,
    step: &Step<'_>,
) -> Result<u64, (String, bool)> {
    let name = |s: &zfsync_common::zfs::Snapshot| {
        dataset
            .snapshot(&s.name)
            .map_err(|e| (e.to_string(), false))
    };
    let to = name(step.to)?;
    let from = match step.from {
        Some(f) => Some(name(f)?),
        None => None,
    };
    let lost = |e: ClientError| {
        let l = e.is_connection_lost();
        (e.to_string(), l)
    };
    client
        .begin_stream(step.from.map(|f| f.guid), step.to)
        .await
        .map_err(lost)?;
    let mut child = match opts.zfs.spawn_send(from.as_ref(), &to) {
        Ok(c) => c,
        Err(e) => {
            let _ = client.abort_stream(&e.to_string()).await;
            return Err((e.to_string(), false));
        }
    };
    let started = Instant::now();
    tracing::info!(%to, from = ?from.as_ref().map(|f| f.to_string()), "sending");
    let Some(mut stdout) = child.take_stdout() else {
        child.kill().await;
        let _ = client.abort_stream("zfs send has no stdout").await;
        return Err(("zfs send has no stdout".into(), false));
    };
    let pumped = client.pump(&mut stdout, |_| {}).await;
    drop(stdout);
    let bytes = match pumped {
        Ok(n) => n,
        Err(ClientError::Source(e)) => {
            child.kill().await;
            let reason = format!("reading zfs send: {e}");
            return match client.abort_stream(&reason).await {
                Ok(()) => Err((reason, false)),
                Err(e) => Err((reason, e.is_connection_lost())),
            };
        }
        Err(e) => {
            child.kill().await;
            return Err(lost(e));
        }
    };
    if let Err(e) = child.wait().await {
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
async fn clean_buffer(opts: &Options, outcomes: &mut [Outcome]) {
    // A fresh connection: the workers' may have idled out meanwhile.
    let report = match Client::connect(&opts.client).await {
        Ok(mut c) => {
            let r = c.clean_buffer().await;
            c.bye().await;
            r
        }
        Err(e) => Err(e),
    };
    let dataset_of = |path: &str| {
        RelPath::new(path)
            .ok()
            .and_then(|rel| opts.source.join(&rel).ok())
    };
    match report {
        Ok((placed, failed)) => {
            for p in placed {
                let Some(ds) = dataset_of(&p) else { continue };
                if let Some(o) = outcomes.iter_mut().find(|o| o.dataset == ds) {
                    if let Status::Sent { placed, .. } = &mut o.status {
                        *placed = true;
                    }
                }
            }
            for f in failed {
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
        }
    }
}

/// Formats the per-dataset summary for printing.
pub fn summary(opts_source: &DatasetName, receiver: &str, report: &Report) -> String {
    summary::render(opts_source, receiver, &report.outcomes, report.elapsed, 50)
}
