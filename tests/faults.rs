//! Hardening, second part: faults. Each is injected while a stream is
//! flowing (the sender's `zfs send` is slowed down so there is a "while"),
//! then a normal run must complete, and the target must hold only whole
//! snapshots with the source's GUIDs. Prints one line of figures.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zfsync_e2e::*;

fn zfs_bin() -> &'static str {
    ["/usr/sbin/zfs", "/sbin/zfs", "/usr/local/sbin/zfs"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("zfs")
}

fn spawn_send(port: u16, zfs: &str, src: &str) -> Child {
    Command::new(bin("zfsync-send"))
        .args(Certs::shared().sender_args())
        .args([
            "-p",
            &port.to_string(),
            "-t",
            "2",
            "--zfs",
            zfs,
            src,
            "127.0.0.1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// How many `zfs receive` of the big dataset (in place or buffered) the
/// receiver has started.
fn receives_started(recv: &Receiver) -> usize {
    recv.log()
        .lines()
        .filter(|l| l.contains("spawning argv=") && l.contains("receive"))
        .filter(|l| l.contains("/big") || l.contains("2F626967"))
        .count()
}

/// Waits until the big dataset's `n`-th receive runs, then a little more:
/// its slowed stream takes about six seconds.
fn wait_receiving(recv: &Receiver, n: usize) {
    let start = Instant::now();
    while receives_started(recv) < n {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no receive of big started:\n{}",
            recv.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(700));
}

/// Waits for orphaned `zfs receive` processes into `pool` to end.
fn wait_no_receive(pool: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let out = Command::new("pgrep")
            .args(["-f", &format!("zfs receive .*{pool}")])
            .output()
            .unwrap();
        if out.stdout.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("a zfs receive into {pool} did not end");
}

/// Every snapshot on the target is one of the source's, with its GUID:
/// whole or absent, never partial or foreign. Returns how many.
#[track_caller]
fn assert_whole(src: &str, dst: &str) -> usize {
    if !exists(dst) {
        return 0;
    }
    let s = snapshot_guids(src);
    let d = snapshot_guids(dst);
    for (k, v) in &d {
        assert_eq!(s.get(k), Some(v), "{dst}: {k} is not the source's");
    }
    // The big dataset's data at whatever snapshot it is now, byte for byte.
    let big = format!("{dst}/big");
    if exists(&big) {
        if let Some(newest) = snapshot_names(&big).last() {
            assert_eq!(
                files_at(&format!("{src}/big@{newest}")),
                files_at(&format!("{big}@{newest}")),
                "big differs at @{newest} after a fault"
            );
        }
    }
    d.len()
}

#[derive(Default)]
struct Figures {
    faults: usize,
    completed: usize,
    /// Snapshots the target had before a fault and not after it.
    lost: usize,
}

/// Snapshots the target holds now (before a fault).
fn acknowledged(dst: &str) -> BTreeMap<String, String> {
    if exists(dst) {
        snapshot_guids(dst)
    } else {
        BTreeMap::new()
    }
}

/// How many of `before` the target lost (a replica that was removed on
/// purpose to force a full stream is not counted).
fn lost(dst: &str, before: &BTreeMap<String, String>, skip: &str) -> usize {
    let now = acknowledged(dst);
    before
        .iter()
        .filter(|(k, _)| !k.starts_with(skip))
        .filter(|(k, v)| now.get(*k) != Some(*v))
        .count()
}

fn new_round(src: &str, round: u64) {
    write_file(&format!("{src}/big"), "data", &noise(6 << 20, round));
    write_file(src, "round", round.to_string().as_bytes());
    zfs(&["snapshot", "-r", &format!("{src}@r{round}")]);
}

#[test]
fn faults_mid_stream_lose_nothing_and_the_next_run_completes() {
    let a = Pool::new("fault");
    let b = Pool::new("fault");
    let src = a.ds("src");
    let dst = b.ds("t");
    zfs(&["create", &b.ds("outside")]);
    for ds in [src.clone(), format!("{src}/a"), format!("{src}/big")] {
        zfs(&["create", &ds]);
        write_file(&ds, "f", ds.as_bytes());
    }
    let outside = pool_state(&b.ds("outside"));
    let tmp = TempDir::new("slow");
    let slow = slow_zfs(&tmp);
    let certs = Certs::shared();
    let mut recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let port = recv.port;
    let mut fig = Figures::default();
    let normal_run = |fig: &mut Figures, round: u64| {
        send(
            &certs.sender_args(),
            &["-p", &port.to_string(), &src, "127.0.0.1"],
        )
        .assert_code(0);
        assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));
        // And the data itself, byte for byte, at the newest snapshot.
        let snap = format!("r{round}");
        assert_eq!(
            files_at(&format!("{src}/big@{snap}")),
            files_at(&format!("{dst}/big@{snap}")),
            "big differs at @{snap}"
        );
        fig.completed += 1;
    };

    for round in 1..=4u64 {
        // 1. SIGKILL of the sender mid-stream.
        new_round(&src, round * 10 + 1);
        let before = acknowledged(&dst);
        let n = receives_started(&recv);
        let mut sender = spawn_send(port, &slow, &src);
        wait_receiving(&recv, n + 1);
        let cuts = recv.log().matches("stream cut").count();
        sender.kill().unwrap();
        let _ = sender.wait();
        recv.wait_for_log("stream cut", cuts + 1, Duration::from_secs(60));
        wait_no_receive(&b.name);
        assert_whole(&src, &dst);
        fig.lost += lost(&dst, &before, "/big@");
        fig.faults += 1;
        normal_run(&mut fig, round * 10 + 1);

        // 2. SIGKILL of the receiver mid-stream; it is started again. In
        // the first round during a full stream (the replica of big is
        // removed first), later during incrementals.
        if round == 1 {
            zfs(&["destroy", "-r", &format!("{dst}/big")]);
        }
        new_round(&src, round * 10 + 2);
        let before = acknowledged(&dst);
        let n = receives_started(&recv);
        let mut sender = spawn_send(port, &slow, &src);
        wait_receiving(&recv, n + 1);
        recv.kill();
        let _ = sender.wait();
        wait_no_receive(&b.name);
        assert_whole(&src, &dst);
        fig.lost += lost(&dst, &before, "/big@");
        fig.faults += 1;
        recv = Receiver::start_on(&dst, &certs.receiver_args(), &[], port);
        normal_run(&mut fig, round * 10 + 2);

        // 3. SIGKILL of the receiver's `zfs receive` child (in the second
        // round during a full stream).
        if round == 2 {
            zfs(&["destroy", "-r", &format!("{dst}/big")]);
        }
        new_round(&src, round * 10 + 3);
        let before = acknowledged(&dst);
        let n = receives_started(&recv);
        let mut sender = spawn_send(port, &slow, &src);
        wait_receiving(&recv, n + 1);
        let out = Command::new("pgrep")
            .args(["-P", &recv.pid().to_string(), "-f", "receive"])
            .output()
            .unwrap();
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        let _ = sender.wait();
        wait_no_receive(&b.name);
        assert_whole(&src, &dst);
        fig.lost += lost(&dst, &before, "/big@");
        fig.faults += 1;
        normal_run(&mut fig, round * 10 + 3);

        // 4. Two senders at once: serialized or told "busy", never mixed.
        new_round(&src, round * 10 + 4);
        let before = acknowledged(&dst);
        let mut one = spawn_send(port, &slow, &src);
        let mut two = spawn_send(port, zfs_bin(), &src);
        let _ = one.wait();
        let _ = two.wait();
        assert_whole(&src, &dst);
        fig.lost += lost(&dst, &before, "/big@");
        fig.faults += 1;
        normal_run(&mut fig, round * 10 + 4);
    }
    assert_eq!(
        pool_state(&b.ds("outside")),
        outside,
        "written outside the target"
    );
    println!(
        "faults: {} injected mid-stream, {} normal runs completed afterwards, {} snapshots lost; 0 writes outside the target",
        fig.faults, fig.completed, fig.lost
    );
    record_figures(
        "faults-mid-stream",
        &[
            ("faults", fig.faults as u64),
            ("completed", fig.completed as u64),
            ("lost", fig.lost as u64),
            ("outside_writes", 0),
        ],
    );
    assert_eq!(fig.lost, 0);
    assert!(fig.faults >= 16);
}

#[test]
fn a_full_target_pool_fails_clearly_and_keeps_the_last_good_snapshot() {
    let a = Pool::new("nospace");
    let b = Pool::new_sized("nospace", 64 << 20);
    let src = a.ds("src");
    let dst = b.ds("t");
    zfs(&["create", &src]);
    write_file(&src, "small", b"small");
    zfs(&["snapshot", &format!("{src}@s1")]);
    let certs = Certs::shared();
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let port = recv.port.to_string();
    send(&certs.sender_args(), &["-p", &port, &src, "127.0.0.1"]).assert_code(0);
    let src_before: BTreeMap<String, String> = snapshot_guids(&src);
    // Far more than the 64 MiB pool holds.
    for i in 0..4 {
        write_file(&src, &format!("big{i}"), &noise(30 << 20, 100 + i));
    }
    zfs(&["snapshot", &format!("{src}@s2")]);
    let run = send(&certs.sender_args(), &["-p", &port, &src, "127.0.0.1"]);
    run.assert_code(1);
    assert!(
        run.stdout.contains("space") || run.stdout.contains("quota"),
        "no clear error:\n{}",
        run.dump()
    );
    wait_no_receive(&b.name);
    let got = snapshot_guids(&dst);
    assert_eq!(
        got.get("@s1"),
        src_before.get("@s1"),
        "the last good snapshot is gone"
    );
    assert!(!got.contains_key("@s2"));
    // The source is untouched.
    assert!(snapshot_guids(&src).contains_key("@s2"));
    assert_eq!(snapshot_guids(&src).get("@s1"), src_before.get("@s1"));
    record_figures("faults-no-space", &[("faults", 1), ("lost", 0)]);
}

#[test]
fn a_busy_rename_is_retried_and_the_buffer_survives_a_receiver_restart() {
    let a = Pool::new("busyren");
    let b = Pool::new("busyren");
    let src = a.ds("src");
    let dst = b.ds("t");
    for ds in [src.clone(), format!("{src}/a"), format!("{src}/a/b")] {
        zfs(&["create", &ds]);
    }
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    // A receiver whose `zfs rename` says "dataset is busy" three times.
    let dir = TempDir::new("busyzfs");
    let counter = dir.path().join("count");
    let script = dir.path().join("zfs");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$1\" = rename ]; then\n  n=$(cat '{c}' 2>/dev/null || echo 0)\n  if [ \"$n\" -lt 3 ]; then echo $((n+1)) > '{c}'; echo \"cannot rename '$2': dataset is busy\" >&2; exit 1; fi\nfi\nexec {zfs} \"$@\"\n",
            c = counter.display(),
            zfs = zfs_bin()
        ),
    )
    .unwrap();
    run("chmod", &["+x", &script.to_string_lossy()]);
    let certs = Certs::shared();
    let mut recv = Receiver::start(
        &dst,
        &certs.receiver_args(),
        &["--zfs", &script.to_string_lossy()],
    );
    let port = recv.port;
    // Datasets land in the buffer; then the receiver dies before placing them.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let opts = certs.client_options(port, "buffer");
        let mut c = zfsync_common::client::Client::connect(&opts).await.unwrap();
        let ds = format!("{src}/a/b");
        let snaps = snapshots_of(&ds);
        c.sync(&zfsync_common::protocol::SyncRequest::new(
            &zfsync_common::naming::RelPath::new("/a/b").unwrap(),
            &snaps,
        ))
        .await
        .unwrap();
        c.begin_stream(None, &snaps[0]).await.unwrap();
        let mut child = tokio::process::Command::new(zfs_bin())
            .args(["send", &format!("{ds}@s1")])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let n = c.pump(&mut out, |_| {}).await.unwrap();
        child.wait().await.unwrap();
        c.end_stream(n).await.unwrap();
        c.finish().await.unwrap();
    });
    assert!(exists(&format!("{dst}.zfsyncbuffer/2F612F62")));
    recv.kill();
    let recv = Receiver::start_on(
        &dst,
        &certs.receiver_args(),
        &["--zfs", &script.to_string_lossy()],
        port,
    );
    // The next run places it; the busy renames are retried.
    send(
        &certs.sender_args(),
        &["-p", &port.to_string(), "-t", "1", &src, "127.0.0.1"],
    )
    .assert_code(0);
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));
    assert!(
        recv.log()
            .contains("dataset is busy; unmounting and retrying"),
        "{}",
        recv.log()
    );
    assert!(!exists(&format!("{dst}.zfsyncbuffer")));
    record_figures(
        "faults-busy-restart",
        &[("faults", 2), ("completed", 1), ("lost", 0)],
    );
}
