//! Reading `.torrent` files (BEP 3), single-file torrents only.
//!
//! A torrent is untrusted input until its info hash matches what the server announced, so every
//! field the engine relies on is checked here once: the geometry is sane, there is exactly one
//! hash per piece, and the file name cannot escape the download directory. Fields we do not use
//! (`created by`, BEP 52's `file tree` and `piece layers`, ...) are ignored, which also lets
//! libtorrent's default hybrid v1/v2 torrents through: their v1 half is all we need.

use sha1::{Digest, Sha1};

use crate::bencode::{self, BencodeError, Dict, Value};
use crate::{Geometry, InfoHash};

/// Largest `piece length` we accept. Pieces are verified and held in memory whole, so this
/// bounds what one peer can make us buffer; real creators stay at or below 16 MiB.
pub const MAX_PIECE_LEN: u32 = 64 * 1024 * 1024;

/// Longest string value echoed back in an error message; names and URLs can be huge.
const MAX_SHOWN: usize = 100;

/// What the engine needs from a `.torrent` file.
#[derive(Clone, PartialEq, Eq)]
pub struct Metainfo {
    /// SHA-1 of the exact bytes of the `info` dictionary.
    pub info_hash: InfoHash,
    /// The file's name: UTF-8, a single path component, never `.` or `..`.
    pub name: String,
    /// File length and piece length.
    pub geometry: Geometry,
    /// One SHA-1 per piece, in piece order; `geometry.piece_count()` of them.
    pub piece_hashes: Vec<[u8; 20]>,
    /// Tracker URLs: `announce` first, then the tiers of `announce-list` flattened, without
    /// duplicates. Only `http://` and `https://` URLs are kept, because the HTTP tracker client is
    /// the only one we have.
    pub announce: Vec<String>,
    /// BEP 27 `private` flag: peers come only from the trackers, never from DHT or PEX.
    pub private: bool,
}

// The derived Debug would print every piece hash: thousands of lines for a disk image.
impl std::fmt::Debug for Metainfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metainfo")
            .field("info_hash", &self.info_hash)
            .field("name", &self.name)
            .field("geometry", &self.geometry)
            .field(
                "piece_hashes",
                &format_args!("[{} hashes]", self.piece_hashes.len()),
            )
            .field("announce", &self.announce)
            .field("private", &self.private)
            .finish()
    }
}

/// Why some bytes are not a torrent we can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetainfoError {
    /// The file is not valid bencode.
    #[error("reading torrent: {0}")]
    Bencode(BencodeError),
    /// The file is valid bencode, but not a dictionary.
    #[error("reading torrent: the file is {found}, not a dictionary")]
    NotADict {
        /// The kind of value found instead.
        found: &'static str,
    },
    /// A required field is absent.
    #[error("reading torrent: field `{field}` is missing")]
    MissingField {
        /// The field's path, such as `info.length`.
        field: &'static str,
    },
    /// A field holds the wrong kind of value.
    #[error("reading torrent: field `{field}` is {found}, expected {expected}")]
    WrongType {
        /// The field's path, such as `info.length`.
        field: &'static str,
        /// The kind of value the field must hold.
        expected: &'static str,
        /// The kind of value found.
        found: &'static str,
    },
    /// The torrent describes a directory of files.
    #[error(
        "multi-file torrents are not supported; BootTorrent transfers one image file per torrent"
    )]
    MultiFile,
    /// A field has the right kind but an unusable value.
    #[error("reading torrent: field `{field}` = {value}: {reason}")]
    InvalidField {
        /// The field's path, such as `info.length`.
        field: &'static str,
        /// The offending value, shortened and escaped for display.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl Metainfo {
    /// Parses and validates the bytes of a `.torrent` file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Metainfo, MetainfoError> {
        let root = bencode::decode(bytes).map_err(MetainfoError::Bencode)?;
        let root = root
            .as_dict()
            .ok_or(MetainfoError::NotADict { found: root.kind() })?;
        let info = dict_field(root, b"info", "info")?;
        // Checked before `length` so a multi-file torrent gets the helpful error rather than
        // "`info.length` is missing".
        if info.get(b"files").is_some() {
            return Err(MetainfoError::MultiFile);
        }

        let name = parse_name(bytes_field(info, b"name", "info.name")?)?;

        let length = int_field(info, b"length", "info.length")?;
        if length < 1 {
            return Err(invalid("info.length", length, "must be at least 1 byte"));
        }
        let piece_len = int_field(info, b"piece length", "info.piece length")?;
        if !(1..=i64::from(MAX_PIECE_LEN)).contains(&piece_len) {
            return Err(invalid(
                "info.piece length",
                piece_len,
                format!("must be between 1 and {MAX_PIECE_LEN} bytes"),
            ));
        }
        let geometry = Geometry {
            total_len: length as u64,
            piece_len: piece_len as u32,
        };

        let pieces = bytes_field(info, b"pieces", "info.pieces")?;
        if pieces.len() % 20 != 0 {
            return Err(invalid(
                "info.pieces",
                format!("<{} bytes>", pieces.len()),
                "must be a whole number of 20-byte SHA-1 hashes",
            ));
        }
        // In u64: a huge `length` with tiny pieces would overflow `Geometry::piece_count`'s u32,
        // and then could never match the hashes, which the input length bounds.
        let expected = geometry.total_len.div_ceil(u64::from(geometry.piece_len));
        let found = pieces.len() / 20;
        if found as u64 != expected {
            return Err(invalid(
                "info.pieces",
                format!("<{found} hashes>"),
                format!("a {length}-byte file in {piece_len}-byte pieces needs {expected}"),
            ));
        }
        let piece_hashes = pieces
            .chunks_exact(20)
            .map(|chunk| {
                let mut hash = [0u8; 20];
                hash.copy_from_slice(chunk);
                hash
            })
            .collect();

        let private = match info.get(b"private") {
            None => false,
            Some(Value::Int(0)) => false,
            Some(Value::Int(1)) => true,
            Some(Value::Int(n)) => return Err(invalid("info.private", n, "must be 0 or 1")),
            Some(other) => return Err(wrong_type("info.private", "an integer", other)),
        };

        Ok(Metainfo {
            info_hash: InfoHash(Sha1::digest(info.raw()).into()),
            name,
            geometry,
            piece_hashes,
            announce: parse_trackers(root)?,
            private,
        })
    }
}

/// The name becomes a file name in the download directory, so anything that could name another
/// place (a path separator, `..`) or that the OS would truncate (NUL) is refused, not rewritten:
/// a silently renamed file would not be where the operator looks for it.
fn parse_name(raw: &[u8]) -> Result<String, MetainfoError> {
    let name = std::str::from_utf8(raw)
        .map_err(|_| invalid("info.name", show_bytes(raw), "is not UTF-8"))?;
    check_file_name(name).map_err(|reason| invalid("info.name", show_bytes(raw), reason))?;
    Ok(name.to_owned())
}

/// The rule for a torrent's file name, shared by everything that makes or reads one: a single
/// path component. Returns why a name breaks it.
pub fn check_file_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("must not be empty")
    } else if name == "." || name == ".." {
        Err("must not be \".\" or \"..\"")
    } else if name.contains(['/', '\\', '\0']) {
        Err("must be a single file name, without '/', '\\' or NUL")
    } else {
        Ok(())
    }
}

/// Collects `announce` and `announce-list`. Tiers only order failover, and we announce to every
/// tracker, so flattening them loses nothing we use.
fn parse_trackers(root: &Dict<'_>) -> Result<Vec<String>, MetainfoError> {
    let mut urls: Vec<&[u8]> = Vec::new();
    match root.get(b"announce") {
        None => {}
        Some(Value::Bytes(url)) => urls.push(url),
        Some(other) => return Err(wrong_type("announce", "a byte string", other)),
    }
    match root.get(b"announce-list") {
        None => {}
        Some(Value::List(tiers)) => {
            for tier in tiers {
                let Value::List(tier) = tier else {
                    return Err(wrong_type("announce-list", "a list of lists", tier));
                };
                for url in tier {
                    let Value::Bytes(url) = url else {
                        return Err(wrong_type("announce-list", "lists of byte strings", url));
                    };
                    urls.push(url);
                }
            }
        }
        Some(other) => return Err(wrong_type("announce-list", "a list of lists", other)),
    }

    let mut kept: Vec<String> = Vec::new();
    for raw in urls {
        // A tracker we cannot talk to is not a reason to refuse the torrent: the others, or
        // the server's own tracker, may still work.
        let usable = std::str::from_utf8(raw).ok().map(str::trim).filter(|url| {
            ["http://", "https://"].iter().any(|scheme| {
                url.get(..scheme.len())
                    .is_some_and(|prefix| prefix.eq_ignore_ascii_case(scheme))
            })
        });
        match usable {
            Some(url) if !kept.iter().any(|k| k == url) => kept.push(url.to_owned()),
            Some(_) => {}
            None => tracing::debug!(url = %show_bytes(raw), "ignoring a non-HTTP tracker"),
        }
    }
    Ok(kept)
}

fn dict_field<'v, 'a>(
    dict: &'v Dict<'a>,
    key: &[u8],
    field: &'static str,
) -> Result<&'v Dict<'a>, MetainfoError> {
    match dict.get(key) {
        Some(Value::Dict(d)) => Ok(d),
        Some(other) => Err(wrong_type(field, "a dictionary", other)),
        None => Err(MetainfoError::MissingField { field }),
    }
}

fn bytes_field<'a>(
    dict: &Dict<'a>,
    key: &[u8],
    field: &'static str,
) -> Result<&'a [u8], MetainfoError> {
    match dict.get(key) {
        Some(Value::Bytes(b)) => Ok(b),
        Some(other) => Err(wrong_type(field, "a byte string", other)),
        None => Err(MetainfoError::MissingField { field }),
    }
}

fn int_field(dict: &Dict<'_>, key: &[u8], field: &'static str) -> Result<i64, MetainfoError> {
    match dict.get(key) {
        Some(Value::Int(n)) => Ok(*n),
        Some(other) => Err(wrong_type(field, "an integer", other)),
        None => Err(MetainfoError::MissingField { field }),
    }
}

fn wrong_type(field: &'static str, expected: &'static str, found: &Value<'_>) -> MetainfoError {
    MetainfoError::WrongType {
        field,
        expected,
        found: found.kind(),
    }
}

fn invalid(
    field: &'static str,
    value: impl std::fmt::Display,
    reason: impl Into<String>,
) -> MetainfoError {
    MetainfoError::InvalidField {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Quoted, escaped and shortened, so a hostile value cannot flood or forge log lines.
fn show_bytes(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(MAX_SHOWN)];
    let ellipsis = if bytes.len() > MAX_SHOWN { "..." } else { "" };
    format!("\"{}{ellipsis}\"", shown.escape_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(n: i64) -> Vec<u8> {
        format!("i{n}e").into_bytes()
    }

    fn bytes(b: &[u8]) -> Vec<u8> {
        [format!("{}:", b.len()).as_bytes(), b].concat()
    }

    fn list(items: &[Vec<u8>]) -> Vec<u8> {
        [&b"l"[..], &items.concat(), b"e"].concat()
    }

    /// Entries are written in the order given, so tests can also build unsorted dictionaries.
    fn dict(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let body: Vec<u8> = entries
            .iter()
            .flat_map(|(k, v)| [bytes(k.as_bytes()), v.clone()].concat())
            .collect();
        [&b"d"[..], &body, b"e"].concat()
    }

    /// A valid info dictionary: 40,000 bytes in three 16 KiB pieces.
    fn good_info() -> Vec<(&'static str, Vec<u8>)> {
        let pieces: Vec<u8> = (0..60).collect();
        vec![
            ("length", int(40_000)),
            ("name", bytes(b"ubuntu-24.04.img")),
            ("piece length", int(16_384)),
            ("pieces", bytes(&pieces)),
        ]
    }

    /// A torrent whose info dictionary is [`good_info`] after `edit`.
    fn torrent_with(edit: impl FnOnce(&mut Vec<(&'static str, Vec<u8>)>)) -> Vec<u8> {
        let mut info = good_info();
        edit(&mut info);
        dict(&[
            ("announce", bytes(b"http://10.0.0.1:6969/announce")),
            ("info", dict(&info)),
        ])
    }

    fn set(info: &mut Vec<(&'static str, Vec<u8>)>, key: &'static str, value: Vec<u8>) {
        info.retain(|(k, _)| *k != key);
        info.push((key, value));
    }

    fn error_of(torrent: &[u8]) -> String {
        Metainfo::from_bytes(torrent).unwrap_err().to_string()
    }

    #[test]
    fn a_hand_built_torrent() {
        let info = dict(&good_info());
        let torrent = dict(&[
            ("announce", bytes(b"http://10.0.0.1:6969/announce")),
            ("comment", bytes(b"lab image")),
            ("info", info.clone()),
        ]);
        let m = Metainfo::from_bytes(&torrent).unwrap();
        assert_eq!(m.info_hash, InfoHash(Sha1::digest(&info).into()));
        assert_eq!(m.name, "ubuntu-24.04.img");
        assert_eq!(
            m.geometry,
            Geometry {
                total_len: 40_000,
                piece_len: 16_384
            }
        );
        assert_eq!(m.piece_hashes.len(), 3);
        assert_eq!(
            m.piece_hashes[1],
            *b"\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f\x20\x21\x22\x23\x24\x25\x26\x27"
        );
        assert_eq!(m.announce, ["http://10.0.0.1:6969/announce"]);
        assert!(!m.private);
        assert!(format!("{m:?}").contains("[3 hashes]"));
    }

    #[test]
    fn info_hash_covers_the_exact_bytes_even_when_keys_are_unsorted() {
        let mut entries = good_info();
        entries.reverse();
        entries.push(("private", int(1)));
        let info = dict(&entries);
        let torrent = dict(&[("info", info.clone())]);
        let m = Metainfo::from_bytes(&torrent).unwrap();
        assert_eq!(m.info_hash, InfoHash(Sha1::digest(&info).into()));
        assert!(m.private);
        assert!(m.announce.is_empty());
    }

    #[test]
    fn trackers_are_flattened_deduplicated_and_http_only() {
        let torrent = dict(&[
            ("announce", bytes(b"http://a.lab/announce")),
            (
                "announce-list",
                list(&[
                    list(&[bytes(b"http://a.lab/announce"), bytes(b"udp://a.lab:6969")]),
                    list(&[bytes(b"HTTPS://b.lab/announce "), bytes(b"\xff\xfe")]),
                    list(&[]),
                    list(&[bytes(b"http://c.lab/announce"), bytes(b"")]),
                ]),
            ),
            ("info", dict(&good_info())),
        ]);
        let m = Metainfo::from_bytes(&torrent).unwrap();
        assert_eq!(
            m.announce,
            [
                "http://a.lab/announce",
                "HTTPS://b.lab/announce",
                "http://c.lab/announce"
            ]
        );
    }

    #[test]
    fn multi_file_torrents_are_refused() {
        let torrent = torrent_with(|info| {
            info.retain(|(k, _)| *k != "length");
            set(info, "files", list(&[dict(&[("length", int(1))])]));
        });
        assert_eq!(
            Metainfo::from_bytes(&torrent),
            Err(MetainfoError::MultiFile)
        );
        assert_eq!(
            error_of(&torrent),
            "multi-file torrents are not supported; BootTorrent transfers one image file per torrent"
        );
    }

    #[test]
    fn bad_lengths() {
        let no_length = torrent_with(|info| info.retain(|(k, _)| *k != "length"));
        assert_eq!(
            error_of(&no_length),
            "reading torrent: field `info.length` is missing"
        );
        let zero = torrent_with(|info| set(info, "length", int(0)));
        assert_eq!(
            error_of(&zero),
            "reading torrent: field `info.length` = 0: must be at least 1 byte"
        );
        let negative = torrent_with(|info| set(info, "length", int(-5)));
        assert!(error_of(&negative).contains("`info.length` = -5"));
        let text = torrent_with(|info| set(info, "length", bytes(b"40000")));
        assert_eq!(
            error_of(&text),
            "reading torrent: field `info.length` is a byte string, expected an integer"
        );
    }

    #[test]
    fn bad_piece_lengths() {
        let zero = torrent_with(|info| set(info, "piece length", int(0)));
        assert_eq!(
            error_of(&zero),
            "reading torrent: field `info.piece length` = 0: must be between 1 and 67108864 bytes"
        );
        let huge = torrent_with(|info| {
            set(info, "piece length", int(i64::from(MAX_PIECE_LEN) + 1));
            set(info, "pieces", bytes(&[0; 20]));
        });
        assert!(error_of(&huge).contains("`info.piece length` = 67108865"));
        let max = torrent_with(|info| {
            set(info, "piece length", int(i64::from(MAX_PIECE_LEN)));
            set(info, "pieces", bytes(&[0; 20]));
        });
        assert_eq!(
            Metainfo::from_bytes(&max).unwrap().geometry.piece_len,
            MAX_PIECE_LEN
        );
    }

    #[test]
    fn bad_piece_hashes() {
        let ragged = torrent_with(|info| set(info, "pieces", bytes(&[0; 59])));
        assert_eq!(
            error_of(&ragged),
            "reading torrent: field `info.pieces` = <59 bytes>: must be a whole number of 20-byte SHA-1 hashes"
        );
        let too_few = torrent_with(|info| set(info, "pieces", bytes(&[0; 40])));
        assert_eq!(
            error_of(&too_few),
            "reading torrent: field `info.pieces` = <2 hashes>: a 40000-byte file in 16384-byte pieces needs 3"
        );
        let too_many = torrent_with(|info| set(info, "pieces", bytes(&[0; 80])));
        assert!(error_of(&too_many).contains("<4 hashes>"));
        // A length whose piece count overflows u32 must not wrap around to a small count.
        let overflow = torrent_with(|info| {
            set(info, "length", int((1 << 32) + 1));
            set(info, "piece length", int(1));
            set(info, "pieces", bytes(&[0; 20]));
        });
        assert!(error_of(&overflow).contains("needs 4294967297"));
    }

    #[test]
    fn unsafe_names_are_refused() {
        for (name, shown) in [
            (&b"../etc/passwd"[..], "\"../etc/passwd\""),
            (b"dir/file", "\"dir/file\""),
            (b"dir\\file", "\"dir\\\\file\""),
            (b"nul\0byte", "\"nul\\x00byte\""),
            (b".", "\".\""),
            (b"..", "\"..\""),
            (b"", "\"\""),
            (b"\xff.img", "\"\\xff.img\""),
        ] {
            let torrent = torrent_with(|info| set(info, "name", bytes(name)));
            let message = error_of(&torrent);
            assert!(
                message.starts_with(&format!("reading torrent: field `info.name` = {shown}: ")),
                "{message}"
            );
        }
        let missing = torrent_with(|info| info.retain(|(k, _)| *k != "name"));
        assert!(error_of(&missing).contains("`info.name` is missing"));
    }

    #[test]
    fn structural_errors() {
        assert_eq!(
            error_of(b"li1ee"),
            "reading torrent: the file is a list, not a dictionary"
        );
        assert_eq!(
            error_of(b"d4:infoi1ee"),
            "reading torrent: field `info` is an integer, expected a dictionary"
        );
        assert!(matches!(
            Metainfo::from_bytes(b"d4:info"),
            Err(MetainfoError::Bencode(_))
        ));
        assert!(error_of(b"d4:info").starts_with("reading torrent: unexpected end of input"));
        let private = torrent_with(|info| set(info, "private", int(2)));
        assert!(error_of(&private).contains("`info.private` = 2: must be 0 or 1"));
        let bad_list = dict(&[
            ("announce-list", list(&[bytes(b"http://a.lab/announce")])),
            ("info", dict(&good_info())),
        ]);
        assert_eq!(
            error_of(&bad_list),
            "reading torrent: field `announce-list` is a byte string, expected a list of lists"
        );
    }

    /// Content of the file both fixtures describe, so the test can check the piece hashes too.
    fn fixture_content() -> Vec<u8> {
        (0..100_000u32).map(|i| (i % 251) as u8).collect()
    }

    fn check_fixture(m: &Metainfo, expected_hash: &str) {
        assert_eq!(m.info_hash.to_string(), expected_hash);
        assert_eq!(m.name, "fleet-image.raw");
        assert_eq!(
            m.geometry,
            Geometry {
                total_len: 100_000,
                piece_len: 16_384
            }
        );
        let content = fixture_content();
        let hashes: Vec<[u8; 20]> = content
            .chunks(16_384)
            .map(|piece| Sha1::digest(piece).into())
            .collect();
        assert_eq!(m.piece_hashes, hashes);
    }

    /// Made once with python3-libtorrent 2.0.8 (`create_torrent(..., flags=v1_only)`, private,
    /// trackers `http://tracker.lab:6969/announce` in tiers 0 and 1, `udp://tracker.lab:6969`
    /// in tier 1, `http://backup.lab:8080/announce` in tier 2); the hash is what
    /// `torrent_info.info_hashes().v1` reported.
    #[test]
    fn agrees_with_libtorrent_on_a_v1_torrent() {
        let m = Metainfo::from_bytes(include_bytes!("../tests/fixtures/libtorrent-v1.torrent"))
            .unwrap();
        check_fixture(&m, "bde9f770653a7f0bd8618e5db4ff4a313593f917");
        assert!(m.private);
        assert_eq!(
            m.announce,
            [
                "http://tracker.lab:6969/announce",
                "http://backup.lab:8080/announce"
            ]
        );
    }

    /// libtorrent 2.0's default: a hybrid v1/v2 torrent, whose v2 fields we ignore.
    #[test]
    fn agrees_with_libtorrent_on_a_hybrid_torrent() {
        let m = Metainfo::from_bytes(include_bytes!(
            "../tests/fixtures/libtorrent-hybrid.torrent"
        ))
        .unwrap();
        check_fixture(&m, "3097799a4aea431df10abcdb9b4e737a11f3ff19");
        assert!(!m.private);
        assert_eq!(m.announce, ["http://tracker.lab:6969/announce"]);
    }
}
