//! `boottorrent-loadgen`: simulated agents against a server, for benchmarks.
//!
//! The agents it simulates behave like `boottorrent-agent` on the wire: their own Ed25519
//! keys, MQTT logins with a fresh proof of the key, signed envelopes with rising sequence
//! numbers, a signed last will, one login per machine id; they verify every command with the
//! pinned server key (`boottorrent_proto::machine` is shared with the agent).
//!
//! - `fleet` ([`fleet`]): N agents online at once, the time they take to get there, what the
//!   server uses with them, how fast a deployment reaches them, and API latency meanwhile.
//! - `flood` ([`flood`]): made-up machines enrol as fast as possible while one real machine
//!   reports.
//! - `rate` ([`rate`]): events at a sustained rate, new machines enrolling meanwhile; how
//!   many the server applies per second and how far behind it falls.

mod fleet;
mod flood;
mod machine;
mod rate;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "Simulated BootTorrent agents against a server, for benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// N simulated agents (one task each, in this process) come online over a ramp, stay
    /// connected with heartbeats, and take two deployments (every machine, one zone). Reports
    /// the time until all are online in the API, failed connects and dropped sessions, the
    /// server's CPU and memory at idle, fan-out p50/p99/max per deployment, and API latency
    /// while the agents come online. Starts its own `boottorrent serve` unless --server is
    /// given.
    Fleet(fleet::Fleet),
    /// Made-up machines enrol as fast as asked while one real machine reports; prints how
    /// late its heartbeats are applied.
    Flood(flood::Flood),
    /// Connected agents send signed progress and heartbeats at a sustained rate while new
    /// machines enrol; reports the events the server applied per second (median, worst),
    /// the backlog, its drain time and the server's CPU. Starts its own `boottorrent serve`
    /// unless --server is given.
    Rate(rate::Rate),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Fleet(args) => runtime.block_on(fleet::run(args)),
        Command::Flood(args) => runtime.block_on(flood::run(args)),
        Command::Rate(args) => runtime.block_on(rate::run(args)),
    }
}
