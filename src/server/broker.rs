//! The embedded MQTT broker (rumqttd).
//!
//! rumqttd runs on threads of its own and cannot be stopped or asked whether its listeners
//! bound, so this module checks everything it can before handing over: the broker config
//! parses, every listen address can be bound, the TLS files are readable PEM with a
//! certificate and a key. After start it waits until the MQTT port accepts connections.
//!
//! Authentication: the client id must equal the username, so that nobody can take over
//! another client's session (rumqttd drops the older connection of a client id). Agents log
//! in with username = their machine id and a password from [`login_password`]: a machine the
//! server has seen must prove it holds the key it registered (see [`Keyring`]); only an id the
//! server has never seen is admitted by the enrollment token alone, because every golden image
//! carries that token. Operator tools log in as `admin` with the admin token. The
//! orchestrator's own client id is refused to everyone.
//!
//! rumqttd has no per-client ACL, so it listens on loopback only and clients reach it through
//! `broker_front`, which keeps each machine to its own topics. What a message may do is then
//! decided by its signature (see `registry`). Listeners a broker file adds besides
//! `[v4.mqtt]` are served by rumqttd directly, without those topic rules and without the
//! front's connection limit (logged at start).
//!
//! rumqttd's `max_connections` is one table for the server's own links and every client. At
//! that limit rumqttd answers no CONNACK and the client's retry wedges it (issue #17; see
//! docs/architecture.md for what upstream would need), so [`client_limit`] leaves the front
//! only what the server does not take itself, and `broker_probe` watches that rumqttd still
//! admits clients.
//!
//! [`login_password`]: boottorrent_proto::login_password

use std::collections::HashMap;
use std::io::BufReader;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use boottorrent_proto::{LoginPassword, MachineId, verifying_key_from_bytes};
use rumqttd::Broker;
use rumqttd::local::{LinkRx, LinkTx};

use crate::server::config::{Config, Secret};
use crate::server::credentials::token_matches;
use crate::server::keyring::Keyring;
use crate::server::metrics::Metrics;
use boottorrent_proto::now_ms;

/// The broker configuration compiled into the binary.
pub const EMBEDDED_CONFIG: &str = include_str!("../../broker.toml");

/// MQTT username of the operator's tools.
pub const ADMIN_USER: &str = "admin";

/// Names (keys under `[v4]`) of the listeners BootTorrent manages.
const PLAIN_LISTENER: &str = "mqtt";
const TLS_LISTENER: &str = "mqtts";

/// The smallest `max_payload_size` the broker may have. rumqttd compares it with the whole
/// packet after the fixed header (topic, packet id, payload), so the largest envelope `proto`
/// accepts needs room for the longest topic besides; agents allow the same.
pub const MIN_PACKET_LIMIT: usize = boottorrent_proto::MAX_PAYLOAD_BYTES + 1024;

/// Client id of the orchestrator's in-process link. A remote client with this id would make
/// rumqttd drop the link, so it is reserved (see [`is_reserved`]).
pub const ORCHESTRATOR_CLIENT_ID: &str = "boottorrent-orchestrator";

/// Ids no machine may have: the server's own (`boottorrent-*`: its broker links, its
/// seeder's passkey), and the operator's sessions (`admin`, or `admin-*` when a tool runs
/// several at once).
pub fn is_reserved(id: &str) -> bool {
    id.starts_with("boottorrent-") || admin_session(id)
}

fn admin_session(client_id: &str) -> bool {
    client_id == ADMIN_USER
        || client_id
            .strip_prefix(ADMIN_USER)
            .is_some_and(|rest| rest.starts_with('-'))
}

/// Links made besides the orchestrator's, for it to fall back on if its link fails.
const SPARE_LINKS: usize = 2;

/// Prefix of the health probe's client ids (see `broker_probe`). Reserved like every
/// `boottorrent-*` id; only the probe's own secret admits it.
pub const PROBE_CLIENT_PREFIX: &str = "boottorrent-probe-";

/// Entries of rumqttd's connection table the server takes itself: the orchestrator's link,
/// its spares and the health probe (a bridge in the broker file takes one more). Clients of
/// the front get the rest (see [`client_limit`]).
const OWN_CONNECTIONS: usize = 1 + SPARE_LINKS + 1;

/// The largest `max_connections` accepted: rumqttd allocates its tables for that many at
/// start, and a mistyped value would abort the process there.
const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

/// Characters rumqttd's router refuses in a client id. The router sees the login only after
/// rumqttd's listener put the client into its table of waiting wills, and the refusal leaves
/// it there: the next login with the same id panics on it and poisons that table, so our
/// login check refuses such ids first.
const CLIENT_ID_FORBIDDEN: &[char] = &['+', '$', '#', '/'];

/// How many clients the front may relay to rumqttd at once: its `max_connections` less the
/// server's own entries, so that rumqttd never reaches its own limit. At that limit rumqttd
/// answers no CONNACK, and the client's retry panics inside it and poisons its table of
/// last wills, after which no client can connect or leave a will until a restart (issue
/// #17); a refusal by the front is a clean CONNACK 3 instead.
pub fn client_limit(config: &rumqttd::Config, origin: &str) -> anyhow::Result<usize> {
    let own = OWN_CONNECTIONS + usize::from(config.bridge.is_some());
    let max = config.router.max_connections;
    if max > MAX_CONNECTIONS_LIMIT {
        bail!(
            "{origin}: [router] max_connections is {max}; rumqttd reserves its tables for that \
             many connections at start, so at most {MAX_CONNECTIONS_LIMIT} is accepted"
        );
    }
    match max.checked_sub(own) {
        Some(clients) if clients > 0 => Ok(clients),
        _ => bail!(
            "{origin}: [router] max_connections is {max}; the server keeps {own} of rumqttd's \
             connections for itself (its broker link, {SPARE_LINKS} spares and the health \
             probe{}), so set at least {} to admit any client",
            if config.bridge.is_some() {
                ", and the bridge"
            } else {
                ""
            },
            own + 1
        ),
    }
}

/// rumqttd panics on its router thread, shutting out every client, when it makes a filter's
/// log with segments smaller than this or with no segment at all.
const MIN_SEGMENT_SIZE: usize = 1024;

/// Most a broker file may let rumqttd keep of each client's own filters together, past which
/// start-up warns: rumqttd frees a filter's messages only when its log is full, so this much
/// memory is taken in the end whether anyone reads them or not.
const CLIENT_LOGS_WARN_BYTES: u128 = 1 << 30;

/// Checks the per-filter logs of a broker file (see broker.toml): refuses limits rumqttd
/// would crash on, and warns when the clients' own filters may hold more than
/// [`CLIENT_LOGS_WARN_BYTES`] together.
fn check_segments(
    router: &rumqttd::RouterConfig,
    clients: usize,
    origin: &str,
) -> anyhow::Result<()> {
    let custom = router.custom_segment.iter().flatten();
    let all = std::iter::once((
        "[router]".to_owned(),
        router.max_segment_size,
        router.max_segment_count,
    ))
    .chain(custom.map(|(filter, c)| {
        (
            format!("[router.custom_segment.\"{filter}\"]"),
            c.max_segment_size,
            c.max_segment_count,
        )
    }));
    for (section, size, count) in all {
        if size < MIN_SEGMENT_SIZE || count == 0 {
            bail!(
                "{origin}: {section} has max_segment_size = {size} and max_segment_count = \
                 {count}; rumqttd needs at least {MIN_SEGMENT_SIZE} bytes and one segment \
                 (the embedded broker.toml keeps 4096 and 2)"
            );
        }
    }
    let per_filter = router.max_segment_size as u128 * router.max_segment_count as u128;
    let together = per_filter * clients as u128;
    if together > CLIENT_LOGS_WARN_BYTES {
        tracing::warn!(
            origin,
            per_filter_bytes = per_filter as u64,
            clients,
            "the broker file lets rumqttd keep up to {} MiB of each client's commands, read or \
             not, {} MiB for all clients: the server's memory grows toward that; the embedded \
             broker.toml keeps 2 x 4 KiB per filter",
            per_filter >> 20,
            together >> 20
        );
    }
    Ok(())
}

/// Open files each client of the front takes: its socket, the front's relay connection to
/// rumqttd, and rumqttd's end of that connection.
const FILES_PER_CLIENT: u64 = 3;

/// Open files kept for everything else besides the HTTP connections: the seeder's peers (its
/// `max_peers`), the database, the images it serves, logs, the tracker and the broker's own
/// links.
const OTHER_FILES: u64 = 1024 + 256;

/// How many clients the front may relay within `open_files` (the soft open-file limit),
/// leaving room for `http_max_connections` (at most a quarter of the files, where they are
/// scarce) and everything else. Past it, accepting more agents would make every later
/// accept fail, HTTP's included, instead of refusing one client cleanly.
pub fn clients_within_open_files(open_files: u64, http_max_connections: u32) -> usize {
    let http = u64::from(http_max_connections).min(open_files / 4);
    let spare = open_files.saturating_sub(http + OTHER_FILES);
    usize::try_from(spare / FILES_PER_CLIENT).unwrap_or(usize::MAX)
}

/// The open-file limit that admits `clients` clients with `http_max_connections`.
pub fn open_files_for(clients: usize, http_max_connections: u32) -> u64 {
    clients as u64 * FILES_PER_CLIENT + u64::from(http_max_connections) + OTHER_FILES
}

/// The logins the front has relayed and not yet seen answered, and whether our login check
/// admitted each: how the front tells rumqttd's refusal at its own limit (admitted, then
/// closed without CONNACK) from a wrong password (closed without CONNACK, never admitted).
/// Keyed by client id and password, so that someone else's failed guess at the same id
/// cannot pass for an admitted login. Passwords stay here only while their login is in
/// flight.
#[derive(Clone, Default)]
pub struct Admissions(Arc<std::sync::Mutex<HashMap<(String, String), InFlight>>>);

#[derive(Default)]
struct InFlight {
    waiting: u32,
    admitted: bool,
}

/// One relayed login waiting for its answer; forgotten when dropped.
pub struct Expected {
    admissions: Admissions,
    key: (String, String),
}

impl Admissions {
    /// Notes that the front relays a login as `client_id` with `password`.
    pub fn expect(&self, client_id: &str, password: &str) -> Expected {
        let key = (client_id.to_owned(), password.to_owned());
        self.lock().entry(key.clone()).or_default().waiting += 1;
        Expected {
            admissions: self.clone(),
            key,
        }
    }

    fn admitted(&self, client_id: &str, password: &str) {
        let mut map = self.lock();
        if map.is_empty() {
            return;
        }
        if let Some(entry) = map.get_mut(&(client_id.to_owned(), password.to_owned())) {
            entry.admitted = true;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), InFlight>> {
        // Every change is one field of one entry: a panic elsewhere leaves it consistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Expected {
    /// Whether our login check admitted a login with this id and password since it was
    /// expected.
    pub fn admitted(&self) -> bool {
        self.admissions
            .lock()
            .get(&self.key)
            .is_some_and(|entry| entry.admitted)
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        let mut map = self.admissions.lock();
        if let Some(entry) = map.get_mut(&self.key) {
            entry.waiting -= 1;
            if entry.waiting == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// A started broker and the orchestrator's link into it.
pub struct Running {
    pub link_tx: LinkTx,
    pub link_rx: LinkRx,
    /// Links the orchestrator may move to: rumqttd makes links only before it starts.
    pub spares: Vec<(LinkTx, LinkRx)>,
}

/// The broker's client side, for `broker_front` to serve.
pub struct Listeners {
    /// Where rumqttd listens, on loopback; clients come through the front.
    pub internal: SocketAddr,
    /// The largest packet rumqttd takes (after the fixed header); the front refuses larger.
    pub max_packet: usize,
    /// The client-facing MQTT listener (`mqtt_listen`), bound, for the front.
    pub plain: TcpListener,
    /// The MQTT-over-TLS listener (`mqtts_listen`) when TLS files are configured.
    pub tls: Option<TcpListener>,
    /// How many clients the front may relay at once, over both listeners ([`client_limit`]).
    pub max_clients: usize,
    /// The health probe's password; it never leaves the process.
    pub probe_secret: Secret,
    /// What our login check admitted of the logins the front relays.
    pub admissions: Admissions,
}

/// Builds the rumqttd config, checks it, binds the client listeners, starts the broker threads
/// and returns the orchestrator's link once rumqttd accepts connections.
pub fn start(
    config: &Config,
    enroll_token: Secret,
    admin_token: Secret,
    keyring: Keyring,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(Running, Listeners)> {
    let (mut broker_config, internal, max_clients) = broker_config(config)?;
    let max_clients = match crate::server::listener::open_file_limit() {
        Some(open_files) => {
            let fit = clients_within_open_files(open_files, config.http_max_connections);
            if fit < max_clients {
                tracing::warn!(
                    open_files,
                    clients = fit,
                    max_connections = broker_config.router.max_connections,
                    needed = open_files_for(max_clients, config.http_max_connections),
                    "the open-file limit admits fewer MQTT clients than the broker's \
                     max_connections: the MQTT ports refuse clients past {fit} with CONNACK 3 \
                     rather than run out of files; raise the service's LimitNOFILE (ulimit -n) \
                     to the `needed` number for the broker's limit"
                );
            }
            fit.min(max_clients).max(1)
        }
        None => max_clients,
    };
    let probe_secret = Secret::new(random_hex(24)?);
    let admissions = Admissions::default();
    let max_packet = broker_config
        .v4
        .as_ref()
        .and_then(|v4| v4.get(PLAIN_LISTENER))
        .map_or(MIN_PACKET_LIMIT, |l| l.connections.max_payload_size);
    let auth = Authenticator {
        enroll_token,
        admin_token,
        keyring,
        login_window_ms: i64::from(config.replay_window_secs) * 1000,
        metrics,
        probe_secret: probe_secret.clone(),
        admissions: admissions.clone(),
    };
    let mut addresses = Vec::new();
    for listeners in [
        broker_config.v4.as_mut(),
        broker_config.v5.as_mut(),
        broker_config.ws.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        for server in listeners.values_mut() {
            let auth = auth.clone();
            // Static `auth` pairs from a user's broker file would bypass our check.
            server.connections.auth = None;
            server.set_auth_handler(move |client_id, user, pass| {
                let ok = auth.check(&client_id, &user, &pass, now_ms());
                async move { ok }
            });
            if server.listen != internal {
                tracing::warn!(
                    listener = %server.name,
                    listen = %server.listen,
                    "this listener from the broker file is served by rumqttd directly: logins \
                     are checked, but not the topic rules that keep a machine to its own topics; \
                     its clients are not counted by the front either, yet each one shares \
                     rumqttd's max_connections with the front's clients: if they fill it, \
                     rumqttd refuses everyone without CONNACK and can wedge (see /healthz)"
                );
                addresses.push((server.name.clone(), server.listen));
            }
        }
    }
    for (name, addr) in &addresses {
        // rumqttd binds on its own thread and only logs a failure; bind here first so that a
        // port in use stops start-up with a message instead of a broker that never answers.
        TcpListener::bind(addr).with_context(|| {
            format!("binding MQTT listener {name:?} on {addr}: is another broker running?")
        })?;
    }
    let bind = |addr: SocketAddr, what: &str| {
        let listener = TcpListener::bind(addr).with_context(|| {
            format!("binding the {what} listener on {addr}: is another broker running?")
        })?;
        listener
            .set_nonblocking(true)
            .with_context(|| format!("setting up the {what} listener on {addr}"))?;
        anyhow::Ok(listener)
    };
    let plain = bind(config.mqtt_listen, "MQTT")?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            check_pem(cert, key)?;
            Some(bind(config.mqtts_listen, "MQTT over TLS")?)
        }
        _ => None,
    };

    let mut broker = Broker::new(broker_config);
    let (link_tx, link_rx) = broker
        .link(ORCHESTRATOR_CLIENT_ID)
        .map_err(|e| anyhow::anyhow!("connecting the orchestrator to the broker: {e:?}"))?;
    let spares = (1..=SPARE_LINKS)
        .map(|n| {
            broker
                .link(&format!("{ORCHESTRATOR_CLIENT_ID}-spare-{n}"))
                .map_err(|e| anyhow::anyhow!("making a spare broker link: {e:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the MQTT broker stopped");
            }
        })
        .context("starting the MQTT broker thread")?;

    wait_until_accepting(internal, Duration::from_secs(10))?;
    Ok((
        Running {
            link_tx,
            link_rx,
            spares,
        },
        Listeners {
            internal,
            max_packet,
            plain,
            tls,
            max_clients,
            probe_secret,
            admissions,
        },
    ))
}

/// The broker config: the embedded or given file, with BootTorrent's listener moved to a free
/// loopback port (returned) behind the front, and how many clients the front may relay.
fn broker_config(config: &Config) -> anyhow::Result<(rumqttd::Config, SocketAddr, usize)> {
    let (text, origin) = match &config.broker_config {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("reading broker config {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (
            EMBEDDED_CONFIG.to_owned(),
            "embedded broker.toml".to_owned(),
        ),
    };
    let mut broker: rumqttd::Config =
        toml::from_str(&text).with_context(|| format!("parsing {origin}"))?;
    let max_clients = client_limit(&broker, &origin)?;
    check_segments(&broker.router, max_clients, &origin)?;
    let v4 = broker.v4.get_or_insert_with(HashMap::new);
    for (name, listener) in v4.iter() {
        if listener.connections.max_payload_size < MIN_PACKET_LIMIT {
            bail!(
                "{origin}: [v4.{name}.connections] max_payload_size is {}; BootTorrent's \
                 messages need {MIN_PACKET_LIMIT} (64 KiB envelopes and their topic)",
                listener.connections.max_payload_size
            );
        }
    }
    if v4.contains_key(TLS_LISTENER) {
        bail!(
            "{origin} has a [v4.{TLS_LISTENER}] listener; BootTorrent serves MQTT over TLS \
             itself on --mqtts-listen with --tls-cert and --tls-key: remove that section"
        );
    }
    let Some(plain) = v4.get_mut(PLAIN_LISTENER) else {
        bail!("{origin} has no [v4.{PLAIN_LISTENER}] listener; BootTorrent's agents connect there");
    };
    // rumqttd takes a port number, not a socket: find a free one. Another process taking it
    // in between makes start-up fail with the broker's bind error, never a wrong broker.
    let internal = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .context("finding a free loopback port for the embedded MQTT broker")?;
    plain.listen = internal;
    plain.tls = None;
    Ok((broker, internal, max_clients))
}

/// `bytes` random bytes in hex: the probe's password.
fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| anyhow::anyhow!("reading random bytes for the health probe: {e}"))?;
    Ok(hex::encode(buf))
}

/// rumqttd reads the PEM files only when the first TLS client connects and then merely logs
/// the failure; check them at start-up so a bad file stops the server with its name.
pub fn check_pem(cert: &Path, key: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(cert)
        .with_context(|| format!("opening TLS certificate {}", cert.display()))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading TLS certificate {}: not valid PEM", cert.display()))?;
    if certs.is_empty() {
        bail!(
            "TLS certificate {} holds no PEM \"CERTIFICATE\" block",
            cert.display()
        );
    }
    let file = std::fs::File::open(key)
        .with_context(|| format!("opening TLS private key {}", key.display()))?;
    match rustls_pemfile::private_key(&mut BufReader::new(file)) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => bail!(
            "TLS private key {} holds no PEM private key block (PKCS#8, PKCS#1 or SEC1)",
            key.display()
        ),
        Err(e) => Err(e)
            .with_context(|| format!("reading TLS private key {}: not valid PEM", key.display())),
    }
}

/// Polls the listener until it accepts a TCP connection.
fn wait_until_accepting(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match addr {
            SocketAddr::V4(_) => [127, 0, 0, 1].into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let deadline = Instant::now() + limit;
    loop {
        match TcpStream::connect_timeout(&target, Duration::from_millis(200)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| {
                    format!("the MQTT broker did not start listening on {addr}; see its log above")
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Decides MQTT logins.
#[derive(Clone)]
struct Authenticator {
    enroll_token: Secret,
    admin_token: Secret,
    keyring: Keyring,
    login_window_ms: i64,
    metrics: Arc<Metrics>,
    /// The health probe's password (see `broker_probe`).
    probe_secret: Secret,
    /// Told of every admitted login, for the front.
    admissions: Admissions,
}

/// Why a login was refused; logged, never told to the client (MQTT 3.1.1 has one code).
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    ClientIdNotUsername,
    ClientIdForbidden,
    Reserved,
    InvalidId,
    WrongAdminToken,
    WrongEnrollToken,
    KeyProof(boottorrent_proto::LoginError),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::ClientIdNotUsername => {
                f.write_str("the client id is not the username (admin: `admin` or `admin-*`)")
            }
            Refusal::ClientIdForbidden => {
                f.write_str("the client id contains one of + $ # / (MQTT wildcards and separators)")
            }
            Refusal::Reserved => f.write_str("the id is reserved for the server"),
            Refusal::InvalidId => f.write_str("the username is not a valid machine id"),
            Refusal::WrongAdminToken => f.write_str("wrong admin token"),
            Refusal::WrongEnrollToken => f.write_str("wrong enrollment token"),
            Refusal::KeyProof(e) => write!(
                f,
                "{e}; the machine is known by another key (if it was reinstalled, run \
                 `boottorrent machines delete <id>` so it can enroll again)"
            ),
        }
    }
}

impl Authenticator {
    fn check(&self, client_id: &str, user: &str, pass: &str, now_ms: i64) -> bool {
        match self.decide(client_id, user, pass, now_ms) {
            Ok(()) => {
                self.admissions.admitted(client_id, pass);
                true
            }
            Err(why) => {
                self.metrics.mqtt_login_refused();
                crate::server::broker_log::refused_by_us();
                // Both ids are attacker-chosen: log them escaped and bounded.
                let shown = |s: &str| s.chars().take(64).collect::<String>();
                tracing::info!(
                    user = ?shown(user),
                    client_id = ?shown(client_id),
                    "refused MQTT login: {why}"
                );
                false
            }
        }
    }

    fn decide(&self, client_id: &str, user: &str, pass: &str, now_ms: i64) -> Result<(), Refusal> {
        if client_id.contains(CLIENT_ID_FORBIDDEN) {
            return Err(Refusal::ClientIdForbidden);
        }
        if client_id.starts_with(PROBE_CLIENT_PREFIX)
            && user == client_id
            && token_matches(&self.probe_secret, pass)
        {
            return Ok(());
        }
        if user == ADMIN_USER {
            if !admin_session(client_id) {
                return Err(Refusal::ClientIdNotUsername);
            }
            return if token_matches(&self.admin_token, pass) {
                Ok(())
            } else {
                Err(Refusal::WrongAdminToken)
            };
        }
        if client_id != user {
            return Err(Refusal::ClientIdNotUsername);
        }
        if is_reserved(user) {
            return Err(Refusal::Reserved);
        }
        if user.parse::<MachineId>().is_err() {
            return Err(Refusal::InvalidId);
        }
        let password = LoginPassword::parse(pass);
        let Some(known) = self.keyring.get(user) else {
            // Never seen: the token admits it; the registry bounds how many such ids join.
            return if token_matches(&self.enroll_token, password.token) {
                Ok(())
            } else {
                Err(Refusal::WrongEnrollToken)
            };
        };
        let proof = password
            .proof
            .ok_or(Refusal::KeyProof(boottorrent_proto::LoginError::NoProof))?;
        let machine: MachineId = user.parse().map_err(|_| Refusal::InvalidId)?;
        let key = verifying_key_from_bytes(&known.key)
            .map_err(|_| Refusal::KeyProof(boottorrent_proto::LoginError::BadSignature))?;
        proof
            .verify(
                boottorrent_proto::Purpose::MqttLogin,
                &machine,
                &key,
                now_ms,
                self.login_window_ms,
                known.last_login_ms,
            )
            .map_err(Refusal::KeyProof)?;
        self.keyring.logged_in(user, known.key, proof.ts_ms);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_front_admits_what_the_open_file_limit_holds() {
        // This machine's 20,000 with the default 4,096 HTTP connections: 4,874 agents.
        assert_eq!(clients_within_open_files(20_000, 4096), 4874);
        // What a 10,000-machine site needs (the embedded broker.toml's 10,010 less 4).
        let needed = open_files_for(10_006, 4096);
        assert_eq!(needed, 35_394);
        assert!(clients_within_open_files(needed, 4096) >= 10_006);
        // Scarce files: HTTP gets at most a quarter, the agents still some.
        assert_eq!(
            clients_within_open_files(4096, 4096),
            (4096 - 1024 - 1280) / 3
        );
        assert_eq!(clients_within_open_files(1000, 4096), 0);
    }

    #[test]
    fn embedded_config_has_the_plain_listener() {
        let config = Config::default();
        let (broker, internal, clients) = broker_config(&config).unwrap();
        assert_eq!(clients, 10010 - OWN_CONNECTIONS);
        let v4 = broker.v4.unwrap();
        assert_eq!(v4[PLAIN_LISTENER].listen, internal);
        assert!(
            internal.ip().is_loopback(),
            "rumqttd is reached through the front only"
        );
        assert!(!v4.contains_key(TLS_LISTENER));
    }

    #[test]
    fn the_largest_envelope_fits_with_the_longest_topic() {
        use boottorrent_proto::{CommandKind, EventKind, MachineId, Scope, Topic};
        let id: MachineId = "m".repeat(64).parse().unwrap();
        let longest = CommandKind::ALL
            .iter()
            .map(|&kind| Topic::Command {
                scope: Scope::Machine(id.clone()),
                kind,
            })
            .chain(EventKind::ALL.iter().map(|&kind| Topic::Event {
                machine: id.clone(),
                kind,
            }))
            .map(|t| t.to_string().len())
            .max()
            .unwrap();
        // Topic length prefix, topic, packet id, payload.
        assert!(2 + longest + 2 + boottorrent_proto::MAX_PAYLOAD_BYTES <= MIN_PACKET_LIMIT);
        let (broker, _, _) = broker_config(&Config::default()).unwrap();
        let limit = broker.v4.unwrap()[PLAIN_LISTENER]
            .connections
            .max_payload_size;
        assert!(limit >= MIN_PACKET_LIMIT, "embedded limit {limit}");
    }

    #[test]
    fn broker_file_with_a_smaller_packet_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(
            &path,
            EMBEDDED_CONFIG.replace("max_payload_size = 66560", "max_payload_size = 65536"),
        )
        .unwrap();
        let config = Config {
            broker_config: Some(path),
            ..Config::default()
        };
        let err = broker_config(&config).unwrap_err().to_string();
        assert!(err.contains("max_payload_size is 65536"), "{err}");
    }

    #[test]
    fn broker_file_without_plain_listener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(
            &path,
            EMBEDDED_CONFIG
                .replace("[v4.mqtt]", "[v4.other]")
                .replace("[v4.mqtt.", "[v4.other."),
        )
        .unwrap();
        let config = Config {
            broker_config: Some(path),
            ..Config::default()
        };
        let err = broker_config(&config).unwrap_err();
        assert!(err.to_string().contains("[v4.mqtt]"), "{err}");
    }

    const ENROLL: &str = "enroll-token-0123456789";
    const ADMIN: &str = "admin-token-0123456789";
    const PROBE: &str = "probe-secret-0123456789";
    const NOW: i64 = 1_764_000_000_000;

    fn authenticator() -> Authenticator {
        Authenticator {
            enroll_token: Secret::new(ENROLL.into()),
            admin_token: Secret::new(ADMIN.into()),
            keyring: Keyring::default(),
            login_window_ms: 300_000,
            metrics: Arc::new(Metrics::default()),
            probe_secret: Secret::new(PROBE.into()),
            admissions: Admissions::default(),
        }
    }

    #[test]
    fn tokens_admit_the_admin_and_unseen_machines() {
        let auth = authenticator();
        assert!(auth.check("pc-01", "pc-01", ENROLL, NOW));
        assert!(auth.check("admin", "admin", ADMIN, NOW));
        assert!(!auth.check("admin", "admin", ENROLL, NOW));
        assert!(!auth.check("pc-01", "pc-01", "admin-token-0123456789x", NOW));
        assert!(!auth.check("bad/id", "bad/id", ENROLL, NOW));
        assert!(!auth.check("", "", ENROLL, NOW));
        assert_eq!(auth.metrics.snapshot().mqtt_logins_refused, 4);
    }

    #[test]
    fn the_client_id_must_be_the_username_and_reserved_ids_are_refused() {
        let auth = authenticator();
        assert_eq!(
            auth.decide(ORCHESTRATOR_CLIENT_ID, "pc-01", ENROLL, NOW),
            Err(Refusal::ClientIdNotUsername)
        );
        assert_eq!(
            auth.decide(ORCHESTRATOR_CLIENT_ID, ORCHESTRATOR_CLIENT_ID, ENROLL, NOW),
            Err(Refusal::Reserved)
        );
        assert_eq!(
            auth.decide("admin", "pc-01", ENROLL, NOW),
            Err(Refusal::ClientIdNotUsername)
        );
        // Operator tools may hold several sessions; nobody else may take those ids.
        assert_eq!(auth.decide("admin-watch-1", "admin", ADMIN, NOW), Ok(()));
        assert_eq!(
            auth.decide("pc-01", "admin", ADMIN, NOW),
            Err(Refusal::ClientIdNotUsername)
        );
        assert_eq!(
            auth.decide("admin-watch-1", "admin-watch-1", ENROLL, NOW),
            Err(Refusal::Reserved)
        );
        assert_eq!(
            auth.decide("administrator", "administrator", ENROLL, NOW),
            Ok(())
        );
    }

    #[test]
    fn ids_rumqttd_would_refuse_after_taking_their_will_are_refused_first() {
        let auth = authenticator();
        for id in ["admin-a/b", "admin-#", "admin-$x", "admin-+"] {
            assert_eq!(
                auth.decide(id, "admin", ADMIN, NOW),
                Err(Refusal::ClientIdForbidden),
                "{id}"
            );
        }
    }

    #[test]
    fn the_front_learns_which_of_its_logins_were_admitted() {
        let auth = authenticator();
        let good = auth.admissions.expect("admin-1", ADMIN);
        let guess = auth.admissions.expect("admin-1", "wrong");
        let other = auth.admissions.expect("admin-2", ADMIN);
        assert!(!auth.check("admin-1", "admin", "wrong", NOW));
        assert!(auth.check("admin-1", "admin", ADMIN, NOW));
        assert!(good.admitted());
        assert!(!guess.admitted(), "a failed guess at the same id");
        assert!(!other.admitted());
        drop((good, guess, other));
        assert!(
            auth.admissions.lock().is_empty(),
            "nothing kept after the answer"
        );
    }

    #[test]
    fn only_the_probe_secret_admits_the_probe() {
        let auth = authenticator();
        let probe = format!("{PROBE_CLIENT_PREFIX}0");
        assert_eq!(auth.decide(&probe, &probe, PROBE, NOW), Ok(()));
        assert_eq!(
            auth.decide(&probe, &probe, ENROLL, NOW),
            Err(Refusal::Reserved)
        );
        assert_eq!(
            auth.decide(&probe, &probe, ADMIN, NOW),
            Err(Refusal::Reserved)
        );
        assert_eq!(
            auth.decide("pc-01", "pc-01", PROBE, NOW),
            Err(Refusal::WrongEnrollToken)
        );
    }

    #[test]
    fn the_embedded_broker_keeps_little_per_filter_and_room_for_the_orchestrator() {
        let (broker, _, clients) = broker_config(&Config::default()).unwrap();
        let router = &broker.router;
        // Every machine's own command filter together: what the broker holds at most for them.
        let per_filter = router.max_segment_size * router.max_segment_count;
        assert!(
            (per_filter * clients) as u128 <= CLIENT_LOGS_WARN_BYTES / 8,
            "{per_filter} bytes per filter for {clients} clients"
        );
        // The orchestrator's filter gets its own, larger log: rumqttd applies an entry to the
        // filters it matches.
        let events: Vec<_> = router
            .custom_segment
            .iter()
            .flatten()
            .filter(|(f, _)| rumqttd::protocol::matches(boottorrent_proto::topic::EVENTS_FILTER, f))
            .collect();
        assert_eq!(events.len(), 1, "{events:?}");
        let log = events[0].1.max_segment_size * events[0].1.max_segment_count;
        assert!(log >= 16 << 20, "{log} bytes for every machine's events");
        // ... and only to that filter, not to a machine's commands.
        let commands = boottorrent_proto::topic::machine_commands_filter(&"pc-1".parse().unwrap());
        assert!(!rumqttd::protocol::matches(&commands, events[0].0));
    }

    #[test]
    fn a_broker_file_with_segments_rumqttd_would_crash_on_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        for (from, to) in [
            ("max_segment_size = 4096", "max_segment_size = 512"),
            ("max_segment_count = 8", "max_segment_count = 0"),
        ] {
            assert!(EMBEDDED_CONFIG.contains(from));
            std::fs::write(&path, EMBEDDED_CONFIG.replace(from, to)).unwrap();
            let config = Config {
                broker_config: Some(path.clone()),
                ..Config::default()
            };
            let e = broker_config(&config).unwrap_err().to_string();
            assert!(e.contains(to) && e.contains("at least 1024"), "{e}");
        }
    }

    #[test]
    fn a_broker_file_must_leave_room_for_clients() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        for (max, ok) in [(4, false), (5, true), (1_000_001, false)] {
            std::fs::write(
                &path,
                EMBEDDED_CONFIG.replace(
                    "max_connections = 10010",
                    &format!("max_connections = {max}"),
                ),
            )
            .unwrap();
            let config = Config {
                broker_config: Some(path.clone()),
                ..Config::default()
            };
            match broker_config(&config) {
                Ok((_, _, clients)) => assert!(ok && clients == 1, "{max}: {clients}"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(!ok, "{max}: {e}");
                    assert!(e.contains(&format!("max_connections is {max};")), "{e}");
                    assert!(
                        e.contains("set at least 5") || e.contains("at most 1000000"),
                        "{e}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_known_machine_needs_a_fresh_proof_by_its_key() {
        let auth = authenticator();
        let machine: MachineId = "pc-01".parse().unwrap();
        let key = boottorrent_proto::SigningKey::from_bytes(&[7; 32]);
        auth.keyring.set(
            &machine,
            boottorrent_proto::PublicKeyBytes::from(key.verifying_key().to_bytes()),
            true,
        );
        // The token alone no longer admits it: this is how a student kicked machines off.
        assert_eq!(
            auth.decide("pc-01", "pc-01", ENROLL, NOW),
            Err(Refusal::KeyProof(boottorrent_proto::LoginError::NoProof))
        );
        let other = boottorrent_proto::SigningKey::from_bytes(&[8; 32]);
        let forged = boottorrent_proto::login_password(&machine, &other, ENROLL, NOW);
        assert_eq!(
            auth.decide("pc-01", "pc-01", &forged, NOW),
            Err(Refusal::KeyProof(
                boottorrent_proto::LoginError::BadSignature
            ))
        );
        let good = boottorrent_proto::login_password(&machine, &key, "any", NOW);
        assert_eq!(auth.decide("pc-01", "pc-01", &good, NOW + 5), Ok(()));
        // The same password again is a replay.
        assert_eq!(
            auth.decide("pc-01", "pc-01", &good, NOW + 10),
            Err(Refusal::KeyProof(boottorrent_proto::LoginError::Replayed))
        );
        let later = boottorrent_proto::login_password(&machine, &key, "any", NOW + 1000);
        assert_eq!(auth.decide("pc-01", "pc-01", &later, NOW + 1000), Ok(()));
        // Forgotten (deleted by the operator): the id may enroll again with the token.
        auth.keyring.remove(&machine);
        assert_eq!(auth.decide("pc-01", "pc-01", ENROLL, NOW), Ok(()));
    }
}
