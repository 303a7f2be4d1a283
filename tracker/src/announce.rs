//! The tracker's side of the HTTP tracker protocol: what the server's handler sends back. The
//! queries it parses and the bencoded answers it writes are [`boottorrent_bt::announce`]'s,
//! shared with our client; this module adds the HTTP status and the refusals in our words.

use boottorrent_bt::announce::encode_failure;

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
        Answer {
            status,
            body: encode_failure(reason),
        }
    }

    /// A 200 answer carrying `body`, an announce or scrape answer.
    pub fn ok(body: Vec<u8>) -> Answer {
        Answer { status: 200, body }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_body_is_bencode() {
        let answer = Answer::failure(400, "port 0 is out of range 1-65535");
        assert_eq!(answer.status, 400);
        assert_eq!(
            answer.body,
            b"d14:failure reason30:port 0 is out of range 1-65535e"
        );
    }
}
