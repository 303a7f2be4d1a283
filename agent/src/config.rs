//! Agent configuration: defaults < TOML file < `BOOTTORRENT_AGENT_*` environment < flags.
//!
//! clap merges the environment and the flags into [`Overrides`]; this module owns the
//! defaults and the file, merges the three, and validates the result once ([`Config::load`]).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use boottorrent_proto::{MachineId, PublicKeyBytes, verifying_key_from_bytes};
use serde::{Deserialize, Serialize};

pub use crate::zone::ZoneSetting;

/// Name of the machine's private key file in the data directory.
pub const KEY_FILE: &str = "agent.key";
/// Name of the pinned server public key file in the data directory (written by `enroll`).
pub const SERVER_KEY_FILE: &str = "server.pub";

/// Everything the agent runs with. Built by [`Config::load`].
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Host name or IP address of the BootTorrent server, for MQTT and (by default) HTTP.
    /// Required by `run`.
    pub server: Option<String>,
    /// MQTT port of the server. Default: 1883, or 8883 when `tls_ca` is set or `broker_login`
    /// is `certificate`.
    pub mqtt_port: Option<u16>,
    /// Base URL of the server's HTTP API and tracker. Default: `http://<server>:8080`.
    pub http_url: Option<String>,
    /// PEM file with the certificate authority that signed the broker's certificate; when
    /// set, MQTT runs over TLS.
    pub tls_ca: Option<PathBuf>,
    /// The server's enrollment token: the MQTT password (the username is the machine id).
    pub enroll_token: Option<Secret>,
    /// How the agent logs in to the broker: `password` (the server's embedded broker checks
    /// a proof by the machine key with the token), or `certificate` (a server run with
    /// `--broker` against an existing broker: the agent gets a certificate for its own key
    /// from the server's HTTP API, keeps it in its store, renews it at half its life, and
    /// logs in over TLS with it; `tls_ca` is then the broker's CA, by default the CA that
    /// signed the certificate).
    pub broker_login: BrokerLogin,
    /// This machine's id, `[A-Za-z0-9._-]{1,64}`. Default: the id in the machine's store, and
    /// for a new store the host name with every other character replaced by `-`, cut to 64
    /// characters.
    pub machine_id: Option<MachineId>,
    /// The machine's store ([`crate::store`]): the machine key (`agent.key`), the pinned
    /// server key (`server.pub`), assignments, images and resume records. Created if missing.
    /// Default: `/var/lib/boottorrent`; on Windows `X:\BootTorrent` on whichever fixed volume
    /// has one, so that every image the machine boots finds it.
    pub data_dir: Option<PathBuf>,
    /// Address the BitTorrent peer listens on for other machines.
    pub bt_listen: SocketAddr,
    /// Peer connections are encrypted (message stream encryption, RC4) both ways: this
    /// machine dials with it and refuses plaintext. Set it on every agent when the server
    /// sets its `bt_require_encryption`, whose seeder refuses plaintext.
    pub bt_require_encryption: bool,
    /// Which peers are this machine's zone, preferred for downloads and upload slots so that
    /// a lab's traffic stays on its switch: `auto` (the network of the interface the server
    /// is reached through), `off`, or networks, `10.1.2.0/24,10.1.3.0/24`.
    pub bt_zone: ZoneSetting,
    /// What happens after an image is staged and its action asks to boot it.
    pub boot_backend: BootBackend,
    /// Program the `command` backend runs (it gets `BOOTTORRENT_IMAGE_PATH` and friends in its
    /// environment).
    pub boot_command: Option<PathBuf>,
    /// With the `command` backend: a file inside the running system that holds the id of the
    /// image it was booted from (one line), written there by the site's boot program or built
    /// into the image. Read at every start to tell the server which image runs; a missing
    /// file means none that BootTorrent booted. Unset: the agent reports none.
    pub running_image_file: Option<PathBuf>,
    /// Download cap in bytes per second; unset for none. The server's
    /// `machine_configuration` may lower it.
    pub download_limit_bps: Option<u64>,
    /// Upload cap in bytes per second; unset for none. The server's `machine_configuration`
    /// may lower it.
    pub upload_limit_bps: Option<u64>,
    /// Bytes to keep free on the data disk beyond an image; an assignment that would eat into
    /// it is refused with an `error` event instead of filling the disk.
    pub disk_reserve_bytes: u64,
    /// Seconds between heartbeats until the server's `machine_configuration` says otherwise.
    pub heartbeat_interval_secs: u32,
    /// Seconds between MQTT keepalive pings; the broker publishes the agent's last will
    /// (`offline`) after 1.5 times this without a packet.
    pub mqtt_keepalive_secs: u16,
    /// Seconds a command's timestamp may differ from this machine's clock before it is
    /// ignored as stale (or from the future).
    pub replay_window_secs: u32,
    /// The server's Ed25519 public key, 64 hex digits. Default: the key `enroll` stored in
    /// `<data_dir>/server.pub`.
    pub server_key: Option<PublicKeyBytes>,
    /// The directory of the configuration file in use (or of the default one when there is
    /// none): the agent's own directory inside the running image. Not a setting.
    #[serde(skip)]
    pub config_dir: Option<PathBuf>,
}

/// How the agent logs in to the broker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BrokerLogin {
    /// Username = machine id, password = a proof by the machine key and the enrollment token.
    #[default]
    Password,
    /// A client certificate of the server's machine CA for the machine's own key, over TLS.
    Certificate,
}

/// Which boot backend runs after staging.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BootBackend {
    /// Only stage images; never touch the boot configuration.
    None,
    /// Run `boot_command` with the image in its environment (Linux sites: grub-reboot, kexec).
    Command,
    /// Add a native VHD boot entry with `bcdedit`.
    Windows,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: None,
            mqtt_port: None,
            http_url: None,
            tls_ca: None,
            enroll_token: None,
            broker_login: BrokerLogin::Password,
            machine_id: None,
            data_dir: None,
            bt_listen: ([0, 0, 0, 0], 6881).into(),
            bt_require_encryption: false,
            bt_zone: ZoneSetting::Auto,
            boot_backend: if cfg!(windows) {
                BootBackend::Windows
            } else {
                BootBackend::None
            },
            boot_command: None,
            running_image_file: None,
            download_limit_bps: None,
            upload_limit_bps: None,
            disk_reserve_bytes: 256 << 20,
            heartbeat_interval_secs: 10,
            mqtt_keepalive_secs: 30,
            replay_window_secs: 300,
            server_key: None,
            config_dir: None,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Spelled out so that adding a field forces a decision here; the token prints as
        // `Secret(..)`.
        f.debug_struct("Config")
            .field("server", &self.server)
            .field("mqtt_port", &self.mqtt_port)
            .field("http_url", &self.http_url)
            .field("tls_ca", &self.tls_ca)
            .field("enroll_token", &self.enroll_token)
            .field("broker_login", &self.broker_login)
            .field("machine_id", &self.machine_id)
            .field("data_dir", &self.data_dir)
            .field("bt_listen", &self.bt_listen)
            .field("bt_require_encryption", &self.bt_require_encryption)
            .field("bt_zone", &self.bt_zone)
            .field("boot_backend", &self.boot_backend)
            .field("boot_command", &self.boot_command)
            .field("running_image_file", &self.running_image_file)
            .field("download_limit_bps", &self.download_limit_bps)
            .field("upload_limit_bps", &self.upload_limit_bps)
            .field("disk_reserve_bytes", &self.disk_reserve_bytes)
            .field("heartbeat_interval_secs", &self.heartbeat_interval_secs)
            .field("mqtt_keepalive_secs", &self.mqtt_keepalive_secs)
            .field("replay_window_secs", &self.replay_window_secs)
            .field("server_key", &self.server_key)
            .field("config_dir", &self.config_dir)
            .finish()
    }
}

pub use boottorrent_proto::Secret;

/// Settings from the environment and the command line; clap fills each from its flag or,
/// failing that, its `BOOTTORRENT_AGENT_*` variable.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// TOML configuration file [default: /etc/boottorrent/agent.toml on Linux,
    /// %ProgramData%\BootTorrent\agent.toml on Windows; a missing default file is fine].
    #[arg(long, env = "BOOTTORRENT_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// BootTorrent server host (MQTT and HTTP).
    #[arg(long, env = "BOOTTORRENT_AGENT_SERVER", value_name = "HOST")]
    pub server: Option<String>,
    /// MQTT port of the server [default: 1883, or 8883 with --tls-ca].
    #[arg(long, env = "BOOTTORRENT_AGENT_MQTT_PORT", value_name = "PORT")]
    pub mqtt_port: Option<u16>,
    /// Base URL of the server's HTTP API [default: http://HOST:8080].
    #[arg(long, env = "BOOTTORRENT_AGENT_HTTP_URL", value_name = "URL")]
    pub http_url: Option<String>,
    /// CA certificate (PEM) of the broker; enables MQTT over TLS.
    #[arg(long, env = "BOOTTORRENT_AGENT_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// The server's enrollment token (MQTT password).
    #[arg(
        long,
        env = "BOOTTORRENT_AGENT_ENROLL_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub enroll_token: Option<Secret>,
    /// How to log in to the broker: password (the server's embedded broker) or certificate
    /// (a server run with --broker against an existing broker) [default: password].
    #[arg(long, env = "BOOTTORRENT_AGENT_BROKER_LOGIN", value_enum)]
    pub broker_login: Option<BrokerLogin>,
    /// This machine's id [default: the host name, sanitised].
    #[arg(long, env = "BOOTTORRENT_AGENT_MACHINE_ID", value_name = "ID")]
    pub machine_id: Option<MachineId>,
    /// The machine's store: key, pinned server key, assignments, images [default:
    /// /var/lib/boottorrent; on Windows X:\BootTorrent on the fixed volume that has one].
    #[arg(long, env = "BOOTTORRENT_AGENT_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// BitTorrent listen address [default: 0.0.0.0:6881].
    #[arg(long, env = "BOOTTORRENT_AGENT_BT_LISTEN", value_name = "ADDR")]
    pub bt_listen: Option<SocketAddr>,
    /// Encrypt peer connections (message stream encryption, RC4): dial with it and refuse
    /// plaintext; needed when the server sets --bt-require-encryption [default: false].
    #[arg(
        long,
        env = "BOOTTORRENT_AGENT_BT_REQUIRE_ENCRYPTION",
        value_name = "BOOL"
    )]
    pub bt_require_encryption: Option<bool>,
    /// This machine's zone, whose peers are preferred: auto (the network of the interface
    /// toward the server), off, or networks such as 10.1.2.0/24,10.1.3.0/24 [default: auto].
    #[arg(
        long,
        env = "BOOTTORRENT_AGENT_BT_ZONE",
        value_name = "auto|off|CIDR,..."
    )]
    pub bt_zone: Option<ZoneSetting>,
    /// Boot backend run after staging [default: windows on Windows, none elsewhere].
    #[arg(long, env = "BOOTTORRENT_AGENT_BOOT_BACKEND", value_enum)]
    pub boot_backend: Option<BootBackend>,
    /// Program the `command` boot backend runs.
    #[arg(long, env = "BOOTTORRENT_AGENT_BOOT_COMMAND", value_name = "PROGRAM")]
    pub boot_command: Option<PathBuf>,
    /// File in the running system holding the id of the image it was booted from, and on a
    /// second line the file booted (`command` backend; a `reset` deployment needs the second
    /// line).
    #[arg(
        long,
        env = "BOOTTORRENT_AGENT_RUNNING_IMAGE_FILE",
        value_name = "FILE"
    )]
    pub running_image_file: Option<PathBuf>,
    /// Download cap, bytes per second.
    #[arg(long, env = "BOOTTORRENT_AGENT_DOWNLOAD_LIMIT_BPS", value_name = "BPS")]
    pub download_limit_bps: Option<u64>,
    /// Upload cap, bytes per second.
    #[arg(long, env = "BOOTTORRENT_AGENT_UPLOAD_LIMIT_BPS", value_name = "BPS")]
    pub upload_limit_bps: Option<u64>,
    /// Bytes kept free on the data disk beyond an image [default: 268435456].
    #[arg(
        long,
        env = "BOOTTORRENT_AGENT_DISK_RESERVE_BYTES",
        value_name = "BYTES"
    )]
    pub disk_reserve_bytes: Option<u64>,
    /// Seconds between heartbeats until the server sets it [default: 10].
    #[arg(
        long,
        env = "BOOTTORRENT_AGENT_HEARTBEAT_INTERVAL_SECS",
        value_name = "SECS"
    )]
    pub heartbeat_interval_secs: Option<u32>,
    /// Seconds between MQTT keepalive pings [default: 30].
    #[arg(
        long,
        env = "BOOTTORRENT_AGENT_MQTT_KEEPALIVE_SECS",
        value_name = "SECS"
    )]
    pub mqtt_keepalive_secs: Option<u16>,
    /// Seconds a command's timestamp may be off this machine's clock [default: 300].
    #[arg(
        long,
        env = "BOOTTORRENT_AGENT_REPLAY_WINDOW_SECS",
        value_name = "SECS"
    )]
    pub replay_window_secs: Option<u32>,
    /// The server's public key, 64 hex digits [default: <data-dir>/server.pub].
    #[arg(long, env = "BOOTTORRENT_AGENT_SERVER_KEY", value_name = "HEX", value_parser = parse_public_key)]
    pub server_key: Option<PublicKeyBytes>,
}

impl Config {
    /// Defaults, then the config file, then `overrides`; validated. The machine id, when
    /// nothing set it, comes from the store ([`crate::store::Store::locate`]).
    pub fn load(overrides: &Overrides) -> anyhow::Result<Config> {
        let path = overrides.config.clone().unwrap_or_else(default_config_path);
        let mut config = if overrides.config.is_some() || path.exists() {
            Config::from_file(&path)?
        } else {
            Config::default()
        };
        config.config_dir = std::path::absolute(&path)
            .unwrap_or(path)
            .parent()
            .map(Path::to_owned);
        config.apply(overrides.clone());
        config.validate()?;
        Ok(config)
    }

    /// Reads a TOML file; unknown keys are errors.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }

    /// Replaces every field that `overrides` sets.
    pub fn apply(&mut self, overrides: Overrides) {
        let Overrides {
            config: _,
            server,
            mqtt_port,
            http_url,
            tls_ca,
            enroll_token,
            broker_login,
            machine_id,
            data_dir,
            bt_listen,
            bt_require_encryption,
            bt_zone,
            boot_backend,
            boot_command,
            running_image_file,
            download_limit_bps,
            upload_limit_bps,
            disk_reserve_bytes,
            heartbeat_interval_secs,
            mqtt_keepalive_secs,
            replay_window_secs,
            server_key,
        } = overrides;
        fn set<T>(slot: &mut T, value: Option<T>) {
            if let Some(v) = value {
                *slot = v;
            }
        }
        fn set_opt<T>(slot: &mut Option<T>, value: Option<T>) {
            if value.is_some() {
                *slot = value;
            }
        }
        set_opt(&mut self.server, server);
        set_opt(&mut self.mqtt_port, mqtt_port);
        set_opt(&mut self.http_url, http_url);
        set_opt(&mut self.tls_ca, tls_ca);
        set_opt(&mut self.enroll_token, enroll_token);
        set(&mut self.broker_login, broker_login);
        set_opt(&mut self.machine_id, machine_id);
        set_opt(&mut self.data_dir, data_dir);
        set(&mut self.bt_listen, bt_listen);
        set(&mut self.bt_require_encryption, bt_require_encryption);
        set(&mut self.bt_zone, bt_zone);
        set(&mut self.boot_backend, boot_backend);
        set_opt(&mut self.boot_command, boot_command);
        set_opt(&mut self.running_image_file, running_image_file);
        set_opt(&mut self.download_limit_bps, download_limit_bps);
        set_opt(&mut self.upload_limit_bps, upload_limit_bps);
        set(&mut self.disk_reserve_bytes, disk_reserve_bytes);
        set(&mut self.heartbeat_interval_secs, heartbeat_interval_secs);
        set(&mut self.mqtt_keepalive_secs, mqtt_keepalive_secs);
        set(&mut self.replay_window_secs, replay_window_secs);
        set_opt(&mut self.server_key, server_key);
    }

    /// Checks what can be checked without the network.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(server) = &self.server
            && (server.is_empty() || server.contains(['/', ' ']))
        {
            bail!("server must be a host name or IP address, found {server:?}");
        }
        if let Some(url) = &self.http_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            bail!("http_url must start with http:// or https://, found {url:?}");
        }
        if self.heartbeat_interval_secs == 0 {
            bail!("heartbeat_interval_secs must be at least 1");
        }
        if self.mqtt_keepalive_secs == 0 {
            bail!("mqtt_keepalive_secs must be at least 1 (0 would let a dead agent look alive)");
        }
        if self.boot_backend == BootBackend::Command && self.boot_command.is_none() {
            bail!("boot_backend = \"command\" needs boot_command (--boot-command PROGRAM)");
        }
        if let Some(key) = &self.server_key {
            verifying_key_from_bytes(key).context("server_key")?;
        }
        Ok(())
    }

    /// The server host, or an error saying how to set it.
    pub fn server(&self) -> anyhow::Result<&str> {
        self.server.as_deref().context(
            "no server configured: set `server` in the config file, BOOTTORRENT_AGENT_SERVER or --server HOST",
        )
    }

    /// The MQTT port: the configured one, else 8883 with TLS and 1883 without.
    pub fn mqtt_port(&self) -> u16 {
        let tls = self.tls_ca.is_some() || self.broker_login == BrokerLogin::Certificate;
        self.mqtt_port.unwrap_or(if tls { 8883 } else { 1883 })
    }

    /// The HTTP base URL without a trailing `/`: the configured one, else
    /// `http://<server>:8080`.
    pub fn http_url(&self) -> anyhow::Result<String> {
        match &self.http_url {
            Some(url) => Ok(url.trim_end_matches('/').to_owned()),
            None => {
                let host = self.server().context("no http_url configured either")?;
                // A bare IPv6 address needs brackets in a URL.
                if host.contains(':') && !host.starts_with('[') {
                    Ok(format!("http://[{host}]:8080"))
                } else {
                    Ok(format!("http://{host}:8080"))
                }
            }
        }
    }

    /// Where `enroll` pins the server key: in `data_dir` when set; otherwise next to the
    /// configuration file, in the agent's directory inside the running image
    /// (`%ProgramData%\BootTorrent` on Windows), because enrolling happens while the golden
    /// image is built, which must not carry a store. `run` copies the pin into the store.
    /// Not `%ProgramData%` itself: a service's environment may name another directory
    /// (Wine's does) than the administrator's console did.
    pub fn pin_file(&self) -> PathBuf {
        self.data_dir
            .clone()
            .or_else(|| self.config_dir.clone())
            .unwrap_or_else(default_data_dir)
            .join(SERVER_KEY_FILE)
    }

    /// The configuration as TOML, with the token masked: what `config --effective` prints.
    pub fn to_toml_masked(&self) -> anyhow::Result<String> {
        let mut shown = self.clone();
        if shown.enroll_token.is_some() {
            shown.enroll_token = Some(Secret::new("(set)".into()));
        }
        toml::to_string(&shown).context("formatting the configuration as TOML")
    }

    /// The default configuration as commented TOML, for `boottorrent-agent config`.
    pub fn default_toml() -> String {
        let d = Config::default();
        format!(
            r#"# BootTorrent agent configuration (boottorrent-agent run --config FILE).
# Every key is optional; environment variables BOOTTORRENT_AGENT_<KEY> and flags override the file.

# Host name or IP address of the BootTorrent server (MQTT and HTTP). Required by `run`.
# server = "boottorrent.lab.example"
# MQTT port of the server (default: 1883, or 8883 when tls_ca is set).
# mqtt_port = 1883
# Base URL of the server's HTTP API and tracker (default: http://<server>:8080).
# http_url = "http://boottorrent.lab.example:8080"
# PEM certificate authority of the broker's certificate; when set, MQTT runs over TLS.
# tls_ca = "/etc/boottorrent/ca.pem"
# The server's enrollment token: the MQTT password (the username is the machine id).
# enroll_token = "..."
# How to log in to the broker: "password" (the server's embedded broker), or "certificate"
# for a server run with --broker against an existing broker (mosquitto, EMQX): the agent gets
# a certificate for its own key from the server's HTTP API, keeps it in its store, renews it
# at half its life and logs in over TLS with it; tls_ca defaults to the CA that signed it.
broker_login = "password"
# This machine's id, [A-Za-z0-9._-]{{1,64}} (default: the id kept in the machine's store; for a
# new store the host name, other characters as "-").
# machine_id = "pc-101-01"
# The machine's store: its key (agent.key), the pinned server key, assignments, images. Default:
# {data_dir}
# data_dir = "/var/lib/boottorrent"
# Address the BitTorrent peer listens on.
bt_listen = "{bt_listen}"
# Encrypt peer connections (MSE, RC4): dial with it and refuse plaintext. Needed when the
# server sets bt_require_encryption, whose seeder then refuses plaintext.
bt_require_encryption = false
# Which peers are this machine's zone: they are dialled first, left the pieces they can serve
# and given free upload slots first, so that a lab's traffic stays on its switch instead of
# its uplink. "auto": the network of the interface the server is reached through (a lab room
# is usually one subnet); "off": every peer alike; or the networks of this machine's switch,
# "10.1.2.0/24,10.1.3.0/24", where a room spans subnets or shares one with other rooms.
bt_zone = "auto"
# After staging, when the action asks to boot: "none", "command" or "windows" (bcdedit).
boot_backend = "{backend}"
# Program the "command" backend runs, with BOOTTORRENT_IMAGE_PATH, BOOTTORRENT_IMAGE_ID,
# BOOTTORRENT_DEPLOYMENT_ID and BOOTTORRENT_ACTION in its environment.
# boot_command = "/usr/local/sbin/boottorrent-boot"
# With "command": a file inside the running system holding the id of the image it was booted
# from, and on a second line the file booted. The boot program writes $BOOTTORRENT_IMAGE_ID
# and $BOOTTORRENT_IMAGE_PATH there in the system it boots (or the image carries the id); the
# agent reads it at every start and tells the server, which marks a `reboot` deployment
# booted only when the machine comes back running that image. A `reset` deployment needs the
# second line, to know which of the image's two boot children runs.
# Missing file: running no image BootTorrent booted. (The "windows" backend needs nothing:
# it reads the boot device of {{current}} from bcdedit.)
# running_image_file = "/etc/boottorrent/running-image"
# Download and upload caps, bytes per second (default: none).
# download_limit_bps = 12500000
# upload_limit_bps = 12500000
# Bytes kept free on the data disk beyond an image; larger assignments are refused.
disk_reserve_bytes = 268435456
# Seconds between heartbeats until the server's machine_configuration sets it.
heartbeat_interval_secs = {heartbeat}
# Seconds between MQTT keepalive pings; the broker reports the agent offline after 1.5 times this.
mqtt_keepalive_secs = {keepalive}
# Seconds a command's timestamp may differ from this machine's clock.
replay_window_secs = {window}
# The server's Ed25519 public key, 64 hex digits (default: <data_dir>/server.pub, written by
# `boottorrent-agent enroll`).
# server_key = "..."
"#,
            data_dir = if cfg!(windows) {
                r"X:\BootTorrent on the fixed volume that has one (found whatever its letter)"
            } else {
                "/var/lib/boottorrent"
            },
            bt_listen = d.bt_listen,
            backend = match d.boot_backend {
                BootBackend::None => "none",
                BootBackend::Command => "command",
                BootBackend::Windows => "windows",
            },
            heartbeat = d.heartbeat_interval_secs,
            keepalive = d.mqtt_keepalive_secs,
            window = d.replay_window_secs,
        )
    }
}

fn parse_public_key(text: &str) -> Result<PublicKeyBytes, String> {
    PublicKeyBytes::from_hex(text.trim()).map_err(|e| format!("expected 64 hex digits: {e}"))
}

/// Where `--config` points when not given.
pub fn default_config_path() -> PathBuf {
    if cfg!(windows) {
        program_data().join("BootTorrent").join("agent.toml")
    } else {
        PathBuf::from("/etc/boottorrent/agent.toml")
    }
}

/// The agent's own directory: the store on Linux when `data_dir` is not set; on Windows the
/// directory inside the running image, next to the configuration.
pub fn default_data_dir() -> PathBuf {
    if cfg!(windows) {
        program_data().join("BootTorrent")
    } else {
        PathBuf::from("/var/lib/boottorrent")
    }
}

fn program_data() -> PathBuf {
    std::env::var_os("ProgramData")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(r"C:\ProgramData"))
}

/// A valid machine id from a host name: characters outside `[A-Za-z0-9._-]` become `-`,
/// the result is cut to 64 characters, and an empty name becomes `machine`.
pub fn sanitize_machine_id(host: &str) -> MachineId {
    let cleaned: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    let cleaned = if cleaned.is_empty() {
        "machine".to_owned()
    } else {
        cleaned
    };
    cleaned
        .parse()
        .expect("only [A-Za-z0-9._-], 1 to 64 characters, remain")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        overrides: Overrides,
    }

    fn overrides(argv: &[&str]) -> Overrides {
        let mut full = vec!["agent"];
        full.extend_from_slice(argv);
        Wrapper::try_parse_from(full).unwrap().overrides
    }

    #[test]
    fn commented_default_parses_to_default() {
        let parsed: Config = toml::from_str(&Config::default_toml()).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn commented_default_mentions_every_key() {
        let full = Config {
            server: Some("s".into()),
            mqtt_port: Some(1),
            http_url: Some("http://s".into()),
            tls_ca: Some("/ca".into()),
            enroll_token: Some(Secret::new("t".into())),
            machine_id: Some("m".parse().unwrap()),
            boot_command: Some("/b".into()),
            download_limit_bps: Some(1),
            upload_limit_bps: Some(1),
            server_key: Some(PublicKeyBytes::from([1; 32])),
            ..Config::default()
        };
        let value = toml::Value::try_from(&full).unwrap();
        let text = Config::default_toml();
        for key in value.as_table().unwrap().keys() {
            assert!(
                text.contains(&format!("\n{key} = ")) || text.contains(&format!("\n# {key} = ")),
                "{key} missing"
            );
        }
    }

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "server = \"from-file\"\nmqtt_port = 2000\nheartbeat_interval_secs = 7\nmachine_id = \"pc-file\"\n",
        )
        .unwrap();
        let config = Config::load(&overrides(&[
            "--config",
            file.to_str().unwrap(),
            "--mqtt-port",
            "3000",
        ]))
        .unwrap();
        assert_eq!(config.server.as_deref(), Some("from-file"));
        assert_eq!(config.mqtt_port(), 3000);
        assert_eq!(config.heartbeat_interval_secs, 7);
        assert_eq!(config.machine_id.as_ref().unwrap().as_str(), "pc-file");
        assert_eq!(
            config.mqtt_keepalive_secs,
            Config::default().mqtt_keepalive_secs
        );
        assert_eq!(config.http_url().unwrap(), "http://from-file:8080");
    }

    #[test]
    fn a_missing_explicit_file_is_an_error_naming_it() {
        let err = Config::load(&overrides(&["--config", "/nonexistent/agent-x.toml"])).unwrap_err();
        assert!(format!("{err:#}").contains("agent-x.toml"), "{err:#}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "sever = \"x\"\n").unwrap();
        let err = Config::from_file(&file).unwrap_err();
        assert!(format!("{err:#}").contains("sever"), "{err:#}");
    }

    #[test]
    fn validation() {
        let bad = |argv: &[&str]| {
            let mut args = vec!["--machine-id", "m"];
            args.extend_from_slice(argv);
            Config::load(&overrides(&args)).unwrap_err().to_string()
        };
        assert!(bad(&["--heartbeat-interval-secs", "0"]).contains("heartbeat"));
        assert!(bad(&["--boot-backend", "command"]).contains("boot_command"));
        assert!(bad(&["--http-url", "ftp://x"]).contains("http_url"));
        assert!(bad(&["--server", "a/b"]).contains("server"));
        // Small-order key.
        let mut weak = "00".repeat(32);
        weak.replace_range(0..2, "01");
        assert!(bad(&["--server-key", &weak]).contains("server_key"));
        assert!(Wrapper::try_parse_from(["agent", "--machine-id", "bad id"]).is_err());
    }

    #[test]
    fn tls_changes_the_default_port_and_ipv6_gets_brackets() {
        let mut config = Config {
            server: Some("fd00::1".into()),
            ..Config::default()
        };
        assert_eq!(config.mqtt_port(), 1883);
        assert_eq!(config.http_url().unwrap(), "http://[fd00::1]:8080");
        config.tls_ca = Some("/ca.pem".into());
        assert_eq!(config.mqtt_port(), 8883);
        assert!(Config::default().http_url().is_err());
    }

    #[test]
    fn machine_ids_are_sanitised() {
        assert_eq!(sanitize_machine_id("pc-101.lab").as_str(), "pc-101.lab");
        assert_eq!(sanitize_machine_id("PC 101/ä").as_str(), "PC-101--");
        assert_eq!(sanitize_machine_id("").as_str(), "machine");
        assert_eq!(sanitize_machine_id(&"x".repeat(100)).as_str().len(), 64);
        assert_eq!(sanitize_machine_id(" host\n").as_str(), "host");
    }

    #[test]
    fn the_token_is_hidden() {
        let config = Config {
            enroll_token: Some(Secret::new("very-secret-token".into())),
            ..Config::default()
        };
        assert!(!format!("{config:?}").contains("very-secret"));
        assert!(!config.to_toml_masked().unwrap().contains("very-secret"));
    }
}
