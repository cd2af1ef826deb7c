//! One `zfs send` piped to the receiver: announce the stream, pump its
//! bytes as data frames, end it with the byte count. On any failure on
//! this side (and when the run is stopped) the `zfs send` is aborted and
//! the receiver told with `abort_stream`, so a cut stream is never
//! committed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use zfsync_common::client::{Client, ClientError, Finished, Pumped};
use zfsync_common::naming::SnapshotName;
use zfsync_common::plan::Step;
use zfsync_common::protocol::{EagerStream, SyncRequest, WireSnap};
use zfsync_common::zfs::{Dataset, SendFrom, SendWhat, Snapshot, ZfsBackend};

use crate::error::{DatasetError, StreamFailure};
use crate::report::{human_bytes, on_the_wire};

/// What the receiver is told when the run is stopped mid-stream.
const STOPPED: &str = "the sender's run was stopped";

/// How a stream is announced.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Announce<'a> {
    /// `Stream`, then wait for `Ready` (a resumed stream).
    Checked,
    /// `Put`: the dataset's sync request with its first stream; the data
    /// follows at once.
    Put(&'a SyncRequest),
    /// `More`: the open dataset's next stream, data at once.
    More,
}

/// How a stream is ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// `End`, answered `Received` (not the dataset's last stream, or a
    /// checked one).
    Stored,
    /// The dataset's last eager stream: `End` also finishes it, answered
    /// `Done`.
    Finish,
    /// As `Finish`, but the answer is read later
    /// ([`Client::owed_reply`]): the next dataset goes out meanwhile.
    Defer,
}

/// What a sent stream brought.
#[derive(Debug, Default)]
pub(crate) struct Sent {
    /// The stream's bytes.
    pub bytes: u64,
    /// Its data frames' bytes on the wire (fewer with `--compress`).
    pub wire: u64,
    /// The receiver's word on the dataset, when this stream finished it.
    pub finished: Option<Finished>,
}

/// One stream to send.
pub(crate) struct Outgoing<'a> {
    /// The snapshot it ends at, for the log.
    pub to: &'a SnapshotName,
    pub what: &'a SendWhat,
    pub flags: &'a [&'a str],
    /// The base, announced to the receiver (none for a full stream).
    pub from_guid: Option<u64>,
    pub to_snap: &'a Snapshot,
    /// The continuation of a cut stream (`zfs send -t`), announced
    /// [`Announce::Checked`].
    pub resume: bool,
    pub announce: Announce<'a>,
    /// [`Ending::Stored`] for a checked announcement.
    pub ending: Ending,
}

/// Sends one step of a dataset's plan, announced as `announce`, ended as
/// `ending`.
pub(crate) async fn send_step(
    client: &mut Client,
    zfs: &dyn ZfsBackend,
    dataset: &Dataset,
    step: &Step<'_>,
    (announce, ending): (Announce<'_>, Ending),
    shutdown: &CancellationToken,
) -> Result<Sent, DatasetError> {
    let to = dataset
        .name
        .snapshot(&step.to.name)
        .map_err(DatasetError::Name)?;
    let from = match step.from {
        Some(f) if step.from_bookmark => {
            Some(SendFrom::Bookmark(format!("{}#{}", dataset.name, f.name)))
        }
        Some(f) => Some(SendFrom::Snapshot(
            dataset.name.snapshot(&f.name).map_err(DatasetError::Name)?,
        )),
        None => None,
    };
    let flags = client.path().send_flags(dataset.encrypted);
    let what = SendWhat::Snapshot {
        from,
        to: to.clone(),
    };
    let out = Outgoing {
        to: &to,
        what: &what,
        flags: &flags,
        from_guid: step.from.map(|f| f.guid),
        to_snap: step.to,
        resume: false,
        announce,
        ending,
    };
    pipe(client, zfs, &out, shutdown).await
}

/// Announces a stream, pipes `zfs send` into it and ends it; returns the
/// bytes sent (and the receiver's word on the dataset when the stream
/// finished it). A stop (`shutdown`) is seen between data frames: the
/// `zfs send` is killed, the receiver told, and the answer is
/// [`DatasetError::Cancelled`]. `zfs send` starts before an eager
/// announcement goes out, so a send that cannot start costs no round
/// trip; a checked one waits for `Ready` first.
pub(crate) async fn pipe(
    client: &mut Client,
    zfs: &dyn ZfsBackend,
    out: &Outgoing<'_>,
    shutdown: &CancellationToken,
) -> Result<Sent, DatasetError> {
    let finish = out.ending != Ending::Stored;
    let eager = |finish| EagerStream {
        from_guid: out.from_guid,
        to: WireSnap::from(out.to_snap),
        finish,
        // Set by the client, from the connection.
        compressed: false,
    };
    if let Announce::Checked = out.announce {
        let announced = if out.resume {
            client.begin_resume(out.from_guid, out.to_snap).await
        } else {
            client.begin_stream(out.from_guid, out.to_snap).await
        };
        announced.map_err(DatasetError::Connection)?;
    }
    let spawned = zfs.spawn_send(out.what, out.flags);
    let announced = match (out.announce, &spawned) {
        (Announce::Checked, _) | (_, Err(_)) => Ok(()),
        (Announce::Put(sync), Ok(_)) => client.put(sync, eager(finish)).await,
        (Announce::More, Ok(_)) => client.more(eager(finish)).await,
    };
    if let Err(e) = announced {
        if let Ok(mut child) = spawned {
            child.abort().await;
        }
        return Err(DatasetError::Connection(e));
    }
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            // An eager stream was not announced: nothing to tell.
            if let Announce::Checked = out.announce {
                let _ = client.abort_stream(&e.to_string()).await;
            }
            return Err(DatasetError::Zfs(e));
        }
    };
    let started = Instant::now();
    let to = out.to;
    tracing::info!(%to, argv = %child.argv(), "sending");
    let Some(stdout) = child.take_stdout() else {
        child.abort().await;
        let _ = client.abort_stream("zfs send has no stdout").await;
        return Err(DatasetError::Stream {
            failure: StreamFailure::NoStdout,
            connection_lost: false,
        });
    };
    let mut stdout = UntilStopped::new(stdout, shutdown.clone());
    let pumped = client.pump_counted(&mut stdout, |_| {}).await;
    drop(stdout);
    let Pumped { bytes, wire } = match pumped {
        Ok(p) => p,
        Err(ClientError::Source(e)) => {
            child.abort().await;
            if shutdown.is_cancelled() {
                tracing::warn!(%to, "the run was stopped: aborting the stream (the receiver discards it)");
                let _ = client.abort_stream(STOPPED).await;
                return Err(DatasetError::Cancelled);
            }
            let failure = StreamFailure::Read(e);
            let told = client.abort_stream(&failure.to_string()).await;
            return Err(DatasetError::Stream {
                failure,
                connection_lost: told.is_err_and(|e| e.is_connection_lost()),
            });
        }
        Err(e) => {
            child.abort().await;
            return Err(DatasetError::Connection(e));
        }
    };
    if let Err(e) = child.close().await {
        // A stop by SIGINT from a terminal reaches `zfs send` too: it
        // dies, and its stream is just as cut.
        let reason = if shutdown.is_cancelled() {
            STOPPED.to_string()
        } else {
            e.to_string()
        };
        let told = client.abort_stream(&reason).await;
        if shutdown.is_cancelled() {
            return Err(DatasetError::Cancelled);
        }
        return Err(DatasetError::Stream {
            failure: StreamFailure::Exit(e),
            connection_lost: told.is_err_and(|e| e.is_connection_lost()),
        });
    }
    let finished = match out.ending {
        Ending::Finish => Some(
            client
                .end_landed(bytes)
                .await
                .map_err(DatasetError::Connection)?,
        ),
        Ending::Defer => {
            client
                .end_deferred(bytes)
                .await
                .map_err(DatasetError::Connection)?;
            None
        }
        Ending::Stored => {
            client
                .end_stream(bytes)
                .await
                .map_err(DatasetError::Connection)?;
            None
        }
    };
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    let rate = human_bytes((bytes as f64 / secs) as u64);
    if client.compressing() {
        tracing::info!(%to, bytes, wire, "sent {} in {secs:.1} s ({rate}/s), {}", human_bytes(bytes), on_the_wire(bytes, wire));
    } else {
        tracing::info!(%to, bytes, "sent {} in {secs:.1} s ({rate}/s)", human_bytes(bytes));
    }
    Ok(Sent {
        bytes,
        wire,
        finished,
    })
}

/// A reader that fails once the run is stopped. [`Client::pump`] reads
/// between data frames only, so the stop ends the stream at a frame
/// boundary: the connection stays usable to tell the receiver.
struct UntilStopped<R> {
    inner: R,
    token: CancellationToken,
    /// Woken when the token is cancelled, so that a read waiting on a slow
    /// `zfs send` ends at once.
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<R> UntilStopped<R> {
    fn new(inner: R, token: CancellationToken) -> Self {
        UntilStopped {
            inner,
            stopped: Box::pin(token.clone().cancelled_owned()),
            token,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for UntilStopped<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.token.is_cancelled() || this.stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::other(STOPPED)));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn a_stop_ends_a_waiting_read() {
        let token = CancellationToken::new();
        // A source that never yields (a stalled `zfs send`).
        let (_keep, never) = tokio::io::duplex(64);
        let mut r = UntilStopped::new(never, token.clone());
        let stop = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            stop.cancel();
        });
        let mut buf = [0u8; 8];
        let err = tokio::time::timeout(std::time::Duration::from_secs(5), r.read(&mut buf))
            .await
            .expect("the read ends when the run is stopped")
            .unwrap_err();
        assert_eq!(err.to_string(), STOPPED);
    }

    #[tokio::test]
    async fn reads_pass_through_until_stopped() {
        let token = CancellationToken::new();
        let mut r = UntilStopped::new(&b"abc"[..], token.clone());
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"abc");
        token.cancel();
        let mut r = UntilStopped::new(&b"abc"[..], token);
        assert!(r.read(&mut [0u8; 4]).await.is_err());
    }
}
