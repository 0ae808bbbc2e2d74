//! The host side of the guest agent link: newline-delimited JSON over the guest's second serial
//! port, which QEMU connects to a unix socket the lab listens on.
//!
//! ```text
//! guest → {"ready":true,"kernel":"6.12.48+deb13-amd64","uptime_ms":2310}
//! host  → {"id":1,"op":"run","argv":["/bin/pcisim-guest","e1",...],"timeout_ms":60000}
//! guest → {"id":1,"exit":0,"signal":null,"timed_out":false,"stdout":"KTAP...","stderr":"","elapsed_ms":812}
//! host  → {"id":2,"op":"write_file","path":"/tmp/x","data":"..."}      guest → {"id":2,"ok":true}
//! host  → {"id":3,"op":"kmsg","after":1234,"boot_id":"..."}
//! guest → {"id":3,"ok":true,"records":["4,1235,52118042,-;WARNING: CPU: ..."],"next_seq":1236,
//!          "boot_id":"...","tainted":4608,"rebooted":false}
//! host  → {"id":4,"op":"poweroff"}                                      guest → {"id":3,"ok":true}
//! errors: {"id":N,"error":"..."} (or {"ok":false,"error":"..."})
//! ```
//!
//! Only one request is outstanding at a time. Every wait has a deadline and returns early when the
//! lab is interrupted ([`crate::vm::process::interrupted`]).

use std::fs::File;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, warn};
use serde_json::Value;

/// The agent's wire types, shared with the guest agent ([`pcisim_guest_wire::agent`]).
pub use pcisim_guest_wire::agent::{base64_decode, base64_encode, KmsgReply, Ready, RunOutput};
use pcisim_guest_wire::agent::{KmsgRequest, Request, RunRequest};

use crate::vm::lines::{JsonLines, LineError};
use crate::vm::process::{self, POLL};

/// Slack added to a `run` request's guest-side timeout before the host gives up waiting.
pub const RUN_SLACK: Duration = Duration::from_secs(30);

/// `d` in whole milliseconds, as the wire's `timeout_ms` (saturating).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Errors on the agent link.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Socket-level failure.
    #[error("Agent socket {what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Nothing arrived in time.
    #[error("Timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    /// The guest side closed the link (QEMU exited or the agent died).
    #[error("The agent link closed while waiting for {0}")]
    Closed(String),
    /// The watcher reported a reason to stop waiting (e.g. QEMU exited).
    #[error("Stopped waiting for {what}: {reason}")]
    Aborted {
        /// What was awaited.
        what: String,
        /// Why the wait stopped.
        reason: String,
    },
    /// The lab was interrupted.
    #[error("Interrupted by signal {0}")]
    Interrupted(i32),
    /// The agent greeted again while a reply was awaited: the guest rebooted (a reset, or a
    /// panic with QEMU set to reboot).
    #[error("The guest rebooted (the agent greeted again) while waiting for {0}")]
    Rebooted(String),
    /// The agent answered with an error.
    #[error("The agent refused {op}: {message}")]
    Remote {
        /// The request's op.
        op: String,
        /// The agent's message.
        message: String,
    },
    /// The agent's answer does not have the documented shape.
    #[error("Malformed agent reply to {op}: {reply}")]
    Malformed {
        /// The request's op.
        op: String,
        /// The reply.
        reply: String,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

/// The standard input of [`Agent::run_exact`].
#[derive(Debug, Clone, Copy)]
pub enum RunInput<'a> {
    /// These bytes, through the agent link.
    Bytes(&'a [u8]),
    /// This file in the guest.
    GuestFile(&'a str),
}

/// A position in the guest kernel log: where the next slice starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsgMark {
    /// The first sequence number of the next slice.
    pub next_seq: u64,
    /// The boot it belongs to.
    pub boot_id: String,
    /// The taint at that point.
    pub tainted: u64,
}

impl KmsgMark {
    /// Where the slice after `reply` starts.
    pub fn of(reply: &KmsgReply) -> KmsgMark {
        KmsgMark {
            next_seq: reply.next_seq,
            boot_id: reply.boot_id.clone(),
            tainted: reply.tainted,
        }
    }
}

/// A listening socket the guest's serial port connects to (QEMU is the client).
pub struct AgentListener {
    listener: UnixListener,
    path: PathBuf,
}

impl AgentListener {
    /// Listens on `path` (which must not exist).
    pub fn bind(path: &Path) -> Result<Self, AgentError> {
        let listener =
            UnixListener::bind(path).map_err(io_error(format!("bind {}", path.display())))?;
        listener
            .set_nonblocking(true)
            .map_err(io_error("set_nonblocking"))?;
        Ok(AgentListener {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to `timeout` for QEMU to connect. `watch` is polled while waiting; when it returns
    /// a reason (e.g. "QEMU exited"), the wait ends with [`AgentError::Aborted`].
    pub fn accept(
        &self,
        timeout: Duration,
        watch: &mut dyn FnMut() -> Option<String>,
    ) -> Result<Agent, AgentError> {
        poll_until(
            "QEMU to connect the agent serial port".into(),
            timeout,
            watch,
            || match self.listener.accept() {
                Ok((stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(io_error("set_nonblocking"))?;
                    Ok(Some(Agent::new(stream)))
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    Ok(None)
                }
                Err(e) => Err(io_error("accept")(e)),
            },
        )
    }
}

/// Calls `attempt` every [`POLL`] until it gives a value or an error, the lab is interrupted,
/// `watch` gives a reason to stop, or `timeout` passes (errors naming `what`).
fn poll_until<T>(
    what: String,
    timeout: Duration,
    watch: &mut dyn FnMut() -> Option<String>,
    mut attempt: impl FnMut() -> Result<Option<T>, AgentError>,
) -> Result<T, AgentError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = attempt()? {
            return Ok(v);
        }
        if let Some(s) = process::interrupted() {
            return Err(AgentError::Interrupted(s));
        }
        if let Some(reason) = watch() {
            return Err(AgentError::Aborted { what, reason });
        }
        if Instant::now() >= deadline {
            return Err(AgentError::Timeout(timeout, what));
        }
        thread::sleep(POLL);
    }
}

/// Connects to an agent socket QEMU listens on (`lab up`'s VMs), retrying up to `timeout` while
/// QEMU has not created it yet; `watch` as in [`AgentListener::accept`].
pub fn connect(
    path: &Path,
    timeout: Duration,
    watch: &mut dyn FnMut() -> Option<String>,
) -> Result<Agent, AgentError> {
    let what = format!("QEMU to open the agent socket {}", path.display());
    poll_until(what, timeout, watch, || match UnixStream::connect(path) {
        Ok(stream) => Ok(Some(Agent::new(stream))),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(io_error(format!("connect {}", path.display()))(e)),
    })
}

/// A connected agent.
pub struct Agent {
    lines: JsonLines,
    next_id: u64,
}

impl Agent {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> Self {
        Agent {
            // A `run` reply carries a program's whole output: no line limit.
            lines: JsonLines::new(stream, "agent", usize::MAX),
            next_id: 1,
        }
    }

    /// Records every line sent (`> `) and received (`< `) in `file`.
    pub fn set_transcript(&mut self, file: File) {
        self.lines.set_transcript(file);
    }

    /// Reads the next JSON message (skipping lines that are not JSON objects).
    fn next_message(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        what: &str,
        watch: &mut dyn FnMut() -> Option<String>,
    ) -> Result<Value, AgentError> {
        self.lines.next(deadline, watch).map_err(|e| match e {
            LineError::Timeout => AgentError::Timeout(timeout, what.into()),
            LineError::Closed => AgentError::Closed(what.into()),
            LineError::Interrupted(s) => AgentError::Interrupted(s),
            LineError::Aborted(reason) => AgentError::Aborted {
                what: what.into(),
                reason,
            },
            e @ LineError::TooLong { .. } => AgentError::Malformed {
                op: what.into(),
                reply: e.to_string(),
            },
            LineError::Io { what: call, source } => AgentError::Io {
                what: format!("{call} ({what})"),
                source,
            },
        })
    }

    /// Waits for the agent's `{"ready":true,...}` line. `watch` as in [`AgentListener::accept`].
    pub fn wait_ready(
        &mut self,
        timeout: Duration,
        watch: &mut dyn FnMut() -> Option<String>,
    ) -> Result<Ready, AgentError> {
        let deadline = Instant::now() + timeout;
        loop {
            let msg = self.next_message(deadline, timeout, "the agent's ready line", watch)?;
            if msg.get("ready").and_then(Value::as_bool) == Some(true) {
                return serde_json::from_value(msg.clone()).map_err(|_| AgentError::Malformed {
                    op: "ready".into(),
                    reply: msg.to_string(),
                });
            }
            warn!("agent: unexpected message before ready: {msg}");
        }
    }

    /// Sends `request` with the next id and returns the reply with the same id.
    fn request(&mut self, request: &Request, timeout: Duration) -> Result<Value, AgentError> {
        let id = self.next_id;
        self.next_id += 1;
        let op = request.op().to_string();
        let line = request.to_value(id).to_string();
        debug!("agent: request {id} {op}");
        self.lines
            .send(line.as_bytes(), Duration::from_secs(10))
            .map_err(io_error(format!("write ({op})")))?;
        let deadline = Instant::now() + timeout;
        let what = format!("the reply to {op} (id {id})");
        loop {
            let msg = self.next_message(deadline, timeout, &what, &mut || None)?;
            match msg.get("id").and_then(Value::as_u64) {
                Some(got) if got == id => {}
                None if msg.get("error").is_some() => {}
                None if msg.get("ready").and_then(Value::as_bool) == Some(true) => {
                    return Err(AgentError::Rebooted(what));
                }
                _ => {
                    warn!("agent: ignoring unexpected message {msg}");
                    continue;
                }
            }
            if let Some(err) = msg.get("error") {
                return Err(AgentError::Remote {
                    op,
                    message: err.as_str().map_or_else(|| err.to_string(), str::to_string),
                });
            }
            return Ok(msg);
        }
    }

    fn expect_ok(op: &str, reply: Value) -> Result<(), AgentError> {
        if reply.get("ok").and_then(Value::as_bool) == Some(true) {
            Ok(())
        } else {
            Err(AgentError::Malformed {
                op: op.into(),
                reply: reply.to_string(),
            })
        }
    }

    /// Runs `argv` in the guest; the agent kills it after `timeout`. The host waits
    /// `timeout + RUN_SLACK` for the reply.
    pub fn run(&mut self, argv: &[String], timeout: Duration) -> Result<RunOutput, AgentError> {
        let req = Request::Run(RunRequest::new(argv.to_vec(), millis(timeout)));
        let reply = self.request(&req, timeout + RUN_SLACK)?;
        serde_json::from_value(reply.clone()).map_err(|_| AgentError::Malformed {
            op: "run".into(),
            reply: reply.to_string(),
        })
    }

    /// Runs `argv` in the guest with `stdin` as its standard input (binary-safe, base64 on the
    /// link) and its stdout returned exactly (see [`RunOutput::stdout_bytes`]).
    pub fn run_binary(
        &mut self,
        argv: &[String],
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<RunOutput, AgentError> {
        self.run_exact(argv, RunInput::Bytes(stdin), timeout)
    }

    /// [`run_binary`](Self::run_binary) with the input given as bytes (through the serial
    /// link: fine for kilobytes) or as a guest file (e.g. on a 9p share: fast for megabytes).
    pub fn run_exact(
        &mut self,
        argv: &[String],
        stdin: RunInput<'_>,
        timeout: Duration,
    ) -> Result<RunOutput, AgentError> {
        let mut req = RunRequest {
            stdout_b64: true,
            ..RunRequest::new(argv.to_vec(), millis(timeout))
        };
        match stdin {
            RunInput::Bytes(b) => req.stdin = Some(b.to_vec()),
            RunInput::GuestFile(f) => req.stdin_file = Some(f.to_string()),
        }
        let reply = self.request(&Request::Run(req), timeout + RUN_SLACK)?;
        serde_json::from_value(reply.clone()).map_err(|_| AgentError::Malformed {
            op: "run".into(),
            reply: reply.to_string(),
        })
    }

    /// Writes `data` to `path` in the guest.
    pub fn write_file(&mut self, path: &str, data: &str) -> Result<(), AgentError> {
        let req = Request::WriteFile {
            path: path.to_string(),
            data: data.to_string(),
        };
        let reply = self.request(&req, Duration::from_secs(30))?;
        Self::expect_ok("write_file", reply)
    }

    /// The guest kernel log after `from` (from the boot's first record without one, or when the
    /// guest rebooted since `from`); with `records` false only the current position.
    pub fn kmsg(
        &mut self,
        from: Option<&KmsgMark>,
        records: bool,
    ) -> Result<KmsgReply, AgentError> {
        let req = Request::Kmsg(KmsgRequest {
            after: from.and_then(|m| m.next_seq.checked_sub(1)),
            boot_id: from.map(|m| m.boot_id.clone()),
            records,
        });
        let reply = self.request(&req, Duration::from_secs(60))?;
        if reply.get("ok").and_then(Value::as_bool) != Some(true) {
            return Err(AgentError::Malformed {
                op: "kmsg".into(),
                reply: reply.to_string(),
            });
        }
        serde_json::from_value(reply.clone()).map_err(|_| AgentError::Malformed {
            op: "kmsg".into(),
            reply: reply.to_string(),
        })
    }

    /// Asks the guest to power off; returns once the agent acknowledged.
    pub fn poweroff(&mut self, timeout: Duration) -> Result<(), AgentError> {
        let reply = self.request(&Request::Poweroff, timeout)?;
        Self::expect_ok("poweroff", reply)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn test_base64_round_trip() {
        for n in 0..300usize {
            let data: Vec<u8> = (0..n).map(|i| (i * 7 + n) as u8).collect();
            let e = super::base64_encode(&data);
            assert_eq!(super::base64_decode(&e).unwrap(), data, "{n}");
        }
        assert_eq!(super::base64_encode(b"hi\n"), "aGkK");
        assert_eq!(super::base64_encode(b"h"), "aA==");
        assert!(super::base64_decode("a").is_none());
        assert!(super::base64_decode("a!==").is_none());
    }

    use super::*;
    use serde_json::json;
    use std::io::{BufRead, BufReader, Write};

    fn temp_socket(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("pcisim-lab-agent-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("agent.sock")
    }

    /// A fake guest agent: greets, then answers requests like the real one.
    fn fake_agent(path: PathBuf, greeting: &'static str) -> thread::JoinHandle<Vec<Value>> {
        thread::spawn(move || {
            let stream = UnixStream::connect(&path).unwrap();
            let mut w = stream.try_clone().unwrap();
            w.write_all(greeting.as_bytes()).unwrap();
            let mut seen = Vec::new();
            for line in BufReader::new(stream).lines() {
                let req: Value = serde_json::from_str(&line.unwrap()).unwrap();
                let id = req["id"].as_u64().unwrap();
                let reply = match req["op"].as_str().unwrap() {
                    "run" => {
                        // A stale reply with another id first: the client must skip it.
                        w.write_all(b"{\"id\":999,\"ok\":true}\n").unwrap();
                        json!({"id": id, "exit": 0, "signal": null, "timed_out": false,
                               "stdout": "KTAP version 1\n1..0\n", "stderr": "", "elapsed_ms": 5})
                    }
                    "write_file" => json!({"ok": false, "error": "read-only"}),
                    "poweroff" => json!({"id": id, "ok": true}),
                    "kmsg" => json!({"id": id, "ok": true,
                        "records": if req["records"] == json!(false) { json!([]) }
                                   else { json!(["4,5,100,-;x"]) },
                        "next_seq": 6, "boot_id": "b", "tainted": 4096,
                        "rebooted": req["boot_id"] != json!("b") && !req["boot_id"].is_null()}),
                    // The guest reboots instead of answering.
                    "ping" => json!({"ready": true, "kernel": "6.12.1", "uptime_ms": 7}),
                    _ => json!({"id": id, "error": "unknown op"}),
                };
                seen.push(req);
                // Split the reply in two writes to exercise line reassembly.
                let text = format!("{reply}\n");
                let (a, b) = text.split_at(text.len() / 2);
                w.write_all(a.as_bytes()).unwrap();
                thread::sleep(Duration::from_millis(20));
                w.write_all(b.as_bytes()).unwrap();
            }
            seen
        })
    }

    #[test]
    fn test_agent_round_trips_ready_run_write_poweroff() {
        let path = temp_socket("rt");
        let listener = AgentListener::bind(&path).unwrap();
        let fake = fake_agent(
            path.clone(),
            "garbage from the tty\n{\"ready\":true,\"kernel\":\"6.12.1\",\"uptime_ms\":42}\n",
        );
        let mut agent = listener
            .accept(Duration::from_secs(10), &mut || None)
            .unwrap();
        let ready = agent
            .wait_ready(Duration::from_secs(10), &mut || None)
            .unwrap();
        assert_eq!(
            ready,
            Ready {
                agent_version: String::new(),
                kernel: "6.12.1".into(),
                uptime_ms: 42
            }
        );
        let out = agent
            .run(&["/bin/true".to_string()], Duration::from_secs(5))
            .unwrap();
        assert_eq!(out.exit, Some(0));
        assert_eq!(out.stdout, "KTAP version 1\n1..0\n");
        let err = agent.write_file("/x", "y").unwrap_err();
        assert!(matches!(err, AgentError::Remote { ref message, .. } if message == "read-only"));
        let err = agent
            .request(&Request::Ping, Duration::from_secs(5))
            .unwrap_err();
        assert!(matches!(err, AgentError::Rebooted(_)), "{err}");
        agent.poweroff(Duration::from_secs(5)).unwrap();
        drop(agent);
        let seen = fake.join().unwrap();
        assert_eq!(seen[0]["op"], "run");
        assert_eq!(seen[0]["timeout_ms"], 5000);
        assert_eq!(seen[0]["argv"], json!(["/bin/true"]));
        assert_eq!(seen[1]["data"], "y");
        let ids: Vec<u64> = seen.iter().map(|r| r["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, [1, 2, 3, 4]);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn test_kmsg_request_from_a_mark_and_position_only() {
        let path = temp_socket("kmsg");
        let listener = AgentListener::bind(&path).unwrap();
        let fake = fake_agent(path.clone(), "{\"ready\":true}\n");
        let mut agent = listener
            .accept(Duration::from_secs(10), &mut || None)
            .unwrap();
        agent
            .wait_ready(Duration::from_secs(10), &mut || None)
            .unwrap();
        let mark = KmsgMark {
            next_seq: 5,
            boot_id: "b".into(),
            tainted: 0,
        };
        let r = agent.kmsg(Some(&mark), true).unwrap();
        assert_eq!(r.records, ["4,5,100,-;x"]);
        assert!(!r.rebooted);
        assert_eq!(
            KmsgMark::of(&r),
            KmsgMark {
                next_seq: 6,
                boot_id: "b".into(),
                tainted: 4096
            }
        );
        let other = KmsgMark {
            boot_id: "old".into(),
            ..mark
        };
        assert!(agent.kmsg(Some(&other), true).unwrap().rebooted);
        let pos = agent.kmsg(None, false).unwrap();
        assert!(pos.records.is_empty());
        drop(agent);
        let seen = fake.join().unwrap();
        // `after` is the last sequence number already read.
        assert_eq!(seen[0]["after"], 4);
        assert_eq!(seen[0]["boot_id"], "b");
        assert_eq!(seen[0]["records"], true);
        assert_eq!(seen[2]["after"], Value::Null);
        assert_eq!(seen[2]["records"], false);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn test_accept_aborted_by_watch_and_timeout() {
        let path = temp_socket("abort");
        let listener = AgentListener::bind(&path).unwrap();
        let err = listener
            .accept(Duration::from_secs(10), &mut || Some("QEMU exited".into()))
            .err()
            .unwrap();
        assert!(matches!(err, AgentError::Aborted { ref reason, .. } if reason == "QEMU exited"));
        let err = listener
            .accept(Duration::from_millis(50), &mut || None)
            .err()
            .unwrap();
        assert!(matches!(err, AgentError::Timeout(..)));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn test_connect_waits_for_the_socket_and_stops_on_watch() {
        let path = temp_socket("connect");
        let p = path.clone();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            let l = UnixListener::bind(&p).unwrap();
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"{\"ready\":true,\"kernel\":\"k\"}\n").unwrap();
        });
        let mut agent = connect(&path, Duration::from_secs(10), &mut || None).unwrap();
        let ready = agent
            .wait_ready(Duration::from_secs(10), &mut || None)
            .unwrap();
        assert_eq!(ready.kernel, "k");
        t.join().unwrap();
        let gone = path.with_file_name("gone.sock");
        let err = connect(&gone, Duration::from_secs(10), &mut || {
            Some("QEMU exited".into())
        })
        .err()
        .unwrap();
        assert!(matches!(err, AgentError::Aborted { ref reason, .. } if reason == "QEMU exited"));
        let err = connect(&gone, Duration::from_millis(50), &mut || None)
            .err()
            .unwrap();
        assert!(matches!(err, AgentError::Timeout(..)), "{err}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn test_closed_link_reported() {
        let path = temp_socket("closed");
        let listener = AgentListener::bind(&path).unwrap();
        let p = path.clone();
        let t = thread::spawn(move || {
            let mut s = UnixStream::connect(&p).unwrap();
            s.write_all(b"{\"ready\":tr").unwrap();
        });
        let mut agent = listener
            .accept(Duration::from_secs(10), &mut || None)
            .unwrap();
        t.join().unwrap();
        let err = agent
            .wait_ready(Duration::from_secs(10), &mut || None)
            .unwrap_err();
        assert!(matches!(err, AgentError::Closed(_)));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
