//! Hardening, first part: hostile input against a real receiver. Every case
//! asserts the refusal; at the end the target pool must be unchanged and the
//! receiver must still serve an honest sender. Prints one line of figures.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use zfsync_common::client::{Client, ClientOptions};
use zfsync_common::naming::{RelPath, SnapName};
use zfsync_common::protocol::{Bytes, Connection, Message, WireSnap};
use zfsync_common::tls::{client_config, TlsFiles};
use zfsync_common::zfs::Snapshot;
use zfsync_e2e::*;

type Tls = Connection<tokio_rustls::client::TlsStream<TcpStream>>;

fn options(certs: &Certs, port: u16) -> ClientOptions {
    let mut o = certs.client_options(port, "hardening");
    o.read_timeout = Duration::from_secs(20);
    o
}

/// A TLS connection that has said nothing yet (no Hello).
async fn raw(opts: &ClientOptions) -> Tls {
    let tcp = TcpStream::connect(("127.0.0.1", opts.port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = TlsConnector::from(opts.tls.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    let t = Duration::from_secs(20);
    Connection::new(tls, t, t)
}

/// A connection after a proper Hello.
async fn hello(opts: &ClientOptions) -> Tls {
    let mut c = raw(opts).await;
    c.send(Message::Hello {
        zfs: String::new(),
        caps: vec![],
        version: zfsync_common::protocol::PROTOCOL_VERSION,
        run_id: "hardening".into(),
        software: "test".into(),
    })
    .await
    .unwrap();
    assert!(matches!(c.read_msg().await, Ok(Message::HelloOk { .. })));
    c
}

/// Did the receiver end this conversation (an error message, or a close)?
async fn ended(c: &mut Tls) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(10), c.read_msg()).await,
        Ok(Err(_))
    )
}

/// Did the receiver close this plain TCP connection?
async fn closed(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // a TLS alert, then the close
            Err(_) => return false,
        }
    }
}

#[derive(Default)]
struct Tally {
    tried: usize,
    refused: usize,
    missed: Vec<String>,
}

impl Tally {
    fn check(&mut self, what: &str, refused: bool) {
        self.tried += 1;
        if refused {
            self.refused += 1;
        } else {
            self.missed.push(what.to_string());
        }
    }
}

fn snap(name: &str, guid: u64) -> WireSnap {
    WireSnap {
        name: name.into(),
        guid,
        createtxg: guid,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_are_refused_and_nothing_changes() {
    let certs = Certs::shared();
    let b = Pool::new("hard");
    let target = b.ds("t");
    zfs(&["create", &b.ds("outside")]);
    zfs(&["create", &target]);
    zfs(&["snapshot", &format!("{target}@s0")]);
    let recv = Receiver::start(
        &target,
        &certs.receiver_args(),
        &[
            "--idle-timeout",
            "2",
            "--handshake-timeout",
            "2",
            "--max-connections",
            "3",
            "--allow-client",
            "zfsync-sender",
        ],
    );
    let before = pool_state(&b.name);
    let opts = options(certs, recv.port);
    let mut t = Tally::default();

    // --- Before and during TLS.
    let mut s = TcpStream::connect(("127.0.0.1", recv.port)).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    t.check(
        "plain TCP, no TLS",
        closed(&mut s, Duration::from_secs(10)).await,
    );
    let mut s = TcpStream::connect(("127.0.0.1", recv.port)).await.unwrap();
    t.check(
        "a client that never starts the handshake",
        closed(&mut s, Duration::from_secs(10)).await,
    );
    let mut s = TcpStream::connect(("127.0.0.1", recv.port)).await.unwrap();
    s.write_all(&noise(2000, 11)).await.unwrap();
    t.check(
        "random bytes as a ClientHello",
        closed(&mut s, Duration::from_secs(10)).await,
    );
    let other_dir = TempDir::new("hardca");
    let other = Certs::make(other_dir.path(), "zfsync-sender");
    let foreign = ClientOptions {
        tls: client_config(&TlsFiles {
            ca: &certs.dir.join("ca.pem"),
            cert: &other.dir.join("sender.pem"),
            key: &other.dir.join("sender.key"),
        })
        .unwrap(),
        ..opts.clone()
    };
    t.check(
        "a certificate from another CA",
        Client::connect(&foreign).await.is_err(),
    );
    let named_dir = TempDir::new("hardname");
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(certs.dir.join(f), named_dir.path().join(f)).unwrap();
    }
    let intruder = Certs::make(named_dir.path(), "intruder");
    let not_allowed = ClientOptions {
        tls: client_config(&TlsFiles {
            ca: &certs.dir.join("ca.pem"),
            cert: &intruder.dir.join("sender.pem"),
            key: &intruder.dir.join("sender.key"),
        })
        .unwrap(),
        ..opts.clone()
    };
    t.check(
        "a CN not in --allow-client",
        Client::connect(&not_allowed).await.is_err(),
    );
    let expired_dir = TempDir::new("hardexp");
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(certs.dir.join(f), expired_dir.path().join(f)).unwrap();
    }
    let expired = Certs::make_valid_for(expired_dir.path(), "zfsync-sender", -1);
    let mut expired_opts = opts.clone();
    expired_opts.tls = client_config(&TlsFiles {
        ca: &certs.dir.join("ca.pem"),
        cert: &expired.dir.join("sender.pem"),
        key: &expired.dir.join("sender.key"),
    })
    .unwrap();
    t.check(
        "an expired client certificate",
        Client::connect(&expired_opts).await.is_err(),
    );
    let mut roots = rustls::RootCertStore::empty();
    for c in zfsync_common::tls::load_certs("CA", &certs.dir.join("ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let nocert = ClientOptions {
        tls: Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        ),
        ..opts.clone()
    };
    t.check(
        "no client certificate",
        Client::connect(&nocert).await.is_err(),
    );

    // --- After the handshake: the conversation itself.
    let mut c = raw(&opts).await;
    c.send(Message::Hello {
        zfs: String::new(),
        caps: vec![],
        version: 99,
        run_id: "x".into(),
        software: "x".into(),
    })
    .await
    .unwrap();
    t.check("a wrong protocol version", ended(&mut c).await);
    let mut c = raw(&opts).await;
    c.send(Message::CleanBuffer {
        source_paths: vec![],
        delete_missing: true,
        dry_run: false,
    })
    .await
    .unwrap();
    t.check("cleanbuffer before Hello", ended(&mut c).await);
    let mut c = raw(&opts).await;
    c.send(Message::Sync {
        bookmarks: vec![],
        path: "/x".into(),
        snapshots: vec![snap("s1", 1)],
        allow_full: true,
        dry_run: false,
    })
    .await
    .unwrap();
    t.check("a sync before Hello", ended(&mut c).await);
    for (what, bytes) in [
        ("a 4 GiB frame length", u32::MAX.to_be_bytes().to_vec()),
        (
            "a frame 1 byte over the limit",
            ((16u32 << 20) + 1).to_be_bytes().to_vec(),
        ),
        ("an empty frame", 0u32.to_be_bytes().to_vec()),
        (
            "an unknown frame kind",
            [&5u32.to_be_bytes()[..], b"Xabcd"].concat(),
        ),
        ("an unknown message type", {
            let body = b"M{\"type\":\"frobnicate\"}";
            [&(body.len() as u32).to_be_bytes()[..], body].concat()
        }),
        ("malformed JSON", {
            let body = b"M{\"type\":\"sync\",";
            [&(body.len() as u32).to_be_bytes()[..], body].concat()
        }),
        ("a message with unknown fields", {
            let body = b"M{\"type\":\"end\",\"bytes\":1,\"rm\":\"-rf\"}";
            [&(body.len() as u32).to_be_bytes()[..], body].concat()
        }),
        ("a path that is not UTF-8", {
            let body = b"M{\"type\":\"sync\",\"path\":\"/a\xff\xfe\",\"snapshots\":[],\"allow_full\":false}";
            [&(body.len() as u32).to_be_bytes()[..], body].concat()
        }),
        ("a negative byte count", {
            let body = b"M{\"type\":\"end\",\"bytes\":-5}";
            [&(body.len() as u32).to_be_bytes()[..], body].concat()
        }),
    ] {
        let mut c = hello(&opts).await;
        c.get_mut().write_all(&bytes).await.unwrap();
        c.get_mut().flush().await.unwrap();
        t.check(what, ended(&mut c).await);
    }
    // A truncated frame, then the close: the receiver just drops it.
    let mut c = hello(&opts).await;
    c.get_mut().write_all(&100u32.to_be_bytes()).await.unwrap();
    c.get_mut().write_all(b"Mtrunc").await.unwrap();
    c.get_mut().shutdown().await.unwrap();
    t.check("a truncated frame", ended(&mut c).await);
    for (what, first) in [
        ("stream data before a sync", None),
        ("finish without a sync", Some(Message::Finish)),
        ("end without a stream", Some(Message::End { bytes: 0 })),
        (
            "a stream without a sync",
            Some(Message::Stream {
                resume: false,
                compressed: false,
                from_guid: None,
                to: snap("s1", 1),
            }),
        ),
        ("a second Hello", None),
        (
            "a receiver's message from the sender",
            Some(Message::Received { bytes: 5 }),
        ),
        (
            "a result for a dataset",
            Some(Message::Done {
                location: "x".into(),
                buffered: false,
                pruned: vec![],
            }),
        ),
        (
            "abort without a stream",
            Some(Message::Abort { reason: "x".into() }),
        ),
    ] {
        let mut c = hello(&opts).await;
        match (what, first) {
            ("stream data before a sync", _) => c
                .send_data(Bytes::from_static(b"zfs stream"))
                .await
                .unwrap(),
            ("a second Hello", _) => c
                .send(Message::Hello {
                    zfs: String::new(),
                    caps: vec![],
                    version: zfsync_common::protocol::PROTOCOL_VERSION,
                    run_id: "again".into(),
                    software: "x".into(),
                })
                .await
                .unwrap(),
            (_, Some(m)) => c.send(m).await.unwrap(),
            (_, None) => unreachable!(),
        }
        t.check(what, ended(&mut c).await);
    }
    let mut c = hello(&opts).await;
    let clean = || Message::CleanBuffer {
        source_paths: vec!["".into()],
        delete_missing: false,
        dry_run: true,
    };
    c.send(clean()).await.unwrap();
    let first_ok = matches!(c.read_msg().await, Ok(Message::CleanReport { .. }));
    c.send(clean()).await.unwrap();
    t.check("cleanbuffer twice", first_ok && ended(&mut c).await);
    let mut c = hello(&opts).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    t.check(
        "a sender that goes silent (idle timeout)",
        ended(&mut c).await,
    );
    // One byte a second: a frame never completes within the idle timeout.
    let mut c = hello(&opts).await;
    let mut cut = false;
    for b in [0u8, 0, 0, 40, b'M', b'{', b'"'] {
        if c.get_mut().write_all(&[b]).await.is_err() || c.get_mut().flush().await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    t.check(
        "a sender trickling one byte a second",
        cut || ended(&mut c).await,
    );

    // More connections than --max-connections 3.
    drop(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Client::connect(&opts).await.unwrap());
    }
    t.check(
        "a fourth connection over the limit",
        Client::connect(&opts).await.is_err(),
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // --- Names: paths and snapshot names.
    let mut c = Client::connect(&opts).await.unwrap();
    let paths = hostile_paths();
    for p in &paths {
        let conn = c.connection();
        conn.send(Message::Sync {
            bookmarks: vec![],
            path: p.clone(),
            snapshots: vec![snap("s1", 1)],
            allow_full: true,
            dry_run: false,
        })
        .await
        .unwrap();
        let r = conn.read_msg().await;
        t.check(
            &format!("path {p:?}"),
            matches!(
                r,
                Ok(Message::Refused {
                    temporary: false,
                    ..
                })
            ),
        );
    }
    for n in [
        "",
        "a@b",
        "../x",
        "a/b",
        "a#b",
        "x\0",
        "a\tb",
        "a%b",
        "\n",
        ".",
        "..",
        &"s".repeat(300),
    ] {
        let conn = c.connection();
        conn.send(Message::Sync {
            bookmarks: vec![],
            path: "/ok".into(),
            snapshots: vec![snap(n, 5)],
            allow_full: false,
            dry_run: false,
        })
        .await
        .unwrap();
        t.check(
            &format!("snapshot name {n:?}"),
            matches!(conn.read_msg().await, Ok(Message::Refused { .. })),
        );
    }
    let conn = c.connection();
    conn.send(Message::Sync {
        bookmarks: vec![],
        path: "/ok".into(),
        snapshots: vec![],
        allow_full: true,
        dry_run: false,
    })
    .await
    .unwrap();
    t.check(
        "an empty snapshot list",
        matches!(conn.read_msg().await, Ok(Message::Refused { .. })),
    );

    // --- Streams into a new dataset.
    let s1 = Snapshot {
        name: SnapName::new("s1").unwrap(),
        guid: 77,
        createtxg: 7,
    };
    let fresh = RelPath::new("/fresh").unwrap();
    for (what, data, end, abort) in [
        ("random bytes as a stream", noise(300_000, 5), None, false),
        ("a short End count", noise(1000, 6), Some(1u64), false),
        ("an error trailer (Abort)", noise(1000, 7), None, true),
    ] {
        assert!(matches!(
            c.sync(&zfsync_common::protocol::SyncRequest::new(
                &fresh,
                std::slice::from_ref(&s1)
            ))
            .await
            .unwrap(),
            zfsync_common::protocol::SyncReply::New { .. }
        ));
        c.begin_stream(None, &s1).await.unwrap();
        for chunk in data.chunks(100_000) {
            c.connection()
                .send_data(Bytes::copy_from_slice(chunk))
                .await
                .unwrap();
        }
        let refused = if abort {
            c.abort_stream("zfs send failed").await.is_ok()
        } else {
            c.end_stream(end.unwrap_or(data.len() as u64))
                .await
                .is_err()
        };
        t.check(what, refused);
    }
    // A stream for a snapshot the sync did not announce.
    c.sync(&zfsync_common::protocol::SyncRequest::new(
        &fresh,
        std::slice::from_ref(&s1),
    ))
    .await
    .unwrap();
    let other = Snapshot {
        name: SnapName::new("other").unwrap(),
        guid: 78,
        createtxg: 8,
    };
    t.check(
        "a stream for an unannounced snapshot",
        c.begin_stream(None, &other).await.is_err(),
    );
    // An incremental whose base is not the destination's newest.
    let existing = vec![
        Snapshot {
            name: SnapName::new("s0").unwrap(),
            guid: 1,
            createtxg: 1,
        },
        s1.clone(),
    ];
    let _ = c
        .sync(&zfsync_common::protocol::SyncRequest::new(
            &RelPath::root(),
            &existing,
        ))
        .await;
    t.check(
        "an incremental from a base the target does not have",
        c.begin_stream(Some(12345), &s1).await.is_err(),
    );

    // --- Nothing changed, and the receiver still serves.
    assert_eq!(pool_state(&b.name), before, "the target pool changed");
    let mut honest = Client::connect(&opts).await.unwrap();
    assert!(matches!(
        honest
            .sync(&zfsync_common::protocol::SyncRequest::new(
                &RelPath::new("/still").unwrap(),
                std::slice::from_ref(&s1)
            ))
            .await
            .unwrap(),
        zfsync_common::protocol::SyncReply::New { .. }
    ));
    let rss = peak_rss_kib(recv.pid());
    println!(
        "hardening: {} hostile inputs tried, {} refused; target unchanged; receiver still serving; peak memory {} KiB",
        t.tried, t.refused, rss
    );
    record_figures(
        "hostile",
        &[
            ("hostile_tried", t.tried as u64),
            ("hostile_refused", t.refused as u64),
            ("outside_writes", 0),
            ("receiver_peak_kib", rss),
        ],
    );
    // Bounded: 64 connections of 16 MiB frames at most, far below this.
    assert!(rss < 512 * 1024, "the receiver grew to {rss} KiB");
    assert!(t.missed.is_empty(), "not refused: {:#?}", t.missed);
    assert!(t.tried >= 50);
}
