//! What the integration tests of zfsync-common share: a stand-in `zfs`.

use std::path::PathBuf;

/// A shell script `zfs` in a scratch directory of its own, removed when
/// dropped.
pub struct StandIn {
    dir: PathBuf,
    /// The script, for `Zfs::new`.
    pub script: PathBuf,
}

impl StandIn {
    /// A stand-in whose body is `body` (`/bin/sh`), which finds the
    /// scratch directory in `$DIR` (to keep files there; see
    /// [`StandIn::file`]). `tag` names the directory.
    pub fn new(tag: &str, body: &str) -> StandIn {
        let dir = std::env::temp_dir().join(format!("zfsync-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("zfs");
        let text = format!("#!/bin/sh\nDIR='{}'\n{body}", dir.display());
        std::fs::write(&script, text).unwrap();
        std::process::Command::new("chmod")
            .args(["+x", &script.to_string_lossy()])
            .status()
            .unwrap();
        StandIn { dir, script }
    }

    /// A file in the scratch directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
