//! The validator refuses hostile streams where they go wrong: one table,
//! each row a stream, the refusal and its byte offset.

use super::*;

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
            allow: allow_raw(),
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
            allow: allow_resumed(),
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
