//! Thin safe wrappers around the few syscalls std does not offer.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

pub(crate) fn last_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// A fresh anonymous private read/write mapping of `len` bytes (not populated); the caller owns
/// it and unmaps it with `munmap`.
pub fn mmap_anon(len: usize) -> Result<*mut u8, String> {
    mmap_anon_flags(len, 0)
}

/// [`mmap_anon`], populated at once (`MAP_POPULATE`): memory a device will DMA into.
pub fn mmap_anon_populated(len: usize) -> Result<std::ptr::NonNull<u8>, String> {
    let p = mmap_anon_flags(len, libc::MAP_POPULATE)?;
    std::ptr::NonNull::new(p).ok_or_else(|| "mmap returned NULL".to_string())
}

fn mmap_anon_flags(len: usize, flags: libc::c_int) -> Result<*mut u8, String> {
    // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(last_err(&format!("mmap {len} bytes")));
    }
    Ok(p.cast())
}

/// A non-blocking, close-on-exec eventfd.
pub fn eventfd() -> Result<File, String> {
    // SAFETY: eventfd takes no pointers; the return value is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(last_err("eventfd"));
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Reads and resets an eventfd counter; `Ok(0)` if it had not fired.
pub fn eventfd_take(f: &mut File) -> Result<u64, String> {
    let mut buf = [0u8; 8];
    match f.read(&mut buf) {
        Ok(8) => Ok(u64::from_ne_bytes(buf)),
        Ok(n) => Err(format!("eventfd read returned {n} bytes")),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(format!("eventfd read: {e}")),
    }
}

/// Polls `fds` for `events`; returns the `revents` of each (empty on timeout).
pub fn poll(fds: &[(RawFd, i16)], timeout: Option<Duration>) -> Result<Vec<i16>, String> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    let ms: libc::c_int = match timeout {
        None => -1,
        Some(d) => d.as_millis().min(i32::MAX as u128) as libc::c_int,
    };
    loop {
        // SAFETY: `pfds` is a valid, exclusively borrowed array of `pfds.len()`
        // pollfd structs for the duration of the call.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        if r == 0 {
            return Ok(Vec::new());
        }
        return Ok(pfds.iter().map(|p| p.revents).collect());
    }
}

/// Waits up to `timeout` for `fd` to become readable.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> Result<bool, String> {
    let r = poll(&[(fd.as_raw_fd(), libc::POLLIN)], Some(timeout))?;
    Ok(r.first().is_some_and(|ev| ev & libc::POLLIN != 0))
}

/// Creates a character device node (used when devtmpfs did not).
pub fn mknod_char(path: &Path, major: u32, minor: u32) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("path {} contains NUL", path.display()))?;
    let dev = libc::makedev(major, minor);
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, dev) };
    if r < 0 {
        return Err(last_err(&format!("mknod {}", path.display())));
    }
    Ok(())
}

/// Flushes filesystem buffers.
pub fn sync() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Powers the machine off (needs CAP_SYS_BOOT); returns only on failure.
pub fn power_off() -> String {
    // SAFETY: reboot with RB_POWER_OFF takes no pointers; it returns only on error.
    let r = unsafe { libc::reboot(libc::RB_POWER_OFF) };
    if r < 0 {
        last_err("reboot(RB_POWER_OFF)")
    } else {
        "reboot(RB_POWER_OFF) returned".into()
    }
}

/// Sends `sig` to process group `pgid`.
pub fn kill_process_group(pgid: u32, sig: libc::c_int) -> Result<(), String> {
    let pgid = libc::pid_t::try_from(pgid).map_err(|_| format!("bad pgid {pgid}"))?;
    // SAFETY: kill takes no pointers; a negative pid addresses the group.
    let r = unsafe { libc::kill(-pgid, sig) };
    if r < 0 {
        return Err(last_err("kill"));
    }
    Ok(())
}

/// Reaps `pid` if it is a zombie child; true if it was reaped.
pub fn reap(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is a valid, exclusively borrowed int for the call.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    r == pid
}

/// Puts a terminal into raw mode (cfmakeraw: no echo, no line discipline, no
/// output processing, 8 bits) with blocking single-byte reads, and discards any
/// input that arrived before.
pub fn make_raw(fd: BorrowedFd<'_>) -> Result<(), String> {
    let raw = fd.as_raw_fd();
    // SAFETY: termios is plain data; all-zero is a valid value to be overwritten.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid, exclusively borrowed termios for the call.
    if unsafe { libc::tcgetattr(raw, &mut t) } < 0 {
        return Err(last_err("tcgetattr"));
    }
    // SAFETY: `t` is a valid termios initialised by tcgetattr.
    unsafe { libc::cfmakeraw(&mut t) };
    t.c_cflag |= libc::CLOCAL | libc::CREAD;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: `t` is a valid termios for the call.
    if unsafe { libc::tcsetattr(raw, libc::TCSANOW, &t) } < 0 {
        return Err(last_err("tcsetattr"));
    }
    // SAFETY: tcflush takes no pointers.
    if unsafe { libc::tcflush(raw, libc::TCIFLUSH) } < 0 {
        return Err(last_err("tcflush"));
    }
    Ok(())
}

/// Reads back the local flags of a terminal (to check that echo is off).
pub fn local_flags(fd: BorrowedFd<'_>) -> Result<libc::tcflag_t, String> {
    // SAFETY: termios is plain data; all-zero is a valid value to be overwritten.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid, exclusively borrowed termios for the call.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) } < 0 {
        return Err(last_err("tcgetattr"));
    }
    Ok(t.c_lflag)
}

/// Waits until everything written to the terminal has been transmitted.
pub fn tcdrain(fd: BorrowedFd<'_>) {
    // SAFETY: tcdrain takes no pointers; failure (not a tty) is harmless here.
    unsafe { libc::tcdrain(fd.as_raw_fd()) };
}

/// Sends `fds` with a one-byte payload over a unix socket (`SCM_RIGHTS`).
pub fn send_fds(sock: BorrowedFd<'_>, fds: &[RawFd]) -> Result<(), String> {
    let payload = [b'F'];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let data_len = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
    // u64 words: suitably aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: zeroed msghdr is a valid value (null pointers, zero lengths) that is filled below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points to `space` bytes, enough for one header and `data_len` bytes
    // of data; CMSG_FIRSTHDR returns a pointer inside it (checked for null), and the fds are
    // copied into its data area, which CMSG_LEN(data_len) bytes cover.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() {
            return Err("no room for the control message".into());
        }
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), data_len);
    }
    // SAFETY: `msg` and everything it points to (iov, payload, control) live across the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    if n < 0 {
        return Err(last_err("sendmsg(SCM_RIGHTS)"));
    }
    Ok(())
}

/// Receives up to `max` fds sent with [`send_fds`] (waits up to `timeout`).
pub fn recv_fds(
    sock: BorrowedFd<'_>,
    max: usize,
    timeout: Duration,
) -> Result<Vec<OwnedFd>, String> {
    let rev = poll(&[(sock.as_raw_fd(), libc::POLLIN)], Some(timeout))?;
    if rev.is_empty() {
        return Err(format!("no fds within {} s", timeout.as_secs()));
    }
    let mut payload = [0u8; 16];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    let data_len = max * std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: zeroed msghdr is a valid value that is filled below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points to live buffers of the sizes it states; MSG_CMSG_CLOEXEC marks the
    // received fds close-on-exec.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(last_err("recvmsg"));
    }
    if n == 0 {
        return Err("the opener closed the socket without sending fds".into());
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err("control message truncated: fds lost".into());
    }
    let mut out = Vec::new();
    // SAFETY: the kernel filled `msg_controllen` bytes of our control buffer with well-formed
    // headers; CMSG_FIRSTHDR/NXTHDR walk inside it and return null at its end; an SCM_RIGHTS
    // header's data holds (cmsg_len - CMSG_LEN(0)) / 4 new descriptors that we now own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    out.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(out)
}

/// Every record still in the kernel log buffer, oldest first, each as read from a
/// non-blocking `/dev/kmsg` (`prio,seq,ts,flags;text\n[continuation]`, lossily decoded): one
/// record per read, until EAGAIN (the end of the buffer) or a bound of 100 000 records; a
/// record overwritten while reading (EPIPE) is skipped. Empty if `/dev/kmsg` cannot be
/// opened: the callers use the log for checks and diagnostics that say what they found.
pub fn kmsg_read_all() -> Vec<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    for _ in 0..100_000 {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => continue,
            Err(_) => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn eventfd_counts_and_polls() {
        let mut e = eventfd().unwrap();
        assert_eq!(eventfd_take(&mut e).unwrap(), 0);
        assert!(!wait_readable(e.as_fd(), Duration::from_millis(1)).unwrap());
        e.write_all(&1u64.to_ne_bytes()).unwrap();
        e.write_all(&2u64.to_ne_bytes()).unwrap();
        assert!(wait_readable(e.as_fd(), Duration::from_millis(100)).unwrap());
        assert_eq!(eventfd_take(&mut e).unwrap(), 3);
        assert_eq!(eventfd_take(&mut e).unwrap(), 0);
    }
}
