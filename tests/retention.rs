//! End to end: the cron script, snapshot classes and retention on both
//! sides, dry runs and orphans, with the real binaries on real pools.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use zfsync_e2e::*;

/// Runs scripts/zfsyncron.sh with `args` (TLS options and -p added).
fn cron(lockdir: &Path, port: u16, args: &[&str], src: &str, send_bin: Option<&str>) -> SendRun {
    let certs = Certs::shared();
    let script = root().join("scripts/zfsyncron.sh");
    let port = port.to_string();
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .args(certs.sender_args())
        .args(["-p", &port])
        .args(args)
        .args([src, "127.0.0.1"])
        .env("ZFSYNC_LOCKDIR", lockdir)
        .env(
            "ZFSYNC_SEND",
            send_bin
                .map(str::to_string)
                .unwrap_or_else(|| bin("zfsync-send").display().to_string()),
        );
    let out = cmd.output().expect("run zfsyncron.sh");
    SendRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        argv: format!("zfsyncron.sh {} {src}", args.join(" ")),
    }
}

fn snapnames(ds: &str) -> Vec<String> {
    snapshot_names(ds)
}

fn of_class(names: &[String], class: char) -> Vec<String> {
    names
        .iter()
        .filter(|n| n.len() == 15 && n.ends_with(&format!("_{class}")))
        .cloned()
        .collect()
}

/// Snapshot names carry the second: two runs in one second would collide.
fn next_second() {
    std::thread::sleep(Duration::from_millis(1100));
}

/// Every source snapshot is on the receiver with its GUID (the receiver
/// mirrors the sender's pruning one run later: at sync time the sender
/// still had the snapshots it prunes after confirming).
#[track_caller]
fn assert_replica_has(src: &str, dst: &str) {
    let (s, d) = (snapshot_guids(src), snapshot_guids(dst));
    for (k, v) in &s {
        assert_eq!(d.get(k), Some(v), "{dst} lacks {k}: {d:?}");
    }
}

/// Destroys a source dataset whose confirmed snapshot zfsync holds: the
/// hold must be released first, as README says.
fn destroy_held(ds: &str, port: u16) {
    let tag = format!("zfsync_127.0.0.1_{port}");
    for line in zfs(&["list", "-H", "-t", "snapshot", "-o", "name", "-r", ds]).lines() {
        let _ = zfs_try(&["release", &tag, line]);
    }
    // A mounted dataset is "busy" on zfs-fuse until it is unmounted.
    let mut last = String::new();
    for _ in 0..40 {
        let (ok, out) = zfs_try(&["destroy", "-r", ds]);
        if ok {
            return;
        }
        last = out;
        for m in zfs(&["list", "-H", "-o", "name", "-r", ds]).lines().rev() {
            let _ = zfs_try(&["unmount", m]);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("cannot destroy {ds}: {last}");
}

fn tree(src: &str) {
    for ds in [src.to_string(), format!("{src}/a"), format!("{src}/a/b")] {
        zfs(&["create", &ds]);
        write_file(&ds, "f", ds.as_bytes());
    }
}

#[test]
fn retention_counts_per_class_on_both_sides_and_a_persons_snapshots_survive() {
    let a = Pool::new("ret");
    let b = Pool::new("ret");
    let src = a.ds("src");
    let dst = b.ds("t");
    tree(&src);
    let lockdir = TempDir::new("lock");
    let recv = Receiver::start(&dst, &Certs::shared().receiver_args(), &[]);
    let both = |args: &[&str]| {
        cron(lockdir.path(), recv.port, args, &src, None)
            .assert_code(0)
            .stdout
            .clone()
    };
    // A person's snapshot, later deleted on the source.
    zfs(&["snapshot", "-r", &format!("{src}@person")]);
    both(&["-c", "S", "-s", "2"]);
    next_second();
    // A person holds the first S snapshot for a while: retention skips it.
    let first_s = of_class(&snapnames(&src), 'S')[0].clone();
    zfs(&["hold", "-r", "mine", &format!("{src}@{first_s}")]);
    both(&["-c", "S", "-s", "1"]);
    next_second();
    let out = both(&["-c", "S", "-s", "1"]);
    assert!(out.contains("retention skipped held snapshots"), "{out}");
    assert!(snapnames(&src).contains(&first_s));
    zfs(&["release", "-r", "mine", &format!("{src}@{first_s}")]);
    next_second();
    both(&["-c", "S", "-s", "2"]);
    next_second();
    zfs(&["destroy", "-r", &format!("{src}@person")]);
    for _ in 0..2 {
        both(&["-c", "H", "-h", "1", "-s", "2"]);
        next_second();
    }
    let run = cron(
        lockdir.path(),
        recv.port,
        &["-c", "d", "-d", "2"],
        &src,
        None,
    );
    run.assert_code(0)
        .assert_stdout_has("snapshot taken:")
        .assert_stdout_has("retention (class D, keep 2): pruned 0");
    for ds in ["", "/a", "/a/b"] {
        let s = snapnames(&format!("{src}{ds}"));
        assert_eq!(of_class(&s, 'S').len(), 2, "{ds}: {s:?}");
        assert_eq!(of_class(&s, 'H').len(), 1, "{ds}: {s:?}");
        assert_eq!(of_class(&s, 'D').len(), 1, "{ds}: {s:?}");
        // The mirroring receiver holds what the source holds, plus the
        // person's snapshot, which it never prunes.
        let t = snapnames(&format!("{dst}{ds}"));
        let mut want = s.clone();
        want.insert(0, "person".into());
        assert_eq!(t, want, "{dst}{ds}");
    }
    // The confirmation is recorded on the source, per receiver.
    let prop = format!("zfsync:synced_127.0.0.1_{}", recv.port);
    let confirmed = zfs(&["get", "-H", "-o", "value", &prop, &src]);
    assert_eq!(confirmed.trim(), snapnames(&src).last().unwrap());
}

#[test]
fn the_confirmed_base_survives_while_the_receiver_is_unreachable() {
    let a = Pool::new("base");
    let b = Pool::new("base");
    let src = a.ds("src");
    let dst = b.ds("t");
    tree(&src);
    let lockdir = TempDir::new("lock");
    let certs = Certs::shared();
    let mut recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let port = recv.port;
    cron(lockdir.path(), port, &["-c", "S", "-s", "1"], &src, None).assert_code(0);
    let base = snapnames(&src).last().unwrap().clone();
    next_second();

    // The receiver is down: keep 1 would prune the base; it is held back.
    recv.signal_and_wait("TERM", Duration::from_secs(10))
        .expect("receiver stops");
    let run = cron(lockdir.path(), port, &["-c", "S", "-s", "1"], &src, None);
    run.assert_code(3)
        .assert_stdout_has("retention held back")
        .assert_stdout_has(&base)
        .assert_stdout_has("receiver unreachable");
    assert!(snapnames(&src).contains(&base), "the base was pruned");
    // A held snapshot cannot be destroyed by hand either.
    let (ok, _) = zfs_try(&["destroy", &format!("{src}@{base}")]);
    assert!(!ok, "the confirmed base is not held");
    next_second();

    // Back up: the next run is an incremental from the base.
    let recv = Receiver::start_on(&dst, &certs.receiver_args(), &[], port);
    let run = cron(
        lockdir.path(),
        recv.port,
        &["-c", "S", "-s", "1"],
        &src,
        None,
    );
    run.assert_code(0)
        .assert_stdout_has(&format!("incremental @{base}.."));
    assert_eq!(snapnames(&src).len(), 1, "{:?}", snapnames(&src));
    assert_replica_has(&src, &dst);
}

#[test]
fn two_runs_at_once_the_second_is_refused_and_a_killed_run_blocks_nothing() {
    let a = Pool::new("lock");
    let b = Pool::new("lock");
    let src = a.ds("src");
    let dst = b.ds("t");
    tree(&src);
    let lockdir = TempDir::new("lock");
    let recv = Receiver::start(&dst, &Certs::shared().receiver_args(), &[]);
    // A zfsync-send that takes its time.
    let slow_dir = TempDir::new("slow");
    let slow = slow_dir.path().join("slow-send");
    std::fs::write(
        &slow,
        format!(
            "#!/bin/sh\nsleep 3\nexec '{}' \"$@\"\n",
            bin("zfsync-send").display()
        ),
    )
    .unwrap();
    run("chmod", &["+x", &slow.to_string_lossy()]);
    let slow_s = slow.to_string_lossy().to_string();

    let first = {
        let lockdir = lockdir.path().to_path_buf();
        let src = src.clone();
        let slow_s = slow_s.clone();
        let port = recv.port;
        std::thread::spawn(move || cron(&lockdir, port, &["-c", "S"], &src, Some(&slow_s)))
    };
    std::thread::sleep(Duration::from_millis(800));
    let second = cron(lockdir.path(), recv.port, &["-c", "S"], &src, None);
    second
        .assert_code(75)
        .assert_stderr_has("another run for")
        .assert_stderr_has("is still active");
    first.join().unwrap().assert_code(0);
    next_second();

    // A run killed with SIGKILL (script and zfsync-send) leaves no lock.
    let script = root().join("scripts/zfsyncron.sh");
    let mut child = Command::new("setsid")
        .arg("bash")
        .arg(&script)
        .args(Certs::shared().sender_args())
        .args(["-p", &recv.port.to_string(), "-c", "S", &src, "127.0.0.1"])
        .env("ZFSYNC_LOCKDIR", lockdir.path())
        .env("ZFSYNC_SEND", &slow_s)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let pgid = child.id().to_string();
    run("kill", &["-KILL", "--", &format!("-{pgid}")]);
    let _ = child.wait();
    let start = Instant::now();
    let again = cron(lockdir.path(), recv.port, &["-c", "S"], &src, None);
    again.assert_code(0);
    assert!(start.elapsed() < Duration::from_secs(60));
    assert_replica_has(&src, &dst);
}

#[test]
fn dry_run_changes_nothing_and_says_what_it_would_do() {
    let a = Pool::new("dry");
    let b = Pool::new("dry");
    let src = a.ds("src");
    let dst = b.ds("t");
    tree(&src);
    zfs(&["create", &format!("{src}/gone")]);
    let lockdir = TempDir::new("lock");
    let recv = Receiver::start(&dst, &Certs::shared().receiver_args(), &[]);
    for _ in 0..2 {
        cron(
            lockdir.path(),
            recv.port,
            &["-c", "S", "-s", "5"],
            &src,
            None,
        )
        .assert_code(0);
        next_second();
    }
    // Pending: a new snapshot, a new dataset, an orphan, prunable snapshots.
    destroy_held(&format!("{src}/gone"), recv.port);
    zfs(&["create", &format!("{src}/new")]);
    zfs(&["snapshot", "-r", &format!("{src}@manual")]);
    let full_state = |pool: &str| zfs(&["get", "-H", "-p", "-r", "all", pool]);
    let (before_a, before_b) = (full_state(&a.name), full_state(&b.name));
    let certs = Certs::shared();
    let run = send(
        &certs.sender_args(),
        &[
            "-p",
            &recv.port.to_string(),
            "--dry-run",
            "--snapshot",
            "S",
            "--keep",
            "1",
            "--delete-missing",
            &src,
            "127.0.0.1",
        ],
    );
    run.assert_code(0)
        .assert_stdout_has("DRY RUN")
        .assert_stdout_has("would send incremental @")
        .assert_stdout_has("would send full ..@manual")
        .assert_stdout_has("would prune 6 snapshot(s)")
        .assert_stdout_has("orphaned on the receiver (source gone, or made there by hand): /gone");
    assert_eq!(full_state(&a.name), before_a, "the source changed");
    assert_eq!(full_state(&b.name), before_b, "the receiver changed");
}

#[test]
fn orphans_are_reported_and_deleted_only_on_request_and_only_replicas() {
    let a = Pool::new("orph");
    let b = Pool::new("orph");
    let src = a.ds("src");
    let dst = b.ds("t");
    tree(&src);
    zfs(&["create", &format!("{src}/gone")]);
    zfs(&["create", &format!("{src}/gone/kid")]);
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    let certs = Certs::shared();
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let port = recv.port.to_string();
    send(&certs.sender_args(), &["-p", &port, &src, "127.0.0.1"]).assert_code(0);
    destroy_held(&format!("{src}/gone"), recv.port);
    zfs(&["create", &format!("{dst}/handmade")]);
    zfs(&["snapshot", "-r", &format!("{src}@s2")]);

    send(&certs.sender_args(), &["-p", &port, &src, "127.0.0.1"])
        .assert_code(0)
        .assert_stdout_has("orphaned on the receiver (source gone, or made there by hand): /gone, /handmade, /gone/kid")
        .assert_stdout_has("--delete-missing destroys those zfsync created");
    assert!(exists(&format!("{dst}/gone/kid")));

    // A sender whose list lacks its top dataset (wrong or hostile) gets no
    // judgement at all: otherwise the whole replica would look orphaned.
    let before = pool_state(&b.name);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(async {
        let opts = certs.client_options(recv.port, "no-top");
        let mut c = zfsync_common::client::Client::connect(&opts).await.unwrap();
        let r = c
            .clean_buffer(vec!["/a".into()], true, false)
            .await
            .unwrap();
        c.bye().await;
        r
    });
    assert!(
        report.orphans.is_empty() && report.deleted.is_empty(),
        "{report:?}"
    );
    assert_eq!(pool_state(&b.name), before);

    send(
        &certs.sender_args(),
        &["-p", &port, "--delete-missing", &src, "127.0.0.1"],
    )
    .assert_code(0)
    .assert_stdout_has("deleted on the receiver (--delete-missing): /gone");
    assert!(!exists(&format!("{dst}/gone")));
    assert!(
        exists(&format!("{dst}/handmade")),
        "a dataset zfsync did not create was destroyed"
    );
    assert_eq!(snapshot_guids(&dst), {
        let mut g = snapshot_guids(&src);
        g.retain(|k, _| !k.starts_with("/handmade"));
        g
    });
}

#[test]
fn a_receiver_with_keep_all_snapshots_keeps_everything() {
    let a = Pool::new("keep");
    let b = Pool::new("keep");
    let src = a.ds("src");
    let dst = b.ds("t");
    tree(&src);
    let lockdir = TempDir::new("lock");
    let recv = Receiver::start(
        &dst,
        &Certs::shared().receiver_args(),
        &["--keep-all-snapshots"],
    );
    for _ in 0..3 {
        cron(
            lockdir.path(),
            recv.port,
            &["-c", "S", "-s", "1"],
            &src,
            None,
        )
        .assert_code(0);
        next_second();
    }
    cron(
        lockdir.path(),
        recv.port,
        &["-c", "S", "-s", "1"],
        &src,
        None,
    )
    .assert_code(0);
    assert_eq!(of_class(&snapnames(&src), 'S').len(), 1);
    assert_eq!(of_class(&snapnames(&dst), 'S').len(), 4);
    assert_eq!(of_class(&snapnames(&format!("{dst}/a/b")), 'S').len(), 4);
}
