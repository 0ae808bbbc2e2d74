//! Access control of a device socket: the socket file's mode, and the server's check of the
//! peer's uid (SO_PEERCRED) at accept. Clients of another uid run in a forked child that
//! `setuid()`s to 65534 (nobody); those tests need root and say SKIP otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pcisim_vfio_user::proto::{self, Command, Header, HEADER_SIZE};
use pcisim_vfio_user::server::{admit_peer, peer_credentials, DEFAULT_SOCKET_MODE};
use pcisim_vfio_user::{
    ClientLink, Device, DeviceError, IrqInfo, RegionFlags, RegionInfo, Server, ServerOptions,
};

const NOBODY: u32 = 65534;

/// A device with nothing but a 256-byte config space.
struct Tiny;

impl Device for Tiny {
    fn device_flags(&self) -> u32 {
        proto::DEVICE_FLAGS_PCI
    }
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        (index < 9).then(|| RegionInfo {
            size: if index == 7 { 256 } else { 0 },
            flags: RegionFlags {
                read: true,
                write: true,
                mmap: false,
            },
            mmap: None,
        })
    }
    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        (index < 5).then(IrqInfo::default)
    }
    fn region_read(&mut self, _: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (offset as usize + i) as u8;
        }
        Ok(())
    }
    fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> Result<(), DeviceError> {
        Ok(())
    }
    fn attach(&mut self, _: ClientLink) {}
    fn detach(&mut self) {}
    fn reset(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
}

// ---- captured log ----------------------------------------------------------------------------

static LOGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            LOGS.lock()
                .unwrap()
                .push(format!("{} {}", r.level(), r.args()));
        }
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

fn capture_logs() {
    // Several tests call this; only the first installs the logger.
    if log::set_logger(&CAPTURE).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

fn warnings_of(name: &str) -> Vec<String> {
    LOGS.lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with(&format!("WARN {name}:")))
        .cloned()
        .collect()
}

// ---- helpers -----------------------------------------------------------------------------------

struct Served {
    path: PathBuf,
    _dir: vmm_sys_util::tempdir::TempDir,
}

/// A server for `Tiny` in a fresh directory that any user may traverse.
fn serve(opts: ServerOptions) -> Served {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/pcisim-sec").unwrap();
    std::fs::set_permissions(dir.as_path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.as_path().join("dev.sock");
    let server = Server::bind(&path, Arc::new(Mutex::new(Tiny)), opts).unwrap();
    std::thread::spawn(move || server.run());
    Served { path, _dir: dir }
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn version_frame() -> Vec<u8> {
    let mut p = proto::Writer::new();
    p.u16(0).u16(0).bytes(b"{}").bytes(&[0]);
    let body = p.finish();
    let h = Header {
        id: 1,
        command: Command::Version as u16,
        size: (HEADER_SIZE + body.len()) as u32,
        flags: 0,
        error: 0,
    };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(&body);
    v
}

/// A client of our own uid negotiates and reads config space.
fn assert_served_here(path: &Path) {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&version_frame()).unwrap();
    let mut hb = [0u8; HEADER_SIZE];
    s.read_exact(&mut hb).unwrap();
    let h = Header::parse(&hb);
    assert_eq!(h.flags & proto::FLAG_ERROR, 0);
    let mut rest = vec![0u8; h.size as usize - HEADER_SIZE];
    s.read_exact(&mut rest).unwrap();
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("SKIP {test}: needs root to setuid() a client to {NOBODY}");
    true
}

/// What the forked client saw (its exit code).
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// VERSION was answered.
    Served,
    /// The server closed the connection without a reply.
    Closed,
    /// connect() failed with EACCES (the socket file's mode kept us out).
    Eacces,
    /// Anything else (exit code).
    Other(i32),
}

const EXIT_SERVED: i32 = 10;
const EXIT_CLOSED: i32 = 11;
const EXIT_EACCES: i32 = 12;

/// Fork a child that becomes `uid`, connects to `path`, sends VERSION and reports what
/// happened. Everything it needs is prepared before the fork; the child only makes system calls
/// (no allocation, no locks, no unwinding) and leaves with `_exit`.
fn client_as(uid: u32, path: &Path) -> (i32, Seen) {
    let frame = version_frame();
    // SAFETY: sockaddr_un is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len());
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    let addr_len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    let mut reply = [0u8; 64];
    // SAFETY: fork in a test process; the child below only calls async-signal-safe functions on
    // memory prepared before the fork and ends with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: child side: plain system calls on the prepared buffers; every path ends in
        // _exit, so no Rust code of the parent (destructors, test harness) runs here.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                libc::_exit(20);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if fd < 0 {
                libc::_exit(21);
            }
            if libc::connect(fd, std::ptr::addr_of!(addr).cast(), addr_len) != 0 {
                libc::_exit(if *libc::__errno_location() == libc::EACCES {
                    EXIT_EACCES
                } else {
                    22
                });
            }
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            let sent = libc::send(fd, frame.as_ptr().cast(), frame.len(), libc::MSG_NOSIGNAL);
            if sent < 0 {
                let e = *libc::__errno_location();
                libc::_exit(if e == libc::EPIPE || e == libc::ECONNRESET {
                    EXIT_CLOSED
                } else {
                    23
                });
            }
            let n = libc::recv(fd, reply.as_mut_ptr().cast(), reply.len(), 0);
            if n == 0 || (n < 0 && *libc::__errno_location() == libc::ECONNRESET) {
                libc::_exit(EXIT_CLOSED);
            }
            if n >= HEADER_SIZE as isize && reply[8] & (proto::FLAG_ERROR as u8) == 0 {
                libc::_exit(EXIT_SERVED);
            }
            libc::_exit(24);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for the child we just forked.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    assert!(
        libc::WIFEXITED(status),
        "client child died: status {status:#x}"
    );
    let seen = match libc::WEXITSTATUS(status) {
        EXIT_SERVED => Seen::Served,
        EXIT_CLOSED => Seen::Closed,
        EXIT_EACCES => Seen::Eacces,
        other => Seen::Other(other),
    };
    (pid, seen)
}

// ---- tests ---------------------------------------------------------------------------------------

#[test]
fn test_socket_file_is_0600_by_default() {
    let s = serve(ServerOptions::default());
    assert_eq!(DEFAULT_SOCKET_MODE, 0o600);
    assert_eq!(mode_of(&s.path), 0o600);
    assert_served_here(&s.path);
}

#[test]
fn test_socket_mode_is_exactly_the_configured_one_whatever_the_umask() {
    // bind() applies the umask (022 strips group write from 0660): the server chmods after.
    for mode in [0o660, 0o666, 0o640] {
        let s = serve(ServerOptions {
            socket_mode: mode,
            ..Default::default()
        });
        assert_eq!(mode_of(&s.path), mode, "mode {mode:o}");
    }
}

#[test]
fn test_peer_credentials_are_the_connecting_process() {
    let (a, _b) = UnixStream::pair().unwrap();
    let c = peer_credentials(&a).unwrap();
    assert_eq!(c.pid, std::process::id() as i32);
    // SAFETY: geteuid has no preconditions.
    assert_eq!(c.uid, unsafe { libc::geteuid() });
    assert!(admit_peer(&a, &[], "self"), "our own uid is admitted");
}

#[test]
fn test_other_user_cannot_even_connect_to_a_0600_socket() {
    if skip_unless_root("test_other_user_cannot_even_connect_to_a_0600_socket") {
        return;
    }
    let s = serve(ServerOptions::default());
    assert_eq!(client_as(NOBODY, &s.path).1, Seen::Eacces);
    assert_served_here(&s.path);
}

#[test]
fn test_other_uid_is_refused_by_its_credentials_and_the_server_keeps_serving() {
    if skip_unless_root("test_other_uid_is_refused_by_its_credentials_and_the_server_keeps_serving")
    {
        return;
    }
    capture_logs();
    // A world-writable socket lets nobody connect: the uid check alone must refuse it.
    let name = "sec-refuse";
    let s = serve(ServerOptions {
        name: name.into(),
        socket_mode: 0o666,
        ..Default::default()
    });
    for _ in 0..3 {
        let (pid, seen) = client_as(NOBODY, &s.path);
        assert_eq!(
            seen,
            Seen::Closed,
            "a client of uid {NOBODY} is closed unanswered"
        );
        let warned = warnings_of(name);
        assert!(
            warned
                .iter()
                .any(|l| l.contains(&format!("pid {pid} uid {NOBODY}"))),
            "the refusal is logged with pid and uid: {warned:?}"
        );
        // The server is still there for its own user.
        assert_served_here(&s.path);
    }
}

#[test]
fn test_allowed_uid_is_served() {
    if skip_unless_root("test_allowed_uid_is_served") {
        return;
    }
    let s = serve(ServerOptions {
        name: "sec-allow".into(),
        socket_mode: 0o666,
        allowed_uids: vec![NOBODY],
        ..Default::default()
    });
    assert_eq!(client_as(NOBODY, &s.path).1, Seen::Served);
    assert_served_here(&s.path);
}
