//! The embedded MQTT broker (rumqttd).
//!
//! rumqttd runs on threads of its own and cannot be stopped or asked whether its listeners
//! bound, so this module checks everything it can before handing over: the broker config
//! parses, every listen address can be bound, the TLS files are readable PEM with a
//! certificate and a key. After start it waits until the MQTT port accepts connections.
//!
//! Authentication: agents log in with username = their machine id and password = the
//! enrollment token; operator tools log in as `admin` with the admin token. rumqttd has no
//! per-client ACL, so a login only admits a client to the broker; what a message may do is
//! decided by its signature (see `orchestrator`).

use std::collections::HashMap;
use std::io::BufReader;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use boottorrent_proto::MachineId;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Broker, ServerSettings, TlsConfig};

use crate::config::{Config, Secret};
use crate::credentials::token_matches;
use crate::metrics::Metrics;

/// The broker configuration compiled into the binary.
pub const EMBEDDED_CONFIG: &str = include_str!("../broker.toml");

/// MQTT username of the operator's tools.
pub const ADMIN_USER: &str = "admin";

/// Names (keys under `[v4]`) of the listeners BootTorrent manages.
const PLAIN_LISTENER: &str = "mqtt";
const TLS_LISTENER: &str = "mqtts";

/// Client id of the orchestrator's in-process link.
const ORCHESTRATOR_CLIENT_ID: &str = "boottorrent-orchestrator";

/// A started broker and the orchestrator's link into it.
pub struct Running {
    pub link_tx: LinkTx,
    pub link_rx: LinkRx,
}

/// Builds the rumqttd config, checks it, starts the broker threads and returns the
/// orchestrator's link once the plain MQTT listener accepts connections.
pub fn start(
    config: &Config,
    enroll_token: Secret,
    admin_token: Secret,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Running> {
    let mut broker_config = broker_config(config)?;
    let auth = Authenticator {
        enroll_token,
        admin_token,
        metrics,
    };
    let mut addresses = Vec::new();
    for listeners in [
        broker_config.v4.as_mut(),
        broker_config.v5.as_mut(),
        broker_config.ws.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        for server in listeners.values_mut() {
            let auth = auth.clone();
            // Static `auth` pairs from a user's broker file would bypass our check.
            server.connections.auth = None;
            server.set_auth_handler(move |_client_id, user, pass| {
                let ok = auth.check(&user, &pass);
                async move { ok }
            });
            addresses.push((server.name.clone(), server.listen));
        }
    }
    for (name, addr) in &addresses {
        // rumqttd binds on its own thread and only logs a failure; bind here first so that a
        // port in use stops start-up with a message instead of a broker that never answers.
        TcpListener::bind(addr).with_context(|| {
            format!("binding MQTT listener {name:?} on {addr}: is another broker running?")
        })?;
    }

    let mut broker = Broker::new(broker_config);
    let (link_tx, link_rx) = broker
        .link(ORCHESTRATOR_CLIENT_ID)
        .map_err(|e| anyhow::anyhow!("connecting the orchestrator to the broker: {e:?}"))?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the MQTT broker stopped");
            }
        })
        .context("starting the MQTT broker thread")?;

    wait_until_accepting(config.mqtt_listen, Duration::from_secs(10))?;
    Ok(Running { link_tx, link_rx })
}

/// The broker config: the embedded or given file, with BootTorrent's listeners applied.
fn broker_config(config: &Config) -> anyhow::Result<rumqttd::Config> {
    let (text, origin) = match &config.broker_config {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("reading broker config {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (
            EMBEDDED_CONFIG.to_owned(),
            "embedded broker.toml".to_owned(),
        ),
    };
    let mut broker: rumqttd::Config =
        toml::from_str(&text).with_context(|| format!("parsing {origin}"))?;
    let v4 = broker.v4.get_or_insert_with(HashMap::new);
    let Some(plain) = v4.get_mut(PLAIN_LISTENER) else {
        bail!("{origin} has no [v4.{PLAIN_LISTENER}] listener; BootTorrent's agents connect there");
    };
    plain.listen = config.mqtt_listen;
    plain.tls = None;
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        check_pem(cert, key)?;
        let mut tls: ServerSettings = plain.clone();
        tls.name = TLS_LISTENER.to_owned();
        tls.listen = config.mqtts_listen;
        tls.tls = Some(TlsConfig::Rustls {
            capath: None,
            certpath: cert.display().to_string(),
            keypath: key.display().to_string(),
        });
        v4.insert(TLS_LISTENER.to_owned(), tls);
    }
    Ok(broker)
}

/// rumqttd reads the PEM files only when the first TLS client connects and then merely logs
/// the failure; check them at start-up so a bad file stops the server with its name.
pub fn check_pem(cert: &Path, key: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(cert)
        .with_context(|| format!("opening TLS certificate {}", cert.display()))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading TLS certificate {}: not valid PEM", cert.display()))?;
    if certs.is_empty() {
        bail!(
            "TLS certificate {} holds no PEM \"CERTIFICATE\" block",
            cert.display()
        );
    }
    let file = std::fs::File::open(key)
        .with_context(|| format!("opening TLS private key {}", key.display()))?;
    match rustls_pemfile::private_key(&mut BufReader::new(file)) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => bail!(
            "TLS private key {} holds no PEM private key block (PKCS#8, PKCS#1 or SEC1)",
            key.display()
        ),
        Err(e) => Err(e)
            .with_context(|| format!("reading TLS private key {}: not valid PEM", key.display())),
    }
}

/// Polls the listener until it accepts a TCP connection.
fn wait_until_accepting(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match addr {
            SocketAddr::V4(_) => [127, 0, 0, 1].into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let deadline = Instant::now() + limit;
    loop {
        match TcpStream::connect_timeout(&target, Duration::from_millis(200)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| {
                    format!("the MQTT broker did not start listening on {addr}; see its log above")
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Decides MQTT logins.
#[derive(Clone)]
struct Authenticator {
    enroll_token: Secret,
    admin_token: Secret,
    metrics: Arc<Metrics>,
}

impl Authenticator {
    fn check(&self, user: &str, pass: &str) -> bool {
        let ok = if user == ADMIN_USER {
            token_matches(&self.admin_token, pass)
        } else if user.parse::<MachineId>().is_ok() {
            token_matches(&self.enroll_token, pass)
        } else {
            false
        };
        if !ok {
            self.metrics.mqtt_login_refused();
            // The username is attacker-chosen: log it escaped and bounded.
            let shown: String = user.chars().take(64).collect();
            tracing::info!(user = ?shown, "refused MQTT login: wrong password or invalid machine id");
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_config_has_the_plain_listener() {
        let config = Config::default();
        let broker = broker_config(&config).unwrap();
        let v4 = broker.v4.unwrap();
        assert_eq!(v4[PLAIN_LISTENER].listen, config.mqtt_listen);
        assert!(!v4.contains_key(TLS_LISTENER));
    }

    #[test]
    fn broker_file_without_plain_listener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(
            &path,
            EMBEDDED_CONFIG
                .replace("[v4.mqtt]", "[v4.other]")
                .replace("[v4.mqtt.", "[v4.other."),
        )
        .unwrap();
        let config = Config {
            broker_config: Some(path),
            ..Config::default()
        };
        let err = broker_config(&config).unwrap_err();
        assert!(err.to_string().contains("[v4.mqtt]"), "{err}");
    }

    #[test]
    fn logins() {
        let auth = Authenticator {
            enroll_token: Secret::new("enroll-token-0123456789".into()),
            admin_token: Secret::new("admin-token-0123456789".into()),
            metrics: Arc::new(Metrics::default()),
        };
        assert!(auth.check("pc-01", "enroll-token-0123456789"));
        assert!(auth.check("admin", "admin-token-0123456789"));
        assert!(!auth.check("admin", "enroll-token-0123456789"));
        assert!(!auth.check("pc-01", "admin-token-0123456789x"));
        assert!(!auth.check("bad/id", "enroll-token-0123456789"));
        assert!(!auth.check("", "enroll-token-0123456789"));
        assert_eq!(auth.metrics.snapshot().mqtt_logins_refused, 4);
    }
}
