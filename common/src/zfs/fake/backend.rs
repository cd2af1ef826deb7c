//! [`ZfsBackend`] for [`FakeZfs`]: one method per verb, each recorded and
//! checked against injected faults first.

use std::collections::BTreeSet;
use std::ffi::OsString;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::new_guid;
use super::state::{busy, err, no_ds, show, under, Snap, State};
use super::{stream, FakeZfs, Receiving};
use crate::caps::{Cap, Caps};
use crate::model::{Snapshot, Tree};
use crate::naming::{DatasetName, SnapName, SnapshotName};
use crate::zfs::argv::*;
use crate::zfs::{ChildReader, ChildWriter, ResumeInfo, ZfsBackend, ZfsChild, ZfsError};

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
        let (tree, delay) = {
            let mut st = self.st();
            st.call("list", &args)?;
            let mut tree = Tree::default();
            for (name, d) in &st.ds {
                let listed = match depth {
                    Some(_) => roots.contains(&name),
                    None => roots.iter().any(|r| under(name, r)),
                };
                if listed {
                    tree.datasets
                        .insert(name.clone(), st.view(name, d, user_props, false));
                }
            }
            (tree, st.list_delay)
        };
        // What was read stays as read while the listing takes its time.
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        Ok(tree)
    }

    async fn create_unmounted(&self, ds: &DatasetName) -> Result<(), ZfsError> {
        self.run("create", create_unmounted_argv(ds), |st, argv| {
            let d = st.create(argv, ds, false)?;
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
            let mut moves = Vec::new();
            for name in st.subtree(from) {
                let rel = name.relative_to(from).expect("under");
                moves.push((to.join(&rel).map_err(|e| err(argv, e.to_string()))?, name));
            }
            st.tick();
            for (new, old) in moves {
                let d = st.ds.remove(&old).expect("listed");
                st.ds.insert(new, d);
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
                    let msg = format!("cannot destroy '{n}@{}': dataset is busy", s.s.name);
                    return Err(busy(argv, msg));
                }
            }
            st.tick();
            for n in names {
                if &n == ds && ds.is_pool_root() {
                    let d = st.ds.get_mut(ds).expect("listed");
                    d.snaps.clear();
                    d.bookmarks.clear();
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
        self.run("unmount", unmount_argv(ds), |st, argv| {
            st.get(argv, ds).map(drop)
        })
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
                // zfs-fuse has no bookmarks, and says so.
                let what = match st.caps.has(Cap::Bookmarks) {
                    true => ("snapshots or bookmarks", "snapshots and bookmarks"),
                    false => ("snapshots", "snapshots"),
                };
                return Err(err(argv, format!(
                    "cannot rollback to '{snap}': more recent {} exist\nuse '-r' to force deletion of the following {}:\n{}",
                    what.0, what.1, newer.join("\n")
                )));
            }
            st.check_not_receiving(argv, "rollback", &name)?;
            st.tick();
            st.get_mut(argv, &name)?.modified = false;
            Ok(())
        })
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
        self.run("set", set_many_argv(datasets, prop, value), |st, argv| {
            let mut errors = Vec::new();
            for d in datasets {
                match st.ds.get_mut(d) {
                    Some(d) => {
                        d.props.insert(prop.to_string(), value.to_string());
                    }
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
                return Err(err(argv, format!("cannot create snapshot '{n}@{name}': dataset already exists\nno snapshots were created")));
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
        self.run(
            "destroy",
            destroy_snapshot_argv(snap, recursive),
            |st, argv| {
                let (root, name) = (snap.dataset(), snap.snap());
                st.get(argv, &root)?;
                let names = match recursive {
                    true => st.subtree(&root),
                    false => vec![root.clone()],
                };
                let having: Vec<_> = names
                    .into_iter()
                    .filter(|n| st.ds[n].snap(name.as_str()).is_some())
                    .collect();
                if having.is_empty() {
                    return Err(no_ds(argv, snap));
                }
                if let Some(n) = having
                    .iter()
                    .find(|n| !st.ds[*n].snap(name.as_str()).expect("has").holds.is_empty())
                {
                    return Err(err(
                        argv,
                        format!("cannot destroy '{n}@{name}': dataset is busy"),
                    ));
                }
                st.tick();
                for n in having {
                    st.ds
                        .get_mut(&n)
                        .expect("listed")
                        .snaps
                        .retain(|s| s.s.name != name);
                }
                Ok(())
            },
        )
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
        st.call("release", &show(&list_snapshots_argv(root)))?;
        let mut mine = Vec::new();
        for n in st.subtree(root) {
            for s in &st.ds[&n].snaps {
                if s.holds.contains(tag) {
                    mine.push(format!("{n}@{}", s.s.name));
                }
            }
        }
        if mine.is_empty() {
            return Ok(());
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
                return Err(err(
                    argv,
                    "unrecognized command 'bookmark'\nusage: zfs command args ...",
                ));
            }
            let d = st.get_mut(argv, &snap.dataset())?;
            let s = d
                .snap(snap.snap().as_str())
                .ok_or_else(|| no_ds(argv, snap))?
                .s
                .clone();
            if d.bookmarks.iter().any(|b| b.name.as_str() == name) {
                let ds = snap.dataset();
                return Err(err(
                    argv,
                    format!("cannot create bookmark '{ds}#{name}': bookmark exists"),
                ));
            }
            let name = SnapName::new(name).map_err(|e| err(argv, e.to_string()))?;
            d.bookmarks.push(Snapshot { name, ..s });
            d.bookmarks.sort_by_key(|b| b.createtxg);
            Ok(())
        })
    }

    async fn destroy_bookmark(&self, ds: &DatasetName, name: &str) -> Result<(), ZfsError> {
        self.run("destroy", destroy_bookmark_argv(ds, name), |st, argv| {
            let d = st
                .ds
                .get_mut(ds)
                .filter(|d| d.bookmarks.iter().any(|b| b.name.as_str() == name));
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
        Ok(ZfsChild::task(
            args,
            Some(Box::new(r) as ChildReader),
            None,
            task,
        ))
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
                    Some((_, o)) => Err(err(
                        &argv,
                        format!("invalid option '{o}'\nusage:\n\treceive [-vnFu] ..."),
                    )),
                    None => Ok(argv),
                }
            });
            *st.receiving.entry(dest.clone()).or_default() += 1;
            (early, st.delay, Receiving(self.clone(), dest.clone()))
        };
        let (w, mut r) = tokio::io::duplex(64 << 10);
        let (fake, dest, spec) = (self.clone(), dest.clone(), spec.clone());
        let task = async move {
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
            drop(guard); // after the state's lock: it takes the lock itself
            result
        };
        Ok(ZfsChild::task(
            args,
            None,
            Some(Box::new(w) as ChildWriter),
            task,
        ))
    }

    async fn resume_info(&self, token: &str) -> Result<ResumeInfo, ZfsError> {
        let mut st = self.st();
        let argv = st.call("send", &show(&resume_info_argv(token)))?;
        let mut info = st.resume(token).map_err(|e| err(&argv, e))?;
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
                return Err(err(
                    argv,
                    "invalid option 'A'\nusage:\n\treceive [-vnFu] ...",
                ));
            }
            let d = st.get_mut(argv, dest)?;
            if d.resume_token.take().is_none() {
                return Err(err(
                    argv,
                    format!("'{dest}' does not have any resumable receive state to abort"),
                ));
            }
            Ok(())
        })
    }
}

impl FakeZfs {
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

    /// `zfs hold`/`zfs release`: each snapshot on its own, as `zfs` does;
    /// the errors of all are reported at the end.
    fn hold_or_release(
        &self,
        holding: bool,
        tag: &str,
        snaps: &[SnapshotName],
    ) -> Result<(), ZfsError> {
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
                return Err(err(
                    argv,
                    format!("unrecognized command '{verb}'\nusage: zfs command args ..."),
                ));
            }
            let mut errors = Vec::new();
            for snap in snaps {
                let d = st.ds.get_mut(&snap.dataset());
                let Some(s) = d.and_then(|d| d.snaps.iter_mut().find(|s| s.s.name == snap.snap()))
                else {
                    errors.push(format!("cannot {verb} '{snap}': dataset does not exist"));
                    continue;
                };
                match holding {
                    true if !s.holds.insert(tag.to_string()) => errors.push(format!(
                        "cannot hold '{snap}': tag already exists on this dataset"
                    )),
                    false if !s.holds.remove(tag) => errors.push(format!(
                        "cannot release '{tag}' from '{snap}': no such tag on this dataset"
                    )),
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
