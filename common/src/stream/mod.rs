//! Checks `zfs send` streams before any of their bytes reach `zfs
//! receive`.
//!
//! A receiver must not trust the sender's word about a stream: the bytes
//! decide what `zfs receive` does. Only two shapes are accepted, the two
//! zfsync's sender produces:
//!
//! - a single substream (`zfs send [-i from] snap`): one BEGIN record whose
//!   `fromguid` is the expected base (0 for a full stream) and whose `toguid`
//!   is a snapshot the sender announced, its records, its END;
//! - a package of substreams (`zfs send -I from snap`): a compound BEGIN
//!   with no payload (a payload means `-R` or `-p`: properties and other
//!   datasets, which could mount a replica anywhere or destroy datasets), its
//!   END, substreams checked as above and chained, then a final END.
//!
//! A substream's BEGIN may carry a payload only in the two cases OpenZFS
//! writes one: a resumed send (`zfs send -t`, feature flag RESUMING: the
//! object and offset to go on from) and a raw send (`zfs send -w`, feature
//! flag RAW: the wrapped encryption keys). Neither can name another dataset
//! or set properties; a compound BEGIN's payload still never passes.
//!
//! [`check_head`] decides on the first records alone; [`Validator`] follows
//! the whole stream, record by record, in whatever pieces it arrives, and is
//! what the receiver runs: libzfs reads a package's substreams one after
//! the other and takes a compound header found later as a new package, so
//! a head check alone lets anything through that is spliced in after it.
//!
//! Records are `dmu_replay_record_t` (OpenZFS `include/sys/zfs_ioctl.h`),
//! 312 bytes, in the sending host's byte order (told by the magic number).

mod validate;

pub use validate::{Allow, Expect, Refusal, Validator};

/// Size of one `dmu_replay_record_t`.
pub const RECORD: usize = 312;
/// Most bytes needed to decide: compound BEGIN, END, first substream BEGIN.
pub const HEAD_MAX: usize = 3 * RECORD;

const DMU_BACKUP_MAGIC: u64 = 0x2F5_BACBAC;
/// `drr_type`: the record types of `dmu_replay_record_t`.
const DRR_BEGIN: u32 = 0;
const DRR_OBJECT: u32 = 1;
const DRR_FREEOBJECTS: u32 = 2;
const DRR_WRITE: u32 = 3;
const DRR_FREE: u32 = 4;
const DRR_END: u32 = 5;
const DRR_WRITE_BYREF: u32 = 6;
const DRR_SPILL: u32 = 7;
const DRR_WRITE_EMBEDDED: u32 = 8;
const DRR_OBJECT_RANGE: u32 = 9;
const DRR_REDACT: u32 = 10;
const DMU_SUBSTREAM: u64 = 1;
const DMU_COMPOUNDSTREAM: u64 = 2;
/// `DMU_BACKUP_FEATURE_RESUMING`, in `drr_versioninfo >> 2`.
const FEATURE_RESUMING: u64 = 1 << 20;
/// `DMU_BACKUP_FEATURE_COMPRESSED`.
const FEATURE_COMPRESSED: u64 = 1 << 22;
/// `DMU_BACKUP_FEATURE_RAW`.
const FEATURE_RAW: u64 = 1 << 24;
/// `dmu_objset_type_t` in a BEGIN's `drr_type`: a volume.
const DMU_OST_ZVOL: u32 = 3;
/// `DRR_FLAG_CLONE` in a BEGIN's `drr_flags`: the stream's base is a
/// snapshot of another dataset (the origin of a clone).
const DRR_FLAG_CLONE: u32 = 1;
/// Largest substream payload accepted (resume state or wrapped keys are a
/// few hundred bytes).
const SUBSTREAM_PAYLOAD_MAX: u32 = 64 << 10;

/// What a stream's head says, once it is accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub from_guid: u64,
    /// The first snapshot the stream creates.
    pub first_to_guid: u64,
    pub compound: bool,
    /// The substream's feature flags (`DMU_BACKUP_FEATURE_*`).
    pub features: u64,
    /// The stream is of a volume (`drr_type` `DMU_OST_ZVOL`), not a file
    /// system: a new replica of it has no `canmount`.
    pub volume: bool,
}

/// A raw stream (`zfs send -w`: an encrypted dataset), by its feature flags.
pub fn is_raw(features: u64) -> bool {
    features & FEATURE_RAW != 0
}

/// Names of the stream feature flags, as OpenZFS defines them
/// (`DMU_BACKUP_FEATURE_*` in zfs_ioctl.h).
const FEATURES: [(u64, &str); 16] = [
    (1 << 0, "dedup"),
    (1 << 1, "dedupprops"),
    (
        1 << 2,
        "sa_spill (system attributes: a ZPL version 5 file system)",
    ),
    (1 << 16, "embed_data"),
    (1 << 17, "lz4"),
    (1 << 19, "large_blocks"),
    (1 << 20, "resuming"),
    (1 << 21, "redacted"),
    (1 << 22, "compressed"),
    (1 << 23, "large_dnode"),
    (1 << 24, "raw"),
    (1 << 25, "zstd"),
    (1 << 26, "holds"),
    (1 << 27, "switch_to_large_blocks"),
    (1 << 28, "longname"),
    (1 << 29, "large_microzap"),
];
/// The names of the feature flags set in `features`.
pub fn feature_names(features: u64) -> Vec<String> {
    let mut names: Vec<String> = FEATURES
        .iter()
        .filter(|(bit, _)| features & bit != 0)
        .map(|(_, n)| n.to_string())
        .collect();
    let known = FEATURES.iter().fold(0, |a, (b, _)| a | b);
    if features & !known != 0 {
        names.push(format!("unknown flags {:#x}", features & !known));
    }
    names
}

/// The byte order of a stream: the sending host's, told by the magic
/// number of its first BEGIN record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Order(bool); // true: big-endian

impl Order {
    /// The order in which `rec` (a BEGIN) has the magic number.
    fn of_begin(rec: &[u8]) -> Option<Order> {
        [Order(false), Order(true)]
            .into_iter()
            .find(|o| o.u64(rec, 8) == DMU_BACKUP_MAGIC)
    }
    fn u32(self, b: &[u8], at: usize) -> u32 {
        let mut a = [0u8; 4];
        a.copy_from_slice(&b[at..at + 4]);
        if self.0 {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        }
    }
    fn u64(self, b: &[u8], at: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        if self.0 {
            u64::from_be_bytes(a)
        } else {
            u64::from_le_bytes(a)
        }
    }
}

/// The fields of a BEGIN record zfsync looks at.
struct Begin {
    payload: u32,
    hdrtype: u64,
    features: u64,
    flags: u32,
    /// `drr_type`: the objset type.
    objset: u32,
    to_guid: u64,
    from_guid: u64,
}

impl Begin {
    /// Reads the fields of a BEGIN record (`rec` is [`RECORD`] bytes).
    fn read(rec: &[u8], order: Order) -> Begin {
        let versioninfo = order.u64(rec, 16);
        Begin {
            payload: order.u32(rec, 4),
            hdrtype: versioninfo & 0x3,
            features: (versioninfo >> 2) & 0x3fff_ffff,
            objset: order.u32(rec, 32),
            flags: order.u32(rec, 36),
            to_guid: order.u64(rec, 40),
            from_guid: order.u64(rec, 48),
        }
    }
}

/// Reads a BEGIN record; `rec` is exactly [`RECORD`] bytes.
fn begin(rec: &[u8], order: Option<Order>) -> Result<(Begin, Order), String> {
    let order = match order.or_else(|| Order::of_begin(rec)) {
        Some(o) => o,
        None => return Err("not a zfs send stream (bad magic number)".into()),
    };
    if order.u32(rec, 0) != DRR_BEGIN || order.u64(rec, 8) != DMU_BACKUP_MAGIC {
        return Err("the stream does not start with a BEGIN record".into());
    }
    Ok((Begin::read(rec, order), order))
}

/// A substream payload from `zfs send -t` or `zfs send -w`.
fn payload_allowed(b: &Begin) -> bool {
    b.features & (FEATURE_RESUMING | FEATURE_RAW) != 0 && b.payload <= SUBSTREAM_PAYLOAD_MAX
}

/// Checks the head of a stream: the first records only, so on its own not
/// enough for a receiver, which runs [`Validator`] over every byte. `Ok(None)`:
/// more bytes are needed (at most [`HEAD_MAX`]). `allowed_to` are the GUIDs of the snapshots the sender
/// announced; `expected_from` is the destination's newest snapshot's GUID, or
/// 0 for a full stream.
pub fn check_head(
    head: &[u8],
    expected_from: u64,
    allowed_to: &[u64],
) -> Result<Option<Head>, String> {
    if head.len() < RECORD {
        return Ok(None);
    }
    let (first, order) = begin(&head[..RECORD], None)?;
    if first.payload != 0 && !(first.hdrtype == DMU_SUBSTREAM && payload_allowed(&first)) {
        return Err(format!(
            "the stream carries a {}-byte payload (properties or other datasets: zfs send -R or -p), which this receiver does not accept",
            first.payload
        ));
    }
    let (sub, compound) = match first.hdrtype {
        DMU_SUBSTREAM => (first, false),
        DMU_COMPOUNDSTREAM => {
            if head.len() < HEAD_MAX {
                return Ok(None);
            }
            if order.u32(&head[RECORD..], 0) != DRR_END {
                return Err("a compound stream header without its END record".into());
            }
            let (sub, _) = begin(&head[2 * RECORD..HEAD_MAX], Some(order))?;
            if sub.hdrtype != DMU_SUBSTREAM || (sub.payload != 0 && !payload_allowed(&sub)) {
                return Err("a compound stream whose first part is not a plain substream".into());
            }
            (sub, true)
        }
        other => return Err(format!("unknown stream header type {other}")),
    };
    if sub.from_guid != expected_from {
        return Err(if expected_from == 0 {
            format!(
                "an incremental stream (from guid {}) where a full stream was announced",
                sub.from_guid
            )
        } else {
            format!(
                "the stream starts from guid {}, not from the destination's newest snapshot (guid {expected_from})",
                sub.from_guid
            )
        });
    }
    if !allowed_to.contains(&sub.to_guid) {
        return Err(format!(
            "the stream creates a snapshot (guid {}) the sender did not announce",
            sub.to_guid
        ));
    }
    Ok(Some(Head {
        from_guid: sub.from_guid,
        first_to_guid: sub.to_guid,
        compound,
        features: sub.features,
        volume: sub.objset == DMU_OST_ZVOL,
    }))
}

#[cfg(test)]
mod build;
#[cfg(test)]
mod tests;
