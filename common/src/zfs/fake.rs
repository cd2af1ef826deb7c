//! [`FakeZfs`]: an in-memory [`ZfsBackend`] for the in-process test tier
//! (feature `testing`). It follows real ZFS (zfs-fuse and OpenZFS) wherever
//! zfsync depends on it: the same rules for receive, rollback, rename,
//! destroy and holds, the same error texts, classified by the same
//! [`ZfsError::from_failure`]. Streams are real `dmu_replay_record_t`
//! framing that [`crate::stream::check_head`] accepts (see [`stream`]).
//!
//! Set-up helpers take `&str` names and panic on a broken set-up; backend
//! calls are recorded ([`FakeZfs::calls`]) as `zfs` argv without `zfs`.
//! Faults can be injected per verb ([`FakeZfs::fail`]).

mod stream;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use self::stream::{Parsed, Sub};
use super::argv::*;
use super::{ChildReader, ChildWriter, ResumeInfo, ZfsBackend, ZfsChild, ZfsError, BUSY_TRIES};
use crate::caps::{Cap, Caps};
use crate::model::{Dataset, Snapshot, Tree};
use crate::naming::{DatasetName, SnapName, SnapshotName};

const STATUS: &str = "exit status: 1";

/// GUIDs are unique across every `FakeZfs` of the process (a stream's
/// GUIDs travel from one to another, as between real pools).
static GUIDS: AtomicU64 = AtomicU64::new(0);

fn new_guid() -> u64 {
    0x1000_0000_0000 + GUIDS.fetch_add(1, Ordering::Relaxed) * 7919
}

/// An injected failure ([`FakeZfs::fail`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeError {
    /// [`ZfsError::Busy`], as if every retry had been used.
    Busy,
    /// [`ZfsError::DoesNotExist`] for the argument that matched.
    DoesNotExist,
    /// This stderr text, classified by [`ZfsError::from_failure`] (so
    /// `"cannot receive: stream has unsupported feature, feature flags =
    /// 4"` is [`ZfsError::UnsupportedStreamFeature`]).
    Other(String),
}

#[derive(Clone, Debug)]
struct Snap {
    s: Snapshot,
    holds: BTreeSet<String>,
}

#[derive(Clone, Debug, Default)]
struct Ds {
    guid: u64,
    createtxg: u64,
    /// Oldest first.
    snaps: Vec<Snap>,
    bookmarks: Vec<Snapshot>,
    /// Local properties, native and user.
    props: BTreeMap<String, String>,
    /// Written since the newest snapshot.
    modified: bool,
    resume_token: Option<String>,
}

impl Ds {
    fn snap(&self, name: &str) -> Option<&Snap> {
        self.snaps.iter().find(|s| s.s.name.as_str() == name)
    }
}

#[derive(Debug)]
struct Fault {
    verb: String,
    needle: String,
    left: usize,
    error: FakeError,
}

#[derive(Debug, Default)]
struct State {
    caps: Caps,
    ds: BTreeMap<DatasetName, Ds>,
    txg: u64,
    calls: Vec<String>,
    faults: Vec<Fault>,
    delay: Option<Duration>,
    /// Destinations of running receives (a count per name).
    receiving: BTreeMap<DatasetName, usize>,
    /// Resume tokens `zfs send -t` knows ([`FakeZfs::register_resume_token`]).
    tokens: BTreeMap<String, ResumeInfo>,
}

fn err(argv: &str, stderr: impl Into<String>) -> ZfsError {
    ZfsError::from_failure(argv, STATUS, stderr.into())
}

/// A busy error after the CLI backend's retries (rename, destroy, rollback).
fn busy(argv: &str, stderr: String) -> ZfsError {
    ZfsError::Busy {
        argv: argv.to_string(),
        tries: BUSY_TRIES,
        stderr,
    }
}

fn no_ds(argv: &str, name: impl std::fmt::Display) -> ZfsError {
    err(argv, format!("cannot open '{name}': dataset does not exist"))
}

fn under(name: &DatasetName, root: &DatasetName) -> bool {
    name.relative_to(root).is_some()
}

fn show(args: &[OsString]) -> String {
    let v: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
    v.join(" ")
}

impl State {
    fn tick(&mut self) -> u64 {
        self.txg += 1;
        self.txg
    }

    /// Records a call and answers with an injected fault if one matches.
    /// Returns the argv as the CLI backend shows it (`zfs ...`).
    fn call(&mut self, verb: &str, args: &str) -> Result<String, ZfsError> {
        self.calls.push(args.to_string());
        let argv = format!("zfs {args}");
        let first = args.split(' ').next().unwrap_or("");
        let Some(i) = self.faults.iter().position(|f| {
            (f.verb == verb || f.verb == first) && args.contains(f.needle.as_str())
        }) else {
            return Ok(argv);
        };
        let f = &mut self.faults[i];
        f.left -= 1;
        let (error, needle) = (f.error.clone(), f.needle.clone());
        if f.left == 0 {
            self.faults.remove(i);
        }
        let word = args.split(' ').find(|w| w.contains(needle.as_str()));
        let name = word.unwrap_or(&needle).to_string();
        Err(match error {
            FakeError::Busy => busy(&argv, format!("cannot {verb} '{name}': dataset is busy")),
            FakeError::DoesNotExist => ZfsError::DoesNotExist { name },
            FakeError::Other(s) => err(&argv, s),
        })
    }

    fn get(&self, argv: &str, ds: &DatasetName) -> Result<&Ds, ZfsError> {
        self.ds.get(ds).ok_or_else(|| no_ds(argv, ds))
    }

    fn get_mut(&mut self, argv: &str, ds: &DatasetName) -> Result<&mut Ds, ZfsError> {
        self.ds.get_mut(ds).ok_or_else(|| no_ds(argv, ds))
    }

    /// `zfs` refuses to rename or destroy what a receive is writing into.
    fn check_not_receiving(&self, argv: &str, verb: &str, root: &DatasetName) -> Result<(), ZfsError> {
        match self.receiving.keys().find(|d| under(d, root)) {
            Some(_) => Err(busy(argv, format!("cannot {verb} '{root}': dataset is busy"))),
            None => Ok(()),
        }
    }

    fn subtree(&self, root: &DatasetName) -> Vec<DatasetName> {
        self.ds.keys().filter(|d| under(d, root)).cloned().collect()
    }

    fn create(&mut self, argv: &str, ds: &DatasetName) -> Result<&mut Ds, ZfsError> {
        if self.ds.contains_key(ds) {
            return Err(err(argv, format!("cannot create '{ds}': dataset already exists")));
        }
        match ds.parent() {
            Some(p) if !self.ds.contains_key(&p) => {
                return Err(err(argv, format!("cannot create '{ds}': parent does not exist")))
            }
            None if !self.calls.is_empty() && argv != "create_pool" => {
                return Err(err(argv, format!("cannot create '{ds}': no such pool '{ds}'")))
            }
            _ => {}
        }
        let createtxg = self.tick();
        let d = Ds {
            guid: new_guid(),
            createtxg,
            ..Ds::default()
        };
        Ok(self.ds.entry(ds.clone()).or_insert(d))
    }

    fn view(&self, name: &DatasetName, d: &Ds, user_props: &[&str], all: bool) -> Dataset {
        let held = all || self.caps.has(Cap::HoldsList) || user_props.contains(&"userrefs");
        Dataset {
            name: name.clone(),
            guid: d.guid,
            kind: "filesystem".into(),
            snapshots: d.snaps.iter().map(|s| s.s.clone()).collect(),
            props: (d.props.iter())
                .filter(|(k, _)| k.contains(':') && (all || user_props.contains(&k.as_str())))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            held: (d.snaps.iter())
                .filter(|s| held && !s.holds.is_empty())
                .map(|s| s.s.name.to_string())
                .collect(),
            bookmarks: match all || self.caps.has(Cap::Bookmarks) {
                true => d.bookmarks.clone(),
                false => Vec::new(),
            },
            resume_token: (d.resume_token.clone()).filter(|_| all || self.caps.has(Cap::RecvResumable)),
            encrypted: false,
        }
    }

    /// Feature flags this zfs can receive: those it can send.
    fn receivable(&self) -> u64 {
        [
            (Cap::SendLargeBlocks, stream::LARGE_BLOCKS),
            (Cap::SendEmbedded, stream::EMBED_DATA),
            (Cap::SendCompressed, stream::COMPRESSED | stream::LZ4),
            (Cap::SendRaw, stream::RAW),
            (Cap::RecvResumable, stream::RESUMING),
        ]
        .iter()
        .filter(|(c, _)| self.caps.has(*c))
        .fold(0, |a, (_, f)| a | f)
    }

    /// The stream `zfs send` writes, or what it prints on failure.
    fn send_stream(&self, what: &SendWhat, flags: &[&str]) -> Result<Vec<u8>, String> {
        let mut features = 0;
        for f in flags {
            let (cap, feature) = match *f {
                "-L" => (Cap::SendLargeBlocks, stream::LARGE_BLOCKS),
                "-e" => (Cap::SendEmbedded, stream::EMBED_DATA),
                "-c" => (Cap::SendCompressed, stream::COMPRESSED | stream::LZ4),
                "-w" => (Cap::SendRaw, stream::RAW),
                _ => (Cap::ListParsable, 0),
            };
            if feature == 0 || !self.caps.has(cap) {
                let c = f.trim_start_matches('-');
                return Err(format!("invalid option '{c}'\nusage:\n\tsend [-DnPpRvLec] ..."));
            }
            features |= feature;
        }
        let find = |s: &SnapshotName| {
            let d = self.ds.get(&s.dataset());
            let snap = d.and_then(|d| d.snap(s.snap().as_str()));
            snap.map(|x| x.s.clone())
                .ok_or_else(|| format!("cannot open '{s}': dataset does not exist"))
        };
        let sub = |from_guid, s: &Snapshot, ds: &DatasetName| Sub {
            from_guid,
            to_guid: s.guid,
            toname: format!("{ds}@{}", s.name),
            features,
        };
        let earlier = |to: &SnapshotName| format!("cannot send '{to}': not an earlier snapshot from the same fs");
        let (to, from) = match what {
            SendWhat::Resume { token } => {
                if !self.caps.has(Cap::SendResume) {
                    return Err("invalid option 't'\nusage:\n\tsend [-DnPpRvLec] ...".into());
                }
                let (info, _) = self.resume(token)?;
                let to = SnapshotName::new(&info.to_name).map_err(|e| e.to_string())?;
                let mut s = sub(info.from_guid, &find(&to)?, &to.dataset());
                s.features |= stream::RESUMING;
                return Ok(stream::encode(&[s], false));
            }
            SendWhat::Snapshot { to, from } => (to, from),
        };
        let ds = to.dataset();
        let target = find(to)?;
        match from {
            None => Ok(stream::encode(&[sub(0, &target, &ds)], false)),
            Some(SendFrom::Bookmark(b)) => {
                if !self.caps.has(Cap::Bookmarks) {
                    return Err(format!("cannot open '{b}': invalid character '#' in name"));
                }
                let (bds, name) = b.split_once('#').unwrap_or((b, ""));
                let d = self.ds.get(&ds).filter(|_| bds == ds.as_str());
                let bm = d.and_then(|d| d.bookmarks.iter().find(|m| m.name.as_str() == name));
                let bm = bm.ok_or_else(|| format!("cannot open '{b}': dataset does not exist"))?;
                if bm.createtxg >= target.createtxg {
                    return Err(earlier(to));
                }
                Ok(stream::encode(&[sub(bm.guid, &target, &ds)], false))
            }
            Some(SendFrom::Snapshot(f)) => {
                let base = find(f)?;
                if f.dataset() != ds || base.createtxg >= target.createtxg {
                    return Err(earlier(to));
                }
                let mut prev = base.guid;
                let mut subs = Vec::new();
                for s in &self.ds[&ds].snaps {
                    if s.s.createtxg > base.createtxg && s.s.createtxg <= target.createtxg {
                        subs.push(sub(prev, &s.s, &ds));
                        prev = s.s.guid;
                    }
                }
                Ok(stream::encode(&subs, true))
            }
        }
    }

    /// A registered token, checked against the snapshots still here.
    fn resume(&self, token: &str) -> Result<(ResumeInfo, u64), String> {
        let Some(info) = self.tokens.get(token) else {
            return Err(format!("cannot resume send: '{token}' is not a valid resume token"));
        };
        let gone = || format!("cannot resume send: '{}' used in the initial send no longer exists", info.to_name);
        let to = SnapshotName::new(&info.to_name).map_err(|_| gone())?;
        let d = self.ds.get(&to.dataset()).ok_or_else(gone)?;
        match d.snap(to.snap().as_str()) {
            Some(s) if s.s.guid == info.to_guid => Ok((info.clone(), s.s.createtxg)),
            Some(_) => Err(format!(
                "cannot resume send: '{}' is no longer the same snapshot used in the initial send",
                info.to_name
            )),
            None => Err(gone()),
        }
    }

    /// Applies a complete stream to `dest` as `zfs receive` would, or
    /// changes nothing.
    fn receive(&mut self, argv: &str, dest: &DatasetName, spec: &RecvSpec, p: Parsed) -> Result<(), ZfsError> {
        let features = p.subs.iter().fold(0, |a, s| a | s.features);
        let unsupported = features & !self.receivable();
        if unsupported != 0 {
            return Err(err(
                argv,
                format!("cannot receive: stream has unsupported feature, feature flags = {unsupported:x}"),
            ));
        }
        let first = &p.subs[0];
        let resuming = first.features & stream::RESUMING != 0;
        let what = match (resuming, first.from_guid) {
            (true, _) => "resume",
            (false, 0) => "new filesystem",
            _ => "incremental",
        };
        let fail = |msg: String| err(argv, format!("cannot receive {what} stream: {msg}"));
        let existing = self.ds.get(dest);
        let mut snaps: Vec<Snap> = match existing {
            Some(d) if d.resume_token.is_some() && !resuming => {
                return Err(fail(format!(
                    "destination {dest} contains partially-complete state from \"zfs receive -s\"."
                )))
            }
            Some(d) if resuming && d.resume_token.is_none() => {
                return Err(fail(format!("destination {dest} has no resumable receive state")))
            }
            None if first.from_guid != 0 || resuming => {
                return Err(fail(format!("destination '{dest}' does not exist")))
            }
            None => {
                if let Some(parent) = dest.parent().filter(|p| !self.ds.contains_key(p)) {
                    return Err(no_ds(argv, parent));
                }
                Vec::new()
            }
            Some(d) if first.from_guid == 0 => {
                if !spec.force && !resuming {
                    return Err(fail(format!(
                        "destination '{dest}' exists\nmust specify -F to overwrite it"
                    )));
                }
                if let Some(s) = d.snaps.first() {
                    return Err(fail(format!(
                        "destination has snapshots (eg. {dest}@{})\nmust destroy them to overwrite it",
                        s.s.name
                    )));
                }
                Vec::new()
            }
            Some(d) => {
                let mut snaps = d.snaps.clone();
                if snaps.last().map(|s| s.s.guid) != Some(first.from_guid) {
                    let base = snaps.iter().position(|s| s.s.guid == first.from_guid);
                    match base {
                        // -F rolls back to the base, destroying newer snapshots.
                        Some(i) if spec.force && snaps[i + 1..].iter().all(|s| s.holds.is_empty()) => {
                            snaps.truncate(i + 1)
                        }
                        _ => {
                            return Err(fail(format!(
                                "most recent snapshot of {dest} does not match incremental source"
                            )))
                        }
                    }
                } else if d.modified && !spec.force {
                    return Err(fail(format!(
                        "destination {dest} has been modified\nsince most recent snapshot"
                    )));
                }
                snaps
            }
        };
        let mut prev = first.from_guid;
        for sub in &p.subs {
            let name = SnapName::new(sub.snap()).map_err(|_| err(argv, stream_invalid()))?;
            if sub.from_guid != prev {
                return Err(err(argv, stream_invalid()));
            }
            if snaps.iter().any(|s| s.s.name == name) {
                return Err(fail(format!(
                    "destination {dest}@{name} exists\nmust destroy it to overwrite it"
                )));
            }
            prev = sub.to_guid;
            let createtxg = self.tick();
            snaps.push(Snap {
                s: Snapshot {
                    name,
                    guid: sub.to_guid,
                    createtxg,
                },
                holds: BTreeSet::new(),
            });
        }
        let d = match self.ds.contains_key(dest) {
            true => self.ds.get_mut(dest).expect("checked"),
            false => self.create("create_pool", dest)?,
        };
        d.snaps = snaps;
        d.bookmarks.retain(|b| b.createtxg <= d.snaps.last().map_or(0, |s| s.s.createtxg));
        d.modified = false;
        d.resume_token = None;
        for o in &spec.options {
            if let RecvOption::Set(k, v) = o {
                d.props.insert(k.clone(), v.clone());
            }
        }
        Ok(())
    }
}

fn stream_invalid() -> String {
    "cannot receive: invalid backup stream".into()
}

/// Forgets a running receive when its task ends or is aborted.
struct Receiving(FakeZfs, DatasetName);

impl Drop for Receiving {
    fn drop(&mut self) {
        let mut st = self.0.st();
        if let Some(n) = st.receiving.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                st.receiving.remove(&self.1);
            }
        }
    }
}

/// An in-memory ZFS: pools, datasets, snapshots, holds and bookmarks, with
/// real `zfs`'s rules and errors. Clones share the state.
#[derive(Clone, Debug)]
pub struct FakeZfs {
    state: Arc<Mutex<State>>,
}

fn ds(name: &str) -> DatasetName {
    DatasetName::new(name).unwrap_or_else(|e| panic!("{name:?}: {e}"))
}

impl FakeZfs {
    pub fn new(caps: Caps) -> FakeZfs {
        let state = State {
            caps,
            ..State::default()
        };
        FakeZfs {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// What zfs-fuse can do: `receive -u` and `hold`/`release`, no more.
    pub fn zfs_fuse() -> FakeZfs {
        FakeZfs::new(Caps::new(
            "zfs-fuse or older (no `zfs version`)",
            [Cap::RecvUnmounted, Cap::Holds],
        ))
    }

    /// OpenZFS 2.x: every capability.
    pub fn openzfs() -> FakeZfs {
        FakeZfs::new(Caps::all("zfs-2.1.11-1"))
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a backend call (checking injected faults) and runs `f` on
    /// the state with the shown argv.
    fn run<T>(
        &self,
        verb: &str,
        args: Vec<OsString>,
        f: impl FnOnce(&mut State, &str) -> Result<T, ZfsError>,
    ) -> Result<T, ZfsError> {
        let mut st = self.st();
        let argv = st.call(verb, &show(&args))?;
        f(&mut st, &argv)
    }

    pub fn create_pool(&self, name: &str) {
        let name = ds(name);
        assert!(name.is_pool_root(), "{name} is not a pool name");
        self.st().create("create_pool", &name).expect("create_pool");
    }

    /// `zfs create ds` (the parent must exist).
    pub fn create(&self, name: &str) {
        self.st().create("create", &ds(name)).expect("create");
    }

    /// `zfs snapshot ds@snap` of one dataset.
    pub fn snapshot(&self, name: &str, snap: &str) -> Snapshot {
        let mut st = self.st();
        let createtxg = st.tick();
        let d = st.ds.get_mut(&ds(name)).expect("snapshot: no such dataset");
        assert!(d.snap(snap).is_none(), "{name}@{snap} exists");
        let s = Snapshot {
            name: SnapName::new(snap).expect("snapshot name"),
            guid: new_guid(),
            createtxg,
        };
        d.snaps.push(Snap {
            s: s.clone(),
            holds: BTreeSet::new(),
        });
        d.modified = false;
        s
    }

    /// Writes to a dataset: it differs from its newest snapshot now.
    pub fn write(&self, name: &str) {
        let mut st = self.st();
        st.tick();
        st.ds.get_mut(&ds(name)).expect("write: no such dataset").modified = true;
    }

    /// The dataset as a listing shows it, with every local user property,
    /// every hold, bookmark and resume token whatever the capabilities.
    pub fn dataset(&self, name: &str) -> Option<Dataset> {
        let st = self.st();
        let name = ds(name);
        st.ds.get(&name).map(|d| st.view(&name, d, &[], true))
    }

    /// Every dataset's name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.st().ds.keys().map(|d| d.to_string()).collect()
    }

    /// A dataset's snapshots, oldest first (none if it does not exist).
    pub fn snapshots(&self, name: &str) -> Vec<Snapshot> {
        self.dataset(name).map(|d| d.snapshots).unwrap_or_default()
    }

    /// A property set locally (native or user).
    pub fn prop(&self, name: &str, prop: &str) -> Option<String> {
        self.st().ds.get(&ds(name))?.props.get(prop).cloned()
    }

    /// The tags held on `ds@snap`.
    pub fn holds(&self, snap: &str) -> Vec<String> {
        let s = SnapshotName::new(snap).expect("snapshot name");
        let st = self.st();
        let found = st.ds.get(&s.dataset()).and_then(|d| d.snap(s.snap().as_str()));
        found.map(|x| x.holds.iter().cloned().collect()).unwrap_or_default()
    }

    /// Every backend call so far, as `zfs` argv without `zfs` (a listing
    /// is `get -r ROOTS` or `get -d 1 ROOTS`).
    pub fn calls(&self) -> Vec<String> {
        self.st().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.st().calls.clear();
    }

    /// The next `times` calls of `verb` (`rename`, `destroy`, `receive`,
    /// `send`, `rollback`, `hold`, `release`, `set`, `snapshot`, `list`,
    /// ...) whose argv contains `dataset_substring` fail with `error`
    /// and change nothing. A receive fails at close, after reading its
    /// stream; a send writes nothing.
    pub fn fail(&self, verb: &str, dataset_substring: &str, times: usize, error: FakeError) {
        if times > 0 {
            self.st().faults.push(Fault {
                verb: verb.to_string(),
                needle: dataset_substring.to_string(),
                left: times,
                error,
            });
        }
    }

    /// Every receive waits this long after the end of its stream before
    /// applying it; meanwhile its destination is busy for rename, destroy
    /// and rollback.
    pub fn delay_receive(&self, delay: Duration) {
        self.st().delay = Some(delay).filter(|d| !d.is_zero());
    }

    /// Sets (or clears) a dataset's `receive_resume_token`, as a cut
    /// `zfs receive -s` would leave it.
    pub fn set_resume_token(&self, name: &str, token: Option<&str>) {
        let mut st = self.st();
        let d = st.ds.get_mut(&ds(name)).expect("set_resume_token: no such dataset");
        d.resume_token = token.map(str::to_string);
    }

    /// Makes `zfs send -t token` (and [`ZfsBackend::resume_info`]) know a
    /// token: what it continues. On the sending side.
    pub fn register_resume_token(&self, token: &str, info: ResumeInfo) {
        self.st().tokens.insert(token.to_string(), info);
    }
}

#[async_trait]
impl ZfsBackend for FakeZfs {
    async fn probe(&self) -> Result<Caps, ZfsError> {
        Ok(self.caps())
    }

    fn caps(&self) -> Caps {
        self.st().caps.clone()
    }

    async fn list(
        &self,
        roots: &[&DatasetName],
        depth: Option<u32>,
        user_props: &[&str],
    ) -> Result<Tree, ZfsError> {
        let mut args = match depth {
            Some(d) => format!("get -d {d}"),
            None => "get -r".to_string(),
        };
        for r in roots {
            args.push(' ');
            args.push_str(r.as_str());
        }
        let mut st = self.st();
        st.call("list", &args)?;
        let mut tree = Tree::default();
        for (name, d) in &st.ds {
            let listed = match depth {
                Some(_) => roots.contains(&name),
                None => roots.iter().any(|r| under(name, r)),
            };
            if listed {
                tree.datasets.insert(name.clone(), st.view(name, d, user_props, false));
            }
        }
        Ok(tree)
    }

    async fn create_unmounted(&self, ds: &DatasetName) -> Result<(), ZfsError> {
        self.run("create", create_unmounted_argv(ds), |st, argv| {
            let d = st.create(argv, ds)?;
            d.props.insert("mountpoint".into(), "none".into());
            Ok(())
        })
    }

    async fn rename(&self, from: &DatasetName, to: &DatasetName) -> Result<(), ZfsError> {
        self.run("rename", rename_argv(from, to), |st, argv| {
            st.get(argv, from)?;
            let cannot = |why: &str| Err(err(argv, format!("cannot rename to '{to}': {why}")));
            if from.is_pool_root() || to.is_pool_root() {
                return cannot("operation does not apply to pools");
            }
            if from.as_str().split('/').next() != to.as_str().split('/').next() {
                return cannot("datasets must be within same pool");
            }
            if st.ds.contains_key(to) {
                return cannot("dataset already exists");
            }
            if under(to, from) {
                return cannot("New dataset name cannot be a descendant of current dataset name");
            }
            if !to.parent().is_some_and(|p| st.ds.contains_key(&p)) {
                return cannot("parent does not exist");
            }
            st.check_not_receiving(argv, "rename", from)?;
            st.tick();
            for name in st.subtree(from) {
                let d = st.ds.remove(&name).expect("listed");
                let rel = name.relative_to(from).expect("under");
                st.ds.insert(to.join(&rel).map_err(|e| err(argv, e.to_string()))?, d);
            }
            Ok(())
        })
    }

    async fn destroy_recursive(&self, ds: &DatasetName) -> Result<(), ZfsError> {
        self.run("destroy", destroy_argv(ds, true), |st, argv| {
            st.get(argv, ds)?;
            st.check_not_receiving(argv, "destroy", ds)?;
            let names = st.subtree(ds);
            for n in &names {
                if let Some(s) = st.ds[n].snaps.iter().find(|s| !s.holds.is_empty()) {
                    let msg = format!("cannot destroy snapshot {n}@{}: dataset is busy", s.s.name);
                    return Err(busy(argv, msg));
                }
            }
            st.tick();
            for n in names {
                if &n == ds && ds.is_pool_root() {
                    let d = st.ds.get_mut(ds).expect("listed");
                    (d.snaps.clear(), d.bookmarks.clear());
                } else {
                    st.ds.remove(&n);
                }
            }
            Ok(())
        })
    }

    async fn destroy_empty(&self, ds: &DatasetName) -> Result<(), ZfsError> {
        self.run("destroy", destroy_argv(ds, false), |st, argv| {
            let d = st.get(argv, ds)?;
            if ds.is_pool_root() {
                return Err(err(argv, format!("cannot destroy '{ds}': operation does not apply to pools")));
            }
            let mut children: Vec<String> = st.subtree(ds).iter().skip(1).map(|c| c.to_string()).collect();
            children.extend(d.snaps.iter().map(|s| format!("{ds}@{}", s.s.name)));
            if !children.is_empty() {
                return Err(err(
                    argv,
                    format!(
                        "cannot destroy '{ds}': filesystem has children\nuse '-r' to destroy the following datasets:\n{}",
                        children.join("\n")
                    ),
                ));
            }
            st.check_not_receiving(argv, "destroy", ds)?;
            st.tick();
            st.ds.remove(ds);
            Ok(())
        })
    }

    async fn unmount(&self, ds: &DatasetName) -> Result<(), ZfsError> {
        self.run("unmount", unmount_argv(ds), |st, argv| st.get(argv, ds).map(drop))
    }

    async fn rollback(&self, snap: &SnapshotName) -> Result<(), ZfsError> {
        self.run("rollback", rollback_argv(snap), |st, argv| {
            let name = snap.dataset();
            let d = st.get(argv, &name)?;
            let s = d.snap(snap.snap().as_str()).ok_or_else(|| no_ds(argv, snap))?;
            let txg = s.s.createtxg;
            let mut newer: Vec<String> = (d.snaps.iter().filter(|x| x.s.createtxg > txg))
                .map(|x| format!("{name}@{}", x.s.name))
                .collect();
            newer.extend((d.bookmarks.iter().filter(|b| b.createtxg > txg)).map(|b| format!("{name}#{}", b.name)));
            if !newer.is_empty() {
                return Err(err(argv, format!(
                    "cannot rollback to '{snap}': more recent snapshots or bookmarks exist\nuse '-r' to force deletion of the following snapshots and bookmarks:\n{}",
                    newer.join("\n")
                )));
            }
            st.check_not_receiving(argv, "rollback", &name)?;
            st.tick();
            st.get_mut(argv, &name)?.modified = false;
            Ok(())
        })
    }

    async fn set(&self, ds: &DatasetName, prop: &str, value: &str) -> Result<(), ZfsError> {
        self.set_many(std::slice::from_ref(ds), prop, value).await
    }

    async fn set_many(&self, datasets: &[DatasetName], prop: &str, value: &str) -> Result<(), ZfsError> {
        if datasets.is_empty() {
            return Ok(());
        }
        self.run("set", set_many_argv(datasets, prop, value), |st, argv| {
            let mut errors = Vec::new();
            for d in datasets {
                match st.ds.get_mut(d) {
                    Some(d) => drop(d.props.insert(prop.to_string(), value.to_string())),
                    None => errors.push(format!("cannot open '{d}': dataset does not exist")),
                }
            }
            match errors.is_empty() {
                true => Ok(()),
                false => Err(err(argv, errors.join("\n"))),
            }
        })
    }

    async fn snapshot_recursive(&self, snap: &SnapshotName) -> Result<(), ZfsError> {
        self.run("snapshot", snapshot_recursive_argv(snap), |st, argv| {
            let root = snap.dataset();
            st.get(argv, &root)?;
            let name = snap.snap();
            let names = st.subtree(&root);
            if let Some(n) = names.iter().find(|n| st.ds[*n].snap(name.as_str()).is_some()) {
                return Err(err(argv, format!("cannot create snapshot '{n}@{name}': dataset already exists")));
            }
            let createtxg = st.tick();
            for n in names {
                let d = st.ds.get_mut(&n).expect("listed");
                let s = Snapshot {
                    name: name.clone(),
                    guid: new_guid(),
                    createtxg,
                };
                d.snaps.push(Snap {
                    s,
                    holds: BTreeSet::new(),
                });
                d.modified = false;
            }
            Ok(())
        })
    }

    async fn destroy_snapshot(&self, snap: &SnapshotName, recursive: bool) -> Result<(), ZfsError> {
        self.run("destroy", destroy_snapshot_argv(snap, recursive), |st, argv| {
            let (root, name) = (snap.dataset(), snap.snap());
            st.get(argv, &root)?;
            let names = match recursive {
                true => st.subtree(&root),
                false => vec![root.clone()],
            };
            let having: Vec<_> = names.into_iter().filter(|n| st.ds[n].snap(name.as_str()).is_some()).collect();
            if having.is_empty() {
                return Err(no_ds(argv, snap));
            }
            if let Some(n) = having.iter().find(|n| !st.ds[*n].snap(name.as_str()).expect("has").holds.is_empty()) {
                return Err(err(argv, format!("cannot destroy snapshot {n}@{name}: dataset is busy")));
            }
            st.tick();
            for n in having {
                st.ds.get_mut(&n).expect("listed").snaps.retain(|s| s.s.name != name);
            }
            Ok(())
        })
    }

    async fn hold(&self, tag: &str, snaps: &[SnapshotName]) -> Result<(), ZfsError> {
        self.hold_or_release(true, tag, snaps)
    }

    async fn release(&self, tag: &str, snaps: &[SnapshotName]) -> Result<(), ZfsError> {
        self.hold_or_release(false, tag, snaps)
    }

    async fn release_tag_under(&self, tag: &str, root: &DatasetName) -> Result<(), ZfsError> {
        if !self.caps().has(Cap::HoldsList) {
            return Ok(());
        }
        let mut st = self.st();
        let argv = st.call("release", &show(&list_snapshots_argv(root)))?;
        let mut mine = Vec::new();
        for n in st.subtree(root) {
            for s in &st.ds[&n].snaps {
                if s.holds.contains(tag) {
                    mine.push(format!("{n}@{}", s.s.name));
                }
            }
        }
        if mine.is_empty() {
            return Ok(drop(argv));
        }
        let names: Vec<&str> = mine.iter().map(String::as_str).collect();
        st.call("release", &show(&release_argv(tag, &names)))?;
        for n in st.subtree(root) {
            for s in &mut st.ds.get_mut(&n).expect("listed").snaps {
                s.holds.remove(tag);
            }
        }
        Ok(())
    }

    async fn bookmark(&self, snap: &SnapshotName, name: &str) -> Result<(), ZfsError> {
        let caps = self.caps();
        self.run("bookmark", bookmark_argv(snap, name), |st, argv| {
            if !caps.has(Cap::Bookmarks) {
                return Err(err(argv, "unrecognized command 'bookmark'\nusage: zfs command args ..."));
            }
            let d = st.get_mut(argv, &snap.dataset())?;
            let s = d.snap(snap.snap().as_str()).ok_or_else(|| no_ds(argv, snap))?.s.clone();
            if d.bookmarks.iter().any(|b| b.name.as_str() == name) {
                let ds = snap.dataset();
                return Err(err(argv, format!("cannot create bookmark '{ds}#{name}': bookmark exists")));
            }
            let name = SnapName::new(name).map_err(|e| err(argv, e.to_string()))?;
            d.bookmarks.push(Snapshot { name, ..s });
            d.bookmarks.sort_by_key(|b| b.createtxg);
            Ok(())
        })
    }

    async fn destroy_bookmark(&self, ds: &DatasetName, name: &str) -> Result<(), ZfsError> {
        self.run("destroy", destroy_bookmark_argv(ds, name), |st, argv| {
            let d = st.ds.get_mut(ds).filter(|d| d.bookmarks.iter().any(|b| b.name.as_str() == name));
            let Some(d) = d else {
                return Err(err(argv, format!("bookmark '{ds}#{name}' does not exist.")));
            };
            d.bookmarks.retain(|b| b.name.as_str() != name);
            Ok(())
        })
    }

    fn spawn_send(&self, what: &SendWhat, flags: &[&str]) -> Result<ZfsChild, ZfsError> {
        let args = show(&send_argv(what, flags));
        let prepared = {
            let mut st = self.st();
            st.call("send", &args)
                .and_then(|argv| st.send_stream(what, flags).map_err(|e| err(&argv, e)))
        };
        let (mut w, r) = tokio::io::duplex(64 << 10);
        let argv = format!("zfs {args}");
        let task = async move {
            let bytes = prepared?;
            let io = |source| ZfsError::Io {
                argv: argv.clone(),
                source,
            };
            w.write_all(&bytes).await.map_err(io)?;
            w.shutdown().await.map_err(io)
        };
        Ok(ZfsChild::task(args, Some(Box::new(r) as ChildReader), None, task))
    }

    fn spawn_receive(&self, dest: &DatasetName, spec: &RecvSpec) -> Result<ZfsChild, ZfsError> {
        let args = show(&receive_argv(dest, spec));
        let (early, delay, guard) = {
            let mut st = self.st();
            let caps = st.caps.clone();
            let early = st.call("receive", &args).and_then(|argv| {
                let mut need = vec![(Cap::RecvUnmounted, 'u')];
                if spec.resumable {
                    need.push((Cap::RecvResumable, 's'));
                }
                for o in &spec.options {
                    need.push(match o {
                        RecvOption::Set(..) => (Cap::RecvSetProp, 'o'),
                        RecvOption::Exclude(_) => (Cap::RecvExcludeProp, 'x'),
                    });
                }
                match need.iter().find(|(c, _)| !caps.has(*c)) {
                    Some((_, o)) => Err(err(&argv, format!("invalid option '{o}'\nusage:\n\treceive [-vnFu] ..."))),
                    None => Ok(argv),
                }
            });
            *st.receiving.entry(dest.clone()).or_default() += 1;
            (early, st.delay, Receiving(self.clone(), dest.clone()))
        };
        let (w, mut r) = tokio::io::duplex(64 << 10);
        let (fake, dest, spec) = (self.clone(), dest.clone(), spec.clone());
        let task = async move {
            let _guard = guard;
            let mut bytes = Vec::new();
            let read = r.read_to_end(&mut bytes).await;
            let argv = early?;
            read.map_err(|source| ZfsError::Io {
                argv: argv.clone(),
                source,
            })?;
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            let parsed = stream::decode(&bytes).map_err(|e| err(&argv, e))?;
            let result = fake.st().receive(&argv, &dest, &spec, parsed);
            result
        };
        Ok(ZfsChild::task(args, None, Some(Box::new(w) as ChildWriter), task))
    }

    async fn resume_info(&self, token: &str) -> Result<ResumeInfo, ZfsError> {
        let mut st = self.st();
        let argv = st.call("send", &show(&resume_info_argv(token)))?;
        let (mut info, _) = st.resume(token).map_err(|e| err(&argv, e))?;
        let what = SendWhat::Resume {
            token: token.to_string(),
        };
        let left = st.send_stream(&what, &[]).map(|b| b.len() as u64);
        info.bytes_left = left.ok().or(info.bytes_left);
        Ok(info)
    }

    async fn abort_resumable(&self, dest: &DatasetName) -> Result<(), ZfsError> {
        self.run("receive", abort_resumable_argv(dest), |st, argv| {
            if !st.caps.has(Cap::RecvAbortResumable) {
                return Err(err(argv, "invalid option 'A'\nusage:\n\treceive [-vnFu] ..."));
            }
            let d = st.get_mut(argv, dest)?;
            if d.resume_token.take().is_none() {
                return Err(err(argv, format!("'{dest}' does not have any resumable receive state to abort")));
            }
            Ok(())
        })
    }
}

impl FakeZfs {
    /// `zfs hold`/`zfs release`: each snapshot on its own, as `zfs` does;
    /// the errors of all are reported at the end.
    fn hold_or_release(&self, holding: bool, tag: &str, snaps: &[SnapshotName]) -> Result<(), ZfsError> {
        if snaps.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = snaps.iter().map(SnapshotName::as_str).collect();
        let (verb, args) = match holding {
            true => ("hold", hold_argv(tag, snaps)),
            false => ("release", release_argv(tag, &names)),
        };
        let caps = self.caps();
        self.run(verb, args, |st, argv| {
            if !caps.has(Cap::Holds) {
                return Err(err(argv, format!("unrecognized command '{verb}'\nusage: zfs command args ...")));
            }
            let mut errors = Vec::new();
            for snap in snaps {
                let what = match holding {
                    true => "cannot hold snapshot",
                    false => "cannot release hold from snapshot",
                };
                let Some(d) = st.ds.get_mut(&snap.dataset()) else {
                    errors.push(format!("cannot open '{}': dataset does not exist", snap.dataset()));
                    continue;
                };
                let Some(s) = d.snaps.iter_mut().find(|s| s.s.name == snap.snap()) else {
                    errors.push(format!("{what} '{snap}': dataset does not exist"));
                    continue;
                };
                match holding {
                    true if !s.holds.insert(tag.to_string()) => {
                        errors.push(format!("{what} '{snap}': tag already exists on this dataset"))
                    }
                    false if !s.holds.remove(tag) => {
                        errors.push(format!("{what} '{snap}': no such tag on this dataset"))
                    }
                    _ => {}
                }
            }
            match errors.is_empty() {
                true => Ok(()),
                false => Err(err(argv, errors.join("\n"))),
            }
        })
    }
}
