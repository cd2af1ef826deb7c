use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::naming::{DatasetName, SnapshotName};
use crate::stream::{check_head, HEAD_MAX};
use crate::zfs::{
    RecvSpec, ResumeInfo, SendFrom, SendWhat, ZfsBackend, ZfsChild, ZfsError, BUSY_TRIES,
};

fn dn(s: &str) -> DatasetName {
    DatasetName::new(s).unwrap()
}

fn sn(s: &str) -> SnapshotName {
    SnapshotName::new(s).unwrap()
}

fn full(to: &str) -> SendWhat {
    SendWhat::Snapshot {
        from: None,
        to: sn(to),
    }
}

fn incr(from: &str, to: &str) -> SendWhat {
    SendWhat::Snapshot {
        from: Some(SendFrom::Snapshot(sn(from))),
        to: sn(to),
    }
}

/// Pipes `zfs send` into `zfs receive`; the two exits.
async fn pipe(
    src: &FakeZfs,
    what: &SendWhat,
    dst: &FakeZfs,
    dest: &str,
    spec: &RecvSpec,
) -> (Result<(), ZfsError>, Result<(), ZfsError>) {
    let mut send = src.spawn_send(what, &[]).unwrap();
    let mut recv = dst.spawn_receive(&dn(dest), spec).unwrap();
    let mut r = send.take_stdout().unwrap();
    let mut w = recv.take_stdin().unwrap();
    tokio::io::copy(&mut r, &mut w).await.unwrap();
    drop(w);
    (send.close().await, recv.close().await)
}

/// What `zfs send` wrote, and its exit.
async fn read_send(src: &FakeZfs, what: &SendWhat) -> (Vec<u8>, Result<(), ZfsError>) {
    let mut send = src.spawn_send(what, &[]).unwrap();
    let mut bytes = Vec::new();
    send.take_stdout()
        .unwrap()
        .read_to_end(&mut bytes)
        .await
        .unwrap();
    (bytes, send.close().await)
}

/// The stream of a `zfs send` that succeeds.
async fn stream_of(src: &FakeZfs, what: &SendWhat) -> Vec<u8> {
    let (bytes, closed) = read_send(src, what).await;
    closed.unwrap();
    bytes
}

/// A `zfs receive` into `dest` that has been given `bytes`, its input
/// closed; not waited for.
async fn fed(dst: &FakeZfs, dest: &str, spec: &RecvSpec, bytes: &[u8]) -> ZfsChild {
    let mut recv = dst.spawn_receive(&dn(dest), spec).unwrap();
    let mut w = recv.take_stdin().unwrap();
    w.write_all(bytes).await.unwrap();
    drop(w);
    recv
}

/// The error of a call that found its dataset busy at every try.
#[track_caller]
fn assert_busy_at_every_try(e: &ZfsError) {
    assert!(
        matches!(
            e,
            ZfsError::Busy {
                tries: BUSY_TRIES,
                ..
            }
        ),
        "{e}"
    );
}

/// `p/a` with snapshots s1..s3, `q` empty.
fn pair() -> (FakeZfs, FakeZfs, Vec<Snapshot>) {
    let src = FakeZfs::zfs_fuse();
    src.create_pool("p");
    src.create("p/a");
    let snaps = ["s1", "s2", "s3"].map(|s| {
        src.write("p/a");
        src.snapshot("p/a", s)
    });
    let dst = FakeZfs::zfs_fuse();
    dst.create_pool("q");
    (src, dst, snaps.to_vec())
}

/// [`pair`], `p/a@s1` received as `q/a`.
async fn pair_with_s1_received() -> (FakeZfs, FakeZfs) {
    let (src, dst, _) = pair();
    pipe(&src, &full("p/a@s1"), &dst, "q/a", &RecvSpec::default())
        .await
        .1
        .unwrap();
    (src, dst)
}

#[tokio::test]
async fn full_send_recreates_snapshots_with_their_guids() {
    let (src, dst, snaps) = pair();
    let (s, r) = pipe(&src, &full("p/a@s1"), &dst, "q/a", &RecvSpec::default()).await;
    s.unwrap();
    r.unwrap();
    let got = dst.snapshots("q/a");
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].name.as_str(), got[0].guid), ("s1", snaps[0].guid));
    assert_ne!(
        dst.dataset("q/a").unwrap().guid,
        src.dataset("p/a").unwrap().guid
    );
    assert_eq!(dst.calls(), ["receive -u q/a"]);
    assert_eq!(src.calls(), ["send p/a@s1"]);
    // Again: the destination exists now.
    let (_, r) = pipe(&src, &full("p/a@s1"), &dst, "q/a", &RecvSpec::default()).await;
    assert!(r.unwrap_err().to_string().contains("must specify -F"));
    // A parent that does not exist.
    let (_, r) = pipe(&src, &full("p/a@s1"), &dst, "q/x/a", &RecvSpec::default()).await;
    let e = r.unwrap_err();
    assert!(
        matches!(e, ZfsError::Failed { .. }),
        "two lines, as zfs-fuse: {e}"
    );
    assert!(
        e.to_string()
            .contains("cannot open 'q/x/a': dataset does not exist"),
        "{e}"
    );
    // A snapshot that does not exist: zfs send fails, writes nothing.
    let (bytes, closed) = read_send(&src, &full("p/a@nope")).await;
    assert!(bytes.is_empty());
    assert!(matches!(closed, Err(ZfsError::DoesNotExist { .. })));
}

#[tokio::test]
async fn heads_pass_check_head() {
    let (src, _, snaps) = pair();
    let bytes = stream_of(&src, &full("p/a@s2")).await;
    assert!(bytes.len() > 1024, "filler makes byte counts non-trivial");
    let h = check_head(&bytes[..HEAD_MAX], 0, &[snaps[1].guid])
        .unwrap()
        .unwrap();
    assert!(!h.compound && h.first_to_guid == snaps[1].guid);
    let bytes = stream_of(&src, &incr("p/a@s1", "p/a@s3")).await;
    let allowed = [snaps[1].guid, snaps[2].guid];
    let h = check_head(&bytes[..HEAD_MAX], snaps[0].guid, &allowed)
        .unwrap()
        .unwrap();
    assert!(h.compound && h.first_to_guid == snaps[1].guid);
}

#[tokio::test]
async fn incremental_package_applies_every_snapshot() {
    let (src, dst, snaps) = pair();
    src.snapshot("p/a", "s4");
    let spec = RecvSpec::default();
    pipe(&src, &full("p/a@s1"), &dst, "q/a", &spec)
        .await
        .1
        .unwrap();
    let (s, r) = pipe(&src, &incr("p/a@s1", "p/a@s4"), &dst, "q/a", &spec).await;
    s.unwrap();
    r.unwrap();
    let got: Vec<_> = dst.snapshots("q/a").iter().map(|s| s.guid).collect();
    let want: Vec<_> = src.snapshots("p/a").iter().map(|s| s.guid).collect();
    assert_eq!((got.len(), &got), (4, &want));
    assert_eq!(got[..3], snaps.iter().map(|s| s.guid).collect::<Vec<_>>());
    // The same package again: the base is no longer the newest.
    let (_, r) = pipe(&src, &incr("p/a@s1", "p/a@s3"), &dst, "q/a", &spec).await;
    assert!(r
        .unwrap_err()
        .to_string()
        .contains("match incremental source"));
}

#[tokio::test]
async fn truncated_or_aborted_streams_change_nothing() {
    let (src, dst, _) = pair();
    let bytes = stream_of(&src, &full("p/a@s1")).await;
    let spec = RecvSpec::default();
    let mut recv = fed(&dst, "q/a", &spec, &bytes[..bytes.len() / 2]).await;
    let e = recv.close().await.unwrap_err();
    assert!(e.to_string().contains("invalid backup stream"), "{e}");
    assert_eq!(dst.names(), ["q"]);
    // Aborted while the receive waits to apply: nothing either, and the
    // destination is no longer busy.
    dst.delay_receive(Duration::from_millis(200));
    let mut recv = fed(&dst, "q/a", &spec, &bytes).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    recv.abort().await;
    assert_eq!(dst.names(), ["q"]);
    assert!(dst.st().receiving.is_empty());
}

#[tokio::test]
async fn a_running_receive_makes_its_destination_busy() {
    let (src, dst) = pair_with_s1_received().await;
    dst.delay_receive(Duration::from_millis(300));
    let bytes = stream_of(&src, &incr("p/a@s1", "p/a@s2")).await;
    let mut recv = fed(&dst, "q/a", &RecvSpec::default(), &bytes).await;
    let e = dst.rename(&dn("q/a"), &dn("q/b")).await.unwrap_err();
    assert_busy_at_every_try(&e);
    assert!(dst.destroy_recursive(&dn("q")).await.unwrap_err().is_busy());
    recv.close().await.unwrap();
    assert_eq!(dst.snapshots("q/a").len(), 2);
    dst.rename(&dn("q/a"), &dn("q/b")).await.unwrap();
}

#[tokio::test]
async fn modified_destination_refuses_incrementals_until_rolled_back() {
    let (src, dst) = pair_with_s1_received().await;
    let spec = RecvSpec::default();
    dst.write("q/a");
    let (_, r) = pipe(&src, &incr("p/a@s1", "p/a@s2"), &dst, "q/a", &spec).await;
    let e = r.unwrap_err();
    assert!(e.to_string().contains("has been modified"), "{e}");
    assert_eq!(dst.snapshots("q/a").len(), 1);
    dst.rollback(&sn("q/a@s1")).await.unwrap();
    let (_, r) = pipe(&src, &incr("p/a@s1", "p/a@s2"), &dst, "q/a", &spec).await;
    r.unwrap();
    // Not the newest any more.
    let e = dst.rollback(&sn("q/a@s1")).await.unwrap_err();
    assert!(e.to_string().contains("more recent snapshots"), "{e}");
    // A full stream over it, even with -F: it has snapshots.
    let force = RecvSpec {
        force: true,
        ..RecvSpec::default()
    };
    let (_, r) = pipe(&src, &full("p/a@s3"), &dst, "q/a", &force).await;
    assert!(r
        .unwrap_err()
        .to_string()
        .contains("destination has snapshots"));
}

#[tokio::test]
async fn holds_block_destroy_until_released() {
    let (src, _, _) = pair();
    src.hold("keep", &[sn("p/a@s1")]).await.unwrap();
    let e = src.hold("keep", &[sn("p/a@s1")]).await.unwrap_err();
    assert!(e.to_string().contains("tag already exists"), "{e}");
    let e = src
        .destroy_snapshot(&sn("p/a@s1"), false)
        .await
        .unwrap_err();
    assert!(e.is_busy());
    let e = src.destroy_recursive(&dn("p/a")).await.unwrap_err();
    assert_busy_at_every_try(&e);
    assert_eq!(src.holds("p/a@s1"), ["keep"]);
    // zfs-fuse cannot list holds: nothing to release by tag.
    src.release_tag_under("keep", &dn("p")).await.unwrap();
    assert_eq!(src.holds("p/a@s1"), ["keep"]);
    src.release("keep", &[sn("p/a@s1")]).await.unwrap();
    let e = src.release("keep", &[sn("p/a@s1")]).await.unwrap_err();
    assert!(e.to_string().contains("no such tag"), "{e}");
    src.destroy_snapshot(&sn("p/a@s1"), false).await.unwrap();
    let e = src
        .destroy_snapshot(&sn("p/a@s1"), false)
        .await
        .unwrap_err();
    assert!(matches!(e, ZfsError::DoesNotExist { .. }));
    src.destroy_recursive(&dn("p/a")).await.unwrap();
    assert_eq!(src.names(), ["p"]);
}

#[tokio::test]
async fn openzfs_lists_holds_bookmarks_and_releases_by_tag() {
    let z = FakeZfs::openzfs();
    z.create_pool("p");
    z.create("p/a");
    z.create("p/a/b");
    z.snapshot_recursive(&sn("p@s1")).await.unwrap();
    z.hold("t", &[sn("p/a@s1"), sn("p/a/b@s1")]).await.unwrap();
    z.bookmark(&sn("p/a@s1"), "m1").await.unwrap();
    let tree = z.list_trees(&[&dn("p/a"), &dn("nope")]).await.unwrap();
    assert_eq!(tree.datasets.len(), 2);
    let a = &tree.datasets[&dn("p/a")];
    assert!(a.held.contains("s1"));
    assert_eq!(a.bookmarks[0].guid, a.snapshots[0].guid);
    z.release_tag_under("t", &dn("p")).await.unwrap();
    assert!(z.holds("p/a/b@s1").is_empty());
    z.snapshot("p/a", "s2");
    let e = z.rollback(&sn("p/a@s1")).await.unwrap_err();
    assert!(e.to_string().contains("more recent"), "{e}");
    // From the bookmark, after its snapshot is gone.
    z.destroy_snapshot(&sn("p/a@s1"), false).await.unwrap();
    let what = SendWhat::Snapshot {
        from: Some(SendFrom::Bookmark("p/a#m1".into())),
        to: sn("p/a@s2"),
    };
    let bytes = stream_of(&z, &what).await;
    let to = z.snapshots("p/a")[0].guid;
    let h = check_head(&bytes, a.bookmarks[0].guid, &[to])
        .unwrap()
        .unwrap();
    assert!(!h.compound);
    z.destroy_bookmark(&dn("p/a"), "m1").await.unwrap();
    assert!(z.destroy_bookmark(&dn("p/a"), "m1").await.is_err());
}

#[tokio::test]
async fn rename_moves_a_subtree() {
    let z = FakeZfs::zfs_fuse();
    z.create_pool("p");
    for d in ["p/a", "p/a/b", "p/a/b/c", "p/x"] {
        z.create(d);
    }
    z.snapshot("p/a/b", "s1");
    let before = z.dataset("p/a/b").unwrap();
    z.rename(&dn("p/a"), &dn("p/x/y")).await.unwrap();
    assert_eq!(z.names(), ["p", "p/x", "p/x/y", "p/x/y/b", "p/x/y/b/c"]);
    let after = z.dataset("p/x/y/b").unwrap();
    assert_eq!(
        (after.guid, &after.snapshots),
        (before.guid, &before.snapshots)
    );
    for (to, why) in [
        ("p/x/y/b/z", "descendant"),
        ("p/x", "already exists"),
        ("p/n/y", "parent does not exist"),
    ] {
        let e = z.rename(&dn("p/x/y"), &dn(to)).await.unwrap_err();
        assert!(e.to_string().contains(why), "{to}: {e}");
    }
    let e = z.rename(&dn("p/gone"), &dn("p/z")).await.unwrap_err();
    assert!(matches!(e, ZfsError::DoesNotExist { ref name } if name == "p/gone"));
    let e = z.destroy_empty(&dn("p/x/y/b")).await.unwrap_err();
    assert!(e.to_string().contains("filesystem has children"), "{e}");
    z.destroy_empty(&dn("p/x/y/b/c")).await.unwrap();
}

#[tokio::test]
async fn injected_faults_fail_the_next_calls_only() {
    let (src, dst, _) = pair();
    src.fail("rename", "p/a", 2, FakeError::Busy);
    for _ in 0..2 {
        let e = src.rename(&dn("p/a"), &dn("p/b")).await.unwrap_err();
        assert_busy_at_every_try(&e);
    }
    src.rename(&dn("p/a"), &dn("p/b")).await.unwrap();
    assert_eq!(src.calls().last().unwrap(), "rename p/a p/b");
    src.fail(
        "list",
        "p",
        1,
        FakeError::Other("cannot open 'p': I/O error".into()),
    );
    assert!(matches!(
        src.list_trees(&[&dn("p")]).await,
        Err(ZfsError::Failed { .. })
    ));
    assert!(src.list_trees(&[&dn("p")]).await.is_ok());
    src.fail("set", "p/b", 1, FakeError::DoesNotExist);
    let e = src.set(&dn("p/b"), "canmount", "noauto").await.unwrap_err();
    assert!(matches!(e, ZfsError::DoesNotExist { ref name } if name == "p/b"));
    assert_eq!(src.prop("p/b", "canmount"), None);
    let unsupported = "cannot receive: stream has unsupported feature, feature flags = 4";
    dst.fail("receive", "q/", 1, FakeError::Other(unsupported.into()));
    let (_, r) = pipe(&src, &full("p/b@s1"), &dst, "q/b", &RecvSpec::default()).await;
    assert!(matches!(r, Err(ZfsError::UnsupportedStreamFeature { .. })));
    assert_eq!(dst.names(), ["q"]);
    let (_, r) = pipe(&src, &full("p/b@s1"), &dst, "q/b", &RecvSpec::default()).await;
    r.unwrap();
}

#[tokio::test]
async fn snapshot_recursive_twice_is_snapshot_exists() {
    let z = FakeZfs::zfs_fuse();
    z.create_pool("p");
    z.create("p/a");
    z.snapshot_recursive(&sn("p@s")).await.unwrap();
    let (p, a) = (z.snapshots("p"), z.snapshots("p/a"));
    assert_eq!(p[0].createtxg, a[0].createtxg, "one atomic snapshot");
    assert_ne!(p[0].guid, a[0].guid);
    let e = z.snapshot_recursive(&sn("p@s")).await.unwrap_err();
    assert!(matches!(e, ZfsError::SnapshotExists { .. }), "{e}");
    assert!(z.calls().contains(&"snapshot -r p@s".to_string()));
}

#[tokio::test]
async fn listing_follows_zfs_get() {
    let (src, _, _) = pair();
    src.create("p/a/b");
    src.set(&dn("p/a"), "zfsync:x", "1").await.unwrap();
    src.set(&dn("p/a"), "canmount", "noauto").await.unwrap();
    src.hold("t", &[sn("p/a@s2")]).await.unwrap();
    let tree = src
        .list_trees_with(&[&dn("p/a")], &["zfsync:x"])
        .await
        .unwrap();
    let names: Vec<_> = tree.datasets.keys().map(|d| d.to_string()).collect();
    assert_eq!(names, ["p/a", "p/a/b"]);
    let a = &tree.datasets[&dn("p/a")];
    assert_eq!(a.props.len(), 1, "only the asked-for user property");
    assert!(a.held.is_empty(), "zfs-fuse has no userrefs");
    assert!(
        tree.datasets[&dn("p/a/b")].props.is_empty(),
        "not inherited"
    );
    let tree = src
        .list_trees_with(&[&dn("p/a")], &["userrefs"])
        .await
        .unwrap();
    assert!(tree.datasets[&dn("p/a")].held.contains("s2"));
    let one = src.list_dataset(&dn("p/a")).await.unwrap().unwrap();
    assert_eq!(one.snapshots.len(), 3);
    assert!(src.list_dataset(&dn("p/zz")).await.unwrap().is_none());
    assert_eq!(src.prop("p/a", "canmount").as_deref(), Some("noauto"));
    assert!(src.calls().contains(&"get -d 1 p/a".to_string()));
}

#[tokio::test]
async fn resume_tokens_must_be_registered() {
    let src = FakeZfs::openzfs();
    src.create_pool("p");
    src.create("p/a");
    let s1 = src.snapshot("p/a", "s1");
    let e = src.resume_info("1-abc").await.unwrap_err();
    assert!(matches!(e, ZfsError::ResumeTokenStale { .. }), "{e}");
    let info = ResumeInfo {
        from_guid: 0,
        to_guid: s1.guid,
        to_name: "p/a@s1".into(),
        bytes_done: Some(100),
        bytes_left: None,
        raw: false,
    };
    src.register_resume_token("1-abc", info);
    assert_eq!(src.resume_info("1-abc").await.unwrap().to_guid, s1.guid);
    let dst = FakeZfs::openzfs();
    dst.create_pool("q");
    dst.create("q/a");
    dst.set_resume_token("q/a", Some("1-abc"));
    assert_eq!(
        dst.dataset("q/a").unwrap().resume_token.as_deref(),
        Some("1-abc")
    );
    let what = SendWhat::Resume {
        token: "1-abc".into(),
    };
    let (s, r) = pipe(&src, &what, &dst, "q/a", &RecvSpec::default()).await;
    s.unwrap();
    r.unwrap();
    let d = dst.dataset("q/a").unwrap();
    assert_eq!((d.snapshots[0].guid, d.resume_token), (s1.guid, None));
    dst.set_resume_token("q/a", Some("1-abc"));
    dst.abort_resumable(&dn("q/a")).await.unwrap();
    assert!(dst.abort_resumable(&dn("q/a")).await.is_err());
    src.destroy_snapshot(&sn("p/a@s1"), false).await.unwrap();
    let e = src.resume_info("1-abc").await.unwrap_err();
    assert!(matches!(e, ZfsError::ResumeTokenStale { .. }), "{e}");
}
