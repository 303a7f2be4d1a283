//! Ports for the servers under test.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where test ports come from when the kernel's ephemeral range cannot be read.
const DEFAULT_EPHEMERAL_LOW: u16 = 32768;
/// The lowest port handed out: clear of the well-known and common service ports.
const LOWEST: u16 = 10000;

/// A port that nothing listens on now and that no other test of this process will be given.
///
/// The port is taken from *below* the kernel's ephemeral range. `bind(":0")` and drop, the
/// obvious way, hands out a port from inside that range, and before the server under test
/// binds it the kernel may give the same port to any outgoing connection (an agent's MQTT
/// client, a tracker announce) as its local port: CI saw the server fail with "Address
/// already in use" that way. Below the range only another test can take it; within this
/// process a counter rules that out, and a start that depends on the process id keeps test
/// binaries that run one after another (with processes of the last one maybe still exiting)
/// apart.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let high = ephemeral_low().max(LOWEST + 1000);
    let span = u32::from(high - LOWEST);
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOWEST + ((start + n) % span) as u16;
        // The wildcard address fails if anything holds the port on any IPv4 address.
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port between {LOWEST} and {high}");
}

/// The first port of the kernel's range for outgoing connections' local ports.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_LOW)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        let low = ephemeral_low();
        for port in ports {
            assert!((LOWEST..low.max(LOWEST + 1000)).contains(&port), "{port}");
            TcpListener::bind(("127.0.0.1", port)).expect("a handed-out port binds");
        }
    }
}
