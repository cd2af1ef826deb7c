//! SIGTERM (and SIGINT) to `zfsync-send` while a stream flows: the run
//! stops within seconds with exit status 1 and prints the summary so far,
//! the `zfs send` in flight is killed and the receiver told to discard its
//! stream (only whole snapshots with the source's GUIDs are on the
//! target), no `zfs send` of the run is left behind, and the next normal
//! run completes.

use std::path::Path;
use std::time::{Duration, Instant};

use zfsync_e2e::*;

/// Starts a `zfsync-send` of `src` with one worker and `--zfs zfs`, in the
/// background.
fn spawn(port: u16, zfs: &str, src: &str) -> RunningSend {
    let port = port.to_string();
    let args = ["-p", &port, "-t", "1", "--zfs", zfs, src, "127.0.0.1"];
    spawn_send(&Certs::shared().sender_args(), &args)
}

/// Waits until the `n`-th receive of big runs and its (throttled) stream
/// has flowed a little.
fn wait_receiving_big(recv: &Receiver, n: usize, progress: &Path) {
    let start = Instant::now();
    recv.wait_for_receives(n, &["/big"]);
    let _ = std::fs::remove_file(progress);
    // 1 MiB of big's stream (64 KiB every 50 ms; the sender sends 256 KiB
    // frames): well under way, far from done (8 MiB take about six seconds).
    while chunks(progress) < 16 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "big's stream does not flow"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pieces of the current stream the throttled `zfs send` has let through.
fn chunks(progress: &Path) -> usize {
    std::fs::read_to_string(progress)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits (a few seconds at most) until no `zfs send` (or wrapper) from
/// `pool` runs.
#[track_caller]
fn assert_no_send_left(pool: &str) {
    wait_until_no_process(
        &format!("zfs send .*{pool}/"),
        Duration::from_secs(5),
        "zfs send of the stopped run",
    );
}

/// Every snapshot on the target is the source's, with its GUID: whole or
/// absent, never partial. Returns the target's snapshots.
#[track_caller]
fn assert_whole(src: &str, dst: &str) -> std::collections::BTreeMap<String, String> {
    let s = snapshot_guids(src);
    let d = snapshot_guids(dst);
    for (k, v) in &d {
        assert_eq!(s.get(k), Some(v), "{dst}: {k} is not the source's");
    }
    d
}

fn new_data(src: &str, snap: &str, seed: u64) {
    write_file(&format!("{src}/big"), "data", &noise(8 << 20, seed));
    write_file(src, "round", snap.as_bytes());
    zfs(&["snapshot", "-r", &format!("{src}@{snap}")]);
}

#[test]
fn sigterm_mid_stream_stops_cleanly_and_the_next_run_completes() {
    let pools = Pools::new("sigterm", "t");
    let (src, dst) = pools.names();
    create_tree(&src, &["", "/a", "/big", "/c"]);
    new_data(&src, "s1", 1);
    let tmp = TempDir::new("sigterm");
    let progress = tmp.path().join("progress");
    let throttled = throttled_zfs(&tmp, 64 << 10, &progress);
    let certs = Certs::shared();
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let port = recv.port;
    let normal_run = |snap: &str| {
        send(
            &certs.sender_args(),
            &["-p", &port.to_string(), &src, "127.0.0.1"],
        )
        .assert_code(0)
        .assert_stdout_has("result: all datasets in sync");
        assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));
        assert_eq!(
            files_at(&format!("{src}/big@{snap}")),
            files_at(&format!("{dst}/big@{snap}")),
            "big differs at @{snap}"
        );
    };
    let stopped = |round: &str, sig: &str| {
        let aborts = recv.log().matches("sender aborted the stream").count();
        let n = recv.receives_started(&["/big"]) + 1;
        let sender = spawn(port, &throttled, &src);
        wait_receiving_big(&recv, n, &progress);
        sender.signal(sig);
        let (run, took) = sender.finish_within(Duration::from_secs(20));
        assert!(
            took < Duration::from_secs(5),
            "{round}: took {took:?} to stop:\n{}",
            run.dump()
        );
        assert!(
            chunks(&progress) < 100,
            "{round}: big's stream ran to its end:\n{}",
            run.dump()
        );
        run.assert_code(1)
            .assert_stderr_has(&format!("{sig}: stopping"))
            .assert_stdout_has(&format!("zfsync-send {src} -> 127.0.0.1:{port}"))
            .assert_stdout_has("FAILED: stopped: the run was stopped before this dataset was done")
            .assert_stdout_has("FAILED: not attempted: the run was stopped")
            .assert_stdout_has("result: STOPPED before the end; 2 dataset(s) not done");
        let line = |ds: &str| {
            run.stdout
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{ds} ")))
                .unwrap_or_default()
                .to_string()
        };
        assert!(
            line(&format!("{src}/big")).contains("FAILED: stopped"),
            "{round}:\n{}",
            run.dump()
        );
        assert!(
            line(&format!("{src}/c")).contains("not attempted"),
            "{round}:\n{}",
            run.dump()
        );
        // The receiver was told, and discarded the stream.
        recv.wait_for_log(
            "sender aborted the stream",
            aborts + 1,
            Duration::from_secs(10),
        );
        assert_no_send_left(&pools.a.name);
        run
    };

    // 1. A full stream of big (nothing of it on the target yet), SIGTERM.
    stopped("full", "TERM");
    let got = assert_whole(&src, &dst);
    assert!(
        !got.keys()
            .any(|k| k.starts_with("/big@") || k.starts_with("/c@")),
        "big or c on the target after the stop: {got:?}"
    );
    normal_run("s1");

    // 2. An incremental of big (s1..s2), SIGINT: the target keeps s1 only.
    new_data(&src, "s2", 2);
    stopped("incremental", "INT");
    let got = assert_whole(&src, &dst);
    assert!(got.contains_key("/big@s1"), "{got:?}");
    assert!(!got.contains_key("/big@s2"), "{got:?}");
    assert!(!got.contains_key("/c@s2"), "{got:?}");
    normal_run("s2");
}
