//! Mirrored retention, and the receiver's hold that moves before it.

use zfsync_common::naming::{SnapName, RECV_HOLD};
use zfsync_common::protocol::{SyncReply, SyncRequest};
use zfsync_common::zfs::fake::FakeZfs;
use zfsync_common::zfs::{Snapshot, ZfsBackend};
use zfsync_send::{Report, Status};

use crate::support::*;

/// Syncs `src/s` and `/a` with tool snapshots and a person's, prunes all
/// but the newest on the sender, takes one more and syncs again; returns
/// the second run's report.
async fn prune_then_sync(mirror_retention: bool) -> (FakeZfs, FakeZfs, Report) {
    prune_then_sync_with(mirror_retention, |_| {}).await
}

/// [`prune_then_sync`]; `before` is done on the receiving host just before
/// the second run.
async fn prune_then_sync_with(
    mirror_retention: bool,
    before: impl FnOnce(&FakeZfs),
) -> (FakeZfs, FakeZfs, Report) {
    let src = source(&["", "/a"], &[T1, "manual", T2, T3]);
    let dst = target_host();
    let recv = Receiver::start_with(&dst, mirror_retention).await;
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    for r in ["", "/a"] {
        for gone in [T1, "manual", T2] {
            let snap = ds(&src_ds(r))
                .snapshot(&SnapName::new(gone).expect("name"))
                .expect("name");
            src.destroy_snapshot(&snap, false)
                .await
                .expect("prune on the sender");
        }
        src.snapshot(&src_ds(r), T4);
    }
    dst.clear_calls();
    before(&dst);
    let report = recv.send(&src, 1, false).await;
    assert_ok(&report, &src, &dst);
    (src, dst, report)
}

/// FI3: tool snapshots the sender pruned are destroyed on the receiver at the next sync, one by one; a person's never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_retention_destroys_the_tool_snapshots_the_sender_pruned_and_never_a_persons() {
    let (src, dst, report) = prune_then_sync(true).await;
    assert_eq!(report.mirrored, 4, "{}", text(&report));
    for r in ["", "/a"] {
        let name = dst_ds(r);
        let kept = snap_names(&dst, &name);
        assert_eq!(kept, ["manual", T3, T4], "{name}\n{}", both(&src, &dst));
        match status(&report, r) {
            Status::Sent { mirrored: 2, .. } => {}
            other => panic!("{name}: {other:?}\n{}", text(&report)),
        }
    }
    assert_eq!(
        calls_with(&dst, "destroy"),
        [
            format!("destroy dst/t@{T1}"),
            format!("destroy dst/t@{T2}"),
            format!("destroy dst/t/a@{T1}"),
            format!("destroy dst/t/a@{T2}"),
        ],
        "{}",
        dump("receiver", &dst)
    );
}

/// FI3: a receiver without mirrored retention keeps every snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_without_mirrored_retention_keeps_every_snapshot() {
    let (src, dst, report) = prune_then_sync(false).await;
    assert_eq!(report.mirrored, 0, "{}", text(&report));
    for r in ["", "/a"] {
        let kept = snap_names(&dst, &dst_ds(r));
        assert_eq!(kept, [T1, "manual", T2, T3, T4], "{}", both(&src, &dst));
    }
    assert_no_call("receiver", &dst, "destroy");
}

/// FI3: a tool snapshot mirrored retention cannot destroy is skipped; the others are destroyed and the dataset is finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_retention_skips_a_snapshot_it_cannot_destroy() {
    let (src, dst, report) = prune_then_sync_with(true, |dst| {
        strike(dst, "destroy", &format!("{DST}@{T1}"));
    })
    .await;
    assert_eq!(report.mirrored, 3, "{}", text(&report));
    for (r, want) in [
        ("", vec![T1, "manual", T3, T4]),
        ("/a", vec!["manual", T3, T4]),
    ] {
        let kept = snap_names(&dst, &dst_ds(r));
        assert_eq!(kept, want, "{}", both(&src, &dst));
    }
    match status(&report, "") {
        Status::Sent { mirrored: 1, .. } => {}
        other => panic!("{other:?}\n{}", text(&report)),
    }
}

/// FI2, FI3: where zfs has hold and holds, the receiver's hold moves to the newest snapshot in one batch when the connection ends (one `zfs hold`, then one `zfs release` of the older); mirrored retention leaves a snapshot the receiver still holds for the next run; a tree is destroyed only after its holds are released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receivers_hold_moves_to_the_newest_snapshot_before_mirrored_retention() {
    let src = source(&[""], &[T1, T2]);
    let dst = target_on(FakeZfs::openzfs());
    let recv = Receiver::start(&dst).await;
    let mut c = recv.client().await;
    sync_finished(&mut c, &src, &dst, "", false).await;
    c.bye().await;
    let held = |snap: &str| dst.holds(&format!("{DST}@{snap}"));
    let mine = || vec![RECV_HOLD.to_string()];
    wait_until(
        "@T2 held",
        || (held(T1), held(T2)) == (vec![], mine()),
        &dst,
    )
    .await;

    // The sender dropped @T2 but kept a bookmark of it, the base of the
    // next incremental.
    src.snapshot(SRC, T4);
    let all = src.snapshots(SRC);
    let (t1, t2, t4) = (&all[0], &all[1], &all[2]);
    let b2 = Snapshot {
        name: SnapName::new("b2").expect("name"),
        ..t2.clone()
    };
    let mut c = recv.client().await;
    let req =
        SyncRequest::new(&rel(""), &[t1.clone(), t4.clone()]).bookmarks(std::slice::from_ref(&b2));
    assert_eq!(
        c.sync(&req).await.unwrap(),
        SyncReply::Incremental {
            base_guid: t2.guid,
            count: 1
        }
    );
    dst.clear_calls();
    stream(&mut c, &src, SRC, Some(t2), t4)
        .await
        .expect("@T2..@T4");
    let done = c.finish().await.expect("finish");
    // Still held by the receiver itself: it goes at the next Finish.
    assert_eq!(
        done.pruned,
        Vec::<String>::new(),
        "{}",
        dump("receiver", &dst)
    );
    c.bye().await;
    wait_until(
        "@T4 held, @T2 released",
        || (held(T2), held(T4)) == (vec![], mine()),
        &dst,
    )
    .await;
    assert_in_order(
        "receiver",
        &dst,
        &[
            format!("hold {RECV_HOLD} {DST}@{T4}"),
            format!("release {RECV_HOLD} {DST}@{T2}"),
        ],
    );
    assert_no_call("receiver", &dst, "destroy");

    let t5 = src.snapshot(SRC, "260101-000400_S");
    let mut c = recv.client().await;
    let req = SyncRequest::new(&rel(""), &[t1.clone(), t4.clone(), t5.clone()]);
    assert!(matches!(
        c.sync(&req).await.unwrap(),
        SyncReply::Incremental { .. }
    ));
    stream(&mut c, &src, SRC, Some(t4), &t5)
        .await
        .expect("@T4..@T5");
    let done = c.finish().await.expect("finish");
    assert_eq!(done.pruned, [T2], "{}", dump("receiver", &dst));
    assert_eq!(
        snap_names(&dst, DST),
        [T1, T4, "260101-000400_S"],
        "{}",
        dump("receiver", &dst)
    );
    c.bye().await;

    // A --full replacement (a new run, which lists the diverged replica)
    // destroys the parked old copy, whose @T4 is held.
    dst.snapshot(DST, "local");
    dst.clear_calls();
    let mut c = recv.client().await;
    sync_finished(&mut c, &src, &dst, "", true).await;
    c.bye().await;
    let parked = format!("{BUF}/top.old");
    assert_in_order(
        "receiver",
        &dst,
        &[
            format!("release {RECV_HOLD} {parked}@260101-000400_S"),
            format!("destroy -r {parked}"),
        ],
    );
    assert!(dst.dataset(&parked).is_none(), "{}", dump("receiver", &dst));
    assert_replica(&src, &dst);
    wait_until(
        "the new copy's newest held",
        || held(&src.snapshots(SRC).last().unwrap().name.to_string()) == mine(),
        &dst,
    )
    .await;
}

/// Waits (at most [`PATIENCE`]) until `cond` holds: what a receiver does
/// when a connection ends happens after the client's Bye.
async fn wait_until(what: &str, cond: impl Fn() -> bool, dst: &FakeZfs) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < PATIENCE,
            "{what}\n{}",
            dump("receiver", dst)
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
