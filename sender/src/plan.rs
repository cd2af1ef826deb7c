//! The whole tree in one negotiation: before any stream, the receiver is
//! told every dataset's snapshots ([`Client::plan`], in requests of at
//! most [`PLAN_BYTES`]) and answers what each needs. Datasets that need
//! nothing (up to date), or cannot be sent (refused, needs `--full`), are
//! settled here with no further word; the others go to the workers with
//! their answer, and their first stream opens them on the receiver (no
//! round trip of their own). A tree with nothing new costs one round trip.

use zfsync_common::client::{Client, ClientError};
use zfsync_common::protocol::{PlanReply, SyncRequest};

use crate::dataset::{self, Settled};
use crate::report::{Outcome, Status};
use crate::worker::Job;
use crate::Options;

/// Most bytes of snapshot lists (estimated) in one plan request: a large
/// frame on the receiver is read only when its memory budget has room.
pub(crate) const PLAN_BYTES: usize = 1 << 20;
/// Most datasets in one plan request (the receiver takes 4096).
pub(crate) const PLAN_DATASETS: usize = 2048;

/// A dataset whose sync request is larger than this (estimated) is asked
/// about with `Sync` first rather than opened by its stream's `Put`: the
/// receiver reads a message over 64 KiB only when its memory budget has
/// room, and a `Put` it had to refuse would leave its data unexpected.
const PUT_BYTES: usize = 48 << 10;

/// Can `req` travel in a `Put` (see [`PUT_BYTES`])?
pub(crate) fn fits_put(req: &SyncRequest) -> bool {
    estimate(req) <= PUT_BYTES
}

/// About what a request's JSON takes.
fn estimate(req: &SyncRequest) -> usize {
    let snap = |s: &zfsync_common::protocol::WireSnap| s.name.len() + 64;
    64 + req.path.len()
        + req.snapshots.iter().map(snap).sum::<usize>()
        + req.bookmarks.iter().map(snap).sum::<usize>()
}

/// Splits `items` (with their job's index) into requests of at most
/// [`PLAN_BYTES`] and [`PLAN_DATASETS`] (a single larger item goes alone).
fn chunks(items: Vec<(usize, SyncRequest)>) -> Vec<Vec<(usize, SyncRequest)>> {
    let mut out: Vec<Vec<(usize, SyncRequest)>> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let size = estimate(&item.1);
        let full = out.last().is_none_or(|c| {
            c.len() >= PLAN_DATASETS || (bytes + size > PLAN_BYTES && !c.is_empty())
        });
        if full {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        if let Some(c) = out.last_mut() {
            c.push(item);
        }
    }
    out
}

/// Asks the receiver about every job; returns the jobs still to send
/// (each with its answer where there is one) and the outcomes settled.
/// `Err`: the connection failed (the jobs are returned unplanned).
pub(crate) async fn plan(
    client: &mut Client,
    opts: &Options,
    jobs: Vec<Job>,
) -> (Vec<Job>, Vec<Outcome>, Option<ClientError>) {
    let path = client.path();
    let receiver_zfs = client.peer_caps().version.clone();
    let mut settled = Vec::new();
    let mut items = Vec::new();
    let mut jobs: Vec<Option<Job>> = jobs.into_iter().map(Some).collect();
    for (i, slot) in jobs.iter_mut().enumerate() {
        let Some(job) = slot.as_ref() else { continue };
        match dataset::request(job, opts, path, &receiver_zfs) {
            Ok(req) => items.push((i, req)),
            Err(status) => {
                if let Some(job) = slot.take() {
                    settled.push(outcome(job, status));
                }
            }
        }
    }
    let asked = items.len();
    let mut error = None;
    for chunk in chunks(items) {
        let (index, reqs): (Vec<usize>, Vec<SyncRequest>) = chunk.into_iter().unzip();
        match client.plan(reqs).await {
            Ok(PlanReply::Answers(answers)) => {
                for (i, answer) in index.into_iter().zip(answers) {
                    let Some(job) = jobs[i].as_mut() else {
                        continue;
                    };
                    match dataset::settle(job, &answer, path, opts.dry_run) {
                        Settled::Done(status) => {
                            if let Some(job) = jobs[i].take() {
                                settled.push(outcome(job, status));
                            }
                        }
                        Settled::Send => job.plan = Some(answer),
                        Settled::Ask => {}
                    }
                }
            }
            // Those datasets are asked about one by one.
            Ok(PlanReply::Refused { reason, .. }) => {
                tracing::warn!(
                    "the receiver did not take the plan: {reason}; asking dataset by dataset"
                )
            }
            Err(e) => {
                tracing::warn!("planning the tree failed: {e}");
                error = Some(e);
                break;
            }
        }
    }
    let jobs: Vec<Job> = jobs.into_iter().flatten().collect();
    tracing::info!(
        datasets = asked,
        to_send = jobs.len(),
        settled = settled.len(),
        "planned the tree with the receiver"
    );
    (jobs, settled, error)
}

fn outcome(job: Job, status: Result<Status, crate::error::DatasetError>) -> Outcome {
    let status = match status {
        Ok(status) => {
            tracing::info!(dataset = %job.dataset.name, ?status, "done");
            status
        }
        Err(e) => {
            tracing::warn!(dataset = %job.dataset.name, "failed: {e}");
            Status::Failed {
                reason: e.to_string(),
            }
        }
    };
    Outcome {
        dataset: job.dataset.name,
        status,
    }
}

#[cfg(test)]
mod tests {
    use zfsync_common::protocol::WireSnap;

    use super::*;

    fn req(path: &str, snaps: usize) -> SyncRequest {
        SyncRequest {
            path: path.into(),
            snapshots: (0..snaps)
                .map(|i| WireSnap {
                    name: format!("s{i}"),
                    guid: i as u64 + 1,
                    createtxg: i as u64 + 1,
                })
                .collect(),
            bookmarks: vec![],
            allow_full: false,
            dry_run: false,
        }
    }

    #[test]
    fn plans_are_cut_by_count_and_bytes() {
        let sizes = |items: Vec<(usize, SyncRequest)>| -> Vec<usize> {
            chunks(items).iter().map(Vec::len).collect()
        };
        // Small datasets: by count.
        let small = (0..5000).map(|i| (i, req("/a", 1))).collect();
        assert_eq!(sizes(small), vec![2048, 2048, 904]);
        // Many snapshots each: by bytes (about 67 bytes a snapshot).
        let big = (0..40).map(|i| (i, req("/a", 1000))).collect::<Vec<_>>();
        let cut = sizes(big);
        assert!(cut.len() > 1 && cut.iter().sum::<usize>() == 40, "{cut:?}");
        // One dataset beyond the limit still goes, alone.
        let huge = vec![(0, req("/a", 1)), (1, req("/b", 30_000)), (2, req("/c", 1))];
        assert_eq!(sizes(huge), vec![1, 1, 1]);
        assert!(chunks(Vec::new()).is_empty());
    }
}
