//! The sender's errors: [`SendError`] ends a run before any dataset is
//! tried; [`DatasetError`] fails one dataset and is classed, as zrepl
//! does, into temporary (a later try may succeed as is) and permanent (a
//! person has to act). Its text is what the summary shows after `FAILED:`.

use thiserror::Error;
use zfsync_common::client::ClientError;
use zfsync_common::naming::{DatasetName, NameError};
use zfsync_common::plan::FullReason;
use zfsync_common::zfs::ZfsError;

/// Nothing could be done at all.
#[derive(Debug, Error)]
pub enum SendError {
    #[error("source dataset {0} does not exist on this host (`zfs list -r` shows the datasets)")]
    NoSource(DatasetName),
    #[error("listing the source: {0}")]
    List(#[from] ZfsError),
    #[error("cannot take the snapshot {0}: {1}")]
    Snapshot(String, ZfsError),
}

/// Whether trying again without anyone changing anything may help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// The receiver is busy (or dropped changes inside its replica that
    /// made a stream fail), the connection broke, the run was stopped: a
    /// later try may succeed.
    Temporary,
    /// Diverged copies, encryption, a refusal, a failing `zfs`: reported
    /// at once; a person has to act (often with what the text says).
    Permanent,
}

/// Why one dataset could not be synced.
#[derive(Debug, Error)]
pub enum DatasetError {
    /// The receiver refused for now (another connection works on the
    /// dataset).
    #[error("refused by the receiver: {reason}")]
    Busy { reason: String },
    /// The receiver refused for good (a reserved name, a policy).
    #[error("refused by the receiver: {reason}")]
    Refused { reason: String },
    /// Talking to the receiver failed, or it answered with a failure (its
    /// `zfs receive` failed, it refused to finish).
    #[error(transparent)]
    Connection(ClientError),
    /// The copies have no common snapshot or diverged: only `--full` helps.
    #[error("{reason}; run with --full to replace the receiver's copy (it is kept until the new copy is whole)")]
    NeedsFull { reason: FullReason },
    /// An encrypted dataset travels raw or not at all.
    #[error("{dataset} is encrypted, and the receiver's zfs ({receiver_zfs}) cannot receive raw streams (zfs send -w); zfsync never sends decrypted data: run the receiver on OpenZFS 0.8 or later")]
    Encrypted {
        dataset: DatasetName,
        receiver_zfs: String,
    },
    /// A `zfs send` failed on this side after its stream was announced; the
    /// receiver was told to discard the stream.
    #[error("{failure}")]
    Stream {
        failure: StreamFailure,
        /// Telling the receiver failed too: the connection is gone.
        connection_lost: bool,
    },
    /// `zfs` failed on this side before anything travelled.
    #[error(transparent)]
    Zfs(ZfsError),
    /// The receiver's resume token cannot be read here for another reason
    /// than its snapshot being gone; the receiver keeps its partial state.
    #[error("cannot read the resume token: {0}")]
    ResumeToken(ZfsError),
    /// The receiver offered a resume after one was done: its state and
    /// ours disagree, so the connection is dropped.
    #[error("the receiver offered a resume twice; run again")]
    ResumeTwice,
    /// A name built from the listing or a token is not valid.
    #[error(transparent)]
    Name(NameError),
    /// A state this side never produces (a bug): reported, the connection
    /// kept.
    #[error("internal error: {0}; please report it")]
    Internal(&'static str),
    /// The run was stopped (shutdown token, SIGTERM/SIGINT) between
    /// streams, or mid-stream (the stream was aborted).
    #[error("stopped: the run was stopped before this dataset was done (whole snapshots already received are kept; the next run goes on from there)")]
    Cancelled,
}

/// How a `zfs send` failed on this side.
#[derive(Debug, Error)]
pub enum StreamFailure {
    #[error("zfs send has no stdout")]
    NoStdout,
    #[error("reading zfs send: {0}")]
    Read(std::io::Error),
    /// It exited non-zero (argv, status and stderr in the error).
    #[error(transparent)]
    Exit(ZfsError),
}

impl DatasetError {
    /// Temporary or permanent, as zrepl classes replication errors.
    pub fn class(&self) -> Class {
        match self {
            DatasetError::Busy { .. } | DatasetError::ResumeTwice | DatasetError::Cancelled => {
                Class::Temporary
            }
            DatasetError::Connection(e) if e.is_connection_lost() => Class::Temporary,
            // The receiver dropped changes made inside its replica, or the
            // dataset was busy: it goes again, like a busy one.
            DatasetError::Connection(ClientError::TryAgain(_)) => Class::Temporary,
            DatasetError::Connection(_)
            | DatasetError::Refused { .. }
            | DatasetError::NeedsFull { .. }
            | DatasetError::Encrypted { .. }
            | DatasetError::Stream { .. }
            | DatasetError::Zfs(_)
            | DatasetError::ResumeToken(_)
            | DatasetError::Name(_)
            | DatasetError::Internal(_) => Class::Permanent,
        }
    }

    /// Is the connection unusable after this (the worker reconnects)?
    pub fn connection_lost(&self) -> bool {
        match self {
            DatasetError::Connection(e) => e.is_connection_lost(),
            DatasetError::Stream {
                connection_lost, ..
            } => *connection_lost,
            DatasetError::ResumeTwice => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use zfsync_common::protocol::ProtocolError;

    use super::*;

    fn zfs_failed() -> ZfsError {
        ZfsError::Failed {
            argv: "zfs send p/a@s1".into(),
            status: "exit status: 1".into(),
            stderr: "boom".into(),
        }
    }

    /// Every variant: its class, whether the connection is gone, and the
    /// text the summary shows (the same texts as before the typed errors).
    #[test]
    fn class_connection_and_text() {
        use Class::*;
        let cases: Vec<(DatasetError, Class, bool, &str)> = vec![
            (
                DatasetError::Busy {
                    reason: "another run for /a is still active".into(),
                },
                Temporary,
                false,
                "refused by the receiver: another run for /a is still active",
            ),
            (
                DatasetError::Refused {
                    reason: "reserved".into(),
                },
                Permanent,
                false,
                "refused by the receiver: reserved",
            ),
            (
                DatasetError::Connection(ClientError::Protocol(ProtocolError::Closed)),
                Temporary,
                true,
                "the peer closed the connection",
            ),
            (
                DatasetError::Connection(ClientError::StreamFailed("no space".into())),
                Permanent,
                false,
                "the receiver could not store the stream: no space",
            ),
            (
                DatasetError::Connection(ClientError::TryAgain("rolled back".into())),
                Temporary,
                false,
                "the receiver could not store the stream: rolled back",
            ),
            (
                DatasetError::NeedsFull {
                    reason: FullReason::TargetHasNoSnapshots,
                },
                Permanent,
                false,
                "the dataset exists on the receiver but has no snapshots; run with --full to replace the receiver's copy (it is kept until the new copy is whole)",
            ),
            (
                DatasetError::Encrypted {
                    dataset: DatasetName::new("p/secret").unwrap(),
                    receiver_zfs: "zfs-fuse or older".into(),
                },
                Permanent,
                false,
                "p/secret is encrypted, and the receiver's zfs (zfs-fuse or older) cannot receive raw streams (zfs send -w); zfsync never sends decrypted data: run the receiver on OpenZFS 0.8 or later",
            ),
            (
                DatasetError::Stream {
                    failure: StreamFailure::NoStdout,
                    connection_lost: false,
                },
                Permanent,
                false,
                "zfs send has no stdout",
            ),
            (
                DatasetError::Stream {
                    failure: StreamFailure::Read(std::io::Error::other("eof")),
                    connection_lost: true,
                },
                Permanent,
                true,
                "reading zfs send: eof",
            ),
            (
                DatasetError::Stream {
                    failure: StreamFailure::Exit(zfs_failed()),
                    connection_lost: false,
                },
                Permanent,
                false,
                "`zfs send p/a@s1` failed (exit status: 1): boom",
            ),
            (
                DatasetError::Zfs(zfs_failed()),
                Permanent,
                false,
                "`zfs send p/a@s1` failed (exit status: 1): boom",
            ),
            (
                DatasetError::ResumeToken(zfs_failed()),
                Permanent,
                false,
                "cannot read the resume token: `zfs send p/a@s1` failed (exit status: 1): boom",
            ),
            (
                DatasetError::ResumeTwice,
                Temporary,
                true,
                "the receiver offered a resume twice; run again",
            ),
            (
                DatasetError::Name(NameError::Empty),
                Permanent,
                false,
                "empty name",
            ),
            (
                DatasetError::Cancelled,
                Temporary,
                false,
                "stopped: the run was stopped before this dataset was done",
            ),
        ];
        for (e, class, lost, text) in cases {
            assert_eq!(e.class(), class, "{e:?}");
            assert_eq!(e.connection_lost(), lost, "{e:?}");
            assert!(e.to_string().starts_with(text), "{e}");
        }
    }
}
