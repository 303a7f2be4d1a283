//! One torrent in a session: its shared state and everything that changes it (peers joining
//! and leaving, verified pieces, bans, choking, super-seed offers), its resume check, its
//! stats and its announcer. The session runs its lifecycle task and dials its peers; peer
//! connections (`peer`) read and change the state through the methods here. The lock is never
//! held across an `.await`.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::announce::{AnnounceRequest, Event, TrackerClient};
use crate::assembly::{self, Assembly};
use crate::choker::{self, Choke};
use crate::control::{
    AddTorrent, Cidr, Mode, PeerStats, SessionConfig, SwarmError, TorrentState, TorrentStats,
    outside_peer_limit,
};
use crate::metainfo::Metainfo;
use crate::picker::{PeerKey, Picker};
use crate::rate::RateLimiter;
use crate::storage::{Access, Storage};
use crate::superseed::{self, Offers, SuperSeed};
use crate::wire::BlockRef;
use crate::{Bitfield, InfoHash, PeerId};

/// Hash failures a peer may cause before it is banned.
const STRIKES_TO_BAN: u32 = 2;
/// Suspect blocks kept per piece (a few failures' worth): what a run of hostile peers can
/// make us hold is bounded.
const SUSPECTS_PER_PIECE: usize = 256;
/// How long a failed address waits before the next attempt.
const RETRY_AFTER: Duration = Duration::from_secs(15);
/// How long an address whose connection ended waits before it is dialled again.
const REDIAL_AFTER: Duration = Duration::from_secs(2);
/// Time allowed to announce `stopped` on shutdown.
const STOP_ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(3);

/// What every torrent of a session shares; the session makes it.
/// [`crate::control::ConnectionCounts`] as the listener bumps them.
#[derive(Default)]
pub(crate) struct InboundCounters {
    pub plaintext: AtomicU64,
    pub encrypted: AtomicU64,
    pub mse_plaintext: AtomicU64,
    pub refused_unencrypted: AtomicU64,
}

pub(crate) struct Shared {
    /// The session's settings.
    pub config: SessionConfig,
    /// Our peer id, the same for every torrent.
    pub peer_id: PeerId,
    /// The listener's address (its port goes into announces).
    pub local_addr: SocketAddr,
    /// The HTTP client for announces.
    pub tracker: TrackerClient,
    /// Every task of the session, so that stopping waits for all of them.
    pub tasks: TaskTracker,
    /// The session-wide upload limit.
    pub upload: Option<RateLimiter>,
    /// The session-wide download limit.
    pub download: Option<RateLimiter>,
    /// Incoming connections by how they were encrypted.
    pub inbound: InboundCounters,
    /// Networks of our zone: [`SessionConfig::zone`] at first, replaced by
    /// [`crate::session::Session::set_zone`] (an agent learns its network once it has one).
    pub zone: std::sync::RwLock<Vec<Cidr>>,
}

impl Shared {
    /// Whether `ip` is in our zone.
    pub fn in_zone(&self, ip: IpAddr) -> bool {
        self.zone
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|c| c.contains(ip))
    }

    /// Whether we know our zone at all (peers outside it are then rationed).
    pub fn has_zone(&self) -> bool {
        !self
            .zone
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

/// Commands from the torrent to one connection task.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// We verified this piece: tell the peer.
    Have(u32),
    /// Super-seeding: offer this piece (a HAVE the peer may request).
    Offer(u32),
    Choke,
    Unchoke,
    /// Another peer delivered this block first (endgame).
    Cancel(BlockRef),
    /// Close the connection (banned, duplicate, paused, both complete).
    Close(&'static str),
}

/// A connected peer as the torrent sees it.
pub(crate) struct PeerSlot {
    pub addr: SocketAddr,
    pub peer_id: PeerId,
    pub outbound: bool,
    pub tx: mpsc::UnboundedSender<Cmd>,
    pub has: Bitfield,
    pub in_zone: bool,
    /// Whether it may download from us, and since when.
    pub choke: Choke,
    pub downloaded: u64,
    pub uploaded: u64,
    /// Super-seeding: what it was offered; it may request only these pieces.
    pub offers: Offers,
}

/// A peer to strike for a bad block: who it is, even after it disconnected.
#[derive(Debug, Clone, Copy)]
struct Offender {
    id: PeerId,
    addr: SocketAddr,
    outbound: bool,
}

impl Offender {
    fn of(slot: &PeerSlot) -> Offender {
        Offender {
            id: slot.peer_id,
            addr: slot.addr,
            outbound: slot.outbound,
        }
    }
}

/// One block of a piece that failed its hash with blocks from several peers.
#[derive(Debug)]
struct Suspect {
    offset: u32,
    offender: Offender,
    /// SHA-1 of the block as that peer sent it.
    digest: [u8; 20],
}

/// Where we know a peer address from, and how connecting to it went.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    /// Our dial got through its handshake; `connecting` stays set until the connection ends.
    connected: bool,
    connecting: bool,
    retry_at: Option<Instant>,
    /// When we learned of it: addresses are dialled in the order the tracker handed them
    /// out, since its handout puts the peers of our zone first.
    learned: u64,
}

pub(crate) struct State {
    pub picker: Picker,
    /// Blocks of the picker's partial pieces, until each piece is complete.
    pub assembly: Assembly,
    pub peers: HashMap<PeerKey, PeerSlot>,
    next_key: PeerKey,
    candidates: HashMap<SocketAddr, Candidate>,
    /// The next [`Candidate::learned`].
    learned: u64,
    banned_ids: HashSet<PeerId>,
    banned_addrs: HashSet<SocketAddr>,
    /// Every banned peer's address, for the stats.
    banned_log: Vec<SocketAddr>,
    strikes: HashMap<PeerId, u32>,
    /// Blocks of pieces that failed their hash while several peers had sent parts of them,
    /// until the piece passes and shows which block was wrong (see [`Torrent::blame`]).
    suspects: HashMap<u32, Vec<Suspect>>,
    pub phase: TorrentState,
    /// Super-seeding's torrent-wide bookkeeping.
    superseed: SuperSeed,
    /// Upload slots open now.
    slots: choker::Slots,
    dirty: bool,
}

impl State {
    /// Whether `piece` failed before with blocks from several peers, so that its good blocks
    /// must be compared when it passes.
    pub fn suspected(&self, piece: u32) -> bool {
        self.suspects.contains_key(&piece)
    }
}

pub(crate) struct Torrent {
    pub shared: Arc<Shared>,
    pub meta: Metainfo,
    pub mode: Mode,
    path: PathBuf,
    resume_path: PathBuf,
    /// The download's file did not exist before this torrent made it: it holds nothing, and
    /// reading back the zeros it was preallocated with would only cost time (for a lab of
    /// machines starting together, seconds of every core) and could even match pieces of an
    /// image that hold zeros.
    fresh: bool,
    pub storage: Arc<Storage>,
    state: Mutex<State>,
    stats_tx: watch::Sender<TorrentStats>,
    pub downloaded: AtomicU64,
    pub uploaded: AtomicU64,
    hash_failures: AtomicU64,
    banned: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Cancelled when the torrent is removed or the session stops.
    pub cancel: CancellationToken,
    /// Cancelled on pause; peers run under it.
    run: Mutex<CancellationToken>,
    /// Wakes the announcer for `completed`.
    completed: tokio::sync::Notify,
    /// Wakes the lifecycle to dial addresses just learned (from an announce, or the caller)
    /// instead of at its next 1 s tick: the first announce is answered after the first tick,
    /// and a second's wait is 4 % of a 200 MiB image at 1 Gbit/s.
    pub learned: tokio::sync::Notify,
    /// Wakes the lifecycle to publish stats at once when the download completes: whoever
    /// waits for it (an agent about to verify and boot, a lab waiting for its last machine)
    /// should not wait for the next 1 s tick.
    pub finished: tokio::sync::Notify,
    /// The lifecycle task notifies it when it ends; [`Torrent::stop`] waits for it.
    pub done: tokio::sync::Notify,
}

impl Torrent {
    /// Opens the torrent's file and sets up its state; the session then starts its
    /// lifecycle task, which checks the file before any peer is admitted.
    pub fn open(
        shared: Arc<Shared>,
        add: AddTorrent,
        resume_path: PathBuf,
        cancel: CancellationToken,
    ) -> Result<Arc<Torrent>, SwarmError> {
        let geometry = add.metainfo.geometry;
        let access = match add.mode {
            Mode::Download => Access::ReadWrite,
            Mode::Seed | Mode::SuperSeed => Access::ReadOnly,
        };
        let fresh = access == Access::ReadWrite
            && std::fs::symlink_metadata(&add.path)
                .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound);
        let storage = Arc::new(Storage::open(&add.path, geometry, access)?);
        let pieces = geometry.piece_count();
        let stats = TorrentStats {
            state: TorrentState::Checking { pieces_checked: 0 },
            bytes_done: 0,
            bytes_total: geometry.total_len,
            pieces_done: 0,
            downloaded: 0,
            uploaded: 0,
            download_rate: 0,
            upload_rate: 0,
            hash_failures: 0,
            banned: 0,
            banned_peers: Vec::new(),
            protocol_errors: 0,
            peers: Vec::new(),
        };
        let mut candidates = HashMap::new();
        for addr in &add.peers {
            let learned = candidates.len() as u64;
            candidates
                .entry(*addr)
                .or_insert_with(|| Candidate::new(learned));
        }
        let run = cancel.child_token();
        let torrent = Arc::new(Torrent {
            meta: add.metainfo,
            mode: add.mode,
            path: add.path,
            resume_path,
            fresh,
            storage,
            state: Mutex::new(State {
                picker: Picker::new(geometry, Bitfield::new(pieces)),
                assembly: Assembly::new(assembly::BUDGET, assembly::RECENT_BUDGET),
                peers: HashMap::new(),
                next_key: 1,
                learned: candidates.len() as u64,
                candidates,
                banned_ids: HashSet::new(),
                banned_addrs: HashSet::new(),
                banned_log: Vec::new(),
                strikes: HashMap::new(),
                suspects: HashMap::new(),
                phase: TorrentState::Checking { pieces_checked: 0 },
                superseed: SuperSeed::new(geometry),
                slots: match shared.config.first_upload_slots {
                    Some(first) => choker::Slots::new(first, shared.config.upload_slots),
                    None => choker::Slots::all(shared.config.upload_slots),
                },
                dirty: false,
            }),
            stats_tx: watch::channel(stats).0,
            downloaded: AtomicU64::new(0),
            uploaded: AtomicU64::new(0),
            hash_failures: AtomicU64::new(0),
            banned: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            cancel,
            run: Mutex::new(run),
            completed: tokio::sync::Notify::new(),
            learned: tokio::sync::Notify::new(),
            finished: tokio::sync::Notify::new(),
            done: tokio::sync::Notify::new(),
            shared,
        });
        Ok(torrent)
    }

    pub fn info_hash(&self) -> InfoHash {
        self.meta.info_hash
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn resume_path(&self) -> &Path {
        &self.resume_path
    }

    pub fn subscribe(&self) -> watch::Receiver<TorrentStats> {
        self.stats_tx.subscribe()
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn run_token(&self) -> CancellationToken {
        self.run.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn pause(&self) {
        let mut st = self.lock();
        if matches!(st.phase, TorrentState::Downloading | TorrentState::Seeding) {
            st.phase = TorrentState::Paused;
            self.run_token().cancel();
        }
        drop(st);
        self.publish_stats(0, 0);
    }

    pub fn resume(&self) {
        let mut st = self.lock();
        if st.phase == TorrentState::Paused {
            *self.run.lock().unwrap_or_else(|e| e.into_inner()) = self.cancel.child_token();
            st.phase = if st.picker.is_complete() {
                TorrentState::Seeding
            } else {
                TorrentState::Downloading
            };
        }
        drop(st);
        self.publish_stats(0, 0);
    }

    pub fn add_peers(&self, peers: &[SocketAddr]) {
        let mut st = self.lock();
        let before = st.learned;
        for addr in peers {
            let learned = st.learned;
            if let std::collections::hash_map::Entry::Vacant(v) = st.candidates.entry(*addr) {
                v.insert(Candidate::new(learned));
                st.learned += 1;
            }
        }
        if st.learned != before {
            self.learned.notify_one();
        }
    }

    /// Stops the torrent and waits for its lifecycle task to finish.
    pub async fn stop(&self) {
        let done = self.done.notified();
        self.cancel.cancel();
        done.await;
    }

    /// Verifies what the file already holds (or trusts its resume record) and sets the
    /// phase; an error means the torrent cannot run (e.g. a seed file that does not match).
    pub async fn check(self: &Arc<Self>) -> Result<(), String> {
        let t = self.clone();
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let result = tokio::task::spawn_blocking(move || {
            if t.fresh {
                return Ok(crate::storage::CheckResult {
                    have: Bitfield::new(t.meta.geometry.piece_count()),
                    fast_path: false,
                });
            }
            let progress = |n: u32| {
                t.stats_tx.send_modify(|s| {
                    s.state = TorrentState::Checking { pieces_checked: n };
                });
            };
            crate::storage::check_existing(
                &t.path,
                t.meta.geometry,
                t.meta.info_hash,
                &t.meta.piece_hashes,
                &t.resume_path,
                threads,
                &progress,
            )
        })
        .await
        .map_err(|e| format!("checking {}: {e}", self.path.display()))?
        .map_err(|e| e.to_string())?;
        let have = result.have;
        tracing::info!(
            torrent = %self.info_hash(),
            path = %self.path.display(),
            pieces = have.count(),
            of = have.len(),
            fast_path = result.fast_path,
            "checked existing data"
        );
        let mut st = self.lock();
        if self.mode != Mode::Download && !have.is_full() {
            return Err(format!(
                "cannot seed {}: only {} of {} pieces match the torrent; is it the right file?",
                self.path.display(),
                have.count(),
                have.len()
            ));
        }
        st.phase = if have.is_full() {
            TorrentState::Seeding
        } else {
            TorrentState::Downloading
        };
        st.picker = Picker::new(self.meta.geometry, have);
        st.assembly = Assembly::new(assembly::BUDGET, assembly::RECENT_BUDGET);
        st.dirty = !result.fast_path;
        drop(st);
        self.publish_stats(0, 0);
        Ok(())
    }

    /// Saves the resume record if pieces were verified since the last save.
    pub async fn save_resume(&self) {
        let have = {
            let mut st = self.lock();
            // A seed's record spares the next start a full re-hash of a large image.
            if !st.dirty {
                return;
            }
            st.dirty = false;
            st.picker.have().clone()
        };
        let storage = self.storage.clone();
        let (resume, path, info_hash) = (
            self.resume_path.clone(),
            self.path.clone(),
            self.info_hash(),
        );
        let writable = self.mode == Mode::Download;
        let saved = tokio::task::spawn_blocking(move || {
            if writable {
                storage.sync()?;
            }
            crate::storage::save_resume(&resume, info_hash, &path, &have)
        })
        .await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(torrent = %info_hash, "saving resume data: {e}; the next start re-checks the file")
            }
            Err(e) => tracing::warn!(torrent = %info_hash, "saving resume data: {e}"),
        }
    }

    pub fn publish_stats(&self, download_rate: u64, upload_rate: u64) {
        let st = self.lock();
        let peers = st
            .peers
            .values()
            .map(|p| PeerStats {
                addr: p.addr,
                client: client_name(&p.peer_id),
                downloaded: p.downloaded,
                uploaded: p.uploaded,
                pieces: p.has.count(),
                in_zone: p.in_zone,
            })
            .collect();
        let stats = TorrentStats {
            state: st.phase.clone(),
            bytes_done: st.picker.bytes_done(),
            bytes_total: self.meta.geometry.total_len,
            pieces_done: st.picker.have().count(),
            downloaded: self.downloaded.load(Ordering::Relaxed),
            uploaded: self.uploaded.load(Ordering::Relaxed),
            download_rate,
            upload_rate,
            hash_failures: self.hash_failures.load(Ordering::Relaxed),
            banned: self.banned.load(Ordering::Relaxed),
            banned_peers: st.banned_log.clone(),
            protocol_errors: self.protocol_errors.load(Ordering::Relaxed),
            peers,
        };
        drop(st);
        self.stats_tx.send_replace(stats);
    }

    /// Known addresses to dial now, up to the peer limit, zone peers first; each is marked
    /// as being dialled until [`Torrent::dial_ended`].
    pub fn dial_targets(&self) -> Vec<SocketAddr> {
        let mut st = self.lock();
        let phase_ok = matches!(st.phase, TorrentState::Downloading | TorrentState::Seeding);
        if !phase_ok {
            return Vec::new();
        }
        // A complete peer only serves: it waits for leechers to come to it.
        if st.picker.is_complete() {
            return Vec::new();
        }
        // A dial that got through is one of `peers` already: counted twice, a machine that
        // dialled half its limit had no room left to dial.
        let room = self.shared.config.max_peers.saturating_sub(
            st.peers.len() + st.candidates.values().filter(|c| c.dialling()).count(),
        );
        let now = Instant::now();
        let own = self.shared.local_addr;
        let mut chosen: Vec<(SocketAddr, u64)> = st
            .candidates
            .iter()
            .filter(|(addr, c)| {
                !c.connected
                    && !c.connecting
                    && c.retry_at.is_none_or(|t| t <= now)
                    && !is_self(**addr, own)
            })
            .map(|(a, c)| (*a, c.learned))
            .filter(|(a, _)| !st.banned_addrs.contains(a))
            .collect();
        // Zone peers first, then in the order learned (the tracker's, which puts the peers of
        // its zone first): the simulated 300-machine lab in docs/benchmarks.md keeps twice as
        // many connections within a switch that way than in the map's arbitrary order.
        chosen.sort_by_key(|(a, learned)| (!self.shared.in_zone(a.ip()), *learned));
        if self.shared.has_zone() {
            let outside = st.peers.values().filter(|p| !p.in_zone).count()
                + st.candidates
                    .iter()
                    .filter(|(a, c)| c.dialling() && !self.shared.in_zone(a.ip()))
                    .count();
            let mut outside_room =
                outside_peer_limit(self.shared.config.max_peers).saturating_sub(outside);
            chosen.retain(|(a, _)| {
                if self.shared.in_zone(a.ip()) {
                    return true;
                }
                let take = outside_room > 0;
                outside_room = outside_room.saturating_sub(1);
                take
            });
        }
        chosen.truncate(room);
        let chosen: Vec<SocketAddr> = chosen.into_iter().map(|(a, _)| a).collect();
        for addr in &chosen {
            if let Some(c) = st.candidates.get_mut(addr) {
                c.connecting = true;
            }
        }
        chosen
    }

    /// A dialled connection got through its handshake.
    pub fn dial_connected(&self, addr: SocketAddr) {
        if let Some(c) = self.lock().candidates.get_mut(&addr) {
            c.connected = true;
        }
    }

    /// The address answered with our own peer id (the tracker handed us ourselves): it is
    /// never dialled again.
    pub fn dialled_ourselves(&self, addr: SocketAddr) {
        self.lock().banned_addrs.insert(addr);
    }

    /// A dialled connection ended, or never got through: when to try the address again.
    pub fn dial_ended(&self, addr: SocketAddr, result: &Result<(), String>) {
        let mut st = self.lock();
        if let Some(c) = st.candidates.get_mut(&addr) {
            c.connecting = false;
            c.connected = false;
            if let Err(e) = result {
                tracing::debug!(peer = %addr, "connecting failed: {e}");
                c.retry_at = Some(Instant::now() + RETRY_AFTER);
            } else {
                c.retry_at = Some(Instant::now() + REDIAL_AFTER);
            }
        }
    }

    /// Registers a handshaken connection; `None` when it must be closed at once (banned,
    /// duplicate, full). The receiver carries the torrent's commands to the connection.
    pub fn register(
        &self,
        addr: SocketAddr,
        peer_id: PeerId,
        outbound: bool,
    ) -> Option<(PeerKey, mpsc::UnboundedReceiver<Cmd>)> {
        let mut st = self.lock();
        if st.banned_ids.contains(&peer_id)
            || !matches!(st.phase, TorrentState::Downloading | TorrentState::Seeding)
        {
            return None;
        }
        if st.peers.len() >= self.shared.config.max_peers {
            return None;
        }
        let in_zone = self.shared.in_zone(addr.ip());
        if !in_zone
            && self.shared.has_zone()
            && st.peers.values().filter(|p| !p.in_zone).count()
                >= outside_peer_limit(self.shared.config.max_peers)
        {
            tracing::trace!(peer = %addr, "refused: peers outside our zone hold their share of connections");
            return None;
        }
        // Two of our peers often dial each other at once. Keep the connection opened by the
        // side with the smaller peer id; both sides reach the same verdict.
        let ours = self.shared.peer_id;
        let dup = st
            .peers
            .iter()
            .find(|(_, p)| p.peer_id == peer_id)
            .map(|(k, p)| (*k, p.outbound));
        if let Some((key, existing_outbound)) = dup {
            let opener = |we_opened: bool| if we_opened { ours.0 } else { peer_id.0 };
            if opener(outbound) < opener(existing_outbound) {
                if let Some(p) = st.peers.get(&key) {
                    let _ = p.tx.send(Cmd::Close("duplicate connection"));
                }
            } else {
                return None;
            }
        }
        let key = st.next_key;
        st.next_key += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        let pieces = self.meta.geometry.piece_count();
        st.peers.insert(
            key,
            PeerSlot {
                addr,
                peer_id,
                outbound,
                tx,
                has: Bitfield::new(pieces),
                in_zone,
                choke: Choke {
                    zone: in_zone,
                    ..Choke::new(Instant::now())
                },
                downloaded: 0,
                uploaded: 0,
                offers: Offers::default(),
            },
        );
        Some((key, rx))
    }

    /// Forgets a closed connection.
    pub fn unregister(&self, key: PeerKey) {
        let mut st = self.lock();
        if let Some(slot) = st.peers.remove(&key) {
            st.picker.remove_peer(key, &slot.has, slot.in_zone);
            if slot.choke.served() {
                self.fill_slots(&mut st);
            }
        }
    }

    /// Records a hash failure of `piece`, whose blocks came from `senders` (block offset,
    /// peer) and hashed to `digests` (block offset, SHA-1, for the blocks held in memory).
    ///
    /// A piece from one peer is that peer's fault. A piece from several is not yet anyone's:
    /// blaming all of them would let a hostile peer that sends half a piece of garbage and
    /// then chokes us get the honest peer that finished it banned, and reported to the
    /// operator as a corrupt machine. Their blocks' digests are kept instead, and when the
    /// piece passes, [`Torrent::convict`] strikes exactly the peers whose blocks differ.
    pub fn blame(
        &self,
        st: &mut State,
        piece: u32,
        senders: &[(u32, PeerKey)],
        digests: &[(u32, [u8; 20])],
    ) {
        self.hash_failures.fetch_add(1, Ordering::Relaxed);
        let mut keys: Vec<PeerKey> = senders.iter().map(|&(_, key)| key).collect();
        keys.sort_unstable();
        keys.dedup();
        if let [only] = keys[..] {
            if let Some(offender) = st.peers.get(&only).map(Offender::of) {
                self.strike(st, offender);
            }
            return;
        }
        tracing::info!(torrent = %self.info_hash(), piece, peers = keys.len(), "a piece from several peers failed its hash; whoever sent the wrong blocks is struck once it passes");
        let suspects = st.suspects.entry(piece).or_default();
        for &(offset, key) in senders {
            let Some(offender) = st.peers.get(&key).map(Offender::of) else {
                continue;
            };
            let Some(&(_, digest)) = digests.iter().find(|(o, _)| *o == offset) else {
                continue; // written to the file under memory pressure: cannot be compared
            };
            if suspects.len() < SUSPECTS_PER_PIECE {
                suspects.push(Suspect {
                    offset,
                    offender,
                    digest,
                });
            }
        }
    }

    /// `piece` passed with blocks hashing to `good` (block offset, SHA-1): strikes each peer
    /// that had sent a block of it that differs.
    pub fn convict(&self, st: &mut State, piece: u32, good: &[(u32, [u8; 20])]) {
        let Some(suspects) = st.suspects.remove(&piece) else {
            return;
        };
        let mut wrong: Vec<Offender> = suspects
            .iter()
            .filter(|s| good.iter().any(|&(o, d)| o == s.offset && d != s.digest))
            .map(|s| s.offender)
            .collect();
        // One strike per peer and piece, however many of its blocks were wrong, as for a
        // piece it sent alone.
        wrong.sort_unstable_by_key(|o| o.id.0);
        wrong.dedup_by_key(|o| o.id);
        for offender in wrong {
            self.strike(st, offender);
        }
    }

    /// One more hash failure against a peer; the second bans it.
    fn strike(&self, st: &mut State, offender: Offender) {
        let strikes = st.strikes.entry(offender.id).or_insert(0);
        *strikes += 1;
        tracing::warn!(peer = %offender.addr, strikes = *strikes, "peer sent a piece that failed its hash");
        if *strikes < STRIKES_TO_BAN || !st.banned_ids.insert(offender.id) {
            return;
        }
        if offender.outbound {
            st.banned_addrs.insert(offender.addr);
        }
        for slot in st.peers.values().filter(|s| s.peer_id == offender.id) {
            let _ = slot.tx.send(Cmd::Close("banned: sent corrupt data"));
        }
        st.banned_log.push(offender.addr);
        self.banned.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %offender.addr, "banned peer for sending corrupt data");
    }

    /// A piece passed its hash: tell every peer, and note completion.
    pub fn piece_verified(&self, st: &mut State, piece: u32) {
        st.dirty = true;
        for slot in st.peers.values() {
            let _ = slot.tx.send(Cmd::Have(piece));
        }
        if st.picker.is_complete() && st.phase == TorrentState::Downloading {
            st.phase = TorrentState::Seeding;
            tracing::info!(torrent = %self.info_hash(), "download complete");
            self.completed.notify_one();
            self.finished.notify_one();
            // Seeds have nothing to give each other.
            for slot in st.peers.values() {
                if slot.has.is_full() {
                    let _ = slot.tx.send(Cmd::Close("both complete"));
                }
            }
        }
    }

    /// Called when a peer's interest in us changed.
    pub fn interest_changed(&self, st: &mut State, key: PeerKey, interested: bool) {
        let Some(slot) = st.peers.get_mut(&key) else {
            return;
        };
        slot.choke.set_interest(interested, Instant::now());
        self.fill_slots(st);
    }

    /// Gives waiting zone peers the slots outside peers hold beyond half, then unchokes
    /// waiting peers while upload slots are free.
    fn fill_slots(&self, st: &mut State) {
        let slots = st.slots.open();
        let swaps = choker::make_room_for_zone(
            st.peers.iter_mut().map(|(k, p)| (k, &mut p.choke)),
            slots,
            Instant::now(),
        );
        for (choked, unchoked) in swaps {
            for (key, cmd) in [(choked, Cmd::Choke), (unchoked, Cmd::Unchoke)] {
                if let Some(p) = st.peers.get(&key) {
                    let _ = p.tx.send(cmd);
                }
            }
        }
        let unchoked = choker::fill_slots(
            st.peers.iter_mut().map(|(k, p)| (k, &mut p.choke)),
            slots,
            Instant::now(),
        );
        for key in unchoked {
            if let Some(p) = st.peers.get(&key) {
                let _ = p.tx.send(Cmd::Unchoke);
            }
        }
    }

    /// Every second, the upload `rate` (bytes per second) of the second gone: when it falls
    /// behind, more slots may open (see [`choker::Slots`]).
    pub fn upload_second(&self, rate: u64) {
        let mut st = self.lock();
        let served = st.peers.values().filter(|p| p.choke.served()).count();
        let interested = st.peers.values().filter(|p| p.choke.interested).count();
        if st.slots.second(rate, served, interested) {
            tracing::debug!(
                torrent = %self.info_hash(),
                rate,
                slots = st.slots.open(),
                "upload fell behind its best second with every slot taken: more slots open"
            );
            self.fill_slots(&mut st);
        }
    }

    /// Every [`choker::ROTATE_EVERY`]: when peers wait, the longest served make room for
    /// them.
    pub fn rotate_slots(&self) {
        let mut st = self.lock();
        let choked = choker::rotate(
            st.peers.iter_mut().map(|(k, p)| (k, &mut p.choke)),
            Instant::now(),
        );
        for key in choked {
            if let Some(p) = st.peers.get(&key) {
                let _ = p.tx.send(Cmd::Choke);
            }
        }
        self.fill_slots(&mut st);
    }

    /// Super-seeding: tops up `key`'s offers (see `superseed`).
    pub fn offer(&self, st: &mut State, key: PeerKey) {
        if self.mode != Mode::SuperSeed {
            return;
        }
        let State {
            peers, superseed, ..
        } = st;
        let offered = superseed.top_up(&mut seed_view(peers), key, Instant::now());
        send_offers(peers, offered.into_iter().map(|piece| (key, piece)));
    }

    /// Super-seeding: `key` asked for `len` bytes of `piece`, which it was offered; when that
    /// is all of the piece, the offer makes room for the next (see `superseed`).
    pub fn requested(&self, st: &mut State, key: PeerKey, piece: u32, len: u32) {
        if self.mode != Mode::SuperSeed {
            return;
        }
        let now = Instant::now();
        let size = self.meta.geometry.piece_size(piece);
        let State {
            peers, superseed, ..
        } = st;
        let taken = peers
            .get_mut(&key)
            .is_some_and(|p| p.offers.requested(piece, len, size, now));
        if taken {
            let offered = superseed.taken(&mut seed_view(peers), key, piece, now);
            tracing::trace!(peer = key, piece, new = ?offered, "offer taken");
            send_offers(peers, offered.into_iter().map(|piece| (key, piece)));
        }
    }

    /// Super-seeding: `from` announced `piece`; offers it fulfilled are replaced.
    pub fn seen(&self, st: &mut State, from: PeerKey, piece: u32) {
        if self.mode != Mode::SuperSeed {
            return;
        }
        let State {
            peers, superseed, ..
        } = st;
        let offered = superseed.seen(&mut seed_view(peers), from, piece, Instant::now());
        send_offers(peers, offered);
    }

    /// Super-seeding, once a second: rates are sampled, offers held long enough or ignored
    /// make room for new ones (see `superseed`).
    pub fn superseed_tick(&self) {
        let mut st = self.lock();
        let State {
            peers, superseed, ..
        } = &mut *st;
        let now = Instant::now();
        let offered = superseed.tick(&mut seed_view(peers), now);
        if tracing::enabled!(tracing::Level::DEBUG) {
            for p in peers.values() {
                let (rate, pending, held) = p.offers.summary(now);
                tracing::debug!(
                    peer = %p.addr,
                    rate,
                    pending,
                    held,
                    target = superseed.target(&p.offers),
                    "super-seeding offers"
                );
            }
        }
        send_offers(peers, offered);
    }

    /// Announces until the torrent stops (then `stopped`, briefly); `completed` as soon as
    /// the download completes.
    pub async fn announcer(self: Arc<Self>) {
        let mut event = Event::Started;
        let mut urls = self.meta.announce.clone();
        let mut sent_completed = self.lock().picker.is_complete();
        loop {
            let paused = self.lock().phase == TorrentState::Paused;
            let interval = if paused {
                Duration::from_secs(5)
            } else {
                match self.announce_once(&mut urls, event).await {
                    Some(interval) => {
                        event = Event::Periodic;
                        interval
                    }
                    None => Duration::from_secs(15),
                }
            };
            let completed = self.completed.notified();
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
                _ = completed, if !sent_completed => {
                    sent_completed = true;
                    event = Event::Completed;
                }
            }
        }
        let _ = tokio::time::timeout(
            STOP_ANNOUNCE_TIMEOUT,
            self.announce_once(&mut urls, Event::Stopped),
        )
        .await;
    }

    /// Announces to the first tracker that answers (moving it to the front); returns the
    /// interval it asked for.
    async fn announce_once(&self, urls: &mut [String], event: Event) -> Option<Duration> {
        let left = {
            let st = self.lock();
            self.meta.geometry.total_len - st.picker.bytes_done()
        };
        let request = AnnounceRequest {
            info_hash: self.info_hash(),
            peer_id: self.shared.peer_id,
            port: self.shared.local_addr.port(),
            uploaded: self.uploaded.load(Ordering::Relaxed),
            downloaded: self.downloaded.load(Ordering::Relaxed),
            left,
            event,
            numwant: Some(200),
        };
        for i in 0..urls.len() {
            match self.shared.tracker.announce(&urls[i], &request).await {
                Ok(response) => {
                    urls[..=i].rotate_right(1);
                    tracing::debug!(torrent = %self.info_hash(), peers = response.peers.len(), ?event, "announced");
                    self.add_peers(&response.peers);
                    return Some(response.interval.min(Duration::from_secs(300)));
                }
                Err(e) => tracing::warn!(torrent = %self.info_hash(), "{e}"),
            }
        }
        None
    }
}

impl Candidate {
    fn new(learned: u64) -> Candidate {
        Candidate {
            connected: false,
            connecting: false,
            retry_at: None,
            learned,
        }
    }

    /// Dialled and not through the handshake yet: not one of the torrent's peers.
    fn dialling(&self) -> bool {
        self.connecting && !self.connected
    }
}

fn is_self(addr: SocketAddr, own: SocketAddr) -> bool {
    addr.port() == own.port()
        && (addr.ip() == own.ip() || own.ip().is_unspecified() && addr.ip().is_loopback())
}

/// The printable client prefix of a peer id.
fn client_name(id: &PeerId) -> String {
    id.0.iter()
        .take_while(|b| b.is_ascii_graphic())
        .take(10)
        .map(|&b| b as char)
        .collect()
}

/// The torrent's peers as super-seeding sees them.
fn seed_view(peers: &mut HashMap<PeerKey, PeerSlot>) -> Vec<superseed::Peer<'_>> {
    peers
        .iter_mut()
        .map(|(key, p)| superseed::Peer {
            key: *key,
            has: &p.has,
            offers: &mut p.offers,
            uploaded: p.uploaded,
            unchoked: !p.choke.choked,
        })
        .collect()
}

/// Sends each offer (a HAVE) to its peer.
fn send_offers(
    peers: &HashMap<PeerKey, PeerSlot>,
    offers: impl IntoIterator<Item = (PeerKey, u32)>,
) {
    for (key, piece) in offers {
        if let Some(p) = peers.get(&key) {
            let _ = p.tx.send(Cmd::Offer(piece));
        }
    }
}
