//! The images this machine holds: assignments from the server, downloaded and seeded with our
//! swarm engine, persisted so that a restart or a power cut resumes from what is on disk.
//!
//! Tasks, all in the agent's task tree: one per assignment (`download <image>`) follows its
//! torrent's stats and turns them into `progress` events (every `PROGRESS_EVERY`), then, once
//! every piece is in, checks the whole file's SHA-256 (`verifying`, on the blocking pool),
//! reports it staged and runs the boot backend when the assignment's action asks for it; one
//! (`introduce`) asks for the machine's passkey until it is approved.
//!
//! Each download has its own token, a child of the agent's: an unassignment, or a newer
//! download of the same image, stops that download alone, and the agent's stop stops them
//! all. A stopped download reports nothing and changes no state, so a restart resumes it from
//! what is on disk; the SHA-256 check looks at its cancel flag between chunks, so a stop never
//! waits for a multi-GiB hash. The boot backend, once started, runs to its end (it has its own
//! time limits): a half-run `bcdedit` sequence is worse than a late stop.
//!
//! The assignments live in `<data>/assignments.json`, rewritten atomically on every change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boottorrent_bt::InfoHash;
use boottorrent_bt::metainfo::Metainfo;
use boottorrent_proto::{
    AfterDownload, ArtifactAssignment, ArtifactUnassignment, BootReport, ErrorReport, Event,
    HeldImage, ImageId, ImageState, Persistence, Progress,
};
use boottorrent_swarm::session::{AddTorrent, Mode, Session, TorrentHandle, TorrentState};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::boot::{self, Backend, BootRequest};
use crate::child;
use crate::golden;
use crate::passkey::Passkey;
use crate::running::{self, Running};
use crate::tasks::Tasks;

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
    tasks: Tasks,
    /// Cancelled when the agent stops; the parent of every download's token.
    shutdown: CancellationToken,
    /// The token of each running download, with its spawn number: a download that ends
    /// removes its own entry, not that of a newer download of the same image.
    downloading: Mutex<HashMap<ImageId, (u64, CancellationToken)>>,
    next_download: AtomicU64,
    /// What the machine runs, found at start; it changes only with a restart.
    running: Option<Running>,
}

impl Downloads {
    /// Loads what the last run held and starts those torrents again (resuming from disk), as
    /// tasks of `tasks`.
    #[allow(clippy::too_many_arguments)] // one call site, in `main`
    pub fn start(
        session: Session,
        data_dir: PathBuf,
        http_url: String,
        passkey: Arc<Passkey>,
        boot: Backend,
        disk_reserve: u64,
        events: mpsc::Sender<Event>,
        running: Option<Running>,
        tasks: &Tasks,
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
            tasks: tasks.clone(),
            shutdown: tasks.token(),
            downloading: Mutex::new(HashMap::new()),
            next_download: AtomicU64::new(0),
            running,
        });
        tasks.spawn("introduce", {
            let d = downloads.clone();
            async move {
                d.introduce().await;
                Ok(())
            }
        });
        tasks.spawn("next boot", {
            let d = downloads.clone();
            async move {
                d.prepare_next_boot().await;
                Ok(())
            }
        });
        let resumed: Vec<Held> = downloads.lock_held().values().cloned().collect();
        for held in resumed {
            downloads.spawn_fetch(held.assignment);
        }
        downloads
    }

    /// Starts the download of `assignment` as a task with its own token, stopping an older
    /// download of the same image.
    fn spawn_fetch(self: &Arc<Self>, assignment: ArtifactAssignment) {
        let token = self.shutdown.child_token();
        let number = self.next_download.fetch_add(1, Ordering::Relaxed);
        let older = self
            .lock_downloading()
            .insert(assignment.image.clone(), (number, token.clone()));
        if let Some((_, older)) = older {
            older.cancel();
        }
        let d = self.clone();
        self.tasks
            .spawn(format!("download {}", assignment.image), async move {
                let image = assignment.image.clone();
                d.fetch(assignment, &token).await;
                let mut downloading = d.lock_downloading();
                if downloading.get(&image).is_some_and(|(n, _)| *n == number) {
                    downloading.remove(&image);
                }
                Ok(())
            });
    }

    fn lock_downloading(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ImageId, (u64, CancellationToken)>> {
        self.downloading.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for this machine's passkey once at start, retrying until the machine is approved:
    /// besides the passkey, that request (signed by the machine key) is where the server sees
    /// the machine's address, which subnet zones go by.
    async fn introduce(&self) {
        let mut wait = Duration::from_secs(2);
        loop {
            let asked = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                asked = self.passkey.get(true) => asked,
            };
            match asked {
                Ok(_) => return,
                Err(e) => tracing::debug!("{e}; asking again in {} s", wait.as_secs()),
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
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
    /// that failed is tried again. An image held for an earlier deployment serves the new one
    /// at once: the swarm re-checks the file (from its resume record when that still matches)
    /// and the new deployment's action runs, without downloading anything again.
    pub async fn assign(self: &Arc<Self>, assignment: ArtifactAssignment) {
        {
            let held = self.lock_held();
            if let Some(h) = held.get(&assignment.image)
                && h.assignment.info_hash == assignment.info_hash
                && h.assignment.deployment == assignment.deployment
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
        self.spawn_fetch(assignment);
    }

    /// Handles `artifact_unassignment`: stops the download and the torrent, deletes the image.
    pub async fn unassign(&self, unassignment: ArtifactUnassignment) {
        if let Some((_, token)) = self.lock_downloading().remove(&unassignment.image) {
            token.cancel();
        }
        for entry in child::entries(&unassignment.image) {
            boot::forget(&self.boot, &entry).await;
        }
        child::remove(&self.data_dir, &unassignment.image);
        let held = self.lock_held().remove(&unassignment.image);
        self.persist();
        let handle = self
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&unassignment.image);
        // Windows refuses to delete a read-only file.
        if let Some(h) = &held
            && let Err(e) = golden::unseal(&h.path)
        {
            tracing::warn!(image = %unassignment.image, path = %h.path.display(), "making the image writable to delete it: {e}");
        }
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
        let bootable = match self.bootable(&command.image, &held.path, held.assignment.persistence)
        {
            Ok(bootable) => bootable,
            Err(outcome) => {
                self.report_boot(command.deployment, command.image, outcome)
                    .await;
                return;
            }
        };
        if let Some(deployment) = &command.deployment {
            self.record_boot(&command.image, deployment, &bootable.path);
        }
        let outcome = boot::run(
            &self.boot,
            &BootRequest {
                image_path: bootable.path,
                parent_path: bootable.parent,
                entry: bootable.entry,
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

    /// For a `reset` image the machine runs: makes the fresh child its next boot starts from
    /// and points the boot entry at it (see [`child`]), once per boot. A failure is an `error`
    /// event: the next boot would then start from the child that runs now, with its writes.
    async fn prepare_next_boot(&self) {
        let Some(running) = &self.running else {
            return;
        };
        let image = &running.image.image;
        let Some(held) = self.lock_held().get(image).cloned() else {
            return;
        };
        if held.assignment.persistence != Persistence::Reset || matches!(self.boot, Backend::None) {
            return;
        }
        let failed = |message: String| {
            tracing::error!(%image, "{message}");
            Event::Error(ErrorReport {
                code: "reset_failed".into(),
                message,
                deployment: None,
            })
        };
        let Some(path) = &running.path else {
            let message = format!(
                "image {image} is deployed with persistence reset, but this agent cannot tell \
                 which of its boot children runs, so the next boot keeps this one's changes; \
                 the boot program should write $BOOTTORRENT_IMAGE_PATH as the second line of \
                 running_image_file"
            );
            self.send(failed(message)).await;
            return;
        };
        let next = child::next_slot(&self.data_dir, image, Some(path));
        if next.exists() && running::newest_path(&self.data_dir, image).as_ref() == Some(&next) {
            tracing::info!(%image, next = %next.display(), "the next boot's fresh child was made earlier in this boot");
            return;
        }
        let bootable = match self.bootable(image, &held.path, Persistence::Reset) {
            Ok(bootable) => bootable,
            Err(outcome) => {
                self.send(failed(outcome.message)).await;
                return;
            }
        };
        let deployment = running
            .image
            .deployment
            .clone()
            .unwrap_or_else(|| held.assignment.deployment.clone());
        self.record_boot(image, &deployment, &bootable.path);
        let outcome = boot::run(
            &self.boot,
            &BootRequest {
                image_path: bootable.path.clone(),
                parent_path: bootable.parent,
                entry: bootable.entry,
                image_id: image.to_string(),
                image_name: held.assignment.name.clone(),
                deployment_id: deployment.to_string(),
                action: AfterDownload::SetBoot,
            },
        )
        .await;
        if outcome.ok {
            tracing::info!(%image, next = %bootable.path.display(), "the next boot starts from a fresh child (persistence reset)");
        } else {
            let message = format!(
                "pointing the boot entry of image {image} at its fresh child {}: {}",
                bootable.path.display(),
                outcome.message
            );
            self.send(failed(message)).await;
        }
    }

    /// What to boot for the staged image at `golden`: its differencing child, made (and room
    /// for it checked) now; a failure is the boot's outcome, before any boot entry changes.
    fn bootable(
        &self,
        image: &ImageId,
        golden: &Path,
        persistence: Persistence,
    ) -> Result<child::Bootable, boot::BootOutcome> {
        let boot_steps = !matches!(self.boot, Backend::None);
        if !boot_steps {
            return Ok(child::Bootable {
                path: golden.to_owned(),
                parent: None,
                entry: image.to_string(),
            });
        }
        // The child this machine runs from now, which a `reset` image must not replace.
        let running = self
            .running
            .as_ref()
            .filter(|r| r.image.image == *image)
            .and_then(|r| r.path.as_deref());
        child::prepare(
            &self.data_dir,
            image,
            golden,
            persistence,
            running,
            self.disk_reserve,
            crate::inventory::free_disk_bytes,
        )
        .map_err(|e| boot::BootOutcome {
            ok: false,
            message: e.to_string(),
        })
    }

    /// Records in the store what is about to be booted, so that the agent starting inside it
    /// can name the deployment ([`running`]). A record that cannot be written is logged, not
    /// fatal: the boot still happens, and the server learns of it by the image.
    fn record_boot(
        &self,
        image: &ImageId,
        deployment: &boottorrent_proto::DeploymentId,
        path: &Path,
    ) {
        match running::record(&self.data_dir, image, deployment, path) {
            Ok(()) => {
                tracing::info!(%image, %deployment, path = %path.display(), "recorded the boot in the store")
            }
            Err(e) => {
                tracing::warn!(%image, %deployment, "{e:#}; the agent in the booted system will not know the deployment")
            }
        }
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

    /// Runs one download to its end, reporting a failure; a download stopped by `token`
    /// reports nothing and leaves its state as it is, for the next run to resume.
    async fn fetch(self: &Arc<Self>, assignment: ArtifactAssignment, token: &CancellationToken) {
        let image = assignment.image.clone();
        let deployment = assignment.deployment.clone();
        let result = self.try_fetch(assignment, token).await;
        self.started(&image);
        let e = match result {
            Ok(()) => return,
            Err(Stop::Cancelled) => {
                tracing::info!(image = %image, "download stopped");
                return;
            }
            Err(Stop::Failed(e)) => e,
        };
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

    async fn try_fetch(
        self: &Arc<Self>,
        assignment: ArtifactAssignment,
        token: &CancellationToken,
    ) -> Result<(), Stop> {
        let torrent = tokio::select! {
            _ = token.cancelled() => return Err(Stop::Cancelled),
            torrent = self.torrent_for(&assignment) => torrent?,
        };
        let path = self.image_path(&assignment, &torrent);
        let already = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let free = crate::inventory::free_disk_bytes(&self.data_dir).ok();
        let needed = assignment.size.saturating_sub(already) + self.disk_reserve;
        if let Some(free) = free
            && free < needed
        {
            return Err(Stop::Failed(Failure::new(
                "disk_full",
                format!(
                    "not enough disk for image {} in {}: {} bytes free, {} needed",
                    assignment.image,
                    self.data_dir.display(),
                    free,
                    needed
                ),
            )));
        }
        // `booted` is per deployment: a later deployment of the same image runs its own action.
        let (booted, staged) = self
            .lock_held()
            .get(&assignment.image)
            .filter(|h| h.assignment.info_hash == assignment.info_hash)
            .map_or((false, false), |h| {
                (
                    h.booted && h.assignment.deployment == assignment.deployment,
                    h.state == ImageState::Staged,
                )
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
        // A staged image is sealed (see `golden`) and only seeded, through a read-only handle.
        // If the swarm's check finds it changed, what differs is downloaded again and the
        // whole file verified again.
        let mut staged = staged;
        loop {
            let mode = if staged {
                Mode::Seed
            } else {
                golden::unseal(&path).map_err(|e| {
                    Failure::new(
                        "swarm",
                        format!(
                            "making {} writable to download into it: {e}",
                            path.display()
                        ),
                    )
                })?;
                Mode::Download
            };
            let added = self.session.add(AddTorrent {
                metainfo: torrent.clone(),
                path: path.clone(),
                mode,
                peers: Vec::new(),
                use_tracker: true,
            });
            let handle = match added {
                Ok(handle) => handle,
                // Gone, or cut short: nothing a seed can serve, but a download can fill.
                Err(e) if staged => {
                    tracing::warn!(image = %assignment.image, "cannot seed the staged image ({e}); downloading it again");
                    staged = false;
                    continue;
                }
                Err(e) => {
                    return Err(Failure::new("swarm", format!("starting the download: {e}")).into());
                }
            };
            self.handles
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(assignment.image.clone(), handle.clone());
            self.started(&assignment.image);
            match self
                .follow(
                    assignment.clone(),
                    handle.clone(),
                    path.clone(),
                    staged,
                    token,
                )
                .await
            {
                Err(Stop::Failed(e)) if staged && e.code == "download" => {
                    tracing::warn!(
                        image = %assignment.image,
                        "the staged image no longer matches its torrent ({e}); downloading what differs"
                    );
                    self.handles
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&assignment.image);
                    let _ = self.session.remove(handle.info_hash(), false).await;
                    staged = false;
                }
                result => return result,
            }
        }
    }

    /// Reports progress until the download completes, then stages and boots.
    async fn follow(
        &self,
        assignment: ArtifactAssignment,
        handle: TorrentHandle,
        path: PathBuf,
        already_verified: bool,
        token: &CancellationToken,
    ) -> Result<(), Stop> {
        let mut stats = handle.stats();
        let mut every = tokio::time::interval(PROGRESS_EVERY);
        let mut bans_reported = 0;
        loop {
            // Progress goes out on the tick; the end of the download is acted on at once (a
            // lab waits for its last machine, and the tick alone would add up to its period).
            tokio::select! {
                _ = token.cancelled() => return Err(Stop::Cancelled),
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
                    return Err(Failure::new("download", e.clone()).into());
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
            self.verify(&assignment, &path, token).await?;
        }
        // Past this point the image is staged and the boot backend may run: a stop that came
        // meanwhile leaves both to the next start, which verifies again.
        if token.is_cancelled() {
            return Err(Stop::Cancelled);
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
        if let Err(e) = golden::seal(&path) {
            tracing::warn!(image = %assignment.image, path = %path.display(), "making the verified image read-only: {e}; it is staged all the same");
        }
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
            let bootable = match self.bootable(&assignment.image, &path, assignment.persistence) {
                Ok(bootable) => bootable,
                Err(outcome) => {
                    self.report_boot(Some(assignment.deployment), assignment.image, outcome)
                        .await;
                    return Ok(());
                }
            };
            self.record_boot(&assignment.image, &assignment.deployment, &bootable.path);
            let outcome = boot::run(
                &self.boot,
                &BootRequest {
                    image_path: bootable.path,
                    parent_path: bootable.parent,
                    entry: bootable.entry,
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
    async fn verify(
        &self,
        assignment: &ArtifactAssignment,
        path: &Path,
        token: &CancellationToken,
    ) -> Result<(), Stop> {
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
        // A blocking thread cannot wait for a token: the flag tells it to stop.
        let cancel = Arc::new(AtomicBool::new(false));
        let mut hashing = tokio::task::spawn_blocking({
            let (file, cancel) = (path.to_owned(), cancel.clone());
            move || sha256_of(&file, &cancel)
        });
        let hashed = tokio::select! {
            hashed = &mut hashing => hashed,
            _ = token.cancelled() => {
                cancel.store(true, Ordering::Relaxed);
                let _ = hashing.await;
                return Err(Stop::Cancelled);
            }
        };
        let failed = |e: &dyn std::fmt::Display| {
            Failure::new("verify", format!("hashing {}: {e}", path.display()))
        };
        let digest = match hashed {
            Ok(Ok(Some(digest))) => digest,
            Ok(Ok(None)) => return Err(Stop::Cancelled),
            Ok(Err(e)) => return Err(failed(&e).into()),
            Err(e) => return Err(failed(&e).into()),
        };
        if digest != assignment.sha256.0 {
            return Err(Stop::Failed(Failure::new(
                "sha256_mismatch",
                format!(
                    "{} has SHA-256 {} but image {} should have {}",
                    path.display(),
                    hex::encode(digest),
                    assignment.image,
                    hex::encode(assignment.sha256.0)
                ),
            )));
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

    /// Where the image goes: `<data>/images/<image id>`, with the extension of the
    /// assignment's file name (`.vhdx`, which the boot step looks at). By id, not by name:
    /// this week's `win11.vhdx` and next week's are two images, held side by side, and must
    /// never share a file. The id was checked where it entered, so no command can make the
    /// agent write outside its store. A file an older agent kept for this image under its
    /// name is moved to the new one rather than fetched again.
    fn image_path(&self, a: &ArtifactAssignment, meta: &Metainfo) -> PathBuf {
        let images = self.data_dir.join("images");
        let named = Path::new(&a.save_path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| boottorrent_bt::metainfo::check_file_name(n).is_ok())
            .unwrap_or_else(|| meta.name.clone());
        let extension = Path::new(&named)
            .extension()
            .and_then(|e| e.to_str())
            .filter(|e| {
                (1..=16).contains(&e.len()) && e.chars().all(|c| c.is_ascii_alphanumeric())
            });
        let path = match extension {
            Some(ext) => images.join(format!("{}.{ext}", a.image)),
            None => images.join(a.image.as_str()),
        };
        let old = images.join(&named);
        let kept_by_name = self
            .lock_held()
            .get(&a.image)
            .is_some_and(|h| h.path == old && old != path);
        if kept_by_name && !path.exists() && old.exists() {
            match std::fs::rename(&old, &path) {
                Ok(()) => {
                    tracing::info!(image = %a.image, from = %old.display(), to = %path.display(), "moved the image to its file by id")
                }
                Err(e) => {
                    tracing::warn!(image = %a.image, "moving {} to {}: {e}; it is fetched again", old.display(), path.display())
                }
            }
        }
        path
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
        let result = serde_json::to_vec_pretty(&list)
            .map_err(std::io::Error::other)
            .and_then(|bytes| boottorrent_swarm::storage::write_durably(&path, &bytes));
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

/// SHA-256 of a whole file, read in large chunks; `None` once `cancel` is set, which is looked
/// at before each chunk (1 MiB).
fn sha256_of(path: &Path, cancel: &AtomicBool) -> std::io::Result<Option<[u8; 32]>> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Some(hasher.finalize().into()))
}

/// Why a download ended early.
#[derive(Debug)]
enum Stop {
    /// Its token was cancelled: by the agent's stop, an unassignment or a newer download.
    Cancelled,
    Failed(Failure),
}

impl From<Failure> for Stop {
    fn from(failure: Failure) -> Stop {
        Stop::Failed(failure)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` varied bytes (several of `sha256_of`'s 1 MiB chunks).
    fn file_of(len: usize) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.vhdx");
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(&path, &bytes).unwrap();
        (dir, path, bytes)
    }

    #[test]
    fn sha256_of_a_whole_file_matches_the_one_shot_digest() {
        use sha2::Digest;
        let (_dir, path, bytes) = file_of((3 << 20) + 12_345);
        let digest = sha256_of(&path, &AtomicBool::new(false)).unwrap();
        assert_eq!(digest, Some(sha2::Sha256::digest(&bytes).into()));
    }

    #[test]
    fn sha256_of_stops_at_once_when_cancelled() {
        let (_dir, path, _) = file_of(3 << 20);
        assert_eq!(sha256_of(&path, &AtomicBool::new(true)).unwrap(), None);
    }

    #[cfg(unix)]
    #[test]
    fn sha256_of_stops_between_chunks_when_cancelled_meanwhile() {
        // A pipe that never ends: without the flag the hash would never finish.
        let (_dir, path, _) = file_of(1);
        let fifo = path.with_extension("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let writer = std::thread::spawn({
            let fifo = fifo.clone();
            move || {
                use std::io::Write;
                let mut pipe = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
                let chunk = vec![7u8; 1 << 16];
                // Ends when the reader closes the pipe.
                while pipe.write_all(&chunk).is_ok() {}
            }
        });
        let cancel = Arc::new(AtomicBool::new(false));
        let hashing = std::thread::spawn({
            let cancel = cancel.clone();
            move || sha256_of(&fifo, &cancel)
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !hashing.is_finished(),
            "an endless file was hashed to its end"
        );
        cancel.store(true, Ordering::Relaxed);
        assert_eq!(hashing.join().unwrap().unwrap(), None);
        writer.join().unwrap();
    }
}
