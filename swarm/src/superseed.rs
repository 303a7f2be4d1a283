//! Super-seeding (BEP 16): serving a complete file so that each piece leaves us about once.
//!
//! A super-seeder hides what it has and offers each peer a few pieces at a time
//! ([`OFFERS`]), each as a HAVE the peer may then request. A piece goes to the peer it was
//! offered to least often, counting the peers seen with it, so the first round hands every
//! piece to one peer before any piece goes to a second. An offer is done when another peer
//! is seen with the piece (the peer passed it on): then the peer gets a new one. A peer that
//! took an offer but did not pass it on within [`RELEASE`] gets a new one anyway, so a lone
//! or slow swarm is not starved.
//!
//! Pure functions over the torrent's peers ([`Peer`]: what each has, what it was offered);
//! they return the offers to send, and the torrent sends them.

use std::collections::HashSet;
use std::time::Duration;

use tokio::time::Instant;

use crate::Bitfield;
use crate::picker::PeerKey;

/// Pieces a peer may hold on offer that nobody else has been seen with yet.
pub(crate) const OFFERS: usize = 4;
/// An offer the peer has held this long is released even if no other peer picked it up,
/// so a lone leecher is not starved.
pub(crate) const RELEASE: Duration = Duration::from_millis(1500);

/// What super-seeding keeps of one peer.
#[derive(Debug, Default)]
pub(crate) struct Offers {
    /// Pieces offered and not yet seen elsewhere, with when the peer announced having them.
    held: Vec<(u32, Option<Instant>)>,
    /// Every piece ever offered to it.
    offered: HashSet<u32>,
}

impl Offers {
    /// Whether the peer may request `piece`: only what it was offered.
    pub fn may_request(&self, piece: u32) -> bool {
        self.offered.contains(&piece)
    }

    /// Offers made before we knew what the peer had: the ones it holds already are moot.
    pub fn forget_held(&mut self, has: &Bitfield) {
        self.held.retain(|(p, _)| !has.get(*p));
    }
}

/// One peer as super-seeding sees it.
pub(crate) struct Peer<'a> {
    /// The connection.
    pub key: PeerKey,
    /// The pieces it announced.
    pub has: &'a Bitfield,
    /// What it was offered.
    pub offers: &'a mut Offers,
}

/// The torrent's side of super-seeding.
#[derive(Debug)]
pub(crate) struct SuperSeed {
    /// How often each piece was offered.
    offer_count: Vec<u32>,
}

impl SuperSeed {
    /// For a torrent of `pieces` pieces, none offered yet.
    pub fn new(pieces: u32) -> SuperSeed {
        SuperSeed {
            offer_count: vec![0; pieces as usize],
        }
    }

    /// Tops up `key`'s offers to [`OFFERS`], each time with the piece offered least often
    /// and held by the fewest peers (ties broken at random). Returns the pieces newly offered
    /// to it, in order.
    pub fn top_up(&mut self, peers: &mut [Peer<'_>], key: PeerKey) -> Vec<u32> {
        let Some(at) = peers.iter().position(|p| p.key == key) else {
            return Vec::new();
        };
        let mut new = Vec::new();
        loop {
            let peer = &peers[at];
            if peer.offers.held.len() >= OFFERS || peer.has.is_full() {
                return new;
            }
            let best = (0..self.offer_count.len() as u32)
                .filter(|&i| !peer.has.get(i) && !peer.offers.offered.contains(&i))
                .min_by_key(|&i| {
                    let seen = peers.iter().filter(|p| p.has.get(i)).count() as u32;
                    (self.offer_count[i as usize] + seen, rand::random::<u16>())
                });
            let Some(piece) = best else {
                return new;
            };
            self.offer_count[piece as usize] += 1;
            let offers = &mut peers[at].offers;
            offers.held.push((piece, None));
            offers.offered.insert(piece);
            new.push(piece);
        }
    }

    /// `from` announced `piece`. Other peers' offers of that piece are done (it now spreads
    /// without us) and they get new ones; `from`'s own offer of it starts its [`RELEASE`]
    /// clock, or is done at once when no other peer lacks the piece. Returns the new offers.
    pub fn seen(
        &mut self,
        peers: &mut [Peer<'_>],
        from: PeerKey,
        piece: u32,
        now: Instant,
    ) -> Vec<(PeerKey, u32)> {
        // Nobody else lacks the piece (a lone leecher, or the last one): there is no one to
        // wait for.
        let needed_elsewhere = peers.iter().any(|p| p.key != from && !p.has.get(piece));
        let mut refill = Vec::new();
        for peer in peers.iter_mut() {
            let held = &mut peer.offers.held;
            if peer.key == from {
                if needed_elsewhere {
                    for offer in held.iter_mut() {
                        if offer.0 == piece && offer.1.is_none() {
                            offer.1 = Some(now);
                        }
                    }
                } else {
                    held.retain(|(p, _)| *p != piece);
                }
                continue;
            }
            let before = held.len();
            held.retain(|(p, _)| *p != piece);
            if held.len() != before {
                refill.push(peer.key);
            }
        }
        refill.push(from);
        self.refill(peers, refill)
    }

    /// Releases offers held for [`RELEASE`] since the peer announced them, and tops up
    /// every peer with room. Returns the new offers.
    pub fn release_stale(&mut self, peers: &mut [Peer<'_>], now: Instant) -> Vec<(PeerKey, u32)> {
        let mut refill = Vec::new();
        for peer in peers.iter_mut() {
            let held = &mut peer.offers.held;
            let before = held.len();
            held.retain(|(_, got)| got.is_none_or(|t| now.saturating_duration_since(t) < RELEASE));
            if held.len() != before || held.len() < OFFERS {
                refill.push(peer.key);
            }
        }
        self.refill(peers, refill)
    }

    fn refill(&mut self, peers: &mut [Peer<'_>], keys: Vec<PeerKey>) -> Vec<(PeerKey, u32)> {
        let mut new = Vec::new();
        for key in keys {
            new.extend(
                self.top_up(peers, key)
                    .into_iter()
                    .map(|piece| (key, piece)),
            );
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// A swarm as super-seeding sees it: each peer's pieces and offers.
    struct Swarm {
        seed: SuperSeed,
        peers: Vec<(PeerKey, Bitfield, Offers)>,
    }

    impl Swarm {
        /// `peers` leechers holding nothing of a torrent of `pieces` pieces.
        fn new(pieces: u32, peers: u64) -> Swarm {
            Swarm {
                seed: SuperSeed::new(pieces),
                peers: (0..peers)
                    .map(|k| (k, Bitfield::new(pieces), Offers::default()))
                    .collect(),
            }
        }

        fn top_up(&mut self, key: PeerKey) -> Vec<u32> {
            self.seed.top_up(&mut view(&mut self.peers), key)
        }

        /// `key` announces `piece`.
        fn announce(&mut self, key: PeerKey, piece: u32, now: Instant) -> Vec<(PeerKey, u32)> {
            self.peers[key as usize].1.set(piece);
            self.seed.seen(&mut view(&mut self.peers), key, piece, now)
        }

        fn release_stale(&mut self, now: Instant) -> Vec<(PeerKey, u32)> {
            self.seed.release_stale(&mut view(&mut self.peers), now)
        }

        fn held(&self, key: PeerKey) -> BTreeSet<u32> {
            self.peers[key as usize]
                .2
                .held
                .iter()
                .map(|o| o.0)
                .collect()
        }
    }

    fn view(peers: &mut [(PeerKey, Bitfield, Offers)]) -> Vec<Peer<'_>> {
        peers
            .iter_mut()
            .map(|(key, has, offers)| Peer {
                key: *key,
                has,
                offers,
            })
            .collect()
    }

    #[test]
    fn each_piece_is_offered_to_one_peer_before_any_goes_to_a_second() {
        let mut swarm = Swarm::new(12, 4);
        let firsts: Vec<BTreeSet<u32>> = (0..3)
            .map(|k| swarm.top_up(k).into_iter().collect())
            .collect();
        for offered in &firsts {
            assert_eq!(offered.len(), OFFERS);
        }
        let all: BTreeSet<u32> = firsts.iter().flatten().copied().collect();
        assert_eq!(
            all.len(),
            12,
            "three peers, four offers each: twelve pieces"
        );
        // Every piece left once: the fourth peer gets pieces already out, one offer each.
        let fourth = swarm.top_up(3);
        assert_eq!(fourth.len(), OFFERS);
        assert_eq!(fourth.iter().collect::<BTreeSet<_>>().len(), OFFERS);
        // Topping up a peer that holds its full share offers nothing more.
        assert!(swarm.top_up(0).is_empty());
    }

    #[test]
    fn pieces_peers_already_hold_are_offered_last() {
        let mut swarm = Swarm::new(4, 2);
        // Peer 1 announced pieces 0 and 1 (from another source): they are less rare.
        swarm.peers[1].1.set(0);
        swarm.peers[1].1.set(1);
        let offered = swarm.top_up(0);
        assert_eq!(offered.len(), 4);
        assert_eq!(
            offered[..2].iter().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([2, 3])
        );
    }

    #[test]
    fn a_peer_may_request_only_what_it_was_offered() {
        let mut swarm = Swarm::new(8, 1);
        let offered = swarm.top_up(0);
        let offers = &swarm.peers[0].2;
        for piece in 0..8 {
            assert_eq!(offers.may_request(piece), offered.contains(&piece));
        }
    }

    #[test]
    fn an_offer_passed_on_makes_room_for_a_new_one() {
        let t0 = Instant::now();
        let mut swarm = Swarm::new(12, 2);
        let first = swarm.top_up(0);
        swarm.top_up(1);
        let piece = first[0];
        // Peer 0 got the piece; peer 1 still lacks it, so the offer is not done yet.
        assert!(swarm.announce(0, piece, t0).is_empty());
        assert!(swarm.held(0).contains(&piece));
        // Peer 1 got it too, so peer 0 passed it on: peer 0 gets a new piece.
        let new = swarm.announce(1, piece, t0);
        assert_eq!(new.len(), 1);
        let (key, next) = new[0];
        assert_eq!(key, 0);
        assert!(
            !first.contains(&next),
            "a new piece, not one offered before"
        );
        assert!(!swarm.held(0).contains(&piece));
        assert_eq!(swarm.held(0).len(), OFFERS);
    }

    #[test]
    fn an_offer_not_passed_on_is_released_after_a_while() {
        let t0 = Instant::now();
        let mut swarm = Swarm::new(12, 2);
        let first = swarm.top_up(0);
        swarm.top_up(1);
        assert!(swarm.announce(0, first[0], t0).is_empty());
        // Nobody picked the piece up from peer 0, but it is not released before its time.
        assert!(swarm.release_stale(t0 + RELEASE / 2).is_empty());
        assert!(swarm.held(0).contains(&first[0]));
        // Then it is: peer 0 gets a new offer.
        let new = swarm.release_stale(t0 + RELEASE);
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].0, 0);
        assert!(!first.contains(&new[0].1));
        // Offers the peer never announced are not released by time.
        assert!(swarm.release_stale(t0 + 100 * RELEASE).is_empty());
        assert_eq!(swarm.held(0).len(), OFFERS);
    }

    #[test]
    fn a_lone_leecher_is_offered_the_next_piece_at_once() {
        let t0 = Instant::now();
        let mut swarm = Swarm::new(8, 1);
        let first = swarm.top_up(0);
        let new = swarm.announce(0, first[0], t0);
        assert_eq!(
            new.len(),
            1,
            "nobody else lacks the piece: nothing to wait for"
        );
        assert!(!first.contains(&new[0].1));
    }

    #[test]
    fn offers_the_peer_already_holds_are_forgotten() {
        let mut swarm = Swarm::new(8, 1);
        let first = swarm.top_up(0);
        let mut has = Bitfield::new(8);
        has.set(first[0]);
        has.set(first[1]);
        swarm.peers[0].2.forget_held(&has);
        swarm.peers[0].1 = has;
        assert_eq!(swarm.held(0).len(), OFFERS - 2);
        assert_eq!(swarm.top_up(0).len(), 2);
    }

    #[test]
    fn a_complete_peer_is_offered_nothing() {
        let mut swarm = Swarm::new(8, 1);
        swarm.peers[0].1 = Bitfield::full(8);
        assert!(swarm.top_up(0).is_empty());
    }
}
