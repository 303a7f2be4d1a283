//! What the embedded broker logs, told the way an operator needs it.
//!
//! rumqttd logs through `tracing` at levels meant for its developers: an ordinary client
//! disconnect is an ERROR, every accepted socket an INFO line, and a failing `accept()` (out
//! of file descriptors) an ERROR per attempt in a loop without pause: 1.5 GB of log in 45 s.
//! It also refuses a CONNECT without username before our login check runs, so such a refusal
//! was neither counted nor logged. We cannot change rumqttd (upstream would need: a hook for
//! every refused CONNECT, a pause after a failed accept, and levels for disconnects), so its
//! events are taken off the normal log by the filter in `main` and come here instead: each is
//! re-told under the target `boottorrent::broker` at a level that matches what happened,
//! repeated failures are summed up once per [`REPORT_EVERY`], and refused logins are counted.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use crate::server::metrics::Metrics;

/// At most one summary of repeated broker failures per this interval.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// The target rumqttd logs under, and the one its events are re-told under.
pub const RUMQTTD: &str = "rumqttd";
const TARGET: &str = "boottorrent::broker";

/// The server's counters, once the server has made them (the log is set up before).
static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();

thread_local! {
    /// Set by our login check when it refuses, so that rumqttd's report of the same refusal
    /// (which follows on the same thread: the check's future is ready at once, so nothing
    /// runs in between) is not counted twice.
    static REFUSED_BY_US: Cell<bool> = const { Cell::new(false) };
}

/// Hands the layer the server's counters.
pub fn count_into(metrics: Arc<Metrics>) {
    let _ = METRICS.set(metrics);
}

/// Counts and logs panics on rumqttd's threads. rumqttd runs its listeners and router on
/// threads and tasks of its own; tokio catches a panicking task and the panic only reaches
/// stderr. A panic there can leave rumqttd's state poisoned (issue #17), so each one is also
/// logged through `tracing` with where it happened and counted in
/// `boottorrent_mqtt_broker_panics_total`; whether the broker still admits clients is the
/// health probe's to say. The previous hook still runs (the usual message on stderr).
pub fn report_panics(metrics: Arc<Metrics>) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Some(location) = info.location().filter(|l| l.file().contains("/rumqttd-")) {
            metrics.mqtt_broker_panicked();
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(
                target: TARGET,
                %location,
                "the embedded MQTT broker panicked: {message}; see /healthz"
            );
        }
        previous(info);
    }));
}

/// Called by the login check for each refusal it counted and logged itself.
pub fn refused_by_us() {
    REFUSED_BY_US.with(|r| r.set(true));
}

/// The layer that re-tells rumqttd's events.
#[derive(Default)]
pub struct BrokerLog {
    accept_failures: Mutex<Repeated>,
    cursor_jumps: Mutex<Repeated>,
}

/// One kind of failure that can come thousands of times a second, told once per
/// [`REPORT_EVERY`] with how many there were.
#[derive(Default)]
struct Repeated {
    count: u64,
    last_error: String,
    reported_at: Option<Instant>,
}

impl Repeated {
    /// Counts one more; when a report is due, returns how many since the last report (this
    /// one included) and starts counting afresh.
    fn note(&mut self, error: &str, now: Instant) -> Option<u64> {
        self.count += 1;
        self.last_error.clear();
        self.last_error.push_str(error);
        if self
            .reported_at
            .is_some_and(|at| now.duration_since(at) < REPORT_EVERY)
        {
            return None;
        }
        self.reported_at = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

impl<S: Subscriber> Layer<S> for BrokerLog {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if !event.metadata().target().starts_with(RUMQTTD) {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.retell(*event.metadata().level(), &fields);
    }
}

impl BrokerLog {
    fn retell(&self, level: Level, fields: &Fields) {
        let message = fields.message.as_str();
        let error = fields.error.as_str();
        match message {
            "Error while handling MQTT connect packet" if error.contains("InvalidAuth") => {
                if REFUSED_BY_US.with(|r| r.replace(false)) {
                    return;
                }
                if let Some(metrics) = METRICS.get() {
                    metrics.mqtt_login_refused();
                }
                tracing::info!(target: TARGET, "refused MQTT login: CONNECT without username and password");
            }
            // A client that connected and never sent CONNECT, or sent something else.
            "Error while handling MQTT connect packet" => {
                tracing::debug!(target: TARGET, error, "MQTT connection closed before login");
            }
            // Clients going away, normally or not, are part of a fleet's day.
            "disconnected" | "router-drop" | "connection-stop" => {
                tracing::debug!(target: TARGET, error, "MQTT client disconnected ({message})");
            }
            // The router handling one client's disconnect twice (rumqttd reuses connection
            // ids, and the second disconnect can close a newer client that got the same id;
            // it reconnects). Nothing an operator can act on.
            m if m.starts_with("no-connection id") => {
                tracing::debug!(target: TARGET, "{m}");
            }
            "Unable to accept socket." => self.accept_failed(error),
            // The router's report of a subscriber moved past messages it had not read; the
            // commit log's own warning just before it ("... jumping to head") says the same.
            "" if error.starts_with("Read cursor start jumped") => self.cursor_jumped(error),
            m if m.ends_with("jumping to head") || m.starts_with("offset specified") => {
                tracing::trace!(target: TARGET, "{m}");
            }
            "accept" => {}
            _ => match level {
                Level::ERROR | Level::WARN => {
                    tracing::warn!(target: TARGET, "{message}{}", fields.rest)
                }
                Level::INFO => tracing::debug!(target: TARGET, "{message}{}", fields.rest),
                _ => tracing::trace!(target: TARGET, "{message}{}", fields.rest),
            },
        }
    }

    /// rumqttd retries `accept()` at once; say so once per interval, with the count.
    fn accept_failed(&self, error: &str) {
        let mut repeated = self
            .accept_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(failures) = repeated.note(error, Instant::now()) {
            tracing::error!(
                target: TARGET,
                failures,
                error = %repeated.last_error,
                "the MQTT listener cannot accept connections (out of file descriptors? raise \
                 `ulimit -n` or LimitNOFILE); summed up every {} s",
                REPORT_EVERY.as_secs()
            );
        }
    }

    /// rumqttd keeps each subscription filter's messages in a log of bounded size (broker.toml's
    /// segments); a subscriber that falls further behind than the log holds is moved past what
    /// it missed, which rumqttd only logs as a warning. Those messages are lost to it: count
    /// every jump, and say so once per interval.
    fn cursor_jumped(&self, error: &str) {
        if let Some(metrics) = METRICS.get() {
            metrics.mqtt_broker_skipped();
        }
        let mut repeated = self.cursor_jumps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(skips) = repeated.note(error, Instant::now()) {
            tracing::error!(
                target: TARGET,
                skips,
                last = %repeated.last_error,
                "a subscriber of the embedded broker fell behind by more than the broker keeps \
                 for its filter, and missed messages (counted in \
                 boottorrent_mqtt_broker_skips_total); for the orchestrator's boottorrent/evt/# \
                 raise [router.custom_segment] in the broker config, or find what slows the \
                 server; summed up every {} s",
                REPORT_EVERY.as_secs()
            );
        }
    }
}

/// The fields of one rumqttd event: its message, its `error`, and the rest as ` k=v` text.
#[derive(Default)]
struct Fields {
    message: String,
    error: String,
    rest: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "error" => {
                let _ = write!(self.error, "{value:?}");
            }
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "error" => self.error.push_str(value),
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spinning_accept_loop_is_reported_once_per_interval() {
        let log = BrokerLog::default();
        for _ in 0..10_000 {
            log.accept_failed("Too many open files");
        }
        let repeated = log.accept_failures.lock().unwrap();
        // The first failure was reported; the other 9,999 wait for the next report.
        assert_eq!(repeated.count, 9_999);
        assert!(repeated.reported_at.is_some());
    }

    #[test]
    fn a_repeated_failure_is_reported_with_the_count_since_the_last_report() {
        let mut repeated = Repeated::default();
        let start = Instant::now();
        assert_eq!(repeated.note("a", start), Some(1));
        for _ in 0..4 {
            assert_eq!(repeated.note("b", start + Duration::from_secs(1)), None);
        }
        assert_eq!(repeated.note("c", start + REPORT_EVERY), Some(5));
        assert_eq!(repeated.last_error, "c");
    }

    #[test]
    fn a_subscriber_skipped_ahead_by_the_broker_is_counted_once_per_jump() {
        let log = BrokerLog::default();
        let warn = |message: &str, error: &str| {
            log.retell(
                Level::WARN,
                &Fields {
                    message: message.into(),
                    error: error.into(),
                    rest: String::new(),
                },
            )
        };
        for _ in 0..3 {
            // What rumqttd logs for one jump: the commit log's warning, then the router's.
            warn("given index 129 less than head 992, jumping to head", "");
            warn(
                "",
                "Read cursor start jumped from (129, 520) to (248, 992) on boottorrent/evt/#",
            );
        }
        let jumps = log.cursor_jumps.lock().unwrap();
        // The first was reported at once; two more wait for the next report.
        assert_eq!(jumps.count, 2);
        assert!(jumps.last_error.ends_with("on boottorrent/evt/#"));
    }

    #[test]
    fn a_refusal_by_our_check_is_not_counted_twice() {
        let log = BrokerLog::default();
        let fields = Fields {
            message: "Error while handling MQTT connect packet".into(),
            error: "InvalidAuth".into(),
            rest: String::new(),
        };
        refused_by_us();
        log.retell(Level::ERROR, &fields);
        assert!(!REFUSED_BY_US.with(Cell::get), "the flag is consumed");
    }
}
