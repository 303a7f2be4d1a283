//! Feeds arbitrary bytes to everything that parses input from the broker: the topic parser
//! and the envelope decoders for every kind. Any panic, overflow or runaway allocation is a
//! finding; returning an error is the expected outcome for most inputs.

#![no_main]

use boottorrent_proto::{CommandKind, EventKind, Topic, decode_command, decode_event};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte says how much of the input is the topic, so one input exercises a
    // topic and a payload independently.
    if let Some((&split, rest)) = data.split_first() {
        let (topic, payload) = rest.split_at(usize::from(split).min(rest.len()));
        if let Ok(topic) = std::str::from_utf8(topic)
            && let Ok(parsed) = topic.parse::<Topic>()
        {
            assert_eq!(
                parsed.to_string(),
                topic,
                "accepted topics must be canonical"
            );
        }
        decode_all(payload);
    }
    decode_all(data);
});

fn decode_all(payload: &[u8]) {
    for &kind in EventKind::ALL {
        let _ = decode_event(kind, payload);
    }
    for &kind in CommandKind::ALL {
        let _ = decode_command(kind, payload);
    }
}
