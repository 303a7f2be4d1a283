//! Proofs that a machine holds its key: its MQTT password, and its request for a tracker
//! passkey.
//!
//! The enrollment token is in every golden image, so it cannot tell machines apart. A
//! machine whose key the server already holds must prove possession of that key at every
//! login; otherwise anyone with the token could log in under its client id and kick it off
//! the broker. The password therefore carries both:
//!
//! ```text
//! bt1:<ts_ms>:<signature hex>:<enrollment token>
//! ```
//!
//! The signature covers a domain string (one per [`Purpose`], so that a proof made for one
//! use is worthless for the other) `‖ u64 BE length ‖ machine id ‖ i64 BE ts_ms`. The server checks it against the machine's known key, and only for a machine it
//! has never seen does the token alone admit it. `ts_ms` makes a proof go stale and lets the
//! server refuse a proof it has already accepted (a password sniffed off plain MQTT).

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use crate::id::MachineId;

/// Marks a password in this format; anything else is a bare token (agents before it).
const PREFIX: &str = "bt1:";

/// What a proof is for; each signs under its own domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The MQTT password ([`login_password`]).
    MqttLogin,
    /// Asking the server's HTTP API for the machine's tracker passkey ([`passkey_request`]).
    Passkey,
    /// Asking the server's HTTP API for a certificate to log in to an external broker with
    /// ([`certificate_request`]).
    Certificate,
}

impl Purpose {
    fn domain(self) -> &'static [u8] {
        match self {
            Purpose::MqttLogin => b"boottorrent-mqtt-login-v1\0",
            Purpose::Passkey => b"boottorrent-passkey-request-v1\0",
            Purpose::Certificate => b"boottorrent-broker-certificate-request-v1\0",
        }
    }
}

/// A parsed MQTT password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginPassword<'a> {
    /// The proof of key possession, if the password carries one.
    pub proof: Option<LoginProof>,
    /// The enrollment token part.
    pub token: &'a str,
}

/// A signature by the machine key over its id and a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginProof {
    /// When it was signed, Unix milliseconds.
    pub ts_ms: i64,
    signature: [u8; 64],
}

/// Why a login proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// The password has no proof, but the machine has a key.
    #[error("the password carries no proof of the machine key")]
    NoProof,
    /// The signature does not match the key and id.
    #[error("the login proof is not signed by the machine's key")]
    BadSignature,
    /// Signed too long ago or too far in the future.
    #[error("the login proof is {age_ms} ms old; at most {window_ms} ms either way is accepted")]
    Stale {
        /// now − ts, negative when from the future.
        age_ms: i64,
        /// The allowed distance.
        window_ms: i64,
    },
    /// Not newer than the last proof accepted for this machine.
    #[error("the login proof is not newer than the last one accepted (a replayed password)")]
    Replayed,
}

impl<'a> LoginPassword<'a> {
    /// Splits a password. A malformed `bt1:` password is treated as a bare token, which
    /// then fails the token comparison like any other wrong password.
    pub fn parse(password: &'a str) -> LoginPassword<'a> {
        let bare = LoginPassword {
            proof: None,
            token: password,
        };
        let Some(rest) = password.strip_prefix(PREFIX) else {
            return bare;
        };
        let mut parts = rest.splitn(3, ':');
        let (Some(ts), Some(sig), Some(token)) = (parts.next(), parts.next(), parts.next()) else {
            return bare;
        };
        let Ok(ts_ms) = ts.parse::<i64>() else {
            return bare;
        };
        let mut signature = [0u8; 64];
        if hex::decode_to_slice(sig, &mut signature).is_err() {
            return bare;
        }
        LoginPassword {
            proof: Some(LoginProof { ts_ms, signature }),
            token,
        }
    }
}

impl LoginProof {
    /// Checks the proof for `machine` against `key`: signature, clock window, and that it
    /// is newer than `last_ts_ms` (the last proof accepted for the machine, if any).
    pub fn verify(
        &self,
        purpose: Purpose,
        machine: &MachineId,
        key: &VerifyingKey,
        now_ms: i64,
        window_ms: i64,
        last_ts_ms: Option<i64>,
    ) -> Result<(), LoginError> {
        let signature = Signature::from_bytes(&self.signature);
        key.verify(&message(purpose, machine, self.ts_ms), &signature)
            .map_err(|_| LoginError::BadSignature)?;
        let age_ms = now_ms.saturating_sub(self.ts_ms);
        if age_ms.saturating_abs() > window_ms {
            return Err(LoginError::Stale { age_ms, window_ms });
        }
        if last_ts_ms.is_some_and(|last| self.ts_ms <= last) {
            return Err(LoginError::Replayed);
        }
        Ok(())
    }
}

/// The password for `machine` at `now_ms`: a proof signed with `key`, then `token`.
pub fn login_password(machine: &MachineId, key: &SigningKey, token: &str, now_ms: i64) -> String {
    proof(Purpose::MqttLogin, machine, key, token, now_ms)
}

/// The server's answer to a passkey request (`POST /api/v1/machines/{id}/passkey`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PasskeyAnswer {
    /// The machine the passkey is for.
    pub machine: MachineId,
    /// What the machine's announces and `.torrent` downloads carry in their path.
    pub passkey: String,
}

/// The tracker's answer to whether a peer at an address is in a torrent's swarm
/// (`GET /admitted/...`), which an agent asks before serving a peer that connected to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Admission {
    /// Whether the peer is in the swarm (and so may be served).
    pub admitted: bool,
}

/// The body of a passkey request for `machine` at `now_ms`, in the same format as a password
/// without a token; the server reads it with [`LoginPassword::parse`].
pub fn passkey_request(machine: &MachineId, key: &SigningKey, now_ms: i64) -> String {
    proof(Purpose::Passkey, machine, key, "", now_ms)
}

/// A machine's request for its broker certificate (`POST /api/v1/machines/{id}/certificate`):
/// the public key the certificate is to carry, and a proof by that key with the enrollment
/// token, in the format of [`login_password`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertificateRequest {
    /// The machine's Ed25519 public key, hex.
    pub public_key: String,
    /// `bt1:<ts_ms>:<signature hex>:<enrollment token>`, signed for [`Purpose::Certificate`].
    pub proof: String,
}

/// The server's answer to a [`CertificateRequest`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertificateAnswer {
    /// The machine the certificate is for (its CN).
    pub machine: MachineId,
    /// The certificate, PEM.
    pub certificate: String,
    /// The certificate of the CA that signed it, PEM.
    pub ca: String,
    /// When the certificate runs out, Unix milliseconds.
    pub not_after_ms: i64,
}

/// The certificate request of `machine` for its own `key`, with the enrollment `token`.
pub fn certificate_request(
    machine: &MachineId,
    key: &SigningKey,
    token: &str,
    now_ms: i64,
) -> CertificateRequest {
    CertificateRequest {
        public_key: hex::encode(key.verifying_key().to_bytes()),
        proof: proof(Purpose::Certificate, machine, key, token, now_ms),
    }
}

fn proof(purpose: Purpose, machine: &MachineId, key: &SigningKey, token: &str, ts: i64) -> String {
    let signature = key.sign(&message(purpose, machine, ts));
    format!("{PREFIX}{ts}:{}:{token}", hex::encode(signature.to_bytes()))
}

fn message(purpose: Purpose, machine: &MachineId, ts_ms: i64) -> Vec<u8> {
    let id = machine.as_str().as_bytes();
    let domain = purpose.domain();
    let mut bytes = Vec::with_capacity(domain.len() + 8 + id.len() + 8);
    bytes.extend_from_slice(domain);
    bytes.extend_from_slice(&(id.len() as u64).to_be_bytes());
    bytes.extend_from_slice(id);
    bytes.extend_from_slice(&ts_ms.to_be_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn id(s: &str) -> MachineId {
        s.parse().unwrap()
    }

    const NOW: i64 = 1_764_000_000_000;
    const WINDOW: i64 = 300_000;

    #[test]
    fn a_fresh_proof_verifies_and_carries_the_token() {
        let password = login_password(&id("pc-1"), &key(1), "tok:en", NOW);
        let parsed = LoginPassword::parse(&password);
        assert_eq!(parsed.token, "tok:en");
        let proof = parsed.proof.unwrap();
        assert_eq!(proof.ts_ms, NOW);
        proof
            .verify(
                Purpose::MqttLogin,
                &id("pc-1"),
                &key(1).verifying_key(),
                NOW + 10,
                WINDOW,
                None,
            )
            .unwrap();
    }

    #[test]
    fn a_proof_fails_for_another_machine_key_or_time() {
        let password = login_password(&id("pc-1"), &key(1), "t", NOW);
        let proof = LoginPassword::parse(&password).proof.unwrap();
        let good = key(1).verifying_key();
        assert_eq!(
            proof.verify(Purpose::MqttLogin, &id("pc-2"), &good, NOW, WINDOW, None),
            Err(LoginError::BadSignature)
        );
        assert_eq!(
            proof.verify(
                Purpose::MqttLogin,
                &id("pc-1"),
                &key(2).verifying_key(),
                NOW,
                WINDOW,
                None
            ),
            Err(LoginError::BadSignature)
        );
        assert!(matches!(
            proof.verify(
                Purpose::MqttLogin,
                &id("pc-1"),
                &good,
                NOW + WINDOW + 1,
                WINDOW,
                None
            ),
            Err(LoginError::Stale { .. })
        ));
        assert!(matches!(
            proof.verify(
                Purpose::MqttLogin,
                &id("pc-1"),
                &good,
                NOW - WINDOW - 1,
                WINDOW,
                None
            ),
            Err(LoginError::Stale { .. })
        ));
        assert_eq!(
            proof.verify(
                Purpose::MqttLogin,
                &id("pc-1"),
                &good,
                NOW,
                WINDOW,
                Some(NOW)
            ),
            Err(LoginError::Replayed)
        );
        proof
            .verify(
                Purpose::MqttLogin,
                &id("pc-1"),
                &good,
                NOW,
                WINDOW,
                Some(NOW - 1),
            )
            .unwrap();
    }

    #[test]
    fn a_changed_time_breaks_the_signature() {
        let password = login_password(&id("pc-1"), &key(1), "t", NOW);
        let forged = password.replacen(&NOW.to_string(), &(NOW + 1).to_string(), 1);
        let proof = LoginPassword::parse(&forged).proof.unwrap();
        assert_eq!(
            proof.verify(
                Purpose::MqttLogin,
                &id("pc-1"),
                &key(1).verifying_key(),
                NOW,
                WINDOW,
                None
            ),
            Err(LoginError::BadSignature)
        );
    }

    #[test]
    fn a_proof_for_one_purpose_is_worthless_for_the_other() {
        let body = passkey_request(&id("pc-1"), &key(1), NOW);
        let proof = LoginPassword::parse(&body).proof.unwrap();
        let good = key(1).verifying_key();
        proof
            .verify(Purpose::Passkey, &id("pc-1"), &good, NOW, WINDOW, None)
            .unwrap();
        assert_eq!(
            proof.verify(Purpose::MqttLogin, &id("pc-1"), &good, NOW, WINDOW, None),
            Err(LoginError::BadSignature)
        );
    }

    #[test]
    fn a_certificate_request_carries_its_key_and_proves_it_for_that_purpose_only() {
        let request = certificate_request(&id("pc-1"), &key(1), "token", NOW);
        assert_eq!(
            request.public_key,
            hex::encode(key(1).verifying_key().to_bytes())
        );
        let parsed = LoginPassword::parse(&request.proof);
        assert_eq!(parsed.token, "token");
        let proof = parsed.proof.unwrap();
        let good = key(1).verifying_key();
        proof
            .verify(Purpose::Certificate, &id("pc-1"), &good, NOW, WINDOW, None)
            .unwrap();
        for other in [Purpose::MqttLogin, Purpose::Passkey] {
            assert_eq!(
                proof.verify(other, &id("pc-1"), &good, NOW, WINDOW, None),
                Err(LoginError::BadSignature)
            );
        }
        // And an MQTT password is worthless as a certificate request.
        let password = login_password(&id("pc-1"), &key(1), "token", NOW);
        let proof = LoginPassword::parse(&password).proof.unwrap();
        assert_eq!(
            proof.verify(Purpose::Certificate, &id("pc-1"), &good, NOW, WINDOW, None),
            Err(LoginError::BadSignature)
        );
    }

    #[test]
    fn anything_else_is_a_bare_token() {
        for password in [
            "plain-token",
            "bt1:",
            "bt1:12:zz:tok",
            "bt1:x:00:tok",
            "bt1:12:00",
            "",
        ] {
            let parsed = LoginPassword::parse(password);
            assert_eq!(parsed.proof, None, "{password:?}");
            assert_eq!(parsed.token, password);
        }
    }
}
