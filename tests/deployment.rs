//! Deployments end to end: the real server, agents as processes on loopback, driven through the
//! operator's command line (`boottorrent zones set`, `deploy`, `status`, `deployments cancel`)
//! and checked through the HTTP API and the agents' disks.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// Deployments take longer than one message round trip.
const DEPLOY_PATIENCE: Duration = Duration::from_secs(120);

/// Heartbeats every 2 s: the server re-sends a lost assignment at a heartbeat, so this bounds
/// how long a test waits for reconciliation.
const SERVE: &[&str] = &["--heartbeat-interval-secs", "2"];

fn wait_long<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    wait_until(what, DEPLOY_PATIENCE, check)
}

/// Adds a VHDX to the catalog with the CLI; returns the image's id and the file.
fn catalogue_id(server: &Server, dir: &Path, len: usize) -> (String, PathBuf) {
    let (image, vhdx) = catalogue(server, dir, len);
    (image["id"].as_str().unwrap().to_owned(), vhdx)
}

/// Enrolls and starts an agent whose boot backend records the image it was told to boot.
fn start_agent(dir: &Path, server: &Server, id: &str, extra: &[&str]) -> Proc {
    enroll(server, dir, id);
    let script = marker_boot_script(dir);
    let mut args = vec![
        "--boot-backend",
        "command",
        "--boot-command",
        script.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    // The boot program inherits the agent's environment: tell it where this machine's marker is.
    let mut command = run_agent_command(dir, server, id, &args);
    command.env("BOOTTORRENT_MARKER", dir.join(format!("{id}.marker")));
    let agent = spawn(command, dir.join(format!("{id}.log")));
    wait_for("the agent online", || server.online(id).filter(|o| *o));
    agent
}

/// Puts machines in zone `zone` and waits until the server shows them as members.
fn zone(server: &Server, zone: &str, machines: &[&str]) {
    let mut args = vec!["zones", "set", zone];
    for m in machines {
        args.extend(["--machine", m]);
    }
    output(server.cli(&args));
    wait_for("the zone's members", || {
        let z = server.get_json(&format!("/api/v1/zones/{zone}"));
        (z["members"].as_array()?.len() == machines.len()).then_some(())
    });
    // The agents follow the zone's topic once their configuration arrives; give them a moment
    // (a lost broadcast is re-sent at a heartbeat anyway).
    std::thread::sleep(Duration::from_millis(500));
}

/// `boottorrent deploy ... --json`; returns the deployment id.
fn deploy(server: &Server, args: &[&str]) -> String {
    let mut all = vec!["deploy", "--json"];
    all.extend_from_slice(args);
    let out = output(server.cli(&all));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "deploy printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    d["id"].as_str().unwrap().to_owned()
}

fn deployment(server: &Server, id: &str) -> serde_json::Value {
    server.get_json(&format!("/api/v1/deployments/{id}"))
}

fn machine_state(d: &serde_json::Value, machine: &str) -> String {
    d["machines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == machine)
        .map(|m| m["state"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| "absent".into())
}

/// Waits until the deployment's overall state is `state`.
fn wait_state(server: &Server, id: &str, state: &str) -> serde_json::Value {
    wait_long(&format!("deployment {id} {state}"), || {
        let d = deployment(server, id);
        (d["state"] == state).then_some(d)
    })
}

#[test]
fn a_zone_deployment_with_set_boot_reaches_booted_on_three_agents() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), SERVE);
    let (image, vhdx) = catalogue_id(&server, dir, 6 << 20);
    let ids = ["lab-1", "lab-2", "lab-3"];
    let _agents: Vec<Proc> = ids
        .iter()
        .map(|id| start_agent(dir, &server, id, &[]))
        .collect();
    zone(&server, "lab", &ids);

    let id = deploy(&server, &[&image, "--zone", "lab", "--action", "set-boot"]);
    // The operator's live view follows it to the end and says it went well.
    let status = server.cli(&["status", &id, "--watch"]).output().unwrap();
    let shown = String::from_utf8_lossy(&status.stdout).into_owned()
        + &String::from_utf8_lossy(&status.stderr);
    assert!(status.status.success(), "status --watch failed:\n{shown}");

    let d = deployment(&server, &id);
    assert_eq!(d["state"], "completed", "{d:#}");
    assert_eq!(d["counts"]["booted"], 3, "{d:#}");
    let source = std::fs::read(&vhdx).unwrap();
    for m in d["machines"].as_array().unwrap() {
        let machine = m["id"].as_str().unwrap();
        assert_eq!(m["state"], "booted");
        // Every transition is recorded, in pipeline order.
        let states: Vec<&str> = m["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["state"].as_str().unwrap())
            .collect();
        let order = ["pending", "verifying", "staged", "booting", "booted"];
        let positions: Vec<usize> = order
            .iter()
            .map(|s| {
                states
                    .iter()
                    .position(|x| x == s)
                    .unwrap_or_else(|| panic!("{machine}: no {s} in {states:?}"))
            })
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{states:?}");
        // The boot program ran once, for this image and deployment.
        let marker = std::fs::read_to_string(dir.join(format!("{machine}.marker"))).unwrap();
        assert_eq!(marker.trim(), format!("set-boot {image} {id}"));
        assert_eq!(
            std::fs::read(dir.join(machine).join(format!("images/{image}.vhdx"))).unwrap(),
            source
        );
    }
    assert!(shown.contains("booted"), "{shown}");

    // Prometheus sees the deployment and what the seeder sent.
    let metrics = reqwest::blocking::get(server.url("/metrics"))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("boottorrent_deployments{state=\"completed\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("boottorrent_machines_online 3\n"),
        "{metrics}"
    );
    // The seeder's byte counter moves on the engine's once-a-second stats tick, which a
    // quick deployment can beat.
    wait_for("the seeder's upload counter", || {
        let metrics = reqwest::blocking::get(server.url("/metrics"))
            .ok()?
            .text()
            .ok()?;
        let uploaded: u64 = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "boottorrent_seeder_uploaded_bytes_total{{image=\"{image}\"}} "
                ))
            })
            .unwrap_or_else(|| panic!("no seeder line for {image}:\n{metrics}"))
            .parse()
            .unwrap();
        (uploaded > 0).then_some(())
    });
    assert!(
        metrics.contains("boottorrent_images{state=\"ready\"} 1\n"),
        "{metrics}"
    );
}

#[test]
fn an_image_a_machine_already_holds_is_deployed_again_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), SERVE);
    let (image, vhdx) = catalogue_id(&server, dir, 6 << 20);
    let agent = start_agent(dir, &server, "lab-r", &[]);
    let first = deploy(&server, &[&image, "--machine", "lab-r"]);
    wait_state(&server, &first, "completed");

    // The same image again, now to boot: no download, yet the new deployment completes and
    // its own action runs.
    let second = deploy(
        &server,
        &[&image, "--machine", "lab-r", "--action", "set-boot"],
    );
    let d = wait_state(&server, &second, "completed");
    assert_eq!(machine_state(&d, "lab-r"), "booted", "{d:#}");
    // The boot program appends a line per run.
    let marker = std::fs::read_to_string(dir.join("lab-r.marker")).unwrap();
    assert_eq!(
        marker.lines().collect::<Vec<_>>(),
        [format!("set-boot {image} {second}")]
    );
    // And a third time with the same action: its boot runs too, for its own deployment.
    let third = deploy(
        &server,
        &[&image, "--machine", "lab-r", "--action", "set-boot"],
    );
    let d = wait_state(&server, &third, "completed");
    assert_eq!(machine_state(&d, "lab-r"), "booted", "{d:#}");
    let marker = std::fs::read_to_string(dir.join("lab-r.marker")).unwrap();
    assert_eq!(
        marker.lines().collect::<Vec<_>>(),
        [
            format!("set-boot {image} {second}"),
            format!("set-boot {image} {third}")
        ]
    );
    let log = agent.log_text();
    assert_eq!(
        log.matches("image staged").count(),
        3,
        "one staging per deployment:\n{log}"
    );
    // What was booted is a differencing child in the store, kept across the two boots; the
    // golden it reads through is still byte for byte the catalog's image.
    let store = dir.join("lab-r");
    let golden = std::fs::read_dir(store.join("images"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        std::fs::read(&golden).unwrap(),
        std::fs::read(&vhdx).unwrap()
    );
    let child = store.join("children").join(format!("{image}.vhdx"));
    boottorrent_vhdx::inspect_child(&child, &golden).unwrap();
    assert_eq!(log.matches("made the boot child").count(), 1, "{log}");
}

#[test]
fn an_agent_offline_at_the_start_catches_up_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), SERVE);
    let (image, vhdx) = catalogue_id(&server, dir, 4 << 20);
    let _on = start_agent(dir, &server, "room-on", &[]);
    let mut late = start_agent(dir, &server, "room-late", &[]);
    zone(&server, "room", &["room-on", "room-late"]);
    late.terminate();
    wait_for("room-late offline", || {
        server.online("room-late").filter(|o| !*o)
    });

    let id = deploy(&server, &[&image, "--zone", "room"]);
    wait_long("room-on staged", || {
        (machine_state(&deployment(&server, &id), "room-on") == "staged").then_some(())
    });
    let d = deployment(&server, &id);
    assert_eq!(machine_state(&d, "room-late"), "pending", "{d:#}");
    assert_eq!(d["state"], "running");

    let _late = start_agent(dir, &server, "room-late", &[]);
    let d = wait_state(&server, &id, "completed");
    assert_eq!(d["counts"]["staged"], 2, "{d:#}");
    assert_eq!(
        std::fs::read(dir.join(format!("room-late/images/{image}.vhdx"))).unwrap(),
        std::fs::read(&vhdx).unwrap()
    );
}

#[test]
fn cancelling_mid_download_stops_the_agents_and_deletes_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), SERVE);
    let (image, _) = catalogue_id(&server, dir, 24 << 20);
    let slow = ["--download-limit-bps", "1000000"];
    let ids = ["cx-1", "cx-2"];
    let _agents: Vec<Proc> = ids
        .iter()
        .map(|id| start_agent(dir, &server, id, &slow))
        .collect();
    let id = deploy(&server, &[&image, "--machine", "cx-1", "--machine", "cx-2"]);
    wait_long("both downloading with bytes in", || {
        let d = deployment(&server, &id);
        d["machines"]
            .as_array()?
            .iter()
            .all(|m| m["state"] == "downloading" && m["bytes_done"].as_u64() > Some(0))
            .then_some(())
    });
    for m in ids {
        assert!(dir.join(m).join(format!("images/{image}.vhdx")).exists());
    }

    let out = output(server.cli(&["deployments", "cancel", &id]));
    assert!(!out.stdout.is_empty());
    let d = deployment(&server, &id);
    assert_eq!(d["state"], "cancelled", "{d:#}");
    assert_eq!(d["counts"]["cancelled"], 2, "{d:#}");
    for m in ids {
        let file = dir.join(m).join(format!("images/{image}.vhdx"));
        wait_long(&format!("{} deleted", file.display()), || {
            (!file.exists()).then_some(())
        });
    }
    // The agents no longer hold the image (their heartbeats say so).
    wait_long("no image held", || {
        ids.iter()
            .all(|m| {
                server.get_json(&format!("/api/v1/machines/{m}"))["images"]
                    .as_array()
                    .is_some_and(|a| a.is_empty())
            })
            .then_some(())
    });
    // Nothing comes back: no progress after the cancel changes the deployment.
    std::thread::sleep(Duration::from_secs(3));
    let later = deployment(&server, &id);
    assert_eq!(later["counts"], d["counts"]);
    assert!(!dir.join(format!("cx-1/images/{image}.vhdx")).exists());
}

#[test]
fn a_server_killed_mid_deployment_and_restarted_still_completes_it() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut server = Server::start(&dir.join("server"), SERVE);
    let (image, vhdx) = catalogue_id(&server, dir, 16 << 20);
    let slow = ["--download-limit-bps", "2000000"];
    let ids = ["kx-1", "kx-2"];
    let _agents: Vec<Proc> = ids
        .iter()
        .map(|id| start_agent(dir, &server, id, &slow))
        .collect();
    zone(&server, "kx", &ids);
    let id = deploy(&server, &[&image, "--zone", "kx", "--action", "set-boot"]);
    wait_long("a download under way", || {
        let d = deployment(&server, &id);
        d["machines"]
            .as_array()?
            .iter()
            .any(|m| m["bytes_done"].as_u64() > Some(0))
            .then_some(())
    });

    server.kill9();
    server = server.restart(SERVE);
    let d = wait_state(&server, &id, "completed");
    assert_eq!(d["counts"]["booted"], 2, "{d:#}");
    let source = std::fs::read(&vhdx).unwrap();
    for m in ids {
        assert_eq!(
            std::fs::read(dir.join(m).join(format!("images/{image}.vhdx"))).unwrap(),
            source
        );
        let marker = std::fs::read_to_string(dir.join(format!("{m}.marker"))).unwrap();
        assert_eq!(marker.lines().count(), 1, "booted once: {marker}");
    }
    let status = server.cli(&["status", &id]).output().unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
}

#[test]
fn bad_deployment_and_zone_requests_are_refused_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut server = Server::start(&dir.join("server"), SERVE);
    let (image, _) = catalogue_id(&server, dir, 1 << 20);
    let _agent = start_agent(dir, &server, "ok-1", &[]);
    let token = server.token("admin.token");
    let client = reqwest::blocking::Client::new();
    let post = |path: &str, body: &str, auth: bool| {
        let mut request = client
            .post(server.url(path))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if auth {
            request = request.bearer_auth(&token);
        }
        let response = request.send().unwrap();
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().unwrap_or(serde_json::Value::Null);
        (
            status,
            body["error"].as_str().unwrap_or_default().to_owned(),
        )
    };
    let cases: Vec<(String, u16, &str)> = vec![
        (
            r#"{"image": "nope", "target": {"global": true}}"#.to_owned(),
            404,
            "no image",
        ),
        (
            format!(r#"{{"image": "{image}", "target": {{"zone": "nowhere"}}}}"#),
            404,
            "no zone nowhere",
        ),
        (
            format!(r#"{{"image": "{image}", "target": {{"zone": "bad zone"}}}}"#),
            400,
            "zone id",
        ),
        (
            format!(r#"{{"image": "{image}", "target": {{"machines": []}}}}"#),
            400,
            "no machines",
        ),
        (
            format!(r#"{{"image": "{image}", "target": {{"machines": ["ok-1", "pc/../x"]}}}}"#),
            400,
            "machines[1]: invalid machine id",
        ),
        (
            format!(r#"{{"image": "{image}", "target": {{"machines": ["ghost"]}}}}"#),
            404,
            "ghost",
        ),
        (
            format!(r#"{{"image": "{image}", "target": {{"global": false}}}}"#),
            400,
            "global",
        ),
        (
            format!(r#"{{"image": "{image}", "target": {{}}}}"#),
            400,
            "",
        ),
        (
            format!(r#"{{"image": "{image}", "target": {{"global": true}}, "action": "explode"}}"#),
            400,
            "explode",
        ),
        (
            format!(
                r#"{{"image": "{image}", "target": {{"global": true}}, "persistence": "reset"}}"#
            ),
            400,
            "action \"stage\" boots nothing",
        ),
        (
            format!(
                r#"{{"image": "{image}", "target": {{"global": true}}, "action": "reboot", "persistence": "forever"}}"#
            ),
            400,
            "forever",
        ),
        (format!(r#"{{"image": "{image}""#), 400, ""),
        ("not json".to_owned(), 400, ""),
    ];
    for (body, status, says) in &cases {
        let (got, error) = post("/api/v1/deployments", body, true);
        assert_eq!(got, *status, "{body} -> {error}");
        assert!(
            error.contains(says),
            "{body}: error {error:?} should mention {says:?}"
        );
        assert!(!error.is_empty(), "{body}: no error text");
    }
    let (got, _) = post(
        "/api/v1/deployments",
        &format!(r#"{{"image": "{image}", "target": {{"global": true}}}}"#),
        false,
    );
    assert_eq!(got, 401);
    assert_eq!(
        server.get_json("/api/v1/deployments"),
        serde_json::json!([])
    );
    let (got, _) = (
        client
            .get(server.url("/api/v1/deployments/..%2Fetc"))
            .bearer_auth(&token)
            .send()
            .unwrap()
            .status()
            .as_u16(),
        (),
    );
    assert_eq!(got, 400);

    let put = |zone: &str, body: &str| {
        let response = client
            .put(server.url(&format!("/api/v1/zones/{zone}")))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .unwrap();
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().unwrap_or(serde_json::Value::Null);
        (
            status,
            body["error"].as_str().unwrap_or_default().to_owned(),
        )
    };
    for (zone, body, status, says) in [
        ("lab", r#"{"subnets": ["10.1.0.7/24"]}"#, 400, "10.1.0.0/24"),
        ("lab", r#"{"subnets": ["ten"]}"#, 400, "CIDR"),
        ("lab", r#"{}"#, 400, "neither machines nor subnets"),
        (
            "lab",
            r#"{"machines": ["ok-1"], "images": ["nope"]}"#,
            404,
            "no image",
        ),
        (
            "lab",
            r#"{"machines": ["ok-1"], "colour": "red"}"#,
            400,
            "colour",
        ),
        ("bad%20zone", r#"{"machines": ["ok-1"]}"#, 400, "zone id"),
    ] {
        let (got, error) = put(zone, body);
        assert_eq!(got, status, "{zone} {body} -> {error}");
        assert!(
            error.contains(says),
            "{body}: {error:?} should mention {says:?}"
        );
    }
    assert_eq!(server.get_json("/api/v1/zones"), serde_json::json!([]));
    assert!(server.running());
    assert_eq!(
        reqwest::blocking::get(server.url("/healthz"))
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn a_machine_that_joins_a_zone_later_gets_the_zones_images() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), SERVE);
    let (image, vhdx) = catalogue_id(&server, dir, 3 << 20);
    let _first = start_agent(dir, &server, "zj-1", &[]);
    let _second = start_agent(dir, &server, "zj-2", &[]);
    // Desired state: every member of the zone holds the image.
    output(server.cli(&["zones", "set", "zj", "--machine", "zj-1", "--image", &image]));
    let list = server.get_json("/api/v1/deployments");
    let d = &list.as_array().unwrap()[0];
    assert_eq!(d["zone_image"], true, "{d:#}");
    assert_eq!(d["target"], serde_json::json!({"zone": "zj"}));
    let id = d["id"].as_str().unwrap().to_owned();
    wait_state(&server, &id, "completed");
    assert_eq!(machine_state(&deployment(&server, &id), "zj-2"), "absent");

    // zj-2 joins: it is added to the zone's deployment and fetches the image.
    output(server.cli(&[
        "zones",
        "set",
        "zj",
        "--machine",
        "zj-1",
        "--machine",
        "zj-2",
        "--image",
        &image,
    ]));
    wait_long("zj-2 staged", || {
        (machine_state(&deployment(&server, &id), "zj-2") == "staged").then_some(())
    });
    assert_eq!(deployment(&server, &id)["state"], "completed");
    assert_eq!(
        std::fs::read(dir.join(format!("zj-2/images/{image}.vhdx"))).unwrap(),
        std::fs::read(&vhdx).unwrap()
    );
    // The zone's membership went to the agent too: its machine record says so.
    let machine = server.get_json("/api/v1/machines/zj-2");
    assert_eq!(machine["zones"], serde_json::json!(["zj"]));
    // Only one deployment: setting the zone again did not start another.
    assert_eq!(
        server
            .get_json("/api/v1/deployments")
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// This week's `golden.vhdx` and next week's are two images with one name: a machine holds
/// both, each in its own file, and the first is not overwritten by the second.
#[test]
fn two_images_with_the_same_name_are_held_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), SERVE);
    std::fs::create_dir_all(dir.join("week-1")).unwrap();
    std::fs::create_dir_all(dir.join("week-2")).unwrap();
    let (first, first_file) = catalogue_id(&server, &dir.join("week-1"), 3 << 20);
    let (second, second_file) = catalogue_id(&server, &dir.join("week-2"), 5 << 20);
    let _agent = start_agent(dir, &server, "lab-w", &[]);
    let d1 = deploy(&server, &[&first, "--machine", "lab-w"]);
    wait_state(&server, &d1, "completed");
    let d2 = deploy(&server, &[&second, "--machine", "lab-w"]);
    wait_state(&server, &d2, "completed");
    for (image, file) in [(&first, &first_file), (&second, &second_file)] {
        assert_eq!(
            std::fs::read(dir.join(format!("lab-w/images/{image}.vhdx"))).unwrap(),
            std::fs::read(file).unwrap(),
            "{image}"
        );
    }
}
