//! Operations on the guest shared by the scenarios and the manual lab, written once: the checked
//! guest shell ([`sh`]), sysfs waits and vfio binding ([`sysfs`]), loading our guest drivers
//! ([`driver`]).
//!
//! They run through anything that can run a command in the guest ([`GuestShell`]): a host
//! scenario's context ([`crate::harness::host::HostCtx`], with the scenario's timeout and its
//! QEMU check) or the manual lab's agent link. They record nothing: judging is the scenario's.

use std::time::Duration;

use crate::vm::agent::{Agent, AgentError, RunOutput};

pub mod driver;
pub mod sysfs;

/// The guest's busybox (every guest shell script runs with its `sh`).
pub const BUSYBOX: &str = "/bin/busybox";

/// Runs a command in the guest.
pub trait GuestShell {
    /// What a failed run (or a failed script, [`ShellError`]) becomes.
    type Error: From<ShellError>;

    /// Runs `argv` in the guest and returns its output whatever its status.
    fn run_argv(&mut self, argv: &[String]) -> Result<RunOutput, Self::Error>;
}

/// A guest script that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// It ended with a non-zero status, a signal or a timeout.
    #[error("guest `sh -c {script:?}` ended with {status}: {stderr}")]
    Failed {
        /// The script.
        script: String,
        /// How it ended (`exit 1`, `signal 9`, `a timeout`).
        status: String,
        /// Its stderr, trimmed.
        stderr: String,
    },
    /// It ran, but what it printed says the operation did not happen.
    #[error("{0}")]
    Unexpected(String),
}

/// The argv of `busybox sh -c script`.
pub fn sh_argv(script: &str) -> Vec<String> {
    vec![BUSYBOX.into(), "sh".into(), "-c".into(), script.into()]
}

/// Runs `script` with the guest's `sh -c` and returns its output whatever its status (the
/// caller judges it).
pub fn sh_output<G: GuestShell + ?Sized>(g: &mut G, script: &str) -> Result<RunOutput, G::Error> {
    g.run_argv(&sh_argv(script))
}

/// Runs `script` with the guest's `sh -c` and returns its stdout; a non-zero exit, a signal or a
/// timeout is an error with its stderr.
pub fn sh<G: GuestShell + ?Sized>(g: &mut G, script: &str) -> Result<String, G::Error> {
    let out = sh_output(g, script)?;
    checked(script, out).map_err(G::Error::from)
}

/// `out`'s stdout if `script` exited 0, else why not.
pub fn checked(script: &str, out: RunOutput) -> Result<String, ShellError> {
    if out.exit == Some(0) && !out.timed_out {
        return Ok(out.stdout);
    }
    Err(ShellError::Failed {
        script: script.to_string(),
        status: match (out.exit, out.signal, out.timed_out) {
            (_, _, true) => "a timeout".to_string(),
            (Some(c), _, _) => format!("exit {c}"),
            (None, Some(s), _) => format!("signal {s}"),
            (None, None, _) => "no status".to_string(),
        },
        stderr: out.stderr.trim().to_string(),
    })
}

/// The agent link with a fixed timeout per command (the manual lab's guest).
pub struct Timed<'a> {
    /// The agent.
    pub agent: &'a mut Agent,
    /// How long each command may run.
    pub timeout: Duration,
}

/// Why a command on a [`Timed`] agent failed.
#[derive(Debug, thiserror::Error)]
pub enum TimedError {
    /// The agent link failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The script failed.
    #[error(transparent)]
    Shell(#[from] ShellError),
}

impl GuestShell for Timed<'_> {
    type Error = TimedError;

    fn run_argv(&mut self, argv: &[String]) -> Result<RunOutput, TimedError> {
        Ok(self.agent.run(argv, self.timeout)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(exit: Option<i32>, signal: Option<i32>, timed_out: bool) -> RunOutput {
        RunOutput {
            exit,
            signal,
            timed_out,
            stdout: "out\n".into(),
            stderr: " err \n".into(),
            ..RunOutput::default()
        }
    }

    #[test]
    fn test_checked_passes_stdout_only_on_exit_0() {
        assert_eq!(checked("true", out(Some(0), None, false)).unwrap(), "out\n");
        let e = checked("false", out(Some(1), None, false)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "guest `sh -c \"false\"` ended with exit 1: err"
        );
        assert!(checked("x", out(None, Some(9), false))
            .unwrap_err()
            .to_string()
            .contains("signal 9"));
        assert!(checked("x", out(Some(0), None, true))
            .unwrap_err()
            .to_string()
            .contains("a timeout"));
        assert!(checked("x", out(None, None, false))
            .unwrap_err()
            .to_string()
            .contains("no status"));
    }

    #[test]
    fn test_sh_argv_is_busybox_sh_c() {
        assert_eq!(sh_argv("echo hi"), ["/bin/busybox", "sh", "-c", "echo hi"]);
    }
}
