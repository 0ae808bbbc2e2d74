//! `pcisim serve` as a process: which files it removes (only the sockets it bound, compared by
//! st_dev/st_ino, also when startup fails half-way), and how it reports a full fd table.

// Test code: a failed expectation in a helper is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pcisim_vfio_user::proto::{self, Header};

mod support;

use support::{
    frame, is_socket, negotiated, read_reply, send_frame, version_payload, Serve, TestDir, PCISIM,
};

/// A fresh directory, removed on drop.
fn new_dir() -> TestDir {
    TestDir::new("files")
}

/// Starts `pcisim serve ARGS` in `dir` (log `TAG.log`) and waits until every path in
/// `wait_for` is a socket.
fn start(dir: &TestDir, tag: &str, args: &[String], wait_for: &[&Path]) -> Serve {
    wait_for
        .iter()
        .fold(
            Serve::in_dir(dir.path(), tag).args(args).rust_log("info"),
            |b, p| b.wait_for(p),
        )
        .start()
}

fn gpu(sock: &Path, id: &str) -> Vec<String> {
    vec![
        "--device".into(),
        format!("gpu:socket={},id={id},vram=1M", sock.display()),
    ]
}

/// A socket that a server answers: VERSION gets a reply.
fn answers(sock: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    send_frame(
        &mut s,
        &frame(1, proto::Command::Version, &version_payload()),
        &[],
    );
    read_reply(&mut s).is_ok()
}

/// SET_IRQS with `payload` and `fds`; the reply's header (None: the connection ended).
fn set_irqs(s: &mut UnixStream, payload: &[u8], fds: &[i32]) -> Option<Header> {
    send_frame(s, &frame(1, proto::Command::DeviceSetIrqs, payload), fds);
    read_reply(s).ok().map(|(h, _)| h)
}

// ---- which files shutdown removes -------------------------------------------------------------

#[test]
fn test_shutdown_leaves_a_regular_file_put_at_the_socket_path() {
    let dir = new_dir();
    let (a, b, control) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("ctl.sock"));
    let mut args = gpu(&a, "a");
    args.extend(gpu(&b, "b"));
    args.extend(["--control".into(), control.display().to_string()]);
    let s = start(&dir, "serve", &args, &[&a, &b, &control]);
    // Someone replaces a.sock with a regular file while the server runs.
    std::fs::remove_file(&a).unwrap();
    std::fs::write(&a, b"precious").unwrap();
    let (st, log) = s.terminate();
    assert!(st.success(), "{st}: {log}");
    assert_eq!(
        std::fs::read(&a).unwrap(),
        b"precious",
        "the file is left alone"
    );
    assert!(
        log.contains("no longer the socket this server bound"),
        "{log}"
    );
    // Its own sockets are removed: the removal works where it should.
    assert!(!b.exists() && !control.exists(), "{log}");
}

#[test]
fn test_shutdown_leaves_the_live_socket_of_a_second_server_that_took_the_path() {
    let dir = new_dir();
    let a = dir.join("a.sock");
    let first = start(&dir, "first", &gpu(&a, "a"), &[&a]);
    // The path is freed (an operator's rm) and a second server binds it.
    std::fs::remove_file(&a).unwrap();
    let second = start(&dir, "second", &gpu(&a, "a"), &[&a]);
    assert!(answers(&a));
    let (st, log) = first.terminate();
    assert!(st.success(), "{st}: {log}");
    assert!(
        is_socket(&a),
        "the second server's socket is still there: {log}"
    );
    assert!(answers(&a), "and the second server still answers on it");
    // The second server removes its own socket when it stops.
    let (st, log) = second.terminate();
    assert!(st.success(), "{st}: {log}");
    assert!(!a.exists(), "{log}");
}

#[test]
fn test_a_start_that_fails_at_the_second_device_removes_the_sockets_it_bound() {
    let dir = new_dir();
    let a = dir.join("a.sock");
    // The second device's directory does not exist.
    let mut args = gpu(&a, "a");
    args.extend(gpu(&dir.join("missing/b.sock"), "b"));
    let out = Command::new(PCISIM)
        .arg("serve")
        .args(&args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");
    assert!(!a.exists(), "a.sock was left behind: {err}");
    // The second device's path is a regular file: refused, and the file is left alone.
    let b = dir.join("b.sock");
    std::fs::write(&b, b"not a socket").unwrap();
    let mut args = gpu(&a, "a");
    args.extend(gpu(&b, "b"));
    let out = Command::new(PCISIM)
        .arg("serve")
        .args(&args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a socket"), "{err}");
    assert!(!a.exists(), "a.sock was left behind: {err}");
    assert_eq!(std::fs::read(&b).unwrap(), b"not a socket");
}

// ---- a full fd table ---------------------------------------------------------------------------

fn fds_of(pid: i32) -> BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Sets the soft RLIMIT_NOFILE of `pid`; returns the old limits.
fn set_nofile(pid: i32, soft: u64, hard: Option<u64>) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: (test) prlimit with a valid old-limit out pointer and no new limit reads them.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(r, 0);
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard.unwrap_or(old.rlim_max),
    };
    // SAFETY: (test) prlimit on our own child with valid pointers.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    old
}

#[test]
fn test_fds_lost_to_a_full_fd_table_are_reported_as_emfile_and_closed() {
    let dir = new_dir();
    let a = dir.join("a.sock");
    let s = start(&dir, "serve", &gpu(&a, "a"), &[&a]);
    let mut c = negotiated(&a, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(100)); // let the server settle
    let pid = s.pid() as i32;
    let before = fds_of(pid);
    // A soft limit that leaves exactly two free fd numbers.
    let mut limit = 0u64;
    let mut free = 0;
    while free < 2 {
        if !before.contains(&limit) {
            free += 1;
        }
        limit += 1;
    }
    let old = set_nofile(pid, limit, None);
    // SET_IRQS binding 6 MSI-X vectors, with 6 eventfds: only 2 can be installed.
    let efds: Vec<vmm_sys_util::eventfd::EventFd> = (0..6)
        .map(|_| vmm_sys_util::eventfd::EventFd::new(0).unwrap())
        .collect();
    let raw: Vec<i32> = efds.iter().map(|e| e.as_raw_fd()).collect();
    let mut p = proto::Writer::new();
    p.u32(20)
        .u32(proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER)
        .u32(2)
        .u32(0)
        .u32(6);
    let payload = p.finish();
    let h = set_irqs(&mut c, &payload, &raw).expect("a reply");
    assert_ne!(h.flags & proto::FLAG_ERROR, 0);
    assert_eq!(h.error, libc::EMFILE as u32, "EMFILE, not EINVAL");
    // The two that arrived were closed again.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(fds_of(pid), before, "fds left open in the server");
    set_nofile(pid, old.rlim_cur, Some(old.rlim_max));
    // The same request now succeeds: the server kept serving.
    let h = set_irqs(&mut c, &payload, &raw).expect("a reply");
    assert_eq!(h.flags & proto::FLAG_ERROR, 0, "errno {}", h.error);
    let log = s.log();
    assert!(log.contains("fd table full"), "{log}");
    assert!(!log.contains("more than 16 fds"), "{log}");
}
