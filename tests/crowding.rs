//! Hardening II: strangers cannot crowd out senders. Silent TCP connections
//! from 127.0.0.1, the sender's own address (so no per-address rule alone
//! can tell them apart), each opened again as soon as the receiver closes
//! it, hold the receiver's handshake places while a real `zfsync-send`
//! replicates a small tree. Every run must succeed, and no sender may be
//! told that its certificate was rejected. Records one line of figures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use zfsync_e2e::*;

/// The receiver's `--max-connections`: its handshake places are 2 x this.
const MAX_CONNECTIONS: usize = 2;
/// The receiver's `--handshake-timeout`, in seconds.
const HANDSHAKE_TIMEOUT: u64 = 2;
/// Sender runs per crowd size.
const RUNS: usize = 3;

/// Stranger connections opened, and closed by the receiver.
#[derive(Default)]
struct Tally {
    tried: AtomicU64,
    refused: AtomicU64,
}

/// Reads until the receiver closes the socket (it never sends anything to
/// a silent peer).
async fn until_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// A stranger: connects, says nothing, and connects again as soon as the
/// receiver closes the socket, until `stop`. Then it leaves its last socket
/// open, to see the receiver close it too (the handshake timeout at most).
async fn stranger(port: u16, tally: Arc<Tally>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tally.tried.fetch_add(1, Ordering::SeqCst);
        tokio::select! {
            _ = until_closed(&mut s) => {
                tally.refused.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            _ = stop.cancelled() => {}
        }
        let within = Duration::from_secs(HANDSHAKE_TIMEOUT + 10);
        if tokio::time::timeout(within, until_closed(&mut s))
            .await
            .is_ok()
        {
            tally.refused.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_do_not_crowd_out_senders() {
    let certs = Certs::shared();
    let pools = Pools::new("crowd", "replica");
    let (src, dst) = pools.names();
    for ds in [src.clone(), format!("{src}/x"), format!("{src}/x/y")] {
        zfs(&["create", &ds]);
        write_file(&ds, "data.bin", &noise(4000, ds.len() as u64));
    }
    let recv = Receiver::start(
        &dst,
        &certs.receiver_args(),
        &[
            "--max-connections",
            &MAX_CONNECTIONS.to_string(),
            "--handshake-timeout",
            &HANDSHAKE_TIMEOUT.to_string(),
        ],
    );
    let port = recv.port.to_string();
    let tally = Arc::new(Tally::default());
    let mut runs = 0;
    let mut slowest = Duration::ZERO;
    for multiple in [2, 8] {
        let crowd = multiple * MAX_CONNECTIONS;
        let stop = CancellationToken::new();
        let before = tally.tried.load(Ordering::SeqCst);
        let strangers: Vec<_> = (0..crowd)
            .map(|_| tokio::spawn(stranger(recv.port, tally.clone(), stop.clone())))
            .collect();
        // The strangers hold every place before the sender comes.
        let start = Instant::now();
        while tally.tried.load(Ordering::SeqCst) < before + crowd as u64 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "strangers cannot connect"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..RUNS {
            runs += 1;
            zfs(&["snapshot", "-r", &format!("{src}@s{runs}")]);
            let args: Vec<String> = ["-p", &port, "-t", "2", &src, "127.0.0.1"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let tls = certs.sender_args();
            let started = Instant::now();
            let run = tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                send(&tls, &args)
            })
            .await
            .unwrap();
            slowest = slowest.max(started.elapsed());
            let what = format!("run {runs}, {crowd} strangers:\n{}", run.dump());
            assert!(
                !run.stdout.contains("rejected this sender's certificate")
                    && !run.stderr.contains("rejected this sender's certificate"),
                "a crowded-out sender was told its certificate was rejected; {what}"
            );
            run.assert_code(0);
            assert!(
                run.stdout.contains("result: all datasets in sync"),
                "{what}"
            );
        }
        stop.cancel();
        for s in strangers {
            s.await.unwrap();
        }
    }
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));
    let tried = tally.tried.load(Ordering::SeqCst);
    let refused = tally.refused.load(Ordering::SeqCst);
    println!(
        "crowding: {runs} sender runs succeeded (the slowest in {slowest:.1?}) among {tried} stranger connections, {refused} closed by the receiver"
    );
    record_figures(
        "crowding",
        &[("hostile_tried", tried), ("hostile_refused", refused)],
    );
    assert_eq!(refused, tried, "stranger connections left open");
}
