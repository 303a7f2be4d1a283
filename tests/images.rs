//! End-to-end tests of the image catalog, the tracker and the seeder: the real server binary,
//! VHDX files made by `qemu-img`, and `aria2c` / `transmission-show` as the standard clients.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Server, image_add, require_tool, wait_for};
use serde_json::Value;

/// A VHDX holding `len` bytes of random data, converted by qemu-img; returns its path.
fn make_vhdx(dir: &Path, name: &str, len: usize) -> PathBuf {
    require_tool("qemu-img", "qemu-utils");
    let raw = dir.join(format!("{name}.raw"));
    let mut data = vec![0u8; len];
    rand::Rng::fill(&mut rand::rng(), &mut data[..]);
    std::fs::write(&raw, &data).unwrap();
    let vhdx = dir.join(name);
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vhdx"])
        .arg(&raw)
        .arg(&vhdx)
        .output()
        .expect("running qemu-img");
    assert!(
        out.status.success(),
        "qemu-img: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(raw).unwrap();
    vhdx
}

/// Adds `file` through the CLI and returns the finished image as the API shows it.
fn add_ready(server: &Server, file: &Path) -> Value {
    let out = image_add(server, file, &[]);
    assert!(
        out.status.success(),
        "image add failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(image["state"], "ready", "{image}");
    image
}

fn download_with_aria2c(server: &Server, image: &Value, dir: &Path) -> PathBuf {
    require_tool("aria2c", "aria2");
    // From this server, which may be a restarted one on other ports.
    let torrent_url = server.url(&format!(
        "/torrents/{}.torrent",
        image["info_hash"].as_str().unwrap()
    ));
    let bytes = reqwest::blocking::Client::new()
        .get(torrent_url)
        .bearer_auth(server.admin_token())
        .send()
        .unwrap();
    assert_eq!(bytes.status(), 200);
    let torrent = dir.join("image.torrent");
    std::fs::write(&torrent, bytes.bytes().unwrap()).unwrap();
    let out_dir = dir.join("aria2");
    let port = common::free_port();
    let status = Command::new("timeout")
        .arg("120")
        .arg("aria2c")
        .args(boottorrent_testkit::ARIA2C_NO_DISCOVERY)
        .args(["--seed-time=0", "--summary-interval=0", "--quiet=true"])
        .arg(format!("--listen-port={port}"))
        .arg(format!("--dir={}", out_dir.display()))
        .arg(&torrent)
        .status()
        .expect("running aria2c");
    assert!(
        status.success(),
        "aria2c failed: {status}\n{}",
        server.log_text()
    );
    out_dir.join(image["name"].as_str().unwrap())
}

#[test]
fn aria2c_fetches_a_vhdx_from_the_servers_tracker_and_seeder() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let vhdx = make_vhdx(dir.path(), "golden.vhdx", 6 << 20);
    let image = add_ready(&server, &vhdx);
    assert_eq!(image["virtual_size"], 6 << 20);
    assert_eq!(image["logical_sector_size"], 512);
    assert_eq!(image["size"], std::fs::metadata(&vhdx).unwrap().len());
    assert!(image["sha256"].as_str().unwrap().len() == 64, "{image}");

    // A standard tool reads our .torrent the same way.
    require_tool("transmission-show", "transmission-cli");
    let torrent = dir.path().join("check.torrent");
    std::fs::write(
        &torrent,
        reqwest::blocking::Client::new()
            .get(image["torrent_url"].as_str().unwrap())
            .bearer_auth(server.admin_token())
            .send()
            .unwrap()
            .bytes()
            .unwrap(),
    )
    .unwrap();
    let shown = Command::new("transmission-show")
        .arg(&torrent)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("Privacy: Private torrent"), "{text}");
    let size = image["size"].as_u64().unwrap();
    let piece = image["piece_size"].as_u64().unwrap();
    assert!(
        text.contains(&format!("Piece Count: {}", size.div_ceil(piece))),
        "{text}"
    );
    assert!(
        text.contains(&image["info_hash"].as_str().unwrap().to_string()),
        "{text}"
    );

    let fetched = download_with_aria2c(&server, &image, dir.path());
    assert_eq!(
        std::fs::read(&fetched).unwrap(),
        std::fs::read(&vhdx).unwrap()
    );
    assert!(server.metric("boottorrent_tracker_announces_total") >= 2);
    let seeded = wait_for("the seeder's upload count", || {
        let v = server.get_json(&format!("/api/v1/images/{}", image["id"].as_str().unwrap()));
        (v["uploaded"].as_u64().unwrap() >= size).then_some(v)
    });
    assert_eq!(seeded["state"], "ready");
}

#[test]
fn bad_files_are_refused_with_the_check_that_failed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let good = make_vhdx(dir.path(), "good.vhdx", 2 << 20);
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.path().join("truncated.vhdx");
    std::fs::write(&truncated, &bytes[..100_000]).unwrap();
    let mut corrupt = bytes.clone();
    // Both headers (64 KiB and 128 KiB) damaged: no valid header is left.
    corrupt[65536 + 100] ^= 0xff;
    corrupt[131072 + 100] ^= 0xff;
    let corrupt_path = dir.path().join("corrupt.vhdx");
    std::fs::write(&corrupt_path, &corrupt).unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "this is not a disk image\n".repeat(100)).unwrap();
    let empty = dir.path().join("empty.vhdx");
    std::fs::write(&empty, b"").unwrap();
    let missing = dir.path().join("missing.vhdx");

    for (file, expect) in [
        (&truncated, "truncated.vhdx"),
        (&corrupt_path, "header"),
        (&text, "vhdxfile"),
        (&empty, "empty"),
        (&missing, "missing.vhdx"),
    ] {
        let out = image_add(&server, file, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} was accepted", file.display());
        assert!(err.contains("HTTP 400"), "{}: {err}", file.display());
        assert!(err.contains(expect), "{}: {err}", file.display());
    }
    let list = server.get_json("/api/v1/images");
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");

    // --raw takes what is not a VHDX.
    let out = image_add(&server, &text, &["--raw"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(image["state"], "ready");
    assert_eq!(image["raw"], true);
}

#[test]
fn the_same_content_is_one_image_and_a_restart_keeps_seeding() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &[]);
    let vhdx = make_vhdx(dir.path(), "a.vhdx", 3 << 20);
    let first = add_ready(&server, &vhdx);
    // The import hashed every piece; the seeder trusts that instead of reading it all again.
    let log = strip_ansi(&server.log_text());
    let check = log
        .lines()
        .find(|l| l.contains("checked existing data") && l.contains("a.vhdx"))
        .unwrap_or_else(|| panic!("the seeder never checked a.vhdx:\n{log}"));
    assert!(check.contains("fast_path=true"), "{check}");
    // The same file again, and a copy of it elsewhere.
    let again = add_ready(&server, &vhdx);
    assert_eq!(again["id"], first["id"]);
    let copy = dir.path().join("copy.vhdx");
    std::fs::copy(&vhdx, &copy).unwrap();
    let out = image_add(&server, &copy, &[]);
    assert!(out.status.success());
    let dup: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dup["state"], "duplicate");
    assert_eq!(dup["same_as"], first["id"]);
    assert_eq!(
        server.get_json("/api/v1/images").as_array().unwrap().len(),
        1
    );

    // kill -9 and restart: the image is still there and served without re-hashing.
    server.kill9();
    let server = server.restart(&[]);
    let id = first["id"].as_str().unwrap();
    wait_for("the image seeding again", || {
        let v = server.get_json(&format!("/api/v1/images/{id}"));
        (v["state"] == "ready").then_some(())
    });
    let fetched = download_with_aria2c(&server, &first, dir.path());
    assert_eq!(
        std::fs::read(&fetched).unwrap(),
        std::fs::read(&vhdx).unwrap()
    );

    // Removing it stops the tracker serving it.
    let r = reqwest::blocking::Client::new()
        .delete(server.url(&format!("/api/v1/images/{id}")))
        .bearer_auth(server.admin_token())
        .send()
        .unwrap();
    assert_eq!(r.status(), 204);
    let torrent = server.get(&format!(
        "/torrents/{}.torrent",
        first["info_hash"].as_str().unwrap()
    ));
    assert_eq!(torrent.status(), 404);
    assert!(vhdx.exists(), "removing an image must leave its file alone");
}

#[test]
fn a_changed_source_file_is_reported_not_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &[]);
    let vhdx = make_vhdx(dir.path(), "c.vhdx", 2 << 20);
    let image = add_ready(&server, &vhdx);
    server.kill9();
    // Someone edits the golden image in place while the server is down.
    let mut bytes = std::fs::read(&vhdx).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0xff;
    bytes[1 << 20] ^= 0xff;
    std::fs::write(&vhdx, &bytes).unwrap();
    let server = server.restart(&[]);
    let id = image["id"].as_str().unwrap();
    let v = wait_for("the change to be reported", || {
        let v = server.get_json(&format!("/api/v1/images/{id}"));
        (v["state"] == "unavailable").then_some(v)
    });
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains("c.vhdx") && error.contains("pieces"),
        "{error}"
    );
}

#[test]
fn an_image_removed_while_it_is_imported_stays_removed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    // Sparse: no disk used, yet minutes of hashing, so the removal lands mid-import.
    let file = dir.path().join("big.raw");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(64 << 30)
        .unwrap();
    let out = image_add(&server, &file, &["--raw", "--no-wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = image["id"].as_str().unwrap().to_owned();
    wait_for("the import to be under way", || {
        let v = server.get_json(&format!("/api/v1/images/{id}"));
        (v["import_done"].as_u64().unwrap_or(0) > 0).then_some(())
    });

    let out = server
        .cli(&["image", "rm", &id])
        .output()
        .expect("running boottorrent image rm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The import stops at once instead of hashing on and writing the image back as ready.
    wait_for("the import to stop", || {
        server
            .log_text()
            .contains("import cancelled: the image was removed")
            .then_some(())
    });
    for _ in 0..5 {
        assert_eq!(server.get_json("/api/v1/images"), serde_json::json!([]));
        assert_eq!(server.get(&format!("/api/v1/images/{id}")).status(), 404);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Added again, it is imported again: nothing of the removed import lingers.
    let out = image_add(&server, &file, &["--raw", "--no-wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["state"], "importing", "{again}");
}

#[test]
fn malformed_tracker_requests_get_bencoded_failures() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let hash = "%01".repeat(20);
    let long = "a".repeat(10_000);
    // The operator's passkey; a private tracker refuses everything without one.
    let tracker = server.get_json("/api/v1/tracker");
    let path_of =
        |url: &str| url[url.find("/announce").or(url.find("/scrape")).unwrap()..].to_owned();
    let a = path_of(tracker["announce"].as_str().unwrap());
    let s = path_of(tracker["scrape"].as_str().unwrap());
    let cases: Vec<(String, u16, &str)> = vec![
        (
            format!("/announce?info_hash={hash}&peer_id=-XX0001-123456789012&port=1&left=0"),
            403,
            "passkey",
        ),
        (
            format!(
                "/announce/pc-1/{}?info_hash={hash}&peer_id=-XX0001-123456789012&port=1&left=0",
                "0".repeat(32)
            ),
            403,
            "passkey",
        ),
        (format!("/scrape?info_hash={hash}"), 403, "passkey"),
        (a.clone(), 400, "info_hash"),
        (
            format!("{a}?info_hash=%01%02&peer_id=-XX0001-123456789012&port=1&left=0"),
            400,
            "info_hash",
        ),
        (
            format!("{a}?info_hash={hash}&peer_id=-XX0001-123456789012&port=0&left=0"),
            400,
            "port",
        ),
        (
            format!("{a}?info_hash={hash}&peer_id=-XX0001-123456789012&port=99999&left=0"),
            400,
            "port",
        ),
        (
            format!("{a}?info_hash={hash}&peer_id=-XX0001-123456789012&port=1&left=x"),
            400,
            "left",
        ),
        (
            format!("{a}?info_hash=%zz{hash}&peer_id=-XX0001-123456789012&port=1&left=0"),
            400,
            "%",
        ),
        (
            format!("{a}?info_hash={hash}&peer_id=-XX0001-123456789012&port=1&left=0&x={long}"),
            400,
            "long",
        ),
        (
            format!("{a}?info_hash={hash}&peer_id=-XX0001-123456789012&port=1&left=0"),
            200,
            "catalog",
        ),
        (s.clone(), 400, "info_hash"),
        (format!("{s}?info_hash=%01"), 400, "info_hash"),
        (format!("{s}?info_hash={hash}"), 200, "catalog"),
    ];
    for (path, status, needle) in &cases {
        let r = reqwest::blocking::get(server.url(path)).unwrap();
        assert_eq!(r.status().as_u16(), *status, "{path}");
        let body = r.bytes().unwrap();
        assert!(body.starts_with(b"d14:failure reason"), "{path}: {body:?}");
        let text = String::from_utf8_lossy(&body).to_lowercase();
        assert!(text.contains(needle), "{path}: {text}");
    }
    assert_eq!(
        server.metric("boottorrent_tracker_failures_total"),
        cases.len() as u64
    );
    // Still serving.
    let health = reqwest::blocking::get(server.url("/healthz")).unwrap();
    assert_eq!(health.status(), 200);
}

/// The server's log without terminal colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... m
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
