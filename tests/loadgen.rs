//! `boottorrent-loadgen fleet` against the real server with a few simulated agents, so that
//! the load generator behind docs/benchmarks.md keeps working: every agent must come online in
//! the API and receive both deployments, with no failed connection and no refused command.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Runs `fleet` with `args` and a few agents, and checks its JSON report.
fn fleet(args: &[&str], agents: usize, zone_agents: usize) -> serde_json::Value {
    let mut command = Command::new(loadgen_binary());
    command
        .args(["fleet", "--json", "--ramp-secs", "1", "--settle-secs", "0"])
        .args(["--idle-secs", "1", "--poll-ms", "200"])
        .args(["--agents", &agents.to_string()])
        .args(["--zone-agents", &zone_agents.to_string()])
        .args(args);
    let out = run_within(command, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "boottorrent-loadgen failed:\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the report is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let context = format!("report:\n{report:#}\nstderr:\n{stderr}");
    assert_eq!(report["online_in_api"], agents, "{context}");
    assert_eq!(report["answered"], agents, "{context}");
    assert!(report["all_online_secs"].is_f64(), "{context}");
    assert_eq!(report["failed"], serde_json::json!({}), "{context}");
    assert_eq!(report["dropped"], serde_json::json!({}), "{context}");
    assert_eq!(report["refused_commands"], 0, "{context}");
    let fanout = report["fanout"].as_array().expect("a fan-out list");
    assert_eq!(fanout.len(), 2, "{context}");
    for (deployment, expected) in fanout.iter().zip([agents, zone_agents]) {
        assert_eq!(deployment["expected"], expected, "{context}");
        assert_eq!(deployment["received"], expected, "{context}");
        assert!(
            deployment["max_ms"].as_f64().is_some_and(|ms| ms > 0.0),
            "{context}"
        );
    }
    let idle = &report["idle"];
    assert!(
        idle["rss_mib"].as_f64().is_some_and(|mib| mib > 1.0),
        "{context}"
    );
    report
}

/// Against a server the test started (`--server`), measured through `--server-pid`.
#[test]
fn a_small_fleet_comes_online_and_receives_both_deployments() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let work = dir.path().join("work");
    fleet(
        &[
            "--server",
            &server.url(""),
            "--mqtt",
            &format!("127.0.0.1:{}", server.mqtt_port),
            "--admin-token",
            &server.admin_token(),
            "--enroll-token",
            &server.enroll_token(),
            "--server-pid",
            &server.pid().to_string(),
            "--work-dir",
            work.to_str().unwrap(),
        ],
        20,
        5,
    );
}

/// The way the benchmarks run it: the generator starts `boottorrent serve` itself.
#[test]
fn the_generator_starts_its_own_server() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let report = fleet(
        &[
            "--server-binary",
            BOOTTORRENT,
            "--work-dir",
            work.to_str().unwrap(),
        ],
        5,
        1,
    );
    assert!(report["server_pid"].is_u64(), "{report:#}");
    assert!(
        work.join("server.log").exists(),
        "the started server logs into the work dir"
    );
}

/// `rate` as `scripts/bench-rate` runs it, small: agents send at a rate while new machines
/// enrol, and the server applies what was sent (a debug build keeps up with 200 events/s).
#[test]
fn the_rate_generator_sees_its_events_applied() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let mut command = Command::new(loadgen_binary());
    command
        .args([
            "rate",
            "--json",
            "--agents",
            "10",
            "--events-per-sec",
            "200",
        ])
        .args(["--new-per-sec", "5", "--secs", "5", "--warmup-secs", "1"])
        .args(["--server-binary", BOOTTORRENT])
        .arg("--work-dir")
        .arg(&work);
    let out = run_within(command, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "boottorrent-loadgen rate failed:\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the report is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let context = format!("report:\n{report:#}\nstderr:\n{stderr}");
    let number = |key: &str| {
        report[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key}: {context}"))
    };
    assert!(number("sent_per_sec") > 150.0, "{context}");
    assert!(number("new_acked_per_sec") > 3.0, "{context}");
    assert!(number("applied_per_sec") > 150.0, "{context}");
    assert!(report["drain_secs"].is_f64(), "drained: {context}");
    assert_eq!(report["dropped"], 0, "{context}");
    assert_eq!(report["metrics_failures"], 0, "{context}");
    assert!(number("server_cpu_percent") > 0.0, "{context}");
}
