//! A whole tree, with one worker and with four.

use zfsync_send::{SendKind, Status};

use crate::support::*;

/// Replicates a three-level tree with `threads` workers, then again (all up
/// to date), then after a new snapshot everywhere (all incremental).
async fn tree_replicates(threads: usize) {
    let rels = ["", "/a", "/a/x", "/a/y", "/b", "/b/z"];
    let (src, dst, recv) = hosts(&rels, &["s1", "s2"]).await;
    src.snapshot(&src_ds("/a"), "s3");
    src.snapshot(&src_ds("/b/z"), "s3");
    let newest = |r: &str| if r == "/a" || r == "/b/z" { "s3" } else { "s2" };

    let report = recv.send(&src, threads, false).await;
    assert_ok(&report, &src, &dst);
    for r in rels {
        assert_sent(&report, r, SendKind::Full, newest(r));
    }
    assert_replica(&src, &dst);
    assert_same_tree(&src, &dst);
    assert!(names_under(&dst, BUF).is_empty(), "{}", both(&src, &dst));

    dst.clear_calls();
    let report = recv.send(&src, threads, false).await;
    assert_ok(&report, &src, &dst);
    for r in rels {
        assert_up_to_date(&report, r, newest(r));
    }
    // An up-to-date run only lists.
    assert_only_listings(&dst);

    for r in rels {
        src.snapshot(&src_ds(r), "s4");
    }
    let report = recv.send(&src, threads, false).await;
    assert_ok(&report, &src, &dst);
    for r in rels {
        match status(&report, r) {
            Status::Sent {
                kind: SendKind::Incremental,
                from: Some(from),
                to,
                snapshots: 1,
                ..
            } if from == newest(r) && to == "s4" => {}
            other => panic!(
                "{r}: expected @{}..@s4, got {other:?}\n{}",
                newest(r),
                text(&report)
            ),
        }
    }
    assert_replica(&src, &dst);
    assert_same_tree(&src, &dst);
}

/// SN1, PL4: with one worker a tree replicates whole (the sender's GUIDs), then is up to date, then goes incremental.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_replicates_whole_then_is_up_to_date_then_incremental_with_one_worker() {
    tree_replicates(1).await;
}

/// SN1, PL4, BU1: the same with four workers, children arriving before their parents being buffered, then placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_replicates_whole_then_is_up_to_date_then_incremental_with_four_workers() {
    tree_replicates(4).await;
}
