//! Separate hosts on this machine for the tests that need real addresses: network namespaces
//! made by `scripts/testnet` (10.99.0.x, host 0 is 10.99.0.10), each link limited in rate.
//! Used by the multi-host tests and by the Transmission test, which needs a seeder at an
//! address that is not loopback.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use boottorrent_testkit::{output, require_tool};

fn testnet_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/testnet")
}

/// A network made by `scripts/testnet`, removed when dropped (and by the script's own watcher
/// if this process dies first).
pub struct Net {
    name: String,
}

impl Net {
    /// `hosts` hosts whose links carry `rate_mbit` each way. `None` (after saying so on
    /// stderr) when not root.
    pub fn up(hosts: usize, rate_mbit: u32) -> Option<Net> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!(
                "SKIPPED: this test creates network namespaces and needs root; run it as root \
                 (CI does)"
            );
            return None;
        }
        require_tool("ip", "iproute2");
        require_tool("tc", "iproute2");
        let gc = Command::new(testnet_script()).arg("gc").status().unwrap();
        assert!(gc.success());
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("m{}x{n}", std::process::id() % 1_000_000);
        let out = Command::new(testnet_script())
            .args(["up", &name, &hosts.to_string(), &rate_mbit.to_string()])
            .env("TESTNET_OWNER", std::process::id().to_string())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripts/testnet up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Net { name })
    }

    pub fn ip(host: usize) -> String {
        format!("10.99.0.{}", 10 + host)
    }

    /// `program args` inside `host`.
    pub fn command(&self, host: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(testnet_script());
        c.args(["exec", &self.name, &host.to_string()]).arg(program);
        c
    }

    pub fn link(&self, host: usize, up: bool) {
        let status = Command::new(testnet_script())
            .args(["link", &self.name, &host.to_string()])
            .arg(if up { "up" } else { "down" })
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Bytes host `host` has sent on its link.
    pub fn tx_bytes(&self, host: usize) -> u64 {
        let out = output({
            let mut c = self.command(host, "cat");
            c.arg("/sys/class/net/eth0/statistics/tx_bytes");
            c
        });
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new(testnet_script())
            .args(["down", &self.name])
            .status();
    }
}
