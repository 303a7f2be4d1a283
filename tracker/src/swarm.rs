//! The peers of every catalogued torrent and the [`Tracker`] facade the server's HTTP handlers
//! call.
//!
//! Locking: torrents live in [`SHARDS`] mutex-protected maps, chosen by the first byte of the
//! info hash (uniform, since it is a SHA-1), so announces for different torrents rarely
//! contend. A call takes at most one shard lock and never calls out while holding it: the
//! [`Locality`] lookups happen before locking and the bencoding after unlocking. Counters are
//! relaxed atomics outside the shards.
//!
//! Time is always passed in (`now`), never read, so expiry is tested with a fake clock and the
//! server decides which clock counts.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rand::Rng;
use rand::seq::SliceRandom;

use boottorrent_bt::PeerId;
use boottorrent_bt::announce::{
    self, AnnounceQuery, AnnounceReply, Event, HandoutPeer, ScrapeEntry,
};

use crate::announce::{Answer, NOT_GIVEN, NOT_IN_CATALOG};

/// Most peers one torrent may hold. A lab fleet is hundreds of machines; the cap bounds memory
/// when something (a misconfigured NAT, a hostile script) invents peers faster than they
/// expire.
pub const MAX_PEERS_PER_TORRENT: usize = 10_000;

/// Number of lock shards. A power of two well above the core count of a server appliance.
pub const SHARDS: usize = 16;

/// Tracker settings, normally part of the server's config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerConfig {
    /// Seconds between a client's announces (`interval`). Peers silent for two intervals are
    /// forgotten.
    pub interval_secs: u32,
    /// Seconds a client must wait at least between announces (`min interval`).
    pub min_interval_secs: u32,
    /// Peers handed out when the client sends no `numwant`.
    pub numwant_default: u32,
    /// Most peers handed out in one answer, whatever the client asks.
    pub numwant_max: u32,
    /// Longest query string accepted, in bytes; longer ones are refused before parsing.
    pub max_query_len: usize,
    /// Most peers one source address may hold in one torrent. Announces come from the TCP
    /// source address, which a host cannot forge, but it can invent peer ids and ports
    /// freely: without this cap one host fills [`MAX_PEERS_PER_TORRENT`] and every real
    /// machine is refused until its fakes expire.
    pub max_peers_per_address: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            interval_secs: 60,
            min_interval_secs: 30,
            numwant_default: 50,
            numwant_max: 200,
            max_query_len: 4096,
            max_peers_per_address: 64,
        }
    }
}

/// What the server knows about where an address sits, which the handout policy uses to keep
/// traffic inside a zone and off the server.
pub trait Locality: Send + Sync {
    /// Zone id of an address, if the server knows one.
    fn zone_of(&self, ip: IpAddr) -> Option<String>;
    /// The server's own seeder (handed out last).
    fn is_server_seeder(&self, addr: SocketAddr) -> bool;
}

/// A [`Locality`] that knows nothing: handout falls back to subnets and no peer is treated as
/// the server's seeder.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLocality;

impl Locality for NoLocality {
    fn zone_of(&self, _ip: IpAddr) -> Option<String> {
        None
    }

    fn is_server_seeder(&self, _addr: SocketAddr) -> bool {
        false
    }
}

/// Request counters since the tracker was created, for the server's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Announce requests received, including those answered with a failure.
    pub announces: u64,
    /// Scrape requests received, including those answered with a failure.
    pub scrapes: u64,
    /// Requests answered with a `failure reason`: malformed, not catalogued or a full swarm.
    pub failures: u64,
}

/// One torrent's swarm as a scrape would report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwarmStats {
    /// Seeders: peers whose last announce had `left=0`.
    pub complete: u32,
    /// Leechers.
    pub incomplete: u32,
    /// Downloads completed since the torrent was allowed.
    pub downloaded: u64,
}

/// The tracker: which torrents are served, their peers, and the counters.
///
/// `Send + Sync`; share it behind an `Arc` between request handlers.
#[derive(Debug)]
pub struct Tracker {
    config: TrackerConfig,
    shards: Box<[Shard]>,
    announces: AtomicU64,
    scrapes: AtomicU64,
    failures: AtomicU64,
}

/// The torrents whose first info-hash byte falls in one shard.
type Shard = Mutex<HashMap<[u8; 20], Swarm>>;

/// One torrent's peers.
///
/// The peers sit in one dense vector, found by address through `index`: handout reads a
/// window of the vector instead of walking a hash map, and on a server with many torrents that
/// walk (one cache miss per peer) was most of an announce's cost.
#[derive(Debug, Default)]
struct Swarm {
    peers: Vec<(SocketAddr, Peer)>,
    /// Position of each peer in `peers`.
    index: HashMap<SocketAddr, usize>,
    /// Peers per source address, kept in step with `peers`, for the per-address cap.
    per_address: HashMap<IpAddr, usize>,
    /// Peers with `left=0`, kept in step with `peers` so counts cost nothing.
    complete: usize,
    downloaded: u64,
    /// No peer can have expired before this instant (a lower bound, tightened at each sweep),
    /// so most announces skip the expiry scan. `None`: nothing can expire.
    sweep_due: Option<Instant>,
}

#[derive(Debug)]
struct Peer {
    peer_id: [u8; 20],
    complete: bool,
    last_seen: Instant,
    /// Looked up at announce time: handout then compares strings instead of asking the server
    /// about every candidate on every announce.
    zone: Option<Arc<str>>,
    server_seeder: bool,
}

/// Who is asking, as far as handout is concerned.
struct Requester {
    addr: SocketAddr,
    peer_id: [u8; 20],
    zone: Option<Arc<str>>,
    complete: bool,
}

/// What [`Swarm::upsert`] did with an announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upsert {
    Recorded,
    /// A new peer, and the torrent holds [`MAX_PEERS_PER_TORRENT`].
    SwarmFull,
    /// A new peer, and its address holds its share already.
    AddressFull,
}

/// Handout groups in the order they are served.
const NEAR_INCOMPLETE: usize = 0;
const NEAR_COMPLETE: usize = 1;
const FAR_INCOMPLETE: usize = 2;
const FAR_COMPLETE: usize = 3;
const SERVER_SEEDER: usize = 4;
const GROUPS: usize = 5;

impl Tracker {
    /// A tracker that serves no torrent until [`allow`](Tracker::allow)ed.
    pub fn new(config: TrackerConfig) -> Tracker {
        Tracker {
            config,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            announces: AtomicU64::new(0),
            scrapes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// The configuration it was created with.
    pub fn config(&self) -> &TrackerConfig {
        &self.config
    }

    /// Serves `info_hash` (a catalogued image). Allowing an already allowed torrent keeps its
    /// peers, so the catalog can re-sync freely.
    pub fn allow(&self, info_hash: [u8; 20]) {
        self.shard(&info_hash).entry(info_hash).or_default();
    }

    /// Stops serving `info_hash` (a removed image) and forgets its peers.
    pub fn disallow(&self, info_hash: [u8; 20]) {
        self.shard(&info_hash).remove(&info_hash);
    }

    /// Whether a peer at `ip` is in the swarm of `info_hash` now (announced and not expired).
    /// The server's seeder serves only such peers: with a private tracker that admits only
    /// enrolled machines, knowing the info hash is not enough to get a byte.
    pub fn has_address(&self, info_hash: [u8; 20], ip: IpAddr) -> bool {
        self.shard(&info_hash)
            .get(&info_hash)
            .is_some_and(|swarm| swarm.per_address.contains_key(&ip))
    }

    /// A refusal decided outside the tracker (no or a wrong passkey), counted with the others.
    pub fn refuse(&self, status: u16, reason: &str) -> Answer {
        self.fail(status, reason)
    }

    /// Whether `info_hash` is served.
    pub fn is_allowed(&self, info_hash: [u8; 20]) -> bool {
        self.shard(&info_hash).contains_key(&info_hash)
    }

    /// Answers `GET /announce`.
    ///
    /// `query` is the raw query string after `?`, `remote` the TCP peer's address: the peer
    /// is recorded at `remote` and the port it announced, never at an `ip` it claims.
    /// IPv4-mapped IPv6 addresses (from a dual-stack listener) count as IPv4.
    pub fn announce(
        &self,
        query: &str,
        remote: IpAddr,
        locality: &dyn Locality,
        now: Instant,
    ) -> Answer {
        self.announce_for(query, remote, locality, now, &|_| true)
    }

    /// [`announce`](Self::announce) for a client that may join only the torrents `may`
    /// allows (a private tracker's per-client grants); any other is refused with 403.
    pub fn announce_for(
        &self,
        query: &str,
        remote: IpAddr,
        locality: &dyn Locality,
        now: Instant,
        may: &dyn Fn(&[u8; 20]) -> bool,
    ) -> Answer {
        self.announces.fetch_add(1, Ordering::Relaxed);
        let AnnounceQuery { request, form } =
            match announce::parse_announce(query, self.config.max_query_len) {
                Ok(query) => query,
                Err(error) => {
                    tracing::debug!(%remote, %error, "malformed announce");
                    return self.fail(400, &error.to_string());
                }
            };
        let info_hash = request.info_hash.0;
        if !may(&info_hash) {
            return self.fail(403, NOT_GIVEN);
        }
        let remote = remote.to_canonical();
        let addr = SocketAddr::new(remote, request.port);
        let complete = request.left == 0;
        let stopped = request.event == Event::Stopped;
        // Asked before locking: the server's answer may take a database or CIDR lookup.
        let (zone, server_seeder) = if stopped {
            (None, false)
        } else {
            (
                locality.zone_of(remote).map(Arc::from),
                locality.is_server_seeder(addr),
            )
        };
        let numwant = if stopped {
            0
        } else {
            request
                .numwant
                .unwrap_or(self.config.numwant_default)
                .min(self.config.numwant_max) as usize
        };
        let ttl = self.ttl();

        let (peers, stats) = {
            let mut shard = self.shard(&info_hash);
            let Some(swarm) = shard.get_mut(&info_hash) else {
                drop(shard);
                return self.fail(200, NOT_IN_CATALOG);
            };
            swarm.sweep(now, ttl);
            if stopped {
                swarm.remove(&addr);
            } else {
                let peer = Peer {
                    peer_id: request.peer_id.0,
                    complete,
                    last_seen: now,
                    zone: zone.clone(),
                    server_seeder,
                };
                match swarm.upsert(
                    addr,
                    peer,
                    request.event,
                    ttl,
                    self.config.max_peers_per_address,
                ) {
                    Upsert::Recorded => {}
                    Upsert::SwarmFull => {
                        drop(shard);
                        tracing::debug!(%addr, "swarm full, refusing a new peer");
                        return self.fail(
                            200,
                            &format!(
                                "this torrent already has {MAX_PEERS_PER_TORRENT} peers; try again later"
                            ),
                        );
                    }
                    Upsert::AddressFull => {
                        drop(shard);
                        tracing::debug!(%addr, "address holds its share of the swarm, refusing a new peer");
                        return self.fail(
                            200,
                            &format!(
                                "{remote} already has {} peers in this torrent; stop some \
                                 clients or wait until their entries expire",
                                self.config.max_peers_per_address
                            ),
                        );
                    }
                }
            }
            let requester = Requester {
                addr,
                peer_id: request.peer_id.0,
                zone,
                complete,
            };
            (
                swarm.handout(&requester, numwant, &mut rand::rng()),
                swarm.stats(),
            )
        };

        Answer::ok(announce::encode_announce(&AnnounceReply {
            interval_secs: self.config.interval_secs,
            min_interval_secs: self.config.min_interval_secs,
            complete: stats.complete,
            incomplete: stats.incomplete,
            peers: &peers,
            form,
            ipv6_requester: remote.is_ipv6(),
        }))
    }

    /// Answers `GET /scrape` (BEP 48). Hashes that are not catalogued are left out of `files`
    /// rather than revealed as unknown one by one; if none is catalogued, the answer is the
    /// same failure an announce would get.
    pub fn scrape(&self, query: &str, now: Instant) -> Answer {
        self.scrape_for(query, now, &|_| true)
    }

    /// [`scrape`](Self::scrape) for a client that may see only the torrents `may` allows:
    /// the others are left out as if not catalogued.
    pub fn scrape_for(&self, query: &str, now: Instant, may: &dyn Fn(&[u8; 20]) -> bool) -> Answer {
        self.scrapes.fetch_add(1, Ordering::Relaxed);
        let request = match announce::parse_scrape(query, self.config.max_query_len) {
            Ok(request) => request,
            Err(error) => {
                tracing::debug!(%error, "malformed scrape");
                return self.fail(400, &error.to_string());
            }
        };
        let ttl = self.ttl();
        let entries: Vec<ScrapeEntry> = request
            .info_hashes
            .iter()
            .filter(|info_hash| may(&info_hash.0))
            .filter_map(|info_hash| {
                let mut shard = self.shard(&info_hash.0);
                let swarm = shard.get_mut(&info_hash.0)?;
                swarm.sweep(now, ttl);
                let stats = swarm.stats();
                Some(ScrapeEntry {
                    info_hash: *info_hash,
                    complete: stats.complete,
                    incomplete: stats.incomplete,
                    downloaded: stats.downloaded,
                })
            })
            .collect();
        if entries.is_empty() {
            return self.fail(200, NOT_IN_CATALOG);
        }
        Answer::ok(announce::encode_scrape(&entries))
    }

    /// A snapshot of the request counters.
    pub fn counters(&self) -> Counters {
        Counters {
            announces: self.announces.load(Ordering::Relaxed),
            scrapes: self.scrapes.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }

    /// Drops peers not seen for two intervals in every torrent. Announces and scrapes already
    /// do this for the torrents they touch; calling this periodically frees the memory of
    /// torrents nobody asks about any more.
    pub fn expire(&self, now: Instant) {
        let ttl = self.ttl();
        for shard in self.shards.iter() {
            for swarm in lock(shard).values_mut() {
                swarm.sweep(now, ttl);
            }
        }
    }

    /// The counts a scrape would report for `info_hash`, or `None` if it is not served.
    /// Reads without expiring, so peers may linger until the next announce, scrape or
    /// [`expire`](Tracker::expire) of that torrent.
    pub fn swarm_stats(&self, info_hash: [u8; 20]) -> Option<SwarmStats> {
        self.shard(&info_hash).get(&info_hash).map(Swarm::stats)
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(u64::from(self.config.interval_secs) * 2)
    }

    fn shard(&self, info_hash: &[u8; 20]) -> MutexGuard<'_, HashMap<[u8; 20], Swarm>> {
        lock(&self.shards[usize::from(info_hash[0]) % SHARDS])
    }

    fn fail(&self, status: u16, reason: &str) -> Answer {
        self.failures.fetch_add(1, Ordering::Relaxed);
        Answer::failure(status, reason)
    }
}

/// Nothing panics while a shard is locked, but if something ever did, the map is still
/// consistent enough to serve: a tracker that stops answering is worse than one peer's stale
/// entry.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Swarm {
    fn stats(&self) -> SwarmStats {
        SwarmStats {
            complete: count(self.complete),
            incomplete: count(self.peers.len().saturating_sub(self.complete)),
            downloaded: self.downloaded,
        }
    }

    /// Records an announce. A new peer is refused, changing nothing, if the swarm is full or
    /// its address already holds `per_address` peers.
    fn upsert(
        &mut self,
        addr: SocketAddr,
        peer: Peer,
        event: Event,
        ttl: Duration,
        per_address: usize,
    ) -> Upsert {
        let slot = self.index.get(&addr).copied();
        let was_complete = match slot {
            Some(i) => Some(self.peers[i].1.complete),
            None if self.peers.len() >= MAX_PEERS_PER_TORRENT => return Upsert::SwarmFull,
            None if self.per_address.get(&addr.ip()).copied().unwrap_or(0) >= per_address => {
                return Upsert::AddressFull;
            }
            None => None,
        };
        // A download finished if the client says so, or if a peer we knew as a leecher now
        // reports `left=0` (clients that never send `completed`). A peer that arrives already
        // complete without `completed` is a seeder joining, not a download.
        if peer.complete
            && was_complete != Some(true)
            && (was_complete.is_some() || event == Event::Completed)
        {
            self.downloaded += 1;
        }
        match (was_complete, peer.complete) {
            (Some(true), false) => self.complete = self.complete.saturating_sub(1),
            (Some(false) | None, true) => self.complete += 1,
            _ => {}
        }
        if let Some(due) = peer.last_seen.checked_add(ttl) {
            self.sweep_due = Some(self.sweep_due.map_or(due, |current| current.min(due)));
        }
        match slot {
            Some(i) => {
                let current = &mut self.peers[i].1;
                // Clocks passed in from several threads may arrive out of order; a peer never
                // becomes older by announcing.
                let last_seen = current.last_seen.max(peer.last_seen);
                *current = Peer { last_seen, ..peer };
            }
            None => {
                self.index.insert(addr, self.peers.len());
                self.peers.push((addr, peer));
                *self.per_address.entry(addr.ip()).or_default() += 1;
            }
        }
        Upsert::Recorded
    }

    fn forget_address(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_address.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_address.remove(&ip);
            }
        }
    }

    fn remove(&mut self, addr: &SocketAddr) {
        let Some(i) = self.index.remove(addr) else {
            return;
        };
        let (_, peer) = self.peers.swap_remove(i);
        if let Some((moved, _)) = self.peers.get(i) {
            self.index.insert(*moved, i);
        }
        self.forget_address(addr.ip());
        if peer.complete {
            self.complete = self.complete.saturating_sub(1);
        }
    }

    /// Forgets peers silent for longer than `ttl`, if any can be.
    fn sweep(&mut self, now: Instant, ttl: Duration) {
        if self.sweep_due.is_none_or(|due| now <= due) {
            return;
        }
        self.peers
            .retain(|(_, peer)| now.saturating_duration_since(peer.last_seen) <= ttl);
        self.index = self
            .peers
            .iter()
            .enumerate()
            .map(|(i, (addr, _))| (*addr, i))
            .collect();
        self.per_address.clear();
        for (addr, _) in &self.peers {
            *self.per_address.entry(addr.ip()).or_default() += 1;
        }
        self.complete = self.peers.iter().filter(|(_, peer)| peer.complete).count();
        self.sweep_due = self
            .peers
            .iter()
            .filter_map(|(_, peer)| peer.last_seen.checked_add(ttl))
            .min();
        if self.peers.capacity() > 4 * self.peers.len().max(64) {
            self.peers.shrink_to_fit();
        }
    }

    /// Up to `numwant` peers for `requester`, in handout order: same zone (or, where zones are
    /// unknown, same subnet) first, leechers before seeders within that, everyone else next in
    /// the same way, the server's own seeder last, random within each group so that load
    /// spreads. Only peers of the requester's address family are candidates: we know one
    /// address per peer, and an IPv4 peer is no use to a client on IPv6 and vice versa. A
    /// seeder gets only leechers, since seeders have nothing to give each other.
    ///
    /// The scan starts at a random position and wraps around, so each group's share is a
    /// window starting at a random member: every member is equally likely to be handed out,
    /// and the scan stops as soon as the first group is full, which in a lab (everyone in one
    /// zone) means reading `numwant` peers rather than the whole swarm.
    fn handout(
        &self,
        requester: &Requester,
        numwant: usize,
        rng: &mut impl Rng,
    ) -> Vec<HandoutPeer> {
        if numwant == 0 || self.peers.is_empty() {
            return Vec::new();
        }
        let (before, after) = self.peers.split_at(rng.random_range(0..self.peers.len()));
        // The first group goes straight into the answer; the others wait in case it is short.
        let mut handout = Vec::with_capacity(numwant.min(self.peers.len()));
        let mut later: [Vec<HandoutPeer>; GROUPS] = Default::default();
        for (addr, peer) in after.iter().chain(before) {
            if *addr == requester.addr
                || peer.peer_id == requester.peer_id
                || addr.is_ipv4() != requester.addr.is_ipv4()
                || (requester.complete && peer.complete)
            {
                continue;
            }
            let group = if peer.server_seeder {
                SERVER_SEEDER
            } else {
                match (is_near(requester, addr.ip(), peer), peer.complete) {
                    (true, false) => NEAR_INCOMPLETE,
                    (true, true) => NEAR_COMPLETE,
                    (false, false) => FAR_INCOMPLETE,
                    (false, true) => FAR_COMPLETE,
                }
            };
            let candidate = HandoutPeer {
                addr: *addr,
                peer_id: PeerId(peer.peer_id),
            };
            if group == NEAR_INCOMPLETE {
                handout.push(candidate);
                if handout.len() == numwant {
                    break;
                }
            } else if later[group].len() < numwant {
                later[group].push(candidate);
            }
        }
        // Each window is in vector order; shuffle what is taken so that clients which try
        // only the first few peers do not all pick the same ones.
        handout.shuffle(rng);
        for group in &mut later[NEAR_INCOMPLETE + 1..] {
            let take = (numwant - handout.len()).min(group.len());
            let taken = &mut group[..take];
            taken.shuffle(rng);
            handout.extend_from_slice(taken);
        }
        handout
    }
}

/// Same zone when both zones are known; otherwise the same /24 (IPv4) or /64 (IPv6), which in
/// a lab usually means the same switch.
fn is_near(requester: &Requester, ip: IpAddr, peer: &Peer) -> bool {
    match (&requester.zone, &peer.zone) {
        (Some(mine), Some(theirs)) => mine == theirs,
        _ => same_subnet(requester.addr.ip(), ip),
    }
}

fn same_subnet(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => a.octets()[..3] == b.octets()[..3],
        (IpAddr::V6(a), IpAddr::V6(b)) => a.octets()[..8] == b.octets()[..8],
        _ => false,
    }
}

/// Counts are bounded by [`MAX_PEERS_PER_TORRENT`]; saturating keeps that assumption from
/// ever becoming a panic.
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn handout_is_fair_and_leaves_out_the_requester() {
        let mut rng = StdRng::seed_from_u64(7);
        let now = Instant::now();
        let ttl = Duration::from_secs(120);
        let mut swarm = Swarm::default();
        for port in 1..=200u16 {
            let mut entry = Peer {
                peer_id: [0; 20],
                complete: port % 10 == 0,
                last_seen: now,
                zone: None,
                server_seeder: false,
            };
            entry.peer_id[..2].copy_from_slice(&port.to_be_bytes());
            assert_eq!(
                swarm.upsert(
                    SocketAddr::new("10.0.0.1".parse().unwrap(), port),
                    entry,
                    Event::Started,
                    ttl,
                    usize::MAX
                ),
                Upsert::Recorded
            );
        }
        // Some peers leave, which moves others inside the vector.
        for port in [3, 50, 199] {
            swarm.remove(&SocketAddr::new("10.0.0.1".parse().unwrap(), port));
        }
        let requester = Requester {
            addr: SocketAddr::new("10.0.0.1".parse().unwrap(), 7),
            peer_id: [9; 20],
            zone: None,
            complete: false,
        };
        let mut hits = [0u32; 201];
        for _ in 0..4_000 {
            let handout = swarm.handout(&requester, 20, &mut rng);
            assert_eq!(handout.len(), 20);
            let distinct: std::collections::HashSet<_> = handout.iter().map(|p| p.addr).collect();
            assert_eq!(distinct.len(), 20, "duplicates in {handout:?}");
            for peer in handout {
                assert!(peer.addr.port() % 10 != 0, "a seeder before the leechers");
                hits[usize::from(peer.addr.port())] += 1;
            }
        }
        // 177 leechers besides the requester, 20 of them per answer: each should be handed out
        // 4,000 * 20 / 177 = about 452 times.
        for (port, &n) in hits.iter().enumerate() {
            if [0, 3, 7, 50, 199].contains(&port) || port % 10 == 0 {
                assert_eq!(n, 0, "port {port}");
            } else {
                assert!((330..=580).contains(&n), "port {port} handed out {n} times");
            }
        }
    }

    #[test]
    fn subnets() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(same_subnet(ip("10.1.2.3"), ip("10.1.2.200")));
        assert!(!same_subnet(ip("10.1.2.3"), ip("10.1.3.3")));
        assert!(same_subnet(ip("fd00:1:2:3::1"), ip("fd00:1:2:3:ffff::9")));
        assert!(!same_subnet(ip("fd00:1:2:3::1"), ip("fd00:1:2:4::1")));
        assert!(!same_subnet(ip("10.1.2.3"), ip("::ffff:10.1.2.3")));
    }

    #[test]
    fn counts_follow_transitions() {
        let now = Instant::now();
        let ttl = Duration::from_secs(120);
        let mut swarm = Swarm::default();
        let addr: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let entry = |complete| Peer {
            peer_id: [1; 20],
            complete,
            last_seen: now,
            zone: None,
            server_seeder: false,
        };
        assert_eq!(
            swarm.upsert(addr, entry(false), Event::Started, ttl, 1),
            Upsert::Recorded
        );
        assert_eq!((swarm.stats().complete, swarm.stats().incomplete), (0, 1));
        // Finished without sending `completed`: still a download.
        assert_eq!(
            swarm.upsert(addr, entry(true), Event::Periodic, ttl, 1),
            Upsert::Recorded
        );
        assert_eq!(swarm.stats().downloaded, 1);
        assert_eq!((swarm.stats().complete, swarm.stats().incomplete), (1, 0));
        // A late `completed` for the same transition is not counted twice.
        assert_eq!(
            swarm.upsert(addr, entry(true), Event::Completed, ttl, 1),
            Upsert::Recorded
        );
        assert_eq!(swarm.stats().downloaded, 1);
        swarm.remove(&addr);
        assert_eq!(
            swarm.stats(),
            SwarmStats {
                downloaded: 1,
                ..SwarmStats::default()
            }
        );
    }

    #[test]
    fn one_address_holds_at_most_its_share_and_gets_it_back_as_peers_leave() {
        let now = Instant::now();
        let ttl = Duration::from_secs(120);
        let mut swarm = Swarm::default();
        let peer = |i: u16| Peer {
            peer_id: [i as u8; 20],
            complete: false,
            last_seen: now,
            zone: None,
            server_seeder: false,
        };
        let at = |ip: &str, port: u16| SocketAddr::new(ip.parse().unwrap(), port);
        for port in 1..=3 {
            let got = swarm.upsert(at("10.0.0.9", port), peer(port), Event::Started, ttl, 3);
            assert_eq!(got, Upsert::Recorded);
        }
        let over = swarm.upsert(at("10.0.0.9", 4), peer(4), Event::Started, ttl, 3);
        assert_eq!(over, Upsert::AddressFull);
        // Known peers of a full address still re-announce; other addresses are not affected.
        let again = swarm.upsert(at("10.0.0.9", 2), peer(2), Event::Periodic, ttl, 3);
        assert_eq!(again, Upsert::Recorded);
        let other = swarm.upsert(at("10.0.0.10", 1), peer(9), Event::Started, ttl, 3);
        assert_eq!(other, Upsert::Recorded);
        swarm.remove(&at("10.0.0.9", 1));
        let freed = swarm.upsert(at("10.0.0.9", 5), peer(5), Event::Started, ttl, 3);
        assert_eq!(freed, Upsert::Recorded);
        // Expiry gives the share back too.
        swarm.sweep(now + ttl * 2, ttl);
        assert!(swarm.per_address.is_empty(), "{:?}", swarm.per_address);
        let after = swarm.upsert(at("10.0.0.9", 6), peer(6), Event::Started, ttl, 3);
        assert_eq!(after, Upsert::Recorded);
    }
}
