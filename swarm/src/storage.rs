//! The one file of a torrent on disk, piece verification and resume.
//!
//! A finished piece arrives here whole, from the blocks the engine held in memory: it is
//! hashed from them and written only if it matches ([`Storage::store_piece`]). Blocks that
//! arrived while the engine's memory budget was spent were written one by one as they came
//! ([`Storage::write_block`]); a piece with such blocks is verified by reading it back.
//!
//! Everything here is synchronous and takes `&self`: the engine calls it from
//! `spawn_blocking`, and positional I/O (`pread`/`pwrite`) needs no shared file cursor, so a
//! [`Storage`] is shared between tasks without a lock.
//!
//! Resume: [`save_resume`] records which pieces are good together with the file's length and
//! mtime; [`check_existing`] trusts that record only while both still match, and otherwise
//! re-hashes the whole file. A file changed behind our back is therefore never trusted.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use sha1::{Digest, Sha1};

use crate::{Bitfield, Geometry, InfoHash};

/// Most bytes read per call while hashing: large enough that a re-hash runs at disk speed,
/// small enough that several threads hashing 16 MiB pieces stay cheap.
const HASH_CHUNK: usize = 4 * 1024 * 1024;

/// First bytes of a resume record.
const RESUME_MAGIC: &[u8; 4] = b"BTRS";
/// Bumped whenever the record layout changes; other versions fall back to a re-hash.
const RESUME_VERSION: u8 = 1;
/// magic, version, info hash, file length, mtime in ns, piece count.
const RESUME_HEADER_LEN: usize = 4 + 1 + 20 + 8 + 16 + 4;
/// The trailing SHA-1 that catches torn and corrupt records.
const RESUME_DIGEST_LEN: usize = 20;

/// How a [`Storage`] opens its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Seeding a file that must already be complete (the server's catalog); never written.
    ReadOnly,
    /// Downloading: the file is created and sized as needed.
    ReadWrite,
}

impl Access {
    fn describe(self) -> &'static str {
        match self {
            Access::ReadOnly => "for reading",
            Access::ReadWrite => "for reading and writing",
        }
    }
}

/// A storage operation failed. Every message names the action, the file and the cause, so a
/// log line alone tells an operator which disk is full or which path is wrong.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Creating the directories that hold the data file or the resume record.
    #[error("creating directory {}: {source}", .path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Opening the data file.
    #[error("opening {} {}: {source}", .path.display(), .access.describe())]
    Open {
        /// The data file.
        path: PathBuf,
        /// How it was being opened.
        access: Access,
        /// The cause.
        source: io::Error,
    },
    /// `stat` of the data file.
    #[error("reading the length and mtime of {}: {source}", .path.display())]
    Metadata {
        /// The data file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The path names a directory, device or other non-regular file.
    #[error("{} is not a regular file", .path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// A file opened read-only does not have the torrent's length.
    #[error("{} is {actual} bytes long but the torrent is {expected} bytes", .path.display())]
    WrongLength {
        /// The data file.
        path: PathBuf,
        /// The torrent's total length.
        expected: u64,
        /// The file's length.
        actual: u64,
    },
    /// Truncating or extending the data file.
    #[error("resizing {} to {len} bytes: {source}", .path.display())]
    Resize {
        /// The data file.
        path: PathBuf,
        /// The length asked for.
        len: u64,
        /// The cause.
        source: io::Error,
    },
    /// Reserving disk space for the whole file.
    #[error("preallocating {len} bytes for {}: {source}", .path.display())]
    Preallocate {
        /// The data file.
        path: PathBuf,
        /// The length asked for.
        len: u64,
        /// The cause.
        source: io::Error,
    },
    /// Reading a block or a piece.
    #[error("reading {len} bytes at offset {offset} of {}: {source}", .path.display())]
    Read {
        /// The data file.
        path: PathBuf,
        /// Byte offset in the file.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The cause.
        source: io::Error,
    },
    /// Writing a block.
    #[error("writing {len} bytes at offset {offset} of {}: {source}", .path.display())]
    Write {
        /// The data file.
        path: PathBuf,
        /// Byte offset in the file.
        offset: u64,
        /// Bytes being written.
        len: u64,
        /// The cause.
        source: io::Error,
    },
    /// A write to a file opened with [`Access::ReadOnly`].
    #[error("writing to {}: the file is opened read-only for seeding", .path.display())]
    ReadOnly {
        /// The data file.
        path: PathBuf,
    },
    /// A block or piece outside the torrent: a caller bug, refused rather than letting it
    /// grow the file or read past it.
    #[error(
        "block at offset {offset} (length {len}) of piece {piece} lies outside the torrent stored in {}",
        .path.display()
    )]
    OutOfRange {
        /// The data file.
        path: PathBuf,
        /// Piece index.
        piece: u32,
        /// Offset within the piece.
        offset: u32,
        /// Length of the block.
        len: u64,
    },
    /// `fsync` of the data file or of the resume record.
    #[error("syncing {} to disk: {source}", .path.display())]
    Sync {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The piece hashes handed to [`check_existing`] do not fit the geometry.
    #[error(
        "checking {}: the torrent has {pieces} pieces but {hashes} piece hashes were given",
        .path.display()
    )]
    PieceHashes {
        /// The data file.
        path: PathBuf,
        /// Pieces in the geometry.
        pieces: u32,
        /// Hashes given.
        hashes: usize,
    },
    /// Writing the resume record (see [`write_durably`]).
    #[error("writing resume record {}: {source}", .path.display())]
    WriteResume {
        /// The resume path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// The single data file of a torrent.
#[derive(Debug)]
pub struct Storage {
    file: File,
    path: PathBuf,
    geometry: Geometry,
    access: Access,
}

impl Storage {
    /// Opens the data file.
    ///
    /// [`Access::ReadWrite`] creates the file and its parent directories if missing, gives it
    /// exactly `geometry.total_len` bytes (truncating or extending an existing file) and
    /// reserves the disk space up front, so a full disk shows up now rather than as a failed
    /// write hours into a download. Where the filesystem cannot preallocate, the file is
    /// sized sparsely instead.
    ///
    /// [`Access::ReadOnly`] is for seeding from the server's catalog: the file must already
    /// exist with exactly `geometry.total_len` bytes, and is never changed.
    pub fn open(path: &Path, geometry: Geometry, access: Access) -> Result<Storage, StorageError> {
        let open_error = |source| StorageError::Open {
            path: path.to_owned(),
            access,
            source,
        };
        let file = match access {
            Access::ReadOnly => File::open(path).map_err(open_error)?,
            Access::ReadWrite => {
                create_parent(path)?;
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)
                    .map_err(open_error)?
            }
        };
        let meta = file.metadata().map_err(|source| StorageError::Metadata {
            path: path.to_owned(),
            source,
        })?;
        if !meta.is_file() {
            return Err(StorageError::NotAFile {
                path: path.to_owned(),
            });
        }
        let storage = Storage {
            file,
            path: path.to_owned(),
            geometry,
            access,
        };
        match access {
            Access::ReadOnly if meta.len() != geometry.total_len => {
                return Err(StorageError::WrongLength {
                    path: path.to_owned(),
                    expected: geometry.total_len,
                    actual: meta.len(),
                });
            }
            Access::ReadOnly => {}
            Access::ReadWrite => storage.size_and_preallocate(&meta)?,
        }
        Ok(storage)
    }

    /// Brings the file to `total_len` bytes, all of them allocated.
    ///
    /// A file that already has the right length and all its blocks is left untouched: both
    /// `fallocate` and `ftruncate` bump the mtime even when they change nothing, and that
    /// would invalidate the resume record of every complete file on every start.
    fn size_and_preallocate(&self, meta: &std::fs::Metadata) -> Result<(), StorageError> {
        let want = self.geometry.total_len;
        let mut len = meta.len();
        if len > want {
            self.set_len(want)?;
            len = want;
        }
        let allocated = platform::allocated_bytes(meta);
        if len == want && allocated >= want {
            return Ok(());
        }
        match preallocate(&self.file, want) {
            Ok(()) => Ok(()),
            Err(e) if preallocation_unsupported(&e) => {
                tracing::debug!(
                    path = %self.path.display(),
                    error = %e,
                    "filesystem cannot preallocate; sizing the file sparsely"
                );
                if len != want {
                    self.set_len(want)?;
                }
                Ok(())
            }
            Err(source) => Err(StorageError::Preallocate {
                path: self.path.clone(),
                len: want,
                source,
            }),
        }
    }

    fn set_len(&self, len: u64) -> Result<(), StorageError> {
        self.file
            .set_len(len)
            .map_err(|source| StorageError::Resize {
                path: self.path.clone(),
                len,
                source,
            })
    }

    /// The data file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The torrent's piece layout.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// How the file was opened.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Reads `len` bytes at `offset` within piece `piece`, to serve a peer's request.
    pub fn read_block(&self, piece: u32, offset: u32, len: u32) -> Result<Vec<u8>, StorageError> {
        let at = self.block_offset(piece, offset, u64::from(len))?;
        let mut buf = vec![0; len as usize];
        platform::read_exact_at(&self.file, &mut buf, at).map_err(|source| StorageError::Read {
            path: self.path.clone(),
            offset: at,
            len: u64::from(len),
            source,
        })?;
        Ok(buf)
    }

    /// Writes a received block at its place in the file.
    pub fn write_block(&self, piece: u32, offset: u32, data: &[u8]) -> Result<(), StorageError> {
        if self.access == Access::ReadOnly {
            return Err(StorageError::ReadOnly {
                path: self.path.clone(),
            });
        }
        let len = data.len() as u64;
        let at = self.block_offset(piece, offset, len)?;
        platform::write_all_at(&self.file, data, at).map_err(|source| StorageError::Write {
            path: self.path.clone(),
            offset: at,
            len,
            source,
        })
    }

    /// Reads piece `piece` back and compares its SHA-1 with `expected`.
    pub fn verify_piece(&self, piece: u32, expected: &[u8; 20]) -> Result<bool, StorageError> {
        self.check_piece(piece)?;
        let size = self.geometry.piece_size(piece);
        let mut buf = vec![0; (size as usize).min(HASH_CHUNK)];
        let hash = hash_piece(&self.file, &self.path, self.geometry, piece, &mut buf)?;
        Ok(&hash == expected)
    }

    /// Stores a complete piece from its `blocks` (offset in the piece, bytes), sorting them by
    /// offset, and says whether it matched `expected`. When the blocks cover the whole piece
    /// they are hashed first and written only if they match; otherwise the rest of the piece is
    /// already in the file (it arrived while memory was short), so they are written and the
    /// piece is read back.
    pub fn store_piece<B: AsRef<[u8]>>(
        &self,
        piece: u32,
        blocks: &mut [(u32, B)],
        expected: &[u8; 20],
    ) -> Result<Stored, StorageError> {
        self.check_piece(piece)?;
        blocks.sort_unstable_by_key(|(offset, _)| *offset);
        let mut covered = 0u64;
        for (offset, data) in blocks.iter() {
            if u64::from(*offset) != covered {
                break;
            }
            covered += data.as_ref().len() as u64;
        }
        if covered != u64::from(self.geometry.piece_size(piece)) {
            for (offset, data) in blocks.iter() {
                self.write_block(piece, *offset, data.as_ref())?;
            }
            return Ok(if self.verify_piece(piece, expected)? {
                Stored::Completed
            } else {
                Stored::Mismatch
            });
        }
        let mut hasher = Sha1::new();
        for (_, data) in blocks.iter() {
            hasher.update(data.as_ref());
        }
        if hasher.finalize().as_slice() != expected {
            return Ok(Stored::Mismatch);
        }
        for (offset, data) in blocks.iter() {
            self.write_block(piece, *offset, data.as_ref())?;
        }
        Ok(Stored::Whole)
    }

    /// Flushes written blocks to the disk. Call it before [`save_resume`], so a record never
    /// claims pieces that a crash could still lose, and when the download completes.
    pub fn sync(&self) -> Result<(), StorageError> {
        self.file.sync_all().map_err(|source| StorageError::Sync {
            path: self.path.clone(),
            source,
        })
    }

    /// Refuses a piece number past the torrent's last piece.
    fn check_piece(&self, piece: u32) -> Result<(), StorageError> {
        if piece >= self.geometry.piece_count() {
            return Err(StorageError::OutOfRange {
                path: self.path.clone(),
                piece,
                offset: 0,
                len: 0,
            });
        }
        Ok(())
    }

    /// The file offset of a block, refusing one that would reach outside its piece.
    fn block_offset(&self, piece: u32, offset: u32, len: u64) -> Result<u64, StorageError> {
        let fits = u32::try_from(len)
            .is_ok_and(|len32| self.geometry.contains(piece, offset, len32, u32::MAX));
        if !fits {
            return Err(StorageError::OutOfRange {
                path: self.path.clone(),
                piece,
                offset,
                len,
            });
        }
        Ok(self.geometry.piece_offset(piece) + u64::from(offset))
    }
}

/// What [`Storage::store_piece`] did with a complete piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// It matched, and all of it came from the given blocks (they can serve the piece).
    Whole,
    /// It matched, with part of it already in the file.
    Completed,
    /// It did not match its hash.
    Mismatch,
}

/// SHA-1 of a whole piece held in memory.
pub fn piece_hash(data: &[u8]) -> [u8; 20] {
    Sha1::digest(data).into()
}

/// The outcome of [`check_existing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// The pieces on disk that are good.
    pub have: Bitfield,
    /// True when a resume record was trusted and the file was not read.
    pub fast_path: bool,
}

/// Finds which pieces of an existing data file are good: the resume check on start.
///
/// A resume record at `resume_path` for this info hash whose file length and mtime match the
/// file now is trusted without reading the file. Anything else (no record, a corrupt or torn
/// one, another torrent's, a file changed since) means re-hashing every piece with `threads`
/// threads. `progress` is called now and then with the number of pieces checked so far, from
/// any of those threads, so calls may arrive slightly out of order; the last call reports
/// every piece. It is not called when the fast path is taken. A missing file has no pieces
/// and is not an error.
pub fn check_existing(
    path: &Path,
    geometry: Geometry,
    info_hash: InfoHash,
    piece_hashes: &[[u8; 20]],
    resume_path: &Path,
    threads: usize,
    progress: &(dyn Fn(u32) + Sync),
) -> Result<CheckResult, StorageError> {
    let pieces = geometry.piece_count();
    if piece_hashes.len() != pieces as usize {
        return Err(StorageError::PieceHashes {
            path: path.to_owned(),
            pieces,
            hashes: piece_hashes.len(),
        });
    }
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(CheckResult {
                have: Bitfield::new(pieces),
                fast_path: false,
            });
        }
        Err(source) => {
            return Err(StorageError::Open {
                path: path.to_owned(),
                access: Access::ReadOnly,
                source,
            });
        }
    };
    let meta = file.metadata().map_err(|source| StorageError::Metadata {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(StorageError::NotAFile {
            path: path.to_owned(),
        });
    }

    match load_resume(resume_path) {
        Ok(record) => match record.matches(info_hash, geometry, &meta) {
            Ok(()) => {
                tracing::debug!(
                    path = %path.display(),
                    have = record.have.count(),
                    pieces,
                    "resume record matches the file; skipping the re-hash"
                );
                return Ok(CheckResult {
                    have: record.have,
                    fast_path: true,
                });
            }
            Err(reason) => tracing::info!(
                path = %path.display(),
                resume = %resume_path.display(),
                "resume record not used ({reason}); re-hashing every piece"
            ),
        },
        Err(ResumeRejected::Missing) => tracing::debug!(
            resume = %resume_path.display(),
            "no resume record; re-hashing every piece"
        ),
        Err(ResumeRejected::Invalid(reason)) => tracing::warn!(
            resume = %resume_path.display(),
            "resume record not used ({reason}); re-hashing every piece"
        ),
    }

    let have = rehash(
        &file,
        path,
        meta.len(),
        geometry,
        piece_hashes,
        threads,
        progress,
    )?;
    Ok(CheckResult {
        have,
        fast_path: false,
    })
}

/// Hashes every piece that lies wholly within the file's `file_len` bytes.
///
/// Threads take the next unchecked piece from a shared counter rather than owning a range:
/// the disk then sees reads that move forward together (kind to spinning disks and to
/// readahead), and a slow thread never leaves the others idle at the end.
fn rehash(
    file: &File,
    path: &Path,
    file_len: u64,
    geometry: Geometry,
    piece_hashes: &[[u8; 20]],
    threads: usize,
    progress: &(dyn Fn(u32) + Sync),
) -> Result<Bitfield, StorageError> {
    let pieces = geometry.piece_count();
    let next = AtomicU64::new(0);
    let checked = AtomicU32::new(0);
    let failed = AtomicBool::new(false);
    // About a hundred reports whatever the piece count: enough for a progress bar, too few
    // for the callback to cost anything.
    let step = (pieces / 100).max(1);
    let chunk = (geometry.piece_len as usize).min(HASH_CHUNK);

    let worker = || -> Result<Vec<u32>, StorageError> {
        let mut buf = vec![0; chunk];
        let mut good = Vec::new();
        while !failed.load(Ordering::Relaxed) {
            let Ok(piece) = u32::try_from(next.fetch_add(1, Ordering::Relaxed)) else {
                break;
            };
            if piece >= pieces {
                break;
            }
            let end = geometry.piece_offset(piece) + u64::from(geometry.piece_size(piece));
            // A piece reaching past the end of a short file cannot be complete.
            if end <= file_len {
                match hash_piece(file, path, geometry, piece, &mut buf) {
                    Ok(hash) if hash == piece_hashes[piece as usize] => good.push(piece),
                    Ok(_) => {}
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
            }
            let done = checked.fetch_add(1, Ordering::Relaxed) + 1;
            if done % step == 0 || done == pieces {
                progress(done);
            }
        }
        Ok(good)
    };

    let wanted = threads.clamp(1, (pieces as usize).max(1));
    let results: Vec<Result<Vec<u32>, StorageError>> = std::thread::scope(|scope| {
        // The calling thread is one of the workers, so the check still finishes if the
        // system refuses to start more threads.
        let mut handles = Vec::with_capacity(wanted - 1);
        for _ in 1..wanted {
            match std::thread::Builder::new()
                .name("bt-rehash".into())
                .spawn_scoped(scope, worker)
            {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a hashing thread; using fewer");
                    break;
                }
            }
        }
        let mut results = vec![worker()];
        for handle in handles {
            results.push(
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            );
        }
        results
    });

    let mut have = Bitfield::new(pieces);
    for result in results {
        for piece in result? {
            have.set(piece);
        }
    }
    Ok(have)
}

/// SHA-1 of piece `piece` read from `file` in `buf`-sized chunks, so a piece of any length
/// needs no more memory than the buffer.
fn hash_piece(
    file: &File,
    path: &Path,
    geometry: Geometry,
    piece: u32,
    buf: &mut [u8],
) -> Result<[u8; 20], StorageError> {
    let start = geometry.piece_offset(piece);
    let size = u64::from(geometry.piece_size(piece));
    let mut hasher = Sha1::new();
    let mut done = 0;
    while done < size {
        let n = (size - done).min(buf.len() as u64) as usize;
        platform::read_exact_at(file, &mut buf[..n], start + done).map_err(|source| {
            StorageError::Read {
                path: path.to_owned(),
                offset: start + done,
                len: n as u64,
                source,
            }
        })?;
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    Ok(hasher.finalize().into())
}

/// Saves which pieces of `data_path` are good, stamped with the file's current length and
/// mtime, so the next [`check_existing`] can skip the re-hash.
///
/// Call [`Storage::sync`] first: the record must never claim a piece whose bytes a crash
/// could still lose. The record is written with [`write_durably`], so a crash leaves either
/// the old record or the new one. Saves to the same `resume_path` must not run concurrently.
pub fn save_resume(
    resume_path: &Path,
    info_hash: InfoHash,
    data_path: &Path,
    have: &Bitfield,
) -> Result<(), StorageError> {
    let meta = std::fs::metadata(data_path).map_err(|source| StorageError::Metadata {
        path: data_path.to_owned(),
        source,
    })?;
    let record = ResumeRecord {
        info_hash,
        file_len: meta.len(),
        mtime_ns: mtime_ns(&meta),
        have: have.clone(),
    };
    let bytes = record.encode();

    create_parent(resume_path)?;
    write_durably(resume_path, &bytes).map_err(|source| StorageError::WriteResume {
        path: resume_path.to_owned(),
        source,
    })
}

/// Writes `bytes` to `path` so that a crash or a power cut leaves either the old file or the
/// new one, whole: a temporary file beside it (`<name>.tmp`), synced, then
/// [`rename_durably`] over it. Creates the parent directory. Writes to the same `path` must
/// not run concurrently. The agent keeps all its small state files this way.
pub fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    rename_durably(&tmp, path)
}

/// Renames `from` over `to` and returns once the rename itself is on disk, not only the
/// bytes of `from`.
///
/// On Unix that takes an `fsync` of the directory. Windows refuses to open a directory as a
/// file ("Access denied", os error 5), so there the move is asked to write through instead
/// (`MoveFileExW` with `MOVEFILE_WRITE_THROUGH`), which returns once NTFS has it on disk.
pub fn rename_durably(from: &Path, to: &Path) -> io::Result<()> {
    platform::rename_durably(from, to)
}

/// A saved claim that the file, as it was at `mtime_ns` with `file_len` bytes, held `have`.
struct ResumeRecord {
    info_hash: InfoHash,
    file_len: u64,
    mtime_ns: i128,
    have: Bitfield,
}

/// Why no usable record was read; only ever logged.
enum ResumeRejected {
    Missing,
    Invalid(String),
}

impl ResumeRecord {
    /// Layout: magic `BTRS`, version u8, info hash, file length u64 LE, mtime in ns since
    /// the epoch i128 LE, piece count u32 LE, the wire-order bitfield, then the SHA-1 of all
    /// of the above.
    fn encode(&self) -> Vec<u8> {
        let bits = self.have.as_bytes();
        let mut out = Vec::with_capacity(RESUME_HEADER_LEN + bits.len() + RESUME_DIGEST_LEN);
        out.extend_from_slice(RESUME_MAGIC);
        out.push(RESUME_VERSION);
        out.extend_from_slice(&self.info_hash.0);
        out.extend_from_slice(&self.file_len.to_le_bytes());
        out.extend_from_slice(&self.mtime_ns.to_le_bytes());
        out.extend_from_slice(&self.have.len().to_le_bytes());
        out.extend_from_slice(bits);
        let digest = piece_hash(&out);
        out.extend_from_slice(&digest);
        out
    }

    fn decode(bytes: &[u8]) -> Result<ResumeRecord, String> {
        if bytes.len() < RESUME_HEADER_LEN + RESUME_DIGEST_LEN {
            return Err(format!("only {} bytes long", bytes.len()));
        }
        let (body, digest) = bytes.split_at(bytes.len() - RESUME_DIGEST_LEN);
        if piece_hash(body) != digest {
            return Err("checksum mismatch".into());
        }
        if &body[..4] != RESUME_MAGIC {
            return Err("not a resume record".into());
        }
        if body[4] != RESUME_VERSION {
            return Err(format!("unsupported version {}", body[4]));
        }
        // The length check above makes every fixed-size field present.
        let info_hash = InfoHash(array(&body[5..25]));
        let file_len = u64::from_le_bytes(array(&body[25..33]));
        let mtime_ns = i128::from_le_bytes(array(&body[33..49]));
        let pieces = u32::from_le_bytes(array(&body[49..53]));
        let have = Bitfield::from_bytes(&body[RESUME_HEADER_LEN..], pieces)
            .map_err(|e| format!("bad bitfield: {e}"))?;
        Ok(ResumeRecord {
            info_hash,
            file_len,
            mtime_ns,
            have,
        })
    }

    /// Whether this record describes `meta`'s file for this torrent, and if not, why.
    fn matches(
        &self,
        info_hash: InfoHash,
        geometry: Geometry,
        meta: &std::fs::Metadata,
    ) -> Result<(), String> {
        if self.info_hash != info_hash {
            return Err(format!("it is for torrent {}", self.info_hash));
        }
        if self.have.len() != geometry.piece_count() {
            return Err(format!(
                "it covers {} pieces, the torrent has {}",
                self.have.len(),
                geometry.piece_count()
            ));
        }
        if self.file_len != geometry.total_len || meta.len() != self.file_len {
            return Err(format!(
                "file length is {}, the record says {}, the torrent needs {}",
                meta.len(),
                self.file_len,
                geometry.total_len
            ));
        }
        if mtime_ns(meta) != self.mtime_ns {
            return Err("the file was modified after the record was saved".into());
        }
        Ok(())
    }
}

/// A fixed-size copy of a slice whose length the caller has already checked.
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(bytes);
    out
}

fn load_resume(resume_path: &Path) -> Result<ResumeRecord, ResumeRejected> {
    let file = match File::open(resume_path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ResumeRejected::Missing),
        Err(e) => return Err(ResumeRejected::Invalid(format!("cannot open it: {e}"))),
    };
    // The largest record a torrent can need is a little over 512 MiB (a full u32 of pieces);
    // anything longer is not ours, and is not read into memory to find that out.
    let max_len = (RESUME_HEADER_LEN + (u32::MAX as usize).div_ceil(8) + RESUME_DIGEST_LEN) as u64;
    let mut bytes = Vec::new();
    file.take(max_len + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ResumeRejected::Invalid(format!("cannot read it: {e}")))?;
    if bytes.len() as u64 > max_len {
        return Err(ResumeRejected::Invalid("too long".into()));
    }
    ResumeRecord::decode(&bytes).map_err(ResumeRejected::Invalid)
}

/// Modification time in nanoseconds since the epoch, exactly as the filesystem stores it.
fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    platform::mtime_ns(meta)
}

/// Positional I/O and file metadata, the same on Unix and on Windows (where the agent runs).
mod platform {
    use std::fs::{File, Metadata};
    use std::io;

    #[cfg(unix)]
    pub fn read_exact_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, at)
    }

    #[cfg(unix)]
    pub fn write_all_at(file: &File, data: &[u8], at: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(file, data, at)
    }

    /// Bytes the filesystem has reserved for the file.
    #[cfg(unix)]
    pub fn allocated_bytes(meta: &Metadata) -> u64 {
        std::os::unix::fs::MetadataExt::blocks(meta).saturating_mul(512)
    }

    #[cfg(unix)]
    pub fn mtime_ns(meta: &Metadata) -> i128 {
        use std::os::unix::fs::MetadataExt;
        i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
    }

    #[cfg(unix)]
    pub fn rename_durably(from: &std::path::Path, to: &std::path::Path) -> io::Result<()> {
        std::fs::rename(from, to)?;
        File::open(super::parent_dir(to))?.sync_all()
    }

    #[cfg(windows)]
    pub fn rename_durably(from: &std::path::Path, to: &std::path::Path) -> io::Result<()> {
        use std::os::windows::ffi::OsStrExt;
        use windows_sys::Win32::Storage::FileSystem::{
            MOVEFILE_REPLACE_EXISTING, MOVEFILE_WRITE_THROUGH, MoveFileExW,
        };
        let wide = |p: &std::path::Path| -> Vec<u16> {
            p.as_os_str()
                .encode_wide()
                .chain(std::iter::once(0))
                .collect()
        };
        let (from, to) = (wide(from), wide(to));
        // SAFETY: both are NUL-terminated UTF-16 strings that outlive the call.
        let ok = unsafe {
            MoveFileExW(
                from.as_ptr(),
                to.as_ptr(),
                MOVEFILE_REPLACE_EXISTING | MOVEFILE_WRITE_THROUGH,
            )
        };
        if ok == 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    #[cfg(windows)]
    pub fn read_exact_at(file: &File, mut buf: &mut [u8], mut at: u64) -> io::Result<()> {
        use std::os::windows::fs::FileExt;
        while !buf.is_empty() {
            match file.seek_read(buf, at) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    at += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    #[cfg(windows)]
    pub fn write_all_at(file: &File, mut data: &[u8], mut at: u64) -> io::Result<()> {
        use std::os::windows::fs::FileExt;
        while !data.is_empty() {
            match file.seek_write(data, at) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    data = &data[n..];
                    at += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Windows does not say; the file's length stands in, so sizing is skipped when it fits.
    #[cfg(windows)]
    pub fn allocated_bytes(meta: &Metadata) -> u64 {
        meta.len()
    }

    #[cfg(windows)]
    pub fn mtime_ns(meta: &Metadata) -> i128 {
        meta.modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as i128)
    }
}

/// The directory holding `path`; `.` for a bare file name.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

fn create_parent(path: &Path) -> Result<(), StorageError> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir).map_err(|source| StorageError::CreateDir {
        path: dir.to_owned(),
        source,
    })
}

/// Reserves `len` bytes for `file`, extending it if shorter.
///
/// Linux's `fallocate(2)` rather than `posix_fallocate(3)`: where the filesystem cannot
/// preallocate, glibc's `posix_fallocate` quietly emulates it by writing to every 4 KiB
/// block, millions of writes for a 50 GB image, whereas `fallocate` says `EOPNOTSUPP` and
/// lets us size the file sparsely instead.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn preallocate(file: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;

    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    loop {
        // SAFETY: the descriptor is open for as long as `file` is borrowed, and fallocate
        // touches no memory of ours.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Elsewhere there is no preallocation without emulation; say so and size the file sparsely.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn preallocate(_file: &File, _len: u64) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Errors meaning "this filesystem cannot preallocate", as opposed to "no space".
fn preallocation_unsupported(e: &io::Error) -> bool {
    #[cfg(unix)]
    let refused = matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
    );
    #[cfg(not(unix))]
    let refused = false;
    e.kind() == io::ErrorKind::Unsupported || refused
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::{Duration, SystemTime};

    const PIECE: u32 = 32 * 1024;

    /// Four full pieces and a short fifth.
    fn geometry() -> Geometry {
        Geometry {
            total_len: 4 * u64::from(PIECE) + 1000,
            piece_len: PIECE,
        }
    }

    /// Deterministic, piece-distinct content.
    fn content(g: Geometry) -> Vec<u8> {
        (0..g.total_len)
            .map(|i| (i.wrapping_mul(31) ^ (i >> 13)) as u8)
            .collect()
    }

    fn hashes(g: Geometry, data: &[u8]) -> Vec<[u8; 20]> {
        (0..g.piece_count())
            .map(|p| {
                let start = g.piece_offset(p) as usize;
                piece_hash(&data[start..start + g.piece_size(p) as usize])
            })
            .collect()
    }

    /// A new read-write storage of [`geometry`] in a temporary directory, with the content
    /// it is meant to hold and that content's piece hashes.
    fn fresh_storage() -> (tempfile::TempDir, Geometry, Vec<u8>, Vec<[u8; 20]>, Storage) {
        let dir = tempfile::tempdir().unwrap();
        let g = geometry();
        let data = content(g);
        let hashes = hashes(g, &data);
        let s = Storage::open(&dir.path().join("image.raw"), g, Access::ReadWrite).unwrap();
        (dir, g, data, hashes, s)
    }

    fn write_piece(s: &Storage, piece: u32, data: &[u8]) {
        let g = s.geometry();
        let start = g.piece_offset(piece) as usize;
        for block in 0..g.block_count(piece) {
            let offset = block * crate::BLOCK_LEN;
            let len = g.block_size(piece, block) as usize;
            let from = start + offset as usize;
            s.write_block(piece, offset, &data[from..from + len])
                .unwrap();
        }
    }

    fn hash_id(byte: u8) -> InfoHash {
        InfoHash([byte; 20])
    }

    fn check(
        path: &Path,
        hashes: &[[u8; 20]],
        resume: &Path,
        info_hash: InfoHash,
        threads: usize,
    ) -> CheckResult {
        check_existing(
            path,
            geometry(),
            info_hash,
            hashes,
            resume,
            threads,
            &|_| {},
        )
        .unwrap()
    }

    #[test]
    fn read_write_creates_preallocates_and_resizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/image.raw");
        let g = geometry();
        let s = Storage::open(&path, g, Access::ReadWrite).unwrap();
        assert_eq!(s.path(), path);
        assert_eq!(s.geometry(), g);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), g.total_len);
        assert!(
            platform::allocated_bytes(&meta) >= g.total_len,
            "space is reserved"
        );
        drop(s);

        std::fs::write(&path, vec![7; 3 * PIECE as usize]).unwrap();
        Storage::open(&path, g, Access::ReadWrite).unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len() as u64, g.total_len);
        assert!(on_disk[..3 * PIECE as usize].iter().all(|&b| b == 7));

        std::fs::write(&path, vec![7; 10 * PIECE as usize]).unwrap();
        Storage::open(&path, g, Access::ReadWrite).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), g.total_len);
    }

    #[test]
    fn reopening_a_complete_file_leaves_its_mtime_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.raw");
        let g = geometry();
        Storage::open(&path, g, Access::ReadWrite).unwrap();
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        Storage::open(&path, g, Access::ReadWrite).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), old);
    }

    #[test]
    fn read_only_refuses_missing_and_wrong_length_files_and_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.raw");
        let g = geometry();

        let err = Storage::open(&path, g, Access::ReadOnly).unwrap_err();
        assert!(matches!(err, StorageError::Open { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(!path.exists(), "read-only never creates the file");

        std::fs::write(&path, b"short").unwrap();
        let err = Storage::open(&path, g, Access::ReadOnly).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(" 5 bytes"), "{msg}");
        assert!(msg.contains(&g.total_len.to_string()), "{msg}");
        assert_eq!(std::fs::read(&path).unwrap(), b"short", "left untouched");

        let data = content(g);
        std::fs::write(&path, &data).unwrap();
        let s = Storage::open(&path, g, Access::ReadOnly).unwrap();
        assert_eq!(s.access(), Access::ReadOnly);
        let err = s.write_block(0, 0, &[1; 16]).unwrap_err();
        assert!(matches!(err, StorageError::ReadOnly { .. }), "{err}");
        assert_eq!(
            s.read_block(1, 100, 50).unwrap(),
            &data[PIECE as usize + 100..][..50]
        );

        let err = Storage::open(dir.path(), g, Access::ReadOnly).unwrap_err();
        assert!(matches!(err, StorageError::NotAFile { .. }), "{err}");
    }

    #[test]
    fn written_pieces_verify_until_a_byte_changes() {
        let (_dir, _, data, hashes, s) = fresh_storage();

        write_piece(&s, 1, &data);
        assert!(s.verify_piece(1, &hashes[1]).unwrap());
        assert!(!s.verify_piece(0, &hashes[0]).unwrap(), "never written");
        assert_eq!(
            s.read_block(1, crate::BLOCK_LEN, 10).unwrap(),
            &data[(PIECE + crate::BLOCK_LEN) as usize..][..10]
        );

        s.write_block(1, 12345, &[data[PIECE as usize + 12345] ^ 1])
            .unwrap();
        assert!(!s.verify_piece(1, &hashes[1]).unwrap());
    }

    #[test]
    fn the_short_last_piece_is_written_and_verified() {
        let (_dir, g, data, hashes, s) = fresh_storage();

        assert_eq!(g.piece_size(4), 1000);
        write_piece(&s, 4, &data);
        assert!(s.verify_piece(4, &hashes[4]).unwrap());
        assert_eq!(
            s.read_block(4, 0, 1000).unwrap(),
            &data[4 * PIECE as usize..]
        );
        s.sync().unwrap();
        assert_eq!(std::fs::metadata(s.path()).unwrap().len(), g.total_len);
    }

    /// Piece `piece`'s blocks as `store_piece` takes them, last block first (arrival order is
    /// any order).
    fn blocks_of(g: Geometry, data: &[u8], piece: u32) -> Vec<(u32, Vec<u8>)> {
        let start = g.piece_offset(piece) as usize;
        (0..g.block_count(piece))
            .rev()
            .map(|b| {
                let offset = b * crate::BLOCK_LEN;
                let from = start + offset as usize;
                (
                    offset,
                    data[from..from + g.block_size(piece, b) as usize].to_vec(),
                )
            })
            .collect()
    }

    #[test]
    fn a_stored_piece_is_written_only_when_its_blocks_match_the_hash() {
        let (_dir, g, data, hashes, s) = fresh_storage();

        let mut bad = blocks_of(g, &data, 2);
        bad[1].1[7] ^= 1;
        assert_eq!(
            s.store_piece(2, &mut bad, &hashes[2]).unwrap(),
            Stored::Mismatch
        );
        let start = 2 * PIECE as usize;
        let on_disk = std::fs::read(s.path()).unwrap();
        assert!(
            on_disk[start..start + PIECE as usize]
                .iter()
                .all(|&b| b == 0),
            "a piece that failed its hash was written"
        );

        let mut good = blocks_of(g, &data, 2);
        assert_eq!(
            s.store_piece(2, &mut good, &hashes[2]).unwrap(),
            Stored::Whole
        );
        assert!(s.verify_piece(2, &hashes[2]).unwrap());
        let mut last = blocks_of(g, &data, 4);
        assert_eq!(
            s.store_piece(4, &mut last, &hashes[4]).unwrap(),
            Stored::Whole
        );
        assert_eq!(
            s.read_block(4, 0, 1000).unwrap(),
            &data[4 * PIECE as usize..]
        );
    }

    #[test]
    fn a_piece_partly_in_the_file_is_completed_and_read_back() {
        let (_dir, g, data, hashes, s) = fresh_storage();

        // The first block went to the file while memory was short; the rest is held.
        let mut blocks = blocks_of(g, &data, 1);
        let first = blocks.pop().unwrap();
        assert_eq!(first.0, 0);
        s.write_block(1, 0, &first.1).unwrap();
        assert_eq!(
            s.store_piece(1, &mut blocks, &hashes[1]).unwrap(),
            Stored::Completed
        );
        assert!(s.verify_piece(1, &hashes[1]).unwrap());

        // Held blocks are written even when the piece then fails: the file is the truth.
        let mut blocks = blocks_of(g, &data, 3);
        blocks.pop();
        assert!(
            s.store_piece(3, &mut blocks, &hashes[3]).unwrap() == Stored::Mismatch,
            "first block missing"
        );
    }

    #[test]
    fn storing_into_a_read_only_file_or_past_the_end_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.raw");
        let g = geometry();
        let data = content(g);
        std::fs::write(&path, &data).unwrap();
        let hashes = hashes(g, &data);
        let s = Storage::open(&path, g, Access::ReadOnly).unwrap();
        let mut blocks = blocks_of(g, &data, 0);
        assert!(matches!(
            s.store_piece(0, &mut blocks, &hashes[0]),
            Err(StorageError::ReadOnly { .. })
        ));
        assert!(matches!(
            s.store_piece(5, &mut blocks, &hashes[0]),
            Err(StorageError::OutOfRange { piece: 5, .. })
        ));
    }

    #[test]
    fn blocks_outside_the_torrent_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.raw");
        let g = geometry();
        let s = Storage::open(&path, g, Access::ReadWrite).unwrap();
        for (piece, offset, len) in [(4, 990, 11), (5, 0, 1), (0, PIECE, 1)] {
            let err = s.write_block(piece, offset, &vec![0; len]).unwrap_err();
            assert!(matches!(err, StorageError::OutOfRange { .. }), "{err}");
            let err = s.read_block(piece, offset, len as u32).unwrap_err();
            assert!(matches!(err, StorageError::OutOfRange { .. }), "{err}");
        }
        assert!(s.verify_piece(5, &[0; 20]).is_err());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), g.total_len);
    }

    /// Pieces 0, 2 and 4 correct, piece 1 garbage, piece 3 never written.
    fn partly_written(dir: &Path) -> (PathBuf, Vec<[u8; 20]>) {
        let path = dir.join("image.raw");
        let g = geometry();
        let data = content(g);
        let hashes = hashes(g, &data);
        let s = Storage::open(&path, g, Access::ReadWrite).unwrap();
        for piece in [0, 2, 4] {
            write_piece(&s, piece, &data);
        }
        write_piece(&s, 1, &vec![0xAA; data.len()]);
        s.sync().unwrap();
        (path, hashes)
    }

    fn expected_have() -> Bitfield {
        let mut have = Bitfield::new(geometry().piece_count());
        for piece in [0, 2, 4] {
            have.set(piece);
        }
        have
    }

    #[test]
    fn a_full_rehash_finds_exactly_the_good_pieces_with_any_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        let (path, hashes) = partly_written(dir.path());
        let resume = dir.path().join("image.resume");

        for threads in [1, 4, 0, 64] {
            let reports = Mutex::new(Vec::new());
            let result = check_existing(
                &path,
                geometry(),
                hash_id(1),
                &hashes,
                &resume,
                threads,
                &|n| reports.lock().unwrap().push(n),
            )
            .unwrap();
            assert_eq!(result.have, expected_have(), "threads = {threads}");
            assert!(!result.fast_path);
            let reports = reports.into_inner().unwrap();
            assert_eq!(reports.iter().max(), Some(&5), "threads = {threads}");
            assert_eq!(reports.len(), 5, "one report per piece at this size");
        }
    }

    #[test]
    fn a_missing_file_has_no_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let g = geometry();
        let hashes = hashes(g, &content(g));
        let result = check(
            &dir.path().join("absent"),
            &hashes,
            &dir.path().join("absent.resume"),
            hash_id(1),
            2,
        );
        assert_eq!(result.have, Bitfield::new(5));
        assert!(!result.fast_path);
    }

    #[test]
    fn a_short_file_has_only_the_pieces_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let (path, hashes) = partly_written(dir.path());
        // Cut the file inside piece 2: piece 0 survives, 2 and 4 are gone.
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(2 * u64::from(PIECE) + 10)
            .unwrap();
        let result = check(&path, &hashes, &dir.path().join("r"), hash_id(1), 2);
        assert_eq!(result.have.iter_set().collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn wrong_hash_count_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (path, hashes) = partly_written(dir.path());
        let err = check_existing(
            &path,
            geometry(),
            hash_id(1),
            &hashes[..4],
            &dir.path().join("r"),
            1,
            &|_| {},
        )
        .unwrap_err();
        assert!(matches!(err, StorageError::PieceHashes { .. }), "{err}");
    }

    #[test]
    fn a_saved_resume_record_is_trusted_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (path, hashes) = partly_written(dir.path());
        let resume = dir.path().join("state/image.resume");

        // Deliberately claim less than the disk holds: a trusted record is returned as saved,
        // which proves the file was not read.
        let mut saved = Bitfield::new(5);
        saved.set(2);
        save_resume(&resume, hash_id(1), &path, &saved).unwrap();
        assert!(!resume.with_extension("resume.tmp").exists());

        let result = check(&path, &hashes, &resume, hash_id(1), 2);
        assert!(result.fast_path);
        assert_eq!(result.have, saved);

        // Opening the complete file again for writing must not invalidate the record.
        Storage::open(&path, geometry(), Access::ReadWrite).unwrap();
        assert!(check(&path, &hashes, &resume, hash_id(1), 2).fast_path);

        // Same length, new mtime: a write behind our back.
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(42))
            .unwrap();
        let result = check(&path, &hashes, &resume, hash_id(1), 2);
        assert!(!result.fast_path);
        assert_eq!(result.have, expected_have());

        // Record again, then change the length.
        save_resume(&resume, hash_id(1), &path, &saved).unwrap();
        assert!(check(&path, &hashes, &resume, hash_id(1), 1).fast_path);
        let mut f = File::options().append(true).open(&path).unwrap();
        f.write_all(b"more").unwrap();
        drop(f);
        let result = check(&path, &hashes, &resume, hash_id(1), 1);
        assert!(!result.fast_path);
        assert_eq!(result.have, expected_have());
    }

    #[test]
    fn a_record_for_another_torrent_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (path, hashes) = partly_written(dir.path());
        let resume = dir.path().join("image.resume");
        save_resume(&resume, hash_id(2), &path, &Bitfield::full(5)).unwrap();
        let result = check(&path, &hashes, &resume, hash_id(1), 2);
        assert!(!result.fast_path);
        assert_eq!(result.have, expected_have());
    }

    #[test]
    fn corrupt_or_torn_records_fall_back_to_a_rehash() {
        let dir = tempfile::tempdir().unwrap();
        let (path, hashes) = partly_written(dir.path());
        let resume = dir.path().join("image.resume");
        save_resume(&resume, hash_id(1), &path, &Bitfield::full(5)).unwrap();
        let good = std::fs::read(&resume).unwrap();
        assert!(check(&path, &hashes, &resume, hash_id(1), 1).fast_path);

        let mut flipped = good.clone();
        flipped[RESUME_HEADER_LEN] ^= 0x08;
        let mut wrong_version = good.clone();
        wrong_version[4] = 99;
        let variants: Vec<Vec<u8>> = vec![
            Vec::new(),
            good[..good.len() - 1].to_vec(),
            good[..10].to_vec(),
            flipped,
            wrong_version,
            [good.as_slice(), b"x"].concat(),
            vec![0xFF; 4096],
        ];
        for (i, bytes) in variants.into_iter().enumerate() {
            std::fs::write(&resume, bytes).unwrap();
            let result = check(&path, &hashes, &resume, hash_id(1), 1);
            assert!(!result.fast_path, "variant {i}");
            assert_eq!(result.have, expected_have(), "variant {i}");
        }
    }

    #[test]
    fn resume_records_round_trip() {
        let mut have = Bitfield::new(13);
        have.set(0);
        have.set(12);
        let record = ResumeRecord {
            info_hash: hash_id(9),
            file_len: 123_456_789_012,
            mtime_ns: -5,
            have: have.clone(),
        };
        let bytes = record.encode();
        assert_eq!(&bytes[..5], b"BTRS\x01");
        let back = ResumeRecord::decode(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.info_hash, hash_id(9));
        assert_eq!(back.file_len, 123_456_789_012);
        assert_eq!(back.mtime_ns, -5);
        assert_eq!(back.have, have);
    }

    #[test]
    fn error_messages_name_action_path_and_cause() {
        let err = StorageError::Write {
            path: PathBuf::from("/var/lib/x.vhdx"),
            offset: 1_048_576,
            len: 16384,
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        };
        let msg = err.to_string();
        assert!(
            msg.starts_with("writing 16384 bytes at offset 1048576 of /var/lib/x.vhdx: "),
            "{msg}"
        );
        assert!(msg.contains("(os error 28)"), "{msg}");
    }

    /// Set in the child process of [`writes_past_the_file_size_limit_are_errors`].
    const FSIZE_CHILD: &str = "BOOTTORRENT_STORAGE_FSIZE_CHILD";
    const FSIZE_CHILD_DONE: &str = "fsize child checks passed";

    /// A full disk cannot be made without root, so this uses the nearest thing a normal user
    /// can cause on a regular file: `RLIMIT_FSIZE`, which makes the kernel refuse writes and
    /// preallocation past a limit with `EFBIG` through the same code paths. The limit is
    /// per-process and cannot be raised again, so the checks run in a child copy of this
    /// test binary.
    #[test]
    fn writes_past_the_file_size_limit_are_errors() {
        if let Some(dir) = std::env::var_os(FSIZE_CHILD) {
            fsize_child(Path::new(&dir));
            println!("{FSIZE_CHILD_DONE}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "storage::tests::writes_past_the_file_size_limit_are_errors",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(FSIZE_CHILD, dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(stdout.contains(FSIZE_CHILD_DONE), "{stdout}\n{stderr}");
    }

    fn fsize_child(dir: &Path) {
        const LIMIT: u64 = 1024 * 1024;
        let g = Geometry {
            total_len: 4 * LIMIT,
            piece_len: LIMIT as u32,
        };
        let path = dir.join("image.raw");
        let s = Storage::open(&path, g, Access::ReadWrite).unwrap();

        // SAFETY: plain libc calls with valid arguments; ignoring SIGXFSZ turns the kernel's
        // "kill the process" into the EFBIG error we want to see.
        unsafe {
            assert_ne!(libc::signal(libc::SIGXFSZ, libc::SIG_IGN), libc::SIG_ERR);
            let mut limit: libc::rlimit = std::mem::zeroed();
            assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit), 0);
            limit.rlim_cur = LIMIT as libc::rlim_t;
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
        }

        let err = s.write_block(2, 0, &[1; 16384]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StorageError::Write { .. }), "{msg}");
        assert!(
            msg.starts_with(&format!(
                "writing 16384 bytes at offset {} of {}: ",
                2 * LIMIT,
                path.display()
            )),
            "{msg}"
        );
        assert!(msg.contains("(os error 27)"), "{msg}");

        let other = dir.join("other.raw");
        let err = Storage::open(&other, g, Access::ReadWrite).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&other.display().to_string()), "{msg}");
        assert!(msg.contains("(os error 27)"), "{msg}");
    }
}
