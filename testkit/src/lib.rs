//! What the end-to-end tests of every crate share. Kept to `std` so that the agent's tests
//! can use it without pulling in anything of the server's.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a test waits for something that should happen "at once" (a process listening,
/// a message arriving).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Where test ports come from when the kernel's ephemeral range cannot be read.
const DEFAULT_EPHEMERAL_LOW: u16 = 32768;
/// The lowest port handed out: clear of the well-known and common service ports.
const LOWEST: u16 = 10000;

/// A port that nothing listens on now and that no other test of this process will be given.
///
/// The port is taken from *below* the kernel's ephemeral range. `bind(":0")` and drop, the
/// obvious way, hands out a port from inside that range, and before the server under test
/// binds it the kernel may give the same port to any outgoing connection (an agent's MQTT
/// client, a tracker announce) as its local port: CI saw the server fail with "Address
/// already in use" that way. Below the range only another test can take it; within this
/// process a counter rules that out, and a start that depends on the process id keeps test
/// binaries that run one after another (with processes of the last one maybe still exiting)
/// apart.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let high = ephemeral_low().max(LOWEST + 1000);
    let span = u32::from(high - LOWEST);
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOWEST + ((start + n) % span) as u16;
        // The wildcard address fails if anything holds the port on any IPv4 address.
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port between {LOWEST} and {high}");
}

/// The first port of the kernel's range for outgoing connections' local ports.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_LOW)
}

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

/// PEM files for a TLS test: a throwaway CA, and a server certificate it signed for
/// `127.0.0.1` and `localhost` with its key.
pub struct TlsFiles {
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// Makes [`TlsFiles`] in `dir` with the `openssl` command, valid for one day.
pub fn make_tls_files(dir: &std::path::Path) -> TlsFiles {
    require_tool("openssl", "openssl");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("running openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &["-keyout", "ca.key", "-out", "ca.pem"],
        &["-days", "1", "-subj", "/CN=BootTorrent test CA"],
        &[
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "server.ext",
    ]);
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    }
}

/// Runs a libtorrent session bound to `bind_ip` for `secs` on `torrent`, dialling `peer`
/// (`-`: none) besides whatever its tracker hands out, and returns the payload bytes it
/// downloaded.
pub fn libtorrent_download(
    dir: &std::path::Path,
    torrent: &std::path::Path,
    bind_ip: &str,
    peer: &str,
    secs: u32,
) -> u64 {
    require_tool("/usr/bin/python3", "python3-libtorrent");
    let script = dir.join("lt_fetch.py");
    std::fs::write(
        &script,
        r#"
import sys, time
import libtorrent as lt
torrent, bind_ip, peer, secs, save = sys.argv[1:6]
s = lt.session({"listen_interfaces": bind_ip + ":0", "outgoing_interfaces": bind_ip,
                "enable_dht": False, "enable_lsd": False, "enable_upnp": False,
                "enable_natpmp": False, "enable_incoming_utp": False,
                "enable_outgoing_utp": False})
p = lt.add_torrent_params()
p.ti = lt.torrent_info(torrent)
p.save_path = save
h = s.add_torrent(p)
deadline = time.time() + float(secs)
while time.time() < deadline and not h.status().is_seeding:
    if peer != "-":
        ip, port = peer.rsplit(":", 1)
        h.connect_peer((ip, int(port)))
    time.sleep(0.5)
print(h.status().total_payload_download, flush=True)
"#,
    )
    .unwrap();
    let save = dir.join(format!("lt-{bind_ip}"));
    std::fs::create_dir_all(&save).unwrap();
    let out = Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(torrent)
        .args([bind_ip, peer, &secs.to_string()])
        .arg(&save)
        .output()
        .expect("running python3 with libtorrent (Debian python3-libtorrent)");
    assert!(
        out.status.success(),
        "libtorrent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// `torrent` with its announce URL replaced by `url`, as a host that learnt the info dict but
/// holds no passkey would make it.
pub fn torrent_announcing_to(torrent: &[u8], url: &str) -> Vec<u8> {
    let at = torrent.windows(6).position(|w| w == b"4:info").unwrap();
    let mut out = format!("d8:announce{}:{url}", url.len()).into_bytes();
    out.extend_from_slice(&torrent[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        let low = ephemeral_low();
        for port in ports {
            assert!((LOWEST..low.max(LOWEST + 1000)).contains(&port), "{port}");
            TcpListener::bind(("127.0.0.1", port)).expect("a handed-out port binds");
        }
    }
}
