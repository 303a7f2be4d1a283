//! The machine registry: turns MQTT events into machine state, and decides who is trusted.
//!
//! Trust works per machine key. A machine's first `startup` carries its Ed25519 public key and
//! is signed with it, which proves the sender holds the private key. With auto-approve (trust
//! on first use) that key is approved at once; otherwise it waits for the operator. Every
//! later event must be signed by the approved key. A known machine that presents a different
//! key is refused until the operator approves the new one, so the shared enrollment token
//! alone never lets anyone speak for a machine that already exists. Behind an external broker,
//! the agent asks for its broker certificate before its first startup: that request stores the
//! new id's key the same way ([`Registry::pin_new`]), and the startup then finds it known.
//!
//! The registry is synchronous and owns the write side of machines and keys; the
//! orchestrator feeds it batches from the broker and publishes what it returns.

use std::collections::HashMap;
use std::sync::Arc;

use boottorrent_proto::{
    Command, CommandKind, Encoding, Envelope, Event, MachineConfiguration, MachineId, Presence,
    PublicKeyBytes, ReplayError, ReplayGuard, Scope, SenderId, SigningKey, Topic, ZoneId,
    decode_event, detect, fingerprint, verifying_key_from_bytes,
};
use sha2::{Digest, Sha256};

use crate::server::enrollment::{self, Gate};
use crate::server::keyring::Keyring;
use crate::server::metrics::{DropReason, Metrics};
use crate::server::store::{Batch, KeyRecord, MachineRecord, Store, StoreError};
use crate::server::zone::{self, Zone};

/// A command ready for the broker.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: Topic,
    pub payload: Vec<u8>,
}

/// Signs commands with the server key. There is one per server: agents refuse a repeated
/// `seq`, so every command must take its number from the same counter.
pub struct Signer(boottorrent_proto::Signer);

impl Signer {
    pub fn new(key: SigningKey, now_ms: i64) -> Signer {
        Signer(boottorrent_proto::Signer::new(
            SenderId::server(),
            key,
            now_ms,
        ))
    }

    /// Signs and encodes `command` for `topic`; `None` (logged) if it cannot be encoded.
    pub fn sign(
        &mut self,
        topic: Topic,
        command: Command,
        encoding: Encoding,
        now_ms: i64,
    ) -> Option<Outgoing> {
        let signed = self.0.sign(&topic, command, encoding, now_ms);
        match signed {
            Ok(payload) => Some(Outgoing { topic, payload }),
            Err(e) => {
                tracing::error!(topic = %topic, error = %e, "could not encode a command");
                None
            }
        }
    }
}

/// An event from a trusted machine, after the registry applied it, for the deployments.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The machine as stored after the event.
    pub machine: MachineRecord,
    pub event: Event,
}

/// What a batch of events produced.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Commands to publish.
    pub out: Vec<Outgoing>,
    /// Events from trusted machines, in arrival order.
    pub accepted: Vec<Accepted>,
    /// Machines that went online (`true`) or offline.
    pub presence: Vec<(MachineId, bool)>,
}

/// Settings the registry needs from the server config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub auto_approve: bool,
    pub heartbeat_interval_secs: u32,
    pub replay_window_ms: i64,
    pub enrollment: enrollment::Limits,
}

/// Result of an operator's approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    /// The waiting key is now the machine's key.
    Approved(PublicKeyBytes),
    /// Nothing was waiting; the machine's key was already approved.
    AlreadyApproved(PublicKeyBytes),
}

/// What became of a certificate request's key for an id (see [`Registry::pin_new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// The id was new: the key is stored for it.
    Pinned,
    /// The server knows the id already, by this key (approved, else the one waiting), or by
    /// none.
    Known(Option<PublicKeyBytes>),
    /// The id is new, but the enrollment gate admits no new id now.
    Refused(enrollment::Refused),
}

/// Why an approval could not be done.
#[derive(Debug, thiserror::Error)]
pub enum ApproveError {
    #[error("no machine {0} is known; it must send a startup first")]
    UnknownMachine(MachineId),
    #[error("machine {0} has no key waiting for approval and none approved")]
    NothingToApprove(MachineId),
    #[error(
        "machine {machine} waits with key {waiting}, not {presented}; compare with the \
         fingerprint the agent prints, and approve the key it shows"
    )]
    WrongKey {
        machine: MachineId,
        presented: String,
        waiting: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What happened to one event.
enum Verdict {
    Accepted,
    Dropped(DropReason, String),
}

/// What [`Registry::handle_in`] did in a transaction not yet committed.
pub struct Handled {
    outcome: BatchOutcome,
    verdicts: Vec<Verdict>,
}

impl Handled {
    /// The events from trusted machines, for the fleet to apply in the same transaction.
    pub fn accepted(&self) -> &[Accepted] {
        &self.outcome.accepted
    }
}

pub struct Registry {
    store: Store,
    settings: Settings,
    signer: Signer,
    guard: ReplayGuard,
    /// The keys the broker checks logins against; mirrors every key stored.
    keyring: Keyring,
    /// Admits new machine ids at a bounded rate.
    gate: Gate,
    /// Machines waiting for approval (kept counted so the gate need not scan).
    pending: usize,
    /// Config hash last sent to each machine since this process started; a machine that has
    /// not got its current configuration gets it on its next accepted event.
    configured: HashMap<MachineId, String>,
    /// Approved keys as points, by machine: decompressing the key for every event was a
    /// quarter of verifying it. Checked against the approved key's bytes at each use.
    verifying: HashMap<MachineId, (PublicKeyBytes, boottorrent_proto::VerifyingKey)>,
    /// The longest heartbeat interval sent to any machine since this process started: a
    /// machine told a longer interval than today's keeps it until its next event, and must not
    /// be swept offline meanwhile.
    longest_told_secs: u32,
    metrics: Arc<Metrics>,
}

/// How many heartbeats a second the whole fleet may send before the server lengthens the
/// interval. Heartbeats are nearly all of the server's idle CPU (about 0.6 ms each across the
/// MQTT front, rumqttd and the orchestrator; docs/benchmarks.md), so this keeps a campus's
/// idle load near what 3,000 machines at 30 s cost.
const FLEET_HEARTBEATS_PER_SEC: u32 = 100;

/// The heartbeat interval to give machines when the fleet has `machines` of them: the
/// operator's `configured` one, lengthened in steps of 30 s so that the fleet sends at most
/// [`FLEET_HEARTBEATS_PER_SEC`]. Steps, not a smooth curve, because each change re-sends every
/// machine its configuration.
fn heartbeat_interval_for(configured: u32, machines: usize) -> u32 {
    let machines = u32::try_from(machines).unwrap_or(u32::MAX);
    let needed = machines.div_ceil(FLEET_HEARTBEATS_PER_SEC);
    if needed <= configured {
        configured
    } else {
        needed.div_ceil(30).saturating_mul(30)
    }
}

impl Registry {
    /// Builds the registry and restores each machine's last accepted seq, so that envelopes
    /// captured before a restart cannot be replayed after it.
    pub fn new(
        store: Store,
        settings: Settings,
        server_key: SigningKey,
        keyring: Keyring,
        metrics: Arc<Metrics>,
        now_ms: i64,
    ) -> Result<Registry, StoreError> {
        let mut guard = ReplayGuard::new(settings.replay_window_ms);
        let mut pending = 0;
        for (machine, keys) in store.machines()? {
            if machine.last_seq > 0 {
                guard.restore(SenderId::from(machine.id.clone()), machine.last_seq);
            }
            if let Some(key) = keys.approved {
                keyring.set(&machine.id, key, true);
            } else if let Some(key) = keys.pending {
                keyring.set(&machine.id, key, false);
            }
            if keys.approved.is_none() && keys.pending.is_some() {
                pending += 1;
            }
        }
        Ok(Registry {
            store,
            gate: Gate::new(settings.enrollment, now_ms),
            settings,
            signer: Signer::new(server_key, now_ms),
            guard,
            keyring,
            pending,
            configured: HashMap::new(),
            verifying: HashMap::new(),
            longest_told_secs: 0,
            metrics,
        })
    }

    /// Applies a batch of events inside `batch`, a transaction the caller commits (the
    /// orchestrator writes the fleet's changes in the same one); hand what this returns,
    /// with whether the commit worked, to [`Registry::finish`].
    pub fn handle_in(
        &mut self,
        batch: &mut Batch<'_>,
        events: &[(Vec<u8>, Vec<u8>)],
        zones: &[Zone],
        now_ms: i64,
    ) -> Result<Handled, StoreError> {
        let mut outcome = BatchOutcome::default();
        let mut verdicts = Vec::with_capacity(events.len());
        for (topic, payload) in events {
            self.metrics.event_received();
            verdicts.push(self.handle(batch, topic, payload, zones, now_ms, &mut outcome)?);
        }
        Ok(Handled { outcome, verdicts })
    }

    /// After the transaction of [`Registry::handle_in`] committed (or failed): counts the
    /// verdicts; the outcome to act on, empty if the batch was lost.
    pub fn finish(
        &mut self,
        result: Result<Handled, StoreError>,
        events: usize,
        now_ms: i64,
    ) -> BatchOutcome {
        self.gate.report(now_ms);
        match result {
            Ok(Handled { outcome, verdicts }) => {
                for verdict in verdicts {
                    match verdict {
                        Verdict::Accepted => self.metrics.event_accepted(),
                        Verdict::Dropped(reason, why) => {
                            self.metrics.event_dropped(reason);
                            tracing::debug!(reason = reason.as_str(), "dropped event: {why}");
                        }
                    }
                }
                outcome
            }
            Err(e) => {
                tracing::error!(error = %e, events, "could not store a batch of events; they are dropped and machines will re-send their state");
                for _ in 0..events {
                    self.metrics.event_dropped(DropReason::StoreFailed);
                }
                // Machines configured in the failed batch must be configured again.
                self.configured.clear();
                BatchOutcome::default()
            }
        }
    }

    /// Handles one event inside the batch's transaction. Only store errors are `Err`.
    fn handle(
        &mut self,
        batch: &mut Batch<'_>,
        topic: &[u8],
        payload: &[u8],
        zones: &[Zone],
        now_ms: i64,
        outcome: &mut BatchOutcome,
    ) -> Result<Verdict, StoreError> {
        use Verdict::Dropped;
        let topic_text = match std::str::from_utf8(topic) {
            Ok(t) => t,
            Err(_) => return Ok(Dropped(DropReason::BadTopic, "topic is not UTF-8".into())),
        };
        let (machine, kind) = match topic_text.parse::<Topic>() {
            Ok(Topic::Event { machine, kind }) => (machine, kind),
            Ok(Topic::Command { .. }) => {
                return Ok(Dropped(
                    DropReason::BadTopic,
                    format!("{topic_text:?} is a command topic"),
                ));
            }
            Err(e) => {
                return Ok(Dropped(
                    DropReason::BadTopic,
                    format!("{topic_text:?}: {e}"),
                ));
            }
        };
        let envelope = match decode_event(kind, payload) {
            Ok(env) => env,
            Err(e) => {
                return Ok(Dropped(
                    DropReason::Malformed,
                    format!("{kind:?} from {machine}: {e}"),
                ));
            }
        };
        if envelope.from.as_str() != machine.as_str() {
            return Ok(Dropped(
                DropReason::SenderMismatch,
                format!("envelope from {} on the topic of {machine}", envelope.from),
            ));
        }
        let topic = Topic::Event {
            machine: machine.clone(),
            kind,
        };
        let existing = batch.machine(&machine)?;

        if let Event::Startup(startup) = &envelope.body {
            return self.startup(
                batch, &topic, &machine, &envelope, startup, existing, payload, zones, now_ms,
                outcome,
            );
        }

        let Some((mut record, keys)) = existing else {
            return Ok(Dropped(
                DropReason::UnknownMachine,
                format!("{kind:?} from unknown machine {machine}"),
            ));
        };
        let Some(approved) = keys.approved else {
            return Ok(Dropped(
                DropReason::Unapproved,
                format!("{kind:?} from {machine}, which waits for approval"),
            ));
        };
        if let Err(why) = self.verify_approved(&envelope, &topic, &machine, approved) {
            return Ok(Dropped(
                DropReason::BadSignature,
                format!("{kind:?} from {machine}: {why}"),
            ));
        }

        // The last will was signed when the agent connected, so it is older than what the
        // agent sent after it and would fail the replay checks. A correctly signed will is
        // accepted whatever its age; replaying one can do no more than this: mark the machine
        // offline until its next heartbeat.
        if let Event::Status(status) = &envelope.body
            && status.presence == Presence::Offline
        {
            if record.online {
                record.online = false;
                batch.put_machine(&record)?;
                batch.log(
                    now_ms,
                    Some(&machine),
                    "offline",
                    "last will: connection lost",
                )?;
                outcome.presence.push((machine.clone(), false));
            }
            self.configured.remove(&machine);
            return Ok(Verdict::Accepted);
        }

        if let Some(verdict) = self.replay_check(&envelope, now_ms) {
            return Ok(verdict);
        }
        // What the record was, to tell an event that changed only when the machine was
        // last heard from (most heartbeats): that is kept in memory, not written each time.
        let mut unchanged = record.clone();
        record.last_seq = envelope.seq;
        record.last_seen_ms = now_ms;
        let was_online = record.online;
        record.online = true;
        match &envelope.body {
            Event::Heartbeat(hb) => record.images = hb.images.clone(),
            Event::Progress(p) => {
                if let Some(held) = record.images.iter_mut().find(|h| h.image == p.image) {
                    held.bytes_done = p.bytes_done;
                    held.bytes_total = p.bytes_total;
                    held.state = p.state;
                }
            }
            Event::Status(_) | Event::Startup(_) => {}
            Event::Boot(report) => {
                let outcome = if report.ok { "succeeded" } else { "failed" };
                batch.log(
                    now_ms,
                    Some(&machine),
                    "boot",
                    format!("boot action {outcome}: {}", report.message),
                )?;
            }
            Event::Error(report) => {
                tracing::warn!(machine = %machine, code = %report.code, deployment = ?report.deployment.as_ref().map(|d| d.as_str()), "agent reports: {}", report.message);
                batch.log(
                    now_ms,
                    Some(&machine),
                    "error",
                    format!("{}: {}", report.code, report.message),
                )?;
            }
            Event::Shutdown(s) => {
                record.online = false;
                self.configured.remove(&machine);
                batch.log(now_ms, Some(&machine), "shutdown", s.reason.clone())?;
            }
        }
        if record.online && !was_online {
            batch.log(
                now_ms,
                Some(&machine),
                "online",
                format!("{kind:?} received"),
            )?;
        }
        if record.online != was_online {
            outcome.presence.push((machine.clone(), record.online));
        }
        unchanged.last_seq = record.last_seq;
        unchanged.last_seen_ms = record.last_seen_ms;
        if unchanged == record {
            batch.heard(&record)?;
        } else {
            batch.put_machine(&record)?;
        }
        self.guard.record(&envelope.from, envelope.seq);
        if record.online {
            self.configure_if_needed(&record, now_ms, &mut outcome.out);
        }
        outcome.accepted.push(Accepted {
            machine: record,
            event: envelope.body,
        });
        Ok(Verdict::Accepted)
    }

    /// A `startup`: the only event that may carry a key the server does not trust yet.
    ///
    /// It is verified with the key it carries, which proves only that the sender holds that
    /// key. So it changes nothing about a machine unless that key is the one the machine is
    /// known by: a startup for a known id under another key is dropped without touching the
    /// replay guard, presence, addresses, zones or the waiting key (a reinstalled machine is
    /// deleted by the operator and enrolls again). A new id is admitted through the
    /// enrollment gate and trusted on first use, or waits for approval.
    #[allow(clippy::too_many_arguments)]
    fn startup(
        &mut self,
        batch: &mut Batch<'_>,
        topic: &Topic,
        machine: &MachineId,
        envelope: &Envelope<Event>,
        startup: &boottorrent_proto::Startup,
        existing: Option<(MachineRecord, KeyRecord)>,
        payload: &[u8],
        zones: &[Zone],
        now_ms: i64,
        outcome: &mut BatchOutcome,
    ) -> Result<Verdict, StoreError> {
        use Verdict::Dropped;
        let presented = startup.public_key;
        if let Err(why) = verify(envelope, topic, &presented) {
            return Ok(Dropped(
                DropReason::BadSignature,
                format!("startup from {machine}: {why}"),
            ));
        }
        let (mut record, keys, is_new) = match existing {
            Some((record, keys)) => match (keys.approved, keys.pending) {
                (Some(approved), _) if approved == presented => (record, keys, false),
                (Some(approved), _) => {
                    return Ok(Dropped(
                        DropReason::KeyMismatch,
                        format!(
                            "startup from {machine} with key {} but it is known by {}",
                            fingerprint(&presented),
                            fingerprint(&approved)
                        ),
                    ));
                }
                (None, Some(pending)) if pending == presented && !self.settings.auto_approve => {
                    // A key pinned by a certificate request came before any startup: the
                    // first one fills in what the operator is shown. A write only when
                    // something changed, since a waiting agent repeats its startup.
                    let mut shown = record.clone();
                    apply_startup(&mut shown, startup, zones);
                    if shown != record {
                        batch.put_machine(&shown)?;
                    }
                    return Ok(Dropped(
                        DropReason::Unapproved,
                        format!("startup from {machine}, which waits for approval"),
                    ));
                }
                (None, Some(pending)) if pending == presented => {
                    // Auto-approve was switched on since the machine first came.
                    let mut keys = keys;
                    self.trust(batch, machine, &mut keys, presented, now_ms)?;
                    (record, keys, false)
                }
                (None, _) => {
                    return Ok(Dropped(
                        DropReason::KeyMismatch,
                        format!(
                            "startup from {machine} with key {} but key {} waits for approval",
                            fingerprint(&presented),
                            keys.pending.as_ref().map(fingerprint).unwrap_or_default()
                        ),
                    ));
                }
            },
            None => {
                if let Some(verdict) = self.replay_check(envelope, now_ms) {
                    return Ok(verdict);
                }
                if crate::server::broker::is_reserved(machine.as_str()) {
                    return Ok(Dropped(
                        DropReason::BadTopic,
                        format!("{machine} is reserved for the server"),
                    ));
                }
                if let Err(why) = self.admit(now_ms) {
                    return Ok(Dropped(
                        DropReason::EnrollmentLimited,
                        format!("new machine {machine} refused: {why:?}"),
                    ));
                }
                let (mut record, keys) = self.enroll(batch, machine, presented, now_ms)?;
                if keys.approved.is_none() {
                    // Shown to the operator to help decide; not trusted for anything else.
                    apply_startup(&mut record, startup, zones);
                    record.online = false;
                    batch.put_machine(&record)?;
                    return Ok(Dropped(
                        DropReason::Unapproved,
                        format!("startup from new machine {machine}, which waits for approval"),
                    ));
                }
                (record, keys, true)
            }
        };
        debug_assert_eq!(keys.approved, Some(presented));
        // A new machine's startup was checked before it could take a place in the gate.
        if !is_new && let Some(verdict) = self.replay_check(envelope, now_ms) {
            return Ok(verdict);
        }
        let was_online = record.online;
        apply_startup(&mut record, startup, zones);
        record.online = true;
        record.last_seen_ms = now_ms;
        record.last_seq = envelope.seq;
        record.prefers_json = detect(payload) == Ok(Encoding::Json);
        if !is_new && !was_online {
            batch.log(
                now_ms,
                Some(machine),
                "online",
                format!("startup, agent {}", startup.agent_version),
            )?;
        }
        if !was_online {
            outcome.presence.push((machine.clone(), true));
        }
        batch.put_machine(&record)?;
        self.guard.record(&envelope.from, envelope.seq);
        // A startup means the agent lost whatever it had: always answer it.
        self.configured.remove(machine);
        self.configure_if_needed(&record, now_ms, &mut outcome.out);
        outcome.accepted.push(Accepted {
            machine: record,
            event: Event::Startup(startup.clone()),
        });
        Ok(Verdict::Accepted)
    }

    /// Whether the enrollment gate lets one more new id in now (a refusal is counted there).
    fn admit(&mut self, now_ms: i64) -> Result<(), enrollment::Refused> {
        let needs_approval = !self.settings.auto_approve;
        self.gate.admit(now_ms, self.pending, needs_approval)
    }

    /// Stores a new id's key, the gate having admitted it: waiting for approval, or trusted on
    /// first use with auto-approve. The caller stores the record it returns (new, offline),
    /// filled in as far as it knows the machine.
    fn enroll(
        &mut self,
        batch: &mut Batch<'_>,
        machine: &MachineId,
        key: PublicKeyBytes,
        now_ms: i64,
    ) -> Result<(MachineRecord, KeyRecord), StoreError> {
        let needs_approval = !self.settings.auto_approve;
        let record = MachineRecord::new(machine.clone(), now_ms);
        let mut keys = KeyRecord::default();
        if needs_approval {
            keys.pending = Some(key);
            self.pending += 1;
            let detail = format!(
                "new machine with key {}; run `boottorrent machines approve {machine} {}`",
                fingerprint(&key),
                fingerprint(&key)
            );
            tracing::info!(machine = %machine, "{detail}");
            batch.log(now_ms, Some(machine), "awaiting_approval", detail)?;
            batch.put_keys(machine, &keys)?;
            self.keyring.set(machine, key, false);
        } else {
            self.trust(batch, machine, &mut keys, key, now_ms)?;
        }
        Ok((record, keys))
    }

    /// Pins `key` for `machine` if the server has never seen the id (the broker certificate
    /// endpoint, before it issues one): the machine is stored as a first `startup` would store
    /// it, waiting for approval or trusted with auto-approve, through the same enrollment gate,
    /// and committed before this returns, so a restart cannot let another key take the id.
    /// The machine's details come with its first startup.
    pub fn pin_new(
        &mut self,
        machine: &MachineId,
        key: PublicKeyBytes,
        zones: &[Zone],
        now_ms: i64,
    ) -> Result<Pin, StoreError> {
        // Read first: a known id, or one the gate refuses, costs no write transaction (a
        // token holder may ask for made-up ids as fast as it likes). This thread is the only
        // writer, so nothing stores the id between this read and the write.
        if let Some((_, keys)) = self.store.machine(machine)? {
            return Ok(Pin::Known(keys.approved.or(keys.pending)));
        }
        if let Err(why) = self.admit(now_ms) {
            self.gate.report(now_ms);
            return Ok(Pin::Refused(why));
        }
        let store = self.store.clone();
        let result = store.write(|batch| {
            let (mut record, _) = self.enroll(batch, machine, key, now_ms)?;
            record.zones = zone::membership(zones, &record.id, &record.observed_ips);
            batch.put_machine(&record)?;
            Ok(Pin::Pinned)
        });
        if result.is_err()
            && self
                .keyring
                .get(machine.as_str())
                .is_some_and(|k| k.key == key)
        {
            // Not stored after all: neither counted nor admitted at the broker.
            if !self.settings.auto_approve {
                self.pending = self.pending.saturating_sub(1);
            }
            self.keyring.remove(machine);
        }
        result
    }

    /// Makes `key` the machine's approved key (first use, or auto-approve switched on for a
    /// waiting machine).
    fn trust(
        &mut self,
        batch: &mut Batch<'_>,
        machine: &MachineId,
        keys: &mut KeyRecord,
        key: PublicKeyBytes,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if keys.pending.take().is_some() {
            self.pending = self.pending.saturating_sub(1);
        }
        keys.approved = Some(key);
        keys.approved_at_ms = Some(now_ms);
        batch.put_keys(machine, keys)?;
        batch.log(
            now_ms,
            Some(machine),
            "registered",
            format!("key {} trusted on first use", fingerprint(&key)),
        )?;
        self.keyring.set(machine, key, true);
        Ok(())
    }

    fn replay_check(&self, envelope: &Envelope<Event>, now_ms: i64) -> Option<Verdict> {
        match self
            .guard
            .check(&envelope.from, envelope.ts, envelope.seq, now_ms)
        {
            Ok(()) => None,
            Err(e @ ReplayError::Replayed { .. }) => Some(Verdict::Dropped(
                DropReason::Replayed,
                format!("from {}: {e}", envelope.from),
            )),
            Err(e) => Some(Verdict::Dropped(
                DropReason::Stale,
                format!("from {}: {e}", envelope.from),
            )),
        }
    }

    /// Queues the machine's configuration unless it already has the current one.
    fn configure_if_needed(
        &mut self,
        record: &MachineRecord,
        now_ms: i64,
        out: &mut Vec<Outgoing>,
    ) {
        let config = self.configuration(record);
        if self.configured.get(&record.id) == Some(&config.config_hash) {
            return;
        }
        let hash = config.config_hash.clone();
        let interval = config.heartbeat_interval_secs;
        let topic = Topic::Command {
            scope: Scope::Machine(record.id.clone()),
            kind: CommandKind::MachineConfiguration,
        };
        match self.signer.sign(
            topic,
            Command::MachineConfiguration(config),
            encoding_of(record),
            now_ms,
        ) {
            Some(outgoing) => {
                out.push(outgoing);
                self.configured.insert(record.id.clone(), hash);
                self.longest_told_secs = self.longest_told_secs.max(interval);
            }
            None => self.metrics.command_failed(),
        }
    }

    /// The configuration a machine should have.
    fn configuration(&self, record: &MachineRecord) -> MachineConfiguration {
        let mut config = MachineConfiguration {
            zones: record.zones.clone(),
            heartbeat_interval_secs: self.heartbeat_interval_secs(),
            download_limit_bps: None,
            upload_limit_bps: None,
            config_hash: String::new(),
        };
        // The hash lets an agent (and this registry) tell whether it has the current
        // configuration without comparing every field.
        let encoded = boottorrent_proto::encode(&config, Encoding::MessagePack).unwrap_or_default();
        config.config_hash = hex::encode(&Sha256::digest(&encoded)[..8]);
        config
    }

    /// The database the registry writes to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The server's one command signer, lent to whoever else sends commands.
    pub fn signer(&mut self) -> &mut Signer {
        &mut self.signer
    }

    /// Approves the key a machine is waiting with, if it is the key the operator names by
    /// its fingerprint, and queues the machine's configuration.
    pub fn approve(
        &mut self,
        machine: &MachineId,
        expected: &str,
        now_ms: i64,
    ) -> Result<(Approval, Vec<Outgoing>), ApproveError> {
        let store = self.store.clone();
        let approval = store.write(|batch| {
            let Some((_, mut keys)) = batch.machine(machine)? else {
                return Ok(Err(ApproveError::UnknownMachine(machine.clone())));
            };
            let Some(pending) = keys.pending else {
                return Ok(match keys.approved {
                    Some(key) if fingerprint(&key) == expected.trim() => {
                        Ok(Approval::AlreadyApproved(key))
                    }
                    Some(key) => Err(ApproveError::WrongKey {
                        machine: machine.clone(),
                        presented: expected.to_owned(),
                        waiting: fingerprint(&key),
                    }),
                    None => Err(ApproveError::NothingToApprove(machine.clone())),
                });
            };
            if fingerprint(&pending) != expected.trim() {
                return Ok(Err(ApproveError::WrongKey {
                    machine: machine.clone(),
                    presented: expected.to_owned(),
                    waiting: fingerprint(&pending),
                }));
            }
            keys.pending = None;
            let previous = keys.approved.replace(pending);
            keys.approved_at_ms = Some(now_ms);
            batch.put_keys(machine, &keys)?;
            let detail = match previous {
                Some(old) => format!(
                    "operator approved key {} replacing {}",
                    fingerprint(&pending),
                    fingerprint(&old)
                ),
                None => format!("operator approved key {}", fingerprint(&pending)),
            };
            batch.log(now_ms, Some(machine), "approved", detail)?;
            Ok(Ok(Approval::Approved(pending)))
        })??;
        let mut out = Vec::new();
        if let Approval::Approved(key) = approval {
            self.pending = self.pending.saturating_sub(1);
            self.keyring.set(machine, key, true);
            // The agent's startup was refused moments ago and it may be waiting: answer it now
            // rather than at its next heartbeat.
            if let Some((record, _)) = self.store.machine(machine)? {
                self.configured.remove(machine);
                self.configure_if_needed(&record, now_ms, &mut out);
            }
        }
        Ok((approval, out))
    }

    /// Forgets a machine: its record and keys go, so its id may enroll again (a reinstalled
    /// machine, or a made-up id the operator rejects). Its deployment history stays.
    pub fn delete(
        &mut self,
        machine: &MachineId,
        now_ms: i64,
    ) -> Result<MachineRecord, ApproveError> {
        let store = self.store.clone();
        let (record, keys) = store.write(|batch| {
            let Some((record, keys)) = batch.machine(machine)? else {
                return Ok(Err(ApproveError::UnknownMachine(machine.clone())));
            };
            batch.delete_machine(machine)?;
            let key = keys.approved.or(keys.pending);
            batch.log(
                now_ms,
                Some(machine),
                "deleted",
                format!(
                    "operator deleted the machine (key {}); the id may enroll again",
                    key.as_ref()
                        .map(fingerprint)
                        .unwrap_or_else(|| "none".into())
                ),
            )?;
            Ok(Ok((record, keys)))
        })??;
        if keys.approved.is_none() && keys.pending.is_some() {
            self.pending = self.pending.saturating_sub(1);
        }
        self.keyring.remove(machine);
        self.configured.remove(machine);
        self.verifying.remove(machine);
        Ok(record)
    }

    /// Records the address an approved machine's signed HTTP request came from, and the zones
    /// that gives it. Returns the machine when its zones changed, for the deployments.
    pub fn observed(
        &mut self,
        machine: &MachineId,
        ip: std::net::IpAddr,
        zones: &[Zone],
        now_ms: i64,
        out: &mut Vec<Outgoing>,
    ) -> Result<Option<MachineRecord>, StoreError> {
        let store = self.store.clone();
        let changed = store.write(|batch| {
            let Some((mut record, keys)) = batch.machine(machine)? else {
                return Ok(None);
            };
            if keys.approved.is_none() || record.observed_ips == [ip] {
                return Ok(None);
            }
            record.observed_ips = vec![ip];
            let zones = zone::membership(zones, &record.id, &record.observed_ips);
            let moved = zones != record.zones;
            if moved {
                batch.log(
                    now_ms,
                    Some(machine),
                    "zones",
                    format!("seen at {ip}; zones now [{}]", zone_list(&zones)),
                )?;
                record.zones = zones;
            }
            batch.put_machine(&record)?;
            Ok(Some((record, moved)))
        })?;
        let Some((record, moved)) = changed else {
            return Ok(None);
        };
        if !moved {
            return Ok(None);
        }
        if record.online {
            self.configure_if_needed(&record, now_ms, out);
        }
        Ok(Some(record))
    }

    /// Writes the last-seen times and seqs heard since the last call that nothing else
    /// wrote (see `Store::persist_presence`); an error is logged and retried next time.
    pub fn persist_presence(&mut self) {
        match self.store.persist_presence() {
            Ok(0) => {}
            Ok(n) => tracing::debug!(machines = n, "persisted last-seen times"),
            Err(e) => {
                tracing::error!(error = %e, "could not persist last-seen times; trying again later")
            }
        }
    }

    /// The heartbeat interval machines get now (see [`heartbeat_interval_for`]). Only
    /// approved machines count: anyone holding the enrollment token can add waiting ones, and
    /// must not be able to slow every machine's heartbeat that way.
    fn heartbeat_interval_secs(&self) -> u32 {
        let approved = self.keyring.known().saturating_sub(self.pending);
        heartbeat_interval_for(self.settings.heartbeat_interval_secs, approved)
    }

    /// Marks offline every machine that missed three heartbeat intervals (the longest any
    /// machine may still be keeping); returns them.
    pub fn sweep_offline(&mut self, now_ms: i64) -> Result<Vec<MachineId>, StoreError> {
        let interval = self.heartbeat_interval_secs().max(self.longest_told_secs);
        let limit_ms = 3 * i64::from(interval) * 1000;
        let stale = self.store.online_unheard_since(now_ms - limit_ms);
        if stale.is_empty() {
            return Ok(stale);
        }
        let offline = self.store.write(|batch| {
            let mut offline = Vec::new();
            for id in &stale {
                // Re-read inside the transaction: an event may have arrived since.
                if let Some((mut record, _)) = batch.machine(id)?
                    && record.online
                    && now_ms - record.last_seen_ms > limit_ms
                {
                    record.online = false;
                    batch.put_machine(&record)?;
                    batch.log(
                        now_ms,
                        Some(id),
                        "offline",
                        format!(
                            "no heartbeat for {} s",
                            (now_ms - record.last_seen_ms) / 1000
                        ),
                    )?;
                    offline.push(id.clone());
                }
            }
            Ok(offline)
        })?;
        for id in &stale {
            self.configured.remove(id);
        }
        Ok(offline)
    }

    /// Recomputes every machine's zones after the zones changed, stores the machines whose
    /// membership moved and queues their new configuration. Returns those machines.
    pub fn rezone(
        &mut self,
        zones: &[Zone],
        now_ms: i64,
        out: &mut Vec<Outgoing>,
    ) -> Result<Vec<MachineRecord>, StoreError> {
        let moved = self.store.write(|batch| {
            let mut moved = Vec::new();
            for (mut record, _) in self.store.machines()? {
                let zones = zone::membership(zones, &record.id, &record.observed_ips);
                if zones != record.zones {
                    batch.log(
                        now_ms,
                        Some(&record.id),
                        "zones",
                        format!("zones now [{}]", zone_list(&zones)),
                    )?;
                    record.zones = zones;
                    batch.put_machine(&record)?;
                    moved.push(record);
                }
            }
            Ok(moved)
        })?;
        for record in moved.iter().filter(|r| r.online) {
            self.configure_if_needed(record, now_ms, out);
        }
        Ok(moved)
    }
}

impl Registry {
    /// [`verify`] with the machine's approved key, decompressed once.
    fn verify_approved(
        &mut self,
        envelope: &Envelope<Event>,
        topic: &Topic,
        machine: &MachineId,
        approved: PublicKeyBytes,
    ) -> Result<(), String> {
        let key = match self.verifying.get(machine) {
            Some((bytes, key)) if *bytes == approved => *key,
            _ => {
                let key = verifying_key_from_bytes(&approved).map_err(|e| e.to_string())?;
                self.verifying.insert(machine.clone(), (approved, key));
                key
            }
        };
        envelope.verify(topic, &key).map_err(|e| e.to_string())
    }
}

fn verify(envelope: &Envelope<Event>, topic: &Topic, key: &PublicKeyBytes) -> Result<(), String> {
    let key = verifying_key_from_bytes(key).map_err(|e| e.to_string())?;
    envelope.verify(topic, &key).map_err(|e| e.to_string())
}

fn apply_startup(record: &mut MachineRecord, startup: &boottorrent_proto::Startup, zones: &[Zone]) {
    // Subnet zones go by the address the server saw, not the ones the machine claims.
    record.zones = zone::membership(zones, &record.id, &record.observed_ips);
    record.hostname = startup.hostname.clone();
    record.os = startup.os.clone();
    record.agent_version = startup.agent_version.clone();
    record.ips = startup.ips.clone();
    record.macs = startup.macs.clone();
    record.free_disk_bytes = startup.free_disk_bytes;
    record.images = startup.images.clone();
    record.running = startup.running.clone();
}

/// Zone ids for a log line: `a, b`.
fn zone_list(zones: &[ZoneId]) -> String {
    zones
        .iter()
        .map(ZoneId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The encoding a machine speaks.
pub fn encoding_of(record: &MachineRecord) -> Encoding {
    if record.prefers_json {
        Encoding::Json
    } else {
        Encoding::MessagePack
    }
}

#[cfg(test)]
mod tests {
    use super::heartbeat_interval_for;

    #[test]
    fn a_lab_keeps_the_operators_interval() {
        assert_eq!(heartbeat_interval_for(30, 0), 30);
        assert_eq!(heartbeat_interval_for(30, 300), 30);
        assert_eq!(heartbeat_interval_for(30, 3_000), 30);
        assert_eq!(heartbeat_interval_for(1, 50), 1);
        assert_eq!(heartbeat_interval_for(600, 10_000), 600);
    }

    #[test]
    fn a_campus_gets_longer_intervals_in_steps_of_thirty_seconds() {
        assert_eq!(heartbeat_interval_for(30, 3_001), 60);
        assert_eq!(heartbeat_interval_for(30, 6_000), 60);
        assert_eq!(heartbeat_interval_for(30, 6_001), 90);
        assert_eq!(heartbeat_interval_for(30, 10_000), 120);
        assert_eq!(heartbeat_interval_for(1, 10_000), 120);
        for machines in [3_001, 10_000, 50_000, 1_000_000] {
            let interval = heartbeat_interval_for(30, machines);
            assert!(
                machines as u32 / interval <= super::FLEET_HEARTBEATS_PER_SEC,
                "{machines} machines at {interval} s send more than the budget"
            );
        }
    }

    #[test]
    fn an_absurd_fleet_does_not_overflow() {
        assert!(heartbeat_interval_for(30, usize::MAX) >= 30);
    }
}
