//! Typed errors from `zfs`: every stderr pattern zfsync reacts to is a
//! variant here, classified by [`ZfsError::from_failure`] and tested against
//! the output real `zfs` printed (zfs-fuse and OpenZFS), so that no other
//! module ever reads `zfs`'s stderr.

use thiserror::Error;

/// How often a rename or destroy that `zfs` calls busy is tried.
pub const BUSY_TRIES: u32 = 10;

#[derive(Debug, Error)]
pub enum ZfsError {
    #[error("cannot run `{argv}`: {source} (is ZFS installed? point --zfs at the zfs binary)")]
    Spawn {
        argv: String,
        #[source]
        source: std::io::Error,
    },
    /// `cannot open 'p/x': dataset does not exist`
    #[error("dataset {name} does not exist")]
    DoesNotExist { name: String },
    /// `cannot rename 'p/x': dataset is busy`; `pool or dataset is busy`.
    #[error("`{argv}` failed: dataset is busy (tried {tries} times): {stderr}")]
    Busy {
        argv: String,
        tries: u32,
        stderr: String,
    },
    /// `cannot create snapshot 'p/x@s': dataset already exists`
    #[error("`{argv}` failed: the snapshot already exists: {stderr}")]
    SnapshotExists { argv: String, stderr: String },
    /// `zfs send -t`/`-nvP -t` on a token whose snapshot is gone or is
    /// another dataset's: `cannot resume send: 'p/x@s' used in the initial
    /// send no longer exists` (or `... is no longer the same snapshot`).
    #[error("the resume token cannot be used here: {stderr}")]
    ResumeTokenStale { argv: String, stderr: String },
    /// `cannot receive: stream has unsupported feature, feature flags = 4`
    /// (zfs-fuse receiving an OpenZFS ZPL 5 stream, for example).
    #[error("`{argv}` failed: the stream uses a feature this zfs cannot receive: {stderr}")]
    UnsupportedStreamFeature { argv: String, stderr: String },
    #[error("`{argv}` failed ({status}): {stderr}")]
    Failed {
        argv: String,
        status: String,
        stderr: String,
    },
    #[error("cannot parse `zfs` output line {line:?}: {reason}")]
    Parse { line: String, reason: String },
    #[error("i/o with `{argv}`: {source}")]
    Io {
        argv: String,
        #[source]
        source: std::io::Error,
    },
}

impl ZfsError {
    pub fn is_busy(&self) -> bool {
        matches!(self, ZfsError::Busy { .. })
    }

    /// What `zfs` printed, for the variants that carry it.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            ZfsError::Busy { stderr, .. }
            | ZfsError::SnapshotExists { stderr, .. }
            | ZfsError::ResumeTokenStale { stderr, .. }
            | ZfsError::UnsupportedStreamFeature { stderr, .. }
            | ZfsError::Failed { stderr, .. } => Some(stderr),
            _ => None,
        }
    }

    /// Classifies a failed run by what `zfs` printed on stderr. The patterns
    /// are zfs's own words, the same on zfs-fuse and OpenZFS (see the tests
    /// for the captured output each was seen with).
    pub fn from_failure(argv: &str, status: &str, stderr: String) -> ZfsError {
        let stderr = stderr.trim().to_string();
        let argv = argv.to_string();
        if stderr.contains("dataset is busy") || stderr.contains("pool or dataset is busy") {
            return ZfsError::Busy {
                argv,
                tries: 1,
                stderr,
            };
        }
        if stderr.contains("unsupported feature") {
            return ZfsError::UnsupportedStreamFeature { argv, stderr };
        }
        if stderr.starts_with("cannot resume send")
            || (stderr.contains("initial send")
                && (stderr.contains("no longer exists") || stderr.contains("not the same")))
        {
            return ZfsError::ResumeTokenStale { argv, stderr };
        }
        if stderr.starts_with("cannot create snapshot") && stderr.contains("already exists") {
            return ZfsError::SnapshotExists { argv, stderr };
        }
        if let Some(name) = does_not_exist(&stderr) {
            if stderr.lines().count() == 1 {
                return ZfsError::DoesNotExist { name };
            }
        }
        ZfsError::Failed {
            argv,
            status: status.to_string(),
            stderr,
        }
    }
}

/// `cannot open 'p/x': dataset does not exist` -> `p/x`.
pub(crate) fn does_not_exist(line: &str) -> Option<String> {
    let line = line.trim();
    if !line.ends_with("dataset does not exist") {
        return None;
    }
    let start = line.find('\'')? + 1;
    let end = start + line[start..].find('\'')?;
    Some(line[start..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "exit status: 1";

    #[test]
    fn classifies_stderr() {
        let e = ZfsError::from_failure(
            "zfs get",
            STATUS,
            "cannot open 'p/x': dataset does not exist\n".into(),
        );
        assert!(matches!(e, ZfsError::DoesNotExist { ref name } if name == "p/x"));
        let e = ZfsError::from_failure(
            "zfs rename",
            STATUS,
            "cannot rename 'p/x': dataset is busy\n".into(),
        );
        assert!(e.is_busy());
        let e = ZfsError::from_failure(
            "zfs receive",
            STATUS,
            "cannot receive: invalid backup stream\n".into(),
        );
        assert!(matches!(e, ZfsError::Failed { .. }));
        assert!(e.to_string().contains("invalid backup stream"));
    }
}
