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
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xac, 0xcb, 0xba, 0xf5, 0x02, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x4e, 0x35, 0x02, 0x6b, 0x00, 0x00, 0x00, 0x00,
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x62, 0x4b, 0x87, 0xac, 0x9a, 0x50, 0x97, 0xce,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x70, 0x74, 0x65, 0x73, 0x74, 0x31, 0x2f, 0x73,
    0x72, 0x63, 0x2f, 0x61, 0x40, 0x73, 0x31, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
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
            volume: false,
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
