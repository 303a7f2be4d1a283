//! Our differencing children, read by third-party VHDX readers: the parent is made by qemu-img
//! from random data, the child by `create_child`, and the child is read back through its parent
//! by libvhdi (Debian python3-libvhdi) and dissect.hypervisor (PyPI), each run as its own
//! process. What they read must be the parent's data byte for byte. A child that does not
//! belong to its parent (a wrong linkage, or a parent changed since) is refused by libvhdi and
//! by `inspect_child`. dissect.hypervisor (3.21) finds the parent by path and never compares
//! the linkage, so it reads such a child; the tests hold what it parsed (the child's
//! `parent_linkage`, the opened parent's `DataWriteGuid`) to show the mismatch, and record
//! that it does not refuse, so a version that starts to refuse is noticed.
//!
//! The readers are installed by scripts/vhdx-readers (scripts/test runs it); a missing reader
//! fails the test with that instruction.
#![cfg(unix)]

use std::path::{Path, PathBuf};
use std::process::Command;

use boottorrent_vhdx::{Guid, ParentLocator, VhdxError, create_child, inspect, inspect_child};

const MIB: u64 = 1024 * 1024;
const INSTALL: &str = "run scripts/vhdx-readers (scripts/test does) to install libvhdi-utils, \
                       python3-libvhdi and dissect.hypervisor";

fn readers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/readers")
}

/// Runs `program`, failing the test when it is missing or fails.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {program} ({e}): qemu-img and qemu-io come with qemu-utils, vhdiinfo \
                 with libvhdi-utils; scripts/test installs them"
            )
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A dynamic VHDX made by qemu-img from `raw`, with `options` for `-o`.
fn qemu_vhdx(raw: &Path, vhdx: &Path, options: &str) {
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", "vhdx"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([raw.to_str().unwrap(), vhdx.to_str().unwrap()]);
    run("qemu-img", &args);
}

/// A parent VHDX in `dir` holding `len` random bytes; returns its path and the raw data.
fn random_parent(dir: &Path, len: usize, options: &str) -> (PathBuf, Vec<u8>) {
    let mut data = vec![0u8; len];
    getrandom::fill(&mut data).unwrap();
    let raw = dir.join("parent.raw");
    std::fs::write(&raw, &data).unwrap();
    let parent = dir.join("parent.vhdx");
    qemu_vhdx(&raw, &parent, options);
    std::fs::remove_file(raw).unwrap();
    (parent, data)
}

/// The locator a Linux reader follows: the parent beside the child.
fn beside(parent: &Path) -> ParentLocator {
    let name = parent.file_name().unwrap().to_str().unwrap();
    ParentLocator::from_windows_paths(
        &format!(r"C:\BootTorrent\images\{name}"),
        r"C:\BootTorrent\images\child.vhdx",
    )
    .unwrap()
}

/// What a reader did with a child: the bytes it read, or its refusal.
type Read = Result<Vec<u8>, String>;

fn reader_output(what: &str, out: std::process::Output, data: &Path) -> Read {
    match out.status.code() {
        Some(0) => Ok(std::fs::read(data).unwrap()),
        Some(3) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        _ => panic!(
            "{what} did not run ({}): {}\n{INSTALL}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn range_args(ranges: &[(u64, u64)]) -> Vec<String> {
    ranges.iter().map(|(o, l)| format!("{o}:{l}")).collect()
}

/// libvhdi reading `child` with `parent` set as its parent (libvhdi checks the linkage then).
fn libvhdi_read(child: &Path, parent: &Path, ranges: &[(u64, u64)]) -> Read {
    let data = child.with_extension("libvhdi.out");
    // Debian's module is installed for Debian's interpreter, not for any other python3 on PATH.
    let out = Command::new("/usr/bin/python3")
        .arg(readers_dir().join("libvhdi_read.py"))
        .args([child, parent, &data])
        .args(range_args(ranges))
        .output()
        .unwrap_or_else(|e| panic!("cannot run /usr/bin/python3 ({e}): {INSTALL}"));
    reader_output("libvhdi (python3-libvhdi)", out, &data)
}

/// The interpreter that has dissect.hypervisor: `BOOTTORRENT_DISSECT_PYTHON`, else the venv
/// scripts/vhdx-readers makes.
fn dissect_python() -> PathBuf {
    if let Some(python) = std::env::var_os("BOOTTORRENT_DISSECT_PYTHON") {
        return python.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
        .expect("neither XDG_CACHE_HOME nor HOME is set: cannot find dissect.hypervisor's venv");
    let python = cache.join("boottorrent-vhdx/venv/bin/python");
    assert!(
        python.exists(),
        "dissect.hypervisor's venv is missing ({} does not exist): {INSTALL}",
        python.display()
    );
    python
}

/// dissect reading `child`, finding the parent by itself; also what it parsed of the linkage:
/// (child's parent_linkage, opened parent's DataWriteGuid).
fn dissect_read(child: &Path, ranges: &[(u64, u64)]) -> (Read, Option<(Guid, Guid)>) {
    let data = child.with_extension("dissect.out");
    let out = Command::new(dissect_python())
        .arg(readers_dir().join("dissect_read.py"))
        .args([child, &data])
        .args(range_args(ranges))
        .output()
        .unwrap_or_else(|e| panic!("cannot run dissect's python ({e}): {INSTALL}"));
    let linkage = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let guid = |key: &str| Guid::parse(v[key].as_str().unwrap()).unwrap();
            (guid("parent_linkage"), guid("parent_data_write_guid"))
        });
    (reader_output("dissect.hypervisor", out, &data), linkage)
}

/// Both readers read `child` as `expected` (the parent's bytes in `ranges`), and our check
/// agrees the child belongs to `parent`.
fn assert_reads_as(child: &Path, parent: &Path, ranges: &[(u64, u64)], expected: &[u8]) {
    let info = inspect_child(child, parent).unwrap();
    assert_eq!(
        info.parent_linkage,
        inspect(parent).unwrap().data_write_guid
    );

    let read = libvhdi_read(child, parent, ranges).unwrap_or_else(|e| panic!("libvhdi: {e}"));
    assert!(
        read == expected,
        "libvhdi read other bytes than the parent's"
    );

    let (read, linkage) = dissect_read(child, ranges);
    let read = read.unwrap_or_else(|e| panic!("dissect: {e}"));
    assert!(
        read == expected,
        "dissect read other bytes than the parent's"
    );
    let (child_linkage, parent_guid) = linkage.unwrap();
    assert_eq!(child_linkage, parent_guid, "as dissect parsed them");
}

#[test]
fn a_child_reads_as_its_parent_in_libvhdi_and_dissect() {
    // Block sizes from qemu's default to the smallest and largest the format allows, and sizes
    // that end inside a block.
    for (len, options) in [
        (5 * MIB as usize + 512, ""),
        (9 * MIB as usize, "block_size=1M"),
        (3 * MIB as usize + 4096, "block_size=256M"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (parent, data) = random_parent(dir.path(), len, options);
        let child = dir.path().join("child.vhdx");
        let made = create_child(&parent, &child, &beside(&parent)).unwrap();
        let parent_info = inspect(&parent).unwrap();
        assert!(made.info.has_parent && !parent_info.has_parent);
        assert_eq!(made.info.virtual_size, len as u64);
        assert_eq!(made.info.block_size, parent_info.block_size, "{options}");
        assert_eq!(made.locator_value("relative_path"), Some(r".\parent.vhdx"));
        assert!(
            made.info
                .warnings
                .iter()
                .any(|w| w.contains("differencing"))
        );

        assert_reads_as(&child, &parent, &[], &data);

        // libvhdi's own tool sees a differencing disk whose parent is ours.
        let shown = run("vhdiinfo", &[child.to_str().unwrap()]);
        assert!(shown.contains("Differential"), "{shown}");
        let parent_id = parent_info.data_write_guid.to_string().to_lowercase();
        assert!(shown.contains(&parent_id), "{parent_id} not in {shown}");
    }
}

#[test]
fn a_child_of_a_disk_larger_than_one_bat_chunk_reads_as_its_parent() {
    // With 1 MiB blocks and 512-byte sectors a chunk covers 4 GiB: a 9 GiB disk has three
    // chunks, so payload entries past the first chunk sit after interleaved sector bitmap
    // entries. The raw parent is sparse, with random data only where the test reads.
    let dir = tempfile::tempdir().unwrap();
    let size = 9 * 1024 * MIB;
    let ranges = [
        (0, MIB),
        (4 * 1024 * MIB - 4096, 2 * MIB),
        (8 * 1024 * MIB + 3 * MIB, MIB),
        (size - MIB, MIB),
    ];
    let raw = dir.path().join("parent.raw");
    let file = std::fs::File::create(&raw).unwrap();
    file.set_len(size).unwrap();
    let mut data = vec![0u8; ranges.iter().map(|r| r.1 as usize).sum()];
    getrandom::fill(&mut data).unwrap();
    let mut used = 0;
    for &(offset, len) in &ranges {
        std::os::unix::fs::FileExt::write_all_at(&file, &data[used..used + len as usize], offset)
            .unwrap();
        used += len as usize;
    }
    drop(file);
    let parent = dir.path().join("parent.vhdx");
    qemu_vhdx(&raw, &parent, "block_size=1M");
    std::fs::remove_file(&raw).unwrap();

    let child = dir.path().join("child.vhdx");
    create_child(&parent, &child, &beside(&parent)).unwrap();
    assert_eq!(used, data.len());
    assert_reads_as(&child, &parent, &ranges, &data);
}

/// Replaces the child's parent_linkage value (UTF-16 in the metadata, which has no checksum)
/// with another GUID of the same length.
fn relink(child: &Path, from: Guid, to: Guid) {
    let utf16 = |g: Guid| -> Vec<u8> {
        g.braced()
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect()
    };
    let (from, to) = (utf16(from), utf16(to));
    let mut bytes = std::fs::read(child).unwrap();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("the child holds its parent_linkage");
    bytes[at..at + to.len()].copy_from_slice(&to);
    std::fs::write(child, bytes).unwrap();
}

#[test]
fn a_child_with_a_wrong_parent_linkage_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, data) = random_parent(dir.path(), 4 * MIB as usize, "");
    let child = dir.path().join("child.vhdx");
    let made = create_child(&parent, &child, &beside(&parent)).unwrap();
    let wrong = Guid::random().unwrap();
    relink(&child, made.parent_linkage, wrong);

    let err = inspect_child(&child, &parent).unwrap_err();
    assert!(matches!(err, VhdxError::Linkage { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("parent linkage check failed"), "{msg}");
    assert!(msg.contains(&child.display().to_string()), "{msg}");
    assert!(msg.contains(&wrong.to_string()), "{msg}");

    let refusal = libvhdi_read(&child, &parent, &[]).expect_err("libvhdi must refuse the child");
    assert!(refusal.contains("set parent"), "{refusal}");

    // dissect.hypervisor 3.21 opens the parent by path and does not compare the linkage: it
    // reads such a child. What it parses shows the mismatch, and that is all it gives.
    let (read, linkage) = dissect_read(&child, &[]);
    let (child_linkage, parent_guid) = linkage.expect("dissect parsed the locator");
    assert_eq!(child_linkage, wrong);
    assert_ne!(child_linkage, parent_guid);
    let read = read.expect("dissect.hypervisor 3.21 reads a child without checking its linkage");
    assert!(read == data);

    // Restored, the same file is accepted by both again.
    relink(&child, wrong, made.parent_linkage);
    assert_reads_as(&child, &parent, &[], &data);
}

#[test]
fn a_child_whose_parent_changed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, _) = random_parent(dir.path(), 4 * MIB as usize, "");
    let child = dir.path().join("child.vhdx");
    let made = create_child(&parent, &child, &beside(&parent)).unwrap();

    // A write through qemu, as booting the golden directly would do: the parent gets a new
    // DataWriteGuid.
    run(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-c",
            "write -P 0x55 0 4k",
            parent.to_str().unwrap(),
        ],
    );
    let changed = inspect(&parent).unwrap().data_write_guid;
    assert_ne!(
        changed, made.parent_linkage,
        "qemu changed the parent's DataWriteGuid"
    );

    let msg = inspect_child(&child, &parent).unwrap_err().to_string();
    assert!(msg.contains("parent linkage check failed"), "{msg}");
    assert!(msg.contains("changed since the child was made"), "{msg}");
    let refusal = libvhdi_read(&child, &parent, &[]).expect_err("libvhdi must refuse the child");
    assert!(refusal.contains("set parent"), "{refusal}");
    let (_, linkage) = dissect_read(&child, &[]);
    let (child_linkage, parent_guid) = linkage.unwrap();
    assert_eq!(parent_guid, changed);
    assert_ne!(child_linkage, parent_guid);
}
