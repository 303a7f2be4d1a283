//! The server's secrets: enrollment token, admin token, viewer token and Ed25519 signing key.
//!
//! Each is taken from configuration when given there, otherwise read from the data directory,
//! otherwise generated on first start and written there with mode 0600. Generated tokens are
//! printed once, because the operator needs them to enroll agents and to use the API.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, bail};
use boottorrent_proto::{
    SigningKey, generate_signing_key, signing_key_from_hex, signing_key_to_hex,
};
use subtle::ConstantTimeEq;

use crate::server::config::{Config, Secret};

/// File names inside the data directory.
pub const ENROLL_TOKEN_FILE: &str = "enroll.token";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const VIEWER_TOKEN_FILE: &str = "viewer.token";
pub const SERVER_KEY_FILE: &str = "server.key";

/// The secrets a running server holds.
pub struct Credentials {
    pub enroll_token: Secret,
    pub admin_token: Secret,
    /// Reads the HTTP API, changes nothing.
    pub viewer_token: Secret,
    pub server_key: SigningKey,
}

impl Credentials {
    /// Loads or creates every secret for `config`.
    pub fn load_or_create(config: &Config) -> anyhow::Result<Credentials> {
        let dir = &config.data_dir;
        let enroll_token = match &config.enroll_token {
            Some(t) => t.clone(),
            None => token_file(
                dir,
                ENROLL_TOKEN_FILE,
                "enrollment token (agents' MQTT password)",
            )?,
        };
        let admin_token = match &config.admin_token {
            Some(t) => t.clone(),
            None => token_file(dir, ADMIN_TOKEN_FILE, "admin token")?,
        };
        let viewer_token = match &config.viewer_token {
            Some(t) => t.clone(),
            None => token_file(
                dir,
                VIEWER_TOKEN_FILE,
                "viewer token (reads the HTTP API, changes nothing)",
            )?,
        };
        // A viewer token equal to the admin token would make every wall display an admin.
        if token_matches(&admin_token, viewer_token.expose()) {
            bail!(
                "the viewer token is the admin token; give the viewer its own token \
                 (viewer_token, BOOTTORRENT_VIEWER_TOKEN, or delete {} to generate one)",
                dir.join(VIEWER_TOKEN_FILE).display()
            );
        }
        let server_key = server_key(dir)?;
        Ok(Credentials {
            enroll_token,
            admin_token,
            viewer_token,
            server_key,
        })
    }
}

/// Compares a presented token with the expected one in constant time, so the comparison does
/// not leak how many leading characters were right.
pub fn token_matches(expected: &Secret, presented: &str) -> bool {
    expected
        .expose()
        .as_bytes()
        .ct_eq(presented.as_bytes())
        .into()
}

/// Reads the admin token a local server wrote, for the client commands.
pub fn read_admin_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let token = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading the admin token from {}; pass --token or set BOOTTORRENT_TOKEN, \
             or point --data-dir at the server's data directory",
            path.display()
        )
    })?;
    Ok(token.trim().to_owned())
}

fn token_file(dir: &Path, name: &str, what: &str) -> anyhow::Result<Secret> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let token = Secret::new(text.trim().to_owned());
            crate::server::config::validate_token(&token, what)
                .with_context(|| format!("checking {}", path.display()))?;
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = Secret::new(random_hex(24)?);
            write_private(&path, token.expose())?;
            // Printed, not logged: the operator needs it once, log files should not keep it.
            println!(
                "Generated {what}, saved to {}:\n  {}",
                path.display(),
                token.expose()
            );
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn server_key(dir: &Path) -> anyhow::Result<SigningKey> {
    let path = dir.join(SERVER_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => signing_key_from_hex(&text).with_context(|| {
            format!(
                "reading the server's signing key from {}; it should hold 64 hex digits. \
                 Restore it from backup: agents pin this key, a new one locks them out",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate_signing_key()
                .map_err(|e| anyhow::anyhow!("generating the server key: {e}"))?;
            write_private(&path, &signing_key_to_hex(&key))?;
            tracing::info!(path = %path.display(), "generated the server's signing key");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| anyhow::anyhow!("reading random bytes: {e}"))?;
    Ok(hex::encode(buf))
}

/// Writes a secret so that only the owner can read it, and fsyncs it: a token the operator has
/// seen printed must survive a crash.
pub(crate) fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    let mode = file.metadata()?.permissions().mode() & 0o777;
    if mode != 0o600 {
        bail!("{} has mode {mode:o}, expected 600", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_are_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let first = Credentials::load_or_create(&config).unwrap();
        for name in [
            ENROLL_TOKEN_FILE,
            ADMIN_TOKEN_FILE,
            VIEWER_TOKEN_FILE,
            SERVER_KEY_FILE,
        ] {
            let mode = std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        let second = Credentials::load_or_create(&config).unwrap();
        assert_eq!(first.enroll_token, second.enroll_token);
        assert_eq!(first.admin_token, second.admin_token);
        assert_eq!(first.viewer_token, second.viewer_token);
        assert_ne!(first.enroll_token, first.admin_token);
        assert_ne!(first.viewer_token, first.admin_token);
        assert_eq!(first.server_key.to_bytes(), second.server_key.to_bytes());
    }

    #[test]
    fn corrupt_server_key_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SERVER_KEY_FILE), "not hex").unwrap();
        let config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let err = Credentials::load_or_create(&config).err().unwrap();
        assert!(format!("{err:#}").contains("server.key"), "{err:#}");
    }

    #[test]
    fn a_viewer_token_equal_to_the_admin_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let same = Secret::new("0123456789abcdef0123".into());
        let config = Config {
            data_dir: dir.path().to_owned(),
            admin_token: Some(same.clone()),
            viewer_token: Some(same),
            ..Config::default()
        };
        let err = Credentials::load_or_create(&config).err().unwrap();
        assert!(
            format!("{err:#}").contains("viewer token is the admin token"),
            "{err:#}"
        );
    }

    #[test]
    fn token_comparison() {
        let t = Secret::new("0123456789abcdef0123".into());
        assert!(token_matches(&t, "0123456789abcdef0123"));
        assert!(!token_matches(&t, "0123456789abcdef012"));
        assert!(!token_matches(&t, ""));
    }
}
