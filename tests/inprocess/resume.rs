//! Resuming a cut transfer: the receiver's offer, the sender's reading of
//! the token, and what becomes of the partial state.

use zfsync_common::caps::{Cap, Caps};
use zfsync_common::client::ClientError;
use zfsync_common::protocol::{ProtocolError, SyncReply, SyncRequest};
use zfsync_common::zfs::fake::{FakeError, FakeZfs};
use zfsync_common::zfs::ZfsBackend;
use zfsync_send::{SendKind, Status};

use crate::support::*;

/// The receiver discarded the cut state of `name` (`zfs receive -A`).
#[track_caller]
fn assert_discarded(dst: &FakeZfs, name: &str) {
    assert_called("receiver", dst, &format!("receive -A {name}"));
    assert_eq!(dst.dataset(name).expect("kept").resume_token, None);
}

/// P2: a ResumeFailed without a Resume offer ends the connection (abandoning its open dataset); nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_failed_without_a_resume_offer_ends_the_connection() {
    let (src, dst, recv) = hosts(&[""], &["s1"]).await;
    let req = SyncRequest::new(&rel(""), &src.snapshots(SRC));
    // Right after the hello, and after a Sync that offered no resume.
    for sync_first in [false, true] {
        let mut c = recv.client().await;
        if sync_first {
            assert_eq!(
                c.sync(&req).await.unwrap(),
                SyncReply::New { buffered: false }
            );
        }
        match c.resume_failed("no offer was made").await {
            Err(ClientError::Protocol(ProtocolError::Peer(reason)))
                if reason.contains("resume_failed") && reason.contains("a resume offer first") => {}
            other => panic!("expected the receiver to end the connection, got {other:?}"),
        }
        assert!(c.sync(&req).await.is_err(), "the connection is closed");
    }
    assert_eq!(dst.names(), ["dst"], "{}", dump("receiver", &dst));
    // The dataset the second connection had open is free again.
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
}

/// SY5: a cut transfer's state is offered for resuming only when the receiver's zfs has receive -s and -A and the sender announced send -t; otherwise, and after ResumeFailed, it is discarded (receive -A) and the dataset planned afresh; a failed discard is refused, naming the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_transfer_is_offered_for_resuming_only_when_both_ends_can() {
    let (src, dst, recv) = openzfs_hosts(&[""], &["s1"]).await;
    let mut c = recv.client().await;
    sync_finished(&mut c, &src, &dst, "", false).await;
    c.bye().await;
    src.snapshot(SRC, "s2");
    let all = src.snapshots(SRC);
    let req = SyncRequest::new(&rel(""), &all);
    let incremental = SyncReply::Incremental {
        base_guid: all[0].guid,
        count: 1,
    };
    let token = "1-cut-at-s2";

    // A sender without `send -t`: no offer; the state is discarded.
    dst.set_resume_token(DST, Some(token));
    dst.clear_calls();
    let mut c = recv.client().await;
    assert_eq!(c.sync(&req).await.unwrap(), incremental);
    c.bye().await;
    assert_discarded(&dst, DST);

    // A sender with it: the offer; its ResumeFailed discards the state.
    dst.set_resume_token(DST, Some(token));
    dst.clear_calls();
    let mut c = recv.openzfs_client().await;
    assert_eq!(
        c.sync(&req).await.unwrap(),
        SyncReply::Resume {
            token: token.into()
        }
    );
    assert!(
        !dst.calls().contains(&format!("receive -A {DST}")),
        "{}",
        dump("receiver", &dst)
    );
    assert_eq!(
        c.resume_failed("its snapshot is gone").await.unwrap(),
        incremental
    );
    assert_discarded(&dst, DST);
    stream(&mut c, &src, SRC, Some(&all[0]), &all[1])
        .await
        .expect("s2");
    c.finish().await.expect("finish");
    c.bye().await;
    assert_replica(&src, &dst);

    // A receiver whose zfs has receive -s but not -A: no offer, and the
    // state it cannot discard is refused with the command to run.
    let dst = target_on(FakeZfs::new(Caps::new(
        "receive -s without -A",
        [Cap::RecvUnmounted, Cap::RecvResumable],
    )));
    let recv = Receiver::start(&dst).await;
    dst.create(DST);
    dst.set_resume_token(DST, Some(token));
    let mut c = recv.openzfs_client().await;
    let reason = refusal(c.sync(&req).await.unwrap(), false);
    assert!(
        reason.contains(&format!("run `zfs receive -A {DST}` by hand")),
        "{reason}\n{}",
        dump("receiver", &dst)
    );
    c.bye().await;
    assert_eq!(
        dst.dataset(DST).expect("kept").resume_token.as_deref(),
        Some(token)
    );
}

/// SN3: a resume token that names another dataset, or a snapshot the source no longer has, is read (send -nvP -t) and answered with ResumeFailed: the receiver discards the cut state and the dataset is sent afresh, never from the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_token_of_another_dataset_or_a_gone_snapshot_is_stale() {
    let (src, dst, recv) = openzfs_hosts(&["", "/a", "/b"], &["s1"]).await;
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    for r in ["", "/a", "/b"] {
        src.snapshot(&src_ds(r), "s2");
    }
    // /a's cut state is from a transfer of the top dataset's @s2 ...
    let top = src.snapshots(SRC);
    register_token(&src, "1-of-the-top", SRC, top[0].guid, &top[1]);
    // ... and /b's of a snapshot since destroyed on the source.
    let b = src_ds("/b");
    let gone = src.snapshot(&b, "gone");
    let from = src.snapshots(&b)[1].guid;
    register_token(&src, "1-of-a-gone-snapshot", &b, from, &gone);
    let gone = ds(&b).snapshot(&gone.name).expect("name");
    src.destroy_snapshot(&gone, false)
        .await
        .expect("destroy on the source");
    dst.set_resume_token(&dst_ds("/a"), Some("1-of-the-top"));
    dst.set_resume_token(&dst_ds("/b"), Some("1-of-a-gone-snapshot"));
    src.clear_calls();
    dst.clear_calls();

    let report = recv.send(&src, 1, false).await;
    assert_ok(&report, &src, &dst);
    for r in ["", "/a", "/b"] {
        match status(&report, r) {
            Status::Sent {
                kind: SendKind::Incremental,
                from: Some(from),
                to,
                ..
            } if from == "s1" && to == "s2" => {}
            other => panic!("{r}: expected @s1..@s2, got {other:?}\n{}", text(&report)),
        }
    }
    let with_token: Vec<String> = src
        .calls()
        .into_iter()
        .filter(|c| c.contains(" -t "))
        .collect();
    assert_eq!(
        with_token,
        [
            "send -n -v -P -t 1-of-the-top",
            "send -n -v -P -t 1-of-a-gone-snapshot"
        ],
        "each token is read, never sent from\n{}",
        dump("sender", &src)
    );
    for r in ["/a", "/b"] {
        assert_discarded(&dst, &dst_ds(r));
    }
    assert_replica(&src, &dst);
}

/// ING7, SY5: a resumed receive that zfs refuses has its partial state discarded (receive -A), so the next Sync plans afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_resumed_receive_discards_the_partial_state() {
    let (src, dst, recv) = openzfs_hosts(&[""], &["s1"]).await;
    let mut c = recv.openzfs_client().await;
    sync_finished(&mut c, &src, &dst, "", false).await;
    c.bye().await;

    // @s2 was cut on its way: its state waits for `zfs send -t`.
    let s2 = src.snapshot(SRC, "s2");
    let all = src.snapshots(SRC);
    let token = "1-cut-at-s2";
    register_token(&src, token, SRC, all[0].guid, &s2);
    dst.set_resume_token(DST, Some(token));
    dst.fail(
        "receive",
        DST,
        1,
        FakeError::Other("cannot receive resume stream: checksum mismatch".into()),
    );
    dst.clear_calls();
    let mut c = recv.openzfs_client().await;
    let req = SyncRequest::new(&rel(""), &all);
    assert_eq!(
        c.sync(&req).await.unwrap(),
        SyncReply::Resume {
            token: token.into()
        }
    );
    c.begin_resume(Some(all[0].guid), &s2).await.expect("ready");
    let bytes = resume_bytes(&src, token).await;
    let n = c.pump(&mut &bytes[..], |_| {}).await.expect("pump");
    let reason = stream_failure(c.end_stream(n).await, &src, &dst);
    assert!(
        reason.contains("checksum mismatch")
            && reason.contains("the partial state was discarded (zfs receive -A)"),
        "{reason}"
    );
    assert_discarded(&dst, DST);

    // Planned afresh: an incremental, no resume offer.
    let (reply, _) = sync_finished(&mut c, &src, &dst, "", false).await;
    assert_eq!(
        reply,
        SyncReply::Incremental {
            base_guid: all[0].guid,
            count: 1
        }
    );
    c.bye().await;
    assert_replica(&src, &dst);
}

/// SN3: a resume token the sender cannot read for another reason than a stale token fails that dataset and keeps the receiver's partial state for a later run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_token_the_sender_cannot_read_keeps_the_partial_state() {
    let (src, dst, recv) = openzfs_hosts(&["", "/a"], &["s1"]).await;
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    let a = src_ds("/a");
    let s2 = src.snapshot(&a, "s2");
    let token = "1-cut-at-a-s2";
    let from = src.snapshots(&a)[0].guid;
    register_token(&src, token, &a, from, &s2);
    dst.set_resume_token(&dst_ds("/a"), Some(token));
    src.fail(
        "send",
        token,
        1,
        FakeError::Other("cannot resume send: Input/output error".into()),
    );
    dst.clear_calls();

    let report = recv.send(&src, 1, false).await;
    let why = failure(&report, "/a");
    assert!(
        why.contains("cannot read the resume token") && why.contains("Input/output error"),
        "{why}"
    );
    assert_up_to_date(&report, "", "s1");
    // Nothing discarded or received.
    assert_no_call("receiver", &dst, "receive");
    assert_eq!(
        dst.dataset(&dst_ds("/a"))
            .expect("kept")
            .resume_token
            .as_deref(),
        Some(token)
    );

    // The next run reads the token and resumes from it.
    let report = recv.send(&src, 1, false).await;
    assert_ok(&report, &src, &dst);
    assert_called("sender", &src, &format!("send -t {token}"));
    assert_replica(&src, &dst);
}
