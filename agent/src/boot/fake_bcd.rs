//! An in-memory model of a BCD store that answers `bcdedit` steps, for unit tests of the
//! `windows` backend's plans and runner.
//!
//! It models what the plans rely on, as bcdedit's documentation describes it: `/copy` prints
//! the new id, `/delete` also removes the entry from the display order and the one-time boot
//! sequence, `/enum ... /v` prints ids as GUIDs, an unknown id is an error. It tests our
//! plan logic; it is not a claim about how Windows behaves. Where the documentation leaves
//! it open (which entry boots once the default is deleted) the model has no default, the
//! case in which the plans must not assume anything.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::bcd::EntryId;
use super::windows::{Bcdedit, Step};

/// The boot manager's own id.
pub const BOOTMGR: &str = "{9dea862c-5cdd-4e70-acc1-f32b344d4795}";

/// One OS loader entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub description: String,
    pub device: String,
    pub osdevice: String,
    pub detecthal: bool,
}

/// The store and the machine around it.
#[derive(Clone, Debug)]
pub struct FakeBcd {
    pub entries: BTreeMap<EntryId, Entry>,
    /// The entry the machine is running.
    pub current: EntryId,
    pub default: Option<EntryId>,
    pub bootsequence: Option<EntryId>,
    pub display_order: Vec<EntryId>,
    /// Whether `shutdown /r` ran.
    pub rebooted: bool,
    /// Every step received, as a command line.
    pub log: Vec<String>,
    /// A step whose command line contains one of these fails, as bcdedit fails.
    pub fail_on: Vec<String>,
    /// Prints the default as `{current}` when it is the running entry, as bcdedit does
    /// without `/v`.
    pub alias_default: bool,
    next: u32,
}

impl FakeBcd {
    /// A machine running its only entry, which is the default.
    pub fn new() -> FakeBcd {
        let mut bcd = FakeBcd {
            entries: BTreeMap::new(),
            current: EntryId::parse(BOOTMGR).unwrap(),
            default: None,
            bootsequence: None,
            display_order: Vec::new(),
            rebooted: false,
            log: Vec::new(),
            fail_on: Vec::new(),
            alias_default: false,
            next: 0,
        };
        let windows = bcd.add("Windows 11", r"partition=C:");
        bcd.current = windows.clone();
        bcd.default = Some(windows);
        bcd
    }

    /// Adds an entry as another tool would.
    pub fn add(&mut self, description: &str, device: &str) -> EntryId {
        self.next += 1;
        let id = EntryId::parse(&format!(
            "{{{:08x}-1111-4222-8333-{:012x}}}",
            self.next, self.next
        ))
        .unwrap();
        self.entries.insert(
            id.clone(),
            Entry {
                description: description.into(),
                device: device.into(),
                osdevice: device.into(),
                detecthal: false,
            },
        );
        self.display_order.push(id.clone());
        id
    }

    /// The entry `text` names: a GUID or one of the aliases bcdedit knows.
    fn resolve(&self, text: &str) -> Result<EntryId, String> {
        let id = match text {
            "{current}" => Some(self.current.clone()),
            "{default}" => self.default.clone(),
            _ => EntryId::parse(text),
        };
        id.filter(|id| self.entries.contains_key(id))
            .ok_or_else(|| {
                format!(
                    "The specified entry identifier {text} is invalid. The parameter is incorrect."
                )
            })
    }

    /// Answers one step as the program would: its output, or why it failed.
    pub fn answer(&mut self, step: &Step) -> Result<String, String> {
        let line = step.to_string();
        self.log.push(line.clone());
        if self.fail_on.iter().any(|f| line.contains(f.as_str())) {
            return Err(format!(
                "`{line}` failed (exit code: 1): The request is not supported."
            ));
        }
        if step.program == "shutdown" {
            self.rebooted = true;
            return Ok(String::new());
        }
        assert_eq!(step.program, "bcdedit", "{line}");
        let args: Vec<&str> = step.args.iter().map(String::as_str).collect();
        let done = "The operation completed successfully.".to_owned();
        match args[..] {
            ["/enum", "all", "/v"] => Ok(self.enum_all()),
            ["/enum", "{bootmgr}", "/v"] => Ok(self.enum_bootmgr()),
            ["/enum", which, "/v"] => {
                let id = self.resolve(which)?;
                Ok(self.enum_entry(&id))
            }
            ["/copy", source, "/d", description] => {
                let mut entry = self.entries[&self.resolve(source)?].clone();
                entry.description = description.to_owned();
                let id = self.add(description, &entry.device);
                self.entries.insert(id.clone(), entry);
                Ok(format!("The entry was successfully copied to {id}."))
            }
            ["/set", id, element, value] => {
                let id = self.resolve(id)?;
                let entry = self.entries.get_mut(&id).unwrap();
                match element {
                    "description" => entry.description = value.into(),
                    "device" => entry.device = value.into(),
                    "osdevice" => entry.osdevice = value.into(),
                    "detecthal" if value == "on" => entry.detecthal = true,
                    _ => return Err(format!("the model does not know `{line}`")),
                }
                Ok(done)
            }
            ["/delete", id] => {
                let id = self.resolve(id)?;
                self.entries.remove(&id);
                self.display_order.retain(|d| *d != id);
                if self.bootsequence.as_ref() == Some(&id) {
                    self.bootsequence = None;
                }
                if self.default.as_ref() == Some(&id) {
                    self.default = None;
                }
                Ok(done)
            }
            ["/default", id] => {
                self.default = Some(self.resolve(id)?);
                Ok(done)
            }
            ["/bootsequence", id] => {
                self.bootsequence = Some(self.resolve(id)?);
                Ok(done)
            }
            _ => Err(format!("the model does not know `{line}`")),
        }
    }

    fn enum_bootmgr(&self) -> String {
        let mut out = String::from("\r\nWindows Boot Manager\r\n--------------------\r\n");
        let _ = write!(out, "identifier              {BOOTMGR}\r\n");
        out.push_str("device                  partition=\\Device\\HarddiskVolume1\r\n");
        out.push_str("description             Windows Boot Manager\r\n");
        if let Some(default) = &self.default {
            if self.alias_default && *default == self.current {
                out.push_str("default                 {current}\r\n");
            } else {
                let _ = write!(out, "default                 {default}\r\n");
            }
        }
        for (i, id) in self.display_order.iter().enumerate() {
            let name = if i == 0 { "displayorder" } else { "" };
            let _ = write!(out, "{name:24}{id}\r\n");
        }
        if let Some(once) = &self.bootsequence {
            let _ = write!(out, "bootsequence            {once}\r\n");
        }
        out.push_str("toolsdisplayorder       {b2721d73-1db4-4c62-bf78-c548a880142d}\r\n");
        out.push_str("timeout                 30\r\n");
        out
    }

    fn enum_entry(&self, id: &EntryId) -> String {
        let entry = &self.entries[id];
        let mut out = String::from("\r\nWindows Boot Loader\r\n-------------------\r\n");
        let _ = write!(out, "identifier              {id}\r\n");
        let _ = write!(out, "device                  {}\r\n", entry.device);
        out.push_str("path                    \\Windows\\system32\\winload.efi\r\n");
        let _ = write!(out, "description             {}\r\n", entry.description);
        let _ = write!(out, "osdevice                {}\r\n", entry.osdevice);
        if entry.detecthal {
            out.push_str("detecthal               Yes\r\n");
        }
        out
    }

    fn enum_all(&self) -> String {
        let mut out = self.enum_bootmgr();
        for id in self.entries.keys() {
            out.push_str(&self.enum_entry(id));
        }
        out
    }
}

impl Bcdedit for FakeBcd {
    fn run(&mut self, step: &Step) -> impl Future<Output = Result<String, String>> + Send {
        std::future::ready(self.answer(step))
    }
}
