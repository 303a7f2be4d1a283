//! The session API driven in-process: two engines talking over loopback TCP (a real wire,
//! no tracker), checking what the server and the agent rely on: stats, pause and resume,
//! removal with the file, refusing to seed a file that does not match, encryption (MSE, RC4)
//! required: dialled with and refused without, the zone and the dialling order, and a hostile
//! peer that tries to get an honest one banned.

use std::path::Path;
use std::time::Duration;

use boottorrent_bt::metainfo::Metainfo;
use boottorrent_swarm::session::{
    AddTorrent, Cidr, Encryption, Mode, Session, SessionConfig, TorrentHandle, TorrentState,
    TorrentStats,
};
use sha1::{Digest, Sha1};
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(60);

/// A single-file torrent of `data`, bencoded by hand so the test needs no creator.
fn torrent_for(name: &str, data: &[u8], piece_len: usize) -> Metainfo {
    let mut pieces = Vec::new();
    for chunk in data.chunks(piece_len) {
        pieces.extend_from_slice(&Sha1::digest(chunk));
    }
    let mut info = Vec::new();
    info.extend_from_slice(
        format!("d6:lengthi{}e4:name{}:{}", data.len(), name.len(), name).as_bytes(),
    );
    info.extend_from_slice(
        format!("12:piece lengthi{piece_len}e6:pieces{}:", pieces.len()).as_bytes(),
    );
    info.extend_from_slice(&pieces);
    info.push(b'e');
    let mut bytes = b"d4:info".to_vec();
    bytes.extend_from_slice(&info);
    bytes.push(b'e');
    Metainfo::from_bytes(&bytes).expect("hand-made torrent parses")
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::Rng::fill(&mut rand::rng(), &mut data[..]);
    data
}

async fn session(config: SessionConfig) -> (Session, CancellationToken) {
    let shutdown = CancellationToken::new();
    let session = Session::start(
        SessionConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..config
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    (session, shutdown)
}

/// Waits until `check` holds for the torrent's stats, failing after `LIMIT`.
async fn wait_stats(
    handle: &TorrentHandle,
    what: &str,
    check: impl Fn(&TorrentStats) -> bool,
) -> TorrentStats {
    let mut stats = handle.stats();
    tokio::time::timeout(LIMIT, async {
        loop {
            {
                let s = stats.borrow_and_update();
                if check(&s) {
                    return s.clone();
                }
            }
            stats.changed().await.expect("torrent still running");
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "timed out waiting for {what}: {:?}",
            handle.stats().borrow()
        )
    })
}

fn add(
    session: &Session,
    meta: &Metainfo,
    path: &Path,
    mode: Mode,
    peers: &[&Session],
) -> TorrentHandle {
    session
        .add(AddTorrent {
            metainfo: meta.clone(),
            path: path.to_owned(),
            mode,
            peers: peers.iter().map(|s| s.local_addr()).collect(),
            use_tracker: false,
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leecher_gets_identical_bytes_and_remove_deletes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(3 * 1024 * 1024 + 1234);
    let meta = torrent_for("image.vhdx", &data, 256 * 1024);
    let source = dir.path().join("source.vhdx");
    std::fs::write(&source, &data).unwrap();
    let (seeder, stop_seeder) = session(SessionConfig::default()).await;
    let seeding = add(&seeder, &meta, &source, Mode::Seed, &[]);
    wait_stats(&seeding, "seeding", |s| s.state == TorrentState::Seeding).await;

    let (leecher, stop_leecher) = session(SessionConfig::default()).await;
    let target = dir.path().join("out/image.vhdx");
    let handle = add(&leecher, &meta, &target, Mode::Download, &[&seeder]);
    let done = wait_stats(&handle, "completion", |s| s.state == TorrentState::Seeding).await;
    assert_eq!(done.bytes_done, data.len() as u64);
    assert_eq!(done.pieces_done, meta.geometry.piece_count());
    assert!(done.downloaded >= data.len() as u64);
    assert_eq!(std::fs::read(&target).unwrap(), data);
    let up = wait_stats(&seeding, "the seeder's upload count", |s| {
        s.uploaded >= data.len() as u64
    })
    .await;
    assert_eq!(up.hash_failures, 0);

    leecher.remove(meta.info_hash, true).await.unwrap();
    assert!(!target.exists(), "remove(delete_file) leaves the file");
    assert!(
        leecher.remove(meta.info_hash, false).await.is_err(),
        "removed twice"
    );
    stop_leecher.cancel();
    stop_seeder.cancel();
    tokio::time::timeout(LIMIT, async {
        leecher.stopped().await;
        seeder.stopped().await;
    })
    .await
    .expect("sessions stop");
}

/// The tracker hands out the peers of a machine's zone first: the engine must dial in that
/// order, not its map's, or a 300-machine lab sends most bytes across its switches' uplinks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_are_dialled_in_the_order_they_were_handed_out() {
    let uploads = who_serves_a_leecher_with_room_for_one(&["127.0.0.1"; 6], None).await;
    assert!(
        uploads[0] > 0 && uploads[1..].iter().all(|&u| u == 0),
        "the first address handed out must serve the file, and no other: {uploads:?}"
    );
}

/// An agent learns its zone (its network toward the server) after its engine started: from
/// then on a peer of that network is dialled before the ones handed out ahead of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_set_after_start_puts_its_peers_first() {
    let mut ips = ["127.0.0.1"; 6];
    ips[4] = "127.0.0.2";
    let zone = "127.0.0.2/32".parse().unwrap();
    let uploads = who_serves_a_leecher_with_room_for_one(&ips, Some(zone)).await;
    assert!(
        uploads[4] > 0 && uploads.iter().enumerate().all(|(i, &u)| i == 4 || u == 0),
        "the one seeder in the zone must serve the file, and no other: {uploads:?}"
    );
}

/// While its zone is known, a machine keeps half its connections for peers of the zone:
/// outside peers it could dial, and outside peers dialling it, get the other half, and a
/// peer of the zone still gets in. Without that, machines of other switches fill a machine
/// up before it reaches its own switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_outside_the_zone_hold_at_most_half_the_connections() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(1024 * 1024);
    let meta = torrent_for("image.vhdx", &data, 256 * 1024);
    let (machine, stop_machine) = session(SessionConfig {
        max_peers: 4,
        zone: vec!["127.0.0.2/32".parse().unwrap()],
        ..SessionConfig::default()
    })
    .await;
    // Nobody has any of the file, so connections stay open and nothing finishes.
    let mut others = Vec::new();
    for ip in [
        "127.0.0.1",
        "127.0.0.1",
        "127.0.0.1",
        "127.0.0.1",
        "127.0.0.2",
    ] {
        let stop = CancellationToken::new();
        let config = SessionConfig {
            listen: format!("{ip}:0").parse().unwrap(),
            ..SessionConfig::default()
        };
        others.push((Session::start(config, stop.clone()).await.unwrap(), stop));
    }
    // The machine is handed all five, outside peers first; two outside peers also dial it.
    let order: Vec<&Session> = others.iter().map(|(s, _)| s).collect();
    let handle = add(
        &machine,
        &meta,
        &dir.path().join("machine.vhdx"),
        Mode::Download,
        &order,
    );
    let mut handles = Vec::new();
    for (i, (other, _)) in others.iter().enumerate() {
        let dial_back: &[&Session] = if (2..4).contains(&i) {
            &[&machine]
        } else {
            &[]
        };
        handles.push(add(
            other,
            &meta,
            &dir.path().join(format!("peer{i}.vhdx")),
            Mode::Download,
            dial_back,
        ));
    }
    wait_stats(&handle, "three connections", |s| s.peers.len() >= 3).await;
    // Refused dials come back after a couple of seconds: give them time to be refused again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stats = handle.stats().borrow().clone();
    let zone = stats.peers.iter().filter(|p| p.in_zone).count();
    assert_eq!(
        (stats.peers.len(), zone),
        (3, 1),
        "two peers from outside the zone and the zone's one, not four: {:?}",
        stats.peers
    );
    stop_machine.cancel();
    for (_, stop) in &others {
        stop.cancel();
    }
}

/// A machine dials until it holds `max_peers` connections: a connection it dialled counts
/// once toward the limit, not twice (as a peer and as a dial still under way). Counted twice,
/// a machine of `max_peers` 2 connected to one peer had no room for the one it learned next,
/// and the zone test above failed whenever its zone peer lost the race to its first dial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_dials_up_to_its_peer_limit() {
    let dir = tempfile::tempdir().unwrap();
    let meta = torrent_for("image.vhdx", &random_bytes(1024 * 1024), 256 * 1024);
    let (machine, stop_machine) = session(SessionConfig {
        max_peers: 2,
        ..SessionConfig::default()
    })
    .await;
    // Nobody has any of the file, so connections stay open and nothing finishes.
    let (a, stop_a) = session(SessionConfig::default()).await;
    let (b, stop_b) = session(SessionConfig::default()).await;
    let path = |name: &str| dir.path().join(name);
    let _a = add(&a, &meta, &path("a.vhdx"), Mode::Download, &[]);
    let _b = add(&b, &meta, &path("b.vhdx"), Mode::Download, &[]);
    let handle = add(
        &machine,
        &meta,
        &path("machine.vhdx"),
        Mode::Download,
        &[&a],
    );
    wait_stats(&handle, "the first connection", |s| s.peers.len() == 1).await;
    handle.add_peers(&[b.local_addr()]);
    wait_stats(&handle, "the second connection", |s| s.peers.len() == 2).await;
    for stop in [stop_machine, stop_a, stop_b] {
        stop.cancel();
    }
}

/// A leecher that stops wanting for a moment keeps its unchoke: when it wants more it is
/// served at once, not sent behind the peers that took the seeder's only slot meanwhile
/// (which, choked, would wait for the 10 s rotation). Two hand-written BEP 3 leechers
/// against a real seeder with one upload slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_wants_again_is_served_at_once_though_its_slot_went_to_another() {
    use tokio::io::AsyncWriteExt;
    let (seeder, stop, meta, _dir) = seeder(SessionConfig {
        upload_slots: 1,
        ..SessionConfig::default()
    })
    .await;
    let connect = |id: u8| leecher(seeder.local_addr(), meta.info_hash.0, "127.0.0.1", id);
    let wait = Duration::from_secs(5);

    let (mut a, mut a_buf) = (connect(1).await, bytes::BytesMut::new());
    let (mut b, mut b_buf) = (connect(2).await, bytes::BytesMut::new());
    a.write_all(&interested_message(true)).await.unwrap();
    assert_eq!(
        next_of(&mut a, &mut a_buf, &[UNCHOKE], wait).await,
        Some(UNCHOKE)
    );
    b.write_all(&interested_message(true)).await.unwrap();
    // A stops wanting: the only slot goes to B, and A is not choked.
    a.write_all(&interested_message(false)).await.unwrap();
    assert_eq!(
        next_of(&mut b, &mut b_buf, &[UNCHOKE], wait).await,
        Some(UNCHOKE),
        "the slot A gave up goes to the next in line"
    );
    // A wants again and asks for a block: it is served, well before any rotation.
    a.write_all(&interested_message(true)).await.unwrap();
    a.write_all(&request_message(0)).await.unwrap();
    assert_eq!(
        next_of(&mut a, &mut a_buf, &[CHOKE, PIECE], wait).await,
        Some(PIECE),
        "a peer that wants again is served at once, not choked behind the one that took its slot"
    );
    stop.cancel();
}

/// Peers of our zone that want to download take upload slots from peers outside it that
/// asked first, down to half the slots, at once rather than at the next rotation (10 s on).
/// Hand-written BEP 3 leechers against a real seeder with two upload slots whose zone is
/// 127.0.0.2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_peer_takes_a_slot_from_outside_peers_that_hold_them_all() {
    use tokio::io::AsyncWriteExt;
    let (seeder, stop, meta, _dir) = seeder(SessionConfig {
        upload_slots: 2,
        zone: vec!["127.0.0.2/32".parse().unwrap()],
        ..SessionConfig::default()
    })
    .await;
    let connect = |ip, id| leecher(seeder.local_addr(), meta.info_hash.0, ip, id);
    let wait = Duration::from_secs(5);

    // Two peers outside the zone ask first and take both slots.
    let mut outside = Vec::new();
    for id in [1, 2] {
        let (mut conn, mut buf) = (connect("127.0.0.1", id).await, bytes::BytesMut::new());
        conn.write_all(&interested_message(true)).await.unwrap();
        assert_eq!(
            next_of(&mut conn, &mut buf, &[UNCHOKE], wait).await,
            Some(UNCHOKE)
        );
        outside.push((conn, buf));
    }
    // A zone peer asks: it is unchoked, and the outside peer served longest is choked.
    let (mut zone, mut zone_buf) = (connect("127.0.0.2", 3).await, bytes::BytesMut::new());
    zone.write_all(&interested_message(true)).await.unwrap();
    assert_eq!(
        next_of(&mut zone, &mut zone_buf, &[UNCHOKE], wait).await,
        Some(UNCHOKE),
        "the zone peer takes a slot at once, not at the next rotation"
    );
    let (first, first_buf) = &mut outside[0];
    assert_eq!(
        next_of(first, first_buf, &[CHOKE], wait).await,
        Some(CHOKE),
        "the outside peer served longest gives its slot up"
    );
    // The other keeps its slot: the outside keeps half.
    let (second, second_buf) = &mut outside[1];
    assert_eq!(
        next_of(second, second_buf, &[CHOKE], Duration::from_secs(1)).await,
        None
    );
    stop.cancel();
}

/// A seeder that opens its slots a few at a time serves the first peer alone while its
/// upload has not fallen behind (an upload that has not started has not fallen behind), and
/// opens another slot for the next peer once a second's upload falls behind the best second:
/// here the first peer stops asking. That comes well before the 10 s rotation, and the first
/// peer keeps its slot. Hand-written
/// BEP 3 leechers against a real seeder with one of two slots open at first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_opens_another_slot_when_its_upload_falls_behind() {
    use tokio::io::AsyncWriteExt;
    let (seeder, stop, meta, _dir) = seeder(SessionConfig {
        upload_slots: 2,
        first_upload_slots: Some(1),
        ..SessionConfig::default()
    })
    .await;
    let connect = |id: u8| leecher(seeder.local_addr(), meta.info_hash.0, "127.0.0.1", id);
    let (mut a, mut a_buf) = (connect(1).await, bytes::BytesMut::new());
    let (mut b, mut b_buf) = (connect(2).await, bytes::BytesMut::new());
    a.write_all(&interested_message(true)).await.unwrap();
    assert_eq!(
        next_of(&mut a, &mut a_buf, &[UNCHOKE], Duration::from_secs(5)).await,
        Some(UNCHOKE)
    );
    b.write_all(&interested_message(true)).await.unwrap();
    assert_eq!(
        next_of(&mut b, &mut b_buf, &[UNCHOKE], Duration::from_millis(2500)).await,
        None,
        "one slot is open at first, and it is A's"
    );
    // A takes a piece, then asks for nothing more: the upload falls behind that second.
    for block in 0..16u32 {
        a.write_all(&request_message(block)).await.unwrap();
    }
    assert_eq!(
        next_of(&mut b, &mut b_buf, &[UNCHOKE], Duration::from_secs(5)).await,
        Some(UNCHOKE),
        "a second slot opens for B once the upload falls behind"
    );
    assert_eq!(
        next_of(&mut a, &mut a_buf, &[CHOKE], Duration::from_millis(500)).await,
        None,
        "A keeps its slot: B got a new one, not A's"
    );
    stop.cancel();
}

/// BEP 3 message kinds the hand-written peers wait for.
const CHOKE: u8 = 0;
const UNCHOKE: u8 = 1;
const PIECE: u8 = 7;

/// A session with `config` seeding a 1 MiB image of 256 KiB pieces, once it is seeding; the
/// directory holds the image.
async fn seeder(
    config: SessionConfig,
) -> (Session, CancellationToken, Metainfo, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(1024 * 1024);
    let meta = torrent_for("image.vhdx", &data, 256 * 1024);
    let source = dir.path().join("source.vhdx");
    std::fs::write(&source, &data).unwrap();
    let (seeder, stop) = session(config).await;
    let seeding = add(&seeder, &meta, &source, Mode::Seed, &[]);
    wait_stats(&seeding, "seeding", |s| s.state == TorrentState::Seeding).await;
    (seeder, stop, meta, dir)
}

/// A hand-written BEP 3 peer connected from `ip` to `seeder`, handshaken (peer id of `id`
/// bytes, no extensions, so a choke drops its requests).
async fn leecher(
    seeder: std::net::SocketAddr,
    info_hash: [u8; 20],
    ip: &str,
    id: u8,
) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    let mut conn = socket.connect(seeder).await.unwrap();
    let mut hello = vec![19u8];
    hello.extend_from_slice(b"BitTorrent protocol");
    hello.extend_from_slice(&[0u8; 8]);
    hello.extend_from_slice(&info_hash);
    hello.extend_from_slice(b"-XX0001-");
    hello.extend_from_slice(&[id; 12]);
    conn.write_all(&hello).await.unwrap();
    let mut theirs = [0u8; 68];
    conn.read_exact(&mut theirs).await.unwrap();
    conn
}

/// BEP 3's interested (or not interested) message.
fn interested_message(yes: bool) -> [u8; 5] {
    [0, 0, 0, 1, if yes { 2 } else { 3 }]
}

/// BEP 3's request for the 16 KiB block `block` of piece 0.
fn request_message(block: u32) -> Vec<u8> {
    let mut r = 13u32.to_be_bytes().to_vec();
    r.push(6);
    r.extend_from_slice(&0u32.to_be_bytes());
    r.extend_from_slice(&(block * 16 * 1024).to_be_bytes());
    r.extend_from_slice(&(16 * 1024u32).to_be_bytes());
    r
}

/// The kind of the first message of one of `kinds` on `conn` within `within`, or `None`.
async fn next_of(
    conn: &mut tokio::net::TcpStream,
    buf: &mut bytes::BytesMut,
    kinds: &[u8],
    within: Duration,
) -> Option<u8> {
    tokio::time::timeout(within, async {
        loop {
            let body = message(conn, buf).await.unwrap();
            if let Some(&kind) = body.first()
                && kinds.contains(&kind)
            {
                return kind;
            }
        }
    })
    .await
    .ok()
}

/// Seeders listening on `ips`, handed out in that order to a leecher with room for one peer
/// and, when given, `zone` set after it started: what each seeder uploaded once the leecher
/// has the whole file.
async fn who_serves_a_leecher_with_room_for_one(ips: &[&str], zone: Option<Cidr>) -> Vec<u64> {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(1024 * 1024);
    let meta = torrent_for("image.vhdx", &data, 256 * 1024);
    let source = dir.path().join("source.vhdx");
    std::fs::write(&source, &data).unwrap();
    let mut seeders = Vec::new();
    for ip in ips {
        let stop = CancellationToken::new();
        let listen = format!("{ip}:0").parse().unwrap();
        let config = SessionConfig {
            listen,
            ..SessionConfig::default()
        };
        let seeder = Session::start(config, stop.clone()).await.unwrap();
        let seeding = add(&seeder, &meta, &source, Mode::Seed, &[]);
        wait_stats(&seeding, "seeding", |s| s.state == TorrentState::Seeding).await;
        seeders.push((seeder, seeding, stop));
    }

    // Room for one peer: whichever is dialled first serves the whole file.
    let (leecher, stop_leecher) = session(SessionConfig {
        max_peers: 1,
        ..SessionConfig::default()
    })
    .await;
    if let Some(zone) = zone {
        leecher.set_zone(vec![zone]);
    }
    let order: Vec<&Session> = seeders.iter().map(|(s, _, _)| s).collect();
    let handle = add(
        &leecher,
        &meta,
        &dir.path().join("out.vhdx"),
        Mode::Download,
        &order,
    );
    wait_stats(&handle, "completion", |s| s.state == TorrentState::Seeding).await;
    // Seeders publish their counts about once a second: wait until the whole file shows.
    let uploads = tokio::time::timeout(LIMIT, async {
        loop {
            let uploads: Vec<u64> = seeders
                .iter()
                .map(|(_, seeding, _)| seeding.stats().borrow().uploaded)
                .collect();
            if uploads.iter().sum::<u64>() >= data.len() as u64 {
                return uploads;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the seeders count what they sent");
    stop_leecher.cancel();
    for (_, _, stop) in &seeders {
        stop.cancel();
    }
    uploads
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_disconnects_and_resume_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(4 * 1024 * 1024);
    let meta = torrent_for("paused.img", &data, 256 * 1024);
    let source = dir.path().join("source.img");
    std::fs::write(&source, &data).unwrap();
    // Slow enough to catch it half way.
    let (seeder, _stop_seeder) = session(SessionConfig {
        upload_limit_bps: Some(1024 * 1024),
        ..SessionConfig::default()
    })
    .await;
    add(&seeder, &meta, &source, Mode::Seed, &[]);
    let (leecher, _stop_leecher) = session(SessionConfig::default()).await;
    let target = dir.path().join("paused.img");
    let handle = add(&leecher, &meta, &target, Mode::Download, &[&seeder]);
    wait_stats(&handle, "some progress", |s| s.pieces_done >= 1).await;

    handle.pause();
    let paused = wait_stats(&handle, "paused with no peers", |s| {
        s.state == TorrentState::Paused && s.peers.is_empty()
    })
    .await;
    assert!(
        paused.bytes_done < data.len() as u64,
        "finished before the pause"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let still = handle.stats().borrow().clone();
    assert_eq!(
        still.pieces_done, paused.pieces_done,
        "progress while paused"
    );

    handle.resume();
    wait_stats(&handle, "completion after resume", |s| {
        s.state == TorrentState::Seeding
    })
    .await;
    assert_eq!(std::fs::read(&target).unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeding_a_file_that_does_not_match_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(512 * 1024);
    let meta = torrent_for("wrong.img", &data, 64 * 1024);
    let source = dir.path().join("wrong.img");
    let mut other = data.clone();
    other[100_000] ^= 0xff;
    std::fs::write(&source, &other).unwrap();
    let (seeder, _stop) = session(SessionConfig::default()).await;
    let handle = add(&seeder, &meta, &source, Mode::SuperSeed, &[]);
    let s = wait_stats(&handle, "the error", |s| {
        matches!(s.state, TorrentState::Error(_))
    })
    .await;
    let TorrentState::Error(message) = s.state else {
        unreachable!()
    };
    assert!(message.contains("7 of 8 pieces"), "{message}");
    assert!(message.contains("wrong.img"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_requiring_encryption_talk_rc4_and_a_plaintext_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(2 * 1024 * 1024 + 77);
    let meta = torrent_for("image.vhdx", &data, 256 * 1024);
    let source = dir.path().join("source.vhdx");
    std::fs::write(&source, &data).unwrap();
    let required = SessionConfig {
        encryption: Encryption::Require,
        ..SessionConfig::default()
    };
    let (seeder, stop_seeder) = session(required.clone()).await;
    let seeding = add(&seeder, &meta, &source, Mode::Seed, &[]);
    wait_stats(&seeding, "seeding", |s| s.state == TorrentState::Seeding).await;

    // A leecher that dials in plaintext gets nothing: each attempt is refused and counted.
    let (plain, stop_plain) = session(SessionConfig::default()).await;
    let refused_target = dir.path().join("plain/image.vhdx");
    let refused = add(&plain, &meta, &refused_target, Mode::Download, &[&seeder]);
    tokio::time::timeout(LIMIT, async {
        while seeder.connection_counts().refused_unencrypted == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the plaintext connection refused and counted");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(refused.stats().borrow().bytes_done, 0);
    plain.remove(meta.info_hash, true).await.unwrap();

    // A leecher that requires encryption dials with MSE and gets every byte over RC4.
    let (leecher, stop_leecher) = session(required).await;
    let target = dir.path().join("out/image.vhdx");
    let handle = add(&leecher, &meta, &target, Mode::Download, &[&seeder]);
    wait_stats(&handle, "completion", |s| s.state == TorrentState::Seeding).await;
    assert_eq!(std::fs::read(&target).unwrap(), data);
    let counts = seeder.connection_counts();
    assert!(counts.encrypted >= 1, "{counts:?}");
    assert_eq!(counts.plaintext + counts.mse_plaintext, 0, "{counts:?}");

    for stop in [stop_leecher, stop_plain, stop_seeder] {
        stop.cancel();
    }
    tokio::time::timeout(LIMIT, async {
        leecher.stopped().await;
        plain.stopped().await;
        seeder.stopped().await;
    })
    .await
    .expect("sessions stop");
}

/// A hostile peer frames an honest one: it sends the first half of each piece it is asked
/// for as garbage and then chokes (which discards our other requests), so the honest seeder
/// finishes those pieces and they fail their hash with blocks from both. Only the peer whose
/// blocks were wrong may be struck: blaming every sender banned the honest seeder as well (and
/// an agent reports banned peers to the operator as corrupt machines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_half_pieces_of_garbage_cannot_get_the_honest_one_banned() {
    const PIECE: usize = 256 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(16 * PIECE);
    let meta = torrent_for("image.vhdx", &data, PIECE);
    let source = dir.path().join("source.vhdx");
    std::fs::write(&source, &data).unwrap();
    // Slow enough that the leecher asks the hostile peer too.
    let (honest, stop_honest) = session(SessionConfig {
        upload_limit_bps: Some(1024 * 1024),
        ..SessionConfig::default()
    })
    .await;
    let seeding = add(&honest, &meta, &source, Mode::Seed, &[]);
    wait_stats(&seeding, "seeding", |s| s.state == TorrentState::Seeding).await;
    let hostile = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let hostile_addr = hostile.local_addr().unwrap();
    tokio::spawn(framing_peer(hostile, meta.info_hash.0, 16, PIECE as u32));

    let (leecher, stop_leecher) = session(SessionConfig::default()).await;
    let handle = leecher
        .add(AddTorrent {
            metainfo: meta.clone(),
            path: dir.path().join("out.vhdx"),
            mode: Mode::Download,
            peers: vec![hostile_addr, honest.local_addr()],
            use_tracker: false,
        })
        .unwrap();
    let done = wait_stats(&handle, "completion", |s| s.state == TorrentState::Seeding).await;
    assert_eq!(std::fs::read(dir.path().join("out.vhdx")).unwrap(), data);
    assert!(
        done.hash_failures >= 1,
        "the hostile peer was never asked: {done:?}"
    );
    assert!(
        !done.banned_peers.contains(&honest.local_addr()),
        "the honest seeder was banned: {:?}",
        done.banned_peers
    );
    let banned = wait_stats(&handle, "the hostile peer banned", |s| {
        s.banned_peers.contains(&hostile_addr)
    })
    .await;
    assert!(!banned.banned_peers.contains(&honest.local_addr()));
    stop_leecher.cancel();
    stop_honest.cancel();
}

/// The hostile peer of the test above, speaking BEP 3 on a real socket: a seed of `pieces`
/// pieces that answers requests in the first half of a piece with garbage and a request past
/// it with a choke. Requests that crossed the choke are dropped, as the other side drops them
/// on reading it; then it unchokes and starts over.
/// The next BEP 3 message's body (empty for a keep-alive) from `conn`; `read_buf` keeps it
/// safe to give up on while waiting.
async fn message(
    conn: &mut tokio::net::TcpStream,
    buf: &mut bytes::BytesMut,
) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    loop {
        if buf.len() >= 4 {
            let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            if buf.len() >= 4 + len {
                let frame = buf.split_to(4 + len);
                return Ok(frame[4..].to_vec());
            }
        }
        if conn.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

async fn framing_peer(
    listener: tokio::net::TcpListener,
    info_hash: [u8; 20],
    pieces: u32,
    piece_len: u32,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((mut conn, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut theirs = [0u8; 68];
            conn.read_exact(&mut theirs).await?;
            let mut hello = vec![19u8];
            hello.extend_from_slice(b"BitTorrent protocol");
            hello.extend_from_slice(&[0u8; 8]);
            hello.extend_from_slice(&info_hash);
            hello.extend_from_slice(b"-XX0001-framingpeer!");
            conn.write_all(&hello).await?;
            let mut bitfield = vec![0u8; pieces.div_ceil(8) as usize];
            for i in 0..pieces {
                bitfield[(i / 8) as usize] |= 0x80 >> (i % 8);
            }
            let mut msg = ((bitfield.len() + 1) as u32).to_be_bytes().to_vec();
            msg.push(5);
            msg.extend_from_slice(&bitfield);
            msg.extend_from_slice(&[0, 0, 0, 1, 1]); // unchoke
            conn.write_all(&msg).await?;
            let mut buf = bytes::BytesMut::new();
            loop {
                let body = message(&mut conn, &mut buf).await?;
                if body.first() != Some(&6) || body.len() != 13 {
                    continue; // keep-alive, interested, have, cancel...
                }
                let field = |i: usize| u32::from_be_bytes(body[i..i + 4].try_into().unwrap());
                let (index, begin, length) = (field(1), field(5), field(9));
                if begin < piece_len / 2 {
                    let mut piece = (9 + length).to_be_bytes().to_vec();
                    piece.push(7);
                    piece.extend_from_slice(&index.to_be_bytes());
                    piece.extend_from_slice(&begin.to_be_bytes());
                    piece.extend(std::iter::repeat_n(0xa5u8, length as usize));
                    conn.write_all(&piece).await?;
                    continue;
                }
                conn.write_all(&[0, 0, 0, 1, 0]).await?; // choke
                while let Ok(crossed) =
                    tokio::time::timeout(Duration::from_millis(100), message(&mut conn, &mut buf))
                        .await
                {
                    crossed?;
                }
                conn.write_all(&[0, 0, 0, 1, 1]).await?; // unchoke
            }
            #[allow(unreachable_code)]
            Ok::<_, std::io::Error>(())
        });
    }
}
