//! The agent as a Windows service: `service install`, `service uninstall`, and the entry point
//! that the service control manager starts.
//!
//! `install` registers `boottorrent-agent.exe service run --config <file>` as an automatically
//! started service running as LocalSystem (it needs `bcdedit` and `shutdown`), restarted 5 s
//! after a failure, like the systemd unit's `Restart=always`. It does not start the service:
//! in a golden image the machine key must be made on each machine's first boot, not once in
//! the image that every machine is cloned from.
//!
//! `run_service` hands the calling thread to the service dispatcher, which calls back on a
//! thread of its own; the agent's main loop runs there, and a stop or shutdown request from
//! Windows reaches it as a [`StopSignal`]. Elsewhere every function here returns an error that
//! points at the systemd unit.

use std::path::Path;

/// The service's name for the service control manager (`sc query BootTorrentAgent`).
pub const SERVICE_NAME: &str = "BootTorrentAgent";

/// The service's log: `agent.log` next to its configuration file.
pub fn log_file(config_path: &Path) -> std::path::PathBuf {
    config_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join("agent.log")
}

/// Size past which the service's log is moved to `agent.log.1` when the service starts, so
/// that a machine running for a term keeps two bounded files.
const LOG_ROTATE_BYTES: u64 = 16 << 20;

/// Opens the service's log for appending, after moving a large one aside.
pub fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        std::fs::rename(path, old)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Fires (or is dropped) when Windows asks the service to stop: `sc stop`, or system shutdown.
pub type StopSignal = tokio::sync::oneshot::Receiver<()>;

#[cfg(windows)]
pub use windows::{install, run_service, uninstall};

#[cfg(not(windows))]
pub use elsewhere::{install, run_service, uninstall};

#[cfg(not(windows))]
mod elsewhere {
    use super::*;

    fn not_here() -> anyhow::Error {
        anyhow::anyhow!(
            "the agent runs as a Windows service only on Windows; on Linux install the systemd \
             unit assets/boottorrent-agent.service as /etc/systemd/system/boottorrent-agent.service \
             and run `systemctl enable boottorrent-agent`"
        )
    }

    /// Registers the Windows service; only on Windows.
    pub fn install(_config_path: &Path) -> anyhow::Result<()> {
        Err(not_here())
    }

    /// Removes the Windows service; only on Windows.
    pub fn uninstall() -> anyhow::Result<()> {
        Err(not_here())
    }

    /// Runs the agent under the service control manager; only on Windows.
    pub fn run_service(
        _agent: impl FnOnce(StopSignal) -> anyhow::Result<()> + Send + 'static,
    ) -> anyhow::Result<()> {
        Err(not_here())
    }
}

#[cfg(windows)]
mod windows {
    use std::ffi::OsString;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail};
    use windows_service::service::{
        ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
        ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod,
        ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
    };
    use windows_service::service_control_handler::{
        self, ServiceControlHandlerResult, ServiceStatusHandle,
    };
    use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
    use windows_service::{define_windows_service, service_dispatcher};

    use super::*;

    // Win32 error codes (winerror.h) that deserve their own message.
    const ERROR_SERVICE_DOES_NOT_EXIST: i32 = 1060;
    const ERROR_FAILED_SERVICE_CONTROLLER_CONNECT: i32 = 1063;
    const ERROR_SERVICE_EXISTS: i32 = 1073;
    /// A `ChangeServiceConfig2` information level this service manager does not implement
    /// (Wine's cannot set failure actions).
    const ERROR_INVALID_LEVEL: i32 = 124;

    /// The arguments before `--config <file>` on the service's command line; the CLI routes
    /// them to [`run_service`].
    const SERVICE_RUN_ARGS: [&str; 2] = ["service", "run"];
    const DISPLAY_NAME: &str = "BootTorrent Agent";
    const DESCRIPTION: &str = "Downloads boot images peer-to-peer from the BootTorrent server \
                               and its peers, reports to the server, switches the boot entry.";
    /// How long the service manager should wait for the agent to stop before giving up on it.
    const STOP_WAIT_HINT: Duration = Duration::from_secs(30);

    type AgentMain = Box<dyn FnOnce(StopSignal) -> anyhow::Result<()> + Send>;

    // The dispatcher calls `service_main` with nothing but the start arguments, so the agent
    // and its result travel through statics. One service per process: each is used once.
    static AGENT: Mutex<Option<AgentMain>> = Mutex::new(None);
    static RESULT: Mutex<Option<anyhow::Result<()>>> = Mutex::new(None);
    // Set once the control handler is registered, read by the handler to report StopPending.
    static STATUS: Mutex<Option<ServiceStatusHandle>> = Mutex::new(None);

    define_windows_service!(ffi_service_main, service_main);

    fn winapi_code(e: &windows_service::Error) -> Option<i32> {
        match e {
            windows_service::Error::Winapi(io) => io.raw_os_error(),
            _ => None,
        }
    }

    fn manager(access: ServiceManagerAccess) -> anyhow::Result<ServiceManager> {
        ServiceManager::local_computer(None::<&str>, access)
            .context("connecting to the service control manager (run this as Administrator)")
    }

    /// Registers the agent as an automatically started service that reads `config_path`.
    pub fn install(config_path: &Path) -> anyhow::Result<()> {
        let config = std::path::absolute(config_path)
            .with_context(|| format!("resolving {}", config_path.display()))?;
        if !config.is_file() {
            bail!(
                "the config file {} does not exist; write it before installing the service",
                config.display()
            );
        }
        let executable = std::env::current_exe().context("finding this program's own path")?;
        let mut launch_arguments: Vec<OsString> =
            SERVICE_RUN_ARGS.iter().map(OsString::from).collect();
        launch_arguments.push("--config".into());
        launch_arguments.push(config.into_os_string());
        let info = ServiceInfo {
            name: SERVICE_NAME.into(),
            display_name: DISPLAY_NAME.into(),
            service_type: ServiceType::OWN_PROCESS,
            start_type: ServiceStartType::AutoStart,
            error_control: ServiceErrorControl::Normal,
            executable_path: executable,
            launch_arguments,
            dependencies: vec![],
            account_name: None, // LocalSystem: bcdedit and shutdown need it
            account_password: None,
        };
        let manager =
            manager(ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE)?;
        let service = match manager.create_service(&info, ServiceAccess::CHANGE_CONFIG) {
            Ok(service) => service,
            Err(e) if winapi_code(&e) == Some(ERROR_SERVICE_EXISTS) => bail!(
                "the service {SERVICE_NAME} is already installed; \
                 run `boottorrent-agent service uninstall` first"
            ),
            Err(e) => {
                return Err(e).with_context(|| format!("creating the service {SERVICE_NAME}"));
            }
        };
        service
            .set_description(DESCRIPTION)
            .context("setting the service description")?;
        let restart = ServiceAction {
            action_type: ServiceActionType::Restart,
            delay: Duration::from_secs(5),
        };
        // Restarting is what keeps a lab machine reporting, but a service manager that cannot
        // record it (Wine's) should not stop the install: say so and go on without it.
        let optional = |result: windows_service::Result<()>, what: &str| match result {
            Ok(()) => Ok(()),
            Err(e) if winapi_code(&e) == Some(ERROR_INVALID_LEVEL) => {
                tracing::warn!(
                    "this service manager cannot record {what} ({e}); the service is installed \
                     without it and is not restarted after a failure"
                );
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("setting {what}")),
        };
        optional(
            service.update_failure_actions(ServiceFailureActions {
                reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(24 * 3600)),
                reboot_msg: None,
                command: None,
                actions: Some(vec![restart.clone(), restart.clone(), restart]),
            }),
            "the service's restart-on-failure actions",
        )?;
        // An agent that exits with an error (not only one that crashes) is restarted too.
        optional(
            service.set_failure_actions_on_non_crash_failures(true),
            "restarts after non-crash failures",
        )?;
        Ok(())
    }

    /// Stops the service if it runs, and removes it.
    pub fn uninstall() -> anyhow::Result<()> {
        let manager = manager(ServiceManagerAccess::CONNECT)?;
        let access = ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE;
        let service = match manager.open_service(SERVICE_NAME, access) {
            Ok(service) => service,
            Err(e) if winapi_code(&e) == Some(ERROR_SERVICE_DOES_NOT_EXIST) => {
                bail!("the service {SERVICE_NAME} is not installed")
            }
            Err(e) => return Err(e).with_context(|| format!("opening the service {SERVICE_NAME}")),
        };
        // Deletion takes effect once the service has stopped and every handle is closed.
        service
            .delete()
            .with_context(|| format!("deleting the service {SERVICE_NAME}"))?;
        let status = service
            .query_status()
            .with_context(|| format!("querying the service {SERVICE_NAME}"))?;
        if status.current_state != ServiceState::Stopped {
            service
                .stop()
                .with_context(|| format!("stopping the service {SERVICE_NAME}"))?;
            let deadline = Instant::now() + STOP_WAIT_HINT;
            while service.query_status().map(|s| s.current_state)? != ServiceState::Stopped {
                if Instant::now() > deadline {
                    bail!(
                        "the service {SERVICE_NAME} did not stop within {} s; it is removed \
                         when it stops or at the next restart",
                        STOP_WAIT_HINT.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        Ok(())
    }

    /// Runs `agent` as the service. Blocks until the service has stopped; returns the agent's
    /// own result. Fails at once when the process was not started by the service manager.
    pub fn run_service(
        agent: impl FnOnce(StopSignal) -> anyhow::Result<()> + Send + 'static,
    ) -> anyhow::Result<()> {
        *AGENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(agent));
        match service_dispatcher::start(SERVICE_NAME, ffi_service_main) {
            Ok(()) => {}
            Err(e) if winapi_code(&e) == Some(ERROR_FAILED_SERVICE_CONTROLLER_CONNECT) => bail!(
                "`service run` is for the service control manager; run `boottorrent-agent run` \
                 to start the agent in a console"
            ),
            Err(e) => return Err(e).context("starting the service dispatcher"),
        }
        RESULT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| {
                Err(anyhow::anyhow!(
                    "the service manager never started the service"
                ))
            })
    }

    fn service_main(_arguments: Vec<OsString>) {
        let result = serve();
        // A non-zero exit code is what makes Windows apply the restart-on-failure actions.
        let exit_code = match &result {
            Ok(()) => ServiceExitCode::NO_ERROR,
            Err(_) => ServiceExitCode::ServiceSpecific(1),
        };
        // The result is kept before `Stopped` is reported: the dispatcher may return (and
        // `run_service` read it) as soon as the service manager hears that.
        *RESULT.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        if let Some(handle) = *STATUS.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = handle.set_service_status(status(ServiceState::Stopped, exit_code));
        }
    }

    fn status(state: ServiceState, exit_code: ServiceExitCode) -> ServiceStatus {
        ServiceStatus {
            service_type: ServiceType::OWN_PROCESS,
            current_state: state,
            controls_accepted: if state == ServiceState::Running {
                ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
            } else {
                ServiceControlAccept::empty()
            },
            exit_code,
            checkpoint: 0,
            wait_hint: if state == ServiceState::StopPending {
                STOP_WAIT_HINT
            } else {
                Duration::ZERO
            },
            process_id: None,
        }
    }

    fn serve() -> anyhow::Result<()> {
        let agent = AGENT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .context("the service was started twice in one process")?;
        let (stop, stop_signal) = tokio::sync::oneshot::channel();
        let stop = Mutex::new(Some(stop));
        let handler = move |control| match control {
            ServiceControl::Stop | ServiceControl::Shutdown => {
                if let Some(handle) = *STATUS.lock().unwrap_or_else(|e| e.into_inner()) {
                    let _ = handle.set_service_status(status(
                        ServiceState::StopPending,
                        ServiceExitCode::NO_ERROR,
                    ));
                }
                if let Some(stop) = stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = stop.send(());
                }
                ServiceControlHandlerResult::NoError
            }
            ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
            _ => ServiceControlHandlerResult::NotImplemented,
        };
        let handle = service_control_handler::register(SERVICE_NAME, handler)
            .context("registering the service control handler")?;
        *STATUS.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        handle
            .set_service_status(status(ServiceState::Running, ServiceExitCode::NO_ERROR))
            .context("reporting the service as running")?;
        agent(stop_signal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_log_is_moved_aside_at_start_and_a_small_one_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("agent.log");
        let old = dir.path().join("agent.log.1");
        std::fs::write(&log, b"yesterday\n").unwrap();
        std::io::Write::write_all(&mut open_log(&log).unwrap(), b"today\n").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"yesterday\ntoday\n");
        assert!(!old.exists());
        // Past the limit, the log replaces the older one aside and starts anew.
        std::fs::write(&old, b"last month").unwrap();
        std::fs::write(&log, vec![b'x'; LOG_ROTATE_BYTES as usize + 1]).unwrap();
        std::io::Write::write_all(&mut open_log(&log).unwrap(), b"fresh\n").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"fresh\n");
        assert_eq!(std::fs::metadata(&old).unwrap().len(), LOG_ROTATE_BYTES + 1);
    }
}
