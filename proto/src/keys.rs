//! Ed25519 key helpers: generation, hex storage of signing keys, and public-key checks.
//!
//! Errors about a signing key never echo its text, since that text is the secret.

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::message::PublicKeyBytes;

/// Why key material was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A hex signing key has the wrong length.
    #[error("signing key must be 64 hex characters, found {len}")]
    Length {
        /// Characters found, after trimming whitespace.
        len: usize,
    },
    /// A hex signing key holds a non-hex character (not shown: it is part of a secret).
    #[error("signing key has a non-hex character at index {index}")]
    NotHex {
        /// Its position, after trimming whitespace.
        index: usize,
    },
    /// The public key is not a valid Ed25519 point.
    #[error("public key {key} is not a valid Ed25519 point")]
    InvalidPublicKey {
        /// The key, hex.
        key: PublicKeyBytes,
    },
    /// The public key has small order, so signatures by it prove nothing.
    #[error("public key {key} is a weak (small-order) Ed25519 key")]
    WeakPublicKey {
        /// The key, hex.
        key: PublicKeyBytes,
    },
}

/// A new signing key from the operating system's random source.
pub fn generate_signing_key() -> Result<SigningKey, getrandom::Error> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The signing key's 32-byte seed as 64 lowercase hex characters, for a key file.
pub fn signing_key_to_hex(key: &SigningKey) -> String {
    hex::encode(key.to_bytes())
}

/// Parses a key written by [`signing_key_to_hex`]; surrounding whitespace (a trailing
/// newline in a key file) is ignored.
pub fn signing_key_from_hex(text: &str) -> Result<SigningKey, KeyError> {
    let text = text.trim();
    if text.len() != 64 {
        return Err(KeyError::Length {
            len: text.chars().count(),
        });
    }
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text, &mut seed).map_err(|e| match e {
        hex::FromHexError::InvalidHexCharacter { index, .. } => KeyError::NotHex { index },
        // Length was checked above, so only a bad character can fail; reporting the
        // length again is the honest fallback.
        _ => KeyError::Length { len: text.len() },
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// A short, readable digest of a public key for comparing it by eye (the agent prints it,
/// the operator approves it): `SHA256:` and the first 16 bytes of its SHA-256 in groups of
/// four hex digits.
pub fn fingerprint(key: &PublicKeyBytes) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.0);
    let groups: Vec<String> = digest[..16].chunks(2).map(hex::encode).collect();
    format!("SHA256:{}", groups.join(":"))
}

/// The verifying key in `bytes`, refusing invalid and weak (small-order) keys so that a
/// machine cannot register a key that would make forged signatures verify.
pub fn verifying_key_from_bytes(bytes: &PublicKeyBytes) -> Result<VerifyingKey, KeyError> {
    let key = VerifyingKey::from_bytes(&bytes.0)
        .map_err(|_| KeyError::InvalidPublicKey { key: *bytes })?;
    if key.is_weak() {
        return Err(KeyError::WeakPublicKey { key: *bytes });
    }
    Ok(key)
}

/// The server's answer to `GET /api/v1/server-key`, which agents fetch before they hold any
/// credential (and compare its fingerprint out of band).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServerKeyAnswer {
    /// Always `ed25519`.
    pub algorithm: String,
    /// The key's 32 bytes as 64 hex digits.
    pub public_key: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Bytes;

    #[test]
    fn fingerprint_is_stable_and_readable() {
        // sha256 of 32 zero bytes starts 66687aadf862bd776c8fc18b8e9f8e20.
        assert_eq!(
            fingerprint(&PublicKeyBytes::from([0; 32])),
            "SHA256:6668:7aad:f862:bd77:6c8f:c18b:8e9f:8e20"
        );
        assert_ne!(
            fingerprint(&PublicKeyBytes::from([1; 32])),
            fingerprint(&PublicKeyBytes::from([0; 32]))
        );
    }

    #[test]
    fn generated_keys_differ_and_round_trip_through_hex() {
        let a = generate_signing_key().unwrap();
        let b = generate_signing_key().unwrap();
        assert_ne!(a.to_bytes(), b.to_bytes());
        let text = signing_key_to_hex(&a);
        assert_eq!(text.len(), 64);
        let back = signing_key_from_hex(&format!("  {text}\n")).unwrap();
        assert_eq!(back.to_bytes(), a.to_bytes());
    }

    #[test]
    fn bad_hex_is_refused_without_echoing_it() {
        assert_eq!(
            signing_key_from_hex("abcd").unwrap_err(),
            KeyError::Length { len: 4 }
        );
        assert_eq!(
            signing_key_from_hex("").unwrap_err(),
            KeyError::Length { len: 0 }
        );
        let mut text = "0".repeat(64);
        text.replace_range(10..11, "Q");
        let err = signing_key_from_hex(&text).unwrap_err();
        assert_eq!(err, KeyError::NotHex { index: 10 });
        assert!(!err.to_string().contains('Q'), "{err}");
        // 64 bytes but 32 characters: the first byte is already not hex.
        assert_eq!(
            signing_key_from_hex(&"é".repeat(32)).unwrap_err(),
            KeyError::NotHex { index: 0 }
        );
        assert_eq!(
            signing_key_from_hex(&"é".repeat(33)).unwrap_err(),
            KeyError::Length { len: 33 }
        );
    }

    #[test]
    fn public_keys_are_checked() {
        let key = generate_signing_key().unwrap().verifying_key();
        assert_eq!(
            verifying_key_from_bytes(&Bytes(key.to_bytes())).unwrap(),
            key
        );
        // The identity point has small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(matches!(
            verifying_key_from_bytes(&Bytes(identity)),
            Err(KeyError::WeakPublicKey { .. })
        ));
        // y = 2 is not on the curve.
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        let err = verifying_key_from_bytes(&Bytes(off_curve)).unwrap_err();
        assert!(matches!(err, KeyError::InvalidPublicKey { .. }));
        assert!(err.to_string().contains("0200"), "{err}");
    }
}
