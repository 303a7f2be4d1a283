//! This machine's tracker passkey, and who may fetch images from this machine.
//!
//! The server hands the passkey out over HTTP to whoever proves it holds the machine's key
//! (never over MQTT, which on a broker without topic rules other logins could read); the torrents it
//! serves this machine announce with it. The same passkey lets the agent ask the tracker
//! whether a peer that dialled it is in the swarm, so that a host that merely knows an info
//! hash gets nothing from this machine either.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boottorrent_bt::InfoHash;
use boottorrent_proto::{MachineId, SigningKey, passkey_request};
use boottorrent_swarm::session::Admission;

/// How long the tracker's answer about one peer is kept.
const ADMISSION_TTL: Duration = Duration::from_secs(60);
/// How long the tracker may take to answer before the peer is let in anyway.
const ADMISSION_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Passkey {
    machine: MachineId,
    key: SigningKey,
    http: reqwest::Client,
    http_url: String,
    cached: tokio::sync::Mutex<Option<String>>,
    /// The tracker's recent answers: (torrent, peer address) → admitted, and when asked.
    admitted: Mutex<HashMap<(InfoHash, IpAddr), (bool, Instant)>>,
}

impl Passkey {
    pub fn new(machine: MachineId, key: SigningKey, http_url: &str) -> Arc<Passkey> {
        Arc::new(Passkey {
            machine,
            key,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
            http_url: http_url.trim_end_matches('/').to_owned(),
            cached: tokio::sync::Mutex::new(None),
            admitted: Mutex::new(HashMap::new()),
        })
    }

    pub fn machine(&self) -> &MachineId {
        &self.machine
    }

    /// The passkey, asked of the server when not known yet or when `fresh` is wanted.
    pub async fn get(&self, fresh: bool) -> Result<String, String> {
        let mut cached = self.cached.lock().await;
        if let Some(passkey) = cached.as_ref().filter(|_| !fresh) {
            return Ok(passkey.clone());
        }
        let url = format!("{}/api/v1/machines/{}/passkey", self.http_url, self.machine);
        let proof = passkey_request(&self.machine, &self.key, boottorrent_proto::now_ms());
        let failed = |e: &dyn std::fmt::Display| {
            format!(
                "asking {url} for this machine's tracker passkey: {e} (an unapproved machine gets \
                 none; approve it with `boottorrent machines approve`)"
            )
        };
        let response = self
            .http
            .post(&url)
            .body(proof)
            .send()
            .await
            .map_err(|e| failed(&e))?;
        let answer: boottorrent_proto::PasskeyAnswer = response
            .error_for_status()
            .map_err(|e| failed(&e))?
            .json()
            .await
            .map_err(|e| failed(&e))?;
        *cached = Some(answer.passkey.clone());
        Ok(answer.passkey)
    }

    /// Admission for the swarm engine: a peer that dialled us is served if the tracker has it
    /// in the torrent's swarm. When the tracker cannot be asked (the server is down or slow),
    /// the peer is let in: the machines of a lab must keep feeding each other through a
    /// server restart, and a refusal the tracker did not give would stop them.
    pub fn admission(self: &Arc<Self>) -> Admission {
        let passkey = self.clone();
        Admission(Arc::new(move |info_hash, ip| {
            let passkey = passkey.clone();
            Box::pin(async move { passkey.admits(info_hash, ip).await })
        }))
    }

    async fn admits(&self, info_hash: InfoHash, ip: IpAddr) -> bool {
        let now = Instant::now();
        {
            let mut admitted = self.admitted.lock().unwrap_or_else(|e| e.into_inner());
            admitted.retain(|_, (_, at)| now.duration_since(*at) < ADMISSION_TTL);
            if let Some((answer, _)) = admitted.get(&(info_hash, ip)) {
                return *answer;
            }
        }
        match tokio::time::timeout(ADMISSION_TIMEOUT, self.ask(info_hash, ip)).await {
            Ok(Ok(answer)) => {
                if !answer {
                    tracing::info!(peer = %ip, "refused a peer the tracker does not have in the swarm");
                }
                self.admitted
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((info_hash, ip), (answer, now));
                answer
            }
            Ok(Err(e)) => {
                tracing::debug!(peer = %ip, "could not ask the tracker about a peer, letting it in: {e}");
                true
            }
            Err(_) => {
                tracing::debug!(peer = %ip, "the tracker did not answer about a peer in time, letting it in");
                true
            }
        }
    }

    async fn ask(&self, info_hash: InfoHash, ip: IpAddr) -> Result<bool, String> {
        let passkey = self.get(false).await?;
        let url = format!(
            "{}/admitted/{}/{passkey}?info_hash={}&ip={ip}",
            self.http_url,
            self.machine,
            hex::encode(info_hash.0)
        );
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if response.status() == reqwest::StatusCode::FORBIDDEN {
            // Our passkey is stale (the server's key changed): fetch it again next time.
            *self.cached.lock().await = None;
            return Err("the tracker refused this machine's passkey".into());
        }
        let answer: boottorrent_proto::Admission = response
            .error_for_status()
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        Ok(answer.admitted)
    }
}
