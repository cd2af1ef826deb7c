//! Busy datasets: one connection at a time per dataset.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use zfsync_common::protocol::{SyncReply, SyncRequest};
use zfsync_send::{SendKind, Status};

use crate::support::*;

/// SY3: a Sync of a dataset another connection is working on is refused as temporary (busy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_syncing_a_busy_dataset_is_refused_as_temporary() {
    let (src, dst, recv) = hosts(&[""], &["s1", "s2"]).await;
    let all = src.snapshots(SRC);
    let req = SyncRequest::new(&rel(""), &all);
    let mut first = recv.client().await;
    let mut second = recv.client().await;
    assert_eq!(
        first.sync(&req).await.unwrap(),
        SyncReply::New { buffered: false }
    );
    let reason = refusal(second.sync(&req).await.unwrap(), true);
    assert!(reason.contains("busy"), "{reason}");
    stream(&mut first, &src, SRC, None, &all[0])
        .await
        .expect("s1");
    // Still busy while a stream is being received.
    refusal(second.sync(&req).await.unwrap(), true);
    stream(&mut first, &src, SRC, Some(&all[0]), &all[1])
        .await
        .expect("s2");
    first.finish().await.expect("finish");
    assert_eq!(
        second.sync(&req).await.unwrap(),
        SyncReply::UpToDate {
            snapshot: "s2".into()
        }
    );
    first.bye().await;
    second.bye().await;
    assert_replica(&src, &dst);
}

/// SN2: zfsync_send::run re-queues a dataset the receiver calls busy and syncs it once it is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_requeues_a_busy_dataset_and_syncs_it_once_free() {
    let (src, dst, recv) = hosts(&["", "/a", "/b"], &["s1"]).await;
    // Another connection holds the top dataset: its Sync opened it.
    let mut holder = recv.client().await;
    let req = SyncRequest::new(&rel(""), &src.snapshots(SRC));
    assert_eq!(
        holder.sync(&req).await.unwrap(),
        SyncReply::New { buffered: false }
    );

    let started = Instant::now();
    let a = format!("{BUF}/2F61");
    let watch = async {
        // The run tried the top first, was told busy, and went on with /a.
        wait_until("/a in the buffer", &dst, || !dst.snapshots(&a).is_empty()).await;
        assert!(dst.dataset(DST).is_none(), "{}", both(&src, &dst));
        holder.bye().await;
    };
    let opts = recv.send_options(&src, 1, false);
    let (report, ()) = run_sender_beside(opts, CancellationToken::new(), watch).await;
    assert_ok(&report, &src, &dst);
    assert_sent(&report, "", SendKind::Full, "s1");
    for r in ["/a", "/b"] {
        match status(&report, r) {
            Status::Sent {
                buffered: true,
                placed: true,
                ..
            } => {}
            other => panic!("{r}: {other:?}\n{}", text(&report)),
        }
    }
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "a busy dataset is tried again after a pause"
    );
    assert_replica(&src, &dst);
    assert_same_tree(&src, &dst);
}
