//! BootTorrent's BitTorrent peer engine, built for a cooperative fleet.
//!
//! Every peer in a lab swarm is ours (or a standard client in tests), so the engine optimises
//! for the fleet rather than for a market: rarest-first picking with random tie-breaks, no
//! tit-for-tat, `have_all`/`have_none` from the Fast extension so fresh peers learn about each
//! other at once, and a super-seeding mode that lets the server send each piece about once.
//!
//! Layout, leaves first. BitTorrent's formats (bencode, metainfo, bitfields, the peer-wire
//! codec, the tracker protocol) live in [`boottorrent_bt`], which the tracker shares; this
//! crate runs them. The `boottorrent-peer` binary (crate `peer/`) runs it as a process.
//! - `wire`: `boottorrent_bt`'s peer wire protocol plus the adaptor that frames a socket.
//! - [`storage`]: the one file of a torrent, piece verification and resume.
//! - [`announce`]: the HTTP tracker client.
//! - [`picker`]: which block to request from which peer.
//! - [`session`]: the running engine's API: listener, torrents, stats. Inside it, `torrent`
//!   holds one torrent's shared state (choker, super-seed offers, announcer), `peer` runs
//!   one connection, and `assembly` holds unfinished pieces' blocks in memory.

pub mod announce;
mod assembly;
mod peer;
pub mod picker;
mod rate;
pub mod session;
pub mod storage;
mod torrent;
mod wire;

// Imported at the root so that the engine's modules name them `crate::...`.
use boottorrent_bt::{BLOCK_LEN, Bitfield, Geometry, InfoHash, PeerId, metainfo};
