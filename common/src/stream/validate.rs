//! [`Validator`]: follows a whole `zfs send` stream, record by record, as it
//! arrives in pieces of any size, and refuses it at the first record that
//! is not part of the one plain or `-I` stream the receiver agreed to.
//!
//! It walks the stream as libzfs and the kernel do: every record is 312
//! bytes, and the data after it is as long as the record's own fields say
//! (OpenZFS `DRR_*_PAYLOAD_SIZE` in `zfs_ioctl.h`): a BEGIN's
//! `drr_payloadlen`; an OBJECT's bonus (`drr_raw_bonuslen`, else
//! `drr_bonuslen` rounded up to 8); a WRITE's `drr_compressed_size` when
//! `drr_compressiontype` is set, else `drr_logical_size`; a SPILL's
//! `drr_compressed_size` when set, else `drr_length`; a WRITE_EMBEDDED's
//! `drr_psize` rounded up to 8; nothing for FREEOBJECTS, FREE,
//! WRITE_BYREF, OBJECT_RANGE, REDACT and END. Where zfs-fuse (pool version
//! 23) and OpenZFS 2.x read a record differently (the fields OpenZFS added
//! for compressed and raw sends), those fields must be zero unless the
//! substream's feature flags and both ends' capabilities ([`Allow`]) say
//! otherwise, so that the two readings agree and no record can hide in data
//! the receiver's zfs reads as records.
//!
//! Accepted, in order: a plain substream; or a package header without
//! payload, its END, substreams, a final END. Every substream's
//! `drr_toname` is `<dataset>@<announced snapshot>` (one dataset for the
//! whole stream, the package header's included), its `toguid` that
//! snapshot's GUID, newer (by the sender's createtxg) than the one before
//! and not newer than the announced last one; the first starts from the
//! destination's newest snapshot (or nothing, for a full stream), each next
//! from the one before; nothing follows the last END. (A stream that ends
//! before the announced snapshot is made of the sender's own snapshots: the
//! receiver reports it after `zfs receive`, ING7.) Checksums are left to
//! `zfs receive`, which verifies them; a stream refused here never reaches
//! it.
//!
//! Per record nothing is allocated: a record split between pieces is
//! carried in a fixed 312-byte buffer, data is skipped by counting.

use thiserror::Error;

use super::*;
use crate::model::Snapshot;

/// Largest WRITE or SPILL data: `SPA_MAXBLOCKSIZE`.
const BLOCK_MAX: u64 = 16 << 20;
/// Largest OBJECT bonus: a dnode is at most 16 KiB (`DNODE_MAX_SIZE`).
const BONUS_MAX: u64 = 16 << 10;
/// Largest WRITE_EMBEDDED data: what fits in a block pointer
/// (`BPE_PAYLOAD_SIZE`).
const EMBEDDED_MAX: u64 = 112;
/// `drr_toname` is `char[MAXNAMELEN]`.
const NAME_MAX: usize = 256;
const TONAME: usize = 56;

/// What a stream must be, from the announcement the receiver accepted.
#[derive(Clone, Debug)]
pub struct Expect<'a> {
    /// The destination's newest snapshot, the stream's base; 0 for a full
    /// stream.
    pub from_guid: u64,
    /// The base's createtxg on the sender (0 for a full stream).
    pub from_createtxg: u64,
    /// The announced snapshot the stream ends at.
    pub to: &'a Snapshot,
    /// The sender's snapshots of the dataset (names, GUIDs, its createtxgs).
    pub announced: &'a [Snapshot],
    pub allow: Allow,
}

/// Stream features that change how records are read, and that only some
/// receivers take: each is allowed only when both ends have it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allow {
    /// The stream continues a cut one (`zfs send -t` after a resume
    /// offer): its first substream may carry the resume state (RESUMING).
    pub resumed: bool,
    /// Raw substreams (`zfs send -w`): the wrapped keys as payload, raw
    /// OBJECT bonus and SPILL sizes, compressed WRITEs.
    pub raw: bool,
    /// Compressed WRITEs (`zfs send -c`).
    pub compressed: bool,
}

/// Why a stream is refused. Offsets count from the stream's first byte.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum Refusal {
    #[error("not a zfs send stream (bad magic number)")]
    BadMagic,
    #[error("the stream does not start with a BEGIN record")]
    NotBegin,
    #[error("unknown stream header type {hdrtype} at byte {at}")]
    UnknownHeader { at: u64, hdrtype: u64 },
    #[error("the package header carries a {len}-byte payload (properties or other datasets: zfs send -R or -p), which this receiver does not accept")]
    PackagePayload { len: u32 },
    #[error("a package header without its END record (byte {at})")]
    NoPackageEnd { at: u64 },
    #[error("a package without any substream (byte {at})")]
    EmptyPackage { at: u64 },
    #[error("a second package header at byte {at} (zfs send -R/-p); only one plain or -I stream is accepted")]
    SecondPackage { at: u64 },
    #[error("{} record at byte {at} where a substream must begin", record_name(*.kind))]
    NotSubstream { at: u64, kind: u32 },
    #[error("a BEGIN record at byte {at} in the other byte order")]
    ByteOrder { at: u64 },
    #[error("a BEGIN record at byte {at} without the stream's magic number")]
    BeginMagic { at: u64 },
    #[error("the substream at byte {at} carries a {len}-byte payload; only a resumed (zfs send -t) or raw (zfs send -w) substream may carry one (up to 64 KiB), where both ends can")]
    SubstreamPayload { at: u64, len: u32 },
    #[error("a resumed substream at byte {at}, but only the first substream of a stream announced as a resume may be one")]
    Resuming { at: u64 },
    #[error("a clone substream at byte {at} (zfs send -i from another dataset's snapshot)")]
    Clone { at: u64 },
    #[error("a name at byte {at} that is not DATASET@SNAPSHOT")]
    BadName { at: u64 },
    #[error("a substream of another dataset at byte {at}: {name:?} in a stream of {dataset:?}")]
    OtherDataset {
        at: u64,
        name: String,
        dataset: String,
    },
    #[error("an incremental stream (from guid {from}) where a full stream was announced")]
    NotFull { from: u64 },
    #[error("the stream starts from guid {from}, not from the destination's newest snapshot (guid {expected})")]
    WrongBase { from: u64, expected: u64 },
    #[error("the substream at byte {at} starts from guid {from}, not from the snapshot before it (guid {prev})")]
    BrokenChain { at: u64, from: u64, prev: u64 },
    #[error("the stream creates a snapshot (guid {guid}) the sender did not announce (byte {at})")]
    NotAnnounced { at: u64, guid: u64 },
    #[error("the substream at byte {at} names @{named} but carries the GUID of @{snapshot}")]
    WrongName {
        at: u64,
        named: String,
        snapshot: String,
    },
    #[error("@{name} (guid {guid}) at byte {at} is not newer than the snapshot before it")]
    NotNewer { at: u64, name: String, guid: u64 },
    #[error("@{name} (guid {guid}) at byte {at} is newer than the announced @{to}")]
    PastTarget {
        at: u64,
        name: String,
        guid: u64,
        to: String,
    },
    #[error("a BEGIN record inside a substream at byte {at}")]
    BeginInSubstream { at: u64 },
    #[error("an unknown record type {kind} at byte {at}")]
    UnknownRecord { at: u64, kind: u32 },
    #[error("{} record at byte {at} claims {len} bytes of data, more than zfs writes ({max})", record_name(*.kind))]
    Oversized {
        at: u64,
        kind: u32,
        len: u64,
        max: u64,
    },
    #[error("{} record at byte {at} carries {what} data, which this stream's features and the two ends' zfs do not allow", record_name(*.kind))]
    Unframed {
        at: u64,
        kind: u32,
        what: &'static str,
    },
    #[error("data after the end of the stream at byte {at}")]
    Trailing { at: u64 },
}

/// A record type with its article, for messages.
fn record_name(kind: u32) -> &'static str {
    match kind {
        DRR_BEGIN => "a BEGIN",
        DRR_OBJECT => "an OBJECT",
        DRR_FREEOBJECTS => "a FREEOBJECTS",
        DRR_WRITE => "a WRITE",
        DRR_FREE => "a FREE",
        DRR_END => "an END",
        DRR_WRITE_BYREF => "a WRITE_BYREF",
        DRR_SPILL => "a SPILL",
        DRR_WRITE_EMBEDDED => "a WRITE_EMBEDDED",
        DRR_OBJECT_RANGE => "an OBJECT_RANGE",
        DRR_REDACT => "a REDACT",
        _ => "an unknown",
    }
}

/// Where in the stream's grammar the next record falls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The first BEGIN: a substream, or a package header.
    Start,
    /// The package header's END.
    PackageEnd,
    /// Between a package's substreams: a BEGIN or the final END.
    Between,
    /// The records of a substream, up to its END.
    Inside,
    /// Complete: nothing may follow.
    Done,
}

/// Follows one stream; see the module documentation.
pub struct Validator<'a> {
    expect: Expect<'a>,
    state: State,
    /// The stream's byte order, from its first BEGIN.
    order: Order,
    compound: bool,
    /// A record split between pieces: its first `carried` bytes.
    carry: [u8; RECORD],
    carried: usize,
    /// Data bytes (after a record) still to come before the next record.
    skip: u64,
    /// Offset of the next byte.
    at: u64,
    /// The dataset part of the first `drr_toname` (package header or
    /// substream): every substream must name it.
    dataset: [u8; NAME_MAX],
    dataset_len: usize,
    substreams: u64,
    /// The last substream's snapshot: its GUID and the sender's createtxg
    /// (before the first substream, the base's createtxg).
    prev_guid: u64,
    prev_createtxg: u64,
    /// The current substream's feature flags.
    features: u64,
    head: Option<Head>,
    refused: Option<Refusal>,
}

impl<'a> Validator<'a> {
    pub fn new(expect: Expect<'a>) -> Validator<'a> {
        Validator {
            prev_createtxg: expect.from_createtxg,
            expect,
            state: State::Start,
            order: Order(false),
            compound: false,
            carry: [0; RECORD],
            carried: 0,
            skip: 0,
            at: 0,
            dataset: [0; NAME_MAX],
            dataset_len: 0,
            substreams: 0,
            prev_guid: 0,
            features: 0,
            head: None,
            refused: None,
        }
    }

    /// Takes the next piece of the stream. After a refusal every call
    /// returns it again.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), Refusal> {
        if let Some(r) = &self.refused {
            return Err(r.clone());
        }
        let result = self.walk(data);
        if let Err(r) = &result {
            self.refused = Some(r.clone());
        }
        result
    }

    /// The first substream's BEGIN, once it passed: what `zfs receive`
    /// will be started for.
    pub fn head(&self) -> Option<&Head> {
        self.head.as_ref()
    }

    /// The stream ended where it must: a plain substream's END, or a
    /// package's final END.
    pub fn is_complete(&self) -> bool {
        self.state == State::Done && self.refused.is_none()
    }

    /// How many substreams (snapshots) began so far. Each creates an
    /// announced snapshot newer (by the sender's createtxg) than the one
    /// before and not newer than the announced last: once
    /// [`Validator::is_complete`], when the count equals the number of
    /// announced snapshots in that range, those are exactly what a receive
    /// of the stream creates.
    pub fn substreams(&self) -> u64 {
        self.substreams
    }

    /// The GUID of the last substream's snapshot (0 before the first).
    pub fn last_created(&self) -> u64 {
        if self.substreams == 0 {
            0
        } else {
            self.prev_guid
        }
    }

    /// Bytes taken so far.
    pub fn offset(&self) -> u64 {
        self.at
    }

    fn walk(&mut self, mut data: &[u8]) -> Result<(), Refusal> {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len() as u64);
                self.skip -= n;
                self.at += n;
                data = &data[n as usize..];
                continue;
            }
            if self.state == State::Done {
                return Err(Refusal::Trailing { at: self.at });
            }
            if self.carried == 0 {
                if let Some((rec, rest)) = data.split_first_chunk::<RECORD>() {
                    let at = self.at;
                    self.at += RECORD as u64;
                    data = rest;
                    self.record(rec, at)?;
                    continue;
                }
            }
            let n = (RECORD - self.carried).min(data.len());
            self.carry[self.carried..self.carried + n].copy_from_slice(&data[..n]);
            self.carried += n;
            self.at += n as u64;
            data = &data[n..];
            if self.carried == RECORD {
                self.carried = 0;
                let rec = self.carry;
                self.record(&rec, self.at - RECORD as u64)?;
            }
        }
        Ok(())
    }

    /// One whole record at offset `at`; sets how much data follows it.
    fn record(&mut self, rec: &[u8; RECORD], at: u64) -> Result<(), Refusal> {
        if self.state == State::Start {
            return self.first(rec);
        }
        let kind = self.order.u32(rec, 0);
        match (self.state, kind) {
            (State::PackageEnd, DRR_END) => self.state = State::Between,
            (State::PackageEnd, _) => return Err(Refusal::NoPackageEnd { at }),
            (State::Between, DRR_BEGIN) => self.substream(rec, at)?,
            (State::Between, DRR_END) if self.substreams == 0 => {
                return Err(Refusal::EmptyPackage { at })
            }
            (State::Between, DRR_END) => self.state = State::Done,
            (State::Between, kind) => return Err(Refusal::NotSubstream { at, kind }),
            (State::Inside, _) => self.inside(rec, kind, at)?,
            // `walk` stops before a record after the end.
            (State::Done, _) => return Err(Refusal::Trailing { at }),
            (State::Start, _) => return self.first(rec),
        }
        Ok(())
    }

    /// The stream's first record: a substream's BEGIN or a package header.
    fn first(&mut self, rec: &[u8; RECORD]) -> Result<(), Refusal> {
        self.order = Order::of_begin(rec).ok_or(Refusal::BadMagic)?;
        if self.order.u32(rec, 0) != DRR_BEGIN {
            return Err(Refusal::NotBegin);
        }
        let b = Begin::read(rec, self.order);
        match b.hdrtype {
            DMU_SUBSTREAM => self.substream(rec, 0),
            DMU_COMPOUNDSTREAM => {
                if b.payload != 0 {
                    return Err(Refusal::PackagePayload { len: b.payload });
                }
                let (dataset, _) = split_name(rec).ok_or(Refusal::BadName { at: 0 })?;
                self.dataset[..dataset.len()].copy_from_slice(dataset);
                self.dataset_len = dataset.len();
                self.compound = true;
                self.state = State::PackageEnd;
                Ok(())
            }
            hdrtype => Err(Refusal::UnknownHeader { at: 0, hdrtype }),
        }
    }

    /// A substream's BEGIN at `at`.
    fn substream(&mut self, rec: &[u8; RECORD], at: u64) -> Result<(), Refusal> {
        if self.order.u64(rec, 8) != DMU_BACKUP_MAGIC {
            return Err(match Order::of_begin(rec) {
                Some(_) => Refusal::ByteOrder { at },
                None => Refusal::BeginMagic { at },
            });
        }
        let b = Begin::read(rec, self.order);
        match b.hdrtype {
            DMU_SUBSTREAM => {}
            DMU_COMPOUNDSTREAM => return Err(Refusal::SecondPackage { at }),
            hdrtype => return Err(Refusal::UnknownHeader { at, hdrtype }),
        }
        let first = self.substreams == 0;
        let allow = self.expect.allow;
        let resuming = b.features & FEATURE_RESUMING != 0;
        let raw = b.features & FEATURE_RAW != 0 && allow.raw;
        if b.payload != 0
            && !(b.payload <= SUBSTREAM_PAYLOAD_MAX
                && ((resuming && first && allow.resumed) || raw))
        {
            return Err(Refusal::SubstreamPayload { at, len: b.payload });
        }
        if resuming && !(first && allow.resumed) {
            return Err(Refusal::Resuming { at });
        }
        if b.flags & DRR_FLAG_CLONE != 0 {
            return Err(Refusal::Clone { at });
        }
        let (dataset, snap) = split_name(rec).ok_or(Refusal::BadName { at })?;
        if self.dataset_len == 0 {
            self.dataset[..dataset.len()].copy_from_slice(dataset);
            self.dataset_len = dataset.len();
        } else if dataset != &self.dataset[..self.dataset_len] {
            return Err(Refusal::OtherDataset {
                at,
                name: String::from_utf8_lossy(name_of(rec)).into_owned(),
                dataset: String::from_utf8_lossy(&self.dataset[..self.dataset_len]).into_owned(),
            });
        }
        let expected = if first {
            self.expect.from_guid
        } else {
            self.prev_guid
        };
        if b.from_guid != expected {
            return Err(match (first, expected) {
                (true, 0) => Refusal::NotFull { from: b.from_guid },
                (true, _) => Refusal::WrongBase {
                    from: b.from_guid,
                    expected,
                },
                (false, _) => Refusal::BrokenChain {
                    at,
                    from: b.from_guid,
                    prev: expected,
                },
            });
        }
        let announced = self.expect.announced.iter().find(|s| s.guid == b.to_guid);
        let Some(s) = announced else {
            return Err(Refusal::NotAnnounced {
                at,
                guid: b.to_guid,
            });
        };
        if s.name.as_str().as_bytes() != snap {
            return Err(Refusal::WrongName {
                at,
                named: String::from_utf8_lossy(snap).escape_debug().to_string(),
                snapshot: s.name.to_string(),
            });
        }
        if s.createtxg <= self.prev_createtxg {
            return Err(Refusal::NotNewer {
                at,
                name: s.name.to_string(),
                guid: s.guid,
            });
        }
        if s.createtxg > self.expect.to.createtxg {
            return Err(Refusal::PastTarget {
                at,
                name: s.name.to_string(),
                guid: s.guid,
                to: self.expect.to.name.to_string(),
            });
        }
        if first {
            self.head = Some(Head {
                from_guid: b.from_guid,
                first_to_guid: b.to_guid,
                compound: self.compound,
                features: b.features,
                volume: b.objset == DMU_OST_ZVOL,
            });
        }
        self.substreams += 1;
        self.prev_guid = s.guid;
        self.prev_createtxg = s.createtxg;
        self.features = b.features;
        self.skip = u64::from(b.payload);
        self.state = State::Inside;
        Ok(())
    }

    /// A record inside a substream: how much data follows it.
    fn inside(&mut self, rec: &[u8; RECORD], kind: u32, at: u64) -> Result<(), Refusal> {
        let o = self.order;
        let raw = self.features & FEATURE_RAW != 0 && self.expect.allow.raw;
        let compressed =
            raw || (self.features & FEATURE_COMPRESSED != 0 && self.expect.allow.compressed);
        let unframed = |what| Refusal::Unframed { at, kind, what };
        let (len, max) = match kind {
            DRR_BEGIN if o.u64(rec, 16) & 0x3 == DMU_COMPOUNDSTREAM => {
                return Err(Refusal::SecondPackage { at })
            }
            DRR_BEGIN => return Err(Refusal::BeginInSubstream { at }),
            DRR_END => {
                self.state = if self.compound {
                    State::Between
                } else {
                    State::Done
                };
                return Ok(());
            }
            DRR_FREEOBJECTS | DRR_FREE | DRR_WRITE_BYREF | DRR_OBJECT_RANGE | DRR_REDACT => {
                return Ok(())
            }
            DRR_OBJECT => match o.u32(rec, 36) {
                0 => (u64::from(o.u32(rec, 28)).next_multiple_of(8), BONUS_MAX),
                _ if !raw => return Err(unframed("raw (encrypted)")),
                raw_bonuslen => (u64::from(raw_bonuslen), BONUS_MAX),
            },
            DRR_WRITE => match rec[50] {
                0 => (o.u64(rec, 32), BLOCK_MAX),
                _ if !compressed => return Err(unframed("compressed")),
                _ => (o.u64(rec, 96), BLOCK_MAX),
            },
            DRR_SPILL => match o.u64(rec, 40) {
                0 => (o.u64(rec, 16), BLOCK_MAX),
                _ if !raw => return Err(unframed("raw (encrypted)")),
                compressed_size => (compressed_size, BLOCK_MAX),
            },
            DRR_WRITE_EMBEDDED => (u64::from(o.u32(rec, 52)).next_multiple_of(8), EMBEDDED_MAX),
            kind => return Err(Refusal::UnknownRecord { at, kind }),
        };
        if len > max {
            return Err(Refusal::Oversized { at, kind, len, max });
        }
        self.skip = len;
        Ok(())
    }
}

/// `drr_toname` up to its NUL (the whole field if it has none).
fn name_of(rec: &[u8; RECORD]) -> &[u8] {
    let name = &rec[TONAME..];
    name.iter()
        .position(|&c| c == 0)
        .map_or(name, |n| &name[..n])
}

/// `drr_toname` as (dataset, snapshot): NUL-terminated, one `@`, neither
/// part empty.
fn split_name(rec: &[u8; RECORD]) -> Option<(&[u8], &[u8])> {
    let field = &rec[TONAME..];
    let name = &field[..field.iter().position(|&c| c == 0)?];
    let at = name.iter().position(|&c| c == b'@')?;
    let (dataset, snap) = (&name[..at], &name[at + 1..]);
    (!dataset.is_empty() && !snap.is_empty() && !snap.contains(&b'@')).then_some((dataset, snap))
}

#[cfg(test)]
mod tests;
