//! The orchestrator's connection to an existing MQTT broker (`--broker mqtt[s]://host:port`),
//! used instead of the embedded rumqttd past what one appliance carries.
//!
//! There is no embedded broker and no front then: the site's broker (mosquitto, EMQX) admits
//! the agents and keeps each to its own topics with its ACL (see `broker_config`), and the
//! orchestrator is one more client of it, with its reserved client id. A **driver** task polls
//! rumqttc's event loop: on each CONNACK it subscribes to the machines' events again (the
//! session is clean, so the broker forgets subscriptions with the connection), hands every
//! message to the orchestrator on a channel, and when the broker cannot be reached it says so
//! in `/healthz` and retries with backoff (1 s doubling to 30 s). Commands go out at QoS 1:
//! rumqttc keeps the unacknowledged ones and sends them again after a reconnect.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use boottorrent_proto::EVENTS_FILTER;
use rumqttc::{AsyncClient, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::server::config::{Config, Secret};
use crate::server::health::Health;

/// The `/healthz` subsystem name, shared with the embedded broker links.
const SUBSYSTEM: &str = "mqtt_link";
/// First pause after a failed connection; doubles up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Commands rumqttc may queue while the broker is away or slow to acknowledge; past it a
/// command is dropped and the machine gets its state at its next heartbeat.
const REQUEST_QUEUE: usize = 16 * 1024;
/// Events the driver may hold for the orchestrator before it stops reading the broker (TCP
/// back-pressure then slows the broker down rather than our memory growing).
const EVENT_QUEUE: usize = 16 * 1024;
/// Seconds between MQTT pings.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Where the external broker is: `mqtt://host[:port]` (plain, port 1883 by default) or
/// `mqtts://host[:port]` (TLS, 8883).
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    /// A host name, an IPv4 address, or an IPv6 address without brackets.
    pub host: String,
    pub port: u16,
}

impl FromStr for BrokerUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(rest) = s.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = s.strip_prefix("mqtt://") {
            (false, rest)
        } else {
            return Err(format!(
                "broker URL {s:?} must start with mqtt:// or mqtts:// (e.g. mqtts://broker.lab:8883)"
            ));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("broker URL {s:?}: an IPv6 address needs its closing ]"))?;
            match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None if after.is_empty() => (host, None),
                None => return Err(format!("broker URL {s:?}: unexpected {after:?} after ]")),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if host.is_empty() || host.contains(['/', '@', '?', '#', ' ']) {
            return Err(format!(
                "broker URL {s:?}: {host:?} is not a host name or address (no path, user or \
                 query: credentials go in broker_username/broker_password)"
            ));
        }
        let port = match port {
            None => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("broker URL {s:?}: port {p:?} is not 1 to 65535"))?,
        };
        Ok(BrokerUrl {
            tls,
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for BrokerUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BrokerUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How the orchestrator logs in to the external broker.
#[derive(Clone)]
pub struct Settings {
    pub url: BrokerUrl,
    /// The MQTT client id: the orchestrator's reserved id.
    pub client_id: String,
    /// Username and password, when the broker takes those.
    pub credentials: Option<(String, Secret)>,
    /// PEM CA file the broker's TLS certificate must chain to (mqtts).
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key (mqtts with certificate login).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The largest packet either way.
    pub max_packet: usize,
}

/// The login settings `config` asks for (an error when it names no external broker); over
/// mqtts without a username or certificate of its own, the orchestrator's certificate from the
/// machine CA, made on first use.
pub fn settings(config: &Config) -> anyhow::Result<Settings> {
    let Some(url) = config.broker.clone() else {
        bail!("no external broker configured");
    };
    let credentials = config
        .broker_username
        .clone()
        .zip(config.broker_password.clone());
    let mut client_cert = config.broker_cert.clone().zip(config.broker_key.clone());
    if url.tls && client_cert.is_none() && credentials.is_none() {
        client_cert = Some(orchestrator_certificate(&config.data_dir)?);
    }
    let ca = url.tls.then(|| {
        config.broker_ca.clone().unwrap_or_else(|| {
            config
                .data_dir
                .join(crate::server::machine_ca::CA_CERT_FILE)
        })
    });
    Ok(Settings {
        url,
        client_id: crate::server::broker::ORCHESTRATOR_CLIENT_ID.to_owned(),
        credentials,
        ca,
        client_cert,
        max_packet: crate::server::broker::MIN_PACKET_LIMIT,
    })
}

/// Files in the data directory with the orchestrator's own client certificate for the broker.
pub const CLIENT_CERT_FILE: &str = "orchestrator.crt";
pub const CLIENT_KEY_FILE: &str = "orchestrator.key";

/// The orchestrator's certificate from the machine CA (CN = its reserved id), made on first
/// use; what `broker-config` writes for the broker trusts it.
pub fn orchestrator_certificate(data_dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert = data_dir.join(CLIENT_CERT_FILE);
    let key = data_dir.join(CLIENT_KEY_FILE);
    if !(cert.exists() && key.exists()) {
        let ca = crate::server::machine_ca::MachineCa::load_or_create(data_dir)?;
        let issued = ca.issue_client_with_key(
            crate::server::broker::ORCHESTRATOR_CLIENT_ID,
            boottorrent_proto::now_ms(),
        )?;
        // A half-written pair from an interrupted start is replaced whole.
        let _ = std::fs::remove_file(&key);
        crate::server::credentials::write_private(&key, issued.key_pem.trim_end())?;
        std::fs::write(&cert, issued.cert_pem)
            .with_context(|| format!("writing {}", cert.display()))?;
    }
    Ok((cert, key))
}

/// The orchestrator's end: events in, commands out.
pub struct External {
    client: AsyncClient,
    events: mpsc::Receiver<(Vec<u8>, Vec<u8>)>,
}

impl External {
    /// Checks the TLS files, then starts the driver task on `tasks`; returns at once (the
    /// first connection is made by the driver, and `/healthz` says unhealthy until it is).
    pub fn start(
        settings: Settings,
        health: Health,
        tasks: &tokio_util::task::TaskTracker,
        shutdown: CancellationToken,
    ) -> anyhow::Result<External> {
        let mut options = MqttOptions::new(
            settings.client_id.clone(),
            settings.url.host.clone(),
            settings.url.port,
        );
        options
            .set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            .set_max_packet_size(settings.max_packet, settings.max_packet)
            .set_request_channel_capacity(REQUEST_QUEUE);
        if let Some((user, password)) = &settings.credentials {
            options.set_credentials(user.clone(), password.expose().to_owned());
        }
        if settings.url.tls {
            options.set_transport(tls_transport(&settings)?);
        } else if settings.client_cert.is_some() || settings.ca.is_some() {
            bail!(
                "broker {} is plain MQTT but a TLS CA or client certificate is configured; use \
                 mqtts:// to log in with them",
                settings.url
            );
        }
        let (client, eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
        let (tx, events) = mpsc::channel(EVENT_QUEUE);
        health.degraded(
            SUBSYSTEM,
            format!("connecting to the broker at {}", settings.url),
        );
        let driver = drive(
            eventloop,
            client.clone(),
            tx,
            health,
            settings.url.to_string(),
            shutdown,
        );
        tasks.spawn(driver);
        Ok(External { client, events })
    }

    /// The next event (topic, payload); pending while there is none, and forever once the
    /// driver stopped (at shutdown).
    pub async fn next(&mut self) -> Option<(Vec<u8>, Vec<u8>)> {
        self.events.recv().await
    }

    /// An event already queued, without waiting.
    pub fn try_next(&mut self) -> Option<(Vec<u8>, Vec<u8>)> {
        self.events.try_recv().ok()
    }

    /// Queues a command at QoS 1; an error when rumqttc's queue is full (the broker away for
    /// long) or the driver stopped.
    pub fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), rumqttc::ClientError> {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
    }
}

async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    events: mpsc::Sender<(Vec<u8>, Vec<u8>)>,
    health: Health,
    broker: String,
    stop: CancellationToken,
) {
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let polled = tokio::select! {
            _ = stop.cancelled() => break,
            polled = eventloop.poll() => polled,
        };
        match polled {
            Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                // Queued ahead of anything else the orchestrator publishes from now on.
                if let Err(e) = client.try_subscribe(EVENTS_FILTER, QoS::AtLeastOnce) {
                    tracing::error!("could not subscribe to {EVENTS_FILTER} at {broker}: {e}");
                }
            }
            Ok(rumqttc::Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                if refused {
                    health.degraded(
                        SUBSYSTEM,
                        format!(
                            "the broker at {broker} refused the subscription to {EVENTS_FILTER}: \
                             its ACL must let the orchestrator's user read the events"
                        ),
                    );
                } else {
                    backoff = INITIAL_BACKOFF;
                    health.recovered(SUBSYSTEM);
                    tracing::info!(%broker, "connected to the external broker, listening on {EVENTS_FILTER}");
                }
            }
            Ok(rumqttc::Event::Incoming(Packet::Publish(publish))) => {
                let event = (publish.topic.into_bytes(), publish.payload.to_vec());
                tokio::select! {
                    _ = stop.cancelled() => break,
                    sent = events.send(event) => if sent.is_err() { break },
                }
            }
            Ok(_) => {}
            Err(e) => {
                health.degraded(
                    SUBSYSTEM,
                    format!(
                        "cannot reach the broker at {broker}: {e}; machines' events are not \
                         applied until it is back (retrying every {} s at most)",
                        MAX_BACKOFF.as_secs()
                    ),
                );
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    // Best effort: tell the broker we leave, so it does not wait for the keep-alive.
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
}

fn tls_transport(settings: &Settings) -> anyhow::Result<Transport> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let Some(ca) = &settings.ca else {
        bail!(
            "broker {} is mqtts:// but no CA file is set: set broker_ca to the PEM certificate \
             of the CA that signed the broker's certificate",
            settings.url
        );
    };
    for cert in read_certs(ca, "broker CA")? {
        roots
            .add(cert)
            .with_context(|| format!("adding a certificate of {} as a root", ca.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?
        .with_root_certificates(roots);
    let config = match &settings.client_cert {
        Some((cert, key)) => {
            let chain = read_certs(cert, "broker client certificate")?;
            let key_file = std::fs::File::open(key)
                .with_context(|| format!("opening the broker client key {}", key.display()))?;
            let key_der = rustls_pemfile::private_key(&mut std::io::BufReader::new(key_file))
                .with_context(|| format!("reading {}: not valid PEM", key.display()))?
                .with_context(|| format!("{} holds no PEM private key", key.display()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .with_context(|| {
                    format!(
                        "using {} and {} as the broker client certificate",
                        cert.display(),
                        key.display()
                    )
                })?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(config),
    )))
}

fn read_certs(
    path: &Path,
    what: &str,
) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening the {what} file {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading the {what} file {}: not valid PEM", path.display()))?;
    if certs.is_empty() {
        bail!(
            "the {what} file {} holds no PEM \"CERTIFICATE\" block",
            path.display()
        );
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_with_default_ports_and_print_back() {
        let url: BrokerUrl = "mqtts://broker.lab".parse().unwrap();
        assert_eq!(
            (url.tls, url.host.as_str(), url.port),
            (true, "broker.lab", 8883)
        );
        let url: BrokerUrl = "mqtt://127.0.0.1:2883".parse().unwrap();
        assert_eq!((url.tls, url.port), (false, 2883));
        assert_eq!(url.to_string(), "mqtt://127.0.0.1:2883");
        let url: BrokerUrl = "mqtt://[::1]".parse().unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 1883));
        assert_eq!(url.to_string(), "mqtt://[::1]:1883");
        for bad in [
            "tcp://x:1",
            "mqtt://",
            "mqtt://x:0",
            "mqtt://x:99999",
            "mqtt://u:p@x",
            "mqtt://x/path",
            "mqtt://[::1",
        ] {
            assert!(bad.parse::<BrokerUrl>().is_err(), "{bad} accepted");
        }
    }
}
