//! One peer connection: dialling it (TCP and handshake), then a task that owns the socket.
//!
//! It reads messages, keeps its own view of what it asked for and what it was asked, and
//! talks to the torrent through the torrent's state lock (never held across an `.await`) and
//! the `Cmd` channel (haves, offers, choke decisions, endgame cancels, close). Disk work runs
//! on the blocking pool. Any protocol violation ends the connection and is counted; nothing a
//! peer sends can panic or stall the engine beyond its own connection.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::Bitfield;
use crate::control::{Encryption, Mode, TorrentState};
use crate::mse;
use crate::picker::{PeerKey, Received, pipeline_depth};
use crate::storage::Stored;
use crate::torrent::{Cmd, State, Torrent};
use crate::wire::{
    BlockRef, HANDSHAKE_LEN, Handshake, MAX_BLOCK_LEN, Message, MessageCodec, WireError,
};

/// Requests a peer may queue with us (256 MiB of blocks, 192 KiB of memory); more are
/// refused, not queued. Transmission asks for ten seconds' worth at the rate it sees, about
/// 16,000 blocks at 25 MB/s, and does not stop at a count it is not told (it would be, by the
/// BEP 10 `reqq`, which we do not send): a peer that asks too far ahead is not hostile.
const MAX_QUEUED_REQUESTS: usize = 16384;
/// A peer silent this long is gone.
const IDLE_TIMEOUT: Duration = Duration::from_secs(150);
/// We send a keep-alive after this much silence of ours.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(60);
/// Requests unanswered this long go back to the picker for other peers.
const SNUB_AFTER: Duration = Duration::from_secs(20);
/// Longest a TCP connect to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the handshake exchange of a dialled connection may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a single write may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most queued requests of one peer read and sent together (16 blocks: 256 KiB).
const SERVE_BATCH: usize = 16;

/// Why a connection ended.
enum End {
    /// Normal: closed by either side, shutdown, ban, duplicate.
    Closed(String),
    /// The peer broke the protocol.
    Violation(String),
}

/// Connects to `addr`, exchanges handshakes, and runs the connection until it ends; an
/// error when it never got that far.
pub(crate) async fn dial(torrent: &Arc<Torrent>, addr: SocketAddr) -> Result<(), String> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let ours = Handshake::new(torrent.info_hash(), torrent.shared.peer_id);
    // With MSE our handshake goes as its initial payload, not again below.
    let encrypt = torrent.shared.config.encryption == Encryption::Require;
    let mut stream = match torrent.shared.config.encryption {
        Encryption::Accept => PeerStream::plain(stream, Vec::new()),
        Encryption::Require => tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            mse::initiate(
                stream,
                &torrent.info_hash().0,
                mse::CRYPTO_RC4,
                &ours.encode(),
            ),
        )
        .await
        .map_err(|_| "encrypted (MSE) handshake timed out".to_owned())?
        .map_err(|e| format!("encrypted (MSE) handshake: {e}"))?,
    };
    let mut buf = [0u8; HANDSHAKE_LEN];
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        if !encrypt {
            stream.write_all(&ours.encode()).await?;
        }
        stream.read_exact(&mut buf).await
    })
    .await
    .map_err(|_| "handshake timed out".to_owned())?
    .map_err(|e| format!("handshake: {e}"))?;
    let theirs = Handshake::decode(&buf).map_err(|e| e.to_string())?;
    if theirs.info_hash != torrent.info_hash() {
        return Err(format!("peer answered for torrent {}", theirs.info_hash));
    }
    if theirs.peer_id == torrent.shared.peer_id {
        torrent.dialled_ourselves(addr);
        return Err("connected to ourselves".into());
    }
    torrent.dial_connected(addr);
    run(torrent, stream, addr, theirs, true).await;
    Ok(())
}

/// Runs a handshaken connection until it ends.
pub(crate) async fn run(
    torrent: &Arc<Torrent>,
    stream: PeerStream,
    addr: SocketAddr,
    theirs: Handshake,
    outbound: bool,
) {
    let Some((key, cmds)) = torrent.register(addr, theirs.peer_id, outbound) else {
        tracing::debug!(peer = %addr, "connection not admitted");
        return;
    };
    let _ = stream.get_ref().set_nodelay(true);
    let mut conn = Connection {
        torrent: torrent.clone(),
        key,
        addr,
        fast: theirs.supports_fast(),
        in_zone: torrent.shared.in_zone(addr.ip()),
        peer_choking: true,
        am_interested: false,
        am_choking: true,
        outstanding: HashMap::new(),
        last_block_at: Instant::now(),
        requests: VecDeque::new(),
        got_availability: false,
        download_rate: 0.0,
        rate_window: (Instant::now(), 0),
    };
    let run = torrent.run_token();
    let end = conn.run(stream, cmds, run).await;
    match &end {
        End::Closed(why) => tracing::debug!(peer = %addr, "connection closed: {why}"),
        End::Violation(why) => {
            torrent.protocol_errors.fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer = %addr, "dropped peer: {why}");
        }
    }
    torrent.unregister(key);
}

struct Connection {
    torrent: Arc<Torrent>,
    key: PeerKey,
    addr: SocketAddr,
    fast: bool,
    in_zone: bool,
    peer_choking: bool,
    am_interested: bool,
    am_choking: bool,
    /// Our requests in flight, with when they were sent.
    outstanding: HashMap<BlockRef, Instant>,
    last_block_at: Instant,
    /// Its requests waiting to be served.
    requests: VecDeque<BlockRef>,
    /// It sent its bitfield, have_all, have_none or a have already.
    got_availability: bool,
    /// Bytes per second received from this peer, smoothed; sizes the pipeline.
    download_rate: f64,
    rate_window: (Instant, u64),
}

/// A peer connection, plaintext or MSE-encrypted: the wire code below does not care which.
pub(crate) type PeerStream = crate::mse::MseStream<TcpStream>;

type Sink = FramedWrite<tokio::io::WriteHalf<PeerStream>, MessageCodec>;

impl Connection {
    async fn run(
        &mut self,
        stream: PeerStream,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
        run: tokio_util::sync::CancellationToken,
    ) -> End {
        let (read, write) = tokio::io::split(stream);
        let mut reader = FramedRead::new(read, MessageCodec::new());
        let mut sink = FramedWrite::new(write, MessageCodec::new());
        if let Err(e) = self.introduce(&mut sink).await {
            return e;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_recv = Instant::now();
        let mut last_send = Instant::now();
        loop {
            let serving = !self.am_choking && !self.requests.is_empty();
            let mut ticked = false;
            let result = tokio::select! {
                biased;
                _ = run.cancelled() => return End::Closed("torrent stopped or paused".into()),
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.command(cmd, &mut sink).await,
                    None => return End::Closed("torrent gone".into()),
                },
                msg = reader.next() => match msg {
                    None => return End::Closed("peer closed the connection".into()),
                    Some(Err(e)) => return End::Violation(format!("reading: {e}")),
                    Some(Ok(msg)) => {
                        last_recv = Instant::now();
                        self.message(msg, &mut sink).await
                    }
                },
                _ = tick.tick() => {
                    if last_recv.elapsed() > IDLE_TIMEOUT {
                        return End::Closed("idle".into());
                    }
                    if last_send.elapsed() > KEEPALIVE_EVERY {
                        send(&mut sink, Message::KeepAlive).await
                    } else {
                        ticked = true;
                        self.snub_check(&mut sink).await
                    }
                }
                // Serving is not cancel-safe (a popped request would be lost), so the select
                // only decides that it is our turn; the work runs after.
                _ = std::future::ready(()), if serving => self.serve_some(&mut sink).await,
            };
            if let Err(end) = result {
                return end;
            }
            // Every branch but a quiet tick sent something (or may have).
            if !ticked {
                last_send = Instant::now();
            }
        }
    }

    /// What we have, right after the handshake.
    async fn introduce(&mut self, sink: &mut Sink) -> Result<(), End> {
        let have = self.torrent.lock().picker.have().clone();
        let msg = if self.torrent.mode == Mode::SuperSeed {
            // A super-seeder hides what it has and offers pieces one by one.
            if self.fast {
                Message::HaveNone
            } else {
                Message::Bitfield(Bitfield::new(have.len()).as_bytes().to_vec().into())
            }
        } else if self.fast && have.is_full() {
            Message::HaveAll
        } else if self.fast && have.count() == 0 {
            Message::HaveNone
        } else {
            Message::Bitfield(have.as_bytes().to_vec().into())
        };
        send(sink, msg).await?;
        if self.torrent.mode == Mode::SuperSeed {
            let mut st = self.torrent.lock();
            self.torrent.offer(&mut st, self.key);
        }
        Ok(())
    }

    async fn command(&mut self, cmd: Cmd, sink: &mut Sink) -> Result<(), End> {
        match cmd {
            Cmd::Have(piece) => {
                send(sink, Message::Have(piece)).await?;
                self.update_interest(sink).await?;
                self.fill_requests(sink).await
            }
            Cmd::Offer(piece) => send(sink, Message::Have(piece)).await,
            Cmd::Choke => {
                self.am_choking = true;
                if self.fast {
                    // BEP 6: a choke no longer cancels requests implicitly; reject each.
                    for r in std::mem::take(&mut self.requests) {
                        send(sink, Message::Reject(r)).await?;
                    }
                } else {
                    self.requests.clear();
                }
                send(sink, Message::Choke).await
            }
            Cmd::Unchoke => {
                self.am_choking = false;
                send(sink, Message::Unchoke).await
            }
            Cmd::Cancel(block) => {
                if self.outstanding.remove(&block).is_some() {
                    send(sink, Message::Cancel(block)).await?;
                }
                self.fill_requests(sink).await
            }
            Cmd::Close(why) => Err(End::Closed(why.into())),
        }
    }

    async fn message(&mut self, msg: Message, sink: &mut Sink) -> Result<(), End> {
        let geometry = self.torrent.meta.geometry;
        let pieces = geometry.piece_count();
        // Availability (bitfield, have_all, have_none) comes once, before any have; aria2c
        // sends it after its BEP 10 extension handshake, so "first message" is too strict.
        let first = !self.got_availability;
        if matches!(
            msg,
            Message::Bitfield(_) | Message::HaveAll | Message::HaveNone | Message::Have(_)
        ) {
            self.got_availability = true;
        }
        match msg {
            Message::KeepAlive => Ok(()),
            Message::Bitfield(bytes) => {
                let has = Bitfield::from_bytes(&bytes, pieces)
                    .map_err(|e| End::Violation(e.to_string()))?;
                if first {
                    self.set_has(has);
                    return self.update_interest(sink).await;
                }
                // aria2c, having said have_none, announces its first piece with a bitfield
                // instead of a have. Taken as a batch of haves; pieces never disappear.
                let known = self
                    .torrent
                    .lock()
                    .peers
                    .get(&self.key)
                    .map(|p| p.has.clone());
                if let Some(known) = known {
                    if let Some(lost) = known.iter_set().find(|&i| !has.get(i)) {
                        return Err(End::Violation(format!(
                            "a later bitfield drops piece {lost} it announced before"
                        )));
                    }
                    for piece in has.iter_set().filter(|&i| !known.get(i)) {
                        self.peer_has_piece(piece)?;
                    }
                }
                self.update_interest(sink).await?;
                self.fill_requests(sink).await
            }
            Message::HaveAll | Message::HaveNone => {
                if !self.fast || !first {
                    return Err(End::Violation("have_all/have_none out of place".into()));
                }
                let has = if matches!(msg, Message::HaveAll) {
                    Bitfield::full(pieces)
                } else {
                    Bitfield::new(pieces)
                };
                self.set_has(has);
                self.update_interest(sink).await
            }
            Message::Have(piece) => {
                if piece >= pieces {
                    return Err(End::Violation(format!(
                        "have for piece {piece}; the torrent has {pieces}"
                    )));
                }
                self.peer_has_piece(piece)?;
                self.update_interest(sink).await?;
                self.fill_requests(sink).await
            }
            Message::Choke => {
                self.peer_choking = true;
                if !self.fast {
                    // BEP 3: a choke discards every pending request.
                    self.release_outstanding();
                }
                Ok(())
            }
            Message::Unchoke => {
                self.peer_choking = false;
                self.fill_requests(sink).await
            }
            Message::Interested | Message::NotInterested => {
                let interested = matches!(msg, Message::Interested);
                let mut st = self.torrent.lock();
                self.torrent.interest_changed(&mut st, self.key, interested);
                Ok(())
            }
            Message::Request(r) => self.request(r, sink).await,
            Message::Cancel(r) => {
                self.requests.retain(|q| *q != r);
                Ok(())
            }
            Message::Reject(r) => {
                if !self.fast {
                    return Err(End::Violation("reject without the fast extension".into()));
                }
                if self.outstanding.remove(&r).is_some() {
                    self.torrent.lock().picker.release(self.key, r);
                }
                Ok(())
            }
            Message::Piece {
                piece,
                offset,
                data,
            } => self.piece(piece, offset, data, sink).await,
            // Hints we do not need: our picker knows better what the fleet lacks.
            Message::SuggestPiece(_)
            | Message::AllowedFast(_)
            | Message::Port(_)
            | Message::Extended { .. } => Ok(()),
        }
    }

    /// The peer announced `piece`: availability, super-seed bookkeeping, and closing a
    /// connection between two complete peers.
    fn peer_has_piece(&mut self, piece: u32) -> Result<(), End> {
        let mut st = self.torrent.lock();
        let in_zone = self.in_zone;
        let State { peers, picker, .. } = &mut *st;
        if let Some(slot) = peers.get_mut(&self.key)
            && slot.has.set(piece)
        {
            picker.add_piece(piece, in_zone);
        }
        self.torrent.seen(&mut st, self.key, piece);
        let both_complete =
            st.picker.is_complete() && st.peers.get(&self.key).is_some_and(|p| p.has.is_full());
        if both_complete && self.torrent.mode != Mode::SuperSeed {
            return Err(End::Closed("both complete".into()));
        }
        Ok(())
    }

    fn set_has(&mut self, has: Bitfield) {
        let mut st = self.torrent.lock();
        let in_zone = self.in_zone;
        let State { peers, picker, .. } = &mut *st;
        if let Some(slot) = peers.get_mut(&self.key) {
            picker.add_availability(&has, in_zone);
            slot.offers.forget_held(&has);
            slot.has = has;
        }
        self.torrent.offer(&mut st, self.key);
    }

    async fn update_interest(&mut self, sink: &mut Sink) -> Result<(), End> {
        let want = {
            let st = self.torrent.lock();
            st.phase == TorrentState::Downloading
                && st
                    .peers
                    .get(&self.key)
                    .is_some_and(|p| st.picker.wants_from(&p.has))
        };
        if want != self.am_interested {
            self.am_interested = want;
            let msg = if want {
                Message::Interested
            } else {
                Message::NotInterested
            };
            send(sink, msg).await?;
        }
        Ok(())
    }

    /// Requests more blocks while the pipeline has room.
    async fn fill_requests(&mut self, sink: &mut Sink) -> Result<(), End> {
        if self.peer_choking || !self.am_interested {
            return Ok(());
        }
        let depth = pipeline_depth(self.download_rate);
        if self.outstanding.len() >= depth {
            return Ok(());
        }
        // Top up in batches so picking (a scan over pieces) is not done per block.
        if self.outstanding.len() > depth / 2 && !self.outstanding.is_empty() {
            return Ok(());
        }
        let picked = {
            let mut st = self.torrent.lock();
            let State { peers, picker, .. } = &mut *st;
            match peers.get(&self.key) {
                Some(slot) => picker.pick(
                    self.key,
                    &slot.has,
                    self.in_zone,
                    depth - self.outstanding.len(),
                ),
                None => Vec::new(),
            }
        };
        let now = Instant::now();
        let mut requests = Vec::with_capacity(picked.len());
        for r in picked {
            self.outstanding.insert(r, now);
            requests.push(Message::Request(r));
        }
        // One write for the batch: a flush per request cost a syscall (and a wake-up of the
        // peer) per 16 KiB block.
        send_all(sink, requests).await
    }

    fn release_outstanding(&mut self) {
        if !self.outstanding.is_empty() {
            self.outstanding.clear();
            self.torrent.lock().picker.release_all(self.key);
        }
    }

    async fn snub_check(&mut self, sink: &mut Sink) -> Result<(), End> {
        if !self.outstanding.is_empty() && self.last_block_at.elapsed() > SNUB_AFTER {
            tracing::debug!(peer = %self.addr, "peer sent nothing for our requests; handing them to others");
            for r in self.outstanding.keys().copied().collect::<Vec<_>>() {
                send(sink, Message::Cancel(r)).await?;
            }
            self.release_outstanding();
            self.last_block_at = Instant::now();
        }
        let (since, bytes) = self.rate_window;
        let secs = since.elapsed().as_secs_f64();
        if secs >= 1.0 {
            self.download_rate = 0.5 * self.download_rate + 0.5 * (bytes as f64 / secs);
            self.rate_window = (Instant::now(), 0);
        }
        self.fill_requests(sink).await
    }

    async fn request(&mut self, r: BlockRef, sink: &mut Sink) -> Result<(), End> {
        let geometry = self.torrent.meta.geometry;
        if !geometry.contains(r.piece, r.offset, r.len, MAX_BLOCK_LEN) {
            return Err(End::Violation(format!(
                "request for {}+{} len {} outside the torrent",
                r.piece, r.offset, r.len
            )));
        }
        let servable = {
            let mut st = self.torrent.lock();
            let offered = self.torrent.mode != Mode::SuperSeed
                || st
                    .peers
                    .get(&self.key)
                    .is_some_and(|p| p.offers.may_request(r.piece));
            let room = self.requests.len() < MAX_QUEUED_REQUESTS;
            let servable = st.picker.have().get(r.piece) && offered && !self.am_choking && room;
            if servable {
                self.torrent.requested(&mut st, self.key, r.piece, r.len);
            }
            servable
        };
        if !servable {
            // BEP 6 answers with a reject; plain BEP 3 peers just get nothing (and ask again
            // when their request times out).
            if self.fast {
                send(sink, Message::Reject(r)).await?;
            }
            return Ok(());
        }
        self.requests.push_back(r);
        Ok(())
    }

    /// Serves the peer's oldest queued requests, up to [`SERVE_BATCH`] of them: blocks of
    /// recently verified pieces come from memory, the others are read in one trip to the
    /// blocking pool, and all are written to the socket with one flush, because a trip per
    /// 16 KiB block costs more CPU than the copy itself.
    async fn serve_some(&mut self, sink: &mut Sink) -> Result<(), End> {
        let n = self.requests.len().min(SERVE_BATCH);
        let batch: Vec<BlockRef> = self.requests.drain(..n).collect();
        if batch.is_empty() {
            return Ok(());
        }
        let total: u64 = batch.iter().map(|r| u64::from(r.len)).sum();
        if let Some(limit) = &self.torrent.shared.upload {
            limit.acquire(total).await;
        }
        let mut data: Vec<Option<bytes::Bytes>> = {
            let st = self.torrent.lock();
            batch
                .iter()
                .map(|r| st.assembly.recent_block(r.piece, r.offset, r.len))
                .collect()
        };
        let misses: Vec<(usize, BlockRef)> = batch
            .iter()
            .enumerate()
            .filter(|(i, _)| data[*i].is_none())
            .map(|(i, r)| (i, *r))
            .collect();
        if !misses.is_empty() {
            let storage = self.torrent.storage.clone();
            let read = tokio::task::spawn_blocking(move || {
                misses
                    .into_iter()
                    .map(|(i, r)| storage.read_block(r.piece, r.offset, r.len).map(|d| (i, d)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .map_err(|e| End::Closed(format!("reading blocks: {e}")))?;
            match read {
                Ok(read) => {
                    for (i, d) in read {
                        data[i] = Some(d.into());
                    }
                }
                Err(e) => {
                    tracing::error!(peer = %self.addr, "{e}");
                    return Err(End::Closed(format!("reading block: {e}")));
                }
            }
        }
        let mut messages = Vec::with_capacity(batch.len());
        for (r, d) in batch.iter().zip(data) {
            let Some(data) = d else {
                return Err(End::Closed(format!(
                    "block {r:?} was neither cached nor read"
                )));
            };
            messages.push(Message::Piece {
                piece: r.piece,
                offset: r.offset,
                data,
            });
        }
        send_all(sink, messages).await?;
        self.torrent.uploaded.fetch_add(total, Ordering::Relaxed);
        if let Some(slot) = self.torrent.lock().peers.get_mut(&self.key) {
            slot.uploaded += total;
        }
        Ok(())
    }

    /// A full or failing disk stops the torrent, not the process: every connection of it
    /// closes, and the torrent reports the error in its state.
    fn storage_failed(&self, e: String) -> End {
        tracing::error!(torrent = %self.torrent.info_hash(), "{e}");
        let mut st = self.torrent.lock();
        st.phase = TorrentState::Error(e.clone());
        self.torrent.run_token().cancel();
        End::Closed(e)
    }

    async fn piece(
        &mut self,
        piece: u32,
        offset: u32,
        data: bytes::Bytes,
        sink: &mut Sink,
    ) -> Result<(), End> {
        let len = data.len() as u32;
        let block = BlockRef { piece, offset, len };
        if let Some(limit) = &self.torrent.shared.download {
            limit.acquire(u64::from(len)).await;
        }
        self.torrent
            .downloaded
            .fetch_add(u64::from(len), Ordering::Relaxed);
        self.rate_window.1 += u64::from(len);
        self.last_block_at = Instant::now();
        if self.outstanding.remove(&block).is_none() {
            // Cancelled in endgame and sent anyway, or never asked: drop the bytes.
            tracing::debug!(peer = %self.addr, ?block, "dropped a block we no longer wait for");
            return Ok(());
        }
        let received = {
            let mut st = self.torrent.lock();
            if let Some(slot) = st.peers.get_mut(&self.key) {
                slot.downloaded += u64::from(len);
            }
            let (cancel, done) = match st.picker.received(self.key, block) {
                Received::Unexpected => (None, false),
                Received::Block { cancel } => (Some(cancel), false),
                Received::PieceDone { cancel } => (Some(cancel), true),
            };
            cancel.map(|cancel| (cancel, done, st.assembly.hold(piece, offset, data)))
        };
        let Some((cancel, done, spilled)) = received else {
            tracing::debug!(peer = %self.addr, ?block, "dropped a block another peer delivered first");
            return self.fill_requests(sink).await;
        };
        if let Some(data) = spilled {
            // Memory is short: this block goes to the file now.
            let storage = self.torrent.storage.clone();
            let written =
                tokio::task::spawn_blocking(move || storage.write_block(piece, offset, &data))
                    .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(self.storage_failed(e.to_string())),
                Err(e) => return Err(self.storage_failed(e.to_string())),
            }
        }
        {
            let st = self.torrent.lock();
            for key in cancel {
                if let Some(p) = st.peers.get(&key) {
                    let _ = p.tx.send(Cmd::Cancel(block));
                }
            }
        }
        if done {
            let (mut blocks, suspected) = {
                let mut st = self.torrent.lock();
                (st.assembly.take(piece), st.suspected(piece))
            };
            let storage = self.torrent.storage.clone();
            let expected = self.torrent.meta.piece_hashes[piece as usize];
            let stored = tokio::task::spawn_blocking(move || {
                storage
                    .store_piece(piece, &mut blocks, &expected)
                    .map(|stored| {
                        // Which peer sent a wrong block is told by comparing the blocks of a
                        // failed piece with the same piece once it passes (Torrent::blame).
                        let digests = if stored == Stored::Mismatch || suspected {
                            block_digests(&blocks)
                        } else {
                            Vec::new()
                        };
                        (stored, blocks, digests)
                    })
            })
            .await;
            let (stored, blocks, digests) = match stored {
                Ok(Ok(stored)) => stored,
                Ok(Err(e)) => return Err(self.storage_failed(e.to_string())),
                Err(e) => return Err(self.storage_failed(e.to_string())),
            };
            let ok = stored != Stored::Mismatch;
            let mut st = self.torrent.lock();
            let senders = st.picker.verified(piece, ok);
            if ok {
                self.torrent.convict(&mut st, piece, &digests);
                if stored == Stored::Whole {
                    st.assembly.keep_verified(piece, blocks);
                }
                self.torrent.piece_verified(&mut st, piece);
            } else {
                tracing::warn!(torrent = %self.torrent.info_hash(), piece, "piece failed its hash; fetching it again");
                self.torrent.blame(&mut st, piece, &senders, &digests);
            }
        }
        self.fill_requests(sink).await
    }
}

/// SHA-1 of each held block of a piece, by offset.
fn block_digests(blocks: &[(u32, bytes::Bytes)]) -> Vec<(u32, [u8; 20])> {
    blocks
        .iter()
        .map(|(offset, data)| (*offset, crate::storage::piece_hash(data)))
        .collect()
}

/// Writes `msgs` with one flush at the end.
async fn send_all(sink: &mut Sink, msgs: Vec<Message>) -> Result<(), End> {
    written(async {
        for msg in msgs {
            sink.feed(msg).await?;
        }
        sink.flush().await
    })
    .await
}

async fn send(sink: &mut Sink, msg: Message) -> Result<(), End> {
    written(sink.send(msg)).await
}

/// A write to the peer, bounded by [`WRITE_TIMEOUT`]: a peer that stops reading is dropped.
async fn written(write: impl Future<Output = Result<(), WireError>>) -> Result<(), End> {
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(End::Closed(format!("writing: {e}"))),
        Err(_) => Err(End::Closed("peer stopped reading".into())),
    }
}
