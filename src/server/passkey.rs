//! Per-machine tracker passkeys: only enrolled machines may fetch a `.torrent`, announce,
//! scrape, or get a byte from the server's seeder.
//!
//! A passkey is a MAC of the machine id under a key derived from the server's signing key, so
//! the server stores none and checks one without touching the database: deleting a machine
//! (or never approving it) is what revokes it, because the tracker also asks the [`Keyring`]
//! whether the machine is approved. A machine gets its passkey from the HTTP API by proving it
//! holds its key (`POST /api/v1/machines/{id}/passkey`); the server hands out torrents whose
//! announce URL carries it: `{public_url}/announce/{machine}/{passkey}`. The passkey never
//! travels over MQTT: the embedded broker's front keeps machines to their own topics, but an
//! external broker without those rules, or a listener added in a broker file, would not.
//!
//! A passkey opens only the images given to its machine ([`Grants`]): those of the
//! deployments that include it and are not cancelled. Every golden image carries the
//! enrollment token, and with `auto_approve` a made-up machine is approved like any other;
//! it must not get every image in the catalog (a staff image, an exam image) for that.
//!
//! [`Keyring`]: crate::server::keyring::Keyring

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use boottorrent_proto::{MachineId, SigningKey};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::server::keyring::Keyring;

/// The pseudo-machine of the server's own seeder.
pub const SEEDER: &str = "boottorrent-seeder";
/// The pseudo-machine of the operator's own clients (a `.torrent` fetched with the admin
/// token, for Transmission or aria2c on a technician's laptop).
pub const OPERATOR: &str = "admin";

/// Hex digits of a passkey: 128 bits.
const PASSKEY_HEX: usize = 32;

/// Which images (by info hash) each machine may fetch, kept by the fleet (the only writer)
/// for the tracker and the `.torrent` endpoint to read without asking the orchestrator.
#[derive(Clone, Default)]
pub struct Grants(Arc<RwLock<HashMap<MachineId, HashSet<[u8; 20]>>>>);

impl Grants {
    /// Sets what `machine` may fetch, replacing what it could before.
    pub fn set(&self, machine: &MachineId, info_hashes: HashSet<[u8; 20]>) {
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        if info_hashes.is_empty() {
            map.remove(machine);
        } else {
            map.insert(machine.clone(), info_hashes);
        }
    }

    /// Whether the machine `machine` may fetch the torrent `info_hash`.
    pub fn allows(&self, machine: &str, info_hash: &[u8; 20]) -> bool {
        let map = self.0.read().unwrap_or_else(|e| e.into_inner());
        // Looked up by the id as the URL spells it (no parse per announce): only a valid id
        // was ever stored, so anything else matches nothing.
        map.get(machine)
            .is_some_and(|granted| granted.contains(info_hash))
    }
}

#[derive(Clone)]
pub struct Passkeys {
    key: [u8; 32],
    keyring: Keyring,
    grants: Grants,
}

impl Passkeys {
    pub fn new(server_key: &SigningKey, keyring: Keyring, grants: Grants) -> Passkeys {
        // A key of its own, so that nothing signed or MACed here can stand for a signature.
        let mut hasher = Sha256::new();
        hasher.update(b"boottorrent-passkey-key-v1\0");
        hasher.update(server_key.to_bytes());
        Passkeys {
            key: hasher.finalize().into(),
            keyring,
            grants,
        }
    }

    /// Whether `holder` (whose passkey [`admits`](Self::admits) it) may fetch `info_hash`:
    /// the seeder and the operator every catalogued image, a machine the images given to it.
    pub fn may_fetch(&self, holder: &str, info_hash: &[u8; 20]) -> bool {
        holder == SEEDER || holder == OPERATOR || self.grants.allows(holder, info_hash)
    }

    /// The passkey of `machine` (a machine id, [`SEEDER`] or [`OPERATOR`]).
    pub fn passkey(&self, machine: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(b"boottorrent-passkey-v1\0");
        mac.update(machine.as_bytes());
        let tag = mac.finalize().into_bytes();
        hex::encode(&tag[..PASSKEY_HEX / 2])
    }

    /// Whether `passkey` admits `machine` now: it is the machine's, and the machine is the
    /// seeder, the operator, or an approved machine.
    pub fn admits(&self, machine: &str, passkey: &str) -> bool {
        let holder = machine == SEEDER
            || machine == OPERATOR
            || self.keyring.get(machine).is_some_and(|k| k.approved);
        // Computed for every announce: a cache per holder measured no faster (docs/benchmarks.md).
        holder
            && self
                .passkey(machine)
                .as_bytes()
                .ct_eq(passkey.as_bytes())
                .into()
    }

    /// The announce URL a machine's `.torrent` carries.
    pub fn announce_url(&self, public_url: &str, machine: &str) -> String {
        format!(
            "{}/announce/{machine}/{}",
            public_url.trim_end_matches('/'),
            self.passkey(machine)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boottorrent_proto::{MachineId, PublicKeyBytes};

    #[test]
    fn a_passkey_admits_its_approved_machine_only() {
        let keyring = Keyring::default();
        let passkeys = Passkeys::new(
            &SigningKey::from_bytes(&[3; 32]),
            keyring.clone(),
            Grants::default(),
        );
        let pc1: MachineId = "pc-1".parse().unwrap();
        let key = PublicKeyBytes::from([9; 32]);
        let pk = passkeys.passkey("pc-1");
        assert_eq!(pk.len(), PASSKEY_HEX);
        assert!(!passkeys.admits("pc-1", &pk), "unknown machine");
        keyring.set(&pc1, key, false);
        assert!(!passkeys.admits("pc-1", &pk), "waiting for approval");
        keyring.set(&pc1, key, true);
        assert!(passkeys.admits("pc-1", &pk));
        assert!(!passkeys.admits("pc-2", &pk), "another machine's passkey");
        assert!(!passkeys.admits("pc-1", &pk[..31]));
        keyring.remove(&pc1);
        assert!(!passkeys.admits("pc-1", &pk), "deleted");
        assert!(passkeys.admits(SEEDER, &passkeys.passkey(SEEDER)));
        // Another server key, other passkeys.
        let other = Passkeys::new(
            &SigningKey::from_bytes(&[4; 32]),
            Keyring::default(),
            Grants::default(),
        );
        assert_ne!(other.passkey("pc-1"), pk);
    }

    #[test]
    fn a_machine_may_fetch_only_the_images_given_to_it() {
        let grants = Grants::default();
        let passkeys = Passkeys::new(
            &SigningKey::from_bytes(&[3; 32]),
            Keyring::default(),
            grants.clone(),
        );
        let pc1: MachineId = "pc-1".parse().unwrap();
        let (given, other) = ([1; 20], [2; 20]);
        assert!(!passkeys.may_fetch("pc-1", &given), "nothing given yet");
        grants.set(&pc1, HashSet::from([given]));
        assert!(passkeys.may_fetch("pc-1", &given));
        assert!(!passkeys.may_fetch("pc-1", &other));
        assert!(!passkeys.may_fetch("pc-2", &given));
        assert!(!passkeys.may_fetch("not an id!", &given));
        assert!(passkeys.may_fetch(SEEDER, &other));
        assert!(passkeys.may_fetch(OPERATOR, &other));
        grants.set(&pc1, HashSet::new());
        assert!(!passkeys.may_fetch("pc-1", &given), "taken back");
    }
}
