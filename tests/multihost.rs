//! Multi-host proof: the server and agents on separate hosts (network namespaces made by
//! `scripts/testnet`, 100 Mbit/s links), a zone deployment end to end, and the faults a lab
//! network throws at it: an agent killed half way, a cable pulled for 20 s, the server killed,
//! and a peer that serves corrupted data.
//!
//! Needs root (CI has it). Without root every test prints why it did not run and returns.
//! The tests take turns (one network at a time): they measure bandwidth and the machine has
//! two cores.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::testnet::Net;
use common::*;

const RATE_MBIT: u32 = 100;
const PATIENCE_NET: Duration = Duration::from_secs(180);
static ONE_NETWORK_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The server on host 0 and agents on the other hosts, all in `dir`.
struct Lab<'a> {
    net: &'a Net,
    dir: PathBuf,
    server: Option<Proc>,
    agents: Vec<Option<Proc>>,
    /// Each host's current agent log.
    agent_logs: Vec<PathBuf>,
    runs: usize,
}

impl<'a> Lab<'a> {
    fn start(net: &'a Net, dir: &Path, agents: usize) -> Lab<'a> {
        let mut lab = Lab {
            net,
            dir: dir.to_owned(),
            server: None,
            agents: (0..=agents).map(|_| None).collect(),
            agent_logs: vec![PathBuf::new(); agents + 1],
            runs: 0,
        };
        lab.start_server();
        for host in 1..=agents {
            output({
                let mut c = net.command(host, agent_binary());
                c.args(["enroll", "--http-url", &lab.url()])
                    .arg("--data-dir")
                    .arg(dir.join(machine(host)));
                c
            });
            lab.start_agent(host, &[]);
        }
        for host in 1..=agents {
            lab.wait_online(host);
        }
        lab
    }

    fn url(&self) -> String {
        format!("http://{}:8080", Net::ip(0))
    }

    fn start_server(&mut self) {
        let ip = Net::ip(0);
        let mut c = self.net.command(0, BOOTTORRENT);
        // The lab's machines enrol without an operator (trust on first use).
        c.env("BOOTTORRENT_AUTO_APPROVE", "true");
        c.arg("serve")
            .arg("--data-dir")
            .arg(self.dir.join("server"))
            .args(["--mqtt-listen", &format!("{ip}:1883")])
            .args(["--http-listen", &format!("{ip}:8080")])
            .args(["--bt-listen", &format!("{ip}:6881")])
            .args(["--public-url", &self.url()])
            .args(["--heartbeat-interval-secs", "2"])
            .env("BOOTTORRENT_LOG", "info");
        self.runs += 1;
        let proc = spawn(c, self.dir.join(format!("server-{}.log", self.runs)));
        self.server = Some(proc);
        self.wait("the server healthy", || {
            let out = self.cli(&["image", "list", "--json"]).output().ok()?;
            out.status.success().then_some(())
        });
    }

    fn kill_server(&mut self) {
        self.server.take().unwrap().kill9();
    }

    fn start_agent(&mut self, host: usize, extra: &[&str]) {
        let id = machine(host);
        let script = marker_boot_script(&self.dir);
        let config = self.dir.join(format!("{id}.toml"));
        std::fs::write(&config, "").unwrap();
        let mut c = self.net.command(host, agent_binary());
        c.arg("run")
            .arg("--config")
            .arg(&config)
            .args(["--server", &Net::ip(0), "--mqtt-port", "1883"])
            .args(["--http-url", &self.url(), "--machine-id", &id])
            .arg("--data-dir")
            .arg(self.dir.join(&id))
            .args(["--bt-listen", "0.0.0.0:6881"])
            .args([
                "--heartbeat-interval-secs",
                "2",
                "--mqtt-keepalive-secs",
                "5",
            ])
            .args(["--boot-backend", "command", "--boot-command"])
            .arg(&script)
            .args(extra)
            .env("BOOTTORRENT_MARKER", self.dir.join(format!("{id}.marker")))
            .env(
                "BOOTTORRENT_AGENT_ENROLL_TOKEN",
                std::fs::read_to_string(self.dir.join("server/enroll.token"))
                    .unwrap()
                    .trim(),
            )
            .env("BOOTTORRENT_AGENT_LOG", "info");
        self.runs += 1;
        let log = self.dir.join(format!("{id}-{}.log", self.runs));
        let proc = spawn(c, log.clone());
        self.agents[host] = Some(proc);
        self.agent_logs[host] = log;
    }

    fn kill_agent(&mut self, host: usize) {
        self.agents[host].take().unwrap().kill9();
    }

    /// Kills host `host`'s agent and starts it again with `extra` flags; waits until online.
    fn restart_agent(&mut self, host: usize, extra: &[&str]) {
        self.kill_agent(host);
        self.start_agent(host, extra);
        self.wait_online(host);
    }

    fn wait_online(&self, host: usize) {
        self.wait(&format!("{} online", machine(host)), || {
            self.machine(host)["online"].as_bool().filter(|o| *o)
        });
    }

    /// Deploys `image` to these hosts' machines (a machine-list target); returns its id.
    fn deploy_to(&self, image: &str, hosts: &[usize]) -> String {
        let mut args = vec![image.to_owned()];
        for h in hosts {
            args.extend(["--machine".to_owned(), machine(*h)]);
        }
        self.deploy(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// A client command run on host 0 (where the server's address is reachable).
    fn cli(&self, args: &[&str]) -> Command {
        let mut c = self.net.command(0, BOOTTORRENT);
        c.args(args)
            .args(["--server", &self.url()])
            .arg("--data-dir")
            .arg(self.dir.join("server"));
        c
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = output(self.cli(&all));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn machine(&self, host: usize) -> serde_json::Value {
        self.cli(&["machines", "show", &machine(host)])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default()
    }

    fn deployment(&self, id: &str) -> serde_json::Value {
        self.json(&["deployments", "show", id])
    }

    fn wait<T>(&self, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE_NET;
        loop {
            if let Some(v) = check() {
                return v;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = std::fs::read_dir(&self.dir)
                    .unwrap()
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                    .map(|e| {
                        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(15).collect();
                        format!(
                            "== {}\n{}",
                            e.path().display(),
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        )
                    })
                    .collect();
                panic!("timed out waiting for {what}\n{}", logs.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Adds a qemu-img VHDX of `mib` MiB to the catalog; returns its id and bytes.
    fn catalogue(&self, mib: usize) -> (String, Vec<u8>) {
        let vhdx = make_vhdx(&self.dir, mib << 20);
        let image = self.json(&["image", "add", vhdx.to_str().unwrap()]);
        assert_eq!(image["state"], "ready", "{image}");
        (
            image["id"].as_str().unwrap().to_owned(),
            std::fs::read(&vhdx).unwrap(),
        )
    }

    fn zone(&self, zone: &str, hosts: &[usize]) {
        let mut args = vec!["zones".to_owned(), "set".into(), zone.into()];
        for h in hosts {
            args.extend(["--machine".to_owned(), machine(*h)]);
        }
        output(self.cli(&args.iter().map(String::as_str).collect::<Vec<_>>()));
        std::thread::sleep(Duration::from_secs(1));
    }

    fn deploy(&self, args: &[&str]) -> String {
        let mut all = vec!["deploy"];
        all.extend_from_slice(args);
        self.json(&all)["id"].as_str().unwrap().to_owned()
    }

    fn machine_progress(&self, id: &str, host: usize) -> serde_json::Value {
        let d = self.deployment(id);
        d["machines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == machine(host).as_str())
            .cloned()
            .unwrap_or_default()
    }

    fn wait_completed(&self, id: &str) -> serde_json::Value {
        self.wait(&format!("deployment {id} completed"), || {
            let d = self.deployment(id);
            assert_ne!(d["state"], "failed", "{d:#}");
            (d["state"] == "completed").then_some(d)
        })
    }

    /// The image file a host holds (these tests deploy one image; the agent names it by id).
    fn image_on(&self, host: usize) -> Vec<u8> {
        std::fs::read_dir(self.dir.join(machine(host)).join("images"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "vhdx"))
            .and_then(|p| std::fs::read(p).ok())
            .unwrap_or_default()
    }

    /// Every one of `hosts` holds exactly `bytes` as its staged image.
    fn assert_images(&self, hosts: std::ops::RangeInclusive<usize>, bytes: &[u8]) {
        for host in hosts {
            assert!(
                self.image_on(host) == bytes,
                "host {host} has different bytes"
            );
        }
    }
}

fn machine(host: usize) -> String {
    format!("host-{host}")
}

#[test]
fn a_zone_deployment_reaches_every_host_and_the_server_uploads_under_two_copies() {
    let _turn = ONE_NETWORK_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let Some(net) = Net::up(6, RATE_MBIT) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(&net, dir.path(), 5);
    let (image, bytes) = lab.catalogue(64);
    lab.zone("lab", &[1, 2, 3, 4, 5]);
    let sent_before = net.tx_bytes(0);

    let id = lab.deploy(&[&image, "--zone", "lab", "--action", "set-boot"]);
    let status = lab.cli(&["status", &id, "--watch"]).output().unwrap();
    assert!(
        status.status.success(),
        "status --watch: {}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    let d = lab.wait_completed(&id);
    assert_eq!(d["counts"]["booted"], 5, "{d:#}");
    // Each agent took the network it reaches the server through as its zone (bt_zone = auto).
    for host in 1..=5 {
        lab.wait("the agent's zone in its log", || {
            let log = std::fs::read_to_string(&lab.agent_logs[host]).unwrap_or_default();
            log.contains("zone=10.99.0.0/24").then_some(())
        });
    }
    for host in 1..=5 {
        assert!(
            lab.image_on(host) == bytes,
            "host {host} has different bytes"
        );
        let marker =
            std::fs::read_to_string(dir.path().join(format!("{}.marker", machine(host)))).unwrap();
        assert_eq!(marker.trim(), format!("set-boot {image} {id}"));
    }
    // Everything host 0 sent during the deployment: the seeder's pieces plus HTTP and MQTT.
    let sent = net.tx_bytes(0) - sent_before;
    let size = bytes.len() as u64;
    eprintln!(
        "server sent {sent} bytes for a {size}-byte image to 5 hosts ({:.2} copies)",
        sent as f64 / size as f64
    );
    assert!(
        sent < 2 * size,
        "the server sent {sent} bytes, {:.2} copies of the image",
        sent as f64 / size as f64
    );
}

#[test]
fn an_agent_killed_half_way_resumes_and_finishes() {
    let _turn = ONE_NETWORK_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let Some(net) = Net::up(4, RATE_MBIT) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::start(&net, dir.path(), 3);
    let (image, bytes) = lab.catalogue(32);
    // Host 1 is slowed so that "half way" lasts long enough to be caught.
    lab.restart_agent(1, &["--download-limit-bps", "2000000"]);
    let id = lab.deploy_to(&image, &[1, 2, 3]);
    let half = bytes.len() as u64 / 2;
    let had = lab.wait("host 1 half way", || {
        let done = lab.machine_progress(&id, 1)["bytes_done"].as_u64()?;
        (done >= half).then_some(done)
    });
    lab.kill_agent(1);
    lab.start_agent(1, &[]);
    let mut lowest_after = u64::MAX;
    lab.wait("host 1 staged", || {
        let m = lab.machine_progress(&id, 1);
        if m["state"] == "downloading" {
            lowest_after = lowest_after.min(m["bytes_done"].as_u64().unwrap_or(0));
        }
        (m["state"] == "staged").then_some(())
    });
    assert!(
        lowest_after == u64::MAX || lowest_after >= had,
        "host 1 reported {lowest_after} bytes after the restart, less than the {had} it had"
    );
    lab.wait_completed(&id);
    lab.assert_images(1..=3, &bytes);
}

#[test]
fn a_host_whose_cable_is_pulled_for_20_s_is_shown_offline_and_finishes_after() {
    let _turn = ONE_NETWORK_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let Some(net) = Net::up(4, RATE_MBIT) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::start(&net, dir.path(), 3);
    let (image, bytes) = lab.catalogue(32);
    lab.restart_agent(3, &["--download-limit-bps", "1500000"]);
    let id = lab.deploy_to(&image, &[1, 2, 3]);
    lab.wait("host 3 downloading", || {
        let m = lab.machine_progress(&id, 3);
        (m["bytes_done"].as_u64()? > 0).then_some(())
    });
    let cut = Instant::now();
    net.link(3, false);
    lab.wait("host 3 shown offline", || {
        lab.machine(3)["online"].as_bool().filter(|o| !*o)
    });
    let offline_after = cut.elapsed();
    let left = Duration::from_secs(20).saturating_sub(cut.elapsed());
    std::thread::sleep(left);
    let before = lab.machine_progress(&id, 3)["bytes_done"].as_u64().unwrap();
    assert!(
        before < bytes.len() as u64,
        "host 3 finished without a link"
    );
    net.link(3, true);
    lab.wait("host 3 online again", || {
        lab.machine(3)["online"].as_bool().filter(|o| *o)
    });
    lab.wait_completed(&id);
    assert!(lab.image_on(3) == bytes);
    eprintln!("host 3 was shown offline {offline_after:?} after its cable was pulled");
}

#[test]
fn every_host_finishes_when_the_server_is_killed_and_restarted_mid_deployment() {
    let _turn = ONE_NETWORK_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let Some(net) = Net::up(4, RATE_MBIT) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::start(&net, dir.path(), 3);
    let (image, bytes) = lab.catalogue(32);
    for host in 1..=3 {
        lab.restart_agent(host, &["--download-limit-bps", "2000000"]);
    }
    lab.zone("lab", &[1, 2, 3]);
    let id = lab.deploy(&[&image, "--zone", "lab", "--action", "set-boot"]);
    lab.wait("downloads under way", || {
        let d = lab.deployment(&id);
        (d["bytes_done"].as_u64()? > 2 << 20).then_some(())
    });
    lab.kill_server();
    std::thread::sleep(Duration::from_secs(2));
    lab.start_server();
    let d = lab.wait_completed(&id);
    assert_eq!(d["counts"]["booted"], 3, "{d:#}");
    lab.assert_images(1..=3, &bytes);
}

#[test]
fn a_peer_serving_corrupt_data_is_rejected_and_reported() {
    let _turn = ONE_NETWORK_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let Some(net) = Net::up(4, RATE_MBIT) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::start(&net, dir.path(), 3);
    let (image, bytes) = lab.catalogue(32);
    // Host 1 gets the image. The machine restarts, its agent checks the image and seeds it,
    // and then its disk starts returning garbage. A fresh agent holds no recently verified
    // pieces in memory, so everything it serves comes from the failing disk. (Corrupted
    // without the restart, it would serve the pieces still in memory correctly, and the test
    // would hinge on which pieces the others happened to ask it for.)
    let first = lab.deploy_to(&image, &[1]);
    lab.wait_completed(&first);
    lab.restart_agent(1, &[]);
    let log = lab.agent_logs[1].clone();
    lab.wait("host 1 checked its image and seeds it", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("checked existing data").then_some(())
    });
    let path = dir.path().join(format!("host-1/images/{image}.vhdx"));
    let garbage: Vec<u8> = bytes.iter().map(|b| b ^ 0x5a).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &garbage))
        .unwrap();

    let second = lab.deploy_to(&image, &[2, 3]);
    lab.wait_completed(&second);
    for host in 2..=3 {
        assert!(
            lab.image_on(host) == bytes,
            "host {host} kept corrupt bytes"
        );
    }
    // The receivers named the corrupt peer, and the server recorded it.
    let log = lab.json(&["machines", "log"]);
    let reports: Vec<String> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "error")
        .map(|e| e["detail"].as_str().unwrap_or_default().to_owned())
        .filter(|d| d.starts_with("corrupt_peer"))
        .collect();
    assert!(
        reports
            .iter()
            .any(|r| r.contains(&format!("peer {} ", Net::ip(1)))),
        "no corrupt_peer report naming {}: {log:#}",
        Net::ip(1)
    );
    // Pieces mixing host 1's blocks with an honest peer's fail too; only the peer whose
    // blocks were wrong is named, or an operator would replace a healthy machine's disk.
    for honest in [0, 2, 3] {
        assert!(
            !reports
                .iter()
                .any(|r| r.contains(&format!("peer {} ", Net::ip(honest)))),
            "an honest peer, {}, was reported as corrupt: {reports:#?}",
            Net::ip(honest)
        );
    }
}
