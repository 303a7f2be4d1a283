//! An agent stopped by SIGTERM in the middle of a download: it exits 0 well inside its
//! shutdown deadline, tells the server it went offline, and the next start resumes the
//! download from what the first run saved instead of fetching it again.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// The agent's own deadline for its tasks after a signal (`SHUTDOWN_DEADLINE`).
const AGENT_DEADLINE: Duration = Duration::from_secs(10);

#[test]
fn sigterm_mid_download_exits_cleanly_and_the_restart_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), &[]);
    let (image, vhdx) = catalogue(&server, dir, 24 << 20);
    let size = image["size"].as_u64().unwrap();
    let id = image["id"].as_str().unwrap().to_owned();
    enroll(&server, dir, "lab-t");
    let slow = ["--download-limit-bps", "2000000"];
    let mut first = run_agent(dir, &server, "lab-t", &slow);
    wait_for("the agent online", || server.online("lab-t").filter(|o| *o));

    // Deployed as the operator does; the machine's progress shows in the deployment.
    let response = reqwest::blocking::Client::new()
        .post(server.url("/api/v1/deployments"))
        .bearer_auth(server.token("admin.token"))
        .json(&serde_json::json!({
            "image": id, "target": { "machines": ["lab-t"] }, "action": "stage"
        }))
        .send()
        .unwrap();
    assert_eq!(response.status(), 201);
    let deployment: serde_json::Value = response.json().unwrap();
    let deployment = deployment["id"].as_str().unwrap().to_owned();
    let had = boottorrent_testkit::wait_until(
        "half the image downloaded",
        Duration::from_secs(60),
        || {
            let v = server.get_json(&format!("/api/v1/deployments/{deployment}"));
            v["bytes_done"].as_u64().filter(|done| *done >= size / 2)
        },
    );

    let asked = Instant::now();
    let status = first.terminate();
    let took = asked.elapsed();
    let log = first.log_text();
    assert!(status.success(), "{status}:\n{log}");
    assert!(
        took < AGENT_DEADLINE,
        "the agent took {took:?} to stop:\n{log}"
    );
    assert!(log.contains("download stopped"), "{log}");
    assert!(!log.contains("tasks still running"), "{log}");
    wait_for("lab-t offline after its shutdown", || {
        (server.online("lab-t") == Some(false)).then_some(())
    });
    // What the restart resumes from: the assignment, still downloading, and the engine's
    // resume record, saved on the way out.
    let assignments = std::fs::read_to_string(dir.join("lab-t/assignments.json")).unwrap();
    assert!(assignments.contains("downloading"), "{assignments}");
    let resume = dir.join(format!(
        "lab-t/resume/{}.resume",
        image["info_hash"].as_str().unwrap()
    ));
    assert!(resume.exists(), "no resume record {}", resume.display());

    let second = run_agent(dir, &server, "lab-t", &[]);
    let path = dir.join(format!("lab-t/images/{id}.vhdx"));
    let source = std::fs::read(&vhdx).unwrap();
    boottorrent_testkit::wait_until(
        "the resumed download to complete",
        Duration::from_secs(120),
        || {
            std::fs::read(&path)
                .ok()
                .filter(|d| *d == source)
                .map(|_| ())
        },
    );
    // The restart began from the pieces the first run wrote, not from nothing: its engine
    // found at least as many good on disk as the server had been told of, and took them
    // from the resume record without re-reading the file: the record the stop saved
    // matched the file as the stop left it.
    let log = second.log_text();
    let check = log
        .lines()
        .find(|l| l.contains("checked existing data"))
        .unwrap_or_else(|| panic!("no resume check in the restarted agent's log:\n{log}"));
    assert!(check.contains("fast_path=true"), "{check}");
    let found: u64 = Some(check)
        .and_then(|l| l.split(" pieces=").nth(1))
        .and_then(|p| p.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no piece count in {check}"));
    let piece = server.get_json(&format!("/api/v1/images/{id}"))["piece_size"]
        .as_u64()
        .unwrap();
    assert!(
        (found + 1) * piece > had,
        "the restart found {found} pieces of {piece} bytes; the first run had reported {had} bytes"
    );
}
