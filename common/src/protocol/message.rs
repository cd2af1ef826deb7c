//! The wire messages: one flat, serde-tagged enum as it travels in JSON
//! frames. Code above the wire speaks the typed requests and replies of
//! [`super::typed`], converted at the edge.

use serde::{Deserialize, Serialize};

use crate::model::Snapshot;
use crate::naming::{NameError, SnapName};
use crate::plan::FullReason;

use super::typed::{SyncReply, SyncRequest};

/// A snapshot as it travels: the name is checked on arrival.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSnap {
    pub name: String,
    pub guid: u64,
    pub createtxg: u64,
}

impl From<&Snapshot> for WireSnap {
    fn from(s: &Snapshot) -> Self {
        WireSnap {
            name: s.name.to_string(),
            guid: s.guid,
            createtxg: s.createtxg,
        }
    }
}

impl WireSnap {
    pub fn validate(&self) -> Result<Snapshot, NameError> {
        Ok(Snapshot {
            name: SnapName::new(&self.name)?,
            guid: self.guid,
            createtxg: self.createtxg,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaceFailure {
    pub path: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    // Handshake.
    Hello {
        version: u32,
        /// The same for every connection of one sender run: the receiver
        /// lists its target tree once per run.
        run_id: String,
        software: String,
        /// The local `zfs`'s version line and capabilities
        /// ([`crate::caps::Caps`]); both ends use what both have.
        #[serde(default)]
        zfs: String,
        #[serde(default)]
        caps: Vec<String>,
    },
    HelloOk {
        version: u32,
        software: String,
        #[serde(default)]
        zfs: String,
        #[serde(default)]
        caps: Vec<String>,
    },

    // Negotiation, one dataset at a time.
    Sync {
        /// Relative path: "" for the top dataset, else "/a/b".
        path: String,
        /// Oldest first.
        snapshots: Vec<WireSnap>,
        /// The sender's bookmarks (OpenZFS): incremental bases only.
        #[serde(default)]
        bookmarks: Vec<WireSnap>,
        /// The sender runs with --full.
        allow_full: bool,
        /// Only say what would be done: no dataset is locked or created.
        #[serde(default)]
        dry_run: bool,
    },
    UpToDate {
        snapshot: String,
    },
    Incremental {
        base_guid: u64,
        count: u64,
    },
    New {
        buffered: bool,
    },
    Full {
        reason: FullReason,
        accepted: bool,
    },
    Refused {
        reason: String,
        /// Worth trying again later (busy), as opposed to a conflict.
        temporary: bool,
    },
    /// A cut transfer left a resumable state: continue it with
    /// `zfs send -t token` (only offered when both ends can).
    Resume {
        token: String,
    },
    /// The sender cannot resume (the token names a snapshot it no longer
    /// has): the receiver discards the partial state and answers as for
    /// the Sync.
    ResumeFailed {
        reason: String,
    },

    // The whole tree in one negotiation (protocol 5): what every
    // dataset needs, answered in order, with no effect on the receiver
    // (nothing is locked, opened or created).
    Plan {
        datasets: Vec<SyncRequest>,
    },
    Planned {
        /// One per dataset of the plan, in its order.
        answers: Vec<SyncReply>,
    },
    /// A dataset's sync and its first stream in one message: the data
    /// follows at once (no `Ready`); a refusal is the answer to its `End`.
    Put {
        sync: SyncRequest,
        from_guid: Option<u64>,
        to: WireSnap,
        /// The dataset's last stream: a successful `End` also finishes it
        /// (answered `Done`).
        finish: bool,
        /// The data frames are zstd frames (`--compress`), sent only to a
        /// receiver that announced [`crate::compress::CAP_ZSTD`]; absent
        /// when false, so a plain stream reads as before.
        #[serde(default, skip_serializing_if = "is_false")]
        compressed: bool,
    },
    /// The next stream of the open dataset, data at once (as `Put`).
    More {
        from_guid: Option<u64>,
        to: WireSnap,
        finish: bool,
        /// The data frames are zstd frames (`--compress`), sent only to a
        /// receiver that announced [`crate::compress::CAP_ZSTD`]; absent
        /// when false, so a plain stream reads as before.
        #[serde(default, skip_serializing_if = "is_false")]
        compressed: bool,
    },

    // Streams.
    Stream {
        from_guid: Option<u64>,
        to: WireSnap,
        /// The stream continues a cut one (`zfs send -t`).
        #[serde(default)]
        resume: bool,
        /// The data frames are zstd frames (`--compress`), sent only to a
        /// receiver that announced [`crate::compress::CAP_ZSTD`]; absent
        /// when false, so a plain stream reads as before.
        #[serde(default, skip_serializing_if = "is_false")]
        compressed: bool,
    },
    /// The receiver accepted the stream header; data may follow.
    Ready,
    End {
        bytes: u64,
    },
    Abort {
        reason: String,
    },
    Received {
        bytes: u64,
    },
    StreamFailed {
        reason: String,
        /// Worth sending again in the same run (the receiver dropped
        /// changes made inside its replica, which made `zfs receive`
        /// refuse; the dataset was busy), as opposed to a failure a person
        /// must look at. Sent only when true.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        temporary: bool,
    },
    Finish,
    Done {
        /// Where the dataset now is on the receiver.
        location: String,
        buffered: bool,
        /// Snapshots the receiver destroyed to mirror the sender's
        /// retention.
        #[serde(default)]
        pruned: Vec<String>,
    },

    // The end of a run.
    CleanBuffer {
        /// Every relative path of the source tree: what is not among them
        /// is orphaned on the receiver.
        source_paths: Vec<String>,
        /// Destroy orphaned replicas (only datasets zfsync created).
        delete_missing: bool,
        /// Report only; place and destroy nothing.
        dry_run: bool,
    },
    CleanReport {
        /// Placed from the buffer (in a dry run: would be).
        placed: Vec<String>,
        failed: Vec<PlaceFailure>,
        /// Replicas whose source is gone.
        orphans: Vec<String>,
        /// Orphans destroyed (`delete_missing`).
        deleted: Vec<String>,
    },
    Bye,
    Error {
        reason: String,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Message {
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::HelloOk { .. } => "hello_ok",
            Message::Sync { .. } => "sync",
            Message::UpToDate { .. } => "up_to_date",
            Message::Incremental { .. } => "incremental",
            Message::New { .. } => "new",
            Message::Full { .. } => "full",
            Message::Refused { .. } => "refused",
            Message::Resume { .. } => "resume",
            Message::ResumeFailed { .. } => "resume_failed",
            Message::Plan { .. } => "plan",
            Message::Planned { .. } => "planned",
            Message::Put { .. } => "put",
            Message::More { .. } => "more",
            Message::Stream { .. } => "stream",
            Message::Ready => "ready",
            Message::End { .. } => "end",
            Message::Abort { .. } => "abort",
            Message::Received { .. } => "received",
            Message::StreamFailed { .. } => "stream_failed",
            Message::Finish => "finish",
            Message::Done { .. } => "done",
            Message::CleanBuffer { .. } => "cleanbuffer",
            Message::CleanReport { .. } => "clean_report",
            Message::Bye => "bye",
            Message::Error { .. } => "error",
        }
    }
}
