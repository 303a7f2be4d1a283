//! What the whole-system tests add to `boottorrent_testkit`: the server binary cargo built for
//! them, and what only `proto` can make (agents simulated by the test, whose envelopes it signs,
//! and commands signed with the server's key).
#![allow(dead_code)] // each test binary uses a different subset

pub use boottorrent_testkit::*;

pub mod testnet;
pub mod transmission;

use std::path::Path;
use std::process::{Command, Output};

use boottorrent_proto::{
    Command as ProtoCommand, Encoding, Envelope, Event, EventKind, Heartbeat, MachineId, Presence,
    SenderId, SeqCounter, SigningKey, Startup, Status, Topic, generate_signing_key,
    signing_key_from_hex,
};

pub use boottorrent_proto::now_ms;

/// The `boottorrent` binary of this package, built by cargo for these tests.
pub const BOOTTORRENT: &str = env!("CARGO_BIN_EXE_boottorrent");

/// A [`boottorrent_testkit::Server`] running this package's `boottorrent`, with what a test
/// needs `proto` for.
pub struct Server(boottorrent_testkit::Server);

impl Server {
    /// Starts the server on fresh ports with `data_dir`, waits until HTTP answers.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Server(boottorrent_testkit::Server::start(
            BOOTTORRENT,
            data_dir,
            extra,
        ))
    }

    /// Starts the server with the open-file limits `soft` and `hard` (`ulimit` in a wrapper
    /// script next to `data_dir`), as a host that gives the service few files.
    pub fn start_with_open_files(data_dir: &Path, soft: u64, hard: u64, extra: &[&str]) -> Server {
        let wrapper = data_dir.with_extension("ulimit.sh");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nulimit -S -n {soft} && ulimit -H -n {hard} || exit 97\n\
                 exec {BOOTTORRENT} \"$@\"\n"
            ),
        )
        .unwrap();
        let mut perms = std::fs::metadata(&wrapper).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&wrapper, perms).unwrap();
        Server(boottorrent_testkit::Server::start(
            &wrapper, data_dir, extra,
        ))
    }

    /// Starts again on the same ports and data directory (after `kill9`), as a restarted
    /// appliance would: torrents made before carry this server's URL.
    pub fn restart(&self, extra: &[&str]) -> Server {
        Server(self.0.restart(extra))
    }

    /// The server's signing key, read from its data directory.
    pub fn key(&self) -> SigningKey {
        signing_key_from_hex(&self.token("server.key")).unwrap()
    }

    /// The server's public key in hex, as an agent pins it (`--server-key`).
    pub fn key_hex(&self) -> String {
        hex::encode(self.key().verifying_key().to_bytes())
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
}

impl std::ops::Deref for Server {
    type Target = boottorrent_testkit::Server;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// A command for `topic` signed with `key` as the server signs them.
pub fn signed_command(topic: &str, body: ProtoCommand, key: &SigningKey, seq: u64) -> Vec<u8> {
    let topic: Topic = topic.parse().unwrap();
    Envelope::sign(&topic, SenderId::server(), now_ms(), seq, body, key)
        .unwrap()
        .encode(Encoding::MessagePack)
        .unwrap()
}

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
            running: None,
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
    let mut args = vec!["image", "add", file.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    server
        .cli(&args)
        .output()
        .expect("running boottorrent image add")
}

/// Runs the `boottorrent` binary as a client command.
pub fn cli(args: &[&str]) -> Output {
    Command::new(BOOTTORRENT)
        .args(args)
        .output()
        .expect("running boottorrent")
}
