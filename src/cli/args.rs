//! Command line: `boottorrent serve`, the operator's client commands, and `config`.

use std::net::SocketAddr;
use std::path::PathBuf;

use boottorrent_proto::Persistence;
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
    /// Add, list, inspect and remove catalogued images (talks to a running server's HTTP API).
    #[command(subcommand)]
    Image(ImageCommand),
    /// Send an image to a zone, to some machines or to every machine (talks to a running
    /// server's HTTP API).
    ///
    /// Every targeted machine downloads the image from the swarm, verifies it and then does
    /// the --action. Prints `deployment ID started: IMAGE to TARGET, action ACTION, N machines`
    /// (the server's JSON with --json) and returns; follow the deployment with --watch here, or
    /// later with `boottorrent status ID --watch`. Needs the admin token.
    ///
    /// Exit status: 0 once the server accepted the deployment (with --watch: as for `status`);
    /// 1 when it refused it (unknown image, zone or machine; image not ready; wrong token) or
    /// could not be reached; 2 for a command line error.
    Deploy(DeployArgs),
    /// List, inspect and cancel deployments (talks to a running server's HTTP API).
    ///
    /// Without a subcommand, lists them like `deployments list`.
    Deployments(DeploymentsArgs),
    /// List, inspect, define and remove zones: named groups of machines, by machine id and/or
    /// subnet (talks to a running server's HTTP API).
    ///
    /// Without a subcommand, lists them like `zones list`.
    Zones(ZonesArgs),
    /// Show how far deployments got, per machine; with --watch, follow them live to the end.
    ///
    /// Without DEPLOYMENT it shows the running deployments, or the newest one when none runs.
    /// Without --watch it prints one line per machine (state, bytes, percent, download rate)
    /// and a total (the server's JSON with --json). With --watch it draws a progress bar per
    /// machine on a terminal; when stdout is not a terminal it prints one line per state change
    /// instead: first each machine's history (`pc-01: pending`, `pc-01: pending ->
    /// downloading`), then every change as it happens (`pc-01: downloading -> verifying`,
    /// `pc-03: downloading -> failed (REASON)`). Either way it ends with a summary line,
    /// `deployment ID STATE: N machines: 2 booted, 1 failed (pc-03: REASON)`. A lost connection
    /// to the server is retried every second.
    ///
    /// Exit status: 0 when the deployments completed, or are still running without a failed
    /// machine (without --watch); 1 when a machine failed, a deployment failed or was
    /// cancelled, or the server could not be asked; 2 for a command line error.
    Status(StatusArgs),
    /// Print the default configuration file, with a comment on every setting.
    Config,
    /// Write a mosquitto 2.0 configuration for `serve --broker`: past about 10,000 agents, or
    /// where the site runs mosquitto already.
    ///
    /// Writes mosquitto.conf, acl, ca.crt (the machine CA of the data directory, made if
    /// missing) and broker.crt/broker.key into --out; makes the server's own client
    /// certificate in the data directory. Run `mosquitto -c OUT/mosquitto.conf`, then
    /// `boottorrent serve --broker mqtts://HOST:PORT`; agents need broker_login =
    /// "certificate", mqtt_port = PORT and tls_ca = OUT/ca.crt.
    BrokerConfig(BrokerConfigArgs),
    /// Make .torrent files locally, with the engine the image catalog uses (no server needed).
    #[command(subcommand)]
    Torrent(TorrentCommand),
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
    /// HTTPS listen address (API and dashboard), used when --tls-cert and --tls-key are set;
    /// the API then takes tokens only over HTTPS [default: 0.0.0.0:8443].
    #[arg(long, env = "BOOTTORRENT_HTTPS_LISTEN", value_name = "ADDR:PORT")]
    pub https_listen: Option<SocketAddr>,
    /// HTTP listen address: API, tracker, dashboard [default: 0.0.0.0:8080].
    #[arg(long, env = "BOOTTORRENT_HTTP_LISTEN", value_name = "ADDR:PORT")]
    pub http_listen: Option<SocketAddr>,
    /// BitTorrent listen address of the server's seeder [default: 0.0.0.0:6881].
    #[arg(long, env = "BOOTTORRENT_BT_LISTEN", value_name = "ADDR:PORT")]
    pub bt_listen: Option<SocketAddr>,
    /// Accept only encrypted peer connections at the seeder (message stream encryption,
    /// RC4) and refuse plaintext ones, for networks that throttle BitTorrent; agents must
    /// require it too or are refused [default: false].
    #[arg(long, env = "BOOTTORRENT_BT_REQUIRE_ENCRYPTION", value_name = "BOOL")]
    pub bt_require_encryption: Option<bool>,
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
    /// Use an existing MQTT broker instead of the embedded one: mqtt://HOST:PORT or
    /// mqtts://HOST:PORT. For sites past what one appliance carries (about 10,000 agents) or
    /// that run a broker already (mosquitto, an EMQX cluster). The MQTT listeners are then not
    /// opened; the broker's ACL must keep each agent to its own topics: `boottorrent
    /// broker-config` writes such a mosquitto configuration, and agents log in to it with a
    /// certificate from this server (agent option broker_login = "certificate").
    #[arg(long, env = "BOOTTORRENT_BROKER", value_name = "URL")]
    pub broker: Option<crate::server::external_broker::BrokerUrl>,
    /// PEM CA certificate the external broker's TLS certificate must chain to
    /// [default: <data-dir>/machine-ca.crt].
    #[arg(long, env = "BOOTTORRENT_BROKER_CA", value_name = "FILE")]
    pub broker_ca: Option<PathBuf>,
    /// PEM client certificate for the external broker (needs --broker-key)
    /// [default over mqtts: one of the machine CA for the orchestrator, in <data-dir>].
    #[arg(long, env = "BOOTTORRENT_BROKER_CERT", value_name = "FILE")]
    pub broker_cert: Option<PathBuf>,
    /// PEM private key of --broker-cert.
    #[arg(long, env = "BOOTTORRENT_BROKER_KEY", value_name = "FILE")]
    pub broker_key: Option<PathBuf>,
    /// Username for the external broker, when it takes a password rather than a certificate.
    #[arg(long, env = "BOOTTORRENT_BROKER_USERNAME", value_name = "NAME")]
    pub broker_username: Option<String>,
    /// Password of --broker-username.
    #[arg(long, env = "BOOTTORRENT_BROKER_PASSWORD", hide_env_values = true)]
    pub broker_password: Option<String>,
    /// Agents' MQTT password [default: generated into <data-dir>/enroll.token].
    #[arg(long, env = "BOOTTORRENT_ENROLL_TOKEN", hide_env_values = true)]
    pub enroll_token: Option<String>,
    /// Operator token for MQTT user `admin` and the HTTP API
    /// [default: generated into <data-dir>/admin.token].
    #[arg(long, env = "BOOTTORRENT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Read-only HTTP token: reads the API and the event stream, changes nothing
    /// [default: generated into <data-dir>/viewer.token].
    #[arg(long, env = "BOOTTORRENT_VIEWER_TOKEN", hide_env_values = true)]
    pub viewer_token: Option<String>,
    /// Bearer token GET /metrics requires (the admin and viewer tokens also work)
    /// [default: unset, /metrics is open].
    #[arg(long, env = "BOOTTORRENT_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Seconds an HTTP client gets to send a request's headers; also how long an idle
    /// keep-alive connection is kept [default: 10].
    #[arg(
        long,
        env = "BOOTTORRENT_HTTP_HEADER_TIMEOUT_SECS",
        value_name = "SECS"
    )]
    pub http_header_timeout_secs: Option<u32>,
    /// Seconds a response may wait without a byte written before its connection is closed
    /// [default: 30].
    #[arg(long, env = "BOOTTORRENT_HTTP_WRITE_TIMEOUT_SECS", value_name = "SECS")]
    pub http_write_timeout_secs: Option<u32>,
    /// Most HTTP connections open at once; more are closed when accepted [default: 4096].
    #[arg(long, env = "BOOTTORRENT_HTTP_MAX_CONNECTIONS", value_name = "N")]
    pub http_max_connections: Option<u32>,
    /// Most peers one source address may hold in one torrent's tracker peer list
    /// [default: 64].
    #[arg(
        long,
        env = "BOOTTORRENT_TRACKER_MAX_PEERS_PER_ADDRESS",
        value_name = "N"
    )]
    pub tracker_max_peers_per_address: Option<u32>,
    /// Register machines on first contact (true: anyone holding the enrollment token, which
    /// every golden image carries, adds machines that get images), or hold them until
    /// `boottorrent machines approve` (false) [default: false].
    #[arg(long, env = "BOOTTORRENT_AUTO_APPROVE", value_name = "BOOL")]
    pub auto_approve: Option<bool>,
    /// Seconds between agent heartbeats; three missed mark a machine offline. Past 3,000
    /// machines the server lengthens it in 30 s steps so that the fleet sends at most 100 a
    /// second (120 s at 10,000) [default: 30].
    #[arg(long, env = "BOOTTORRENT_HEARTBEAT_INTERVAL_SECS", value_name = "SECS")]
    pub heartbeat_interval_secs: Option<u32>,
    /// New machine ids admitted per minute; bounds a flood of made-up machines from anyone
    /// holding the enrollment token [default: 1000].
    #[arg(long, env = "BOOTTORRENT_ENROLL_PER_MINUTE", value_name = "N")]
    pub enroll_per_minute: Option<u32>,
    /// Most machines waiting for approval at once (auto-approve off) [default: 10000].
    #[arg(long, env = "BOOTTORRENT_MAX_PENDING_MACHINES", value_name = "N")]
    pub max_pending_machines: Option<u32>,
    /// Seconds an envelope's timestamp may be off before it is dropped [default: 300].
    #[arg(long, env = "BOOTTORRENT_REPLAY_WINDOW_SECS", value_name = "SECS")]
    pub replay_window_secs: Option<u32>,
    /// Seconds between tracker announces of each peer; peers silent for two intervals are
    /// dropped [default: 60].
    #[arg(long, env = "BOOTTORRENT_ANNOUNCE_INTERVAL_SECS", value_name = "SECS")]
    pub announce_interval_secs: Option<u32>,
    /// Seconds without progress after which a deploying machine is shown as stalled
    /// [default: 300].
    #[arg(long, env = "BOOTTORRENT_STALL_TIMEOUT_SECS", value_name = "SECS")]
    pub stall_timeout_secs: Option<u32>,
    /// Seconds a machine has to come back running the image after a `reboot` deployment
    /// restarted it [default: 900].
    #[arg(long, env = "BOOTTORRENT_REBOOT_TIMEOUT_SECS", value_name = "SECS")]
    pub reboot_timeout_secs: Option<u32>,
}

/// Settings of `boottorrent broker-config`.
#[derive(Debug, Clone, Args)]
pub struct BrokerConfigArgs {
    /// The server's data directory, where the machine CA is kept.
    #[arg(
        long,
        env = "BOOTTORRENT_DATA_DIR",
        default_value = "./data",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,
    /// Directory to write the configuration into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Address mosquitto listens on.
    #[arg(long, default_value = "0.0.0.0:8883", value_name = "ADDR:PORT")]
    pub listen: SocketAddr,
    /// Host name or address agents and the server reach the broker by (its certificate's
    /// names; repeat for several) [default: localhost and the listen address].
    #[arg(long = "name", value_name = "HOST")]
    pub names: Vec<String>,
    /// User mosquitto runs as when started as root (its `user` option), who must be able to
    /// read broker.key [default: mosquitto's own, user mosquitto].
    #[arg(long, value_name = "USER")]
    pub run_as: Option<String>,
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
    /// PEM file of the CA that signed the server's HTTPS certificate (for an https:// server
    /// with a certificate of the site's own CA).
    #[arg(long, env = "BOOTTORRENT_CA_CERT", value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,
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
pub enum ImageCommand {
    /// Add a golden image: a file on the SERVER's disk. The server validates the VHDX
    /// (file identifier, header CRC-32C, region table, metadata), hashes it into a private
    /// torrent and starts seeding it. Shows the import's progress; the same file or the same
    /// content added again is the same image. Needs the admin token.
    Add {
        /// Path of the image on the server (made absolute from the current directory).
        file: std::path::PathBuf,
        /// Name shown in the catalog and used as the torrent's file name [default: the file
        /// name].
        #[arg(long)]
        name: Option<String>,
        /// Import a file that is not a VHDX (a raw disk image, say) without validation.
        #[arg(long)]
        raw: bool,
        /// Return once the import started instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List catalogued images: state, size, info hash, seeder upload.
    List(ClientArgs),
    /// Show everything the server knows about one image, as JSON.
    Show {
        /// Image id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove an image from the catalog and stop seeding it; the file stays on disk. Needs
    /// the admin token.
    Rm {
        /// Image id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum MachinesCommand {
    /// List known machines: online state, last contact, key state, zones, images. Every
    /// machine, or those the filters keep (all of them must hold). The server answers a page
    /// at a time; this follows the pages to the end.
    List {
        #[command(flatten)]
        filter: MachineFilter,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show everything the server knows about one machine.
    Show {
        /// Machine id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Approve a new machine that waits (new machines do, unless the server runs with
    /// auto-approve). Name the key you approve by the fingerprint the agent printed when it
    /// started (`boottorrent-agent` logs it), or the one `machines show ID` lists as
    /// `pending_fingerprint`; a different waiting key is not approved. Or, for a site's first enrolment, approve every machine waiting now with
    /// `--all-waiting` (look at `machines list` first: anyone with the enrollment token can
    /// make a machine wait). Needs the admin token.
    Approve {
        /// Machine id.
        #[arg(required_unless_present = "all_waiting")]
        id: Option<String>,
        /// The key's fingerprint, `SHA256:xxxx:...`.
        #[arg(required_unless_present = "all_waiting")]
        fingerprint: Option<String>,
        /// Approve every machine that waits now, each with the key it presented.
        #[arg(long, conflicts_with_all = ["id", "fingerprint"])]
        all_waiting: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Forget a machine: reject a key that waits for approval, or let a reinstalled machine
    /// (new key, same id) enroll again. The machine's deployment history stays. Needs the
    /// admin token.
    Delete {
        /// Machine id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The server's event log, oldest first: registrations, approvals, machines going online
    /// and offline, boot results, errors agents reported (e.g. `corrupt_peer`: a machine that
    /// served data failing its hash check), zone and deployment changes.
    Log {
        /// How many of the newest entries (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Which machines `machines list` shows; the query of `GET /api/v1/machines`.
#[derive(Debug, Clone, Default, Args, serde::Serialize)]
pub struct MachineFilter {
    /// Members of this zone.
    #[arg(long, value_name = "ZONE", value_parser = parse_id)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Only machines online (true) or offline (false).
    #[arg(long, value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    /// Only machines whose key is `approved`, `pending` (new, waiting for approval) or
    /// `key_changed` (known machine with another key, waiting).
    #[arg(long, value_name = "STATE", value_parser = ["approved", "pending", "key_changed"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_state: Option<String>,
    /// Machines that hold this image (by id), in any state.
    #[arg(long, value_name = "IMAGE", value_parser = parse_id)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Machines that run this image (by id) now.
    #[arg(long, value_name = "IMAGE", value_parser = parse_id)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
    /// Machines per request, 1 to 1000 (the server's default is 500).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1000))]
    #[serde(rename = "limit", skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u16>,
}

/// Arguments of `boottorrent deploy`.
#[derive(Debug, Clone, Args)]
pub struct DeployArgs {
    /// The image: its id, or its name when no other image has that name (`boottorrent image
    /// list` shows both). It must be fully imported.
    #[arg(value_name = "IMAGE")]
    pub image: String,
    #[command(flatten)]
    pub target: DeployTarget,
    /// What each machine does once the image is downloaded and verified.
    #[arg(long, value_enum, default_value_t = DeployAction::Stage)]
    pub action: DeployAction,
    /// What becomes of what a booted machine writes: `keep` (one boot child per image,
    /// surviving reboots and later deployments) or `reset` (a fresh child at every boot, so
    /// each boot starts from the golden image; needs `--action set-boot` or `reboot`).
    #[arg(
        long,
        default_value = "keep",
        value_parser = clap::builder::TypedValueParser::map(
            clap::builder::PossibleValuesParser::new(["keep", "reset"]),
            |word| if word == "reset" { Persistence::Reset } else { Persistence::Keep },
        )
    )]
    pub persistence: Persistence,
    /// Stay and follow the deployment to its end, exactly like `boottorrent status ID --watch`
    /// (same output and exit status).
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Who a deployment is for: exactly one of the three.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct DeployTarget {
    /// Every member of this zone, also machines that join it while the deployment runs
    /// (`boottorrent zones list` shows the zones).
    #[arg(long, value_name = "ZONE", value_parser = parse_id)]
    pub zone: Option<String>,
    /// This machine; repeat the flag for several. Every one must be known to the server
    /// (`boottorrent machines list`).
    #[arg(long = "machine", value_name = "MACHINE", value_parser = parse_id)]
    pub machines: Vec<String>,
    /// Every machine of the fleet, also machines that appear while the deployment runs.
    #[arg(long)]
    pub global: bool,
}

/// What agents do with a verified image (`action` in the API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeployAction {
    /// Keep the image ready on disk; the boot order is left alone. Machines end `staged`.
    Stage,
    /// Also make the image the machine's default boot entry, used from its next restart.
    /// Machines end `booted` once the entry is set.
    #[value(name = "set-boot", alias = "set_boot")]
    SetBoot,
    /// Also boot into the image once, now: the machine restarts. Machines end `booted`.
    Reboot,
}

impl DeployAction {
    /// The action as the API takes it.
    pub fn api_action(self) -> crate::api::Action {
        match self {
            DeployAction::Stage => crate::api::Action::Stage,
            DeployAction::SetBoot => crate::api::Action::SetBoot,
            DeployAction::Reboot => crate::api::Action::Reboot,
        }
    }
}

/// `boottorrent deployments [SUBCOMMAND]`; the flags here serve the bare form (a list).
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DeploymentsArgs {
    #[command(subcommand)]
    pub command: Option<DeploymentsCommand>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum DeploymentsCommand {
    /// List deployments, newest first: image, target, action, state, how many machines are in
    /// each state, creation time.
    List(ClientArgs),
    /// Show one deployment: image, target, action, state, totals, and a line per machine
    /// (state, progress, download rate, error). With --json, the server's JSON.
    Show {
        /// Deployment id (`boottorrent deployments list` shows them).
        #[arg(value_parser = parse_id)]
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a deployment: the agents stop and delete what they fetched for it. Cancelling
    /// twice is harmless. Prints where its machines stood. Needs the admin token.
    Cancel {
        /// Deployment id (`boottorrent deployments list` shows them).
        #[arg(value_parser = parse_id)]
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `boottorrent zones [SUBCOMMAND]`; the flags here serve the bare form (a list).
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ZonesArgs {
    #[command(subcommand)]
    pub command: Option<ZonesCommand>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ZonesCommand {
    /// List zones: where each comes from (config file or API), its member count, its machine
    /// ids, subnets and images.
    List(ClientArgs),
    /// Show one zone: its definition and the machines that are members now.
    Show {
        /// Zone id.
        #[arg(value_parser = parse_id)]
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Create a zone, or replace one (also a zone from the config file) with exactly what is
    /// given here. Give at least one --machine or --subnet. Every member is kept holding each
    /// --image, staged. Prints the zone as saved, with the machines that are members now. Needs
    /// the admin token.
    Set {
        /// Zone id.
        #[arg(value_parser = parse_id)]
        id: String,
        #[command(flatten)]
        members: ZoneMembers,
        /// An image every member should hold (staged): its id, or its name when no other image
        /// has that name. Repeat for several.
        #[arg(long = "image", value_name = "IMAGE")]
        images: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a zone; the deployments of its images are cancelled. A zone from the config file
    /// comes back at the server's next start. Needs the admin token.
    Rm {
        /// Zone id.
        #[arg(value_parser = parse_id)]
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Who is in a zone: at least one machine id or subnet.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = true)]
pub struct ZoneMembers {
    /// A machine that is a member; repeat for several.
    #[arg(long = "machine", value_name = "MACHINE", value_parser = parse_id)]
    pub machines: Vec<String>,
    /// A subnet in CIDR form (10.1.0.0/24): machines reporting an address inside are members.
    /// Repeat for several.
    #[arg(long = "subnet", value_name = "CIDR")]
    pub subnets: Vec<String>,
}

/// Arguments of `boottorrent status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Deployment id [default: the running deployments, or the newest one].
    #[arg(value_name = "DEPLOYMENT", value_parser = parse_id)]
    pub deployment: Option<String>,
    /// Follow live until every shown deployment completed, failed or was cancelled. With
    /// --json the state change lines and the summary go to stderr, and stdout gets only the
    /// final JSON (an object with DEPLOYMENT, else a list).
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Subcommand)]
pub enum TorrentCommand {
    /// Hash one file into a single-file .torrent.
    ///
    /// Reads the file once, hashing its pieces with SHA-1 on every core (or --threads). Unless
    /// --piece-size is given, the piece size is the power of two between 512 KiB and 16 MiB that
    /// gives about 1,000 to 2,000 pieces. The torrent's info dictionary holds only length, name,
    /// piece length, pieces and (with --private) private, so its info hash is the one any
    /// standard creator computes for the same file, name, piece size and private flag.
    ///
    /// Writes FILE.torrent unless -o is given, then prints the info hash, piece size, piece
    /// count and time taken. A progress bar shows on a terminal.
    Create(TorrentCreateArgs),
}

/// Arguments of `boottorrent torrent create`.
#[derive(Debug, Clone, Args)]
pub struct TorrentCreateArgs {
    /// The file to share.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Where to write the torrent; an existing file is replaced [default: FILE.torrent].
    #[arg(short, long, value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Tracker announce URL
    /// [default: <public-url>/announce, or http://127.0.0.1:8080/announce without one].
    #[arg(long, value_name = "URL")]
    pub announce: Option<String>,
    /// URL of the server whose tracker the torrent names when --announce is not given.
    #[arg(long, env = "BOOTTORRENT_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<String>,
    /// Piece size: a power of two from 16 KiB to 64 MiB, in bytes or with a K/M suffix (KiB,
    /// MiB) [default: chosen from the file size].
    #[arg(long, value_name = "BYTES", value_parser = parse_piece_size)]
    pub piece_size: Option<u32>,
    /// Set the private flag (BEP 27): clients get peers only from the tracker, never from DHT
    /// or peer exchange.
    #[arg(long)]
    pub private: bool,
    /// SHA-1 hashing threads; 0 uses every core.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,
    /// Name stored in the torrent, under which downloaders save the file [default: FILE's name].
    #[arg(long)]
    pub name: Option<String>,
}

/// An id as the API takes them (`[A-Za-z0-9._-]{1,64}`), checked here because it goes into a
/// URL path, where `/` or `?` would silently ask for something else.
fn parse_id(text: &str) -> Result<String, String> {
    boottorrent_proto::validate_id(text)
        .map(|()| text.to_owned())
        .map_err(|e| e.to_string())
}

/// A byte count, optionally with a binary suffix: `1048576`, `1024K`, `1M`, `1MiB`.
fn parse_piece_size(text: &str) -> Result<u32, String> {
    let lower = text.trim().to_ascii_lowercase();
    let (digits, unit) = match lower.trim_end_matches("ib").trim_end_matches('b') {
        t if t.ends_with('k') => (&t[..t.len() - 1], 1024),
        t if t.ends_with('m') => (&t[..t.len() - 1], 1024 * 1024),
        t => (t, 1),
    };
    digits
        .trim()
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("{text:?} is not a size in bytes (such as 1048576, 1024K or 1M)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_sizes_parse_with_and_without_suffixes() {
        for (text, bytes) in [
            ("1048576", 1 << 20),
            ("1024K", 1 << 20),
            ("1M", 1 << 20),
            ("1MiB", 1 << 20),
            ("16k", 16 << 10),
            ("4 MB", 4 << 20),
        ] {
            assert_eq!(parse_piece_size(text), Ok(bytes), "{text}");
        }
        for text in ["", "M", "1G", "-1", "1.5M", "8192M"] {
            assert!(parse_piece_size(text).is_err(), "{text}");
        }
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    fn parse(line: &str) -> Result<Command, clap::error::ErrorKind> {
        Cli::try_parse_from(line.split_whitespace())
            .map(|cli| cli.command)
            .map_err(|e| e.kind())
    }

    #[test]
    fn a_deployment_has_exactly_one_target() {
        use clap::error::ErrorKind;
        assert_eq!(
            parse("boottorrent deploy win11").err(),
            Some(ErrorKind::MissingRequiredArgument)
        );
        for line in [
            "boottorrent deploy win11 --zone lab --global",
            "boottorrent deploy win11 --zone lab --machine pc-01",
            "boottorrent deploy win11 --machine pc-01 --global",
        ] {
            assert_eq!(
                parse(line).err(),
                Some(ErrorKind::ArgumentConflict),
                "{line}"
            );
        }
        let Ok(Command::Deploy(args)) =
            parse("boottorrent deploy win11 --machine pc-01 --machine pc-02")
        else {
            panic!("repeated --machine is one target");
        };
        assert_eq!(args.target.machines, ["pc-01", "pc-02"]);
        assert_eq!(args.action, DeployAction::Stage);
        assert!(!args.watch);
        // Ids go into URL paths: a slash would ask for something else.
        assert_eq!(
            parse("boottorrent deploy win11 --zone a/b").err(),
            Some(ErrorKind::ValueValidation)
        );
    }

    #[test]
    fn actions_take_both_spellings_and_send_the_apis() {
        for (flag, api) in [
            ("stage", "stage"),
            ("set-boot", "set_boot"),
            ("set_boot", "set_boot"),
            ("reboot", "reboot"),
        ] {
            let line = format!("boottorrent deploy win11 --global --action {flag} --watch");
            let Ok(Command::Deploy(args)) = parse(&line) else {
                panic!("{line}");
            };
            assert_eq!(serde_json::to_value(args.action.api_action()).unwrap(), api);
            assert!(args.target.global && args.watch);
        }
        assert_eq!(
            parse("boottorrent deploy win11 --global --action boot").err(),
            Some(clap::error::ErrorKind::InvalidValue)
        );
    }

    #[test]
    fn list_is_the_default_subcommand() {
        let Ok(Command::Deployments(args)) = parse("boottorrent deployments --json") else {
            panic!("bare deployments");
        };
        assert!(args.command.is_none() && args.client.json);
        let Ok(Command::Zones(args)) = parse("boottorrent zones") else {
            panic!("bare zones");
        };
        assert!(args.command.is_none());
        assert!(matches!(
            parse("boottorrent deployments cancel d-1 --token t"),
            Ok(Command::Deployments(DeploymentsArgs {
                command: Some(DeploymentsCommand::Cancel { .. }),
                ..
            }))
        ));
    }

    #[test]
    fn a_zone_needs_a_machine_or_a_subnet() {
        use clap::error::ErrorKind;
        for line in [
            "boottorrent zones set lab",
            "boottorrent zones set lab --image win11",
        ] {
            assert_eq!(
                parse(line).err(),
                Some(ErrorKind::MissingRequiredArgument),
                "{line}"
            );
        }
        let Ok(Command::Zones(ZonesArgs {
            command: Some(ZonesCommand::Set {
                members, images, ..
            }),
            ..
        })) = parse("boottorrent zones set lab --subnet 10.1.0.0/24 --machine pc-01 --image a")
        else {
            panic!("zones set");
        };
        assert_eq!(members.subnets, ["10.1.0.0/24"]);
        assert_eq!(members.machines, ["pc-01"]);
        assert_eq!(images, ["a"]);
    }

    #[test]
    fn status_takes_an_optional_deployment() {
        let Ok(Command::Status(args)) = parse("boottorrent status") else {
            panic!("bare status");
        };
        assert!(args.deployment.is_none() && !args.watch);
        let Ok(Command::Status(args)) = parse("boottorrent status d-1 --watch") else {
            panic!("status d-1 --watch");
        };
        assert_eq!(args.deployment.as_deref(), Some("d-1"));
        assert!(args.watch);
    }
}
