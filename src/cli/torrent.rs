//! `boottorrent torrent create`: the standalone `.torrent` creator, with the hashing engine the
//! image catalog uses.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use boottorrent_tracker::create::{CreateOptions, create};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use crate::cli::args::{TorrentCommand, TorrentCreateArgs};
use boottorrent_vhdx as vhdx;

/// Where torrents point when neither --announce nor a public URL is given: a server on this
/// machine with its default HTTP port.
const DEFAULT_ANNOUNCE: &str = "http://127.0.0.1:8080/announce";

/// Runs one `torrent` subcommand.
pub fn run(command: TorrentCommand) -> anyhow::Result<()> {
    match command {
        TorrentCommand::Create(args) => create_torrent(args),
    }
}

fn create_torrent(args: TorrentCreateArgs) -> anyhow::Result<()> {
    let announce = match (args.announce, args.public_url) {
        (Some(url), _) => url,
        (None, Some(public)) => format!("{}/announce", public.trim_end_matches('/')),
        (None, None) => DEFAULT_ANNOUNCE.to_owned(),
    };
    let output = args.output.unwrap_or_else(|| {
        let mut name = args.file.clone().into_os_string();
        name.push(".torrent");
        PathBuf::from(name)
    });
    let opts = CreateOptions {
        announce,
        piece_len: args.piece_size,
        private: args.private,
        threads: args.threads,
        name: args.name,
        sha256: false,
    };

    // A creator takes any file, but a VHDX that would not boot is worth a warning before its
    // hashes go to a whole lab; `image add` refuses such files outright.
    let vhdx = is_vhdx_name(&args.file).then(|| vhdx::inspect(&args.file));
    if let Some(Err(e)) = &vhdx {
        eprintln!("warning: {e}");
    }

    let bar = std::io::stderr().is_terminal().then(|| {
        let len = std::fs::metadata(&args.file).map_or(0, |m| m.len());
        ProgressBar::new(len).with_style(
            ProgressStyle::with_template(
                "hashing {bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("the progress template is valid"),
        )
    });
    // Hashers report from several threads, so positions can arrive out of order; only moving
    // forward keeps the bar from flickering back.
    let shown = AtomicU64::new(0);
    let progress = |done: u64| {
        if let Some(bar) = &bar {
            if shown.fetch_max(done, Ordering::Relaxed) < done {
                bar.set_position(done);
            }
        }
    };

    let started = Instant::now();
    let created = create(&args.file, &opts, &progress);
    let elapsed = started.elapsed();
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let created = created?;
    write_atomically(&output, &created.torrent)?;

    let mut out = std::io::stdout().lock();
    writeln!(out, "wrote {}", output.display())?;
    writeln!(out, "info hash:  {}", hex::encode(created.info_hash))?;
    writeln!(
        out,
        "size:       {} bytes ({})",
        created.length,
        HumanBytes(created.length)
    )?;
    writeln!(
        out,
        "piece size: {} bytes ({})",
        created.piece_len,
        HumanBytes(u64::from(created.piece_len))
    )?;
    writeln!(out, "pieces:     {}", created.piece_count)?;
    writeln!(
        out,
        "private:    {}",
        if opts.private { "yes" } else { "no" }
    )?;
    writeln!(out, "announce:   {}", opts.announce)?;
    if let Some(Ok(info)) = &vhdx {
        writeln!(
            out,
            "vhdx:       virtual size {} bytes ({}), {}-byte logical sectors{}",
            info.virtual_size,
            HumanBytes(info.virtual_size),
            info.logical_sector_size,
            info.physical_sector_size
                .map(|size| format!(", {size}-byte physical sectors"))
                .unwrap_or_default()
        )?;
        for warning in &info.warnings {
            writeln!(out, "vhdx note:  {warning}")?;
        }
    }
    writeln!(
        out,
        "time:       {:.2} s ({}/s)",
        elapsed.as_secs_f64(),
        HumanBytes(rate(created.length, elapsed))
    )?;
    Ok(())
}

fn is_vhdx_name(path: &Path) -> bool {
    path.extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("vhdx"))
}

fn rate(bytes: u64, elapsed: Duration) -> u64 {
    (bytes as f64 / elapsed.as_secs_f64().max(1e-9)) as u64
}

/// Writes through a temporary file and a rename, so an interrupted run never leaves a torrent
/// that looks complete but is cut short.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    std::fs::write(&partial, bytes)
        .with_context(|| format!("writing the torrent to {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| {
        let _ = std::fs::remove_file(&partial);
        format!(
            "moving the finished torrent {} to {}",
            partial.display(),
            path.display()
        )
    })
}
