//! The peer wire protocol: the 68-byte handshake and the length-prefixed messages after it
//! (BEP 3), with the Fast extension's messages (BEP 6) and BEP 10 extended messages carried
//! opaquely.
//!
//! Pure encode/decode on byte buffers: [`MessageCodec`] frames a stream held in a `BytesMut`,
//! and the engine's adaptor hands it the bytes its sockets read. Every size rule that can be checked from bytes alone is checked here, and
//! as early as possible: a frame's length is judged from its 4-byte prefix and its id before any
//! of its body is buffered, so a hostile peer cannot make us allocate for a body it never sends.
//! Rules that need the torrent (piece index in range, bitfield length, block bounds) and rules
//! that need the handshake (Fast messages only after both sides set the Fast bit) belong to the
//! engine.

use std::ops::Range;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{InfoHash, PeerId};

/// Length of the handshake: pstrlen, the 19-byte protocol string, 8 reserved bytes, the info
/// hash and the peer id.
pub const HANDSHAKE_LEN: usize = 68;

/// Largest request length we accept or serve, and so the largest piece message data. Standard
/// clients request 16 KiB ([`crate::BLOCK_LEN`]); allowing twice that leaves room for peers
/// tuned for fast LANs without letting one message grow without bound.
pub const MAX_BLOCK_LEN: u32 = 32 * 1024;

/// Largest bitfield message payload in bytes: one bit per piece, so 8M pieces. Far beyond any
/// real torrent, yet it keeps a single frame at about 1 MiB.
pub const MAX_BITFIELD_LEN: usize = 1 << 20;

/// Largest message body we accept: a piece message carrying [`MAX_BLOCK_LEN`] plus its 9-byte
/// header, or a bitfield up to [`MAX_BITFIELD_LEN`]; anything longer is a protocol violation.
/// The body is what follows the 4-byte length prefix, id byte included.
pub const MAX_FRAME_LEN: usize = {
    let piece = PIECE_HEADER_LEN + MAX_BLOCK_LEN as usize;
    let bitfield = 1 + MAX_BITFIELD_LEN;
    if piece > bitfield { piece } else { bitfield }
};

/// Bytes of a piece message before its data: id, piece index, offset.
const PIECE_HEADER_LEN: usize = 9;

/// Largest body of any message but a bitfield. Extended messages share the piece limit: the
/// biggest one in common use (a `ut_metadata` data message) carries a 16 KiB block plus a small
/// dictionary.
const MAX_MESSAGE_LEN: usize = PIECE_HEADER_LEN + MAX_BLOCK_LEN as usize;

const PROTOCOL: &[u8; 19] = b"BitTorrent protocol";

/// BEP 6 puts the Fast extension bit in the last reserved byte.
const FAST_BYTE: usize = 7;
const FAST_BIT: u8 = 0x04;

const CHOKE: u8 = 0;
const UNCHOKE: u8 = 1;
const INTERESTED: u8 = 2;
const NOT_INTERESTED: u8 = 3;
const HAVE: u8 = 4;
const BITFIELD: u8 = 5;
const REQUEST: u8 = 6;
const PIECE: u8 = 7;
const CANCEL: u8 = 8;
const PORT: u8 = 9;
const SUGGEST_PIECE: u8 = 0x0d;
const HAVE_ALL: u8 = 0x0e;
const HAVE_NONE: u8 = 0x0f;
const REJECT_REQUEST: u8 = 0x10;
const ALLOWED_FAST: u8 = 0x11;
const EXTENDED: u8 = 20;

/// A peer sent (or we were about to send) bytes that break the wire protocol. Every variant is
/// reason to drop the connection.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The length prefix alone is beyond anything we accept, whatever the message.
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLong {
        /// The length the prefix announced.
        len: u32,
        /// [`MAX_FRAME_LEN`].
        max: usize,
    },
    /// A variable-size message is longer than its kind allows.
    #[error("{kind} message of {len} bytes exceeds the {max}-byte limit")]
    MessageTooLong {
        /// The message kind, as BEP 3 or BEP 6 names it.
        kind: &'static str,
        /// The body length, id byte included.
        len: usize,
        /// The most we accept for this kind.
        max: usize,
    },
    /// A fixed-size message has any other size.
    #[error("{kind} message of {len} bytes; want {want}")]
    WrongLength {
        /// The message kind.
        kind: &'static str,
        /// The body length, id byte included.
        len: usize,
        /// The only valid body length for this kind.
        want: usize,
    },
    /// A variable-size message is too short to hold its header.
    #[error("{kind} message of {len} bytes; want at least {min}")]
    TooShort {
        /// The message kind.
        kind: &'static str,
        /// The body length, id byte included.
        len: usize,
        /// The shortest valid body for this kind.
        min: usize,
    },
    /// A piece message with a header and no block: it cannot answer any request the engine
    /// accepts or sends, since those are at least one byte long.
    #[error("piece message for piece {piece} at offset {offset} carries no data")]
    EmptyPiece {
        /// The piece index it named.
        piece: u32,
        /// The offset it named.
        offset: u32,
    },
    /// An id that neither BEP 3, BEP 5's port, BEP 6 nor BEP 10 defines. Our peers are
    /// standard clients, so this means a broken or hostile one.
    #[error("unknown message id {0}")]
    UnknownId(u8),
    /// The handshake's first byte is not 19, the length of "BitTorrent protocol".
    #[error("handshake protocol string length is {0}; want 19")]
    BadProtocolLength(u8),
    /// The handshake names another protocol.
    #[error("bad protocol string in handshake: {0:?}")]
    BadProtocol(String),
    /// The stream ended in the middle of a message.
    #[error("connection closed mid-message: {have} of {want} bytes received")]
    Truncated {
        /// Bytes of the frame that did arrive, prefix included.
        have: usize,
        /// Bytes the frame should have had, prefix included (only the prefix, 4, when the
        /// prefix itself was cut).
        want: usize,
    },
    /// Reading or writing the connection failed. Nothing here does I/O; the engine's framing
    /// adaptor reports its socket errors as this, as `tokio_util`'s codecs must.
    #[error("error reading or writing peer messages: {0}")]
    Io(#[from] std::io::Error),
}

/// The first 68 bytes each side sends: which torrent, which peer, which extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handshake {
    /// Extension bits. We only read and set the Fast bit; the rest are kept as received.
    pub reserved: [u8; 8],
    /// The torrent the connection is about.
    pub info_hash: InfoHash,
    /// The sender's id.
    pub peer_id: PeerId,
}

impl Handshake {
    /// Our handshake. It advertises the Fast extension because the engine relies on
    /// `have_all`/`have_none` and `reject_request` to get a fleet going quickly.
    pub fn new(info_hash: InfoHash, peer_id: PeerId) -> Handshake {
        let mut reserved = [0u8; 8];
        reserved[FAST_BYTE] |= FAST_BIT;
        Handshake {
            reserved,
            info_hash,
            peer_id,
        }
    }

    /// Whether this side speaks BEP 6. Fast messages are only legal when both sides' handshakes
    /// say so.
    pub fn supports_fast(&self) -> bool {
        self.reserved[FAST_BYTE] & FAST_BIT != 0
    }

    /// The wire form.
    pub fn encode(&self) -> [u8; HANDSHAKE_LEN] {
        let mut out = [0u8; HANDSHAKE_LEN];
        out[0] = PROTOCOL.len() as u8;
        out[1..20].copy_from_slice(PROTOCOL);
        out[20..28].copy_from_slice(&self.reserved);
        out[28..48].copy_from_slice(&self.info_hash.0);
        out[48..68].copy_from_slice(&self.peer_id.0);
        out
    }

    /// Parses a received handshake. Only the protocol is checked: whether the info hash is one
    /// we serve, or the peer id is our own, is the engine's call.
    pub fn decode(bytes: &[u8; HANDSHAKE_LEN]) -> Result<Handshake, WireError> {
        if usize::from(bytes[0]) != PROTOCOL.len() {
            return Err(WireError::BadProtocolLength(bytes[0]));
        }
        let protocol = &bytes[1..20];
        if protocol != PROTOCOL {
            return Err(WireError::BadProtocol(
                String::from_utf8_lossy(protocol).into_owned(),
            ));
        }
        let mut handshake = Handshake {
            reserved: [0; 8],
            info_hash: InfoHash([0; 20]),
            peer_id: PeerId([0; 20]),
        };
        handshake.reserved.copy_from_slice(&bytes[20..28]);
        handshake.info_hash.0.copy_from_slice(&bytes[28..48]);
        handshake.peer_id.0.copy_from_slice(&bytes[48..68]);
        Ok(handshake)
    }
}

/// A block of a piece: what `request`, `cancel` and `reject_request` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockRef {
    /// Piece index.
    pub piece: u32,
    /// Byte offset inside the piece.
    pub offset: u32,
    /// Length in bytes.
    pub len: u32,
}

/// One message after the handshake.
///
/// `Debug` shows the length of a payload rather than its bytes, so that tracing a piece message
/// logs one line, not 16 KiB.
#[derive(Clone, PartialEq, Eq)]
pub enum Message {
    /// A zero-length frame, sent to keep idle connections open.
    KeepAlive,
    /// The sender will not answer our requests.
    Choke,
    /// The sender will answer our requests.
    Unchoke,
    /// The sender wants pieces we have.
    Interested,
    /// The sender wants nothing we have.
    NotInterested,
    /// The sender has finished and verified this piece.
    Have(u32),
    /// Which pieces the sender has, one bit per piece, high bit first; only as its first
    /// message. The length is checked against the torrent by [`crate::Bitfield::from_bytes`].
    Bitfield(Bytes),
    /// Asks for a block.
    Request(BlockRef),
    /// A block of data answering a request.
    Piece {
        /// Piece index.
        piece: u32,
        /// Byte offset inside the piece.
        offset: u32,
        /// The block, 1 to [`MAX_BLOCK_LEN`] bytes.
        data: Bytes,
    },
    /// Withdraws an earlier request.
    Cancel(BlockRef),
    /// The sender's DHT port (BEP 5). We run no DHT but must tolerate it.
    Port(u16),
    /// BEP 6: the sender recommends downloading this piece from it.
    SuggestPiece(u32),
    /// BEP 6: the sender has every piece; replaces a full bitfield.
    HaveAll,
    /// BEP 6: the sender has no piece; replaces an empty bitfield.
    HaveNone,
    /// BEP 6: the sender will not serve this request, so we can ask someone else at once.
    Reject(BlockRef),
    /// BEP 6: the sender will serve this piece even while choking us.
    AllowedFast(u32),
    /// BEP 10 extended message, carried but not interpreted: we ignore them, but standard
    /// clients send them and must not be dropped for it.
    Extended {
        /// The extended message id (0 is the extension handshake).
        id: u8,
        /// The rest of the body, usually bencoded.
        payload: Bytes,
    },
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::KeepAlive => f.write_str("KeepAlive"),
            Message::Choke => f.write_str("Choke"),
            Message::Unchoke => f.write_str("Unchoke"),
            Message::Interested => f.write_str("Interested"),
            Message::NotInterested => f.write_str("NotInterested"),
            Message::Have(piece) => write!(f, "Have({piece})"),
            Message::Bitfield(bits) => write!(f, "Bitfield(<{} bytes>)", bits.len()),
            Message::Request(block) => write!(f, "Request({block:?})"),
            Message::Piece {
                piece,
                offset,
                data,
            } => write!(
                f,
                "Piece {{ piece: {piece}, offset: {offset}, data: <{} bytes> }}",
                data.len()
            ),
            Message::Cancel(block) => write!(f, "Cancel({block:?})"),
            Message::Port(port) => write!(f, "Port({port})"),
            Message::SuggestPiece(piece) => write!(f, "SuggestPiece({piece})"),
            Message::HaveAll => f.write_str("HaveAll"),
            Message::HaveNone => f.write_str("HaveNone"),
            Message::Reject(block) => write!(f, "Reject({block:?})"),
            Message::AllowedFast(piece) => write!(f, "AllowedFast({piece})"),
            Message::Extended { id, payload } => {
                write!(
                    f,
                    "Extended {{ id: {id}, payload: <{} bytes> }}",
                    payload.len()
                )
            }
        }
    }
}

impl Message {
    /// Appends the frame, length prefix included. [`MessageCodec::encode`] also checks the
    /// message against our own limits; this does not, so that tests can build frames a peer
    /// must reject.
    ///
    /// # Panics
    ///
    /// If the body is longer than the 4 GiB a length prefix can express.
    pub fn encode(&self, dst: &mut BytesMut) {
        let body_len = self.body_len();
        let prefix = u32::try_from(body_len).expect("message body longer than 4 GiB");
        dst.reserve(4 + body_len);
        dst.put_u32(prefix);
        let Some(id) = self.id() else {
            return;
        };
        dst.put_u8(id);
        match self {
            Message::KeepAlive
            | Message::Choke
            | Message::Unchoke
            | Message::Interested
            | Message::NotInterested
            | Message::HaveAll
            | Message::HaveNone => {}
            Message::Have(piece) | Message::SuggestPiece(piece) | Message::AllowedFast(piece) => {
                dst.put_u32(*piece)
            }
            Message::Bitfield(bits) => dst.put_slice(bits),
            Message::Request(block) | Message::Cancel(block) | Message::Reject(block) => {
                dst.put_u32(block.piece);
                dst.put_u32(block.offset);
                dst.put_u32(block.len);
            }
            Message::Piece {
                piece,
                offset,
                data,
            } => {
                dst.put_u32(*piece);
                dst.put_u32(*offset);
                dst.put_slice(data);
            }
            Message::Port(port) => dst.put_u16(*port),
            Message::Extended { id, payload } => {
                dst.put_u8(*id);
                dst.put_slice(payload);
            }
        }
    }

    /// Parses one frame's body, the bytes after its 4-byte length prefix. An empty frame is a
    /// keep-alive. Payloads are copied out of `frame`; [`MessageCodec`] avoids that copy.
    pub fn decode_frame(frame: &[u8]) -> Result<Message, WireError> {
        decode_body(frame, |range| Bytes::copy_from_slice(&frame[range]))
    }

    /// The block a request, cancel or reject names, or the block a piece message carries.
    pub fn block(&self) -> Option<BlockRef> {
        match self {
            Message::Request(block) | Message::Cancel(block) | Message::Reject(block) => {
                Some(*block)
            }
            Message::Piece {
                piece,
                offset,
                data,
            } => Some(BlockRef {
                piece: *piece,
                offset: *offset,
                // Saturating only matters for data no decoder would have accepted.
                len: u32::try_from(data.len()).unwrap_or(u32::MAX),
            }),
            _ => None,
        }
    }

    /// The id byte; `None` for a keep-alive, which has no body at all.
    fn id(&self) -> Option<u8> {
        Some(match self {
            Message::KeepAlive => return None,
            Message::Choke => CHOKE,
            Message::Unchoke => UNCHOKE,
            Message::Interested => INTERESTED,
            Message::NotInterested => NOT_INTERESTED,
            Message::Have(_) => HAVE,
            Message::Bitfield(_) => BITFIELD,
            Message::Request(_) => REQUEST,
            Message::Piece { .. } => PIECE,
            Message::Cancel(_) => CANCEL,
            Message::Port(_) => PORT,
            Message::SuggestPiece(_) => SUGGEST_PIECE,
            Message::HaveAll => HAVE_ALL,
            Message::HaveNone => HAVE_NONE,
            Message::Reject(_) => REJECT_REQUEST,
            Message::AllowedFast(_) => ALLOWED_FAST,
            Message::Extended { .. } => EXTENDED,
        })
    }

    /// Length of the body: what the prefix will say.
    fn body_len(&self) -> usize {
        match self {
            Message::KeepAlive => 0,
            Message::Bitfield(bits) => 1 + bits.len(),
            Message::Piece { data, .. } => PIECE_HEADER_LEN + data.len(),
            Message::Extended { payload, .. } => 2 + payload.len(),
            // Fixed-size kinds: the table the decoder checks against is the one truth.
            other => other.id().and_then(limits).map_or(1, |limits| limits.min),
        }
    }

    /// Whether a peer using our limits would accept this message: we should never send what we
    /// would drop a peer for.
    fn check_sendable(&self) -> Result<(), WireError> {
        let Some(id) = self.id() else {
            return Ok(());
        };
        check_len(id, self.body_len())?;
        match self {
            Message::Piece {
                piece,
                offset,
                data,
            } if data.is_empty() => Err(WireError::EmptyPiece {
                piece: *piece,
                offset: *offset,
            }),
            _ => Ok(()),
        }
    }
}

/// The size rule of one message kind, body lengths with the id byte.
struct Limits {
    kind: &'static str,
    min: usize,
    max: usize,
}

/// Size rule by id; `None` for ids we do not know.
fn limits(id: u8) -> Option<Limits> {
    let (kind, min, max) = match id {
        CHOKE => ("choke", 1, 1),
        UNCHOKE => ("unchoke", 1, 1),
        INTERESTED => ("interested", 1, 1),
        NOT_INTERESTED => ("not interested", 1, 1),
        HAVE => ("have", 5, 5),
        // An empty bitfield fits no torrent, but that is the engine's check to make.
        BITFIELD => ("bitfield", 1, 1 + MAX_BITFIELD_LEN),
        REQUEST => ("request", 13, 13),
        PIECE => ("piece", PIECE_HEADER_LEN, MAX_MESSAGE_LEN),
        CANCEL => ("cancel", 13, 13),
        PORT => ("port", 3, 3),
        SUGGEST_PIECE => ("suggest piece", 5, 5),
        HAVE_ALL => ("have all", 1, 1),
        HAVE_NONE => ("have none", 1, 1),
        REJECT_REQUEST => ("reject request", 13, 13),
        ALLOWED_FAST => ("allowed fast", 5, 5),
        EXTENDED => ("extended", 2, MAX_MESSAGE_LEN),
        _ => return None,
    };
    Some(Limits { kind, min, max })
}

/// Checks a body length against its id's rule. Needs only the id, so the codec can run it
/// before buffering the body.
fn check_len(id: u8, len: usize) -> Result<(), WireError> {
    let Limits { kind, min, max } = limits(id).ok_or(WireError::UnknownId(id))?;
    if min == max && len != min {
        Err(WireError::WrongLength {
            kind,
            len,
            want: min,
        })
    } else if len < min {
        Err(WireError::TooShort { kind, len, min })
    } else if len > max {
        Err(WireError::MessageTooLong { kind, len, max })
    } else {
        Ok(())
    }
}

/// Parses a frame body. `payload` turns a range of `frame` into `Bytes`, so that the codec can
/// share its buffer while [`Message::decode_frame`] copies.
fn decode_body(
    frame: &[u8],
    payload: impl FnOnce(Range<usize>) -> Bytes,
) -> Result<Message, WireError> {
    let Some(&id) = frame.first() else {
        return Ok(Message::KeepAlive);
    };
    check_len(id, frame.len())?;
    // check_len has vouched for every fixed field's bytes, so indexing cannot go out of bounds.
    let u32_at =
        |at: usize| u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]]);
    let block = || BlockRef {
        piece: u32_at(1),
        offset: u32_at(5),
        len: u32_at(9),
    };
    Ok(match id {
        CHOKE => Message::Choke,
        UNCHOKE => Message::Unchoke,
        INTERESTED => Message::Interested,
        NOT_INTERESTED => Message::NotInterested,
        HAVE => Message::Have(u32_at(1)),
        BITFIELD => Message::Bitfield(payload(1..frame.len())),
        REQUEST => Message::Request(block()),
        PIECE => {
            let (piece, offset) = (u32_at(1), u32_at(5));
            if frame.len() == PIECE_HEADER_LEN {
                return Err(WireError::EmptyPiece { piece, offset });
            }
            Message::Piece {
                piece,
                offset,
                data: payload(PIECE_HEADER_LEN..frame.len()),
            }
        }
        CANCEL => Message::Cancel(block()),
        PORT => Message::Port(u16::from_be_bytes([frame[1], frame[2]])),
        SUGGEST_PIECE => Message::SuggestPiece(u32_at(1)),
        HAVE_ALL => Message::HaveAll,
        HAVE_NONE => Message::HaveNone,
        REJECT_REQUEST => Message::Reject(block()),
        ALLOWED_FAST => Message::AllowedFast(u32_at(1)),
        EXTENDED => Message::Extended {
            id: frame[1],
            payload: payload(2..frame.len()),
        },
        other => return Err(WireError::UnknownId(other)),
    })
}

/// Codec for the length-prefixed messages that follow the handshake, with the limits above,
/// shaped like a `tokio_util` codec so the engine's adaptor only forwards to it. Decoded
/// payloads share the read buffer rather than being copied. Read the handshake with an exact
/// 68-byte read before framing the stream: a peer may send its first messages in the same
/// packet, and a buffered handshake read would swallow them.
#[derive(Debug, Default, Clone)]
pub struct MessageCodec {
    // Private so that limits can become settings later without breaking callers.
    _private: (),
}

impl MessageCodec {
    /// A codec with the module's limits.
    pub fn new() -> Self {
        MessageCodec { _private: () }
    }

    /// Takes the next whole message off the front of `src`; `None` until one has arrived. A
    /// frame's length is judged from its prefix and id before room is made for its body.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, WireError> {
        let Some(&[a, b, c, d]) = src.get(..4) else {
            return Ok(None);
        };
        let prefix = u32::from_be_bytes([a, b, c, d]);
        // Judge the prefix before anything else: a hostile length must cost us nothing.
        let len = usize::try_from(prefix).unwrap_or(usize::MAX);
        if len > MAX_FRAME_LEN {
            return Err(WireError::FrameTooLong {
                len: prefix,
                max: MAX_FRAME_LEN,
            });
        }
        if len == 0 {
            src.advance(4);
            return Ok(Some(Message::KeepAlive));
        }
        // The id tells the real limit (a have is 5 bytes, not 1 MiB), so wait for it before
        // making room for the body.
        let Some(&id) = src.get(4) else {
            return Ok(None);
        };
        check_len(id, len)?;
        let total = 4 + len;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(total).freeze();
        frame.advance(4);
        decode_body(&frame, |range| frame.slice(range)).map(Some)
    }

    /// [`decode`](Self::decode) once the stream has ended: bytes left over are a message cut
    /// short.
    pub fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Message>, WireError> {
        if let Some(message) = self.decode(src)? {
            return Ok(Some(message));
        }
        if src.is_empty() {
            return Ok(None);
        }
        let want = match src.get(..4) {
            Some(&[a, b, c, d]) => 4 + u32::from_be_bytes([a, b, c, d]) as usize,
            _ => 4,
        };
        Err(WireError::Truncated {
            have: src.len(),
            want,
        })
    }

    /// Appends `message`'s frame, refusing what a peer with our limits would drop us for.
    pub fn encode(&mut self, message: Message, dst: &mut BytesMut) -> Result<(), WireError> {
        message.check_sendable()?;
        message.encode(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Hex with spaces allowed, so fixtures can show the fields.
    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        hex::decode(s).expect("fixture is valid hex")
    }

    fn block(piece: u32, offset: u32, len: u32) -> BlockRef {
        BlockRef { piece, offset, len }
    }

    /// Every message kind as BEP 3 and BEP 6 lay it out: length prefix, id, fields.
    fn fixtures() -> Vec<(&'static str, Message)> {
        vec![
            ("00000000", Message::KeepAlive),
            ("00000001 00", Message::Choke),
            ("00000001 01", Message::Unchoke),
            ("00000001 02", Message::Interested),
            ("00000001 03", Message::NotInterested),
            ("00000005 04 00000007", Message::Have(7)),
            (
                "00000003 05 ffc0",
                Message::Bitfield(Bytes::from_static(&[0xff, 0xc0])),
            ),
            (
                "0000000d 06 00000001 00004000 00004000",
                Message::Request(block(1, 0x4000, 0x4000)),
            ),
            (
                "0000000d 07 00000001 00004000 deadbeef",
                Message::Piece {
                    piece: 1,
                    offset: 0x4000,
                    data: Bytes::from_static(&[0xde, 0xad, 0xbe, 0xef]),
                },
            ),
            (
                "0000000d 08 00000001 00004000 00004000",
                Message::Cancel(block(1, 0x4000, 0x4000)),
            ),
            ("00000003 09 1ae1", Message::Port(6881)),
            ("00000005 0d 0000002a", Message::SuggestPiece(42)),
            ("00000001 0e", Message::HaveAll),
            ("00000001 0f", Message::HaveNone),
            (
                "0000000d 10 00000002 00000000 00004000",
                Message::Reject(block(2, 0, 0x4000)),
            ),
            ("00000005 11 0000002a", Message::AllowedFast(42)),
            (
                // BEP 10 extension handshake with an empty dictionary, "de".
                "00000004 14 00 6465",
                Message::Extended {
                    id: 0,
                    payload: Bytes::from_static(b"de"),
                },
            ),
        ]
    }

    /// Decodes everything `buf` holds, leaving a partial frame behind.
    fn decode_available(
        codec: &mut MessageCodec,
        buf: &mut BytesMut,
    ) -> Result<Vec<Message>, WireError> {
        let mut out = Vec::new();
        while let Some(message) = codec.decode(buf)? {
            out.push(message);
        }
        Ok(out)
    }

    fn codec_decode(bytes: &[u8]) -> Result<Option<Message>, WireError> {
        MessageCodec::new().decode(&mut BytesMut::from(bytes))
    }

    fn frame_error(hex: &str) -> WireError {
        let bytes = unhex(hex);
        let err = codec_decode(&bytes).expect_err("codec must reject the frame");
        // Both entry points share one set of rules, so they must agree.
        let direct = Message::decode_frame(&bytes[4..]).expect_err("decode_frame must reject");
        assert_eq!(err.to_string(), direct.to_string());
        err
    }

    #[test]
    fn fixtures_decode_and_encode() {
        for (hex, message) in fixtures() {
            let bytes = unhex(hex);
            assert_eq!(
                codec_decode(&bytes).unwrap(),
                Some(message.clone()),
                "{hex}"
            );
            assert_eq!(
                Message::decode_frame(&bytes[4..]).unwrap(),
                message,
                "{hex}"
            );
            let mut out = BytesMut::new();
            MessageCodec::new()
                .encode(message.clone(), &mut out)
                .unwrap();
            assert_eq!(&out[..], &bytes[..], "{message:?}");
        }
    }

    #[test]
    fn handshake_fixture() {
        let bytes = unhex(
            "13 426974546f7272656e742070726f746f636f6c
             0000000000000004
             000102030405060708090a0b0c0d0e0f10111213
             2d4254303130302d 6162636465666768696a6b6c",
        );
        let bytes: [u8; HANDSHAKE_LEN] = bytes.try_into().unwrap();
        let mut info_hash = [0u8; 20];
        for (i, b) in info_hash.iter_mut().enumerate() {
            *b = i as u8;
        }
        let ours = Handshake::new(InfoHash(info_hash), PeerId(*b"-BT0100-abcdefghijkl"));
        assert!(ours.supports_fast());
        assert_eq!(ours.encode(), bytes);
        assert_eq!(Handshake::decode(&bytes).unwrap(), ours);
    }

    #[test]
    fn handshake_keeps_other_reserved_bits() {
        let mut theirs = Handshake::new(InfoHash([7; 20]), PeerId([9; 20]));
        // A libtorrent-style peer: BEP 10 and DHT bits, no Fast.
        theirs.reserved = [0, 0, 0, 0, 0, 0x10, 0, 0x01];
        let decoded = Handshake::decode(&theirs.encode()).unwrap();
        assert_eq!(decoded, theirs);
        assert!(!decoded.supports_fast());
    }

    #[test]
    fn bad_handshakes() {
        let good = Handshake::new(InfoHash([1; 20]), PeerId([2; 20])).encode();

        let mut bad_len = good;
        bad_len[0] = 20;
        let err = Handshake::decode(&bad_len).unwrap_err();
        assert!(matches!(err, WireError::BadProtocolLength(20)), "{err}");
        assert_eq!(
            err.to_string(),
            "handshake protocol string length is 20; want 19"
        );

        let mut bad_name = good;
        bad_name[1..20].copy_from_slice(b"BitTorrent Protocol");
        let err = Handshake::decode(&bad_name).unwrap_err();
        assert!(matches!(err, WireError::BadProtocol(_)), "{err}");
        assert_eq!(
            err.to_string(),
            "bad protocol string in handshake: \"BitTorrent Protocol\""
        );

        // Something that is not BitTorrent at all, such as an HTTP client on the wrong port.
        let mut http = [0u8; HANDSHAKE_LEN];
        http[..19].copy_from_slice(b"GET / HTTP/1.1\r\nHos");
        assert!(matches!(
            Handshake::decode(&http),
            Err(WireError::BadProtocolLength(b'G'))
        ));
    }

    #[test]
    fn fixed_messages_must_have_their_exact_size() {
        // (id, exact body length) for every fixed-size kind.
        let fixed = [
            (CHOKE, 1),
            (UNCHOKE, 1),
            (INTERESTED, 1),
            (NOT_INTERESTED, 1),
            (HAVE, 5),
            (REQUEST, 13),
            (CANCEL, 13),
            (PORT, 3),
            (SUGGEST_PIECE, 5),
            (HAVE_ALL, 1),
            (HAVE_NONE, 1),
            (REJECT_REQUEST, 13),
            (ALLOWED_FAST, 5),
        ];
        for (id, want) in fixed {
            for len in [want - 1, want + 1, want + 7] {
                if len == 0 {
                    continue;
                }
                let mut bytes = (len as u32).to_be_bytes().to_vec();
                bytes.push(id);
                bytes.resize(4 + len, 0);
                let err = frame_error(&hex::encode(&bytes));
                match err {
                    WireError::WrongLength {
                        len: got, want: w, ..
                    } => assert_eq!((got, w), (len, want), "id {id}"),
                    other => panic!("id {id} len {len}: {other}"),
                }
            }
        }
        assert_eq!(
            frame_error("00000007 04 00000007 0000").to_string(),
            "have message of 7 bytes; want 5"
        );
        assert_eq!(
            frame_error("00000002 0e 00").to_string(),
            "have all message of 2 bytes; want 1"
        );
    }

    #[test]
    fn variable_messages_have_bounds() {
        let err = frame_error("00000008 07 00000001 000000");
        assert_eq!(err.to_string(), "piece message of 8 bytes; want at least 9");

        let err = frame_error("00000009 07 00000001 00004000");
        assert!(
            matches!(
                err,
                WireError::EmptyPiece {
                    piece: 1,
                    offset: 0x4000
                }
            ),
            "{err}"
        );

        let err = frame_error("00000001 14");
        assert_eq!(
            err.to_string(),
            "extended message of 1 bytes; want at least 2"
        );

        // The largest piece is accepted, one byte more is not.
        let mut frame = vec![PIECE];
        frame.resize(PIECE_HEADER_LEN + MAX_BLOCK_LEN as usize, 0xaa);
        let Message::Piece { data, .. } = Message::decode_frame(&frame).unwrap() else {
            panic!("not a piece");
        };
        assert_eq!(data.len(), MAX_BLOCK_LEN as usize);
        frame.push(0xaa);
        let err = Message::decode_frame(&frame).unwrap_err();
        assert_eq!(
            err.to_string(),
            "piece message of 32778 bytes exceeds the 32777-byte limit"
        );

        // Likewise the largest bitfield.
        let mut frame = vec![BITFIELD];
        frame.resize(1 + MAX_BITFIELD_LEN, 0xff);
        assert!(Message::decode_frame(&frame).is_ok());
        frame.push(0xff);
        assert!(matches!(
            Message::decode_frame(&frame),
            Err(WireError::MessageTooLong {
                kind: "bitfield",
                ..
            })
        ));
    }

    #[test]
    fn unknown_ids_are_rejected() {
        for id in [10u8, 11, 12, 18, 19, 21, 99, 255] {
            let err = frame_error(&format!("00000001 {id:02x}"));
            assert!(
                matches!(err, WireError::UnknownId(got) if got == id),
                "{err}"
            );
        }
        assert_eq!(
            frame_error("00000001 63").to_string(),
            "unknown message id 99"
        );
    }

    #[test]
    fn hostile_lengths_are_rejected_before_the_body_arrives() {
        let mut codec = MessageCodec::new();

        // The prefix alone is enough to reject 5 MB.
        let mut buf = BytesMut::from(&unhex("004c4b40")[..]);
        let err = codec.decode(&mut buf).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("message of 5000000 bytes exceeds the {MAX_FRAME_LEN}-byte limit")
        );
        let mut buf = BytesMut::from(&unhex("ffffffff")[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(WireError::FrameTooLong { len: u32::MAX, .. })
        ));

        // A length a bitfield could have: wait for the id, but make no room yet.
        let mut buf = BytesMut::with_capacity(16);
        buf.extend_from_slice(&unhex("00100001"));
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() < 1024, "reserved {}", buf.capacity());

        // With the id, a piece or a have of that length fails at once.
        let mut buf = BytesMut::from(&unhex("00100001 07")[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(WireError::MessageTooLong { kind: "piece", .. })
        ));
        let mut buf = BytesMut::from(&unhex("000f4240 04")[..]);
        assert_eq!(
            codec.decode(&mut buf).unwrap_err().to_string(),
            "have message of 1000000 bytes; want 5"
        );
        let mut buf = BytesMut::from(&unhex("00100001 63")[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(WireError::UnknownId(99))
        ));
    }

    #[test]
    fn codec_decodes_a_stream_split_at_every_byte() {
        let (hexes, expected): (Vec<_>, Vec<_>) = fixtures().into_iter().unzip();
        let stream: Vec<u8> = hexes.iter().flat_map(|h| unhex(h)).collect();

        for split in 0..=stream.len() {
            let mut codec = MessageCodec::new();
            let mut buf = BytesMut::from(&stream[..split]);
            let mut got = decode_available(&mut codec, &mut buf).unwrap();
            buf.extend_from_slice(&stream[split..]);
            got.extend(decode_available(&mut codec, &mut buf).unwrap());
            assert_eq!(got, expected, "split at {split}");
            assert!(buf.is_empty());
            assert!(codec.decode_eof(&mut buf).unwrap().is_none());
        }

        // And one byte at a time, as a slow peer might deliver it.
        let mut codec = MessageCodec::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &byte in &stream {
            buf.put_u8(byte);
            got.extend(decode_available(&mut codec, &mut buf).unwrap());
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn eof_mid_message_is_an_error() {
        let mut codec = MessageCodec::new();
        let mut buf = BytesMut::from(&unhex("00000005 04 0000")[..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert_eq!(
            codec.decode_eof(&mut buf).unwrap_err().to_string(),
            "connection closed mid-message: 7 of 9 bytes received"
        );
        let mut buf = BytesMut::from(&unhex("0000")[..]);
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(WireError::Truncated { have: 2, want: 4 })
        ));
    }

    #[test]
    fn encoder_refuses_what_a_peer_would_reject() {
        let mut codec = MessageCodec::new();
        let mut out = BytesMut::new();
        let empty = Message::Piece {
            piece: 3,
            offset: 0,
            data: Bytes::new(),
        };
        assert!(matches!(
            codec.encode(empty, &mut out),
            Err(WireError::EmptyPiece {
                piece: 3,
                offset: 0
            })
        ));
        let huge = Message::Piece {
            piece: 3,
            offset: 0,
            data: Bytes::from(vec![0; MAX_BLOCK_LEN as usize + 1]),
        };
        assert!(codec.encode(huge, &mut out).is_err());
        assert!(out.is_empty(), "nothing written for a refused message");
    }

    #[test]
    fn debug_elides_payloads() {
        let piece = Message::Piece {
            piece: 1,
            offset: 2,
            data: Bytes::from(vec![0; 16384]),
        };
        assert_eq!(
            format!("{piece:?}"),
            "Piece { piece: 1, offset: 2, data: <16384 bytes> }"
        );
        assert_eq!(
            piece.block(),
            Some(BlockRef {
                piece: 1,
                offset: 2,
                len: 16384
            })
        );
    }

    /// Splits a captured stream into its handshake and its messages, and checks that our
    /// encoder would have produced the very same bytes.
    fn decode_capture(bytes: &[u8]) -> (Handshake, Vec<Message>) {
        let (handshake, rest) = bytes
            .split_first_chunk::<HANDSHAKE_LEN>()
            .expect("capture starts with a handshake");
        let handshake = Handshake::decode(handshake).unwrap();
        let mut codec = MessageCodec::new();
        let mut buf = BytesMut::from(rest);
        let messages = decode_available(&mut codec, &mut buf).unwrap();
        assert!(codec.decode_eof(&mut buf).unwrap().is_none());
        let mut again = BytesMut::new();
        for message in &messages {
            codec.encode(message.clone(), &mut again).unwrap();
        }
        assert_eq!(&again[..], rest);
        (handshake, messages)
    }

    /// Byte `i` of the captured torrent's one file (see the fixtures' README).
    fn captured_image_byte(i: usize) -> u8 {
        ((i * 7 + (i >> 8)) & 0xff) as u8
    }

    const CAPTURED_INFO_HASH: &str = "15b6ed9f6198fde362cf6353f91d11cc3f29f17a";

    #[test]
    fn captured_aria2_seeder() {
        let (handshake, messages) = decode_capture(include_bytes!(
            "../tests/fixtures/wire/aria2-1.36-seeder.bin"
        ));
        assert!(handshake.supports_fast());
        assert_eq!(handshake.info_hash.to_string(), CAPTURED_INFO_HASH);
        assert!(handshake.peer_id.0.starts_with(b"A2-1-36-0-"));

        let [
            Message::Extended { id: 0, payload },
            Message::HaveAll,
            Message::AllowedFast(0),
            Message::AllowedFast(1),
            Message::Unchoke,
            Message::Piece {
                piece: 1,
                offset: 0,
                data,
            },
        ] = &messages[..]
        else {
            panic!("unexpected messages: {messages:?}");
        };
        assert!(payload.starts_with(b"d1:md11:ut_metadata"));
        let want: Vec<u8> = (32768..32768 + 4096).map(captured_image_byte).collect();
        assert_eq!(&data[..], &want[..]);
    }

    #[test]
    fn captured_aria2_leecher() {
        let (handshake, messages) = decode_capture(include_bytes!(
            "../tests/fixtures/wire/aria2-1.36-leecher.bin"
        ));
        assert!(handshake.supports_fast());
        assert_eq!(handshake.info_hash.to_string(), CAPTURED_INFO_HASH);
        assert_eq!(
            messages,
            [
                Message::HaveNone,
                Message::AllowedFast(0),
                Message::AllowedFast(1),
                Message::Interested,
                Message::Request(block(1, 0, 7232)),
                Message::Request(block(0, 0, 16384)),
                Message::Request(block(0, 16384, 16384)),
            ]
        );
    }

    fn random_bytes(rng: &mut StdRng, len: usize) -> Bytes {
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        Bytes::from(data)
    }

    /// A random message within our limits, payload sizes biased towards the small.
    fn random_message(rng: &mut StdRng) -> Message {
        let payload_len = |rng: &mut StdRng, max: usize| {
            if rng.random_bool(0.9) {
                rng.random_range(0..=64.min(max))
            } else {
                rng.random_range(0..=max)
            }
        };
        let block = |rng: &mut StdRng| BlockRef {
            piece: rng.random(),
            offset: rng.random(),
            len: rng.random(),
        };
        match rng.random_range(0..17) {
            0 => Message::KeepAlive,
            1 => Message::Choke,
            2 => Message::Unchoke,
            3 => Message::Interested,
            4 => Message::NotInterested,
            5 => Message::Have(rng.random()),
            6 => {
                // Mostly small: a full 1 MiB bitfield in every tenth message would dominate.
                let len = if rng.random_bool(0.002) {
                    MAX_BITFIELD_LEN
                } else {
                    payload_len(rng, 4096)
                };
                Message::Bitfield(random_bytes(rng, len))
            }
            7 => Message::Request(block(rng)),
            8 => {
                let len = 1 + payload_len(rng, MAX_BLOCK_LEN as usize - 1);
                Message::Piece {
                    piece: rng.random(),
                    offset: rng.random(),
                    data: random_bytes(rng, len),
                }
            }
            9 => Message::Cancel(block(rng)),
            10 => Message::Port(rng.random()),
            11 => Message::SuggestPiece(rng.random()),
            12 => Message::HaveAll,
            13 => Message::HaveNone,
            14 => Message::Reject(block(rng)),
            15 => Message::AllowedFast(rng.random()),
            _ => {
                let len = payload_len(rng, MAX_MESSAGE_LEN - 2);
                Message::Extended {
                    id: rng.random(),
                    payload: random_bytes(rng, len),
                }
            }
        }
    }

    #[test]
    fn random_messages_round_trip() {
        let mut rng = StdRng::seed_from_u64(0x5741_5245);
        let mut codec = MessageCodec::new();
        let mut stream = BytesMut::new();
        let mut sent = Vec::new();
        for _ in 0..10_000 {
            let message = random_message(&mut rng);
            let mut one = BytesMut::new();
            codec.encode(message.clone(), &mut one).unwrap();
            assert_eq!(
                Message::decode_frame(&one[4..]).unwrap(),
                message,
                "{message:?}"
            );
            stream.extend_from_slice(&one);
            sent.push(message);
        }
        // All of them back out of one stream, as a connection would deliver them.
        let got = decode_available(&mut codec, &mut stream).unwrap();
        assert_eq!(got, sent);
        assert!(stream.is_empty());
    }

    /// Random input shaped to reach the parsers often: a stream of a plausible length prefix (or
    /// a near miss), a known id (or a neighbour), then noise of a size some message kind wants;
    /// or a handshake with one byte changed.
    fn random_input(rng: &mut StdRng) -> Vec<u8> {
        if rng.random_bool(0.05) {
            let mut bytes = Handshake::new(InfoHash(rng.random()), PeerId(rng.random()))
                .encode()
                .to_vec();
            let at = rng.random_range(0..HANDSHAKE_LEN);
            bytes[at] = rng.random();
            return bytes;
        }
        let id: u8 = rng.random_range(0..=22);
        let body_len = match limits(id) {
            Some(limits) if rng.random_bool(0.6) => {
                rng.random_range(limits.min..=limits.max.min(limits.min + 40))
            }
            _ => rng.random_range(0..=40usize),
        };
        if rng.random_bool(0.1) {
            return random_bytes(rng, 4 + body_len).to_vec();
        }
        let announced = match rng.random_range(0..10) {
            0 => rng.random::<u32>(),
            1 => (body_len as u32).wrapping_sub(1),
            2 => body_len as u32 + 1,
            _ => body_len as u32,
        };
        let mut bytes = announced.to_be_bytes().to_vec();
        if body_len > 0 {
            bytes.push(id);
            bytes.extend_from_slice(&random_bytes(rng, body_len - 1));
        }
        // Sometimes a second frame behind the first, so the codec has to find the boundary.
        if rng.random_bool(0.3) {
            bytes.extend_from_slice(&random_input(rng));
        }
        bytes
    }

    #[test]
    fn random_bytes_never_panic_and_accepted_frames_are_canonical() {
        let mut rng = StdRng::seed_from_u64(0xf022);
        let (mut frames, mut handshakes) = (0, 0);
        for _ in 0..10_000 {
            let input = random_input(&mut rng);

            // Whatever decode_frame accepts re-encodes to exactly the frame it came from. Try
            // the input both as a body and as a stream whose first 4 bytes are the prefix.
            for body in [&input[..], input.get(4..).unwrap_or_default()] {
                if let Ok(message) = Message::decode_frame(body) {
                    let mut out = BytesMut::new();
                    message.encode(&mut out);
                    assert_eq!(&out[4..], body, "{message:?}");
                }
            }

            // The codec consumes exactly the bytes of the frames it returns.
            let mut codec = MessageCodec::new();
            let mut buf = BytesMut::from(&input[..]);
            let mut consumed = 0;
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(message)) => {
                        // What we accept we would also send.
                        let mut out = BytesMut::new();
                        codec.encode(message, &mut out).unwrap();
                        assert_eq!(&out[..], &input[consumed..consumed + out.len()]);
                        consumed += out.len();
                        assert_eq!(buf.len(), input.len() - consumed);
                        frames += 1;
                    }
                    Ok(None) => {
                        let _ = codec.decode_eof(&mut buf);
                        break;
                    }
                    Err(_) => break,
                }
            }

            if let Some(Ok(bytes)) = input
                .get(..HANDSHAKE_LEN)
                .map(<&[u8; HANDSHAKE_LEN]>::try_from)
                && let Ok(handshake) = Handshake::decode(bytes)
            {
                assert_eq!(&handshake.encode(), bytes);
                handshakes += 1;
            }
        }
        // The generator is only useful if it gets past the length checks.
        assert!(frames > 2000, "only {frames} frames decoded");
        assert!(handshakes > 200, "only {handshakes} handshakes decoded");
    }
}
