//! The validator as tables of synthetic streams: what passes (in every
//! split, both byte orders), what is refused and where; and a throughput
//! bench on a real stream (`--ignored`, release mode).

use super::*;
use crate::naming::SnapName;
use crate::stream::build::Build;

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
                    allow: Allow {
                        resumed: true,
                        ..Allow::default()
                    },
                    ..expect(&s, Some(12), 13)
                },
                false,
            ),
            (
                "a raw -I package",
                raw.bytes(),
                Expect {
                    allow: Allow {
                        raw: true,
                        ..Allow::default()
                    },
                    ..expect(&s, Some(10), 12)
                },
                true,
            ),
            (
                "a compressed stream",
                compressed.bytes(),
                Expect {
                    allow: Allow {
                        compressed: true,
                        ..Allow::default()
                    },
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
            features: 0
        })
    );
    assert!(!v.is_complete());
    let full = plain(true, 0, 11).bytes();
    let mut v = Validator::new(expect(&s, None, 11));
    v.feed(&full[..RECORD]).unwrap();
    assert_eq!(v.head().map(|h| h.first_to_guid), Some(11));
}

#[test]
fn hostile_streams_are_refused_where_they_go_wrong() {
    let s = snaps();
    let be = false;
    let e = |from, to| expect(&s, from, to);
    let mut cases: Vec<(&str, Vec<u8>, Expect<'_>, String)> = Vec::new();

    // A -p package spliced in before the final END of a -I package.
    let mut b = package(be, 10, 12);
    b.out.truncate(b.out.len() - RECORD);
    let at = b.out.len();
    b.begin_full(DMU_COMPOUNDSTREAM, 0, 0, 0, 0, &name(13), 600);
    b.end(0);
    substream(&mut b, 12, 13);
    b.end(0).end(0);
    cases.push((
        "a -p package spliced in",
        b.bytes(),
        e(Some(10), 13),
        format!("a second package header at byte {at} (zfs send -R/-p); only one plain or -I stream is accepted"),
    ));
    // The same without a payload: still a second package.
    let mut b = package(be, 10, 12);
    b.out.truncate(b.out.len() - RECORD);
    let at = b.out.len();
    b.package(&name(13));
    substream(&mut b, 12, 13);
    b.end(0).end(0);
    cases.push((
        "a second package",
        b.bytes(),
        e(Some(10), 13),
        format!("a second package header at byte {at}"),
    ));
    // A package header inside a substream.
    let mut b = Build::new(be);
    b.sub(11, 10, &name(11)).write(4096);
    let at = b.out.len();
    b.package(&name(12));
    cases.push((
        "a package header inside a substream",
        b.bytes(),
        e(Some(10), 12),
        format!("a second package header at byte {at}"),
    ));
    // A full substream of another dataset (a child of the sender's).
    let mut b = package(be, 10, 12);
    b.out.truncate(b.out.len() - RECORD);
    let at = b.out.len();
    b.sub(14, 0, "pool/src/evil@x").write(512).end(14).end(0);
    cases.push((
        "another dataset's full substream",
        b.bytes(),
        e(Some(10), 14),
        format!("a substream of another dataset at byte {at}: \"pool/src/evil@x\" in a stream of \"pool/src\""),
    ));
    // The package names another dataset than its substreams.
    let mut b = Build::new(be);
    b.package("pool@s2");
    substream(&mut b, 10, 11);
    cases.push((
        "a package of another dataset",
        b.bytes(),
        e(Some(10), 12),
        "a substream of another dataset at byte 624".into(),
    ));
    let mut b = package(be, 10, 12);
    b.end(0);
    cases.push((
        "data after the final END",
        b.bytes(),
        e(Some(10), 12),
        format!(
            "data after the end of the stream at byte {}",
            b.out.len() - RECORD
        ),
    ));
    let mut b = plain(be, 10, 11);
    b.out.push(0);
    cases.push((
        "a byte after a plain stream",
        b.bytes(),
        e(Some(10), 11),
        format!(
            "data after the end of the stream at byte {}",
            b.out.len() - 1
        ),
    ));
    let mut b = plain(be, 10, 11);
    b.out.extend(plain(be, 11, 12).out);
    cases.push((
        "two plain streams",
        b.bytes(),
        e(Some(10), 11),
        "data after the end of the stream".into(),
    ));
    // Chains and order.
    let mut b = Build::new(be);
    b.package(&name(13));
    substream(&mut b, 10, 11);
    let at = b.out.len();
    substream(&mut b, 12, 13);
    cases.push((
        "a gap in the chain",
        b.bytes(),
        e(Some(10), 13),
        format!("the substream at byte {at} starts from guid 12, not from the snapshot before it (guid 11)"),
    ));
    let mut b = Build::new(be);
    b.package(&name(13));
    substream(&mut b, 10, 12);
    substream(&mut b, 12, 11);
    cases.push((
        "snapshots out of order",
        b.bytes(),
        e(Some(10), 13),
        "@s1 (guid 11) at byte".into(),
    ));
    cases.push((
        "past the announced snapshot",
        package(be, 10, 13).bytes(),
        e(Some(10), 12),
        "@s3 (guid 13) at byte".into(),
    ));
    let mut b = plain(be, 10, 11);
    let at = b.out.len();
    b.out.extend(plain(be, 11, 12).out);
    cases.push((
        "a plain stream, then another",
        b.bytes(),
        e(Some(10), 12),
        format!("data after the end of the stream at byte {at}"),
    ));
    let mut b = Build::new(be);
    b.sub(99, 10, &format!("{DS}@s9")).end(99);
    cases.push((
        "an unannounced snapshot",
        b.bytes(),
        e(Some(10), 11),
        "the stream creates a snapshot (guid 99) the sender did not announce".into(),
    ));
    let mut b = Build::new(be);
    b.sub(11, 10, &name(12)).end(11);
    cases.push((
        "a name that is not its GUID's",
        b.bytes(),
        e(Some(10), 11),
        "names @s2 but carries the GUID of @s1".into(),
    ));
    cases.push((
        "a base that is not the destination's newest",
        plain(be, 10, 12).bytes(),
        e(Some(11), 12),
        "the stream starts from guid 10, not from the destination's newest snapshot (guid 11)"
            .into(),
    ));
    cases.push((
        "an incremental for a full stream",
        plain(be, 10, 11).bytes(),
        e(None, 11),
        "an incremental stream (from guid 10) where a full stream was announced".into(),
    ));
    // Names.
    let mut b = Build::new(be);
    b.sub(11, 10, &"x".repeat(256));
    cases.push((
        "an unterminated name",
        b.bytes(),
        e(Some(10), 11),
        "not DATASET@SNAPSHOT".into(),
    ));
    let mut b = Build::new(be);
    b.sub(11, 10, DS);
    cases.push((
        "a name without a snapshot",
        b.bytes(),
        e(Some(10), 11),
        "not DATASET@SNAPSHOT".into(),
    ));
    let mut b = Build::new(be);
    b.package("");
    cases.push((
        "a package without a name",
        b.bytes(),
        e(Some(10), 11),
        "not DATASET@SNAPSHOT".into(),
    ));
    // Records.
    let mut b = Build::new(be);
    b.sub(11, 10, &name(11)).write(512);
    let at = b.out.len();
    b.sub(12, 11, &name(12));
    cases.push((
        "a BEGIN inside a substream",
        b.bytes(),
        e(Some(10), 12),
        format!("a BEGIN record inside a substream at byte {at}"),
    ));
    let mut b = Build::new(be);
    b.sub(11, 10, &name(11)).bare(11);
    cases.push((
        "an unknown record type",
        b.bytes(),
        e(Some(10), 11),
        "an unknown record type 11 at byte 312".into(),
    ));
    let mut b = Build::new(be);
    b.sub(11, 10, &name(11)).write_compressed(0, 32 << 20, 0, 0);
    cases.push((
        "a WRITE larger than any block",
        b.bytes(),
        e(Some(10), 11),
        "a WRITE record at byte 312 claims 33554432 bytes of data".into(),
    ));
    let mut b = Build::new(be);
    b.sub(11, 10, &name(11)).object(64 << 10, 0, 0);
    cases.push((
        "an OBJECT with a huge bonus",
        b.bytes(),
        e(Some(10), 11),
        "an OBJECT record at byte 312 claims 65536 bytes of data".into(),
    ));
    let mut b = Build::new(be);
    b.sub(11, 10, &name(11)).embedded(200, 200);
    cases.push((
        "an embedded block too large for a block pointer",
        b.bytes(),
        e(Some(10), 11),
        "a WRITE_EMBEDDED record at byte 312 claims 200 bytes".into(),
    ));
    let mut b = Build::new(be);
    b.sub(11, 10, &name(11))
        .write_compressed(15, 4096, 100, 100);
    cases.push((
        "a compressed WRITE in a plain stream",
        b.bytes(),
        e(Some(10), 11),
        "a WRITE record at byte 312 carries compressed data".into(),
    ));
    let mut b = Build::new(be);
    b.begin_full(DMU_SUBSTREAM, FEATURE_COMPRESSED, 0, 11, 10, &name(11), 0)
        .write_compressed(15, 4096, 100, 100);
    cases.push((
        "a compressed WRITE where this receiver takes none",
        b.bytes(),
        e(Some(10), 11),
        "carries compressed data".into(),
    ));
    let mut b = Build::new(be);
    b.sub(11, 10, &name(11)).object(13, 320, 320);
    cases.push((
        "a raw bonus in a stream that is not raw",
        b.bytes(),
        e(Some(10), 11),
        "an OBJECT record at byte 312 carries raw (encrypted) data".into(),
    ));
    let mut b = Build::new(be);
    b.sub(11, 10, &name(11)).spill(512, 100, 100);
    cases.push((
        "a compressed spill in a stream that is not raw",
        b.bytes(),
        e(Some(10), 11),
        "a SPILL record at byte 312 carries raw (encrypted) data".into(),
    ));
    // Payloads and flags on substreams.
    let mut b = Build::new(be);
    b.begin_full(DMU_SUBSTREAM, 0, 0, 11, 10, &name(11), 64);
    cases.push((
        "a substream payload without a reason",
        b.bytes(),
        e(Some(10), 11),
        "the substream at byte 0 carries a 64-byte payload".into(),
    ));
    let mut b = Build::new(be);
    b.begin_full(DMU_SUBSTREAM, FEATURE_RESUMING, 0, 11, 10, &name(11), 64);
    cases.push((
        "resume state in a stream that is not a resume",
        b.bytes(),
        e(Some(10), 11),
        "carries a 64-byte payload".into(),
    ));
    let mut b = Build::new(be);
    b.begin_full(DMU_SUBSTREAM, FEATURE_RAW, 0, 11, 10, &name(11), 1 << 20);
    cases.push((
        "a huge raw payload",
        b.bytes(),
        Expect {
            allow: Allow {
                raw: true,
                ..Allow::default()
            },
            ..e(Some(10), 11)
        },
        "carries a 1048576-byte payload".into(),
    ));
    let mut b = Build::new(be);
    b.package(&name(12));
    substream(&mut b, 10, 11);
    let at = b.out.len();
    b.begin_full(DMU_SUBSTREAM, FEATURE_RESUMING, 0, 12, 11, &name(12), 0);
    cases.push((
        "a resumed substream after the first",
        b.bytes(),
        Expect {
            allow: Allow {
                resumed: true,
                ..Allow::default()
            },
            ..e(Some(10), 12)
        },
        format!("a resumed substream at byte {at}"),
    ));
    let mut b = Build::new(be);
    b.begin_full(DMU_SUBSTREAM, 0, DRR_FLAG_CLONE, 11, 10, &name(11), 0);
    cases.push((
        "a clone",
        b.bytes(),
        e(Some(10), 11),
        "a clone substream at byte 0".into(),
    ));
    // Framing.
    cases.push((
        "random bytes",
        vec![0x5a; 2 * RECORD],
        e(Some(10), 11),
        "not a zfs send stream (bad magic number)".into(),
    ));
    let mut b = plain(be, 10, 11);
    b.out[0] = 3;
    cases.push((
        "not starting with a BEGIN",
        b.bytes(),
        e(Some(10), 11),
        "the stream does not start with a BEGIN record".into(),
    ));
    let mut b = Build::new(be);
    b.begin_full(3, 0, 0, 11, 10, &name(11), 0);
    cases.push((
        "an unknown header type",
        b.bytes(),
        e(Some(10), 11),
        "unknown stream header type 3 at byte 0".into(),
    ));
    let mut b = Build::new(be);
    b.begin_full(DMU_COMPOUNDSTREAM, 0, 0, 0, 0, &name(12), 0);
    substream(&mut b, 10, 11);
    cases.push((
        "a package header without its END",
        b.bytes(),
        e(Some(10), 11),
        "a package header without its END record (byte 312)".into(),
    ));
    let mut b = Build::new(be);
    b.package(&name(12)).end(0);
    cases.push((
        "an empty package",
        b.bytes(),
        e(Some(10), 12),
        "a package without any substream (byte 624)".into(),
    ));
    let mut b = Build::new(be);
    b.package(&name(12));
    let mut other = Build::new(!be);
    substream(&mut other, 10, 11);
    b.out.extend(other.out);
    cases.push((
        "a substream in the other byte order",
        b.bytes(),
        e(Some(10), 11),
        "a BEGIN record at byte 624 in the other byte order".into(),
    ));
    let mut b = Build::new(be);
    b.package(&name(12));
    b.bare(DRR_WRITE);
    cases.push((
        "a record where a substream must begin",
        b.bytes(),
        e(Some(10), 12),
        "a WRITE record at byte 624 where a substream must begin".into(),
    ));
    let mut b = Build::new(be);
    b.begin_full(DMU_COMPOUNDSTREAM, 0, 0, 0, 0, &name(12), 900);
    cases.push((
        "a -R/-p package header",
        b.bytes(),
        e(Some(10), 12),
        "the package header carries a 900-byte payload (properties or other datasets: zfs send -R or -p), which this receiver does not accept".into(),
    ));

    for (what, bytes, e, why) in &cases {
        for sizes in SPLITS {
            let got = feed(bytes, e.clone(), sizes)
                .map(|_| ())
                .map_err(|r| r.to_string());
            match got {
                Err(r) => assert!(
                    r.contains(why.as_str()),
                    "{what} ({sizes:?}): {r}\nwanted: {why}"
                ),
                Ok(()) => {
                    // Refused only at the end (nothing after a plain END, a
                    // stream that ends early): never complete.
                    let v = feed(bytes, e.clone(), sizes).unwrap();
                    panic!("{what} ({sizes:?}) accepted; complete: {}", v.is_complete());
                }
            }
        }
    }
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
