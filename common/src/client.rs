//! The protocol client: one TLS connection to a receiver, used for many
//! datasets. The sender's workers use it, and so do the end-to-end tests
//! that drive a receiver step by step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::caps::{Caps, SendPath};
use crate::compress::Deflater;
use crate::model::Snapshot;
use crate::protocol::{
    handshake, CleanReply, CleanRequest, Connection, EagerStream, FinishReply, Landed, Message,
    PlanReply, ProtocolError, Request, Stored, StreamReply, StreamRequest, SyncReply, SyncRequest,
    WireSnap, DATA_CHUNK,
};
pub use crate::protocol::{CleanReport, Finished};
use crate::throttle::{Bucket, Rate};
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
    /// Not stored this time, worth sending again (the replica had changed
    /// and was rolled back, say).
    #[error("the receiver could not store the stream: {0}")]
    TryAgain(String),
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
    /// How data frames travel (`--compress`, `--bwlimit`).
    pub transit: Transit,
}

/// How data frames travel, the same for every connection of a run.
#[derive(Clone, Debug, Default)]
pub struct Transit {
    /// Compress streams with zstd at this level (`--compress`), where the
    /// receiver can decompress them.
    pub compress: Option<i32>,
    /// The run's bandwidth limit (`--bwlimit`): one bucket shared by every
    /// connection.
    pub bwlimit: Option<Arc<Bucket>>,
    /// Set once a receiver was found that cannot decompress: the run says
    /// so once, not once per connection.
    told_plain: Arc<AtomicBool>,
}

impl Transit {
    /// Compress at `compress`'s level (none: plain), within `bwlimit`.
    pub fn new(compress: Option<i32>, bwlimit: Option<Rate>) -> Transit {
        Transit {
            compress,
            bwlimit: bwlimit.map(|r| Arc::new(Bucket::new(r))),
            told_plain: Arc::default(),
        }
    }

    /// A receiver cannot decompress: streams go plain (said once a run).
    fn plain_to(&self, addr: &str, software: &str) {
        if !self.told_plain.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "--compress: the receiver at {addr} ({software}) cannot decompress streams; sending them uncompressed (update zfsync there to compress)"
            );
        }
    }
}

/// What [`Client::pump_counted`] sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pumped {
    /// The stream's bytes (what `End{bytes}` declares).
    pub bytes: u64,
    /// The data frames' bytes on the wire (fewer when compressed).
    pub wire: u64,
}

pub struct Client {
    conn: TlsConnection,
    /// Answers the receiver owes for streams ended with
    /// [`Client::end_deferred`], not read yet.
    owed: usize,
    /// Owed answers read early (another request's answer came after
    /// them), oldest first, until [`Client::owed_reply`] takes them.
    early: std::collections::VecDeque<Result<Message, ProtocolError>>,
    /// The receiver's `zfs` and what it can do.
    peer: Caps,
    /// The best path both ends support.
    path: SendPath,
    /// The zstd level streams are compressed with on this connection (the
    /// receiver can decompress them).
    zstd: Option<i32>,
    /// Made at the first compressed frame, then reused.
    deflater: Option<Deflater>,
    /// The run's bandwidth limit, shared with its other connections.
    bucket: Option<Arc<Bucket>>,
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
        let welcomed = match handshake::client(&mut conn, &opts.run_id, &opts.caps).await {
            Ok(w) => w,
            Err(ProtocolError::Version { ours, theirs }) => {
                return Err(ClientError::Version { ours, theirs })
            }
            Err(e) => return Err(tls_rejection(e, &opts.server_name)),
        };
        let zstd = match opts.transit.compress {
            Some(level) if welcomed.zstd => Some(level),
            Some(_) => {
                opts.transit.plain_to(&addr, &welcomed.caps.version);
                None
            }
            None => None,
        };
        Ok(Client {
            conn,
            owed: 0,
            early: Default::default(),
            path: SendPath::choose(&opts.caps, &welcomed.caps),
            peer: welcomed.caps,
            zstd,
            deflater: None,
            bucket: opts.transit.bwlimit.clone(),
        })
    }

    /// Streams on this connection are compressed (`--compress`, and the
    /// receiver can decompress).
    pub fn compressing(&self) -> bool {
        self.zstd.is_some()
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
        Ok(R::try_from(self.read_reply().await?)?)
    }

    /// The answer to the latest request: the answers still owed for
    /// earlier streams come first on the wire and are kept for
    /// [`Client::owed_reply`].
    async fn read_reply(&mut self) -> Result<Message, ProtocolError> {
        while self.owed > 0 {
            let m = self.conn.read_msg().await;
            let lost = m.is_err();
            self.early.push_back(m);
            self.owed -= 1;
            if lost {
                return Err(ProtocolError::Closed);
            }
        }
        self.conn.read_msg().await
    }

    /// Ends a dataset's last eager stream without waiting for the answer
    /// (it is read later with [`Client::owed_reply`]): the next dataset's
    /// stream goes out meanwhile, so a dataset costs no round trip.
    pub async fn end_deferred(&mut self, bytes: u64) -> Result<(), ClientError> {
        self.conn.send(Message::End { bytes }).await?;
        self.owed += 1;
        Ok(())
    }

    /// The oldest owed answer, as [`Client::end_landed`] gives it.
    pub async fn owed_reply(&mut self) -> Result<Finished, ClientError> {
        let m = match self.early.pop_front() {
            Some(m) => m,
            None if self.owed > 0 => {
                self.owed -= 1;
                self.conn.read_msg().await
            }
            None => {
                return Err(ClientError::Protocol(ProtocolError::Local(
                    "internal error: no answer is owed".into(),
                )))
            }
        };
        landed(Landed::try_from(m?)?)
    }

    /// Asks what a dataset needs (`dry_run`: the answer only, with no
    /// effect on the receiver).
    pub async fn sync(&mut self, req: &SyncRequest) -> Result<SyncReply, ClientError> {
        self.ask(Request::Sync(req.clone())).await
    }

    /// What every dataset of `items` needs, in one request and one answer
    /// (no effect on the receiver: nothing is locked or opened). The
    /// answers are in the order of `items`.
    pub async fn plan(&mut self, items: Vec<SyncRequest>) -> Result<PlanReply, ClientError> {
        let asked = items.len();
        let reply: PlanReply = self.ask(Request::Plan(items)).await?;
        if let PlanReply::Answers(a) = &reply {
            if a.len() != asked {
                return Err(ClientError::Protocol(ProtocolError::Unexpected {
                    got: format!("{} answers", a.len()),
                    expected: format!("{asked} answers, one per dataset"),
                }));
            }
        }
        Ok(reply)
    }

    /// Opens a dataset and starts its first stream in one message
    /// (`Put`); pump the data at once, then end with [`Client::end_stream`]
    /// or, for the dataset's last stream, [`Client::end_landed`].
    /// `stream.compressed` is set here, from the connection.
    pub async fn put(
        &mut self,
        sync: &SyncRequest,
        mut stream: EagerStream,
    ) -> Result<(), ClientError> {
        stream.compressed = self.compressing();
        Ok(self
            .conn
            .send(Request::Put(sync.clone(), stream).into())
            .await?)
    }

    /// Starts the open dataset's next stream (`More`), data at once
    /// (`stream.compressed` set as for [`Client::put`]).
    pub async fn more(&mut self, mut stream: EagerStream) -> Result<(), ClientError> {
        stream.compressed = self.compressing();
        Ok(self.conn.send(Request::More(stream).into()).await?)
    }

    /// Ends a dataset's last eager stream: the receiver stores it and
    /// finishes the dataset.
    pub async fn end_landed(&mut self, bytes: u64) -> Result<Finished, ClientError> {
        self.conn.send(Message::End { bytes }).await?;
        landed(Landed::try_from(self.read_reply().await?)?)
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
            compressed: self.compressing(),
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
        progress: impl FnMut(u64),
    ) -> Result<u64, ClientError> {
        Ok(self.pump_counted(reader, progress).await?.bytes)
    }

    /// [`Client::pump`], counting the bytes on the wire too. Each chunk
    /// is compressed into one zstd frame when the connection compresses,
    /// and waits for the run's bandwidth limit before it goes out.
    pub async fn pump_counted<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        mut progress: impl FnMut(u64),
    ) -> Result<Pumped, ClientError> {
        let chunk = self.bucket.as_ref().map_or(DATA_CHUNK, |b| b.chunk());
        let mut sent = Pumped::default();
        loop {
            let mut buf = BytesMut::with_capacity(chunk);
            // Whole chunks: fewer frames and TLS records. A slow source only
            // delays the chunk; the receiver's idle timeout is minutes.
            while buf.len() < chunk {
                let n = reader
                    .read_buf(&mut buf)
                    .await
                    .map_err(ClientError::Source)?;
                if n == 0 {
                    break;
                }
            }
            if buf.is_empty() {
                return Ok(sent);
            }
            sent.bytes += buf.len() as u64;
            let frame = self.deflate(buf).await?;
            sent.wire += frame.len() as u64;
            if let Some(bucket) = &self.bucket {
                bucket.take(frame.len()).await;
            }
            self.conn.send_data(frame).await?;
            progress(sent.bytes);
        }
    }

    /// A chunk as it goes on the wire: one zstd frame when the connection
    /// compresses (off the async threads: high levels take a while).
    async fn deflate(&mut self, chunk: BytesMut) -> Result<Bytes, ClientError> {
        let Some(level) = self.zstd else {
            return Ok(chunk.freeze());
        };
        let failed = |e: std::io::Error| {
            ClientError::Source(std::io::Error::other(format!("compressing it: {e}")))
        };
        let mut deflater = match self.deflater.take() {
            Some(d) => d,
            None => Deflater::new(level).map_err(failed)?,
        };
        let (deflater, frame) = tokio::task::spawn_blocking(move || {
            let frame = deflater.compress(&chunk);
            (deflater, frame)
        })
        .await
        .map_err(|e| failed(std::io::Error::other(e)))?;
        self.deflater = Some(deflater);
        Ok(Bytes::from(frame.map_err(failed)?))
    }

    /// Declares the stream whole; the receiver commits it and answers.
    pub async fn end_stream(&mut self, bytes: u64) -> Result<u64, ClientError> {
        self.conn.send(Message::End { bytes }).await?;
        match Stored::try_from(self.read_reply().await?)? {
            Stored::Received { bytes } => Ok(bytes),
            Stored::Failed {
                reason,
                temporary: true,
            } => Err(ClientError::TryAgain(reason)),
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
        match Stored::try_from(self.read_reply().await?)? {
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

/// The answer to a dataset's last stream, as the caller sees it.
fn landed(l: Landed) -> Result<Finished, ClientError> {
    match l {
        Landed::Done(f) => Ok(f),
        Landed::Failed {
            reason,
            temporary: true,
        } => Err(ClientError::TryAgain(reason)),
        Landed::Failed { reason, .. } => Err(ClientError::StreamFailed(reason)),
        Landed::Refused { reason, .. } => Err(ClientError::Refused(reason)),
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
