//! One simulated machine's identity: its id, its own Ed25519 key and its signer, and the MQTT
//! options it logs in with, as `boottorrent-agent` does.

use std::time::Duration;

use anyhow::Context;
use boottorrent_proto::{
    Event, MachineId, MachineSigner, PublicKeyBytes, Startup, Topic, generate_signing_key, now_ms,
};
use rumqttc::{LastWill, MqttOptions, QoS};

/// The agent's default MQTT keep-alive (`mqtt_keepalive_secs`).
pub const KEEPALIVE: Duration = Duration::from_secs(30);

/// A simulated machine: its id and its signer (key and sequence counter).
pub struct Machine {
    pub signer: MachineSigner,
}

impl Machine {
    /// A machine `id` with a fresh key.
    pub fn new(id: &str) -> anyhow::Result<Machine> {
        let id: MachineId = id.parse().with_context(|| format!("machine id {id:?}"))?;
        let key =
            generate_signing_key().map_err(|e| anyhow::anyhow!("making a machine key: {e}"))?;
        Ok(Machine {
            signer: MachineSigner::new(id, key, now_ms()),
        })
    }

    pub fn id(&self) -> &MachineId {
        self.signer.machine()
    }

    /// The topic and signed payload of `body`.
    pub fn event(&mut self, body: Event) -> anyhow::Result<(Topic, Vec<u8>)> {
        let kind = body.kind();
        self.signer
            .event(body, now_ms())
            .with_context(|| format!("signing a {kind} event for {}", self.id()))
    }

    /// A signed `startup` that says it is a load generator's machine, holding nothing.
    pub fn startup(&mut self) -> anyhow::Result<(Topic, Vec<u8>)> {
        let public_key = PublicKeyBytes::from(self.signer.key().verifying_key().to_bytes());
        self.event(Event::Startup(Startup {
            agent_version: concat!("loadgen-", env!("CARGO_PKG_VERSION")).into(),
            hostname: format!("{}.loadgen", self.id()),
            os: "loadgen".into(),
            ips: vec![],
            macs: vec![],
            free_disk_bytes: 1 << 40,
            images: vec![],
            public_key,
            running: None,
        }))
    }

    /// MQTT options logging in as this machine, as the agent does: client id and user name
    /// the machine id, a fresh proof of its key as the password, a clean session.
    pub fn options(&self, broker: &(String, u16), token: &str) -> MqttOptions {
        let mut options = MqttOptions::new(self.id().as_str(), broker.0.clone(), broker.1);
        options
            .set_credentials(self.id().as_str(), self.signer.password(token, now_ms()))
            .set_keep_alive(KEEPALIVE)
            .set_clean_session(true);
        options
    }

    /// A freshly signed last will (`status` offline, retained, QoS 1), as the agent sets
    /// before every connection attempt.
    pub fn will(&mut self) -> anyhow::Result<LastWill> {
        let (topic, payload) = self
            .signer
            .offline_will(now_ms())
            .with_context(|| format!("signing the last will of {}", self.id()))?;
        Ok(LastWill::new(
            topic.to_string(),
            payload,
            QoS::AtLeastOnce,
            true,
        ))
    }
}

/// The PKCS#8 v1 encoding of an Ed25519 private key is this prefix and the 32-byte seed
/// (RFC 8410, section 7).
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

impl Machine {
    /// Asks the server for a certificate for this machine's key (as the agent with
    /// `broker_login = "certificate"`) and makes the TLS transport that logs in with it.
    pub async fn certificate_transport(
        &self,
        from: &crate::fleet::agent::Certificates,
        token: &str,
    ) -> anyhow::Result<rumqttc::Transport> {
        let request =
            boottorrent_proto::certificate_request(self.id(), self.signer.key(), token, now_ms());
        let url = format!("{}/api/v1/machines/{}/certificate", from.base, self.id());
        let response = from
            .http
            .post(&url)
            .json(&request)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status();
        if !status.is_success() {
            anyhow::bail!("POST {url}: {status}");
        }
        let answer: boottorrent_proto::CertificateAnswer = response
            .json()
            .await
            .with_context(|| format!("POST {url}"))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut from.ca_pem.as_bytes()) {
            roots.add(cert.context("--broker-ca: not PEM")?)?;
        }
        let chain = rustls_pemfile::certs(&mut answer.certificate.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("the machine certificate: not PEM")?;
        let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
        pkcs8.extend_from_slice(&self.signer.key().to_bytes());
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, rustls::pki_types::PrivateKeyDer::Pkcs8(pkcs8.into()))?;
        Ok(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls)),
        ))
    }
}

/// `host:port` split, for `--mqtt`.
pub fn broker_address(mqtt: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = mqtt
        .rsplit_once(':')
        .with_context(|| format!("--mqtt {mqtt:?} is not host:port"))?;
    Ok((
        host.to_owned(),
        port.parse()
            .with_context(|| format!("--mqtt {mqtt:?}: bad port"))?,
    ))
}
