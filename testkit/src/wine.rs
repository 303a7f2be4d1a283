//! The Windows agent under Wine: a Wine prefix of a test's own (one "Windows machine"), the
//! agent built for Windows, and what Debian's Wine lacks to run it.
//!
//! Each [`Wine`] is a prefix in the test's temporary directory with its own `wineserver`, so
//! tests do not share a Windows, and dropping it kills every process of that prefix. Drives
//! are symlinks in `dosdevices`: [`Wine::with_drives`] gives a prefix a second fixed volume, which
//! is how a test shows a "machine that booted an image" the host volume of an earlier one.
//!
//! Wine cannot run `bcdedit` or boot a VHDX; tests under Wine cover what the agent does up to
//! the boot step.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::binary::{target_dir, windows_agent_binary};

/// MinGW's C compiler, which builds [`shim_dll`] (Debian `gcc-mingw-w64-x86-64`).
const MINGW_GCC: &str = "x86_64-w64-mingw32-gcc";

/// One Windows machine: a Wine prefix.
pub struct Wine {
    prefix: PathBuf,
}

impl Wine {
    /// A new prefix in `dir`, initialised (which takes Wine some seconds), with the agent's
    /// missing system DLL in its `system32`.
    pub fn new(dir: &Path) -> Wine {
        Wine::with_drives(dir, &[])
    }

    /// [`Wine::new`] with more fixed volumes: each letter backed by a host directory. Wine's
    /// mount manager reads them when the prefix starts, so they are made before that.
    pub fn with_drives(dir: &Path, drives: &[(char, &Path)]) -> Wine {
        let wine = Wine {
            prefix: dir.to_owned(),
        };
        std::fs::create_dir_all(dir).unwrap();
        wine.quietly(&["wineboot", "--init"]);
        // The prefix is made; its first wineserver ends with it. Services started under that
        // one would not be found by the next (Wine keeps two service managers apart).
        let _ = Command::new("wineserver")
            .arg("--wait")
            .env("WINEPREFIX", dir)
            .status();
        for (letter, target) in drives {
            let link = dir
                .join("dosdevices")
                .join(format!("{}:", letter.to_ascii_lowercase()));
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(target, &link).unwrap();
        }
        // A persistent wineserver: without one, Wine shuts the prefix's services down as soon
        // as the last ordinary program (`sc start`) exits, as if the machine were turned off.
        let status = Command::new("wineserver")
            .arg("--persistent")
            .env("WINEPREFIX", dir)
            .status()
            .unwrap_or_else(|e| {
                panic!("running wineserver: {e} (is Debian's wine installed? run scripts/test)")
            });
        assert!(
            status.success(),
            "wineserver --persistent for {} failed: {status}",
            dir.display()
        );
        // Its service manager and devices started now, their output in files: started by the
        // test's first `wine` program, they would hold that program's pipes open for ever.
        wine.quietly(&["cmd", "/c", "exit"]);
        let system32 = wine.c_drive().join("windows/system32");
        std::fs::copy(shim_dll(), system32.join("bcryptprimitives.dll")).unwrap();
        wine
    }

    /// `wine <command>`, its output in `wineboot.log` in the prefix.
    fn quietly(&self, command: &[&str]) {
        let log = self.prefix.join("wineboot.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let status = self
            .command(command[0])
            .args(&command[1..])
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .status()
            .unwrap_or_else(|e| {
                panic!("running wine: {e} (is Debian's wine installed? run scripts/test)")
            });
        assert!(
            status.success(),
            "wine {command:?} in {} failed ({status}): {}",
            self.prefix.display(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// The prefix's `C:` as a host directory.
    pub fn c_drive(&self) -> PathBuf {
        self.prefix.join("drive_c")
    }

    /// `program` (a Wine built-in like `net` or `sc`, or a host path to an `.exe`) run in this
    /// prefix, with Wine's own diagnostics off.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("wine");
        command
            .arg(program)
            .env("WINEPREFIX", &self.prefix)
            .env("WINEDEBUG", "-all")
            // No display here: Wine must not try to open one.
            .env_remove("DISPLAY");
        command
    }

    /// `boottorrent-agent.exe <args>` in this prefix, logging at `info`.
    pub fn agent(&self, args: &[&str]) -> Command {
        let mut command = self.command(windows_agent_binary());
        command.args(args).env("BOOTTORRENT_AGENT_LOG", "info");
        command
    }
}

impl Drop for Wine {
    fn drop(&mut self) {
        // Every process of the prefix, services included, and the server itself.
        let _ = Command::new("wineserver")
            .arg("-k")
            .env("WINEPREFIX", &self.prefix)
            .status();
    }
}

/// `bcryptprimitives.dll` built from `testkit/wine/bcryptprimitives.c`, once per test process.
pub fn shim_dll() -> PathBuf {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("wine/bcryptprimitives.c");
    let dll = target_dir().join("wine-shim/bcryptprimitives.dll");
    if !*built {
        std::fs::create_dir_all(dll.parent().unwrap()).unwrap();
        let out = Command::new(MINGW_GCC)
            .args(["-shared", "-O2", "-o"])
            .arg(&dll)
            .arg(&source)
            .arg("-ladvapi32")
            .output()
            .unwrap_or_else(|e| {
                panic!("running {MINGW_GCC}: {e} (Debian package gcc-mingw-w64-x86-64; run scripts/test)")
            });
        assert!(
            out.status.success(),
            "{MINGW_GCC} could not build {}: {}",
            dll.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        *built = true;
    }
    dll
}
