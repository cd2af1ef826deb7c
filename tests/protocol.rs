//! End to end, driving the real receiver step by step with the protocol
//! client: out-of-order arrival and the buffer, hostile names, rejected
//! certificates, cut connections.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zfsync_common::client::{Client, ClientOptions};
use zfsync_common::naming::{RelPath, SnapName};
use zfsync_common::protocol::{Message, SyncReply, WireSnap};
use zfsync_common::zfs::Snapshot;
use zfsync_e2e::*;

fn options(certs: &Certs, port: u16, run_id: &str) -> ClientOptions {
    certs.client_options(port, run_id)
}

fn snaps(ds: &str) -> Vec<Snapshot> {
    snapshots_of(ds)
}

/// Streams `zfs send [-I from] ds@to` through the client.
async fn stream(client: &mut Client, ds: &str, from: Option<&Snapshot>, to: &Snapshot) -> u64 {
    client
        .begin_stream(from.map(|f| f.guid), to)
        .await
        .expect("stream accepted");
    let base = from.map(|f| ("-I", f.name.as_str()));
    let n = pump_zfs_send(client, ds, base, to.name.as_str()).await;
    client.end_stream(n).await.expect("received");
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_before_parent_goes_to_the_buffer_and_is_placed() {
    let certs = Certs::shared();
    let a = Pool::new("order");
    let b = Pool::new("order");
    let src = a.ds("src");
    let dst = b.ds("t");
    for ds in [src.clone(), format!("{src}/a"), format!("{src}/a/b")] {
        zfs(&["create", &ds]);
        write_file(&ds, "f", ds.as_bytes());
    }
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    zfs(&["snapshot", "-r", &format!("{src}@s2")]);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let mut c = Client::connect(&options(certs, recv.port, "order-1"))
        .await
        .expect("connect");
    let rel = |p: &str| RelPath::new(p).unwrap();

    // The top dataset first.
    let top = snaps(&src);
    assert_eq!(
        c.sync(&zfsync_common::protocol::SyncRequest::new(&rel(""), &top))
            .await
            .unwrap(),
        SyncReply::New { buffered: false }
    );
    stream(&mut c, &src, None, &top[0]).await;
    stream(&mut c, &src, Some(&top[0]), &top[1]).await;
    c.finish().await.unwrap();

    // /a/b before /a: into the buffer, under ZFSync's hex name.
    let ab = format!("{src}/a/b");
    let ab_snaps = snaps(&ab);
    assert_eq!(
        c.sync(&zfsync_common::protocol::SyncRequest::new(
            &rel("/a/b"),
            &ab_snaps[..1]
        ))
        .await
        .unwrap(),
        SyncReply::New { buffered: true }
    );
    stream(&mut c, &ab, None, &ab_snaps[0]).await;
    let done = c.finish().await.unwrap();
    let hexed = format!("{dst}.zfsyncbuffer/2F612F62");
    assert_eq!(
        (done.location.as_str(), done.buffered),
        (hexed.as_str(), true)
    );
    assert!(exists(&hexed));
    assert_eq!(
        zfs(&[
            "get",
            "-H",
            "-o",
            "value",
            "mountpoint",
            &format!("{dst}.zfsyncbuffer")
        ])
        .trim(),
        "none"
    );

    // A later incremental into the still-buffered dataset.
    match c
        .sync(&zfsync_common::protocol::SyncRequest::new(
            &rel("/a/b"),
            &ab_snaps,
        ))
        .await
        .unwrap()
    {
        SyncReply::Incremental { count: 1, .. } => {}
        other => panic!("expected an incremental, got {other:?}"),
    }
    stream(&mut c, &ab, Some(&ab_snaps[0]), &ab_snaps[1]).await;
    let done = c.finish().await.unwrap();
    assert_eq!((done.location, done.buffered), (hexed.clone(), true));

    // cleanbuffer cannot place it yet (no parent), says so, keeps it.
    let all = vec!["".to_string(), "/a".into(), "/a/b".into()];
    let r = c.clean_buffer(all.clone(), false, false).await.unwrap();
    let (placed, failed) = (r.placed, r.failed);
    assert!(placed.is_empty());
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].path, "/a/b");
    assert!(
        failed[0].reason.contains("not on the receiver yet"),
        "{:?}",
        failed[0]
    );
    assert!(exists(&hexed));

    // The parent arrives; the next cleanbuffer places the child.
    let a_snaps = snaps(&format!("{src}/a"));
    assert_eq!(
        c.sync(&zfsync_common::protocol::SyncRequest::new(
            &rel("/a"),
            &a_snaps
        ))
        .await
        .unwrap(),
        SyncReply::New { buffered: false }
    );
    stream(&mut c, &format!("{src}/a"), None, &a_snaps[0]).await;
    stream(&mut c, &format!("{src}/a"), Some(&a_snaps[0]), &a_snaps[1]).await;
    c.finish().await.unwrap();
    // One cleanbuffer per connection (it ends a run): a new one.
    c.bye().await;
    let mut c = Client::connect(&options(certs, recv.port, "order-2"))
        .await
        .expect("connect");
    let r = c.clean_buffer(all, false, false).await.unwrap();
    let (placed, failed) = (r.placed, r.failed);
    assert!(r.orphans.is_empty(), "{:?}", r.orphans);
    assert_eq!(placed, vec!["/a/b".to_string()]);
    assert!(failed.is_empty(), "{failed:?}");
    c.bye().await;
    assert!(!exists(&hexed));
    assert!(
        !exists(&format!("{dst}.zfsyncbuffer")),
        "empty buffer removed"
    );
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));

    // The sender's next run finds everything up to date.
    send(
        &certs.sender_args(),
        &["-p", &recv.port.to_string(), &src, "127.0.0.1"],
    )
    .assert_code(0)
    .assert_stdout_has("datasets: 3 (3 up to date");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_left_in_the_buffer_is_placed_by_a_later_run() {
    let certs = Certs::shared();
    let a = Pool::new("later");
    let b = Pool::new("later");
    let src = a.ds("src");
    let dst = b.ds("t");
    for ds in [src.clone(), format!("{src}/x"), format!("{src}/x/y")] {
        zfs(&["create", &ds]);
    }
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    // An interrupted earlier run left /x/y in the buffer.
    let mut c = Client::connect(&options(certs, recv.port, "later-1"))
        .await
        .unwrap();
    let xy = format!("{src}/x/y");
    let s = snaps(&xy);
    c.sync(&zfsync_common::protocol::SyncRequest::new(
        &RelPath::new("/x/y").unwrap(),
        &s,
    ))
    .await
    .unwrap();
    stream(&mut c, &xy, None, &s[0]).await;
    c.finish().await.unwrap();
    c.bye().await;
    assert!(exists(&format!("{dst}.zfsyncbuffer/2F782F79")));
    // A whole run brings the rest and places it.
    send(
        &certs.sender_args(),
        &["-p", &recv.port.to_string(), "-t", "1", &src, "127.0.0.1"],
    )
    .assert_code(0)
    .assert_stdout_has("datasets: 3 (1 up to date, 2 sent, 0 failed)");
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));
    assert!(!exists(&format!("{dst}.zfsyncbuffer")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_are_refused_and_nothing_changes() {
    let certs = Certs::shared();
    let b = Pool::new("hostile");
    zfs(&["create", &b.ds("outside")]);
    zfs(&["create", &b.ds("t")]);
    zfs(&["snapshot", &b.ds("t@s0")]);
    let recv = Receiver::start(&b.ds("t"), &certs.receiver_args(), &[]);
    let before = pool_state(&b.name);
    let mut c = Client::connect(&options(certs, recv.port, "hostile"))
        .await
        .unwrap();
    let good = vec![WireSnap {
        name: "s1".into(),
        guid: 1,
        createtxg: 1,
    }];
    let paths = hostile_paths();
    for p in &paths {
        let conn = c.connection();
        conn.send(Message::Sync {
            bookmarks: vec![],
            path: p.to_string(),
            snapshots: good.clone(),
            allow_full: true,
            dry_run: false,
        })
        .await
        .unwrap();
        match conn.read_msg().await.unwrap() {
            Message::Refused {
                reason,
                temporary: false,
            } => {
                assert!(
                    reason.contains("invalid dataset path") || reason.contains("cannot be placed"),
                    "{p:?}: {reason}"
                )
            }
            other => panic!("{p:?} not refused: {other:?}"),
        }
    }
    // Hostile snapshot names.
    for name in ["", "a@b", "../x", "a/b", "a#b", "x\0", &"s".repeat(300)] {
        let conn = c.connection();
        conn.send(Message::Sync {
            bookmarks: vec![],
            path: "/ok".into(),
            snapshots: vec![WireSnap {
                name: name.to_string(),
                guid: 5,
                createtxg: 5,
            }],
            allow_full: false,
            dry_run: false,
        })
        .await
        .unwrap();
        match conn.read_msg().await.unwrap() {
            Message::Refused { reason, .. } => {
                assert!(reason.contains("invalid snapshot name"), "{reason}")
            }
            other => panic!("{name:?} not refused: {other:?}"),
        }
    }
    // An empty snapshot list never reaches zfs.
    c.connection()
        .send(Message::Sync {
            bookmarks: vec![],
            path: "/ok".into(),
            snapshots: vec![],
            allow_full: true,
            dry_run: false,
        })
        .await
        .unwrap();
    assert!(matches!(
        c.connection().read_msg().await.unwrap(),
        Message::Refused { .. }
    ));
    // A stream announced without a sync request ends the connection.
    c.connection()
        .send(Message::Stream {
            resume: false,
            compressed: false,
            from_guid: None,
            to: good[0].clone(),
        })
        .await
        .unwrap();
    assert!(c.connection().read_msg().await.is_err());
    assert_eq!(pool_state(&b.name), before, "nothing changed in the pool");
    // The receiver still serves others.
    let mut c2 = Client::connect(&options(certs, recv.port, "hostile-2"))
        .await
        .unwrap();
    let s = vec![Snapshot {
        name: SnapName::new("s1").unwrap(),
        guid: 9,
        createtxg: 9,
    }];
    assert!(matches!(
        c2.sync(&zfsync_common::protocol::SyncRequest::new(
            &RelPath::new("/fresh").unwrap(),
            &s
        ))
        .await
        .unwrap(),
        SyncReply::New { buffered: false }
    ));
}

#[test]
fn foreign_or_missing_certificates_are_refused() {
    let certs = Certs::shared();
    let a = Pool::new("certs");
    let b = Pool::new("certs");
    let src = a.ds("src");
    let dst = b.ds("t");
    zfs(&["create", &src]);
    zfs(&["snapshot", &format!("{src}@s1")]);
    let recv = Receiver::start(
        &dst,
        &certs.receiver_args(),
        &["--allow-client", "zfsync-sender"],
    );
    let port = recv.port.to_string();
    let before = pool_state(&b.name);

    // A sender whose certificate another CA signed (it trusts our CA).
    let other_dir = TempDir::new("otherca");
    let other = Certs::make(other_dir.path(), "zfsync-sender");
    let tls = vec![
        "--ca".to_string(),
        certs.file("ca.pem"),
        "--cert".into(),
        other.file("sender.pem"),
        "--key".into(),
        other.file("sender.key"),
    ];
    send(&tls, &["-p", &port, &src, "127.0.0.1"])
        .assert_code(3)
        .assert_stderr_has("rejected this sender's certificate");

    // A receiver certificate from another CA: the sender refuses it.
    send(&other.sender_args(), &["-p", &port, &src, "127.0.0.1"])
        .assert_code(3)
        .assert_stderr_has("not signed by the CA given with --ca");

    // Right CA, but a name the receiver does not allow.
    let named_dir = TempDir::new("named");
    let _ = std::fs::copy(certs.dir.join("ca.pem"), named_dir.path().join("ca.pem"));
    let _ = std::fs::copy(certs.dir.join("ca.key"), named_dir.path().join("ca.key"));
    let named = Certs::make(named_dir.path(), "intruder");
    send(&named.sender_args(), &["-p", &port, &src, "127.0.0.1"])
        .assert_code(3)
        .assert_stderr_has("--allow-client");

    // No client certificate at all.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        for c in zfsync_common::tls::load_certs("CA", &certs.dir.join("ca.pem")).unwrap() {
            roots.add(c).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut opts = options(certs, recv.port, "nocert");
        opts.tls = Arc::new(cfg);
        let err = match Client::connect(&opts).await {
            Ok(_) => panic!("a client without a certificate was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("certificate"), "{err}");
    });
    assert_eq!(pool_state(&b.name), before, "nothing changed on the target");
    assert!(recv.log().contains("TLS handshake failed") || recv.log().contains("allow-client"));
}

/// A TCP relay that cuts both directions once `limit` bytes went from the
/// client to the server while `armed`.
async fn cutting_proxy(to: u16, limit: u64, armed: Arc<AtomicBool>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            let armed = armed.clone();
            tokio::spawn(async move {
                let Ok(mut out) = TcpStream::connect(("127.0.0.1", to)).await else {
                    return;
                };
                let (mut ri, mut wi) = inbound.split();
                let (mut ro, mut wo) = out.split();
                let up = async {
                    let mut sent = 0u64;
                    let mut buf = vec![0u8; 16 << 10];
                    loop {
                        let n = match ri.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if wo.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        sent += n as u64;
                        if armed.load(Ordering::SeqCst) && sent > limit {
                            return; // cut
                        }
                    }
                };
                let down = tokio::io::copy(&mut ro, &mut wi);
                tokio::select! { _ = up => {}, _ = down => {} }
            });
        }
    });
    port
}

#[test]
fn a_cut_connection_leaves_the_target_unchanged() {
    let certs = Certs::shared();
    let a = Pool::new("cut");
    let b = Pool::new("cut");
    let src = a.ds("src");
    let dst = b.ds("t");
    zfs(&["create", &src]);
    write_file(&src, "big", &noise(6 << 20, 1));
    zfs(&["snapshot", &format!("{src}@s1")]);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let armed = Arc::new(AtomicBool::new(true));
    let proxy = rt.block_on(cutting_proxy(recv.port, 2 << 20, armed.clone()));
    let via = |port: u16| {
        let port = port.to_string();
        let args = [
            "-p",
            port.as_str(),
            "-t",
            "1",
            "--server-name",
            "localhost",
            src.as_str(),
            "127.0.0.1",
        ];
        send(&certs.sender_args(), &args)
    };
    let via_proxy = |_: &[&str]| via(proxy);

    // Cut during a full stream: no partial dataset.
    let before = pool_state(&b.name);
    let run = via_proxy(&[]);
    run.assert_code(1);
    // The receiver notices the cut on its own time; wait for it.
    recv.wait_for_log("stream cut", 1, Duration::from_secs(60));
    assert!(!exists(&dst), "partial dataset:\n{}", run.dump());
    assert_eq!(pool_state(&b.name), before);

    // The next run completes.
    armed.store(false, Ordering::SeqCst);
    via_proxy(&[]).assert_code(0);
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));

    // Cut during an incremental: the target stays at @s1.
    write_file(&src, "big2", &noise(6 << 20, 2));
    zfs(&["snapshot", &format!("{src}@s2")]);
    armed.store(true, Ordering::SeqCst);
    let guids = snapshot_guids(&dst);
    via_proxy(&[]).assert_code(1);
    recv.wait_for_log("stream cut", 2, Duration::from_secs(60));
    assert_eq!(snapshot_guids(&dst), guids);
    armed.store(false, Ordering::SeqCst);
    via_proxy(&[])
        .assert_code(0)
        .assert_stdout_has("incremental @s1..@s2");
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));

    // Cut inside the second snapshot of one -I stream: the first arrived
    // whole and is kept, the second is not committed, the next run brings it.
    write_file(&src, "big3", &noise(6 << 20, 3));
    zfs(&["snapshot", &format!("{src}@s3")]);
    write_file(&src, "big4", &noise(6 << 20, 4));
    zfs(&["snapshot", &format!("{src}@s4")]);
    let later_cut = rt.block_on(cutting_proxy(recv.port, 9 << 20, armed.clone()));
    armed.store(true, Ordering::SeqCst);
    via(later_cut).assert_code(1);
    recv.wait_for_log("stream cut", 3, Duration::from_secs(60));
    let got = snapshot_guids(&dst);
    let want = snapshot_guids(&src);
    assert!(!got.contains_key("@s4"), "@s4 committed from a cut stream");
    assert!(got.iter().all(|(k, v)| want.get(k) == Some(v)), "{got:?}");
    armed.store(false, Ordering::SeqCst);
    via(later_cut).assert_code(0);
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));
    record_figures(
        "faults-connection-cut",
        &[("faults", 3), ("completed", 3), ("lost", 0)],
    );
}

#[test]
fn sigterm_mid_transfer_aborts_the_receive_and_exits_0() {
    let certs = Certs::shared();
    let a = Pool::new("term");
    let b = Pool::new("term");
    let src = a.ds("src");
    let dst = b.ds("t");
    zfs(&["create", &src]);
    write_file(&src, "big", &noise(4 << 20, 9));
    zfs(&["snapshot", &format!("{src}@s1")]);
    let mut recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let before = pool_state(&b.name);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let data = send_bytes(&[&format!("{src}@s1")]);
    let s = snaps(&src);
    // Half a stream, then SIGTERM while the sender is still "sending".
    let mut c = rt.block_on(async {
        let mut c = Client::connect(&options(certs, recv.port, "term"))
            .await
            .unwrap();
        assert_eq!(
            c.sync(&zfsync_common::protocol::SyncRequest::new(
                &RelPath::root(),
                &s
            ))
            .await
            .unwrap(),
            SyncReply::New { buffered: false }
        );
        c.begin_stream(None, &s[0]).await.unwrap();
        for chunk in data[..data.len() / 2].chunks(100_000) {
            c.connection().send_data(bytes_of(chunk)).await.unwrap();
        }
        c
    });
    std::thread::sleep(Duration::from_millis(300));
    let status = recv
        .signal_and_wait("TERM", Duration::from_secs(20))
        .expect("zfsync-recv exits on SIGTERM");
    assert!(status.success(), "exit status {status:?}\n{}", recv.log());
    let log = recv.log();
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("stream cut"), "{log}");
    // The peer was told why, and nothing of the stream was committed.
    let told = rt.block_on(async { c.connection().read_msg().await });
    assert!(format!("{told:?}").contains("shutting down"), "{told:?}");
    assert!(!exists(&dst));
    assert_eq!(pool_state(&b.name), before);
    record_figures("faults-sigterm", &[("faults", 1), ("lost", 0)]);
}

fn bytes_of(b: &[u8]) -> zfsync_common::protocol::Bytes {
    zfsync_common::protocol::Bytes::copy_from_slice(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_streams_are_refused_and_no_snapshot_is_lost() {
    let certs = Certs::shared();
    let a = Pool::new("hstream");
    let b = Pool::new("hstream");
    let src = a.ds("src");
    let dst = b.ds("t");
    zfs(&["create", &src]);
    zfs(&["create", &format!("{src}/kid")]);
    write_file(&src, "f", b"one");
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    write_file(&src, "f", b"two");
    zfs(&["snapshot", "-r", &format!("{src}@s2")]);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    send(
        &certs.sender_args(),
        &["-p", &recv.port.to_string(), &src, "127.0.0.1"],
    )
    .assert_code(0);
    write_file(&src, "f", b"three");
    zfs(&["snapshot", "-r", &format!("{src}@s3")]);
    let before = pool_state(&b.name);

    let s = snaps(&src);
    let mut c = Client::connect(&options(certs, recv.port, "hstream"))
        .await
        .unwrap();
    match c
        .sync(&zfsync_common::protocol::SyncRequest::new(
            &RelPath::root(),
            &s,
        ))
        .await
        .unwrap()
    {
        SyncReply::Incremental { base_guid, .. } => assert_eq!(base_guid, s[1].guid),
        other => panic!("expected incremental, got {other:?}"),
    }
    let lying = send_bytes(&["-i", &format!("{src}@s1"), &format!("{src}@s3")]);
    let replication = send_bytes(&["-R", "-I", &format!("{src}@s2"), &format!("{src}@s3")]);
    let good = send_bytes(&["-i", &format!("{src}@s2"), &format!("{src}@s3")]);
    let other_dataset = send_bytes(&["-i", &format!("{src}/kid@s2"), &format!("{src}/kid@s3")]);
    let junk = noise(50_000, 3);
    let cases: Vec<(&str, &[u8], u64, &str)> = vec![
        (
            "a -i from an older base",
            &lying,
            lying.len() as u64,
            "not from the destination's newest",
        ),
        (
            "a -R stream",
            &replication,
            replication.len() as u64,
            "payload",
        ),
        (
            "another dataset's stream",
            &other_dataset,
            other_dataset.len() as u64,
            "not from the destination's newest",
        ),
        (
            "random bytes",
            &junk,
            junk.len() as u64,
            "not a zfs send stream",
        ),
        (
            "a short End count",
            &good,
            good.len() as u64 - 1,
            "bytes but",
        ),
        (
            "a truncated stream",
            &good[..good.len() / 2],
            (good.len() / 2) as u64,
            "failed",
        ),
    ];
    for (what, data, end, why) in cases {
        let err = raw_stream(&mut c, Some(s[1].guid), &s[2], data, &[100_000], end)
            .await
            .expect_err(what);
        assert!(err.contains(why), "{what}: {err}");
        assert_eq!(pool_state(&b.name), before, "{what} changed the target");
    }
    // Finishing without the newest snapshot is refused too.
    let err = c
        .finish()
        .await
        .expect_err("finish without the newest snapshot");
    assert!(
        err.to_string().contains("did not receive every snapshot"),
        "{err}"
    );
    c.bye().await;
    assert_eq!(pool_state(&b.name), before);

    // The genuine sender still completes.
    send(
        &certs.sender_args(),
        &["-p", &recv.port.to_string(), &src, "127.0.0.1"],
    )
    .assert_code(0)
    .assert_stdout_has("incremental @s2..@s3");
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_never_receive_into_one_dataset() {
    let certs = Certs::shared();
    let b = Pool::new("busy");
    let recv = Receiver::start(&b.ds("t"), &certs.receiver_args(), &[]);
    let s = vec![Snapshot {
        name: SnapName::new("s1").unwrap(),
        guid: 9,
        createtxg: 9,
    }];
    let x = RelPath::new("/x").unwrap();
    let mut c1 = Client::connect(&options(certs, recv.port, "busy"))
        .await
        .unwrap();
    let mut c2 = Client::connect(&options(certs, recv.port, "busy"))
        .await
        .unwrap();
    // The target does not exist yet: /x would go to the buffer.
    assert_eq!(
        c1.sync(&zfsync_common::protocol::SyncRequest::new(&x, &s))
            .await
            .unwrap(),
        SyncReply::New { buffered: true }
    );
    match c2
        .sync(&zfsync_common::protocol::SyncRequest::new(&x, &s))
        .await
        .unwrap()
    {
        SyncReply::Refused { reason, temporary } => {
            assert!(temporary && reason.contains("busy"), "{reason}")
        }
        other => panic!("a second connection got {other:?}"),
    }
    // Once the first lets go, the second may.
    c1.bye().await;
    let mut freed = false;
    for _ in 0..50 {
        if c2
            .sync(&zfsync_common::protocol::SyncRequest::new(&x, &s))
            .await
            .unwrap()
            == (zfsync_common::protocol::SyncReply::New { buffered: true })
        {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        freed,
        "the dataset stayed locked after the first connection left"
    );
}

#[test]
fn sigint_stops_an_idle_receiver_cleanly() {
    let b = Pool::new("int");
    let mut recv = Receiver::start(&b.ds("t"), &Certs::shared().receiver_args(), &[]);
    let status = recv
        .signal_and_wait("INT", Duration::from_secs(10))
        .expect("zfsync-recv exits on SIGINT");
    assert!(status.success(), "{status:?}\n{}", recv.log());
    assert!(recv.log().contains("SIGINT received"));
}

#[test]
fn sighup_reloads_the_certificates_and_a_bad_file_keeps_the_old_ones() {
    let certs = Certs::shared();
    let a = Pool::new("hup");
    let b = Pool::new("hup");
    let src = a.ds("src");
    zfs(&["create", &src]);
    zfs(&["snapshot", &format!("{src}@s1")]);
    // The receiver's own copies of its files, to be replaced in place.
    let dir = TempDir::new("hupcerts");
    let mine = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let install = |from: &Certs| {
        for n in ["ca.pem", "receiver.pem", "receiver.key"] {
            std::fs::copy(from.dir.join(n), dir.path().join(n)).unwrap();
        }
    };
    install(certs);
    let tls = vec![
        "--ca".to_string(),
        mine("ca.pem"),
        "--cert".into(),
        mine("receiver.pem"),
        "--key".into(),
        mine("receiver.key"),
    ];
    let recv = Receiver::start(&b.ds("t"), &tls, &[]);
    let port = recv.port.to_string();
    send(&certs.sender_args(), &["-p", &port, &src, "127.0.0.1"]).assert_code(0);

    // A new CA: after SIGHUP only its senders get in, while a transfer
    // that was under way goes on to the end.
    write_file(&src, "big", &noise(4 << 20, 21));
    zfs(&["snapshot", &format!("{src}@s2")]);
    let slow_dir = TempDir::new("hupslow");
    let slow = slow_zfs(&slow_dir);
    let spawned = recv.log().matches("spawning argv=").count();
    let running = {
        let (tls, port, src) = (certs.sender_args(), port.clone(), src.clone());
        std::thread::spawn(move || send(&tls, &["-p", &port, "--zfs", &slow, &src, "127.0.0.1"]))
    };
    recv.wait_for_log("spawning argv=", spawned + 1, Duration::from_secs(30));
    let other_dir = TempDir::new("hupother");
    let other = Certs::make(other_dir.path(), "zfsync-sender");
    install(&other);
    recv.signal("HUP");
    recv.wait_for_log("certificates reloaded", 1, Duration::from_secs(10));
    running
        .join()
        .unwrap()
        .assert_code(0)
        .assert_stdout_has("incremental @s1..@s2");
    send(&certs.sender_args(), &["-p", &port, &src, "127.0.0.1"]).assert_code(3);
    send(&other.sender_args(), &["-p", &port, &src, "127.0.0.1"])
        .assert_code(0)
        .assert_stdout_has("up to date");

    // A broken file: the receiver says so and keeps what it has.
    std::fs::write(dir.path().join("receiver.pem"), b"not a certificate").unwrap();
    recv.signal("HUP");
    recv.wait_for_log("keeping the old certificates", 1, Duration::from_secs(10));
    send(&other.sender_args(), &["-p", &port, &src, "127.0.0.1"]).assert_code(0);
}

/// A child whose buffer name would be too long for ZFS (the hex of its path
/// doubles its length) is not failed when it arrives before its parent: it
/// is refused as temporary, waits, and is received in place once the parent
/// is there; a whole run with several workers completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_whose_buffer_name_is_too_long_waits_for_its_parent() {
    let certs = Certs::shared();
    let pools = Pools::new("longbuf", "t");
    let (src, dst) = pools.names();
    let long = "c".repeat(120);
    let child = format!("{src}/p/{long}");
    for ds in [src.clone(), format!("{src}/p"), child.clone()] {
        zfs(&["create", &ds]);
    }
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let mut c = Client::connect(&options(certs, recv.port, "longbuf-1"))
        .await
        .unwrap();
    let rel = RelPath::new(&format!("/p/{long}")).unwrap();
    let s = snaps(&child);
    match c
        .sync(&zfsync_common::protocol::SyncRequest::new(&rel, &s))
        .await
        .unwrap()
    {
        SyncReply::Refused { reason, temporary } => {
            assert!(temporary, "{reason}");
            assert!(reason.contains("waits for its parent"), "{reason}");
        }
        other => panic!("expected a temporary refusal, got {other:?}"),
    }
    c.bye().await;
    assert!(!exists(&format!("{dst}.zfsyncbuffer")));
    // A real run with several workers: the child is tried again once the
    // parent is in place, and lands there.
    send(
        &certs.sender_args(),
        &["-p", &recv.port.to_string(), "-t", "4", &src, "127.0.0.1"],
    )
    .assert_code(0)
    .assert_stdout_has("result: all datasets in sync");
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));
    assert!(exists(&format!("{dst}/p/{long}")));
}
