//! Differencing children of a golden image (MS-VHDX 1.0).
//!
//! A machine boots a child whose parent is the golden image the swarm downloaded: Windows
//! writes into the child, reads what it did not write from the parent, and the golden stays
//! byte for byte what the machine seeds. A new child holds no data: every payload entry of the
//! block allocation table is NOT_PRESENT, which for a differencing disk means "read the
//! parent", and every sector bitmap (one per chunk of the BAT) is present and all zero, which
//! says the same sector by sector. The format allows the bitmaps to be NOT_PRESENT as well, but
//! libvhdi (Debian's 20210425 and its 20251119 source alike) reads a bitmap at the offset its
//! entry holds whatever the entry's state, so for a NOT_PRESENT entry it takes the file's first
//! bytes (`vhdxfile`, the creator) for a bitmap and returns the wrong data. A present zero
//! bitmap costs 1 MiB per 4 GiB of disk (512-byte sectors; per 32 GiB with 4096-byte ones),
//! left unwritten (sparse where the file system allows).
//!
//! What ties the child to its parent is the locator's `parent_linkage`, the parent's
//! `DataWriteGuid` when the child was made: any change to the parent's data changes that GUID,
//! and a reader that checks the linkage (Windows, libvhdi, [`inspect_child`]) then refuses the
//! child rather than mix its blocks with different data.
//!
//! The file this module writes, in the order of the format's layout:
//!
//! | offset     | length         | what                                                   |
//! |------------|----------------|--------------------------------------------------------|
//! | 0          | 64 KiB         | file type identifier `vhdxfile` and the creator        |
//! | 64, 128 KiB| 4 KiB each     | two identical headers (sequence 1 and 2), CRC-32C      |
//! | 192, 256 KiB | 64 KiB each  | two identical region tables: BAT and metadata          |
//! | 1 MiB      | 1 MiB          | the log, empty (`LogGuid` is zero: nothing to replay)  |
//! | 2 MiB      | 1 MiB          | metadata: table, then the items                        |
//! | 3 MiB      | whole MiBs     | BAT: payload entries zero, bitmap entries present      |
//! | after BAT  | 1 MiB a chunk  | the sector bitmaps, all zero                           |

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::guid::Guid;
use crate::inspect::{
    BAT_REGION, FILE_PARAMETERS, HEADER_LEN, HEADER_OFFSETS, LOGICAL_SECTOR_SIZE, METADATA_REGION,
    METADATA_TABLE_LEN, MIB, PAGE_83_DATA, PARENT_LOCATOR, PHYSICAL_SECTOR_SIZE, REGION_TABLE_LEN,
    REGION_TABLE_OFFSETS, VIRTUAL_DISK_SIZE, VhdxError, VhdxInfo, crc32c, examine,
};
use crate::locator::{self, ParentLocator};

const LOG_OFFSET: u64 = MIB;
const LOG_LEN: u64 = MIB;
const METADATA_OFFSET: u64 = 2 * MIB;
const METADATA_LEN: u64 = MIB;
const BAT_OFFSET: u64 = 3 * MIB;

/// Metadata entry flags.
const IS_VIRTUAL_DISK: u32 = 0b010;
const IS_REQUIRED: u32 = 0b100;
/// BAT state of a sector bitmap block stored in the file.
const SB_BLOCK_PRESENT: u64 = 6;
/// File parameters flag: this disk has a parent.
const HAS_PARENT: u32 = 0b10;

/// A valid differencing child and what ties it to its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildInfo {
    /// The child as a VHDX file (its virtual size is its parent's).
    pub info: VhdxInfo,
    /// The parent's `DataWriteGuid` when the child was made; it matched the parent checked.
    pub parent_linkage: Guid,
    /// Every key/value pair of the child's parent locator, in file order.
    pub locator: Vec<(String, String)>,
}

impl ChildInfo {
    /// A locator value by key, such as `relative_path`.
    pub fn locator_value(&self, key: &str) -> Option<&str> {
        self.locator
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Writes a new differencing VHDX at `child` whose parent is the VHDX at `parent`, found by
/// readers through `locator`. The parent must be valid and closed cleanly; it is only read. The
/// child gets the parent's geometry and block size, fresh write GUIDs and virtual disk id, and
/// holds no data. It is written to a temporary file beside `child`, checked with
/// [`inspect_child`], and renamed into place: a crash leaves either no child or a whole one. An
/// existing file at `child` is never replaced.
pub fn create_child(
    parent: &Path,
    child: &Path,
    locator: &ParentLocator,
) -> Result<ChildInfo, VhdxError> {
    let examined = examine(parent)?;
    if examined.log_pending {
        return Err(VhdxError::UnusableParent {
            path: parent.to_owned(),
            reason: "its log holds changes not yet applied, so its data is not final; a parent \
                     must have been closed cleanly"
                .to_owned(),
        });
    }
    let parent_info = examined.info;
    if child.exists() {
        return Err(VhdxError::ChildExists {
            path: child.to_owned(),
        });
    }
    let random = || {
        Guid::random().map_err(|cause| VhdxError::Random {
            path: child.to_owned(),
            cause,
        })
    };
    let layout = Layout {
        parent: &parent_info,
        file_write_guid: random()?,
        data_write_guid: random()?,
        virtual_disk_id: random()?,
        locator: locator.encode(parent_info.data_write_guid),
    };

    let write_err = |step| {
        move |cause| VhdxError::Write {
            path: child.to_owned(),
            step,
            cause,
        }
    };
    let dir = match child.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let Some(name) = child.file_name() else {
        return Err(write_err("naming the file")(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path does not end in a file name",
        )));
    };
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix).map_err(|cause| VhdxError::Random {
        path: child.to_owned(),
        cause,
    })?;
    let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let temp = dir.join(format!(".{}.{suffix}.tmp", name.to_string_lossy()));

    let result = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(write_err("creating the temporary file beside it"))?;
        layout
            .write(&file)
            .map_err(write_err("writing the temporary file"))?;
        file.sync_all()
            .map_err(write_err("flushing the temporary file to disk"))?;
        drop(file);
        // The finished file is checked as a reader would before it takes the child's name.
        inspect_child(&temp, parent)?;
        // Between this check and the rename another writer could create the child; only the
        // agent writes its children, one at a time, so the check is enough to protect a child
        // made earlier from being replaced by mistake.
        if child.exists() {
            return Err(VhdxError::ChildExists {
                path: child.to_owned(),
            });
        }
        std::fs::rename(&temp, child).map_err(write_err("renaming the temporary file to it"))?;
        sync_dir(&dir).map_err(write_err("flushing its directory to disk"))
    })();
    if let Err(e) = result {
        // Best effort: the temporary name is ours alone, and the error already says what failed.
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    inspect_child(child, parent)
}

/// Checks that `child` is a valid differencing VHDX whose parent is `parent`, unchanged since
/// the child was made: the child's `parent_linkage` is the parent's current `DataWriteGuid`,
/// and both disks have the same virtual size and logical sector size. Errors name the file and
/// the check that failed.
pub fn inspect_child(child: &Path, parent: &Path) -> Result<ChildInfo, VhdxError> {
    let examined = examine(child)?;
    if !examined.info.has_parent {
        return Err(VhdxError::NotDifferencing {
            path: child.to_owned(),
        });
    }
    let bad_locator = |reason: String| VhdxError::BadParentLocator {
        path: child.to_owned(),
        reason,
    };
    let Some(item) = examined.parent_locator else {
        return Err(bad_locator(
            "the metadata lists no parent locator, so no reader can find the parent".to_owned(),
        ));
    };
    let pairs = locator::decode(&item).map_err(bad_locator)?;
    let Some((_, linkage)) = pairs.iter().find(|(k, _)| k == "parent_linkage") else {
        return Err(bad_locator(
            "it has no parent_linkage entry naming the parent's DataWriteGuid".to_owned(),
        ));
    };
    let Some(parent_linkage) = Guid::parse(linkage) else {
        return Err(bad_locator(format!(
            "its parent_linkage {linkage:?} is not a GUID"
        )));
    };

    let parent_info = examine(parent)?.info;
    let mismatch = |check, reason| VhdxError::Linkage {
        child: child.to_owned(),
        parent: parent.to_owned(),
        check,
        reason,
    };
    if parent_linkage != parent_info.data_write_guid {
        return Err(mismatch(
            "parent linkage",
            format!(
                "the child belongs to a parent whose DataWriteGuid was {parent_linkage}, and \
                 this parent's is {}: the parent's data changed since the child was made, or it \
                 is another image; make a new child of it",
                parent_info.data_write_guid
            ),
        ));
    }
    if examined.info.virtual_size != parent_info.virtual_size {
        return Err(mismatch(
            "virtual size",
            format!(
                "the child's disk is {} bytes, the parent's {} bytes",
                examined.info.virtual_size, parent_info.virtual_size
            ),
        ));
    }
    if examined.info.logical_sector_size != parent_info.logical_sector_size {
        return Err(mismatch(
            "logical sector size",
            format!(
                "the child's sectors are {} bytes, the parent's {} bytes",
                examined.info.logical_sector_size, parent_info.logical_sector_size
            ),
        ));
    }
    Ok(ChildInfo {
        info: examined.info,
        parent_linkage,
        locator: pairs,
    })
}

/// Everything that differs between two children of one parent, and the parent's geometry.
struct Layout<'a> {
    parent: &'a VhdxInfo,
    file_write_guid: Guid,
    data_write_guid: Guid,
    virtual_disk_id: Guid,
    /// The encoded parent locator item.
    locator: Vec<u8>,
}

impl Layout<'_> {
    /// Payload blocks per chunk: one sector bitmap (1 MiB, 2^23 bits) covers that many.
    fn chunk_ratio(&self) -> u64 {
        (1u64 << 23) * u64::from(self.parent.logical_sector_size)
            / u64::from(self.parent.block_size)
    }

    /// Chunks of the BAT: each `chunk_ratio` payload entries followed by the entry of the
    /// sector bitmap covering them; a differencing disk's BAT holds whole chunks.
    fn chunks(&self) -> u64 {
        let payload_blocks = self
            .parent
            .virtual_size
            .div_ceil(u64::from(self.parent.block_size));
        payload_blocks.div_ceil(self.chunk_ratio())
    }

    fn bat_len(&self) -> u64 {
        (self.chunks() * (self.chunk_ratio() + 1) * 8).div_ceil(MIB) * MIB
    }

    /// Where chunk `chunk`'s sector bitmap lies: one MiB each, after the BAT.
    fn bitmap_offset(&self, chunk: u64) -> u64 {
        BAT_OFFSET + self.bat_len() + chunk * MIB
    }

    /// Writes the whole file. The file is first sized, so everything not written is zero:
    /// the log, the payload entries of the BAT (NOT_PRESENT), the sector bitmaps, the
    /// reserved areas.
    fn write(&self, file: &File) -> std::io::Result<()> {
        file.set_len(self.bitmap_offset(self.chunks()))?;
        let mut file = file;
        let mut put = |offset: u64, bytes: &[u8]| {
            use std::io::Seek;
            file.seek(std::io::SeekFrom::Start(offset))?;
            file.write_all(bytes)
        };
        put(0, &self.identifier())?;
        for (sequence, offset) in (1..).zip(HEADER_OFFSETS) {
            put(offset, &self.header(sequence))?;
        }
        let regions = self.region_table();
        for offset in REGION_TABLE_OFFSETS {
            put(offset, &regions)?;
        }
        put(METADATA_OFFSET, &self.metadata())?;
        for chunk in 0..self.chunks() {
            let index = (chunk + 1) * (self.chunk_ratio() + 1) - 1;
            // Offset in MiB from bit 20 up, state in the low three bits.
            let entry = (self.bitmap_offset(chunk) / MIB) << 20 | SB_BLOCK_PRESENT;
            put(BAT_OFFSET + index * 8, &entry.to_le_bytes())?;
        }
        Ok(())
    }

    fn identifier(&self) -> Vec<u8> {
        let mut out = b"vhdxfile".to_vec();
        let creator = concat!("BootTorrent boottorrent-vhdx ", env!("CARGO_PKG_VERSION"));
        out.extend(creator.encode_utf16().flat_map(u16::to_le_bytes));
        out
    }

    fn header(&self, sequence: u64) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[0..4].copy_from_slice(b"head");
        h[8..16].copy_from_slice(&sequence.to_le_bytes());
        h[16..32].copy_from_slice(self.file_write_guid.as_bytes());
        h[32..48].copy_from_slice(self.data_write_guid.as_bytes());
        h[48..64].copy_from_slice(Guid::ZERO.as_bytes());
        // Log version 0 (bytes 64..66), format version 1.
        h[66..68].copy_from_slice(&1u16.to_le_bytes());
        h[68..72].copy_from_slice(&(LOG_LEN as u32).to_le_bytes());
        h[72..80].copy_from_slice(&LOG_OFFSET.to_le_bytes());
        let crc = crc32c(&h);
        h[4..8].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn region_table(&self) -> Vec<u8> {
        let mut t = vec![0u8; REGION_TABLE_LEN];
        t[0..4].copy_from_slice(b"regi");
        t[8..12].copy_from_slice(&2u32.to_le_bytes());
        let regions = [
            (BAT_REGION, BAT_OFFSET, self.bat_len()),
            (METADATA_REGION, METADATA_OFFSET, METADATA_LEN),
        ];
        for (i, (guid, offset, len)) in regions.into_iter().enumerate() {
            let at = 16 + 32 * i;
            t[at..at + 16].copy_from_slice(&guid);
            t[at + 16..at + 24].copy_from_slice(&offset.to_le_bytes());
            // A BAT region is at most 512 MiB (64 TiB in 1 MiB blocks, plus bitmaps): u32 holds it.
            t[at + 24..at + 28].copy_from_slice(&(len as u32).to_le_bytes());
            // Both regions are required: a reader that does not know them cannot read the disk.
            t[at + 28..at + 32].copy_from_slice(&1u32.to_le_bytes());
        }
        let crc = crc32c(&t);
        t[4..8].copy_from_slice(&crc.to_le_bytes());
        t
    }

    /// The metadata table, then its items one after another from 64 KiB into the region.
    fn metadata(&self) -> Vec<u8> {
        let parent = self.parent;
        let mut params = parent.block_size.to_le_bytes().to_vec();
        params.extend_from_slice(&HAS_PARENT.to_le_bytes());
        let physical = parent
            .physical_sector_size
            .unwrap_or(parent.logical_sector_size);
        let items: [([u8; 16], Vec<u8>, u32); 6] = [
            (FILE_PARAMETERS, params, IS_REQUIRED),
            (
                VIRTUAL_DISK_SIZE,
                parent.virtual_size.to_le_bytes().to_vec(),
                IS_VIRTUAL_DISK | IS_REQUIRED,
            ),
            (
                PAGE_83_DATA,
                self.virtual_disk_id.as_bytes().to_vec(),
                IS_VIRTUAL_DISK | IS_REQUIRED,
            ),
            (
                LOGICAL_SECTOR_SIZE,
                parent.logical_sector_size.to_le_bytes().to_vec(),
                IS_VIRTUAL_DISK | IS_REQUIRED,
            ),
            (
                PHYSICAL_SECTOR_SIZE,
                physical.to_le_bytes().to_vec(),
                IS_VIRTUAL_DISK | IS_REQUIRED,
            ),
            (PARENT_LOCATOR, self.locator.clone(), IS_REQUIRED),
        ];
        let mut m = vec![0u8; METADATA_TABLE_LEN];
        m[0..8].copy_from_slice(b"metadata");
        m[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
        for (i, (guid, value, flags)) in items.into_iter().enumerate() {
            let at = 32 + 32 * i;
            // The locator's values are bounded (four of at most 64 KiB), so every offset fits
            // the 1 MiB region and a u32.
            let offset = m.len() as u32;
            m[at..at + 16].copy_from_slice(&guid);
            m[at + 16..at + 20].copy_from_slice(&offset.to_le_bytes());
            m[at + 20..at + 24].copy_from_slice(&(value.len() as u32).to_le_bytes());
            m[at + 24..at + 28].copy_from_slice(&flags.to_le_bytes());
            m.extend_from_slice(&value);
            // Items start on 8-byte boundaries.
            m.resize(m.len().next_multiple_of(8), 0);
        }
        debug_assert!(m.len() as u64 <= METADATA_LEN);
        m
    }
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Windows refuses to open a directory as a file to flush it (access denied); NTFS journals
/// the rename itself.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> std::io::Result<()> {
    Ok(())
}

// The tests use Unix positioned writes; the agent's Windows build only needs the code.
#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::process::Command;

    use super::*;
    use crate::inspect::{le_u16, le_u32, le_u64};

    /// An empty dynamic VHDX made by qemu-img; scripts/test installs it (qemu-utils).
    fn qemu_vhdx(path: &Path, size: &str) {
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "vhdx"])
            .arg(path)
            .arg(size)
            .output()
            .expect("qemu-img is not installed (package qemu-utils); run scripts/test");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn locator() -> ParentLocator {
        ParentLocator::from_windows_paths(r"C:\g\parent.vhdx", r"C:\g\child.vhdx").unwrap()
    }

    /// A parent and a fresh child of it in a temporary directory.
    fn family() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("parent.vhdx");
        qemu_vhdx(&parent, "64M");
        let child = dir.path().join("child.vhdx");
        create_child(&parent, &child, &locator()).unwrap();
        (dir, parent, child)
    }

    /// File offset and length of a metadata item's value, found through the region table.
    fn item(path: &Path, guid: [u8; 16]) -> (u64, usize) {
        let bytes = std::fs::read(path).unwrap();
        let table = REGION_TABLE_OFFSETS[0] as usize;
        let region = (0..le_u32(&bytes, table + 8) as usize)
            .map(|i| table + 16 + 32 * i)
            .find(|&at| bytes[at..at + 16] == METADATA_REGION)
            .map(|at| le_u64(&bytes, at + 16))
            .unwrap();
        let count = usize::from(le_u16(&bytes, region as usize + 10));
        (0..count)
            .map(|i| region as usize + 32 + 32 * i)
            .find(|&at| bytes[at..at + 16] == guid)
            .map(|at| {
                (
                    region + u64::from(le_u32(&bytes, at + 16)),
                    le_u32(&bytes, at + 20) as usize,
                )
            })
            .unwrap()
    }

    fn patch(path: &Path, offset: u64, bytes: &[u8]) {
        let file = OpenOptions::new().write(true).open(path).unwrap();
        file.write_all_at(bytes, offset).unwrap();
    }

    fn utf16(text: &str) -> Vec<u8> {
        text.encode_utf16().flat_map(u16::to_le_bytes).collect()
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_child_has_its_parents_geometry_and_fresh_identity() {
        let (dir, parent, child) = family();
        let parent_info = crate::inspect(&parent).unwrap();
        let info = inspect_child(&child, &parent).unwrap();
        assert_eq!(info.parent_linkage, parent_info.data_write_guid);
        assert_eq!(info.info.virtual_size, 64 * MIB);
        assert_eq!(info.info.block_size, parent_info.block_size);
        assert_eq!(
            info.info.logical_sector_size,
            parent_info.logical_sector_size
        );
        assert_eq!(
            info.info.physical_sector_size,
            parent_info.physical_sector_size
        );
        assert_ne!(info.info.data_write_guid, parent_info.data_write_guid);
        assert_eq!(info.locator_value("relative_path"), Some(r".\parent.vhdx"));
        assert_eq!(
            info.locator_value("absolute_win32_path"),
            Some(r"\\?\C:\g\parent.vhdx")
        );
        assert_eq!(
            info.locator_value("parent_linkage"),
            Some(parent_info.data_write_guid.braced().as_str())
        );
        // Only the two disks: the temporary file is gone.
        assert_eq!(names_in(dir.path()), ["child.vhdx", "parent.vhdx"]);

        // Two children of one parent are two disks.
        let second = dir.path().join("second.vhdx");
        let other = create_child(&parent, &second, &locator()).unwrap();
        assert_ne!(other.info.data_write_guid, info.info.data_write_guid);
        let id = |p: &Path| {
            let (at, len) = item(p, PAGE_83_DATA);
            std::fs::read(p).unwrap()[at as usize..at as usize + len].to_vec()
        };
        assert_ne!(id(&child), id(&second));
        assert_ne!(id(&child), id(&parent));
    }

    #[test]
    fn the_bat_holds_present_zero_bitmaps_and_no_data() {
        let (_dir, parent, child) = family();
        let bytes = std::fs::read(&child).unwrap();
        let block_size = u64::from(crate::inspect(&parent).unwrap().block_size);
        let chunk_ratio = (1u64 << 23) * 512 / block_size;
        let chunks = (64 * MIB).div_ceil(block_size).div_ceil(chunk_ratio);
        for i in 0..chunks * (chunk_ratio + 1) {
            let entry = le_u64(&bytes, (BAT_OFFSET + i * 8) as usize);
            if (i + 1) % (chunk_ratio + 1) == 0 {
                assert_eq!(entry & 0b111, SB_BLOCK_PRESENT);
                let at = ((entry >> 20) * MIB) as usize;
                assert!(bytes[at..at + MIB as usize].iter().all(|&b| b == 0));
            } else {
                assert_eq!(entry, 0, "payload entry {i} is NOT_PRESENT");
            }
        }
    }

    #[test]
    fn an_existing_file_is_never_replaced_and_failures_leave_nothing() {
        let (dir, parent, child) = family();
        let before = std::fs::read(&child).unwrap();
        let err = create_child(&parent, &child, &locator()).unwrap_err();
        assert!(matches!(err, VhdxError::ChildExists { .. }), "{err}");
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(std::fs::read(&child).unwrap(), before);

        let nowhere = dir.path().join("missing-dir/child.vhdx");
        let msg = create_child(&parent, &nowhere, &locator())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("creating the temporary file"), "{msg}");
        assert!(msg.contains("missing-dir"), "{msg}");

        // A parent that is not a VHDX: the error names the parent and the check.
        let text = dir.path().join("notes.vhdx");
        std::fs::write(&text, "not a disk".repeat(200_000)).unwrap();
        let other = dir.path().join("other.vhdx");
        let msg = create_child(&text, &other, &locator())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("notes.vhdx"), "{msg}");
        assert!(msg.contains("file type identifier check failed"), "{msg}");
        assert_eq!(
            names_in(dir.path()),
            ["child.vhdx", "notes.vhdx", "parent.vhdx"]
        );
    }

    #[test]
    fn a_parent_with_a_pending_log_gets_no_child() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("parent.vhdx");
        qemu_vhdx(&parent, "64M");
        // Both headers name a log, with valid checksums: the parent was not closed cleanly.
        for offset in HEADER_OFFSETS {
            let mut h = vec![0u8; HEADER_LEN];
            File::open(&parent)
                .unwrap()
                .read_exact_at(&mut h, offset)
                .unwrap();
            h[48] = 1;
            h[4..8].fill(0);
            let crc = crc32c(&h);
            h[4..8].copy_from_slice(&crc.to_le_bytes());
            patch(&parent, offset, &h);
        }
        let child = dir.path().join("child.vhdx");
        let err = create_child(&parent, &child, &locator()).unwrap_err();
        assert!(matches!(err, VhdxError::UnusableParent { .. }), "{err}");
        assert!(err.to_string().contains("log"), "{err}");
        assert!(!child.exists());
    }

    #[test]
    fn children_that_do_not_fit_their_parent_are_refused_by_the_check_that_notices() {
        let (dir, parent, child) = family();
        let refused = |child: &Path, parent: &Path, check: &str| {
            let msg = inspect_child(child, parent).unwrap_err().to_string();
            assert!(msg.contains(check), "expected {check:?} in {msg}");
            assert!(msg.contains(&child.display().to_string()), "{msg}");
        };

        // A whole disk is no child.
        refused(&parent, &parent, "differencing check failed");

        // Another parent of the same size: another DataWriteGuid.
        let stranger = dir.path().join("stranger.vhdx");
        qemu_vhdx(&stranger, "64M");
        refused(&child, &stranger, "parent linkage check failed");

        // Metadata has no checksum, so items can be patched in place.
        let (size_at, _) = item(&child, VIRTUAL_DISK_SIZE);
        patch(&child, size_at, &(32 * MIB).to_le_bytes());
        refused(&child, &parent, "virtual size check failed");
        patch(&child, size_at, &(64 * MIB).to_le_bytes());
        inspect_child(&child, &parent).unwrap();

        let (sector_at, _) = item(&child, LOGICAL_SECTOR_SIZE);
        patch(&child, sector_at, &4096u32.to_le_bytes());
        refused(&child, &parent, "logical sector size check failed");
        patch(&child, sector_at, &512u32.to_le_bytes());

        let bytes = std::fs::read(&child).unwrap();
        let key = utf16("parent_linkage");
        let key_at = bytes.windows(key.len()).position(|w| w == key).unwrap() as u64;
        patch(&child, key_at, &utf16("parent_linkagX"));
        refused(&child, &parent, "no parent_linkage entry");
        patch(&child, key_at, &key);

        let value_at = key_at + key.len() as u64;
        patch(&child, value_at, &utf16("{zz"));
        refused(&child, &parent, "is not a GUID");
        patch(
            &child,
            value_at,
            &bytes[value_at as usize..value_at as usize + 6],
        );

        let (locator_at, _) = item(&child, PARENT_LOCATOR);
        patch(&child, locator_at, &[0u8; 16]);
        refused(&child, &parent, "parent locator check failed");
        patch(&child, locator_at, &crate::locator::LOCATOR_TYPE);
        inspect_child(&child, &parent).unwrap();
    }

    #[test]
    fn damaged_children_are_refused_without_panicking() {
        let (_dir, parent, child) = family();
        let pristine = std::fs::read(&child).unwrap();
        // Bytes a reader interprets: identifier, headers, region tables, metadata table and
        // items, and the BAT's first chunk.
        let interesting = [
            (0, 16),
            (HEADER_OFFSETS[0], 100),
            (REGION_TABLE_OFFSETS[0], 100),
            (METADATA_OFFSET, 256),
            (METADATA_OFFSET + METADATA_TABLE_LEN as u64, 512),
            (BAT_OFFSET, 64),
        ];
        let mut random = [0u8; 4 * 600];
        getrandom::fill(&mut random).unwrap();
        for r in random.chunks_exact(4) {
            let (start, len) = interesting[usize::from(r[0]) % interesting.len()];
            let offset = start + u64::from(u16::from_le_bytes([r[1], r[2]])) % len;
            patch(&child, offset, &[r[3]]);
            // Any outcome but a panic; the file is whole, so one that passes still fits.
            let _ = inspect_child(&child, &parent);
            patch(
                &child,
                offset,
                &pristine[offset as usize..offset as usize + 1],
            );
        }
        inspect_child(&child, &parent).unwrap();
    }
}
