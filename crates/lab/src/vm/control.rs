//! A client of the device server's control socket (`pcisim serve --control PATH`), and the
//! readable form of journal records.
//!
//! The protocol is newline-delimited JSON: one request object per line, one response object per
//! line, in order, on a connection that stays open. Every response has `"ok"`; a refused request
//! is `{"ok":false,"error":"..."}` and the connection keeps serving.
//!
//! ```text
//! {"op":"list"}                                        -> {"ok":true,"devices":[{"id","kind","socket","client","summary","vendor_id","device_id","class_code"}]}
//! {"op":"journal","device":D,"after":SEQ,"limit":N}    -> {"ok":true,"device":D,"records":[..],"lost":L,"last_seq":S,"next_after":A,"more":bool}
//! {"op":"violations","device":D,"after":SEQ}           -> {"ok":true,"device":D,"violations":[..],"total":T,"last_seq":S}
//! {"op":"stats"} / {"op":"stats","device":D}           -> {"ok":true,"stats":{D:{records,dropped,dma_accesses,dma_bytes,..,last_seq}}}
//! {"op":"status","device":D}                           -> {"ok":true,"device":D,"status":{..}}
//! {"op":"inject","device":D,"fault":"link-down"}       -> {"ok":true,"device":D,"fault":"link-down"}
//! ```
//!
//! `device` may be left out when the server has exactly one device. Records are the journal's
//! own JSON (`{"seq":..,"t_ns":..,"type":"dma",...}`), read here as typed
//! [`pcisim_journal::Record`]s; [`format_record`] renders one as a line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pcisim_journal::{Event, Record, ViolationKind};
use serde_json::{json, Map, Value};

pub use pcisim_journal::text::{format_record, summarize};

/// How long a request may take before the client gives up (the server answers from memory).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// The largest response line the client accepts (a full journal is a few MiB at most).
pub const MAX_RESPONSE: u64 = 256 << 20;

/// Errors talking to the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be reached.
    #[error(
        "Cannot connect to the control socket {path} (is `pcisim serve --control {path}` running?)"
    )]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing failed (including a timeout).
    #[error("Control socket {path}: I/O error")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The server closed the connection before answering.
    #[error("Control socket {0}: the server closed the connection")]
    Closed(PathBuf),
    /// The answer was not a JSON object with `ok`.
    #[error("Control socket {path}: malformed response: {what}")]
    BadResponse {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// The server refused the request (`{"ok":false,"error":...}`).
    #[error("{0}")]
    Refused(String),
    /// A journal window cannot be trusted: records were lost or the checker said it was
    /// degraded (see [`ControlClient::window`]).
    #[error(transparent)]
    Incomplete(#[from] Incomplete),
}

/// Whether `record` marks its window unclean: a `checker_degraded` violation, by which a
/// device says that its checker was not fully watching (docs/journal.md: the mapped set
/// overflowed, PASID marks were forgotten, a gate drain timed out after 10 s). The suite reports
/// it as a degradation rather than a device fault. Returns a one-line description.
pub fn unclean_marker(record: &Record) -> Option<String> {
    matches!(
        record.event,
        Event::Violation {
            kind: ViolationKind::CheckerDegraded,
            ..
        }
    )
    .then(|| format!("{} (#{})", summarize(&record.event), record.seq))
}

/// Reads the `records` of a response as typed records. An entry that is not a record this lab
/// knows (a newer server's event type) is a degradation marker: a window containing it cannot
/// pass as clean.
fn read_records(raw: Vec<Value>) -> (Vec<Record>, Vec<String>) {
    let mut records = Vec::with_capacity(raw.len());
    let mut degraded = Vec::new();
    for v in raw {
        let seq = v.get("seq").and_then(Value::as_u64).unwrap_or(0);
        match serde_json::from_value::<Record>(v.clone()) {
            Ok(r) => records.push(r),
            Err(e) => {
                log::warn!("journal record #{seq} not understood: {e}: {v}");
                degraded.push(format!(
                    "{} (#{seq}) [not a record this lab reads]",
                    pcisim_journal::text::summarize_json(&v)
                ));
            }
        }
    }
    (records, degraded)
}

/// Why a journal window cannot be trusted: the reader missed records, or the device said its
/// checker was degraded while the window was open. An absence check on such a window would
/// prove nothing, so reading it is an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("journal window incomplete: {device} after #{after}: {}", self.what())]
pub struct Incomplete {
    /// The device.
    pub device: String,
    /// Where the window started (its records have `seq > after`).
    pub after: u64,
    /// Records the journal's ring dropped before they could be read.
    pub lost: u64,
    /// The degradation markers found (record summaries, or what the response said).
    pub degraded: Vec<String>,
}

impl Incomplete {
    fn what(&self) -> String {
        let mut parts = Vec::new();
        if self.lost > 0 {
            parts.push(format!(
                "{} record{} lost (dropped from the ring before they were read)",
                self.lost,
                if self.lost == 1 { "" } else { "s" }
            ));
        }
        if !self.degraded.is_empty() {
            parts.push(format!("checker degraded: {}", self.degraded.join("; ")));
        }
        parts.join(", ")
    }
}

/// A complete journal window of one device: every record with `seq > after` up to the newest,
/// none lost, and no degradation marker among them. Only [`ControlClient::window`] makes one.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// The device.
    pub device: String,
    /// The window started after this sequence number.
    pub after: u64,
    /// The records, oldest first.
    pub records: Vec<Record>,
    /// The `after` of the next window (continues where this one ended).
    pub next_after: u64,
}

impl Window {
    /// Judges a slice read after `after`: complete, or [`Incomplete`].
    pub fn from_slice(device: &str, after: u64, slice: JournalSlice) -> Result<Window, Incomplete> {
        let mut degraded = slice.degraded;
        degraded.extend(slice.records.iter().filter_map(unclean_marker));
        if slice.lost > 0 || !degraded.is_empty() {
            return Err(Incomplete {
                device: device.to_string(),
                after,
                lost: slice.lost,
                degraded,
            });
        }
        Ok(Window {
            device: device.to_string(),
            after,
            next_after: slice.next_after.max(after),
            records: slice.records,
        })
    }
}

/// One device as `list` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    /// Device id (`gpu0`).
    pub id: String,
    /// Kind (`gpu`).
    pub kind: String,
    /// Its vfio-user socket.
    pub socket: String,
    /// Whether a client is attached, when the device says.
    pub client: Option<bool>,
    /// One-line description (`1234:0b10 class 030200, 2 BARs, ...`).
    pub summary: String,
}

/// A slice of a device's journal.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JournalSlice {
    /// Records with `seq > after`, oldest first.
    pub records: Vec<Record>,
    /// Records after `after` that the ring dropped before they could be read.
    pub lost: u64,
    /// The newest sequence number in the journal.
    pub last_seq: u64,
    /// The `after` to ask with next time to continue where this slice ended.
    pub next_after: u64,
    /// Whether `limit` cut the slice short.
    pub more: bool,
    /// The entries of `records` that were not records this lab reads (a newer server's event
    /// type), one line each; empty when none. (The server's `journal` response carries no
    /// degradation flag of its own: a degraded checker journals a `checker_degraded` violation,
    /// [`unclean_marker`].)
    pub degraded: Vec<String>,
}

/// A connection to a control socket.
pub struct ControlClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlClient")
            .field("path", &self.path)
            .finish()
    }
}

impl ControlClient {
    /// Connects to `path` with [`DEFAULT_TIMEOUT`] per request.
    pub fn connect(path: &Path) -> Result<ControlClient, ControlError> {
        Self::connect_timeout(path, DEFAULT_TIMEOUT)
    }

    /// Connects to `path`; each read and write may take up to `timeout`.
    pub fn connect_timeout(path: &Path, timeout: Duration) -> Result<ControlClient, ControlError> {
        let connect_err = |source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_err)?;
        let io_err = |source| ControlError::Io {
            path: path.to_path_buf(),
            source,
        };
        stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
        stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        let writer = stream.try_clone().map_err(io_err)?;
        Ok(ControlClient {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// A client over an already connected stream (tests: a fake server on a socket pair).
    #[cfg(test)]
    pub(crate) fn from_stream(stream: UnixStream) -> ControlClient {
        let writer = stream
            .try_clone()
            .unwrap_or_else(|e| panic!("try_clone: {e}"));
        ControlClient {
            path: PathBuf::from("/pair"),
            reader: BufReader::new(stream),
            writer,
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one raw line (without the newline; it is added) and reads the response object,
    /// whatever it says (`ok` true or false).
    pub fn send_line(&mut self, line: &str) -> Result<Value, ControlError> {
        let io_err = |source| ControlError::Io {
            path: self.path.clone(),
            source,
        };
        let mut out = Vec::with_capacity(line.len() + 1);
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
        self.writer.write_all(&out).map_err(io_err)?;
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_RESPONSE)
            .read_until(b'\n', &mut buf)
            .map_err(|source| ControlError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ControlError::Closed(self.path.clone()));
        }
        let bad = |what: String| ControlError::BadResponse {
            path: self.path.clone(),
            what,
        };
        if buf.last() != Some(&b'\n') {
            return Err(bad(format!("a line without newline ({n} bytes)")));
        }
        let v: Value = serde_json::from_slice(&buf).map_err(|e| bad(e.to_string()))?;
        if !v.get("ok").is_some_and(Value::is_boolean) {
            return Err(bad(format!(
                "no \"ok\" in {}",
                truncate(&v.to_string(), 200)
            )));
        }
        Ok(v)
    }

    /// Sends `request` and returns the response, whatever it says.
    pub fn request_raw(&mut self, request: &Value) -> Result<Value, ControlError> {
        self.send_line(&request.to_string())
    }

    /// Sends `request`; a `{"ok":false}` answer becomes [`ControlError::Refused`].
    pub fn request(&mut self, request: &Value) -> Result<Value, ControlError> {
        let v = self.request_raw(request)?;
        if v.get("ok") == Some(&Value::Bool(true)) {
            Ok(v)
        } else {
            Err(ControlError::Refused(
                v.get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("the server refused the request")
                    .to_string(),
            ))
        }
    }

    fn bad(&self, what: &str) -> ControlError {
        ControlError::BadResponse {
            path: self.path.clone(),
            what: what.to_string(),
        }
    }

    /// The devices the server serves.
    pub fn list(&mut self) -> Result<Vec<DeviceEntry>, ControlError> {
        let v = self.request(&json!({"op": "list"}))?;
        let devices = v
            .get("devices")
            .and_then(Value::as_array)
            .ok_or_else(|| self.bad("list without \"devices\""))?;
        let s = |d: &Value, k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Ok(devices
            .iter()
            .map(|d| DeviceEntry {
                id: s(d, "id"),
                kind: s(d, "kind"),
                socket: s(d, "socket"),
                client: d.get("client").and_then(Value::as_bool),
                summary: s(d, "summary"),
            })
            .collect())
    }

    /// Records of `device` with `seq > after` (at most `limit`, if given).
    pub fn journal(
        &mut self,
        device: &str,
        after: u64,
        limit: Option<u64>,
    ) -> Result<JournalSlice, ControlError> {
        let mut req = json!({"op": "journal", "device": device, "after": after});
        if let Some(l) = limit {
            req["limit"] = json!(l);
        }
        let v = self.request(&req)?;
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let raw = v
            .get("records")
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| self.bad("journal without \"records\""))?;
        let (records, degraded) = read_records(raw);
        Ok(JournalSlice {
            records,
            lost: n("lost"),
            last_seq: n("last_seq"),
            next_after: n("next_after"),
            more: v.get("more").and_then(Value::as_bool).unwrap_or(false),
            degraded,
        })
    }

    /// Every record of `device` with `seq > after`, fetched in pages (the whole slice, even past
    /// the server's page size), with what was lost on the way. For displays (`pcisim ctl`);
    /// the lab's judgements read [`ControlClient::window`], which cannot ignore `lost`.
    #[allow(clippy::disallowed_methods)] // pages through `journal`, keeps `lost`
    pub fn journal_all(&mut self, device: &str, after: u64) -> Result<JournalSlice, ControlError> {
        let mut all = self.journal(device, after, None)?;
        while all.more {
            let next = self.journal(device, all.next_after, None)?;
            all.records.extend(next.records);
            all.lost += next.lost;
            all.last_seq = next.last_seq;
            all.next_after = next.next_after;
            all.more = next.more;
            all.degraded.extend(next.degraded);
        }
        Ok(all)
    }

    /// The complete journal window of `device` after `after`: every record since, or
    /// [`ControlError::Incomplete`] if the ring dropped some before they were read or the
    /// device marked the window degraded ([`unclean_marker`]). The one way the lab reads a
    /// window it judges: a window with holes never passes an absence check.
    pub fn window(&mut self, device: &str, after: u64) -> Result<Window, ControlError> {
        #[allow(clippy::disallowed_methods)] // the one reader that judges `lost`
        let slice = self.journal_all(device, after)?;
        Ok(Window::from_slice(device, after, slice)?)
    }

    /// Violation records of `device` with `seq > after`, and how many violations the device has
    /// found in total (it keeps the first few hundred).
    pub fn violations(
        &mut self,
        device: &str,
        after: u64,
    ) -> Result<(Vec<Record>, u64), ControlError> {
        let v = self.request(&json!({"op": "violations", "device": device, "after": after}))?;
        let list = v
            .get("violations")
            .cloned()
            .ok_or_else(|| self.bad("violations without \"violations\""))?;
        let list: Vec<Record> = serde_json::from_value(list)
            .map_err(|e| self.bad(&format!("violations: not journal records: {e}")))?;
        let total = v.get("total").and_then(Value::as_u64).unwrap_or(0);
        Ok((list, total))
    }

    /// Journal counters per device (of one device if `device` is given); each includes
    /// `last_seq`.
    pub fn stats(&mut self, device: Option<&str>) -> Result<Map<String, Value>, ControlError> {
        let mut req = json!({"op": "stats"});
        if let Some(d) = device {
            req["device"] = json!(d);
        }
        let v = self.request(&req)?;
        v.get("stats")
            .and_then(Value::as_object)
            .cloned()
            .ok_or_else(|| self.bad("stats without \"stats\""))
    }

    /// The newest journal sequence number of `device`.
    pub fn last_seq(&mut self, device: &str) -> Result<u64, ControlError> {
        let stats = self.stats(Some(device))?;
        stats
            .get(device)
            .and_then(|s| s.get("last_seq"))
            .and_then(Value::as_u64)
            .ok_or_else(|| self.bad("stats without \"last_seq\""))
    }

    /// The device's state snapshot.
    pub fn status(&mut self, device: &str) -> Result<Value, ControlError> {
        let v = self.request(&json!({"op": "status", "device": device}))?;
        Ok(v.get("status").cloned().unwrap_or(Value::Null))
    }

    /// Injects `fault` (`link-down`, `dma-error=3`, ...).
    pub fn inject(&mut self, device: &str, fault: &str) -> Result<(), ControlError> {
        self.request(&json!({"op": "inject", "device": device, "fault": fault}))
            .map(|_| ())
    }
}

/// One device-side violation found by a [`JournalWatch`] check.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// The device.
    pub device: String,
    /// Its record (a `violation` event).
    pub record: Record,
}

impl Violation {
    /// `VIOLATION dma_after_unmap: write 0x1000+4 [gpu0 #123]`, as a KTAP diagnostic.
    pub fn line(&self) -> String {
        format!(
            "{} [{} #{}]",
            summarize(&self.record.event),
            self.device,
            self.record.seq
        )
    }

    /// The violation's kind (None for a record that is not a violation).
    pub fn kind(&self) -> Option<ViolationKind> {
        match self.record.event {
            Event::Violation { kind, .. } => Some(kind),
            _ => None,
        }
    }

    /// The kind's journal name (`dma_after_unmap`; `unknown` for a record that is not a
    /// violation).
    pub fn kind_name(&self) -> String {
        self.kind()
            .map_or("unknown", ViolationKind::name)
            .to_string()
    }
}

/// What the devices journaled during one window (a scenario, the boot, the teardown).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowReport {
    /// Records read, over all devices.
    pub records: u64,
    /// Records the journals dropped before they could be read.
    pub lost: u64,
    /// The violations, device by device, oldest first.
    pub violations: Vec<Violation>,
    /// Violations counted by the devices in this window but not kept in their violation lists
    /// (a device keeps only its first few hundred).
    pub unretained: u64,
    /// Degradation markers ([`unclean_marker`]): the checker was not fully watching, so "no
    /// violation" proves nothing; `gpu0: <record>` each.
    pub degraded: Vec<String>,
}

impl WindowReport {
    /// Whether the devices found nothing wrong, with the checker fully watching.
    ///
    /// Records lost from the ring do not make a window unclean here: violations are kept apart
    /// from the ring (the first few hundred in a list, all of them counted), so a flood of
    /// records cannot hide one. Host-side reads that judge the records themselves use
    /// [`ControlClient::window`], which fails on any loss.
    pub fn clean(&self) -> bool {
        self.violations.is_empty() && self.unretained == 0 && self.degraded.is_empty()
    }

    /// How many violations in all.
    pub fn violation_count(&self) -> u64 {
        self.violations.len() as u64 + self.unretained
    }

    /// `2 device-side violations (dma_after_unmap, dma_during_reset)`; `journal window
    /// incomplete: checker degraded (1 marker)` when the checker was not fully watching.
    pub fn reason(&self) -> String {
        let mut kinds: Vec<String> = Vec::new();
        for v in &self.violations {
            let k = v.kind_name();
            if !kinds.contains(&k) {
                kinds.push(k);
            }
        }
        let n = self.violation_count();
        let violations = format!(
            "{n} device-side violation{} ({})",
            if n == 1 { "" } else { "s" },
            if kinds.is_empty() {
                "not retained".to_string()
            } else {
                kinds.join(", ")
            }
        );
        let degraded = format!(
            "journal window incomplete: checker degraded ({} marker{})",
            self.degraded.len(),
            if self.degraded.len() == 1 { "" } else { "s" }
        );
        match (n > 0, !self.degraded.is_empty()) {
            (true, true) => format!("{violations}; {degraded}"),
            (false, true) => degraded,
            _ => violations,
        }
    }

    /// The KTAP diagnostic lines: one `DEGRADED ...` per degradation marker, then one
    /// `VIOLATION kind: detail [dev #seq]` per violation.
    pub fn diagnostics(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .degraded
            .iter()
            .map(|d| format!("DEGRADED {d}"))
            .collect();
        lines.extend(self.violations.iter().map(Violation::line));
        if self.unretained > 0 {
            lines.push(format!(
                "VIOLATION and {} more not retained by the device journal",
                self.unretained
            ));
        }
        lines
    }
}

/// Follows the journals of a server's devices window by window: each [`JournalWatch::check`]
/// reads what every device recorded since the previous one, saves it, and returns the
/// violations among it. Windows are contiguous, so nothing falls between two of them.
#[derive(Debug)]
pub struct JournalWatch {
    client: ControlClient,
    /// Per device: journal position and violations counted so far.
    marks: Vec<(String, u64, u64)>,
}

impl JournalWatch {
    /// Starts watching every device the server lists, from the beginning of their journals.
    pub fn new(mut client: ControlClient) -> Result<JournalWatch, ControlError> {
        let marks = client.list()?.into_iter().map(|d| (d.id, 0, 0)).collect();
        Ok(JournalWatch { client, marks })
    }

    /// The devices watched.
    pub fn devices(&self) -> Vec<String> {
        self.marks.iter().map(|(d, _, _)| d.clone()).collect()
    }

    /// Where `device`'s next window starts: the last sequence number the previous check read
    /// (`None` for a device the server did not list).
    pub fn mark(&self, device: &str) -> Option<u64> {
        self.marks
            .iter()
            .find(|(d, _, _)| d == device)
            .map(|(_, mark, _)| *mark)
    }

    /// The client, for other requests.
    pub fn client(&mut self) -> &mut ControlClient {
        &mut self.client
    }

    /// Reads every device's records since the previous check, writes them to `save` as JSON
    /// lines (each with a `"device"` field) if given, and collects the violations among them.
    pub fn check(&mut self, save: Option<&Path>) -> Result<WindowReport, ControlError> {
        let mut report = WindowReport::default();
        let mut lines = String::new();
        for (device, mark, counted) in self.marks.iter_mut() {
            // The slice first: violations are then taken up to its end, and the next window
            // starts right after it. Its `lost` is reported, not judged (see
            // `WindowReport::clean`); its degradation markers are judged.
            #[allow(clippy::disallowed_methods)]
            let slice = self.client.journal_all(device, *mark)?;
            // Degradation violations come from the violation list below (kept apart from the
            // ring); the ring's own markers and the response's from here.
            report.degraded.extend(
                slice
                    .degraded
                    .iter()
                    .cloned()
                    .chain(
                        slice
                            .records
                            .iter()
                            .filter(|r| !matches!(r.event, Event::Violation { .. }))
                            .filter_map(unclean_marker),
                    )
                    .map(|d| format!("{device}: {d}")),
            );
            let end = slice.next_after.max(*mark);
            let (list, total) = self.client.violations(device, *mark)?;
            let (in_window, beyond): (Vec<Record>, Vec<Record>) =
                list.into_iter().partition(|r| r.seq <= end);
            // Counted by the device but in neither list: it keeps only its first few hundred.
            // (Attributed to this window; once the list is full that is the best guess.)
            let listed = (in_window.len() + beyond.len()) as u64;
            let unretained = total.saturating_sub(*counted).saturating_sub(listed);
            report.unretained += unretained;
            *counted += in_window.len() as u64 + unretained;
            report.records += slice.records.len() as u64;
            report.lost += slice.lost;
            for r in &slice.records {
                let mut r = serde_json::to_value(r).unwrap_or(Value::Null);
                if let Some(m) = r.as_object_mut() {
                    m.insert("device".into(), json!(device));
                }
                lines.push_str(&r.to_string());
                lines.push('\n');
            }
            for record in in_window {
                let v = Violation {
                    device: device.clone(),
                    record,
                };
                if v.kind() == Some(ViolationKind::CheckerDegraded) {
                    report.degraded.push(format!(
                        "{device}: {}",
                        unclean_marker(&v.record).unwrap_or_else(|| v.line())
                    ));
                } else {
                    report.violations.push(v);
                }
            }
            *mark = end;
        }
        if let Some(path) = save {
            if let Err(e) = std::fs::write(path, lines) {
                log::warn!("cannot write {}: {e}", path.display());
            }
        }
        Ok(report)
    }

    /// One summary line per device: `gpu0: 1234 records (0 dropped), DMA 1.5 MiB ...`.
    pub fn summary(&mut self) -> Result<Vec<String>, ControlError> {
        let stats = self.client.stats(None)?;
        Ok(stats
            .iter()
            .map(|(id, s)| format!("{id}: {}", stats_line(s)))
            .collect())
    }
}

fn truncate(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// `1.5 MiB`, `12 KiB`, `300 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: &[(&str, u64)] = &[("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if n >= *size {
            return format!("{:.1} {unit}", n as f64 / *size as f64);
        }
    }
    format!("{n} B")
}

/// The one-line journal summary of a device's stats object: `2345 records (0 dropped), DMA
/// 1.5 MiB in 300 accesses, 12 interrupts, 3 resets, 0 violations`.
pub fn stats_line(stats: &Value) -> String {
    let n = |k: &str| stats.get(k).and_then(Value::as_u64).unwrap_or(0);
    format!(
        "{} records ({} dropped), DMA {} in {} accesses ({} refused, {} faults), {} interrupts, \
         {} resets, {} violations",
        n("records"),
        n("dropped"),
        human_bytes(n("dma_bytes")),
        n("dma_accesses"),
        n("dma_refused"),
        n("dma_faults"),
        n("interrupts"),
        n("resets"),
        n("violations")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as the server sends it, read as the lab reads it.
    fn parse(v: Value) -> Record {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn test_summarize_known_and_unknown_events() {
        let s = |v| summarize(&parse(v).event);
        let v = json!({"seq":3,"t_ns":1,"type":"violation","kind":"dma_after_unmap","detail":"write 0x1000+4"});
        assert_eq!(s(v), "VIOLATION dma_after_unmap: write 0x1000+4");
        let d = json!({"seq":4,"t_ns":1,"type":"dma","dir":"write","pasid":null,"iova":4096,"len":512,"count":3,"bytes":1536});
        assert_eq!(s(d), "dma write iova=0x1000 len=0x200 x3 (1536 B)");
        let m = json!({"seq":5,"t_ns":1,"type":"dma_mapped","iova":65536,"size":4096,"backed":false,
            "read":true,"write":true});
        assert_eq!(s(m), "dma_mapped iova=0x10000 size=0x1000 (no fd)");
        let r = json!({"seq":6,"t_ns":1,"type":"reset_begin","kind":"flr"});
        assert_eq!(s(r), "reset_begin kind=flr");
        let c = json!({"seq":1,"t_ns":1,"type":"client_connected"});
        assert_eq!(s(c), "client_connected");
        let w = json!({"seq":1,"t_ns":1,"type":"page_walk","pasid":1,"va":4096,"pa":null});
        assert_eq!(s(w), "page_walk pasid=1 va=0x1000");
        // A record this lab does not know: its type and fields, and a degradation marker.
        let u = json!({"seq":7,"t_ns":1,"type":"warp_drive","iova":4096});
        let (records, degraded) = read_records(vec![u]);
        assert!(records.is_empty());
        assert_eq!(
            degraded,
            ["warp_drive iova=0x1000 (#7) [not a record this lab reads]"]
        );
    }

    #[test]
    fn test_format_record_has_seq_ms_device() {
        let v = parse(json!({"seq":42,"t_ns":12_345_678,"type":"link","up":false}));
        assert_eq!(
            format_record("gpu0", &v),
            "     42       12.346 ms gpu0     link down"
        );
    }

    #[test]
    fn test_stats_line_and_human_bytes() {
        assert_eq!(human_bytes(300), "300 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        let s = json!({"records":10,"dma_bytes":2048,"dma_accesses":2,"interrupts":1,"resets":2,"violations":0});
        assert_eq!(
            stats_line(&s),
            "10 records (0 dropped), DMA 2.0 KiB in 2 accesses (0 refused, 0 faults), \
             1 interrupts, 2 resets, 0 violations"
        );
    }

    #[test]
    fn test_connect_to_missing_socket_is_clear() {
        let e = ControlClient::connect(Path::new("/nonexistent/pcisim-control.sock")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("Cannot connect to the control socket"),
            "{text}"
        );
        assert!(text.contains("--control /nonexistent/pcisim-control.sock"));
    }

    type Shared<T> = std::sync::Arc<std::sync::Mutex<T>>;

    /// A control server over a socket pair answering from a shared list of records.
    fn fake_server(records: Shared<Vec<Value>>) -> ControlClient {
        fake_ring(records, Shared::default())
    }

    /// [`fake_server`] as a ring: records removed from the front of the list were evicted, and
    /// a reader asking from before the oldest one left is told how many it lost. `extra` fields
    /// are added to every `journal` response.
    fn fake_ring(records: Shared<Vec<Value>>, extra: Shared<Map<String, Value>>) -> ControlClient {
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut r = BufReader::new(b.try_clone().unwrap());
            let mut w = b;
            let mut line = String::new();
            while r.read_line(&mut line).unwrap() > 0 {
                let req: Value = serde_json::from_str(&line).unwrap();
                line.clear();
                let after = req["after"].as_u64().unwrap_or(0);
                let all = records.lock().unwrap().clone();
                let seq = |r: &Value| r["seq"].as_u64().unwrap();
                let since: Vec<Value> = all.iter().filter(|r| seq(r) > after).cloned().collect();
                let viol = |r: &&Value| r["type"] == "violation";
                let resp = match req["op"].as_str().unwrap() {
                    "list" => json!({"ok": true, "devices": [{"id": "gpu0"}]}),
                    "journal" => {
                        let lost = since.first().map_or(0, |r| seq(r) - after - 1);
                        let mut resp = json!({"ok": true, "records": since, "lost": lost,
                            "next_after": since.last().map_or(after, seq), "more": false});
                        for (k, v) in extra.lock().unwrap().iter() {
                            resp[k] = v.clone();
                        }
                        resp
                    }
                    "violations" => json!({"ok": true,
                        "violations": since.iter().filter(viol).collect::<Vec<_>>(),
                        "total": all.iter().filter(viol).count()}),
                    "stats" => json!({"ok": true, "stats": {"gpu0": {"records": all.len()}}}),
                    op => panic!("unexpected op {op}"),
                };
                w.write_all(format!("{resp}\n").as_bytes()).unwrap();
            }
        });
        let writer = a.try_clone().unwrap();
        ControlClient {
            path: PathBuf::from("/pair"),
            reader: BufReader::new(a),
            writer,
        }
    }

    /// A record of type `ty` as the server sends it (an unknown `ty`: just the type).
    fn rec(seq: u64, ty: &str) -> Value {
        let event = match ty {
            "violation" => Event::Violation {
                kind: ViolationKind::DmaDuringReset,
                detail: "d".into(),
            },
            "client_connected" => Event::ClientConnected,
            "command" => Event::Command { old: 0, new: 6 },
            "link" => Event::Link { up: false },
            "dma" => Event::Dma {
                dir: pcisim_journal::Dir::Write,
                pasid: None,
                iova: 0x1000,
                len: 4,
                count: 1,
                bytes: 4,
            },
            _ => return json!({"seq": seq, "t_ns": seq, "type": ty}),
        };
        serde_json::to_value(Record {
            seq,
            t_ns: seq,
            event,
        })
        .unwrap()
    }

    /// Typed records of `rec`s.
    fn typed(v: Vec<Value>) -> Vec<Record> {
        v.into_iter().map(parse).collect()
    }

    #[test]
    fn test_journal_watch_windows_are_contiguous_and_find_violations() {
        let records = std::sync::Arc::new(std::sync::Mutex::new(vec![
            rec(1, "client_connected"),
            rec(2, "command"),
            rec(3, "violation"),
        ]));
        let mut watch = JournalWatch::new(fake_server(records.clone())).unwrap();
        assert_eq!(watch.devices(), ["gpu0"]);
        assert_eq!(watch.mark("gpu0"), Some(0));
        assert_eq!(watch.mark("gpu9"), None);
        let dir = std::env::temp_dir().join(format!("pcisim-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let save = dir.join("E1.journal.jsonl");
        let w = watch.check(Some(&save)).unwrap();
        assert_eq!(w.records, 3);
        assert_eq!(w.violations.len(), 1);
        assert_eq!(w.diagnostics(), ["VIOLATION dma_during_reset: d [gpu0 #3]"]);
        let saved = std::fs::read_to_string(&save).unwrap();
        assert_eq!(saved.lines().count(), 3);
        assert!(saved.lines().all(|l| l.contains("\"device\":\"gpu0\"")));

        // The next window starts where this one ended.
        assert_eq!(watch.mark("gpu0"), Some(3));
        let w = watch.check(None).unwrap();
        assert!(w.clean() && w.records == 0, "{w:?}");
        records
            .lock()
            .unwrap()
            .extend([rec(4, "dma"), rec(5, "violation")]);
        let w = watch.check(None).unwrap();
        assert_eq!(w.records, 2);
        assert_eq!(w.violations.len(), 1);
        assert_eq!(w.violations[0].record.seq, 5);
        assert_eq!(w.unretained, 0);
        assert_eq!(watch.summary().unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_window_from_a_slice_with_lost_records_is_incomplete() {
        let slice = |lost, records| JournalSlice {
            records,
            lost,
            last_seq: 9,
            next_after: 9,
            more: false,
            degraded: Vec::new(),
        };
        let w = Window::from_slice(
            "gpu0",
            4,
            slice(0, typed(vec![rec(5, "dma"), rec(9, "link")])),
        )
        .unwrap();
        assert_eq!((w.records.len(), w.after, w.next_after), (2, 4, 9));
        let e = Window::from_slice(
            "gpu0",
            4,
            slice(3, typed(vec![rec(8, "dma"), rec(9, "link")])),
        )
        .unwrap_err();
        assert_eq!(e.lost, 3);
        assert_eq!(
            e.to_string(),
            "journal window incomplete: gpu0 after #4: 3 records lost (dropped from the ring \
             before they were read)"
        );
        // Nothing left at all, but something was lost: still incomplete.
        assert!(Window::from_slice("gpu0", 4, slice(1, Vec::new())).is_err());
    }

    #[test]
    fn test_window_with_a_degradation_marker_is_incomplete() {
        let marker = json!({"seq": 6, "t_ns": 6, "type": "checker_degraded",
            "what": "mapped set overflow"});
        // Not a record this lab reads: a marker.
        assert_eq!(read_records(vec![marker.clone()]).1.len(), 1);
        assert_eq!(unclean_marker(&parse(rec(1, "dma"))), None);
        let (records, degraded) = read_records(vec![rec(5, "dma"), marker]);
        let slice = JournalSlice {
            records,
            degraded,
            next_after: 6,
            ..JournalSlice::default()
        };
        let e = Window::from_slice("npu0", 4, slice).unwrap_err();
        assert_eq!(e.lost, 0);
        assert!(
            e.to_string()
                .contains("checker degraded: checker_degraded what=mapped set overflow (#6)"),
            "{e}"
        );
    }

    #[test]
    fn test_client_window_fails_on_lost_records_and_degraded_responses() {
        let records = std::sync::Arc::new(std::sync::Mutex::new(
            (1..=10).map(|s| rec(s, "dma")).collect::<Vec<_>>(),
        ));
        let extra = Shared::default();
        let mut c = fake_ring(records.clone(), std::sync::Arc::clone(&extra));
        let w = c.window("gpu0", 2).unwrap();
        assert_eq!((w.records.len(), w.next_after), (8, 10));
        // The ring evicts 1..=6: a reader from #2 lost 3..=6.
        records.lock().unwrap().drain(..6);
        #[allow(clippy::disallowed_methods)]
        let raw = c.journal_all("gpu0", 2).unwrap();
        assert_eq!(
            (raw.lost, raw.records.len()),
            (4, 4),
            "the raw slice says so"
        );
        let e = c.window("gpu0", 2).unwrap_err();
        assert!(
            matches!(&e, ControlError::Incomplete(i) if i.lost == 4 && i.device == "gpu0"),
            "{e:?}"
        );
        assert!(e
            .to_string()
            .starts_with("journal window incomplete: gpu0 after #2: 4 records lost"));
        // From the oldest record kept on, the window is complete again.
        assert_eq!(c.window("gpu0", 6).unwrap().records.len(), 4);
    }

    #[test]
    fn test_journal_watch_degradation_makes_the_window_unclean() {
        // The checker's own marker (a checker_degraded violation) and a record this lab cannot
        // read (a newer server's type).
        let records = std::sync::Arc::new(std::sync::Mutex::new(vec![
            rec(1, "client_connected"),
            json!({"seq": 2, "t_ns": 2, "type": "violation", "kind": "checker_degraded",
                "detail": "x"}),
            rec(3, "checker_degraded"),
        ]));
        let mut watch = JournalWatch::new(fake_server(records)).unwrap();
        let w = watch.check(None).unwrap();
        assert!(w.violations.is_empty());
        assert!(!w.clean(), "{w:?}");
        assert_eq!(
            w.reason(),
            "journal window incomplete: checker degraded (2 markers)"
        );
        assert_eq!(
            w.diagnostics(),
            [
                "DEGRADED gpu0: checker_degraded (#3) [not a record this lab reads]",
                "DEGRADED gpu0: VIOLATION checker_degraded: x (#2)"
            ]
        );
    }

    #[test]
    fn test_checker_degraded_violation_is_a_degradation_not_a_device_fault() {
        let degraded = json!({"seq": 3, "t_ns": 3, "type": "violation",
            "kind": "checker_degraded", "detail": "drain of in-flight accesses timed out after 10 s"});
        assert!(unclean_marker(&parse(degraded.clone())).is_some());
        assert_eq!(unclean_marker(&parse(rec(4, "violation"))), None);
        // The suite's window: unclean, reported as a degradation (once), not as a violation.
        let records = std::sync::Arc::new(std::sync::Mutex::new(vec![
            rec(1, "client_connected"),
            rec(2, "command"),
            degraded.clone(),
        ]));
        let mut watch = JournalWatch::new(fake_server(records)).unwrap();
        let w = watch.check(None).unwrap();
        assert!(!w.clean());
        assert!(w.violations.is_empty(), "{w:?}");
        assert_eq!(w.degraded.len(), 1, "{w:?}");
        assert_eq!(
            w.reason(),
            "journal window incomplete: checker degraded (1 marker)"
        );
        assert_eq!(
            w.diagnostics(),
            [
                "DEGRADED gpu0: VIOLATION checker_degraded: drain of in-flight accesses timed out \
              after 10 s (#3)"
            ]
        );
        // A host-side window with it is incomplete.
        let slice = JournalSlice {
            records: typed(vec![rec(2, "command"), degraded]),
            next_after: 3,
            ..JournalSlice::default()
        };
        let e = Window::from_slice("gpu0", 1, slice).unwrap_err();
        assert!(
            e.to_string()
                .contains("checker degraded: VIOLATION checker_degraded"),
            "{e}"
        );
    }

    #[test]
    fn test_journal_watch_reports_lost_records_without_failing() {
        // Violations are kept apart from the ring: losing ring records hides none of them.
        let records = std::sync::Arc::new(std::sync::Mutex::new(vec![
            rec(5, "dma"),
            rec(6, "violation"),
        ]));
        let mut watch = JournalWatch::new(fake_server(records)).unwrap();
        let w = watch.check(None).unwrap();
        assert_eq!(w.lost, 4);
        assert_eq!(w.violations.len(), 1);
    }

    #[test]
    fn test_client_reads_responses_and_refusals() {
        let (a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut r = BufReader::new(b.try_clone().unwrap());
            let mut w = b;
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "{\"op\":\"list\"}\n");
            w.write_all(b"{\"ok\":true,\"devices\":[{\"id\":\"gpu0\",\"kind\":\"gpu\",\"socket\":\"/s\",\"client\":false,\"summary\":\"x\"}]}\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            w.write_all(
                b"{\"ok\":false,\"error\":\"unknown device \\\"gpu9\\\" (devices: gpu0)\"}\n",
            )
            .unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            w.write_all(b"[1]\n").unwrap();
        });
        let writer = a.try_clone().unwrap();
        let mut c = ControlClient {
            path: PathBuf::from("/pair"),
            reader: BufReader::new(a),
            writer,
        };
        let list = c.list().unwrap();
        assert_eq!(list[0].id, "gpu0");
        assert_eq!(list[0].client, Some(false));
        let e = c.status("gpu9").unwrap_err();
        assert_eq!(e.to_string(), "unknown device \"gpu9\" (devices: gpu0)");
        assert!(matches!(
            c.send_line("x").unwrap_err(),
            ControlError::BadResponse { .. }
        ));
        server.join().unwrap();
    }
}
