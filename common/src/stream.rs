//! Checks the head of a `zfs send` stream before any of it reaches
//! `zfs receive`.
//!
//! A receiver must not trust the sender's word about a stream: the bytes
//! decide what `zfs receive` does. Only two shapes are accepted, the two
//! zfsync's sender produces:
//!
//! - a single substream (`zfs send [-i from] snap`): one BEGIN record whose
//!   `fromguid` is the expected base (0 for a full stream) and whose `toguid`
//!   is a snapshot the sender announced;
//! - a package of substreams (`zfs send -I from snap`): a compound BEGIN
//!   with no payload (a payload means `-R` or `-p`: properties and other
//!   datasets, which could mount a replica anywhere or destroy datasets), its
//!   END, then a first substream checked as above.
//!
//! A substream's BEGIN may carry a payload only in the two cases OpenZFS
//! writes one: a resumed send (`zfs send -t`, feature flag RESUMING: the
//! object and offset to go on from) and a raw send (`zfs send -w`, feature
//! flag RAW: the wrapped encryption keys). Neither can name another dataset
//! or set properties; a compound BEGIN's payload still never passes.
//!
//! Records are `dmu_replay_record_t`, 312 bytes, in the sending host's byte
//! order (told by the magic number).

/// Size of one `dmu_replay_record_t`.
pub const RECORD: usize = 312;
/// Most bytes needed to decide: compound BEGIN, END, first substream BEGIN.
pub const HEAD_MAX: usize = 3 * RECORD;

const DMU_BACKUP_MAGIC: u64 = 0x2F5_BACBAC;
const DRR_BEGIN: u32 = 0;
const DRR_END: u32 = 5;
const DMU_SUBSTREAM: u64 = 1;
const DMU_COMPOUNDSTREAM: u64 = 2;
/// `DMU_BACKUP_FEATURE_RESUMING`, in `drr_versioninfo >> 2`.
const FEATURE_RESUMING: u64 = 1 << 20;
/// `DMU_BACKUP_FEATURE_RAW`.
const FEATURE_RAW: u64 = 1 << 24;
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
}

/// Names of the stream feature flags, as OpenZFS defines them
/// (`DMU_BACKUP_FEATURE_*` in zfs_ioctl.h).
const FEATURES: [(u64, &str); 14] = [
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
    (1 << 26, "switch_to_large_blocks"),
    (1 << 27, "longname"),
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

#[derive(Clone, Copy)]
struct Order(bool); // true: big-endian

impl Order {
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

struct Begin {
    payload: u32,
    hdrtype: u64,
    features: u64,
    to_guid: u64,
    from_guid: u64,
}

/// Reads a BEGIN record; `rec` is exactly [`RECORD`] bytes.
fn begin(rec: &[u8], order: Option<Order>) -> Result<(Begin, Order), String> {
    let order = match order {
        Some(o) => o,
        None => {
            if Order(false).u64(rec, 8) == DMU_BACKUP_MAGIC {
                Order(false)
            } else if Order(true).u64(rec, 8) == DMU_BACKUP_MAGIC {
                Order(true)
            } else {
                return Err("not a zfs send stream (bad magic number)".into());
            }
        }
    };
    if order.u32(rec, 0) != DRR_BEGIN || order.u64(rec, 8) != DMU_BACKUP_MAGIC {
        return Err("the stream does not start with a BEGIN record".into());
    }
    Ok((
        Begin {
            payload: order.u32(rec, 4),
            hdrtype: order.u64(rec, 16) & 0x3,
            features: (order.u64(rec, 16) >> 2) & 0x3fff_ffff,
            to_guid: order.u64(rec, 40),
            from_guid: order.u64(rec, 48),
        },
        order,
    ))
}

/// A substream payload from `zfs send -t` or `zfs send -w`.
fn payload_allowed(b: &Begin) -> bool {
    b.features & (FEATURE_RESUMING | FEATURE_RAW) != 0 && b.payload <= SUBSTREAM_PAYLOAD_MAX
}

/// Checks the head of a stream. `Ok(None)`: more bytes are needed (at most
/// [`HEAD_MAX`]). `allowed_to` are the GUIDs of the snapshots the sender
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
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BEGIN record as zfs writes it (little-endian host).
    fn rec_begin(payload: u32, hdrtype: u64, to: u64, from: u64, be: bool) -> Vec<u8> {
        let mut r = vec![0u8; RECORD];
        let put32 = |r: &mut Vec<u8>, at: usize, v: u32| {
            let b = if be { v.to_be_bytes() } else { v.to_le_bytes() };
            r[at..at + 4].copy_from_slice(&b);
        };
        let put64 = |r: &mut Vec<u8>, at: usize, v: u64| {
            let b = if be { v.to_be_bytes() } else { v.to_le_bytes() };
            r[at..at + 8].copy_from_slice(&b);
        };
        put32(&mut r, 0, DRR_BEGIN);
        put32(&mut r, 4, payload);
        put64(&mut r, 8, DMU_BACKUP_MAGIC);
        put64(&mut r, 16, hdrtype);
        put64(&mut r, 40, to);
        put64(&mut r, 48, from);
        r
    }

    fn rec_end() -> Vec<u8> {
        let mut r = vec![0u8; RECORD];
        r[0..4].copy_from_slice(&DRR_END.to_le_bytes());
        r
    }

    /// The first 80 bytes of `zfs send ptest1/src/a@s1` from zfs-fuse.
    const REAL_FULL: [u8; 80] = [
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xac, 0xcb, 0xba, 0xf5, 0x02, 0x00, 0x00,
        0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x4e, 0x35, 0x02, 0x6b, 0x00, 0x00,
        0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x62, 0x4b, 0x87, 0xac, 0x9a,
        0x50, 0x97, 0xce, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x70, 0x74, 0x65, 0x73,
        0x74, 0x31, 0x2f, 0x73, 0x72, 0x63, 0x2f, 0x61, 0x40, 0x73, 0x31, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    const REAL_GUID: u64 = 14886455718546197346;

    #[test]
    fn real_zfs_fuse_full_stream() {
        let mut head = REAL_FULL.to_vec();
        head.resize(RECORD, 0);
        assert_eq!(
            check_head(&head, 0, &[REAL_GUID]).unwrap(),
            Some(Head {
                from_guid: 0,
                first_to_guid: REAL_GUID,
                compound: false,
                features: 0,
            })
        );
        assert!(check_head(&head, 0, &[1]).is_err(), "unannounced snapshot");
        assert!(
            check_head(&head, 5, &[REAL_GUID]).is_err(),
            "full where incremental expected"
        );
    }

    #[test]
    fn substreams_in_both_byte_orders() {
        for be in [false, true] {
            let r = rec_begin(0, DMU_SUBSTREAM, 20, 10, be);
            assert_eq!(
                check_head(&r[..100], 10, &[20]).unwrap(),
                None,
                "needs more"
            );
            let h = check_head(&r, 10, &[20]).unwrap().unwrap();
            assert_eq!((h.from_guid, h.first_to_guid, h.compound), (10, 20, false));
            assert!(check_head(&r, 11, &[20])
                .unwrap_err()
                .contains("not from the destination's newest"));
        }
    }

    #[test]
    fn plain_package_is_accepted() {
        let mut s = rec_begin(0, DMU_COMPOUNDSTREAM, 0, 0, false);
        s.extend(rec_end());
        assert_eq!(
            check_head(&s, 10, &[20]).unwrap(),
            None,
            "needs the substream"
        );
        s.extend(rec_begin(0, DMU_SUBSTREAM, 20, 10, false));
        let h = check_head(&s, 10, &[20, 30]).unwrap().unwrap();
        assert!(h.compound);
        assert_eq!(h.first_to_guid, 20);
    }

    #[test]
    fn resumed_and_raw_substreams_may_carry_their_payload() {
        for feature in [FEATURE_RESUMING, FEATURE_RAW] {
            let r = rec_begin(200, DMU_SUBSTREAM | (feature << 2), 20, 10, false);
            let h = check_head(&r, 10, &[20]).unwrap().unwrap();
            assert_eq!(h.first_to_guid, 20);
            let mut pkg = rec_begin(0, DMU_COMPOUNDSTREAM, 0, 0, false);
            pkg.extend(rec_end());
            pkg.extend(r);
            assert!(check_head(&pkg, 10, &[20]).unwrap().is_some());
            // Still checked: base and announced snapshot.
            let r = rec_begin(200, DMU_SUBSTREAM | (feature << 2), 21, 10, false);
            assert!(check_head(&r, 10, &[20]).is_err());
            // A huge payload is not resume state.
            let r = rec_begin(1 << 20, DMU_SUBSTREAM | (feature << 2), 20, 10, false);
            assert!(check_head(&r, 10, &[20]).is_err());
        }
        // A compound header with the RAW flag still may not carry one.
        let r = rec_begin(200, DMU_COMPOUNDSTREAM | (FEATURE_RAW << 2), 0, 0, false);
        assert!(check_head(&[r, vec![0; 2 * RECORD]].concat(), 10, &[20]).is_err());
    }

    #[test]
    fn feature_flags_are_named() {
        assert_eq!(feature_names(0), Vec::<String>::new());
        let n = feature_names(4 | (1 << 24) | (1 << 40));
        assert!(n[0].starts_with("sa_spill"), "{n:?}");
        assert_eq!(n[1], "raw");
        assert!(n[2].starts_with("unknown flags"), "{n:?}");
    }

    #[test]
    fn hostile_heads_are_refused() {
        let mut with_props = rec_begin(4096, DMU_COMPOUNDSTREAM, 0, 0, false);
        with_props.extend(vec![0u8; 2 * RECORD]);
        let mut no_end = rec_begin(0, DMU_COMPOUNDSTREAM, 0, 0, false);
        no_end.extend(rec_begin(0, DMU_SUBSTREAM, 20, 10, false));
        no_end.extend(rec_end());
        let mut nested = rec_begin(0, DMU_COMPOUNDSTREAM, 0, 0, false);
        nested.extend(rec_end());
        nested.extend(rec_begin(0, DMU_COMPOUNDSTREAM, 20, 10, false));
        let mut sub_payload = rec_begin(0, DMU_COMPOUNDSTREAM, 0, 0, false);
        sub_payload.extend(rec_end());
        sub_payload.extend(rec_begin(8, DMU_SUBSTREAM, 20, 10, false));
        let garbage = vec![0x5a; RECORD];
        let mut not_begin = rec_begin(0, DMU_SUBSTREAM, 20, 10, false);
        not_begin[0] = 3;
        let cases: [(&str, Vec<u8>); 7] = [
            ("-R/-p payload", with_props),
            ("compound without END", no_end),
            ("nested compound", nested),
            ("substream with payload", sub_payload),
            ("random bytes", garbage),
            ("not a BEGIN", not_begin),
            (
                "older base (a lying -i)",
                rec_begin(0, DMU_SUBSTREAM, 20, 9, false),
            ),
        ];
        for (what, bytes) in cases {
            assert!(check_head(&bytes, 10, &[20]).is_err(), "{what} accepted");
        }
    }
}
