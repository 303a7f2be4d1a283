//! Bencode for the whole workspace: a strict decoder for untrusted input (`.torrent` files and
//! tracker responses) and an [`Encoder`] for what we write (`.torrent` files, tracker answers).
//!
//! Strict wherever two readers could disagree about what the bytes mean: integers must be in
//! their one canonical form, dictionary keys must be unique and nothing may follow the value.
//! Lenient about key order, because real trackers and creators do not always sort their keys
//! and the info hash is taken over the exact input bytes anyway ([`Dict::raw`]).
//!
//! Hostile input costs at most time linear in its length: nesting is capped at [`MAX_DEPTH`]
//! so deep input cannot overflow the stack, and every length is checked against the bytes that
//! remain before anything is sliced or allocated.

use std::collections::HashSet;
use std::fmt;

/// Deepest nesting of lists and dictionaries we accept. Torrents and tracker responses need
/// three or four levels; the cap exists so hostile input cannot exhaust the stack.
pub const MAX_DEPTH: usize = 64;

/// One decoded bencode value, borrowing its byte strings from the input.
#[derive(Clone, PartialEq, Eq)]
pub enum Value<'a> {
    /// `i<digits>e`, in its canonical form.
    Int(i64),
    /// `<len>:<bytes>`; not necessarily UTF-8.
    Bytes(&'a [u8]),
    /// `l<values>e`.
    List(Vec<Value<'a>>),
    /// `d<key><value>...e`.
    Dict(Dict<'a>),
}

impl<'a> Value<'a> {
    /// The integer, if this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            _ => None,
        }
    }

    /// The byte string, if this is one.
    pub fn as_bytes(&self) -> Option<&'a [u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// The list's items, if this is a list.
    pub fn as_list(&self) -> Option<&[Value<'a>]> {
        match self {
            Value::List(items) => Some(items),
            _ => None,
        }
    }

    /// The dictionary, if this is one.
    pub fn as_dict(&self) -> Option<&Dict<'a>> {
        match self {
            Value::Dict(d) => Some(d),
            _ => None,
        }
    }

    /// What kind of value this is, with its article, for error messages ("expected a
    /// dictionary, found a list").
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Int(_) => "an integer",
            Value::Bytes(_) => "a byte string",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dictionary",
        }
    }
}

// Byte strings are mostly ASCII keys and URLs; printing them as `[104, 116, ...]` would make
// test failures and logs unreadable.
impl fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(n) => write!(f, "{n}"),
            Value::Bytes(b) => write!(f, "b\"{}\"", b.escape_ascii()),
            Value::List(items) => f.debug_list().entries(items).finish(),
            Value::Dict(d) => d.fmt(f),
        }
    }
}

/// A decoded dictionary: its entries in input order, plus the exact bytes it was decoded from.
#[derive(Clone, PartialEq, Eq)]
pub struct Dict<'a> {
    entries: Vec<(&'a [u8], Value<'a>)>,
    raw: &'a [u8],
}

impl<'a> Dict<'a> {
    /// The value under `key`. Keys are unique (the decoder refuses duplicates), so there is at
    /// most one.
    pub fn get(&self, key: &[u8]) -> Option<&Value<'a>> {
        // A linear scan: callers look up a handful of keys in dictionaries of a handful of
        // entries, where a map would cost more than it saves.
        self.entries.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// The exact input bytes of this dictionary, from its `d` to its `e`. The info hash is the
    /// SHA-1 of these bytes, so it must not depend on how we would re-encode them.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// The entries in input order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &Value<'a>)> + '_ {
        self.entries.iter().map(|(k, v)| (*k, v))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the dictionary has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl fmt::Debug for Dict<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|(k, v)| (k.escape_ascii().to_string(), v)))
            .finish()
    }
}

/// Why some bytes are not a single well-formed bencode value. Every variant carries the byte
/// offset in the input where the problem was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BencodeError {
    /// The input stopped in the middle of a value.
    #[error("unexpected end of input at byte {offset} while reading {context}")]
    UnexpectedEnd {
        /// Offset of the end of the input.
        offset: usize,
        /// What was being read.
        context: &'static str,
    },
    /// A byte that cannot appear here.
    #[error("unexpected byte '{}' at byte {offset}, expected {expected}", .byte.escape_ascii())]
    UnexpectedByte {
        /// Offset of the byte.
        offset: usize,
        /// The byte itself.
        byte: u8,
        /// What could have appeared instead.
        expected: &'static str,
    },
    /// An integer that is not in canonical form or does not fit in an `i64`.
    #[error("invalid integer at byte {offset}: {reason}")]
    InvalidInteger {
        /// Offset of the integer's `i`.
        offset: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A byte-string length prefix that is not in canonical form or is absurdly large.
    #[error("invalid byte-string length at byte {offset}: {reason}")]
    InvalidLength {
        /// Offset of the length's first digit.
        offset: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A byte string that claims more bytes than the input has left.
    #[error("byte string at byte {offset} claims {len} bytes but only {remaining} remain")]
    LengthExceedsInput {
        /// Offset of the length's first digit.
        offset: usize,
        /// The claimed length.
        len: u64,
        /// Bytes left after the `:`.
        remaining: usize,
    },
    /// Lists and dictionaries nested deeper than [`MAX_DEPTH`].
    #[error("lists and dictionaries nested deeper than {MAX_DEPTH} levels at byte {offset}")]
    TooDeep {
        /// Offset of the `l` or `d` that went one level too deep.
        offset: usize,
    },
    /// The same key twice in one dictionary: readers would disagree about which one counts.
    #[error("duplicate dictionary key \"{key}\" at byte {offset}")]
    DuplicateKey {
        /// Offset of the second occurrence's length prefix.
        offset: usize,
        /// The key, escaped and shortened for display.
        key: String,
    },
    /// Bytes after the one value the input should hold.
    #[error("{len} trailing bytes after the value, starting at byte {offset}")]
    TrailingBytes {
        /// Offset of the first extra byte.
        offset: usize,
        /// How many extra bytes there are.
        len: usize,
    },
}

impl BencodeError {
    /// The byte offset in the input where decoding failed.
    pub fn offset(&self) -> usize {
        match self {
            BencodeError::UnexpectedEnd { offset, .. }
            | BencodeError::UnexpectedByte { offset, .. }
            | BencodeError::InvalidInteger { offset, .. }
            | BencodeError::InvalidLength { offset, .. }
            | BencodeError::LengthExceedsInput { offset, .. }
            | BencodeError::TooDeep { offset }
            | BencodeError::DuplicateKey { offset, .. }
            | BencodeError::TrailingBytes { offset, .. } => *offset,
        }
    }
}

/// Decodes `input`, which must hold exactly one bencode value and nothing after it.
pub fn decode(input: &[u8]) -> Result<Value<'_>, BencodeError> {
    let mut parser = Parser { input, pos: 0 };
    let value = parser.value(0)?;
    if parser.pos != input.len() {
        return Err(BencodeError::TrailingBytes {
            offset: parser.pos,
            len: input.len() - parser.pos,
        });
    }
    Ok(value)
}

/// Longest key we echo back in a [`BencodeError::DuplicateKey`]; hostile keys can be megabytes.
const MAX_KEY_SHOWN: usize = 64;

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self, context: &'static str) -> Result<u8, BencodeError> {
        self.input
            .get(self.pos)
            .copied()
            .ok_or(BencodeError::UnexpectedEnd {
                offset: self.pos,
                context,
            })
    }

    /// `depth` counts the lists and dictionaries that enclose this value.
    fn value(&mut self, depth: usize) -> Result<Value<'a>, BencodeError> {
        match self.peek("a value")? {
            b'i' => self.int().map(Value::Int),
            b'0'..=b'9' => self.bytes().map(Value::Bytes),
            b'l' => self.list(depth + 1),
            b'd' => self.dict(depth + 1),
            byte => Err(BencodeError::UnexpectedByte {
                offset: self.pos,
                byte,
                expected: "'i', 'l', 'd' or a digit",
            }),
        }
    }

    /// Reads a run of ASCII digits; returns them (possibly empty).
    fn digits(&mut self) -> &'a [u8] {
        let start = self.pos;
        let len = self.input[start..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        self.pos += len;
        &self.input[start..self.pos]
    }

    fn int(&mut self) -> Result<i64, BencodeError> {
        let start = self.pos;
        self.pos += 1; // the 'i'
        let negative = self.input.get(self.pos) == Some(&b'-');
        if negative {
            self.pos += 1;
        }
        let digits = self.digits();
        match self.peek("an integer")? {
            b'e' => self.pos += 1,
            byte => {
                return Err(BencodeError::UnexpectedByte {
                    offset: self.pos,
                    byte,
                    expected: "a digit or 'e'",
                });
            }
        }
        let invalid = |reason| BencodeError::InvalidInteger {
            offset: start,
            reason,
        };
        match digits {
            [] => return Err(invalid("no digits")),
            [b'0'] if negative => return Err(invalid("negative zero")),
            [b'0', _, ..] => return Err(invalid("leading zero")),
            _ => {}
        }
        // Accumulate downwards so i64::MIN, whose magnitude has no positive i64, still parses.
        let mut n: i64 = 0;
        for &d in digits {
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_sub(i64::from(d - b'0')))
                .ok_or(invalid("does not fit in 64 bits"))?;
        }
        if negative {
            Ok(n)
        } else {
            n.checked_neg().ok_or(invalid("does not fit in 64 bits"))
        }
    }

    fn bytes(&mut self) -> Result<&'a [u8], BencodeError> {
        let start = self.pos;
        let digits = self.digits();
        match self.peek("a byte-string length")? {
            b':' => self.pos += 1,
            byte => {
                return Err(BencodeError::UnexpectedByte {
                    offset: self.pos,
                    byte,
                    expected: "a digit or ':'",
                });
            }
        }
        let invalid = |reason| BencodeError::InvalidLength {
            offset: start,
            reason,
        };
        if let [b'0', _, ..] = digits {
            return Err(invalid("leading zero"));
        }
        let mut len: u64 = 0;
        for &d in digits {
            len = len
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(d - b'0')))
                .ok_or(invalid("does not fit in 64 bits"))?;
        }
        let remaining = self.input.len() - self.pos;
        if len > remaining as u64 {
            return Err(BencodeError::LengthExceedsInput {
                offset: start,
                len,
                remaining,
            });
        }
        let bytes = &self.input[self.pos..self.pos + len as usize];
        self.pos += len as usize;
        Ok(bytes)
    }

    fn enter(&self, depth: usize) -> Result<(), BencodeError> {
        if depth > MAX_DEPTH {
            return Err(BencodeError::TooDeep { offset: self.pos });
        }
        Ok(())
    }

    fn list(&mut self, depth: usize) -> Result<Value<'a>, BencodeError> {
        self.enter(depth)?;
        self.pos += 1; // the 'l'
        let mut items = Vec::new();
        while self.peek("a list")? != b'e' {
            items.push(self.value(depth)?);
        }
        self.pos += 1;
        Ok(Value::List(items))
    }

    fn dict(&mut self, depth: usize) -> Result<Value<'a>, BencodeError> {
        self.enter(depth)?;
        let start = self.pos;
        self.pos += 1; // the 'd'
        let mut entries = Vec::new();
        // A hash set rather than a scan of `entries`, so a dictionary with many keys stays
        // linear to check.
        let mut seen = HashSet::new();
        loop {
            match self.peek("a dictionary")? {
                b'e' => break,
                b'0'..=b'9' => {}
                byte => {
                    return Err(BencodeError::UnexpectedByte {
                        offset: self.pos,
                        byte,
                        expected: "a byte-string key or 'e'",
                    });
                }
            }
            let key_offset = self.pos;
            let key = self.bytes()?;
            if !seen.insert(key) {
                let shown = &key[..key.len().min(MAX_KEY_SHOWN)];
                let ellipsis = if key.len() > MAX_KEY_SHOWN { "..." } else { "" };
                return Err(BencodeError::DuplicateKey {
                    offset: key_offset,
                    key: format!("{}{ellipsis}", shown.escape_ascii()),
                });
            }
            let value = self.value(depth)?;
            entries.push((key, value));
        }
        self.pos += 1;
        Ok(Value::Dict(Dict {
            entries,
            raw: &self.input[start..self.pos],
        }))
    }
}

/// Writes bencode. What goes through it is ours (fixed keys, values we hold), so writing cannot
/// fail; keys out of order are a bug in the caller, caught in debug builds.
#[derive(Debug, Default)]
pub struct Encoder {
    out: Vec<u8>,
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Encoder {
        Encoder::default()
    }

    /// An empty encoder with room for `capacity` bytes, for callers that know the size.
    pub fn with_capacity(capacity: usize) -> Encoder {
        Encoder {
            out: Vec::with_capacity(capacity),
        }
    }

    /// `i<n>e`. Takes any integer up to `u64` and `i64`, which is every count and length we
    /// write.
    pub fn int(&mut self, n: impl Into<i128>) {
        use std::io::Write as _;
        // Writing to a Vec cannot fail.
        let _ = write!(self.out, "i{}e", n.into());
    }

    /// `<len>:<bytes>`.
    pub fn bytes(&mut self, bytes: &[u8]) {
        use std::io::Write as _;
        let _ = write!(self.out, "{}:", bytes.len());
        self.out.extend_from_slice(bytes);
    }

    /// `l<items>e`, the items being whatever `items` writes.
    pub fn list(&mut self, items: impl FnOnce(&mut Encoder)) {
        self.out.push(b'l');
        items(self);
        self.out.push(b'e');
    }

    /// `d<entries>e`, the entries being whatever `entries` writes, keys in increasing order.
    pub fn dict(&mut self, entries: impl FnOnce(&mut DictEncoder<'_>)) {
        self.dict_checked(true, entries);
    }

    /// [`dict`](Self::dict) for rewriting a decoded dictionary: keys in the order given, since
    /// the decoder accepts them unsorted and their order must survive.
    pub fn dict_as_decoded(&mut self, entries: impl FnOnce(&mut DictEncoder<'_>)) {
        self.dict_checked(false, entries);
    }

    fn dict_checked(&mut self, sorted: bool, entries: impl FnOnce(&mut DictEncoder<'_>)) {
        self.out.push(b'd');
        entries(&mut DictEncoder {
            encoder: self,
            sorted,
            last_key: None,
        });
        self.out.push(b'e');
    }

    /// A decoded value written back. The decoder accepts only canonical integers and lengths,
    /// so this reproduces the exact bytes it was decoded from, key order included.
    pub fn value(&mut self, value: &Value<'_>) {
        match value {
            Value::Int(n) => self.int(*n),
            Value::Bytes(b) => self.bytes(b),
            Value::List(items) => self.list(|list| items.iter().for_each(|v| list.value(v))),
            Value::Dict(d) => self.dict_as_decoded(|dict| {
                for (k, v) in d.iter() {
                    dict.entry(k, |e| e.value(v));
                }
            }),
        }
    }

    /// The bytes written.
    pub fn finish(self) -> Vec<u8> {
        self.out
    }
}

/// Writes the entries of one dictionary; see [`Encoder::dict`].
#[derive(Debug)]
pub struct DictEncoder<'a> {
    encoder: &'a mut Encoder,
    /// Whether keys must increase: false only for [`Encoder::dict_as_decoded`].
    sorted: bool,
    /// Where the previous key's bytes sit in the output, to check the order without copying.
    last_key: Option<std::ops::Range<usize>>,
}

impl DictEncoder<'_> {
    /// Writes `key` and then the value `value` writes. BEP 3 wants keys in increasing byte
    /// order, without repeats: readers such as bendy refuse anything else.
    pub fn entry(&mut self, key: &[u8], value: impl FnOnce(&mut Encoder)) {
        debug_assert!(
            !self.sorted
                || self
                    .last_key
                    .clone()
                    .is_none_or(|last| &self.encoder.out[last] < key),
            "bencode keys out of order at \"{}\"",
            key.escape_ascii()
        );
        self.encoder.bytes(key);
        let end = self.encoder.out.len();
        self.last_key = Some(end - key.len()..end);
        value(self.encoder);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Re-encodes a decoded value in the order it was read. Because the decoder accepts only
    /// canonical integers and lengths, this must reproduce the input exactly.
    fn encode(value: &Value<'_>, out: &mut Vec<u8>) {
        let mut encoder = Encoder::new();
        encoder.value(value);
        out.extend_from_slice(&encoder.finish());
    }

    /// Checks every dictionary's `raw` against an independent re-encoding of it.
    fn check_raw(value: &Value<'_>) {
        match value {
            Value::List(items) => items.iter().for_each(check_raw),
            Value::Dict(d) => {
                let mut out = Vec::new();
                encode(value, &mut out);
                assert_eq!(d.raw(), &out[..]);
                d.iter().for_each(|(_, v)| check_raw(v));
            }
            Value::Int(_) | Value::Bytes(_) => {}
        }
    }

    fn err(input: &[u8]) -> BencodeError {
        match decode(input) {
            Ok(v) => panic!("{:?} decoded to {v:?}", input.escape_ascii().to_string()),
            Err(e) => e,
        }
    }

    #[test]
    fn integers() {
        assert_eq!(decode(b"i0e").unwrap(), Value::Int(0));
        assert_eq!(decode(b"i42e").unwrap(), Value::Int(42));
        assert_eq!(decode(b"i-42e").unwrap(), Value::Int(-42));
        assert_eq!(
            decode(b"i9223372036854775807e").unwrap(),
            Value::Int(i64::MAX)
        );
        assert_eq!(
            decode(b"i-9223372036854775808e").unwrap(),
            Value::Int(i64::MIN)
        );
    }

    #[test]
    fn byte_strings() {
        assert_eq!(decode(b"0:").unwrap(), Value::Bytes(b""));
        assert_eq!(decode(b"4:spam").unwrap(), Value::Bytes(b"spam"));
        assert_eq!(
            decode(b"3:\x00\xffe").unwrap(),
            Value::Bytes(&[0x00, 0xff, b'e'])
        );
    }

    #[test]
    fn lists_and_dicts() {
        assert_eq!(decode(b"le").unwrap(), Value::List(vec![]));
        assert_eq!(
            decode(b"li1e4:spamlee").unwrap(),
            Value::List(vec![
                Value::Int(1),
                Value::Bytes(b"spam"),
                Value::List(vec![])
            ])
        );
        let input = b"d3:cow3:moo4:spaml1:a1:bee";
        let v = decode(input).unwrap();
        let d = v.as_dict().unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d.get(b"cow"), Some(&Value::Bytes(b"moo")));
        assert_eq!(d.get(b"spam").unwrap().as_list().unwrap().len(), 2);
        assert_eq!(d.get(b"moo"), None);
        assert_eq!(d.raw(), &input[..]);
        assert!(decode(b"de").unwrap().as_dict().unwrap().is_empty());
    }

    #[test]
    fn unsorted_keys_are_accepted_and_kept_in_input_order() {
        let v = decode(b"d1:bi2e1:ai1ee").unwrap();
        let keys: Vec<_> = v.as_dict().unwrap().iter().map(|(k, _)| k).collect();
        assert_eq!(keys, [b"b", b"a"]);
    }

    #[test]
    fn raw_of_a_nested_dict_is_exactly_its_bytes() {
        let input = b"d8:announce3:url4:infod6:lengthi5e4:name1:xe5:extrai0ee";
        let v = decode(input).unwrap();
        let info = v
            .as_dict()
            .unwrap()
            .get(b"info")
            .unwrap()
            .as_dict()
            .unwrap();
        assert_eq!(info.raw(), b"d6:lengthi5e4:name1:xe");
        check_raw(&v);
    }

    #[test]
    fn malformed_integers() {
        assert_eq!(
            err(b"i03e"),
            BencodeError::InvalidInteger {
                offset: 0,
                reason: "leading zero"
            }
        );
        assert_eq!(
            err(b"i-0e"),
            BencodeError::InvalidInteger {
                offset: 0,
                reason: "negative zero"
            }
        );
        assert!(matches!(
            err(b"i-03e"),
            BencodeError::InvalidInteger {
                reason: "leading zero",
                ..
            }
        ));
        assert!(matches!(
            err(b"ie"),
            BencodeError::InvalidInteger {
                reason: "no digits",
                ..
            }
        ));
        assert!(matches!(
            err(b"i-e"),
            BencodeError::InvalidInteger {
                reason: "no digits",
                ..
            }
        ));
        assert!(matches!(
            err(b"i9223372036854775808e"),
            BencodeError::InvalidInteger {
                reason: "does not fit in 64 bits",
                ..
            }
        ));
        assert!(matches!(
            err(b"i-9223372036854775809e"),
            BencodeError::InvalidInteger {
                reason: "does not fit in 64 bits",
                ..
            }
        ));
        assert_eq!(
            err(b"i1x"),
            BencodeError::UnexpectedByte {
                offset: 2,
                byte: b'x',
                expected: "a digit or 'e'"
            }
        );
        assert!(matches!(
            err(b"i+1e"),
            BencodeError::UnexpectedByte { offset: 1, .. }
        ));
        assert!(matches!(
            err(b"i1.5e"),
            BencodeError::UnexpectedByte { offset: 2, .. }
        ));
    }

    #[test]
    fn unterminated_values() {
        assert_eq!(
            err(b""),
            BencodeError::UnexpectedEnd {
                offset: 0,
                context: "a value"
            }
        );
        assert_eq!(
            err(b"i12"),
            BencodeError::UnexpectedEnd {
                offset: 3,
                context: "an integer"
            }
        );
        assert_eq!(
            err(b"li1e"),
            BencodeError::UnexpectedEnd {
                offset: 4,
                context: "a list"
            }
        );
        assert_eq!(
            err(b"d1:ai1e"),
            BencodeError::UnexpectedEnd {
                offset: 7,
                context: "a dictionary"
            }
        );
        assert_eq!(
            err(b"d1:a"),
            BencodeError::UnexpectedEnd {
                offset: 4,
                context: "a value"
            }
        );
        assert_eq!(
            err(b"12"),
            BencodeError::UnexpectedEnd {
                offset: 2,
                context: "a byte-string length"
            }
        );
    }

    #[test]
    fn malformed_lengths() {
        assert_eq!(
            err(b"5:abc"),
            BencodeError::LengthExceedsInput {
                offset: 0,
                len: 5,
                remaining: 3
            }
        );
        assert_eq!(
            err(b"l18446744073709551615:xe"),
            BencodeError::LengthExceedsInput {
                offset: 1,
                len: u64::MAX,
                remaining: 2
            }
        );
        assert_eq!(
            err(b"99999999999999999999999:x"),
            BencodeError::InvalidLength {
                offset: 0,
                reason: "does not fit in 64 bits"
            }
        );
        assert_eq!(
            err(b"03:abc"),
            BencodeError::InvalidLength {
                offset: 0,
                reason: "leading zero"
            }
        );
        assert!(matches!(
            err(b"3x"),
            BencodeError::UnexpectedByte { offset: 1, .. }
        ));
    }

    #[test]
    fn malformed_dicts() {
        assert_eq!(
            err(b"d1:ai1e1:bi2e1:ai3ee"),
            BencodeError::DuplicateKey {
                offset: 13,
                key: "a".into()
            }
        );
        assert_eq!(
            err(b"di1ei2ee"),
            BencodeError::UnexpectedByte {
                offset: 1,
                byte: b'i',
                expected: "a byte-string key or 'e'"
            }
        );
        let long_key = "k".repeat(1000);
        let input = format!("d1000:{long_key}i1e1000:{long_key}i2ee");
        match err(input.as_bytes()) {
            BencodeError::DuplicateKey { key, .. } => assert_eq!(key.len(), MAX_KEY_SHOWN + 3),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stray_bytes() {
        assert_eq!(
            err(b"x"),
            BencodeError::UnexpectedByte {
                offset: 0,
                byte: b'x',
                expected: "'i', 'l', 'd' or a digit"
            }
        );
        assert!(matches!(
            err(b"e"),
            BencodeError::UnexpectedByte { offset: 0, .. }
        ));
        assert_eq!(
            err(b"i1ei2e"),
            BencodeError::TrailingBytes { offset: 3, len: 3 }
        );
        assert_eq!(
            err(b"dei"),
            BencodeError::TrailingBytes { offset: 2, len: 1 }
        );
    }

    #[test]
    fn depth_limit() {
        let nested = |n: usize| [vec![b'l'; n], vec![b'e'; n]].concat();
        assert!(decode(&nested(MAX_DEPTH)).is_ok());
        assert_eq!(
            err(&nested(MAX_DEPTH + 1)),
            BencodeError::TooDeep { offset: MAX_DEPTH }
        );
        let dicts = [
            b"d1:a".repeat(MAX_DEPTH + 1),
            b"i0e".to_vec(),
            vec![b'e'; 65],
        ]
        .concat();
        assert_eq!(err(&dicts), BencodeError::TooDeep { offset: 4 * 64 });
        // Far beyond the limit: must be an error, not a stack overflow.
        assert!(matches!(
            err(&vec![b'l'; 1_000_000]),
            BencodeError::TooDeep { .. }
        ));
    }

    #[test]
    fn errors_say_what_and_where() {
        assert_eq!(
            err(b"d1:ai1e1:ai2ee").to_string(),
            "duplicate dictionary key \"a\" at byte 7"
        );
        assert_eq!(
            err(b"i-0e").to_string(),
            "invalid integer at byte 0: negative zero"
        );
        assert_eq!(err(b"li1e").offset(), 4);
    }

    /// Random and mutated inputs: decoding must never panic, and whatever decodes must
    /// re-encode to exactly the input (so no two inputs decode to the same value).
    #[test]
    fn random_inputs_never_panic() {
        const ALPHABET: &[u8] = b"ilde0123456789:-";
        let samples: [&[u8]; 4] = [
            b"d8:announce3:url4:infod6:lengthi5e4:name1:x6:pieces0:ee",
            b"d8:intervali1800e5:peers12:abcdefghijkle",
            b"li-1el0:i0eedee",
            b"d1:ad1:bd1:cli1ei2eeeee",
        ];
        let mut rng = StdRng::seed_from_u64(0xB007_7022);
        let mut decoded = 0;
        for round in 0..10_000 {
            let len = rng.random_range(0..64);
            let input: Vec<u8> = match round % 3 {
                0 => (0..len).map(|_| rng.random()).collect(),
                1 => (0..len)
                    .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
                    .collect(),
                _ => {
                    let mut input = samples[rng.random_range(0..samples.len())].to_vec();
                    for _ in 0..rng.random_range(1..4) {
                        let at = rng.random_range(0..input.len());
                        match rng.random_range(0..4) {
                            0 => input[at] = ALPHABET[rng.random_range(0..ALPHABET.len())],
                            1 => input[at] = rng.random(),
                            2 => input.truncate(at.max(1)),
                            _ => {
                                input.remove(at);
                                if input.is_empty() {
                                    input.push(b'e');
                                }
                            }
                        }
                    }
                    input
                }
            };
            match decode(&input) {
                Ok(value) => {
                    decoded += 1;
                    let mut out = Vec::new();
                    encode(&value, &mut out);
                    assert_eq!(out, input);
                    check_raw(&value);
                }
                Err(e) => assert!(e.offset() <= input.len(), "{e} for {input:?}"),
            }
        }
        // Guard against a generator that only ever produces garbage.
        assert!(decoded > 100, "only {decoded} inputs decoded");
    }

    #[test]
    fn encoder_writes_what_the_decoder_reads() {
        let mut e = Encoder::new();
        e.dict(|d| {
            d.entry(b"a", |e| e.int(u64::MAX));
            d.entry(b"b", |e| e.int(i64::MIN));
            d.entry(b"c", |e| e.bytes(b"\x00:e"));
            d.entry(b"d", |e| {
                e.list(|l| {
                    l.int(0);
                    l.dict(|_| {});
                    l.list(|_| {});
                })
            });
        });
        let bytes = e.finish();
        assert_eq!(
            bytes,
            b"d1:ai18446744073709551615e1:bi-9223372036854775808e1:c3:\x00:e1:dli0edeleee"
        );
        // u64::MAX is beyond what the decoder reads (i64); everything else round-trips.
        let mut e = Encoder::new();
        e.dict(|d| {
            d.entry(b"b", |e| e.int(i64::MIN));
            d.entry(b"c", |e| e.bytes(b"\x00:e"));
        });
        let bytes = e.finish();
        let value = decode(&bytes).unwrap();
        let mut again = Encoder::new();
        again.value(&value);
        assert_eq!(again.finish(), bytes);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "bencode keys out of order")]
    fn encoder_catches_unsorted_keys_in_debug_builds() {
        Encoder::new().dict(|d| {
            d.entry(b"b", |e| e.int(1));
            d.entry(b"a", |e| e.int(2));
        });
    }
}
