//! The stream format of [`super::FakeZfs`]: real `dmu_replay_record_t`
//! framing (312-byte records, little-endian), as far as zfsync looks at it
//! ([`crate::stream::check_head`]): BEGIN records with magic, header type,
//! feature flags, `toguid`, `fromguid` and `toname`; END records with
//! `toguid`; between them one WRITE record carrying ~1 KiB of filler
//! (`drr_logical_size`), so byte counts are not trivial. `-I` streams are
//! packages: a compound BEGIN (named after the last snapshot, as zfs does)
//! and its END, the substreams, a final END. The receiver's validator
//! ([`crate::stream::Validator`]) follows these as it does real streams.

use crate::stream::RECORD;

const MAGIC: u64 = 0x2F5_BACBAC;
const BEGIN: u32 = 0;
const END: u32 = 5;
const WRITE: u32 = 3;
const SUBSTREAM: u64 = 1;
const COMPOUND: u64 = 2;
/// Filler bytes per snapshot.
const FILLER: usize = 1024;

/// `DMU_BACKUP_FEATURE_EMBED_DATA` and friends, in `versioninfo >> 2`.
pub(super) const EMBED_DATA: u64 = 1 << 16;
pub(super) const LZ4: u64 = 1 << 17;
pub(super) const LARGE_BLOCKS: u64 = 1 << 19;
pub(super) const RESUMING: u64 = 1 << 20;
pub(super) const COMPRESSED: u64 = 1 << 22;
pub(super) const RAW: u64 = 1 << 24;

/// One substream: one snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Sub {
    pub from_guid: u64,
    pub to_guid: u64,
    /// `ds@snap` on the sending side.
    pub toname: String,
    pub features: u64,
}

impl Sub {
    /// The part after `@` of `toname`.
    pub fn snap(&self) -> &str {
        self.toname.split_once('@').map_or("", |(_, s)| s)
    }
}

/// What a complete stream holds.
#[derive(Debug)]
pub(super) struct Parsed {
    pub subs: Vec<Sub>,
}

fn record(kind: u32, payload: u32) -> Vec<u8> {
    let mut r = vec![0u8; RECORD];
    r[0..4].copy_from_slice(&kind.to_le_bytes());
    r[4..8].copy_from_slice(&payload.to_le_bytes());
    r
}

fn put64(r: &mut [u8], at: usize, v: u64) {
    r[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get32(r: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(r[at..at + 4].try_into().unwrap_or_default())
}

fn get64(r: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(r[at..at + 8].try_into().unwrap_or_default())
}

fn begin(hdrtype: u64, features: u64, to: u64, from: u64, toname: &str) -> Vec<u8> {
    let mut r = record(BEGIN, 0);
    put64(&mut r, 8, MAGIC);
    put64(&mut r, 16, hdrtype | (features << 2));
    r[32..36].copy_from_slice(&2u32.to_le_bytes()); // DMU_OST_ZFS
    put64(&mut r, 40, to);
    put64(&mut r, 48, from);
    let name = toname.as_bytes();
    let n = name.len().min(RECORD - 56 - 1);
    r[56..56 + n].copy_from_slice(&name[..n]);
    r
}

fn end(to: u64) -> Vec<u8> {
    let mut r = record(END, 0);
    put64(&mut r, 40, to);
    r
}

/// The bytes of a stream of `subs`; a package if `compound`.
pub(super) fn encode(subs: &[Sub], compound: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if compound {
        let toname = subs.last().map_or("", |s| s.toname.as_str());
        out.extend(begin(COMPOUND, 0, 0, 0, toname));
        out.extend(end(0));
    }
    for s in subs {
        out.extend(begin(
            SUBSTREAM,
            s.features,
            s.to_guid,
            s.from_guid,
            &s.toname,
        ));
        let mut write = record(WRITE, 0);
        put64(&mut write, 32, FILLER as u64); // drr_logical_size
        out.extend(write);
        let mut x = s.to_guid | 1;
        out.extend((0..FILLER).map(|_| {
            // xorshift: incompressible-looking, deterministic.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        }));
        out.extend(end(s.to_guid));
    }
    if compound {
        out.extend(end(0));
    }
    out
}

const INVALID: &str = "cannot receive: invalid backup stream";

/// Reads one substream at `pos`; returns it and the position after its END.
fn substream(b: &[u8], mut pos: usize) -> Result<(Sub, usize), String> {
    let rec = b.get(pos..pos + RECORD).ok_or(INVALID)?;
    if get32(rec, 0) != BEGIN || get64(rec, 8) != MAGIC || get64(rec, 16) & 3 != SUBSTREAM {
        return Err(INVALID.into());
    }
    let name = &rec[56..];
    let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
    let sub = Sub {
        from_guid: get64(rec, 48),
        to_guid: get64(rec, 40),
        toname: String::from_utf8_lossy(name).into_owned(),
        features: (get64(rec, 16) >> 2) & 0x3fff_ffff,
    };
    pos += RECORD + get32(rec, 4) as usize;
    loop {
        let rec = b.get(pos..pos + RECORD).ok_or(INVALID)?;
        pos += RECORD;
        match get32(rec, 0) {
            END if get64(rec, 40) == sub.to_guid => return Ok((sub, pos)),
            END | BEGIN => return Err(INVALID.into()),
            WRITE => pos += get64(rec, 32) as usize,
            _ => {}
        }
    }
}

/// Parses a whole stream; `Err` is what `zfs receive` prints. Only a
/// complete stream parses: every substream with its END, and a package
/// with its final END.
pub(super) fn decode(b: &[u8]) -> Result<Parsed, String> {
    if b.is_empty() {
        return Err("cannot receive: failed to read from stream".into());
    }
    let first = b.get(..RECORD).ok_or(INVALID)?;
    if get32(first, 0) != BEGIN || get64(first, 8) != MAGIC {
        return Err("cannot receive: invalid stream (bad magic number)".into());
    }
    let compound = get64(first, 16) & 3 == COMPOUND;
    // zfs names the kind of stream once it has read the (first) BEGIN.
    let at = if compound { 2 * RECORD } else { 0 };
    let kind = b.get(at..at + RECORD).map(|r| match get64(r, 48) {
        0 => "new filesystem",
        _ => "incremental",
    });
    let invalid = |e: String| match kind {
        Some(kind) if e == INVALID => {
            format!("cannot receive {kind} stream: invalid backup stream")
        }
        _ => e,
    };
    match get64(first, 16) & 3 {
        SUBSTREAM => {
            let (sub, _) = substream(b, 0).map_err(invalid)?;
            Ok(Parsed { subs: vec![sub] })
        }
        COMPOUND => package(b, get32(first, 4) as usize).map_err(invalid),
        _ => Err("cannot receive: invalid stream (unknown header type)".into()),
    }
}

/// The substreams of a package whose compound BEGIN has `payload` bytes.
fn package(b: &[u8], payload: usize) -> Result<Parsed, String> {
    let mut pos = RECORD + payload;
    let rec = b.get(pos..pos + RECORD).ok_or(INVALID)?;
    if get32(rec, 0) != END {
        return Err(INVALID.into());
    }
    pos += RECORD;
    let mut subs = Vec::new();
    loop {
        let rec = b.get(pos..pos + RECORD).ok_or(INVALID)?;
        if get32(rec, 0) == END {
            break;
        }
        let (sub, next) = substream(b, pos)?;
        subs.push(sub);
        pos = next;
    }
    if subs.is_empty() {
        return Err(INVALID.into());
    }
    Ok(Parsed { subs })
}
