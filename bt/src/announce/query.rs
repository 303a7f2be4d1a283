//! The announce and scrape queries: built by the client, parsed by the tracker.
//!
//! Queries are parsed by hand rather than with a form decoder because `info_hash` and
//! `peer_id` are raw bytes: decoding them as UTF-8 or turning `+` into a space would corrupt
//! them. Everything here is pure and allocation-light, so the tracker can call it on every
//! request and the fuzz-style tests can call it ten thousand times.

use std::borrow::Cow;
use std::fmt::Write as _;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_encode};

use super::answer::PeerForm;
use super::{AnnounceRequest, Event};
use crate::{InfoHash, PeerId};

/// How much of an offending value a failure message quotes: enough to recognise it, not enough
/// to turn the failure reason into an echo of a hostile query.
const QUOTE_LEN: usize = 40;

/// BEP 3: every byte outside `0-9a-zA-Z.-_~` is percent-encoded.
const QUERY_BYTE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'.')
    .remove(b'-')
    .remove(b'_')
    .remove(b'~');

/// The full announce URL: `base` plus our query. `base` may already carry a query (some
/// trackers put a key there), which we extend rather than replace.
pub fn announce_url(base: &str, req: &AnnounceRequest) -> String {
    let mut url = String::with_capacity(base.len() + 192);
    url.push_str(base);
    if !base.contains('?') {
        url.push('?');
    } else if !base.ends_with(['?', '&']) {
        url.push('&');
    }
    // Writing to a String cannot fail.
    let _ = write!(
        url,
        "info_hash={}&peer_id={}&port={}&uploaded={}&downloaded={}&left={}&compact=1",
        percent_encode(&req.info_hash.0, QUERY_BYTE),
        percent_encode(&req.peer_id.0, QUERY_BYTE),
        req.port,
        req.uploaded,
        req.downloaded,
        req.left,
    );
    if let Some(event) = req.event.query_value() {
        let _ = write!(url, "&event={event}");
    }
    if let Some(numwant) = req.numwant {
        let _ = write!(url, "&numwant={numwant}");
    }
    url
}

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

/// A well-formed announce query: the request, and how the client wants its peer list written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceQuery {
    /// What the peer announced.
    pub request: AnnounceRequest,
    /// Compact (BEP 23) unless `compact=0` asked for the dictionary form, then with or without
    /// `peer id` as `no_peer_id` says.
    pub form: PeerForm,
}

/// A well-formed scrape query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrapeRequest {
    /// The requested info hashes, in query order, possibly repeated.
    pub info_hashes: Vec<InfoHash>,
}

/// Parses the query string of `GET /announce` (everything after `?`).
///
/// Required: `info_hash`, `peer_id`, `port`, `left`. Optional: `uploaded`, `downloaded`,
/// `event`, `numwant`, `compact`, `no_peer_id`. Other parameters are ignored, `ip` on
/// purpose: a peer could otherwise announce someone else's address and aim the swarm at it.
/// Every `%`-escape in the query must be valid, even in parameters we ignore, so that a
/// mangled query is reported rather than half-understood.
pub fn parse_announce(query: &str, max_query_len: usize) -> Result<AnnounceQuery, ParseError> {
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

    let request = AnnounceRequest {
        info_hash: InfoHash(info_hash.ok_or(ParseError::Missing { name: "info_hash" })?),
        peer_id: PeerId(peer_id.ok_or(ParseError::Missing { name: "peer_id" })?),
        port: port.ok_or(ParseError::Missing { name: "port" })?,
        uploaded: uploaded.unwrap_or(0),
        downloaded: downloaded.unwrap_or(0),
        left: left.ok_or(ParseError::Missing { name: "left" })?,
        event: event.unwrap_or(Event::Periodic),
        numwant,
    };
    let form = if compact.unwrap_or(true) {
        PeerForm::Compact
    } else {
        PeerForm::Dict {
            peer_ids: !no_peer_id.unwrap_or(false),
        }
    };
    Ok(AnnounceQuery { request, form })
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
            info_hashes.push(InfoHash(twenty_bytes("info_hash", raw_value)?));
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
    Event::from_query_value(&value).ok_or_else(|| ParseError::BadEvent {
        value: quote(&value),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(event: Event) -> AnnounceRequest {
        let mut info_hash = [0u8; 20];
        info_hash[..8].copy_from_slice(&[0x00, 0x7f, 0x80, 0xff, b'a', b'~', b' ', b'%']);
        AnnounceRequest {
            info_hash: InfoHash(info_hash),
            peer_id: PeerId(*b"-BT0100-abc.DEF_~-/?"),
            port: 6881,
            uploaded: 1,
            downloaded: 2,
            left: 3,
            event,
            numwant: None,
        }
    }

    const HASH_ENCODED: &str = "%00%7F%80%FFa~%20%25%00%00%00%00%00%00%00%00%00%00%00%00";

    #[test]
    fn url_encodes_bytes_and_fields() {
        let url = announce_url("http://t.lab:6969/announce", &request(Event::Started));
        assert_eq!(
            url,
            format!(
                "http://t.lab:6969/announce?info_hash={HASH_ENCODED}\
                 &peer_id=-BT0100-abc.DEF_~-%2F%3F&port=6881&uploaded=1&downloaded=2&left=3\
                 &compact=1&event=started"
            )
        );
    }

    #[test]
    fn url_events_numwant_and_existing_queries() {
        let periodic = request(Event::Periodic);
        let url = announce_url("http://t/announce?key=abc", &periodic);
        assert!(
            url.starts_with("http://t/announce?key=abc&info_hash="),
            "{url}"
        );
        assert!(url.ends_with("&compact=1"), "{url}");
        assert!(!url.contains("event="));

        let url = announce_url("http://t/announce?", &periodic);
        assert!(url.starts_with("http://t/announce?info_hash="), "{url}");

        for (event, value) in [(Event::Completed, "completed"), (Event::Stopped, "stopped")] {
            let mut req = request(event);
            req.numwant = Some(50);
            let url = announce_url("http://t/a", &req);
            assert!(
                url.ends_with(&format!("&event={value}&numwant=50")),
                "{url}"
            );
        }
    }

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
        let AnnounceQuery { request: req, form } = parse_announce(&query, 4096).unwrap();
        assert_eq!(req.info_hash.0, core::array::from_fn(|i| i as u8 + 1));
        assert_eq!(&req.peer_id.0, PEER.as_bytes());
        assert_eq!(req.port, 6881);
        assert_eq!((req.uploaded, req.downloaded, req.left), (5, 7, 0));
        assert_eq!(req.event, Event::Started);
        assert_eq!(req.numwant, Some(12));
        // compact=0 and no_peer_id=1.
        assert_eq!(form, PeerForm::Dict { peer_ids: false });
    }

    #[test]
    fn defaults_and_literal_plus() {
        // `+` is byte 0x2b, not a space: the hash below is twenty `+`.
        let query = format!("info_hash={}&peer_id={PEER}&port=1&left=10", "+".repeat(20));
        let AnnounceQuery { request: req, form } = parse_announce(&query, 4096).unwrap();
        assert_eq!(req.info_hash.0, [b'+'; 20]);
        assert_eq!(req.event, Event::Periodic);
        assert_eq!(req.numwant, None);
        assert_eq!(form, PeerForm::Compact);
        assert_eq!((req.uploaded, req.downloaded), (0, 0));
    }

    #[test]
    fn huge_numwant_saturates() {
        let query = parse_announce(&format!("{}&numwant=99999999999", base()), 4096).unwrap();
        assert_eq!(query.request.numwant, Some(u32::MAX));
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

    /// What the client writes, the tracker reads back as it was meant: every event, every
    /// byte value in the hashes, with and without `numwant`.
    #[test]
    fn the_tracker_parses_what_the_client_builds() {
        for event in [
            Event::Started,
            Event::Completed,
            Event::Stopped,
            Event::Periodic,
        ] {
            for numwant in [None, Some(0), Some(u32::MAX)] {
                let mut req = request(event);
                req.info_hash = InfoHash(core::array::from_fn(|i| (i * 13) as u8));
                req.numwant = numwant;
                let url = announce_url("http://t.lab/announce?key=a", &req);
                let query = url.split_once('?').unwrap().1;
                let parsed = parse_announce(query, 4096).unwrap();
                assert_eq!(parsed.request, req, "{url}");
                assert_eq!(parsed.form, PeerForm::Compact);
            }
        }
    }
}
