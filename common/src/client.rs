//! The protocol client: one TLS connection to a receiver, used for many
//! datasets. The sender's workers use it, and so do the end-to-end tests
//! that drive a receiver step by step.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::caps::{Caps, SendPath};
use crate::model::Snapshot;
use crate::naming::RelPath;
use crate::protocol::{
    Connection, Message, PlaceFailure, ProtocolError, WireSnap, DATA_CHUNK, PROTOCOL_VERSION,
};
use crate::tls::explain_client_error;

pub type TlsConnection = Connection<TlsStream<TcpStream>>;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot reach the receiver at {addr}: {source} (is zfsync-recv running there, and is the port right?)")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr} timed out after {after:?} (is a firewall in the way?)")]
    ConnectTimeout { addr: String, after: Duration },
    #[error("{0}")]
    Tls(String),
    #[error(
        "invalid server name {0:?}: pass --server-name with the name in the receiver's certificate"
    )]
    ServerName(String),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the receiver refused: {0}")]
    Refused(String),
    #[error("reading the `zfs send` stream: {0}")]
    Source(std::io::Error),
    #[error("the receiver could not store the stream: {0}")]
    StreamFailed(String),
    #[error("protocol version mismatch: this sender speaks {ours}, the receiver {theirs}; install the same zfsync version on both")]
    Version { ours: u32, theirs: u32 },
}

impl ClientError {
    /// Did the connection itself fail (so it cannot be used again)?
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            ClientError::Protocol(
                ProtocolError::Io(_)
                    | ProtocolError::Closed
                    | ProtocolError::Timeout(_)
                    | ProtocolError::BadFrame(_)
                    | ProtocolError::Unexpected { .. }
                    | ProtocolError::Peer(_)
                    | ProtocolError::Local(_)
            )
        )
    }
}

/// Where to connect and how.
#[derive(Clone)]
pub struct ClientOptions {
    pub host: String,
    pub port: u16,
    /// The name the receiver's certificate must carry.
    pub server_name: String,
    pub tls: Arc<ClientConfig>,
    /// The same for all connections of one run.
    pub run_id: String,
    pub connect_timeout: Duration,
    /// Longest wait for the receiver's next frame (it may be finishing a
    /// large `zfs receive`).
    pub read_timeout: Duration,
    /// What the local `zfs` can do (told to the receiver in the handshake).
    pub caps: Caps,
}

pub struct Client {
    conn: TlsConnection,
    /// The receiver's `zfs` and what it can do.
    peer: Caps,
    /// The best path both ends support.
    path: SendPath,
}

/// The receiver's word on a finished dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    pub location: String,
    pub buffered: bool,
    /// Snapshots it destroyed to mirror the sender's retention.
    pub pruned: Vec<String>,
}

/// The receiver's report at the end of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanReport {
    pub placed: Vec<String>,
    pub failed: Vec<PlaceFailure>,
    pub orphans: Vec<String>,
    pub deleted: Vec<String>,
}

/// The receiver's answer to a sync request.
pub type Reply = Message;

impl Client {
    pub async fn connect(opts: &ClientOptions) -> Result<Client, ClientError> {
        let addr = format!("{}:{}", opts.host, opts.port);
        let tcp = tokio::time::timeout(opts.connect_timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| ClientError::ConnectTimeout {
                addr: addr.clone(),
                after: opts.connect_timeout,
            })?
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        crate::protocol::keepalive(&tcp);
        let name = ServerName::try_from(opts.server_name.clone())
            .map_err(|_| ClientError::ServerName(opts.server_name.clone()))?;
        let tls = tokio::time::timeout(
            opts.connect_timeout,
            TlsConnector::from(opts.tls.clone()).connect(name, tcp),
        )
        .await
        .map_err(|_| ClientError::ConnectTimeout {
            addr: addr.clone(),
            after: opts.connect_timeout,
        })?
        .map_err(|e| ClientError::Tls(explain_client_error(&e.to_string(), &opts.server_name)))?;
        let conn = Connection::new(tls, opts.read_timeout, opts.read_timeout);
        let mut client = Client {
            conn,
            peer: Caps::default(),
            path: SendPath::default(),
        };
        client
            .conn
            .send(Message::Hello {
                version: PROTOCOL_VERSION,
                run_id: opts.run_id.clone(),
                software: format!("zfsync {}", env!("CARGO_PKG_VERSION")),
                zfs: opts.caps.version.clone(),
                caps: opts.caps.names(),
            })
            .await
            .map_err(|e| tls_rejection(e, &opts.server_name))?;
        match client.conn.read_msg().await {
            Ok(Message::HelloOk {
                version, zfs, caps, ..
            }) if version == PROTOCOL_VERSION => {
                client.peer = Caps::from_names(&zfs, &caps);
                client.path = SendPath::choose(&opts.caps, &client.peer);
                Ok(client)
            }
            Ok(Message::HelloOk { version, .. }) => Err(ClientError::Version {
                ours: PROTOCOL_VERSION,
                theirs: version,
            }),
            Ok(other) => Err(unexpected(other, "hello_ok")),
            Err(e) => Err(tls_rejection(e, &opts.server_name)),
        }
    }

    /// The receiver's `zfs` and its capabilities, from the handshake.
    pub fn peer_caps(&self) -> &Caps {
        &self.peer
    }

    /// How streams travel to this receiver (flags, raw, resumable).
    pub fn path(&self) -> SendPath {
        self.path
    }

    /// The underlying connection, for tests that speak the protocol by hand.
    pub fn connection(&mut self) -> &mut TlsConnection {
        &mut self.conn
    }

    pub async fn sync(
        &mut self,
        path: &RelPath,
        snapshots: &[Snapshot],
        allow_full: bool,
    ) -> Result<Reply, ClientError> {
        self.sync_with(path, snapshots, &[], allow_full, false)
            .await
    }

    /// A sync request with the sender's bookmarks (incremental bases when
    /// the snapshot itself is gone); `dry_run` asks for the answer only.
    pub async fn sync_with(
        &mut self,
        path: &RelPath,
        snapshots: &[Snapshot],
        bookmarks: &[Snapshot],
        allow_full: bool,
        dry_run: bool,
    ) -> Result<Reply, ClientError> {
        self.conn
            .send(Message::Sync {
                path: path.as_str().to_string(),
                snapshots: snapshots.iter().map(WireSnap::from).collect(),
                bookmarks: bookmarks.iter().map(WireSnap::from).collect(),
                allow_full,
                dry_run,
            })
            .await?;
        Ok(self.conn.read_msg().await?)
    }

    /// The token of a resumable state could not be used here: the receiver
    /// discards the state and answers as for the sync request.
    pub async fn resume_failed(&mut self, reason: &str) -> Result<Reply, ClientError> {
        self.conn
            .send(Message::ResumeFailed {
                reason: reason.to_string(),
            })
            .await?;
        Ok(self.conn.read_msg().await?)
    }

    /// The receiver's answer without any effect on it (`--dry-run`).
    pub async fn plan(
        &mut self,
        path: &RelPath,
        snapshots: &[Snapshot],
        allow_full: bool,
    ) -> Result<Reply, ClientError> {
        self.sync_with(path, snapshots, &[], allow_full, true).await
    }

    /// Announces a stream; the receiver checks it before any data flows.
    pub async fn begin_stream(
        &mut self,
        from_guid: Option<u64>,
        to: &Snapshot,
    ) -> Result<(), ClientError> {
        self.begin(from_guid, to, false).await
    }

    /// Announces the continuation of a cut stream (`zfs send -t`).
    pub async fn begin_resume(
        &mut self,
        from_guid: Option<u64>,
        to: &Snapshot,
    ) -> Result<(), ClientError> {
        self.begin(from_guid, to, true).await
    }

    async fn begin(
        &mut self,
        from_guid: Option<u64>,
        to: &Snapshot,
        resume: bool,
    ) -> Result<(), ClientError> {
        self.conn
            .send(Message::Stream {
                from_guid,
                to: WireSnap::from(to),
                resume,
            })
            .await?;
        match self.conn.read_msg().await? {
            Message::Ready => Ok(()),
            Message::StreamFailed { reason } => Err(ClientError::StreamFailed(reason)),
            other => Err(unexpected(other, "ready")),
        }
    }

    /// Copies `reader` to the receiver as data frames until EOF; returns
    /// the byte count. `progress` is called with the running total.
    pub async fn pump<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, ClientError> {
        let mut total = 0u64;
        loop {
            let mut buf = BytesMut::with_capacity(DATA_CHUNK);
            // Whole chunks: fewer frames and TLS records. A slow source only
            // delays the chunk; the receiver's idle timeout is minutes.
            while buf.len() < DATA_CHUNK {
                let n = reader
                    .read_buf(&mut buf)
                    .await
                    .map_err(ClientError::Source)?;
                if n == 0 {
                    break;
                }
            }
            if buf.is_empty() {
                return Ok(total);
            }
            total += buf.len() as u64;
            self.conn.send_data(buf.freeze()).await?;
            progress(total);
        }
    }

    /// Declares the stream whole; the receiver commits it and answers.
    pub async fn end_stream(&mut self, bytes: u64) -> Result<u64, ClientError> {
        self.conn.send(Message::End { bytes }).await?;
        match self.conn.read_msg().await? {
            Message::Received { bytes } => Ok(bytes),
            Message::StreamFailed { reason } => Err(ClientError::StreamFailed(reason)),
            other => Err(unexpected(other, "received")),
        }
    }

    /// Tells the receiver the stream failed on this side: it must not be
    /// committed.
    pub async fn abort_stream(&mut self, reason: &str) -> Result<(), ClientError> {
        self.conn
            .send(Message::Abort {
                reason: reason.to_string(),
            })
            .await?;
        match self.conn.read_msg().await? {
            Message::StreamFailed { .. } => Ok(()),
            other => Err(unexpected(other, "stream_failed")),
        }
    }

    /// Ends the dataset.
    pub async fn finish(&mut self) -> Result<Finished, ClientError> {
        self.conn.send(Message::Finish).await?;
        match self.conn.read_msg().await? {
            Message::Done {
                location,
                buffered,
                pruned,
            } => Ok(Finished {
                location,
                buffered,
                pruned,
            }),
            Message::Refused { reason, .. } => Err(ClientError::Refused(reason)),
            other => Err(unexpected(other, "done")),
        }
    }

    /// Places buffered datasets and reports orphans (see
    /// [`Message::CleanBuffer`]).
    pub async fn clean_buffer(
        &mut self,
        source_paths: Vec<String>,
        delete_missing: bool,
        dry_run: bool,
    ) -> Result<CleanReport, ClientError> {
        self.conn
            .send(Message::CleanBuffer {
                source_paths,
                delete_missing,
                dry_run,
            })
            .await?;
        match self.conn.read_msg().await? {
            Message::CleanReport {
                placed,
                failed,
                orphans,
                deleted,
            } => Ok(CleanReport {
                placed,
                failed,
                orphans,
                deleted,
            }),
            Message::Refused { reason, .. } => Err(ClientError::Refused(reason)),
            other => Err(unexpected(other, "clean_report")),
        }
    }

    pub async fn bye(mut self) {
        let _ = self.conn.send(Message::Bye).await;
    }
}

fn unexpected(got: Message, expected: &str) -> ClientError {
    ClientError::Protocol(ProtocolError::Unexpected {
        got: format!("message {}", got.name()),
        expected: expected.to_string(),
    })
}

/// With TLS 1.3 a rejected client certificate shows up on the first read
/// or write after the handshake, not in the handshake itself.
fn tls_rejection(e: ProtocolError, server_name: &str) -> ClientError {
    match e {
        ProtocolError::Io(io) => ClientError::Tls(explain_client_error(&io.to_string(), server_name)),
        ProtocolError::BadFrame(msg) if msg.contains("alert") => {
            ClientError::Tls(explain_client_error(&msg, server_name))
        }
        ProtocolError::Peer(reason) => ClientError::Refused(reason),
        ProtocolError::Closed => ClientError::Tls(
            "the receiver closed the connection right after the TLS handshake: it rejected this sender's certificate (sign it with the CA the receiver trusts, its --ca) or its name is not in the receiver's --allow-client".to_string(),
        ),
        other => ClientError::Protocol(other),
    }
}
