//! BootTorrent's BitTorrent peer engine: wire protocol, piece picking, super-seeding,
//! storage and tracker client, built for a cooperative fleet.
//!
//! Empty until "The swarm engine" issue fills it; it is a workspace member now so that the
//! crate layout of DESIGN.md holds from the first commit.
