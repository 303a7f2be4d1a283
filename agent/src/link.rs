//! The MQTT session with the server: announces the machine, verifies commands, signs events.
//!
//! Tasks and channels (the tasks are in the agent's task tree, [`Tasks`]):
//!
//! - the **driver** task polls rumqttc's event loop (which also writes what the client
//!   queued), turns what arrives into [`Net`] notes on a channel, and on an error sleeps with
//!   backoff (1 s doubling to 30 s) before the event loop reconnects. Before each reconnect
//!   it signs a fresh last will (`status` = offline).
//! - the **session** (the task calling [`run`]) owns everything else: on each `Connected`
//!   it subscribes (global, its machine, its zones), publishes `startup` and `status`
//!   online; it verifies every incoming command with the pinned server key and a
//!   [`ReplayGuard`], applies `machine_configuration` itself (zones, heartbeat interval) and
//!   hands every verified command to the caller's `commands` channel (when that is full, a
//!   short-lived **backlog** task waits to hand it over); it signs and publishes the caller's
//!   events and a heartbeat every interval. When its `shutdown` token is cancelled it says
//!   so to the server, then stops the driver once the DISCONNECT is out.
//!
//! The session only ever *tries* to queue requests to the client (`try_publish`), never
//! waits on it: the driver may be blocked handing it a note, and waiting on each other would
//! deadlock. A full queue (only possible while the broker is away) drops the event with a
//! warning; the server reconciles from the next `startup` or heartbeat.
//!
//! The signer sits behind a mutex shared by both tasks (the driver signs wills); nothing
//! awaits while holding it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use boottorrent_proto::{
    Command, Event, EventKind, GLOBAL_COMMANDS_FILTER, Heartbeat, HeldImage, MAX_PAYLOAD_BYTES,
    MachineConfiguration, MachineId, MachineSigner, Presence, PublicKeyBytes, ReplayGuard,
    RunningImage, Secret, SenderId, Shutdown, Startup, Status, VerifyingKey, ZoneId,
    accept_command, machine_commands_filter, now_ms, zone_commands_filter, zone_filter_changes,
};
use rumqttc::{
    AsyncClient, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration,
    Transport,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker_cert::CertLogin;
use crate::config::{BrokerLogin, Config};
use crate::identity::Identity;
use crate::inventory;
use crate::tasks::Tasks;

/// What the images held are, asked for at every `startup` and heartbeat; the download code
/// provides it.
pub type HeldFn = Arc<dyn Fn() -> Vec<HeldImage> + Send + Sync>;

/// First pause after a failed connection; doubles up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A connection that lasted this long resets the backoff; shorter ones (a broker that
/// accepts and drops at once, two agents with one id) keep doubling it.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// Requests the client may queue for the event loop.
const CLIENT_QUEUE: usize = 256;
/// Failed connections in a row after which a certificate login asks once for a new
/// certificate.
const CERTIFICATE_RETRIES: u32 = 3;
/// How long a clean shutdown may take to get `shutdown` and the DISCONNECT out.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(3);
/// File in the data dir holding the last accepted server seq, so that a command captured
/// before an agent restart cannot be replayed after it.
const SERVER_SEQ_FILE: &str = "server.seq";

/// Startups carrying `running` the server may leave unanswered on one connection before the
/// agent sends them without it: a server older than the field refuses such a startup (its
/// signature check re-encodes what it decoded), and a machine it never answers would never get
/// past startup. A current server answers the first one unless it is refusing the machine
/// for other reasons, which a few tries ride out.
const RUNNING_TRIES: u32 = 3;

/// What the driver tells the session.
#[derive(Debug)]
enum Net {
    /// CONNACK received: the session must subscribe and announce itself.
    Connected,
    /// A message on one of our subscriptions.
    Message { topic: String, payload: Vec<u8> },
    /// The connection failed or could not be made; the driver retries by itself.
    Lost,
}

/// The last will: `status` offline, retained, QoS 1 ([`MachineSigner::offline_will`]).
fn will(signer: &mut MachineSigner) -> anyhow::Result<LastWill> {
    let (topic, payload) = signer
        .offline_will(now_ms())
        .context("signing the last will")?;
    Ok(LastWill::new(
        topic.to_string(),
        payload,
        QoS::AtLeastOnce,
        true,
    ))
}

/// Runs the MQTT session until `shutdown` is cancelled, then publishes `shutdown` and
/// `status` offline and disconnects.
///
/// Verified commands other than `machine_configuration` go to `commands`;
/// `machine_configuration` is applied here (zones, heartbeat interval) and, when its
/// `config_hash` changed, also sent on `commands` so that the caller can apply the rate
/// limits. Events from `events` are signed and published: `progress` at QoS 0 (dropped
/// while disconnected), everything else at QoS 1. `held` is asked for the images held at
/// every `startup` and heartbeat.
///
/// Returns an error only for what retrying cannot fix: no server or enrollment token
/// configured, an unreadable CA file. Broker outages are retried forever.
#[allow(clippy::too_many_arguments)] // one call site, in `main`
pub async fn run(
    config: Config,
    identity: Identity,
    commands: mpsc::Sender<Command>,
    mut events: mpsc::Receiver<Event>,
    held: HeldFn,
    running: Option<RunningImage>,
    tasks: Tasks,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let host = config.server()?.to_owned();
    let port = config.mqtt_port();
    let Some(token) = config.enroll_token.clone() else {
        bail!(
            "no enrollment token configured: set enroll_token in the config file, \
             BOOTTORRENT_AGENT_ENROLL_TOKEN or --enroll-token (the server prints it on first \
             start and keeps it in <data-dir>/enroll.token)"
        );
    };
    let Identity {
        machine,
        key,
        server_key,
    } = identity;
    let public_key = PublicKeyBytes::from(key.verifying_key().to_bytes());
    let signer = Arc::new(Mutex::new(MachineSigner::new(
        machine.clone(),
        key,
        now_ms(),
    )));

    // With an external broker, the machine's certificate is its login (see `broker_cert`).
    let cert_login = match config.broker_login {
        BrokerLogin::Password => None,
        BrokerLogin::Certificate => Some(CertLogin {
            machine: machine.clone(),
            key: lock(&signer).key().clone(),
            token: token.clone(),
            http: reqwest::Client::new(),
            http_url: config.http_url()?,
            data_dir: config
                .data_dir
                .clone()
                .context("the machine's store must be located before the link starts")?,
            tls_ca: config.tls_ca.clone(),
        }),
    };
    // Each lock in its own statement: a guard lives to the end of the statement it is in.
    let password = lock(&signer).password(token.expose(), now_ms());
    let will = will(&mut lock(&signer))?;
    let mut options = MqttOptions::new(machine.as_str(), host.clone(), port);
    options
        .set_keep_alive(Duration::from_secs(
            config.mqtt_keepalive_secs.max(1).into(),
        ))
        .set_clean_session(true)
        // Envelopes are capped by the protocol; leave room for the MQTT header and topic.
        .set_max_packet_size(MAX_PAYLOAD_BYTES + 1024, MAX_PAYLOAD_BYTES + 1024)
        .set_last_will(will);
    match &cert_login {
        // The broker takes the certificate's CN as the username and client id.
        Some(login) => {
            let mut backoff = INITIAL_BACKOFF;
            let transport = loop {
                match login.transport(false).await {
                    Ok(transport) => break transport,
                    Err(e) => tracing::warn!(
                        "{e:#}; retrying in {} s (the broker takes this machine only with a \
                         certificate from the server)",
                        backoff.as_secs()
                    ),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            };
            options.set_transport(transport);
        }
        None => {
            options.set_credentials(machine.as_str(), password);
            if let Some(ca) = &config.tls_ca {
                options.set_transport(tls_transport(ca)?);
            }
        }
    }
    let (client, eventloop) = AsyncClient::new(options, CLIENT_QUEUE);
    let (net_tx, mut net_rx) = mpsc::channel(64);
    // Not the shutdown token: the driver must outlive it to send the clean shutdown out.
    let stop_driver = CancellationToken::new();
    let mut driver = tasks.spawn("MQTT event loop", {
        let driving = drive(
            eventloop,
            net_tx,
            signer.clone(),
            token,
            cert_login,
            format!("{host}:{port}"),
            stop_driver.clone(),
        );
        async move {
            driving.await;
            Ok(())
        }
    });
    tracing::info!(
        machine = %machine,
        broker = %format!("{host}:{port}"),
        tls = config.tls_ca.is_some() || config.broker_login == BrokerLogin::Certificate,
        "connecting to the BootTorrent server"
    );

    let heartbeat_every = Duration::from_secs(config.heartbeat_interval_secs.max(1).into());
    let mut guard = ReplayGuard::new(i64::from(config.replay_window_secs) * 1000);
    let data_dir = config
        .data_dir
        .clone()
        .context("the machine's store must be located before the link starts")?;
    let seq_file = data_dir.join(SERVER_SEQ_FILE);
    if let Some(seq) = read_seq(&seq_file) {
        guard.restore(SenderId::server(), seq);
    }
    let mut session = Session {
        client,
        signer,
        machine,
        public_key,
        server_key,
        guard,
        seq_file,
        data_dir,
        server_host: host,
        server_port: port,
        commands,
        held,
        zones: Vec::new(),
        config_hash: None,
        heartbeat_every,
        connected: false,
        answered: false,
        running,
        running_tries: 0,
        started: Instant::now(),
        tasks,
        shutdown: shutdown.clone(),
    };
    let mut heartbeat = heartbeat_timer(heartbeat_every);
    let mut events_open = true;

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            note = net_rx.recv() => match note {
                Some(Net::Connected) => {
                    session.on_connected();
                    heartbeat = heartbeat_timer(session.heartbeat_every);
                }
                Some(Net::Message { topic, payload }) => {
                    if session.on_message(&topic, &payload) {
                        heartbeat = heartbeat_timer(session.heartbeat_every);
                    }
                }
                Some(Net::Lost) => session.connected = false,
                None => bail!("the MQTT event loop stopped unexpectedly"),
            },
            event = events.recv(), if events_open => match event {
                Some(event) => session.publish(event),
                None => events_open = false,
            },
            _ = heartbeat.tick() => session.heartbeat(),
        }
    }

    // Clean shutdown: say so, then DISCONNECT so that the broker drops the will.
    if session.connected {
        session.publish(Event::Shutdown(Shutdown {
            reason: "agent stopped".into(),
        }));
        session.publish(Event::Status(Status {
            presence: Presence::Offline,
        }));
        if let Err(e) = session.client.try_disconnect() {
            tracing::warn!("could not queue the MQTT disconnect: {e}");
        }
        let deadline = tokio::time::sleep(SHUTDOWN_DEADLINE);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut driver => break,
                _ = &mut deadline => {
                    tracing::warn!("the broker did not take the disconnect in time; closing anyway");
                    break;
                }
                // Keep draining, so that the driver never blocks on a full channel.
                _ = net_rx.recv() => {}
            }
        }
    }
    stop_driver.cancel();
    if !driver.is_finished() {
        let _ = driver.await;
    }
    tracing::info!("MQTT session closed");
    Ok(())
}

/// The session task's state; see the module docs.
struct Session {
    client: AsyncClient,
    signer: Arc<Mutex<MachineSigner>>,
    machine: MachineId,
    public_key: PublicKeyBytes,
    server_key: VerifyingKey,
    guard: ReplayGuard,
    seq_file: PathBuf,
    data_dir: PathBuf,
    server_host: String,
    server_port: u16,
    commands: mpsc::Sender<Command>,
    held: HeldFn,
    /// For the backlog task of a command that finds `commands` full.
    tasks: Tasks,
    shutdown: CancellationToken,
    /// Zones named by the last `machine_configuration`; subscribed while connected.
    zones: Vec<ZoneId>,
    /// Hash of the last `machine_configuration` applied.
    config_hash: Option<String>,
    heartbeat_every: Duration,
    connected: bool,
    /// Whether the server answered our `startup` on this connection (with our
    /// configuration). Until it does, every heartbeat is a `startup` again: the server may
    /// have refused it (too many new machines at once, waiting for approval) or its answer
    /// was lost (commands travel at QoS 0).
    answered: bool,
    /// The image this machine runs, told in every `startup` ([`crate::running`]).
    running: Option<RunningImage>,
    /// Startups carrying `running` sent on this connection; see [`RUNNING_TRIES`].
    running_tries: u32,
    started: Instant,
}

impl Session {
    /// Subscribes and announces: called on every CONNACK, since a clean session forgets
    /// subscriptions and the server forgets what it sent us when it sees `startup`.
    fn on_connected(&mut self) {
        self.connected = true;
        self.answered = false;
        self.running_tries = 0;
        tracing::info!(machine = %self.machine, "connected to the broker");
        let mut filters = vec![
            GLOBAL_COMMANDS_FILTER.to_owned(),
            machine_commands_filter(&self.machine),
        ];
        filters.extend(self.zones.iter().map(zone_commands_filter));
        for filter in filters {
            self.subscribe(&filter);
        }
        let startup = self.startup();
        // Startup first: it registers the machine, which the server needs before it
        // accepts anything else from it.
        self.publish(Event::Startup(startup));
        self.publish(Event::Status(Status {
            presence: Presence::Online,
        }));
    }

    fn startup(&mut self) -> Startup {
        let inventory = inventory::collect(
            &self.data_dir,
            Some((self.server_host.as_str(), self.server_port)),
        );
        Startup {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            hostname: inventory.hostname,
            os: inventory.os,
            ips: inventory.ips,
            macs: inventory.macs,
            free_disk_bytes: inventory.free_disk_bytes,
            images: (self.held)(),
            public_key: self.public_key,
            running: self.running_for_startup(),
        }
    }

    /// `running` for the next startup, left out once [`RUNNING_TRIES`] startups carrying it
    /// went unanswered on this connection.
    fn running_for_startup(&mut self) -> Option<RunningImage> {
        let running = self.running.clone()?;
        if self.running_tries >= RUNNING_TRIES {
            if self.running_tries == RUNNING_TRIES {
                self.running_tries += 1;
                tracing::warn!(
                    image = %running.image,
                    "the server answered none of {RUNNING_TRIES} startups saying which image runs; \
                     sending them without it (a server older than this agent refuses the field: \
                     upgrade it, and reboot deployments will see this machine come back)"
                );
            }
            return None;
        }
        self.running_tries += 1;
        Some(running)
    }

    fn heartbeat(&mut self) {
        if !self.connected {
            return;
        }
        if !self.answered {
            tracing::info!(
                "the server has not answered this machine's startup yet; sending it again"
            );
            let startup = self.startup();
            self.publish(Event::Startup(startup));
            return;
        }
        let heartbeat = Heartbeat {
            uptime_secs: self.started.elapsed().as_secs(),
            images: (self.held)(),
        };
        self.publish(Event::Heartbeat(heartbeat));
    }

    fn subscribe(&self, filter: &str) {
        if let Err(e) = self.client.try_subscribe(filter, QoS::AtLeastOnce) {
            tracing::warn!("could not queue the subscription to {filter}: {e}");
        }
    }

    fn unsubscribe(&self, filter: &str) {
        if let Err(e) = self.client.try_unsubscribe(filter) {
            tracing::warn!("could not queue the unsubscription from {filter}: {e}");
        }
    }

    /// Signs and queues an event: `progress` at QoS 0 (dropped while disconnected, the
    /// next one supersedes it), `status` retained, everything at QoS 1.
    fn publish(&mut self, event: Event) {
        let kind = event.kind();
        let (qos, retain) = match kind {
            EventKind::Progress => (QoS::AtMostOnce, false),
            EventKind::Status => (QoS::AtLeastOnce, true),
            _ => (QoS::AtLeastOnce, false),
        };
        if qos == QoS::AtMostOnce && !self.connected {
            tracing::debug!("not connected; dropped a {kind} event");
            return;
        }
        let signed = lock(&self.signer).event(event, now_ms());
        let (topic, payload) = match signed {
            Ok(signed) => signed,
            Err(e) => {
                tracing::error!("dropped a {kind} event: signing it: {e}");
                return;
            }
        };
        match self
            .client
            .try_publish(topic.to_string(), qos, retain, payload)
        {
            Ok(()) => tracing::debug!(%topic, "queued event"),
            Err(e) => tracing::warn!(%topic, "could not queue a {kind} event: {e}"),
        }
    }

    /// Verifies and dispatches one incoming message. Returns whether the heartbeat interval
    /// changed.
    fn on_message(&mut self, topic_text: &str, payload: &[u8]) -> bool {
        let envelope = match accept_command(
            topic_text,
            payload,
            &self.machine,
            &self.zones,
            &self.server_key,
            &mut self.guard,
            now_ms(),
        ) {
            Ok(envelope) => envelope,
            Err(e) => {
                match e.kind() {
                    Some(kind) => tracing::warn!("ignored {kind} command on {topic_text}: {e}"),
                    None => tracing::warn!("ignored a message on {topic_text:?}: {e}"),
                }
                return false;
            }
        };
        let kind = envelope.body.kind();
        write_seq(&self.seq_file, envelope.seq);
        tracing::info!(
            seq = envelope.seq,
            "received {kind} command on {topic_text}"
        );
        match envelope.body {
            Command::MachineConfiguration(configuration) => {
                self.answered = true;
                self.configure(configuration)
            }
            command => {
                self.forward(command);
                false
            }
        }
    }

    /// Applies a `machine_configuration`: re-subscribes for changed zones and takes the
    /// heartbeat interval. Returns whether the interval changed.
    fn configure(&mut self, configuration: MachineConfiguration) -> bool {
        if self.config_hash.as_deref() == Some(configuration.config_hash.as_str())
            && self.zones == configuration.zones
        {
            tracing::debug!(hash = %configuration.config_hash, "configuration unchanged");
            return false;
        }
        if self.connected {
            let (left, joined) = zone_filter_changes(&self.zones, &configuration.zones);
            for filter in left {
                self.unsubscribe(&filter);
            }
            for filter in joined {
                self.subscribe(&filter);
            }
        }
        self.zones = configuration.zones.clone();
        self.config_hash = Some(configuration.config_hash.clone());
        let mut interval_changed = false;
        if configuration.heartbeat_interval_secs >= 1 {
            let every = Duration::from_secs(configuration.heartbeat_interval_secs.into());
            interval_changed = every != self.heartbeat_every;
            self.heartbeat_every = every;
        }
        tracing::info!(
            hash = %configuration.config_hash,
            zones = ?self.zones.iter().map(ZoneId::as_str).collect::<Vec<_>>(),
            heartbeat_secs = self.heartbeat_every.as_secs(),
            "applied the server's configuration"
        );
        self.forward(Command::MachineConfiguration(configuration));
        interval_changed
    }

    /// Hands a verified command to the caller without ever blocking the session.
    fn forward(&self, command: Command) {
        use mpsc::error::TrySendError;
        match self.commands.try_send(command) {
            Ok(()) => {}
            Err(TrySendError::Full(command)) => {
                // Rare (a burst of commands); keep the command, in its own task.
                let (tx, shutdown) = (self.commands.clone(), self.shutdown.clone());
                self.tasks.spawn("command backlog", async move {
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tx.send(command) => {}
                    }
                    Ok(())
                });
            }
            Err(TrySendError::Closed(command)) => {
                tracing::warn!(
                    "nothing handles commands any more; dropped a {} command",
                    command.kind()
                );
            }
        }
    }
}

/// Polls the event loop; see the module docs.
async fn drive(
    mut eventloop: EventLoop,
    net: mpsc::Sender<Net>,
    signer: Arc<Mutex<MachineSigner>>,
    token: Secret,
    cert_login: Option<CertLogin>,
    broker: String,
    stop: CancellationToken,
) {
    let mut backoff = INITIAL_BACKOFF;
    let mut connected_at: Option<Instant> = None;
    // Attempts since the last CONNACK: with a certificate login, the third in a row asks once
    // for a new certificate (the server's CA may have been made anew, or the machine deleted
    // and enrolled again); once, so that a broker outage does not turn into a certificate
    // request per agent and retry.
    let mut failures = 0u32;
    loop {
        let polled = tokio::select! {
            _ = stop.cancelled() => return,
            polled = eventloop.poll() => polled,
        };
        let note = match polled {
            Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                connected_at = Some(Instant::now());
                failures = 0;
                Net::Connected
            }
            Ok(rumqttc::Event::Incoming(Packet::Publish(publish))) => Net::Message {
                topic: publish.topic,
                payload: publish.payload.to_vec(),
            },
            // Written and flushed: the clean shutdown is done.
            Ok(rumqttc::Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => continue,
            Err(e) => {
                if connected_at
                    .take()
                    .is_some_and(|t| t.elapsed() >= STABLE_CONNECTION)
                {
                    backoff = INITIAL_BACKOFF;
                }
                failures = failures.saturating_add(1);
                tracing::warn!(
                    "MQTT connection to {broker}: {e}; retrying in {} s",
                    backoff.as_secs()
                );
                if net.send(Net::Lost).await.is_err() {
                    return;
                }
                match will(&mut lock(&signer)) {
                    Ok(will) => {
                        eventloop.mqtt_options.set_last_will(will);
                    }
                    Err(e) => tracing::error!("could not sign a new last will: {e:#}"),
                }
                match &cert_login {
                    // Renewed before it runs out: the broker checks it at every connect.
                    Some(login) if login.due(now_ms()) || failures == CERTIFICATE_RETRIES => {
                        match login.transport(failures == CERTIFICATE_RETRIES).await {
                            Ok(transport) => {
                                eventloop.mqtt_options.set_transport(transport);
                            }
                            Err(e) => tracing::warn!(
                                "renewing the broker certificate: {e:#}; trying the old one"
                            ),
                        }
                    }
                    Some(_) => {}
                    None => {
                        // The server refuses a login proof it has seen or that has gone stale.
                        let password = lock(&signer).password(token.expose(), now_ms());
                        let user = eventloop.mqtt_options.client_id();
                        eventloop.mqtt_options.set_credentials(user, password);
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if net.send(note).await.is_err() {
            return;
        }
    }
}

/// MQTT over TLS, trusting only the CA in `ca` (PEM).
fn tls_transport(ca: &Path) -> anyhow::Result<Transport> {
    let file = std::fs::File::open(ca)
        .with_context(|| format!("opening the TLS CA file {}", ca.display()))?;
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading the TLS CA file {}: not valid PEM", ca.display()))?;
    if certs.is_empty() {
        bail!(
            "the TLS CA file {} holds no PEM \"CERTIFICATE\" block",
            ca.display()
        );
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .with_context(|| format!("adding a certificate of {} as a root", ca.display()))?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("setting up TLS")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )))
}

fn heartbeat_timer(every: Duration) -> tokio::time::Interval {
    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer
}

fn lock(signer: &Mutex<MachineSigner>) -> std::sync::MutexGuard<'_, MachineSigner> {
    // Signing cannot leave the signer half-updated, so a poisoned lock is still usable.
    signer.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_seq(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Best effort: losing it only shortens replay protection across a restart to the window.
fn write_seq(path: &Path, seq: u64) {
    if let Err(e) = boottorrent_swarm::storage::write_durably(path, format!("{seq}\n").as_bytes()) {
        tracing::debug!(file = %path.display(), error = %e, "could not save the last server seq");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boottorrent_proto::{
        BootCommand, Encoding, Envelope, SigningKey, Topic, decode_event, generate_signing_key,
    };

    fn signer() -> MachineSigner {
        MachineSigner::new(
            "pc-1".parse().unwrap(),
            generate_signing_key().unwrap(),
            now_ms(),
        )
    }

    #[test]
    fn the_will_is_the_signed_offline_status_retained_at_qos_1() {
        let mut s = signer();
        let vk = s.key().verifying_key();
        let will = will(&mut s).unwrap();
        assert_eq!(will.topic, "boottorrent/evt/machine/pc-1/status");
        assert!(will.retain);
        assert_eq!(will.qos, QoS::AtLeastOnce);
        let topic: Topic = will.topic.parse().unwrap();
        let envelope = decode_event(EventKind::Status, &will.message).unwrap();
        envelope.verify(&topic, &vk).unwrap();
        assert_eq!(
            envelope.body,
            Event::Status(Status {
                presence: Presence::Offline
            })
        );
    }

    #[tokio::test]
    async fn commands_are_verified_replays_dropped_and_configuration_applied() {
        let server = generate_signing_key().unwrap();
        let (commands, mut commands_rx) = mpsc::channel(8);
        let (client, _eventloop) = AsyncClient::new(MqttOptions::new("pc-1", "127.0.0.1", 1), 16);
        let dir = tempfile::tempdir().unwrap();
        let s = signer();
        let mut session = Session {
            client,
            public_key: PublicKeyBytes::from(s.key().verifying_key().to_bytes()),
            signer: Arc::new(Mutex::new(s)),
            machine: "pc-1".parse().unwrap(),
            server_key: server.verifying_key(),
            guard: ReplayGuard::new(300_000),
            seq_file: dir.path().join(SERVER_SEQ_FILE),
            data_dir: dir.path().to_owned(),
            server_host: "127.0.0.1".into(),
            server_port: 1,
            commands,
            held: Arc::new(Vec::new),
            zones: Vec::new(),
            config_hash: None,
            heartbeat_every: Duration::from_secs(10),
            connected: false,
            answered: false,
            running: None,
            running_tries: 0,
            started: Instant::now(),
            tasks: Tasks::new(),
            shutdown: CancellationToken::new(),
        };
        // `running` goes out in the first startups of a connection only, then is left out
        // for a server that does not answer them (an older one refuses the field).
        session.running = Some(RunningImage {
            image: "img".parse().unwrap(),
            deployment: None,
        });
        let tries: Vec<bool> = (0..RUNNING_TRIES + 2)
            .map(|_| session.startup().running.is_some())
            .collect();
        assert_eq!(tries.iter().filter(|r| **r).count() as u32, RUNNING_TRIES);
        assert!(tries[0] && !tries[tries.len() - 1]);
        session.running_tries = 0; // as `on_connected` does
        assert!(session.startup().running.is_some());

        let mut seq = 1000;
        let mut sign = |topic: &str, body: Command, key: &SigningKey| {
            seq += 1;
            let topic: Topic = topic.parse().unwrap();
            Envelope::sign(&topic, SenderId::server(), now_ms(), seq, body, key)
                .unwrap()
                .encode(Encoding::MessagePack)
                .unwrap()
        };
        let boot = Command::Boot(BootCommand {
            image: "img".parse().unwrap(),
            deployment: None,
        });
        let topic = "boottorrent/cmd/machine/pc-1/boot";

        // Signed by someone else: ignored.
        let forged = sign(topic, boot.clone(), &generate_signing_key().unwrap());
        session.on_message(topic, &forged);
        assert!(commands_rx.try_recv().is_err());

        // Correct: handed on once; the same bytes again are a replay.
        let good = sign(topic, boot.clone(), &server);
        session.on_message(topic, &good);
        assert_eq!(commands_rx.try_recv().unwrap(), boot);
        session.on_message(topic, &good);
        assert!(commands_rx.try_recv().is_err());
        assert_eq!(read_seq(&session.seq_file), Some(1002));

        // For another machine, or a zone we are not in: ignored.
        let other = "boottorrent/cmd/machine/pc-2/boot";
        session.on_message(other, &sign(other, boot.clone(), &server));
        let zone = "boottorrent/cmd/zone/lab/boot";
        session.on_message(zone, &sign(zone, boot.clone(), &server));
        assert!(commands_rx.try_recv().is_err());

        // Configuration: zones and heartbeat taken, forwarded once per hash.
        let configuration = MachineConfiguration {
            zones: vec!["lab".parse().unwrap()],
            heartbeat_interval_secs: 3,
            download_limit_bps: Some(5),
            upload_limit_bps: None,
            config_hash: "abc".into(),
        };
        let ctopic = "boottorrent/cmd/machine/pc-1/machine_configuration";
        let changed = session.on_message(
            ctopic,
            &sign(
                ctopic,
                Command::MachineConfiguration(configuration.clone()),
                &server,
            ),
        );
        assert!(changed);
        assert_eq!(session.heartbeat_every, Duration::from_secs(3));
        assert_eq!(
            commands_rx.try_recv().unwrap(),
            Command::MachineConfiguration(configuration.clone())
        );
        let changed = session.on_message(
            ctopic,
            &sign(
                ctopic,
                Command::MachineConfiguration(configuration),
                &server,
            ),
        );
        assert!(!changed);
        assert!(commands_rx.try_recv().is_err());

        // Now the zone's commands count.
        session.on_message(zone, &sign(zone, boot.clone(), &server));
        assert_eq!(commands_rx.try_recv().unwrap(), boot);

        // Garbage and unsigned JSON are ignored without panicking.
        session.on_message(topic, b"\x00\x01");
        session.on_message(topic, br#"{"image":"img","deployment":null}"#);
        session.on_message("boottorrent/cmd/machine/pc-1/nonsense", b"");
        assert!(commands_rx.try_recv().is_err());
    }
}
