//! Running a program as the boot backends do: without a shell, with a time limit, stdout and
//! stderr read concurrently into one buffer that keeps the last bytes, so a chatty program
//! cannot fill the agent's memory and a hanging one cannot hold the agent.

use std::ffi::OsStr;
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// How long to keep reading output after a program exits or is killed. A program that leaves
/// a background child holding its stdout would otherwise keep us waiting for end-of-file.
pub(super) const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// How a process run ended.
#[derive(Debug)]
pub(super) enum Exit {
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
    pub(super) fn describe_failure(&self, what: &str, output: &str) -> String {
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
pub(super) struct Ran {
    pub(super) exit: Exit,
    /// The last `keep` bytes of stdout and stderr as they arrived, trimmed; `...` in front
    /// when earlier bytes were dropped.
    pub(super) output: String,
    /// Whether earlier output was dropped: a query whose answer is cut cannot be trusted.
    pub(super) truncated: bool,
}

/// Runs `program` with `args` and extra `env`, stdin closed, killed after `limit`, keeping
/// the last `keep` bytes of its output.
pub(super) async fn run_process(
    program: &OsStr,
    args: &[String],
    env: &[(&str, &OsStr)],
    limit: Duration,
    keep: usize,
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
                truncated: false,
            };
        }
    };
    let tail = Mutex::new(Tail::new(keep));
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
    let tail = tail.into_inner().unwrap_or_else(|e| e.into_inner());
    let truncated = tail.dropped || tail.bytes.len() > tail.keep;
    let output = tail.text();
    Ran {
        exit,
        output,
        truncated,
    }
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

/// The last `keep` bytes written to it.
struct Tail {
    keep: usize,
    bytes: Vec<u8>,
    dropped: bool,
}

impl Tail {
    fn new(keep: usize) -> Tail {
        Tail {
            keep,
            bytes: Vec::new(),
            dropped: false,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        // Trimmed in batches, not on every push, to keep this linear.
        if self.bytes.len() > 2 * self.keep {
            self.bytes.drain(..self.bytes.len() - self.keep);
            self.dropped = true;
        }
    }

    fn text(mut self) -> String {
        if self.bytes.len() > self.keep {
            self.bytes.drain(..self.bytes.len() - self.keep);
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
    use super::super::OUTPUT_TAIL;
    use super::*;

    #[test]
    fn the_output_tail_keeps_the_end() {
        let mut tail = Tail::new(OUTPUT_TAIL);
        for i in 0..1000 {
            tail.push(format!("line {i}\n").as_bytes());
        }
        let text = tail.text();
        assert!(
            text.starts_with("...") && text.ends_with("line 999"),
            "{text}"
        );
        assert!(text.len() <= OUTPUT_TAIL + 3);
        let mut short = Tail::new(OUTPUT_TAIL);
        short.push(b"  hello\n");
        assert_eq!(short.text(), "hello");
    }
}
