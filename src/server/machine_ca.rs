//! The machine CA: certificates an external broker verifies agents by.
//!
//! With the embedded broker, an agent's login is checked by our own code (a proof signed with
//! its key, see `broker`); a site's mosquitto or EMQX cannot run that check, but it can verify
//! a client certificate and take the login name from it. So the server is a small certificate
//! authority for its machines: an agent proves its key and presents the enrollment token over
//! HTTP (`http::certificates`), and gets a certificate with CN = its machine id for its *own*
//! Ed25519 key (its private key never leaves it), valid [`MACHINE_CERT_VALIDITY`]. The broker
//! takes the CN as the username and client id, and its ACL keeps that name to its own topics.
//!
//! The CA's key and certificate live in the data directory (created on first need, key mode
//! 0600). The same CA signs the orchestrator's client certificate (CN = its reserved id) and,
//! for `boottorrent broker-config`, the broker's own server certificate.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};

use crate::server::credentials::write_private;

/// The CA certificate in the data directory (PEM); brokers trust it for client logins.
pub const CA_CERT_FILE: &str = "machine-ca.crt";
/// The CA's private key (PKCS#8 PEM, mode 0600).
pub const CA_KEY_FILE: &str = "machine-ca.key";
/// How long a machine's certificate is valid. Short, because a broker checks no revocation:
/// a machine the operator deletes keeps its broker login until its certificate runs out.
/// Agents renew at half of it.
pub const MACHINE_CERT_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long the CA itself and the certificates of the server and broker are valid.
const LONG_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// Allowance for clocks behind ours: certificates start this long before they are made.
const BACKDATE: Duration = Duration::from_secs(3600);
/// The PKCS#8 v1 encoding of an Ed25519 private key is this prefix and the 32-byte seed
/// (RFC 8410, section 7).
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// The CA's name; fixed, so that its issuer name is the same after a restart.
const CA_NAME: &str = "BootTorrent machine CA";

/// The loaded CA.
pub struct MachineCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// An Ed25519 public key as rcgen signs it into a certificate.
struct Ed25519Public<'a>(&'a [u8; 32]);

impl PublicKeyData for Ed25519Public<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

/// A certificate and the new key it was made for, both PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl MachineCa {
    /// Loads the CA from `data_dir`, or creates it there on first use.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<MachineCa> {
        let cert_path = data_dir.join(CA_CERT_FILE);
        let key_path = data_dir.join(CA_KEY_FILE);
        let (key, cert_pem) = match (key_path.exists(), cert_path.exists()) {
            (true, true) => {
                let key_pem = std::fs::read_to_string(&key_path)
                    .with_context(|| format!("reading {}", key_path.display()))?;
                let key = KeyPair::from_pem(&key_pem)
                    .with_context(|| format!("{} is not a PEM private key", key_path.display()))?;
                let cert_pem = std::fs::read_to_string(&cert_path)
                    .with_context(|| format!("reading {}", cert_path.display()))?;
                (key, cert_pem)
            }
            (false, false) => {
                let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)
                    .context("generating the machine CA key")?;
                let cert = ca_params()?
                    .self_signed(&key)
                    .context("signing the machine CA certificate")?;
                write_private(&key_path, key.serialize_pem().trim_end())?;
                std::fs::write(&cert_path, cert.pem())
                    .with_context(|| format!("writing {}", cert_path.display()))?;
                tracing::info!(cert = %cert_path.display(), "created the machine CA");
                (key, cert.pem())
            }
            _ => bail!(
                "the data directory {} holds only one of {CA_CERT_FILE} and {CA_KEY_FILE}; \
                 restore the other, or remove both to make a new machine CA (every machine \
                 certificate and broker configuration made from the old one must then be made \
                 again)",
                data_dir.display()
            ),
        };
        Ok(MachineCa {
            issuer: Issuer::new(ca_params()?, key),
            cert_pem,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A client certificate for `machine`'s own Ed25519 `public_key`, valid
    /// [`MACHINE_CERT_VALIDITY`] from `now_ms`; PEM, and when it runs out (Unix ms).
    pub fn issue_machine(
        &self,
        machine: &str,
        public_key: &[u8; 32],
        now_ms: i64,
    ) -> anyhow::Result<(String, i64)> {
        let (params, not_after_ms) = leaf_params(machine, now_ms, MACHINE_CERT_VALIDITY)?;
        let cert = params
            .signed_by(&Ed25519Public(public_key), &self.issuer)
            .with_context(|| format!("signing the certificate of {machine}"))?;
        Ok((cert.pem(), not_after_ms))
    }

    /// A client certificate with a new key: the orchestrator's login to the broker.
    pub fn issue_client_with_key(&self, name: &str, now_ms: i64) -> anyhow::Result<Issued> {
        // PKCS#8 v1 (RFC 8410: a fixed prefix and the 32-byte seed): ring's own encoding (v2,
        // with the public key) is refused by OpenSSL 3, and so by mosquitto's clients.
        let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).context("generating a client key")?;
        pkcs8.extend_from_slice(&seed);
        let key = KeyPair::try_from(pkcs8.as_slice()).context("reading the new client key")?;
        let (params, _) = leaf_params(name, now_ms, LONG_VALIDITY)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("signing the certificate of {name}"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A TLS server certificate with a new key for a broker reached as `names` (host names
    /// or IP addresses).
    pub fn issue_server_with_key(&self, names: &[String], now_ms: i64) -> anyhow::Result<Issued> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("generating the broker's key")?;
        let first = names.first().map_or("broker", String::as_str);
        let (mut params, _) = leaf_params(first, now_ms, LONG_VALIDITY)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => name
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e| anyhow::anyhow!("{name:?} is not a host name: {e}")),
            })
            .collect::<anyhow::Result<_>>()?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing the broker's certificate")?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// What the certificate endpoint needs: the CA and the enrollment token. New ids go through
/// the registry's enrollment gate, as a first `startup` does.
pub struct Certificates {
    pub ca: MachineCa,
    pub enroll_token: crate::server::config::Secret,
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = boottorrent_proto::now_ms();
    params.not_before = at(now - BACKDATE.as_millis() as i64)?;
    params.not_after = at(now + LONG_VALIDITY.as_millis() as i64)?;
    Ok(params)
}

/// A client certificate's parameters: CN = `name`, valid `validity` from `now_ms`.
fn leaf_params(
    name: &str,
    now_ms: i64,
    validity: Duration,
) -> anyhow::Result<(CertificateParams, i64)> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let mut serial = [0u8; 16];
    getrandom::fill(&mut serial).context("drawing a certificate serial number")?;
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let not_after_ms = now_ms + validity.as_millis() as i64;
    params.not_before = at(now_ms - BACKDATE.as_millis() as i64)?;
    params.not_after = at(not_after_ms)?;
    Ok((params, not_after_ms))
}

fn at(ms: i64) -> anyhow::Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .with_context(|| format!("{ms} ms is not a time a certificate can hold"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, UnixTime};

    use super::*;

    /// Whether `cert_pem` is a client certificate a TLS server trusting `ca_pem` accepts, by
    /// rustls's own verifier (chain, signature, validity, client-auth usage).
    fn accepted(ca_pem: &str, cert_pem: &str) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let cert: CertificateDer = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        verifier
            .verify_client_cert(&cert, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn machine_certificates_chain_to_the_ca_also_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let ca = MachineCa::load_or_create(dir.path()).unwrap();
        let machine_key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let public = machine_key.verifying_key().to_bytes();
        let now = boottorrent_proto::now_ms();
        let (cert, not_after) = ca.issue_machine("pc-1", &public, now).unwrap();
        assert_eq!(not_after - now, MACHINE_CERT_VALIDITY.as_millis() as i64);
        accepted(ca.cert_pem(), &cert).unwrap();

        // Loaded again from the data directory: the same CA, whose new certificates the old
        // CA certificate (the one brokers hold) still verifies.
        let again = MachineCa::load_or_create(dir.path()).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        let (cert, _) = again.issue_machine("pc-2", &public, now).unwrap();
        accepted(ca.cert_pem(), &cert).unwrap();

        // Another CA's certificates are not accepted.
        let other_dir = tempfile::tempdir().unwrap();
        let other = MachineCa::load_or_create(other_dir.path()).unwrap();
        let (foreign, _) = other.issue_machine("pc-1", &public, now).unwrap();
        assert!(accepted(ca.cert_pem(), &foreign).is_err());

        // The orchestrator's client certificate too; and half a CA on disk is an error.
        let client = ca
            .issue_client_with_key("boottorrent-orchestrator", now)
            .unwrap();
        accepted(ca.cert_pem(), &client.cert_pem).unwrap();
        std::fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        let err = MachineCa::load_or_create(dir.path()).err().unwrap();
        assert!(err.to_string().contains("only one of"), "{err}");
    }
}
