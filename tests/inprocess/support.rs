//! What the tests of the in-process tier share: the two hosts (an
//! in-memory `FakeZfs` each), the receiver on 127.0.0.1, a sender step by
//! step or as a whole run, and the assertions, which print both hosts'
//! datasets, snapshots and `zfs` calls on failure.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use zfsync_common::caps::Caps;
use zfsync_common::client::{Client, ClientError, ClientOptions, Finished};
use zfsync_common::naming::{format_receiver_id, DatasetName, RelPath};
use zfsync_common::plan::{steps, Decision, FullReason};
use zfsync_common::protocol::{SyncReply, SyncRequest};
use zfsync_common::tls::{server_config, TlsFiles};
use zfsync_common::zfs::fake::{FakeError, FakeZfs};
use zfsync_common::zfs::{ResumeInfo, SendFrom, SendWhat, Snapshot, ZfsBackend};
use zfsync_e2e::Certs;
use zfsync_send::{Report, SendKind, Status};

/// The source dataset on the sending host.
pub const SRC: &str = "src/s";
/// The target dataset on the receiving host.
pub const DST: &str = "dst/t";
/// The target's buffer.
pub const BUF: &str = "dst/t.zfsyncbuffer";
/// The receiver's `--grace`.
pub const GRACE: Duration = Duration::from_secs(2);
/// The longest any run, wait or exchange may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Tool snapshots (the sender's `--snapshot` names), oldest first; T3 is
/// an hourly one.
pub const T1: &str = "260101-000000_S";
pub const T2: &str = "260101-000100_S";
pub const T3: &str = "260101-000200_H";
pub const T4: &str = "260101-000300_S";

// ---- the two hosts ----

pub fn ds(name: &str) -> DatasetName {
    DatasetName::new(name).unwrap_or_else(|e| panic!("{name:?}: {e}"))
}

pub fn rel(path: &str) -> RelPath {
    RelPath::new(path).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// The source dataset at a relative path (`""` is the top).
pub fn src_ds(rel: &str) -> String {
    format!("{SRC}{rel}")
}

/// Where the receiver keeps the dataset at a relative path.
pub fn dst_ds(rel: &str) -> String {
    format!("{DST}{rel}")
}

/// A sending host: the pool `src` and `src/s` with the datasets at `rels`
/// (parents first), each given `snaps` in turn (`s1` of every dataset, then
/// `s2` of every dataset, ...).
pub fn source(rels: &[&str], snaps: &[&str]) -> FakeZfs {
    source_on(FakeZfs::zfs_fuse(), rels, snaps)
}

/// The same on a host with other capabilities (`FakeZfs::openzfs()`).
pub fn source_on(zfs: FakeZfs, rels: &[&str], snaps: &[&str]) -> FakeZfs {
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
pub fn target_host() -> FakeZfs {
    target_on(FakeZfs::zfs_fuse())
}

/// The same on a host with other capabilities (`FakeZfs::openzfs()`:
/// `receive -s`/`-A`, `zfs holds`, ...).
pub fn target_on(zfs: FakeZfs) -> FakeZfs {
    zfs.create_pool("dst");
    zfs
}

/// A sending host with `rels` and `snaps` (see [`source`]), a receiving
/// host and a receiver on it.
pub async fn hosts(rels: &[&str], snaps: &[&str]) -> (FakeZfs, FakeZfs, Receiver) {
    hosts_on(FakeZfs::zfs_fuse, rels, snaps).await
}

/// The same with OpenZFS on both ends (`receive -s`/`-A`, `zfs holds`,
/// `send -t`, ...).
pub async fn openzfs_hosts(rels: &[&str], snaps: &[&str]) -> (FakeZfs, FakeZfs, Receiver) {
    hosts_on(FakeZfs::openzfs, rels, snaps).await
}

async fn hosts_on(
    zfs: fn() -> FakeZfs,
    rels: &[&str],
    snaps: &[&str],
) -> (FakeZfs, FakeZfs, Receiver) {
    let src = source_on(zfs(), rels, snaps);
    let dst = target_on(zfs());
    let recv = Receiver::start(&dst).await;
    (src, dst, recv)
}

/// Registers on the sending host what `zfs send -nvP -t token` tells of
/// a transfer of `dataset` cut on its way from `from_guid` to `to`.
pub fn register_token(src: &FakeZfs, token: &str, dataset: &str, from_guid: u64, to: &Snapshot) {
    src.register_resume_token(
        token,
        ResumeInfo {
            from_guid,
            to_guid: to.guid,
            to_name: format!("{dataset}@{}", to.name),
            bytes_done: Some(512),
            bytes_left: None,
            raw: false,
        },
    );
}

/// `(name, guid)` of each snapshot of a dataset, oldest first.
pub fn snaps(zfs: &FakeZfs, name: &str) -> Vec<(String, u64)> {
    zfs.snapshots(name)
        .iter()
        .map(|s| (s.name.to_string(), s.guid))
        .collect()
}

/// The names of a dataset's snapshots, oldest first.
pub fn snap_names(zfs: &FakeZfs, name: &str) -> Vec<String> {
    snaps(zfs, name).into_iter().map(|(n, _)| n).collect()
}

/// A dataset as a copy: its own GUID and its snapshots with theirs.
pub type Contents = (u64, Vec<(String, u64)>);

/// Every dataset at or below `root`, relative to it, as copies.
pub fn copies(zfs: &FakeZfs, root: &str) -> BTreeMap<String, Contents> {
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
pub fn copy_at(zfs: &FakeZfs, name: &str) -> Option<Contents> {
    zfs.dataset(name).map(|d| (d.guid, snaps(zfs, name)))
}

/// Datasets whose name starts with `prefix`.
pub fn names_under(zfs: &FakeZfs, prefix: &str) -> Vec<String> {
    zfs.names()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// A host's datasets with their snapshots, then every `zfs` call it saw.
pub fn dump(host: &str, zfs: &FakeZfs) -> String {
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

pub fn both(src: &FakeZfs, dst: &FakeZfs) -> String {
    format!("{}{}", dump("sender", src), dump("receiver", dst))
}

/// Every source dataset has its replica in place, with the same snapshots
/// and GUIDs.
#[track_caller]
pub fn assert_replica(src: &FakeZfs, dst: &FakeZfs) {
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
pub fn assert_same_tree(src: &FakeZfs, dst: &FakeZfs) {
    let want: Vec<String> = copies(src, SRC).into_keys().collect();
    let got: Vec<String> = copies(dst, DST).into_keys().collect();
    assert_eq!(got, want, "datasets in place\n{}", both(src, dst));
}

/// Every replica has only whole snapshots of the sender's, in order (a
/// prefix of the source's).
#[track_caller]
pub fn assert_only_whole_snapshots(src: &FakeZfs, dst: &FakeZfs) {
    for (r, (_, got)) in copies(dst, DST) {
        assert!(
            snaps(src, &src_ds(&r)).starts_with(&got),
            "{r}: only whole snapshots of the sender's, in order\n{}",
            both(src, dst)
        );
    }
}

/// Polls `cond` every few milliseconds; fails after [`PATIENCE`].
pub async fn wait_until(what: &str, zfs: &FakeZfs, mut cond: impl FnMut() -> bool) {
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

pub fn count_calls(zfs: &FakeZfs, prefix: &str) -> usize {
    zfs.calls().iter().filter(|c| c.starts_with(prefix)).count()
}

/// The `zfs` calls a host saw that start with `prefix`, in order.
pub fn calls_with(zfs: &FakeZfs, prefix: &str) -> Vec<String> {
    zfs.calls()
        .into_iter()
        .filter(|c| c.starts_with(prefix))
        .collect()
}

/// The host saw `zfs call`.
#[track_caller]
pub fn assert_called(host: &str, zfs: &FakeZfs, call: &str) {
    assert!(
        zfs.calls().iter().any(|c| c == call),
        "no `zfs {call}`\n{}",
        dump(host, zfs)
    );
}

/// The host saw no `zfs` call that starts with `prefix`.
#[track_caller]
pub fn assert_no_call(host: &str, zfs: &FakeZfs, prefix: &str) {
    assert_eq!(
        calls_with(zfs, prefix),
        Vec::<String>::new(),
        "no `zfs {prefix}...` expected\n{}",
        dump(host, zfs)
    );
}

/// The receiving host saw only listings (`zfs get`).
#[track_caller]
pub fn assert_only_listings(dst: &FakeZfs) {
    assert!(
        dst.calls().iter().all(|c| c.starts_with("get")),
        "only listings\n{}",
        dump("receiver", dst)
    );
}

/// The host saw each of `calls`, in this order.
#[track_caller]
pub fn assert_in_order(host: &str, zfs: &FakeZfs, calls: &[String]) {
    let seen = zfs.calls();
    let at: Vec<usize> = calls
        .iter()
        .map(|call| {
            seen.iter()
                .position(|c| c == call)
                .unwrap_or_else(|| panic!("no `zfs {call}`\n{}", dump(host, zfs)))
        })
        .collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "expected in this order: {calls:?}\n{}",
        dump(host, zfs)
    );
}

/// The next `zfs op` on `target` fails.
pub fn strike(zfs: &FakeZfs, op: &str, target: &str) {
    zfs.fail(
        op,
        target,
        1,
        FakeError::Other(format!("cannot {op}: injected failure")),
    );
}

/// The receiving host is as it was `before` (its copies of the pool
/// `dst`): nothing was rolled back, received or destroyed.
#[track_caller]
pub fn assert_untouched(src: &FakeZfs, dst: &FakeZfs, before: &BTreeMap<String, Contents>) {
    assert_eq!(&copies(dst, "dst"), before, "{}", both(src, dst));
    for call in ["rollback", "receive", "destroy"] {
        assert_no_call("receiver", dst, call);
    }
}

/// Waits (at most [`GRACE`], far below the receiver's idle timeout) until
/// a Sync of `path` is no longer refused as busy: no connection holds its
/// lock.
pub async fn wait_unlocked(recv: &Receiver, src: &FakeZfs, path: &str, what: &str) {
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
pub struct Receiver {
    pub port: u16,
    shutdown: CancellationToken,
    served: Option<JoinHandle<Result<(), zfsync_recv::ServeError>>>,
}

impl Receiver {
    pub async fn start(zfs: &FakeZfs) -> Receiver {
        Receiver::start_with(zfs, true).await
    }

    pub async fn start_with(zfs: &FakeZfs, mirror_retention: bool) -> Receiver {
        Receiver::start_at(zfs, DST, mirror_retention).await
    }

    /// A receiver whose target is `target` (a pool's root, say) rather
    /// than [`DST`].
    pub async fn start_at(zfs: &FakeZfs, target: &str, mirror_retention: bool) -> Receiver {
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
    pub fn client_options(&self) -> ClientOptions {
        Certs::shared().client_options(self.port, &run_id())
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.client_options())
            .await
            .expect("connect to the receiver")
    }

    /// A protocol client that announces what OpenZFS can do (`send -t`
    /// among it), where [`Receiver::client`] announces nothing.
    pub async fn openzfs_client(&self) -> Client {
        let opts = ClientOptions {
            caps: Caps::all("zfs-2.1.11-1"),
            ..self.client_options()
        };
        Client::connect(&opts)
            .await
            .expect("connect to the receiver")
    }

    pub fn send_options(
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
    pub async fn send(&self, src: &FakeZfs, threads: usize, allow_full: bool) -> Report {
        run_sender(self.send_options(src, threads, allow_full)).await
    }

    /// Cancels the shutdown future and waits for `run` to return; how long
    /// that took.
    pub async fn stop(&mut self) -> Duration {
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
pub async fn send_bytes(
    src: &FakeZfs,
    name: &str,
    from: Option<&Snapshot>,
    to: &Snapshot,
) -> Vec<u8> {
    let d = ds(name);
    let what = SendWhat::Snapshot {
        from: from.map(|f| SendFrom::Snapshot(d.snapshot(&f.name).expect("snapshot name"))),
        to: d.snapshot(&to.name).expect("snapshot name"),
    };
    read_send(src, &what).await
}

/// The bytes `zfs send -t token` writes on the sending host.
pub async fn resume_bytes(src: &FakeZfs, token: &str) -> Vec<u8> {
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
pub async fn stream(
    c: &mut Client,
    src: &FakeZfs,
    name: &str,
    from: Option<&Snapshot>,
    to: &Snapshot,
) -> Result<u64, ClientError> {
    stream_announcing(c, src, name, from, to, to).await
}

/// The same with the stream of `from..to` announced as one that ends at
/// `announced`.
pub async fn stream_announcing(
    c: &mut Client,
    src: &FakeZfs,
    name: &str,
    from: Option<&Snapshot>,
    to: &Snapshot,
    announced: &Snapshot,
) -> Result<u64, ClientError> {
    c.begin_stream(from.map(|f| f.guid), announced).await?;
    let bytes = send_bytes(src, name, from, to).await;
    let n = c.pump(&mut &bytes[..], |_| {}).await?;
    c.end_stream(n).await
}

/// Syncs one dataset as the sender does: Sync, the planned streams,
/// Finish. Returns the answer to the Sync and what Finish said (`Err`:
/// its refusal, or why nothing was streamed).
pub async fn sync_dataset(
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

/// [`sync_dataset`], which must end in a Finish that succeeds.
pub async fn sync_finished(
    c: &mut Client,
    src: &FakeZfs,
    dst: &FakeZfs,
    path: &str,
    allow_full: bool,
) -> (SyncReply, Finished) {
    let (reply, done) = sync_dataset(c, src, path, allow_full).await;
    let done = done.unwrap_or_else(|e| panic!("{path}: {e}\n{}", both(src, dst)));
    (reply, done)
}

/// Why a Sync of the top dataset without --full is answered that only
/// --full would do (a Full not accepted), on a connection of its own.
pub async fn full_refused(recv: &Receiver, src: &FakeZfs) -> FullReason {
    let mut c = recv.client().await;
    let (reply, _) = sync_dataset(&mut c, src, "", false).await;
    c.bye().await;
    match reply {
        SyncReply::Full {
            reason,
            accepted: false,
        } => reason,
        other => panic!("expected a Full not accepted, got {other:?}"),
    }
}

/// A connection that received the top dataset's first snapshot (a New,
/// then Finish), then asked for all of `src/s`'s snapshots and was told
/// an incremental from the first: returns it with the top dataset open,
/// and the snapshots.
pub async fn incremental_after_the_first(
    recv: &Receiver,
    src: &FakeZfs,
) -> (Client, Vec<Snapshot>) {
    let all = src.snapshots(SRC);
    let mut c = recv.client().await;
    let first = SyncRequest::new(&rel(""), &all[..1]);
    assert_eq!(
        c.sync(&first).await.unwrap(),
        SyncReply::New { buffered: false }
    );
    stream(&mut c, src, SRC, None, &all[0])
        .await
        .expect("the first snapshot");
    c.finish().await.expect("finish");

    let req = SyncRequest::new(&rel(""), &all);
    assert_eq!(
        c.sync(&req).await.unwrap(),
        SyncReply::Incremental {
            base_guid: all[0].guid,
            count: (all.len() - 1) as u64
        }
    );
    (c, all)
}

/// Why the receiver refused a stream (`StreamFailed`).
#[track_caller]
pub fn stream_failure(result: Result<u64, ClientError>, src: &FakeZfs, dst: &FakeZfs) -> String {
    match result {
        Err(ClientError::StreamFailed(reason)) => reason,
        other => panic!(
            "expected the stream to fail, got {other:?}\n{}",
            both(src, dst)
        ),
    }
}

/// Finish is refused, saying `why`; the connection goes on.
pub async fn assert_finish_refused(c: &mut Client, why: &str) {
    let refused = c.finish().await.expect_err("Finish is refused");
    assert!(refused.to_string().contains(why), "{refused}");
}

/// Why a Sync was refused, for the time being (`temporary`) or for good.
#[track_caller]
pub fn refusal(reply: SyncReply, temporary: bool) -> String {
    match reply {
        SyncReply::Refused {
            reason,
            temporary: t,
        } if t == temporary => reason,
        other => panic!("expected a refusal (temporary: {temporary}), got {other:?}"),
    }
}

// ---- a sender's run ----

/// A whole `zfsync_send::run` with these options (from
/// [`Receiver::send_options`], changed).
pub async fn run_sender(opts: zfsync_send::Options) -> Report {
    run_sender_beside(opts, CancellationToken::new(), async {})
        .await
        .0
}

/// A whole `zfsync_send::run` with these options and shutdown `token`,
/// with `beside` running on the same task meanwhile (`run`'s future is not
/// `Send`): the report, and what `beside` returned.
pub async fn run_sender_beside<T>(
    opts: zfsync_send::Options,
    token: CancellationToken,
    beside: impl Future<Output = T>,
) -> (Report, T) {
    let run = zfsync_send::run(opts, token);
    let (report, t) = tokio::join!(tokio::time::timeout(PATIENCE, run), beside);
    let report = report
        .expect("the sender's run ends")
        .expect("the sender's run starts");
    (report, t)
}

/// Destroys a source dataset and all below it, as a person would,
/// releasing the holds on its snapshots first (the sender holds each
/// confirmed base).
pub async fn destroy_on_source(src: &FakeZfs, path: &str) {
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

pub fn text(report: &Report) -> String {
    format!(
        "---- sender's summary\n{}",
        zfsync_send::summary(&ds(SRC), "in-process receiver", report)
    )
}

#[track_caller]
pub fn status<'a>(report: &'a Report, path: &str) -> &'a Status {
    let name = src_ds(path);
    report
        .outcomes
        .iter()
        .find(|o| o.dataset.as_str() == name)
        .map(|o| &o.status)
        .unwrap_or_else(|| panic!("no outcome for {name}\n{}", text(report)))
}

#[track_caller]
pub fn assert_sent(report: &Report, path: &str, kind: SendKind, to: &str) {
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
pub fn assert_up_to_date(report: &Report, path: &str, at: &str) {
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
pub fn failure<'a>(report: &'a Report, path: &str) -> &'a str {
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
pub fn assert_ok(report: &Report, src: &FakeZfs, dst: &FakeZfs) {
    assert_eq!(
        report.exit_code(),
        zfsync_send::exit::OK,
        "the run did not succeed\n{}{}",
        text(report),
        both(src, dst)
    );
}
