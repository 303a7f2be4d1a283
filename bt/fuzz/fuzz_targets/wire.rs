//! Feeds arbitrary bytes to everything that parses what a peer sends: the handshake decoder,
//! `Message::decode_frame` and `MessageCodec` as a connection would drive it. Any panic,
//! overflow or runaway allocation is a finding; an error is the expected outcome for most
//! inputs. Beyond not crashing, it checks the properties the engine relies on: whatever we
//! accept re-encodes to exactly the bytes it came from, passes our own encoder's limits, and
//! decodes the same however the stream is split into reads.

#![no_main]

use boottorrent_bt::wire::{HANDSHAKE_LEN, Handshake, Message, MessageCodec, WireError};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((handshake, _)) = data.split_first_chunk::<HANDSHAKE_LEN>()
        && let Ok(parsed) = Handshake::decode(handshake)
    {
        assert_eq!(
            &parsed.encode(),
            handshake,
            "accepted handshakes must be canonical"
        );
    }

    if let Ok(message) = Message::decode_frame(data) {
        let mut out = BytesMut::new();
        message.encode(&mut out);
        assert_eq!(&out[4..], data, "accepted frames must be canonical");
    }

    // The first byte picks where a second read begins, so one input also exercises frames
    // that straddle reads; the outcome must not depend on it.
    let whole = decode_stream(data, data.len());
    if let Some(&cut) = data.first() {
        let split = decode_stream(data, usize::from(cut).min(data.len()));
        assert_eq!(whole, split, "decoding depends on how the stream was read");
    }
});

/// Decodes `data` delivered in two reads, `cut` bytes then the rest, until the end of the
/// stream or the first error, as `FramedRead` would. Returns the messages and the error's
/// text.
fn decode_stream(data: &[u8], cut: usize) -> (Vec<Message>, Option<String>) {
    let mut codec = MessageCodec::new();
    let mut buf = BytesMut::new();
    let mut messages = Vec::new();
    let mut consumed = 0;
    let mut run = |buf: &mut BytesMut, eof: bool| -> Result<(), WireError> {
        loop {
            let next = if eof {
                codec.decode_eof(buf)?
            } else {
                codec.decode(buf)?
            };
            let Some(message) = next else {
                return Ok(());
            };
            let mut out = BytesMut::new();
            codec
                .encode(message.clone(), &mut out)
                .expect("we must be willing to send whatever we accept");
            assert_eq!(&out[..], &data[consumed..consumed + out.len()]);
            consumed += out.len();
            messages.push(message);
        }
    };
    buf.extend_from_slice(&data[..cut]);
    let result = run(&mut buf, false).and_then(|()| {
        buf.extend_from_slice(&data[cut..]);
        run(&mut buf, false)?;
        run(&mut buf, true)
    });
    (messages, result.err().map(|e| e.to_string()))
}
