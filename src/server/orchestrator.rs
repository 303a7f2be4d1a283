//! The orchestrator: the server's only connection to the broker.
//!
//! One task owns the in-process rumqttd link; the [`Registry`] (machines and trust) and the
//! [`Fleet`] (zones and deployments) belong to its applier, a thread of their own and the
//! single writer of that state. The task waits on notifications from the broker (events from
//! machines), requests from the HTTP API (which must go through the applier), the applier's
//! answers (commands to publish), and timers: one that marks silent machines offline and
//! quiet deployments stalled, one that persists last-seen times.
//!
//! Events are applied in batches of up to `MAX_BATCH`, each in one database transaction:
//! the registry's changes (machines, keys, the event log) and the fleet's (the deployments
//! the batch touched). While the applier verifies and commits one batch (a commit waits for the
//! disk), the task keeps reading the broker and the next batch grows, so under load a commit
//! takes thousands of events and the rate is not bounded by fsyncs per second. rumqttd hands a
//! link at most `max_outgoing_packet_count` packets and then sends `Unschedule`; the link must
//! answer with `wake` or the router never sends it anything again, so reading must not wait
//! for a commit.
//!
//! Durability: every event's effect is committed before the commands that follow from it are
//! published and before the API (which reads the database) can show it. The one exception is
//! an event that changes nothing but when the machine was last heard from and its seq (most
//! heartbeats): that is kept in memory, shown by every read, and written every
//! [`PERSIST_PRESENCE_EVERY`] and on shutdown; a crash loses at most that much of last-seen
//! times, and the replay guard restored after it may be that far behind (an envelope replayed
//! within that window can do no more than such a heartbeat did: refresh last-seen).

use std::sync::Arc;
use std::time::Duration;

use boottorrent_proto::{DeploymentId, EVENTS_FILTER, MachineId, ZoneId, now_ms};
use futures_util::FutureExt;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::server::broker::Running;
use crate::server::deployment::{Deployment, ImageRef};
use crate::server::external_broker::External;
use crate::server::fleet::{Fleet, FleetError, Live, NewDeployment};
use crate::server::health::Health;
use crate::server::metrics::Metrics;
use crate::server::registry::{Approval, ApproveError, Outgoing, Pin, Registry};
use crate::server::store::{MachineRecord, Store, StoreError};
use crate::server::zone::{Zone, ZoneSpec};

/// Most events applied in one batch (one transaction). Batches this big come only under load, when events queued during the previous commit.
const MAX_BATCH: usize = 4096;

/// Most events read from the broker and not yet applied; past this the orchestrator stops
/// reading and the broker holds the rest (its router hands a link only so many packets).
const MAX_PENDING: usize = 4 * MAX_BATCH;

/// How often last-seen times that changed nothing else are written (see
/// `Registry::persist_presence`); a crash loses at most this much of them.
pub const PERSIST_PRESENCE_EVERY: Duration = Duration::from_secs(60);

type Reply<T> = oneshot::Sender<Result<T, FleetError>>;

/// What the HTTP API asks of the orchestrator.
pub enum Request {
    Approve {
        machine: MachineId,
        /// The fingerprint of the key the operator approves.
        fingerprint: String,
        reply: oneshot::Sender<Result<Approval, ApproveError>>,
    },
    DeleteMachine {
        machine: MachineId,
        reply: oneshot::Sender<Result<MachineRecord, ApproveError>>,
    },
    /// Stores `key` for `machine` if the id is new (the broker certificate endpoint, before it
    /// issues one); answers once that is committed.
    PinNewKey {
        machine: MachineId,
        key: boottorrent_proto::PublicKeyBytes,
        reply: oneshot::Sender<Result<Pin, StoreError>>,
    },
    /// An approved machine's signed request came from this address.
    Observed {
        machine: MachineId,
        ip: std::net::IpAddr,
    },
    Deploy {
        request: NewDeployment,
        reply: Reply<Deployment>,
    },
    Cancel {
        id: DeploymentId,
        reply: Reply<Deployment>,
    },
    PutZone {
        id: ZoneId,
        spec: ZoneSpec,
        /// The zone's images, resolved and checked by the API.
        images: Vec<ImageRef>,
        reply: Reply<Zone>,
    },
    DeleteZone {
        id: ZoneId,
        reply: Reply<Zone>,
    },
}

/// Handle for sending requests to the running orchestrator.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Request>,
}

impl Handle {
    /// Sends a request and waits for its answer.
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> anyhow::Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| anyhow::anyhow!("the orchestrator is not running"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the orchestrator stopped before answering"))
    }

    pub async fn deploy(
        &self,
        request: NewDeployment,
    ) -> anyhow::Result<Result<Deployment, FleetError>> {
        self.ask(|reply| Request::Deploy { request, reply }).await
    }

    pub async fn cancel(&self, id: DeploymentId) -> anyhow::Result<Result<Deployment, FleetError>> {
        self.ask(|reply| Request::Cancel { id, reply }).await
    }

    pub async fn put_zone(
        &self,
        id: ZoneId,
        spec: ZoneSpec,
        images: Vec<ImageRef>,
    ) -> anyhow::Result<Result<Zone, FleetError>> {
        self.ask(|reply| Request::PutZone {
            id,
            spec,
            images,
            reply,
        })
        .await
    }

    pub async fn delete_zone(&self, id: ZoneId) -> anyhow::Result<Result<Zone, FleetError>> {
        self.ask(|reply| Request::DeleteZone { id, reply }).await
    }

    /// Approves a machine's waiting key if it has `fingerprint`; resolves once the approval
    /// is stored.
    pub async fn approve(
        &self,
        machine: MachineId,
        fingerprint: String,
    ) -> anyhow::Result<Result<Approval, ApproveError>> {
        self.ask(|reply| Request::Approve {
            machine,
            fingerprint,
            reply,
        })
        .await
    }

    /// Pins `key` for `machine` if the server has never seen the id; resolves once the key is
    /// stored (see `Registry::pin_new`).
    pub async fn pin_new_key(
        &self,
        machine: MachineId,
        key: boottorrent_proto::PublicKeyBytes,
    ) -> anyhow::Result<Result<Pin, StoreError>> {
        self.ask(|reply| Request::PinNewKey {
            machine,
            key,
            reply,
        })
        .await
    }

    /// Tells where an approved machine's signed request came from. Never waits: when the
    /// orchestrator is busy the report is dropped, and the machine's next request makes it.
    pub fn observed(&self, machine: MachineId, ip: std::net::IpAddr) {
        if self.tx.try_send(Request::Observed { machine, ip }).is_err() {
            tracing::debug!("orchestrator busy; an observed address waits for the next request");
        }
    }

    /// Forgets a machine (rejects its waiting key, or lets a reinstalled machine enroll again).
    pub async fn delete_machine(
        &self,
        machine: MachineId,
    ) -> anyhow::Result<Result<MachineRecord, ApproveError>> {
        self.ask(|reply| Request::DeleteMachine { machine, reply })
            .await
    }
}

/// Creates the request channel; the receiver goes to [`run`].
pub fn channel() -> (Handle, mpsc::Receiver<Request>) {
    let (tx, rx) = mpsc::channel(64);
    (Handle { tx }, rx)
}

/// The broker link in use, and the spares to fall back on.
struct Links {
    current: Option<(LinkTx, LinkRx)>,
    spares: Vec<(LinkTx, LinkRx)>,
    health: Health,
}

impl Links {
    /// Subscribes the next usable link to the events; `false` when none is left.
    fn next(&mut self, why: &str) -> bool {
        self.current = None;
        while let Some((mut tx, rx)) = self.spares.pop() {
            match tx.subscribe(EVENTS_FILTER) {
                Ok(_) => {
                    tracing::warn!(
                        spares_left = self.spares.len(),
                        "the broker link failed ({why}); continuing on a spare link"
                    );
                    if self.spares.is_empty() {
                        self.health.degraded(
                            "mqtt_link",
                            format!(
                                "on the last broker link after: {why}; restart the server to \
                                 get spares again"
                            ),
                        );
                    }
                    self.current = Some((tx, rx));
                    return true;
                }
                Err(e) => tracing::warn!("a spare broker link failed to subscribe: {e:?}"),
            }
        }
        self.health.degraded(
            "mqtt_link",
            format!(
                "no broker link left after: {why}; machines' events are not applied until the \
                 server is restarted (the HTTP API keeps serving)"
            ),
        );
        false
    }
}

/// The next notification of the current link; never resolves without one.
async fn notification(
    links: &mut Links,
) -> Result<Option<Notification>, rumqttd::local::LinkError> {
    match links.current.as_mut() {
        Some((_, rx)) => rx.next().await,
        None => std::future::pending().await,
    }
}

/// The orchestrator's way to the broker: links into the embedded rumqttd, or a client of an
/// external broker (`--broker`).
pub enum BrokerLink {
    Embedded(Running),
    External(External),
}

/// [`BrokerLink`] in use: the embedded links with their spares, or the external client.
enum Bus {
    Embedded(Links),
    External(External),
}

/// What arrived on the bus: the first of a batch.
enum Arrival {
    // Boxed: a notification is large, and the external client's events are small.
    Embedded(Box<Result<Option<Notification>, rumqttd::local::LinkError>>),
    External((Vec<u8>, Vec<u8>)),
}

impl Bus {
    /// The next arrival; never resolves without one (cancel-safe, for `select!`).
    async fn next(&mut self) -> Arrival {
        match self {
            Bus::Embedded(links) => Arrival::Embedded(Box::new(notification(links).await)),
            Bus::External(external) => match external.next().await {
                Some(event) => Arrival::External(event),
                // The driver stopped: only at shutdown, which the caller sees too.
                None => std::future::pending().await,
            },
        }
    }

    /// Collects `first` and whatever else already arrived (up to [`MAX_BATCH`]) into `batch`.
    async fn take(&mut self, first: Arrival, batch: &mut Vec<(Vec<u8>, Vec<u8>)>) {
        match (self, first) {
            (Bus::Embedded(links), Arrival::Embedded(first)) => {
                if let Err(e) = drain(*first, links, batch).await {
                    links.next(&e);
                }
            }
            (Bus::External(external), Arrival::External(first)) => {
                batch.push(first);
                while batch.len() < MAX_BATCH {
                    match external.try_next() {
                        Some(event) => batch.push(event),
                        None => break,
                    }
                }
            }
            _ => unreachable!("an arrival comes from the bus it is handed back to"),
        }
    }

    fn publish(&mut self, out: Vec<Outgoing>, metrics: &Metrics) {
        match self {
            Bus::Embedded(links) => publish(links, out, metrics),
            Bus::External(external) => {
                for Outgoing { topic, payload } in out {
                    match external.publish(topic.to_string(), payload) {
                        Ok(()) => {
                            metrics.command_published();
                            tracing::debug!(%topic, "published command");
                        }
                        Err(e) => {
                            metrics.command_failed();
                            tracing::error!(%topic, error = %e, "could not queue a command for the broker; the machine gets it at its next heartbeat");
                        }
                    }
                }
            }
        }
    }
}

/// Runs until `shutdown` is cancelled.
///
/// A failed broker link does not stop the server: the orchestrator moves to one of the
/// spare links made at start (rumqttd cannot make links once it runs), and when none is
/// left it keeps answering the API and reports itself degraded in `/healthz`. A client of an
/// external broker reconnects by itself (see `external_broker`).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    link: BrokerLink,
    registry: Registry,
    fleet: Fleet,
    mut requests: mpsc::Receiver<Request>,
    live: broadcast::Sender<Live>,
    metrics: Arc<Metrics>,
    health: Health,
    sweep_every: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut bus = match link {
        BrokerLink::Embedded(Running {
            mut link_tx,
            link_rx,
            spares,
        }) => {
            link_tx
                .subscribe(EVENTS_FILTER)
                .map_err(|e| anyhow::anyhow!("subscribing to {EVENTS_FILTER}: {e:?}"))?;
            Bus::Embedded(Links {
                current: Some((link_tx, link_rx)),
                spares,
                health,
            })
        }
        BrokerLink::External(external) => Bus::External(external),
    };
    let mut sweep = tokio::time::interval(sweep_every);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut persist = tokio::time::interval(PERSIST_PRESENCE_EVERY);
    persist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    persist.reset();
    let (jobs, done, applier) = Applier {
        store: registry.store().clone(),
        registry,
        fleet,
        live,
    }
    .spawn()?;
    let mut done = done;
    // Events read from the broker that the applier has not been handed yet, and whether it
    // is busy with a batch: while it commits one, the next one grows here.
    let mut pending: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut applying = false;
    tracing::info!("orchestrator listening on {EVENTS_FILTER}");

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            arrival = bus.next(), if pending.len() < MAX_PENDING => {
                let mut batch = Vec::new();
                bus.take(arrival, &mut batch).await;
                pending.append(&mut batch);
                if !applying && !pending.is_empty() {
                    applying = hand_over(&jobs, &mut pending)?;
                }
            }
            Some(finished) = done.recv() => {
                bus.publish(finished.out, &metrics);
                if finished.events {
                    applying = !pending.is_empty() && hand_over(&jobs, &mut pending)?;
                }
            }
            Some(request) = requests.recv() => send(&jobs, Job::Request(request))?,
            _ = sweep.tick() => send(&jobs, Job::Sweep)?,
            _ = persist.tick() => send(&jobs, Job::PersistPresence)?,
        }
    }
    // What the applier was handed is applied; last-seen times are persisted on the way out.
    let _ = jobs.send(Job::PersistPresence);
    drop(jobs);
    while let Some(finished) = done.recv().await {
        bus.publish(finished.out, &metrics);
    }
    if tokio::task::spawn_blocking(move || applier.join())
        .await
        .map_or(true, |joined| joined.is_err())
    {
        tracing::error!("the orchestrator's applier thread panicked");
    }
    tracing::info!("orchestrator stopped");
    Ok(())
}

/// Hands the applier the next batch from `pending` (the oldest [`MAX_BATCH`] events);
/// returns `true` (it is busy now).
fn hand_over(
    jobs: &std::sync::mpsc::Sender<Job>,
    pending: &mut Vec<(Vec<u8>, Vec<u8>)>,
) -> anyhow::Result<bool> {
    let batch = if pending.len() > MAX_BATCH {
        let rest = pending.split_off(MAX_BATCH);
        std::mem::replace(pending, rest)
    } else {
        std::mem::take(pending)
    };
    send(jobs, Job::Events(batch))?;
    Ok(true)
}

fn send(jobs: &std::sync::mpsc::Sender<Job>, job: Job) -> anyhow::Result<()> {
    jobs.send(job)
        .map_err(|_| anyhow::anyhow!("the orchestrator's applier thread stopped (see the log)"))
}

/// Work for the applier, in the order the orchestrator took it.
enum Job {
    Events(Vec<(Vec<u8>, Vec<u8>)>),
    Request(Request),
    /// Mark silent machines offline and quiet deployments stalled.
    Sweep,
    /// Write the last-seen times heard since the last time.
    PersistPresence,
}

/// What the applier did with one job.
struct Done {
    /// Commands to publish, now that what they follow from is committed.
    out: Vec<Outgoing>,
    /// The job was a batch of events (the applier is ready for the next one).
    events: bool,
}

/// The single writer: owns the registry and the fleet on a thread of its own, so that the
/// orchestrator keeps reading the broker while a batch is verified and committed (a commit
/// waits for the disk). Under load the next batch grows meanwhile: a batch per commit, and
/// commits no more often than the disk allows.
struct Applier {
    registry: Registry,
    fleet: Fleet,
    live: broadcast::Sender<Live>,
    /// The database the registry and the fleet write to, for the one transaction of a batch.
    store: Store,
}

type Spawned = (
    std::sync::mpsc::Sender<Job>,
    mpsc::UnboundedReceiver<Done>,
    std::thread::JoinHandle<()>,
);

impl Applier {
    fn spawn(mut self) -> anyhow::Result<Spawned> {
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let (done, done_rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("orchestrator".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let events = matches!(job, Job::Events(_));
                    let out = self.apply(job);
                    if done.send(Done { out, events }).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| anyhow::anyhow!("starting the orchestrator's applier thread: {e}"))?;
        Ok((jobs, done_rx, thread))
    }

    fn apply(&mut self, job: Job) -> Vec<Outgoing> {
        let Applier {
            registry,
            fleet,
            live,
            store,
        } = self;
        let now = now_ms();
        match job {
            Job::Events(batch) => {
                // One transaction for the whole batch: the registry's changes (machines,
                // keys, the log) and the deployments they move.
                let result = store.write(|tx| {
                    let handled = registry.handle_in(tx, &batch, fleet.zones(), now)?;
                    let fleet_out =
                        fleet.apply_in(tx, handled.accepted(), registry.signer(), now)?;
                    Ok((handled, fleet_out))
                });
                let (handled, fleet_out) = match result {
                    Ok((handled, fleet_out)) => (Ok(handled), Some(fleet_out)),
                    Err(e) => (Err(e), None),
                };
                fleet.finish(fleet_out.as_ref().map(|(_, moved)| moved));
                let outcome = registry.finish(handled, batch.len(), now);
                let mut out = outcome.out;
                if let Some((commands, _)) = fleet_out {
                    out.extend(commands);
                }
                for (machine, online) in outcome.presence {
                    show_presence(live, &machine, online, now);
                }
                out
            }
            Job::Request(request) => serve(request, registry, fleet),
            Job::Sweep => {
                match registry.sweep_offline(now) {
                    Ok(offline) if offline.is_empty() => {}
                    Ok(offline) => {
                        tracing::info!(
                            machines = offline.len(),
                            "marked machines offline after missed heartbeats"
                        );
                        for machine in offline {
                            show_presence(live, &machine, false, now);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "could not mark silent machines offline"),
                }
                fleet.sweep(now);
                Vec::new()
            }
            Job::PersistPresence => {
                registry.persist_presence();
                Vec::new()
            }
        }
    }
}

/// Collects `first` and whatever else the broker already queued (up to [`MAX_BATCH`]) into
/// `batch`; an error says why the link failed.
async fn drain(
    first: Result<Option<Notification>, rumqttd::local::LinkError>,
    links: &mut Links,
    batch: &mut Vec<(Vec<u8>, Vec<u8>)>,
) -> Result<(), String> {
    let Some((_, link_rx)) = links.current.as_mut() else {
        return Ok(());
    };
    let first = first.map_err(|e| format!("{e:?}"))?;
    collect(first, link_rx, batch).await?;
    while batch.len() < MAX_BATCH {
        match link_rx.next().now_or_never() {
            Some(Ok(n)) => collect(n, link_rx, batch).await?,
            Some(Err(e)) => return Err(format!("{e:?}")),
            None => break,
        }
    }
    Ok(())
}

/// Answers one API request; returns the commands it produced.
fn serve(request: Request, registry: &mut Registry, fleet: &mut Fleet) -> Vec<Outgoing> {
    let now = now_ms();
    let mut out = Vec::new();
    match request {
        Request::Approve {
            machine,
            fingerprint,
            reply,
        } => {
            let answer = registry
                .approve(&machine, &fingerprint, now)
                .map(|(approval, more)| {
                    out = more;
                    approval
                });
            let _ = reply.send(answer);
        }
        Request::DeleteMachine { machine, reply } => {
            let _ = reply.send(registry.delete(&machine, now));
        }
        Request::PinNewKey {
            machine,
            key,
            reply,
        } => {
            let _ = reply.send(registry.pin_new(&machine, key, fleet.zones(), now));
        }
        Request::Observed { machine, ip } => {
            match registry.observed(&machine, ip, fleet.zones(), now, &mut out) {
                Ok(Some(moved)) => fleet.rezoned(&[moved], registry.signer(), now, &mut out),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(machine = %machine, "storing the address a machine was seen at: {e}")
                }
            }
        }
        Request::Deploy { request, reply } => {
            let answer = fleet
                .create(request, registry.signer(), now)
                .map(|(d, more)| {
                    out = more;
                    d
                });
            let _ = reply.send(answer);
        }
        Request::Cancel { id, reply } => {
            let answer = fleet.cancel(&id, registry.signer(), now).map(|(d, more)| {
                out = more;
                d
            });
            let _ = reply.send(answer);
        }
        Request::PutZone {
            id,
            spec,
            images,
            reply,
        } => {
            let answer = fleet
                .put_zone(id, spec, &images, registry.signer(), now)
                .and_then(|(zone, more)| {
                    out = more;
                    rezone(registry, fleet, now, &mut out)?;
                    Ok(zone)
                });
            let _ = reply.send(answer);
        }
        Request::DeleteZone { id, reply } => {
            let answer = fleet
                .delete_zone(&id, registry.signer(), now)
                .and_then(|(zone, more)| {
                    out = more;
                    rezone(registry, fleet, now, &mut out)?;
                    Ok(zone)
                });
            let _ = reply.send(answer);
        }
    }
    out
}

/// After the zones changed: new memberships, configurations for the machines that moved, and
/// their deployments reconciled (a machine that joined a zone gets its images now rather than
/// at its next heartbeat).
fn rezone(
    registry: &mut Registry,
    fleet: &mut Fleet,
    now: i64,
    out: &mut Vec<Outgoing>,
) -> Result<(), FleetError> {
    let moved = registry.rezone(fleet.zones(), now, out)?;
    fleet.rezoned(&moved, registry.signer(), now, out);
    Ok(())
}

fn show_presence(live: &broadcast::Sender<Live>, machine: &MachineId, online: bool, at_ms: i64) {
    let _ = live.send(Live::new(
        "machine",
        &crate::api::Presence {
            id: machine,
            online,
            at_ms,
        },
    ));
}

/// Adds a forwarded publish to the batch, or reschedules the link after `Unschedule`.
async fn collect(
    notification: Option<Notification>,
    link_rx: &mut LinkRx,
    batch: &mut Vec<(Vec<u8>, Vec<u8>)>,
) -> Result<(), String> {
    match notification {
        Some(Notification::Forward(forward)) => {
            batch.push((
                forward.publish.topic.to_vec(),
                forward.publish.payload.to_vec(),
            ));
        }
        Some(Notification::Unschedule) => link_rx
            .wake()
            .await
            .map_err(|e| format!("rescheduling the broker link: {e:?}"))?,
        _ => {}
    }
    Ok(())
}

fn publish(links: &mut Links, out: Vec<Outgoing>, metrics: &Metrics) {
    for Outgoing { topic, payload } in out {
        let Some((link_tx, _)) = links.current.as_mut() else {
            metrics.command_failed();
            continue;
        };
        // `publish` may block briefly on the router's bounded channel; we are inside a
        // multi-threaded runtime, so say so rather than stall a worker unannounced.
        match tokio::task::block_in_place(|| {
            link_tx
                .publish(topic.to_string(), payload)
                .map_err(Box::new)
        }) {
            Ok(_) => {
                metrics.command_published();
                tracing::debug!(%topic, "published command");
            }
            Err(e) => {
                metrics.command_failed();
                tracing::error!(%topic, error = ?e, "could not hand a command to the broker; the machine gets it at its next heartbeat");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real rumqttd router (no listeners needed for in-process links).
    fn router() -> rumqttd::Broker {
        let config: rumqttd::Config =
            toml::from_str(crate::server::broker::EMBEDDED_CONFIG).unwrap();
        rumqttd::Broker::new(config)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_broker_link_moves_to_a_spare_and_events_keep_coming() {
        let broker = router();
        let mut main = broker.link("boottorrent-orchestrator").unwrap();
        main.0.subscribe(EVENTS_FILTER).unwrap();
        let spare = broker.link("boottorrent-orchestrator-spare-1").unwrap();
        let health = Health::default();
        let mut links = Links {
            current: Some(main),
            spares: vec![spare],
            health: health.clone(),
        };
        // What one CONNECT with the orchestrator's client id did: the router drops the
        // older connection of that id.
        let _usurper = broker.link("boottorrent-orchestrator").unwrap();
        let mut batch = Vec::new();
        let failed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let n = notification(&mut links).await;
                if let Err(e) = drain(n, &mut links, &mut batch).await {
                    return e;
                }
            }
        })
        .await
        .expect("the usurped link reports its failure");
        assert!(links.next(&failed), "a spare was left");
        assert!(!health.problems().is_empty(), "on its last link: degraded");

        // Events published now reach the orchestrator through the spare.
        let (mut machine, _rx) = broker.link("pc-1").unwrap();
        machine
            .publish("boottorrent/evt/machine/pc-1/heartbeat", b"hb".to_vec())
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while batch.is_empty() {
                let n = notification(&mut links).await;
                drain(n, &mut links, &mut batch).await.unwrap();
            }
        })
        .await
        .expect("the event arrives through the spare");
        assert_eq!(batch[0].1, b"hb");

        // With no spare left, the orchestrator has no link but keeps running.
        assert!(!links.next("lost again"));
        assert!(links.current.is_none());
        assert!(health.problems()["mqtt_link"].contains("no broker link left"));
    }
}
