//! Helpers for end-to-end tests: the real `boottorrent` binary on free ports, real
//! `mosquitto_pub`/`mosquitto_sub` processes, and agents whose envelopes the test signs.
#![allow(dead_code)] // each test binary uses a different subset

pub use boottorrent_testkit::{PATIENCE, admin_client_id, free_port, require_tool, wait_for};

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};

use boottorrent_proto::{
    Encoding, Envelope, Event, EventKind, Heartbeat, MachineId, Presence, SenderId, SeqCounter,
    SigningKey, Startup, Status, Topic, generate_signing_key,
};

/// A `boottorrent serve` process.
pub struct Server {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub http_port: u16,
    pub mqtt_port: u16,
    pub bt_port: u16,
    pub log: PathBuf,
}

impl Server {
    /// Starts the server on fresh ports with `data_dir`, waits until HTTP answers.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Server::start_on(data_dir, free_port(), free_port(), free_port(), extra)
    }

    /// Starts again on the same ports and data directory (after `kill9`), as a restarted
    /// appliance would: torrents made before carry this server's URL.
    pub fn restart(&self, extra: &[&str]) -> Server {
        Server::start_on(
            &self.data_dir,
            self.http_port,
            self.mqtt_port,
            self.bt_port,
            extra,
        )
    }

    fn start_on(
        data_dir: &Path,
        http_port: u16,
        mqtt_port: u16,
        bt_port: u16,
        extra: &[&str],
    ) -> Server {
        require_tool("mosquitto_pub", "mosquitto-clients");
        require_tool("mosquitto_sub", "mosquitto-clients");
        let log = data_dir.with_extension(format!("{http_port}.{}.log", now_ms()));
        let child = Command::new(env!("CARGO_BIN_EXE_boottorrent"))
            // Machines in these tests enrol without an operator: trust on first use, as on a
            // site that turns `auto_approve` on (a flag given to the server still wins).
            .env("BOOTTORRENT_AUTO_APPROVE", "true")
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--mqtt-listen")
            .arg(format!("127.0.0.1:{mqtt_port}"))
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{http_port}"))
            .arg("--bt-listen")
            .arg(format!("127.0.0.1:{bt_port}"))
            .args(extra)
            .env("BOOTTORRENT_LOG", "info,boottorrent=debug")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("starting boottorrent");
        let mut server = Server {
            child: Some(child),
            data_dir: data_dir.to_owned(),
            http_port,
            mqtt_port,
            bt_port,
            log,
        };
        wait_for("the server to answer /healthz", || {
            if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("server exited with {status}:\n{}", server.log_text());
            }
            reqwest::blocking::get(server.url("/healthz"))
                .ok()
                .filter(|r| r.status().is_success())
        });
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET path` with the admin token, as the operator's tools read the API.
    pub fn get(&self, path: &str) -> reqwest::blocking::Response {
        reqwest::blocking::Client::new()
            .get(self.url(path))
            .bearer_auth(self.admin_token())
            .send()
            .unwrap()
    }

    pub fn get_json(&self, path: &str) -> serde_json::Value {
        self.get(path).json().unwrap()
    }

    pub fn machine(&self, id: &str) -> Option<serde_json::Value> {
        let response = self.get(&format!("/api/v1/machines/{id}"));
        if response.status() == 404 {
            return None;
        }
        assert!(response.status().is_success(), "{}", response.status());
        Some(response.json().unwrap())
    }

    pub fn token(&self, file: &str) -> String {
        std::fs::read_to_string(self.data_dir.join(file))
            .unwrap()
            .trim()
            .to_owned()
    }

    pub fn admin_token(&self) -> String {
        self.token("admin.token")
    }

    pub fn viewer_token(&self) -> String {
        self.token("viewer.token")
    }

    /// The server process's id, to read its resource use from `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server is running").id()
    }

    pub fn enroll_token(&self) -> String {
        self.token("enroll.token")
    }

    /// A counter from `/metrics`, by its full name with labels.
    pub fn metric(&self, name: &str) -> u64 {
        let text = reqwest::blocking::get(self.url("/metrics"))
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }

    pub fn dropped(&self, reason: &str) -> u64 {
        self.metric(&format!(
            "boottorrent_mqtt_events_dropped_total{{reason=\"{reason}\"}}"
        ))
    }

    /// Sends one message with `mosquitto_pub` as `user` (QoS 1), payload on stdin. The client
    /// id is the username, as the server requires (`admin-*` for the operator).
    pub fn publish_as(&self, user: &str, password: &str, topic: &str, payload: &[u8]) -> Output {
        let client_id = if user == "admin" {
            admin_client_id()
        } else {
            user.to_owned()
        };
        self.publish_with(&client_id, Some((user, password)), topic, payload)
    }

    /// Sends one message with `mosquitto_pub` (QoS 1) with any client id and login, or none.
    pub fn publish_with(
        &self,
        client_id: &str,
        login: Option<(&str, &str)>,
        topic: &str,
        payload: &[u8],
    ) -> Output {
        let mut command = Command::new("mosquitto_pub");
        command
            .args(["-h", "127.0.0.1", "-p", &self.mqtt_port.to_string()])
            .args(["-i", client_id]);
        if let Some((user, password)) = login {
            command.args(["-u", user, "-P", password]);
        }
        let mut child = command
            .args(["-q", "1", "-t", topic, "-s"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running mosquitto_pub");
        child.stdin.take().unwrap().write_all(payload).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Whether the server process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Sends as `agent`, logged in as an agent does (a fresh proof of its key and the
    /// enrollment token), and asserts the broker took it.
    pub fn publish(&self, agent: &Agent, topic: &str, payload: &[u8]) {
        let password = agent.password(&self.enroll_token());
        let out = self.publish_as(agent.id.as_str(), &password, topic, payload);
        if !out.status.success() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "mosquitto_pub as {} failed: {}\nserver log, newest first:\n{}",
                agent.id,
                String::from_utf8_lossy(&out.stderr),
                tail.join("\n")
            );
        }
    }

    /// Runs `mosquitto_sub -d` as the machine `user` on `filters` for `secs` seconds (or until
    /// it gives up) and returns everything it printed: "Subscribed (mid: 1): 128" is a
    /// refusal, received messages are lines "<topic> <hex payload>".
    pub fn sniff_as(&self, user: &str, password: &str, filters: &[&str], secs: u32) -> String {
        let mut command = Command::new("mosquitto_sub");
        command
            .args(["-h", "127.0.0.1", "-p", &self.mqtt_port.to_string()])
            .args(["-i", user, "-u", user, "-P", password])
            .args(["-q", "1", "-d", "-F", "%t %x", "-W", &secs.to_string()]);
        for filter in filters {
            command.args(["-t", filter]);
        }
        let out = command.output().expect("running mosquitto_sub");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Subscribes as `admin` and returns once the broker confirmed the subscription.
    pub fn subscribe(&self, topic: &str) -> Subscription {
        // mosquitto_sub block-buffers its debug lines on a pipe; line-buffer them so that the
        // SUBACK line arrives when it happens, not when the process exits. stdbuf execs, so
        // the child's pid stays mosquitto_sub's.
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(["-h", "127.0.0.1", "-p", &self.mqtt_port.to_string()])
            .args(["-i", &admin_client_id()])
            .args(["-u", "admin", "-P", &self.admin_token()])
            .args(["-t", topic, "-q", "1", "-d", "-F", "%t %x"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running mosquitto_sub");
        let mut lines = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            let n = lines.read_line(&mut line).unwrap();
            assert!(n > 0, "mosquitto_sub exited before subscribing");
            // With -d, "Subscribed (mid: 1): 1" follows the SUBACK line.
            if line.starts_with("Subscribed (") {
                break;
            }
        }
        Subscription { child, lines }
    }

    /// `kill -9`: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A running `mosquitto_sub`.
pub struct Subscription {
    child: Child,
    lines: BufReader<ChildStdout>,
}

impl Subscription {
    /// The next message as (topic, payload), skipping mosquitto_sub's debug lines.
    pub fn next(&mut self) -> (String, Vec<u8>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut line = String::new();
        // Read on this thread but bound the wait: the child is killed on timeout, which ends
        // the read with EOF.
        let pid = self.child.id();
        let watchdog = std::thread::spawn(move || {
            if rx.recv_timeout(PATIENCE).is_err() {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        });
        let result = loop {
            line.clear();
            let n = self.lines.read_line(&mut line).unwrap();
            if n == 0 {
                break None;
            }
            if line.starts_with("Client ") || line.trim().is_empty() {
                continue;
            }
            let (topic, hex_payload) = line
                .trim_end()
                .split_once(' ')
                .unwrap_or((line.trim_end(), ""));
            break Some((
                topic.to_owned(),
                hex::decode(hex_payload).expect("hex payload"),
            ));
        };
        let _ = tx.send(());
        watchdog.join().unwrap();
        result.expect("no message arrived within the patience limit")
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub use boottorrent_proto::now_ms;

/// An agent simulated by the test: its own key, seq counter and envelopes.
pub struct Agent {
    pub id: MachineId,
    pub key: SigningKey,
    seq: SeqCounter,
    last_login: std::cell::Cell<i64>,
}

impl Agent {
    pub fn new(id: &str) -> Agent {
        Agent {
            id: id.parse().unwrap(),
            key: generate_signing_key().unwrap(),
            seq: SeqCounter::from_clock(now_ms() as u64 * 1000),
            last_login: std::cell::Cell::new(0),
        }
    }

    /// The MQTT password this agent logs in with now. The server refuses a proof not newer
    /// than the last one, and two logins may fall in one millisecond.
    pub fn password(&self, enroll_token: &str) -> String {
        let ts = now_ms().max(self.last_login.get() + 1);
        self.last_login.set(ts);
        boottorrent_proto::login_password(&self.id, &self.key, enroll_token, ts)
    }

    pub fn event_topic(&self, kind: EventKind) -> Topic {
        Topic::Event {
            machine: self.id.clone(),
            kind,
        }
    }

    /// An envelope signed by this agent, for any topic (so tests can also mis-address them).
    pub fn sign_for(
        &mut self,
        topic: &Topic,
        body: Event,
        key: &SigningKey,
        ts: i64,
        encoding: Encoding,
    ) -> Vec<u8> {
        let seq = self.seq.next(now_ms() as u64 * 1000);
        Envelope::sign(topic, SenderId::from(self.id.clone()), ts, seq, body, key)
            .unwrap()
            .encode(encoding)
            .unwrap()
    }

    pub fn event(&mut self, body: Event, encoding: Encoding) -> (String, Vec<u8>) {
        let topic = self.event_topic(body.kind());
        let key = self.key.clone();
        let bytes = self.sign_for(&topic, body, &key, now_ms(), encoding);
        (topic.to_string(), bytes)
    }

    pub fn startup_body(&self) -> Event {
        Event::Startup(Startup {
            agent_version: "0.1.0-test".into(),
            hostname: format!("{}.lab", self.id),
            os: "linux".into(),
            ips: vec!["10.1.0.7".parse().unwrap()],
            macs: vec!["52:54:00:12:34:56".into()],
            free_disk_bytes: 512 << 30,
            images: vec![],
            public_key: boottorrent_proto::Bytes(self.key.verifying_key().to_bytes()),
        })
    }

    pub fn startup(&mut self) -> (String, Vec<u8>) {
        let body = self.startup_body();
        self.event(body, Encoding::MessagePack)
    }

    pub fn heartbeat(&mut self) -> (String, Vec<u8>) {
        self.event(
            Event::Heartbeat(Heartbeat {
                uptime_secs: 60,
                images: vec![],
            }),
            Encoding::MessagePack,
        )
    }

    pub fn status(&mut self, presence: Presence, encoding: Encoding) -> (String, Vec<u8>) {
        self.event(Event::Status(Status { presence }), encoding)
    }
}

/// `boottorrent image add FILE --json` against `server`, with its data directory (and so its
/// admin token).
pub fn image_add(server: &Server, file: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "image".to_owned(),
        "add".to_owned(),
        file.to_str().unwrap().to_owned(),
        "--server".to_owned(),
        server.url(""),
        "--data-dir".to_owned(),
        server.data_dir.to_str().unwrap().to_owned(),
        "--json".to_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Runs the `boottorrent` binary as a client command.
pub fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_boottorrent"))
        .args(args)
        .output()
        .expect("running boottorrent")
}
