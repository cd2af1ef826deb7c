//! The OpenZFS tier: what zfsync does with a real OpenZFS kernel module.
//!
//! `make test-openzfs` (scripts/test-openzfs.sh) boots a Debian VM with
//! OpenZFS under qemu and runs these tests in two places:
//! - `vm_*` inside the VM (this test binary and the zfsync binaries are
//!   copied in): sender and receiver both on OpenZFS pools;
//! - `cross_*` on the host, against the VM through forwarded ports:
//!   zfs-fuse -> OpenZFS and OpenZFS -> zfs-fuse.
//!
//! `cargo test --workspace` (zfs-fuse only) lists them as ignored; in their
//! tier they fail, never skip, when OpenZFS or the VM is missing.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use zfsync_e2e::*;

fn sync(certs: &Certs, port: u16, src: &str, extra: &[&str]) -> SendRun {
    let port = port.to_string();
    let mut args = vec!["-v", "-p", &port];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[src, "127.0.0.1"]);
    send(&certs.sender_args(), &args)
}

fn holds(snap: &str) -> Vec<String> {
    zfs(&["holds", "-H", snap])
        .lines()
        .filter_map(|l| l.split('\t').nth(1).map(str::to_string))
        .collect()
}

fn prop(ds: &str, p: &str) -> String {
    zfs(&["get", "-H", "-o", "value", p, ds]).trim().to_string()
}

fn bookmarks(ds: &str) -> Vec<String> {
    zfs(&["list", "-H", "-t", "bookmark", "-o", "name", "-d", "1", ds])
        .lines()
        .map(str::to_string)
        .collect()
}

fn dd(file: &Path, mib: u32) {
    run(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", file.display()),
            "bs=1M",
            &format!("count={mib}"),
            "status=none",
        ],
    );
}

/// `key=(\d+)` in a log line that contains `needle`.
fn logged_number(log: &str, needle: &str, key: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains(needle))?;
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

#[test]
#[ignore = "needs OpenZFS: make test-openzfs"]
fn vm_capabilities_compressed_sends_holds_and_bookmarks() {
    let version = ensure_openzfs();
    let certs = Certs::shared();
    let a = Pool::new("ozcap");
    let b = Pool::new("ozcap");
    let src = a.ds("src");
    let dst = b.ds("rep");
    zfs(&["create", &src]);
    zfs(&["create", "-o", "compression=lz4", &format!("{src}/text")]);
    zfs(&["create", &format!("{src}/text/child")]);
    write_file(
        &format!("{src}/text"),
        "t.txt",
        &b"compressible ".repeat(200_000),
    );
    write_file(&format!("{src}/text/child"), "c.bin", &noise(100_000, 1));
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let run = sync(certs, recv.port, &src, &[]);
    run.assert_code(0)
        .assert_stderr_has("zfs capabilities: zfs-2.")
        .assert_stderr_has("receive_s")
        .assert_stderr_has(
            "sending with send -L -e -c, raw sends of encrypted datasets, resumable, bookmarks",
        )
        .assert_stderr_has(&format!("send -L -e -c {src}/text@s1"));
    eprintln!("OpenZFS: {version}");
    assert!(
        recv.log().contains("zfs capabilities: zfs-2."),
        "{}",
        recv.log()
    );
    assert_eq!(snapshot_guids(&src), snapshot_guids(&dst));
    assert_same_files(&format!("{src}/text"), &format!("{dst}/text"), "s1");

    // The receiver holds what it received last; the sender holds and
    // bookmarks what the receiver confirmed.
    let tag = format!("zfsync_127.0.0.1_{}", recv.port);
    for rel in ["", "/text", "/text/child"] {
        assert_eq!(holds(&format!("{dst}{rel}@s1")), ["zfsync_recv"], "{rel}");
        assert_eq!(
            holds(&format!("{src}{rel}@s1")),
            std::slice::from_ref(&tag),
            "{rel}"
        );
        assert_eq!(
            bookmarks(&format!("{src}{rel}")),
            [format!("{src}{rel}#{tag}:s1")],
            "{rel}"
        );
    }

    // The next confirmation moves every hold and bookmark.
    write_file(&format!("{src}/text"), "u.txt", b"more\n");
    zfs(&["snapshot", "-r", &format!("{src}@s2")]);
    sync(certs, recv.port, &src, &[])
        .assert_code(0)
        .assert_stderr_has(&format!("send -L -e -c -I {src}/text@s1 {src}/text@s2"));
    assert_eq!(snapshot_guids(&src), snapshot_guids(&dst));
    for rel in ["", "/text", "/text/child"] {
        assert_eq!(holds(&format!("{dst}{rel}@s2")), ["zfsync_recv"], "{rel}");
        assert!(holds(&format!("{dst}{rel}@s1")).is_empty(), "{rel}");
        assert_eq!(
            holds(&format!("{src}{rel}@s2")),
            std::slice::from_ref(&tag),
            "{rel}"
        );
        assert!(holds(&format!("{src}{rel}@s1")).is_empty(), "{rel}");
        assert_eq!(
            bookmarks(&format!("{src}{rel}")),
            [format!("{src}{rel}#{tag}:s2")],
            "{rel}"
        );
    }

    // zfsync destroys trees it holds snapshots in (--full replacement):
    // its own holds are released first.
    let diverged = format!("{dst}/text");
    zfs(&["snapshot", &format!("{diverged}@mine")]);
    sync(certs, recv.port, &src, &["--full"]).assert_code(0);
    assert_eq!(snapshot_guids(&src), snapshot_guids(&dst));
    assert_eq!(holds(&format!("{diverged}@s2")), ["zfsync_recv"]);
}

#[test]
#[ignore = "needs OpenZFS: make test-openzfs"]
fn vm_a_cut_transfer_resumes_where_it_stopped() {
    ensure_openzfs();
    let certs = Certs::shared();
    let a = Pool::new_sized("ozres", 900 << 20);
    let b = Pool::new_sized("ozres", 900 << 20);
    let src = a.ds("big");
    let dst = b.ds("rep");
    zfs(&["create", "-o", "compression=off", &src]);
    dd(&mountpoint(&src).join("blob"), 200);
    zfs(&["snapshot", &format!("{src}@s1")]);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let dir = TempDir::new("ozres");
    let progress = dir.path().join("progress");

    // Cuts a throttled run once `mib` MiB went out; waits for the token.
    let cut_at = |mib: u64| {
        let _ = std::fs::remove_file(&progress);
        let throttled = throttled_zfs(&dir, 1 << 20, &progress);
        let port = recv.port.to_string();
        let mut child = Command::new(bin("zfsync-send"))
            .args(certs.sender_args())
            .args(["-p", &port, "--zfs", &throttled, &src, "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start zfsync-send");
        let t0 = Instant::now();
        loop {
            let n: u64 = std::fs::read_to_string(&progress)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            if n >= mib {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "the stream did not reach {mib} MiB"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        child.kill().expect("kill the sender");
        let _ = child.wait();
        let t0 = Instant::now();
        while prop(&dst, "receive_resume_token") == "-" {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "no resume token after the cut:\n{}",
                recv.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    };

    // A full stream of 200 MiB, cut at about half.
    cut_at(100);
    assert!(
        !exists(&format!("{dst}@s1")),
        "nothing committed at the cut"
    );
    let run = sync(certs, recv.port, &src, &[]);
    run.assert_code(0)
        .assert_stderr_has("resuming a cut transfer");
    let done = logged_number(&run.stderr, "resuming a cut transfer", "done").unwrap_or(0);
    let sent = logged_number(&run.stderr, "resumed transfer complete", "bytes").unwrap_or(u64::MAX);
    let total = 200u64 << 20;
    eprintln!(
        "openzfs resume: a 200 MiB full stream cut after {} MiB: the next run sent {} MiB (remaining {} MiB)",
        done >> 20,
        sent >> 20,
        total.saturating_sub(done) >> 20
    );
    assert!(
        done >= 40 << 20,
        "too little was kept at the cut: {done}\n{}",
        run.dump()
    );
    assert!(
        sent <= total.saturating_sub(done) + (16 << 20),
        "the resumed run sent {sent} bytes, more than the remaining {} plus 16 MiB\n{}",
        total - done,
        run.dump()
    );
    assert_eq!(snapshot_guids(&src), snapshot_guids(&dst));
    assert_eq!(prop(&dst, "receive_resume_token"), "-");

    // An incremental cut, whose snapshot the sender then loses: the token
    // is stale, the receiver discards the partial state, the dataset is
    // planned again and arrives.
    dd(&mountpoint(&src).join("blob2"), 100);
    zfs(&["snapshot", &format!("{src}@s2")]);
    cut_at(40);
    // The killed sender's `zfs send` may hold the snapshot for a moment.
    let t0 = Instant::now();
    while !zfs_try(&["destroy", &format!("{src}@s2")]).0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "cannot destroy @s2");
        std::thread::sleep(Duration::from_millis(500));
    }
    write_file(&src, "after.txt", b"after the cut\n");
    zfs(&["snapshot", &format!("{src}@s3")]);
    let run = sync(certs, recv.port, &src, &[]);
    run.assert_code(0)
        .assert_stderr_has("cannot resume the cut transfer");
    assert!(
        recv.log().contains("discarding the partial receive"),
        "{}",
        recv.log()
    );
    assert_eq!(snapshot_guids(&src), snapshot_guids(&dst));
    assert_same_files(&src, &dst, "s3");
}

#[test]
#[ignore = "needs OpenZFS: make test-openzfs"]
fn vm_a_bookmark_is_the_base_when_the_snapshot_was_pruned() {
    ensure_openzfs();
    let certs = Certs::shared();
    let a = Pool::new("ozbm");
    let b = Pool::new("ozbm");
    let src = a.ds("src");
    let dst = b.ds("rep");
    zfs(&["create", &src]);
    write_file(&src, "a.txt", b"a\n");
    zfs(&["snapshot", &format!("{src}@a")]);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    sync(certs, recv.port, &src, &[]).assert_code(0);
    // Someone prunes the confirmed base on the sender (after releasing
    // zfsync's hold): only the bookmark is left in common.
    let tag = format!("zfsync_127.0.0.1_{}", recv.port);
    zfs(&["release", &tag, &format!("{src}@a")]);
    write_file(&src, "b.txt", b"b\n");
    zfs(&["snapshot", &format!("{src}@b")]);
    write_file(&src, "c.txt", b"c\n");
    zfs(&["snapshot", &format!("{src}@c")]);
    zfs(&["destroy", &format!("{src}@a")]);
    let run = sync(certs, recv.port, &src, &[]);
    run.assert_code(0)
        .assert_stderr_has(&format!("-i {src}#{tag}:a {src}@b"))
        .assert_stderr_has(&format!("-I {src}@b {src}@c"));
    let s = snapshot_guids(&src);
    let d = snapshot_guids(&dst);
    assert_eq!(d.get("@b"), s.get("@b"));
    assert_eq!(d.get("@c"), s.get("@c"));
    assert_same_files(&src, &dst, "c");
}

#[test]
#[ignore = "needs OpenZFS: make test-openzfs"]
fn vm_an_encrypted_dataset_travels_raw_and_stays_locked() {
    ensure_openzfs();
    let certs = Certs::shared();
    let a = Pool::new("ozenc");
    let b = Pool::new("ozenc");
    let src = a.ds("src");
    let dst = b.ds("rep");
    let dir = TempDir::new("ozenc");
    let key = dir.path().join("key");
    std::fs::write(&key, "correct horse battery staple\n").expect("key");
    let secret = format!("{src}/secret");
    zfs(&["create", &src]);
    zfs(&[
        "create",
        "-o",
        "encryption=on",
        "-o",
        "keyformat=passphrase",
        "-o",
        &format!("keylocation=file://{}", key.display()),
        &secret,
    ]);
    write_file(&secret, "s.txt", b"the secret\n");
    zfs(&["snapshot", "-r", &format!("{src}@e1")]);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    sync(certs, recv.port, &src, &[])
        .assert_code(0)
        .assert_stderr_has(&format!("send -w {secret}@e1"));
    let replica = format!("{dst}/secret");
    assert_ne!(prop(&replica, "encryption"), "off");
    assert_eq!(
        prop(&replica, "keystatus"),
        "unavailable",
        "the receiver never has the key"
    );
    // Incrementals travel raw too (a -w -I package).
    write_file(&secret, "t.txt", b"more secret\n");
    zfs(&["snapshot", "-r", &format!("{src}@e2")]);
    zfs(&["snapshot", "-r", &format!("{src}@e3")]);
    sync(certs, recv.port, &src, &[])
        .assert_code(0)
        .assert_stderr_has(&format!("send -w -I {secret}@e1 {secret}@e3"));
    assert_eq!(snapshot_guids(&src), snapshot_guids(&dst));
    assert_eq!(prop(&replica, "keystatus"), "unavailable");
}

#[test]
#[ignore = "needs OpenZFS: make test-openzfs"]
fn vm_receive_options_apply_to_every_replica() {
    ensure_openzfs();
    let certs = Certs::shared();
    let a = Pool::new("ozopt");
    let b = Pool::new("ozopt");
    let src = a.ds("src");
    let dst = b.ds("rep");
    zfs(&["create", &src]);
    zfs(&["create", &format!("{src}/a")]);
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    let recv = Receiver::start(
        &dst,
        &certs.receiver_args(),
        &[
            "--recv-option",
            "-o readonly=on",
            "--recv-option",
            "-o com.example:origin=zfsync-test",
            "--recv-option",
            "-x atime",
        ],
    );
    sync(certs, recv.port, &src, &[]).assert_code(0);
    for ds in [dst.clone(), format!("{dst}/a")] {
        assert_eq!(prop(&ds, "readonly"), "on", "{ds}");
        assert_eq!(prop(&ds, "com.example:origin"), "zfsync-test", "{ds}");
        // The marks travel in the first receive (-o), with the admin's.
        assert_eq!(prop(&ds, "canmount"), "noauto", "{ds}");
        assert_eq!(prop(&ds, "zfsync:replica"), "yes", "{ds}");
    }
    assert!(
        recv.log()
            .contains("-o canmount=noauto -o zfsync:replica=yes"),
        "{}",
        recv.log()
    );
    assert!(recv.log().contains("-o readonly=on"), "{}", recv.log());
    assert_eq!(snapshot_guids(&src), snapshot_guids(&dst));
}

/// zfs-fuse has no `zfs receive -o`: the receiver says so at start.
#[test]
fn recv_options_are_refused_where_zfs_lacks_them() {
    ensure_zfs();
    if zfs_try(&["version"]).0 {
        return; // OpenZFS has them (tested by vm_receive_options_...)
    }
    let certs = Certs::shared();
    let a = Pool::new("ozno");
    let out = Command::new(bin("zfsync-recv"))
        .args(["-p", "0", "-l", "127.0.0.1"])
        .args(certs.receiver_args())
        .args(["--recv-option", "-o readonly=on", &a.ds("rep")])
        .output()
        .expect("run zfsync-recv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr
            .contains("has no `zfs receive -o`; remove the option, or run the receiver on OpenZFS"),
        "{stderr}"
    );
    let bad = Command::new(bin("zfsync-recv"))
        .args(certs.receiver_args())
        .args(["--recv-option", "readonly=on", &a.ds("rep")])
        .output()
        .expect("run zfsync-recv");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("'-o PROPERTY=VALUE' or '-x PROPERTY'"));
}

/// Snapshot GUIDs under `root` in the VM, keyed like [`snapshot_guids`].
fn vm_snapshot_guids(vm: &Vm, root: &str) -> BTreeMap<String, String> {
    vm.sh(&format!(
        "zfs get -H -p -r -t snapshot -o name,value guid {root}"
    ))
    .lines()
    .filter_map(|l| {
        let (name, guid) = l.split_once('\t')?;
        Some((
            name.strip_prefix(root)?.to_string(),
            guid.trim().to_string(),
        ))
    })
    .collect()
}

/// Copies the test certificates into the VM; returns their directory there.
fn vm_certs(vm: &Vm, certs: &Certs) -> String {
    let dir = "/tmp/zfsync-certs";
    for f in [
        "ca.pem",
        "receiver.pem",
        "receiver.key",
        "sender.pem",
        "sender.key",
    ] {
        vm.put(Path::new(&certs.file(f)), &format!("{dir}/{f}"));
    }
    dir.to_string()
}

/// A pool in the VM, destroyed at drop.
struct VmPool<'a> {
    vm: &'a Vm,
    name: String,
}

impl<'a> VmPool<'a> {
    fn new(vm: &'a Vm, tag: &str) -> VmPool<'a> {
        let name = format!("zx{tag}{}", std::process::id());
        vm.sh(&format!(
            "zpool destroy {name} 2>/dev/null; truncate -s 256M /var/tmp/{name}.img && zpool create -f {name} /var/tmp/{name}.img"
        ));
        VmPool { vm, name }
    }
}

impl Drop for VmPool<'_> {
    fn drop(&mut self) {
        let _ = self.vm.sh_try(&format!(
            "zpool destroy -f {0}; rm -f /var/tmp/{0}.img",
            self.name
        ));
    }
}

#[test]
#[ignore = "needs the OpenZFS VM: make test-openzfs"]
fn cross_zfs_fuse_sender_to_openzfs_receiver() {
    let vm = Vm::from_env();
    let certs = Certs::shared();
    let dir = vm_certs(&vm, certs);
    let pool = VmPool::new(&vm, "fromfuse");
    let dst = format!("{}/rep", pool.name);
    let recv_bin = bin("zfsync-recv");
    let mut recv = vm.spawn(&format!(
        "exec {} -p 9001 -l 0.0.0.0 --ca {dir}/ca.pem --cert {dir}/receiver.pem --key {dir}/receiver.key {dst} 2>/tmp/recv-fromfuse.log",
        recv_bin.display()
    ));
    let t0 = Instant::now();
    while !vm.sh_try("ss -ltn | grep -q ':9001 '").0 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the receiver in the VM did not start: {}",
            vm.sh("cat /tmp/recv-fromfuse.log")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let a = Pool::new("xfuse");
    let src = a.ds("src");
    zfs(&["create", &src]);
    zfs(&["create", &format!("{src}/a")]);
    write_file(&format!("{src}/a"), "f.bin", &noise(200_000, 7));
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    let port = (vm.port_base + 1).to_string();
    let args = [
        "-v",
        "-p",
        &port,
        "--server-name",
        "localhost",
        &src,
        "127.0.0.1",
    ];
    let run = send(&certs.sender_args(), &args);
    run.assert_code(0)
        .assert_stderr_has("sending with plain streams");
    assert_eq!(snapshot_guids(&src), vm_snapshot_guids(&vm, &dst));
    write_file(&format!("{src}/a"), "g.bin", &noise(1000, 8));
    zfs(&["snapshot", "-r", &format!("{src}@s2")]);
    send(&certs.sender_args(), &args).assert_code(0);
    assert_eq!(snapshot_guids(&src), vm_snapshot_guids(&vm, &dst));
    // The OpenZFS receiver holds what it received, zfs-fuse or not.
    assert!(vm
        .sh(&format!("zfs holds -H {dst}/a@s2"))
        .contains("zfsync_recv"));
    let log = vm.sh("cat /tmp/recv-fromfuse.log");
    let _ = recv.kill();
    let _ = recv.wait();
    let _ = vm.sh_try("pkill -f 'zfsync-recv -p 9001'; sleep 1");
    assert!(log.contains("zfs capabilities: zfs-2."), "{log}");
}

#[test]
#[ignore = "needs the OpenZFS VM: make test-openzfs"]
fn cross_openzfs_sender_to_zfs_fuse_receiver() {
    let vm = Vm::from_env();
    let certs = Certs::shared();
    let dir = vm_certs(&vm, certs);
    let b = Pool::new("xback");
    let dst = b.ds("rep");
    // The host's loopback is 10.0.2.2 inside the VM (qemu user network).
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    // ZPL version 4 (what zfs-fuse has): OpenZFS's default, 5, brings
    // system attributes (the sa_spill stream feature) zfs-fuse cannot take.
    let pool = VmPool::new(&vm, "tofuse");
    let src = format!("{}/src", pool.name);
    vm.sh(&format!(
        "zfs create -o version=4 {src} && zfs create -o version=4 {src}/plain && head -c 300000 /dev/urandom > /{src}/plain/f.bin \
         && zfs create -o version=5 {src}/modern \
         && echo 'correct horse battery staple' > /tmp/xkey \
         && zfs create -o encryption=on -o keyformat=passphrase -o keylocation=file:///tmp/xkey {src}/secret \
         && zfs snapshot -r {src}@s1"
    ));
    let send_bin = bin("zfsync-send");
    let (ok, out) = vm.sh_try(&format!(
        "{} -v --ca {dir}/ca.pem --cert {dir}/sender.pem --key {dir}/sender.key -p {} --server-name localhost {src} 10.0.2.2; echo exit=$?",
        send_bin.display(),
        recv.port
    ));
    assert!(ok, "{out}");
    // Plain datasets fall back to plain streams; the encrypted one is
    // refused with the feature named, never sent decrypted.
    assert!(out.contains("exit=1"), "{out}");
    assert!(out.contains("sending with plain streams"), "{out}");
    assert!(
        out.contains("cannot receive raw streams (zfs send -w); zfsync never sends decrypted data"),
        "{out}"
    );
    // A feature zfs-fuse lacks: the error names it.
    assert!(
        out.contains("the stream uses sa_spill (system attributes: a ZPL version 5 file system), which this receiver's zfs (zfs-fuse"),
        "{out}"
    );
    let theirs = vm_snapshot_guids(&vm, &src);
    let ours = snapshot_guids(&dst);
    for k in ["@s1", "/plain@s1"] {
        assert_eq!(ours.get(k), theirs.get(k), "{k}: {out}");
    }
    assert!(!ours.contains_key("/secret@s1"), "{ours:?}");
    assert!(!ours.contains_key("/modern@s1"), "{ours:?}");
    assert!(!exists(&format!("{dst}/secret")));
}
