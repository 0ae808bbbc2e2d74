//! The guest agent: newline-delimited JSON over a serial port (the host↔guest
//! control channel; see README.md for the protocol).

use crate::sys;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const DEFAULT_PORT: &str = "/dev/ttyS1";
/// The longest request line accepted (write_file data travels inline).
pub const MAX_LINE: usize = 64 << 20;
/// Captured output kept per stream; the rest is counted and dropped.
pub const MAX_CAPTURE: usize = 8 << 20;
/// How long pipes are still drained after the program itself exited (a
/// background child may hold them open).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// The requests and their parsing, shared with the lab ([`pcisim_guest_wire::agent`]).
pub use pcisim_guest_wire::agent::{parse_request, KmsgRequest, Request, RunRequest};

/// The wire's base64 and replies, shared with the lab ([`pcisim_guest_wire::agent`]).
pub use pcisim_guest_wire::agent::base64_encode;
use pcisim_guest_wire::agent::{reply, KmsgReply, Ready, RunOutput};

/// Children spawned by `run` and not yet waited for. As PID 1 the agent also
/// reaps orphans, and must leave these to their own `wait`: the set is locked
/// across spawn-and-insert and across each reaping pass.
static TRACKED: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// The zombie processes whose parent is `parent`, from `/proc`.
fn zombie_children(parent: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parse_stat_state_ppid(&s))
                .is_some_and(|(state, ppid)| state == 'Z' && ppid == parent)
        })
        .collect()
}

/// `(state, ppid)` from a `/proc/<pid>/stat` line (the command name may contain
/// spaces and parentheses, so parse after the last `)`).
pub fn parse_stat_state_ppid(stat: &str) -> Option<(char, u32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

/// As PID 1: reaps orphaned processes (re-parented to us) that `run` does not
/// wait for itself.
fn reap_orphans_forever() {
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let Ok(tracked) = TRACKED.lock() else { return };
        for pid in zombie_children(std::process::id()) {
            if !tracked.contains(&pid) {
                sys::reap(pid);
            }
        }
        drop(tracked);
    }
}

/// The outcome of a `run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult {
    pub exit: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    /// The captured stdout bytes (exact, up to [`MAX_CAPTURE`]).
    pub stdout_raw: Vec<u8>,
    pub stderr: String,
    pub elapsed_ms: u64,
}

#[derive(Default)]
struct Capture {
    data: Vec<u8>,
    dropped: usize,
}

impl Capture {
    fn push(&mut self, b: &[u8]) {
        let room = MAX_CAPTURE.saturating_sub(self.data.len());
        let take = room.min(b.len());
        self.data.extend_from_slice(&b[..take]);
        self.dropped += b.len() - take;
    }

    fn into_string(self) -> String {
        let mut s = String::from_utf8_lossy(&self.data).into_owned();
        if self.dropped > 0 {
            s.push_str(&format!(
                "\n[pcisim-guest agent: {} bytes dropped]\n",
                self.dropped
            ));
        }
        s
    }
}

/// Reads what is available from the open pipes for up to `wait`. Closes (sets
/// to None) a pipe at EOF.
fn pump(pipes: &mut [(Option<File>, &mut Capture); 2], wait: Duration) -> Result<(), String> {
    let fds: Vec<(i32, i16)> = pipes
        .iter()
        .filter_map(|(p, _)| p.as_ref().map(|f| (f.as_raw_fd(), libc::POLLIN)))
        .collect();
    if fds.is_empty() {
        std::thread::sleep(wait);
        return Ok(());
    }
    let rev = sys::poll(&fds, Some(wait))?;
    if rev.is_empty() {
        return Ok(());
    }
    let mut buf = vec![0u8; 65536];
    let mut i = 0;
    for (pipe, cap) in pipes.iter_mut() {
        let Some(f) = pipe.as_mut() else { continue };
        let ready = rev.get(i).copied().unwrap_or(0);
        i += 1;
        if ready == 0 {
            continue;
        }
        match f.read(&mut buf) {
            Ok(0) => *pipe = None,
            Ok(n) => cap.push(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => *pipe = None,
        }
    }
    Ok(())
}

/// Runs `argv` with stdin from /dev/null, capturing stdout and stderr
/// separately; SIGKILLs its process group if `timeout` expires.
#[cfg(test)]
pub fn run_program(argv: &[String], timeout: Duration) -> Result<RunResult, String> {
    run_program_with(argv, None, timeout)
}

/// Where a program's standard input comes from.
pub enum Input<'a> {
    /// These bytes (fed from a thread, then closed).
    Bytes(&'a [u8]),
    /// This file.
    File(&'a str),
}

/// [`run_program`] with `stdin` fed to the program (from a thread, then
/// closed) instead of /dev/null.
pub fn run_program_with(
    argv: &[String],
    stdin: Option<Input<'_>>,
    timeout: Duration,
) -> Result<RunResult, String> {
    let (prog, args) = argv.split_first().ok_or("argv is empty")?;
    let start = Instant::now();
    let (stdio, stdin) = match stdin {
        None => (Stdio::null(), None),
        Some(Input::Bytes(b)) => (Stdio::piped(), Some(b)),
        Some(Input::File(path)) => (
            Stdio::from(File::open(path).map_err(|e| format!("stdin {path}: {e}"))?),
            None,
        ),
    };
    let mut tracked = TRACKED.lock().map_err(|_| "child table lock poisoned")?;
    let mut child: Child = Command::new(prog)
        .args(args)
        .stdin(stdio)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("spawn {prog}: {e}"))?;
    let pgid = child.id();
    tracked.insert(pgid);
    drop(tracked);
    // A program that does not read all of its input gets EPIPE here, which ends the feeder.
    let feeder = match (child.stdin.take(), stdin) {
        (Some(mut pipe), Some(data)) => {
            let data = data.to_vec();
            std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || {
                    let _ = pipe.write_all(&data);
                })
                .ok()
        }
        _ => None,
    };
    let result = supervise(prog, &mut child, start, timeout);
    if let Some(f) = feeder {
        let _ = f.join();
    }
    if let Ok(mut t) = TRACKED.lock() {
        t.remove(&pgid);
    }
    result
}

fn supervise(
    prog: &str,
    child: &mut Child,
    start: Instant,
    timeout: Duration,
) -> Result<RunResult, String> {
    let pgid = child.id();
    let out_pipe = child
        .stdout
        .take()
        .map(|p| File::from(std::os::fd::OwnedFd::from(p)));
    let err_pipe = child
        .stderr
        .take()
        .map(|p| File::from(std::os::fd::OwnedFd::from(p)));
    let mut out = Capture::default();
    let mut err = Capture::default();
    let mut pipes = [(out_pipe, &mut out), (err_pipe, &mut err)];
    let deadline = start + timeout;
    let mut status = None;
    let mut exited_at = None;
    let mut timed_out = false;
    loop {
        if status.is_none() {
            match child.try_wait() {
                Ok(Some(s)) => {
                    status = Some(s);
                    exited_at = Some(Instant::now());
                }
                Ok(None) => {}
                Err(e) => return Err(format!("wait for {prog}: {e}")),
            }
        }
        let pipes_open = pipes.iter().any(|(p, _)| p.is_some());
        if status.is_some() && !pipes_open {
            break;
        }
        if exited_at.is_some_and(|t| t.elapsed() >= DRAIN_AFTER_EXIT) {
            break; // a background process keeps the pipes: stop reading
        }
        let now = Instant::now();
        if status.is_none() && now >= deadline {
            timed_out = true;
            let _ = sys::kill_process_group(pgid, libc::SIGKILL);
            let _ = child.kill();
            let s = child.wait().map_err(|e| format!("wait for {prog}: {e}"))?;
            status = Some(s);
            exited_at = Some(Instant::now());
            continue;
        }
        let wait = deadline
            .saturating_duration_since(now)
            .min(Duration::from_millis(20));
        pump(&mut pipes, wait.max(Duration::from_millis(1)))?;
    }
    drop(pipes);
    let status = status.ok_or("internal: no exit status")?;
    Ok(RunResult {
        exit: status.code(),
        signal: status.signal(),
        timed_out,
        stdout_raw: out.data.clone(),
        stdout: out.into_string(),
        stderr: err.into_string(),
        elapsed_ms: start.elapsed().as_millis() as u64,
    })
}

/// The agent's `ready` line.
pub fn ready_message() -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let uptime_ms = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|secs| (secs * 1000.0) as u64);
    let mut v = serde_json::to_value(Ready {
        kernel,
        uptime_ms: uptime_ms.unwrap_or(0),
        agent_version: env!("CARGO_PKG_VERSION").into(),
    })
    .unwrap_or_else(|_| json!({}));
    v["ready"] = json!(true);
    v
}

fn error_reply(id: &Value, e: &str) -> Value {
    json!({"id": id, "error": e})
}

/// Handles one non-poweroff request and returns its reply.
pub fn handle(id: &Value, req: &Request) -> Value {
    match req {
        Request::Run(RunRequest {
            argv,
            timeout_ms,
            stdin,
            stdin_file,
            stdout_b64,
        }) => {
            let input = match (stdin, stdin_file) {
                (Some(b), _) => Some(Input::Bytes(b)),
                (None, Some(f)) => Some(Input::File(f)),
                (None, None) => None,
            };
            match run_program_with(argv, input, Duration::from_millis(*timeout_ms)) {
                Ok(r) => reply(
                    id,
                    &RunOutput {
                        exit: r.exit,
                        signal: r.signal,
                        timed_out: r.timed_out,
                        stdout_b64: stdout_b64.then(|| base64_encode(&r.stdout_raw)),
                        stdout: r.stdout,
                        stderr: r.stderr,
                        elapsed_ms: r.elapsed_ms,
                    },
                    false,
                ),
                Err(e) => error_reply(id, &e),
            }
        }
        Request::WriteFile { path, data } => match write_file(path, data) {
            Ok(()) => json!({"id": id, "ok": true}),
            Err(e) => json!({"id": id, "ok": false, "error": e}),
        },
        Request::ReadFile { path } => match std::fs::read(path) {
            Ok(d) => json!({"id": id, "ok": true, "data": String::from_utf8_lossy(&d)}),
            Err(e) => json!({"id": id, "ok": false, "error": format!("read {path}: {e}")}),
        },
        Request::Kmsg(KmsgRequest {
            after,
            boot_id,
            records,
        }) => match read_kmsg(*after, boot_id.as_deref(), *records) {
            Ok(k) => reply(id, &k, true),
            Err(e) => json!({"id": id, "ok": false, "error": e}),
        },
        Request::Ping => json!({"id": id, "ok": true}),
        Request::Poweroff => json!({"id": id, "ok": true}),
    }
}

/// The sequence number of a raw /dev/kmsg record (`PRIO,SEQ,TS,FLAGS;TEXT`).
pub fn kmsg_seq(record: &str) -> Option<u64> {
    record.split(';').next()?.split(',').nth(1)?.parse().ok()
}

/// Reads /dev/kmsg to its end without blocking: the records after `after` (all of them when
/// `after` is absent or the boot id differs from `boot_id`) unless `records` is false, the
/// next sequence number, the boot id and the taint. A record the ring overwrote before it was
/// read is skipped by the kernel (EPIPE); the host sees the gap in the sequence numbers.
fn read_kmsg(
    after: Option<u64>,
    boot_id: Option<&str>,
    records: bool,
) -> Result<KmsgReply, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string());
    let boot = read("/proc/sys/kernel/random/boot_id").map_err(|e| format!("boot_id: {e}"))?;
    let tainted: u64 = read("/proc/sys/kernel/tainted")
        .map_err(|e| format!("tainted: {e}"))?
        .parse()
        .map_err(|e| format!("tainted: {e}"))?;
    let rebooted = boot_id.is_some_and(|b| b != boot);
    let after = if rebooted { None } else { after };
    let mut kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .map_err(|e| format!("open /dev/kmsg: {e}"))?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = Vec::new();
    let mut next_seq = after.map_or(0, |a| a + 1);
    loop {
        match kmsg.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let rec = String::from_utf8_lossy(&buf[..n]);
                let rec = rec.trim_end_matches('\n');
                let Some(seq) = kmsg_seq(rec) else { continue };
                if after.is_some_and(|a| seq <= a) {
                    continue;
                }
                next_seq = next_seq.max(seq + 1);
                if records {
                    out.push(rec.to_string());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read /dev/kmsg: {e}")),
        }
    }
    Ok(KmsgReply {
        records: out,
        next_seq,
        boot_id: boot,
        tainted,
        rebooted,
    })
}

/// Writes `data` in a single write(2) where possible (sysfs attributes need it).
fn write_file(path: &str, data: &str) -> Result<(), String> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| format!("open {path}: {e}"))?;
    f.write_all(data.as_bytes())
        .map_err(|e| format!("write {path}: {e}"))
}

/// Splits complete lines off the front of `buf` (dropping `\r`).
pub fn take_lines(buf: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
        let mut line: Vec<u8> = buf.drain(..=pos).collect();
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        lines.push(line);
    }
    lines
}

type Writer = Arc<Mutex<File>>;

fn send(w: &Writer, v: &Value) {
    let mut line = v.to_string();
    line.push('\n');
    match w.lock() {
        Ok(mut f) => {
            if let Err(e) = f.write_all(line.as_bytes()).and_then(|()| f.flush()) {
                eprintln!("pcisim-guest agent: write reply: {e}");
            }
        }
        Err(_) => eprintln!("pcisim-guest agent: writer lock poisoned"),
    }
}

fn dispatch(w: &Writer, line: &[u8]) {
    let Ok(text) = std::str::from_utf8(line) else {
        send(w, &error_reply(&Value::Null, "request is not UTF-8"));
        return;
    };
    if text.trim().is_empty() {
        return;
    }
    let (id, req) = parse_request(text);
    let req = match req {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pcisim-guest agent: bad request: {e}");
            send(w, &error_reply(&id, &e));
            return;
        }
    };
    match req {
        Request::Poweroff => {
            eprintln!("pcisim-guest agent: id {id} poweroff");
            send(w, &json!({"id": id, "ok": true}));
            if let Ok(f) = w.lock() {
                sys::tcdrain(f.as_fd());
            }
            sys::sync();
            let e = sys::power_off();
            eprintln!("pcisim-guest agent: {e}");
            send(w, &error_reply(&id, &e));
        }
        req => {
            if let Request::Run(RunRequest { argv, .. }) = &req {
                eprintln!("pcisim-guest agent: id {id} run {argv:?}");
            }
            // Each request runs on its own thread so a long program does not
            // block the channel; replies carry the id.
            let w2 = Arc::clone(w);
            let spawned = std::thread::Builder::new()
                .name(format!("req-{id}"))
                .spawn(move || send(&w2, &handle(&id, &req)));
            if let Err(e) = spawned {
                send(w, &error_reply(&Value::Null, &format!("spawn thread: {e}")));
            }
        }
    }
}

/// `agent [--port PATH]`
pub fn run(o: pcisim_guest_wire::AgentOptions) -> i32 {
    let port = o.port.as_deref().unwrap_or(DEFAULT_PORT);
    let is_init = std::process::id() == 1;
    if is_init {
        if let Err(e) = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(reap_orphans_forever)
        {
            eprintln!("pcisim-guest agent: cannot start the orphan reaper: {e}");
        }
    }
    loop {
        match serve(port) {
            Ok(()) => return 0,
            Err(e) => {
                eprintln!("pcisim-guest agent: {e}");
                if !is_init {
                    return 1;
                }
                // PID 1 must never exit (the kernel would panic): retry.
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

fn serve(port: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(port)
        .map_err(|e| format!("open {port}: {e}"))?;
    sys::make_raw(tty.as_fd()).map_err(|e| format!("{port}: {e}"))?;
    let lflag = sys::local_flags(tty.as_fd())?;
    if lflag & (libc::ECHO | libc::ICANON) != 0 {
        return Err(format!(
            "{port}: echo/canonical mode still on (lflag 0x{lflag:x})"
        ));
    }
    let writer: Writer = Arc::new(Mutex::new(
        tty.try_clone().map_err(|e| format!("dup {port}: {e}"))?,
    ));
    eprintln!("pcisim-guest agent: serving on {port}");
    send(&writer, &ready_message());

    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 65536];
    let mut discarding = false;
    loop {
        let n = match tty.read(&mut chunk) {
            Ok(0) => return Err(format!("{port}: end of file")),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read {port}: {e}")),
        };
        buf.extend_from_slice(&chunk[..n]);
        if discarding {
            match buf.iter().position(|&b| b == b'\n') {
                Some(p) => {
                    buf.drain(..=p);
                    discarding = false;
                }
                None => {
                    buf.clear();
                    continue;
                }
            }
        }
        for line in take_lines(&mut buf) {
            dispatch(&writer, &line);
        }
        if buf.len() > MAX_LINE {
            buf.clear();
            discarding = true;
            send(
                &writer,
                &error_reply(
                    &Value::Null,
                    &format!("request line longer than {MAX_LINE} bytes; discarded"),
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcisim_guest_wire::agent::base64_decode;

    #[test]
    fn parses_requests_through_the_wire_types() {
        // The parsing itself is guest-wire's (its tests cover every op and error); this checks
        // the agent uses it: a run line becomes the request `handle` matches on.
        let (id, r) = parse_request(
            r#"{"id":3,"op":"run","argv":["/bin/pcisim-guest","e2"],"timeout_ms":60000}"#,
        );
        assert_eq!(id, json!(3));
        assert_eq!(
            r.unwrap(),
            Request::Run(RunRequest::new(
                vec!["/bin/pcisim-guest".into(), "e2".into()],
                60000
            ))
        );
        let (id, r) = parse_request(r#"{"id":9,"op":"dance"}"#);
        assert_eq!(id, json!(9));
        assert!(r.unwrap_err().contains("unknown op"));
        assert_eq!(kmsg_seq("4,1234,52118042,-;x;y"), Some(1234));
        assert_eq!(kmsg_seq("garbage"), None);
    }

    #[test]
    fn splits_lines() {
        let mut b = b"{\"a\":1}\r\n{\"b\":2}\n{\"c\"".to_vec();
        let l = take_lines(&mut b);
        assert_eq!(l, vec![b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]);
        assert_eq!(b, b"{\"c\"".to_vec());
        b.extend_from_slice(b":3}\n");
        assert_eq!(take_lines(&mut b), vec![b"{\"c\":3}".to_vec()]);
        assert!(b.is_empty());
    }

    #[test]
    fn runs_programs() {
        let r = run_program(
            &[
                "/bin/sh".into(),
                "-c".into(),
                "echo out; echo err >&2; exit 3".into(),
            ],
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(r.exit, Some(3));
        assert_eq!(r.signal, None);
        assert!(!r.timed_out);
        assert_eq!(r.stdout, "out\n");
        assert_eq!(r.stderr, "err\n");

        let r = run_program(
            &["/bin/sh".into(), "-c".into(), "echo start; sleep 30".into()],
            Duration::from_millis(300),
        )
        .unwrap();
        assert!(r.timed_out);
        assert_eq!(r.exit, None);
        assert_eq!(r.signal, Some(libc::SIGKILL));
        assert_eq!(r.stdout, "start\n");
        assert!(r.elapsed_ms < 5000, "{}", r.elapsed_ms);

        assert!(run_program(&["/nonexistent/prog".into()], Duration::from_secs(1)).is_err());
    }

    #[test]
    fn background_child_does_not_hold_the_reply() {
        let t = Instant::now();
        let r = run_program(
            &["/bin/sh".into(), "-c".into(), "sleep 5 & echo done".into()],
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(r.exit, Some(0));
        assert_eq!(r.stdout, "done\n");
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn large_output_is_captured() {
        let r = run_program(
            &[
                "/bin/sh".into(),
                "-c".into(),
                "head -c 300000 /dev/zero | tr '\\0' x; head -c 1000 /dev/zero | tr '\\0' y >&2"
                    .into(),
            ],
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(r.stdout.len(), 300000);
        assert_eq!(r.stderr.len(), 1000);
    }

    #[test]
    fn handles_file_ops() {
        let p = std::env::temp_dir().join(format!("pcisim-guest-agent-{}", std::process::id()));
        let ps = p.to_string_lossy().into_owned();
        let id = json!(1);
        let r = handle(
            &id,
            &Request::WriteFile {
                path: ps.clone(),
                data: "hello".into(),
            },
        );
        assert_eq!(r, json!({"id":1,"ok":true}));
        let r = handle(&id, &Request::ReadFile { path: ps.clone() });
        assert_eq!(r, json!({"id":1,"ok":true,"data":"hello"}));
        std::fs::remove_file(&p).unwrap();
        let r = handle(
            &id,
            &Request::WriteFile {
                path: "/nonexistent-dir/x".into(),
                data: String::new(),
            },
        );
        assert_eq!(r["ok"], json!(false));
        assert!(r["error"].as_str().unwrap().contains("/nonexistent-dir/x"));
    }

    #[test]
    fn reads_kmsg_back_to_back() {
        // Needs a readable /dev/kmsg (root, or dmesg_restrict=0 on some kernels); otherwise the
        // error must name it.
        let all = match read_kmsg(None, None, true) {
            Ok(v) => serde_json::to_value(v).unwrap(),
            Err(e) => {
                assert!(e.contains("/dev/kmsg"), "{e}");
                return;
            }
        };
        let recs = all["records"].as_array().unwrap();
        assert!(!recs.is_empty());
        let last = kmsg_seq(recs.last().unwrap().as_str().unwrap()).unwrap();
        assert!(all["next_seq"].as_u64().unwrap() > last);
        assert_eq!(all["rebooted"], json!(false));
        let boot = all["boot_id"].as_str().unwrap().to_string();
        // From the last record on: only it and what came after.
        let tail =
            serde_json::to_value(read_kmsg(Some(last - 1), Some(&boot), true).unwrap()).unwrap();
        let seqs: Vec<u64> = tail["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| kmsg_seq(r.as_str().unwrap()).unwrap())
            .collect();
        assert_eq!(seqs.first(), Some(&last));
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        // Another boot id: everything again, flagged.
        let other =
            serde_json::to_value(read_kmsg(Some(last), Some("another-boot"), false).unwrap())
                .unwrap();
        assert_eq!(other["rebooted"], json!(true));
        assert!(other["records"].as_array().unwrap().is_empty());
        assert!(other["next_seq"].as_u64().unwrap() > last);
    }

    #[test]
    fn parses_proc_stat() {
        assert_eq!(
            parse_stat_state_ppid("42 (a) b) Z 1 42 42 0 -1 4194560"),
            Some(('Z', 1))
        );
        assert_eq!(parse_stat_state_ppid("7 (sh) S 3 7"), Some(('S', 3)));
        assert_eq!(parse_stat_state_ppid("garbage"), None);
        let me = std::fs::read_to_string("/proc/self/stat").unwrap();
        let (state, ppid) = parse_stat_state_ppid(&me).unwrap();
        assert!("RSD".contains(state), "{state}");
        assert!(ppid > 0);
    }

    #[test]
    fn zombies_of_other_parents_are_not_listed() {
        // A child of ours that exits stays a zombie until it is waited for.
        let child = Command::new("/bin/true").spawn().unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !zombie_children(std::process::id()).contains(&pid) {
            assert!(
                Instant::now() < deadline,
                "child {pid} never listed as a zombie"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Nobody is the parent of a pid that does not exist; other tests' children (which run
        // concurrently, so may be zombies for a moment) are ours, never another parent's.
        assert!(zombie_children(u32::MAX).is_empty());
        assert!(!zombie_children(1).contains(&pid));
        assert!(sys::reap(pid));
        drop(child);
        assert!(!zombie_children(std::process::id()).contains(&pid));
    }

    #[test]
    fn ready_line_shape() {
        let r = ready_message();
        assert_eq!(r["ready"], json!(true));
        assert!(r["kernel"].is_string());
        assert!(r["uptime_ms"].is_u64());
    }

    #[test]
    fn stdin_is_fed_and_stdout_is_exact() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let r = handle(
            &json!(1),
            &Request::Run(RunRequest {
                stdin: Some(data.clone()),
                stdout_b64: true,
                ..RunRequest::new(vec!["/bin/cat".into()], 10_000)
            }),
        );
        assert_eq!(r["exit"], json!(0));
        assert_eq!(
            base64_decode(r["stdout_b64"].as_str().unwrap()).unwrap(),
            data
        );
        let p = std::env::temp_dir().join(format!("pcisim-agent-stdin-{}", std::process::id()));
        std::fs::write(&p, &data).unwrap();
        let r = handle(
            &json!(2),
            &Request::Run(RunRequest {
                stdin_file: Some(p.to_string_lossy().into_owned()),
                stdout_b64: true,
                ..RunRequest::new(vec!["/bin/cat".into()], 10_000)
            }),
        );
        std::fs::remove_file(&p).unwrap();
        assert_eq!(r["exit"], json!(0));
        assert_eq!(
            base64_decode(r["stdout_b64"].as_str().unwrap()).unwrap(),
            data
        );
        // A program that reads nothing still ends (the feeder gets EPIPE).
        let r = run_program_with(
            &["/bin/true".into()],
            Some(Input::Bytes(&vec![0u8; 1 << 20])),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(r.exit, Some(0));
    }

    #[test]
    fn base64_round_trip() {
        for n in 0..100usize {
            let d: Vec<u8> = (0..n).map(|i| (i * 13 + n) as u8).collect();
            assert_eq!(base64_decode(&base64_encode(&d)).unwrap(), d);
        }
    }
}
