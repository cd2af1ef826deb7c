//! Synthetic streams for the tests: records laid out as OpenZFS writes
//! them (`dmu_replay_record_t`), in either byte order, appended one by one.

use super::*;

/// A stream under construction.
pub(crate) struct Build {
    big_endian: bool,
    pub out: Vec<u8>,
}

impl Build {
    pub fn new(big_endian: bool) -> Build {
        Build {
            big_endian,
            out: Vec::new(),
        }
    }

    /// A record of `kind`, all fields zero; returns its offset.
    pub fn record(&mut self, kind: u32) -> usize {
        let at = self.out.len();
        self.out.resize(at + RECORD, 0);
        self.put32(at, kind);
        at
    }

    pub fn put32(&mut self, at: usize, v: u32) {
        let b = if self.big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.out[at..at + 4].copy_from_slice(&b);
    }

    pub fn put64(&mut self, at: usize, v: u64) {
        let b = if self.big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.out[at..at + 8].copy_from_slice(&b);
    }

    /// A BEGIN record and its payload.
    #[allow(clippy::too_many_arguments)]
    pub fn begin_full(
        &mut self,
        hdrtype: u64,
        features: u64,
        flags: u32,
        to: u64,
        from: u64,
        toname: &str,
        payload: usize,
    ) -> &mut Build {
        let at = self.record(DRR_BEGIN);
        self.put32(at + 4, payload as u32);
        self.put64(at + 8, DMU_BACKUP_MAGIC);
        self.put64(at + 16, hdrtype | (features << 2));
        self.put32(at + 32, 2); // DMU_OST_ZFS
        self.put32(at + 36, flags);
        self.put64(at + 40, to);
        self.put64(at + 48, from);
        let name = toname.as_bytes();
        self.out[at + 56..at + 56 + name.len()].copy_from_slice(name);
        self.out.extend(std::iter::repeat_n(0xa5, payload));
        self
    }

    /// A package header (`zfs send -I`) of `ds@snap`, and its END.
    pub fn package(&mut self, toname: &str) -> &mut Build {
        self.begin_full(DMU_COMPOUNDSTREAM, 0, 0, 0, 0, toname, 0);
        self.end(0)
    }

    /// A substream's BEGIN.
    pub fn sub(&mut self, to: u64, from: u64, toname: &str) -> &mut Build {
        self.begin_full(DMU_SUBSTREAM, 0, 0, to, from, toname, 0)
    }

    pub fn end(&mut self, to: u64) -> &mut Build {
        let at = self.record(DRR_END);
        self.put64(at + 40, to);
        self
    }

    /// A record without data (FREE, FREEOBJECTS, WRITE_BYREF, ...).
    pub fn bare(&mut self, kind: u32) -> &mut Build {
        self.record(kind);
        self
    }

    /// A WRITE of `len` uncompressed bytes.
    pub fn write(&mut self, len: u64) -> &mut Build {
        self.write_compressed(0, len, 0, len)
    }

    /// A WRITE whose header says `ctype`, `logical` and `compressed`
    /// sizes, followed by `data` bytes.
    pub fn write_compressed(
        &mut self,
        ctype: u8,
        logical: u64,
        compressed: u64,
        data: u64,
    ) -> &mut Build {
        let at = self.record(DRR_WRITE);
        self.put64(at + 32, logical);
        self.out[at + 50] = ctype;
        self.put64(at + 96, compressed);
        self.data(data)
    }

    /// An OBJECT with `bonuslen` (and `raw_bonuslen`), then its bonus.
    pub fn object(&mut self, bonuslen: u32, raw_bonuslen: u32, data: u64) -> &mut Build {
        let at = self.record(DRR_OBJECT);
        self.put32(at + 28, bonuslen);
        self.put32(at + 36, raw_bonuslen);
        self.data(data)
    }

    pub fn spill(&mut self, length: u64, compressed: u64, data: u64) -> &mut Build {
        let at = self.record(DRR_SPILL);
        self.put64(at + 16, length);
        self.put64(at + 40, compressed);
        self.data(data)
    }

    pub fn embedded(&mut self, psize: u32, data: u64) -> &mut Build {
        let at = self.record(DRR_WRITE_EMBEDDED);
        self.put32(at + 52, psize);
        self.data(data)
    }

    /// `len` bytes of data (a record's payload).
    pub fn data(&mut self, len: u64) -> &mut Build {
        self.out.extend(std::iter::repeat_n(0x5a, len as usize));
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.out.clone()
    }
}
