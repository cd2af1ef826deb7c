//! The announcement check as a table, and the receive loop's refusals,
//! which end before any `zfs receive` starts.

use std::collections::VecDeque;

use zfsync_common::naming::RelPath;
use zfsync_common::protocol::WireSnap;
use zfsync_common::stream::{Allow, Expect, Validator, HEAD_MAX, RECORD};

use super::*;
use crate::testing::{dataset, ds, snap, target_of};

/// The destination `p/t/a` with snapshots s1 (guid 11) and s2 (guid 12).
fn target() -> Target {
    let mut a = dataset("p/t/a");
    a.snapshots = vec![snap("s1", 11, 1), snap("s2", 12, 2)];
    let mut empty = dataset("p/t/e");
    empty.guid = 5;
    target_of([dataset("p/t"), a, empty])
}

/// The sender has s1, s2, s3 (guids 11-13, its own createtxgs 101-103)
/// and a bookmark of s2.
fn open(t: &Target, dest: &str, mode: Mode, resume_offered: bool) -> Open {
    let rel = RelPath::new(&format!("/{}", ds(dest).leaf())).unwrap();
    Open {
        _lock: t.try_lock(&rel).unwrap(),
        rel,
        dest: ds(dest),
        buffered: false,
        mode,
        announced: vec![
            snap("s1", 11, 101),
            snap("s2", 12, 102),
            snap("s3", 13, 103),
        ],
        bookmarks: vec![snap("s2", 12, 102)],
        resume_offered,
    }
}

fn stream(from_guid: Option<u64>, to: &str, guid: u64, createtxg: u64) -> StreamRequest {
    StreamRequest {
        from_guid,
        to: WireSnap {
            name: to.into(),
            guid,
            createtxg,
        },
        resume: false,
        compressed: false,
    }
}

/// The sender's s3 as a full stream.
fn full_s3() -> StreamRequest {
    stream(None, "s3", 13, 103)
}

/// The sender's s3 as an incremental from s2.
fn s2_to_s3() -> StreamRequest {
    stream(Some(12), "s3", 13, 103)
}

fn check(t: &Target, o: &Open, req: &StreamRequest) -> Result<(u64, bool), String> {
    check_stream(t, o, req)
        .map(|p| (p.from_guid, p.overwrite))
        .map_err(|e| e.to_string())
}

#[test]
fn an_incremental_must_start_from_the_newest_snapshot() {
    let t = target();
    let o = open(&t, "p/t/a", Mode::Direct, false);
    assert_eq!(check(&t, &o, &s2_to_s3()), Ok((12, false)));
    assert_eq!(
        check(&t, &o, &stream(Some(11), "s3", 13, 103)),
        Err("the stream's base is not the newest snapshot of p/t/a".into())
    );
    assert_eq!(
        check(&t, &o, &stream(Some(12), "s2", 12, 102)),
        Err("@s2 is not newer than @s2".into())
    );
    assert_eq!(
        check(&t, &o, &full_s3()),
        Err("p/t/a exists: a full stream cannot be received into it".into())
    );
}

#[test]
fn only_announced_snapshots_with_valid_names() {
    let t = target();
    let o = open(&t, "p/t/a", Mode::Direct, false);
    assert_eq!(
        check(&t, &o, &stream(Some(12), "s4", 14, 104)),
        Err("@s4 was not in the sync request".into())
    );
    // Same name, another snapshot.
    assert_eq!(
        check(&t, &o, &stream(Some(12), "s3", 99, 103)),
        Err("@s3 was not in the sync request".into())
    );
    let bad = check(&t, &o, &stream(Some(12), "a/b", 13, 103)).unwrap_err();
    assert!(bad.starts_with("invalid snapshot: "), "{bad}");
}

#[test]
fn a_full_stream_only_into_nothing_or_an_overwrite() {
    let t = target();
    let o = open(&t, "p/t/new", Mode::Direct, false);
    assert_eq!(check(&t, &o, &full_s3()), Ok((0, false)));
    assert_eq!(
        check(&t, &o, &s2_to_s3()),
        Err("p/t/new does not exist: send a full stream first".into())
    );
    let direct = open(&t, "p/t/e", Mode::Direct, false);
    assert_eq!(
        check(&t, &direct, &full_s3()),
        Err("p/t/e exists: a full stream cannot be received into it".into())
    );
    drop(direct);
    let over = open(&t, "p/t/e", Mode::Overwrite, false);
    assert_eq!(check(&t, &over, &full_s3()), Ok((0, true)));
}

#[test]
fn a_resumed_stream_only_after_an_offer() {
    let t = target();
    let o = open(&t, "p/t/e", Mode::Direct, false);
    let resumed = StreamRequest {
        resume: true,
        ..full_s3()
    };
    assert_eq!(
        check(&t, &o, &resumed),
        Err("a resumed stream, but no resume was offered".into())
    );
    drop(o);
    let offered = open(&t, "p/t/e", Mode::Direct, true);
    // A cut full stream goes on into the dataset it created.
    assert_eq!(check(&t, &offered, &resumed), Ok((0, false)));
    assert_eq!(
        check(&t, &offered, &full_s3()),
        Err("p/t/e holds a cut transfer: resume it first".into())
    );
}

#[test]
fn the_base_may_be_a_bookmark() {
    let t = target();
    let mut o = open(&t, "p/t/a", Mode::Direct, false);
    o.announced.retain(|s| s.guid != 12);
    assert_eq!(check(&t, &o, &s2_to_s3()), Ok((12, false)));
    o.bookmarks.clear();
    assert_eq!(
        check(&t, &o, &s2_to_s3()),
        Err("@s3 is not newer than @s2".into())
    );
}

#[test]
fn the_unsupported_feature_note_names_features_and_zfs() {
    let e = IngestError::Receive {
        source: ZfsError::UnsupportedStreamFeature {
            argv: "zfs receive p/t/a".into(),
            stderr: "cannot receive: stream has unsupported feature".into(),
        },
        discarded: true,
        unsupported: Some(Unsupported {
            features: feature_names(1 << 2),
            zfs: "zfs-fuse 0.7".into(),
        }),
    };
    let text = e.to_string();
    assert!(
        text.contains("unsupported feature; the partial state was discarded (zfs receive -A); the stream uses sa_spill (system attributes: a ZPL version 5 file system), which this receiver's zfs (zfs-fuse 0.7) cannot receive: run the receiver on OpenZFS"),
        "{text}"
    );
}

/// Frames from a list; then the connection is closed.
struct Script(VecDeque<Frame>);

impl Frames for Script {
    async fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        Ok(self.0.pop_front())
    }
}

fn data(len: usize) -> Frame {
    Frame::Data(Bytes::from(vec![0u8; len]))
}

/// Runs [`receive`] for a full stream of s3 into the new `p/t/new`.
async fn run(frames: Vec<Frame>) -> (Result<u64, IngestError>, Script) {
    let t = target();
    let o = open(&t, "p/t/new", Mode::Direct, false);
    let plan = check_stream(&t, &o, &full_s3()).unwrap();
    let mut script = Script(frames.into());
    let got = receive(&t, &mut script, "test", &Caps::default(), &o, &plan).await;
    (got, script)
}

#[tokio::test]
async fn a_bad_head_is_refused_and_drained() {
    let (got, rest) = run(vec![
        data(RECORD),
        data(1000),
        Frame::Msg(Message::End { bytes: 1312 }),
        Frame::Msg(Message::Bye),
    ])
    .await;
    assert_eq!(
        got.unwrap_err().to_string(),
        "refused stream: not a zfs send stream (bad magic number)"
    );
    // Everything up to End was read, nothing after it.
    assert_eq!(rest.0.len(), 1);
}

#[tokio::test]
async fn a_head_shorter_than_a_record_is_too_short() {
    let (got, _) = run(vec![data(100), Frame::Msg(Message::End { bytes: 100 })]).await;
    assert!(matches!(got, Err(IngestError::TooShort)), "{got:?}");
}

#[tokio::test]
async fn abort_cut_and_strays_end_the_stream() {
    let (got, _) = run(vec![
        data(10),
        Frame::Msg(Message::Abort {
            reason: "zfs send failed".into(),
        }),
    ])
    .await;
    assert_eq!(
        got.unwrap_err().to_string(),
        "aborted by the sender: zfs send failed"
    );
    let (got, _) = run(vec![data(10)]).await;
    assert!(
        matches!(got, Err(IngestError::Protocol(ProtocolError::Closed))),
        "{got:?}"
    );
    let (got, _) = run(vec![data(10), Frame::Msg(Message::Finish)]).await;
    assert_eq!(
        got.unwrap_err().to_string(),
        "unexpected message finish (expected stream data, end or abort)"
    );
}

/// A BEGIN record (little-endian) of `hdrtype` (1: substream, 2: package)
/// with a `payload`-byte payload announced.
fn begin(hdrtype: u64, payload: u32, to: u64, from: u64, toname: &str) -> Vec<u8> {
    let mut r = vec![0u8; RECORD];
    r[4..8].copy_from_slice(&payload.to_le_bytes());
    r[8..16].copy_from_slice(&0x2F5_BACBACu64.to_le_bytes());
    r[16..24].copy_from_slice(&hdrtype.to_le_bytes());
    r[40..48].copy_from_slice(&to.to_le_bytes());
    r[48..56].copy_from_slice(&from.to_le_bytes());
    r[56..56 + toname.len()].copy_from_slice(toname.as_bytes());
    r
}

fn end_record() -> Vec<u8> {
    let mut r = vec![0u8; RECORD];
    r[0..4].copy_from_slice(&5u32.to_le_bytes());
    r
}

fn bytes(b: &[u8]) -> Frame {
    Frame::Data(Bytes::copy_from_slice(b))
}

#[tokio::test]
async fn an_empty_data_frame_ends_the_connection() {
    for before in [vec![], vec![data(10)]] {
        let n = before.len() as u64 * 10;
        let mut frames = before;
        frames.push(data(0));
        frames.push(Frame::Msg(Message::End { bytes: n }));
        let (got, rest) = run(frames).await;
        match got {
            Err(IngestError::Protocol(e)) => {
                assert_eq!(e.to_string(), "malformed frame: an empty data frame")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rest.0.len(), 1, "nothing read after the empty frame");
    }
}

#[tokio::test]
async fn records_after_the_head_are_checked_before_zfs_starts() {
    // All in the first frame: a package, its END, a second package header.
    let mut s = begin(2, 0, 0, 0, "src/a@s3");
    s.extend(end_record());
    s.extend(begin(2, 500, 0, 0, "src/a@s3"));
    let n = s.len() as u64;
    let (got, rest) = run(vec![
        bytes(&s),
        data(5000),
        Frame::Msg(Message::End { bytes: n + 5000 }),
        Frame::Msg(Message::Bye),
    ])
    .await;
    assert_eq!(
        got.unwrap_err().to_string(),
        "refused stream: a second package header at byte 624 (zfs send -R/-p); only one plain or -I stream is accepted"
    );
    assert_eq!(rest.0.len(), 1, "drained up to End");
    // A -R package's header, one byte a frame.
    let s = begin(2, 900, 0, 0, "src/a@s3");
    let mut frames: Vec<Frame> = s.chunks(1).map(bytes).collect();
    frames.push(Frame::Msg(Message::End {
        bytes: RECORD as u64,
    }));
    let (got, _) = run(frames).await;
    assert!(
        got.unwrap_err().to_string().contains("900-byte payload"),
        "-R refused"
    );
}

/// What arrives before the head is decided is kept, and only that: in
/// bytes, not frames.
#[tokio::test]
async fn bytes_before_the_head_are_bounded() {
    let t = target();
    let o = open(&t, "p/t/new", Mode::Direct, false);
    let plan = check_stream(&t, &o, &full_s3()).unwrap();
    let mut head = begin(2, 0, 0, 0, "src/a@s3");
    head.extend(end_record());
    head.extend(begin(1, 0, 13, 0, "src/a@s3"));
    let to = plan.to.clone();
    let announced = o.announced.clone();
    let validator = || {
        Validator::new(Expect {
            from_guid: 0,
            from_createtxg: 0,
            to: &to,
            announced: &announced,
            allow: Allow::default(),
        })
    };
    let caps = Caps::default();
    let mut feed = Feed::new(&t, "test", &caps, &o, &plan, validator());
    // One byte a frame, all but the last of the head: still undecided.
    for b in &head[..HEAD_MAX - 1] {
        feed.data(Bytes::copy_from_slice(&[*b])).await.unwrap();
        assert!(feed.early.len() < HEAD_MAX);
    }
    assert_eq!(feed.early.len(), HEAD_MAX - 1);
    assert!(feed.running.is_none() && feed.refused.is_none());
    // Garbage instead of the last byte's record: refused, and the kept
    // bytes are freed; what follows is only counted.
    let mut bad = Feed {
        validator: validator(),
        early: Vec::new(),
        total: 0,
        ..feed
    };
    for _ in 0..2 * HEAD_MAX {
        bad.data(Bytes::from_static(&[0x5a])).await.unwrap();
    }
    assert!(matches!(bad.refused, Some(IngestError::Refused(_))));
    assert_eq!(bad.early.capacity(), 0);
    assert_eq!(bad.total, 2 * HEAD_MAX as u64);
}

/// ING4: an incremental rolls back first only where zfs has `written` and
/// it is not 0 (or unknown); without it (zfs-fuse) never up front.
#[test]
fn a_rollback_only_when_written_says_so() {
    use zfsync_common::caps::Cap;
    let openzfs = Caps::new("zfs-2", [Cap::Written]);
    let fuse = Caps::new("zfs-fuse", [Cap::RecvUnmounted]);
    for (caps, written, want) in [
        (&openzfs, Some(0), false),
        (&openzfs, Some(512), true),
        (&openzfs, None, true),
        (&fuse, None, false),
        (&fuse, Some(512), false),
    ] {
        assert_eq!(
            super::needs_rollback(caps, written),
            want,
            "{caps} {written:?}"
        );
    }
}

/// ING6: a new replica's marks in its first receive, where zfs has
/// `receive -o`: canmount only for a file system; none for a resumed or
/// incremental receive, nor what the admin's options name.
#[test]
fn marks_travel_in_the_first_receive_where_zfs_can() {
    use zfsync_common::caps::Cap;
    use zfsync_common::zfs::RecvOption;
    let args = |v: Vec<RecvOption>| -> Vec<String> { v.iter().flat_map(|o| o.args()).collect() };
    let o = Caps::new("zfs-2", [Cap::RecvSetProp]);
    let fuse = Caps::new("zfs-fuse", [Cap::RecvUnmounted]);
    let admin = [RecvOption::parse("-o canmount=off").unwrap()];
    /// caps, a new dataset, a volume, the admin's options => the options.
    type Row<'a> = (&'a Caps, bool, bool, &'a [RecvOption], &'a [&'a str]);
    let table: Vec<Row> = vec![
        (
            &o,
            true,
            false,
            &[],
            &["-o", "canmount=noauto", "-o", "zfsync:replica=yes"],
        ),
        (&o, true, true, &[], &["-o", "zfsync:replica=yes"]),
        (&o, true, false, &admin, &["-o", "zfsync:replica=yes"]),
        (&o, false, false, &[], &[]),
        (&fuse, true, false, &[], &[]),
    ];
    for (caps, new, volume, admin, want) in table {
        assert_eq!(
            args(super::marks_in_receive(caps, new, volume, admin)),
            want,
            "{caps} new={new} volume={volume}"
        );
    }
}
