//! Process plumbing: pipes and socket pairs to workers, fork and waitpid, line reading with
//! a deadline, and /dev/kmsg.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::dev::{errno, strerror};

/// A pipe for one line of text from a child.
pub(super) fn pipe() -> Result<(File, File), String> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(format!("pipe: {}", strerror(errno())));
    }
    // SAFETY: both are new descriptors owned by nothing else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// Forks; the child runs `f` and `_exit`s with its code.
pub(super) fn fork_run(f: impl FnOnce() -> i32) -> Result<libc::pid_t, String> {
    // SAFETY: this program is single-threaded when it forks (threads are only used inside
    // one step and joined); the child only runs `f` and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", strerror(errno())));
    }
    if pid == 0 {
        let code = f();
        // SAFETY: leaves the child without running the parent's atexit handlers twice.
        unsafe { libc::_exit(code) };
    }
    Ok(pid)
}

/// How a child ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ended {
    Exited(i32),
    Signaled(i32),
}

pub(super) fn waitpid(pid: libc::pid_t) -> Result<Ended, String> {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; `status` is written by the kernel.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && errno() != libc::EINTR {
            return Err(format!("waitpid {pid}: {}", strerror(errno())));
        }
    }
    if libc::WIFSIGNALED(status) {
        Ok(Ended::Signaled(libc::WTERMSIG(status)))
    } else {
        Ok(Ended::Exited(libc::WEXITSTATUS(status)))
    }
}

pub(super) fn read_line(f: &mut File, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no answer within {timeout:?} (got {:?})",
                String::from_utf8_lossy(&out)
            ));
        }
        let ready = crate::sys::poll(&[(f.as_raw_fd(), libc::POLLIN)], Some(left))?;
        if ready.is_empty() {
            continue;
        }
        match f.read(&mut b) {
            Ok(0) => return Ok(String::from_utf8_lossy(&out).into_owned()),
            Ok(_) if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&out).into_owned()),
            Ok(_) => out.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Lines from children, which may arrive in any order: [`Lines::expect`] takes the first with
/// a given prefix and keeps the others for later.
pub(super) struct Lines {
    pub(super) file: File,
    pub(super) stash: Vec<String>,
}

impl Lines {
    pub(super) fn expect(&mut self, prefix: &str, timeout: Duration) -> Result<String, String> {
        if let Some(i) = self.stash.iter().position(|l| l.starts_with(prefix)) {
            return Ok(self.stash.remove(i));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = read_line(&mut self.file, left.max(Duration::from_millis(1)))?;
            if line.starts_with(prefix) {
                return Ok(line);
            }
            if line.starts_with("error ") {
                return Err(format!("worker: {line}"));
            }
            self.stash.push(line);
        }
    }
}

/// Writes one line with a single write (atomic on a pipe: several children share one).
pub(super) fn say(f: &mut File, line: &str) {
    let _ = f.write_all(format!("{line}\n").as_bytes());
}

pub(super) fn socketpair() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } < 0
    {
        return Err(format!("socketpair: {}", strerror(errno())));
    }
    // SAFETY: both are new descriptors owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Kernel log lines (from /dev/kmsg) printed since the program started reading.
pub(super) struct Kmsg {
    pub(super) file: File,
}

impl Kmsg {
    /// Opens /dev/kmsg positioned at the end of the log.
    pub(super) fn open() -> Result<Kmsg, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .map_err(|e| format!("/dev/kmsg: {e}"))?;
        // SAFETY: lseek on our own descriptor.
        unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
        Ok(Kmsg { file })
    }

    /// The messages logged since the last call.
    pub(super) fn drain(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    if let Some((_, msg)) = rec.split_once(';') {
                        out.push(msg.lines().next().unwrap_or("").to_string());
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        out
    }
}
