//! The image catalog: golden images on the server's disk, validated, hashed into private
//! torrents, stored in redb, announced to our tracker and seeded by our swarm engine.
//!
//! An import runs on the blocking pool (one sequential read: SHA-1 pieces and the file's
//! SHA-256), watched by a task of the server's tracker that sets the import's cancel flag when
//! the server shuts down; removing the image sets it too. Its progress lives in memory and the
//! record says `importing` until it is done, so a server stopped or killed mid-import restarts
//! the import on its next start. An import's outcome and a removal are written under one lock
//! (`writes`), so an image removed while it was imported stays removed.
//! The seeder super-seeds every ready image from its read-only file; its resume records (in
//! `<data>/resume`) spare a restart the re-hash of an unchanged image, and a changed or
//! vanished file shows up as an error of that image instead of being served.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use boottorrent_bt::metainfo::Metainfo;
use boottorrent_proto::{Bytes, ImageId};
use boottorrent_swarm::session::{AddTorrent, Mode, Session, TorrentHandle, TorrentState};
use boottorrent_tracker::create::{CreateError, CreateOptions, create_cancellable};
use boottorrent_tracker::swarm::Tracker;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::ImageStatus;
use crate::server::passkey::{Passkeys, SEEDER};
use crate::server::store::{ImageRecord, ImageState, Store, StoreError};
use boottorrent_vhdx as vhdx;

/// Why a catalog operation failed; the HTTP layer maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The request is wrong: missing file, not a VHDX, bad name.
    #[error("{0}")]
    Invalid(String),
    /// No such image.
    #[error("no image {0}")]
    NotFound(ImageId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An image as the API shows it: the stored record plus live import and seeding state.
#[derive(Debug, Clone, Serialize)]
pub struct ImageView {
    pub id: ImageId,
    pub name: String,
    pub path: PathBuf,
    pub raw: bool,
    pub size: u64,
    pub virtual_size: Option<u64>,
    pub logical_sector_size: Option<u32>,
    pub piece_size: u32,
    pub info_hash: Option<boottorrent_proto::InfoHash>,
    pub sha256: Option<boottorrent_proto::Sha256>,
    pub state: ImageStatus,
    pub error: Option<String>,
    pub same_as: Option<ImageId>,
    /// Import progress: bytes hashed so far.
    pub import_done: u64,
    /// URL of the `.torrent`.
    pub torrent_url: Option<String>,
    /// Bytes the seeder uploaded since the server started.
    pub uploaded: u64,
    /// Peers connected to the seeder.
    pub peers: usize,
}

/// The catalog; shared by the HTTP handlers.
pub struct Catalog {
    store: Store,
    seeder: Session,
    tracker: Arc<Tracker>,
    public_url: String,
    /// The server's data directory, resolved: nothing inside it may be catalogued.
    data_dir: PathBuf,
    /// Puts the holder's passkey into the announce URL of every torrent handed out.
    passkeys: Passkeys,
    /// The imports under way.
    imports: Mutex<HashMap<ImageId, Import>>,
    /// Held while an import's outcome or a removal is written, so that the two cannot
    /// interleave (a removed image written back as ready).
    writes: Mutex<()>,
    seeding: Mutex<HashMap<ImageId, TorrentHandle>>,
    /// The server's: imports run as its tasks, so that a shutdown waits for them to stop.
    tasks: TaskTracker,
    /// Cancelled when the server shuts down; stops every import between two units it reads.
    shutdown: CancellationToken,
}

impl Catalog {
    /// Loads the catalog, starts seeding every ready image and resumes interrupted imports.
    /// Imports run on `tasks` and stop when `shutdown` is cancelled.
    #[allow(clippy::too_many_arguments)] // one call site, in `server::run`
    pub fn start(
        store: Store,
        seeder: Session,
        tracker: Arc<Tracker>,
        public_url: String,
        data_dir: &Path,
        passkeys: Passkeys,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Arc<Catalog>, StoreError> {
        // Resolved once: the directory exists (the server made it) and does not move.
        let data_dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
        let catalog = Arc::new(Catalog {
            store,
            seeder,
            tracker,
            public_url,
            data_dir,
            passkeys,
            imports: Mutex::new(HashMap::new()),
            writes: Mutex::new(()),
            seeding: Mutex::new(HashMap::new()),
            tasks,
            shutdown,
        });
        for record in catalog.store.images()? {
            match record.state {
                ImageState::Ready => catalog.seed(&record),
                ImageState::Importing => {
                    tracing::info!(image = %record.id, "resuming an import the last run did not finish");
                    catalog.spawn_import(record);
                }
                ImageState::Failed | ImageState::Duplicate => {}
            }
        }
        Ok(catalog)
    }

    /// Validates `path` and starts importing it. The same file added again, or a file with
    /// the same content, is the same image.
    pub fn add(
        self: &Arc<Self>,
        path: &Path,
        name: Option<String>,
        raw: bool,
    ) -> Result<ImageView, CatalogError> {
        if !path.is_absolute() {
            return Err(CatalogError::Invalid(format!(
                "path {} must be absolute: it is read by the server, not by the client",
                path.display()
            )));
        }
        let meta = std::fs::metadata(path).map_err(|e| {
            CatalogError::Invalid(format!("cannot read {} on the server: {e}", path.display()))
        })?;
        if !meta.is_file() {
            return Err(CatalogError::Invalid(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        // The data directory holds the server's signing key and the tokens: a catalogued file
        // there would be served to anyone who fetches its torrent. Resolved, so that a symlink
        // or `..` cannot lead inside.
        let resolved = std::fs::canonicalize(path).map_err(|e| {
            CatalogError::Invalid(format!(
                "cannot resolve {} on the server: {e}",
                path.display()
            ))
        })?;
        if resolved.starts_with(&self.data_dir) {
            return Err(CatalogError::Invalid(format!(
                "{} is inside the server's data directory {} (it resolves to {}), which holds its \
                 signing key and tokens; nothing there is catalogued. Move or copy the image to \
                 another directory and add it from there",
                path.display(),
                self.data_dir.display(),
                resolved.display()
            )));
        }
        if meta.len() == 0 {
            return Err(CatalogError::Invalid(format!(
                "{} is empty; there is nothing to deploy",
                path.display()
            )));
        }
        let (virtual_size, logical_sector_size) = if raw {
            (None, None)
        } else {
            let info = vhdx::inspect(path).map_err(|e| {
                CatalogError::Invalid(format!(
                    "{e}; add it with raw=true (--raw) to import a file that is not a VHDX"
                ))
            })?;
            (Some(info.virtual_size), Some(info.logical_sector_size))
        };
        let name = match name {
            Some(n) => n,
            None => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "image".into()),
        };
        if let Err(reason) = boottorrent_bt::metainfo::check_file_name(&name) {
            return Err(CatalogError::Invalid(format!("name {name:?} {reason}")));
        }
        let mtime = mtime_ms(&meta);
        // The same unchanged file again: the image it already is.
        for existing in self.store.images()? {
            if existing.path == path
                && existing.size == meta.len()
                && existing.file_mtime_ms == mtime
                && matches!(existing.state, ImageState::Ready | ImageState::Importing)
            {
                return Ok(self.view(existing));
            }
        }
        let record = ImageRecord {
            id: new_id(&name),
            name,
            path: path.to_owned(),
            raw,
            size: meta.len(),
            virtual_size,
            logical_sector_size,
            piece_size: 0,
            info_hash: None,
            sha256: None,
            state: ImageState::Importing,
            error: None,
            same_as: None,
            added_ms: boottorrent_proto::now_ms(),
            file_mtime_ms: mtime,
        };
        self.store.put_image(&record, None)?;
        tracing::info!(image = %record.id, path = %path.display(), "importing image");
        self.spawn_import(record.clone());
        Ok(self.view(record))
    }

    fn spawn_import(self: &Arc<Self>, record: ImageRecord) {
        let catalog = self.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        lock(&self.imports).insert(
            record.id.clone(),
            Import {
                done: 0,
                cancel: cancel.clone(),
            },
        );
        let shutdown = self.shutdown.clone();
        // A blocking thread cannot wait for a token: this task waits for it and sets the
        // import's flag, then waits for the import to notice.
        self.tasks.spawn(async move {
            let mut import = tokio::task::spawn_blocking({
                let cancel = cancel.clone();
                move || catalog.import(record, &cancel)
            });
            tokio::select! {
                _ = &mut import => return,
                _ = shutdown.cancelled() => cancel.store(true, Ordering::Relaxed),
            }
            let _ = import.await;
        });
    }

    /// Hashes the file and stores the result; runs on the blocking pool until done or until
    /// `cancel` is set.
    fn import(self: Arc<Self>, mut record: ImageRecord, cancel: &AtomicBool) {
        let started = std::time::Instant::now();
        let options = CreateOptions {
            announce: format!("{}/announce", self.public_url),
            piece_len: None,
            private: true,
            threads: 0,
            name: Some(record.name.clone()),
            sha256: true,
        };
        let id = record.id.clone();
        let progress = |done: u64| {
            if let Some(import) = lock(&self.imports).get_mut(&id) {
                import.done = done;
            }
        };
        let before = std::fs::metadata(&record.path)
            .ok()
            .map(|m| (m.len(), mtime_ms(&m)));
        let result = create_cancellable(&record.path, &options, &progress, cancel);
        // The job's progress entry stays until the seeder holds the image: until then a
        // `ready` record without a seeder is an import finishing, not a file gone.
        let _finished = Finished {
            imports: &self.imports,
            id: record.id.clone(),
        };
        let created = match result {
            Ok(c) => c,
            // The record still says `importing`, as after a crash: the next start imports
            // the file again from its first byte.
            Err(CreateError::Cancelled { .. }) => {
                self.log_cancelled(&record.id);
                return;
            }
            Err(e) => {
                tracing::error!(image = %record.id, "import failed: {e}");
                record.state = ImageState::Failed;
                record.error = Some(e.to_string());
                let _writing = lock(&self.writes);
                if cancel.load(Ordering::Relaxed) {
                    self.log_cancelled(&record.id);
                    return;
                }
                if let Err(e) = self.store.put_image(&record, None) {
                    tracing::error!(image = %record.id, "storing the failed import: {e}");
                }
                return;
            }
        };
        // From here to the seeder holding it, a removal waits: it either came before (and the
        // flag says so) or comes after, and finds the image whole.
        let _writing = lock(&self.writes);
        if cancel.load(Ordering::Relaxed) {
            self.log_cancelled(&record.id);
            return;
        }
        record.piece_size = created.piece_len;
        record.size = created.length;
        record.info_hash = Some(Bytes(created.info_hash));
        record.sha256 = created.sha256.map(Bytes);
        let duplicate = self.store.images().ok().and_then(|all| {
            all.into_iter().find(|other| {
                other.id != record.id
                    && other.state == ImageState::Ready
                    && other.sha256.is_some()
                    && other.sha256 == record.sha256
            })
        });
        let outcome = match duplicate {
            Some(other) => {
                tracing::info!(image = %record.id, same_as = %other.id, "same content as an existing image");
                record.state = ImageState::Duplicate;
                record.same_as = Some(other.id);
                self.store.put_image(&record, None)
            }
            None => {
                record.state = ImageState::Ready;
                self.store.put_image(&record, Some(&created.torrent))
            }
        };
        if let Err(e) = outcome {
            tracing::error!(image = %record.id, "storing the imported image: {e}");
            return;
        }
        if record.state == ImageState::Ready {
            tracing::info!(
                image = %record.id,
                info_hash = %hex::encode(created.info_hash),
                pieces = created.piece_count,
                secs = started.elapsed().as_secs_f64(),
                "image imported"
            );
            // The pieces were hashed just now: the seeder need not read the file again, unless
            // it changed while it was being read (then the hashes may not match it, and the
            // seeder's own check finds out).
            let after = std::fs::metadata(&record.path)
                .ok()
                .map(|m| (m.len(), mtime_ms(&m)));
            if before.is_some() && before == after {
                let trusted = Metainfo::from_bytes(&created.torrent)
                    .map_err(|e| e.to_string())
                    .and_then(|meta| {
                        self.seeder
                            .trust_complete(&meta, &record.path)
                            .map_err(|e| e.to_string())
                    });
                if let Err(e) = trusted {
                    tracing::warn!(image = %record.id, "the seeder will re-hash the image: {e}");
                }
            } else {
                tracing::warn!(image = %record.id, path = %record.path.display(), "the file changed while it was imported; the seeder re-hashes it");
            }
            self.seed(&record);
        }
    }

    /// Serves a ready image: tracker whitelist and super-seeder.
    fn seed(&self, record: &ImageRecord) {
        let Some(info_hash) = record.info_hash else {
            return;
        };
        self.tracker.allow(info_hash.0);
        let torrent = match self.store.torrent(&hex::encode(info_hash.0)) {
            Ok(Some(t)) => t,
            Ok(None) => {
                tracing::error!(image = %record.id, "its .torrent is missing from the database; remove and add the image again");
                return;
            }
            Err(e) => {
                tracing::error!(image = %record.id, "reading its .torrent: {e}");
                return;
            }
        };
        let mut metainfo = match Metainfo::from_bytes(&torrent) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(image = %record.id, "its stored .torrent does not parse: {e}");
                return;
            }
        };
        // The seeder announces like any machine: with a passkey, its own.
        metainfo.announce = vec![self.passkeys.announce_url(&self.public_url, SEEDER)];
        match self.seeder.add(AddTorrent {
            metainfo,
            path: record.path.clone(),
            mode: Mode::SuperSeed,
            peers: Vec::new(),
            use_tracker: true,
        }) {
            Ok(handle) => {
                self.seeding
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(record.id.clone(), handle);
            }
            Err(e) => {
                tracing::error!(image = %record.id, "cannot seed {}: {e}", record.path.display())
            }
        }
    }

    /// The seeder's incoming connections so far, by how they were encrypted (for `/metrics`).
    pub fn seeder_connections(&self) -> boottorrent_swarm::session::ConnectionCounts {
        self.seeder.connection_counts()
    }

    /// Every image except duplicates, ordered by id.
    pub fn list(&self) -> Result<Vec<ImageView>, CatalogError> {
        Ok(self
            .store
            .images()?
            .into_iter()
            .filter(|r| r.state != ImageState::Duplicate)
            .map(|r| self.view(r))
            .collect())
    }

    /// One image.
    pub fn get(&self, id: &ImageId) -> Result<ImageView, CatalogError> {
        match self.store.image(id)? {
            Some(r) => Ok(self.view(r)),
            None => Err(CatalogError::NotFound(id.clone())),
        }
    }

    /// Stops seeding and forgets the image; the file itself stays where it is.
    pub async fn remove(&self, id: &ImageId) -> Result<(), CatalogError> {
        let handle = {
            let _writing = lock(&self.writes);
            let record = self
                .store
                .image(id)?
                .ok_or_else(|| CatalogError::NotFound(id.clone()))?;
            // An import under way stops at its next unit and writes nothing.
            if let Some(import) = lock(&self.imports).get(id) {
                import.cancel.store(true, Ordering::Relaxed);
            }
            // A duplicate shares its info hash with the image it duplicates: keep that torrent.
            if record.state != ImageState::Duplicate {
                if let Some(hash) = record.info_hash {
                    self.tracker.disallow(hash.0);
                }
                self.store.delete_image(&record)?;
            } else {
                let mut alias = record.clone();
                alias.info_hash = None;
                self.store.delete_image(&alias)?;
            }
            lock(&self.seeding).remove(id)
        };
        if let Some(handle) = handle {
            let _ = self.seeder.remove(handle.info_hash(), false).await;
        }
        tracing::info!(image = %id, "image removed from the catalog");
        Ok(())
    }

    /// The URL agents and peers reach the server at.
    pub fn public_url(&self) -> String {
        self.public_url.clone()
    }

    /// The `.torrent` of a catalogued image as `holder` (a machine, or the operator) gets it:
    /// announcing with the holder's passkey.
    pub fn torrent(
        &self,
        info_hash_hex: &str,
        holder: &str,
    ) -> Result<Option<Vec<u8>>, CatalogError> {
        let Some(stored) = self.store.torrent(&info_hash_hex.to_ascii_lowercase())? else {
            return Ok(None);
        };
        let announce = self.passkeys.announce_url(&self.public_url, holder);
        match boottorrent_tracker::create::with_announce(&stored, &announce) {
            Ok(torrent) => Ok(Some(torrent)),
            Err(e) => {
                tracing::error!(
                    info_hash = info_hash_hex,
                    "the stored .torrent does not parse: {e}"
                );
                Ok(None)
            }
        }
    }

    /// An import stopped at its flag: by the server's shutdown (the record stays `importing`
    /// and the next start imports it again) or because the image was removed.
    fn log_cancelled(&self, id: &ImageId) {
        if self.shutdown.is_cancelled() {
            tracing::warn!(image = %id, "import cancelled by shutdown; the next start imports it again");
        } else {
            tracing::info!(image = %id, "import cancelled: the image was removed");
        }
    }

    fn view(&self, r: ImageRecord) -> ImageView {
        let job = lock(&self.imports).get(&r.id).map(|i| i.done);
        let importing = job.is_some();
        let import_done = job.unwrap_or(if r.state == ImageState::Ready {
            r.size
        } else {
            0
        });
        let stats = self
            .seeding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&r.id)
            .map(|h| h.stats().borrow().clone());
        let mut error = r.error.clone();
        let state = match (r.state, &stats) {
            (ImageState::Importing, _) => ImageStatus::Importing,
            (ImageState::Failed, _) => ImageStatus::Failed,
            (ImageState::Duplicate, _) => ImageStatus::Duplicate,
            (ImageState::Ready, None) if importing => ImageStatus::Checking,
            (ImageState::Ready, None) => {
                error = Some(format!(
                    "not seeding: {} could not be opened; is it still there?",
                    r.path.display()
                ));
                ImageStatus::Unavailable
            }
            (ImageState::Ready, Some(s)) => match &s.state {
                TorrentState::Checking { .. } => ImageStatus::Checking,
                TorrentState::Error(e) => {
                    error = Some(e.clone());
                    ImageStatus::Unavailable
                }
                _ => ImageStatus::Ready,
            },
        };
        ImageView {
            torrent_url: r
                .info_hash
                .map(|h| format!("{}/torrents/{}.torrent", self.public_url, hex::encode(h.0))),
            uploaded: stats.as_ref().map_or(0, |s| s.uploaded),
            peers: stats.as_ref().map_or(0, |s| s.peers.len()),
            state: state.to_owned(),
            error,
            import_done,
            id: r.id,
            name: r.name,
            path: r.path,
            raw: r.raw,
            size: r.size,
            virtual_size: r.virtual_size,
            logical_sector_size: r.logical_sector_size,
            piece_size: r.piece_size,
            info_hash: r.info_hash,
            sha256: r.sha256,
            same_as: r.same_as,
        }
    }
}

/// A readable, unique id: the name's safe characters and a random suffix.
fn new_id(name: &str) -> ImageId {
    let stem: String = name
        .rsplit_once('.')
        .map_or(name, |(stem, _)| stem)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let suffix: u32 = rand::random();
    let id = format!("{}-{:08x}", stem.trim_matches('-'), suffix);
    id.trim_start_matches('-')
        .parse()
        .unwrap_or_else(|_| format!("img-{suffix:08x}").parse().expect("valid id"))
}

fn mtime_ms(meta: &std::fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64)
}

/// An import under way.
struct Import {
    /// Bytes hashed so far.
    done: u64,
    /// Set to stop it: by the server's shutdown, or by the image's removal.
    cancel: Arc<AtomicBool>,
}

/// Ends an import's entry when the import returns, whichever way it returns.
struct Finished<'a> {
    imports: &'a Mutex<HashMap<ImageId, Import>>,
    id: ImageId,
}

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        lock(self.imports).remove(&self.id);
    }
}

/// A lock of the catalog's; a panic while it was held left nothing half written that the
/// next holder could not read, so it is taken anyway.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
