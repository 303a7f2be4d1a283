//! Agents fetching an image: the real server with a catalogued VHDX, two `boottorrent-agent
//! run` processes, and an `artifact_assignment` signed with the server's key and published with
//! `mosquitto_pub`. They download from the server's seeder and from each other.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use boottorrent_proto::{
    AfterDownload, ArtifactAssignment, Bytes, Command as ProtoCommand, Event, EventKind,
    decode_event,
};
use common::*;

/// A VHDX of `len` random bytes, made by qemu-img.
fn make_vhdx(dir: &Path, len: usize) -> std::path::PathBuf {
    require_tool("qemu-img");
    let raw = dir.join("golden.raw");
    let mut data = vec![0u8; len];
    for (i, b) in data.iter_mut().enumerate() {
        // Varied content (not zeros, which VHDX would store sparsely).
        *b = (i.wrapping_mul(2654435761) >> 13) as u8;
    }
    std::fs::write(&raw, &data).unwrap();
    let vhdx = dir.join("golden.vhdx");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vhdx"])
        .arg(&raw)
        .arg(&vhdx)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    vhdx
}

#[test]
fn two_agents_download_an_assigned_image_from_the_seeder_and_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(dir);
    let vhdx = make_vhdx(dir, 24 << 20);

    // Catalogue the image through the server's CLI.
    let added = output({
        let mut c = Command::new(server_binary());
        c.args(["image", "add", "--json", "--server", &server.url("")])
            .arg("--data-dir")
            .arg(&server.data_dir)
            .arg(&vhdx);
        c
    });
    let image: serde_json::Value = serde_json::from_slice(&added.stdout).unwrap();
    assert_eq!(image["state"], "ready", "{image}");
    let size = image["size"].as_u64().unwrap();

    for id in ["lab-a", "lab-b"] {
        output({
            let mut c = agent(&["enroll", "--http-url", &server.url("")]);
            c.arg("--data-dir").arg(dir.join(id));
            c
        });
    }
    let _a = run_agent(dir, &server, "lab-a", &[]);
    let _b = run_agent(dir, &server, "lab-b", &[]);
    for id in ["lab-a", "lab-b"] {
        wait_for("the agents online", || server.online(id).filter(|o| *o));
    }

    // Watch their progress events as the operator's tools would.
    let mut sub = Command::new("stdbuf")
        .args(["-oL", "mosquitto_sub"])
        .args(["-h", "127.0.0.1", "-p", &server.mqtt_port.to_string()])
        .args(["-u", "admin", "-P", &server.token("admin.token")])
        .args(["-t", "boottorrent/evt/machine/+/progress", "-F", "%t %x"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = sub.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });

    let info_hash: [u8; 20] = hex::decode(image["info_hash"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let sha256: [u8; 32] = hex::decode(image["sha256"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let assignment = ArtifactAssignment {
        deployment: "dep-1".parse().unwrap(),
        image: image["id"].as_str().unwrap().parse().unwrap(),
        name: "golden.vhdx".into(),
        info_hash: Bytes(info_hash),
        size,
        sha256: Bytes(sha256),
        torrent_url: image["torrent_url"].as_str().unwrap().to_owned(),
        save_path: "golden.vhdx".into(),
        action: AfterDownload::Stage,
    };
    let topic = "boottorrent/cmd/global/artifact_assignment";
    let seq = now_ms() as u64 * 1000 + 999;
    let payload = signed_command(
        topic,
        ProtoCommand::ArtifactAssignment(assignment),
        &server.key(),
        seq,
    );
    server.publish(topic, &payload);

    let source = std::fs::read(&vhdx).unwrap();
    for id in ["lab-a", "lab-b"] {
        let path = dir.join(id).join("images").join("golden.vhdx");
        wait_for_long("the download to complete", || {
            std::fs::read(&path)
                .ok()
                .filter(|d| *d == source)
                .map(|_| ())
        });
    }
    // Progress events arrived, decodable and for this image.
    let mut seen = 0;
    while let Ok(line) = rx.try_recv() {
        let (topic, hex_payload) = line.split_once(' ').unwrap();
        assert!(topic.ends_with("/progress"), "{topic}");
        let envelope = decode_event(EventKind::Progress, &hex::decode(hex_payload).unwrap())
            .expect("a progress envelope");
        let Event::Progress(p) = envelope.body else {
            panic!("not progress")
        };
        assert_eq!(p.bytes_total, size);
        seen += 1;
    }
    assert!(seen >= 2, "only {seen} progress events seen");
    // The machines fed each other: the server sent less than two full copies.
    let uploaded = wait_for("the seeder's counter", || {
        let v: serde_json::Value = reqwest::blocking::get(
            server.url(&format!("/api/v1/images/{}", image["id"].as_str().unwrap())),
        )
        .ok()?
        .json()
        .ok()?;
        v["uploaded"].as_u64().filter(|u| *u > 0)
    });
    assert!(
        uploaded < 2 * size,
        "the server uploaded {uploaded} bytes for two machines of a {size}-byte image"
    );
    let _ = sub.kill();
    let _ = sub.wait();
}

/// `wait_for` with room for a transfer on a busy 2-core machine.
fn wait_for_long(what: &str, mut check: impl FnMut() -> Option<()>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while check().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
