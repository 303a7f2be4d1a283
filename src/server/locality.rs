//! Where an address sits, for the tracker's handout: the zone of the machine that reported
//! that IP, and whether an address is the server's own seeder (handed out last, so the
//! machines feed each other and the server uploads each image about once).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use boottorrent_tracker::swarm::Locality;

use crate::server::store::Store;

/// How stale the IP-to-zone map may get; announces are far more frequent than zone changes.
const REFRESH: Duration = Duration::from_secs(10);

/// The server's [`Locality`].
pub struct ServerLocality {
    store: Store,
    /// Port our seeder listens on.
    seeder_port: u16,
    /// This host's addresses (the seeder announces from one of them).
    own_ips: Vec<IpAddr>,
    zones: Mutex<(Option<Instant>, HashMap<IpAddr, String>)>,
}

impl ServerLocality {
    /// A locality backed by the machine registry.
    pub fn new(store: Store, seeder_port: u16) -> ServerLocality {
        ServerLocality {
            store,
            seeder_port,
            own_ips: local_ips(),
            zones: Mutex::new((None, HashMap::new())),
        }
    }
}

impl Locality for ServerLocality {
    fn zone_of(&self, ip: IpAddr) -> Option<String> {
        let mut cache = self.zones.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0.is_none_or(|at| at.elapsed() > REFRESH) {
            let mut map = HashMap::new();
            match self.store.machines() {
                Ok(machines) => {
                    for (m, _) in machines {
                        if let Some(zone) = m.zones.first() {
                            for ip in &m.ips {
                                map.insert(*ip, zone.to_string());
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!("reading machines for tracker zones: {e}"),
            }
            *cache = (Some(Instant::now()), map);
        }
        cache.1.get(&ip).cloned()
    }

    fn is_server_seeder(&self, addr: SocketAddr) -> bool {
        addr.port() == self.seeder_port
            && (addr.ip().is_loopback() || self.own_ips.contains(&addr.ip()))
    }
}

/// This host's interface addresses.
fn local_ips() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list we only read and then free with freeifaddrs.
    unsafe {
        if libc::getifaddrs(&mut addrs) != 0 {
            return out;
        }
        let mut cur = addrs;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(addrs);
    }
    out
}
