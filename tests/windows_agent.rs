//! The Windows agent, built for Windows and run under Wine (Debian's `wine64`), against the
//! real Linux server and a Linux agent: the nearest stand-in for a lab PC this machine has.
//!
//! What Wine cannot do is not tried here: `bcdedit`, native VHD boot, a real reboot. The
//! "reboot into an image" is a second Wine prefix whose `C:` is new and whose `D:` is the
//! first one's `C:`, the way a machine that booted a VHDX sees its host volume under another
//! letter.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use boottorrent_testkit::wine::Wine;
use common::*;

/// Downloading, hashing and Wine's start-up are slow in a debug build on two cores.
const PATIENCE: Duration = Duration::from_secs(300);

fn wait_long<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    wait_until(what, PATIENCE, check)
}

/// The agent's configuration for a Wine prefix, where the Windows agent looks for it.
fn write_config(wine: &Wine, server: &Server, machine_id: Option<&str>) {
    let dir = wine.c_drive().join("ProgramData/BootTorrent");
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = format!(
        "server = \"127.0.0.1\"\nmqtt_port = {}\nhttp_url = \"{}\"\nenroll_token = \"{}\"\n\
         bt_listen = \"127.0.0.1:0\"\nheartbeat_interval_secs = 1\nboot_backend = \"none\"\n",
        server.mqtt_port,
        server.url(""),
        server.enroll_token()
    );
    if let Some(id) = machine_id {
        text.push_str(&format!("machine_id = \"{id}\"\n"));
    }
    std::fs::write(dir.join("agent.toml"), text).unwrap();
}

const CONFIG: &str = r"C:\ProgramData\BootTorrent\agent.toml";

/// Runs `command` to its end and asserts it succeeded, showing its output otherwise.
fn succeeds(what: &str, command: std::process::Command) -> String {
    let out = run_within(command, PATIENCE);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

#[test]
fn the_windows_agent_stages_an_image_as_a_service_and_a_booted_image_finds_its_store() {
    // Built before the clocks start: the first build of the Windows agent takes minutes.
    agent_binary();
    windows_agent_binary();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), &["--heartbeat-interval-secs", "2"]);
    let (image, _) = catalogue(&server, dir, 24 << 20);
    let image = image["id"].as_str().unwrap().to_owned();
    let linux = run_agent(
        dir,
        &server,
        "lab-linux",
        &["--server-key", &server.key_hex()],
    );
    wait_for("the Linux agent online", || {
        server.online("lab-linux").filter(|o| *o)
    });

    // The machine's installed Windows: enrolled and the service registered, as in a golden
    // image, then started.
    let host = Wine::new(&dir.join("host"));
    write_config(&host, &server, Some("lab-win"));
    let enrolled = succeeds("enroll", host.agent(&["enroll", "--config", CONFIG]));
    assert!(enrolled.contains("fingerprint  SHA256:"), "{enrolled}");
    let pin = host.c_drive().join("ProgramData/BootTorrent/server.pub");
    assert_eq!(
        std::fs::read_to_string(&pin).unwrap().trim(),
        server.key_hex(),
        "enroll pins the key inside the image"
    );
    succeeds(
        "service install",
        host.agent(&["service", "install", "--config", CONFIG]),
    );
    // Its exit status is not trusted: Wine's service manager gives up on a service that takes
    // a few seconds to report itself running (a debug build on a loaded machine) while the
    // service goes on starting. Whether it came up is what the server sees.
    let start = run_within(
        builtin(&host, &["sc", "start", "BootTorrentAgent"]),
        PATIENCE,
    );
    let service_log = host.c_drive().join("ProgramData/BootTorrent/agent.log");
    let deadline = Instant::now() + PATIENCE;
    while server.online("lab-win") != Some(true) {
        assert!(
            Instant::now() < deadline,
            "the Windows agent (a service) did not come online; `sc start`: {} {}; its log:\n{}",
            start.status,
            String::from_utf8_lossy(&start.stdout),
            std::fs::read_to_string(&service_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // A service has no console: what it did is in its log file next to its configuration.
    let logged = std::fs::read_to_string(&service_log).unwrap_or_default();
    assert!(
        logged.contains("starting boottorrent-agent") && logged.contains("lab-win"),
        "the service's log {}:\n{logged}",
        service_log.display()
    );
    let first = server.machine("lab-win").unwrap();
    assert_eq!(first["key_state"], "approved", "{first}");

    // One image to both machines: the Windows agent downloads it from the server's seeder
    // and the Linux agent, verifies it and reports it staged.
    let out = output(server.cli(&[
        "deploy",
        "--json",
        &image,
        "--machine",
        "lab-win",
        "--machine",
        "lab-linux",
    ]));
    let deployment: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = deployment["id"].as_str().unwrap().to_owned();
    let d = wait_long("the deployment completed", || {
        let d = server.get_json(&format!("/api/v1/deployments/{id}"));
        (d["state"] == "completed").then_some(d)
    });
    for m in d["machines"].as_array().unwrap() {
        assert_eq!(m["state"], "staged", "{d:#}");
    }

    // Its store is on the host volume, with the machine's id, key, image and resume record.
    let store = host.c_drive().join("BootTorrent");
    let marker = std::fs::read_to_string(store.join("store.json")).unwrap();
    assert!(marker.contains("\"lab-win\""), "{marker}");
    assert!(store.join("agent.key").is_file());
    let images = files(&store.join("images"));
    assert_eq!(images.len(), 1, "{images:?}");
    // Verified, the golden is sealed: Wine keeps the read-only attribute as missing write bits.
    let mode = std::fs::metadata(store.join("images").join(&images[0]))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o222, 0, "the staged image is read-only: {mode:o}");

    // A service stop is a clean stop: the engine saves its resume record, the server hears
    // the machine leave.
    succeeds(
        "sc stop",
        builtin(&host, &["sc", "stop", "BootTorrentAgent"]),
    );
    wait_long("the Windows agent offline after its stop", || {
        (server.online("lab-win") == Some(false)).then_some(())
    });
    let resume = files(&store.join("resume"));
    assert_eq!(resume.len(), 1, "one resume record: {resume:?}");
    succeeds("service uninstall", host.agent(&["service", "uninstall"]));
    let query = run_within(
        builtin(&host, &["sc", "query", "BootTorrentAgent"]),
        PATIENCE,
    );
    let text = String::from_utf8_lossy(&query.stdout).into_owned();
    assert!(
        !query.status.success() || !text.contains("RUNNING"),
        "the service is still there: {text}"
    );

    // The machine boots an image: a new C:, the host volume now D:. The image's agent has its
    // own configuration, without machine id or pinned key.
    let booted = Wine::with_drives(&dir.join("image"), &[('d', &host.c_drive())]);
    write_config(&booted, &server, None);
    let started = Instant::now();
    let agent = spawn(
        booted.agent(&["run", "--config", CONFIG]),
        dir.join("image-agent.log"),
    );
    wait_long("the same machine online from the booted image", || {
        server
            .machine("lab-win")
            .filter(|m| m["online"] == true && m["last_seen"] != first["last_seen"])
    });
    let m = wait_long("the held image reported", || {
        server
            .machine("lab-win")
            .filter(|m| m["images"].as_array().is_some_and(|i| !i.is_empty()))
    });
    assert_eq!(m["key_state"], "approved", "{m}");
    assert_eq!(m["public_key"], first["public_key"], "{m}");
    let log = wait_long("the image checked from its resume record", || {
        let log = agent.log_text();
        log.contains("checked existing data").then_some(log)
    });
    assert!(
        log.contains(r"D:\BootTorrent"),
        "the store on D: was used:\n{log}"
    );
    assert!(
        log.contains("fast_path=true"),
        "the resume record was trusted:\n{log}"
    );
    assert!(!log.contains("Access denied"), "{log}");
    eprintln!(
        "booted image: online and checked in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(linux);
}

/// One of Wine's own programs (`sc`) with its arguments.
fn builtin(wine: &Wine, command: &[&str]) -> std::process::Command {
    let mut c = wine.command(command[0]);
    c.args(&command[1..]);
    c
}

/// The names of the files in `dir` (none when it does not exist).
fn files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
