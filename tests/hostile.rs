//! The lab network is hostile: students sit at the machines, and the enrollment token is in
//! every golden image, so every test here assumes the attacker holds it. Each test is an
//! attack that once worked against the real server (the `boottorrent` binary, real
//! `mosquitto_pub`/`mosquitto_sub` clients on loopback) and must keep failing.
//!
//! The HTTP side (reads without a token, slow clients, the tracker) is in `hostile_http.rs`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use boottorrent_proto::{
    CommandKind, Encoding, Envelope, Event, EventKind, SenderId, Topic, decode_command,
    generate_signing_key,
};
use common::{Agent, Proc, Server, admin_client_id, now_ms, wait_for};

/// Registers `agent` (trust on first use) and waits until the server answered it.
fn register(server: &Server, agent: &mut Agent) {
    let topic = Topic::Command {
        scope: boottorrent_proto::Scope::Machine(agent.id.clone()),
        kind: CommandKind::MachineConfiguration,
    };
    let mut sub = server.subscribe(&topic.to_string());
    let (t, payload) = agent.startup();
    server.publish(agent, &t, &payload);
    let (_, bytes) = sub.next();
    decode_command(CommandKind::MachineConfiguration, &bytes).unwrap();
}

/// Sends `count` made-up machines' startups, each correctly signed and from its own login
/// (the token admits ids the server has never seen), from four threads of `scope`; `sent`
/// counts those the broker took.
fn flood<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    server: &'scope Server,
    count: usize,
    sent: &'scope std::sync::atomic::AtomicUsize,
) {
    for sender in 0..4 {
        scope.spawn(move || {
            for i in (sender..count).step_by(4) {
                let mut fake = Agent::new(&format!("fake-{i:04}"));
                let (t, payload) = fake.startup();
                let password = fake.password(&server.enroll_token());
                if server
                    .publish_as(fake.id.as_str(), &password, &t, &payload)
                    .status
                    .success()
                {
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
}

fn accepted(server: &Server) -> u64 {
    server.metric("boottorrent_mqtt_events_accepted_total")
}

#[test]
fn a_client_cannot_take_over_the_servers_own_broker_link() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"), &[]);
    let enroll = server.enroll_token();
    let admin = server.admin_token();
    // Once, one CONNECT with this client id made rumqttd drop the orchestrator's link, and
    // the whole server exited.
    for (client_id, user, password) in [
        (
            "boottorrent-orchestrator",
            "boottorrent-orchestrator",
            &enroll,
        ),
        ("boottorrent-orchestrator", "pc-1", &enroll),
        ("boottorrent-orchestrator", "admin", &admin),
        ("admin", "pc-1", &enroll),
    ] {
        let out = server.publish_with(client_id, Some((user, password)), "x", b"x");
        assert!(
            !out.status.success(),
            "{client_id} as {user} was let in by the broker"
        );
    }
    assert_eq!(server.metric("boottorrent_mqtt_logins_refused_total"), 4);
    assert!(
        server.running(),
        "the server exited:\n{}",
        server.log_text()
    );
    // Still doing its job: a machine registers and is answered.
    let mut agent = Agent::new("pc-1");
    register(&server, &mut agent);
    let health = server.get_json("/healthz");
    assert_eq!(health["status"], "ok", "{health}");
}

#[test]
fn a_token_holder_cannot_kick_a_known_machine_off_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let enroll = server.enroll_token();
    let mut agent = Agent::new("pc-7");
    register(&server, &mut agent);

    // The machine holds its session, logged in with a proof of its key.
    let password = agent.password(&enroll);
    let mut holder = Command::new("stdbuf")
        .args(["-oL", "mosquitto_sub", "-d"])
        .args(["-h", "127.0.0.1", "-p", &server.mqtt_port.to_string()])
        .args(["-i", "pc-7", "-u", "pc-7", "-P", &password])
        .args(["-t", "boottorrent/cmd/machine/pc-7/#", "-q", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap());
    let mut holder = Proc::adopt(holder, "mosquitto_sub");
    let mut line = String::new();
    while !line.starts_with("Subscribed (") {
        line.clear();
        assert!(lines.read_line(&mut line).unwrap() > 0, "holder exited");
    }

    // A student logs in with the machine's id: with the token, with the holder's own
    // password seen on the wire (plain MQTT), and with a proof by another key.
    let intruder = Agent::new("pc-7");
    let sniffed = password.clone();
    for password in [enroll.clone(), sniffed, intruder.password(&enroll)] {
        for _ in 0..5 {
            let out = server.publish_as("pc-7", &password, "boottorrent/evt/machine/pc-7/x", b"x");
            assert!(
                !out.status.success(),
                "the broker let the student in as pc-7"
            );
        }
    }
    assert_eq!(server.metric("boottorrent_mqtt_logins_refused_total"), 15);

    // The machine was never disconnected: it still has its first session and gets this.
    server
        .publish_as(
            "admin",
            &server.admin_token(),
            "boottorrent/cmd/machine/pc-7/ping",
            b"still-here",
        )
        .status
        .success()
        .then_some(())
        .expect("admin publish");
    let mut output = String::new();
    loop {
        line.clear();
        assert!(lines.read_line(&mut line).unwrap() > 0, "holder exited");
        output.push_str(&line);
        if line.contains("still-here") {
            break;
        }
    }
    holder.kill9();
    assert!(
        !output.contains("sending CONNECT"),
        "the machine had to reconnect:\n{output}"
    );
}

#[test]
fn a_startup_signed_by_another_key_cannot_lock_out_the_real_machine() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let mut agent = Agent::new("pc-3");
    register(&server, &mut agent);
    assert_eq!(accepted(&server), 1);

    // Signed by the student's own key (so it verifies with the key it carries), with the
    // largest seq, published from the student's own login.
    let student = Agent::new("student-1");
    let forged_key = generate_signing_key().unwrap();
    let mut body = agent.startup_body();
    if let Event::Startup(s) = &mut body {
        s.public_key = boottorrent_proto::Bytes(forged_key.verifying_key().to_bytes());
        s.ips = vec!["10.66.6.6".parse().unwrap()];
    }
    let topic = agent.event_topic(EventKind::Startup);
    let forged = Envelope::sign(
        &topic,
        SenderId::from(agent.id.clone()),
        now_ms(),
        u64::MAX - 1,
        body,
        &forged_key,
    )
    .unwrap()
    .encode(Encoding::MessagePack)
    .unwrap();
    // The broker's topic rules stop it at the door: the student's login may publish only
    // the student's own events.
    server.publish(&student, &topic.to_string(), &forged);
    wait_for("the forged startup to be refused", || {
        (server.metric("boottorrent_mqtt_refused_total{what=\"publish\"}") == 1).then_some(())
    });
    // Behind the door, the signature decides: the same envelope from a login that may
    // publish anywhere (as on a broker without topic rules) changes nothing either.
    let out = server.publish_as("admin", &server.admin_token(), &topic.to_string(), &forged);
    assert!(out.status.success(), "{out:?}");
    wait_for("the forged startup to be dropped", || {
        (server.dropped("key_mismatch") == 1).then_some(())
    });

    // Nothing about the machine changed, and its own events still count.
    let m = server.machine("pc-3").unwrap();
    assert_eq!(m["pending_key"], serde_json::Value::Null);
    assert_eq!(m["ips"], serde_json::json!(["10.1.0.7"]));
    let (t, heartbeat) = agent.heartbeat();
    server.publish(&agent, &t, &heartbeat);
    wait_for("the real machine's heartbeat", || {
        (accepted(&server) == 2).then_some(())
    });
    assert_eq!(server.dropped("replayed"), 0);
}

#[test]
fn a_flood_of_made_up_machines_is_bounded_and_real_machines_are_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--enroll-per-minute",
            "60",
            "--heartbeat-interval-secs",
            "60",
        ],
    );
    let mut real = Agent::new("pc-real");
    register(&server, &mut real);

    // 400 made-up machines, each a correctly signed startup from its own login (the
    // token admits ids the server has never seen), from four senders at once. rumqttd
    // sometimes drops a connection that reuses the id of one just closed (its router
    // processes the old connection's disconnect twice); a real agent reconnects and sends
    // again, so the real machine here retries, and the count of fakes is what got through.
    const FAKES: usize = 400;
    let started = std::time::Instant::now();
    let sent = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        flood(scope, &server, FAKES, &sent);
        // Meanwhile the real machine keeps reporting.
        for _ in 0..3 {
            let (t, heartbeat) = real.heartbeat();
            let delivered = (0..3).any(|_| {
                let password = real.password(&server.enroll_token());
                server
                    .publish_as("pc-real", &password, &t, &heartbeat)
                    .status
                    .success()
            });
            assert!(delivered, "{}", server.log_text());
        }
    });
    let flood_secs = started.elapsed().as_secs();
    let sent = sent.into_inner() as u64;
    assert!(
        sent >= FAKES as u64 * 9 / 10,
        "only {sent} of {FAKES} fakes got through"
    );
    // Counters move when a batch is stored, after it was read: wait for the verdicts.
    wait_for("a verdict on every fake startup", || {
        (accepted(&server) + server.dropped("enrollment_limited") >= 1 + 3 + sent).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    let machines = server.get_json("/api/v1/machines");
    let fakes_kept = machines.as_array().unwrap().len() - 1;
    // A minute's burst, then one a second.
    let allowed = 60 + flood_secs as usize + 2;
    assert!(
        fakes_kept <= allowed,
        "{fakes_kept} made-up machines kept in {flood_secs} s; at most {allowed} allowed"
    );
    assert!(
        server.dropped("enrollment_limited") + fakes_kept as u64 >= sent,
        "every fake that got through was either kept or refused"
    );
    // The real machine's heartbeats were all applied, besides the admitted startups (a
    // retried heartbeat that had arrived after all is a replay, dropped).
    assert_eq!(accepted(&server), 1 + 3 + fakes_kept as u64);
    assert_eq!(server.machine("pc-real").unwrap()["online"], true);
    // Reported once per interval, not once per message.
    let reports = server
        .log_text()
        .matches("refused startups of new machine ids")
        .count();
    assert!(
        reports <= 1 + flood_secs as usize / 10 + 1,
        "{reports} flood reports in {flood_secs} s"
    );
}

#[test]
fn refused_logins_are_counted_and_logged_even_without_a_username() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let out = server.publish_with("anon-1", None, "boottorrent/evt/machine/x/y", b"x");
    assert!(!out.status.success(), "a CONNECT without login got in");
    wait_for("the refusal to be counted", || {
        (server.metric("boottorrent_mqtt_logins_refused_total") == 1).then_some(())
    });
    assert!(
        server
            .log_text()
            .contains("refused MQTT login: CONNECT without username"),
        "{}",
        server.log_text()
    );
}

#[test]
fn the_broker_carries_the_largest_envelope_and_logs_disconnects_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let mut agent = Agent::new(&"m".repeat(64));
    register(&server, &mut agent);
    // The longest event topic with a payload of exactly the largest size proto accepts. Junk,
    // so the server drops it, but only after the broker carried it.
    let topic = "boottorrent/evt/machine/".to_owned() + &"m".repeat(64) + "/heartbeat";
    let before = server.metric("boottorrent_mqtt_events_received_total");
    let payload = vec![b'{'; boottorrent_proto::MAX_PAYLOAD_BYTES];
    let out = server.publish_as(
        agent.id.as_str(),
        &agent.password(&server.enroll_token()),
        &topic,
        &payload,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the 64 KiB envelope to reach the server", || {
        (server.metric("boottorrent_mqtt_events_received_total") == before + 1).then_some(())
    });

    // A client that dies without DISCONNECT is an ordinary event in a lab, not an error.
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &server.mqtt_port.to_string()])
        .args(["-i", &admin_client_id(), "-u", "admin", "-P"])
        .arg(server.admin_token())
        .args(["-t", "boottorrent/#"])
        .spawn()
        .unwrap();
    let mut sub = Proc::adopt(sub, "mosquitto_sub");
    std::thread::sleep(std::time::Duration::from_millis(500));
    sub.kill9();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let log = server.log_text();
    assert!(!log.contains('\x1b'), "colour codes in a log file");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn a_machine_joins_a_subnet_zone_by_the_address_it_is_seen_at_not_the_one_it_claims() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let client = reqwest::blocking::Client::new();
    for (zone, subnet) in [("room-101", "10.1.0.0/24"), ("loopback", "127.0.0.0/8")] {
        let r = client
            .put(server.url(&format!("/api/v1/zones/{zone}")))
            .bearer_auth(server.admin_token())
            .json(&serde_json::json!({ "subnets": [subnet] }))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().unwrap());
    }
    // A made-up machine's startup claims 10.1.0.7, an address in room 101.
    let mut agent = Agent::new("pc-claims");
    register(&server, &mut agent);
    let m = server.machine("pc-claims").unwrap();
    assert_eq!(m["ips"], serde_json::json!(["10.1.0.7"]));
    assert_eq!(
        m["zones"],
        serde_json::json!([]),
        "joined a zone by a claimed address"
    );

    // Its own signed request (the passkey request every agent makes) comes from 127.0.0.1:
    // that is the address that counts.
    let body = boottorrent_proto::passkey_request(&agent.id, &agent.key, now_ms());
    let r = client
        .post(server.url("/api/v1/machines/pc-claims/passkey"))
        .body(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_for("the machine placed by its observed address", || {
        let m = server.machine("pc-claims").unwrap();
        (m["zones"] == serde_json::json!(["loopback"])).then_some(())
    });
    assert_eq!(
        server.machine("pc-claims").unwrap()["observed_ips"],
        serde_json::json!(["127.0.0.1"])
    );
    // The request is worthless without the machine's key.
    let forged =
        boottorrent_proto::passkey_request(&agent.id, &generate_signing_key().unwrap(), now_ms());
    let r = client
        .post(server.url("/api/v1/machines/pc-claims/passkey"))
        .body(forged)
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[test]
fn a_token_holder_cannot_read_the_fleet_or_publish_where_only_the_server_may() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let mut real = Agent::new("pc-real");
    register(&server, &mut real);
    let student = Agent::new("student-laptop");
    let password = || student.password(&server.enroll_token());

    // Once, `#` with the enrollment token showed every event and command of the fleet. The
    // real machine keeps reporting while the student listens.
    let first_password = password();
    std::thread::scope(|scope| {
        let sniffed = scope.spawn(|| {
            server.sniff_as(
                "student-laptop",
                &first_password,
                &["#", "boottorrent/evt/#", "boottorrent/cmd/machine/+/#"],
                4,
            )
        });
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let (t, heartbeat) = real.heartbeat();
        server.publish(&real, &t, &heartbeat);
        let sniffed = sniffed.join().unwrap();
        assert!(
            !sniffed.contains("boottorrent/evt/machine/pc-real"),
            "the student read the real machine's events:\n{sniffed}"
        );
        assert!(
            sniffed.contains("Subscribed (mid: 1): 128, 128, 128"),
            "the subscription was not refused:\n{sniffed}"
        );
    });
    assert_eq!(
        server.metric("boottorrent_mqtt_refused_total{what=\"subscribe\"}"),
        1
    );
    assert!(
        server.log_text().contains(
            "refused MQTT subscribe: a machine may read only global, zone and its own commands"
        ),
        "{}",
        server.log_text()
    );
    // What an agent subscribes to is still allowed.
    let own = server.sniff_as(
        student.id.as_str(),
        &password(),
        &[
            "boottorrent/cmd/global/#",
            "boottorrent/cmd/machine/student-laptop/#",
        ],
        1,
    );
    assert!(own.contains("Subscribed (mid: 1): 1, 1"), "{own}");

    // Commands come from the server only: a publish on the real machine's command topic
    // (it could have been an empty retained one, erasing what machines find on connect) is
    // acknowledged, dropped, counted, and reaches nobody.
    let mut commands = server.subscribe("boottorrent/cmd/machine/pc-real/#");
    let forged = "boottorrent/cmd/machine/pc-real/machine_configuration";
    let out = server.publish_as(student.id.as_str(), &password(), forged, b"forged");
    assert!(out.status.success(), "{out:?}");
    // So are events in another machine's name.
    let (t, heartbeat) = real.heartbeat();
    let out = server.publish_as(student.id.as_str(), &password(), &t, &heartbeat);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        server.metric("boottorrent_mqtt_refused_total{what=\"publish\"}"),
        2
    );
    // The operator's is the first message the subscriber sees.
    let admin = server.admin_token();
    let configuration = boottorrent_proto::Topic::Command {
        scope: boottorrent_proto::Scope::Machine(real.id.clone()),
        kind: CommandKind::MachineConfiguration,
    };
    let out = server.publish_as("admin", &admin, &configuration.to_string(), b"from-admin");
    assert!(
        out.status.success(),
        "the operator may publish anywhere: {out:?}"
    );
    let (topic, payload) = commands.next();
    assert_eq!(topic, configuration.to_string());
    assert_eq!(payload, b"from-admin", "the forged command got through");

    // A last will is a publish too: one outside the machine's own events is refused at
    // CONNECT.
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &server.mqtt_port.to_string()])
        .args([
            "-i",
            "student-laptop",
            "-u",
            "student-laptop",
            "-P",
            &password(),
        ])
        .args([
            "--will-topic",
            "boottorrent/cmd/global/reboot",
            "--will-retain",
        ])
        .args([
            "-t",
            "boottorrent/evt/machine/student-laptop/heartbeat",
            "-m",
            "x",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a will on a command topic was accepted"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not authorised"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        server.metric("boottorrent_mqtt_refused_total{what=\"will\"}"),
        1
    );
}

#[test]
fn with_approval_required_a_flood_of_made_up_machines_never_enters_a_deployment() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--auto-approve",
            "false",
            "--enroll-per-minute",
            "60",
            "--heartbeat-interval-secs",
            "60",
        ],
    );
    let admin = server.admin_token();
    let client = reqwest::blocking::Client::new();
    let mut real = Agent::new("pc-real");
    let (t, startup) = real.startup();
    server.publish(&real, &t, &startup);
    wait_for("pc-real waiting for approval", || {
        server
            .machine("pc-real")
            .filter(|m| m["key_state"] == "pending")
    });
    let fingerprint = boottorrent_proto::fingerprint(&boottorrent_proto::PublicKeyBytes::from(
        real.key.verifying_key().to_bytes(),
    ));
    let approved = client
        .post(server.url("/api/v1/machines/pc-real/approve"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({ "fingerprint": fingerprint }))
        .send()
        .unwrap();
    assert_eq!(approved.status(), 200, "{}", approved.text().unwrap());

    // A deployment to every machine: it takes in machines as they appear.
    let file = dir.path().join("golden.img");
    std::fs::write(&file, vec![7u8; 1 << 20]).unwrap();
    let out = common::image_add(&server, &file, &["--raw"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let created = client
        .post(server.url("/api/v1/deployments"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({ "image": image["id"], "target": { "global": true } }))
        .send()
        .unwrap();
    assert_eq!(created.status(), 201);
    let deployment: serde_json::Value = created.json().unwrap();
    let members = || {
        let d = server.get_json(&format!(
            "/api/v1/deployments/{}",
            deployment["id"].as_str().unwrap()
        ));
        d["machines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(members(), ["pc-real"]);

    let sent = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| flood(scope, &server, 200, &sent));
    let sent = sent.into_inner() as u64;
    wait_for("a verdict on every fake startup", || {
        (server.dropped("unapproved") + server.dropped("enrollment_limited") > sent).then_some(())
    });
    // The real machine still reports, and is the deployment's only member.
    let (t, heartbeat) = real.heartbeat();
    let before = accepted(&server);
    server.publish(&real, &t, &heartbeat);
    wait_for("the real machine's heartbeat", || {
        (accepted(&server) > before).then_some(())
    });
    assert_eq!(
        members(),
        ["pc-real"],
        "a made-up machine entered the deployment"
    );
    let machines = server.get_json("/api/v1/machines");
    let waiting = machines
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["id"] != "pc-real")
        .inspect(|m| assert_eq!(m["key_state"], "pending", "{m}"))
        .count();
    assert!(
        waiting > 0,
        "no fake got as far as waiting: the test proved nothing"
    );
    assert!(waiting <= 60 + 30, "{waiting} made-up machines waiting");
}
