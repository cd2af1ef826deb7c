//! The planner's decisions through a real receiver.

use zfsync_common::naming::{REPLICA_MARK, REPLICA_PROP};
use zfsync_common::plan::FullReason;
use zfsync_common::protocol::{SyncReply, SyncRequest};
use zfsync_common::zfs::fake::{FakeError, FakeZfs};
use zfsync_common::zfs::ZfsBackend;
use zfsync_send::{SendKind, Status};

use crate::support::*;

/// PL4, SY6, ING4: a new dataset is received in place, then incrementally (rollback to the base, no -F), then is up to date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_dataset_is_received_in_place_then_incrementally_then_is_up_to_date() {
    let (src, dst, recv) = hosts(&[""], &["s1", "s2"]).await;
    let mut c = recv.client().await;

    let (reply, done) = sync_finished(&mut c, &src, &dst, "", false).await;
    assert_eq!(reply, SyncReply::New { buffered: false });
    assert_eq!((done.location.as_str(), done.buffered), (DST, false));
    assert_replica(&src, &dst);

    src.snapshot(SRC, "s3");
    src.snapshot(SRC, "s4");
    let all = src.snapshots(SRC);
    let (reply, _) = sync_finished(&mut c, &src, &dst, "", false).await;
    assert_eq!(
        reply,
        SyncReply::Incremental {
            base_guid: all[1].guid,
            count: 2
        }
    );
    assert_replica(&src, &dst);

    let (reply, _) = sync_dataset(&mut c, &src, "", false).await;
    assert_eq!(
        reply,
        SyncReply::UpToDate {
            snapshot: "s4".into()
        }
    );
    c.bye().await;
    // The replica did not change: no rollback (zfs-fuse has no
    // `written`; had it changed, zfs would refuse and the receiver roll
    // back then).
    assert_no_call("receiver", &dst, "rollback");
    assert!(
        calls_with(&dst, "receive")
            .iter()
            .all(|c| c == "receive -u dst/t"),
        "an incremental is received from its base, never with -F\n{}",
        dump("receiver", &dst)
    );

    // The same through whole runs.
    let report = recv.send(&src, 1, false).await;
    assert_up_to_date(&report, "", "s4");
    src.snapshot(SRC, "s5");
    let report = recv.send(&src, 1, false).await;
    assert_ok(&report, &src, &dst);
    match status(&report, "") {
        Status::Sent {
            kind: SendKind::Incremental,
            from: Some(from),
            to,
            snapshots: 1,
            ..
        } if from == "s4" && to == "s5" => {}
        other => panic!("expected @s4..@s5, got {other:?}\n{}", text(&report)),
    }
    assert_replica(&src, &dst);
}

/// PL1, PL2, RE1: a copy sharing no snapshot GUID is refused and untouched without --full; --full replaces it, keeping its children.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_common_snapshot_is_refused_without_full_and_replaced_with_it() {
    let src = source(&["", "/c"], &["s1", "s2"]);
    let dst = target_host();
    // Made on the receiver by hand: the same names would not help, GUIDs count.
    dst.create(DST);
    dst.snapshot(DST, "x1");
    dst.snapshot(DST, "s1");
    dst.create("dst/t/keep");
    dst.snapshot("dst/t/keep", "k1");
    let old_top = copy_at(&dst, DST).expect("made");
    let keep = copy_at(&dst, "dst/t/keep").expect("made");
    let recv = Receiver::start(&dst).await;

    let before = copies(&dst, "dst");
    assert_eq!(
        full_refused(&recv, &src).await,
        FullReason::NoCommon {
            target: vec!["x1".into(), "s1".into()]
        }
    );
    assert_eq!(copies(&dst, "dst"), before, "{}", dump("receiver", &dst));

    let report = recv.send(&src, 1, false).await;
    let why = failure(&report, "");
    assert!(
        why.contains("no common snapshot") && why.contains("--full"),
        "{why}"
    );
    // The child is new: received in place below the old copy.
    assert_sent(&report, "/c", SendKind::Full, "s2");
    assert_eq!(copy_at(&dst, DST), Some(old_top), "{}", both(&src, &dst));

    let report = recv.send(&src, 1, true).await;
    assert_ok(&report, &src, &dst);
    assert_sent(&report, "", SendKind::Replaced, "s2");
    assert_up_to_date(&report, "/c", "s2");
    assert_replica(&src, &dst);
    assert_eq!(
        copy_at(&dst, "dst/t/keep"),
        Some(keep),
        "{}",
        both(&src, &dst)
    );
    assert!(
        names_under(&dst, BUF).is_empty(),
        "the swap leaves nothing in the buffer\n{}",
        both(&src, &dst)
    );
}

/// PL2, ING4: a replica diverged on the receiver is refused and never rolled back without --full; --full replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverged_replica_is_refused_without_full_and_replaced_with_it() {
    let (src, dst, recv) = hosts(&[""], &["s1", "s2"]).await;
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    dst.snapshot(DST, "local");
    src.snapshot(SRC, "s3");
    let before = copies(&dst, "dst");
    dst.clear_calls();

    assert_eq!(
        full_refused(&recv, &src).await,
        FullReason::Diverged {
            common: "s2".into(),
            newer: vec!["local".into()]
        }
    );
    let report = recv.send(&src, 1, false).await;
    let why = failure(&report, "");
    assert!(
        why.contains("newer than the common snapshot @s2") && why.contains("--full"),
        "{why}"
    );
    assert_untouched(&src, &dst, &before);

    let report = recv.send(&src, 1, true).await;
    assert_ok(&report, &src, &dst);
    assert_sent(&report, "", SendKind::Replaced, "s3");
    assert_replica(&src, &dst);
}

/// SY1: a dataset without snapshots is refused for good (not busy) and nothing is created; the sender skips it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_without_snapshots_is_refused_and_nothing_is_created() {
    let (src, dst, recv) = hosts(&[""], &[]).await;
    let mut c = recv.client().await;
    let reply = c
        .sync(&SyncRequest::new(&rel(""), &[]))
        .await
        .expect("sync");
    let reason = refusal(reply, false);
    assert!(reason.contains("no snapshots"), "{reason}");
    c.bye().await;

    let report = recv.send(&src, 1, false).await;
    assert_eq!(
        status(&report, ""),
        &Status::NoSnapshots,
        "{}",
        text(&report)
    );
    assert_eq!(dst.names(), ["dst"], "{}", dump("receiver", &dst));
    assert_only_listings(&dst);
}

/// The dataset `name` on the receiving host is unmounted (canmount=noauto)
/// and marked a replica (`zfsync:replica=yes`, set on it).
#[track_caller]
fn assert_marked(dst: &FakeZfs, name: &str) {
    assert_eq!(
        (dst.prop(name, "canmount"), dst.prop(name, REPLICA_PROP)),
        (Some("noauto".to_string()), Some(REPLICA_MARK.to_string())),
        "{name}\n{}",
        dump("receiver", dst)
    );
}

/// ING6: a full receive uses -u and leaves the replica canmount=noauto with zfsync:replica=yes: on zfs-fuse one `zfs set` per property for all new replicas of a connection (canmount first), on OpenZFS in the receive itself (`-o`), with no `zfs set` at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_receive_makes_an_unmounted_marked_replica_in_one_set_per_property() {
    let rels = ["", "/a", "/b"];
    let (src, dst, recv) = hosts(&rels, &["s1"]).await;
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    let names: Vec<String> = rels.iter().map(|r| dst_ds(r)).collect();
    for n in &names {
        assert_marked(&dst, n);
    }
    assert!(
        calls_with(&dst, "receive")
            .iter()
            .all(|c| c.starts_with("receive -u ")),
        "{}",
        dump("receiver", &dst)
    );
    assert_eq!(
        calls_with(&dst, "set"),
        [
            format!("set canmount=noauto {}", names.join(" ")),
            format!("set {REPLICA_PROP}={REPLICA_MARK} {}", names.join(" ")),
        ],
        "{}",
        dump("receiver", &dst)
    );

    let (src, dst, recv) = openzfs_hosts(&rels, &["s1"]).await;
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    for n in &names {
        assert_marked(&dst, n);
    }
    assert_eq!(calls_with(&dst, "set"), Vec::<String>::new());
    for c in calls_with(&dst, "receive") {
        assert!(
            c.contains(&format!(
                "-o canmount=noauto -o {REPLICA_PROP}={REPLICA_MARK}"
            )),
            "{c}\n{}",
            dump("receiver", &dst)
        );
    }
}

/// ING6: a set that fails for one dataset of the batch is made again one by one, so the others are marked; the one it failed for is marked at its next Finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batched_set_marks_the_others_one_by_one() {
    let (src, dst, recv) = hosts(&["", "/a", "/b"], &["s1"]).await;
    let denied = || FakeError::Other("cannot set property for 'dst/t/a': permission denied".into());
    // The batch, then /a alone.
    dst.fail("set", "canmount", 1, denied());
    dst.fail("set", "dst/t/a", 1, denied());
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    assert_marked(&dst, &dst_ds(""));
    assert_marked(&dst, &dst_ds("/b"));
    assert_eq!(
        dst.prop(&dst_ds("/a"), REPLICA_PROP),
        None,
        "{}",
        dump("receiver", &dst)
    );
    // The next run's Finish finds /a unmarked and marks it.
    for r in ["", "/a", "/b"] {
        src.snapshot(&src_ds(r), "s2");
    }
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    assert_marked(&dst, &dst_ds("/a"));
}

/// ING4: an incremental whose base is no longer the destination's newest snapshot when its stream starts (the cache does not know yet) is refused by `zfs receive` and reported "changed meanwhile"; nothing is rolled back or received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_whose_base_moved_meanwhile_is_refused_without_a_rollback() {
    let (src, dst, recv) = hosts(&[""], &["s1", "s2"]).await;
    let (mut c, all) = incremental_after_the_first(&recv, &src).await;
    // A person snapshots the replica after the answer, before the stream.
    dst.snapshot(DST, "local");
    let before = copies(&dst, "dst");
    dst.clear_calls();
    let streamed = stream(&mut c, &src, SRC, Some(&all[0]), &all[1]).await;
    let reason = stream_failure(streamed, &src, &dst);
    assert!(reason.contains("changed meanwhile"), "{reason}");
    assert_eq!(copies(&dst, "dst"), before, "{}", both(&src, &dst));
    for call in ["rollback", "destroy"] {
        assert_no_call("receiver", &dst, call);
    }
    // The connection goes on; the dataset is not finished.
    assert_finish_refused(&mut c, "did not receive every snapshot").await;
    c.bye().await;
}

/// ING5, ING6: -F only to fill a pool's root without snapshots (--full): with the sender's stream when it is a single full stream, else from the whole new copy in top.full by a local send | receive -F, then -I; never resumable, the root unmounted first, and never marked as a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_with_f_only_fills_a_pool_root_without_snapshots() {
    let root = "dst";
    let top_full = format!("{root}/zfsyncbuffer/top.full");
    for count in [1, 2] {
        let src = source_on(FakeZfs::openzfs(), &[""], &["s1", "s2"][..count]);
        let dst = target_on(FakeZfs::openzfs());
        let recv = Receiver::start_at(&dst, root, true).await;
        let report = recv.send(&src, 1, false).await;
        let why = failure(&report, "");
        assert!(why.contains("--full"), "{why}");
        assert_no_call("receiver", &dst, "receive");

        dst.clear_calls();
        let report = recv.send(&src, 1, true).await;
        assert_ok(&report, &src, &dst);
        assert_eq!(snaps(&dst, root), snaps(&src, SRC), "{}", both(&src, &dst));
        // Both ends can resume (-s), but never a receive with -F.
        let want = match count {
            1 => vec![format!("receive -u -F {root}")],
            _ => vec![
                format!(
                    "receive -u -s -o canmount=noauto -o {REPLICA_PROP}={REPLICA_MARK} {top_full}"
                ),
                format!("receive -u -s {top_full}"),
                format!("receive -u -F {root}"),
                format!("receive -u {root}"),
            ],
        };
        assert_eq!(
            calls_with(&dst, "receive"),
            want,
            "{}",
            dump("receiver", &dst)
        );
        // Unmounted before the overwrite.
        assert_in_order(
            "receiver",
            &dst,
            &[format!("unmount {root}"), format!("receive -u -F {root}")],
        );
        assert!(
            dst.dataset(&top_full).is_none(),
            "{}",
            dump("receiver", &dst)
        );
        assert_eq!(
            (dst.prop(root, "canmount"), dst.prop(root, REPLICA_PROP)),
            (None, None),
            "zfsync filled the pool's root but did not create it\n{}",
            dump("receiver", &dst)
        );
    }
}

/// ING5, ING6, RE1: any other dataset without snapshots is replaced through HEX.full like one with snapshots, never with -F, and becomes a marked replica; a mark found wrong is set again at the next Finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_without_snapshots_is_replaced_whole_and_marked() {
    let src = source_on(FakeZfs::openzfs(), &["", "/a"], &["s1", "s2"]);
    let dst = target_on(FakeZfs::openzfs());
    // Made by hand: no snapshots; a child made by hand too.
    dst.create(DST);
    dst.create("dst/t/own");
    let own = copy_at(&dst, "dst/t/own");
    let recv = Receiver::start(&dst).await;
    let report = recv.send(&src, 1, true).await;
    assert_ok(&report, &src, &dst);
    assert_sent(&report, "", SendKind::Replaced, "s2");
    assert_replica(&src, &dst);
    let marks = format!("-o canmount=noauto -o {REPLICA_PROP}={REPLICA_MARK}");
    let top_full = format!("receive -u -s {BUF}/top.full");
    let a = format!("receive -u -s {}", dst_ds("/a"));
    assert_eq!(
        calls_with(&dst, "receive"),
        [
            format!("receive -u -s {marks} {BUF}/top.full"),
            top_full,
            format!("receive -u -s {marks} {}", dst_ds("/a")),
            a
        ],
        "{}",
        dump("receiver", &dst)
    );
    assert_eq!(
        copy_at(&dst, "dst/t/own"),
        own,
        "{}",
        dump("receiver", &dst)
    );
    assert_marked(&dst, DST);

    // A mark found wrong (a crash between the receive and the marks) is
    // set again at the next Finish.
    dst.set(&ds(DST), REPLICA_PROP, "0").await.expect("zfs set");
    src.snapshot(SRC, "s3");
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    assert_marked(&dst, DST);
}

/// ING7, FI1: a stream that ends short of the snapshot it announced is reported failed although zfs receive succeeded, and Finish is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_does_not_end_at_its_announced_snapshot_is_reported_failed() {
    let (src, dst, recv) = hosts(&[""], &["s1", "s2", "s3"]).await;
    let (mut c, all) = incremental_after_the_first(&recv, &src).await;
    // Announces @s3 but carries @s1..@s2: its head (the first substream,
    // from the base to an announced snapshot) passes.
    let streamed = stream_announcing(&mut c, &src, SRC, Some(&all[0]), &all[1], &all[2]).await;
    let reason = stream_failure(streamed, &src, &dst);
    assert!(
        reason.contains("did not end at the announced snapshot @s3"),
        "{reason}"
    );
    // What arrived is the sender's own @s2, whole.
    assert_eq!(
        snaps(&dst, DST),
        snaps(&src, SRC)[..2].to_vec(),
        "{}",
        both(&src, &dst)
    );
    assert_finish_refused(&mut c, "did not receive every snapshot").await;
    c.bye().await;
}

/// ING4: a replica changed on the receiver since its newest snapshot is rolled back (never -r) and sent again in the same run: on zfs-fuse after `zfs receive` refused it as modified (a temporary stream failure the sender requeues), on OpenZFS before the receive (`written` > 0). No snapshot is lost; an unchanged replica is never rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_changed_on_the_receiver_is_rolled_back_and_the_run_completes() {
    for openzfs in [false, true] {
        let (src, dst, recv) = match openzfs {
            false => hosts(&["", "/a"], &["s1"]).await,
            true => openzfs_hosts(&["", "/a"], &["s1"]).await,
        };
        assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
        dst.write(&dst_ds("/a"));
        for r in ["", "/a"] {
            src.snapshot(&src_ds(r), "s2");
        }
        dst.clear_calls();
        let report = recv.send(&src, 1, false).await;
        assert_ok(&report, &src, &dst);
        assert_replica(&src, &dst);
        assert_eq!(
            calls_with(&dst, "rollback"),
            [format!("rollback {}@s1", dst_ds("/a"))],
            "{}",
            dump("receiver", &dst)
        );
        // zfs-fuse: refused once, then received; OpenZFS: received once.
        let into_a = calls_with(&dst, "receive")
            .iter()
            .filter(|c| c.ends_with(&dst_ds("/a")))
            .count();
        assert_eq!(
            into_a,
            if openzfs { 1 } else { 2 },
            "{}",
            dump("receiver", &dst)
        );
    }
}
