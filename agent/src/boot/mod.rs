//! Boot backends: what the agent does with an image once it is downloaded and verified.
//!
//! - `none` only stages: the image stays on disk and is seeded, nothing else changes.
//! - `command` runs a program the site configured (grub-reboot, kexec, efibootmgr, ...) with the
//!   image and the action in its environment, and reports its exit status and output.
//! - `windows` keeps one native VHD boot entry per image with `bcdedit` and, when asked,
//!   reboots into it ([`windows`]).
//!
//! How the deployment's action maps onto the Windows boot manager:
//!
//! | action       | the image's boot entry                    | `bcdedit`                          | reboot |
//! |--------------|-------------------------------------------|------------------------------------|--------|
//! | `stage`      | unchanged                                 | nothing                            | no     |
//! | `set-boot`   | made or re-pointed, the permanent default | `/default {GUID}`                  | no     |
//! | `reboot`     | made or re-pointed, booted once           | `/bootsequence {GUID}`             | yes    |
//! | unassignment | deleted; the default it replaced restored | `/delete {GUID}`, `/default {old}` | no     |
//!
//! The agent records the entries it made (`<data dir>/boot-entries.json`, [`entries`]) and
//! changes no other: an image's second deployment re-points its entry instead of adding one,
//! and an entry whose image is unassigned goes. `reboot` boots the image once: if it does not
//! come up, the next power cycle returns to the entry that was the default, so a broken image
//! cannot take a remote lab down. `set-boot` changes the default, which takes effect whenever
//! the machine next restarts. The download code runs a backend only for `set-boot` and
//! `reboot`; given `stage`, `windows` changes nothing and `command` still runs, with
//! `BOOTTORRENT_ACTION=stage`. Every backend result, good or bad, becomes a [`BootOutcome`];
//! nothing here panics or propagates errors.
//!
//! Processes (the command, `bcdedit`, `shutdown`) are spawned without a shell, with a time
//! limit ([`process`]).

mod bcd;
mod entries;
#[cfg(test)]
mod fake_bcd;
mod process;
mod windows;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use boottorrent_proto::AfterDownload;

use crate::config::BootBackend;
use entries::RecordFile;
use process::{Exit, run_process};

/// How long the `command` backend's program may run before it is killed.
pub const COMMAND_TIME_LIMIT: Duration = Duration::from_secs(10 * 60);

/// How long one `bcdedit` or `shutdown` invocation may run before it is killed.
pub const WINDOWS_STEP_TIME_LIMIT: Duration = Duration::from_secs(2 * 60);

/// How much of a program's combined stdout and stderr is kept for the report, in bytes.
pub const OUTPUT_TAIL: usize = 4096;

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
    /// Keep a native VHD boot entry per image with `bcdedit`; only works on Windows.
    Windows {
        /// The record of the entries the agent made.
        record: RecordFile,
    },
}

impl Backend {
    /// The backend that the config's `boot_backend` names. `boot_command` is required for
    /// `command` and ignored otherwise, so that switching a machine to `none` for a while
    /// takes one edit. `windows` keeps the record of its boot entries in `data_dir`.
    pub fn from_config(
        kind: BootBackend,
        boot_command: Option<&Path>,
        data_dir: &Path,
    ) -> Result<Backend, BootError> {
        Ok(match kind {
            BootBackend::None => Backend::None,
            BootBackend::Windows => Backend::Windows {
                record: RecordFile::in_dir(data_dir),
            },
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
    /// The file to boot: the image's differencing child ([`crate::child`]), or the image
    /// itself when it is no VHDX.
    pub image_path: PathBuf,
    /// The golden image the child reads through, when `image_path` is a child.
    pub parent_path: Option<PathBuf>,
    /// The image's id in the catalog.
    pub image_id: String,
    /// The name the backend keeps its boot entry under: the image id, or for the second
    /// child of a `reset` image its own ([`crate::child::entries`]).
    pub entry: String,
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
        Backend::Windows { record } if cfg!(windows) => windows::run(req, record).await,
        Backend::Windows { .. } => BootOutcome::failed(NOT_WINDOWS),
    }
}

/// Why the `windows` backend did nothing.
const NOT_WINDOWS: &str = "the windows backend only runs on Windows";

/// Removes the boot entry the backend made for an image that is no longer assigned, and logs
/// what it did. Only `windows` makes entries; the other backends have nothing to remove.
pub async fn forget(backend: &Backend, image_id: &str) -> BootOutcome {
    let outcome = match backend {
        Backend::None | Backend::Command { .. } => {
            return BootOutcome::ok("no boot entries are kept by this backend");
        }
        Backend::Windows { record } if cfg!(windows) => windows::remove(image_id, record).await,
        Backend::Windows { .. } => BootOutcome::failed(NOT_WINDOWS),
    };
    if outcome.ok {
        tracing::info!(image = image_id, "boot entry: {}", outcome.message);
    } else {
        tracing::warn!(
            image = image_id,
            "removing the boot entry failed: {}",
            outcome.message
        );
    }
    outcome
}

/// Runs the configured program with the image described in its environment.
async fn run_command(program: &Path, req: &BootRequest, limit: Duration) -> BootOutcome {
    // The program's working directory is the agent's; an absolute path means the same to both.
    let image_path =
        std::path::absolute(&req.image_path).unwrap_or_else(|_| req.image_path.clone());
    let parent_path = req
        .parent_path
        .as_ref()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()));
    let mut env: Vec<(&str, &OsStr)> = vec![
        ("BOOTTORRENT_IMAGE_PATH", image_path.as_os_str()),
        ("BOOTTORRENT_IMAGE_ID", OsStr::new(&req.image_id)),
        ("BOOTTORRENT_IMAGE_NAME", OsStr::new(&req.image_name)),
        ("BOOTTORRENT_DEPLOYMENT_ID", OsStr::new(&req.deployment_id)),
        ("BOOTTORRENT_ACTION", OsStr::new(action_name(req.action))),
    ];
    if let Some(parent) = &parent_path {
        env.push(("BOOTTORRENT_PARENT_PATH", parent.as_os_str()));
    }
    let ran = run_process(program.as_os_str(), &[], &env, limit, OUTPUT_TAIL).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_backend_needs_a_program() {
        let e = Backend::from_config(BootBackend::Command, None, Path::new("data")).unwrap_err();
        assert!(e.to_string().contains("boot_command"), "{e}");
        assert!(
            Backend::from_config(BootBackend::Command, Some(Path::new("")), Path::new("data"))
                .is_err()
        );
        assert_eq!(
            Backend::from_config(
                BootBackend::Command,
                Some(Path::new("/usr/local/sbin/hook")),
                Path::new("data")
            )
            .unwrap(),
            Backend::Command {
                program: "/usr/local/sbin/hook".into()
            }
        );
        assert_eq!(
            Backend::from_config(BootBackend::None, Some(Path::new("/x")), Path::new("data"))
                .unwrap(),
            Backend::None
        );
        assert_eq!(
            Backend::from_config(BootBackend::Windows, None, Path::new("data")).unwrap(),
            Backend::Windows {
                record: RecordFile::in_dir(Path::new("data"))
            }
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

    fn request(action: AfterDownload) -> BootRequest {
        BootRequest {
            image_path: PathBuf::from("images/lab.vhdx"),
            parent_path: Some(PathBuf::from("images/golden.vhdx")),
            image_id: "img-1".into(),
            entry: "img-1".into(),
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
        let dir = tempfile::tempdir().unwrap();
        let backend = Backend::from_config(BootBackend::Windows, None, dir.path()).unwrap();
        let outcome = run(&backend, &request(AfterDownload::Reboot)).await;
        assert_eq!(outcome, BootOutcome::failed(NOT_WINDOWS));
        assert_eq!(
            forget(&backend, "img-1").await,
            BootOutcome::failed(NOT_WINDOWS)
        );
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
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
            req.image_path = dir.path().join("children/img-1.vhdx");
            req.parent_path = Some(dir.path().join("images/lab.vhdx"));
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
                    &format!(
                        "BOOTTORRENT_PARENT_PATH={}",
                        req.parent_path.as_ref().unwrap().display()
                    ),
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
            assert!(
                began.elapsed() < process::OUTPUT_GRACE,
                "{:?}",
                began.elapsed()
            );
        }
    }
}
