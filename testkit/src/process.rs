//! Our programs and the standard clients as child processes of a test.
//!
//! A [`Proc`] never outlives the test that started it: dropping it kills the process, so a
//! failing assertion leaves nothing running. When it is dropped because the test panicked, the
//! end of its log is printed first, where the test harness shows it with the failure.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
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

/// Starts `command` with stderr going to the file `log` (created anew) and stdout to a pipe,
/// returned for the test to read: a program that reports what it does as lines on stdout.
pub fn spawn_reading_stdout(mut command: Command, log: PathBuf) -> (Proc, ChildStdout) {
    let file = std::fs::File::create(&log)
        .unwrap_or_else(|e| panic!("creating the log {}: {e}", log.display()));
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
    let stdout = child.stdout.take().expect("stdout is piped");
    let proc = Proc {
        child,
        status: None,
        log: Some(log),
        what: program_name(&command),
    };
    (proc, stdout)
}

/// Runs `command` to its end with stdin empty and stdout and stderr captured, whether it
/// succeeds or not; fails the test, with everything it printed, if it still runs after
/// `timeout` (it is killed then).
pub fn run_within(mut command: Command, timeout: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
    // Both pipes are drained while it runs: a child that fills one would otherwise block
    // for ever and look like one that hangs.
    let stdout = drain(child.stdout.take().expect("stdout is piped"));
    let stderr = drain(child.stderr.take().expect("stderr is piped"));
    let mut proc = Proc::adopt(child, program_name(&command));
    let ended = proc.wait_within(timeout);
    if ended.is_none() {
        proc.kill9();
    }
    let output = Output {
        status: proc.exited().expect("reaped by wait_within or kill9"),
        stdout: stdout.join().expect("the stdout reader does not panic"),
        stderr: stderr.join().expect("the stderr reader does not panic"),
    };
    assert!(
        ended.is_some(),
        "{command:?} still ran after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Reads `pipe` to its end on a thread of its own.
fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        // A read error ends the output as an end of file would: what came so far is kept.
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
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

    /// The last `lines` lines of its log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
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

    /// Sends SIGTERM and returns at once, for a test that watches how the process stops;
    /// false if it has already exited.
    pub fn sigterm(&mut self) -> bool {
        self.send(libc::SIGTERM)
    }

    /// Stops the process (SIGSTOP) until [`Proc::thaw`]: a client that stops reading, whose
    /// socket buffers fill; false if it has already exited.
    pub fn freeze(&mut self) -> bool {
        self.send(libc::SIGSTOP)
    }

    /// Lets a frozen process run on (SIGCONT); false if it has already exited.
    pub fn thaw(&mut self) -> bool {
        self.send(libc::SIGCONT)
    }

    /// Sends SIGHUP, which daemons take as "reload your configuration"; false if it has
    /// already exited.
    pub fn sighup(&mut self) -> bool {
        self.send(libc::SIGHUP)
    }

    fn send(&mut self, which: libc::c_int) -> bool {
        // Only while not reaped: until then the pid cannot have been given to another process.
        self.running() && signal(self.pid(), which)
    }

    /// Asks the process to stop (SIGTERM) and gives it `grace` to exit; past that it is killed
    /// (SIGKILL) and `None` says it did not stop when asked.
    pub fn terminate_within(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        self.sigterm();
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
        let lines = self.log_text().lines().count();
        eprintln!(
            "--- {} ({}), last {} of {lines} log lines ---\n{}",
            self.what,
            log.display(),
            lines.min(LOG_LINES_ON_FAILURE),
            self.log_tail(LOG_LINES_ON_FAILURE)
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

    #[test]
    fn a_signal_reaches_a_running_process_and_not_an_exited_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new("sh");
        command.args([
            "-c",
            "trap 'echo reloaded; exit 0' HUP; echo started; while :; do sleep 0.05; done",
        ]);
        let mut proc = spawn(command, dir.path().join("daemon.log"));
        crate::wait_for("the shell to start", || {
            proc.log_text().contains("started").then_some(())
        });
        assert!(proc.sighup());
        assert!(proc.wait_within(PATIENCE).unwrap().success());
        assert_eq!(proc.log_tail(1), "reloaded");
        assert!(!proc.sighup());
        assert!(!proc.sigterm());
    }

    #[test]
    fn stdout_goes_to_the_test_and_stderr_to_the_log() {
        use std::io::{BufRead, BufReader};
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new("sh");
        command.args(["-c", "echo diagnostics >&2; echo report; sleep 30"]);
        let (mut proc, stdout) = spawn_reading_stdout(command, dir.path().join("reporter.log"));
        let first = BufReader::new(stdout).lines().next().unwrap().unwrap();
        assert_eq!(first, "report");
        crate::wait_for("stderr in the log", || {
            (proc.log_text() == "diagnostics\n").then_some(())
        });
        assert!(proc.running());
    }

    #[test]
    fn run_within_captures_all_of_both_streams_and_the_exit_status() {
        // More than a pipe holds, on both streams, so that neither may wait for the other.
        let mut command = Command::new("sh");
        command.args([
            "-c",
            "head -c 300000 /dev/zero | tr '\\0' o; head -c 300000 /dev/zero | tr '\\0' e >&2; exit 3",
        ]);
        let output = run_within(command, PATIENCE);
        assert_eq!(output.status.code(), Some(3));
        assert_eq!(output.stdout, vec![b'o'; 300000]);
        assert_eq!(output.stderr, vec![b'e'; 300000]);
    }

    #[test]
    #[should_panic(expected = "still ran after 300ms")]
    fn run_within_fails_the_test_when_the_command_outlives_its_timeout() {
        let mut command = Command::new("sleep");
        command.arg("30");
        run_within(command, Duration::from_millis(300));
    }
}
