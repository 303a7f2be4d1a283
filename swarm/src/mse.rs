//! Message Stream Encryption (MSE, also "protocol encryption"): the receiving side
//! ([`accept`]) and the initiating side ([`initiate`]).
//!
//! Clients such as Transmission prefer (or require) this obfuscation layer. Without it our
//! listener reset their first packet and they fell back to plaintext, or gave up; and a peer
//! that requires it can only be reached by dialling with it. The spec
//! (the Vuze wiki page "Message Stream Encryption") defines a Diffie-Hellman exchange over a
//! fixed 768-bit prime with generator 2, then RC4 keyed from the shared secret and the info
//! hash. It is obfuscation, not confidentiality: nothing authenticates the exchange, so an
//! active attacker can sit in the middle. Integrity still comes from the piece hashes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use num_bigint::BigUint;
use rand::RngCore;
use rc4::consts::U20;
use rc4::{KeyInit, Rc4, StreamCipher};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The spec's prime P, big-endian hex.
const PRIME_HEX: &str = "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74\
020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576\
625E7EC6F44C42E9A63A36210000000000090563";
/// Public keys are P-sized: 96 bytes.
pub const KEY_LEN: usize = 96;
/// The longest pad the spec allows (padA, padB, padC, padD).
pub const MAX_PAD: usize = 512;
/// Crypto method bits of crypto_provide / crypto_select.
pub const CRYPTO_PLAIN: u32 = 0x01;
pub const CRYPTO_RC4: u32 = 0x02;
/// The BitTorrent handshake's first 20 bytes: a connection starting with them is plaintext.
pub const PLAIN_PREFIX: &[u8; 20] = b"\x13BitTorrent protocol";

fn prime() -> BigUint {
    BigUint::parse_bytes(PRIME_HEX.as_bytes(), 16).expect("PRIME_HEX is valid hex")
}

/// `n` as a 96-byte big-endian number (left-padded with zeros, as the spec requires).
fn to_key_bytes(n: &BigUint) -> [u8; KEY_LEN] {
    let raw = n.to_bytes_be();
    let mut out = [0u8; KEY_LEN];
    out[KEY_LEN - raw.len()..].copy_from_slice(&raw);
    out
}

fn hash(parts: &[&[u8]]) -> [u8; 20] {
    let mut h = Sha1::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// A private key and its public half `2^x mod P`.
pub struct KeyPair {
    private: BigUint,
    pub public: [u8; KEY_LEN],
}

impl KeyPair {
    /// A fresh 160-bit private key (the spec asks for at least 128 bits).
    pub fn generate() -> Self {
        let mut x = [0u8; 20];
        rand::rng().fill_bytes(&mut x);
        let private = BigUint::from_bytes_be(&x);
        let public = to_key_bytes(&BigUint::from(2u32).modpow(&private, &prime()));
        KeyPair { private, public }
    }

    /// The shared secret S from the other side's public key.
    pub fn secret(&self, theirs: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
        to_key_bytes(&BigUint::from_bytes_be(theirs).modpow(&self.private, &prime()))
    }
}

/// RC4 keyed with `HASH(name, S, SKEY)`, with the first 1024 bytes of keystream discarded.
pub fn cipher(name: &[u8], s: &[u8; KEY_LEN], skey: &[u8; 20]) -> Rc4<U20> {
    let key = hash(&[name, s, skey]);
    let mut c = Rc4::<U20>::new(&key.into());
    c.apply_keystream(&mut [0u8; 1024]);
    c
}

/// `HASH('req2', SKEY) xor HASH('req3', S)`: how the initiator names the torrent.
pub fn obfuscated_skey(skey: &[u8; 20], s: &[u8; KEY_LEN]) -> [u8; 20] {
    let a = hash(&[b"req2", skey]);
    let b = hash(&[b"req3", s]);
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// Why an encrypted handshake was refused.
#[derive(Debug, thiserror::Error)]
pub enum MseError {
    #[error("reading or writing the encrypted handshake: {0}")]
    Io(#[from] io::Error),
    #[error(
        "HASH('req1', S) not found within the 532 bytes after the peer's key (garbage, or not MSE)"
    )]
    NoSync,
    #[error("the peer asked for a torrent this engine does not serve")]
    UnknownTorrent,
    #[error("verification constant is not 8 zero bytes (wrong key or not MSE)")]
    BadVc,
    #[error(
        "the peer offers crypto methods {0:#x}, none of which (plaintext 0x1, RC4 0x2) we support"
    )]
    NoCommonMethod(u32),
    #[error(
        "the peer's encrypted verification constant not found within the 520 bytes after its \
         key (it does not serve this torrent, or does not speak MSE)"
    )]
    NoVc,
    #[error(
        "the peer selected crypto method {select:#x}, not exactly one of the {provide:#x} we offered"
    )]
    BadSelect { select: u32, provide: u32 },
    #[error("the peer offers only plaintext (crypto methods {0:#x}) and RC4 is required")]
    PlaintextRefused(u32),
    #[error("{what} length {len} exceeds the spec's limit {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
}

/// What the receiver learned: which torrent, and a stream to run the peer wire over.
pub struct Accepted<S> {
    pub skey: [u8; 20],
    pub stream: MseStream<S>,
}

/// Reads until the bytes last read are `marker`, which follows the peer's padding (at most
/// [`MAX_PAD`] bytes): `false` if it has not come by then. Byte by byte, since what follows
/// the marker belongs to the caller.
async fn read_past<S: AsyncRead + Unpin>(io: &mut S, marker: &[u8]) -> std::io::Result<bool> {
    let mut window: Vec<u8> = Vec::with_capacity(MAX_PAD + marker.len());
    while !window.ends_with(marker) {
        if window.len() >= MAX_PAD + marker.len() {
            return Ok(false);
        }
        let mut b = [0u8; 1];
        io.read_exact(&mut b).await?;
        window.push(b[0]);
    }
    Ok(true)
}

/// Runs the receiver (B) side after the peer's first `prefix` bytes (already read while
/// telling MSE from plaintext) were found not to be a plaintext handshake. `known` are the info
/// hashes this engine serves. RC4 is selected whenever the peer offers it; plaintext only when
/// it offers nothing else and `plain_allowed`. The initial payload (IA) is returned inside the
/// stream, so the caller reads the BitTorrent handshake from it as from a plaintext connection.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    prefix: &[u8],
    known: &[[u8; 20]],
    plain_allowed: bool,
) -> Result<Accepted<S>, MseError> {
    let mut ya = [0u8; KEY_LEN];
    let have = prefix.len().min(KEY_LEN);
    ya[..have].copy_from_slice(&prefix[..have]);
    io.read_exact(&mut ya[have..]).await?;

    let keys = KeyPair::generate();
    let mut out = keys.public.to_vec();
    let pad_len = (rand::rng().next_u32() as usize) % 64;
    out.resize(KEY_LEN + pad_len, 0);
    rand::rng().fill_bytes(&mut out[KEY_LEN..]);
    io.write_all(&out).await?;
    let s = keys.secret(&ya);

    // Sync on HASH('req1', S): it follows padA (at most 512 bytes), so search 532 bytes only.
    let req1 = hash(&[b"req1", &s]);
    if !read_past(&mut io, &req1).await? {
        return Err(MseError::NoSync);
    }

    let mut named = [0u8; 20];
    io.read_exact(&mut named).await?;
    let skey = *known
        .iter()
        .find(|k| obfuscated_skey(k, &s) == named)
        .ok_or(MseError::UnknownTorrent)?;

    let mut dec = cipher(b"keyA", &s, &skey);
    let mut enc = cipher(b"keyB", &s, &skey);

    let mut head = [0u8; 14];
    io.read_exact(&mut head).await?;
    dec.apply_keystream(&mut head);
    if head[..8] != [0u8; 8] {
        return Err(MseError::BadVc);
    }
    let provide = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
    let pad_c = usize::from(u16::from_be_bytes([head[12], head[13]]));
    if pad_c > MAX_PAD {
        return Err(MseError::TooLong {
            what: "padC",
            len: pad_c,
            max: MAX_PAD,
        });
    }
    let mut rest = vec![0u8; pad_c + 2];
    io.read_exact(&mut rest).await?;
    dec.apply_keystream(&mut rest);
    let ia_len = usize::from(u16::from_be_bytes([rest[pad_c], rest[pad_c + 1]]));
    // IA holds at most the 68-byte BitTorrent handshake plus a few messages; 64 KiB is the
    // u16 bound anyway, so this cannot allocate more than that.
    let mut ia = vec![0u8; ia_len];
    io.read_exact(&mut ia).await?;
    dec.apply_keystream(&mut ia);

    let select = if provide & CRYPTO_RC4 != 0 {
        CRYPTO_RC4
    } else if provide & CRYPTO_PLAIN != 0 {
        if !plain_allowed {
            return Err(MseError::PlaintextRefused(provide));
        }
        CRYPTO_PLAIN
    } else {
        return Err(MseError::NoCommonMethod(provide));
    };
    let mut reply = Vec::with_capacity(14);
    reply.extend_from_slice(&[0u8; 8]);
    reply.extend_from_slice(&select.to_be_bytes());
    reply.extend_from_slice(&0u16.to_be_bytes());
    enc.apply_keystream(&mut reply);
    io.write_all(&reply).await?;

    Ok(Accepted {
        skey,
        stream: MseStream::negotiated(io, select, enc, dec, ia),
    })
}

/// Runs the initiator (A) side over a fresh connection to a peer serving `info_hash`,
/// offering the crypto methods `provide` (RC4 and/or plaintext bits) and sending `ia` (the
/// BitTorrent handshake, so that it costs no extra round trip) as the initial payload. Returns
/// the stream to run the peer wire over, encrypted or not as the peer selected.
pub async fn initiate<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    info_hash: &[u8; 20],
    provide: u32,
    ia: &[u8],
) -> Result<MseStream<S>, MseError> {
    if ia.len() > usize::from(u16::MAX) {
        return Err(MseError::TooLong {
            what: "IA",
            len: ia.len(),
            max: usize::from(u16::MAX),
        });
    }
    let keys = KeyPair::generate();
    let mut out = keys.public.to_vec();
    let pad_len = (rand::rng().next_u32() as usize) % 64;
    out.resize(KEY_LEN + pad_len, 0);
    rand::rng().fill_bytes(&mut out[KEY_LEN..]);
    io.write_all(&out).await?;

    let mut yb = [0u8; KEY_LEN];
    io.read_exact(&mut yb).await?;
    let s = keys.secret(&yb);
    let mut enc = cipher(b"keyA", &s, info_hash);
    let mut dec = cipher(b"keyB", &s, info_hash);

    let mut msg = hash(&[b"req1", &s]).to_vec();
    msg.extend_from_slice(&obfuscated_skey(info_hash, &s));
    let mut tail = vec![0u8; 8];
    tail.extend_from_slice(&provide.to_be_bytes());
    // No padC: it only hides lengths, and the pad we sent after our key did that already.
    tail.extend_from_slice(&0u16.to_be_bytes());
    tail.extend_from_slice(&(ia.len() as u16).to_be_bytes());
    tail.extend_from_slice(ia);
    enc.apply_keystream(&mut tail);
    msg.extend_from_slice(&tail);
    io.write_all(&msg).await?;

    // padB (at most 512 bytes) hides where the peer's reply starts: it is its encrypted VC,
    // 8 zero bytes through keyB, searched for within the 520 bytes after its key.
    let mut vc = [0u8; 8];
    dec.apply_keystream(&mut vc);
    if !read_past(&mut io, &vc).await? {
        return Err(MseError::NoVc);
    }
    let mut head = [0u8; 6];
    io.read_exact(&mut head).await?;
    dec.apply_keystream(&mut head);
    let select = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    if !(select == CRYPTO_RC4 || select == CRYPTO_PLAIN) || select & provide == 0 {
        return Err(MseError::BadSelect { select, provide });
    }
    let pad_d = usize::from(u16::from_be_bytes([head[4], head[5]]));
    if pad_d > MAX_PAD {
        return Err(MseError::TooLong {
            what: "padD",
            len: pad_d,
            max: MAX_PAD,
        });
    }
    let mut pad = vec![0u8; pad_d];
    io.read_exact(&mut pad).await?;
    dec.apply_keystream(&mut pad);
    Ok(MseStream::negotiated(io, select, enc, dec, Vec::new()))
}

/// A stream that serves already-decrypted bytes first, then RC4-decrypts what it reads and
/// encrypts what it writes (or passes both through when plaintext was selected).
pub struct MseStream<S> {
    io: S,
    enc: Option<Rc4<U20>>,
    dec: Option<Rc4<U20>>,
    pending: Vec<u8>,
    pending_at: usize,
    /// Encrypted bytes not yet accepted by `io`: RC4 state has advanced past them, so they
    /// must go out before anything else.
    wbuf: Vec<u8>,
}

impl<S> MseStream<S> {
    /// A plaintext connection whose first bytes `pending` were already read (while telling
    /// MSE from plaintext), so both kinds of connection are one type to the peer code.
    pub fn plain(io: S, pending: Vec<u8>) -> Self {
        MseStream {
            io,
            enc: None,
            dec: None,
            pending,
            pending_at: 0,
            wbuf: Vec::new(),
        }
    }

    /// The stream after a handshake that chose `select`: RC4 keeps the ciphers, plaintext
    /// drops them (the handshake itself was encrypted either way). `pending` is the payload
    /// that came with the handshake, already decrypted.
    fn negotiated(io: S, select: u32, enc: Rc4<U20>, dec: Rc4<U20>, pending: Vec<u8>) -> Self {
        let rc4 = select == CRYPTO_RC4;
        MseStream {
            io,
            enc: rc4.then_some(enc),
            dec: rc4.then_some(dec),
            pending,
            pending_at: 0,
            wbuf: Vec::new(),
        }
    }

    /// The underlying connection (for socket options).
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Whether the connection is RC4-encrypted (false: plaintext selected after the handshake).
    pub fn encrypted(&self) -> bool {
        self.enc.is_some()
    }
}

impl<S: AsyncWrite + Unpin> MseStream<S> {
    fn flush_wbuf(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.wbuf.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wbuf.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for MseStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending_at < this.pending.len() {
            let n = (this.pending.len() - this.pending_at).min(buf.remaining());
            buf.put_slice(&this.pending[this.pending_at..this.pending_at + n]);
            this.pending_at += n;
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if let Some(dec) = &mut this.dec {
            dec.apply_keystream(&mut buf.filled_mut()[before..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for MseStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.flush_wbuf(cx))?;
        match &mut this.enc {
            None => Pin::new(&mut this.io).poll_write(cx, data),
            Some(enc) => {
                // Encrypt into our own buffer and report it all accepted: once the keystream
                // has advanced, the bytes are committed.
                this.wbuf.extend_from_slice(data);
                enc.apply_keystream(&mut this.wbuf);
                let _ = this.flush_wbuf(cx)?;
                Poll::Ready(Ok(data.len()))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.flush_wbuf(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.flush_wbuf(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
