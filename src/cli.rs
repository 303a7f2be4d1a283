//! Command line: `boottorrent serve`, the operator's client commands, and `config`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// BootTorrent: re-image a fleet of PCs from VHDX images over a peer-to-peer swarm.
///
/// The server is one process: an embedded MQTT broker for the agents, an HTTP API, the
/// BitTorrent tracker and seeder, and the orchestrator. The other commands are clients of a
/// running server's HTTP API.
#[derive(Debug, Parser)]
#[command(name = "boottorrent", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: MQTT broker, HTTP API, orchestrator.
    ///
    /// With no arguments it listens on MQTT 0.0.0.0:1883, HTTP 0.0.0.0:8080 and keeps its
    /// state in ./data. On first start it generates the enrollment token (agents' MQTT
    /// password), the admin token and the server's signing key into the data directory and
    /// prints the tokens once. Settings come from, in increasing priority: built-in defaults,
    /// the TOML file given with --config, BOOTTORRENT_* environment variables, flags.
    Serve(Box<ServeArgs>),
    /// List, inspect and approve machines (talks to a running server's HTTP API).
    #[command(subcommand)]
    Machines(MachinesCommand),
    /// Print the default configuration file, with a comment on every setting.
    Config,
}

/// Settings of `boottorrent serve`. Every one is optional here: unset means "take it from the
/// config file, or the default" (see `config::Config`).
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML configuration file (print the defaults with `boottorrent config`).
    #[arg(long, env = "BOOTTORRENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for the database, tokens and server key [default: ./data].
    #[arg(long, env = "BOOTTORRENT_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// MQTT listen address [default: 0.0.0.0:1883].
    #[arg(long, env = "BOOTTORRENT_MQTT_LISTEN", value_name = "ADDR:PORT")]
    pub mqtt_listen: Option<SocketAddr>,
    /// MQTT over TLS listen address, used when --tls-cert and --tls-key are set
    /// [default: 0.0.0.0:8883].
    #[arg(long, env = "BOOTTORRENT_MQTTS_LISTEN", value_name = "ADDR:PORT")]
    pub mqtts_listen: Option<SocketAddr>,
    /// HTTP listen address: API, tracker, dashboard [default: 0.0.0.0:8080].
    #[arg(long, env = "BOOTTORRENT_HTTP_LISTEN", value_name = "ADDR:PORT")]
    pub http_listen: Option<SocketAddr>,
    /// BitTorrent listen address of the server's seeder [default: 0.0.0.0:6881].
    #[arg(long, env = "BOOTTORRENT_BT_LISTEN", value_name = "ADDR:PORT")]
    pub bt_listen: Option<SocketAddr>,
    /// URL agents and peers use to reach this server's HTTP listener
    /// [default: http://<hostname>:<http port>].
    #[arg(long, env = "BOOTTORRENT_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<String>,
    /// PEM certificate chain for the MQTT TLS listener (needs --tls-key).
    #[arg(long, env = "BOOTTORRENT_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for the MQTT TLS listener (needs --tls-cert).
    #[arg(long, env = "BOOTTORRENT_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// rumqttd configuration replacing the embedded broker.toml; listen addresses and
    /// authentication are still set by BootTorrent.
    #[arg(long, env = "BOOTTORRENT_BROKER_CONFIG", value_name = "FILE")]
    pub broker_config: Option<PathBuf>,
    /// Agents' MQTT password [default: generated into <data-dir>/enroll.token].
    #[arg(long, env = "BOOTTORRENT_ENROLL_TOKEN", hide_env_values = true)]
    pub enroll_token: Option<String>,
    /// Operator token for MQTT user `admin` and the HTTP API
    /// [default: generated into <data-dir>/admin.token].
    #[arg(long, env = "BOOTTORRENT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Register machines on first contact (true), or hold them until
    /// `boottorrent machines approve ID` (false) [default: true].
    #[arg(long, env = "BOOTTORRENT_AUTO_APPROVE", value_name = "BOOL")]
    pub auto_approve: Option<bool>,
    /// Seconds between agent heartbeats; three missed mark a machine offline [default: 30].
    #[arg(long, env = "BOOTTORRENT_HEARTBEAT_INTERVAL_SECS", value_name = "SECS")]
    pub heartbeat_interval_secs: Option<u32>,
    /// Seconds an envelope's timestamp may be off before it is dropped [default: 300].
    #[arg(long, env = "BOOTTORRENT_REPLAY_WINDOW_SECS", value_name = "SECS")]
    pub replay_window_secs: Option<u32>,
}

/// How the client commands reach the server.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Base URL of the server's HTTP API.
    #[arg(
        long,
        env = "BOOTTORRENT_SERVER",
        default_value = "http://127.0.0.1:8080",
        value_name = "URL"
    )]
    pub server: String,
    /// Admin token [default: read from <data-dir>/admin.token].
    #[arg(long, env = "BOOTTORRENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Data directory of a local server, where the admin token is read from when no token is
    /// given.
    #[arg(
        long,
        env = "BOOTTORRENT_DATA_DIR",
        default_value = "./data",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,
    /// Print the server's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum MachinesCommand {
    /// List every known machine: online state, last contact, key state, zones, images.
    List(ClientArgs),
    /// Show everything the server knows about one machine.
    Show {
        /// Machine id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Approve a machine that is waiting: a new machine when auto-approve is off, or a known
    /// machine that presented a different key. Needs the admin token.
    Approve {
        /// Machine id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}
