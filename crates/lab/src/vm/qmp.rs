//! A small synchronous QMP client for the VM's `-qmp unix:RUN/qmp.sock` socket.
//!
//! ```text
//! QEMU → {"QMP":{"version":{"qemu":{"major":11,"minor":1,"micro":3},...},"capabilities":["oob"]}}
//! lab  → {"execute":"qmp_capabilities","id":1}                 QEMU → {"return":{},"id":1}
//! lab  → {"execute":"system_reset","id":2}                     QEMU → {"return":{},"id":2}
//! QEMU → {"event":"RESET","data":{"guest":false,"reason":"host-qmp-system-reset"},"timestamp":{..}}
//! lab  → {"execute":"device_del","arguments":{"id":"gpu0"},"id":3}
//! QEMU → {"error":{"class":"GenericError","desc":"..."},"id":3}
//! ```
//!
//! Commands carry an `id` and their reply is matched by it (a late reply to a command that timed
//! out is skipped, never taken for the next one's). Asynchronous events that arrive meanwhile are
//! buffered (the newest [`MAX_EVENTS`]) and numbered; [`Qmp::wait_event`] and
//! [`Qmp::wait_event_since`] take them from the buffer or wait for them. Every wait has a deadline
//! and returns early when the lab is interrupted ([`crate::vm::process::interrupted`]). Reads keep
//! partial lines across timeouts, so a timeout never desynchronises the stream.
//!
//! Why not the `qapi` crate (0.15, `qmp` feature): its synchronous client has no timeouts
//! (a read timeout loses a partial line), panics on EOF during the greeting, only sees events while
//! a command runs, and decodes events into a closed enum generated from QEMU 9.1's schema, so an
//! event it does not know fails the whole message. The protocol is a handful of JSON shapes.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, warn};
use serde_json::{json, Map, Value};

use crate::vm::lines::{JsonLines, LineError};
use crate::vm::process::{self, POLL};

/// How long a command may take by default (QEMU answers from its main loop; `device_add` of a
/// vfio-user device includes the whole vfio-user attach).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How many events are buffered; older ones are dropped (and counted).
pub const MAX_EVENTS: usize = 4096;
/// The longest line accepted from QEMU (`query-pci` of a big machine is a few hundred KiB).
const MAX_LINE: usize = 16 << 20;

/// Errors on the QMP socket.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached.
    #[error("Cannot connect to QMP at {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The last error.
        #[source]
        source: io::Error,
    },
    /// Reading or writing failed.
    #[error("QMP socket: {what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Nothing arrived in time.
    #[error("Timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The time it had.
        timeout: Duration,
    },
    /// QEMU closed the socket (it exited).
    #[error("QMP closed while waiting for {0} (QEMU exited?)")]
    Closed(String),
    /// The greeting was not `{"QMP":{...}}`.
    #[error("Unexpected QMP greeting: {0}")]
    Greeting(String),
    /// QEMU refused a command.
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class (`GenericError`, `DeviceNotFound`, ...).
        class: String,
        /// QEMU's message.
        desc: String,
    },
    /// A message or a reply did not have the documented shape.
    #[error("Malformed QMP message ({what}): {text}")]
    Malformed {
        /// What was expected.
        what: String,
        /// The message (possibly truncated).
        text: String,
    },
    /// The lab was interrupted.
    #[error("Interrupted by signal {0}")]
    Interrupted(i32),
}

impl QmpError {
    /// Whether the connection is unusable after this error (QEMU gone, I/O failure) rather than
    /// one command having failed.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            QmpError::Closed(_) | QmpError::Io { .. } | QmpError::Connect { .. }
        )
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> QmpError {
    let what = what.into();
    move |source| QmpError::Io { what, source }
}

fn truncate(text: &str, n: usize) -> String {
    match text.char_indices().nth(n) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Its number on this connection (0 for the first event received); see [`Qmp::event_mark`].
    pub seq: u64,
    /// `RESET`, `SHUTDOWN`, `DEVICE_DELETED`, ...
    pub name: String,
    /// Its `data` (an empty object if it had none).
    pub data: Value,
    /// QEMU's timestamp in seconds since the epoch, if it sent one.
    pub timestamp: Option<f64>,
    /// When the lab read it.
    pub received: Instant,
}

impl QmpEvent {
    /// A string field of `data` (`""` if absent).
    pub fn str(&self, key: &str) -> &str {
        self.data.get(key).and_then(Value::as_str).unwrap_or("")
    }
}

/// Where a PCI function sits, as `query-pci` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDeviceInfo {
    /// Bus number (as programmed by the firmware/guest).
    pub bus: u8,
    /// Slot (device) number.
    pub slot: u8,
    /// Function number.
    pub function: u8,
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Class (base class and subclass, e.g. `0x0302`).
    pub class: u16,
    /// The QEMU device id (`gpu0`), empty for devices without one.
    pub qdev_id: String,
    /// For a bridge: its secondary bus number.
    pub secondary_bus: Option<u8>,
    /// The QEMU id of the bridge this function sits behind (`rp1`), if any.
    pub parent: Option<String>,
}

impl PciDeviceInfo {
    /// `0000:01:00.1`, the guest's sysfs name.
    pub fn bdf(&self) -> String {
        format!(
            "0000:{:02x}:{:02x}.{:x}",
            self.bus, self.slot, self.function
        )
    }
}

/// Parses `query-pci`'s return value into a flat list (bridges first, then what lies behind
/// them).
pub fn parse_query_pci(ret: &Value) -> Result<Vec<PciDeviceInfo>, QmpError> {
    let bad = |what: &str| QmpError::Malformed {
        what: format!("query-pci: {what}"),
        text: truncate(&ret.to_string(), 300),
    };
    let buses = ret.as_array().ok_or_else(|| bad("not an array"))?;
    let mut out = Vec::new();
    for bus in buses {
        let devices = bus
            .get("devices")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("bus without devices"))?;
        walk_pci(devices, None, &mut out).map_err(|w| bad(&w))?;
    }
    Ok(out)
}

fn walk_pci(
    devices: &[Value],
    parent: Option<&str>,
    out: &mut Vec<PciDeviceInfo>,
) -> Result<(), String> {
    for d in devices {
        let n = |v: Option<&Value>, what: &str| {
            v.and_then(Value::as_u64)
                .ok_or_else(|| format!("device without {what}"))
        };
        let u8_of = |v: Option<&Value>, what: &str| {
            n(v, what).and_then(|x| u8::try_from(x).map_err(|_| format!("{what} out of range")))
        };
        let u16_of = |v: Option<&Value>, what: &str| {
            n(v, what).and_then(|x| u16::try_from(x).map_err(|_| format!("{what} out of range")))
        };
        let bridge = d.get("pci_bridge");
        let info = PciDeviceInfo {
            bus: u8_of(d.get("bus"), "bus")?,
            slot: u8_of(d.get("slot"), "slot")?,
            function: u8_of(d.get("function"), "function")?,
            vendor_id: u16_of(d.pointer("/id/vendor"), "id.vendor")?,
            device_id: u16_of(d.pointer("/id/device"), "id.device")?,
            class: u16_of(d.pointer("/class_info/class"), "class_info.class")?,
            qdev_id: d
                .get("qdev_id")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            secondary_bus: match bridge {
                Some(b) => Some(u8_of(b.pointer("/bus/secondary"), "bus.secondary")?),
                None => None,
            },
            parent: parent.map(str::to_string),
        };
        let id = info.qdev_id.clone();
        out.push(info);
        if let Some(children) = bridge
            .and_then(|b| b.get("devices"))
            .and_then(Value::as_array)
        {
            walk_pci(children, Some(&id), out)?;
        }
    }
    Ok(())
}

/// [`QmpError`] for a line reader's error while waiting (up to `timeout`) for `what`.
fn line_error(e: LineError, what: &str, timeout: Duration) -> QmpError {
    match e {
        LineError::Timeout => QmpError::Timeout {
            what: what.to_string(),
            timeout,
        },
        LineError::Closed => QmpError::Closed(what.to_string()),
        LineError::Interrupted(s) => QmpError::Interrupted(s),
        // QMP waits have no watch.
        LineError::Aborted(reason) => QmpError::Malformed {
            what: what.to_string(),
            text: reason,
        },
        LineError::TooLong { limit, start } => QmpError::Malformed {
            what: format!("a line longer than {limit} bytes"),
            text: truncate(&start, 200),
        },
        LineError::Io { what: call, source } => QmpError::Io {
            what: format!("{call} ({what})"),
            source,
        },
    }
}

/// A connected, negotiated QMP session.
pub struct Qmp {
    lines: JsonLines,
    events: VecDeque<QmpEvent>,
    received: u64,
    dropped: u64,
    next_id: u64,
    greeting: Value,
    timeout: Duration,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("events", &self.events.len())
            .field("received", &self.received)
            .finish()
    }
}

impl Qmp {
    /// Connects to `path` (retrying while QEMU has not created or opened it yet, up to
    /// `timeout`), reads the greeting and negotiates capabilities. Commands then wait up to
    /// [`DEFAULT_TIMEOUT`]. With a `transcript`, every line sent (`> `) and received (`< `) is
    /// recorded in it, the handshake included.
    pub fn connect(
        path: &Path,
        timeout: Duration,
        transcript: Option<File>,
    ) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    if let Some(s) = process::interrupted() {
                        return Err(QmpError::Interrupted(s));
                    }
                    thread::sleep(POLL);
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        };
        Self::handshake(stream, timeout.max(Duration::from_secs(1)), transcript)
    }

    /// Reads the greeting from a connected stream and negotiates capabilities (waiting up to
    /// `timeout` for each); `transcript` as in [`Qmp::connect`].
    pub fn handshake(
        stream: UnixStream,
        timeout: Duration,
        transcript: Option<File>,
    ) -> Result<Qmp, QmpError> {
        let mut lines = JsonLines::new(stream, "qmp", MAX_LINE);
        if let Some(f) = transcript {
            lines.set_transcript(f);
        }
        let mut qmp = Qmp {
            lines,
            events: VecDeque::new(),
            received: 0,
            dropped: 0,
            next_id: 1,
            greeting: Value::Null,
            timeout: DEFAULT_TIMEOUT,
        };
        let deadline = Instant::now() + timeout;
        let greeting = qmp.next_message(deadline, timeout, "the QMP greeting")?;
        match greeting.get("QMP") {
            Some(g) if g.is_object() => qmp.greeting = g.clone(),
            _ => return Err(QmpError::Greeting(truncate(&greeting.to_string(), 300))),
        }
        qmp.execute_timeout("qmp_capabilities", None, timeout)?;
        Ok(qmp)
    }

    /// Records every line sent (`> `) and received (`< `) in `file`.
    pub fn set_transcript(&mut self, file: File) {
        self.lines.set_transcript(file);
    }

    /// Changes how long [`Qmp::execute`] waits.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The greeting's `QMP` object (`version`, `capabilities`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// QEMU's version from the greeting (`11.1.3`).
    pub fn version(&self) -> Option<String> {
        let q = self.greeting.pointer("/version/qemu")?;
        let n = |k: &str| q.get(k).and_then(Value::as_u64);
        Some(format!("{}.{}.{}", n("major")?, n("minor")?, n("micro")?))
    }

    fn push_event(&mut self, msg: &Value) {
        let name = msg
            .get("event")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let ts = msg.get("timestamp").and_then(|t| {
            let s = t.get("seconds").and_then(Value::as_i64)?;
            let us = t.get("microseconds").and_then(Value::as_i64)?;
            Some(s as f64 + us as f64 / 1e6)
        });
        debug!("qmp: event {name}");
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
            self.dropped += 1;
        }
        self.events.push_back(QmpEvent {
            seq: self.received,
            name,
            data: msg
                .get("data")
                .cloned()
                .unwrap_or_else(|| Value::Object(Map::new())),
            timestamp: ts,
            received: Instant::now(),
        });
        self.received += 1;
    }

    /// The next message already buffered, without reading.
    fn buffered_message(&mut self) -> Result<Option<Value>, QmpError> {
        self.lines
            .buffered()
            .map_err(|e| line_error(e, "a buffered message", DEFAULT_TIMEOUT))
    }

    /// Reads more bytes, waiting at most `wait` (returns whether any arrived).
    fn fill(&mut self, wait: Duration, what: &str) -> Result<bool, QmpError> {
        self.lines.fill(wait).map_err(|e| line_error(e, what, wait))
    }

    /// The next message (event or reply), waiting until `deadline`.
    fn next_message(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        what: &str,
    ) -> Result<Value, QmpError> {
        self.lines
            .next(deadline, &mut || None)
            .map_err(|e| line_error(e, what, timeout))
    }

    /// Runs `command` with `arguments` (an object, or `None`) and returns its `return` value,
    /// waiting up to the session's timeout ([`DEFAULT_TIMEOUT`] unless changed).
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, self.timeout)
    }

    /// [`Qmp::execute`] with an explicit timeout. Events that arrive meanwhile are buffered.
    pub fn execute_timeout(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"execute": command, "id": id});
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let line = msg.to_string();
        debug!("qmp: execute {command} (id {id})");
        self.lines
            .send(line.as_bytes(), Duration::from_secs(10))
            .map_err(io_error(format!("write ({command})")))?;
        let deadline = Instant::now() + timeout;
        let what = format!("the reply to {command} (id {id})");
        loop {
            let msg = self.next_message(deadline, timeout, &what)?;
            if msg.get("event").is_some() {
                self.push_event(&msg);
                continue;
            }
            match msg.get("id") {
                Some(got) if got.as_u64() == Some(id) => {}
                // An error QEMU could not attribute (e.g. to a line it could not parse).
                None if msg.get("error").is_some() => {}
                _ => {
                    warn!(
                        "qmp: ignoring a reply that is not for id {id}: {}",
                        truncate(&msg.to_string(), 200)
                    );
                    continue;
                }
            }
            if let Some(err) = msg.get("error") {
                let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return msg
                .get("return")
                .cloned()
                .ok_or_else(|| QmpError::Malformed {
                    what: format!("reply to {command} without \"return\""),
                    text: truncate(&msg.to_string(), 300),
                });
        }
    }

    /// Reads whatever QEMU has already sent (without waiting) and buffers its events.
    pub fn poll_events(&mut self) -> Result<(), QmpError> {
        loop {
            while let Some(msg) = self.buffered_message()? {
                if msg.get("event").is_some() {
                    self.push_event(&msg);
                } else {
                    warn!(
                        "qmp: ignoring an unsolicited reply: {}",
                        truncate(&msg.to_string(), 200)
                    );
                }
            }
            if !self.fill(Duration::from_millis(1), "events")? {
                return Ok(());
            }
        }
    }

    /// The number of events received so far: events received later have `seq >=` it (for
    /// [`Qmp::wait_event_since`]).
    pub fn event_mark(&self) -> u64 {
        self.received
    }

    /// The buffered events, oldest first.
    pub fn events(&self) -> impl Iterator<Item = &QmpEvent> {
        self.events.iter()
    }

    /// Takes every buffered event.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// How many events were dropped because the buffer was full.
    pub fn dropped_events(&self) -> u64 {
        self.dropped
    }

    /// Waits for an event named `name` for which `pred` holds, taking it out of the buffer (the
    /// oldest buffered match first, else the next one to arrive).
    pub fn wait_event(
        &mut self,
        name: &str,
        pred: impl FnMut(&QmpEvent) -> bool,
        timeout: Duration,
    ) -> Result<QmpEvent, QmpError> {
        self.wait_event_since(0, name, pred, timeout)
    }

    /// Like [`Qmp::wait_event`], but only events with `seq >= mark` count (take `mark` from
    /// [`Qmp::event_mark`] before causing the event, so an older one cannot answer).
    pub fn wait_event_since(
        &mut self,
        mark: u64,
        name: &str,
        mut pred: impl FnMut(&QmpEvent) -> bool,
        timeout: Duration,
    ) -> Result<QmpEvent, QmpError> {
        let deadline = Instant::now() + timeout;
        let what = format!("QMP event {name}");
        let mut scanned = mark;
        loop {
            let hit = self
                .events
                .iter()
                .position(|e| e.seq >= scanned && e.name == name && pred(e));
            if let Some(i) = hit {
                if let Some(e) = self.events.remove(i) {
                    return Ok(e);
                }
            }
            scanned = scanned.max(self.received);
            let msg = self.next_message(deadline, timeout, &what)?;
            if msg.get("event").is_some() {
                self.push_event(&msg);
            } else {
                warn!(
                    "qmp: ignoring an unsolicited reply: {}",
                    truncate(&msg.to_string(), 200)
                );
            }
        }
    }

    /// `system_reset`. Note that with `-no-reboot` (`-action reboot=shutdown`) QEMU turns it into
    /// a shutdown: see [`Qmp::set_reboot_action`].
    pub fn system_reset(&mut self) -> Result<(), QmpError> {
        self.execute("system_reset", None).map(drop)
    }

    /// `set-action reboot=...`: `"reset"` lets a reset (guest or `system_reset`) reboot the
    /// guest, `"shutdown"` makes it stop QEMU (what `-no-reboot` sets).
    pub fn set_reboot_action(&mut self, action: &str) -> Result<(), QmpError> {
        self.execute("set-action", Some(json!({ "reboot": action })))
            .map(drop)
    }

    /// `device_add` with `device` as its arguments (`{"driver":..,"id":..,"bus":..}`).
    pub fn device_add(&mut self, device: &Value) -> Result<(), QmpError> {
        self.execute("device_add", Some(device.clone())).map(drop)
    }

    /// `device_del id` and waits up to `timeout` for its `DEVICE_DELETED` event (ACPI hotplug
    /// takes ~20 ms; native pciehp ~6 s, most of it the attention button's 5 s).
    pub fn device_del(&mut self, id: &str, timeout: Duration) -> Result<QmpEvent, QmpError> {
        let mark = self.event_mark();
        self.execute("device_del", Some(json!({ "id": id })))?;
        self.wait_event_since(
            mark,
            "DEVICE_DELETED",
            |e| e.data.get("device").and_then(Value::as_str) == Some(id),
            timeout,
        )
    }

    /// `query-pci`, flattened (see [`parse_query_pci`]).
    pub fn query_pci(&mut self) -> Result<Vec<PciDeviceInfo>, QmpError> {
        let ret = self.execute("query-pci", None)?;
        parse_query_pci(&ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 3, "minor": 1, "major": 11}, "package": "Debian 1:11.1.3+ds-1~bpo13+1"}, "capabilities": ["oob"]}}"#;

    /// What an answer returns to make the fake QEMU close the socket (exit).
    const CLOSE: &str = "<close>";

    /// A fake QEMU on the other end of a socket pair: greets, then answers each command with
    /// `answer(command, id, arguments)`, which returns the lines to send (events included).
    fn fake_qemu(
        answer: impl Fn(&str, &Value, &Value) -> Vec<String> + Send + 'static,
    ) -> (UnixStream, thread::JoinHandle<Vec<Value>>) {
        let (a, b) = UnixStream::pair().unwrap();
        let t = thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            w.write_all(format!("{GREETING}\r\n").as_bytes()).unwrap();
            let mut seen = Vec::new();
            for line in BufReader::new(b).lines() {
                let Ok(line) = line else { break };
                let req: Value = serde_json::from_str(&line).unwrap();
                let cmd = req["execute"].as_str().unwrap().to_string();
                let lines = answer(&cmd, &req["id"], &req["arguments"]);
                seen.push(req);
                if lines.iter().any(|l| l == CLOSE) {
                    break;
                }
                for out in lines {
                    // Split each line in two writes to exercise reassembly.
                    let text = format!("{out}\n");
                    let (x, y) = text.split_at(text.len() / 2);
                    if w.write_all(x.as_bytes()).is_err() {
                        break;
                    }
                    thread::sleep(Duration::from_millis(2));
                    let _ = w.write_all(y.as_bytes());
                }
            }
            seen
        });
        (a, t)
    }

    fn ok(id: &Value) -> String {
        json!({"return": {}, "id": id}).to_string()
    }

    fn event(name: &str, data: Value) -> String {
        json!({"timestamp": {"seconds": 1795256900, "microseconds": 542564},
               "event": name, "data": data})
        .to_string()
    }

    #[test]
    fn test_handshake_execute_errors_and_version() {
        let (s, t) = fake_qemu(|cmd, id, args| match cmd {
            "qmp_capabilities" => vec![ok(id)],
            "query-status" => vec![
                // A stale reply with another id first: skipped.
                json!({"return": {"status": "paused"}, "id": 999}).to_string(),
                json!({"return": {"status": "running", "running": true}, "id": id}).to_string(),
            ],
            "device_del" => vec![json!({"error": {"class": "DeviceNotFound",
                "desc": format!("Device '{}' not found", args["id"].as_str().unwrap())},
                "id": id})
            .to_string()],
            _ => vec![json!({"error": {"class": "CommandNotFound", "desc": "nope"}}).to_string()],
        });
        let mut q = Qmp::handshake(s, Duration::from_secs(5), None).unwrap();
        assert_eq!(q.version().as_deref(), Some("11.1.3"));
        assert_eq!(q.greeting()["capabilities"], json!(["oob"]));
        let st = q.execute("query-status", None).unwrap();
        assert_eq!(st["status"], "running");
        let e = q
            .execute("device_del", Some(json!({"id": "gpu9"})))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "QMP device_del failed: DeviceNotFound: Device 'gpu9' not found"
        );
        assert!(!e.is_fatal());
        // An error without id (QEMU could not parse the request) answers the command too.
        let e = q.execute("bogus", None).unwrap_err();
        assert!(matches!(e, QmpError::Command { ref class, .. } if class == "CommandNotFound"));
        drop(q);
        let seen = t.join().unwrap();
        let ids: Vec<u64> = seen.iter().map(|r| r["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, [1, 2, 3, 4]);
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        assert!(seen[0].get("arguments").is_none());
        assert_eq!(seen[2]["arguments"], json!({"id": "gpu9"}));
    }

    #[test]
    fn test_events_are_buffered_and_waited_for() {
        let (s, t) = fake_qemu(|cmd, id, _| match cmd {
            "system_reset" => vec![
                event(
                    "RESET",
                    json!({"guest": false, "reason": "host-qmp-system-reset"}),
                ),
                ok(id),
                event("RESET", json!({"guest": true, "reason": "guest-reset"})),
            ],
            "device_del" => vec![
                ok(id),
                // An older deletion and a child object's deletion (no "device") do not count.
                event(
                    "DEVICE_DELETED",
                    json!({"path": "/machine/peripheral/gpu0/x"}),
                ),
                event(
                    "DEVICE_DELETED",
                    json!({"device": "gpu0", "path": "/machine/peripheral/gpu0"}),
                ),
            ],
            _ => vec![ok(id)],
        });
        let mut q = Qmp::handshake(s, Duration::from_secs(5), None).unwrap();
        let mark = q.event_mark();
        q.system_reset().unwrap();
        // The first RESET arrived before the reply: buffered.
        assert_eq!(q.events().count(), 1);
        let e = q
            .wait_event_since(
                mark,
                "RESET",
                |e| e.data["guest"] == true,
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(e.str("reason"), "guest-reset");
        assert_eq!(e.seq, 1);
        assert_eq!(e.timestamp, Some(1795256900.542564));
        let first = q
            .wait_event("RESET", |_| true, Duration::from_secs(5))
            .unwrap();
        assert_eq!(first.str("reason"), "host-qmp-system-reset");
        assert_eq!(q.events().count(), 0);
        // Nothing else comes: a timeout, not a hang.
        let t0 = Instant::now();
        let e = q
            .wait_event("SHUTDOWN", |_| true, Duration::from_millis(150))
            .unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2));
        let del = q.device_del("gpu0", Duration::from_secs(5)).unwrap();
        assert_eq!(del.str("path"), "/machine/peripheral/gpu0");
        // The child object's event stays buffered.
        let left: Vec<&QmpEvent> = q.events().collect();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].name, "DEVICE_DELETED");
        assert_eq!(q.take_events().len(), 1);
        drop(q);
        t.join().unwrap();
    }

    #[test]
    fn test_wait_event_since_ignores_older_events_and_poll_reads_without_blocking() {
        let (s, t) = fake_qemu(|cmd, id, _| match cmd {
            "stop" => vec![ok(id), event("STOP", json!({}))],
            _ => vec![ok(id)],
        });
        let mut q = Qmp::handshake(s, Duration::from_secs(5), None).unwrap();
        q.execute("stop", None).unwrap();
        // Let the STOP event arrive, then read it without a command.
        thread::sleep(Duration::from_millis(50));
        q.poll_events().unwrap();
        assert_eq!(q.events().count(), 1);
        let mark = q.event_mark();
        assert_eq!(mark, 1);
        let e = q
            .wait_event_since(mark, "STOP", |_| true, Duration::from_millis(100))
            .unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }));
        assert_eq!(
            q.wait_event("STOP", |_| true, Duration::from_millis(100))
                .unwrap()
                .data,
            json!({})
        );
        drop(q);
        t.join().unwrap();
    }

    #[test]
    fn test_closed_socket_and_bad_greeting() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let e = Qmp::handshake(a, Duration::from_secs(5), None).unwrap_err();
        assert!(matches!(e, QmpError::Closed(_)) && e.is_fatal(), "{e}");

        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"{\"hello\":1}\n").unwrap();
        let e = Qmp::handshake(a, Duration::from_secs(5), None).unwrap_err();
        assert!(matches!(e, QmpError::Greeting(_)), "{e}");

        // QEMU exits while a command runs.
        let (s, t) = fake_qemu(|cmd, id, _| match cmd {
            "qmp_capabilities" => vec![ok(id)],
            _ => vec![CLOSE.to_string()],
        });
        let mut q = Qmp::handshake(s, Duration::from_secs(5), None).unwrap();
        let e = q.execute("quit", None).unwrap_err();
        assert!(matches!(e, QmpError::Closed(_)), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn test_connect_waits_for_the_socket() {
        let dir = std::env::temp_dir().join(format!("pcisim-qmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let p = path.clone();
        let server = thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            let l = std::os::unix::net::UnixListener::bind(&p).unwrap();
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            w.write_all(format!("{GREETING}\n").as_bytes()).unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let req: Value = serde_json::from_str(&line).unwrap();
            w.write_all(format!("{}\n", ok(&req["id"])).as_bytes())
                .unwrap();
        });
        let q = Qmp::connect(&path, Duration::from_secs(10), None).unwrap();
        assert_eq!(q.version().as_deref(), Some("11.1.3"));
        server.join().unwrap();
        let e =
            Qmp::connect(&dir.join("missing.sock"), Duration::from_millis(50), None).unwrap_err();
        assert!(matches!(e, QmpError::Connect { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_parse_query_pci_walks_bridges() {
        // The shape QEMU 11.1 returns for a root port with a two-function vfio-user device.
        let ret = json!([{"bus": 0, "devices": [
            {"bus": 0, "slot": 0, "function": 0, "class_info": {"class": 1536, "desc": "Host bridge"},
             "id": {"vendor": 32902, "device": 10688}, "qdev_id": "", "regions": []},
            {"bus": 0, "slot": 1, "function": 0, "class_info": {"class": 1540, "desc": "PCI bridge"},
             "id": {"vendor": 6966, "device": 12}, "qdev_id": "rp1", "regions": [],
             "pci_bridge": {"bus": {"number": 0, "secondary": 1, "subordinate": 1,
                 "io_range": {}, "memory_range": {}, "prefetchable_range": {}},
                 "devices": [
                    {"bus": 1, "slot": 0, "function": 0, "class_info": {"class": 770},
                     "id": {"vendor": 4660, "device": 2832}, "qdev_id": "gpu0", "regions": []},
                    {"bus": 1, "slot": 0, "function": 1, "class_info": {"class": 770},
                     "id": {"vendor": 4660, "device": 2832}, "qdev_id": "gpu1", "regions": []}
                 ]}}
        ]}]);
        let all = parse_query_pci(&ret).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[1].secondary_bus, Some(1));
        let gpu1 = all.iter().find(|d| d.qdev_id == "gpu1").unwrap();
        assert_eq!(gpu1.bdf(), "0000:01:00.1");
        assert_eq!(gpu1.parent.as_deref(), Some("rp1"));
        assert_eq!(
            (gpu1.vendor_id, gpu1.device_id, gpu1.class),
            (0x1234, 0x0b10, 0x0302)
        );
        assert!(parse_query_pci(&json!({})).is_err());
        assert!(parse_query_pci(&json!([{"bus": 0, "devices": [{"bus": 300}]}])).is_err());
    }
}
