use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, DuplexStream};
use zfsync_common::protocol::{
    decode, encode, Bytes, Connection, Frame, Message, ProtocolError, WireSnap,
};

use super::*;

/// Counts this thread's heap bytes, to hold [`Scan::cost`] against
/// what the decoder really allocates.
struct Counting;

thread_local! {
    static NOW: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn count(grow: usize, shrink: usize) {
    let _ = NOW.try_with(|n| {
        let v = n.get().saturating_add(grow).saturating_sub(shrink);
        n.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size(), 0);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        count(0, l.size());
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count(new, l.size());
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// The most decoding `body` allocates above what was allocated before.
fn decode_peak(body: Vec<u8>) -> usize {
    let body = Bytes::from(body);
    let before = NOW.with(Cell::get);
    PEAK.with(|p| p.set(before));
    drop(decode(body));
    PEAK.with(Cell::get) - before
}

fn cost_of(body: &[u8]) -> usize {
    let mut scan = Scan::default();
    scan.feed(&body[1..]);
    scan.cost(body.len())
}

fn sync_with(n: u64, name: impl Fn(u64) -> String) -> Message {
    Message::Sync {
        path: "/a".into(),
        snapshots: (0..n)
            .map(|i| WireSnap {
                name: name(i),
                guid: i + 1,
                createtxg: i + 1,
            })
            .collect(),
        bookmarks: vec![],
        allow_full: false,
        dry_run: false,
    }
}

/// A message body (kind byte and JSON) from pieces.
fn body(head: &str, item: &str, n: usize, tail: &str) -> Vec<u8> {
    let mut b = format!("M{head}").into_bytes();
    for i in 0..n {
        if i > 0 {
            b.push(b',');
        }
        b.extend_from_slice(item.as_bytes());
    }
    b.extend_from_slice(tail.as_bytes());
    b
}

#[test]
fn the_estimate_bounds_what_decoding_takes() {
    let sync = r#"{"type":"sync","path":"/a","allow_full":false,"snapshots":["#;
    let hello = r#"{"type":"hello","version":4,"run_id":"x","software":"x","caps":["#;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "tool snapshot names",
            encode(&Frame::Msg(sync_with(20_000, |_| "240101-000000_D".into()))).to_vec(),
        ),
        (
            "short names",
            encode(&Frame::Msg(sync_with(60_000, |i| format!("s{i}")))).to_vec(),
        ),
        (
            "entries as arrays",
            body(sync, r#"["",0,0]"#, 100_000, "]}"),
        ),
        (
            "one-letter names",
            body(sync, r#"["a",0,0]"#, 100_000, "]}"),
        ),
        ("escaped names", body(sync, r#"["AA",0,0]"#, 50_000, "]}")),
        (
            "empty capability names",
            body(hello, r#""""#, 300_000, "]}"),
        ),
        ("empty arrays", body(sync, "[]", 300_000, "]}")),
    ];
    for (what, b) in cases {
        let cost = cost_of(&b);
        let len = b.len();
        // Our copy of the frame is there too while it decodes.
        let took = decode_peak(b) + len;
        assert!(
            took < cost,
            "{what}: decoding {len} bytes took {took}, estimated {cost}"
        );
        assert!(
            took * 4 > cost,
            "{what}: estimated {cost} for {took}: too careful"
        );
    }
}

fn pipe(
    budget: &Arc<MemoryBudget>,
) -> (Connection<DuplexStream>, Connection<Metered<DuplexStream>>) {
    let (a, b) = tokio::io::duplex(1 << 16);
    let t = Duration::from_secs(10);
    (
        Connection::new(a, t, t),
        Connection::new(Metered::new(b, budget.clone()), t, t),
    )
}

/// The next frame and what the meter says about it.
async fn next(
    c: &mut Connection<Metered<DuplexStream>>,
) -> (
    Result<Option<Frame>, ProtocolError>,
    Option<Reservation>,
    Option<Dropped>,
) {
    let f = c.read().await;
    let m = c.get_mut();
    (f, m.admitted.take(), m.dropped.take())
}

#[tokio::test]
async fn frames_pass_as_they_are_and_large_ones_are_charged() {
    let budget = MemoryBudget::new(64 << 20);
    let (mut tx, mut rx) = pipe(&budget);
    let big = sync_with(20_000, |i| format!("s{i}"));
    let data = Bytes::from(vec![7u8; 2 << 20]);
    let sent = vec![
        Frame::Msg(Message::Finish),
        Frame::Data(Bytes::from_static(b"zfs")),
        Frame::Msg(big.clone()),
        Frame::Data(data.clone()),
        Frame::Msg(Message::Bye),
    ];
    let writer = tokio::spawn(async move {
        tx.send(Message::Finish).await.unwrap();
        tx.send_data(Bytes::from_static(b"zfs")).await.unwrap();
        tx.send(big).await.unwrap();
        tx.send_data(data).await.unwrap();
        tx.send(Message::Bye).await.unwrap();
        tx
    });
    for want in sent {
        let large = match &want {
            Frame::Msg(Message::Sync { .. }) => true,
            Frame::Data(d) => d.len() > SMALL_DATA,
            _ => false,
        };
        let (f, admitted, dropped) = next(&mut rx).await;
        assert_eq!(f.unwrap().unwrap(), want);
        assert_eq!(admitted.is_some(), large, "{}", want.describe());
        assert!(dropped.is_none());
    }
    // The codec keeps its largest buffer: charged while it lives.
    let kept = rx.get_ref().codec_buffer.as_ref().map(Reservation::bytes);
    assert_eq!(kept, Some(4 + 1 + (2 << 20)));
    assert_eq!(budget.used(), kept.unwrap());
    drop(rx);
    assert_eq!(budget.used(), 0);
    drop(writer.await);
}

#[tokio::test]
async fn a_large_message_without_room_is_read_past_and_refused() {
    let big = sync_with(20_000, |i| format!("s{i}"));
    let body = encode(&Frame::Msg(big.clone()));
    let need = cost_of(&body);
    // Room for it, but taken: refused for now, and the connection goes on.
    let budget = MemoryBudget::new(need + 1000);
    let taken = budget.try_reserve(need).unwrap();
    let (mut tx, mut rx) = pipe(&budget);
    let writer = tokio::spawn({
        let big = big.clone();
        async move {
            tx.send(big).await.unwrap();
            tx.send(Message::Finish).await.unwrap();
            tx
        }
    });
    let (f, admitted, dropped) = next(&mut rx).await;
    assert!(f.unwrap().is_some() && admitted.is_none());
    assert_eq!(
        dropped,
        Some(Dropped {
            len: body.len(),
            need,
            forever: false
        })
    );
    assert_eq!(budget.used(), need, "nothing was charged for it");
    let (f, _, dropped) = next(&mut rx).await;
    assert_eq!(f.unwrap(), Some(Frame::Msg(Message::Finish)));
    assert!(dropped.is_none());
    let why = Dropped {
        len: body.len(),
        need,
        forever: false,
    }
    .reason(&budget);
    assert!(why.contains("try again later"), "{why}");
    drop((taken, writer.await));
    // Never room for it: refused for good.
    let small = MemoryBudget::new(need / 2);
    let (mut tx, mut rx) = pipe(&small);
    let writer = tokio::spawn(async move {
        tx.send(big).await.unwrap();
        tx
    });
    let (_, _, dropped) = next(&mut rx).await;
    drop(writer.await);
    let d = dropped.unwrap();
    assert!(d.forever);
    assert!(d
        .reason(&small)
        .contains("more than the receiver's whole memory budget"));
}

#[tokio::test]
async fn bad_frames_are_refused_as_ever() {
    let budget = MemoryBudget::new(1 << 20);
    for (bytes, want) in [
        ((16u32 << 20) + 1).to_be_bytes().to_vec(),
        0u32.to_be_bytes().to_vec(),
        [&5u32.to_be_bytes()[..], b"Xabcd"].concat(),
        [&100u32.to_be_bytes()[..], b"Mtrunc"].concat(),
    ]
    .into_iter()
    .zip([
        "frame size too big",
        "empty frame",
        "unknown frame kind",
        "bytes remaining",
    ]) {
        let (mut tx, mut rx) = pipe(&budget);
        tx.get_mut().write_all(&bytes).await.unwrap();
        tx.get_mut().shutdown().await.unwrap();
        let e = rx
            .read()
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains(want), "{want}: {e}");
    }
}
