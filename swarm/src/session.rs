//! The running engine: one listener, any number of torrents, their peer connections.
//!
//! Tasks (all tracked by the session's `TaskTracker`, all under its shutdown token):
//! - the **listener** accepts connections, reads the handshake and hands the connection to the
//!   torrent it names;
//! - per torrent, one **lifecycle** task (resume check, then a 1 s tick: stats, connecting,
//!   choking, resume saving; peers just learned are dialled at once) and one **announcer** (see
//!   `torrent`);
//! - per peer, one **connection** task that owns the socket (see `peer`), dialled by the
//!   lifecycle or accepted by the listener.
//!
//! Shared state: each torrent's `State` behind a `std::sync::Mutex`, never held across an
//! `.await`. Lock order: the session's torrent map, then one torrent's state; nothing else
//! locks two torrents.
//!
//! The types a host passes in and reads back live in `control` and are re-exported here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::announce::TrackerClient;
use crate::choker::ROTATE_EVERY;
pub use crate::control::{
    AddTorrent, Admission, AdmitFn, AdmitFuture, Cidr, ConnectionCounts, Encryption, Mode,
    PeerStats, SessionConfig, SwarmError, TorrentState, TorrentStats, outside_peer_limit,
};
use crate::metainfo::Metainfo;
use crate::mse;
use crate::peer::{self, PeerStream};
use crate::rate::RateLimiter;
use crate::torrent::{Shared, Torrent};
use crate::wire::{HANDSHAKE_LEN, Handshake};
use crate::{InfoHash, PeerId};

/// How long a new connection gets to send its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Resume data is saved this often while pieces arrive.
const SAVE_EVERY: Duration = Duration::from_secs(15);

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
            zone: std::sync::RwLock::new(config.zone.clone()),
            upload: config.upload_limit_bps.map(RateLimiter::new),
            download: config.download_limit_bps.map(RateLimiter::new),
            config,
            peer_id: PeerId::generate(),
            local_addr,
            tracker: TrackerClient::new(),
            tasks: TaskTracker::new(),
            inbound: Default::default(),
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

    /// Replaces the networks of our zone ([`SessionConfig::zone`]). Connections made from
    /// now on are judged by them; those already open keep what they were judged at.
    pub fn set_zone(&self, zone: Vec<Cidr>) {
        *self.shared.zone.write().unwrap_or_else(|e| e.into_inner()) = zone;
    }

    /// Our peer id.
    pub fn peer_id(&self) -> PeerId {
        self.shared.peer_id
    }

    /// Incoming connections so far, by how they were encrypted.
    pub fn connection_counts(&self) -> ConnectionCounts {
        let c = &self.shared.inbound;
        ConnectionCounts {
            plaintext: c.plaintext.load(Ordering::Relaxed),
            encrypted: c.encrypted.load(Ordering::Relaxed),
            mse_plaintext: c.mse_plaintext.load(Ordering::Relaxed),
            refused_unencrypted: c.refused_unencrypted.load(Ordering::Relaxed),
        }
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
        let use_tracker = add.use_tracker;
        let torrent = Torrent::open(
            self.shared.clone(),
            add,
            resume_path,
            self.shutdown.child_token(),
        )?;
        let t = torrent.clone();
        self.shared
            .tasks
            .spawn(async move { lifecycle(t, use_tracker).await });
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
        // A plaintext handshake starts with 19 + "BitTorrent protocol"; anything else is taken
        // as the start of an MSE public key (clients like Transmission prefer encryption).
        let mut first = [0u8; 20];
        tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.read_exact(&mut first))
            .await
            .map_err(|_| "no handshake within 10 s".to_owned())?
            .map_err(|e| format!("reading handshake: {e}"))?;
        let required = self.shared.config.encryption == Encryption::Require;
        let counts = &self.shared.inbound;
        let mut stream = if &first == mse::PLAIN_PREFIX {
            if required {
                counts.refused_unencrypted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    peer = %addr,
                    "refused a plaintext connection: encryption (MSE with RC4) is required"
                );
                return Err("plaintext handshake while encryption is required".into());
            }
            counts.plaintext.fetch_add(1, Ordering::Relaxed);
            PeerStream::plain(stream, first.to_vec())
        } else {
            let known: Vec<[u8; 20]> = self
                .torrents
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .map(|h| h.0)
                .collect();
            let accepted = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                mse::accept(stream, &first, &known, !required),
            )
            .await
            .map_err(|_| "encrypted (MSE) handshake not finished within 10 s".to_owned())?;
            let accepted = match accepted {
                Ok(accepted) => accepted,
                Err(e @ mse::MseError::PlaintextRefused(_)) => {
                    counts.refused_unencrypted.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        peer = %addr,
                        "refused an MSE connection offering plaintext only: encryption (RC4) \
                         is required"
                    );
                    return Err(e.to_string());
                }
                Err(e) => return Err(format!("encrypted (MSE) handshake refused: {e}")),
            };
            let rc4 = accepted.stream.encrypted();
            if rc4 {
                counts.encrypted.fetch_add(1, Ordering::Relaxed);
            } else {
                counts.mse_plaintext.fetch_add(1, Ordering::Relaxed);
            }
            tracing::info!(peer = %addr, rc4, "accepted an encrypted (MSE) connection");
            accepted.stream
        };
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
        peer::run(&torrent, stream, addr, theirs, false).await;
        Ok(())
    }
}

/// Resume check, then the 1 s tick until cancelled.
async fn lifecycle(torrent: Arc<Torrent>, use_tracker: bool) {
    if let Err(e) = torrent.check().await {
        tracing::error!(torrent = %torrent.info_hash(), "{e}");
        torrent.lock().phase = TorrentState::Error(e);
        torrent.publish_stats(0, 0);
        torrent.cancel.cancelled().await;
        torrent.done.notify_waiters();
        return;
    }
    if use_tracker && !torrent.meta.announce.is_empty() {
        let t = torrent.clone();
        torrent
            .shared
            .tasks
            .spawn(async move { t.announcer().await });
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = (0u64, 0u64, Instant::now());
    let mut rates = (0, 0);
    let mut last_rotate = Instant::now();
    let mut last_save = Instant::now();
    loop {
        tokio::select! {
            _ = torrent.cancel.cancelled() => break,
            _ = torrent.finished.notified() => {
                torrent.publish_stats(rates.0, rates.1);
                continue;
            }
            _ = torrent.learned.notified() => {
                if torrent.lock().phase != TorrentState::Paused {
                    connect_candidates(&torrent);
                }
                continue;
            }
            _ = tick.tick() => {}
        }
        let (down, up) = (
            torrent.downloaded.load(Ordering::Relaxed),
            torrent.uploaded.load(Ordering::Relaxed),
        );
        let secs = last.2.elapsed().as_secs_f64().max(0.001);
        rates = (
            ((down - last.0) as f64 / secs) as u64,
            ((up - last.1) as f64 / secs) as u64,
        );
        last = (down, up, Instant::now());
        torrent.publish_stats(rates.0, rates.1);
        if torrent.lock().phase == TorrentState::Paused {
            continue;
        }
        torrent.upload_second(rates.1);
        if last_rotate.elapsed() >= ROTATE_EVERY {
            last_rotate = Instant::now();
            torrent.rotate_slots();
        }
        if torrent.mode == Mode::SuperSeed {
            torrent.superseed_tick();
        }
        connect_candidates(&torrent);
        if last_save.elapsed() >= SAVE_EVERY {
            last_save = Instant::now();
            torrent.save_resume().await;
        }
    }
    torrent.save_resume().await;
    // The last word: exact totals for whoever reports them after the stop.
    torrent.publish_stats(0, 0);
    torrent.done.notify_waiters();
}

/// Dials the torrent's known addresses it is not connected to, up to its peer limit.
fn connect_candidates(torrent: &Arc<Torrent>) {
    for addr in torrent.dial_targets() {
        let t = torrent.clone();
        torrent.shared.tasks.spawn(async move {
            let result = peer::dial(&t, addr).await;
            t.dial_ended(addr, &result);
        });
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
