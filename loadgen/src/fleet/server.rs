//! The server under load: started here as a `boottorrent serve` process when no `--server`
//! is given, and measured from `/proc/<pid>` (CPU time, resident memory) either way.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::fleet::api::Api;

/// A `boottorrent serve` this program started; killed when dropped.
pub struct Started {
    child: Child,
    pub http: String,
    pub mqtt: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

/// The server a run measures.
pub struct Target {
    pub api: Api,
    pub http: String,
    pub mqtt: String,
    pub enroll_token: String,
    /// Its process, when known, for `/proc`.
    pub pid: Option<u32>,
}

/// A running server named on the command line (`--server` and its companions), or how to
/// start one: the options every generator that measures a server shares.
#[derive(clap::Args, Clone, Debug)]
pub struct Given {
    /// Use this running server's HTTP API instead of starting one (then also give --mqtt,
    /// --admin-token and --enroll-token). It must have `auto_approve` on and be able to read
    /// files in --work-dir (the images deployed are made there).
    #[arg(long, requires_all = ["mqtt", "admin_token", "enroll_token"])]
    pub server: Option<String>,
    /// With --server: its MQTT listener, host:port.
    #[arg(long)]
    pub mqtt: Option<String>,
    /// With --server: the admin token (`<data-dir>/admin.token`).
    #[arg(long, env = "BOOTTORRENT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// With --server: the enrollment token (`<data-dir>/enroll.token`).
    #[arg(long, env = "BOOTTORRENT_ENROLL_TOKEN", hide_env_values = true)]
    pub enroll_token: Option<String>,
    /// With --server: its process id, to measure its CPU and memory from /proc (same host).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The `boottorrent` binary to start when no --server is given; by default the one next
    /// to this program (target/release/boottorrent after `cargo build --release`).
    #[arg(long, value_name = "PATH")]
    pub server_binary: Option<PathBuf>,
    /// Directory for the started server's data and log and for the images; by default a new
    /// one under the system's temp dir, removed afterwards unless the run failed.
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
}

/// One run of a load generator: its work dir, the server it measures, and the server it
/// started for that (stopped by [`Run::finish`]).
pub struct Run {
    pub work: PathBuf,
    made_work: bool,
    pub target: Target,
    started: Option<Started>,
}

impl Run {
    /// Makes the work dir (`--work-dir`, else a new one named `name`-<pid> in the temp dir)
    /// and reaches the server: the given one, else a new one started there that admits
    /// `enroll_per_minute` new machines.
    pub async fn prepare(given: Given, name: &str, enroll_per_minute: u32) -> anyhow::Result<Run> {
        let (work, made_work) = match given.work_dir {
            Some(dir) => (dir, false),
            None => (
                std::env::temp_dir().join(format!("{name}-{}", std::process::id())),
                true,
            ),
        };
        std::fs::create_dir_all(&work)
            .with_context(|| format!("creating the work dir {}", work.display()))?;
        if let Some(http) = given.server {
            let target = Target {
                api: Api::new(&http, given.admin_token.unwrap_or_default())?,
                http,
                mqtt: given.mqtt.unwrap_or_default(),
                enroll_token: given.enroll_token.unwrap_or_default(),
                pid: given.server_pid,
            };
            return Ok(Run {
                work,
                made_work,
                target,
                started: None,
            });
        }
        let binary = match given.server_binary {
            Some(path) => path,
            None => std::env::current_exe()
                .context("finding this program's path")?
                .with_file_name("boottorrent"),
        };
        let server = Started::start(&binary, &work, enroll_per_minute).await?;
        let target = Target {
            api: Api::new(&server.http, server.token("admin.token")?)?,
            http: server.http.clone(),
            mqtt: server.mqtt.clone(),
            enroll_token: server.token("enroll.token")?,
            pid: Some(server.pid()),
        };
        Ok(Run {
            work,
            made_work,
            target,
            started: Some(server),
        })
    }

    /// Runs the measurement until it ends or the user interrupts it (Ctrl-C, SIGTERM). An
    /// interrupted run is a failed one, so [`Run::finish`] still stops the server this run
    /// started and keeps its files: left to the signal's default, the process would end at
    /// once and leave that server running, its ports and files taken.
    pub async fn until_interrupted<R>(
        &self,
        work: impl std::future::Future<Output = anyhow::Result<R>>,
    ) -> anyhow::Result<R> {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("listening for SIGTERM")?;
        tokio::select! {
            result = work => result,
            _ = tokio::signal::ctrl_c() => bail!("interrupted (SIGINT, Ctrl-C)"),
            _ = terminate.recv() => bail!("interrupted (SIGTERM)"),
        }
    }

    /// Stops the server it started, prints the report (JSON with `json`), and removes a work
    /// dir it made, unless the run failed: then its files stay for a look.
    pub async fn finish<R>(self, result: anyhow::Result<R>, json: bool) -> anyhow::Result<()>
    where
        R: serde::Serialize + std::fmt::Display,
    {
        if let Some(server) = self.started {
            if let Err(e) = server.stop().await {
                eprintln!("warning: {e:#}");
            }
        }
        let report = result.with_context(|| {
            format!(
                "the run failed; its files (the server's data, its log server.log, the \
                 images) stay in {}",
                self.work.display()
            )
        })?;
        if json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{report}");
        }
        if self.made_work {
            let _ = std::fs::remove_dir_all(&self.work);
        }
        Ok(())
    }
}

/// How long a fresh server may take to answer `/healthz`.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long a stopped server may take to exit before it is killed.
const EXIT_WITHIN: Duration = Duration::from_secs(10);

impl Started {
    /// Starts `binary serve` on free loopback ports with a new data dir in `work` (embedded
    /// defaults otherwise, but `auto_approve` on and `enroll_per_minute` as given), logging to
    /// `work/server.log`, and waits until `/healthz` answers.
    pub async fn start(
        binary: &Path,
        work: &Path,
        enroll_per_minute: u32,
    ) -> anyhow::Result<Started> {
        let data_dir = work.join("data");
        let log = work.join("server.log");
        let [http, mqtt, bt] = [free_port()?, free_port()?, free_port()?];
        let out = std::fs::File::create(&log)
            .with_context(|| format!("creating the server log {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("opening the server log {} twice", log.display()))?;
        let child = Command::new(binary)
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--mqtt-listen", &format!("127.0.0.1:{mqtt}")])
            .args(["--http-listen", &format!("127.0.0.1:{http}")])
            .args(["--bt-listen", &format!("127.0.0.1:{bt}")])
            .args(["--auto-approve", "true"])
            .args(["--enroll-per-minute", &enroll_per_minute.to_string()])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} serve (build it with `cargo build --release -p boottorrent`, or \
                     give its path with --server-binary)",
                    binary.display()
                )
            })?;
        let mut started = Started {
            child,
            http: format!("http://127.0.0.1:{http}"),
            mqtt: format!("127.0.0.1:{mqtt}"),
            data_dir,
            log,
        };
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        loop {
            if let Some(status) = started.child.try_wait().context("waiting for the server")? {
                bail!(
                    "the server exited with {status} before it was ready; its log is {}",
                    started.log.display()
                );
            }
            let health = client.get(format!("{}/healthz", started.http)).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return Ok(started);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the server did not answer /healthz within {} s; its log is {}",
                    READY_WITHIN.as_secs(),
                    started.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A token the server wrote into its data dir on first start.
    pub fn token(&self, file: &str) -> anyhow::Result<String> {
        let path = self.data_dir.join(file);
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading the server's {}", path.display()))?
            .trim()
            .to_owned())
    }

    /// SIGTERM, as a service manager stops it; SIGKILL if it has not exited in time.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("the server's pid")?;
        // SAFETY: kill() with a pid of a child we have not reaped yet, and a valid signal.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = tokio::time::Instant::now() + EXIT_WITHIN;
        while tokio::time::Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "the server had not exited {} s after SIGTERM; killed it (its log is {})",
            EXIT_WITHIN.as_secs(),
            self.log.display()
        )
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loopback port free now. The server binds it a moment later, before any simulated
/// agent opens a connection that could take it as its local port.
fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).context("finding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// A process's use of the machine at one moment, from `/proc`.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// User plus system CPU time so far, seconds.
    pub cpu_secs: f64,
    /// Resident memory now and at its peak, MiB.
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
}

impl Usage {
    /// The usage of process `pid` (`"self"` for this one).
    pub fn of(pid: &str) -> anyhow::Result<Usage> {
        let stat_path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&stat_path)
            .with_context(|| format!("reading {stat_path}: is the process running?"))?;
        // The command name (field 2) is in parentheses and may hold spaces; fields 14 and 15
        // (utime, stime) are the 12th and 13th after it.
        let after_name = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .with_context(|| format!("{stat_path} has no command name"))?;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |i: usize| -> anyhow::Result<u64> {
            fields
                .get(i)
                .and_then(|f| f.parse().ok())
                .with_context(|| format!("{stat_path}: field {} is not a number", i + 3))
        };
        // SAFETY: sysconf only reads a constant.
        let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cpu_secs = (ticks(11)? + ticks(12)?) as f64 / per_sec;
        let status_path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&status_path)
            .with_context(|| format!("reading {status_path}"))?;
        let kib = |key: &str| -> anyhow::Result<f64> {
            status
                .lines()
                .find_map(|l| {
                    l.strip_prefix(key)?
                        .trim()
                        .strip_suffix("kB")?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .with_context(|| format!("{status_path} has no {key} line"))
        };
        Ok(Usage {
            cpu_secs,
            rss_mib: kib("VmRSS:")? / 1024.0,
            peak_rss_mib: kib("VmHWM:")? / 1024.0,
        })
    }
}

/// The soft limit on open files of process `pid` (`"self"` for this one), from
/// `/proc/<pid>/limits`.
pub fn open_file_limit(pid: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("Max open files")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}
