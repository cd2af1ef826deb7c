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
use crate::protocol::{
    handshake, CleanReply, CleanRequest, Connection, FinishReply, Message, ProtocolError, Request,
    Stored, StreamReply, StreamRequest, SyncReply, SyncRequest, WireSnap, DATA_CHUNK,
};
pub use crate::protocol::{CleanReport, Finished};
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
    /// The receiver could not store the stream now, but will the next
    /// time (it dropped changes made inside its replica): sent again in
    /// the same run.
    #[error("the receiver could not store the stream: {0}")]
    StreamRetry(String),
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
        let mut conn = Connection::new(tls, opts.read_timeout, opts.read_timeout);
        let peer = match handshake::client(&mut conn, &opts.run_id, &opts.caps).await {
            Ok(peer) => peer,
            Err(ProtocolError::Version { ours, theirs }) => {
                return Err(ClientError::Version { ours, theirs })
            }
            Err(e) => return Err(tls_rejection(e, &opts.server_name)),
        };
        Ok(Client {
            conn,
            path: SendPath::choose(&opts.caps, &peer),
            peer,
        })
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

    /// Sends a request and reads its typed answer.
    async fn ask<R: TryFrom<Message, Error = ProtocolError>>(
        &mut self,
        req: Request,
    ) -> Result<R, ClientError> {
        self.conn.send(req.into()).await?;
        Ok(R::try_from(self.conn.read_msg().await?)?)
    }

    /// Asks what a dataset needs (`dry_run`: the answer only, with no
    /// effect on the receiver).
    pub async fn sync(&mut self, req: &SyncRequest) -> Result<SyncReply, ClientError> {
        self.ask(Request::Sync(req.clone())).await
    }

    /// The token of a resumable state could not be used here: the receiver
    /// discards the state and answers as for the sync request.
    pub async fn resume_failed(&mut self, reason: &str) -> Result<SyncReply, ClientError> {
        self.ask(Request::ResumeFailed {
            reason: reason.to_string(),
        })
        .await
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
        let req = Request::Stream(StreamRequest {
            from_guid,
            to: WireSnap::from(to),
            resume,
        });
        match self.ask(req).await? {
            StreamReply::Ready => Ok(()),
            StreamReply::Failed { reason } => Err(ClientError::StreamFailed(reason)),
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
        match Stored::try_from(self.conn.read_msg().await?)? {
            Stored::Received { bytes } => Ok(bytes),
            Stored::Failed {
                reason,
                temporary: true,
            } => Err(ClientError::StreamRetry(reason)),
            Stored::Failed { reason, .. } => Err(ClientError::StreamFailed(reason)),
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
        match Stored::try_from(self.conn.read_msg().await?)? {
            Stored::Failed { .. } => Ok(()),
            Stored::Received { .. } => Err(ClientError::Protocol(ProtocolError::Unexpected {
                got: "received".into(),
                expected: "stream_failed".into(),
            })),
        }
    }

    /// Ends the dataset.
    pub async fn finish(&mut self) -> Result<Finished, ClientError> {
        match self.ask(Request::Finish).await? {
            FinishReply::Done(f) => Ok(f),
            FinishReply::Refused { reason, .. } => Err(ClientError::Refused(reason)),
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
        let req = Request::CleanBuffer(CleanRequest {
            source_paths,
            delete_missing,
            dry_run,
        });
        match self.ask(req).await? {
            CleanReply::Report(r) => Ok(r),
            CleanReply::Refused { reason } => Err(ClientError::Refused(reason)),
        }
    }

    pub async fn bye(mut self) {
        let _ = self.conn.send(Request::Bye.into()).await;
    }
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
