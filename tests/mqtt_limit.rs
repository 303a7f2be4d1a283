//! The MQTT port at its limits, as a lab of real clients meets them (issue #17: at
//! rumqttd's `max_connections` the next client got no CONNACK, its retry panicked inside the
//! broker and poisoned its table of last wills, and from then on nobody could connect while
//! `/healthz` said "ok").
//!
//! The real `boottorrent` binary with a broker file of 20 connections (the server keeps 4 of
//! them for its own links and its health probe, so 16 clients), filled on loopback with
//! `mosquitto_sub` sessions or MQTT logins over plain sockets; the client over the limit is a
//! `mosquitto_sub` (plain or TLS) or a real `boottorrent-agent`.
//! And the limit of what the broker keeps per subscription filter, met by a `mosquitto_sub`
//! that stops reading while `mosquitto_pub` floods its filter.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{PATIENCE, Proc, Server, free_port, run_agent, run_within, spawn, wait_for};

/// rumqttd's `max_connections` in these tests.
const MAX_CONNECTIONS: usize = 20;
/// What the front admits: rumqttd's limit less the orchestrator's link, its two spares and
/// the health probe.
const CLIENTS: usize = MAX_CONNECTIONS - 4;

/// The server's embedded broker file with `max_connections` and the listeners in `extra`.
fn broker_file_with(max_connections: usize, extra: &str) -> String {
    let embedded = include_str!("../broker.toml");
    assert!(
        embedded.contains("max_connections = 10010"),
        "broker.toml changed"
    );
    embedded.replace(
        "max_connections = 10010",
        &format!("max_connections = {max_connections}"),
    ) + extra
}

/// A server in `dir` whose broker file has [`MAX_CONNECTIONS`].
fn limited_server(dir: &Path) -> Server {
    let broker = dir.join("broker.toml");
    std::fs::write(&broker, broker_file_with(MAX_CONNECTIONS, "")).unwrap();
    Server::start(
        &dir.join("data"),
        &["--broker-config", broker.to_str().unwrap()],
    )
}

/// A `mosquitto_sub` session as `client_id` (the operator's login) on `port`, returned once
/// the broker accepted it (CONNACK 0); `extra` are more mosquitto_sub arguments.
fn connected(server: &Server, port: u16, client_id: &str, extra: &[&str], log: &Path) -> Proc {
    let mut command = Command::new("stdbuf");
    command
        .args(["-oL", "mosquitto_sub", "-d"])
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-i", client_id, "-u", "admin", "-P", &server.admin_token()])
        .args(["-t", "limit/none", "-q", "1"])
        .args(extra);
    let proc = spawn(command, log.to_owned());
    wait_for(&format!("{client_id} to be connected"), || {
        let text = proc.log_text();
        if text.contains("received CONNACK (0)") {
            return Some(());
        }
        assert!(
            !text.contains("received CONNACK (") && !text.contains("Error"),
            "{client_id} was not admitted:\n{text}\nserver log:\n{}",
            server.proc.log_tail(30)
        );
        None
    });
    proc
}

/// One connection attempt as `client_id` that gives up after a few seconds: what it printed.
fn attempt(server: &Server, client_id: &str) -> String {
    let mut command = Command::new("mosquitto_sub");
    command
        .args(["-d", "-h", "127.0.0.1", "-p", &server.mqtt_port.to_string()])
        .args(["-i", client_id, "-u", "admin", "-P", &server.admin_token()])
        .args(["-t", "limit/none", "-W", "3"]);
    let out = run_within(command, PATIENCE);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn healthz(server: &Server) -> (u16, String) {
    let response = reqwest::blocking::get(server.url("/healthz")).unwrap();
    (response.status().as_u16(), response.text().unwrap())
}

fn logs(dir: &Path) -> impl FnMut(&str) -> PathBuf + '_ {
    move |name| dir.join(format!("{name}.log"))
}

#[test]
fn the_connection_over_the_limit_is_refused_cleanly_and_the_next_free_slot_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let server = limited_server(dir.path());
    let mut log = logs(dir.path());
    let port = server.mqtt_port;

    // A watcher of the wills, a client whose will it waits for, and the rest filled up.
    let mut wills = server.subscribe("limit/will/#");
    let mut will = connected(
        &server,
        port,
        "admin-will",
        &["--will-topic", "limit/will/gone", "--will-payload", "6f6b"],
        &log("will"),
    );
    let mut clients: Vec<Proc> = (2..CLIENTS)
        .map(|n| {
            connected(
                &server,
                port,
                &format!("admin-{n}"),
                &[],
                &log(&format!("c{n}")),
            )
        })
        .collect();

    // Connection N+1, and its retry (the one that used to panic inside rumqttd).
    for _ in 0..2 {
        let refused = attempt(&server, "admin-extra");
        assert!(
            refused.contains("received CONNACK (3)")
                && refused.contains("Connection Refused: broker unavailable"),
            "the connection over the limit was not refused with CONNACK 3:\n{refused}"
        );
    }
    assert_eq!(
        server.metric("boottorrent_mqtt_connections_over_limit_total"),
        2
    );
    assert_eq!(
        server.metric("boottorrent_mqtt_connections_open"),
        CLIENTS as u64
    );
    let text = server.log_text();
    let lines = text
        .lines()
        .filter(|l| l.contains("refused an MQTT connection"))
        .count();
    assert_eq!(lines, 1, "one log line per interval:\n{text}");

    // A slot frees when a session ends: the refused client id gets in, then nobody else.
    clients.pop().unwrap().kill9();
    wait_for("a freed slot to be taken", || {
        let out = attempt(&server, "admin-extra");
        // `-W` ends a session that got in; a refusal means the slot is not free yet.
        out.contains("received CONNACK (0)").then_some(())
    });
    wait_for("the session that got in to end", || {
        (server.metric("boottorrent_mqtt_connections_open") == CLIENTS as u64 - 1).then_some(())
    });
    let late = connected(&server, port, "admin-late", &[], &log("late"));
    let refused = attempt(&server, "admin-extra");
    assert!(refused.contains("received CONNACK (3)"), "{refused}");

    // Wills are still published: a client that drops without DISCONNECT leaves its will.
    will.kill9();
    let (topic, payload) = wills.next();
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("limit/will/gone", &b"6f6b"[..])
    );
    drop(late);

    let (status, body) = healthz(&server);
    assert_eq!(status, 200, "{body}");
    let text = server.log_text();
    assert!(!text.contains("panicked"), "rumqttd panicked:\n{text}");
}

/// What a login with a plain socket got.
#[derive(Debug)]
enum Login {
    /// CONNACK 0: the session.
    Admitted(TcpStream),
    /// A CONNACK with this refusal code.
    Refused(u8),
    /// Closed without a CONNACK: what rumqttd does at its own limit.
    Dropped,
}

/// Logs in as the operator on `port` with a plain socket and no retry. (mosquitto retries
/// with the same client id, and after a refusal by rumqttd's own limit that retry panics
/// inside rumqttd.)
fn login(server: &Server, port: u16, client_id: &str) -> Login {
    login_as(port, client_id, "admin", &server.admin_token())
}

/// Logs in as `client_id` with a plain socket and no retry.
fn login_as(port: u16, client_id: &str, username: &str, password: &str) -> Login {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut connect = rumqttc::Connect::new(client_id);
    connect.keep_alive = 600;
    connect.set_login(username, password);
    let mut out = bytes::BytesMut::new();
    connect.write(&mut out).unwrap();
    stream.write_all(&out).unwrap();
    let mut ack = [0u8; 4];
    match stream.read_exact(&mut ack) {
        Ok(()) if ack == [0x20, 2, 0, 0] => Login::Admitted(stream),
        Ok(()) if ack[..3] == [0x20, 2, 0] => Login::Refused(ack[3]),
        Ok(()) => panic!("{client_id} got {ack:?}"),
        Err(_) => Login::Dropped,
    }
}

#[test]
fn clients_leaving_and_coming_at_the_limit_never_meet_rumqttds_own_limit() {
    // A lab after a power cut: every machine drops and reconnects at once, over and over.
    // Each reconnect must find its slot either free in rumqttd too (CONNACK 0) or taken
    // (CONNACK 3, try again), never a rumqttd still counting the session that left.
    let dir = tempfile::tempdir().unwrap();
    let server = limited_server(dir.path());
    let mut refused = 0;
    for round in 0..10 {
        let mut sessions = Vec::new();
        let mut waiting: Vec<String> = (0..CLIENTS).map(|n| format!("admin-{n}")).collect();
        wait_for(&format!("round {round} to be all connected"), || {
            waiting.retain(|id| match login(&server, server.mqtt_port, id) {
                Login::Admitted(stream) => {
                    sessions.push(stream);
                    false
                }
                Login::Refused(3) => {
                    refused += 1;
                    true
                }
                other => panic!(
                    "{id} in round {round}: {other:?}\n{}",
                    server.proc.log_tail(30)
                ),
            });
            waiting.is_empty().then_some(())
        });
        // One more is refused by the front, not dropped by rumqttd.
        assert!(matches!(
            login(&server, server.mqtt_port, "admin-extra"),
            Login::Refused(3)
        ));
        drop(sessions);
    }
    let text = server.log_text();
    assert!(
        !text.contains("no space for new connection") && !text.contains("panicked"),
        "rumqttd reached its own limit:\n{text}"
    );
    assert_eq!(healthz(&server).0, 200);
    eprintln!("reconnects refused while slots were given back: {refused}");
}

#[test]
fn a_client_reconnecting_at_the_limit_takes_over_its_own_session() {
    // A machine whose network blinked comes back while the broker still holds its old
    // session: with every slot taken it must not wait for that session to time out.
    let dir = tempfile::tempdir().unwrap();
    let server = limited_server(dir.path());
    let mut sessions: Vec<TcpStream> = (0..CLIENTS)
        .map(
            |n| match login(&server, server.mqtt_port, &format!("admin-{n}")) {
                Login::Admitted(stream) => stream,
                other => panic!("admin-{n}: {other:?}"),
            },
        )
        .collect();
    assert!(matches!(
        login(&server, server.mqtt_port, "admin-new"),
        Login::Refused(3)
    ));
    let Login::Admitted(_again) = login(&server, server.mqtt_port, "admin-0") else {
        panic!("admin-0 could not take over its own session");
    };
    // The broker closed the old session, and the slot is still one.
    let mut rest = Vec::new();
    assert_eq!(sessions[0].read_to_end(&mut rest).unwrap_or(0), 0);
    assert_eq!(
        server.metric("boottorrent_mqtt_connections_open"),
        CLIENTS as u64
    );
    assert!(matches!(
        login(&server, server.mqtt_port, "admin-new"),
        Login::Refused(3)
    ));
    sessions.clear();
    assert!(!server.log_text().contains("panicked"));
}

#[test]
fn a_token_holder_cannot_take_the_slots_of_known_machines() {
    // Every golden image carries the enrollment token, and with it rumqttd admits any id it
    // has never seen. Logins under made-up ids held every slot, and the lab's own machines
    // were refused (CONNACK 3) for as long as the student kept them open.
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = limited_server(dir);
    let known = ["pc-known-1", "pc-known-2"];
    // Real agents with their keys in `dir`, returned once online.
    let online = |ids: &[&str]| -> Vec<Proc> {
        let key = server.key_hex();
        let agents = ids
            .iter()
            .map(|id| run_agent(dir, &server, id, &["--server-key", &key]))
            .collect();
        for id in ids {
            wait_for(&format!("{id} to be online"), || {
                (server.online(id) == Some(true)).then_some(())
            });
        }
        agents
    };
    for mut agent in online(&known) {
        agent.kill9();
    }
    for id in known {
        wait_for(&format!("{id} to be offline"), || {
            (server.online(id) == Some(false)).then_some(())
        });
    }

    // The student logs in under new ids until refused: the slots the two known machines
    // may need stay free.
    let token = server.enroll_token();
    let mut held = Vec::new();
    let refused = loop {
        let id = format!("pc-made-up-{}", held.len());
        match login_as(server.mqtt_port, &id, &id, &token) {
            Login::Admitted(stream) => held.push(stream),
            Login::Refused(code) => break code,
            Login::Dropped => panic!("{id} got no CONNACK"),
        }
        assert!(
            held.len() <= CLIENTS,
            "more than {CLIENTS} clients admitted"
        );
    };
    assert_eq!(refused, 3, "server unavailable");
    assert_eq!(held.len(), CLIENTS - known.len());
    assert!(server.metric("boottorrent_mqtt_new_ids_over_limit_total") >= 1);

    // The lab's machines come back while the student holds on: both get in.
    let _agents = online(&known);
    drop(held);
    assert!(!server.log_text().contains("panicked"));
}

#[test]
fn a_real_agent_refused_at_the_limit_gets_in_when_a_slot_frees_and_leaves_its_will() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = limited_server(dir);
    let mut sessions: Vec<TcpStream> = (0..CLIENTS)
        .map(
            |n| match login(&server, server.mqtt_port, &format!("admin-{n}")) {
                Login::Admitted(stream) => stream,
                other => panic!("admin-{n}: {other:?}"),
            },
        )
        .collect();

    let agent = run_agent(
        dir,
        &server,
        "pc-full",
        &["--server-key", &server.key_hex()],
    );
    wait_for("the agent to be refused", || {
        let log = agent.log_text();
        assert!(!log.contains("Error:"), "the agent stopped:\n{log}");
        log.contains("ServiceUnavailable").then_some(())
    });
    assert_eq!(server.online("pc-full"), None, "known without a login");

    // A slot frees: the agent's next retry gets in, registers and is online.
    sessions.pop();
    wait_for("the agent to be online", || {
        (server.online("pc-full") == Some(true)).then_some(())
    });
    assert!(server.metric("boottorrent_mqtt_connections_over_limit_total") >= 1);

    // Killed without a goodbye: its last will (a signed `offline`) still marks it offline.
    let mut agent = agent;
    agent.kill9();
    wait_for("the agent's will to mark it offline", || {
        (server.online("pc-full") == Some(false)).then_some(())
    });
    assert!(!server.log_text().contains("panicked"));
}

#[test]
fn the_tls_port_counts_toward_the_same_limit() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let tls = boottorrent_testkit::make_tls_files(dir);
    let broker = dir.join("broker.toml");
    std::fs::write(&broker, broker_file_with(MAX_CONNECTIONS, "")).unwrap();
    let mqtts = free_port();
    let server = Server::start(
        &dir.join("data"),
        &[
            "--broker-config",
            broker.to_str().unwrap(),
            "--tls-cert",
            tls.cert.to_str().unwrap(),
            "--tls-key",
            tls.key.to_str().unwrap(),
            "--mqtts-listen",
            &format!("127.0.0.1:{mqtts}"),
            "--https-listen",
            &format!("127.0.0.1:{}", free_port()),
        ],
    );
    let mut sessions: Vec<TcpStream> = (0..CLIENTS)
        .map(
            |n| match login(&server, server.mqtt_port, &format!("admin-{n}")) {
                Login::Admitted(stream) => stream,
                other => panic!("admin-{n}: {other:?}"),
            },
        )
        .collect();
    let over_tls = || {
        let mut command = Command::new("mosquitto_sub");
        command
            .args(["-d", "-h", "127.0.0.1", "-p", &mqtts.to_string()])
            .arg("--cafile")
            .arg(&tls.ca)
            .args([
                "-i",
                "admin-tls",
                "-u",
                "admin",
                "-P",
                &server.admin_token(),
            ])
            .args(["-t", "limit/none", "-W", "2"]);
        let out = run_within(command, PATIENCE);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let refused = over_tls();
    assert!(
        refused.contains("Connection Refused: broker unavailable"),
        "{refused}"
    );
    assert_eq!(
        server.metric("boottorrent_mqtt_connections_over_limit_total"),
        1
    );
    sessions.pop();
    wait_for("the TLS client to get the freed slot", || {
        over_tls().contains("received CONNACK (0)").then_some(())
    });
}

#[test]
fn clients_of_a_listener_the_front_does_not_count_turn_healthz_unhealthy_but_wedge_nothing() {
    // A listener of the broker file is served by rumqttd directly: the front does not count
    // its clients, so they can fill rumqttd's table; the health probe then gets no CONNACK.
    let dir = tempfile::tempdir().unwrap();
    let broker = dir.path().join("broker.toml");
    let direct = free_port();
    let extra = format!(
        "[v4.direct]\nname = \"direct\"\nlisten = \"127.0.0.1:{direct}\"\n\
         next_connection_delay_ms = 1\n    [v4.direct.connections]\n    \
         connection_timeout_ms = 5000\n    max_payload_size = 66560\n    \
         max_inflight_count = 100\n    dynamic_filters = true\n"
    );
    std::fs::write(&broker, broker_file_with(MAX_CONNECTIONS, &extra)).unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--broker-config", broker.to_str().unwrap()],
    );
    // The server's 3 links and 17 direct clients fill rumqttd's 20. A login that meets the
    // probe's session in the table is refused: it tries again under a new id.
    let mut ids = (0..).map(|n| format!("admin-d{n}"));
    let mut direct_clients: Vec<TcpStream> = Vec::new();
    while direct_clients.len() < MAX_CONNECTIONS - 3 {
        match login(&server, direct, &ids.next().unwrap()) {
            Login::Admitted(stream) => direct_clients.push(stream),
            Login::Dropped => {}
            Login::Refused(code) => panic!("refused with {code}"),
        }
    }
    let body = wait_for("/healthz to report the full broker", || {
        let (status, body) = healthz(&server);
        (status == 503).then_some(body)
    });
    assert!(
        body.contains("mqtt_broker") && body.contains("admits no clients"),
        "{body}"
    );
    assert!(
        server
            .log_text()
            .contains("shares rumqttd's max_connections"),
        "no warning that the listener's clients are not counted:\n{}",
        server.log_text()
    );

    // Room for the probe and the front's clients again.
    direct_clients.truncate(MAX_CONNECTIONS - 3 - 4);
    wait_for("/healthz to be ok again", || {
        (healthz(&server).0 == 200).then_some(())
    });
    let log = dir.path().join("again.log");
    let again = connected(&server, server.mqtt_port, "admin-again", &[], &log);
    drop(again);

    // Full again while a client of the front logs in: rumqttd drops it without CONNACK and
    // keeps its will entry, on which its retry would crash rumqttd for everyone. The front
    // refuses that id from then on instead; every other id still gets in.
    while direct_clients.len() < MAX_CONNECTIONS - 3 {
        match login(&server, direct, &ids.next().unwrap()) {
            Login::Admitted(stream) => direct_clients.push(stream),
            Login::Dropped => {}
            Login::Refused(code) => panic!("refused with {code}"),
        }
    }
    assert!(matches!(
        login(&server, server.mqtt_port, "admin-unlucky"),
        Login::Dropped
    ));
    // mosquitto retries with the same id, as the load generator did.
    let retry = attempt(&server, "admin-unlucky");
    assert!(
        retry.contains("Connection Refused: broker unavailable"),
        "{retry}"
    );
    direct_clients.truncate(MAX_CONNECTIONS - 3 - 4);
    let log = dir.path().join("after.log");
    let _after = connected(&server, server.mqtt_port, "admin-after", &[], &log);
    assert!(matches!(
        login(&server, server.mqtt_port, "admin-unlucky"),
        Login::Refused(3)
    ));
    let (status, body) = healthz(&server);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("admin-unlucky"), "{body}");
    let text = server.log_text();
    assert!(!text.contains("panicked"), "rumqttd panicked:\n{text}");
}

#[test]
fn a_broker_file_without_room_for_clients_stops_startup_with_the_number_to_set() {
    let dir = tempfile::tempdir().unwrap();
    let broker = dir.path().join("broker.toml");
    std::fs::write(&broker, broker_file_with(4, "")).unwrap();
    let mut command = Command::new(common::BOOTTORRENT);
    command
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--mqtt-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--http-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--bt-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--broker-config")
        .arg(&broker);
    let out = run_within(command, PATIENCE);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "serve started with no room for clients"
    );
    assert!(
        err.contains("max_connections is 4") && err.contains("set at least 5"),
        "{err}"
    );
}

/// A host that gives the service few open files (a 10,000-machine run stopped at 6,706 agents
/// with "Too many open files" on every accept, HTTP's included): the front admits what the
/// files hold, three per agent beside HTTP's share and the server's own, and refuses the next
/// client with CONNACK 3 while HTTP keeps answering.
#[test]
fn the_open_file_limit_caps_the_clients_and_the_next_is_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    // 1,400 files, 64 of them HTTP's, 1,280 the server's own: (1400 - 64 - 1280) / 3 = 18.
    let server = Server::start_with_open_files(
        &dir.path().join("data"),
        1400,
        1400,
        &["--http-max-connections", "64"],
    );
    let fit = 18;
    let mut log = logs(dir.path());
    let warned = server.proc.log_text();
    assert!(
        warned.contains("admits fewer MQTT clients") && warned.contains("needed="),
        "{warned}"
    );
    let clients: Vec<Proc> = (0..fit)
        .map(|n| {
            connected(
                &server,
                server.mqtt_port,
                &format!("admin-{n}"),
                &[],
                &log(&format!("f{n}")),
            )
        })
        .collect();
    let refused = attempt(&server, "admin-over");
    assert!(refused.contains("CONNACK (3)"), "{refused}");
    assert_eq!(healthz(&server).0, 200);
    assert_eq!(server.metric("boottorrent_mqtt_client_limit"), fit as u64);
    drop(clients);
}

/// rumqttd keeps each subscription filter's messages, read or not, until that filter's log is
/// full; the embedded broker.toml keeps a few KiB per filter so that the server's memory stays
/// bounded (it used to grow with every message). A client that stops reading therefore falls
/// behind its filter's log and is moved past what it missed: that loss is counted and
/// logged, not silent, and the broker carries on serving it.
#[test]
fn a_subscriber_that_stops_reading_is_skipped_ahead_counted_and_served_again() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut log = logs(dir);
    let server = Server::start(&dir.join("data"), &[]);
    let topic = "boottorrent/cmd/global/boot";
    let mut slow = connected(
        &server,
        server.mqtt_port,
        "admin-slow",
        &["-t", "boottorrent/cmd/global/#", "-F", "%t %l"],
        &log("slow"),
    );
    wait_for("the slow subscriber's SUBACK", || {
        slow.log_text().contains("Subscribed (").then_some(())
    });
    assert_eq!(server.metric("boottorrent_mqtt_broker_skips_total"), 0);

    // Frozen, it reads nothing: 64 MB is more than the socket buffers between rumqttd, the
    // server's front and the client hold, so the rest waits in the filter's log, and most of
    // it is dropped from there before the client reads again.
    assert!(slow.freeze());
    let mut publisher = Command::new("mosquitto_pub");
    publisher
        .args(["-h", "127.0.0.1", "-p", &server.mqtt_port.to_string()])
        .args([
            "-i",
            "admin-flood",
            "-u",
            "admin",
            "-P",
            &server.admin_token(),
        ])
        .args(["-q", "1", "-t", topic, "-l"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = publisher.spawn().expect("running mosquitto_pub");
    let mut stdin = child.stdin.take().unwrap();
    let line = format!("{}\n", "x".repeat(1023));
    for _ in 0..65_536 {
        stdin.write_all(line.as_bytes()).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(slow.thaw());

    wait_for("the broker to count the subscriber it moved ahead", || {
        (server.metric("boottorrent_mqtt_broker_skips_total") > 0).then_some(())
    });
    wait_for("the server to log the skip", || {
        server
            .log_text()
            .contains("fell behind by more than the broker keeps for its filter")
            .then_some(())
    });
    // Served again: a message published now reaches it, after what it still had queued.
    let got_before = slow.log_text().matches(" 1023\n").count();
    assert!(
        got_before < 65_536,
        "it got all {got_before}: nothing was dropped"
    );
    server.publish_admin(topic, b"after the skip");
    wait_for(
        "the subscriber to get a message published after the skip",
        || {
            slow.log_text()
                .contains(&format!("{topic} 14\n"))
                .then_some(())
        },
    );
    assert_eq!(healthz(&server).0, 200);
}
