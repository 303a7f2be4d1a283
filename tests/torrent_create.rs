//! `boottorrent torrent create`, end to end: the real binary writes a torrent, and standard tools
//! (`transmission-show`, python libtorrent) read it or build their own from the same file and
//! must agree with it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use boottorrent_bt::metainfo::Metainfo;
use rand::RngCore;

/// libtorrent's own v1 torrent of the same file, name, piece size and private flag; prints its
/// info hash. /usr/bin/python3 because a pyenv `python3` shim may lack the Debian module.
const LIBTORRENT_CREATE: &str = r#"
import os, sys
import libtorrent as lt
path, piece_len, private = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
fs = lt.file_storage()
lt.add_files(fs, path)
t = lt.create_torrent(fs, piece_len, flags=lt.create_torrent.v1_only)
t.set_priv(private)
lt.set_piece_hashes(t, os.path.dirname(path))
print(lt.torrent_info(lt.bencode(t.generate())).info_hashes().v1)
"#;

fn boottorrent(args: &[&str], configure: impl FnOnce(&mut Command)) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_boottorrent"));
    command.args(args).env_remove("BOOTTORRENT_PUBLIC_URL");
    configure(&mut command);
    command.output().expect("running boottorrent")
}

fn create_ok(args: &[&str], configure: impl FnOnce(&mut Command)) -> String {
    let out = boottorrent(args, configure);
    assert!(
        out.status.success(),
        "boottorrent {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn random_file(dir: &Path, name: &str, len: usize) -> PathBuf {
    let mut bytes = vec![0u8; len];
    rand::rng().fill_bytes(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The value of `key: value` in the command's summary or transmission-show's report.
fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|line| line.trim().strip_prefix(key)?.trim().strip_prefix(':'))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key:?} in:\n{text}"))
}

/// transmission-show prints sizes rounded ("256.0 KiB", "3.16 MB"): the value in bytes and the
/// unit's size, so callers can compare with the rounding in mind.
fn parse_size(text: &str) -> (f64, f64) {
    let (number, unit) = text.split_once(' ').unwrap();
    let unit_bytes = match unit {
        "B" => 1.0,
        "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        other => panic!("unknown unit {other:?} in {text:?}"),
    };
    (number.parse::<f64>().unwrap() * unit_bytes, unit_bytes)
}

fn transmission_show(torrent: &Path) -> String {
    common::require_tool("transmission-show", "transmission-cli");
    let out = Command::new("transmission-show")
        .arg(torrent)
        .output()
        .unwrap();
    assert!(out.status.success(), "transmission-show failed: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn libtorrent_info_hash(file: &Path, piece_len: u32, private: bool) -> String {
    let out = Command::new("/usr/bin/python3")
        .args(["-c", LIBTORRENT_CREATE])
        .arg(file)
        .arg(piece_len.to_string())
        .arg(if private { "1" } else { "0" })
        .output()
        .expect("/usr/bin/python3 is not installed; run scripts/test, which installs it");
    assert!(
        out.status.success(),
        "python libtorrent failed (scripts/test installs python3-libtorrent): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn standard_tools_agree_with_our_torrents() {
    let dir = tempfile::tempdir().unwrap();
    // Not a multiple of any piece size, so the short last piece is covered too.
    let len = 3 * 1024 * 1024 + 12_345;
    let file = random_file(dir.path(), "golden image.img", len);
    let torrent = dir.path().join("out.torrent");
    let (file_arg, torrent_arg) = (file.to_str().unwrap(), torrent.to_str().unwrap());

    for (piece_size, private) in [
        (Some(16 * 1024), true),
        (Some(256 * 1024), false),
        (None, true),
    ] {
        let piece_arg = piece_size.map(|n: u32| n.to_string());
        let mut args = vec!["torrent", "create", file_arg, "-o", torrent_arg];
        args.extend(["--threads", "2"]);
        if let Some(piece) = &piece_arg {
            args.extend(["--piece-size", piece]);
        }
        if private {
            args.push("--private");
        }
        let summary = create_ok(&args, |_| {});
        let case = format!("piece size {piece_size:?}, private {private}");

        // Default piece size: 512 KiB is the floor, and this file is small.
        let piece_len = piece_size.unwrap_or(512 * 1024);
        let pieces = len.div_ceil(piece_len as usize);
        let ours = Metainfo::from_bytes(&std::fs::read(&torrent).unwrap()).unwrap();
        assert_eq!(ours.geometry.total_len, len as u64, "{case}");
        assert_eq!(ours.geometry.piece_len, piece_len, "{case}");
        assert_eq!(ours.piece_hashes.len(), pieces, "{case}");
        assert_eq!(ours.private, private, "{case}");
        assert_eq!(ours.name, "golden image.img", "{case}");
        assert_eq!(field(&summary, "info hash"), ours.info_hash.to_string());
        assert_eq!(field(&summary, "pieces"), pieces.to_string());
        assert!(field(&summary, "piece size").starts_with(&piece_len.to_string()));

        let shown = transmission_show(&torrent);
        assert_eq!(field(&shown, "Hash"), ours.info_hash.to_string(), "{case}");
        assert_eq!(field(&shown, "Piece Count"), pieces.to_string(), "{case}");
        assert_eq!(
            parse_size(field(&shown, "Piece Size")).0,
            f64::from(piece_len),
            "{case}"
        );
        let (total, unit) = parse_size(field(&shown, "Total Size"));
        assert!(
            (total - len as f64).abs() <= unit / 100.0,
            "{case}: transmission-show says {total} bytes, the file has {len}"
        );
        let privacy = if private {
            "Private torrent"
        } else {
            "Public torrent"
        };
        assert_eq!(field(&shown, "Privacy"), privacy, "{case}");

        assert_eq!(
            libtorrent_info_hash(&file, piece_len, private),
            ours.info_hash.to_string(),
            "{case}: libtorrent's own torrent of the same file has another info hash"
        );
    }
}

#[test]
fn output_and_announce_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = random_file(dir.path(), "disk.img", 100_000);
    let file_arg = file.to_str().unwrap();
    let default_out = dir.path().join("disk.img.torrent");
    let announce = || {
        let meta = Metainfo::from_bytes(&std::fs::read(&default_out).unwrap()).unwrap();
        std::fs::remove_file(&default_out).unwrap();
        meta.announce
    };

    let summary = create_ok(&["torrent", "create", file_arg], |_| {});
    assert!(
        summary.contains(&default_out.display().to_string()),
        "{summary}"
    );
    assert_eq!(announce(), ["http://127.0.0.1:8080/announce"]);

    create_ok(&["torrent", "create", file_arg], |c| {
        c.env("BOOTTORRENT_PUBLIC_URL", "http://boot.lab:8080/");
    });
    assert_eq!(announce(), ["http://boot.lab:8080/announce"]);

    create_ok(
        &[
            "torrent",
            "create",
            file_arg,
            "--announce",
            "http://other:1/announce",
        ],
        |c| {
            c.env("BOOTTORRENT_PUBLIC_URL", "http://boot.lab:8080");
        },
    );
    assert_eq!(announce(), ["http://other:1/announce"]);
}

#[test]
fn unusable_inputs_are_refused_with_the_file_and_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let missing = dir.path().join("missing.img");
    let cases: [(&Path, &str); 3] = [
        (&empty, "the file is empty"),
        (&missing, "No such file or directory"),
        (dir.path(), "it is a directory"),
    ];
    for (path, cause) in cases {
        let out = boottorrent(&["torrent", "create", path.to_str().unwrap()], |_| {});
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.starts_with("Error: "), "{stderr}");
        assert!(stderr.contains(&path.display().to_string()), "{stderr}");
        assert!(stderr.contains(cause), "{stderr}");
        let mut torrent = path.as_os_str().to_owned();
        torrent.push(".torrent");
        assert!(
            !Path::new(&torrent).exists(),
            "no torrent for a refused input"
        );
    }

    let file = random_file(dir.path(), "disk.img", 1000);
    let out = boottorrent(
        &[
            "torrent",
            "create",
            file.to_str().unwrap(),
            "--piece-size",
            "3M",
        ],
        |_| {},
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("must be a power of two"), "{stderr}");
}

#[test]
fn help_states_what_it_does_and_the_defaults() {
    let help = create_ok(&["torrent", "create", "--help"], |_| {});
    for needle in [
        "single-file .torrent",
        "FILE.torrent",
        "http://127.0.0.1:8080/announce",
        "BOOTTORRENT_PUBLIC_URL",
        "512 KiB and 16 MiB",
        "--private",
        "--threads",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}

#[test]
fn vhdx_files_are_checked_and_described() {
    common::require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("golden.vhdx");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "vhdx"])
        .arg(&image)
        .arg("64M")
        .status()
        .unwrap();
    assert!(status.success());
    let summary = create_ok(&["torrent", "create", image.to_str().unwrap()], |_| {});
    assert!(
        field(&summary, "vhdx").starts_with("virtual size 67108864 bytes"),
        "{summary}"
    );

    // Not a VHDX despite its name: still hashed (this is a general creator), with a warning.
    let fake = random_file(dir.path(), "fake.vhdx", 2 * 1024 * 1024);
    let out = boottorrent(&["torrent", "create", fake.to_str().unwrap()], |_| {});
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: checking VHDX") && stderr.contains("file type identifier"),
        "{stderr}"
    );
}
