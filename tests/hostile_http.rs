//! A hostile host on the lab network against the server's HTTP port (issue 14, items 6 to 8):
//! the real server binary on loopback, attacked with raw TCP sockets and reqwest. Each test is
//! one row of the threat model: what a host without credentials, or with only the read-only
//! viewer token, tries, and what must hold.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Agent, PATIENCE, Server, image_add, wait_for};
use serde_json::{Value, json};

/// Every read of the API a dashboard or the CLI makes.
const READS: &[&str] = &[
    "/api/v1/machines",
    "/api/v1/machines/pc-1",
    "/api/v1/log",
    "/api/v1/events",
    "/api/v1/images",
    "/api/v1/images/some-image",
    "/api/v1/zones",
    "/api/v1/zones/lab",
    "/api/v1/deployments",
    "/api/v1/deployments/d-1",
];

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(PATIENCE)
        .build()
        .unwrap()
}

/// Status and `error` text of `GET path` with an optional bearer token. Event streams are
/// not read: their status and headers say everything.
fn read(server: &Server, path: &str, token: Option<&str>) -> (u16, String) {
    let mut request = http().get(server.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().unwrap();
    let status = response.status().as_u16();
    if response
        .headers()
        .get("content-type")
        .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"))
    {
        return (status, String::new());
    }
    let body: Value = response.json().unwrap_or(Value::Null);
    (
        status,
        body["error"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Registers machine `id` with a signed startup, as an agent would.
fn register(server: &Server, id: &str) {
    let mut agent = Agent::new(id);
    let (topic, payload) = agent.startup();
    server.publish(&agent, &topic, &payload);
}

/// Catalogues a random raw file of `len` bytes from `dir` and waits until it is ready.
fn ready_image(server: &Server, dir: &Path, len: usize) -> Value {
    let file = dir.join("golden.img");
    let bytes: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
    std::fs::write(&file, bytes).unwrap();
    let out = image_add(server, &file, &["--raw"]);
    assert!(
        out.status.success(),
        "image add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(image["state"], "ready", "{image}");
    image
}

/// The query of an announce for the torrent `hash` (hex) by a leecher on port 6999.
fn announce_query(hash: &str) -> String {
    format!(
        "?info_hash={}&peer_id=-XX0001-123456789012&port=6999&left=1",
        hex::decode(hash)
            .unwrap()
            .iter()
            .map(|b| format!("%{b:02X}"))
            .collect::<String>()
    )
}

/// Whether the server closed `stream` within `within`. Reads (draining whatever the server
/// sent first) until end of file or a reset; a read that only times out means it is open.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 64 * 1024];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if left.is_zero() {
            break;
        }
        stream
            .set_read_timeout(Some(left.min(Duration::from_millis(500))))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// A loopback connection whose receive buffer is a few KiB: a client that reads nothing
/// then fills up after a few events instead of after megabytes.
fn connect_with_small_window(port: u16) -> TcpStream {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor this function owns until it hands it to
    // TcpStream; every pointer passed lives across its call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let size: libc::c_int = 4096;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let stream = TcpStream::from_raw_fd(fd);
        assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
        stream
    }
}

/// A line of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Time for `GET /healthz` on a new connection, or the error.
fn healthz(server: &Server) -> Result<Duration, String> {
    let started = Instant::now();
    let response = http()
        .get(server.url("/healthz"))
        .send()
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    Ok(started.elapsed())
}

#[test]
fn a_host_without_a_token_cannot_read_the_machine_list_the_log_the_events_or_the_images() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    register(&server, "pc-1");
    wait_for("pc-1 registered", || server.machine("pc-1"));

    for path in READS {
        let (status, error) = read(&server, path, None);
        assert_eq!(status, 401, "{path} without a token");
        assert!(
            error.contains("Authorization: Bearer") && error.contains("viewer.token"),
            "{path}: the refusal should say how to authenticate: {error:?}"
        );
        let (status, error) = read(&server, path, Some("0123456789abcdef-not-a-token"));
        assert_eq!(status, 401, "{path} with a wrong token");
        assert!(
            error.contains("neither the admin token"),
            "{path}: {error:?}"
        );
        // Either token reads; a 404 for an id that does not exist is an answer too.
        for token in [server.viewer_token(), server.admin_token()] {
            let (status, _) = read(&server, path, Some(&token));
            assert!(
                status == 200 || status == 404,
                "{path} with a token: {status}"
            );
        }
    }
    assert_eq!(
        read(
            &server,
            "/api/v1/machines/pc-1",
            Some(&server.viewer_token())
        )
        .0,
        200
    );
    assert!(
        server.metric("boottorrent_http_unauthorized_total") >= 2 * READS.len() as u64,
        "refusals are counted"
    );
    // Open: what a load balancer and an agent without credentials need.
    assert_eq!(read(&server, "/healthz", None).0, 200);
    let key = http().get(server.url("/api/v1/server-key")).send().unwrap();
    assert_eq!(
        key.status(),
        200,
        "agents pin the server key before they hold a token"
    );
}

#[test]
fn the_viewer_token_reads_everything_but_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let viewer = server.viewer_token();
    let client = http();
    let writes = [
        client.post(server.url("/api/v1/machines/pc-1/approve")),
        client
            .put(server.url("/api/v1/zones/lab"))
            .json(&json!({ "machines": ["pc-1"] })),
        client.delete(server.url("/api/v1/zones/lab")),
        client
            .post(server.url("/api/v1/deployments"))
            .json(&json!({ "image": "x", "target": { "global": true } })),
        client.delete(server.url("/api/v1/deployments/d-1")),
        client
            .post(server.url("/api/v1/images"))
            .json(&json!({ "path": "/etc/hostname", "raw": true })),
        client.delete(server.url("/api/v1/images/x")),
    ];
    for request in writes {
        let response = request.bearer_auth(&viewer).send().unwrap();
        let url = response.url().clone();
        assert_eq!(response.status(), 403, "{url} with the viewer token");
        let body: Value = response.json().unwrap();
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("viewer token can only read") && error.contains("admin token"),
            "{url}: {error:?}"
        );
    }
    assert_eq!(server.get_json("/api/v1/zones"), json!([]));
    assert_eq!(server.get_json("/api/v1/images"), json!([]));

    // The CLI says what to do when given the viewer token for a change.
    let out = common::cli(&[
        "zones",
        "set",
        "lab",
        "--machine",
        "pc-1",
        "--server",
        &server.url(""),
        "--token",
        &viewer,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("not the viewer token"), "{stderr}");
}

#[test]
fn metrics_need_the_metrics_token_once_one_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_token = "metrics-0123456789abcdef";
    let server = Server::start(
        &dir.path().join("data"),
        &["--metrics-token", metrics_token],
    );
    let get = |token: Option<&str>| {
        let mut request = http().get(server.url("/metrics"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().unwrap()
    };
    let refused = get(None);
    assert_eq!(refused.status(), 401);
    let body: Value = refused.json().unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("metrics_token"),
        "{body}"
    );
    assert_eq!(get(Some("wrong-0123456789abcdef")).status(), 401);
    for token in [
        metrics_token.to_owned(),
        server.viewer_token(),
        server.admin_token(),
    ] {
        let answer = get(Some(&token));
        assert_eq!(answer.status(), 200);
        assert!(answer.text().unwrap().contains("boottorrent_machines "));
    }
    assert_eq!(
        http().get(server.url("/healthz")).send().unwrap().status(),
        200
    );
}

#[test]
fn slowloris_connections_are_closed_after_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--http-header-timeout-secs", "2"],
    );
    let addr = ("127.0.0.1", server.http_port);
    // Idle: connect and send nothing. Trickling: a header line, then a byte now and then,
    // never the blank line that ends the headers. Kept alive: one answered request, then
    // silence on a keep-alive connection.
    let mut idle: Vec<TcpStream> = (0..10).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut trickling: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .unwrap();
            s
        })
        .collect();
    let mut kept = TcpStream::connect(addr).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut answer = [0u8; 12];
    kept.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");

    let started = Instant::now();
    // Trickle one header byte per 300 ms for longer than the timeout, as slowloris does;
    // a write failing means the server already hung up.
    for round in 0..10 {
        for s in &mut trickling {
            let _ = s.write_all(if round % 2 == 0 { b"X" } else { b"-" });
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    for (kind, streams) in [
        ("idle", &mut idle),
        ("slowloris", &mut trickling),
        ("kept-alive", &mut vec![kept]),
    ] {
        for (i, s) in streams.iter_mut().enumerate() {
            assert!(
                closed_within(s, Duration::from_secs(5)),
                "{kind} connection {i} still open {:.1?} after it started",
                started.elapsed()
            );
        }
    }
    assert!(healthz(&server).is_ok(), "the server still answers");
}

#[test]
fn connections_over_the_cap_are_closed_at_once_and_service_resumes_when_they_go() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--http-max-connections",
            "20",
            // The header timeout must not free the held connections while the test runs.
            "--http-header-timeout-secs",
            "120",
        ],
    );
    let addr = ("127.0.0.1", server.http_port);
    // Each held connection is answered once, so it surely holds one of the 20 places; a
    // connection the server was still closing (its own readiness check) may have taken a
    // place for a moment, which a retry rides out.
    let mut held: Vec<TcpStream> = Vec::new();
    for _ in 0..200 {
        if held.len() == 20 {
            break;
        }
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut head = [0u8; 12];
        let answered = s
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .and_then(|()| s.read_exact(&mut head))
            .is_ok();
        if answered && &head == b"HTTP/1.1 200" {
            held.push(s);
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert_eq!(held.len(), 20, "could not open 20 connections");
    let mut over = TcpStream::connect(addr).unwrap();
    over.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(
        closed_within(&mut over, Duration::from_secs(2)),
        "a connection over the cap is closed at once"
    );
    drop(held);
    wait_for(
        "/healthz to answer once the held connections are gone",
        || healthz(&server).ok(),
    );
    assert!(server.metric("boottorrent_http_connections_over_cap_total") >= 1);
}

#[test]
fn five_hundred_sse_clients_that_never_read_do_not_exhaust_memory() {
    const CLIENTS: usize = 500;
    const RSS_LIMIT_KIB: u64 = 300 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--http-write-timeout-secs", "3"],
    );
    let pid = server.pid();
    let image = ready_image(&server, dir.path(), 1 << 20);
    let image = image["id"].as_str().unwrap().to_owned();
    // Machines to deploy to: each deployment event then carries a view of all of them.
    let machines: Vec<String> = (0..30).map(|i| format!("pc-{i:02}")).collect();
    for m in &machines {
        register(&server, m);
    }
    wait_for("30 machines registered", || {
        (server.get_json("/api/v1/machines").as_array()?.len() == machines.len()).then_some(())
    });
    let rss_before = proc_kib(pid, "VmRSS");

    let request = format!(
        "GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\
         Authorization: Bearer {}\r\n\r\n",
        server.viewer_token()
    );
    let mut streams: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| {
            let mut s = connect_with_small_window(server.http_port);
            s.write_all(request.as_bytes()).unwrap();
            s
        })
        .collect();
    wait_for("every stream to be open on the server", || {
        let open = server.metric("boottorrent_http_connections_open");
        (open >= CLIENTS as u64).then_some(())
    });

    // Events for every watcher until the server has dropped them all (each is a deployment
    // view of 30 machines, created and cancelled), bounded in count and time.
    let admin = server.admin_token();
    let client = http();
    let started = Instant::now();
    let mut slowest_healthz = Duration::ZERO;
    let mut cycles = 0;
    // 400 cycles are several MiB of events per watcher, far more than its buffers hold.
    while cycles < 400 && started.elapsed() < Duration::from_secs(90) {
        cycles += 1;
        let created: Value = client
            .post(server.url("/api/v1/deployments"))
            .bearer_auth(&admin)
            .json(&json!({ "image": image, "target": { "machines": machines } }))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let id = created["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no deployment: {created}"))
            .to_owned();
        let cancelled = client
            .delete(server.url(&format!("/api/v1/deployments/{id}")))
            .bearer_auth(&admin)
            .send()
            .unwrap();
        assert!(cancelled.status().is_success());
        let took = healthz(&server).unwrap_or_else(|e| {
            panic!("/healthz failed with {CLIENTS} unread event streams open: {e}")
        });
        slowest_healthz = slowest_healthz.max(took);
        if cycles % 10 == 0
            && server.metric("boottorrent_http_write_timeouts_total") >= CLIENTS as u64
        {
            break;
        }
    }
    let flood = started.elapsed();
    // The last events may have filled the buffers only just now: the write deadline runs
    // from there.
    let deadline = Instant::now() + PATIENCE;
    let mut dropped = server.metric("boottorrent_http_write_timeouts_total");
    while dropped < CLIENTS as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        slowest_healthz = slowest_healthz.max(healthz(&server).unwrap());
        dropped = server.metric("boottorrent_http_write_timeouts_total");
    }
    let peak = proc_kib(pid, "VmHWM");
    println!(
        "{CLIENTS} unread event streams: {cycles} deployments created and cancelled in \
         {flood:.1?}; RSS {} MiB before, peak {} MiB; slowest /healthz {:.1?}; {dropped} \
         streams dropped for not reading {:.1?} after the first event",
        rss_before / 1024,
        peak / 1024,
        slowest_healthz,
        started.elapsed()
    );
    assert!(
        peak < RSS_LIMIT_KIB,
        "peak RSS {} MiB with {CLIENTS} unread event streams",
        peak / 1024
    );
    assert!(
        dropped >= CLIENTS as u64,
        "only {dropped} of {CLIENTS} clients that read nothing were dropped"
    );
    // Seen from the clients: the server hung up (after what it had sent).
    for (i, s) in streams.iter_mut().take(20).enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(5)),
            "stream {i} is still open"
        );
    }
    assert!(healthz(&server).is_ok());
}

/// `GET /announce` for `info_hash` (hex) as a peer with a random id at `port`.
/// An announce with the operator's passkey (`base`, from `GET /api/v1/tracker`): the
/// per-address cap must hold even for a holder of a valid passkey.
fn announce_url(base: &str, info_hash: &str, port: u16) -> String {
    let hash: String = hex::decode(info_hash)
        .unwrap()
        .iter()
        .map(|b| format!("%{b:02X}"))
        .collect();
    let peer_id: String = (0..20)
        .map(|_| format!("%{:02X}", rand::random::<u8>()))
        .collect();
    format!(
        "{base}?info_hash={hash}&peer_id={peer_id}&port={port}&uploaded=0&downloaded=0\
         &left=100&compact=1&numwant=0&event=started"
    )
}

#[test]
fn one_address_cannot_fill_a_torrents_peer_list() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let image = ready_image(&server, dir.path(), 256 << 10);
    let info_hash = image["info_hash"].as_str().unwrap().to_owned();
    let base = server.get_json("/api/v1/tracker")["announce"]
        .as_str()
        .unwrap()
        .to_owned();
    let attacker = http();
    let started = Instant::now();
    let mut refused = 0;
    // The attack: 12,000 announces with random peer ids and ports from one address.
    for n in 0..12_000u32 {
        let port = 1024 + (n % 60_000) as u16;
        let body = attacker
            .get(announce_url(&base, &info_hash, port))
            .send()
            .unwrap()
            .bytes()
            .unwrap();
        if body.windows(14).any(|w| w == b"failure reason") {
            refused += 1;
        }
    }
    println!(
        "12,000 announces from 127.0.0.1 in {:.1?}, {refused} refused",
        started.elapsed()
    );
    assert!(
        refused >= 12_000 - 64,
        "only {refused} of 12,000 announces from one address refused"
    );
    // A real machine at another (loopback) address still joins.
    let machine = reqwest::blocking::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .timeout(PATIENCE)
        .build()
        .unwrap();
    let body = machine
        .get(announce_url(&base, &info_hash, 6881))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert!(
        !body.windows(14).any(|w| w == b"failure reason"),
        "a real machine was refused: {}",
        String::from_utf8_lossy(&body)
    );
}

#[test]
fn the_servers_signing_key_cannot_be_catalogued_as_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);
    let key = data.join("server.key");
    // Directly, through `..`, and through a symlink from outside.
    let outside = dir.path().join("innocent.img");
    std::os::unix::fs::symlink(&key, &outside).unwrap();
    let dotted = dir.path().join("data/../data/server.key");
    for path in [&key, &dotted, &outside] {
        let response = http()
            .post(server.url("/api/v1/images"))
            .bearer_auth(server.admin_token())
            .json(&json!({ "path": path, "raw": true }))
            .send()
            .unwrap();
        assert_eq!(response.status(), 400, "{}", path.display());
        let body: Value = response.json().unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains(&path.display().to_string())
                && error.contains("inside the server's data directory")
                && error.contains("Move or copy the image"),
            "{error}"
        );
    }
    let out = image_add(&server, &key, &["--raw"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("data directory"), "{stderr}");
    assert_eq!(server.get_json("/api/v1/images"), json!([]));
}

/// This process's hard open-file limit.
fn hard_open_file_limit() -> libc::rlim_t {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct passed.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    limit.rlim_max
}

#[test]
fn the_server_raises_its_open_file_limit_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    let hard = hard_open_file_limit();
    let server = Server::start_with_open_files(&dir.path().join("data"), 256.min(hard), hard, &[]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.proc.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers[0], numbers[1], "soft limit not raised: {line}");
    let text = server.log_text();
    assert_eq!(
        text.matches("raised the open-file limit").count(),
        1,
        "{text}"
    );
}

#[test]
fn running_out_of_file_descriptors_backs_off_quietly_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    // Soft and hard alike: nothing to raise, and enough to start but not for 300 clients.
    let server = Server::start_with_open_files(&dir.path().join("data"), 128, 128, &[]);
    // The kernel completes these handshakes on its own; the server runs out of descriptors
    // accepting them.
    // With a timeout: a server that stopped accepting would leave connects waiting for the
    // kernel's SYN retries, minutes.
    let to = std::net::SocketAddr::from(([127, 0, 0, 1], server.http_port));
    let held: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect_timeout(&to, Duration::from_secs(1)).ok())
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let text = server.log_text();
    let complaints = text.matches("accepting an HTTP connection failed").count();
    assert!(
        (1..=2).contains(&complaints),
        "{complaints} accept failures logged in 3 s with {} clients held (log {} bytes)",
        held.len(),
        text.len()
    );
    drop(held);
    let deadline = Instant::now() + PATIENCE;
    let answer = loop {
        let answer = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap()
            .get(format!("http://127.0.0.1:{}/healthz", server.http_port))
            .send();
        match answer {
            Ok(a) if a.status().is_success() => break a,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            other => panic!("/healthz after the clients left: {other:?}"),
        }
    };
    assert_eq!(answer.status(), 200);
}

#[test]
fn a_host_without_a_passkey_gets_no_torrent_no_peers_and_not_a_byte_from_the_seeder() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    // Several pieces: libtorrent drops a super-seeder that offers nothing yet, and a one-piece
    // torrent gives it nothing to offer at first.
    let image = ready_image(&server, dir.path(), 4 << 20);
    let hash = image["info_hash"].as_str().unwrap().to_owned();
    let torrent_path = format!("/torrents/{hash}.torrent");

    // The .torrent: no credential, a made-up passkey, the passkey of a machine that is not
    // approved all get 401.
    let client = http();
    for auth in [None, Some("Passkey pc-1:00112233445566778899aabbccddeeff")] {
        let mut request = client.get(server.url(&torrent_path));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        assert_eq!(request.send().unwrap().status(), 401, "{auth:?}");
    }
    // Announce and scrape without a passkey, or with a wrong one: a bencoded refusal.
    let query = announce_query(&hash);
    for path in [
        format!("/announce{query}"),
        format!("/announce/pc-1/{}{query}", "0".repeat(32)),
        format!("/scrape{query}"),
    ] {
        let r = client.get(server.url(&path)).send().unwrap();
        assert_eq!(r.status(), 403, "{path}");
        assert!(r.text().unwrap().contains("passkey"), "{path}");
    }

    // A BitTorrent client at another address that knows the info dict and dials the seeder
    // directly: the seeder serves no one its tracker did not admit.
    let operator_torrent = server.get(&torrent_path).bytes().unwrap();
    let seeder = format!("127.0.0.1:{}", server.bt_port);
    let stolen = dir.path().join("stolen.torrent");
    std::fs::write(
        &stolen,
        boottorrent_testkit::torrent_announcing_to(
            &operator_torrent,
            "http://127.0.0.1:9/announce",
        ),
    )
    .unwrap();
    assert_eq!(
        boottorrent_testkit::libtorrent_download(
            dir.path(),
            &stolen,
            "127.0.0.2",
            &seeder,
            6,
            boottorrent_testkit::Encryption::Any
        ),
        0,
        "the seeder served a host without a passkey"
    );
    assert!(
        server.log_text().contains("127.0.0.2 is not admitted"),
        "{}",
        server.log_text()
    );
    // The same client with a valid passkey (the operator's torrent) announces, is handed the
    // seeder and gets the whole image, so the refusal above was the passkey's doing.
    let granted = dir.path().join("granted.torrent");
    std::fs::write(&granted, &operator_torrent).unwrap();
    assert_eq!(
        boottorrent_testkit::libtorrent_download(
            dir.path(),
            &granted,
            "127.0.0.3",
            "-",
            60,
            boottorrent_testkit::Encryption::Any
        ),
        4 << 20
    );
}

#[test]
fn with_tls_configured_tokens_travel_only_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tls = boottorrent_testkit::make_tls_files(dir.path());
    let https_port = common::free_port();
    let server = Server::start(
        &data,
        &[
            "--tls-cert",
            tls.cert.to_str().unwrap(),
            "--tls-key",
            tls.key.to_str().unwrap(),
            "--https-listen",
            &format!("127.0.0.1:{https_port}"),
            "--mqtts-listen",
            &format!("127.0.0.1:{}", common::free_port()),
        ],
    );
    let https = format!("https://127.0.0.1:{https_port}");
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&tls.ca).unwrap()).unwrap();
    let trusting = reqwest::blocking::Client::builder()
        .add_root_certificate(ca)
        .timeout(PATIENCE)
        .build()
        .unwrap();

    // The API over HTTPS, with the admin token.
    let r = trusting
        .get(format!("{https}/api/v1/machines"))
        .bearer_auth(server.admin_token())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // The CLI, given the site's CA.
    let out = common::cli(&[
        "machines",
        "list",
        "--server",
        &https,
        "--ca-cert",
        tls.ca.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the CA, the CLI refuses the server's certificate instead of sending the token.
    let out = common::cli(&[
        "machines",
        "list",
        "--server",
        &https,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(!out.status.success());

    // A token sent in clear is refused, and the answer says where to go.
    let (status, error) = read(&server, "/api/v1/machines", Some(&server.admin_token()));
    assert_eq!(status, 401);
    assert!(error.contains(&https), "{error}");
    // What agents use stays on plain HTTP: the server key, and health.
    assert_eq!(
        http()
            .get(server.url("/api/v1/server-key"))
            .send()
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        trusting
            .get(format!("{https}/healthz"))
            .send()
            .unwrap()
            .status(),
        200
    );
    // A client that opens TLS and stalls is dropped like a slowloris.
    let mut stalled = TcpStream::connect(("127.0.0.1", https_port)).unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01]).unwrap();
    assert!(closed_within(&mut stalled, Duration::from_secs(20)));
}

#[test]
fn an_approved_machine_gets_only_the_images_given_to_it() {
    let dir = tempfile::tempdir().unwrap();
    // With auto_approve on (as this harness runs), a made-up machine is approved like any
    // other, so a passkey must not open the whole catalog.
    let server = Server::start(&dir.path().join("data"), &[]);
    let image = ready_image(&server, dir.path(), 1 << 20);
    let hash = image["info_hash"].as_str().unwrap().to_owned();
    let mut agent = Agent::new("pc-given");
    let (topic, payload) = agent.startup();
    server.publish(&agent, &topic, &payload);
    wait_for("the machine approved", || {
        server
            .machine("pc-given")
            .filter(|m| m["key_state"] == "approved")
    });
    let client = http();
    let body = boottorrent_proto::passkey_request(&agent.id, &agent.key, common::now_ms());
    let answer: Value = client
        .post(server.url("/api/v1/machines/pc-given/passkey"))
        .body(body)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let passkey = answer["passkey"].as_str().unwrap().to_owned();
    let fetch = || {
        client
            .get(server.url(&format!("/torrents/{hash}.torrent")))
            .header("authorization", format!("Passkey pc-given:{passkey}"))
            .send()
            .unwrap()
    };
    let query = announce_query(&hash);
    let announce = || {
        client
            .get(server.url(&format!("/announce/pc-given/{passkey}{query}")))
            .send()
            .unwrap()
    };

    // Before any deployment includes it: no .torrent, no announce, nothing in a scrape.
    let refused = fetch();
    assert_eq!(refused.status(), 403);
    let why = refused.text().unwrap();
    assert!(why.contains("not given to machine pc-given"), "{why}");
    let refused = announce();
    assert_eq!(refused.status(), 403);
    assert!(refused.text().unwrap().contains("not given"));
    let scrape = client
        .get(server.url(&format!("/scrape/pc-given/{passkey}{query}")))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(scrape.contains("not in this server's catalog"), "{scrape}");

    // Deployed to it: both work.
    let deployment: Value = client
        .post(server.url("/api/v1/deployments"))
        .bearer_auth(server.admin_token())
        .json(&json!({"image": image["id"], "target": {"machines": ["pc-given"]}}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let torrent = fetch();
    assert_eq!(torrent.status(), 200);
    let torrent = torrent.bytes().unwrap();
    assert!(
        torrent
            .windows(passkey.len())
            .any(|w| w == passkey.as_bytes()),
        "the torrent announces with the machine's passkey"
    );
    let answer = announce();
    assert_eq!(answer.status(), 200);
    assert!(!answer.bytes().unwrap().starts_with(b"d14:failure"));

    // Cancelled: taken back.
    let cancelled = client
        .delete(server.url(&format!(
            "/api/v1/deployments/{}",
            deployment["id"].as_str().unwrap()
        )))
        .bearer_auth(server.admin_token())
        .send()
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    assert_eq!(fetch().status(), 403);
    assert_eq!(announce().status(), 403);
}
