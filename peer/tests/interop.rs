//! Interop: our `boottorrent-peer` against real standard clients (aria2c, libtorrent) and
//! against itself, on loopback, with `opentracker` as the tracker. Every transfer ends with a
//! byte-for-byte comparison against a pristine copy of the file; every wait is bounded.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    Aria2, Libtorrent, PATIENCE, Peer, PeerOptions, Torrent, Tracker, assert_same_file,
    corrupt_pieces, field, make_torrent, random_file,
};

/// Longest a whole download may take in these tests (a few MiB on loopback take seconds).
const TRANSFER: Duration = Duration::from_secs(90);

/// A tracker, a torrent it serves, and the file: `expected` is the pristine copy the test
/// compares against, `seed_dir` holds the seeders' copy under the torrent's name.
struct Swarm {
    tmp: tempfile::TempDir,
    tracker: Tracker,
    torrent: Torrent,
    expected: PathBuf,
    seed_dir: PathBuf,
}

impl Swarm {
    /// `len` random bytes in `piece_len`-byte pieces, whitelisted at a fresh opentracker.
    fn new(len: u64, piece_len: u32) -> Swarm {
        // BOOTTORRENT_TEST_KEEP=1 keeps the directory (files, every process's log) for a
        // post-mortem; the path is printed.
        let keep = std::env::var_os("BOOTTORRENT_TEST_KEEP").is_some();
        let tmp = tempfile::Builder::new()
            .prefix("boottorrent-interop-")
            .disable_cleanup(keep)
            .tempdir()
            .unwrap();
        if keep {
            eprintln!("keeping {}", tmp.path().display());
        }
        let mut tracker = Tracker::start(tmp.path());
        let seed_dir = tmp.path().join("seed");
        std::fs::create_dir_all(&seed_dir).unwrap();
        let original = seed_dir.join("image.bin");
        random_file(&original, len);
        let torrent = make_torrent(
            &original,
            &tracker.announce_url(),
            piece_len,
            &tmp.path().join("image.torrent"),
        );
        tracker.allow(&torrent);
        let expected = tmp.path().join("expected.bin");
        std::fs::copy(&original, &expected).unwrap();
        Swarm {
            tmp,
            tracker,
            torrent,
            expected,
            seed_dir,
        }
    }

    /// The seeders' copy of the file.
    fn seed_file(&self) -> PathBuf {
        self.seed_dir.join(&self.torrent.name)
    }

    /// A fresh directory for one peer.
    fn dir(&self, name: &str) -> PathBuf {
        let dir = self.tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Where peer `name` downloads to.
    fn target(&self, name: &str) -> PathBuf {
        self.dir(name).join(&self.torrent.name)
    }

    /// Our seeder (or super-seeder) of the complete file; returns once the tracker lists it.
    fn our_seeder(&self, options: PeerOptions) -> Peer {
        let seeder = Peer::start(&self.torrent, &self.seed_file(), &options);
        self.tracker.wait_seeders(&self.torrent, 1);
        seeder
    }

    /// Our leecher into `<tmp>/<name>/`.
    fn our_leecher(&self, name: &str, options: PeerOptions) -> Peer {
        Peer::start(&self.torrent, &self.target(name), &options)
    }

    fn assert_intact(&self, file: &Path) {
        assert_same_file(&self.expected, file);
    }
}

fn seed() -> PeerOptions {
    PeerOptions {
        seed: true,
        ..PeerOptions::default()
    }
}

fn super_seed() -> PeerOptions {
    PeerOptions {
        super_seed: true,
        ..PeerOptions::default()
    }
}

/// 8 MiB and a bit, so that the last piece is short.
const LEN: u64 = (8 << 20) + 12_345;
const PIECE: u32 = 64 << 10;

/// Waits for our leecher's `complete`, checks its counters and bytes.
fn assert_our_leecher_completes(swarm: &Swarm, leecher: &mut Peer) {
    let complete = leecher.wait_event("complete", TRANSFER);
    let downloaded = field(&complete, "downloaded");
    assert!(
        downloaded >= swarm.torrent.len,
        "a fresh leecher reports downloaded={downloaded}, less than the file ({})\n{}",
        swarm.torrent.len,
        leecher.describe()
    );
    swarm.assert_intact(&leecher.file);
}

/// Our seeder's upload counter must come to account for at least `at_least` bytes (stats
/// lines may lag the transfer by a moment).
fn assert_uploaded(seeder: &mut Peer, at_least: u64) -> u64 {
    let stats = seeder.wait_stats(
        &format!("the seeder to report uploaded >= {at_least}"),
        PATIENCE,
        |s| s["uploaded"].as_u64() >= Some(at_least),
    );
    field(&stats, "uploaded")
}

#[test]
fn our_seeder_serves_three_of_our_leechers() {
    let swarm = Swarm::new(LEN, PIECE);
    let mut seeder = swarm.our_seeder(seed());
    let mut leechers: Vec<Peer> = (1..=3)
        .map(|i| swarm.our_leecher(&format!("ours{i}"), PeerOptions::default()))
        .collect();
    for leecher in &mut leechers {
        assert_our_leecher_completes(&swarm, leecher);
    }
    assert_uploaded(&mut seeder, swarm.torrent.len);
    for leecher in &mut leechers {
        let stopped = leecher.stop();
        assert!(
            field(&stopped, "downloaded") >= swarm.torrent.len,
            "{stopped}"
        );
    }
    let stopped = seeder.stop();
    assert!(
        field(&stopped, "uploaded") >= swarm.torrent.len,
        "{stopped}"
    );
}

#[test]
fn our_leecher_downloads_from_an_aria2c_seeder() {
    let swarm = Swarm::new(LEN, PIECE);
    let _aria2 = Aria2::seed(&swarm.torrent, &swarm.seed_dir, true);
    swarm.tracker.wait_seeders(&swarm.torrent, 1);
    let mut leecher = swarm.our_leecher("ours", PeerOptions::default());
    assert_our_leecher_completes(&swarm, &mut leecher);
}

#[test]
fn our_leecher_downloads_from_a_libtorrent_seeder() {
    let swarm = Swarm::new(LEN, PIECE);
    let _lt = Libtorrent::seed(&swarm.torrent, &swarm.seed_dir);
    swarm.tracker.wait_seeders(&swarm.torrent, 1);
    let mut leecher = swarm.our_leecher("ours", PeerOptions::default());
    assert_our_leecher_completes(&swarm, &mut leecher);
}

/// Our initiator against a real client that requires encryption: libtorrent seeding with
/// message stream encryption forced (RC4 only) gives our plaintext leecher nothing and serves
/// our leecher that dials with MSE.
#[test]
fn our_leecher_requiring_encryption_downloads_from_a_libtorrent_seeder_requiring_it() {
    let swarm = Swarm::new(LEN, PIECE);
    let _lt = Libtorrent::seed_encrypted(&swarm.torrent, &swarm.seed_dir);
    swarm.tracker.wait_seeders(&swarm.torrent, 1);
    let mut plain = swarm.our_leecher("plain", PeerOptions::default());
    std::thread::sleep(Duration::from_secs(8));
    let stats = plain.next_stats();
    assert_eq!(
        field(&stats, "downloaded"),
        0,
        "libtorrent forcing encryption served a plaintext leecher: {stats}"
    );
    plain.stop();
    let mut leecher = swarm.our_leecher(
        "ours",
        PeerOptions {
            extra: vec!["--require-encryption".into()],
            ..PeerOptions::default()
        },
    );
    assert_our_leecher_completes(&swarm, &mut leecher);
}

#[test]
fn aria2c_leecher_downloads_from_our_seeder() {
    let swarm = Swarm::new(LEN, PIECE);
    let mut seeder = swarm.our_seeder(seed());
    let mut aria2 = Aria2::leech(&swarm.torrent, &swarm.dir("aria2"));
    aria2.wait_done(TRANSFER);
    swarm.assert_intact(&aria2.file);
    assert_uploaded(&mut seeder, swarm.torrent.len);
}

/// An aria2c that already holds half the file announces it with a bitfield, which aria2c
/// sends after its extension handshake (BEP 10), not as its first message.
#[test]
fn partial_aria2c_leecher_completes_from_our_seeder() {
    let swarm = Swarm::new(LEN, PIECE);
    let mut seeder = swarm.our_seeder(seed());
    let dir = swarm.dir("aria2");
    let partial = dir.join(&swarm.torrent.name);
    std::fs::copy(swarm.seed_file(), &partial).unwrap();
    let missing: Vec<u32> = (swarm.torrent.pieces / 2..swarm.torrent.pieces).collect();
    corrupt_pieces(&partial, swarm.torrent.piece_len, &missing);
    let mut aria2 = Aria2::resume(&swarm.torrent, &dir);
    aria2.wait_done(TRANSFER);
    swarm.assert_intact(&aria2.file);
    let missing_bytes = swarm.torrent.len - u64::from(swarm.torrent.pieces / 2) * u64::from(PIECE);
    assert_uploaded(&mut seeder, missing_bytes);
}

#[test]
fn libtorrent_leecher_downloads_from_our_seeder() {
    let swarm = Swarm::new(LEN, PIECE);
    let mut seeder = swarm.our_seeder(seed());
    let mut lt = Libtorrent::leech(&swarm.torrent, &swarm.dir("lt"), &[]);
    lt.wait_complete(TRANSFER);
    swarm.assert_intact(&lt.file);
    assert_uploaded(&mut seeder, swarm.torrent.len);
}

/// A zone with a single machine: super-seeding must not wait for the piece to show up at a
/// second peer that does not exist.
#[test]
fn lone_libtorrent_leecher_downloads_from_our_super_seeder() {
    let swarm = Swarm::new(LEN, PIECE);
    let mut seeder = swarm.our_seeder(super_seed());
    let mut lt = Libtorrent::leech(&swarm.torrent, &swarm.dir("lt"), &[]);
    lt.wait_complete(TRANSFER);
    swarm.assert_intact(&lt.file);
    assert_uploaded(&mut seeder, swarm.torrent.len);
}

#[test]
fn aria2c_and_libtorrent_leechers_download_from_our_super_seeder() {
    let swarm = Swarm::new(LEN, PIECE);
    let mut seeder = swarm.our_seeder(super_seed());
    let mut aria2 = Aria2::leech(&swarm.torrent, &swarm.dir("aria2"));
    let mut lt = Libtorrent::leech(&swarm.torrent, &swarm.dir("lt"), &[]);
    lt.wait_complete(TRANSFER);
    aria2.wait_done(TRANSFER);
    swarm.assert_intact(&lt.file);
    swarm.assert_intact(&aria2.file);
    let uploaded = assert_uploaded(&mut seeder, swarm.torrent.len);
    eprintln!(
        "super-seeder uploaded {:.2} x the file to two standard leechers",
        uploaded as f64 / swarm.torrent.len as f64
    );
}

/// An aria2c seeder serves a copy with every fourth piece corrupted (`--bt-seed-unverified`
/// makes it serve without checking); our good seeder is rate-limited so that the bad peer
/// serves a large share. Our leecher must reject the bad pieces, ban the bad peer, and still
/// end with the right bytes.
#[test]
fn corrupt_peer_is_banned_and_the_download_completes() {
    const LEN: u64 = 4 << 20;
    let swarm = Swarm::new(LEN, PIECE);
    let bad_dir = swarm.dir("bad");
    let bad_file = bad_dir.join(&swarm.torrent.name);
    std::fs::copy(swarm.seed_file(), &bad_file).unwrap();
    let corrupted: Vec<u32> = (0..swarm.torrent.pieces).step_by(4).collect();
    corrupt_pieces(&bad_file, swarm.torrent.piece_len, &corrupted);
    let _bad = Aria2::seed(&swarm.torrent, &bad_dir, false);
    let _good = swarm.our_seeder(PeerOptions {
        upload_limit: Some(512 << 10),
        ..seed()
    });
    swarm.tracker.wait_seeders(&swarm.torrent, 2);
    let mut leecher = swarm.our_leecher("ours", PeerOptions::default());
    leecher.wait_event("complete", TRANSFER);
    swarm.assert_intact(&leecher.file);
    leecher.wait_stats(
        "stats with hash_failures >= 1 and banned >= 1 (the corrupting aria2c)",
        PATIENCE,
        |s| s["hash_failures"].as_u64() >= Some(1) && s["banned"].as_u64() >= Some(1),
    );
    let stopped = leecher.stop();
    assert!(
        field(&stopped, "hash_failures") >= 1 && field(&stopped, "banned") >= 1,
        "{stopped}"
    );
}

/// A leecher killed (SIGKILL) half way keeps its verified pieces: restarted on the same file
/// it reports them in `checked` and fetches only the rest.
#[test]
fn killed_leecher_resumes_and_fetches_only_what_is_missing() {
    let swarm = Swarm::new(LEN, PIECE);
    let _seeder = swarm.our_seeder(PeerOptions {
        upload_limit: Some(1 << 20),
        ..seed()
    });
    let state_dir = swarm.dir("state");
    let options = PeerOptions {
        state_dir: Some(state_dir),
        ..PeerOptions::default()
    };
    let mut first = swarm.our_leecher("ours", options.clone());
    let half = swarm.torrent.len / 2;
    let at_kill = first.wait_stats("half the file done", TRANSFER, |s| {
        s["bytes_done"].as_u64() >= Some(half)
    });
    first.kill9();
    let at_kill = field(&at_kill, "bytes_done");
    assert!(
        at_kill < swarm.torrent.len,
        "the leecher finished before it could be killed half way; slow the seeder down"
    );

    let mut second = swarm.our_leecher("ours", options);
    let checked = second.wait_event("checked", TRANSFER);
    let pieces_done = field(&checked, "pieces_done");
    let bytes_done = field(&checked, "bytes_done");
    assert!(
        pieces_done > 0 && bytes_done > 0,
        "after a kill at {at_kill} bytes done the restart kept nothing: {checked}\n{}",
        second.describe()
    );
    let complete = second.wait_event("complete", TRANSFER);
    swarm.assert_intact(&second.file);
    let downloaded = field(&complete, "downloaded");
    let missing = swarm.torrent.len - bytes_done;
    eprintln!(
        "killed at {at_kill} bytes done; the restart kept {pieces_done} pieces ({bytes_done} \
         bytes) and downloaded {downloaded} of the {missing} missing"
    );
    // Pieces in flight when the stats line was printed, or being re-requested, may come twice.
    let slack = 8 * u64::from(swarm.torrent.piece_len);
    assert!(
        downloaded < swarm.torrent.len && downloaded <= missing + slack,
        "the restarted leecher downloaded {downloaded} bytes though only {missing} of {} were \
         missing ({pieces_done} pieces kept)\n{}",
        swarm.torrent.len,
        second.describe()
    );
}

/// `--seed` checks the file first: a file with a bad piece is not served.
#[test]
fn seeding_a_damaged_file_fails_with_a_message() {
    let swarm = Swarm::new(1 << 20, 32 << 10);
    corrupt_pieces(&swarm.seed_file(), swarm.torrent.piece_len, &[3]);
    let mut command = std::process::Command::new(common::peer_bin());
    command
        .arg("--torrent")
        .arg(&swarm.torrent.path)
        .arg("--file")
        .arg(swarm.seed_file())
        .args(["--seed", "--no-tracker", "--listen"])
        .arg(format!("127.0.0.1:{}", common::free_port()));
    let output = common::run_within(command, common::PATIENCE);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("Error: "),
        "seeding a damaged file: {}\nstdout:\n{}\nstderr:\n{stderr}",
        output.status,
        String::from_utf8_lossy(&output.stdout)
    );
}
