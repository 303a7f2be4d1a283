//! The peer wire protocol of [`boottorrent_bt::wire`], and the adaptor that lets
//! `tokio_util`'s `FramedRead` and `FramedWrite` drive its codec over a connection.

pub use boottorrent_bt::wire::*;

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

/// [`boottorrent_bt::wire::MessageCodec`] as a `tokio_util` codec. A type of our own because
/// the traits and the codec both live in other crates; it shadows the pure codec's name so
/// the engine frames its sockets with `wire::MessageCodec` as before.
#[derive(Debug, Default, Clone)]
pub struct MessageCodec(boottorrent_bt::wire::MessageCodec);

impl MessageCodec {
    /// A codec with the wire module's limits.
    pub fn new() -> Self {
        MessageCodec(boottorrent_bt::wire::MessageCodec::new())
    }
}

impl Decoder for MessageCodec {
    type Item = Message;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, WireError> {
        self.0.decode(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Message>, WireError> {
        self.0.decode_eof(src)
    }
}

impl Encoder<Message> for MessageCodec {
    type Error = WireError;

    fn encode(&mut self, message: Message, dst: &mut BytesMut) -> Result<(), WireError> {
        self.0.encode(message, dst)
    }
}
