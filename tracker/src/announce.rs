//! The tracker's wire format: parsing announce (BEP 3) and scrape (BEP 48) query strings, and
//! bencoding what goes back: announce answers with compact (BEP 23), IPv6 (BEP 7) or dictionary
//! peer lists, scrape answers, and failures.
//!
//! Queries are parsed by hand rather than with a form decoder because `info_hash` and
//! `peer_id` are raw bytes: decoding them as UTF-8 or turning `+` into a space would corrupt
//! them. Everything here is pure and allocation-light, so the server's handler can call it on
//! every request and the fuzz-style tests can call it ten thousand times.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use bendy::encoding::{Encoder, SingleItemEncoder};

/// The `Content-Type` for every answer. Clients ignore it, but `text/plain` keeps browsers and
/// proxies from trying to render or transform the bencoded bytes.
pub const CONTENT_TYPE: &str = "text/plain";

/// The failure reason for an info hash that is not catalogued. Clients show it to their user,
/// so it says what is wrong in words an operator recognises.
pub const NOT_IN_CATALOG: &str = "torrent not in this server's catalog";

/// The failure reason for a torrent the announcing client was not given (a private tracker's
/// per-client grants).
pub const NOT_GIVEN: &str =
    "this torrent is not given to this passkey's machine: no deployment of its image includes it";

/// How much of an offending value a failure message quotes: enough to recognise it, not enough
/// to turn the failure reason into an echo of a hostile query.
const QUOTE_LEN: usize = 40;

/// Why a query is malformed. Each message names the parameter and quotes its value, because the
/// person reading it is looking at a client's log, not at our code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The query string exceeds the configured limit, checked before any parsing so a huge
    /// query costs nothing.
    #[error("query is {len} bytes, longer than the limit of {max} bytes")]
    TooLong {
        /// Length of the query in bytes.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// A `%` not followed by two hexadecimal digits.
    #[error("{name} has a bad %-escape \"{escape}\"")]
    BadEscape {
        /// The parameter (or, if the name itself is broken, the raw name) holding the escape.
        name: String,
        /// The `%` and up to two characters after it, quoted.
        escape: String,
    },
    /// A required parameter is absent.
    #[error("{name} is missing")]
    Missing {
        /// The parameter's name.
        name: &'static str,
    },
    /// `info_hash` or `peer_id` does not decode to exactly 20 bytes.
    #[error("{name} is {len} bytes after %-decoding, expected 20")]
    WrongLength {
        /// The parameter's name.
        name: &'static str,
        /// How many bytes it decoded to.
        len: usize,
    },
    /// A number that is not a plain decimal number.
    #[error("{name} '{value}' is not a non-negative integer")]
    NotANumber {
        /// The parameter's name.
        name: &'static str,
        /// The value, quoted.
        value: String,
    },
    /// A number outside what the parameter allows.
    #[error("{name} {value} is out of range {range}")]
    OutOfRange {
        /// The parameter's name.
        name: &'static str,
        /// The value, quoted.
        value: String,
        /// The allowed range, as a reader would write it.
        range: &'static str,
    },
    /// An `event` other than those BEP 3 defines.
    #[error("event '{value}' is not one of started, completed, stopped or empty")]
    BadEvent {
        /// The value, quoted.
        value: String,
    },
    /// A flag (`compact`, `no_peer_id`) other than `0` or `1`.
    #[error("{name} '{value}' is not 0 or 1")]
    BadFlag {
        /// The parameter's name.
        name: &'static str,
        /// The value, quoted.
        value: String,
    },
    /// A single-valued parameter given twice: which one counts would be a guess, and for
    /// `info_hash` a wrong guess announces into another torrent.
    #[error("{name} is given more than once")]
    Repeated {
        /// The parameter's name.
        name: &'static str,
    },
}

/// Why a peer announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The first announce of a download.
    Started,
    /// The download finished just now; counted in the scrape's `downloaded`.
    Completed,
    /// The peer leaves the swarm; we forget it at once instead of waiting for expiry.
    Stopped,
    /// A regular re-announce: no `event`, an empty one, or BEP 21's `paused` (an upload-only
    /// peer, which for us is just a peer).
    Periodic,
}

/// A well-formed announce query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceRequest {
    /// The torrent's info hash.
    pub info_hash: [u8; 20],
    /// The peer's self-chosen id, repeated to others in the dictionary form.
    pub peer_id: [u8; 20],
    /// The TCP port the peer accepts connections on, 1-65535.
    pub port: u16,
    /// Bytes uploaded since `started`, in bytes; 0 when absent. Parsed to reject garbage,
    /// otherwise unused.
    pub uploaded: u64,
    /// Bytes downloaded since `started`, in bytes; 0 when absent. Parsed to reject garbage,
    /// otherwise unused.
    pub downloaded: u64,
    /// Bytes still missing; 0 makes the peer a seeder.
    pub left: u64,
    /// Why the peer announces.
    pub event: Event,
    /// Peers wanted, before the tracker's default and cap are applied (saturated to `u32`).
    pub numwant: Option<u32>,
    /// Compact peer lists (BEP 23); `compact=0` asks for the dictionary form. Default true.
    pub compact: bool,
    /// `no_peer_id=1`: leave `peer id` out of the dictionary form to save bytes.
    pub no_peer_id: bool,
}

/// A well-formed scrape query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrapeRequest {
    /// The requested info hashes, in query order, possibly repeated.
    pub info_hashes: Vec<[u8; 20]>,
}

/// Parses the query string of `GET /announce` (everything after `?`).
///
/// Required: `info_hash`, `peer_id`, `port`, `left`. Optional: `uploaded`, `downloaded`,
/// `event`, `numwant`, `compact`, `no_peer_id`. Other parameters are ignored, `ip` on
/// purpose: a peer could otherwise announce someone else's address and aim the swarm at it.
/// Every `%`-escape in the query must be valid, even in parameters we ignore, so that a
/// mangled query is reported rather than half-understood.
pub fn parse_announce(query: &str, max_query_len: usize) -> Result<AnnounceRequest, ParseError> {
    check_length(query, max_query_len)?;
    let mut info_hash = None;
    let mut peer_id = None;
    let mut port = None;
    let mut uploaded = None;
    let mut downloaded = None;
    let mut left = None;
    let mut event = None;
    let mut numwant = None;
    let mut compact = None;
    let mut no_peer_id = None;

    for (raw_name, raw_value) in pairs(query) {
        let name = decode(raw_name, raw_name)?;
        match &*name {
            b"info_hash" => set(&mut info_hash, "info_hash", || {
                twenty_bytes("info_hash", raw_value)
            })?,
            b"peer_id" => set(&mut peer_id, "peer_id", || {
                twenty_bytes("peer_id", raw_value)
            })?,
            b"port" => set(&mut port, "port", || parse_port(raw_value))?,
            b"uploaded" => set(&mut uploaded, "uploaded", || number("uploaded", raw_value))?,
            b"downloaded" => set(&mut downloaded, "downloaded", || {
                number("downloaded", raw_value)
            })?,
            b"left" => set(&mut left, "left", || number("left", raw_value))?,
            b"event" => set(&mut event, "event", || parse_event(raw_value))?,
            b"numwant" => set(&mut numwant, "numwant", || {
                number("numwant", raw_value).map(|n| u32::try_from(n).unwrap_or(u32::MAX))
            })?,
            b"compact" => set(&mut compact, "compact", || flag("compact", raw_value))?,
            b"no_peer_id" => set(&mut no_peer_id, "no_peer_id", || {
                flag("no_peer_id", raw_value)
            })?,
            _ => {
                decode(&name, raw_value)?;
            }
        }
    }

    Ok(AnnounceRequest {
        info_hash: info_hash.ok_or(ParseError::Missing { name: "info_hash" })?,
        peer_id: peer_id.ok_or(ParseError::Missing { name: "peer_id" })?,
        port: port.ok_or(ParseError::Missing { name: "port" })?,
        uploaded: uploaded.unwrap_or(0),
        downloaded: downloaded.unwrap_or(0),
        left: left.ok_or(ParseError::Missing { name: "left" })?,
        event: event.unwrap_or(Event::Periodic),
        numwant,
        compact: compact.unwrap_or(true),
        no_peer_id: no_peer_id.unwrap_or(false),
    })
}

/// Parses the query string of `GET /scrape`: one or more `info_hash` parameters (BEP 48).
///
/// A scrape without `info_hash` is refused rather than answered with every torrent: this is
/// a private tracker and the catalog is not for anonymous listing.
pub fn parse_scrape(query: &str, max_query_len: usize) -> Result<ScrapeRequest, ParseError> {
    check_length(query, max_query_len)?;
    let mut info_hashes = Vec::new();
    for (raw_name, raw_value) in pairs(query) {
        let name = decode(raw_name, raw_name)?;
        if &*name == b"info_hash" {
            info_hashes.push(twenty_bytes("info_hash", raw_value)?);
        } else {
            decode(&name, raw_value)?;
        }
    }
    if info_hashes.is_empty() {
        return Err(ParseError::Missing { name: "info_hash" });
    }
    Ok(ScrapeRequest { info_hashes })
}

fn check_length(query: &str, max: usize) -> Result<(), ParseError> {
    if query.len() > max {
        return Err(ParseError::TooLong {
            len: query.len(),
            max,
        });
    }
    Ok(())
}

/// `name=value` pairs of a query; a bare `name` has an empty value, empty segments (`a&&b`)
/// are skipped as every web server does.
fn pairs(query: &str) -> impl Iterator<Item = (&[u8], &[u8])> {
    query
        .as_bytes()
        .split(|&b| b == b'&')
        .filter(|segment| !segment.is_empty())
        .map(|segment| match segment.iter().position(|&b| b == b'=') {
            Some(eq) => (&segment[..eq], &segment[eq + 1..]),
            None => (segment, &segment[segment.len()..]),
        })
}

/// Fills a single-valued parameter, refusing a second occurrence.
fn set<T>(
    slot: &mut Option<T>,
    name: &'static str,
    parse: impl FnOnce() -> Result<T, ParseError>,
) -> Result<(), ParseError> {
    if slot.is_some() {
        return Err(ParseError::Repeated { name });
    }
    *slot = Some(parse()?);
    Ok(())
}

/// Strict percent-decoding: `+` stays a `+` (clients escape spaces and binary bytes as `%xx`,
/// and a literal `+` in an info hash means byte 0x2b), and a broken escape is an error rather
/// than being passed through as the percent crate would. `name` labels the error.
fn decode<'a>(name: &[u8], raw: &'a [u8]) -> Result<Cow<'a, [u8]>, ParseError> {
    if !raw.contains(&b'%') {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let escape = raw.get(i + 1..i + 3);
            match escape.and_then(|hex| Some((hex_digit(hex[0])?, hex_digit(hex[1])?))) {
                Some((high, low)) => {
                    out.push(high << 4 | low);
                    i += 3;
                }
                None => {
                    let end = (i + 3).min(raw.len());
                    return Err(ParseError::BadEscape {
                        name: quote(name),
                        escape: quote(&raw[i..end]),
                    });
                }
            }
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    Ok(Cow::Owned(out))
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Untrusted bytes made safe to embed in a message: non-printable bytes escaped, long values
/// cut with an ellipsis.
fn quote(bytes: &[u8]) -> String {
    let mut text = bytes[..bytes.len().min(QUOTE_LEN)]
        .escape_ascii()
        .to_string();
    if bytes.len() > QUOTE_LEN {
        text.push_str("...");
    }
    text
}

fn twenty_bytes(name: &'static str, raw: &[u8]) -> Result<[u8; 20], ParseError> {
    let bytes = decode(name.as_bytes(), raw)?;
    <[u8; 20]>::try_from(&*bytes).map_err(|_| ParseError::WrongLength {
        name,
        len: bytes.len(),
    })
}

/// A plain decimal number: no sign, no spaces, no hex. Some old clients sent a negative `left`;
/// rejecting it is safer than guessing whether the peer is a seeder.
fn number(name: &'static str, raw: &[u8]) -> Result<u64, ParseError> {
    let digits = decode(name.as_bytes(), raw)?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::NotANumber {
            name,
            value: quote(&digits),
        });
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)
            .and_then(|acc| acc.checked_add(u64::from(d - b'0')))
            .ok_or_else(|| ParseError::OutOfRange {
                name,
                value: quote(&digits),
                range: "0-18446744073709551615",
            })
    })
}

fn parse_port(raw: &[u8]) -> Result<u16, ParseError> {
    let out_of_range = |value| ParseError::OutOfRange {
        name: "port",
        value,
        range: "1-65535",
    };
    match number("port", raw) {
        Ok(port) => match u16::try_from(port) {
            Ok(0) | Err(_) => Err(out_of_range(port.to_string())),
            Ok(port) => Ok(port),
        },
        Err(ParseError::OutOfRange { value, .. }) => Err(out_of_range(value)),
        Err(other) => Err(other),
    }
}

fn parse_event(raw: &[u8]) -> Result<Event, ParseError> {
    let value = decode(b"event", raw)?;
    match &*value {
        b"started" => Ok(Event::Started),
        b"completed" => Ok(Event::Completed),
        b"stopped" => Ok(Event::Stopped),
        b"" | b"paused" => Ok(Event::Periodic),
        other => Err(ParseError::BadEvent {
            value: quote(other),
        }),
    }
}

fn flag(name: &'static str, raw: &[u8]) -> Result<bool, ParseError> {
    let value = decode(name.as_bytes(), raw)?;
    match &*value {
        b"1" => Ok(true),
        b"0" => Ok(false),
        other => Err(ParseError::BadFlag {
            name,
            value: quote(other),
        }),
    }
}

/// What the server's HTTP handler sends back: always a bencoded body, never an empty 500.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status: 200 for answers and for refusals of well-formed requests (clients only show
    /// a `failure reason` that comes with a 200), 400 for malformed requests.
    pub status: u16,
    /// The bencoded dictionary, sent with [`CONTENT_TYPE`].
    pub body: Vec<u8>,
}

impl Answer {
    /// A bencoded `{failure reason: reason}` with the given status.
    pub fn failure(status: u16, reason: &str) -> Answer {
        let mut encoder = Encoder::new();
        let result = encoder.emit_dict(|mut dict| dict.emit_pair(b"failure reason", reason));
        finish(status, encoder, result)
    }
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
    pub peer_id: [u8; 20],
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

/// Bencodes a successful announce answer (status 200).
///
/// `peers` is always present, even when empty or when the requester is on IPv6, because some
/// clients treat an answer without it as broken.
pub fn encode_announce(reply: &AnnounceReply<'_>) -> Answer {
    let PeerForm::Dict { peer_ids } = reply.form else {
        return Answer {
            status: 200,
            body: compact_answer(reply),
        };
    };
    let mut encoder = Encoder::new();
    let result = encoder.emit_dict(|mut dict| {
        dict.emit_pair(b"complete", reply.complete)?;
        dict.emit_pair(b"incomplete", reply.incomplete)?;
        dict.emit_pair(b"interval", reply.interval_secs)?;
        dict.emit_pair(b"min interval", reply.min_interval_secs)?;
        dict.emit_pair_with(b"peers", |e| {
            e.emit_list(|list| {
                for peer in reply.peers {
                    list.emit_with(|e| dict_peer(e, peer, peer_ids))?;
                }
                Ok(())
            })
        })
    });
    finish(200, encoder, result)
}

/// The compact answer, which nearly every client asks for, written straight into one buffer:
/// its keys are fixed and already in bencode order, and bendy's general encoder (a scratch
/// allocation and a key-order check per dictionary) was a tenth of an announce's CPU time.
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

fn dict_peer(
    e: SingleItemEncoder<'_>,
    peer: &HandoutPeer,
    peer_id: bool,
) -> Result<(), bendy::encoding::Error> {
    e.emit_dict(|mut dict| {
        dict.emit_pair(b"ip", peer.addr.ip().to_string())?;
        if peer_id {
            dict.emit_pair_with(b"peer id", |e| e.emit_bytes(&peer.peer_id))?;
        }
        dict.emit_pair(b"port", peer.addr.port())
    })
}

/// One torrent's line in a scrape answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScrapeEntry {
    /// The torrent, used raw as the key of BEP 48's `files` dictionary.
    pub info_hash: [u8; 20],
    /// Seeders.
    pub complete: u32,
    /// Leechers.
    pub incomplete: u32,
    /// Completed downloads since the torrent was catalogued.
    pub downloaded: u64,
}

/// Bencodes a scrape answer (status 200): `{files: {<raw info hash>: {complete, downloaded,
/// incomplete}}}`. Entries are sorted and de-duplicated here, since bencode requires sorted,
/// unique keys and a client may name a hash twice.
pub fn encode_scrape(entries: &[ScrapeEntry]) -> Answer {
    let mut sorted = entries.to_vec();
    sorted.sort_unstable_by_key(|entry| entry.info_hash);
    sorted.dedup_by_key(|entry| entry.info_hash);
    let mut encoder = Encoder::new();
    let result = encoder.emit_dict(|mut dict| {
        dict.emit_pair_with(b"files", |e| {
            e.emit_dict(|mut files| {
                for entry in &sorted {
                    files.emit_pair_with(&entry.info_hash, |e| {
                        e.emit_dict(|mut stats| {
                            stats.emit_pair(b"complete", entry.complete)?;
                            stats.emit_pair(b"downloaded", entry.downloaded)?;
                            stats.emit_pair(b"incomplete", entry.incomplete)
                        })
                    })?;
                }
                Ok(())
            })
        })
    });
    finish(200, encoder, result)
}

/// Turns a finished encoder into an answer. Encoding only fails if our own dictionaries are
/// out of order, a bug the tests catch; should one slip through, the client still gets a
/// bencoded failure instead of a panic or a truncated body.
fn finish(status: u16, encoder: Encoder, result: Result<(), bendy::encoding::Error>) -> Answer {
    match result.and_then(|()| encoder.get_output()) {
        Ok(body) => Answer { status, body },
        Err(error) => {
            tracing::error!(%error, "bencoding a tracker answer failed");
            Answer {
                status,
                body: b"d14:failure reason31:tracker failed to encode answere".to_vec(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "%01%02%03%04%05%06%07%08%09%0a%0b%0c%0d%0e%0f%10%11%12%13%14";
    const PEER: &str = "-BT0001-abcdefghijkl";

    fn base() -> String {
        format!("info_hash={HASH}&peer_id={PEER}&port=6881&left=0")
    }

    #[test]
    fn parses_a_full_announce() {
        let query = format!(
            "{}&uploaded=5&downloaded=7&event=started&numwant=12&compact=0&no_peer_id=1&ip=1.2.3.4&key=x",
            base()
        );
        let req = parse_announce(&query, 4096).unwrap();
        assert_eq!(req.info_hash, core::array::from_fn(|i| i as u8 + 1));
        assert_eq!(&req.peer_id, PEER.as_bytes());
        assert_eq!(req.port, 6881);
        assert_eq!((req.uploaded, req.downloaded, req.left), (5, 7, 0));
        assert_eq!(req.event, Event::Started);
        assert_eq!(req.numwant, Some(12));
        assert!(!req.compact);
        assert!(req.no_peer_id);
    }

    #[test]
    fn defaults_and_literal_plus() {
        // `+` is byte 0x2b, not a space: the hash below is twenty `+`.
        let query = format!("info_hash={}&peer_id={PEER}&port=1&left=10", "+".repeat(20));
        let req = parse_announce(&query, 4096).unwrap();
        assert_eq!(req.info_hash, [b'+'; 20]);
        assert_eq!(req.event, Event::Periodic);
        assert_eq!(req.numwant, None);
        assert!(req.compact);
        assert_eq!((req.uploaded, req.downloaded), (0, 0));
    }

    #[test]
    fn huge_numwant_saturates() {
        let req = parse_announce(&format!("{}&numwant=99999999999", base()), 4096).unwrap();
        assert_eq!(req.numwant, Some(u32::MAX));
    }

    #[test]
    fn messages_name_parameter_and_value() {
        let cases = [
            (format!("{}&port=0", base()), "port is given more than once"),
            (
                base().replace("port=6881", "port=0"),
                "port 0 is out of range 1-65535",
            ),
            (
                base().replace("port=6881", "port=70000"),
                "port 70000 is out of range 1-65535",
            ),
            (
                base().replace("port=6881", "port=abc"),
                "port 'abc' is not a non-negative integer",
            ),
            (
                base().replace("left=0", "left=-1"),
                "left '-1' is not a non-negative integer",
            ),
            (
                base().replace("left=0", "left=99999999999999999999"),
                "left 99999999999999999999 is out of range 0-18446744073709551615",
            ),
            (
                base().replace("%14", ""),
                "info_hash is 19 bytes after %-decoding, expected 20",
            ),
            (
                base().replace("%14", "%g4"),
                "info_hash has a bad %-escape \"%g4\"",
            ),
            (
                format!("{}&event=paused2", base()),
                "event 'paused2' is not one of started, completed, stopped or empty",
            ),
            (format!("{}&compact=2", base()), "compact '2' is not 0 or 1"),
            (format!("{}&key=%", base()), "key has a bad %-escape \"%\""),
            (base().replace("left=0", "x=1"), "left is missing"),
        ];
        for (query, message) in cases {
            assert_eq!(
                parse_announce(&query, 4096).unwrap_err().to_string(),
                message,
                "{query}"
            );
        }
    }

    #[test]
    fn quotes_are_escaped_and_cut() {
        let value = format!("%00{}", "9".repeat(100));
        let err = parse_announce(&base().replace("left=0", &format!("left={value}")), 4096)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("left '\\x00999"), "{err}");
        assert!(err.contains("...'"), "{err}");
    }

    #[test]
    fn failure_body_is_bencode() {
        let answer = Answer::failure(400, "port 0 is out of range 1-65535");
        assert_eq!(answer.status, 400);
        assert_eq!(
            answer.body,
            b"d14:failure reason30:port 0 is out of range 1-65535e"
        );
    }

    #[test]
    fn fallback_body_is_bencode() {
        let body = b"d14:failure reason31:tracker failed to encode answere";
        let value = boottorrent_bt::bencode::decode(body).unwrap();
        assert!(value.as_dict().unwrap().get(b"failure reason").is_some());
    }

    #[test]
    fn scrape_sorts_and_dedups() {
        let entry = |b: u8| ScrapeEntry {
            info_hash: [b; 20],
            complete: 1,
            incomplete: 2,
            downloaded: 3,
        };
        let answer = encode_scrape(&[entry(9), entry(1), entry(9)]);
        assert_eq!(answer.status, 200);
        let mut expected = b"d5:filesd20:".to_vec();
        expected.extend_from_slice(&[1; 20]);
        expected.extend_from_slice(b"d8:completei1e10:downloadedi3e10:incompletei2ee20:");
        expected.extend_from_slice(&[9; 20]);
        expected.extend_from_slice(b"d8:completei1e10:downloadedi3e10:incompletei2eeee");
        assert_eq!(answer.body, expected);
    }
}
