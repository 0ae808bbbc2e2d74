//! The fd boundary: creating the listening socket with its mode, the peer's credentials
//! (SO_PEERCRED), and `recvmsg`/`sendmsg` with SCM_RIGHTS on the client socket. The only unsafe
//! code of the crate besides one fcntl in `dma.rs`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Create a listening Unix stream socket at `path` (which must not exist) whose file has exactly
/// the permission bits `mode`, with no moment at which it is more permissive than `mode`.
///
/// `bind` creates the socket file with the socket inode's mode minus the umask, so the inode is
/// `fchmod`ed to `mode` first (the file then starts at `mode & !umask`, a subset of `mode`), and
/// the file is `chmod`ed to exactly `mode` after `bind` (chmod ignores the umask: `0660` stays
/// `0660` under umask 022). Connecting needs write permission on the file, so `0600` admits only
/// the owner (and root, which the uid check in the server then refuses unless allowed).
pub(crate) fn listen_unix(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path must be 1..{} bytes without NUL",
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain syscall with constant arguments; the result is checked below.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a socket we just created and own exclusively.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: fchmod on our own socket fd; it changes the mode `bind` will give the file.
    if unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` covers the family and the NUL-terminated
    // path inside it (checked above to fit).
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let finish = || -> io::Result<()> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        // SAFETY: listen on our own bound socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

/// The credentials of the process at the other end of a Unix socket, as the kernel recorded
/// them when it connected (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id of the peer (at connect time).
    pub pid: i32,
    /// Effective user id of the peer.
    pub uid: u32,
    /// Effective group id of the peer.
    pub gid: u32,
}

/// SO_PEERCRED of a connected Unix socket.
pub(crate) fn peer_cred(sock: &UnixStream) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `cred`, which is a ucred of that size.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// The effective uid of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A control-message buffer for `recvmsg`, sized for `max_fds` descriptors and reused across
/// calls (no allocation per read).
#[derive(Debug)]
pub(crate) struct CmsgBuf {
    /// u64 elements keep the buffer aligned for `cmsghdr`.
    buf: Vec<u64>,
}

impl CmsgBuf {
    /// Room for one SCM_RIGHTS message of `max_fds` fds.
    pub(crate) fn new(max_fds: usize) -> Self {
        CmsgBuf {
            buf: vec![0u64; cmsg_space(max_fds).div_ceil(8)],
        }
    }
}

/// Result of one `recvmsg`.
#[derive(Debug)]
pub(crate) struct Received {
    /// Bytes read into the buffer (0: EOF).
    pub bytes: usize,
    /// The kernel dropped ancillary data that did not fit (MSG_CTRUNC): more fds were sent than
    /// we accept. The fds that did fit are still returned (and will be closed by the caller).
    pub truncated: bool,
}

/// Read up to `buf.len()` bytes; fds that arrive with them are appended to `fds` (close-on-exec).
/// With `wait` false the read never blocks (MSG_DONTWAIT: the event loop calls this when the
/// socket is readable; `WouldBlock` if it is not after all); with `wait` true it waits for data
/// (the device loop's direct wait, see [`crate::evloop`]).
///
/// Kernel semantics (net/unix/af_unix.c, `unix_stream_read_generic`, verified on this machine):
/// fds travel with the skb of the `sendmsg` that sent them and are delivered by the first read
/// that takes any byte of that skb; such a read may also carry bytes of earlier fd-less skbs, but
/// it always *ends* inside or at the end of the skb that carried the fds. So the fds of one read
/// belong to the message its last byte belongs to.
pub(crate) fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    cmsg_buf: &mut CmsgBuf,
    fds: &mut Vec<OwnedFd>,
    wait: bool,
) -> io::Result<Received> {
    let cbuf = &mut cmsg_buf.buf;
    let flags = libc::MSG_CMSG_CLOEXEC | if wait { 0 } else { libc::MSG_DONTWAIT };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zero is a valid initial value for every field.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    let n = loop {
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = cbuf.len() * 8;
        msg.msg_flags = 0;
        // SAFETY: `msg` points at `iov` (which covers exactly `buf`) and at `cbuf` (of the stated
        // length); both outlive the call. The kernel writes only inside them.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        break n as usize;
    };
    // Walk the control messages the kernel filled in.
    // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR only compute pointers inside `msg.msg_control` (bounded
    // by `msg_controllen`, which the kernel set to what it wrote) and return null at the end.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and points at a complete cmsghdr inside the control buffer.
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: computing the data pointer and header length of a valid cmsghdr.
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            // SAFETY: as above; CMSG_LEN(0) is the header size.
            let hlen = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (hdr.cmsg_len as usize).saturating_sub(hlen) / std::mem::size_of::<RawFd>();
            for i in 0..count {
                // SAFETY: the kernel wrote `count` fds after the header; read_unaligned copes
                // with the byte pointer's alignment.
                let fd = unsafe { std::ptr::read_unaligned(data.cast::<RawFd>().add(i)) };
                if fd >= 0 {
                    // SAFETY: SCM_RIGHTS installed this fd in our table just now; nobody else
                    // owns it, so taking ownership is sound.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        // SAFETY: see CMSG_FIRSTHDR above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(Received {
        bytes: n,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

fn cmsg_space(max_fds: usize) -> usize {
    let bytes = (max_fds.max(1) * std::mem::size_of::<RawFd>()) as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    unsafe { libc::CMSG_SPACE(bytes) as usize }
}

/// Write all of `data`; `fds` (if any) travel with the first byte. Without fds nothing is
/// allocated.
pub(crate) fn send_with_fds(
    sock: &UnixStream,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut sent = 0usize;
    if fds.is_empty() {
        // The common case (every reply but a region info with an fd): plain `send`, which the
        // kernel serves with less work than `sendmsg` (no msghdr to copy in).
        while sent < data.len() {
            let rest = data.get(sent..).unwrap_or(&[]);
            // SAFETY: `rest` is valid for reads of `rest.len()` bytes for the call.
            let n = unsafe {
                libc::send(
                    sock.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            sent += n as usize;
        }
        return Ok(());
    }
    let space = cmsg_space(fds.len());
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    while sent < data.len() {
        let rest = data.get(sent..).unwrap_or(&[]);
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // SAFETY: zero-initialised msghdr is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if sent == 0 {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: the control buffer has room for one cmsghdr with `fds.len()` fds
            // (CMSG_SPACE); CMSG_FIRSTHDR returns its start, and the fds are written one by one
            // (unaligned) inside its data area.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len =
                    libc::CMSG_LEN((fds.len() * std::mem::size_of::<RawFd>()) as u32) as _;
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for (i, fd) in fds.iter().enumerate() {
                    std::ptr::write_unaligned(data.add(i), fd.as_raw_fd());
                }
            }
        }
        // SAFETY: `msg` references `iov` (covering `rest`) and `cbuf`, valid for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

/// Whether `fd` is an eventfd. We write 8 bytes to interrupt fds from device threads; anything
/// else (a pipe that could fill up and block, a regular file) is refused at SET_IRQS time.
pub(crate) fn is_eventfd(fd: &OwnedFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.as_os_str() == "anon_inode:[eventfd]")
        .unwrap_or(false)
}

/// (Tests only: the server waits in its event loop.) Wait until `sock` has something to read (data, EOF or an error) or `timeout` passes. Returns
/// whether it is readable. EINTR is reported as "not yet" (false with time left is harmless: the
/// caller recomputes its deadline and waits again).
#[cfg(test)]
pub(crate) fn wait_readable(sock: &UnixStream, timeout: std::time::Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // Round up so that a wait of 0.4 ms does not become a busy poll with timeout 0.
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(n > 0)
}

/// Whether this process's fd table is full right now (a `dup` fails with EMFILE or ENFILE).
///
/// Used when `recvmsg` reported MSG_CTRUNC: the kernel truncates the control data both when
/// more fds were sent than the buffer holds and when it could not install them because the fd
/// table is full (`scm_detach_fds` stops at the first `receive_fd` failure). The fds that *were*
/// installed still occupy their slots when this is called, so a full table is still full.
pub(crate) fn fd_table_full(sock: &UnixStream) -> bool {
    // SAFETY: F_DUPFD_CLOEXEC on our own open socket; the result is checked and closed.
    let fd = unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return matches!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE)
        );
    }
    // SAFETY: `fd` was just created by fcntl and is owned by nobody else.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    false
}
