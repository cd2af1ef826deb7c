//! The validator as tables of synthetic streams: what passes (in every
//! split, both byte orders), what is refused and where; and a throughput
//! bench on a real stream (`--ignored`, release mode).

use super::*;
use crate::naming::SnapName;
use crate::stream::build::Build;

mod hostile;

const DS: &str = "pool/src";

/// The sender's snapshots s0..s4: GUIDs 10..14, its createtxgs 100..104.
fn snaps() -> Vec<Snapshot> {
    (0..5)
        .map(|i| Snapshot {
            name: SnapName::new(&format!("s{i}")).unwrap(),
            guid: 10 + i,
            createtxg: 100 + i,
        })
        .collect()
}

/// A stream from `from` (None: full) to `to`, nothing else allowed.
fn expect<'a>(snaps: &'a [Snapshot], from: Option<u64>, to: u64) -> Expect<'a> {
    let base = from.and_then(|g| snaps.iter().find(|s| s.guid == g));
    Expect {
        from_guid: from.unwrap_or(0),
        from_createtxg: base.map_or(0, |b| b.createtxg),
        to: snaps.iter().find(|s| s.guid == to).unwrap(),
        announced: snaps,
        allow: Allow::default(),
    }
}

/// [`Allow`] with only `resumed` (`zfs send -t`), `raw` (`-w`) or
/// `compressed` (`-c`) set.
fn allow_resumed() -> Allow {
    Allow {
        resumed: true,
        ..Allow::default()
    }
}

fn allow_raw() -> Allow {
    Allow {
        raw: true,
        ..Allow::default()
    }
}

fn allow_compressed() -> Allow {
    Allow {
        compressed: true,
        ..Allow::default()
    }
}

fn name(guid: u64) -> String {
    format!("{DS}@s{}", guid - 10)
}

/// Every record type with its data, as in one substream.
fn records(b: &mut Build) {
    b.object(13, 0, 16) // bonus rounded up to 8
        .bare(DRR_FREEOBJECTS)
        .write(4096)
        .bare(DRR_FREE)
        .bare(DRR_WRITE_BYREF)
        .spill(512, 0, 512)
        .embedded(20, 24)
        .bare(DRR_OBJECT_RANGE)
        .bare(DRR_REDACT)
        .write(131072);
}

/// A substream from `from` to `to` with every record type.
fn substream(b: &mut Build, from: u64, to: u64) {
    b.sub(to, from, &name(to));
    records(b);
    b.end(to);
}

/// `zfs send -I @from @to`: a package of substreams.
fn package(be: bool, from: u64, to: u64) -> Build {
    let mut b = Build::new(be);
    b.package(&name(to));
    for g in from + 1..=to {
        substream(&mut b, g - 1, g);
    }
    b.end(0);
    b
}

fn plain(be: bool, from: u64, to: u64) -> Build {
    let mut b = Build::new(be);
    substream(&mut b, from, to);
    b
}

/// Feeds `data` in pieces of `size` (cycling); the validator, or the
/// refusal.
fn feed<'a>(data: &[u8], e: Expect<'a>, sizes: &[usize]) -> Result<Validator<'a>, Refusal> {
    let mut v = Validator::new(e);
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].min(rest.len());
        i += 1;
        v.feed(&rest[..n])?;
        rest = &rest[n..];
    }
    Ok(v)
}

const SPLITS: [&[usize]; 6] = [
    &[usize::MAX],
    &[1],
    &[311],
    &[313],
    &[7, 1, 312, 4000],
    &[65536],
];

#[test]
fn honest_streams_pass_in_every_split_and_byte_order() {
    let s = snaps();
    for be in [false, true] {
        let mut resumed = Build::new(be);
        resumed.begin_full(DMU_SUBSTREAM, FEATURE_RESUMING, 0, 13, 12, &name(13), 200);
        records(&mut resumed);
        resumed.end(13);
        let mut raw = Build::new(be);
        raw.package(&name(12));
        for (from, to) in [(10, 11), (11, 12)] {
            raw.begin_full(DMU_SUBSTREAM, FEATURE_RAW, 0, to, from, &name(to), 300)
                .object(13, 320, 320)
                .write_compressed(0, 4096, 4096, 4096)
                .write_compressed(15, 131072, 5000, 5000)
                .spill(512, 100, 100)
                .end(to);
        }
        raw.end(0);
        let mut compressed = Build::new(be);
        compressed
            .begin_full(DMU_SUBSTREAM, FEATURE_COMPRESSED, 0, 11, 0, &name(11), 0)
            .write_compressed(2, 131072, 777, 777)
            .write(512)
            .end(11);
        let cases: Vec<(&str, Vec<u8>, Expect<'_>, bool)> = vec![
            (
                "a full stream",
                plain(be, 0, 11).bytes(),
                expect(&s, None, 11),
                false,
            ),
            (
                "an incremental",
                plain(be, 11, 12).bytes(),
                expect(&s, Some(11), 12),
                false,
            ),
            (
                "a -I package",
                package(be, 10, 13).bytes(),
                expect(&s, Some(10), 13),
                true,
            ),
            (
                "a -I package of one",
                package(be, 12, 13).bytes(),
                expect(&s, Some(12), 13),
                true,
            ),
            (
                "a resumed stream",
                resumed.bytes(),
                Expect {
                    allow: allow_resumed(),
                    ..expect(&s, Some(12), 13)
                },
                false,
            ),
            (
                "a raw -I package",
                raw.bytes(),
                Expect {
                    allow: allow_raw(),
                    ..expect(&s, Some(10), 12)
                },
                true,
            ),
            (
                "a compressed stream",
                compressed.bytes(),
                Expect {
                    allow: allow_compressed(),
                    ..expect(&s, None, 11)
                },
                false,
            ),
        ];
        for (what, bytes, e, compound) in &cases {
            for sizes in SPLITS {
                let v = feed(bytes, e.clone(), sizes)
                    .unwrap_or_else(|r| panic!("{what} (be {be}, {sizes:?}): {r}"));
                assert!(v.is_complete(), "{what} (be {be}, {sizes:?}) incomplete");
                let h = v.head().unwrap();
                assert_eq!(h.compound, *compound, "{what}");
                assert_eq!(h.from_guid, e.from_guid, "{what}");
                assert_eq!(v.offset(), bytes.len() as u64);
            }
        }
    }
}

#[test]
fn the_head_is_known_after_the_first_substreams_begin() {
    let s = snaps();
    let pkg = package(false, 10, 12).bytes();
    let mut v = Validator::new(expect(&s, Some(10), 12));
    v.feed(&pkg[..HEAD_MAX - 1]).unwrap();
    assert_eq!(v.head(), None);
    v.feed(&pkg[HEAD_MAX - 1..HEAD_MAX]).unwrap();
    assert_eq!(
        v.head(),
        Some(&Head {
            from_guid: 10,
            first_to_guid: 11,
            compound: true,
            features: 0,
            volume: false,
        })
    );
    assert!(!v.is_complete());
    let full = plain(true, 0, 11).bytes();
    let mut v = Validator::new(expect(&s, None, 11));
    v.feed(&full[..RECORD]).unwrap();
    assert_eq!(v.head().map(|h| h.first_to_guid), Some(11));
    // A volume's stream (drr_type DMU_OST_ZVOL): no canmount for it.
    let mut vol = plain(false, 0, 11).bytes();
    vol[32..36].copy_from_slice(&3u32.to_le_bytes());
    let mut v = Validator::new(expect(&s, None, 11));
    v.feed(&vol).unwrap();
    assert_eq!(v.head().map(|h| h.volume), Some(true));
}

/// What the receiver's cache learns from a whole stream: how many
/// snapshots it creates, and the last.
#[test]
fn the_validator_says_which_snapshots_the_stream_creates() {
    let s = snaps();
    let pkg = package(false, 10, 13).bytes();
    let mut v = Validator::new(expect(&s, Some(10), 13));
    v.feed(&pkg).unwrap();
    assert!(v.is_complete());
    assert_eq!((v.substreams(), v.last_created()), (3, 13));
    let one = plain(true, 0, 11).bytes();
    let mut v = Validator::new(expect(&s, None, 11));
    assert_eq!((v.substreams(), v.last_created()), (0, 0));
    v.feed(&one).unwrap();
    assert!(v.is_complete());
    assert_eq!((v.substreams(), v.last_created()), (1, 11));
    // `-i s0 s3`: one substream where three snapshots lie in between.
    let skip = plain(false, 10, 13).bytes();
    let mut v = Validator::new(expect(&s, Some(10), 13));
    v.feed(&skip).unwrap();
    assert_eq!((v.substreams(), v.last_created()), (1, 13));
    assert_eq!(v.head().map(|h| h.volume), Some(false));
}

/// A stream that ends before the announced snapshot holds only the
/// sender's own snapshots, in order: it passes here, and the receiver
/// reports it once `zfs receive` is done (ING7).
#[test]
fn a_stream_may_end_before_the_announced_snapshot() {
    let s = snaps();
    for bytes in [package(true, 10, 12).bytes(), plain(false, 10, 11).bytes()] {
        let v = feed(&bytes, expect(&s, Some(10), 13), &[100]).unwrap();
        assert!(v.is_complete());
    }
}

#[test]
fn a_refusal_sticks() {
    let s = snaps();
    let mut v = Validator::new(expect(&s, Some(10), 12));
    let err = v.feed(&[0x5a; RECORD]).unwrap_err();
    assert_eq!(v.feed(&package(false, 10, 12).out), Err(err));
    assert!(!v.is_complete());
}

#[test]
fn a_cut_stream_is_valid_so_far_but_not_complete() {
    let s = snaps();
    let pkg = package(false, 10, 13).bytes();
    for cut in [1, RECORD, HEAD_MAX, pkg.len() / 2, pkg.len() - 1] {
        let v = feed(&pkg[..cut], expect(&s, Some(10), 13), &[1000]).unwrap();
        assert!(!v.is_complete(), "cut at {cut}");
    }
}

/// Throughput on a real stream: `ZFSYNC_BENCH_STREAM=FILE` (a saved `zfs
/// send` output), else a fresh one of 100 MiB from a scratch pool (root,
/// zfs). Prints MB/s; asserts nothing. Run it in release mode:
/// `cargo test --release -p zfsync-common --lib validator_throughput -- --ignored --nocapture`
#[test]
#[ignore]
fn validator_throughput() {
    use std::process::Command;
    use std::time::Instant;

    let data = match std::env::var_os("ZFSYNC_BENCH_STREAM") {
        Some(f) => std::fs::read(f).unwrap(),
        None => {
            let pool = format!("zsbench{}", std::process::id());
            let file = std::env::temp_dir().join(format!("{pool}.img"));
            std::fs::File::create(&file)
                .unwrap()
                .set_len(512 << 20)
                .unwrap();
            let run = |cmd: &str, args: &[&str]| {
                let out = Command::new(cmd).args(args).output().unwrap();
                assert!(
                    out.status.success(),
                    "{cmd} {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                out.stdout
            };
            run("zpool", &["create", &pool, &file.to_string_lossy()]);
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let noise: Vec<u8> = (0..100 << 20)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect();
            let mut stream = Vec::new();
            for _ in 0..50 {
                if std::fs::write(format!("/{pool}/data"), &noise).is_ok() {
                    run("zfs", &["snapshot", &format!("{pool}@b")]);
                    stream = run("zfs", &["send", &format!("{pool}@b")]);
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            for _ in 0..20 {
                if Command::new("zpool")
                    .args(["destroy", "-f", &pool])
                    .status()
                    .is_ok_and(|s| s.success())
                {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            let _ = std::fs::remove_file(&file);
            assert!(!stream.is_empty(), "no stream from the scratch pool");
            stream
        }
    };
    // The stream's own snapshot, whatever it is.
    let order = Order::of_begin(&data[..RECORD]).unwrap();
    let to = Snapshot {
        name: SnapName::new("b").unwrap(),
        guid: order.u64(&data, 40),
        createtxg: 1,
    };
    let name_end = data[56..RECORD].iter().position(|&c| c == 0).unwrap() + 56;
    let snap = std::str::from_utf8(&data[56..name_end])
        .unwrap()
        .split_once('@')
        .unwrap()
        .1
        .to_string();
    let to = Snapshot {
        name: SnapName::new(&snap).unwrap(),
        ..to
    };
    let announced = [to.clone()];
    let e = Expect {
        from_guid: 0,
        from_createtxg: 0,
        to: &to,
        announced: &announced,
        allow: Allow::default(),
    };
    let mb = data.len() as f64 / 1e6;
    for (what, chunk) in [("256 KiB frames", 256 << 10), ("4 KiB frames", 4 << 10)] {
        let start = Instant::now();
        let rounds = 20;
        for _ in 0..rounds {
            let v = feed(&data, e.clone(), &[chunk]).unwrap();
            assert!(v.is_complete());
        }
        let secs = start.elapsed().as_secs_f64() / rounds as f64;
        println!(
            "validator: real stream of {mb:.1} MB in {what}: {:.0} MB/s ({:.3} ms per pass)",
            mb / secs,
            secs * 1e3
        );
    }
    // The worst case for the validator: records without data, nothing
    // to skip (FREE records), in frames that split every record.
    let mut b = Build::new(false);
    b.sub(to.guid, 0, &format!("p@{snap}"));
    for _ in 0..100_000 {
        b.bare(DRR_FREE);
    }
    b.end(to.guid);
    let dense = b.bytes();
    for (what, chunk) in [("256 KiB frames", 256 << 10), ("1000-byte frames", 1000)] {
        let start = Instant::now();
        let v = feed(&dense, e.clone(), &[chunk]).unwrap();
        assert!(v.is_complete());
        let secs = start.elapsed().as_secs_f64();
        println!(
            "validator: {} records without data ({:.1} MB) in {what}: {:.0} MB/s, {:.0} ns per record",
            100_000,
            dense.len() as f64 / 1e6,
            dense.len() as f64 / 1e6 / secs,
            secs * 1e9 / 100_000.0
        );
    }
}
