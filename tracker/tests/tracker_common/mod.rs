//! Helpers shared by the tracker's integration tests: query building, a test [`Locality`] and
//! decoding answers with our client's parser (`boottorrent_bt::announce::parse_response`),
//! code independent of the encoder that wrote them.

#![allow(dead_code)] // Each test crate uses its own subset.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use boottorrent_bt::announce::{AnnounceResponse, ResponseError, parse_response};
use boottorrent_bt::bencode::{self, Value};
use boottorrent_tracker::announce::Answer;
use boottorrent_tracker::swarm::{Locality, Tracker, TrackerConfig};

/// Every byte as `%xx`, the way the strictest clients encode binary parameters.
pub fn enc(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02x}")).collect()
}

/// A distinct info hash per `n`.
pub fn hash(n: u8) -> [u8; 20] {
    let mut hash = [0xab; 20];
    hash[0] = n;
    hash
}

/// A peer id that encodes the peer's number, so answers can be traced back to announces.
pub fn peer_id(n: u32) -> [u8; 20] {
    let mut id = *b"-TT0001-000000000000";
    id[8..18].copy_from_slice(format!("{n:010}").as_bytes());
    id
}

/// A minimal valid announce query.
pub fn announce_query(info_hash: [u8; 20], id: [u8; 20], port: u16, left: u64) -> String {
    format!(
        "info_hash={}&peer_id={}&port={port}&uploaded=0&downloaded=0&left={left}",
        enc(&info_hash),
        enc(&id)
    )
}

/// A tracker with default config that serves `hashes`.
pub fn tracker_with(hashes: &[[u8; 20]]) -> Tracker {
    let tracker = Tracker::new(TrackerConfig::default());
    for hash in hashes {
        tracker.allow(*hash);
    }
    tracker
}

pub fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

pub fn sock(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// Zones by IP prefix string ("10.1." → "lab-a") and one server seeder.
#[derive(Default)]
pub struct TestLocality {
    pub zones: Vec<(&'static str, &'static str)>,
    pub seeder: Option<SocketAddr>,
}

impl Locality for TestLocality {
    fn zone_of(&self, ip: IpAddr) -> Option<String> {
        let text = ip.to_string();
        self.zones
            .iter()
            .find(|(prefix, _)| text.starts_with(prefix))
            .map(|(_, zone)| zone.to_string())
    }

    fn is_server_seeder(&self, addr: SocketAddr) -> bool {
        self.seeder == Some(addr)
    }
}

/// A successful answer as a real client parser reads it.
pub fn ok(answer: &Answer) -> AnnounceResponse {
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    parse_response(&answer.body).unwrap_or_else(|error| {
        panic!(
            "{error}: {}",
            String::from_utf8_lossy(&answer.body).escape_debug()
        )
    })
}

/// The failure reason of an answer, checked with the client parser.
pub fn failure(answer: &Answer) -> String {
    match parse_response(&answer.body) {
        Err(ResponseError::Failure(reason)) => reason,
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// The answer's top-level integer `key`, read raw (the client parser clamps intervals).
pub fn int(answer: &Answer, key: &str) -> i64 {
    let value = bencode::decode(&answer.body).unwrap();
    value
        .as_dict()
        .unwrap()
        .get(key.as_bytes())
        .unwrap()
        .as_int()
        .unwrap()
}

/// Keys of every dictionary in `value` are strictly ascending, as bencode requires.
pub fn assert_canonical(value: &Value<'_>) {
    match value {
        Value::Dict(dict) => {
            let keys: Vec<&[u8]> = dict.iter().map(|(k, _)| k).collect();
            assert!(
                keys.windows(2).all(|w| w[0] < w[1]),
                "unsorted keys {keys:?}"
            );
            for (_, v) in dict.iter() {
                assert_canonical(v);
            }
        }
        Value::List(items) => items.iter().for_each(assert_canonical),
        _ => {}
    }
}

/// A peer id derived from an address, so that peers made with [`join`] have distinct ids.
pub fn peer_id_of(addr: SocketAddr) -> [u8; 20] {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    addr.hash(&mut hasher);
    let mut id = *b"-TT0001-000000000000";
    id[8..].copy_from_slice(format!("{:012x}", hasher.finish() & 0xffff_ffff_ffff).as_bytes());
    id
}

/// A `started` announce from `peer` (with the peer id [`peer_id_of`] its address), returning
/// the client's view of the answer.
pub fn join(
    tracker: &Tracker,
    locality: &dyn Locality,
    info_hash: [u8; 20],
    peer: &str,
    left: u64,
    now: Instant,
) -> AnnounceResponse {
    let peer = sock(peer);
    let query = announce_query(info_hash, peer_id_of(peer), peer.port(), left) + "&event=started";
    ok(&tracker.announce(&query, peer.ip(), locality, now))
}
