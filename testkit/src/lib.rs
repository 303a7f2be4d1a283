//! The one process harness of BootTorrent's end-to-end tests, shared by every crate's tests.
//!
//! - [`process`]: a child process that logs to a file, is stopped with SIGTERM then SIGKILL
//!   after a deadline, is killed when dropped, and shows its log when the test fails.
//! - [`binary`]: where our binaries are (the target dir the running test was built into),
//!   built once when missing or older than their sources.
//! - [`server`]: `boottorrent serve` on free ports with its own data directory, waited for
//!   until healthy, read through its HTTP API; [`mqtt`]: the operator's side of its broker,
//!   through `mosquitto_pub` and `mosquitto_sub`.
//! - [`agent`](mod@agent): `boottorrent-agent` enrolled with and run against such a server.
//! - [`images`], [`tls`], [`libtorrent`]: what the tests feed the server and the standard
//!   clients they measure it against; [`ports`]: ports no other process takes.
//!
//! It drives our programs only as processes (over HTTP, MQTT and their command lines), so it
//! depends on neither the server package nor `proto`: the agent's tests use it too. Its few
//! dependencies are small: `reqwest`'s blocking client and `serde_json` for the HTTP API,
//! `libc` for signals, `hex` for `mosquitto_sub`'s payloads.

pub mod agent;
pub mod binary;
pub mod images;
pub mod libtorrent;
pub mod mqtt;
pub mod ports;
pub mod process;
pub mod server;
pub mod tls;
pub mod wine;

pub use agent::{KEEPALIVE_SECS, agent, enroll, marker_boot_script, run_agent, run_agent_command};
pub use binary::{agent_binary, loadgen_binary, server_binary, windows_agent_binary};
pub use images::{catalogue, make_vhdx};
pub use libtorrent::{Encryption, libtorrent_download, torrent_announcing_to};
pub use mqtt::Subscription;
pub use ports::free_port;
pub use process::{Proc, output, run_within, spawn, spawn_reading_stdout};
pub use server::Server;
pub use tls::{TlsFiles, make_tls_files};

/// aria2c's options that keep it to the peers a tracker names: DHT, local peer discovery and
/// peer exchange would otherwise send traffic past loopback.
pub const ARIA2C_NO_DISCOVERY: [&str; 4] = [
    "--enable-dht=false",
    "--enable-dht6=false",
    "--bt-enable-lpd=false",
    "--enable-peer-exchange=false",
];

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a test waits for something that should happen "at once" (a process listening,
/// a message arriving).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Polls `check` every 50 ms until it returns `Some`, failing the test after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`wait_until`] with [`PATIENCE`].
pub fn wait_for<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    wait_until(what, PATIENCE, check)
}

/// Fails with a clear message when a command the tests need is missing: a missing tool is a
/// failure, never a skip (`scripts/test` installs them all).
pub fn require_tool(name: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not installed (Debian package {package}); run scripts/test, which installs it"
    );
}

/// A client id for one more operator MQTT session: the server admits `admin` and `admin-*`
/// for user `admin`, and two sessions with one id would drop each other.
pub fn admin_client_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("admin-{}-{n}", std::process::id())
}
