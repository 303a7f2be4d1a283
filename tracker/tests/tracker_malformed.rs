//! Malformed and refused requests: each gets a bencoded `failure reason` with the right status,
//! and random input never panics.

mod tracker_common;

use std::time::Instant;

use boottorrent_bt::bencode;
use boottorrent_tracker::swarm::{NoLocality, Tracker, TrackerConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tracker_common::*;

const ID: &str = "-TT0001-000000000001";

fn valid() -> String {
    format!("info_hash={}&peer_id={ID}&port=6881&left=10", enc(&hash(1)))
}

#[test]
fn malformed_announces_get_400_with_a_reason() {
    let long = format!("{}&pad={}", valid(), "x".repeat(4096));
    let table: Vec<(String, &str)> = vec![
        (String::new(), "info_hash is missing"),
        (valid().replace(&enc(&hash(1)), ""), "info_hash is 0 bytes"),
        (
            valid().replace(&enc(&hash(1)), &enc(&[1; 19])),
            "info_hash is 19 bytes after %-decoding, expected 20",
        ),
        (
            valid().replace(&enc(&hash(1)), &enc(&[1; 21])),
            "info_hash is 21 bytes",
        ),
        (
            valid().replace("info_hash=", "x=1&y=2&z="),
            "info_hash is missing",
        ),
        (valid().replace(ID, "short"), "peer_id is 5 bytes"),
        (
            valid().replace("&peer_id=", "&peer=").replace(ID, "x"),
            "peer_id is missing",
        ),
        (valid().replace("&port=6881", ""), "port is missing"),
        (
            valid().replace("port=6881", "port=0"),
            "port 0 is out of range 1-65535",
        ),
        (
            valid().replace("port=6881", "port=65536"),
            "port 65536 is out of range 1-65535",
        ),
        (
            valid().replace("port=6881", "port=-1"),
            "port '-1' is not a non-negative integer",
        ),
        (
            valid().replace("port=6881", "port="),
            "port '' is not a non-negative integer",
        ),
        (
            valid().replace("port=6881", "port=68 81"),
            "port '68 81' is not",
        ),
        (
            valid().replace("port=6881", "port=0x1ae1"),
            "port '0x1ae1' is not",
        ),
        (valid().replace("&left=10", ""), "left is missing"),
        (
            valid().replace("left=10", "left=ten"),
            "left 'ten' is not a non-negative integer",
        ),
        (valid().replace("left=10", "left=1.5"), "left '1.5' is not"),
        (
            valid().replace("left=10", "left=18446744073709551616"),
            "left 18446744073709551616 is out of range",
        ),
        (format!("{}&uploaded=-5", valid()), "uploaded '-5' is not"),
        (format!("{}&downloaded=x", valid()), "downloaded 'x' is not"),
        (format!("{}&numwant=lots", valid()), "numwant 'lots' is not"),
        (
            format!("{}&event=finished", valid()),
            "event 'finished' is not one of",
        ),
        (
            format!("{}&compact=yes", valid()),
            "compact 'yes' is not 0 or 1",
        ),
        (
            format!("{}&no_peer_id=2", valid()),
            "no_peer_id '2' is not 0 or 1",
        ),
        (
            format!("{}&port=6882", valid()),
            "port is given more than once",
        ),
        (
            format!("{}&info_hash={}", valid(), enc(&hash(2))),
            "info_hash is given more than once",
        ),
        (valid().replace("%01", "%0"), "info_hash has a bad %-escape"),
        (
            valid().replace("%01", "%zz"),
            "info_hash has a bad %-escape \"%zz\"",
        ),
        (format!("{}&key=%", valid()), "key has a bad %-escape \"%\""),
        (format!("{}&%g0=1", valid()), "%g0 has a bad %-escape"),
        (
            valid().replace("left=10", "left=%3"),
            "left has a bad %-escape \"%3\"",
        ),
        (long, "bytes, longer than the limit of 4096 bytes"),
    ];
    let tracker = tracker_with(&[hash(1)]);
    let now = Instant::now();
    for (i, (query, expected)) in table.iter().enumerate() {
        let answer = tracker.announce(query, ip("10.0.0.1"), &NoLocality, now);
        let shown = &query[..query.len().min(200)];
        assert_eq!(answer.status, 400, "{shown}");
        let reason = failure(&answer);
        assert!(
            reason.contains(expected),
            "{shown}: {reason:?} lacks {expected:?}"
        );
        // The tracker keeps serving after each one.
        ok(&tracker.announce(&valid(), ip("10.0.0.1"), &NoLocality, now));
        assert_eq!(tracker.counters().failures, i as u64 + 1);
    }
    assert_eq!(tracker.counters().announces, 2 * table.len() as u64);
}

#[test]
fn malformed_scrapes_get_400_with_a_reason() {
    let table: Vec<(String, &str)> = vec![
        (String::new(), "info_hash is missing"),
        ("peer_id=x".into(), "info_hash is missing"),
        (
            format!("info_hash={}", enc(&[7; 19])),
            "info_hash is 19 bytes",
        ),
        (
            format!("info_hash={}&info_hash=abc", enc(&hash(1))),
            "info_hash is 3 bytes",
        ),
        (
            format!("info_hash={}%", enc(&[7; 19])),
            "info_hash has a bad %-escape \"%\"",
        ),
        (
            format!("info_hash={}&x=%q1", enc(&hash(1))),
            "x has a bad %-escape",
        ),
        (
            format!("info_hash={}&pad={}", enc(&hash(1)), "y".repeat(5000)),
            "longer than the limit of 4096 bytes",
        ),
    ];
    let tracker = tracker_with(&[hash(1)]);
    for (query, expected) in &table {
        let answer = tracker.scrape(query, Instant::now());
        let shown = &query[..query.len().min(200)];
        assert_eq!(answer.status, 400, "{shown}");
        let reason = failure(&answer);
        assert!(
            reason.contains(expected),
            "{shown}: {reason:?} lacks {expected:?}"
        );
    }
    let counters = tracker.counters();
    assert_eq!(counters.scrapes, table.len() as u64);
    assert_eq!(counters.failures, table.len() as u64);
}

#[test]
fn unknown_torrents_are_refused_with_200() {
    let tracker = tracker_with(&[hash(1)]);
    let now = Instant::now();
    let query = announce_query(hash(2), peer_id(1), 6881, 0);
    let answer = tracker.announce(&query, ip("10.0.0.1"), &NoLocality, now);
    assert_eq!(answer.status, 200);
    assert_eq!(failure(&answer), "torrent not in this server's catalog");

    let answer = tracker.scrape(&format!("info_hash={}", enc(&hash(2))), now);
    assert_eq!(answer.status, 200);
    assert_eq!(failure(&answer), "torrent not in this server's catalog");

    // A removed image is refused too, and its peers are gone when it comes back.
    ok(&tracker.announce(
        &announce_query(hash(1), peer_id(1), 6881, 5),
        ip("10.0.0.1"),
        &NoLocality,
        now,
    ));
    tracker.disallow(hash(1));
    assert!(!tracker.is_allowed(hash(1)));
    assert_eq!(tracker.swarm_stats(hash(1)), None);
    let answer = tracker.announce(
        &announce_query(hash(1), peer_id(2), 6882, 5),
        ip("10.0.0.2"),
        &NoLocality,
        now,
    );
    assert_eq!(failure(&answer), "torrent not in this server's catalog");
    tracker.allow(hash(1));
    assert_eq!(tracker.swarm_stats(hash(1)).unwrap().incomplete, 0);
    assert_eq!(tracker.counters().failures, 3);
}

#[test]
fn one_address_cannot_fill_a_torrents_peer_list() {
    let tracker = tracker_with(&[hash(1)]);
    let share = tracker.config().max_peers_per_address;
    let now = Instant::now();
    let attacker = ip("10.66.0.1");
    let mut refused = 0;
    // The attack: 12,000 announces with random peer ids and ports from one host.
    for n in 0..12_000u32 {
        let query = announce_query(hash(1), peer_id(n), (n % 60_000 + 1) as u16, 1);
        let answer = tracker.announce(&(query + "&numwant=0"), attacker, &NoLocality, now);
        assert_eq!(answer.status, 200);
        if answer.body.windows(14).any(|w| w == b"failure reason") {
            assert!(
                failure(&answer).contains("10.66.0.1 already has"),
                "{}",
                failure(&answer)
            );
            refused += 1;
        }
    }
    assert_eq!(refused, 12_000 - share);
    assert_eq!(
        tracker.swarm_stats(hash(1)).unwrap().incomplete,
        share as u32
    );
    // A real machine still joins and is handed the attacker's few peers.
    let real = ok(&tracker.announce(
        &announce_query(hash(1), peer_id(99_999), 6881, 1),
        ip("10.1.0.7"),
        &NoLocality,
        now,
    ));
    assert_eq!(real.incomplete, Some(share as u32 + 1));
}

#[test]
fn a_full_swarm_refuses_new_peers_but_keeps_serving_known_ones() {
    let tracker = tracker_with(&[hash(1)]);
    let now = Instant::now();
    let limit = boottorrent_tracker::swarm::MAX_PEERS_PER_TORRENT;
    for n in 0..limit {
        let remote = ip(&format!("10.{}.{}.1", n / 250, n % 250));
        let answer = tracker.announce(
            &(announce_query(hash(1), peer_id(n as u32), 6881, 1) + "&numwant=0"),
            remote,
            &NoLocality,
            now,
        );
        assert_eq!(answer.status, 200);
    }
    assert_eq!(
        tracker.swarm_stats(hash(1)).unwrap().incomplete,
        limit as u32
    );
    let newcomer = tracker.announce(
        &announce_query(hash(1), peer_id(99_999), 6881, 1),
        ip("10.200.0.1"),
        &NoLocality,
        now,
    );
    assert_eq!(newcomer.status, 200);
    assert!(failure(&newcomer).contains("10000 peers"));
    // A known peer re-announcing is not new.
    ok(&tracker.announce(
        &announce_query(hash(1), peer_id(0), 6881, 0),
        ip("10.0.0.1"),
        &NoLocality,
        now,
    ));
    let stats = tracker.swarm_stats(hash(1)).unwrap();
    assert_eq!((stats.complete, stats.incomplete), (1, limit as u32 - 1));
}

/// Pieces that random queries are stitched from: real parameter names and values, broken
/// escapes, separators and junk, so the fuzzing reaches deep into the parser rather than
/// failing at the first byte.
const PIECES: &[&str] = &[
    "info_hash=",
    "peer_id=",
    "port=",
    "left=",
    "uploaded=",
    "downloaded=",
    "event=",
    "numwant=",
    "compact=",
    "no_peer_id=",
    "ip=",
    "&",
    "=",
    "%",
    "%0",
    "%zz",
    "%41",
    "%ff",
    "%00",
    "+",
    "0",
    "1",
    "6881",
    "65535",
    "65536",
    "-1",
    "99999999999999999999",
    "started",
    "stopped",
    "completed",
    "paused",
    "-TT0001-000000000001",
    "aaaaaaaaaaaaaaaaaaaa",
    "é",
    "\u{0}",
    " ",
    "?",
    "#",
    ";",
];

fn random_query(rng: &mut StdRng, valid_hash: &str) -> String {
    let mut query = String::new();
    for _ in 0..rng.random_range(0..24) {
        match rng.random_range(0..10) {
            0 => query.push_str(valid_hash),
            1 => query.push(char::from(rng.random_range(0x20u8..0x7f))),
            2 => {
                let ch = rng.random::<char>();
                query.push(ch);
            }
            _ => query.push_str(PIECES[rng.random_range(0..PIECES.len())]),
        }
    }
    query
}

#[test]
fn random_queries_never_panic_and_always_get_bencode() {
    let config = TrackerConfig {
        max_query_len: 256,
        ..TrackerConfig::default()
    };
    let tracker = Tracker::new(config);
    tracker.allow(hash(1));
    let valid_hash = format!("info_hash={}", enc(&hash(1)));
    let mut rng = StdRng::seed_from_u64(0x7ac4e7);
    let start = Instant::now();
    let mut successes = 0;
    for i in 0..10_000u32 {
        let mut query = random_query(&mut rng, &valid_hash);
        if i % 4 == 0 {
            // A quarter start from a valid announce, so mutations hit the swarm logic too.
            query = announce_query(
                hash(1),
                peer_id(i),
                (i % 60_000 + 1) as u16,
                u64::from(i % 3),
            ) + "&"
                + &query;
        }
        let remote = if i % 2 == 0 {
            ip(&format!("10.0.{}.{}", i % 7, i % 250))
        } else {
            ip(&format!("fd00::{:x}", i % 300))
        };
        let now = start + std::time::Duration::from_secs(u64::from(i));
        for answer in [
            tracker.announce(&query, remote, &NoLocality, now),
            tracker.scrape(&query, now),
        ] {
            assert!(answer.status == 200 || answer.status == 400, "{query:?}");
            let value = bencode::decode(&answer.body)
                .unwrap_or_else(|e| panic!("{query:?}: body is not bencode: {e}"));
            let dict = value.as_dict().expect("a dictionary");
            match dict.get(b"failure reason") {
                None => successes += 1,
                // The encoder's fallback would mean one of our dictionaries is malformed.
                Some(reason) => assert_ne!(
                    reason.as_bytes(),
                    Some(&b"tracker failed to encode answer"[..]),
                    "{query:?}"
                ),
            }
        }
    }
    let counters = tracker.counters();
    assert_eq!((counters.announces, counters.scrapes), (10_000, 10_000));
    assert!(
        successes > 100,
        "only {successes} successes: the fuzzing is too shallow"
    );
}
