//! Persistent state in one redb file: machines, their keys, an append-only event log, the
//! image catalog (records and their `.torrent` bytes), zones and deployments.
//!
//! Values are JSON so that an operator can inspect a copy of the file with any redb tool and
//! so that adding a field does not need a migration (`#[serde(default)]`). Every write is one
//! redb transaction with the default durability (fsync on commit): once a caller has seen
//! `Ok`, a `kill -9` cannot lose it. The orchestrator is the only writer of machines and keys;
//! the HTTP API reads through snapshots, which redb serves concurrently with a write.

use std::path::{Path, PathBuf};

use boottorrent_proto::{DeploymentId, HeldImage, ImageId, MachineId, PublicKeyBytes, ZoneId};

use crate::server::deployment::{Deployment, MachineProgress};
use crate::server::zone::Zone;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

const MACHINES: TableDefinition<&str, &[u8]> = TableDefinition::new("machines");
const MACHINE_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("machine_keys");
const EVENT_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("event_log");
const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");
/// `.torrent` bytes by info hash (hex), kept apart so listing images stays cheap.
const TORRENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("torrents");
const ZONES: TableDefinition<&str, &[u8]> = TableDefinition::new("zones");
/// Deployments by id, each with its machines' states and transitions.
const DEPLOYMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("deployments");
/// One row per machine of a deployment, keyed `<deployment>/<machine>` (ids hold no `/`), so
/// that a machine's progress rewrites its own row and not a record of the whole fleet.
const DEPLOYMENT_MACHINES: TableDefinition<&str, &[u8]> =
    TableDefinition::new("deployment_machines");
/// Facts about the file itself; `schema_version` for now.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The layout this build reads and writes. Version 1 added zones, deployments and this
/// version number; files made before it have no number and count as version 0.
/// 2: a deployment's machines moved from its record to `deployment_machines`.
pub const SCHEMA_VERSION: u64 = 2;

/// What went wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening database {path}: {source} (is another boottorrent using it?)")]
    Open {
        path: PathBuf,
        source: Box<redb::DatabaseError>,
    },
    // Boxed: redb's error is large and travels through every store call.
    #[error("database error: {0}")]
    Db(Box<redb::Error>),
    #[error(
        "database {path} has schema version {found}, newer than the {SCHEMA_VERSION} this boottorrent understands; run the newer boottorrent that wrote it, or restore a backup made before the upgrade"
    )]
    TooNew { path: PathBuf, found: u64 },
    #[error("corrupt record {key:?} in table {table}: {source}")]
    Corrupt {
        table: &'static str,
        key: String,
        source: serde_json::Error,
    },
    #[error("encoding record {key:?} for table {table}: {source}")]
    Encode {
        table: &'static str,
        key: String,
        source: serde_json::Error,
    },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(Box::new(e.into()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// What the server knows about a machine, from its own reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MachineRecord {
    pub id: MachineId,
    pub hostname: String,
    pub os: String,
    pub agent_version: String,
    /// Addresses the machine reports (shown to the operator; anyone can claim any).
    pub ips: Vec<std::net::IpAddr>,
    /// The address the server last saw the machine's own signed HTTP request come from.
    /// Subnet zones go by this, never by `ips`, so that a made-up machine cannot claim a
    /// place in a room.
    pub observed_ips: Vec<std::net::IpAddr>,
    pub macs: Vec<String>,
    pub free_disk_bytes: u64,
    pub images: Vec<HeldImage>,
    pub zones: Vec<ZoneId>,
    pub online: bool,
    /// Unix milliseconds of the first accepted message.
    pub first_seen_ms: i64,
    /// Unix milliseconds of the last accepted message.
    pub last_seen_ms: i64,
    /// Highest envelope seq accepted; restores the replay guard after a restart.
    pub last_seq: u64,
    /// The agent spoke JSON in its last startup, so commands to it are JSON too.
    pub prefers_json: bool,
    /// The image the machine runs, as its last startup said; `None` for none BootTorrent
    /// booted, or an agent too old to say.
    pub running: Option<boottorrent_proto::RunningImage>,
}

impl MachineRecord {
    /// A machine seen for the first time at `now_ms`.
    pub fn new(id: MachineId, now_ms: i64) -> Self {
        MachineRecord {
            id,
            hostname: String::new(),
            os: String::new(),
            agent_version: String::new(),
            ips: Vec::new(),
            observed_ips: Vec::new(),
            macs: Vec::new(),
            free_disk_bytes: 0,
            images: Vec::new(),
            zones: Vec::new(),
            online: false,
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
            last_seq: 0,
            prefers_json: false,
            running: None,
        }
    }
}

impl Default for MachineRecord {
    fn default() -> Self {
        // Only serde uses this, to fill fields missing from older records; `id` is always
        // present in stored records.
        MachineRecord::new(MachineId::try_from("unknown").expect("valid id literal"), 0)
    }
}

/// A machine's signing keys: the one it is trusted with, and one waiting for the operator.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KeyRecord {
    /// Key whose signatures are accepted.
    pub approved: Option<PublicKeyBytes>,
    /// Key presented in a correctly self-signed `startup` but not approved yet: a new machine
    /// while auto-approve is off, or a known machine whose key changed.
    pub pending: Option<PublicKeyBytes>,
    /// Unix milliseconds when `approved` was set.
    pub approved_at_ms: Option<i64>,
}

/// Where a catalogued image stands, as stored. Seeding problems found at run time (file gone
/// or changed) are reported by the catalog on top of `Ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageState {
    /// Being validated and hashed.
    Importing,
    /// Hashed, stored and seeded.
    Ready,
    /// The import failed; `error` says why.
    Failed,
    /// Same content as another image (`same_as`); kept so the adding client can learn that.
    Duplicate,
}

/// A catalogued image: a file on the server's disk and its torrent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: ImageId,
    /// Human-readable name; the torrent's file name.
    pub name: String,
    /// Absolute path of the file on the server.
    pub path: PathBuf,
    /// Imported without VHDX validation.
    pub raw: bool,
    /// File size in bytes.
    pub size: u64,
    /// The disk's virtual size (VHDX metadata), bytes.
    pub virtual_size: Option<u64>,
    /// The disk's logical sector size (VHDX metadata), bytes.
    pub logical_sector_size: Option<u32>,
    /// Torrent piece size in bytes; 0 until hashed.
    pub piece_size: u32,
    pub info_hash: Option<boottorrent_proto::InfoHash>,
    pub sha256: Option<boottorrent_proto::Sha256>,
    pub state: ImageState,
    /// Why the import failed.
    pub error: Option<String>,
    /// For `Duplicate`: the image with the same content.
    pub same_as: Option<ImageId>,
    /// Unix milliseconds when it was added.
    pub added_ms: i64,
    /// The file's modification time when hashed (Unix milliseconds); a different one at start
    /// means the file changed behind our back.
    pub file_mtime_ms: i64,
}

/// One line of the append-only event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Position in the log, assigned on append.
    #[serde(default)]
    pub seq: u64,
    /// Unix milliseconds.
    pub at_ms: i64,
    pub machine: Option<MachineId>,
    /// Short machine-readable kind, e.g. `registered`, `offline`, `key_changed`.
    pub kind: String,
    /// Human-readable detail.
    pub detail: String,
}

/// The database handle; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: std::sync::Arc<Database>,
    presence: std::sync::Arc<std::sync::Mutex<Presence>>,
}

/// When each online machine was last heard from, kept in step with the machines table (a
/// write's changes are applied once it committed) so that the offline sweep looks at the
/// overdue machines only: decoding every record of a 10,000-machine fleet at every sweep is
/// what it replaces.
///
/// It also holds what an event changed when it changed nothing but when the machine was last
/// heard from and its seq ([`Batch::heard`]): those are not written per event but by
/// [`Store::persist_presence`] every so often (and on shutdown), and every read of a record
/// shows them meanwhile. A crash loses at most one period of them, nothing else.
#[derive(Debug, Default)]
struct Presence {
    seen: std::collections::HashMap<MachineId, i64>,
    by_time: std::collections::BTreeSet<(i64, MachineId)>,
    unsaved: std::collections::HashMap<MachineId, Heard>,
    /// What the fleet and zone summaries count of each machine, so that they need not
    /// decode every record per request.
    facets: std::collections::HashMap<MachineId, Facets>,
}

/// What `GET /api/v1/fleet` and the zones' member lists need of one machine: kept in memory
/// in step with the machines and keys tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facets {
    /// Whether the machine has a record (its keys may be written first).
    pub recorded: bool,
    pub online: bool,
    pub zones: Vec<ZoneId>,
    /// Each image it holds and where that stands.
    pub images: Vec<(ImageId, boottorrent_proto::ImageState)>,
    /// The image it runs.
    pub running: Option<ImageId>,
    pub keys: KeyRecord,
}

impl Facets {
    fn record(&mut self, record: &MachineRecord) {
        self.recorded = true;
        self.online = record.online;
        self.zones.clone_from(&record.zones);
        self.images = record
            .images
            .iter()
            .map(|h| (h.image.clone(), h.state))
            .collect();
        self.running = record.running.as_ref().map(|r| r.image.clone());
    }
}

/// When a machine was last heard from, and the seq of what it said: what a heartbeat
/// changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Heard {
    last_seen_ms: i64,
    last_seq: u64,
}

impl Heard {
    fn of(record: &MachineRecord) -> Heard {
        Heard {
            last_seen_ms: record.last_seen_ms,
            last_seq: record.last_seq,
        }
    }

    /// `record` as it stands with this heard on top (never moving it back).
    fn overlay(self, record: &mut MachineRecord) {
        record.last_seen_ms = record.last_seen_ms.max(self.last_seen_ms);
        record.last_seq = record.last_seq.max(self.last_seq);
    }
}

/// A change to the presence index, applied once its transaction committed.
#[derive(Debug)]
enum PresenceChange {
    /// The record was written: online since `Some(last seen)`, or not online (or gone).
    Written(MachineId, Option<i64>),
    /// Heard from, online, nothing else changed; not written yet.
    Heard(MachineId, Heard),
    /// The record was written (or, with `None`, deleted with its keys): its facets (their
    /// keys are not the record's, and not taken).
    Record(MachineId, Option<Box<Facets>>),
    /// The machine's keys were written.
    Keys(MachineId, KeyRecord),
}

impl Presence {
    /// The machine is online, last heard at `last_seen_ms`; or, with `None`, not online (or
    /// gone).
    fn set(&mut self, id: &MachineId, last_seen_ms: Option<i64>) {
        if let Some(old) = self.seen.remove(id) {
            self.by_time.remove(&(old, id.clone()));
        }
        if let Some(at) = last_seen_ms {
            self.seen.insert(id.clone(), at);
            self.by_time.insert((at, id.clone()));
        }
    }

    fn of(record: &MachineRecord) -> Option<i64> {
        record.online.then_some(record.last_seen_ms)
    }

    fn apply(&mut self, change: PresenceChange) {
        match change {
            PresenceChange::Written(id, at) => {
                self.set(&id, at);
                self.unsaved.remove(&id);
            }
            PresenceChange::Heard(id, heard) => {
                self.set(&id, Some(heard.last_seen_ms));
                self.unsaved.insert(id, heard);
            }
            PresenceChange::Record(id, Some(written)) => {
                let facets = self.facets.entry(id).or_default();
                let keys = std::mem::take(&mut facets.keys);
                *facets = Facets { keys, ..*written };
            }
            PresenceChange::Record(id, None) => {
                self.facets.remove(&id);
            }
            PresenceChange::Keys(id, keys) => self.facets.entry(id).or_default().keys = keys,
        }
    }

    /// `record` with what was heard from it since it was written.
    fn overlay(&self, record: &mut MachineRecord) {
        if let Some(heard) = self.unsaved.get(&record.id) {
            heard.overlay(record);
        }
    }
}

impl Store {
    /// Opens (or creates) the database and its tables.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let tx = db.begin_write()?;
        let found = tx
            .open_table(META)?
            .get("schema_version")?
            .map(|v| v.value());
        match found {
            Some(found) if found > SCHEMA_VERSION => {
                return Err(StoreError::TooNew {
                    path: path.to_owned(),
                    found,
                });
            }
            Some(SCHEMA_VERSION) => {}
            older => {
                // Each migration runs in this same transaction, so a crash leaves the file as
                // it was. A new file has only the table just opened. 0 to 1: the new tables
                // are created below. 1 to 2: each deployment's machines move to their rows.
                let fresh = tx.list_tables()?.all(|t| t.name() == "meta");
                if !fresh {
                    tracing::info!(
                        path = %path.display(),
                        from = older.unwrap_or(0),
                        to = SCHEMA_VERSION,
                        "migrating the database"
                    );
                    let mut deployments = tx.open_table(DEPLOYMENTS)?;
                    let mut rows = tx.open_table(DEPLOYMENT_MACHINES)?;
                    let mut moved = Vec::new();
                    for row in deployments.iter()? {
                        let (id, value) = row?;
                        let d: Deployment = decode("deployments", id.value(), value.value())?;
                        moved.push(d);
                    }
                    for d in &moved {
                        for m in d.machines.values() {
                            put_row(&mut rows, &d.id, m)?;
                        }
                        let bytes = encode("deployments", d.id.as_str(), d)?;
                        deployments.insert(d.id.as_str(), bytes.as_slice())?;
                    }
                }
                tx.open_table(META)?
                    .insert("schema_version", SCHEMA_VERSION)?;
            }
        }
        tx.open_table(MACHINES)?;
        tx.open_table(MACHINE_KEYS)?;
        tx.open_table(EVENT_LOG)?;
        tx.open_table(IMAGES)?;
        tx.open_table(TORRENTS)?;
        tx.open_table(ZONES)?;
        tx.open_table(DEPLOYMENTS)?;
        tx.open_table(DEPLOYMENT_MACHINES)?;
        tx.commit()?;
        let store = Store {
            db: std::sync::Arc::new(db),
            presence: Default::default(),
        };
        {
            let records = store.machines()?;
            let mut presence = store.lock_presence();
            for (record, keys) in records {
                presence.set(&record.id, Presence::of(&record));
                let facets = presence.facets.entry(record.id.clone()).or_default();
                facets.record(&record);
                facets.keys = keys;
            }
        }
        Ok(store)
    }

    fn lock_presence(&self) -> std::sync::MutexGuard<'_, Presence> {
        // Each change is one whole `set`; a panic between two leaves nothing half done.
        self.presence.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many machines there are, and how many of them are online; without reading them.
    pub fn machine_counts(&self) -> Result<(u64, u64), StoreError> {
        let tx = self.db.begin_read()?;
        let total = tx.open_table(MACHINES)?.len()?;
        Ok((total, self.lock_presence().seen.len() as u64))
    }

    /// Writes the last-seen times and seqs heard since the last call (see [`Batch::heard`])
    /// in one transaction; how many machines.
    pub fn persist_presence(&self) -> Result<usize, StoreError> {
        let unsaved: Vec<MachineId> = self.lock_presence().unsaved.keys().cloned().collect();
        if unsaved.is_empty() {
            return Ok(0);
        }
        self.write(|batch| {
            let mut written = 0;
            for id in &unsaved {
                // Read through the batch: the record with what was heard on top.
                if let Some((record, _)) = batch.machine(id)? {
                    batch.put_machine(&record)?;
                    written += 1;
                }
            }
            Ok(written)
        })
    }

    /// Calls `f` with every machine's [`Facets`], in no order; from memory. Holds the
    /// index meanwhile: `f` should only count.
    pub fn for_each_facets(&self, mut f: impl FnMut(&MachineId, &Facets)) {
        let presence = self.lock_presence();
        for (id, facets) in presence.facets.iter().filter(|(_, f)| f.recorded) {
            f(id, facets);
        }
    }

    /// Online machines last heard from before `before_ms`, oldest first; from memory.
    pub fn online_unheard_since(&self, before_ms: i64) -> Vec<MachineId> {
        self.lock_presence()
            .by_time
            .iter()
            .take_while(|(at, _)| *at < before_ms)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Every machine with its keys, ordered by id.
    pub fn machines(&self) -> Result<Vec<(MachineRecord, KeyRecord)>, StoreError> {
        let tx = self.db.begin_read()?;
        let machines = tx.open_table(MACHINES)?;
        let keys = tx.open_table(MACHINE_KEYS)?;
        let presence = self.lock_presence();
        let mut out = Vec::new();
        for row in machines.iter()? {
            let (id, value) = row?;
            let mut record: MachineRecord = decode("machines", id.value(), value.value())?;
            presence.overlay(&mut record);
            let key = match keys.get(id.value())? {
                Some(v) => decode("machine_keys", id.value(), v.value())?,
                None => KeyRecord::default(),
            };
            out.push((record, key));
        }
        Ok(out)
    }

    /// Up to `limit` machines with their keys, in id order, after `after` (from the first when
    /// `None`), that `keep` keeps; and whether more would follow. Reads from `after` on and
    /// stops at the first match past the page, so a page of an unfiltered list costs the page,
    /// not the fleet.
    pub fn machines_page(
        &self,
        after: Option<&MachineId>,
        limit: usize,
        mut keep: impl FnMut(&MachineRecord, &KeyRecord) -> bool,
    ) -> Result<(Vec<(MachineRecord, KeyRecord)>, bool), StoreError> {
        use std::ops::Bound;
        let tx = self.db.begin_read()?;
        let machines = tx.open_table(MACHINES)?;
        let keys = tx.open_table(MACHINE_KEYS)?;
        let start = match after {
            Some(id) => Bound::Excluded(id.as_str()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for row in machines.range::<&str>((start, Bound::Unbounded))? {
            let (id, value) = row?;
            let mut record: MachineRecord = decode("machines", id.value(), value.value())?;
            self.lock_presence().overlay(&mut record);
            let key = match keys.get(id.value())? {
                Some(v) => decode("machine_keys", id.value(), v.value())?,
                None => KeyRecord::default(),
            };
            if !keep(&record, &key) {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push((record, key));
        }
        Ok((out, false))
    }

    /// One machine with its keys.
    pub fn machine(
        &self,
        id: &MachineId,
    ) -> Result<Option<(MachineRecord, KeyRecord)>, StoreError> {
        let tx = self.db.begin_read()?;
        let machines = tx.open_table(MACHINES)?;
        let Some(value) = machines.get(id.as_str())? else {
            return Ok(None);
        };
        let mut record: MachineRecord = decode("machines", id.as_str(), value.value())?;
        self.lock_presence().overlay(&mut record);
        let keys = tx.open_table(MACHINE_KEYS)?;
        let key = match keys.get(id.as_str())? {
            Some(v) => decode("machine_keys", id.as_str(), v.value())?,
            None => KeyRecord::default(),
        };
        Ok(Some((record, key)))
    }

    /// The newest `limit` log entries, oldest first.
    pub fn recent_log(&self, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        let tx = self.db.begin_read()?;
        let log = tx.open_table(EVENT_LOG)?;
        let mut out = Vec::new();
        for row in log.iter()?.rev().take(limit) {
            let (seq, value) = row?;
            let mut entry: LogEntry = decode("event_log", &seq.value().to_string(), value.value())?;
            entry.seq = seq.value();
            out.push(entry);
        }
        out.reverse();
        Ok(out)
    }

    /// Every catalogued image, ordered by id.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        all(&self.db, IMAGES, "images")
    }

    /// One image.
    pub fn image(&self, id: &ImageId) -> Result<Option<ImageRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(IMAGES)?;
        match table.get(id.as_str())? {
            Some(v) => Ok(Some(decode("images", id.as_str(), v.value())?)),
            None => Ok(None),
        }
    }

    /// Stores an image record, and its torrent when given, in one transaction.
    pub fn put_image(
        &self,
        record: &ImageRecord,
        torrent: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let bytes = encode("images", record.id.as_str(), record)?;
            tx.open_table(IMAGES)?
                .insert(record.id.as_str(), bytes.as_slice())?;
            if let (Some(torrent), Some(hash)) = (torrent, &record.info_hash) {
                tx.open_table(TORRENTS)?
                    .insert(hex::encode(hash.0).as_str(), torrent)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Removes an image and its torrent.
    pub fn delete_image(&self, record: &ImageRecord) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            tx.open_table(IMAGES)?.remove(record.id.as_str())?;
            if let Some(hash) = &record.info_hash {
                tx.open_table(TORRENTS)?
                    .remove(hex::encode(hash.0).as_str())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The `.torrent` of an image, by its info hash in hex.
    pub fn torrent(&self, info_hash_hex: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(TORRENTS)?;
        Ok(table.get(info_hash_hex)?.map(|v| v.value().to_vec()))
    }

    /// Every zone, ordered by id.
    pub fn zones(&self) -> Result<Vec<Zone>, StoreError> {
        all(&self.db, ZONES, "zones")
    }

    /// Every deployment with its machines, ordered by id (which starts with the creation
    /// time).
    pub fn deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        let tx = self.db.begin_read()?;
        let rows = tx.open_table(DEPLOYMENT_MACHINES)?;
        let mut out: Vec<Deployment> = all(&self.db, DEPLOYMENTS, "deployments")?;
        let index: std::collections::HashMap<String, usize> = out
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id.to_string(), i))
            .collect();
        for row in rows.iter()? {
            let (key, value) = row?;
            // Ids hold no `/`, so the first one ends the deployment's.
            let Some((deployment, _)) = key.value().split_once('/') else {
                continue;
            };
            let Some(&at) = index.get(deployment) else {
                continue;
            };
            let m: MachineProgress = decode("deployment_machines", key.value(), value.value())?;
            out[at].machines.insert(m.id.clone(), m);
        }
        Ok(out)
    }

    /// One deployment with its machines.
    pub fn deployment(&self, id: &DeploymentId) -> Result<Option<Deployment>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(DEPLOYMENTS)?;
        let Some(mut d) = table
            .get(id.as_str())?
            .map(|v| decode::<Deployment>("deployments", id.as_str(), v.value()))
            .transpose()?
        else {
            return Ok(None);
        };
        let rows = tx.open_table(DEPLOYMENT_MACHINES)?;
        let prefix = row_prefix(id);
        for row in rows.range::<&str>(prefix.as_str()..)? {
            let (key, value) = row?;
            if !key.value().starts_with(&prefix) {
                break;
            }
            let m: MachineProgress = decode("deployment_machines", key.value(), value.value())?;
            d.machines.insert(m.id.clone(), m);
        }
        Ok(Some(d))
    }

    /// Runs `f` in one write transaction and commits it; nothing of it is kept if `f` fails.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&mut Batch<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self.db.begin_write()?;
        let (out, presence) = {
            let mut batch = Batch {
                machines: tx.open_table(MACHINES)?,
                keys: tx.open_table(MACHINE_KEYS)?,
                log: tx.open_table(EVENT_LOG)?,
                zones: tx.open_table(ZONES)?,
                deployments: tx.open_table(DEPLOYMENTS)?,
                deployment_machines: tx.open_table(DEPLOYMENT_MACHINES)?,
                presence: Vec::new(),
                heard: std::collections::HashMap::new(),
                index: &self.presence,
            };
            let out = f(&mut batch)?;
            (out, batch.presence)
        };
        tx.commit()?;
        let mut index = self.lock_presence();
        for change in presence {
            index.apply(change);
        }
        Ok(out)
    }
}

/// The tables of one write transaction.
pub struct Batch<'tx> {
    machines: redb::Table<'tx, &'static str, &'static [u8]>,
    keys: redb::Table<'tx, &'static str, &'static [u8]>,
    log: redb::Table<'tx, u64, &'static [u8]>,
    zones: redb::Table<'tx, &'static str, &'static [u8]>,
    deployments: redb::Table<'tx, &'static str, &'static [u8]>,
    deployment_machines: redb::Table<'tx, &'static str, &'static [u8]>,
    /// Presence changes, for [`Store`]'s index once the transaction committed.
    presence: Vec<PresenceChange>,
    /// What [`Batch::heard`] took in this transaction, for reads within it.
    heard: std::collections::HashMap<MachineId, Heard>,
    /// The store's index, for reads within the transaction.
    index: &'tx std::sync::Mutex<Presence>,
}

impl Batch<'_> {
    /// Reads a machine as this transaction sees it.
    pub fn machine(
        &self,
        id: &MachineId,
    ) -> Result<Option<(MachineRecord, KeyRecord)>, StoreError> {
        let Some(value) = self.machines.get(id.as_str())? else {
            return Ok(None);
        };
        let mut record: MachineRecord = decode("machines", id.as_str(), value.value())?;
        self.index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .overlay(&mut record);
        if let Some(heard) = self.heard.get(id) {
            heard.overlay(&mut record);
        }
        let key = match self.keys.get(id.as_str())? {
            Some(v) => decode("machine_keys", id.as_str(), v.value())?,
            None => KeyRecord::default(),
        };
        Ok(Some((record, key)))
    }

    /// Writes a machine's record. Read it with [`Batch::machine`] first: a record built
    /// otherwise would drop what was heard since it was last written.
    pub fn put_machine(&mut self, record: &MachineRecord) -> Result<(), StoreError> {
        let bytes = encode("machines", record.id.as_str(), record)?;
        self.machines.insert(record.id.as_str(), bytes.as_slice())?;
        self.heard.remove(&record.id);
        self.presence.push(PresenceChange::Written(
            record.id.clone(),
            Presence::of(record),
        ));
        let mut facets = Facets::default();
        facets.record(record);
        self.presence.push(PresenceChange::Record(
            record.id.clone(),
            Some(Box::new(facets)),
        ));
        Ok(())
    }

    /// An online machine was heard from and nothing changed but its last-seen time and seq:
    /// kept in memory (and shown by every read) until [`Store::persist_presence`] writes it.
    /// A machine not online is written instead: going online is a transition, and those are
    /// always written.
    pub fn heard(&mut self, record: &MachineRecord) -> Result<(), StoreError> {
        if !record.online {
            return self.put_machine(record);
        }
        let heard = Heard::of(record);
        self.heard.insert(record.id.clone(), heard);
        self.presence
            .push(PresenceChange::Heard(record.id.clone(), heard));
        Ok(())
    }

    /// Removes a machine's record and keys.
    pub fn delete_machine(&mut self, id: &MachineId) -> Result<(), StoreError> {
        self.machines.remove(id.as_str())?;
        self.keys.remove(id.as_str())?;
        self.heard.remove(id);
        self.presence
            .push(PresenceChange::Written(id.clone(), None));
        self.presence.push(PresenceChange::Record(id.clone(), None));
        Ok(())
    }

    pub fn put_keys(&mut self, id: &MachineId, keys: &KeyRecord) -> Result<(), StoreError> {
        let bytes = encode("machine_keys", id.as_str(), keys)?;
        self.keys.insert(id.as_str(), bytes.as_slice())?;
        self.presence
            .push(PresenceChange::Keys(id.clone(), keys.clone()));
        Ok(())
    }

    pub fn put_zone(&mut self, zone: &Zone) -> Result<(), StoreError> {
        let bytes = encode("zones", zone.id.as_str(), zone)?;
        self.zones.insert(zone.id.as_str(), bytes.as_slice())?;
        Ok(())
    }

    /// Removes a zone; returns it as it was.
    pub fn delete_zone(&mut self, id: &ZoneId) -> Result<Option<Zone>, StoreError> {
        let old = self.zones.remove(id.as_str())?;
        old.map(|v| decode("zones", id.as_str(), v.value()))
            .transpose()
    }

    /// Writes a deployment and every one of its machines.
    pub fn put_deployment(&mut self, deployment: &Deployment) -> Result<(), StoreError> {
        self.put_deployment_header(deployment)?;
        for m in deployment.machines.values() {
            put_row(&mut self.deployment_machines, &deployment.id, m)?;
        }
        Ok(())
    }

    /// Writes a deployment without its machines' rows: what changes with any of them (its
    /// cancellation, say) but is small.
    pub fn put_deployment_header(&mut self, deployment: &Deployment) -> Result<(), StoreError> {
        let bytes = encode("deployments", deployment.id.as_str(), deployment)?;
        self.deployments
            .insert(deployment.id.as_str(), bytes.as_slice())?;
        Ok(())
    }

    /// Writes one machine's row of a deployment.
    pub fn put_deployment_machine(
        &mut self,
        deployment: &DeploymentId,
        machine: &MachineProgress,
    ) -> Result<(), StoreError> {
        put_row(&mut self.deployment_machines, deployment, machine)
    }

    /// Appends to the event log; the entry's `seq` is assigned here.
    pub fn log(
        &mut self,
        at_ms: i64,
        machine: Option<&MachineId>,
        kind: &str,
        detail: impl Into<String>,
    ) -> Result<(), StoreError> {
        let seq = match self.log.last()? {
            Some((k, _)) => k.value() + 1,
            None => 1,
        };
        let entry = LogEntry {
            seq,
            at_ms,
            machine: machine.cloned(),
            kind: kind.to_owned(),
            detail: detail.into(),
        };
        let bytes = encode("event_log", &seq.to_string(), &entry)?;
        self.log.insert(seq, bytes.as_slice())?;
        Ok(())
    }
}

/// Every record of a string-keyed table.
/// The key prefix of a deployment's machine rows.
fn row_prefix(deployment: &DeploymentId) -> String {
    format!("{deployment}/")
}

fn put_row(
    table: &mut redb::Table<'_, &'static str, &'static [u8]>,
    deployment: &DeploymentId,
    machine: &MachineProgress,
) -> Result<(), StoreError> {
    let key = format!("{deployment}/{}", machine.id);
    let bytes = encode("deployment_machines", &key, machine)?;
    table.insert(key.as_str(), bytes.as_slice())?;
    Ok(())
}

fn all<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    name: &'static str,
) -> Result<Vec<T>, StoreError> {
    let tx = db.begin_read()?;
    let table = tx.open_table(table)?;
    let mut out = Vec::new();
    for row in table.iter()? {
        let (key, value) = row?;
        out.push(decode(name, key.value(), value.value())?);
    }
    Ok(out)
}

fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        table,
        key: key.to_owned(),
        source,
    })
}

fn encode<T: Serialize>(table: &'static str, key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode {
        table,
        key: key.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> MachineId {
        MachineId::try_from(s).unwrap()
    }

    #[test]
    fn machines_and_log_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            let store = Store::open(&path).unwrap();
            store
                .write(|b| {
                    let mut m = MachineRecord::new(id("pc-01"), 1000);
                    m.hostname = "pc-01.lab".into();
                    b.put_machine(&m)?;
                    b.put_keys(
                        &m.id,
                        &KeyRecord {
                            approved: Some(boottorrent_proto::Bytes([7; 32])),
                            ..KeyRecord::default()
                        },
                    )?;
                    b.log(1000, Some(&m.id), "registered", "first startup")?;
                    b.log(1001, Some(&m.id), "online", "")
                })
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let (m, k) = store.machine(&id("pc-01")).unwrap().unwrap();
        assert_eq!(m.hostname, "pc-01.lab");
        assert_eq!(k.approved, Some(boottorrent_proto::Bytes([7; 32])));
        let log = store.recent_log(10).unwrap();
        assert_eq!(
            log.iter()
                .map(|e| (e.seq, e.kind.as_str()))
                .collect::<Vec<_>>(),
            vec![(1, "registered"), (2, "online")]
        );
        assert!(store.machine(&id("pc-02")).unwrap().is_none());
    }

    #[test]
    fn failed_batch_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb")).unwrap();
        let result: Result<(), StoreError> = store.write(|b| {
            b.put_machine(&MachineRecord::new(id("pc-01"), 1))?;
            Err(StoreError::Corrupt {
                table: "machines",
                key: "x".into(),
                source: serde_json::from_str::<u8>("x").unwrap_err(),
            })
        });
        assert!(result.is_err());
        assert!(store.machines().unwrap().is_empty());
    }

    #[test]
    fn an_unversioned_file_is_migrated_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        // A file as the first releases wrote it: tables, no version.
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(MACHINES)
                .unwrap()
                .insert("pc-01", br#"{"id": "pc-01", "hostname": "old"}"#.as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(
                store.machine(&id("pc-01")).unwrap().unwrap().0.hostname,
                "old"
            );
            assert!(store.deployments().unwrap().is_empty());
        }
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_read().unwrap();
            let meta = tx.open_table(META).unwrap();
            assert_eq!(
                meta.get("schema_version").unwrap().unwrap().value(),
                SCHEMA_VERSION
            );
        }
        // A file from a future release.
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert("schema_version", SCHEMA_VERSION + 1)
                .unwrap();
            tx.commit().unwrap();
        }
        let err = Store::open(&path).err().unwrap().to_string();
        assert!(
            err.contains(&format!("schema version {}", SCHEMA_VERSION + 1)),
            "{err}"
        );
        assert!(err.contains("newer"), "{err}");
    }

    #[test]
    fn second_open_of_the_same_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let _first = Store::open(&path).unwrap();
        let err = Store::open(&path).err().unwrap();
        assert!(err.to_string().contains("db.redb"), "{err}");
    }

    #[test]
    fn the_presence_index_follows_committed_writes_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let online = |name: &str, at: i64| {
            let mut m = MachineRecord::new(id(name), at);
            m.online = true;
            m.last_seen_ms = at;
            m
        };
        {
            let store = Store::open(&path).unwrap();
            store
                .write(|b| {
                    b.put_machine(&online("pc-a", 100))?;
                    b.put_machine(&online("pc-b", 300))?;
                    b.put_machine(&online("pc-c", 200))?;
                    b.put_machine(&MachineRecord::new(id("pc-off"), 50))
                })
                .unwrap();
            assert_eq!(store.online_unheard_since(250), [id("pc-a"), id("pc-c")]);
            // Heard from again, gone offline, deleted.
            store
                .write(|b| {
                    b.put_machine(&online("pc-a", 400))?;
                    let mut c = online("pc-c", 200);
                    c.online = false;
                    b.put_machine(&c)?;
                    b.delete_machine(&id("pc-b"))
                })
                .unwrap();
            assert_eq!(store.online_unheard_since(1000), [id("pc-a")]);
            // A write that fails changes nothing.
            let failed = store.write(|b| {
                b.put_machine(&online("pc-z", 1))?;
                Err::<(), _>(StoreError::TooNew {
                    path: path.clone(),
                    found: 9,
                })
            });
            assert!(failed.is_err());
            assert_eq!(store.online_unheard_since(1000), [id("pc-a")]);
            assert_eq!(store.machine_counts().unwrap(), (3, 1));
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.online_unheard_since(1000), [id("pc-a")]);
        assert!(store.online_unheard_since(400).is_empty());
    }

    #[test]
    fn a_heartbeat_is_kept_in_memory_shown_by_reads_and_written_when_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let mut m = MachineRecord::new(id("pc-a"), 100);
        m.online = true;
        m.last_seq = 1;
        {
            let store = Store::open(&path).unwrap();
            store.write(|b| b.put_machine(&m)).unwrap();
            // Heard at 500 with seq 7: every read shows it, the sweep's index too.
            store
                .write(|b| {
                    let (mut r, _) = b.machine(&id("pc-a"))?.unwrap();
                    r.last_seen_ms = 500;
                    r.last_seq = 7;
                    b.heard(&r)?;
                    // Within the same transaction as well.
                    assert_eq!(b.machine(&id("pc-a"))?.unwrap().0.last_seen_ms, 500);
                    Ok(())
                })
                .unwrap();
            let shown = store.machine(&id("pc-a")).unwrap().unwrap().0;
            assert_eq!((shown.last_seen_ms, shown.last_seq), (500, 7));
            assert_eq!(store.machines().unwrap()[0].0.last_seen_ms, 500);
            let page = store.machines_page(None, 10, |_, _| true).unwrap().0;
            assert_eq!(page[0].0.last_seen_ms, 500);
            assert!(store.online_unheard_since(400).is_empty());
            // A write of anything else carries it.
            store
                .write(|b| {
                    let (mut r, _) = b.machine(&id("pc-a"))?.unwrap();
                    r.hostname = "a".into();
                    b.put_machine(&r)
                })
                .unwrap();
            store
                .write(|b| {
                    let (mut r, _) = b.machine(&id("pc-a"))?.unwrap();
                    r.last_seen_ms = 900;
                    r.last_seq = 9;
                    b.heard(&r)
                })
                .unwrap();
            // Dropped without persisting: a crash.
        }
        {
            let store = Store::open(&path).unwrap();
            let r = store.machine(&id("pc-a")).unwrap().unwrap().0;
            assert_eq!(
                (r.hostname.as_str(), r.last_seen_ms, r.last_seq),
                ("a", 500, 7),
                "the write before the crash kept what was heard before it; the later heartbeat is lost"
            );
            store
                .write(|b| {
                    let (mut r, _) = b.machine(&id("pc-a"))?.unwrap();
                    r.last_seen_ms = 1000;
                    r.last_seq = 10;
                    b.heard(&r)
                })
                .unwrap();
            assert_eq!(store.persist_presence().unwrap(), 1);
            assert_eq!(store.persist_presence().unwrap(), 0, "nothing new to write");
        }
        let store = Store::open(&path).unwrap();
        let r = store.machine(&id("pc-a")).unwrap().unwrap().0;
        assert_eq!((r.last_seen_ms, r.last_seq), (1000, 10));
    }

    #[test]
    fn the_facets_follow_records_and_keys_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let facets = |store: &Store| {
            let mut out = std::collections::BTreeMap::new();
            store.for_each_facets(|id, f| {
                out.insert(id.to_string(), f.clone());
            });
            out
        };
        let zone: ZoneId = "lab".parse().unwrap();
        {
            let store = Store::open(&path).unwrap();
            store
                .write(|b| {
                    // Keys first, as a new machine is trusted before its record is written.
                    b.put_keys(
                        &id("pc-a"),
                        &KeyRecord {
                            approved: Some(PublicKeyBytes::from([1; 32])),
                            ..KeyRecord::default()
                        },
                    )?;
                    assert!(facets(&store).is_empty(), "nothing before the commit");
                    let mut a = MachineRecord::new(id("pc-a"), 1);
                    a.online = true;
                    a.zones = vec![zone.clone()];
                    b.put_machine(&a)?;
                    b.put_machine(&MachineRecord::new(id("pc-b"), 1))?;
                    // Keys without a record are not a machine.
                    b.put_keys(&id("pc-c"), &KeyRecord::default())
                })
                .unwrap();
            let f = facets(&store);
            assert_eq!(f.keys().collect::<Vec<_>>(), ["pc-a", "pc-b"]);
            assert!(f["pc-a"].online && f["pc-a"].keys.approved.is_some());
            assert_eq!(f["pc-a"].zones, std::slice::from_ref(&zone));
            store
                .write(|b| {
                    let (mut a, _) = b.machine(&id("pc-a"))?.unwrap();
                    a.online = false;
                    b.put_machine(&a)?;
                    b.delete_machine(&id("pc-b"))
                })
                .unwrap();
            let f = facets(&store);
            assert_eq!(f.keys().collect::<Vec<_>>(), ["pc-a"]);
            assert!(!f["pc-a"].online, "written over");
            assert!(f["pc-a"].keys.approved.is_some(), "the keys stay");
        }
        let store = Store::open(&path).unwrap();
        let f = facets(&store);
        assert_eq!(f.keys().collect::<Vec<_>>(), ["pc-a"]);
        assert_eq!(f["pc-a"].zones, [zone]);
        assert!(f["pc-a"].keys.approved.is_some());
    }

    fn deployment_of(id: &str, machines: &[&str]) -> Deployment {
        let mut d = Deployment::new(
            id.parse().unwrap(),
            crate::server::deployment::ImageRef::sample(),
            crate::api::Target::Global(true),
            crate::api::Action::Stage,
            1000,
        );
        for m in machines {
            d.add_machine(&id_of(m), 100, 1000);
        }
        d
    }

    fn id_of(s: &str) -> MachineId {
        s.parse().unwrap()
    }

    #[test]
    fn a_deployments_machines_are_rows_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb")).unwrap();
        // Ids where one is a prefix of the other, and sorts after it once `/` is appended.
        let mut a = deployment_of("d-1", &["pc-1", "pc-2"]);
        let b = deployment_of("d-1-2", &["pc-3"]);
        store
            .write(|batch| {
                batch.put_deployment(&a)?;
                batch.put_deployment(&b)
            })
            .unwrap();
        assert_eq!(store.deployments().unwrap(), [a.clone(), b.clone()]);
        // One machine moves: its row alone is written, and reads back in place.
        a.machines.get_mut(&id_of("pc-2")).unwrap().bytes_done = 60;
        store
            .write(|batch| batch.put_deployment_machine(&a.id, &a.machines[&id_of("pc-2")]))
            .unwrap();
        assert_eq!(store.deployment(&a.id).unwrap(), Some(a.clone()));
        assert_eq!(store.deployment(&b.id).unwrap(), Some(b.clone()));
        assert_eq!(store.deployments().unwrap(), [a, b]);
    }

    #[test]
    fn a_version_1_database_has_its_deployments_machines_moved_to_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let d = deployment_of("d-7", &["pc-1", "pc-2"]);
        {
            // As version 1 wrote it: the machines inside the deployment's record.
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert("schema_version", 1)
                .unwrap();
            let mut record = serde_json::to_value(&d).unwrap();
            record["machines"] = serde_json::to_value(&d.machines).unwrap();
            tx.open_table(DEPLOYMENTS)
                .unwrap()
                .insert("d-7", serde_json::to_vec(&record).unwrap().as_slice())
                .unwrap();
            tx.open_table(MACHINES).unwrap();
            tx.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.deployments().unwrap(), std::slice::from_ref(&d));
        let tx = store.db.begin_read().unwrap();
        assert_eq!(
            tx.open_table(DEPLOYMENT_MACHINES).unwrap().len().unwrap(),
            2
        );
        let version = tx
            .open_table(META)
            .unwrap()
            .get("schema_version")
            .unwrap()
            .map(|v| v.value());
        assert_eq!(version, Some(SCHEMA_VERSION));
        // The record itself no longer carries them.
        let record = tx.open_table(DEPLOYMENTS).unwrap();
        let record: serde_json::Value =
            serde_json::from_slice(record.get("d-7").unwrap().unwrap().value()).unwrap();
        assert!(record.get("machines").is_none(), "{record}");
    }
}
