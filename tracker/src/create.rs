//! Creating a single-file `.torrent` (BEP 3) from a file on disk.
//!
//! Threads, all scoped to one [`create`] call:
//! - `threads` workers claim the file's units (runs of whole pieces, about 1 MiB) in increasing
//!   order, read each with positional reads and SHA-1 its pieces on the same core. Together
//!   they make one sequential pass over the file;
//! - the SHA-256 thread (only when asked) receives the finished units, restores file order and
//!   feeds them into one digest.
//!
//! Channels, only with SHA-256: workers → SHA-256 thread (`(unit, Vec<u8>)`), and the buffer
//! pool back to the workers. The pool has a fixed number of buffers, which bounds memory however
//! large the file is. Locks: the pool's receiving end, held only while waiting for a buffer, and
//! the first-error slot; never both, never while hashing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{SystemTime, UNIX_EPOCH};

use boottorrent_bt::bencode::{self, Encoder};
use boottorrent_bt::metainfo::MetainfoError;
use sha1::{Digest, Sha1};
use sha2::Sha256;

/// Smallest piece size [`choose_piece_len`] picks. A machine can pass on a piece only once it
/// has all of it, so the last pieces the seeder sends reach a lab in a few hops of a piece
/// each, at a share of each machine's link: in the simulated 300-machine lab (512 MiB,
/// docs/benchmarks.md) 512 KiB pieces took the median run's last machine from 1.30 to 1.28 ×
/// S/B (0.3-0.4 s sooner with crowded uplinks) and a fifth of the bytes off the uplinks.
/// Smaller still (256 KiB) left a few machines far behind the rest; multi-gigabyte images get
/// larger pieces anyway, from the piece count.
pub const MIN_AUTO_PIECE_LEN: u32 = 512 * 1024;
/// Largest piece size [`choose_piece_len`] picks: peers hold a piece in memory until it
/// verifies, and a lost piece costs its whole length again.
pub const MAX_AUTO_PIECE_LEN: u32 = 16 * 1024 * 1024;
/// Smallest piece size accepted from the caller: one BitTorrent block. libtorrent refuses less.
pub const MIN_PIECE_LEN: u32 = 16 * 1024;
/// Largest piece size accepted from the caller; our swarm engine refuses torrents above it.
pub const MAX_PIECE_LEN: u32 = 64 * 1024 * 1024;

/// [`choose_piece_len`] aims at no more than this many pieces: a piece list that is small to
/// send (40 KB of hashes) yet fine enough for hundreds of peers to trade different pieces.
const TARGET_MAX_PIECES: u64 = 2000;

/// Bytes a worker claims at a time, rounded up to whole pieces: large enough that claiming is
/// rare, small enough that a few per worker keep memory in the megabytes.
const UNIT_TARGET: usize = 1024 * 1024;

/// Memory the SHA-256 buffer pool may use beyond one unit per worker, which it always gets.
const MAX_POOL_BYTES: usize = 256 * 1024 * 1024;

/// Bytes per read: what the kernel copies in one call, then SHA-1 reads while it is still in
/// the core's L2 cache.
const READ_LEN: usize = 256 * 1024;

/// How to build a torrent.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Tracker URL written as `announce`.
    pub announce: String,
    /// Piece size in bytes: a power of two between 16 KiB and 64 MiB. `None` picks one from the
    /// file size with [`choose_piece_len`].
    pub piece_len: Option<u32>,
    /// Sets the BEP 27 `private` flag (peers only from the tracker, no DHT or PEX). When false
    /// the key is left out, as standard creators do, so info hashes match theirs.
    pub private: bool,
    /// SHA-1 worker threads; 0 means one per core.
    pub threads: usize,
    /// The torrent's `name`, which downloaders use as the file name. `None` takes the file's
    /// own name.
    pub name: Option<String>,
    /// Also compute the SHA-256 of the whole file, in the same read.
    pub sha256: bool,
}

/// A created torrent and what was learnt while hashing.
#[derive(Clone, PartialEq, Eq)]
pub struct Created {
    /// The bencoded `.torrent` file.
    pub torrent: Vec<u8>,
    /// SHA-1 of the bencoded `info` dictionary.
    pub info_hash: [u8; 20],
    /// SHA-256 of the whole file, when [`CreateOptions::sha256`] asked for it.
    pub sha256: Option<[u8; 32]>,
    /// Piece size in bytes.
    pub piece_len: u32,
    /// File size in bytes.
    pub length: u64,
    /// Number of pieces; the last one may be short.
    pub piece_count: u32,
}

// The derived Debug would dump the whole torrent, piece hashes included.
impl std::fmt::Debug for Created {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Created")
            .field("torrent", &format_args!("<{} bytes>", self.torrent.len()))
            .field("info_hash", &hex::encode(self.info_hash))
            .field("sha256", &self.sha256.map(hex::encode))
            .field("piece_len", &self.piece_len)
            .field("length", &self.length)
            .field("piece_count", &self.piece_count)
            .finish()
    }
}

/// Why a torrent could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The file could not be opened or examined (missing, no permission, ...).
    #[error("creating a torrent of {}: cannot open the file: {cause}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        cause: io::Error,
    },
    /// The path names a directory.
    #[error(
        "creating a torrent of {}: it is a directory; a torrent here holds exactly one file",
        path.display()
    )]
    IsDirectory {
        /// The directory.
        path: PathBuf,
    },
    /// The path names something that is neither a file nor a directory (a FIFO, a socket, ...).
    #[error("creating a torrent of {}: it is not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file holds no bytes; BitTorrent cannot describe an empty file.
    #[error("creating a torrent of {}: the file is empty (0 bytes)", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A read failed part-way through the file.
    #[error("creating a torrent of {}: reading at byte {offset}: {cause}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Where the failed read started.
        offset: u64,
        /// The operating system's reason.
        cause: io::Error,
    },
    /// The file grew or shrank while it was read, so the hashes describe no consistent state.
    #[error(
        "creating a torrent of {}: the file changed while it was read: it was {expected} bytes \
         when opened, {found}",
        path.display()
    )]
    Changed {
        /// The file.
        path: PathBuf,
        /// Its size when opened.
        expected: u64,
        /// What was found instead, such as "but ended after 1048576 bytes".
        found: String,
    },
    /// The requested piece size is unusable.
    #[error(
        "creating a torrent: piece size {piece_len} bytes is invalid: it must be a power of two \
         between {MIN_PIECE_LEN} and {MAX_PIECE_LEN} bytes"
    )]
    InvalidPieceLen {
        /// The requested piece size in bytes.
        piece_len: u32,
    },
    /// The piece size is so small that the piece count does not fit in 32 bits.
    #[error(
        "creating a torrent of {}: {length} bytes in {piece_len}-byte pieces is too many pieces; \
         use a larger piece size",
        path.display()
    )]
    TooManyPieces {
        /// The file.
        path: PathBuf,
        /// File size in bytes.
        length: u64,
        /// Piece size in bytes.
        piece_len: u32,
    },
    /// The torrent's name cannot serve as a file name for downloaders.
    #[error("creating a torrent of {}: name {name:?} {reason}", path.display())]
    InvalidName {
        /// The file.
        path: PathBuf,
        /// The name, lossily decoded when it is not UTF-8.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No announce URL was given.
    #[error("creating a torrent: the announce URL is empty")]
    EmptyAnnounce,
    /// The caller's cancel flag was set before every piece was hashed.
    #[error("creating a torrent of {}: cancelled", path.display())]
    Cancelled {
        /// The file.
        path: PathBuf,
    },
}

/// Picks a piece size for a file of `file_len` bytes: the smallest power of two that yields at
/// most 2,000 pieces (so between 1,000 and 2,000), clamped to 512 KiB ..= 16 MiB.
pub fn choose_piece_len(file_len: u64) -> u32 {
    let wanted = file_len
        .div_ceil(TARGET_MAX_PIECES)
        .max(1)
        .next_power_of_two();
    wanted.clamp(u64::from(MIN_AUTO_PIECE_LEN), u64::from(MAX_AUTO_PIECE_LEN)) as u32
}

/// Hashes the file at `path` in one sequential read and returns its single-file torrent.
///
/// `progress` is called from the hashing threads with the number of bytes hashed so far; it
/// must be cheap. The `info` dictionary holds exactly `length`, `name`, `piece length`, `pieces`
/// and, when asked, `private` = 1, so the info hash equals that of any standard creator given
/// the same file, name, piece size and private flag.
pub fn create(
    path: &Path,
    opts: &CreateOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Created, CreateError> {
    create_cancellable(path, opts, progress, &AtomicBool::new(false))
}

/// [`create`], stopping with [`CreateError::Cancelled`] once `cancel` is set: the workers look
/// at it before each unit (about 1 MiB), so a long hash stops within a unit per worker.
pub fn create_cancellable(
    path: &Path,
    opts: &CreateOptions,
    progress: &(dyn Fn(u64) + Sync),
    cancel: &AtomicBool,
) -> Result<Created, CreateError> {
    if opts.announce.is_empty() {
        return Err(CreateError::EmptyAnnounce);
    }
    if let Some(piece_len) = opts.piece_len {
        if !piece_len.is_power_of_two() || !(MIN_PIECE_LEN..=MAX_PIECE_LEN).contains(&piece_len) {
            return Err(CreateError::InvalidPieceLen { piece_len });
        }
    }
    let name = torrent_name(path, opts.name.as_deref())?;

    let open_err = |cause| CreateError::Open {
        path: path.to_owned(),
        cause,
    };
    let file = File::open(path).map_err(open_err)?;
    // Examined through the open handle, so what we checked is what we read.
    let meta = file.metadata().map_err(open_err)?;
    if meta.is_dir() {
        return Err(CreateError::IsDirectory {
            path: path.to_owned(),
        });
    }
    if !meta.is_file() {
        return Err(CreateError::NotAFile {
            path: path.to_owned(),
        });
    }
    let length = meta.len();
    if length == 0 {
        return Err(CreateError::Empty {
            path: path.to_owned(),
        });
    }

    let piece_len = opts.piece_len.unwrap_or_else(|| choose_piece_len(length));
    let piece_count = u32::try_from(length.div_ceil(u64::from(piece_len))).map_err(|_| {
        CreateError::TooManyPieces {
            path: path.to_owned(),
            length,
            piece_len,
        }
    })?;
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .min(piece_count as usize);

    let hashed = hash_file(
        &file,
        path,
        length,
        piece_len,
        piece_count,
        threads,
        opts.sha256,
        progress,
        cancel,
    )?;
    // A file still growing was hashed up to its size at open time: a state that never existed
    // on disk as a whole.
    match read_at(&file, &mut [0u8; 1], length) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
        Ok(()) => {
            return Err(CreateError::Changed {
                path: path.to_owned(),
                expected: length,
                found: "but grew while it was read".to_owned(),
            });
        }
        Err(cause) => {
            return Err(CreateError::Read {
                path: path.to_owned(),
                offset: length,
                cause,
            });
        }
    }

    let info = Info {
        length,
        name: &name,
        piece_len,
        pieces: &hashed.pieces,
        private: opts.private,
    };
    let mut encoder = Encoder::new();
    info.encode(&mut encoder);
    let info_bytes = encoder.finish();
    let creation_date = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut encoder = Encoder::with_capacity(info_bytes.len() + 128 + opts.announce.len());
    encoder.dict(|d| {
        d.entry(b"announce", |e| e.bytes(opts.announce.as_bytes()));
        d.entry(b"created by", |e| {
            e.bytes(concat!("BootTorrent ", env!("CARGO_PKG_VERSION")).as_bytes())
        });
        d.entry(b"creation date", |e| e.int(creation_date));
        d.entry(b"info", |e| info.encode(e));
    });
    let torrent = encoder.finish();
    // The info hash is taken over a separate encoding of the same dictionary; `info` is the
    // last key, so the torrent must end with exactly those bytes and the closing `e`.
    debug_assert!(torrent[..torrent.len() - 1].ends_with(&info_bytes));

    Ok(Created {
        torrent,
        info_hash: Sha1::digest(&info_bytes).into(),
        sha256: hashed.sha256,
        piece_len,
        length,
        piece_count,
    })
}

/// The torrent's name: given, or the file's own; either way usable as a downloader's file name.
fn torrent_name(path: &Path, given: Option<&str>) -> Result<String, CreateError> {
    let invalid = |name: String, reason| CreateError::InvalidName {
        path: path.to_owned(),
        name,
        reason,
    };
    let name = match given {
        Some(name) => name.to_owned(),
        None => {
            let Some(os_name) = path.file_name() else {
                return Err(invalid(
                    path.display().to_string(),
                    "has no file name to use; give one",
                ));
            };
            os_name
                .to_str()
                .ok_or_else(|| {
                    invalid(
                        os_name.to_string_lossy().into_owned(),
                        "is not UTF-8; give a name",
                    )
                })?
                .to_owned()
        }
    };
    // The rule our swarm engine applies when it reads a torrent: a name that could point
    // elsewhere in a downloader's directory is refused rather than silently rewritten.
    match boottorrent_bt::metainfo::check_file_name(&name) {
        Ok(()) => Ok(name),
        Err(reason) => Err(invalid(name, reason)),
    }
}

/// The `info` dictionary, in bencode's sorted key order.
struct Info<'a> {
    length: u64,
    name: &'a str,
    piece_len: u32,
    pieces: &'a [u8],
    private: bool,
}

impl Info<'_> {
    fn encode(&self, e: &mut Encoder) {
        e.dict(|d| {
            d.entry(b"length", |e| e.int(self.length));
            d.entry(b"name", |e| e.bytes(self.name.as_bytes()));
            d.entry(b"piece length", |e| e.int(self.piece_len));
            d.entry(b"pieces", |e| e.bytes(self.pieces));
            if self.private {
                d.entry(b"private", |e| e.int(1));
            }
        })
    }
}

/// The hashes of one read of a file.
struct Hashed {
    /// Concatenated SHA-1 of every piece, in piece order.
    pieces: Vec<u8>,
    sha256: Option<[u8; 32]>,
}

/// What every worker shares: the file, its geometry, the next unit to claim, the first error.
struct Job<'a> {
    file: &'a File,
    path: &'a Path,
    length: u64,
    piece_len: usize,
    unit_len: usize,
    units: u64,
    /// Units are claimed in increasing order, which keeps the reads of all workers together one
    /// sequential pass over the file.
    next_unit: AtomicU64,
    /// Set on the first error, so the other workers stop claiming work.
    failed: AtomicBool,
    error: Mutex<Option<CreateError>>,
    hashed_bytes: AtomicU64,
    progress: &'a (dyn Fn(u64) + Sync),
    /// The caller's: stops the workers like a failure, without one of their own.
    cancel: &'a AtomicBool,
}

impl Job<'_> {
    /// Claims the next unit, or `None` when the file is done, a worker failed or the caller
    /// cancelled.
    fn claim(&self) -> Option<u64> {
        if self.failed.load(Ordering::Relaxed) || self.cancel.load(Ordering::Relaxed) {
            return None;
        }
        let unit = self.next_unit.fetch_add(1, Ordering::Relaxed);
        (unit < self.units).then_some(unit)
    }

    fn fail(&self, error: CreateError) {
        self.failed.store(true, Ordering::Relaxed);
        self.error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get_or_insert(error);
    }

    /// Reads unit `unit` and appends the SHA-1 of each of its pieces to `out`. With `keep`,
    /// `buf` ends up holding the whole unit (for the SHA-256 thread); without, it is only a
    /// window that each read reuses.
    ///
    /// Reads go in `READ_LEN` steps, each hashed at once: the bytes the kernel just copied are
    /// still in this core's cache when SHA-1 reads them, and a reused window stays there.
    fn hash_unit(
        &self,
        unit: u64,
        buf: &mut Vec<u8>,
        keep: bool,
        out: &mut Vec<(u32, [u8; 20])>,
    ) -> Result<(), CreateError> {
        let start = unit * self.unit_len as u64;
        let len = (self.length - start).min(self.unit_len as u64) as usize;
        buf.resize(if keep { len } else { len.min(READ_LEN) }, 0);
        let mut index = (start / self.piece_len as u64) as u32;
        let mut sha1 = Sha1::new();
        let mut in_piece = 0;
        let mut finish_piece = |sha1: &mut Sha1, piece_bytes: usize| {
            out.push((index, sha1.finalize_reset().into()));
            index += 1;
            let piece_bytes = piece_bytes as u64;
            (self.progress)(
                self.hashed_bytes.fetch_add(piece_bytes, Ordering::Relaxed) + piece_bytes,
            );
        };
        let mut pos = 0;
        while pos < len {
            let end = (pos + READ_LEN).min(len);
            let window = if keep { pos..end } else { 0..end - pos };
            let bytes = &mut buf[window];
            read_at(self.file, bytes, start + pos as u64).map_err(|cause| {
                if cause.kind() == io::ErrorKind::UnexpectedEof {
                    CreateError::Changed {
                        path: self.path.to_owned(),
                        expected: self.length,
                        found: format!("but ended before byte {}", start + end as u64),
                    }
                } else {
                    CreateError::Read {
                        path: self.path.to_owned(),
                        offset: start + pos as u64,
                        cause,
                    }
                }
            })?;
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let (now, later) = rest.split_at(rest.len().min(self.piece_len - in_piece));
                sha1.update(now);
                in_piece += now.len();
                rest = later;
                if in_piece == self.piece_len {
                    finish_piece(&mut sha1, in_piece);
                    in_piece = 0;
                }
            }
            pos = end;
        }
        // Units hold whole pieces, so only the file's last piece can be left open here.
        if in_piece > 0 {
            finish_piece(&mut sha1, in_piece);
        }
        Ok(())
    }
}

/// Hashes the whole file on `threads` workers.
///
/// Each worker claims the next unit of whole pieces, reads it with positional reads and hashes
/// it on the same core. (A separate reader thread handing buffers to hashers was measured ~10%
/// slower on two cores: every byte then crosses between cores' caches, and a third busy thread
/// competes for the CPUs.) With SHA-256, finished units go to the SHA-256 thread, which puts
/// them back in file order; their buffers come from a fixed pool that it refills, so a slow
/// SHA-256 pauses the workers instead of growing memory.
#[allow(clippy::too_many_arguments)] // one private call site; a struct would only rename them
fn hash_file(
    file: &File,
    path: &Path,
    length: u64,
    piece_len: u32,
    piece_count: u32,
    threads: usize,
    sha256: bool,
    progress: &(dyn Fn(u64) + Sync),
    cancel: &AtomicBool,
) -> Result<Hashed, CreateError> {
    let piece = piece_len as usize;
    let unit_len = piece * (UNIT_TARGET / piece).max(1);
    let job = Job {
        file,
        path,
        length,
        piece_len: piece,
        unit_len,
        units: length.div_ceil(unit_len as u64),
        next_unit: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        hashed_bytes: AtomicU64::new(0),
        progress,
        cancel,
    };

    // The pool exists only for SHA-256: without it a worker keeps reusing its own buffer.
    let (pool_tx, pool_rx) = mpsc::channel::<Vec<u8>>();
    if sha256 {
        // Two units per worker: one being hashed, one waiting for the SHA-256 thread; plus two
        // so that a unit finished out of order does not stall everyone.
        let buffers = (2 * threads + 2).min((MAX_POOL_BYTES / unit_len).max(threads + 1));
        for _ in 0..buffers {
            pool_tx
                .send(Vec::with_capacity(unit_len))
                .expect("the pool's receiver is alive");
        }
    }
    let pool_rx = Mutex::new(pool_rx);
    let (sha_tx, sha_rx) = if sha256 {
        let (tx, rx) = mpsc::channel::<(u64, Vec<u8>)>();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };

    let (pieces, seen, sha256) = std::thread::scope(|scope| {
        let sha256_thread = sha_rx.map(|rx| {
            let pool_tx = pool_tx.clone();
            std::thread::Builder::new()
                .name("torrent-sha256".into())
                .spawn_scoped(scope, move || {
                    let mut hasher = Sha256::new();
                    let mut next = 0u64;
                    let mut early = BTreeMap::new();
                    for (unit, buf) in rx {
                        early.insert(unit, buf);
                        while let Some(buf) = early.remove(&next) {
                            hasher.update(&buf);
                            next += 1;
                            let _ = pool_tx.send(buf);
                        }
                    }
                    <[u8; 32]>::from(hasher.finalize())
                })
                .expect("spawning the torrent SHA-256 thread")
        });

        let workers: Vec<_> = (0..threads)
            .map(|i| {
                let (job, pool_rx, pool_tx, sha_tx) =
                    (&job, &pool_rx, pool_tx.clone(), sha_tx.clone());
                std::thread::Builder::new()
                    .name(format!("torrent-sha1-{i}"))
                    .spawn_scoped(scope, move || {
                        let mut out = Vec::new();
                        let mut own = Vec::new();
                        loop {
                            let mut buf = if sha_tx.is_some() {
                                // Buffers only wait in the SHA-256 thread, which always gets
                                // the unit it waits for: that unit's worker holds a buffer.
                                let next = pool_rx.lock().map(|rx| rx.recv());
                                match next {
                                    Ok(Ok(buf)) => buf,
                                    _ => break,
                                }
                            } else {
                                std::mem::take(&mut own)
                            };
                            let Some(unit) = job.claim() else {
                                // Handing the buffer on wakes the next worker waiting for one,
                                // which then finds nothing to claim either.
                                let _ = pool_tx.send(buf);
                                break;
                            };
                            let keep = sha_tx.is_some();
                            if let Err(e) = job.hash_unit(unit, &mut buf, keep, &mut out) {
                                job.fail(e);
                                let _ = pool_tx.send(buf);
                                break;
                            }
                            match &sha_tx {
                                Some(tx) => {
                                    let _ = tx.send((unit, buf));
                                }
                                None => own = buf,
                            }
                        }
                        out
                    })
                    .expect("spawning a torrent hashing thread")
            })
            .collect();
        // Only the workers' clones may keep the SHA-256 thread waiting for more.
        drop(sha_tx);

        let mut pieces = vec![0u8; piece_count as usize * 20];
        let mut seen = 0u32;
        for worker in workers {
            for (index, hash) in join(worker) {
                let at = index as usize * 20;
                pieces[at..at + 20].copy_from_slice(&hash);
                seen += 1;
            }
        }
        (pieces, seen, sha256_thread.map(join))
    });
    if let Some(error) = job.error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(error);
    }
    // Set after the last unit was claimed, the flag changed nothing: the hash is whole.
    if seen < piece_count && cancel.load(Ordering::Relaxed) {
        return Err(CreateError::Cancelled {
            path: path.to_owned(),
        });
    }
    assert_eq!(seen, piece_count, "every piece is hashed exactly once");
    Ok(Hashed { pieces, sha256 })
}

/// Fills `buf` from `offset` without moving a shared file position, so workers read in
/// parallel through one handle.
#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match std::os::windows::fs::FileExt::seek_read(file, buf, offset) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Joins a scoped thread, passing its panic on to the caller.
/// The same `.torrent` announcing to `announce` instead: `announce` replaced, any
/// `announce-list` dropped, every other key copied byte for byte, so the `info` dictionary
/// and with it the info hash stay as they were. The server hands each machine the image's
/// torrent with that machine's passkey in the announce URL this way.
pub fn with_announce(torrent: &[u8], announce: &str) -> Result<Vec<u8>, MetainfoError> {
    let root = bencode::decode(torrent).map_err(MetainfoError::Bencode)?;
    let dict = root
        .as_dict()
        .ok_or(MetainfoError::NotADict { found: root.kind() })?;
    let mut out = Encoder::with_capacity(torrent.len() + announce.len());
    // In the order the keys came: the decoder accepts any order, and re-encoding a decoded
    // value reproduces its exact bytes.
    out.dict_as_decoded(|d| {
        let mut announced = false;
        for (key, value) in dict.iter() {
            if key == b"announce" || key == b"announce-list" {
                if key == b"announce" {
                    d.entry(key, |e| e.bytes(announce.as_bytes()));
                    announced = true;
                }
                continue;
            }
            if !announced && key > b"announce".as_slice() {
                // Keys are sorted: one missing before this key goes here.
                d.entry(b"announce", |e| e.bytes(announce.as_bytes()));
                announced = true;
            }
            d.entry(key, |e| e.value(value));
        }
        if !announced {
            d.entry(b"announce", |e| e.bytes(announce.as_bytes()));
        }
    });
    Ok(out.finish())
}

fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn with_announce_changes_the_tracker_but_not_the_info_hash() {
        let file = file_with(&[7u8; 100_000]);
        let created = create(file.path(), &opts(), &|_| {}).unwrap();
        let url = "http://boot.lab:8080/announce/pc-1/00112233445566778899aabbccddeeff";
        let rewritten = with_announce(&created.torrent, url).unwrap();
        let text = String::from_utf8_lossy(&rewritten);
        assert!(text.starts_with(&format!("d8:announce{}:{url}10:created by", url.len())));
        // The info dictionary is the same bytes at the end of both.
        let info = |t: &[u8]| {
            let at = t.windows(6).position(|w| w == b"4:info").unwrap() + 6;
            t[at..t.len() - 1].to_vec()
        };
        assert_eq!(info(&rewritten), info(&created.torrent));
        let hash: [u8; 20] = Sha1::digest(info(&rewritten)).into();
        assert_eq!(hash, created.info_hash);
        // Twice is the same as once; junk is an error, not a panic.
        assert_eq!(with_announce(&rewritten, url).unwrap(), rewritten);
        assert!(with_announce(b"i3e", url).is_err());
        assert!(with_announce(b"d8:announce", url).is_err());
    }

    fn opts() -> CreateOptions {
        CreateOptions {
            announce: "http://tracker.test/announce".into(),
            piece_len: Some(MIN_PIECE_LEN),
            private: false,
            threads: 2,
            name: None,
            sha256: false,
        }
    }

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(bytes).unwrap();
        file.flush().unwrap();
        file
    }

    /// Deterministic, non-repeating bytes: every piece hashes differently.
    fn data(len: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    fn expected_pieces(bytes: &[u8], piece_len: u32) -> Vec<u8> {
        bytes
            .chunks(piece_len as usize)
            .flat_map(|piece| <[u8; 20]>::from(Sha1::digest(piece)))
            .collect()
    }

    #[test]
    fn piece_len_aims_at_one_to_two_thousand_pieces() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(choose_piece_len(1), MIN_AUTO_PIECE_LEN);
        assert_eq!(choose_piece_len(100 * MIB), MIN_AUTO_PIECE_LEN);
        assert_eq!(choose_piece_len(512 * MIB), 512 * 1024);
        assert_eq!(choose_piece_len(1000 * MIB), 512 * 1024);
        assert_eq!(choose_piece_len(1000 * MIB + 1), 1024 * 1024);
        assert_eq!(choose_piece_len(2000 * MIB), 1024 * 1024);
        assert_eq!(choose_piece_len(2000 * MIB + 1), 2 * 1024 * 1024);
        assert_eq!(choose_piece_len(20 * 1024 * MIB), 16 * 1024 * 1024);
        assert_eq!(choose_piece_len(u64::MAX), MAX_AUTO_PIECE_LEN);
        for len in [3 * 1024 * MIB, 7 * 1024 * MIB + 5, 30 * 1024 * MIB] {
            let pieces = len.div_ceil(u64::from(choose_piece_len(len)));
            assert!(
                (1000..=2000).contains(&pieces),
                "{len} bytes: {pieces} pieces"
            );
        }
    }

    #[test]
    fn pieces_match_a_sequential_hash_for_every_thread_count_and_tail() {
        let piece = MIN_PIECE_LEN as usize;
        // Units hold 64 pieces of 16 KiB, so these lengths also cross unit boundaries.
        for len in [1, piece - 1, piece, piece + 1, 3 * piece, 600 * piece + 7] {
            let bytes = data(len);
            let file = file_with(&bytes);
            for threads in [1, 2, 3, 0] {
                let opts = CreateOptions {
                    threads,
                    sha256: true,
                    ..opts()
                };
                let created = create(file.path(), &opts, &|_| {}).unwrap();
                let info = info_of(&created.torrent);
                assert_eq!(created.length, len as u64);
                assert_eq!(created.piece_count as usize, len.div_ceil(piece));
                assert_eq!(
                    pieces_of(info),
                    expected_pieces(&bytes, MIN_PIECE_LEN),
                    "{len} bytes on {threads} threads"
                );
                assert_eq!(created.sha256, Some(Sha256::digest(&bytes).into()));
            }
        }
    }

    #[test]
    fn pieces_larger_than_one_read_are_hashed_across_reads() {
        // 1 and 2 MiB pieces span several reads each; the last piece is short and spans two.
        let len = 5 * 1024 * 1024 + 300 * 1024 + 3;
        let bytes = data(len);
        let file = file_with(&bytes);
        for piece_len in [1024 * 1024, 2 * 1024 * 1024] {
            for threads in [1, 2, 8] {
                let opts = CreateOptions {
                    piece_len: Some(piece_len),
                    threads,
                    sha256: true,
                    ..opts()
                };
                let created = create(file.path(), &opts, &|_| {}).unwrap();
                assert_eq!(
                    pieces_of(info_of(&created.torrent)),
                    expected_pieces(&bytes, piece_len),
                    "{piece_len}-byte pieces on {threads} threads"
                );
                assert_eq!(created.sha256, Some(Sha256::digest(&bytes).into()));
            }
        }
    }

    /// The bytes of the `info` value inside a torrent we wrote (the last key of the root).
    fn info_of(torrent: &[u8]) -> &[u8] {
        let at = torrent
            .windows(6)
            .position(|w| w == b"4:info")
            .expect("torrent has an info key");
        &torrent[at + 6..torrent.len() - 1]
    }

    fn pieces_of(info: &[u8]) -> Vec<u8> {
        let at = info.windows(8).position(|w| w == b"6:pieces").unwrap() + 8;
        let colon = at + info[at..].iter().position(|&b| b == b':').unwrap();
        let len: usize = std::str::from_utf8(&info[at..colon])
            .unwrap()
            .parse()
            .unwrap();
        info[colon + 1..colon + 1 + len].to_vec()
    }

    #[test]
    fn metainfo_layout_is_exactly_the_standard_keys() {
        let bytes = data(40_000);
        let file = file_with(&bytes);
        let opts = CreateOptions {
            name: Some("disk.vhdx".into()),
            private: true,
            ..opts()
        };
        let progress = AtomicU64::new(0);
        let created = create(file.path(), &opts, &|n| {
            progress.fetch_max(n, Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(progress.into_inner(), 40_000);
        assert_eq!(created.sha256, None);

        let pieces = expected_pieces(&bytes, MIN_PIECE_LEN);
        let mut info =
            b"d6:lengthi40000e4:name9:disk.vhdx12:piece lengthi16384e6:pieces60:".to_vec();
        info.extend_from_slice(&pieces);
        info.extend_from_slice(b"7:privatei1ee");
        assert_eq!(info_of(&created.torrent), &info[..]);
        assert_eq!(created.info_hash, <[u8; 20]>::from(Sha1::digest(&info)));

        let head = String::from_utf8_lossy(&created.torrent).into_owned();
        let expected_head = format!(
            "d8:announce28:http://tracker.test/announce10:created by{}:BootTorrent {}13:creation datei",
            "BootTorrent ".len() + env!("CARGO_PKG_VERSION").len(),
            env!("CARGO_PKG_VERSION"),
        );
        assert!(head.starts_with(&expected_head), "{head}");
    }

    #[test]
    fn our_swarm_engine_reads_what_we_write() {
        let bytes = data(100_000);
        let file = file_with(&bytes);
        let opts = CreateOptions {
            piece_len: None,
            ..opts()
        };
        let created = create(file.path(), &opts, &|_| {}).unwrap();
        let meta = boottorrent_bt::metainfo::Metainfo::from_bytes(&created.torrent).unwrap();
        assert_eq!(meta.info_hash.0, created.info_hash);
        assert_eq!(meta.geometry.total_len, 100_000);
        assert_eq!(meta.geometry.piece_len, MIN_AUTO_PIECE_LEN);
        assert_eq!(
            meta.name,
            file.path().file_name().unwrap().to_str().unwrap()
        );
        assert!(!meta.private);
        assert_eq!(meta.announce, ["http://tracker.test/announce"]);
    }

    #[test]
    fn refuses_empty_missing_and_directory_inputs_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        let missing = dir.path().join("missing.img");
        let cases: [(&Path, &str); 3] = [
            (&empty, "the file is empty"),
            (&missing, "cannot open the file"),
            (dir.path(), "it is a directory"),
        ];
        for (path, cause) in cases {
            let err = create(path, &opts(), &|_| {}).unwrap_err().to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains(cause), "{err}");
        }
    }

    #[test]
    fn refuses_bad_options() {
        let file = file_with(b"x");
        for piece_len in [0, 1000, MIN_PIECE_LEN / 2, MAX_PIECE_LEN * 2] {
            let opts = CreateOptions {
                piece_len: Some(piece_len),
                ..opts()
            };
            let err = create(file.path(), &opts, &|_| {}).unwrap_err();
            assert!(matches!(err, CreateError::InvalidPieceLen { .. }), "{err}");
        }
        for name in ["", "..", "a/b", "a\\b"] {
            let opts = CreateOptions {
                name: Some(name.into()),
                ..opts()
            };
            let err = create(file.path(), &opts, &|_| {}).unwrap_err();
            assert!(matches!(err, CreateError::InvalidName { .. }), "{err}");
        }
        let opts = CreateOptions {
            announce: String::new(),
            ..opts()
        };
        let err = create(file.path(), &opts, &|_| {}).unwrap_err();
        assert!(matches!(err, CreateError::EmptyAnnounce), "{err}");
    }

    #[test]
    fn a_set_cancel_flag_stops_the_hash_part_way_with_or_without_sha256() {
        // Many 1 MiB units, so that the flag, set after the first piece, leaves most unread.
        let bytes = data(16 << 20);
        let file = file_with(&bytes);
        for sha256 in [false, true] {
            let opts = CreateOptions { sha256, ..opts() };
            let cancel = AtomicBool::new(false);
            let hashed = AtomicU64::new(0);
            let err = create_cancellable(
                file.path(),
                &opts,
                &|n| {
                    hashed.fetch_max(n, Ordering::Relaxed);
                    cancel.store(true, Ordering::Relaxed);
                },
                &cancel,
            )
            .unwrap_err();
            assert!(matches!(err, CreateError::Cancelled { .. }), "{err}");
            assert!(err.to_string().contains("cancelled"), "{err}");
            let hashed = hashed.into_inner();
            assert!(hashed < bytes.len() as u64 / 2, "hashed {hashed} bytes");
        }
        // Set before the start, nothing is read at all.
        let err =
            create_cancellable(file.path(), &opts(), &|_| {}, &AtomicBool::new(true)).unwrap_err();
        assert!(matches!(err, CreateError::Cancelled { .. }), "{err}");
    }
}
