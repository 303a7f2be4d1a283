//! End-to-end tests of `boottorrent serve`: the real binary, real mosquitto clients.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use boottorrent_proto::{
    Command as BtCommand, CommandKind, Encoding, Event, Heartbeat, Presence, Scope, Topic,
    VerifyingKey, decode_command, generate_signing_key,
};
use common::{Agent, Proc, Server, admin_client_id, cli, now_ms, wait_for};
use rand::{Rng, SeedableRng};

fn server_key(server: &Server) -> VerifyingKey {
    let body = server.get_json("/api/v1/server-key");
    let bytes: [u8; 32] = hex::decode(body["public_key"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    VerifyingKey::from_bytes(&bytes).unwrap()
}

fn config_topic(agent: &Agent) -> Topic {
    Topic::Command {
        scope: Scope::Machine(agent.id.clone()),
        kind: CommandKind::MachineConfiguration,
    }
}

/// Registers `agent` and returns the verified configuration the server answered with.
fn register(server: &Server, agent: &mut Agent) -> boottorrent_proto::MachineConfiguration {
    let topic = config_topic(agent);
    let mut sub = server.subscribe(&topic.to_string());
    let (t, payload) = agent.startup();
    server.publish(agent, &t, &payload);
    let (got_topic, bytes) = sub.next();
    assert_eq!(got_topic, topic.to_string());
    let envelope = decode_command(CommandKind::MachineConfiguration, &bytes).unwrap();
    envelope.verify(&topic, &server_key(server)).unwrap();
    assert_eq!(envelope.from.as_str(), "server");
    match envelope.body {
        BtCommand::MachineConfiguration(c) => c,
        other => panic!("expected machine_configuration, got {other:?}"),
    }
}

#[test]
fn signed_startup_registers_the_machine_and_is_answered_with_signed_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--heartbeat-interval-secs", "42"],
    );
    let mut agent = Agent::new("pc-101-01");

    let config = register(&server, &mut agent);
    assert_eq!(config.heartbeat_interval_secs, 42);
    assert!(!config.config_hash.is_empty());

    let list = server.get_json("/api/v1/machines");
    let machines = list.as_array().unwrap();
    assert_eq!(machines.len(), 1, "{list}");
    let m = &machines[0];
    assert_eq!(m["id"], "pc-101-01");
    assert_eq!(m["online"], true);
    assert_eq!(m["hostname"], "pc-101-01.lab");
    assert_eq!(m["key_state"], "approved");
    assert!(m["zones"].is_array() && m["images"].is_array());
    assert!(m["last_seen"].as_str().unwrap().starts_with("20"), "{m}");
    assert_eq!(
        m["public_key"],
        hex::encode(agent.key.verifying_key().to_bytes())
    );

    // Reads need a token too; the read-only viewer token is enough.
    let listed = cli(&[
        "machines",
        "list",
        "--server",
        &server.url(""),
        "--token",
        &server.viewer_token(),
    ]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success() && text.contains("pc-101-01"),
        "{text}"
    );
    assert_eq!(
        server.metric("boottorrent_mqtt_commands_published_total"),
        1
    );
}

#[test]
fn json_startup_is_answered_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let mut agent = Agent::new("pc-json");
    let topic = config_topic(&agent);
    let mut sub = server.subscribe(&topic.to_string());
    let body = agent.startup_body();
    let (t, payload) = agent.event(body, Encoding::Json);
    assert_eq!(payload.first(), Some(&b'{'));
    server.publish(&agent, &t, &payload);
    let (_, bytes) = sub.next();
    assert_eq!(
        bytes.first(),
        Some(&b'{'),
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    let envelope = decode_command(CommandKind::MachineConfiguration, &bytes).unwrap();
    envelope.verify(&topic, &server_key(&server)).unwrap();
}

#[test]
fn forged_replayed_and_random_events_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let mut agent = Agent::new("pc-1");
    register(&server, &mut agent);

    // Signed with a key that is not the machine's.
    let intruder = generate_signing_key().unwrap();
    let topic = agent.event_topic(boottorrent_proto::EventKind::Heartbeat);
    let forged = agent.sign_for(
        &topic,
        Event::Heartbeat(Heartbeat {
            uptime_secs: 1,
            images: vec![],
        }),
        &intruder,
        now_ms(),
        Encoding::MessagePack,
    );
    server.publish(&agent, &topic.to_string(), &forged);
    wait_for("the forged heartbeat to be counted", || {
        (server.dropped("bad_signature") == 1).then_some(())
    });

    // A genuine heartbeat, sent twice: the copy is a replay.
    let (t, heartbeat) = agent.heartbeat();
    server.publish(&agent, &t, &heartbeat);
    server.publish(&agent, &t, &heartbeat);
    wait_for("the replayed heartbeat to be counted", || {
        (server.dropped("replayed") == 1).then_some(())
    });

    // A genuine envelope published on another machine's topic. pc-1's own login may not
    // (the broker's topic rules, `hostile.rs`); the operator's may publish anywhere, as any
    // login on a broker without such rules, so from here on the server's own checks of
    // what it reads are tested.
    let other = Topic::Event {
        machine: "pc-2".parse().unwrap(),
        kind: boottorrent_proto::EventKind::Heartbeat,
    };
    let admin = server.admin_token();
    let out = server.publish_as("admin", &admin, &other.to_string(), &heartbeat);
    assert!(out.status.success(), "{out:?}");
    wait_for("the misaddressed envelope to be counted", || {
        (server.dropped("sender_mismatch") == 1).then_some(())
    });

    // An envelope from 10 minutes ago.
    let old = agent.sign_for(
        &topic,
        Event::Heartbeat(Heartbeat {
            uptime_secs: 1,
            images: vec![],
        }),
        &agent.key.clone(),
        now_ms() - 600_000,
        Encoding::MessagePack,
    );
    server.publish(&agent, &topic.to_string(), &old);
    wait_for("the stale envelope to be counted", || {
        (server.dropped("stale") == 1).then_some(())
    });

    // 1,000 random payloads on 100 random boottorrent/ topics, ten per mosquitto_pub (-l sends
    // each input line as one message).
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xb007);
    let kinds = [
        "startup",
        "heartbeat",
        "progress",
        "status",
        "boot",
        "error",
        "shutdown",
        "nope",
    ];
    let before = server.metric("boottorrent_mqtt_events_received_total");
    for i in 0..100 {
        let topic = match i % 4 {
            0 => format!(
                "boottorrent/evt/machine/pc-{}/{}",
                rng.random_range(0..5),
                kinds[rng.random_range(0..kinds.len())]
            ),
            1 => format!(
                "boottorrent/evt/machine/pc-1/{}",
                kinds[rng.random_range(0..kinds.len())]
            ),
            2 => format!("boottorrent/evt/{}/x", rng.random_range(0..1000)),
            _ => format!(
                "boottorrent/evt/machine/{}",
                "a".repeat(rng.random_range(1..80))
            ),
        };
        let mut lines = Vec::new();
        for _ in 0..10 {
            let len = rng.random_range(1..300);
            let mut payload: Vec<u8> = (0..len).map(|_| rng.random::<u8>()).collect();
            // Start some payloads like real encodings so that the decoders get past byte one.
            match rng.random_range(0..3) {
                0 => payload[0] = b'{',
                1 => payload[0] = 0x86,
                _ => {}
            }
            payload.retain(|b| *b != b'\n' && *b != 0);
            if payload.is_empty() {
                payload.push(b'{');
            }
            lines.extend_from_slice(&payload);
            lines.push(b'\n');
        }
        let mut child = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &server.mqtt_port.to_string()])
            .args(["-i", &admin_client_id(), "-u", "admin", "-P", &admin])
            .args(["-q", "1", "-t", &topic, "-l"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&lines).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_for("1,000 random events to be read", || {
        (server.metric("boottorrent_mqtt_events_received_total") >= before + 1000).then_some(())
    });
    let dropped: u64 = [
        "bad_topic",
        "malformed",
        "sender_mismatch",
        "unknown_machine",
        "bad_signature",
    ]
    .iter()
    .map(|r| server.dropped(r))
    .sum();
    assert!(dropped >= 1000 + 2, "only {dropped} dropped");
    assert_eq!(
        server.metric("boottorrent_mqtt_events_accepted_total"),
        2,
        "startup and one heartbeat"
    );

    // Still serving: a fresh genuine heartbeat is accepted.
    let (t, heartbeat) = agent.heartbeat();
    server.publish(&agent, &t, &heartbeat);
    wait_for("a genuine heartbeat after the junk", || {
        (server.metric("boottorrent_mqtt_events_accepted_total") == 3).then_some(())
    });
    assert_eq!(server.machine("pc-1").unwrap()["online"], true);
    assert!(server.machine("pc-2").is_none());
}

#[test]
fn machines_survive_kill_9_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut agent = Agent::new("pc-7");
    let mut server = Server::start(&data, &[]);
    let (enroll, admin) = (server.enroll_token(), server.admin_token());
    register(&server, &mut agent);
    let key_before = server.get_json("/api/v1/server-key");
    // The configuration was sent after the registration committed; kill without warning.
    server.kill9();

    let server = Server::start(&data, &[]);
    let m = server.machine("pc-7").expect("machine kept across kill -9");
    assert_eq!(m["key_state"], "approved");
    assert_eq!(server.enroll_token(), enroll);
    assert_eq!(server.admin_token(), admin);
    assert_eq!(server.get_json("/api/v1/server-key"), key_before);

    // The replay guard is restored too: the old startup is refused, a new one accepted.
    let log = server.get_json("/api/v1/machines");
    assert_eq!(log.as_array().unwrap().len(), 1);
    register(&server, &mut agent);
}

/// A heartbeat that changes nothing but last-seen is kept in memory (shown by the API at
/// once) and written at shutdown: a clean stop keeps it, a kill -9 may lose it but nothing
/// else, and the machine reports on after either.
#[test]
fn last_seen_is_shown_at_once_and_kept_across_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut agent = Agent::new("pc-8");
    let mut server = Server::start(&data, &[]);
    register(&server, &mut agent);
    let registered = server.machine("pc-8").unwrap()["last_seen"].clone();
    let heartbeat = |server: &Server, agent: &mut Agent, after: &serde_json::Value| {
        // The API shows milliseconds: let the clock move past the last one shown.
        std::thread::sleep(Duration::from_millis(20));
        let (topic, payload) = agent.heartbeat();
        server.publish(agent, &topic, &payload);
        wait_for("the heartbeat's last-seen in the API", || {
            let seen = server.machine("pc-8")?["last_seen"].clone();
            (seen.as_str() > after.as_str()).then_some(seen)
        })
    };
    let heard = heartbeat(&server, &mut agent, &registered);
    assert_eq!(server.terminate().code(), Some(0));

    let mut server = server.restart(&[]);
    let m = server.machine("pc-8").unwrap();
    assert_eq!(m["last_seen"], heard, "written at shutdown: {m:#}");
    assert_eq!(m["key_state"], "approved");
    let later = heartbeat(&server, &mut agent, &heard);
    server.kill9();

    let mut server = server.restart(&[]);
    let m = server.machine("pc-8").unwrap();
    let kept = m["last_seen"].as_str().unwrap().to_owned();
    assert!(
        Some(kept.as_str()) >= heard.as_str() && Some(kept.as_str()) <= later.as_str(),
        "after kill -9, last-seen is the one written at the last stop or a later one: {m:#}"
    );
    assert_eq!(m["key_state"], "approved");
    // The machine's next events still apply.
    heartbeat(&server, &mut agent, &serde_json::Value::String(kept));
    server.kill9();
}

#[test]
fn wrong_mqtt_passwords_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let enroll = server.enroll_token();
    let admin = server.admin_token();
    let topic = "boottorrent/evt/machine/pc-1/heartbeat";

    for (user, pass) in [
        ("pc-1", "wrong-password-123456"),
        ("admin", enroll.as_str()),
        ("pc-1", admin.as_str()),
        ("bad/name", enroll.as_str()),
    ] {
        let out = server.publish_as(user, pass, topic, b"x");
        assert!(!out.status.success(), "{user} got in with a wrong password");
        // rumqttd closes the connection instead of answering CONNACK "not authorised", so
        // mosquitto_pub reports a lost connection; the counter below proves it was our check.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("not authorised") || err.contains("connection was lost"),
            "{err}"
        );
    }
    assert_eq!(server.metric("boottorrent_mqtt_logins_refused_total"), 4);
    assert!(
        server
            .publish_as("pc-1", &enroll, topic, b"x")
            .status
            .success()
    );
    assert!(
        server
            .publish_as("admin", &admin, topic, b"x")
            .status
            .success()
    );
}

#[test]
fn bad_tls_files_stop_startup_and_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("server.crt");
    let key = dir.path().join("server.key.pem");
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64 !!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let missing = dir.path().join("missing.crt");
    for (cert, expect) in [(&cert, "server.crt"), (&missing, "missing.crt")] {
        let out = Command::new(env!("CARGO_BIN_EXE_boottorrent"))
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args([
                "--mqtt-listen",
                &format!("127.0.0.1:{}", common::free_port()),
            ])
            .args([
                "--http-listen",
                &format!("127.0.0.1:{}", common::free_port()),
            ])
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(&key)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "serve accepted a bad certificate");
        assert!(err.contains(expect), "error does not name {expect}: {err}");
    }
}

#[test]
fn approval_gates_new_machines_and_names_the_key_it_approves() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--auto-approve", "false"]);
    let mut agent = Agent::new("pc-9");
    let (t, startup) = agent.startup();
    server.publish(&agent, &t, &startup);
    let m = wait_for("the pending machine", || server.machine("pc-9"));
    assert_eq!(m["key_state"], "pending");
    assert_eq!(m["online"], false);
    let fingerprint = boottorrent_proto::fingerprint(&agent.key.verifying_key().to_bytes().into());
    assert_eq!(m["pending_fingerprint"], fingerprint.as_str());
    assert_eq!(server.dropped("unapproved"), 1);
    // Not approved yet: its heartbeats do nothing.
    let (t, hb) = agent.heartbeat();
    server.publish(&agent, &t, &hb);
    wait_for("the unapproved heartbeat", || {
        (server.dropped("unapproved") == 2).then_some(())
    });

    // Approving needs the admin token.
    let client = reqwest::blocking::Client::new();
    let body = serde_json::json!({ "fingerprint": fingerprint });
    let r = client
        .post(server.url("/api/v1/machines/pc-9/approve"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .post(server.url("/api/v1/machines/pc-9/approve"))
        .bearer_auth("wrong-token-wrong-token")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().unwrap().contains("\"error\""));

    let approve = |id: &str, fingerprint: &str| {
        cli(&[
            "machines",
            "approve",
            id,
            fingerprint,
            "--server",
            &server.url(""),
            "--data-dir",
            data.to_str().unwrap(),
        ])
    };
    // Another key's fingerprint approves nothing, and says which key waits.
    let wrong = approve("pc-9", "SHA256:0000:0000:0000:0000:0000:0000:0000:0000");
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains(&fingerprint), "{err}");
    assert_eq!(server.machine("pc-9").unwrap()["key_state"], "pending");

    // The CLI finds the token in the data directory; the waiting agent gets its config.
    let mut sub = server.subscribe(&config_topic(&agent).to_string());
    let out = approve("pc-9", &fingerprint);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("approved"));
    let (_, bytes) = sub.next();
    decode_command(CommandKind::MachineConfiguration, &bytes)
        .unwrap()
        .verify(&config_topic(&agent), &server_key(&server))
        .unwrap();
    assert_eq!(server.machine("pc-9").unwrap()["key_state"], "approved");
    let (t, hb) = agent.heartbeat();
    server.publish(&agent, &t, &hb);
    wait_for("the approved machine online", || {
        (server.machine("pc-9").unwrap()["online"] == true).then_some(())
    });

    // Same id, new key (reinstalled, or an impostor): its startup changes nothing and leaves
    // no key waiting to be approved by mistake. A student's login may not even publish on
    // pc-9's topics (`hostile.rs`); the operator's may publish anywhere, as any login on a
    // broker without topic rules, so the registry's own check is what is tested here.
    let mut impostor = Agent::new("pc-9");
    let unbound = |t: &str, payload: &[u8]| {
        let out = server.publish_as("admin", &server.admin_token(), t, payload);
        assert!(out.status.success(), "{out:?}");
    };
    let (t, startup) = impostor.startup();
    unbound(&t, &startup);
    wait_for("the key change", || {
        (server.dropped("key_mismatch") == 1).then_some(())
    });
    let m = server.machine("pc-9").unwrap();
    assert_eq!(m["key_state"], "approved");
    assert_eq!(m["pending_key"], serde_json::Value::Null);
    assert_eq!(
        m["public_key"],
        hex::encode(agent.key.verifying_key().to_bytes())
    );
    let (t, hb) = impostor.heartbeat();
    unbound(&t, &hb);
    wait_for("the impostor's heartbeat refused", || {
        (server.dropped("bad_signature") == 1).then_some(())
    });

    let unknown = approve("pc-404", &fingerprint);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("404"));

    // Reinstalled (same id, new key): it cannot even log in until the operator deletes the
    // machine, and then it enrols again and waits with its new key.
    let mut reinstalled = Agent::new("pc-9");
    let (t, startup) = reinstalled.startup();
    let password = reinstalled.password(&server.enroll_token());
    assert!(
        !server
            .publish_as("pc-9", &password, &t, &startup)
            .status
            .success()
    );
    let out = cli(&[
        "machines",
        "delete",
        "pc-9",
        "--server",
        &server.url(""),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(server.machine("pc-9").is_none());
    server.publish(&reinstalled, &t, &startup);
    let m = wait_for("the reinstalled machine waiting", || server.machine("pc-9"));
    assert_eq!(m["key_state"], "pending");
    assert_eq!(
        m["pending_fingerprint"],
        boottorrent_proto::fingerprint(&reinstalled.key.verifying_key().to_bytes().into()).as_str()
    );

    // A room's first start: everything waiting is approved at once, each with its own key.
    let mut room = vec![Agent::new("pc-10"), Agent::new("pc-11")];
    for agent in &mut room {
        let (t, startup) = agent.startup();
        server.publish(agent, &t, &startup);
    }
    wait_for("the room waiting", || {
        server
            .machine("pc-11")
            .filter(|m| m["key_state"] == "pending")
    });
    wait_for("the room waiting", || {
        server
            .machine("pc-10")
            .filter(|m| m["key_state"] == "pending")
    });
    let approve_all = || {
        cli(&[
            "machines",
            "approve",
            "--all-waiting",
            "--server",
            &server.url(""),
            "--data-dir",
            data.to_str().unwrap(),
        ])
    };
    let out = approve_all();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for id in ["pc-9", "pc-10", "pc-11"] {
        assert!(
            stdout.contains(&format!("machine {id}: approved")),
            "{stdout}"
        );
        assert_eq!(server.machine(id).unwrap()["key_state"], "approved", "{id}");
    }
    assert_eq!(
        server.machine("pc-9").unwrap()["public_key"],
        hex::encode(reinstalled.key.verifying_key().to_bytes())
    );
    let again = approve_all();
    assert!(String::from_utf8_lossy(&again.stdout).contains("no machine waits for approval"));
}

#[test]
fn signed_last_will_and_missed_heartbeats_mark_machines_offline() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--heartbeat-interval-secs", "1"],
    );
    let mut agent = Agent::new("pc-will");
    // The will is signed before connecting, as an agent does; JSON so it fits an argument.
    let (will_topic, will) = agent.status(Presence::Offline, Encoding::Json);
    register(&server, &mut agent);
    let holder = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &server.mqtt_port.to_string()])
        .args([
            "-i",
            "pc-will",
            "-u",
            "pc-will",
            "-P",
            &agent.password(&server.enroll_token()),
            "-t",
            "boottorrent/cmd/machine/pc-will/#",
        ])
        .args(["--will-topic", &will_topic, "--will-qos", "1"])
        .arg("--will-payload")
        .arg(std::str::from_utf8(&will).unwrap())
        .spawn()
        .unwrap();
    let mut holder = Proc::adopt(holder, "mosquitto_sub");
    let (t, hb) = agent.heartbeat();
    server.publish(&agent, &t, &hb);
    wait_for("the machine online", || {
        (server.machine("pc-will").unwrap()["online"] == true).then_some(())
    });
    // The connection dies without DISCONNECT: the broker publishes the will.
    holder.kill9();
    wait_for("the will to mark it offline", || {
        (server.machine("pc-will").unwrap()["online"] == false).then_some(())
    });

    // Back with a heartbeat, then silence: three missed 1 s intervals mark it offline.
    let (t, hb) = agent.heartbeat();
    server.publish(&agent, &t, &hb);
    wait_for("the machine online again", || {
        (server.machine("pc-will").unwrap()["online"] == true).then_some(())
    });
    wait_for("missed heartbeats to mark it offline", || {
        (server.machine("pc-will").unwrap()["online"] == false).then_some(())
    });
}

#[test]
fn api_errors_are_json_with_the_right_status() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    // Every error answer has the text for people and a stable code for programs.
    for (path, status, code) in [
        ("/api/v1/machines/no%2Fslash", 400, "invalid_request"),
        ("/api/v1/machines/unknown-pc", 404, "not_found"),
        ("/api/v1/nothing", 404, "no_such_endpoint"),
    ] {
        let r = server.get(path);
        assert_eq!(r.status(), status, "{path}");
        let body: serde_json::Value = r.json().unwrap();
        assert!(body["error"].is_string(), "{path}: {body}");
        assert_eq!(body["code"], code, "{path}: {body}");
    }
    let r = reqwest::blocking::Client::new()
        .post(server.url("/api/v1/machines/unknown-pc/approve"))
        .bearer_auth(server.admin_token())
        .json(&serde_json::json!({ "fingerprint": "SHA256:0000" }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(server.metric("boottorrent_http_unauthorized_total"), 0);
    let r = reqwest::blocking::Client::new()
        .post(server.url("/api/v1/deployments"))
        .bearer_auth(server.viewer_token())
        .json(&serde_json::json!({ "image": "x", "target": { "global": true } }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<serde_json::Value>().unwrap()["code"],
        "read_only_token"
    );
}

#[test]
fn a_burst_of_10000_events_is_all_processed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let mut agent = Agent::new("pc-burst");
    register(&server, &mut agent);
    // JSON never contains a raw newline, so `mosquitto_pub -l` sends one envelope per line.
    let mut lines = Vec::new();
    let mut topic = String::new();
    for i in 0..10_000 {
        let (t, bytes) = agent.event(
            Event::Heartbeat(Heartbeat {
                uptime_secs: i,
                images: vec![],
            }),
            Encoding::Json,
        );
        topic = t;
        lines.extend_from_slice(&bytes);
        lines.push(b'\n');
    }
    let started = std::time::Instant::now();
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &server.mqtt_port.to_string()])
        .args([
            "-i",
            "pc-burst",
            "-u",
            "pc-burst",
            "-P",
            &agent.password(&server.enroll_token()),
            "-q",
            "1",
            "-t",
            &topic,
            "-l",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&lines).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("all 10,000 heartbeats to be accepted", || {
        (server.metric("boottorrent_mqtt_events_accepted_total") == 10_001).then_some(())
    });
    println!(
        "10,000 signed heartbeats published and applied in {:?}",
        started.elapsed()
    );
    assert_eq!(server.dropped("replayed"), 0);
}

/// A campus has thousands of machines: the list comes a page at a time, in id order, with a
/// link to the next page, filtered on the server; the fleet's counts come without the list;
/// `machines list` follows the pages.
#[test]
fn the_machine_list_comes_in_pages_and_filters_and_the_fleet_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let ids: Vec<String> = (0..25).map(|i| format!("pc-{i:02}")).collect();
    for id in &ids {
        register(&server, &mut Agent::new(id));
    }
    let lab: Vec<&str> = ids[3..8].iter().map(String::as_str).collect();
    let mut args = vec!["zones", "set", "lab"];
    for m in &lab {
        args.extend(["--machine", m]);
    }
    common::output(server.cli(&args));

    // Pages of 10: 10, 10, 5, each but the last linking to the next.
    let mut seen = Vec::new();
    let mut path = "/api/v1/machines?limit=10".to_owned();
    let mut pages = 0;
    loop {
        let response = server.get(&path);
        assert_eq!(response.status(), 200, "{path}");
        let next = response
            .headers()
            .get("link")
            .map(|v| v.to_str().unwrap().to_owned());
        let page: serde_json::Value = response.json().unwrap();
        let page = page.as_array().unwrap();
        pages += 1;
        seen.extend(page.iter().map(|m| m["id"].as_str().unwrap().to_owned()));
        match next {
            Some(link) => {
                assert_eq!(page.len(), 10, "{link}");
                assert!(link.ends_with(r#">; rel="next""#), "{link}");
                path = link[1..link.find('>').unwrap()].to_owned();
                assert!(path.contains("limit=10"), "{path}");
            }
            None => {
                assert_eq!(page.len(), 5);
                break;
            }
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids, "every machine once, in id order");

    // Filtered on the server: a zone's members, a page of them, and none.
    let lab_list = server.get_json("/api/v1/machines?zone=lab");
    let got: Vec<&str> = lab_list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, lab);
    let response = server.get("/api/v1/machines?zone=lab&limit=2&after=pc-03");
    let link = response.headers()["link"].to_str().unwrap().to_owned();
    assert!(
        link.contains("after=pc-05") && link.contains("zone=lab"),
        "{link}"
    );
    let page: serde_json::Value = response.json().unwrap();
    assert_eq!(page[0]["id"], "pc-04");
    assert_eq!(page.as_array().unwrap().len(), 2);
    assert_eq!(
        server.get_json("/api/v1/machines?key_state=pending"),
        serde_json::json!([]),
        "this server approves new machines"
    );
    for bad in [
        "limit=0",
        "limit=1001",
        "online=maybe",
        "zone=a/b",
        "colour=red",
    ] {
        let response = server.get(&format!("/api/v1/machines?{bad}"));
        assert_eq!(response.status(), 400, "{bad}");
    }

    // Counted at a glance.
    let fleet = server.get_json("/api/v1/fleet");
    assert_eq!(fleet["machines"], 25, "{fleet}");
    assert_eq!(fleet["key_states"]["approved"], 25, "{fleet}");
    assert_eq!(fleet["zones"]["lab"]["machines"], 5, "{fleet}");

    // The operator's list follows the pages.
    let out = common::output(server.cli(&["machines", "list", "--page-size", "7"]));
    let text = String::from_utf8_lossy(&out.stdout);
    for id in &ids {
        assert!(text.contains(id.as_str()), "{id} missing:\n{text}");
    }
    let out = common::output(server.cli(&["machines", "list", "--json", "--zone", "lab"]));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 5);
}
