//! The machine's store: the one directory on the physical disk that holds what must outlive
//! the image the machine runs — its id and key, the pinned server key, the assignments, the
//! images and their resume records, the boot entries it made.
//!
//! A lab PC boots the image it received, and the agent that starts next is the copy inside
//! that image, with the image's own `%ProgramData%`. If the agent kept its state there, every
//! deployment would bring up a machine with a new key (waiting for approval) that knows
//! nothing of the images on its disk. So the state lives in a store the agent finds again
//! from whichever image it runs:
//!
//! - where `data_dir` is set (always, on Linux sites; `/var/lib/boottorrent` by default) that
//!   directory is the store;
//! - on Windows, by default, the store is `X:\BootTorrent` on the fixed volume that holds
//!   one, found by its marker file ([`MARKER_FILE`]) whatever letter the volume has today:
//!   the host volume is `C:` while the machine runs its installed Windows and another letter
//!   once it boots an image (whose virtual disk becomes `C:`). None found: one is made on the
//!   system volume, which on first install is the host volume.
//!
//! The marker names the machine. It is written once, when the store is made; afterwards the
//! store, not the host name (every machine booting one golden image has the same), says who
//! the machine is.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use boottorrent_proto::MachineId;
use serde::{Deserialize, Serialize};

use crate::config::{Config, KEY_FILE, SERVER_KEY_FILE, sanitize_machine_id};

/// The marker file at the top of a store.
pub const MARKER_FILE: &str = "store.json";

/// The store's directory at the root of a volume, on Windows.
#[cfg_attr(not(windows), allow(dead_code))]
pub const VOLUME_DIR: &str = "BootTorrent";

/// The marker's format version.
const FORMAT: u32 = 1;

/// What the marker file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    /// [`FORMAT`].
    format: u32,
    /// The machine this store belongs to.
    machine_id: MachineId,
    /// Seconds since the Unix epoch when the store was made; for the operator reading it.
    created_unix: u64,
}

/// An open store: where it is and whose it is.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    machine: MachineId,
}

impl Store {
    /// The store this agent uses: `data_dir` when the config sets it, otherwise the
    /// platform's default (on Windows, found by scanning the fixed volumes).
    pub fn locate(config: &Config) -> anyhow::Result<Store> {
        let configured = config.machine_id.as_ref();
        match &config.data_dir {
            Some(dir) => Store::open(dir, configured),
            None => Store::open(&default_store(configured)?, configured),
        }
    }

    /// Opens the store in `dir`, making it (and its marker) when there is none.
    ///
    /// The machine id is the marker's. A store made now takes `configured`, or else the host
    /// name. A `configured` id that differs from the marker's is an error rather than a
    /// silent switch: two ids for one key would make the server see a stranger.
    pub fn open(dir: &Path, configured: Option<&MachineId>) -> anyhow::Result<Store> {
        let marker_path = dir.join(MARKER_FILE);
        let machine = match read_marker(&marker_path)? {
            Some(marker) => {
                if let Some(id) = configured.filter(|id| **id != marker.machine_id) {
                    bail!(
                        "the store {} belongs to machine {:?}, but this agent is configured as \
                         {id:?}: remove machine_id from the configuration (the store keeps the \
                         machine's id), or point data_dir at this machine's own store",
                        dir.display(),
                        marker.machine_id.as_str(),
                    );
                }
                marker.machine_id
            }
            None => {
                let machine = match configured {
                    Some(id) => id.clone(),
                    None => {
                        let host = boottorrent_proto::hostname().context(
                            "finding this machine's host name for its default id; set --machine-id",
                        )?;
                        sanitize_machine_id(&host)
                    }
                };
                let marker = Marker {
                    format: FORMAT,
                    machine_id: machine.clone(),
                    created_unix: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                };
                let bytes = serde_json::to_vec_pretty(&marker).context("encoding the marker")?;
                boottorrent_swarm::storage::write_durably(&marker_path, &bytes).with_context(
                    || {
                        format!(
                            "making the store {}: writing {}",
                            dir.display(),
                            marker_path.display()
                        )
                    },
                )?;
                tracing::info!(store = %dir.display(), machine = %machine, "made this machine's store");
                machine
            }
        };
        Ok(Store {
            dir: dir.to_owned(),
            machine,
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The machine this store belongs to.
    pub fn machine(&self) -> &MachineId {
        &self.machine
    }

    /// The machine's private key.
    pub fn key_file(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    /// The server key as last pinned on this machine.
    pub fn server_key_file(&self) -> PathBuf {
        self.dir.join(SERVER_KEY_FILE)
    }
}

/// The marker at `path`; `None` when there is none. A marker that cannot be read is an error:
/// guessing the machine id would give this machine's key another machine's name.
fn read_marker(path: &Path) -> anyhow::Result<Option<Marker>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("reading the store marker {}", path.display()));
        }
    };
    let marker: Marker = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "the store marker {} is damaged; restore it, or delete it and set machine_id to \
             this machine's id",
            path.display()
        )
    })?;
    if marker.format != FORMAT {
        bail!(
            "the store marker {} has format {}, this agent knows {FORMAT}: use a newer agent",
            path.display(),
            marker.format
        );
    }
    Ok(Some(marker))
}

/// A store found on a volume.
#[derive(Debug, Clone)]
#[cfg_attr(not(windows), allow(dead_code))] // Only Windows scans volumes; tested everywhere.
struct Found {
    dir: PathBuf,
    machine: MachineId,
    /// On the volume Windows runs from: the image's own virtual disk, when the machine
    /// booted one.
    on_system_volume: bool,
}

/// Which found store to use, if any: one of `configured` when set, and of those one off the
/// system volume first. Running an image, the system volume is that image's disk; a store
/// on it came in with the golden image (made where it was built), not from this machine.
#[cfg_attr(not(windows), allow(dead_code))]
fn choose<'a>(found: &'a [Found], configured: Option<&MachineId>) -> Option<&'a Found> {
    let mine = |f: &&Found| configured.is_none_or(|id| f.machine == *id);
    found
        .iter()
        .filter(mine)
        .find(|f| !f.on_system_volume)
        .or_else(|| found.iter().filter(mine).find(|f| f.on_system_volume))
}

/// Where the store is when `data_dir` is not set.
#[cfg(not(windows))]
fn default_store(_configured: Option<&MachineId>) -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from("/var/lib/boottorrent"))
}

/// Where the store is when `data_dir` is not set: found on a fixed volume, or new on the
/// system volume.
#[cfg(windows)]
fn default_store(configured: Option<&MachineId>) -> anyhow::Result<PathBuf> {
    let system = std::env::var("SystemDrive")
        .unwrap_or_else(|_| "C:".to_owned())
        .to_ascii_uppercase();
    let mut found = Vec::new();
    for root in windows::fixed_volumes() {
        let dir = root.join(VOLUME_DIR);
        match read_marker(&dir.join(MARKER_FILE)) {
            Ok(Some(marker)) => found.push(Found {
                on_system_volume: root
                    .to_string_lossy()
                    .to_ascii_uppercase()
                    .starts_with(&system),
                dir,
                machine: marker.machine_id,
            }),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "ignoring a store that cannot be read")
            }
        }
    }
    if let Some(chosen) = choose(&found, configured) {
        if found.len() > 1 {
            tracing::warn!(
                chosen = %chosen.dir.display(),
                found = ?found.iter().map(|f| f.dir.display().to_string()).collect::<Vec<_>>(),
                "more than one store on this machine's volumes"
            );
        }
        return Ok(chosen.dir.clone());
    }
    if !found.is_empty() {
        tracing::warn!(
            found = ?found.iter().map(|f| format!("{} ({})", f.dir.display(), f.machine)).collect::<Vec<_>>(),
            "the stores on this machine's volumes belong to other machines; making a new one"
        );
    }
    Ok(PathBuf::from(format!(r"{system}\{VOLUME_DIR}")))
}

#[cfg(windows)]
mod windows {
    use std::path::PathBuf;

    use windows_sys::Win32::Storage::FileSystem::{GetDriveTypeW, GetLogicalDrives};

    /// `DRIVE_FIXED` from `GetDriveTypeW`: a local disk, not removable, network or optical.
    const DRIVE_FIXED: u32 = 3;

    /// The roots (`C:\`, `D:\`, ...) of the fixed volumes that have a drive letter.
    pub fn fixed_volumes() -> Vec<PathBuf> {
        // SAFETY: no arguments; returns a bit mask of the drive letters in use.
        let mask = unsafe { GetLogicalDrives() };
        (0..26u8)
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| format!("{}:\\", char::from(b'A' + i)))
            .filter(|root| {
                let wide: Vec<u16> = root.encode_utf16().chain(std::iter::once(0)).collect();
                // SAFETY: a NUL-terminated UTF-16 string that outlives the call.
                unsafe { GetDriveTypeW(wide.as_ptr()) == DRIVE_FIXED }
            })
            .map(PathBuf::from)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> MachineId {
        s.parse().unwrap()
    }

    #[test]
    fn a_new_store_takes_the_configured_id_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Some(&id("pc-7"))).unwrap();
        assert_eq!(store.machine(), &id("pc-7"));
        // Another image, no machine id configured, a different host name: the store says.
        let again = Store::open(dir.path(), None).unwrap();
        assert_eq!(again.machine(), &id("pc-7"));
        assert_eq!(again.key_file(), dir.path().join(KEY_FILE));
    }

    #[test]
    fn a_store_refuses_another_machines_id() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path(), Some(&id("pc-7"))).unwrap();
        let e = Store::open(dir.path(), Some(&id("pc-8"))).unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("belongs to machine \"pc-7\""), "{text}");
        assert!(text.contains("remove machine_id"), "{text}");
    }

    #[test]
    fn a_damaged_marker_stops_start_up_and_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MARKER_FILE), b"{\"format\":1,").unwrap();
        let e = Store::open(dir.path(), Some(&id("pc-7"))).unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("is damaged"), "{text}");
        // Not overwritten: the operator may still restore it.
        assert_eq!(
            std::fs::read(dir.path().join(MARKER_FILE)).unwrap(),
            b"{\"format\":1,"
        );
    }

    #[test]
    fn a_store_from_a_newer_agent_is_not_guessed_at() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(MARKER_FILE),
            br#"{"format":2,"machine_id":"pc-7","created_unix":0}"#,
        )
        .unwrap();
        let e = Store::open(dir.path(), None).unwrap_err();
        assert!(format!("{e:#}").contains("format 2"), "{e:#}");
    }

    fn found(dir: &str, machine: &str, on_system_volume: bool) -> Found {
        Found {
            dir: dir.into(),
            machine: id(machine),
            on_system_volume,
        }
    }

    #[test]
    fn the_host_volumes_store_wins_over_one_inside_the_image() {
        // Running an image: C: is the image (its golden was built on "ref-pc"), D: the host.
        let stores = [
            found(r"C:\BootTorrent", "ref-pc", true),
            found(r"D:\BootTorrent", "pc-7", false),
        ];
        assert_eq!(
            choose(&stores, None).unwrap().dir,
            Path::new(r"D:\BootTorrent")
        );
        // Running the installed Windows: its one store is on the system volume.
        let stores = [found(r"C:\BootTorrent", "pc-7", true)];
        assert_eq!(
            choose(&stores, None).unwrap().dir,
            Path::new(r"C:\BootTorrent")
        );
        assert!(choose(&[], None).is_none());
    }

    #[test]
    fn a_configured_id_picks_its_own_store_only() {
        let stores = [
            found(r"C:\BootTorrent", "pc-7", true),
            found(r"E:\BootTorrent", "pc-9", false),
        ];
        assert_eq!(
            choose(&stores, Some(&id("pc-7"))).unwrap().dir,
            Path::new(r"C:\BootTorrent")
        );
        assert!(choose(&stores, Some(&id("pc-1"))).is_none());
    }
}
