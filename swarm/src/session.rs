//! The running engine: one listener, any number of torrents, their peer connections.
//!
//! Tasks (all tracked by the session's `TaskTracker`, all under its shutdown token):
//! - the **listener** accepts connections, reads the handshake and hands the connection to the
//!   torrent it names;
//! - per torrent, one **lifecycle** task (resume check, then a 1 s tick: stats, connecting,
//!   choking, resume saving) and one **announcer**;
//! - per peer, one **connection** task that owns the socket (see `peer`).
//!
//! Shared state: each torrent's `State` behind a `std::sync::Mutex`, never held across an
//! `.await`. Lock order: the session's torrent map, then one torrent's state; nothing else
//! locks two torrents.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::announce::TrackerClient;
use crate::metainfo::Metainfo;
use crate::rate::RateLimiter;
use crate::torrent::Torrent;
use crate::wire::{HANDSHAKE_LEN, Handshake};
use crate::{InfoHash, PeerId};

/// How long a new connection gets to send its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of a session. `Default` gives a working download/seed peer on port 6881.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Where to accept peer connections; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Peers served at once per torrent; more interested peers take turns every 10 s.
    pub upload_slots: usize,
    /// Upload limit for the whole session, bytes per second.
    pub upload_limit_bps: Option<u64>,
    /// Download limit for the whole session, bytes per second.
    pub download_limit_bps: Option<u64>,
    /// Where resume records go (`<info hash>.resume`); default: next to each torrent's file
    /// as `<file>.resume`.
    pub state_dir: Option<PathBuf>,
    /// Networks of our own zone: peers there are preferred for downloading.
    pub zone: Vec<Cidr>,
    /// Most connections per torrent.
    pub max_peers: usize,
    /// Decides which peers may connect to us; everyone when `None`.
    pub admission: Option<Admission>,
}

/// Which inbound peers a session serves: asked with the torrent and the peer's address after
/// its handshake. The server's seeder admits only peers its tracker admitted (enrolled
/// machines with a passkey), and agents ask the tracker the same, so a host that merely
/// knows the info hash gets nothing.
#[derive(Clone)]
pub struct Admission(pub Arc<AdmitFn>);

/// Whether the peer at this address may have this torrent from us (it may have to ask).
pub type AdmitFn = dyn Fn(InfoHash, IpAddr) -> AdmitFuture + Send + Sync;

/// The answer of an [`AdmitFn`].
pub type AdmitFuture = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Admission(..)")
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            listen: ([0, 0, 0, 0], 6881).into(),
            upload_slots: 16,
            upload_limit_bps: None,
            download_limit_bps: None,
            state_dir: None,
            zone: Vec::new(),
            max_peers: 64,
            admission: None,
        }
    }
}

/// An IPv4 or IPv6 network, `10.1.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bits: u128, prefix: u8, width: u8) -> u128 {
            if prefix == 0 {
                0
            } else {
                bits >> (width - prefix)
            }
        }
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u32::from(net).into(), self.prefix, 32)
                    == masked(u32::from(ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), self.prefix, 128)
                    == masked(u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a network: expected ADDRESS/PREFIX"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|e| format!("{s:?}: bad address: {e}"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|e| format!("{s:?}: bad prefix length: {e}"))?;
        let width = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > width {
            return Err(format!("{s:?}: prefix length {prefix} exceeds {width}"));
        }
        Ok(Cidr { addr, prefix })
    }
}

/// What the engine does with a torrent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Fetch what is missing, then seed.
    Download,
    /// Serve a complete file (opened read-only).
    Seed,
    /// Serve a complete file so that each piece leaves about once: each peer is offered a few
    /// pieces at a time, and a new one only when an earlier one was seen elsewhere (BEP 16).
    SuperSeed,
}

/// A torrent to add.
#[derive(Debug, Clone)]
pub struct AddTorrent {
    /// The parsed `.torrent`.
    pub metainfo: Metainfo,
    /// The file to download into or seed from.
    pub path: PathBuf,
    /// Download, seed or super-seed.
    pub mode: Mode,
    /// Peers to connect to besides the tracker's.
    pub peers: Vec<SocketAddr>,
    /// Announce to the torrent's trackers.
    pub use_tracker: bool,
}

/// Phase of a torrent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TorrentState {
    /// Verifying what the file already holds; `pieces_checked` so far.
    Checking {
        /// Pieces hashed so far.
        pieces_checked: u32,
    },
    /// Fetching missing pieces.
    Downloading,
    /// Complete; serving.
    Seeding,
    /// Paused by the caller: no connections, no announces.
    Paused,
    /// Stopped by an error that needs the operator (disk full, incomplete seed file).
    Error(String),
}

impl TorrentState {
    /// Short lower-case name for logs and JSON.
    pub fn name(&self) -> &'static str {
        match self {
            TorrentState::Checking { .. } => "checking",
            TorrentState::Downloading => "downloading",
            TorrentState::Seeding => "seeding",
            TorrentState::Paused => "paused",
            TorrentState::Error(_) => "error",
        }
    }
}

/// One connected peer, as the stats see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    /// Remote address.
    pub addr: SocketAddr,
    /// Client prefix of its peer id, e.g. `-BT0100-` or `A2-1-36-0-`.
    pub client: String,
    /// Payload bytes received from it.
    pub downloaded: u64,
    /// Payload bytes sent to it.
    pub uploaded: u64,
    /// Pieces it has.
    pub pieces: u32,
    /// Whether it is in our zone.
    pub in_zone: bool,
}

/// A torrent's progress, published about once a second and on every state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorrentStats {
    /// Phase.
    pub state: TorrentState,
    /// Bytes in verified pieces.
    pub bytes_done: u64,
    /// File length.
    pub bytes_total: u64,
    /// Verified pieces.
    pub pieces_done: u32,
    /// Payload bytes received since the torrent was added.
    pub downloaded: u64,
    /// Payload bytes sent since the torrent was added.
    pub uploaded: u64,
    /// Bytes per second received, over the last second or so.
    pub download_rate: u64,
    /// Bytes per second sent.
    pub upload_rate: u64,
    /// Pieces that failed their hash.
    pub hash_failures: u64,
    /// Peers banned for sending bad data.
    pub banned: u64,
    /// Addresses of the banned peers, in the order they were banned (an inbound peer's port
    /// is its ephemeral one; the address names the host).
    pub banned_peers: Vec<SocketAddr>,
    /// Connections dropped for breaking the protocol.
    pub protocol_errors: u64,
    /// Connected peers.
    pub peers: Vec<PeerStats>,
}

/// Errors of the session API.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    /// The listener could not be opened.
    #[error("listening for peers on {addr}: {source}")]
    Listen {
        /// Address asked for.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The torrent is already in this session.
    #[error("torrent {0} is already added")]
    Duplicate(InfoHash),
    /// No such torrent in this session.
    #[error("torrent {0} is not in this session")]
    Unknown(InfoHash),
    /// The torrent's file could not be opened.
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    /// Deleting the file on removal failed.
    #[error("deleting {path}: {source}")]
    Delete {
        /// The torrent's file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// What every torrent of a session shares.
pub(crate) struct Shared {
    pub config: SessionConfig,
    pub peer_id: PeerId,
    pub local_addr: SocketAddr,
    pub tracker: TrackerClient,
    pub tasks: TaskTracker,
    pub upload: Option<RateLimiter>,
    pub download: Option<RateLimiter>,
}

impl Shared {
    /// Whether `ip` is in our zone.
    pub fn in_zone(&self, ip: IpAddr) -> bool {
        self.config.zone.iter().any(|c| c.contains(ip))
    }
}

/// The engine. Dropping it does not stop it: cancel the shutdown token given to
/// [`Session::start`], then await [`Session::stopped`].
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
    torrents: Arc<Mutex<HashMap<InfoHash, Arc<Torrent>>>>,
    shutdown: CancellationToken,
}

impl Session {
    /// Binds the listener and starts accepting peers.
    pub async fn start(
        config: SessionConfig,
        shutdown: CancellationToken,
    ) -> Result<Session, SwarmError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| SwarmError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| SwarmError::Listen {
            addr: config.listen,
            source,
        })?;
        let shared = Arc::new(Shared {
            upload: config.upload_limit_bps.map(RateLimiter::new),
            download: config.download_limit_bps.map(RateLimiter::new),
            config,
            peer_id: PeerId::generate(),
            local_addr,
            tracker: TrackerClient::new(),
            tasks: TaskTracker::new(),
        });
        let session = Session {
            shared,
            torrents: Arc::new(Mutex::new(HashMap::new())),
            shutdown,
        };
        let accepting = session.clone();
        session
            .shared
            .tasks
            .spawn(async move { accepting.accept_loop(listener).await });
        tracing::info!(listen = %local_addr, "swarm engine listening");
        Ok(session)
    }

    /// The address peers reach us on (the bound port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Our peer id.
    pub fn peer_id(&self) -> PeerId {
        self.shared.peer_id
    }

    /// Where the resume record of a torrent's file lives.
    fn resume_path(&self, info_hash: InfoHash, data_path: &Path) -> PathBuf {
        match &self.shared.config.state_dir {
            Some(dir) => dir.join(format!("{info_hash}.resume")),
            None => {
                let mut p = data_path.as_os_str().to_owned();
                p.push(".resume");
                PathBuf::from(p)
            }
        }
    }

    /// Records that the file at `data_path` holds every piece of `metainfo`, so that adding
    /// it skips the re-hash. For a caller that has just hashed the file itself (the server's
    /// catalog, which made the torrent from it): re-reading a 50 GB image right after would
    /// double an import. The record is void as soon as the file's length or modification time
    /// changes, like any resume record.
    pub fn trust_complete(&self, metainfo: &Metainfo, data_path: &Path) -> Result<(), SwarmError> {
        let have = crate::Bitfield::full(metainfo.geometry.piece_count());
        crate::storage::save_resume(
            &self.resume_path(metainfo.info_hash, data_path),
            metainfo.info_hash,
            data_path,
            &have,
        )?;
        Ok(())
    }

    /// Adds a torrent and starts it: checks the file, then downloads or seeds.
    pub fn add(&self, add: AddTorrent) -> Result<TorrentHandle, SwarmError> {
        let info_hash = add.metainfo.info_hash;
        let mut torrents = self.torrents.lock().unwrap_or_else(|e| e.into_inner());
        if torrents.contains_key(&info_hash) {
            return Err(SwarmError::Duplicate(info_hash));
        }
        let resume_path = self.resume_path(info_hash, &add.path);
        let torrent = Torrent::start(
            self.shared.clone(),
            add,
            resume_path,
            self.shutdown.child_token(),
        )?;
        torrents.insert(info_hash, torrent.clone());
        Ok(TorrentHandle { torrent })
    }

    /// Stops a torrent (announcing `stopped`), optionally deleting its file.
    pub async fn remove(&self, info_hash: InfoHash, delete_file: bool) -> Result<(), SwarmError> {
        let torrent = self
            .torrents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&info_hash)
            .ok_or(SwarmError::Unknown(info_hash))?;
        torrent.stop().await;
        if delete_file {
            let path = torrent.path().to_owned();
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(SwarmError::Delete { path, source }),
            }
            let _ = tokio::fs::remove_file(torrent.resume_path()).await;
        }
        Ok(())
    }

    /// Resolves once every task has ended after the shutdown token was cancelled: peers
    /// closed, `stopped` announced (bounded by a short timeout), resume data saved.
    pub async fn stopped(&self) {
        self.shutdown.cancelled().await;
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }

    async fn accept_loop(self, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, addr)) => {
                    let session = self.clone();
                    self.shared.tasks.spawn(async move {
                        if let Err(e) = session.inbound(stream, addr).await {
                            tracing::debug!(peer = %addr, "inbound connection refused: {e}");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a peer connection failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn inbound(&self, mut stream: TcpStream, addr: SocketAddr) -> Result<(), String> {
        let mut buf = [0u8; HANDSHAKE_LEN];
        tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.read_exact(&mut buf))
            .await
            .map_err(|_| "no handshake within 10 s".to_owned())?
            .map_err(|e| format!("reading handshake: {e}"))?;
        let theirs = Handshake::decode(&buf).map_err(|e| e.to_string())?;
        let torrent = self
            .torrents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&theirs.info_hash)
            .cloned()
            .ok_or_else(|| format!("unknown info hash {}", theirs.info_hash))?;
        if theirs.peer_id == self.shared.peer_id {
            return Err("connection to ourselves".into());
        }
        if let Some(Admission(admit)) = &self.shared.config.admission
            && !admit(theirs.info_hash, addr.ip()).await
        {
            return Err(format!(
                "{} is not admitted to {} (no announce with a valid passkey)",
                addr.ip(),
                theirs.info_hash
            ));
        }
        let ours = Handshake::new(theirs.info_hash, self.shared.peer_id);
        stream
            .write_all(&ours.encode())
            .await
            .map_err(|e| format!("sending handshake: {e}"))?;
        torrent.run_peer(stream, addr, theirs, false).await;
        Ok(())
    }
}

/// A torrent in a session: its stats and controls.
#[derive(Clone)]
pub struct TorrentHandle {
    torrent: Arc<Torrent>,
}

impl TorrentHandle {
    /// The torrent's info hash.
    pub fn info_hash(&self) -> InfoHash {
        self.torrent.info_hash()
    }

    /// Stats, updated about once a second and on every state change.
    pub fn stats(&self) -> watch::Receiver<TorrentStats> {
        self.torrent.subscribe()
    }

    /// Disconnects every peer and stops announcing until [`TorrentHandle::resume`].
    pub fn pause(&self) {
        self.torrent.pause();
    }

    /// Undoes [`TorrentHandle::pause`].
    pub fn resume(&self) {
        self.torrent.resume();
    }

    /// Connects to these peers too.
    pub fn add_peers(&self, peers: &[SocketAddr]) {
        self.torrent.add_peers(peers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr() {
        let net: Cidr = "10.1.0.0/24".parse().unwrap();
        assert!(net.contains("10.1.0.77".parse().unwrap()));
        assert!(!net.contains("10.1.1.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0.0".parse::<Cidr>().is_err());
    }
}
