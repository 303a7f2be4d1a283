//! Helpers for the swarm's interop tests: real processes on free 127.0.0.1 ports, each a
//! testkit [`Proc`], so killed and reaped when its handle drops and its log shown when the
//! test fails.
//!
//! - [`Tracker`]: `opentracker` with a whitelist (the Debian build refuses unlisted torrents).
//! - [`Aria2`]: an `aria2c` seeder or leecher.
//! - [`Libtorrent`]: a libtorrent seeder or leecher, driven by a small Python script
//!   ([`LT_SCRIPT`]) written into the test's temporary directory.
//! - [`Peer`]: our `boottorrent-peer` binary; its JSON lines are read by a thread and handed
//!   over a channel ([`Peer::wait_event`]).
//! - Fixtures: [`random_file`], [`make_torrent`] (python libtorrent's `create_torrent`),
//!   [`corrupt_pieces`], [`assert_same_file`].
//!
//! A missing tool fails the test with a message naming it; `scripts/test` installs them all.
//! Readiness is always polled (a tracker that answers, a seeder the tracker lists, an event
//! on stdout), never assumed after a fixed sleep.
#![allow(dead_code)] // each test binary uses a different subset

pub use boottorrent_testkit::{PATIENCE, free_port, require_tool, run_within, wait_until};

use boottorrent_testkit::{Proc, spawn, spawn_reading_stdout};

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Lines of a process's output kept for failure messages.
const KEPT_LINES: usize = 40;

/// A Python 3 that can `import libtorrent`. Debian's `python3-libtorrent` lives in the
/// system interpreter, which a pyenv or virtualenv `python3` earlier in PATH hides, so the
/// system path is tried first.
pub fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        for candidate in ["/usr/bin/python3", "python3"] {
            let ok = Command::new(candidate)
                .args(["-c", "import libtorrent"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return candidate.to_owned();
            }
        }
        panic!(
            "no python3 can `import libtorrent` (Debian package python3-libtorrent); \
             run scripts/test, which installs it"
        );
    })
}

/// Fills `path` with `len` random bytes.
pub fn random_file(path: &Path, len: u64) {
    use rand::RngCore;
    let mut file = std::io::BufWriter::new(File::create(path).unwrap());
    let mut rng = rand::rng();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        file.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    file.flush().unwrap();
}

/// Flips every byte in a run of up to 64 bytes in the middle of each listed piece, so that
/// each of those pieces fails its SHA-1 check.
pub fn corrupt_pieces(path: &Path, piece_len: u32, pieces: &[u32]) {
    use std::io::{Seek, SeekFrom};
    let mut file = File::options().read(true).write(true).open(path).unwrap();
    let len = file.metadata().unwrap().len();
    for &piece in pieces {
        let start = u64::from(piece) * u64::from(piece_len);
        assert!(
            start < len,
            "piece {piece} is beyond the end of {}",
            path.display()
        );
        // The last piece may be short.
        let size = (len - start).min(u64::from(piece_len));
        let mut run = vec![0u8; size.min(64) as usize];
        let at = start + (size - run.len() as u64) / 2;
        file.seek(SeekFrom::Start(at)).unwrap();
        file.read_exact(&mut run).unwrap();
        for b in &mut run {
            *b = !*b;
        }
        file.seek(SeekFrom::Start(at)).unwrap();
        file.write_all(&run).unwrap();
    }
    file.sync_all().unwrap();
}

/// Asserts that two files hold the same bytes, naming the first difference.
pub fn assert_same_file(expected: &Path, actual: &Path) {
    let a =
        std::fs::read(expected).unwrap_or_else(|e| panic!("reading {}: {e}", expected.display()));
    let b = std::fs::read(actual).unwrap_or_else(|e| panic!("reading {}: {e}", actual.display()));
    assert_eq!(
        a.len(),
        b.len(),
        "{} is {} bytes, {} is {} bytes",
        expected.display(),
        a.len(),
        actual.display(),
        b.len()
    );
    if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "{} differs from {} first at byte {at}",
            actual.display(),
            expected.display()
        );
    }
}

/// A `.torrent` made by python libtorrent's `create_torrent` (v1 only, single file).
#[derive(Debug, Clone)]
pub struct Torrent {
    /// The `.torrent` file.
    pub path: PathBuf,
    /// The v1 info hash, lowercase hex.
    pub info_hash: String,
    /// The file name inside the torrent (the data file's name).
    pub name: String,
    /// Piece length in bytes.
    pub piece_len: u32,
    /// Number of pieces.
    pub pieces: u32,
    /// Payload length in bytes.
    pub len: u64,
}

/// Writes `out`, a torrent of `data` announcing to `announce` with `piece_len`-byte pieces.
pub fn make_torrent(data: &Path, announce: &str, piece_len: u32, out: &Path) -> Torrent {
    let mut command = Command::new(python());
    command
        .arg(lt_script(out.with_extension("create.py")))
        .arg("create")
        .arg(data)
        .arg(announce)
        .arg(piece_len.to_string())
        .arg(out);
    let output = run_within(command, PATIENCE);
    assert!(
        output.status.success(),
        "creating the torrent failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let v: Value = serde_json::from_slice(&output.stdout).expect("create prints one JSON object");
    Torrent {
        path: out.to_owned(),
        info_hash: v["info_hash"].as_str().unwrap().to_owned(),
        name: v["name"].as_str().unwrap().to_owned(),
        piece_len: v["piece_len"].as_u64().unwrap() as u32,
        pieces: v["pieces"].as_u64().unwrap() as u32,
        len: v["size"].as_u64().unwrap(),
    }
}

/// Percent-encodes every byte of a hex info hash, as trackers expect in a query string.
fn url_encode_hex(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|pair| format!("%{}", std::str::from_utf8(pair).unwrap()))
        .collect()
}

/// One HTTP/1.0 GET against 127.0.0.1:`port`; the body, or `None` when nothing answered.
fn http_get(port: u16, path_and_query: &str) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path_and_query} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some(response[split + 4..].to_vec())
}

/// The integer after bencoded `key` in `body` (good enough for a flat tracker response).
fn bencoded_int(body: &[u8], key: &str) -> Option<u64> {
    let needle = format!("{}:{}i", key.len(), key);
    let at = body
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())?;
    let rest = &body[at + needle.len()..];
    let end = rest.iter().position(|&b| b == b'e')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// An `opentracker` process on a free 127.0.0.1 port.
///
/// Debian builds opentracker with a whitelist: torrents must be listed in a file, which it
/// re-reads on SIGHUP ([`Tracker::allow`]). It hands out the address a peer connected from,
/// so peers on loopback get 127.0.0.1 peers. Running as root it chroots to its directory and
/// drops to `nobody`, hence the world-readable directory and relative whitelist path.
pub struct Tracker {
    proc: Proc,
    /// TCP port of the HTTP tracker.
    pub port: u16,
    dir: PathBuf,
}

impl Tracker {
    /// Starts opentracker in `<parent>/tracker` and waits until it answers HTTP.
    pub fn start(parent: &Path) -> Tracker {
        require_tool("opentracker", "opentracker");
        let dir = parent.join("tracker");
        std::fs::create_dir_all(&dir).unwrap();
        set_mode(&dir, 0o755);
        // An all-zero line, so that the list is never empty (an empty file cannot be mapped
        // and is reported as missing).
        let whitelist = dir.join("whitelist");
        std::fs::write(&whitelist, format!("{}\n", "0".repeat(40))).unwrap();
        set_mode(&whitelist, 0o644);
        let port = free_port();
        let mut command = Command::new("opentracker");
        command
            .args(["-i", "127.0.0.1", "-p", &port.to_string()])
            .args(["-d", ".", "-w", "whitelist"])
            .current_dir(&dir)
            .stdin(Stdio::null());
        let proc = spawn(command, parent.join("tracker.log"));
        let mut tracker = Tracker { proc, port, dir };
        wait_until("opentracker to answer HTTP", PATIENCE, || {
            if let Some(status) = tracker.proc.exited() {
                panic!(
                    "opentracker exited with {status}:\n{}",
                    tracker.proc.log_tail(KEPT_LINES)
                );
            }
            http_get(tracker.port, "/scrape").map(|_| ())
        });
        tracker
    }

    /// The announce URL to put in torrents.
    pub fn announce_url(&self) -> String {
        format!("http://127.0.0.1:{}/announce", self.port)
    }

    /// Whitelists `torrent` and waits until the tracker accepts announces for it.
    pub fn allow(&mut self, torrent: &Torrent) {
        let mut file = File::options()
            .append(true)
            .open(self.dir.join("whitelist"))
            .unwrap();
        writeln!(file, "{}", torrent.info_hash).unwrap();
        drop(file);
        self.proc.sighup();
        // The list is reloaded by another thread; probe with an announce (opentracker skips
        // the whitelist for `stopped`, so the probe must be `started`), then take the probe
        // out of the swarm again before any real peer could be handed it.
        let hash = url_encode_hex(&torrent.info_hash);
        let query = |event: &str| {
            format!(
                "/announce?info_hash={hash}&peer_id=-PROBE0-000000000000&port=9\
                 &uploaded=0&downloaded=0&left=1&compact=1&event={event}"
            )
        };
        wait_until("opentracker to whitelist the torrent", PATIENCE, || {
            let body = http_get(self.port, &query("started"))?;
            (!body.windows(7).any(|w| w == b"failure")).then_some(())
        });
        http_get(self.port, &query("stopped")).expect("opentracker answers");
    }

    /// (seeders, leechers) the tracker currently lists for `torrent`.
    pub fn scrape(&self, torrent: &Torrent) -> (u64, u64) {
        let body = http_get(
            self.port,
            &format!("/scrape?info_hash={}", url_encode_hex(&torrent.info_hash)),
        )
        .unwrap_or_default();
        (
            bencoded_int(&body, "complete").unwrap_or(0),
            bencoded_int(&body, "incomplete").unwrap_or(0),
        )
    }

    /// Waits until the tracker lists at least `n` seeders of `torrent`: from then on every
    /// new leecher is handed one.
    pub fn wait_seeders(&self, torrent: &Torrent, n: u64) {
        wait_until(
            &format!("opentracker to list {n} seeder(s)"),
            PATIENCE,
            || (self.scrape(torrent).0 >= n).then_some(()),
        );
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// An `aria2c` process: BitTorrent only, no DHT, LPD or PEX, so it finds peers through the
/// tracker alone, on a free 127.0.0.1 port.
pub struct Aria2 {
    /// Logs its console output.
    proc: Proc,
    /// Its BitTorrent listen port.
    pub port: u16,
    /// Where its copy of the file lives.
    pub file: PathBuf,
    /// Its own log at level info: every message to and from each peer.
    pub message_log: PathBuf,
}

impl Aria2 {
    /// Seeds the complete `torrent.name` in `dir`. With `verify` the file is hashed first;
    /// without it aria2c serves whatever the file holds (`--bt-seed-unverified`), which is
    /// how a corrupted seeder is made.
    pub fn seed(torrent: &Torrent, dir: &Path, verify: bool) -> Aria2 {
        let args = [
            format!("--check-integrity={verify}"),
            "--bt-seed-unverified=true".into(),
            // Seed for ever: the test kills it.
            "--seed-ratio=0.0".into(),
        ];
        Aria2::start(torrent, dir, &args)
    }

    /// Downloads `torrent` into `dir` and exits 0 once the file is complete and verified.
    pub fn leech(torrent: &Torrent, dir: &Path) -> Aria2 {
        Aria2::start(torrent, dir, &["--seed-time=0".into()])
    }

    /// Like [`Aria2::leech`], but first checks the file already in `dir` and keeps its good
    /// pieces: a partial peer, which announces them with a bitfield.
    pub fn resume(torrent: &Torrent, dir: &Path) -> Aria2 {
        Aria2::start(
            torrent,
            dir,
            &["--seed-time=0".into(), "--check-integrity=true".into()],
        )
    }

    fn start(torrent: &Torrent, dir: &Path, extra: &[String]) -> Aria2 {
        require_tool("aria2c", "aria2");
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let log = dir.with_extension("aria2c.log");
        let message_log = dir.with_extension("aria2c.messages.log");
        let mut command = Command::new("aria2c");
        command
            .arg(format!("--dir={}", dir.display()))
            .arg(format!("--log={}", message_log.display()))
            .arg("--log-level=info")
            .arg(format!("--listen-port={port}"))
            .args(boottorrent_testkit::ARIA2C_NO_DISCOVERY)
            .args([
                "--bt-tracker-connect-timeout=10",
                "--bt-tracker-timeout=10",
                "--file-allocation=none",
                "--auto-file-renaming=false",
                "--allow-overwrite=true",
                "--summary-interval=1",
                "--console-log-level=notice",
                "--no-conf=true",
            ])
            .args(extra)
            .arg(&torrent.path)
            .stdin(Stdio::null());
        let mut aria2 = Aria2 {
            proc: spawn(command, log),
            port,
            file: dir.join(&torrent.name),
            message_log,
        };
        wait_until("aria2c to listen", PATIENCE, || {
            aria2.assert_running();
            aria2
                .proc
                .log_text()
                .contains("listening on TCP port")
                .then_some(())
        });
        aria2
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.proc.exited() {
            panic!("aria2c exited early with {status}:\n{}", self.describe());
        }
    }

    /// Its console tail and its last peer messages.
    pub fn describe(&self) -> String {
        format!(
            "aria2c on port {}\n--- console tail ---\n{}\n--- last peer messages ---\n{}",
            self.port,
            self.proc.log_tail(10),
            self.peer_messages()
        )
    }

    /// Its last peer messages other than the bulk transfer ones.
    fn peer_messages(&self) -> String {
        let text = std::fs::read_to_string(&self.message_log).unwrap_or_default();
        let chatter: Vec<&str> = text
            .lines()
            .filter(|l| {
                (l.contains(" To: ") || l.contains(" From: ") || l.contains("banned"))
                    && !l.contains(" request ")
                    && !l.contains(" piece ")
                    && !l.contains(" have ")
            })
            .collect();
        chatter[chatter.len().saturating_sub(KEPT_LINES)..].join("\n")
    }

    /// Waits up to `timeout` for a leecher to finish (aria2c exits 0 once the download is
    /// complete and verified) and fails the test otherwise.
    pub fn wait_done(&mut self, timeout: Duration) {
        match self.proc.wait_within(timeout) {
            Some(status) if status.success() => {}
            Some(status) => panic!("aria2c failed with {status}:\n{}", self.describe()),
            None => panic!(
                "aria2c did not finish within {timeout:?}:\n{}",
                self.describe()
            ),
        }
    }

    /// The address other peers reach it at.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Aria2 {
    fn drop(&mut self) {
        // Its console log is shown by its Proc; what it said to its peers is in another file.
        if std::thread::panicking() {
            eprintln!(
                "=== aria2c on port {}, last peer messages ---\n{}",
                self.port,
                self.peer_messages()
            );
        }
    }
}

/// The libtorrent driver: `create` makes a torrent; `seed`/`leech` run one torrent in a
/// session bound to one 127.0.0.1 port and print JSON lines shaped like our peer's
/// (`ready`, `stats`, `complete`), so one reader serves both.
pub const LT_SCRIPT: &str = r#"
import json, os, sys
import libtorrent as lt

def emit(**fields):
    print(json.dumps(fields), flush=True)

def create(data, announce, piece_len, out):
    fs = lt.file_storage()
    lt.add_files(fs, data)
    t = lt.create_torrent(fs, int(piece_len), flags=lt.create_torrent.v1_only)
    t.add_tracker(announce)
    lt.set_piece_hashes(t, os.path.dirname(os.path.abspath(data)))
    with open(out, "wb") as f:
        f.write(lt.bencode(t.generate()))
    ti = lt.torrent_info(out)
    emit(info_hash=str(ti.info_hashes().v1), name=ti.name(), piece_len=ti.piece_length(),
         pieces=ti.num_pieces(), size=ti.total_size())

def run(mode, torrent, save_path, port, peers):
    settings = {
        "listen_interfaces": "127.0.0.1:%d" % port,
        "enable_dht": False, "enable_lsd": False,
        "enable_upnp": False, "enable_natpmp": False,
        # TCP only, like our engine: no uTP attempt before each connection.
        "enable_incoming_utp": False, "enable_outgoing_utp": False,
        "allow_multiple_connections_per_ip": True,
        "alert_mask": lt.alert_category.error | lt.alert_category.status
                      | lt.alert_category.tracker | lt.alert_category.peer
                      | lt.alert_category.storage,
    }
    if mode.endswith("-encrypted"):
        # Message stream encryption forced both ways, RC4 the only level: no plaintext byte
        # with any peer, in or out.
        settings.update({"out_enc_policy": lt.enc_policy.forced,
                         "in_enc_policy": lt.enc_policy.forced,
                         "allowed_enc_level": lt.enc_level.rc4})
    s = lt.session(settings)
    p = lt.add_torrent_params()
    p.ti = lt.torrent_info(torrent)
    p.save_path = save_path
    h = s.add_torrent(p)
    for addr in peers:
        ip, pt = addr.rsplit(":", 1)
        h.connect_peer((ip, int(pt)))
    completed = False
    flushing = False
    while True:
        s.wait_for_alert(250)
        for a in s.pop_alerts():
            if isinstance(a, lt.cache_flushed_alert) and flushing and not completed:
                # Verified pieces can sit in libtorrent's write cache; "complete" must mean
                # the file on disk is whole, since the test compares it next.
                completed = True
                emit(event="complete", downloaded=h.status().total_payload_download)
            elif isinstance(a, lt.listen_succeeded_alert):
                emit(event="ready", listen="127.0.0.1:%d" % a.port)
            elif isinstance(a, (lt.listen_failed_alert, lt.torrent_error_alert)):
                emit(event="error", message=a.message())
                sys.exit(1)
            elif isinstance(a, lt.hash_failed_alert):
                emit(event="hash_failed", message=a.message())
        st = h.status()
        if st.is_seeding and not flushing:
            flushing = True
            h.flush_cache()
        emit(event="stats", state=str(st.state), bytes_done=st.total_wanted_done,
             bytes_total=st.total_wanted, downloaded=st.total_payload_download,
             uploaded=st.total_payload_upload, peers=st.num_peers)

if sys.argv[1] == "create":
    create(*sys.argv[2:6])
else:
    run(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])
"#;

/// Writes [`LT_SCRIPT`] to `path` (inside the test's temporary directory, so that it goes
/// with it) and returns the path.
fn lt_script(path: PathBuf) -> PathBuf {
    std::fs::write(&path, LT_SCRIPT).unwrap();
    path
}

/// The JSON lines a child prints on stdout, read by a thread and handed over a channel; the
/// last [`KEPT_LINES`] are kept for failure messages.
struct JsonLines {
    rx: Receiver<Result<Value, String>>,
    recent: Arc<Mutex<VecDeque<String>>>,
}

impl JsonLines {
    fn spawn(stdout: std::process::ChildStdout, name: &str) -> JsonLines {
        let (tx, rx) = channel();
        let recent = Arc::new(Mutex::new(VecDeque::new()));
        let kept = recent.clone();
        std::thread::Builder::new()
            .name(format!("{name} stdout"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    {
                        let mut kept = kept.lock().unwrap();
                        if kept.len() == KEPT_LINES {
                            kept.pop_front();
                        }
                        kept.push_back(line.clone());
                    }
                    let parsed = serde_json::from_str::<Value>(&line)
                        .map_err(|e| format!("stdout line is not JSON ({e}): {line}"));
                    if tx.send(parsed).is_err() {
                        break;
                    }
                }
            })
            .unwrap();
        JsonLines { rx, recent }
    }

    fn recent(&self) -> String {
        self.recent
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A child whose stdout is JSON lines: our peer or the libtorrent driver.
struct EventProcess {
    name: String,
    /// Logs the process's stderr.
    proc: Proc,
    lines: JsonLines,
    /// Events other than `stats` that arrived while a wait looked for something else, so
    /// that one-shot events (`checked` may come before or after `ready`) are never lost.
    pending: VecDeque<Value>,
    /// The most recent `stats` event seen by any wait.
    last_stats: Option<Value>,
}

impl EventProcess {
    fn spawn(name: &str, mut command: Command, stderr: PathBuf) -> EventProcess {
        command.stdin(Stdio::null());
        let (proc, stdout) = spawn_reading_stdout(command, stderr);
        EventProcess {
            name: name.to_owned(),
            proc,
            lines: JsonLines::spawn(stdout, name),
            pending: VecDeque::new(),
            last_stats: None,
        }
    }

    fn describe(&mut self) -> String {
        format!(
            "{}\n--- stderr tail ---\n{}",
            self.stdout_said(),
            self.proc.log_tail(KEPT_LINES)
        )
    }

    /// Its name, whether it runs, and its last lines on stdout.
    fn stdout_said(&mut self) -> String {
        let status = match self.proc.exited() {
            Some(status) => format!("exited with {status}"),
            None => "still running".to_owned(),
        };
        format!(
            "{} ({status})\n--- last stdout lines ---\n{}",
            self.name,
            self.lines.recent()
        )
    }

    /// The next event for which `pick` returns `Some`, within `timeout`.
    fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pick: impl FnMut(&Value) -> Option<T>,
    ) -> T {
        if let Some(at) = self.pending.iter().position(|e| pick(e).is_some()) {
            let event = self.pending.remove(at).unwrap();
            return pick(&event).unwrap();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.rx.recv_timeout(left) {
                Ok(Ok(event)) => {
                    let is_stats = event["event"] == "stats";
                    if is_stats {
                        self.last_stats = Some(event.clone());
                    }
                    if let Some(found) = pick(&event) {
                        return found;
                    }
                    if !is_stats {
                        self.pending.push_back(event);
                    }
                }
                Ok(Err(not_json)) => panic!("{not_json}\n{}", self.describe()),
                Err(RecvTimeoutError::Timeout) => panic!(
                    "timed out after {timeout:?} waiting for {what} from {}",
                    self.describe()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    // stdout closed: the process is gone or going; reap it for the message.
                    let _ = self.proc.wait_within(Duration::from_secs(5));
                    panic!(
                        "stdout closed while waiting for {what} from {}",
                        self.describe()
                    )
                }
            }
        }
    }

    /// Takes every line already queued, so that the next wait sees only fresh events;
    /// one-shot events among them stay pending.
    fn drain(&mut self) {
        while let Ok(line) = self.lines.rx.try_recv() {
            match line {
                Ok(event) if event["event"] == "stats" => self.last_stats = Some(event),
                Ok(event) => self.pending.push_back(event),
                Err(not_json) => panic!("{not_json}\n{}", self.describe()),
            }
        }
    }

    fn wait_event(&mut self, name: &str, timeout: Duration) -> Value {
        self.wait_for(&format!("event {name:?}"), timeout, |e| {
            (e["event"] == name).then(|| e.clone())
        })
    }
}

impl Drop for EventProcess {
    fn drop(&mut self) {
        // A failing test drops every process it started: show what each of them said, not
        // only the one the failed assertion was about (its Proc shows its stderr).
        if std::thread::panicking() {
            eprintln!("=== {}", self.stdout_said());
        }
    }
}

/// A libtorrent seeder or leecher (see [`LT_SCRIPT`]).
pub struct Libtorrent {
    process: EventProcess,
    /// Its listen address.
    pub addr: String,
    /// Where its copy of the file lives.
    pub file: PathBuf,
}

impl Libtorrent {
    /// Seeds the complete `torrent.name` in `dir` (checked first); returns once it seeds.
    pub fn seed(torrent: &Torrent, dir: &Path) -> Libtorrent {
        let mut lt = Libtorrent::start("seed", torrent, dir, &[]);
        lt.process.wait_event("complete", PATIENCE);
        lt
    }

    /// [`Libtorrent::seed`] with message stream encryption forced both ways (RC4 only): it
    /// refuses plaintext connections, so only a peer that dials with MSE gets anything.
    pub fn seed_encrypted(torrent: &Torrent, dir: &Path) -> Libtorrent {
        let mut lt = Libtorrent::start("seed-encrypted", torrent, dir, &[]);
        lt.process.wait_event("complete", PATIENCE);
        lt
    }

    /// Downloads `torrent` into `dir`, also connecting to each of `peers`.
    pub fn leech(torrent: &Torrent, dir: &Path, peers: &[String]) -> Libtorrent {
        Libtorrent::start("leech", torrent, dir, peers)
    }

    fn start(mode: &str, torrent: &Torrent, dir: &Path, peers: &[String]) -> Libtorrent {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let mut command = Command::new(python());
        command
            .arg(lt_script(dir.with_extension("lt.py")))
            .arg(mode)
            .arg(&torrent.path)
            .arg(dir)
            .arg(port.to_string())
            .args(peers);
        let name = format!("libtorrent {mode}er on port {port}");
        let mut process = EventProcess::spawn(&name, command, dir.with_extension("lt.log"));
        let ready = process.wait_event("ready", PATIENCE);
        Libtorrent {
            addr: ready["listen"].as_str().unwrap().to_owned(),
            process,
            file: dir.join(&torrent.name),
        }
    }

    /// Waits for the download to complete and verify.
    pub fn wait_complete(&mut self, timeout: Duration) -> Value {
        self.process.wait_event("complete", timeout)
    }

    /// Its recent output, for failure messages.
    pub fn describe(&mut self) -> String {
        self.process.describe()
    }
}

/// How our peer is started: `boottorrent-peer --torrent T --file F` plus these flags.
#[derive(Debug, Clone, Default)]
pub struct PeerOptions {
    /// `--seed` (the file must be complete).
    pub seed: bool,
    /// `--super-seed`.
    pub super_seed: bool,
    /// `--peer ADDR:PORT` for each.
    pub peers: Vec<String>,
    /// `--no-tracker`.
    pub no_tracker: bool,
    /// `--upload-limit` in bytes per second.
    pub upload_limit: Option<u64>,
    /// `--download-limit` in bytes per second.
    pub download_limit: Option<u64>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--exit-when-done`.
    pub exit_when_done: bool,
    /// `--stats-ms`; 200 unless set, so that tests see progress promptly.
    pub stats_ms: Option<u64>,
    /// Any further arguments, verbatim.
    pub extra: Vec<String>,
}

/// Our `boottorrent-peer` process on a free 127.0.0.1 port, its stdout read as JSON lines.
pub struct Peer {
    process: EventProcess,
    /// The listen address from its `ready` event.
    pub addr: String,
    /// The info hash from its `ready` event.
    pub info_hash: String,
    /// The file it downloads into or seeds from.
    pub file: PathBuf,
}

/// Path of the binary under test.
pub fn peer_bin() -> &'static str {
    env!("CARGO_BIN_EXE_boottorrent-peer")
}

impl Peer {
    /// Starts a peer for `torrent` on `file` and waits for its `ready` event.
    pub fn start(torrent: &Torrent, file: &Path, options: &PeerOptions) -> Peer {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        let port = free_port();
        let mut command = Command::new(peer_bin());
        command
            .arg("--torrent")
            .arg(&torrent.path)
            .arg("--file")
            .arg(file)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--stats-ms", &options.stats_ms.unwrap_or(200).to_string()]);
        if options.seed {
            command.arg("--seed");
        }
        if options.super_seed {
            command.arg("--super-seed");
        }
        for peer in &options.peers {
            command.args(["--peer", peer]);
        }
        if options.no_tracker {
            command.arg("--no-tracker");
        }
        if let Some(limit) = options.upload_limit {
            command.args(["--upload-limit", &limit.to_string()]);
        }
        if let Some(limit) = options.download_limit {
            command.args(["--download-limit", &limit.to_string()]);
        }
        if let Some(dir) = &options.state_dir {
            command.arg("--state-dir").arg(dir);
        }
        if options.exit_when_done {
            command.arg("--exit-when-done");
        }
        command.args(&options.extra);
        command.env("BOOTTORRENT_LOG", "info,boottorrent_swarm=debug");
        let role = if options.super_seed {
            "super-seeder"
        } else if options.seed {
            "seeder"
        } else {
            "leecher"
        };
        let name = format!("boottorrent-peer {role} on port {port}");
        let stderr = file.with_extension(format!("{port}.stderr"));
        let mut process = EventProcess::spawn(&name, command, stderr);
        let ready = process.wait_event("ready", PATIENCE);
        let info_hash = ready["info_hash"].as_str().unwrap_or_default().to_owned();
        assert_eq!(
            info_hash,
            torrent.info_hash,
            "the ready event's info hash is not the torrent's\n{}",
            process.describe()
        );
        Peer {
            addr: ready["listen"]
                .as_str()
                .unwrap_or_else(|| panic!("ready without listen:\n{}", process.describe()))
                .to_owned(),
            info_hash,
            process,
            file: file.to_owned(),
        }
    }

    /// The next event named `name`, failing the test after `timeout`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Value {
        self.process.wait_event(name, timeout)
    }

    /// The next `stats` event that satisfies `pred` (`what` says what it means, for the
    /// failure message), failing the test after `timeout`.
    pub fn wait_stats(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.process.wait_for(what, timeout, |e| {
            (e["event"] == "stats" && pred(e)).then(|| e.clone())
        })
    }

    /// A `stats` event printed after this call (fresh counters, not a queued old line).
    pub fn next_stats(&mut self) -> Value {
        self.process.drain();
        self.wait_stats("a stats line", PATIENCE, |_| true)
    }

    /// The most recent `stats` event any wait has seen.
    pub fn last_stats(&self) -> Option<&Value> {
        self.process.last_stats.as_ref()
    }

    /// SIGTERM: waits for the `stopped` event and a clean exit, returns the event.
    pub fn stop(&mut self) -> Value {
        self.process.proc.sigterm();
        let stopped = self.process.wait_event("stopped", PATIENCE);
        match self.process.proc.wait_within(PATIENCE) {
            Some(status) if status.success() => stopped,
            Some(status) => panic!(
                "exit status {status} after SIGTERM\n{}",
                self.process.describe()
            ),
            None => panic!("still running after SIGTERM\n{}", self.process.describe()),
        }
    }

    /// SIGKILL, no chance to save anything; reaps the process.
    pub fn kill9(&mut self) {
        self.process.proc.kill9();
    }

    /// Its recent output, for failure messages.
    pub fn describe(&mut self) -> String {
        self.process.describe()
    }
}

/// A `u64` field of an event, failing with the event when it is missing.
pub fn field(event: &Value, name: &str) -> u64 {
    event[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no unsigned field {name:?} in {event}"))
}
