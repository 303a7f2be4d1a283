//! The orchestrator: the server's only connection to the broker.
//!
//! One task owns the in-process rumqttd link and the [`Registry`]. It waits on three things:
//! notifications from the broker (events from machines), requests from the HTTP API (which
//! must go through here because the registry is the single writer of machine state), and a
//! timer that marks silent machines offline.
//!
//! Events are drained in batches: everything the broker has queued, up to `MAX_BATCH`, is
//! applied in one database transaction, so a burst of thousands of events costs a handful of
//! fsyncs instead of one each. rumqttd hands a link at most `max_outgoing_packet_count`
//! packets and then sends `Unschedule`; the link must answer with `wake` or the router never
//! sends it anything again. That is what keeps a 10,000-event burst from stalling us.

use std::sync::Arc;
use std::time::Duration;

use boottorrent_proto::{EVENTS_FILTER, MachineId};
use futures_util::FutureExt;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::broker::Running;
use crate::metrics::Metrics;
use crate::registry::{Approval, ApproveError, Outgoing, Registry};

/// Most events applied in one transaction.
const MAX_BATCH: usize = 1024;

/// What the HTTP API asks of the orchestrator.
pub enum Request {
    Approve {
        machine: MachineId,
        reply: oneshot::Sender<Result<Approval, ApproveError>>,
    },
}

/// Handle for sending requests to the running orchestrator.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Request>,
}

impl Handle {
    /// Approves a machine's waiting key; resolves once the approval is stored.
    pub async fn approve(
        &self,
        machine: MachineId,
    ) -> anyhow::Result<Result<Approval, ApproveError>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Approve { machine, reply })
            .await
            .map_err(|_| anyhow::anyhow!("the orchestrator is not running"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the orchestrator stopped before answering"))
    }
}

/// Creates the request channel; the receiver goes to [`run`].
pub fn channel() -> (Handle, mpsc::Receiver<Request>) {
    let (tx, rx) = mpsc::channel(64);
    (Handle { tx }, rx)
}

/// Runs until `shutdown` is cancelled.
pub async fn run(
    link: Running,
    mut registry: Registry,
    mut requests: mpsc::Receiver<Request>,
    metrics: Arc<Metrics>,
    sweep_every: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Running {
        mut link_tx,
        mut link_rx,
    } = link;
    link_tx
        .subscribe(EVENTS_FILTER)
        .map_err(|e| anyhow::anyhow!("subscribing to {EVENTS_FILTER}: {e:?}"))?;
    let mut sweep = tokio::time::interval(sweep_every);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::new();
    tracing::info!("orchestrator listening on {EVENTS_FILTER}");

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            notification = link_rx.next() => {
                let notification = notification
                    .map_err(|e| anyhow::anyhow!("the broker link failed: {e:?}"))?;
                collect(notification, &mut link_rx, &mut batch).await?;
                // Whatever else the broker already queued joins this batch.
                while batch.len() < MAX_BATCH {
                    match link_rx.next().now_or_never() {
                        Some(Ok(n)) => collect(n, &mut link_rx, &mut batch).await?,
                        Some(Err(e)) => anyhow::bail!("the broker link failed: {e:?}"),
                        None => break,
                    }
                }
                if !batch.is_empty() {
                    let out = tokio::task::block_in_place(|| registry.handle_batch(&batch, now_ms()));
                    batch.clear();
                    publish(&mut link_tx, out, &metrics);
                }
            }
            Some(request) = requests.recv() => match request {
                Request::Approve { machine, reply } => {
                    let result = tokio::task::block_in_place(|| registry.approve(&machine, now_ms()));
                    let answer = result.map(|(approval, out)| {
                        publish(&mut link_tx, out, &metrics);
                        approval
                    });
                    let _ = reply.send(answer);
                }
            },
            _ = sweep.tick() => {
                match tokio::task::block_in_place(|| registry.sweep_offline(now_ms())) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(machines = n, "marked machines offline after missed heartbeats"),
                    Err(e) => tracing::error!(error = %e, "could not mark silent machines offline"),
                }
            }
        }
    }
    tracing::info!("orchestrator stopped");
    Ok(())
}

/// Adds a forwarded publish to the batch, or reschedules the link after `Unschedule`.
async fn collect(
    notification: Option<Notification>,
    link_rx: &mut LinkRx,
    batch: &mut Vec<(Vec<u8>, Vec<u8>)>,
) -> anyhow::Result<()> {
    match notification {
        Some(Notification::Forward(forward)) => {
            batch.push((
                forward.publish.topic.to_vec(),
                forward.publish.payload.to_vec(),
            ));
        }
        Some(Notification::Unschedule) => link_rx
            .wake()
            .await
            .map_err(|e| anyhow::anyhow!("rescheduling the broker link: {e:?}"))?,
        _ => {}
    }
    Ok(())
}

fn publish(link_tx: &mut LinkTx, out: Vec<Outgoing>, metrics: &Metrics) {
    for Outgoing { topic, payload } in out {
        // `publish` may block briefly on the router's bounded channel; we are inside a
        // multi-threaded runtime, so say so rather than stall a worker unannounced.
        match tokio::task::block_in_place(|| {
            link_tx
                .publish(topic.to_string(), payload)
                .map_err(Box::new)
        }) {
            Ok(_) => {
                metrics.command_published();
                tracing::debug!(%topic, "published command");
            }
            Err(e) => {
                metrics.command_failed();
                tracing::error!(%topic, error = ?e, "could not hand a command to the broker; the machine gets it at its next heartbeat");
            }
        }
    }
}

/// Wall-clock Unix milliseconds: envelopes carry wall-clock time.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
