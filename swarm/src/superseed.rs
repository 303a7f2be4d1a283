//! Super-seeding (BEP 16): serving a complete file so that each piece leaves us about once,
//! without starving any peer.
//!
//! A super-seeder hides what it has and offers each peer a few pieces at a time, each as a
//! HAVE the peer may then request. A piece goes to the peer it was offered to least often,
//! counting the peers seen with it, so the first round hands every piece to one peer before
//! any piece goes to a second.
//!
//! An offer is *pending* until the peer has requested all of it, then *held* until another
//! peer is seen with the piece (the peer passed it on). A peer holds pending offers up to its
//! target: enough to cover [`COVER`] at the rate we upload to it, and at least [`FLOOR`]; and
//! pending and held ones together up to [`HOLD_FACTOR`] times that. Counting what a peer
//! requested, not what it announced, keeps a peer whose HAVEs come in batches (Transmission
//! sends them about once a second) supplied meanwhile; and sizing the target by its rate lets
//! a fast peer's link fill while a fleet sharing our link (each peer getting a share of it)
//! still gets a few distinct pieces each.
//!
//! A piece is *out* while another connected peer has it or was offered it. A peer that
//! others can serve is offered only pieces not out: one that is out would leave us a second
//! time, and the others have it or soon will. Once every piece it lacks is out, it gets
//! nothing more from us unless it announced nothing for [`IDLE`] (the others are not
//! serving it): then up to [`FLOOR`] pieces that are out. A piece offered to a peer that
//! left before passing it on is no longer out, and is offered again.
//!
//! Holding is skipped where it cannot help: when nobody else lacks the piece (nobody to pass
//! it on to), and when nobody else has, or was offered, anything the peer lacks (a lone
//! leecher: it can get pieces from us only, so it is served as a plain seed would, its
//! target ahead of its requests). A held offer not passed on is released [`RELEASE`] after the peer announced it
//! ([`RELEASE_UNANNOUNCED`] after it took it, for a peer that announces late or never). An
//! offer the peer leaves unrequested for [`IGNORED`] while it may request (unchoked) stops
//! counting, so a client that picks its own order, or ignores some offers, is offered more
//! instead of being stalled (once every piece is out, when it is idle).
//!
//! Pure functions over the torrent's peers ([`Peer`]: what each has, what it was offered, what
//! we sent it, whether it may request) and the time the caller passes in; they return the
//! offers to send, and the torrent sends them.

use std::collections::HashSet;
use std::time::Duration;

use tokio::time::Instant;

use crate::picker::PeerKey;
use crate::{Bitfield, Geometry};

/// The fewest offers a peer holds: a slow or new peer's target.
pub const FLOOR: usize = 4;
/// A peer others can serve that announced no piece for this long (or since it was first
/// offered any) is offered pieces that are out: the others are not serving it. Longer than
/// the second a batched-HAVE client waits between announcements.
pub const IDLE: Duration = Duration::from_secs(2);
/// A peer's offers cover this long at the rate we upload to it: more than the second a
/// batched-HAVE client waits between announcements.
pub const COVER: Duration = Duration::from_secs(2);
/// A peer may hold pending offers up to its target, and pending and held ones together up to
/// this many times its target: a held offer stays a second or two after the peer took it
/// (its HAVE, then [`RELEASE`], seen at a tick), longer than [`COVER`] if HAVEs are batched.
pub const HOLD_FACTOR: usize = 2;
/// The most a peer's pending offers may add up to, in bytes (at least [`FLOOR`] pieces).
pub const MOST_BYTES: u64 = 128 << 20;
/// A held offer the peer announced this long ago is released even if no other peer picked
/// it up.
pub const RELEASE: Duration = Duration::from_millis(1500);
/// A held offer the peer took (requested in full) this long ago and never announced is
/// released all the same.
pub const RELEASE_UNANNOUNCED: Duration = Duration::from_secs(4);
/// A pending offer the peer has not requested from for this long, while it could, stops
/// counting against its target.
pub const IGNORED: Duration = Duration::from_secs(3);
/// Rate samples shorter than this are not taken: a tick that comes early would read as a
/// burst.
const SAMPLE_AT_LEAST: Duration = Duration::from_millis(500);

/// One piece offered to one peer, while it counts against the peer's target.
#[derive(Debug, Clone, Copy)]
struct Offer {
    piece: u32,
    /// When it was made, last requested from, or last found with the peer choked: how long
    /// it has lain unrequested while the peer could request it.
    touched: Instant,
    /// Bytes of it the peer requested.
    requested: u64,
    /// When the peer had requested all of it (or announced it).
    taken: Option<Instant>,
    /// When the peer announced it.
    announced: Option<Instant>,
}

impl Offer {
    fn pending(&self) -> bool {
        self.taken.is_none()
    }

    /// A pending offer left unrequested for [`IGNORED`].
    fn ignored(&self, now: Instant) -> bool {
        self.pending() && now.saturating_duration_since(self.touched) >= IGNORED
    }

    /// A held offer's time is up.
    fn expired(&self, now: Instant) -> bool {
        match (self.announced, self.taken) {
            (Some(at), _) => now.saturating_duration_since(at) >= RELEASE,
            (None, Some(at)) => now.saturating_duration_since(at) >= RELEASE_UNANNOUNCED,
            (None, None) => false,
        }
    }
}

/// What super-seeding keeps of one peer.
#[derive(Debug, Default)]
pub struct Offers {
    /// Offers that count against its target: pending or held.
    live: Vec<Offer>,
    /// Every piece ever offered to it.
    offered: HashSet<u32>,
    /// Bytes per second we upload to it: up at once, down by halves, so a peer whose offers
    /// grow is not held back by its own past.
    rate: f64,
    /// Its upload counter at the last sample, and when.
    sample: Option<(Instant, u64)>,
    /// When it last announced a piece, or was first topped up: how long it has gone without
    /// getting anything.
    active: Option<Instant>,
}

impl Offers {
    /// Whether the peer may request `piece`: only what it was offered.
    pub fn may_request(&self, piece: u32) -> bool {
        self.offered.contains(&piece)
    }

    /// Offers made before we knew what the peer had: the ones it holds already are moot.
    pub fn forget_held(&mut self, has: &Bitfield) {
        self.live.retain(|o| !has.get(o.piece));
    }

    /// The peer requested `len` bytes of `piece` (`piece_size` long). Returns whether that
    /// completes taking an offer: then the torrent calls [`SuperSeed::taken`], which makes
    /// room for the next one.
    pub fn requested(&mut self, piece: u32, len: u32, piece_size: u32, now: Instant) -> bool {
        let Some(offer) = self.live.iter_mut().find(|o| o.piece == piece) else {
            return false;
        };
        offer.touched = now;
        offer.requested += u64::from(len);
        if offer.taken.is_none() && offer.requested >= u64::from(piece_size) {
            offer.taken = Some(now);
            return true;
        }
        false
    }

    /// Whether it announced nothing for [`IDLE`].
    fn idle(&self, now: Instant) -> bool {
        self.active
            .is_some_and(|at| now.saturating_duration_since(at) >= IDLE)
    }

    /// For the logs: the rate we upload to it (bytes per second), its pending and its held
    /// offers.
    pub fn summary(&self, now: Instant) -> (u64, usize, usize) {
        let (pending, held) = self.counted(now);
        (self.rate as u64, pending, held)
    }

    /// Takes a rate sample from the peer's upload counter.
    fn observe(&mut self, uploaded: u64, now: Instant) {
        if let Some((at, before)) = self.sample {
            let secs = now.saturating_duration_since(at);
            if secs < SAMPLE_AT_LEAST {
                return;
            }
            let rate = uploaded.saturating_sub(before) as f64 / secs.as_secs_f64();
            self.rate = if rate >= self.rate {
                rate
            } else {
                (self.rate + rate) / 2.0
            };
        }
        self.sample = Some((now, uploaded));
    }

    /// Offers that count against the target now: pending (not ignored), and held.
    fn counted(&self, now: Instant) -> (usize, usize) {
        let pending = self
            .live
            .iter()
            .filter(|o| o.pending() && !o.ignored(now))
            .count();
        let held = self.live.iter().filter(|o| !o.pending()).count();
        (pending, held)
    }
}

/// One peer as super-seeding sees it.
pub struct Peer<'a> {
    /// The connection.
    pub key: PeerKey,
    /// The pieces it announced.
    pub has: &'a Bitfield,
    /// What it was offered.
    pub offers: &'a mut Offers,
    /// Payload bytes we sent it so far.
    pub uploaded: u64,
    /// Whether we let it request (unchoked): offers do not go stale while it cannot.
    pub unchoked: bool,
}

/// The torrent's side of super-seeding.
#[derive(Debug)]
pub struct SuperSeed {
    geometry: Geometry,
    /// How often each piece was offered.
    offer_count: Vec<u32>,
}

impl SuperSeed {
    /// For a torrent of `geometry`, nothing offered yet.
    pub fn new(geometry: Geometry) -> SuperSeed {
        SuperSeed {
            geometry,
            offer_count: vec![0; geometry.piece_count() as usize],
        }
    }

    /// How many pending offers a peer with `offers` may hold: [`COVER`] at its rate, at least
    /// [`FLOOR`], at most [`MOST_BYTES`] worth.
    pub fn target(&self, offers: &Offers) -> usize {
        let piece = f64::from(self.geometry.piece_len.max(1));
        let most = ((MOST_BYTES as f64 / piece) as usize).max(FLOOR);
        let cover = (offers.rate * COVER.as_secs_f64() / piece).ceil();
        // A float to usize cast saturates; NaN (never, rates are finite) would give 0.
        (cover as usize).clamp(FLOOR, most)
    }

    /// Tops up `key`'s offers to its target, each time with a piece not out before one that
    /// is, then the piece offered least often and held by the fewest peers (ties broken at
    /// random). A peer others can serve gets pieces that are out only when idle. Returns the
    /// pieces newly offered to it, in order.
    pub fn top_up(&mut self, peers: &mut [Peer<'_>], key: PeerKey, now: Instant) -> Vec<u32> {
        let Some(at) = peers.iter().position(|p| p.key == key) else {
            return Vec::new();
        };
        // Its idle clock starts with its first top-up, not at zero: a peer that just came
        // has not been left without pieces yet.
        peers[at].offers.active.get_or_insert(now);
        let peer = &peers[at];
        if peer.has.is_full() {
            return Vec::new();
        }
        let (pending, held) = peer.offers.counted(now);
        let room_for = |target: usize| {
            target
                .saturating_sub(pending)
                .min((HOLD_FACTOR * target).saturating_sub(pending + held))
        };
        let room = room_for(self.target(peer.offers));
        if room == 0 {
            return Vec::new();
        }
        // A piece that is out would leave us a second time if taken: a peer others can
        // serve gets those only when they are not serving it.
        let out_room = if alone(peers, at) {
            room
        } else if peer.offers.idle(now) {
            room_for(FLOOR)
        } else {
            0
        };
        // Offering a piece raises only its own score and makes it out, and it is not
        // offered to this peer twice: the `room` lowest keys now are the pieces one-by-one
        // picking would take.
        let mut seen = vec![0u32; self.offer_count.len()];
        let mut out = vec![false; self.offer_count.len()];
        for (i, p) in peers.iter().enumerate() {
            for piece in p.has.iter_set() {
                if let Some(n) = seen.get_mut(piece as usize) {
                    *n += 1;
                }
            }
            if i != at {
                for &piece in &p.offers.offered {
                    if let Some(o) = out.get_mut(piece as usize) {
                        *o = true;
                    }
                }
            }
        }
        let peer = &peers[at];
        let mut candidates: Vec<(bool, u32, u16, u32)> = (0..self.offer_count.len() as u32)
            .filter(|&i| !peer.has.get(i) && !peer.offers.offered.contains(&i))
            .map(|i| {
                // Seen with another peer (it lacks the piece, so the one seen is another).
                let is_out = out[i as usize] || seen[i as usize] > 0;
                let score = self.offer_count[i as usize] + seen[i as usize];
                (is_out, score, rand::random::<u16>(), i)
            })
            .collect();
        let not_out = candidates.iter().filter(|c| !c.0).count();
        let take = room.min(not_out.max(out_room));
        if take == 0 {
            return Vec::new();
        }
        if candidates.len() > take {
            candidates.select_nth_unstable(take - 1);
            candidates.truncate(take);
        }
        candidates.sort_unstable();
        let offers = &mut peers[at].offers;
        let mut new = Vec::with_capacity(candidates.len());
        for (_, _, _, piece) in candidates {
            self.offer_count[piece as usize] += 1;
            offers.live.push(Offer {
                piece,
                touched: now,
                requested: 0,
                taken: None,
                announced: None,
            });
            offers.offered.insert(piece);
            new.push(piece);
        }
        new
    }

    /// `key` requested the last of its offer of `piece` ([`Offers::requested`] said so): the
    /// offer is held, or done at once when holding cannot help. Returns the new offers.
    pub fn taken(
        &mut self,
        peers: &mut [Peer<'_>],
        key: PeerKey,
        piece: u32,
        now: Instant,
    ) -> Vec<u32> {
        let Some(at) = peers.iter().position(|p| p.key == key) else {
            return Vec::new();
        };
        if !worth_holding(peers, at, piece) {
            peers[at].offers.live.retain(|o| o.piece != piece);
        }
        self.top_up(peers, key, now)
    }

    /// `from` announced `piece`. Other peers' offers of that piece are done (it now spreads
    /// without us) and they get new ones; `from`'s own offer of it is held, with its
    /// [`RELEASE`] clock started, or done at once when holding cannot help. Returns the new
    /// offers.
    pub fn seen(
        &mut self,
        peers: &mut [Peer<'_>],
        from: PeerKey,
        piece: u32,
        now: Instant,
    ) -> Vec<(PeerKey, u32)> {
        let Some(at) = peers.iter().position(|p| p.key == from) else {
            return Vec::new();
        };
        peers[at].offers.active = Some(now);
        let hold = worth_holding(peers, at, piece);
        let mut refill = Vec::new();
        for (i, peer) in peers.iter_mut().enumerate() {
            let live = &mut peer.offers.live;
            if i == at {
                if hold {
                    for offer in live.iter_mut().filter(|o| o.piece == piece) {
                        offer.announced.get_or_insert(now);
                        offer.taken.get_or_insert(now);
                    }
                } else {
                    live.retain(|o| o.piece != piece);
                }
                continue;
            }
            let before = live.len();
            live.retain(|o| o.piece != piece);
            if live.len() != before {
                refill.push(peer.key);
            }
        }
        refill.push(from);
        self.refill(peers, refill, now)
    }

    /// Once a second or so: samples every peer's rate, releases held offers whose time is
    /// up or that holding no longer helps, takes back offers a peer ignored, and tops up
    /// every peer. Returns the new offers.
    pub fn tick(&mut self, peers: &mut [Peer<'_>], now: Instant) -> Vec<(PeerKey, u32)> {
        // Which held offers to let go, decided before any peer's offers change.
        let release: Vec<Vec<u32>> = (0..peers.len())
            .map(|at| {
                let alone = alone(peers, at);
                peers[at]
                    .offers
                    .live
                    .iter()
                    .filter(|o| !o.pending())
                    .filter(|o| o.expired(now) || alone || !needed_elsewhere(peers, at, o.piece))
                    .map(|o| o.piece)
                    .collect()
            })
            .collect();
        let mut keys = Vec::with_capacity(peers.len());
        for (peer, release) in peers.iter_mut().zip(release) {
            let offers = &mut *peer.offers;
            offers.observe(peer.uploaded, now);
            let unchoked = peer.unchoked;
            offers.live.retain_mut(|o| {
                if release.contains(&o.piece) {
                    return false;
                }
                if !unchoked {
                    // It cannot request: not its fault that it does not.
                    o.touched = now;
                }
                // It stops counting, but stays offered (the peer may still ask for it, and
                // then it leaves us): it is not handed to another peer as if never offered.
                !o.ignored(now)
            });
            keys.push(peer.key);
        }
        self.refill(peers, keys, now)
    }

    fn refill(
        &mut self,
        peers: &mut [Peer<'_>],
        keys: Vec<PeerKey>,
        now: Instant,
    ) -> Vec<(PeerKey, u32)> {
        let mut new = Vec::new();
        for key in keys {
            new.extend(
                self.top_up(peers, key, now)
                    .into_iter()
                    .map(|piece| (key, piece)),
            );
        }
        new
    }
}

/// Whether holding `peers[at]`'s offer of `piece` until it passes the piece on can help:
/// another peer lacks the piece (someone to pass it on to), and another peer has something
/// `peers[at]` lacks (it is not a lone leecher, which only we can serve).
fn worth_holding(peers: &[Peer<'_>], at: usize, piece: u32) -> bool {
    needed_elsewhere(peers, at, piece) && !alone(peers, at)
}

/// Whether a peer other than `peers[at]` lacks `piece`.
fn needed_elsewhere(peers: &[Peer<'_>], at: usize, piece: u32) -> bool {
    peers
        .iter()
        .enumerate()
        .any(|(i, p)| i != at && !p.has.get(piece))
}

/// Whether nobody but us has, or was offered, anything `peers[at]` lacks: only we can serve
/// it. A piece offered to another peer is as good as held by it: when a fleet connects at
/// once, every peer holds nothing, and counting each as a lone leecher offered the first
/// peers' pieces to the next ones too (0.16 extra copies from the server in the simulated
/// 300-machine lab).
fn alone(peers: &[Peer<'_>], at: usize) -> bool {
    let me = &peers[at];
    let lacks = me.has.as_bytes();
    !peers.iter().enumerate().any(|(i, p)| {
        i != at
            && (p
                .has
                .as_bytes()
                .iter()
                .zip(lacks)
                .any(|(theirs, ours)| theirs & !ours != 0)
                || p.offers.offered.iter().any(|&piece| !me.has.get(piece)))
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// 256 KiB pieces, as the server makes them for images of a few hundred MiB.
    const PIECE: u32 = 256 << 10;

    /// A swarm as super-seeding sees it: each peer's pieces, offers, what we sent it and
    /// whether it is unchoked.
    struct Swarm {
        seed: SuperSeed,
        peers: Vec<(PeerKey, Bitfield, Offers, u64, bool)>,
    }

    impl Swarm {
        /// `peers` unchoked leechers holding nothing of a torrent of `pieces` pieces.
        fn new(pieces: u32, peers: u64) -> Swarm {
            let geometry = Geometry {
                total_len: u64::from(pieces) * u64::from(PIECE),
                piece_len: PIECE,
            };
            Swarm {
                seed: SuperSeed::new(geometry),
                peers: (0..peers)
                    .map(|k| (k, Bitfield::new(pieces), Offers::default(), 0, true))
                    .collect(),
            }
        }

        fn top_up(&mut self, key: PeerKey, now: Instant) -> Vec<u32> {
            self.seed.top_up(&mut view(&mut self.peers), key, now)
        }

        /// `key` announces `piece`.
        fn announce(&mut self, key: PeerKey, piece: u32, now: Instant) -> Vec<(PeerKey, u32)> {
            self.peers[key as usize].1.set(piece);
            self.seed.seen(&mut view(&mut self.peers), key, piece, now)
        }

        /// `key` requests every block of `piece`, which we send it at once; returns the
        /// offers that made room for.
        fn request(&mut self, key: PeerKey, piece: u32, now: Instant) -> Vec<u32> {
            let peer = &mut self.peers[key as usize];
            assert!(peer.2.may_request(piece), "{piece} was never offered");
            peer.3 += u64::from(PIECE);
            let mut taken = false;
            for _ in 0..PIECE / crate::BLOCK_LEN {
                taken |= peer.2.requested(piece, crate::BLOCK_LEN, PIECE, now);
            }
            if taken {
                self.seed.taken(&mut view(&mut self.peers), key, piece, now)
            } else {
                Vec::new()
            }
        }

        /// `key` takes every offer it can, as a peer with a fast link would, until it has
        /// none left pending; returns the pieces it took.
        fn take_all(&mut self, key: PeerKey, now: Instant) -> Vec<u32> {
            let mut took = Vec::new();
            while let Some(&piece) = self.pending(key).first() {
                self.request(key, piece, now);
                took.push(piece);
                assert!(took.len() <= 1000, "offers without end");
            }
            took
        }

        fn tick(&mut self, now: Instant) -> Vec<(PeerKey, u32)> {
            self.seed.tick(&mut view(&mut self.peers), now)
        }

        /// Offers that count against `key`'s target.
        fn live(&self, key: PeerKey) -> BTreeSet<u32> {
            self.peers[key as usize]
                .2
                .live
                .iter()
                .map(|o| o.piece)
                .collect()
        }

        /// Offers `key` may request and has not yet.
        fn pending(&self, key: PeerKey) -> BTreeSet<u32> {
            self.peers[key as usize]
                .2
                .live
                .iter()
                .filter(|o| o.pending())
                .map(|o| o.piece)
                .collect()
        }
    }

    fn view(peers: &mut [(PeerKey, Bitfield, Offers, u64, bool)]) -> Vec<Peer<'_>> {
        peers
            .iter_mut()
            .map(|(key, has, offers, uploaded, unchoked)| Peer {
                key: *key,
                has,
                offers,
                uploaded: *uploaded,
                unchoked: *unchoked,
            })
            .collect()
    }

    #[test]
    fn each_piece_is_offered_to_one_peer_before_any_goes_to_a_second() {
        let t0 = Instant::now();
        let mut swarm = Swarm::new(12, 4);
        let firsts: Vec<BTreeSet<u32>> = (0..3)
            .map(|k| swarm.top_up(k, t0).into_iter().collect())
            .collect();
        for offered in &firsts {
            assert_eq!(offered.len(), FLOOR);
        }
        let all: BTreeSet<u32> = firsts.iter().flatten().copied().collect();
        assert_eq!(
            all.len(),
            12,
            "three peers, four offers each: twelve pieces"
        );
        // Every piece is out: the fourth peer, which the other three can serve, gets none of
        // them twice (a fleet connecting at once is not a crowd of lone leechers)...
        assert!(swarm.top_up(3, t0).is_empty());
        // ...unless it goes without for IDLE: then pieces already out, one offer each.
        let fourth = swarm.top_up(3, t0 + IDLE);
        assert_eq!(fourth.len(), FLOOR);
        assert_eq!(fourth.iter().collect::<BTreeSet<_>>().len(), FLOOR);
        // Topping up a peer that holds its full share offers nothing more.
        assert!(swarm.top_up(0, t0).is_empty());
    }

    #[test]
    fn pieces_others_hold_are_offered_only_to_an_idle_peer() {
        let t0 = Instant::now();
        let mut swarm = Swarm::new(4, 2);
        // Peer 1 announced pieces 0 and 1 (from another source): peer 0 can get them there.
        swarm.peers[1].1.set(0);
        swarm.peers[1].1.set(1);
        let offered = swarm.top_up(0, t0);
        assert_eq!(
            offered.iter().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([2, 3])
        );
        assert!(swarm.top_up(0, t0 + IDLE / 2).is_empty());
        // It announced nothing for IDLE: peer 1 is not serving it, so we do, up to its floor.
        let idle = swarm.top_up(0, t0 + IDLE);
        assert_eq!(
            idle.iter().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([0, 1])
        );
    }

    #[test]
    fn a_piece_offered_to_a_peer_that_left_is_offered_again() {
        let t0 = Instant::now();
        let mut swarm = Swarm::new(8, 3);
        let first = swarm.top_up(0, t0);
        let other = swarm.top_up(1, t0);
        // Every piece is out, and peer 1 holds one peer 2 lacks: peer 2 gets nothing.
        swarm.peers[1].1.set(other[0]);
        assert!(swarm.top_up(2, t0).is_empty());
        // Peer 0 leaves before taking its offers: nobody else has or was offered them.
        let again = swarm.seed.top_up(&mut view(&mut swarm.peers[1..]), 2, t0);
        assert_eq!(
            again.iter().copied().collect::<BTreeSet<_>>(),
            first.iter().copied().collect::<BTreeSet<_>>()
        );
    }

    #[test]
    fn a_peer_may_request_only_what_it_was_offered() {
        let mut swarm = Swarm::new(8, 1);
        let offered = swarm.top_up(0, Instant::now());
        let offers = &swarm.peers[0].2;
        for piece in 0..8 {
            assert_eq!(offers.may_request(piece), offered.contains(&piece));
        }
    }

    #[test]
    fn an_offer_passed_on_makes_room_for_a_new_one() {
        let t0 = Instant::now();
        // Pieces enough that some are still not out when peer 0 has passed one on.
        let mut swarm = Swarm::new(16, 2);
        let first = swarm.top_up(0, t0);
        let other = swarm.top_up(1, t0);
        // Peer 1 holds a piece peer 0 lacks: peer 0 is no lone leecher, so it is held to
        // passing on what it got.
        swarm.announce(1, other[0], t0);
        // It takes what it is offered until it holds all it may: its target pending at
        // first, HOLD_FACTOR times that in all.
        let took = swarm.take_all(0, t0);
        assert_eq!(took.len(), HOLD_FACTOR * FLOOR);
        assert!(first.iter().all(|p| took.contains(p)));
        assert_eq!(swarm.live(0).len(), HOLD_FACTOR * FLOOR);
        let piece = took[0];
        assert!(swarm.announce(0, piece, t0).is_empty());
        assert!(swarm.live(0).contains(&piece));
        // Peer 1 got it too, so peer 0 passed it on: peer 0 gets a new piece.
        let new = swarm.announce(1, piece, t0);
        let to_0: Vec<u32> = new.iter().filter(|o| o.0 == 0).map(|o| o.1).collect();
        assert_eq!(to_0.len(), 1, "{new:?}");
        assert!(
            !took.contains(&to_0[0]),
            "a new piece, not one offered before"
        );
        assert!(!swarm.live(0).contains(&piece));
        assert_eq!(swarm.live(0).len(), HOLD_FACTOR * FLOOR);
    }

    #[test]
    fn an_offer_not_passed_on_is_released_after_a_while() {
        let t0 = Instant::now();
        let mut swarm = Swarm::new(16, 2);
        let first = swarm.top_up(0, t0);
        let other = swarm.top_up(1, t0);
        swarm.announce(1, other[0], t0);
        let took = swarm.take_all(0, t0);
        assert!(took.contains(&first[0]));
        assert!(swarm.announce(0, first[0], t0).is_empty());
        // Nobody picked the piece up from peer 0, but it is not released before its time.
        assert!(swarm.tick(t0 + RELEASE / 2).is_empty());
        assert!(swarm.live(0).contains(&first[0]));
        // Then it is: peer 0 gets a new offer.
        let new = swarm.tick(t0 + RELEASE);
        let to_0: Vec<u32> = new.iter().filter(|o| o.0 == 0).map(|o| o.1).collect();
        assert_eq!(to_0.len(), 1, "{new:?}");
        assert!(!took.contains(&to_0[0]));
        // Taken and never announced, the others are released a little later: room for
        // its target, besides the one still pending.
        let new = swarm.tick(t0 + RELEASE_UNANNOUNCED);
        assert_eq!(
            new.iter().filter(|o| o.0 == 0).count(),
            FLOOR - 1,
            "{new:?}"
        );
    }

    #[test]
    fn a_lone_leecher_is_served_as_by_a_plain_seed() {
        let t0 = Instant::now();
        let mut swarm = Swarm::new(64, 1);
        let first = swarm.top_up(0, t0);
        assert_eq!(first.len(), FLOOR);
        // Each piece it takes (requests in full) is replaced at once, before any HAVE: it
        // always has FLOOR pieces ahead of its requests.
        let mut got = BTreeSet::new();
        for _ in 0..40 {
            let next = *swarm.pending(0).first().expect("a pending offer");
            let new = swarm.request(0, next, t0);
            assert_eq!(new.len(), 1, "taking {next} makes room for one more");
            got.insert(next);
            assert_eq!(swarm.pending(0).len(), FLOOR);
        }
        assert_eq!(got.len(), 40);
        // With a second leecher that has nothing to give it, it is still alone.
        let mut swarm = Swarm::new(64, 2);
        let first = swarm.top_up(0, t0);
        swarm.top_up(1, t0);
        assert_eq!(swarm.request(0, first[0], t0).len(), 1);
        // Once the other has a piece it lacks, holding applies again: it runs out of offers
        // after taking HOLD_FACTOR times its target.
        let theirs = *swarm.pending(1).first().unwrap();
        swarm.announce(1, theirs, t0);
        swarm.take_all(0, t0);
        assert!(swarm.pending(0).is_empty());
        assert_eq!(swarm.live(0).len(), HOLD_FACTOR * FLOOR);
    }

    #[test]
    fn a_batched_have_peer_gets_offers_to_fill_its_link() {
        // A peer that takes 8 pieces (2 MiB) a second of whatever it is offered and announces
        // them only once a second, in a batch, while another peer holds pieces it lacks (so
        // it is super-seeded, not served as a lone leecher).
        let t0 = Instant::now();
        let mut swarm = Swarm::new(4096, 2);
        swarm.top_up(0, t0);
        let other = swarm.top_up(1, t0);
        swarm.announce(1, other[0], t0);
        let per_sec = 8;
        let mut now = t0;
        swarm.tick(now);
        let mut unannounced = Vec::new();
        let mut short = 0;
        for _ in 0..20 {
            // A second in eighths: each eighth it takes a piece if it has one on offer.
            for _ in 0..per_sec {
                now += Duration::from_millis(125);
                match swarm.pending(0).first().copied() {
                    Some(piece) => {
                        swarm.request(0, piece, now);
                        unannounced.push(piece);
                    }
                    None => short += 1,
                }
            }
            for piece in unannounced.drain(..) {
                swarm.announce(0, piece, now);
            }
            swarm.tick(now);
        }
        // At first it has only the floor; its target grows with the rate measured, and it
        // is never short again.
        assert!(
            short <= 2 * per_sec,
            "went without an offer {short} times in 20 s"
        );
        let target = swarm.seed.target(&swarm.peers[0].2);
        assert!(target >= 2 * per_sec, "target {target}");
    }

    #[test]
    fn a_peer_that_ignores_its_offers_is_offered_more() {
        let t0 = Instant::now();
        let mut swarm = Swarm::new(64, 2);
        let first = swarm.top_up(0, t0);
        let other = swarm.top_up(1, t0);
        swarm.announce(1, other[0], t0);
        // While choked it cannot request: nothing is stale, however long.
        swarm.peers[0].4 = false;
        let later = t0 + 4 * IGNORED;
        assert!(swarm.tick(later).iter().all(|o| o.0 != 0));
        swarm.peers[0].4 = true;
        assert!(swarm.tick(later + IGNORED / 2).iter().all(|o| o.0 != 0));
        // Unchoked and still not requesting: its offers stop counting, it gets new ones, and
        // may still request the old.
        let new: Vec<u32> = swarm
            .tick(later + IGNORED)
            .into_iter()
            .filter(|o| o.0 == 0)
            .map(|o| o.1)
            .collect();
        assert_eq!(new.len(), FLOOR);
        assert!(new.iter().all(|p| !first.contains(p)));
        assert!(first.iter().all(|&p| swarm.peers[0].2.may_request(p)));
        // An offer it requests from is not ignored: of the new ones, three go stale, and
        // three more are offered.
        let now = later + IGNORED;
        swarm.peers[0]
            .2
            .requested(new[0], crate::BLOCK_LEN, PIECE, now + IGNORED / 2);
        let again = swarm.tick(now + IGNORED - Duration::from_millis(1));
        assert!(again.iter().all(|o| o.0 != 0), "{again:?}");
        let again = swarm.tick(now + IGNORED);
        assert_eq!(again.iter().filter(|o| o.0 == 0).count(), FLOOR - 1);
    }

    #[test]
    fn many_peers_sharing_our_link_get_distinct_pieces() {
        // 16 peers each getting a sixteenth of 100 Mbit/s from us: offers cover two seconds
        // of that (6 pieces), every piece offered once before any goes out twice.
        let t0 = Instant::now();
        let pieces = 1024;
        let mut swarm = Swarm::new(pieces, 16);
        let mut now = t0;
        for key in 0..16 {
            swarm.top_up(key, now);
        }
        let share = 100_000_000 / 8 / 16;
        for _ in 0..3 {
            now += Duration::from_secs(1);
            for peer in &mut swarm.peers {
                peer.3 += share;
            }
            swarm.tick(now);
        }
        let mut all = BTreeSet::new();
        let mut offered = 0;
        for key in 0..16 {
            let target = swarm.seed.target(&swarm.peers[key as usize].2);
            assert!((FLOOR..=8).contains(&target), "peer {key}: target {target}");
            offered += swarm.live(key).len();
            all.extend(swarm.live(key));
        }
        assert_eq!(all.len(), offered, "no piece offered twice");
        assert!(offered >= 16 * FLOOR);
        // Every piece goes out once before any goes out twice.
        let mut out = swarm.seed.offer_count.clone();
        out.sort_unstable();
        assert!(out[pieces as usize - 1] <= 1);
    }

    #[test]
    fn once_every_piece_is_out_a_peer_others_can_serve_waits_until_idle() {
        let t0 = Instant::now();
        let mut swarm = Swarm::new(256, 2);
        // Peer 0 is fast (8 pieces a second): its target is well above the floor.
        swarm.tick(t0);
        swarm.peers[0].3 = 8 * u64::from(PIECE);
        let t1 = t0 + Duration::from_secs(1);
        swarm.tick(t1);
        assert!(swarm.seed.target(&swarm.peers[0].2) >= 4 * FLOOR);
        // Every piece is out: offered to peer 1, which announced one, so it can serve peer 0.
        for piece in 0..256u32 {
            swarm.peers[1].2.offered.insert(piece);
            let n = &mut swarm.seed.offer_count[piece as usize];
            *n = (*n).max(1);
        }
        swarm.announce(1, 0, t1);
        swarm.peers[0].2.live.clear();
        assert!(swarm.top_up(0, t1).is_empty());
        // Peer 0 announced nothing since it was first topped up: once idle it gets its floor.
        let idle = swarm.top_up(0, t0 + IDLE);
        assert_eq!(idle.len(), FLOOR, "{idle:?}");
        // Alone (nobody has, or was offered, anything it lacks), it is offered by its rate
        // again.
        swarm.peers[1].1 = Bitfield::new(256);
        swarm.peers[1].2 = Offers::default();
        swarm.peers[0].2.live.clear();
        let alone = swarm.top_up(0, t1);
        assert!(alone.len() >= 4 * FLOOR, "{}", alone.len());
    }

    #[test]
    fn offers_the_peer_already_holds_are_forgotten() {
        let t0 = Instant::now();
        let mut swarm = Swarm::new(8, 1);
        let first = swarm.top_up(0, t0);
        let mut has = Bitfield::new(8);
        has.set(first[0]);
        has.set(first[1]);
        swarm.peers[0].2.forget_held(&has);
        swarm.peers[0].1 = has;
        assert_eq!(swarm.live(0).len(), FLOOR - 2);
        assert_eq!(swarm.top_up(0, t0).len(), 2);
    }

    #[test]
    fn a_complete_peer_is_offered_nothing() {
        let mut swarm = Swarm::new(8, 1);
        swarm.peers[0].1 = Bitfield::full(8);
        assert!(swarm.top_up(0, Instant::now()).is_empty());
    }

    #[test]
    fn a_fast_peers_offers_are_capped() {
        let t0 = Instant::now();
        let mut swarm = Swarm::new(4096, 1);
        swarm.top_up(0, t0);
        swarm.tick(t0);
        swarm.peers[0].3 = 10 << 30;
        swarm.tick(t0 + Duration::from_secs(1));
        assert_eq!(
            swarm.live(0).len() as u64,
            MOST_BYTES / u64::from(PIECE),
            "at most MOST_BYTES on offer"
        );
    }
}
