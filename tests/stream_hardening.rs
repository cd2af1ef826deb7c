//! Hardening, stream part: a real receiver on real zfs-fuse pools is fed
//! real `zfs send` output with hostile records spliced in after the head
//! (a second package with received properties, a substream of another
//! dataset, data after the final END, ...) and a flood of empty data
//! frames. Every case must be refused before the bytes reach `zfs
//! receive`; an honest `-I` stream in odd frame sizes must still pass.
//! The validator itself is also run over real streams in random splits.
//! Streams announced compressed (`--compress`) with damaged, non-zstd or
//! zip-bomb frames are refused before anything is decompressed into
//! memory or reaches `zfs receive`.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use zfsync_common::client::{Client, ClientOptions, Transit};
use zfsync_common::compress::{Deflater, MAX_INFLATED};
use zfsync_common::naming::{RelPath, SnapName};
use zfsync_common::protocol::{Bytes, ProtocolError, SyncReply, SyncRequest};
use zfsync_common::stream::{Allow, Expect, Validator, RECORD};
use zfsync_common::zfs::Snapshot;
use zfsync_e2e::*;

fn options(certs: &Certs, port: u16) -> ClientOptions {
    let mut o = certs.client_options(port, "stream-hardening");
    o.read_timeout = Duration::from_secs(30);
    o
}

/// `package` with `inner` put in before its final END record.
fn splice_before_final_end(package: &[u8], inner: &[u8]) -> Vec<u8> {
    let cut = package.len() - RECORD;
    assert_eq!(
        package[cut..cut + 4],
        5u32.to_le_bytes(),
        "a -I package ends with an END record"
    );
    [&package[..cut], inner, &package[cut..]].concat()
}

/// Announces a stream, sends `data` in frames whose sizes cycle through
/// `sizes`, ends it: the receiver's answer.
async fn attempt(
    c: &mut Client,
    from: Option<u64>,
    to: &Snapshot,
    data: &[u8],
    sizes: &[usize],
) -> Result<u64, String> {
    raw_stream(c, from, to, data, sizes, data.len() as u64).await
}

/// Properties set on `pool`'s datasets by a received stream.
fn received_props(pool: &str) -> String {
    zfs(&[
        "get",
        "-H",
        "-r",
        "-s",
        "received",
        "-o",
        "name,property,value",
        "all",
        pool,
    ])
}

fn by_name<'a>(snaps: &'a [Snapshot], name: &str) -> &'a Snapshot {
    snaps
        .iter()
        .find(|s| s.name.as_str() == name)
        .unwrap_or_else(|| panic!("no @{name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spliced_records_are_refused_before_zfs_receive_sees_them() {
    let certs = Certs::shared();
    let Pools { a, b, src, dst } = Pools::new("shsplice", "t");
    let evil = a.ds("src/evil");
    zfs(&["create", &src]);
    write_file(&src, "f", b"zero");
    zfs(&["snapshot", &format!("{src}@s0")]);
    zfs(&["create", &b.ds("outside")]);
    zfs(&["snapshot", &b.ds("outside@keep")]);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let mut c = Client::connect(&options(certs, recv.port)).await.unwrap();

    // The replica starts at @s0, received honestly.
    let s0 = snapshots_of(&src);
    assert_eq!(
        c.sync(&SyncRequest::new(&RelPath::root(), &s0))
            .await
            .unwrap(),
        SyncReply::New { buffered: false }
    );
    let full = send_bytes(&[&format!("{src}@s0")]);
    attempt(&mut c, None, &s0[0], &full, &[1 << 20])
        .await
        .expect("the initial full stream");
    c.finish().await.unwrap();

    // More snapshots (one with 300 KB of data), a dataset below the source
    // for the foreign substream, and a local property for `send -p`.
    for (i, snap) in ["s1", "s2", "s3", "s4", "s5"].iter().enumerate() {
        let len = if *snap == "s2" { 300_000 } else { 3000 };
        write_file(&src, snap, &noise(len, i as u64 + 1));
        zfs(&["snapshot", &format!("{src}@{snap}")]);
    }
    let at = |n: &str| format!("{src}@{n}");
    // (-R before the child exists: it has no @s0..@s3.)
    let repl03 = send_bytes(&["-R", "-I", &at("s0"), &at("s3")]);
    zfs(&["create", &evil]);
    zfs(&["snapshot", &format!("{evil}@x")]);
    zfs(&["set", "mountpoint=none", &src]);
    let snaps = snapshots_of(&src);
    let s = |n: &str| by_name(&snaps, n).clone();
    let (s0, s1, s2, s3, s5) = (s("s0"), s("s1"), s("s2"), s("s3"), s("s5"));
    let inc02 = send_bytes(&["-I", &at("s0"), &at("s2")]);
    let inc03 = send_bytes(&["-I", &at("s0"), &at("s3")]);
    let props23 = send_bytes(&["-p", "-i", &at("s2"), &at("s3")]);
    let evil_full = send_bytes(&[&format!("{evil}@x")]);
    let plain01 = send_bytes(&["-i", &at("s0"), &at("s1")]);

    match c
        .sync(&SyncRequest::new(&RelPath::root(), &snaps))
        .await
        .unwrap()
    {
        SyncReply::Incremental { base_guid, .. } => assert_eq!(base_guid, s0.guid),
        other => panic!("expected an incremental, got {other:?}"),
    }
    let before = pool_state(&b.name);
    let spawn = "spawning argv=zfs receive";
    let spawned = recv.log().matches(spawn).count();
    let mut tried = 0u64;
    let mut missed: Vec<String> = Vec::new();
    // Each hostile stream travels in one frame: the receiver must refuse
    // it before `zfs receive` reads a byte, so nothing at all changes.
    let cases: Vec<(&str, Vec<u8>, &Snapshot, &str)> = vec![
        (
            "(a) a send -p -i package spliced in before the -I package's final END",
            splice_before_final_end(&inc02, &props23),
            &s3,
            "a second package header at byte",
        ),
        (
            "(b) a full substream of another dataset spliced in",
            splice_before_final_end(&inc03, &evil_full),
            &s3,
            "another dataset",
        ),
        (
            "(c) trailing garbage after the final END",
            [&inc03[..], &noise(1000, 9)].concat(),
            &s3,
            "after the end of the stream",
        ),
        (
            "trailing garbage after a plain stream",
            [&plain01[..], &noise(500, 10)].concat(),
            &s1,
            "after the end of the stream",
        ),
        (
            "a second -I package after the first",
            [&inc02[..], &inc03[..]].concat(),
            &s2,
            "after the end of the stream",
        ),
        (
            "a package going past the announced snapshot",
            inc03.clone(),
            &s2,
            "newer than the announced",
        ),
        ("a -R package", repl03, &s3, "payload"),
    ];
    for (what, data, to, why) in &cases {
        tried += 1;
        let got = attempt(&mut c, Some(s0.guid), to, data, &[1 << 20]).await;
        let refused = matches!(&got, Err(e) if e.contains(why));
        let unchanged = pool_state(&b.name) == before && received_props(&b.name).is_empty();
        if !(refused && unchanged) {
            missed.push(format!(
                "{what}: {got:?}; pool unchanged: {unchanged}; received properties: {:?}",
                received_props(&b.name)
            ));
        }
    }
    assert!(!exists(&format!("{dst}/evil")), "{missed:#?}");
    assert_eq!(
        recv.log().matches(spawn).count(),
        spawned,
        "zfs receive was started for a hostile stream in one frame"
    );

    // (d) An honest -I stream of three snapshots, in odd frame sizes that
    // split records every which way, is received.
    let odd = [1usize, 1, 311, 313, 1, 64 << 10, 311, 1, 313];
    attempt(&mut c, Some(s0.guid), &s3, &inc03, &odd)
        .await
        .unwrap_or_else(|e| panic!("the honest -I stream: {e}\nbefore it: {missed:#?}"));
    let ours = snapshot_guids(&dst);
    let theirs = snapshot_guids(&src);
    for k in ["@s0", "@s1", "@s2", "@s3"] {
        assert_eq!(ours.get(k), theirs.get(k), "{k}");
    }
    assert_eq!(
        files_at(&format!("{dst}@s3")),
        files_at(&format!("{src}@s3")),
        "the replica's files at @s3"
    );

    // The spliced package again, now in small frames: `zfs receive` is
    // running when the second package header arrives, and is aborted
    // before it sees it. Snapshots that arrived whole before it may stay
    // (they are the sender's); the spliced one and its properties never.
    tried += 1;
    let spawned = recv.log().matches(spawn).count();
    let inc34 = send_bytes(&["-I", &at("s3"), &at("s4")]);
    let props45 = send_bytes(&["-p", "-i", &at("s4"), &at("s5")]);
    let got = attempt(
        &mut c,
        Some(s3.guid),
        &s5,
        &splice_before_final_end(&inc34, &props45),
        &[1000],
    )
    .await;
    recv.wait_for_log(spawn, spawned + 1, Duration::from_secs(10));
    let ours = snapshot_guids(&dst);
    let only_theirs = ours.iter().all(|(k, v)| theirs.get(k) == Some(v));
    println!(
        "the spliced package in 1000-byte frames: {got:?}; the replica's snapshots now: {:?}",
        ours.keys().collect::<Vec<_>>()
    );
    if !(matches!(&got, Err(e) if e.contains("a second package header"))
        && !ours.contains_key("@s5")
        && only_theirs
        && received_props(&b.name).is_empty())
    {
        missed.push(format!(
            "the spliced package in small frames: {got:?}; snapshots {ours:?}; received properties {:?}",
            received_props(&b.name)
        ));
    }
    assert!(!exists(&format!("{dst}/evil")));
    assert_eq!(
        datasets(&b.name),
        vec!["".to_string(), "/outside".into(), "/t".into()],
        "nothing was created or removed outside the target"
    );
    assert!(zfs(&[
        "list",
        "-H",
        "-t",
        "snapshot",
        "-o",
        "name",
        "-r",
        &b.ds("outside")
    ])
    .contains("outside@keep"));
    c.bye().await;
    let refused = tried - missed.len() as u64;
    println!("stream hardening: {tried} hostile streams tried, {refused} refused before zfs receive saw their hostile records; an honest -I stream in odd frames received");
    record_figures(
        "stream_hardening",
        &[
            ("hostile_tried", tried),
            ("hostile_refused", refused),
            ("outside_writes", 0),
        ],
    );
    assert!(missed.is_empty(), "not refused: {missed:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_empty_data_frames_is_refused_at_once() {
    let certs = Certs::shared();
    let b = Pool::new("shflood");
    zfs(&["create", &b.ds("t")]);
    let recv = Receiver::start(&b.ds("t"), &certs.receiver_args(), &[]);
    let before = pool_state(&b.name);
    let opts = options(certs, recv.port);
    let mut c = Client::connect(&opts).await.unwrap();
    let s1 = Snapshot {
        name: SnapName::new("s1").unwrap(),
        guid: 77,
        createtxg: 7,
    };
    let fresh = RelPath::new("/fresh").unwrap();
    assert_eq!(
        c.sync(&SyncRequest::new(&fresh, std::slice::from_ref(&s1)))
            .await
            .unwrap(),
        SyncReply::New { buffered: false }
    );
    c.begin_stream(None, &s1).await.unwrap();
    let rss_before = peak_rss_kib(recv.pid());
    // One million frames of length 1: the kind byte `D` and no data.
    let frame = [0u8, 0, 0, 1, b'D'];
    let flood: Vec<u8> = frame.iter().copied().cycle().take(5 * 1_000_000).collect();
    let start = Instant::now();
    let conn = c.connection();
    // The receiver may close while the flood is still being written.
    let _ = conn.get_mut().write_all(&flood).await;
    let _ = conn.get_mut().flush().await;
    let answer = tokio::time::timeout(Duration::from_secs(20), conn.read_msg()).await;
    let took = start.elapsed();
    let rss = peak_rss_kib(recv.pid());
    let ended = matches!(answer, Ok(Err(_)));
    println!(
        "stream hardening: 1,000,000 empty data frames: connection ended {ended} after {took:?} ({answer:?}); receiver peak memory {rss_before} KiB before, {rss} KiB after"
    );
    record_figures(
        "stream_hardening_flood",
        &[
            ("hostile_tried", 1),
            (
                "hostile_refused",
                u64::from(ended && took < Duration::from_secs(10)),
            ),
            ("receiver_peak_kib", rss),
        ],
    );
    assert!(ended, "the connection was not ended: {answer:?}");
    assert!(took < Duration::from_secs(10), "ended only after {took:?}");
    assert!(
        rss < rss_before + 16 * 1024,
        "the receiver grew from {rss_before} to {rss} KiB"
    );
    // (The receiver logs why once the connection is gone; its log is read
    // by a thread of this test.)
    recv.wait_for_log("an empty data frame", 1, Duration::from_secs(10));
    // Nothing changed, and the receiver still serves.
    assert_eq!(pool_state(&b.name), before);
    let mut again = Client::connect(&opts).await.unwrap();
    assert_eq!(
        again
            .sync(&SyncRequest::new(&fresh, std::slice::from_ref(&s1)))
            .await
            .unwrap(),
        SyncReply::New { buffered: false }
    );
}

/// Deterministic random cut points.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Runs the validator over `data` cut at random points.
fn validate_split<'a>(
    data: &[u8],
    expect: Expect<'a>,
    rng: &mut Rng,
) -> Result<Validator<'a>, String> {
    let mut v = Validator::new(expect);
    let mut rest = data;
    while !rest.is_empty() {
        let n = match rng.below(4) {
            0 => 1,
            1 => 1 + rng.below(2 * RECORD),
            _ => 1 + rng.below(200_000),
        }
        .min(rest.len());
        v.feed(&rest[..n]).map_err(|e| e.to_string())?;
        rest = &rest[n..];
    }
    Ok(v)
}

#[test]
fn real_streams_pass_the_validator_in_any_split() {
    let a = Pool::new("shreal");
    let src = a.ds("src");
    zfs(&["create", &src]);
    for (i, snap) in ["s0", "s1", "s2", "s3"].iter().enumerate() {
        write_file(&src, snap, &noise(50_000 * (i + 1), i as u64));
        write_file(&src, "same", &noise(200_000, 99));
        zfs(&["snapshot", &format!("{src}@{snap}")]);
    }
    let replication = send_bytes(&["-R", "-I", &format!("{src}@s0"), &format!("{src}@s3")]);
    zfs(&["create", &a.ds("src/kid")]);
    zfs(&["snapshot", &a.ds("src/kid@k")]);
    let snaps = snapshots_of(&src);
    let s = |n: &str| by_name(&snaps, n);
    let at = |n: &str| format!("{src}@{n}");
    let expect = |from: Option<&Snapshot>, to: &str| Expect {
        from_guid: from.map_or(0, |f| f.guid),
        from_createtxg: from.map_or(0, |f| f.createtxg),
        to: by_name(&snaps, to),
        announced: &snaps,
        allow: Allow::default(),
    };
    let honest: Vec<(&str, Vec<u8>, Expect<'_>, bool)> = vec![
        ("full", send_bytes(&[&at("s0")]), expect(None, "s0"), false),
        (
            "incremental",
            send_bytes(&["-i", &at("s1"), &at("s2")]),
            expect(Some(s("s1")), "s2"),
            false,
        ),
        (
            "-I package",
            send_bytes(&["-I", &at("s0"), &at("s3")]),
            expect(Some(s("s0")), "s3"),
            true,
        ),
        (
            "deduplicated -I package (send -D)",
            send_bytes(&["-D", "-I", &at("s0"), &at("s3")]),
            expect(Some(s("s0")), "s3"),
            true,
        ),
    ];
    let mut rng = Rng(0x5eed_5eed);
    for (what, data, exp, compound) in &honest {
        for _ in 0..50 {
            let v = validate_split(data, exp.clone(), &mut rng)
                .unwrap_or_else(|e| panic!("{what} refused: {e}"));
            assert!(v.is_complete(), "{what}: incomplete");
            let head = v.head().expect("a head");
            assert_eq!(head.compound, *compound, "{what}");
            assert_eq!(head.from_guid, exp.from_guid, "{what}");
        }
    }
    let hostile: Vec<(&str, Vec<u8>, Expect<'_>, &str)> = vec![
        (
            "send -p",
            send_bytes(&["-p", "-i", &at("s2"), &at("s3")]),
            expect(Some(s("s2")), "s3"),
            "payload",
        ),
        (
            "send -R",
            replication,
            expect(Some(s("s0")), "s3"),
            "payload",
        ),
        (
            "-p package spliced into a -I package",
            splice_before_final_end(
                &send_bytes(&["-I", &at("s0"), &at("s2")]),
                &send_bytes(&["-p", "-i", &at("s2"), &at("s3")]),
            ),
            expect(Some(s("s0")), "s3"),
            "a second package header",
        ),
        (
            "a child's full stream spliced into a -I package",
            splice_before_final_end(
                &send_bytes(&["-I", &at("s0"), &at("s3")]),
                &send_bytes(&[&a.ds("src/kid@k")]),
            ),
            expect(Some(s("s0")), "s3"),
            "another dataset",
        ),
        (
            "the -I package's substreams without their package",
            send_bytes(&["-I", &at("s0"), &at("s3")])[2 * RECORD..].to_vec(),
            expect(Some(s("s0")), "s3"),
            "after the end of the stream",
        ),
    ];
    for (what, data, exp, why) in hostile {
        for _ in 0..10 {
            match validate_split(&data, exp.clone(), &mut rng) {
                Err(e) => assert!(e.contains(why), "{what}: {e}"),
                Ok(_) => panic!("{what} accepted"),
            }
        }
    }
}

/// A real stream's announcement marked `compressed`, then `frame` as its
/// one data frame and `End`: the receiver's answer (an error when it ends
/// the connection).
async fn compressed_attempt(
    opts: &ClientOptions,
    rel: &RelPath,
    snap: &Snapshot,
    frame: Vec<u8>,
    end: u64,
) -> Result<zfsync_common::protocol::Message, ProtocolError> {
    let mut c = Client::connect(opts).await.unwrap();
    assert!(c.compressing(), "the receiver announces zstd");
    assert_eq!(
        c.sync(&SyncRequest::new(rel, std::slice::from_ref(snap)))
            .await
            .unwrap(),
        SyncReply::New { buffered: false }
    );
    c.begin_stream(None, snap).await.unwrap();
    let conn = c.connection();
    conn.send_data(Bytes::from(frame)).await?;
    conn.send(zfsync_common::protocol::Message::End { bytes: end })
        .await?;
    conn.read_msg().await
}

/// ING2 (--compress): a compressed frame that is damaged, not zstd at all, or a zip bomb (4 MiB + 1 of zeros in under 1 KiB) is a refused stream: the connection ends saying why, zfs receive never commits, the receiver's memory does not grow by the bomb, and the same stream compressed honestly is then received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_oversized_compressed_frames_are_refused() {
    let certs = Certs::shared();
    let a = Pool::new("shzst");
    let b = Pool::new("shzst");
    let src = a.ds("src");
    zfs(&["create", &src]);
    write_file(&src, "f.txt", "zfsync\n".repeat(10_000).as_bytes());
    zfs(&["snapshot", &format!("{src}@s1")]);
    let guid: u64 = zfs(&[
        "get",
        "-H",
        "-p",
        "-o",
        "value",
        "guid",
        &format!("{src}@s1"),
    ])
    .trim()
    .parse()
    .unwrap();
    let s1 = Snapshot {
        name: SnapName::new("s1").unwrap(),
        guid,
        createtxg: 7,
    };
    let stream = send_bytes(&[&format!("{src}@s1")]);
    zfs(&["create", &b.ds("t")]);
    let recv = Receiver::start(&b.ds("t"), &certs.receiver_args(), &[]);
    let before = pool_state(&b.name);
    let mut opts = options(certs, recv.port);
    opts.transit = Transit::new(Some(3), None);
    let rel = RelPath::new("/z").unwrap();
    let mut zstd = Deflater::new(3).unwrap();
    let mut damaged = zstd.compress(&stream).unwrap();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x5a;
    let bomb = zstd.compress(&vec![0u8; MAX_INFLATED + 1]).unwrap();
    assert!(bomb.len() < 1 << 10);
    let rss_before = peak_rss_kib(recv.pid());
    let n = stream.len() as u64;
    for (what, frame, says) in [
        ("damaged", damaged, "corrupt compressed data frame"),
        ("not zstd", stream.clone(), "not a zstd frame"),
        ("a zip bomb", bomb, "at most 4194304 are accepted"),
    ] {
        match compressed_attempt(&opts, &rel, &s1, frame, n).await {
            Err(ProtocolError::Peer(reason)) => {
                assert!(reason.contains("refused stream"), "{what}: {reason}");
                assert!(reason.contains(says), "{what}: {reason}");
            }
            other => panic!("{what}: expected the receiver's refusal, got {other:?}"),
        }
        assert_eq!(pool_state(&b.name), before, "{what}: nothing received");
    }
    let rss = peak_rss_kib(recv.pid());
    assert!(
        rss < rss_before + 16 * 1024,
        "the receiver grew from {rss_before} to {rss} KiB"
    );
    recv.wait_for_log("refused stream", 1, Duration::from_secs(10));
    // The honest stream, compressed by the client, is received whole.
    let mut c = Client::connect(&opts).await.unwrap();
    assert_eq!(
        c.sync(&SyncRequest::new(&rel, std::slice::from_ref(&s1)))
            .await
            .unwrap(),
        SyncReply::New { buffered: false }
    );
    c.begin_stream(None, &s1).await.unwrap();
    let sent = c.pump_counted(&mut &stream[..], |_| {}).await.unwrap();
    assert!(sent.wire < sent.bytes, "{sent:?}");
    assert_eq!(c.end_stream(sent.bytes).await.unwrap(), n);
    assert_eq!(
        snapshot_guids(&b.ds("t/z")),
        snapshot_guids(&src),
        "the replica has the sender's snapshot"
    );
}
