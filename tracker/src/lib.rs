//! BootTorrent's BitTorrent tracker logic and `.torrent` creation.
//!
//! - [`create`]: hashing a file into a single-file metainfo (SHA-1 pieces and the SHA-256 of
//!   the whole file in one read, on every core), written with `boottorrent_bt::bencode`.
//! - [`announce`]: answers with their HTTP status; the queries and bencoded bodies are
//!   `boottorrent_bt::announce`'s.
//! - [`swarm`]: the peers of each catalogued torrent, their expiry and the handout policy
//!   (same zone or subnet first, incomplete before complete, the server's seeder last).
//!
//! Pure logic with no HTTP server and no async runtime: the server mounts it on its own
//! HTTP listener.

pub mod announce;
pub mod create;
pub mod swarm;
