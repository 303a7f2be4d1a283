//! GUIDs as VHDX stores them: sixteen bytes whose first three fields are little-endian.

use std::fmt;

/// A GUID in its on-disk byte order (the Windows `GUID` layout: `Data1` to `Data3`
/// little-endian, `Data4` as is). Displays in the usual upper-case hyphenated form.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid([u8; 16]);

impl Guid {
    /// The all-zero GUID (a VHDX header's `LogGuid` when no log entries are pending).
    pub const ZERO: Guid = Guid([0; 16]);

    /// A GUID from its on-disk bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Guid(bytes)
    }

    /// Written field by field so each constant reads exactly as the specification prints it.
    pub(crate) const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Self {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// Its on-disk bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// A fresh random (version 4) GUID from the operating system's generator.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        // Version 4 lives in the high nibble of Data3, stored little-endian (byte 7); the
        // variant in the top bits of Data4[0].
        bytes[7] = (bytes[7] & 0x0F) | 0x40;
        bytes[8] = (bytes[8] & 0x3F) | 0x80;
        Ok(Guid(bytes))
    }

    /// Parses `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`, with or without surrounding braces, in
    /// either case. `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let inner = match text.strip_prefix('{') {
            Some(rest) => rest.strip_suffix('}')?,
            None => text,
        };
        let groups: Vec<&str> = inner.split('-').collect();
        let [d1, d2, d3, d4, d5] = groups.as_slice() else {
            return None;
        };
        if [d1.len(), d2.len(), d3.len(), d4.len(), d5.len()] != [8, 4, 4, 4, 12]
            || !inner.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
        {
            return None;
        }
        let d1 = u32::from_str_radix(d1, 16).ok()?;
        let d2 = u16::from_str_radix(d2, 16).ok()?;
        let d3 = u16::from_str_radix(d3, 16).ok()?;
        let mut d4_bytes = [0u8; 8];
        let tail = format!("{d4}{d5}");
        for (i, byte) in d4_bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&tail[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Guid::from_fields(d1, d2, d3, d4_bytes))
    }

    /// The form a parent locator's `parent_linkage` value takes: `{xxxxxxxx-...}`, lower case
    /// as Windows writes it.
    pub fn braced(&self) -> String {
        format!("{{{}}}", self.to_string().to_ascii_lowercase())
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.0;
        write!(
            f,
            "{:08X}-{:04X}-{:04X}-",
            u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
            u16::from_le_bytes([g[4], g[5]]),
            u16::from_le_bytes([g[6], g[7]]),
        )?;
        for (i, byte) in g[8..].iter().enumerate() {
            if i == 2 {
                f.write_str("-")?;
            }
            write!(f, "{byte:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip_in_both_forms() {
        let text = "B04AEFB7-D19E-4A81-B789-25B8E9445913";
        let g = Guid::parse(text).unwrap();
        assert_eq!(g.to_string(), text);
        assert_eq!(g.braced(), "{b04aefb7-d19e-4a81-b789-25b8e9445913}");
        assert_eq!(Guid::parse(&g.braced()), Some(g));
        assert_eq!(
            g,
            Guid::from_fields(
                0xB04A_EFB7,
                0xD19E,
                0x4A81,
                [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13]
            )
        );
        // Data1 is stored little-endian.
        assert_eq!(&g.as_bytes()[..4], &[0xB7, 0xEF, 0x4A, 0xB0]);
    }

    #[test]
    fn malformed_text_is_not_a_guid() {
        for bad in [
            "",
            "{}",
            "{B04AEFB7-D19E-4A81-B789-25B8E9445913",
            "B04AEFB7-D19E-4A81-B789-25B8E944591",
            "B04AEFB7-D19E-4A81-B789-25B8E94459133",
            "B04AEFB7D19E-4A81-B789-25B8E9445913-",
            "G04AEFB7-D19E-4A81-B789-25B8E9445913",
            "+04AEFB7-D19E-4A81-B789-25B8E9445913",
            "B04AEFB7-D19E-4A81-B789-25B8E94459é",
        ] {
            assert_eq!(Guid::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn random_guids_differ_and_are_version_4() {
        let a = Guid::random().unwrap();
        let b = Guid::random().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.to_string().as_bytes()[14], b'4');
    }
}
