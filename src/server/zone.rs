//! Zones: named groups of machines ("room 101"), by machine id and/or by subnet.
//!
//! A zone is checked once where it enters (the config file or `PUT /api/v1/zones/{id}`): ids
//! are validated id types and subnets parsed CIDRs, so everything after that trusts it. A
//! machine's membership is recomputed from its reported addresses whenever those or the zones
//! change; the result is stored on the machine record, pushed to the agent as
//! `machine_configuration`, and read by the tracker's locality source.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use boottorrent_proto::{ImageId, MachineId, ZoneId};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use crate::api::ZoneSource;

/// A CIDR subnet such as `10.1.0.0/24` or `fd00:1::/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet(IpNet);

impl Subnet {
    /// Whether `ip` is inside; an IPv4-mapped IPv6 address counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

impl FromStr for Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Subnet, String> {
        let shown: String = s.chars().take(64).collect();
        let net: IpNet = s.parse().map_err(|_| {
            format!("{shown:?} is not a subnet; write it in CIDR form, e.g. 10.1.0.0/24")
        })?;
        // `10.1.0.7/24` is almost certainly a typo for a host or for `10.1.0.0/24`; saying so
        // beats silently widening it.
        if net.addr() != net.network() {
            return Err(format!(
                "{shown:?} has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        Ok(Subnet(net))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Subnet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Subnet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Subnet, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// What an operator writes: in the config file's `[[zones]]` (with `id`) or as the body of
/// `PUT /api/v1/zones/{id}` (the id is in the path).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneSpec {
    #[serde(default)]
    pub machines: Vec<MachineId>,
    #[serde(default)]
    pub subnets: Vec<Subnet>,
    /// Images every member should hold (staged).
    #[serde(default)]
    pub images: Vec<ImageId>,
}

/// A zone as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zone {
    pub id: ZoneId,
    pub machines: Vec<MachineId>,
    pub subnets: Vec<Subnet>,
    pub images: Vec<ImageId>,
    #[serde(default)]
    pub source: ZoneSource,
}

/// A zone in the config file: who is in it. Images to hold are set through the API
/// (`boottorrent zones set ID --image ...`), which checks them against the catalog; the file
/// is read before the catalog is. (Fields spelled out rather than a flattened [`ZoneSpec`]:
/// serde cannot refuse unknown keys through `flatten`, and a typo in a config file must not
/// pass silently.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigZone {
    pub id: ZoneId,
    #[serde(default)]
    pub machines: Vec<MachineId>,
    #[serde(default)]
    pub subnets: Vec<Subnet>,
}

impl ConfigZone {
    pub fn to_zone(&self) -> Result<Zone, String> {
        Zone::new(
            self.id.clone(),
            ZoneSpec {
                machines: self.machines.clone(),
                subnets: self.subnets.clone(),
                images: Vec::new(),
            },
            ZoneSource::Config,
        )
    }
}

impl Zone {
    /// Checks a spec and makes it a zone. Duplicates are dropped (order kept); a zone must say
    /// who is in it.
    pub fn new(id: ZoneId, spec: ZoneSpec, source: ZoneSource) -> Result<Zone, String> {
        if spec.machines.is_empty() && spec.subnets.is_empty() {
            return Err(format!(
                "zone {id} has neither machines nor subnets; list machine ids, CIDR subnets, or both"
            ));
        }
        Ok(Zone {
            id,
            machines: dedup(spec.machines),
            subnets: dedup(spec.subnets),
            images: dedup(spec.images),
            source,
        })
    }

    /// Whether a machine with this id and these addresses is a member.
    pub fn contains(&self, machine: &MachineId, ips: &[IpAddr]) -> bool {
        self.machines.contains(machine)
            || self
                .subnets
                .iter()
                .any(|net| ips.iter().any(|ip| net.contains(*ip)))
    }
}

/// The zones a machine belongs to, sorted by id.
pub fn membership(zones: &[Zone], machine: &MachineId, ips: &[IpAddr]) -> Vec<ZoneId> {
    let mut out: Vec<ZoneId> = zones
        .iter()
        .filter(|zone| zone.contains(machine, ips))
        .map(|zone| zone.id.clone())
        .collect();
    out.sort();
    out
}

fn dedup<T: PartialEq>(items: Vec<T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(items.len());
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(id: &str, machines: &[&str], subnets: &[&str]) -> Zone {
        Zone::new(
            id.parse().unwrap(),
            ZoneSpec {
                machines: machines.iter().map(|m| m.parse().unwrap()).collect(),
                subnets: subnets.iter().map(|s| s.parse().unwrap()).collect(),
                images: Vec::new(),
            },
            ZoneSource::Api,
        )
        .unwrap()
    }

    #[test]
    fn membership_by_id_and_by_subnet() {
        let zones = [
            zone("lab", &["pc-01"], &["10.1.0.0/24"]),
            zone("all", &[], &["10.0.0.0/8", "fd00::/16"]),
            zone("other", &["pc-99"], &[]),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let m = |s: &str| s.parse::<MachineId>().unwrap();
        let ids = |v: Vec<ZoneId>| v.iter().map(|z| z.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(membership(&zones, &m("pc-01"), &[])), ["lab"]);
        assert_eq!(
            ids(membership(&zones, &m("pc-02"), &[ip("10.1.0.7")])),
            ["all", "lab"]
        );
        // An IPv4-mapped address (a dual-stack listener's view) counts as IPv4.
        assert_eq!(
            ids(membership(&zones, &m("pc-03"), &[ip("::ffff:10.1.0.9")])),
            ["all", "lab"]
        );
        assert_eq!(
            ids(membership(&zones, &m("pc-04"), &[ip("fd00:1::5")])),
            ["all"]
        );
        assert!(membership(&zones, &m("pc-05"), &[ip("192.168.1.1")]).is_empty());
    }

    #[test]
    fn bad_subnets_and_empty_zones_are_refused_with_the_reason() {
        let err = "10.1.0.7/24".parse::<Subnet>().unwrap_err();
        assert!(err.contains("10.1.0.0/24"), "{err}");
        let err = "lab-1".parse::<Subnet>().unwrap_err();
        assert!(err.contains("CIDR"), "{err}");
        let err =
            Zone::new("lab".parse().unwrap(), ZoneSpec::default(), ZoneSource::Api).unwrap_err();
        assert!(err.contains("neither machines nor subnets"), "{err}");
        let spec: Result<ZoneSpec, _> = serde_json::from_str(r#"{"subnets": ["300.1.0.0/24"]}"#);
        assert!(spec.unwrap_err().to_string().contains("300.1.0.0/24"));
        let spec: Result<ZoneSpec, _> = serde_json::from_str(r#"{"machines": ["pc 01"]}"#);
        assert!(spec.is_err());
    }

    #[test]
    fn duplicates_collapse_and_subnets_round_trip() {
        let z = zone("lab", &["pc-01", "pc-01"], &["10.1.0.0/24", "10.1.0.0/24"]);
        assert_eq!(z.machines.len(), 1);
        assert_eq!(z.subnets.len(), 1);
        let json = serde_json::to_string(&z).unwrap();
        assert!(json.contains(r#""subnets":["10.1.0.0/24"]"#), "{json}");
        assert_eq!(serde_json::from_str::<Zone>(&json).unwrap(), z);
    }
}
