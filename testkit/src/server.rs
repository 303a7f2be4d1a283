//! `boottorrent serve` as a test's server: on ports no other process takes, with its own data
//! directory, waited for until `/healthz` answers, and read through its HTTP API with the
//! tokens it wrote there.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{Proc, spawn};
use crate::{free_port, require_tool, wait_for};

/// A running `boottorrent serve`, killed when dropped.
pub struct Server {
    pub proc: Proc,
    /// The `boottorrent` binary it runs, also the operator's CLI for [`Server::cli`].
    pub binary: PathBuf,
    pub data_dir: PathBuf,
    pub http_port: u16,
    pub mqtt_port: u16,
    pub bt_port: u16,
}

impl Server {
    /// Starts `binary serve` on fresh loopback ports with `data_dir` and the `serve` flags
    /// `extra`, and waits until its HTTP API answers. It logs next to the data directory
    /// (`<data_dir>.log`, a restart to `<data_dir>-1.log`, ...).
    pub fn start(binary: impl Into<PathBuf>, data_dir: &Path, extra: &[&str]) -> Server {
        let ports = [free_port(), free_port(), free_port()];
        Server::launch(binary.into(), data_dir, ports, extra)
    }

    /// Starts the server again on the same ports and data directory, as a restarted
    /// appliance would (torrents made before carry its URL). Stop this one first
    /// ([`Server::kill9`] or [`Server::terminate`]).
    pub fn restart(&self, extra: &[&str]) -> Server {
        let ports = [self.http_port, self.mqtt_port, self.bt_port];
        Server::launch(self.binary.clone(), &self.data_dir, ports, extra)
    }

    fn launch(
        binary: PathBuf,
        data_dir: &Path,
        [http_port, mqtt_port, bt_port]: [u16; 3],
        extra: &[&str],
    ) -> Server {
        require_tool("mosquitto_pub", "mosquitto-clients");
        require_tool("mosquitto_sub", "mosquitto-clients");
        let mut command = Command::new(&binary);
        command
            // Machines in these tests enrol without an operator: trust on first use, as on a
            // site that turns `auto_approve` on (a flag given to the server still wins).
            .env("BOOTTORRENT_AUTO_APPROVE", "true")
            .env("BOOTTORRENT_LOG", "info,boottorrent=debug")
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--mqtt-listen")
            .arg(format!("127.0.0.1:{mqtt_port}"))
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{http_port}"))
            .arg("--bt-listen")
            .arg(format!("127.0.0.1:{bt_port}"))
            .args(extra);
        let mut server = Server {
            proc: spawn(command, next_log(data_dir)),
            binary,
            data_dir: data_dir.to_owned(),
            http_port,
            mqtt_port,
            bt_port,
        };
        wait_for("the server to answer /healthz", || {
            if let Some(status) = server.proc.exited() {
                panic!("server exited with {status}:\n{}", server.log_text());
            }
            reqwest::blocking::get(server.url("/healthz"))
                .ok()
                .filter(|r| r.status().is_success())
        });
        server
    }

    /// `http://127.0.0.1:<port><path>`: the HTTP API and the tracker.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// What this run of the server has logged.
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// The server process's id, to read its resource use from `/proc`.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Whether the server process is still running.
    pub fn running(&mut self) -> bool {
        self.proc.running()
    }

    /// `kill -9`: no chance to flush anything.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// SIGTERM, as a service manager stops the appliance, and its exit status; fails the test
    /// if it has not exited after [`crate::PATIENCE`].
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.proc.terminate()
    }

    /// A token the server wrote into its data directory (`admin.token`, `viewer.token`,
    /// `enroll.token`).
    pub fn token(&self, file: &str) -> String {
        std::fs::read_to_string(self.data_dir.join(file))
            .unwrap_or_else(|e| panic!("reading the server's {file}: {e}"))
            .trim()
            .to_owned()
    }

    pub fn admin_token(&self) -> String {
        self.token("admin.token")
    }

    pub fn viewer_token(&self) -> String {
        self.token("viewer.token")
    }

    pub fn enroll_token(&self) -> String {
        self.token("enroll.token")
    }

    /// `GET path` with the admin token, as the operator's tools read the API.
    pub fn get(&self, path: &str) -> reqwest::blocking::Response {
        reqwest::blocking::Client::new()
            .get(self.url(path))
            .bearer_auth(self.admin_token())
            .send()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// `GET path` with the admin token, as JSON.
    pub fn get_json(&self, path: &str) -> serde_json::Value {
        self.get(path)
            .json()
            .unwrap_or_else(|e| panic!("GET {path} is not JSON: {e}"))
    }

    /// The API's view of machine `id`, `None` if the server does not know it.
    pub fn machine(&self, id: &str) -> Option<serde_json::Value> {
        let response = self.get(&format!("/api/v1/machines/{id}"));
        if response.status() == 404 {
            return None;
        }
        assert!(response.status().is_success(), "{}", response.status());
        Some(response.json().unwrap())
    }

    /// Whether machine `id` is online, from the machine list; `None` if it is not listed.
    pub fn online(&self, id: &str) -> Option<bool> {
        self.get_json("/api/v1/machines")
            .as_array()?
            .iter()
            .find(|m| m["id"] == id)
            .and_then(|m| m["online"].as_bool())
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

    /// MQTT events the server dropped for `reason`.
    pub fn dropped(&self, reason: &str) -> u64 {
        self.metric(&format!(
            "boottorrent_mqtt_events_dropped_total{{reason=\"{reason}\"}}"
        ))
    }

    /// The operator's command `boottorrent <args>` against this server, with its data
    /// directory (and so its admin token).
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .args(args)
            .args(["--server", &self.url("")])
            .arg("--data-dir")
            .arg(&self.data_dir);
        command
    }
}

/// A log file next to `data_dir` that no earlier run of a server there wrote, so a restart
/// keeps the first run's log.
fn next_log(data_dir: &Path) -> PathBuf {
    let name = data_dir
        .file_name()
        .expect("the data directory has a name")
        .to_string_lossy();
    (0..)
        .map(|n| match n {
            0 => data_dir.with_file_name(format!("{name}.log")),
            n => data_dir.with_file_name(format!("{name}-{n}.log")),
        })
        .find(|log| !log.exists())
        .expect("a free log name")
}
