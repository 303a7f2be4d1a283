//! The HTTP tracker client: BEP 3 announces with compact peer lists (BEP 23), IPv6 peers
//! (BEP 7) and the older list-of-dictionaries form.
//!
//! [`announce_url`] and [`parse_response`] are pure so they can be tested byte for byte;
//! [`TrackerClient`] adds the HTTP round trip with the limits a tracker must not be able to
//! push us past: a deadline, a redirect cap and a body cap.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_encode};

use crate::bencode::{self, BencodeError, Dict, Value};
use crate::{InfoHash, PeerId};

/// Shortest re-announce interval we honour, whatever the tracker asks: a misconfigured tracker
/// must not be able to make a whole lab hammer it.
pub const MIN_INTERVAL: Duration = Duration::from_secs(10);
/// Longest re-announce interval we honour, so peers that join later still find us within the
/// hour.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// Interval used when the tracker names none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1800);
/// Largest response body we read. 1 MiB holds over 170,000 compact peers, far more than any
/// lab; anything bigger is a broken or hostile tracker.
pub const MAX_BODY_LEN: usize = 1024 * 1024;

/// Deadline for a whole announce, body included, so a stalled tracker cannot hold an announce
/// task forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Redirects we follow before giving up.
const MAX_REDIRECTS: usize = 3;
/// How much of an error page we quote in [`AnnounceError::Status`].
const ERROR_BODY_PREVIEW: usize = 200;
/// How much of a tracker's failure or warning text we keep; the rest is noise in the logs.
const MAX_MESSAGE_LEN: usize = 1024;

/// BEP 3: every byte outside `0-9a-zA-Z.-_~` is percent-encoded.
const QUERY_BYTE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'.')
    .remove(b'-')
    .remove(b'_')
    .remove(b'~');

/// Why we are announcing: the tracker counts downloads and forgets peers by these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// First announce of a download.
    Started,
    /// The download just finished; sent once, not when starting as a seeder.
    Completed,
    /// We are leaving the swarm; the tracker can drop us at once.
    Stopped,
    /// A regular re-announce, sent without an `event` parameter.
    Periodic,
}

impl Event {
    /// The value of the `event` query parameter, or `None` for [`Event::Periodic`], which
    /// BEP 3 expresses by leaving the parameter out.
    pub fn query_value(self) -> Option<&'static str> {
        match self {
            Event::Started => Some("started"),
            Event::Completed => Some("completed"),
            Event::Stopped => Some("stopped"),
            Event::Periodic => None,
        }
    }
}

/// Everything one announce tells the tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceRequest {
    /// The torrent.
    pub info_hash: InfoHash,
    /// Our peer id.
    pub peer_id: PeerId,
    /// The TCP port our peer listener accepts on.
    pub port: u16,
    /// Bytes sent to peers since the `started` announce.
    pub uploaded: u64,
    /// Bytes received from peers since the `started` announce.
    pub downloaded: u64,
    /// Bytes still missing; 0 makes us a seeder.
    pub left: u64,
    /// Why we are announcing.
    pub event: Event,
    /// How many peers we would like; `None` leaves it to the tracker.
    pub numwant: Option<u32>,
}

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

/// Why an announce failed.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// The tracker refused the announce with a `failure reason`.
    #[error("tracker said: {0}")]
    Failure(String),
    /// The response body is not bencode.
    #[error("tracker response is not bencode: {0}")]
    Bencode(BencodeError),
    /// The response is bencode but not a valid announce response.
    #[error("malformed tracker response: {0}")]
    Malformed(String),
    /// The HTTP request failed: connection, timeout, redirects or an invalid URL.
    #[error("announcing to {url}: {}", error_chain(.error))]
    Request {
        /// The tracker's announce URL, without our query.
        url: String,
        /// What reqwest reported.
        error: reqwest::Error,
    },
    /// The tracker answered with a non-2xx HTTP status.
    #[error("announcing to {url}: HTTP {status}: {body:?}")]
    Status {
        /// The tracker's announce URL, without our query.
        url: String,
        /// The status it answered.
        status: reqwest::StatusCode,
        /// The start of the body, for the operator to recognise the error page.
        body: String,
    },
    /// The body exceeded [`MAX_BODY_LEN`].
    #[error("announcing to {url}: response is larger than {limit} bytes")]
    TooLarge {
        /// The tracker's announce URL, without our query.
        url: String,
        /// The limit it exceeded.
        limit: usize,
    },
    /// The tracker answered 2xx but the body was a failure or unusable.
    #[error("announcing to {url}: {error}")]
    Response {
        /// The tracker's announce URL, without our query.
        url: String,
        /// A [`Failure`](AnnounceError::Failure), [`Bencode`](AnnounceError::Bencode) or
        /// [`Malformed`](AnnounceError::Malformed) error.
        error: Box<AnnounceError>,
    },
}

impl AnnounceError {
    /// The tracker's `failure reason`, if that is why the announce failed. A tracker that says
    /// no (unregistered torrent, not whitelisted) will say it again, unlike a network error.
    pub fn failure_reason(&self) -> Option<&str> {
        match self {
            AnnounceError::Failure(reason) => Some(reason),
            AnnounceError::Response { error, .. } => error.failure_reason(),
            _ => None,
        }
    }
}

/// reqwest's own message is "error sending request for url (...)"; the reason (connection
/// refused, timed out) is further down the source chain.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // Writing to a String cannot fail.
        let _ = write!(message, ": {cause}");
        source = cause.source();
    }
    message
}

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

/// Parses a tracker's bencoded answer. A `failure reason` wins over everything else in the
/// dictionary, as BEP 3 says.
pub fn parse_response(body: &[u8]) -> Result<AnnounceResponse, AnnounceError> {
    let value = bencode::decode(body).map_err(AnnounceError::Bencode)?;
    let Some(dict) = value.as_dict() else {
        return Err(malformed(format!(
            "the response is {}, not a dictionary",
            value.kind()
        )));
    };
    if let Some(reason) = dict.get(b"failure reason") {
        return match reason {
            Value::Bytes(reason) => Err(AnnounceError::Failure(message(reason))),
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
                if let Some(addr) = dict_peer(index, entry)? {
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
fn dict_peer(index: usize, entry: &Value<'_>) -> Result<Option<SocketAddr>, AnnounceError> {
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

fn optional_int(dict: &Dict<'_>, key: &str) -> Result<Option<i64>, AnnounceError> {
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

fn malformed(reason: String) -> AnnounceError {
    AnnounceError::Malformed(reason)
}

fn wrong_type(key: &str, expected: &str, found: &Value<'_>) -> AnnounceError {
    malformed(format!("`{key}` is {}, expected {expected}", found.kind()))
}

/// Announces to HTTP trackers. Cheap to clone: clones share one connection pool.
#[derive(Debug, Clone)]
pub struct TrackerClient {
    http: reqwest::Client,
}

impl Default for TrackerClient {
    fn default() -> Self {
        TrackerClient::new()
    }
}

impl TrackerClient {
    /// A client with a 10 s deadline per announce and at most 3 redirects.
    pub fn new() -> TrackerClient {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
            .user_agent(concat!("BootTorrent/", env!("CARGO_PKG_VERSION")))
            // Trackers are on the lab LAN; a proxy from the environment, meant for the
            // internet, would only stand between us and them.
            .no_proxy()
            // No idle connections kept: announces are a minute or more apart, and trackers
            // such as opentracker close every connection after answering, so a kept one is
            // usually dead by the next announce (seen as "connection reset" on reuse).
            .pool_max_idle_per_host(0)
            .build()
            // Without a TLS backend compiled in, building can only fail on resources that
            // `reqwest::Client::new` would panic on just the same.
            .expect("building the tracker HTTP client");
        TrackerClient { http }
    }

    /// Announces `req` to the tracker at `base_url` (its announce URL, such as
    /// `http://10.0.0.1:6969/announce`) and parses the answer.
    pub async fn announce(
        &self,
        base_url: &str,
        req: &AnnounceRequest,
    ) -> Result<AnnounceResponse, AnnounceError> {
        let request_error = |error| AnnounceError::Request {
            url: base_url.to_owned(),
            error,
        };
        let mut response = self
            .http
            .get(announce_url(base_url, req))
            .send()
            .await
            .map_err(request_error)?;

        let status = response.status();
        if !status.is_success() {
            // Only a preview, and best effort: the status is the error.
            let mut preview = Vec::new();
            while preview.len() < ERROR_BODY_PREVIEW {
                match response.chunk().await {
                    Ok(Some(chunk)) => preview.extend_from_slice(&chunk),
                    Ok(None) | Err(_) => break,
                }
            }
            preview.truncate(ERROR_BODY_PREVIEW);
            return Err(AnnounceError::Status {
                url: base_url.to_owned(),
                status,
                body: String::from_utf8_lossy(&preview).trim().to_owned(),
            });
        }

        let too_large = || AnnounceError::TooLarge {
            url: base_url.to_owned(),
            limit: MAX_BODY_LEN,
        };
        // Content-Length is only a hint (it may be absent or lie); the loop below enforces
        // the cap either way, this just fails early without reading.
        if response
            .content_length()
            .is_some_and(|len| len > MAX_BODY_LEN as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(request_error)? {
            if body.len() + chunk.len() > MAX_BODY_LEN {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }

        let parsed = parse_response(&body).map_err(|error| AnnounceError::Response {
            url: base_url.to_owned(),
            error: Box::new(error),
        })?;
        tracing::debug!(
            url = base_url,
            event = ?req.event,
            peers = parsed.peers.len(),
            interval_s = parsed.interval.as_secs(),
            "announced"
        );
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Child, Command, Stdio};

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
        assert!(matches!(&err, AnnounceError::Failure(r) if r == "unregistered torrent"));
        assert_eq!(err.failure_reason(), Some("unregistered torrent"));
        let wrapped = AnnounceError::Response {
            url: "http://t.lab/announce".into(),
            error: Box::new(err),
        };
        assert_eq!(
            wrapped.to_string(),
            "announcing to http://t.lab/announce: tracker said: unregistered torrent"
        );
        assert_eq!(wrapped.failure_reason(), Some("unregistered torrent"));

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

    /// An `opentracker` process on a free loopback port, killed when dropped.
    struct Opentracker {
        child: Child,
        base_url: String,
    }

    impl Drop for Opentracker {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Opentracker {
        /// Starts opentracker in `dir`, serving only `hashes` (the Debian build refuses any
        /// torrent not on its whitelist), and waits until it answers announces.
        async fn start(dir: &std::path::Path, hashes: &[InfoHash]) -> Opentracker {
            let whitelist: String = hashes.iter().map(|h| format!("{h}\n")).collect();
            std::fs::write(dir.join("whitelist"), whitelist).unwrap();
            // Started as root, opentracker chroots into `-d` and drops to `nobody` before it
            // reads the whitelist, so both must be world-readable.
            let readable = |mode| std::fs::Permissions::from_mode(mode);
            std::fs::set_permissions(dir, readable(0o755)).unwrap();
            std::fs::set_permissions(dir.join("whitelist"), readable(0o644)).unwrap();

            // The port is free when we look but could be taken before opentracker binds it;
            // a tracker that exits at once gets another try on another port.
            for _ in 0..3 {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("finding a free port")
                    .port();
                let child = Command::new("opentracker")
                    .args(["-i", "127.0.0.1", "-p", &port.to_string(), "-d"])
                    .arg(dir)
                    .args(["-w", "whitelist"])
                    .current_dir(dir)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| {
                        panic!(
                            "starting `opentracker` failed ({e}); this test needs the Debian \
                             package `opentracker` installed"
                        )
                    });
                // Owned by the guard from here on, so a panic below still kills it.
                let mut tracker = Opentracker {
                    child,
                    base_url: format!("http://127.0.0.1:{port}/announce"),
                };
                // Every hash, not just the first: opentracker loads its whitelist line by line
                // in a thread of its own, so the first may be served before the last is read
                // (a fresh-clone CI run saw "not authorized" for the second).
                let mut ready = true;
                for hash in hashes {
                    ready = ready && tracker.wait_ready(*hash).await;
                }
                if ready {
                    return tracker;
                }
            }
            panic!("opentracker did not start on any of 3 free ports");
        }

        /// Polls until an announce for `probe_hash` succeeds: the port is bound before the
        /// whitelist is loaded, so an open port alone does not mean ready. The probe is a
        /// `started` (opentracker lets `stopped` through whatever its whitelist says), taken
        /// out of the swarm again at once. False if the process died.
        async fn wait_ready(&mut self, probe_hash: InfoHash) -> bool {
            let client = TrackerClient::new();
            let mut probe = request(Event::Started);
            probe.info_hash = probe_hash;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(status) = self.child.try_wait().expect("polling opentracker") {
                    eprintln!("opentracker exited with {status}");
                    return false;
                }
                match client.announce(&self.base_url, &probe).await {
                    Ok(_) => {
                        let leave = AnnounceRequest {
                            event: Event::Stopped,
                            ..probe
                        };
                        let _ = client.announce(&self.base_url, &leave).await;
                        return true;
                    }
                    Err(e) if tokio::time::Instant::now() > deadline => {
                        panic!("opentracker never answered: {e}")
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
    }

    #[tokio::test]
    async fn second_peer_learns_about_the_first_from_opentracker() {
        let probe = InfoHash([0xee; 20]);
        let torrent = InfoHash(*b"boottorrent-test-001");
        let dir = tempfile::tempdir().expect("creating a directory for opentracker");
        let tracker = Opentracker::start(dir.path(), &[probe, torrent]).await;
        let client = TrackerClient::new();

        let first = AnnounceRequest {
            info_hash: torrent,
            peer_id: PeerId(*b"-BT0100-first-peer-1"),
            port: 40001,
            uploaded: 0,
            downloaded: 0,
            left: 1000,
            event: Event::Started,
            numwant: Some(50),
        };
        client.announce(&tracker.base_url, &first).await.unwrap();

        let second = AnnounceRequest {
            peer_id: PeerId(*b"-BT0100-second-peer2"),
            port: 40002,
            ..first
        };
        let response = client.announce(&tracker.base_url, &second).await.unwrap();
        let first_addr: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        assert!(
            response.peers.contains(&first_addr),
            "{first_addr} missing from {response:?}"
        );
        assert_eq!(response.incomplete, Some(2));
        assert!((MIN_INTERVAL..=MAX_INTERVAL).contains(&response.interval));

        let unknown = AnnounceRequest {
            info_hash: InfoHash([0x11; 20]),
            ..first
        };
        let err = client
            .announce(&tracker.base_url, &unknown)
            .await
            .unwrap_err();
        assert!(err.failure_reason().is_some(), "{err}");
        assert!(
            err.to_string().starts_with(&format!(
                "announcing to {}: tracker said: ",
                tracker.base_url
            )),
            "{err}"
        );
    }

    #[tokio::test]
    async fn http_errors_name_the_url() {
        // A port nothing listens on: bound, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/announce");
        let err = TrackerClient::new()
            .announce(&url, &request(Event::Started))
            .await
            .unwrap_err();
        assert!(matches!(err, AnnounceError::Request { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("announcing to {url}: ")),
            "{err}"
        );
    }
}
