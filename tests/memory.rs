//! Hardening II: a 16 MiB frame limit is not a memory limit. Eight
//! connections send, all at once, a sync request of 300,000 short snapshot
//! names each (15 MiB of JSON, under the frame limit). Each must be
//! answered (here: refused, for now or for good) and the receiver's peak
//! memory must stay within its memory budget plus what it needs anyway.
//! Records one line of figures.

use std::time::Duration;

use zfsync_common::client::Client;
use zfsync_common::naming::RelPath;
use zfsync_common::protocol::{
    encode, Frame, Message, SyncReply, SyncRequest, WireSnap, MAX_FRAME,
};
use zfsync_common::zfs::Snapshot;
use zfsync_e2e::*;

const CONNECTIONS: usize = 8;
const SNAPSHOTS: u64 = 300_000;
/// The receiver's default `--memory-budget`.
const BUDGET_MIB: u64 = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_sync_requests_stay_within_the_memory_budget() {
    let certs = Certs::shared();
    let b = Pool::new("mem");
    let target = b.ds("t");
    zfs(&["create", &target]);
    zfs(&["snapshot", &format!("{target}@s0")]);
    let recv = Receiver::start(&target, &certs.receiver_args(), &[]);
    let snapshots: Vec<WireSnap> = (0..SNAPSHOTS)
        .map(|i| WireSnap {
            name: format!("s{i}"),
            guid: i + 1,
            createtxg: i + 1,
        })
        .collect();
    // Each to a dataset of its own: none is told another holds it.
    let sync = |i: usize| Message::Sync {
        path: format!("/big{i}"),
        snapshots: snapshots.clone(),
        bookmarks: vec![],
        allow_full: false,
        dry_run: false,
    };
    let frame = encode(&Frame::Msg(sync(0))).len();
    assert!(
        frame < MAX_FRAME,
        "the request ({frame} bytes) must fit a frame"
    );
    // Each connection is its own run: a new run id asks for a listing.
    let mut clients = Vec::new();
    for i in 0..CONNECTIONS {
        let mut opts = certs.client_options(recv.port, &format!("memory-{i}"));
        opts.read_timeout = Duration::from_secs(120);
        clients.push(Client::connect(&opts).await.unwrap());
    }
    let baseline = peak_rss_kib(recv.pid());
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let sync = sync(i);
            tokio::spawn(async move {
                let conn = c.connection();
                conn.send(sync).await.unwrap();
                let reply = conn.read_msg().await;
                (c, reply)
            })
        })
        .collect();
    let (mut answered, mut busy, mut refused) = (0u64, 0u64, 0u64);
    let mut clients = Vec::new();
    for t in tasks {
        let (c, reply) = t.await.unwrap();
        match reply {
            Ok(Message::Refused {
                temporary: true, ..
            }) => busy += 1,
            Ok(Message::Refused { reason, .. }) => {
                assert!(
                    reason.contains("100000"),
                    "a refusal that does not name the limit: {reason}"
                );
                refused += 1
            }
            Ok(m) => {
                assert!(SyncReply::try_from(m).is_ok(), "not an answer to sync");
                answered += 1
            }
            Err(e) => panic!(
                "a connection was lost instead of answered: {e}\n{}",
                recv.log()
            ),
        }
        clients.push(c);
    }
    let peak = peak_rss_kib(recv.pid());
    // Still serving, on the same connections.
    let s1 = Snapshot {
        name: zfsync_common::naming::SnapName::new("s1").unwrap(),
        guid: 1,
        createtxg: 1,
    };
    for c in &mut clients {
        let reply = c
            .sync(
                &SyncRequest::new(&RelPath::new("/small").unwrap(), std::slice::from_ref(&s1))
                    .dry_run(true),
            )
            .await
            .unwrap();
        assert_eq!(reply, SyncReply::New { buffered: false });
    }
    println!(
        "memory: {CONNECTIONS} sync requests of {SNAPSHOTS} snapshots ({frame} bytes each): {refused} refused, {busy} refused as busy, {answered} answered; receiver peak {peak} KiB (before: {baseline} KiB)"
    );
    record_figures(
        "memory",
        &[
            ("hostile_tried", CONNECTIONS as u64),
            ("hostile_refused", refused + busy),
            ("receiver_peak_kib", peak),
        ],
    );
    // What large requests hold is charged to the budget before it is
    // allocated (the decoder's peak is estimated high), so the peak is the
    // budget over what the receiver held before, with 32 MiB for the
    // allocator's slack and what small frames use unmetered.
    let bound = baseline + (BUDGET_MIB + 32) * 1024;
    assert!(
        peak < bound,
        "the receiver grew to {peak} KiB (bound {bound} KiB)"
    );
    assert_eq!(answered + busy + refused, CONNECTIONS as u64);
}
