//! What a machine boots: never the golden image itself, but a differencing child of it.
//!
//! The golden image is what the swarm verified and keeps seeding: if Windows booted it and
//! wrote into it, its pieces would stop matching the torrent and the image could never be
//! reset. So before a boot step the agent makes `<store>/children/<image>.vhdx`, a
//! differencing VHDX whose parent is the golden (MS-VHDX parent locator and data write GUID
//! linkage, written by [`boottorrent_vhdx::create_child`]), and the backends boot that.
//! Windows writes only into the child; the golden stays byte for byte what the swarm serves.
//!
//! What becomes of the booted system's writes is the deployment's `persistence`:
//!
//! - `keep`: one child, `<image>.vhdx`, kept across reboots and deployments of the same image:
//!   a later deployment re-uses it while its linkage to the golden holds, and makes a new one
//!   when it does not (a re-downloaded golden has a new data write GUID).
//! - `reset`: a fresh child for every boot, so every boot starts from the golden. The child
//!   the machine runs cannot be replaced while it runs (Windows holds its boot disk open), so
//!   a `reset` image has two, `<image>.vhdx` and `<image>.2.vhdx`: the agent started inside
//!   one makes the other anew and points the boot entry at it ([`next_slot`]), with nothing
//!   running outside Windows.
//!
//! An image that is not a VHDX (a Linux site's raw or squashfs image with the `command`
//! backend) is booted as it is.
//!
//! Room first: a booted child can grow to the image's whole virtual size, so the boot step is
//! refused, before anything is changed, unless the store's volume has that much free beyond
//! the reserve.

use std::path::{Path, PathBuf};

use boottorrent_proto::{ImageId, Persistence};
use boottorrent_vhdx::{ParentLocator, VhdxError};

/// The directory of the children in the store.
pub const CHILDREN_DIR: &str = "children";

/// What to boot for a staged image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootable {
    /// The file the boot entry (or the site's program) boots.
    pub path: PathBuf,
    /// The golden image it reads through, when `path` is a child.
    pub parent: Option<PathBuf>,
    /// The name of its boot entry ([`entries`]).
    pub entry: String,
}

/// Why an image cannot be booted; the message is the `boot` event's.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// The store's volume has no room for the child to grow to the image's size.
    #[error(
        "not enough room to boot image {image}: once booted it may grow to {needed} bytes \
         (its virtual size {virtual_size} plus the {reserve} byte reserve), and the store's \
         volume {dir} has {free} bytes free; free some space or lower disk_reserve_bytes"
    )]
    NoRoom {
        image: ImageId,
        dir: PathBuf,
        virtual_size: u64,
        reserve: u64,
        needed: u64,
        free: u64,
    },
    /// The golden image or the child could not be read or made.
    #[error("preparing the boot child of image {image}: {source}")]
    Vhdx {
        image: ImageId,
        #[source]
        source: Box<VhdxError>,
    },
    /// The locator's paths could not be formed from the image's path.
    #[error("preparing the boot child of image {image}: {reason}")]
    Locator { image: ImageId, reason: String },
}

/// The two files a child of `image` may be: the first is `keep`'s, and `reset` alternates.
pub fn slots(store: &Path, image: &ImageId) -> [PathBuf; 2] {
    let children = store.join(CHILDREN_DIR);
    [
        children.join(format!("{image}.vhdx")),
        children.join(format!("{image}.2.vhdx")),
    ]
}

/// The names of the boot entries of an image's children, in the order of [`slots`]. A
/// `reset` image has an entry per child, so that the entry a machine booted from keeps naming
/// the file it runs (which [`crate::running`] reads back from `bcdedit /enum {current}`) after
/// the agent points the next boot at the other child.
pub fn entries(image: &ImageId) -> [String; 2] {
    [image.to_string(), format!("{image}.2")]
}

/// The child to make for the next boot of a `reset` image while the machine runs `running`:
/// the slot it does not run from.
pub fn next_slot(store: &Path, image: &ImageId, running: Option<&Path>) -> PathBuf {
    let [first, second] = slots(store, image);
    if running == Some(first.as_path()) {
        second
    } else {
        first
    }
}

/// The child of `golden` to boot, after checking room for it: for `keep`, the image's one
/// child, made if missing or stale; for `reset`, a fresh child in the slot the machine does
/// not run from (`running`, the file booted now, if known). `free` reports the free bytes of
/// the store's volume (a parameter so tests can set it).
pub fn prepare(
    store: &Path,
    image: &ImageId,
    golden: &Path,
    persistence: Persistence,
    running: Option<&Path>,
    reserve: u64,
    free: impl FnOnce(&Path) -> std::io::Result<u64>,
) -> Result<Bootable, ChildError> {
    let is_vhdx = golden
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("vhdx"));
    if !is_vhdx {
        return Ok(Bootable {
            path: golden.to_owned(),
            parent: None,
            entry: image.to_string(),
        });
    }
    let vhdx_error = |source| ChildError::Vhdx {
        image: image.clone(),
        source: Box::new(source),
    };
    let info = boottorrent_vhdx::inspect(golden).map_err(vhdx_error)?;
    let children = store.join(CHILDREN_DIR);
    let (child, current) = match persistence {
        Persistence::Keep => {
            let [child, _] = slots(store, image);
            let current = child.exists()
                && boottorrent_vhdx::inspect_child(&child, golden)
                    .inspect_err(|e| tracing::info!(%image, "making a new boot child: {e}"))
                    .is_ok();
            (child, current)
        }
        Persistence::Reset => (next_slot(store, image, running), false),
    };
    // What the child holds already counts as used; what it may still grow by must be free. A
    // child about to be replaced frees what it holds.
    let held = std::fs::metadata(&child).map_or(0, |m| m.len());
    let needed = info.virtual_size.saturating_sub(held) + reserve;
    if let Ok(free) = free(store)
        && free < needed
    {
        return Err(ChildError::NoRoom {
            image: image.clone(),
            dir: store.to_owned(),
            virtual_size: info.virtual_size,
            reserve,
            needed,
            free,
        });
    }
    if !current {
        std::fs::create_dir_all(&children).map_err(|e| ChildError::Locator {
            image: image.clone(),
            reason: format!("creating {}: {e}", children.display()),
        })?;
        if child.exists() {
            std::fs::remove_file(&child).map_err(|e| ChildError::Locator {
                image: image.clone(),
                reason: format!("removing the old child {}: {e}", child.display()),
            })?;
        }
        let locator = locator(golden, &child).map_err(|reason| ChildError::Locator {
            image: image.clone(),
            reason,
        })?;
        boottorrent_vhdx::create_child(golden, &child, &locator).map_err(vhdx_error)?;
        tracing::info!(%image, child = %child.display(), parent = %golden.display(), "made the boot child");
    }
    let [_, second] = slots(store, image);
    let [first_entry, second_entry] = entries(image);
    Ok(Bootable {
        entry: if child == second {
            second_entry
        } else {
            first_entry
        },
        path: child,
        parent: Some(golden.to_owned()),
    })
}

/// Deletes the boot children of `image`, if any: its golden is gone, so they could not boot.
pub fn remove(store: &Path, image: &ImageId) {
    for child in slots(store, image) {
        match std::fs::remove_file(&child) {
            Ok(()) => tracing::info!(%image, child = %child.display(), "deleted the boot child"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(%image, child = %child.display(), "deleting the boot child: {e}")
            }
        }
    }
}

/// How the child names its parent. On Windows, the absolute path and the path from the
/// child's directory; elsewhere (a Linux site's store) only the relative path, in the
/// format's Windows spelling, since a Linux path is no `absolute_win32_path`.
fn locator(golden: &Path, child: &Path) -> Result<ParentLocator, String> {
    let absolute = |p: &Path| {
        std::path::absolute(p)
            .map_err(|e| format!("resolving {}: {e}", p.display()))
            .and_then(|p| {
                p.to_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{} is not valid Unicode", p.display()))
            })
    };
    if cfg!(windows) {
        return ParentLocator::from_windows_paths(&absolute(golden)?, &absolute(child)?)
            .map_err(|e| e.to_string());
    }
    let name = golden
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{} has no valid file name", golden.display()))?;
    let relative = if golden.parent() == child.parent() {
        format!(".\\{name}")
    } else {
        // The store's layout: children/ and images/ side by side.
        format!("..\\images\\{name}")
    };
    ParentLocator::new(Some(&relative), None, None).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP: Persistence = Persistence::Keep;

    fn id(s: &str) -> ImageId {
        s.parse().unwrap()
    }

    /// A golden made by qemu-img in `<store>/images`, as the swarm leaves it.
    fn golden(store: &Path, size: &str) -> PathBuf {
        let images = store.join("images");
        std::fs::create_dir_all(&images).unwrap();
        let path = images.join("golden.vhdx");
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "vhdx"])
            .arg(&path)
            .arg(size)
            .output()
            .expect("qemu-img is not installed (package qemu-utils); run scripts/test");
        assert!(out.status.success(), "{out:?}");
        path
    }

    #[test]
    fn a_vhdx_is_booted_through_a_child_that_is_kept_while_its_parent_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path();
        let golden = golden(store, "64M");
        let before = std::fs::read(&golden).unwrap();
        let plenty = |_: &Path| Ok(u64::MAX);
        let first = prepare(store, &id("img-1"), &golden, KEEP, None, 0, plenty).unwrap();
        assert_eq!(first.path, store.join("children/img-1.vhdx"));
        assert_eq!(first.parent.as_deref(), Some(golden.as_path()));
        boottorrent_vhdx::inspect_child(&first.path, &golden).unwrap();
        // The golden is untouched: it is still what the swarm verified.
        assert_eq!(std::fs::read(&golden).unwrap(), before);
        // Written into, the child is kept by the next deployment of the same image.
        let marker = std::fs::metadata(&first.path).unwrap().modified().unwrap();
        let again = prepare(store, &id("img-1"), &golden, KEEP, None, 0, plenty).unwrap();
        assert_eq!(again, first);
        assert_eq!(
            std::fs::metadata(&again.path).unwrap().modified().unwrap(),
            marker
        );
        remove(store, &id("img-1"));
        assert!(!first.path.exists());
    }

    #[test]
    fn a_child_of_another_golden_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path();
        let old = golden(store, "64M");
        let plenty = |_: &Path| Ok(u64::MAX);
        prepare(store, &id("img-1"), &old, KEEP, None, 0, plenty).unwrap();
        // The image downloaded again: a new golden with a new data write GUID.
        std::fs::remove_file(&old).unwrap();
        let new = golden(store, "64M");
        let child = prepare(store, &id("img-1"), &new, KEEP, None, 0, plenty).unwrap();
        boottorrent_vhdx::inspect_child(&child.path, &new).unwrap();
    }

    #[test]
    fn no_room_for_the_image_to_grow_is_refused_before_anything_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path();
        let golden = golden(store, "1G");
        let e = prepare(store, &id("img-1"), &golden, KEEP, None, 256 << 20, |_| {
            Ok(1 << 30)
        })
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("not enough room to boot image img-1"),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} bytes", (1u64 << 30) + (256 << 20))),
            "{text}"
        );
        assert!(!store.join(CHILDREN_DIR).join("img-1.vhdx").exists());
        // Just enough: booted.
        prepare(store, &id("img-1"), &golden, KEEP, None, 256 << 20, |_| {
            Ok((1 << 30) + (256 << 20))
        })
        .unwrap();
    }

    #[test]
    fn an_image_that_is_not_a_vhdx_is_booted_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rootfs.squashfs");
        std::fs::write(&path, b"not a disk").unwrap();
        let b = prepare(dir.path(), &id("img-2"), &path, KEEP, None, 0, |_| Ok(0)).unwrap();
        assert_eq!(
            b,
            Bootable {
                path,
                parent: None,
                entry: "img-2".into()
            }
        );
    }

    #[test]
    fn a_reset_image_gets_a_fresh_child_in_the_slot_it_does_not_run_from() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path();
        let golden = golden(store, "64M");
        let plenty = |_: &Path| Ok(u64::MAX);
        let reset = Persistence::Reset;
        let [first, second] = slots(store, &id("img-1"));
        // Not running the image: the first slot.
        let boot1 = prepare(store, &id("img-1"), &golden, reset, None, 0, plenty).unwrap();
        assert_eq!(boot1.path, first);
        let fresh_len = std::fs::metadata(&first).unwrap().len();
        // The booted system writes into it.
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&first)
                .unwrap();
            f.write_all(&[7; 1 << 20]).unwrap();
        }
        // Running from the first, the next boot gets the second, new.
        let boot2 = prepare(store, &id("img-1"), &golden, reset, Some(&first), 0, plenty).unwrap();
        assert_eq!(boot2.path, second);
        assert_eq!(boot2.entry, "img-1.2", "each child has its own boot entry");
        boottorrent_vhdx::inspect_child(&second, &golden).unwrap();
        // Running from the second, the first is made anew: what the system wrote is gone.
        let boot3 = prepare(
            store,
            &id("img-1"),
            &golden,
            reset,
            Some(&second),
            0,
            plenty,
        )
        .unwrap();
        assert_eq!(boot3.path, first);
        assert_eq!(boot3.entry, "img-1");
        assert_eq!(std::fs::metadata(&first).unwrap().len(), fresh_len);
        boottorrent_vhdx::inspect_child(&first, &golden).unwrap();
        // The golden's children go with it, both of them.
        remove(store, &id("img-1"));
        assert!(!first.exists() && !second.exists());
    }
}
