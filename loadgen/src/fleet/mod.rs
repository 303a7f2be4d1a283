//! `fleet`: N simulated agents against one server, and what it takes.
//!
//! Steps: start a server (or use `--server`), catalogue two small raw images, put the first
//! `--zone-agents` machines in a zone, start the agents over `--ramp-secs` (one task each,
//! [`agent`]), poll the API until all are online (timing the API meanwhile), measure the
//! server's CPU and memory over an idle window, then deploy one image to every machine and
//! one to the zone and time when each agent receives its assignment. Then the agents stop
//! cleanly and the server (if started here) is stopped.
//!
//! Tasks: the coordinator (this module), the ramp that spawns the agents, and one task per
//! agent in a [`TaskTracker`]; they share a [`Tally`] and one cancellation token.

pub mod agent;
pub(crate) mod api;
mod report;
pub(crate) mod server;
mod tally;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use boottorrent_proto::{DeploymentId, ServerKeyAnswer, VerifyingKey, verifying_key_from_bytes};
use clap::Args;
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::machine::{Machine, broker_address};
use api::Api;
use report::{Fanout, Idle, Latencies, Report};
use server::{Given, Run, Target, Usage};
use tally::Tally;

#[derive(Args)]
pub struct Fleet {
    /// How many simulated agents to run, each with its own key, login and MQTT connection
    /// (one task each, all in this process).
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Seconds over which the agents start, evenly spaced; 0 starts them all at once (a
    /// power-on storm).
    #[arg(long, default_value_t = 10.0)]
    ramp_secs: f64,
    /// How many of the agents (the first ones) form the zone that the zone deployment
    /// targets; by default a tenth of them, at least one.
    #[arg(long)]
    zone_agents: Option<usize>,
    /// Give up waiting for every agent to be online in the API after this many seconds from
    /// the start of the ramp, and measure with those that are.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
    /// Seconds to let the server settle once all agents are online, before the idle window.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// Seconds over which the server's CPU use is averaged once all agents are online and it
    /// settled; heartbeats go on meanwhile, nothing else. One heartbeat interval (the
    /// server's default is 30 s) sees every agent's heartbeat once.
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// Seconds to wait for every targeted agent to receive a deployment's assignment.
    #[arg(long, default_value_t = 60)]
    fanout_timeout_secs: u64,
    /// Milliseconds between polls of the API while the agents come online; each poll times
    /// GET /api/v1/machines (which gives the online count), one machine, the deployments
    /// and /healthz.
    #[arg(long, default_value_t = 1000)]
    poll_ms: u64,
    /// Seconds an agent's connection attempt may take until CONNACK; rumqttc's default,
    /// which the agent uses, is 5.
    #[arg(long, default_value_t = 5)]
    connect_timeout_secs: u64,
    /// Prefix of the simulated machines' ids (`<prefix>-00001`, ...); by default `lg` and
    /// this process's id, so that runs against one server do not collide.
    #[arg(long)]
    prefix: Option<String>,
    /// New machines the started server admits per minute (`enroll_per_minute`); by default
    /// 60 × agents, so that the rate limit for made-up machines does not set the pace of a
    /// first enrolment. The started server has `auto_approve` on and defaults otherwise.
    #[arg(long)]
    enroll_per_minute: Option<u32>,
    #[command(flatten)]
    given: Given,
    /// With --server started with `--broker`: log the agents in to that external broker as
    /// `boottorrent-agent` does with `broker_login = "certificate"`: each asks the server for
    /// a certificate for its own key, then connects over TLS with it (--mqtt is the broker).
    #[arg(long, requires = "broker_ca")]
    certificate_login: bool,
    /// With --certificate-login: the CA of the broker's TLS certificate (PEM; `broker-config`
    /// writes it as ca.crt).
    #[arg(long, value_name = "PEM")]
    broker_ca: Option<PathBuf>,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Open files the server holds per connected agent: the front's socket for the agent, its
/// relay connection to the embedded broker on loopback, and the broker's end of that.
const FILES_PER_AGENT: u64 = 3;

/// Machines per page of GET /api/v1/machines: the most the API gives.
const PAGE: usize = 1000;

/// One row of GET /api/v1/machines, as far as the generator reads it.
#[derive(Deserialize)]
struct MachineRow {
    id: String,
    online: bool,
}

pub async fn run(args: Fleet) -> anyhow::Result<()> {
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    if let Some(limit) = server::open_file_limit("self") {
        // One descriptor per agent, plus some for HTTP and the runtime.
        if (args.agents as u64) + 64 > limit {
            bail!(
                "{} agents need as many open files, but this process may open {limit}: raise \
                 the limit (`ulimit -n`) or run fewer agents",
                args.agents
            );
        }
    }
    let per_minute = args.enroll_per_minute.unwrap_or_else(|| {
        u32::try_from(args.agents.saturating_mul(60))
            .unwrap_or(u32::MAX)
            .max(1000)
    });
    let run = Run::prepare(args.given.clone(), "boottorrent-loadgen", per_minute).await?;
    let result = run
        .until_interrupted(measure(&args, &run.target, &run.work))
        .await;
    run.finish(result, args.json).await
}

async fn measure(args: &Fleet, target: &Target, work: &std::path::Path) -> anyhow::Result<Report> {
    let api = &target.api;
    let run_id = format!("{}-{}", std::process::id(), boottorrent_proto::now_ms());
    let prefix = args
        .prefix
        .clone()
        .unwrap_or_else(|| format!("lg{}", std::process::id()));
    let zone = format!("{prefix}-zone");
    let zone_agents = args
        .zone_agents
        .unwrap_or(args.agents / 10)
        .clamp(1, args.agents);

    // The server key every command must verify with, as `boottorrent-agent enroll` pins it.
    let answer: ServerKeyAnswer = api.get("/api/v1/server-key").await?;
    let key = boottorrent_proto::PublicKeyBytes::from_hex(answer.public_key.trim())
        .map_err(|e| anyhow::anyhow!("the server key is not 64 hex digits: {e}"))?;
    let server_key = verifying_key_from_bytes(&key).context("the server key")?;

    // Two images, one per deployment, so that neither deployment finds the image assigned.
    let mut images = Vec::new();
    for which in ["global", "zone"] {
        images.push(add_image(api, work, &format!("{prefix}-{which}"), &run_id).await?);
    }
    let ids: Vec<String> = (0..args.agents)
        .map(|i| format!("{prefix}-{i:05}"))
        .collect();
    api.send(
        reqwest::Method::PUT,
        &format!("/api/v1/zones/{zone}"),
        &serde_json::json!({ "machines": &ids[..zone_agents] }),
    )
    .await
    .context("making the zone")?;

    // Agents of an external broker hold no files in the server.
    let server_open_files = target
        .pid
        .filter(|_| !args.certificate_login)
        .and_then(|p| server::open_file_limit(&p.to_string()));
    if let Some(limit) = server_open_files {
        if (args.agents as u64).saturating_mul(FILES_PER_AGENT) > limit {
            eprintln!(
                "warning: the server may open {limit} files and holds {FILES_PER_AGENT} per \
                 agent, so it can take about {} of the {} agents; the others will time out",
                limit / FILES_PER_AGENT,
                args.agents
            );
        }
    }
    let broker = Arc::new(broker_address(&target.mqtt)?);
    let start = Instant::now();
    let tally = Arc::new(Tally::new(args.agents, start));
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut machines = Vec::with_capacity(args.agents);
    for id in &ids {
        machines.push(Machine::new(id)?);
    }
    let certificates = match &args.broker_ca {
        Some(ca) if args.certificate_login => Some(Arc::new(agent::Certificates {
            http: reqwest::Client::new(),
            base: target.http.trim_end_matches('/').to_owned(),
            ca_pem: std::fs::read_to_string(ca)
                .with_context(|| format!("reading --broker-ca {}", ca.display()))?,
        })),
        _ => None,
    };
    let shared = Shared {
        broker,
        certificates,
        token: target.enroll_token.clone().into(),
        server_key,
        tally: tally.clone(),
        stop: stop.clone(),
        tracker: tracker.clone(),
        connect_timeout_secs: args.connect_timeout_secs,
    };
    let over = Duration::from_secs_f64(args.ramp_secs.max(0.0));
    tracker.spawn(ramp(machines, shared, start, over));

    let online = wait_online(args, api, &ids, &prefix, &tally, start).await;
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let idle = idle(target.pid, Duration::from_secs(args.idle_secs)).await;

    // Every agent the server answered should get the global deployment; the zone's members
    // the zone's.
    let answered = tally.answered.load(Ordering::Relaxed);
    let deployments = [
        (
            "global".to_owned(),
            serde_json::json!({ "global": true }),
            answered,
        ),
        (
            format!("zone {zone}"),
            serde_json::json!({ "zone": zone }),
            zone_agents,
        ),
    ];
    let mut fanouts = Vec::new();
    for (image, (what, to, expected)) in images.iter().zip(deployments) {
        fanouts.push(fan_out(args, api, &tally, image, what, to, expected).await?);
        // Let the last receipts' verifications and the server's bookkeeping finish, so that
        // the next deployment is timed on its own.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let server_end = target.pid.and_then(|p| Usage::of(&p.to_string()).ok());
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(15), tracker.wait())
        .await
        .is_err()
    {
        eprintln!("warning: some agents had not stopped 15 s after being told to");
    }
    let generator = Usage::of("self")?;
    let connected = tally.connected.load(Ordering::Relaxed);
    Ok(Report {
        agents: args.agents,
        ramp_secs: args.ramp_secs,
        server: target.http.clone(),
        mqtt: target.mqtt.clone(),
        server_pid: target.pid,
        server_open_files,
        connected,
        all_connected_secs: (connected == args.agents)
            .then(|| tally.last_first_connect_ms.load(Ordering::Relaxed) as f64 / 1000.0),
        answered,
        all_answered_secs: (answered == args.agents)
            .then(|| tally.last_first_answer_ms.load(Ordering::Relaxed) as f64 / 1000.0),
        online_in_api: online.count,
        all_online_secs: online.all_by.map(|d| d.as_secs_f64()),
        poll_ms: args.poll_ms,
        failed: tally::lock(&tally.failed).clone(),
        dropped: tally::lock(&tally.dropped).clone(),
        reconnects: tally.reconnects.load(Ordering::Relaxed),
        refused_commands: tally.refused_commands.load(Ordering::Relaxed),
        first_refused_command: tally::lock(&tally.first_refused_command).clone(),
        idle,
        server_peak_rss_mib: server_end.map(|u| u.peak_rss_mib),
        server_cpu_secs: server_end.map(|u| u.cpu_secs),
        fanout: fanouts,
        api: online.latencies.summaries(),
        generator_cpu_secs: generator.cpu_secs,
        generator_peak_rss_mib: generator.peak_rss_mib,
    })
}

/// What every agent task gets a handle of.
struct Shared {
    broker: Arc<(String, u16)>,
    certificates: Option<Arc<agent::Certificates>>,
    token: Arc<str>,
    server_key: VerifyingKey,
    tally: Arc<Tally>,
    stop: CancellationToken,
    tracker: TaskTracker,
    connect_timeout_secs: u64,
}

/// The ramp: starts agent i of N at i/N of `over` after `start`, each in its own task.
async fn ramp(machines: Vec<Machine>, shared: Shared, start: Instant, over: Duration) {
    let n = machines.len();
    for (index, machine) in machines.into_iter().enumerate() {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tokio::time::sleep_until(start + over.mul_f64(index as f64 / n as f64)) => {}
        }
        let spec = agent::Spec {
            index,
            machine,
            broker: shared.broker.clone(),
            certificates: shared.certificates.clone(),
            token: shared.token.clone(),
            server_key: shared.server_key,
            connect_timeout_secs: shared.connect_timeout_secs,
        };
        shared
            .tracker
            .spawn(agent::run(spec, shared.tally.clone(), shared.stop.clone()));
    }
}

/// How far the fleet got in the API, and how fast the API answered meanwhile.
struct Online {
    /// Our machines online at the last poll.
    count: usize,
    /// When all of them first were, from the start of the ramp.
    all_by: Option<Duration>,
    latencies: Latencies,
}

/// Polls the API every `--poll-ms` until all agents are online in it or `--timeout-secs`
/// passed, timing each request; says how far the fleet got every 5 s on stderr.
async fn wait_online(
    args: &Fleet,
    api: &Api,
    ids: &[String],
    prefix: &str,
    tally: &Tally,
    start: Instant,
) -> Online {
    let mut latencies = Latencies::default();
    let deadline = start + Duration::from_secs(args.timeout_secs);
    let mut count = 0;
    let mut said = Instant::now();
    // One machine's view is timed once the server knows that machine (before, it is a 404).
    let mut known = false;
    let member = format!("/api/v1/machines/{}", ids[0]);
    let ours = format!("{prefix}-");
    while Instant::now() < deadline {
        let polled = Instant::now();
        // The list comes a page at a time: the online machines, a page of the most the API
        // gives (1,000) after another, each page timed as the API's latency.
        let mut online = Some(0);
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(last) => format!("/api/v1/machines?online=true&limit={PAGE}&after={last}"),
                None => format!("/api/v1/machines?online=true&limit={PAGE}"),
            };
            let (took, rows) = api.timed_get::<Vec<MachineRow>>(&path).await;
            latencies.add("GET /api/v1/machines", took, rows.is_ok());
            let Ok(rows) = rows else {
                online = None;
                break;
            };
            known |= rows.iter().any(|m| m.id == ids[0]);
            online = online.map(|n| {
                n + rows
                    .iter()
                    .filter(|m| m.online && m.id.starts_with(&ours))
                    .count()
            });
            if rows.len() < PAGE {
                break;
            }
            after = rows.last().map(|m| m.id.clone());
        }
        if let Some(online) = online {
            count = online;
        }
        if count == args.agents {
            return Online {
                count,
                all_by: Some(start.elapsed()),
                latencies,
            };
        }
        let paths = [member.as_str(), "/api/v1/deployments", "/healthz"];
        for path in paths.into_iter().skip(usize::from(!known)) {
            let (took, answer) = api.timed_get::<serde_json::Value>(path).await;
            let endpoint = if path == member {
                "/api/v1/machines/{id}"
            } else {
                path
            };
            latencies.add(&format!("GET {endpoint}"), took, answer.is_ok());
        }
        if said.elapsed() >= Duration::from_secs(5) {
            said = Instant::now();
            eprintln!(
                "{:>6.1} s: {} connected, {} answered, {count} online in the API (of {})",
                start.elapsed().as_secs_f64(),
                tally.connected.load(Ordering::Relaxed),
                tally.answered.load(Ordering::Relaxed),
                args.agents
            );
        }
        tokio::time::sleep_until(polled + Duration::from_millis(args.poll_ms)).await;
    }
    Online {
        count,
        all_by: None,
        latencies,
    }
}

/// The server's CPU use over `window` and its memory at the end of it; `None` without its pid.
async fn idle(pid: Option<u32>, window: Duration) -> Option<Idle> {
    let usage = || pid.and_then(|p| Usage::of(&p.to_string()).ok());
    let Some(before) = usage() else {
        tokio::time::sleep(window).await;
        return None;
    };
    let from = Instant::now();
    tokio::time::sleep(window).await;
    let after = usage()?;
    let secs = from.elapsed().as_secs_f64();
    Some(Idle {
        window_secs: secs,
        cpu_percent: (after.cpu_secs - before.cpu_secs) / secs * 100.0,
        rss_mib: after.rss_mib,
        peak_rss_mib: after.peak_rss_mib,
    })
}

/// Deploys `image` to `to` (a deployment target as the API takes it) and times when each of
/// the `expected` agents receives its assignment, from just before the POST; waits at most
/// `--fanout-timeout-secs`.
async fn fan_out(
    args: &Fleet,
    api: &Api,
    tally: &Tally,
    image: &str,
    what: String,
    to: serde_json::Value,
    expected: usize,
) -> anyhow::Result<Fanout> {
    let sent = Instant::now();
    let answer = api
        .send(
            reqwest::Method::POST,
            "/api/v1/deployments",
            &serde_json::json!({ "image": image, "target": to, "action": "stage" }),
        )
        .await
        .with_context(|| format!("deploying to {what}"))?;
    let post = sent.elapsed();
    let id: DeploymentId = answer["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .with_context(|| format!("the deployment's answer has no id: {answer}"))?;
    let until = sent + Duration::from_secs(args.fanout_timeout_secs);
    let mut receipts = tally.receipts(&id);
    while receipts.len() < expected && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        receipts = tally.receipts(&id);
    }
    let took = receipts
        .iter()
        .map(|at| at.saturating_duration_since(sent))
        .collect();
    Ok(Fanout::new(what, expected, took, post))
}

/// Catalogues a new 1 MiB raw image named `name` made in `work`, and waits until it can be
/// deployed; its id.
pub(crate) async fn add_image(
    api: &Api,
    work: &std::path::Path,
    name: &str,
    run_id: &str,
) -> anyhow::Result<String> {
    let path = work.join(format!("{name}.img"));
    // Content unique to this run and image: the same content twice is one image.
    let line = format!("boottorrent-loadgen image {name} of run {run_id}\n");
    let content: Vec<u8> = line.bytes().cycle().take(1 << 20).collect();
    std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    let path = std::path::absolute(&path).context("making the image path absolute")?;
    let view = api
        .send(
            reqwest::Method::POST,
            "/api/v1/images",
            &serde_json::json!({ "path": path, "name": name, "raw": true }),
        )
        .await
        .context("adding an image (the server must be able to read the generator's work dir)")?;
    let id = view["id"]
        .as_str()
        .with_context(|| format!("the image's answer has no id: {view}"))?
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view: serde_json::Value = api.get(&format!("/api/v1/images/{id}")).await?;
        match view["state"].as_str() {
            Some("ready") => return Ok(id),
            Some("importing" | "checking") if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => bail!("image {name} did not become ready: {view}"),
        }
    }
}
