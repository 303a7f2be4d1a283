//! `boottorrent serve`: starts every subsystem under one shutdown tree.
//!
//! Tasks: the orchestrator (broker link, registry), the HTTP server (API, tracker), the
//! tracker's peer expiry, the seeder (our swarm engine, super-seeding the catalog) and the
//! catalog's imports (their hashing on the blocking pool stops at a cancel flag), each with a
//! child token of the root `CancellationToken`, tracked by one `TaskTracker`. rumqttd runs on
//! its own threads and cannot be stopped; it ends with the process. SIGINT or SIGTERM cancels
//! the root token; a second signal, or tasks still running after `SHUTDOWN_DEADLINE`, forces
//! exit.
//!
//! The rooms, by the job each does:
//!
//! - where clients come in: `broker` (the embedded rumqttd and its login check, with
//!   `keyring`, `broker_log` and `broker_probe`, which tells `/healthz` whether it admits
//!   clients), `broker_front` (the MQTT ports, their topic rules and connection limit),
//!   `http` with `listener` and `dashboard` (API, tracker, dashboard);
//! - what the fleet is: `orchestrator` (the single writer), `registry` and `enrollment`
//!   (machines, their keys and how fast new ones join), `fleet`, `deployment` and `zone`
//!   (what each machine should hold), `store` (redb), `passkey` (what a machine may fetch);
//! - what the server serves: `catalog` (images and their torrents), `locality` (which
//!   peers the tracker hands out first);
//! - how it is run and watched: `config`, `credentials`, `health`, `metrics`.

pub mod broker;
pub mod broker_front;
pub mod broker_log;
pub mod broker_probe;
pub mod catalog;
pub mod config;
pub mod credentials;
pub mod deployment;
pub mod enrollment;
pub mod external_broker;
pub mod fleet;
pub mod health;
pub mod http;
pub mod keyring;
pub mod listener;
pub mod locality;
pub mod machine_ca;
pub mod metrics;
pub mod mosquitto;
pub mod orchestrator;
pub mod passkey;
pub mod registry;
pub mod store;
pub mod zone;

use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use boottorrent_bt::InfoHash;
use boottorrent_swarm::session::{Admission, Encryption, Session, SessionConfig};
use boottorrent_tracker::swarm::{Tracker, TrackerConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::server::catalog::Catalog;
use crate::server::config::Config;
use crate::server::credentials::Credentials;
use crate::server::fleet::Fleet;
use crate::server::health::Health;
use crate::server::keyring::Keyring;
use crate::server::locality::ServerLocality;
use crate::server::metrics::Metrics;
use crate::server::passkey::{Grants, Passkeys};
use crate::server::registry::{Registry, Settings};
use crate::server::store::Store;

/// How long running tasks get to finish after a shutdown signal.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// Runs the server until a shutdown signal.
pub async fn run(config: Config) -> anyhow::Result<()> {
    crate::server::listener::raise_open_file_limit();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let credentials = Credentials::load_or_create(&config)?;
    let db_path = config.data_dir.join("boottorrent.redb");
    let store = Store::open(&db_path).with_context(|| {
        format!(
            "opening the database of data directory {}",
            config.data_dir.display()
        )
    })?;
    let metrics = Arc::new(Metrics::default());
    let health = Health::default();
    crate::server::broker_log::count_into(metrics.clone());
    crate::server::broker_log::report_panics(metrics.clone());
    let http_listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("binding the HTTP listener on {}", config.http_listen))?;
    // The API and dashboard over TLS, from the same PEM files as MQTT over TLS.
    let https = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            // The same checks, and messages, as for the MQTT TLS listener.
            broker::check_pem(cert, key)?;
            let tls = crate::server::listener::tls_acceptor(cert, key, &[b"http/1.1"])?;
            let listener = tokio::net::TcpListener::bind(config.https_listen)
                .await
                .with_context(|| {
                    format!("binding the HTTPS listener on {}", config.https_listen)
                })?;
            Some((listener, tls))
        }
        _ => None,
    };

    let keyring = Keyring::default();
    let grants = Grants::default();
    let passkeys = Passkeys::new(&credentials.server_key, keyring.clone(), grants.clone());
    let keyring_for_http = keyring.clone();
    let keyring_for_front = keyring.clone();
    // With an external broker (`--broker`) the site's broker admits the agents; without, the
    // embedded one does, behind the front.
    let embedded = match &config.broker {
        Some(_) => None,
        None => Some(tokio::task::block_in_place(|| {
            broker::start(
                &config,
                credentials.enroll_token.clone(),
                credentials.admin_token.clone(),
                keyring.clone(),
                metrics.clone(),
            )
        })?),
    };
    let registry = Registry::new(
        store.clone(),
        Settings {
            auto_approve: config.auto_approve,
            heartbeat_interval_secs: config.heartbeat_interval_secs,
            replay_window_ms: i64::from(config.replay_window_secs) * 1000,
            enrollment: enrollment::Limits {
                per_minute: config.enroll_per_minute,
                max_pending: config.max_pending_machines,
            },
        },
        credentials.server_key.clone(),
        keyring,
        metrics.clone(),
        boottorrent_proto::now_ms(),
    )
    .context("loading machines from the database")?;
    // Live events for `GET /api/v1/events`; a watcher that falls this far behind skips ahead.
    let (live, _) = tokio::sync::broadcast::channel(1024);
    let fleet = Fleet::load(
        store.clone(),
        &config.zones,
        config.stall_timeout_secs,
        config.reboot_timeout_secs,
        live.clone(),
        grants,
    )
    .context("loading zones and deployments from the database")?;

    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let interval = config.announce_interval_secs;
    let tracker = Arc::new(Tracker::new(TrackerConfig {
        interval_secs: interval,
        min_interval_secs: (interval / 2).max(1),
        max_peers_per_address: config.tracker_max_peers_per_address as usize,
        ..TrackerConfig::default()
    }));
    // The seeder serves only peers in the tracker's swarm of that torrent, and the tracker
    // admits only announces with an approved machine's passkey.
    let admitted = {
        let tracker = tracker.clone();
        Admission(Arc::new(move |info_hash: InfoHash, ip| {
            Box::pin(std::future::ready(tracker.has_address(info_hash.0, ip)))
        }))
    };
    let seeder = Session::start(
        SessionConfig {
            listen: config.bt_listen,
            state_dir: Some(config.data_dir.join("resume")),
            // A few slots at first, so the first pieces leave soon; more (up to 64) while the
            // upload falls behind, as it does when crowded uplinks share it out per flow.
            upload_slots: 64,
            first_upload_slots: Some(16),
            max_peers: 1024,
            admission: Some(admitted),
            encryption: if config.bt_require_encryption {
                Encryption::Require
            } else {
                Encryption::Accept
            },
            ..SessionConfig::default()
        },
        shutdown.child_token(),
    )
    .await
    .with_context(|| {
        format!(
            "starting the seeder on {}: is the port in use?",
            config.bt_listen
        )
    })?;
    let catalog = Catalog::start(
        store.clone(),
        seeder.clone(),
        tracker.clone(),
        config.public_url(),
        &config.data_dir,
        passkeys.clone(),
        tasks.clone(),
        shutdown.child_token(),
    )
    .context("loading the image catalog")?;
    let locality = Arc::new(ServerLocality::new(
        store.clone(),
        seeder.local_addr().port(),
    ));
    spawn(&tasks, &shutdown, "seeder", async move {
        seeder.stopped().await;
        Ok(())
    });
    spawn(&tasks, &shutdown, "tracker-expiry", {
        let token = shutdown.child_token();
        let tracker = tracker.clone();
        async move {
            // Peers expire after two intervals; sweeping a few times per interval keeps the
            // peer lists honest without scanning on every announce.
            let every = Duration::from_secs(u64::from(interval.max(4)) / 4);
            loop {
                tokio::select! {
                    _ = token.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(every) => tracker.expire(std::time::Instant::now()),
                }
            }
        }
    });
    let (link, mqtt_max_clients) = match embedded {
        Some((link, mqtt)) => {
            // Clients reach the broker through the front, which keeps machines to their own topics.
            let mqtt_max_clients = mqtt.max_clients;
            let front = Arc::new(broker_front::Front::new(
                mqtt.internal,
                mqtt.max_packet,
                mqtt.max_clients,
                mqtt.admissions.clone(),
                keyring_for_front,
                health.clone(),
                metrics.clone(),
            ));
            spawn(&tasks, &shutdown, "mqtt-probe", {
                let (token, health) = (shutdown.child_token(), health.clone());
                let (internal, secret) = (mqtt.internal, mqtt.probe_secret.clone());
                async move {
                    broker_probe::run(internal, secret, health, token).await;
                    Ok(())
                }
            });
            let mqtt_tls = match (&config.tls_cert, &config.tls_key, mqtt.tls) {
                (Some(cert), Some(key), Some(listener)) => Some((
                    tokio::net::TcpListener::from_std(listener).context("serving MQTT over TLS")?,
                    crate::server::listener::tls_acceptor(cert, key, &[])?,
                )),
                _ => None,
            };
            let plain = tokio::net::TcpListener::from_std(mqtt.plain).context("serving MQTT")?;
            spawn(&tasks, &shutdown, "mqtt", {
                let (front, token) = (front.clone(), shutdown.child_token());
                async move {
                    broker_front::serve(plain, front, None, token).await;
                    Ok(())
                }
            });
            if let Some((listener, tls)) = mqtt_tls {
                spawn(&tasks, &shutdown, "mqtts", {
                    let token = shutdown.child_token();
                    async move {
                        broker_front::serve(listener, front, Some(tls), token).await;
                        Ok(())
                    }
                });
            }
            (
                orchestrator::BrokerLink::Embedded(link),
                Some(mqtt_max_clients),
            )
        }
        None => (
            orchestrator::BrokerLink::External(external_broker::External::start(
                external_broker::settings(&config)?,
                health.clone(),
                &tasks,
                shutdown.child_token(),
            )?),
            None,
        ),
    };
    let (handle, requests) = orchestrator::channel();
    // Check for silent machines often enough that "offline" is at most a few seconds late.
    let sweep_every = Duration::from_secs(u64::from(config.heartbeat_interval_secs).clamp(1, 10));
    spawn(&tasks, &shutdown, "orchestrator", {
        let token = shutdown.child_token();
        let metrics = metrics.clone();
        let live = live.clone();
        let health = health.clone();
        async move {
            orchestrator::run(
                link,
                registry,
                fleet,
                requests,
                live,
                metrics,
                health,
                sweep_every,
                token,
            )
            .await
        }
    });
    // Agents of an external broker log in with a certificate of the machine CA.
    let certificates = match &config.broker {
        Some(_) => Some(Arc::new(machine_ca::Certificates {
            ca: machine_ca::MachineCa::load_or_create(&config.data_dir)?,
            enroll_token: credentials.enroll_token.clone(),
        })),
        None => None,
    };
    let state = http::AppState {
        live,
        shutdown: shutdown.child_token(),
        store,
        metrics,
        health,
        admin_token: credentials.admin_token.clone(),
        viewer_token: credentials.viewer_token.clone(),
        metrics_token: config.metrics_token.clone(),
        listener: Arc::default(),
        server_key: credentials.server_key.verifying_key(),
        orchestrator: handle,
        catalog,
        tracker,
        locality,
        passkeys,
        keyring: keyring_for_http,
        proof_window_ms: i64::from(config.replay_window_secs) * 1000,
        https_url: config.https_url(),
        certificates,
    };
    let limits = crate::server::listener::Limits {
        header_timeout: Duration::from_secs(u64::from(config.http_header_timeout_secs)),
        write_timeout: Duration::from_secs(u64::from(config.http_write_timeout_secs)),
        max_connections: config.http_max_connections as usize,
    };
    if let Some((listener, tls)) = https {
        let state = state.clone();
        spawn(&tasks, &shutdown, "https", {
            let token = shutdown.child_token();
            async move {
                http::serve(listener, state, limits, Some(tls), token)
                    .await
                    .context("serving HTTPS")
            }
        });
    }
    spawn(&tasks, &shutdown, "http", {
        let token = shutdown.child_token();
        async move {
            http::serve(http_listener, state, limits, None, token)
                .await
                .context("serving HTTP")
        }
    });
    tasks.close();
    tracing::info!(
        mqtt = %config.broker.as_ref().map_or_else(|| config.mqtt_listen.to_string(), |b| format!("external broker {b}")),
        mqtt_max_clients,
        mqtts = %config.tls_cert.as_ref().map(|_| config.mqtts_listen.to_string()).unwrap_or_else(|| "off".into()),
        https = %config.https_url().unwrap_or_else(|| "off".into()),
        http = %config.http_listen,
        bt = %config.bt_listen,
        public_url = %config.public_url(),
        data_dir = %config.data_dir.display(),
        "boottorrent ready"
    );

    tokio::select! {
        _ = signal() => tracing::info!("shutting down (a second signal forces exit)"),
        _ = shutdown.cancelled() => tracing::error!("a subsystem failed; shutting down"),
    }
    shutdown.cancel();
    tokio::select! {
        _ = tasks.wait() => {}
        _ = signal() => anyhow::bail!("second signal: exiting without waiting for tasks"),
        _ = tokio::time::sleep(SHUTDOWN_DEADLINE) => {
            anyhow::bail!("tasks still running {} s after shutdown; exiting", SHUTDOWN_DEADLINE.as_secs())
        }
    }
    Ok(())
}

/// Spawns a named task; if it fails, its error is logged and the whole server shuts down,
/// because a server without its orchestrator or HTTP API is not doing its job.
fn spawn<F>(tasks: &TaskTracker, shutdown: &CancellationToken, name: &'static str, task: F)
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        if let Err(e) = task.await {
            tracing::error!(task = name, "{e:#}");
            shutdown.cancel();
        }
    });
}

async fn signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
