//! `boottorrent-agent identity` as a real process.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn identity(key_file: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_boottorrent-agent"))
        .arg("identity")
        .arg("--key-file")
        .arg(key_file)
        .output()
        .unwrap()
}

#[test]
fn identity_is_created_once_private_and_stable() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("agent.key");
    let first = identity(&key_file);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let public = String::from_utf8(first.stdout).unwrap();
    assert_eq!(public.trim().len(), 64, "{public}");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let second = identity(&key_file);
    assert_eq!(String::from_utf8(second.stdout).unwrap(), public);
}

#[test]
fn corrupt_key_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("broken.key");
    std::fs::write(&key_file, "zz").unwrap();
    let out = identity(&key_file);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.key"));
}
