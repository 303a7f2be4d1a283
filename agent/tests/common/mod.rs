//! Shared by the agent's end-to-end tests: the real server binary on free ports, agents as
//! processes, commands signed with the server's key and published with `mosquitto_pub`.
//!
//! The server binary is not a dependency of the agent (it must not be), so cargo does not
//! build it for these tests: it is taken from the workspace's `target/debug`, which
//! `cargo test --workspace` (what `scripts/test` runs) builds first.
#![allow(dead_code)] // each test binary uses a different subset

pub use boottorrent_testkit::{PATIENCE, admin_client_id, free_port, require_tool, wait_for};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use boottorrent_proto::{
    Command as ProtoCommand, Encoding, Envelope, SenderId, SigningKey, Topic, signing_key_from_hex,
};

/// The agents' MQTT keepalive in this test.
pub const KEEPALIVE_SECS: u64 = 5;

pub fn server_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("debug").join("boottorrent");
    assert!(
        path.exists(),
        "the server binary {} is missing: run `cargo build -p boottorrent` first (scripts/test does)",
        path.display()
    );
    path
}

pub use boottorrent_proto::now_ms;

/// A child process killed when dropped, logging to a file.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                panic!("the agent did not exit after SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn spawn(mut command: Command, log: PathBuf) -> Proc {
    let file = std::fs::File::create(&log).unwrap();
    let child = command
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
    Proc {
        child: Some(child),
        log,
    }
}

pub struct Server {
    pub proc: Proc,
    pub data_dir: PathBuf,
    pub http_port: u16,
    pub mqtt_port: u16,
    pub bt_port: u16,
}

impl Server {
    pub fn start(dir: &Path) -> Server {
        Server::start_with(dir, &[])
    }

    /// Starts the server with extra `serve` flags.
    pub fn start_with(dir: &Path, extra: &[&str]) -> Server {
        require_tool("mosquitto_pub", "mosquitto-clients");
        let (http_port, mqtt_port, bt_port) = (free_port(), free_port(), free_port());
        Server::launch(dir, [http_port, mqtt_port, bt_port], extra)
    }

    /// Starts the server again on the same ports and data dir (after [`Proc::kill9`]).
    pub fn restart(&mut self, dir: &Path, extra: &[&str]) {
        let next = Server::launch(dir, [self.http_port, self.mqtt_port, self.bt_port], extra);
        *self = next;
    }

    fn launch(dir: &Path, [http_port, mqtt_port, bt_port]: [u16; 3], extra: &[&str]) -> Server {
        let data_dir = dir.join("server");
        let mut command = Command::new(server_binary());
        // Machines in these tests enrol without an operator: trust on first use, as on a site
        // that turns `auto_approve` on (a flag given to the server still wins).
        command.env("BOOTTORRENT_AUTO_APPROVE", "true");
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--mqtt-listen")
            .arg(format!("127.0.0.1:{mqtt_port}"))
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{http_port}"))
            .arg("--bt-listen")
            .arg(format!("127.0.0.1:{bt_port}"))
            .args(extra)
            .env("BOOTTORRENT_LOG", "info,boottorrent=debug");
        // Each start logs to its own file, so a restart keeps the first run's log.
        let mut n = 0;
        let log = loop {
            let log = dir.join(format!(
                "server{}.log",
                if n == 0 {
                    String::new()
                } else {
                    format!("-{n}")
                }
            ));
            if !log.exists() {
                break log;
            }
            n += 1;
        };
        let mut server = Server {
            proc: spawn(command, log),
            data_dir,
            http_port,
            mqtt_port,
            bt_port,
        };
        wait_for("the server to answer /healthz", || {
            if let Some(status) = server.proc.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("server exited with {status}:\n{}", server.proc.log_text());
            }
            reqwest::blocking::get(server.url("/healthz"))
                .ok()
                .filter(|r| r.status().is_success())
        });
        server
    }

    /// Runs a `boottorrent` client command against this server.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(server_binary());
        c.args(args)
            .args(["--server", &self.url("")])
            .arg("--data-dir")
            .arg(&self.data_dir);
        c
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    pub fn token(&self, file: &str) -> String {
        std::fs::read_to_string(self.data_dir.join(file))
            .unwrap()
            .trim()
            .to_owned()
    }

    pub fn key(&self) -> SigningKey {
        signing_key_from_hex(&std::fs::read_to_string(self.data_dir.join("server.key")).unwrap())
            .unwrap()
    }

    /// `GET path` with the admin token, as the operator's tools read the API.
    pub fn get(&self, path: &str) -> reqwest::Result<reqwest::blocking::Response> {
        reqwest::blocking::Client::new()
            .get(self.url(path))
            .bearer_auth(self.token("admin.token"))
            .send()
    }

    /// Whether each machine is online, from `GET /api/v1/machines`.
    pub fn online(&self, id: &str) -> Option<bool> {
        let machines: serde_json::Value = self.get("/api/v1/machines").ok()?.json().ok()?;
        machines
            .as_array()?
            .iter()
            .find(|m| m["id"] == id)
            .and_then(|m| m["online"].as_bool())
    }

    /// Publishes as `admin` with `mosquitto_pub` (QoS 1), payload on stdin.
    pub fn publish(&self, topic: &str, payload: &[u8]) {
        let mut child = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.mqtt_port.to_string()])
            .args(["-i", &admin_client_id()])
            .args(["-u", "admin", "-P", &self.token("admin.token")])
            .args(["-q", "1", "-t", topic, "-s"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running mosquitto_pub");
        child.stdin.take().unwrap().write_all(payload).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "mosquitto_pub failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

pub fn agent(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_boottorrent-agent"));
    command.args(args).env("BOOTTORRENT_AGENT_LOG", "info");
    command
}

pub fn output(mut command: Command) -> Output {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Starts `boottorrent-agent run` for machine `id` with its own data dir.
pub fn run_agent(dir: &Path, server: &Server, id: &str, extra: &[&str]) -> Proc {
    spawn(
        run_agent_command(dir, server, id, extra),
        dir.join(format!("{id}.log")),
    )
}

/// The command [`run_agent`] runs, for a test to add to.
pub fn run_agent_command(dir: &Path, server: &Server, id: &str, extra: &[&str]) -> Command {
    let data_dir = dir.join(id);
    let config = dir.join(format!("{id}.toml"));
    std::fs::write(&config, "").unwrap();
    let mut command = agent(&["run"]);
    command.arg("--config").arg(&config);
    // A test may point the agent at another port (the TLS listener).
    if !extra.contains(&"--mqtt-port") {
        command.args(["--mqtt-port", &server.mqtt_port.to_string()]);
    }
    command
        .args(["--server", "127.0.0.1"])
        .args(["--http-url", &server.url("")])
        .args(["--machine-id", id])
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--bt-listen", "127.0.0.1:0"])
        .args(["--heartbeat-interval-secs", "1"])
        .args(["--mqtt-keepalive-secs", &KEEPALIVE_SECS.to_string()])
        .args(extra)
        .env(
            "BOOTTORRENT_AGENT_ENROLL_TOKEN",
            server.token("enroll.token"),
        );
    command
}

pub fn signed_command(topic: &str, body: ProtoCommand, key: &SigningKey, seq: u64) -> Vec<u8> {
    let topic: Topic = topic.parse().unwrap();
    Envelope::sign(&topic, SenderId::server(), now_ms(), seq, body, key)
        .unwrap()
        .encode(Encoding::MessagePack)
        .unwrap()
}

/// A VHDX of `len` varied bytes (not zeros, which VHDX would store sparsely), made by qemu-img
/// as `dir/golden.vhdx`.
pub fn make_vhdx(dir: &Path, len: usize) -> PathBuf {
    require_tool("qemu-img", "qemu-utils");
    let raw = dir.join("golden.raw");
    let data: Vec<u8> = (0..len)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&raw, &data).unwrap();
    let vhdx = dir.join("golden.vhdx");
    output({
        let mut c = Command::new("qemu-img");
        c.args(["convert", "-f", "raw", "-O", "vhdx"])
            .arg(&raw)
            .arg(&vhdx);
        c
    });
    vhdx
}

/// Makes a VHDX of `len` bytes and adds it with `boottorrent image add`; returns the API's
/// view of the image (ready) and the file.
pub fn catalogue(server: &Server, dir: &Path, len: usize) -> (serde_json::Value, PathBuf) {
    let vhdx = make_vhdx(dir, len);
    let added = output(server.cli(&["image", "add", "--json", vhdx.to_str().unwrap()]));
    let image: serde_json::Value = serde_json::from_slice(&added.stdout).unwrap();
    assert_eq!(image["state"], "ready", "{image}");
    (image, vhdx)
}

/// `boottorrent-agent enroll` for machine `id`: pins the server's key in its data dir.
pub fn enroll(server: &Server, dir: &Path, id: &str) {
    output({
        let mut c = agent(&["enroll", "--http-url", &server.url("")]);
        c.arg("--data-dir").arg(dir.join(id));
        c
    });
}

/// `GET path` on the server's HTTP API, as JSON.
pub fn get_json(server: &Server, path: &str) -> serde_json::Value {
    server.get(path).unwrap().json().unwrap()
}

/// A boot program for the `command` backend that appends the action, image and deployment it
/// was given to the file named by `$BOOTTORRENT_MARKER`: what a test checks to know a machine
/// booted, and what it booted. Written once per directory.
pub fn marker_boot_script(dir: &Path) -> PathBuf {
    let script = dir.join("boot.sh");
    if !script.exists() {
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"$BOOTTORRENT_ACTION $BOOTTORRENT_IMAGE_ID $BOOTTORRENT_DEPLOYMENT_ID\" >> \"$BOOTTORRENT_MARKER\"\n",
        )
        .unwrap();
        let mut perms = std::fs::metadata(&script).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&script, perms).unwrap();
    }
    script
}
