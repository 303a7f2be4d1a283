//! Reading what `bcdedit` prints, in any display language.
//!
//! bcdedit translates its sentences and object headings ("The entry was successfully copied
//! to", "Windows Boot Manager", and on some languages the `identifier` label), but not the
//! element names such as `default`, and never the ids: `{8-4-4-4-12}` hex GUIDs in braces.
//! So the parsers here look for GUIDs, and for one untranslated element name where an id alone
//! cannot say what it is. The queries run with `/v`, which prints every id as its GUID rather
//! than a well-known alias such as `{current}`.

use std::collections::BTreeSet;
use std::fmt;

use super::BootError;

/// A boot entry's identifier: a GUID in braces, kept in lower case so that ids compare equal
/// however bcdedit or a file spelled them.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct EntryId(String);

impl EntryId {
    /// `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` in hex digits of either case; `None` for
    /// anything else, aliases such as `{current}` included.
    pub fn parse(text: &str) -> Option<EntryId> {
        let inner = text.strip_prefix('{')?.strip_suffix('}')?;
        is_guid(inner).then(|| EntryId(format!("{{{}}}", inner.to_ascii_lowercase())))
    }

    /// The id with its braces, as bcdedit takes it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for EntryId {
    type Error = String;

    fn try_from(text: String) -> Result<EntryId, String> {
        EntryId::parse(&text).ok_or_else(|| format!("{text:?} is not a boot entry id ({{GUID}})"))
    }
}

impl From<EntryId> for String {
    fn from(id: EntryId) -> String {
        id.0
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The boot manager's default as `bcdedit /enum {bootmgr}` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DefaultRef {
    /// By its GUID.
    Entry(EntryId),
    /// By a well-known alias such as `{current}`, which means another entry after the next
    /// boot and so must be resolved to its GUID before it is kept.
    Alias(String),
}

/// Every `{GUID}` in `output`, in order, repeats included.
pub fn guids_in(output: &str) -> Vec<EntryId> {
    let mut found = Vec::new();
    let mut rest = output;
    while let Some(open) = rest.find('{') {
        rest = &rest[open..];
        let Some(close) = rest.find('}') else { break };
        match EntryId::parse(&rest[..=close]) {
            Some(id) => {
                found.push(id);
                rest = &rest[close + 1..];
            }
            // Not a GUID: look again from the next character, which may open one.
            None => rest = &rest[1..],
        }
    }
    found
}

/// The entries in the store, from the output of `bcdedit /enum all /v`: every GUID it printed.
///
/// That is each entry's identifier plus the GUIDs that entries refer to (a display order, a
/// resume object); bcdedit removes references to an entry it deletes, so a GUID printed is
/// an entry that exists. An output without any GUID is an error, never "the store is empty":
/// a store always holds the boot manager, and treating an unreadable answer as empty would
/// make the agent forget entries it owns.
pub fn parse_store(output: &str) -> Result<BTreeSet<EntryId>, String> {
    let ids: BTreeSet<EntryId> = guids_in(output).into_iter().collect();
    if ids.is_empty() {
        return Err(format!(
            "`bcdedit /enum all /v` listed no entry: {:?}",
            output.trim().chars().take(200).collect::<String>()
        ));
    }
    Ok(ids)
}

/// The boot manager's default from the output of `bcdedit /enum {bootmgr} /v`: the value of
/// its `default` line (an element name, which bcdedit does not translate). `None` when the
/// boot manager has no default.
pub fn parse_default(output: &str) -> Option<DefaultRef> {
    output.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let name = words.next()?;
        let value = words.next()?;
        if !name.eq_ignore_ascii_case("default") {
            return None;
        }
        if let Some(id) = EntryId::parse(value) {
            return Some(DefaultRef::Entry(id));
        }
        // Only a plain `{word}` is passed on to bcdedit as an alias to resolve.
        let alias = value.strip_prefix('{')?.strip_suffix('}')?;
        (!alias.is_empty() && alias.chars().all(|c| c.is_ascii_alphanumeric()))
            .then(|| DefaultRef::Alias(value.to_ascii_lowercase()))
    })
}

/// The id of the entry that `bcdedit /enum {alias} /v` shows: its identifier, the first
/// GUID printed (the heading above it carries none).
pub fn parse_identifier(output: &str) -> Option<EntryId> {
    guids_in(output).into_iter().next()
}

/// The id of the entry that `bcdedit /copy` made, from its output.
///
/// English Windows prints `The entry was successfully copied to {GUID}.`, other languages
/// other sentences, so only the id is looked for: exactly one distinct GUID.
pub fn parse_copied_entry(output: &str) -> Result<EntryId, BootError> {
    let fail = |reason| BootError::NoEntryId {
        reason,
        output: output.trim().chars().take(200).collect(),
    };
    let ids: BTreeSet<EntryId> = guids_in(output).into_iter().collect();
    let mut ids = ids.into_iter();
    match (ids.next(), ids.next()) {
        (Some(id), None) => Ok(id),
        (None, _) => Err(fail("no GUID")),
        (Some(_), Some(_)) => Err(fail("more than one GUID")),
    }
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in hex digits of either case.
fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUID: &str = "{0cb3b571-2f2e-4343-a879-d86a476d7215}";
    const OTHER: &str = "{1cb3b571-2f2e-4343-a879-d86a476d7215}";

    #[test]
    fn entry_ids_are_braced_guids_in_lower_case() {
        assert_eq!(EntryId::parse(&GUID.to_uppercase()).unwrap().as_str(), GUID);
        for bad in [
            "{current}",
            "0cb3b571-2f2e-4343-a879-d86a476d7215",
            "{0cb3b571-2f2e-4343-a879-d86a476d721}",
            "{0cb3b571-2f2e-4343-a879-d86a476d721g}",
            "{0cb3b571-2f2e-4343-a879d86a476d7215}",
            "",
        ] {
            assert!(EntryId::parse(bad).is_none(), "{bad:?}");
        }
        let json = serde_json::to_string(&EntryId::parse(GUID).unwrap()).unwrap();
        assert_eq!(json, format!("\"{GUID}\""));
        assert!(serde_json::from_str::<EntryId>("\"{current}\"").is_err());
    }

    #[test]
    fn copied_entry_ids_are_found_in_any_wording() {
        for output in [
            format!("The entry was successfully copied to {GUID}.\r\n"),
            format!("Der Eintrag wurde erfolgreich in {GUID} kopiert.\r\n"),
            format!("L'entrée a été copiée vers {}.", GUID.to_uppercase()),
            format!("  \r\n{GUID}\r\n"),
            format!("{{current}} -> {GUID}. Done: {GUID}"),
            format!("{{{GUID}}}"),
        ] {
            assert_eq!(
                parse_copied_entry(&output).unwrap().as_str(),
                GUID,
                "{output:?}"
            );
        }
    }

    #[test]
    fn outputs_without_one_entry_id_are_errors() {
        for output in [
            "",
            "The boot configuration data store could not be opened.\r\nAccess is denied.",
            "copied to {current}.",
            "copied to {0cb3b571-2f2e-4343-a879-d86a476d721}.",
            "copied to {0cb3b571-2f2e-4343-a879-d86a476d72155}.",
            "copied to {0cb3b571-2f2e-4343-a879d86a476d7215}.",
            "copied to {0cb3b571-2f2e-4343-a879-d86a476d721g}.",
            "copied to {0cb3b571-2f2e-4343-a879-d86a476d7215",
            "copied to {0cb3b571-2f2e-4343-a879-d86a476d7215} and {1cb3b571-2f2e-4343-a879-d86a476d7215}",
        ] {
            let e = parse_copied_entry(output).unwrap_err();
            assert!(matches!(e, BootError::NoEntryId { .. }), "{output:?}: {e}");
        }
    }

    /// The shape `bcdedit /enum {bootmgr} /v` prints, with a heading and a label translated
    /// as German Windows does.
    fn bootmgr(default_line: &str) -> String {
        format!(
            "\r\nWindows-Start-Manager\r\n---------------------\r\n\
             Bezeichner              {{9dea862c-5cdd-4e70-acc1-f32b344d4795}}\r\n\
             device                  partition=\\Device\\HarddiskVolume1\r\n\
             description             Windows Boot Manager\r\n\
             locale                  de-DE\r\n\
             {default_line}\
             resumeobject            {OTHER}\r\n\
             displayorder            {OTHER}\r\n\
                                     {GUID}\r\n\
             toolsdisplayorder       {{b2721d73-1db4-4c62-bf78-c548a880142d}}\r\n\
             timeout                 30\r\n"
        )
    }

    #[test]
    fn the_default_is_read_from_its_line_in_any_language() {
        let output = bootmgr(&format!(
            "default                 {}\r\n",
            GUID.to_uppercase()
        ));
        assert_eq!(
            parse_default(&output),
            Some(DefaultRef::Entry(EntryId::parse(GUID).unwrap()))
        );
        let output = bootmgr("Default                 {current}\r\n");
        assert_eq!(
            parse_default(&output),
            Some(DefaultRef::Alias("{current}".into()))
        );
        assert_eq!(parse_default(&bootmgr("")), None);
        // Neither something that only mentions the word, nor an odd alias, is a default.
        assert_eq!(parse_default("defaults {current}\r\n"), None);
        assert_eq!(parse_default("default {cur rent}\r\n"), None);
        assert_eq!(parse_default("default {a;b}\r\n"), None);
        assert_eq!(parse_default("default\r\n"), None);
    }

    #[test]
    fn the_store_is_every_guid_listed() {
        let store = parse_store(&bootmgr("")).unwrap();
        assert!(store.contains(&EntryId::parse(GUID).unwrap()));
        assert!(store.contains(&EntryId::parse(OTHER).unwrap()));
        assert_eq!(store.len(), 4);
        let e = parse_store("Access is denied.").unwrap_err();
        assert!(e.contains("Access is denied."), "{e}");
    }

    #[test]
    fn an_aliased_entry_is_named_by_its_first_guid() {
        let output = format!(
            "Windows-Startladeprogramm\r\n-------------------------\r\n\
             Bezeichner              {GUID}\r\n\
             resumeobject            {OTHER}\r\n"
        );
        assert_eq!(parse_identifier(&output).unwrap().as_str(), GUID);
        assert_eq!(parse_identifier("{current}"), None);
    }
}
