//! Blocks of unfinished pieces, held in memory until their piece is complete.
//!
//! Writing each 16 KiB block as it arrives costs a trip to the blocking pool per block (two
//! thread wake-ups), and verifying the finished piece then reads all of it back from the file.
//! With a piece's blocks held here, the finished piece is hashed from memory and written in
//! one trip, and a piece that fails its hash is never written. With 16 agents on a 2-core
//! machine the per-block trips and wake-ups were about a fifth of all CPU time (perf), and
//! the swarm was CPU-bound.
//!
//! A budget bounds the memory: once it is spent, blocks go to the file as they arrive, and
//! their piece is verified from the file. Nothing here is durable, and need not be: a resume
//! record lists verified pieces only, so a crash loses the same partial pieces either way.
//!
//! The last few verified pieces stay here too, under a budget of their own: a piece just
//! verified is rare in the swarm, so it is what the other peers ask for next, and serving it
//! from memory saves a trip to the blocking pool and a read per request.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

/// Memory one torrent may hold in unfinished pieces' blocks. In a fleet swarm each peer is
/// mostly busy with one piece of its own (piece affinity), so this covers 64 connections'
/// worth of 1 MiB pieces, or the first few of the 16 MiB pieces of large images.
pub(crate) const BUDGET: u64 = 64 * 1024 * 1024;
/// Memory one torrent may hold in recently verified pieces, for serving.
pub(crate) const RECENT_BUDGET: u64 = 32 * 1024 * 1024;

/// The held blocks of one torrent's unfinished pieces.
#[derive(Debug)]
pub(crate) struct Assembly {
    budget: u64,
    held: u64,
    /// Per piece, its held blocks as (offset in the piece, bytes), in arrival order.
    pieces: HashMap<u32, Vec<(u32, Bytes)>>,
    recent_budget: u64,
    recent_held: u64,
    /// Verified pieces whose blocks were all held, by offset, newest last.
    recent: VecDeque<(u32, Vec<(u32, Bytes)>)>,
}

impl Assembly {
    pub fn new(budget: u64, recent_budget: u64) -> Assembly {
        Assembly {
            budget,
            held: 0,
            pieces: HashMap::new(),
            recent_budget,
            recent_held: 0,
            recent: VecDeque::new(),
        }
    }

    /// Holds a received block, or hands it back when the budget is spent: the caller then
    /// writes it to the file.
    pub fn hold(&mut self, piece: u32, offset: u32, data: Bytes) -> Option<Bytes> {
        let len = data.len() as u64;
        if self.held + len > self.budget {
            return Some(data);
        }
        self.held += len;
        self.pieces.entry(piece).or_default().push((offset, data));
        None
    }

    /// The held blocks of a finished piece, which leaves the assembly.
    pub fn take(&mut self, piece: u32) -> Vec<(u32, Bytes)> {
        let blocks = self.pieces.remove(&piece).unwrap_or_default();
        self.held -= blocks.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
        blocks
    }

    /// Keeps the blocks of a piece just verified and written, sorted by offset, for
    /// [`Assembly::recent_block`]; the oldest kept pieces make room.
    pub fn keep_verified(&mut self, piece: u32, blocks: Vec<(u32, Bytes)>) {
        let len: u64 = blocks.iter().map(|(_, b)| b.len() as u64).sum();
        if len > self.recent_budget {
            return;
        }
        while self.recent_held + len > self.recent_budget {
            let Some((_, old)) = self.recent.pop_front() else {
                break;
            };
            self.recent_held -= old.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
        }
        self.recent_held += len;
        self.recent.push_back((piece, blocks));
    }

    /// `len` bytes at `offset` in `piece`, when a recently verified piece holds them within
    /// one of its blocks (a peer asking for our block size, as every client does).
    pub fn recent_block(&self, piece: u32, offset: u32, len: u32) -> Option<Bytes> {
        let (_, blocks) = self.recent.iter().rev().find(|(p, _)| *p == piece)?;
        let i = blocks
            .partition_point(|(o, _)| *o <= offset)
            .checked_sub(1)?;
        let (start, data) = &blocks[i];
        let from = (offset - start) as usize;
        let to = from.checked_add(len as usize)?;
        (to <= data.len()).then(|| data.slice(from..to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_past_the_budget_are_handed_back_and_taking_frees_room() {
        let mut a = Assembly::new(40, 0);
        assert_eq!(a.hold(1, 0, Bytes::from(vec![1; 16])), None);
        assert_eq!(a.hold(2, 0, Bytes::from(vec![2; 16])), None);
        let back = a.hold(1, 16, Bytes::from(vec![3; 16]));
        assert_eq!(back.as_deref(), Some(&[3u8; 16][..]), "over budget");
        let one = a.take(1);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].0, 0);
        assert_eq!(a.hold(1, 16, Bytes::from(vec![3; 16])), None, "room again");
        assert!(a.take(7).is_empty());
        assert_eq!(a.take(2).len(), 1);
        assert_eq!(a.take(1).len(), 1);
        assert_eq!(a.held, 0);
    }

    #[test]
    fn recent_pieces_serve_requests_within_a_block_until_pushed_out() {
        let mut a = Assembly::new(0, 64);
        let piece = |fill: u8| {
            vec![
                (0, Bytes::from(vec![fill; 16])),
                (16, Bytes::from(vec![fill + 1; 16])),
            ]
        };
        a.keep_verified(3, piece(10));
        assert_eq!(a.recent_block(3, 16, 16).as_deref(), Some(&[11u8; 16][..]));
        assert_eq!(a.recent_block(3, 4, 8).as_deref(), Some(&[10u8; 8][..]));
        assert_eq!(a.recent_block(3, 8, 16), None, "spans two blocks");
        assert_eq!(a.recent_block(3, 30, 4), None, "past the end");
        assert_eq!(a.recent_block(4, 0, 16), None, "never kept");
        a.keep_verified(4, piece(20));
        a.keep_verified(5, piece(30));
        assert_eq!(a.recent_block(3, 0, 16), None, "oldest made room");
        assert_eq!(a.recent_block(5, 0, 16).as_deref(), Some(&[30u8; 16][..]));
        a.keep_verified(6, vec![(0, Bytes::from(vec![0; 65]))]);
        assert_eq!(a.recent_block(6, 0, 1), None, "larger than the budget");
        assert_eq!(a.recent_block(4, 0, 1).as_deref(), Some(&[20u8][..]));
    }
}
