//! A `zfs` call that never returns (a wedged zfs, a suspended pool) is
//! killed after `--zfs-timeout`: the dataset fails with an error that names
//! the flag, its lock is freed, and the next run completes. Shown with a
//! receiver whose `--zfs` hangs on `zfs rollback` while a flag file exists.

use std::time::{Duration, Instant};

use zfsync_e2e::*;

#[test]
fn a_hanging_zfs_call_is_killed_and_the_next_run_completes() {
    let certs = Certs::shared();
    let a = Pool::new("zto");
    let b = Pool::new("zto");
    let src = a.ds("src");
    let dst = b.ds("replica");
    zfs(&["create", &src]);
    write_file(&src, "one.txt", b"one\n");
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);

    let dir = TempDir::new("zto");
    let hang = dir.path().join("hang");
    let marker = format!("wedgedzfscall{}", std::process::id());
    let script = dir.path().join("hanging-zfs");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\nif [ \"$1\" = rollback ] && [ -e '{hang}' ]; then\n  exec -a {marker} sleep 600\nfi\nexec {zfs} \"$@\"\n",
            hang = hang.display(),
            zfs = zfs_path(),
        ),
    )
    .unwrap();
    run("chmod", &["+x", &script.to_string_lossy()]);
    let recv = Receiver::start(
        &dst,
        &certs.receiver_args(),
        &["--zfs", &script.to_string_lossy(), "--zfs-timeout", "3"],
    );
    let port = recv.port.to_string();
    let args = ["-p", port.as_str(), src.as_str(), "127.0.0.1"];
    send(&certs.sender_args(), &args).assert_code(0);

    // An incremental needs a rollback first: it hangs, and is killed.
    write_file(&src, "two.txt", b"two\n");
    zfs(&["snapshot", "-r", &format!("{src}@s2")]);
    std::fs::write(&hang, b"").unwrap();
    let started = Instant::now();
    let stuck = send(&certs.sender_args(), &args);
    stuck
        .assert_code(1)
        .assert_stdout_has("did not finish within 3s and was killed")
        .assert_stdout_has("--zfs-timeout");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{}",
        stuck.dump()
    );
    // Killed, not left behind (a moment for the kill to land).
    let mut left = String::new();
    for _ in 0..50 {
        let out = std::process::Command::new("pgrep")
            .args(["-f", &marker])
            .output()
            .unwrap();
        left = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ps = std::process::Command::new("ps")
        .args([
            "-o",
            "pid,ppid,stat,args",
            "-p",
            if left.is_empty() { "1" } else { &left },
        ])
        .output()
        .unwrap();
    assert!(
        left.is_empty(),
        "the hanging zfs is still running: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
    assert_eq!(snapshot_names(&dst), ["s1"], "{}", stuck.dump());

    // The lock was freed: the same receiver takes the next run.
    std::fs::remove_file(&hang).unwrap();
    send(&certs.sender_args(), &args)
        .assert_code(0)
        .assert_stdout_has("result: all datasets in sync");
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));
    record_figures(
        "zfs_timeout",
        &[("faults", 1), ("completed", 1), ("lost", 0)],
    );
}

/// A `zfs receive` that stops taking its input (a wedged zfs, a suspended
/// pool) is ended after `--zfs-timeout`: nothing is committed, the dataset's
/// lock is freed, and the next run completes.
#[test]
fn a_wedged_zfs_receive_is_ended_and_the_next_run_completes() {
    let certs = Certs::shared();
    let a = Pool::new("zrw");
    let b = Pool::new("zrw");
    let src = a.ds("src");
    let dst = b.ds("replica");
    zfs(&["create", &src]);
    write_file(&src, "one.bin", &noise(64 << 10, 1));
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);

    let dir = TempDir::new("zrw");
    let hang = dir.path().join("hang");
    let marker = format!("wedgedzfsreceive{}", std::process::id());
    let script = dir.path().join("wedged-zfs");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\nif [ \"$1\" = receive ] && [ -e '{hang}' ]; then\n  exec -a {marker} sleep 600\nfi\nexec {zfs} \"$@\"\n",
            hang = hang.display(),
            zfs = zfs_path(),
        ),
    )
    .unwrap();
    run("chmod", &["+x", &script.to_string_lossy()]);
    let recv = Receiver::start(
        &dst,
        &certs.receiver_args(),
        &["--zfs", &script.to_string_lossy(), "--zfs-timeout", "3"],
    );
    let port = recv.port.to_string();
    let args = ["-p", port.as_str(), src.as_str(), "127.0.0.1"];
    send(&certs.sender_args(), &args).assert_code(0);

    // Enough new data that the wedged receive's pipe fills up.
    write_file(&src, "two.bin", &noise(4 << 20, 2));
    zfs(&["snapshot", "-r", &format!("{src}@s2")]);
    std::fs::write(&hang, b"").unwrap();
    let started = Instant::now();
    let stuck = send(&certs.sender_args(), &args);
    stuck
        .assert_code(1)
        .assert_stdout_has("did not finish within 3s and was killed");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{}",
        stuck.dump()
    );
    assert_eq!(snapshot_names(&dst), ["s1"], "{}", stuck.dump());

    std::fs::remove_file(&hang).unwrap();
    send(&certs.sender_args(), &args)
        .assert_code(0)
        .assert_stdout_has("result: all datasets in sync");
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));
    let left = std::process::Command::new("pgrep")
        .args(["-f", &marker])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "the wedged zfs receive is still running"
    );
    record_figures(
        "zfs_timeout_receive",
        &[("faults", 1), ("completed", 1), ("lost", 0)],
    );
}
