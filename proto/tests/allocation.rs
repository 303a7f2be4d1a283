//! Hostile length headers must not make the decoder allocate what they claim.
//!
//! An error alone would not show that: Linux overcommits, so a 4 GiB reservation succeeds
//! and the decode then fails for lack of data, looking just like a careful decoder. This
//! binary counts the largest single allocation instead; it holds one test so that no other
//! test's allocations mix in.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use boottorrent_proto::{CommandKind, EventKind, decode_command, decode_event};

struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

/// MessagePack map `{key: <header>}` wrapped as an envelope `{"body": {...}}`, where the
/// header claims 4 Gi items or bytes that are not there.
fn hostile(key: &str, header: &[u8]) -> Vec<u8> {
    let mut inner = vec![0x81, 0xa0 | key.len() as u8];
    inner.extend_from_slice(key.as_bytes());
    inner.extend_from_slice(header);
    let mut bytes = vec![0x81, 0xa4];
    bytes.extend_from_slice(b"body");
    bytes.extend(inner);
    bytes
}

#[test]
fn hostile_length_headers_allocate_little() {
    const HEADERS: [[u8; 5]; 4] = [
        [0xdd, 0xff, 0xff, 0xff, 0xff], // array32
        [0xdf, 0xff, 0xff, 0xff, 0xff], // map32
        [0xdb, 0xff, 0xff, 0xff, 0xff], // str32
        [0xc6, 0xff, 0xff, 0xff, 0xff], // bin32
    ];
    let keys = [
        "images",
        "ips",
        "macs",
        "zones",
        "hostname",
        "public_key",
        "info_hash",
    ];
    let mut inputs = vec![
        [0xdf, 0xff, 0xff, 0xff, 0xff].to_vec(),
        [0xdd, 0xff, 0xff, 0xff, 0xff].to_vec(),
    ];
    for key in keys {
        for header in HEADERS {
            inputs.push(hostile(key, &header));
        }
    }

    LARGEST.store(0, Ordering::Relaxed);
    for bytes in &inputs {
        for &kind in EventKind::ALL {
            assert!(decode_event(kind, bytes).is_err());
        }
        for &kind in CommandKind::ALL {
            assert!(decode_command(kind, bytes).is_err());
        }
    }
    // serde preallocates at most 1 MiB for a sequence whatever its header says; anything
    // near the claimed 4 GiB (or even the 64 KiB payload cap times a large factor) is a bug.
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest <= 1 << 20, "largest allocation was {largest} bytes");
}
