//! The machine keys the broker's login check reads.
//!
//! The registry (on the orchestrator's applier thread) is the only writer of machine keys; the
//! broker checks logins on rumqttd's own threads and cannot ask the orchestrator and wait. So
//! the registry mirrors every key it stores here, and the login check reads this map: a machine
//! the server has seen (approved or waiting) must log in with a proof by the key it showed,
//! and only an id missing here may log in with the enrollment token alone.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use boottorrent_proto::{MachineId, PublicKeyBytes};

/// Which key a machine must prove at login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginKey {
    pub key: PublicKeyBytes,
    /// Approved (trusted), or still waiting for the operator: a waiting machine may log in
    /// to present itself, but gets no tracker passkey.
    pub approved: bool,
    /// The newest login proof accepted, so a captured password cannot be used again.
    pub last_login_ms: Option<i64>,
}

/// Shared, cheap to clone.
#[derive(Clone, Default)]
pub struct Keyring {
    keys: Arc<RwLock<HashMap<MachineId, LoginKey>>>,
}

impl Keyring {
    /// The key `machine` must prove, if the server has seen it.
    pub fn get(&self, machine: &str) -> Option<LoginKey> {
        self.read().get(machine).copied()
    }

    /// Sets the key `machine` must prove from now on. A new key forgets the last login.
    pub fn set(&self, machine: &MachineId, key: PublicKeyBytes, approved: bool) {
        let mut keys = self.write();
        match keys.get_mut(machine.as_str()) {
            Some(entry) if entry.key == key => entry.approved = approved,
            Some(entry) => {
                *entry = LoginKey {
                    key,
                    approved,
                    last_login_ms: None,
                }
            }
            None => {
                keys.insert(
                    machine.clone(),
                    LoginKey {
                        key,
                        approved,
                        last_login_ms: None,
                    },
                );
            }
        }
    }

    /// How many machines the server has seen (approved or waiting).
    pub fn known(&self) -> usize {
        self.read().len()
    }

    /// Forgets `machine`: its id may enroll again with the token.
    pub fn remove(&self, machine: &MachineId) {
        self.write().remove(machine.as_str());
    }

    /// Records an accepted login proof, unless a newer one (a concurrent login) won.
    pub fn logged_in(&self, machine: &str, key: PublicKeyBytes, ts_ms: i64) {
        if let Some(entry) = self.write().get_mut(machine)
            && entry.key == key
            && entry.last_login_ms.is_none_or(|last| last < ts_ms)
        {
            entry.last_login_ms = Some(ts_ms);
        }
    }

    // A panic while holding the lock leaves the map as consistent as any single insert or
    // remove does, so a poisoned lock is still safe to use.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<MachineId, LoginKey>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<MachineId, LoginKey>> {
        self.keys.write().unwrap_or_else(|e| e.into_inner())
    }
}
