//! BitTorrent without I/O: the formats and rules that BootTorrent's peer engine (`swarm`) and
//! its tracker (`tracker`) share, so that each is written once and both sides agree on it.
//!
//! Layout, leaves first:
//! - [`Bitfield`], [`Geometry`], [`InfoHash`], [`PeerId`]: which pieces exist, how long each
//!   one is, and the 20-byte names of torrents and peers.
//! - [`bencode`]: one strict decoder for untrusted input and one encoder, for the whole
//!   workspace.
//! - [`metainfo`]: reading `.torrent` files (single-file torrents only) and the file-name rule
//!   shared by everything that makes or reads one.
//! - [`wire`]: the peer wire protocol (BEP 3 + BEP 6): handshake, messages, limits, and a
//!   codec over byte buffers; the engine plugs it into its sockets.
//! - [`announce`]: the HTTP tracker protocol, the query and the answer, as our client writes
//!   and reads them and as our tracker reads and writes them.
//!
//! Pure: no sockets, files, clocks or async runtime, so every rule here is tested with bytes
//! alone: round trips, fixtures captured from real clients, and the fuzz target in `fuzz/`.
//!
//! # Why our own bencode rather than bendy
//!
//! The workspace used two: this crate's decoder (then in `swarm`) and bendy (in `tracker`, for
//! writing `.torrent` files and tracker answers). One had to go; measured on the fixtures in
//! `tests/fixtures` (numbers in `docs/benchmarks.md`, "Bencode: ours against bendy"):
//!
//! - bendy refuses dictionaries whose keys are not sorted, and has no switch to allow them.
//!   Torrents and tracker answers are untrusted input written by other programs, and the
//!   engine must read them as they are: the info hash is taken over the exact bytes, so the
//!   order cannot be repaired. Ours accepts any order and still refuses duplicate keys.
//! - bendy hands out the raw bytes of the `info` dictionary (`DictDecoder::into_raw`) and caps
//!   nesting (2048 levels by default) without recursion, so neither decides it.
//! - Each bendy decoder allocates 144 KiB up front for its nesting stack; reading the
//!   libtorrent fixtures took 26–48 µs with bendy against 1.4–4.7 µs with ours.
//!
//! The encoder ([`bencode::Encoder`]) replaced bendy's for the few dictionaries we write.

#![warn(missing_docs)]

pub mod announce;
pub mod bencode;
pub mod bitfield;
pub mod metainfo;
pub mod wire;

pub use bitfield::Bitfield;

/// The standard block size: what we request and the most we serve per request by default.
pub const BLOCK_LEN: u32 = 16 * 1024;

/// SHA-1 of a torrent's bencoded `info` dictionary: the swarm's name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InfoHash(pub [u8; 20]);

impl std::fmt::Display for InfoHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for InfoHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InfoHash({self})")
    }
}

/// A peer's 20-byte id from its handshake.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerId(pub [u8; 20]);

impl PeerId {
    /// A fresh id in the Azureus style, `-BT0100-` followed by 12 random bytes.
    pub fn generate() -> PeerId {
        let mut id = [0u8; 20];
        id[..8].copy_from_slice(b"-BT0100-");
        rand::Rng::fill(&mut rand::rng(), &mut id[8..]);
        PeerId(id)
    }
}

impl std::fmt::Debug for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Client prefixes are printable; the random tail is not.
        write!(
            f,
            "PeerId({})",
            String::from_utf8_lossy(&self.0).escape_debug()
        )
    }
}

/// How a torrent's bytes split into pieces and blocks. Every piece is `piece_len` long except
/// the last, which holds the remainder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Total length in bytes; at least 1.
    pub total_len: u64,
    /// Nominal piece length in bytes; at least 1.
    pub piece_len: u32,
}

impl Geometry {
    /// Number of pieces.
    pub fn piece_count(&self) -> u32 {
        self.total_len.div_ceil(u64::from(self.piece_len)) as u32
    }

    /// Length of piece `index` (the last one may be short). `index` must be in range.
    pub fn piece_size(&self, index: u32) -> u32 {
        let start = self.piece_offset(index);
        (self.total_len - start).min(u64::from(self.piece_len)) as u32
    }

    /// Byte offset of piece `index` in the file.
    pub fn piece_offset(&self, index: u32) -> u64 {
        u64::from(index) * u64::from(self.piece_len)
    }

    /// Number of [`BLOCK_LEN`] blocks in piece `index`.
    pub fn block_count(&self, index: u32) -> u32 {
        self.piece_size(index).div_ceil(BLOCK_LEN)
    }

    /// Length of block `block` of piece `index`.
    pub fn block_size(&self, index: u32, block: u32) -> u32 {
        let size = self.piece_size(index);
        (size - block * BLOCK_LEN).min(BLOCK_LEN)
    }

    /// Whether `(index, offset, len)` lies inside the torrent and `len` is between 1 and
    /// `max_len`: the check for every request and piece a peer sends.
    pub fn contains(&self, index: u32, offset: u32, len: u32, max_len: u32) -> bool {
        index < self.piece_count()
            && len > 0
            && len <= max_len
            && u64::from(offset) + u64::from(len) <= u64::from(self.piece_size(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_of_a_short_last_piece() {
        let g = Geometry {
            total_len: 3 * 32768 + 100,
            piece_len: 32768,
        };
        assert_eq!(g.piece_count(), 4);
        assert_eq!(g.piece_size(3), 100);
        assert_eq!(g.block_count(0), 2);
        assert_eq!(g.block_count(3), 1);
        assert_eq!(g.block_size(3, 0), 100);
        assert!(g.contains(3, 0, 100, BLOCK_LEN));
        assert!(!g.contains(3, 1, 100, BLOCK_LEN));
        assert!(!g.contains(4, 0, 1, BLOCK_LEN));
        assert!(!g.contains(0, 0, 0, BLOCK_LEN));
        assert!(!g.contains(0, 0, BLOCK_LEN + 1, BLOCK_LEN));
    }
}
