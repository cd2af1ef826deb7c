//! Bounded random-input tests for everything that parses bytes from a peer
//! or from `zfs`: the frame decoder, the stream-head check, the stream
//! validator, names and the listing parser must return errors, never panic.
//! Deterministic (seeded), so a failure reproduces; a crash found here
//! becomes a unit test. Valid streams must pass the validator however they
//! are cut, and it must not allocate while it follows them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::Bytes;
use zfsync_common::model::Snapshot;
use zfsync_common::naming::{RelPath, SnapName, SnapshotName};
use zfsync_common::protocol::decode;
use zfsync_common::stream::{check_head, Allow, Expect, Validator, HEAD_MAX, RECORD};
use zfsync_common::zfs::parse_get;

/// Counts the allocations of threads that ask for it (the validator test),
/// and passes everything to the system allocator.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|a| a.set(a.get() + 1));
        }
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> usize {
        (self.next() % n) as usize
    }
    fn bytes(&mut self, max: usize, alphabet: &[u8]) -> Vec<u8> {
        let len = self.below(max as u64 + 1);
        (0..len)
            .map(|_| {
                if alphabet.is_empty() {
                    self.next() as u8
                } else {
                    alphabet[self.below(alphabet.len() as u64)]
                }
            })
            .collect()
    }
}

const ROUNDS: usize = 20_000;

#[test]
fn frame_decoder_never_panics() {
    let mut r = Rng(0x5eed_0001);
    // Mostly plausible JSON around real message names, some raw noise.
    let pieces: [&[u8]; 12] = [
        b"M{\"type\":\"",
        b"sync",
        b"stream",
        b"end",
        b"\",\"path\":\"",
        b"\",\"bytes\":",
        b"18446744073709551616",
        b"-1",
        b"{\"to\":{\"name\":\"s\",\"guid\":1,\"createtxg\":2}}",
        b"}",
        b"D",
        b"\xff\x00",
    ];
    for _ in 0..ROUNDS {
        let mut body = Vec::new();
        for _ in 0..r.below(8) {
            if r.below(4) == 0 {
                body.extend(r.bytes(16, &[]));
            } else {
                body.extend_from_slice(pieces[r.below(pieces.len() as u64)]);
            }
        }
        let _ = decode(Bytes::from(body));
    }
}

#[test]
fn stream_head_check_never_panics_and_never_accepts_noise() {
    let mut r = Rng(0x5eed_0002);
    for _ in 0..ROUNDS {
        let mut head = r.bytes(HEAD_MAX + 8, &[]);
        // Half the time, start with a valid magic so deeper paths run.
        if r.below(2) == 0 && head.len() >= 16 {
            head[0..4].copy_from_slice(&0u32.to_le_bytes());
            head[8..16].copy_from_slice(&0x2F5_BACBACu64.to_le_bytes());
        }
        let from = r.next() % 4;
        match check_head(&head, from, &[1, 2, 3]) {
            Ok(Some(h)) => {
                // Accepted only with an announced snapshot and the right base.
                assert!([1, 2, 3].contains(&h.first_to_guid));
                assert_eq!(h.from_guid, from);
                assert!(head.len() >= RECORD);
            }
            Ok(None) => assert!(head.len() < HEAD_MAX),
            Err(_) => {}
        }
    }
}

#[test]
fn names_never_panic_and_valid_ones_are_safe() {
    let mut r = Rng(0x5eed_0003);
    let alphabet = b"aZ09_-.:@#%/ \t\n\0\x7f\xc3\xa9..";
    for _ in 0..ROUNDS {
        let raw = r.bytes(300, alphabet);
        let s = String::from_utf8_lossy(&raw);
        if let Ok(rel) = RelPath::new(&s) {
            let p = rel.as_str();
            assert!(p.is_empty() || p.starts_with('/'));
            assert!(!p.contains("/../") && !p.ends_with("/..") && !p.contains('@'));
            assert!(!p.bytes().any(|b| b.is_ascii_control()));
            if let Some(h) = rel.buffer_hex() {
                assert_eq!(RelPath::from_buffer_hex(&h).unwrap(), rel);
            }
        }
        let _ = SnapName::new(&s);
        let _ = SnapshotName::new(&s);
        let _ = RelPath::from_buffer_hex(&s);
    }
}

#[test]
fn listing_parser_never_panics() {
    let mut r = Rng(0x5eed_0004);
    let words = [
        "p",
        "p/a",
        "p/a@s",
        "guid",
        "createtxg",
        "type",
        "userrefs",
        "zfsync:x",
        "1",
        "-",
        "snapshot",
        "filesystem",
        "local",
        "\t",
        "\n",
        "18446744073709551615",
        "x y",
    ];
    for _ in 0..ROUNDS {
        let mut out = String::new();
        for _ in 0..r.below(40) {
            out.push_str(words[r.below(words.len() as u64)]);
            out.push(if r.below(3) == 0 { '\n' } else { '\t' });
        }
        let _ = parse_get(&out);
    }
}

/// Synthetic streams for the validator, built as zfs writes them (little-
/// or big-endian): `ds@sN` has GUID 10 + N and createtxg 100 + N.
struct Stream {
    be: bool,
    out: Vec<u8>,
}

impl Stream {
    fn record(&mut self, kind: u32) -> usize {
        let at = self.out.len();
        self.out.resize(at + RECORD, 0);
        self.put32(at, kind);
        at
    }
    fn put32(&mut self, at: usize, v: u32) {
        let b = if self.be {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.out[at..at + 4].copy_from_slice(&b);
    }
    fn put64(&mut self, at: usize, v: u64) {
        let b = if self.be {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.out[at..at + 8].copy_from_slice(&b);
    }
    fn begin(&mut self, hdrtype: u64, to: u64, from: u64, toname: &str) {
        let at = self.record(0);
        self.put64(at + 8, 0x2F5_BACBAC);
        self.put64(at + 16, hdrtype);
        self.put64(at + 40, to);
        self.put64(at + 48, from);
        self.out[at + 56..at + 56 + toname.len()].copy_from_slice(toname.as_bytes());
    }
    fn end(&mut self, to: u64) {
        let at = self.record(5);
        self.put64(at + 40, to);
    }
    /// Random records with their data, as in a substream.
    fn records(&mut self, r: &mut Rng) {
        for _ in 0..r.below(12) {
            match r.below(6) {
                0 => {
                    let at = self.record(1); // OBJECT
                    let bonus = r.below(400) as u32;
                    self.put32(at + 28, bonus);
                    self.out
                        .resize(self.out.len() + bonus.next_multiple_of(8) as usize, 7);
                }
                1 => {
                    let at = self.record(3); // WRITE
                    let len = 512 << r.below(6);
                    self.put64(at + 32, len);
                    self.out.resize(self.out.len() + len as usize, 3);
                }
                2 => {
                    let at = self.record(8); // WRITE_EMBEDDED
                    let psize = r.below(113) as u32;
                    self.put32(at + 52, psize);
                    self.out
                        .resize(self.out.len() + psize.next_multiple_of(8) as usize, 8);
                }
                3 => {
                    let at = self.record(7); // SPILL
                    self.put64(at + 16, 512);
                    self.out.resize(self.out.len() + 512, 9);
                }
                _ => {
                    let kinds = [2, 4, 6, 9, 10];
                    self.record(kinds[r.below(kinds.len() as u64)]);
                }
            }
        }
    }
    fn substream(&mut self, r: &mut Rng, from: u64, to: u64) {
        self.begin(1, to, from, &format!("p/ds@s{}", to - 10));
        self.records(r);
        self.end(to);
    }
}

fn snapshots() -> Vec<Snapshot> {
    (0..8)
        .map(|i| Snapshot {
            name: SnapName::new(&format!("s{i}")).unwrap(),
            guid: 10 + i,
            createtxg: 100 + i,
        })
        .collect()
}

/// A valid random stream: a plain substream or a -I package from `from`
/// (0: full) to `to`.
fn valid_stream(r: &mut Rng, from: u64, to: u64) -> Vec<u8> {
    let mut s = Stream {
        be: r.below(2) == 0,
        out: Vec::new(),
    };
    if from == 0 || to == from + 1 && r.below(2) == 0 {
        s.substream(r, from, to);
    } else {
        s.begin(2, 0, 0, &format!("p/ds@s{}", to - 10));
        s.end(0);
        for g in from + 1..=to {
            s.substream(r, g - 1, g);
        }
        s.end(0);
    }
    s.out
}

fn expect(snaps: &[Snapshot], from: u64, to: u64) -> Expect<'_> {
    Expect {
        from_guid: from,
        from_createtxg: if from == 0 { 0 } else { from + 90 },
        to: &snaps[(to - 10) as usize],
        announced: snaps,
        allow: Allow::default(),
    }
}

/// Random cut points: single bytes, pieces around a record, large ones.
fn pieces<'a>(r: &mut Rng, mut data: &'a [u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let n = match r.below(4) {
            0 => 1,
            1 => RECORD - 2 + r.below(5),
            2 => 1 + r.below(2 * RECORD as u64),
            _ => 1 + r.below(100_000),
        }
        .min(data.len());
        out.push(&data[..n]);
        data = &data[n..];
    }
    out
}

fn random_plan(r: &mut Rng) -> (u64, u64) {
    let from = if r.below(4) == 0 {
        0
    } else {
        10 + r.below(3) as u64
    };
    let to = from.max(10) + 1 + r.below(4) as u64;
    (from, to)
}

#[test]
fn valid_streams_pass_the_validator_however_they_are_cut() {
    let mut r = Rng(0x5eed_0005);
    let snaps = snapshots();
    for _ in 0..2_000 {
        let (from, to) = random_plan(&mut r);
        let data = valid_stream(&mut r, from, to);
        let mut v = Validator::new(expect(&snaps, from, to));
        for p in pieces(&mut r, &data) {
            v.feed(p)
                .unwrap_or_else(|e| panic!("from {from} to {to}: {e}"));
        }
        assert!(v.is_complete(), "from {from} to {to}");
        assert_eq!(v.head().unwrap().from_guid, from);
    }
}

#[test]
fn the_validator_never_panics_on_noise_or_damage() {
    let mut r = Rng(0x5eed_0006);
    let snaps = snapshots();
    for round in 0..ROUNDS {
        let (from, to) = random_plan(&mut r);
        let mut data = if round % 2 == 0 {
            // Damage a valid stream: bytes flipped, cut, or repeated.
            let mut d = valid_stream(&mut r, from, to);
            for _ in 0..1 + r.below(4) {
                let i = r.below(d.len() as u64);
                match r.below(3) {
                    0 => d[i] ^= 1 << r.below(8),
                    1 => d.truncate(i),
                    _ => {
                        let tail = d[i..].to_vec();
                        d.extend(tail);
                    }
                }
                if d.is_empty() {
                    break;
                }
            }
            d
        } else {
            r.bytes(3 * RECORD, &[])
        };
        if round % 4 == 1 && data.len() >= 16 {
            data[0..4].copy_from_slice(&0u32.to_le_bytes());
            data[8..16].copy_from_slice(&0x2F5_BACBACu64.to_le_bytes());
        }
        let mut v = Validator::new(expect(&snaps, from, to));
        for p in pieces(&mut r, &data) {
            if v.feed(p).is_err() {
                break;
            }
        }
        if let Some(h) = v.head() {
            assert_eq!(h.from_guid, from);
            assert!(snaps.iter().any(|s| s.guid == h.first_to_guid));
        }
    }
}

#[test]
fn the_validator_does_not_allocate() {
    let mut r = Rng(0x5eed_0007);
    let snaps = snapshots();
    let streams: Vec<(u64, u64, Vec<u8>)> = (0..200)
        .map(|_| {
            let (from, to) = random_plan(&mut r);
            (from, to, valid_stream(&mut r, from, to))
        })
        .collect();
    let cut: Vec<Vec<&[u8]>> = streams.iter().map(|(_, _, d)| pieces(&mut r, d)).collect();
    let mut validators: Vec<Validator<'_>> = streams
        .iter()
        .map(|(from, to, _)| Validator::new(expect(&snaps, *from, *to)))
        .collect();
    COUNTING.with(|c| c.set(true));
    let mut records = 0u64;
    for (v, pieces) in validators.iter_mut().zip(&cut) {
        for p in pieces {
            let _ = v.feed(p);
        }
        records += v.offset() / RECORD as u64;
    }
    COUNTING.with(|c| c.set(false));
    assert!(validators.iter().all(Validator::is_complete));
    assert_eq!(
        ALLOCATIONS.with(Cell::get),
        0,
        "allocations while following {records} records"
    );
}
