//! The server stopped by SIGTERM while it imports an image: the import stops at its cancel
//! flag, the server exits well inside its shutdown deadline, and the next start imports the
//! image again instead of listing a half-read file as ready.

mod common;

use std::time::Duration;

use common::{Server, image_add, wait_for};
use serde_json::Value;

/// The server's own deadline for its tasks after a signal (`SHUTDOWN_DEADLINE`).
const SERVER_DEADLINE: Duration = Duration::from_secs(10);

#[test]
fn sigterm_during_an_import_stops_it_and_the_next_start_imports_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &[]);
    // Sparse: no disk used, yet minutes of hashing, far more than the deadline.
    let file = dir.path().join("big.raw");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(64 << 30)
        .unwrap();
    let out = image_add(&server, &file, &["--raw", "--no-wait"]);
    assert!(
        out.status.success(),
        "image add failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(image["state"], "importing", "{image}");
    let id = image["id"].as_str().unwrap().to_owned();
    let size = image["size"].as_u64().unwrap();
    wait_for("the import to be under way", || {
        let v = server.get_json(&format!("/api/v1/images/{id}"));
        (v["import_done"].as_u64().unwrap_or(0) > 0).then_some(())
    });

    let stopped = server.proc.terminate_within(SERVER_DEADLINE);
    assert!(
        stopped.is_some(),
        "the server still ran {} s after SIGTERM:\n{}",
        SERVER_DEADLINE.as_secs(),
        server.log_text()
    );
    let log = server.log_text();
    assert!(log.contains("import cancelled by shutdown"), "{log}");
    assert!(!log.contains("tasks still running"), "{log}");
    assert!(!log.contains("image imported"), "{log}");

    // The record still says importing, as after a crash: the import starts over.
    let server = server.restart(&[]);
    for _ in 0..5 {
        let listed = server.get_json("/api/v1/images");
        let listed = listed.as_array().unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0]["id"], id.as_str());
        assert_eq!(listed[0]["state"], "importing", "{listed:?}");
        assert!(listed[0]["import_done"].as_u64().unwrap() < size);
        assert!(listed[0]["info_hash"].is_null(), "{listed:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        server
            .log_text()
            .contains("resuming an import the last run did not finish"),
        "{}",
        server.log_text()
    );
}
