//! Child processes that never outlive the lab, and SIGINT/SIGTERM handling.
//!
//! Every child the lab starts goes through [`ChildGuard::spawn`]:
//!
//! * in the child, before `exec`, `PR_SET_PDEATHSIG(SIGKILL)` is set, so the kernel kills the child
//!   when the lab dies for any reason, `SIGKILL` included. The death signal fires when the
//!   *thread* that spawned the child exits, so spawn long-lived children from a thread that
//!   outlives them (the lab runs everything on its caller's thread). `PR_SET_PDEATHSIG` survives
//!   `execve` (for non-setuid programs), so it also covers wrapper scripts that `exec` the real
//!   program, like the provisioned QEMU wrapper;
//! * optionally the child gets its own process group, so a terminal's Ctrl-C reaches only the lab,
//!   which then shuts its children down in order (QEMU first, then the device server);
//! * [`ChildGuard`]'s `Drop` kills (the whole group, if it has one) and reaps the child, so early
//!   returns and panics leave nothing behind.
//!
//! [`InterruptGuard`] turns SIGINT/SIGTERM into a flag ([`interrupted`]) that every wait loop in
//! the lab polls, so an interrupted run unwinds through the same `Drop` guards.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, warn};

/// How often wait loops look at the child and at the interrupt flag.
pub const POLL: Duration = Duration::from_millis(20);

/// Errors from starting, waiting for or stopping a child process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started.
    #[error("Cannot start {name} ({program})")]
    Spawn {
        /// What the child is, for humans ("QEMU", "device server").
        name: String,
        /// The program that was executed.
        program: String,
        /// Why `spawn` failed.
        #[source]
        source: io::Error,
    },
    /// Waiting for the child failed (this is an OS-level error, not a child failure).
    #[error("Cannot wait for {name}")]
    Wait {
        /// What the child is.
        name: String,
        /// The error from `waitpid`.
        #[source]
        source: io::Error,
    },
    /// The child did not finish in time and was killed.
    #[error("{name} did not finish within {timeout:?} and was killed")]
    Timeout {
        /// What the child is.
        name: String,
        /// The time it was given.
        timeout: Duration,
    },
    /// The lab received SIGINT or SIGTERM while waiting.
    #[error("Interrupted by signal {0}")]
    Interrupted(i32),
}

// ---------------------------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------------------------

/// The last SIGINT/SIGTERM received while an [`InterruptGuard`] was installed (0: none).
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_interrupt(signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(signal, Ordering::SeqCst);
}

/// The signal (SIGINT or SIGTERM) that interrupted the lab, if any.
pub fn interrupted() -> Option<i32> {
    match INTERRUPTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// `Err(ProcessError::Interrupted)` once SIGINT/SIGTERM was received.
pub fn check_interrupted() -> Result<(), ProcessError> {
    match interrupted() {
        Some(s) => Err(ProcessError::Interrupted(s)),
        None => Ok(()),
    }
}

/// While alive, SIGINT and SIGTERM set the [`interrupted`] flag instead of killing the process;
/// dropping it restores the previous dispositions.
pub struct InterruptGuard {
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

impl InterruptGuard {
    /// Installs the handlers and clears the flag.
    pub fn install() -> io::Result<Self> {
        INTERRUPTED.store(0, Ordering::SeqCst);
        let mut guard = InterruptGuard {
            previous: Vec::new(),
        };
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: sigaction is a plain C struct for which all-zeroes is a valid value.
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            // SAFETY: as above.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: `action` and `old` are valid sigaction structs owned by this frame; the
            // handler only performs an atomic store, which is async-signal-safe.
            let rc = unsafe { libc::sigaction(signal, &action, &mut old) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            guard.previous.push((signal, old));
        }
        Ok(guard)
    }
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        for (signal, old) in self.previous.drain(..) {
            // SAFETY: `old` is the disposition sigaction returned for this signal earlier.
            let rc = unsafe { libc::sigaction(signal, &old, std::ptr::null_mut()) };
            if rc != 0 {
                warn!(
                    "cannot restore the handler of signal {signal}: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Children
// ---------------------------------------------------------------------------------------------

/// How a child is placed relative to the lab's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Stays in the lab's process group (a terminal's Ctrl-C reaches it too).
    Inherit,
    /// Leads a new process group: only the lab stops it, and stopping it stops its descendants.
    Own,
    /// Leads a new session and has no parent-death signal: once [`ChildGuard::release`]d it
    /// outlives the lab (`pcisim lab up`); until then it is stopped like [`Group::Own`].
    Session,
}

impl Group {
    /// Whether the child leads its own process group (signals go to the whole group).
    fn leads(self) -> bool {
        matches!(self, Group::Own | Group::Session)
    }
}

/// A child process that is killed and reaped when the guard is dropped.
pub struct ChildGuard {
    name: String,
    child: Child,
    group: Group,
    status: Option<ExitStatus>,
    /// Released: the drop leaves it running.
    released: bool,
}

impl ChildGuard {
    /// Spawns `cmd` with `PR_SET_PDEATHSIG(SIGKILL)` and, for [`Group::Own`], a new process
    /// group; for [`Group::Session`] a new session and no parent-death signal.
    pub fn spawn(name: &str, cmd: &mut Command, group: Group) -> Result<Self, ProcessError> {
        let parent = std::process::id();
        let own_group = group == Group::Own;
        let session = group == Group::Session;
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (setsid, setpgid, prctl, getppid); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if session {
                    // SAFETY: setsid only changes this (child) process's session and group.
                    if libc::setsid() < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    return Ok(());
                }
                if own_group {
                    // SAFETY: setpgid(0, 0) only changes this (child) process's group.
                    if libc::setpgid(0, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // SAFETY: PR_SET_PDEATHSIG with a valid signal number has no memory effects.
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl: then nobody would kill us.
                // SAFETY: getppid has no preconditions.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            name: name.to_string(),
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        debug!("started {name} (pid {}): {cmd:?}", child.id());
        Ok(ChildGuard {
            name: name.to_string(),
            child,
            group,
            status: None,
            released: false,
        })
    }

    /// Lets the child run on when the guard is dropped and returns its pid (for a
    /// [`Group::Session`] child, which then outlives the lab; it is reaped by init once the lab
    /// exits).
    pub fn release(mut self) -> u32 {
        self.released = true;
        self.child.id()
    }

    /// The child's name as given to [`ChildGuard::spawn`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The underlying [`Child`] (to take its pipes).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the child has exited (reaping it), else `None`.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        if self.status.is_none() {
            self.status = self.child.try_wait().map_err(|source| ProcessError::Wait {
                name: self.name.clone(),
                source,
            })?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the child to exit. `Ok(None)` if it is still running. Returns
    /// [`ProcessError::Interrupted`] at once when the lab is interrupted.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            check_interrupted()?;
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(POLL);
        }
    }

    /// Sends `signal` to the child (to its whole group for [`Group::Own`] and
    /// [`Group::Session`]) unless it was reaped.
    pub fn signal(&self, signal: libc::c_int) {
        if self.status.is_some() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        let target = if self.group.leads() { -pid } else { pid };
        // SAFETY: kill has no memory effects; the child is not reaped yet, so `pid` (and the group
        // it leads) still names our child and not a recycled process.
        let rc = unsafe { libc::kill(target, signal) };
        if rc != 0 {
            debug!(
                "kill({target}, {signal}) for {}: {}",
                self.name,
                io::Error::last_os_error()
            );
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL. Returns the exit status. Does not stop on
    /// an interrupt: this is what cleanup uses.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            thread::sleep(POLL);
        }
        warn!("{} ignored SIGTERM for {grace:?}: killing it", self.name);
        self.kill()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal(libc::SIGKILL);
        let status = self.child.wait().map_err(|source| ProcessError::Wait {
            name: self.name.clone(),
            source,
        })?;
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Ok(None) = self.try_wait() {
            debug!("killing {} (pid {}) on drop", self.name, self.child.id());
            if let Err(e) = self.kill() {
                warn!("{e}");
            }
        } else if self.group.leads() {
            // The leader is gone; make sure nothing it started lingers in its group.
            let pid = self.child.id() as libc::pid_t;
            // SAFETY: kill has no memory effects. The group id cannot be reused while any member
            // is alive, and ESRCH (no such group) is harmless.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
}

/// The CPU time (user + system) process `pid` has used so far, from `/proc/<pid>/stat`; `None`
/// if it cannot be read. Under TCG it is QEMU's emulation work, which unlike wall time does not
/// grow when other processes take the host's cores (boot reports, docs/perf.md).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may contain spaces) closed by the last ')'.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of proc(5), so 11 and 12 after the state (field 3).
    let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
    Some(Duration::from_millis(ticks.saturating_mul(1000) / hz))
}

/// Describes an exit status for humans: "exit 0", "signal 9 (SIGKILL)".
pub fn describe_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exit {code}")
    } else if let Some(signal) = status.signal() {
        format!("signal {signal}")
    } else {
        format!("{status}")
    }
}

/// The output of [`run_captured`].
#[derive(Debug)]
pub struct Captured {
    /// How the program ended.
    pub status: ExitStatus,
    /// Everything it wrote on stdout.
    pub stdout: Vec<u8>,
}

/// Runs a short-lived program to completion within `timeout`, capturing its stdout. Its stderr
/// is appended line by line to `stderr_log` and logged at debug level. Interruptible.
pub fn run_captured(
    name: &str,
    cmd: &mut Command,
    timeout: Duration,
    stderr_log: &Path,
) -> Result<Captured, ProcessError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = ChildGuard::spawn(name, cmd, Group::Inherit)?;
    let stdout = guard.child_mut().stdout.take();
    let stderr = guard.child_mut().stderr.take();
    let out_thread = thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut s) = stdout {
            if let Err(e) = s.read_to_end(&mut buf) {
                warn!("reading stdout: {e}");
            }
        }
        buf
    });
    let log_name = name.to_string();
    let log_path = stderr_log.to_path_buf();
    let err_thread = thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write};
        let Some(s) = stderr else { return };
        let mut file = match File::options().create(true).append(true).open(&log_path) {
            Ok(f) => Some(f),
            Err(e) => {
                warn!("cannot open {}: {e}", log_path.display());
                None
            }
        };
        for line in BufReader::new(s).split(b'\n') {
            let Ok(line) = line else { break };
            debug!("{log_name}: {}", String::from_utf8_lossy(&line));
            if let Some(f) = file.as_mut() {
                if f.write_all(&line).and_then(|_| f.write_all(b"\n")).is_err() {
                    file = None;
                }
            }
        }
    });
    let status = match guard.wait_timeout(timeout) {
        Ok(Some(status)) => status,
        Ok(None) => {
            // SIGTERM first so that scripts can run their cleanup traps. The readers are not
            // joined: a grandchild may keep the pipes open.
            guard.terminate(Duration::from_secs(5))?;
            return Err(ProcessError::Timeout {
                name: name.to_string(),
                timeout,
            });
        }
        Err(e) => {
            guard.terminate(Duration::from_secs(5))?;
            return Err(e);
        }
    };
    let stdout = out_thread.join().unwrap_or_default();
    if err_thread.join().is_err() {
        warn!("the stderr reader of {name} panicked");
    }
    Ok(Captured { status, stdout })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cpu_time_grows_with_work_and_is_none_for_no_process() {
        let me = std::process::id();
        let before = cpu_time(me).unwrap();
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = cpu_time(me).unwrap();
        assert!(after > before, "{before:?} -> {after:?}");
        assert!(cpu_time(u32::MAX).is_none());
    }

    #[test]
    fn test_child_guard_drop_kills_child() {
        let mut cmd = Command::new("sleep");
        cmd.arg("100");
        let guard = ChildGuard::spawn("sleep", &mut cmd, Group::Own).unwrap();
        let pid = guard.pid() as libc::pid_t;
        drop(guard);
        // SAFETY: signal 0 only checks for existence.
        let rc = unsafe { libc::kill(pid, 0) };
        assert_eq!(rc, -1, "the child must be gone (reaped) after drop");
    }

    #[test]
    fn test_terminate_returns_signal_status() {
        let mut cmd = Command::new("sleep");
        cmd.arg("100");
        let mut guard = ChildGuard::spawn("sleep", &mut cmd, Group::Inherit).unwrap();
        let status = guard.terminate(Duration::from_secs(5)).unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        assert_eq!(describe_status(status), "signal 15");
    }

    #[test]
    fn test_run_captured_collects_stdout_and_times_out() {
        let dir = std::env::temp_dir().join(format!("pcisim-lab-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("err.log");
        let out = run_captured(
            "sh",
            Command::new("sh").args(["-c", "echo hello; echo oops >&2"]),
            Duration::from_secs(10),
            &log,
        )
        .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"hello\n");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "oops\n");
        let err = run_captured(
            "sleep",
            Command::new("sleep").arg("100"),
            Duration::from_millis(100),
            &log,
        )
        .unwrap_err();
        assert!(matches!(err, ProcessError::Timeout { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
