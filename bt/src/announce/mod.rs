//! The HTTP tracker protocol (BEP 3), both sides of it, so that our client and our tracker
//! share one set of types:
//! - [`query`]: the announce query the client builds ([`announce_url`]) and the tracker
//!   parses ([`parse_announce`], [`parse_scrape`] for BEP 48);
//! - [`answer`]: the bencoded answer the tracker writes ([`encode_announce`],
//!   [`encode_scrape`], [`encode_failure`]) and the client parses ([`parse_response`]), with
//!   compact (BEP 23), IPv6 (BEP 7) or dictionary peer lists.
//!
//! The HTTP round trips are the users' business: the client in `swarm`, the handler in the
//! server.

use crate::{InfoHash, PeerId};

pub mod answer;
pub mod query;

pub use answer::{
    AnnounceReply, AnnounceResponse, HandoutPeer, PeerForm, ResponseError, ScrapeEntry,
    encode_announce, encode_failure, encode_scrape, parse_response,
};
pub use query::{
    AnnounceQuery, ParseError, ScrapeRequest, announce_url, parse_announce, parse_scrape,
};

/// Why a peer announces: the tracker counts downloads and forgets peers by these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// First announce of a download.
    Started,
    /// The download just finished; sent once, not when starting as a seeder. Counted in the
    /// scrape's `downloaded`.
    Completed,
    /// The peer leaves the swarm; the tracker can forget it at once instead of waiting for
    /// expiry.
    Stopped,
    /// A regular re-announce: no `event` parameter, an empty one, or BEP 21's `paused` (an
    /// upload-only peer, which for us is just a peer).
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

    /// The event a query's `event` value names; `None` for one BEP 3 does not define.
    pub fn from_query_value(value: &[u8]) -> Option<Event> {
        match value {
            b"started" => Some(Event::Started),
            b"completed" => Some(Event::Completed),
            b"stopped" => Some(Event::Stopped),
            b"" | b"paused" => Some(Event::Periodic),
            _ => None,
        }
    }
}

/// Everything one announce tells the tracker: what the client sends and the tracker parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceRequest {
    /// The torrent.
    pub info_hash: InfoHash,
    /// The announcing peer's self-chosen id, repeated to others in the dictionary form.
    pub peer_id: PeerId,
    /// The TCP port the peer accepts connections on, 1-65535.
    pub port: u16,
    /// Bytes sent to peers since the `started` announce; 0 when absent.
    pub uploaded: u64,
    /// Bytes received from peers since the `started` announce; 0 when absent.
    pub downloaded: u64,
    /// Bytes still missing; 0 makes the peer a seeder.
    pub left: u64,
    /// Why the peer announces.
    pub event: Event,
    /// How many peers it would like (saturated to `u32`); `None` leaves it to the tracker.
    pub numwant: Option<u32>,
}
