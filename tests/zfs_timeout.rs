//! A `zfs` call that never returns (a wedged zfs, a suspended pool) is
//! killed after `--zfs-timeout`: the dataset fails with an error that names
//! the flag, its lock is freed, and the next run completes. Shown with a
//! receiver whose `--zfs` hangs on `zfs rollback` (of a replica changed on
//! the receiver) or `zfs receive` while a flag file exists.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use zfsync_e2e::*;

/// A source replicated once (`@s1`, a file `first` holding `data`) by a
/// receiver with `--zfs-timeout 3` whose `zfs CALL` hangs while the flag
/// file `hang` exists (a `sleep 600` named `marker`).
/// (Fields drop in order: the receiver before its wrapper and pools.)
struct Wedged {
    _recv: Receiver,
    port: String,
    hang: PathBuf,
    marker: String,
    _dir: TempDir,
    pools: Pools,
}

impl Wedged {
    fn new(tag: &str, call: &str, first: &str, data: &[u8]) -> Wedged {
        let pools = Pools::new(tag, "replica");
        zfs(&["create", &pools.src]);
        write_file(&pools.src, first, data);
        zfs(&["snapshot", "-r", &format!("{}@s1", pools.src)]);

        let dir = TempDir::new(tag);
        let hang = dir.path().join("hang");
        let marker = format!("wedgedzfs{call}{}", std::process::id());
        let script = hanging_zfs(&dir, call, &hang, &marker);
        let recv = Receiver::start(
            &pools.dst,
            &Certs::shared().receiver_args(),
            &["--zfs", &script, "--zfs-timeout", "3"],
        );
        let port = recv.port.to_string();
        let w = Wedged {
            _recv: recv,
            port,
            hang,
            marker,
            _dir: dir,
            pools,
        };
        w.send().assert_code(0);
        w
    }

    fn send(&self) -> SendRun {
        let args = ["-p", &self.port, &self.pools.src, "127.0.0.1"];
        send(&Certs::shared().sender_args(), &args)
    }

    /// A new snapshot `@s2` with a file `name` holding `data`, then a run
    /// while the call hangs: it fails within a minute, saying the call was
    /// killed, and the replica stays at `@s1`.
    fn stuck_run(&self, name: &str, data: &[u8]) -> SendRun {
        write_file(&self.pools.src, name, data);
        zfs(&["snapshot", "-r", &format!("{}@s2", self.pools.src)]);
        std::fs::write(&self.hang, b"").unwrap();
        let started = Instant::now();
        let stuck = self.send();
        stuck
            .assert_code(1)
            .assert_stdout_has("did not finish within 3s and was killed");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{}",
            stuck.dump()
        );
        assert_eq!(snapshot_names(&self.pools.dst), ["s1"], "{}", stuck.dump());
        stuck
    }

    /// Someone mounts the replica on the receiver and writes into it: the
    /// next incremental is refused as modified, and the receiver rolls it
    /// back.
    fn modify_replica(&self) {
        let dst = &self.pools.dst;
        let mnt = self._dir.path().join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        zfs(&["set", &format!("mountpoint={}", mnt.display()), dst]);
        zfs(&["mount", dst]);
        wait_mounted(dst, true);
        std::fs::write(mnt.join("local.txt"), b"changed here\n").unwrap();
        zfs(&["unmount", dst]);
        wait_mounted(dst, false);
    }

    /// The call no longer hangs: the same receiver (the lock was freed)
    /// takes the next run, which completes.
    fn next_run_completes(&self) {
        std::fs::remove_file(&self.hang).unwrap();
        self.send()
            .assert_code(0)
            .assert_stdout_has("result: all datasets in sync");
        assert_eq!(
            snapshot_guids(&self.pools.dst),
            snapshot_guids(&self.pools.src)
        );
    }
}

#[test]
fn a_hanging_zfs_call_is_killed_and_the_next_run_completes() {
    let w = Wedged::new("zto", "rollback", "one.txt", b"one\n");
    // An incremental into a replica changed on the receiver needs a
    // rollback: it hangs, and is killed.
    w.modify_replica();
    let stuck = w.stuck_run("two.txt", b"two\n");
    stuck.assert_stdout_has("--zfs-timeout");
    // Killed, not left behind (a moment for the kill to land).
    wait_until_no_process(&w.marker, Duration::from_secs(5), "the hanging zfs");

    w.next_run_completes();
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
    let w = Wedged::new("zrw", "receive", "one.bin", &noise(64 << 10, 1));
    // Enough new data that the wedged receive's pipe fills up.
    w.stuck_run("two.bin", &noise(4 << 20, 2));

    w.next_run_completes();
    wait_until_no_process(&w.marker, Duration::ZERO, "the wedged zfs receive");
    record_figures(
        "zfs_timeout_receive",
        &[("faults", 1), ("completed", 1), ("lost", 0)],
    );
}

/// Waits until `zfs get mounted` says `mounted` (zfs-fuse mounts and
/// unmounts asynchronously).
fn wait_mounted(ds: &str, mounted: bool) {
    let want = if mounted { "yes" } else { "no" };
    for _ in 0..100 {
        if zfs(&["get", "-H", "-o", "value", "mounted", ds]).trim() == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{ds} is not mounted={want}");
}
