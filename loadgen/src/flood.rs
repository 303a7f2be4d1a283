//! `flood`: made-up machines enrol as fast as asked, each from its own login with the
//! enrollment token (what any student can do), while one real machine keeps sending
//! heartbeats. It reports how long each heartbeat took to show in the API (`last_seen`),
//! before and during the flood, and what the server did with the made-up machines.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, bail};
use boottorrent_proto::{Event, Heartbeat, MachineId, now_ms};
use clap::Args;
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};

use crate::machine::{Machine, broker_address};

#[derive(Args)]
pub struct Flood {
    /// The server's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    server: String,
    /// The server's MQTT port, as host:port.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: String,
    /// The enrollment token (`<data-dir>/enroll.token`).
    #[arg(long, env = "BOOTTORRENT_ENROLL_TOKEN")]
    enroll_token: String,
    /// A token that reads the API: admin or viewer (`<data-dir>/viewer.token`).
    #[arg(long, env = "BOOTTORRENT_VIEWER_TOKEN")]
    read_token: String,
    /// Made-up machines' startups per second to attempt.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// How long the flood lasts, in seconds.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Logins open at once for made-up machines.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Milliseconds between the real machine's heartbeats.
    #[arg(long, default_value_t = 250)]
    heartbeat_ms: u64,
}

/// Logs in with `options`, publishes `(topic, payload)` at QoS 1 and waits for the broker's
/// acknowledgement; on failure, what failed.
pub(crate) async fn publish_once(
    options: MqttOptions,
    topic: String,
    payload: Vec<u8>,
) -> Result<(), &'static str> {
    let (client, mut events) = AsyncClient::new(options, 4);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .map_err(|_| "queueing the publish")?;
    let acked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(MqttEvent::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(_)) => return Err("login refused"),
                Err(rumqttc::ConnectionError::Io(_)) => return Err("connection error"),
                Err(rumqttc::ConnectionError::NetworkTimeout) => {
                    return Err("no CONNACK in time");
                }
                Err(rumqttc::ConnectionError::MqttState(_)) => {
                    return Err("connection closed by the server");
                }
                Err(_) => return Err("other MQTT error"),
            }
        }
    })
    .await
    .unwrap_or(Err("no PUBACK within 10 s"));
    let _ = client.disconnect().await;
    // Let the DISCONNECT go out.
    let _ = tokio::time::timeout(Duration::from_millis(100), events.poll()).await;
    acked
}

/// `GET path` as JSON with the read token.
async fn get_json(
    http: &reqwest::Client,
    args: &Flood,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    let url = format!("{}{path}", args.server.trim_end_matches('/'));
    let response = http
        .get(&url)
        .bearer_auth(&args.read_token)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    if !response.status().is_success() {
        bail!("GET {url}: {}", response.status());
    }
    Ok(response.json().await?)
}

/// The value of one counter line (`name value`) of `/metrics`.
async fn metric(http: &reqwest::Client, args: &Flood, name: &str) -> u64 {
    let url = format!("{}/metrics", args.server.trim_end_matches('/'));
    let Ok(response) = http.get(&url).send().await else {
        return 0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// Milliseconds from now until the API shows `machine`'s `last_seen` at or after now.
async fn applied_after(
    http: &reqwest::Client,
    args: &Flood,
    machine: &MachineId,
    sent_ms: i64,
) -> Option<u64> {
    let sent = Instant::now();
    // RFC 3339 with milliseconds, as the API writes it: fixed width, so it orders as text.
    let since =
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(sent_ms.max(0) as u64))
            .to_string();
    while sent.elapsed() < Duration::from_secs(30) {
        if let Ok(m) = get_json(http, args, &format!("/api/v1/machines/{machine}")).await {
            if m["last_seen"]
                .as_str()
                .is_some_and(|seen| seen >= since.as_str())
            {
                return Some(sent.elapsed().as_millis() as u64);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Median and worst of `samples` (sorted here), as text.
fn spread(samples: &mut [u64]) -> String {
    if samples.is_empty() {
        return "no samples".into();
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    format!(
        "median {} ms, p90 {} ms, worst {} ms ({} heartbeats)",
        at(0.5),
        at(0.9),
        samples[samples.len() - 1],
        samples.len()
    )
}

pub async fn run(args: Flood) -> anyhow::Result<()> {
    let broker = broker_address(&args.mqtt)?;
    let http = reqwest::Client::new();
    let run = std::process::id();

    // The real machine: one login kept open, a startup, then heartbeats.
    let mut real = Machine::new(&format!("loadgen-real-{run}"))?;
    let (client, mut events) = AsyncClient::new(real.options(&broker, &args.enroll_token), 64);
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            drop(event);
        }
    });
    let (topic, startup) = real.startup()?;
    client
        .publish(topic.to_string(), QoS::AtLeastOnce, false, startup)
        .await?;
    let known = Instant::now();
    loop {
        let m = get_json(&http, &args, &format!("/api/v1/machines/{}", real.id())).await;
        if m.is_ok_and(|m| m["key_state"] == "approved") {
            break;
        }
        if known.elapsed() > Duration::from_secs(30) {
            bail!(
                "the real machine {} was not approved within 30 s: is auto_approve on, and the \
                 enrollment token right?",
                real.id()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let heartbeat = |real: &mut Machine| {
        real.event(Event::Heartbeat(Heartbeat {
            uptime_secs: started.elapsed().as_secs(),
            images: vec![],
        }))
    };
    let measure = async |real: &mut Machine, lags: &mut Vec<u64>, missed: &mut u32| {
        let (topic, payload) = heartbeat(real)?;
        let sent_ms = now_ms();
        client
            .publish(topic.to_string(), QoS::AtLeastOnce, false, payload)
            .await?;
        match applied_after(&http, &args, real.id(), sent_ms).await {
            Some(lag) => lags.push(lag),
            None => *missed += 1,
        }
        tokio::time::sleep(Duration::from_millis(args.heartbeat_ms)).await;
        anyhow::Ok(())
    };

    // Before: the baseline of the same measurement.
    let (mut quiet, mut quiet_missed) = (Vec::new(), 0);
    for _ in 0..20 {
        measure(&mut real, &mut quiet, &mut quiet_missed).await?;
    }
    let limited_before = metric(
        &http,
        &args,
        "boottorrent_mqtt_events_dropped_total{reason=\"enrollment_limited\"}",
    )
    .await;
    let known_before = metric(&http, &args, "boottorrent_machines").await;

    // The flood, paced to `rate` startups a second over `concurrency` logins at a time.
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(
        std::collections::BTreeMap::<&str, u64>::new(),
    ));
    let permits = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let deadline = Instant::now() + Duration::from_secs(args.secs);
    let flood = {
        let (sent, failed, broker, token) = (
            sent.clone(),
            failed.clone(),
            broker.clone(),
            args.enroll_token.clone(),
        );
        let every = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            let mut tasks = tokio::task::JoinSet::new();
            while Instant::now() < deadline {
                tick.tick().await;
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                n += 1;
                let Ok(mut fake) = Machine::new(&format!("flood-{run}-{n}")) else {
                    break;
                };
                let Ok((topic, payload)) = fake.startup() else {
                    break;
                };
                let options = fake.options(&broker, &token);
                let (sent, failed) = (sent.clone(), failed.clone());
                tasks.spawn(async move {
                    match publish_once(options, topic.to_string(), payload).await {
                        Ok(()) => {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(why) => {
                            *failed
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .entry(why)
                                .or_default() += 1;
                        }
                    }
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        })
    };
    let (mut loud, mut loud_missed) = (Vec::new(), 0);
    while !flood.is_finished() {
        measure(&mut real, &mut loud, &mut loud_missed).await?;
    }
    flood.await?;
    let flood_secs = args.secs as f64;
    // The server applies what it read; give the last batches a moment to be counted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let limited = metric(
        &http,
        &args,
        "boottorrent_mqtt_events_dropped_total{reason=\"enrollment_limited\"}",
    )
    .await
        - limited_before;
    let kept = metric(&http, &args, "boottorrent_machines")
        .await
        .saturating_sub(known_before);
    let sent = sent.load(Ordering::Relaxed);
    let failed = failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
    println!(
        "flood: {sent} made-up startups delivered in {flood_secs:.0} s ({:.0}/s), failed: {}",
        sent as f64 / flood_secs,
        if failed.is_empty() {
            "none".to_owned()
        } else {
            failed
                .iter()
                .map(|(why, n)| format!("{n} {why}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    println!("  server: {kept} made-up machines kept, {limited} refused by the enrollment limit");
    println!(
        "real machine's heartbeat applied (publish to API), quiet: {}{}",
        spread(&mut quiet),
        missed_text(quiet_missed)
    );
    println!(
        "real machine's heartbeat applied (publish to API), flood: {}{}",
        spread(&mut loud),
        missed_text(loud_missed)
    );
    let _ = client.disconnect().await;
    Ok(())
}

fn missed_text(missed: u32) -> String {
    if missed == 0 {
        String::new()
    } else {
        format!(", {missed} not applied within 30 s")
    }
}
