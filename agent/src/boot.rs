//! Boot backends: what the agent does with an image once it is downloaded and verified.
//!
//! - `none` only stages: the image stays on disk and is seeded, nothing else changes.
//! - `command` runs a program the site configured (grub-reboot, kexec, efibootmgr, ...) with the
//!   image and the action in its environment, and reports its exit status and output.
//! - `windows` adds a native VHD boot entry with `bcdedit` and, when asked, reboots into it.
//!
//! How the deployment's action maps onto the Windows boot manager:
//!
//! | action     | boot entry                        | `bcdedit`                 | reboot |
//! |------------|-----------------------------------|---------------------------|--------|
//! | `stage`    | none added                        | nothing                   | no     |
//! | `set-boot` | added, made the permanent default | `/default {GUID}`         | no     |
//! | `reboot`   | added, booted once                | `/bootsequence {GUID}`    | yes    |
//!
//! `reboot` boots the new image once: if it does not come up, the next power cycle returns to
//! the entry that was the default, so a broken image cannot take a remote lab down. `set-boot`
//! changes the default, which takes effect whenever the machine next restarts. The download
//! code runs a backend only for `set-boot` and `reboot`; given `stage`, `windows` changes
//! nothing and `command` still runs, with `BOOTTORRENT_ACTION=stage`. Every backend
//! result, good or bad, becomes a [`BootOutcome`]; nothing here panics or propagates errors.
//!
//! Processes (the command, `bcdedit`, `shutdown`) are spawned without a shell, with a time
//! limit; their stdout and stderr are read concurrently into one buffer that keeps the last
//! [`OUTPUT_TAIL`] bytes, so a chatty program cannot fill the agent's memory.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use boottorrent_proto::AfterDownload;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::BootBackend;

/// How long the `command` backend's program may run before it is killed.
pub const COMMAND_TIME_LIMIT: Duration = Duration::from_secs(10 * 60);

/// How long one `bcdedit` or `shutdown` invocation may run before it is killed.
pub const WINDOWS_STEP_TIME_LIMIT: Duration = Duration::from_secs(2 * 60);

/// How much of a program's combined stdout and stderr is kept for the report, in bytes.
pub const OUTPUT_TAIL: usize = 4096;

/// How long to keep reading output after a program exits or is killed. A program that leaves
/// a background child holding its stdout would otherwise keep us waiting for end-of-file.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Stands for the new boot entry's id in [`bcdedit_steps`], before `bcdedit /copy` has made it.
pub const NEW_ENTRY: &str = "{new-entry}";

/// Seconds between `shutdown /r` and the reboot, so the `boot` event can leave first.
const REBOOT_DELAY_SECS: u32 = 5;

/// The longest boot entry description we write; the boot menu has one line per entry.
const MAX_DESCRIPTION_CHARS: usize = 64;

/// Why a boot backend could not be configured or a boot entry could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// `boot_backend = "command"` without a program to run.
    #[error("boot backend \"command\" needs a program: set boot_command (--boot-command)")]
    MissingCommand,
    /// The image's path cannot be written as a `vhd=[X:]\path` boot device.
    #[error("cannot boot {path:?} natively: {reason}")]
    VhdPath {
        /// The path as given.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `bcdedit /copy` printed no new entry id, or more than one.
    #[error(
        "cannot find the new entry's {{GUID}} in the output of bcdedit /copy ({reason}): {output:?}"
    )]
    NoEntryId {
        /// What was wrong with the output.
        reason: &'static str,
        /// The start of the output.
        output: String,
    },
}

/// What to do with a staged image, from the config's `boot_backend` and `boot_command`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Stage only.
    None,
    /// Run this program (no shell, no arguments) with the image in its environment.
    Command {
        /// The program: a path, or a name looked up in `PATH`.
        program: PathBuf,
    },
    /// Add a native VHD boot entry with `bcdedit`; only works on Windows.
    Windows,
}

impl Backend {
    /// The backend that the config's `boot_backend` names. `boot_command` is required for
    /// `command` and ignored otherwise, so that switching a machine to `none` for a while
    /// takes one edit.
    pub fn from_config(
        kind: BootBackend,
        boot_command: Option<&Path>,
    ) -> Result<Backend, BootError> {
        Ok(match kind {
            BootBackend::None => Backend::None,
            BootBackend::Windows => Backend::Windows,
            BootBackend::Command => match boot_command {
                Some(program) if !program.as_os_str().is_empty() => Backend::Command {
                    program: program.to_owned(),
                },
                _ => return Err(BootError::MissingCommand),
            },
        })
    }
}

/// A staged, verified image and what the deployment wants done with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootRequest {
    /// The image file on this machine.
    pub image_path: PathBuf,
    /// The image's id in the catalog.
    pub image_id: String,
    /// The image's human-readable name; it names the boot entry.
    pub image_name: String,
    /// The deployment that asked for it.
    pub deployment_id: String,
    /// What to do now that it is staged.
    pub action: AfterDownload,
}

/// What a backend did, for the `boot` event (and the `error` event when it failed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootOutcome {
    /// Whether the backend did what the action asked.
    pub ok: bool,
    /// What was done, or what failed with the failing program's output.
    pub message: String,
}

impl BootOutcome {
    fn ok(message: impl Into<String>) -> Self {
        BootOutcome {
            ok: true,
            message: message.into(),
        }
    }

    fn failed(message: impl Into<String>) -> Self {
        BootOutcome {
            ok: false,
            message: message.into(),
        }
    }
}

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

    /// This step with [`NEW_ENTRY`] replaced by the entry's real id.
    fn for_entry(&self, entry: &str) -> Step {
        Step {
            program: self.program.clone(),
            args: self
                .args
                .iter()
                .map(|a| {
                    if a == NEW_ENTRY {
                        entry.to_owned()
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

/// The action as `BOOTTORRENT_ACTION` spells it: the protocol's own names.
pub fn action_name(action: AfterDownload) -> &'static str {
    match action {
        AfterDownload::Stage => "stage",
        AfterDownload::SetBoot => "set-boot",
        AfterDownload::Reboot => "reboot",
    }
}

/// Runs the backend for a staged image. Never panics; every failure is `ok: false` with the
/// reason, including the output of the program that failed.
pub async fn run(backend: &Backend, req: &BootRequest) -> BootOutcome {
    match backend {
        Backend::None => BootOutcome::ok(format!(
            "staged only: {} stays at {} (boot backend none)",
            req.image_name,
            req.image_path.display()
        )),
        Backend::Command { program } => run_command(program, req, COMMAND_TIME_LIMIT).await,
        // `cfg!` rather than `#[cfg]`: the Windows path is compiled, and its logic tested, on
        // every platform.
        Backend::Windows if cfg!(windows) => run_windows(req).await,
        Backend::Windows => BootOutcome::failed("the windows backend only runs on Windows"),
    }
}

/// Runs the configured program with the image described in its environment.
async fn run_command(program: &Path, req: &BootRequest, limit: Duration) -> BootOutcome {
    // The program's working directory is the agent's; an absolute path means the same to both.
    let image_path =
        std::path::absolute(&req.image_path).unwrap_or_else(|_| req.image_path.clone());
    let env: [(&str, &OsStr); 5] = [
        ("BOOTTORRENT_IMAGE_PATH", image_path.as_os_str()),
        ("BOOTTORRENT_IMAGE_ID", OsStr::new(&req.image_id)),
        ("BOOTTORRENT_IMAGE_NAME", OsStr::new(&req.image_name)),
        ("BOOTTORRENT_DEPLOYMENT_ID", OsStr::new(&req.deployment_id)),
        ("BOOTTORRENT_ACTION", OsStr::new(action_name(req.action))),
    ];
    let ran = run_process(program.as_os_str(), &[], &env, limit).await;
    let what = format!("boot command {}", program.display());
    match ran.exit {
        Exit::Exited(status) if status.success() => {
            let mut message = format!("{what} succeeded (action {})", action_name(req.action));
            if !ran.output.is_empty() {
                message.push_str(": ");
                message.push_str(&ran.output);
            }
            BootOutcome::ok(message)
        }
        exit => BootOutcome::failed(exit.describe_failure(&what, &ran.output)),
    }
}

/// Plans and runs the `bcdedit` steps for the image.
async fn run_windows(req: &BootRequest) -> BootOutcome {
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
    let steps = match bcdedit_steps(&image_path, &req.image_name, req.action) {
        Ok(steps) => steps,
        Err(e) => return BootOutcome::failed(e.to_string()),
    };
    if steps.is_empty() {
        return BootOutcome::ok(format!(
            "staged only: {} stays at {} (action {}, boot entries unchanged)",
            req.image_name,
            image_path.display(),
            action_name(req.action)
        ));
    }
    apply_steps(&steps, async |step: &Step| {
        let ran = run_process(
            OsStr::new(&step.program),
            &step.args,
            &[],
            WINDOWS_STEP_TIME_LIMIT,
        )
        .await;
        match ran.exit {
            Exit::Exited(status) if status.success() => Ok(ran.output),
            exit => Err(exit.describe_failure(&format!("`{step}`"), &ran.output)),
        }
    })
    .await
}

/// The `bcdedit` (and `shutdown`) invocations that make `image_path` bootable as `action` asks.
///
/// The first step copies the running entry; the later ones name the copy [`NEW_ENTRY`], which
/// the caller replaces with the id that `bcdedit /copy` printed (see [`parse_copied_entry`]).
/// `stage` needs no steps. The path must be absolute on a lettered volume (`D:\images\x.vhdx`,
/// also `D:/...` or `\\?\D:\...`): native VHD boot cannot use network paths.
pub fn bcdedit_steps(
    image_path: &Path,
    image_name: &str,
    action: AfterDownload,
) -> Result<Vec<Step>, BootError> {
    if action == AfterDownload::Stage {
        return Ok(Vec::new());
    }
    let device = vhd_device(image_path)?;
    let name = entry_name(image_name);
    let description = format!("BootTorrent: {name}");
    let mut steps = vec![
        Step::new("bcdedit", &["/copy", "{current}", "/d", &description]),
        Step::new("bcdedit", &["/set", NEW_ENTRY, "device", &device]),
        Step::new("bcdedit", &["/set", NEW_ENTRY, "osdevice", &device]),
        // Microsoft's VHD boot recipe sets it: the image may have been built on other hardware.
        Step::new("bcdedit", &["/set", NEW_ENTRY, "detecthal", "on"]),
    ];
    match action {
        AfterDownload::Stage => {}
        AfterDownload::SetBoot => steps.push(Step::new("bcdedit", &["/default", NEW_ENTRY])),
        AfterDownload::Reboot => {
            steps.push(Step::new("bcdedit", &["/bootsequence", NEW_ENTRY]));
            let delay = REBOOT_DELAY_SECS.to_string();
            let comment = format!("BootTorrent: rebooting into {name}");
            steps.push(Step::new("shutdown", &["/r", "/t", &delay, "/c", &comment]));
        }
    }
    Ok(steps)
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

/// The id of the entry that `bcdedit /copy` made, from its output.
///
/// English Windows prints `The entry was successfully copied to {GUID}.`, other languages
/// other sentences, so only the id is looked for: exactly one distinct `{8-4-4-4-12}` hex
/// GUID in braces. Returned in lower case with its braces.
pub fn parse_copied_entry(output: &str) -> Result<String, BootError> {
    let fail = |reason| BootError::NoEntryId {
        reason,
        output: output.trim().chars().take(200).collect(),
    };
    let mut found: Option<String> = None;
    let mut rest = output;
    while let Some(open) = rest.find('{') {
        rest = &rest[open + 1..];
        let Some(close) = rest.find('}') else { break };
        let inner = &rest[..close];
        if is_guid(inner) {
            let guid = format!("{{{}}}", inner.to_ascii_lowercase());
            match &found {
                Some(first) if *first != guid => return Err(fail("more than one GUID")),
                _ => found = Some(guid),
            }
            rest = &rest[close + 1..];
        }
    }
    found.ok_or_else(|| fail("no GUID"))
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

/// Runs the steps in order through `exec` (which returns a step's output, or why it failed).
///
/// The copy's id replaces [`NEW_ENTRY`] in the later steps. If a `bcdedit` step fails after
/// the copy, the new entry is deleted again, so that a failure leaves the boot menu as it was
/// and failed deployments do not pile up half-made entries. A failing `shutdown` leaves the
/// entry in place: the boot target is set and the next restart uses it.
async fn apply_steps(
    steps: &[Step],
    mut exec: impl AsyncFnMut(&Step) -> Result<String, String>,
) -> BootOutcome {
    let mut entry: Option<String> = None;
    let mut done = Vec::new();
    for planned in steps {
        let step = match &entry {
            Some(id) => planned.for_entry(id),
            None => planned.clone(),
        };
        match exec(&step).await {
            Ok(output) => {
                if step.is_copy() {
                    match parse_copied_entry(&output) {
                        Ok(id) => entry = Some(id),
                        Err(e) => return BootOutcome::failed(e.to_string()),
                    }
                }
                done.push(step.to_string());
            }
            Err(why) => {
                let mut message = why;
                if let Some(id) = entry.as_deref().filter(|_| step.program == "bcdedit") {
                    let delete = Step::new("bcdedit", &["/delete", id]);
                    match exec(&delete).await {
                        Ok(_) => {
                            message.push_str(&format!("; removed the new boot entry {id} again"))
                        }
                        Err(e) => message.push_str(&format!(
                            "; removing the new boot entry {id} failed too: {e}"
                        )),
                    }
                } else if step.program == "shutdown" {
                    message.push_str("; the boot entry is set and the next restart uses it");
                }
                return BootOutcome::failed(message);
            }
        }
    }
    BootOutcome::ok(format!("ran: {}", done.join("; ")))
}

/// How a process run ended.
#[derive(Debug)]
enum Exit {
    /// It exited by itself.
    Exited(ExitStatus),
    /// It ran past its time limit and was killed.
    TimedOut(Duration),
    /// It could not be started (not found, not executable, ...).
    NotStarted(std::io::Error),
    /// Waiting for it failed.
    Lost(std::io::Error),
}

impl Exit {
    /// The report for a run that did not succeed; `what` names the program.
    fn describe_failure(&self, what: &str, output: &str) -> String {
        let mut message = match self {
            Exit::Exited(status) => format!("{what} failed ({status})"),
            Exit::TimedOut(limit) => {
                format!(
                    "{what} did not finish within {} s and was killed",
                    limit.as_secs()
                )
            }
            Exit::NotStarted(e) => format!("{what} could not be started: {e}"),
            Exit::Lost(e) => format!("{what}: waiting for it failed: {e}"),
        };
        if !output.is_empty() {
            message.push_str(": ");
            message.push_str(output);
        }
        message
    }
}

/// A finished process run: how it ended and the tail of its output.
struct Ran {
    exit: Exit,
    /// The last [`OUTPUT_TAIL`] bytes of stdout and stderr as they arrived, trimmed.
    output: String,
}

/// Runs `program` with `args` and extra `env`, stdin closed, killed after `limit`.
async fn run_process(
    program: &OsStr,
    args: &[String],
    env: &[(&str, &OsStr)],
    limit: Duration,
) -> Ran {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Its own process group, so that a timeout kills what a script started too.
    #[cfg(unix)]
    command.process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Ran {
                exit: Exit::NotStarted(e),
                output: String::new(),
            };
        }
    };
    let tail = Mutex::new(Tail::default());
    let exit = {
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let collect = async { tokio::join!(drain(stdout, &tail), drain(stderr, &tail)) };
        tokio::pin!(collect);
        let deadline = tokio::time::sleep(limit);
        tokio::pin!(deadline);
        let mut collected = false;
        let exit = loop {
            tokio::select! {
                _ = &mut collect, if !collected => collected = true,
                status = child.wait() => break status.map_or_else(Exit::Lost, Exit::Exited),
                () = &mut deadline => {
                    kill_tree(&mut child);
                    let _ = child.wait().await;
                    break Exit::TimedOut(limit);
                }
            }
        };
        if !collected {
            let _ = tokio::time::timeout(OUTPUT_GRACE, &mut collect).await;
        }
        exit
    };
    let output = tail.into_inner().unwrap_or_else(|e| e.into_inner()).text();
    Ran { exit, output }
}

/// Kills the child and, on Unix, every process in its group.
fn kill_tree(child: &mut tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) {
        // SAFETY: killpg only sends a signal; the group is the child's own (process_group(0)),
        // and the child is not yet reaped, so its pid cannot have been reused.
        unsafe {
            libc::killpg(pid, libc::SIGKILL);
        }
    }
    let _ = child.start_kill();
}

/// Reads `pipe` to its end into `tail`.
async fn drain(pipe: Option<impl AsyncRead + Unpin>, tail: &Mutex<Tail>) {
    let Some(mut pipe) = pipe else { return };
    let mut buf = [0u8; 2048];
    while let Ok(n @ 1..) = pipe.read(&mut buf).await {
        tail.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(&buf[..n]);
    }
}

/// The last [`OUTPUT_TAIL`] bytes written to it.
#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
    dropped: bool,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        // Trimmed in batches, not on every push, to keep this linear.
        if self.bytes.len() > 2 * OUTPUT_TAIL {
            self.bytes.drain(..self.bytes.len() - OUTPUT_TAIL);
            self.dropped = true;
        }
    }

    fn text(mut self) -> String {
        if self.bytes.len() > OUTPUT_TAIL {
            self.bytes.drain(..self.bytes.len() - OUTPUT_TAIL);
            self.dropped = true;
        }
        let text = String::from_utf8_lossy(&self.bytes);
        let text = text.trim();
        if self.dropped {
            format!("...{text}")
        } else {
            text.to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUID: &str = "{0cb3b571-2f2e-4343-a879-d86a476d7215}";

    fn steps(image: &str, name: &str, action: AfterDownload) -> Vec<String> {
        bcdedit_steps(Path::new(image), name, action)
            .unwrap()
            .iter()
            .map(Step::to_string)
            .collect()
    }

    #[test]
    fn command_backend_needs_a_program() {
        let e = Backend::from_config(BootBackend::Command, None).unwrap_err();
        assert!(e.to_string().contains("boot_command"), "{e}");
        assert!(Backend::from_config(BootBackend::Command, Some(Path::new(""))).is_err());
        assert_eq!(
            Backend::from_config(
                BootBackend::Command,
                Some(Path::new("/usr/local/sbin/hook"))
            )
            .unwrap(),
            Backend::Command {
                program: "/usr/local/sbin/hook".into()
            }
        );
        assert_eq!(
            Backend::from_config(BootBackend::None, Some(Path::new("/x"))).unwrap(),
            Backend::None
        );
        assert_eq!(
            Backend::from_config(BootBackend::Windows, None).unwrap(),
            Backend::Windows
        );
    }

    #[test]
    fn action_names_are_the_protocol_names() {
        for action in [
            AfterDownload::Stage,
            AfterDownload::SetBoot,
            AfterDownload::Reboot,
        ] {
            assert_eq!(
                serde_json::to_string(&action).unwrap(),
                format!("\"{}\"", action_name(action))
            );
        }
    }

    #[test]
    fn stage_changes_no_boot_entry() {
        assert!(steps(r"D:\images\win11.vhdx", "win11", AfterDownload::Stage).is_empty());
    }

    #[test]
    fn set_boot_makes_a_permanent_default() {
        assert_eq!(
            steps(
                r"D:\images\win11.vhdx",
                "Windows 11 lab",
                AfterDownload::SetBoot
            ),
            [
                r#"bcdedit /copy {current} /d "BootTorrent: Windows 11 lab""#,
                r"bcdedit /set {new-entry} device vhd=[D:]\images\win11.vhdx",
                r"bcdedit /set {new-entry} osdevice vhd=[D:]\images\win11.vhdx",
                r"bcdedit /set {new-entry} detecthal on",
                r"bcdedit /default {new-entry}",
            ]
        );
    }

    #[test]
    fn reboot_boots_once_then_restarts() {
        let planned = bcdedit_steps(
            Path::new(r"D:\images\win11.vhdx"),
            "win11",
            AfterDownload::Reboot,
        )
        .unwrap();
        assert_eq!(
            planned[0],
            Step {
                program: "bcdedit".into(),
                // One argument for the description: no quoting for bcdedit to undo.
                args: vec![
                    "/copy".into(),
                    "{current}".into(),
                    "/d".into(),
                    "BootTorrent: win11".into()
                ],
            }
        );
        assert_eq!(
            planned.iter().map(Step::to_string).collect::<Vec<_>>()[1..],
            [
                r"bcdedit /set {new-entry} device vhd=[D:]\images\win11.vhdx",
                r"bcdedit /set {new-entry} osdevice vhd=[D:]\images\win11.vhdx",
                r"bcdedit /set {new-entry} detecthal on",
                r"bcdedit /bootsequence {new-entry}",
                r#"shutdown /r /t 5 /c "BootTorrent: rebooting into win11""#,
            ]
        );
        assert!(
            !planned
                .iter()
                .any(|s| s.args.iter().any(|a| a == "/default"))
        );
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
        let planned =
            bcdedit_steps(Path::new(r"D:\x.vhdx"), "a\"b", AfterDownload::SetBoot).unwrap();
        assert_eq!(planned[0].args[3], "BootTorrent: a b");
    }

    #[test]
    fn copied_entry_ids_are_found_in_any_wording() {
        for output in [
            format!("The entry was successfully copied to {GUID}.\r\n"),
            format!("Der Eintrag wurde erfolgreich in {GUID} kopiert.\r\n"),
            format!("L'entrée a été copiée vers {}.", GUID.to_uppercase()),
            format!("  \r\n{GUID}\r\n"),
            format!("{{current}} -> {GUID}. Done: {GUID}"),
        ] {
            assert_eq!(parse_copied_entry(&output).unwrap(), GUID, "{output:?}");
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

    /// Runs the planned steps against a fake `bcdedit` that answers from `answer`.
    async fn apply_with(
        planned: &[Step],
        mut answer: impl FnMut(&Step) -> Result<String, String>,
    ) -> (BootOutcome, Vec<String>) {
        let mut log = Vec::new();
        let outcome = apply_steps(planned, async |step: &Step| {
            log.push(step.to_string());
            answer(step)
        })
        .await;
        (outcome, log)
    }

    fn copied(step: &Step) -> Result<String, String> {
        if step.is_copy() {
            Ok(format!("The entry was successfully copied to {GUID}.\r\n"))
        } else {
            Ok("The operation completed successfully.\r\n".into())
        }
    }

    #[tokio::test]
    async fn the_copied_entry_is_the_one_configured() {
        let planned =
            bcdedit_steps(Path::new(r"D:\images\w.vhdx"), "w", AfterDownload::Reboot).unwrap();
        let (outcome, log) = apply_with(&planned, copied).await;
        assert!(outcome.ok, "{outcome:?}");
        assert_eq!(log.len(), planned.len());
        assert!(log[1..].iter().all(|s| !s.contains(NEW_ENTRY)), "{log:?}");
        assert_eq!(log[4], format!("bcdedit /bootsequence {GUID}"));
        assert!(outcome.message.contains(&log[4]), "{}", outcome.message);
    }

    #[tokio::test]
    async fn a_failing_step_removes_the_new_entry() {
        let planned =
            bcdedit_steps(Path::new(r"D:\images\w.vhdx"), "w", AfterDownload::SetBoot).unwrap();
        let (outcome, log) = apply_with(&planned, |step| {
            if step.args.iter().any(|a| a == "osdevice") {
                Err("`bcdedit /set` failed (exit code: 1): The parameter is incorrect.".into())
            } else {
                copied(step)
            }
        })
        .await;
        assert!(!outcome.ok);
        assert!(
            outcome.message.contains("The parameter is incorrect."),
            "{}",
            outcome.message
        );
        assert!(
            outcome.message.contains("removed the new boot entry"),
            "{}",
            outcome.message
        );
        assert_eq!(log.len(), 4, "{log:?}");
        assert_eq!(log[3], format!("bcdedit /delete {GUID}"));
    }

    #[tokio::test]
    async fn an_unreadable_copy_stops_everything() {
        let planned =
            bcdedit_steps(Path::new(r"D:\images\w.vhdx"), "w", AfterDownload::SetBoot).unwrap();
        let (outcome, log) = apply_with(&planned, |_| Ok("Access is denied.".into())).await;
        assert!(!outcome.ok);
        assert!(
            outcome.message.contains("Access is denied."),
            "{}",
            outcome.message
        );
        assert_eq!(log.len(), 1);
    }

    #[tokio::test]
    async fn a_failing_reboot_keeps_the_entry() {
        let planned =
            bcdedit_steps(Path::new(r"D:\images\w.vhdx"), "w", AfterDownload::Reboot).unwrap();
        let (outcome, log) = apply_with(&planned, |step| {
            if step.program == "shutdown" {
                Err("`shutdown` failed: A system shutdown is in progress.(1115)".into())
            } else {
                copied(step)
            }
        })
        .await;
        assert!(!outcome.ok);
        assert!(
            outcome.message.contains("next restart uses it"),
            "{}",
            outcome.message
        );
        assert!(!log.iter().any(|s| s.contains("/delete")), "{log:?}");
    }

    fn request(action: AfterDownload) -> BootRequest {
        BootRequest {
            image_path: PathBuf::from("images/lab.vhdx"),
            image_id: "img-1".into(),
            image_name: "Lab image".into(),
            deployment_id: "dep-7".into(),
            action,
        }
    }

    #[tokio::test]
    async fn none_only_stages() {
        let outcome = run(&Backend::None, &request(AfterDownload::Reboot)).await;
        assert!(outcome.ok);
        assert!(
            outcome.message.contains("staged only"),
            "{}",
            outcome.message
        );
    }

    #[cfg(not(windows))]
    #[tokio::test]
    async fn the_windows_backend_refuses_other_systems() {
        let outcome = run(&Backend::Windows, &request(AfterDownload::Reboot)).await;
        assert_eq!(
            outcome,
            BootOutcome::failed("the windows backend only runs on Windows")
        );
    }

    #[test]
    fn the_output_tail_keeps_the_end() {
        let mut tail = Tail::default();
        for i in 0..1000 {
            tail.push(format!("line {i}\n").as_bytes());
        }
        let text = tail.text();
        assert!(
            text.starts_with("...") && text.ends_with("line 999"),
            "{text}"
        );
        assert!(text.len() <= OUTPUT_TAIL + 3);
        let mut short = Tail::default();
        short.push(b"  hello\n");
        assert_eq!(short.text(), "hello");
    }

    /// The command backend as a real process: scripts the test writes and runs.
    #[cfg(unix)]
    mod command {
        use std::os::unix::fs::PermissionsExt;
        use std::time::Instant;

        use super::*;

        fn script(dir: &Path, name: &str, body: &str) -> Backend {
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            Backend::Command { program: path }
        }

        /// Runs with `limit`, retrying when another test's fork briefly held our fresh script
        /// open for writing ("Text file busy"), a race of the test, not of the backend.
        async fn run_with(backend: &Backend, req: &BootRequest, limit: Duration) -> BootOutcome {
            let Backend::Command { program } = backend else {
                unreachable!()
            };
            for _ in 0..20 {
                let outcome = run_command(program, req, limit).await;
                if !outcome.message.contains("Text file busy") {
                    return outcome;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("{} stayed busy", program.display());
        }

        #[tokio::test]
        async fn the_program_gets_the_documented_environment() {
            let dir = tempfile::tempdir().unwrap();
            let record = dir.path().join("env.txt");
            let backend = script(
                dir.path(),
                "hook",
                &format!(
                    "env | grep '^BOOTTORRENT_' | sort > '{}'\necho \"args=$#\" >> '{}'\necho 'grub-reboot done'",
                    record.display(),
                    record.display()
                ),
            );
            let mut req = request(AfterDownload::SetBoot);
            req.image_path = dir.path().join("lab.vhdx");
            let outcome = run_with(&backend, &req, COMMAND_TIME_LIMIT).await;
            assert!(outcome.ok, "{outcome:?}");
            assert!(
                outcome.message.ends_with("grub-reboot done"),
                "{}",
                outcome.message
            );
            let recorded = std::fs::read_to_string(&record).unwrap();
            assert_eq!(
                recorded.lines().collect::<Vec<_>>(),
                [
                    "BOOTTORRENT_ACTION=set-boot",
                    "BOOTTORRENT_DEPLOYMENT_ID=dep-7",
                    "BOOTTORRENT_IMAGE_ID=img-1",
                    "BOOTTORRENT_IMAGE_NAME=Lab image",
                    &format!("BOOTTORRENT_IMAGE_PATH={}", req.image_path.display()),
                    "args=0",
                ]
            );
        }

        #[tokio::test]
        async fn relative_image_paths_are_made_absolute() {
            let dir = tempfile::tempdir().unwrap();
            let backend = script(
                dir.path(),
                "hook",
                "echo \"$BOOTTORRENT_IMAGE_PATH|$BOOTTORRENT_ACTION\"",
            );
            let outcome = run_with(
                &backend,
                &request(AfterDownload::Reboot),
                COMMAND_TIME_LIMIT,
            )
            .await;
            let expected = std::env::current_dir().unwrap().join("images/lab.vhdx");
            assert!(
                outcome
                    .message
                    .ends_with(&format!("{}|reboot", expected.display())),
                "{}",
                outcome.message
            );
        }

        #[tokio::test]
        async fn a_failing_program_reports_its_status_and_output() {
            let dir = tempfile::tempdir().unwrap();
            let backend = script(
                dir.path(),
                "hook",
                "echo 'looking for the entry'\necho 'grub-reboot: no such menu entry' >&2\nexit 3",
            );
            let outcome = run_with(
                &backend,
                &request(AfterDownload::Reboot),
                COMMAND_TIME_LIMIT,
            )
            .await;
            assert!(!outcome.ok);
            assert!(
                outcome.message.contains("exit status: 3"),
                "{}",
                outcome.message
            );
            assert!(
                outcome.message.contains("looking for the entry"),
                "{}",
                outcome.message
            );
            assert!(
                outcome.message.contains("grub-reboot: no such menu entry"),
                "{}",
                outcome.message
            );
        }

        #[tokio::test]
        async fn a_missing_program_is_a_failure() {
            let dir = tempfile::tempdir().unwrap();
            let program = dir.path().join("not-there");
            let outcome = run(
                &Backend::Command {
                    program: program.clone(),
                },
                &request(AfterDownload::Reboot),
            )
            .await;
            assert!(!outcome.ok);
            assert!(
                outcome.message.contains("could not be started"),
                "{}",
                outcome.message
            );
            assert!(
                outcome.message.contains(&program.display().to_string()),
                "{}",
                outcome.message
            );
        }

        #[tokio::test]
        async fn long_output_is_cut_to_its_tail() {
            let dir = tempfile::tempdir().unwrap();
            let backend = script(
                dir.path(),
                "hook",
                "i=0; while [ $i -lt 3000 ]; do echo \"line $i\"; i=$((i+1)); done; exit 1",
            );
            let outcome = run_with(
                &backend,
                &request(AfterDownload::Reboot),
                COMMAND_TIME_LIMIT,
            )
            .await;
            assert!(!outcome.ok);
            assert!(
                outcome.message.ends_with("line 2999"),
                "{}",
                outcome.message
            );
            assert!(
                outcome.message.len() < OUTPUT_TAIL + 200,
                "{}",
                outcome.message.len()
            );
        }

        #[tokio::test]
        async fn a_hanging_program_is_killed_with_its_children() {
            let dir = tempfile::tempdir().unwrap();
            // The background sleep holds stdout open: only killing the group ends the read.
            let backend = script(dir.path(), "hook", "echo started\nsleep 60 &\nsleep 60");
            let began = Instant::now();
            let outcome = run_with(
                &backend,
                &request(AfterDownload::Reboot),
                Duration::from_millis(500),
            )
            .await;
            assert!(!outcome.ok);
            assert!(
                outcome.message.contains("did not finish"),
                "{}",
                outcome.message
            );
            assert!(outcome.message.ends_with("started"), "{}", outcome.message);
            assert!(began.elapsed() < OUTPUT_GRACE, "{:?}", began.elapsed());
        }
    }
}
