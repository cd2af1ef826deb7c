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
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use zfsync_common::caps::{Cap, Caps};
use zfsync_common::client::{CleanReport, Client, ClientError, ClientOptions, Finished};
use zfsync_common::naming::{
    format_confirm_prop, format_hold_tag, format_receiver_id, format_replica_mark, DatasetName,
    HoldTag, RelPath, SnapClass, SnapName, RECV_HOLD, REPLICA_PROP,
};
use zfsync_common::plan::{steps, Decision, FullReason};
use zfsync_common::protocol::{Bytes, PlaceFailure, ProtocolError, SyncReply, SyncRequest};
use zfsync_common::tls::{server_config, TlsFiles};
use zfsync_common::zfs::fake::{FakeError, FakeZfs};
use zfsync_common::zfs::{ResumeInfo, SendFrom, SendWhat, Snapshot, ZfsBackend};
use zfsync_e2e::Certs;
use zfsync_send::{Delete, Report, SendKind, Status};

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
    source_on(FakeZfs::zfs_fuse(), rels, snaps)
}

/// The same on a host with other capabilities (`FakeZfs::openzfs()`).
fn source_on(zfs: FakeZfs, rels: &[&str], snaps: &[&str]) -> FakeZfs {
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
    target_on(FakeZfs::zfs_fuse())
}

/// The same on a host with other capabilities (`FakeZfs::openzfs()`:
/// `receive -s`/`-A`, `zfs holds`, ...).
fn target_on(zfs: FakeZfs) -> FakeZfs {
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

/// Waits (at most [`GRACE`], far below the receiver's idle timeout) until
/// a Sync of `path` is no longer refused as busy: no connection holds its
/// lock.
async fn wait_unlocked(recv: &Receiver, src: &FakeZfs, path: &str, what: &str) {
    let mut c = recv.client().await;
    let req = SyncRequest::new(&rel(path), &src.snapshots(&src_ds(path)));
    let start = Instant::now();
    while let SyncReply::Refused {
        temporary: true, ..
    } = c.sync(&req).await.expect("sync")
    {
        assert!(
            start.elapsed() < GRACE,
            "{what}: {path} is still locked after {GRACE:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    c.bye().await;
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
        Receiver::start_at(zfs, DST, mirror_retention).await
    }

    /// A receiver whose target is `target` (a pool's root, say) rather
    /// than [`DST`].
    async fn start_at(zfs: &FakeZfs, target: &str, mirror_retention: bool) -> Receiver {
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
            target: ds(target),
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

    /// A protocol client that announces what OpenZFS can do (`send -t`
    /// among it), where [`Receiver::client`] announces nothing.
    async fn openzfs_client(&self) -> Client {
        let opts = ClientOptions {
            caps: Caps::all("zfs-2.1.11-1"),
            ..self.client_options()
        };
        Client::connect(&opts)
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
    read_send(src, &what).await
}

/// The bytes `zfs send -t token` writes on the sending host.
async fn resume_bytes(src: &FakeZfs, token: &str) -> Vec<u8> {
    let what = SendWhat::Resume {
        token: token.to_string(),
    };
    read_send(src, &what).await
}

async fn read_send(src: &FakeZfs, what: &SendWhat) -> Vec<u8> {
    let mut child = src.spawn_send(what, &[]).expect("zfs send starts");
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

/// A whole `zfsync_send::run` with these options (from
/// [`Receiver::send_options`], changed).
async fn run_sender(opts: zfsync_send::Options) -> Report {
    let run = zfsync_send::run(opts, CancellationToken::new());
    tokio::time::timeout(PATIENCE, run)
        .await
        .expect("the sender's run ends")
        .expect("the sender's run starts")
}

/// Destroys a source dataset and all below it, as a person would,
/// releasing the holds on its snapshots first (the sender holds each
/// confirmed base).
async fn destroy_on_source(src: &FakeZfs, path: &str) {
    let top = ds(&src_ds(path));
    for name in src.names() {
        let d = ds(&name);
        if d.relative_to(&top).is_none() {
            continue;
        }
        for s in src.snapshots(&name) {
            let snap = d.snapshot(&s.name).expect("snapshot name");
            for tag in src.holds(snap.as_str()) {
                src.release(&tag, std::slice::from_ref(&snap))
                    .await
                    .expect("release");
            }
        }
    }
    src.destroy_recursive(&top)
        .await
        .expect("destroy on the source");
}

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

/// ING4: an incremental whose base is no longer the destination's newest snapshot when its stream starts is refused ("changed meanwhile"); nothing is rolled back or received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_whose_base_moved_meanwhile_is_refused_without_a_rollback() {
    let src = source(&[""], &["s1", "s2"]);
    let dst = target_host();
    let recv = Receiver::start(&dst).await;
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
    // A person snapshots the replica after the answer, before the stream.
    dst.snapshot(DST, "local");
    let before = copies(&dst, "dst");
    dst.clear_calls();
    match stream(&mut c, &src, SRC, Some(&all[0]), &all[1]).await {
        Err(ClientError::StreamFailed(reason)) if reason.contains("changed meanwhile") => {}
        other => panic!(
            "expected the stream to be refused, got {other:?}\n{}",
            both(&src, &dst)
        ),
    }
    assert_eq!(copies(&dst, "dst"), before, "{}", both(&src, &dst));
    assert!(
        !dst.calls().iter().any(|c| c.starts_with("rollback")
            || c.starts_with("receive")
            || c.starts_with("destroy")),
        "nothing may be rolled back, received or destroyed\n{}",
        dump("receiver", &dst)
    );
    // The connection goes on; the dataset is not finished.
    let refused = c.finish().await.expect_err("@s2 never arrived");
    assert!(
        refused
            .to_string()
            .contains("did not receive every snapshot"),
        "{refused}"
    );
    c.bye().await;
}

/// ING5, ING6: -F only to fill a pool's root without snapshots (--full): with the sender's stream when it is a single full stream, else from the whole new copy in top.full by a local send | receive -F, then -I; never resumable, the root unmounted first, and never marked as a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_with_f_only_fills_a_pool_root_without_snapshots() {
    let root = "dst";
    let top_full = format!("{root}/zfsyncbuffer/top.full");
    for count in [1, 2] {
        let src = source_on(FakeZfs::openzfs(), &[""], &["s1", "s2"][..count]);
        let dst = target_on(FakeZfs::openzfs());
        let recv = Receiver::start_at(&dst, root, true).await;
        let report = recv.send(&src, 1, false).await;
        let why = failure(&report, "");
        assert!(why.contains("--full"), "{why}");
        assert!(
            !dst.calls().iter().any(|c| c.starts_with("receive")),
            "{}",
            dump("receiver", &dst)
        );

        dst.clear_calls();
        let report = recv.send(&src, 1, true).await;
        assert_ok(&report, &src, &dst);
        assert_eq!(snaps(&dst, root), snaps(&src, SRC), "{}", both(&src, &dst));
        let calls = dst.calls();
        let receives: Vec<&String> = calls.iter().filter(|c| c.starts_with("receive")).collect();
        // Both ends can resume (-s), but never a receive with -F.
        let want = match count {
            1 => vec![format!("receive -u -F {root}")],
            _ => vec![
                format!("receive -u -s {top_full}"),
                format!("receive -u -s {top_full}"),
                format!("receive -u -F {root}"),
                format!("receive -u {root}"),
            ],
        };
        assert_eq!(
            receives,
            want.iter().collect::<Vec<_>>(),
            "{}",
            dump("receiver", &dst)
        );
        let at = |call: String| {
            calls
                .iter()
                .position(|c| *c == call)
                .unwrap_or_else(|| panic!("no `zfs {call}`\n{}", dump("receiver", &dst)))
        };
        assert!(
            at(format!("unmount {root}")) < at(format!("receive -u -F {root}")),
            "unmounted before the overwrite\n{}",
            dump("receiver", &dst)
        );
        assert!(
            dst.dataset(&top_full).is_none(),
            "{}",
            dump("receiver", &dst)
        );
        assert_eq!(
            (dst.prop(root, "canmount"), dst.prop(root, REPLICA_PROP)),
            (None, None),
            "zfsync filled the pool's root but did not create it\n{}",
            dump("receiver", &dst)
        );
    }
}

/// ING5, ING6, RE1: any other dataset without snapshots is replaced through HEX.full like one with snapshots, never with -F, and becomes a marked replica; a mark found wrong is set again at the next Finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_without_snapshots_is_replaced_whole_and_marked() {
    let src = source_on(FakeZfs::openzfs(), &["", "/a"], &["s1", "s2"]);
    let dst = target_on(FakeZfs::openzfs());
    // Made by hand: no snapshots; a child made by hand too.
    dst.create(DST);
    dst.create("dst/t/own");
    let own = copy_at(&dst, "dst/t/own");
    let recv = Receiver::start(&dst).await;
    let report = recv.send(&src, 1, true).await;
    assert_ok(&report, &src, &dst);
    assert_sent(&report, "", SendKind::Replaced, "s2");
    assert_replica(&src, &dst);
    let receives: Vec<String> = dst
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("receive"))
        .collect();
    let top_full = format!("receive -u -s {BUF}/top.full");
    let a = format!("receive -u -s {}", dst_ds("/a"));
    assert_eq!(
        receives,
        [top_full.clone(), top_full, a.clone(), a],
        "{}",
        dump("receiver", &dst)
    );
    assert_eq!(
        copy_at(&dst, "dst/t/own"),
        own,
        "{}",
        dump("receiver", &dst)
    );
    let marked = |dst: &FakeZfs| {
        let guid = dst.dataset(DST).expect("in place").guid;
        assert_eq!(
            (dst.prop(DST, "canmount"), dst.prop(DST, REPLICA_PROP)),
            (Some("noauto".to_string()), Some(format_replica_mark(guid))),
            "{}",
            dump("receiver", dst)
        );
    };
    marked(&dst);

    // A mark found wrong (a crash between the receive and the marks) is
    // set again at the next Finish.
    dst.set(&ds(DST), REPLICA_PROP, "0").await.expect("zfs set");
    src.snapshot(SRC, "s3");
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    marked(&dst);
}

/// ING7, FI1: a stream that ends short of the snapshot it announced is reported failed although zfs receive succeeded, and Finish is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_does_not_end_at_its_announced_snapshot_is_reported_failed() {
    let src = source(&[""], &["s1", "s2", "s3"]);
    let dst = target_host();
    let recv = Receiver::start(&dst).await;
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
            count: 2
        }
    );
    // Announces @s3 but carries @s1..@s2: its head (the first substream,
    // from the base to an announced snapshot) passes.
    c.begin_stream(Some(all[0].guid), &all[2])
        .await
        .expect("ready");
    let bytes = send_bytes(&src, SRC, Some(&all[0]), &all[1]).await;
    let n = c.pump(&mut &bytes[..], |_| {}).await.expect("pump");
    match c.end_stream(n).await {
        Err(ClientError::StreamFailed(reason))
            if reason.contains("did not end at the announced snapshot @s3") => {}
        other => panic!(
            "expected the stream to fail, got {other:?}\n{}",
            both(&src, &dst)
        ),
    }
    // What arrived is the sender's own @s2, whole.
    assert_eq!(
        snaps(&dst, DST),
        snaps(&src, SRC)[..2].to_vec(),
        "{}",
        both(&src, &dst)
    );
    let refused = c.finish().await.expect_err("@s3 never arrived");
    assert!(
        refused
            .to_string()
            .contains("did not receive every snapshot"),
        "{refused}"
    );
    c.bye().await;
}

/// ING7, SY5: a resumed receive that zfs refuses has its partial state discarded (receive -A), so the next Sync plans afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_resumed_receive_discards_the_partial_state() {
    let src = source_on(FakeZfs::openzfs(), &[""], &["s1"]);
    let dst = target_on(FakeZfs::openzfs());
    let recv = Receiver::start(&dst).await;
    let mut c = recv.openzfs_client().await;
    let (_, done) = sync_dataset(&mut c, &src, "", false).await;
    done.unwrap_or_else(|e| panic!("{e}\n{}", both(&src, &dst)));
    c.bye().await;

    // @s2 was cut on its way: its state waits for `zfs send -t`.
    let s2 = src.snapshot(SRC, "s2");
    let all = src.snapshots(SRC);
    let token = "1-cut-at-s2";
    src.register_resume_token(
        token,
        ResumeInfo {
            from_guid: all[0].guid,
            to_guid: s2.guid,
            to_name: format!("{SRC}@s2"),
            bytes_done: Some(512),
            bytes_left: None,
            raw: false,
        },
    );
    dst.set_resume_token(DST, Some(token));
    dst.fail(
        "receive",
        DST,
        1,
        FakeError::Other("cannot receive resume stream: checksum mismatch".into()),
    );
    dst.clear_calls();
    let mut c = recv.openzfs_client().await;
    let req = SyncRequest::new(&rel(""), &all);
    assert_eq!(
        c.sync(&req).await.unwrap(),
        SyncReply::Resume {
            token: token.into()
        }
    );
    c.begin_resume(Some(all[0].guid), &s2).await.expect("ready");
    let bytes = resume_bytes(&src, token).await;
    let n = c.pump(&mut &bytes[..], |_| {}).await.expect("pump");
    match c.end_stream(n).await {
        Err(ClientError::StreamFailed(reason))
            if reason.contains("checksum mismatch")
                && reason.contains("the partial state was discarded (zfs receive -A)") => {}
        other => panic!(
            "expected the resumed stream to fail, got {other:?}\n{}",
            both(&src, &dst)
        ),
    }
    assert!(
        dst.calls().contains(&format!("receive -A {DST}")),
        "{}",
        dump("receiver", &dst)
    );
    assert_eq!(dst.dataset(DST).expect("kept").resume_token, None);

    // Planned afresh: an incremental, no resume offer.
    let (reply, done) = sync_dataset(&mut c, &src, "", false).await;
    assert_eq!(
        reply,
        SyncReply::Incremental {
            base_guid: all[0].guid,
            count: 1
        }
    );
    done.unwrap_or_else(|e| panic!("{e}\n{}", both(&src, &dst)));
    c.bye().await;
    assert_replica(&src, &dst);
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

/// BU3, FI2: --delete-missing destroys only the top of a wholly orphaned subtree of replicas, its holds released first, judged on a fresh listing: a dataset made by hand since the run's listing saves its subtree, and a locked orphan is left alone and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_missing_destroys_only_whole_replica_subtrees_judged_on_a_fresh_listing() {
    let rels = [
        "", "/keep", "/gone", "/gone/x", "/mixed", "/mixed/y", "/busy",
    ];
    let src = source(&rels, &["s1"]);
    let dst = target_on(FakeZfs::openzfs());
    let recv = Receiver::start(&dst).await;
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    let gone_x = format!("{}@s1", dst_ds("/gone/x"));
    assert_eq!(
        dst.holds(&gone_x),
        [RECV_HOLD],
        "{}",
        dump("receiver", &dst)
    );

    // Another connection is receiving into /busy: its Sync holds the lock.
    let busy = src_ds("/busy");
    src.snapshot(&busy, "s2");
    let mut holder = recv.client().await;
    let req = SyncRequest::new(&rel("/busy"), &src.snapshots(&busy));
    assert!(
        matches!(
            holder.sync(&req).await.unwrap(),
            SyncReply::Incremental { .. }
        ),
        "{}",
        dump("receiver", &dst)
    );
    // The connection that asks for the cleanup lists the target at its
    // hello; then a person makes a dataset below /mixed, with a copy of
    // its parent's mark (as an inherited value would show).
    let mut c = recv.client().await;
    let late = dst_ds("/mixed/late");
    dst.create(&late);
    let mark = dst.prop(&dst_ds("/mixed"), REPLICA_PROP).expect("marked");
    dst.set(&ds(&late), REPLICA_PROP, &mark)
        .await
        .expect("zfs set");
    dst.clear_calls();
    let report = c
        .clean_buffer(vec![String::new(), "/keep".into()], true, false)
        .await
        .expect("cleanbuffer");
    c.bye().await;
    holder.bye().await;

    let mut orphans = report.orphans.clone();
    orphans.sort();
    assert_eq!(orphans, ["/busy", "/gone", "/gone/x", "/mixed", "/mixed/y"]);
    assert_eq!(report.deleted, ["/gone"], "{}", dump("receiver", &dst));
    // The locked one is reported; the one a person's dataset saved is not
    // a failure.
    match report.failed.as_slice() {
        [PlaceFailure { path, reason }]
            if path == "/busy" && reason.starts_with("cannot delete the orphaned replica") => {}
        other => panic!("expected /busy to be reported, got {other:?}"),
    }
    let calls = dst.calls();
    let destroys: Vec<&String> = calls.iter().filter(|c| c.starts_with("destroy")).collect();
    assert_eq!(
        destroys,
        [&format!("destroy -r {}", dst_ds("/gone"))],
        "only the top, once\n{}",
        dump("receiver", &dst)
    );
    let released = calls
        .iter()
        .position(|c| c.starts_with(&format!("release {RECV_HOLD} ")) && c.contains(&gone_x));
    let destroyed = calls.iter().position(|c| c.starts_with("destroy"));
    assert!(
        released.is_some() && released < destroyed,
        "the receiver's holds go first\n{}",
        dump("receiver", &dst)
    );
    for r in ["/gone", "/mixed"] {
        assert!(
            calls.contains(&format!("get -r {}", dst_ds(r))),
            "{r} is listed afresh\n{}",
            dump("receiver", &dst)
        );
    }
    for r in ["/keep", "/mixed", "/mixed/y", "/mixed/late", "/busy"] {
        assert!(dst.dataset(&dst_ds(r)).is_some(), "{r} was destroyed");
    }
    for r in ["/gone", "/gone/x"] {
        assert!(dst.dataset(&dst_ds(r)).is_none(), "{r} is still there");
    }
}

/// BU4: a run in which a dataset failed does not ask for --delete-missing: the orphan is reported and kept; a later run without failures deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_missing_is_not_sent_when_a_dataset_failed() {
    let src = source(&["", "/a", "/old"], &["s1"]);
    let dst = target_host();
    let recv = Receiver::start(&dst).await;
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    destroy_on_source(&src, "/old").await;
    // /a diverges on the receiver: without --full it fails.
    dst.snapshot(&dst_ds("/a"), "local");

    let mut opts = recv.send_options(&src, 1, false);
    opts.delete_missing = true;
    let report = run_sender(opts).await;
    let why = failure(&report, "/a");
    assert!(why.contains("--full"), "{why}");
    assert_eq!(report.delete, Delete::Skipped, "{}", text(&report));
    assert_eq!(report.clean.orphans, ["/old"], "{}", text(&report));
    assert!(report.clean.deleted.is_empty(), "{}", text(&report));
    assert!(
        dst.dataset(&dst_ds("/old")).is_some(),
        "{}",
        both(&src, &dst)
    );

    let mut opts = recv.send_options(&src, 1, true);
    opts.delete_missing = true;
    let report = run_sender(opts).await;
    assert_ok(&report, &src, &dst);
    assert_eq!(report.delete, Delete::Done, "{}", text(&report));
    assert_eq!(report.clean.deleted, ["/old"], "{}", text(&report));
    assert_same_tree(&src, &dst);
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

impl Swap {
    /// Asks for a --full replacement of `path` on a new connection and
    /// sends the first `steps_sent` streams of the new copy; returns the
    /// connection, its dataset still open.
    async fn start_replacement(&self, steps_sent: usize) -> Client {
        let name = src_ds(self.path);
        let all = self.src.snapshots(&name);
        let mut c = self.recv.client().await;
        let req = SyncRequest::new(&rel(self.path), &all).allow_full(true);
        let reason = match c.sync(&req).await.expect("sync") {
            SyncReply::Full {
                reason,
                accepted: true,
            } => reason,
            other => panic!(
                "expected an accepted --full, got {other:?}\n{}",
                self.dump()
            ),
        };
        let decision = Decision::Full {
            reason,
            accepted: true,
        };
        for step in steps(&all, &decision).into_iter().take(steps_sent) {
            stream(&mut c, &self.src, &name, step.from, step.to)
                .await
                .unwrap_or_else(|e| panic!("a stream of the new copy: {e}\n{}", self.dump()));
        }
        c
    }

    /// Waits until `path` is no longer busy (see [`wait_unlocked`]).
    async fn wait_unlocked(&self, path: &str, what: &str) {
        wait_unlocked(&self.recv, &self.src, path, what).await;
    }

    /// A --full swap of /a that has to wait for /a/y, into which another
    /// connection is receiving. While it waits, /a/x (which it already
    /// locked) is busy for everyone else, the old copy is still in place,
    /// and `meanwhile` runs; then the transfer into /a/y ends and the swap
    /// goes on. Returns what Finish said.
    async fn swap_waiting_for_a_busy_child(
        &self,
        meanwhile: impl FnOnce(),
    ) -> Result<Finished, String> {
        assert_eq!(self.path, "/a");
        let y = src_ds("/a/y");
        self.src.snapshot(&y, "s3");
        let ys = self.src.snapshots(&y);
        let mut other = self.recv.client().await;
        let req = SyncRequest::new(&rel("/a/y"), &ys);
        assert_eq!(
            other.sync(&req).await.unwrap(),
            SyncReply::Incremental {
                base_guid: ys[1].guid,
                count: 1
            }
        );
        let mut watcher = self.recv.client().await;
        let x = SyncRequest::new(&rel("/a/x"), &self.src.snapshots(&src_ds("/a/x")));

        let mut c = self.start_replacement(2).await;
        let finishing = tokio::spawn(async move {
            let done = c.finish().await;
            c.bye().await;
            done
        });
        let start = Instant::now();
        loop {
            match watcher.sync(&x).await.expect("sync") {
                SyncReply::Refused {
                    reason,
                    temporary: true,
                } if reason.contains("busy") => break,
                SyncReply::UpToDate { .. } => {}
                other => panic!("/a/x: {other:?}\n{}", self.dump()),
            }
            assert!(
                start.elapsed() < PATIENCE,
                "the swap never locked /a/x\n{}",
                self.dump()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            !finishing.is_finished(),
            "the swap waits for /a/y\n{}",
            self.dump()
        );
        assert_eq!(
            copies(&self.dst, DST),
            self.before,
            "nothing moved yet\n{}",
            self.dump()
        );
        meanwhile();

        stream(&mut other, &self.src, &y, Some(&ys[1]), &ys[2])
            .await
            .expect("@s3 into /a/y");
        other.finish().await.expect("finish /a/y");
        other.bye().await;
        watcher.bye().await;
        tokio::time::timeout(PATIENCE, finishing)
            .await
            .expect("the swap ends")
            .expect("no panic")
            .map_err(|e| e.to_string())
    }
}

/// SE1: a new Sync, a Bye and a cut connection each abandon an unfinished replacement: HEX.full is destroyed and the lock freed; the old copy is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoning_an_unfinished_replacement_destroys_it_and_frees_the_lock() {
    let s = Swap::new("/a").await;
    let full = format!("{BUF}/2F61.full");
    for how in ["a new sync", "bye", "a cut connection"] {
        let mut c = s.start_replacement(1).await;
        assert_eq!(
            snaps(&s.dst, &full),
            snaps(&s.src, &src_ds("/a"))[..1].to_vec(),
            "{how}: the new copy is on its way\n{}",
            s.dump()
        );
        match how {
            "a new sync" => {
                let x = SyncRequest::new(&rel("/a/x"), &s.src.snapshots(&src_ds("/a/x")));
                assert_eq!(
                    c.sync(&x).await.unwrap(),
                    SyncReply::UpToDate {
                        snapshot: "s2".into()
                    }
                );
                assert!(s.dst.dataset(&full).is_none(), "{}", s.dump());
                c.bye().await;
            }
            "bye" => c.bye().await,
            _ => drop(c),
        }
        wait_until(&format!("{how} to remove {full}"), &s.dst, || {
            s.dst.dataset(&full).is_none()
        })
        .await;
        assert_eq!(
            copies(&s.dst, DST),
            s.before,
            "{how}: the old copy is untouched\n{}",
            s.dump()
        );
        s.wait_unlocked("/a", how).await;
    }
}

/// FI1, SE1: Finish before the new copy is whole is refused and removes the unfinished replacement; the old copy stays, the lock is freed and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finish_before_the_replacement_is_whole_is_refused_and_removes_it() {
    let s = Swap::new("/a").await;
    let full = format!("{BUF}/2F61.full");
    let mut c = s.start_replacement(1).await;
    assert!(s.dst.dataset(&full).is_some(), "{}", s.dump());
    let refused = c.finish().await.expect_err("@s2 has not arrived");
    assert!(
        refused
            .to_string()
            .contains("/a did not receive every snapshot up to the sender's newest"),
        "{refused}"
    );
    assert!(s.dst.dataset(&full).is_none(), "{}", s.dump());
    assert_eq!(copies(&s.dst, DST), s.before, "{}", s.dump());

    // Not busy: the same connection replaces the dataset now.
    let (_, done) = sync_dataset(&mut c, &s.src, "/a", true).await;
    let done = done.unwrap_or_else(|e| panic!("{e}\n{}", s.dump()));
    assert_eq!(done.location, dst_ds("/a"));
    c.bye().await;
    assert_replica(&s.src, &s.dst);
    s.assert_children_kept(&["/a/x", "/a/y"]);
}

/// RE2: a stale HEX.old that holds a dataset is never destroyed: the swap is refused, naming the zfs list -r to look at; once a person moved the dataset away, the next swap destroys the bare HEX.old and goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_parked_copy_holding_a_dataset_is_kept_and_stops_the_swap() {
    let s = Swap::new("/a").await;
    let parked = format!("{BUF}/2F61.old");
    let stray = format!("{parked}/z");
    if s.dst.dataset(BUF).is_none() {
        s.dst.create(BUF);
    }
    s.dst.create(&parked);
    s.dst.create(&stray);
    s.dst.snapshot(&stray, "z1");
    let kept = copies(&s.dst, &parked);

    let err = s.attempt_fails().await;
    assert!(
        err.contains(&format!(
            "{parked} is left from an interrupted replacement and holds datasets"
        )) && err.contains(&format!("zfs list -r {parked}")),
        "{err}"
    );
    assert_eq!(copies(&s.dst, &parked), kept, "{}", s.dump());
    assert_eq!(copies(&s.dst, DST), s.before, "{}", s.dump());
    assert!(
        !s.dst
            .calls()
            .iter()
            .any(|c| c.starts_with("destroy") && c.contains(&parked)),
        "{}",
        s.dump()
    );

    s.dst
        .rename(&ds(&stray), &ds("dst/z"))
        .await
        .expect("move the stray dataset away by hand");
    let report = s.converges().await;
    assert_sent(&report, "/a", SendKind::Replaced, "s2");
    s.assert_children_kept(&["/a/x", "/a/y"]);
    assert!(s.dst.dataset(&parked).is_none(), "{}", s.dump());
}

/// RE5, RE4: the swap waits for the lock of every in-place dataset below the old copy, keeping those it holds busy for others, and goes on once the last transfer ends; a child made below the old copy meanwhile moves under the new copy, and the bare parked copy is destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_swap_waits_for_transfers_below_the_old_copy_and_brings_a_late_child_along() {
    let s = Swap::new("/a").await;
    let late = dst_ds("/a/late");
    let done = s
        .swap_waiting_for_a_busy_child(|| {
            s.dst.create(&late);
            s.dst.snapshot(&late, "l1");
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", s.dump()));
    assert_eq!(done.location, dst_ds("/a"));
    assert_eq!(
        snaps(&s.dst, &dst_ds("/a")),
        snaps(&s.src, &src_ds("/a")),
        "{}",
        s.dump()
    );
    s.assert_children_kept(&["/a/x"]);
    // /a/y is the old dataset, with the @s3 it received while the swap waited.
    let (y_guid, _) = s.before.get("/a/y").cloned().expect("listed");
    assert_eq!(
        copy_at(&s.dst, &dst_ds("/a/y")),
        Some((y_guid, snaps(&s.src, &src_ds("/a/y")))),
        "{}",
        s.dump()
    );
    let late_snaps: Vec<String> = snaps(&s.dst, &late).into_iter().map(|(n, _)| n).collect();
    assert_eq!(late_snaps, ["l1"], "{}", s.dump());
    assert!(
        !s.dst
            .names()
            .iter()
            .any(|n| n.ends_with(".old") || n.ends_with(".full")),
        "{}",
        s.dump()
    );
}

/// RE4: a child that appeared below the old copy during the swap and cannot move under the new copy keeps the parked copy: nothing of it is destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_left_below_the_parked_copy_keeps_it() {
    let s = Swap::new("/a").await;
    let parked = format!("{BUF}/2F61.old");
    let late = dst_ds("/a/late");
    let done = s
        .swap_waiting_for_a_busy_child(|| {
            s.dst.create(&late);
            s.dst.snapshot(&late, "l1");
            s.dst.fail("rename", "2F61.old/late", 1, injected("rename"));
        })
        .await
        .unwrap_or_else(|e| panic!("the swap itself succeeds: {e}\n{}", s.dump()));
    assert_eq!(done.location, dst_ds("/a"));
    assert_eq!(
        snaps(&s.dst, &dst_ds("/a")),
        snaps(&s.src, &src_ds("/a")),
        "{}",
        s.dump()
    );
    assert_eq!(
        copy_at(&s.dst, &parked).as_ref(),
        s.before.get("/a"),
        "the old copy stays whole, parked\n{}",
        s.dump()
    );
    let kept: Vec<String> = snaps(&s.dst, &format!("{parked}/late"))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(kept, ["l1"], "{}", s.dump());
    assert!(
        !s.dst
            .calls()
            .iter()
            .any(|c| c.starts_with("destroy") && c.contains("2F61.old")),
        "{}",
        s.dump()
    );
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
    prune_then_sync_with(mirror_retention, |_| {}).await
}

/// [`prune_then_sync`]; `before` is done on the receiving host just before
/// the second run.
async fn prune_then_sync_with(
    mirror_retention: bool,
    before: impl FnOnce(&FakeZfs),
) -> (FakeZfs, FakeZfs, Report) {
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
    before(&dst);
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

/// FI3: a tool snapshot mirrored retention cannot destroy is skipped; the others are destroyed and the dataset is finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_retention_skips_a_snapshot_it_cannot_destroy() {
    let (src, dst, report) = prune_then_sync_with(true, |dst| {
        dst.fail("destroy", &format!("{DST}@{T1}"), 1, injected("destroy"));
    })
    .await;
    assert_eq!(report.mirrored, 3, "{}", text(&report));
    for (r, want) in [
        ("", vec![T1, "manual", T3, T4]),
        ("/a", vec!["manual", T3, T4]),
    ] {
        let kept: Vec<String> = snaps(&dst, &dst_ds(r))
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(kept, want, "{}", both(&src, &dst));
    }
    match status(&report, "") {
        Status::Sent { mirrored: 1, .. } => {}
        other => panic!("{other:?}\n{}", text(&report)),
    }
}

/// FI2: where zfs has hold and holds, Finish holds the newest snapshot (zfsync_recv) and releases the older one before mirrored retention, which can then destroy it; a tree is destroyed only after its holds are released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receivers_hold_moves_to_the_newest_snapshot_before_mirrored_retention() {
    let src = source(&[""], &[T1, T2]);
    let dst = target_on(FakeZfs::openzfs());
    let recv = Receiver::start(&dst).await;
    let mut c = recv.client().await;
    let (_, done) = sync_dataset(&mut c, &src, "", false).await;
    done.unwrap_or_else(|e| panic!("{e}\n{}", both(&src, &dst)));
    let held = |snap: &str| dst.holds(&format!("{DST}@{snap}"));
    assert_eq!(
        (held(T1), held(T2)),
        (vec![], vec![RECV_HOLD.to_string()]),
        "{}",
        dump("receiver", &dst)
    );

    // The sender dropped @T2 but kept a bookmark of it, the base of the
    // next incremental.
    src.snapshot(SRC, T4);
    let all = src.snapshots(SRC);
    let (t1, t2, t4) = (&all[0], &all[1], &all[2]);
    let b2 = Snapshot {
        name: SnapName::new("b2").expect("name"),
        ..t2.clone()
    };
    let req =
        SyncRequest::new(&rel(""), &[t1.clone(), t4.clone()]).bookmarks(std::slice::from_ref(&b2));
    assert_eq!(
        c.sync(&req).await.unwrap(),
        SyncReply::Incremental {
            base_guid: t2.guid,
            count: 1
        }
    );
    dst.clear_calls();
    stream(&mut c, &src, SRC, Some(t2), t4)
        .await
        .expect("@T2..@T4");
    let done = c.finish().await.expect("finish");
    assert_eq!(done.pruned, [T2], "{}", dump("receiver", &dst));
    let kept: Vec<String> = snaps(&dst, DST).into_iter().map(|(n, _)| n).collect();
    assert_eq!(kept, [T1, T4], "{}", dump("receiver", &dst));
    assert_eq!(held(T4), [RECV_HOLD], "{}", dump("receiver", &dst));
    let calls = dst.calls();
    let at = |call: String| {
        calls
            .iter()
            .position(|c| *c == call)
            .unwrap_or_else(|| panic!("no `zfs {call}`\n{}", dump("receiver", &dst)))
    };
    let hold = at(format!("hold {RECV_HOLD} {DST}@{T4}"));
    let release = at(format!("release {RECV_HOLD} {DST}@{T2}"));
    let destroy = at(format!("destroy {DST}@{T2}"));
    assert!(
        hold < release && release < destroy,
        "{}",
        dump("receiver", &dst)
    );

    c.bye().await;

    // A --full replacement (a new run, which lists the diverged replica)
    // destroys the parked old copy, whose @T4 is held.
    dst.snapshot(DST, "local");
    dst.clear_calls();
    let mut c = recv.client().await;
    let (_, done) = sync_dataset(&mut c, &src, "", true).await;
    done.unwrap_or_else(|e| panic!("{e}\n{}", both(&src, &dst)));
    c.bye().await;
    let calls = dst.calls();
    let parked = format!("{BUF}/top.old");
    let release = at_in(&calls, &format!("release {RECV_HOLD} {parked}@{T4}"));
    let destroy = at_in(&calls, &format!("destroy -r {parked}"));
    assert!(
        release.is_some() && release < destroy,
        "{}",
        dump("receiver", &dst)
    );
    assert!(dst.dataset(&parked).is_none(), "{}", dump("receiver", &dst));
    assert_replica(&src, &dst);
    assert_eq!(held(T4), [RECV_HOLD], "{}", dump("receiver", &dst));
}

/// Where `call` is among `calls`.
fn at_in(calls: &[String], call: &str) -> Option<usize> {
    calls.iter().position(|c| c == call)
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

/// SN8: a stopped run skips cleanbuffer (so --delete-missing) and pruning, yet records the confirmation of a dataset it finished; the next run does both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_stop_skips_cleanbuffer_and_pruning_but_keeps_confirmations() {
    let src = source(&["", "/a", "/b", "/gone"], &[T1, T2]);
    let dst = target_host();
    let recv = Receiver::start(&dst).await;
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    destroy_on_source(&src, "/gone").await;
    let prop = format_confirm_prop(&format_receiver_id("127.0.0.1", recv.port));
    let options = |stamp: &str| {
        let mut opts = recv.send_options(&src, 1, false);
        opts.snapshot = Some((SnapClass::S, stamp.to_string()));
        opts.keep = Some(1);
        opts.delete_missing = true;
        opts
    };
    let has_t1 = |r: &str| snaps(&src, &src_ds(r)).iter().any(|(n, _)| n == T1);

    // Stopped while /a's stream is received (the top is finished by
    // then; /a may still finish, its whole stream having been sent).
    let taken = "260101-000200_S";
    dst.delay_receive(Duration::from_millis(200));
    dst.clear_calls();
    src.clear_calls();
    let token = CancellationToken::new();
    let run = zfsync_send::run(options("260101-000200"), token.clone());
    let stop = async {
        wait_until("/a's zfs receive", &dst, || {
            count_calls(&dst, &format!("receive -u {}", dst_ds("/a"))) > 0
        })
        .await;
        token.cancel();
    };
    let (report, ()) = tokio::join!(tokio::time::timeout(PATIENCE, run), stop);
    let report = report.expect("the run ends").expect("the run starts");
    assert!(report.stopped, "{}", text(&report));
    assert_eq!(report.exit_code(), zfsync_send::exit::FAILED);
    assert_sent(&report, "", SendKind::Incremental, taken);
    assert_eq!(src.prop(SRC, &prop).as_deref(), Some(taken));
    let why = failure(&report, "/b");
    assert!(why.contains("not attempted: the run was stopped"), "{why}");
    assert_eq!(src.prop(&src_ds("/b"), &prop).as_deref(), Some(T2));
    let a = src.prop(&src_ds("/a"), &prop);
    match status(&report, "/a") {
        Status::Sent { .. } => assert_eq!(a.as_deref(), Some(taken)),
        Status::Failed { reason } if reason.contains("the run was stopped") => {
            assert_eq!(a.as_deref(), Some(T2))
        }
        other => panic!("/a: {other:?}\n{}", text(&report)),
    }
    assert!(report.retention.pruning_skipped, "{}", text(&report));
    assert!(report.retention.pruned.is_empty(), "{}", text(&report));
    assert!(
        !src.calls().iter().any(|c| c.starts_with("destroy")),
        "{}",
        dump("sender", &src)
    );
    assert_eq!(report.clean, CleanReport::default(), "no cleanbuffer");
    assert!(
        dst.dataset(&dst_ds("/gone")).is_some(),
        "{}",
        both(&src, &dst)
    );
    assert!(
        !dst.calls().iter().any(|c| c.starts_with("destroy")),
        "{}",
        dump("receiver", &dst)
    );
    for r in ["", "/a", "/b"] {
        assert!(has_t1(r), "{r}: @{T1} pruned\n{}", dump("sender", &src));
    }

    // The next run prunes and deletes.
    wait_unlocked(&recv, &src, "/a", "after the stopped run").await;
    dst.delay_receive(Duration::ZERO);
    let report = run_sender(options("260101-000300")).await;
    assert_ok(&report, &src, &dst);
    assert!(!report.retention.pruned.is_empty(), "{}", text(&report));
    assert_eq!(report.clean.deleted, ["/gone"], "{}", text(&report));
    for r in ["", "/a", "/b"] {
        assert!(!has_t1(r), "{r}: @{T1} kept\n{}", dump("sender", &src));
        // (The receiver mirrors the pruning at the next run.)
        let kept = snaps(&dst, &dst_ds(r));
        assert!(
            snaps(&src, &src_ds(r)).iter().all(|s| kept.contains(s)),
            "{r}\n{}",
            both(&src, &dst)
        );
    }
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

// ---- 8. resuming a cut transfer ----

/// P2: a ResumeFailed without a Resume offer ends the connection (abandoning its open dataset); nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_failed_without_a_resume_offer_ends_the_connection() {
    let src = source(&[""], &["s1"]);
    let dst = target_host();
    let recv = Receiver::start(&dst).await;
    let req = SyncRequest::new(&rel(""), &src.snapshots(SRC));
    // Right after the hello, and after a Sync that offered no resume.
    for sync_first in [false, true] {
        let mut c = recv.client().await;
        if sync_first {
            assert_eq!(
                c.sync(&req).await.unwrap(),
                SyncReply::New { buffered: false }
            );
        }
        match c.resume_failed("no offer was made").await {
            Err(ClientError::Protocol(ProtocolError::Peer(reason)))
                if reason.contains("resume_failed") && reason.contains("a resume offer first") => {}
            other => panic!("expected the receiver to end the connection, got {other:?}"),
        }
        assert!(c.sync(&req).await.is_err(), "the connection is closed");
    }
    assert_eq!(dst.names(), ["dst"], "{}", dump("receiver", &dst));
    // The dataset the second connection had open is free again.
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
}

/// SY5: a cut transfer's state is offered for resuming only when the receiver's zfs has receive -s and -A and the sender announced send -t; otherwise, and after ResumeFailed, it is discarded (receive -A) and the dataset planned afresh; a failed discard is refused, naming the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_transfer_is_offered_for_resuming_only_when_both_ends_can() {
    let src = source_on(FakeZfs::openzfs(), &[""], &["s1"]);
    let dst = target_on(FakeZfs::openzfs());
    let recv = Receiver::start(&dst).await;
    let mut c = recv.client().await;
    sync_dataset(&mut c, &src, "", false)
        .await
        .1
        .unwrap_or_else(|e| panic!("{e}\n{}", both(&src, &dst)));
    c.bye().await;
    src.snapshot(SRC, "s2");
    let all = src.snapshots(SRC);
    let req = SyncRequest::new(&rel(""), &all);
    let incremental = SyncReply::Incremental {
        base_guid: all[0].guid,
        count: 1,
    };
    let token = "1-cut-at-s2";
    let discarded = |dst: &FakeZfs| dst.calls().contains(&format!("receive -A {DST}"));

    // A sender without `send -t`: no offer; the state is discarded.
    dst.set_resume_token(DST, Some(token));
    dst.clear_calls();
    let mut c = recv.client().await;
    assert_eq!(c.sync(&req).await.unwrap(), incremental);
    c.bye().await;
    assert!(discarded(&dst), "{}", dump("receiver", &dst));
    assert_eq!(dst.dataset(DST).expect("kept").resume_token, None);

    // A sender with it: the offer; its ResumeFailed discards the state.
    dst.set_resume_token(DST, Some(token));
    dst.clear_calls();
    let mut c = recv.openzfs_client().await;
    assert_eq!(
        c.sync(&req).await.unwrap(),
        SyncReply::Resume {
            token: token.into()
        }
    );
    assert!(!discarded(&dst), "{}", dump("receiver", &dst));
    assert_eq!(
        c.resume_failed("its snapshot is gone").await.unwrap(),
        incremental
    );
    assert!(discarded(&dst), "{}", dump("receiver", &dst));
    assert_eq!(dst.dataset(DST).expect("kept").resume_token, None);
    stream(&mut c, &src, SRC, Some(&all[0]), &all[1])
        .await
        .expect("s2");
    c.finish().await.expect("finish");
    c.bye().await;
    assert_replica(&src, &dst);

    // A receiver whose zfs has receive -s but not -A: no offer, and the
    // state it cannot discard is refused with the command to run.
    let dst = target_on(FakeZfs::new(Caps::new(
        "receive -s without -A",
        [Cap::RecvUnmounted, Cap::RecvResumable],
    )));
    let recv = Receiver::start(&dst).await;
    dst.create(DST);
    dst.set_resume_token(DST, Some(token));
    let mut c = recv.openzfs_client().await;
    match c.sync(&req).await.unwrap() {
        SyncReply::Refused {
            reason,
            temporary: false,
        } if reason.contains(&format!("run `zfs receive -A {DST}` by hand")) => {}
        other => panic!(
            "expected a refusal naming the command, got {other:?}\n{}",
            dump("receiver", &dst)
        ),
    }
    c.bye().await;
    assert_eq!(
        dst.dataset(DST).expect("kept").resume_token.as_deref(),
        Some(token)
    );
}

/// SN3: a resume token that names another dataset, or a snapshot the source no longer has, is read (send -nvP -t) and answered with ResumeFailed: the receiver discards the cut state and the dataset is sent afresh, never from the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_token_of_another_dataset_or_a_gone_snapshot_is_stale() {
    let src = source_on(FakeZfs::openzfs(), &["", "/a", "/b"], &["s1"]);
    let dst = target_on(FakeZfs::openzfs());
    let recv = Receiver::start(&dst).await;
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    for r in ["", "/a", "/b"] {
        src.snapshot(&src_ds(r), "s2");
    }
    // /a's cut state is from a transfer of the top dataset's @s2 ...
    let top = src.snapshots(SRC);
    src.register_resume_token(
        "1-of-the-top",
        ResumeInfo {
            from_guid: top[0].guid,
            to_guid: top[1].guid,
            to_name: format!("{SRC}@s2"),
            bytes_done: Some(512),
            bytes_left: None,
            raw: false,
        },
    );
    // ... and /b's of a snapshot since destroyed on the source.
    let b = src_ds("/b");
    let gone = src.snapshot(&b, "gone");
    src.register_resume_token(
        "1-of-a-gone-snapshot",
        ResumeInfo {
            from_guid: src.snapshots(&b)[1].guid,
            to_guid: gone.guid,
            to_name: format!("{b}@gone"),
            bytes_done: Some(512),
            bytes_left: None,
            raw: false,
        },
    );
    let gone = ds(&b).snapshot(&gone.name).expect("name");
    src.destroy_snapshot(&gone, false)
        .await
        .expect("destroy on the source");
    dst.set_resume_token(&dst_ds("/a"), Some("1-of-the-top"));
    dst.set_resume_token(&dst_ds("/b"), Some("1-of-a-gone-snapshot"));
    src.clear_calls();
    dst.clear_calls();

    let report = recv.send(&src, 1, false).await;
    assert_ok(&report, &src, &dst);
    for r in ["", "/a", "/b"] {
        match status(&report, r) {
            Status::Sent {
                kind: SendKind::Incremental,
                from: Some(from),
                to,
                ..
            } if from == "s1" && to == "s2" => {}
            other => panic!("{r}: expected @s1..@s2, got {other:?}\n{}", text(&report)),
        }
    }
    let with_token: Vec<String> = src
        .calls()
        .into_iter()
        .filter(|c| c.contains(" -t "))
        .collect();
    assert_eq!(
        with_token,
        [
            "send -n -v -P -t 1-of-the-top",
            "send -n -v -P -t 1-of-a-gone-snapshot"
        ],
        "each token is read, never sent from\n{}",
        dump("sender", &src)
    );
    for r in ["/a", "/b"] {
        let name = dst_ds(r);
        assert!(
            dst.calls().contains(&format!("receive -A {name}")),
            "{}",
            dump("receiver", &dst)
        );
        assert_eq!(dst.dataset(&name).expect("kept").resume_token, None);
    }
    assert_replica(&src, &dst);
}

// ---- 9. the sender: confirmations and lost connections ----

/// SN5: the sender confirms (zfsync:synced_<id>, hold zfsync_<id>) only the datasets up to date or in place; one left in the buffer is confirmed once it is placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_datasets_in_place_are_confirmed_on_the_sender() {
    let src = source(&["", "/a", "/a/b", "/c"], &[]);
    for r in ["", "/a/b", "/c"] {
        src.snapshot(&src_ds(r), "s1");
    }
    let dst = target_host();
    let recv = Receiver::start(&dst).await;
    let id = format_receiver_id("127.0.0.1", recv.port);
    let prop = format_confirm_prop(&id);
    let tag = format_hold_tag(HoldTag::Sender(&id));
    let confirmed = |r: &str| {
        let name = src_ds(r);
        (src.prop(&name, &prop), src.holds(&format!("{name}@s1")))
    };
    let yes = (Some("s1".to_string()), vec![tag.clone()]);
    let no = (None, vec![]);

    // /a has no snapshot: /a/b waits in the buffer.
    let report = recv.send(&src, 1, false).await;
    let why = failure(&report, "/a/b");
    assert!(why.contains("not placed"), "{why}");
    for (r, want) in [("", &yes), ("/c", &yes), ("/a/b", &no)] {
        assert_eq!(&confirmed(r), want, "{r}\n{}", both(&src, &dst));
    }
    assert_eq!(src.prop(&src_ds("/a"), &prop), None);

    // /a gets a snapshot: the next run places /a/b (up to date in the
    // buffer) and confirms it.
    src.snapshot(&src_ds("/a"), "s1");
    let report = recv.send(&src, 1, false).await;
    assert_ok(&report, &src, &dst);
    assert_up_to_date(&report, "/a/b", "s1");
    for r in ["", "/a", "/a/b", "/c"] {
        assert_eq!(confirmed(r), yes, "{r}\n{}", both(&src, &dst));
    }
    assert_same_tree(&src, &dst);
}

/// A TCP relay in front of the receiver that can cut every connection
/// through it, and refuse new ones.
struct Relay {
    port: u16,
    open: Arc<Mutex<Vec<JoinHandle<()>>>>,
    refuse: Arc<AtomicBool>,
    accepting: JoinHandle<()>,
}

impl Relay {
    async fn start(to: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local address").port();
        let open = Arc::new(Mutex::new(Vec::new()));
        let refuse = Arc::new(AtomicBool::new(false));
        let accepting = tokio::spawn({
            let (open, refuse) = (open.clone(), refuse.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if refuse.load(Ordering::SeqCst) {
                        continue; // closed at once
                    }
                    let relay = tokio::spawn(async move {
                        if let Ok(mut out) = TcpStream::connect(("127.0.0.1", to)).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        }
                    });
                    open.lock().expect("relay list").push(relay);
                }
            }
        });
        Relay {
            port,
            open,
            refuse,
            accepting,
        }
    }

    /// Cuts every connection through the relay: both ends see it closed.
    fn cut(&self) {
        for relay in self.open.lock().expect("relay list").drain(..) {
            relay.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accepting.abort();
    }
}

/// SN2: a connection lost in the middle of a dataset fails that dataset only: the worker reconnects and syncs the rest; when it cannot reconnect, the datasets no worker took are reported "not attempted"; the next run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_fails_only_the_dataset_in_progress() {
    let rels = ["", "/a", "/b", "/c"];
    let src = source(&rels, &["s1"]);
    let dst = target_host();
    // Long enough for the cut to come while /b's stream is received.
    dst.delay_receive(Duration::from_millis(100));
    let recv = Receiver::start(&dst).await;
    let relay = Relay::start(recv.port).await;
    let via_relay = || {
        let mut opts = recv.send_options(&src, 1, false);
        opts.client.port = relay.port;
        run_sender(opts)
    };
    let receives_of_b = || count_calls(&dst, &format!("receive -u {}", dst_ds("/b")));
    let cut_at_b = |refuse: bool| {
        let seen = receives_of_b();
        let (dst, relay) = (&dst, &relay);
        async move {
            wait_until("/b's zfs receive", dst, || receives_of_b() > seen).await;
            relay.refuse.store(refuse, Ordering::SeqCst);
            relay.cut();
        }
    };
    let lost = |report: &Report| {
        let why = failure(report, "/b");
        assert!(
            why.contains("closed the connection") || why.contains("connection error"),
            "{why}\n{}",
            text(report)
        );
    };
    let only_whole_snapshots = |src: &FakeZfs, dst: &FakeZfs| {
        for (r, (_, got)) in copies(dst, DST) {
            assert!(
                snaps(src, &src_ds(&r)).starts_with(&got),
                "{r}: only whole snapshots of the sender's\n{}",
                both(src, dst)
            );
        }
    };

    // The worker reconnects and goes on.
    let (report, ()) = tokio::join!(via_relay(), cut_at_b(false));
    assert_eq!(
        report.exit_code(),
        zfsync_send::exit::FAILED,
        "{}",
        text(&report)
    );
    lost(&report);
    for r in ["", "/a", "/c"] {
        assert_sent(&report, r, SendKind::Full, "s1");
    }
    only_whole_snapshots(&src, &dst);

    // It cannot reconnect: /c is not attempted.
    for r in rels {
        src.snapshot(&src_ds(r), "s2");
    }
    let (report, ()) = tokio::join!(via_relay(), cut_at_b(true));
    lost(&report);
    let why = failure(&report, "/c");
    assert!(
        why.contains("not attempted: lost every connection to the receiver"),
        "{why}"
    );
    for r in ["", "/a"] {
        assert_sent(&report, r, SendKind::Incremental, "s2");
    }
    only_whole_snapshots(&src, &dst);

    // (The receiver frees /b once its zfs receive is done.)
    wait_unlocked(&recv, &src, "/b", "the cut connection").await;
    dst.delay_receive(Duration::ZERO);
    relay.refuse.store(false, Ordering::SeqCst);
    assert_ok(&via_relay().await, &src, &dst);
    assert_replica(&src, &dst);
    assert_same_tree(&src, &dst);
}

/// SN3: a resume token the sender cannot read for another reason than a stale token fails that dataset and keeps the receiver's partial state for a later run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_token_the_sender_cannot_read_keeps_the_partial_state() {
    let src = source_on(FakeZfs::openzfs(), &["", "/a"], &["s1"]);
    let dst = target_on(FakeZfs::openzfs());
    let recv = Receiver::start(&dst).await;
    assert_ok(&recv.send(&src, 1, false).await, &src, &dst);
    let a = src_ds("/a");
    let s2 = src.snapshot(&a, "s2");
    let token = "1-cut-at-a-s2";
    src.register_resume_token(
        token,
        ResumeInfo {
            from_guid: src.snapshots(&a)[0].guid,
            to_guid: s2.guid,
            to_name: format!("{a}@s2"),
            bytes_done: Some(512),
            bytes_left: None,
            raw: false,
        },
    );
    dst.set_resume_token(&dst_ds("/a"), Some(token));
    src.fail(
        "send",
        token,
        1,
        FakeError::Other("cannot resume send: Input/output error".into()),
    );
    dst.clear_calls();

    let report = recv.send(&src, 1, false).await;
    let why = failure(&report, "/a");
    assert!(
        why.contains("cannot read the resume token") && why.contains("Input/output error"),
        "{why}"
    );
    assert_up_to_date(&report, "", "s1");
    assert!(
        !dst.calls().iter().any(|c| c.starts_with("receive")),
        "nothing discarded or received\n{}",
        dump("receiver", &dst)
    );
    assert_eq!(
        dst.dataset(&dst_ds("/a"))
            .expect("kept")
            .resume_token
            .as_deref(),
        Some(token)
    );

    // The next run reads the token and resumes from it.
    let report = recv.send(&src, 1, false).await;
    assert_ok(&report, &src, &dst);
    assert!(
        src.calls().contains(&format!("send -t {token}")),
        "{}",
        dump("sender", &src)
    );
    assert_replica(&src, &dst);
}

/// RE4: a parked copy that cannot be listed after the swap is kept, never destroyed unseen, with the child that went along with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_copy_that_cannot_be_listed_is_kept() {
    let s = Swap::new("/a").await;
    let parked = format!("{BUF}/2F61.old");
    let late = dst_ds("/a/late");
    let done = s
        .swap_waiting_for_a_busy_child(|| {
            s.dst.create(&late);
            s.dst.snapshot(&late, "l1");
            s.dst.fail("list", "2F61.old", 1, injected("list"));
        })
        .await
        .unwrap_or_else(|e| panic!("the swap itself succeeds: {e}\n{}", s.dump()));
    assert_eq!(done.location, dst_ds("/a"));
    assert_eq!(
        snaps(&s.dst, &dst_ds("/a")),
        snaps(&s.src, &src_ds("/a")),
        "{}",
        s.dump()
    );
    assert_eq!(
        copy_at(&s.dst, &parked).as_ref(),
        s.before.get("/a"),
        "the old copy stays whole, parked\n{}",
        s.dump()
    );
    let kept: Vec<String> = snaps(&s.dst, &format!("{parked}/late"))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(kept, ["l1"], "{}", s.dump());
    assert!(
        !s.dst
            .calls()
            .iter()
            .any(|c| c.starts_with("destroy") && c.contains("2F61.old")),
        "{}",
        s.dump()
    );
}
