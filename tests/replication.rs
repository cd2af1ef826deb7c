//! End to end: the real binaries replicating real pools over TLS.

use zfsync_e2e::*;

/// Builds the source tree of the initial-sync test: 13 datasets over three
/// levels below the root, names with `-`, `_`, `.` and `:`, files in each.
fn make_tree(src: &str) -> Vec<&'static str> {
    let rels = vec![
        "alpha-1",
        "alpha-1/x_y",
        "alpha-1/x_y/z.z",
        "alpha-1/m:n",
        "beta_2",
        "beta_2/c-1",
        "beta_2/c-1/d",
        "gamma.3",
        "gamma.3/e:f",
        "gamma.3/e:f/g",
        "delta",
        "delta/h",
    ];
    zfs(&["create", src]);
    write_file(src, "top.txt", b"top\n");
    for (i, r) in rels.iter().enumerate() {
        let ds = format!("{src}/{r}");
        zfs(&["create", &ds]);
        write_file(&ds, "data.bin", &noise(3000 + i * 100, i as u64));
        write_file(&ds, "name.txt", r.as_bytes());
    }
    rels
}

#[test]
fn initial_sync_then_nothing_new() {
    let certs = Certs::shared();
    let a = Pool::new("init");
    let b = Pool::new("init");
    let src = a.ds("src");
    let dst = b.ds("replica");
    let rels = make_tree(&src);
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    write_file(&format!("{src}/delta"), "later.txt", b"second snapshot\n");
    zfs(&["snapshot", "-r", &format!("{src}@s2")]);

    let recv_spy = ZfsSpy::new();
    let recv = Receiver::start(&dst, &certs.receiver_args(), &["--zfs", &recv_spy.script]);
    let spy = ZfsSpy::new();
    let port = recv.port.to_string();
    let run = send(
        &certs.sender_args(),
        &[
            "-p",
            &port,
            "-t",
            "4",
            "--zfs",
            &spy.script,
            &src,
            "127.0.0.1",
        ],
    );
    run.assert_code(0)
        .assert_stdout_has("datasets: 13 (0 up to date, 13 sent, 0 failed)")
        .assert_stdout_has("snapshots sent: 26")
        .assert_stdout_has("result: all datasets in sync");

    // Every dataset and every snapshot, with equal GUIDs.
    let mut want: Vec<String> = vec![String::new()];
    want.extend(rels.iter().map(|r| format!("/{r}")));
    want.sort();
    let mut got = datasets(&dst);
    got.sort();
    assert_eq!(got, want, "datasets on the receiver\n{}", run.dump());
    let src_guids = snapshot_guids(&src);
    assert_eq!(src_guids.len(), 26);
    assert_eq!(snapshot_guids(&dst), src_guids);
    assert!(
        !exists(&format!("{dst}.zfsyncbuffer")),
        "buffer left behind"
    );

    // One listing for the whole run; one full send and one -I per dataset.
    let calls = spy.calls();
    let listings: Vec<&String> = calls
        .iter()
        .filter(|c| c.starts_with("get") || c.starts_with("list"))
        .collect();
    assert_eq!(listings.len(), 1, "sender listings: {calls:#?}");
    assert_eq!(calls.iter().filter(|c| c.starts_with("send ")).count(), 26);
    let recursive = |calls: &[String]| {
        calls
            .iter()
            .filter(|c| c.starts_with("get") && c.contains(" -r "))
            .count()
    };
    assert_eq!(
        recursive(&recv_spy.calls()),
        1,
        "receiver: one tree listing per run"
    );
    assert_same_files(&src, &dst, "s2");

    // Nothing new: nothing is sent, exit 0, up to date.
    spy.clear();
    recv_spy.clear();
    let before = pool_state(&b.name);
    let run = send(
        &certs.sender_args(),
        &["-p", &port, "--zfs", &spy.script, &src, "127.0.0.1"],
    );
    run.assert_code(0)
        .assert_stdout_has("datasets: 13 (13 up to date, 0 sent, 0 failed)")
        .assert_stdout_has("bytes sent: 0 B")
        .assert_stdout_has("up to date (@s2)");
    assert!(
        spy.calls().iter().all(|c| !c.starts_with("send")),
        "{:?}",
        spy.calls()
    );
    assert_eq!(spy.calls().len(), 1, "{:?}", spy.calls());
    assert_eq!(pool_state(&b.name), before);
    assert_eq!(recursive(&recv_spy.calls()), 1);
    assert!(
        recv_spy.calls().iter().all(|c| !c.starts_with("receive")),
        "{:?}",
        recv_spy.calls()
    );
}

#[test]
fn incremental_sends_only_new_snapshots() {
    let certs = Certs::shared();
    let a = Pool::new("incr");
    let b = Pool::new("incr");
    let src = a.ds("src");
    let dst = b.ds("replica");
    for ds in [
        src.clone(),
        format!("{src}/a"),
        format!("{src}/a/b"),
        format!("{src}/c"),
    ] {
        zfs(&["create", &ds]);
        write_file(&ds, "f", b"one\n");
    }
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let port = recv.port.to_string();
    send(&certs.sender_args(), &["-p", &port, &src, "localhost"]).assert_code(0);

    // Changes, then two snapshots: both must arrive, and only they.
    write_file(&format!("{src}/a"), "f", &noise(20000, 7));
    write_file(&format!("{src}/c"), "new", b"new file\n");
    zfs(&["snapshot", "-r", &format!("{src}@s2")]);
    write_file(&format!("{src}/a/b"), "g", b"between\n");
    zfs(&["snapshot", "-r", &format!("{src}@s3")]);
    let spy = ZfsSpy::new();
    let run = send(
        &certs.sender_args(),
        &["-p", &port, "--zfs", &spy.script, &src, "localhost"],
    );
    run.assert_code(0)
        .assert_stdout_has("incremental @s1..@s3, 2 snapshots")
        .assert_stdout_has("datasets: 4 (0 up to date, 4 sent, 0 failed); snapshots sent: 8");
    let sends: Vec<String> = spy
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("send"))
        .collect();
    assert_eq!(sends.len(), 4, "{sends:?}");
    for s in &sends {
        assert!(
            s.starts_with("send -I ") && s.contains("@s1 ") && s.ends_with("@s3"),
            "{s}"
        );
    }
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));
    assert_eq!(snapshot_guids(&dst).len(), 12);
    assert_same_files(&src, &dst, "s3");

    // A replica changed by hand (here: mounted, a file added) is rolled
    // back to its newest snapshot by the next incremental; no snapshot is
    // lost.
    let _ = zfs_try(&["mount", &format!("{dst}/c")]);
    let stray = mountpoint(&format!("{dst}/c")).join("stray");
    let wrote = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::fs::write(&stray, b"x").is_ok()
    });
    assert!(wrote, "cannot write into the mounted replica");
    write_file(&src, "f", b"three\n");
    zfs(&["snapshot", "-r", &format!("{src}@s4")]);
    send(&certs.sender_args(), &["-p", &port, &src, "localhost"])
        .assert_code(0)
        .assert_stdout_has("incremental @s3..@s4, 1 snapshot");
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));
}

#[test]
fn no_common_snapshot_is_refused_then_replaced_with_full() {
    let certs = Certs::shared();
    let a = Pool::new("full");
    let b = Pool::new("full");
    let src = a.ds("src");
    let dst = b.ds("replica");
    for ds in [src.clone(), format!("{src}/c"), format!("{src}/c/d")] {
        zfs(&["create", &ds]);
        write_file(&ds, "f", ds.as_bytes());
    }
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let port = recv.port.to_string();
    send(&certs.sender_args(), &["-p", &port, &src, "127.0.0.1"]).assert_code(0);

    // The receiver's copy of /c loses every snapshot in common.
    zfs(&["destroy", &format!("{dst}/c@s1")]);
    zfs(&["snapshot", &format!("{dst}/c@alien")]);
    zfs(&["snapshot", "-r", &format!("{src}@s2")]);
    let before = pool_state(&b.name);
    let run = send(&certs.sender_args(), &["-p", &port, &src, "127.0.0.1"]);
    run.assert_code(1)
        .assert_stdout_has("no common snapshot")
        .assert_stdout_has("@alien")
        .assert_stdout_has("run with --full");
    // The others moved on; /c did not change at all.
    let after = pool_state(&b.name);
    let c_lines = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.starts_with(&format!("{dst}/c\t")) || l.starts_with(&format!("{dst}/c@")))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(c_lines(&after), c_lines(&before));

    // With --full: replaced, the child /c/d kept (it moved under the new copy).
    let d_guids = snapshot_guids(&format!("{dst}/c/d"));
    let run = send(
        &certs.sender_args(),
        &["-p", &port, "--full", &src, "127.0.0.1"],
    );
    run.assert_code(0)
        .assert_stdout_has("full (replaced the receiver's copy) ..@s2, 2 snapshots");
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));
    let d_after = snapshot_guids(&format!("{dst}/c/d"));
    for (k, v) in &d_guids {
        assert_eq!(d_after.get(k), Some(v), "child snapshot {k} kept");
    }
    assert!(
        datasets(&b.name)
            .iter()
            .all(|d| !d.contains("zfsyncbuffer")),
        "temporaries left: {:?}",
        datasets(&b.name)
    );
}

#[test]
fn diverged_target_is_refused() {
    let certs = Certs::shared();
    let a = Pool::new("div");
    let b = Pool::new("div");
    let src = a.ds("src");
    let dst = b.ds("replica");
    zfs(&["create", &src]);
    zfs(&["snapshot", &format!("{src}@s1")]);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let port = recv.port.to_string();
    send(&certs.sender_args(), &["-p", &port, &src, "127.0.0.1"]).assert_code(0);
    zfs(&["snapshot", &format!("{dst}@mine")]);
    zfs(&["snapshot", &format!("{src}@s2")]);
    let before = pool_state(&b.name);
    send(&certs.sender_args(), &["-p", &port, &src, "127.0.0.1"])
        .assert_code(1)
        .assert_stdout_has("newer than the common snapshot @s1: @mine");
    assert_eq!(pool_state(&b.name), before, "-F must never remove @mine");
}

#[test]
fn datasets_without_snapshots_are_skipped_not_full() {
    let certs = Certs::shared();
    let a = Pool::new("nosnap");
    let b = Pool::new("nosnap");
    let src = a.ds("src");
    let dst = b.ds("replica");
    zfs(&["create", &src]);
    zfs(&["snapshot", &format!("{src}@s1")]);
    zfs(&["create", &format!("{src}/empty")]);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    send(
        &certs.sender_args(),
        &["-p", &recv.port.to_string(), &src, "127.0.0.1"],
    )
    .assert_code(0)
    .assert_stdout_has("skipped: no snapshots")
    .assert_stdout_has("1 without snapshots");
    assert!(!exists(&format!("{dst}/empty")));
}

#[test]
fn bad_input_names_the_fix() {
    let certs = Certs::shared();
    let a = Pool::new("errs");
    let src = a.ds("src");
    zfs(&["create", &src]);
    zfs(&["snapshot", &format!("{src}@s1")]);

    // Missing certificate file.
    let mut tls = certs.sender_args();
    tls[3] = "/nonexistent/sender.pem".into();
    send(&tls, &[&src, "127.0.0.1"])
        .assert_code(2)
        .assert_stderr_has("/nonexistent/sender.pem")
        .assert_stderr_has("make certs");

    // No receiver listening.
    send(&certs.sender_args(), &["-p", "1", &src, "127.0.0.1"])
        .assert_code(3)
        .assert_stderr_has("cannot reach the receiver at 127.0.0.1:1");

    // A source that does not exist.
    let recv = Receiver::start(&a.ds("dst"), &certs.receiver_args(), &[]);
    send(
        &certs.sender_args(),
        &["-p", &recv.port.to_string(), &a.ds("nope"), "127.0.0.1"],
    )
    .assert_code(2)
    .assert_stderr_has("does not exist on this host");

    // The receiver's name does not match its certificate.
    send(
        &certs.sender_args(),
        &[
            "-p",
            &recv.port.to_string(),
            "--server-name",
            "other.example",
            &src,
            "127.0.0.1",
        ],
    )
    .assert_code(3)
    .assert_stderr_has("--server-name");

    // A receiver whose target's parent is missing refuses to start.
    let out = std::process::Command::new(bin("zfsync-recv"))
        .args(["-p", "0", "-l", "127.0.0.1"])
        .args(certs.receiver_args())
        .arg(a.ds("no/such/parent"))
        .output()
        .expect("run zfsync-recv");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("zfs create -p"), "{err}");
}

#[test]
fn pool_root_target_takes_full_once_and_reserves_the_buffer_name() {
    let certs = Certs::shared();
    let a = Pool::new("root");
    let b = Pool::new("root");
    let src = a.ds("src");
    for ds in [
        src.clone(),
        format!("{src}/a"),
        format!("{src}/a/b"),
        format!("{src}/c"),
    ] {
        zfs(&["create", &ds]);
        write_file(&ds, "f", ds.as_bytes());
    }
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    let recv = Receiver::start(&b.name, &certs.receiver_args(), &[]);
    let port = recv.port.to_string();

    // The pool's root exists without snapshots: only --full may fill it
    // (its children need no --full: their parent, the root, exists).
    let root_guid = |s: String| s.lines().next().map(str::to_string);
    let before = root_guid(pool_state(&b.name));
    send(&certs.sender_args(), &["-p", &port, &src, "127.0.0.1"])
        .assert_code(1)
        .assert_stdout_has("exists on the receiver but has no snapshots")
        .assert_stdout_has("--full")
        .assert_stdout_has("datasets: 4 (0 up to date, 3 sent, 1 failed)");
    assert_eq!(root_guid(pool_state(&b.name)), before);
    assert!(snapshot_guids(&b.name).keys().all(|k| !k.starts_with('@')));

    send(
        &certs.sender_args(),
        &["-p", &port, "--full", "-t", "4", &src, "127.0.0.1"],
    )
    .assert_code(0);
    assert_eq!(snapshot_guids(&b.name), snapshot_guids(&src));
    assert!(!exists(&format!("{}/zfsyncbuffer", b.name)));
    send(&certs.sender_args(), &["-p", &port, &src, "127.0.0.1"])
        .assert_code(0)
        .assert_stdout_has("datasets: 4 (4 up to date");

    // A source dataset named like the buffer is refused, not mixed in.
    zfs(&["create", &format!("{src}/zfsyncbuffer")]);
    zfs(&["snapshot", "-r", &format!("{src}@s2")]);
    send(&certs.sender_args(), &["-p", &port, &src, "127.0.0.1"])
        .assert_code(1)
        .assert_stdout_has("reserved for the receiver's buffer");
}

/// The receiver's `zfs` calls of a run, without the one tree listing per
/// run (`get ... -r`): grouped by subcommand.
fn per_dataset_calls(calls: &[String]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| !(c.starts_with("get") && c.contains(" -r ")))
        .cloned()
        .collect()
}

/// ING4, ST1: in steady state (a new snapshot, incremental) the receiver
/// makes exactly one `zfs` call per dataset, the `zfs receive`, besides
/// the one listing per run (counted with a `--zfs` wrapper).
#[test]
fn a_steady_state_run_makes_one_receiver_zfs_call_per_dataset() {
    let certs = Certs::shared();
    let a = Pool::new("calls");
    let b = Pool::new("calls");
    let src = a.ds("src");
    let dst = b.ds("replica");
    let rels = ["", "/a", "/a/b", "/c"];
    for r in rels {
        let ds = format!("{src}{r}");
        zfs(&["create", &ds]);
        write_file(&ds, "f", ds.as_bytes());
    }
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    let recv_spy = ZfsSpy::new();
    let recv = Receiver::start(&dst, &certs.receiver_args(), &["--zfs", &recv_spy.script]);
    let port = recv.port.to_string();
    send(
        &certs.sender_args(),
        &["-p", &port, "-t", "2", &src, "127.0.0.1"],
    )
    .assert_code(0);
    let first = per_dataset_calls(&recv_spy.calls());
    eprintln!("first run, receiver calls: {first:#?}");

    for (i, snap) in ["s2", "s3"].iter().enumerate() {
        write_file(&format!("{src}/a"), "g", &noise(2000, i as u64));
        zfs(&["snapshot", "-r", &format!("{src}@{snap}")]);
        recv_spy.clear();
        send(
            &certs.sender_args(),
            &["-p", &port, "-t", "2", &src, "127.0.0.1"],
        )
        .assert_code(0)
        .assert_stdout_has("result: all datasets in sync");
        let calls = recv_spy.calls();
        let listings = calls.len() - per_dataset_calls(&calls).len();
        let each = per_dataset_calls(&calls);
        eprintln!("incremental run {snap}: {listings} listing(s), per dataset: {each:#?}");
        let mut want: Vec<String> = rels
            .iter()
            .map(|r| format!("receive -u {dst}{r}"))
            .collect();
        let mut got = each.clone();
        want.sort();
        got.sort();
        assert_eq!(got, want, "receiver calls of an incremental run");
        assert_eq!(listings, 1, "one listing per run: {calls:#?}");
    }
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));
}

/// ING4: a replica changed on the receiver (mounted, written to) is rolled
/// back to its newest snapshot when `zfs receive` says it was modified;
/// the stream is answered as a temporary failure, the sender sends it
/// again in the same run, and the run ends in sync with no snapshot lost.
#[test]
fn a_replica_modified_on_the_receiver_is_rolled_back_and_the_run_completes() {
    let certs = Certs::shared();
    let a = Pool::new("modif");
    let b = Pool::new("modif");
    let src = a.ds("src");
    let dst = b.ds("replica");
    for r in ["", "/a"] {
        let ds = format!("{src}{r}");
        zfs(&["create", &ds]);
        write_file(&ds, "f", ds.as_bytes());
    }
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let port = recv.port.to_string();
    send(&certs.sender_args(), &["-p", &port, &src, "127.0.0.1"]).assert_code(0);

    // A person mounts the replica /a and writes into it.
    let replica = format!("{dst}/a");
    let mnt = TempDir::new("modif-mnt");
    zfs(&[
        "set",
        &format!("mountpoint={}", mnt.path().display()),
        &replica,
    ]);
    zfs(&["mount", &replica]);
    wait_mounted(&replica, true);
    std::fs::write(mnt.path().join("local.txt"), b"made on the receiver\n").expect("write");
    zfs(&["unmount", &replica]);
    wait_mounted(&replica, false);

    write_file(&format!("{src}/a"), "g", b"second\n");
    zfs(&["snapshot", "-r", &format!("{src}@s2")]);
    let run = send(
        &certs.sender_args(),
        &["-p", &port, "-v", &src, "127.0.0.1"],
    );
    run.assert_code(0)
        .assert_stdout_has("result: all datasets in sync");
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src), "{}", run.dump());
    let log = recv.log();
    assert!(
        log.contains("the changes were dropped (rolled back to @s1)"),
        "{log}"
    );
    // The file made on the receiver is gone: the replica is @s2.
    zfs(&["mount", &replica]);
    wait_mounted(&replica, true);
    let local = mnt.path().join("local.txt").exists();
    let g = std::fs::read(mnt.path().join("g")).unwrap_or_default();
    zfs(&["unmount", &replica]);
    wait_mounted(&replica, false);
    assert!(!local, "the change made on the receiver survived");
    assert_eq!(g, b"second\n");
}

/// Waits until `zfs get mounted` says `mounted` (zfs-fuse mounts and
/// unmounts asynchronously).
fn wait_mounted(ds: &str, mounted: bool) {
    let want = if mounted { "yes" } else { "no" };
    for _ in 0..100 {
        if zfs(&["get", "-H", "-o", "value", "mounted", ds]).trim() == want {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("{ds} is not mounted={want}");
}
