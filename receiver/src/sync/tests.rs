//! Validation, locking and the answers that need no `zfs` call.

use std::sync::Arc;

use zfsync_common::plan::FullReason;
use zfsync_common::protocol::WireSnap;
use zfsync_common::zfs::Zfs;

use super::*;
use crate::testing::{dataset, ds, snap, target_of};

fn wire(name: &str, guid: u64, createtxg: u64) -> WireSnap {
    WireSnap {
        name: name.into(),
        guid,
        createtxg,
    }
}

/// The sender's `path` with s1 and s2 (guids 11, 12).
fn request(path: &str) -> SyncRequest {
    SyncRequest {
        path: path.into(),
        snapshots: vec![wire("s1", 11, 101), wire("s2", 12, 102)],
        bookmarks: Vec::new(),
        allow_full: false,
        dry_run: false,
    }
}

/// `p/t` with `/a` (s1 only), `/up` (up to date), `/e` (no snapshots),
/// `/d` (diverged: s1 and its own x9) and an existing buffer.
fn target() -> Target {
    let with = |name: &str, snaps: Vec<Snapshot>| {
        let mut d = dataset(name);
        d.snapshots = snaps;
        d
    };
    target_of([
        dataset("p/t"),
        with("p/t/a", vec![snap("s1", 11, 1)]),
        with("p/t/up", vec![snap("s1", 11, 1), snap("s2", 12, 2)]),
        dataset("p/t/e"),
        with("p/t/d", vec![snap("s1", 11, 1), snap("x9", 99, 2)]),
        dataset("p/t.zfsyncbuffer"),
    ])
}

async fn sync_req(t: &Target, req: &SyncRequest) -> Result<Synced, SyncError> {
    let valid = validate(t, "test", req.clone())?;
    sync(t, "test", &Caps::default(), valid, false).await
}

fn rel(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

#[test]
fn names_are_validated_before_anything_else() {
    let t = target();
    let check = |req: SyncRequest| {
        validate(&t, "test", req)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    assert!(check(request("a")).starts_with("invalid dataset path: "));
    assert!(check(request("/a/../b")).starts_with("invalid dataset path: "));
    let mut bad_snap = request("/a");
    bad_snap.snapshots.push(wire("x@y", 13, 103));
    assert!(check(bad_snap).starts_with("invalid snapshot name for /a: "));
    let mut bad_bookmark = request("/a");
    bad_bookmark.bookmarks.push(wire("b#c", 11, 101));
    assert!(check(bad_bookmark).starts_with("invalid bookmark name for /a: "));
    let mut none = request("");
    none.snapshots.clear();
    assert_eq!(check(none), "(top) has no snapshots to send");
}

#[test]
fn the_buffer_path_is_reserved_under_a_pool_root() {
    let t = Target::new(ds("p"), Arc::new(Zfs::default()), true);
    let e = validate(&t, "test", request("/zfsyncbuffer/x")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "/zfsyncbuffer/x is reserved for the receiver's buffer (p/zfsyncbuffer); rename the source dataset"
    );
}

#[test]
fn snapshots_are_ordered_by_the_senders_createtxg() {
    let t = target();
    let mut req = request("/a");
    req.snapshots.reverse();
    let v = validate(&t, "test", req).unwrap();
    let guids: Vec<u64> = v.snapshots.iter().map(|s| s.guid).collect();
    assert_eq!(guids, [11, 12]);
    assert_eq!(v.in_place, ds("p/t/a"));
}

#[tokio::test]
async fn an_incremental_opens_the_dataset_under_its_lock() {
    let t = target();
    let got = sync_req(&t, &request("/a")).await.unwrap();
    assert_eq!(
        got.reply,
        SyncReply::Incremental {
            base_guid: 11,
            count: 1
        }
    );
    let open = got.open.unwrap();
    assert_eq!(open.dest, ds("p/t/a"));
    assert!(matches!(open.mode, Mode::Direct) && !open.resume_offered);
    // Another connection is refused for now.
    let busy = sync_req(&t, &request("/a")).await.err().unwrap();
    assert!(busy.is_temporary());
    assert_eq!(
        busy.to_string(),
        "/a is busy: another connection is receiving into it; try again later"
    );
    drop(open);
    assert!(sync_req(&t, &request("/a")).await.is_ok());
}

#[tokio::test]
async fn a_dry_run_locks_nothing() {
    let t = target();
    let _held = t.try_lock(&rel("/a")).unwrap();
    let got = sync_req(&t, &request("/a").dry_run(true)).await.unwrap();
    assert!(got.open.is_none());
    assert!(matches!(got.reply, SyncReply::Incremental { .. }));
    drop(_held);
    let new = sync_req(&t, &request("/b").dry_run(true)).await.unwrap();
    assert_eq!(new.reply, SyncReply::New { buffered: false });
    assert!(new.open.is_none() && t.try_lock(&rel("/b")).is_some());
}

#[tokio::test]
async fn nothing_opens_when_nothing_is_to_come() {
    let t = target();
    let up = sync_req(&t, &request("/up")).await.unwrap();
    assert_eq!(
        up.reply,
        SyncReply::UpToDate {
            snapshot: "s2".into()
        }
    );
    assert!(up.open.is_none());
    let diverged = sync_req(&t, &request("/d")).await.unwrap();
    assert!(matches!(
        diverged.reply,
        SyncReply::Full {
            reason: FullReason::Diverged { .. },
            accepted: false
        }
    ));
    assert!(diverged.open.is_none());
    // The lock went with the answer.
    assert!(t.try_lock(&rel("/up")).is_some() && t.try_lock(&rel("/d")).is_some());
}

#[tokio::test]
async fn new_datasets_go_in_place_or_to_the_buffer() {
    let t = target();
    let in_place = sync_req(&t, &request("/a/b")).await.unwrap();
    assert_eq!(in_place.reply, SyncReply::New { buffered: false });
    assert_eq!(in_place.open.unwrap().dest, ds("p/t/a/b"));
    let buffered = sync_req(&t, &request("/q/r")).await.unwrap();
    assert_eq!(buffered.reply, SyncReply::New { buffered: true });
    let open = buffered.open.unwrap();
    assert_eq!(open.dest, ds("p/t.zfsyncbuffer/2F712F72"));
    assert!(open.buffered);
}

#[tokio::test]
async fn full_into_a_dataset_without_snapshots_replaces_it_whole() {
    let t = target();
    let got = sync_req(&t, &request("/e").allow_full(true)).await.unwrap();
    assert_eq!(
        got.reply,
        SyncReply::Full {
            reason: FullReason::TargetHasNoSnapshots,
            accepted: true
        }
    );
    // Received whole beside it, swapped in at Finish: the old data stays
    // until the whole new copy is there.
    let open = got.open.unwrap();
    assert!(
        matches!(&open.mode, Mode::Replace { replaces } if *replaces == ds("p/t/e"))
            && open.dest == ds("p/t.zfsyncbuffer/2F65.full")
    );
}

#[tokio::test]
async fn full_into_a_pool_root_overwrites_it_only_with_a_single_stream() {
    // The pool's root `p` as the target, without snapshots.
    let t = Target::new(ds("p"), Arc::new(Zfs::default()), true);
    t.cache_for_tests([dataset("p"), dataset("p/zfsyncbuffer")]);
    let mut one = request("");
    one.snapshots.truncate(1);
    let open = sync_req(&t, &one.allow_full(true))
        .await
        .unwrap()
        .open
        .unwrap();
    assert!(matches!(open.mode, Mode::Overwrite) && open.dest == ds("p"));
    drop(open);
    // Two snapshots: a full stream and an incremental, never over the
    // root; received whole into the buffer first.
    let open = sync_req(&t, &request("").allow_full(true))
        .await
        .unwrap()
        .open
        .unwrap();
    assert!(
        matches!(&open.mode, Mode::Replace { replaces } if *replaces == ds("p"))
            && open.dest == ds("p/zfsyncbuffer/top.full")
    );
}

#[tokio::test]
async fn a_dry_run_does_not_discard_a_cut_transfer() {
    let mut a = dataset("p/t/a");
    a.resume_token = Some("1-abc".into());
    let t = target_of([dataset("p/t"), a]);
    let e = sync_req(&t, &request("/a").dry_run(true))
        .await
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "p/t/a holds a cut transfer that this sender cannot resume; a real run discards it (zfs receive -A) and sends again"
    );
    assert!(!e.is_temporary());
}

fn many(n: usize) -> Vec<WireSnap> {
    (0..n as u64)
        .map(|i| wire(&format!("s{i}"), i + 1, i + 1))
        .collect()
}

#[test]
fn a_request_over_the_snapshot_limit_is_refused_naming_it() {
    let t = target();
    let mut req = request("/a");
    req.snapshots = many(MAX_SNAPSHOTS + 1);
    let e = validate(&t, "test", req).unwrap_err();
    assert_eq!(
        e.to_string(),
        "/a has 100001 snapshots; the receiver takes at most 100000 per dataset in one request (prune the source's snapshots, for example with --keep)"
    );
    assert!(!e.is_temporary());
    let mut req = request("/a");
    req.bookmarks = many(MAX_SNAPSHOTS + 1);
    assert!(validate(&t, "test", req)
        .unwrap_err()
        .to_string()
        .starts_with("/a has 100001 bookmarks; "));
    let mut req = request("/a");
    req.snapshots = many(MAX_SNAPSHOTS);
    assert_eq!(
        validate(&t, "test", req).unwrap().snapshots.len(),
        MAX_SNAPSHOTS
    );
}

#[tokio::test]
async fn the_lists_are_charged_and_a_full_budget_is_a_temporary_refusal() {
    let t = target().with_memory_budget(1 << 20);
    let mut req = request("/a");
    req.snapshots = many(1000);
    let valid = validate(&t, "test", req).unwrap();
    let bytes = valid.bytes();
    assert_eq!(
        bytes,
        1000 * std::mem::size_of::<Snapshot>()
            + valid
                .snapshots
                .iter()
                .map(|s| s.name.as_str().len() + 16)
                .sum::<usize>()
    );
    // What reading a large frame was granted shrinks to the lists.
    let admitted = t.budget.try_reserve(900_000).unwrap();
    let charged = charge(&t, &valid, Some(admitted)).unwrap();
    assert_eq!((charged.bytes(), t.budget.used()), (bytes, bytes));
    // The lists stay charged while the dataset is open.
    let synced = sync(&t, "test", &Caps::default(), valid, false)
        .await
        .unwrap();
    assert_eq!(synced.open.unwrap().announced.len(), 1000);
    // No room: busy, and nothing charged.
    let hog = t.budget.try_reserve((1 << 20) - bytes - 10).unwrap();
    let mut req = request("/b");
    req.snapshots = many(1000);
    let valid = validate(&t, "test", req).unwrap();
    let e = charge(&t, &valid, None).unwrap_err();
    assert!(e.is_temporary());
    assert!(
        e.to_string()
            .starts_with("/b: the receiver's memory budget is in use by other requests ("),
        "{e}"
    );
    drop((hog, charged));
    assert_eq!(t.budget.used(), 0);
}
