//! The sender: confirmations, and connections lost on the way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use zfsync_common::naming::{format_confirm_prop, format_hold_tag, format_receiver_id, HoldTag};
use zfsync_send::{Report, SendKind, Status};

use crate::support::*;

/// SN5: the sender confirms (zfsync:synced_<id>, hold zfsync_<id>) only the datasets up to date or in place; one left in the buffer is confirmed once it is placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_datasets_in_place_are_confirmed_on_the_sender() {
    let (src, dst, recv) = hosts(&["", "/a", "/a/b", "/c"], &[]).await;
    for r in ["", "/a/b", "/c"] {
        src.snapshot(&src_ds(r), "s1");
    }
    let id = format_receiver_id("127.0.0.1", recv.port);
    let prop = format_confirm_prop(&id);
    let tag = format_hold_tag(HoldTag::Sender(&id));
    let confirmed = |r: &str| {
        let name = src_ds(r);
        (src.prop(&name, &prop), src.holds(&format!("{name}@s1")))
    };
    let yes = (Some("s1".to_string()), vec![tag.clone()]);
    let no = (None, vec![]);

    // /a has no snapshot: /a/b waits in the buffer.
    let report = recv.send(&src, 1, false).await;
    let why = failure(&report, "/a/b");
    assert!(why.contains("not placed"), "{why}");
    for (r, want) in [("", &yes), ("/c", &yes), ("/a/b", &no)] {
        assert_eq!(&confirmed(r), want, "{r}\n{}", both(&src, &dst));
    }
    assert_eq!(src.prop(&src_ds("/a"), &prop), None);

    // /a gets a snapshot: the next run places /a/b (up to date in the
    // buffer) and confirms it.
    src.snapshot(&src_ds("/a"), "s1");
    let report = recv.send(&src, 1, false).await;
    assert_ok(&report, &src, &dst);
    assert_up_to_date(&report, "/a/b", "s1");
    for r in ["", "/a", "/a/b", "/c"] {
        assert_eq!(confirmed(r), yes, "{r}\n{}", both(&src, &dst));
    }
    assert_same_tree(&src, &dst);
}

/// A TCP relay in front of the receiver that can cut every connection
/// through it, and refuse new ones.
struct Relay {
    port: u16,
    open: Arc<Mutex<Vec<JoinHandle<()>>>>,
    refuse: Arc<AtomicBool>,
    accepting: JoinHandle<()>,
}

impl Relay {
    async fn start(to: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local address").port();
        let open = Arc::new(Mutex::new(Vec::new()));
        let refuse = Arc::new(AtomicBool::new(false));
        let accepting = tokio::spawn({
            let (open, refuse) = (open.clone(), refuse.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if refuse.load(Ordering::SeqCst) {
                        continue; // closed at once
                    }
                    let relay = tokio::spawn(async move {
                        if let Ok(mut out) = TcpStream::connect(("127.0.0.1", to)).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        }
                    });
                    open.lock().expect("relay list").push(relay);
                }
            }
        });
        Relay {
            port,
            open,
            refuse,
            accepting,
        }
    }

    /// Cuts every connection through the relay: both ends see it closed.
    fn cut(&self) {
        for relay in self.open.lock().expect("relay list").drain(..) {
            relay.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accepting.abort();
    }
}

/// SN2: a connection lost in the middle of a dataset fails that dataset only (with streams
/// launched one ahead, the one whose answer was owed: /b, or /a when the cut swallowed its
/// answer; the one launched after it is asked about afresh): the worker reconnects and syncs the
/// rest; when it cannot reconnect, the datasets no worker took are reported "not attempted"; the
/// next run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_fails_only_the_dataset_in_progress() {
    let rels = ["", "/a", "/b", "/c"];
    let (src, dst, recv) = hosts(&rels, &["s1"]).await;
    // Long enough for the cut to come while /b's stream is received.
    dst.delay_receive(Duration::from_millis(100));
    let relay = Relay::start(recv.port).await;
    let via_relay = || {
        let mut opts = recv.send_options(&src, 1, false);
        opts.client.port = relay.port;
        run_sender(opts)
    };
    let receives_of_b = || count_calls(&dst, &format!("receive -u {}", dst_ds("/b")));
    let cut_at_b = |refuse: bool| {
        let seen = receives_of_b();
        let (dst, relay) = (&dst, &relay);
        async move {
            wait_until("/b's zfs receive", dst, || receives_of_b() > seen).await;
            relay.refuse.store(refuse, Ordering::SeqCst);
            relay.cut();
        }
    };
    // The one dataset the cut failed: /b, or /a when its answer was lost.
    let lost = |report: &Report| -> &'static str {
        let failed: Vec<&str> = ["/a", "/b"]
            .into_iter()
            .filter(|r| matches!(status(report, r), Status::Failed { reason } if !reason.contains("not attempted")))
            .collect();
        assert_eq!(failed.len(), 1, "{}", text(report));
        let why = failure(report, failed[0]);
        assert!(
            why.contains("closed the connection") || why.contains("connection error"),
            "{why}\n{}",
            text(report)
        );
        failed[0]
    };

    // The worker reconnects and goes on.
    let (report, ()) = tokio::join!(via_relay(), cut_at_b(false));
    assert_eq!(
        report.exit_code(),
        zfsync_send::exit::FAILED,
        "{}",
        text(&report)
    );
    let failed = lost(&report);
    for r in ["", "/a", "/b", "/c"].into_iter().filter(|r| *r != failed) {
        match status(&report, r) {
            Status::Sent { .. } => assert_sent(&report, r, SendKind::Full, "s1"),
            // Committed with the answer lost: the next connection found it.
            Status::UpToDate { .. } => {}
            other => panic!("{r}: {other:?}\n{}", text(&report)),
        }
    }
    assert_only_whole_snapshots(&src, &dst);

    // It cannot reconnect: what was not sent by then is not attempted.
    for r in rels {
        src.snapshot(&src_ds(r), "s2");
    }
    let (report, ()) = tokio::join!(via_relay(), cut_at_b(true));
    let failed = lost(&report);
    let why = failure(&report, "/c");
    assert!(
        why.contains("not attempted: lost every connection to the receiver"),
        "{why}"
    );
    assert_sent(&report, "", SendKind::Incremental, "s2");
    if failed == "/b" {
        assert_sent(&report, "/a", SendKind::Incremental, "s2");
    }
    assert_only_whole_snapshots(&src, &dst);

    // (The receiver frees /b once its zfs receive is done.)
    wait_unlocked(&recv, &src, "/b", "the cut connection").await;
    dst.delay_receive(Duration::ZERO);
    relay.refuse.store(false, Ordering::SeqCst);
    assert_ok(&via_relay().await, &src, &dst);
    assert_replica(&src, &dst);
    assert_same_tree(&src, &dst);
}
