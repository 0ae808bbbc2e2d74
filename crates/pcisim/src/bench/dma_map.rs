//! The DMA map figures: DMA_MAP/DMA_UNMAP rates page by page (as a vIOMMU maps), windowed
//! requests with SCM_RIGHTS fds, against the same traffic through a raw AF_UNIX echo.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use pcisim_vfio_user::proto::{self, Command, Header, HEADER_SIZE};

use super::client::{frame, start_server, Client};
use super::memory::memfd;
use super::report::MapRates;

/// Requests sent before their replies are read.
pub(super) const MAP_WINDOW: u64 = 256;

/// Send `bytes` on `s` with `fd` (SCM_RIGHTS) if given.
pub(super) fn send_with_fd(s: &UnixStream, bytes: &[u8], fd: Option<i32>) -> Result<()> {
    let mut cmsg = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: a msghdr over our own buffers (the kernel only reads the iovec's bytes); the
    // control message (one fd) fits in the 32-byte buffer (CMSG_SPACE(4) = 24).
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(fd) = fd {
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd);
        }
        libc::sendmsg(s.as_raw_fd(), &msg, 0)
    };
    if n != bytes.len() as isize {
        bail!("sendmsg: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Receive up to `buf.len()` bytes from `s` (as many as are there, at least one), closing every
/// fd that comes with them; 0 at end of stream.
pub(super) fn recv_closing_fds(s: &UnixStream, buf: &mut [u8]) -> Result<usize> {
    let mut cmsg = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a msghdr over our own buffers; the kernel writes at most iov_len bytes and
    // msg_controllen bytes of control data into them, and CMSG_* walk what it wrote.
    let (n, fds) = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg);
        let n = libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        let mut fds = Vec::new();
        if n > 0 {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let k = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                    for i in 0..k {
                        fds.push(std::ptr::read_unaligned(
                            libc::CMSG_DATA(c).cast::<i32>().add(i),
                        ));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        (n, fds)
    };
    for fd in fds {
        // SAFETY: the kernel just installed `fd` in our table for us; we own it.
        drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
    if n < 0 {
        bail!("recvmsg: {}", std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Receive exactly `buf.len()` bytes (closing fds that come along); false at end of stream.
pub(super) fn recv_exact_closing_fds(s: &UnixStream, buf: &mut [u8]) -> Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let n = recv_closing_fds(s, &mut buf[got..])?;
        if n == 0 {
            return Ok(false);
        }
        got += n;
    }
    Ok(true)
}

/// `pages` DMA_MAP frames (4 KiB page `k` of the memfd at IOVA `BASE + k * 4096`) and the
/// DMA_UNMAP frames undoing them.
pub(super) fn map_frames(pages: u64) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    const BASE: u64 = 0x1_0000_0000;
    let rw = pcisim_vfio_user::dma::PROT_READ | pcisim_vfio_user::dma::PROT_WRITE;
    (0..pages)
        .map(|k| {
            let mut m = proto::Writer::new();
            m.u32(32)
                .u32(rw)
                .u64(k * 4096)
                .u64(BASE + k * 4096)
                .u64(4096);
            let mut u = proto::Writer::new();
            u.u32(24).u32(0).u64(BASE + k * 4096).u64(4096);
            (
                frame(Command::DmaMap, 0, 0, &m.finish()),
                frame(Command::DmaUnmap, 0, 0, &u.finish()),
            )
        })
        .unzip()
}

/// Send every frame (with a dup of `fd` each if given), `MAP_WINDOW` at a time before reading
/// as many `reply_len`-byte replies; the rate of each window (requests per second). An error
/// reply is an error.
pub(super) fn windows(
    s: &UnixStream,
    frames: &[Vec<u8>],
    fd: Option<&std::fs::File>,
    reply_len: usize,
) -> Result<Vec<f64>> {
    let mut reply = vec![0u8; reply_len];
    let mut rates = Vec::with_capacity(frames.len() / MAP_WINDOW as usize + 1);
    for w in frames.chunks(MAP_WINDOW as usize) {
        let t = Instant::now();
        for f in w {
            let dup = fd.map(|f| f.try_clone()).transpose()?;
            send_with_fd(s, f, dup.as_ref().map(|d| d.as_raw_fd()))?;
        }
        for _ in w {
            if !recv_exact_closing_fds(s, &mut reply)? {
                bail!("the peer closed the connection");
            }
            let h = Header::parse(reply[..HEADER_SIZE].try_into()?);
            if h.flags & proto::FLAG_ERROR != 0 {
                bail!("command {} refused: errno {}", h.command, h.error);
            }
        }
        rates.push(w.len() as f64 / t.elapsed().as_secs_f64());
    }
    Ok(rates)
}

/// The echo floor of the map figure: reads whatever has arrived (as the server's reader does,
/// several messages per `recvmsg` when they are there), closes the fds that came with it, and
/// answers every complete `req_len`-byte message with `reply_len` bytes (a reply header with
/// the size filled in, so `windows` accepts it), all answers to one read in one write.
pub(super) fn fd_echo(req_len: usize, reply_len: usize) -> Result<UnixStream> {
    let (a, b) = UnixStream::pair()?;
    std::thread::spawn(move || {
        let mut reply = Header {
            id: 0,
            command: Command::DmaMap as u16,
            size: reply_len as u32,
            flags: proto::FLAG_TYPE_REPLY,
            error: 0,
        }
        .encode()
        .to_vec();
        reply.resize(reply_len, 0);
        let mut buf = vec![0u8; 64 << 10];
        let mut pending = 0usize;
        let mut out = Vec::new();
        while let Ok(n) = recv_closing_fds(&b, &mut buf) {
            if n == 0 {
                break;
            }
            pending += n;
            out.clear();
            while pending >= req_len {
                pending -= req_len;
                out.extend_from_slice(&reply);
            }
            if (&b).write_all(&out).is_err() {
                break;
            }
        }
    });
    Ok(a)
}

/// Map `pages` 4 KiB pages one by one, then unmap them one by one, through a real server; and
/// the same traffic through the echo floor. Returns per-window rates (map/s, unmap/s, floor
/// map/s, floor unmap/s).
pub(super) fn dma_map_rates(dir: &Path, pages: u64) -> Result<MapRates> {
    let sock = start_server(dir, "dma-map", None)?;
    let mem = memfd(pages * 4096)?;
    let (maps, unmaps) = map_frames(pages);
    let c = Client::connect(&sock)?;
    // Replies: a DMA_MAP reply is a header; a DMA_UNMAP reply echoes the 24-byte request.
    let (map_reply, unmap_reply) = (HEADER_SIZE, HEADER_SIZE + 24);
    let map = windows(&c.s, &maps, Some(&mem), map_reply)?;
    let unmap = windows(&c.s, &unmaps, None, unmap_reply)?;
    drop(c);
    let _ = std::fs::remove_file(&sock);
    let floor = fd_echo(maps[0].len(), map_reply)?;
    let floor_map = windows(&floor, &maps, Some(&mem), map_reply)?;
    drop(floor);
    let floor = fd_echo(unmaps[0].len(), unmap_reply)?;
    let floor_unmap = windows(&floor, &unmaps, None, unmap_reply)?;
    Ok((map, unmap, floor_map, floor_unmap))
}
