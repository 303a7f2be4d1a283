//! `transmission-cli` fetching one torrent, the way the standard-client tests run it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use boottorrent_testkit::{spawn, wait_until};

/// One fetch by `transmission-cli`.
pub struct Fetch<'a> {
    /// How to start `transmission-cli`: on the host, or inside a test network's host.
    pub command: Command,
    /// The address it binds to and announces.
    pub bind: &'a str,
    pub port: u16,
    /// 0 plaintext preferred, 1 encryption preferred (Transmission's default), 2 required.
    pub encryption: u8,
    pub torrent: &'a Path,
    /// A directory of its own: config, downloads, log.
    pub out: &'a Path,
    /// The file name the torrent names.
    pub name: &'a str,
    pub limit: Duration,
}

/// Runs the fetch with a config directory of its own (DHT, local peer discovery, peer
/// exchange, port mapping, uTP and RPC off, no speed limits) and returns the file once
/// Transmission says the torrent is done: its finish script ran. `while_running` is called
/// once it started; what it returns (a relay, say) lives until the download is done.
pub fn fetch<G>(f: Fetch<'_>, while_running: impl FnOnce() -> G) -> PathBuf {
    let config = f.out.join("config");
    let downloads = f.out.join("downloads");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::create_dir_all(&downloads).unwrap();
    let settings = serde_json::json!({
        "encryption": f.encryption,
        "bind-address-ipv4": f.bind,
        "bind-address-ipv6": "::1",
        "dht-enabled": false,
        "lpd-enabled": false,
        "pex-enabled": false,
        "port-forwarding-enabled": false,
        "utp-enabled": false,
        "rpc-enabled": false,
        "blocklist-enabled": false,
        "peer-port": f.port,
        "peer-port-random-on-start": false,
        "download-dir": downloads,
        "incomplete-dir-enabled": false,
        "ratio-limit-enabled": false,
        "speed-limit-down-enabled": false,
        "speed-limit-up-enabled": false,
    });
    std::fs::write(
        config.join("settings.json"),
        serde_json::to_vec_pretty(&settings).unwrap(),
    )
    .unwrap();
    // transmission-cli never exits on its own: its finish script is how we learn it is done.
    let done = f.out.join("done");
    let script = f.out.join("finished.sh");
    std::fs::write(&script, format!("#!/bin/sh\ntouch '{}'\n", done.display())).unwrap();
    let mut perms = std::fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&script, perms).unwrap();
    let mut command = f.command;
    command
        .arg("--config-dir")
        .arg(&config)
        .arg("--download-dir")
        .arg(&downloads)
        .arg("--port")
        .arg(f.port.to_string())
        .arg("--no-portmap")
        .arg("--finish")
        .arg(&script)
        .arg(f.torrent);
    let mut proc = spawn(command, f.out.join("transmission.log"));
    let _guard = while_running();
    wait_until("transmission-cli to finish the download", f.limit, || {
        if let Some(status) = proc.exited() {
            panic!(
                "transmission-cli exited with {status}:\n{}",
                proc.log_tail(30)
            );
        }
        done.exists().then_some(())
    });
    // It would seed for ever; the file is complete and verified.
    proc.kill9();
    downloads.join(f.name)
}
