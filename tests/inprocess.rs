//! The in-process tier (`make test-fast`): the real receiver
//! (`zfsync_recv::run`) on 127.0.0.1 with mutual TLS, driven by the real
//! sender (`zfsync_send::run`) or step by step by the protocol `Client`.
//! Each end is its own "host": an in-memory `FakeZfs` with the pool `src`
//! on the sending side and the pool `dst` on the receiving side. No root,
//! no ZFS, a few seconds for the whole file.
//!
//! Each test is named after the invariant it shows and says which one in
//! its `///` line (the rule numbers of docs/design.md). On failure the
//! assertions print both hosts' datasets, snapshots and `zfs` calls.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use zfsync_common::client::{Client, ClientError, ClientOptions, Finished};
use zfsync_common::naming::{
    format_receiver_id, format_replica_mark, DatasetName, RelPath, SnapName, REPLICA_PROP,
};
use zfsync_common::plan::{steps, Decision, FullReason};
use zfsync_common::protocol::{Bytes, PlaceFailure, ProtocolError, SyncReply, SyncRequest};
use zfsync_common::tls::{server_config, TlsFiles};
use zfsync_common::zfs::fake::{FakeError, FakeZfs};
use zfsync_common::zfs::{SendFrom, SendWhat, Snapshot, ZfsBackend};
use zfsync_e2e::Certs;
use zfsync_send::{Report, SendKind, Status};

/// The source dataset on the sending host.
const SRC: &str = "src/s";
/// The target dataset on the receiving host.
const DST: &str = "dst/t";
/// The target's buffer.
const BUF: &str = "dst/t.zfsyncbuffer";
/// The receiver's `--grace`.
const GRACE: Duration = Duration::from_secs(2);
/// The longest any run, wait or exchange may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(20);

// ---- the two hosts ----

fn ds(name: &str) -> DatasetName {
    DatasetName::new(name).unwrap_or_else(|e| panic!("{name:?}: {e}"))
}

fn rel(path: &str) -> RelPath {
    RelPath::new(path).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// The source dataset at a relative path (`""` is the top).
fn src_ds(rel: &str) -> String {
    format!("{SRC}{rel}")
}

/// Where the receiver keeps the dataset at a relative path.
fn dst_ds(rel: &str) -> String {
    format!("{DST}{rel}")
}

/// A sending host: the pool `src` and `src/s` with the datasets at `rels`
/// (parents first), each given `snaps` in turn (`s1` of every dataset, then
/// `s2` of every dataset, ...).
fn source(rels: &[&str], snaps: &[&str]) -> FakeZfs {
    let zfs = FakeZfs::zfs_fuse();
    zfs.create_pool("src");
    for r in rels {
        zfs.create(&src_ds(r));
    }
    for s in snaps {
        for r in rels {
            zfs.snapshot(&src_ds(r), s);
        }
    }
    zfs
}

/// A receiving host: the pool `dst`; the target `dst/t` is made by the
/// first full receive.
fn target_host() -> FakeZfs {
    let zfs = FakeZfs::zfs_fuse();
    zfs.create_pool("dst");
    zfs
}

/// `(name, guid)` of each snapshot of a dataset, oldest first.
fn snaps(zfs: &FakeZfs, name: &str) -> Vec<(String, u64)> {
    zfs.snapshots(name)
        .iter()
        .map(|s| (s.name.to_string(), s.guid))
        .collect()
}

/// A dataset as a copy: its own GUID and its snapshots with theirs.
type Contents = (u64, Vec<(String, u64)>);

/// Every dataset at or below `root`, relative to it, as copies.
fn copies(zfs: &FakeZfs, root: &str) -> BTreeMap<String, Contents> {
    zfs.names()
        .into_iter()
        .filter_map(|n| {
            let r = n.strip_prefix(root)?;
            (r.is_empty() || r.starts_with('/')).then(|| r.to_string())
        })
        .map(|r| {
            let name = format!("{root}{r}");
            let guid = zfs.dataset(&name).map(|d| d.guid).unwrap_or_default();
            (r, (guid, snaps(zfs, &name)))
        })
        .collect()
}

/// The copy at `name`, if there is one.
fn copy_at(zfs: &FakeZfs, name: &str) -> Option<Contents> {
    zfs.dataset(name).map(|d| (d.guid, snaps(zfs, name)))
}

/// Datasets whose name starts with `prefix`.
fn names_under(zfs: &FakeZfs, prefix: &str) -> Vec<String> {
    zfs.names()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// A host's datasets with their snapshots, then every `zfs` call it saw.
fn dump(host: &str, zfs: &FakeZfs) -> String {
    let mut s = format!("---- {host}: datasets\n");
    for n in zfs.names() {
        let guid = zfs.dataset(&n).map(|d| d.guid).unwrap_or_default();
        let list: Vec<String> = snaps(zfs, &n)
            .iter()
            .map(|(s, g)| format!("@{s}={g:x}"))
            .collect();
        s.push_str(&format!("  {n} (guid {guid:x}) {}\n", list.join(" ")));
    }
    s.push_str(&format!("---- {host}: zfs calls\n"));
    for c in zfs.calls() {
        s.push_str(&format!("  zfs {c}\n"));
    }
    s
}

fn both(src: &FakeZfs, dst: &FakeZfs) -> String {
    format!("{}{}", dump("sender", src), dump("receiver", dst))
}

/// Every source dataset has its replica in place, with the same snapshots
/// and GUIDs.
#[track_caller]
fn assert_replica(src: &FakeZfs, dst: &FakeZfs) {
    for (r, (_, want)) in copies(src, SRC) {
        assert_eq!(
            snaps(dst, &dst_ds(&r)),
            want,
            "the replica of {} differs\n{}",
            src_ds(&r),
            both(src, dst)
        );
    }
}

/// The replicas in place are exactly the source's datasets (nothing more,
/// nothing less).
#[track_caller]
fn assert_same_tree(src: &FakeZfs, dst: &FakeZfs) {
    let want: Vec<String> = copies(src, SRC).into_keys().collect();
    let got: Vec<String> = copies(dst, DST).into_keys().collect();
    assert_eq!(got, want, "datasets in place\n{}", both(src, dst));
}

/// Polls `cond` every few milliseconds; fails after [`PATIENCE`].
async fn wait_until(what: &str, zfs: &FakeZfs, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < PATIENCE,
            "waited {PATIENCE:?} for {what}\n{}",
            dump("receiver", zfs)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn count_calls(zfs: &FakeZfs, prefix: &str) -> usize {
    zfs.calls().iter().filter(|c| c.starts_with(prefix)).count()
}

// ---- the receiver ----

/// A run id per connection or run, so that each relists the target.
fn run_id() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("inprocess-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// `zfsync_recv::run` on 127.0.0.1:0, on the test's runtime; shut down
/// when dropped.
struct Receiver {
    port: u16,
    shutdown: CancellationToken,
    served: Option<JoinHandle<Result<(), zfsync_recv::ServeError>>>,
}

impl Receiver {
    async fn start(zfs: &FakeZfs) -> Receiver {
        Receiver::start_with(zfs, true).await
    }

    async fn start_with(zfs: &FakeZfs, mirror_retention: bool) -> Receiver {
        let certs = Certs::shared();
        let tls = server_config(&TlsFiles {
            ca: &certs.dir.join("ca.pem"),
            cert: &certs.dir.join("receiver.pem"),
            key: &certs.dir.join("receiver.key"),
        })
        .expect("server TLS config");
        let (_reload, tls) = tokio::sync::watch::channel(tls);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local address").port();
        let opts = zfsync_recv::Options {
            target: ds(DST),
            zfs: Arc::new(zfs.clone()),
            tls,
            allow_clients: Vec::new(),
            mirror_retention,
            recv_options: Vec::new(),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            max_connections: 16,
            grace: GRACE,
        };
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(zfsync_recv::run(
            listener,
            opts,
            shutdown.clone().cancelled_owned(),
        ));
        Receiver {
            port,
            shutdown,
            served: Some(served),
        }
    }

    /// Options of a protocol client (and a sender run) with a fresh run id.
    fn client_options(&self) -> ClientOptions {
        Certs::shared().client_options(self.port, &run_id())
    }

    async fn client(&self) -> Client {
        Client::connect(&self.client_options())
            .await
            .expect("connect to the receiver")
    }

    fn send_options(
        &self,
        src: &FakeZfs,
        threads: usize,
        allow_full: bool,
    ) -> zfsync_send::Options {
        zfsync_send::Options {
            source: ds(SRC),
            zfs: Arc::new(src.clone()),
            client: self.client_options(),
            threads,
            allow_full,
            snapshot: None,
            keep: None,
            dry_run: false,
            delete_missing: false,
            receiver_id: format_receiver_id("127.0.0.1", self.port),
        }
    }

    /// A whole `zfsync_send::run` of `src/s` to this receiver.
    async fn send(&self, src: &FakeZfs, threads: usize, allow_full: bool) -> Report {
        let run = zfsync_send::run(
            self.send_options(src, threads, allow_full),
            CancellationToken::new(),
        );
        tokio::time::timeout(PATIENCE, run)
            .await
            .expect("the sender's run ends")
            .expect("the sender's run starts")
    }

    /// Cancels the shutdown future and waits for `run` to return; how long
    /// that took.
    async fn stop(&mut self) -> Duration {
        let started = Instant::now();
        self.shutdown.cancel();
        let served = self.served.take().expect("running");
        tokio::time::timeout(GRACE + Duration::from_secs(5), served)
            .await
            .expect("zfsync_recv::run returns after its shutdown")
            .expect("the receiver task does not panic")
            .expect("zfsync_recv::run ends without error");
        started.elapsed()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

// ---- a sender, step by step ----

/// The bytes `zfs send [-I from] to` writes on the sending host.
async fn send_bytes(src: &FakeZfs, name: &str, from: Option<&Snapshot>, to: &Snapshot) -> Vec<u8> {
    let d = ds(name);
    let what = SendWhat::Snapshot {
        from: from.map(|f| SendFrom::Snapshot(d.snapshot(&f.name).expect("snapshot name"))),
        to: d.snapshot(&to.name).expect("snapshot name"),
    };
    let mut child = src.spawn_send(&what, &[]).expect("zfs send starts");
    let mut out = child.take_stdout().expect("zfs send's stdout");
    let mut bytes = Vec::new();
    out.read_to_end(&mut bytes).await.expect("read zfs send");
    child.close().await.expect("zfs send exits 0");
    bytes
}

/// Announces one stream of `name`, pumps it and ends it, as the sender
/// does.
async fn stream(
    c: &mut Client,
    src: &FakeZfs,
    name: &str,
    from: Option<&Snapshot>,
    to: &Snapshot,
) -> Result<u64, ClientError> {
    c.begin_stream(from.map(|f| f.guid), to).await?;
    let bytes = send_bytes(src, name, from, to).await;
    let n = c.pump(&mut &bytes[..], |_| {}).await?;
    c.end_stream(n).await
}

/// Syncs one dataset as the sender does: Sync, the planned streams,
/// Finish. Returns the answer to the Sync and what Finish said (`Err`:
/// its refusal, or why nothing was streamed).
async fn sync_dataset(
    c: &mut Client,
    src: &FakeZfs,
    path: &str,
    allow_full: bool,
) -> (SyncReply, Result<Finished, String>) {
    let name = src_ds(path);
    let all = src.snapshots(&name);
    let req = SyncRequest::new(&rel(path), &all).allow_full(allow_full);
    let reply = c.sync(&req).await.expect("sync");
    let decision = match reply.clone() {
        SyncReply::Incremental { base_guid, count } => Decision::Incremental {
            base_guid,
            count: count as usize,
        },
        SyncReply::New { buffered } => Decision::New { buffered },
        SyncReply::Full {
            reason,
            accepted: true,
        } => Decision::Full {
            reason,
            accepted: true,
        },
        other => return (reply, Err(format!("nothing to stream: {other:?}"))),
    };
    for step in steps(&all, &decision) {
        if let Err(e) = stream(c, src, &name, step.from, step.to).await {
            return (reply, Err(e.to_string()));
        }
    }
    (reply, c.finish().await.map_err(|e| e.to_string()))
}

// ---- a sender's run ----

fn text(report: &Report) -> String {
    format!(
        "---- sender's summary\n{}",
        zfsync_send::summary(&ds(SRC), "in-process receiver", report)
    )
}

#[track_caller]
fn status<'a>(report: &'a Report, path: &str) -> &'a Status {
    let name = src_ds(path);
    report
        .outcomes
        .iter()
        .find(|o| o.dataset.as_str() == name)
        .map(|o| &o.status)
        .unwrap_or_else(|| panic!("no outcome for {name}\n{}", text(report)))
}

#[track_caller]
fn assert_sent(report: &Report, path: &str, kind: SendKind, to: &str) {
    match status(report, path) {
        Status::Sent { kind: k, to: t, .. } if *k == kind && t == to => {}
        other => panic!(
            "{}: expected sent ({kind:?}) up to @{to}, got {other:?}\n{}",
            src_ds(path),
            text(report)
        ),
    }
}

#[track_caller]
fn assert_up_to_date(report: &Report, path: &str, at: &str) {
    match status(report, path) {
        Status::UpToDate { snapshot } if snapshot == at => {}
        other => panic!(
            "{}: expected up to date at @{at}, got {other:?}\n{}",
            src_ds(path),
            text(report)
        ),
    }
}

#[track_caller]
fn failure<'a>(report: &'a Report, path: &str) -> &'a str {
    match status(report, path) {
        Status::Failed { reason } => reason,
        other => panic!(
            "{}: expected a failure, got {other:?}\n{}",
            src_ds(path),
            text(report)
        ),
    }
}

#[track_caller]
fn assert_ok(report: &Report, src: &FakeZfs, dst: &FakeZfs) {
    assert_eq!(
        report.exit_code(),
        zfsync_send::exit::OK,
        "the run did not succeed\n{}{}",
        text(report),
        both(src, dst)
    );
}

// ---- 1. the planner's decisions through a real receiver ----

/// PL4, SY6, ING4: a new dataset is received in place, then incrementally (rollback to the base, no -F), then is up to date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_dataset_is_received_in_place_then_incrementally_then_is_up_to_date() {
    let src = source(&[""], &["s1", "s2"]);
    let dst = target_host();
    let recv = Receiver::start(&dst).await;
    let mut c = recv.client().await;

    let (reply, done) = sync_dataset(&mut c, &src, "", false).await;
    assert_eq!(reply, SyncReply::New { buffered: false });
    let done = done.unwrap_or_else(|e| panic!("{e}\n{}", both(&src, &dst)));
    assert_eq!((done.location.as_str(), done.buffered), (DST, false));
    assert_replica(&src, &dst);

    src.snapshot(SRC, "s3");
    src.snapshot(SRC, "s4");
    let all = src.snapshots(SRC);
    let (reply, done) = sync_dataset(&mut c, &src, "", false).await;
    assert_eq!(
        reply,
        SyncReply::Incremental {
            base_guid: all[1].guid,
            count: 2
        }
    );
    done.unwrap_or_else(|e| panic!("{e}\n{}", both(&src, &dst)));
    assert_replica(&src, &dst);

    let (reply, _) = sync_dataset(&mut c, &src, "", false).await;
    assert_eq!(
        reply,
        SyncReply::UpToDate {
            snapshot: "s4".into()
        }
    );
    c.bye().await;
    let calls = dst.calls();
    assert!(
        calls.iter().any(|c| c == "rollback dst/t@s2")
            && calls
                .iter()
                .filter(|c| c.starts_with("receive"))
                .all(|c| c == "receive -u dst/t"),
        "an incremental is received after a rollback to its base, never with -F\n{}",
        dump("receiver", &dst)
    );

    // The same through whole runs.
    let report = recv.send(&src, 1, false).await;
    assert_up_to_date(&report, "", "s4");
    src.snapshot(SRC, "s5");
    let report = recv.send(&src, 1, false).await;
    assert_ok(&report, &src, &dst);
    match status(&report, "") {
        Status::Sent {
            kind: SendKind::Incremental,
            from: Some(from),
            to,
            snapshots: 1,
            ..
        } if from == "s4" && to == "s5" => {}
        other => panic!("expected @s4..@s5, got {other:?}\n{}", text(&report)),
    }
    assert_replica(&src, &dst);
}

/// PL1, PL2, RE1: a copy sharing no snapshot GUID is refused and untouched without --full; --full replaces it, keeping its children.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_common_snapshot_is_refused_without_full_and_replaced_with_it() {
    let src = source(&["", "/c"], &["s1", "s2"]);
    let dst = target_host();
    // Made on the receiver by hand: the same names would not help, GUIDs count.
    dst.create(DST);
    dst.snapshot(DST, "x1");
    dst.snapshot(DST, "s1");
    dst.create("dst/t/keep");
    dst.snapshot("dst/t/keep", "k1");
    let old_top = copy_at(&dst, DST).expect("made");
    let keep = copy_at(&dst, "dst/t/keep").expect("made");
    let recv = Receiver::start(&dst).await;

    let before = copies(&dst, "dst");
    let mut c = recv.client().await;
    let (reply, _) = sync_dataset(&mut c, &src, "", false).await;
    assert_eq!(
        reply,
        SyncReply::Full {
            reason: FullReason::NoCommon {
                target: vec!["x1".into(), "s1".into()]
            },
            accepted: false
        }
    );
    c.bye().await;
    assert_eq!(copies(&dst, "dst"), before, "{}", dump("receiver", &dst));

    let report = recv.send(&src, 1, false).await;
    let why = failure(&report, "");
    assert!(
        why.contains("no common snapshot") && why.contains("--full"),
        "{why}"
    );
    // The child is new: received in place below the old copy.
    assert_sent(&report, "/c", SendKind::Full, "s2");
    assert_eq!(copy_at(&dst, DST), Some(old_top), "{}", both(&src, &dst));

    let report = recv.send(&src, 1, true).await;
    assert_ok(&report, &src, &dst);
    assert_sent(&report, "", SendKind::Replaced, "s2");
    assert_up_to_date(&report, "/c", "s2");
    assert_replica(&src, &dst);
    assert_eq!(
        copy_at(&dst, "dst/t/keep"),
        Some(keep),
        "{}",
        both(&src, &dst)
    );
    assert!(
        names_under(&dst, BUF).is_empty(),
        "the swap leaves nothing in the buffer\n{}",
        both(&src, &dst)
    );
}

/// PL2, ING4: a replica diverged on the receiver is refused and never rolled back without --full; --full replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverged_replica_is_refused_without_full_and_replaced_with_it() {
    let src = source(&[""], &["s1", "s2"]);
    let dst = target_host();
    let recv = Receiver::start(&dst).await;
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    dst.snapshot(DST, "local");
    src.snapshot(SRC, "s3");
    let before = copies(&dst, "dst");
    dst.clear_calls();

    let mut c = recv.client().await;
    let (reply, _) = sync_dataset(&mut c, &src, "", false).await;
    assert_eq!(
        reply,
        SyncReply::Full {
            reason: FullReason::Diverged {
                common: "s2".into(),
                newer: vec!["local".into()]
            },
            accepted: false
        }
    );
    c.bye().await;
    let report = recv.send(&src, 1, false).await;
    let why = failure(&report, "");
    assert!(
        why.contains("newer than the common snapshot @s2") && why.contains("--full"),
        "{why}"
    );
    assert_eq!(copies(&dst, "dst"), before, "{}", both(&src, &dst));
    assert!(
        !dst.calls().iter().any(|c| c.starts_with("rollback")
            || c.starts_with("receive")
            || c.starts_with("destroy")),
        "nothing may be rolled back, received or destroyed\n{}",
        dump("receiver", &dst)
    );

    let report = recv.send(&src, 1, true).await;
    assert_ok(&report, &src, &dst);
    assert_sent(&report, "", SendKind::Replaced, "s3");
    assert_replica(&src, &dst);
}

/// SY1: a dataset without snapshots is refused for good (not busy) and nothing is created; the sender skips it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_without_snapshots_is_refused_and_nothing_is_created() {
    let src = source(&[""], &[]);
    let dst = target_host();
    let recv = Receiver::start(&dst).await;
    let mut c = recv.client().await;
    match c
        .sync(&SyncRequest::new(&rel(""), &[]))
        .await
        .expect("sync")
    {
        SyncReply::Refused {
            reason,
            temporary: false,
        } if reason.contains("no snapshots") => {}
        other => panic!("expected a permanent refusal, got {other:?}"),
    }
    c.bye().await;

    let report = recv.send(&src, 1, false).await;
    assert_eq!(
        status(&report, ""),
        &Status::NoSnapshots,
        "{}",
        text(&report)
    );
    assert_eq!(dst.names(), ["dst"], "{}", dump("receiver", &dst));
    assert!(
        dst.calls().iter().all(|c| c.starts_with("get")),
        "only listings\n{}",
        dump("receiver", &dst)
    );
}

/// ING6: a full receive uses -u and leaves the replica canmount=noauto with zfsync:replica=<its own GUID>.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_receive_makes_an_unmounted_replica_marked_with_its_own_guid() {
    let src = source(&["", "/a"], &["s1"]);
    let dst = target_host();
    let recv = Receiver::start(&dst).await;
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    for r in ["", "/a"] {
        let name = dst_ds(r);
        let guid = dst.dataset(&name).expect("received").guid;
        assert_eq!(
            (dst.prop(&name, "canmount"), dst.prop(&name, REPLICA_PROP)),
            (Some("noauto".to_string()), Some(format_replica_mark(guid))),
            "{name}\n{}",
            dump("receiver", &dst)
        );
    }
    assert!(
        dst.calls()
            .iter()
            .filter(|c| c.starts_with("receive"))
            .all(|c| c.starts_with("receive -u ")),
        "{}",
        dump("receiver", &dst)
    );
}

// ---- 2. the buffer and cleanbuffer ----

/// SY6, BU1: datasets synced before their parents wait in BUF/<HEX>; cleanbuffer places them parents first and reports the parentless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_synced_before_their_parents_wait_in_the_buffer_and_are_placed_parents_first() {
    let rels = ["", "/a", "/a/b", "/a/b/c", "/q", "/q/r"];
    let src = source(&rels, &["s1", "s2"]);
    let dst = target_host();
    let recv = Receiver::start(&dst).await;
    let mut c = recv.client().await;
    // (path, buffered, where it lands)
    let order = [
        ("", false, DST.to_string()),
        ("/a/b/c", true, format!("{BUF}/2F612F622F63")),
        ("/a/b", true, format!("{BUF}/2F612F62")),
        ("/q/r", true, format!("{BUF}/2F712F72")),
        ("/a", false, dst_ds("/a")),
    ];
    for (path, buffered, at) in &order {
        let (reply, done) = sync_dataset(&mut c, &src, path, false).await;
        assert_eq!(
            reply,
            SyncReply::New {
                buffered: *buffered
            },
            "{path}"
        );
        let done = done.unwrap_or_else(|e| panic!("{path}: {e}\n{}", both(&src, &dst)));
        assert_eq!((&done.location, done.buffered), (at, *buffered), "{path}");
        assert_eq!(snaps(&dst, at), snaps(&src, &src_ds(path)), "{path}");
    }
    c.bye().await;
    assert_eq!(
        dst.prop(BUF, "mountpoint").as_deref(),
        Some("none"),
        "{}",
        dump("receiver", &dst)
    );

    let paths: Vec<String> = rels.iter().map(|r| r.to_string()).collect();
    let before = copies(&dst, "dst");
    let mut c = recv.client().await;
    let dry = c
        .clean_buffer(paths.clone(), false, true)
        .await
        .expect("dry run");
    c.bye().await;
    assert_eq!(dry.placed, ["/a/b", "/a/b/c"]);
    assert_eq!(
        dry.failed
            .iter()
            .map(|f| f.path.as_str())
            .collect::<Vec<_>>(),
        ["/q/r"]
    );
    assert_eq!(copies(&dst, "dst"), before, "a dry run changes nothing");

    dst.clear_calls();
    let mut c = recv.client().await;
    let report = c
        .clean_buffer(paths, false, false)
        .await
        .expect("cleanbuffer");
    c.bye().await;
    assert_eq!(
        report.placed,
        ["/a/b", "/a/b/c"],
        "{}",
        dump("receiver", &dst)
    );
    match report.failed.as_slice() {
        [PlaceFailure { path, reason }]
            if path == "/q/r"
                && reason.starts_with("its parent dst/t/q is not on the receiver yet") => {}
        other => panic!("expected /q/r to fail for want of its parent, got {other:?}"),
    }
    let renames: Vec<String> = dst
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("rename"))
        .collect();
    assert_eq!(
        renames,
        [
            format!("rename {BUF}/2F612F62 dst/t/a/b"),
            format!("rename {BUF}/2F612F622F63 dst/t/a/b/c"),
        ],
        "parents first\n{}",
        dump("receiver", &dst)
    );
    for r in ["", "/a", "/a/b", "/a/b/c"] {
        assert_eq!(snaps(&dst, &dst_ds(r)), snaps(&src, &src_ds(r)), "{r}");
    }
    assert_eq!(
        names_under(&dst, BUF),
        [BUF.to_string(), format!("{BUF}/2F712F72")],
        "the orphan stays in the buffer\n{}",
        dump("receiver", &dst)
    );
}

/// BU1: with zfsync_send::run a child whose parent never arrives stays buffered and is reported failed, until the parent comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_whose_parent_never_arrives_stays_buffered_and_is_reported_failed() {
    let src = source(&["", "/a", "/a/b"], &[]);
    src.snapshot(&src_ds("/a"), "s1");
    src.snapshot(&src_ds("/a/b"), "s1");
    let dst = target_host();
    let recv = Receiver::start(&dst).await;

    let report = recv.send(&src, 2, false).await;
    assert_eq!(
        report.exit_code(),
        zfsync_send::exit::FAILED,
        "{}",
        text(&report)
    );
    assert_eq!(status(&report, ""), &Status::NoSnapshots);
    for r in ["/a", "/a/b"] {
        let why = failure(&report, r);
        assert!(
            why.contains("received into the buffer but not placed") && why.contains("its parent"),
            "{r}: {why}"
        );
    }
    assert_eq!(
        names_under(&dst, "dst/"),
        [
            BUF.to_string(),
            format!("{BUF}/2F61"),
            format!("{BUF}/2F612F62")
        ],
        "{}",
        both(&src, &dst)
    );

    src.snapshot(SRC, "s1");
    let report = recv.send(&src, 2, false).await;
    assert_ok(&report, &src, &dst);
    assert_replica(&src, &dst);
    assert_same_tree(&src, &dst);
    assert!(names_under(&dst, BUF).is_empty(), "{}", both(&src, &dst));
}

// ---- 3. the --full swap, failing at each step ----

/// A replica of `src/s` with /a, /a/x and /a/y, whose dataset at `path`
/// diverged on the receiver (a snapshot `local` taken there): only a
/// --full run brings it back, by swapping a new copy in.
struct Swap {
    src: FakeZfs,
    dst: FakeZfs,
    recv: Receiver,
    path: &'static str,
    /// Every dataset in place before the swap.
    before: BTreeMap<String, Contents>,
}

impl Swap {
    async fn new(path: &'static str) -> Swap {
        let src = source(&["", "/a", "/a/x", "/a/y"], &["s1", "s2"]);
        let dst = target_host();
        let recv = Receiver::start(&dst).await;
        assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
        dst.snapshot(&dst_ds(path), "local");
        let before = copies(&dst, DST);
        Swap {
            src,
            dst,
            recv,
            path,
            before,
        }
    }

    fn dump(&self) -> String {
        both(&self.src, &self.dst)
    }

    /// A --full attempt through the protocol client: the new copy arrives
    /// whole; returns what Finish (the swap) said.
    async fn attempt(&self) -> Result<Finished, String> {
        let mut c = self.recv.client().await;
        let (reply, done) = sync_dataset(&mut c, &self.src, self.path, true).await;
        assert!(
            matches!(
                reply,
                SyncReply::Full {
                    reason: FullReason::Diverged { .. },
                    accepted: true
                }
            ),
            "{reply:?}"
        );
        c.bye().await;
        done
    }

    /// A --full attempt whose swap must fail; returns the error.
    async fn attempt_fails(&self) -> String {
        match self.attempt().await {
            Err(e) => e,
            Ok(f) => panic!("the swap succeeded: {f:?}\n{}", self.dump()),
        }
    }

    /// The old copy is in place with all its children, GUIDs and snapshots.
    #[track_caller]
    fn assert_old_in_place(&self) {
        assert_eq!(
            copies(&self.dst, DST),
            self.before,
            "the old copy is not in place as it was\n{}",
            self.dump()
        );
        assert!(
            !self.dst.names().iter().any(|n| n.ends_with(".old")),
            "nothing is left parked\n{}",
            self.dump()
        );
    }

    /// The old dataset once at `path` (relative to the target) is whole at
    /// `now`.
    #[track_caller]
    fn assert_old_at(&self, path: &str, now: &str) {
        assert_eq!(
            copy_at(&self.dst, now).as_ref(),
            self.before.get(path),
            "the old {} is not whole at {now}\n{}",
            dst_ds(path),
            self.dump()
        );
    }

    /// A later --full run converges: every dataset in place with the
    /// sender's snapshots.
    async fn converges(&self) -> Report {
        let report = self.recv.send(&self.src, 1, true).await;
        assert_ok(&report, &self.src, &self.dst);
        assert_replica(&self.src, &self.dst);
        assert_same_tree(&self.src, &self.dst);
        report
    }

    /// The children of the replaced dataset are the old ones (moved under
    /// the new copy, not received again).
    #[track_caller]
    fn assert_children_kept(&self, children: &[&str]) {
        for r in children {
            assert_eq!(
                copy_at(&self.dst, &dst_ds(r)).as_ref(),
                self.before.get(*r),
                "{r}\n{}",
                self.dump()
            );
        }
    }
}

fn injected(what: &str) -> FakeError {
    FakeError::Other(format!("cannot {what}: injected failure"))
}

/// RE3 (state 3): a child that cannot move under the new copy fails the swap; the old copy stays in place, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_swap_failure_moving_a_child_under_the_new_copy_keeps_the_old_copy() {
    let s = Swap::new("/a").await;
    s.dst.fail("rename", "2F61.full/y", 1, injected("rename"));
    let err = s.attempt_fails().await;
    assert!(
        err.contains("cannot move dst/t/a/y under the new copy")
            && !err.contains("could not move back"),
        "{err}"
    );
    assert!(
        s.dst
            .calls()
            .iter()
            .any(|c| c == "rename dst/t.zfsyncbuffer/2F61.full/x dst/t/a/x"),
        "the child moved first goes back\n{}",
        s.dump()
    );
    s.assert_old_in_place();

    let report = s.converges().await;
    assert_sent(&report, "/a", SendKind::Replaced, "s2");
    s.assert_children_kept(&["/a/x", "/a/y"]);
    assert!(names_under(&s.dst, BUF).is_empty(), "{}", s.dump());
}

/// RE3 (state 4): an old copy that cannot move aside to HEX.old stays in place, whole, with its children.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_swap_failure_moving_the_old_copy_aside_keeps_it() {
    let s = Swap::new("/a").await;
    s.dst.fail("rename", "2F61.old", 1, injected("rename"));
    let err = s.attempt_fails().await;
    assert!(
        err.contains("cannot move the old copy dst/t/a aside")
            && !err.contains("could not move back"),
        "{err}"
    );
    s.assert_old_in_place();

    let report = s.converges().await;
    assert_sent(&report, "/a", SendKind::Replaced, "s2");
    s.assert_children_kept(&["/a/x", "/a/y"]);
}

/// RE3 (state 4, top): an old top that cannot move aside to top.old stays in place with the whole tree below it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_swap_failure_moving_the_old_top_aside_keeps_it() {
    let s = Swap::new("").await;
    s.dst.fail("rename", "top.old", 1, injected("rename"));
    let err = s.attempt_fails().await;
    assert!(
        err.contains("cannot move the old copy dst/t aside"),
        "{err}"
    );
    assert!(
        s.dst
            .calls()
            .iter()
            .any(|c| c == "rename dst/t.zfsyncbuffer/top.full/a dst/t/a"),
        "{}",
        s.dump()
    );
    s.assert_old_in_place();

    let report = s.converges().await;
    assert_sent(&report, "", SendKind::Replaced, "s2");
    s.assert_children_kept(&["/a", "/a/x", "/a/y"]);
}

/// RE3, RE2: a child that cannot move back stays whole where the error says; the stale HEX.full holding it blocks the next swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_swap_failure_moving_a_child_back_leaves_it_where_the_error_says_and_blocks_the_next_swap(
) {
    let s = Swap::new("/a").await;
    s.dst.fail("rename", "2F61.old", 1, injected("rename"));
    s.dst
        .fail("rename", "2F61.full/y dst/t/a/y", 1, injected("rename"));
    let err = s.attempt_fails().await;
    let stranded = "dst/t.zfsyncbuffer/2F61.full/y";
    assert!(
        err.contains("cannot move the old copy dst/t/a aside")
            && err.contains(&format!(
                "could not move back: dst/t/a/y is now at {stranded}"
            )),
        "{err}"
    );
    s.assert_old_at("/a", "dst/t/a");
    s.assert_old_at("/a/x", "dst/t/a/x");
    s.assert_old_at("/a/y", stranded);

    let mut c = s.recv.client().await;
    let (reply, _) = sync_dataset(&mut c, &s.src, "/a", true).await;
    c.bye().await;
    match reply {
        SyncReply::Refused {
            reason,
            temporary: false,
        } if reason.contains("holds datasets of the old copy")
            && reason.contains("zfs list -r dst/t.zfsyncbuffer/2F61.full") => {}
        other => panic!(
            "expected the stale .full to stop the swap, got {other:?}\n{}",
            s.dump()
        ),
    }
    s.assert_old_at("/a/y", stranded);

    // What the message asks a person to do.
    s.dst
        .rename(&ds(stranded), &ds("dst/t/a/y"))
        .await
        .expect("move the child back by hand");
    let report = s.converges().await;
    assert_sent(&report, "/a", SendKind::Replaced, "s2");
    s.assert_children_kept(&["/a/x", "/a/y"]);
}

/// RE3 (state 5): when the new copy cannot move into place, the old copy comes back from HEX.old, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_swap_failure_moving_the_new_copy_in_puts_the_old_copy_back() {
    let s = Swap::new("/a").await;
    s.dst
        .fail("rename", "2F61.full dst/t/a", 1, injected("rename"));
    let err = s.attempt_fails().await;
    assert!(
        err.contains("cannot move the new copy into place at dst/t/a")
            && !err.contains("the old copy is at")
            && !err.contains("could not move back"),
        "{err}"
    );
    s.assert_old_in_place();

    let report = s.converges().await;
    assert_sent(&report, "/a", SendKind::Replaced, "s2");
    s.assert_children_kept(&["/a/x", "/a/y"]);
    assert!(names_under(&s.dst, BUF).is_empty(), "{}", s.dump());
}

/// RE3 (state 5): when neither the new copy moves in nor the old one back, the old copy stays whole where the error says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_swap_failure_moving_the_new_copy_in_and_the_old_back_leaves_it_where_the_error_says()
{
    let s = Swap::new("/a").await;
    s.dst
        .fail("rename", "2F61.full dst/t/a", 1, injected("rename"));
    s.dst
        .fail("rename", "2F61.old dst/t/a", 1, injected("rename"));
    let err = s.attempt_fails().await;
    let (parked, x, y) = (
        "dst/t.zfsyncbuffer/2F61.old",
        "dst/t.zfsyncbuffer/2F61.full/x",
        "dst/t.zfsyncbuffer/2F61.full/y",
    );
    assert!(
        err.contains("cannot move the new copy into place at dst/t/a")
            && err.contains(&format!("the old copy is at {parked}"))
            && err.contains(&format!("dst/t/a/x is now at {x}"))
            && err.contains(&format!("dst/t/a/y is now at {y}")),
        "{err}"
    );
    s.assert_old_at("/a", parked);
    s.assert_old_at("/a/x", x);
    s.assert_old_at("/a/y", y);

    let report = s.converges().await;
    assert_sent(&report, "/a", SendKind::Full, "s2");
    s.assert_old_at("/a", parked);
    s.assert_old_at("/a/x", x);
    s.assert_old_at("/a/y", y);
}

/// RE4: a parked old copy that cannot be destroyed stays whole at HEX.old until the next swap of that dataset removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_swap_failure_destroying_the_parked_old_copy_keeps_it_until_the_next_swap() {
    let s = Swap::new("/a").await;
    let parked = "dst/t.zfsyncbuffer/2F61.old";
    s.dst.fail("destroy", "2F61.old", 1, injected("destroy"));
    let done = s
        .attempt()
        .await
        .unwrap_or_else(|e| panic!("the swap itself succeeds: {e}\n{}", s.dump()));
    assert_eq!(done.location, "dst/t/a");
    assert_replica(&s.src, &s.dst);
    s.assert_children_kept(&["/a/x", "/a/y"]);
    let (guid, old) = s.before.get("/a").cloned().expect("listed");
    assert_eq!(
        copy_at(&s.dst, parked),
        Some((guid, old)),
        "the old copy stays whole, parked\n{}",
        s.dump()
    );

    let report = s.recv.send(&s.src, 1, true).await;
    assert_ok(&report, &s.src, &s.dst);
    assert!(s.dst.dataset(parked).is_some(), "{}", s.dump());

    // Diverged again: the next swap removes the parked copy first.
    s.dst.snapshot("dst/t/a", "local2");
    s.dst.clear_calls();
    s.converges().await;
    assert!(
        s.dst
            .calls()
            .iter()
            .any(|c| c == "destroy -r dst/t.zfsyncbuffer/2F61.old"),
        "{}",
        s.dump()
    );
    assert!(names_under(&s.dst, BUF).is_empty(), "{}", s.dump());
}

// ---- 4. mirrored retention ----

const T1: &str = "260101-000000_S";
const T2: &str = "260101-000100_S";
const T3: &str = "260101-000200_H";
const T4: &str = "260101-000300_S";

/// Syncs `src/s` and `/a` with tool snapshots and a person's, prunes all
/// but the newest on the sender, takes one more and syncs again; returns
/// the second run's report.
async fn prune_then_sync(mirror_retention: bool) -> (FakeZfs, FakeZfs, Report) {
    let src = source(&["", "/a"], &[T1, "manual", T2, T3]);
    let dst = target_host();
    let recv = Receiver::start_with(&dst, mirror_retention).await;
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    for r in ["", "/a"] {
        for gone in [T1, "manual", T2] {
            let snap = ds(&src_ds(r))
                .snapshot(&SnapName::new(gone).expect("name"))
                .expect("name");
            src.destroy_snapshot(&snap, false)
                .await
                .expect("prune on the sender");
        }
        src.snapshot(&src_ds(r), T4);
    }
    dst.clear_calls();
    let report = recv.send(&src, 1, false).await;
    assert_ok(&report, &src, &dst);
    (src, dst, report)
}

/// FI3: tool snapshots the sender pruned are destroyed on the receiver at the next sync, one by one; a person's never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_retention_destroys_the_tool_snapshots_the_sender_pruned_and_never_a_persons() {
    let (src, dst, report) = prune_then_sync(true).await;
    assert_eq!(report.mirrored, 4, "{}", text(&report));
    for r in ["", "/a"] {
        let name = dst_ds(r);
        let kept: Vec<String> = snaps(&dst, &name).into_iter().map(|(n, _)| n).collect();
        assert_eq!(kept, ["manual", T3, T4], "{name}\n{}", both(&src, &dst));
        match status(&report, r) {
            Status::Sent { mirrored: 2, .. } => {}
            other => panic!("{name}: {other:?}\n{}", text(&report)),
        }
    }
    let destroys: Vec<String> = dst
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("destroy"))
        .collect();
    assert_eq!(
        destroys,
        [
            format!("destroy dst/t@{T1}"),
            format!("destroy dst/t@{T2}"),
            format!("destroy dst/t/a@{T1}"),
            format!("destroy dst/t/a@{T2}"),
        ],
        "{}",
        dump("receiver", &dst)
    );
}

/// FI3: a receiver without mirrored retention keeps every snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_without_mirrored_retention_keeps_every_snapshot() {
    let (src, dst, report) = prune_then_sync(false).await;
    assert_eq!(report.mirrored, 0, "{}", text(&report));
    for r in ["", "/a"] {
        let kept: Vec<String> = snaps(&dst, &dst_ds(r))
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(kept, [T1, "manual", T2, T3, T4], "{}", both(&src, &dst));
    }
    assert!(
        !dst.calls().iter().any(|c| c.starts_with("destroy")),
        "{}",
        dump("receiver", &dst)
    );
}

// ---- 5. busy datasets ----

/// SY3: a Sync of a dataset another connection is working on is refused as temporary (busy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_syncing_a_busy_dataset_is_refused_as_temporary() {
    let src = source(&[""], &["s1", "s2"]);
    let dst = target_host();
    let recv = Receiver::start(&dst).await;
    let all = src.snapshots(SRC);
    let req = SyncRequest::new(&rel(""), &all);
    let mut first = recv.client().await;
    let mut second = recv.client().await;
    assert_eq!(
        first.sync(&req).await.unwrap(),
        SyncReply::New { buffered: false }
    );
    match second.sync(&req).await.unwrap() {
        SyncReply::Refused {
            reason,
            temporary: true,
        } if reason.contains("busy") => {}
        other => panic!("expected busy, got {other:?}"),
    }
    stream(&mut first, &src, SRC, None, &all[0])
        .await
        .expect("s1");
    // Still busy while a stream is being received.
    match second.sync(&req).await.unwrap() {
        SyncReply::Refused {
            temporary: true, ..
        } => {}
        other => panic!("expected busy, got {other:?}"),
    }
    stream(&mut first, &src, SRC, Some(&all[0]), &all[1])
        .await
        .expect("s2");
    first.finish().await.expect("finish");
    assert_eq!(
        second.sync(&req).await.unwrap(),
        SyncReply::UpToDate {
            snapshot: "s2".into()
        }
    );
    first.bye().await;
    second.bye().await;
    assert_replica(&src, &dst);
}

/// SN2: zfsync_send::run re-queues a dataset the receiver calls busy and syncs it once it is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_requeues_a_busy_dataset_and_syncs_it_once_free() {
    let src = source(&["", "/a", "/b"], &["s1"]);
    let dst = target_host();
    let recv = Receiver::start(&dst).await;
    // Another connection holds the top dataset: its Sync opened it.
    let mut holder = recv.client().await;
    let req = SyncRequest::new(&rel(""), &src.snapshots(SRC));
    assert_eq!(
        holder.sync(&req).await.unwrap(),
        SyncReply::New { buffered: false }
    );

    let started = Instant::now();
    // (`run`'s future is not `Send`, so it runs on this task, beside the
    // watcher.)
    let run = zfsync_send::run(recv.send_options(&src, 1, false), CancellationToken::new());
    let a = format!("{BUF}/2F61");
    let watch = async {
        // The run tried the top first, was told busy, and went on with /a.
        wait_until("/a in the buffer", &dst, || !dst.snapshots(&a).is_empty()).await;
        assert!(dst.dataset(DST).is_none(), "{}", both(&src, &dst));
        holder.bye().await;
    };
    let (report, ()) = tokio::join!(tokio::time::timeout(PATIENCE, run), watch);
    let report = report.expect("the run ends").expect("the run starts");
    assert_ok(&report, &src, &dst);
    assert_sent(&report, "", SendKind::Full, "s1");
    for r in ["/a", "/b"] {
        match status(&report, r) {
            Status::Sent {
                buffered: true,
                placed: true,
                ..
            } => {}
            other => panic!("{r}: {other:?}\n{}", text(&report)),
        }
    }
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "a busy dataset is tried again after a pause"
    );
    assert_replica(&src, &dst);
    assert_same_tree(&src, &dst);
}

// ---- 6. shutdown ----

/// SE2, ING3: a receiver shutdown mid-stream ends the connection, commits nothing half-sent, and run returns within --grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_shutdown_mid_stream_commits_nothing_and_returns_within_grace() {
    let src = source(&[""], &["s1", "s2"]);
    let dst = target_host();
    let mut recv = Receiver::start(&dst).await;
    let all = src.snapshots(SRC);
    let mut c = recv.client().await;
    let first = SyncRequest::new(&rel(""), &all[..1]);
    assert_eq!(
        c.sync(&first).await.unwrap(),
        SyncReply::New { buffered: false }
    );
    stream(&mut c, &src, SRC, None, &all[0]).await.expect("s1");
    c.finish().await.expect("finish");

    let req = SyncRequest::new(&rel(""), &all);
    assert_eq!(
        c.sync(&req).await.unwrap(),
        SyncReply::Incremental {
            base_guid: all[0].guid,
            count: 1
        }
    );
    c.begin_stream(Some(all[0].guid), &all[1])
        .await
        .expect("ready");
    let bytes = send_bytes(&src, SRC, Some(&all[0]), &all[1]).await;
    let cut = bytes.len() - 100;
    for part in [&bytes[..cut / 2], &bytes[cut / 2..cut]] {
        c.connection()
            .send_data(Bytes::copy_from_slice(part))
            .await
            .expect("data");
    }
    wait_until("the incremental's zfs receive", &dst, || {
        count_calls(&dst, "receive -u dst/t") == 2
    })
    .await;

    let took = recv.stop().await;
    assert!(took < GRACE, "run took {took:?} to return");
    match c.connection().read_msg().await {
        Err(ProtocolError::Peer(reason)) => {
            assert!(reason.contains("shutting down"), "{reason}")
        }
        other => panic!("expected the receiver's error, got {other:?}"),
    }
    assert_eq!(
        snaps(&dst, DST),
        snaps(&src, SRC)[..1].to_vec(),
        "the cut snapshot is not committed\n{}",
        both(&src, &dst)
    );
}

/// SE2: a receiver shutdown does not interrupt a zfs receive that has its whole stream: it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_shutdown_lets_a_whole_stream_being_applied_commit() {
    let src = source(&[""], &["s1"]);
    let dst = target_host();
    dst.delay_receive(Duration::from_millis(600));
    let mut recv = Receiver::start(&dst).await;
    let all = src.snapshots(SRC);
    let mut c = recv.client().await;
    let req = SyncRequest::new(&rel(""), &all);
    assert_eq!(
        c.sync(&req).await.unwrap(),
        SyncReply::New { buffered: false }
    );
    c.begin_stream(None, &all[0]).await.expect("ready");
    let bytes = send_bytes(&src, SRC, None, &all[0]).await;
    let n = c.pump(&mut &bytes[..], |_| {}).await.expect("pump");
    let ending = tokio::spawn(async move { c.end_stream(n).await });
    // The End is read at once; the receive then takes 600 ms to apply.
    tokio::time::sleep(Duration::from_millis(150)).await;

    let took = recv.stop().await;
    assert!(took < GRACE, "run took {took:?} to return");
    let stored = tokio::time::timeout(PATIENCE, ending)
        .await
        .expect("an answer")
        .expect("no panic");
    assert_eq!(stored.ok(), Some(n), "{}", both(&src, &dst));
    assert_replica(&src, &dst);
}

/// SN8 (run's shutdown token): a stopped sender ends promptly, only whole snapshots arrive, and the next run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_stop_mid_run_leaves_only_whole_snapshots_and_the_next_run_completes() {
    let rels = ["", "/a", "/b", "/c"];
    let src = source(&rels, &["s1", "s2", "s3"]);
    let dst = target_host();
    dst.delay_receive(Duration::from_millis(300));
    let recv = Receiver::start(&dst).await;
    let token = CancellationToken::new();
    let run = zfsync_send::run(recv.send_options(&src, 1, false), token.clone());
    let stop = async {
        wait_until("the first zfs receive", &dst, || {
            count_calls(&dst, "receive") > 0
        })
        .await;
        token.cancel();
        Instant::now()
    };
    let (report, stopped) = tokio::join!(tokio::time::timeout(PATIENCE, run), stop);
    let report = report.expect("the run ends").expect("the run starts");
    let took = stopped.elapsed();
    assert!(
        took < GRACE,
        "the run took {took:?} to stop\n{}",
        text(&report)
    );
    assert!(report.stopped, "{}", text(&report));
    assert_eq!(report.exit_code(), zfsync_send::exit::FAILED);
    assert!(
        report.outcomes.iter().any(|o| matches!(
            &o.status,
            Status::Failed { reason } if reason.contains("the run was stopped")
        )),
        "{}",
        text(&report)
    );
    for (r, (_, got)) in copies(&dst, DST) {
        let want = snaps(&src, &src_ds(&r));
        assert!(
            want.starts_with(&got),
            "{r}: only whole snapshots of the sender's, in order\n{}",
            both(&src, &dst)
        );
    }
    assert!(
        copies(&dst, DST)
            .values()
            .map(|(_, s)| s.len())
            .sum::<usize>()
            < rels.len() * 3,
        "the run stopped before the end\n{}",
        both(&src, &dst)
    );

    dst.delay_receive(Duration::ZERO);
    let report = recv.send(&src, 1, false).await;
    assert_ok(&report, &src, &dst);
    assert_replica(&src, &dst);
    assert_same_tree(&src, &dst);
}

// ---- 7. a whole tree ----

/// Replicates a three-level tree with `threads` workers, then again (all up
/// to date), then after a new snapshot everywhere (all incremental).
async fn tree_replicates(threads: usize) {
    let rels = ["", "/a", "/a/x", "/a/y", "/b", "/b/z"];
    let src = source(&rels, &["s1", "s2"]);
    src.snapshot(&src_ds("/a"), "s3");
    src.snapshot(&src_ds("/b/z"), "s3");
    let newest = |r: &str| if r == "/a" || r == "/b/z" { "s3" } else { "s2" };
    let dst = target_host();
    let recv = Receiver::start(&dst).await;

    let report = recv.send(&src, threads, false).await;
    assert_ok(&report, &src, &dst);
    for r in rels {
        assert_sent(&report, r, SendKind::Full, newest(r));
    }
    assert_replica(&src, &dst);
    assert_same_tree(&src, &dst);
    assert!(names_under(&dst, BUF).is_empty(), "{}", both(&src, &dst));

    dst.clear_calls();
    let report = recv.send(&src, threads, false).await;
    assert_ok(&report, &src, &dst);
    for r in rels {
        assert_up_to_date(&report, r, newest(r));
    }
    assert!(
        dst.calls().iter().all(|c| c.starts_with("get")),
        "an up-to-date run only lists\n{}",
        dump("receiver", &dst)
    );

    for r in rels {
        src.snapshot(&src_ds(r), "s4");
    }
    let report = recv.send(&src, threads, false).await;
    assert_ok(&report, &src, &dst);
    for r in rels {
        match status(&report, r) {
            Status::Sent {
                kind: SendKind::Incremental,
                from: Some(from),
                to,
                snapshots: 1,
                ..
            } if from == newest(r) && to == "s4" => {}
            other => panic!(
                "{r}: expected @{}..@s4, got {other:?}\n{}",
                newest(r),
                text(&report)
            ),
        }
    }
    assert_replica(&src, &dst);
    assert_same_tree(&src, &dst);
}

/// SN1, PL4: with one worker a tree replicates whole (the sender's GUIDs), then is up to date, then goes incremental.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_replicates_whole_then_is_up_to_date_then_incremental_with_one_worker() {
    tree_replicates(1).await;
}

/// SN1, PL4, BU1: the same with four workers, children arriving before their parents being buffered, then placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_replicates_whole_then_is_up_to_date_then_incremental_with_four_workers() {
    tree_replicates(4).await;
}
