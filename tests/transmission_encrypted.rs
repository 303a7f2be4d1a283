//! Transmission dials the server's seeder itself, with message stream encryption (MSE)
//! required (`"encryption": 2`) and with its default (`1`, encryption preferred), and fetches
//! an image byte for byte over an RC4-encrypted connection each time; the seeder's log shows
//! the encrypted connection from Transmission's address, and its `/metrics` count them.
//!
//! Transmission drops every peer address in 127.0.0.0/8 a tracker hands it, so the loopback
//! test (`tests/standard_clients.rs`) has to dial Transmission instead, and then neither side
//! starts MSE. Here the server and each Transmission are separate hosts (network namespaces
//! made by `scripts/testnet`, 10.99.0.x): the tracker hands out the seeder's own address
//! 10.99.0.10 and Transmission connects to it. Nothing leaves the namespaces: they have no
//! route anywhere else, and Transmission runs without DHT, local peer discovery, peer
//! exchange, port mapping or uTP.
//!
//! Needs root (CI has it); without root the test says why it did not run and returns.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::testnet::Net;
use common::{BOOTTORRENT, Proc, make_vhdx, output, require_tool, spawn, transmission, wait_until};

/// The image: 32 MiB, enough for a few hundred encrypted messages each way.
const LEN: usize = 32 << 20;
/// Longest one download may take. Transmission starts asking a new peer for pieces only at its
/// next 10 s rechoke, so about 20 s is its normal time here.
const TRANSFER: Duration = Duration::from_secs(90);
/// Links fast enough not to be what is measured.
const RATE_MBIT: u32 = 1000;
const SERVER: usize = 0;
/// What the seeder logs for each connection that began with an MSE handshake.
const MSE_ACCEPTED: &str = "accepted an encrypted (MSE) connection";

#[test]
fn transmission_requiring_or_preferring_encryption_fetches_over_rc4_from_the_seeder() {
    require_tool("transmission-cli", "transmission-cli");
    require_tool("curl", "curl");
    let Some(net) = Net::up(3, RATE_MBIT) else {
        return;
    };
    // BOOTTORRENT_TEST_KEEP=1 keeps the directory (files, every process's log); the path is
    // printed.
    let keep = std::env::var_os("BOOTTORRENT_TEST_KEEP").is_some();
    let dir = tempfile::Builder::new()
        .prefix("boottorrent-tm-mse-")
        .disable_cleanup(keep)
        .tempdir()
        .unwrap();
    if keep {
        eprintln!("keeping {}", dir.path().display());
    }
    let dir = dir.path();
    let server = start_server(&net, dir);
    let (image, expected) = catalogue(&net, dir);
    let torrent = dir.join("image.torrent");
    output({
        let mut c = net.command(SERVER, "curl");
        c.args(["--silent", "--show-error", "--fail", "--output"])
            .arg(&torrent)
            .arg("--header")
            .arg(format!(
                "Authorization: Bearer {}",
                read_token(dir, "admin.token")
            ))
            .arg(image["torrent_url"].as_str().unwrap());
        c
    });
    let name = image["name"].as_str().unwrap();

    // One after another, each from a host of its own so that the seeder's log tells them
    // apart, and each the seeder's only peer.
    for (host, encryption, what) in [(1, 2, "required"), (2, 1, "preferred")] {
        let out = dir.join(format!("transmission-{what}"));
        let started = Instant::now();
        let file = transmission(&net, host, encryption, &torrent, &out, name);
        let took = started.elapsed();
        let got = std::fs::read(&file)
            .unwrap_or_else(|e| panic!("Transmission left no file at {}: {e}", file.display()));
        assert!(
            got == expected,
            "Transmission's copy (encryption {what}) differs from the image ({} bytes against {})",
            got.len(),
            expected.len()
        );
        let peer = format!("peer={}:", Net::ip(host));
        let log = server.log_text();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(MSE_ACCEPTED) && l.contains(&peer))
            .collect();
        assert!(
            !lines.is_empty(),
            "the seeder logged no encrypted connection from {} (encryption {what}):\n{}",
            Net::ip(host),
            server.log_tail(30)
        );
        assert!(
            lines.iter().all(|l| l.contains("rc4=true")),
            "an MSE connection from {} (encryption {what}) went on in plaintext:\n{}",
            Net::ip(host),
            lines.join("\n")
        );
        eprintln!(
            "Transmission, encryption {what}: {} MiB in {took:.1?} over {} RC4 connection(s)",
            LEN >> 20,
            lines.len()
        );
    }
    // The seeder's counters agree: RC4 connections, none in plaintext.
    let metrics = output({
        let mut c = net.command(SERVER, "curl");
        c.args(["--silent", "--show-error", "--fail"])
            .arg(format!("{}/metrics", url()));
        c
    });
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    let connections = |kind: &str| -> u64 {
        let name = format!("boottorrent_seeder_connections_total{{encryption=\"{kind}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&name)?.parse().ok())
            .unwrap_or_else(|| panic!("no {name}in /metrics:\n{metrics}"))
    };
    assert!(connections("rc4") >= 2, "{metrics}");
    assert_eq!(connections("plaintext") + connections("mse_plaintext"), 0);
}

/// The real server on host 0, its seeder at 10.99.0.10:6881, logging at info (where the MSE
/// line is); returns once the API answers.
fn start_server(net: &Net, dir: &Path) -> Proc {
    let ip = Net::ip(SERVER);
    let mut c = net.command(SERVER, BOOTTORRENT);
    c.arg("serve")
        .arg("--data-dir")
        .arg(dir.join("server"))
        .args(["--mqtt-listen", &format!("{ip}:1883")])
        .args(["--http-listen", &format!("{ip}:8080")])
        .args(["--bt-listen", &format!("{ip}:6881")])
        .args(["--public-url", &url()])
        .env("BOOTTORRENT_LOG", "info");
    let mut server = spawn(c, dir.join("server.log"));
    wait_until("the server's API", Duration::from_secs(60), || {
        if let Some(status) = server.exited() {
            panic!("the server exited with {status}:\n{}", server.log_tail(30));
        }
        cli(net, dir, &["image", "list", "--json"])
            .output()
            .ok()?
            .status
            .success()
            .then_some(())
    });
    server
}

fn url() -> String {
    format!("http://{}:8080", Net::ip(SERVER))
}

/// `boottorrent ARGS` as the operator runs it on the server's host.
fn cli(net: &Net, dir: &Path, args: &[&str]) -> std::process::Command {
    let mut c = net.command(SERVER, BOOTTORRENT);
    c.args(args)
        .args(["--server", &url()])
        .arg("--data-dir")
        .arg(dir.join("server"));
    c
}

fn read_token(dir: &Path, file: &str) -> String {
    let path = dir.join("server").join(file);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// A qemu-img VHDX of [`LEN`] bytes in the catalog: the API's view of it and its bytes.
fn catalogue(net: &Net, dir: &Path) -> (serde_json::Value, Vec<u8>) {
    let vhdx = make_vhdx(dir, LEN);
    let added = output(cli(
        net,
        dir,
        &["image", "add", "--json", vhdx.to_str().unwrap()],
    ));
    let image: serde_json::Value = serde_json::from_slice(&added.stdout).unwrap();
    assert_eq!(image["state"], "ready", "{image}");
    (image, std::fs::read(&vhdx).unwrap())
}

/// `transmission-cli` on `host`, bound to the host's address, with `encryption` (0 plaintext
/// preferred, 1 encryption preferred, 2 required) and a config directory of its own; returns
/// the file once Transmission says the torrent is done (its finish script ran).
fn transmission(
    net: &Net,
    host: usize,
    encryption: u8,
    torrent: &Path,
    out: &Path,
    name: &str,
) -> PathBuf {
    transmission::fetch(
        transmission::Fetch {
            command: net.command(host, "transmission-cli"),
            bind: &Net::ip(host),
            port: 51413,
            encryption,
            torrent,
            out,
            name,
            limit: TRANSFER,
        },
        || (),
    )
}
