//! Which pieces a peer (or we) have, in the wire's bit order: piece 0 is the high bit of
//! byte 0.

/// A fixed-length set of piece indexes.
#[derive(Clone, PartialEq, Eq)]
pub struct Bitfield {
    bytes: Vec<u8>,
    len: u32,
    ones: u32,
}

/// A received bitfield does not fit the torrent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitfieldError {
    /// One bit per piece, rounded up to whole bytes, is the only valid length.
    #[error("bitfield is {got} bytes long; a torrent of {pieces} pieces needs {want}")]
    WrongLength {
        /// Bytes received.
        got: usize,
        /// Bytes the torrent needs.
        want: usize,
        /// Pieces in the torrent.
        pieces: u32,
    },
    /// The bits after the last piece must be zero (BEP 3), or the peer claims pieces that do
    /// not exist.
    #[error("bitfield sets spare bits past piece {pieces}")]
    SpareBitsSet {
        /// Pieces in the torrent.
        pieces: u32,
    },
}

impl Bitfield {
    /// No piece set.
    pub fn new(len: u32) -> Bitfield {
        Bitfield {
            bytes: vec![0; (len as usize).div_ceil(8)],
            len,
            ones: 0,
        }
    }

    /// Every piece set.
    pub fn full(len: u32) -> Bitfield {
        let mut b = Bitfield::new(len);
        for i in 0..len {
            b.set(i);
        }
        b
    }

    /// Parses a wire bitfield for a torrent of `len` pieces; the length must match exactly and
    /// spare bits must be clear (BEP 3 says a peer that sets them is to be dropped).
    pub fn from_bytes(bytes: &[u8], len: u32) -> Result<Bitfield, BitfieldError> {
        let want = (len as usize).div_ceil(8);
        if bytes.len() != want {
            return Err(BitfieldError::WrongLength {
                got: bytes.len(),
                want,
                pieces: len,
            });
        }
        let spare = (want * 8) as u32 - len;
        if spare > 0 && bytes[want - 1] & ((1u8 << spare) - 1) != 0 {
            return Err(BitfieldError::SpareBitsSet { pieces: len });
        }
        let ones = bytes.iter().map(|b| b.count_ones()).sum();
        Ok(Bitfield {
            bytes: bytes.to_vec(),
            len,
            ones,
        })
    }

    /// The wire form.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Number of pieces this bitfield covers.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// True when it covers no piece at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of pieces set.
    pub fn count(&self) -> u32 {
        self.ones
    }

    /// True when every piece is set.
    pub fn is_full(&self) -> bool {
        self.ones == self.len
    }

    /// Whether piece `i` is set; out of range is `false`.
    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bytes[(i / 8) as usize] & (0x80 >> (i % 8)) != 0
    }

    /// Sets piece `i`; returns whether it was newly set. Out of range does nothing.
    pub fn set(&mut self, i: u32) -> bool {
        if i >= self.len || self.get(i) {
            return false;
        }
        self.bytes[(i / 8) as usize] |= 0x80 >> (i % 8);
        self.ones += 1;
        true
    }

    /// Clears piece `i`; returns whether it was set.
    pub fn clear(&mut self, i: u32) -> bool {
        if !self.get(i) {
            return false;
        }
        self.bytes[(i / 8) as usize] &= !(0x80 >> (i % 8));
        self.ones -= 1;
        true
    }

    /// The indexes that are set, ascending.
    pub fn iter_set(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|&i| self.get(i))
    }
}

impl std::fmt::Debug for Bitfield {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bitfield({}/{})", self.ones, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_order_and_counts() {
        let mut b = Bitfield::new(10);
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(b.set(9));
        assert!(!b.set(10));
        assert_eq!(b.as_bytes(), &[0x80, 0x40]);
        assert_eq!(b.count(), 2);
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![0, 9]);
        assert!(b.clear(0));
        assert_eq!(b.count(), 1);
        assert!(Bitfield::full(10).is_full());
    }

    #[test]
    fn received_bitfields_are_checked() {
        assert_eq!(
            Bitfield::from_bytes(&[0xff], 10),
            Err(BitfieldError::WrongLength {
                got: 1,
                want: 2,
                pieces: 10
            })
        );
        assert_eq!(
            Bitfield::from_bytes(&[0xff, 0xe0], 10),
            Err(BitfieldError::SpareBitsSet { pieces: 10 })
        );
        let b = Bitfield::from_bytes(&[0xff, 0xc0], 10).unwrap();
        assert!(b.is_full());
    }
}
