//! `boottorrent`: the server appliance and the operator's command line.

use clap::Parser;

mod api;
mod cli;
mod server;

use cli::args::{Cli, Command};
use cli::{deploy, images, machines, status, torrent};
use server::{broker_log, config};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_log();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `BOOTTORRENT_LOG` (default `info`), coloured only on a
/// terminal. The broker's own events go through [`broker_log::BrokerLog`] unless
/// `BOOTTORRENT_LOG` names `rumqttd`, for whoever needs them raw.
fn init_log() {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, filter::Targets};

    let wanted = std::env::var("BOOTTORRENT_LOG").unwrap_or_default();
    let mut filter = EnvFilter::try_new(&wanted).unwrap_or_else(|_| EnvFilter::new("info"));
    if wanted.trim().is_empty() {
        filter = EnvFilter::new("info");
    }
    let raw_broker = wanted.contains(broker_log::RUMQTTD);
    if !raw_broker {
        filter = filter.add_directive(
            format!("{}=off", broker_log::RUMQTTD)
                .parse()
                .expect("a static directive"),
        );
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter);
    let broker = (!raw_broker).then(|| {
        broker_log::BrokerLog::default()
            .with_filter(Targets::new().with_target(broker_log::RUMQTTD, tracing::Level::INFO))
    });
    tracing_subscriber::registry().with(fmt).with(broker).init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => {
            let config = config::Config::load(&args)?;
            runtime.block_on(server::run(config))
        }
        Command::Machines(command) => runtime.block_on(machines::run(command)),
        Command::Image(command) => runtime.block_on(images::run(command)),
        Command::Deploy(args) => runtime.block_on(deploy::deploy(args)),
        Command::Deployments(args) => runtime.block_on(deploy::deployments(args)),
        Command::Zones(args) => runtime.block_on(deploy::zones(args)),
        Command::Status(args) => runtime.block_on(status::run(args)),
        Command::Torrent(command) => torrent::run(command),
        Command::Config => {
            print!("{}", config::Config::default_toml());
            Ok(())
        }
        Command::BrokerConfig(args) => {
            let written = server::mosquitto::write(&server::mosquitto::Request {
                data_dir: &args.data_dir,
                out: &args.out,
                listen: args.listen,
                names: &args.names,
                run_as: args.run_as.as_deref(),
            })?;
            for path in written {
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}
