//! [`Zfs`]: the backend that runs the `zfs` command. One method per verb;
//! argv comes from [`super::argv`], output goes through [`super::parse`],
//! and failures through [`ZfsError::from_failure`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;

use super::argv::*;
use super::child::ZfsChild;
use super::error::{does_not_exist, ZfsError, BUSY_TRIES};
use super::parse::{parse_get, parse_holds, parse_resume_info, ResumeInfo};
use super::ZfsBackend;
use crate::caps::{probe_shows, Cap, Caps};
use crate::model::Tree;
use crate::naming::{DatasetName, SnapshotName};

/// The `zfs` binary and every call zfsync makes to it.
#[derive(Clone, Debug)]
pub struct Zfs {
    bin: PathBuf,
    /// What this `zfs` can do ([`ZfsBackend::probe`]); none until probed,
    /// which keeps every call on the oldest common ground (zfs-fuse).
    /// Shared by clones: one probe serves every handle.
    caps: Arc<RwLock<Caps>>,
    /// Longest a call that runs to completion (everything but the streams
    /// of `send` and `receive`) may take: a wedged `zfs` or a suspended
    /// pool must not hold a dataset lock forever. The process is killed
    /// when it is exceeded.
    timeout: Duration,
}

/// The default of [`Zfs::with_timeout`]: generous, since a `zfs destroy
/// -r` of a large tree or a listing of 10,000 datasets is slow but not
/// wedged.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

impl Default for Zfs {
    fn default() -> Self {
        Zfs::new("zfs")
    }
}

impl Zfs {
    pub fn new(bin: impl AsRef<Path>) -> Self {
        Zfs {
            bin: bin.as_ref().to_path_buf(),
            caps: Arc::new(RwLock::new(Caps::default())),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Sets the longest time a `zfs` call may run (`--zfs-timeout`).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the capabilities without probing (tests, a stand-in `zfs`).
    pub fn with_caps(self, caps: Caps) -> Self {
        *self.caps.write().unwrap_or_else(|p| p.into_inner()) = caps;
        self
    }

    fn show(&self, args: &[OsString]) -> String {
        let mut s = self.bin.display().to_string();
        for a in args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    fn command(&self, args: &[OsString]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args).stdin(Stdio::null()).kill_on_drop(true);
        c
    }

    /// Runs to completion; returns the shown argv and the output.
    async fn output(&self, args: &[OsString]) -> Result<(String, std::process::Output), ZfsError> {
        let argv = self.show(args);
        tracing::debug!(%argv, "running");
        // On timeout the future is dropped, and with it the child, which
        // is spawned with kill_on_drop.
        match tokio::time::timeout(self.timeout, self.command(args).output()).await {
            Err(_) => Err(ZfsError::Timeout {
                argv,
                after: self.timeout,
            }),
            Ok(Ok(out)) => Ok((argv, out)),
            Ok(Err(source)) => Err(ZfsError::Spawn { argv, source }),
        }
    }

    /// Runs to completion; returns stdout, or the classified failure.
    async fn run(&self, args: &[OsString]) -> Result<String, ZfsError> {
        let (argv, out) = self.output(args).await?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(ZfsError::from_failure(
                &argv,
                &out.status.to_string(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        }
    }

    async fn retry_busy(
        &self,
        args: &[OsString],
        unmount: Option<&DatasetName>,
    ) -> Result<(), ZfsError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.run(args).await {
                Ok(_) => return Ok(()),
                Err(ZfsError::Busy { argv, stderr, .. }) => {
                    if tries >= BUSY_TRIES {
                        return Err(ZfsError::Busy {
                            argv,
                            tries,
                            stderr,
                        });
                    }
                    tracing::debug!(%argv, tries, "dataset is busy; unmounting and retrying");
                    if let Some(ds) = unmount {
                        let _ = self.run(&unmount_argv(ds)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(tries))).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn(&self, args: &[OsString], stdin: bool) -> Result<ZfsChild, ZfsError> {
        let argv = self.show(args);
        tracing::debug!(%argv, "spawning");
        let mut cmd = self.command(args);
        cmd.stderr(Stdio::piped());
        if stdin {
            cmd.stdin(Stdio::piped()).stdout(Stdio::null());
        } else {
            cmd.stdout(Stdio::piped());
            // A reader that goes away (a cut stream, an abort) must end
            // `zfs send` with EPIPE, which it cleans up after; the default
            // SIGPIPE would kill it first, and zfs-fuse then leaves its
            // temporary `.send-PID-*` holds on the snapshots for good.
            //
            // SAFETY: between fork and exec only async-signal-safe calls
            // are allowed; sigaction(2) is one.
            unsafe {
                cmd.pre_exec(|| {
                    use nix::sys::signal::{signal, SigHandler, Signal};
                    signal(Signal::SIGPIPE, SigHandler::SigIgn)
                        .map(drop)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let child = cmd.spawn().map_err(|source| ZfsError::Spawn {
            argv: argv.clone(),
            source,
        })?;
        Ok(ZfsChild::process(argv, child))
    }
}

#[async_trait]
impl ZfsBackend for Zfs {
    /// `zfs version` first, then one harmless call per option (see
    /// [`crate::caps`]): every probe fails for a missing operand.
    async fn probe(&self) -> Result<Caps, ZfsError> {
        let version = match self.output(&version_argv()).await? {
            (_, out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or("OpenZFS")
                .trim()
                .to_string(),
            _ => "zfs-fuse or older (no `zfs version`)".to_string(),
        };
        let probes = Cap::ALL.map(|c| {
            let args = os(c.probe_args());
            async move {
                let (_, out) = self.output(&args).await?;
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                Ok::<_, ZfsError>((c, probe_shows(&text)))
            }
        });
        let mut found = Vec::new();
        for r in futures::future::join_all(probes).await {
            let (c, yes) = r?;
            if yes {
                found.push(c);
            }
        }
        let caps = Caps::new(version, found);
        *self.caps.write().unwrap_or_else(|p| p.into_inner()) = caps.clone();
        Ok(caps)
    }

    fn call_timeout(&self) -> Duration {
        self.timeout
    }

    fn caps(&self) -> Caps {
        self.caps.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn list(
        &self,
        roots: &[&DatasetName],
        depth: Option<u32>,
        user_props: &[&str],
    ) -> Result<Tree, ZfsError> {
        let args = list_argv(roots, depth, user_props, ListExtras::for_caps(&self.caps()));
        let (argv, out) = self.output(&args).await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            // Missing roots are fine; anything else is an error.
            let stderr = String::from_utf8_lossy(&out.stderr);
            let only_missing = stderr
                .lines()
                .filter(|l| !l.trim().is_empty())
                .all(|l| does_not_exist(l).is_some_and(|n| roots.iter().any(|r| r.as_str() == n)));
            if !only_missing || stderr.trim().is_empty() {
                return Err(ZfsError::from_failure(
                    &argv,
                    &out.status.to_string(),
                    stderr.into_owned(),
                ));
            }
        }
        let mut tree = parse_get(&stdout)?;
        if depth.is_some() {
            // `-d 1` also lists direct children; keep the roots only.
            tree.datasets.retain(|name, _| roots.contains(&name));
        }
        Ok(tree)
    }

    async fn create_unmounted(&self, ds: &DatasetName) -> Result<(), ZfsError> {
        self.run(&create_unmounted_argv(ds)).await.map(drop)
    }

    /// Retries "dataset is busy" (a mounted dataset on zfs-fuse, a process
    /// in the mountpoint on OpenZFS): unmount, wait, try again.
    async fn rename(&self, from: &DatasetName, to: &DatasetName) -> Result<(), ZfsError> {
        self.retry_busy(&rename_argv(from, to), Some(from)).await
    }

    async fn destroy_recursive(&self, ds: &DatasetName) -> Result<(), ZfsError> {
        self.retry_busy(&destroy_argv(ds, true), Some(ds)).await
    }

    async fn destroy_empty(&self, ds: &DatasetName) -> Result<(), ZfsError> {
        self.retry_busy(&destroy_argv(ds, false), Some(ds)).await
    }

    async fn unmount(&self, ds: &DatasetName) -> Result<(), ZfsError> {
        self.run(&unmount_argv(ds)).await.map(drop)
    }

    async fn rollback(&self, snap: &SnapshotName) -> Result<(), ZfsError> {
        self.retry_busy(&rollback_argv(snap), None).await
    }

    async fn set_many(
        &self,
        datasets: &[DatasetName],
        prop: &str,
        value: &str,
    ) -> Result<(), ZfsError> {
        if datasets.is_empty() {
            return Ok(());
        }
        self.run(&set_many_argv(datasets, prop, value))
            .await
            .map(drop)
    }

    async fn snapshot_recursive(&self, snap: &SnapshotName) -> Result<(), ZfsError> {
        self.run(&snapshot_recursive_argv(snap)).await.map(drop)
    }

    /// No busy retries: a busy snapshot is a held one.
    async fn destroy_snapshot(&self, snap: &SnapshotName, recursive: bool) -> Result<(), ZfsError> {
        self.run(&destroy_snapshot_argv(snap, recursive))
            .await
            .map(drop)
    }

    async fn hold(&self, tag: &str, snaps: &[SnapshotName]) -> Result<(), ZfsError> {
        if snaps.is_empty() {
            return Ok(());
        }
        self.run(&hold_argv(tag, snaps)).await.map(drop)
    }

    async fn release(&self, tag: &str, snaps: &[SnapshotName]) -> Result<(), ZfsError> {
        if snaps.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = snaps.iter().map(SnapshotName::as_str).collect();
        self.run(&release_argv(tag, &names)).await.map(drop)
    }

    /// Needs `zfs holds`; without it there is nothing to find. One listing,
    /// one `zfs holds`, at most one `zfs release`.
    async fn release_tag_under(&self, tag: &str, root: &DatasetName) -> Result<(), ZfsError> {
        if !self.caps().has(Cap::HoldsList) {
            return Ok(());
        }
        let listed = self.run(&list_snapshots_argv(root)).await?;
        let snaps: Vec<&str> = listed.lines().filter(|l| !l.is_empty()).collect();
        if snaps.is_empty() {
            return Ok(());
        }
        let holds = self.run(&holds_argv(&snaps)).await?;
        let mine = parse_holds(&holds, tag);
        if mine.is_empty() {
            return Ok(());
        }
        let mine: Vec<&str> = mine.iter().map(String::as_str).collect();
        self.run(&release_argv(tag, &mine)).await.map(drop)
    }

    async fn bookmark(&self, snap: &SnapshotName, name: &str) -> Result<(), ZfsError> {
        self.run(&bookmark_argv(snap, name)).await.map(drop)
    }

    async fn destroy_bookmark(&self, ds: &DatasetName, name: &str) -> Result<(), ZfsError> {
        self.run(&destroy_bookmark_argv(ds, name)).await.map(drop)
    }

    fn spawn_send(&self, what: &SendWhat, flags: &[&str]) -> Result<ZfsChild, ZfsError> {
        self.spawn(&send_argv(what, flags), false)
    }

    fn spawn_receive(&self, dest: &DatasetName, spec: &RecvSpec) -> Result<ZfsChild, ZfsError> {
        self.spawn(&receive_argv(dest, spec), true)
    }

    async fn resume_info(&self, token: &str) -> Result<ResumeInfo, ZfsError> {
        let (argv, out) = self.output(&resume_info_argv(token)).await?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            // Classified on stderr: stdout holds the token's contents.
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            return Err(ZfsError::from_failure(
                &argv,
                &out.status.to_string(),
                stderr,
            ));
        }
        parse_resume_info(&text).ok_or_else(|| ZfsError::Parse {
            line: text.lines().take(3).collect::<Vec<_>>().join(" | "),
            reason: "no toguid/toname in the resume token's contents".into(),
        })
    }

    async fn abort_resumable(&self, dest: &DatasetName) -> Result<(), ZfsError> {
        self.run(&abort_resumable_argv(dest)).await.map(drop)
    }
}
