//! `rate`: events at a sustained rate, and whether the server's orchestrator keeps up.
//!
//! `--agents` simulated machines log in (own keys, signed startup), take one deployment to
//! every machine, and then each sends signed events on a steady clock: `progress` of the
//! deployment's image with bytes rising, and every tenth event a heartbeat listing the
//! image. Meanwhile made-up machines with fresh keys enrol at `--new-per-sec`, each from its
//! own login (a startup the server has not seen: the enrolment path). Every second the
//! generator reads the server's `/metrics` counters and `/proc/<pid>`; it reports the events
//! the server applied per second (median and worst second of the sustained window), the
//! backlog (events the broker acknowledged to the generator that the orchestrator has not
//! read yet), how long the backlog took to drain after the senders stopped, and the server's
//! CPU.
//!
//! With `--server` it drives a server it did not start and rides out that server's restarts:
//! agents reconnect (fresh login proof, startup again) as the real agent does, and a failed
//! `/metrics` read is counted rather than fatal. The crash test (tests/crash.rs) uses this.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use boottorrent_proto::{
    Command, DeploymentId, Event, GLOBAL_COMMANDS_FILTER, HeldImage, ImageId, ImageState, InfoHash,
    Progress, ReplayGuard, ServerKeyAnswer, VerifyingKey, accept_command, machine_commands_filter,
    now_ms, verifying_key_from_bytes,
};
use clap::Args;
use rumqttc::{AsyncClient, EventLoop, Packet, QoS};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fleet::api::Api;
use crate::fleet::server::{Given, Run, Target, Usage};
use crate::machine::{Machine, broker_address};

#[derive(Args)]
pub struct Rate {
    /// Simulated machines that stay connected and send events.
    #[arg(long, default_value_t = 500)]
    agents: usize,
    /// Events per second the connected machines send together (progress and heartbeats).
    #[arg(long, default_value_t = 5000)]
    events_per_sec: u32,
    /// New machines per second that enrol meanwhile, each with a fresh key and its own login.
    /// A server given with --server must admit them (its `enroll_per_minute`).
    #[arg(long, default_value_t = 100)]
    new_per_sec: u32,
    /// Logins of new machines open at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds the sustained rate lasts.
    #[arg(long, default_value_t = 30)]
    secs: u64,
    /// Seconds at the start of the sustained window left out of the per-second figures
    /// (queues filling, the first commits).
    #[arg(long, default_value_t = 3)]
    warmup_secs: u64,
    /// Seconds to wait, after the senders stop, for the server to read what it was sent.
    #[arg(long, default_value_t = 60)]
    drain_secs: u64,
    /// Prefix of the machines' ids; by default `rt` and this process's id.
    #[arg(long)]
    prefix: Option<String>,
    #[command(flatten)]
    given: Given,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

/// What the senders did, counted as it happens.
#[derive(Default)]
struct Counts {
    /// Events the connected machines queued, and those the broker acknowledged.
    sent: AtomicU64,
    acked: AtomicU64,
    /// Events that could not be queued (the client's queue was full).
    unqueued: AtomicU64,
    /// Connected machines the server answered with their configuration.
    answered: AtomicU64,
    /// Connected machines that received the deployment's assignment.
    assigned: AtomicU64,
    /// Logins (first and again) of the connected machines.
    connects: AtomicU64,
    /// New machines' startups acknowledged by the broker, and those that failed.
    new_acked: AtomicU64,
    new_failed: AtomicU64,
}

/// The server's counters at one moment, from `/metrics`.
#[derive(Clone, Copy, Default, Serialize)]
struct Counters {
    received: u64,
    accepted: u64,
    dropped: u64,
    /// Times the broker moved a subscriber past messages it had not read.
    broker_skips: u64,
}

#[derive(Serialize)]
pub struct Report {
    agents: usize,
    events_per_sec_asked: u32,
    new_per_sec_asked: u32,
    secs: u64,
    /// Events the connected machines sent per second over the window, and new machines'.
    sent_per_sec: f64,
    new_acked_per_sec: f64,
    new_failed: u64,
    unqueued: u64,
    /// Events the server applied per second (accepted), over the whole window and per
    /// second after the warm-up: median and worst.
    applied_per_sec: f64,
    applied_per_sec_median: f64,
    applied_per_sec_worst: f64,
    /// Events the server dropped during the window (any reason).
    dropped: u64,
    /// Times the embedded broker moved a subscriber (the orchestrator, say) past messages it
    /// had not read, from the start of the window to the end of the drain: lost events.
    broker_skips: u64,
    /// Acknowledged by the broker but not read by the orchestrator: largest, and at the end
    /// of the window.
    backlog_max: u64,
    backlog_end: u64,
    /// Seconds after the senders stopped until the orchestrator had read everything; `None`
    /// if it had not within --drain-secs.
    drain_secs: Option<f64>,
    /// The server's CPU use over the window, percent of one core.
    server_cpu_percent: Option<f64>,
    server_rss_mib: Option<f64>,
    generator_cpu_percent: f64,
    /// `/metrics` reads that failed (the server was down, or busy for 60 s).
    metrics_failures: u64,
    /// Logins of the connected machines beyond their first.
    reconnects: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} agents asked for {} events/s and {} new machines/s for {} s",
            self.agents, self.events_per_sec_asked, self.new_per_sec_asked, self.secs
        )?;
        writeln!(
            f,
            "sent:     {:.0} events/s, {:.1} new machines/s ({} new failed, {} not queued)",
            self.sent_per_sec, self.new_acked_per_sec, self.new_failed, self.unqueued
        )?;
        writeln!(
            f,
            "applied:  {:.0} events/s over the window; per second: median {:.0}, worst {:.0}; {} dropped",
            self.applied_per_sec,
            self.applied_per_sec_median,
            self.applied_per_sec_worst,
            self.dropped
        )?;
        writeln!(
            f,
            "backlog:  max {}, at the end {}; drained {}",
            self.backlog_max,
            self.backlog_end,
            match self.drain_secs {
                Some(s) => format!("{s:.1} s after the senders stopped"),
                None => "not within the drain time".into(),
            }
        )?;
        let opt = |v: Option<f64>, unit: &str| match v {
            Some(v) => format!("{v:.0}{unit}"),
            None => "?".into(),
        };
        writeln!(
            f,
            "server:   CPU {} of one core, RSS {}; generator CPU {:.0} %",
            opt(self.server_cpu_percent, " %"),
            opt(self.server_rss_mib, " MiB"),
            self.generator_cpu_percent
        )?;
        writeln!(
            f,
            "other:    {} /metrics reads failed, {} reconnects, {} broker skips",
            self.metrics_failures, self.reconnects, self.broker_skips
        )
    }
}

pub async fn run(args: Rate) -> anyhow::Result<()> {
    if args.agents == 0 || args.events_per_sec == 0 {
        bail!("--agents and --events-per-sec must be at least 1");
    }
    // Room for every connected machine and twice the new ones.
    let per_minute = u32::try_from(args.agents)
        .unwrap_or(u32::MAX)
        .saturating_add(args.new_per_sec.saturating_mul(120))
        .max(1000);
    let run = Run::prepare(args.given.clone(), "boottorrent-rate", per_minute).await?;
    let result = run
        .until_interrupted(measure(&args, &run.target, &run.work))
        .await;
    run.finish(result, args.json).await
}

async fn measure(args: &Rate, target: &Target, work: &std::path::Path) -> anyhow::Result<Report> {
    let api = &target.api;
    let prefix = args
        .prefix
        .clone()
        .unwrap_or_else(|| format!("rt{}", std::process::id()));
    let answer: ServerKeyAnswer = api.get("/api/v1/server-key").await?;
    let key = boottorrent_proto::PublicKeyBytes::from_hex(answer.public_key.trim())
        .map_err(|e| anyhow::anyhow!("the server key is not 64 hex digits: {e}"))?;
    let server_key = verifying_key_from_bytes(&key).context("the server key")?;
    let run_id = format!("{}-{}", std::process::id(), now_ms());
    let image = crate::fleet::add_image(api, work, &format!("{prefix}-img"), &run_id).await?;

    let broker = Arc::new(broker_address(&target.mqtt)?);
    let counts = Arc::new(Counts::default());
    let stop = CancellationToken::new();
    let go = CancellationToken::new();
    let tracker = TaskTracker::new();
    let every = Duration::from_secs_f64(args.agents as f64 / f64::from(args.events_per_sec));
    let token: Arc<str> = target.enroll_token.clone().into();
    for index in 0..args.agents {
        let machine = Machine::new(&format!("{prefix}-{index:05}"))?;
        let agent = Sender {
            index,
            machine,
            server_key,
            guard: ReplayGuard::new(300_000),
            assignment: None,
            answered: false,
            assigned: false,
            ticks: 0,
            counts: counts.clone(),
        };
        // Spread the agents' clocks over one period, so that the rate is even.
        let offset = every.mul_f64(index as f64 / args.agents as f64);
        tracker.spawn(agent.run(
            broker.clone(),
            token.clone(),
            every,
            offset,
            go.clone(),
            stop.clone(),
        ));
        if index % 50 == 49 {
            // Logins in bursts of 50, so that the broker's accept queue does not overflow.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while counts.answered.load(Ordering::Relaxed) < args.agents as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} agents were answered by the server within 120 s",
                counts.answered.load(Ordering::Relaxed),
                args.agents
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    api.send(
        reqwest::Method::POST,
        "/api/v1/deployments",
        &serde_json::json!({ "image": image, "target": { "global": true }, "action": "stage" }),
    )
    .await
    .context("deploying the image to every machine")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while counts.assigned.load(Ordering::Relaxed) < args.agents as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} agents received the deployment within 60 s",
                counts.assigned.load(Ordering::Relaxed),
                args.agents
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{} agents online with the deployment; sending for {} s",
        args.agents, args.secs
    );

    let mut failures = 0;
    let before = read_counters(api, &mut failures).await.unwrap_or_default();
    let acked_before =
        counts.acked.load(Ordering::Relaxed) + counts.new_acked.load(Ordering::Relaxed);
    let sent_before = counts.sent.load(Ordering::Relaxed);
    let usage_before = target.pid.and_then(|p| Usage::of(&p.to_string()).ok());
    let self_before = Usage::of("self")?;
    let start = Instant::now();
    go.cancel();
    let enrol = tokio::spawn(enrol(
        args.new_per_sec,
        args.concurrency,
        broker.clone(),
        token.clone(),
        format!("{prefix}-new"),
        counts.clone(),
        stop.clone(),
    ));

    // Baseline for the backlog: what the server had read of this run's events at the start.
    let base = before.received.saturating_sub(acked_before);
    let mut per_second = Vec::new();
    let mut last = before;
    let mut backlog_max = 0;
    let mut backlog = 0;
    for second in 1..=args.secs {
        tokio::time::sleep_until(start + Duration::from_secs(second)).await;
        let Some(now) = read_counters(api, &mut failures).await else {
            continue;
        };
        let acked = counts.acked.load(Ordering::Relaxed) + counts.new_acked.load(Ordering::Relaxed);
        backlog = (acked + base).saturating_sub(now.received);
        backlog_max = backlog_max.max(backlog);
        if second > args.warmup_secs {
            per_second.push(now.accepted.saturating_sub(last.accepted) as f64);
        }
        last = now;
        if second % 5 == 0 {
            eprintln!(
                "{second:>4} s: applied {} events, backlog {backlog}",
                now.accepted.saturating_sub(before.accepted)
            );
        }
    }
    let window = start.elapsed().as_secs_f64();
    let end = last;
    let usage_end = target.pid.and_then(|p| Usage::of(&p.to_string()).ok());
    let self_end = Usage::of("self")?;
    let sent = counts.sent.load(Ordering::Relaxed) - sent_before;
    let new_acked = counts.new_acked.load(Ordering::Relaxed);

    // Stop sending, keep the connections, and wait for the orchestrator to read the rest.
    stop.cancel();
    let _ = enrol.await;
    let stopped = Instant::now();
    let mut drain_secs = None;
    while stopped.elapsed() < Duration::from_secs(args.drain_secs) {
        let acked = counts.acked.load(Ordering::Relaxed) + counts.new_acked.load(Ordering::Relaxed);
        if let Some(now) = read_counters(api, &mut failures).await
            && now.received + 1 >= acked + base
        {
            drain_secs = Some(stopped.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(15), tracker.wait())
        .await
        .is_err()
    {
        eprintln!("warning: some agents had not stopped 15 s after being told to");
    }
    let broker_skips = read_counters(api, &mut failures)
        .await
        .unwrap_or(end)
        .broker_skips
        .saturating_sub(before.broker_skips);

    let mut sorted = per_second.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(Report {
        agents: args.agents,
        events_per_sec_asked: args.events_per_sec,
        new_per_sec_asked: args.new_per_sec,
        secs: args.secs,
        sent_per_sec: sent as f64 / window,
        new_acked_per_sec: new_acked as f64 / window,
        new_failed: counts.new_failed.load(Ordering::Relaxed),
        unqueued: counts.unqueued.load(Ordering::Relaxed),
        applied_per_sec: end.accepted.saturating_sub(before.accepted) as f64 / window,
        applied_per_sec_median: sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
        applied_per_sec_worst: sorted.first().copied().unwrap_or(0.0),
        dropped: end.dropped.saturating_sub(before.dropped),
        broker_skips,
        backlog_max,
        backlog_end: backlog,
        drain_secs,
        server_cpu_percent: usage_before
            .zip(usage_end)
            .map(|(a, b)| (b.cpu_secs - a.cpu_secs) / window * 100.0),
        server_rss_mib: usage_end.map(|u| u.rss_mib),
        generator_cpu_percent: (self_end.cpu_secs - self_before.cpu_secs) / window * 100.0,
        metrics_failures: failures,
        reconnects: counts
            .connects
            .load(Ordering::Relaxed)
            .saturating_sub(args.agents as u64),
    })
}

/// The server's event counters; `None` (and one more failure counted) if `/metrics` did not
/// answer.
async fn read_counters(api: &Api, failures: &mut u64) -> Option<Counters> {
    let Ok(text) = api.text("/metrics").await else {
        *failures += 1;
        return None;
    };
    let value = |name: &str| -> u64 {
        text.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                // `name value` or `name{labels} value`.
                let rest = rest.strip_prefix(' ').or_else(|| {
                    rest.starts_with('{')
                        .then(|| rest.split_once("} ").map(|(_, v)| v))
                        .flatten()
                })?;
                rest.trim().parse::<u64>().ok()
            })
            .sum()
    };
    Some(Counters {
        received: value("boottorrent_mqtt_events_received_total"),
        accepted: value("boottorrent_mqtt_events_accepted_total"),
        dropped: value("boottorrent_mqtt_events_dropped_total"),
        broker_skips: value("boottorrent_mqtt_broker_skips_total"),
    })
}

/// New machines at `per_sec`, each a fresh key with its own login and one signed startup,
/// until `stop`.
async fn enrol(
    per_sec: u32,
    concurrency: usize,
    broker: Arc<(String, u16)>,
    token: Arc<str>,
    prefix: String,
    counts: Arc<Counts>,
    stop: CancellationToken,
) {
    if per_sec == 0 {
        return;
    }
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut clock = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(per_sec)));
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let tracker = TaskTracker::new();
    for n in 0u64.. {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = clock.tick() => {}
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let Ok(mut machine) = Machine::new(&format!("{prefix}-{n:07}")) else {
            counts.new_failed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let options = machine.options(&broker, &token);
        let Ok((topic, payload)) = machine.startup() else {
            counts.new_failed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let counts = counts.clone();
        tracker.spawn(async move {
            let counter =
                match crate::flood::publish_once(options, topic.to_string(), payload).await {
                    Ok(()) => &counts.new_acked,
                    Err(_) => &counts.new_failed,
                };
            counter.fetch_add(1, Ordering::Relaxed);
            drop(slot);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// One connected machine that sends events on a clock.
struct Sender {
    index: usize,
    machine: Machine,
    server_key: VerifyingKey,
    guard: ReplayGuard,
    /// The deployment, image, info hash and size it was assigned.
    assignment: Option<(DeploymentId, ImageId, InfoHash, u64)>,
    answered: bool,
    assigned: bool,
    ticks: u64,
    counts: Arc<Counts>,
}

impl Sender {
    async fn run(
        mut self,
        broker: Arc<(String, u16)>,
        token: Arc<str>,
        every: Duration,
        offset: Duration,
        go: CancellationToken,
        stop: CancellationToken,
    ) {
        let mut options = self.machine.options(&broker, &token);
        if let Ok(will) = self.machine.will() {
            options.set_last_will(will);
        }
        // Room for a second of events if the broker is slow to acknowledge.
        let queue = (1.0 / every.as_secs_f64()).ceil() as usize + 16;
        let (client, mut eventloop) = AsyncClient::new(options, queue);
        let mut connected = false;
        let mut clock = tokio::time::interval_at(Instant::now() + offset + every, every);
        clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let sending = connected && self.assignment.is_some() && go.is_cancelled();
            tokio::select! {
                _ = stop.cancelled() => break,
                polled = eventloop.poll() => match polled {
                    Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        self.counts.connects.fetch_add(1, Ordering::Relaxed);
                        for filter in [GLOBAL_COMMANDS_FILTER.to_owned(), machine_commands_filter(self.machine.id())] {
                            let _ = client.try_subscribe(filter, QoS::AtLeastOnce);
                        }
                        if let Ok((topic, payload)) = self.machine.startup() {
                            let _ = client.try_publish(topic.to_string(), QoS::AtLeastOnce, false, payload);
                        }
                    }
                    Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => self.on_command(&p.topic, &p.payload),
                    Ok(rumqttc::Event::Incoming(Packet::PubAck(_))) => {
                        self.counts.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        // The server is down or restarting: as the agent, wait and log in
                        // again with a fresh proof and will.
                        connected = false;
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        self.prepare_reconnect(&mut eventloop, &token);
                    }
                },
                _ = clock.tick(), if sending => self.tick(&client),
                // Re-evaluate `sending` when the window opens.
                _ = go.cancelled(), if !go.is_cancelled() => {}
            }
        }
        if connected {
            let _ = client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_secs(3), async {
                while let Ok(event) = eventloop.poll().await {
                    if matches!(
                        event,
                        rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)
                    ) {
                        break;
                    }
                }
            })
            .await;
        }
    }

    fn prepare_reconnect(&mut self, eventloop: &mut EventLoop, token: &str) {
        if let Ok(will) = self.machine.will() {
            eventloop.mqtt_options.set_last_will(will);
        }
        let id = self.machine.id().as_str().to_owned();
        eventloop
            .mqtt_options
            .set_credentials(id, self.machine.signer.password(token, now_ms()));
    }

    fn on_command(&mut self, topic: &str, payload: &[u8]) {
        let Ok(envelope) = accept_command(
            topic,
            payload,
            self.machine.id(),
            &[],
            &self.server_key,
            &mut self.guard,
            now_ms(),
        ) else {
            return;
        };
        match envelope.body {
            Command::MachineConfiguration(_) if !self.answered => {
                self.answered = true;
                self.counts.answered.fetch_add(1, Ordering::Relaxed);
            }
            Command::ArtifactAssignment(a) => {
                if !self.assigned {
                    self.assigned = true;
                    self.counts.assigned.fetch_add(1, Ordering::Relaxed);
                }
                if self.assignment.is_none() {
                    self.assignment = Some((a.deployment, a.image, a.info_hash, a.size));
                }
            }
            _ => {}
        }
    }

    /// One event: `progress` with bytes rising by 1/1000 of the image a tick (so a run
    /// never finishes the download and every progress changes the deployment), and every
    /// tenth a heartbeat listing the image.
    fn tick(&mut self, client: &AsyncClient) {
        let Some((deployment, image, info_hash, size)) = self.assignment.clone() else {
            return;
        };
        self.ticks += 1;
        let done = (size / 1000).max(1) * self.ticks.min(999);
        let event = if self.ticks % 10 == 0 {
            Event::Heartbeat(boottorrent_proto::Heartbeat {
                uptime_secs: self.ticks,
                images: vec![HeldImage {
                    image,
                    info_hash,
                    state: ImageState::Downloading,
                    bytes_done: done,
                    bytes_total: size,
                }],
            })
        } else {
            Event::Progress(Progress {
                deployment,
                image,
                bytes_done: done,
                bytes_total: size,
                download_bps: 1 << 20,
                upload_bps: 0,
                peers: 1,
                state: ImageState::Downloading,
            })
        };
        match self.machine.event(event) {
            Ok((topic, payload)) => {
                if client
                    .try_publish(topic.to_string(), QoS::AtLeastOnce, false, payload)
                    .is_ok()
                {
                    self.counts.sent.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.counts.unqueued.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => eprintln!("agent {}: {e:#}", self.index),
        }
    }
}
