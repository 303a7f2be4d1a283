//! `boottorrent-peer`: one torrent, one process, our swarm engine. Interop tests and the swarm
//! benchmark run it as a real peer; its stdout is JSON lines a script can follow.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use boottorrent_bt::metainfo::Metainfo;
use boottorrent_swarm::session::{
    AddTorrent, Cidr, Encryption, Mode, Session, SessionConfig, TorrentState, TorrentStats,
};
use clap::Parser;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Download or seed one torrent with BootTorrent's swarm engine.
///
/// Without --seed or --super-seed it downloads into --file, keeping whatever verified pieces the
/// file already has, then keeps seeding (unless --exit-when-done). Progress goes to stdout as
/// JSON lines: `ready`, `checked`, `stats` (every --stats-ms), `complete`, and `stopped` on
/// SIGINT/SIGTERM. Logs go to stderr (filter with BOOTTORRENT_LOG, e.g. `debug`).
#[derive(Debug, Parser)]
#[command(name = "boottorrent-peer", version)]
struct Args {
    /// The .torrent file.
    #[arg(long, value_name = "FILE")]
    torrent: PathBuf,
    /// The data file to download into or seed from.
    #[arg(long, value_name = "PATH")]
    file: PathBuf,
    /// Seed a complete file (checked first, then served read-only).
    #[arg(long, conflicts_with = "super_seed")]
    seed: bool,
    /// Seed so that each piece leaves this peer about once (for the server's seeder).
    #[arg(long)]
    super_seed: bool,
    /// Where to accept peer connections.
    #[arg(long, default_value = "0.0.0.0:6881", value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// A peer to connect to besides the tracker's (repeatable).
    #[arg(long = "peer", value_name = "ADDR:PORT")]
    peers: Vec<SocketAddr>,
    /// Do not announce to the torrent's tracker.
    #[arg(long)]
    no_tracker: bool,
    /// Peers served at once; more interested peers take turns.
    #[arg(long, default_value_t = 16, value_name = "N")]
    upload_slots: usize,
    /// Upload limit in bytes per second.
    #[arg(long, value_name = "BYTES_PER_SEC")]
    upload_limit: Option<u64>,
    /// Download limit in bytes per second.
    #[arg(long, value_name = "BYTES_PER_SEC")]
    download_limit: Option<u64>,
    /// Networks of our zone, preferred for downloading (repeatable), e.g. 10.1.0.0/24.
    #[arg(long = "zone", value_name = "CIDR")]
    zone: Vec<Cidr>,
    /// Directory for resume data [default: next to --file, as <file>.resume].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Exit once the download is complete instead of seeding.
    #[arg(long)]
    exit_when_done: bool,
    /// Encrypt every peer connection (message stream encryption, RC4): dial with it and
    /// refuse plaintext.
    #[arg(long)]
    require_encryption: bool,
    /// Milliseconds between `stats` lines.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    stats_ms: u64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BOOTTORRENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("Error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.torrent)
        .with_context(|| format!("reading {}", args.torrent.display()))?;
    let metainfo = Metainfo::from_bytes(&bytes)
        .with_context(|| format!("parsing {}", args.torrent.display()))?;
    let info_hash = metainfo.info_hash;
    let shutdown = CancellationToken::new();
    let session = Session::start(
        SessionConfig {
            listen: args.listen,
            upload_slots: args.upload_slots,
            upload_limit_bps: args.upload_limit,
            download_limit_bps: args.download_limit,
            state_dir: args.state_dir,
            zone: args.zone,
            encryption: if args.require_encryption {
                Encryption::Require
            } else {
                Encryption::Accept
            },
            ..SessionConfig::default()
        },
        shutdown.clone(),
    )
    .await?;
    emit(
        json!({"event": "ready", "listen": session.local_addr().to_string(), "info_hash": info_hash.to_string()}),
    );
    let mode = if args.super_seed {
        Mode::SuperSeed
    } else if args.seed {
        Mode::Seed
    } else {
        Mode::Download
    };
    let handle = session.add(AddTorrent {
        metainfo,
        path: args.file,
        mode,
        peers: args.peers,
        use_tracker: !args.no_tracker,
    })?;
    let mut stats = handle.stats();
    let started = tokio::time::Instant::now();
    let mut checked = false;
    let mut complete = false;
    let mut every = tokio::time::interval(Duration::from_millis(args.stats_ms.max(10)));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            changed = stats.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = every.tick() => emit(stats_json(&stats.borrow())),
        }
        let s = stats.borrow_and_update().clone();
        if let TorrentState::Error(e) = &s.state {
            anyhow::bail!("{e}");
        }
        let settled = matches!(s.state, TorrentState::Downloading | TorrentState::Seeding);
        if settled && !checked {
            checked = true;
            emit(
                json!({"event": "checked", "pieces_done": s.pieces_done, "bytes_done": s.bytes_done}),
            );
        }
        if s.state == TorrentState::Seeding && !complete {
            complete = true;
            emit(
                json!({"event": "complete", "elapsed_ms": started.elapsed().as_millis() as u64, "downloaded": s.downloaded}),
            );
            if args.exit_when_done {
                break;
            }
        }
    }
    shutdown.cancel();
    session.stopped().await;
    let s = stats.borrow().clone();
    emit(json!({
        "event": "stopped",
        "uploaded": s.uploaded,
        "downloaded": s.downloaded,
        "hash_failures": s.hash_failures,
        "banned": s.banned,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    }));
    Ok(())
}

fn stats_json(s: &TorrentStats) -> serde_json::Value {
    json!({
        "event": "stats",
        "state": s.state.name(),
        "bytes_done": s.bytes_done,
        "bytes_total": s.bytes_total,
        "pieces_done": s.pieces_done,
        "downloaded": s.downloaded,
        "uploaded": s.uploaded,
        "download_rate": s.download_rate,
        "upload_rate": s.upload_rate,
        "peers": s.peers.len(),
        "hash_failures": s.hash_failures,
        "banned": s.banned,
        "protocol_errors": s.protocol_errors,
    })
}

fn emit(value: serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // A closed stdout (the reader went away) must not kill a seeding peer.
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}
