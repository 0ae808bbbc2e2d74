//! The fd boundary: `recvmsg`/`sendmsg` with SCM_RIGHTS on the client socket. The only unsafe
//! code of the crate besides one fcntl in `dma.rs`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

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
pub(crate) fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    max_fds: usize,
) -> io::Result<Received> {
    let space = cmsg_space(max_fds);
    // u64 elements keep the control buffer aligned for `cmsghdr`.
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zero is a valid initial value for every field.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.len() * 8;
    let n = loop {
        // SAFETY: `msg` points at `iov` (which covers exactly `buf`) and at `cbuf` (of the stated
        // length); both outlive the call. The kernel writes only inside them.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
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

/// Write all of `data`; `fds` (if any) travel with the first byte.
pub(crate) fn send_with_fds(
    sock: &UnixStream,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut sent = 0usize;
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
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
        let space = cmsg_space(raw.len());
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        if sent == 0 && !raw.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: the control buffer has room for one cmsghdr with `raw.len()` fds
            // (CMSG_SPACE); CMSG_FIRSTHDR returns its start.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len =
                    libc::CMSG_LEN((raw.len() * std::mem::size_of::<RawFd>()) as u32) as _;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr(),
                    libc::CMSG_DATA(c).cast::<RawFd>(),
                    raw.len(),
                );
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
