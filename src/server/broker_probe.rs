//! Whether the embedded broker still admits clients, for `/healthz`.
//!
//! rumqttd cannot be asked whether it accepts connections, and it can stop doing so while its
//! port stays open: at its `max_connections` (which the front keeps it below, but listeners a
//! broker file adds are not counted by the front), or after a panic poisoned its table of
//! last wills (issue #17). So every [`PROBE_EVERY`] this task logs in to rumqttd's loopback
//! listener as a client would and expects a CONNACK 0 within [`PROBE_TIMEOUT`]; if it does not
//! get one, `/healthz` reports the subsystem `mqtt_broker` degraded with the reason, until a
//! probe succeeds again.
//!
//! The probe takes one entry of rumqttd's connection table, kept aside for it by
//! `broker::client_limit`. It logs in with a client id of its own and a password made at
//! start that never leaves the process. It keeps that id while probes succeed, so that a
//! session rumqttd has not yet closed is replaced rather than counted twice. After a failure
//! it moves to a new id: rumqttd may have kept the refused id's last-will entry, and the
//! next login with that id would panic inside rumqttd.
//!
//! Tasks: this one loop, stopped by its shutdown token.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes;
use rumqttc::{ConnAck, Connect, ConnectReturnCode, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::server::broker::PROBE_CLIENT_PREFIX;
use crate::server::config::Secret;
use crate::server::health::Health;

/// How often the broker is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(3);

/// How long a probe waits for its CONNACK (and, after it, for rumqttd to close the session).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The subsystem's name in `/healthz`.
pub const SUBSYSTEM: &str = "mqtt_broker";

/// Probes the broker at `broker` until `shutdown`, reporting into `health`.
pub async fn run(broker: SocketAddr, secret: Secret, health: Health, shutdown: CancellationToken) {
    let mut generation = 0u64;
    let mut failures = 0u64;
    loop {
        let client_id = format!("{PROBE_CLIENT_PREFIX}{generation}");
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            outcome = probe(broker, &client_id, &secret) => outcome,
        };
        match outcome {
            Ok(()) => {
                failures = 0;
                health.recovered(SUBSYSTEM);
            }
            Err(why) => {
                failures += 1;
                generation += 1;
                health.degraded(
                    SUBSYSTEM,
                    format!(
                        "the embedded MQTT broker admits no clients: a login on its loopback \
                         listener {why} (failed probes in a row: {failures}); if a listener of the \
                         broker file holds all of its max_connections, close some of those \
                         clients, otherwise restart the server"
                    ),
                );
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = tokio::time::sleep(PROBE_EVERY) => {}
        }
    }
}

/// One login as `client_id`: `Ok` when rumqttd answered CONNACK 0, else what went wrong.
async fn probe(broker: SocketAddr, client_id: &str, secret: &Secret) -> Result<(), String> {
    let mut stream = tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(broker))
        .await
        .map_err(|_| format!("could not connect to {broker} in time"))?
        .map_err(|e| format!("could not connect to {broker}: {e}"))?;
    let mut connect = Connect::new(client_id);
    connect.set_login(client_id, secret.expose());
    let mut out = BytesMut::new();
    connect
        .write(&mut out)
        .map_err(|e| format!("could not be encoded: {e:?}"))?;
    stream
        .write_all(&out)
        .await
        .map_err(|e| format!("could not be sent: {e}"))?;
    let ack = tokio::time::timeout(PROBE_TIMEOUT, connack(&mut stream))
        .await
        .map_err(|_| format!("got no CONNACK within {} s", PROBE_TIMEOUT.as_secs()))??;
    // Leave properly, and wait (bounded) until rumqttd let go of the session, so that the
    // next probe does not find this one still counted.
    out.clear();
    if Packet::Disconnect.write(&mut out, 2).is_ok() {
        let _ = stream.write_all(&out).await;
    }
    let _ = tokio::time::timeout(PROBE_TIMEOUT, until_closed(stream)).await;
    match ack.code {
        ConnectReturnCode::Success => Ok(()),
        code => Err(format!("was refused with {code:?}")),
    }
}

/// Reads until a whole CONNACK arrived.
async fn connack(stream: &mut TcpStream) -> Result<ConnAck, String> {
    let mut buf = BytesMut::with_capacity(16);
    loop {
        match mqttbytes::check(buf.iter(), 16) {
            Ok(header) => {
                let frame = buf.split_to(header.frame_length()).freeze();
                return match header.packet_type() {
                    Ok(mqttbytes::PacketType::ConnAck) => ConnAck::read(header, frame)
                        .map_err(|e| format!("got a malformed CONNACK: {e:?}")),
                    other => Err(format!("got {other:?} instead of a CONNACK")),
                };
            }
            Err(mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("got a malformed answer: {e:?}")),
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) => return Err("was closed without a CONNACK".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("failed before a CONNACK: {e}")),
        }
    }
}

async fn until_closed(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 512];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener that answers each connection with `answer` (nothing if empty) and closes.
    async fn fake_broker(answer: &'static [u8]) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 256];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(answer).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn only_a_connack_0_is_a_working_broker() {
        let secret = Secret::new("s".into());
        let ok = fake_broker(&[0x20, 2, 0, 0]).await;
        assert_eq!(probe(ok, "boottorrent-probe-0", &secret).await, Ok(()));
        let unavailable = fake_broker(&[0x20, 2, 0, 3]).await;
        let why = probe(unavailable, "boottorrent-probe-0", &secret)
            .await
            .unwrap_err();
        assert!(why.contains("ServiceUnavailable"), "{why}");
        let silent = fake_broker(&[]).await;
        let why = probe(silent, "boottorrent-probe-0", &secret)
            .await
            .unwrap_err();
        assert_eq!(why, "was closed without a CONNACK");
    }

    #[tokio::test]
    async fn the_health_follows_the_probes() {
        let health = Health::default();
        let shutdown = CancellationToken::new();
        let silent = fake_broker(&[]).await;
        let task = tokio::spawn(run(
            silent,
            Secret::new("s".into()),
            health.clone(),
            shutdown.clone(),
        ));
        for _ in 0..200 {
            if !health.problems().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let problems = health.problems();
        assert!(
            problems[SUBSYSTEM].contains("closed without a CONNACK"),
            "{problems:?}"
        );
        shutdown.cancel();
        task.await.unwrap();
    }
}
