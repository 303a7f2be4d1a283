//! Our programs and the standard clients as child processes of a test.
//!
//! A [`Proc`] never outlives the test that started it: dropping it kills the process, so a
//! failing assertion leaves nothing running. When it is dropped because the test panicked, the
//! end of its log is printed first, where the test harness shows it with the failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use crate::PATIENCE;

/// How much of a process's log a failing test shows.
const LOG_LINES_ON_FAILURE: usize = 40;

/// A child process, killed when dropped.
pub struct Proc {
    child: Child,
    /// Set once the process has been reaped.
    status: Option<ExitStatus>,
    /// Where its stdout and stderr go; `None` when the test reads them from a pipe.
    log: Option<PathBuf>,
    /// The program, for messages.
    what: String,
}

/// Starts `command` with stdout and stderr both going to the file `log` (created anew).
pub fn spawn(mut command: Command, log: PathBuf) -> Proc {
    let file = std::fs::File::create(&log)
        .unwrap_or_else(|e| panic!("creating the log {}: {e}", log.display()));
    // One file description for both streams, so neither overwrites what the other wrote.
    let child = command
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
    Proc {
        child,
        status: None,
        log: Some(log),
        what: program_name(&command),
    }
}

/// Runs `command` to its end and fails the test, with everything it printed, unless it
/// succeeded.
pub fn output(mut command: Command) -> Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Sends SIGTERM to process `pid`; false if there is no such process any more.
pub fn sigterm(pid: u32) -> bool {
    signal(pid, libc::SIGTERM)
}

fn signal(pid: u32, signal: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) only sends a signal; a pid that is gone yields ESRCH, not harm.
    unsafe { libc::kill(pid, signal) == 0 }
}

impl Proc {
    /// Takes charge of a child the test started itself because it reads its output through a
    /// pipe (a `mosquitto_sub` it follows line by line): killed when dropped all the same.
    pub fn adopt(child: Child, what: impl Into<String>) -> Proc {
        Proc {
            child,
            status: None,
            log: None,
            what: what.into(),
        }
    }

    /// The file the process logs to, if it logs to one.
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// Everything the process has logged so far.
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|log| std::fs::read_to_string(log).ok())
            .unwrap_or_default()
    }

    /// The process id, to signal it or read its state from `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the process ended, or `None` while it runs.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.what));
        }
        self.status
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.exited().is_none()
    }

    /// Waits up to `timeout` for the process to end by itself.
    pub fn wait_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asks the process to stop (SIGTERM) and gives it `grace` to exit; past that it is killed
    /// (SIGKILL) and `None` says it did not stop when asked.
    pub fn terminate_within(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        sigterm(self.pid());
        let status = self.wait_within(grace);
        if status.is_none() {
            self.kill9();
        }
        status
    }

    /// SIGTERM, as a service manager stops a program, and its exit status; fails the test,
    /// with the log, if it has not exited after [`PATIENCE`].
    pub fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(PATIENCE).unwrap_or_else(|| {
            panic!(
                "{} did not exit within {PATIENCE:?} of SIGTERM:\n{}",
                self.what,
                self.log_text()
            )
        })
    }

    /// SIGKILL, as a power cut would: the process gets no chance to flush anything.
    pub fn kill9(&mut self) {
        if self.status.is_some() {
            return;
        }
        // The only error is that it already exited; then wait() reaps it.
        let _ = self.child.kill();
        self.status = Some(
            self.child
                .wait()
                .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.what)),
        );
    }

    fn show_log_tail(&self) {
        let Some(log) = &self.log else { return };
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_LINES_ON_FAILURE)..];
        eprintln!(
            "--- {} ({}), last {} of {} log lines ---\n{}",
            self.what,
            log.display(),
            tail.len(),
            lines.len(),
            tail.join("\n")
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.show_log_tail();
        }
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The program's file name, which says which of our binaries (or which tool) this is.
fn program_name(command: &Command) -> String {
    Path::new(command.get_program())
        .file_name()
        .unwrap_or(command.get_program())
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_that_ignores_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new("sh");
        command.args(["-c", "trap '' TERM; echo started; sleep 30"]);
        let mut proc = spawn(command, dir.path().join("stubborn.log"));
        crate::wait_for("the shell to start", || {
            proc.log_text().contains("started").then_some(())
        });
        let asked = Instant::now();
        assert_eq!(proc.terminate_within(Duration::from_millis(300)), None);
        assert!(asked.elapsed() < Duration::from_secs(10));
        assert!(!proc.running());
    }

    #[test]
    fn a_process_that_honours_sigterm_reports_its_exit() {
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new("sh");
        command.args([
            "-c",
            "trap 'exit 7' TERM; echo started; while :; do sleep 0.05; done",
        ]);
        let mut proc = spawn(command, dir.path().join("polite.log"));
        crate::wait_for("the shell to start", || {
            proc.log_text().contains("started").then_some(())
        });
        assert_eq!(proc.terminate().code(), Some(7));
        assert_eq!(proc.log_text(), "started\n");
    }

    #[test]
    fn dropping_a_process_kills_and_reaps_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new("sleep");
        command.arg("30");
        let proc = spawn(command, dir.path().join("sleeper.log"));
        let pid = proc.pid();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        drop(proc);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
