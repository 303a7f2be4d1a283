//! `boottorrent`: the server appliance and the operator's command line.

use clap::Parser;

mod broker;
mod catalog;
mod cli;
mod client;
mod config;
mod credentials;
mod dashboard;
mod deploy_cmd;
mod deployment;
mod fleet;
mod http;
mod listener;
mod locality;
mod metrics;
mod orchestrator;
mod registry;
mod server;
mod status;
mod store;
mod torrent_cmd;
mod vhdx;
mod zone;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BOOTTORRENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: cli::Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        cli::Command::Serve(args) => {
            let config = config::Config::load(&args)?;
            runtime.block_on(server::run(config))
        }
        cli::Command::Machines(command) => runtime.block_on(client::machines(command)),
        cli::Command::Image(command) => runtime.block_on(client::images(command)),
        cli::Command::Deploy(args) => runtime.block_on(deploy_cmd::deploy(args)),
        cli::Command::Deployments(args) => runtime.block_on(deploy_cmd::deployments(args)),
        cli::Command::Zones(args) => runtime.block_on(deploy_cmd::zones(args)),
        cli::Command::Status(args) => runtime.block_on(status::run(args)),
        cli::Command::Torrent(command) => torrent_cmd::run(command),
        cli::Command::Config => {
            print!("{}", config::Config::default_toml());
            Ok(())
        }
    }
}
