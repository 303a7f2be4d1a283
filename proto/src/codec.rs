//! Payload encoding: MessagePack with named fields by default, JSON on request.
//!
//! A reader tells the two apart by the first byte: every payload is a map, and a JSON
//! object starts with `{` (after optional whitespace) while a MessagePack map starts with a
//! map marker, and the two sets of bytes do not overlap.
//!
//! Decoding is hardened for input from anyone who can publish to the broker: input over
//! [`MAX_PAYLOAD_BYTES`] is refused before parsing, MessagePack is read from the slice so a
//! length header can never make the decoder allocate more than the input holds, nesting is
//! capped, and trailing bytes after the value are an error.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest payload [`decode`] accepts, and [`encode`] produces, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// How deep MessagePack arrays and maps may nest. Our messages need 6 levels at most
/// (envelope, body, list, item, IP address enum, its bytes); the cap only has to stop
/// hostile nesting from exhausting the stack.
const MAX_MSGPACK_DEPTH: usize = 32;

/// The wire encoding of a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Encoding {
    /// MessagePack with named fields: compact, and the default.
    #[default]
    MessagePack,
    /// JSON, for tools and people.
    Json,
}

/// Why a payload could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The payload is empty or only whitespace.
    #[error("payload is empty")]
    Empty,
    /// The first byte starts neither a JSON object nor a MessagePack map.
    #[error(
        "payload starts with byte 0x{first_byte:02x}, which begins neither a JSON object ('{{') \
         nor a MessagePack map"
    )]
    UnknownEncoding {
        /// The first byte (after whitespace, when the payload has some).
        first_byte: u8,
    },
    /// The payload is larger than [`MAX_PAYLOAD_BYTES`].
    #[error("payload is {len} bytes, over the {max}-byte limit")]
    TooLarge {
        /// The payload's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// MessagePack that does not decode to the expected message.
    #[error("invalid MessagePack payload: {0}")]
    MessagePack(String),
    /// JSON that does not decode to the expected message.
    #[error("invalid JSON payload: {0}")]
    Json(String),
    /// A value could not be encoded.
    #[error("could not encode payload: {0}")]
    Encode(String),
}

/// Tells which encoding `bytes` use, from their first byte.
///
/// `{` after optional JSON whitespace means JSON; a MessagePack map marker (fixmap
/// `0x80..=0x8f`, map16 `0xde`, map32 `0xdf`) as the very first byte means MessagePack.
/// Whitespace bytes are small integers in MessagePack, never a map, so skipping them
/// cannot hide a MessagePack payload.
pub fn detect(bytes: &[u8]) -> Result<Encoding, CodecError> {
    match bytes.first() {
        None => return Err(CodecError::Empty),
        Some(0x80..=0x8f | 0xde | 0xdf) => return Ok(Encoding::MessagePack),
        Some(_) => {}
    }
    match bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        None => Err(CodecError::Empty),
        Some(b'{') => Ok(Encoding::Json),
        Some(&first_byte) => Err(CodecError::UnknownEncoding { first_byte }),
    }
}

/// Encodes `value`; MessagePack uses named fields, so either encoding is self-describing.
///
/// A result over [`MAX_PAYLOAD_BYTES`] is an error: the receiver would refuse it, and the
/// sender is the one that can do something about it.
pub fn encode<T: Serialize>(value: &T, encoding: Encoding) -> Result<Vec<u8>, CodecError> {
    let bytes = match encoding {
        Encoding::MessagePack => {
            rmp_serde::to_vec_named(value).map_err(|e| CodecError::Encode(e.to_string()))?
        }
        Encoding::Json => {
            serde_json::to_vec(value).map_err(|e| CodecError::Encode(e.to_string()))?
        }
    };
    if bytes.len() > MAX_PAYLOAD_BYTES {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            max: MAX_PAYLOAD_BYTES,
        });
    }
    Ok(bytes)
}

/// Detects the encoding of `bytes` and decodes one `T` from them.
///
/// Refuses input over [`MAX_PAYLOAD_BYTES`] and any bytes after the value.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_PAYLOAD_BYTES {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            max: MAX_PAYLOAD_BYTES,
        });
    }
    match detect(bytes)? {
        Encoding::Json => {
            serde_json::from_slice(bytes).map_err(|e| CodecError::Json(e.to_string()))
        }
        Encoding::MessagePack => decode_msgpack(bytes),
    }
}

fn decode_msgpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    // Reading through `&mut &[u8]` advances the slice, which is how the trailing bytes are
    // found afterwards; every length header is checked against what the slice still holds
    // before anything is allocated for it.
    let mut rest = bytes;
    let mut de = rmp_serde::Deserializer::new(&mut rest);
    de.set_max_depth(MAX_MSGPACK_DEPTH);
    let value = T::deserialize(&mut de).map_err(|e| CodecError::MessagePack(e.to_string()))?;
    drop(de);
    if !rest.is_empty() {
        return Err(CodecError::MessagePack(format!(
            "{} trailing bytes after the value",
            rest.len()
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Bytes, Heartbeat, HeldImage, ImageState, Reboot};

    #[test]
    fn detects_json_after_whitespace() {
        assert_eq!(detect(b"{}"), Ok(Encoding::Json));
        assert_eq!(detect(b" \t\r\n{\"a\":1}"), Ok(Encoding::Json));
    }

    #[test]
    fn detects_messagepack_maps() {
        assert_eq!(detect(&[0x80]), Ok(Encoding::MessagePack));
        assert_eq!(detect(&[0x8f, 0]), Ok(Encoding::MessagePack));
        assert_eq!(detect(&[0xde, 0, 0]), Ok(Encoding::MessagePack));
        assert_eq!(detect(&[0xdf, 0, 0, 0, 0]), Ok(Encoding::MessagePack));
    }

    #[test]
    fn refuses_garbage_and_empty() {
        assert_eq!(detect(b""), Err(CodecError::Empty));
        assert_eq!(detect(b" \n "), Err(CodecError::Empty));
        assert_eq!(
            detect(b"[1]"),
            Err(CodecError::UnknownEncoding { first_byte: b'[' })
        );
        assert_eq!(
            detect(b"  x"),
            Err(CodecError::UnknownEncoding { first_byte: b'x' })
        );
        // A MessagePack array is not a message, and whitespace before a map marker is not
        // MessagePack.
        assert_eq!(
            detect(&[0x91, 0x80]),
            Err(CodecError::UnknownEncoding { first_byte: 0x91 })
        );
        assert_eq!(
            detect(&[b' ', 0x80]),
            Err(CodecError::UnknownEncoding { first_byte: 0x80 })
        );
        let msg = CodecError::UnknownEncoding { first_byte: 0x91 }.to_string();
        assert!(msg.contains("0x91"), "{msg}");
    }

    #[test]
    fn round_trips_in_both_encodings_with_named_fields() {
        let value = Reboot { delay_secs: 30 };
        let packed = encode(&value, Encoding::MessagePack).unwrap();
        // fixmap(1), fixstr "delay_secs", 30: named, not positional.
        assert_eq!(packed[0], 0x81);
        assert_eq!(&packed[2..12], b"delay_secs");
        assert_eq!(decode::<Reboot>(&packed), Ok(value.clone()));
        let json = encode(&value, Encoding::Json).unwrap();
        assert_eq!(json, br#"{"delay_secs":30}"#);
        assert_eq!(decode::<Reboot>(&json), Ok(value));
    }

    #[test]
    fn refuses_trailing_bytes() {
        let mut packed = encode(&Reboot { delay_secs: 1 }, Encoding::MessagePack).unwrap();
        packed.push(0xc0);
        assert!(
            matches!(decode::<Reboot>(&packed), Err(CodecError::MessagePack(m)) if m.contains("trailing"))
        );
        assert!(matches!(
            decode::<Reboot>(br#"{"delay_secs":1} x"#),
            Err(CodecError::Json(_))
        ));
        // Trailing JSON whitespace is fine.
        assert_eq!(
            decode::<Reboot>(b"{\"delay_secs\":1}\n"),
            Ok(Reboot { delay_secs: 1 })
        );
    }

    #[test]
    fn refuses_oversized_input() {
        let mut big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
        big[0] = b'{';
        assert_eq!(
            decode::<Reboot>(&big),
            Err(CodecError::TooLarge {
                len: MAX_PAYLOAD_BYTES + 1,
                max: MAX_PAYLOAD_BYTES
            })
        );
        let huge = Heartbeat {
            uptime_secs: 0,
            images: vec![
                HeldImage {
                    image: "i".parse().unwrap(),
                    info_hash: Bytes([0; 20]),
                    state: ImageState::Seeding,
                    bytes_done: 0,
                    bytes_total: 0,
                };
                2000
            ],
        };
        assert!(matches!(
            encode(&huge, Encoding::MessagePack),
            Err(CodecError::TooLarge { .. })
        ));
    }

    /// Builds `{"images": <header>}` MessagePack for a Heartbeat, where the header claims a
    /// 4 GiB item that is not there.
    fn heartbeat_with(header: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0x82];
        bytes.push(0xa0 | 11);
        bytes.extend_from_slice(b"uptime_secs");
        bytes.push(1);
        bytes.push(0xa0 | 6);
        bytes.extend_from_slice(b"images");
        bytes.extend_from_slice(header);
        bytes
    }

    #[test]
    fn hostile_length_headers_fail_without_allocating_them() {
        // array32, map32, str32 and bin32 headers each claiming 0xffff_ffff entries or bytes.
        for marker in [0xdd, 0xdf, 0xdb, 0xc6] {
            let bytes = heartbeat_with(&[marker, 0xff, 0xff, 0xff, 0xff]);
            assert!(
                matches!(decode::<Heartbeat>(&bytes), Err(CodecError::MessagePack(_))),
                "marker 0x{marker:02x}"
            );
        }
        // The same inside a map32 envelope claiming 4 Gi fields.
        assert!(decode::<Heartbeat>(&[0xdf, 0xff, 0xff, 0xff, 0xff]).is_err());
        // A byte string claimed too long for a fixed-size field.
        let mut bytes = vec![0x81, 0xa0 | 9];
        bytes.extend_from_slice(b"info_hash");
        bytes.extend_from_slice(&[0xc6, 0xff, 0xff, 0xff, 0xff]);
        assert!(decode::<HeldImage>(&bytes).is_err());
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let mut bytes = heartbeat_with(&[]);
        bytes.extend(std::iter::repeat_n(0x91, 60_000));
        assert!(decode::<Heartbeat>(&bytes).is_err());
        let mut json = b"{\"uptime_secs\":1,\"images\":".to_vec();
        json.extend(std::iter::repeat_n(b'[', 60_000));
        assert!(decode::<Heartbeat>(&json).is_err());
    }
}
