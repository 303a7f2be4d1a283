//! The machine's certificate for an external broker (`broker_login = "certificate"`).
//!
//! A server run with `--broker` has no login check of its own in front of the broker, so the
//! broker verifies agents by certificate: the agent proves its key and shows the enrollment
//! token to the server's HTTP API and gets a certificate for its own Ed25519 key with CN = its
//! machine id (the private key never leaves the machine). It is kept in the store
//! ([`CERT_FILE`]) and renewed once half its life has passed, checked before every
//! connection; a broker checks certificates only at connect, so a session outlives its
//! certificate and the renewal happens at the next reconnect.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use boottorrent_proto::{CertificateAnswer, MachineId, Secret, SigningKey, certificate_request};
use rumqttc::{TlsConfiguration, Transport};
use serde::{Deserialize, Serialize};

/// File in the store holding the certificate, its CA and when it was fetched (JSON).
pub const CERT_FILE: &str = "broker-certificate.json";

/// The PKCS#8 v1 encoding of an Ed25519 private key is this prefix and the 32-byte seed
/// (RFC 8410, section 7): what rustls takes as a client key.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// What is kept in the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    /// The key the certificate carries, hex: a new machine key needs a new certificate.
    public_key: String,
    fetched_at_ms: i64,
    answer: CertificateAnswer,
}

/// Everything needed to fetch and use the certificate.
#[derive(Clone)]
pub struct CertLogin {
    pub machine: MachineId,
    pub key: SigningKey,
    pub token: Secret,
    pub http: reqwest::Client,
    pub http_url: String,
    pub data_dir: PathBuf,
    /// The broker's CA when configured (`tls_ca`); else the CA that signed the certificate.
    pub tls_ca: Option<PathBuf>,
}

impl CertLogin {
    fn path(&self) -> PathBuf {
        self.data_dir.join(CERT_FILE)
    }

    /// The stored certificate when it is for our key and has more than half its life left.
    fn stored(&self, now_ms: i64) -> Option<Stored> {
        let text = std::fs::read_to_string(self.path()).ok()?;
        let stored: Stored = serde_json::from_str(&text).ok()?;
        let ours = hex::encode(self.key.verifying_key().to_bytes());
        let half_life = (stored.answer.not_after_ms - stored.fetched_at_ms) / 2;
        (stored.public_key == ours
            && stored.answer.machine == self.machine
            && now_ms < stored.fetched_at_ms + half_life)
            .then_some(stored)
    }

    /// Whether the certificate in use should be renewed before the next connection.
    pub fn due(&self, now_ms: i64) -> bool {
        self.stored(now_ms).is_none()
    }

    /// The TLS transport with the stored certificate, fetching a new one first when it is
    /// missing or past half its life, or when `fresh`.
    pub async fn transport(&self, fresh: bool) -> anyhow::Result<Transport> {
        let now = boottorrent_proto::now_ms();
        let stored = match self.stored(now).filter(|_| !fresh) {
            Some(stored) => stored,
            None => self.fetch(now).await?,
        };
        transport(&stored.answer, &self.key, self.tls_ca.as_deref())
    }

    async fn fetch(&self, now_ms: i64) -> anyhow::Result<Stored> {
        let url = format!(
            "{}/api/v1/machines/{}/certificate",
            self.http_url.trim_end_matches('/'),
            self.machine
        );
        let request = certificate_request(&self.machine, &self.key, self.token.expose(), now_ms);
        let response = self
            .http
            .post(&url)
            .json(&request)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .with_context(|| format!("asking {url} for this machine's broker certificate"))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("{url} refused this machine's broker certificate ({status}): {body}");
        }
        let answer: CertificateAnswer = response
            .json()
            .await
            .with_context(|| format!("reading the certificate {url} sent"))?;
        if answer.machine != self.machine {
            bail!(
                "{url} sent a certificate for {} instead of {}",
                answer.machine,
                self.machine
            );
        }
        let stored = Stored {
            public_key: hex::encode(self.key.verifying_key().to_bytes()),
            fetched_at_ms: now_ms,
            answer,
        };
        let text = serde_json::to_string_pretty(&stored).context("encoding the certificate")?;
        let path = self.path();
        let temporary = path.with_extension("json.new");
        std::fs::write(&temporary, text)
            .and_then(|()| std::fs::rename(&temporary, &path))
            .with_context(|| format!("storing the broker certificate in {}", path.display()))?;
        tracing::info!(
            not_after_ms = stored.answer.not_after_ms,
            "got a broker certificate for this machine's key"
        );
        Ok(stored)
    }
}

fn transport(
    answer: &CertificateAnswer,
    key: &SigningKey,
    tls_ca: Option<&Path>,
) -> anyhow::Result<Transport> {
    let ca_pem = match tls_ca {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the TLS CA file {}", path.display()))?,
        None => answer.ca.clone(),
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots
            .add(cert.context("reading the broker's CA: not valid PEM")?)
            .context("adding the broker's CA as a root")?;
    }
    if roots.is_empty() {
        bail!("the broker's CA holds no PEM \"CERTIFICATE\" block");
    }
    let chain = rustls_pemfile::certs(&mut answer.certificate.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("reading the machine certificate: not valid PEM")?;
    let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
    pkcs8.extend_from_slice(&key.to_bytes());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(pkcs8.into());
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("setting up TLS")?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .context("using the machine certificate and key for TLS")?;
    Ok(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )))
}
