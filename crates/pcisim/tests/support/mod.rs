//! Test support shared by the tests that run the real `pcisim serve` binary (`shm.rs`,
//! `soak.rs`, `control.rs`, `serve_files.rs`): a server child in a fresh directory started with
//! a builder that waits for its sockets, `pcisim ctl` against its control socket, raw
//! vfio-user frames over a `UnixStream` (with fds), and a few `/proc` readings.
//!
//! Each test file includes it with `mod support;`; not every file uses every item.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pcisim_vfio_user::proto::{self, Header, HEADER_SIZE};
use serde_json::Value;

/// The `pcisim` binary under test.
pub const PCISIM: &str = env!("CARGO_BIN_EXE_pcisim");
/// How long a server may take to bind its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(20);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A fresh directory `$TMPDIR/pcisim-<tag>-<pid>-<n>`, removed on drop.
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        let d = std::env::temp_dir().join(format!(
            "pcisim-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TestDir(d)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether `p` is a unix socket.
pub fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// How to start a `pcisim serve` child ([`Serve::builder`], [`Serve::in_dir`]).
pub struct ServeBuilder {
    dir: PathBuf,
    own: Option<TestDir>,
    log: PathBuf,
    args: Vec<OsString>,
    wait_for: Vec<PathBuf>,
    control: Option<PathBuf>,
    rust_log: Option<&'static str>,
    nofile: Option<u64>,
}

impl ServeBuilder {
    /// `--device KIND:socket=DIR/ID.sock,id=ID` + `extra` (e.g. `,vram=1M`); waits for the socket.
    pub fn device(mut self, kind: &str, id: &str, extra: &str) -> Self {
        let sock = self.dir.join(format!("{id}.sock"));
        self.args.push("--device".into());
        self.args
            .push(format!("{kind}:socket={},id={id}{extra}", sock.display()).into());
        self.wait_for.push(sock);
        self
    }

    /// A GPU with 1 MiB of VRAM (what these tests need; the default is larger).
    pub fn gpu(self, id: &str) -> Self {
        self.device("gpu", id, ",vram=1M")
    }

    /// `--control DIR/control.sock`; waits for it.
    pub fn control(mut self) -> Self {
        let sock = self.dir.join("control.sock");
        self.args.push("--control".into());
        self.args.push(sock.clone().into());
        self.wait_for.push(sock.clone());
        self.control = Some(sock);
        self
    }

    /// More `pcisim serve` arguments, verbatim.
    pub fn args<S: Into<OsString>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Waits for a socket at `path` too.
    pub fn wait_for(mut self, path: &Path) -> Self {
        self.wait_for.push(path.to_path_buf());
        self
    }

    /// `RUST_LOG` for the child (unset: inherited).
    pub fn rust_log(mut self, level: &'static str) -> Self {
        self.rust_log = Some(level);
        self
    }

    /// RLIMIT_NOFILE of the child.
    pub fn nofile(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }

    /// Spawns the server (stdout and stderr to the log) and waits until every socket it was
    /// given exists; panics with the log if it exits first or takes too long.
    pub fn start(self) -> Serve {
        let mut cmd = Command::new(PCISIM);
        cmd.arg("serve").args(&self.args);
        if let Some(level) = self.rust_log {
            cmd.env("RUST_LOG", level);
        }
        let log = File::create(&self.log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(n) = self.nofile {
            // SAFETY: between fork and exec the closure only calls setrlimit (async-signal-safe)
            // on a stack value.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("start pcisim serve");
        let mut s = Serve {
            child,
            dir: self.dir,
            log: self.log,
            control: self.control,
            _own: self.own,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.wait_for.iter().all(|p| is_socket(p)) {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("pcisim serve exited ({status}): {}", s.log());
            }
            assert!(Instant::now() < deadline, "sockets not up: {}", s.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }
}

/// A `pcisim serve` child; killed on drop (and its directory removed if it has its own).
pub struct Serve {
    pub child: Child,
    dir: PathBuf,
    log: PathBuf,
    control: Option<PathBuf>,
    _own: Option<TestDir>,
}

impl Serve {
    /// A server in a fresh directory of its own ([`TestDir`] `tag`), logging to `serve.log`.
    pub fn builder(tag: &str) -> ServeBuilder {
        let own = TestDir::new(tag);
        let dir = own.path().to_path_buf();
        ServeBuilder {
            log: dir.join("serve.log"),
            dir,
            own: Some(own),
            args: Vec::new(),
            wait_for: Vec::new(),
            control: None,
            rust_log: None,
            nofile: None,
        }
    }

    /// A server in `dir`, which the caller owns, logging to `<log_tag>.log`.
    pub fn in_dir(dir: &Path, log_tag: &str) -> ServeBuilder {
        ServeBuilder {
            log: dir.join(format!("{log_tag}.log")),
            dir: dir.to_path_buf(),
            own: None,
            args: Vec::new(),
            wait_for: Vec::new(),
            control: None,
            rust_log: None,
            nofile: None,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The socket of device `id` (added with [`ServeBuilder::device`]).
    pub fn socket(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.sock"))
    }

    /// The control socket (added with [`ServeBuilder::control`]).
    pub fn control(&self) -> &Path {
        self.control.as_deref().expect("started with .control()")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the server died:\n{}",
            self.log()
        );
    }

    /// SIGTERM, then the exit status and the log.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        // SAFETY: (test) signalling our own child process.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st, self.log());
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `pcisim ctl --control SOCK ARGS...`
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(PCISIM)
            .arg("ctl")
            .arg("--control")
            .arg(self.control())
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run pcisim ctl")
    }

    /// `pcisim ctl --json ARGS...`, which must succeed; its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ctl(&all);
        assert!(
            out.status.success(),
            "pcisim ctl {all:?} failed ({}): {}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `pcisim ctl ARGS...`, which must fail with exit 1; its stderr.
    pub fn ctl_err(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "pcisim ctl {args:?} must fail; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// The journal of `device` as JSON records (`ctl --json journal`).
    pub fn journal(&self, device: &str) -> Vec<Value> {
        json_lines(&self.ctl_ok(&["journal", "--device", device]))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One JSON value per line.
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A plain file of `len` bytes in `dir` (not sealable, like a QEMU file or hugetlbfs backend),
/// already unlinked: "guest memory" a server maps (MAP_SHARED) through the fd it receives with
/// DMA_MAP.
pub fn unlinked_file(dir: &Path, len: u64) -> File {
    let path = dir.join(format!("mem-{}", NEXT.fetch_add(1, Ordering::SeqCst)));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(len).unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}

// ---- /proc --------------------------------------------------------------------------------------

/// Open fds of `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The number after `name` (e.g. `VmRSS:`, `Threads:`) in `/proc/PID/status`.
pub fn status_field(pid: u32, name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

// ---- raw vfio-user frames ---------------------------------------------------------------------

/// A payload written with the protocol's writer.
pub fn payload(f: impl FnOnce(&mut proto::Writer)) -> Vec<u8> {
    let mut w = proto::Writer::new();
    f(&mut w);
    w.finish()
}

/// A frame: header (`id`, `cmd`, no flags) and payload.
pub fn frame(id: u16, cmd: proto::Command, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        id,
        command: cmd as u16,
        size: (HEADER_SIZE + payload.len()) as u32,
        flags: 0,
        error: 0,
    };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(payload);
    v
}

/// A VERSION payload: version 0.0, no capabilities (`{}`).
pub fn version_payload() -> Vec<u8> {
    payload(|w| {
        w.u16(0).u16(0).bytes(b"{}").bytes(&[0]);
    })
}

/// Sends `frame` whole, with `fds` in one SCM_RIGHTS message if any.
pub fn send_frame(s: &mut UnixStream, frame: &[u8], fds: &[RawFd]) {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    if fds.is_empty() {
        s.write_all(frame).unwrap();
    } else {
        let n = s.send_with_fds(&[frame], fds).unwrap();
        assert_eq!(n, frame.len(), "sendmsg");
    }
}

/// One whole reply: its header and body.
pub fn read_reply(s: &mut UnixStream) -> std::io::Result<(Header, Vec<u8>)> {
    let mut hb = [0u8; HEADER_SIZE];
    s.read_exact(&mut hb)?;
    let h = Header::parse(&hb);
    let mut body = vec![0u8; h.size as usize - HEADER_SIZE];
    s.read_exact(&mut body)?;
    Ok((h, body))
}

/// A connection to the device socket `path` that has negotiated VERSION (which must succeed);
/// its reads time out after `read_timeout`.
pub fn negotiated(path: &Path, read_timeout: Duration) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(read_timeout)).unwrap();
    send_frame(
        &mut s,
        &frame(1, proto::Command::Version, &version_payload()),
        &[],
    );
    let (h, _) = read_reply(&mut s).unwrap();
    assert_eq!(
        h.flags & proto::FLAG_ERROR,
        0,
        "VERSION: error reply {}",
        h.error
    );
    s
}
