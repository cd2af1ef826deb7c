//! End to end, protocol 5: the whole tree in one plan, and streams that
//! open their dataset (`Put`) with no round trip of their own. Counted
//! from the receiver's log (`requests: ...` per connection) and with a
//! `--zfs` spy on the receiver.

use std::time::Duration;

use zfsync_common::client::{Client, ClientError};
use zfsync_common::naming::RelPath;
use zfsync_common::protocol::{EagerStream, PlanReply, SyncReply, SyncRequest, WireSnap};
use zfsync_e2e::*;

/// The requests of every connection that ended after `from` bytes of the
/// receiver's log, summed: plan, planned datasets, put, more, sync,
/// stream, finish.
fn requests_since(recv: &Receiver, from: usize) -> [usize; 7] {
    let log = recv.log();
    let mut sum = [0usize; 7];
    for line in log[from..]
        .lines()
        .filter(|l| l.contains("requests: plan "))
    {
        let nums: Vec<usize> = line
            .split("requests: ")
            .nth(1)
            .and_then(|r| r.split(" peer=").next())
            .unwrap_or("")
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
        assert_eq!(nums.len(), 7, "{line}");
        for (s, n) in sum.iter_mut().zip(nums) {
            *s += n;
        }
    }
    sum
}

/// Runs the sender (`-t 4`, its `zfs` spied by `spy`) and waits until the
/// receiver logged the end of its `connections` (a worker's each, up to
/// 4, and cleanbuffer's); returns the requests they made.
fn run_and_count(
    certs: &Certs,
    recv: &Receiver,
    src: &str,
    spy: &ZfsSpy,
    connections: usize,
    expect: &str,
) -> [usize; 7] {
    let from = recv.log().len();
    let before = recv.log().matches("requests: plan ").count();
    let port = recv.port.to_string();
    spy.clear();
    let run = send(
        &certs.sender_args(),
        &[
            "-p",
            &port,
            "-t",
            "4",
            "--zfs",
            &spy.script,
            src,
            "127.0.0.1",
        ],
    );
    run.assert_code(0).assert_stdout_has(expect);
    recv.wait_for_log(
        "requests: plan ",
        before + connections,
        Duration::from_secs(20),
    );
    requests_since(recv, from)
}

#[test]
fn a_tree_costs_one_plan_and_a_dataset_one_put() {
    let certs = Certs::shared();
    let pools = Pools::new("plan", "t");
    let (src, dst) = pools.names();
    let rels: Vec<String> = (0..4)
        .flat_map(|i| [format!("/c{i}"), format!("/c{i}/g")])
        .collect();
    zfs(&["create", &src]);
    create_tree(&src, &rels.iter().map(String::as_str).collect::<Vec<_>>());
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    let spy = ZfsSpy::new();
    let sender_spy = ZfsSpy::new();
    let recv = Receiver::start(&dst, &certs.receiver_args(), &["--zfs", &spy.script]);

    // First run: every dataset new, one Put each, no Sync, Stream or
    // Finish; one plan for the tree.
    let n = run_and_count(
        certs,
        &recv,
        &src,
        &sender_spy,
        5,
        "datasets: 9 (0 up to date, 9 sent, 0 failed)",
    );
    assert_eq!(n[0], 1, "one plan: {n:?}\n{}", recv.log());
    assert_eq!(n[1], 9, "of 9 datasets: {n:?}");
    assert_eq!(
        &n[2..],
        &[9, 0, 0, 0, 0],
        "put, more, sync, stream, finish: {n:?}"
    );
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));

    // Nothing new: the plan is all; the receiver runs only its listing.
    spy.clear();
    let n = run_and_count(
        certs,
        &recv,
        &src,
        &sender_spy,
        2,
        "datasets: 9 (9 up to date, 0 sent, 0 failed)",
    );
    assert_eq!(n, [1, 9, 0, 0, 0, 0, 0], "{}", recv.log());
    let calls = spy.calls();
    assert!(
        calls.iter().all(|c| c.starts_with("get")) && calls.len() <= 1,
        "the receiver's zfs calls for a tree with nothing new: {calls:?}"
    );

    // A new snapshot: one Put per dataset again.
    zfs(&["snapshot", "-r", &format!("{src}@s2")]);
    let n = run_and_count(
        certs,
        &recv,
        &src,
        &sender_spy,
        5,
        "datasets: 9 (0 up to date, 9 sent, 0 failed)",
    );
    assert_eq!(n, [1, 9, 9, 0, 0, 0, 0], "{}", recv.log());
    assert_eq!(snapshot_guids(&dst), snapshot_guids(&src));
    // The sender: one `zfs send` per dataset, and O(1) calls besides
    // (the listing, the confirmations of the run).
    let calls = sender_spy.calls();
    let sends = calls.iter().filter(|c| c.starts_with("send")).count();
    assert_eq!(sends, 9, "{calls:?}");
    assert!(calls.len() - sends <= 4, "{calls:?}");
}

/// Streams `zfs send [-i from] ds@to` as the data of an eager stream the
/// caller announced; returns the byte count.
async fn pump_send(client: &mut Client, ds: &str, from: Option<&str>, to: &str) -> u64 {
    pump_zfs_send(client, ds, from.map(|f| ("-i", f)), to).await
}

fn wire(s: &zfsync_common::zfs::Snapshot) -> WireSnap {
    WireSnap::from(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_locks_nothing_and_a_refused_put_is_read_past_to_its_end() {
    let certs = Certs::shared();
    let pools = Pools::new("put", "t");
    let (src, dst) = pools.names();
    zfs(&["create", &src]);
    create_tree(&src, &["/a"]);
    zfs(&["snapshot", "-r", &format!("{src}@s1")]);
    let recv = Receiver::start(&dst, &certs.receiver_args(), &[]);
    let port = recv.port.to_string();
    send(&certs.sender_args(), &["-p", &port, &src, "127.0.0.1"]).assert_code(0);
    zfs(&["snapshot", "-r", &format!("{src}@s2")]);
    let a = format!("{src}/a");
    let snaps = snapshots_of(&a);
    let rel = RelPath::new("/a").unwrap();
    let req = SyncRequest::new(&rel, &snaps);
    let opts = certs.client_options(recv.port, "put-1");
    let mut c = Client::connect(&opts).await.expect("connect");

    // The plan: what each dataset needs, in order; a bad path is refused
    // on its own.
    let bad = SyncRequest {
        path: "/../x".into(),
        ..req.clone()
    };
    let top = SyncRequest::new(&RelPath::new("").unwrap(), &snapshots_of(&src)[..1]);
    match c.plan(vec![req.clone(), bad, top]).await.expect("plan") {
        PlanReply::Answers(a) => {
            assert!(
                matches!(a[0], SyncReply::Incremental { count: 1, .. }),
                "{a:?}"
            );
            assert!(
                matches!(
                    a[1],
                    SyncReply::Refused {
                        temporary: false,
                        ..
                    }
                ),
                "{a:?}"
            );
            assert!(matches!(a[2], SyncReply::UpToDate { .. }), "{a:?}");
        }
        other => panic!("{other:?}"),
    }
    // It locked nothing: another connection may sync /a at once.
    let mut other = Client::connect(&opts).await.expect("connect");
    assert!(matches!(
        other.sync(&req).await.expect("sync"),
        SyncReply::Incremental { .. }
    ));
    // While another connection has it open, a plan says busy, so the
    // sender asks alone instead of sending a stream to be refused.
    match c.plan(vec![req.clone()]).await.expect("plan") {
        PlanReply::Answers(a) => assert!(
            matches!(&a[0], SyncReply::Refused { temporary: true, reason } if reason.contains("busy")),
            "{a:?}"
        ),
        other => panic!("{other:?}"),
    }
    drop(other);

    // A full stream into /a, which exists: the data is read past and
    // refused at its End; /a is untouched and the connection goes on.
    let before = snapshot_guids(&dst);
    let mut tries = 0;
    let refusal = loop {
        // The other connection's lock is freed once the receiver saw it go.
        c.put(
            &req,
            EagerStream {
                from_guid: None,
                to: wire(&snaps[1]),
                finish: true,
                compressed: false,
            },
        )
        .await
        .expect("put");
        let n = pump_send(&mut c, &a, None, "s2").await;
        match c.end_landed(n).await {
            Err(ClientError::TryAgain(r)) if r.contains("busy") && tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Refused, and worth asking about afresh: the stream no
            // longer fits what the plan saw.
            Err(ClientError::TryAgain(r)) => break r,
            other => panic!("{other:?}"),
        }
    };
    assert!(
        refusal.contains("a full stream cannot be received"),
        "{refusal}"
    );
    assert_eq!(snapshot_guids(&dst), before);

    // The right stream, on the same connection: stored and finished.
    c.put(
        &req,
        EagerStream {
            from_guid: Some(snaps[0].guid),
            to: wire(&snaps[1]),
            finish: true,
            compressed: false,
        },
    )
    .await
    .expect("put");
    let n = pump_send(&mut c, &a, Some("s1"), "s2").await;
    let done = c.end_landed(n).await.expect("stored and finished");
    assert_eq!(done.location, format!("{dst}/a"));
    assert_eq!(
        snapshot_guids(&format!("{dst}/a")),
        snapshot_guids(&a),
        "{}",
        recv.log()
    );
    c.bye().await;
}
