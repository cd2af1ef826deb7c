//! The buffer and cleanbuffer: datasets that arrive before their
//! parents, and --delete-missing.

use zfsync_common::naming::{RECV_HOLD, REPLICA_PROP};
use zfsync_common::protocol::{PlaceFailure, SyncReply, SyncRequest};
use zfsync_common::zfs::fake::FakeZfs;
use zfsync_send::{Delete, Status};

use crate::support::*;

/// SY6, BU1: datasets synced before their parents wait in BUF/<HEX>; cleanbuffer places them parents first and reports the parentless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_synced_before_their_parents_wait_in_the_buffer_and_are_placed_parents_first() {
    let rels = ["", "/a", "/a/b", "/a/b/c", "/q", "/q/r"];
    let (src, dst, recv) = hosts(&rels, &["s1", "s2"]).await;
    let mut c = recv.client().await;
    // (path, buffered, where it lands)
    let order = [
        ("", false, DST.to_string()),
        ("/a/b/c", true, format!("{BUF}/2F612F622F63")),
        ("/a/b", true, format!("{BUF}/2F612F62")),
        ("/q/r", true, format!("{BUF}/2F712F72")),
        ("/a", false, dst_ds("/a")),
    ];
    for (path, buffered, at) in &order {
        let (reply, done) = sync_finished(&mut c, &src, &dst, path, false).await;
        assert_eq!(
            reply,
            SyncReply::New {
                buffered: *buffered
            },
            "{path}"
        );
        assert_eq!((&done.location, done.buffered), (at, *buffered), "{path}");
        assert_eq!(snaps(&dst, at), snaps(&src, &src_ds(path)), "{path}");
    }
    c.bye().await;
    assert_eq!(
        dst.prop(BUF, "mountpoint").as_deref(),
        Some("none"),
        "{}",
        dump("receiver", &dst)
    );

    let paths: Vec<String> = rels.iter().map(|r| r.to_string()).collect();
    let before = copies(&dst, "dst");
    let mut c = recv.client().await;
    let dry = c
        .clean_buffer(paths.clone(), false, true)
        .await
        .expect("dry run");
    c.bye().await;
    assert_eq!(dry.placed, ["/a/b", "/a/b/c"]);
    assert_eq!(
        dry.failed
            .iter()
            .map(|f| f.path.as_str())
            .collect::<Vec<_>>(),
        ["/q/r"]
    );
    assert_eq!(copies(&dst, "dst"), before, "a dry run changes nothing");

    dst.clear_calls();
    let mut c = recv.client().await;
    let report = c
        .clean_buffer(paths, false, false)
        .await
        .expect("cleanbuffer");
    c.bye().await;
    assert_eq!(
        report.placed,
        ["/a/b", "/a/b/c"],
        "{}",
        dump("receiver", &dst)
    );
    match report.failed.as_slice() {
        [PlaceFailure { path, reason }]
            if path == "/q/r"
                && reason.starts_with("its parent dst/t/q is not on the receiver yet") => {}
        other => panic!("expected /q/r to fail for want of its parent, got {other:?}"),
    }
    assert_eq!(
        calls_with(&dst, "rename"),
        [
            format!("rename {BUF}/2F612F62 dst/t/a/b"),
            format!("rename {BUF}/2F612F622F63 dst/t/a/b/c"),
        ],
        "parents first\n{}",
        dump("receiver", &dst)
    );
    for r in ["", "/a", "/a/b", "/a/b/c"] {
        assert_eq!(snaps(&dst, &dst_ds(r)), snaps(&src, &src_ds(r)), "{r}");
    }
    assert_eq!(
        names_under(&dst, BUF),
        [BUF.to_string(), format!("{BUF}/2F712F72")],
        "the orphan stays in the buffer\n{}",
        dump("receiver", &dst)
    );
}

/// BU1: with zfsync_send::run a child whose parent never arrives stays buffered and is reported failed, until the parent comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_whose_parent_never_arrives_stays_buffered_and_is_reported_failed() {
    let src = source(&["", "/a", "/a/b"], &[]);
    src.snapshot(&src_ds("/a"), "s1");
    src.snapshot(&src_ds("/a/b"), "s1");
    let dst = target_host();
    let recv = Receiver::start(&dst).await;

    let report = recv.send(&src, 2, false).await;
    assert_eq!(
        report.exit_code(),
        zfsync_send::exit::FAILED,
        "{}",
        text(&report)
    );
    assert_eq!(status(&report, ""), &Status::NoSnapshots);
    for r in ["/a", "/a/b"] {
        let why = failure(&report, r);
        assert!(
            why.contains("received into the buffer but not placed") && why.contains("its parent"),
            "{r}: {why}"
        );
    }
    assert_eq!(
        names_under(&dst, "dst/"),
        [
            BUF.to_string(),
            format!("{BUF}/2F61"),
            format!("{BUF}/2F612F62")
        ],
        "{}",
        both(&src, &dst)
    );

    src.snapshot(SRC, "s1");
    let report = recv.send(&src, 2, false).await;
    assert_ok(&report, &src, &dst);
    assert_replica(&src, &dst);
    assert_same_tree(&src, &dst);
    assert!(names_under(&dst, BUF).is_empty(), "{}", both(&src, &dst));
}

/// BU3, FI2: --delete-missing destroys only the top of a wholly orphaned subtree of replicas, its holds released first, judged on a fresh listing: a dataset made by hand since the run's listing saves its subtree, and a locked orphan is left alone and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_missing_destroys_only_whole_replica_subtrees_judged_on_a_fresh_listing() {
    let rels = [
        "", "/keep", "/gone", "/gone/x", "/mixed", "/mixed/y", "/busy",
    ];
    let src = source(&rels, &["s1"]);
    let dst = target_on(FakeZfs::openzfs());
    let recv = Receiver::start(&dst).await;
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    let gone_x = format!("{}@s1", dst_ds("/gone/x"));
    assert_eq!(
        dst.holds(&gone_x),
        [RECV_HOLD],
        "{}",
        dump("receiver", &dst)
    );

    // Another connection is receiving into /busy: its Sync holds the lock.
    let busy = src_ds("/busy");
    src.snapshot(&busy, "s2");
    let mut holder = recv.client().await;
    let req = SyncRequest::new(&rel("/busy"), &src.snapshots(&busy));
    assert!(
        matches!(
            holder.sync(&req).await.unwrap(),
            SyncReply::Incremental { .. }
        ),
        "{}",
        dump("receiver", &dst)
    );
    // The connection that asks for the cleanup lists the target at its
    // hello; then a person makes a dataset below /mixed. On real zfs it
    // inherits the mark, which a listing shows as "inherited from" and
    // zfsync does not count (`common/src/zfs/parse.rs::
    // inherited_user_properties_do_not_count`); the fake lists only
    // properties set locally, so it shows no mark at all.
    let mut c = recv.client().await;
    let late = dst_ds("/mixed/late");
    dst.create(&late);
    assert!(dst.prop(&dst_ds("/mixed"), REPLICA_PROP).is_some());
    assert_eq!(
        dst.dataset(&late).map(|d| d.props),
        Some(Default::default())
    );
    dst.clear_calls();
    let report = c
        .clean_buffer(vec![String::new(), "/keep".into()], true, false)
        .await
        .expect("cleanbuffer");
    c.bye().await;
    holder.bye().await;

    let mut orphans = report.orphans.clone();
    orphans.sort();
    assert_eq!(orphans, ["/busy", "/gone", "/gone/x", "/mixed", "/mixed/y"]);
    assert_eq!(report.deleted, ["/gone"], "{}", dump("receiver", &dst));
    // The locked one is reported; the one a person's dataset saved is not
    // a failure.
    match report.failed.as_slice() {
        [PlaceFailure { path, reason }]
            if path == "/busy" && reason.starts_with("cannot delete the orphaned replica") => {}
        other => panic!("expected /busy to be reported, got {other:?}"),
    }
    let calls = dst.calls();
    assert_eq!(
        calls_with(&dst, "destroy"),
        [format!("destroy -r {}", dst_ds("/gone"))],
        "only the top, once\n{}",
        dump("receiver", &dst)
    );
    let released = calls
        .iter()
        .position(|c| c.starts_with(&format!("release {RECV_HOLD} ")) && c.contains(&gone_x));
    let destroyed = calls.iter().position(|c| c.starts_with("destroy"));
    assert!(
        released.is_some() && released < destroyed,
        "the receiver's holds go first\n{}",
        dump("receiver", &dst)
    );
    for r in ["/gone", "/mixed"] {
        assert!(
            calls.contains(&format!("get -r {}", dst_ds(r))),
            "{r} is listed afresh\n{}",
            dump("receiver", &dst)
        );
    }
    for r in ["/keep", "/mixed", "/mixed/y", "/mixed/late", "/busy"] {
        assert!(dst.dataset(&dst_ds(r)).is_some(), "{r} was destroyed");
    }
    for r in ["/gone", "/gone/x"] {
        assert!(dst.dataset(&dst_ds(r)).is_none(), "{r} is still there");
    }
}

/// BU4: a run in which a dataset failed does not ask for --delete-missing: the orphan is reported and kept; a later run without failures deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_missing_is_not_sent_when_a_dataset_failed() {
    let (src, dst, recv) = hosts(&["", "/a", "/old"], &["s1"]).await;
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    destroy_on_source(&src, "/old").await;
    // /a diverges on the receiver: without --full it fails.
    dst.snapshot(&dst_ds("/a"), "local");

    let mut opts = recv.send_options(&src, 1, false);
    opts.delete_missing = true;
    let report = run_sender(opts).await;
    let why = failure(&report, "/a");
    assert!(why.contains("--full"), "{why}");
    assert_eq!(report.delete, Delete::Skipped, "{}", text(&report));
    assert_eq!(report.clean.orphans, ["/old"], "{}", text(&report));
    assert!(report.clean.deleted.is_empty(), "{}", text(&report));
    assert!(
        dst.dataset(&dst_ds("/old")).is_some(),
        "{}",
        both(&src, &dst)
    );

    let mut opts = recv.send_options(&src, 1, true);
    opts.delete_missing = true;
    let report = run_sender(opts).await;
    assert_ok(&report, &src, &dst);
    assert_eq!(report.delete, Delete::Done, "{}", text(&report));
    assert_eq!(report.clean.deleted, ["/old"], "{}", text(&report));
    assert_same_tree(&src, &dst);
}
