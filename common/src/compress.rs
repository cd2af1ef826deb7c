//! zstd in transit (`zfsync-send --compress`): the capability a receiver
//! announces, the sender's per-frame compressor and the receiver's bounded
//! decompressor.
//!
//! Each data frame of a compressed stream is one independent zstd frame
//! that declares its decompressed size (the sender compresses each chunk
//! whole). The receiver reads that size before it allocates anything,
//! refuses more than [`MAX_INFLATED`] bytes (a zip bomb from a hostile
//! sender), and decompresses into a buffer of exactly that size: zstd's
//! one-shot decoder uses the buffer as its window, so a frame costs its
//! decompressed size and a small reused context, nothing more. What
//! travels is otherwise unchanged: `End{bytes}` counts the stream's
//! uncompressed bytes on both ends, and the receiver's stream validator
//! sees the decompressed `zfs send` bytes.

use std::io;

use bytes::Bytes;
use thiserror::Error;

/// The capability name a receiver that decompresses announces in
/// `HelloOk`'s `caps` (a sender that does not know it ignores it).
pub const CAP_ZSTD: &str = "zstd";
/// `--compress-level` when not given: fast, and a good share of the gain.
pub const DEFAULT_LEVEL: i32 = 3;
/// Highest `--compress-level`: zstd's "ultra" levels above it buy nothing
/// on frames of 256 KiB.
pub const MAX_LEVEL: i32 = 19;
/// Most bytes one compressed data frame may decompress to. The sender's
/// frames hold [`crate::protocol::DATA_CHUNK`] (256 KiB) each.
pub const MAX_INFLATED: usize = 4 << 20;

/// The sender's compressor: one zstd frame per data frame.
pub struct Deflater {
    ctx: zstd::bulk::Compressor<'static>,
}

impl Deflater {
    pub fn new(level: i32) -> io::Result<Deflater> {
        let mut ctx = zstd::bulk::Compressor::new(level)?;
        // 4 bytes a frame: the receiver's zstd verifies what it decoded.
        ctx.set_parameter(zstd::stream::raw::CParameter::ChecksumFlag(true))?;
        Ok(Deflater { ctx })
    }

    /// One complete zstd frame holding `data`, its size declared in the
    /// frame header (what the receiver checks first).
    pub fn compress(&mut self, data: &[u8]) -> io::Result<Vec<u8>> {
        self.ctx.compress(data)
    }
}

/// Why a compressed data frame is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InflateError {
    #[error("a compressed data frame that is not a zstd frame declaring its size")]
    NoSize,
    #[error("a compressed data frame declares {0} bytes; at most {MAX_INFLATED} are accepted")]
    TooLarge(u64),
    #[error("a compressed data frame that holds no data")]
    Empty,
    #[error("a corrupt compressed data frame: {0}")]
    Corrupt(String),
    #[error("a compressed data frame decompressed to {got} bytes, not the {declared} it declares")]
    WrongSize { got: usize, declared: usize },
}

/// The receiver's decompressor (a zstd context, reused frame after frame).
pub struct Inflater {
    ctx: zstd::bulk::Decompressor<'static>,
}

impl Inflater {
    pub fn new() -> io::Result<Inflater> {
        Ok(Inflater {
            ctx: zstd::bulk::Decompressor::new()?,
        })
    }

    /// What `frame` says it decompresses to, checked against
    /// [`MAX_INFLATED`]: read from its header, before anything is
    /// allocated for it.
    pub fn declared(frame: &[u8]) -> Result<usize, InflateError> {
        match zstd::zstd_safe::get_frame_content_size(frame) {
            Ok(Some(0)) => Err(InflateError::Empty),
            Ok(Some(n)) if n > MAX_INFLATED as u64 => Err(InflateError::TooLarge(n)),
            Ok(Some(n)) => Ok(n as usize),
            Ok(None) | Err(_) => Err(InflateError::NoSize),
        }
    }

    /// Decompresses `frame` into exactly `declared` bytes (from
    /// [`Inflater::declared`]); more output, or less, is refused.
    pub fn inflate(&mut self, frame: &[u8], declared: usize) -> Result<Bytes, InflateError> {
        let declared = declared.min(MAX_INFLATED);
        let mut out = Vec::with_capacity(declared);
        let got = self
            .ctx
            .decompress_to_buffer(frame, &mut out)
            .map_err(|e| InflateError::Corrupt(e.to_string()))?;
        if got != declared {
            return Err(InflateError::WrongSize { got, declared });
        }
        Ok(Bytes::from(out))
    }

    /// [`Inflater::declared`], then [`Inflater::inflate`].
    pub fn frame(&mut self, frame: &[u8]) -> Result<Bytes, InflateError> {
        let declared = Self::declared(frame)?;
        self.inflate(frame, declared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn frames_round_trip_and_declare_their_size() {
        let mut d = Deflater::new(DEFAULT_LEVEL).unwrap();
        let mut i = Inflater::new().unwrap();
        for data in [b"z".to_vec(), b"zfs".repeat(100_000), noise(256 << 10)] {
            let c = d.compress(&data).unwrap();
            assert_eq!(Inflater::declared(&c), Ok(data.len()));
            assert_eq!(i.frame(&c).unwrap(), data);
        }
        // Compressible data shrinks; noise grows by a few bytes at most.
        assert!(d.compress(&[7u8; 256 << 10]).unwrap().len() < 1 << 10);
        assert!(d.compress(&noise(256 << 10)).unwrap().len() < (256 << 10) + 64);
    }

    #[test]
    fn a_zip_bomb_is_refused_before_anything_is_allocated() {
        let mut d = Deflater::new(DEFAULT_LEVEL).unwrap();
        let bomb = d.compress(&vec![0u8; MAX_INFLATED + 1]).unwrap();
        assert!(bomb.len() < 1 << 10);
        assert_eq!(
            Inflater::declared(&bomb),
            Err(InflateError::TooLarge(MAX_INFLATED as u64 + 1))
        );
        let mut i = Inflater::new().unwrap();
        assert!(i.frame(&bomb).is_err());
        // The largest accepted frame passes.
        let big = d.compress(&vec![0u8; MAX_INFLATED]).unwrap();
        assert_eq!(i.frame(&big).unwrap().len(), MAX_INFLATED);
    }

    #[test]
    fn a_frame_that_lies_about_its_size_is_refused() {
        let mut d = Deflater::new(DEFAULT_LEVEL).unwrap();
        let mut i = Inflater::new().unwrap();
        let c = d.compress(&b"abc".repeat(1000)).unwrap();
        // Told less than it holds, or more: refused either way.
        assert!(i.inflate(&c, 10).is_err());
        assert!(i.inflate(&c, 4000).is_err());
        // Two frames in one: the second does not fit the first's size.
        let mut two = c.clone();
        two.extend_from_slice(&c);
        assert!(i.frame(&two).is_err());
        // The context is still good afterwards.
        assert_eq!(i.frame(&c).unwrap().len(), 3000);
    }

    #[test]
    fn corrupt_frames_are_errors_never_panics() {
        let mut d = Deflater::new(DEFAULT_LEVEL).unwrap();
        let mut i = Inflater::new().unwrap();
        let good = d.compress(&noise(64 << 10)).unwrap();
        assert!(i.frame(b"").is_err());
        assert!(i.frame(b"not zstd at all").is_err());
        assert!(i.frame(&noise(4096)).is_err());
        assert_eq!(
            Inflater::declared(&d.compress(b"").unwrap()),
            Err(InflateError::Empty)
        );
        for cut in [5, 20, good.len() / 2, good.len() - 1] {
            assert!(i.frame(&good[..cut]).is_err(), "cut at {cut}");
        }
        // Damage anywhere (noise travels in stored blocks, which only the
        // frame's checksum covers) is refused.
        for at in (0..good.len()).step_by(499) {
            let mut bad = good.clone();
            bad[at] ^= 0x5a;
            assert!(i.frame(&bad).is_err(), "damage at {at}");
        }
        for len in [1, 4, 9, 18, 100] {
            let _ = i.frame(&noise(len));
        }
    }
}
