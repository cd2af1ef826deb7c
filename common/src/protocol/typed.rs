//! The conversation, typed: what a sender may ask, and the answers each
//! request can get. The receiver turns every incoming [`Message`] into a
//! [`Request`] (a reply sent as a request is refused here); the sender turns
//! every answer into the reply type of its request with one `TryFrom`, so
//! neither end has catch-all arms.

use serde::{Deserialize, Serialize};

use crate::model::Snapshot;
use crate::naming::RelPath;
use crate::plan::FullReason;

use super::{Message, PlaceFailure, ProtocolError, WireSnap};

/// Asks what a dataset needs. Travels as the `Sync` message, and as an
/// item of `Plan` and `Put`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    /// Relative path: "" for the top dataset, else "/a/b" (checked by the
    /// receiver).
    pub path: String,
    /// Oldest first.
    pub snapshots: Vec<WireSnap>,
    /// The sender's bookmarks (OpenZFS): incremental bases only.
    #[serde(default)]
    pub bookmarks: Vec<WireSnap>,
    /// The sender runs with --full.
    pub allow_full: bool,
    /// Only say what would be done: no dataset is locked or created.
    #[serde(default)]
    pub dry_run: bool,
}

impl SyncRequest {
    pub fn new(path: &RelPath, snapshots: &[Snapshot]) -> SyncRequest {
        SyncRequest {
            path: path.as_str().to_string(),
            snapshots: snapshots.iter().map(WireSnap::from).collect(),
            bookmarks: Vec::new(),
            allow_full: false,
            dry_run: false,
        }
    }

    pub fn bookmarks(mut self, bookmarks: &[Snapshot]) -> SyncRequest {
        self.bookmarks = bookmarks.iter().map(WireSnap::from).collect();
        self
    }

    pub fn allow_full(mut self, yes: bool) -> SyncRequest {
        self.allow_full = yes;
        self
    }

    pub fn dry_run(mut self, yes: bool) -> SyncRequest {
        self.dry_run = yes;
        self
    }
}

/// Announces a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamRequest {
    pub from_guid: Option<u64>,
    pub to: WireSnap,
    /// The stream continues a cut one (`zfs send -t`).
    pub resume: bool,
    /// The data frames are zstd frames ([`crate::compress`]).
    pub compressed: bool,
}

/// Ends a run: place the buffer, judge orphans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CleanRequest {
    /// Every relative path of the source tree.
    pub source_paths: Vec<String>,
    /// Destroy orphaned replicas (only datasets zfsync created).
    pub delete_missing: bool,
    /// Report only; place and destroy nothing.
    pub dry_run: bool,
}

/// A dataset's sync request and its first stream in one message (`Put`),
/// or the next stream of the open dataset (`More`); the data follows at
/// once, and the answer comes after `End`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EagerStream {
    pub from_guid: Option<u64>,
    pub to: WireSnap,
    /// The dataset's last stream: a successful `End` finishes it too.
    pub finish: bool,
    /// The data frames are zstd frames ([`crate::compress`]); the
    /// [`Client`](crate::client::Client) sets it from its connection.
    pub compressed: bool,
}

/// What a sender may send between streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// What every dataset of the tree needs, in one request (no effect).
    Plan(Vec<SyncRequest>),
    Sync(SyncRequest),
    /// Sync and first stream at once.
    Put(SyncRequest, EagerStream),
    /// The open dataset's next stream, data at once.
    More(EagerStream),
    /// The sender cannot use a resume offer: discard it, answer the sync.
    ResumeFailed {
        reason: String,
    },
    Stream(StreamRequest),
    Finish,
    CleanBuffer(CleanRequest),
    Bye,
}

/// The answer to [`SyncRequest`] (also an item of `Planned`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case", deny_unknown_fields)]
pub enum SyncReply {
    /// The receiver's newest snapshot is the sender's newest.
    UpToDate { snapshot: String },
    /// Send everything after `base_guid`.
    Incremental { base_guid: u64, count: u64 },
    /// No such dataset; `buffered`: it goes to the buffer (no parent yet).
    New { buffered: bool },
    /// Only a full replacement helps; `accepted` under `--full`.
    Full { reason: FullReason, accepted: bool },
    /// Not now (`temporary`: busy) or not at all.
    Refused { reason: String, temporary: bool },
    /// A cut transfer can be continued with `zfs send -t token`.
    Resume { token: String },
}

impl SyncReply {
    /// A permanent refusal.
    pub fn refused(reason: impl Into<String>) -> SyncReply {
        SyncReply::Refused {
            reason: reason.into(),
            temporary: false,
        }
    }
}

/// The answer to [`StreamRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamReply {
    /// The announcement checks out; data may follow.
    Ready,
    Failed {
        reason: String,
    },
}

/// The answer to a stream's `End` (or `Abort`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stored {
    Received {
        bytes: u64,
    },
    /// `temporary`: worth sending again in this run.
    Failed {
        reason: String,
        temporary: bool,
    },
}

/// The answer to the `End` of a dataset's last eager stream
/// ([`EagerStream::finish`]): stored and finished, or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Landed {
    Done(Finished),
    /// The stream was not stored.
    Failed {
        reason: String,
        temporary: bool,
    },
    /// Stored, but the dataset could not be finished.
    Refused {
        reason: String,
        temporary: bool,
    },
}

/// The answer to `Plan`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanReply {
    /// One per dataset, in the plan's order.
    Answers(Vec<SyncReply>),
    /// The whole plan (the memory budget had no room, say): ask dataset
    /// by dataset instead.
    Refused { reason: String, temporary: bool },
}

/// The receiver's word on a finished dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    /// Where the dataset now is on the receiver.
    pub location: String,
    pub buffered: bool,
    /// Snapshots it destroyed to mirror the sender's retention.
    pub pruned: Vec<String>,
}

/// The answer to `Finish`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReply {
    Done(Finished),
    Refused { reason: String, temporary: bool },
}

/// The receiver's report at the end of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanReport {
    /// Placed from the buffer (in a dry run: would be).
    pub placed: Vec<String>,
    pub failed: Vec<PlaceFailure>,
    /// Replicas whose source is gone.
    pub orphans: Vec<String>,
    /// Orphans destroyed (`delete_missing`).
    pub deleted: Vec<String>,
}

/// How the reason of an entry of [`CleanReport::failed`] starts when it is
/// an orphan `--delete-missing` could not destroy (not a placement).
pub const DELETE_FAILED: &str = "cannot delete the orphaned replica";

impl CleanReport {
    /// The orphans `--delete-missing` could not destroy, from `failed`.
    pub fn delete_failures(&self) -> impl Iterator<Item = &PlaceFailure> {
        self.failed
            .iter()
            .filter(|f| f.reason.starts_with(DELETE_FAILED))
    }

    /// The datasets that could not be placed from the buffer.
    pub fn place_failures(&self) -> impl Iterator<Item = &PlaceFailure> {
        self.failed
            .iter()
            .filter(|f| !f.reason.starts_with(DELETE_FAILED))
    }
}

/// The answer to [`CleanRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CleanReply {
    Report(CleanReport),
    Refused { reason: String },
}

fn unexpected(got: &Message, expected: &str) -> ProtocolError {
    ProtocolError::Unexpected {
        got: format!("message {}", got.name()),
        expected: expected.to_string(),
    }
}

impl TryFrom<Message> for Request {
    type Error = ProtocolError;

    fn try_from(m: Message) -> Result<Request, ProtocolError> {
        Ok(match m {
            Message::Sync {
                path,
                snapshots,
                bookmarks,
                allow_full,
                dry_run,
            } => Request::Sync(SyncRequest {
                path,
                snapshots,
                bookmarks,
                allow_full,
                dry_run,
            }),
            Message::Plan { datasets } => Request::Plan(datasets),
            Message::Put {
                sync,
                from_guid,
                to,
                finish,
                compressed,
            } => Request::Put(
                sync,
                EagerStream {
                    from_guid,
                    to,
                    finish,
                    compressed,
                },
            ),
            Message::More {
                from_guid,
                to,
                finish,
                compressed,
            } => Request::More(EagerStream {
                from_guid,
                to,
                finish,
                compressed,
            }),
            Message::ResumeFailed { reason } => Request::ResumeFailed { reason },
            Message::Stream {
                from_guid,
                to,
                resume,
                compressed,
            } => Request::Stream(StreamRequest {
                from_guid,
                to,
                resume,
                compressed,
            }),
            Message::Finish => Request::Finish,
            Message::CleanBuffer {
                source_paths,
                delete_missing,
                dry_run,
            } => Request::CleanBuffer(CleanRequest {
                source_paths,
                delete_missing,
                dry_run,
            }),
            Message::Bye => Request::Bye,
            other => {
                return Err(unexpected(
                    &other,
                    "plan, sync, put, more, stream, finish, cleanbuffer or bye",
                ))
            }
        })
    }
}

impl From<Request> for Message {
    fn from(r: Request) -> Message {
        match r {
            Request::Sync(s) => Message::Sync {
                path: s.path,
                snapshots: s.snapshots,
                bookmarks: s.bookmarks,
                allow_full: s.allow_full,
                dry_run: s.dry_run,
            },
            Request::Plan(datasets) => Message::Plan { datasets },
            Request::Put(sync, s) => Message::Put {
                sync,
                from_guid: s.from_guid,
                to: s.to,
                finish: s.finish,
                compressed: s.compressed,
            },
            Request::More(s) => Message::More {
                from_guid: s.from_guid,
                to: s.to,
                finish: s.finish,
                compressed: s.compressed,
            },
            Request::ResumeFailed { reason } => Message::ResumeFailed { reason },
            Request::Stream(s) => Message::Stream {
                from_guid: s.from_guid,
                to: s.to,
                resume: s.resume,
                compressed: s.compressed,
            },
            Request::Finish => Message::Finish,
            Request::CleanBuffer(c) => Message::CleanBuffer {
                source_paths: c.source_paths,
                delete_missing: c.delete_missing,
                dry_run: c.dry_run,
            },
            Request::Bye => Message::Bye,
        }
    }
}

impl From<SyncReply> for Message {
    fn from(r: SyncReply) -> Message {
        match r {
            SyncReply::UpToDate { snapshot } => Message::UpToDate { snapshot },
            SyncReply::Incremental { base_guid, count } => {
                Message::Incremental { base_guid, count }
            }
            SyncReply::New { buffered } => Message::New { buffered },
            SyncReply::Full { reason, accepted } => Message::Full { reason, accepted },
            SyncReply::Refused { reason, temporary } => Message::Refused { reason, temporary },
            SyncReply::Resume { token } => Message::Resume { token },
        }
    }
}

impl TryFrom<Message> for SyncReply {
    type Error = ProtocolError;

    fn try_from(m: Message) -> Result<SyncReply, ProtocolError> {
        Ok(match m {
            Message::UpToDate { snapshot } => SyncReply::UpToDate { snapshot },
            Message::Incremental { base_guid, count } => {
                SyncReply::Incremental { base_guid, count }
            }
            Message::New { buffered } => SyncReply::New { buffered },
            Message::Full { reason, accepted } => SyncReply::Full { reason, accepted },
            Message::Refused { reason, temporary } => SyncReply::Refused { reason, temporary },
            Message::Resume { token } => SyncReply::Resume { token },
            other => return Err(unexpected(&other, "an answer to sync")),
        })
    }
}

impl From<StreamReply> for Message {
    fn from(r: StreamReply) -> Message {
        match r {
            StreamReply::Ready => Message::Ready,
            StreamReply::Failed { reason } => Message::StreamFailed {
                reason,
                temporary: false,
            },
        }
    }
}

impl TryFrom<Message> for StreamReply {
    type Error = ProtocolError;

    fn try_from(m: Message) -> Result<StreamReply, ProtocolError> {
        match m {
            Message::Ready => Ok(StreamReply::Ready),
            Message::StreamFailed { reason, .. } => Ok(StreamReply::Failed { reason }),
            other => Err(unexpected(&other, "ready")),
        }
    }
}

impl From<Stored> for Message {
    fn from(r: Stored) -> Message {
        match r {
            Stored::Received { bytes } => Message::Received { bytes },
            Stored::Failed { reason, temporary } => Message::StreamFailed { reason, temporary },
        }
    }
}

impl From<Landed> for Message {
    fn from(r: Landed) -> Message {
        match r {
            Landed::Done(f) => FinishReply::Done(f).into(),
            Landed::Failed { reason, temporary } => Message::StreamFailed { reason, temporary },
            Landed::Refused { reason, temporary } => Message::Refused { reason, temporary },
        }
    }
}

impl TryFrom<Message> for Landed {
    type Error = ProtocolError;

    fn try_from(m: Message) -> Result<Landed, ProtocolError> {
        match m {
            Message::StreamFailed { reason, temporary } => Ok(Landed::Failed { reason, temporary }),
            other => match FinishReply::try_from(other)? {
                FinishReply::Done(f) => Ok(Landed::Done(f)),
                FinishReply::Refused { reason, temporary } => {
                    Ok(Landed::Refused { reason, temporary })
                }
            },
        }
    }
}

impl From<PlanReply> for Message {
    fn from(r: PlanReply) -> Message {
        match r {
            PlanReply::Answers(answers) => Message::Planned { answers },
            PlanReply::Refused { reason, temporary } => Message::Refused { reason, temporary },
        }
    }
}

impl TryFrom<Message> for PlanReply {
    type Error = ProtocolError;

    fn try_from(m: Message) -> Result<PlanReply, ProtocolError> {
        match m {
            Message::Planned { answers } => Ok(PlanReply::Answers(answers)),
            Message::Refused { reason, temporary } => Ok(PlanReply::Refused { reason, temporary }),
            other => Err(unexpected(&other, "planned")),
        }
    }
}

impl TryFrom<Message> for Stored {
    type Error = ProtocolError;

    fn try_from(m: Message) -> Result<Stored, ProtocolError> {
        match m {
            Message::Received { bytes } => Ok(Stored::Received { bytes }),
            Message::StreamFailed { reason, temporary } => Ok(Stored::Failed { reason, temporary }),
            other => Err(unexpected(&other, "received")),
        }
    }
}

impl From<FinishReply> for Message {
    fn from(r: FinishReply) -> Message {
        match r {
            FinishReply::Done(f) => Message::Done {
                location: f.location,
                buffered: f.buffered,
                pruned: f.pruned,
            },
            FinishReply::Refused { reason, temporary } => Message::Refused { reason, temporary },
        }
    }
}

impl TryFrom<Message> for FinishReply {
    type Error = ProtocolError;

    fn try_from(m: Message) -> Result<FinishReply, ProtocolError> {
        match m {
            Message::Done {
                location,
                buffered,
                pruned,
            } => Ok(FinishReply::Done(Finished {
                location,
                buffered,
                pruned,
            })),
            Message::Refused { reason, temporary } => {
                Ok(FinishReply::Refused { reason, temporary })
            }
            other => Err(unexpected(&other, "done")),
        }
    }
}

impl From<CleanReply> for Message {
    fn from(r: CleanReply) -> Message {
        match r {
            CleanReply::Report(c) => Message::CleanReport {
                placed: c.placed,
                failed: c.failed,
                orphans: c.orphans,
                deleted: c.deleted,
            },
            CleanReply::Refused { reason } => Message::Refused {
                reason,
                temporary: false,
            },
        }
    }
}

impl TryFrom<Message> for CleanReply {
    type Error = ProtocolError;

    fn try_from(m: Message) -> Result<CleanReply, ProtocolError> {
        match m {
            Message::CleanReport {
                placed,
                failed,
                orphans,
                deleted,
            } => Ok(CleanReply::Report(CleanReport {
                placed,
                failed,
                orphans,
                deleted,
            })),
            Message::Refused { reason, .. } => Ok(CleanReply::Refused { reason }),
            other => Err(unexpected(&other, "clean_report")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_convert_both_ways() {
        let sync = [
            SyncReply::UpToDate {
                snapshot: "s".into(),
            },
            SyncReply::Incremental {
                base_guid: 1,
                count: 2,
            },
            SyncReply::New { buffered: true },
            SyncReply::Full {
                reason: FullReason::Diverged {
                    common: "s1".into(),
                    newer: vec!["x".into()],
                },
                accepted: false,
            },
            SyncReply::refused("no"),
            SyncReply::Resume {
                token: "1-a".into(),
            },
        ];
        for r in sync {
            assert_eq!(SyncReply::try_from(Message::from(r.clone())).unwrap(), r);
        }
        for r in [
            StreamReply::Ready,
            StreamReply::Failed { reason: "x".into() },
        ] {
            assert_eq!(StreamReply::try_from(Message::from(r.clone())).unwrap(), r);
        }
        for r in [
            Stored::Received { bytes: 3 },
            Stored::Failed {
                reason: "x".into(),
                temporary: false,
            },
            Stored::Failed {
                reason: "x".into(),
                temporary: true,
            },
        ] {
            assert_eq!(Stored::try_from(Message::from(r.clone())).unwrap(), r);
        }
        let done = FinishReply::Done(Finished {
            location: "p/a".into(),
            buffered: false,
            pruned: vec!["s0".into()],
        });
        assert_eq!(
            FinishReply::try_from(Message::from(done.clone())).unwrap(),
            done
        );
        let clean = CleanReply::Report(CleanReport::default());
        assert_eq!(
            CleanReply::try_from(Message::from(clean.clone())).unwrap(),
            clean
        );
    }

    #[test]
    fn a_reply_is_not_a_request_and_a_request_is_not_a_reply() {
        assert!(Request::try_from(Message::Ready).is_err());
        assert!(Request::try_from(Message::Received { bytes: 1 }).is_err());
        assert!(Request::try_from(Message::HelloOk {
            version: 4,
            software: String::new(),
            zfs: String::new(),
            caps: vec![],
        })
        .is_err());
        assert!(SyncReply::try_from(Message::Finish).is_err());
        assert!(StreamReply::try_from(Message::Received { bytes: 1 }).is_err());
        assert!(Stored::try_from(Message::Ready).is_err());
        assert!(FinishReply::try_from(Message::New { buffered: false }).is_err());
        let req = Request::Finish;
        assert_eq!(Request::try_from(Message::from(req.clone())).unwrap(), req);
    }
}
