//! BootTorrent's BitTorrent tracker logic: bencode types, announce and scrape, the swarm
//! store, the peer handout policy and `.torrent` creation.
//!
//! Empty until the "Images and the tracker" issue fills it; it is a workspace member now so
//! that the crate layout of DESIGN.md holds from the first commit.
