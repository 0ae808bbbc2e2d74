//! Access control of a device socket: the socket file's mode, and the server's check of the
//! peer's uid (SO_PEERCRED) at accept. Clients of another uid run in a forked child that
//! `setuid()`s to 65534 (nobody); those tests need root and say SKIP otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use pcisim_vfio_user::proto::{self, Command, HEADER_SIZE};
use pcisim_vfio_user::server::{admit_peer, peer_credentials, DEFAULT_SOCKET_MODE};
use pcisim_vfio_user::ServerOptions;

const NOBODY: u32 = 65534;

mod support;

use support::{capture_logs, frame, recv, serve_tiny, version_payload, warnings_of, Served};

/// A server for a config-space-only device in a fresh directory that any user may traverse.
fn serve(opts: ServerOptions) -> Served {
    serve_tiny("pcisim-sec", Some(0o755), 0, opts)
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn version_frame() -> Vec<u8> {
    frame(1, Command::Version as u16, &version_payload("{}"))
}

/// A client of our own uid negotiates and reads config space.
fn assert_served_here(path: &Path) {
    let mut s = support::connect(path, Duration::from_secs(5));
    s.write_all(&version_frame()).unwrap();
    let (h, _) = recv(&mut s);
    assert_eq!(h.flags & proto::FLAG_ERROR, 0);
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
