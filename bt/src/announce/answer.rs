//! The bencoded answer to an announce or scrape: written by the tracker, parsed by the client.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::bencode::{self, BencodeError, Dict, Encoder, Value};
use crate::{InfoHash, PeerId};

/// Shortest re-announce interval we honour, whatever the tracker asks: a misconfigured tracker
/// must not be able to make a whole lab hammer it.
pub const MIN_INTERVAL: Duration = Duration::from_secs(10);
/// Longest re-announce interval we honour, so peers that join later still find us within the
/// hour.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// Interval used when the tracker names none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1800);
/// How much of a tracker's failure or warning text we keep; the rest is noise in the logs.
const MAX_MESSAGE_LEN: usize = 1024;

/// What a tracker answered, with its intervals already clamped to what we honour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceResponse {
    /// When to announce again, clamped to [`MIN_INTERVAL`]..=[`MAX_INTERVAL`].
    pub interval: Duration,
    /// The soonest the tracker accepts another announce, clamped like `interval`.
    pub min_interval: Option<Duration>,
    /// Peers to connect to, IPv4 then IPv6, without duplicates or port-0 entries.
    pub peers: Vec<SocketAddr>,
    /// Seeders in the swarm, if the tracker says.
    pub complete: Option<u32>,
    /// Leechers in the swarm, if the tracker says.
    pub incomplete: Option<u32>,
    /// The tracker's `warning message`: the announce worked, but someone should look.
    pub warning: Option<String>,
}

/// Why a tracker's answer cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// The tracker refused the announce with a `failure reason`.
    #[error("tracker said: {0}")]
    Failure(String),
    /// The response body is not bencode.
    #[error("tracker response is not bencode: {0}")]
    Bencode(BencodeError),
    /// The response is bencode but not a valid announce response.
    #[error("malformed tracker response: {0}")]
    Malformed(String),
}

impl ResponseError {
    /// The tracker's `failure reason`, if that is why the announce failed. A tracker that says
    /// no (unregistered torrent, not whitelisted) will say it again, unlike a network error.
    pub fn failure_reason(&self) -> Option<&str> {
        match self {
            ResponseError::Failure(reason) => Some(reason),
            _ => None,
        }
    }
}

/// Parses a tracker's bencoded answer. A `failure reason` wins over everything else in the
/// dictionary, as BEP 3 says.
pub fn parse_response(body: &[u8]) -> Result<AnnounceResponse, ResponseError> {
    let value = bencode::decode(body).map_err(ResponseError::Bencode)?;
    let Some(dict) = value.as_dict() else {
        return Err(malformed(format!(
            "the response is {}, not a dictionary",
            value.kind()
        )));
    };
    if let Some(reason) = dict.get(b"failure reason") {
        return match reason {
            Value::Bytes(reason) => Err(ResponseError::Failure(message(reason))),
            other => Err(wrong_type("failure reason", "a byte string", other)),
        };
    }

    let interval = optional_int(dict, "interval")?
        .map(clamp_interval)
        .unwrap_or(DEFAULT_INTERVAL);
    let min_interval = optional_int(dict, "min interval")?.map(clamp_interval);
    // Counts are informational; a nonsensical one is dropped rather than failing the announce.
    let complete = optional_int(dict, "complete")?.and_then(|n| u32::try_from(n).ok());
    let incomplete = optional_int(dict, "incomplete")?.and_then(|n| u32::try_from(n).ok());
    let warning = match dict.get(b"warning message") {
        None => None,
        Some(Value::Bytes(text)) => Some(message(text)),
        Some(other) => return Err(wrong_type("warning message", "a byte string", other)),
    };

    let mut peers = Vec::new();
    match dict.get(b"peers") {
        None => {}
        Some(Value::Bytes(compact)) => {
            if compact.len() % 6 != 0 {
                return Err(malformed(format!(
                    "compact `peers` is {} bytes, not a multiple of 6",
                    compact.len()
                )));
            }
            for entry in compact.chunks_exact(6) {
                let ip = Ipv4Addr::new(entry[0], entry[1], entry[2], entry[3]);
                let port = u16::from_be_bytes([entry[4], entry[5]]);
                peers.push(SocketAddr::new(IpAddr::V4(ip), port));
            }
        }
        Some(Value::List(entries)) => {
            for (index, entry) in entries.iter().enumerate() {
                if let Some(addr) = parse_dict_peer(index, entry)? {
                    peers.push(addr);
                }
            }
        }
        Some(other) => {
            return Err(wrong_type(
                "peers",
                "a byte string or a list of dictionaries",
                other,
            ));
        }
    }
    match dict.get(b"peers6") {
        None => {}
        Some(Value::Bytes(compact)) => {
            if compact.len() % 18 != 0 {
                return Err(malformed(format!(
                    "compact `peers6` is {} bytes, not a multiple of 18",
                    compact.len()
                )));
            }
            for entry in compact.chunks_exact(18) {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&entry[..16]);
                let port = u16::from_be_bytes([entry[16], entry[17]]);
                peers.push(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port));
            }
        }
        Some(other) => return Err(wrong_type("peers6", "a byte string", other)),
    }
    // Port 0 cannot be connected to; trackers emit it for peers that announced without one.
    let mut seen = HashSet::new();
    peers.retain(|addr| addr.port() != 0 && seen.insert(*addr));

    Ok(AnnounceResponse {
        interval,
        min_interval,
        peers,
        complete,
        incomplete,
        warning,
    })
}

/// One entry of the original, non-compact peer list: `{peer id, ip, port}`. Returns `None` for
/// entries we cannot connect to without more work: port 0, or a DNS name in `ip` (which BEP 3
/// allows, but lab trackers hand out addresses).
fn parse_dict_peer(index: usize, entry: &Value<'_>) -> Result<Option<SocketAddr>, ResponseError> {
    let Some(entry) = entry.as_dict() else {
        return Err(malformed(format!(
            "`peers` entry {index} is {}, expected a dictionary",
            entry.kind()
        )));
    };
    let ip = match entry.get(b"ip") {
        Some(Value::Bytes(ip)) => *ip,
        Some(other) => {
            return Err(malformed(format!(
                "`ip` of `peers` entry {index} is {}, expected a byte string",
                other.kind()
            )));
        }
        None => return Err(malformed(format!("`peers` entry {index} has no `ip`"))),
    };
    let port = match entry.get(b"port") {
        Some(Value::Int(port)) => u16::try_from(*port).map_err(|_| {
            malformed(format!(
                "`port` of `peers` entry {index} is {port}, not a TCP port"
            ))
        })?,
        Some(other) => {
            return Err(malformed(format!(
                "`port` of `peers` entry {index} is {}, expected an integer",
                other.kind()
            )));
        }
        None => return Err(malformed(format!("`peers` entry {index} has no `port`"))),
    };
    match std::str::from_utf8(ip).ok().and_then(|ip| ip.parse().ok()) {
        Some(ip) => Ok(Some(SocketAddr::new(ip, port))),
        None => {
            tracing::debug!(ip = %ip.escape_ascii(), "ignoring a peer that is not an IP address");
            Ok(None)
        }
    }
}

fn optional_int(dict: &Dict<'_>, key: &str) -> Result<Option<i64>, ResponseError> {
    match dict.get(key.as_bytes()) {
        None => Ok(None),
        Some(Value::Int(n)) => Ok(Some(*n)),
        Some(other) => Err(wrong_type(key, "an integer", other)),
    }
}

fn clamp_interval(seconds: i64) -> Duration {
    Duration::from_secs(seconds.clamp(0, MAX_INTERVAL.as_secs() as i64) as u64)
        .clamp(MIN_INTERVAL, MAX_INTERVAL)
}

/// Tracker text is untrusted: lossily decoded and capped at [`MAX_MESSAGE_LEN`] bytes.
fn message(bytes: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_MESSAGE_LEN)]).into_owned();
    if bytes.len() > MAX_MESSAGE_LEN {
        text.push_str("...");
    }
    text
}

fn malformed(reason: String) -> ResponseError {
    ResponseError::Malformed(reason)
}

fn wrong_type(key: &str, expected: &str, found: &Value<'_>) -> ResponseError {
    malformed(format!("`{key}` is {}, expected {expected}", found.kind()))
}

/// How the peer list is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerForm {
    /// BEP 23 byte strings: `peers` with 6 bytes per IPv4 peer, `peers6` with 18 per IPv6
    /// peer (BEP 7).
    Compact,
    /// The original BEP 3 list of `{ip, peer id, port}` dictionaries, for clients that send
    /// `compact=0`.
    Dict {
        /// Whether to include `peer id`; false for `no_peer_id=1`.
        peer_ids: bool,
    },
}

/// One peer handed to a requester.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoutPeer {
    /// Where to connect: the address the peer announced from and the port it announced.
    pub addr: SocketAddr,
    /// The peer's id, for the dictionary form.
    pub peer_id: PeerId,
}

/// Everything a successful announce answer holds.
#[derive(Debug, Clone, Copy)]
pub struct AnnounceReply<'a> {
    /// Seconds until the client should announce again.
    pub interval_secs: u32,
    /// Seconds the client must wait at least before announcing again.
    pub min_interval_secs: u32,
    /// Seeders in the swarm.
    pub complete: u32,
    /// Leechers in the swarm.
    pub incomplete: u32,
    /// The peers to hand out, in handout order.
    pub peers: &'a [HandoutPeer],
    /// Compact or dictionary form.
    pub form: PeerForm,
    /// Whether the requester came over IPv6; compact answers to it always carry `peers6`, so
    /// the client sees an explicit empty list rather than wondering about a missing key.
    pub ipv6_requester: bool,
}

/// Bencodes a successful announce answer.
///
/// `peers` is always present, even when empty or when the requester is on IPv6, because some
/// clients treat an answer without it as broken.
pub fn encode_announce(reply: &AnnounceReply<'_>) -> Vec<u8> {
    let PeerForm::Dict { peer_ids } = reply.form else {
        return compact_answer(reply);
    };
    let mut encoder = Encoder::new();
    encoder.dict(|dict| {
        dict.entry(b"complete", |e| e.int(reply.complete));
        dict.entry(b"incomplete", |e| e.int(reply.incomplete));
        dict.entry(b"interval", |e| e.int(reply.interval_secs));
        dict.entry(b"min interval", |e| e.int(reply.min_interval_secs));
        dict.entry(b"peers", |e| {
            e.list(|list| {
                for peer in reply.peers {
                    encode_dict_peer(list, peer, peer_ids);
                }
            })
        });
    });
    encoder.finish()
}

/// The compact answer, which nearly every client asks for, written straight into one buffer:
/// its keys are fixed and already in bencode order, and a general encoder (bendy's, when the
/// tracker used it: a scratch allocation and a key-order check per dictionary) was a tenth of
/// an announce's CPU time.
fn compact_answer(reply: &AnnounceReply<'_>) -> Vec<u8> {
    use std::io::Write;
    let (compact4, compact6) = compact_peers(reply.peers);
    let mut out = Vec::with_capacity(96 + compact4.len() + compact6.len());
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        "d8:completei{}e10:incompletei{}e8:intervali{}e12:min intervali{}e5:peers{}:",
        reply.complete,
        reply.incomplete,
        reply.interval_secs,
        reply.min_interval_secs,
        compact4.len()
    );
    out.extend_from_slice(&compact4);
    if reply.ipv6_requester || !compact6.is_empty() {
        let _ = write!(out, "6:peers6{}:", compact6.len());
        out.extend_from_slice(&compact6);
    }
    out.push(b'e');
    out
}

fn compact_peers(peers: &[HandoutPeer]) -> (Vec<u8>, Vec<u8>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for peer in peers {
        match peer.addr.ip() {
            IpAddr::V4(ip) => {
                v4.extend_from_slice(&ip.octets());
                v4.extend_from_slice(&peer.addr.port().to_be_bytes());
            }
            IpAddr::V6(ip) => {
                v6.extend_from_slice(&ip.octets());
                v6.extend_from_slice(&peer.addr.port().to_be_bytes());
            }
        }
    }
    (v4, v6)
}

fn encode_dict_peer(e: &mut Encoder, peer: &HandoutPeer, peer_id: bool) {
    e.dict(|dict| {
        dict.entry(b"ip", |e| e.bytes(peer.addr.ip().to_string().as_bytes()));
        if peer_id {
            dict.entry(b"peer id", |e| e.bytes(&peer.peer_id.0));
        }
        dict.entry(b"port", |e| e.int(peer.addr.port()));
    });
}

/// One torrent's line in a scrape answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScrapeEntry {
    /// The torrent, used raw as the key of BEP 48's `files` dictionary.
    pub info_hash: InfoHash,
    /// Seeders.
    pub complete: u32,
    /// Leechers.
    pub incomplete: u32,
    /// Completed downloads since the torrent was catalogued.
    pub downloaded: u64,
}

/// Bencodes a scrape answer: `{files: {<raw info hash>: {complete, downloaded,
/// incomplete}}}`. Entries are sorted and de-duplicated here, since bencode requires sorted,
/// unique keys and a client may name a hash twice.
pub fn encode_scrape(entries: &[ScrapeEntry]) -> Vec<u8> {
    let mut sorted = entries.to_vec();
    sorted.sort_unstable_by_key(|entry| entry.info_hash);
    sorted.dedup_by_key(|entry| entry.info_hash);
    let mut encoder = Encoder::new();
    encoder.dict(|dict| {
        dict.entry(b"files", |e| {
            e.dict(|files| {
                for entry in &sorted {
                    files.entry(&entry.info_hash.0, |e| {
                        e.dict(|stats| {
                            stats.entry(b"complete", |e| e.int(entry.complete));
                            stats.entry(b"downloaded", |e| e.int(entry.downloaded));
                            stats.entry(b"incomplete", |e| e.int(entry.incomplete));
                        })
                    });
                }
            })
        })
    });
    encoder.finish()
}

/// Bencodes `{failure reason: reason}`: a refusal the client shows its user.
pub fn encode_failure(reason: &str) -> Vec<u8> {
    let mut encoder = Encoder::new();
    encoder.dict(|dict| dict.entry(b"failure reason", |e| e.bytes(reason.as_bytes())));
    encoder.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_peers_and_peers6() {
        let mut body =
            b"d8:completei3e10:incompletei4e8:intervali900e12:min intervali60e5:peers18:".to_vec();
        body.extend_from_slice(&[10, 0, 0, 1, 0x1a, 0xe1]);
        body.extend_from_slice(&[10, 0, 0, 2, 0, 0]); // port 0: dropped
        body.extend_from_slice(&[10, 0, 0, 1, 0x1a, 0xe1]); // duplicate: dropped
        body.extend_from_slice(b"6:peers636:");
        let mut v6 = [0u8; 18];
        v6[..16].copy_from_slice(&"fd00::5".parse::<Ipv6Addr>().unwrap().octets());
        v6[16..].copy_from_slice(&51413u16.to_be_bytes());
        body.extend_from_slice(&v6);
        body.extend_from_slice(&v6);
        body.push(b'e');

        let r = parse_response(&body).unwrap();
        assert_eq!(
            r,
            AnnounceResponse {
                interval: Duration::from_secs(900),
                min_interval: Some(Duration::from_secs(60)),
                peers: vec![
                    "10.0.0.1:6881".parse().unwrap(),
                    "[fd00::5]:51413".parse().unwrap()
                ],
                complete: Some(3),
                incomplete: Some(4),
                warning: None,
            }
        );
    }

    #[test]
    fn dictionary_peers() {
        let body = b"d8:intervali60e5:peersl\
            d2:ip8:10.0.0.77:peer id20:aaaaaaaaaaaaaaaaaaaa4:porti6881ee\
            d2:ip7:fd00::94:porti6882ee\
            d2:ip8:tracker.4:porti6883ee\
            d2:ip8:10.0.0.84:porti0ee\
            ee";
        let r = parse_response(body).unwrap();
        assert_eq!(
            r.peers,
            [
                "10.0.0.7:6881".parse::<SocketAddr>().unwrap(),
                "[fd00::9]:6882".parse().unwrap()
            ]
        );
        assert_eq!(r.complete, None);

        let bad_port = b"d5:peersld2:ip8:10.0.0.74:porti70000eeee";
        assert_eq!(
            parse_response(bad_port).unwrap_err().to_string(),
            "malformed tracker response: `port` of `peers` entry 0 is 70000, not a TCP port"
        );
        let no_ip = b"d5:peersld4:porti1eeee";
        assert!(
            parse_response(no_ip)
                .unwrap_err()
                .to_string()
                .contains("has no `ip`")
        );
    }

    #[test]
    fn intervals_are_clamped_and_defaulted() {
        let r = parse_response(b"d8:intervali1e12:min intervali-5ee").unwrap();
        assert_eq!(r.interval, MIN_INTERVAL);
        assert_eq!(r.min_interval, Some(MIN_INTERVAL));
        let r = parse_response(b"d8:intervali86400ee").unwrap();
        assert_eq!(r.interval, MAX_INTERVAL);
        let r = parse_response(b"d8:intervali9223372036854775807ee").unwrap();
        assert_eq!(r.interval, MAX_INTERVAL);
        let r = parse_response(b"de").unwrap();
        assert_eq!(r.interval, Duration::from_secs(1800));
        assert_eq!(r.min_interval, None);
        assert!(r.peers.is_empty());
    }

    #[test]
    fn failure_and_warning() {
        let err =
            parse_response(b"d14:failure reason20:unregistered torrent8:intervali5ee").unwrap_err();
        assert!(matches!(&err, ResponseError::Failure(r) if r == "unregistered torrent"));
        assert_eq!(err.failure_reason(), Some("unregistered torrent"));

        let r = parse_response(b"d15:warning message4:slow5:peers0:e").unwrap();
        assert_eq!(r.warning.as_deref(), Some("slow"));
    }

    #[test]
    fn malformed_responses() {
        let message = |body: &[u8]| parse_response(body).unwrap_err().to_string();
        assert_eq!(
            message(b"d5:peers7:abcdefge"),
            "malformed tracker response: compact `peers` is 7 bytes, not a multiple of 6"
        );
        assert_eq!(
            message(b"d6:peers66:abcdefe"),
            "malformed tracker response: compact `peers6` is 6 bytes, not a multiple of 18"
        );
        assert_eq!(
            message(b"d8:interval2:10e"),
            "malformed tracker response: `interval` is a byte string, expected an integer"
        );
        assert_eq!(
            message(b"li1ee"),
            "malformed tracker response: the response is a list, not a dictionary"
        );
        assert!(message(b"<html>").starts_with("tracker response is not bencode: "));
        assert!(message(b"d5:peersi1ee").contains("`peers` is an integer"));
    }

    #[test]
    fn scrape_sorts_and_dedups() {
        let entry = |b: u8| ScrapeEntry {
            info_hash: InfoHash([b; 20]),
            complete: 1,
            incomplete: 2,
            downloaded: 3,
        };
        let body = encode_scrape(&[entry(9), entry(1), entry(9)]);
        let mut expected = b"d5:filesd20:".to_vec();
        expected.extend_from_slice(&[1; 20]);
        expected.extend_from_slice(b"d8:completei1e10:downloadedi3e10:incompletei2ee20:");
        expected.extend_from_slice(&[9; 20]);
        expected.extend_from_slice(b"d8:completei1e10:downloadedi3e10:incompletei2eeee");
        assert_eq!(body, expected);
    }

    /// What the tracker writes, the client reads back: both peer forms, IPv4 and IPv6, the
    /// counts and intervals.
    #[test]
    fn the_client_parses_what_the_tracker_writes() {
        let peers = [
            HandoutPeer {
                addr: "10.0.0.7:6881".parse().unwrap(),
                peer_id: PeerId(*b"-BT0100-aaaaaaaaaaaa"),
            },
            HandoutPeer {
                addr: "[fd00::9]:6882".parse().unwrap(),
                peer_id: PeerId(*b"-BT0100-bbbbbbbbbbbb"),
            },
        ];
        for form in [
            PeerForm::Compact,
            PeerForm::Dict { peer_ids: true },
            PeerForm::Dict { peer_ids: false },
        ] {
            let body = encode_announce(&AnnounceReply {
                interval_secs: 900,
                min_interval_secs: 60,
                complete: 1,
                incomplete: 2,
                peers: &peers,
                form,
                ipv6_requester: false,
            });
            let parsed = parse_response(&body).unwrap();
            assert_eq!(
                parsed,
                AnnounceResponse {
                    interval: Duration::from_secs(900),
                    min_interval: Some(Duration::from_secs(60)),
                    peers: peers.iter().map(|p| p.addr).collect(),
                    complete: Some(1),
                    incomplete: Some(2),
                    warning: None,
                },
                "{form:?}"
            );
        }
        let failure = parse_response(&encode_failure("no such torrent")).unwrap_err();
        assert_eq!(failure.failure_reason(), Some("no such torrent"));
    }
}
