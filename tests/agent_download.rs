//! Agents fetching an image: the real server with a catalogued VHDX, two `boottorrent-agent
//! run` processes, and an `artifact_assignment` signed with the server's key and published with
//! `mosquitto_pub`. They download from the server's seeder and from each other.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use boottorrent_proto::{
    AfterDownload, ArtifactAssignment, Bytes, Command as ProtoCommand, Event, EventKind,
    ImageState, decode_event,
};
use common::*;

#[test]
fn two_agents_download_an_assigned_image_from_the_seeder_and_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), &[]);
    let (image, vhdx) = catalogue(&server, dir, 24 << 20);
    let size = image["size"].as_u64().unwrap();
    for id in ["lab-a", "lab-b"] {
        enroll(&server, dir, id);
    }
    let _a = run_agent(dir, &server, "lab-a", &[]);
    let _b = run_agent(dir, &server, "lab-b", &[]);
    for id in ["lab-a", "lab-b"] {
        wait_for("the agents online", || server.online(id).filter(|o| *o));
    }
    // Watch their progress events as the operator's tools would.
    let progress = Events::watch(&server, EventKind::Progress);
    // One message on the global topic reaches both.
    assign(&server, &image, None);

    let source = std::fs::read(&vhdx).unwrap();
    for id in ["lab-a", "lab-b"] {
        let path = dir
            .join(id)
            .join("images")
            .join(format!("{}.vhdx", image["id"].as_str().unwrap()));
        wait_for_long("the download to complete", || {
            std::fs::read(&path)
                .ok()
                .filter(|d| *d == source)
                .map(|_| ())
        });
    }
    // What an operator's tools see: progress of the right size from each machine, ending in
    // `staged` with every byte once the whole file is verified.
    let mut staged = std::collections::BTreeSet::new();
    wait_for("both machines' staged progress", || {
        while let Ok((topic, event)) = progress.rx.try_recv() {
            let Event::Progress(p) = event else {
                panic!("not progress: {topic}")
            };
            assert_eq!(p.bytes_total, size, "{topic}");
            assert!(p.bytes_done <= size, "{topic}: {p:?}");
            if p.state == ImageState::Staged {
                assert_eq!(p.bytes_done, size, "{topic}");
                staged.insert(topic.split('/').nth(3).unwrap_or_default().to_owned());
            }
        }
        (staged.len() == 2).then_some(())
    });
    assert_eq!(Vec::from_iter(&staged), ["lab-a", "lab-b"]);
    // The machines fed each other: the server sent less than two full copies.
    let id = image["id"].as_str().unwrap().to_owned();
    let uploaded = wait_for("the seeder's counter", || {
        let v: serde_json::Value = server.get(&format!("/api/v1/images/{id}")).json().ok()?;
        v["uploaded"].as_u64().filter(|u| *u > 0)
    });
    assert!(
        uploaded < 2 * size,
        "the server uploaded {uploaded} bytes for two machines of a {size}-byte image"
    );
}

/// With encryption required on the server and on the agents, the agents dial the seeder and
/// each other with message stream encryption (our initiator against our receiver, in the real
/// processes) and get the image over RC4; the seeder counts no plaintext connection.
#[test]
fn agents_requiring_encryption_download_from_a_seeder_requiring_it() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), &["--bt-require-encryption", "true"]);
    let (image, vhdx) = catalogue(&server, dir, 8 << 20);
    let agents: Vec<Proc> = ["enc-a", "enc-b"]
        .into_iter()
        .map(|id| {
            enroll(&server, dir, id);
            run_agent(dir, &server, id, &["--bt-require-encryption", "true"])
        })
        .collect();
    for id in ["enc-a", "enc-b"] {
        wait_for("the agents online", || server.online(id).filter(|o| *o));
    }
    assign(&server, &image, None);
    let source = std::fs::read(&vhdx).unwrap();
    for id in ["enc-a", "enc-b"] {
        let path = dir
            .join(id)
            .join("images")
            .join(format!("{}.vhdx", image["id"].as_str().unwrap()));
        wait_for_long("the encrypted download to complete", || {
            std::fs::read(&path)
                .ok()
                .filter(|d| *d == source)
                .map(|_| ())
        });
    }
    let connections = |kind: &str| {
        server.metric(&format!(
            "boottorrent_seeder_connections_total{{encryption=\"{kind}\"}}"
        ))
    };
    assert!(
        connections("rc4") > 0,
        "the seeder counted no RC4 connection"
    );
    for kind in ["plaintext", "mse_plaintext", "refused"] {
        assert_eq!(connections(kind), 0, "{kind} connections at the seeder");
    }
    drop(agents);
}

/// `wait_for` with room for a transfer on a busy 2-core machine.
fn wait_for_long(what: &str, check: impl FnMut() -> Option<()>) {
    boottorrent_testkit::wait_until(what, std::time::Duration::from_secs(120), check);
}

/// Waits until a restarted agent has staged its image again. Not by its `progress` event: the
/// agent may stage before it reaches the broker, and progress travels at QoS 0, dropped while
/// disconnected (its `startup` tells the server what it holds then). Its log says it.
fn wait_for_staged_at_start(agent: &Proc) {
    wait_for_long("the image staged again after the restart", || {
        agent
            .log_text()
            .contains("image staged; seeding it to peers")
            .then_some(())
    });
}

/// `mosquitto_sub` on the agents' events of one kind; lines of (topic, decoded envelope body).
struct Events {
    /// Stopped when the watch is dropped.
    _sub: Proc,
    rx: std::sync::mpsc::Receiver<(String, Event)>,
}

impl Events {
    fn watch(server: &Server, kind: EventKind) -> Events {
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(["-h", "127.0.0.1", "-p", &server.mqtt_port.to_string()])
            .args(["-i", &common::admin_client_id()])
            .args(["-u", "admin", "-P", &server.token("admin.token")])
            .args(["-t", &format!("boottorrent/evt/machine/+/{kind}")])
            .args(["-F", "%t %x"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let Some((topic, payload)) = line.split_once(' ') else {
                    continue;
                };
                let Ok(bytes) = hex::decode(payload) else {
                    continue;
                };
                if let Ok(envelope) = decode_event(kind, &bytes) {
                    let _ = tx.send((topic.to_owned(), envelope.body));
                }
            }
        });
        // Give the subscription a moment to be in place before anything is published.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Events {
            _sub: Proc::adopt(child, "mosquitto_sub"),
            rx,
        }
    }

    fn next(&self, what: &str) -> (String, Event) {
        self.rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no {what} event within 60 s"))
    }
}

/// The assignment of `image` the server would send.
fn assignment_of(image: &serde_json::Value) -> ArtifactAssignment {
    let hex20: [u8; 20] = hex::decode(image["info_hash"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let hex32: [u8; 32] = hex::decode(image["sha256"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    ArtifactAssignment {
        deployment: "dep-2".parse().unwrap(),
        image: image["id"].as_str().unwrap().parse().unwrap(),
        name: "golden.vhdx".into(),
        info_hash: Bytes(hex20),
        size: image["size"].as_u64().unwrap(),
        sha256: Bytes(hex32),
        torrent_url: image["torrent_url"].as_str().unwrap().to_owned(),
        save_path: "golden.vhdx".into(),
        action: AfterDownload::Stage,
        persistence: Default::default(),
    }
}

/// Signs an assignment for `machine` (every machine when `None`) and publishes it.
fn publish_assignment(server: &Server, assignment: ArtifactAssignment, machine: Option<&str>) {
    let topic = match machine {
        Some(m) => format!("boottorrent/cmd/machine/{m}/artifact_assignment"),
        None => "boottorrent/cmd/global/artifact_assignment".to_owned(),
    };
    let seq = now_ms() as u64 * 1000 + 777;
    let payload = signed_command(
        &topic,
        ProtoCommand::ArtifactAssignment(assignment),
        &server.key(),
        seq,
    );
    server.publish_admin(&topic, &payload);
}

/// Deploys `image` through the API, as the operator does, to `machine` (every machine when
/// `None`) with `action`; returns the deployment's id. A machine's passkey opens only the
/// images of deployments that include it, so this is how an agent gets an image it may fetch.
fn deploy(
    server: &Server,
    image: &serde_json::Value,
    machine: Option<&str>,
    action: &str,
) -> String {
    let target = match machine {
        Some(m) => serde_json::json!({ "machines": [m] }),
        None => serde_json::json!({ "global": true }),
    };
    let response = reqwest::blocking::Client::new()
        .post(server.url("/api/v1/deployments"))
        .bearer_auth(server.token("admin.token"))
        .json(&serde_json::json!({ "image": image["id"], "target": target, "action": action }))
        .send()
        .unwrap();
    assert_eq!(response.status(), 201);
    let deployment: serde_json::Value = response.json().unwrap();
    deployment["id"].as_str().unwrap().to_owned()
}

fn assign(server: &Server, image: &serde_json::Value, machine: Option<&str>) {
    deploy(server, image, machine, "stage");
}

/// Serves `file` over plain HTTP on loopback (python3's http.server) until dropped; returns
/// the server and the file's URL.
fn serve_file(file: &std::path::Path) -> (Proc, String) {
    let port = free_port();
    let mut command = Command::new("python3");
    command
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .arg("--directory")
        .arg(file.parent().unwrap());
    let web = spawn(command, file.with_extension("http.log"));
    wait_for("the file server", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let name = file.file_name().unwrap().to_str().unwrap();
    (web, format!("http://127.0.0.1:{port}/{name}"))
}

#[test]
fn not_enough_disk_is_an_error_event_and_nothing_starts() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), &[]);
    let (image, _) = catalogue(&server, dir, 4 << 20);
    enroll(&server, dir, "lab-full");
    // A reserve larger than any disk: the real free space never suffices.
    let _agent = run_agent(
        dir,
        &server,
        "lab-full",
        &["--disk-reserve-bytes", "1000000000000000000"],
    );
    wait_for("the agent online", || {
        server.online("lab-full").filter(|o| *o)
    });
    let errors = Events::watch(&server, EventKind::Error);
    assign(&server, &image, Some("lab-full"));
    let (topic, event) = errors.next("error");
    assert!(topic.contains("lab-full"), "{topic}");
    let Event::Error(report) = event else {
        panic!("not an error report")
    };
    assert_eq!(report.code, "disk_full", "{report:?}");
    assert!(report.message.contains("bytes free"), "{report:?}");
    assert!(
        !dir.join(format!(
            "lab-full/images/{}.vhdx",
            image["id"].as_str().unwrap()
        ))
        .exists(),
        "a download started anyway"
    );
}

#[test]
fn a_killed_agent_resumes_and_fetches_only_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), &[]);
    let (image, vhdx) = catalogue(&server, dir, 24 << 20);
    let size = image["size"].as_u64().unwrap();
    enroll(&server, dir, "lab-r");
    let slow = ["--download-limit-bps", "2000000"];
    let mut first = run_agent(dir, &server, "lab-r", &slow);
    wait_for("the agent online", || server.online("lab-r").filter(|o| *o));
    let progress = Events::watch(&server, EventKind::Progress);
    assign(&server, &image, Some("lab-r"));
    let had = loop {
        let (_, event) = progress.next("progress");
        if let Event::Progress(p) = event
            && p.bytes_done >= size / 2
        {
            break p.bytes_done;
        }
    };
    first.kill9();

    let _second = run_agent(dir, &server, "lab-r", &[]);
    let path = dir.join(format!(
        "lab-r/images/{}.vhdx",
        image["id"].as_str().unwrap()
    ));
    let source = std::fs::read(&vhdx).unwrap();
    wait_for_long("the resumed download to complete", || {
        std::fs::read(&path)
            .ok()
            .filter(|d| *d == source)
            .map(|_| ())
    });
    // Everything came from the server's seeder: had it started over, it would have sent the
    // first run's share twice. (All-zero pieces of the VHDX need no transfer at all, so the
    // total may be under the size.) The seeder's counters tick once a second.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let id = image["id"].as_str().unwrap().to_owned();
    let v = server.get_json(&format!("/api/v1/images/{id}"));
    let uploaded = v["uploaded"].as_u64().unwrap();
    assert!(uploaded > 0, "{v}");
    // Bytes that must travel: pieces that are not all zeros (a fresh file already has those).
    let piece = v["piece_size"].as_u64().unwrap() as usize;
    let needed: u64 = source
        .chunks(piece)
        .filter(|c| c.iter().any(|b| *b != 0))
        .map(|c| c.len() as u64)
        .sum();
    let zeros = size - needed;
    // Starting over would send again what the first run fetched: at least `had - zeros`.
    let first_run = had.saturating_sub(zeros);
    assert!(
        first_run > 4 << 20,
        "the first run fetched too little to tell: {first_run}"
    );
    assert!(
        uploaded < needed + first_run / 2,
        "the seeder sent {uploaded} bytes; {needed} were needed and the agent had fetched \
         {first_run} before it was killed"
    );
}

#[test]
fn a_staged_image_is_read_only_and_one_changed_on_disk_is_repaired_at_the_next_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), &[]);
    let (image, vhdx) = catalogue(&server, dir, 8 << 20);
    enroll(&server, dir, "lab-g");
    let mut first = run_agent(dir, &server, "lab-g", &[]);
    wait_for("the agent online", || server.online("lab-g").filter(|o| *o));
    let progress = Events::watch(&server, EventKind::Progress);
    assign(&server, &image, Some("lab-g"));
    let staged = || loop {
        if let (_, Event::Progress(p)) = progress.next("progress")
            && p.state == ImageState::Staged
        {
            break;
        }
    };
    staged();
    let path = dir.join(format!(
        "lab-g/images/{}.vhdx",
        image["id"].as_str().unwrap()
    ));
    let source = std::fs::read(&vhdx).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), source);
    let mode = || std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(), 0o444, "the verified golden image is read-only");
    first.terminate();

    // Something changes the golden while the agent is stopped (the test runs as root, whom the
    // missing write bits do not stop; on Windows the read-only attribute would refuse it).
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xA5; 4096], 1 << 20).unwrap();
    }
    assert_ne!(std::fs::read(&path).unwrap(), source);
    let second = run_agent(dir, &server, "lab-g", &[]);
    wait_for_staged_at_start(&second);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        source,
        "the changed piece is fetched again"
    );
    assert_eq!(mode(), 0o444, "sealed again once verified");
    let log = second.log_text();
    assert!(
        log.contains("no longer matches its torrent"),
        "the agent says why it downloads again:\n{}",
        second.log_tail(30)
    );
}

/// An agent updated over a store of the older layout, where images were kept by their file
/// name (`images/golden.vhdx`), moves each to its file by id (two images may share a name) and
/// seeds it from there without fetching it again.
#[test]
fn an_image_kept_by_name_in_an_older_store_is_moved_to_its_file_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), &[]);
    let (image, vhdx) = catalogue(&server, dir, 8 << 20);
    let id = image["id"].as_str().unwrap().to_owned();
    enroll(&server, dir, "lab-m");
    let mut first = run_agent(dir, &server, "lab-m", &[]);
    wait_for("the agent online", || server.online("lab-m").filter(|o| *o));
    let progress = Events::watch(&server, EventKind::Progress);
    assign(&server, &image, Some("lab-m"));
    let staged = || loop {
        if let (_, Event::Progress(p)) = progress.next("progress")
            && p.state == ImageState::Staged
        {
            break;
        }
    };
    staged();
    first.terminate();
    let uploaded = || {
        let v = server.get_json(&format!("/api/v1/images/{id}"));
        v["uploaded"].as_u64().unwrap()
    };
    // The seeder's counters tick once a second.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let sent = uploaded();

    // Rewrite the store as the older agent left it.
    let store = dir.join("lab-m");
    let by_id = store.join(format!("images/{id}.vhdx"));
    let list_file = store.join("assignments.json");
    let mut list: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&list_file).unwrap()).unwrap();
    let name = list[0]["assignment"]["save_path"]
        .as_str()
        .unwrap()
        .to_owned();
    let by_name = store.join("images").join(&name);
    assert_ne!(by_name, by_id);
    std::fs::rename(&by_id, &by_name).unwrap();
    list[0]["path"] = serde_json::json!(by_name);
    std::fs::write(&list_file, serde_json::to_vec(&list).unwrap()).unwrap();

    let second = run_agent(dir, &server, "lab-m", &[]);
    wait_for_staged_at_start(&second);
    assert!(!by_name.exists(), "{}", second.log_tail(30));
    assert_eq!(
        std::fs::read(&by_id).unwrap(),
        std::fs::read(&vhdx).unwrap()
    );
    assert!(
        second
            .log_text()
            .contains("moved the image to its file by id"),
        "{}",
        second.log_tail(30)
    );
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(uploaded(), sent, "nothing was fetched again");
}

#[test]
fn an_image_whose_sha256_does_not_match_is_not_staged() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), &[]);
    let (image, _) = catalogue(&server, dir, 2 << 20);
    enroll(&server, dir, "lab-v");
    let _agent = run_agent(dir, &server, "lab-v", &[]);
    wait_for("the agent online", || server.online("lab-v").filter(|o| *o));
    let errors = Events::watch(&server, EventKind::Error);
    // The server never sends a wrong checksum, so this assignment is made here, and its
    // torrent is the operator's (whose passkey opens every image) served from elsewhere:
    // lab-v is in no deployment, so its own passkey would not open the image.
    let hash = image["info_hash"].as_str().unwrap();
    let torrent = dir.join("www/golden.torrent");
    std::fs::create_dir_all(torrent.parent().unwrap()).unwrap();
    std::fs::write(
        &torrent,
        server
            .get(&format!("/torrents/{hash}.torrent"))
            .bytes()
            .unwrap(),
    )
    .unwrap();
    let (mut web, url) = serve_file(&torrent);
    let mut assignment = assignment_of(&image);
    assignment.sha256 = Bytes([7; 32]);
    assignment.torrent_url = url;
    publish_assignment(&server, assignment, Some("lab-v"));
    let (_, event) = errors.next("error");
    web.kill9();
    let Event::Error(report) = event else {
        panic!("not an error report")
    };
    assert_eq!(report.code, "sha256_mismatch", "{report:?}");
    assert!(report.message.contains("0707"), "{report:?}");
}

#[test]
fn the_command_backend_runs_after_staging_and_on_a_boot_command() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), &[]);
    let (image, _) = catalogue(&server, dir, 2 << 20);
    // The site's boot program: records what it was told, one line per run.
    let record = dir.join("boots.log");
    let script = dir.join("boot.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$BOOTTORRENT_ACTION $BOOTTORRENT_IMAGE_ID $BOOTTORRENT_DEPLOYMENT_ID $BOOTTORRENT_IMAGE_PATH $BOOTTORRENT_PARENT_PATH\" >> {}\n",
            record.display()
        ),
    )
    .unwrap();
    let mut perms = std::fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&script, perms).unwrap();
    enroll(&server, dir, "lab-boot");
    let _agent = run_agent(
        dir,
        &server,
        "lab-boot",
        &[
            "--boot-backend",
            "command",
            "--boot-command",
            script.to_str().unwrap(),
        ],
    );
    wait_for("the agent online", || {
        server.online("lab-boot").filter(|o| *o)
    });
    let boots = Events::watch(&server, EventKind::Boot);
    let deployment = deploy(&server, &image, Some("lab-boot"), "set_boot");
    let (_, event) = boots.next("boot");
    let Event::Boot(report) = event else {
        panic!("not a boot report")
    };
    assert!(report.ok, "{report:?}");
    let id = image["id"].as_str().unwrap();
    // It boots the image's differencing child; the golden is its parent.
    let golden = dir.join(format!("lab-boot/images/{id}.vhdx"));
    let child = dir.join(format!("lab-boot/children/{id}.vhdx"));
    let lines = std::fs::read_to_string(&record).unwrap();
    assert_eq!(
        lines.trim(),
        format!(
            "set-boot {id} {deployment} {} {}",
            child.display(),
            golden.display()
        )
    );

    // Booting it on command: the same program, action reboot.
    let topic = "boottorrent/cmd/machine/lab-boot/boot";
    let payload = signed_command(
        topic,
        ProtoCommand::Boot(boottorrent_proto::BootCommand {
            image: id.parse().unwrap(),
            deployment: None,
        }),
        &server.key(),
        now_ms() as u64 * 1000 + 888,
    );
    server.publish_admin(topic, &payload);
    let (_, event) = boots.next("boot");
    let Event::Boot(report) = event else {
        panic!("not a boot report")
    };
    assert!(report.ok, "{report:?}");
    let lines = std::fs::read_to_string(&record).unwrap();
    assert!(
        lines
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with(&format!("reboot {id}"))),
        "{lines}"
    );
}

#[test]
fn an_agent_serves_only_peers_the_tracker_has_in_the_swarm() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), &[]);
    let (image, vhdx) = catalogue(&server, dir, 4 << 20);
    enroll(&server, dir, "lab-s");
    let agent = run_agent(dir, &server, "lab-s", &[]);
    wait_for("the agent online", || server.online("lab-s").filter(|o| *o));
    assign(&server, &image, Some("lab-s"));
    let path = dir.join(format!(
        "lab-s/images/{}.vhdx",
        image["id"].as_str().unwrap()
    ));
    let source = std::fs::read(&vhdx).unwrap();
    wait_for_long("the agent to hold the image", || {
        (std::fs::read(&path).ok()? == source).then_some(())
    });
    // Where the agent's swarm engine listens, from its log.
    let log = agent.log_text();
    let port: u16 = log
        .lines()
        .find_map(|l| l.split("swarm engine listening listen=127.0.0.1:").nth(1))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no listen port in the agent's log:\n{log}"));

    // A host that learnt the info dict (here from the operator's torrent) but holds no
    // passkey dials the agent directly: it gets nothing.
    let hash = image["info_hash"].as_str().unwrap();
    let operator_torrent = server
        .get(&format!("/torrents/{hash}.torrent"))
        .bytes()
        .unwrap();
    let stolen = dir.join("stolen.torrent");
    std::fs::write(
        &stolen,
        boottorrent_testkit::torrent_announcing_to(&operator_torrent, "http://127.0.0.1:9/a"),
    )
    .unwrap();
    let got = boottorrent_testkit::libtorrent_download(
        dir,
        &stolen,
        "127.0.0.2",
        &format!("127.0.0.1:{port}"),
        6,
        boottorrent_testkit::Encryption::Any,
    );
    assert_eq!(got, 0, "the agent served a host outside the swarm");
    assert!(
        agent
            .log_text()
            .contains("refused a peer the tracker does not have in the swarm"),
        "{}",
        agent.log_text()
    );
}
