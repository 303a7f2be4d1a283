//! Counters of what the server accepted and refused, served at `GET /metrics` in the
//! Prometheus text format. Lock-free: every subsystem bumps them from its own task.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why an MQTT event was dropped. Each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The topic is not one of BootTorrent's event topics.
    BadTopic,
    /// The payload does not decode as an envelope of the topic's event type.
    Malformed,
    /// The envelope's `from` differs from the machine id in the topic.
    SenderMismatch,
    /// A non-`startup` event from a machine the server does not know.
    UnknownMachine,
    /// The machine (or its new key) waits for the operator's approval.
    Unapproved,
    /// A known machine presented a different key than the approved one.
    KeyMismatch,
    /// The signature does not verify.
    BadSignature,
    /// The timestamp is outside the replay window.
    Stale,
    /// The seq is not above the last accepted one.
    Replayed,
    /// The event was valid but could not be stored; it is not acknowledged.
    StoreFailed,
    /// A new machine id over the enrollment rate or the cap of machines waiting for approval.
    EnrollmentLimited,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::BadTopic,
        DropReason::Malformed,
        DropReason::SenderMismatch,
        DropReason::UnknownMachine,
        DropReason::Unapproved,
        DropReason::KeyMismatch,
        DropReason::BadSignature,
        DropReason::Stale,
        DropReason::Replayed,
        DropReason::StoreFailed,
        DropReason::EnrollmentLimited,
    ];

    /// Label value in `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::BadTopic => "bad_topic",
            DropReason::Malformed => "malformed",
            DropReason::SenderMismatch => "sender_mismatch",
            DropReason::UnknownMachine => "unknown_machine",
            DropReason::Unapproved => "unapproved",
            DropReason::KeyMismatch => "key_mismatch",
            DropReason::BadSignature => "bad_signature",
            DropReason::Stale => "stale",
            DropReason::Replayed => "replayed",
            DropReason::StoreFailed => "store_failed",
            DropReason::EnrollmentLimited => "enrollment_limited",
        }
    }
}

/// What the MQTT front refused a machine's login (see `broker_front`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttRefusal {
    /// A subscription outside the commands meant for the machine.
    Subscribe,
    /// A publish on a topic other than the machine's own events.
    Publish,
    /// A last will on such a topic.
    Will,
}

impl MqttRefusal {
    pub const ALL: [MqttRefusal; 3] = [
        MqttRefusal::Subscribe,
        MqttRefusal::Publish,
        MqttRefusal::Will,
    ];

    /// Label value in `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            MqttRefusal::Subscribe => "subscribe",
            MqttRefusal::Publish => "publish",
            MqttRefusal::Will => "will",
        }
    }
}

/// The server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    events_received: AtomicU64,
    events_accepted: AtomicU64,
    events_dropped: [AtomicU64; DropReason::ALL.len()],
    commands_published: AtomicU64,
    commands_failed: AtomicU64,
    mqtt_logins_refused: AtomicU64,
    mqtt_refused: [AtomicU64; MqttRefusal::ALL.len()],
    mqtt_connections_open: AtomicU64,
    mqtt_connections_over_limit: AtomicU64,
    mqtt_new_ids_over_limit: AtomicU64,
    mqtt_client_limit: AtomicU64,
    mqtt_broker_panics: AtomicU64,
    mqtt_broker_skips: AtomicU64,
    http_unauthorized: AtomicU64,
}

/// A copy of the counters at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub events_received: u64,
    pub events_accepted: u64,
    pub events_dropped: Vec<(DropReason, u64)>,
    pub commands_published: u64,
    pub commands_failed: u64,
    pub mqtt_logins_refused: u64,
    pub mqtt_refused: Vec<(MqttRefusal, u64)>,
    pub mqtt_connections_open: u64,
    pub mqtt_connections_over_limit: u64,
    pub mqtt_new_ids_over_limit: u64,
    pub mqtt_client_limit: u64,
    pub mqtt_broker_panics: u64,
    pub mqtt_broker_skips: u64,
    pub http_unauthorized: u64,
}

impl Metrics {
    pub fn event_received(&self) {
        self.events_received.fetch_add(1, Ordering::Relaxed);
    }
    pub fn event_accepted(&self) {
        self.events_accepted.fetch_add(1, Ordering::Relaxed);
    }
    pub fn event_dropped(&self, reason: DropReason) {
        let i = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.events_dropped[i].fetch_add(1, Ordering::Relaxed);
    }
    pub fn command_published(&self) {
        self.commands_published.fetch_add(1, Ordering::Relaxed);
    }
    pub fn command_failed(&self) {
        self.commands_failed.fetch_add(1, Ordering::Relaxed);
    }
    pub fn mqtt_login_refused(&self) {
        self.mqtt_logins_refused.fetch_add(1, Ordering::Relaxed);
    }
    pub fn mqtt_refused(&self, what: MqttRefusal) {
        self.mqtt_refused[what as usize].fetch_add(1, Ordering::Relaxed);
    }
    /// The front relays one more client id to the broker.
    pub fn mqtt_connection_opened(&self) {
        self.mqtt_connections_open.fetch_add(1, Ordering::Relaxed);
    }
    /// The broker closed the last session of a client id the front relayed.
    pub fn mqtt_connection_closed(&self) {
        self.mqtt_connections_open.fetch_sub(1, Ordering::Relaxed);
    }
    /// The front refused a client because `mqtt_client_limit` were relayed.
    pub fn mqtt_connection_over_limit(&self) {
        self.mqtt_connections_over_limit
            .fetch_add(1, Ordering::Relaxed);
    }
    /// The front refused a client id the server has never seen because the slots left
    /// beside room for every known machine were taken.
    pub fn mqtt_new_id_over_limit(&self) {
        self.mqtt_new_ids_over_limit.fetch_add(1, Ordering::Relaxed);
    }
    /// How many clients the front relays at most (set once at start).
    pub fn set_mqtt_client_limit(&self, limit: usize) {
        self.mqtt_client_limit
            .store(u64::try_from(limit).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
    /// A thread of the embedded broker panicked.
    pub fn mqtt_broker_panicked(&self) {
        self.mqtt_broker_panics.fetch_add(1, Ordering::Relaxed);
    }
    /// A subscriber of the embedded broker fell behind the broker's log of its filter, and the
    /// broker skipped it past messages it had not read.
    pub fn mqtt_broker_skipped(&self) {
        self.mqtt_broker_skips.fetch_add(1, Ordering::Relaxed);
    }
    pub fn http_unauthorized(&self) {
        self.http_unauthorized.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            events_received: get(&self.events_received),
            events_accepted: get(&self.events_accepted),
            events_dropped: DropReason::ALL
                .iter()
                .zip(&self.events_dropped)
                .map(|(r, c)| (*r, get(c)))
                .collect(),
            commands_published: get(&self.commands_published),
            commands_failed: get(&self.commands_failed),
            mqtt_logins_refused: get(&self.mqtt_logins_refused),
            mqtt_refused: MqttRefusal::ALL
                .iter()
                .zip(&self.mqtt_refused)
                .map(|(r, c)| (*r, get(c)))
                .collect(),
            mqtt_connections_open: get(&self.mqtt_connections_open),
            mqtt_connections_over_limit: get(&self.mqtt_connections_over_limit),
            mqtt_new_ids_over_limit: get(&self.mqtt_new_ids_over_limit),
            mqtt_client_limit: get(&self.mqtt_client_limit),
            mqtt_broker_panics: get(&self.mqtt_broker_panics),
            mqtt_broker_skips: get(&self.mqtt_broker_skips),
            http_unauthorized: get(&self.http_unauthorized),
        }
    }

    /// The Prometheus text exposition of every counter, plus the gauges the caller measured.
    pub fn render(&self, machines_known: usize, machines_online: usize) -> String {
        let s = self.snapshot();
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "boottorrent_mqtt_events_received_total",
            "MQTT events the orchestrator read from the broker.",
            s.events_received,
        );
        counter(
            "boottorrent_mqtt_events_accepted_total",
            "MQTT events that verified and were applied.",
            s.events_accepted,
        );
        counter(
            "boottorrent_mqtt_commands_published_total",
            "Signed commands handed to the broker.",
            s.commands_published,
        );
        counter(
            "boottorrent_mqtt_commands_failed_total",
            "Commands that could not be encoded or handed to the broker.",
            s.commands_failed,
        );
        counter(
            "boottorrent_mqtt_logins_refused_total",
            "MQTT logins refused (wrong password or invalid username).",
            s.mqtt_logins_refused,
        );
        counter(
            "boottorrent_mqtt_connections_over_limit_total",
            "MQTT connections refused with CONNACK 3 (server unavailable) because boottorrent_mqtt_client_limit clients were connected.",
            s.mqtt_connections_over_limit,
        );
        counter(
            "boottorrent_mqtt_new_ids_over_limit_total",
            "MQTT connections of client ids the server has never seen refused with CONNACK 3 (server unavailable): the slots beside room for every known machine were taken.",
            s.mqtt_new_ids_over_limit,
        );
        counter(
            "boottorrent_mqtt_broker_panics_total",
            "Panics on the embedded broker's threads (rumqttd); see the log.",
            s.mqtt_broker_panics,
        );
        counter(
            "boottorrent_mqtt_broker_skips_total",
            "Times a subscriber of the embedded broker (the orchestrator, an agent) fell so far behind that the broker dropped messages it had not read and skipped it ahead; see the log.",
            s.mqtt_broker_skips,
        );
        counter(
            "boottorrent_http_unauthorized_total",
            "HTTP requests refused for a missing or wrong token (401), or a viewer token on a change (403).",
            s.http_unauthorized,
        );
        family(
            &mut out,
            "boottorrent_mqtt_events_dropped_total",
            "MQTT events dropped, by reason.",
            "counter",
            "reason",
            s.events_dropped
                .iter()
                .map(|(reason, value)| (reason.as_str(), *value)),
        );
        family(
            &mut out,
            "boottorrent_mqtt_refused_total",
            "MQTT packets of a machine's login refused by the topic rules, by kind (subscribe, publish, will).",
            "counter",
            "what",
            s.mqtt_refused
                .iter()
                .map(|(what, value)| (what.as_str(), *value)),
        );
        for (name, help, value) in [
            (
                "boottorrent_mqtt_connections_open",
                "MQTT clients (client ids) connected through the server's MQTT ports, plain and TLS.",
                s.mqtt_connections_open,
            ),
            (
                "boottorrent_mqtt_client_limit",
                "MQTT clients the server's MQTT ports admit at once (rumqttd's max_connections less the server's own links).",
                s.mqtt_client_limit,
            ),
            (
                "boottorrent_machines",
                "Machines known to the server.",
                machines_known as u64,
            ),
            (
                "boottorrent_machines_online",
                "Machines currently online.",
                machines_online as u64,
            ),
            (
                "boottorrent_machines_offline",
                "Machines known but not connected.",
                machines_known.saturating_sub(machines_online) as u64,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}

/// Writes one metric family with one label: `name{label="value"} n` per row. Label values
/// must be ids or fixed words (nothing here escapes quotes).
pub fn family<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    kind: &str,
    label: &str,
    rows: impl IntoIterator<Item = (&'a str, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (value, n) in rows {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter() {
        let m = Metrics::default();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            for _ in 0..=i {
                m.event_dropped(*r);
            }
        }
        let text = m.render(3, 1);
        for (i, r) in DropReason::ALL.iter().enumerate() {
            let line = format!(
                "boottorrent_mqtt_events_dropped_total{{reason=\"{}\"}} {}",
                r.as_str(),
                i + 1
            );
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        assert!(text.contains("boottorrent_machines_online 1\n"));
    }
}
