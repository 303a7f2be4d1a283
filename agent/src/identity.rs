//! Who this machine is and whom it trusts: its own Ed25519 key, and the server's pinned
//! public key.
//!
//! The machine key signs every event; the server trusts it at the machine's first `startup`
//! (or once the operator approves it), so it must survive restarts and image switches: it
//! lives in the machine's store ([`crate::store`]), `agent.key`, mode 0600, made on first use.
//! The server key verifies every command; it is pinned from the config (`server_key`), from
//! the `server.pub` that `boottorrent-agent enroll` wrote after showing its fingerprint
//! ([`Config::pin_file`]), or from the copy of it the store kept.

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
pub use boottorrent_proto::fingerprint;
use boottorrent_proto::{
    MachineId, PublicKeyBytes, SigningKey, VerifyingKey, generate_signing_key,
    signing_key_from_hex, signing_key_to_hex, verifying_key_from_bytes,
};

use crate::config::Config;
use crate::store::Store;

/// This machine's identity and the server key it trusts.
pub struct Identity {
    /// The machine id: MQTT username, topic segment and envelope sender.
    pub machine: MachineId,
    /// The machine's private key; signs every event.
    pub key: SigningKey,
    /// The server's public key; every command must verify with it.
    pub server_key: VerifyingKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("machine", &self.machine)
            .field(
                "public_key",
                &hex::encode(self.key.verifying_key().as_bytes()),
            )
            .field("server_key", &hex::encode(self.server_key.as_bytes()))
            .finish()
    }
}

impl Identity {
    /// Loads (or on first start creates) the machine key, and the pinned server key.
    pub fn load(config: &Config, store: &Store) -> anyhow::Result<Identity> {
        let machine = store.machine().clone();
        let server_key = pinned_server_key(config, store)?;
        let key = load_or_create_key(&store.key_file())?;
        Ok(Identity {
            machine,
            key,
            server_key,
        })
    }
}

/// The machine key in `path`, created (mode 0600, with its directory) when missing.
pub fn load_or_create_key(path: &Path) -> anyhow::Result<SigningKey> {
    match std::fs::read_to_string(path) {
        Ok(text) => signing_key_from_hex(&text)
            .with_context(|| format!("reading the machine key {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating the directory {}", dir.display()))?;
            }
            let key = generate_signing_key()
                .map_err(|e| anyhow::anyhow!("generating the machine key: {e}"))?;
            let mut file = create_private(path)
                .with_context(|| format!("creating the machine key {}", path.display()))?;
            writeln!(file, "{}", signing_key_to_hex(&key))
                .and_then(|()| file.sync_all())
                .with_context(|| format!("writing the machine key {}", path.display()))?;
            tracing::info!(file = %path.display(), "created this machine's key");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading the machine key {}", path.display())),
    }
}

/// Creates a new file readable only by its owner (on Unix; on Windows the data directory's
/// ACL, which grants SYSTEM and Administrators, protects it).
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

/// The server key to verify commands with: `server_key` from the config, else the key
/// `enroll` pinned ([`Config::pin_file`]), which the store then keeps, else the store's copy
/// (an image built without enrolling); none is an error telling to run `enroll`.
pub fn pinned_server_key(config: &Config, store: &Store) -> anyhow::Result<VerifyingKey> {
    let kept = store.server_key_file();
    let bytes = match config.server_key {
        Some(key) => key,
        None => match read_server_key_file(&config.pin_file())? {
            Some(key) => {
                if read_server_key_file(&kept).ok().flatten() != Some(key) {
                    // Best effort: the pin in the image still works without it.
                    match store_server_key(&kept, &key) {
                        Ok(()) => {
                            tracing::info!(file = %kept.display(), "the store keeps the pinned server key")
                        }
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "could not copy the pinned server key into the store")
                        }
                    }
                }
                key
            }
            None => match read_server_key_file(&kept)? {
                Some(key) => key,
                None => bail!(
                    "no server key is pinned: run `boottorrent-agent enroll` (it fetches the key \
                     from the server's /api/v1/server-key and stores it in {}), or set server_key \
                     in the config",
                    config.pin_file().display()
                ),
            },
        },
    };
    verifying_key_from_bytes(&bytes).context("the pinned server key")
}

/// The key in a `server.pub` file, `None` when the file does not exist.
pub fn read_server_key_file(path: &Path) -> anyhow::Result<Option<PublicKeyBytes>> {
    match std::fs::read_to_string(path) {
        Ok(text) => PublicKeyBytes::from_hex(text.trim())
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| {
                format!(
                    "reading the server key {}: expected 64 hex digits",
                    path.display()
                )
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading the server key {}", path.display())),
    }
}

/// Writes `key` to `path` durably: a crash leaves the old file or the new one.
pub fn store_server_key(path: &Path, key: &PublicKeyBytes) -> anyhow::Result<()> {
    boottorrent_swarm::storage::write_durably(path, format!("{}\n", key.to_hex()).as_bytes())
        .with_context(|| format!("writing the server key {}", path.display()))
}

/// Fetches the server's public key from `GET {http_url}/api/v1/server-key`.
pub async fn fetch_server_key(http_url: &str) -> anyhow::Result<PublicKeyBytes> {
    let url = format!("{}/api/v1/server-key", http_url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .context("building the HTTP client")?;
    let response = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("fetching {url}"))?;
    let status = response.status();
    if !status.is_success() {
        bail!("fetching {url}: the server answered {status}");
    }
    let answer: boottorrent_proto::ServerKeyAnswer = response
        .json()
        .await
        .with_context(|| format!("reading the answer of {url}"))?;
    let key = PublicKeyBytes::from_hex(answer.public_key.trim())
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("{url} returned a public key that is not 64 hex digits"))?;
    verifying_key_from_bytes(&key).with_context(|| format!("the key from {url}"))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_key_file_round_trips_and_missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("server.pub");
        assert_eq!(read_server_key_file(&path).unwrap(), None);
        let key = PublicKeyBytes::from(generate_signing_key().unwrap().verifying_key().to_bytes());
        store_server_key(&path, &key).unwrap();
        assert_eq!(read_server_key_file(&path).unwrap(), Some(key));
        std::fs::write(&path, "nope").unwrap();
        let err = read_server_key_file(&path).unwrap_err();
        assert!(format!("{err:#}").contains("server.pub"), "{err:#}");
    }

    #[test]
    fn no_pinned_key_says_to_enroll() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: Some(dir.path().to_owned()),
            ..Config::default()
        };
        let store = Store::open(dir.path(), Some(&"pc-1".parse().unwrap())).unwrap();
        let err = pinned_server_key(&config, &store).unwrap_err();
        assert!(err.to_string().contains("enroll"), "{err}");
    }

    #[test]
    fn the_store_keeps_the_pin_for_images_built_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let image = Config {
            data_dir: Some(dir.path().join("image")),
            ..Config::default()
        };
        let store = Store::open(&dir.path().join("store"), Some(&"pc-1".parse().unwrap())).unwrap();
        let key = PublicKeyBytes::from(generate_signing_key().unwrap().verifying_key().to_bytes());
        store_server_key(&image.pin_file(), &key).unwrap();
        assert_eq!(
            pinned_server_key(&image, &store).unwrap().to_bytes(),
            *key.as_ref()
        );
        // The next image was built without enrolling: the store's copy serves.
        let unenrolled = Config {
            data_dir: Some(dir.path().join("other-image")),
            ..Config::default()
        };
        assert_eq!(
            pinned_server_key(&unenrolled, &store).unwrap().to_bytes(),
            *key.as_ref()
        );
    }

    #[test]
    fn key_is_created_once_in_a_new_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new").join("agent.key");
        let first = load_or_create_key(&path).unwrap();
        let second = load_or_create_key(&path).unwrap();
        assert_eq!(first.to_bytes(), second.to_bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
