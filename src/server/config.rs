//! Server configuration: defaults < TOML file < `BOOTTORRENT_*` environment < flags.
//!
//! clap merges environment and flags (both land in [`crate::cli::args::ServeArgs`]); this module
//! owns the defaults and the file, merges the three, and validates the result once.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::cli::args::ServeArgs;

/// Everything `boottorrent serve` needs to run. Built by [`Config::load`].
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory for the database, tokens and the server key. Created if missing.
    pub data_dir: PathBuf,
    /// Plain MQTT listener for agents and operator tools.
    pub mqtt_listen: SocketAddr,
    /// MQTT over TLS listener; only opened when `tls_cert` and `tls_key` are set.
    pub mqtts_listen: SocketAddr,
    /// HTTPS listener (the same API and dashboard): only opened when `tls_cert` and `tls_key`
    /// are set, and then the API takes tokens only there.
    pub https_listen: SocketAddr,
    /// HTTP listener: REST API, tracker, dashboard, metrics.
    pub http_listen: SocketAddr,
    /// BitTorrent listener of the server's seeder.
    pub bt_listen: SocketAddr,
    /// The seeder accepts only encrypted peer connections (message stream encryption with
    /// RC4) and refuses plaintext ones. For networks that throttle or block recognisable
    /// BitTorrent; it obfuscates, it does not authenticate. Agents must then require it too
    /// (the agent's `bt_require_encryption`), or the seeder refuses them.
    pub bt_require_encryption: bool,
    /// URL agents and peers use to reach the HTTP listener (goes into `.torrent` files and
    /// commands). Default: `http://<http_listen>` with `0.0.0.0` replaced by this host's name.
    pub public_url: Option<String>,
    /// PEM certificate chain for the MQTT TLS listener.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for the MQTT TLS listener.
    pub tls_key: Option<PathBuf>,
    /// rumqttd configuration file replacing the embedded `broker.toml`.
    pub broker_config: Option<PathBuf>,
    /// An existing MQTT broker to use instead of the embedded one (`mqtt://host:port` or
    /// `mqtts://host:port`): past what one appliance carries (about 10,000 agents), or where
    /// the site runs a broker already. The MQTT listeners are then not opened; the broker's
    /// ACL keeps each agent to its own topics (`boottorrent broker-config` writes one).
    pub broker: Option<crate::server::external_broker::BrokerUrl>,
    /// PEM certificate of the CA that signed the external broker's TLS certificate.
    /// Default: the server's machine CA (`<data_dir>/machine-ca.crt`), which signs the
    /// broker certificate `boottorrent broker-config` writes.
    pub broker_ca: Option<PathBuf>,
    /// PEM client certificate and key the server logs in to the external broker with.
    /// Default over mqtts without `broker_username`: a certificate of the machine CA for
    /// the orchestrator's reserved id, made in the data directory.
    pub broker_cert: Option<PathBuf>,
    pub broker_key: Option<PathBuf>,
    /// Username and password for the external broker, where it takes those instead of a
    /// certificate.
    pub broker_username: Option<String>,
    pub broker_password: Option<Secret>,
    /// Password agents use on MQTT (username = their machine id). Generated into
    /// `<data_dir>/enroll.token` when unset.
    pub enroll_token: Option<Secret>,
    /// Token of the operator: MQTT password of user `admin` and HTTP bearer token. Generated
    /// into `<data_dir>/admin.token` when unset.
    pub admin_token: Option<Secret>,
    /// Read-only HTTP bearer token (dashboards on a wall, monitoring): reads the API and the
    /// event stream, changes nothing. Generated into `<data_dir>/viewer.token` when unset.
    pub viewer_token: Option<Secret>,
    /// Bearer token `GET /metrics` requires when set (the admin and viewer tokens are
    /// accepted too). Unset: `/metrics` is open, as Prometheus scrapers expect by default.
    pub metrics_token: Option<Secret>,
    /// Seconds an HTTP client gets to send a request's headers; hyper starts this clock
    /// whenever it waits for a request, so it is also how long an idle keep-alive connection
    /// is kept. Bounds slowloris and idle connections.
    pub http_header_timeout_secs: u32,
    /// Seconds a response may wait to be written without a byte going out before the
    /// connection is closed: a client that stops reading (an event stream nobody reads) is
    /// dropped instead of holding buffers.
    pub http_write_timeout_secs: u32,
    /// Most HTTP connections open at once; connections over it are closed as soon as they
    /// are accepted.
    pub http_max_connections: u32,
    /// Most peers one source address may hold in one torrent's tracker peer list, so that one
    /// host inventing peer ids cannot fill the list (10,000) and lock real machines out.
    pub tracker_max_peers_per_address: u32,
    /// Register machines on their first signed `startup` (trust on first use). Off by
    /// default: the enrollment token is in every golden image, so with it on anyone in the
    /// lab adds machines that join global and zone deployments and get their images. When
    /// false, new machines wait for `boottorrent machines approve` (`--all-waiting` for a
    /// site's first enrolment).
    pub auto_approve: bool,
    /// New machine ids admitted per minute (also the burst). The enrollment token is in every
    /// golden image, so this bounds how fast anyone can add made-up machines; real agents
    /// over the limit retry by themselves.
    pub enroll_per_minute: u32,
    /// Most machines waiting for approval at once (with `auto_approve = false`).
    pub max_pending_machines: u32,
    /// Seconds between agent heartbeats; three missed intervals mark a machine offline.
    pub heartbeat_interval_secs: u32,
    /// Seconds an envelope's timestamp may differ from the server's clock before it is
    /// dropped as stale (or from the future).
    pub replay_window_secs: u32,
    /// Seconds between a peer's tracker announces (`interval`); `min interval` is half of
    /// it, and peers silent for two intervals are forgotten.
    pub announce_interval_secs: u32,
    /// Seconds without progress after which a deploying machine is shown `stalled`.
    pub stall_timeout_secs: u32,
    /// Seconds a machine has to come back running the image after a `reboot` deployment's
    /// boot step; then it is `failed` ("did not come back").
    pub reboot_timeout_secs: u32,
    /// Zones defined in the file (`[[zones]]`); the API can add more and replace these.
    pub zones: Vec<crate::server::zone::ConfigZone>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./data"),
            mqtt_listen: ([0, 0, 0, 0], 1883).into(),
            mqtts_listen: ([0, 0, 0, 0], 8883).into(),
            https_listen: ([0, 0, 0, 0], 8443).into(),
            http_listen: ([0, 0, 0, 0], 8080).into(),
            bt_listen: ([0, 0, 0, 0], 6881).into(),
            bt_require_encryption: false,
            public_url: None,
            tls_cert: None,
            tls_key: None,
            broker_config: None,
            broker: None,
            broker_ca: None,
            broker_cert: None,
            broker_key: None,
            broker_username: None,
            broker_password: None,
            enroll_token: None,
            admin_token: None,
            viewer_token: None,
            metrics_token: None,
            http_header_timeout_secs: 10,
            http_write_timeout_secs: 30,
            http_max_connections: 4096,
            tracker_max_peers_per_address: 64,
            auto_approve: false,
            enroll_per_minute: 1000,
            max_pending_machines: 10_000,
            heartbeat_interval_secs: 30,
            replay_window_secs: 300,
            announce_interval_secs: 60,
            stall_timeout_secs: 300,
            reboot_timeout_secs: 900,
            zones: Vec::new(),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Spelled out so that adding a field forces a decision here; tokens print as
        // `Secret(..)` through their own Debug.
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field("mqtt_listen", &self.mqtt_listen)
            .field("mqtts_listen", &self.mqtts_listen)
            .field("https_listen", &self.https_listen)
            .field("http_listen", &self.http_listen)
            .field("bt_listen", &self.bt_listen)
            .field("bt_require_encryption", &self.bt_require_encryption)
            .field("public_url", &self.public_url)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("broker_config", &self.broker_config)
            .field("broker", &self.broker)
            .field("broker_ca", &self.broker_ca)
            .field("broker_cert", &self.broker_cert)
            .field("broker_key", &self.broker_key)
            .field("broker_username", &self.broker_username)
            .field("broker_password", &self.broker_password)
            .field("enroll_token", &self.enroll_token)
            .field("admin_token", &self.admin_token)
            .field("viewer_token", &self.viewer_token)
            .field("metrics_token", &self.metrics_token)
            .field("http_header_timeout_secs", &self.http_header_timeout_secs)
            .field("http_write_timeout_secs", &self.http_write_timeout_secs)
            .field("http_max_connections", &self.http_max_connections)
            .field(
                "tracker_max_peers_per_address",
                &self.tracker_max_peers_per_address,
            )
            .field("auto_approve", &self.auto_approve)
            .field("enroll_per_minute", &self.enroll_per_minute)
            .field("max_pending_machines", &self.max_pending_machines)
            .field("heartbeat_interval_secs", &self.heartbeat_interval_secs)
            .field("replay_window_secs", &self.replay_window_secs)
            .field("announce_interval_secs", &self.announce_interval_secs)
            .field("stall_timeout_secs", &self.stall_timeout_secs)
            .field("reboot_timeout_secs", &self.reboot_timeout_secs)
            .field("zones", &self.zones)
            .finish()
    }
}

pub use boottorrent_proto::Secret;

/// Refuses tokens that are too short to resist guessing or that could not be typed in a
/// header or on a command line.
pub fn validate_token(token: &Secret, what: &str) -> anyhow::Result<()> {
    let t = token.expose();
    if t.len() < 16 {
        bail!("{what} is {} characters long; use at least 16", t.len());
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("{what} must be printable ASCII without spaces");
    }
    Ok(())
}

impl Config {
    /// Merges defaults, the config file (if `--config` names one) and the command line
    /// (flags, or their `BOOTTORRENT_*` variables), then validates the result.
    pub fn load(args: &ServeArgs) -> anyhow::Result<Config> {
        let mut config = match &args.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        config.apply(args);
        config.validate()?;
        Ok(config)
    }

    /// Reads a TOML config file; unknown keys are errors so that typos do not pass silently.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }

    fn apply(&mut self, args: &ServeArgs) {
        fn set<T: Clone>(slot: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *slot = v.clone();
            }
        }
        fn set_opt<T: Clone>(slot: &mut Option<T>, value: &Option<T>) {
            if value.is_some() {
                *slot = value.clone();
            }
        }
        set(&mut self.data_dir, &args.data_dir);
        set(&mut self.mqtt_listen, &args.mqtt_listen);
        set(&mut self.mqtts_listen, &args.mqtts_listen);
        set(&mut self.https_listen, &args.https_listen);
        set(&mut self.http_listen, &args.http_listen);
        set(&mut self.bt_listen, &args.bt_listen);
        set(&mut self.bt_require_encryption, &args.bt_require_encryption);
        set_opt(&mut self.public_url, &args.public_url);
        set_opt(&mut self.tls_cert, &args.tls_cert);
        set_opt(&mut self.tls_key, &args.tls_key);
        set_opt(&mut self.broker_config, &args.broker_config);
        set_opt(&mut self.broker, &args.broker);
        set_opt(&mut self.broker_ca, &args.broker_ca);
        set_opt(&mut self.broker_cert, &args.broker_cert);
        set_opt(&mut self.broker_key, &args.broker_key);
        set_opt(&mut self.broker_username, &args.broker_username);
        set_opt(
            &mut self.broker_password,
            &args.broker_password.clone().map(Secret::new),
        );
        set_opt(
            &mut self.enroll_token,
            &args.enroll_token.clone().map(Secret::new),
        );
        set_opt(
            &mut self.admin_token,
            &args.admin_token.clone().map(Secret::new),
        );
        set_opt(
            &mut self.viewer_token,
            &args.viewer_token.clone().map(Secret::new),
        );
        set_opt(
            &mut self.metrics_token,
            &args.metrics_token.clone().map(Secret::new),
        );
        set(
            &mut self.http_header_timeout_secs,
            &args.http_header_timeout_secs,
        );
        set(
            &mut self.http_write_timeout_secs,
            &args.http_write_timeout_secs,
        );
        set(&mut self.http_max_connections, &args.http_max_connections);
        set(
            &mut self.tracker_max_peers_per_address,
            &args.tracker_max_peers_per_address,
        );
        set(&mut self.auto_approve, &args.auto_approve);
        set(&mut self.enroll_per_minute, &args.enroll_per_minute);
        set(&mut self.max_pending_machines, &args.max_pending_machines);
        set(
            &mut self.heartbeat_interval_secs,
            &args.heartbeat_interval_secs,
        );
        set(&mut self.replay_window_secs, &args.replay_window_secs);
        set(
            &mut self.announce_interval_secs,
            &args.announce_interval_secs,
        );
        set(&mut self.stall_timeout_secs, &args.stall_timeout_secs);
        set(&mut self.reboot_timeout_secs, &args.reboot_timeout_secs);
    }

    /// Checks what serde cannot: pairs of settings that only make sense together, ranges.
    pub fn validate(&self) -> anyhow::Result<()> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => bail!("tls_cert is set but tls_key is not; set both or neither"),
            (None, Some(_)) => bail!("tls_key is set but tls_cert is not; set both or neither"),
            _ => {}
        }
        match (&self.broker_cert, &self.broker_key) {
            (Some(_), None) => {
                bail!("broker_cert is set but broker_key is not; set both or neither")
            }
            (None, Some(_)) => {
                bail!("broker_key is set but broker_cert is not; set both or neither")
            }
            _ => {}
        }
        if self.broker_username.is_some() != self.broker_password.is_some() {
            bail!("broker_username and broker_password go together; set both or neither");
        }
        if self.broker.is_none()
            && (self.broker_ca.is_some()
                || self.broker_cert.is_some()
                || self.broker_username.is_some())
        {
            bail!(
                "broker_ca, broker_cert/broker_key and broker_username are for an external \
                 broker; set broker = \"mqtts://host:port\" too, or remove them"
            );
        }
        if let Some(broker) = &self.broker
            && !broker.tls
            && (self.broker_ca.is_some() || self.broker_cert.is_some())
        {
            bail!("broker {broker} is plain MQTT; use mqtts:// with broker_ca and broker_cert");
        }
        if let Some(url) = &self.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            bail!("public_url {url:?} must start with http:// or https://");
        }
        if self.heartbeat_interval_secs == 0 {
            bail!("heartbeat_interval_secs must be at least 1");
        }
        if self.enroll_per_minute == 0 {
            bail!("enroll_per_minute must be at least 1, or no new machine could ever join");
        }
        if self.replay_window_secs == 0 {
            bail!("replay_window_secs must be at least 1");
        }
        if self.stall_timeout_secs < 10 {
            bail!(
                "stall_timeout_secs is {}; use at least 10 seconds (agents report every 1.5 s)",
                self.stall_timeout_secs
            );
        }
        if self.reboot_timeout_secs < 5 {
            bail!(
                "reboot_timeout_secs is {}; use at least 5 seconds (and more than a machine takes \
                 to restart and start the agent: the default is 900)",
                self.reboot_timeout_secs
            );
        }
        let mut seen = std::collections::HashSet::new();
        for zone in &self.zones {
            if !seen.insert(&zone.id) {
                bail!("zone {} is defined twice in [[zones]]", zone.id);
            }
            zone.to_zone()
                .map_err(|e| anyhow::anyhow!("[[zones]]: {e}"))?;
        }
        if !(10..=3600).contains(&self.announce_interval_secs) {
            bail!(
                "announce_interval_secs is {}; use 10 to 3600 seconds",
                self.announce_interval_secs
            );
        }
        if let Some(t) = &self.enroll_token {
            validate_token(t, "enroll_token")?;
        }
        if let Some(t) = &self.admin_token {
            validate_token(t, "admin_token")?;
        }
        if let Some(t) = &self.viewer_token {
            validate_token(t, "viewer_token")?;
        }
        if let Some(t) = &self.metrics_token {
            validate_token(t, "metrics_token")?;
        }
        for (name, value, range) in [
            (
                "http_header_timeout_secs",
                self.http_header_timeout_secs,
                1..=600,
            ),
            (
                "http_write_timeout_secs",
                self.http_write_timeout_secs,
                1..=3600,
            ),
            (
                "http_max_connections",
                self.http_max_connections,
                1..=1_000_000,
            ),
            (
                "tracker_max_peers_per_address",
                self.tracker_max_peers_per_address,
                1..=10_000,
            ),
        ] {
            if !range.contains(&value) {
                bail!(
                    "{name} is {value}; use {} to {}",
                    range.start(),
                    range.end()
                );
            }
        }
        Ok(())
    }

    /// The URL agents and peers use for HTTP, without a trailing slash.
    pub fn public_url(&self) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => {
                let port = self.http_listen.port();
                let host = if self.http_listen.ip().is_unspecified() {
                    boottorrent_proto::hostname().unwrap_or_else(|| "127.0.0.1".to_owned())
                } else {
                    self.http_listen.ip().to_string()
                };
                format!("http://{host}:{port}")
            }
        }
    }

    /// Where operators reach the HTTPS listener, when TLS is configured: the host of the
    /// public URL with the HTTPS port.
    pub fn https_url(&self) -> Option<String> {
        self.tls_cert.as_ref()?;
        let public = self.public_url();
        let rest = public.split_once("://").map_or(public.as_str(), |(_, r)| r);
        let authority = rest.split('/').next().unwrap_or(rest);
        // `[v6]:port`, `host:port` or `host`.
        let host = match authority.rfind(':') {
            Some(i) if !authority[i..].contains(']') => &authority[..i],
            _ => authority,
        };
        Some(format!("https://{host}:{}", self.https_listen.port()))
    }

    /// The default configuration as commented TOML, for `boottorrent config`.
    pub fn default_toml() -> String {
        DEFAULT_CONFIG_TOML.to_owned()
    }
}

/// Commented default configuration; a test checks that it parses to `Config::default()`.
const DEFAULT_CONFIG_TOML: &str = r#"# BootTorrent server configuration (boottorrent serve --config FILE).
# Every key is optional; environment variables BOOTTORRENT_<KEY> and flags override the file.

# Directory for the database, tokens and the server key.
data_dir = "./data"
# MQTT listener for agents and operator tools.
mqtt_listen = "0.0.0.0:1883"
# MQTT over TLS; opened only when tls_cert and tls_key are set.
mqtts_listen = "0.0.0.0:8883"
# HTTPS listener (API and dashboard), opened with tls_cert and tls_key; tokens are then
# accepted only there, never in clear.
https_listen = "0.0.0.0:8443"
# HTTP: REST API, tracker, dashboard, metrics.
http_listen = "0.0.0.0:8080"
# BitTorrent listener of the server's seeder.
bt_listen = "0.0.0.0:6881"
# Accept only encrypted peer connections (MSE, RC4) at the seeder, refusing plaintext ones:
# for networks that throttle BitTorrent. Agents must set it too, or they are refused.
bt_require_encryption = false
# URL agents and peers use to reach HTTP (default: http://<this host>:<http port>).
# public_url = "http://boottorrent.lab.example:8080"
# PEM certificate chain and private key for the MQTT TLS listener.
# tls_cert = "/etc/boottorrent/server.crt"
# tls_key = "/etc/boottorrent/server.key"
# rumqttd configuration replacing the embedded broker.toml.
# broker_config = "/etc/boottorrent/broker.toml"
# An existing MQTT broker instead of the embedded one (past ~10,000 agents, or where the site
# runs one): the MQTT listeners are not opened, and the broker's ACL keeps each agent to its
# own topics (`boottorrent broker-config` writes a mosquitto configuration for it).
# broker = "mqtts://broker.lab.example:8883"
# CA of the broker's TLS certificate (default: <data_dir>/machine-ca.crt, the machine CA).
# broker_ca = "/etc/boottorrent/broker-ca.crt"
# Client certificate and key for the broker (default over mqtts: one of the machine CA for
# the orchestrator, made in <data_dir>), or a username and password instead.
# broker_cert = "/etc/boottorrent/orchestrator.crt"
# broker_key = "/etc/boottorrent/orchestrator.key"
# broker_username = "boottorrent-orchestrator"
# broker_password = "..."
# Agents' MQTT password (username = machine id); generated into <data_dir>/enroll.token if unset.
# enroll_token = "..."
# Operator token: MQTT password of user "admin" and HTTP bearer token; generated into
# <data_dir>/admin.token if unset.
# admin_token = "..."
# Read-only HTTP token (wall displays, monitoring): reads the API and event stream, changes
# nothing; generated into <data_dir>/viewer.token if unset.
# viewer_token = "..."
# When set, GET /metrics requires this bearer token (or the admin or viewer token).
# metrics_token = "..."
# Seconds a client gets to send a request's headers; also how long an idle keep-alive HTTP
# connection is kept.
http_header_timeout_secs = 10
# Seconds a response may wait without a byte written before the connection is closed (a
# client that stopped reading, e.g. an unread event stream).
http_write_timeout_secs = 30
# Most HTTP connections open at once; more are closed when accepted.
http_max_connections = 4096
# Most peers one source address may hold in one torrent's tracker peer list.
tracker_max_peers_per_address = 64
# Register machines on their first signed startup (trust on first use). Off: anyone holding
# the enrollment token (every golden image has it) could add machines that get images; new
# machines wait for `boottorrent machines approve` (`--all-waiting` for a first enrolment).
auto_approve = false
# New machine ids admitted per minute; anyone with the enrollment token can make ids up.
enroll_per_minute = 1000
# Most machines waiting for approval at once (auto_approve = false).
max_pending_machines = 10000
# Seconds between agent heartbeats; three missed intervals mark a machine offline.
# Past 3,000 machines the server lengthens it in 30 s steps (at most 100 heartbeats a second).
heartbeat_interval_secs = 30
# Seconds an envelope's timestamp may differ from the server clock.
replay_window_secs = 300
# Seconds between tracker announces of each peer; peers silent for two intervals are dropped.
announce_interval_secs = 60
# Seconds without progress after which a deploying machine is shown as stalled.
stall_timeout_secs = 300
# Seconds a machine has to come back running the image after a `reboot` deployment restarted
# it (its agent's startup says what runs); then it is failed: "did not come back".
reboot_timeout_secs = 900

# Zones: machines by id and/or by subnet (CIDR). The API (boottorrent zones set ...) can add
# zones, replace these, and give a zone images every member should hold (--image).
# [[zones]]
# id = "room-101"
# subnets = ["10.1.1.0/24"]
# machines = ["pc-101-01"]
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn serve_args(argv: &[&str]) -> ServeArgs {
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: ServeArgs,
        }
        let mut full = vec!["serve"];
        full.extend_from_slice(argv);
        Wrapper::parse_from(full).args
    }

    #[test]
    fn new_machines_wait_for_approval_by_default() {
        // The enrollment token is in every golden image: trusting first contact must be a
        // site's choice, not the default.
        assert!(!Config::default().auto_approve);
        assert!(!Config::load(&serve_args(&[])).unwrap().auto_approve);
    }

    #[test]
    fn commented_default_parses_to_default() {
        let parsed: Config = toml::from_str(DEFAULT_CONFIG_TOML).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn zones_in_the_file_are_checked_where_they_enter() {
        let good: Config = toml::from_str(
            "[[zones]]\nid = \"room-101\"\nsubnets = [\"10.1.1.0/24\"]\n\n[[zones]]\nid = \"lab\"\nmachines = [\"pc-01\"]\n",
        )
        .unwrap();
        good.validate().unwrap();
        assert_eq!(good.zones.len(), 2);
        assert_eq!(good.zones[0].subnets[0].to_string(), "10.1.1.0/24");

        let twice: Config =
            toml::from_str("[[zones]]\nid = \"a\"\nmachines = [\"x\"]\n[[zones]]\nid = \"a\"\nmachines = [\"y\"]\n")
                .unwrap();
        let err = twice.validate().unwrap_err().to_string();
        assert!(err.contains("zone a is defined twice"), "{err}");
        let empty: Config = toml::from_str("[[zones]]\nid = \"a\"\n").unwrap();
        let err = empty.validate().unwrap_err().to_string();
        assert!(err.contains("neither machines nor subnets"), "{err}");
        for bad in [
            "[[zones]]\nid = \"a b\"\nmachines = [\"x\"]\n",
            "[[zones]]\nid = \"a\"\nsubnets = [\"10.1.1.1/24\"]\n",
            "[[zones]]\nid = \"a\"\nmachines = [\"x\"]\ncolour = \"red\"\n",
            "[[zones]]\nid = \"a\"\nmachines = [\"x\"]\nimages = [\"img\"]\n",
        ] {
            assert!(toml::from_str::<Config>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "data_dir = \"/srv/bt\"\nmqtt_listen = \"127.0.0.1:2000\"\nauto_approve = true\n",
        )
        .unwrap();
        let args = serve_args(&[
            "--config",
            file.to_str().unwrap(),
            "--mqtt-listen",
            "127.0.0.1:3000",
        ]);
        let config = Config::load(&args).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/srv/bt"));
        assert_eq!(config.mqtt_listen, "127.0.0.1:3000".parse().unwrap());
        assert!(config.auto_approve, "the file's, over the default (off)");
        assert_eq!(config.http_listen, Config::default().http_listen);
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "mqtt_listn = \"127.0.0.1:2000\"\n").unwrap();
        let err = Config::from_file(&file).unwrap_err();
        assert!(format!("{err:#}").contains("mqtt_listn"), "{err:#}");
    }

    #[test]
    fn half_a_tls_pair_is_refused() {
        let args = serve_args(&["--tls-cert", "/tmp/c.pem"]);
        let err = Config::load(&args).unwrap_err();
        assert!(err.to_string().contains("tls_key"), "{err}");
    }

    #[test]
    fn external_broker_settings_are_checked_together() {
        let config = Config::load(&serve_args(&["--broker", "mqtts://broker.lab"])).unwrap();
        let broker = config.broker.unwrap();
        assert_eq!((broker.tls, broker.port), (true, 8883));
        let file: Config = toml::from_str("broker = \"mqtt://b:1\"").unwrap();
        assert_eq!(file.broker.unwrap().to_string(), "mqtt://b:1");
        assert!(toml::from_str::<Config>("broker = \"tcp://b\"").is_err());
        for (argv, says) in [
            (&["--broker-ca", "/tmp/ca.pem"][..], "external"),
            (
                &["--broker", "mqtt://b", "--broker-cert", "/tmp/c.pem"][..],
                "broker_key",
            ),
            (
                &["--broker", "mqtt://b", "--broker-username", "u"][..],
                "broker_password",
            ),
            (
                &["--broker", "mqtt://b", "--broker-ca", "/tmp/ca"][..],
                "mqtts://",
            ),
        ] {
            let err = Config::load(&serve_args(argv)).unwrap_err().to_string();
            assert!(err.contains(says), "{argv:?}: {err}");
        }
    }

    #[test]
    fn short_tokens_are_refused_and_hidden_from_debug() {
        let args = serve_args(&["--admin-token", "short"]);
        assert!(Config::load(&args).is_err());
        let config = Config {
            admin_token: Some(Secret::new("a-very-secret-admin-token".into())),
            ..Config::default()
        };
        assert!(!format!("{config:?}").contains("a-very-secret"));
    }
}
