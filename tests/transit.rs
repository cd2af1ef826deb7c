//! End to end, how data travels: `zfsync-send --compress` (zstd frames the
//! receiver decompresses before anything looks at them) and `--bwlimit`
//! (one token bucket for the whole run), with the real binaries on real
//! zfs-fuse pools.

use std::time::{Duration, Instant};

use zfsync_e2e::*;

/// A tree whose files compress well (text repeated) and do not (noise),
/// snapshotted @s1.
fn make_tree(src: &str) {
    let rels = ["logs", "logs/old", "blobs"];
    zfs(&["create", src]);
    write_file(src, "top.txt", b"top\n");
    for (i, r) in rels.iter().enumerate() {
        let ds = format!("{src}/{r}");
        zfs(&["create", &ds]);
        let text = format!("{i}: 2026-11-22 12:00:00 zfsync replicated {r} fine\n");
        write_file(&ds, "log.txt", text.repeat(20_000).as_bytes());
        write_file(&ds, "noise.bin", &noise(64 << 10, i as u64));
    }
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
}

/// "bytes sent: 3.6 MiB (361.6 KiB on the wire, ratio 10.12)": the ratio.
fn ratio(stdout: &str) -> Option<f64> {
    let line = stdout.lines().find(|l| l.contains("bytes sent:"))?;
    let (_, r) = line.rsplit_once("ratio ")?;
    r.trim_end_matches(')').parse().ok()
}

/// --compress: a tree sent compressed (full, then incremental) arrives identical: every snapshot with the sender's GUID, every file the same; the summary shows the smaller wire bytes and the log the ratio per stream.
#[test]
fn a_tree_sent_compressed_arrives_identical_and_smaller_on_the_wire() {
    let certs = Certs::shared();
    let a = Pool::new("zst");
    let b = Pool::new("zst");
    let src = a.ds("src");
    let dst = b.ds("replica");
    make_tree(&src);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let port = recv.port.to_string();
    let args = [
        "-v",
        "-p",
        &port,
        "-t",
        "2",
        "--compress",
        &src,
        "127.0.0.1",
    ];
    let run = send(&certs.sender_args(), &args);
    run.assert_code(0)
        .assert_stdout_has("result: all datasets in sync")
        .assert_stdout_has("on the wire, ratio")
        .assert_stderr_has("on the wire, ratio");
    let r = ratio(&run.stdout).unwrap_or_else(|| panic!("no ratio\n{}", run.dump()));
    assert!(
        r > 2.0,
        "repeated text should shrink: ratio {r}\n{}",
        run.dump()
    );
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src), "{}", run.dump());
    println!("transit: --compress, full streams: ratio {r}");
    record_figures("transit_compress", &[("ratio_x100", (r * 100.0) as u64)]);

    let more = "more\n".repeat(50_000);
    write_file(&format!("{src}/logs"), "later.txt", more.as_bytes());
    zfs(&["snapshot", "-r", &format!("{src}@s2")]);
    let run = send(&certs.sender_args(), &args);
    run.assert_code(0)
        .assert_stdout_has("incremental @s1..@s2")
        .assert_stdout_has("on the wire, ratio")
        .assert_stdout_has("result: all datasets in sync");
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src), "{}", run.dump());
    assert_same_files(&src, &dst, "s1");
    assert_same_files(&src, &dst, "s2");
    recv.wait_for_log("received", 1, Duration::from_secs(10));
}

/// --compress with --compress-level: a bad level is refused naming the range; the highest level works.
#[test]
fn compress_levels_are_checked() {
    let certs = Certs::shared();
    let run = send(
        &certs.sender_args(),
        &["--compress", "--compress-level", "23", "p/src", "127.0.0.1"],
    );
    run.assert_code(2).assert_stderr_has("1..=19");
    let run = send(
        &certs.sender_args(),
        &["--bwlimit", "10MB", "p/src", "127.0.0.1"],
    );
    run.assert_code(2)
        .assert_stderr_has("for example 500K, 10M or 1.5G");
}

/// --bwlimit: three datasets of 1 MiB of noise each, sent by three workers at 1M, take at least the time their bytes beyond the shared bucket's burst need at the rate (a lower bound, not a benchmark); the tree arrives whole.
#[test]
fn a_bandwidth_limit_holds_the_whole_run_to_its_rate() {
    let certs = Certs::shared();
    let a = Pool::new("bwl");
    let b = Pool::new("bwl");
    let src = a.ds("src");
    let dst = b.ds("replica");
    zfs(&["create", &src]);
    for (i, r) in ["x", "y", "z"].iter().enumerate() {
        let ds = format!("{src}/{r}");
        zfs(&["create", &ds]);
        write_file(&ds, "noise.bin", &noise(1 << 20, 100 + i as u64));
    }
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let port = recv.port.to_string();
    let started = Instant::now();
    let run = send(
        &certs.sender_args(),
        &["-p", &port, "-t", "3", "--bwlimit", "1M", &src, "127.0.0.1"],
    );
    let took = started.elapsed();
    run.assert_code(0)
        .assert_stdout_has("result: all datasets in sync");
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src), "{}", run.dump());
    // At least 3 MiB of file data went at 1 MiB/s, less the bucket's burst
    // of 512 KiB: 2.5 s. Three buckets (one per connection) would take 1 s.
    let least = Duration::from_millis(2500);
    println!("transit: 3 MiB at --bwlimit 1M with 3 workers took {took:?}");
    assert!(
        took >= least,
        "took {took:?}, less than {least:?}\n{}",
        run.dump()
    );
}
