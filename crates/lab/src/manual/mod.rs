//! Manual experiments (`pcisim lab up|plug|unplug|exec|console|status|down`): a VM that outlives
//! the command that started it, with devices to hot-add and a guest shell.
//!
//! `up` provisions like the suite, starts `pcisim serve` (every device of the profile, with a
//! control socket) and QEMU *detached* (own session, no parent-death signal), waits for the
//! guest agent and writes `state.json` into the state directory (default
//! `$XDG_RUNTIME_DIR/pcisim-lab`, else `/tmp/pcisim-lab-<uid>`). Unlike the suite's VMs, QEMU is
//! the *server* of the agent's serial socket (`agent.sock`), so every later command connects to
//! it anew; a third serial port (`ttyS2`, `console.sock`) carries a shell that `console` attaches
//! the terminal to. Commands that talk to the VM hold `lock` (flock) so they run one at a time.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::LabError;
use crate::guestops::{self, sysfs, Timed, TimedError};
use crate::vm::agent::{Agent, RunInput, RunOutput};
use crate::vm::boot::{self, Lifetime, Prepared, Spawned, Vm, VmSpec, POWEROFF_TIMEOUT};
use crate::vm::profile::{ProfileId, VmProfile};
use crate::vm::qemu::{HotplugMode, Share, VmOptions};
use crate::vm::qmp::{PciDeviceInfo, Qmp, QmpError};

mod console;
mod exec;
mod plug;
mod state;
mod up;
pub use self::console::*;
pub use self::exec::*;
pub use self::plug::*;
pub use self::state::*;
pub use self::up::*;

/// The serial port (in the guest) of the shell `console` attaches to.
pub const CONSOLE_PORT: &str = "ttyS2";
/// How long `plug` waits for the guest to enumerate a hot-added device.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `unplug` waits for `DEVICE_DELETED` (native pciehp needs ~6 s).
pub const DELETE_TIMEOUT: Duration = Duration::from_secs(30);
/// The byte that leaves `console` (Ctrl-]).
pub const CONSOLE_ESCAPE: u8 = 0x1d;
/// Where the manual VM mounts its private transfer share (the state directory's `xfer/`), which
/// `lab cp` copies through.
pub const XFER_GUEST: &str = "/run/pcisim-xfer";

/// Errors of the manual commands: each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    /// A user-facing error.
    #[error("{0}")]
    Msg(String),
    /// A lab building block failed.
    #[error(transparent)]
    Lab(#[from] LabError),
}

fn msg(s: impl Into<String>) -> ManualError {
    ManualError::Msg(s.into())
}

fn lab(e: impl Into<LabError>) -> ManualError {
    ManualError::Lab(e.into())
}

type Result<T> = std::result::Result<T, ManualError>;

/// The manual profile: `gpu0` plugged behind `rp1`, `gpu1` (`irq=msi`, so it can be
/// `device_del`ed) served but unplugged, for `rp2`, and one more free hot-add port (`rp3`); ACPI
/// hotplug, vIOMMU.
pub fn manual_profile() -> VmProfile {
    // The `gpu-hotplug` machine with one more free port; `lab up --memory` decides its RAM.
    VmProfile {
        name: "manual".into(),
        free_ports: 1,
        ..ProfileId::GpuHotplug.profile()
    }
}

/// The profiles `up --profile` knows: `manual` (the default) and the suite's.
pub fn profile_by_name(name: &str) -> Result<VmProfile> {
    let mut all = vec![manual_profile()];
    all.extend(ProfileId::SUITE.iter().map(|p| p.profile()));
    let names: Vec<String> = all.iter().map(|p| p.name.clone()).collect();
    all.into_iter().find(|p| p.name == name).ok_or_else(|| {
        msg(format!(
            "unknown profile {name:?}: the profiles are {}",
            names.join(", ")
        ))
    })
}

/// `pcisim lab down`: powers the guest off, stops QEMU and the server, removes the state
/// directory (unless `keep`).
pub fn down(dir: &Path, keep: bool, out: &mut dyn Write) -> Result<()> {
    let state = load_state(dir)?;
    let _lock = Lock::take(dir)?;
    let t = Instant::now();
    let qemu = if alive(state.qemu_pid, &state.dir) {
        let powered =
            agent(&state).and_then(|mut a| a.poweroff(Duration::from_secs(30)).map_err(lab));
        match powered {
            Ok(()) if wait_dead(state.qemu_pid, &state.dir, POWEROFF_TIMEOUT) => {
                format!("guest powered off in {:.1} s", t.elapsed().as_secs_f64())
            }
            Ok(()) => format!(
                "QEMU still running {POWEROFF_TIMEOUT:?} after poweroff: {}",
                stop(state.qemu_pid, &state.dir, Duration::from_secs(5))
            ),
            Err(e) => format!(
                "poweroff failed ({e}): QEMU {}",
                stop(state.qemu_pid, &state.dir, Duration::from_secs(5))
            ),
        }
    } else {
        "QEMU was not running".to_string()
    };
    writeln!(out, "{qemu}").map_err(io_out)?;
    let server = stop(state.server_pid, &state.dir, Duration::from_secs(5));
    writeln!(out, "device server (pid {}): {server}", state.server_pid).map_err(io_out)?;
    if keep {
        let _ = fs::remove_file(state_file(dir));
        writeln!(out, "state removed; logs kept in {}", dir.display()).map_err(io_out)?;
    } else {
        fs::remove_dir_all(dir)
            .map_err(|e| msg(format!("cannot remove {}: {e}", dir.display())))?;
        writeln!(out, "removed {}", dir.display()).map_err(io_out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_manual_profile_layout_and_lookup() {
        let p = manual_profile();
        let l = p.layout(Path::new("/run/x")).unwrap();
        assert_eq!(l.root_ports.len(), 3);
        assert_eq!(l.free_ports, vec!["rp3".to_string()]);
        assert!(!l.device("gpu1").unwrap().at_boot);
        assert!(profile_by_name("gpu-hotplug").is_ok());
        let e = profile_by_name("nope").unwrap_err().to_string();
        assert!(e.contains("manual"), "{e}");
    }

    #[test]
    fn test_no_state_is_a_clear_error() {
        let e = load_state(Path::new("/nonexistent/pcisim-lab"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no lab VM is running"), "{e}");
    }

    #[test]
    fn test_alive_checks_the_command_line() {
        assert!(!alive(
            std::process::id(),
            Path::new("/definitely/not/here")
        ));
        assert!(!alive(u32::MAX, Path::new("/")));
    }
}
