//! The `windows` backend: native VHD boot entries, made and owned with `bcdedit`.
//!
//! Every operation has three parts. Read-only queries (`bcdedit /enum all /v`, `bcdedit /enum
//! {bootmgr} /v`) say which entries exist and which is the default ([`Survey`]). A pure plan
//! ([`plan_boot`], [`plan_remove`]) turns the survey and the record of our entries
//! ([`Record`]) into steps, which are data, and into what the record becomes. The runner
//! ([`apply_steps`]) runs the steps through a function that runs one program, so that the whole
//! flow runs in unit tests against an in-memory model of the store (`fake_bcd`).
//!
//! What the plans hold to:
//! - one entry per image: an image whose entry we made and which still exists has that entry
//!   re-pointed (`/set {id} device`, `osdevice`); one whose entry is gone gets a new copy;
//! - an entry is recorded as ours the moment `bcdedit /copy` printed its id, before the steps
//!   that configure it, so that a crash in between cannot leave an entry nobody owns;
//! - no step changes or deletes an entry the record does not name; the only other ids a step
//!   names are `{current}` (copied, not changed) and the default that ours replaced (made the
//!   default again when ours goes);
//! - `set-boot` keeps the default it replaces, unless that default is one of ours, whose own
//!   kept default is inherited instead: removing our entries in any order ends on the default
//!   the machine had before the agent.
//!
//! Operations are serialised by one lock: two images finishing at once must not interleave
//! their `bcdedit` steps, nor their reads and writes of the record.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};

use boottorrent_proto::AfterDownload;

use super::bcd::{self, DefaultRef, EntryId};
use super::entries::{OwnedEntry, Record, RecordFile};
use super::process::{Exit, run_process};
use super::{
    BootError, BootOutcome, BootRequest, OUTPUT_TAIL, WINDOWS_STEP_TIME_LIMIT, action_name,
};

/// Stands for the new boot entry's id in planned steps, before `bcdedit /copy` has made it.
pub const NEW_ENTRY: &str = "{new-entry}";

/// Seconds between `shutdown /r` and the reboot, so the `boot` event can leave first.
const REBOOT_DELAY_SECS: u32 = 5;

/// The longest boot entry description we write; the boot menu has one line per entry.
const MAX_DESCRIPTION_CHARS: usize = 64;

/// How much output a query may print, in bytes. Its answer is parsed whole, so a longer one
/// is an error rather than a cut answer: a store listed in part would make entries we own
/// look gone. A store with dozens of entries prints tens of KiB.
const QUERY_OUTPUT_LIMIT: usize = 1 << 20;

/// Serialises the `windows` backend's operations (see the module header).
static BCD_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One program invocation of the `windows` backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// `bcdedit` or `shutdown`, found in `PATH` (both live in `System32`).
    pub program: String,
    /// Its arguments, one per element; no shell quoting is involved.
    pub args: Vec<String>,
}

impl Step {
    fn new(program: &str, args: &[&str]) -> Step {
        Step {
            program: program.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    fn bcdedit(args: &[&str]) -> Step {
        Step::new("bcdedit", args)
    }

    /// This step with [`NEW_ENTRY`] replaced by the entry's real id.
    fn for_entry(&self, entry: &EntryId) -> Step {
        Step {
            program: self.program.clone(),
            args: self
                .args
                .iter()
                .map(|a| {
                    if a == NEW_ENTRY {
                        entry.to_string()
                    } else {
                        a.clone()
                    }
                })
                .collect(),
        }
    }

    fn is_copy(&self) -> bool {
        self.program == "bcdedit" && self.args.first().is_some_and(|a| a == "/copy")
    }

    /// A read-only `bcdedit /enum`, whose output is parsed whole.
    pub fn is_query(&self) -> bool {
        self.program == "bcdedit" && self.args.first().is_some_and(|a| a == "/enum")
    }
}

/// Shown as a command line, arguments with spaces in double quotes, for reports.
impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.program)?;
        for arg in &self.args {
            if arg.contains(' ') {
                write!(f, " \"{arg}\"")?;
            } else {
                write!(f, " {arg}")?;
            }
        }
        Ok(())
    }
}

/// Runs one step: the real programs on Windows, a model of the store in tests.
pub trait Bcdedit {
    /// The step's output, or why it failed (naming the step and keeping its output).
    fn run(&mut self, step: &Step) -> impl Future<Output = Result<String, String>> + Send;
}

/// The real `bcdedit` and `shutdown`, as processes.
struct Processes;

impl Bcdedit for Processes {
    fn run(&mut self, step: &Step) -> impl Future<Output = Result<String, String>> + Send {
        exec_step(step)
    }
}

/// What the queries found in the BCD store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Survey {
    /// The entries that exist (see [`bcd::parse_store`]).
    pub existing: BTreeSet<EntryId>,
    /// The boot manager's default, by its GUID; `None` when it has none.
    pub default: Option<EntryId>,
}

/// Runs the queries and reads their answers. An error names the query and why; nothing has
/// been changed then.
///
/// `ours` is the entry the operation is about, if the record names one. A GUID in the store's
/// listing may be a reference left behind by a tool that deleted the entry without cleaning
/// up (`bcdedit /delete /nocleanup`); re-pointing such an entry would fail at every
/// deployment. So that entry is also shown on its own: it exists only when `/enum {id}`
/// shows it. A failure of that query counts as "gone": at worst the entry is copied anew and
/// the old one, no longer recorded, is left alone.
pub async fn survey(bcdedit: &mut impl Bcdedit, ours: Option<&EntryId>) -> Result<Survey, String> {
    let all = bcdedit.run(&Step::bcdedit(&["/enum", "all", "/v"])).await?;
    let mut existing = bcd::parse_store(&all)?;
    if let Some(id) = ours.filter(|id| existing.contains(*id)) {
        let shown = bcdedit
            .run(&Step::bcdedit(&["/enum", id.as_str(), "/v"]))
            .await;
        if shown
            .ok()
            .and_then(|out| bcd::parse_identifier(&out))
            .as_ref()
            != Some(id)
        {
            existing.remove(id);
        }
    }
    let bootmgr = bcdedit
        .run(&Step::bcdedit(&["/enum", "{bootmgr}", "/v"]))
        .await?;
    let default = match bcd::parse_default(&bootmgr) {
        None => None,
        Some(DefaultRef::Entry(id)) => Some(id),
        // `/v` prints GUIDs, but an alias kept as "the previous default" would name another
        // entry once the machine boots something else: resolve it now.
        Some(DefaultRef::Alias(alias)) => {
            let step = Step::bcdedit(&["/enum", &alias, "/v"]);
            let shown = bcdedit.run(&step).await?;
            Some(bcd::parse_identifier(&shown).ok_or_else(|| {
                format!(
                    "`{step}` showed no entry id: {:?}",
                    shown.trim().chars().take(200).collect::<String>()
                )
            })?)
        }
    };
    Ok(Survey { existing, default })
}

/// Steps and what the record becomes when they have run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The steps, in order; [`NEW_ENTRY`] stands for the id `/copy` prints.
    pub steps: Vec<Step>,
    /// The record once the steps ran, saved before the first step (a removal's is saved after
    /// its steps: until the entry is deleted it is still ours). Without the entry `/copy` makes.
    pub record: Record,
    /// The entry that `/copy` makes, to record under the image once its id is known.
    pub new_entry: Option<NewEntry>,
    /// What the plan decided that the report should say.
    pub notes: Vec<String>,
}

/// An entry to record once `bcdedit /copy` has printed its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEntry {
    /// The name it is recorded under ([`BootRequest::entry`]).
    pub key: String,
    /// The file it boots.
    pub path: PathBuf,
    /// See [`OwnedEntry::previous_default`].
    pub previous_default: Option<EntryId>,
}

impl NewEntry {
    fn with_id(&self, entry: EntryId) -> OwnedEntry {
        OwnedEntry {
            entry,
            path: self.path.clone(),
            previous_default: self.previous_default.clone(),
        }
    }
}

/// `record` without entries that no longer exist, and a note for each one forgotten.
fn forget_gone(record: &Record, survey: &Survey, notes: &mut Vec<String>) -> Record {
    let mut kept = record.clone();
    kept.images.retain(|image, owned| {
        let exists = survey.existing.contains(&owned.entry);
        if !exists {
            notes.push(format!(
                "our boot entry {} for {image} no longer exists; forgotten",
                owned.entry
            ));
        }
        exists
    });
    kept
}

/// The steps that make `image_path` bootable as `action` asks, and the record after them.
///
/// The image's own entry is re-pointed when it exists; otherwise `{current}` is copied and
/// the copy, [`NEW_ENTRY`] in the steps, configured. `set-boot` makes it the default, keeping
/// the default it replaces (see the module header); `reboot` boots it once and restarts.
/// `stage` needs no steps. The path must be absolute on a lettered volume
/// (`D:\images\x.vhdx`, also `D:/...` or `\\?\D:\...`): native VHD boot cannot use network
/// paths.
pub fn plan_boot(
    record: &Record,
    survey: &Survey,
    req: &BootRequest,
    image_path: &Path,
) -> Result<Plan, BootError> {
    let mut notes = Vec::new();
    let mut record = forget_gone(record, survey, &mut notes);
    if req.action == AfterDownload::Stage {
        return Ok(Plan {
            steps: Vec::new(),
            record,
            new_entry: None,
            notes,
        });
    }
    let device = vhd_device(image_path)?;
    let name = entry_name(&req.image_name);
    let description = format!("BootTorrent: {name}");
    let owned = record.images.get(&req.entry).cloned();
    let target = owned
        .as_ref()
        .map_or(NEW_ENTRY.to_owned(), |o| o.entry.to_string());
    let mut steps = Vec::new();
    if owned.is_none() {
        steps.push(Step::bcdedit(&["/copy", "{current}", "/d", &description]));
    } else {
        steps.push(Step::bcdedit(&[
            "/set",
            &target,
            "description",
            &description,
        ]));
    }
    steps.push(Step::bcdedit(&["/set", &target, "device", &device]));
    steps.push(Step::bcdedit(&["/set", &target, "osdevice", &device]));
    if owned.is_none() {
        // Microsoft's VHD boot recipe sets it: the image may have been built on other hardware.
        steps.push(Step::bcdedit(&["/set", &target, "detecthal", "on"]));
    }
    let mut previous_default = owned.as_ref().and_then(|o| o.previous_default.clone());
    match req.action {
        AfterDownload::Stage => {}
        AfterDownload::SetBoot => {
            previous_default = match &survey.default {
                None => None,
                Some(current) if owned.as_ref().is_some_and(|o| o.entry == *current) => {
                    previous_default
                }
                Some(current) => match record.owner(current) {
                    Some((_, other)) => other.previous_default.clone(),
                    None => Some(current.clone()),
                },
            };
            steps.push(Step::bcdedit(&["/default", &target]));
        }
        AfterDownload::Reboot => {
            steps.push(Step::bcdedit(&["/bootsequence", &target]));
            let delay = REBOOT_DELAY_SECS.to_string();
            let comment = format!("BootTorrent: rebooting into {name}");
            steps.push(Step::new("shutdown", &["/r", "/t", &delay, "/c", &comment]));
        }
    }
    let new_entry = match owned {
        Some(owned) => {
            record.images.insert(
                req.entry.clone(),
                OwnedEntry {
                    entry: owned.entry,
                    path: image_path.to_owned(),
                    previous_default,
                },
            );
            None
        }
        None => Some(NewEntry {
            key: req.entry.clone(),
            path: image_path.to_owned(),
            previous_default,
        }),
    };
    Ok(Plan {
        steps,
        record,
        new_entry,
        notes,
    })
}

/// The steps that remove the entry of `image_id`, and the record after them.
///
/// Only an entry the record names and that still exists is deleted. When it is the boot
/// manager's default, the default it replaced is made the default again if that still
/// exists; otherwise the boot manager picks the entry for the next start by itself, and the
/// notes say so.
pub fn plan_remove(record: &Record, survey: &Survey, image_id: &str) -> Plan {
    let mut notes = Vec::new();
    let owned = record.images.get(image_id).cloned();
    let mut record = forget_gone(record, survey, &mut notes);
    let mut steps = Vec::new();
    if let Some(owned) = owned.filter(|o| survey.existing.contains(&o.entry)) {
        record.images.remove(image_id);
        steps.push(Step::bcdedit(&["/delete", owned.entry.as_str()]));
        if survey.default.as_ref() == Some(&owned.entry) {
            let previous = owned
                .previous_default
                .as_ref()
                .filter(|p| **p != owned.entry && survey.existing.contains(p));
            match (previous, &owned.previous_default) {
                (Some(previous), _) => {
                    steps.push(Step::bcdedit(&["/default", previous.as_str()]));
                }
                (None, Some(gone)) => notes.push(format!(
                    "our entry {} was the default and the one it replaced, {gone}, no longer exists; the boot manager picks the next start's entry",
                    owned.entry
                )),
                (None, None) => notes.push(format!(
                    "our entry {} was the default and replaced none; the boot manager picks the next start's entry",
                    owned.entry
                )),
            }
        }
    }
    Plan {
        steps,
        record,
        new_entry: None,
        notes,
    }
}

/// What became of the entry that a `/copy` step made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Copied {
    /// No step copied an entry.
    Nothing,
    /// The entry exists (all went well, or removing it after a failure failed too).
    Kept(EntryId),
    /// A later step failed and the entry was deleted again.
    Removed(EntryId),
}

/// Runs the steps in order.
///
/// The copy's id replaces [`NEW_ENTRY`] in the later steps, and is handed to `copied` at once
/// (which records it; if that fails, the copy is deleted again: an entry we cannot record is
/// one we could never find again). If a `bcdedit` step fails after the copy, the new entry is
/// deleted again, so that a failure leaves the boot menu as it was. A failing `shutdown`
/// leaves the entry in place: the boot target is set and the next restart uses it.
pub async fn apply_steps(
    steps: &[Step],
    bcdedit: &mut impl Bcdedit,
    mut copied: impl FnMut(&EntryId) -> Result<(), String>,
) -> (BootOutcome, Copied) {
    let mut entry: Option<EntryId> = None;
    let mut done = Vec::new();
    for planned in steps {
        let step = match &entry {
            Some(id) => planned.for_entry(id),
            None => planned.clone(),
        };
        let result = match bcdedit.run(&step).await {
            Ok(output) if step.is_copy() => match bcd::parse_copied_entry(&output) {
                Ok(id) => {
                    entry = Some(id.clone());
                    copied(&id)
                }
                Err(e) => return (BootOutcome::failed(e.to_string()), Copied::Nothing),
            },
            Ok(_) => Ok(()),
            Err(why) => Err(why),
        };
        match result {
            Ok(()) => done.push(step.to_string()),
            Err(mut message) => {
                let mut fate = entry.clone().map_or(Copied::Nothing, Copied::Kept);
                if let Some(id) = entry.as_ref().filter(|_| step.program == "bcdedit") {
                    let delete = Step::bcdedit(&["/delete", id.as_str()]);
                    match bcdedit.run(&delete).await {
                        Ok(_) => {
                            message.push_str(&format!("; removed the new boot entry {id} again"));
                            fate = Copied::Removed(id.clone());
                        }
                        Err(e) => message.push_str(&format!(
                            "; removing the new boot entry {id} failed too: {e}"
                        )),
                    }
                } else if step.program == "shutdown" {
                    message.push_str("; the boot entry is set and the next restart uses it");
                }
                return (BootOutcome::failed(message), fate);
            }
        }
    }
    let fate = entry.map_or(Copied::Nothing, Copied::Kept);
    (BootOutcome::ok(format!("ran: {}", done.join("; "))), fate)
}

/// `message` with the notes in front, for a report.
fn noted(notes: &[String], mut outcome: BootOutcome) -> BootOutcome {
    if !notes.is_empty() {
        outcome.message = format!("{}; {}", notes.join("; "), outcome.message);
    }
    outcome
}

/// Makes the image bootable as `req.action` asks: the queries, the plan, the record, the
/// steps.
pub async fn boot_with(
    req: &BootRequest,
    image_path: &Path,
    file: &RecordFile,
    bcdedit: &mut impl Bcdedit,
) -> BootOutcome {
    if req.action == AfterDownload::Stage {
        return BootOutcome::ok(format!(
            "staged only: {} stays at {} (action {}, boot entries unchanged)",
            req.image_name,
            image_path.display(),
            action_name(req.action)
        ));
    }
    // A path that cannot be booted fails before anything runs.
    if let Err(e) = vhd_device(image_path) {
        return BootOutcome::failed(e.to_string());
    }
    let loaded = file.load();
    let mut notes: Vec<String> = loaded.problem.into_iter().collect();
    let ours = loaded.record.images.get(&req.entry).map(|o| &o.entry);
    let survey = match survey(bcdedit, ours).await {
        Ok(survey) => survey,
        Err(e) => {
            return noted(
                &notes,
                BootOutcome::failed(format!(
                    "reading the boot configuration failed: {e}; boot entries unchanged"
                )),
            );
        }
    };
    let plan = match plan_boot(&loaded.record, &survey, req, image_path) {
        Ok(plan) => plan,
        Err(e) => return noted(&notes, BootOutcome::failed(e.to_string())),
    };
    notes.extend(plan.notes);
    // Saved first: a kept default must be on disk before ours replaces it.
    if plan.record != loaded.record
        && let Err(e) = file.save(&plan.record)
    {
        return noted(
            &notes,
            BootOutcome::failed(format!("{e}; boot entries unchanged")),
        );
    }
    let mut record = plan.record;
    let new_entry = plan.new_entry;
    let (outcome, fate) = apply_steps(&plan.steps, bcdedit, |id| {
        let Some(new) = &new_entry else {
            return Err(format!("{id} was copied, which no plan asks for"));
        };
        record
            .images
            .insert(new.key.clone(), new.with_id(id.clone()));
        file.save(&record)
    })
    .await;
    if let Copied::Removed(id) = fate
        && record.images.get(&req.entry).is_some_and(|o| o.entry == id)
    {
        record.images.remove(&req.entry);
        if let Err(e) = file.save(&record) {
            notes.push(format!(
                "{e}; the record names {id}, which is gone, and the next run forgets it"
            ));
        }
    }
    noted(&notes, outcome)
}

/// Removes the entry we made for `image_id`.
pub async fn remove_with(
    image_id: &str,
    file: &RecordFile,
    bcdedit: &mut impl Bcdedit,
) -> BootOutcome {
    let loaded = file.load();
    let mut notes: Vec<String> = loaded.problem.into_iter().collect();
    if !loaded.record.images.contains_key(image_id) {
        return noted(
            &notes,
            BootOutcome::ok(format!(
                "no boot entry of ours for {image_id}; nothing to remove"
            )),
        );
    }
    let ours = loaded.record.images.get(image_id).map(|o| &o.entry);
    let survey = match survey(bcdedit, ours).await {
        Ok(survey) => survey,
        Err(e) => {
            return noted(
                &notes,
                BootOutcome::failed(format!(
                    "reading the boot configuration failed: {e}; boot entries unchanged"
                )),
            );
        }
    };
    let plan = plan_remove(&loaded.record, &survey, image_id);
    notes.extend(plan.notes);
    let (outcome, _) = apply_steps(&plan.steps, bcdedit, |id| {
        Err(format!("{id} was copied, which a removal never asks for"))
    })
    .await;
    // Saved after the steps: an entry not yet deleted is still ours. After a failure the
    // record stays as it was; the next survey forgets what is gone.
    if outcome.ok
        && plan.record != loaded.record
        && let Err(e) = file.save(&plan.record)
    {
        notes.push(format!("{e}; the next run forgets the deleted entry"));
    }
    let outcome = if plan.steps.is_empty() && outcome.ok {
        BootOutcome::ok(format!("no boot entry of ours for {image_id} to delete"))
    } else {
        outcome
    };
    noted(&notes, outcome)
}

/// Runs one step as a process, for the real store.
async fn exec_step(step: &Step) -> Result<String, String> {
    let keep = if step.is_query() {
        QUERY_OUTPUT_LIMIT
    } else {
        OUTPUT_TAIL
    };
    let ran = run_process(
        OsStr::new(&step.program),
        &step.args,
        &[],
        WINDOWS_STEP_TIME_LIMIT,
        keep,
    )
    .await;
    match ran.exit {
        Exit::Exited(status) if status.success() => {
            if step.is_query() && ran.truncated {
                Err(format!(
                    "`{step}` printed more than {QUERY_OUTPUT_LIMIT} bytes, which is not a boot configuration this agent can read"
                ))
            } else {
                Ok(ran.output)
            }
        }
        exit => Err(exit.describe_failure(&format!("`{step}`"), &ran.output)),
    }
}

/// Makes the image bootable on this machine's boot manager.
pub async fn run(req: &BootRequest, file: &RecordFile) -> BootOutcome {
    // A relative data dir gives a relative image path; the boot manager needs the volume.
    let image_path = match std::path::absolute(&req.image_path) {
        Ok(p) => p,
        Err(e) => {
            return BootOutcome::failed(format!(
                "resolving the image path {}: {e}",
                req.image_path.display()
            ));
        }
    };
    let _serialised = BCD_LOCK.lock().await;
    boot_with(req, &image_path, file, &mut Processes).await
}

/// Removes the entry we made for `image_id` from this machine's boot manager.
pub async fn remove(image_id: &str, file: &RecordFile) -> BootOutcome {
    let _serialised = BCD_LOCK.lock().await;
    remove_with(image_id, file, &mut Processes).await
}

/// `D:\images\win11.vhdx` as the boot manager's device string, `vhd=[D:]\images\win11.vhdx`.
///
/// Parsed as text, not with [`Path::components`], so that it means the same on every host.
fn vhd_device(image_path: &Path) -> Result<String, BootError> {
    let fail = |reason| BootError::VhdPath {
        path: image_path.to_owned(),
        reason,
    };
    let text = image_path
        .to_str()
        .ok_or_else(|| fail("the path is not valid Unicode"))?;
    // `std::path::absolute` and `canonicalize` on Windows may return the verbatim form.
    let text = text
        .strip_prefix(r"\\?\")
        .unwrap_or(text)
        .replace('/', r"\");
    if text.starts_with(r"\\") {
        return Err(fail(
            "it is on a network share; the image must be on a local volume",
        ));
    }
    let bytes = text.as_bytes();
    let lettered =
        bytes.len() > 3 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' && bytes[2] == b'\\';
    if !lettered {
        return Err(fail(
            "it must be an absolute path on a lettered volume, like D:\\images\\x.vhdx",
        ));
    }
    if text.chars().any(|c| c.is_control() || c == '"') {
        return Err(fail("it contains a control character or a double quote"));
    }
    let letter = char::from(bytes[0]).to_ascii_uppercase();
    Ok(format!("vhd=[{letter}:]{}", &text[2..]))
}

/// The image name as it may appear in a boot menu line: no control characters or double
/// quotes (the name comes from the server; bcdedit and shutdown get it as an argument), not
/// empty, not longer than a menu line.
fn entry_name(image_name: &str) -> String {
    let name: String = image_name
        .chars()
        .map(|c| if c.is_control() || c == '"' { ' ' } else { c })
        .collect();
    let name: String = name.split_whitespace().collect::<Vec<_>>().join(" ");
    let name: String = name.chars().take(MAX_DESCRIPTION_CHARS).collect();
    if name.is_empty() {
        "image".to_owned()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake_bcd::FakeBcd;
    use super::*;

    fn id(n: u32) -> EntryId {
        EntryId::parse(&format!("{{{n:08x}-0000-4000-8000-000000000000}}")).unwrap()
    }

    fn request(image: &str, action: AfterDownload) -> BootRequest {
        BootRequest {
            image_path: format!(r"D:\BootTorrent\images\{image}.vhdx").into(),
            parent_path: None,
            image_id: image.into(),
            entry: image.into(),
            image_name: format!("Lab {image}"),
            deployment_id: "dep-7".into(),
            action,
        }
    }

    fn lines(steps: &[Step]) -> Vec<String> {
        steps.iter().map(Step::to_string).collect()
    }

    fn owned(entry: EntryId, image: &str, previous_default: Option<EntryId>) -> OwnedEntry {
        OwnedEntry {
            entry,
            path: format!(r"D:\BootTorrent\images\{image}.vhdx").into(),
            previous_default,
        }
    }

    fn record(entries: &[(&str, OwnedEntry)]) -> Record {
        Record {
            images: entries
                .iter()
                .map(|(image, o)| ((*image).to_owned(), o.clone()))
                .collect(),
        }
    }

    fn survey_of(existing: &[EntryId], default: Option<EntryId>) -> Survey {
        Survey {
            existing: existing.iter().cloned().collect(),
            default,
        }
    }

    fn plan(record: &Record, survey: &Survey, req: &BootRequest) -> Plan {
        plan_boot(record, survey, req, &req.image_path).unwrap()
    }

    #[test]
    fn set_boot_copies_an_entry_for_a_new_image_and_keeps_the_default() {
        let req = request("win11", AfterDownload::SetBoot);
        let p = plan(&Record::default(), &survey_of(&[id(1)], Some(id(1))), &req);
        assert_eq!(
            lines(&p.steps),
            [
                r#"bcdedit /copy {current} /d "BootTorrent: Lab win11""#,
                r"bcdedit /set {new-entry} device vhd=[D:]\BootTorrent\images\win11.vhdx",
                r"bcdedit /set {new-entry} osdevice vhd=[D:]\BootTorrent\images\win11.vhdx",
                r"bcdedit /set {new-entry} detecthal on",
                r"bcdedit /default {new-entry}",
            ]
        );
        // One argument for the description: no quoting for bcdedit to undo.
        assert_eq!(p.steps[0].args[3], "BootTorrent: Lab win11");
        assert_eq!(p.record, Record::default());
        assert_eq!(
            p.new_entry,
            Some(NewEntry {
                key: "win11".into(),
                path: req.image_path.clone(),
                previous_default: Some(id(1)),
            })
        );
    }

    #[test]
    fn set_boot_repoints_the_entry_an_image_already_has() {
        let req = request("a", AfterDownload::SetBoot);
        let mut before = record(&[("a", owned(id(5), "old", None))]);
        let p = plan(&before, &survey_of(&[id(1), id(5)], Some(id(1))), &req);
        let e = id(5);
        assert_eq!(
            lines(&p.steps),
            [
                format!(r#"bcdedit /set {e} description "BootTorrent: Lab a""#),
                format!(r"bcdedit /set {e} device vhd=[D:]\BootTorrent\images\a.vhdx"),
                format!(r"bcdedit /set {e} osdevice vhd=[D:]\BootTorrent\images\a.vhdx"),
                format!(r"bcdedit /default {e}"),
            ]
        );
        assert_eq!(p.new_entry, None);
        before
            .images
            .insert("a".into(), owned(id(5), "a", Some(id(1))));
        assert_eq!(p.record, before);
    }

    #[test]
    fn a_default_that_is_already_ours_is_not_kept_as_the_previous_one() {
        let req = request("a", AfterDownload::SetBoot);
        let mut before = record(&[
            ("a", owned(id(5), "a", Some(id(1)))),
            ("b", owned(id(6), "b", Some(id(2)))),
        ]);
        let existing = [id(1), id(2), id(5), id(6)];
        // Ours already: what it replaced stays what it replaced.
        let p = plan(&before, &survey_of(&existing, Some(id(5))), &req);
        assert_eq!(p.record, before);
        // Another image's entry of ours: its previous default is inherited.
        let p = plan(&before, &survey_of(&existing, Some(id(6))), &req);
        before.images.get_mut("a").unwrap().previous_default = Some(id(2));
        assert_eq!(p.record, before);
        // For a new entry the same.
        let p = plan(
            &before,
            &survey_of(&existing, Some(id(6))),
            &request("c", AfterDownload::SetBoot),
        );
        assert_eq!(p.new_entry.unwrap().previous_default, Some(id(2)));
        // No default at all: none to restore.
        let p = plan(
            &before,
            &survey_of(&existing, None),
            &request("c", AfterDownload::SetBoot),
        );
        assert_eq!(p.new_entry.unwrap().previous_default, None);
    }

    #[test]
    fn an_entry_that_is_gone_is_forgotten_and_copied_anew() {
        let req = request("a", AfterDownload::SetBoot);
        let before = record(&[
            ("a", owned(id(5), "a", Some(id(1)))),
            ("b", owned(id(6), "b", None)),
        ]);
        let p = plan(&before, &survey_of(&[id(1), id(6)], Some(id(1))), &req);
        assert!(p.steps[0].is_copy(), "{:?}", lines(&p.steps));
        assert!(!p.record.images.contains_key("a"));
        assert!(p.record.images.contains_key("b"));
        assert!(p.notes[0].contains("no longer exists"), "{:?}", p.notes);
    }

    #[test]
    fn reboot_boots_once_then_restarts_and_keeps_the_default() {
        let req = request("win11", AfterDownload::Reboot);
        let p = plan(&Record::default(), &survey_of(&[id(1)], Some(id(1))), &req);
        assert_eq!(
            lines(&p.steps)[4..],
            [
                "bcdedit /bootsequence {new-entry}",
                r#"shutdown /r /t 5 /c "BootTorrent: rebooting into Lab win11""#,
            ]
        );
        assert!(!lines(&p.steps).iter().any(|s| s.contains("/default")));
        assert_eq!(p.new_entry.unwrap().previous_default, None);
        // An entry that kept a default keeps it through a one-time boot.
        let before = record(&[("win11", owned(id(5), "win11", Some(id(1))))]);
        let p = plan(&before, &survey_of(&[id(1), id(5)], Some(id(5))), &req);
        assert_eq!(
            p.record,
            record(&[("win11", owned(id(5), "win11", Some(id(1))))])
        );
    }

    #[test]
    fn stage_changes_no_boot_entry() {
        let before = record(&[("a", owned(id(5), "a", None))]);
        let p = plan(
            &before,
            &survey_of(&[id(5)], None),
            &request("a", AfterDownload::Stage),
        );
        assert!(p.steps.is_empty());
        assert_eq!(p.record, before);
    }

    #[test]
    fn removing_the_default_restores_the_one_it_replaced() {
        let before = record(&[
            ("a", owned(id(5), "a", Some(id(1)))),
            ("b", owned(id(6), "b", None)),
        ]);
        let p = plan_remove(
            &before,
            &survey_of(&[id(1), id(5), id(6)], Some(id(5))),
            "a",
        );
        assert_eq!(
            lines(&p.steps),
            [
                format!("bcdedit /delete {}", id(5)),
                format!("bcdedit /default {}", id(1))
            ]
        );
        assert_eq!(p.record, record(&[("b", owned(id(6), "b", None))]));
        assert!(p.notes.is_empty(), "{:?}", p.notes);
        // Not the default: only deleted.
        let p = plan_remove(
            &before,
            &survey_of(&[id(1), id(5), id(6)], Some(id(1))),
            "a",
        );
        assert_eq!(lines(&p.steps), [format!("bcdedit /delete {}", id(5))]);
    }

    #[test]
    fn without_the_previous_default_the_boot_manager_picks_and_the_report_says_so() {
        let before = record(&[
            ("a", owned(id(5), "a", Some(id(1)))),
            ("b", owned(id(6), "b", None)),
        ]);
        let p = plan_remove(&before, &survey_of(&[id(5), id(6)], Some(id(5))), "a");
        assert_eq!(lines(&p.steps), [format!("bcdedit /delete {}", id(5))]);
        assert!(p.notes[0].contains("no longer exists"), "{:?}", p.notes);
        assert!(p.notes[0].contains("boot manager picks"), "{:?}", p.notes);
        let p = plan_remove(&before, &survey_of(&[id(5), id(6)], Some(id(6))), "b");
        assert_eq!(lines(&p.steps), [format!("bcdedit /delete {}", id(6))]);
        assert!(p.notes[0].contains("replaced none"), "{:?}", p.notes);
    }

    #[test]
    fn only_recorded_entries_that_exist_are_removed() {
        let before = record(&[("a", owned(id(5), "a", Some(id(1))))]);
        let p = plan_remove(&before, &survey_of(&[id(1), id(5)], Some(id(5))), "other");
        assert!(p.steps.is_empty());
        assert_eq!(p.record, before);
        let p = plan_remove(&before, &survey_of(&[id(1)], Some(id(1))), "a");
        assert!(p.steps.is_empty());
        assert_eq!(p.record, Record::default());
        assert!(p.notes[0].contains("forgotten"), "{:?}", p.notes);
    }

    #[test]
    fn vhd_paths_split_the_drive_letter() {
        for (path, device) in [
            (r"D:\images\win11.vhdx", r"vhd=[D:]\images\win11.vhdx"),
            (
                r"e:\BootTorrent\data\Lab Image.vhdx",
                r"vhd=[E:]\BootTorrent\data\Lab Image.vhdx",
            ),
            (
                "C:/ProgramData/BootTorrent/x.vhdx",
                r"vhd=[C:]\ProgramData\BootTorrent\x.vhdx",
            ),
            (r"\\?\D:\images\x.vhdx", r"vhd=[D:]\images\x.vhdx"),
        ] {
            assert_eq!(vhd_device(Path::new(path)).unwrap(), device, "{path}");
        }
        for path in [
            r"images\x.vhdx",
            r"\\server\share\x.vhdx",
            r"\\?\UNC\server\share\x.vhdx",
            "D:",
            r"D:\",
            "/var/lib/boottorrent/x.vhdx",
            "1:\\x.vhdx",
            "D:\\a\"b.vhdx",
        ] {
            assert!(vhd_device(Path::new(path)).is_err(), "{path} accepted");
        }
    }

    #[test]
    fn entry_names_are_tamed() {
        assert_eq!(
            entry_name("Win 11 \"lab\"\n\tedition"),
            "Win 11 lab edition"
        );
        assert_eq!(entry_name(" \u{7} "), "image");
        assert_eq!(entry_name(&"x".repeat(500)).len(), MAX_DESCRIPTION_CHARS);
        let mut req = request("a", AfterDownload::SetBoot);
        req.image_name = "a\"b".into();
        let p = plan(&Record::default(), &survey_of(&[id(1)], None), &req);
        assert_eq!(p.steps[0].args[3], "BootTorrent: a b");
    }

    // The whole flow, against the in-memory model of a store (`fake_bcd`): queries, plans,
    // the record on disk, the runner.

    struct Machine {
        bcd: FakeBcd,
        dir: tempfile::TempDir,
        file: RecordFile,
        /// The entry the machine started with, the default before the agent.
        windows: EntryId,
        /// An entry someone else made; the agent must never name it.
        foreign: EntryId,
    }

    impl Machine {
        fn new() -> Machine {
            let mut bcd = FakeBcd::new();
            let windows = bcd.current.clone();
            let foreign = bcd.add("Recovery", r"vhd=[D:]\recovery.vhdx");
            let dir = tempfile::tempdir().unwrap();
            let file = RecordFile::in_dir(dir.path());
            Machine {
                bcd,
                dir,
                file,
                windows,
                foreign,
            }
        }

        async fn boot(&mut self, image: &str, action: AfterDownload) -> BootOutcome {
            let req = request(image, action);
            boot_with(&req, &req.image_path, &self.file, &mut self.bcd).await
        }

        async fn remove(&mut self, image: &str) -> BootOutcome {
            remove_with(image, &self.file, &mut self.bcd).await
        }

        fn record(&self) -> Record {
            self.file.load().record
        }

        fn entry_of(&self, image: &str) -> EntryId {
            self.record().images[image].entry.clone()
        }

        /// The steps since the last call that change something.
        fn changes(&mut self) -> Vec<String> {
            let log = std::mem::take(&mut self.bcd.log);
            log.into_iter()
                .filter(|s| !s.starts_with("bcdedit /enum"))
                .collect()
        }
    }

    /// The rule that the agent changes only its own entries, checked on every step it ran:
    /// a step names the foreign entry never, the starting entry only as `/copy {current}`'s
    /// source or as the default to restore, and otherwise only entries the record names.
    fn assert_only_ours(m: &Machine, steps: &[String], ours: &BTreeSet<EntryId>) {
        for step in steps {
            for named in bcd::guids_in(step) {
                assert_ne!(named, m.foreign, "{step}");
                if named == m.windows {
                    assert!(step.starts_with("bcdedit /default"), "{step}");
                } else {
                    assert!(ours.contains(&named), "{step} names {named}, not ours");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_lab_term_leaves_the_boot_manager_as_it_found_it() {
        let mut m = Machine::new();
        let original = m.bcd.entries.clone();
        let mut ours = BTreeSet::new();

        let outcome = m.boot("a", AfterDownload::SetBoot).await;
        assert!(outcome.ok, "{outcome:?}");
        let a = m.entry_of("a");
        ours.insert(a.clone());
        assert_eq!(m.bcd.default.as_ref(), Some(&a));
        assert_eq!(
            m.bcd.entries[&a].device,
            r"vhd=[D:]\BootTorrent\images\a.vhdx"
        );
        assert!(m.bcd.entries[&a].detecthal);
        assert_eq!(
            m.record().images["a"].previous_default,
            Some(m.windows.clone())
        );
        let steps = m.changes();
        assert_only_ours(&m, &steps, &ours);

        // A second deployment of the same image: the same entry, re-pointed.
        let outcome = m.boot("a", AfterDownload::SetBoot).await;
        assert!(outcome.ok, "{outcome:?}");
        assert_eq!(m.entry_of("a"), a);
        assert_eq!(m.bcd.entries.len(), original.len() + 1);
        let steps = m.changes();
        assert!(!steps.iter().any(|s| s.contains("/copy")), "{steps:?}");
        assert_only_ours(&m, &steps, &ours);

        // Another image takes over the default and inherits what `a` replaced.
        let outcome = m.boot("b", AfterDownload::SetBoot).await;
        assert!(outcome.ok, "{outcome:?}");
        let b = m.entry_of("b");
        ours.insert(b.clone());
        assert_eq!(m.bcd.default.as_ref(), Some(&b));
        assert_eq!(
            m.record().images["b"].previous_default,
            Some(m.windows.clone())
        );

        // A one-time boot of `a`, and the machine restarts.
        let outcome = m.boot("a", AfterDownload::Reboot).await;
        assert!(outcome.ok, "{outcome:?}");
        assert!(m.bcd.rebooted);
        assert_eq!(m.bcd.bootsequence.as_ref(), Some(&a));
        assert_eq!(m.bcd.default.as_ref(), Some(&b));
        let steps = m.changes();
        assert_only_ours(&m, &steps, &ours);

        // `b` unassigned: it was the default, the machine's own entry is again.
        let outcome = m.remove("b").await;
        assert!(outcome.ok, "{outcome:?}");
        assert!(!m.bcd.entries.contains_key(&b));
        assert_eq!(m.bcd.default.as_ref(), Some(&m.windows));
        let steps = m.changes();
        assert_eq!(
            steps,
            [
                format!("bcdedit /delete {b}"),
                format!("bcdedit /default {}", m.windows)
            ]
        );

        let outcome = m.remove("a").await;
        assert!(outcome.ok, "{outcome:?}");
        assert_eq!(m.bcd.entries, original);
        assert_eq!(m.bcd.default.as_ref(), Some(&m.windows));
        assert_eq!(m.bcd.bootsequence, None);
        assert_eq!(m.record(), Record::default());
        let steps = m.changes();
        assert_only_ours(&m, &steps, &ours);

        // Nothing of ours is left, so nothing more is touched.
        let outcome = m.remove("a").await;
        assert!(
            outcome.ok && outcome.message.contains("nothing to remove"),
            "{outcome:?}"
        );
        assert!(m.bcd.log.is_empty(), "{:?}", m.bcd.log);
    }

    /// A `reset` image alternates between two children, each with its own entry: the entry
    /// the machine booted from keeps naming the child it runs while the default moves to the
    /// other, and unassigning the image leaves the boot manager as it was.
    #[tokio::test]
    async fn a_reset_image_alternates_between_two_entries_of_its_own() {
        let mut m = Machine::new();
        let original = m.bcd.entries.clone();
        let slots = [
            r"D:\BootTorrent\children\a.vhdx",
            r"D:\BootTorrent\children\a.2.vhdx",
        ];
        let keys = ["a", "a.2"];
        let boot = async |m: &mut Machine, slot: usize, action| {
            let mut req = request("a", action);
            req.image_path = slots[slot].into();
            req.entry = keys[slot].into();
            let outcome = boot_with(&req, &req.image_path, &m.file, &mut m.bcd).await;
            assert!(outcome.ok, "{outcome:?}");
        };
        let device = |slot: usize| format!("vhd=[D:]{}", &slots[slot][2..]);
        boot(&mut m, 0, AfterDownload::Reboot).await;
        let first = m.entry_of("a");
        // Running from the first child, the agent points the next boot at the second.
        boot(&mut m, 1, AfterDownload::SetBoot).await;
        let second = m.entry_of("a.2");
        assert_ne!(first, second);
        assert_eq!(m.bcd.default.as_ref(), Some(&second));
        assert_eq!(
            m.bcd.entries[&first].device,
            device(0),
            "the running entry is left as it is"
        );
        assert_eq!(m.bcd.entries[&second].device, device(1));
        // Running from the second, back to the first: no third entry.
        boot(&mut m, 0, AfterDownload::SetBoot).await;
        assert_eq!(m.entry_of("a"), first);
        assert_eq!(m.bcd.default.as_ref(), Some(&first));
        assert_eq!(m.bcd.entries.len(), original.len() + 2);
        let ours = BTreeSet::from([first, second]);
        let steps = m.changes();
        assert_only_ours(&m, &steps, &ours);
        // Unassigned: both go, and the machine's own entry is the default again.
        for key in keys {
            let outcome = m.remove(key).await;
            assert!(outcome.ok, "{outcome:?}");
        }
        assert_eq!(m.bcd.entries, original);
        assert_eq!(m.bcd.default.as_ref(), Some(&m.windows));
        assert_eq!(m.record(), Record::default());
        let steps = m.changes();
        assert_only_ours(&m, &steps, &ours);
    }

    #[tokio::test]
    async fn the_removed_default_gives_way_to_the_boot_managers_choice_when_the_old_one_is_gone() {
        let mut m = Machine::new();
        let other = m.bcd.add("Windows 10", "partition=E:");
        m.bcd.default = Some(other.clone());
        assert!(m.boot("a", AfterDownload::SetBoot).await.ok);
        // Someone deletes the old default meanwhile.
        m.bcd
            .answer(&Step::bcdedit(&["/delete", other.as_str()]))
            .unwrap();
        m.changes();
        let outcome = m.remove("a").await;
        assert!(outcome.ok, "{outcome:?}");
        assert!(
            outcome.message.contains("boot manager picks"),
            "{}",
            outcome.message
        );
        assert_eq!(m.changes().len(), 1);
        assert_eq!(m.bcd.default, None);
    }

    #[tokio::test]
    async fn an_entry_deleted_behind_our_back_is_made_again() {
        let mut m = Machine::new();
        assert!(m.boot("a", AfterDownload::SetBoot).await.ok);
        let first = m.entry_of("a");
        m.bcd
            .answer(&Step::bcdedit(&["/delete", first.as_str()]))
            .unwrap();
        m.changes();
        let outcome = m.boot("a", AfterDownload::SetBoot).await;
        assert!(outcome.ok, "{outcome:?}");
        assert!(
            outcome.message.contains("no longer exists"),
            "{}",
            outcome.message
        );
        let second = m.entry_of("a");
        assert_ne!(first, second);
        assert!(m.changes()[0].contains("/copy"));
        assert_eq!(m.bcd.default.as_ref(), Some(&second));
        // Deleting the default left the boot manager without one: the copy replaced none.
        assert_eq!(m.record().images["a"].previous_default, None);
    }

    #[tokio::test]
    async fn an_entry_left_only_as_a_reference_is_made_again() {
        let mut m = Machine::new();
        assert!(m.boot("a", AfterDownload::SetBoot).await.ok);
        let first = m.entry_of("a");
        // Deleted by a tool that left it in the display order.
        m.bcd
            .answer(&Step::bcdedit(&["/delete", first.as_str()]))
            .unwrap();
        m.bcd.display_order.push(first.clone());
        m.changes();
        let outcome = m.boot("a", AfterDownload::Reboot).await;
        assert!(outcome.ok, "{outcome:?}");
        assert!(outcome.message.contains("no longer exists"), "{outcome:?}");
        let steps = m.changes();
        assert!(steps[0].contains("/copy"), "{steps:?}");
        assert!(
            !steps.iter().any(|s| s.contains(first.as_str())),
            "{steps:?}"
        );
        assert_ne!(m.entry_of("a"), first);
        // Removal the same: nothing to delete, the record forgets it.
        let second = m.entry_of("a");
        m.bcd
            .answer(&Step::bcdedit(&["/delete", second.as_str()]))
            .unwrap();
        m.bcd.display_order.push(second.clone());
        m.changes();
        let outcome = m.remove("a").await;
        assert!(outcome.ok, "{outcome:?}");
        assert!(outcome.message.contains("no longer exists"), "{outcome:?}");
        assert_eq!(m.changes(), Vec::<String>::new());
        assert_eq!(m.record(), Record::default());
    }

    /// Runs the model and, before each step, lets the test look at the machine.
    struct Watched<F> {
        bcd: FakeBcd,
        before_each: F,
    }

    impl<F: FnMut(&Step) + Send> Bcdedit for Watched<F> {
        fn run(&mut self, step: &Step) -> impl Future<Output = Result<String, String>> + Send {
            (self.before_each)(step);
            self.bcd.run(step)
        }
    }

    #[tokio::test]
    async fn a_copy_is_recorded_before_it_is_configured() {
        let m = Machine::new();
        let req = request("a", AfterDownload::SetBoot);
        let file = m.file.clone();
        let mut checked = 0;
        let mut watched = Watched {
            bcd: m.bcd.clone(),
            before_each: |step: &Step| {
                if step.args.first().is_some_and(|a| a == "/set") {
                    let recorded = file.load().record.images["a"].entry.to_string();
                    assert_eq!(step.args[1], recorded, "{step}");
                    checked += 1;
                }
            },
        };
        let outcome = boot_with(&req, &req.image_path, &m.file, &mut watched).await;
        assert!(outcome.ok, "{outcome:?}");
        assert_eq!(checked, 3);
    }

    #[tokio::test]
    async fn a_failing_step_removes_and_forgets_the_new_entry() {
        let mut m = Machine::new();
        let before = m.bcd.entries.clone();
        m.bcd.fail_on = vec!["osdevice".into()];
        let outcome = m.boot("a", AfterDownload::SetBoot).await;
        assert!(!outcome.ok);
        assert!(
            outcome.message.contains("The request is not supported."),
            "{}",
            outcome.message
        );
        assert!(
            outcome.message.contains("removed the new boot entry"),
            "{}",
            outcome.message
        );
        assert_eq!(m.bcd.entries, before);
        assert_eq!(m.bcd.default.as_ref(), Some(&m.windows));
        assert_eq!(m.record(), Record::default());
    }

    #[tokio::test]
    async fn a_new_entry_that_cannot_be_removed_stays_ours() {
        let mut m = Machine::new();
        m.bcd.fail_on = vec!["osdevice".into(), "/delete".into()];
        let outcome = m.boot("a", AfterDownload::SetBoot).await;
        assert!(!outcome.ok);
        assert!(
            outcome.message.contains("failed too"),
            "{}",
            outcome.message
        );
        let kept = m.entry_of("a");
        assert!(m.bcd.entries.contains_key(&kept));
        // The next deployment re-points it rather than adding another.
        m.bcd.fail_on.clear();
        m.changes();
        assert!(m.boot("a", AfterDownload::SetBoot).await.ok);
        assert_eq!(m.entry_of("a"), kept);
        assert!(!m.changes().iter().any(|s| s.contains("/copy")));
    }

    #[tokio::test]
    async fn a_failing_query_changes_nothing() {
        for failing in ["/enum all", "/enum {bootmgr}"] {
            let mut m = Machine::new();
            assert!(m.boot("a", AfterDownload::SetBoot).await.ok);
            let record = m.record();
            let entries = m.bcd.entries.clone();
            m.changes();
            m.bcd.fail_on = vec![failing.into()];
            for outcome in [
                m.boot("a", AfterDownload::SetBoot).await,
                m.boot("b", AfterDownload::Reboot).await,
                m.remove("a").await,
            ] {
                assert!(!outcome.ok);
                assert!(
                    outcome.message.contains("boot entries unchanged"),
                    "{outcome:?}"
                );
                assert!(outcome.message.contains(failing), "{outcome:?}");
            }
            assert_eq!(m.changes(), Vec::<String>::new());
            assert_eq!(m.record(), record);
            assert_eq!(m.bcd.entries, entries);
            assert!(!m.bcd.rebooted);
        }
    }

    #[tokio::test]
    async fn a_corrupt_record_owns_nothing_and_says_so() {
        let mut m = Machine::new();
        // A record that once named the foreign entry, now unreadable.
        let path = m.dir.path().join(RecordFile::FILE_NAME);
        std::fs::write(
            &path,
            format!("{{\"images\": {{\"a\": {{\"entry\": \"{}\"", m.foreign),
        )
        .unwrap();
        let outcome = m.remove("a").await;
        assert!(outcome.ok, "{outcome:?}");
        assert!(outcome.message.contains("corrupt"), "{}", outcome.message);
        let outcome = m.boot("a", AfterDownload::SetBoot).await;
        assert!(outcome.ok, "{outcome:?}");
        assert!(m.bcd.entries.contains_key(&m.foreign));
        let ours = BTreeSet::from([m.entry_of("a")]);
        let steps = m.changes();
        assert_only_ours(&m, &steps, &ours);
    }

    #[tokio::test]
    async fn an_aliased_default_is_kept_by_its_guid() {
        let mut m = Machine::new();
        m.bcd.alias_default = true;
        assert!(m.boot("a", AfterDownload::SetBoot).await.ok);
        assert!(
            m.bcd.log.iter().any(|s| s == "bcdedit /enum {current} /v"),
            "{:?}",
            m.bcd.log
        );
        assert_eq!(
            m.record().images["a"].previous_default,
            Some(m.windows.clone())
        );
    }

    #[tokio::test]
    async fn an_unreadable_copy_stops_everything() {
        struct Mute(FakeBcd);
        impl Bcdedit for Mute {
            fn run(&mut self, step: &Step) -> impl Future<Output = Result<String, String>> + Send {
                let answer = self.0.answer(step);
                std::future::ready(if step.is_copy() {
                    Ok("Access is denied.".into())
                } else {
                    answer
                })
            }
        }
        let m = Machine::new();
        let mut mute = Mute(m.bcd.clone());
        let req = request("a", AfterDownload::SetBoot);
        let outcome = boot_with(&req, &req.image_path, &m.file, &mut mute).await;
        assert!(!outcome.ok);
        assert!(
            outcome.message.contains("Access is denied."),
            "{}",
            outcome.message
        );
        assert!(
            !mute.0.log.iter().any(|s| s.contains("/set")),
            "{:?}",
            mute.0.log
        );
        assert_eq!(m.record(), Record::default());
    }

    #[tokio::test]
    async fn a_failing_reboot_keeps_the_entry() {
        let mut m = Machine::new();
        m.bcd.fail_on = vec!["shutdown".into()];
        let outcome = m.boot("a", AfterDownload::Reboot).await;
        assert!(!outcome.ok);
        assert!(
            outcome.message.contains("next restart uses it"),
            "{}",
            outcome.message
        );
        let a = m.entry_of("a");
        assert_eq!(m.bcd.bootsequence.as_ref(), Some(&a));
        assert!(!m.changes().iter().any(|s| s.contains("/delete")));
    }

    #[tokio::test]
    async fn stage_and_unbootable_paths_run_nothing() {
        let mut m = Machine::new();
        let outcome = m.boot("a", AfterDownload::Stage).await;
        assert!(
            outcome.ok && outcome.message.contains("staged only"),
            "{outcome:?}"
        );
        let mut req = request("a", AfterDownload::SetBoot);
        req.image_path = r"\\server\share\a.vhdx".into();
        let outcome = boot_with(&req, &req.image_path, &m.file, &mut m.bcd).await;
        assert!(
            !outcome.ok && outcome.message.contains("network share"),
            "{outcome:?}"
        );
        assert!(m.bcd.log.is_empty(), "{:?}", m.bcd.log);
    }
}
