//! The server against an existing broker: a real mosquitto (Debian's, 2.0) configured by
//! `boottorrent broker-config`, the server with `--broker mqtts://...`, a real agent logging in
//! with the certificate it got from the server. Then what a holder of the enrollment token can
//! do there, with real mosquitto clients and a certificate obtained for a new id of its own:
//! nothing to another machine.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use boottorrent_proto::{SigningKey, certificate_request, generate_signing_key};
use common::*;

const DEPLOY_PATIENCE: Duration = Duration::from_secs(120);

/// mosquitto on a free loopback port, with the configuration `broker-config` wrote.
struct Mosquitto {
    proc: Proc,
    port: u16,
    conf: PathBuf,
    log: PathBuf,
    /// Where `broker-config` put the CA certificate.
    ca: PathBuf,
}

impl Mosquitto {
    /// Writes the configuration for the server data directory `data_dir` into `dir/mq`
    /// and starts mosquitto with it.
    fn start(dir: &Path, data_dir: &Path) -> Mosquitto {
        Mosquitto::start_on(dir, data_dir, free_port(), "mq")
    }

    /// As [`Mosquitto::start`], on `port`, the configuration written into `dir/name`.
    fn start_on(dir: &Path, data_dir: &Path, port: u16, name: &str) -> Mosquitto {
        if !Path::new("/usr/sbin/mosquitto").exists() {
            require_tool("mosquitto", "mosquitto");
        }
        let out = dir.join(name);
        output({
            let mut c = Command::new(BOOTTORRENT);
            c.arg("broker-config")
                .arg("--data-dir")
                .arg(data_dir)
                .arg("--out")
                .arg(&out)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                // Started as root (CI), mosquitto would drop to user mosquitto, who cannot
                // read the key this test's user wrote.
                .args(["--run-as", "root"]);
            c
        });
        let conf = out.join("mosquitto.conf");
        // Denied publishes and subscriptions are logged at debug level: the attacks below
        // read them there.
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.insert_str(0, "log_type all\nlog_dest stderr\n");
        std::fs::write(&conf, text).unwrap();
        let log = dir.join(format!("mosquitto-{name}.log"));
        let mosquitto = Mosquitto {
            proc: spawn(mosquitto_command(&conf), log.clone()),
            port,
            conf,
            log,
            ca: out.join("ca.crt"),
        };
        mosquitto.wait_listening();
        mosquitto
    }

    fn wait_listening(&self) {
        wait_for("mosquitto to listen", || {
            TcpStream::connect(("127.0.0.1", self.port)).ok()
        });
    }

    fn restart(&mut self) {
        self.proc = spawn(
            mosquitto_command(&self.conf),
            self.log.with_extension("2.log"),
        );
        self.wait_listening();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn mosquitto_command(conf: &Path) -> Command {
    // Debian installs it into /usr/sbin, which a non-root PATH may lack.
    let sbin = Path::new("/usr/sbin/mosquitto");
    let mut c = Command::new(if sbin.exists() {
        sbin
    } else {
        Path::new("mosquitto")
    });
    c.arg("-c").arg(conf);
    c
}

/// A key and the certificate the server gave for it, as files mosquitto clients take.
struct Credentials {
    cert: PathBuf,
    key: PathBuf,
}

/// `POST /api/v1/machines/{id}/certificate` for `key` with the enrollment token.
fn ask_certificate(server: &Server, id: &str, key: &SigningKey) -> reqwest::blocking::Response {
    let request = certificate_request(&id.parse().unwrap(), key, &server.enroll_token(), now_ms());
    reqwest::blocking::Client::new()
        .post(server.url(&format!("/api/v1/machines/{id}/certificate")))
        .json(&request)
        .send()
        .unwrap()
}

/// What a holder of the enrollment token gets: a certificate for a new id of its own.
fn token_holder(server: &Server, dir: &Path, id: &str) -> Credentials {
    let key = generate_signing_key().unwrap();
    let response = ask_certificate(server, id, &key);
    assert!(response.status().is_success(), "{:?}", response.text());
    let answer: boottorrent_proto::CertificateAnswer = response.json().unwrap();
    let cert = dir.join(format!("{id}.crt"));
    std::fs::write(&cert, answer.certificate).unwrap();
    // PKCS#8 of an Ed25519 key (RFC 8410), as PEM through rcgen, for OpenSSL.
    let mut pkcs8 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend_from_slice(&key.to_bytes());
    let pem = rcgen::KeyPair::try_from(pkcs8.as_slice())
        .unwrap()
        .serialize_pem();
    let key_file = dir.join(format!("{id}.key"));
    std::fs::write(&key_file, pem).unwrap();
    Credentials {
        cert,
        key: key_file,
    }
}

/// A mosquitto client command logged in with `creds`.
fn client(tool: &str, mosquitto: &Mosquitto, creds: &Credentials) -> Command {
    let mut c = Command::new(tool);
    c.args(["-h", "127.0.0.1", "-p", &mosquitto.port.to_string()])
        .arg("--cafile")
        .arg(&mosquitto.ca)
        .arg("--cert")
        .arg(&creds.cert)
        .arg("--key")
        .arg(&creds.key);
    c
}

fn events_dropped(server: &Server) -> u64 {
    let text = server.get("/metrics").text().unwrap();
    text.lines()
        .filter(|l| l.starts_with("boottorrent_mqtt_events_dropped_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn agents_on_mosquitto_get_deployments_and_a_token_holder_cannot_touch_another_machine() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let data_dir = dir.join("server");
    let mut mosquitto = Mosquitto::start(dir, &data_dir);
    let broker = format!("mqtts://127.0.0.1:{}", mosquitto.port);
    let server = Server::start(
        &data_dir,
        &["--broker", &broker, "--heartbeat-interval-secs", "2"],
    );
    assert_eq!(server.get("/healthz").status(), 200);

    // A real agent logs in with its certificate and comes online.
    enroll(&server, dir, "pc-b");
    let port = mosquitto.port.to_string();
    let agent_args = ["--mqtt-port", &port, "--broker-login", "certificate"];
    let agent = run_agent(dir, &server, "pc-b", &agent_args);
    wait_for("pc-b online through mosquitto", || {
        server.online("pc-b").filter(|o| *o)
    });
    assert!(
        mosquitto
            .log_text()
            .contains("as pc-b (p2, c1, k5, u'pc-b')"),
        "{}",
        mosquitto.log_text()
    );
    assert!(dir.join("pc-b/broker-certificate.json").exists());

    // A token holder gets a certificate for a new id of its own, and listens on everything
    // it can name: pc-b's commands and every event.
    let evil = token_holder(&server, dir, "evil-1");
    let sniffer = {
        let mut c = client("mosquitto_sub", &mosquitto, &evil);
        c.args(["-v", "-W", "20"])
            .args(["-t", "boottorrent/cmd/machine/pc-b/#"])
            .args(["-t", "boottorrent/evt/#"]);
        spawn(c, dir.join("sniffer.log"))
    };
    // mosquitto 2.0 takes the subscriptions and checks the ACL on each delivery.
    wait_for("mosquitto to take the sniffer's subscriptions", || {
        mosquitto
            .log_text()
            .contains("evil-1 0 boottorrent/evt/#")
            .then_some(())
    });

    // A deployment reaches pc-b through mosquitto.
    let (image, _) = catalogue(&server, dir, 2 << 20);
    let image = image["id"].as_str().unwrap().to_owned();
    let out = output(server.cli(&["deploy", "--json", &image, "--machine", "pc-b"]));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = d["id"].as_str().unwrap().to_owned();
    wait_until(
        "the deployment to complete on pc-b",
        DEPLOY_PATIENCE,
        || {
            let d = server.get_json(&format!("/api/v1/deployments/{id}"));
            (d["state"] == "completed").then_some(())
        },
    );

    // What the sniffer got: its own subscription is allowed to nothing of pc-b's.
    let mut sniffer = sniffer;
    sniffer.wait_within(Duration::from_secs(30));
    let sniffed = sniffer.log_text();
    assert!(
        !sniffed.contains("pc-b"),
        "the token holder read pc-b's traffic:\n{sniffed}"
    );

    // Publishing on pc-b's event topic: mosquitto drops it, the server never sees it. The
    // same garbage on the holder's own topic reaches the server (and is dropped there as
    // unsigned), which shows the check would see it.
    let dropped = events_dropped(&server);
    let publish = |topic: &str| {
        let mut c = client("mosquitto_pub", &mosquitto, &evil);
        c.args(["-q", "1", "-t", topic, "-m", "not an envelope"]);
        output(c);
    };
    publish("boottorrent/evt/machine/pc-b/heartbeat");
    wait_for("mosquitto to deny the publish on pc-b's topic", || {
        mosquitto
            .log_text()
            .contains("Denied PUBLISH from evil-1")
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        events_dropped(&server),
        dropped,
        "the server saw the publish on pc-b's topic"
    );
    publish("boottorrent/evt/machine/evil-1/heartbeat");
    wait_for("the server to drop the holder's own garbage", || {
        (events_dropped(&server) > dropped).then_some(())
    });

    // Connecting with pc-b's client id: the broker takes the certificate's name instead, so
    // pc-b keeps its session.
    let mut c = client("mosquitto_pub", &mosquitto, &evil);
    c.args([
        "-i",
        "pc-b",
        "-t",
        "boottorrent/evt/machine/evil-1/x",
        "-m",
        "x",
    ]);
    output(c);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        agent.log_text().matches("connected to the broker").count(),
        1,
        "pc-b was kicked off:\n{}",
        agent.log_text()
    );
    assert_eq!(server.online("pc-b"), Some(true));

    // The certificate endpoint: never for a known machine with another key, nor for the
    // server's own ids, nor without the token.
    let other = generate_signing_key().unwrap();
    let refused = ask_certificate(&server, "pc-b", &other);
    assert_eq!(refused.status(), 409, "{:?}", refused.text());
    let refused = ask_certificate(&server, "boottorrent-orchestrator", &other);
    assert_eq!(refused.status(), 403, "{:?}", refused.text());
    let wrong_token = certificate_request(&"new-1".parse().unwrap(), &other, "wrong", now_ms());
    let refused = reqwest::blocking::Client::new()
        .post(server.url("/api/v1/machines/new-1/certificate"))
        .json(&wrong_token)
        .send()
        .unwrap();
    assert_eq!(refused.status(), 401);
    // pc-b itself may renew for its own key.
    let pc_b_key = std::fs::read_to_string(dir.join("pc-b/agent.key")).unwrap();
    let pc_b_key = boottorrent_proto::signing_key_from_hex(pc_b_key.trim()).unwrap();
    assert!(
        ask_certificate(&server, "pc-b", &pc_b_key)
            .status()
            .is_success()
    );

    // The broker goes away: /healthz says so; it comes back: the server and the agent
    // reconnect by themselves.
    mosquitto.proc.kill9();
    wait_for("/healthz to report the lost broker", || {
        let response = server.get("/healthz");
        (response.status() == 503)
            .then(|| response.text().unwrap())
            .filter(|t| t.contains("cannot reach the broker"))
    });
    mosquitto.restart();
    wait_until("/healthz ok again", Duration::from_secs(60), || {
        (server.get("/healthz").status() == 200).then_some(())
    });
    wait_until("pc-b back", Duration::from_secs(60), || {
        (agent.log_text().matches("connected to the broker").count() >= 2
            && server.online("pc-b") == Some(true))
        .then_some(())
    });

    // Presence through mosquitto: a machine that dies is offline by its last will.
    let mut agent = agent;
    agent.kill9();
    wait_for("pc-b offline by its will", || {
        (server.online("pc-b") == Some(false)).then_some(())
    });
}

/// `boottorrent-loadgen fleet --certificate-login`, which docs/benchmarks.md runs at 10,000
/// on this path, with a few agents: each gets its certificate and comes online through
/// mosquitto, and both deployments reach them, with no failed connection.
#[test]
fn the_load_generator_runs_its_agents_through_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let data_dir = dir.join("server");
    let mosquitto = Mosquitto::start(dir, &data_dir);
    let server = Server::start(
        &data_dir,
        &["--broker", &format!("mqtts://127.0.0.1:{}", mosquitto.port)],
    );
    let mut command = Command::new(loadgen_binary());
    command
        .args(["fleet", "--json", "--ramp-secs", "1", "--settle-secs", "0"])
        .args(["--idle-secs", "1", "--poll-ms", "200"])
        .args(["--agents", "20", "--zone-agents", "5"])
        .args(["--server", &server.url("")])
        .args(["--mqtt", &format!("127.0.0.1:{}", mosquitto.port)])
        .args(["--admin-token", &server.admin_token()])
        .args(["--enroll-token", &server.enroll_token()])
        .args(["--server-pid", &server.pid().to_string()])
        .arg("--certificate-login")
        .arg("--broker-ca")
        .arg(&mosquitto.ca)
        .arg("--work-dir")
        .arg(dir.join("work"));
    let out = run_within(command, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "boottorrent-loadgen failed:\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let context = format!("report:\n{report:#}\nstderr:\n{stderr}");
    assert_eq!(report["online_in_api"], 20, "{context}");
    assert_eq!(report["answered"], 20, "{context}");
    assert_eq!(report["failed"], serde_json::json!({}), "{context}");
    assert_eq!(report["dropped"], serde_json::json!({}), "{context}");
    for (deployment, expected) in report["fanout"].as_array().unwrap().iter().zip([20, 5]) {
        assert_eq!(deployment["received"], expected, "{context}");
    }
    // They were mosquitto's clients, logged in by their certificates' names.
    assert!(
        mosquitto.log_text().contains("-00019 (p2, c1, k30, u'"),
        "{}",
        mosquitto.log_text()
    );
}

/// An agent whose stored certificate no longer works (the server's machine CA was made anew,
/// and the broker configured with it) asks for a new one after three failed connects, and
/// comes back online by itself.
#[test]
fn an_agent_replaces_a_certificate_the_broker_no_longer_takes() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let data_dir = dir.join("server");
    let mut mosquitto = Mosquitto::start(dir, &data_dir);
    let port = mosquitto.port;
    let broker = format!("mqtts://127.0.0.1:{port}");
    let mut server = Server::start(&data_dir, &["--broker", &broker]);
    enroll(&server, dir, "pc-c");
    let port_text = port.to_string();
    let agent_args = ["--mqtt-port", &port_text, "--broker-login", "certificate"];
    let mut agent = run_agent(dir, &server, "pc-c", &agent_args);
    wait_for("pc-c online", || server.online("pc-c").filter(|o| *o));
    agent.terminate();

    // A new machine CA: the old one's files removed, the broker configured anew with it.
    server.terminate();
    mosquitto.proc.kill9();
    for file in [
        "machine-ca.crt",
        "machine-ca.key",
        "orchestrator.crt",
        "orchestrator.key",
    ] {
        std::fs::remove_file(data_dir.join(file)).unwrap();
    }
    let _mosquitto = Mosquitto::start_on(dir, &data_dir, port, "mq-new");
    let server = server.restart(&["--broker", &broker]);

    let agent = spawn(
        run_agent_command(dir, &server, "pc-c", &agent_args),
        dir.join("pc-c-again.log"),
    );
    wait_until("pc-c online again", Duration::from_secs(60), || {
        server.online("pc-c").filter(|o| *o)
    });
    let log = agent.log_text();
    assert!(
        log.matches("got a broker certificate").count() == 1 && log.contains("retrying in"),
        "pc-c came back without a failed connect and one new certificate:\n{log}"
    );
}

/// A key pinned by a certificate request is stored before the certificate is issued: after a
/// restart of the server, another token holder asking for that id with another key is refused
/// (two parties would otherwise hold broker logins for one machine), the first key still gets
/// its renewal, and the real agent holding it then starts up as that machine, trusted on first
/// use.
#[test]
fn a_pinned_key_outlives_a_server_restart() {
    pinned_key_outlives_a_restart(false);
}

/// As [`a_pinned_key_outlives_a_server_restart`], with new machines waiting for the operator:
/// the agent's first startup fills in the waiting machine, and it comes online once approved.
#[test]
fn a_pinned_key_waiting_for_approval_outlives_a_server_restart() {
    pinned_key_outlives_a_restart(true);
}

fn pinned_key_outlives_a_restart(approval: bool) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let data_dir = dir.join("server");
    let mosquitto = Mosquitto::start(dir, &data_dir);
    let broker = format!("mqtts://127.0.0.1:{}", mosquitto.port);
    let auto_approve = if approval { "false" } else { "true" };
    let args = [
        "--broker",
        &broker,
        "--auto-approve",
        auto_approve,
        "--heartbeat-interval-secs",
        "2",
    ];
    let mut server = Server::start(&data_dir, &args);

    // Token holder A asks for the new id pc-x with the key its agent will use.
    let a = generate_signing_key().unwrap();
    std::fs::create_dir_all(dir.join("pc-x")).unwrap();
    std::fs::write(
        dir.join("pc-x/agent.key"),
        format!("{}\n", boottorrent_proto::signing_key_to_hex(&a)),
    )
    .unwrap();
    let response = ask_certificate(&server, "pc-x", &a);
    assert_eq!(response.status(), 200, "{:?}", response.text());

    server.terminate();
    let server = server.restart(&args);

    // Token holder B, with another key: refused, as before the restart.
    let b = generate_signing_key().unwrap();
    let refused = ask_certificate(&server, "pc-x", &b);
    assert_eq!(refused.status(), 409, "{:?}", refused.text());
    // A's key: a renewal.
    let renewed = ask_certificate(&server, "pc-x", &a);
    assert_eq!(renewed.status(), 200, "{:?}", renewed.text());

    // The agent with A's key gets its own certificate and its first startup is taken: the
    // machine shows the details it sent.
    enroll(&server, dir, "pc-x");
    let port = mosquitto.port.to_string();
    let agent_args = ["--mqtt-port", &port, "--broker-login", "certificate"];
    let _agent = run_agent(dir, &server, "pc-x", &agent_args);
    let a_hex = hex::encode(a.verifying_key().to_bytes());
    if approval {
        let machine = wait_for("pc-x's startup shown while it waits", || {
            server
                .machine("pc-x")
                .filter(|m| !m["agent_version"].as_str().unwrap_or_default().is_empty())
        });
        assert_eq!(machine["key_state"], "pending", "{machine}");
        assert_eq!(machine["pending_key"].as_str(), Some(a_hex.as_str()));
        let fingerprint = boottorrent_proto::fingerprint(&a.verifying_key().to_bytes().into());
        let approved = reqwest::blocking::Client::new()
            .post(server.url("/api/v1/machines/pc-x/approve"))
            .bearer_auth(server.admin_token())
            .json(&serde_json::json!({ "fingerprint": fingerprint }))
            .send()
            .unwrap();
        assert_eq!(approved.status(), 200, "{:?}", approved.text());
    }
    wait_until("pc-x online through mosquitto", DEPLOY_PATIENCE, || {
        server.online("pc-x").filter(|o| *o)
    });
    let machine = server.machine("pc-x").unwrap();
    assert_eq!(
        machine["public_key"].as_str(),
        Some(a_hex.as_str()),
        "{machine}"
    );
    assert!(
        !machine["agent_version"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "the startup filled in the machine: {machine}"
    );
}
