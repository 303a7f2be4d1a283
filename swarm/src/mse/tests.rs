//! The receiver against an initiator written here from the spec, and our initiator against our
//! receiver (and against replies written here), over an in-memory duplex.

use super::*;
use tokio::io::duplex;

const SKEY: [u8; 20] = [7u8; 20];

/// What the test initiator sends after its public key.
struct Initiator {
    pad_a: usize,
    skey: [u8; 20],
    vc: [u8; 8],
    provide: u32,
    pad_c: usize,
}

impl Default for Initiator {
    fn default() -> Self {
        Initiator {
            pad_a: 30,
            skey: SKEY,
            vc: [0; 8],
            provide: CRYPTO_RC4,
            pad_c: 10,
        }
    }
}

/// Runs the receiver against `init`; returns its result and the initiator's end with its ciphers.
async fn exchange(
    init: Initiator,
) -> (
    Result<Accepted<tokio::io::DuplexStream>, MseError>,
    Option<u32>,
) {
    let (a, b) = duplex(1 << 16);
    let receiver = tokio::spawn(async move {
        let mut first = [0u8; 20];
        let mut b = b;
        b.read_exact(&mut first).await?;
        accept(b, &first, &[[1u8; 20], SKEY], true).await
    });
    let mut a = a;
    let keys = KeyPair::generate();
    let mut first = keys.public.to_vec();
    first.extend(std::iter::repeat_n(0xAB, init.pad_a));
    a.write_all(&first).await.unwrap();
    let mut yb = [0u8; KEY_LEN];
    a.read_exact(&mut yb).await.unwrap();
    let s = keys.secret(&yb);
    let mut enc = cipher(b"keyA", &s, &init.skey);
    let mut dec = cipher(b"keyB", &s, &init.skey);
    let mut msg = hash(&[b"req1", &s]).to_vec();
    msg.extend_from_slice(&obfuscated_skey(&init.skey, &s));
    let mut tail = init.vc.to_vec();
    tail.extend_from_slice(&init.provide.to_be_bytes());
    tail.extend_from_slice(&(init.pad_c as u16).to_be_bytes());
    tail.extend(std::iter::repeat_n(0, init.pad_c));
    tail.extend_from_slice(&(PLAIN_PREFIX.len() as u16).to_be_bytes());
    tail.extend_from_slice(PLAIN_PREFIX);
    enc.apply_keystream(&mut tail);
    msg.extend_from_slice(&tail);
    let _ = a.write_all(&msg).await;
    let result = receiver.await.unwrap();
    if result.is_err() {
        return (result, None);
    }
    // Skip padB by syncing on the encrypted VC, as an initiator must.
    let mut want_vc = [0u8; 8];
    cipher(b"keyB", &s, &init.skey).apply_keystream(&mut want_vc);
    let mut seen = Vec::new();
    while seen.len() < 8 || seen[seen.len() - 8..] != want_vc {
        let mut byte = [0u8; 1];
        a.read_exact(&mut byte).await.unwrap();
        seen.push(byte[0]);
        assert!(seen.len() <= MAX_PAD + 8, "no VC from the receiver");
    }
    dec.apply_keystream(&mut [0u8; 8]);
    let mut sel = [0u8; 6];
    a.read_exact(&mut sel).await.unwrap();
    dec.apply_keystream(&mut sel);
    let select = u32::from_be_bytes([sel[0], sel[1], sel[2], sel[3]]);

    let mut accepted = result.unwrap();
    // The payload reaches the caller; then data flows both ways through RC4.
    let mut ia = [0u8; 20];
    accepted.stream.read_exact(&mut ia).await.unwrap();
    assert_eq!(&ia, PLAIN_PREFIX);
    let mut hello = *b"hello from A";
    enc.apply_keystream(&mut hello);
    a.write_all(&hello).await.unwrap();
    let mut got = [0u8; 12];
    accepted.stream.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello from A");
    accepted.stream.write_all(b"hello from B").await.unwrap();
    accepted.stream.flush().await.unwrap();
    let mut back = [0u8; 12];
    a.read_exact(&mut back).await.unwrap();
    dec.apply_keystream(&mut back);
    assert_eq!(&back, b"hello from B");
    (Ok(accepted), Some(select))
}

#[test]
fn prime_is_768_bits() {
    assert_eq!(prime().bits(), 768);
}

#[tokio::test]
async fn rc4_handshake_finds_the_torrent_and_carries_data_both_ways() {
    let (result, select) = exchange(Initiator::default()).await;
    let accepted = result.unwrap();
    assert_eq!(accepted.skey, SKEY);
    assert!(accepted.stream.encrypted());
    assert_eq!(select, Some(CRYPTO_RC4));
}

#[tokio::test]
async fn unknown_torrent_is_refused() {
    let (result, _) = exchange(Initiator {
        skey: [9; 20],
        ..Default::default()
    })
    .await;
    assert!(
        matches!(result, Err(MseError::UnknownTorrent)),
        "{:?}",
        result.err()
    );
}

#[tokio::test]
async fn wrong_vc_is_refused() {
    let (result, _) = exchange(Initiator {
        vc: [1; 8],
        ..Default::default()
    })
    .await;
    assert!(matches!(result, Err(MseError::BadVc)), "{:?}", result.err());
}

#[tokio::test]
async fn too_long_pad_a_finds_no_sync() {
    let (result, _) = exchange(Initiator {
        pad_a: MAX_PAD + 1,
        ..Default::default()
    })
    .await;
    assert!(
        matches!(result, Err(MseError::NoSync)),
        "{:?}",
        result.err()
    );
}

#[tokio::test]
async fn too_long_pad_c_is_refused() {
    let (result, _) = exchange(Initiator {
        pad_c: MAX_PAD + 1,
        ..Default::default()
    })
    .await;
    assert!(
        matches!(result, Err(MseError::TooLong { .. })),
        "{:?}",
        result.err()
    );
}

#[tokio::test]
async fn no_common_method_is_refused() {
    let (result, _) = exchange(Initiator {
        provide: 0x8,
        ..Default::default()
    })
    .await;
    assert!(
        matches!(result, Err(MseError::NoCommonMethod(8))),
        "{:?}",
        result.err()
    );
}

#[tokio::test]
async fn garbage_ends_in_an_error_not_a_panic() {
    let (mut a, b) = duplex(4096);
    let receiver = tokio::spawn(async move { accept(b, &[0xFF; 20], &[SKEY], true).await });
    a.write_all(&[0x5A; 2000]).await.unwrap();
    drop(a);
    assert!(receiver.await.unwrap().is_err());
}

#[tokio::test]
async fn truncated_input_ends_in_an_io_error() {
    let (mut a, b) = duplex(4096);
    let receiver = tokio::spawn(async move { accept(b, &[1; 20], &[SKEY], true).await });
    a.write_all(&[1; 40]).await.unwrap();
    drop(a);
    assert!(matches!(receiver.await.unwrap(), Err(MseError::Io(_))));
}

/// Our initiator against our receiver: what each returns (the receiver reads its first 20
/// bytes before `accept`, as the listener does).
async fn both_sides(
    provide: u32,
    info_hash: [u8; 20],
    plain_allowed: bool,
) -> (
    Result<MseStream<tokio::io::DuplexStream>, MseError>,
    Result<Accepted<tokio::io::DuplexStream>, MseError>,
) {
    let (a, mut b) = duplex(1 << 16);
    let receiver = tokio::spawn(async move {
        let mut first = [0u8; 20];
        b.read_exact(&mut first).await?;
        accept(b, &first, &[[1u8; 20], SKEY], plain_allowed).await
    });
    let initiated = initiate(a, &info_hash, provide, PLAIN_PREFIX).await;
    (initiated, receiver.await.unwrap())
}

#[tokio::test]
async fn our_initiator_and_receiver_agree_on_rc4_and_carry_data_both_ways() {
    let (initiated, accepted) = both_sides(CRYPTO_RC4 | CRYPTO_PLAIN, SKEY, true).await;
    let mut ours = initiated.unwrap();
    let mut theirs = accepted.unwrap();
    assert_eq!(theirs.skey, SKEY);
    assert!(ours.encrypted() && theirs.stream.encrypted());
    let mut ia = [0u8; 20];
    theirs.stream.read_exact(&mut ia).await.unwrap();
    assert_eq!(
        &ia, PLAIN_PREFIX,
        "the initial payload reaches the receiver"
    );
    ours.write_all(b"hello from A").await.unwrap();
    ours.flush().await.unwrap();
    let mut got = [0u8; 12];
    theirs.stream.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello from A");
    theirs.stream.write_all(b"hello from B").await.unwrap();
    theirs.stream.flush().await.unwrap();
    ours.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello from B");
}

#[tokio::test]
async fn an_initiator_offering_only_plaintext_gets_it_where_allowed_and_is_refused_where_not() {
    let (initiated, accepted) = both_sides(CRYPTO_PLAIN, SKEY, true).await;
    let mut ours = initiated.unwrap();
    let mut theirs = accepted.unwrap();
    assert!(!ours.encrypted() && !theirs.stream.encrypted());
    let mut ia = [0u8; 20];
    theirs.stream.read_exact(&mut ia).await.unwrap();
    assert_eq!(&ia, PLAIN_PREFIX);
    theirs.stream.write_all(b"plain").await.unwrap();
    let mut got = [0u8; 5];
    ours.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"plain");

    let (initiated, accepted) = both_sides(CRYPTO_PLAIN, SKEY, false).await;
    assert!(
        matches!(accepted, Err(MseError::PlaintextRefused(CRYPTO_PLAIN))),
        "{:?}",
        accepted.err()
    );
    assert!(initiated.is_err(), "the initiator saw the connection end");
}

#[tokio::test]
async fn our_initiator_for_a_torrent_the_receiver_lacks_gets_an_error() {
    let (initiated, accepted) = both_sides(CRYPTO_RC4, [9; 20], true).await;
    assert!(matches!(accepted, Err(MseError::UnknownTorrent)));
    assert!(
        matches!(initiated, Err(MseError::Io(_))),
        "{:?}",
        initiated.err()
    );
}

#[tokio::test]
async fn our_initiator_finds_no_vc_in_garbage() {
    let (a, mut b) = duplex(1 << 16);
    let peer = tokio::spawn(async move {
        let mut theirs = [0u8; KEY_LEN];
        b.read_exact(&mut theirs).await.unwrap();
        // A key, then more garbage than any padB, never a VC.
        let _ = b.write_all(&[0x5A; KEY_LEN + MAX_PAD + 100]).await;
        b
    });
    let initiated = initiate(a, &SKEY, CRYPTO_RC4, PLAIN_PREFIX).await;
    assert!(
        matches!(initiated, Err(MseError::NoVc)),
        "{:?}",
        initiated.err()
    );
    drop(peer.await.unwrap());
}

#[tokio::test]
async fn our_initiator_refuses_a_method_it_did_not_offer() {
    // A receiver written here that selects plaintext although only RC4 was offered.
    let (a, b) = duplex(1 << 16);
    let peer = tokio::spawn(async move {
        let mut b = b;
        let mut ya = [0u8; KEY_LEN];
        b.read_exact(&mut ya).await.unwrap();
        let keys = KeyPair::generate();
        b.write_all(&keys.public).await.unwrap();
        let s = keys.secret(&ya);
        let mut enc = cipher(b"keyB", &s, &SKEY);
        let mut reply = [0u8; 14];
        reply[8..12].copy_from_slice(&CRYPTO_PLAIN.to_be_bytes());
        enc.apply_keystream(&mut reply);
        b.write_all(&reply).await.unwrap();
        b
    });
    let initiated = initiate(a, &SKEY, CRYPTO_RC4, PLAIN_PREFIX).await;
    assert!(
        matches!(
            initiated,
            Err(MseError::BadSelect {
                select: CRYPTO_PLAIN,
                provide: CRYPTO_RC4
            })
        ),
        "{:?}",
        initiated.err()
    );
    drop(peer.await.unwrap());
}
