//! The operator's web dashboard end to end: the real server and two agents as processes, 30
//! more machines registered by signed startups (so the machines table has two pages of 25),
//! one more left waiting for approval, and a headless Chromium (driven by
//! `dashboard_browser.py` through selenium) that signs in (a wrong token refused, the viewer
//! token reading but refused a deployment), pages through the machines and filters them, finds
//! the waiting machine from the counts and approves it, deploys an image from the page with
//! the admin token to the machine ids typed into the form (an unknown one refused first) and
//! watches both machines reach `staged` on it. A deployment to the 30 made-up machines, which
//! never progress, shows 20 of them and how many more. Afterwards the API must show the
//! deployment the page made. The browser's screenshot is kept as a test artifact in
//! `target/test-artifacts/dashboard.png`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Heartbeats every 2 s: the server re-sends a lost assignment at a heartbeat. New machines
/// wait for the operator's approval, as on a site without `auto_approve`: the page shows how
/// many wait, lists them and approves one.
const SERVE: &[&str] = &["--heartbeat-interval-secs", "2", "--auto-approve", "false"];

/// The machine left waiting for approval, for the page to approve.
const WAITING: &str = "new-pc";

/// The browser script waits up to 90 s for the machines; this bounds a hung browser.
const BROWSER_PATIENCE: Duration = Duration::from_secs(240);

const PYTHON: &str = "/usr/bin/python3";

/// The browser stack comes from Debian packages that scripts/test installs; without it this
/// test fails, saying what to install, rather than passing without having looked.
fn require_browser() {
    for (path, package) in [
        ("/usr/bin/chromium", "chromium"),
        ("/usr/bin/chromedriver", "chromium-driver"),
        (PYTHON, "python3"),
    ] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing (Debian package {package}); run scripts/test, which installs it"
        );
    }
    let selenium = Command::new(PYTHON)
        .args(["-c", "import selenium"])
        .output()
        .unwrap();
    assert!(
        selenium.status.success(),
        "{PYTHON} cannot import selenium (Debian package python3-selenium); run scripts/test, \
         which installs it:\n{}",
        String::from_utf8_lossy(&selenium.stderr)
    );
}

fn screenshot_path() -> PathBuf {
    let dir = boottorrent_testkit::binary::target_dir().join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("dashboard.png")
}

/// Enrolls (pins the server's key) and starts an agent; it waits for approval.
fn start_agent(dir: &Path, server: &Server, id: &str) -> Proc {
    enroll(server, dir, id);
    run_agent(dir, server, id, &[])
}

/// Waits until the fleet's counts have `n` machines waiting for approval.
fn wait_waiting(server: &Server, n: u64) {
    wait_for(&format!("{n} machines waiting for approval"), || {
        let fleet = server.get_json("/api/v1/fleet");
        (fleet["key_states"]["pending"].as_u64().unwrap_or(0) == n).then_some(())
    });
}

/// Runs the browser script, its output going to `log`; kills it if it outlives
/// [`BROWSER_PATIENCE`]. Returns whether it succeeded, and its output.
fn run_browser(args: &[&str], log: &Path) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboard_browser.py");
    let mut command = Command::new(PYTHON);
    command.arg(&script).args(args).stdin(Stdio::null());
    let mut browser = spawn(command, log.to_owned());
    let success = match browser.wait_within(BROWSER_PATIENCE) {
        Some(status) => status.success(),
        None => {
            browser.kill9();
            false
        }
    };
    (success, browser.log_text())
}

#[test]
fn an_operator_deploys_from_the_dashboard_and_sees_both_machines_staged() {
    require_browser();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = Server::start(&dir.join("server"), SERVE);
    let (image, vhdx) = catalogue(&server, dir, 4 << 20);
    let image = image["id"].as_str().unwrap().to_owned();
    let machines = ["pc-01", "pc-02"];
    let _agents: Vec<Proc> = machines
        .iter()
        .map(|id| start_agent(dir, &server, id))
        .collect();
    // More machines than the page's 25 rows: the made-up ones sort before pc-01.
    let fakes = register_fakes(&server, 30);
    // A first enrolment: everything waiting approved at once; then the agents come online.
    wait_waiting(&server, 32);
    common::output(server.cli(&["machines", "approve", "--all-waiting"]));
    for id in machines {
        wait_for("the agent online", || server.online(id).filter(|o| *o));
    }
    // One more, left waiting for the page.
    register_fakes_named(&server, &[WAITING.to_owned()]);
    wait_waiting(&server, 1);
    common::output(server.cli(&[
        "zones",
        "set",
        "lab",
        "--machine",
        "pc-01",
        "--machine",
        "pc-02",
    ]));
    let mut zone = vec!["zones", "set", "fakes"];
    for id in &fakes {
        zone.extend(["--machine", id.as_str()]);
    }
    common::output(server.cli(&zone));
    // A zone's lists cut short on the server: the first ids and how many more.
    let zones = server.get_json("/api/v1/zones?ids=5");
    let fakes_zone = zones
        .as_array()
        .unwrap()
        .iter()
        .find(|z| z["id"] == "fakes")
        .unwrap_or_else(|| panic!("no zone fakes in {zones:#}"));
    assert_eq!(
        fakes_zone["members"],
        serde_json::json!(fakes[..5]),
        "{zones:#}"
    );
    assert_eq!(fakes_zone["more_members"], 25, "{zones:#}");
    assert_eq!(fakes_zone["machines"], fakes_zone["members"], "{zones:#}");
    assert_eq!(fakes_zone["more_machines"], 25, "{zones:#}");
    let lab = server.get_json("/api/v1/zones/lab?ids=5");
    assert_eq!(
        lab["members"],
        serde_json::json!(["pc-01", "pc-02"]),
        "{lab:#}"
    );
    assert_eq!(lab["more_members"], 0, "{lab:#}");
    let whole = server.get_json("/api/v1/zones/fakes");
    assert_eq!(whole["members"].as_array().unwrap().len(), 30, "{whole:#}");
    assert_eq!(whole["machines"].as_array().unwrap().len(), 30, "{whole:#}");
    assert!(whole.get("more_members").is_none(), "{whole:#}");
    assert!(whole.get("more_machines").is_none(), "{whole:#}");
    for bad in ["ids=1001", "ids=x", "members=3"] {
        let response = server.get(&format!("/api/v1/zones?{bad}"));
        assert_eq!(response.status(), 400, "{bad}");
    }
    assert_eq!(
        server.get_json("/api/v1/deployments"),
        serde_json::json!([])
    );
    // A deployment to the made-up machines: they never answer, so it stays pending, 30 rows.
    let mut deploy = vec!["deploy", image.as_str()];
    for id in &fakes {
        deploy.extend(["--machine", id.as_str()]);
    }
    common::output(server.cli(&deploy));
    let stuck = server.get_json("/api/v1/deployments")[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Cut short on the server: the rows asked for, and how many more.
    let cut = server.get_json(&format!("/api/v1/deployments/{stuck}?machines=20"));
    assert_eq!(cut["machines"].as_array().unwrap().len(), 20, "{cut:#}");
    assert_eq!(cut["more_machines"], 10, "{cut:#}");
    assert_eq!(
        cut["counts"],
        serde_json::json!({ "pending": 30 }),
        "{cut:#}"
    );
    let whole = server.get_json(&format!("/api/v1/deployments/{stuck}"));
    assert_eq!(whole["machines"].as_array().unwrap().len(), 30);
    assert!(whole.get("more_machines").is_none(), "{whole:#}");
    for bad in ["machines=1001", "machines=-1", "limit=x", "rows=3"] {
        let response = server.get(&format!("/api/v1/deployments?{bad}"));
        assert_eq!(response.status(), 400, "{bad}");
    }

    let screenshot = screenshot_path();
    let _ = std::fs::remove_file(&screenshot);
    let started = Instant::now();
    let (ok, shown) = run_browser(
        &[
            &server.url(""),
            &server.token("admin.token"),
            &server.token("viewer.token"),
            &image,
            &stuck,
            screenshot.to_str().unwrap(),
        ],
        &dir.join("browser.log"),
    );
    assert!(
        ok,
        "the dashboard test in the browser failed after {:.1?}:\n{shown}\n--- server log (end) ---\n{}",
        started.elapsed(),
        tail(&server.proc.log_text(), 60)
    );
    // Shown with --nocapture: what the page showed along the way.
    println!("{shown}");
    assert!(
        screenshot.exists(),
        "no screenshot at {}",
        screenshot.display()
    );

    // The page made the deployment (there was none before), to exactly these machines, and the
    // server agrees with what the page showed.
    let id = shown
        .lines()
        .find_map(|l| l.strip_prefix("deployment "))
        .unwrap_or_else(|| panic!("the browser script named no deployment:\n{shown}"))
        .trim()
        .to_owned();
    let all = server.get_json("/api/v1/deployments?machines=0");
    assert_eq!(all.as_array().unwrap().len(), 2, "{all:#}");
    assert_eq!(all[0]["id"], id.as_str(), "the newest first: {all:#}");
    // The newest only, and whatever still runs: the stuck one, older, is kept.
    let ids = |path: &str| -> Vec<String> {
        let list = server.get_json(path);
        list.as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        ids("/api/v1/deployments?limit=1"),
        [id.as_str(), stuck.as_str()]
    );
    assert_eq!(
        ids("/api/v1/deployments?limit=0&machines=0"),
        [stuck.as_str()]
    );
    // The waiting machine the page approved.
    let approved = server.machine(WAITING).unwrap();
    assert_eq!(approved["key_state"], "approved", "{approved:#}");
    let d = server.get_json(&format!("/api/v1/deployments/{id}"));
    assert_eq!(d["image"], image.as_str(), "{d:#}");
    assert_eq!(d["action"], "stage", "{d:#}");
    assert_eq!(
        d["target"],
        serde_json::json!({ "machines": machines }),
        "{d:#}"
    );
    assert_eq!(d["state"], "completed", "{d:#}");
    assert_eq!(d["counts"], serde_json::json!({ "staged": 2 }), "{d:#}");
    let source = std::fs::read(&vhdx).unwrap();
    for m in machines {
        assert_eq!(
            std::fs::read(dir.join(m).join(format!("images/{image}.vhdx"))).unwrap(),
            source,
            "{m}'s copy"
        );
    }
}

/// Registers `count` made-up machines `fake-00`.. by their signed startups (each its own key and
/// login, as agents enrol), from four threads.
fn register_fakes(server: &Server, count: usize) -> Vec<String> {
    let ids: Vec<String> = (0..count).map(|i| format!("fake-{i:02}")).collect();
    register_fakes_named(server, &ids);
    ids
}

/// Registers made-up machines with these ids, as [`register_fakes`] does.
fn register_fakes_named(server: &Server, ids: &[String]) {
    std::thread::scope(|scope| {
        for sender in 0..4 {
            let ids = &ids;
            scope.spawn(move || {
                for id in ids.iter().skip(sender).step_by(4) {
                    let mut fake = Agent::new(id);
                    // As an agent does, a startup the broker lost is sent again (once, on a
                    // loaded machine, mosquitto_pub lost its connection here): this test is about
                    // the page, not the broker under load.
                    let mut failures = Vec::new();
                    while failures.len() < 3 {
                        let (topic, payload) = fake.startup();
                        let password = fake.password(&server.enroll_token());
                        let out = server.publish_as(id, &password, &topic, &payload);
                        if out.status.success() {
                            break;
                        }
                        failures.push(String::from_utf8_lossy(&out.stderr).into_owned());
                    }
                    assert!(
                        failures.len() < 3,
                        "mosquitto_pub as {id} failed 3 times: {failures:?}\n{}",
                        tail(&server.proc.log_text(), 40)
                    );
                }
            });
        }
    });
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
