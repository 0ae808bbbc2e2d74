//! Kill soak: one `pcisim serve` process, and 1000 clients that each connect, negotiate, maybe
//! map memory and bind interrupt eventfds, send half a frame and are SIGKILLed. Afterwards a
//! normal client must be served, and the server's fds, mappings, threads and RSS must be what
//! they were before the soak.
//!
//! Clients are forked children of the test; everything a child sends is prepared before the
//! fork, so the child only makes system calls. The wall time is printed (not asserted).

// Test code: a failed expectation in a helper is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use pcisim_vfio_user::proto::{self, HEADER_SIZE};
use vmm_sys_util::eventfd::EventFd;

/// Killed clients (the figure).
const CYCLES: usize = 1000;
/// Killed clients before the baseline is taken: thread stacks, allocator arenas, the device
/// journal's ring and every code path reach their steady state first.
const WARMUP: usize = 100;
/// Config writes before the baseline that fill the device journal's record ring (4096 records;
/// each Command register change is one), so the journal's memory is at its cap when measured.
const JOURNAL_FILL: usize = 5000;
/// RSS may grow by this much over the soak. Why this bound: glibc keeps freed heap memory in
/// its arenas and the high-water mark depends on allocation order, which may move by a few
/// pages from run to run (measured: equal to the kB in every run so far); a heap leak of 256
/// bytes per killed client would exceed it (1000 × 256 B). Leaking whole connection states
/// (DMA table + eventfds, checked by mutating the server) costs ~1.3 KiB of RSS per client, so
/// it fails this bound as well as the fd and mapping counts.
const RSS_SLACK_KB: u64 = 256;
/// `/proc/PID/maps` lines may differ by this much: glibc may split or merge a heap VMA. A
/// leaked DMA mapping is one line per client that mapped (500 over the soak); the client's
/// memory is never touched by the device here, so such a leak shows in this count, not in RSS.
const MAPS_SLACK: usize = 4;

const IOVA: u64 = 0x1000_0000;
const MEM_SIZE: u64 = 1 << 20;
const MSIX: u32 = 2;

mod support;

use support::{
    fd_count, frame, negotiated, payload, read_reply, status_field, unlinked_file, version_payload,
    Serve,
};

/// The soak's `pcisim serve`: one GPU.
fn serve() -> Serve {
    Serve::builder("soak").gpu("gpu0").rust_log("warn").start()
}

/// What the soak watches in the server process.
#[derive(Debug, Clone, Copy)]
struct Usage {
    fds: usize,
    maps: usize,
    threads: usize,
    rss_kb: u64,
}

fn usage(pid: u32) -> Usage {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .count();
    Usage {
        fds: fd_count(pid),
        maps,
        threads: status_field(pid, "Threads:") as usize,
        rss_kb: status_field(pid, "VmRSS:"),
    }
}

/// A normal client: negotiates, and reads and writes config space.
struct Normal {
    s: UnixStream,
}

impl Normal {
    fn connect(path: &Path) -> Normal {
        Normal {
            s: negotiated(path, Duration::from_secs(10)),
        }
    }

    fn call(&mut self, f: Vec<u8>) -> Vec<u8> {
        self.s.write_all(&f).unwrap();
        let (h, body) = read_reply(&mut self.s).unwrap();
        assert_eq!(h.flags & proto::FLAG_ERROR, 0, "error reply {}", h.error);
        body
    }

    /// Config dword at `offset`.
    fn config_read32(&mut self, offset: u64) -> u32 {
        let body = self.call(frame(
            2,
            proto::Command::RegionRead,
            &payload(|w| {
                w.u64(offset).u32(7).u32(4);
            }),
        ));
        u32::from_le_bytes(body[16..20].try_into().unwrap())
    }

    fn config_write16(&mut self, offset: u64, v: u16) {
        self.call(frame(
            3,
            proto::Command::RegionWrite,
            &payload(|w| {
                w.u64(offset).u32(7).u32(2).u16(v);
            }),
        ));
    }
}

/// One message a killed client sends, with its fds, as a ready `sendmsg` argument.
struct Prepared {
    bytes: Vec<u8>,
    /// Control buffer with one SCM_RIGHTS message (empty: no fds).
    cmsg: Vec<u64>,
    cmsg_len: usize,
}

impl Prepared {
    fn new(bytes: Vec<u8>, fds: &[RawFd]) -> Prepared {
        if fds.is_empty() {
            return Prepared {
                bytes,
                cmsg: Vec::new(),
                cmsg_len: 0,
            };
        }
        let data_len = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is a size computation.
        let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        let mut cmsg = vec![0u64; space.div_ceil(8)];
        // SAFETY: a msghdr pointing at our control buffer of `space` bytes; CMSG_FIRSTHDR returns
        // its start and the header and fds written stay inside it (CMSG_SPACE above).
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(data_len) as _;
            let d = libc::CMSG_DATA(c).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(d.add(i), *fd);
            }
        }
        Prepared {
            bytes,
            cmsg,
            cmsg_len: space,
        }
    }
}

/// Everything the killed clients send, prepared once.
struct Script {
    addr: libc::sockaddr_un,
    addr_len: libc::socklen_t,
    version: Prepared,
    map: Prepared,
    irqs: Prepared,
    /// A REGION_READ frame; the client sends part of it.
    read: Vec<u8>,
    _mem: std::fs::File,
    _efds: [EventFd; 2],
}

impl Script {
    fn new(socket: &Path, dir: &Path) -> Script {
        // SAFETY: sockaddr_un is plain data; all zeroes is valid.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = socket.as_os_str().as_bytes();
        assert!(bytes.len() < addr.sun_path.len());
        for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
            *d = b as libc::c_char;
        }
        let addr_len =
            (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
        // Client memory: a file the server maps (MAP_SHARED) through the fd it receives.
        let mem = unlinked_file(dir, MEM_SIZE);
        let efds = [
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ];
        let v = version_payload();
        let map = payload(|w| {
            w.u32(32).u32(3).u64(0).u64(IOVA).u64(MEM_SIZE);
        });
        let irqs = payload(|w| {
            w.u32(20)
                .u32(proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER)
                .u32(MSIX)
                .u32(0)
                .u32(2);
        });
        let read = frame(
            4,
            proto::Command::RegionRead,
            &payload(|w| {
                w.u64(0).u32(7).u32(4);
            }),
        );
        Script {
            addr,
            addr_len,
            version: Prepared::new(frame(1, proto::Command::Version, &v), &[]),
            map: Prepared::new(frame(2, proto::Command::DmaMap, &map), &[mem.as_raw_fd()]),
            irqs: Prepared::new(
                frame(3, proto::Command::DeviceSetIrqs, &irqs),
                &[efds[0].as_raw_fd(), efds[1].as_raw_fd()],
            ),
            read,
            _mem: mem,
            _efds: efds,
        }
    }
}

/// Exit codes of a client child that failed before it was killed.
const EXIT_CONNECT: i32 = 30;
const EXIT_SEND: i32 = 31;
const EXIT_REPLY: i32 = 32;
const EXIT_ERROR_REPLY: i32 = 33;
const EXIT_READY: i32 = 34;

/// Child side: send `p`, wait for its reply; `_exit` on any failure.
///
/// # Safety
/// Only in the forked child: plain system calls on memory prepared before the fork.
unsafe fn child_call(fd: RawFd, p: &Prepared, reply: &mut [u8]) {
    let mut iov = libc::iovec {
        iov_base: p.bytes.as_ptr() as *mut libc::c_void,
        iov_len: p.bytes.len(),
    };
    // SAFETY: zeroed msghdr is valid; it points at `iov` and `p.cmsg`, alive for the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if p.cmsg_len > 0 {
        msg.msg_control = p.cmsg.as_ptr() as *mut libc::c_void;
        msg.msg_controllen = p.cmsg_len;
    }
    // SAFETY: as above; the kernel only reads the buffers.
    if unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) } != p.bytes.len() as isize {
        // SAFETY: leaving the child.
        unsafe { libc::_exit(EXIT_SEND) };
    }
    let mut got = 0usize;
    let mut want = HEADER_SIZE;
    while got < want {
        // SAFETY: receiving into the rest of `reply`.
        let n = unsafe { libc::recv(fd, reply.as_mut_ptr().add(got).cast(), reply.len() - got, 0) };
        if n <= 0 {
            // SAFETY: leaving the child.
            unsafe { libc::_exit(EXIT_REPLY) };
        }
        got += n as usize;
        if got >= HEADER_SIZE {
            let size = u32::from_le_bytes([reply[4], reply[5], reply[6], reply[7]]) as usize;
            want = size.min(reply.len());
            if reply[8] & proto::FLAG_ERROR as u8 != 0 {
                // SAFETY: leaving the child.
                unsafe { libc::_exit(EXIT_ERROR_REPLY) };
            }
        }
    }
}

/// Fork a client that does cycle `i`'s script, tells us it is ready, and waits to be killed.
/// Returns its pid once it is ready.
fn killed_client(script: &Script, i: usize) -> libc::pid_t {
    let mut pipe = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two-element array.
    let r = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2");
    // SAFETY: both ends are fresh fds we own.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    let mut reply = [0u8; 4096];
    // Half a frame: half the header, or the header and part of the body.
    let partial = if i.is_multiple_of(2) {
        HEADER_SIZE / 2
    } else {
        HEADER_SIZE + 5
    };
    // SAFETY: the child only makes system calls on memory prepared above and ends in _exit or
    // SIGKILL; the parent continues normally.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: child side, see above.
        unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if fd < 0
                || libc::connect(fd, std::ptr::addr_of!(script.addr).cast(), script.addr_len) != 0
            {
                libc::_exit(EXIT_CONNECT);
            }
            child_call(fd, &script.version, &mut reply);
            if i % 4 == 1 || i % 4 == 3 {
                child_call(fd, &script.map, &mut reply);
            }
            if i % 4 == 2 || i % 4 == 3 {
                child_call(fd, &script.irqs, &mut reply);
            }
            libc::send(fd, script.read.as_ptr().cast(), partial, libc::MSG_NOSIGNAL);
            if libc::write(wr.as_raw_fd(), [1u8].as_ptr().cast(), 1) != 1 {
                libc::_exit(EXIT_READY);
            }
            loop {
                libc::pause();
            }
        }
    }
    drop(wr);
    let mut b = [0u8; 1];
    let ready = std::fs::File::from(rd).read(&mut b).unwrap_or(0) == 1;
    if !ready {
        let mut status = 0;
        // SAFETY: reaping our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        panic!(
            "client {i} failed before it was killed: exit {} (status {status:#x})",
            libc::WEXITSTATUS(status)
        );
    }
    pid
}

fn kill_and_reap(pid: libc::pid_t) {
    // SAFETY: signalling and reaping our own child.
    unsafe {
        assert_eq!(libc::kill(pid, libc::SIGKILL), 0);
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
    }
}

/// Usage measured while a normal client is attached and has been served (so the server has
/// finished cleaning up after every earlier client: it serves one client at a time).
fn settled_usage(s: &Serve) -> (Usage, Normal) {
    let mut n = Normal::connect(&s.socket("gpu0"));
    assert_eq!(
        n.config_read32(0),
        0x0b10_1234,
        "vendor/device id of the GPU"
    );
    (usage(s.pid()), n)
}

#[test]
fn test_server_survives_1000_clients_killed_mid_message_without_leaking() {
    let s = serve();
    let script = Script::new(&s.socket("gpu0"), s.dir());
    let cycles = std::env::var("PCISIM_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CYCLES);

    for i in 0..WARMUP {
        kill_and_reap(killed_client(&script, i));
    }
    {
        let mut n = Normal::connect(&s.socket("gpu0"));
        for k in 0..JOURNAL_FILL {
            n.config_write16(4, if k % 2 == 0 { 0x0002 } else { 0x0000 });
        }
    }
    let (before, normal) = settled_usage(&s);
    drop(normal);

    let t = Instant::now();
    for i in 0..cycles {
        kill_and_reap(killed_client(&script, i));
    }
    let soak = t.elapsed();

    let (after, mut normal) = settled_usage(&s);
    // The normal client is fully served: config and a BAR register (memory space on).
    normal.config_write16(4, 0x0002);
    let id = normal.call(frame(
        5,
        proto::Command::RegionRead,
        &payload(|w| {
            w.u64(0).u32(0).u32(4);
        }),
    ));
    assert_eq!(
        u32::from_le_bytes(id[16..20].try_into().unwrap()),
        0x4753_4350,
        "GPU ID register"
    );
    eprintln!(
        "soak: {cycles} killed clients in {:.1} s ({:.2} ms each); before {before:?}, after \
         {after:?}",
        soak.as_secs_f64(),
        soak.as_secs_f64() * 1e3 / cycles as f64
    );
    assert_eq!(
        after.fds, before.fds,
        "server fds: before {before:?}, after {after:?}"
    );
    assert_eq!(after.threads, before.threads, "server threads");
    assert!(
        after.maps <= before.maps + MAPS_SLACK,
        "server mappings: before {before:?}, after {after:?}"
    );
    assert!(
        after.rss_kb <= before.rss_kb + RSS_SLACK_KB,
        "server RSS: before {before:?}, after {after:?}"
    );
    let log = s.log();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}
