//! `boottorrent-agent` against a test's [`Server`]: enrolled, run with its own data directory
//! and log, its boot backend a script that records what it was told.
//!
//! The agent binary is located at the first [`agent`] of a test process, and built then if it
//! is missing or stale (see [`crate::binary`]), which may take minutes: a test whose deadlines
//! start before its first agent calls [`crate::agent_binary`] first.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Server;
use crate::binary::agent_binary;
use crate::process::{Proc, output, spawn};

/// The agents' MQTT keepalive in these tests: how soon the broker notices one is gone.
pub const KEEPALIVE_SECS: u64 = 5;

/// `boottorrent-agent <args>`, logging at `info`.
pub fn agent(args: &[&str]) -> Command {
    let mut command = Command::new(agent_binary());
    command.args(args).env("BOOTTORRENT_AGENT_LOG", "info");
    command
}

/// Starts `boottorrent-agent run` for machine `id` with its own data dir `dir/<id>`, logging
/// to `dir/<id>.log`.
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
        .env("BOOTTORRENT_AGENT_ENROLL_TOKEN", server.enroll_token());
    command
}

/// `boottorrent-agent enroll` for machine `id`: pins the server's key in its data dir.
pub fn enroll(server: &Server, dir: &Path, id: &str) {
    output({
        let mut c = agent(&["enroll", "--http-url", &server.url("")]);
        c.arg("--data-dir").arg(dir.join(id));
        c
    });
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
