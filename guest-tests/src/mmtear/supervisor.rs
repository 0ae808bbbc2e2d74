//! The supervisor's side of the step protocol: workers' report `Line`s, waiting for their
//! ends, the KTAP `Steps`, and the group/marker checks after the last `waitpid`.

use crate::ktap::{Ktap, Outcome};
use crate::pci::{self, Function};
use crate::sys;
use crate::vfio::{self, ioctl_val};
use pcisim_guest_wire::{MmRole, MmWorkerOptions, Program, Word};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::vfiofd::{attach_group, map_dma, open_container, Pages};
use super::Case;
use super::{Layout, MARK_WAITED, PAGE, STEP_TIMEOUT};
use crate::sys::last_err as os_err;

/// A worker's report line: `<role> <event> key=value ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Line {
    pub(super) role: String,
    pub(super) event: String,
    pub(super) rest: String,
}

impl Line {
    pub(super) fn parse(text: &str) -> Option<Line> {
        let mut w = text.trim().splitn(3, ' ');
        Some(Line {
            role: w.next()?.to_string(),
            event: w.next()?.to_string(),
            rest: w.next().unwrap_or("").to_string(),
        })
    }

    /// The value of `key=value` in the rest of the line.
    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.rest
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }

    pub(super) fn num(&self, key: &str) -> Result<u64, String> {
        let v = self
            .get(key)
            .ok_or_else(|| format!("no {key}= in {:?}", self.text()))?;
        pci::parse_number(v)
    }

    pub(super) fn text(&self) -> String {
        format!("{} {} {}", self.role, self.event, self.rest)
            .trim_end()
            .to_string()
    }
}

/// Lines from the workers' stdout pipes.
pub(super) struct Reports {
    pub(super) pipes: Vec<(File, Vec<u8>, bool)>,
    /// Lines not taken yet, and whether each was shown as a diagnostic.
    pub(super) lines: std::collections::VecDeque<(Line, bool)>,
}

impl Reports {
    pub(super) fn new() -> Reports {
        Reports {
            pipes: Vec::new(),
            lines: std::collections::VecDeque::new(),
        }
    }

    pub(super) fn add(&mut self, f: File) {
        self.pipes.push((f, Vec::new(), false));
    }

    /// Reads what is available (waits up to `timeout` for something).
    pub(super) fn pump(&mut self, timeout: Duration) -> Result<bool, String> {
        let open: Vec<(RawFd, i16)> = self
            .pipes
            .iter()
            .filter(|p| !p.2)
            .map(|p| (p.0.as_raw_fd(), libc::POLLIN))
            .collect();
        if open.is_empty() {
            return Ok(false);
        }
        let rev = sys::poll(&open, Some(timeout))?;
        let mut any = false;
        for (i, r) in rev.iter().enumerate() {
            if *r == 0 {
                continue;
            }
            let fd = open[i].0;
            let Some(p) = self.pipes.iter_mut().find(|p| p.0.as_raw_fd() == fd) else {
                continue;
            };
            let mut b = [0u8; 4096];
            let n = p.0.read(&mut b).map_err(|e| format!("read reports: {e}"))?;
            if n == 0 {
                p.2 = true;
                continue;
            }
            any = true;
            p.1.extend_from_slice(&b[..n]);
            while let Some(nl) = p.1.iter().position(|&c| c == b'\n') {
                let text: Vec<u8> = p.1.drain(..=nl).collect();
                if let Some(l) = Line::parse(&String::from_utf8_lossy(&text)) {
                    self.lines.push_back((l, false));
                }
            }
        }
        Ok(any || rev.iter().any(|&r| r != 0))
    }

    /// Waits for `role event` (the first such line not taken yet); lines for later steps
    /// stay queued. Any `error` line of any role ends the wait with its text. Every line is
    /// shown once as a diagnostic when it arrives.
    pub(super) fn expect(
        &mut self,
        role: &str,
        event: &str,
        timeout: Duration,
        k: &mut Ktap,
    ) -> Result<Line, String> {
        let t0 = Instant::now();
        loop {
            for (l, shown) in self.lines.iter_mut() {
                if !*shown {
                    k.diag(&l.text());
                    *shown = true;
                }
            }
            if let Some(e) = self.lines.iter().find(|(l, _)| l.event == "error") {
                return Err(format!("{}: {}", e.0.role, e.0.rest));
            }
            if let Some(i) = self
                .lines
                .iter()
                .position(|(l, _)| l.role == role && l.event == event)
            {
                if let Some((l, _)) = self.lines.remove(i) {
                    return Ok(l);
                }
            }
            let left = timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                return Err(format!(
                    "no \"{role} {event}\" within {} s",
                    timeout.as_secs()
                ));
            }
            if !self.pump(left.min(Duration::from_millis(500)))? && self.pipes.iter().all(|p| p.2) {
                return Err(format!(
                    "the workers' output ended before \"{role} {event}\""
                ));
            }
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Code(c) => write!(f, "exit {c}"),
            Ended::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// `waitpid(pid)` (polled, so that it can give up after `timeout`).
pub(super) fn wait_ended(pid: i32, timeout: Duration) -> Result<Ended, String> {
    let t0 = Instant::now();
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid, exclusively borrowed int for the call.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Ok(if libc::WIFSIGNALED(status) {
                Ended::Signal(libc::WTERMSIG(status))
            } else {
                Ended::Code(libc::WEXITSTATUS(status))
            });
        }
        if r < 0 {
            return Err(os_err(&format!("waitpid({pid})")));
        }
        if t0.elapsed() > timeout {
            return Err(format!(
                "pid {pid} still running after {} s",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The supervisor's KTAP tests, reported in their planned order; a failed step skips the rest.
pub(super) struct Steps {
    pub(super) k: Ktap,
    pub(super) names: &'static [&'static str],
    pub(super) next: usize,
    pub(super) failed: Option<&'static str>,
}

impl Steps {
    pub(super) fn ok(&mut self, name: &'static str) -> Result<(), ()> {
        self.done(name, Ok(()))
    }

    /// Reports `name` (which must be the next planned test) from `r`.
    pub(super) fn done(&mut self, name: &'static str, r: Result<(), String>) -> Result<(), ()> {
        self.skip_to(name);
        let ok = self.k.check(name, r);
        if ok {
            Ok(())
        } else {
            self.failed.get_or_insert(name);
            Err(())
        }
    }

    /// Skips planned tests before `name` (there should be none).
    pub(super) fn skip_to(&mut self, name: &str) {
        while self.next < self.names.len() && self.names[self.next] != name {
            let n = self.names[self.next];
            self.k.result(n, Outcome::Skip("not reached".into()));
            self.next += 1;
        }
        self.next += 1;
    }

    /// Skips every planned test before `name` because of the failed step.
    pub(super) fn skip_rest_before(&mut self, name: &str) {
        let why = format!("{} failed", self.failed.unwrap_or("a step"));
        while self.next < self.names.len() && self.names[self.next] != name {
            let n = self.names[self.next];
            self.k.result(n, Outcome::Skip(why.clone()));
            self.next += 1;
        }
    }
}

/// The workers the supervisor started (killed and reaped if a step fails).
#[derive(Default)]
pub(super) struct Procs {
    pub(super) live: Vec<i32>,
}

impl Procs {
    pub(super) fn add(&mut self, pid: i32) {
        self.live.push(pid);
    }

    pub(super) fn reaped(&mut self, pid: i32) {
        self.live.retain(|&p| p != pid);
    }

    pub(super) fn kill_all(&mut self) {
        for pid in std::mem::take(&mut self.live) {
            // SAFETY: kill takes no pointers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = wait_ended(pid, Duration::from_secs(10));
        }
    }
}

pub(super) struct Super<'a> {
    pub(super) case: Case,
    pub(super) func: &'a Function,
    pub(super) group: String,
    pub(super) layout: Layout,
    pub(super) reports: Reports,
    pub(super) procs: Procs,
}

impl Super<'_> {
    pub(super) fn worker_cmd(&self, role: &str) -> Result<Command, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut c = Command::new(exe);
        let worker = MmWorkerOptions {
            role: MmRole::from_word(role)?,
            case: self.case,
            bdf: Some(self.func.bdf.clone()),
            group: Some(self.group.clone()),
            iova: self.layout.base,
            buf_kib: Some(self.layout.buf_len as u64 / 1024),
        };
        c.arg(Program::MmTeardownWorker.name())
            .args(worker.to_args());
        c.stdout(Stdio::piped()).stderr(Stdio::inherit());
        Ok(c)
    }

    /// Starts a worker with `stdin`; its stdout becomes a report pipe. Returns its pid.
    pub(super) fn spawn(
        &mut self,
        role: &str,
        stdin: Stdio,
    ) -> Result<(i32, Option<std::process::ChildStdin>), String> {
        let mut c = self.worker_cmd(role)?;
        c.stdin(stdin);
        let mut child = c.spawn().map_err(|e| format!("start the {role}: {e}"))?;
        let pid = child.id() as i32;
        self.procs.add(pid);
        let out = child
            .stdout
            .take()
            .ok_or_else(|| format!("no stdout pipe for the {role}"))?;
        self.reports.add(File::from(OwnedFd::from(out)));
        Ok((pid, child.stdin.take()))
    }

    pub(super) fn wait(&mut self, pid: i32) -> Result<Ended, String> {
        let e = wait_ended(pid, STEP_TIMEOUT)?;
        self.procs.reaped(pid);
        Ok(e)
    }
}

/// After the last `waitpid`: the group must be free again (nothing holds the device), and a
/// marker page mapped through a new container marks the moment in the device's journal.
pub(super) fn waited_marker(group: &str, layout: &Layout) -> Result<String, String> {
    let c = open_container()?;
    let g = attach_group(c.as_fd(), group).map_err(|e| {
        format!("{e}: the group is still held after waitpid returned (the device was not released)")
    })?;
    let p = Pages::new(PAGE)?;
    let iova = layout.mark(MARK_WAITED);
    map_dma(c.as_fd(), &p, iova)?;
    let n = vfio::unmap_dma(&c, iova, PAGE as u64)?;
    p.free();
    ioctl_val(
        &g.as_fd(),
        vfio::VFIO_GROUP_UNSET_CONTAINER,
        0,
        "VFIO_GROUP_UNSET_CONTAINER",
    )?;
    drop(g);
    drop(c);
    Ok(format!(
        "group {group} opened again after waitpid; marker page mapped at 0x{iova:x} and unmapped ({n} bytes)"
    ))
}

/// Whether opening the group fails with EBUSY (someone holds it).
pub(super) fn group_busy(group: &str) -> Result<bool, String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/dev/vfio/{group}"))
    {
        Ok(_) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(true),
        Err(e) => Err(format!("open /dev/vfio/{group}: {e}")),
    }
}
