//! The `zfs` command-line layer: the only code in zfsync that spawns `zfs`.
//!
//! One method per verb, argv built by pure functions (table-tested), output
//! parsed by pure functions, and every failure turned into a typed
//! [`ZfsError`] that carries the argv, the exit status and `zfs`'s stderr.
//! The same calls work on zfs-fuse and on OpenZFS 2.x: listings use
//! `zfs get -H -p -r`, which both have (zfs-fuse has no `zfs list -p`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;

use crate::naming::{DatasetName, NameError, SnapName, SnapshotName};

/// At most this much of a child's stderr is kept for the error message.
const STDERR_LIMIT: usize = 64 * 1024;

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
    #[error("dataset {name} does not exist")]
    DoesNotExist { name: String },
    #[error("`{argv}` failed: dataset is busy (tried {tries} times): {stderr}")]
    Busy {
        argv: String,
        tries: u32,
        stderr: String,
    },
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

    /// Classify a failed run by what `zfs` printed on stderr. The patterns
    /// are zfs's own words, the same on zfs-fuse and OpenZFS:
    /// `cannot open 'p/x': dataset does not exist`,
    /// `cannot rename 'p/x': dataset is busy`.
    fn from_failure(argv: &str, status: ExitStatus, stderr: String) -> ZfsError {
        let stderr = stderr.trim().to_string();
        if stderr.contains("dataset is busy") || stderr.contains("pool or dataset is busy") {
            return ZfsError::Busy {
                argv: argv.to_string(),
                tries: 1,
                stderr,
            };
        }
        if let Some(name) = does_not_exist(&stderr) {
            if stderr.lines().count() == 1 {
                return ZfsError::DoesNotExist { name };
            }
        }
        ZfsError::Failed {
            argv: argv.to_string(),
            status: status.to_string(),
            stderr,
        }
    }
}

/// `cannot open 'p/x': dataset does not exist` -> `p/x`.
fn does_not_exist(line: &str) -> Option<String> {
    let line = line.trim();
    if !line.ends_with("dataset does not exist") {
        return None;
    }
    let start = line.find('\'')? + 1;
    let end = start + line[start..].find('\'')?;
    Some(line[start..end].to_string())
}

/// One snapshot as the planner and the protocol see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub name: SnapName,
    pub guid: u64,
    pub createtxg: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    pub name: DatasetName,
    pub guid: u64,
    /// `filesystem` or `volume`.
    pub kind: String,
    /// Sorted oldest first (by createtxg).
    pub snapshots: Vec<Snapshot>,
    /// User properties (`module:name`) that were asked for and are set.
    pub props: BTreeMap<String, String>,
    /// Snapshots with holds (`userrefs` > 0), when `userrefs` was asked for.
    pub held: std::collections::BTreeSet<String>,
}

impl Dataset {
    pub fn newest(&self) -> Option<&Snapshot> {
        self.snapshots.last()
    }
}

/// A listed tree of datasets with their snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    pub datasets: BTreeMap<DatasetName, Dataset>,
    /// Names zfsync cannot handle (for example with a space), with why.
    pub skipped: Vec<(String, String)>,
}

#[derive(Default)]
struct Props {
    guid: Option<u64>,
    createtxg: Option<u64>,
    kind: Option<String>,
    user: BTreeMap<String, String>,
    held: bool,
}

/// Parses `zfs get -H -p -o name,property,value guid,createtxg,type` output.
pub fn parse_get(output: &str) -> Result<Tree, ZfsError> {
    let mut props: BTreeMap<&str, Props> = BTreeMap::new();
    for line in output.lines().filter(|l| !l.is_empty()) {
        let bad = |reason: &str| ZfsError::Parse {
            line: line.to_string(),
            reason: reason.to_string(),
        };
        let mut f = line.split('\t');
        let (Some(name), Some(prop), Some(value), source, None) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            return Err(bad("expected three or four tab-separated fields"));
        };
        let p = props.entry(name).or_default();
        match prop {
            "guid" => p.guid = Some(value.parse().map_err(|_| bad("guid is not a number"))?),
            "createtxg" => {
                p.createtxg = Some(
                    value
                        .parse()
                        .map_err(|_| bad("createtxg is not a number"))?,
                )
            }
            "type" => p.kind = Some(value.to_string()),
            "userrefs" => p.held = value.parse::<u64>().is_ok_and(|n| n > 0),
            // A user property; "-" means not set. Only a value set on the
            // dataset itself counts: user properties are inherited, and a
            // child must not take its parent's confirmation for its own.
            user if user.contains(':') => {
                if value != "-" && source.is_none_or(|s| s == "local") {
                    p.user.insert(user.to_string(), value.to_string());
                }
            }
            _ => return Err(bad("unexpected property")),
        }
    }
    let mut tree = Tree::default();
    let mut snaps: Vec<(DatasetName, Snapshot, bool)> = Vec::new();
    for (name, p) in props {
        let (Some(guid), Some(createtxg), Some(kind)) = (p.guid, p.createtxg, p.kind) else {
            return Err(ZfsError::Parse {
                line: name.to_string(),
                reason: "missing guid, createtxg or type".into(),
            });
        };
        let checked: Result<(), NameError> = (|| {
            if kind == "snapshot" {
                let s = SnapshotName::new(name)?;
                snaps.push((
                    s.dataset(),
                    Snapshot {
                        name: s.snap(),
                        guid,
                        createtxg,
                    },
                    p.held,
                ));
            } else {
                let ds = DatasetName::new(name)?;
                tree.datasets.insert(
                    ds.clone(),
                    Dataset {
                        name: ds,
                        guid,
                        kind: kind.clone(),
                        snapshots: Vec::new(),
                        props: p.user.clone(),
                        held: Default::default(),
                    },
                );
            }
            Ok(())
        })();
        if let Err(e) = checked {
            tree.skipped.push((name.to_string(), e.to_string()));
        }
    }
    for (ds, snap, held) in snaps {
        if let Some(d) = tree.datasets.get_mut(&ds) {
            if held {
                d.held.insert(snap.name.to_string());
            }
            d.snapshots.push(snap);
        }
    }
    for d in tree.datasets.values_mut() {
        d.snapshots.sort_by_key(|s| s.createtxg);
    }
    Ok(tree)
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// `zfs get` of guid, createtxg, type and the given user properties for
/// whole trees, in one call.
pub fn list_argv(roots: &[&DatasetName], depth: Option<u32>, user_props: &[&str]) -> Vec<OsString> {
    let mut v = os(&["get", "-H", "-p"]);
    match depth {
        Some(d) => v.extend(os(&["-d", &d.to_string()])),
        None => v.push("-r".into()),
    }
    let mut props = "guid,createtxg,type".to_string();
    for p in user_props {
        props.push(',');
        props.push_str(p);
    }
    v.extend(os(&["-o", "name,property,value,source", &props]));
    v.extend(roots.iter().map(|r| OsString::from(r.as_str())));
    v
}

/// `zfs send [-I from] to`. `-I` so every intermediate snapshot travels.
pub fn send_argv(from: Option<&SnapshotName>, to: &SnapshotName) -> Vec<OsString> {
    let mut v = os(&["send"]);
    if let Some(from) = from {
        v.extend(os(&["-I", from.as_str()]));
    }
    v.push(to.as_str().into());
    v
}

/// `zfs receive -u [-F] dest`. `-u`: a replica is never mounted by the
/// receive. `-F` only for a full stream into an existing dataset that has no
/// snapshots (`--full`); incrementals are received without it after a
/// `zfs rollback` to the newest snapshot, which cannot destroy snapshots.
pub fn receive_argv(dest: &DatasetName, force: bool) -> Vec<OsString> {
    let mut v = os(&["receive", "-u"]);
    if force {
        v.push("-F".into());
    }
    v.push(dest.as_str().into());
    v
}

pub fn rename_argv(from: &DatasetName, to: &DatasetName) -> Vec<OsString> {
    os(&["rename", from.as_str(), to.as_str()])
}

pub fn create_unmounted_argv(ds: &DatasetName) -> Vec<OsString> {
    os(&["create", "-o", "mountpoint=none", ds.as_str()])
}

pub fn destroy_argv(ds: &DatasetName, recursive: bool) -> Vec<OsString> {
    if recursive {
        os(&["destroy", "-r", ds.as_str()])
    } else {
        os(&["destroy", ds.as_str()])
    }
}

/// `zfs rollback snap`, never `-r`: it refuses when newer snapshots exist.
pub fn rollback_argv(snap: &SnapshotName) -> Vec<OsString> {
    os(&["rollback", snap.as_str()])
}

pub fn set_argv(ds: &DatasetName, prop: &str, value: &str) -> Vec<OsString> {
    os(&["set", &format!("{prop}={value}"), ds.as_str()])
}

/// A running `zfs send` or `zfs receive` whose stderr is being collected.
pub struct ZfsChild {
    argv: String,
    child: Child,
    stderr: JoinHandle<String>,
}

impl ZfsChild {
    pub fn argv(&self) -> &str {
        &self.argv
    }

    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// Waits for the exit; a non-zero exit becomes an error with stderr.
    pub async fn wait(mut self) -> Result<(), ZfsError> {
        let status = self.child.wait().await.map_err(|source| ZfsError::Io {
            argv: self.argv.clone(),
            source,
        })?;
        let stderr = self.stderr.await.unwrap_or_default();
        if status.success() {
            Ok(())
        } else {
            Err(ZfsError::from_failure(&self.argv, status, stderr))
        }
    }

    /// Kills the child and reaps it. Used when a stream must not be
    /// committed (cut connection, error trailer, shutdown).
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
        self.stderr.abort();
    }
}

/// Keeps at most [`STDERR_LIMIT`] bytes, the first ones: zfs says what went
/// wrong first.
async fn collect_stderr(mut r: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = STDERR_LIMIT.saturating_sub(buf.len());
                buf.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The `zfs` binary and every call zfsync makes to it.
#[derive(Clone, Debug)]
pub struct Zfs {
    bin: PathBuf,
}

impl Default for Zfs {
    fn default() -> Self {
        Zfs::new("zfs")
    }
}

impl Zfs {
    pub fn new(bin: impl AsRef<Path>) -> Self {
        Zfs {
            bin: bin.as_ref().to_path_buf(),
        }
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
        match self.command(args).output().await {
            Ok(out) => Ok((argv, out)),
            Err(source) => Err(ZfsError::Spawn { argv, source }),
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
                out.status,
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        }
    }

    /// Lists whole trees (datasets and snapshots) in one `zfs` call. Roots
    /// that do not exist are simply absent from the result.
    pub async fn list_trees(&self, roots: &[&DatasetName]) -> Result<Tree, ZfsError> {
        self.list(roots, None, &[]).await
    }

    /// [`Zfs::list_trees`] with user properties of the datasets, still one
    /// call.
    pub async fn list_trees_with(
        &self,
        roots: &[&DatasetName],
        user_props: &[&str],
    ) -> Result<Tree, ZfsError> {
        self.list(roots, None, user_props).await
    }

    /// One dataset and its snapshots (for refreshing a cache after a
    /// receive); `None` if it does not exist.
    pub async fn list_dataset(&self, ds: &DatasetName) -> Result<Option<Dataset>, ZfsError> {
        let mut tree = self.list(&[ds], Some(1), &[]).await?;
        Ok(tree.datasets.remove(ds))
    }

    async fn list(
        &self,
        roots: &[&DatasetName],
        depth: Option<u32>,
        user_props: &[&str],
    ) -> Result<Tree, ZfsError> {
        let args = list_argv(roots, depth, user_props);
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
                    out.status,
                    stderr.into_owned(),
                ));
            }
        }
        let mut tree = parse_get(&stdout)?;
        if let Some(d) = depth {
            // `-d 1` also lists direct children; keep the roots only.
            let _ = d;
            tree.datasets.retain(|name, _| roots.contains(&name));
        }
        Ok(tree)
    }

    pub async fn create_unmounted(&self, ds: &DatasetName) -> Result<(), ZfsError> {
        self.run(&create_unmounted_argv(ds)).await.map(drop)
    }

    /// Renames, retrying "dataset is busy" (a mounted dataset on zfs-fuse,
    /// a process in the mountpoint on OpenZFS): unmount, wait, try again.
    pub async fn rename(&self, from: &DatasetName, to: &DatasetName) -> Result<(), ZfsError> {
        let args = rename_argv(from, to);
        self.retry_busy(&args, Some(from)).await
    }

    /// `zfs destroy -r`, with the same busy handling as [`Zfs::rename`].
    pub async fn destroy_recursive(&self, ds: &DatasetName) -> Result<(), ZfsError> {
        let args = destroy_argv(ds, true);
        self.retry_busy(&args, Some(ds)).await
    }

    /// `zfs destroy` without `-r`: ZFS refuses if `ds` has children or
    /// snapshots.
    pub async fn destroy_empty(&self, ds: &DatasetName) -> Result<(), ZfsError> {
        let args = destroy_argv(ds, false);
        self.retry_busy(&args, Some(ds)).await
    }

    /// `zfs unmount ds`.
    pub async fn unmount(&self, ds: &DatasetName) -> Result<(), ZfsError> {
        self.run(&os(&["unmount", ds.as_str()])).await.map(drop)
    }

    pub async fn rollback(&self, snap: &SnapshotName) -> Result<(), ZfsError> {
        self.retry_busy(&rollback_argv(snap), None).await
    }

    pub async fn set(&self, ds: &DatasetName, prop: &str, value: &str) -> Result<(), ZfsError> {
        self.run(&set_argv(ds, prop, value)).await.map(drop)
    }

    /// One property on many datasets in one call.
    pub async fn set_many(
        &self,
        datasets: &[DatasetName],
        prop: &str,
        value: &str,
    ) -> Result<(), ZfsError> {
        if datasets.is_empty() {
            return Ok(());
        }
        let mut args = os(&["set", &format!("{prop}={value}")]);
        args.extend(datasets.iter().map(|d| OsString::from(d.as_str())));
        self.run(&args).await.map(drop)
    }

    /// `zfs snapshot -r root@name`: one atomic snapshot of the whole tree.
    pub async fn snapshot_recursive(&self, snap: &SnapshotName) -> Result<(), ZfsError> {
        self.run(&os(&["snapshot", "-r", snap.as_str()]))
            .await
            .map(drop)
    }

    /// Destroys one snapshot (`-r`: that name in every descendant too).
    /// Never a dataset: the name must carry `@`.
    pub async fn destroy_snapshot(
        &self,
        snap: &SnapshotName,
        recursive: bool,
    ) -> Result<(), ZfsError> {
        let mut args = os(&["destroy"]);
        if recursive {
            args.push("-r".into());
        }
        args.push(snap.as_str().into());
        // No busy retries: a busy snapshot is a held one.
        self.run(&args).await.map(drop)
    }

    /// `zfs hold TAG snap...` (or `release`): protects snapshots from
    /// destruction. Returns the error when the local zfs has no holds.
    pub async fn hold(
        &self,
        release: bool,
        tag: &str,
        snaps: &[SnapshotName],
    ) -> Result<(), ZfsError> {
        if snaps.is_empty() {
            return Ok(());
        }
        let mut args = os(&[if release { "release" } else { "hold" }, tag]);
        args.extend(snaps.iter().map(|s| OsString::from(s.as_str())));
        self.run(&args).await.map(drop)
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
                        let _ = self.run(&os(&["unmount", ds.as_str()])).await;
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
        }
        let mut child = cmd.spawn().map_err(|source| ZfsError::Spawn {
            argv: argv.clone(),
            source,
        })?;
        let stderr = match child.stderr.take() {
            Some(e) => tokio::spawn(collect_stderr(e)),
            None => tokio::spawn(async { String::new() }),
        };
        Ok(ZfsChild {
            argv,
            child,
            stderr,
        })
    }

    /// Starts `zfs send`; read the stream from [`ZfsChild::take_stdout`].
    pub fn spawn_send(
        &self,
        from: Option<&SnapshotName>,
        to: &SnapshotName,
    ) -> Result<ZfsChild, ZfsError> {
        self.spawn(&send_argv(from, to), false)
    }

    /// Starts `zfs receive`; write the stream to [`ZfsChild::take_stdin`].
    pub fn spawn_receive(&self, dest: &DatasetName, force: bool) -> Result<ZfsChild, ZfsError> {
        self.spawn(&receive_argv(dest, force), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(s: &str) -> DatasetName {
        DatasetName::new(s).unwrap()
    }

    fn strs(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    /// Captured from zfs-fuse 0.7 on Debian 12.
    const GET_OUTPUT: &str = "ptest1\tguid\t6186781169226890311
ptest1\tcreatetxg\t1
ptest1\ttype\tfilesystem
ptest1@s1\tguid\t6783105174159580119
ptest1@s1\tcreatetxg\t18
ptest1@s1\ttype\tsnapshot
ptest1/a\tguid\t13830589434478674581
ptest1/a\tcreatetxg\t6
ptest1/a\ttype\tfilesystem
ptest1/a@s2\tguid\t10630045319145745963
ptest1/a@s2\tcreatetxg\t31
ptest1/a@s2\ttype\tsnapshot
ptest1/a@s1\tguid\t13827386497387903594
ptest1/a@s1\tcreatetxg\t18
ptest1/a@s1\ttype\tsnapshot
ptest1/a\x01b\tguid\t1
ptest1/a\x01b\tcreatetxg\t7
ptest1/a\x01b\ttype\tfilesystem
";

    #[test]
    fn parses_get_output() {
        let t = parse_get(GET_OUTPUT).unwrap();
        assert_eq!(t.datasets.len(), 2);
        let a = &t.datasets[&ds("ptest1/a")];
        assert_eq!(a.guid, 13830589434478674581);
        let names: Vec<&str> = a.snapshots.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["s1", "s2"], "sorted by createtxg");
        assert_eq!(a.snapshots[1].guid, 10630045319145745963);
        assert_eq!(t.datasets[&ds("ptest1")].snapshots.len(), 1);
        assert_eq!(t.skipped.len(), 1);
        assert_eq!(t.skipped[0].0, "ptest1/a\x01b");
    }

    #[test]
    fn inherited_user_properties_do_not_count() {
        let out = "p/a\tguid\t1\t-
p/a\tcreatetxg\t1\t-
p/a\ttype\tfilesystem\t-
p/a\tzfsync:synced_h\ts1\tlocal
p/a/b\tguid\t2\t-
p/a/b\tcreatetxg\t2\t-
p/a/b\ttype\tfilesystem\t-
p/a/b\tzfsync:synced_h\ts1\tinherited from p/a
p/a/b@s1\tguid\t3\t-
p/a/b@s1\tcreatetxg\t3\t-
p/a/b@s1\ttype\tsnapshot\t-
p/a/b@s1\tuserrefs\t1\t-
";
        let t = parse_get(out).unwrap();
        assert_eq!(t.datasets[&ds("p/a")].props["zfsync:synced_h"], "s1");
        assert!(t.datasets[&ds("p/a/b")].props.is_empty());
        assert!(t.datasets[&ds("p/a/b")].held.contains("s1"));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "p\tguid\tx\n",
            "p\tguid\n",
            "p\tguid\t1\t-\textra\n",
            "p\tfoo\t1\n",
            "p\tguid\t1\n",
        ] {
            assert!(parse_get(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_get("").unwrap(), Tree::default());
    }

    #[test]
    fn argv_builders() {
        let a = SnapshotName::new("p/a@s1").unwrap();
        let b = SnapshotName::new("p/a@s2").unwrap();
        assert_eq!(strs(send_argv(None, &b)), ["send", "p/a@s2"]);
        assert_eq!(
            strs(send_argv(Some(&a), &b)),
            ["send", "-I", "p/a@s1", "p/a@s2"]
        );
        assert_eq!(
            strs(receive_argv(&ds("q/a"), false)),
            ["receive", "-u", "q/a"]
        );
        assert_eq!(
            strs(receive_argv(&ds("q/a"), true)),
            ["receive", "-u", "-F", "q/a"]
        );
        assert_eq!(
            strs(list_argv(&[&ds("p"), &ds("q")], None, &[])),
            [
                "get",
                "-H",
                "-p",
                "-r",
                "-o",
                "name,property,value,source",
                "guid,createtxg,type",
                "p",
                "q"
            ]
        );
        assert_eq!(
            strs(list_argv(&[&ds("p/a")], Some(1), &[]))[3..5],
            ["-d".to_string(), "1".to_string()]
        );
        assert_eq!(
            strs(create_unmounted_argv(&ds("p/b"))),
            ["create", "-o", "mountpoint=none", "p/b"]
        );
        assert_eq!(
            strs(destroy_argv(&ds("p/b"), true)),
            ["destroy", "-r", "p/b"]
        );
        assert_eq!(strs(destroy_argv(&ds("p/b"), false)), ["destroy", "p/b"]);
        let s = SnapshotName::new("p/b@s").unwrap();
        assert_eq!(strs(rollback_argv(&s)), ["rollback", "p/b@s"]);
        assert_eq!(
            strs(set_argv(&ds("p/b"), "canmount", "noauto")),
            ["set", "canmount=noauto", "p/b"]
        );
        assert_eq!(
            strs(rename_argv(&ds("p/b"), &ds("p/c"))),
            ["rename", "p/b", "p/c"]
        );
    }

    #[test]
    fn classifies_stderr() {
        #[cfg(unix)]
        let status = {
            use std::os::unix::process::ExitStatusExt;
            ExitStatus::from_raw(1 << 8)
        };
        let e = ZfsError::from_failure(
            "zfs get",
            status,
            "cannot open 'p/x': dataset does not exist\n".into(),
        );
        assert!(matches!(e, ZfsError::DoesNotExist { ref name } if name == "p/x"));
        let e = ZfsError::from_failure(
            "zfs rename",
            status,
            "cannot rename 'p/x': dataset is busy\n".into(),
        );
        assert!(e.is_busy());
        let e = ZfsError::from_failure(
            "zfs receive",
            status,
            "cannot receive: invalid backup stream\n".into(),
        );
        assert!(matches!(e, ZfsError::Failed { .. }));
        assert!(e.to_string().contains("invalid backup stream"));
    }
}
