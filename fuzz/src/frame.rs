//! Target `frame`: the vfio-user frame decoder, over the real code twice.
//!
//! 1. Pure: the input's byte stream is cut into frames the way the server reads them (16-byte
//!    header, `size` bytes in all) and every frame is decoded by `proto::decode`. Checked: no
//!    panic, an error always carries a non-zero errno, a decoded request respects the limits
//!    (data within `max_data_xfer_size`, WRITE_MULTI 1..=200 writes of 1..=8 bytes, SET_IRQS
//!    with exactly one DATA and one ACTION flag and one bool per vector), header round trip.
//! 2. Socket: the same stream, with file descriptors attached to frames (none, eventfds, a
//!    memfd, or more than `max_msg_fds`), is sent over a socketpair to a real
//!    [`pcisim_vfio_user::Server`] connection in front of a small in-memory device. Checked:
//!    one reply per frame that expects one (none for NO_REPLY), in order, with the frame's id
//!    and command, well-formed (type reply, errno non-zero iff the error flag, an error reply is
//!    a bare header), the errno the decoder predicted for a malformed payload, the connection
//!    ends with EOF — or with a protocol error exactly when a header's `size` is below 16 — and
//!    the device only ever sees accesses inside its regions and attach/detach in pairs.
//!
//! Input: `flags: u8` (bit 0: prepend a valid VERSION frame), `n: u8`, `n % 16` plan bytes
//! (per frame, cycling: bits 0..2 fd count, bit 3 the first fd is a memfd, bit 6 complete a
//! frame whose `size` runs past the input with zeros, bit 7 send 17 fds), then the wire bytes.

use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use pcisim_vfio_user::proto::{
    self, Header, Limits, Request, FLAG_ERROR, FLAG_NO_REPLY, FLAG_TYPE_MASK, FLAG_TYPE_REPLY,
    HEADER_SIZE,
};
use pcisim_vfio_user::{
    irq_index, ClientLink, ConnectionEnd, Device, DeviceError, IrqInfo, RegionFlags, RegionInfo,
    RegionMmap, Server, ServerOptions, SparseArea,
};

use crate::Input;

/// `max_data_xfer_size` of the server under test (small, so replies stay small).
pub const MAX_XFER: usize = 4096;
/// `max_msg_fds` of the server under test.
pub const MAX_FDS: usize = 16;
/// Largest frame the harness completes with zeros (plan bit 6).
const MAX_PAD: u32 = 2 << 20;
/// Size of each region of the test device, by index (0 = absent).
const REGION_SIZES: [u64; 9] = [4096, 0, 64 << 10, 0, 0, 0, 0, 256, 0];

/// A small device: plain memory regions (region 2 mmap-able through a memfd), PCI-like
/// interrupt indices. It checks what the server hands it.
struct TestDevice {
    regions: Vec<Vec<u8>>,
    mmap_fd: Arc<OwnedFd>,
    attached: bool,
}

fn bad(what: &str, index: u32, offset: u64, len: usize) -> ! {
    panic!("server passed an unchecked {what}: region {index} {offset:#x}+{len}");
}

impl TestDevice {
    fn region_mut(&mut self, index: u32, offset: u64, len: usize, what: &str) -> &mut [u8] {
        let Some(r) = self.regions.get_mut(index as usize) else {
            bad(what, index, offset, len)
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start.checked_add(len) {
            Some(end) if len > 0 && end <= r.len() => &mut r[start..end],
            _ => bad(what, index, offset, len),
        }
    }
}

impl Device for TestDevice {
    fn device_flags(&self) -> u32 {
        proto::DEVICE_FLAGS_PCI | proto::DEVICE_FLAGS_RESET
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let size = *REGION_SIZES.get(index as usize)?;
        let flags = RegionFlags {
            read: size > 0,
            write: size > 0,
            mmap: index == 2,
        };
        let mmap = (index == 2).then(|| RegionMmap {
            fd: self.mmap_fd.clone(),
            file_offset: 0,
            areas: vec![SparseArea { offset: 0, size }],
        });
        Some(RegionInfo { size, flags, mmap })
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        let (count, flags) = match index {
            irq_index::INTX => (1, 0b111),
            irq_index::MSI => (0, 0b1001),
            irq_index::MSIX => (4, 0b1001),
            irq_index::ERR | irq_index::REQ => (1, 0b1),
            _ => return None,
        };
        Some(IrqInfo { count, flags })
    }

    fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let len = buf.len();
        buf.copy_from_slice(self.region_mut(index, offset, len, "read"));
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.region_mut(index, offset, data.len(), "write")
            .copy_from_slice(data);
        Ok(())
    }

    fn attach(&mut self, _link: ClientLink) {
        assert!(!self.attached, "attach while a client is attached");
        self.attached = true;
    }

    fn detach(&mut self) {
        assert!(self.attached, "detach without attach");
        self.attached = false;
        for r in &mut self.regions {
            r.fill(0);
        }
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        for r in &mut self.regions {
            r.fill(0);
        }
        Ok(())
    }
}

/// The server (on its own thread, one connection per input) and the fds frames carry.
struct Rig {
    conn: Mutex<(mpsc::Sender<UnixStream>, mpsc::Receiver<ConnectionEnd>)>,
    eventfds: Vec<OwnedFd>,
    memfd: OwnedFd,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pcisim-fuzz-frame-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("socket directory");
        let device = TestDevice {
            regions: REGION_SIZES
                .iter()
                .map(|&s| vec![0u8; s as usize])
                .collect(),
            mmap_fd: Arc::new(OwnedFd::from(crate::memfd(c"fuzz-region", 64 << 10))),
            attached: false,
        };
        let opts = ServerOptions {
            name: "fuzz".into(),
            max_data_xfer_size: MAX_XFER,
            max_msg_fds: MAX_FDS,
            // Inputs are judged on what they contain, not on how fast a sanitizer build runs
            // them: no handshake or frame deadline (the connection must end in EOF).
            handshake_timeout: None,
            frame_timeout: None,
            ..ServerOptions::default()
        };
        let server = Server::bind(&dir.join("dev.sock"), Arc::new(Mutex::new(device)), opts)
            .expect("binding the fuzz server");
        let (stream_tx, stream_rx) = mpsc::channel::<UnixStream>();
        let (end_tx, end_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("fuzz-server".into())
            .spawn(move || {
                for s in stream_rx {
                    if end_tx.send(server.serve_connection(s)).is_err() {
                        return;
                    }
                }
            })
            .expect("server thread");
        Rig {
            conn: Mutex::new((stream_tx, end_rx)),
            eventfds: (0..=MAX_FDS).map(|_| crate::eventfd()).collect(),
            memfd: OwnedFd::from(crate::memfd(c"fuzz-dma", 64 << 10)),
        }
    })
}

/// What the server must answer to one chunk of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A complete frame: a reply unless NO_REPLY; `errno` if the decoder refused its payload.
    Frame { reply: bool, errno: Option<i32> },
    /// `size` above the server's limit: E2BIG unless NO_REPLY, even if the payload never
    /// comes.
    Oversize { reply: bool },
    /// `size` below the header: an EINVAL reply, then the connection closes.
    Desync,
    /// The stream ends inside this frame: no reply.
    Truncated,
}

struct Chunk {
    bytes: Vec<u8>,
    header: Option<Header>,
    expect: Expect,
    fds: Vec<RawFd>,
}

/// The VERSION frame a well-behaved client starts with.
pub fn version_frame(id: u16) -> Vec<u8> {
    let caps = br#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":4096,"pgsizes":4096}}"#;
    let mut payload = vec![0u8, 0, 0, 0];
    payload.extend_from_slice(caps);
    payload.push(0);
    frame(id, 1, 0, &payload)
}

/// A command frame.
pub fn frame(id: u16, command: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        id,
        command,
        size: (HEADER_SIZE + payload.len()) as u32,
        flags,
        error: 0,
    };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(payload);
    v
}

/// Check what `proto::decode` made of one frame; returns the errno of its error.
fn check_decode(h: &Header, payload: &[u8]) -> Option<i32> {
    assert_eq!(Header::parse(&h.encode()), *h, "header round trip");
    let limits = Limits {
        max_data_xfer_size: MAX_XFER,
    };
    match proto::decode(h, payload, &limits) {
        Err(e) => {
            let errno = e.errno();
            assert!(errno > 0, "{e}: errno {errno}");
            Some(errno)
        }
        Ok(Request::RegionRead { count, .. }) => {
            assert!(count as usize <= MAX_XFER, "read of {count} decoded");
            assert_eq!(payload.len(), 16);
            None
        }
        Ok(Request::RegionWrite { data, .. }) => {
            assert!(data.len() <= MAX_XFER, "write of {} decoded", data.len());
            assert_eq!(data.len() + 16, payload.len(), "write data vs payload");
            None
        }
        Ok(Request::RegionWriteMulti { writes }) => {
            assert!((1..=proto::MULTI_MAX as usize).contains(&writes.len()));
            for w in &writes {
                assert!((1..=proto::MULTI_DATA).contains(&w.data.len()));
            }
            assert!(payload.len() >= 8 + 24 * writes.len());
            None
        }
        Ok(Request::SetIrqs {
            flags,
            count,
            bools,
            ..
        }) => {
            let data = flags & 0b111;
            let action = flags & 0b111000;
            assert_eq!(data.count_ones(), 1, "SET_IRQS data flags {flags:#x}");
            assert_eq!(action.count_ones(), 1, "SET_IRQS action flags {flags:#x}");
            assert_eq!(flags & !0b111111, 0);
            if data == proto::IRQ_SET_DATA_BOOL {
                assert_eq!(bools.len(), count as usize);
            } else {
                assert!(bools.is_empty());
            }
            None
        }
        Ok(Request::Version { caps, .. }) => {
            assert!(caps.is_null() || caps.is_object());
            None
        }
        Ok(_) => None,
    }
}

/// Cut `wire` into the chunks the server will read, decoding each complete frame.
fn split(wire: &[u8], plan: &[u8], rig: &Rig) -> Vec<Chunk> {
    let max_msg = ServerOptions {
        max_data_xfer_size: MAX_XFER,
        ..ServerOptions::default()
    }
    .max_msg_size();
    let mut chunks = Vec::new();
    let mut pos = 0usize;
    let mut i = 0usize;
    while pos < wire.len() {
        let p = if plan.is_empty() {
            0
        } else {
            plan[i % plan.len()]
        };
        i += 1;
        let nfds = if p & 0x80 != 0 {
            MAX_FDS + 1
        } else {
            usize::from(p & 7)
        };
        let mut fds: Vec<RawFd> = rig.eventfds[..nfds].iter().map(|f| f.as_raw_fd()).collect();
        if p & 8 != 0 {
            if let Some(f) = fds.first_mut() {
                *f = rig.memfd.as_raw_fd();
            }
        }
        let rest = &wire[pos..];
        let Some(hb) = rest.get(..HEADER_SIZE) else {
            chunks.push(Chunk {
                bytes: rest.to_vec(),
                header: None,
                expect: Expect::Truncated,
                fds,
            });
            break;
        };
        let mut hb16 = [0u8; HEADER_SIZE];
        hb16.copy_from_slice(hb);
        let h = Header::parse(&hb16);
        let size = h.size as usize;
        if size < HEADER_SIZE {
            chunks.push(Chunk {
                bytes: hb.to_vec(),
                header: Some(h),
                expect: Expect::Desync,
                fds,
            });
            break;
        }
        let reply = h.flags & FLAG_NO_REPLY == 0;
        // An oversized frame is answered as soon as its header is read, complete or not.
        let oversize = size > max_msg;
        let mut bytes = rest[..size.min(rest.len())].to_vec();
        if size > rest.len() {
            if p & 0x40 == 0 || h.size > MAX_PAD {
                chunks.push(Chunk {
                    bytes,
                    header: Some(h),
                    expect: if oversize {
                        Expect::Oversize { reply }
                    } else {
                        Expect::Truncated
                    },
                    fds,
                });
                break;
            }
            bytes.resize(size, 0);
        }
        pos += size.min(rest.len());
        let expect = if oversize {
            Expect::Oversize { reply }
        } else {
            let errno = check_decode(&h, &bytes[HEADER_SIZE..]);
            Expect::Frame {
                reply,
                // More fds than max_msg_fds fail the frame before it is decoded.
                errno: errno.filter(|_| nfds <= MAX_FDS),
            }
        };
        chunks.push(Chunk {
            bytes,
            header: Some(h),
            expect,
            fds,
        });
    }
    chunks
}

/// sendmsg of `data` with `fds` (SCM_RIGHTS), non-blocking, no SIGPIPE.
fn send_chunk(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is CMSG_SPACE(fd_bytes) long and 8-byte aligned, so the
        // first header and its data (fd_bytes) fit in it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
    }
    // SAFETY: `msg` points at `iov` (over `data`) and `cbuf`, all alive for the call.
    let n = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// recvmsg into `out`; fds that come with replies are closed. Returns the bytes read (0: EOF).
fn recv_some(sock: &UnixStream, out: &mut Vec<u8>, wait: bool) -> io::Result<usize> {
    let mut buf = [0u8; 16384];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 32];
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    let flags = libc::MSG_CMSG_CLOEXEC | if wait { 0 } else { libc::MSG_DONTWAIT };
    // SAFETY: `msg` points at `buf` and `cbuf`, both alive for the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `msg.msg_control` with well-formed headers; CMSG_* walk it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for k in 0..bytes / std::mem::size_of::<RawFd>() {
                    drop(OwnedFd::from_raw_fd(data.add(k).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    out.extend_from_slice(&buf[..n as usize]);
    Ok(n as usize)
}

fn poll(sock: &UnixStream) {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN | libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 1000) };
}

/// Send every chunk, draining replies whenever the socket is full; stops early if the server
/// closed the connection.
fn send_all(sock: &UnixStream, chunks: &[Chunk], replies: &mut Vec<u8>) {
    for c in chunks {
        let mut off = 0;
        let mut fds: &[RawFd] = &c.fds;
        while off < c.bytes.len() {
            match send_chunk(sock, &c.bytes[off..], fds) {
                Ok(n) => {
                    off += n;
                    fds = &[];
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    while let Ok(n) = recv_some(sock, replies, false) {
                        if n == 0 {
                            return;
                        }
                    }
                    poll(sock);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // The server closed the connection (after a frame it could not skip).
                Err(_) => return,
            }
        }
    }
}

/// Replies, one per frame that expects one, in order.
fn check_replies(chunks: &[Chunk], replies: &[u8]) {
    let mut expected = Vec::new();
    for c in chunks {
        let Some(h) = c.header else { continue };
        match c.expect {
            Expect::Frame { reply: true, errno } => expected.push((h, errno)),
            Expect::Oversize { reply: true } => expected.push((h, Some(libc::E2BIG))),
            Expect::Desync => expected.push((h, Some(libc::EINVAL))),
            _ => {}
        }
    }
    let mut pos = 0;
    for (k, (req, errno)) in expected.iter().enumerate() {
        let Some(hb) = replies.get(pos..pos + HEADER_SIZE) else {
            panic!(
                "reply {k} of {} missing (to id {} command {})",
                expected.len(),
                req.id,
                req.command
            );
        };
        let mut a = [0u8; HEADER_SIZE];
        a.copy_from_slice(hb);
        let r = Header::parse(&a);
        assert_eq!(
            (r.id, r.command),
            (req.id, req.command),
            "reply {k} answers another message"
        );
        assert_eq!(r.flags & FLAG_TYPE_MASK, FLAG_TYPE_REPLY, "reply {k} type");
        let size = r.size as usize;
        assert!(size >= HEADER_SIZE, "reply {k} size {size}");
        if r.flags & FLAG_ERROR != 0 {
            assert_ne!(r.error, 0, "error reply {k} with errno 0");
            assert_eq!(size, HEADER_SIZE, "error reply {k} with a payload");
        } else {
            assert_eq!(r.error, 0, "success reply {k} with errno {}", r.error);
        }
        if let Some(e) = errno {
            assert!(
                r.flags & FLAG_ERROR != 0 && r.error == *e as u32,
                "reply {k} to command {}: expected errno {e}, got flags {:#x} errno {}",
                req.command,
                r.flags,
                r.error
            );
        }
        assert!(
            pos + size <= replies.len(),
            "reply {k} cut short ({size} bytes announced)"
        );
        pos += size;
    }
    assert_eq!(
        pos,
        replies.len(),
        "{} bytes of replies nobody asked for",
        replies.len() - pos
    );
}

/// The harness (see the module documentation).
pub fn run(data: &[u8]) {
    let rig = rig();
    let mut inp = Input::new(data);
    let flags = inp.u8();
    let n = usize::from(inp.u8() % 16);
    let plan = inp.bytes(n).to_vec();
    let mut wire = Vec::new();
    if flags & 1 != 0 {
        wire.extend(version_frame(0xfff0));
    }
    wire.extend_from_slice(inp.rest());
    let chunks = split(&wire, &plan, rig);
    if chunks.is_empty() {
        return;
    }

    let (client, server_end) = UnixStream::pair().expect("socketpair");
    let guard = rig.conn.lock().unwrap_or_else(|p| p.into_inner());
    guard.0.send(server_end).expect("server thread gone");
    let mut replies = Vec::new();
    send_all(&client, &chunks, &mut replies);
    let _ = client.shutdown(std::net::Shutdown::Write);
    loop {
        match recv_some(&client, &mut replies, true) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading replies: {e}"),
        }
    }
    let end = guard.1.recv().expect("server thread gone");
    drop(guard);

    let desync = chunks.iter().any(|c| c.expect == Expect::Desync);
    match (&end, desync) {
        (ConnectionEnd::Eof, false) | (ConnectionEnd::ProtocolError(_), true) => {}
        _ => panic!("connection ended with {end:?}, desync frame: {desync}"),
    }
    check_replies(&chunks, &replies);
    check_leaks();
}

/// Every few thousand inputs: the server released every fd and mapping the clients gave it
/// (the process's open fds and mappings are back to what they were after the first input).
fn check_leaks() {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    static BASE: OnceLock<(usize, usize)> = OnceLock::new();
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    if !n.is_multiple_of(4096) {
        return;
    }
    let count = |dir: &str| std::fs::read_dir(dir).map_or(0, |d| d.count());
    let maps = || {
        std::fs::read_to_string("/proc/self/maps").map_or(0, |m| {
            m.lines()
                .filter(|l| l.contains("memfd:fuzz-dma") || l.contains("memfd:fuzz-region"))
                .count()
        })
    };
    let now = (count("/proc/self/fd"), maps());
    let base = *BASE.get_or_init(|| now);
    assert!(
        now.0 <= base.0 + 2 && now.1 <= base.1,
        "fds or mappings leak: {now:?} (open fds, client memfd mappings) after {n} inputs, \
         {base:?} after the first"
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn test_frame_seeds() {
        crate::run_seeds("frame", super::run);
    }
}
