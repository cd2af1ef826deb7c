//! Bounded random-input tests for everything that parses bytes from a peer
//! or from `zfs`: the frame decoder, the stream-head check, names and the
//! listing parser must return errors, never panic. Deterministic (seeded),
//! so a failure reproduces; a crash found here becomes a unit test.

use bytes::Bytes;
use zfsync_common::naming::{RelPath, SnapName, SnapshotName};
use zfsync_common::protocol::decode;
use zfsync_common::stream::{check_head, HEAD_MAX, RECORD};
use zfsync_common::zfs::parse_get;

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
