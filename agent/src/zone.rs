//! This machine's zone in the swarm: the network it shares with the machines on its switch.
//!
//! The engine prefers peers of its zone: it dials them first, leaves the pieces they can
//! serve to them, and gives them its free upload slots first (see the swarm's picker and
//! choker). That keeps a lab's traffic on its access switch instead of its uplink, which the
//! simulated 300-machine lab in docs/benchmarks.md shows is what bounds a campus deployment.
//! The server's zones are lists of machines, not networks, so the agent finds its own: by
//! default the network of the interface it reaches the server through, since a lab room is
//! usually one subnet behind one switch. `bt_zone` names the networks instead where that is
//! not so, or turns the preference off.
//!
//! The server's own address joins the zone. Its seeder offers each piece to one machine (it
//! super-seeds), so what it sends crosses the uplink once by design; rationed like pieces
//! pulled from another switch (the picker's few at a time), the server's link sat half idle
//! while the offered pieces waited, and the whole lab with it (docs/benchmarks.md).

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::str::FromStr;
use std::time::Duration;

use boottorrent_swarm::session::{Cidr, Session};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// How often the agent looks again for its network while it has none (no address yet at
/// boot, the server's name not resolving).
const RETRY_EVERY: Duration = Duration::from_secs(15);

/// The `bt_zone` setting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ZoneSetting {
    /// The network of the interface the server is reached through.
    #[default]
    Auto,
    /// No zone: every peer is treated alike.
    Off,
    /// These networks.
    Networks(Vec<Cidr>),
}

impl FromStr for ZoneSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<ZoneSetting, String> {
        match s.trim() {
            "auto" => Ok(ZoneSetting::Auto),
            "off" => Ok(ZoneSetting::Off),
            list => {
                let networks = list
                    .split(',')
                    .map(|n| n.trim().parse::<Cidr>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        format!("{e}; bt_zone is \"auto\", \"off\" or networks such as \"10.1.2.0/24,10.1.3.0/24\"")
                    })?;
                Ok(ZoneSetting::Networks(networks))
            }
        }
    }
}

impl fmt::Display for ZoneSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ZoneSetting::Auto => f.write_str("auto"),
            ZoneSetting::Off => f.write_str("off"),
            ZoneSetting::Networks(networks) => {
                let list: Vec<String> = networks.iter().map(Cidr::to_string).collect();
                f.write_str(&list.join(","))
            }
        }
    }
}

impl TryFrom<String> for ZoneSetting {
    type Error = String;

    fn try_from(s: String) -> Result<ZoneSetting, String> {
        s.parse()
    }
}

impl From<ZoneSetting> for String {
    fn from(z: ZoneSetting) -> String {
        z.to_string()
    }
}

/// The network of the interface this machine reaches `server` through. Nothing is sent: a
/// UDP socket connected to the server only makes the system pick the route and the local
/// address, which is then looked up among the interfaces' addresses.
pub fn network_toward(server: SocketAddr) -> io::Result<Cidr> {
    let any: IpAddr = match server {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind((any, 0))?;
    socket.connect(server)?;
    let local = socket.local_addr()?.ip();
    let prefix = if_addrs::get_if_addrs()?
        .into_iter()
        .find(|i| i.ip() == local)
        .map(|i| match i.addr {
            if_addrs::IfAddr::V4(a) => a.prefixlen,
            if_addrs::IfAddr::V6(a) => a.prefixlen,
        })
        .ok_or_else(|| {
            io::Error::other(format!(
                "no interface holds {local}, the address the route to {server} leaves from"
            ))
        })?;
    Cidr::network(local, prefix).ok_or_else(|| {
        io::Error::other(format!("{local} has an impossible prefix length {prefix}"))
    })
}

/// Applies `setting` to `session`. For `auto`, finds the network toward `server` (host, port)
/// now or, failing that, every [`RETRY_EVERY`] until found or `stop`.
pub async fn apply(
    setting: ZoneSetting,
    session: Session,
    server: (String, u16),
    stop: CancellationToken,
) {
    match setting {
        ZoneSetting::Off => {
            tracing::info!("bt_zone = \"off\": peers are preferred by nothing but their speed");
        }
        ZoneSetting::Networks(networks) => {
            tracing::info!(zone = %ZoneSetting::Networks(networks.clone()), "peers in these networks (bt_zone) are this machine's zone: preferred for downloads and upload slots");
            let server_ips = match tokio::net::lookup_host((server.0.as_str(), server.1)).await {
                Ok(addrs) => addrs.map(|a| a.ip()).collect(),
                Err(e) => {
                    tracing::warn!(server = %server.0, "cannot resolve the server ({e}): its seeder is treated as outside the zone");
                    Vec::new()
                }
            };
            session.set_zone(with_server(networks, &server_ips));
        }
        ZoneSetting::Auto => {
            let mut warned = false;
            loop {
                match find(&server).await {
                    Ok((network, server_ip)) => {
                        tracing::info!(zone = %network, "peers in this machine's network toward the server are its zone: preferred for downloads and upload slots (bt_zone names others)");
                        session.set_zone(with_server(vec![network], &[server_ip]));
                        return;
                    }
                    Err(e) if !warned => {
                        tracing::warn!(server = %server.0, "cannot tell this machine's network yet ({e}); peers are treated alike until it can, trying again every {} s (set bt_zone to name the networks)", RETRY_EVERY.as_secs());
                        warned = true;
                    }
                    Err(e) => tracing::debug!("still no network toward the server: {e}"),
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RETRY_EVERY) => {}
                }
            }
        }
    }
}

/// The network toward the server, and the server's address it was found for.
async fn find((host, port): &(String, u16)) -> io::Result<(Cidr, IpAddr)> {
    let mut last = io::Error::other(format!("{host} resolves to no address"));
    for addr in tokio::net::lookup_host((host.as_str(), *port)).await? {
        match network_toward(addr) {
            Ok(network) => return Ok((network, addr.ip())),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// `networks` and each of the server's addresses as a network of one.
fn with_server(mut networks: Vec<Cidr>, server: &[IpAddr]) -> Vec<Cidr> {
    for &ip in server {
        let host = match ip {
            IpAddr::V4(_) => Cidr::network(ip, 32),
            IpAddr::V6(_) => Cidr::network(ip, 128),
        };
        if let Some(host) = host
            && !networks.iter().any(|n| n.contains(ip))
        {
            networks.push(host);
        }
    }
    networks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_reads_and_writes_the_same() {
        for text in ["auto", "off", "10.1.2.0/24", "10.1.2.0/24,fd00::/8"] {
            let setting: ZoneSetting = text.parse().unwrap();
            assert_eq!(setting.to_string(), text);
        }
        assert_eq!(
            " 10.1.2.0/24 , 10.1.3.0/24 ".parse::<ZoneSetting>(),
            Ok(ZoneSetting::Networks(vec![
                "10.1.2.0/24".parse().unwrap(),
                "10.1.3.0/24".parse().unwrap()
            ]))
        );
        let bad = "10.1.2.0".parse::<ZoneSetting>().unwrap_err();
        assert!(bad.contains("\"auto\", \"off\""), "{bad}");
        assert!("".parse::<ZoneSetting>().is_err());
    }

    #[test]
    fn the_server_joins_the_zone_unless_a_network_of_it_holds_it() {
        let lab: Cidr = "10.1.2.0/24".parse().unwrap();
        let server: IpAddr = "10.0.0.5".parse().unwrap();
        let zone = with_server(vec![lab], &[server]);
        assert!(zone.iter().any(|n| n.contains(server)), "{zone:?}");
        assert!(!zone.iter().any(|n| n.contains("10.0.0.6".parse().unwrap())));
        assert_eq!(zone.len(), 2);
        // On the lab's own network already: nothing to add.
        let near: IpAddr = "10.1.2.1".parse().unwrap();
        assert_eq!(with_server(vec![lab], &[near]), vec![lab]);
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert!(with_server(Vec::new(), &[v6])[0].contains(v6));
    }

    /// The real interfaces of this machine: loopback is 127.0.0.0/8 on every Linux.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_network_toward_a_loopback_server_is_loopbacks() {
        let network = network_toward(([127, 0, 0, 1], 1883).into()).unwrap();
        assert_eq!(network.to_string(), "127.0.0.0/8");
        let network = network_toward(([127, 3, 2, 1], 1883).into()).unwrap();
        assert_eq!(
            network.to_string(),
            "127.0.0.0/8",
            "the route leaves from 127.0.0.1"
        );
    }
}
