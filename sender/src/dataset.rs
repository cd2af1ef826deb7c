//! One dataset's sync: ask the receiver what it needs, resume a cut
//! transfer, send the steps of the plan, finish. The receiver's answer is
//! turned into what to do by pure functions ([`decide`],
//! [`dry_run_plan`], [`base_name`]), table-tested below.

use tokio_util::sync::CancellationToken;
use zfsync_common::caps::SendPath;
use zfsync_common::client::{Client, Pumped};
use zfsync_common::naming::SnapshotName;
use zfsync_common::plan::{steps_with_bookmarks, Decision};
use zfsync_common::protocol::{SyncReply, SyncRequest};
use zfsync_common::zfs::{SendWhat, Snapshot, ZfsError};

use crate::error::DatasetError;
use crate::report::{human_bytes, SendKind, Status};
use crate::stream::{self, Announce, Ending, Outgoing};
use crate::worker::Job;
use crate::Options;

/// The sync request for a dataset; `Err` with its status or failure when
/// there is nothing to ask (no snapshots; an encrypted dataset and a
/// receiver that cannot take raw streams).
pub(crate) fn request(
    job: &Job,
    opts: &Options,
    path: SendPath,
    receiver_zfs: &str,
) -> Result<SyncRequest, Result<Status, DatasetError>> {
    let snaps = &job.dataset.snapshots;
    if snaps.is_empty() {
        return Err(Ok(Status::NoSnapshots));
    }
    if job.dataset.encrypted && !path.raw {
        return Err(Err(DatasetError::Encrypted {
            dataset: job.dataset.name.clone(),
            receiver_zfs: receiver_zfs.to_string(),
        }));
    }
    Ok(SyncRequest::new(&job.rel, snaps)
        .bookmarks(bookmarks(job, path))
        .allow_full(opts.allow_full)
        .dry_run(opts.dry_run))
}

/// The bookmarks a dataset offers as incremental bases (where both ends
/// have bookmarks).
fn bookmarks(job: &Job, path: SendPath) -> &[Snapshot] {
    if path.bookmarks {
        &job.dataset.bookmarks
    } else {
        &[]
    }
}

/// What becomes of a dataset after the tree's plan answered for it.
#[derive(Debug)]
pub(crate) enum Settled {
    /// Nothing to send: its status (up to date; in a dry run, what would
    /// be done) or failure (refused, needs `--full`).
    Done(Result<Status, DatasetError>),
    /// Streams follow; the first one opens it on the receiver.
    Send,
    /// Asked about on its own (a resume offer, busy).
    Ask,
}

/// Settles a dataset by the tree plan's `reply`.
pub(crate) fn settle(job: &Job, reply: &SyncReply, path: SendPath, dry_run: bool) -> Settled {
    let snaps = &job.dataset.snapshots;
    if let SyncReply::Resume { .. }
    | SyncReply::Refused {
        temporary: true, ..
    } = reply
    {
        return Settled::Ask;
    }
    if dry_run {
        if let Some(what) = dry_run_plan(reply, snaps, bookmarks(job, path)) {
            return Settled::Done(Ok(Status::Planned { what }));
        }
    }
    match decide(reply.clone(), snaps.len(), Pumped::default()) {
        Ok(Next::Done(status)) => Settled::Done(Ok(status)),
        Ok(Next::Send { .. }) => Settled::Send,
        Err(e) => Settled::Done(Err(e)),
    }
}

/// Syncs one dataset: with the tree plan's answer for it (`job.plan`)
/// its first stream carries the sync request (`Put`), else the receiver
/// is asked first (`Sync`). The run's stop (`shutdown`) is honoured
/// between streams, and mid-stream by aborting it; a dataset whose
/// streams all arrived is still finished (with its last stream).
pub(crate) async fn sync(
    client: &mut Client,
    opts: &Options,
    job: &Job,
    shutdown: &CancellationToken,
) -> Result<Status, DatasetError> {
    let snaps = &job.dataset.snapshots;
    let request = match request(job, opts, client.path(), &client.peer_caps().version) {
        Ok(r) => r,
        Err(settled) => return settled,
    };
    let bookmarks = bookmarks(job, client.path());
    // With the plan's answer, the receiver opens the dataset with its
    // first stream; without (or for a large request, see PUT_BYTES), it
    // is asked now and opens it at once.
    let small = crate::plan::fits_put(&request);
    let (mut reply, opened) = match &job.plan {
        Some(reply) if small => (reply.clone(), false),
        _ => (
            client
                .sync(&request)
                .await
                .map_err(DatasetError::Connection)?,
            true,
        ),
    };
    // A transfer cut in an earlier run: go on from where it stopped.
    let mut resumed = Pumped::default();
    if let SyncReply::Resume { token } = &reply {
        if opts.dry_run {
            return Ok(Status::Planned {
                what: "would resume a cut transfer, then send what is newer".into(),
            });
        }
        if !opened {
            // Plan answers of this kind go the per-dataset way (see
            // `settle`); never here.
            return Err(DatasetError::Internal("a resume offer in the plan"));
        }
        let token = token.clone();
        reply = match resume(client, opts, job, &token, shutdown).await {
            Ok(sent) => {
                resumed = sent;
                if shutdown.is_cancelled() {
                    return Err(DatasetError::Cancelled);
                }
                client.sync(&request).await
            }
            Err(ResumeError::Stale(reason)) => {
                tracing::warn!(dataset = %job.dataset.name, "cannot resume the cut transfer: {reason}; the receiver discards it and the dataset is planned again");
                client.resume_failed(&reason).await
            }
            Err(ResumeError::Failed(e)) => return Err(e),
        }
        .map_err(DatasetError::Connection)?;
    }
    if opts.dry_run {
        if let Some(what) = dry_run_plan(&reply, snaps, bookmarks) {
            return Ok(Status::Planned { what });
        }
    }
    let (decision, kind, count) = match decide(reply, snaps.len(), resumed)? {
        Next::Done(status) => return Ok(status),
        Next::Send {
            decision,
            kind,
            count,
        } => (decision, kind, count),
    };
    if let Decision::Full { reason, .. } = &decision {
        tracing::warn!(dataset = %job.dataset.name, "replacing the receiver's copy (--full): {reason}");
    }
    let plan = steps_with_bookmarks(snaps, bookmarks, &decision);
    let Pumped {
        mut bytes,
        mut wire,
    } = resumed;
    let mut finished = None;
    for (i, step) in plan.iter().enumerate() {
        if shutdown.is_cancelled() {
            return Err(DatasetError::Cancelled);
        }
        let announce = if i == 0 && !opened {
            Announce::Put(&request)
        } else {
            Announce::More
        };
        let ending = if i + 1 == plan.len() {
            Ending::Finish
        } else {
            Ending::Stored
        };
        let sent = stream::send_step(
            client,
            opts.zfs.as_ref(),
            &job.dataset,
            step,
            (announce, ending),
            shutdown,
        )
        .await?;
        bytes += sent.bytes;
        wire += sent.wire;
        finished = sent.finished;
    }
    let finished = match finished {
        Some(f) => f,
        // No stream (never for a plan answer): finish the open dataset.
        None if opened => client.finish().await.map_err(DatasetError::Connection)?,
        None => return Err(DatasetError::Internal("a planned dataset without a stream")),
    };
    Ok(Status::Sent {
        kind,
        from: base_name(&decision, snaps, bookmarks),
        to: snaps.last().map(|s| s.name.to_string()).unwrap_or_default(),
        snapshots: count,
        bytes,
        wire,
        buffered: finished.buffered,
        placed: false,
        mirrored: finished.pruned.len(),
    })
}

/// A dataset whose one stream went out with its answer owed (see
/// [`launch`]); [`land`] reads the answer.
#[derive(Debug)]
pub(crate) struct Flight {
    kind: SendKind,
    from: Option<String>,
    to: String,
    snapshots: usize,
    pumped: Pumped,
}

/// The plan's answer for `job` and the one step it takes, when it takes
/// exactly one (an incremental, a new dataset with one snapshot): such a
/// dataset can be launched without waiting for its answer.
fn one_step(job: &Job, path: SendPath) -> Option<(Decision, SendKind, usize)> {
    let snaps = &job.dataset.snapshots;
    let Ok(Next::Send {
        decision,
        kind,
        count,
    }) = decide(job.plan.clone()?, snaps.len(), Pumped::default())
    else {
        return None;
    };
    (steps_with_bookmarks(snaps, bookmarks(job, path), &decision).len() == 1)
        .then_some((decision, kind, count))
}

/// Can `job` go out with [`launch`]?
pub(crate) fn launchable(job: &Job, opts: &Options, path: SendPath) -> bool {
    !opts.dry_run
        && one_step(job, path).is_some()
        && request(job, opts, path, "").is_ok_and(|r| crate::plan::fits_put(&r))
}

/// Sends a dataset the plan said takes one stream ([`launchable`]):
/// `Put`, the data, `End`, and does not wait for the answer, which
/// [`land`] reads once the next dataset is on its way.
pub(crate) async fn launch(
    client: &mut Client,
    opts: &Options,
    job: &Job,
    shutdown: &CancellationToken,
) -> Result<Flight, DatasetError> {
    let path = client.path();
    let request = match request(job, opts, path, &client.peer_caps().version) {
        Ok(r) => r,
        Err(Err(e)) => return Err(e),
        Err(Ok(_)) => return Err(DatasetError::Internal("launched with nothing to send")),
    };
    let Some((decision, kind, count)) = one_step(job, path) else {
        return Err(DatasetError::Internal("launched without a one-step plan"));
    };
    if let Decision::Full { reason, .. } = &decision {
        tracing::warn!(dataset = %job.dataset.name, "replacing the receiver's copy (--full): {reason}");
    }
    let snaps = &job.dataset.snapshots;
    let bookmarks = bookmarks(job, path);
    let plan = steps_with_bookmarks(snaps, bookmarks, &decision);
    let mut pumped = Pumped::default();
    for step in &plan {
        let sent = stream::send_step(
            client,
            opts.zfs.as_ref(),
            &job.dataset,
            step,
            (Announce::Put(&request), Ending::Defer),
            shutdown,
        )
        .await?;
        pumped.bytes += sent.bytes;
        pumped.wire += sent.wire;
    }
    Ok(Flight {
        kind,
        from: base_name(&decision, snaps, bookmarks),
        to: snaps.last().map(|s| s.name.to_string()).unwrap_or_default(),
        snapshots: count,
        pumped,
    })
}

/// Reads the answer owed for a launched dataset.
pub(crate) async fn land(client: &mut Client, flight: Flight) -> Result<Status, DatasetError> {
    let finished = client
        .owed_reply()
        .await
        .map_err(DatasetError::Connection)?;
    Ok(Status::Sent {
        kind: flight.kind,
        from: flight.from,
        to: flight.to,
        snapshots: flight.snapshots,
        bytes: flight.pumped.bytes,
        wire: flight.pumped.wire,
        buffered: finished.buffered,
        placed: false,
        mirrored: finished.pruned.len(),
    })
}

/// What a (non-resume) answer of the receiver asks of this side.
#[derive(Debug, PartialEq)]
enum Next {
    /// Nothing to send: the dataset's status.
    Done(Status),
    Send {
        decision: Decision,
        kind: SendKind,
        /// Snapshots that will arrive.
        count: usize,
    },
}

/// Maps the receiver's answer to what to do. `snapshots`: how many the
/// source has; `resumed`: what a cut transfer completed just before sent.
fn decide(reply: SyncReply, snapshots: usize, resumed: Pumped) -> Result<Next, DatasetError> {
    Ok(match reply {
        // The resumed stream brought the newest snapshot.
        SyncReply::UpToDate { snapshot } if resumed.bytes > 0 => Next::Done(Status::Sent {
            kind: SendKind::Incremental,
            from: None,
            to: snapshot,
            snapshots: 1,
            bytes: resumed.bytes,
            wire: resumed.wire,
            buffered: false,
            placed: false,
            mirrored: 0,
        }),
        SyncReply::UpToDate { snapshot } => Next::Done(Status::UpToDate { snapshot }),
        SyncReply::Incremental { base_guid, count } => Next::Send {
            decision: Decision::Incremental {
                base_guid,
                count: count as usize,
            },
            kind: SendKind::Incremental,
            count: count as usize,
        },
        SyncReply::New { buffered } => Next::Send {
            decision: Decision::New { buffered },
            kind: SendKind::Full,
            count: snapshots,
        },
        SyncReply::Full {
            reason,
            accepted: true,
        } => Next::Send {
            decision: Decision::Full {
                reason,
                accepted: true,
            },
            kind: SendKind::Replaced,
            count: snapshots,
        },
        SyncReply::Full {
            reason,
            accepted: false,
        } => return Err(DatasetError::NeedsFull { reason }),
        SyncReply::Refused {
            reason,
            temporary: true,
        } => return Err(DatasetError::Busy { reason }),
        SyncReply::Refused {
            reason,
            temporary: false,
        } => return Err(DatasetError::Refused { reason }),
        SyncReply::Resume { .. } => return Err(DatasetError::ResumeTwice),
    })
}

/// `--dry-run`: what the answer would make this side do; `None` where the
/// answer is reported as in a real run (up to date, refused, needs full).
fn dry_run_plan(reply: &SyncReply, snaps: &[Snapshot], bookmarks: &[Snapshot]) -> Option<String> {
    let newest = snaps.last().map(|s| s.name.to_string()).unwrap_or_default();
    match reply {
        SyncReply::Incremental { base_guid, count } => {
            let decision = Decision::Incremental {
                base_guid: *base_guid,
                count: *count as usize,
            };
            // A snapshot as `@name`, a bookmark as `#name`.
            let base = match base_name(&decision, snaps, bookmarks) {
                Some(b) if b.starts_with('#') => b,
                Some(b) => format!("@{b}"),
                None => "@".to_string(),
            };
            Some(format!(
                "would send incremental {base}..@{newest}, {count} snapshot(s)"
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
    }
}

/// The base of an incremental as the summary shows it: `snap`, or
/// `#bookmark` when the base is one of the sender's bookmarks.
fn base_name(decision: &Decision, snaps: &[Snapshot], bookmarks: &[Snapshot]) -> Option<String> {
    let Decision::Incremental { base_guid, .. } = decision else {
        return None;
    };
    snaps
        .iter()
        .find(|s| s.guid == *base_guid)
        .map(|s| s.name.to_string())
        .or_else(|| {
            bookmarks
                .iter()
                .find(|b| b.guid == *base_guid)
                .map(|b| format!("#{}", b.name))
        })
}

enum ResumeError {
    /// The token cannot be used here (its snapshot is gone, it names
    /// another dataset): the receiver discards the partial state.
    Stale(String),
    /// The resumed stream, or reading the token, failed.
    Failed(DatasetError),
}

/// Continues a cut transfer with `zfs send -t TOKEN`, after checking that
/// the token names a snapshot of this very dataset that was announced.
async fn resume(
    client: &mut Client,
    opts: &Options,
    job: &Job,
    token: &str,
    shutdown: &CancellationToken,
) -> Result<Pumped, ResumeError> {
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
        Err(e) => return Err(ResumeError::Failed(DatasetError::ResumeToken(e))),
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
    let what = SendWhat::Resume {
        token: token.to_string(),
    };
    let to_name = job
        .dataset
        .name
        .snapshot(&to.name)
        .map_err(|e| ResumeError::Failed(DatasetError::Name(e)))?;
    let out = Outgoing {
        to: &to_name,
        what: &what,
        flags: &flags,
        from_guid: (info.from_guid != 0).then_some(info.from_guid),
        to_snap: to,
        resume: true,
        announce: Announce::Checked,
        ending: Ending::Stored,
    };
    let sent = stream::pipe(client, opts.zfs.as_ref(), &out, shutdown)
        .await
        .map_err(ResumeError::Failed)?;
    tracing::info!(dataset = %job.dataset.name, bytes = sent.bytes, "resumed transfer complete");
    Ok(Pumped {
        bytes: sent.bytes,
        wire: sent.wire,
    })
}

#[cfg(test)]
mod tests;
