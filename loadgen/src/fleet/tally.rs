//! What the simulated agents saw, counted as it happens: shared by every agent task and read
//! by the coordinator. Counters are atomics; the two maps sit behind mutexes that are held
//! only to insert.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};

use boottorrent_proto::DeploymentId;
use rumqttc::ConnectionError;
use tokio::time::Instant;

/// Per-agent flags.
const EVER_CONNECTED: u8 = 1;
const EVER_ANSWERED: u8 = 2;

pub struct Tally {
    start: Instant,
    flags: Vec<AtomicU8>,
    /// Agents with at least one CONNACK, and the ms after `start` when the last of them got
    /// its first.
    pub connected: AtomicUsize,
    pub last_first_connect_ms: AtomicU64,
    /// Agents the server answered (`machine_configuration`) at least once, and when the last
    /// of them got its first answer.
    pub answered: AtomicUsize,
    pub last_first_answer_ms: AtomicU64,
    /// CONNACKs after an agent's first.
    pub reconnects: AtomicU64,
    /// Connection attempts that failed before a CONNACK, by why.
    pub failed: Mutex<BTreeMap<&'static str, u64>>,
    /// Sessions lost after their CONNACK, by why.
    pub dropped: Mutex<BTreeMap<&'static str, u64>>,
    /// Messages the agents ignored (not verified, not addressed to them), and the first one.
    pub refused_commands: AtomicU64,
    pub first_refused_command: Mutex<Option<String>>,
    /// When each agent first received each deployment's assignment.
    pub assignments: Mutex<HashMap<DeploymentId, Vec<Instant>>>,
}

impl Tally {
    pub fn new(agents: usize, start: Instant) -> Tally {
        Tally {
            start,
            flags: (0..agents).map(|_| AtomicU8::new(0)).collect(),
            connected: AtomicUsize::new(0),
            last_first_connect_ms: AtomicU64::new(0),
            answered: AtomicUsize::new(0),
            last_first_answer_ms: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            failed: Mutex::new(BTreeMap::new()),
            dropped: Mutex::new(BTreeMap::new()),
            refused_commands: AtomicU64::new(0),
            first_refused_command: Mutex::new(None),
            assignments: Mutex::new(HashMap::new()),
        }
    }

    fn since_start_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Sets `flag` for agent `index`; whether it was newly set.
    fn first(&self, index: usize, flag: u8) -> bool {
        self.flags
            .get(index)
            .is_some_and(|f| f.fetch_or(flag, Ordering::Relaxed) & flag == 0)
    }

    pub fn connected(&self, index: usize) {
        if self.first(index, EVER_CONNECTED) {
            self.connected.fetch_add(1, Ordering::Relaxed);
            self.last_first_connect_ms
                .fetch_max(self.since_start_ms(), Ordering::Relaxed);
        } else {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn answered(&self, index: usize) {
        if self.first(index, EVER_ANSWERED) {
            self.answered.fetch_add(1, Ordering::Relaxed);
            self.last_first_answer_ms
                .fetch_max(self.since_start_ms(), Ordering::Relaxed);
        }
    }

    pub fn failed(&self, error: &ConnectionError) {
        *lock(&self.failed).entry(failure_kind(error)).or_default() += 1;
    }

    /// A certificate request that failed (an external broker's agents need one first); the
    /// first is printed, since its cause usually holds for all.
    pub fn failed_certificate(&self, error: &anyhow::Error) {
        let mut failed = lock(&self.failed);
        let count = failed.entry("certificate request failed").or_default();
        if *count == 0 {
            eprintln!("a certificate request failed: {error:#}");
        }
        *count += 1;
    }

    pub fn dropped(&self, error: &ConnectionError) {
        *lock(&self.dropped).entry(drop_kind(error)).or_default() += 1;
    }

    pub fn refused_command(&self, what: &str) {
        if self.refused_commands.fetch_add(1, Ordering::Relaxed) == 0 {
            *lock(&self.first_refused_command) = Some(what.to_owned());
        }
    }

    pub fn assigned(&self, deployment: DeploymentId, at: Instant) {
        lock(&self.assignments)
            .entry(deployment)
            .or_default()
            .push(at);
    }

    /// When agents received `deployment`'s assignment, so far.
    pub fn receipts(&self, deployment: &DeploymentId) -> Vec<Instant> {
        lock(&self.assignments)
            .get(deployment)
            .cloned()
            .unwrap_or_default()
    }
}

/// Why a connection attempt got no CONNACK: refused by the server (a CONNACK with an error
/// code), timed out (no TCP connection or no CONNACK within the connect timeout), or closed
/// (the server or the network ended the connection first).
fn failure_kind(error: &ConnectionError) -> &'static str {
    match error {
        ConnectionError::ConnectionRefused(_) => "refused",
        ConnectionError::NetworkTimeout => "timed out",
        ConnectionError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            "TCP refused"
        }
        _ => "closed",
    }
}

/// Why an established session ended.
fn drop_kind(error: &ConnectionError) -> &'static str {
    match error {
        ConnectionError::MqttState(rumqttc::StateError::AwaitPingResp) => "no PINGRESP",
        ConnectionError::MqttState(_) => "closed by the server",
        ConnectionError::Io(_) => "I/O error",
        ConnectionError::FlushTimeout => "write timed out",
        _ => "other",
    }
}

pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is one insert: a panic cannot leave the data half-changed.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
