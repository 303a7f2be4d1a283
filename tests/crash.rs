//! A server killed with SIGKILL while machines report under load loses nothing the API had
//! shown: `boottorrent-loadgen rate` runs simulated agents (own keys, signed progress and
//! heartbeats, new machines enrolling meanwhile) against a real server; the test reads the
//! deployment and the machines through the API as the events pour in, kills the server right
//! after its last read, restarts it on the same data directory and ports, and compares.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Serve flags: room for the new machines the generator enrols.
const SERVE: &[&str] = &["--enroll-per-minute", "100000"];

/// How far along a machine's row of a deployment is: its state's rank, then its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Along {
    rank: u8,
    bytes_done: u64,
}

/// The states a deployment's machine passes through, in order; a crash may leave a machine
/// where it was or further along, never earlier.
fn rank(state: &str) -> u8 {
    match state {
        "pending" => 0,
        "downloading" => 1,
        "verifying" => 2,
        "staged" => 3,
        "booting" => 4,
        "booted" => 5,
        "failed" | "stalled" | "cancelled" => 6,
        other => panic!("unknown machine state {other:?}"),
    }
}

/// The rows of deployment `id` of the generator's connected agents (the new machines it
/// enrols join the deployment too, but never report on it), by machine.
fn rows(server: &Server, id: &str) -> BTreeMap<String, Along> {
    let d = server.get_json(&format!("/api/v1/deployments/{id}"));
    d["machines"]
        .as_array()
        .unwrap_or_else(|| panic!("deployment {id} has no machine rows: {d:#}"))
        .iter()
        .filter(|m| !m["id"].as_str().is_some_and(|id| id.starts_with("cx-new")))
        .map(|m| {
            (
                m["id"].as_str().expect("a machine id").to_owned(),
                Along {
                    rank: rank(m["state"].as_str().expect("a state")),
                    bytes_done: m["bytes_done"].as_u64().expect("bytes_done"),
                },
            )
        })
        .collect()
}

/// Every machine the API lists, with its key's state, a page of 1,000 at a time.
fn machines(server: &Server) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut after = String::new();
    loop {
        let path = if after.is_empty() {
            "/api/v1/machines?limit=1000".to_owned()
        } else {
            format!("/api/v1/machines?limit=1000&after={after}")
        };
        let page = server.get_json(&path);
        let page = page.as_array().expect("a list of machines");
        for m in page {
            out.insert(
                m["id"].as_str().expect("an id").to_owned(),
                m["key_state"].as_str().unwrap_or_default().to_owned(),
            );
        }
        match page.last() {
            Some(last) if page.len() == 1000 => after = last["id"].as_str().unwrap().to_owned(),
            _ => return out,
        }
    }
}

#[test]
fn a_server_killed_under_load_keeps_everything_the_api_showed() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut server = Server::start(&dir.join("data"), SERVE);
    let agents = 40;
    let mut command = Command::new(loadgen_binary());
    command
        .args(["rate", "--json", "--prefix", "cx"])
        .args(["--agents", &agents.to_string()])
        .args(["--events-per-sec", "800", "--new-per-sec", "20"])
        .args(["--secs", "40", "--warmup-secs", "0", "--drain-secs", "2"])
        .args(["--server", &server.url("")])
        .args(["--mqtt", &format!("127.0.0.1:{}", server.mqtt_port)])
        .args(["--admin-token", &server.admin_token()])
        .args(["--enroll-token", &server.enroll_token()])
        .arg("--work-dir")
        .arg(dir.join("work"));
    let (mut loadgen, mut stdout) = spawn_reading_stdout(command, dir.join("loadgen.log"));

    // The generator deploys its image to every machine, then the progress pours in.
    let id = wait_until(
        "the generator's deployment",
        Duration::from_secs(120),
        || {
            let list = server.get_json("/api/v1/deployments");
            list.as_array()?.first()?["id"].as_str().map(str::to_owned)
        },
    );
    wait_until("progress from every agent", Duration::from_secs(60), || {
        let rows = rows(&server, &id);
        (rows.len() == agents && rows.values().all(|a| a.bytes_done > 0)).then_some(())
    });

    // Read for a while under load; what the last reads showed is what must survive.
    let reading = Instant::now();
    let mut shown_rows = BTreeMap::new();
    let mut shown_machines = BTreeMap::new();
    while reading.elapsed() < Duration::from_secs(3) {
        shown_rows = rows(&server, &id);
        shown_machines = machines(&server);
    }
    server.kill9();
    let new_before = shown_machines
        .keys()
        .filter(|m| m.starts_with("cx-new"))
        .count();
    assert!(
        new_before > 0,
        "new machines enrolled before the kill: {shown_machines:?}"
    );

    let server = server.restart(SERVE);
    // Straight after the restart, before the agents are back: the file alone.
    let after_rows = rows(&server, &id);
    let after_machines = machines(&server);
    for (machine, before) in &shown_rows {
        let after = after_rows
            .get(machine)
            .unwrap_or_else(|| panic!("{machine}'s row of {id} is gone after the restart"));
        assert!(
            after >= before,
            "{machine} went back from {before:?} to {after:?} in {id}"
        );
    }
    for (machine, key_state) in &shown_machines {
        assert_eq!(
            after_machines.get(machine),
            Some(key_state),
            "{machine} (key {key_state}) after the restart"
        );
    }

    // The agents reconnect and their later events apply on top.
    wait_until(
        "every agent's progress past what it was at the kill",
        Duration::from_secs(60),
        || {
            let now = rows(&server, &id);
            shown_rows
                .iter()
                .all(|(m, before)| now.get(m).is_some_and(|a| a.bytes_done > before.bytes_done))
                .then_some(())
        },
    );
    // New machines enrol on their own schedule, not the progress's: wait for one of them.
    wait_until(
        "new machines enrolling again after the restart",
        Duration::from_secs(60),
        || (machines(&server).len() > after_machines.len()).then_some(()),
    );

    let status = loadgen
        .wait_within(Duration::from_secs(120))
        .expect("the generator ends after its window");
    let mut report = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut report).unwrap();
    assert!(
        status.success(),
        "the generator failed:\n{}",
        loadgen.log_tail(40)
    );
    let report: serde_json::Value = serde_json::from_str(&report)
        .unwrap_or_else(|e| panic!("the generator's report is not JSON ({e}): {report}"));
    assert!(
        report["reconnects"]
            .as_u64()
            .is_some_and(|n| n >= agents as u64),
        "every agent logged in again: {report:#}"
    );
}
