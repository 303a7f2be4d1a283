//! `boottorrent-labsim [--flag value]...`: runs one simulated lab and prints one JSON line:
//! the parameters, the time until the first and the last host had the image, its ratio to
//! S/B, the copies the server sent, link utilisation, and where the hosts' link time went
//! each half second (`link_use`: busy, or why idle). `--help` lists the flags.

use boottorrent_labsim::{Lab, LinkUse};

const USAGE: &str = "usage: boottorrent-labsim [--hosts N] [--image-bytes S] [--piece-kib K] \
[--host-mbit B] [--server-mbit B] [--slow FRACTION] [--slow-mbit B] [--per-switch H] \
[--uplink-gbit U] [--no-locality] [--no-engine-zone] [--outside-pieces K] [--no-server-in-zone] [--no-outside-peer-limit] [--dial-in-arbitrary-order] [--dial-at-tick] [--hop-us L] [--start-spread SECS] \
[--failing FRACTION] [--startup SECS] [--finish SECS] [--cpu CORES:CPU_S_PER_GIB] [--step SECS] \
[--seed N] [--limit SECS]";

fn main() {
    let mut args = std::env::args().skip(1);
    let mut lab = Lab::new(4, 276_824_064, 100.0);
    let mut server_mbit = None;
    let mut slow_mbit = 100.0;
    let mut limit = 3600.0;
    let fail = |msg: String| -> ! {
        eprintln!("{msg}\n{USAGE}");
        std::process::exit(2)
    };
    while let Some(flag) = args.next() {
        let mut value = |what: &str| -> f64 {
            let v = args
                .next()
                .unwrap_or_else(|| fail(format!("{flag} needs a value ({what})")));
            v.parse()
                .unwrap_or_else(|_| fail(format!("{flag} {v:?}: not a number ({what})")))
        };
        match flag.as_str() {
            "--hosts" => lab.hosts = value("hosts") as usize,
            "--image-bytes" => lab.image_len = value("bytes") as u64,
            "--piece-kib" => lab.piece_len = Some((value("KiB") as u32) << 10),
            "--host-mbit" => lab.host_rate = value("Mbit/s") * 1e6 / 8.0,
            "--server-mbit" => server_mbit = Some(value("Mbit/s")),
            "--slow" => lab.slow.0 = value("fraction"),
            "--slow-mbit" => slow_mbit = value("Mbit/s"),
            "--per-switch" => lab.per_switch = value("hosts") as usize,
            "--uplink-gbit" => lab.uplink_rate = value("Gbit/s") * 1e9 / 8.0,
            "--no-locality" => lab.locality = false,
            "--no-engine-zone" => lab.engine_zone = false,
            "--outside-pieces" => lab.outside_pieces = Some(value("pieces") as usize),
            "--no-server-in-zone" => lab.server_in_zone = false,
            "--no-outside-peer-limit" => lab.outside_peer_limit = false,
            "--dial-in-arbitrary-order" => lab.dial_in_handout_order = false,
            "--dial-at-tick" => lab.dial_on_announce = false,
            "--hop-us" => lab.hop_latency = value("microseconds") * 1e-6,
            "--start-spread" => lab.start_spread = value("seconds"),
            "--failing" => lab.failing = value("fraction"),
            "--startup" => lab.calibration.startup = value("seconds"),
            "--finish" => lab.calibration.finish = value("seconds"),
            "--cpu" => {
                let v = args
                    .next()
                    .unwrap_or_else(|| fail("--cpu needs CORES:CPU_S_PER_GIB".into()));
                let parsed = v
                    .split_once(':')
                    .and_then(|(c, s)| Some((c.parse().ok()?, s.parse().ok()?)));
                lab.calibration.cpu = Some(parsed.unwrap_or_else(|| {
                    fail(format!(
                        "--cpu {v:?}: expected CORES:CPU_S_PER_GIB, e.g. 2:16"
                    ))
                }));
            }
            "--step" => lab.step = value("seconds"),
            "--seed" => lab.seed = value("seed") as u64,
            "--limit" => limit = value("seconds"),
            "--help" | "-h" => {
                println!("{USAGE}");
                return;
            }
            other => fail(format!("unknown argument {other:?}")),
        }
    }
    lab.server_rate = server_mbit.map_or(lab.host_rate, |b| b * 1e6 / 8.0);
    lab.slow.1 = slow_mbit * 1e6 / 8.0;
    let started = std::time::Instant::now();
    let out = lab.run(limit);
    let ideal = lab.ideal();
    let finite = |x: f64| {
        if x.is_finite() {
            serde_json::json!(x)
        } else {
            serde_json::Value::Null
        }
    };
    let line = serde_json::json!({
        "hosts": lab.hosts,
        "image_bytes": lab.image_len,
        "piece_bytes": out.piece_len,
        "host_mbit": lab.host_rate * 8.0 / 1e6,
        "server_mbit": lab.server_rate * 8.0 / 1e6,
        "slow_fraction": lab.slow.0,
        "slow_mbit": lab.slow.1 * 8.0 / 1e6,
        "per_switch": lab.per_switch,
        "uplink_gbit": lab.uplink_rate * 8.0 / 1e9,
        "locality": lab.locality,
        "engine_zone": lab.engine_zone,
        "outside_pieces": lab.outside_pieces,
        "server_in_zone": lab.server_in_zone,
        "outside_peer_limit": lab.outside_peer_limit,
        "dial_in_handout_order": lab.dial_in_handout_order,
        "dial_on_announce": lab.dial_on_announce,
        "hop_us": lab.hop_latency * 1e6,
        "start_spread_s": lab.start_spread,
        "failing_fraction": lab.failing,
        "calibration": {
            "startup_s": lab.calibration.startup,
            "finish_s": lab.calibration.finish,
            "cpu": lab.calibration.cpu.map(|(c, s)| serde_json::json!({"cores": c, "cpu_s_per_gib": s})),
        },
        "ideal_s": ideal,
        "first_done_s": finite(out.first_done),
        "last_done_s": finite(out.last_done),
        "last_over_ideal": finite(out.last_done / ideal),
        "failed": out.failed,
        "server_copies": out.server_copies,
        "util": {
            "server_link": out.server_util,
            "uplink_mean": out.uplink_util_mean,
            "uplink_max": out.uplink_util_max,
            "host_up_mean": out.host_up_util,
            "host_down_mean": out.host_down_util,
        },
        "uplink_bytes": out.uplink_bytes,
        "local_connections": out.local_connections,
        "link_use": out.link_use.iter().enumerate().map(|(i, u)| {
            let named = |names: &[&str], shares: &[f64]| -> serde_json::Map<String, serde_json::Value> {
                names
                    .iter()
                    .zip(shares)
                    .map(|(n, x)| (n.to_string(), serde_json::json!((x * 1000.0).round() / 1000.0)))
                    .collect()
            };
            serde_json::json!({
                "from_s": i as f64 * LinkUse::SPAN,
                "up": named(&LinkUse::UP, &u.up),
                "down": named(&LinkUse::DOWN, &u.down),
            })
        }).collect::<Vec<_>>(),
        "wall_s": started.elapsed().as_secs_f64(),
    });
    println!("{line}");
}
