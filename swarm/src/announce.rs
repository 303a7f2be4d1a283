//! The HTTP tracker client: the announce round trip, with the limits a tracker must not be able
//! to push us past: a deadline, a redirect cap and a body cap. The query it sends and the
//! answer it parses are [`boottorrent_bt::announce`]'s, shared with our tracker.

use std::fmt::Write as _;
use std::time::Duration;

use boottorrent_bt::announce::{AnnounceResponse, ResponseError, announce_url, parse_response};

// The announcer in `torrent` names them `crate::announce::...`.
pub(crate) use boottorrent_bt::announce::{AnnounceRequest, Event};

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

/// Why an announce failed.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
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
        /// A refusal, or a body that is not a usable answer.
        error: ResponseError,
    },
}

impl AnnounceError {
    /// The tracker's `failure reason`, if that is why the announce failed. A tracker that says
    /// no (unregistered torrent, not whitelisted) will say it again, unlike a network error.
    pub fn failure_reason(&self) -> Option<&str> {
        match self {
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
            error,
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
    use boottorrent_bt::announce::answer::{MAX_INTERVAL, MIN_INTERVAL};
    use boottorrent_bt::{InfoHash, PeerId};
    use std::net::SocketAddr;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

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

    #[test]
    fn failures_name_the_tracker() {
        let err =
            parse_response(b"d14:failure reason20:unregistered torrent8:intervali5ee").unwrap_err();
        let wrapped = AnnounceError::Response {
            url: "http://t.lab/announce".into(),
            error: err,
        };
        assert_eq!(
            wrapped.to_string(),
            "announcing to http://t.lab/announce: tracker said: unregistered torrent"
        );
        assert_eq!(wrapped.failure_reason(), Some("unregistered torrent"));
    }

    /// An `opentracker` process on a free loopback port, killed when dropped.
    struct Opentracker {
        process: boottorrent_testkit::Proc,
        base_url: String,
    }

    impl Opentracker {
        /// Starts opentracker in `dir`, serving only `hashes` (the Debian build refuses any
        /// torrent not on its whitelist), and waits until it answers announces.
        async fn start(dir: &std::path::Path, hashes: &[InfoHash]) -> Opentracker {
            boottorrent_testkit::require_tool("opentracker", "opentracker");
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
                let port = boottorrent_testkit::free_port();
                let mut command = Command::new("opentracker");
                command
                    .args(["-i", "127.0.0.1", "-p", &port.to_string(), "-d"])
                    .arg(dir)
                    .args(["-w", "whitelist"])
                    .current_dir(dir);
                // Owned by the guard from here on, so a panic below still kills it.
                let mut tracker = Opentracker {
                    process: boottorrent_testkit::spawn(
                        command,
                        dir.join(format!("opentracker-{port}.log")),
                    ),
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
                if let Some(status) = self.process.exited() {
                    eprintln!(
                        "opentracker exited with {status}:\n{}",
                        self.process.log_text()
                    );
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
