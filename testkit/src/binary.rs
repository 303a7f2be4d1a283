//! Where our binaries are.
//!
//! A test has its own package's binaries from cargo (`env!("CARGO_BIN_EXE_<name>")`). The
//! other package's binary is no dependency of it (the agent must not depend on the server, and
//! the server's tests do not depend on the agent), so cargo builds it for that test only when
//! the whole workspace is built. It is taken from the target dir the running test was built
//! into, and built there once per test process with `cargo build -p` when it is missing or
//! older than a source file cargo recorded for it: a test never runs a stale build of the
//! other side without saying so.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

/// `boottorrent`, the server appliance and operator CLI.
pub fn server_binary() -> PathBuf {
    workspace_binary("boottorrent", "boottorrent")
}

/// `boottorrent-loadgen`, the simulated fleet.
pub fn loadgen_binary() -> PathBuf {
    workspace_binary("boottorrent-loadgen", "boottorrent-loadgen")
}

/// `boottorrent-agent`.
pub fn agent_binary() -> PathBuf {
    workspace_binary("boottorrent-agent", "boottorrent-agent")
}

/// `boottorrent-agent.exe` for 64-bit Windows ([`WINDOWS_TARGET`]), built like the others: what
/// the Wine tests run.
pub fn windows_agent_binary() -> PathBuf {
    cross_binary(
        "boottorrent-agent",
        "boottorrent-agent",
        WINDOWS_TARGET,
        "boottorrent-agent.exe",
    )
}

/// The target triple of the Windows agent: MinGW, which this machine can link without MSVC.
pub const WINDOWS_TARGET: &str = "x86_64-pc-windows-gnu";

/// The workspace's target dir (what `CARGO_TARGET_DIR` or the default made it for this build),
/// where tests keep artifacts worth looking at afterwards.
pub fn target_dir() -> PathBuf {
    profile_dir()
        .parent()
        .expect("the profile dir is inside the target dir")
        .to_owned()
}

/// `target/<profile>`: the running test is `target/<profile>/deps/<test>-<hash>`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} is not inside a cargo target dir", exe.display()))
        .to_owned()
}

/// Binary `name` of workspace package `package`, built if missing or stale.
pub fn workspace_binary(package: &str, name: &str) -> PathBuf {
    let profile = profile_dir();
    checked_build(
        package,
        name,
        None,
        &profile,
        &profile.join(name),
        &profile.join(format!("{name}.d")),
    )
}

/// Binary `name` of `package` built for `target` (`target/<target>/<profile>/<file>`).
fn cross_binary(package: &str, name: &str, target: &str, file: &str) -> PathBuf {
    let profile = profile_dir();
    let dir = target_dir()
        .join(target)
        .join(profile.file_name().expect("a profile name"));
    let stem = Path::new(file)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(name);
    checked_build(
        package,
        name,
        Some(target),
        &profile,
        &dir.join(file),
        &dir.join(format!("{stem}.d")),
    )
}

/// `path`, built first (once per test process) if missing or older than its sources.
fn checked_build(
    package: &str,
    name: &str,
    target: Option<&str>,
    profile: &Path,
    path: &Path,
    dep_info: &Path,
) -> PathBuf {
    // Tests run on many threads: one build, and the others wait for it.
    static CHECKED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if checked.iter().any(|p| p == path) {
        return path.to_owned();
    }
    if let Some(why) = why_build(path, dep_info) {
        build(package, name, target, profile, &why);
        assert!(
            path.exists(),
            "`cargo build -p {package}` left no {}",
            path.display()
        );
    }
    checked.push(path.to_owned());
    path.to_owned()
}

/// Why `binary` must be built first, or `None` if it is there and newer than every source
/// file its dep-info (`dep_info`, written by cargo next to it) lists.
fn why_build(binary: &Path, dep_info: &Path) -> Option<String> {
    let Some(built) = modified(binary) else {
        return Some(format!("{} is missing", binary.display()));
    };
    let Ok(deps) = std::fs::read_to_string(dep_info) else {
        return Some(format!(
            "{} has no dep-info ({}) to tell whether it is current",
            binary.display(),
            dep_info.display()
        ));
    };
    dep_info_sources(&deps)
        .into_iter()
        .find(|source| modified(Path::new(source)).is_some_and(|m| m > built))
        .map(|newer| format!("{} is older than {newer}", binary.display()))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The source files of a Makefile-style dep-info file (`target: source source ...`, a space
/// inside a path escaped with a backslash).
fn dep_info_sources(text: &str) -> Vec<String> {
    let mut sources = Vec::new();
    for line in text.lines() {
        let Some((_, list)) = line.split_once(": ") else {
            continue;
        };
        let mut current = String::new();
        let mut chars = list.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => current.extend(chars.next()),
                ' ' => sources.extend((!current.is_empty()).then(|| std::mem::take(&mut current))),
                c => current.push(c),
            }
        }
        sources.extend((!current.is_empty()).then_some(current));
    }
    sources
}

/// `cargo build -p package --bin name` into the target dir and profile of the running test,
/// for `target` when given.
fn build(package: &str, name: &str, target: Option<&str>, profile: &Path, why: &str) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut command = Command::new(cargo);
    command
        .args(["build", "-p", package, "--bin", name, "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(
            profile
                .parent()
                .expect("the profile dir is inside the target dir"),
        );
    if let Some(target) = target {
        command.args(["--target", target]);
    }
    match profile.file_name().and_then(|p| p.to_str()) {
        Some("debug") => {}
        Some("release") => {
            command.arg("--release");
        }
        Some(other) => {
            command.args(["--profile", other]);
        }
        None => {}
    }
    // Straight to stderr, past the test harness's capture: cargo's own output (inherited)
    // shows, and this says why it is there.
    let _ = writeln!(
        std::io::stderr(),
        "testkit: {why}; building it once for this test: {command:?}"
    );
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("running {command:?} to build {name}: {e}"));
    assert!(
        status.success(),
        "{command:?} failed ({status}): {name} is needed by this test and could not be built"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dep_info_lists_sources_with_escaped_spaces() {
        let text =
            "/t/debug/agent: /w/agent/src/main.rs /w/my\\ dir/lib.rs\n\n/w/agent/src/main.rs:\n";
        assert_eq!(
            dep_info_sources(text),
            ["/w/agent/src/main.rs", "/w/my dir/lib.rs"]
        );
    }

    #[test]
    fn a_binary_older_than_a_source_is_built_and_a_newer_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("prog");
        let source = dir.path().join("main.rs");
        let dep_info = dir.path().join("prog.d");
        assert!(why_build(&binary, &dep_info).unwrap().contains("missing"));
        std::fs::write(&source, "fn main() {}").unwrap();
        std::fs::write(&binary, "").unwrap();
        assert!(
            why_build(&binary, &dep_info)
                .unwrap()
                .contains("no dep-info")
        );
        std::fs::write(
            &dep_info,
            format!("{}: {}\n", binary.display(), source.display()),
        )
        .unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&source)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(
            why_build(&binary, &dep_info)
                .unwrap()
                .contains("older than")
        );
        std::fs::File::options()
            .write(true)
            .open(&binary)
            .unwrap()
            .set_modified(later + std::time::Duration::from_secs(1))
            .unwrap();
        assert_eq!(why_build(&binary, &dep_info), None);
    }
}
