//! The queue of datasets and the worker loop: each worker holds one
//! connection, takes datasets parent-first until the queue is empty or the
//! run is stopped, and decides by the failure's class what becomes of a
//! dataset that failed (tried again later in the run, or reported).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use zfsync_common::client::{Client, ClientError, ClientOptions};
use zfsync_common::naming::RelPath;
use zfsync_common::protocol::SyncReply;
use zfsync_common::zfs::Dataset;

use crate::dataset::{self, Flight};
use crate::error::{Class, DatasetError};
use crate::report::{Outcome, Status};
use crate::Options;

/// How often a dataset the receiver calls busy is tried in one run.
const BUSY_TRIES: u32 = 5;

/// One dataset to sync.
#[derive(Clone, Debug)]
pub(crate) struct Job {
    pub rel: RelPath,
    pub dataset: Dataset,
    /// Earlier attempts that found the dataset busy on the receiver.
    pub tries: u32,
    /// The receiver's answer for it in the tree's plan: its first stream
    /// then opens it (no round trip of its own). `None`: ask first (no
    /// plan, a resume offer, a retry).
    pub plan: Option<SyncReply>,
}

/// The datasets still to sync and what became of the others, shared by
/// the workers.
pub(crate) struct Queue {
    /// Taken from the front by every worker (parent-first); a busy dataset
    /// goes back to the end. A mutex, not a channel: jobs go back in.
    jobs: Mutex<VecDeque<Job>>,
    /// Pushed by whichever worker finished a dataset.
    done: Mutex<Vec<Outcome>>,
    /// New datasets on their way, by the worker sending them: a child of
    /// one waits for it (or goes after it on the same connection, which
    /// the receiver serves in order) rather than arrive first and go
    /// through the buffer, to be renamed into place at cleanbuffer.
    new_in_flight: Mutex<HashMap<RelPath, usize>>,
    /// Woken when a dataset leaves a worker (done, failed, back in the
    /// queue): what waited for it may go.
    settled: Notify,
    /// Datasets still busy after their tries, kept for a second pass after
    /// cleanbuffer (`None`: this is the second pass, report them). Their
    /// parent may be in the buffer until then (a child whose buffer name
    /// would be too long waits for its parent to be in place).
    deferred: Option<Mutex<Vec<Job>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Queue {
    /// `defer`: keep what stays busy for a second pass (see
    /// [`Queue::deferred`]).
    pub fn new(jobs: Vec<Job>, defer: bool) -> Queue {
        Queue {
            jobs: Mutex::new(jobs.into()),
            done: Mutex::new(Vec::new()),
            new_in_flight: Mutex::new(HashMap::new()),
            settled: Notify::new(),
            deferred: defer.then(|| Mutex::new(Vec::new())),
        }
    }

    /// Sets `job` aside for the second pass; false (and nothing done) when
    /// this is the second pass.
    fn defer(&self, job: &Job) -> bool {
        match &self.deferred {
            Some(d) => {
                lock(d).push(Job {
                    tries: 0,
                    plan: None,
                    ..job.clone()
                });
                true
            }
            None => false,
        }
    }

    /// The jobs set aside for a second pass.
    pub fn deferred(&self) -> Vec<Job> {
        self.deferred
            .as_ref()
            .map(|d| std::mem::take(&mut *lock(d)))
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        lock(&self.jobs).len()
    }

    /// The first job `worker` may take: not one whose parent is a new
    /// dataset another worker is sending, or still in the queue.
    fn pop(&self, worker: usize) -> Pop {
        let mut jobs = lock(&self.jobs);
        if jobs.is_empty() {
            return Pop::Empty;
        }
        let mut flying = lock(&self.new_in_flight);
        let mut waiting: HashSet<&RelPath> = HashSet::new();
        let mut found = None;
        for (i, job) in jobs.iter().enumerate() {
            let blocked = job.rel.parent().is_some_and(|p| {
                waiting.contains(&p) || flying.get(&p).is_some_and(|w| *w != worker)
            });
            if !blocked {
                found = Some(i);
                break;
            }
            waiting.insert(&job.rel);
        }
        let Some(job) = found.and_then(|i| jobs.remove(i)) else {
            return Pop::Wait;
        };
        if let Some(SyncReply::New { .. }) = job.plan {
            flying.insert(job.rel.clone(), worker);
        }
        Pop::Job(Box::new(job))
    }

    /// `rel` left its worker: what waited for it may go.
    fn release(&self, rel: &RelPath) {
        if lock(&self.new_in_flight).remove(rel).is_some() {
            self.settled.notify_waiters();
        }
    }

    fn push_back(&self, job: Job) {
        self.release(&job.rel);
        lock(&self.jobs).push_back(job);
    }

    /// Back to the front: not started (its connection was lost first).
    fn push_front(&self, job: Job) {
        self.release(&job.rel);
        lock(&self.jobs).push_front(job);
    }

    fn record(&self, outcome: Outcome) {
        lock(&self.done).push(outcome);
    }

    /// What was done, and the jobs no worker took.
    pub fn finish(&self) -> (Vec<Outcome>, Vec<Job>) {
        (
            std::mem::take(&mut *lock(&self.done)),
            lock(&self.jobs).drain(..).collect(),
        )
    }
}

/// What [`Queue::pop`] has for a worker.
enum Pop {
    Job(Box<Job>),
    /// Every job left waits for a parent another worker is sending.
    Wait,
    Empty,
}

/// Connects, unless the run is stopped first (`None`).
pub(crate) async fn connect(
    opts: &ClientOptions,
    shutdown: &CancellationToken,
) -> Option<Result<Client, ClientError>> {
    tokio::select! {
        c = Client::connect(opts) => Some(c),
        _ = shutdown.cancelled() => None,
    }
}

/// What becomes of a dataset that failed.
#[derive(Debug, PartialEq, Eq)]
enum Then {
    /// Back to the end of the queue, tried again after a pause.
    Requeue,
    /// Reported as failed.
    Report,
}

/// A temporary failure that left the connection usable (the receiver is
/// busy with the dataset) is tried again, a few times, later in the run.
/// One that cost the connection is reported and left to the next run (a
/// receiver that cut the dataset once is likely to cut it again; what it
/// received whole is kept). A stopped run and a permanent failure are
/// reported.
fn then(e: &DatasetError, tries: u32) -> Then {
    match e.class() {
        Class::Temporary
            if !e.connection_lost()
                && !matches!(e, DatasetError::Cancelled)
                && tries + 1 < BUSY_TRIES =>
        {
            Then::Requeue
        }
        Class::Temporary | Class::Permanent => Then::Report,
    }
}

/// Takes jobs until the queue is empty or the run is stopped. A lost
/// connection fails the job in progress; the worker reconnects and goes
/// on, or stops and leaves the rest to the other workers. A dataset the
/// receiver calls busy goes back to the end of the queue a few times. A
/// stop is seen between datasets and between streams; a stream in flight
/// is aborted (see [`crate::stream::pipe`]).
///
/// A dataset that takes one stream with the plan's answer is launched
/// ([`dataset::launch`]) and its answer read only once the next dataset
/// is on its way ([`dataset::land`]): one answer is owed at most, and a
/// dataset costs no round trip. A connection lost while an answer is owed
/// fails that dataset (the receiver was on it); the one launched after it
/// is asked about afresh on the next connection.
pub(crate) async fn worker(
    id: usize,
    mut client: Option<Client>,
    opts: &Options,
    queue: &Queue,
    shutdown: &CancellationToken,
) {
    let mut flight: Option<(Job, Flight)> = None;
    while !shutdown.is_cancelled() {
        if client.is_none() {
            match connect(&opts.client, shutdown).await {
                Some(Ok(c)) => client = Some(c),
                Some(Err(e)) => {
                    tracing::warn!(worker = id, "cannot connect: {e}");
                    return;
                }
                None => break,
            }
        }
        let Some(c) = client.as_mut() else {
            return;
        };
        let job = match queue.pop(id) {
            Pop::Job(job) => *job,
            // The last answer may put its dataset back in the queue; it
            // may be the parent others wait for.
            Pop::Empty | Pop::Wait if flight.is_some() => {
                if land(id, c, queue, flight.take()).await {
                    client = None;
                }
                continue;
            }
            Pop::Empty => break,
            Pop::Wait => {
                let settled = queue.settled.notified();
                tokio::select! {
                    _ = settled => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = shutdown.cancelled() => {}
                }
                continue;
            }
        };
        if dataset::launchable(&job, opts, c.path()) {
            let launched = dataset::launch(c, opts, &job, shutdown).await;
            // The previous dataset's answer came meanwhile.
            let lost = land(id, c, queue, flight.take()).await;
            match launched {
                Ok(f) if !lost => {
                    flight = Some((job, f));
                    continue;
                }
                // The connection went while the receiver was still on the
                // previous dataset, which is failed for it; this one is
                // asked about afresh on the next connection.
                Ok(_) => queue.push_front(Job { plan: None, ..job }),
                Err(e) if lost && e.connection_lost() => {
                    queue.push_front(Job { plan: None, ..job })
                }
                Err(e) => {
                    if conclude(id, queue, job, Err(e)) {
                        client = None;
                    }
                }
            }
            if lost {
                client = None;
            }
            continue;
        }
        if land(id, c, queue, flight.take()).await {
            client = None;
            queue.push_front(job);
            continue;
        }
        if job.tries > 0 {
            let pause = tokio::time::sleep(Duration::from_secs(u64::from(job.tries)));
            tokio::select! {
                _ = pause => {}
                _ = shutdown.cancelled() => {
                    queue.push_back(job);
                    break;
                }
            }
        }
        let result = dataset::sync(c, opts, &job, shutdown).await;
        if conclude(id, queue, job, result) {
            client = None;
        }
    }
    if let Some(c) = client.as_mut() {
        if land(id, c, queue, flight.take()).await {
            return;
        }
    }
    if let Some(c) = client {
        c.bye().await;
    }
}

/// Reads the answer owed for a launched dataset (if any) and records it;
/// true when the connection is lost.
async fn land(id: usize, c: &mut Client, queue: &Queue, flight: Option<(Job, Flight)>) -> bool {
    let Some((job, f)) = flight else {
        return false;
    };
    let result = dataset::land(c, f).await;
    conclude(id, queue, job, result)
}

/// Records what became of a dataset, or puts it back in the queue (busy,
/// see [`then`]); true when the connection is lost.
fn conclude(id: usize, queue: &Queue, mut job: Job, result: Result<Status, DatasetError>) -> bool {
    queue.release(&job.rel);
    let mut lost = false;
    let status = match result {
        Ok(status) => status,
        Err(e) => {
            lost = e.connection_lost();
            if then(&e, job.tries) == Then::Requeue {
                tracing::info!(worker = id, dataset = %job.dataset.name, "{e}; trying again later");
                job.tries += 1;
                // Asked afresh: the plan's answer is out of date.
                job.plan = None;
                queue.push_back(job);
                return lost;
            }
            if matches!(e, DatasetError::Busy { .. }) && queue.defer(&job) {
                tracing::info!(worker = id, dataset = %job.dataset.name, "still busy on the receiver; tried again after cleanbuffer");
                return lost;
            }
            Status::Failed {
                reason: e.to_string(),
            }
        }
    };
    match &status {
        Status::Failed { reason } => {
            tracing::warn!(worker = id, dataset = %job.dataset.name, "failed: {reason}")
        }
        other => tracing::info!(worker = id, dataset = %job.dataset.name, ?other, "done"),
    }
    queue.record(Outcome {
        dataset: job.dataset.name,
        status,
    });
    lost
}

#[cfg(test)]
mod tests {
    use zfsync_common::protocol::ProtocolError;

    use super::*;
    use crate::error::StreamFailure;

    fn new_job(rel: &str) -> Job {
        let rel = RelPath::new(rel).unwrap();
        let name = zfsync_common::naming::DatasetName::new(&format!("p{}", rel.as_str())).unwrap();
        Job {
            rel,
            dataset: Dataset {
                name,
                guid: 1,
                kind: "filesystem".into(),
                snapshots: Vec::new(),
                props: Default::default(),
                held: Default::default(),
                bookmarks: Vec::new(),
                resume_token: None,
                encrypted: false,
                written: None,
            },
            tries: 0,
            plan: Some(SyncReply::New { buffered: false }),
        }
    }

    fn took(p: Pop) -> String {
        match p {
            Pop::Job(j) => j.rel.as_str().to_string(),
            Pop::Wait => "wait".into(),
            Pop::Empty => "empty".into(),
        }
    }

    #[test]
    fn a_new_datasets_children_wait_for_it_or_follow_it_on_its_connection() {
        let q = Queue::new(
            ["", "/a", "/a/b", "/c"].map(new_job).into_iter().collect(),
            false,
        );
        assert_eq!(took(q.pop(0)), "");
        // Every other job's parent is on its way (or still queued).
        assert_eq!(took(q.pop(1)), "wait");
        // Worker 0 sends the children after their parent.
        assert_eq!(took(q.pop(0)), "/a");
        q.release(&RelPath::new("").unwrap());
        assert_eq!(took(q.pop(1)), "/c");
        assert_eq!(took(q.pop(1)), "wait");
        q.release(&RelPath::new("/a").unwrap());
        assert_eq!(took(q.pop(1)), "/a/b");
        assert_eq!(took(q.pop(1)), "empty");
    }

    #[test]
    fn what_becomes_of_a_failure() {
        let busy = || DatasetError::Busy {
            reason: "busy".into(),
        };
        let lost = || DatasetError::Connection(ClientError::Protocol(ProtocolError::Closed));
        let cases: Vec<(DatasetError, u32, Then)> = vec![
            (busy(), 0, Then::Requeue),
            (busy(), BUSY_TRIES - 2, Then::Requeue),
            (busy(), BUSY_TRIES - 1, Then::Report),
            // The receiver rolled its replica back: sent again.
            (
                DatasetError::Connection(ClientError::TryAgain("rolled back".into())),
                0,
                Then::Requeue,
            ),
            (lost(), 0, Then::Report),
            (DatasetError::ResumeTwice, 0, Then::Report),
            (DatasetError::Cancelled, 0, Then::Report),
            (
                DatasetError::Refused {
                    reason: "no".into(),
                },
                0,
                Then::Report,
            ),
            (
                DatasetError::Stream {
                    failure: StreamFailure::NoStdout,
                    connection_lost: false,
                },
                0,
                Then::Report,
            ),
        ];
        for (e, tries, want) in cases {
            assert_eq!(then(&e, tries), want, "{e:?} after {tries} tries");
        }
    }
}
