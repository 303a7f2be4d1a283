//! A verified image is sealed: read-only on disk, and opened only for reading from then on.
//!
//! The golden image is what the swarm serves and what every boot child reads through (see
//! [`crate::child`]). Once its SHA-256 matched, nothing on this machine has a reason to write
//! it, so it is made read-only (the file's read-only attribute on Windows, no write bits
//! elsewhere), and the agent's next start seeds it through a read-only handle. A program that
//! tries to open it for writing (a user mounting it read-write, a backup tool restoring over
//! it) is refused by the system instead of silently changing what peers download and what
//! children read. Windows also refuses to delete a read-only file, so the agent unseals an
//! image before it deletes it or downloads into it again.
//!
//! The administrator on Linux passes over the missing write bits; what protects the golden
//! there is that the agent never opens it for writing once staged. If the golden changed
//! anyway, the swarm's check at the next start finds it, and the agent downloads what differs.

use std::io;
use std::path::Path;

/// Makes the verified image at `path` read-only.
pub fn seal(path: &Path) -> io::Result<()> {
    set_writable(path, false)
}

/// Makes the image at `path` writable again, so it can be deleted or downloaded into; a
/// missing file is nothing to unseal.
pub fn unseal(path: &Path) -> io::Result<()> {
    match set_writable(path, true) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Whether the image at `path` is sealed.
#[cfg(test)]
pub fn is_sealed(path: &Path) -> io::Result<bool> {
    Ok(std::fs::metadata(path)?.permissions().readonly())
}

#[cfg(unix)]
fn set_writable(path: &Path, writable: bool) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // Owner-writable only: the agent writes as itself, and nobody else should.
    let mode = if writable { 0o644 } else { 0o444 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_writable(path: &Path, writable: bool) -> io::Result<()> {
    let mut permissions = std::fs::metadata(path)?.permissions();
    // On Windows this is the file's read-only attribute and nothing else.
    #[allow(clippy::permissions_set_readonly_false)]
    permissions.set_readonly(!writable);
    std::fs::set_permissions(path, permissions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_image_is_read_only_and_unsealing_makes_it_deletable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("golden.vhdx");
        std::fs::write(&path, b"image").unwrap();
        assert!(!is_sealed(&path).unwrap());
        seal(&path).unwrap();
        assert!(is_sealed(&path).unwrap());
        unseal(&path).unwrap();
        assert!(!is_sealed(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        unseal(&path).expect("a missing image is nothing to unseal");
    }
}
