//! The state behind [`super::FakeZfs`] and zfs's rules on it: listing,
//! what `zfs send` writes, what `zfs receive` accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::time::Duration;

use super::stream::{self, Parsed, Sub};
use super::{new_guid, FakeError};
use crate::caps::{Cap, Caps};
use crate::model::{Dataset, Snapshot};
use crate::naming::{DatasetName, SnapName, SnapshotName};
use crate::zfs::argv::{RecvOption, RecvSpec, SendFrom, SendWhat};
use crate::zfs::{ResumeInfo, ZfsError, BUSY_TRIES};

const STATUS: &str = "exit status: 1";

#[derive(Clone, Debug)]
pub(super) struct Snap {
    pub(super) s: Snapshot,
    pub(super) holds: BTreeSet<String>,
}

#[derive(Clone, Debug, Default)]
pub(super) struct Ds {
    pub(super) guid: u64,
    /// Not listed by zfsync; kept as zfs keeps it.
    #[allow(dead_code)]
    pub(super) createtxg: u64,
    /// Oldest first.
    pub(super) snaps: Vec<Snap>,
    pub(super) bookmarks: Vec<Snapshot>,
    /// Local properties, native and user. Nothing is inherited here: a
    /// listing shows user properties only where they are set locally, as
    /// `zfs::parse_get` reads a real listing (source `local`), so a child
    /// made under a marked replica shows no mark.
    pub(super) props: BTreeMap<String, String>,
    /// Written since the newest snapshot.
    pub(super) modified: bool,
    pub(super) resume_token: Option<String>,
}

impl Ds {
    pub(super) fn snap(&self, name: &str) -> Option<&Snap> {
        self.snaps.iter().find(|s| s.s.name.as_str() == name)
    }
}

#[derive(Debug)]
pub(super) struct Fault {
    pub(super) verb: String,
    pub(super) needle: String,
    pub(super) left: usize,
    pub(super) error: FakeError,
}

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) caps: Caps,
    pub(super) ds: BTreeMap<DatasetName, Ds>,
    pub(super) txg: u64,
    pub(super) calls: Vec<String>,
    pub(super) faults: Vec<Fault>,
    pub(super) delay: Option<Duration>,
    /// How long a listing takes after it read the tree.
    pub(super) list_delay: Option<Duration>,
    /// Destinations of running receives (a count per name).
    pub(super) receiving: BTreeMap<DatasetName, usize>,
    /// Resume tokens `zfs send -t` knows ([`super::FakeZfs::register_resume_token`]).
    pub(super) tokens: BTreeMap<String, ResumeInfo>,
}

pub(super) fn err(argv: &str, stderr: impl Into<String>) -> ZfsError {
    ZfsError::from_failure(argv, STATUS, stderr.into())
}

/// A busy error after the CLI backend's retries (rename, destroy, rollback).
pub(super) fn busy(argv: &str, stderr: String) -> ZfsError {
    ZfsError::Busy {
        argv: argv.to_string(),
        tries: BUSY_TRIES,
        stderr,
    }
}

pub(super) fn no_ds(argv: &str, name: impl std::fmt::Display) -> ZfsError {
    err(
        argv,
        format!("cannot open '{name}': dataset does not exist"),
    )
}

pub(super) fn under(name: &DatasetName, root: &DatasetName) -> bool {
    name.relative_to(root).is_some()
}

pub(super) fn show(args: &[OsString]) -> String {
    let v: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
    v.join(" ")
}

impl State {
    pub(super) fn tick(&mut self) -> u64 {
        self.txg += 1;
        self.txg
    }

    /// Records a call and answers with an injected fault if one matches.
    /// Returns the argv as the CLI backend shows it (`zfs ...`).
    pub(super) fn call(&mut self, verb: &str, args: &str) -> Result<String, ZfsError> {
        self.calls.push(args.to_string());
        let argv = format!("zfs {args}");
        let first = args.split(' ').next().unwrap_or("");
        let Some(i) = self
            .faults
            .iter()
            .position(|f| (f.verb == verb || f.verb == first) && args.contains(f.needle.as_str()))
        else {
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

    pub(super) fn get(&self, argv: &str, ds: &DatasetName) -> Result<&Ds, ZfsError> {
        self.ds.get(ds).ok_or_else(|| no_ds(argv, ds))
    }

    pub(super) fn get_mut(&mut self, argv: &str, ds: &DatasetName) -> Result<&mut Ds, ZfsError> {
        self.ds.get_mut(ds).ok_or_else(|| no_ds(argv, ds))
    }

    /// `zfs` refuses to rename or destroy what a receive is writing into.
    pub(super) fn check_not_receiving(
        &self,
        argv: &str,
        verb: &str,
        root: &DatasetName,
    ) -> Result<(), ZfsError> {
        match self.receiving.keys().find(|d| under(d, root)) {
            Some(_) => Err(busy(
                argv,
                format!("cannot {verb} '{root}': dataset is busy"),
            )),
            None => Ok(()),
        }
    }

    pub(super) fn subtree(&self, root: &DatasetName) -> Vec<DatasetName> {
        self.ds.keys().filter(|d| under(d, root)).cloned().collect()
    }

    /// `zfs create` (or `zpool create` for a `pool`).
    pub(super) fn create(
        &mut self,
        argv: &str,
        ds: &DatasetName,
        pool: bool,
    ) -> Result<&mut Ds, ZfsError> {
        if self.ds.contains_key(ds) {
            return Err(err(
                argv,
                format!("cannot create '{ds}': dataset already exists"),
            ));
        }
        match ds.parent() {
            Some(p) if !self.ds.contains_key(&p) => {
                return Err(err(
                    argv,
                    format!("cannot create '{ds}': parent does not exist"),
                ))
            }
            None if !pool => {
                return Err(err(
                    argv,
                    format!("cannot create '{ds}': missing dataset name"),
                ))
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

    pub(super) fn view(
        &self,
        name: &DatasetName,
        d: &Ds,
        user_props: &[&str],
        all: bool,
    ) -> Dataset {
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
            resume_token: (d.resume_token.clone())
                .filter(|_| all || self.caps.has(Cap::RecvResumable)),
            encrypted: false,
            // Where zfs has the property (OpenZFS): some bytes once written.
            written: (all || self.caps.has(Cap::Written)).then_some(if d.modified {
                4096
            } else {
                0
            }),
        }
    }

    /// Feature flags this zfs can receive: those it can send.
    pub(super) fn receivable(&self) -> u64 {
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
    pub(super) fn send_stream(&self, what: &SendWhat, flags: &[&str]) -> Result<Vec<u8>, String> {
        let mut features = 0;
        for f in flags {
            let known = match *f {
                "-L" => Some((Cap::SendLargeBlocks, stream::LARGE_BLOCKS)),
                "-e" => Some((Cap::SendEmbedded, stream::EMBED_DATA)),
                "-c" => Some((Cap::SendCompressed, stream::COMPRESSED | stream::LZ4)),
                "-w" => Some((Cap::SendRaw, stream::RAW)),
                _ => None,
            };
            match known.filter(|(cap, _)| self.caps.has(*cap)) {
                Some((_, feature)) => features |= feature,
                None => {
                    let c = f.trim_start_matches('-');
                    return Err(format!(
                        "invalid option '{c}'\nusage:\n\tsend [-DnPpRvLec] ..."
                    ));
                }
            }
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
        let earlier = |to: &SnapshotName| {
            format!("cannot send '{to}': not an earlier snapshot from the same fs")
        };
        let (to, from) = match what {
            SendWhat::Resume { token } => {
                if !self.caps.has(Cap::SendResume) {
                    return Err("invalid option 't'\nusage:\n\tsend [-DnPpRvLec] ...".into());
                }
                let info = self.resume(token)?;
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
    pub(super) fn resume(&self, token: &str) -> Result<ResumeInfo, String> {
        let Some(info) = self.tokens.get(token) else {
            return Err("cannot resume send: resume token is corrupt (invalid format)".to_string());
        };
        let gone = || {
            format!(
                "cannot resume send: '{}' used in the initial send no longer exists",
                info.to_name
            )
        };
        let to = SnapshotName::new(&info.to_name).map_err(|_| gone())?;
        let d = self.ds.get(&to.dataset()).ok_or_else(gone)?;
        match d.snap(to.snap().as_str()) {
            Some(s) if s.s.guid == info.to_guid => Ok(info.clone()),
            Some(_) => Err(format!(
                "cannot resume send: '{}' is no longer the same snapshot used in the initial send",
                info.to_name
            )),
            None => Err(gone()),
        }
    }

    /// Applies a complete stream to `dest` as `zfs receive` would, or
    /// changes nothing.
    pub(super) fn receive(
        &mut self,
        argv: &str,
        dest: &DatasetName,
        spec: &RecvSpec,
        p: Parsed,
    ) -> Result<(), ZfsError> {
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
            None => match dest.parent() {
                Some(parent) if self.ds.contains_key(&parent) => Vec::new(),
                // As zfs-fuse prints it: two lines, so not DoesNotExist.
                _ => {
                    return Err(err(
                        argv,
                        format!("cannot open '{dest}': dataset does not exist\ncannot receive {what} stream: dataset does not exist"),
                    ))
                }
            },
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
                                "most recent snapshot of {dest} does not\nmatch incremental source"
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
        let mut new = Vec::new();
        for sub in &p.subs {
            let name =
                SnapName::new(sub.snap()).map_err(|_| fail("invalid backup stream".into()))?;
            if sub.from_guid != prev {
                return Err(fail("invalid backup stream".into()));
            }
            if snaps.iter().any(|s| s.s.name == name) || new.iter().any(|(n, _)| n == &name) {
                return Err(fail(format!(
                    "destination {dest}@{name} exists\nmust destroy it to overwrite it"
                )));
            }
            prev = sub.to_guid;
            new.push((name, sub.to_guid));
        }
        if !self.ds.contains_key(dest) {
            self.create(argv, dest, false)?;
        }
        for (name, guid) in new {
            let createtxg = self.tick();
            let s = Snapshot {
                name,
                guid,
                createtxg,
            };
            snaps.push(Snap {
                s,
                holds: BTreeSet::new(),
            });
        }
        let d = self.ds.get_mut(dest).expect("exists");
        d.snaps = snaps;
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
