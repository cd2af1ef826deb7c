//! End to end: retention never prunes a snapshot a receiver may hold
//! unconfirmed (design.md SN6, README "Snapshots and retention"). A first
//! sync cut after its full stream, a second receiver whose run was cut and
//! whose hold is gone, and a failed `zfs hold`, each followed by pruning
//! runs; then the cut receiver's next run must still be incremental, with
//! the source's GUIDs. Real binaries on real pools; a run is cut by SIGKILL
//! of `zfsync-send` while its (slowed) second stream flows.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use zfsync_e2e::*;

/// Tool snapshots made by hand, older than any the runs take.
const S1: &str = "240101-000000_S";
const S2: &str = "240101-000100_S";

/// The summary's lines for the three cases.
const NEVER_CONFIRMED: &str = "of dataset(s) the receiver never confirmed";
const OTHER_RECEIVER: &str = "another receiver may have";
const HOLD_FAILED: &str = "retention error: pruning skipped for";

/// One `zfsync-send` to the receiver on `port`.
fn sync(port: u16, extra: &[&str], src: &str) -> SendRun {
    let port = port.to_string();
    let mut args = vec!["-p", port.as_str(), "-t", "1"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[src, "127.0.0.1"]);
    send(&Certs::shared().sender_args(), &args)
}

/// Starts a `zfsync-send` of `src` with one worker and `--zfs zfs`, in the
/// background.
fn spawn(port: u16, zfs: &str, src: &str) -> RunningSend {
    let port = port.to_string();
    let args = ["-p", &port, "-t", "1", "--zfs", zfs, src, "127.0.0.1"];
    spawn_send(&Certs::shared().sender_args(), &args)
}

/// Waits until the receiver runs the `n`-th `zfs receive` (counted from
/// its start) and that stream has flowed a little, then SIGKILLs the
/// sender: the streams before it are committed, that one is cut.
fn cut_during_receive(sender: RunningSend, recv: &Receiver, n: usize, pool: &str) {
    recv.wait_for_receives(n, &[]);
    std::thread::sleep(Duration::from_millis(700));
    let cuts = recv.log().matches("stream cut").count();
    sender.kill();
    recv.wait_for_log("stream cut", cuts + 1, Duration::from_secs(60));
    wait_until_no_process(
        &format!("zfs receive .*{pool}"),
        Duration::from_secs(60),
        &format!("a zfs receive into {pool}"),
    );
}

/// How many holds a snapshot has.
fn userrefs(snap: &str) -> u64 {
    zfs(&["get", "-H", "-p", "-o", "value", "userrefs", snap])
        .trim()
        .parse()
        .expect("userrefs is a number")
}

/// Snapshot names carry the second: two runs in one second would collide.
fn next_second() {
    std::thread::sleep(Duration::from_millis(1100));
}

fn of_class_s(ds: &str) -> Vec<String> {
    snapshot_names(ds)
        .into_iter()
        .filter(|n| n.len() == 15 && n.ends_with("_S"))
        .collect()
}

/// Every source snapshot is on the replica, with its GUID.
#[track_caller]
fn assert_replica_has(src: &str, dst: &str) {
    let (s, d) = (snapshot_guids(src), snapshot_guids(dst));
    for (k, v) in &s {
        assert_eq!(d.get(k), Some(v), "{dst} lacks {k} (or differs): {d:?}");
    }
}

/// Replica datasets whose newest snapshot is no longer on the source:
/// the base of their next incremental was lost.
fn lost_bases(src: &str, dst: &str) -> u64 {
    let s: Vec<String> = snapshot_guids(src).into_values().collect();
    let mut newest: BTreeMap<String, String> = BTreeMap::new();
    for rel in datasets(dst) {
        if let Some(last) = snapshots_of(&format!("{dst}{rel}")).last() {
            newest.insert(rel, last.guid.to_string());
        }
    }
    newest.values().filter(|g| !s.contains(g)).count() as u64
}

/// Figures of all tests of this file: each adds its own and rewrites the
/// file with the totals so far.
#[derive(Default)]
struct Figures {
    faults: u64,
    completed: u64,
    lost: u64,
}

static FIGURES: Mutex<Figures> = Mutex::new(Figures {
    faults: 0,
    completed: 0,
    lost: 0,
});

fn add_figures(faults: u64, completed: u64, lost: u64) {
    let mut f = FIGURES.lock().unwrap_or_else(|p| p.into_inner());
    f.faults += faults;
    f.completed += completed;
    f.lost += lost;
    record_figures(
        "retention_gaps",
        &[
            ("faults", f.faults),
            ("completed", f.completed),
            ("lost", f.lost),
        ],
    );
}

/// (a) A first sync is cut after the full stream of the oldest snapshot;
/// the receiver is down for two pruning runs (`--keep 1`). Nothing it may
/// have is pruned, and its next run is incremental from that snapshot.
#[test]
fn a_cut_first_sync_keeps_what_the_receiver_may_have() {
    let pools = Pools::new("gapa", "t");
    let (src, dst) = pools.names();
    zfs(&["create", &src]);
    write_file(&src, "f", b"first");
    zfs(&["snapshot", &format!("{src}@{S1}")]);
    write_file(&src, "big", &noise(4 << 20, 1));
    zfs(&["snapshot", &format!("{src}@{S2}")]);
    let certs = Certs::shared();
    let mut recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let port = recv.port;
    let tmp = TempDir::new("gapa");
    let slow = slow_zfs_clean_cut(&tmp);

    // The full stream of S1 arrives; the -I to S2 is cut.
    cut_during_receive(spawn(port, &slow, &src), &recv, 2, &pools.b.name);
    assert_eq!(snapshot_names(&dst), [S1], "the cut left other than S1");
    let before = snapshot_guids(&dst);
    for s in [S1, S2] {
        assert_eq!(userrefs(&format!("{src}@{s}")), 0, "@{s} is held");
    }

    // The receiver is down; cron takes snapshots and prunes meanwhile.
    recv.signal_and_wait("TERM", Duration::from_secs(10))
        .expect("the receiver stops");
    for _ in 0..2 {
        next_second();
        sync(port, &["--snapshot", "S", "--keep", "1"], &src)
            .assert_code(3)
            .assert_stdout_has(NEVER_CONFIRMED);
    }
    let names = snapshot_names(&src);
    assert!(
        names.contains(&S1.to_string()),
        "the receiver's only snapshot was pruned: {names:?}"
    );
    let lost = lost_bases(&src, &dst);

    // Back up: incremental from S1, no --full; then pruning goes on.
    let recv = Receiver::start_on(&dst, &certs.receiver_args(), &[], port);
    next_second();
    sync(port, &["--snapshot", "S", "--keep", "1"], &src)
        .assert_code(0)
        .assert_stdout_has(&format!("incremental @{S1}.."))
        .assert_stdout_has("result: all datasets in sync");
    assert_replica_has(&src, &dst);
    for (k, v) in &before {
        assert_eq!(snapshot_guids(&dst).get(k), Some(v), "{k} lost");
    }
    assert_eq!(of_class_s(&src).len(), 1, "{:?}", snapshot_names(&src));
    drop(recv);
    assert_eq!(lost, 0);
    add_figures(2, 1, lost);
}

/// (b) Receivers A and B replicate one source. B's run is cut after its
/// first stream (it has `src@S2`, unconfirmed) and B's hold on
/// `src/a@S1` is gone (as after a failed `zfs hold`); then three A runs
/// prune with `--keep 1`. B's next run is incremental on both datasets,
/// and afterwards pruning goes on down to the two confirmed bases.
#[test]
fn another_receivers_unconfirmed_snapshots_and_unheld_base_survive() {
    let a = Pool::new("gapb");
    let ta = Pool::new("gapb");
    let tb = Pool::new("gapb");
    let src = a.ds("src");
    let (dst_a, dst_b) = (ta.ds("t"), tb.ds("t"));
    for ds in [src.clone(), format!("{src}/a")] {
        zfs(&["create", &ds]);
        write_file(&ds, "f", ds.as_bytes());
    }
    zfs(&["snapshot", "-r", &format!("{src}@{S1}")]);
    let certs = Certs::shared();
    let recv_a = Receiver::start(&dst_a, &certs.receiver_args(), &[]);
    let recv_b = Receiver::start(&dst_b, &certs.receiver_args(), &[]);
    sync(recv_a.port, &[], &src).assert_code(0);
    sync(recv_b.port, &[], &src).assert_code(0);

    write_file(&src, "g", b"small");
    write_file(&format!("{src}/a"), "big", &noise(4 << 20, 2));
    zfs(&["snapshot", "-r", &format!("{src}@{S2}")]);
    let tmp = TempDir::new("gapb");
    let slow = slow_zfs_clean_cut(&tmp);
    // B: src's -I S1..S2 arrives whole, src/a's is cut.
    let n = recv_b.receives_started(&[]);
    cut_during_receive(spawn(recv_b.port, &slow, &src), &recv_b, n + 2, &tb.name);
    assert_eq!(snapshot_names(&dst_b), [S1, S2]);
    assert_eq!(snapshot_names(&format!("{dst_b}/a")), [S1]);
    let before = snapshot_guids(&dst_b);
    for ds in [src.clone(), format!("{src}/a")] {
        assert_eq!(userrefs(&format!("{ds}@{S2}")), 0, "{ds}@{S2} is held");
    }
    // B's base of src/a is protected by its confirmation alone.
    let tag_b = format!("zfsync_127.0.0.1_{}", recv_b.port);
    zfs(&["release", &tag_b, &format!("{src}/a@{S1}")]);

    let mut last = String::new();
    for _ in 0..3 {
        next_second();
        let run = sync(recv_a.port, &["--snapshot", "S", "--keep", "1"], &src);
        run.assert_code(0);
        last = run.stdout.clone();
    }
    assert!(last.contains(OTHER_RECEIVER), "{last}");
    for ds in [src.clone(), format!("{src}/a")] {
        let names = snapshot_names(&ds);
        for s in [S1, S2] {
            assert!(names.contains(&s.to_string()), "{ds}@{s} pruned: {names:?}");
        }
    }
    let lost = lost_bases(&src, &dst_b);

    next_second();
    sync(recv_b.port, &["--snapshot", "S", "--keep", "1"], &src)
        .assert_code(0)
        .assert_stdout_has(&format!("incremental @{S2}.."))
        .assert_stdout_has(&format!("incremental @{S1}.."))
        .assert_stdout_has("result: all datasets in sync");
    assert_replica_has(&src, &dst_b);
    for (k, v) in &before {
        assert_eq!(snapshot_guids(&dst_b).get(k), Some(v), "{k} lost");
    }
    // Both receivers confirmed: A's next run prunes everything older than
    // B's base; B's base and A's newest stay.
    next_second();
    sync(recv_a.port, &["--snapshot", "S", "--keep", "1"], &src).assert_code(0);
    for ds in [src.clone(), format!("{src}/a")] {
        assert_eq!(of_class_s(&ds).len(), 2, "{ds}: {:?}", snapshot_names(&ds));
    }
    assert_replica_has(&src, &dst_a);
    assert_eq!(lost, 0);
    add_figures(2, 2, lost);
}

/// (c) `zfs hold` of the new base fails: that run prunes nothing of those
/// datasets, says so and exits 1; the next run (holds work again) prunes.
#[test]
fn a_failed_hold_stops_pruning_of_that_dataset_for_the_run() {
    let pools = Pools::new("gapc", "t");
    let (src, dst) = pools.names();
    create_tree(&src, &["", "/a"]);
    let tmp = TempDir::new("gapc");
    let failing = failing_zfs(
        &tmp,
        "hold",
        3,
        "cannot hold snapshot '$3': permission denied",
    );
    let recv = Receiver::start(&dst, &Certs::shared().receiver_args(), &[]);
    let keep1 = ["--snapshot", "S", "--keep", "1"];
    sync(recv.port, &keep1, &src).assert_code(0);
    let first = of_class_s(&src);
    assert_eq!(first.len(), 1);

    next_second();
    let run = sync(
        recv.port,
        &["--snapshot", "S", "--keep", "1", "--zfs", &failing],
        &src,
    );
    run.assert_code(1)
        .assert_stdout_has("retention warning: cannot hold")
        .assert_stdout_has(HOLD_FAILED)
        .assert_stdout_has("result: all datasets in sync; 1 retention error(s)");
    for ds in [src.clone(), format!("{src}/a")] {
        assert_eq!(of_class_s(&ds).len(), 2, "{ds} was pruned:\n{}", run.dump());
    }

    next_second();
    sync(recv.port, &keep1, &src).assert_code(0);
    for ds in [src.clone(), format!("{src}/a")] {
        assert_eq!(of_class_s(&ds).len(), 1, "{ds}: {:?}", snapshot_names(&ds));
    }
    assert_replica_has(&src, &dst);
    let lost = lost_bases(&src, &dst);
    assert_eq!(lost, 0);
    add_figures(1, 1, lost);
}
