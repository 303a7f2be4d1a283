//! Which image this machine runs now, as the agent started inside it can tell.
//!
//! A `reboot` deployment is done when the machine runs the image, not when the boot backend
//! returned: the boot may fail, or the machine may come back in its old system. The server
//! learns what runs from the `running` field of every `startup` ([`determine`]), and decides.
//!
//! Before a boot backend runs for `set-boot` or `reboot`, the agent records in the store
//! what it is about to boot ([`record`]: image, deployment, the file booted). The store
//! outlives the image switch, so the agent that starts inside the new system finds the record
//! and learns the deployment; what it runs it finds out by a means of the backend:
//!
//! - `windows`: the boot device of `{current}` (`bcdedit /enum {current}`: `osdevice
//!   vhd=[X:]\path`). Its path is compared with the recorded files without the drive letter,
//!   which differs between the host system (`C:`) and a booted image (where the host volume
//!   gets another letter), case-insensitively as NTFS compares names.
//! - `command`: `running_image_file`, a file inside the running system that holds the image
//!   id and, on its second line, the file booted. The site's boot program writes
//!   `$BOOTTORRENT_IMAGE_ID` and `$BOOTTORRENT_IMAGE_PATH` there in the system it boots (or
//!   the image carries the id); the agent only reads it. A missing file means the machine runs
//!   no image BootTorrent booted. Without the second line the agent knows the image but not
//!   which of its boot children runs, which a `reset` image needs (see [`crate::child`]).
//! - `none`: nothing is ever booted; the agent reports none.

use std::path::{Path, PathBuf};

use anyhow::Context;
use boottorrent_proto::{DeploymentId, ImageId, RunningImage};
use serde::{Deserialize, Serialize};

use crate::boot::Backend;

/// The record of what was booted, in the store.
pub const BOOTS_FILE: &str = "boots.json";

/// The record's format version.
const FORMAT: u32 = 1;

/// Records kept; older ones go first. One per image, so this bounds the images remembered.
const KEEP: usize = 32;

/// How long `bcdedit /enum {current}` may run.
#[cfg(windows)]
const BCDEDIT_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// What this machine runs: the image as `startup` tells it, and the file booted when the
/// backend can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub image: RunningImage,
    pub path: Option<PathBuf>,
}

/// One boot the agent asked a backend for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootRecord {
    /// The image booted.
    pub image: ImageId,
    /// The deployment that asked for it.
    pub deployment: DeploymentId,
    /// The file the backend was given to boot.
    pub path: PathBuf,
    /// Seconds since the Unix epoch when the backend was run; for the operator.
    pub at_unix: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct BootsFile {
    format: u32,
    /// Oldest first.
    boots: Vec<BootRecord>,
}

/// Records, before a backend runs, that `image` of `deployment` is booted from `path`. It
/// replaces an earlier record of the same image and file; a record of another file of the
/// image stays (a `reset` image alternates between two children, and the one running must
/// still be recognised after the next one is recorded).
pub fn record(
    store: &Path,
    image: &ImageId,
    deployment: &DeploymentId,
    path: &Path,
) -> anyhow::Result<()> {
    let mut boots = recorded(store);
    boots.retain(|b| b.image != *image || b.path != path);
    boots.push(BootRecord {
        image: image.clone(),
        deployment: deployment.clone(),
        path: path.to_owned(),
        at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });
    let excess = boots.len().saturating_sub(KEEP);
    boots.drain(..excess);
    let file = store.join(BOOTS_FILE);
    let bytes = serde_json::to_vec_pretty(&BootsFile {
        format: FORMAT,
        boots,
    })
    .context("encoding the boot record")?;
    boottorrent_swarm::storage::write_durably(&file, &bytes)
        .with_context(|| format!("writing the boot record {}", file.display()))
}

/// The boots recorded in `store`, oldest first. A damaged record is logged and read as none:
/// it only costs the deployment name in the report, never the start.
pub fn recorded(store: &Path) -> Vec<BootRecord> {
    let file = store.join(BOOTS_FILE);
    let bytes = match std::fs::read(&file) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(file = %file.display(), "cannot read the boot record: {e}; treating it as empty");
            return Vec::new();
        }
    };
    match serde_json::from_slice::<BootsFile>(&bytes) {
        Ok(f) if f.format == FORMAT => f.boots,
        Ok(f) => {
            tracing::warn!(file = %file.display(), format = f.format, "the boot record has a format this agent does not know; treating it as empty");
            Vec::new()
        }
        Err(e) => {
            tracing::warn!(file = %file.display(), "the boot record is damaged ({e}); treating it as empty");
            Vec::new()
        }
    }
}

/// The file most recently recorded as booted for `image`: what its boot entry points at.
pub fn newest_path(store: &Path, image: &ImageId) -> Option<PathBuf> {
    recorded(store)
        .into_iter()
        .rev()
        .find(|b| b.image == *image)
        .map(|b| b.path)
}

/// What this machine runs, by the means of `backend` (see the module docs). Logs what it
/// found and why, since an operator reading a failed deployment asks exactly that.
pub async fn determine(
    backend: &Backend,
    running_image_file: Option<&Path>,
    store: &Path,
) -> Option<Running> {
    let boots = recorded(store);
    match backend {
        Backend::None => None,
        Backend::Command { .. } => {
            let Some(file) = running_image_file else {
                tracing::info!(
                    "running_image_file is not set, so this agent cannot tell which image runs; \
                     reboot deployments will not see this machine come back in the image"
                );
                return None;
            };
            let text = match std::fs::read_to_string(file) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::info!(file = %file.display(), "running no image BootTorrent booted (running_image_file is absent)");
                    return None;
                }
                Err(e) => {
                    tracing::warn!(file = %file.display(), "cannot read running_image_file: {e}; reporting no running image");
                    return None;
                }
            };
            match parse_marker(&text) {
                Ok((image, path)) => Some(Running {
                    image: found(image, &boots, &format!("{}", file.display())),
                    path,
                }),
                Err(e) => {
                    tracing::warn!(file = %file.display(), "running_image_file {e}; reporting no running image");
                    None
                }
            }
        }
        Backend::Windows { .. } => windows_current(&boots).await,
    }
}

/// The running image with the deployment of its newest record, logged.
fn found(image: ImageId, boots: &[BootRecord], source: &str) -> RunningImage {
    let deployment = boots
        .iter()
        .rev()
        .find(|b| b.image == image)
        .map(|b| b.deployment.clone());
    match &deployment {
        Some(d) => tracing::info!(%image, deployment = %d, source, "running image"),
        None => {
            tracing::info!(%image, source, "running image (booted by no deployment this store recorded)")
        }
    }
    RunningImage { image, deployment }
}

/// The image id in a marker file, its first non-empty line, and the file booted, its second
/// if there is one; trimmed.
pub fn parse_marker(text: &str) -> Result<(ImageId, Option<PathBuf>), String> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let Some(line) = lines.next() else {
        return Err("is empty: write the image id (BOOTTORRENT_IMAGE_ID) into it".into());
    };
    let image = line.parse().map_err(|e| {
        let shown: String = line.chars().take(80).collect();
        format!("holds {shown:?}, which is not an image id ({e})")
    })?;
    Ok((image, lines.next().map(PathBuf::from)))
}

#[cfg(windows)]
async fn windows_current(boots: &[BootRecord]) -> Option<Running> {
    let run = tokio::process::Command::new("bcdedit")
        .args(["/enum", "{current}"])
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(BCDEDIT_TIME_LIMIT, run).await {
        Ok(Ok(o)) if o.status.success() => o,
        Ok(Ok(o)) => {
            tracing::warn!(status = %o.status, output = %String::from_utf8_lossy(&o.stdout), "bcdedit /enum {{current}} failed; reporting no running image");
            return None;
        }
        Ok(Err(e)) => {
            tracing::warn!("cannot run bcdedit /enum {{current}}: {e}; reporting no running image");
            return None;
        }
        Err(_) => {
            tracing::warn!(
                "bcdedit /enum {{current}} did not finish in time; reporting no running image"
            );
            return None;
        }
    };
    match_current(&String::from_utf8_lossy(&output.stdout), boots)
}

#[cfg(not(windows))]
async fn windows_current(_boots: &[BootRecord]) -> Option<Running> {
    tracing::warn!(
        "boot_backend \"windows\" reads bcdedit, which runs only on Windows; reporting no running image"
    );
    None
}

/// The running image from `bcdedit /enum {current}` output and the recorded boots: the
/// record whose file is the current boot device. `None` when the system does not boot from
/// a VHD, or from one no record names (each logged).
#[cfg_attr(not(windows), allow(dead_code))] // Windows runs it; tested everywhere.
pub fn match_current(bcdedit: &str, boots: &[BootRecord]) -> Option<Running> {
    let Some(device) = current_vhd(bcdedit) else {
        tracing::info!(
            "running no image BootTorrent booted ({{current}} does not boot from a VHD)"
        );
        return None;
    };
    let hit = boots
        .iter()
        .rev()
        .find(|b| same_file(&b.path.to_string_lossy(), &device));
    match hit {
        Some(b) => Some(Running {
            image: found(b.image.clone(), boots, &format!("boot device {device}")),
            path: Some(b.path.clone()),
        }),
        None => {
            tracing::info!(
                device,
                "running a VHD BootTorrent did not boot (no boot record names it)"
            );
            None
        }
    }
}

/// The file of `{current}`'s VHD boot device in `bcdedit /enum {current}` output, without
/// its partition (`vhd=[C:]\x.vhdx` gives `\x.vhdx`); `osdevice` first, since that is what
/// the running system was loaded from. `None` for a device that is not a VHD.
pub fn current_vhd(bcdedit: &str) -> Option<String> {
    let value = |name: &str| {
        bcdedit.lines().find_map(|line| {
            let mut parts = line.trim().splitn(2, char::is_whitespace);
            let key = parts.next()?;
            key.eq_ignore_ascii_case(name)
                .then(|| parts.next().unwrap_or("").trim().to_owned())
        })
    };
    let device = value("osdevice").or_else(|| value("device"))?;
    let vhd = device
        .strip_prefix("vhd=")
        .or_else(|| device.strip_prefix("VHD="))?;
    // `[C:]\path`, `[locate]\path` or `[\Device\HarddiskVolume3]\path`: the partition in
    // brackets, then the file.
    let file = match vhd.strip_prefix('[') {
        Some(rest) => rest.split_once(']')?.1,
        None => vhd,
    };
    // bcdedit may follow the path with `,locate=custom:...`.
    let file = file.split(',').next().unwrap_or(file).trim();
    (!file.is_empty()).then(|| file.to_owned())
}

/// Whether a recorded path (`C:\BootTorrent\x.vhdx`, maybe `\\?\`-prefixed) names the same
/// file as a boot device's path (`\BootTorrent\x.vhdx`): the same path below the volume,
/// whatever letter the volume has now, compared case-insensitively.
fn same_file(recorded: &str, device: &str) -> bool {
    let below_volume = |p: &str| -> String {
        let p = p.strip_prefix(r"\\?\").unwrap_or(p);
        let p = match p.as_bytes() {
            [letter, b':', ..] if letter.is_ascii_alphabetic() => &p[2..],
            _ => p,
        };
        p.replace('/', "\\").to_lowercase()
    };
    below_volume(recorded) == below_volume(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `bcdedit /enum {current}` prints in a system booted from a VHD; shaped like the
    /// output of Windows 11, with the drive letter the host volume has inside the image.
    const BOOTED_FROM_VHD: &str = "\r\n\
Windows Boot Loader\r\n\
-------------------\r\n\
identifier              {current}\r\n\
device                  vhd=[D:]\\BootTorrent\\images\\Win11 Lab.vhdx,locate=custom:12000002\r\n\
path                    \\Windows\\system32\\winload.efi\r\n\
description             BootTorrent: Win11 Lab\r\n\
locale                  en-US\r\n\
osdevice                vhd=[D:]\\BootTorrent\\images\\Win11 Lab.vhdx,locate=custom:22000002\r\n\
systemroot              \\Windows\r\n\
resumeobject            {2bd08882-0f8f-11e9-94b6-0002c9af6b7c}\r\n\
nx                      OptIn\r\n";

    /// The same in the machine's installed system.
    const INSTALLED_SYSTEM: &str = "\
Windows Boot Loader
-------------------
identifier              {current}
device                  partition=C:
path                    \\Windows\\system32\\winload.efi
description             Windows 11
osdevice                partition=C:
systemroot              \\Windows
";

    fn boot(image: &str, deployment: &str, path: &str) -> BootRecord {
        BootRecord {
            image: image.parse().unwrap(),
            deployment: deployment.parse().unwrap(),
            path: path.into(),
            at_unix: 0,
        }
    }

    #[test]
    fn the_vhd_of_current_is_read_without_its_partition() {
        assert_eq!(
            current_vhd(BOOTED_FROM_VHD).as_deref(),
            Some(r"\BootTorrent\images\Win11 Lab.vhdx")
        );
        assert_eq!(current_vhd(INSTALLED_SYSTEM), None);
        assert_eq!(
            current_vhd("osdevice vhd=[locate]\\x.vhdx\n").as_deref(),
            Some(r"\x.vhdx")
        );
        assert_eq!(current_vhd(""), None);
        assert_eq!(
            current_vhd("osdevice vhd=[C:\n"),
            None,
            "no closing bracket"
        );
        assert_eq!(current_vhd("osdevice\n"), None);
    }

    #[test]
    fn the_booted_vhd_is_matched_to_its_record_whatever_the_drive_letter() {
        let boots = [
            boot("old", "d-1", r"C:\BootTorrent\images\old.vhdx"),
            boot("win11", "d-2", r"C:\BootTorrent\images\win11 lab.VHDX"),
        ];
        assert_eq!(
            match_current(BOOTED_FROM_VHD, &boots),
            Some(Running {
                image: RunningImage {
                    image: "win11".parse().unwrap(),
                    deployment: Some("d-2".parse().unwrap()),
                },
                path: Some(r"C:\BootTorrent\images\win11 lab.VHDX".into()),
            })
        );
        assert_eq!(match_current(INSTALLED_SYSTEM, &boots), None);
        assert_eq!(match_current(BOOTED_FROM_VHD, &boots[..1]), None);
        assert!(same_file(r"\\?\E:\a\b.vhdx", r"\A\B.vhdx"));
        assert!(!same_file(r"E:\a\b.vhdx", r"\a\c.vhdx"));
    }

    #[test]
    fn a_marker_holds_an_image_id_and_maybe_the_file_booted() {
        assert_eq!(
            parse_marker("\n  win11 \n").unwrap(),
            ("win11".parse().unwrap(), None)
        );
        assert_eq!(
            parse_marker("win11\n/store/children/win11.2.vhdx\n").unwrap(),
            (
                "win11".parse().unwrap(),
                Some("/store/children/win11.2.vhdx".into())
            )
        );
        assert!(parse_marker(" \n").unwrap_err().contains("empty"));
        let err = parse_marker("not an id!").unwrap_err();
        assert!(err.contains("not an id!"), "{err}");
    }

    #[tokio::test]
    async fn records_survive_and_name_the_deployment_of_the_marked_image() {
        let store = tempfile::tempdir().unwrap();
        let marker = store.path().join("running-image");
        let backend = Backend::Command {
            program: "/bin/true".into(),
        };
        assert_eq!(
            determine(&backend, Some(&marker), store.path()).await,
            None,
            "no marker: nothing booted"
        );
        let img: ImageId = "img-a".parse().unwrap();
        record(store.path(), &img, &"d-1".parse().unwrap(), Path::new("/a")).unwrap();
        record(store.path(), &img, &"d-2".parse().unwrap(), Path::new("/a")).unwrap();
        assert_eq!(
            recorded(store.path()).len(),
            1,
            "one record per image and file"
        );
        std::fs::write(&marker, "img-a\n").unwrap();
        assert_eq!(
            determine(&backend, Some(&marker), store.path()).await,
            Some(Running {
                image: RunningImage {
                    image: img.clone(),
                    deployment: Some("d-2".parse().unwrap()),
                },
                path: None,
            })
        );
        // The next child of a `reset` image is recorded beside the running one.
        record(store.path(), &img, &"d-2".parse().unwrap(), Path::new("/b")).unwrap();
        assert_eq!(recorded(store.path()).len(), 2);
        assert_eq!(newest_path(store.path(), &img), Some("/b".into()));
        std::fs::write(&marker, "img-b").unwrap();
        assert_eq!(
            determine(&backend, Some(&marker), store.path())
                .await
                .map(|r| (r.image.image.to_string(), r.image.deployment)),
            Some(("img-b".into(), None))
        );
        assert_eq!(determine(&backend, None, store.path()).await, None);
        std::fs::write(store.path().join(BOOTS_FILE), "{").unwrap();
        assert!(recorded(store.path()).is_empty(), "damaged: read as none");
    }
}
