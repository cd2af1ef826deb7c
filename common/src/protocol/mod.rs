//! The wire protocol: frames, typed messages and a [`Connection`] that reads
//! and writes them with timeouts.
//!
//! A frame is a 4-byte big-endian length (tokio-util's length-delimited
//! codec, bounded by [`MAX_FRAME`]) followed by one kind byte: `M` for a JSON
//! [`Message`], `D` for raw `zfs send` bytes. A conversation:
//!
//! ```text
//! client                                server
//! Hello{version, run_id, caps}   ->
//!                                <-     HelloOk | Error
//! Plan{datasets}                 ->     (the whole tree, in requests of
//!                                <-     Planned{answers} | Refused   about 1 MiB;
//!                                       answers as for Sync, nothing locked)
//! ( Put{sync, from_guid, to, finish}    (a dataset the plan said to send:
//!   Data...  End{bytes} | Abort  ->     sync and first stream at once)
//!                                <-     Received | Done (finish) | StreamFailed | Refused
//!   ( More{from_guid, to, finish}       (its next stream, same answers)
//!     Data...  End | Abort       ->
//!                                <-     ... )* )*
//! ( Sync{path, snapshots, full}  ->     (one dataset on its own: no plan,
//!                                <-     UpToDate | Incremental | New | Full | Refused
//!                                       | Resume{token}            a resume, a retry)
//!   ( ResumeFailed{reason}       ->     (a stale token: the receiver
//!                                <-     discards it and answers as for Sync) )
//!   ( Stream{from_guid, to}      ->     (checked first: a resumed stream)
//!                                <-     Ready | StreamFailed
//!     Data...  End{bytes} | Abort ->
//!                                <-     Received | StreamFailed )*
//!   More... as above, or Finish  ->
//!                                <-     Done | Refused )*
//! CleanBuffer                    ->
//!                                <-     CleanReport
//! Bye
//! ```
//!
//! A dataset that needs nothing costs no message beyond the plan; one that
//! needs one stream costs one round trip (its `End`'s answer). A stream
//! sent eagerly (`Put`, `More`) and refused is read past to its `End` and
//! refused there: nothing of it reaches `zfs receive`.
//!
//! A stream is committed only after `End` arrives with the exact byte count;
//! a cut connection or an `Abort` kills the `zfs receive`.
//!
//! `compressed` (on `Put`, `More` and `Stream`; absent when false): each
//! data frame of the stream is one zstd frame ([`crate::compress`]), sent
//! only to a receiver whose `HelloOk` listed the capability
//! [`crate::compress::CAP_ZSTD`]. `End{bytes}` counts the uncompressed
//! stream either way.

use std::time::Duration;

pub use bytes::Bytes;
use bytes::{BufMut, BytesMut};
use futures::{SinkExt, StreamExt};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

pub mod handshake;
mod message;
pub mod typed;

pub use message::{Message, PlaceFailure, WireSnap};
pub use typed::{
    CleanReply, CleanReport, CleanRequest, EagerStream, FinishReply, Finished, Landed, PlanReply,
    Request, Stored, StreamReply, StreamRequest, SyncReply, SyncRequest,
};

/// 3: capabilities in the handshake, resumable streams, bookmarks.
/// 4: the reason for a full replacement travels typed ([`FullReason`]).
/// 5: the whole tree in one `Plan`; `Put`/`More` streams without `Ready`,
/// the last one finishing the dataset; `StreamFailed{temporary}`.
///
/// [`FullReason`]: crate::plan::FullReason
pub const PROTOCOL_VERSION: u32 = 5;
/// Largest frame accepted: 16 MiB (a sync request for a dataset with about
/// 100 000 snapshots). Larger lengths are refused before any allocation.
pub const MAX_FRAME: usize = 16 << 20;
/// Size of the data frames a sender writes.
pub const DATA_CHUNK: usize = 256 << 10;
/// The default TCP port.
pub const DEFAULT_PORT: u16 = 7878;

const KIND_MSG: u8 = b'M';
const KIND_DATA: u8 = b'D';

#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer sent nothing for {0:?}; closing")]
    Timeout(Duration),
    #[error("the peer closed the connection")]
    Closed,
    #[error("malformed frame: {0}")]
    BadFrame(String),
    #[error("unexpected {got} (expected {expected})")]
    Unexpected { got: String, expected: String },
    #[error("the peer reported an error: {0}")]
    Peer(String),
    #[error("protocol version mismatch: this end speaks {ours}, the peer {theirs}; install the same zfsync version on both hosts")]
    Version { ours: u32, theirs: u32 },
    /// Something on this side ends the conversation (shutdown, a local
    /// failure); the text says what, and is also sent to the peer.
    #[error("{0}")]
    Local(String),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Msg(Message),
    Data(Bytes),
}

impl Frame {
    pub fn describe(&self) -> String {
        match self {
            Frame::Msg(m) => format!("message {}", m.name()),
            Frame::Data(d) => format!("{} bytes of stream data", d.len()),
        }
    }
}

/// Encodes a frame body (without the length prefix).
pub fn encode(frame: &Frame) -> Bytes {
    match frame {
        Frame::Msg(m) => {
            let mut b = BytesMut::with_capacity(128);
            b.put_u8(KIND_MSG);
            // Serializing our own enum to a Vec cannot fail.
            let json = serde_json::to_vec(m).unwrap_or_default();
            b.extend_from_slice(&json);
            b.freeze()
        }
        Frame::Data(d) => {
            let mut b = BytesMut::with_capacity(d.len() + 1);
            b.put_u8(KIND_DATA);
            b.extend_from_slice(d);
            b.freeze()
        }
    }
}

/// Decodes a frame body. Never panics, whatever the bytes.
pub fn decode(mut body: Bytes) -> Result<Frame, ProtocolError> {
    if body.is_empty() {
        return Err(ProtocolError::BadFrame("empty frame".into()));
    }
    let kind = body[0];
    let rest = body.split_off(1);
    match kind {
        KIND_MSG => serde_json::from_slice(&rest)
            .map(Frame::Msg)
            .map_err(|e| ProtocolError::BadFrame(format!("bad message: {e}"))),
        KIND_DATA => Ok(Frame::Data(rest)),
        k => Err(ProtocolError::BadFrame(format!(
            "unknown frame kind {k:#04x}"
        ))),
    }
}

/// TCP keepalive on a connection: a peer that vanished (power loss, a
/// dropped route) is noticed within about two minutes even while the other
/// end is busy (a long `zfs receive` at End, a slow `zfs send`).
pub fn keepalive(tcp: &tokio::net::TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    let sock = socket2::SockRef::from(tcp);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!("cannot set TCP keepalive: {e}");
    }
    let _ = tcp.set_nodelay(true);
}

pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// Frames over any byte stream (TLS in production, a duplex pipe in tests).
pub struct Connection<S> {
    framed: Framed<S, LengthDelimitedCodec>,
    /// Longest wait for the peer's next frame.
    read_timeout: Duration,
    /// Longest wait for a frame to be written (a peer that stops reading).
    write_timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S, read_timeout: Duration, write_timeout: Duration) -> Self {
        Connection {
            framed: Framed::new(stream, codec()),
            read_timeout,
            write_timeout,
        }
    }

    pub fn get_ref(&self) -> &S {
        self.framed.get_ref()
    }

    /// The byte stream underneath, for tests that write malformed frames.
    pub fn get_mut(&mut self) -> &mut S {
        self.framed.get_mut()
    }

    /// The next frame; `Ok(None)` when the peer closed cleanly between
    /// frames.
    pub async fn read(&mut self) -> Result<Option<Frame>, ProtocolError> {
        match tokio::time::timeout(self.read_timeout, self.framed.next()).await {
            Err(_) => Err(ProtocolError::Timeout(self.read_timeout)),
            Ok(None) => Ok(None),
            Ok(Some(Err(e))) => {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    Err(ProtocolError::BadFrame(e.to_string()))
                } else {
                    Err(ProtocolError::Io(e))
                }
            }
            Ok(Some(Ok(body))) => decode(body.freeze()).map(Some),
        }
    }

    /// The next frame, which must be a message.
    pub async fn read_msg(&mut self) -> Result<Message, ProtocolError> {
        match self.read().await? {
            None => Err(ProtocolError::Closed),
            Some(Frame::Msg(Message::Error { reason })) => Err(ProtocolError::Peer(reason)),
            Some(Frame::Msg(m)) => Ok(m),
            Some(f) => Err(ProtocolError::Unexpected {
                got: f.describe(),
                expected: "a message".into(),
            }),
        }
    }

    async fn write_frame(&mut self, frame: &Frame) -> Result<(), ProtocolError> {
        let body = encode(frame);
        match tokio::time::timeout(self.write_timeout, self.framed.send(body)).await {
            Err(_) => Err(ProtocolError::Timeout(self.write_timeout)),
            Ok(r) => r.map_err(ProtocolError::Io),
        }
    }

    pub async fn send(&mut self, msg: Message) -> Result<(), ProtocolError> {
        self.write_frame(&Frame::Msg(msg)).await
    }

    pub async fn send_data(&mut self, data: Bytes) -> Result<(), ProtocolError> {
        self.write_frame(&Frame::Data(data)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `temporary` travels only when true: a peer that does not know the
    /// field still reads every other stream failure.
    #[test]
    fn a_stream_failure_carries_temporary_only_when_it_is() {
        let plain = Message::StreamFailed {
            reason: "x".into(),
            temporary: false,
        };
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("temporary"), "{json}");
        assert_eq!(serde_json::from_str::<Message>(&json).unwrap(), plain);
        let again = Message::StreamFailed {
            reason: "x".into(),
            temporary: true,
        };
        let json = serde_json::to_string(&again).unwrap();
        assert!(json.contains("\"temporary\":true"), "{json}");
        assert_eq!(serde_json::from_str::<Message>(&json).unwrap(), again);
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello {
                version: 1,
                run_id: "r".into(),
                software: "zfsync 0.1".into(),
                zfs: "zfs-2.1.11-1".into(),
                caps: vec!["send_c".into()],
            },
            Message::HelloOk {
                version: 1,
                software: "x".into(),
                zfs: String::new(),
                caps: vec![],
            },
            Message::Sync {
                path: "/a/b".into(),
                snapshots: vec![WireSnap {
                    name: "s1".into(),
                    guid: u64::MAX,
                    createtxg: 7,
                }],
                bookmarks: vec![WireSnap {
                    name: "s0".into(),
                    guid: 3,
                    createtxg: 5,
                }],
                allow_full: true,
                dry_run: false,
            },
            Message::UpToDate {
                snapshot: "s".into(),
            },
            Message::Incremental {
                base_guid: 3,
                count: 2,
            },
            Message::New { buffered: true },
            Message::Full {
                reason: crate::plan::FullReason::TargetHasNoSnapshots,
                accepted: false,
            },
            Message::Refused {
                reason: "r".into(),
                temporary: true,
            },
            Message::Stream {
                from_guid: None,
                to: WireSnap {
                    name: "s".into(),
                    guid: 1,
                    createtxg: 2,
                },
                resume: true,
                compressed: false,
            },
            Message::Resume {
                token: "1-abc".into(),
            },
            Message::ResumeFailed { reason: "x".into() },
            Message::Ready,
            Message::End { bytes: 5 },
            Message::Abort { reason: "x".into() },
            Message::Received { bytes: 5 },
            Message::StreamFailed {
                reason: "x".into(),
                temporary: true,
            },
            Message::StreamFailed {
                reason: "x".into(),
                temporary: false,
            },
            Message::Plan {
                datasets: vec![SyncRequest {
                    path: "/a".into(),
                    snapshots: vec![WireSnap {
                        name: "s1".into(),
                        guid: 9,
                        createtxg: 2,
                    }],
                    bookmarks: vec![],
                    allow_full: false,
                    dry_run: false,
                }],
            },
            Message::Planned {
                answers: vec![
                    SyncReply::UpToDate {
                        snapshot: "s1".into(),
                    },
                    SyncReply::Full {
                        reason: crate::plan::FullReason::TargetHasNoSnapshots,
                        accepted: true,
                    },
                ],
            },
            Message::Put {
                sync: SyncRequest {
                    path: "".into(),
                    snapshots: vec![],
                    bookmarks: vec![],
                    allow_full: true,
                    dry_run: false,
                },
                from_guid: Some(4),
                to: WireSnap {
                    name: "s".into(),
                    guid: 1,
                    createtxg: 2,
                },
                finish: true,
                compressed: true,
            },
            Message::More {
                from_guid: None,
                to: WireSnap {
                    name: "s".into(),
                    guid: 1,
                    createtxg: 2,
                },
                finish: false,
                compressed: false,
            },
            Message::Finish,
            Message::Done {
                location: "p/a".into(),
                buffered: false,
                pruned: vec!["s0".into()],
            },
            Message::CleanBuffer {
                source_paths: vec!["".into(), "/a".into()],
                delete_missing: true,
                dry_run: false,
            },
            Message::CleanReport {
                placed: vec!["/a".into()],
                failed: vec![PlaceFailure {
                    path: "/b".into(),
                    reason: "busy".into(),
                }],
                orphans: vec!["/old".into()],
                deleted: vec![],
            },
            Message::Bye,
            Message::Error { reason: "x".into() },
        ]
    }

    #[test]
    fn messages_round_trip() {
        for m in all_messages() {
            let f = Frame::Msg(m);
            assert_eq!(decode(encode(&f)).unwrap(), f);
        }
        let d = Frame::Data(Bytes::from_static(b"\0\x01zfs"));
        assert_eq!(decode(encode(&d)).unwrap(), d);
    }

    #[test]
    fn the_compressed_flag_travels_only_when_set() {
        // A plain stream's announcement reads as before --compress existed
        // (an older receiver of protocol 5 refuses unknown fields), and one
        // without the flag is a plain stream.
        let more = |compressed| Message::More {
            from_guid: Some(1),
            to: WireSnap {
                name: "s".into(),
                guid: 2,
                createtxg: 3,
            },
            finish: false,
            compressed,
        };
        let plain = encode(&Frame::Msg(more(false)));
        assert!(!String::from_utf8_lossy(&plain).contains("compressed"));
        let old = br#"M{"type":"more","from_guid":1,"to":{"name":"s","guid":2,"createtxg":3},"finish":false}"#;
        assert_eq!(
            decode(Bytes::from_static(old)).unwrap(),
            Frame::Msg(more(false))
        );
        let zstd = encode(&Frame::Msg(more(true)));
        assert!(String::from_utf8_lossy(&zstd).contains(r#""compressed":true"#));
        assert_eq!(decode(zstd).unwrap(), Frame::Msg(more(true)));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for body in [
            &b""[..],
            b"M",
            b"Mnull",
            b"M{\"type\":\"nope\"}",
            b"M{\"type\":\"hello\"}",
            b"M{\"type\":\"end\",\"bytes\":1,\"extra\":1}",
            b"M{\"type\":\"end\",\"bytes\":-1}",
            b"X123",
            b"M\xff\xfe",
        ] {
            assert!(decode(Bytes::copy_from_slice(body)).is_err(), "{body:?}");
        }
    }

    #[tokio::test]
    async fn connection_over_a_pipe() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let t = Duration::from_secs(5);
        let mut a = Connection::new(a, t, t);
        let mut b = Connection::new(b, t, t);
        a.send(Message::Finish).await.unwrap();
        a.send_data(Bytes::from_static(b"abc")).await.unwrap();
        assert_eq!(b.read_msg().await.unwrap(), Message::Finish);
        assert_eq!(
            b.read().await.unwrap(),
            Some(Frame::Data(Bytes::from_static(b"abc")))
        );
        drop(a);
        assert_eq!(b.read().await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_frames_are_refused() {
        use tokio::io::AsyncWriteExt;
        let (mut a, b) = tokio::io::duplex(1 << 10);
        let t = Duration::from_secs(5);
        let mut b = Connection::new(b, t, t);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(matches!(b.read().await, Err(ProtocolError::BadFrame(_))));
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        let (_a, b) = tokio::io::duplex(1 << 10);
        let mut b = Connection::new(b, Duration::from_millis(50), Duration::from_secs(1));
        assert!(matches!(b.read().await, Err(ProtocolError::Timeout(_))));
    }
}
