//! `boottorrent-agent`: the thin agent preinstalled in the golden image.
//!
//! This first version only manages the machine's identity: the Ed25519 key whose public half
//! the server pins at the machine's first `startup`. Joining the swarm, reporting over MQTT
//! and switching the boot target come with the agent's own issue.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::Context;
use boottorrent_proto::{generate_signing_key, signing_key_from_hex, signing_key_to_hex};
use clap::{Parser, Subcommand};

/// BootTorrent agent: joins the image swarm and reports to the BootTorrent server.
#[derive(Debug, Parser)]
#[command(name = "boottorrent-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print this machine's public key, creating the key file on first use.
    ///
    /// The server trusts the key on the machine's first startup (or after the operator
    /// approves it); keep the file across re-imaging, or approve the new key on the server.
    Identity {
        /// Private key file (64 hex digits, mode 0600).
        #[arg(long, env = "BOOTTORRENT_AGENT_KEY", default_value = "./agent.key")]
        key_file: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Identity { key_file } => {
            let key = match std::fs::read_to_string(&key_file) {
                Ok(text) => signing_key_from_hex(&text)
                    .with_context(|| format!("reading the machine key {}", key_file.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let key = generate_signing_key()
                        .map_err(|e| anyhow::anyhow!("generating the machine key: {e}"))?;
                    let mut file = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&key_file)
                        .with_context(|| format!("creating {}", key_file.display()))?;
                    writeln!(file, "{}", signing_key_to_hex(&key))
                        .and_then(|()| file.sync_all())
                        .with_context(|| format!("writing {}", key_file.display()))?;
                    key
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("reading {}", key_file.display()));
                }
            };
            println!("{}", hex::encode(key.verifying_key().to_bytes()));
            Ok(())
        }
    }
}
