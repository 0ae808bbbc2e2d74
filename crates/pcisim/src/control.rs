//! The control socket of `pcisim serve --control PATH`: read each device's journal, counters and
//! state, and inject faults, while the devices serve their clients.
//!
//! Newline-delimited JSON on a Unix socket (mode 0600): one request object per line, one
//! response object per line, in order. Every response carries `"ok"`; a refused request gets
//! `{"ok":false,"error":"..."}` and the connection keeps serving (malformed JSON, unknown op,
//! unknown device, unknown fault, a line longer than [`MAX_LINE`]).
//!
//! | request | response (besides `"ok":true`) |
//! |---|---|
//! | `{"op":"list"}` | `devices`: `[{id, kind, socket, client, summary, vendor_id, device_id, class_code}]` |
//! | `{"op":"journal","device":D,"after":SEQ,"limit":N}` | `device`, `records` (seq > after, at most N, default [`DEFAULT_LIMIT`]), `lost`, `last_seq`, `next_after`, `more` |
//! | `{"op":"violations","device":D,"after":SEQ}` | `device`, `violations` (records), `total` (ever found), `last_seq` |
//! | `{"op":"stats"}`, `{"op":"stats","device":D}` | `stats`: `{D: {records, dropped, dma_accesses, dma_bytes, dma_refused, dma_faults, interrupts, resets, violations, last_seq, reply_latency}}` |
//! | `{"op":"status","device":D}` | `device`, `status` (the device's own snapshot) |
//! | `{"op":"inject","device":D,"fault":F}` | `device`, `fault` (F as given) |
//!
//! `reply_latency` is the device's vfio-user reply latency since the server started
//! ([`pcisim_vfio_user::latency`]): `{replies, total_ns, max_ns, max_command, max_at_unix_ms,
//! histogram: [{from_ns, count}]}`, or `null` for a device not served by this process's
//! vfio-user server (docs/protocol.md, "Reply latency").
//!
//! `device` may be omitted when the server has exactly one device. The client of this protocol
//! is `pcisim ctl` (and the lab), both through [`pcisim_lab::vm::control::ControlClient`].
//!
//! The socket is served by an `event-manager` subscriber ([`ControlLoop`]) on the loop of
//! `pcisim serve`'s main thread (with the signals): the listener, every client (at most
//! [`MAX_CLIENTS`] at once) and one timerfd for the idle timeout. Requests are answered one at
//! a time in the loop. Idle clients do not lock the socket up: a client that sends nothing for
//! [`IDLE_TIMEOUT`] is disconnected, and when all [`MAX_CLIENTS`] places are taken a new client
//! takes the place of the one idle the longest (idle for at least [`EVICT_IDLE`]).
//! The timeout is long on purpose: the lab holds one connection for a whole VM session and
//! does not reconnect. Journal requests never
//! touch the device lock (the journal has its own, held only to copy records); `status`, `list`
//! and `inject` take the device lock once, briefly, and give up after [`LOCK_WAIT`] rather than
//! wait behind a stuck device.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use pcisim_journal::Journal;
use pcisim_pci::{Controllable, Description, Fault};
use pcisim_vfio_user::ReplyLatency;
use serde_json::{json, Map, Value};
use vmm_sys_util::timerfd::TimerFd;

/// Longest request line accepted; a longer one is answered with an error and skipped.
pub const MAX_LINE: usize = 64 * 1024;
/// Most control clients served at once; more are told so and closed.
pub const MAX_CLIENTS: usize = 64;
/// Records per `journal` response unless `limit` says otherwise.
pub const DEFAULT_LIMIT: u64 = 1000;
/// The most records one `journal` response carries (`more` says when there are more).
pub const MAX_LIMIT: u64 = 10_000;
/// How long a request waits for a device's lock before giving up.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);
/// How long writing a response may block (a client that stops reading is dropped).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that sends no request for this long is disconnected (the default of
/// [`ControlServer::set_idle_timeout`], `pcisim serve --control-idle-timeout`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// When every place is taken, a client idle at least this long gives its place to a new one.
pub const EVICT_IDLE: Duration = Duration::from_secs(1);

const OPS: &str = "list, journal, violations, stats, status, inject";

/// One device as the control socket sees it.
pub struct ControlDevice {
    /// Device id (`gpu0`).
    pub id: String,
    /// Kind (`gpu`).
    pub kind: String,
    /// Its vfio-user socket.
    pub socket: PathBuf,
    /// What it advertises.
    pub description: Description,
    /// The device (the same endpoint the vfio-user server drives).
    pub control: Arc<Mutex<dyn Controllable>>,
    /// Its journal, taken once so that journal requests never need the device lock.
    pub journal: Journal,
    /// Its vfio-user reply latencies, as its server aggregates them
    /// ([`pcisim_vfio_user::Server::reply_latency`]; `None` until set): `stats` reports them,
    /// without the device lock.
    pub reply_latency: Option<Arc<ReplyLatency>>,
}

impl ControlDevice {
    /// A device entry; takes the device lock once to fetch its journal handle.
    pub fn new(
        id: &str,
        kind: &str,
        socket: &Path,
        description: Description,
        control: Arc<Mutex<dyn Controllable>>,
    ) -> ControlDevice {
        let journal = control
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .journal();
        ControlDevice {
            id: id.to_string(),
            kind: kind.to_string(),
            socket: socket.to_path_buf(),
            description,
            control,
            journal,
            reply_latency: None,
        }
    }

    /// The device lock, waiting at most [`LOCK_WAIT`].
    fn lock(&self) -> Result<MutexGuard<'_, dyn Controllable + 'static>, String> {
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match self.control.try_lock() {
                Ok(g) => return Ok(g),
                // A panic elsewhere does not make the state unreadable.
                Err(TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(format!(
                        "device {} is busy (its lock was held for more than {} ms)",
                        self.id,
                        LOCK_WAIT.as_millis()
                    ))
                }
            }
        }
    }
}

/// `1234:0b10 class 030200 rev 01, BARs 0:64K 2:256M(64,pf), caps 01@40 11@48 10@54, ext 0001@100 ...`
fn summary(d: &Description) -> String {
    let size = |n: u64| {
        pcisim_lab::vm::control::human_bytes(n)
            .replace(".0 ", "")
            .replace(' ', "")
    };
    let bars: Vec<String> = d
        .bars
        .iter()
        .map(|b| {
            let mut flags = Vec::new();
            if b.mem64 {
                flags.push("64");
            }
            if b.prefetchable {
                flags.push("pf");
            }
            let flags = if flags.is_empty() {
                String::new()
            } else {
                format!("({})", flags.join(","))
            };
            format!("{}:{}{flags}", b.index, size(b.size))
        })
        .collect();
    let caps: Vec<String> = d
        .capabilities
        .iter()
        .map(|c| format!("{:02x}@{:02x}", c.id, c.offset))
        .collect();
    let ext: Vec<String> = d
        .ext_capabilities
        .iter()
        .map(|c| format!("{:04x}@{:03x}", c.id, c.offset))
        .collect();
    format!(
        "{:04x}:{:04x} class {:06x} rev {:02x}, BARs {}, caps {}, ext {}",
        d.vendor_id,
        d.device_id,
        d.class_code,
        d.revision,
        bars.join(" "),
        caps.join(" "),
        ext.join(" ")
    )
}

/// Whether a client is attached, as the device's status says (`client_attached` or `client`).
fn client_attached(status: &Value) -> Option<bool> {
    ["client_attached", "client", "attached"]
        .iter()
        .find_map(|k| status.get(*k).and_then(Value::as_bool))
}

/// Request handling, independent of sockets.
pub struct Handler {
    devices: Vec<ControlDevice>,
}

type Reply = std::result::Result<Map<String, Value>, String>;

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

impl Handler {
    /// A handler for `devices`.
    pub fn new(devices: Vec<ControlDevice>) -> Handler {
        Handler { devices }
    }

    /// Answers one request line (without its newline).
    pub fn handle_line(&self, line: &[u8]) -> Value {
        let mut reply = match self.dispatch(line) {
            Ok(m) => m,
            Err(error) => {
                log::debug!("control: refused: {error}");
                return json!({"ok": false, "error": error});
            }
        };
        reply.insert("ok".into(), Value::Bool(true));
        Value::Object(reply)
    }

    fn dispatch(&self, line: &[u8]) -> Reply {
        let req: Value = serde_json::from_slice(line)
            .map_err(|e| format!("malformed JSON request: {e} (send one JSON object per line)"))?;
        let req = req.as_object().ok_or_else(|| {
            format!(
                "a request must be a JSON object such as {{\"op\":\"list\"}}; got {}",
                short(&req)
            )
        })?;
        let op = match req.get("op") {
            Some(Value::String(op)) => op.as_str(),
            Some(other) => {
                return Err(format!("\"op\" must be a string (ops: {OPS}); got {other}"))
            }
            None => return Err(format!("the request has no \"op\" (ops: {OPS})")),
        };
        match op {
            "list" => Ok(self.list()),
            "journal" => self.journal(req),
            "violations" => self.violations(req),
            "stats" => self.stats(req),
            "status" => self.status(req),
            "inject" => self.inject(req),
            other => Err(format!("unknown op {other:?} (ops: {OPS})")),
        }
    }

    fn names(&self) -> String {
        self.devices
            .iter()
            .map(|d| d.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn device(&self, req: &Map<String, Value>) -> std::result::Result<&ControlDevice, String> {
        match req.get("device") {
            None | Some(Value::Null) => match self.devices.as_slice() {
                [only] => Ok(only),
                _ => Err(format!(
                    "which device? give \"device\" (devices: {})",
                    self.names()
                )),
            },
            Some(Value::String(id)) => self
                .devices
                .iter()
                .find(|d| d.id == *id)
                .ok_or_else(|| format!("unknown device {id:?} (devices: {})", self.names())),
            Some(other) => Err(format!("\"device\" must be a string; got {other}")),
        }
    }

    fn list(&self) -> Map<String, Value> {
        let devices: Vec<Value> = self
            .devices
            .iter()
            .map(|d| {
                let client = d.lock().ok().and_then(|g| client_attached(&g.status()));
                json!({
                    "id": d.id,
                    "kind": d.kind,
                    "socket": d.socket,
                    "client": client,
                    "summary": summary(&d.description),
                    "vendor_id": d.description.vendor_id,
                    "device_id": d.description.device_id,
                    "class_code": d.description.class_code,
                })
            })
            .collect();
        obj(json!({ "devices": devices }))
    }

    fn journal(&self, req: &Map<String, Value>) -> Reply {
        let d = self.device(req)?;
        let after = u64_param(req, "after", 0)?;
        let limit = u64_param(req, "limit", DEFAULT_LIMIT)?.min(MAX_LIMIT);
        let (mut records, lost) = d.journal.since(after);
        let last_seq = d.journal.last_seq();
        let more = records.len() as u64 > limit;
        records.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next_after = records.last().map_or(after.saturating_add(lost), |r| r.seq);
        let records = serde_json::to_value(&records).map_err(|e| e.to_string())?;
        Ok(obj(json!({
            "device": d.id,
            "records": records,
            "lost": lost,
            "last_seq": last_seq,
            "next_after": next_after,
            "more": more,
        })))
    }

    fn violations(&self, req: &Map<String, Value>) -> Reply {
        let d = self.device(req)?;
        let after = u64_param(req, "after", 0)?;
        let list = d.journal.violations_since(after);
        let total = d.journal.stats().violations;
        let last_seq = d.journal.last_seq();
        let list = serde_json::to_value(&list).map_err(|e| e.to_string())?;
        Ok(obj(json!({
            "device": d.id,
            "violations": list,
            "total": total,
            "last_seq": last_seq,
        })))
    }

    fn stats(&self, req: &Map<String, Value>) -> Reply {
        let selected: Vec<&ControlDevice> = match req.get("device") {
            None | Some(Value::Null) => self.devices.iter().collect(),
            Some(_) => vec![self.device(req)?],
        };
        let mut stats = Map::new();
        for d in selected {
            let mut s = obj(serde_json::to_value(d.journal.stats()).map_err(|e| e.to_string())?);
            s.insert("last_seq".into(), json!(d.journal.last_seq()));
            let latency = match &d.reply_latency {
                Some(l) => serde_json::to_value(l.snapshot()).map_err(|e| e.to_string())?,
                None => Value::Null,
            };
            s.insert("reply_latency".into(), latency);
            stats.insert(d.id.clone(), Value::Object(s));
        }
        Ok(obj(json!({ "stats": stats })))
    }

    fn status(&self, req: &Map<String, Value>) -> Reply {
        let d = self.device(req)?;
        let status = d.lock()?.status();
        Ok(obj(json!({"device": d.id, "status": status})))
    }

    fn inject(&self, req: &Map<String, Value>) -> Reply {
        let d = self.device(req)?;
        let text = match req.get("fault") {
            Some(Value::String(f)) => f.as_str(),
            Some(other) => return Err(format!("\"fault\" must be a string; got {other}")),
            None => return Err("inject needs \"fault\" (e.g. \"link-down\")".into()),
        };
        let fault = Fault::parse(text)?;
        d.lock()?
            .inject(&fault)
            .map_err(|e| format!("device {}: cannot inject {text}: {e}", d.id))?;
        log::info!(
            "{}: fault injected through the control socket: {text}",
            d.id
        );
        Ok(obj(json!({"device": d.id, "fault": text})))
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

fn u64_param(
    req: &Map<String, Value>,
    key: &str,
    default: u64,
) -> std::result::Result<u64, String> {
    match req.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| format!("{key:?} must be a non-negative integer; got {v}")),
    }
}

/// One request line, or the report of a line that was too long.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    /// A complete line (without the newline; a last line without newline counts too).
    Line(Vec<u8>),
    /// A line longer than the bound, consumed up to its newline; its length.
    TooLong(usize),
}

/// Splits a byte stream into lines of at most `max` bytes as it arrives; a longer line is
/// consumed and reported by its length, never stored.
#[derive(Debug, Default)]
struct LineBuf {
    line: Vec<u8>,
    /// Bytes of the current line so far, once it is known to be too long.
    too_long: Option<usize>,
}

impl LineBuf {
    /// Take `data`; complete lines are appended to `out`.
    fn push(&mut self, mut data: &[u8], max: usize, out: &mut Vec<LineRead>) {
        while !data.is_empty() {
            let (chunk, done) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (&data[..i], true),
                None => (data, false),
            };
            data = &data[chunk.len() + usize::from(done)..];
            match &mut self.too_long {
                Some(n) => *n = n.saturating_add(chunk.len()),
                None if self.line.len() + chunk.len() > max => {
                    self.too_long = Some(self.line.len() + chunk.len());
                    self.line = Vec::new();
                }
                None => self.line.extend_from_slice(chunk),
            }
            if done {
                out.push(self.take());
            }
        }
    }

    /// At end of stream: the last line if it had no newline.
    fn finish(&mut self) -> Option<LineRead> {
        (self.too_long.is_some() || !self.line.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> LineRead {
        match self.too_long.take() {
            Some(n) => LineRead::TooLong(n),
            None => LineRead::Line(std::mem::take(&mut self.line)),
        }
    }
}

fn write_reply(w: &mut impl Write, reply: &Value) -> io::Result<()> {
    let mut bytes = reply.to_string().into_bytes();
    bytes.push(b'\n');
    w.write_all(&bytes)?;
    w.flush()
}

/// Event-loop tag of the control listener.
const LISTENER: u32 = 0;
/// Event-loop tag of the idle timer.
const TIMER: u32 = 1;
/// First client tag.
const FIRST_CLIENT: u32 = 2;

/// One connected control client.
struct Client {
    stream: UnixStream,
    lines: LineBuf,
    /// When it last sent something (or connected).
    last_active: Instant,
}

/// The control socket as a subscriber of an `event-manager` loop: the listener, every client
/// (each registered under its own tag), and one timerfd for the idle timeout. Requests are
/// answered in the loop; a reply is written blocking, bounded by [`WRITE_TIMEOUT`].
pub struct ControlLoop {
    listener: UnixListener,
    path: PathBuf,
    handler: Arc<Handler>,
    idle_timeout: Duration,
    clients: HashMap<u32, Client>,
    next_tag: u32,
    timer: TimerFd,
    armed: Option<Instant>,
    /// Accepting is due again at this instant (after a failed accept).
    accept_retry: Option<Instant>,
}

impl ControlLoop {
    fn accept(&mut self, ops: &mut EventOps) {
        let stream = match self.listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                // EMFILE and friends pass; the listener stays readable, so do not spin on it:
                // the timer listens again in 100 ms.
                log::warn!("control {}: accept: {e}", self.path.display());
                let _ = ops.modify(Events::with_data(
                    &self.listener,
                    LISTENER,
                    EventSet::empty(),
                ));
                self.accept_retry = Some(Instant::now() + Duration::from_millis(100));
                return;
            }
        };
        if !pcisim_vfio_user::server::admit_peer(&stream, &[], "control") {
            return;
        }
        if self.clients.len() >= MAX_CLIENTS && !self.evict_one(ops) {
            let mut s = stream;
            let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = write_reply(
                &mut s,
                &json!({"ok": false, "error": format!("too many control clients (at most {MAX_CLIENTS}, all busy)")}),
            );
            return;
        }
        let setup = stream
            .set_nonblocking(true)
            .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)));
        if let Err(e) = setup {
            log::warn!("control: cannot set up a client socket: {e}");
            return;
        }
        self.next_tag = self.next_tag.wrapping_add(1).max(FIRST_CLIENT);
        while self.clients.contains_key(&self.next_tag) {
            self.next_tag = self.next_tag.wrapping_add(1).max(FIRST_CLIENT);
        }
        if let Err(e) = ops.add(Events::with_data(&stream, self.next_tag, EventSet::IN)) {
            log::warn!("control: cannot watch a client socket: {e}");
            return;
        }
        log::debug!("control: client connected");
        self.clients.insert(
            self.next_tag,
            Client {
                stream,
                lines: LineBuf::default(),
                last_active: Instant::now(),
            },
        );
        log::debug!("control: {} clients connected", self.clients.len());
    }

    /// Every place is taken: disconnect the client idle the longest, if it has been idle for at
    /// least [`EVICT_IDLE`]. Whether a place was made.
    fn evict_one(&mut self, ops: &mut EventOps) -> bool {
        let now = Instant::now();
        let victim = self
            .clients
            .iter()
            .map(|(tag, c)| (now.saturating_duration_since(c.last_active), *tag))
            .filter(|(idle, _)| *idle >= EVICT_IDLE)
            .max();
        let Some((idle, tag)) = victim else {
            return false;
        };
        log::info!(
            "control: {MAX_CLIENTS} clients connected; disconnecting the one idle for {} ms to \
             serve a new one",
            idle.as_millis()
        );
        self.drop_client(ops, tag);
        true
    }

    fn drop_client(&mut self, ops: &mut EventOps, tag: u32) {
        if let Some(c) = self.clients.remove(&tag) {
            let _ = ops.remove(Events::empty(&c.stream));
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// A client's socket is readable: read what is there and answer every complete line.
    fn serve(&mut self, ops: &mut EventOps, tag: u32) {
        let Some(c) = self.clients.get_mut(&tag) else {
            return; // (An event of a client dropped since it was queued.)
        };
        let mut buf = [0u8; 16 * 1024];
        let (lines, eof) = match (&c.stream).read(&mut buf) {
            Ok(0) => (c.lines.finish().into_iter().collect(), true),
            Ok(n) => {
                c.last_active = Instant::now();
                let mut lines = Vec::new();
                c.lines.push(&buf[..n], MAX_LINE, &mut lines);
                (lines, false)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                log::debug!("control: client dropped: {e}");
                (Vec::new(), true)
            }
        };
        let mut failed = false;
        for line in lines {
            let reply = match line {
                LineRead::TooLong(n) => json!({
                    "ok": false,
                    "error": format!("request line of {n} bytes is longer than {MAX_LINE} bytes")
                }),
                LineRead::Line(l) if l.iter().all(u8::is_ascii_whitespace) => continue,
                LineRead::Line(l) => self.handler.handle_line(&l),
            };
            if let Err(e) = Self::reply(&c.stream, &reply) {
                log::debug!("control: client dropped: {e}");
                failed = true;
                break;
            }
        }
        c.last_active = Instant::now();
        if eof || failed {
            self.drop_client(ops, tag);
        }
    }

    /// Write a reply blocking (a client that does not read for [`WRITE_TIMEOUT`] is dropped).
    fn reply(stream: &UnixStream, reply: &Value) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        let written = write_reply(&mut &*stream, reply);
        stream.set_nonblocking(true)?;
        written
    }

    fn on_timer(&mut self, ops: &mut EventOps) {
        self.armed = None;
        let now = Instant::now();
        let idle: Vec<u32> = self
            .clients
            .iter()
            .filter(|(_, c)| now.saturating_duration_since(c.last_active) >= self.idle_timeout)
            .map(|(tag, _)| *tag)
            .collect();
        for tag in idle {
            log::info!(
                "control: client idle for {} ms; disconnected",
                self.idle_timeout.as_millis()
            );
            self.drop_client(ops, tag);
        }
        if self.accept_retry.is_some_and(|t| now >= t) {
            self.accept_retry = None;
            let _ = ops.modify(Events::with_data(&self.listener, LISTENER, EventSet::IN));
        }
        // Re-armed even if unchanged: that resets the expiry it fired with.
        self.arm(self.wanted());
    }

    /// When the timer should fire: when the longest-idle client reaches the timeout, or when
    /// accepting is due again after a failure.
    fn wanted(&self) -> Option<Instant> {
        self.clients
            .values()
            .map(|c| c.last_active + self.idle_timeout)
            .chain(self.accept_retry)
            .min()
    }

    fn arm(&mut self, at: Option<Instant>) {
        let r = match at {
            Some(t) => self.timer.reset(
                t.saturating_duration_since(Instant::now())
                    .max(Duration::from_micros(1)),
                None,
            ),
            None => self.timer.clear(),
        };
        match r {
            Ok(()) => self.armed = at,
            Err(e) => log::warn!("control: idle timer: {e}"),
        }
    }
}

impl MutEventSubscriber for ControlLoop {
    fn init(&mut self, ops: &mut EventOps) {
        for ev in [
            Events::with_data(&self.listener, LISTENER, EventSet::IN),
            Events::with_data(&self.timer, TIMER, EventSet::IN),
        ] {
            if let Err(e) = ops.add(ev) {
                log::error!("control {}: event loop: {e}", self.path.display());
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            LISTENER => self.accept(ops),
            TIMER => self.on_timer(ops),
            tag => self.serve(ops, tag),
        }
        let want = self.wanted();
        if want != self.armed {
            self.arm(want);
        }
    }
}

/// The control socket server.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    file: pcisim_vfio_user::server::SocketFile,
    handler: Arc<Handler>,
    idle_timeout: Duration,
}

impl ControlServer {
    /// Binds `path` (mode 0600; refusing a live server's socket, replacing a stale one).
    pub fn bind(path: &Path, devices: Vec<ControlDevice>) -> Result<ControlServer> {
        let listener = pcisim_vfio_user::server::bind_socket(path)
            .with_context(|| format!("control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} private", path.display()))?;
        let file = pcisim_vfio_user::server::SocketFile::record(path)
            .with_context(|| format!("control socket {}", path.display()))?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            file,
            handler: Arc::new(Handler::new(devices)),
            idle_timeout: IDLE_TIMEOUT,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Disconnect clients that send nothing for `timeout` (default [`IDLE_TIMEOUT`]). Call
    /// before [`ControlServer::subscriber`] or [`ControlServer::run`].
    pub fn set_idle_timeout(&mut self, timeout: Duration) {
        self.idle_timeout = timeout.max(Duration::from_millis(1));
    }

    /// The socket file as bound (removed at shutdown only if it is still ours).
    pub fn socket_file(&self) -> &pcisim_vfio_user::server::SocketFile {
        &self.file
    }

    /// The control socket as a subscriber for an event loop (`pcisim serve` adds it to the
    /// loop of its main thread, next to the signals).
    pub fn subscriber(&self) -> io::Result<ControlLoop> {
        let listener = self.listener.try_clone()?;
        listener.set_nonblocking(true)?;
        Ok(ControlLoop {
            listener,
            path: self.path.clone(),
            handler: Arc::clone(&self.handler),
            idle_timeout: self.idle_timeout,
            clients: HashMap::new(),
            next_tag: FIRST_CLIENT,
            timer: TimerFd::new().map_err(io::Error::from)?,
            armed: None,
            accept_retry: None,
        })
    }

    /// Serves clients forever on an event loop of the calling thread (the unit tests' way;
    /// `pcisim serve` adds [`ControlServer::subscriber`] to its main loop).
    #[cfg(test)]
    pub fn run(&self) -> Result<()> {
        use event_manager::{EventManager, SubscriberOps};
        let mut em = EventManager::<ControlLoop>::new()
            .map_err(|e| anyhow::anyhow!("control event loop: {e}"))?;
        em.add_subscriber(self.subscriber()?);
        loop {
            em.run()
                .map_err(|e| anyhow::anyhow!("control event loop: {e}"))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcisim_journal::Event;
    use std::io::BufRead;

    struct Fake {
        journal: Journal,
        injected: Vec<Fault>,
    }

    impl Controllable for Fake {
        fn journal(&self) -> Journal {
            self.journal.clone()
        }
        fn status(&self) -> Value {
            json!({"client_attached": true, "injected": self.injected.len()})
        }
        fn inject(&mut self, fault: &Fault) -> std::result::Result<(), String> {
            if *fault == Fault::LinkUp {
                return Err("link-up is not supported".into());
            }
            self.injected.push(fault.clone());
            Ok(())
        }
    }

    fn description() -> Description {
        Description {
            vendor_id: 0x1234,
            device_id: 0x0b10,
            class_code: 0x030200,
            revision: 1,
            subsystem_vendor_id: 0x1234,
            subsystem_id: 1,
            bars: vec![],
            capabilities: vec![],
            ext_capabilities: vec![],
        }
    }

    fn handler(ids: &[&str]) -> (Handler, Vec<Journal>) {
        let mut journals = Vec::new();
        let devices = ids
            .iter()
            .map(|id| {
                let journal = Journal::new(id, 16);
                journals.push(journal.clone());
                let fake: Arc<Mutex<dyn Controllable>> = Arc::new(Mutex::new(Fake {
                    journal,
                    injected: Vec::new(),
                }));
                ControlDevice::new(id, "gpu", Path::new("/s"), description(), fake)
            })
            .collect();
        (Handler::new(devices), journals)
    }

    fn ask(h: &Handler, line: &str) -> Value {
        h.handle_line(line.as_bytes())
    }

    fn error(v: &Value) -> &str {
        assert_eq!(v["ok"], false, "{v}");
        v["error"].as_str().unwrap()
    }

    #[test]
    fn test_list_reports_devices_and_client() {
        let (h, _) = handler(&["gpu0"]);
        let v = ask(&h, r#"{"op":"list"}"#);
        assert_eq!(v["ok"], true);
        assert_eq!(v["devices"][0]["id"], "gpu0");
        assert_eq!(v["devices"][0]["client"], true);
        assert!(v["devices"][0]["summary"]
            .as_str()
            .unwrap()
            .starts_with("1234:0b10 class 030200"));
    }

    #[test]
    fn test_journal_pages_with_limit_and_next_after() {
        let (h, j) = handler(&["gpu0"]);
        for _ in 0..5 {
            j[0].record(Event::ClientConnected);
        }
        let v = ask(
            &h,
            r#"{"op":"journal","device":"gpu0","after":1,"limit":2}"#,
        );
        let seqs: Vec<u64> = v["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, [2, 3]);
        assert_eq!(v["more"], true);
        assert_eq!(v["next_after"], 3);
        assert_eq!(v["last_seq"], 5);
        assert_eq!(v["records"][0]["type"], "client_connected");
        // One device: "device" may be left out.
        let v = ask(&h, r#"{"op":"journal","after":3}"#);
        assert_eq!(v["records"].as_array().unwrap().len(), 2);
        assert_eq!(v["more"], false);
    }

    #[test]
    fn test_journal_reports_lost_records() {
        let (h, j) = handler(&["gpu0"]);
        for _ in 0..20 {
            j[0].record(Event::ClientConnected);
        }
        let v = ask(&h, r#"{"op":"journal","device":"gpu0"}"#);
        assert_eq!(v["lost"], 4);
        assert_eq!(v["records"][0]["seq"], 5);
        let v = ask(&h, r#"{"op":"journal","device":"gpu0","after":30}"#);
        assert_eq!(v["records"].as_array().unwrap().len(), 0);
        assert_eq!(v["next_after"], 30);
    }

    #[test]
    fn test_stats_and_violations() {
        let (h, j) = handler(&["gpu0", "gpu1"]);
        j[1].record(Event::Violation {
            kind: pcisim_journal::ViolationKind::DmaAfterUnmap,
            detail: "write 0x1000+4".into(),
        });
        let v = ask(&h, r#"{"op":"stats"}"#);
        assert_eq!(v["stats"]["gpu0"]["records"], 0);
        assert_eq!(v["stats"]["gpu1"]["violations"], 1);
        assert_eq!(v["stats"]["gpu1"]["last_seq"], 1);
        let v = ask(&h, r#"{"op":"stats","device":"gpu1"}"#);
        assert!(v["stats"].get("gpu0").is_none());
        // Devices without a vfio-user server here report no latency (null, not zeros).
        assert_eq!(v["stats"]["gpu1"]["reply_latency"], Value::Null);
        let v = ask(&h, r#"{"op":"violations","device":"gpu1","after":0}"#);
        assert_eq!(v["violations"][0]["kind"], "dma_after_unmap");
        assert_eq!(v["total"], 1);
        let v = ask(&h, r#"{"op":"violations","device":"gpu1","after":1}"#);
        assert_eq!(v["violations"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn test_stats_report_reply_latency() {
        let (h, _) = handler(&["gpu0"]);
        let Handler { mut devices } = h;
        let latency = Arc::new(ReplyLatency::default());
        for d in &mut devices {
            d.reply_latency = Some(Arc::clone(&latency));
        }
        let h = Handler::new(devices);
        let v = ask(&h, r#"{"op":"stats"}"#);
        assert_eq!(v["stats"]["gpu0"]["reply_latency"]["replies"], 0, "{v}");
        assert_eq!(
            v["stats"]["gpu0"]["reply_latency"]["max_command"],
            Value::Null
        );
        latency.record_ns(13, Duration::from_millis(300));
        latency.record_ns(9, Duration::from_micros(20));
        let v = ask(&h, r#"{"op":"stats","device":"gpu0"}"#);
        let l = &v["stats"]["gpu0"]["reply_latency"];
        assert_eq!(l["replies"], 2, "{v}");
        assert_eq!(l["max_ns"], 300_000_000u64);
        assert_eq!(l["max_command"], "DEVICE_RESET");
        assert_eq!(l["histogram"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn test_inject_and_status() {
        let (h, _) = handler(&["gpu0"]);
        let v = ask(&h, r#"{"op":"inject","device":"gpu0","fault":"link-down"}"#);
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["fault"], "link-down");
        let v = ask(&h, r#"{"op":"status","device":"gpu0"}"#);
        assert_eq!(v["status"]["injected"], 1);
        let v = ask(&h, r#"{"op":"inject","device":"gpu0","fault":"link-up"}"#);
        assert_eq!(
            error(&v),
            "device gpu0: cannot inject link-up: link-up is not supported"
        );
    }

    #[test]
    fn test_errors_are_clear() {
        let (h, _) = handler(&["gpu0", "npu0"]);
        assert_eq!(
            error(&ask(&h, r#"{"op":"status","device":"gpu9"}"#)),
            "unknown device \"gpu9\" (devices: gpu0, npu0)"
        );
        assert!(error(&ask(&h, r#"{"op":"status"}"#)).starts_with("which device?"));
        assert!(error(&ask(
            &h,
            r#"{"op":"inject","device":"gpu0","fault":"melt"}"#
        ))
        .starts_with("unknown fault \"melt\""));
        assert!(error(&ask(&h, r#"{"op":"inject","device":"gpu0"}"#)).contains("\"fault\""));
        assert_eq!(
            error(&ask(&h, r#"{"op":"frobnicate"}"#)),
            format!("unknown op \"frobnicate\" (ops: {OPS})")
        );
        assert!(error(&ask(&h, "{not json")).starts_with("malformed JSON request"));
        assert!(error(&ask(&h, "[1,2]")).contains("JSON object"));
        assert!(error(&ask(&h, "{}")).contains("no \"op\""));
        assert!(
            error(&ask(&h, r#"{"op":"journal","device":"gpu0","after":-1}"#))
                .contains("non-negative integer")
        );
    }

    #[test]
    fn test_line_buf_skips_long_lines() {
        // Arriving 4 bytes at a time, as a slow client's reads would.
        let data = b"short\nxxxxxxxxxxxxxxxxxxxx\nlast";
        let mut lb = LineBuf::default();
        let mut out = Vec::new();
        for chunk in data.chunks(4) {
            lb.push(chunk, 8, &mut out);
        }
        assert_eq!(
            out,
            vec![LineRead::Line(b"short".to_vec()), LineRead::TooLong(20)]
        );
        assert_eq!(lb.finish(), Some(LineRead::Line(b"last".to_vec())));
        assert_eq!(lb.finish(), None);
    }

    #[test]
    fn test_a_client_stalled_mid_line_does_not_hold_up_the_others() {
        // One loop serves every control client: a client that sends half a request and stops
        // must not keep the loop waiting for the rest of its line.
        let dir = std::env::temp_dir().join(format!("pcisim-ctl-stall-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let (h, _) = handler(&["gpu0"]);
        let server = ControlServer::bind(&path, h.devices).unwrap();
        std::thread::spawn(move || server.run());
        let mut stalled = UnixStream::connect(&path).unwrap();
        stalled.write_all(br#"{"op":"li"#).unwrap();
        let mut others: Vec<_> = (0..3)
            .map(|_| pcisim_lab::vm::control::ControlClient::connect(&path).unwrap())
            .collect();
        let start = Instant::now();
        for c in &mut others {
            assert_eq!(c.list().unwrap()[0].id, "gpu0");
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        // The stalled one finishes its line later and is answered too.
        stalled.write_all(b"st\"}\n").unwrap();
        stalled
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut reply = String::new();
        BufRead::read_line(&mut std::io::BufReader::new(&stalled), &mut reply).unwrap();
        assert!(reply.contains("\"ok\":true"), "{reply}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_server_over_socket_keeps_serving_after_errors() {
        let dir = std::env::temp_dir().join(format!("pcisim-ctl-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let (h, _) = handler(&["gpu0"]);
        let server = ControlServer::bind(&path, h.devices).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::thread::spawn(move || server.run());
        let mut c = pcisim_lab::vm::control::ControlClient::connect(&path).unwrap();
        let long = "x".repeat(MAX_LINE + 10);
        let v = c.send_line(&long).unwrap();
        assert!(error(&v).contains("longer than"));
        let v = c.send_line("garbage").unwrap();
        assert!(error(&v).starts_with("malformed JSON"));
        assert_eq!(c.list().unwrap()[0].id, "gpu0");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
