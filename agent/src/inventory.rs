//! What the machine reports about itself in `startup`: host name, OS, addresses, free disk.
//!
//! Everything here is best effort: a value that cannot be read is reported empty (or 0) and
//! logged at debug, never an error, because an agent that cannot describe its network card
//! must still be able to download an image.

use std::io;
use std::net::IpAddr;
use std::path::Path;

/// The machine as the server sees it in `startup`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inventory {
    /// Host name (`unknown` when it cannot be read).
    pub hostname: String,
    /// Operating system name and version.
    pub os: String,
    /// Addresses of the machine's interfaces, loopback and IPv6 link-local left out.
    pub ips: Vec<IpAddr>,
    /// MAC addresses (`aa:bb:cc:dd:ee:ff`) of its network cards.
    pub macs: Vec<String>,
    /// Free space in bytes, for unprivileged users, on the file system of the data dir.
    pub free_disk_bytes: u64,
}

/// Collects the inventory. `data_dir` is where images go; `route_probe` (the server's
/// address) finds the interface towards the server where interfaces cannot be listed.
pub fn collect(data_dir: &Path, route_probe: Option<(&str, u16)>) -> Inventory {
    let mut ips = interface_ips();
    if ips.is_empty()
        && let Some(ip) = route_probe.and_then(|(host, port)| local_ip_towards(host, port))
    {
        ips.push(ip);
    }
    let free_disk_bytes = free_disk_bytes(data_dir).unwrap_or_else(|e| {
        tracing::debug!(dir = %data_dir.display(), error = %e, "cannot read free disk space");
        0
    });
    Inventory {
        hostname: boottorrent_proto::hostname().unwrap_or_else(|| "unknown".to_owned()),
        os: os_description(),
        ips,
        macs: macs(),
        free_disk_bytes,
    }
}

/// Free bytes available to unprivileged users on the file system holding `path` (or its
/// nearest existing ancestor, so that a data dir yet to be made still has an answer).
pub fn free_disk_bytes(path: &Path) -> io::Result<u64> {
    let existing = path
        .ancestors()
        .find(|p| !p.as_os_str().is_empty() && p.exists())
        .unwrap_or(Path::new("."));
    free_disk_bytes_at(existing)
}

#[cfg(unix)]
fn free_disk_bytes_at(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    // SAFETY: `stat` is plain data that statvfs fills in; the path is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // The field widths differ between platforms; u64 holds all of them.
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    Ok(u64::from(stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

#[cfg(windows)]
fn free_disk_bytes_at(path: &Path) -> io::Result<u64> {
    use std::os::windows::ffi::OsStrExt;
    let wide: Vec<u16> = path.as_os_str().encode_wide().chain(Some(0)).collect();
    let mut available: u64 = 0;
    // SAFETY: `wide` is NUL-terminated and lives across the call; the out-pointers are valid
    // and the two we do not need may be null.
    let ok = unsafe {
        windows_sys::Win32::Storage::FileSystem::GetDiskFreeSpaceExW(
            wide.as_ptr(),
            &mut available,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(available)
}

#[cfg(not(any(unix, windows)))]
fn free_disk_bytes_at(_path: &Path) -> io::Result<u64> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "free disk space is not read on this platform",
    ))
}

/// The operating system: the distribution's pretty name and the kernel release on Linux,
/// the platform name elsewhere.
pub fn os_description() -> String {
    let mut parts = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/etc/os-release")
        && let Some(name) = text.lines().find_map(|l| l.strip_prefix("PRETTY_NAME="))
    {
        parts.push(name.trim().trim_matches('"').to_owned());
    }
    if let Some(release) = kernel_release() {
        parts.push(format!("{} {release}", std::env::consts::OS));
    }
    if parts.is_empty() {
        parts.push(std::env::consts::OS.to_owned());
    }
    parts.join(", ")
}

#[cfg(unix)]
fn kernel_release() -> Option<String> {
    // SAFETY: `uname` fills a plain-data struct; its fields are NUL-terminated.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut name) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = name
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Some(String::from_utf8_lossy(&bytes).into_owned()).filter(|s| !s.is_empty())
}

#[cfg(not(unix))]
fn kernel_release() -> Option<String> {
    None
}

/// Addresses of every interface that is up, leaving out loopback and IPv6 link-local
/// (neither is reachable by other machines).
#[cfg(unix)]
pub fn interface_ips() -> Vec<IpAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr};
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free once.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "getifaddrs failed");
        return out;
    }
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        let up = entry.ifa_flags & (libc::IFF_UP as libc::c_uint) != 0;
        if entry.ifa_addr.is_null() || !up {
            continue;
        }
        // SAFETY: `ifa_addr` is non-null and its family says which sockaddr it is.
        let ip = unsafe {
            match i32::from((*entry.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(entry.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(entry.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        let link_local_v6 = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
        if !ip.is_loopback() && !link_local_v6 && !out.contains(&ip) {
            out.push(ip);
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(not(unix))]
pub fn interface_ips() -> Vec<IpAddr> {
    Vec::new()
}

/// The local address the OS would use to reach `host:port`; connecting a UDP socket sends
/// nothing, it only picks the route.
pub fn local_ip_towards(host: &str, port: u16) -> Option<IpAddr> {
    use std::net::{ToSocketAddrs, UdpSocket};
    let target = (host, port).to_socket_addrs().ok()?.next()?;
    let bind: std::net::SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(target).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// MAC addresses of the network cards: on Linux the interfaces backed by a device in
/// `/sys/class/net` (or, when there are none, every interface but loopback); empty elsewhere.
pub fn macs() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    let mut physical = Vec::new();
    let mut virtual_ = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(text) = std::fs::read_to_string(dir.join("address")) else {
            continue;
        };
        let mac = text.trim().to_ascii_lowercase();
        if mac.len() != 17 || mac == "00:00:00:00:00:00" {
            continue;
        }
        let list = if dir.join("device").exists() {
            &mut physical
        } else {
            &mut virtual_
        };
        if !list.contains(&mac) {
            list.push(mac);
        }
    }
    let mut macs = if physical.is_empty() {
        virtual_
    } else {
        physical
    };
    macs.sort();
    macs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_disk_of_a_missing_dir_uses_its_parent() {
        let dir = tempfile::tempdir().unwrap();
        let there = free_disk_bytes(dir.path()).unwrap();
        let below = free_disk_bytes(&dir.path().join("not/yet")).unwrap();
        assert!(there > 0);
        // The same file system; other tests may write meanwhile, so allow some slack.
        assert!(below.abs_diff(there) < 1 << 30, "{below} vs {there}");
    }

    #[test]
    fn inventory_is_plausible() {
        let inv = collect(Path::new("."), Some(("127.0.0.1", 9)));
        assert!(!inv.hostname.is_empty());
        assert!(!inv.os.is_empty());
        assert!(inv.ips.iter().all(|ip| !ip.is_loopback()));
        for mac in &inv.macs {
            assert_eq!(mac.len(), 17, "{mac}");
        }
        assert_eq!(
            local_ip_towards("127.0.0.1", 9),
            Some([127, 0, 0, 1].into())
        );
    }
}
