//! One simulated agent: one task that owns its MQTT client and event loop and does on the
//! wire what `boottorrent-agent`'s link does (agent/src/link.rs), without downloading
//! anything:
//!
//! - before every connection attempt, a fresh login proof and a freshly signed last will
//!   (`status` offline, retained);
//! - on every CONNACK: subscribe to the global commands and its own, and to its zones' once
//!   it knows them; publish `startup`, then `status` online;
//! - every command is verified with the pinned server key and a replay guard
//!   ([`accept_command`]); `machine_configuration` counts as the server's answer, sets the
//!   zones (subscribing to new ones) and the heartbeat interval; `artifact_assignment` is
//!   timed for the fan-out report;
//! - every heartbeat interval: `startup` again while the server has not answered on this
//!   connection, else a heartbeat;
//! - after a failed or lost connection: wait 1 s, doubling to 30 s (reset by a connection
//!   that lasted 10 s), then reconnect;
//! - when stopped: `status` offline and a DISCONNECT, so that the broker drops the will.
//!
//! It only ever *tries* to queue requests to its client, as the agent does: the task that
//! queues is the one that drains the queue.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use boottorrent_proto::{
    Command, DeploymentId, Event, GLOBAL_COMMANDS_FILTER, Heartbeat, Presence, ReplayGuard, Status,
    VerifyingKey, ZoneId, accept_command, machine_commands_filter, now_ms, zone_commands_filter,
    zone_filter_changes,
};
use rumqttc::{AsyncClient, ConnectionError, EventLoop, Outgoing, Packet, QoS};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::tally::Tally;
use crate::machine::Machine;

/// The agent's first pause after a failed connection; doubles up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// The agent's longest pause between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A connection that lasted this long resets the backoff, as in the agent.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// The agent's heartbeat interval until the server's configuration says otherwise.
const FIRST_HEARTBEAT: Duration = Duration::from_secs(10);
/// The agent's replay window for commands (`replay_window_secs`).
const REPLAY_WINDOW_MS: i64 = 300_000;
/// Requests the client may queue; a few per connection are ever outstanding.
const CLIENT_QUEUE: usize = 32;
/// How long a stopped agent waits for its DISCONNECT to go out.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(3);

/// What one simulated agent needs to run.
pub struct Spec {
    /// Its position in the fleet, for the tally.
    pub index: usize,
    pub machine: Machine,
    pub broker: Arc<(String, u16)>,
    /// Log in with a certificate from the server (an external broker), not a password.
    pub certificates: Option<Arc<Certificates>>,
    pub token: Arc<str>,
    pub server_key: VerifyingKey,
    /// rumqttc's limit for the TCP connect plus the CONNACK (its default, 5 s, is the agent's).
    pub connect_timeout_secs: u64,
}

/// Where certificates come from, for agents of an external broker.
pub struct Certificates {
    pub http: reqwest::Client,
    /// The server's HTTP base URL.
    pub base: String,
    /// The broker's CA, PEM.
    pub ca_pem: String,
}

/// The agent's state between events.
struct Agent {
    index: usize,
    machine: Machine,
    client: AsyncClient,
    server_key: VerifyingKey,
    guard: ReplayGuard,
    zones: Vec<ZoneId>,
    heartbeat_every: Duration,
    connected_at: Option<Instant>,
    /// Whether the server answered `startup` on this connection; see the agent's `answered`.
    answered: bool,
    /// Deployments whose assignment arrived already (the server re-sends them).
    assigned: HashSet<DeploymentId>,
    started: Instant,
    tally: Arc<Tally>,
}

/// Runs one simulated agent until `stop` is cancelled.
pub async fn run(spec: Spec, tally: Arc<Tally>, stop: CancellationToken) {
    let Spec {
        index,
        mut machine,
        broker,
        certificates,
        token,
        server_key,
        connect_timeout_secs,
    } = spec;
    let mut options = machine.options(&broker, &token);
    if let Some(certificates) = &certificates {
        // As the agent: ask until the server gives one, backing off.
        let mut backoff = INITIAL_BACKOFF;
        loop {
            match machine.certificate_transport(certificates, &token).await {
                Ok(transport) => {
                    options.set_transport(transport);
                    break;
                }
                Err(e) => {
                    tally.failed_certificate(&e);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
    match machine.will() {
        Ok(will) => {
            options.set_last_will(will);
        }
        Err(e) => eprintln!("agent {index}: {e:#}"),
    }
    let (client, mut eventloop) = AsyncClient::new(options, CLIENT_QUEUE);
    eventloop
        .network_options
        .set_connection_timeout(connect_timeout_secs);
    let mut agent = Agent {
        index,
        machine,
        client,
        server_key,
        guard: ReplayGuard::new(REPLAY_WINDOW_MS),
        zones: Vec::new(),
        heartbeat_every: FIRST_HEARTBEAT,
        connected_at: None,
        answered: false,
        assigned: HashSet::new(),
        started: Instant::now(),
        tally,
    };
    let mut backoff = INITIAL_BACKOFF;
    let mut heartbeat = timer(agent.heartbeat_every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            polled = eventloop.poll() => match polled {
                Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                    agent.on_connected();
                    heartbeat = timer(agent.heartbeat_every);
                }
                Ok(rumqttc::Event::Incoming(Packet::Publish(publish))) => {
                    // Timed on arrival: the verification after it is the generator's CPU.
                    let at = Instant::now();
                    if agent.on_message(&publish.topic, &publish.payload, at) {
                        heartbeat = timer(agent.heartbeat_every);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if agent
                        .connected_at
                        .is_some_and(|t| t.elapsed() >= STABLE_CONNECTION)
                    {
                        backoff = INITIAL_BACKOFF;
                    }
                    agent.on_error(&e, stop.is_cancelled());
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    agent.prepare_reconnect(&mut eventloop, &token);
                }
            },
            _ = heartbeat.tick(), if agent.connected_at.is_some() => agent.heartbeat(),
        }
    }
    if agent.connected_at.is_some() {
        agent.publish(Event::Status(Status {
            presence: Presence::Offline,
        }));
        if agent.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(SHUTDOWN_DEADLINE, async {
                loop {
                    match eventloop.poll().await {
                        Ok(rumqttc::Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
    }
}

impl Agent {
    fn on_connected(&mut self) {
        self.tally.connected(self.index);
        self.connected_at = Some(Instant::now());
        self.answered = false;
        let mut filters = vec![
            GLOBAL_COMMANDS_FILTER.to_owned(),
            machine_commands_filter(self.machine.id()),
        ];
        filters.extend(self.zones.iter().map(zone_commands_filter));
        for filter in filters {
            self.subscribe(&filter);
        }
        self.publish_startup();
        self.publish(Event::Status(Status {
            presence: Presence::Online,
        }));
    }

    /// Counts a failed attempt or a lost session, unless the generator is stopping.
    fn on_error(&mut self, error: &ConnectionError, stopping: bool) {
        let was_connected = self.connected_at.take().is_some();
        if stopping {
            return;
        }
        if was_connected {
            self.tally.dropped(error);
        } else {
            self.tally.failed(error);
        }
    }

    /// A fresh password and will for the next attempt: the server refuses a login proof it
    /// has seen, and the will must carry a seq above everything sent before.
    fn prepare_reconnect(&mut self, eventloop: &mut EventLoop, token: &str) {
        match self.machine.will() {
            Ok(will) => {
                eventloop.mqtt_options.set_last_will(will);
            }
            Err(e) => eprintln!("agent {}: {e:#}", self.index),
        }
        let id = self.machine.id().as_str().to_owned();
        eventloop
            .mqtt_options
            .set_credentials(id, self.machine.signer.password(token, now_ms()));
    }

    /// Verifies and handles one message; returns whether the heartbeat interval changed.
    fn on_message(&mut self, topic: &str, payload: &[u8], at: Instant) -> bool {
        let envelope = match accept_command(
            topic,
            payload,
            self.machine.id(),
            &self.zones,
            &self.server_key,
            &mut self.guard,
            now_ms(),
        ) {
            Ok(envelope) => envelope,
            Err(e) => {
                let what = match e.kind() {
                    Some(kind) => format!("{kind} command on {topic}: {e}"),
                    None => format!("message on {topic:?}: {e}"),
                };
                self.tally.refused_command(&what);
                return false;
            }
        };
        match envelope.body {
            Command::MachineConfiguration(configuration) => {
                if !self.answered {
                    self.answered = true;
                    self.tally.answered(self.index);
                }
                let (left, joined) = zone_filter_changes(&self.zones, &configuration.zones);
                for filter in left {
                    if let Err(e) = self.client.try_unsubscribe(filter) {
                        eprintln!("agent {}: could not queue an unsubscribe: {e}", self.index);
                    }
                }
                for filter in joined {
                    self.subscribe(&filter);
                }
                self.zones = configuration.zones;
                let every =
                    Duration::from_secs(configuration.heartbeat_interval_secs.max(1).into());
                let changed = every != self.heartbeat_every;
                self.heartbeat_every = every;
                changed
            }
            Command::ArtifactAssignment(assignment) => {
                if self.assigned.insert(assignment.deployment.clone()) {
                    self.tally.assigned(assignment.deployment, at);
                }
                false
            }
            _ => false,
        }
    }

    fn heartbeat(&mut self) {
        if !self.answered {
            self.publish_startup();
            return;
        }
        self.publish(Event::Heartbeat(Heartbeat {
            uptime_secs: self.started.elapsed().as_secs(),
            images: vec![],
        }));
    }

    fn publish_startup(&mut self) {
        match self.machine.startup() {
            Ok((topic, payload)) => self.queue(topic.to_string(), QoS::AtLeastOnce, false, payload),
            Err(e) => eprintln!("agent {}: {e:#}", self.index),
        }
    }

    /// Signs and queues an event at QoS 1, `status` retained, as the agent does.
    fn publish(&mut self, event: Event) {
        let retain = matches!(event, Event::Status(_));
        match self.machine.event(event) {
            Ok((topic, payload)) => {
                self.queue(topic.to_string(), QoS::AtLeastOnce, retain, payload)
            }
            Err(e) => eprintln!("agent {}: {e:#}", self.index),
        }
    }

    fn queue(&self, topic: String, qos: QoS, retain: bool, payload: Vec<u8>) {
        if let Err(e) = self.client.try_publish(topic, qos, retain, payload) {
            eprintln!("agent {}: could not queue a publish: {e}", self.index);
        }
    }

    fn subscribe(&self, filter: &str) {
        if let Err(e) = self.client.try_subscribe(filter, QoS::AtLeastOnce) {
            eprintln!(
                "agent {}: could not queue the subscription to {filter}: {e}",
                self.index
            );
        }
    }
}

fn timer(every: Duration) -> tokio::time::Interval {
    let mut timer = tokio::time::interval_at(Instant::now() + every, every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer
}
