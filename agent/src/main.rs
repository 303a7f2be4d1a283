//! `boottorrent-agent`: the thin agent preinstalled in the golden image.
//!
//! `run` connects to the BootTorrent server over MQTT ([`link`]), announces the machine
//! ([`inventory`]), verifies the server's commands with the pinned key ([`identity`]),
//! downloads and seeds the images assigned to it ([`downloads`]), runs the boot backend
//! ([`boot`]) and reports back. What must outlive the image the machine runs is in the
//! machine's store ([`store`]). `enroll` pins the server key, `identity` prints the machine's
//! key, `config` prints the configuration ([`config`]), `service` registers the Windows service.
//!
//! `run`'s tasks (the MQTT session and its event loop, the command handler, the swarm engine,
//! one per download) all live in one shutdown tree ([`tasks`]): SIGINT, SIGTERM or the Windows
//! service's stop cancels its root token and the agent waits up to `SHUTDOWN_DEADLINE` for them
//! (the session says `shutdown` and `offline` to the server, the engine saves its resume
//! records), then exits 0; a task still running then is named in the log and the exit is 1. A
//! second signal exits at once (130).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio::sync::mpsc;

mod boot;
mod broker_cert;
mod child;
mod config;
mod downloads;
mod golden;
mod identity;
mod inventory;
mod link;
mod passkey;
mod running;
mod service;
mod store;
mod tasks;
mod zone;

use config::{Config, Overrides};

/// How long the agent's tasks get to end after a stop (a signal, or the Windows service
/// being stopped) before it exits without them.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// BootTorrent agent: joins the image swarm and reports to the BootTorrent server.
#[derive(Debug, Parser)]
#[command(name = "boottorrent-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: connect to the server, report, and carry out its commands.
    Run {
        #[command(flatten)]
        settings: Overrides,
    },
    /// Fetch the server's public key from its HTTP API, show its fingerprint, and pin it in
    /// server.pub (in --data-dir when set, else next to the config file). Makes no machine
    /// key, so it is safe in a golden image.
    Enroll {
        #[command(flatten)]
        settings: Overrides,
        /// Replace a different key pinned before (after the server was reinstalled).
        #[arg(long)]
        replace: bool,
    },
    /// Print this machine's public key, creating the key file on first use.
    ///
    /// The server trusts the key on the machine's first startup (or after the operator
    /// approves it); keep the file across re-imaging, or approve the new key on the server.
    Identity {
        /// Private key file (64 hex digits, mode 0600) [default: <data-dir>/agent.key].
        #[arg(long, env = "BOOTTORRENT_AGENT_KEY", value_name = "FILE")]
        key_file: Option<PathBuf>,
        #[command(flatten)]
        settings: Overrides,
    },
    /// Print the commented default configuration, or with --effective the merged one.
    Config {
        /// Print the configuration after merging the file, environment and flags (the
        /// enrollment token masked) instead of the defaults.
        #[arg(long)]
        effective: bool,
        #[command(flatten)]
        settings: Overrides,
    },
    /// Register or remove the Windows service (on Linux, use the systemd unit in assets/).
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
}

#[derive(Debug, Subcommand)]
enum ServiceAction {
    /// Register the agent as an automatically started Windows service reading FILE.
    Install {
        /// The configuration file the service reads [default: the platform's default].
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Stop and remove the Windows service.
    Uninstall,
    /// The service's entry point; started by the service control manager.
    #[command(hide = true)]
    Run {
        #[command(flatten)]
        settings: Box<Overrides>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("BOOTTORRENT_AGENT_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    // A service has no console: its log goes to a file next to its configuration, where an
    // operator (and the Wine tests) can read why it stopped.
    let service_log = match &cli.command {
        Command::Service {
            action: ServiceAction::Run { settings },
        } => Some(service::log_file(
            &settings
                .config
                .clone()
                .unwrap_or_else(config::default_config_path),
        )),
        _ => None,
    };
    match service_log
        .as_ref()
        .map(|path| (path, service::open_log(path)))
    {
        Some((_, Ok(file))) => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .init(),
        other => {
            tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            if let Some((path, Err(e))) = other {
                tracing::warn!("cannot open the service log {}: {e}", path.display());
            }
        }
    }
    let in_service = service_log.is_some();
    match dispatch(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if in_service => {
            tracing::error!("the agent stopped: {e:#}");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { settings } => {
            let config = Config::load(&settings)?;
            run_agent(config, Box::pin(termination_signal()))
        }
        Command::Enroll { settings, replace } => enroll(&Config::load(&settings)?, replace),
        Command::Identity { key_file, settings } => {
            let key_file = match key_file {
                Some(file) => file,
                None => store::Store::locate(&Config::load(&settings)?)?.key_file(),
            };
            let key = identity::load_or_create_key(&key_file)?;
            println!("{}", hex::encode(key.verifying_key().to_bytes()));
            Ok(())
        }
        Command::Config {
            effective,
            settings,
        } => {
            if effective {
                print!("{}", Config::load(&settings)?.to_toml_masked()?);
            } else {
                print!("{}", Config::default_toml());
            }
            Ok(())
        }
        Command::Service { action } => match action {
            ServiceAction::Install { config } => {
                service::install(&config.unwrap_or_else(config::default_config_path))?;
                println!(
                    "installed the service {}; it starts at the next boot (or `sc start {}`)",
                    service::SERVICE_NAME,
                    service::SERVICE_NAME
                );
                Ok(())
            }
            ServiceAction::Uninstall => service::uninstall(),
            ServiceAction::Run { settings } => {
                let config = Config::load(&settings)?;
                service::run_service(move |stop| {
                    run_agent(
                        config,
                        Box::pin(async move {
                            let _ = stop.await;
                        }),
                    )
                })
            }
        },
    }
}

/// `enroll`: pins the server key, refusing to silently replace a different one.
fn enroll(config: &Config, replace: bool) -> anyhow::Result<()> {
    let url = config.http_url()?;
    let runtime = runtime()?;
    let key = runtime.block_on(identity::fetch_server_key(&url))?;
    let path = config.pin_file();
    let fingerprint = identity::fingerprint(&key);
    match identity::read_server_key_file(&path)? {
        Some(old) if old == key => {
            println!("the server key was already pinned in {}", path.display());
        }
        Some(old) if !replace => bail!(
            "{} pins a different server key ({}) than {url} presents now ({fingerprint}); if the \
             server was reinstalled, run `boottorrent-agent enroll --replace`",
            path.display(),
            identity::fingerprint(&old)
        ),
        _ => identity::store_server_key(&path, &key)?,
    }
    // No machine key is made here: enrolling happens in the golden image, and a key made
    // there would be shared by every machine cloned from it. `run` makes it on first start.
    println!("server       {url}");
    println!("server key   {}", key.to_hex());
    println!("fingerprint  {fingerprint}");
    println!("pinned in    {}", path.display());
    Ok(())
}

/// Runs the agent until `stop` resolves (a signal, or the Windows service being stopped).
fn run_agent(
    mut config: Config,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
) -> anyhow::Result<()> {
    // Checked first so that a missing setting stops start-up instead of a retry loop.
    config.server()?;
    let store = store::Store::locate(&config)?;
    let identity = identity::Identity::load(&config, &store)?;
    // From here on the configuration names the store and the machine it found.
    config.data_dir = Some(store.dir().to_owned());
    config.machine_id = Some(store.machine().clone());
    let data_dir = store.dir().to_owned();
    tracing::info!(
        machine = %identity.machine,
        // What the operator compares before `boottorrent machines approve`.
        key = %identity::fingerprint(&identity.key.verifying_key().to_bytes().into()),
        store = %data_dir.display(),
        server_key = %identity::fingerprint(&identity.server_key.to_bytes().into()),
        "starting boottorrent-agent {}",
        env!("CARGO_PKG_VERSION")
    );
    // Made before anything starts: a bad setting stops start-up with nothing to undo.
    let backend = boot::Backend::from_config(
        config.boot_backend,
        config.boot_command.as_deref(),
        &data_dir,
    )?;
    runtime()?.block_on(async move {
        // What runs changes only with a restart: found once, told in every startup.
        let running =
            running::determine(&backend, config.running_image_file.as_deref(), &data_dir).await;
        let tasks = tasks::Tasks::new();
        let (commands_tx, mut commands_rx) = mpsc::channel::<boottorrent_proto::Command>(64);
        let (events_tx, events_rx) = mpsc::channel(256);
        let passkey = passkey::Passkey::new(
            identity.machine.clone(),
            identity.key.clone(),
            &config.http_url()?,
        );
        let swarm = boottorrent_swarm::session::Session::start(
            boottorrent_swarm::session::SessionConfig {
                listen: config.bt_listen,
                download_limit_bps: config.download_limit_bps,
                upload_limit_bps: config.upload_limit_bps,
                state_dir: Some(data_dir.join("resume")),
                // Serve only peers the tracker has in the swarm: not any host that dials us.
                admission: Some(passkey.admission()),
                encryption: if config.bt_require_encryption {
                    boottorrent_swarm::session::Encryption::Require
                } else {
                    boottorrent_swarm::session::Encryption::Accept
                },
                ..boottorrent_swarm::session::SessionConfig::default()
            },
            tasks.token(),
        )
        .await
        .with_context(|| format!("starting the swarm engine on {}", config.bt_listen))?;
        // Waited for on the way out: the engine saves its resume records as it stops.
        tasks.spawn("swarm engine", {
            let swarm = swarm.clone();
            async move {
                swarm.stopped().await;
                Ok(())
            }
        });
        // In the background: at boot the network may not be up yet.
        tasks.spawn("zone", {
            let (setting, swarm, stop) = (config.bt_zone.clone(), swarm.clone(), tasks.token());
            let server = (config.server()?.to_owned(), config.mqtt_port());
            async move {
                zone::apply(setting, swarm, server, stop).await;
                Ok(())
            }
        });
        let downloads = downloads::Downloads::start(
            swarm,
            data_dir,
            config.http_url()?,
            passkey,
            backend,
            config.disk_reserve_bytes,
            events_tx,
            running.clone(),
            &tasks,
        );
        let held: link::HeldFn = {
            let downloads = downloads.clone();
            Arc::new(move || downloads.held())
        };
        // One command at a time, each carried out whole: a stop is looked at between them.
        tasks.spawn("commands", {
            let token = tasks.token();
            async move {
                use boottorrent_proto::Command;
                loop {
                    let command = tokio::select! {
                        _ = token.cancelled() => break,
                        command = commands_rx.recv() => command,
                    };
                    let Some(command) = command else { break };
                    match command {
                        Command::ArtifactAssignment(a) => downloads.assign(a).await,
                        Command::ArtifactUnassignment(u) => downloads.unassign(u).await,
                        Command::Boot(b) => downloads.boot(b).await,
                        // Applied by the link itself (zones, heartbeat interval), before it gets here.
                        Command::MachineConfiguration(_) => {}
                        other => tracing::info!(kind = %other.kind(), "command not handled by this agent version"),
                    }
                }
                Ok(())
            }
        });
        tasks.spawn(
            "MQTT session",
            link::run(
                config,
                identity,
                commands_tx,
                events_rx,
                held,
                running.map(|r| r.image),
                tasks.clone(),
                tasks.token(),
            ),
        );
        tokio::select! {
            () = stop => tracing::info!("stopping (a second signal exits at once)"),
            // A task failed; its error is what `stop` returns.
            () = tasks.stopping() => {}
        }
        // A second signal forces the exit, for an operator who does not want to wait.
        let force = {
            let tasks = tasks.clone();
            async move {
                termination_signal().await;
                eprintln!(
                    "second signal: exiting at once; still running: {}",
                    tasks.running().join(", ")
                );
                std::process::exit(130);
            }
        };
        tasks.stop(SHUTDOWN_DEADLINE, force).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

/// The agent is a background program on someone's PC: one worker thread moves its network
/// traffic and protocol work at link speed (measured by scripts/bench-agent-cpu: a second
/// worker only added cross-thread wake-ups, about 10% more CPU per GiB and 10 MiB more memory),
/// and the hashing and file I/O run on the blocking pool beside it.
const WORKER_THREADS: usize = 1;

/// Blocking work at once: piece hashing and writes, whole-image SHA-256 checks and resume
/// checks. A few are enough to keep the worker from waiting on the disk; tokio's default of
/// 512 would let a burst of completed pieces start as many threads.
const MAX_BLOCKING_THREADS: usize = 4;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Resolves on SIGINT or SIGTERM (Ctrl-C elsewhere).
async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
