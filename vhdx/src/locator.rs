//! The parent locator of a differencing VHDX: where the parent is, and which parent it is.
//!
//! MS-VHDX's locator of type B04AEFB7-D19E-4A81-B789-25B8E9445913 is a list of key/value
//! pairs, both UTF-16LE without terminator. `parent_linkage` names the parent's
//! `DataWriteGuid` (the parent must be unchanged since the child was made); the paths say where
//! to look for it, tried in order `relative_path` (from the child's directory), `volume_path`
//! (`\\?\Volume{GUID}\...`, independent of drive letters), `absolute_win32_path`.

use crate::guid::Guid;
use crate::inspect::{guid, le_u16, le_u32};

/// The locator type every VHDX reader understands.
pub(crate) const LOCATOR_TYPE: [u8; 16] = guid(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

const HEADER_LEN: usize = 20;
const ENTRY_LEN: usize = 12;

/// Why a set of parent paths cannot go into a locator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parent locator: {0}")]
pub struct LocatorError(String);

/// Where a child's parent is, as Windows paths. Invariant: at least one path; every path is
/// non-empty, has no NUL and fits a locator value (at most 32767 UTF-16 units); each has the
/// shape its key requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLocator {
    relative_path: Option<String>,
    absolute_win32_path: Option<String>,
    volume_path: Option<String>,
}

impl ParentLocator {
    /// A locator from paths the caller already has in Windows form: `relative_path` from the
    /// child's directory (`..\images\golden.vhdx`), `absolute_win32_path` (`C:\...` or
    /// `\\?\C:\...`), `volume_path` (`\\?\Volume{GUID}\...`).
    pub fn new(
        relative_path: Option<&str>,
        absolute_win32_path: Option<&str>,
        volume_path: Option<&str>,
    ) -> Result<Self, LocatorError> {
        if relative_path.is_none() && absolute_win32_path.is_none() && volume_path.is_none() {
            return Err(LocatorError(
                "no path to the parent given; a reader could not find it".to_owned(),
            ));
        }
        if let Some(path) = relative_path {
            check_value("relative_path", path)?;
            if drive_absolute(path).is_some() || path.starts_with(['\\', '/']) {
                return Err(LocatorError(format!(
                    "relative_path {path:?} is absolute; it must lead from the child's \
                     directory, like ..\\images\\golden.vhdx"
                )));
            }
        }
        if let Some(path) = absolute_win32_path {
            check_value("absolute_win32_path", path)?;
            if drive_absolute(path).is_none() && !path.starts_with("\\\\") {
                return Err(LocatorError(format!(
                    "absolute_win32_path {path:?} is not an absolute Windows path like \
                     C:\\images\\golden.vhdx"
                )));
            }
        }
        if let Some(path) = volume_path {
            check_value("volume_path", path)?;
            let lower = path.to_ascii_lowercase();
            if !lower.starts_with("\\\\?\\volume{") || !lower.contains("}\\") {
                return Err(LocatorError(format!(
                    "volume_path {path:?} is not a volume path like \
                     \\\\?\\Volume{{GUID}}\\images\\golden.vhdx"
                )));
            }
        }
        Ok(ParentLocator {
            relative_path: relative_path.map(str::to_owned),
            absolute_win32_path: absolute_win32_path.map(str::to_owned),
            volume_path: volume_path.map(str::to_owned),
        })
    }

    /// The locator for a parent and a child given as absolute Windows paths (`C:\...`,
    /// `\\?\C:\...`; `/` is taken as `\`): the parent's absolute path (as `\\?\C:\...`), and the path from the
    /// child's directory when both are on one drive. Names compare case-insensitively, as on
    /// NTFS. Add the drive-letter-free form with [`ParentLocator::with_volume_path`].
    pub fn from_windows_paths(parent: &str, child: &str) -> Result<Self, LocatorError> {
        let (parent_drive, parent_parts) = split_absolute("parent", parent)?;
        let (child_drive, mut child_parts) = split_absolute("child", child)?;
        let Some(parent_name) = parent_parts.last() else {
            return Err(LocatorError(format!(
                "parent path {parent:?} names a drive, not a file"
            )));
        };
        if child_parts.pop().is_none() {
            return Err(LocatorError(format!(
                "child path {child:?} names a drive, not a file"
            )));
        }
        // The `\\?\` form, as Windows itself records it: no path-length limit, no parsing of
        // the names.
        let absolute = format!("\\\\?\\{parent_drive}:\\{}", parent_parts.join("\\"));
        let relative = if parent_drive.eq_ignore_ascii_case(&child_drive) {
            let parent_dir = &parent_parts[..parent_parts.len() - 1];
            let common = parent_dir
                .iter()
                .zip(&child_parts)
                .take_while(|(a, b)| a.to_lowercase() == b.to_lowercase())
                .count();
            let ups = child_parts.len() - common;
            let mut path = if ups == 0 {
                ".\\".to_owned()
            } else {
                "..\\".repeat(ups)
            };
            for part in &parent_dir[common..] {
                path.push_str(part);
                path.push('\\');
            }
            path.push_str(parent_name);
            Some(path)
        } else {
            None
        };
        ParentLocator::new(relative.as_deref(), Some(&absolute), None)
    }

    /// The same locator, also naming the parent by volume (`\\?\Volume{GUID}\...`), which
    /// stays right when drive letters change between the running system and the booted image.
    pub fn with_volume_path(self, volume_path: &str) -> Result<Self, LocatorError> {
        ParentLocator::new(
            self.relative_path.as_deref(),
            self.absolute_win32_path.as_deref(),
            Some(volume_path),
        )
    }

    /// The path from the child's directory, if given.
    pub fn relative_path(&self) -> Option<&str> {
        self.relative_path.as_deref()
    }

    /// The absolute Win32 path, if given.
    pub fn absolute_win32_path(&self) -> Option<&str> {
        self.absolute_win32_path.as_deref()
    }

    /// The volume path, if given.
    pub fn volume_path(&self) -> Option<&str> {
        self.volume_path.as_deref()
    }

    /// The metadata item: header, entries, then the keys and values they point at.
    pub(crate) fn encode(&self, parent_linkage: Guid) -> Vec<u8> {
        let linkage = parent_linkage.braced();
        let pairs: Vec<(&str, &str)> = [
            Some(("parent_linkage", linkage.as_str())),
            self.relative_path.as_deref().map(|p| ("relative_path", p)),
            self.volume_path.as_deref().map(|p| ("volume_path", p)),
            self.absolute_win32_path
                .as_deref()
                .map(|p| ("absolute_win32_path", p)),
        ]
        .into_iter()
        .flatten()
        .collect();
        let mut out = Vec::new();
        out.extend_from_slice(&LOCATOR_TYPE);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(pairs.len() as u16).to_le_bytes());
        let mut data = Vec::new();
        let data_start = HEADER_LEN + ENTRY_LEN * pairs.len();
        for (key, value) in pairs {
            let key = utf16le(key);
            let value = utf16le(value);
            // Lengths fit u16: keys are short and the constructor bounds every value.
            out.extend_from_slice(&((data_start + data.len()) as u32).to_le_bytes());
            out.extend_from_slice(&((data_start + data.len() + key.len()) as u32).to_le_bytes());
            out.extend_from_slice(&(key.len() as u16).to_le_bytes());
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
            data.extend_from_slice(&key);
            data.extend_from_slice(&value);
        }
        out.extend_from_slice(&data);
        out
    }
}

/// A locator as read from a file: its key/value pairs in file order. Any error says what is
/// malformed.
pub(crate) fn decode(item: &[u8]) -> Result<Vec<(String, String)>, String> {
    if item.len() < HEADER_LEN {
        return Err(format!(
            "the item is {} bytes, shorter than the {HEADER_LEN}-byte locator header",
            item.len()
        ));
    }
    if item[..16] != LOCATOR_TYPE {
        return Err(format!(
            "the locator type is {}, not the VHDX parent locator {}",
            Guid::from_bytes(item[..16].try_into().expect("16 bytes")),
            Guid::from_bytes(LOCATOR_TYPE)
        ));
    }
    let count = usize::from(le_u16(item, 18));
    if HEADER_LEN + count * ENTRY_LEN > item.len() {
        return Err(format!(
            "{count} entries do not fit the {}-byte item",
            item.len()
        ));
    }
    let mut pairs: Vec<(String, String)> = Vec::with_capacity(count);
    for i in 0..count {
        let at = HEADER_LEN + i * ENTRY_LEN;
        let text = |offset: usize, len: usize, what: &str| -> Result<String, String> {
            let bytes = offset
                .checked_add(len)
                .and_then(|end| item.get(offset..end))
                .ok_or_else(|| {
                    format!(
                        "entry {i}'s {what} (bytes {offset}..+{len}) lies outside the \
                         {}-byte item",
                        item.len()
                    )
                })?;
            if len == 0 || len % 2 != 0 {
                return Err(format!(
                    "entry {i}'s {what} is {len} bytes, not a non-empty UTF-16 string"
                ));
            }
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|u| u16::from_le_bytes([u[0], u[1]]))
                .collect();
            String::from_utf16(&units)
                .map_err(|_| format!("entry {i}'s {what} is not valid UTF-16"))
        };
        let key = text(
            le_u32(item, at) as usize,
            usize::from(le_u16(item, at + 8)),
            "key",
        )?;
        let value = text(
            le_u32(item, at + 4) as usize,
            usize::from(le_u16(item, at + 10)),
            "value",
        )?;
        if pairs.iter().any(|(k, _)| *k == key) {
            return Err(format!("key {key:?} appears twice"));
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

fn utf16le(text: &str) -> Vec<u8> {
    text.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn check_value(key: &str, value: &str) -> Result<(), LocatorError> {
    if value.is_empty() {
        return Err(LocatorError(format!("{key} is empty")));
    }
    if value.contains('\0') {
        return Err(LocatorError(format!("{key} {value:?} contains a NUL")));
    }
    // A value's length is a 16-bit byte count.
    if value.encode_utf16().count() > usize::from(u16::MAX) / 2 {
        return Err(LocatorError(format!(
            "{key} is {} UTF-16 units long, more than the 32767 a locator value holds",
            value.encode_utf16().count()
        )));
    }
    Ok(())
}

/// The drive letter of `C:\...` or `\\?\C:\...` (either separator).
fn drive_absolute(path: &str) -> Option<char> {
    let path = path.strip_prefix("\\\\?\\").unwrap_or(path);
    let mut chars = path.chars();
    let letter = chars.next().filter(char::is_ascii_alphabetic)?;
    (chars.next() == Some(':') && matches!(chars.next(), Some('\\' | '/'))).then_some(letter)
}

/// Drive letter (upper case) and the path's names, with `.` dropped and `..` applied.
fn split_absolute(which: &str, path: &str) -> Result<(char, Vec<String>), LocatorError> {
    let Some(drive) = drive_absolute(path) else {
        return Err(LocatorError(format!(
            "{which} path {path:?} is not an absolute Windows path like C:\\images\\golden.vhdx"
        )));
    };
    let rest = path.strip_prefix("\\\\?\\").unwrap_or(path);
    let mut parts: Vec<String> = Vec::new();
    for name in rest[3..].split(['\\', '/']) {
        match name {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(LocatorError(format!(
                        "{which} path {path:?} climbs above its drive's root"
                    )));
                }
            }
            name => parts.push(name.to_owned()),
        }
    }
    Ok((drive.to_ascii_uppercase(), parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_on_one_drive_give_a_relative_and_an_absolute_path() {
        let cases = [
            (
                r"C:\BootTorrent\images\win11.vhdx",
                r"C:\BootTorrent\children\win11.vhdx",
                r"..\images\win11.vhdx",
            ),
            (r"D:\g\win11.vhdx", r"D:\g\child.vhdx", r".\win11.vhdx"),
            (
                r"d:/a/b/win11.vhdx",
                r"\\?\D:\A\x\y\child.vhdx",
                r"..\..\b\win11.vhdx",
            ),
            (
                r"E:\win11.vhdx",
                r"E:\c\.\d\..\child.vhdx",
                r"..\win11.vhdx",
            ),
            (r"E:\p\win11.vhdx", r"E:\child.vhdx", r".\p\win11.vhdx"),
        ];
        for (parent, child, relative) in cases {
            let locator = ParentLocator::from_windows_paths(parent, child).unwrap();
            assert_eq!(locator.relative_path(), Some(relative), "{parent} {child}");
            assert!(locator.volume_path().is_none());
        }
        let locator = ParentLocator::from_windows_paths(
            r"\\?\c:\BootTorrent\.\images\win11.vhdx",
            r"c:\x.vhdx",
        )
        .unwrap();
        assert_eq!(
            locator.absolute_win32_path(),
            Some(r"\\?\C:\BootTorrent\images\win11.vhdx")
        );
    }

    #[test]
    fn paths_on_two_drives_give_only_the_absolute_path() {
        let locator =
            ParentLocator::from_windows_paths(r"C:\images\win11.vhdx", r"D:\child.vhdx").unwrap();
        assert_eq!(locator.relative_path(), None);
        assert_eq!(
            locator.absolute_win32_path(),
            Some(r"\\?\C:\images\win11.vhdx")
        );
        let locator = locator
            .with_volume_path(r"\\?\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\images\w.vhdx")
            .unwrap();
        assert!(locator.volume_path().is_some());
        assert!(locator.absolute_win32_path().is_some());
    }

    #[test]
    fn bad_paths_are_refused_with_the_reason() {
        let refused = |result: Result<ParentLocator, LocatorError>, why: &str| {
            let msg = result.expect_err("refused").to_string();
            assert!(msg.contains(why), "expected {why:?} in {msg}");
        };
        refused(ParentLocator::new(None, None, None), "no path");
        refused(ParentLocator::new(Some(""), None, None), "empty");
        refused(ParentLocator::new(Some("a\0b"), None, None), "NUL");
        refused(ParentLocator::new(Some(r"C:\x"), None, None), "is absolute");
        refused(
            ParentLocator::new(None, Some(r"x\y"), None),
            "not an absolute",
        );
        refused(
            ParentLocator::new(None, None, Some(r"C:\x")),
            "not a volume",
        );
        refused(
            ParentLocator::new(Some(&"a".repeat(40_000)), None, None),
            "more than the 32767",
        );
        refused(
            ParentLocator::from_windows_paths(r"images\w.vhdx", r"C:\c.vhdx"),
            "parent path",
        );
        refused(
            ParentLocator::from_windows_paths(r"C:\w.vhdx", r"C:\..\..\c.vhdx"),
            "climbs above",
        );
        refused(
            ParentLocator::from_windows_paths(r"C:\", r"C:\c.vhdx"),
            "names a drive",
        );
    }

    #[test]
    fn encode_and_decode_round_trip() {
        let locator = ParentLocator::new(
            Some(r".\wïn11.vhdx"),
            Some(r"C:\images\wïn11.vhdx"),
            Some(r"\\?\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\images\wïn11.vhdx"),
        )
        .unwrap();
        let linkage = Guid::random().unwrap();
        let pairs = decode(&locator.encode(linkage)).unwrap();
        let get = |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("parent_linkage"), Some(linkage.braced().as_str()));
        assert_eq!(get("relative_path"), locator.relative_path());
        assert_eq!(get("absolute_win32_path"), locator.absolute_win32_path());
        assert_eq!(get("volume_path"), locator.volume_path());
        assert_eq!(pairs.len(), 4);
    }

    #[test]
    fn malformed_locators_are_refused_without_panicking() {
        let good = ParentLocator::new(Some(r".\p.vhdx"), None, None)
            .unwrap()
            .encode(Guid::ZERO);
        assert!(decode(&good[..10]).unwrap_err().contains("shorter"));
        let mut bad_type = good.clone();
        bad_type[0] ^= 1;
        assert!(decode(&bad_type).unwrap_err().contains("locator type"));
        let mut many = good.clone();
        many[18] = 200;
        assert!(decode(&many).unwrap_err().contains("do not fit"));
        let mut far = good.clone();
        far[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&far).unwrap_err().contains("outside"));
        let mut odd = good.clone();
        odd[HEADER_LEN + 8] = 3;
        assert!(decode(&odd).unwrap_err().contains("UTF-16"));
        // Every truncation is an error, never a panic.
        for len in 0..good.len() {
            let _ = decode(&good[..len]);
        }
    }
}
