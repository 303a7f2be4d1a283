//! Disk images for the catalog, made by `qemu-img` as real VHDX files.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::output;
use crate::{Server, require_tool};

/// A VHDX of `len` varied bytes (not zeros, which VHDX would store sparsely), made by qemu-img
/// as `dir/golden.vhdx`.
pub fn make_vhdx(dir: &Path, len: usize) -> PathBuf {
    require_tool("qemu-img", "qemu-utils");
    let raw = dir.join("golden.raw");
    let data: Vec<u8> = (0..len)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&raw, &data).unwrap();
    let vhdx = dir.join("golden.vhdx");
    output({
        let mut c = Command::new("qemu-img");
        c.args(["convert", "-f", "raw", "-O", "vhdx"])
            .arg(&raw)
            .arg(&vhdx);
        c
    });
    vhdx
}

/// Makes a VHDX of `len` bytes and adds it with `boottorrent image add`; returns the API's
/// view of the image (ready) and the file.
pub fn catalogue(server: &Server, dir: &Path, len: usize) -> (serde_json::Value, PathBuf) {
    let vhdx = make_vhdx(dir, len);
    let added = output(server.cli(&["image", "add", "--json", vhdx.to_str().unwrap()]));
    let image: serde_json::Value = serde_json::from_slice(&added.stdout).unwrap();
    assert_eq!(image["state"], "ready", "{image}");
    (image, vhdx)
}
