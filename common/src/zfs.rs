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

use crate::caps::{probe_shows, Cap, Caps};
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
    /// Bookmarks (OpenZFS), oldest first; `name` is the part after `#`.
    pub bookmarks: Vec<Snapshot>,
    /// `receive_resume_token`: a cut `zfs receive -s` left partial state.
    pub resume_token: Option<String>,
    /// `encryption` is on (OpenZFS): sent raw (`-w`) or not at all.
    pub encrypted: bool,
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
    resume_token: Option<String>,
    encrypted: bool,
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
            "receive_resume_token" => {
                if value != "-" && !value.is_empty() {
                    p.resume_token = Some(value.to_string());
                }
            }
            "encryption" => p.encrypted = !matches!(value, "off" | "-" | ""),
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
    let mut bookmarks: Vec<(DatasetName, Snapshot)> = Vec::new();
    for (name, p) in props {
        let (Some(guid), Some(createtxg), Some(kind)) = (p.guid, p.createtxg, p.kind) else {
            return Err(ZfsError::Parse {
                line: name.to_string(),
                reason: "missing guid, createtxg or type".into(),
            });
        };
        let checked: Result<(), NameError> = (|| {
            if kind == "bookmark" {
                let (ds, bm) = name.split_once('#').ok_or(NameError::Empty)?;
                bookmarks.push((
                    DatasetName::new(ds)?,
                    Snapshot {
                        name: SnapName::new(bm)?,
                        guid,
                        createtxg,
                    },
                ));
            } else if kind == "snapshot" {
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
                        bookmarks: Vec::new(),
                        resume_token: p.resume_token.clone(),
                        encrypted: p.encrypted,
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
    for (ds, bm) in bookmarks {
        if let Some(d) = tree.datasets.get_mut(&ds) {
            d.bookmarks.push(bm);
        }
    }
    for d in tree.datasets.values_mut() {
        d.snapshots.sort_by_key(|s| s.createtxg);
        d.bookmarks.sort_by_key(|s| s.createtxg);
    }
    Ok(tree)
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// What a listing asks for beyond guid, createtxg and type; what the local
/// `zfs` cannot answer is left out (see [`ListExtras::for_caps`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListExtras {
    /// Bookmarks too (`-t filesystem,volume,snapshot,bookmark`).
    pub bookmarks: bool,
    /// `receive_resume_token`.
    pub resume_token: bool,
    /// `encryption`.
    pub encryption: bool,
    /// `userrefs` (which snapshots are held), where `zfs holds` exists.
    pub userrefs: bool,
}

impl ListExtras {
    pub fn for_caps(caps: &Caps) -> ListExtras {
        ListExtras {
            bookmarks: caps.has(Cap::Bookmarks),
            resume_token: caps.has(Cap::RecvResumable),
            encryption: caps.has(Cap::SendRaw),
            userrefs: caps.has(Cap::HoldsList),
        }
    }
}

/// `zfs get` of guid, createtxg, type and the given user properties for
/// whole trees, in one call.
pub fn list_argv(
    roots: &[&DatasetName],
    depth: Option<u32>,
    user_props: &[&str],
    extras: ListExtras,
) -> Vec<OsString> {
    let mut v = os(&["get", "-H", "-p"]);
    match depth {
        Some(d) => v.extend(os(&["-d", &d.to_string()])),
        None => v.push("-r".into()),
    }
    if extras.bookmarks {
        v.extend(os(&["-t", "filesystem,volume,snapshot,bookmark"]));
    }
    let mut props = "guid,createtxg,type".to_string();
    if extras.resume_token {
        props.push_str(",receive_resume_token");
    }
    if extras.encryption {
        props.push_str(",encryption");
    }
    if extras.userrefs && !user_props.contains(&"userrefs") {
        props.push_str(",userrefs");
    }
    for p in user_props {
        props.push(',');
        props.push_str(p);
    }
    v.extend(os(&["-o", "name,property,value,source", &props]));
    v.extend(roots.iter().map(|r| OsString::from(r.as_str())));
    v
}

/// Where an incremental stream starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendFrom {
    /// `-I snap`: every snapshot in between travels too.
    Snapshot(SnapshotName),
    /// `-i ds#bookmark`: from a bookmark, to one snapshot (zfs has no `-I`
    /// from a bookmark).
    Bookmark(String),
}

/// What to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendWhat {
    /// `zfs send [FLAGS] [-I from | -i #bookmark] to`.
    Snapshot {
        from: Option<SendFrom>,
        to: SnapshotName,
    },
    /// `zfs send [FLAGS] -t TOKEN`: continue a cut transfer.
    Resume { token: String },
}

/// `zfs send` with the stream flags both ends support (`-L -e -c`, or
/// `-w` for an encrypted dataset; see [`crate::caps::SendPath`]).
pub fn send_argv(what: &SendWhat, flags: &[&str]) -> Vec<OsString> {
    let mut v = os(&["send"]);
    v.extend(os(flags));
    match what {
        SendWhat::Snapshot { from, to } => {
            match from {
                Some(SendFrom::Snapshot(s)) => v.extend(os(&["-I", s.as_str()])),
                Some(SendFrom::Bookmark(b)) => v.extend(os(&["-i", b])),
                None => {}
            }
            v.push(to.as_str().into());
        }
        SendWhat::Resume { token } => v.extend(os(&["-t", token])),
    }
    v
}

/// A receive-side property option (`--recv-option`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecvOption {
    /// `-o PROP=VALUE`
    Set(String, String),
    /// `-x PROP`
    Exclude(String),
}

impl RecvOption {
    /// Parses `-o PROP=VALUE`, `-x PROP`, `o:PROP=VALUE` or `x:PROP`.
    pub fn parse(s: &str) -> Result<RecvOption, String> {
        let s = s.trim();
        let (kind, rest) = if let Some(r) = s.strip_prefix("-o").or_else(|| s.strip_prefix("o:")) {
            ('o', r.trim())
        } else if let Some(r) = s.strip_prefix("-x").or_else(|| s.strip_prefix("x:")) {
            ('x', r.trim())
        } else {
            return Err(format!(
                "'{s}': a receive option is '-o PROPERTY=VALUE' or '-x PROPERTY' (for example --recv-option '-o readonly=on' --recv-option '-x mountpoint')"
            ));
        };
        let valid_prop = |p: &str| {
            !p.is_empty()
                && p.len() <= 256
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_:.-".contains(c))
                && !p.starts_with('-')
        };
        match kind {
            'o' => {
                let (p, v) = rest.split_once('=').ok_or_else(|| {
                    format!("'{s}': -o needs PROPERTY=VALUE, for example '-o readonly=on'")
                })?;
                if !valid_prop(p) {
                    return Err(format!("'{s}': '{p}' is not a property name"));
                }
                if v.is_empty() || v.len() > 1024 || v.chars().any(|c| c.is_control()) {
                    return Err(format!(
                        "'{s}': the value must be 1 to 1024 printable characters"
                    ));
                }
                Ok(RecvOption::Set(p.to_string(), v.to_string()))
            }
            _ => {
                if !valid_prop(rest) {
                    return Err(format!("'{s}': '{rest}' is not a property name"));
                }
                Ok(RecvOption::Exclude(rest.to_string()))
            }
        }
    }

    pub fn args(&self) -> [String; 2] {
        match self {
            RecvOption::Set(p, v) => ["-o".into(), format!("{p}={v}")],
            RecvOption::Exclude(p) => ["-x".into(), p.clone()],
        }
    }
}

/// How a stream is received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecvSpec {
    /// `-F`: only for a full stream into an existing dataset that has no
    /// snapshots (`--full`).
    pub force: bool,
    /// `-s`: a cut receive keeps a resume token.
    pub resumable: bool,
    /// `-o`/`-x` (`--recv-option`).
    pub options: Vec<RecvOption>,
}

/// `zfs receive -u [-s] [-F] [-o ..] [-x ..] dest`. `-u`: a replica is never
/// mounted by the receive. `-F` only for a full stream into an existing
/// dataset that has no snapshots (`--full`); incrementals are received
/// without it after a `zfs rollback` to the newest snapshot, which cannot
/// destroy snapshots.
pub fn receive_argv(dest: &DatasetName, spec: &RecvSpec) -> Vec<OsString> {
    let mut v = os(&["receive", "-u"]);
    if spec.resumable {
        v.push("-s".into());
    }
    if spec.force {
        v.push("-F".into());
    }
    for o in &spec.options {
        v.extend(o.args().iter().map(OsString::from));
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

/// What a resume token continues (from `zfs send -nvP -t`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumeInfo {
    /// 0 for a full stream.
    pub from_guid: u64,
    pub to_guid: u64,
    /// `pool/ds@snap` on the sending side.
    pub to_name: String,
    /// Bytes already received, when the token says.
    pub bytes_done: Option<u64>,
    /// Bytes still to send (`-P` estimate), when printed.
    pub bytes_left: Option<u64>,
    /// The token is for a raw stream (`rawok`).
    pub raw: bool,
}

/// Parses `zfs send -nvP -t TOKEN` output: the token's nvlist
/// (`\ttoguid = 0x...`, `\ttoname = p/ds@s`) and the `size` line.
pub fn parse_resume_info(text: &str) -> Option<ResumeInfo> {
    let num = |v: &str| {
        let v = v.trim();
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => v.parse().ok(),
        }
    };
    let (mut from, mut to, mut name, mut done, mut left) = (None, None, None, None, None);
    let mut raw = false;
    let mut seen = std::collections::HashSet::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some((k, v)) = t.split_once(" = ") {
            // A key twice: not what zfs prints; do not guess which counts.
            if !seen.insert(k.trim().to_string()) {
                return None;
            }
            match k.trim() {
                "rawok" => raw = true,
                "fromguid" => from = num(v),
                "toguid" => to = num(v),
                "toname" => name = Some(v.trim().to_string()),
                "bytes" => done = num(v),
                _ => {}
            }
        } else if let Some(v) = t.strip_prefix("size") {
            left = num(v);
        }
    }
    Some(ResumeInfo {
        from_guid: from.unwrap_or(0),
        to_guid: to?,
        to_name: name?,
        bytes_done: done,
        bytes_left: left,
        raw,
    })
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
    /// What this `zfs` can do ([`Zfs::probe`]); none until probed, which
    /// keeps every call on the oldest common ground (zfs-fuse).
    caps: Caps,
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
            caps: Caps::default(),
        }
    }

    /// Probes what this `zfs` can do (see [`crate::caps`]) and keeps it:
    /// listings then ask for bookmarks, resume tokens and encryption where
    /// they exist. Harmless: every probe fails for a missing operand.
    pub async fn probe(&mut self) -> Result<&Caps, ZfsError> {
        let version = match self.output(&os(&["version"])).await? {
            (_, out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or("OpenZFS")
                .trim()
                .to_string(),
            _ => "zfs-fuse or older (no `zfs version`)".to_string(),
        };
        let this: &Zfs = self;
        let probes = Cap::ALL.map(|c| {
            let args = os(c.probe_args());
            async move {
                let (_, out) = this.output(&args).await?;
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
        self.caps = Caps::new(version, found);
        Ok(&self.caps)
    }

    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    /// Sets the capabilities without probing (tests, a stand-in `zfs`).
    pub fn with_caps(mut self, caps: Caps) -> Self {
        self.caps = caps;
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
        let args = list_argv(roots, depth, user_props, ListExtras::for_caps(&self.caps));
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
    pub fn spawn_send(&self, what: &SendWhat, flags: &[&str]) -> Result<ZfsChild, ZfsError> {
        self.spawn(&send_argv(what, flags), false)
    }

    /// `zfs send -n -v -P -t TOKEN`: what a resume token continues, and
    /// whether the snapshot it names is still here. Sends nothing.
    pub async fn resume_info(&self, token: &str) -> Result<ResumeInfo, ZfsError> {
        let args = os(&["send", "-n", "-v", "-P", "-t", token]);
        let (argv, out) = self.output(&args).await?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(ZfsError::from_failure(&argv, out.status, text));
        }
        parse_resume_info(&text).ok_or_else(|| ZfsError::Parse {
            line: text.lines().take(3).collect::<Vec<_>>().join(" | "),
            reason: "no toguid/toname in the resume token's contents".into(),
        })
    }

    /// Starts `zfs receive`; write the stream to [`ZfsChild::take_stdin`].
    pub fn spawn_receive(&self, dest: &DatasetName, spec: &RecvSpec) -> Result<ZfsChild, ZfsError> {
        self.spawn(&receive_argv(dest, spec), true)
    }

    /// `zfs receive -A dest`: discards the partial state of a cut
    /// resumable receive.
    pub async fn abort_resumable(&self, dest: &DatasetName) -> Result<(), ZfsError> {
        self.run(&os(&["receive", "-A", dest.as_str()]))
            .await
            .map(drop)
    }

    /// Releases the hold `tag` on every snapshot under `root` that has it
    /// (before zfsync itself destroys a tree it holds snapshots in). Needs
    /// `zfs holds`; without it there is nothing to do.
    pub async fn release_tag_under(&self, tag: &str, root: &DatasetName) -> Result<(), ZfsError> {
        if !self.caps.has(Cap::HoldsList) {
            return Ok(());
        }
        let listed = self
            .run(&os(&[
                "list",
                "-H",
                "-r",
                "-t",
                "snapshot",
                "-o",
                "name",
                root.as_str(),
            ]))
            .await?;
        let snaps: Vec<&str> = listed.lines().filter(|l| !l.is_empty()).collect();
        self.release_tag_on(tag, &snaps).await
    }

    /// Releases the hold `tag` on those of `snaps` that carry it (one
    /// `zfs holds`, at most one `zfs release`).
    async fn release_tag_on(&self, tag: &str, snaps: &[&str]) -> Result<(), ZfsError> {
        if !self.caps.has(Cap::HoldsList) || snaps.is_empty() {
            return Ok(());
        }
        let mut args = os(&["holds", "-H"]);
        args.extend(snaps.iter().map(OsString::from));
        let holds = self.run(&args).await?;
        let mine: Vec<OsString> = holds
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                let (name, t) = (f.next()?, f.next()?);
                (t == tag).then(|| OsString::from(name))
            })
            .collect();
        if mine.is_empty() {
            return Ok(());
        }
        let mut args = os(&["release", tag]);
        args.extend(mine);
        self.run(&args).await.map(drop)
    }

    /// `zfs bookmark ds@snap ds#name`.
    pub async fn bookmark(&self, snap: &SnapshotName, name: &str) -> Result<(), ZfsError> {
        let bm = format!("{}#{name}", snap.dataset());
        self.run(&os(&["bookmark", snap.as_str(), &bm]))
            .await
            .map(drop)
    }

    /// `zfs destroy ds#name` (a bookmark only: the name carries `#`).
    pub async fn destroy_bookmark(&self, ds: &DatasetName, name: &str) -> Result<(), ZfsError> {
        let bm = format!("{ds}#{name}");
        self.run(&os(&["destroy", &bm])).await.map(drop)
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
    fn resume_token_contents_are_parsed() {
        let out = "resume token contents:
nvlist version: 0
\tfromguid = 0x5b7c5ef4b1d8a2f3
\tobject = 0x3
\toffset = 0x2e40000
\tbytes = 0x2e6d8e0
\ttoguid = 0x1c9f0b6a4d2e8f11
\ttoname = src/data@s3
\tcompressok = 1
incremental\tsrc/data@s2\tsrc/data@s3\t161480704
size\t161480704
";
        let r = parse_resume_info(out).unwrap();
        assert_eq!(r.from_guid, 0x5b7c5ef4b1d8a2f3);
        assert_eq!(r.to_guid, 0x1c9f0b6a4d2e8f11);
        assert_eq!(r.to_name, "src/data@s3");
        assert_eq!(r.bytes_done, Some(0x2e6d8e0));
        assert_eq!(r.bytes_left, Some(161480704));
        assert!(!r.raw);
        assert_eq!(parse_resume_info("cannot resume send: bad token\n"), None);
        let twice = format!("{out}\ttoname = other/ds@x\n");
        assert_eq!(parse_resume_info(&twice), None, "a repeated key");
        let raw = out.replace("compressok = 1", "rawok = 1");
        assert!(parse_resume_info(&raw).unwrap().raw);
    }

    #[test]
    fn receive_options_are_checked() {
        assert_eq!(
            RecvOption::parse("-o readonly=on"),
            Ok(RecvOption::Set("readonly".into(), "on".into()))
        );
        assert_eq!(
            RecvOption::parse("x:mountpoint"),
            Ok(RecvOption::Exclude("mountpoint".into()))
        );
        assert_eq!(
            RecvOption::parse("-o com.example:owner=ops team"),
            Ok(RecvOption::Set(
                "com.example:owner".into(),
                "ops team".into()
            ))
        );
        for bad in [
            "readonly=on",
            "-o readonly",
            "-o =on",
            "-x",
            "-x -F",
            "-o a=b\nc",
            "-o a b=c",
        ] {
            let bad = bad.replace("\\n", "\n");
            let e = RecvOption::parse(&bad).unwrap_err();
            assert!(e.contains('\''), "{bad:?}: {e}");
        }
    }

    #[test]
    fn bookmarks_resume_tokens_and_encryption_are_parsed() {
        let out = "p/a\tguid\t1\t-
p/a\tcreatetxg\t1\t-
p/a\ttype\tfilesystem\t-
p/a\treceive_resume_token\t1-e604ea4bf-e0-789c\t-
p/a\tencryption\taes-256-gcm\t-
p/a@s1\tguid\t3\t-
p/a@s1\tcreatetxg\t3\t-
p/a@s1\ttype\tsnapshot\t-
p/a@s1\treceive_resume_token\t-\t-
p/a@s1\tencryption\taes-256-gcm\t-
p/a#s0\tguid\t2\t-
p/a#s0\tcreatetxg\t2\t-
p/a#s0\ttype\tbookmark\t-
p/b\tguid\t5\t-
p/b\tcreatetxg\t5\t-
p/b\ttype\tfilesystem\t-
p/b\treceive_resume_token\t-\t-
p/b\tencryption\toff\tdefault
";
        let t = parse_get(out).unwrap();
        let a = &t.datasets[&ds("p/a")];
        assert_eq!(a.resume_token.as_deref(), Some("1-e604ea4bf-e0-789c"));
        assert!(a.encrypted);
        assert_eq!(a.bookmarks.len(), 1);
        assert_eq!(
            (a.bookmarks[0].name.as_str(), a.bookmarks[0].guid),
            ("s0", 2)
        );
        assert_eq!(a.snapshots.len(), 1);
        let b = &t.datasets[&ds("p/b")];
        assert!(!b.encrypted && b.resume_token.is_none());
        assert!(t.skipped.is_empty());
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
        let snap = |to: &SnapshotName, from: Option<SendFrom>| SendWhat::Snapshot {
            from,
            to: to.clone(),
        };
        assert_eq!(strs(send_argv(&snap(&b, None), &[])), ["send", "p/a@s2"]);
        assert_eq!(
            strs(send_argv(
                &snap(&b, Some(SendFrom::Snapshot(a.clone()))),
                &[]
            )),
            ["send", "-I", "p/a@s1", "p/a@s2"]
        );
        assert_eq!(
            strs(send_argv(
                &snap(&b, Some(SendFrom::Bookmark("p/a#s1".into()))),
                &["-L", "-e", "-c"]
            )),
            ["send", "-L", "-e", "-c", "-i", "p/a#s1", "p/a@s2"]
        );
        assert_eq!(
            strs(send_argv(
                &SendWhat::Resume {
                    token: "1-abc".into()
                },
                &["-w"]
            )),
            ["send", "-w", "-t", "1-abc"]
        );
        assert_eq!(
            strs(receive_argv(&ds("q/a"), &RecvSpec::default())),
            ["receive", "-u", "q/a"]
        );
        let spec = RecvSpec {
            force: true,
            resumable: true,
            options: vec![
                RecvOption::parse("-o readonly=on").unwrap(),
                RecvOption::parse("-x mountpoint").unwrap(),
            ],
        };
        assert_eq!(
            strs(receive_argv(&ds("q/a"), &spec)),
            [
                "receive",
                "-u",
                "-s",
                "-F",
                "-o",
                "readonly=on",
                "-x",
                "mountpoint",
                "q/a"
            ]
        );
        let extras = ListExtras {
            bookmarks: true,
            resume_token: true,
            encryption: true,
            userrefs: true,
        };
        assert_eq!(
            strs(list_argv(&[&ds("p")], None, &[], extras)),
            [
                "get",
                "-H",
                "-p",
                "-r",
                "-t",
                "filesystem,volume,snapshot,bookmark",
                "-o",
                "name,property,value,source",
                "guid,createtxg,type,receive_resume_token,encryption,userrefs",
                "p"
            ]
        );
        // Asked for by the caller already: not twice.
        assert!(strs(list_argv(&[&ds("p")], None, &["userrefs"], extras))
            .iter()
            .any(|a| a == "guid,createtxg,type,receive_resume_token,encryption,userrefs"));
        assert_eq!(
            strs(list_argv(
                &[&ds("p"), &ds("q")],
                None,
                &[],
                ListExtras::default()
            )),
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
            strs(list_argv(
                &[&ds("p/a")],
                Some(1),
                &[],
                ListExtras::default()
            ))[3..5],
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
