//! `pcisim serve --socket-mode` and `--allow-uid` end to end: the mode of the socket files, and
//! which users' clients the real binary serves. Clients of another uid are this test binary
//! re-executed as uid 65534 (nobody) running `access_client_helper`; those tests need root and
//! say SKIP otherwise.

// Test code: a failed expectation in a helper is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pcisim_vfio_user::proto::{self, Header, HEADER_SIZE};

const PCISIM: &str = env!("CARGO_BIN_EXE_pcisim");
const NOBODY: u32 = 65534;
/// The helper's environment variable: the socket to try.
const HELPER_ENV: &str = "PCISIM_ACCESS_CLIENT_SOCKET";
/// Helper exit codes.
const SERVED: i32 = 10;
const CLOSED: i32 = 11;
const EACCES: i32 = 12;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A `pcisim serve` with one GPU and a control socket, started with `args`.
struct Serve {
    dir: PathBuf,
    child: Child,
}

impl Serve {
    fn dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pcisim-access-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Any user may reach the sockets' directory: the sockets' own modes decide.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    fn command(dir: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(PCISIM);
        cmd.arg("serve")
            .arg("--device")
            .arg(format!(
                "gpu:socket={},id=gpu0,vram=1M",
                dir.join("gpu0.sock").display()
            ))
            .arg("--control")
            .arg(dir.join("control.sock"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        cmd
    }

    fn start(args: &[&str]) -> Serve {
        let dir = Serve::dir();
        let log = std::fs::File::create(dir.join("serve.log")).unwrap();
        let child = Serve::command(&dir, args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start pcisim serve");
        let mut s = Serve { dir, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s.dir.join("control.sock").exists() {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("pcisim serve exited ({status}): {}", s.log());
            }
            assert!(Instant::now() < deadline, "no control socket: {}", s.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("gpu0.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// VERSION on `path`: Ok(true) if answered, Ok(false) if the server closed the connection.
fn try_version(path: &Path) -> std::io::Result<bool> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut p = proto::Writer::new();
    p.u16(0).u16(0).bytes(b"{}").bytes(&[0]);
    let body = p.finish();
    let h = Header {
        id: 1,
        command: proto::Command::Version as u16,
        size: (HEADER_SIZE + body.len()) as u32,
        flags: 0,
        error: 0,
    };
    let mut f = h.encode().to_vec();
    f.extend_from_slice(&body);
    if s.write_all(&f).is_err() {
        return Ok(false);
    }
    let mut hb = [0u8; HEADER_SIZE];
    match s.read_exact(&mut hb) {
        Ok(()) => Ok(Header::parse(&hb).flags & proto::FLAG_ERROR == 0),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Not a test of its own: the body of the re-executed client (does nothing without the env).
#[test]
fn access_client_helper() {
    let Some(path) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let code = match try_version(Path::new(&path)) {
        Ok(true) => SERVED,
        Ok(false) => CLOSED,
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => EACCES,
        Err(e) => {
            eprintln!("helper: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// Run the helper as `uid` against `path`; its exit code.
fn client_as(uid: u32, path: &Path) -> i32 {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "access_client_helper", "--nocapture"])
        .env(HELPER_ENV, path)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    out.status.code().unwrap_or_else(|| {
        panic!(
            "helper died: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn test_sockets_are_0600_by_default() {
    let s = Serve::start(&[]);
    assert_eq!(mode_of(&s.socket()), 0o600);
    assert_eq!(mode_of(&s.dir.join("control.sock")), 0o600);
    assert!(try_version(&s.socket()).unwrap(), "our own uid is served");
}

#[test]
fn test_socket_mode_option_sets_the_device_sockets_only() {
    let s = Serve::start(&["--socket-mode", "0660"]);
    assert_eq!(mode_of(&s.socket()), 0o660);
    assert_eq!(
        mode_of(&s.dir.join("control.sock")),
        0o600,
        "the control socket stays private"
    );
}

#[test]
fn test_bad_socket_modes_are_refused() {
    for bad in ["1777", "0999", "rw-------", ""] {
        let dir = Serve::dir();
        let out = Serve::command(&dir, &["--socket-mode", bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--socket-mode {bad:?} accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--socket-mode"),
            "the error names the option: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!dir.join("gpu0.sock").exists(), "nothing was served");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn test_other_uid_is_refused_unless_allowed() {
    if !is_root() {
        eprintln!("SKIP test_other_uid_is_refused_unless_allowed: needs root to run a client as uid {NOBODY}");
        return;
    }
    // Mode 0600: nobody cannot even connect.
    let s = Serve::start(&[]);
    assert_eq!(client_as(NOBODY, &s.socket()), EACCES);
    drop(s);
    // Mode 0666: nobody connects and is refused by its uid; the server goes on serving.
    let s = Serve::start(&["--socket-mode", "0666"]);
    assert_eq!(client_as(NOBODY, &s.socket()), CLOSED);
    assert!(
        try_version(&s.socket()).unwrap(),
        "our own uid is still served"
    );
    let log = s.log();
    assert!(
        log.contains("refused a client: pid") && log.contains(&format!("uid {NOBODY}")),
        "the refusal is logged with pid and uid:\n{log}"
    );
    drop(s);
    // --allow-uid: served.
    let s = Serve::start(&["--socket-mode", "0666", "--allow-uid", &NOBODY.to_string()]);
    assert_eq!(client_as(NOBODY, &s.socket()), SERVED);
}
