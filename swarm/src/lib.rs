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
//! - `choker`: which peers may download from us: upload slots and the turns peers take.
//! - `superseed`: which piece to offer which peer when super-seeding (BEP 16).
//! - `control`: the types a host sets, asks for and is told (settings, the torrent to add,
//!   state and stats, errors); [`session`] re-exports them.
//! - `torrent`: one torrent's shared state and what changes it (peers, verified pieces,
//!   bans, the choker's and super-seeding's decisions), its resume check, stats and
//!   announcer; `assembly` holds its unfinished pieces' blocks in memory.
//! - `peer`: one connection, dialled or accepted, reading and changing its torrent's state.
//! - [`session`]: the running engine's API: the listener, each torrent's lifecycle task and
//!   dialling, handles, stats.
//!
//! Arrows run one way: session → peer → torrent → picker, choker, superseed, assembly,
//! storage; session, peer and torrent → control. The policies (picker, choker, superseed) are pure
//! functions over the torrent's state, unit-tested on their own.

pub mod announce;
mod assembly;
pub mod choker;
mod control;
pub mod mse;
mod peer;
pub mod picker;
mod rate;
pub mod session;
pub mod storage;
pub mod superseed;
mod torrent;
mod wire;

// Imported at the root so that the engine's modules name them `crate::...`.
use boottorrent_bt::{BLOCK_LEN, Bitfield, Geometry, InfoHash, PeerId, metainfo};
