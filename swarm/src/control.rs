//! The engine's control surface: what its host (the server, the agent, `boottorrent-peer`)
//! sets, asks for and is told. Settings of a session ([`SessionConfig`], [`Cidr`],
//! [`Admission`]), the torrent to add ([`AddTorrent`], [`Mode`]), what a torrent reports
//! ([`TorrentState`], [`TorrentStats`], [`PeerStats`]) and what fails ([`SwarmError`]).
//!
//! Session, torrent and peer all speak these types and this module imports none of them, so
//! the engine's modules depend on each other one way only. The host reaches them through
//! `session`, which re-exports them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use crate::InfoHash;
use crate::metainfo::Metainfo;

/// Settings of a session. `Default` gives a working download/seed peer on port 6881.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Where to accept peer connections; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Peers served at once per torrent; more interested peers take turns every 10 s. A peer
    /// that stopped wanting and wants again is served at once, beyond them if need be, until
    /// the next turn.
    pub upload_slots: usize,
    /// Upload slots open at first, if fewer than `upload_slots`: more open, twice as many at
    /// a time up to `upload_slots`, while every open slot is taken and a second's upload falls
    /// below nine tenths of the best second so far. The fewer flows share our link, the
    /// sooner each piece has left it and can be traded; the more there are, the larger our
    /// share of crowded paths. `None`: all open from the start.
    pub first_upload_slots: Option<usize>,
    /// Upload limit for the whole session, bytes per second.
    pub upload_limit_bps: Option<u64>,
    /// Download limit for the whole session, bytes per second.
    pub download_limit_bps: Option<u64>,
    /// Where resume records go (`<info hash>.resume`); default: next to each torrent's file
    /// as `<file>.resume`.
    pub state_dir: Option<PathBuf>,
    /// Networks of our own zone: peers there are preferred for downloading.
    pub zone: Vec<Cidr>,
    /// Most connections per torrent. While a zone is known, peers outside it hold at most
    /// [`outside_peer_limit`] of them.
    pub max_peers: usize,
    /// Decides which peers may connect to us; everyone when `None`.
    pub admission: Option<Admission>,
    /// Whether peer connections must be encrypted (MSE with RC4).
    pub encryption: Encryption,
}

/// Whether peer connections are encrypted with message stream encryption (MSE, RC4). It is
/// obfuscation against traffic shaping that singles out BitTorrent, not secrecy: nothing
/// authenticates the exchange (integrity comes from the piece hashes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encryption {
    /// Incoming connections may be plaintext or MSE (RC4 selected whenever offered);
    /// outgoing ones are plaintext, which every client accepts unless it requires encryption.
    #[default]
    Accept,
    /// Incoming connections must be MSE with RC4: a plaintext handshake, or an MSE one
    /// offering plaintext only, is refused (logged and counted). Outgoing connections start
    /// MSE offering RC4 only, so peers that require encryption can be reached.
    Require,
}

/// Incoming connections of a session so far, by how they were encrypted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionCounts {
    /// Plaintext BitTorrent handshakes accepted.
    pub plaintext: u64,
    /// MSE handshakes that selected RC4.
    pub encrypted: u64,
    /// MSE handshakes that selected plaintext (the peer offered nothing else).
    pub mse_plaintext: u64,
    /// Connections refused because [`Encryption::Require`] is set and they were not RC4.
    pub refused_unencrypted: u64,
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
            first_upload_slots: None,
            upload_limit_bps: None,
            download_limit_bps: None,
            state_dir: None,
            zone: Vec::new(),
            max_peers: 64,
            admission: None,
            encryption: Encryption::Accept,
        }
    }
}

/// Of `max_peers` connections per torrent, how many peers outside our zone may hold while a
/// zone is known: half (at least one). Peers of the zone get the rest. Without it, a machine
/// in a campus swarm is dialled by machines of other switches before it dials its own, fills
/// up with them, and then gets most of its bytes across an uplink at a few pieces at a time
/// (the picker's limit): in the simulated 300-machine lab (docs/benchmarks.md) the machines
/// left with fewer than ten zone peers were the last to finish.
pub fn outside_peer_limit(max_peers: usize) -> usize {
    max_peers.div_ceil(2)
}

/// An IPv4 or IPv6 network, `10.1.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network of `prefix` bits that holds `addr` (an interface's address and prefix
    /// length give its network); `None` when `prefix` is longer than the address.
    pub fn network(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let addr = match addr {
            IpAddr::V4(a) if prefix <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) if prefix <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
            _ => return None,
        };
        Some(Cidr { addr, prefix })
    }

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

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
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

    #[test]
    fn an_interface_address_gives_its_network() {
        let net = |a: &str, p| Cidr::network(a.parse().unwrap(), p).map(|c| c.to_string());
        assert_eq!(net("10.1.2.77", 24).as_deref(), Some("10.1.2.0/24"));
        assert_eq!(net("10.1.2.77", 32).as_deref(), Some("10.1.2.77/32"));
        assert_eq!(net("10.1.2.77", 0).as_deref(), Some("0.0.0.0/0"));
        assert_eq!(net("fd12:3456::9", 64).as_deref(), Some("fd12:3456::/64"));
        assert_eq!(net("10.1.2.77", 33), None);
        let lab = Cidr::network("10.1.2.77".parse().unwrap(), 23).unwrap();
        assert!(lab.contains("10.1.3.200".parse().unwrap()));
        assert!(!lab.contains("10.1.4.1".parse().unwrap()));
        assert_eq!(lab.to_string().parse::<Cidr>(), Ok(lab));
    }
}
