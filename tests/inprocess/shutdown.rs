//! Shutdown of either end: the receiver's --grace, the sender's run
//! stopped by its token.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use zfsync_common::client::CleanReport;
use zfsync_common::naming::{format_confirm_prop, format_receiver_id, SnapClass};
use zfsync_common::protocol::{Bytes, ProtocolError, SyncReply, SyncRequest};
use zfsync_send::{SendKind, Status};

use crate::support::*;

/// SE2, ING3: a receiver shutdown mid-stream ends the connection, commits nothing half-sent, and run returns within --grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_shutdown_mid_stream_commits_nothing_and_returns_within_grace() {
    let (src, dst, mut recv) = hosts(&[""], &["s1", "s2"]).await;
    let (mut c, all) = incremental_after_the_first(&recv, &src).await;
    c.begin_stream(Some(all[0].guid), &all[1])
        .await
        .expect("ready");
    let bytes = send_bytes(&src, SRC, Some(&all[0]), &all[1]).await;
    let cut = bytes.len() - 100;
    for part in [&bytes[..cut / 2], &bytes[cut / 2..cut]] {
        c.connection()
            .send_data(Bytes::copy_from_slice(part))
            .await
            .expect("data");
    }
    wait_until("the incremental's zfs receive", &dst, || {
        count_calls(&dst, "receive -u dst/t") == 2
    })
    .await;

    let took = recv.stop().await;
    assert!(took < GRACE, "run took {took:?} to return");
    match c.connection().read_msg().await {
        Err(ProtocolError::Peer(reason)) => {
            assert!(reason.contains("shutting down"), "{reason}")
        }
        other => panic!("expected the receiver's error, got {other:?}"),
    }
    assert_eq!(
        snaps(&dst, DST),
        snaps(&src, SRC)[..1].to_vec(),
        "the cut snapshot is not committed\n{}",
        both(&src, &dst)
    );
}

/// SE2: a receiver shutdown does not interrupt a zfs receive that has its whole stream: it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_shutdown_lets_a_whole_stream_being_applied_commit() {
    let (src, dst, mut recv) = hosts(&[""], &["s1"]).await;
    dst.delay_receive(Duration::from_millis(600));
    let all = src.snapshots(SRC);
    let mut c = recv.client().await;
    let req = SyncRequest::new(&rel(""), &all);
    assert_eq!(
        c.sync(&req).await.unwrap(),
        SyncReply::New { buffered: false }
    );
    c.begin_stream(None, &all[0]).await.expect("ready");
    let bytes = send_bytes(&src, SRC, None, &all[0]).await;
    let n = c.pump(&mut &bytes[..], |_| {}).await.expect("pump");
    let ending = tokio::spawn(async move { c.end_stream(n).await });
    // The End is read at once; the receive then takes 600 ms to apply.
    tokio::time::sleep(Duration::from_millis(150)).await;

    let took = recv.stop().await;
    assert!(took < GRACE, "run took {took:?} to return");
    let stored = tokio::time::timeout(PATIENCE, ending)
        .await
        .expect("an answer")
        .expect("no panic");
    assert_eq!(stored.ok(), Some(n), "{}", both(&src, &dst));
    assert_replica(&src, &dst);
}

/// SN8 (run's shutdown token): a stopped sender ends promptly, only whole snapshots arrive, and the next run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_stop_mid_run_leaves_only_whole_snapshots_and_the_next_run_completes() {
    let rels = ["", "/a", "/b", "/c"];
    let (src, dst, recv) = hosts(&rels, &["s1", "s2", "s3"]).await;
    dst.delay_receive(Duration::from_millis(300));
    let token = CancellationToken::new();
    let stop = async {
        wait_until("the first zfs receive", &dst, || {
            count_calls(&dst, "receive") > 0
        })
        .await;
        token.cancel();
        Instant::now()
    };
    let opts = recv.send_options(&src, 1, false);
    let (report, stopped) = run_sender_beside(opts, token.clone(), stop).await;
    let took = stopped.elapsed();
    assert!(
        took < GRACE,
        "the run took {took:?} to stop\n{}",
        text(&report)
    );
    assert!(report.stopped, "{}", text(&report));
    assert_eq!(report.exit_code(), zfsync_send::exit::FAILED);
    assert!(
        report.outcomes.iter().any(|o| matches!(
            &o.status,
            Status::Failed { reason } if reason.contains("the run was stopped")
        )),
        "{}",
        text(&report)
    );
    assert_only_whole_snapshots(&src, &dst);
    assert!(
        copies(&dst, DST)
            .values()
            .map(|(_, s)| s.len())
            .sum::<usize>()
            < rels.len() * 3,
        "the run stopped before the end\n{}",
        both(&src, &dst)
    );

    dst.delay_receive(Duration::ZERO);
    let report = recv.send(&src, 1, false).await;
    assert_ok(&report, &src, &dst);
    assert_replica(&src, &dst);
    assert_same_tree(&src, &dst);
}

/// SN8: a stopped run skips cleanbuffer (so --delete-missing) and pruning, yet records the confirmation of a dataset it finished; the next run does both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_stop_skips_cleanbuffer_and_pruning_but_keeps_confirmations() {
    let (src, dst, recv) = hosts(&["", "/a", "/b", "/gone"], &[T1, T2]).await;
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    destroy_on_source(&src, "/gone").await;
    let prop = format_confirm_prop(&format_receiver_id("127.0.0.1", recv.port));
    let options = |stamp: &str| {
        let mut opts = recv.send_options(&src, 1, false);
        opts.snapshot = Some((SnapClass::S, stamp.to_string()));
        opts.keep = Some(1);
        opts.delete_missing = true;
        opts
    };
    let has_t1 = |r: &str| snaps(&src, &src_ds(r)).iter().any(|(n, _)| n == T1);

    // Stopped while /a's stream is received (the top is finished by
    // then; /a may still finish, its whole stream having been sent).
    let taken = "260101-000200_S";
    dst.delay_receive(Duration::from_millis(200));
    dst.clear_calls();
    src.clear_calls();
    let token = CancellationToken::new();
    let stop = async {
        wait_until("/a's zfs receive", &dst, || {
            count_calls(&dst, &format!("receive -u {}", dst_ds("/a"))) > 0
        })
        .await;
        token.cancel();
    };
    let (report, ()) = run_sender_beside(options("260101-000200"), token.clone(), stop).await;
    assert!(report.stopped, "{}", text(&report));
    assert_eq!(report.exit_code(), zfsync_send::exit::FAILED);
    assert_sent(&report, "", SendKind::Incremental, taken);
    assert_eq!(src.prop(SRC, &prop).as_deref(), Some(taken));
    // /a may still finish, its whole stream having been sent; so may /b,
    // launched behind it before the stop (its answer was owed).
    for r in ["/a", "/b"] {
        let confirmed = src.prop(&src_ds(r), &prop);
        match status(&report, r) {
            Status::Sent { .. } => assert_eq!(confirmed.as_deref(), Some(taken)),
            Status::Failed { reason } if reason.contains("the run was stopped") => {
                assert_eq!(confirmed.as_deref(), Some(T2))
            }
            other => panic!("{r}: {other:?}\n{}", text(&report)),
        }
    }
    assert!(report.retention.pruning_skipped, "{}", text(&report));
    assert!(report.retention.pruned.is_empty(), "{}", text(&report));
    assert_no_call("sender", &src, "destroy");
    assert_eq!(report.clean, CleanReport::default(), "no cleanbuffer");
    assert!(
        dst.dataset(&dst_ds("/gone")).is_some(),
        "{}",
        both(&src, &dst)
    );
    assert_no_call("receiver", &dst, "destroy");
    for r in ["", "/a", "/b"] {
        assert!(has_t1(r), "{r}: @{T1} pruned\n{}", dump("sender", &src));
    }

    // The next run prunes and deletes.
    wait_unlocked(&recv, &src, "/a", "after the stopped run").await;
    dst.delay_receive(Duration::ZERO);
    let report = run_sender(options("260101-000300")).await;
    assert_ok(&report, &src, &dst);
    assert!(!report.retention.pruned.is_empty(), "{}", text(&report));
    assert_eq!(report.clean.deleted, ["/gone"], "{}", text(&report));
    for r in ["", "/a", "/b"] {
        assert!(!has_t1(r), "{r}: @{T1} kept\n{}", dump("sender", &src));
        // (The receiver mirrors the pruning at the next run.)
        let kept = snaps(&dst, &dst_ds(r));
        assert!(
            snaps(&src, &src_ds(r)).iter().all(|s| kept.contains(s)),
            "{r}\n{}",
            both(&src, &dst)
        );
    }
    assert_same_tree(&src, &dst);
}
