//! Which block to request from which peer.
//!
//! A fleet swarm lives or dies by piece diversity: if every leecher pulls the same pieces from
//! the seeder, they have nothing to trade and the swarm degrades into unicast. So:
//! - **rarest first** by availability among connected peers, ties broken by a random order
//!   fixed per torrent (different on every host, so hosts diverge);
//! - the **first piece is random**, to have something to trade as soon as possible;
//! - **partial pieces are finished first**, and a piece belongs to the peer that started it
//!   (piece affinity), so a piece that fails its hash mostly has one sender to blame;
//! - pieces that peers of our own zone can serve are left to them when another piece would do
//!   for a peer outside the zone, and once the zone holds pieces, peers outside it have at
//!   most [`OUTSIDE_PIECES`] pieces in flight: what crosses an uplink comes a few pieces at a
//!   time and is traded within the zone;
//! - **endgame**: once every missing block is requested, blocks may be requested from a
//!   second peer, and the duplicate is cancelled when the first copy arrives.

use std::collections::HashMap;

use rand::seq::SliceRandom;

use crate::wire::BlockRef;
use crate::{BLOCK_LEN, Bitfield, Geometry};

/// Identifies a connection within one torrent.
pub type PeerKey = u64;

/// How many peers may hold a request for the same block in endgame.
const ENDGAME_DUPLICATES: usize = 2;
/// Pieces in flight from peers outside our zone, at most, once peers of the zone hold
/// pieces. In the simulated lab (docs/benchmarks.md) 2 beat 1 (which starves hosts when the
/// zone has little yet) and 4 or no limit (which pulls the same pieces across an uplink
/// many times over): 16 hosts on two switches finish in about half the time, and 300 hosts
/// send a third fewer bytes over their uplinks.
pub const OUTSIDE_PIECES: usize = 2;

/// Requests in flight per peer: at least this many blocks...
const MIN_PIPELINE: usize = 16;
/// ...and at most this many (8 MiB), enough for 1 Gbit/s at 60 ms round trip.
const MAX_PIPELINE: usize = 512;
/// ...and in between, this long of the peer's rate.
///
/// A piece asked of one peer waits for that peer (see [`Picker::pick`]), so every block in
/// flight is one that a faster peer cannot take. With a second's worth, hosts of the
/// simulated 300-machine lab had asked for every piece they could get as soon as they could,
/// and received at 83-90 % of their links while peers with pieces to give sat idle; with a
/// quarter of a second the first host is done 0.3 s sooner (docs/benchmarks.md). Below the
/// cap, a quarter second covers a 60 ms round trip four times over.
const PIPELINE_SECS: f64 = 0.25;

/// How many block requests to keep in flight to a peer that sends `download_rate` bytes
/// per second.
pub fn pipeline_depth(download_rate: f64) -> usize {
    ((download_rate * PIPELINE_SECS / f64::from(BLOCK_LEN)) as usize)
        .clamp(MIN_PIPELINE, MAX_PIPELINE)
}

#[derive(Debug, Clone, Default)]
struct BlockState {
    received: bool,
    /// Who sent it, to blame when the piece fails its hash.
    from: Option<PeerKey>,
    /// Peers with an outstanding request for this block.
    requested_by: Vec<PeerKey>,
}

#[derive(Debug)]
struct Partial {
    /// The peer that started the piece; others take its blocks only in endgame or after it
    /// left.
    owner: Option<PeerKey>,
    blocks: Vec<BlockState>,
    received: u32,
    /// Started by a peer outside our zone.
    outside: bool,
}

impl Partial {
    /// Whether `peer` may take this piece's blocks outside endgame: it started the piece,
    /// or nobody holds it. A piece whose owner has no request out for it is held by nobody:
    /// an owner that choked us (the fast extension keeps its ownership through the rejects)
    /// or stopped sending would otherwise keep the piece from every other peer until it
    /// unchokes us, which in a full swarm is the next rotation, 10 s away.
    fn open_to(&self, peer: PeerKey) -> bool {
        match self.owner {
            None => true,
            Some(owner) if owner == peer => true,
            Some(owner) => !self
                .blocks
                .iter()
                .any(|b| !b.received && b.requested_by.contains(&owner)),
        }
    }
}

/// What a received block meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// We did not ask for it (or already have it): ignore the data.
    Unexpected,
    /// Stored; the piece still misses blocks. `cancel` lists other peers that were asked for
    /// the same block in endgame.
    Block { cancel: Vec<PeerKey> },
    /// The piece has all its blocks and must be verified.
    PieceDone { cancel: Vec<PeerKey> },
}

/// Download bookkeeping of one torrent.
#[derive(Debug)]
pub struct Picker {
    geometry: Geometry,
    have: Bitfield,
    /// Connected peers having each piece.
    availability: Vec<u16>,
    /// Connected peers of our zone having each piece.
    zone_availability: Vec<u16>,
    /// Pieces that some connected peer of our zone has: kept as pieces come and go, since
    /// [`Picker::pick`] asks on every request it makes to a peer outside the zone.
    zone_held: u32,
    /// Random tie-break rank of each piece.
    rank: Vec<u32>,
    partial: HashMap<u32, Partial>,
    /// Pieces complete and being verified: not to be picked again meanwhile.
    verifying: Vec<bool>,
    /// Most pieces in flight from peers outside our zone while peers of the zone hold
    /// pieces: what comes across an uplink is taken a few pieces at a time and traded
    /// within the zone, instead of every host pulling many pieces across at once.
    outside_limit: usize,
}

impl Picker {
    /// A picker for a torrent of which `have` is already verified.
    pub fn new(geometry: Geometry, have: Bitfield) -> Picker {
        let n = geometry.piece_count();
        let mut rank: Vec<u32> = (0..n).collect();
        rank.shuffle(&mut rand::rng());
        Picker {
            geometry,
            have,
            availability: vec![0; n as usize],
            zone_availability: vec![0; n as usize],
            zone_held: 0,
            rank,
            partial: HashMap::new(),
            verifying: vec![false; n as usize],
            outside_limit: OUTSIDE_PIECES,
        }
    }

    /// Replaces [`OUTSIDE_PIECES`] (the lab simulation tries other values).
    pub fn limit_outside(&mut self, pieces: usize) {
        self.outside_limit = pieces;
    }

    /// Whether a peer outside the zone may start another piece: always while no peer of
    /// the zone holds a piece (no zone configured, or nothing to trade in it yet).
    fn outside_may_start(&self) -> bool {
        self.zone_held == 0
            || self.partial.values().filter(|p| p.outside).count() < self.outside_limit
    }

    /// Verified pieces.
    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    /// True when every piece is verified.
    pub fn is_complete(&self) -> bool {
        self.have.is_full()
    }

    /// Bytes in verified pieces.
    pub fn bytes_done(&self) -> u64 {
        if self.have.is_full() {
            return self.geometry.total_len;
        }
        self.have
            .iter_set()
            .map(|i| u64::from(self.geometry.piece_size(i)))
            .sum()
    }

    /// A peer announced it has every piece of `pieces`.
    pub fn add_availability(&mut self, pieces: &Bitfield, in_zone: bool) {
        for i in pieces.iter_set() {
            self.add_piece(i, in_zone);
        }
    }

    /// A peer announced one piece.
    pub fn add_piece(&mut self, piece: u32, in_zone: bool) {
        if let Some(a) = self.availability.get_mut(piece as usize) {
            *a = a.saturating_add(1);
            if in_zone {
                let z = &mut self.zone_availability[piece as usize];
                *z += 1;
                if *z == 1 {
                    self.zone_held += 1;
                }
            }
        }
    }

    /// A peer with `pieces` left: its availability goes, and so do its requests.
    pub fn remove_peer(&mut self, peer: PeerKey, pieces: &Bitfield, in_zone: bool) {
        for i in pieces.iter_set() {
            let a = &mut self.availability[i as usize];
            *a = a.saturating_sub(1);
            if in_zone {
                let z = &mut self.zone_availability[i as usize];
                if *z == 1 {
                    self.zone_held -= 1;
                }
                *z = z.saturating_sub(1);
            }
        }
        self.release_all(peer);
    }

    /// Forgets every outstanding request of `peer` (it left, choked us, or went silent) so
    /// that other peers can take those blocks, and frees the pieces it owned.
    pub fn release_all(&mut self, peer: PeerKey) {
        for p in self.partial.values_mut() {
            for b in &mut p.blocks {
                b.requested_by.retain(|&k| k != peer);
            }
            if p.owner == Some(peer) {
                p.owner = None;
            }
        }
    }

    /// Forgets one request (the peer rejected it).
    pub fn release(&mut self, peer: PeerKey, block: BlockRef) {
        if let Some(p) = self.partial.get_mut(&block.piece)
            && let Some(b) = p.blocks.get_mut((block.offset / BLOCK_LEN) as usize)
        {
            b.requested_by.retain(|&k| k != peer);
        }
    }

    /// Up to `max` new requests for `peer`, which has `has` and is `in_zone` or not.
    pub fn pick(
        &mut self,
        peer: PeerKey,
        has: &Bitfield,
        in_zone: bool,
        max: usize,
    ) -> Vec<BlockRef> {
        let mut out = Vec::new();
        if max == 0 || self.is_complete() {
            return out;
        }
        // 1. Pieces this peer started, then orphaned partial pieces it can serve.
        let mut partials: Vec<u32> = self
            .partial
            .iter()
            .filter(|(i, p)| has.get(**i) && !self.verifying[**i as usize] && p.open_to(peer))
            .map(|(i, _)| *i)
            .collect();
        partials.sort_by_key(|i| (self.partial[i].owner != Some(peer), self.rank[*i as usize]));
        for i in partials {
            self.take_missing(peer, i, max, &mut out);
            if out.len() >= max {
                return out;
            }
        }
        // 2. New pieces, rarest first.
        while out.len() < max && (in_zone || self.outside_may_start()) {
            let Some(piece) = self.choose_new(has, in_zone) else {
                break;
            };
            let blocks = vec![BlockState::default(); self.geometry.block_count(piece) as usize];
            self.partial.insert(
                piece,
                Partial {
                    owner: Some(peer),
                    blocks,
                    received: 0,
                    outside: !in_zone,
                },
            );
            self.take_missing(peer, piece, max, &mut out);
        }
        // 3. Endgame: nothing left unrequested, so double up on what others are fetching.
        if out.is_empty() && self.all_requested() {
            let mut pieces: Vec<u32> = self
                .partial
                .keys()
                .copied()
                .filter(|&i| has.get(i) && !self.verifying[i as usize])
                .collect();
            pieces.sort_by_key(|&i| self.rank[i as usize]);
            'outer: for i in pieces {
                let p = self.partial.get_mut(&i).expect("listed above");
                for (b, state) in p.blocks.iter_mut().enumerate() {
                    if !state.received
                        && !state.requested_by.contains(&peer)
                        && state.requested_by.len() < ENDGAME_DUPLICATES
                    {
                        state.requested_by.push(peer);
                        out.push(block_ref(&self.geometry, i, b as u32));
                        if out.len() >= max {
                            break 'outer;
                        }
                    }
                }
            }
        }
        out
    }

    fn take_missing(&mut self, peer: PeerKey, piece: u32, max: usize, out: &mut Vec<BlockRef>) {
        let p = self.partial.get_mut(&piece).expect("partial piece exists");
        if p.open_to(peer) {
            p.owner = Some(peer);
        }
        for (b, state) in p.blocks.iter_mut().enumerate() {
            if out.len() >= max {
                return;
            }
            if !state.received && state.requested_by.is_empty() {
                state.requested_by.push(peer);
                out.push(block_ref(&self.geometry, piece, b as u32));
            }
        }
    }

    /// The best piece nobody has started that `has` holds.
    fn choose_new(&self, has: &Bitfield, in_zone: bool) -> Option<u32> {
        let candidates = (0..self.geometry.piece_count())
            .filter(|&i| has.get(i) && !self.have.get(i) && !self.partial.contains_key(&i));
        if self.have.count() == 0 && self.partial.is_empty() {
            // Random first piece: rarity matters less than having something to trade soon.
            return candidates.min_by_key(|&i| self.rank[i as usize]);
        }
        candidates.min_by_key(|&i| {
            let i = i as usize;
            // A peer outside the zone leaves to zone peers what they can serve.
            let zone_can = !in_zone && self.zone_availability[i] > 0;
            (zone_can, self.availability[i], self.rank[i])
        })
    }

    fn all_requested(&self) -> bool {
        let started: u32 = self.partial.len() as u32;
        if self.have.count() + started < self.geometry.piece_count() {
            return false;
        }
        self.partial.values().all(|p| {
            p.blocks
                .iter()
                .all(|b| b.received || !b.requested_by.is_empty())
        })
    }

    /// Records a block from `peer`.
    pub fn received(&mut self, peer: PeerKey, block: BlockRef) -> Received {
        let Some(p) = self.partial.get_mut(&block.piece) else {
            return Received::Unexpected;
        };
        if block.offset % BLOCK_LEN != 0 {
            return Received::Unexpected;
        }
        let index = (block.offset / BLOCK_LEN) as usize;
        let expected_len = match p.blocks.get(index) {
            Some(_) => self.geometry.block_size(block.piece, index as u32),
            None => return Received::Unexpected,
        };
        let state = &mut p.blocks[index];
        if state.received || block.len != expected_len || !state.requested_by.contains(&peer) {
            return Received::Unexpected;
        }
        state.received = true;
        state.from = Some(peer);
        let cancel: Vec<PeerKey> = state
            .requested_by
            .drain(..)
            .filter(|&k| k != peer)
            .collect();
        p.received += 1;
        if p.received as usize == p.blocks.len() {
            self.verifying[block.piece as usize] = true;
            Received::PieceDone { cancel }
        } else {
            Received::Block { cancel }
        }
    }

    /// The verdict on a piece that was [`Received::PieceDone`]: on success it is ours; on
    /// failure it starts over, and the returned (block offset, peer) say who sent each block.
    pub fn verified(&mut self, piece: u32, ok: bool) -> Vec<(u32, PeerKey)> {
        self.verifying[piece as usize] = false;
        let partial = self.partial.remove(&piece);
        if ok {
            self.have.set(piece);
            return Vec::new();
        }
        let Some(partial) = partial else {
            return Vec::new();
        };
        partial
            .blocks
            .iter()
            .enumerate()
            .filter_map(|(b, state)| Some((b as u32 * BLOCK_LEN, state.from?)))
            .collect()
    }

    /// Whether `peer` has anything we still need.
    pub fn wants_from(&self, has: &Bitfield) -> bool {
        if has.is_full() {
            return !self.have.is_full();
        }
        has.iter_set().any(|i| !self.have.get(i))
    }
}

fn block_ref(geometry: &Geometry, piece: u32, block: u32) -> BlockRef {
    BlockRef {
        piece,
        offset: block * BLOCK_LEN,
        len: geometry.block_size(piece, block),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(pieces: u32) -> Geometry {
        Geometry {
            total_len: u64::from(pieces) * 2 * u64::from(BLOCK_LEN) - 100,
            piece_len: 2 * BLOCK_LEN,
        }
    }

    #[test]
    fn rarest_piece_first_and_partial_pieces_finished_first() {
        let g = geometry(4);
        let mut p = Picker::new(g, Bitfield::new(4));
        let mut has_all = Bitfield::full(4);
        p.add_availability(&has_all, false);
        // A second peer has everything but piece 2, so piece 2 is the rarest.
        has_all.clear(2);
        p.add_availability(&has_all, false);
        p.have.set(0); // not the first piece any more: rarest-first applies
        let reqs = p.pick(1, &Bitfield::full(4), false, 1);
        assert_eq!(reqs[0].piece, 2);
        // The same peer finishes piece 2 before starting another.
        let reqs = p.pick(1, &Bitfield::full(4), false, 1);
        assert_eq!((reqs[0].piece, reqs[0].offset), (2, BLOCK_LEN));
    }

    #[test]
    fn a_piece_belongs_to_the_peer_that_started_it() {
        let g = geometry(2);
        let mut p = Picker::new(g, Bitfield::new(2));
        let all = Bitfield::full(2);
        let a = p.pick(1, &all, false, 1);
        let b = p.pick(2, &all, false, 1);
        assert_ne!(
            a[0].piece, b[0].piece,
            "peer 2 must not take peer 1's piece"
        );
        // Peer 1 leaves: its piece is free for peer 2.
        p.remove_peer(1, &all, false);
        let c = p.pick(2, &all, false, 4);
        assert!(c.iter().any(|r| r.piece == a[0].piece));
    }

    #[test]
    fn a_piece_whose_owner_has_no_request_out_for_it_is_open_to_others() {
        let g = geometry(2);
        let mut p = Picker::new(g, Bitfield::new(2));
        let all = Bitfield::full(2);
        let a = p.pick(1, &all, false, 1);
        // Peer 1 choked us and rejected the request (the fast extension keeps it connected).
        p.release(1, a[0]);
        let b = p.pick(2, &all, false, 2);
        assert!(
            b.contains(&a[0]),
            "peer 2 must be able to take the piece peer 1 no longer serves: {b:?}"
        );
        // Peer 2 owns it now: peer 1, unchoking us again, starts the other piece.
        let c = p.pick(1, &all, false, 4);
        assert!(c.iter().all(|r| r.piece != a[0].piece), "{c:?}");
    }

    #[test]
    fn completes_verifies_and_blames_on_failure() {
        let g = geometry(1);
        let mut p = Picker::new(g, Bitfield::new(1));
        let all = Bitfield::full(1);
        let reqs = p.pick(7, &all, false, 10);
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[1].len, BLOCK_LEN - 100);
        assert_eq!(p.received(7, reqs[0]), Received::Block { cancel: vec![] });
        assert_eq!(p.received(7, reqs[0]), Received::Unexpected);
        assert_eq!(
            p.received(7, reqs[1]),
            Received::PieceDone { cancel: vec![] }
        );
        assert!(
            p.pick(7, &all, false, 10).is_empty(),
            "verifying: nothing to pick"
        );
        assert_eq!(p.verified(0, false), vec![(0, 7), (BLOCK_LEN, 7)]);
        // It starts over.
        let again = p.pick(8, &all, false, 10);
        assert_eq!(again.len(), 2);
        p.received(8, again[0]);
        p.received(8, again[1]);
        assert!(p.verified(0, true).is_empty());
        assert!(p.is_complete());
        assert_eq!(p.bytes_done(), g.total_len);
    }

    #[test]
    fn endgame_doubles_up_and_cancels_the_duplicate() {
        let g = geometry(1);
        let mut p = Picker::new(g, Bitfield::new(1));
        let all = Bitfield::full(1);
        let first = p.pick(1, &all, false, 10);
        let second = p.pick(2, &all, false, 10);
        assert_eq!(
            first, second,
            "endgame requests the same blocks from peer 2"
        );
        assert!(
            p.pick(3, &all, false, 10).is_empty(),
            "at most two requesters"
        );
        assert_eq!(p.received(2, first[0]), Received::Block { cancel: vec![1] });
    }

    #[test]
    fn unrequested_and_misaligned_blocks_are_unexpected() {
        let g = geometry(2);
        let mut p = Picker::new(g, Bitfield::new(2));
        let all = Bitfield::full(2);
        let reqs = p.pick(1, &all, false, 1);
        let r = reqs[0];
        assert_eq!(
            p.received(2, r),
            Received::Unexpected,
            "not asked of peer 2"
        );
        let odd = BlockRef {
            offset: r.offset + 1,
            ..r
        };
        assert_eq!(p.received(1, odd), Received::Unexpected);
        let short = BlockRef {
            len: r.len - 1,
            ..r
        };
        assert_eq!(p.received(1, short), Received::Unexpected);
    }

    #[test]
    fn a_quarter_second_of_the_peers_rate_is_in_flight_within_bounds() {
        let mib = 1024.0 * 1024.0;
        assert_eq!(pipeline_depth(8.0 * mib), 128, "2 MiB of 16 KiB blocks");
        assert_eq!(pipeline_depth(0.0), MIN_PIPELINE, "a peer not yet measured");
        assert_eq!(pipeline_depth(1e12), MAX_PIPELINE);
    }

    #[test]
    fn peers_outside_the_zone_leave_zone_pieces_to_the_zone() {
        let g = geometry(3);
        let mut have = Bitfield::new(3);
        have.set(0);
        let mut p = Picker::new(g, have);
        let mut zone_has = Bitfield::new(3);
        zone_has.set(1);
        p.add_availability(&zone_has, true);
        p.add_availability(&Bitfield::full(3), false);
        let reqs = p.pick(9, &Bitfield::full(3), false, 1);
        assert_eq!(reqs[0].piece, 2, "piece 1 is left to the zone peer");
    }

    #[test]
    fn peers_outside_the_zone_get_a_few_pieces_at_a_time_once_the_zone_holds_some() {
        let g = geometry(20);
        let pieces = |reqs: &[BlockRef]| {
            let mut p: Vec<u32> = reqs.iter().map(|r| r.piece).collect();
            p.dedup();
            p.len()
        };
        let all = Bitfield::full(20);
        // Nothing held in the zone (or no zone at all): no limit.
        let mut p = Picker::new(g, Bitfield::new(20));
        p.add_availability(&all, false);
        assert_eq!(pieces(&p.pick(1, &all, false, 40)), 20);

        let mut p = Picker::new(g, Bitfield::new(20));
        let mut zone_has = Bitfield::new(20);
        zone_has.set(0);
        p.add_availability(&zone_has, true);
        p.add_availability(&all, false);
        let outside = p.pick(1, &all, false, 40);
        assert_eq!(pieces(&outside), OUTSIDE_PIECES, "{outside:?}");
        assert!(
            p.pick(2, &all, false, 40).is_empty(),
            "a second peer outside the zone shares the same allowance"
        );
        // The zone's only piece leaves with its peer: no limit again.
        p.remove_peer(99, &zone_has, true);
        assert_eq!(pieces(&p.pick(2, &all, false, 4)), 2);
        p.add_availability(&zone_has, true);
        // A zone peer takes as much as it likes.
        let inside = p.pick(3, &all, true, 40);
        assert_eq!(pieces(&inside), 20 - OUTSIDE_PIECES - 2, "{inside:?}");
        // Pieces from outside done and verified, the next ones may start.
        let mut q = Picker::new(g, Bitfield::new(20));
        q.add_availability(&zone_has, true);
        q.add_availability(&all, false);
        let first = q.pick(1, &all, false, 40);
        assert!(q.pick(1, &all, false, 40).is_empty(), "at the limit");
        for r in &first {
            q.received(1, *r);
        }
        for piece in [first[0].piece, first[first.len() - 1].piece] {
            assert!(q.verified(piece, true).is_empty());
        }
        assert_eq!(pieces(&q.pick(1, &all, false, 40)), OUTSIDE_PIECES);
    }

    #[test]
    fn interest() {
        let g = geometry(2);
        let mut have = Bitfield::new(2);
        have.set(0);
        let p = Picker::new(g, have.clone());
        assert!(!p.wants_from(&have));
        assert!(p.wants_from(&Bitfield::full(2)));
    }
}
