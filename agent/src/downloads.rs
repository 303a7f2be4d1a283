//! The images this machine holds: assignments from the server, downloaded and seeded with our
//! swarm engine, persisted so that a restart or a power cut resumes from what is on disk.
//!
//! One task per assignment follows its torrent's stats and turns them into `progress` events
//! (every `PROGRESS_EVERY`), then, once every piece is in, checks the whole file's SHA-256
//! (`verifying`), reports it staged and runs the boot backend when the assignment's action
//! asks for it. The assignments live in
//! `<data>/assignments.json`, rewritten atomically on every change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boottorrent_bt::InfoHash;
use boottorrent_bt::metainfo::Metainfo;
use boottorrent_proto::{
    AfterDownload, ArtifactAssignment, ArtifactUnassignment, BootReport, ErrorReport, Event,
    HeldImage, ImageId, ImageState, Progress,
};
use boottorrent_swarm::session::{AddTorrent, Mode, Session, TorrentHandle, TorrentState};
use tokio::sync::mpsc;

use crate::boot::{self, Backend, BootRequest};
use crate::passkey::Passkey;

/// How often a download reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(1500);

/// One assignment and where it stands.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Held {
    assignment: ArtifactAssignment,
    path: PathBuf,
    state: ImageState,
    /// The boot action already ran; a restart must not reboot the machine again.
    booted: bool,
}

/// The agent's downloads.
pub struct Downloads {
    session: Session,
    data_dir: PathBuf,
    http_url: String,
    http: reqwest::Client,
    passkey: Arc<Passkey>,
    boot: Backend,
    /// Bytes kept free on the data disk beyond an image.
    disk_reserve: u64,
    events: mpsc::Sender<Event>,
    held: Mutex<HashMap<ImageId, Held>>,
    handles: Mutex<HashMap<ImageId, TorrentHandle>>,
    /// Assignments whose torrent is being fetched and which are not in `held` yet: the server
    /// may repeat an assignment (a broadcast and a reconciliation crossing), and a second
    /// download of the same torrent would fail the first.
    starting: Mutex<std::collections::HashSet<ImageId>>,
}

impl Downloads {
    /// Loads what the last run held and starts those torrents again (resuming from disk).
    pub fn start(
        session: Session,
        data_dir: PathBuf,
        http_url: String,
        passkey: Arc<Passkey>,
        boot: Backend,
        disk_reserve: u64,
        events: mpsc::Sender<Event>,
    ) -> Arc<Downloads> {
        let downloads = Arc::new(Downloads {
            session,
            http_url: http_url.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
            passkey,
            boot,
            disk_reserve,
            events,
            held: Mutex::new(load(&data_dir)),
            handles: Mutex::new(HashMap::new()),
            starting: Mutex::new(std::collections::HashSet::new()),
            data_dir,
        });
        tokio::spawn(downloads.clone().introduce());
        let resumed: Vec<Held> = downloads.lock_held().values().cloned().collect();
        for held in resumed {
            let d = downloads.clone();
            tokio::spawn(async move { d.fetch(held.assignment).await });
        }
        downloads
    }

    /// Asks for this machine's passkey once at start, retrying until the machine is approved:
    /// besides the passkey, that request (signed by the machine key) is where the server sees
    /// the machine's address, which subnet zones go by.
    async fn introduce(self: Arc<Self>) {
        let mut wait = Duration::from_secs(2);
        loop {
            match self.passkey.get(true).await {
                Ok(_) => return,
                Err(e) => tracing::debug!("{e}; asking again in {} s", wait.as_secs()),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(60));
        }
    }

    /// What this machine holds, for `startup` and `heartbeat`.
    pub fn held(&self) -> Vec<HeldImage> {
        let handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        self.lock_held()
            .values()
            .map(|h| {
                let done = handles
                    .get(&h.assignment.image)
                    .map_or(0, |t| t.stats().borrow().bytes_done);
                HeldImage {
                    image: h.assignment.image.clone(),
                    info_hash: h.assignment.info_hash,
                    state: h.state,
                    bytes_done: if h.state == ImageState::Downloading {
                        done
                    } else {
                        h.assignment.size
                    },
                    bytes_total: h.assignment.size,
                }
            })
            .collect()
    }

    /// Handles `artifact_assignment`; the same assignment twice does the work once. An image
    /// that failed is tried again.
    pub async fn assign(self: &Arc<Self>, assignment: ArtifactAssignment) {
        {
            let held = self.lock_held();
            if let Some(h) = held.get(&assignment.image)
                && h.assignment.info_hash == assignment.info_hash
                && h.state != ImageState::Failed
            {
                tracing::info!(image = %assignment.image, "already assigned; nothing to do");
                return;
            }
            let mut starting = self.starting.lock().unwrap_or_else(|e| e.into_inner());
            if !starting.insert(assignment.image.clone()) {
                tracing::info!(image = %assignment.image, "already being started; nothing to do");
                return;
            }
        }
        let d = self.clone();
        tokio::spawn(async move { d.fetch(assignment).await });
    }

    /// Handles `artifact_unassignment`: stops the torrent and deletes the image.
    pub async fn unassign(&self, unassignment: ArtifactUnassignment) {
        let held = self.lock_held().remove(&unassignment.image);
        self.persist();
        let handle = self
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&unassignment.image);
        if let Some(handle) = handle {
            let _ = self.session.remove(handle.info_hash(), true).await;
        } else if let Some(h) = held {
            let _ = tokio::fs::remove_file(&h.path).await;
        }
        tracing::info!(image = %unassignment.image, "image unassigned and deleted");
    }

    /// Handles the `boot` command: boots a staged image with the boot backend, once and now
    /// (the `reboot` action). An image this machine does not hold staged is an `error` event.
    pub async fn boot(&self, command: boottorrent_proto::BootCommand) {
        let held = self.lock_held().get(&command.image).cloned();
        let Some(held) = held.filter(|h| h.state == ImageState::Staged) else {
            self.send(Event::Error(ErrorReport {
                code: "image_not_staged".into(),
                message: format!(
                    "cannot boot image {}: this machine does not hold it staged",
                    command.image
                ),
                deployment: command.deployment,
            }))
            .await;
            return;
        };
        let outcome = boot::run(
            &self.boot,
            &BootRequest {
                image_path: held.path.clone(),
                image_id: command.image.to_string(),
                image_name: held.assignment.name.clone(),
                deployment_id: command
                    .deployment
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                action: AfterDownload::Reboot,
            },
        )
        .await;
        self.report_boot(command.deployment, command.image, outcome)
            .await;
    }

    /// Sends the `boot` event of a backend run, and an `error` event when it failed.
    async fn report_boot(
        &self,
        deployment: Option<boottorrent_proto::DeploymentId>,
        image: ImageId,
        outcome: boot::BootOutcome,
    ) {
        if !outcome.ok {
            self.send(Event::Error(ErrorReport {
                code: "boot_failed".into(),
                message: outcome.message.clone(),
                deployment: deployment.clone(),
            }))
            .await;
        }
        self.send(Event::Boot(BootReport {
            deployment,
            image: Some(image),
            ok: outcome.ok,
            message: outcome.message,
        }))
        .await;
    }

    async fn fetch(self: Arc<Self>, assignment: ArtifactAssignment) {
        let image = assignment.image.clone();
        let deployment = assignment.deployment.clone();
        let result = self.try_fetch(assignment).await;
        self.started(&image);
        if let Err(e) = result {
            tracing::error!(image = %image, "{e}");
            if let Some(h) = self.lock_held().get_mut(&image) {
                h.state = ImageState::Failed;
            }
            self.persist();
            self.send(Event::Error(ErrorReport {
                code: e.code.into(),
                message: e.message,
                deployment: Some(deployment),
            }))
            .await;
        }
    }

    async fn try_fetch(self: &Arc<Self>, assignment: ArtifactAssignment) -> Result<(), Failure> {
        let torrent = self.torrent_for(&assignment).await?;
        let path = self.image_path(&assignment, &torrent);
        let already = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let free = crate::inventory::free_disk_bytes(&self.data_dir).ok();
        let needed = assignment.size.saturating_sub(already) + self.disk_reserve;
        if let Some(free) = free
            && free < needed
        {
            return Err(Failure::new(
                "disk_full",
                format!(
                    "not enough disk for image {} in {}: {} bytes free, {} needed",
                    assignment.image,
                    self.data_dir.display(),
                    free,
                    needed
                ),
            ));
        }
        let (booted, staged) = self
            .lock_held()
            .get(&assignment.image)
            .filter(|h| h.assignment.info_hash == assignment.info_hash)
            .map_or((false, false), |h| {
                (h.booted, h.state == ImageState::Staged)
            });
        self.lock_held().insert(
            assignment.image.clone(),
            Held {
                assignment: assignment.clone(),
                path: path.clone(),
                state: ImageState::Downloading,
                booted,
            },
        );
        self.persist();
        // A retry after a failure: the failed torrent is still in the session. The file stays;
        // the new torrent checks what of it is good.
        let previous = self
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&assignment.image);
        if let Some(previous) = previous {
            let _ = self.session.remove(previous.info_hash(), false).await;
        }
        let handle = self
            .session
            .add(AddTorrent {
                metainfo: torrent,
                path: path.clone(),
                mode: Mode::Download,
                peers: Vec::new(),
                use_tracker: true,
            })
            .map_err(|e| Failure::new("swarm", format!("starting the download: {e}")))?;
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(assignment.image.clone(), handle.clone());
        self.started(&assignment.image);
        self.follow(assignment, handle, path, staged).await
    }

    /// Reports progress until the download completes, then stages and boots.
    async fn follow(
        &self,
        assignment: ArtifactAssignment,
        handle: TorrentHandle,
        path: PathBuf,
        already_verified: bool,
    ) -> Result<(), Failure> {
        let mut stats = handle.stats();
        let mut every = tokio::time::interval(PROGRESS_EVERY);
        let mut bans_reported = 0;
        loop {
            // Progress goes out on the tick; the end of the download is acted on at once (a
            // lab waits for its last machine, and the tick alone would add up to its period).
            tokio::select! {
                _ = every.tick() => {}
                changed = stats.changed() => {
                    if changed.is_err() {
                        return Ok(()); // the torrent was removed: unassigned meanwhile
                    }
                    let done = matches!(
                        stats.borrow().state,
                        TorrentState::Seeding | TorrentState::Error(_)
                    );
                    if !done {
                        continue;
                    }
                }
            }
            let s = stats.borrow_and_update().clone();
            // The operator should learn which machine serves bad data: its disk or memory is
            // failing, or its image was tampered with. Not tied to the deployment, which goes
            // on with the other peers.
            for peer in s.banned_peers.iter().skip(bans_reported) {
                self.send(Event::Error(ErrorReport {
                    code: "corrupt_peer".into(),
                    message: format!(
                        "peer {} sent pieces of image {} that failed their hash check; it is banned",
                        peer.ip(),
                        assignment.image
                    ),
                    deployment: None,
                }))
                .await;
            }
            bans_reported = s.banned_peers.len();
            match &s.state {
                TorrentState::Error(e) => {
                    return Err(Failure::new("download", e.clone()));
                }
                // Every piece is in; `staged` is reported once the whole file is verified.
                TorrentState::Seeding => break,
                // Re-reading what a resumed download already has: until that is done the
                // verified byte count is not known, and reporting it as 0 would look like the
                // download started over.
                TorrentState::Checking { .. } => continue,
                _ => {}
            }
            self.send(Event::Progress(Progress {
                deployment: assignment.deployment.clone(),
                image: assignment.image.clone(),
                bytes_done: s.bytes_done,
                bytes_total: s.bytes_total,
                download_bps: s.download_rate,
                upload_bps: s.upload_rate,
                peers: s.peers.len() as u32,
                state: ImageState::Downloading,
            }))
            .await;
            if !self.lock_held().contains_key(&assignment.image) {
                return Ok(()); // unassigned meanwhile
            }
        }
        // Pieces were checked one by one (SHA-1); the whole file is checked against the
        // image's SHA-256 too, so the boot step only ever sees the exact golden image. A
        // restart does not re-read an image verified before: the swarm's resume check already
        // re-hashes a file that changed.
        if !already_verified {
            self.verify(&assignment, &path).await?;
        }
        let run_boot = {
            let mut held = self.lock_held();
            let Some(h) = held.get_mut(&assignment.image) else {
                return Ok(());
            };
            h.state = ImageState::Staged;
            let run = !h.booted && assignment.action != AfterDownload::Stage;
            h.booted = true;
            run
        };
        self.persist();
        tracing::info!(image = %assignment.image, "image staged; seeding it to peers");
        let s = stats.borrow().clone();
        self.send(Event::Progress(Progress {
            deployment: assignment.deployment.clone(),
            image: assignment.image.clone(),
            bytes_done: assignment.size,
            bytes_total: assignment.size,
            download_bps: 0,
            upload_bps: s.upload_rate,
            peers: s.peers.len() as u32,
            state: ImageState::Staged,
        }))
        .await;
        if run_boot {
            let outcome = boot::run(
                &self.boot,
                &BootRequest {
                    image_path: path,
                    image_id: assignment.image.to_string(),
                    image_name: assignment.name.clone(),
                    deployment_id: assignment.deployment.to_string(),
                    action: assignment.action,
                },
            )
            .await;
            self.report_boot(Some(assignment.deployment), assignment.image, outcome)
                .await;
        }
        Ok(())
    }

    /// Reports `verifying` and compares the file's SHA-256 with the assignment's.
    async fn verify(&self, assignment: &ArtifactAssignment, path: &Path) -> Result<(), Failure> {
        self.send(Event::Progress(Progress {
            deployment: assignment.deployment.clone(),
            image: assignment.image.clone(),
            bytes_done: assignment.size,
            bytes_total: assignment.size,
            download_bps: 0,
            upload_bps: 0,
            peers: 0,
            state: ImageState::Verifying,
        }))
        .await;
        let file = path.to_owned();
        let digest = tokio::task::spawn_blocking(move || sha256_of(&file))
            .await
            .map_err(|e| Failure::new("verify", format!("hashing {}: {e}", path.display())))?
            .map_err(|e| Failure::new("verify", format!("hashing {}: {e}", path.display())))?;
        if digest != assignment.sha256.0 {
            return Err(Failure::new(
                "sha256_mismatch",
                format!(
                    "{} has SHA-256 {} but image {} should have {}",
                    path.display(),
                    hex::encode(digest),
                    assignment.image,
                    hex::encode(assignment.sha256.0)
                ),
            ));
        }
        Ok(())
    }

    /// Fetches the `.torrent` named by the assignment and checks it is the one announced.
    async fn torrent_for(&self, a: &ArtifactAssignment) -> Result<Metainfo, Failure> {
        let url = if a.torrent_url.starts_with("http://") || a.torrent_url.starts_with("https://") {
            a.torrent_url.clone()
        } else {
            format!(
                "{}/{}",
                self.http_url,
                a.torrent_url.trim_start_matches('/')
            )
        };
        // A passkey the server no longer takes (its key changed, say) is fetched once more.
        let mut bytes = None;
        for fresh in [false, true] {
            let passkey = self
                .passkey
                .get(fresh)
                .await
                .map_err(|e| Failure::new("passkey", e))?;
            let response = self
                .http
                .get(&url)
                .header(
                    reqwest::header::AUTHORIZATION,
                    format!("Passkey {}:{passkey}", self.passkey.machine()),
                )
                .send()
                .await
                .map_err(|e| {
                    Failure::new("torrent_fetch", format!("fetching the torrent {url}: {e}"))
                })?;
            let status = response.status();
            if status == reqwest::StatusCode::UNAUTHORIZED && !fresh {
                continue;
            }
            let body = response.error_for_status().map_err(|e| {
                Failure::new("torrent_fetch", format!("fetching the torrent {url}: {e}"))
            })?;
            bytes = Some(body.bytes().await.map_err(|e| {
                Failure::new("torrent_fetch", format!("fetching the torrent {url}: {e}"))
            })?);
            break;
        }
        let bytes = bytes.ok_or_else(|| {
            Failure::new(
                "torrent_fetch",
                format!("fetching the torrent {url}: the server refused this machine's passkey"),
            )
        })?;
        let meta = Metainfo::from_bytes(&bytes)
            .map_err(|e| Failure::new("torrent_invalid", format!("torrent from {url}: {e}")))?;
        if meta.info_hash != InfoHash(a.info_hash.0) {
            return Err(Failure::new(
                "torrent_mismatch",
                format!(
                    "torrent from {url} has info hash {}, the assignment says {}",
                    meta.info_hash,
                    hex::encode(a.info_hash.0)
                ),
            ));
        }
        Ok(meta)
    }

    /// Where the image goes: under `<data>/images`, named by the file name of the assignment's
    /// save path when that is a safe single name, else by the torrent's name. Only the name is
    /// taken, so a command can never make the agent write outside its data dir.
    fn image_path(&self, a: &ArtifactAssignment, meta: &Metainfo) -> PathBuf {
        let images = self.data_dir.join("images");
        let name = Path::new(&a.save_path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| boottorrent_bt::metainfo::check_file_name(n).is_ok())
            .unwrap_or_else(|| meta.name.clone());
        images.join(name)
    }

    /// The assignment is in `held` (or failed): repeats are recognised there from now on.
    fn started(&self, image: &ImageId) {
        self.starting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(image);
    }

    async fn send(&self, event: Event) {
        if self.events.send(event).await.is_err() {
            tracing::debug!("the MQTT link is gone; event dropped");
        }
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashMap<ImageId, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the assignments atomically, so a power cut leaves the old or the new list.
    fn persist(&self) {
        let list: Vec<Held> = self.lock_held().values().cloned().collect();
        let path = self.data_dir.join("assignments.json");
        let tmp = self.data_dir.join("assignments.json.tmp");
        let result = serde_json::to_vec_pretty(&list)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)
            });
        if let Err(e) = result {
            tracing::error!(
                "saving {}: {e}; a restart may forget an assignment",
                path.display()
            );
        }
    }
}

fn load(data_dir: &Path) -> HashMap<ImageId, Held> {
    let path = data_dir.join("assignments.json");
    let list: Vec<Held> = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(list) => list,
            Err(e) => {
                tracing::error!(
                    "{} is corrupt ({e}); starting with no assignments",
                    path.display()
                );
                Vec::new()
            }
        },
        Err(_) => Vec::new(),
    };
    list.into_iter()
        .map(|h| (h.assignment.image.clone(), h))
        .collect()
}

/// SHA-256 of a whole file, read in large chunks.
fn sha256_of(path: &Path) -> std::io::Result<[u8; 32]> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

/// A failed download, as an `error` event's code and message.
#[derive(Debug)]
struct Failure {
    code: &'static str,
    message: String,
}

impl Failure {
    fn new(code: &'static str, message: String) -> Failure {
        Failure { code, message }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}
