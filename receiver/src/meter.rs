//! Frames read under the receiver's memory budget: a large frame is
//! charged before it is buffered, so that strangers' or a hostile sender's
//! huge messages cannot take the receiver's memory. [`Metered`] sits under
//! the protocol [`Connection`](zfsync_common::protocol::Connection) and
//! passes frames on unchanged; a message frame over [`SMALL_FRAME`] is
//! passed on only if the budget has room for what decoding it takes
//! (estimated by [`Scan`]), else it is read past unbuffered and the session
//! learns why from [`Metered::dropped`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use zfsync_common::protocol::MAX_FRAME;

use crate::state::{MemoryBudget, Reservation};

/// Message frames up to this size are read without asking the budget:
/// decoding one takes at most about 40 times its size, 2.5 MiB.
const SMALL_FRAME: usize = 64 << 10;
/// Data frames up to this size are read without asking the budget (the
/// sender's are 256 KiB); they are not decoded.
pub(crate) const SMALL_DATA: usize = 1 << 20;
/// The kind byte of a message frame (see `zfsync_common::protocol`); other
/// kinds (data) are not decoded.
const KIND_MSG: u8 = b'M';
/// Passed on in place of a message frame that was read past: the session
/// learns why from [`Metered::dropped`], never from this message.
const STAND_IN: &[u8] = b"M{\"type\":\"bye\"}";

/// A large message frame that was read past, unbuffered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dropped {
    /// The frame's length.
    pub(crate) len: usize,
    /// What reading and decoding it would have taken (estimated).
    pub(crate) need: usize,
    /// The whole budget is too small for it: refused for good.
    pub(crate) forever: bool,
}

impl Dropped {
    /// The refusal's text.
    pub(crate) fn reason(&self, budget: &MemoryBudget) -> String {
        if self.forever {
            format!(
                "a request of {} bytes needs about {} bytes of memory to read, more than the receiver's whole memory budget ({} bytes, --memory-budget); send fewer snapshots per dataset",
                self.len,
                self.need,
                budget.total()
            )
        } else {
            format!(
                "the receiver's memory budget is in use by other requests ({} of {} bytes); a request of {} bytes needs about {} bytes to read; try again later",
                budget.used(),
                budget.total(),
                self.len,
                self.need
            )
        }
    }
}

/// Counts what decoding a JSON message allocates at its peak: every value
/// (a slot of the decoder's buffered tree, doubled by vector growth, and
/// its typed form) and every string (an allocation each), over the frame.
#[derive(Debug, Default)]
struct Scan {
    in_string: bool,
    escaped: bool,
    /// Upper bound of the JSON values: each but the first follows a `,`,
    /// `:`, `[` or `{` outside a string.
    values: usize,
    strings: usize,
}

impl Scan {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    self.strings += 1;
                }
                b',' | b':' | b'[' | b'{' => self.values += 1,
                _ => {}
            }
        }
    }

    /// Bytes the frame (`len`, its body scanned) may take at its peak: our
    /// copy, the codec's, the strings' bytes, and per value and string.
    /// About twice what the decoder was measured to take (see the tests).
    fn cost(&self, len: usize) -> usize {
        3 * len + 64 * (self.values + 1) + 32 * self.strings + SMALL_FRAME
    }
}

/// Where [`Metered`] is within the peer's frames.
#[derive(Debug)]
enum Meter {
    /// Reading a frame's length (4 bytes) and kind (1 byte).
    Head { head: [u8; 5], have: usize },
    /// Passing on `out[pos..]` (a held-back header, a collected frame, or a
    /// stand-in), then `body` bytes straight from the peer.
    Out {
        out: Vec<u8>,
        pos: usize,
        body: usize,
    },
    /// Collecting a large message frame (`len` bytes after the length;
    /// `frame` has the header) to count what decoding it takes, under a
    /// reservation of its size.
    Collect {
        frame: Vec<u8>,
        len: usize,
        scan: Scan,
        charge: Reservation,
    },
    /// Reading past a large message frame the budget had no room for.
    Skip { left: usize, len: usize, scan: Scan },
}

impl Default for Meter {
    fn default() -> Self {
        Meter::Head {
            head: [0; 5],
            have: 0,
        }
    }
}

/// The peer's bytes on their way to the frame codec. A frame's 16 MiB
/// limit bounds its bytes, not what decoding it takes (the JSON decoder
/// buffers a message as a tree first: up to 20 times its size), so a large
/// message frame is collected here and passed on only when the memory
/// budget has room for what decoding it takes; otherwise it is read past
/// without being kept and a stand-in is passed on, for the session to
/// refuse it. Large data frames are charged their size.
pub struct Metered<S> {
    inner: S,
    pub(crate) budget: Arc<MemoryBudget>,
    state: Meter,
    /// What the frame just passed on was granted (its decoding, and while
    /// its request is served); taken with the frame.
    pub(crate) admitted: Option<Reservation>,
    /// The frame just passed on is a stand-in for this one.
    pub(crate) dropped: Option<Dropped>,
    /// The codec keeps the buffer of the largest frame it read, for the
    /// connection's life: charged here.
    codec_buffer: Option<Reservation>,
}

impl<S> Metered<S> {
    pub fn new(inner: S, budget: Arc<MemoryBudget>) -> Self {
        Metered {
            inner,
            budget,
            state: Meter::default(),
            admitted: None,
            dropped: None,
            codec_buffer: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves what the codec's buffer needs for a frame of `len` bytes from
    /// `charge` to the connection's lasting charge (only its growth).
    fn keep_codec_buffer(&mut self, charge: &mut Reservation, len: usize) {
        let kept = self.codec_buffer.as_ref().map_or(0, Reservation::bytes);
        if len > kept {
            let grow = (len - kept).min(charge.bytes());
            let moved = charge.split_off(grow);
            match &mut self.codec_buffer {
                Some(r) => r.merge(moved),
                None => self.codec_buffer = Some(moved),
            }
        }
    }

    /// What becomes of a frame whose header is read.
    fn admit(&mut self, head: [u8; 5], len: usize) -> io::Result<Meter> {
        let kind = head[4];
        let small = if kind == KIND_MSG {
            SMALL_FRAME
        } else {
            SMALL_DATA
        };
        if len <= small {
            return Ok(pass(&head, len));
        }
        if kind != KIND_MSG {
            // Not decoded: the frame, and the codec's next buffer while
            // `zfs receive` is fed one frame behind.
            let Some(mut charge) = self.budget.try_reserve(2 * (4 + len)) else {
                return Err(io::Error::other(format!(
                    "a data frame of {len} bytes does not fit in the receiver's memory budget now"
                )));
            };
            self.keep_codec_buffer(&mut charge, 4 + len);
            self.admitted = Some(charge);
            return Ok(pass(&head, len));
        }
        Ok(match self.budget.try_reserve(4 + len) {
            Some(charge) => {
                let mut frame = Vec::with_capacity(4 + len);
                frame.extend_from_slice(&head);
                Meter::Collect {
                    frame,
                    len,
                    scan: Scan::default(),
                    charge,
                }
            }
            None => Meter::Skip {
                left: len - 1,
                len,
                scan: Scan::default(),
            },
        })
    }

    /// A frame read past: remembered, and a stand-in passed on.
    fn stand_in(&mut self, len: usize, scan: &Scan) -> Meter {
        let need = scan.cost(len);
        self.dropped = Some(Dropped {
            len,
            need,
            forever: need > self.budget.total(),
        });
        let mut out = (STAND_IN.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(STAND_IN);
        Meter::Out {
            out,
            pos: 0,
            body: 0,
        }
    }
}

/// A frame passed on as it comes: its held-back header, then its body.
fn pass(head: &[u8; 5], len: usize) -> Meter {
    Meter::Out {
        out: head.to_vec(),
        pos: 0,
        body: len - 1,
    }
}

/// Reads from `inner` into `dst`; `None` while pending.
fn read_into<S: AsyncRead + Unpin>(
    inner: &mut S,
    cx: &mut Context<'_>,
    dst: &mut [u8],
) -> Option<io::Result<usize>> {
    let mut rb = ReadBuf::new(dst);
    match Pin::new(inner).poll_read(cx, &mut rb) {
        Poll::Pending => None,
        Poll::Ready(Err(e)) => Some(Err(e)),
        Poll::Ready(Ok(())) => Some(Ok(rb.filled().len())),
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut chunk = [0u8; 16 << 10];
        loop {
            match std::mem::take(&mut this.state) {
                Meter::Head { mut head, have } => {
                    if have >= 4 {
                        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
                        if len == 0 || len > MAX_FRAME {
                            // The codec refuses it, as ever.
                            this.state = Meter::Out {
                                out: head[..4].to_vec(),
                                pos: 0,
                                body: 0,
                            };
                            continue;
                        }
                        if have == 5 {
                            this.state = this.admit(head, len)?;
                            continue;
                        }
                    }
                    let want = if have < 4 { 4 } else { 5 };
                    let n = match read_into(&mut this.inner, cx, &mut head[have..want]) {
                        None => {
                            this.state = Meter::Head { head, have };
                            return Poll::Pending;
                        }
                        Some(r) => r?,
                    };
                    if n == 0 {
                        // The peer's end: pass on what came (the codec
                        // calls a cut header an error).
                        if have > 0 {
                            this.state = Meter::Out {
                                out: head[..have].to_vec(),
                                pos: 0,
                                body: 0,
                            };
                            continue;
                        }
                        return Poll::Ready(Ok(()));
                    }
                    this.state = Meter::Head {
                        head,
                        have: have + n,
                    };
                }
                Meter::Out { out, mut pos, body } => {
                    if pos < out.len() {
                        let n = (out.len() - pos).min(buf.remaining());
                        buf.put_slice(&out[pos..pos + n]);
                        pos += n;
                        if pos < out.len() || body > 0 {
                            this.state = Meter::Out { out, pos, body };
                        }
                        return Poll::Ready(Ok(()));
                    }
                    if body == 0 {
                        continue;
                    }
                    let dst = buf.initialize_unfilled_to(body.min(buf.remaining()));
                    let n = match read_into(&mut this.inner, cx, dst) {
                        None => {
                            this.state = Meter::Out { out, pos, body };
                            return Poll::Pending;
                        }
                        Some(r) => r?,
                    };
                    buf.advance(n);
                    if n > 0 && body > n {
                        this.state = Meter::Out {
                            out,
                            pos,
                            body: body - n,
                        };
                    }
                    return Poll::Ready(Ok(()));
                }
                Meter::Collect {
                    mut frame,
                    len,
                    mut scan,
                    mut charge,
                } => {
                    let left = 4 + len - frame.len();
                    if left == 0 {
                        let need = scan.cost(len);
                        if charge.try_resize(need) {
                            this.keep_codec_buffer(&mut charge, 4 + len);
                            this.admitted = Some(charge);
                            this.state = Meter::Out {
                                out: frame,
                                pos: 0,
                                body: 0,
                            };
                        } else {
                            drop((frame, charge));
                            this.state = this.stand_in(len, &scan);
                        }
                        continue;
                    }
                    let want = left.min(chunk.len());
                    let n = match read_into(&mut this.inner, cx, &mut chunk[..want]) {
                        None => {
                            this.state = Meter::Collect {
                                frame,
                                len,
                                scan,
                                charge,
                            };
                            return Poll::Pending;
                        }
                        Some(r) => r?,
                    };
                    if n == 0 {
                        // Cut mid-frame: the codec sees a cut frame.
                        this.state = Meter::Out {
                            out: frame,
                            pos: 0,
                            body: 0,
                        };
                        continue;
                    }
                    scan.feed(&chunk[..n]);
                    frame.extend_from_slice(&chunk[..n]);
                    this.state = Meter::Collect {
                        frame,
                        len,
                        scan,
                        charge,
                    };
                }
                Meter::Skip {
                    left,
                    len,
                    mut scan,
                } => {
                    if left == 0 {
                        this.state = this.stand_in(len, &scan);
                        continue;
                    }
                    let want = left.min(chunk.len());
                    let n = match read_into(&mut this.inner, cx, &mut chunk[..want]) {
                        None => {
                            this.state = Meter::Skip { left, len, scan };
                            return Poll::Pending;
                        }
                        Some(r) => r?,
                    };
                    if n == 0 {
                        // Cut mid-frame: the peer is gone.
                        return Poll::Ready(Ok(()));
                    }
                    scan.feed(&chunk[..n]);
                    this.state = Meter::Skip {
                        left: left - n,
                        len,
                        scan,
                    };
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
