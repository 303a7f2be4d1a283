//! The announce flow, handout policy and answer forms, with answers read back by the swarm
//! crate's client-side parser.

mod tracker_common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use boottorrent_bt::bencode::{self, Value};
use boottorrent_tracker::swarm::{NoLocality, Tracker, TrackerConfig};
use tracker_common::*;

fn addrs(peers: &[SocketAddr]) -> HashSet<SocketAddr> {
    peers.iter().copied().collect()
}

#[test]
fn tracker_is_shareable() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tracker>();
}

#[test]
fn started_peers_are_listed_to_others_and_stopped_ones_removed() {
    let tracker = tracker_with(&[hash(1)]);
    let now = Instant::now();
    let first = join(&tracker, &NoLocality, hash(1), "10.0.0.1:6881", 100, now);
    assert!(first.peers.is_empty(), "a peer is never handed itself");
    assert_eq!((first.complete, first.incomplete), (Some(0), Some(1)));

    let second = join(&tracker, &NoLocality, hash(1), "10.0.0.2:6881", 100, now);
    assert_eq!(second.peers, vec![sock("10.0.0.1:6881")]);
    assert_eq!((second.complete, second.incomplete), (Some(0), Some(2)));

    // A seeder that only ever sends `started` with left=0 counts as complete.
    let seeder = join(&tracker, &NoLocality, hash(1), "10.0.0.3:6881", 0, now);
    assert_eq!(
        addrs(&seeder.peers),
        addrs(&[sock("10.0.0.1:6881"), sock("10.0.0.2:6881")])
    );
    assert_eq!((seeder.complete, seeder.incomplete), (Some(1), Some(2)));

    let stop = announce_query(hash(1), peer_id(6881), 6881, 100) + "&event=stopped";
    let stopped = ok(&tracker.announce(&stop, ip("10.0.0.1"), &NoLocality, now));
    assert!(stopped.peers.is_empty(), "a leaving peer needs no peers");
    assert_eq!((stopped.complete, stopped.incomplete), (Some(1), Some(1)));
    let again = join(&tracker, &NoLocality, hash(1), "10.0.0.2:6881", 100, now);
    assert_eq!(again.peers, vec![sock("10.0.0.3:6881")]);

    let counters = tracker.counters();
    assert_eq!((counters.announces, counters.failures), (5, 0));
}

#[test]
fn every_answer_has_intervals_from_config() {
    let tracker = Tracker::new(TrackerConfig {
        interval_secs: 90,
        min_interval_secs: 45,
        ..TrackerConfig::default()
    });
    tracker.allow(hash(1));
    let answer = tracker.announce(
        &announce_query(hash(1), peer_id(1), 6881, 0),
        ip("10.0.0.1"),
        &NoLocality,
        Instant::now(),
    );
    assert_eq!(int(&answer, "interval"), 90);
    assert_eq!(int(&answer, "min interval"), 45);
    let parsed = ok(&answer);
    assert_eq!(parsed.interval, Duration::from_secs(90));
    assert_eq!(parsed.min_interval, Some(Duration::from_secs(45)));
}

#[test]
fn peers_expire_after_two_intervals() {
    let tracker = tracker_with(&[hash(1)]); // interval 60 s
    let t0 = Instant::now();
    join(&tracker, &NoLocality, hash(1), "10.0.0.1:6881", 0, t0);
    join(
        &tracker,
        &NoLocality,
        hash(1),
        "10.0.0.2:6881",
        5,
        t0 + Duration::from_secs(60),
    );

    // Exactly two intervals after its announce, the first peer is still there.
    let at_limit = join(
        &tracker,
        &NoLocality,
        hash(1),
        "10.0.0.3:6881",
        5,
        t0 + Duration::from_secs(120),
    );
    assert!(at_limit.peers.contains(&sock("10.0.0.1:6881")));
    assert_eq!((at_limit.complete, at_limit.incomplete), (Some(1), Some(2)));

    // One second later it is gone from handouts and counts; the others are not.
    let after = join(
        &tracker,
        &NoLocality,
        hash(1),
        "10.0.0.4:6881",
        5,
        t0 + Duration::from_secs(121),
    );
    assert_eq!(
        addrs(&after.peers),
        addrs(&[sock("10.0.0.2:6881"), sock("10.0.0.3:6881")])
    );
    assert_eq!((after.complete, after.incomplete), (Some(0), Some(3)));

    // A re-announce keeps a peer alive; `expire` drops the silent ones everywhere.
    let query = announce_query(hash(1), peer_id(6881), 6881, 5);
    ok(&tracker.announce(
        &query,
        ip("10.0.0.4"),
        &NoLocality,
        t0 + Duration::from_secs(240),
    ));
    tracker.expire(t0 + Duration::from_secs(242));
    let stats = tracker.swarm_stats(hash(1)).unwrap();
    assert_eq!((stats.complete, stats.incomplete), (0, 1));
}

#[test]
fn completed_counts_as_a_download() {
    let tracker = tracker_with(&[hash(1)]);
    let now = Instant::now();
    join(&tracker, &NoLocality, hash(1), "10.0.0.1:6881", 100, now);
    let done = announce_query(hash(1), peer_id(6881), 6881, 0) + "&event=completed";
    let answer = ok(&tracker.announce(&done, ip("10.0.0.1"), &NoLocality, now));
    assert_eq!((answer.complete, answer.incomplete), (Some(1), Some(0)));
    // A second peer finishes without ever sending `completed`.
    join(&tracker, &NoLocality, hash(1), "10.0.0.2:6881", 100, now);
    let periodic = announce_query(hash(1), peer_id(6881), 6881, 0);
    ok(&tracker.announce(&periodic, ip("10.0.0.2"), &NoLocality, now));
    // A seeder joining is not a download.
    join(&tracker, &NoLocality, hash(1), "10.0.0.3:6881", 0, now);
    let stats = tracker.swarm_stats(hash(1)).unwrap();
    assert_eq!(
        (stats.complete, stats.incomplete, stats.downloaded),
        (3, 0, 2)
    );
}

#[test]
fn peers_are_keyed_by_address_and_the_ip_parameter_is_ignored() {
    let tracker = tracker_with(&[hash(1)]);
    let now = Instant::now();
    // The peer claims to be 192.0.2.1; it is recorded where it really is.
    let query = announce_query(hash(1), peer_id(1), 6881, 5) + "&ip=192.0.2.1&ipv4=192.0.2.1";
    ok(&tracker.announce(&query, ip("10.0.0.1"), &NoLocality, now));
    // Same ip:port, new peer id (a restarted client): replaces the old entry.
    let query = announce_query(hash(1), peer_id(2), 6881, 5);
    ok(&tracker.announce(&query, ip("10.0.0.1"), &NoLocality, now));
    let query = announce_query(hash(1), peer_id(3), 7000, 5) + "&compact=0";
    let answer = tracker.announce(&query, ip("10.0.0.9"), &NoLocality, now);
    assert_eq!(ok(&answer).peers, vec![sock("10.0.0.1:6881")]);
    assert_eq!(ok(&answer).incomplete, Some(2));
    let body = bencode::decode(&answer.body).unwrap();
    let peers = body
        .as_dict()
        .unwrap()
        .get(b"peers")
        .unwrap()
        .as_list()
        .unwrap();
    let entry = peers[0].as_dict().unwrap();
    assert_eq!(
        entry.get(b"peer id").unwrap().as_bytes().unwrap(),
        peer_id(2)
    );
}

#[test]
fn ipv4_mapped_remotes_are_ipv4() {
    let tracker = tracker_with(&[hash(1)]);
    let now = Instant::now();
    join(&tracker, &NoLocality, hash(1), "10.0.0.1:6881", 5, now);
    let query = announce_query(hash(1), peer_id(2), 6881, 5);
    let answer = tracker.announce(&query, ip("::ffff:10.0.0.2"), &NoLocality, now);
    let body = bencode::decode(&answer.body).unwrap();
    assert!(body.as_dict().unwrap().get(b"peers6").is_none());
    assert_eq!(ok(&answer).peers, vec![sock("10.0.0.1:6881")]);
    let back = join(&tracker, &NoLocality, hash(1), "10.0.0.1:6881", 5, now);
    assert_eq!(back.peers, vec![sock("10.0.0.2:6881")]);
}

#[test]
fn compact_dict_and_peers6_forms() {
    let tracker = tracker_with(&[hash(1)]);
    let now = Instant::now();
    join(&tracker, &NoLocality, hash(1), "10.0.0.1:6881", 5, now);
    join(&tracker, &NoLocality, hash(1), "[fd00::1]:6881", 5, now);

    // IPv4, compact: 6 bytes per peer in `peers`, no `peers6`.
    let query = announce_query(hash(1), peer_id(9), 7000, 5);
    let answer = tracker.announce(&query, ip("10.0.0.9"), &NoLocality, now);
    let body = bencode::decode(&answer.body).unwrap();
    assert_canonical(&body);
    let dict = body.as_dict().unwrap();
    assert_eq!(
        dict.get(b"peers").unwrap().as_bytes().unwrap(),
        [10, 0, 0, 1, 0x1a, 0xe1]
    );
    assert!(dict.get(b"peers6").is_none());

    // IPv6, compact: 18 bytes per peer in `peers6`, and an empty `peers`.
    let answer = tracker.announce(&query, ip("fd00::9"), &NoLocality, now);
    let body = bencode::decode(&answer.body).unwrap();
    assert_canonical(&body);
    let dict = body.as_dict().unwrap();
    assert_eq!(dict.get(b"peers").unwrap().as_bytes().unwrap(), b"");
    let mut expected = ip("fd00::1")
        .to_string()
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets()
        .to_vec();
    expected.extend_from_slice(&6881u16.to_be_bytes());
    assert_eq!(dict.get(b"peers6").unwrap().as_bytes().unwrap(), expected);
    assert_eq!(ok(&answer).peers, vec![sock("[fd00::1]:6881")]);

    // Dictionary form, on both families.
    for (remote, peer) in [("10.0.0.9", "10.0.0.1"), ("fd00::9", "fd00::1")] {
        let answer = tracker.announce(&format!("{query}&compact=0"), ip(remote), &NoLocality, now);
        let body = bencode::decode(&answer.body).unwrap();
        assert_canonical(&body);
        let peers = body
            .as_dict()
            .unwrap()
            .get(b"peers")
            .unwrap()
            .as_list()
            .unwrap()
            .to_vec();
        assert_eq!(peers.len(), 1);
        let entry = peers[0].as_dict().unwrap();
        assert_eq!(entry.get(b"ip"), Some(&Value::Bytes(peer.as_bytes())));
        assert_eq!(entry.get(b"port"), Some(&Value::Int(6881)));
        assert_eq!(
            entry.get(b"peer id").unwrap().as_bytes().unwrap(),
            peer_id_of(SocketAddr::new(ip(peer), 6881))
        );
        assert_eq!(ok(&answer).peers, vec![SocketAddr::new(ip(peer), 6881)]);
    }

    // `no_peer_id=1` leaves the ids out.
    let answer = tracker.announce(
        &format!("{query}&compact=0&no_peer_id=1"),
        ip("10.0.0.9"),
        &NoLocality,
        now,
    );
    let body = bencode::decode(&answer.body).unwrap();
    let peers = body
        .as_dict()
        .unwrap()
        .get(b"peers")
        .unwrap()
        .as_list()
        .unwrap()
        .to_vec();
    assert!(peers[0].as_dict().unwrap().get(b"peer id").is_none());
}

#[test]
fn numwant_has_a_default_and_a_cap() {
    let tracker = tracker_with(&[hash(1)]);
    let now = Instant::now();
    for n in 0..250u32 {
        let query = announce_query(hash(1), peer_id(n), 6881, 5) + "&numwant=0";
        let remote = ip(&format!("10.0.{}.{}", n / 200, n % 200 + 1));
        assert!(
            ok(&tracker.announce(&query, remote, &NoLocality, now))
                .peers
                .is_empty()
        );
    }
    let base = announce_query(hash(1), peer_id(999), 7000, 5);
    let count = |extra: &str| {
        let answer = tracker.announce(&format!("{base}{extra}"), ip("10.9.9.9"), &NoLocality, now);
        let peers = ok(&answer).peers;
        assert_eq!(addrs(&peers).len(), peers.len(), "duplicates in a handout");
        peers.len()
    };
    assert_eq!(count(""), 50);
    assert_eq!(count("&numwant=7"), 7);
    assert_eq!(count("&numwant=200"), 200);
    assert_eq!(count("&numwant=1000"), 200);
    assert_eq!(count("&numwant=99999999999999"), 200);
    assert_eq!(count("&numwant=0"), 0);
}

#[test]
fn handout_order_zone_then_incomplete_then_server_seeder_last() {
    let seeder = sock("10.9.0.1:6881");
    let lab = TestLocality {
        zones: vec![("10.1.", "lab-a"), ("10.2.", "lab-b"), ("10.9.", "lab-a")],
        seeder: Some(seeder),
    };
    let tracker = tracker_with(&[hash(1)]);
    let now = Instant::now();
    // Announced in an order unrelated to the expected handout order.
    join(&tracker, &lab, hash(1), "10.9.0.1:6881", 0, now); // the server's seeder, zone lab-a
    let far_complete = ["10.2.0.1:6881", "10.2.0.2:6881"];
    let far_incomplete = ["10.2.0.3:6881", "10.2.0.4:6881", "10.2.0.5:6881"];
    let near_complete = ["10.1.5.1:6881", "10.1.6.1:6881"];
    let near_incomplete = ["10.1.7.1:6881", "10.1.8.1:6881", "10.1.9.1:6881"];
    for peer in far_complete.iter().chain(&near_complete) {
        join(&tracker, &lab, hash(1), peer, 0, now);
    }
    for peer in far_incomplete.iter().chain(&near_incomplete) {
        join(&tracker, &lab, hash(1), peer, 7, now);
    }

    let groups: [&[&str]; 5] = [
        &near_incomplete,
        &near_complete,
        &far_incomplete,
        &far_complete,
        &["10.9.0.1:6881"],
    ];
    let mut first_orders = HashSet::new();
    for _ in 0..50 {
        let query = announce_query(hash(1), peer_id(1), 7000, 100);
        let peers = ok(&tracker.announce(&query, ip("10.1.0.1"), &lab, now)).peers;
        assert_eq!(peers.len(), 11);
        let mut rest = &peers[..];
        for group in groups {
            let (head, tail) = rest.split_at(group.len());
            assert_eq!(
                addrs(head),
                group.iter().map(|p| sock(p)).collect(),
                "{peers:?}"
            );
            rest = tail;
        }
        first_orders.insert(peers[..3].to_vec());
        // A cut falls inside a group and keeps the earlier groups whole.
        let query = announce_query(hash(1), peer_id(1), 7000, 100) + "&numwant=4";
        let cut = ok(&tracker.announce(&query, ip("10.1.0.1"), &lab, now)).peers;
        assert_eq!(
            addrs(&cut[..3]),
            near_incomplete.iter().map(|p| sock(p)).collect()
        );
        assert!(near_complete.iter().any(|p| sock(p) == cut[3]));
    }
    assert!(first_orders.len() > 1, "groups are not shuffled");

    // A seeder gets only leechers (the six above and the 10.1.0.1 requester): seeders have
    // nothing to give each other.
    let query = announce_query(hash(1), peer_id(2), 7001, 0);
    let peers = ok(&tracker.announce(&query, ip("10.2.0.9"), &lab, now)).peers;
    assert_eq!(peers.len(), 7);
    assert_eq!(
        addrs(&peers[..3]),
        far_incomplete.iter().map(|p| sock(p)).collect()
    );
}

#[test]
fn without_zones_the_subnet_decides() {
    let tracker = tracker_with(&[hash(1)]);
    let now = Instant::now();
    for peer in ["10.0.1.1:1", "10.0.1.2:1", "10.0.2.1:1", "10.0.3.1:1"] {
        join(&tracker, &NoLocality, hash(1), peer, 5, now);
    }
    for peer in [
        "[fd00:0:0:1::1]:1",
        "[fd00:0:0:2::1]:1",
        "[fd00:0:0:1::2]:1",
    ] {
        join(&tracker, &NoLocality, hash(1), peer, 5, now);
    }
    for _ in 0..20 {
        let query = announce_query(hash(1), peer_id(7), 7000, 5);
        let peers = ok(&tracker.announce(&query, ip("10.0.1.200"), &NoLocality, now)).peers;
        assert_eq!(
            addrs(&peers[..2]),
            addrs(&[sock("10.0.1.1:1"), sock("10.0.1.2:1")])
        );
        assert_eq!(
            peers.len(),
            4,
            "IPv6 peers are not handed to an IPv4 client"
        );
        let peers = ok(&tracker.announce(&query, ip("fd00:0:0:1::9"), &NoLocality, now)).peers;
        assert_eq!(
            addrs(&peers[..2]),
            addrs(&[sock("[fd00:0:0:1::1]:1"), sock("[fd00:0:0:1::2]:1")])
        );
        assert_eq!(peers.len(), 3);
    }
}

#[test]
fn scrape_reports_several_torrents_keyed_by_raw_hash() {
    let tracker = tracker_with(&[hash(1), hash(2), hash(3)]);
    let now = Instant::now();
    join(&tracker, &NoLocality, hash(1), "10.0.0.1:1", 0, now);
    join(&tracker, &NoLocality, hash(1), "10.0.0.2:1", 5, now);
    join(&tracker, &NoLocality, hash(2), "10.0.0.3:1", 5, now);
    let done = announce_query(hash(2), peer_id(1), 1, 0) + "&event=completed";
    ok(&tracker.announce(&done, ip("10.0.0.3"), &NoLocality, now));

    // Hash 9 is not catalogued and is left out; hash 2 is asked for twice.
    let query: String = [hash(2), hash(9), hash(1), hash(3), hash(2)]
        .iter()
        .map(|h| format!("info_hash={}&", enc(h)))
        .collect();
    let answer = tracker.scrape(&query, now);
    assert_eq!(answer.status, 200);
    let body = bencode::decode(&answer.body).unwrap();
    assert_canonical(&body);
    let files = body
        .as_dict()
        .unwrap()
        .get(b"files")
        .unwrap()
        .as_dict()
        .unwrap()
        .clone();
    assert_eq!(files.len(), 3);
    let stats = |h: [u8; 20]| {
        let entry = files.get(&h).unwrap().as_dict().unwrap();
        let get = |k: &[u8]| entry.get(k).unwrap().as_int().unwrap();
        (get(b"complete"), get(b"incomplete"), get(b"downloaded"))
    };
    assert_eq!(stats(hash(1)), (1, 1, 0));
    assert_eq!(stats(hash(2)), (1, 0, 1));
    assert_eq!(stats(hash(3)), (0, 0, 0));

    // Scrape applies expiry too.
    let later = tracker.scrape(&query, now + Duration::from_secs(121));
    let body = bencode::decode(&later.body).unwrap();
    let files = body
        .as_dict()
        .unwrap()
        .get(b"files")
        .unwrap()
        .as_dict()
        .unwrap()
        .clone();
    let entry = files.get(&hash(1)).unwrap().as_dict().unwrap();
    assert_eq!(entry.get(b"complete"), Some(&Value::Int(0)));
    assert_eq!(tracker.counters().scrapes, 2);
}

#[test]
fn concurrent_announces_on_many_torrents() {
    let hashes: Vec<[u8; 20]> = (0..32).map(hash).collect();
    let tracker = tracker_with(&hashes);
    let now = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..4u32 {
            let tracker = &tracker;
            let hashes = &hashes;
            scope.spawn(move || {
                for n in 0..500u32 {
                    let h = hashes[(n % 32) as usize];
                    let query = announce_query(h, peer_id(n), (t * 1000 + n + 1) as u16, 5);
                    ok(&tracker.announce(&query, ip("10.0.0.1"), &NoLocality, now));
                }
            });
        }
    });
    let total: u32 = hashes
        .iter()
        .map(|h| tracker.swarm_stats(*h).unwrap().incomplete)
        .sum();
    assert_eq!(total, 2000);
    assert_eq!(tracker.counters().announces, 2000);
}
