//! The boot entries the agent made, kept in `boot-entries.json` in the
//! agent's data dir (the machine's store, which every image it boots finds again).
//!
//! The record is what makes an entry ours: the `windows` backend changes or deletes only the
//! entries named here (and sets the boot manager's default back to the one it replaced). It
//! is rewritten atomically (`swarm::storage::write_durably`: a temporary file, synced, then
//! renamed over the old one), so a power cut leaves the old record or the new one. A record that cannot be read is logged,
//! moved aside for the operator and treated as empty: the agent then owns nothing and touches
//! nothing but what it makes afresh, which is safe, where guessing would not be.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::bcd::EntryId;

/// One entry the agent made.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnedEntry {
    /// Its id in the BCD store.
    pub entry: EntryId,
    /// The file it was last pointed at.
    pub path: PathBuf,
    /// The boot manager's default before one of our entries became the default, to set back
    /// when that entry goes. Never one of our own entries: an entry of ours that takes over
    /// from another of ours inherits that one's previous default.
    pub previous_default: Option<EntryId>,
}

/// The entries the agent made, by image id.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Image id to its entry: one entry per image.
    pub images: BTreeMap<String, OwnedEntry>,
}

impl Record {
    /// The image whose entry `id` is, if it is ours.
    pub fn owner(&self, id: &EntryId) -> Option<(&str, &OwnedEntry)> {
        self.images
            .iter()
            .find(|(_, owned)| owned.entry == *id)
            .map(|(image, owned)| (image.as_str(), owned))
    }
}

/// A record as loaded, with what went wrong reading it.
#[derive(Debug)]
pub struct Loaded {
    /// The record; empty when the file is missing or unreadable.
    pub record: Record,
    /// Why the file could not be used, for the report; `None` when it was read or is missing.
    pub problem: Option<String>,
}

/// Where the record lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordFile {
    path: PathBuf,
}

impl RecordFile {
    /// The record's file name in the data dir.
    pub const FILE_NAME: &str = "boot-entries.json";

    /// The record in `data_dir`.
    pub fn in_dir(data_dir: &Path) -> RecordFile {
        RecordFile {
            path: data_dir.join(Self::FILE_NAME),
        }
    }

    /// The file.
    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the record. Never fails: a missing file is an empty record; an unreadable or
    /// corrupt one is logged, renamed to `boot-entries.json.corrupt` when it could be read
    /// but not parsed (so that the next save does not destroy what an operator may want to
    /// look at), and treated as empty.
    pub fn load(&self) -> Loaded {
        let problem = match std::fs::read(&self.path) {
            Ok(bytes) => match serde_json::from_slice::<Record>(&bytes) {
                Ok(record) => {
                    return Loaded {
                        record,
                        problem: None,
                    };
                }
                Err(e) => {
                    let aside = self.path.with_extension("json.corrupt");
                    let moved = match std::fs::rename(&self.path, &aside) {
                        Ok(()) => format!("moved to {}", aside.display()),
                        Err(e) => format!("could not be moved aside: {e}"),
                    };
                    format!(
                        "the record of our boot entries {} is corrupt ({e}; {moved}); treating it as empty, so entries it named are no longer ours and stay as they are",
                        self.path.display()
                    )
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Loaded {
                    record: Record::default(),
                    problem: None,
                };
            }
            Err(e) => format!(
                "reading the record of our boot entries {} failed ({e}); treating it as empty, so entries it named are left as they are",
                self.path.display()
            ),
        };
        tracing::error!("{problem}");
        Loaded {
            record: Record::default(),
            problem: Some(problem),
        }
    }

    /// Writes the record atomically, as the agent writes all its small state files. The
    /// error says which file and why.
    pub fn save(&self, record: &Record) -> Result<(), String> {
        let result = serde_json::to_vec_pretty(record)
            .map_err(std::io::Error::other)
            .and_then(|bytes| boottorrent_swarm::storage::write_durably(&self.path, &bytes));
        result.map_err(|e| {
            format!(
                "saving the record of our boot entries {} failed: {e}",
                self.path.display()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> EntryId {
        EntryId::parse(&format!("{{{n:08x}-0000-4000-8000-000000000000}}")).unwrap()
    }

    fn sample() -> Record {
        let mut record = Record::default();
        record.images.insert(
            "img-1".into(),
            OwnedEntry {
                entry: id(1),
                path: r"D:\BootTorrent\images\a.vhdx".into(),
                previous_default: Some(id(9)),
            },
        );
        record.images.insert(
            "img-2".into(),
            OwnedEntry {
                entry: id(2),
                path: r"D:\BootTorrent\images\b.vhdx".into(),
                previous_default: None,
            },
        );
        record
    }

    #[test]
    fn a_saved_record_loads_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = RecordFile::in_dir(dir.path());
        let loaded = file.load();
        assert_eq!(loaded.record, Record::default());
        assert_eq!(loaded.problem, None);
        file.save(&sample()).unwrap();
        let loaded = file.load();
        assert_eq!(loaded.record, sample());
        assert_eq!(loaded.problem, None);
        assert_eq!(loaded.record.owner(&id(2)).unwrap().0, "img-2");
        assert!(loaded.record.owner(&id(9)).is_none());
        assert!(!dir.path().join("boot-entries.json.tmp").exists());
    }

    #[test]
    fn a_corrupt_record_is_empty_moved_aside_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let file = RecordFile::in_dir(dir.path());
        for bad in [
            &b"{\"images\": {\"img-1\": "[..],
            b"\xff\xfe garbage",
            br#"{"images": {"img-1": {"entry": "{current}", "path": "x", "previous_default": null}}}"#,
            br#"{"images": {}, "extra": 1}"#,
        ] {
            std::fs::write(file.path(), bad).unwrap();
            let loaded = file.load();
            assert_eq!(loaded.record, Record::default());
            let problem = loaded.problem.unwrap();
            assert!(problem.contains("corrupt"), "{problem}");
            assert!(problem.contains("treating it as empty"), "{problem}");
            let aside = dir.path().join("boot-entries.json.corrupt");
            assert_eq!(std::fs::read(&aside).unwrap(), bad);
            assert!(!file.path().exists());
        }
    }

    #[test]
    fn an_unwritable_record_says_where() {
        let dir = tempfile::tempdir().unwrap();
        // A data dir that is a file cannot hold the record.
        let not_a_dir = dir.path().join("data");
        std::fs::write(&not_a_dir, b"").unwrap();
        let file = RecordFile::in_dir(&not_a_dir);
        let e = file.save(&sample()).unwrap_err();
        assert!(e.contains("boot-entries.json"), "{e}");
    }
}
