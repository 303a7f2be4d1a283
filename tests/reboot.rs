//! `reboot` deployments end to end: the real server and agents as processes on loopback, the
//! `command` backend standing in for the boot step. A "reboot" is the test stopping the agent
//! and starting the agent of the booted system: a new process with its own configuration and
//! the same store. Whether the machine came back in the image is what that agent reads from
//! its `running_image_file`, which the test's boot program writes into the "next system".

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// Heartbeats (and the server's sweeps) every 2 s; a machine has 20 s to come back.
const SERVE: &[&str] = &[
    "--heartbeat-interval-secs",
    "2",
    "--reboot-timeout-secs",
    "20",
];

const PATIENCE: Duration = Duration::from_secs(120);

fn wait_long<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    wait_until(what, PATIENCE, check)
}

/// A boot program that writes the image id and the file booted into the "next system" of
/// the machine (`$NEXT_SYSTEM/running-image`), as a site's program writes them into the root
/// it boots, and logs each run to `$NEXT_SYSTEM/boots`.
fn boot_script(dir: &Path) -> PathBuf {
    let script = dir.join("reboot.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nset -e\nmkdir -p \"$NEXT_SYSTEM\"\n\
         printf '%s\\n%s\\n' \"$BOOTTORRENT_IMAGE_ID\" \"$BOOTTORRENT_IMAGE_PATH\" \
           > \"$NEXT_SYSTEM/running-image\"\n\
         echo \"$BOOTTORRENT_ACTION $BOOTTORRENT_IMAGE_ID $BOOTTORRENT_IMAGE_PATH\" >> \"$NEXT_SYSTEM/boots\"\n",
    )
    .unwrap();
    let mut perms = std::fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&script, perms).unwrap();
    script
}

/// Starts the agent of machine `id` in its "installed system": the `command` backend with
/// [`boot_script`], and a `running_image_file` that does not exist (runs no booted image).
fn start_installed(dir: &Path, server: &Server, id: &str) -> Proc {
    enroll(server, dir, id);
    let script = boot_script(dir);
    let installed = dir.join(format!("{id}-installed/running-image"));
    let mut command = run_agent_command(
        dir,
        server,
        id,
        &[
            "--boot-backend",
            "command",
            "--boot-command",
            script.to_str().unwrap(),
            "--running-image-file",
            installed.to_str().unwrap(),
        ],
    );
    command.env("NEXT_SYSTEM", dir.join(format!("{id}-next")));
    let agent = spawn(command, dir.join(format!("{id}.log")));
    wait_for("the agent online", || server.online(id).filter(|o| *o));
    agent
}

/// Starts the agent of the system machine `id` rebooted into: its own configuration file
/// (no machine id: the store names the machine), the same store, and `running_image_file`
/// inside that system.
fn start_rebooted(dir: &Path, server: &Server, id: &str, system: &Path) -> Proc {
    let config = dir.join(format!("{id}-rebooted.toml"));
    std::fs::write(
        &config,
        format!(
            "server = \"127.0.0.1\"\nmqtt_port = {}\nhttp_url = {:?}\ndata_dir = {:?}\n\
             bt_listen = \"127.0.0.1:0\"\nheartbeat_interval_secs = 1\n\
             boot_backend = \"command\"\nboot_command = {:?}\nrunning_image_file = {:?}\n",
            server.mqtt_port,
            server.url(""),
            dir.join(id),
            boot_script(dir),
            system.join("running-image"),
        ),
    )
    .unwrap();
    let mut command = agent(&["run"]);
    command
        .arg("--config")
        .arg(&config)
        .env("BOOTTORRENT_AGENT_ENROLL_TOKEN", server.enroll_token())
        // Its boot program boots the next system the same way.
        .env("NEXT_SYSTEM", dir.join(format!("{id}-next")));
    // One log per start: a machine reboots more than once in a term.
    let mut n = 1;
    while dir.join(format!("{id}-rebooted-{n}.log")).exists() {
        n += 1;
    }
    spawn(command, dir.join(format!("{id}-rebooted-{n}.log")))
}

fn deploy_reboot(server: &Server, image: &str, machines: &[&str]) -> String {
    let mut args = vec!["deploy", "--json", image, "--action", "reboot"];
    for m in machines {
        args.extend(["--machine", m]);
    }
    let out = output(server.cli(&args));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    d["id"].as_str().unwrap().to_owned()
}

fn machine<'a>(d: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    d["machines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {d:#}"))
}

/// Waits until the agent's boot step ran and the server waits for `id` to come back.
fn wait_rebooting(server: &Server, deployment: &str, id: &str) -> serde_json::Value {
    wait_long(&format!("{id} rebooting"), || {
        let d = server.get_json(&format!("/api/v1/deployments/{deployment}"));
        let m = machine(&d, id);
        (m["state"] == "booting" && m["rebooted_ms"].is_i64()).then(|| d.clone())
    })
}

#[test]
fn a_reboot_is_booted_when_the_machine_comes_back_running_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), SERVE);
    let (image, _) = catalogue(&server, dir, 4 << 20);
    let image = image["id"].as_str().unwrap().to_owned();
    let mut installed = start_installed(dir, &server, "lab-a");
    let m = server.machine("lab-a").unwrap();
    assert_eq!(m["running"], serde_json::Value::Null, "{m}");

    let id = deploy_reboot(&server, &image, &["lab-a"]);
    let d = wait_rebooting(&server, &id, "lab-a");
    // The boot step succeeding is not the machine running the image.
    assert_eq!(d["state"], "running", "{d:#}");
    let next = dir.join("lab-a-next");
    let child = dir.join(format!("lab-a/children/{image}.vhdx"));
    let boots = format!("reboot {image} {}\n", child.display());
    assert_eq!(std::fs::read_to_string(next.join("boots")).unwrap(), boots);
    let key = std::fs::read(dir.join("lab-a/agent.key")).unwrap();
    assert!(installed.terminate().success(), "{}", installed.log_text());

    let rebooted = start_rebooted(dir, &server, "lab-a", &next);
    let d = wait_long("the deployment completed", || {
        let d = server.get_json(&format!("/api/v1/deployments/{id}"));
        (d["state"] != "running").then_some(d)
    });
    assert_eq!(d["state"], "completed", "{d:#}\n{}", rebooted.log_text());
    let m = machine(&d, "lab-a");
    assert_eq!(m["state"], "booted", "{m:#}");
    assert_eq!(
        m["running"],
        serde_json::json!({"image": image, "deployment": id})
    );
    // The machine shows what it runs, the same machine with the same key.
    let shown = server.machine("lab-a").unwrap();
    assert_eq!(
        shown["running"],
        serde_json::json!({"image": image, "deployment": id}),
        "{shown}"
    );
    assert_eq!(std::fs::read(dir.join("lab-a/agent.key")).unwrap(), key);
    let log = rebooted.log_text();
    assert!(log.contains("running image"), "{log}");
    assert_eq!(
        std::fs::read_to_string(next.join("boots")).unwrap(),
        boots,
        "the boot step does not run again in the booted system"
    );
    // The operator's views say it too.
    let list = output(server.cli(&["machines", "list"]));
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains("RUNNING") && list.contains(&image), "{list}");
    let status = output(server.cli(&["status", &id]));
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("RUNNING") && status.contains(&format!("{image} ({id})")),
        "{status}"
    );
}

#[test]
fn a_machine_back_in_its_old_system_or_not_back_at_all_fails_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), SERVE);
    let (image, _) = catalogue(&server, dir, 4 << 20);
    let image = image["id"].as_str().unwrap().to_owned();
    let mut old = start_installed(dir, &server, "lab-old");
    let mut gone = start_installed(dir, &server, "lab-gone");

    let id = deploy_reboot(&server, &image, &["lab-old", "lab-gone"]);
    wait_rebooting(&server, &id, "lab-old");
    wait_rebooting(&server, &id, "lab-gone");
    assert!(old.terminate().success(), "{}", old.log_text());
    assert!(gone.terminate().success(), "{}", gone.log_text());

    // lab-old comes back in the system it ran before: one that says it runs another image.
    let before = dir.join("lab-old-before");
    std::fs::create_dir_all(&before).unwrap();
    std::fs::write(before.join("running-image"), "old-image\n").unwrap();
    let _back = start_rebooted(dir, &server, "lab-old", &before);
    let d = wait_long("lab-old failed", || {
        let d = server.get_json(&format!("/api/v1/deployments/{id}"));
        (machine(&d, "lab-old")["state"] == "failed").then_some(d)
    });
    let error = machine(&d, "lab-old")["error"].as_str().unwrap().to_owned();
    assert!(
        error.contains("running image old-image") && error.contains(&format!("not image {image}")),
        "{error}"
    );
    assert_eq!(machine(&d, "lab-gone")["state"], "booting", "{d:#}");

    // lab-gone never comes back: failed once the reboot timeout passed.
    let d = wait_long("lab-gone failed", || {
        let d = server.get_json(&format!("/api/v1/deployments/{id}"));
        (machine(&d, "lab-gone")["state"] == "failed").then_some(d)
    });
    let error = machine(&d, "lab-gone")["error"].as_str().unwrap();
    assert!(error.contains("did not come back within 20 s"), "{error}");
    assert_eq!(d["state"], "failed", "{d:#}");
}

/// One machine through a term, as a lab runs it (#16): it reboots into image A, comes back
/// running A and seeds A unchanged; reboots into B and runs B; A is withdrawn and deleted
/// with its boot child; B deployed again completes at once. The same key throughout, and no
/// approval asked at any start. Both images are `golden.vhdx`, as this week's and next
/// week's would be.
#[test]
fn a_machine_lives_a_term_of_images_with_one_key_and_no_approval() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), SERVE);
    std::fs::create_dir_all(dir.join("week-1")).unwrap();
    std::fs::create_dir_all(dir.join("week-2")).unwrap();
    let (a, a_file) = catalogue(&server, &dir.join("week-1"), 3 << 20);
    let (b, _) = catalogue(&server, &dir.join("week-2"), 5 << 20);
    let (a, b) = (
        a["id"].as_str().unwrap().to_owned(),
        b["id"].as_str().unwrap().to_owned(),
    );
    let store = dir.join("lab-l");
    let next = dir.join("lab-l-next");
    let mut agent = start_installed(dir, &server, "lab-l");
    let key = server.machine("lab-l").unwrap()["public_key"].clone();
    let same_machine = |what: &str| {
        let m = server.machine("lab-l").unwrap();
        assert_eq!(m["key_state"], "approved", "{what}: {m}");
        assert_eq!(m["public_key"], key, "{what}: {m}");
        m
    };

    for (image, step) in [(&a, "A"), (&b, "B")] {
        let id = deploy_reboot(&server, image, &["lab-l"]);
        wait_rebooting(&server, &id, "lab-l");
        assert!(agent.terminate().success(), "{}", agent.log_text());
        agent = start_rebooted(dir, &server, "lab-l", &next);
        let d = wait_long(&format!("the reboot into {step}"), || {
            let d = server.get_json(&format!("/api/v1/deployments/{id}"));
            (d["state"] != "running").then_some(d)
        });
        assert_eq!(d["state"], "completed", "{d:#}\n{}", agent.log_text());
        let m = same_machine(step);
        assert_eq!(m["running"]["image"], image.as_str(), "{m}");
        // What it runs is a child; the golden keeps seeding exactly what the catalog has.
        assert!(store.join(format!("children/{image}.vhdx")).exists());
    }
    assert_eq!(
        std::fs::read(store.join(format!("images/{a}.vhdx"))).unwrap(),
        std::fs::read(&a_file).unwrap(),
        "A seeds unchanged"
    );

    // A is withdrawn: the machine deletes it and its boot child.
    let first = server.get_json("/api/v1/deployments");
    let a_deployment = first
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["image"]["id"] == a.as_str() || d["image"] == a.as_str())
        .unwrap_or_else(|| panic!("no deployment of {a} in {first:#}"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    output(server.cli(&["deployments", "cancel", &a_deployment]));
    wait_long("A deleted", || {
        (!store.join(format!("images/{a}.vhdx")).exists()
            && !store.join(format!("children/{a}.vhdx")).exists())
        .then_some(())
    });
    assert!(store.join(format!("images/{b}.vhdx")).exists());

    // B again, to stage: nothing to fetch, the deployment completes at once.
    let out = output(server.cli(&["deploy", "--json", &b, "--machine", "lab-l"]));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let again = d["id"].as_str().unwrap().to_owned();
    let started = Instant::now();
    let d = wait_long("B deployed again", || {
        let d = server.get_json(&format!("/api/v1/deployments/{again}"));
        (d["state"] == "completed").then_some(d)
    });
    assert_eq!(machine(&d, "lab-l")["state"], "staged", "{d:#}");
    eprintln!(
        "re-deploy of a held image completed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    same_machine("the end of the term");
    drop(agent);
}

/// A `reset` deployment (#16): every boot starts from a fresh child of the golden. The agent
/// started inside the image makes the other child anew and points the boot entry at it, once
/// per boot; what the system wrote into the child it ran is gone at the boot after.
#[test]
fn a_reset_image_starts_every_boot_from_a_fresh_child() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), SERVE);
    let (image, _) = catalogue(&server, dir, 3 << 20);
    let image = image["id"].as_str().unwrap().to_owned();
    let store = dir.join("lab-r");
    let next = dir.join("lab-r-next");
    let slots = [
        store.join(format!("children/{image}.vhdx")),
        store.join(format!("children/{image}.2.vhdx")),
    ];
    let boots = || -> Vec<String> {
        let text = std::fs::read_to_string(next.join("boots")).unwrap_or_default();
        text.lines().map(str::to_owned).collect()
    };
    let booted = |action: &str, slot: &Path| format!("{action} {image} {}", slot.display());
    // A boot: the system the boot entry points at now starts, with its own marker.
    let boot_into = |n: u32| -> PathBuf {
        let system = dir.join(format!("lab-r-boot-{n}"));
        std::fs::create_dir_all(&system).unwrap();
        std::fs::copy(next.join("running-image"), system.join("running-image")).unwrap();
        system
    };

    let mut agent = start_installed(dir, &server, "lab-r");
    let out = output(server.cli(&[
        "deploy",
        "--json",
        &image,
        "--action",
        "reboot",
        "--persistence",
        "reset",
        "--machine",
        "lab-r",
    ]));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["persistence"], "reset", "{d:#}");
    let id = d["id"].as_str().unwrap().to_owned();
    wait_rebooting(&server, &id, "lab-r");
    assert!(agent.terminate().success(), "{}", agent.log_text());
    assert_eq!(boots(), [booted("reboot", &slots[0])]);
    let fresh = std::fs::metadata(&slots[0]).unwrap().len();

    // Boot 1, from the first child: the deployment is done, and the second child is ready.
    let first_boot = boot_into(1);
    agent = start_rebooted(dir, &server, "lab-r", &first_boot);
    let d = wait_long("the reboot into the image", || {
        let d = server.get_json(&format!("/api/v1/deployments/{id}"));
        (d["state"] != "running").then_some(d)
    });
    assert_eq!(d["state"], "completed", "{d:#}\n{}", agent.log_text());
    wait_long("the next child made", || (boots().len() == 2).then_some(()));
    assert_eq!(
        boots()[1],
        booted("set-boot", &slots[1]),
        "{}",
        agent.log_text()
    );
    assert_eq!(std::fs::metadata(&slots[1]).unwrap().len(), fresh);
    // The running system writes into its child.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&slots[0])
            .unwrap();
        f.write_all(&[0x5A; 1 << 20]).unwrap();
    }

    // The agent restarts within the same boot: nothing is made again.
    assert!(agent.terminate().success(), "{}", agent.log_text());
    agent = start_rebooted(dir, &server, "lab-r", &first_boot);
    wait_long("the restarted agent's check", || {
        agent
            .log_text()
            .contains("made earlier in this boot")
            .then_some(())
    });
    assert_eq!(boots().len(), 2, "{:?}", boots());

    // Boot 2, from the second child: the first, written into, is made anew for boot 3.
    assert!(agent.terminate().success(), "{}", agent.log_text());
    agent = start_rebooted(dir, &server, "lab-r", &boot_into(2));
    wait_long("the next child made again", || {
        (boots().len() == 3).then_some(())
    });
    assert_eq!(
        boots()[2],
        booted("set-boot", &slots[0]),
        "{}",
        agent.log_text()
    );
    assert_eq!(
        std::fs::metadata(&slots[0]).unwrap().len(),
        fresh,
        "what boot 1 wrote is gone"
    );
    let m = server.machine("lab-r").unwrap();
    assert_eq!(m["running"]["image"], image.as_str(), "{m}");
    assert_eq!(m["key_state"], "approved", "{m}");
    drop(agent);
}
