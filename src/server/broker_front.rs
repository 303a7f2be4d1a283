//! The MQTT ports as clients see them: a front that relays each connection to the embedded
//! broker and keeps the topic rules rumqttd has no hook for.
//!
//! rumqttd checks logins (see `broker`), but a client it let in may subscribe to `#` and
//! publish anywhere. Every golden image carries the enrollment token, so every student could
//! read the whole fleet's events and commands, or publish an empty retained message over a
//! command other machines pick up when they connect. Upstream would need a subscribe and
//! publish authorization callback; until then rumqttd listens on loopback only, and this
//! front relays each client to it, packet by packet, applying
//! [`machine_may_subscribe`] and [`machine_may_publish`] to everything a machine's login
//! sends:
//!
//! - a SUBSCRIBE with a filter outside the rules is answered here with a SUBACK of failures
//!   (0x80 for every filter: MQTT 3.1.1's "not subscribed") and never reaches the broker;
//! - a PUBLISH outside the rules is dropped, acknowledged at QoS 1 as MQTT 3.1.1 brokers do
//!   with ACLs (so the client does not resend it forever), and closes the connection at
//!   QoS 2, which no BootTorrent client uses;
//! - a CONNECT whose last will is outside the rules is refused with CONNACK 5 (not
//!   authorized) before the broker sees it.
//!
//! - a machine's PUBLISH and last will lose their retain flag: rumqttd keeps retained
//!   messages in memory only, the server hears every status live, and rumqttd matches every
//!   retained message against every later subscription (docs/architecture.md).
//!
//! The operator's `admin` sessions (rumqttd admits them only with the admin token) pass
//! unfiltered. Each refusal is counted in `/metrics` and logged at most once per interval.
//!
//! The front also keeps rumqttd below its `max_connections`. At that limit rumqttd sends no
//! CONNACK, and the refused client's next attempt with the same id panics inside rumqttd
//! and poisons its table of last wills: from then on every login and every disconnect
//! panics, no will is published, and nobody can connect until a restart (issue #17). So the
//! front relays at most [`broker::client_limit`] clients (rumqttd's limit less the server's
//! own links) over its listeners together; one more is answered CONNACK 3 (server
//! unavailable) before the broker sees it, counted and logged once per interval. A slot
//! belongs to a client id, not a connection: rumqttd keeps one connection per client id, so
//! a machine reconnecting while its old session lingers shares that session's slot and takes
//! it over. A slot is given back only once rumqttd has closed its side of every session of
//! that id: rumqttd queues the disconnect for its router before it closes, so the router
//! always takes the disconnect before the CONNECT of whoever gets the slot next. Ids the
//! server has never seen share only the slots beside room for every known machine
//! ([`Front::slot`]), since any student can log in under made-up ids. Listeners a broker file adds
//! are served by rumqttd directly and not counted here; if their clients fill rumqttd's
//! table, a login relayed here that rumqttd then drops leaves that client id stranded, and
//! the front refuses it from then on rather than let its retry crash rumqttd
//! ([`Front::strand`]).
//!
//! Logins queue here, at most [`CONNECTING`] of them unanswered in rumqttd at once, and a
//! login whose client id has an earlier session here whose client already left waits until
//! rumqttd has closed that session ([`Front::turn`]), so that a login that timed out in a
//! power-on storm is dropped unread, or at least cannot reach rumqttd after its retry and
//! drop the retry's live session. A session whose client is still connected is neither waited for nor ended:
//! rumqttd's login check decides whether a new login of its id may take it over.
//!
//! Everything else is relayed as it came, whole packets at a time, so that a SUBACK or PUBACK
//! made here never lands inside a packet from the broker. The login itself stays rumqttd's
//! (its callback is `broker::Authenticator`); the front only reads who logs in.
//!
//! Tasks: one accept loop per listener and one task per connection, tracked so that shutdown
//! waits for them; shutdown closes every connection (agents reconnect).
//!
//! [`broker::client_limit`]: crate::server::broker::client_limit

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use boottorrent_proto::{MachineId, machine_may_publish, machine_may_subscribe};
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self, FixedHeader, QoS};
use rumqttc::{
    ConnAck, ConnectReturnCode, PubAck, Publish, SubAck, Subscribe, SubscribeReasonCode,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::server::broker::{ADMIN_USER, Admissions, Expected};
use crate::server::health::Health;
use crate::server::keyring::Keyring;
use crate::server::listener::{Throttle, TlsAcceptor, accept};
use crate::server::metrics::{Metrics, MqttRefusal};

/// How long a new connection has to send CONNECT (and to finish its TLS handshake): the
/// same as the broker's `connection_timeout_ms`, so idle sockets cannot pile up here either.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How many logins rumqttd may have in hand at once; more wait here (see [`Front::turn`]).
/// rumqttd takes connections one at a time, so a few keep it busy, and a longer queue there
/// only holds logins whose clients may give up before it reaches them.
const CONNECTING: usize = 16;

/// The retain flag in a PUBLISH's first byte.
const PUBLISH_RETAIN: u8 = 0x01;

/// What the fronts of the MQTT listeners share: where the broker listens, how big a packet
/// may be, and the slots of the clients relayed to it.
pub struct Front {
    /// rumqttd's listener on loopback.
    broker: SocketAddr,
    /// The broker's `max_payload_size`: larger packets are refused here as there.
    max_packet: usize,
    /// One permit per client the broker may take; held until rumqttd closed its side.
    slots: Arc<Semaphore>,
    /// The slot of each client id with a session here, shared by all its sessions.
    by_id: Mutex<HashMap<String, Weak<IdSlot>>>,
    /// The number of slots, for messages.
    max_clients: usize,
    /// Machines the server has seen: their logins may use every slot, while ids it has never
    /// seen share what is left beside room for all of them (see [`Front::slot`]).
    keyring: Keyring,
    /// Slots held by ids that were new at login and were not known at the last recount.
    new_ids: Arc<AtomicUsize>,
    /// When `new_ids` was last recounted.
    recounted: Mutex<Option<Instant>>,
    /// One permit per login relayed to rumqttd and not answered yet ([`CONNECTING`]).
    connecting: Arc<Semaphore>,
    /// Which relayed logins our login check admitted.
    admissions: Admissions,
    /// Client ids rumqttd refused after taking their last will (see [`Front::strand`]).
    stranded: Mutex<HashSet<String>>,
    health: Health,
    metrics: Arc<Metrics>,
    /// One log line per interval for each kind of refusal and for an unreachable broker.
    logs: Mutex<Logs>,
}

#[derive(Default)]
struct Logs {
    subscribe: Throttle,
    publish: Throttle,
    will: Throttle,
    limit: Throttle,
    new_ids: Throttle,
    stranded: Throttle,
    broker: Throttle,
}

/// A client id's place among the broker's connections, counted in `/metrics` while held.
///
/// All sessions of one client id share it: rumqttd holds at most one connection per client
/// id (a new login drops the older one first), so a machine that reconnects while its stale
/// session lingers takes that session over even when every slot is taken.
struct IdSlot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
    /// Counted in [`Front::new_ids`] (the id was new at login and not known at the last
    /// recount), and that counter.
    new_id: AtomicBool,
    new_ids: Arc<AtomicUsize>,
    /// One token per session of this id whose client has left while its relay to rumqttd is
    /// still open, cancelled when rumqttd closed that relay (see [`Front::turn`]).
    gone: Mutex<Vec<CancellationToken>>,
}

impl IdSlot {
    /// Stops counting the slot as a new id's, once.
    fn uncount_new_id(&self) {
        if self.new_id.swap(false, Ordering::Relaxed) {
            self.new_ids.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for IdSlot {
    fn drop(&mut self) {
        self.metrics.mqtt_connection_closed();
        self.uncount_new_id();
    }
}

/// One session's hold on its client id's slot; the slot is freed with its last session.
struct Slot<'a> {
    front: &'a Front,
    client_id: String,
    slot: Option<Arc<IdSlot>>,
}

impl Slot<'_> {
    fn shared(&self) -> &IdSlot {
        self.slot.as_ref().expect("the slot is held until dropped")
    }
}

/// A session's place in its id's list of gone sessions, from when its client left until
/// rumqttd closed the relay (or the server shuts down).
struct Gone<'a> {
    slot: &'a IdSlot,
    token: CancellationToken,
}

impl<'a> Gone<'a> {
    fn enter(slot: &'a IdSlot) -> Gone<'a> {
        let token = CancellationToken::new();
        lock(&slot.gone).push(token.clone());
        Gone { slot, token }
    }
}

impl Drop for Gone<'_> {
    fn drop(&mut self) {
        self.token.cancel();
        lock(&self.slot.gone).retain(|t| !t.is_cancelled());
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut by_id = self.front.by_id.lock().unwrap_or_else(|e| e.into_inner());
        // Dropped under the lock, so that no session finds the slot between its last
        // holder leaving and its entry going.
        self.slot = None;
        if by_id
            .get(&self.client_id)
            .is_some_and(|slot| slot.strong_count() == 0)
        {
            by_id.remove(&self.client_id);
        }
    }
}

/// Who is logged in on a connection, as far as topics go.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    /// The operator's tools, admitted by the broker only with the admin token.
    Admin,
    /// A machine; the broker admits the id only with the enrollment token or its key.
    Machine(MachineId),
    /// An id no machine can have: the broker refuses the login; nothing passes meanwhile.
    Nobody,
}

impl Role {
    fn of(client_id: &str, username: Option<&str>) -> Role {
        if username == Some(ADMIN_USER) {
            return Role::Admin;
        }
        client_id.parse().map_or(Role::Nobody, Role::Machine)
    }

    fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Role::Admin => true,
            Role::Machine(m) => machine_may_subscribe(m, filter),
            Role::Nobody => false,
        }
    }

    fn may_publish(&self, topic: &str) -> bool {
        match self {
            Role::Admin => true,
            Role::Machine(m) => machine_may_publish(m, topic),
            Role::Nobody => false,
        }
    }
}

/// Relays clients of `listener` (over TLS with `tls`) to the broker until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    front: Arc<Front>,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    let mut accept_log = Throttle::default();
    while let Some((stream, remote)) =
        accept(&listener, &shutdown, &mut accept_log, "an MQTT", || {}).await
    {
        let _ = stream.set_nodelay(true);
        let front = front.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let result = match tls {
                None => front.relay(stream, remote, &shutdown).await,
                Some(tls) => {
                    match tokio::time::timeout(CONNECT_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(stream)) => front.relay(stream, remote, &shutdown).await,
                        Ok(Err(e)) => Err(RelayError::Closed(format!("TLS handshake: {e}"))),
                        Err(_) => Err(RelayError::Closed("no TLS handshake in time".into())),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%remote, "MQTT connection closed: {e}");
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// Why a login found no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Full {
    /// Every slot is taken.
    All,
    /// The id is new, and the slots beside room for every known machine are taken.
    NewIds,
}

/// Why a relayed connection ended early.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("{0}")]
    Closed(String),
    #[error("malformed MQTT packet: {0:?}")]
    Malformed(mqttbytes::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Front {
    /// A front for the broker at `broker` that relays at most `max_clients` clients at once
    /// (see [`crate::server::broker::client_limit`]).
    pub fn new(
        broker: SocketAddr,
        max_packet: usize,
        max_clients: usize,
        admissions: Admissions,
        keyring: Keyring,
        health: Health,
        metrics: Arc<Metrics>,
    ) -> Front {
        metrics.set_mqtt_client_limit(max_clients);
        Front {
            broker,
            max_packet,
            // `client_limit` keeps it far below the semaphore's maximum; clamp regardless.
            slots: Arc::new(Semaphore::new(max_clients.min(Semaphore::MAX_PERMITS))),
            connecting: Arc::new(Semaphore::new(CONNECTING)),
            by_id: Mutex::default(),
            max_clients,
            keyring,
            new_ids: Arc::default(),
            recounted: Mutex::default(),
            admissions,
            stranded: Mutex::default(),
            health,
            metrics,
            logs: Mutex::default(),
        }
    }

    /// `Some(lines suppressed)` when the log line `which` picks may be written now.
    fn log(&self, which: fn(&mut Logs) -> &mut Throttle) -> Option<u64> {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        which(&mut logs).due()
    }

    async fn relay<S>(
        &self,
        mut client: S,
        remote: SocketAddr,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut from_client = BytesMut::with_capacity(1024);
        let (header, connect) = tokio::time::timeout(CONNECT_TIMEOUT, async {
            loop {
                if let Some(frame) = self.next_frame(&mut from_client)? {
                    return Ok::<_, RelayError>(frame);
                }
                if client.read_buf(&mut from_client).await? == 0 {
                    return Err(RelayError::Closed("closed before CONNECT".into()));
                }
            }
        })
        .await
        .map_err(|_| RelayError::Closed("no CONNECT in time".into()))??;
        if !matches!(header.packet_type(), Ok(mqttbytes::PacketType::Connect)) {
            return Err(RelayError::Closed("the first packet is not CONNECT".into()));
        }
        let mut parsed =
            rumqttc::Connect::read(header, connect.clone()).map_err(RelayError::Malformed)?;
        let role = Role::of(
            &parsed.client_id,
            parsed.login.as_ref().map(|l| l.username.as_str()),
        );
        let connect = match &mut parsed.last_will {
            Some(will) if will.retain && role != Role::Admin => {
                will.retain = false;
                let mut unretained = BytesMut::with_capacity(connect.len());
                parsed
                    .write(&mut unretained)
                    .map_err(RelayError::Malformed)?;
                unretained.freeze()
            }
            _ => connect,
        };
        if let Some(will) = &parsed.last_will {
            if !role.may_publish(&will.topic) {
                self.refused(MqttRefusal::Will, &role, remote, &will.topic);
                return refuse(&mut client, ConnectReturnCode::NotAuthorized).await;
            }
        }

        let slot = match self.slot(&parsed.client_id, &role) {
            Ok(slot) => slot,
            Err(full) => {
                self.over_limit(&parsed.client_id, remote, full);
                return refuse(&mut client, ConnectReturnCode::ServiceUnavailable).await;
            }
        };
        let Some(connecting) = self
            .turn(slot.shared(), &mut client, &mut from_client, shutdown)
            .await?
        else {
            return Ok(());
        };
        if self.is_stranded(&parsed.client_id) {
            if let Some(suppressed) = self.log(|l| &mut l.stranded) {
                let client_id: String = parsed.client_id.chars().take(64).collect();
                tracing::warn!(
                    ?client_id,
                    %remote,
                    suppressed,
                    "refused an MQTT connection with CONNACK 3 (server unavailable): the \
                     broker would crash on this client id until the server restarts (see \
                     /healthz)"
                );
            }
            return refuse(&mut client, ConnectReturnCode::ServiceUnavailable).await;
        }
        let mut broker = TcpStream::connect(self.broker).await.inspect_err(|e| {
            if let Some(suppressed) = self.log(|l| &mut l.broker) {
                tracing::error!(
                    error = %e,
                    suppressed,
                    broker = %self.broker,
                    "cannot reach the embedded MQTT broker for a client; see /healthz"
                );
            }
        })?;
        let _ = broker.set_nodelay(true);
        let password = parsed.login.as_ref().map_or("", |l| l.password.as_str());
        let mut unanswered = Some((
            self.admissions.expect(&parsed.client_id, password),
            connecting,
        ));
        let result = self
            .session(
                &mut client,
                &mut broker,
                connect,
                from_client,
                &role,
                remote,
                &mut unanswered,
                shutdown,
            )
            .await;
        // The client is done with; the slot is not until rumqttd let go of the session.
        drop(client);
        let gone = Gone::enter(slot.shared());
        let answered_late = tokio::select! {
            _ = shutdown.cancelled() => return result,
            answered = until_closed(broker) => answered,
        };
        if let Some((expected, _connecting)) = unanswered {
            // rumqttd closed without a word after our check admitted the login: its router
            // refused it (rumqttd's table full), and rumqttd keeps the client's will entry.
            // A keep-alive of 0 is refused after the check too, but before that entry.
            if !answered_late && expected.admitted() && parsed.keep_alive != 0 {
                self.strand(&parsed.client_id, remote);
            }
        }
        // Only now may a login held behind this one go on: had rumqttd refused this one, it
        // must find the id stranded.
        drop(gone);
        drop(slot);
        result
    }

    /// Waits until a login may be relayed: once rumqttd has closed every earlier session of
    /// the same client id whose client already left, and has fewer than [`CONNECTING`]
    /// logins unanswered. `None` when this client leaves (or the server stops) meanwhile: it
    /// is then never relayed.
    ///
    /// In a power-on storm a CONNECT could sit in rumqttd's queue longer than the client
    /// waits for its CONNACK. The client gave up and logged in again, and when rumqttd took
    /// the stale CONNECT after the new one, it dropped the new, live session as a duplicate
    /// (3,000 agents at once: 211-551 sessions dropped). So logins queue here, where one
    /// whose client gives up is dropped unread, and a retry waits for a stale relay of its id
    /// to close, which keeps rumqttd's order the client's order. A session whose client is
    /// still connected is never waited for nor ended here: whether a second login of its id
    /// may take it over is rumqttd's login check to decide, so that a holder of the
    /// enrollment token who logs in under a machine's id is refused while the machine stays
    /// connected.
    async fn turn<S>(
        &self,
        slot: &IdSlot,
        client: &mut S,
        from_client: &mut BytesMut,
        shutdown: &CancellationToken,
    ) -> Result<Option<OwnedSemaphorePermit>, RelayError>
    where
        S: AsyncRead + Unpin,
    {
        let earlier: Vec<CancellationToken> = lock(&slot.gone).clone();
        let ready = async {
            for token in &earlier {
                token.cancelled().await;
            }
            self.connecting.clone().acquire_owned().await
        };
        tokio::pin!(ready);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                // The semaphore is never closed.
                permit = &mut ready => return Ok(permit.ok()),
                read = client.read_buf(from_client) => {
                    if read? == 0 {
                        return Ok(None);
                    }
                    if from_client.len() > self.max_packet {
                        return Err(RelayError::Closed(
                            "sent more than a packet before its CONNACK".into(),
                        ));
                    }
                }
            }
        }
    }

    /// The slot of `client_id`: the one its other sessions hold, else a free one, if any.
    ///
    /// Every golden image carries the enrollment token, and rumqttd admits any id the server
    /// has never seen with it; so a student could hold every slot with made-up ids and shut
    /// the lab's machines out. Ids the server has never seen therefore share only the slots
    /// beside room for every known machine (`max_clients` less the known machines): a known
    /// machine always finds its slot. An id that became known while its session lasts stops
    /// counting as new at the next recount, which a refusal triggers (at most once a second,
    /// so that refused logins cannot keep this lock busy).
    fn slot(&self, client_id: &str, role: &Role) -> Result<Slot<'_>, Full> {
        let mut by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        let shared = by_id.get(client_id).and_then(Weak::upgrade);
        let slot = match shared {
            Some(slot) => slot,
            None => {
                let new_id = match role {
                    Role::Machine(machine) => self.keyring.get(machine.as_str()).is_none(),
                    // The operator's logins and ids no machine can have: rumqttd admits the
                    // first only with the admin token and refuses the second, at once.
                    Role::Admin | Role::Nobody => false,
                };
                let permit = self
                    .slots
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| Full::All)?;
                if new_id {
                    let room = self.max_clients.saturating_sub(self.keyring.known());
                    if self.new_ids.load(Ordering::Relaxed) >= room
                        && self.recount_new_ids(&by_id) >= room
                    {
                        return Err(Full::NewIds);
                    }
                }
                self.metrics.mqtt_connection_opened();
                if new_id {
                    self.new_ids.fetch_add(1, Ordering::Relaxed);
                }
                let slot = Arc::new(IdSlot {
                    _permit: permit,
                    metrics: self.metrics.clone(),
                    new_id: AtomicBool::new(new_id),
                    new_ids: self.new_ids.clone(),
                    gone: Mutex::default(),
                });
                by_id.insert(client_id.to_owned(), Arc::downgrade(&slot));
                slot
            }
        };
        Ok(Slot {
            front: self,
            client_id: client_id.to_owned(),
            slot: Some(slot),
        })
    }

    /// Stops counting the slots of ids that have become known since their login; the count
    /// of new ids' slots after that.
    fn recount_new_ids(&self, by_id: &HashMap<String, Weak<IdSlot>>) -> usize {
        let mut recounted = lock(&self.recounted);
        if recounted.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            *recounted = Some(Instant::now());
            for (id, slot) in by_id {
                if let Some(slot) = slot.upgrade()
                    && slot.new_id.load(Ordering::Relaxed)
                    && self.keyring.get(id).is_some()
                {
                    slot.uncount_new_id();
                }
            }
        }
        self.new_ids.load(Ordering::Relaxed)
    }

    fn is_stranded(&self, client_id: &str) -> bool {
        let stranded = self.stranded.lock().unwrap_or_else(|e| e.into_inner());
        !stranded.is_empty() && stranded.contains(client_id)
    }

    /// Refuses `client_id` from now on. rumqttd (0.20) keeps the last-will entry of a login
    /// its router refused, and the next login with that id panics on it while holding the
    /// table of wills, which then fails every login and disconnect until a restart. So the
    /// id is answered CONNACK 3 here until the server restarts, and `/healthz` says so: one
    /// machine shut out instead of all. It happens only when clients of a listener the front
    /// does not count fill rumqttd's table.
    fn strand(&self, client_id: &str, remote: SocketAddr) {
        let count = {
            let mut stranded = self.stranded.lock().unwrap_or_else(|e| e.into_inner());
            stranded.insert(client_id.to_owned());
            stranded.len()
        };
        let client_id: String = client_id.chars().take(64).collect();
        tracing::error!(
            ?client_id,
            %remote,
            "the embedded MQTT broker refused a login at its max_connections; the client \
             id is refused from now on, as rumqttd would crash on it"
        );
        self.health.degraded(
            "mqtt_stranded",
            format!(
                "{count} MQTT client id(s) cannot log in until the server restarts, the last \
                 {client_id:?}: rumqttd refused them when clients of a listener from the \
                 broker file filled its max_connections, and would crash on their next login"
            ),
        );
    }

    /// Relays one session after CONNECT until either side closes it.
    #[allow(clippy::too_many_arguments)]
    async fn session<S>(
        &self,
        client: &mut S,
        broker: &mut TcpStream,
        connect: Bytes,
        mut from_client: BytesMut,
        role: &Role,
        remote: SocketAddr,
        unanswered: &mut Option<(Expected, OwnedSemaphorePermit)>,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        broker.write_all(&connect).await?;
        let mut from_broker = BytesMut::with_capacity(1024);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                read = client.read_buf(&mut from_client) => {
                    if read? == 0 {
                        return Ok(());
                    }
                    while let Some((header, frame)) = self.next_frame(&mut from_client)? {
                        self.client_packet(header, frame, role, remote, client, broker)
                            .await?;
                    }
                    from_client.reserve(1024);
                }
                read = broker.read_buf(&mut from_broker) => {
                    if read? == 0 {
                        return Ok(());
                    }
                    // The broker answered (its CONNACK): the password is forgotten, and
                    // the next login may go to rumqttd.
                    *unanswered = None;
                    // Whole packets only, so that answers made here never split one.
                    while let Some((_, frame)) = self.next_frame(&mut from_broker)? {
                        client.write_all(&frame).await?;
                    }
                    from_broker.reserve(1024);
                }
            }
        }
    }

    /// Passes one packet from the client to the broker, or answers it here.
    async fn client_packet<S: AsyncWrite + Unpin>(
        &self,
        header: FixedHeader,
        frame: Bytes,
        role: &Role,
        remote: SocketAddr,
        client: &mut S,
        broker: &mut TcpStream,
    ) -> Result<(), RelayError> {
        let mut answer = BytesMut::new();
        match header.packet_type().map_err(RelayError::Malformed)? {
            mqttbytes::PacketType::Connect => {
                return Err(RelayError::Closed("a second CONNECT".into()));
            }
            mqttbytes::PacketType::Subscribe if *role != Role::Admin => {
                let subscribe =
                    Subscribe::read(header, frame.clone()).map_err(RelayError::Malformed)?;
                if let Some(refused) = subscribe
                    .filters
                    .iter()
                    .find(|f| !role.may_subscribe(&f.path))
                {
                    self.refused(MqttRefusal::Subscribe, role, remote, &refused.path);
                    let failures = vec![SubscribeReasonCode::Failure; subscribe.filters.len()];
                    SubAck::new(subscribe.pkid, failures)
                        .write(&mut answer)
                        .map_err(RelayError::Malformed)?;
                }
            }
            mqttbytes::PacketType::Publish if *role != Role::Admin => {
                let publish =
                    Publish::read(header, frame.clone()).map_err(RelayError::Malformed)?;
                let topic = &publish.topic;
                if !role.may_publish(topic) {
                    self.refused(MqttRefusal::Publish, role, remote, topic);
                    match publish.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => {
                            PubAck::new(publish.pkid)
                                .write(&mut answer)
                                .map_err(RelayError::Malformed)?;
                        }
                        QoS::ExactlyOnce => {
                            return Err(RelayError::Closed(format!(
                                "a QoS 2 publish on {topic:?}, which it may not publish on"
                            )));
                        }
                    }
                    client.write_all(&answer).await?;
                    return Ok(());
                }
                if publish.retain {
                    let mut unretained = frame.to_vec();
                    unretained[0] &= !PUBLISH_RETAIN;
                    broker.write_all(&unretained).await?;
                    return Ok(());
                }
            }
            _ => {}
        }
        if answer.is_empty() {
            broker.write_all(&frame).await?;
        } else {
            client.write_all(&answer).await?;
        }
        Ok(())
    }

    /// Splits the next whole packet off `buf`, if it holds one.
    fn next_frame(&self, buf: &mut BytesMut) -> Result<Option<(FixedHeader, Bytes)>, RelayError> {
        match mqttbytes::check(buf.iter(), self.max_packet) {
            Ok(header) => Ok(Some((header, buf.split_to(header.frame_length()).freeze()))),
            Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(RelayError::Malformed(e)),
        }
    }

    /// Counts and logs (once per interval) a client refused because the broker is full.
    fn over_limit(&self, client_id: &str, remote: SocketAddr, full: Full) {
        // The id is the client's choice: shown escaped and bounded.
        let client_id: String = client_id.chars().take(64).collect();
        match full {
            Full::All => {
                self.metrics.mqtt_connection_over_limit();
                if let Some(suppressed) = self.log(|l| &mut l.limit) {
                    tracing::warn!(
                        ?client_id,
                        %remote,
                        suppressed,
                        "refused an MQTT connection with CONNACK 3 (server unavailable): {} \
                         clients are connected, all that the broker's max_connections leaves \
                         room for (raise [router] max_connections in the broker file); it is \
                         admitted when one leaves (more refusals are counted in \
                         boottorrent_mqtt_connections_over_limit_total)",
                        self.max_clients
                    );
                }
            }
            Full::NewIds => {
                self.metrics.mqtt_new_id_over_limit();
                if let Some(suppressed) = self.log(|l| &mut l.new_ids) {
                    tracing::warn!(
                        ?client_id,
                        %remote,
                        suppressed,
                        known_machines = self.keyring.known(),
                        max_clients = self.max_clients,
                        "refused an MQTT login of a machine id the server has never seen with \
                         CONNACK 3 (server unavailable): the slots beside room for every known \
                         machine are taken by other new ids (a first enrolment larger than the \
                         broker's max_connections leaves room for, or made-up ids holding \
                         connections open; raise [router] max_connections or delete machines \
                         that will not come back); it is admitted when one leaves (counted in \
                         boottorrent_mqtt_new_ids_over_limit_total)"
                    );
                }
            }
        }
    }

    fn refused(&self, what: MqttRefusal, role: &Role, remote: SocketAddr, topic: &str) {
        self.metrics.mqtt_refused(what);
        let which: fn(&mut Logs) -> &mut Throttle = match what {
            MqttRefusal::Subscribe => |l| &mut l.subscribe,
            MqttRefusal::Publish => |l| &mut l.publish,
            MqttRefusal::Will => |l| &mut l.will,
        };
        if let Some(suppressed) = self.log(which) {
            let who = match role {
                Role::Machine(m) => m.as_str().to_owned(),
                Role::Admin | Role::Nobody => "an unknown login".to_owned(),
            };
            // The topic is the client's choice: shown escaped and bounded.
            let topic: String = topic.chars().take(128).collect();
            tracing::warn!(
                machine = %who,
                %remote,
                ?topic,
                suppressed,
                "refused MQTT {}: a machine may read only global, zone and its own commands, \
                 and publish only its own events (more refusals are counted in \
                 boottorrent_mqtt_refused_total)",
                what.as_str()
            );
        }
    }
}

/// Half-closes the front's side of a relayed session and waits until rumqttd closed its side.
/// rumqttd sends its router the disconnect before it closes the socket, and the router takes
/// events in order, so after this a new CONNECT cannot find the old session still counted.
/// Keeping our side open for reading also lets rumqttd's CONNACK write succeed when the
/// client left at once: a failed CONNACK write would leave the session in rumqttd's table
/// forever.
///
/// Returns whether rumqttd sent anything meanwhile.
async fn until_closed(mut broker: TcpStream) -> bool {
    let _ = broker.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut answered = false;
    while let Ok(n) = broker.read(&mut sink).await {
        if n == 0 {
            break;
        }
        answered = true;
    }
    answered
}

/// Answers a CONNECT with a refusal CONNACK.
async fn refuse<S: AsyncWrite + Unpin>(
    client: &mut S,
    code: ConnectReturnCode,
) -> Result<(), RelayError> {
    let mut out = BytesMut::new();
    ConnAck::new(code, false)
        .write(&mut out)
        .map_err(RelayError::Malformed)?;
    client.write_all(&out).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_the_login() {
        assert_eq!(Role::of("admin-cli", Some("admin")), Role::Admin);
        assert_eq!(
            Role::of("pc-1", Some("pc-1")),
            Role::Machine("pc-1".parse().unwrap())
        );
        assert_eq!(Role::of("not a machine", Some("x")), Role::Nobody);
        assert!(Role::Admin.may_subscribe("#"));
        assert!(!Role::Nobody.may_subscribe("boottorrent/cmd/global/#"));
        assert!(!Role::Machine("pc-1".parse().unwrap()).may_subscribe("#"));
    }

    fn machine(id: &str) -> Role {
        Role::Machine(id.parse().unwrap())
    }

    #[test]
    fn sessions_of_one_client_id_share_its_slot_and_the_last_frees_it() {
        let metrics = Arc::new(Metrics::default());
        let front = Front::new(
            "127.0.0.1:1".parse().unwrap(),
            100,
            2,
            Admissions::default(),
            Keyring::default(),
            Health::default(),
            metrics.clone(),
        );
        let a1 = front.slot("pc-a", &machine("pc-a")).unwrap();
        let a2 = front.slot("pc-a", &machine("pc-a")).unwrap();
        let b = front.slot("pc-b", &machine("pc-b")).unwrap();
        assert_eq!(
            front.slot("pc-c", &machine("pc-c")).err(),
            Some(Full::All),
            "two ids hold both slots"
        );
        assert_eq!(metrics.snapshot().mqtt_connections_open, 2);
        drop(a1);
        assert!(
            front.slot("pc-c", &machine("pc-c")).is_err(),
            "pc-a's other session holds its slot"
        );
        drop(a2);
        let c = front.slot("pc-c", &machine("pc-c")).unwrap();
        drop((b, c));
        assert_eq!(metrics.snapshot().mqtt_connections_open, 0);
        assert!(
            front.by_id.lock().unwrap().is_empty(),
            "no entry outlives its id"
        );
    }

    #[test]
    fn new_ids_leave_room_for_every_known_machine() {
        let keyring = Keyring::default();
        let key = boottorrent_proto::PublicKeyBytes::from([7u8; 32]);
        keyring.set(&"pc-known".parse().unwrap(), key, true);
        let metrics = Arc::new(Metrics::default());
        let front = Front::new(
            "127.0.0.1:1".parse().unwrap(),
            100,
            3,
            Admissions::default(),
            keyring.clone(),
            Health::default(),
            metrics.clone(),
        );
        let new_a = front.slot("pc-a", &machine("pc-a")).unwrap();
        let new_b = front.slot("pc-b", &machine("pc-b")).unwrap();
        assert_eq!(
            front.slot("pc-c", &machine("pc-c")).err(),
            Some(Full::NewIds),
            "the third slot is pc-known's"
        );
        // The operator's logins are not new machines.
        let admin = front.slot("admin-1", &Role::Admin).unwrap();
        drop(admin);

        // pc-a enrols while connected: it is known now, and no longer counted as new once
        // a refusal recounts; room for new ids is 3 less 2 known, which pc-b holds.
        keyring.set(&"pc-a".parse().unwrap(), key, true);
        // (The refusal above recounted; a second recount waits a second otherwise.)
        *front.recounted.lock().unwrap() = None;
        assert_eq!(
            front.slot("pc-c", &machine("pc-c")).err(),
            Some(Full::NewIds)
        );
        assert_eq!(front.new_ids.load(Ordering::Relaxed), 1, "pc-b only");
        let known = front.slot("pc-known", &machine("pc-known")).unwrap();

        // pc-b leaves: its room goes to the next new id.
        drop(new_b);
        drop(known);
        let new_c = front.slot("pc-c", &machine("pc-c")).unwrap();
        drop((new_a, new_c));
        assert_eq!(front.new_ids.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.snapshot().mqtt_connections_open, 0);
    }

    #[test]
    fn frames_are_split_whole_and_oversized_ones_refused() {
        let front = Front::new(
            "127.0.0.1:1".parse().unwrap(),
            100,
            1,
            Admissions::default(),
            Keyring::default(),
            Health::default(),
            Arc::default(),
        );
        let mut buf = BytesMut::new();
        rumqttc::Packet::PingReq.write(&mut buf, 100).unwrap();
        let publish = Publish::new("a/b", QoS::AtMostOnce, vec![7u8; 10]);
        publish.write(&mut buf).unwrap();
        let whole = buf.len();
        let mut partial = BytesMut::from(&buf[..whole - 1]);
        assert!(front.next_frame(&mut partial).unwrap().is_some());
        assert!(
            front.next_frame(&mut partial).unwrap().is_none(),
            "half a packet waits"
        );
        let (_, ping) = front.next_frame(&mut buf).unwrap().unwrap();
        assert_eq!(&ping[..], &[0xc0, 0]);
        let (header, frame) = front.next_frame(&mut buf).unwrap().unwrap();
        assert_eq!(Publish::read(header, frame).unwrap().topic, "a/b");
        assert!(buf.is_empty());
        let mut big = BytesMut::new();
        Publish::new("a", QoS::AtMostOnce, vec![0u8; 200])
            .write(&mut big)
            .unwrap();
        assert!(front.next_frame(&mut big).is_err());
    }
    /// Writes a CONNECT for `client_id` to the front at `addr`.
    async fn connect_as(addr: SocketAddr, client_id: &str) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut out = BytesMut::new();
        rumqttc::Connect::new(client_id).write(&mut out).unwrap();
        stream.write_all(&out).await.unwrap();
        stream
    }

    /// The client id of the CONNECT the front relayed on `relay`.
    async fn relayed_connect(front: &Front, relay: &mut TcpStream) -> String {
        let mut buf = BytesMut::new();
        loop {
            if let Some((header, frame)) = front.next_frame(&mut buf).unwrap() {
                return rumqttc::Connect::read(header, frame).unwrap().client_id;
            }
            assert_ne!(
                relay.read_buf(&mut buf).await.unwrap(),
                0,
                "closed before CONNECT"
            );
        }
    }

    /// Reads `relay` until the front closes its side.
    async fn until_eof(relay: &mut TcpStream) {
        let mut sink = [0u8; 256];
        while relay.read(&mut sink).await.unwrap() != 0 {}
    }

    /// How long nothing must happen for a test to take it that nothing will, and how long
    /// something due may take.
    const QUIET: Duration = Duration::from_millis(300);
    const SOON: Duration = Duration::from_secs(10);

    /// A front for `max_clients` serving on loopback, relaying to `broker`, a listener the
    /// test answers by hand; `stop` shuts it down.
    struct Served {
        broker: TcpListener,
        front: Arc<Front>,
        addr: SocketAddr,
        stop: std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>,
    }

    impl Served {
        async fn start(max_clients: usize) -> Served {
            let broker = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let front = Arc::new(Front::new(
                broker.local_addr().unwrap(),
                1 << 16,
                max_clients,
                Admissions::default(),
                Keyring::default(),
                Health::default(),
                Arc::default(),
            ));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let shutdown = CancellationToken::new();
            let served = tokio::spawn(serve(listener, front.clone(), None, shutdown.clone()));
            let stop = Box::pin(async move {
                shutdown.cancel();
                served.await.unwrap();
            });
            Served {
                broker,
                front,
                addr,
                stop,
            }
        }
    }

    /// rumqttd stands in for by a listener the test answers by hand, so that the test
    /// decides when "the broker" takes a login: a late login is the case under test.
    #[tokio::test]
    async fn a_login_waits_for_a_gone_session_of_its_id_and_never_for_a_live_one() {
        let Served {
            broker,
            front,
            addr,
            stop,
        } = Served::start(10).await;

        // A login the broker has not answered yet when its client gives up.
        let first = connect_as(addr, "pc-1").await;
        let (mut stale, _) = broker.accept().await.unwrap();
        assert_eq!(relayed_connect(&front, &mut stale).await, "pc-1");
        drop(first);
        until_eof(&mut stale).await;

        // The client's retry is held until the broker has closed the stale login...
        let mut retry = connect_as(addr, "pc-1").await;
        assert!(
            tokio::time::timeout(QUIET, broker.accept()).await.is_err(),
            "the retry reached the broker while its stale login was still open there"
        );
        drop(stale);
        let (mut live, _) = tokio::time::timeout(SOON, broker.accept())
            .await
            .expect("the retry is relayed once the stale login is closed")
            .unwrap();
        assert_eq!(relayed_connect(&front, &mut live).await, "pc-1");

        // ...while a login under the id of a session whose client is connected goes to the
        // broker at once (its login check decides), and the live session stays relayed.
        let _intruder = connect_as(addr, "pc-1").await;
        let (mut checked, _) = tokio::time::timeout(SOON, broker.accept())
            .await
            .expect("a login beside a live session is not held")
            .unwrap();
        assert_eq!(relayed_connect(&front, &mut checked).await, "pc-1");
        let mut connack = BytesMut::new();
        ConnAck::new(ConnectReturnCode::Success, false)
            .write(&mut connack)
            .unwrap();
        live.write_all(&connack).await.unwrap();
        let mut answer = vec![0u8; connack.len()];
        tokio::time::timeout(SOON, retry.read_exact(&mut answer))
            .await
            .expect("the live session still relays")
            .unwrap();
        assert_eq!(answer, connack.to_vec());

        // A login held behind a gone session whose own client gives up is never relayed.
        drop(retry);
        until_eof(&mut live).await;
        let waiting = connect_as(addr, "pc-1").await;
        tokio::time::sleep(QUIET).await;
        drop(waiting);
        tokio::time::sleep(QUIET).await;
        drop(live);
        assert!(
            tokio::time::timeout(QUIET, broker.accept()).await.is_err(),
            "a login whose client left while it waited reached the broker"
        );

        stop.await;
    }

    #[tokio::test]
    async fn logins_wait_here_while_the_broker_has_its_fill_unanswered() {
        let Served {
            broker,
            front,
            addr,
            stop,
        } = Served::start(100).await;

        let mut clients = Vec::new();
        let mut relays = Vec::new();
        for n in 0..CONNECTING {
            clients.push(connect_as(addr, &format!("pc-{n}")).await);
            let (mut relay, _) = broker.accept().await.unwrap();
            relayed_connect(&front, &mut relay).await;
            relays.push(relay);
        }
        // One more waits, and one that gives up while it waits is never relayed.
        let gives_up = connect_as(addr, "pc-gives-up").await;
        tokio::time::sleep(QUIET).await;
        let _waits = connect_as(addr, "pc-waits").await;
        assert!(
            tokio::time::timeout(QUIET, broker.accept()).await.is_err(),
            "a login went to a broker with {CONNECTING} unanswered"
        );
        drop(gives_up);
        tokio::time::sleep(QUIET).await;

        // The broker answers one: the next login in line goes on.
        let mut connack = BytesMut::new();
        ConnAck::new(ConnectReturnCode::Success, false)
            .write(&mut connack)
            .unwrap();
        relays[0].write_all(&connack).await.unwrap();
        let (mut next, _) = tokio::time::timeout(SOON, broker.accept())
            .await
            .expect("the waiting login is relayed once the broker answered one")
            .unwrap();
        assert_eq!(relayed_connect(&front, &mut next).await, "pc-waits");

        stop.await;
    }
}
