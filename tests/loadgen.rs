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

/// Ctrl-C on a run that started its own server stops that server too, and keeps the run's
/// files: an operator interrupting a long benchmark must not be left with a server holding
/// its ports and thousands of descriptors.
#[test]
fn an_interrupted_generator_stops_the_server_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let mut command = Command::new(loadgen_binary());
    command
        .args([
            "fleet",
            "--agents",
            "3",
            "--ramp-secs",
            "1",
            "--idle-secs",
            "600",
        ])
        .args(["--server-binary", BOOTTORRENT])
        .args(["--work-dir", work.to_str().unwrap()]);
    let mut generator = spawn(command, dir.path().join("generator.log"));
    // The server is the generator's child; once its admin token exists it is serving.
    let server = wait_until(
        "the generator's server to start",
        Duration::from_secs(60),
        || {
            if let Some(status) = generator.exited() {
                panic!(
                    "the generator exited with {status}:\n{}",
                    generator.log_tail(30)
                );
            }
            let token = work.join("data/admin.token").exists();
            children_of(generator.pid()).into_iter().find(|_| token)
        },
    );
    // Should the generator leave it running (the failure this test is for), it must not
    // outlive the test.
    let _reaper = Reaper(server);
    // Let the agents come online: the interruption lands in the measurement, not the start.
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: kill() with the pid of a child that has not been reaped, and a valid signal.
    unsafe { libc::kill(generator.pid() as libc::pid_t, libc::SIGINT) };
    let status = wait_until("the generator to exit", Duration::from_secs(30), || {
        generator.exited()
    });
    assert!(!status.success(), "an interrupted run is not a success");
    let log = std::fs::read_to_string(dir.path().join("generator.log")).unwrap();
    assert!(
        log.contains("interrupted"),
        "the generator says why it stopped:\n{log}"
    );
    wait_until(
        "the started server to exit",
        Duration::from_secs(15),
        || (!alive(server)).then_some(()),
    );
    assert!(
        work.join("server.log").exists(),
        "an interrupted run keeps its files"
    );
}

/// The pids whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may hold spaces, so split after its ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            if let Ok(child) = entry.file_name().to_string_lossy().parse() {
                children.push(child);
            }
        }
    }
    children
}

/// Whether `pid` runs (a zombie, exited but not yet reaped, does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// Kills the process `.0` when dropped, if it still runs.
struct Reaper(u32);

impl Drop for Reaper {
    fn drop(&mut self) {
        if alive(self.0) {
            // SAFETY: kill() with a valid signal; at worst the pid names no process.
            unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
        }
    }
}
