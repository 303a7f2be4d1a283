//! `boottorrent-agent config`, `run` and `enroll` as real processes, without a server.

use std::path::Path;
use std::process::{Command, Output};

fn agent(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_boottorrent-agent"));
    command.args(args);
    // Whatever the developer's shell exports must not leak into these tests.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("BOOTTORRENT_AGENT_") {
            command.env_remove(key);
        }
    }
    command
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn effective(config: &Path, extra: &[&str], env: &[(&str, &str)]) -> toml::Table {
    let mut command = agent(&["config", "--effective", "--machine-id", "pc-1", "--config"]);
    command.arg(config).args(extra);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    toml::from_str(&stdout).unwrap()
}

#[test]
fn the_printed_default_config_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let out = agent(&["config"]).output().unwrap();
    assert!(out.status.success());
    let (default_text, _) = text(&out);
    assert!(default_text.contains("# server = "), "{default_text}");
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, &default_text).unwrap();
    // What the file sets comes back unchanged after a load.
    let loaded = effective(&file, &[], &[]);
    let written: toml::Table = toml::from_str(&default_text).unwrap();
    for (key, value) in &written {
        assert_eq!(loaded.get(key), Some(value), "{key}");
    }
}

#[test]
fn environment_overrides_the_file_and_flags_override_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "mqtt_port = 1000\nheartbeat_interval_secs = 4\nenroll_token = \"file-token-secret\"\n",
    )
    .unwrap();
    let port = |t: &toml::Table| t["mqtt_port"].as_integer().unwrap();
    assert_eq!(port(&effective(&file, &[], &[])), 1000);
    let env = [("BOOTTORRENT_AGENT_MQTT_PORT", "2000")];
    let from_env = effective(&file, &[], &env);
    assert_eq!(port(&from_env), 2000);
    assert_eq!(from_env["heartbeat_interval_secs"].as_integer(), Some(4));
    assert_eq!(
        port(&effective(&file, &["--mqtt-port", "3000"], &env)),
        3000
    );
    // The token is never printed.
    assert_eq!(from_env["enroll_token"].as_str(), Some("(set)"));
}

#[test]
fn a_missing_explicit_config_file_is_an_error() {
    let out = agent(&[
        "config",
        "--effective",
        "--config",
        "/nonexistent/agent-x.toml",
    ])
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).1.contains("agent-x.toml"), "{}", text(&out).1);
}

#[test]
fn run_without_a_pinned_server_key_says_to_enroll() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "").unwrap();
    let out = agent(&[
        "run",
        "--server",
        "127.0.0.1",
        "--machine-id",
        "pc-1",
        "--config",
    ])
    .arg(&config)
    .arg("--data-dir")
    .arg(dir.path())
    .output()
    .unwrap();
    assert!(!out.status.success());
    let (_, stderr) = text(&out);
    assert!(stderr.contains("boottorrent-agent enroll"), "{stderr}");
}

#[test]
fn enroll_against_nothing_names_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "").unwrap();
    let port = boottorrent_testkit::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let out = agent(&[
        "enroll",
        "--machine-id",
        "pc-1",
        "--http-url",
        &url,
        "--config",
    ])
    .arg(&config)
    .arg("--data-dir")
    .arg(dir.path())
    .output()
    .unwrap();
    assert!(!out.status.success());
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains(&format!("{url}/api/v1/server-key")),
        "{stderr}"
    );
    assert!(!dir.path().join("server.pub").exists());
}
