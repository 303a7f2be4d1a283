//! Who may download from us: the upload slots and the turns peers take in them.
//!
//! Every peer of a lab swarm is ours, so the choker is about fairness, not trade: no
//! tit-for-tat, and rates play no part. An interested peer takes a free slot at once, peers of
//! our zone first, then longest waiting first. While peers wait and every slot is taken, each
//! rotation (every [`ROTATE_EVERY`]) chokes the peers served longest, outside our zone first,
//! at least a rotation each and one per waiting peer, and the waiting take their slots: every
//! interested peer gets its turn, though one outside our zone waits while peers of our zone
//! keep asking (in a lab they finish and stop). Preferring the zone keeps a lab's bytes behind
//! its switch: in the simulated 300-machine lab (docs/benchmarks.md) it takes the last machine
//! from 3.3 to 2.3 × S/B when the engine knows its zone.
//!
//! A peer that loses interest keeps its unchoke but not its slot: the slot goes to the next in
//! line, and when the peer wants more again it is served at once, even if that serves more
//! peers than there are slots until the next rotation. Early in a deployment peers lose and
//! regain interest in each other every few pieces (each has only a few); choked each time, a
//! peer went to the back of the line, and by the time it wanted more every slot was taken
//! until a rotation, 10 s on, longer than a whole transfer of a small image on a fast LAN. In
//! the simulated 300-machine lab those hosts finished last, fed by a few peers each while the
//! others had sixteen; keeping the unchoke also took a third off the bytes crossing the
//! uplinks (docs/benchmarks.md).
//!
//! While peers of our zone wait, peers outside it keep at most half the slots: each waiting
//! zone peer takes the slot of the outside peer served longest ([`make_room_for_zone`]).
//! Interest does not come in zone order. When a host gets its first pieces, peers of other
//! switches that dialled it early often ask before its own switch does, take every slot,
//! and keep them until a rotation; in the simulated 300-machine lab the hosts of the one
//! small switch were served by a few of their 19 neighbours while those served 16 hosts of
//! other switches each, and finished last (docs/benchmarks.md).
//!
//! A seeder may open its slots a few at a time ([`Slots`]): each slot's flow gets a share of
//! its link, so the fewer are open, the sooner each piece has left it and can be traded.
//!
//! Pure functions over each peer's [`Choke`]; the torrent sends the choke and unchoke
//! messages they decide.

use std::time::Duration;

use tokio::time::Instant;

use crate::picker::PeerKey;

/// Interested peers take turns in the upload slots this often.
pub const ROTATE_EVERY: Duration = Duration::from_secs(10);

/// The choker's view of one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choke {
    /// We are choking it (no uploads).
    pub choked: bool,
    /// It wants pieces from us.
    pub interested: bool,
    /// When it was last unchoked or choked, or said it is interested; turns go by this.
    pub since: Instant,
    /// It is in our zone (the same switch, as far as the zone's networks say): it goes before
    /// the others for a free slot, and after them when a rotation chokes, so that a lab's
    /// bytes stay behind its switch instead of crossing the uplinks.
    pub zone: bool,
}

impl Choke {
    /// A peer that just connected: choked and not interested.
    pub fn new(now: Instant) -> Choke {
        Choke {
            choked: true,
            interested: false,
            since: now,
            zone: false,
        }
    }

    /// It holds an upload slot.
    pub fn served(&self) -> bool {
        !self.choked && self.interested
    }

    /// It waits for an upload slot.
    fn waiting(&self) -> bool {
        self.choked && self.interested
    }

    /// Records that the peer said it is (not) interested. Either way it keeps an unchoke: one
    /// that stops wanting frees its slot for [`fill_slots`] but is served again at once when
    /// it wants more.
    pub fn set_interest(&mut self, interested: bool, now: Instant) {
        self.interested = interested;
        if interested {
            self.since = now;
        }
    }
}

/// How many upload slots are open: all of them, or a few at first and more while the
/// upload falls behind.
///
/// Every open slot's flow gets a share of the link, so a piece leaves `open` times slower
/// than the link could send it alone, and no host can trade a piece before it has left. With
/// 64 slots open at once, the hosts of the simulated 300-machine lab got their first piece
/// from the server after 0.6 s; with 16, after 0.15 s, and the last host was done about 0.3 s
/// sooner (docs/benchmarks.md). But where the paths to the peers are crowded (uplinks full of
/// the hosts' own trading), each of our flows gets only its share of them: there 16 slots
/// left the server's link 40 % idle, and the lab took 2.0 × S/B against 1.5 × with 64. So
/// more slots open, twice as many at a time up to the most, when every open slot is taken
/// and a second's upload falls below nine tenths of the best second so far. Once nobody
/// wants anything from us, the next peers find the slots as the first did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slots {
    open: usize,
    first: usize,
    most: usize,
    /// The best second's upload rate so far, bytes per second.
    best: u64,
}

impl Slots {
    /// `first` slots open at first (at least one), up to `most`.
    pub fn new(first: usize, most: usize) -> Slots {
        let most = most.max(1);
        let first = first.clamp(1, most);
        Slots {
            open: first,
            first,
            most,
            best: 0,
        }
    }

    /// All `most` slots open from the start.
    pub fn all(most: usize) -> Slots {
        Slots::new(most, most)
    }

    /// Slots open now.
    pub fn open(&self) -> usize {
        self.open
    }

    /// A second in which we uploaded `rate` bytes per second and ended with `served` peers
    /// in slots and `interested` peers wanting. Returns whether more slots opened: then the
    /// caller fills them.
    pub fn second(&mut self, rate: u64, served: usize, interested: usize) -> bool {
        if interested == 0 {
            self.open = self.first;
            self.best = 0;
            return false;
        }
        self.best = self.best.max(rate);
        let behind = u128::from(rate) * 10 < u128::from(self.best) * 9;
        if behind && served >= self.open && self.open < self.most {
            self.open = (self.open * 2).min(self.most);
            return true;
        }
        false
    }
}

/// Unchokes waiting peers while slots are free (at least one slot, whatever `slots` says),
/// longest waiting first. Returns the peers unchoked, in that order.
pub fn fill_slots<'a>(
    peers: impl IntoIterator<Item = (&'a PeerKey, &'a mut Choke)>,
    slots: usize,
    now: Instant,
) -> Vec<PeerKey> {
    let mut peers: Vec<(&PeerKey, &mut Choke)> = peers.into_iter().collect();
    let served = peers.iter().filter(|(_, c)| c.served()).count();
    let free = slots.max(1).saturating_sub(served);
    if free == 0 {
        return Vec::new();
    }
    peers.retain(|(_, c)| c.waiting());
    take_turns(peers, free, false, now)
}

/// While peers of our zone wait and peers outside it hold more than half the slots, each
/// waiting zone peer, longest waiting first, takes the slot of the outside peer served
/// longest, until outside peers hold half. Returns the (choked, unchoked) pairs.
pub fn make_room_for_zone<'a>(
    peers: impl IntoIterator<Item = (&'a PeerKey, &'a mut Choke)>,
    slots: usize,
    now: Instant,
) -> Vec<(PeerKey, PeerKey)> {
    let (mut zone_waiting, mut outside_served): (Vec<_>, Vec<_>) = peers
        .into_iter()
        .filter(|(_, c)| if c.zone { c.waiting() } else { c.served() })
        .partition(|(_, c)| c.zone);
    let excess = outside_served.len().saturating_sub(slots.max(1) / 2);
    if excess == 0 || zone_waiting.is_empty() {
        return Vec::new();
    }
    zone_waiting.sort_by_key(|(key, c)| (c.since, **key));
    outside_served.sort_by_key(|(key, c)| (c.since, **key));
    zone_waiting
        .into_iter()
        .zip(outside_served)
        .take(excess)
        .map(|((zone_key, zone), (outside_key, outside))| {
            outside.choked = true;
            outside.since = now;
            zone.choked = false;
            zone.since = now;
            (*outside_key, *zone_key)
        })
        .collect()
}

/// A rotation: while peers wait, chokes the peers served longest (each at least
/// [`ROTATE_EVERY`]), one per waiting peer, so that [`fill_slots`] hands their slots on.
/// Returns the peers choked.
pub fn rotate<'a>(
    peers: impl IntoIterator<Item = (&'a PeerKey, &'a mut Choke)>,
    now: Instant,
) -> Vec<PeerKey> {
    let mut peers: Vec<(&PeerKey, &mut Choke)> = peers.into_iter().collect();
    let waiting = peers.iter().filter(|(_, c)| c.waiting()).count();
    if waiting == 0 {
        return Vec::new();
    }
    peers.retain(|(_, c)| c.served() && now.saturating_duration_since(c.since) >= ROTATE_EVERY);
    take_turns(peers, waiting, true, now)
}

/// Chokes or unchokes the `n` of `peers` whose state is oldest; returns them in that order.
fn take_turns(
    mut peers: Vec<(&PeerKey, &mut Choke)>,
    n: usize,
    choked: bool,
    now: Instant,
) -> Vec<PeerKey> {
    // Zone peers are unchoked first and choked last.
    peers.sort_by_key(|(key, c)| (c.zone == choked, c.since, **key));
    peers
        .into_iter()
        .take(n)
        .map(|(key, c)| {
            c.choked = choked;
            c.since = now;
            *key
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use super::*;

    /// Peers `0..n`, connected at `t0`, each saying it is interested one second after the
    /// previous one (so peer 0 has waited longest).
    fn interested(n: u64, t0: Instant) -> HashMap<PeerKey, Choke> {
        (0..n)
            .map(|key| {
                let mut c = Choke::new(t0);
                c.set_interest(true, t0 + Duration::from_secs(key));
                (key, c)
            })
            .collect()
    }

    fn served(peers: &HashMap<PeerKey, Choke>) -> BTreeSet<PeerKey> {
        peers
            .iter()
            .filter(|(_, c)| c.served())
            .map(|(k, _)| *k)
            .collect()
    }

    #[test]
    fn free_slots_go_to_interested_peers_longest_waiting_first() {
        let t0 = Instant::now();
        let mut peers = interested(4, t0);
        // Connected as early as any, but never interested: it gets nothing.
        peers.insert(9, Choke::new(t0));
        let now = t0 + Duration::from_secs(5);
        assert_eq!(fill_slots(&mut peers, 2, now), vec![0, 1]);
        assert_eq!(served(&peers), BTreeSet::from([0, 1]));
        assert!(peers[&9].choked);
        // No slot is free: nobody else is unchoked.
        assert!(fill_slots(&mut peers, 2, now).is_empty());
        // One more slot (the config allows three): the next in line.
        assert_eq!(fill_slots(&mut peers, 3, now), vec![2]);
    }

    #[test]
    fn peers_of_our_zone_are_unchoked_first_and_choked_last() {
        let t0 = Instant::now();
        // Peer 0 has waited longest, but peer 2 is in our zone.
        let mut peers = interested(3, t0);
        peers.get_mut(&2).unwrap().zone = true;
        let now = t0 + Duration::from_secs(5);
        assert_eq!(fill_slots(&mut peers, 2, now), vec![2, 0]);
        // Peer 1 waits; the rotation chokes peer 0, not the zone peer 2 served as long.
        let later = now + ROTATE_EVERY;
        assert_eq!(rotate(&mut peers, later), vec![0]);
        assert_eq!(fill_slots(&mut peers, 2, later), vec![1]);
    }

    #[test]
    fn waiting_zone_peers_take_slots_from_outside_peers_holding_more_than_half() {
        let t0 = Instant::now();
        // Peers 0-3, outside our zone, asked first and took all four slots.
        let mut peers = interested(7, t0);
        let now = t0 + Duration::from_secs(10);
        let early = t0 + Duration::from_secs(3);
        assert_eq!(
            fill_slots(peers.iter_mut().filter(|(k, _)| **k < 4), 4, early),
            vec![0, 1, 2, 3]
        );
        for key in 4..7 {
            peers.get_mut(&key).unwrap().zone = true;
        }
        // Three zone peers wait: two of them take the slots of the outside peers served
        // longest, and the outside keeps half.
        let swaps = make_room_for_zone(&mut peers, 4, now);
        assert_eq!(swaps, vec![(0, 4), (1, 5)]);
        assert_eq!(served(&peers), BTreeSet::from([2, 3, 4, 5]));
        assert!(peers[&0].waiting() && peers[&1].waiting());
        // No slot is free for the third; the outside's half stays until a rotation.
        assert!(fill_slots(&mut peers, 4, now).is_empty());
        assert!(make_room_for_zone(&mut peers, 4, now).is_empty());
        // Outside peers waiting while zone peers hold the slots is the rotation's business.
        let mut peers = interested(4, t0);
        peers.get_mut(&0).unwrap().zone = true;
        assert_eq!(fill_slots(&mut peers, 1, now), vec![0]);
        assert!(make_room_for_zone(&mut peers, 1, now).is_empty());
    }

    #[test]
    fn slots_open_twice_as_many_at_a_time_while_the_upload_falls_behind_its_best_second() {
        let mut slots = Slots::new(16, 64);
        assert_eq!(slots.open(), 16);
        // Speeding up, then steady at the link's rate: nothing opens.
        assert!(!slots.second(50, 16, 100));
        assert!(!slots.second(100, 16, 100));
        assert!(!slots.second(95, 16, 100));
        assert_eq!(slots.open(), 16);
        // Below nine tenths of the best second with every slot taken: twice as many.
        assert!(slots.second(89, 16, 100));
        assert_eq!(slots.open(), 32);
        // Behind, but a slot is free: the peers are served as fast as they ask.
        assert!(!slots.second(50, 31, 100));
        assert!(slots.second(50, 32, 100));
        assert_eq!(slots.open(), 64);
        // Never more than the most.
        assert!(!slots.second(10, 64, 100));
        assert_eq!(slots.open(), 64);
        // Nobody wants anything: the next deployment starts as this one did, the best
        // second forgotten.
        assert!(!slots.second(0, 0, 0));
        assert_eq!(slots.open(), 16);
        assert!(!slots.second(20, 16, 100));
        assert!(!slots.second(19, 16, 100));
        assert_eq!(slots.open(), 16);
    }

    #[test]
    fn all_slots_open_at_once_never_change() {
        let mut slots = Slots::all(16);
        assert_eq!(slots.open(), 16);
        assert!(!slots.second(100, 16, 20));
        assert!(!slots.second(1, 16, 20));
        assert_eq!(slots.open(), 16);
        assert_eq!(Slots::new(0, 0).open(), 1, "at least one slot");
        assert_eq!(Slots::new(99, 8).open(), 8, "never more than the most");
    }

    #[test]
    fn there_is_always_one_slot() {
        let t0 = Instant::now();
        let mut peers = interested(2, t0);
        assert_eq!(fill_slots(&mut peers, 0, t0), vec![0]);
    }

    #[test]
    fn a_peer_that_loses_interest_frees_its_slot_and_is_served_again_when_it_wants_more() {
        let t0 = Instant::now();
        let mut peers = interested(2, t0);
        assert_eq!(fill_slots(&mut peers, 1, t0), vec![0]);
        let now = t0 + Duration::from_secs(1);
        peers.get_mut(&0).unwrap().set_interest(false, now);
        assert!(!peers[&0].choked, "no choke: it keeps its unchoke");
        // Its slot goes to the next in line.
        assert_eq!(fill_slots(&mut peers, 1, now), vec![1]);
        // Interested again: served at once, not sent to the back of the line, though peer 1
        // holds the only slot.
        peers.get_mut(&0).unwrap().set_interest(true, now);
        assert_eq!(served(&peers), BTreeSet::from([0, 1]));
        assert!(fill_slots(&mut peers, 1, now).is_empty());
    }

    #[test]
    fn rotation_gives_every_interested_peer_a_turn() {
        let t0 = Instant::now();
        let mut peers = interested(3, t0);
        let mut had_a_turn = BTreeSet::new();
        had_a_turn.extend(fill_slots(&mut peers, 2, t0));
        assert_eq!(had_a_turn, BTreeSet::from([0, 1]));

        // Served for less than a rotation: nobody is choked yet.
        assert!(rotate(&mut peers, t0 + ROTATE_EVERY / 2).is_empty());

        // After a rotation, the longest served makes room for the one waiting peer.
        let t1 = t0 + ROTATE_EVERY;
        assert_eq!(rotate(&mut peers, t1), vec![0]);
        assert_eq!(fill_slots(&mut peers, 2, t1), vec![2]);
        assert_eq!(served(&peers), BTreeSet::from([1, 2]));

        // Next rotation: peer 1 has been served longest, and peer 0 waited longest.
        let t2 = t1 + ROTATE_EVERY;
        assert_eq!(rotate(&mut peers, t2), vec![1]);
        assert_eq!(fill_slots(&mut peers, 2, t2), vec![0]);
        assert_eq!(served(&peers), BTreeSet::from([0, 2]));
    }

    #[test]
    fn rotation_chokes_one_served_peer_per_waiting_peer() {
        let t0 = Instant::now();
        let mut peers = interested(5, t0);
        assert_eq!(fill_slots(&mut peers, 3, t0), vec![0, 1, 2]);
        let later = t0 + 2 * ROTATE_EVERY;
        let mut choked = rotate(&mut peers, later);
        choked.sort();
        assert_eq!(choked, vec![0, 1], "two wait, so the two served longest go");
        assert_eq!(fill_slots(&mut peers, 3, later), vec![3, 4]);
    }

    #[test]
    fn rotation_chokes_nobody_when_nobody_waits() {
        let t0 = Instant::now();
        let mut peers = interested(2, t0);
        assert_eq!(fill_slots(&mut peers, 2, t0).len(), 2);
        // A third peer connects but is not interested: it does not wait for a slot.
        peers.insert(7, Choke::new(t0));
        assert!(rotate(&mut peers, t0 + 10 * ROTATE_EVERY).is_empty());
        assert_eq!(served(&peers), BTreeSet::from([0, 1]));
    }
}
