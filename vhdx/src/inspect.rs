//! VHDX validation (MS-VHDX 1.0): is this file a whole, uncorrupted virtual disk, and how large
//! is the disk it holds?
//!
//! An image is hashed and sent to hundreds of machines, so a file that is truncated, damaged or
//! not a VHDX at all must be stopped here, with a message that names the check that failed,
//! rather than discovered when a lab fails to boot. The checks follow the on-disk layout, first
//! megabyte first:
//!
//! 1. the file type identifier `vhdxfile` at offset 0;
//! 2. the two headers at 64 KiB and 128 KiB (signature, CRC-32C, version): at least one must be
//!    valid, and the valid one with the higher sequence number is current;
//! 3. the region table at 192 KiB, or its copy at 256 KiB (signature, CRC-32C, entry count);
//! 4. the BAT and metadata regions it lists: present, aligned, inside the file;
//! 5. the metadata table and its items: file parameters, virtual disk size, logical and
//!    physical sector size, with sane values;
//! 6. the block allocation table: every block it says is present lies inside the file, which is
//!    what catches a copy that stopped early.
//!
//! The log is not replayed: a non-empty log is reported as a warning, since Windows replays it
//! when it attaches the disk.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::guid::Guid;

pub(crate) const KIB: u64 = 1024;
pub(crate) const MIB: u64 = 1024 * KIB;

pub(crate) const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
/// Bytes of a header covered by its checksum.
pub(crate) const HEADER_LEN: usize = 4 * KIB as usize;
pub(crate) const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
/// Bytes of a region table covered by its checksum.
pub(crate) const REGION_TABLE_LEN: usize = 64 * KIB as usize;
/// Bytes at the start of the metadata region holding its table.
pub(crate) const METADATA_TABLE_LEN: usize = 64 * KIB as usize;
/// Both the region table and the metadata table allow at most this many entries.
pub(crate) const MAX_ENTRIES: u32 = 2047;
/// Largest virtual disk the format allows (64 TiB).
const MAX_VIRTUAL_SIZE: u64 = 64 * 1024 * 1024 * MIB;

/// A GUID as stored on disk: the first three fields little-endian, the last eight bytes as is.
/// Written field by field so each constant reads exactly as the specification prints it.
pub(crate) const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

pub(crate) const BAT_REGION: [u8; 16] = guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
pub(crate) const METADATA_REGION: [u8; 16] = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
pub(crate) const FILE_PARAMETERS: [u8; 16] = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
pub(crate) const VIRTUAL_DISK_SIZE: [u8; 16] = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
pub(crate) const PAGE_83_DATA: [u8; 16] = guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
pub(crate) const LOGICAL_SECTOR_SIZE: [u8; 16] = guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
pub(crate) const PHYSICAL_SECTOR_SIZE: [u8; 16] = guid(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
pub(crate) const PARENT_LOCATOR: [u8; 16] = guid(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);

/// What a valid VHDX file says about the disk it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdxInfo {
    /// Size of the virtual disk in bytes, as the booted machine sees it.
    pub virtual_size: u64,
    /// Logical sector size in bytes: 512 or 4096.
    pub logical_sector_size: u32,
    /// Physical sector size in bytes (512 or 4096), when the file records one.
    pub physical_sector_size: Option<u32>,
    /// Size of the VHDX file itself in bytes.
    pub file_size: u64,
    /// Block size in bytes (a power of two from 1 MiB to 256 MiB).
    pub block_size: u32,
    /// Whether this is a differencing disk, only usable next to its parent.
    pub has_parent: bool,
    /// The current header's `DataWriteGuid`: changes whenever the disk's data changes, and is
    /// what a differencing child's `parent_linkage` names.
    pub data_write_guid: Guid,
    /// Problems that did not stop validation, such as a damaged header whose copy was good.
    pub warnings: Vec<String>,
}

/// Why a file is not a usable VHDX. Every message names the file and the check that failed.
#[derive(Debug, thiserror::Error)]
pub enum VhdxError {
    /// The file could not be opened or examined.
    #[error("checking VHDX {}: cannot open the file: {cause}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        cause: std::io::Error,
    },
    /// A read failed.
    #[error("checking VHDX {}: reading the {what}: {cause}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The structure being read, such as "metadata table".
        what: &'static str,
        /// The operating system's reason.
        cause: std::io::Error,
    },
    /// The path names a directory or another non-file.
    #[error("checking VHDX {}: it is not a regular file (a directory?)", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file holds no bytes.
    #[error("checking VHDX {}: the file is empty (0 bytes)", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The first eight bytes are not `vhdxfile`.
    #[error(
        "checking VHDX {}: file type identifier check failed: the file starts with {found}, \
         not \"vhdxfile\"; it is not a VHDX image",
        path.display()
    )]
    NotVhdx {
        /// The file.
        path: PathBuf,
        /// The first bytes found, escaped for display.
        found: String,
    },
    /// The file is smaller than the fixed structures at its start.
    #[error(
        "checking VHDX {}: size check failed: the file is {size} bytes, but a VHDX is at least \
         1 MiB (identifier, headers, region tables); it is truncated",
        path.display()
    )]
    TooSmall {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// Neither header is valid.
    #[error(
        "checking VHDX {}: header check failed: header 1 (at 64 KiB): {first}; header 2 \
         (at 128 KiB): {second}",
        path.display()
    )]
    NoValidHeader {
        /// The file.
        path: PathBuf,
        /// Why the first header is invalid.
        first: String,
        /// Why the second header is invalid.
        second: String,
    },
    /// Neither copy of the region table is valid.
    #[error(
        "checking VHDX {}: region table check failed: table 1 (at 192 KiB): {first}; table 2 \
         (at 256 KiB): {second}",
        path.display()
    )]
    NoValidRegionTable {
        /// The file.
        path: PathBuf,
        /// Why the first copy is invalid.
        first: String,
        /// Why the second copy is invalid.
        second: String,
    },
    /// The region table lacks a region, lists one twice, places one badly, or requires one we
    /// do not know.
    #[error("checking VHDX {}: region check failed: {reason}", path.display())]
    BadRegion {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The metadata region's table is malformed.
    #[error("checking VHDX {}: metadata table check failed: {reason}", path.display())]
    BadMetadataTable {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A metadata item is missing, misplaced, or holds an impossible value.
    #[error("checking VHDX {}: metadata check failed: {item}: {reason}", path.display())]
    BadMetadataItem {
        /// The file.
        path: PathBuf,
        /// The item, such as "virtual disk size".
        item: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The block allocation table is too small or points past the end of the file.
    #[error("checking VHDX {}: block allocation table check failed: {reason}", path.display())]
    BadBat {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A differencing disk's parent locator is malformed, or lacks the parent's linkage.
    #[error("checking VHDX {}: parent locator check failed: {reason}", path.display())]
    BadParentLocator {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A differencing disk was expected, and the file is a whole disk.
    #[error(
        "checking differencing VHDX {}: differencing check failed: its file parameters do not \
         say it has a parent; it is a whole disk, not a child",
        path.display()
    )]
    NotDifferencing {
        /// The file.
        path: PathBuf,
    },
    /// A valid child that does not belong to the given parent.
    #[error(
        "checking differencing VHDX {} against its parent {}: {check} check failed: {reason}",
        child.display(),
        parent.display()
    )]
    Linkage {
        /// The child.
        child: PathBuf,
        /// The parent it was checked against.
        parent: PathBuf,
        /// The check, such as "parent linkage".
        check: &'static str,
        /// What differs, and what to do.
        reason: String,
    },
    /// A valid VHDX that cannot be the parent of a new child.
    #[error("creating a child of VHDX {}: parent check failed: {reason}", path.display())]
    UnusableParent {
        /// The parent.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The child path is already taken.
    #[error(
        "creating differencing VHDX {}: the file already exists; an old child is never \
         overwritten, remove it first",
        path.display()
    )]
    ChildExists {
        /// The child's path.
        path: PathBuf,
    },
    /// Writing the child failed; nothing is left at its path.
    #[error("creating differencing VHDX {}: {step}: {cause}", path.display())]
    Write {
        /// The child's path.
        path: PathBuf,
        /// The step that failed, such as "writing the temporary file".
        step: &'static str,
        /// The operating system's reason.
        cause: std::io::Error,
    },
    /// The operating system gave no random numbers for the child's GUIDs.
    #[error(
        "creating differencing VHDX {}: no random numbers for its GUIDs from the operating \
         system: {cause}",
        path.display()
    )]
    Random {
        /// The child's path.
        path: PathBuf,
        /// The generator's reason.
        cause: getrandom::Error,
    },
}

/// Validates the VHDX file at `path` and returns the virtual disk's geometry.
pub fn inspect(path: &Path) -> Result<VhdxInfo, VhdxError> {
    examine(path).map(|examined| examined.info)
}

/// What validation found, with the parts creating and checking children need beyond
/// [`VhdxInfo`].
pub(crate) struct Examined {
    pub(crate) info: VhdxInfo,
    pub(crate) log_pending: bool,
    /// The parent locator item's bytes, when the metadata lists one.
    pub(crate) parent_locator: Option<Vec<u8>>,
}

pub(crate) fn examine(path: &Path) -> Result<Examined, VhdxError> {
    let open_err = |cause| VhdxError::Open {
        path: path.to_owned(),
        cause,
    };
    let file = File::open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.is_file() {
        return Err(VhdxError::NotAFile {
            path: path.to_owned(),
        });
    }
    let file_size = meta.len();
    let disk = Disk {
        file,
        path,
        size: file_size,
    };
    if file_size == 0 {
        return Err(VhdxError::Empty {
            path: path.to_owned(),
        });
    }

    let mut ident = vec![0u8; file_size.min(8) as usize];
    disk.read(0, &mut ident, "file type identifier")?;
    if ident != b"vhdxfile" {
        return Err(VhdxError::NotVhdx {
            path: path.to_owned(),
            found: show_bytes(&ident),
        });
    }
    if file_size < MIB {
        return Err(VhdxError::TooSmall {
            path: path.to_owned(),
            size: file_size,
        });
    }

    let mut warnings = Vec::new();
    let header = current_header(&disk, &mut warnings)?;
    if header.log_guid != [0; 16] {
        warnings.push(
            "the log holds changes not yet applied (the disk was not closed cleanly); Windows \
             applies them when it attaches the disk"
                .to_owned(),
        );
    }
    let regions = region_table(&disk, &mut warnings)?;
    let metadata = read_metadata(&disk, &regions.metadata)?;
    check_bat(&disk, &regions.bat, &metadata)?;
    let parent_locator = match metadata.parent_locator {
        Some((offset, len)) => {
            let mut item = vec![0u8; len as usize];
            disk.read(
                regions.metadata.offset + offset,
                &mut item,
                "parent locator",
            )?;
            Some(item)
        }
        None => None,
    };
    if metadata.has_parent {
        warnings.push(
            "this is a differencing disk: it is only usable next to its parent image".to_owned(),
        );
    }

    Ok(Examined {
        info: VhdxInfo {
            virtual_size: metadata.virtual_size,
            logical_sector_size: metadata.logical_sector_size,
            physical_sector_size: metadata.physical_sector_size,
            file_size,
            block_size: metadata.block_size,
            has_parent: metadata.has_parent,
            data_write_guid: Guid::from_bytes(header.data_write_guid),
            warnings,
        },
        log_pending: header.log_guid != [0; 16],
        parent_locator,
    })
}

/// The open file and what error messages need to name it.
struct Disk<'a> {
    file: File,
    path: &'a Path,
    size: u64,
}

impl Disk<'_> {
    fn read(&self, offset: u64, buf: &mut [u8], what: &'static str) -> Result<(), VhdxError> {
        read_exact_at(&self.file, buf, offset).map_err(|cause| VhdxError::Read {
            path: self.path.to_owned(),
            what,
            cause,
        })
    }
}

/// Positioned reads on every platform the agent runs on: Unix has `read_exact_at`; Windows
/// only `seek_read`, which may return fewer bytes than asked.
#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file ends before the structure does",
                ));
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

struct Header {
    sequence: u64,
    data_write_guid: [u8; 16],
    log_guid: [u8; 16],
}

fn current_header(disk: &Disk, warnings: &mut Vec<String>) -> Result<Header, VhdxError> {
    let [first, second] = HEADER_OFFSETS.map(|offset| {
        let mut buf = vec![0u8; HEADER_LEN];
        disk.read(offset, &mut buf, "headers")
            .map(|()| parse_header(&mut buf))
    });
    match (first?, second?) {
        (Ok(a), Ok(b)) => Ok(if b.sequence > a.sequence { b } else { a }),
        (Ok(a), Err(why)) => {
            warnings.push(format!(
                "header 2 (at 128 KiB) is invalid ({why}); using header 1"
            ));
            Ok(a)
        }
        (Err(why), Ok(b)) => {
            warnings.push(format!(
                "header 1 (at 64 KiB) is invalid ({why}); using header 2"
            ));
            Ok(b)
        }
        (Err(first), Err(second)) => Err(VhdxError::NoValidHeader {
            path: disk.path.to_owned(),
            first,
            second,
        }),
    }
}

/// Checks one header; the error says why it is unusable.
fn parse_header(buf: &mut [u8]) -> Result<Header, String> {
    if &buf[0..4] != b"head" {
        return Err(format!(
            "signature is {}, not \"head\"",
            show_bytes(&buf[0..4])
        ));
    }
    verify_checksum(buf, 4)?;
    let version = le_u16(buf, 66);
    if version != 1 {
        return Err(format!("version is {version}, not 1"));
    }
    Ok(Header {
        sequence: le_u64(buf, 8),
        data_write_guid: buf[32..48].try_into().expect("16 bytes"),
        log_guid: buf[48..64].try_into().expect("16 bytes"),
    })
}

/// The CRC-32C at `at` must match the structure's bytes with that field zeroed. Leaves the
/// field zeroed: callers do not read it again.
fn verify_checksum(buf: &mut [u8], at: usize) -> Result<(), String> {
    let stored = le_u32(buf, at);
    buf[at..at + 4].fill(0);
    let computed = crc32c(buf);
    if stored == computed {
        Ok(())
    } else {
        Err(format!(
            "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the bytes are \
             damaged"
        ))
    }
}

/// Where a region lies in the file.
#[derive(Debug, Clone, Copy)]
struct Region {
    offset: u64,
    len: u64,
}

struct Regions {
    bat: Region,
    metadata: Region,
}

fn region_table(disk: &Disk, warnings: &mut Vec<String>) -> Result<Regions, VhdxError> {
    // The copy is only read when the first table is damaged; a valid first table wins even if
    // the regions it lists turn out bad, since both copies must be identical.
    let read_table = |offset| {
        let mut buf = vec![0u8; REGION_TABLE_LEN];
        disk.read(offset, &mut buf, "region table")
            .map(|()| parse_region_table(&mut buf))
    };
    let entries = match read_table(REGION_TABLE_OFFSETS[0])? {
        Ok(entries) => entries,
        Err(first) => match read_table(REGION_TABLE_OFFSETS[1])? {
            Ok(entries) => {
                warnings.push(format!(
                    "region table 1 (at 192 KiB) is invalid ({first}); using its copy"
                ));
                entries
            }
            Err(second) => {
                return Err(VhdxError::NoValidRegionTable {
                    path: disk.path.to_owned(),
                    first,
                    second,
                });
            }
        },
    };
    check_regions(disk, &entries)
}

struct RegionEntry {
    guid: [u8; 16],
    region: Region,
    required: bool,
}

fn parse_region_table(buf: &mut [u8]) -> Result<Vec<RegionEntry>, String> {
    if &buf[0..4] != b"regi" {
        return Err(format!(
            "signature is {}, not \"regi\"",
            show_bytes(&buf[0..4])
        ));
    }
    verify_checksum(buf, 4)?;
    let count = le_u32(buf, 8);
    if count > MAX_ENTRIES {
        return Err(format!(
            "{count} entries, more than the {MAX_ENTRIES} allowed"
        ));
    }
    Ok((0..count as usize)
        .map(|i| {
            let at = 16 + 32 * i;
            RegionEntry {
                guid: buf[at..at + 16].try_into().expect("16 bytes"),
                region: Region {
                    offset: le_u64(buf, at + 16),
                    len: u64::from(le_u32(buf, at + 24)),
                },
                required: le_u32(buf, at + 28) & 1 == 1,
            }
        })
        .collect())
}

fn check_regions(disk: &Disk, entries: &[RegionEntry]) -> Result<Regions, VhdxError> {
    let bad = |reason: String| VhdxError::BadRegion {
        path: disk.path.to_owned(),
        reason,
    };
    let mut bat = None;
    let mut metadata = None;
    for entry in entries {
        let (slot, name) = match entry.guid {
            BAT_REGION => (&mut bat, "BAT"),
            METADATA_REGION => (&mut metadata, "metadata"),
            // Readers must refuse a file with a required region they do not understand; an
            // optional one they may ignore.
            other if entry.required => {
                return Err(bad(format!(
                    "the file requires region {}, which this validator does not know",
                    show_guid(&other)
                )));
            }
            _ => continue,
        };
        if slot.is_some() {
            return Err(bad(format!("the {name} region is listed twice")));
        }
        let Region { offset, len } = entry.region;
        if offset < MIB || offset % MIB != 0 || len == 0 || len % MIB != 0 {
            return Err(bad(format!(
                "the {name} region (offset {offset}, length {len}) is not placed on whole \
                 megabytes after the first"
            )));
        }
        if offset + len > disk.size {
            return Err(bad(format!(
                "the {name} region (bytes {offset}..{}) lies beyond the end of the {}-byte file; \
                 it is truncated",
                offset + len,
                disk.size
            )));
        }
        *slot = Some(entry.region);
    }
    match (bat, metadata) {
        (Some(bat), Some(metadata)) => Ok(Regions { bat, metadata }),
        (None, _) => Err(bad("the BAT region is missing".to_owned())),
        (_, None) => Err(bad("the metadata region is missing".to_owned())),
    }
}

/// The metadata items validation and the catalog need.
struct Metadata {
    block_size: u32,
    has_parent: bool,
    virtual_size: u64,
    logical_sector_size: u32,
    physical_sector_size: Option<u32>,
    /// Where the parent locator item lies (offset within the metadata region, length).
    parent_locator: Option<(u64, u32)>,
}

/// Metadata items the format defines. An item marked required that is not one of these makes
/// the file unreadable for conforming readers.
const KNOWN_ITEMS: [[u8; 16]; 6] = [
    FILE_PARAMETERS,
    VIRTUAL_DISK_SIZE,
    PAGE_83_DATA,
    LOGICAL_SECTOR_SIZE,
    PHYSICAL_SECTOR_SIZE,
    PARENT_LOCATOR,
];

fn read_metadata(disk: &Disk, region: &Region) -> Result<Metadata, VhdxError> {
    let bad_table = |reason: String| VhdxError::BadMetadataTable {
        path: disk.path.to_owned(),
        reason,
    };
    let mut table = vec![0u8; METADATA_TABLE_LEN];
    disk.read(region.offset, &mut table, "metadata table")?;
    if &table[0..8] != b"metadata" {
        return Err(bad_table(format!(
            "signature is {}, not \"metadata\"",
            show_bytes(&table[0..8])
        )));
    }
    let count = u32::from(le_u16(&table, 10));
    if count > MAX_ENTRIES {
        return Err(bad_table(format!(
            "{count} entries, more than the {MAX_ENTRIES} allowed"
        )));
    }

    // Each item: (offset within the region, length) once its entry checked out.
    let mut items: Vec<([u8; 16], u64, u32)> = Vec::new();
    for i in 0..count as usize {
        let at = 32 + 32 * i;
        let guid: [u8; 16] = table[at..at + 16].try_into().expect("16 bytes");
        let offset = u64::from(le_u32(&table, at + 16));
        let len = le_u32(&table, at + 20);
        let required = le_u32(&table, at + 24) & 0b100 != 0;
        if required && !KNOWN_ITEMS.contains(&guid) {
            return Err(bad_table(format!(
                "the file requires metadata item {}, which this validator does not know",
                show_guid(&guid)
            )));
        }
        if len > 0 && (offset < METADATA_TABLE_LEN as u64 || offset + u64::from(len) > region.len) {
            return Err(bad_table(format!(
                "item {} (bytes {offset}..{} of the region) lies outside the {}-byte metadata \
                 region's data area",
                show_guid(&guid),
                offset + u64::from(len),
                region.len
            )));
        }
        if items.iter().any(|(g, _, _)| *g == guid) {
            return Err(bad_table(format!(
                "item {} is listed twice",
                show_guid(&guid)
            )));
        }
        items.push((guid, offset, len));
    }

    let bad_item = |item: &'static str, reason: String| VhdxError::BadMetadataItem {
        path: disk.path.to_owned(),
        item,
        reason,
    };
    // Reads a fixed-size item; `None` when the table does not list it.
    let read_item = |guid: [u8; 16], item: &'static str, buf: &mut [u8]| {
        let Some(&(_, offset, len)) = items.iter().find(|(g, _, _)| *g == guid) else {
            return Ok(false);
        };
        if len as usize != buf.len() {
            return Err(bad_item(
                item,
                format!("is {len} bytes long, expected {}", buf.len()),
            ));
        }
        disk.read(region.offset + offset, buf, item)?;
        Ok(true)
    };
    let required_item = |guid: [u8; 16], item: &'static str, buf: &mut [u8]| {
        if read_item(guid, item, buf)? {
            Ok(())
        } else {
            Err(bad_item(item, "the item is missing".to_owned()))
        }
    };

    let mut params = [0u8; 8];
    required_item(FILE_PARAMETERS, "file parameters", &mut params)?;
    let block_size = le_u32(&params, 0);
    if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&u64::from(block_size)) {
        return Err(bad_item(
            "file parameters",
            format!("block size {block_size} is not a power of two from 1 MiB to 256 MiB"),
        ));
    }
    let has_parent = le_u32(&params, 4) & 0b10 != 0;

    let mut buf = [0u8; 4];
    required_item(LOGICAL_SECTOR_SIZE, "logical sector size", &mut buf)?;
    let logical_sector_size = u32::from_le_bytes(buf);
    if logical_sector_size != 512 && logical_sector_size != 4096 {
        return Err(bad_item(
            "logical sector size",
            format!("{logical_sector_size} bytes; only 512 and 4096 are valid"),
        ));
    }

    let physical_sector_size = if read_item(PHYSICAL_SECTOR_SIZE, "physical sector size", &mut buf)?
    {
        let size = u32::from_le_bytes(buf);
        if size != 512 && size != 4096 {
            return Err(bad_item(
                "physical sector size",
                format!("{size} bytes; only 512 and 4096 are valid"),
            ));
        }
        Some(size)
    } else {
        None
    };

    let mut buf = [0u8; 8];
    required_item(VIRTUAL_DISK_SIZE, "virtual disk size", &mut buf)?;
    let virtual_size = u64::from_le_bytes(buf);
    if virtual_size == 0 {
        return Err(bad_item("virtual disk size", "is 0 bytes".to_owned()));
    }
    if virtual_size % u64::from(logical_sector_size) != 0 {
        return Err(bad_item(
            "virtual disk size",
            format!(
                "{virtual_size} bytes is not a whole number of {logical_sector_size}-byte sectors"
            ),
        ));
    }
    if virtual_size > MAX_VIRTUAL_SIZE {
        return Err(bad_item(
            "virtual disk size",
            format!("{virtual_size} bytes is more than the format's 64 TiB"),
        ));
    }

    let parent_locator = items
        .iter()
        .find(|(g, _, _)| *g == PARENT_LOCATOR)
        .map(|&(_, offset, len)| (offset, len));

    Ok(Metadata {
        block_size,
        has_parent,
        virtual_size,
        logical_sector_size,
        physical_sector_size,
        parent_locator,
    })
}

/// BAT entry states meaning "these bytes are in the file": a payload block fully or partially
/// present, or a sector bitmap block present (which shares the value 6).
pub(crate) const PAYLOAD_BLOCK_FULLY_PRESENT: u64 = 6;
const PAYLOAD_BLOCK_PARTIALLY_PRESENT: u64 = 7;

/// Every block the BAT says is stored must lie inside the file: a file cut short by an
/// interrupted copy keeps its headers and metadata, and only this check notices.
fn check_bat(disk: &Disk, region: &Region, meta: &Metadata) -> Result<(), VhdxError> {
    let bad = |reason: String| VhdxError::BadBat {
        path: disk.path.to_owned(),
        reason,
    };
    let block_size = u64::from(meta.block_size);
    // Payload entries come in runs of `chunk_ratio`, each run followed by one sector bitmap
    // entry covering it.
    let chunk_ratio = (1u64 << 23) * u64::from(meta.logical_sector_size) / block_size;
    let payload_blocks = meta.virtual_size.div_ceil(block_size);
    let entries = if meta.has_parent {
        payload_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
    } else {
        payload_blocks + (payload_blocks - 1) / chunk_ratio
    };
    if entries * 8 > region.len {
        return Err(bad(format!(
            "{entries} entries needed for a {}-byte disk do not fit the {}-byte BAT region",
            meta.virtual_size, region.len
        )));
    }

    let mut bat = vec![0u8; (entries * 8) as usize];
    disk.read(region.offset, &mut bat, "block allocation table")?;
    let mut payload_index = 0u64;
    for (i, entry) in bat.chunks_exact(8).enumerate() {
        let entry = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
        let state = entry & 0b111;
        let offset = (entry >> 20) * MIB;
        let is_bitmap = (i as u64 + 1) % (chunk_ratio + 1) == 0;
        let (len, what) = if is_bitmap {
            (MIB, "sector bitmap block")
        } else {
            // The last payload block holds only what remains of the disk; a differencing disk's
            // BAT fills its last chunk with entries past the end, which cover nothing.
            let len = block_size.min(meta.virtual_size.saturating_sub(payload_index * block_size));
            payload_index += 1;
            (len, "data block")
        };
        let present = if is_bitmap {
            state == PAYLOAD_BLOCK_FULLY_PRESENT
        } else {
            state == PAYLOAD_BLOCK_FULLY_PRESENT || state == PAYLOAD_BLOCK_PARTIALLY_PRESENT
        };
        if !present {
            continue;
        }
        if offset < MIB {
            return Err(bad(format!(
                "entry {i} places a {what} at byte {offset}, inside the headers"
            )));
        }
        if offset + len > disk.size {
            return Err(bad(format!(
                "entry {i} places a {what} at bytes {offset}..{}, beyond the end of the {}-byte \
                 file; it is truncated",
                offset + len,
                disk.size
            )));
        }
    }
    Ok(())
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as VHDX checksums use.
pub(crate) fn crc32c(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = i as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };
    !bytes.iter().fold(!0u32, |crc, &b| {
        TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8)
    })
}

pub(crate) fn le_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(buf[at..at + 2].try_into().expect("2 bytes"))
}

pub(crate) fn le_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn le_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Bytes as an escaped, quoted string: readable when they are text, safe when they are not.
pub(crate) fn show_bytes(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

/// A GUID in the usual textual form.
fn show_guid(g: &[u8; 16]) -> String {
    Guid::from_bytes(*g).to_string()
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Runs `qemu-img`, failing the test when it is missing: scripts/test installs it.
    fn qemu_img(args: &[&str]) {
        let out = Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img is not installed (package qemu-utils); run scripts/test");
        assert!(
            out.status.success(),
            "qemu-img {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn qemu_virtual_size(path: &Path) -> u64 {
        let out = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(path)
            .output()
            .expect("qemu-img is not installed (package qemu-utils); run scripts/test");
        assert!(out.status.success());
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        info["virtual-size"].as_u64().unwrap()
    }

    /// A dynamic VHDX of `size` bytes made by qemu-img.
    fn empty_vhdx(dir: &Path, name: &str, size: &str) -> PathBuf {
        let path = dir.join(name);
        qemu_img(&["create", "-q", "-f", "vhdx", path.to_str().unwrap(), size]);
        path
    }

    /// A VHDX whose disk holds `len` random bytes, converted by qemu-img from a raw image.
    fn filled_vhdx(dir: &Path, len: usize) -> (PathBuf, Vec<u8>) {
        let mut data = vec![0u8; len];
        getrandom::fill(&mut data).unwrap();
        let raw = dir.join("disk.raw");
        std::fs::write(&raw, &data).unwrap();
        let path = dir.join("disk.vhdx");
        qemu_img(&[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "vhdx",
            raw.to_str().unwrap(),
            path.to_str().unwrap(),
        ]);
        (path, data)
    }

    fn flip_byte(path: &Path, offset: u64) {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[offset as usize] ^= 0x5A;
        std::fs::write(path, bytes).unwrap();
    }

    fn truncate(path: &Path, len: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(len)
            .unwrap();
    }

    /// Offset of a metadata item's value, found the way `read_metadata` finds it.
    fn item_offset(path: &Path, guid: [u8; 16]) -> u64 {
        let bytes = std::fs::read(path).unwrap();
        let table = &bytes[REGION_TABLE_OFFSETS[0] as usize..];
        let count = le_u32(table, 8) as usize;
        let region = (0..count)
            .map(|i| 16 + 32 * i)
            .find(|&at| table[at..at + 16] == METADATA_REGION)
            .map(|at| le_u64(table, at + 16))
            .unwrap();
        let meta = &bytes[region as usize..];
        let count = le_u16(meta, 10) as usize;
        (0..count)
            .map(|i| 32 + 32 * i)
            .find(|&at| meta[at..at + 16] == guid)
            .map(|at| region + u64::from(le_u32(meta, at + 16)))
            .unwrap()
    }

    /// File offset of the first data block, from the first BAT entry.
    fn first_block_offset(path: &Path) -> u64 {
        let bytes = std::fs::read(path).unwrap();
        let table = &bytes[REGION_TABLE_OFFSETS[0] as usize..];
        let count = le_u32(table, 8) as usize;
        let bat = (0..count)
            .map(|i| 16 + 32 * i)
            .find(|&at| table[at..at + 16] == BAT_REGION)
            .map(|at| le_u64(table, at + 16))
            .unwrap();
        let entry = le_u64(&bytes, bat as usize);
        assert_eq!(
            entry & 0b111,
            PAYLOAD_BLOCK_FULLY_PRESENT,
            "the data is stored"
        );
        (entry >> 20) * MIB
    }

    fn assert_refused(path: &Path, check: &str) {
        let err = inspect(path).expect_err("the file must be refused");
        let msg = err.to_string();
        assert!(msg.contains(check), "expected {check:?} in: {msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn guids_render_as_the_specification_prints_them() {
        assert_eq!(
            show_guid(&BAT_REGION),
            "2DC27766-F623-4200-9D64-115E9BFD4A08"
        );
        assert_eq!(
            show_guid(&METADATA_REGION),
            "8B7CA206-4790-4B9A-B8FE-575F050F886E"
        );
    }

    #[test]
    fn reads_the_geometry_of_qemu_images() {
        let dir = tempfile::tempdir().unwrap();
        for (size, bytes) in [("64M", 64 * MIB), ("10G", 10 * 1024 * MIB)] {
            let path = empty_vhdx(dir.path(), &format!("{size}.vhdx"), size);
            let info = inspect(&path).unwrap();
            assert_eq!(info.virtual_size, bytes);
            assert_eq!(info.virtual_size, qemu_virtual_size(&path));
            assert_eq!(info.logical_sector_size, 512);
            assert!(matches!(info.physical_sector_size, Some(512 | 4096)));
            assert_eq!(info.file_size, std::fs::metadata(&path).unwrap().len());
            assert!(info.warnings.is_empty(), "{:?}", info.warnings);
        }

        // Fixed images store every block; small blocks put many sector bitmap entries in the BAT.
        for (options, size, bytes) in [
            ("subformat=fixed", "300M", 300 * MIB),
            ("block_size=1M", "10G", 10 * 1024 * MIB),
            ("block_size=256M", "300M", 300 * MIB),
        ] {
            let path = dir.path().join("options.vhdx");
            let file = path.to_str().unwrap();
            qemu_img(&["create", "-q", "-f", "vhdx", "-o", options, file, size]);
            let info = inspect(&path).unwrap_or_else(|e| panic!("{options}: {e}"));
            assert_eq!(info.virtual_size, bytes, "{options}");
            std::fs::remove_file(&path).unwrap();
        }

        let (path, data) = filled_vhdx(dir.path(), 5 * MIB as usize + 512);
        let info = inspect(&path).unwrap();
        assert_eq!(info.virtual_size, data.len() as u64);
        assert_eq!(info.virtual_size, qemu_virtual_size(&path));
        assert!(info.file_size > data.len() as u64);
    }

    #[test]
    fn a_damaged_header_falls_back_to_its_copy_and_both_damaged_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = empty_vhdx(dir.path(), "disk.vhdx", "64M");
        // Inside the checksummed area but past the signature: only the CRC-32C can notice.
        flip_byte(&path, HEADER_OFFSETS[0] + 200);
        let info = inspect(&path).unwrap();
        assert_eq!(info.virtual_size, 64 * MIB);
        assert_eq!(info.warnings.len(), 1);
        assert!(info.warnings[0].contains("header 1"), "{:?}", info.warnings);
        assert!(info.warnings[0].contains("checksum mismatch"));

        flip_byte(&path, HEADER_OFFSETS[1] + 3);
        assert_refused(&path, "header check failed");
        let msg = inspect(&path).unwrap_err().to_string();
        assert!(msg.contains("checksum mismatch"), "{msg}");
        assert!(msg.contains("signature"), "{msg}");
    }

    #[test]
    fn the_current_header_is_the_valid_one_with_the_higher_sequence_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = empty_vhdx(dir.path(), "disk.vhdx", "64M");
        let file = File::open(&path).unwrap();
        let disk = Disk {
            file,
            path: &path,
            size: 0,
        };
        let mut sequences = Vec::new();
        for offset in HEADER_OFFSETS {
            let mut buf = vec![0u8; HEADER_LEN];
            disk.read(offset, &mut buf, "headers").unwrap();
            sequences.push(parse_header(&mut buf).unwrap().sequence);
        }
        let mut warnings = Vec::new();
        let current = current_header(&disk, &mut warnings).unwrap();
        assert_eq!(current.sequence, sequences.iter().copied().max().unwrap());
        assert!(warnings.is_empty());
    }

    #[test]
    fn a_damaged_region_table_falls_back_to_its_copy_and_both_damaged_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = empty_vhdx(dir.path(), "disk.vhdx", "64M");
        flip_byte(&path, REGION_TABLE_OFFSETS[0] + 20);
        let info = inspect(&path).unwrap();
        assert!(
            info.warnings[0].contains("region table 1"),
            "{:?}",
            info.warnings
        );
        flip_byte(&path, REGION_TABLE_OFFSETS[1] + 20);
        assert_refused(&path, "region table check failed");
    }

    #[test]
    fn truncated_images_are_refused_by_the_check_that_notices() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = filled_vhdx(dir.path(), 6 * MIB as usize);
        // Cut inside the first data block, as an interrupted copy would.
        let block = first_block_offset(&path);
        truncate(&path, block + MIB);
        assert_refused(&path, "block allocation table check failed");
        assert_refused(&path, "beyond the end");

        // The metadata region sits past the first megabytes.
        truncate(&path, 2 * MIB + 5);
        assert_refused(&path, "region check failed");

        truncate(&path, 300 * KIB);
        assert_refused(&path, "size check failed");
    }

    #[test]
    fn insane_metadata_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [([u8; 16], &[u8], &str); 4] = [
            (
                LOGICAL_SECTOR_SIZE,
                &1000u32.to_le_bytes(),
                "logical sector size",
            ),
            (
                VIRTUAL_DISK_SIZE,
                &0u64.to_le_bytes(),
                "virtual disk size: is 0 bytes",
            ),
            (
                VIRTUAL_DISK_SIZE,
                &(64 * MIB + 100).to_le_bytes(),
                "is not a whole number of 512-byte sectors",
            ),
            (
                PHYSICAL_SECTOR_SIZE,
                &7u32.to_le_bytes(),
                "physical sector size",
            ),
        ];
        for (guid, value, check) in cases {
            let path = empty_vhdx(dir.path(), "disk.vhdx", "64M");
            // Metadata carries no checksum, so patching a value in place leaves the rest valid.
            let at = item_offset(&path, guid);
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[at as usize..at as usize + value.len()].copy_from_slice(value);
            std::fs::write(&path, bytes).unwrap();
            assert_refused(&path, "metadata check failed");
            assert_refused(&path, check);
        }
    }

    #[test]
    fn text_empty_and_other_formats_are_refused() {
        let dir = tempfile::tempdir().unwrap();

        let empty = dir.path().join("empty.vhdx");
        std::fs::write(&empty, b"").unwrap();
        assert_refused(&empty, "the file is empty");

        let text = dir.path().join("notes.vhdx");
        std::fs::write(&text, "hello, this is a text file\n".repeat(50_000)).unwrap();
        assert_refused(&text, "file type identifier check failed");
        assert_refused(&text, "\"hello, t\"");

        let tiny = dir.path().join("tiny.vhdx");
        std::fs::write(&tiny, b"vhd").unwrap();
        assert_refused(&tiny, "file type identifier check failed");

        let qcow = dir.path().join("disk.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", qcow.to_str().unwrap(), "64M"]);
        assert_refused(&qcow, "file type identifier check failed");

        let missing = dir.path().join("missing.vhdx");
        assert_refused(&missing, "cannot open the file");

        assert_refused(dir.path(), "not a regular file");
    }
}
