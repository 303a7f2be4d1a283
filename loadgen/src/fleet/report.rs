//! The fleet run's report: what was reached, what failed, what the server used, fan-out and
//! API latency, as text or JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

#[derive(Serialize)]
pub struct Report {
    pub agents: usize,
    pub ramp_secs: f64,
    pub server: String,
    pub mqtt: String,
    pub server_pid: Option<u32>,
    /// The server's limit on open files (it needs about three per agent).
    pub server_open_files: Option<u64>,
    /// Agents that got a CONNACK at least once, and when the last of them first did
    /// (seconds from the start of the ramp; `None` unless all did).
    pub connected: usize,
    pub all_connected_secs: Option<f64>,
    /// Agents the server answered (`machine_configuration`), and when the last one was.
    pub answered: usize,
    pub all_answered_secs: Option<f64>,
    /// Agents online in GET /api/v1/machines at the last poll, and when all first were.
    pub online_in_api: usize,
    pub all_online_secs: Option<f64>,
    pub poll_ms: u64,
    /// Connection attempts without a CONNACK, by why.
    pub failed: BTreeMap<&'static str, u64>,
    /// Sessions lost after a CONNACK, by why.
    pub dropped: BTreeMap<&'static str, u64>,
    pub reconnects: u64,
    pub refused_commands: u64,
    pub first_refused_command: Option<String>,
    pub idle: Option<Idle>,
    pub server_peak_rss_mib: Option<f64>,
    pub server_cpu_secs: Option<f64>,
    pub fanout: Vec<Fanout>,
    pub api: Vec<Latency>,
    pub generator_cpu_secs: f64,
    pub generator_peak_rss_mib: f64,
}

/// The server at rest with every agent connected.
#[derive(Serialize)]
pub struct Idle {
    pub window_secs: f64,
    /// CPU time over the window's wall time; 100 = one core.
    pub cpu_percent: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
}

/// How fast one deployment's assignment reached its agents, from just before the POST.
#[derive(Serialize)]
pub struct Fanout {
    pub target: String,
    pub expected: usize,
    pub received: usize,
    pub post_ms: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl Fanout {
    pub fn new(target: String, expected: usize, mut took: Vec<Duration>, post: Duration) -> Fanout {
        took.sort_unstable();
        Fanout {
            target,
            expected,
            received: took.len(),
            post_ms: ms(post),
            p50_ms: quantile(&took, 0.50).map(ms),
            p99_ms: quantile(&took, 0.99).map(ms),
            max_ms: took.last().copied().map(ms),
        }
    }
}

/// One endpoint's answer times.
#[derive(Serialize)]
pub struct Latency {
    pub endpoint: String,
    pub count: usize,
    pub errors: usize,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// Answer times collected per endpoint.
#[derive(Default)]
pub struct Latencies {
    by_endpoint: BTreeMap<String, (Vec<Duration>, usize)>,
}

impl Latencies {
    pub fn add(&mut self, endpoint: &str, took: Duration, ok: bool) {
        let (times, errors) = self.by_endpoint.entry(endpoint.to_owned()).or_default();
        times.push(took);
        if !ok {
            *errors += 1;
        }
    }

    pub fn summaries(mut self) -> Vec<Latency> {
        self.by_endpoint
            .iter_mut()
            .map(|(endpoint, (times, errors))| {
                times.sort_unstable();
                Latency {
                    endpoint: endpoint.clone(),
                    count: times.len(),
                    errors: *errors,
                    p50_ms: quantile(times, 0.50).map(ms),
                    p99_ms: quantile(times, 0.99).map(ms),
                    max_ms: times.last().copied().map(ms),
                }
            })
            .collect()
    }
}

/// The nearest-rank `q` quantile of `sorted`.
fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn secs(reached: usize, of: usize, all_by: Option<f64>) -> String {
    match all_by {
        Some(s) => format!("{reached}/{of}, all by {s:.1} s"),
        None => format!("{reached}/{of}, not all"),
    }
}

fn counts(map: &BTreeMap<&'static str, u64>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(why, n)| format!("{n} {why}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0} ms"))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "fleet: {} agents started over {} s against {} (MQTT {}{})",
            self.agents,
            self.ramp_secs,
            self.server,
            self.mqtt,
            self.server_pid
                .map(|p| format!(", pid {p}"))
                .unwrap_or_default()
        )?;
        writeln!(
            f,
            "  connected (first CONNACK): {}; answered by the server: {}",
            secs(self.connected, self.agents, self.all_connected_secs),
            secs(self.answered, self.agents, self.all_answered_secs)
        )?;
        writeln!(
            f,
            "  online in the API (polled every {} ms): {}",
            self.poll_ms,
            secs(self.online_in_api, self.agents, self.all_online_secs)
        )?;
        writeln!(
            f,
            "  connection attempts without CONNACK: {}; sessions dropped: {}; reconnects: {}",
            counts(&self.failed),
            counts(&self.dropped),
            self.reconnects
        )?;
        if self.refused_commands > 0 {
            writeln!(
                f,
                "  commands the agents refused: {}, the first {}",
                self.refused_commands,
                self.first_refused_command.as_deref().unwrap_or("-")
            )?;
        }
        match &self.idle {
            Some(idle) => writeln!(
                f,
                "  server at idle ({:.0} s, heartbeats only): CPU {:.1} % of one core, RSS {:.0} MiB (peak so far {:.0} MiB)",
                idle.window_secs, idle.cpu_percent, idle.rss_mib, idle.peak_rss_mib
            )?,
            None => writeln!(f, "  server at idle: not measured (no server pid)")?,
        }
        if let (Some(cpu), Some(peak)) = (self.server_cpu_secs, self.server_peak_rss_mib) {
            writeln!(
                f,
                "  server over the whole run: {cpu:.1} CPU-s, peak RSS {peak:.0} MiB"
            )?;
        }
        for fanout in &self.fanout {
            writeln!(
                f,
                "  fan-out, {}: {}/{} received; p50 {}, p99 {}, max {} (POST answered in {:.0} ms)",
                fanout.target,
                fanout.received,
                fanout.expected,
                opt_ms(fanout.p50_ms),
                opt_ms(fanout.p99_ms),
                opt_ms(fanout.max_ms),
                fanout.post_ms
            )?;
        }
        for latency in &self.api {
            writeln!(
                f,
                "  API while the agents came online, {}: p50 {}, p99 {}, max {} ({} requests, {} failed)",
                latency.endpoint,
                opt_ms(latency.p50_ms),
                opt_ms(latency.p99_ms),
                opt_ms(latency.max_ms),
                latency.count,
                latency.errors
            )?;
        }
        writeln!(
            f,
            "  generator: {:.1} CPU-s, peak RSS {:.0} MiB",
            self.generator_cpu_secs, self.generator_peak_rss_mib
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let times: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&times, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(quantile(&times, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(quantile(&times[..1], 0.99), Some(Duration::from_millis(1)));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
