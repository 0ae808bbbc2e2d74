//! The debug guest kernel (`--kernel 6.12-debug`): Debian's `linux-source-<series>` configured
//! from `x86_64_defconfig` plus `qemu-scripts/debug-kernel.config` (lockdep, atomic-sleep
//! checks, debug objects, hung tasks, list/SG/DMA-API checks, and what the lab's VMs need) and
//! built by `qemu-scripts/debug-kernel.sh`, chrooted into the trixie root with its gcc.
//!
//! ```text
//! provision.sh (the trixie root) ─► debug-kernel.sh --series S --variant V
//!     build deps + linux-source-S via apt in the root ─► defconfig + fragment, checked
//!     ─► nice -n 19 make -j2 bzImage modules (once per input hash; lock; progress lines)
//!     ─► $CACHE/trixie-root/usr/src/pcisim-kernel/S-V-<hash>/tree
//! ─► the tree as a --kernel-tree inside the root: guest/tree-<hash> (modules_install chrooted),
//!    our guest modules built against it chrooted (same compiler as the tree)
//! ```
//!
//! The script prints `PCISIM_DEBUG_*` lines on stdout; its `[debug-kernel] ...` progress lines
//! (one a minute while `make` runs) are shown as they come, and everything it says goes to the
//! run's provision log. A cached build is found without the network in well under a second.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use log::{debug, warn};

use super::KernelError;
use crate::vm::process::{describe_status, ChildGuard, Group, ProcessError};

/// The variants `--kernel SERIES-VARIANT` accepts: `debug` (`debug-kernel.config`).
pub const VARIANTS: &[&str] = &["debug"];

/// How long a build may take. The cold build is ~20 min on an idle 2-core machine (docs/lab.md,
/// "The debug kernel"); `nice -n 19` makes it yield to everything else, so a busy machine
/// stretches it a lot.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(4 * 3600);

/// The prefix of the script's progress lines.
const PROGRESS: &str = "[debug-kernel]";

/// A built debug kernel tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebugBuild {
    /// The built tree, as a host path (inside the trixie root).
    pub tree: PathBuf,
    /// The same tree as seen chrooted into the root.
    pub tree_in_root: PathBuf,
    /// Its release (`6.12.117-pcisim-debug`).
    pub kver: String,
    /// What it was built from (`linux-source-6.12 6.12.117-1, x86_64_defconfig + ...`).
    pub source: String,
    /// Seconds this call spent building (0: it was cached).
    pub build_secs: u64,
}

/// Parses the `PCISIM_DEBUG_*` lines of `debug-kernel.sh`.
pub fn parse_output(stdout: &str) -> Result<DebugBuild, String> {
    let get = |key: &str| -> Result<String, String> {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .map(str::to_string)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("it printed no {key} line"))
    };
    let secs = get("PCISIM_DEBUG_BUILD_SECS")?;
    Ok(DebugBuild {
        tree: get("PCISIM_DEBUG_TREE")?.into(),
        tree_in_root: get("PCISIM_DEBUG_TREE_ROOT")?.into(),
        kver: get("PCISIM_DEBUG_KVER")?,
        source: get("PCISIM_DEBUG_SOURCE")?,
        build_secs: secs
            .parse()
            .map_err(|_| format!("PCISIM_DEBUG_BUILD_SECS={secs:?} is not a number"))?,
    })
}

/// The last `error:` line of the script's log (what to tell the user), if any.
fn last_error(log_text: &str) -> Option<String> {
    log_text
        .lines()
        .rev()
        .find(|l| l.starts_with(PROGRESS) && l.contains(" error: "))
        .map(|l| l.trim_start_matches(PROGRESS).trim().to_string())
}

/// Builds (or finds cached) the `series`-`variant` debug kernel with `scripts/debug-kernel.sh`.
/// Its progress lines are shown on stderr as they come; all it says is appended to `log`.
pub fn build(
    scripts: &Path,
    series: &str,
    variant: &str,
    log: &Path,
) -> Result<DebugBuild, KernelError> {
    let name = format!("{series}-{variant}");
    let script = scripts.join("debug-kernel.sh");
    let fail = |status: String, reason: String| KernelError::DebugBuild {
        name: name.clone(),
        status,
        reason,
        log: log.to_path_buf(),
    };
    if !script.is_file() {
        return Err(fail(
            "not run".into(),
            format!("{} is missing", script.display()),
        ));
    }
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .args(["--series", series, "--variant", variant])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own process group: a timeout or an interrupt stops make and the compilers too.
    let mut guard = ChildGuard::spawn("debug-kernel.sh", &mut cmd, Group::Own)
        .map_err(|e| fail("not run".into(), e.to_string()))?;
    let stdout = guard.child_mut().stdout.take();
    let stderr = guard.child_mut().stderr.take();
    let out_thread = thread::spawn(move || {
        let mut buf = String::new();
        if let Some(mut s) = stdout {
            if let Err(e) = s.read_to_string(&mut buf) {
                warn!("reading debug-kernel.sh's stdout: {e}");
            }
        }
        buf
    });
    let log_path = log.to_path_buf();
    let err_thread = thread::spawn(move || {
        let Some(s) = stderr else { return };
        let mut file = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| warn!("cannot open {}: {e}", log_path.display()))
            .ok();
        for line in BufReader::new(s).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line);
            debug!("debug-kernel.sh: {text}");
            if text.starts_with(PROGRESS) {
                crate::note!("{text}");
            }
            if let Some(f) = file.as_mut() {
                if f.write_all(&line).and_then(|_| f.write_all(b"\n")).is_err() {
                    file = None;
                }
            }
        }
    });
    let status = match guard.wait_timeout(BUILD_TIMEOUT) {
        Ok(Some(status)) => status,
        Ok(None) => {
            let _ = guard.terminate(Duration::from_secs(10));
            return Err(fail(
                "timeout".into(),
                format!("not done within {BUILD_TIMEOUT:?}"),
            ));
        }
        Err(e) => {
            let _ = guard.terminate(Duration::from_secs(10));
            return Err(match e {
                ProcessError::Interrupted(_) => KernelError::Provision(e.into()),
                e => fail("not waited for".into(), e.to_string()),
            });
        }
    };
    let stdout = out_thread.join().unwrap_or_default();
    if err_thread.join().is_err() {
        warn!("the stderr reader of debug-kernel.sh panicked");
    }
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        return Err(fail(
            describe_status(status),
            last_error(&text).unwrap_or_else(|| "it printed no error line".into()),
        ));
    }
    let build = parse_output(&stdout).map_err(|e| fail(describe_status(status), e))?;
    if !build.tree.join("arch/x86/boot/bzImage").is_file() {
        return Err(fail(
            describe_status(status),
            format!("{} has no arch/x86/boot/bzImage", build.tree.display()),
        ));
    }
    Ok(build)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "PCISIM_DEBUG_TREE=/c/trixie-root/usr/src/pcisim-kernel/6.12-debug-abc/tree
PCISIM_DEBUG_TREE_ROOT=/usr/src/pcisim-kernel/6.12-debug-abc/tree
PCISIM_DEBUG_KVER=6.12.117-pcisim-debug
PCISIM_DEBUG_SOURCE=linux-source-6.12 6.12.117-1, x86_64_defconfig + debug-kernel.config, built in 1200 s with -j2
PCISIM_DEBUG_BUILD_SECS=0
";

    #[test]
    fn test_parse_output() {
        let b = parse_output(SAMPLE).unwrap();
        assert_eq!(
            b.tree,
            PathBuf::from("/c/trixie-root/usr/src/pcisim-kernel/6.12-debug-abc/tree")
        );
        assert_eq!(
            b.tree_in_root,
            PathBuf::from("/usr/src/pcisim-kernel/6.12-debug-abc/tree")
        );
        assert_eq!(b.kver, "6.12.117-pcisim-debug");
        assert!(b.source.starts_with("linux-source-6.12 6.12.117-1"));
        assert_eq!(b.build_secs, 0);
        let e = parse_output(&SAMPLE.replace("PCISIM_DEBUG_KVER=6.12.117-pcisim-debug\n", ""))
            .unwrap_err();
        assert!(e.contains("PCISIM_DEBUG_KVER"), "{e}");
        let e = parse_output(&SAMPLE.replace("BUILD_SECS=0", "BUILD_SECS=x")).unwrap_err();
        assert!(e.contains("not a number"), "{e}");
    }

    #[test]
    fn test_last_error_line() {
        let log = "[debug-kernel] configuring\nmake: *** [x] Error 2\n[debug-kernel] error: make failed (exit 2) after 30 s; the whole log: /b.log\n";
        assert_eq!(
            last_error(log).as_deref(),
            Some("error: make failed (exit 2) after 30 s; the whole log: /b.log")
        );
        assert_eq!(last_error("[debug-kernel] fine\n"), None);
    }

    /// A script that fails gives the error with its last error line; one that prints no tree
    /// is refused; the progress and the rest of stderr go to the log.
    #[test]
    fn test_build_reports_the_script_error() {
        let d = std::env::temp_dir().join(format!("pcisim-debugk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let log = d.join("log");
        std::fs::write(
            d.join("debug-kernel.sh"),
            "echo '[debug-kernel] building' >&2; echo 'cc1: oops' >&2; \
             echo '[debug-kernel] error: make failed (exit 2)' >&2; exit 1\n",
        )
        .unwrap();
        let e = build(&d, "6.12", "debug", &log).unwrap_err().to_string();
        assert!(
            e.contains("Building the 6.12-debug kernel failed (exit 1)"),
            "{e}"
        );
        assert!(e.contains("error: make failed (exit 2)"), "{e}");
        assert!(std::fs::read_to_string(&log).unwrap().contains("cc1: oops"));
        // Exits 0 but says nothing usable.
        std::fs::write(d.join("debug-kernel.sh"), "echo PCISIM_DEBUG_TREE=/nope\n").unwrap();
        let e = build(&d, "6.12", "debug", &log).unwrap_err().to_string();
        assert!(e.contains("printed no PCISIM_DEBUG_"), "{e}");
        // Prints a tree that is not built.
        std::fs::write(
            d.join("debug-kernel.sh"),
            format!("cat <<'EOF'\n{SAMPLE}EOF\n"),
        )
        .unwrap();
        let e = build(&d, "6.12", "debug", &log).unwrap_err().to_string();
        assert!(e.contains("has no arch/x86/boot/bzImage"), "{e}");
        let e = build(&d.join("nope"), "6.12", "debug", &log)
            .unwrap_err()
            .to_string();
        assert!(e.contains("debug-kernel.sh is missing"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
