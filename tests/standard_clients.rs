//! Every standard client the tests use fetches an image alone from the server's super-seeder
//! (the real `boottorrent serve`, its tracker and seeder): Transmission (`transmission-cli`),
//! aria2c and libtorrent, one after another in one run, each ending with a byte-for-byte copy.
//!
//! Transmission sends its HAVEs in batches about once a second; a super-seeder that offered
//! new pieces only when it heard of the last ones held it to a few pieces a second (a 200 MiB
//! image took two minutes). The image here is large enough that such a cap would need far
//! longer than the (generous) time allowed. How fast each client is, against aria2c, is
//! measured by `scripts/bench-clients`, not asserted here.
//!
//! A second run has the seeder require encryption: a plaintext client is refused, aria2c and
//! libtorrent forcing encryption are served over RC4.
//!
//! Loopback only: each client is bound to 127.0.0.1, with DHT, local peer discovery, peer
//! exchange, port mapping (UPnP, NAT-PMP) and uTP off. Transmission drops every peer address
//! in 127.0.0.0/8 a tracker hands it (its "martian" filter), so it would never dial the
//! seeder there; it does accept connections from there. The test dials it instead
//! ([`Reverse`]): it connects to both, passes Transmission's handshake to the seeder, and then
//! relays the bytes untouched, so Transmission and the seeder talk as if Transmission had
//! dialled.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Encryption, Server, free_port, require_tool, spawn, transmission};
use serde_json::Value;

/// The image: 128 MiB, in 512 KiB pieces. A client held to two pieces a second would need 128 s.
const LEN: usize = 128 << 20;
/// Longest one client's download may take: generous for a debug-build server on a busy
/// machine, short of what a client capped by its HAVE batches would need. Transmission alone
/// needs about 20 s here, from any seed: it starts asking a new peer for pieces only at its
/// next 10 s rechoke, then grows its requests by its measured rate.
const TRANSFER: Duration = Duration::from_secs(60);

#[test]
fn transmission_aria2c_and_libtorrent_each_fetch_an_image_alone_from_the_super_seeder() {
    // BOOTTORRENT_TEST_KEEP=1 keeps the directory (files, every process's log); the path is
    // printed.
    let keep = std::env::var_os("BOOTTORRENT_TEST_KEEP").is_some();
    let dir = tempfile::Builder::new()
        .prefix("boottorrent-clients-")
        .disable_cleanup(keep)
        .tempdir()
        .unwrap();
    if keep {
        eprintln!("keeping {}", dir.path().display());
    }
    let server = Server::start(&dir.path().join("data"), &[]);
    let (image, vhdx) = common::catalogue(&server, dir.path(), LEN);
    let expected = std::fs::read(&vhdx).unwrap();
    let torrent = dir.path().join("image.torrent");
    std::fs::write(&torrent, torrent_bytes(&server, &image)).unwrap();
    let name = image["name"].as_str().unwrap().to_owned();

    // One after another, so each is the seeder's only leecher.
    let seeder: SocketAddr = ([127, 0, 0, 1], server.bt_port).into();
    let info_hash: [u8; 20] = hex::decode(image["info_hash"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let clients: [(&str, Fetch); 4] = [
        ("transmission", transmission),
        ("aria2c", aria2c),
        ("libtorrent", |job| libtorrent(job, Encryption::Any)),
        ("libtorrent, encryption forced", |job| {
            libtorrent(job, Encryption::Forced)
        }),
    ];
    for (client, fetch) in clients {
        let out = dir.path().join(client.replace(", ", "-").replace(' ', "-"));
        std::fs::create_dir_all(&out).unwrap();
        let started = Instant::now();
        let file = fetch(&Job {
            torrent: &torrent,
            out: &out,
            name: &name,
            seeder,
            info_hash,
        });
        let took = started.elapsed();
        let got = std::fs::read(&file)
            .unwrap_or_else(|e| panic!("{client} left no file at {}: {e}", file.display()));
        assert!(
            got == expected,
            "{client}'s copy differs from the image ({} bytes against {})",
            got.len(),
            expected.len()
        );
        eprintln!("{client}: {} MiB in {took:.1?}", LEN >> 20);
    }
}

/// With `bt_require_encryption` the seeder refuses libtorrent with encryption disabled (a
/// plaintext client; the refusals are counted in `/metrics`) and serves aria2c, whose default
/// is to dial with message stream encryption, and libtorrent forcing it, both over RC4.
#[test]
fn a_seeder_requiring_encryption_refuses_plaintext_and_serves_aria2c_and_libtorrent_over_rc4() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--bt-require-encryption", "true"],
    );
    let len = 8 << 20;
    let (image, vhdx) = common::catalogue(&server, dir.path(), len);
    let expected = std::fs::read(&vhdx).unwrap();
    let torrent = dir.path().join("image.torrent");
    std::fs::write(&torrent, torrent_bytes(&server, &image)).unwrap();
    let name = image["name"].as_str().unwrap();
    let connections = |kind: &str| {
        server.metric(&format!(
            "boottorrent_seeder_connections_total{{encryption=\"{kind}\"}}"
        ))
    };

    // Plaintext only: every connection refused, nothing downloaded in 8 s.
    let out = dir.path().join("libtorrent-plaintext");
    std::fs::create_dir_all(&out).unwrap();
    let downloaded =
        common::libtorrent_download(&out, &torrent, "127.0.0.1", "-", 8, Encryption::Disabled);
    assert_eq!(downloaded, 0, "libtorrent got data in plaintext");
    assert!(connections("refused") > 0, "no refusal counted");
    assert_eq!(connections("plaintext") + connections("rc4"), 0);

    let out = dir.path().join("aria2c");
    std::fs::create_dir_all(&out).unwrap();
    let file = aria2c(&Job {
        torrent: &torrent,
        out: &out,
        name,
        seeder: ([127, 0, 0, 1], server.bt_port).into(),
        info_hash: hex::decode(image["info_hash"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap(),
    });
    assert!(
        std::fs::read(file).unwrap() == expected,
        "aria2c's copy differs"
    );
    let rc4 = connections("rc4");
    assert!(rc4 > 0, "aria2c got the image without an RC4 connection");

    let out = dir.path().join("libtorrent-forced");
    std::fs::create_dir_all(&out).unwrap();
    let secs = TRANSFER.as_secs() as u32;
    let downloaded =
        common::libtorrent_download(&out, &torrent, "127.0.0.1", "-", secs, Encryption::Forced);
    assert!(
        downloaded >= len as u64,
        "libtorrent (encryption forced) downloaded {downloaded} bytes in {secs} s"
    );
    assert!(std::fs::read(out.join("lt-127.0.0.1").join(name)).unwrap() == expected);
    assert!(connections("rc4") > rc4);
    assert_eq!(connections("plaintext") + connections("mse_plaintext"), 0);
}

/// What one client is to fetch, and from where.
struct Job<'a> {
    torrent: &'a Path,
    /// A directory of its own.
    out: &'a Path,
    /// The image's file name.
    name: &'a str,
    /// The server's seeder.
    seeder: SocketAddr,
    info_hash: [u8; 20],
}

/// A client's download: returns the file once the client has it all.
type Fetch = fn(&Job<'_>) -> PathBuf;

/// The image's `.torrent`, as an operator downloads it.
fn torrent_bytes(server: &Server, image: &Value) -> Vec<u8> {
    let response = reqwest::blocking::Client::new()
        .get(image["torrent_url"].as_str().unwrap())
        .bearer_auth(server.admin_token())
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().unwrap().to_vec()
}

/// `transmission-cli` on loopback; it drops loopback peers from a tracker, so a relay dials
/// it on the seeder's behalf.
fn transmission(job: &Job<'_>) -> PathBuf {
    require_tool("transmission-cli", "transmission-cli");
    let port = free_port();
    transmission::fetch(
        transmission::Fetch {
            command: Command::new("transmission-cli"),
            bind: "127.0.0.1",
            port,
            encryption: 1,
            torrent: job.torrent,
            out: job.out,
            name: job.name,
            limit: TRANSFER,
        },
        || Reverse::start(([127, 0, 0, 1], port).into(), job.seeder, job.info_hash),
    )
}

/// `aria2c`, without DHT, local peer discovery or peer exchange, listening on a port of its
/// own; returns the file once it exits having completed.
fn aria2c(job: &Job<'_>) -> PathBuf {
    let (torrent, out, name) = (job.torrent, job.out, job.name);
    require_tool("aria2c", "aria2");
    let command = aria2c_command(torrent, out);
    let mut proc = spawn(command, out.join("aria2c.log"));
    let status = proc
        .wait_within(TRANSFER)
        .unwrap_or_else(|| panic!("aria2c still runs after {TRANSFER:?}"));
    assert!(
        status.success(),
        "aria2c failed: {status}\n{}",
        proc.log_tail(30)
    );
    out.join(name)
}

/// `aria2c` fetching `torrent` into `out` on loopback, without DHT, local peer discovery or
/// peer exchange, listening on a port of its own.
fn aria2c_command(torrent: &Path, out: &Path) -> Command {
    let port = free_port().to_string();
    let mut command = Command::new("aria2c");
    command
        .args(boottorrent_testkit::ARIA2C_NO_DISCOVERY)
        .args([
            "--seed-time=0",
            "--summary-interval=0",
            "--console-log-level=warn",
            "--interface=127.0.0.1",
            "--disable-ipv6=true",
        ])
        .arg(format!("--listen-port={port}"))
        .arg(format!("--dir={}", out.display()))
        .arg(torrent);
    command
}

/// libtorrent (python3-libtorrent) bound to 127.0.0.1 without DHT, local service discovery,
/// UPnP, NAT-PMP or uTP; returns the file once it is seeding. With `Encryption::Forced` the
/// seeder must answer its message stream encryption handshake (RC4) for it to get a byte.
fn libtorrent(job: &Job<'_>, encryption: Encryption) -> PathBuf {
    let (torrent, out, name) = (job.torrent, job.out, job.name);
    let secs = TRANSFER.as_secs() as u32;
    let downloaded = common::libtorrent_download(out, torrent, "127.0.0.1", "-", secs, encryption);
    assert!(
        downloaded >= LEN as u64,
        "libtorrent ({encryption:?}) downloaded {downloaded} bytes in {secs} s, less than the \
         image"
    );
    out.join("lt-127.0.0.1").join(name)
}

/// BitTorrent's handshake: pstrlen, "BitTorrent protocol", 8 reserved bytes, info hash,
/// peer id.
const HANDSHAKE_LEN: usize = 68;
/// The reserved bytes our engine sends: the Fast extension (BEP 6) only.
const OUR_RESERVED: [u8; 8] = [0, 0, 0, 0, 0, 0, 0, 0x04];

/// A connection from a client that cannot dial loopback to our seeder, made the other way
/// round: dialled to the client, handshaken on the seeder's behalf, then relayed byte for
/// byte. Dials again whenever the connection ends, until dropped.
struct Reverse {
    stop: Arc<AtomicBool>,
}

impl Reverse {
    fn start(client: SocketAddr, seeder: SocketAddr, info_hash: [u8; 20]) -> Reverse {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                if let Err(e) = relay_once(client, seeder, info_hash, &stopped) {
                    eprintln!("relay to {client}: {e}; dialling again");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Reverse { stop }
    }
}

impl Drop for Reverse {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One relayed connection, until either side closes it.
fn relay_once(
    client: SocketAddr,
    seeder: SocketAddr,
    info_hash: [u8; 20],
    stop: &Arc<AtomicBool>,
) -> std::io::Result<()> {
    let mut to_client = TcpStream::connect(client)?;
    // The initiator speaks first: the seeder's handshake as our engine writes it, with a
    // peer id of our own.
    let mut ours = Vec::with_capacity(HANDSHAKE_LEN);
    ours.push(19);
    ours.extend_from_slice(b"BitTorrent protocol");
    ours.extend_from_slice(&OUR_RESERVED);
    ours.extend_from_slice(&info_hash);
    ours.extend_from_slice(b"-BTRELAY-0000000000x");
    to_client.write_all(&ours)?;
    let mut theirs = [0u8; HANDSHAKE_LEN];
    to_client.read_exact(&mut theirs)?;
    // The client's handshake goes to the seeder as it is; the seeder's answer must say what
    // the client was told.
    let mut to_seeder = TcpStream::connect(seeder)?;
    to_seeder.write_all(&theirs)?;
    let mut answer = [0u8; HANDSHAKE_LEN];
    to_seeder.read_exact(&mut answer)?;
    assert_eq!(
        answer[20..28],
        OUR_RESERVED,
        "the seeder's handshake no longer has the reserved bytes the relay tells the client; \
         update OUR_RESERVED"
    );
    let _ = to_client.set_nodelay(true);
    let _ = to_seeder.set_nodelay(true);
    let down = pipe(to_seeder.try_clone()?, to_client.try_clone()?, stop.clone());
    let up = pipe(to_client, to_seeder, stop.clone());
    let _ = down.join();
    let _ = up.join();
    Ok(())
}

/// Copies `from` to `to` until `from` ends or `stop` is set, then shuts both down.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let _ = from.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = vec![0u8; 256 << 10];
        while !stop.load(Ordering::Relaxed) {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    })
}
