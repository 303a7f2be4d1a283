//! The operator's command line: the arguments of every command, and the client commands that
//! talk to a running server's HTTP API.

pub mod args;
pub mod client;
pub mod deploy;
pub mod images;
pub mod machines;
pub mod status;
pub mod text;
pub mod torrent;
pub mod view;
