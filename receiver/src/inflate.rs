//! The receiving end of `--compress`: while the stream in progress was
//! announced `compressed`, each data frame is decompressed here as it is
//! read, before anything else sees it: [`crate::ingest`] and its stream
//! validator get the plain `zfs send` bytes and count them for
//! `End{bytes}`, exactly as for a plain stream.
//!
//! Invariants:
//! - a frame's decompressed size is read from its header before anything
//!   is allocated for it, and more than [`MAX_INFLATED`] is refused (a zip
//!   bomb); the output is exactly that size or refused;
//! - a decompressed frame larger than an uncharged data frame is charged to
//!   the memory budget before it is made, and the charge is held while the
//!   frame is (the session keeps the last two, as for data frames);
//! - a frame that cannot be decompressed ends the connection with the
//!   reason (the stream is cut, so nothing of it is committed): only a
//!   broken or hostile sender sends one, TLS having kept the bytes intact.

use std::sync::Arc;

use bytes::Bytes;
use zfsync_common::compress::{Inflater, MAX_INFLATED};
use zfsync_common::protocol::{Frame, ProtocolError};

use crate::meter::SMALL_DATA;
use crate::state::{MemoryBudget, Reservation};

/// Decompression for the session's connection.
#[derive(Default)]
pub(crate) struct Inflate {
    /// The stream in progress is compressed.
    on: bool,
    /// Made at the first compressed stream, then reused.
    inflater: Option<Inflater>,
}

impl Inflate {
    /// What the next stream's data frames are: set at each request (a
    /// stream's announcement says; anything else has no data).
    pub(crate) fn expect(&mut self, compressed: bool) {
        self.on = compressed;
    }

    /// A frame as the stream carries it: a data frame of a compressed
    /// stream decompressed, with what it is charged (`admitted`: what
    /// reading the compressed frame was granted, given back once it is
    /// decompressed); any other frame as it came.
    pub(crate) fn frame(
        &mut self,
        frame: Frame,
        admitted: Option<Reservation>,
        budget: &Arc<MemoryBudget>,
    ) -> Result<(Frame, Option<Reservation>), ProtocolError> {
        let data = match frame {
            Frame::Data(d) if self.on => d,
            other => return Ok((other, admitted)),
        };
        let (plain, charge) = self.inflate(&data, budget)?;
        drop((data, admitted));
        Ok((Frame::Data(plain), charge))
    }

    fn inflate(
        &mut self,
        data: &[u8],
        budget: &Arc<MemoryBudget>,
    ) -> Result<(Bytes, Option<Reservation>), ProtocolError> {
        let refused = |e| ProtocolError::BadFrame(format!("refused stream: {e}"));
        let declared = Inflater::declared(data).map_err(refused)?;
        let charge = if declared > SMALL_DATA {
            let Some(charge) = budget.try_reserve(declared) else {
                return Err(ProtocolError::Local(format!(
                    "a compressed data frame of {declared} bytes (decompressed) does not fit in the receiver's memory budget now"
                )));
            };
            Some(charge)
        } else {
            None
        };
        let inflater = match &mut self.inflater {
            Some(i) => i,
            None => self.inflater.insert(Inflater::new().map_err(|e| {
                ProtocolError::Local(format!("cannot start a zstd decompressor: {e}"))
            })?),
        };
        let plain = inflater.inflate(data, declared).map_err(refused)?;
        debug_assert!(plain.len() <= MAX_INFLATED);
        Ok((plain, charge))
    }
}

#[cfg(test)]
mod tests {
    use zfsync_common::compress::{Deflater, DEFAULT_LEVEL};
    use zfsync_common::protocol::Message;

    use super::*;

    #[test]
    fn compressed_data_frames_are_decompressed_and_others_pass() {
        let budget = MemoryBudget::new(64 << 20);
        let mut i = Inflate::default();
        let z = Bytes::from(
            Deflater::new(DEFAULT_LEVEL)
                .unwrap()
                .compress(b"zfs")
                .unwrap(),
        );
        // A plain stream: frames as they came.
        let (f, _) = i.frame(Frame::Data(z.clone()), None, &budget).unwrap();
        assert_eq!(f, Frame::Data(z.clone()));
        i.expect(true);
        let (f, charge) = i.frame(Frame::Data(z), None, &budget).unwrap();
        assert_eq!(f, Frame::Data(Bytes::from_static(b"zfs")));
        assert!(charge.is_none());
        let end = || Frame::Msg(Message::End { bytes: 3 });
        assert_eq!(i.frame(end(), None, &budget).unwrap().0, end());
    }

    #[test]
    fn large_frames_are_charged_and_refused_when_the_budget_is_full() {
        let mut d = Deflater::new(DEFAULT_LEVEL).unwrap();
        let big = Bytes::from(d.compress(&vec![1u8; 3 << 20]).unwrap());
        let budget = MemoryBudget::new(8 << 20);
        let mut i = Inflate::default();
        i.expect(true);
        let (f, charge) = i.frame(Frame::Data(big.clone()), None, &budget).unwrap();
        assert!(matches!(f, Frame::Data(d) if d.len() == 3 << 20));
        assert_eq!(charge.as_ref().map(Reservation::bytes), Some(3 << 20));
        assert_eq!(budget.used(), 3 << 20);
        let _held = budget.try_reserve(4 << 20).unwrap();
        let e = i
            .frame(Frame::Data(big.clone()), None, &budget)
            .unwrap_err();
        assert!(e.to_string().contains("memory budget"), "{e}");
        drop(charge);
        assert!(i.frame(Frame::Data(big), None, &budget).is_ok());
    }

    #[test]
    fn corrupt_and_oversized_frames_are_refused_streams() {
        let budget = MemoryBudget::new(64 << 20);
        let mut d = Deflater::new(DEFAULT_LEVEL).unwrap();
        let mut i = Inflate::default();
        i.expect(true);
        let bomb = Bytes::from(d.compress(&vec![0u8; MAX_INFLATED + 1]).unwrap());
        let mut cut = d.compress(&[5u8; 10_000]).unwrap();
        cut.truncate(cut.len() - 3);
        for bad in [
            bomb,
            Bytes::from(cut),
            Bytes::from_static(b"plain zfs bytes"),
        ] {
            let e = i.frame(Frame::Data(bad), None, &budget).unwrap_err();
            assert!(matches!(e, ProtocolError::BadFrame(_)), "{e}");
            assert!(e.to_string().contains("refused stream"), "{e}");
        }
        assert_eq!(budget.used(), 0);
    }
}
