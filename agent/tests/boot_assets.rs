//! The shipped sample config and systemd unit, checked against the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn asset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets")
        .join(name)
}

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_boottorrent-agent"))
        .args(args)
        // The machine's environment must not change what the files say.
        .env_remove("BOOTTORRENT_AGENT_BOOT_BACKEND")
        .env_remove("BOOTTORRENT_AGENT_DATA_DIR")
        .env_remove("BOOTTORRENT_AGENT_SERVER")
        .output()
        .unwrap()
}

fn effective_config(file: &Path) -> String {
    let out = agent(&["config", "--effective", "--config", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_sample_config_loads() {
    let effective = effective_config(&asset("agent.toml"));
    for line in [
        "server = \"boottorrent.lab.example\"",
        "data_dir = \"/var/lib/boottorrent\"",
        "boot_backend = \"none\"",
    ] {
        assert!(
            effective.lines().any(|l| l == line),
            "{line} not in\n{effective}"
        );
    }
    assert!(
        !effective.contains("paste-the-enrollment-token-here"),
        "{effective}"
    );
}

/// The sample shows every setting an operator of a lab sets, set or as an example.
#[test]
fn the_sample_config_names_every_setting() {
    let sample = std::fs::read_to_string(asset("agent.toml")).unwrap();
    for key in [
        "server",
        "mqtt_port",
        "http_url",
        "tls_ca",
        "enroll_token",
        "machine_id",
        "data_dir",
        "bt_listen",
        "boot_backend",
        "boot_command",
        "download_limit_bps",
        "upload_limit_bps",
        "heartbeat_interval_secs",
    ] {
        let set = format!("{key} = ");
        let example = format!("# {key} = ");
        assert!(
            sample
                .lines()
                .any(|l| l.starts_with(&set) || l.starts_with(&example)),
            "{key} missing"
        );
    }
}

/// Every commented-out `key = value` example is valid too, with the command backend on.
#[test]
fn the_sample_configs_examples_load() {
    let sample = std::fs::read_to_string(asset("agent.toml")).unwrap();
    let mut uncommented = String::new();
    let mut examples = 0;
    for line in sample.lines() {
        let example = line
            .strip_prefix("# ")
            .filter(|rest| rest.split_once(" = ").is_some_and(|(key, _)| is_key(key)));
        match example {
            Some(setting) => {
                uncommented.push_str(setting);
                examples += 1;
            }
            None if line == "boot_backend = \"none\"" => {
                uncommented.push_str("boot_backend = \"command\"");
            }
            None => uncommented.push_str(line),
        }
        uncommented.push('\n');
    }
    assert!(examples >= 9, "only {examples} examples found");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, uncommented).unwrap();
    let effective = effective_config(&file);
    for line in [
        "boot_backend = \"command\"",
        "boot_command = \"/usr/local/sbin/boottorrent-boot\"",
        "machine_id = \"pc-101-01\"",
        "download_limit_bps = 12500000",
    ] {
        assert!(
            effective.lines().any(|l| l == line),
            "{line} not in\n{effective}"
        );
    }
}

fn is_key(word: &str) -> bool {
    !word.is_empty() && word.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// `Key=value` settings of the unit's `[Service]` or `[Unit]` section, comments skipped.
fn unit_settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn the_systemd_unit_runs_the_agent_with_the_sample_config_and_data_dir() {
    let unit = std::fs::read_to_string(asset("boottorrent-agent.service")).unwrap();
    let settings = unit_settings(&unit);
    let get = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(
        get("ExecStart"),
        ["/usr/local/bin/boottorrent-agent run --config /etc/boottorrent/agent.toml"]
    );
    assert_eq!(get("Restart"), ["always"]);
    assert_eq!(get("RestartSec"), ["5"]);
    assert_eq!(get("After"), ["network-online.target"]);
    assert_eq!(get("Wants"), ["network-online.target"]);
    assert_eq!(get("WantedBy"), ["multi-user.target"]);
    // ProtectSystem=strict leaves only the state directory writable: it must be the data dir.
    assert_eq!(get("ProtectSystem"), ["strict"]);
    assert_eq!(get("StateDirectory"), ["boottorrent"]);
    let sample = std::fs::read_to_string(asset("agent.toml")).unwrap();
    assert!(
        sample
            .lines()
            .any(|l| l == "data_dir = \"/var/lib/boottorrent\"")
    );

    // The command line the unit runs is one the agent accepts, and its config path is the
    // agent's own default.
    let help = agent(&["run", "--help"]);
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(
        help.contains("--config <FILE>") && help.contains("/etc/boottorrent/agent.toml"),
        "{help}"
    );
}
