//! How data travels: `--compress` (zstd frames, decompressed by the
//! receiver before anything looks at them) and `--bwlimit`.

use std::time::{Duration, Instant};

use zfsync_common::client::{Client, ClientOptions, Pumped, Transit};
use zfsync_common::compress::{Deflater, MAX_INFLATED};
use zfsync_common::protocol::{Bytes, Message, ProtocolError, SyncReply, SyncRequest, WireSnap};
use zfsync_common::throttle::Rate;
use zfsync_common::zfs::fake::FakeZfs;
use zfsync_send::{SendKind, Status};

use crate::support::*;

fn compressing(recv: &Receiver) -> ClientOptions {
    ClientOptions {
        transit: Transit::new(Some(3), None),
        ..recv.client_options()
    }
}

/// The wire and stream bytes of every dataset sent.
fn sent_bytes(report: &zfsync_send::Report) -> (u64, u64) {
    report
        .outcomes
        .iter()
        .fold((0, 0), |(b, w), o| match &o.status {
            Status::Sent { bytes, wire, .. } => (b + bytes, w + wire),
            _ => (b, w),
        })
}

/// ING2 (--compress): a tree sent compressed arrives whole, with the sender's GUIDs, in fewer bytes on the wire; End counts the stream's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_sent_compressed_arrives_whole_in_fewer_wire_bytes() {
    let rels = ["", "/a", "/a/x", "/b"];
    let (src, dst, recv) = hosts(&rels, &["s1", "s2"]).await;
    let mut opts = recv.send_options(&src, 2, false);
    opts.client = compressing(&recv);
    let report = run_sender(opts).await;
    assert_ok(&report, &src, &dst);
    for r in rels {
        assert_sent(&report, r, SendKind::Full, "s2");
    }
    assert_replica(&src, &dst);
    assert_same_tree(&src, &dst);
    let (bytes, wire) = sent_bytes(&report);
    assert!(
        wire < bytes,
        "wire {wire}, stream {bytes}\n{}",
        text(&report)
    );
    assert!(
        text(&report).contains("on the wire, ratio"),
        "{}",
        text(&report)
    );

    // The same plain: wire and stream bytes are one.
    let (src, dst, recv) = hosts(&rels, &["s1", "s2"]).await;
    let report = recv.send(&src, 2, false).await;
    assert_ok(&report, &src, &dst);
    let (plain, plain_wire) = sent_bytes(&report);
    assert_eq!(plain, plain_wire);
    assert_eq!(
        plain, bytes,
        "End counts the uncompressed stream either way"
    );
    assert!(!text(&report).contains("on the wire"), "{}", text(&report));
}

/// ING2, ING3 (--compress): step by step, a compressed stream is counted in stream bytes and stored; its announcement says it is compressed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_stream_is_stored_and_counted_uncompressed() {
    let (src, dst, recv) = hosts(&[""], &["s1"]).await;
    let all = src.snapshots(SRC);
    let mut c = Client::connect(&compressing(&recv)).await.expect("connect");
    assert!(c.compressing(), "this receiver decompresses");
    let req = SyncRequest::new(&rel(""), &all);
    assert_eq!(
        c.sync(&req).await.unwrap(),
        SyncReply::New { buffered: false }
    );
    c.begin_stream(None, &all[0]).await.expect("ready");
    let bytes = send_bytes(&src, SRC, None, &all[0]).await;
    let Pumped { bytes: n, wire } = c.pump_counted(&mut &bytes[..], |_| {}).await.expect("pump");
    assert_eq!(n, bytes.len() as u64);
    assert!(wire < n, "wire {wire}, stream {n}");
    assert_eq!(c.end_stream(n).await.expect("stored"), n);
    c.finish().await.expect("finished");
    assert_replica(&src, &dst);
}

/// A stream announced compressed whose data frame is `frame`: what the
/// receiver answers.
async fn a_compressed_frame(recv: &Receiver, src: &FakeZfs, frame: Vec<u8>) -> ProtocolError {
    let all = src.snapshots(SRC);
    let mut c = recv.client().await;
    let req = SyncRequest::new(&rel(""), &all);
    assert_eq!(
        c.sync(&req).await.unwrap(),
        SyncReply::New { buffered: false }
    );
    let conn = c.connection();
    conn.send(Message::Stream {
        from_guid: None,
        to: WireSnap::from(&all[0]),
        resume: false,
        compressed: true,
    })
    .await
    .unwrap();
    assert_eq!(conn.read_msg().await.unwrap(), Message::Ready);
    conn.send_data(Bytes::from(frame)).await.unwrap();
    conn.send(Message::End { bytes: 1 }).await.unwrap();
    conn.read_msg().await.expect_err("the connection ends")
}

/// ING2 (--compress): a corrupt compressed frame, one that is not zstd, and a zip bomb are refused streams (the connection ends, saying why); nothing is received, and the receiver serves the next sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_oversized_compressed_frames_are_refused() {
    let (src, dst, recv) = hosts(&[""], &["s1"]).await;
    let all = src.snapshots(SRC);
    let stream = send_bytes(&src, SRC, None, &all[0]).await;
    let mut d = Deflater::new(3).unwrap();
    let mut corrupt = d.compress(&stream).unwrap();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xff;
    let bomb = d.compress(&vec![0u8; MAX_INFLATED + 1]).unwrap();
    for (what, frame, says) in [
        ("corrupt", corrupt, "corrupt compressed data frame"),
        ("plain bytes", stream.clone(), "not a zstd frame"),
        ("a zip bomb", bomb, "at most 4194304 are accepted"),
    ] {
        match a_compressed_frame(&recv, &src, frame).await {
            ProtocolError::Peer(reason) => {
                assert!(reason.contains("refused stream"), "{what}: {reason}");
                assert!(reason.contains(says), "{what}: {reason}");
            }
            other => panic!("{what}: expected the receiver's reason, got {other:?}"),
        }
        assert!(snaps(&dst, DST).is_empty(), "{what}\n{}", both(&src, &dst));
    }
    // The receiver still serves, compressed streams too.
    let mut opts = recv.send_options(&src, 1, false);
    opts.client = compressing(&recv);
    let report = run_sender(opts).await;
    assert_ok(&report, &src, &dst);
    assert_replica(&src, &dst);
}

/// --bwlimit: the run's connections share one bucket; emptied first, it holds the whole run to the rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_limit_holds_the_run_back() {
    let (src, dst, recv) = hosts(&["", "/a", "/b"], &["s1", "s2"]).await;
    let rate = Rate(16 << 10);
    let mut opts = recv.send_options(&src, 3, false);
    opts.client.transit = Transit::new(None, Some(rate));
    let bucket = opts.client.transit.bwlimit.clone().unwrap();
    // The burst spent: every byte of the run now waits for the rate.
    bucket.take(bucket.burst() as usize).await;
    let started = Instant::now();
    let report = run_sender(opts).await;
    let took = started.elapsed();
    assert_ok(&report, &src, &dst);
    assert_replica(&src, &dst);
    let (_, wire) = sent_bytes(&report);
    let least = Duration::from_secs_f64(wire as f64 / rate.0 as f64);
    assert!(
        took >= least,
        "{wire} bytes at {rate} took {took:?}, less than {least:?}"
    );
}
