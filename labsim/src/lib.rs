//! A lab simulator driven by BootTorrent's real decision code (issue #18 item 2).
//!
//! Hosts with their own link rates sit behind access switches whose uplinks they share; the
//! server sits on its own link. Every decision the engine makes is made here by the engine's
//! own code, called the way `swarm/src/peer.rs`, `torrent.rs` and `session.rs` call it:
//! - peer sets come from the real tracker ([`boottorrent_tracker::swarm::Tracker`], announced
//!   to with real query strings, its bencoded answers parsed by the client's parser): 200
//!   peers asked, zone-local first when the tracker knows zones, the server's seeder last;
//! - each host dials up to 64 of them once a second and accepts inbound connections up to
//!   64; the server (super-seeding, 16 of 64 upload slots open at first, 1,024 peers) only
//!   accepts;
//! - blocks are chosen by [`boottorrent_swarm::picker::Picker`] with the engine's request
//!   pipeline (16 to 512 blocks, a quarter second of the peer's rate,
//!   `picker::pipeline_depth`, topped up at half);
//! - who is served is decided by [`boottorrent_swarm::choker`] (16 slots on hosts, rotation
//!   every 10 s, waiting zone peers taking the slots outside peers hold beyond half, the
//!   server's slots opening as its upload falls behind, `choker::Slots`);
//! - what the server offers whom by [`boottorrent_swarm::superseed`] (`top_up`, `taken`,
//!   `seen`, `tick` once a second), and a host may request from the server only what it was
//!   offered;
//! - HAVE, interest, choke, reject and cancel messages travel between hosts with a latency
//!   per hop, and the engine's timers (1 s ticks, 10 s rotation) run on simulated instants.
//!
//! The network is fluid: every block being served is a flow, and flows share links max-min
//! fairly ([`share::max_min`]), recomputed every `step` seconds; a flow's bytes are carried
//! over across blocks, so the step only limits when events are seen, not throughput. Not
//! modelled: TCP dynamics (slow start, loss, buffer bloat), CPU and disk (except the
//! calibration-only [`Calibration`] parameters), snubbing and hash failures.
//!
//! Besides when each host had the image, a run says where the hosts' link time went
//! ([`LinkUse`], each half second): busy, or why idle. Times alone say that a lab is slow;
//! this says which decision to look at.

pub mod share;

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use boottorrent_bt::announce::{
    AnnounceRequest, Event as AnnounceEvent, announce_url, parse_response,
};
use boottorrent_bt::wire::BlockRef;
use boottorrent_bt::{Bitfield, Geometry, InfoHash, PeerId};
use boottorrent_swarm::choker::{self, Choke, Slots};
use boottorrent_swarm::picker::{self, Picker, Received};
use boottorrent_swarm::session;
use boottorrent_swarm::superseed::{self, Offers, SuperSeed};
use boottorrent_tracker::swarm::{Locality, Tracker, TrackerConfig};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Requests a connection queues for serving before it rejects more (peer.rs).
const MAX_QUEUED_REQUESTS: usize = 16384;
/// What a host asks the tracker for (torrent.rs announces with `numwant=200`).
const NUMWANT: u32 = 200;
/// Connections per torrent on a host (`SessionConfig::default().max_peers`).
const HOST_MAX_PEERS: usize = 64;
/// Upload slots on a host (`SessionConfig::default().upload_slots`).
const HOST_SLOTS: usize = 16;
/// The server's seeder: `upload_slots: 64, first_upload_slots: Some(16), max_peers: 1024`
/// (src/server/mod.rs).
const SERVER_SLOTS: usize = 64;
const SERVER_FIRST_SLOTS: usize = 16;
const SERVER_MAX_PEERS: usize = 1024;
/// An address whose connection ended is dialled again after this (torrent.rs).
const REDIAL_AFTER: f64 = 2.0;
/// An address that could not be reached is dialled again after this (torrent.rs).
const RETRY_AFTER: f64 = 15.0;
/// How long a dial to a dead host takes to fail (peer.rs `CONNECT_TIMEOUT`).
const CONNECT_TIMEOUT: f64 = 5.0;
/// The seeder's and the agents' BitTorrent port.
const PORT: u16 = 6881;

/// Parameters used only to match the sim to `scripts/bench-swarm` runs on one small machine;
/// all zero (or `None`) describe the network alone.
#[derive(Debug, Clone, Default)]
pub struct Calibration {
    /// Seconds from the deploy command to a host's torrent starting (command delivery, the
    /// agent creating the file).
    pub startup: f64,
    /// Seconds from a host's last piece to its image being staged (the agent's whole-file
    /// SHA-256 and its report).
    pub finish: f64,
    /// The machine running every host: CPU cores and CPU-seconds each GiB of payload costs
    /// (sender, receiver and the kernel's veth/bridge/tc path together). Every flow then also
    /// crosses one "CPU link" of `cores / cost` bytes per second.
    pub cpu: Option<(f64, f64)>,
}

/// One simulated lab.
#[derive(Debug, Clone)]
pub struct Lab {
    /// Leechers (the server is extra).
    pub hosts: usize,
    /// Image size in bytes.
    pub image_len: u64,
    /// Piece size in bytes; `None`: what the product chooses for the image
    /// ([`boottorrent_tracker::create::choose_piece_len`]).
    pub piece_len: Option<u32>,
    /// Host link rate in bytes/s, each way.
    pub host_rate: f64,
    /// Fraction of hosts on slow links, and their rate in bytes/s.
    pub slow: (f64, f64),
    /// Server link rate in bytes/s, each way.
    pub server_rate: f64,
    /// Hosts per access switch.
    pub per_switch: usize,
    /// Access switch uplink rate in bytes/s, each way.
    pub uplink_rate: f64,
    /// Whether the tracker knows each host's zone (its switch) and hands out zone peers
    /// first. Without it every host is in a subnet of its own, and handout is random.
    pub locality: bool,
    /// Whether hosts also know their zone (`SessionConfig::zone`, which agents take from
    /// the network of their interface toward the server, here their switch): the picker
    /// leaves zone-held pieces to zone peers, dialling goes zone first and the choker
    /// unchokes zone peers first. `false` is the engine before agents knew it.
    pub engine_zone: bool,
    /// Most pieces a host has in flight from outside its zone while its zone holds pieces;
    /// `None` is the engine's `picker::OUTSIDE_PIECES`.
    pub outside_pieces: Option<usize>,
    /// Whether a host's zone also holds the server, as an agent's does: what the
    /// super-seeder offers is not rationed like pieces from another switch. `false` is the
    /// engine before.
    pub server_in_zone: bool,
    /// Whether peers outside a host's zone hold at most
    /// `session::outside_peer_limit` of its connections, as in the engine. `false` is the
    /// engine before.
    pub outside_peer_limit: bool,
    /// Hosts dial the tracker's peers in the order it handed them out (zone first), as the
    /// engine does; `false` is the engine before, which dialled in arbitrary order.
    pub dial_in_handout_order: bool,
    /// Hosts dial as soon as the tracker answers an announce, as the engine does; `false` is
    /// the engine before, which dialled at its lifecycle task's next 1 s tick.
    pub dial_on_announce: bool,
    /// One-way latency of one hop (host to switch, switch to core, core to server), seconds.
    pub hop_latency: f64,
    /// Hosts start at a uniformly random time in `0..start_spread` seconds.
    pub start_spread: f64,
    /// Fraction of hosts that leave (power off) midway: each at a random time between 20 %
    /// and 80 % of S/B after its start.
    pub failing: f64,
    /// Calibration-only parameters.
    pub calibration: Calibration,
    /// Seconds between recomputations of the flows' rates.
    pub step: f64,
    /// Seed for start times and which hosts are slow or fail (the engine's own random
    /// choices, such as the picker's tie-breaks, are not seeded).
    pub seed: u64,
}

impl Lab {
    /// A lab of `hosts` on `host_mbit` links (the server too), 40 hosts per switch on
    /// 10 Gbit/s uplinks, 0.1 ms per hop, hosts starting within 50 ms, tracker locality on
    /// and hosts knowing their zone.
    pub fn new(hosts: usize, image_len: u64, host_mbit: f64) -> Lab {
        let rate = host_mbit * 1e6 / 8.0;
        Lab {
            hosts,
            image_len,
            piece_len: None,
            host_rate: rate,
            slow: (0.0, rate),
            server_rate: rate,
            per_switch: 40,
            uplink_rate: 10e9 / 8.0,
            locality: true,
            engine_zone: true,
            outside_pieces: None,
            server_in_zone: true,
            outside_peer_limit: true,
            dial_in_handout_order: true,
            dial_on_announce: true,
            hop_latency: 100e-6,
            // Deploy commands reach hosts within a few tens of milliseconds of each other;
            // starting them at one instant would make every host's timers and every
            // choker's ties fire in lockstep.
            start_spread: 0.05,
            failing: 0.0,
            calibration: Calibration::default(),
            step: 0.01,
            seed: 1,
        }
    }

    /// S/B: one copy of the image on one host link.
    pub fn ideal(&self) -> f64 {
        self.image_len as f64 / self.host_rate
    }
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Piece size used.
    pub piece_len: u32,
    /// Seconds from the start until the first and the last host (of those that did not
    /// fail) had the image.
    pub first_done: f64,
    /// See `first_done`.
    pub last_done: f64,
    /// When each host had the image; `None` for failed hosts (and any unfinished).
    pub done: Vec<Option<f64>>,
    /// Hosts that failed midway.
    pub failed: usize,
    /// Image copies the server sent.
    pub server_copies: f64,
    /// Mean utilisation until `last_done`: the server's link (up), the access uplinks (each
    /// switch's busier direction: mean and max over switches), hosts' links up and down.
    pub server_util: f64,
    /// See `server_util`.
    pub uplink_util_mean: f64,
    /// See `server_util`.
    pub uplink_util_max: f64,
    /// See `server_util`.
    pub host_up_util: f64,
    /// See `server_util`.
    pub host_down_util: f64,
    /// Bytes that crossed access uplinks, both directions, all switches.
    pub uplink_bytes: f64,
    /// Of the connections between hosts made during the run, the fraction within a switch.
    pub local_connections: f64,
    /// Where the hosts' link time went, per [`LinkUse::SPAN`] seconds of the run.
    pub link_use: Vec<LinkUse>,
}

/// Where the hosts' link time went over a span of the run, as shares of it: a link is busy,
/// or idle for the first of these reasons that holds. It tells which decision a faster lab
/// needs: idle links with nothing to offer call for pieces sooner, links held back by others
/// for different pairings, waiting behind chokes for other choking.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkUse {
    /// Upload, over every started host's link time: sending; sending, but held to less by
    /// the receivers' links or the uplinks; peers it serves have asked for nothing;
    /// peers that want from it are all choked; no peer wants anything it has.
    pub up: [f64; 5],
    /// Download, over the link time of started hosts without the image: receiving;
    /// receiving, but held to less by the senders' links or the uplinks; requests out,
    /// nothing arriving yet; peers that unchoke it have pieces it lacks but it asked for
    /// none; every peer with a piece it lacks chokes it; no peer has a piece it lacks.
    pub down: [f64; 6],
    /// Host-seconds behind `up` and `down`, to weigh spans.
    pub up_host_s: f64,
    /// See `up_host_s`.
    pub down_host_s: f64,
}

impl LinkUse {
    /// Seconds each entry covers.
    pub const SPAN: f64 = 0.5;
    /// Names of `up`'s entries, in order.
    pub const UP: [&'static str; 5] = ["busy", "held_by_others", "unasked", "choked", "unwanted"];
    /// Names of `down`'s entries, in order.
    pub const DOWN: [&'static str; 6] = [
        "busy",
        "held_by_others",
        "in_flight",
        "unasked",
        "choked",
        "nothing_to_get",
    ];
}

/// What travels between two nodes (the engine's peer-wire messages and connection set-up).
#[derive(Debug, Clone)]
enum Wire {
    Bitfield(Bitfield),
    Have(u32),
    Interested(bool),
    Choke(bool),
    Request(BlockRef),
    Reject(BlockRef),
    Cancel(BlockRef),
    Piece(BlockRef),
    Close,
}

#[derive(Debug, Clone)]
enum What {
    Start,
    Tick,
    Fail,
    Announce(AnnounceEvent),
    /// What-if: dial as soon as the first announce's answer is in.
    DialNow,
    /// A dial reached `to` (the handshake is done).
    Dial,
    /// `to`'s dial was accepted; the connection is `conn`.
    Accepted,
    /// `to`'s dial ended without a connection; `reachable` tells which retry applies.
    DialFailed {
        reachable: bool,
    },
    Wire(Wire),
}

#[derive(Debug)]
struct Event {
    at: f64,
    seq: u64,
    to: usize,
    from: usize,
    conn: u64,
    what: What,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    fn cmp(&self, other: &Self) -> Ordering {
        // Earliest first from a max-heap; equal times in sending order.
        other.at.total_cmp(&self.at).then(other.seq.cmp(&self.seq))
    }
}

/// One node's view of one connection (the engine's `PeerSlot` and `Connection` together).
struct Slot {
    /// The node at the other end.
    remote: usize,
    conn: u64,
    in_zone: bool,
    /// What the remote announced.
    has: Bitfield,
    /// Our choke of the remote (the choker's state; `choked` is also the connection's
    /// `am_choking`, since the sim delivers the torrent's commands at once).
    choke: Choke,
    am_interested: bool,
    peer_choking: bool,
    /// Our requests to the remote.
    outstanding: HashSet<BlockRef>,
    /// The remote's requests to us, served in order; the first is being sent, `head_left`
    /// bytes of it left.
    queue: VecDeque<BlockRef>,
    head_left: Option<f64>,
    offers: Offers,
    uploaded: u64,
    download_rate: f64,
    window: (f64, u64),
}

#[derive(Default, Clone, Copy)]
struct Candidate {
    connecting: bool,
    retry_at: f64,
    /// Its place in the first tracker answer that named it.
    rank: usize,
}

struct Node {
    addr: SocketAddr,
    /// Access switch; `None` for the server.
    switch: Option<usize>,
    rate: f64,
    server: bool,
    picker: Picker,
    /// Connections by the engine's key (a per-node counter), and the key of each remote.
    peers: HashMap<u64, Slot, Keyed>,
    key_of: KeyOf,
    next_key: u64,
    candidates: HashMap<usize, Candidate>,
    seed: Option<SuperSeed>,
    alive: bool,
    failed: bool,
    start: f64,
    last_rotate: f64,
    complete_at: Option<f64>,
    slots: Slots,
    max_peers: usize,
    peer_id: PeerId,
    sent: f64,
    /// `sent` at the last tick: the lifecycle's upload rate over the second gone.
    sent_at_tick: f64,
    received: f64,
}

/// The tracker's view of where addresses sit: zone = access switch when locality is on.
struct Zones {
    zone_of: HashMap<IpAddr, String>,
    server: SocketAddr,
}

impl Locality for Zones {
    fn zone_of(&self, ip: IpAddr) -> Option<String> {
        self.zone_of.get(&ip).cloned()
    }
    fn is_server_seeder(&self, addr: SocketAddr) -> bool {
        addr == self.server
    }
}

struct Sim<'a> {
    /// Link time summed per [`LinkUse::SPAN`], host-seconds (shares once the run ends).
    link_use: Vec<LinkUse>,
    lab: &'a Lab,
    geometry: Geometry,
    nodes: Vec<Node>,
    by_addr: HashMap<SocketAddr, usize>,
    events: BinaryHeap<Event>,
    seq: u64,
    next_conn: u64,
    now: f64,
    base: tokio::time::Instant,
    base_std: std::time::Instant,
    tracker: Tracker,
    zones: Zones,
    info_hash: InfoHash,
    switch_out: Vec<f64>,
    switch_in: Vec<f64>,
    rng: StdRng,
    /// Host-to-host connections made: within a switch, and all.
    connections: (u64, u64),
}

impl Lab {
    /// Runs the lab until every host that did not fail has the image, or `limit` seconds.
    pub fn run(&self, limit: f64) -> Outcome {
        let mut sim = Sim::new(self);
        sim.run(limit)
    }
}

impl<'a> Sim<'a> {
    fn new(lab: &'a Lab) -> Sim<'a> {
        let piece_len = lab
            .piece_len
            .unwrap_or_else(|| boottorrent_tracker::create::choose_piece_len(lab.image_len));
        let geometry = Geometry {
            total_len: lab.image_len,
            piece_len,
        };
        let n = geometry.piece_count();
        let per_switch = lab.per_switch.clamp(1, 250);
        let switches = lab.hosts.div_ceil(per_switch);
        let mut rng = StdRng::seed_from_u64(lab.seed);
        let server_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 255, 255, 1)), PORT);
        let mut zone_of = HashMap::new();
        let mut nodes = Vec::with_capacity(lab.hosts + 1);
        let ideal = lab.ideal();
        for h in 0..lab.hosts {
            let switch = h / per_switch;
            // With locality the switch is a /24 the tracker knows as a zone; without it every
            // host is in a /24 of its own, so the tracker's subnet fallback finds nobody near.
            let ip = if lab.locality {
                Ipv4Addr::new(
                    10,
                    (switch >> 8) as u8,
                    switch as u8,
                    (h % per_switch + 1) as u8,
                )
            } else {
                Ipv4Addr::new(10, (h >> 8) as u8, h as u8, 1)
            };
            if lab.locality {
                zone_of.insert(IpAddr::V4(ip), format!("switch-{switch}"));
            }
            let slow = rng.random::<f64>() < lab.slow.0;
            let start = lab.calibration.startup + rng.random::<f64>() * lab.start_spread;
            let fails = rng.random::<f64>() < lab.failing;
            let fail_at = start + ideal * (0.2 + 0.6 * rng.random::<f64>());
            let mut node = Node::new(
                SocketAddr::new(IpAddr::V4(ip), PORT),
                Some(switch),
                if slow { lab.slow.1 } else { lab.host_rate },
                false,
                geometry,
            );
            node.start = start;
            if let Some(k) = lab.outside_pieces {
                node.picker.limit_outside(k);
            }
            if fails {
                node.failed = false;
                node.complete_at = None;
            }
            nodes.push((node, fails.then_some(fail_at)));
        }
        let mut server = Node::new(server_addr, None, lab.server_rate, true, geometry);
        server.start = 0.0;
        nodes.push((server, None));
        let tracker = Tracker::new(TrackerConfig::default());
        let info_hash = InfoHash([7; 20]);
        tracker.allow(info_hash.0);
        let mut sim = Sim {
            link_use: Vec::new(),
            lab,
            geometry,
            by_addr: nodes
                .iter()
                .enumerate()
                .map(|(i, (n, _))| (n.addr, i))
                .collect(),
            nodes: Vec::new(),
            events: BinaryHeap::new(),
            seq: 0,
            next_conn: 0,
            now: 0.0,
            base: tokio::time::Instant::now(),
            base_std: std::time::Instant::now(),
            tracker,
            zones: Zones {
                zone_of,
                server: server_addr,
            },
            info_hash,
            switch_out: vec![0.0; switches],
            switch_in: vec![0.0; switches],
            rng,
            connections: (0, 0),
        };
        // The server's seeder is up before any deployment: it announces first.
        let server = lab.hosts;
        sim.schedule(0.0, server, server, 0, What::Start);
        for (i, (node, fail_at)) in nodes.into_iter().enumerate() {
            if i != server {
                sim.schedule(node.start, i, i, 0, What::Start);
            }
            if let Some(at) = fail_at {
                sim.schedule(at, i, i, 0, What::Fail);
            }
            sim.nodes.push(node);
        }
        let _ = n;
        sim
    }

    fn server(&self) -> usize {
        self.lab.hosts
    }

    fn instant(&self) -> tokio::time::Instant {
        self.base + Duration::from_secs_f64(self.now)
    }

    fn schedule(&mut self, at: f64, to: usize, from: usize, conn: u64, what: What) {
        self.seq += 1;
        self.events.push(Event {
            at,
            seq: self.seq,
            to,
            from,
            conn,
            what,
        });
    }

    /// One-way latency between two nodes: host-switch, (switch-core, core-switch or
    /// core-server), switch-host.
    fn latency(&self, a: usize, b: usize) -> f64 {
        let hops = match (self.nodes[a].switch, self.nodes[b].switch) {
            (Some(x), Some(y)) if x == y => 2.0,
            (Some(_), Some(_)) => 4.0,
            _ => 3.0,
        };
        hops * self.lab.hop_latency
    }

    fn send(&mut self, from: usize, to: usize, msg: Wire) {
        self.send_at(self.now, from, to, msg);
    }

    fn send_at(&mut self, at: f64, from: usize, to: usize, msg: Wire) {
        let Some(conn) = self.nodes[from].slot(to).map(|s| s.conn) else {
            return;
        };
        let at = at + self.latency(from, to);
        self.schedule(at, to, from, conn, What::Wire(msg));
    }

    fn run(&mut self, limit: f64) -> Outcome {
        let step = self.lab.step.max(1e-4);
        while self.now < limit {
            let until = self.now + step;
            while self.events.peek().is_some_and(|e| e.at <= until) {
                let e = self.events.pop().expect("peeked");
                self.now = self.now.max(e.at);
                self.handle(e);
            }
            self.now = until;
            self.transfer(until - step, step);
            if self.finished() {
                break;
            }
        }
        self.outcome()
    }

    fn finished(&self) -> bool {
        self.nodes
            .iter()
            .filter(|n| !n.server && !n.failed)
            .all(|n| n.complete_at.is_some())
    }

    fn handle(&mut self, e: Event) {
        let to = e.to;
        match e.what {
            What::Start => self.start(to),
            What::Tick => self.tick(to),
            What::Fail => self.fail(to),
            What::Announce(event) => self.announce(to, event),
            What::DialNow => {
                if self.nodes[to].alive {
                    self.dial(to);
                }
            }
            What::Dial => self.dial_arrived(e.from, to),
            What::Accepted => self.accepted(to, e.from, e.conn),
            What::DialFailed { reachable } => {
                if let Some(c) = self.nodes[to].candidates.get_mut(&e.from) {
                    c.connecting = false;
                    c.retry_at = self.now + if reachable { REDIAL_AFTER } else { RETRY_AFTER };
                }
            }
            What::Wire(msg) => {
                let live = self.nodes[to].alive
                    && self.nodes[to]
                        .slot(e.from)
                        .is_some_and(|s| s.conn == e.conn);
                if live {
                    self.message(to, e.from, msg);
                }
            }
        }
    }

    fn start(&mut self, n: usize) {
        self.nodes[n].alive = true;
        self.nodes[n].last_rotate = self.now;
        self.announce(n, AnnounceEvent::Started);
        // The lifecycle task's 1 s interval; its first tick comes before the first announce's
        // answer, so the engine's first dial is a second in.
        self.schedule(self.now + 1.0, n, n, 0, What::Tick);
        if self.lab.dial_on_announce && !self.nodes[n].server {
            let answer = 2.0 * self.latency(n, self.server());
            self.schedule(self.now + answer, n, n, 0, What::DialNow);
        }
    }

    fn fail(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        node.alive = false;
        node.failed = true;
        // Its links go down: peers see the connections end (a power-off would take them a
        // snub or idle timeout to notice; a killed agent's kernel resets them at once).
        let peers: Vec<usize> = node.peers.values().map(|s| s.remote).collect();
        for p in peers {
            self.send(n, p, Wire::Close);
        }
        self.nodes[n].peers.clear();
        self.nodes[n].key_of.clear();
    }

    fn announce(&mut self, n: usize, event: AnnounceEvent) {
        if !self.nodes[n].alive {
            return;
        }
        let node = &self.nodes[n];
        let left = self.geometry.total_len - node.picker.bytes_done();
        let request = AnnounceRequest {
            info_hash: self.info_hash,
            peer_id: node.peer_id,
            port: node.addr.port(),
            uploaded: 0,
            downloaded: 0,
            left,
            event,
            numwant: Some(NUMWANT),
        };
        let url = announce_url("http://server/announce", &request);
        let query = url.split_once('?').map_or("", |(_, q)| q);
        let now = self.base_std + Duration::from_secs_f64(self.now);
        let answer = self
            .tracker
            .announce(query, node.addr.ip(), &self.zones, now);
        let Ok(response) = parse_response(&answer.body) else {
            return;
        };
        let node = &mut self.nodes[n];
        let known = node.candidates.len();
        for (i, addr) in response.peers.iter().enumerate() {
            if let Some(&p) = self.by_addr.get(addr) {
                node.candidates.entry(p).or_insert(Candidate {
                    rank: known + i,
                    ..Candidate::default()
                });
            }
        }
        if event != AnnounceEvent::Completed {
            let next = self.now + response.interval.as_secs_f64();
            self.schedule(next, n, n, 0, What::Announce(AnnounceEvent::Periodic));
        }
    }

    fn tick(&mut self, n: usize) {
        if !self.nodes[n].alive {
            return;
        }
        let now = self.now;
        // Each connection's 1 s tick: its download rate sample, then topping up requests.
        let remotes: Vec<usize> = self.nodes[n].peers.values().map(|s| s.remote).collect();
        for r in remotes {
            if let Some(s) = self.nodes[n].slot_mut(r) {
                let secs = now - s.window.0;
                if secs >= 1.0 {
                    s.download_rate = 0.5 * s.download_rate + 0.5 * (s.window.1 as f64 / secs);
                    s.window = (now, 0);
                }
            }
            self.fill_requests(n, r);
        }
        // The lifecycle task: the second's upload (slots may open), rotation, super-seeding's
        // tick, dialling.
        let node = &mut self.nodes[n];
        let rate = (node.sent - node.sent_at_tick).max(0.0) as u64;
        node.sent_at_tick = node.sent;
        let served = node.peers.values().filter(|s| s.choke.served()).count();
        let interested = node.peers.values().filter(|s| s.choke.interested).count();
        if node.slots.second(rate, served, interested) {
            self.fill_slots(n);
        }
        if now - self.nodes[n].last_rotate >= choker::ROTATE_EVERY.as_secs_f64() {
            self.nodes[n].last_rotate = now;
            let instant = self.instant();
            let choked = choker::rotate(
                self.nodes[n]
                    .peers
                    .iter_mut()
                    .map(|(k, s)| (k, &mut s.choke)),
                instant,
            );
            for k in choked {
                let r = self.nodes[n].remote(k);
                self.choke(n, r);
            }
            self.fill_slots(n);
        }
        if self.nodes[n].server {
            let instant = self.instant();
            let node = &mut self.nodes[n];
            let offered = match node.seed.as_mut() {
                Some(seed) => seed.tick(&mut seed_view(&mut node.peers), instant),
                None => Vec::new(),
            };
            for (k, piece) in offered {
                let r = self.nodes[n].remote(k);
                self.send(n, r, Wire::Have(piece));
            }
        }
        self.dial(n);
        self.schedule(now + 1.0, n, n, 0, What::Tick);
    }

    /// `connect_candidates`: known addresses not connected, up to the peer limit.
    fn dial(&mut self, n: usize) {
        let node = &self.nodes[n];
        if node.picker.is_complete() {
            return;
        }
        let connecting = node.candidates.values().filter(|c| c.connecting).count();
        let room = node.max_peers.saturating_sub(node.peers.len() + connecting);
        if room == 0 {
            return;
        }
        let mut chosen: Vec<usize> = node
            .candidates
            .iter()
            .filter(|(p, c)| {
                !c.connecting && c.retry_at <= self.now && !node.key_of.contains_key(p)
            })
            .map(|(p, _)| *p)
            .collect();
        // The engine keeps candidates in a HashMap, so their order is arbitrary: shuffled
        // here. Zone peers first (only when the engine is told its zone).
        chosen.sort_unstable();
        if self.lab.dial_in_handout_order {
            chosen.sort_by_key(|p| node.candidates[p].rank);
        } else {
            chosen.shuffle(&mut self.rng);
        }
        chosen.sort_by_key(|&p| !self.in_zone(n, p));
        let mut outside_room = self.outside_room(n, true);
        chosen.retain(|&p| {
            let take = self.in_zone(n, p) || outside_room > 0;
            if take && !self.in_zone(n, p) {
                outside_room -= 1;
            }
            take
        });
        chosen.truncate(room);
        for p in chosen {
            if let Some(c) = self.nodes[n].candidates.get_mut(&p) {
                c.connecting = true;
            }
            // TCP's handshake, then BitTorrent's: two round trips.
            let at = self.now + 4.0 * self.latency(n, p);
            self.schedule(at, p, n, 0, What::Dial);
        }
    }

    fn same_switch(&self, a: usize, b: usize) -> bool {
        self.nodes[a].switch.is_some() && self.nodes[a].switch == self.nodes[b].switch
    }

    /// Whether `b` is in `a`'s zone as `a`'s engine sees it: the server's engine has no
    /// zone; a host's holds its switch and, as an agent's does, the server.
    fn in_zone(&self, a: usize, b: usize) -> bool {
        self.has_zone(a)
            && (self.same_switch(a, b) || (self.lab.server_in_zone && self.nodes[b].server))
    }

    fn has_zone(&self, n: usize) -> bool {
        self.lab.engine_zone && !self.nodes[n].server
    }

    /// How many more peers outside its zone `n` may take: counting those it is dialling
    /// (`dial_targets`) or not (`register`).
    fn outside_room(&self, n: usize, dialling: bool) -> usize {
        if !self.lab.outside_peer_limit || !self.has_zone(n) {
            return usize::MAX;
        }
        let node = &self.nodes[n];
        let mut outside = node.peers.values().filter(|s| !s.in_zone).count();
        if dialling {
            outside += node
                .candidates
                .iter()
                .filter(|(p, c)| c.connecting && !self.in_zone(n, **p))
                .count();
        }
        session::outside_peer_limit(node.max_peers).saturating_sub(outside)
    }

    /// `from`'s handshake reached `to`: `register`, then both introduce themselves.
    fn dial_arrived(&mut self, from: usize, to: usize) {
        let lat = self.latency(from, to);
        if !self.nodes[to].alive {
            self.schedule(
                self.now + CONNECT_TIMEOUT,
                from,
                to,
                0,
                What::DialFailed { reachable: false },
            );
            return;
        }
        let target = &self.nodes[to];
        let refuse = target.peers.len() >= target.max_peers
            || target.key_of.contains_key(&from)
            || (!self.in_zone(to, from) && self.outside_room(to, false) == 0)
            || (target.picker.is_complete()
                && self.nodes[from].picker.is_complete()
                && !target.server);
        if refuse {
            self.schedule(
                self.now + lat,
                from,
                to,
                0,
                What::DialFailed { reachable: true },
            );
            return;
        }
        self.next_conn += 1;
        let conn = self.next_conn;
        if !self.nodes[to].server && !self.nodes[from].server {
            self.connections.1 += 1;
            if self.same_switch(to, from) {
                self.connections.0 += 1;
            }
        }
        self.register(to, from, conn);
        self.schedule(self.now + lat, from, to, conn, What::Accepted);
        self.introduce(to, from);
    }

    fn accepted(&mut self, n: usize, remote: usize, conn: u64) {
        if let Some(c) = self.nodes[n].candidates.get_mut(&remote) {
            c.connecting = false;
        }
        if !self.nodes[n].alive || self.nodes[n].key_of.contains_key(&remote) {
            // Dead meanwhile, or the other side dialled us too: the remote's slot goes.
            self.schedule(
                self.now + self.latency(n, remote),
                remote,
                n,
                conn,
                What::Wire(Wire::Close),
            );
            return;
        }
        self.register(n, remote, conn);
        self.introduce(n, remote);
    }

    fn register(&mut self, n: usize, remote: usize, conn: u64) {
        let pieces = self.geometry.piece_count();
        let in_zone = self.in_zone(n, remote);
        let instant = self.instant();
        let node = &mut self.nodes[n];
        // Keys count connections per node, as the engine's do: the choker breaks ties by
        // them, so they must not rank the same peers first on every host.
        node.next_key += 1;
        let key = node.next_key;
        node.key_of.insert(remote, key);
        node.peers.insert(
            key,
            Slot {
                remote,
                conn,
                in_zone,
                has: Bitfield::new(pieces),
                choke: Choke {
                    zone: in_zone,
                    ..Choke::new(instant)
                },
                am_interested: false,
                peer_choking: true,
                outstanding: HashSet::new(),
                queue: VecDeque::new(),
                head_left: None,
                offers: Offers::default(),
                uploaded: 0,
                download_rate: 0.0,
                window: (self.now, 0),
            },
        );
    }

    /// What we have, right after the handshake: a super-seeder hides it and offers.
    fn introduce(&mut self, n: usize, remote: usize) {
        let pieces = self.geometry.piece_count();
        let bits = if self.nodes[n].server {
            Bitfield::new(pieces)
        } else {
            self.nodes[n].picker.have().clone()
        };
        self.send(n, remote, Wire::Bitfield(bits));
        self.offer(n, remote);
    }

    fn offer(&mut self, n: usize, remote: usize) {
        let instant = self.instant();
        let node = &mut self.nodes[n];
        let Some(seed) = node.seed.as_mut() else {
            return;
        };
        let Some(&key) = node.key_of.get(&remote) else {
            return;
        };
        let offered = seed.top_up(&mut seed_view(&mut node.peers), key, instant);
        for piece in offered {
            self.send(n, remote, Wire::Have(piece));
        }
    }

    fn message(&mut self, n: usize, from: usize, msg: Wire) {
        let Some(&key) = self.nodes[n].key_of.get(&from) else {
            return;
        };
        match msg {
            Wire::Bitfield(bits) => {
                let node = &mut self.nodes[n];
                let slot = node.peers.get_mut(&key).expect("live connection");
                node.picker.add_availability(&bits, slot.in_zone);
                slot.offers.forget_held(&bits);
                slot.has = bits;
                self.offer(n, from);
                self.update_interest(n, from);
            }
            Wire::Have(piece) => {
                let node = &mut self.nodes[n];
                let slot = node.peers.get_mut(&key).expect("live connection");
                if slot.has.set(piece) {
                    node.picker.add_piece(piece, slot.in_zone);
                }
                let instant = self.instant();
                let node = &mut self.nodes[n];
                if let Some(seed) = node.seed.as_mut() {
                    let offered = seed.seen(&mut seed_view(&mut node.peers), key, piece, instant);
                    for (k, p) in offered {
                        let r = self.nodes[n].remote(k);
                        self.send(n, r, Wire::Have(p));
                    }
                }
                let node = &self.nodes[n];
                let both_complete = node.picker.is_complete()
                    && node.peers.get(&key).is_some_and(|s| s.has.is_full());
                if both_complete && !node.server {
                    self.close(n, from);
                    return;
                }
                self.update_interest(n, from);
                self.fill_requests(n, from);
            }
            Wire::Interested(interested) => {
                let instant = self.instant();
                let slot = self.nodes[n].peers.get_mut(&key).expect("live connection");
                slot.choke.set_interest(interested, instant);
                self.fill_slots(n);
            }
            Wire::Choke(true) => {
                // The fast extension: a choke does not drop our requests; rejects follow.
                self.nodes[n]
                    .peers
                    .get_mut(&key)
                    .expect("live")
                    .peer_choking = true;
            }
            Wire::Choke(false) => {
                self.nodes[n]
                    .peers
                    .get_mut(&key)
                    .expect("live")
                    .peer_choking = false;
                self.fill_requests(n, from);
            }
            Wire::Request(r) => self.request(n, from, r),
            Wire::Reject(r) => {
                let node = &mut self.nodes[n];
                let slot = node.peers.get_mut(&key).expect("live connection");
                if slot.outstanding.remove(&r) {
                    node.picker.release(key, r);
                }
            }
            Wire::Cancel(r) => {
                let slot = self.nodes[n].peers.get_mut(&key).expect("live connection");
                // The block being sent is on the wire already.
                let skip = usize::from(slot.head_left.is_some());
                let mut i = skip;
                while i < slot.queue.len() {
                    if slot.queue[i] == r {
                        slot.queue.remove(i);
                    } else {
                        i += 1;
                    }
                }
            }
            Wire::Piece(r) => self.piece(n, from, r),
            Wire::Close => self.unregister(n, from),
        }
    }

    fn request(&mut self, n: usize, from: usize, r: BlockRef) {
        let Some(&key) = self.nodes[n].key_of.get(&from) else {
            return;
        };
        let size = self.geometry.piece_size(r.piece);
        let instant = self.instant();
        let node = &mut self.nodes[n];
        let slot = node.peers.get_mut(&key).expect("live connection");
        let offered = !node.server || slot.offers.may_request(r.piece);
        let servable = node.picker.have().get(r.piece)
            && offered
            && !slot.choke.choked
            && slot.queue.len() < MAX_QUEUED_REQUESTS;
        if !servable {
            self.send(n, from, Wire::Reject(r));
            return;
        }
        slot.queue.push_back(r);
        if node.server && slot.offers.requested(r.piece, r.len, size, instant) {
            let seed = node.seed.as_mut().expect("the server super-seeds");
            let offered = seed.taken(&mut seed_view(&mut node.peers), key, r.piece, instant);
            for piece in offered {
                self.send(n, from, Wire::Have(piece));
            }
        }
    }

    fn piece(&mut self, n: usize, from: usize, r: BlockRef) {
        let Some(&key) = self.nodes[n].key_of.get(&from) else {
            return;
        };
        let node = &mut self.nodes[n];
        let slot = node.peers.get_mut(&key).expect("live connection");
        slot.outstanding.remove(&r);
        slot.window.1 += u64::from(r.len);
        let (cancel, done) = match node.picker.received(key, r) {
            Received::Unexpected => (Vec::new(), false),
            Received::Block { cancel } => (cancel, false),
            Received::PieceDone { cancel } => (cancel, true),
        };
        for other in cancel {
            let had = self.nodes[n]
                .peers
                .get_mut(&other)
                .is_some_and(|s| s.outstanding.remove(&r));
            if had {
                let o = self.nodes[n].remote(other);
                self.send(n, o, Wire::Cancel(r));
                self.fill_requests(n, o);
            }
        }
        if done {
            self.nodes[n].picker.verified(r.piece, true);
            self.piece_verified(n, r.piece);
        }
        if self.nodes[n].peers.contains_key(&key) {
            self.fill_requests(n, from);
        }
    }

    fn piece_verified(&mut self, n: usize, piece: u32) {
        let remotes: Vec<usize> = self.nodes[n].peers.values().map(|s| s.remote).collect();
        for &r in &remotes {
            self.send(n, r, Wire::Have(piece));
            self.update_interest(n, r);
            self.fill_requests(n, r);
        }
        if self.nodes[n].picker.is_complete() && self.nodes[n].complete_at.is_none() {
            self.nodes[n].complete_at = Some(self.now);
            self.announce(n, AnnounceEvent::Completed);
            for r in remotes {
                let full = self.nodes[n].slot(r).is_some_and(|s| s.has.is_full());
                if full {
                    self.close(n, r);
                }
            }
        }
    }

    fn update_interest(&mut self, n: usize, remote: usize) {
        let node = &mut self.nodes[n];
        let Some(&key) = node.key_of.get(&remote) else {
            return;
        };
        let Some(slot) = node.peers.get_mut(&key) else {
            return;
        };
        let want = !node.picker.is_complete() && node.picker.wants_from(&slot.has);
        if want != slot.am_interested {
            slot.am_interested = want;
            self.send(n, remote, Wire::Interested(want));
        }
    }

    /// `fill_requests`: `picker::pipeline_depth` in flight, topped up at half.
    fn fill_requests(&mut self, n: usize, remote: usize) {
        let node = &mut self.nodes[n];
        let Some(&key) = node.key_of.get(&remote) else {
            return;
        };
        let Some(slot) = node.peers.get_mut(&key) else {
            return;
        };
        if slot.peer_choking || !slot.am_interested {
            return;
        }
        let depth = picker::pipeline_depth(slot.download_rate);
        let out = slot.outstanding.len();
        if out >= depth || (out > depth / 2 && out > 0) {
            return;
        }
        let picked = node.picker.pick(key, &slot.has, slot.in_zone, depth - out);
        slot.outstanding.extend(picked.iter().copied());
        for r in picked {
            self.send(n, remote, Wire::Request(r));
        }
    }

    fn fill_slots(&mut self, n: usize) {
        let instant = self.instant();
        let node = &mut self.nodes[n];
        let swaps = choker::make_room_for_zone(
            node.peers.iter_mut().map(|(k, s)| (k, &mut s.choke)),
            node.slots.open(),
            instant,
        );
        for (choked, unchoked) in swaps {
            let r = self.nodes[n].remote(choked);
            self.choke(n, r);
            let r = self.nodes[n].remote(unchoked);
            self.send(n, r, Wire::Choke(false));
        }
        let node = &mut self.nodes[n];
        let unchoked = choker::fill_slots(
            node.peers.iter_mut().map(|(k, s)| (k, &mut s.choke)),
            node.slots.open(),
            instant,
        );
        for k in unchoked {
            let r = self.nodes[n].remote(k);
            self.send(n, r, Wire::Choke(false));
        }
    }

    /// The connection's side of a choke the choker decided: queued requests are rejected
    /// (all but a block already on the wire).
    fn choke(&mut self, n: usize, remote: usize) {
        let Some(slot) = self.nodes[n].slot_mut(remote) else {
            return;
        };
        let keep = usize::from(slot.head_left.is_some()).min(slot.queue.len());
        let rejected: Vec<BlockRef> = slot.queue.drain(keep..).collect();
        for r in rejected {
            self.send(n, remote, Wire::Reject(r));
        }
        self.send(n, remote, Wire::Choke(true));
    }

    fn close(&mut self, n: usize, remote: usize) {
        self.send(n, remote, Wire::Close);
        self.unregister(n, remote);
    }

    fn unregister(&mut self, n: usize, remote: usize) {
        let node = &mut self.nodes[n];
        let Some(key) = node.key_of.remove(&remote) else {
            return;
        };
        if let Some(slot) = node.peers.remove(&key) {
            node.picker.remove_peer(key, &slot.has, slot.in_zone);
            if let Some(c) = node.candidates.get_mut(&remote) {
                c.retry_at = self.now + REDIAL_AFTER;
            }
            if slot.choke.served() {
                self.fill_slots(n);
            }
        }
    }

    /// Moves `step` seconds of bytes starting at `t`: every connection with a queued request
    /// is a flow; rates are max-min fair over the links each crosses.
    fn transfer(&mut self, t: f64, step: f64) {
        let hosts1 = self.nodes.len();
        let switches = self.switch_out.len();
        let up = |n: usize| n;
        let down = |n: usize| hosts1 + n;
        let sw_out = |s: usize| 2 * hosts1 + s;
        let sw_in = |s: usize| 2 * hosts1 + switches + s;
        let cpu = 2 * hosts1 + 2 * switches;
        let mut capacity = vec![0.0; cpu + 1];
        for (i, node) in self.nodes.iter().enumerate() {
            capacity[up(i)] = node.rate;
            capacity[down(i)] = node.rate;
        }
        for s in 0..switches {
            capacity[sw_out(s)] = self.lab.uplink_rate;
            capacity[sw_in(s)] = self.lab.uplink_rate;
        }
        if let Some((cores, cost)) = self.lab.calibration.cpu {
            capacity[cpu] = cores / (cost / f64::from(1u32 << 30));
        }
        let mut flows: Vec<(usize, u64, usize)> = Vec::new();
        let mut paths: Vec<Vec<usize>> = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.alive {
                continue;
            }
            for (k, slot) in &node.peers {
                if slot.queue.is_empty() {
                    continue;
                }
                let r = slot.remote;
                let mut path = vec![up(i), down(r)];
                let (a, b) = (node.switch, self.nodes[r].switch);
                if a != b {
                    if let Some(s) = a {
                        path.push(sw_out(s));
                    }
                    if let Some(s) = b {
                        path.push(sw_in(s));
                    }
                }
                if self.lab.calibration.cpu.is_some() {
                    path.push(cpu);
                }
                flows.push((i, *k, r));
                paths.push(path);
            }
        }
        let rates = share::max_min(&capacity, &paths);
        self.account(t, step, &flows, &rates);
        let mut deliveries: Vec<(f64, usize, usize, BlockRef)> = Vec::new();
        for ((i, k, r), rate) in flows.into_iter().zip(rates) {
            if rate <= 0.0 {
                continue;
            }
            let mut budget = rate * step;
            let mut used = 0.0;
            let mut sent = 0.0;
            let slot = self.nodes[i].peers.get_mut(&k).expect("flow's connection");
            while budget > 0.0 {
                let Some(&block) = slot.queue.front() else {
                    break;
                };
                let left = slot.head_left.get_or_insert(f64::from(block.len));
                let take = left.min(budget);
                *left -= take;
                budget -= take;
                used += take / rate;
                sent += take;
                if *left <= 1e-6 {
                    slot.queue.pop_front();
                    slot.head_left = None;
                    slot.uploaded += u64::from(block.len);
                    deliveries.push((t + used, i, r, block));
                }
            }
            self.nodes[i].sent += sent;
            self.nodes[r].received += sent;
            let (a, b) = (self.nodes[i].switch, self.nodes[r].switch);
            if a != b {
                if let Some(s) = a {
                    self.switch_out[s] += sent;
                }
                if let Some(s) = b {
                    self.switch_in[s] += sent;
                }
            }
        }
        for (at, i, r, block) in deliveries {
            self.send_at(at, i, r, Wire::Piece(block));
        }
    }

    /// Adds a step's link time to [`LinkUse`]: each host's links, busy or why idle.
    fn account(&mut self, t: f64, step: f64, flows: &[(usize, u64, usize)], rates: &[f64]) {
        let n = self.nodes.len();
        let mut up = vec![(0.0, 0usize); n];
        let mut down = vec![(0.0, 0usize); n];
        for ((i, _, r), rate) in flows.iter().zip(rates) {
            up[*i].0 += rate;
            up[*i].1 += 1;
            down[*r].0 += rate;
            down[*r].1 += 1;
        }
        let span = (t / LinkUse::SPAN) as usize;
        if self.link_use.len() <= span {
            self.link_use.resize(span + 1, LinkUse::default());
        }
        let acc = &mut self.link_use[span];
        for (i, node) in self.nodes.iter().enumerate() {
            if node.server || !node.alive || node.start > t {
                continue;
            }
            let busy = (up[i].0 / node.rate).min(1.0);
            let why = if up[i].1 > 0 {
                1
            } else if node.peers.values().any(|s| s.choke.served()) {
                2
            } else if node.peers.values().any(|s| s.choke.interested) {
                3
            } else {
                4
            };
            acc.up[0] += busy * step;
            acc.up[why] += (1.0 - busy) * step;
            acc.up_host_s += step;
            if node.complete_at.is_some() {
                continue;
            }
            let busy = (down[i].0 / node.rate).min(1.0);
            let wants = |s: &Slot| node.picker.wants_from(&s.has);
            let why = if down[i].1 > 0 {
                1
            } else if node.peers.values().any(|s| !s.outstanding.is_empty()) {
                2
            } else if node.peers.values().any(|s| !s.peer_choking && wants(s)) {
                3
            } else if node.peers.values().any(wants) {
                4
            } else {
                5
            };
            acc.down[0] += busy * step;
            acc.down[why] += (1.0 - busy) * step;
            acc.down_host_s += step;
        }
    }

    fn outcome(&self) -> Outcome {
        let hosts = &self.nodes[..self.lab.hosts];
        let done: Vec<Option<f64>> = hosts
            .iter()
            .map(|n| {
                if n.failed {
                    None
                } else {
                    n.complete_at.map(|t| t + self.lab.calibration.finish)
                }
            })
            .collect();
        let alive: Vec<&Node> = hosts.iter().filter(|n| !n.failed).collect();
        let last_done = alive
            .iter()
            .map(|n| {
                n.complete_at
                    .map_or(f64::INFINITY, |t| t + self.lab.calibration.finish)
            })
            .fold(0.0, f64::max);
        let first_done = done.iter().flatten().copied().fold(f64::INFINITY, f64::min);
        let span = if last_done.is_finite() {
            last_done
        } else {
            self.now
        }
        .max(1e-9);
        let server = &self.nodes[self.server()];
        let uplink: Vec<f64> = self
            .switch_out
            .iter()
            .zip(&self.switch_in)
            .map(|(o, i)| o.max(*i) / (self.lab.uplink_rate * span))
            .collect();
        let mean = |v: &mut dyn Iterator<Item = f64>| {
            let (sum, count) = v.fold((0.0, 0usize), |(s, c), x| (s + x, c + 1));
            if count == 0 { 0.0 } else { sum / count as f64 }
        };
        Outcome {
            piece_len: self.geometry.piece_len,
            first_done,
            last_done,
            done,
            failed: hosts.iter().filter(|n| n.failed).count(),
            server_copies: server.sent / self.lab.image_len as f64,
            server_util: server.sent / (server.rate * span),
            uplink_util_mean: mean(&mut uplink.iter().copied()),
            uplink_util_max: uplink.iter().copied().fold(0.0, f64::max),
            host_up_util: mean(&mut hosts.iter().map(|n| n.sent / (n.rate * span))),
            host_down_util: mean(&mut hosts.iter().map(|n| n.received / (n.rate * span))),
            uplink_bytes: self.switch_out.iter().chain(&self.switch_in).sum(),
            local_connections: self.connections.0 as f64 / self.connections.1.max(1) as f64,
            link_use: self
                .link_use
                .iter()
                .map(|u| {
                    let mut u = u.clone();
                    let (up, down) = (u.up_host_s.max(1e-12), u.down_host_s.max(1e-12));
                    u.up.iter_mut().for_each(|x| *x /= up);
                    u.down.iter_mut().for_each(|x| *x /= down);
                    u
                })
                .collect(),
        }
    }
}

impl Node {
    fn new(addr: SocketAddr, switch: Option<usize>, rate: f64, server: bool, g: Geometry) -> Node {
        let n = g.piece_count();
        let have = if server {
            Bitfield::full(n)
        } else {
            Bitfield::new(n)
        };
        Node {
            addr,
            switch,
            rate,
            server,
            picker: Picker::new(g, have),
            peers: HashMap::default(),
            key_of: KeyOf::default(),
            next_key: 0,
            candidates: HashMap::new(),
            seed: server.then(|| SuperSeed::new(g)),
            alive: false,
            failed: false,
            start: 0.0,
            last_rotate: 0.0,
            complete_at: None,
            slots: if server {
                Slots::new(SERVER_FIRST_SLOTS, SERVER_SLOTS)
            } else {
                Slots::all(HOST_SLOTS)
            },
            max_peers: if server {
                SERVER_MAX_PEERS
            } else {
                HOST_MAX_PEERS
            },
            peer_id: PeerId::generate(),
            sent: 0.0,
            sent_at_tick: 0.0,
            received: 0.0,
        }
    }
}

/// Connection keys by remote node: a vector, since node ids are small and dense (0 = none).
#[derive(Default)]
struct KeyOf(Vec<u64>);

impl KeyOf {
    fn get(&self, remote: &usize) -> Option<&u64> {
        self.0.get(*remote).filter(|k| **k != 0)
    }

    fn contains_key(&self, remote: &usize) -> bool {
        self.get(remote).is_some()
    }

    fn insert(&mut self, remote: usize, key: u64) {
        if self.0.len() <= remote {
            self.0.resize(remote + 1, 0);
        }
        self.0[remote] = key;
    }

    fn remove(&mut self, remote: &usize) -> Option<u64> {
        let key = self.get(remote).copied();
        if key.is_some() {
            self.0[*remote] = 0;
        }
        key
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Connection keys are per-node counters, so hashing them is only spreading: a
/// multiplicative hash does that at a fraction of SipHash's cost (the sim's hottest lookup).
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type Keyed = std::hash::BuildHasherDefault<KeyHasher>;

impl Node {
    fn slot(&self, remote: usize) -> Option<&Slot> {
        self.key_of.get(&remote).and_then(|k| self.peers.get(k))
    }

    fn slot_mut(&mut self, remote: usize) -> Option<&mut Slot> {
        self.key_of.get(&remote).and_then(|k| self.peers.get_mut(k))
    }

    /// The remote node of connection `key`, which must be live.
    fn remote(&self, key: u64) -> usize {
        self.peers[&key].remote
    }
}

/// The node's peers as super-seeding sees them (torrent.rs `seed_view`).
fn seed_view(peers: &mut HashMap<u64, Slot, Keyed>) -> Vec<superseed::Peer<'_>> {
    peers
        .iter_mut()
        .map(|(key, s)| superseed::Peer {
            key: *key,
            has: &s.has,
            offers: &mut s.offers,
            uploaded: s.uploaded,
            unchoked: !s.choke.choked,
        })
        .collect()
}

#[cfg(test)]
mod tests;
