//! The agent against the real server: `boottorrent serve` and two `boottorrent-agent run`
//! processes on loopback, commands published with `mosquitto_pub`.
//!

mod common;

use std::process::Command;
use std::time::Instant;

use boottorrent_proto::{BootCommand, Command as ProtoCommand, generate_signing_key};
use common::*;

#[test]
fn two_agents_register_go_offline_when_killed_and_ignore_forged_commands() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), &[]);

    // Agent a pins the server key with `enroll`; agent b from its config (environment).
    let out = output({
        let mut c = agent(&["enroll", "--config"]);
        c.arg(dir.join("none.toml"))
            .args(["--http-url", &server.url(""), "--machine-id", "pc-a"])
            .arg("--data-dir")
            .arg(dir.join("pc-a"));
        std::fs::write(dir.join("none.toml"), "").unwrap();
        c
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let server_key_hex = hex::encode(server.key().verifying_key().to_bytes());
    assert!(stdout.contains("fingerprint  SHA256:"), "{stdout}");
    assert!(stdout.contains(&server_key_hex), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(dir.join("pc-a/server.pub"))
            .unwrap()
            .trim(),
        server_key_hex
    );

    let mut a = run_agent(dir, &server, "pc-a", &[]);
    let mut b = run_agent(dir, &server, "pc-b", &["--server-key", &server_key_hex]);
    wait_for("both agents to show online", || {
        (server.online("pc-a") == Some(true) && server.online("pc-b") == Some(true)).then_some(())
    });
    // The embedded broker keeps no machine's status retained: the server hears each one
    // live, and rumqttd matches every retained message against every later subscription
    // (issue #17). A subscriber that comes later gets none.
    let retained = server.sniff_as(
        "admin",
        &server.admin_token(),
        &["boottorrent/evt/machine/+/status"],
        2,
    );
    assert!(!retained.contains("received PUBLISH"), "{retained}");
    let machine = server.get_json("/api/v1/machines/pc-b");
    assert_eq!(machine["agent_version"], env!("CARGO_PKG_VERSION"));
    assert!(!machine["os"].as_str().unwrap().is_empty(), "{machine}");
    assert!(
        machine["free_disk_bytes"].as_u64().unwrap() > 0,
        "{machine}"
    );
    // The server's configuration arrived and was verified with the pinned key.
    wait_for("pc-b to apply the server's configuration", || {
        b.log_text()
            .contains("applied the server's configuration")
            .then_some(())
    });

    // SIGKILL: no goodbye; the broker publishes the last will.
    a.kill9();
    let killed = Instant::now();
    wait_for("pc-a to show offline", || {
        (server.online("pc-a") == Some(false)).then_some(())
    });
    let took = killed.elapsed();
    assert!(
        took.as_secs_f64() <= 1.5 * KEEPALIVE_SECS as f64,
        "offline after {took:?}, more than 1.5 x the {KEEPALIVE_SECS} s keepalive"
    );
    assert_eq!(server.online("pc-b"), Some(true));

    // A command signed by another key is ignored, and the agent says why.
    let topic = "boottorrent/cmd/machine/pc-b/boot";
    let boot = ProtoCommand::Boot(BootCommand {
        image: "img-1".parse().unwrap(),
        deployment: None,
    });
    let seq = now_ms() as u64 * 1000;
    let forged = signed_command(topic, boot.clone(), &generate_signing_key().unwrap(), seq);
    server.publish_admin(topic, &forged);
    wait_for("pc-b to log the forged command", || {
        b.log_text()
            .contains("ignored boot command on boottorrent/cmd/machine/pc-b/boot: envelope signature does not verify")
            .then_some(())
    });
    assert!(!b.log_text().contains("received boot command"));

    // The same command signed by the server is taken, once: a replay is ignored.
    let genuine = signed_command(topic, boot, &server.key(), seq + 1);
    server.publish_admin(topic, &genuine);
    wait_for("pc-b to take the genuine command", || {
        b.log_text().contains("received boot command").then_some(())
    });
    server.publish_admin(topic, &genuine);
    wait_for("pc-b to log the replay", || {
        b.log_text()
            .contains("is not above the last accepted")
            .then_some(())
    });
    assert_eq!(b.log_text().matches("received boot command").count(), 1);

    // SIGTERM: a clean exit that tells the server.
    let status = b.terminate();
    assert!(status.success(), "{status}:\n{}", b.log_text());
    wait_for("pc-b to show offline after its shutdown", || {
        (server.online("pc-b") == Some(false)).then_some(())
    });
    assert!(
        b.log_text().contains("MQTT session closed"),
        "{}",
        b.log_text()
    );
}

#[test]
fn the_agent_reconnects_after_the_broker_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut server = Server::start(&dir.join("server"), &[]);
    let key = hex::encode(server.key().verifying_key().to_bytes());
    let agent_r = run_agent(dir, &server, "pc-r", &["--server-key", &key]);
    wait_for("pc-r online", || {
        (server.online("pc-r") == Some(true)).then_some(())
    });

    // The same server again on the same ports and data directory.
    server.kill9();
    let server = server.restart(&[]);
    // The agent comes back by itself and announces itself again (a second startup).
    wait_for("pc-r to reconnect and announce itself again", || {
        let log = agent_r.log_text();
        (log.matches("connected to the broker").count() >= 2 && server.online("pc-r") == Some(true))
            .then_some(())
    });
    // And it subscribed again: a command reaches it.
    boot_command_reaches(&server, &agent_r, "pc-r");
}

#[test]
fn an_agent_talks_to_the_server_over_mqtt_tls_only() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let tls = boottorrent_testkit::make_tls_files(dir);
    let (mqtts_port, https_port) = (free_port(), free_port());
    let server = Server::start(
        &dir.join("server"),
        &[
            "--tls-cert",
            tls.cert.to_str().unwrap(),
            "--tls-key",
            tls.key.to_str().unwrap(),
            "--mqtts-listen",
            &format!("127.0.0.1:{mqtts_port}"),
            "--https-listen",
            &format!("127.0.0.1:{https_port}"),
        ],
    );
    // With TLS configured the API takes tokens only over HTTPS: ask as an operator would.
    let online = |id: &str| -> Option<bool> {
        let out = Command::new(BOOTTORRENT)
            .args(["machines", "list", "--json", "--server"])
            .arg(format!("https://127.0.0.1:{https_port}"))
            .arg("--ca-cert")
            .arg(&tls.ca)
            .arg("--data-dir")
            .arg(&server.data_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let machines: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        machines
            .as_array()?
            .iter()
            .find(|m| m["id"] == id)
            .and_then(|m| m["online"].as_bool())
    };
    let key = hex::encode(server.key().verifying_key().to_bytes());
    // The agent is given only the TLS port and the CA that signed the server's certificate.
    let agent = run_agent(
        dir,
        &server,
        "pc-tls",
        &[
            "--server-key",
            &key,
            "--mqtt-port",
            &mqtts_port.to_string(),
            "--tls-ca",
            tls.ca.to_str().unwrap(),
        ],
    );
    wait_for("pc-tls online over TLS", || {
        (online("pc-tls") == Some(true)).then_some(())
    });
    assert!(
        agent.log_text().contains("tls=true"),
        "{}",
        agent.log_text()
    );
    // A command signed by the server reaches it over the same TLS session.
    boot_command_reaches(&server, &agent, "pc-tls");

    // An agent that does not trust the server's certificate never gets in.
    let other_ca = dir.join("other");
    std::fs::create_dir(&other_ca).unwrap();
    let untrusted = boottorrent_testkit::make_tls_files(&other_ca);
    let stranger = run_agent(
        dir,
        &server,
        "pc-untrusting",
        &[
            "--server-key",
            &key,
            "--mqtt-port",
            &mqtts_port.to_string(),
            "--tls-ca",
            untrusted.ca.to_str().unwrap(),
        ],
    );
    wait_for("the untrusting agent to report the TLS failure", || {
        stranger.log_text().contains("retrying in").then_some(())
    });
    assert_eq!(online("pc-untrusting"), None);
}

/// Publishes a `boot` command for `machine`, signed by the server's key, and waits until
/// `agent` logs that it received it.
fn boot_command_reaches(server: &Server, agent: &Proc, machine: &str) {
    let topic = format!("boottorrent/cmd/machine/{machine}/boot");
    let boot = ProtoCommand::Boot(BootCommand {
        image: "img-1".parse().unwrap(),
        deployment: None,
    });
    server.publish_admin(
        &topic,
        &signed_command(&topic, boot, &server.key(), now_ms() as u64 * 1000),
    );
    wait_for(&format!("{machine} to receive a boot command"), || {
        agent
            .log_text()
            .contains("received boot command")
            .then_some(())
    });
}

#[test]
fn an_agent_whose_startup_was_refused_sends_it_again_until_answered() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // The admission rate runs against the clock from the fillers on: have the agent binary
    // ready (built, if it must be) before then.
    agent_binary();
    // Two new machines a minute: one admission every 30 s once the burst is spent.
    let server = Server::start(&dir.join("server"), &["--enroll-per-minute", "2"]);
    let key = hex::encode(server.key().verifying_key().to_bytes());
    // Two made-up machines spend the burst.
    for id in ["filler-1", "filler-2"] {
        let machine: boottorrent_proto::MachineId = id.parse().unwrap();
        let signing = generate_signing_key().unwrap();
        let topic = boottorrent_proto::Topic::Event {
            machine: machine.clone(),
            kind: boottorrent_proto::EventKind::Startup,
        };
        let startup = boottorrent_proto::Event::Startup(boottorrent_proto::Startup {
            agent_version: "test".into(),
            hostname: id.into(),
            os: "linux".into(),
            ips: vec![],
            macs: vec![],
            free_disk_bytes: 0,
            images: vec![],
            public_key: boottorrent_proto::PublicKeyBytes::from(signing.verifying_key().to_bytes()),
            running: None,
        });
        let payload = boottorrent_proto::Envelope::sign(
            &topic,
            boottorrent_proto::SenderId::from(machine),
            now_ms(),
            now_ms() as u64 * 1000,
            startup,
            &signing,
        )
        .unwrap()
        .encode(boottorrent_proto::Encoding::MessagePack)
        .unwrap();
        server.publish_admin(&topic.to_string(), &payload);
        wait_for("the filler registered", || server.online(id).filter(|o| *o));
    }
    // The real agent's first startup is refused; it must not stay unknown for good.
    let agent = run_agent(dir, &server, "pc-late", &["--server-key", &key]);
    boottorrent_testkit::wait_until(
        "pc-late admitted by a startup it sent again",
        std::time::Duration::from_secs(90),
        || (server.online("pc-late") == Some(true)).then_some(()),
    );
    assert!(
        agent
            .log_text()
            .contains("the server has not answered this machine's startup yet"),
        "{}",
        agent.log_text()
    );
}

/// A lab PC that booted a new image runs the agent inside that image: its own configuration
/// (no machine id, no pinned key, and the golden image's host name, which every machine
/// shares), and only the store on the host volume in common with the agent that ran before.
/// It must come back as the same machine with the same key, approved, without an operator.
#[test]
fn an_agent_in_a_freshly_booted_image_is_the_same_machine_through_its_store() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), &[]);
    enroll(&server, dir, "pc-s");
    let mut before = run_agent(dir, &server, "pc-s", &[]);
    wait_for("pc-s online", || {
        (server.online("pc-s") == Some(true)).then_some(())
    });
    let first = server.machine("pc-s").unwrap();
    assert_eq!(first["key_state"], "approved");
    let store = dir.join("pc-s");
    let key_file = std::fs::read(store.join("agent.key")).unwrap();
    assert!(before.terminate().success(), "{}", before.log_text());

    // The agent of the new image: its own empty configuration, the same store.
    let config = dir.join("image.toml");
    std::fs::write(&config, "").unwrap();
    let mut command = agent(&["run"]);
    command
        .arg("--config")
        .arg(&config)
        .args(["--server", "127.0.0.1"])
        .args(["--mqtt-port", &server.mqtt_port.to_string()])
        .args(["--http-url", &server.url("")])
        .arg("--data-dir")
        .arg(&store)
        .args(["--bt-listen", "127.0.0.1:0"])
        .args(["--heartbeat-interval-secs", "1"])
        .env("BOOTTORRENT_AGENT_ENROLL_TOKEN", server.enroll_token());
    let after = spawn(command, dir.join("image.log"));
    wait_for("pc-s online again, from the new image", || {
        after
            .log_text()
            .contains("connected to the broker")
            .then_some(())
            .and(server.machine("pc-s"))
            .filter(|m| m["online"] == true && m["last_seen"] != first["last_seen"])
    });
    let m = server.machine("pc-s").unwrap();
    assert_eq!(m["key_state"], "approved", "{m}");
    assert_eq!(m["public_key"], first["public_key"], "{m}");
    assert_eq!(m["pending_key"], serde_json::Value::Null, "{m}");
    assert_eq!(std::fs::read(store.join("agent.key")).unwrap(), key_file);
    // Not a second machine under the host's name.
    let machines = server.get_json("/api/v1/machines");
    let ids: Vec<&str> = machines
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["pc-s"], "{machines}");
}
