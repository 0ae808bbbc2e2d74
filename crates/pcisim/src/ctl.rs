//! `pcisim ctl`: talk to a running `pcisim serve --control PATH`.
//!
//! Text output by default (one line per record: sequence number, milliseconds since the journal
//! began, device, event; violations read `VIOLATION kind: detail`). With `--json`: `journal`
//! prints JSON lines, one record each with a `"device"` field added; `violations` prints one
//! JSON array of such records (`[]` when there are none, so "nothing found" is a valid,
//! parseable answer rather than empty output); `list`, `stats`, `status` and `inject` print the
//! server's response object.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use pcisim_journal::text::format_record;
use pcisim_journal::{timeline, Record};
use pcisim_lab::vm::control::{stats_line, ControlClient};
use serde_json::{json, Value};

/// How often `journal --follow` asks for new records.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(100);

/// `pcisim ctl` subcommands.
#[derive(Debug, Subcommand)]
pub enum CtlCmd {
    /// The devices: id, kind, socket, whether a client is attached, what they advertise.
    List,
    /// Journal records (all devices unless one is named).
    Journal {
        /// Only this device.
        #[arg(long, value_name = "ID")]
        device: Option<String>,
        /// Only this device (the same as --device).
        #[arg(value_name = "DEVICE", conflicts_with = "device")]
        device_arg: Option<String>,
        /// Keep printing new records (polls every 100 ms) until interrupted.
        #[arg(long)]
        follow: bool,
        /// Only records with a sequence number above this.
        #[arg(long, default_value_t = 0, value_name = "SEQ")]
        after: u64,
        /// Draw the records as a timeline picture (SVG) in FILE instead of printing them: one
        /// device (--device, or the server's only one).
        #[arg(long, value_name = "FILE", conflicts_with = "follow")]
        timeline: Option<PathBuf>,
        /// With --timeline: the guest process's events for the picture's process lane, lines
        /// `<ns> <text>` or a KTAP file with `# t <ns> <text>` lines (guest CLOCK_MONOTONIC).
        #[arg(long, value_name = "FILE", requires = "timeline")]
        guest_events: Option<PathBuf>,
    },
    /// Invariant violations the devices found (all devices unless one is named).
    Violations {
        /// Only this device.
        #[arg(long, value_name = "ID")]
        device: Option<String>,
        /// Only this device (the same as --device).
        #[arg(value_name = "DEVICE", conflicts_with = "device")]
        device_arg: Option<String>,
        /// Only violations with a sequence number above this.
        #[arg(long, default_value_t = 0, value_name = "SEQ")]
        after: u64,
    },
    /// Journal counters (records, DMA, interrupts, resets, violations) and the vfio-user reply
    /// latency (replies, slowest with its command, mean).
    Stats {
        /// Only this device.
        #[arg(long, value_name = "ID")]
        device: Option<String>,
    },
    /// A device's state (command, power, link, client, DMA mappings, faults, registers).
    Status {
        /// The device (may be left out when the server has one device).
        #[arg(long, value_name = "ID")]
        device: Option<String>,
    },
    /// Inject a fault: link-down, link-up, dma-error[=N], slow-reset=MS|never, stuck-tp=on|off,
    /// aer-correctable, aer-uncorrectable[=fatal|nonfatal].
    Inject {
        /// The device (may be left out when the server has one device).
        #[arg(long, value_name = "ID")]
        device: Option<String>,
        /// The fault.
        fault: String,
    },
}

/// Output that may go to a closed pipe (`pcisim ctl journal | head`): a broken pipe ends the
/// command quietly.
struct Out {
    out: io::Stdout,
}

/// A broken pipe on stdout: stop, successfully.
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout closed")
    }
}

impl std::error::Error for StdoutClosed {}

impl Out {
    fn line(&mut self, text: &str) -> Result<()> {
        let mut o = self.out.lock();
        match writeln!(o, "{text}").and_then(|_| o.flush()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
            Err(e) => Err(e).context("writing to stdout"),
        }
    }
}

/// Runs `pcisim ctl`; returns the exit code.
pub fn run(control: &Path, json_out: bool, cmd: CtlCmd) -> Result<i32> {
    let mut out = Out { out: io::stdout() };
    match run_inner(control, json_out, cmd, &mut out) {
        Ok(()) => Ok(0),
        Err(e) if e.is::<StdoutClosed>() => Ok(0),
        Err(e) => Err(e),
    }
}

fn run_inner(control: &Path, json_out: bool, cmd: CtlCmd, out: &mut Out) -> Result<()> {
    let mut c = ControlClient::connect(control)?;
    match cmd {
        CtlCmd::List => {
            if json_out {
                let v = c.request(&json!({"op": "list"}))?;
                return out.line(&v.to_string());
            }
            let devices = c.list()?;
            if devices.is_empty() {
                return out.line("no devices");
            }
            for d in devices {
                let client = match d.client {
                    Some(true) => "client attached",
                    Some(false) => "no client",
                    None => "client ?",
                };
                out.line(&format!(
                    "{:<8} {:<4} {:<15} {}  {}",
                    d.id, d.kind, client, d.socket, d.summary
                ))?;
            }
            Ok(())
        }
        CtlCmd::Journal {
            device,
            device_arg,
            after,
            timeline: Some(file),
            guest_events,
            ..
        } => timeline(
            &mut c,
            device.or(device_arg),
            after,
            &file,
            guest_events.as_deref(),
            out,
        ),
        CtlCmd::Journal {
            device,
            device_arg,
            follow,
            after,
            ..
        } => journal(&mut c, device.or(device_arg), follow, after, json_out, out),
        CtlCmd::Violations {
            device,
            device_arg,
            after,
        } => {
            let mut all = Vec::new();
            for d in devices(&mut c, device.or(device_arg))? {
                let (list, total) = c.violations(&d, after)?;
                if json_out {
                    all.extend(list.iter().map(|r| with_device(&d, r)));
                    continue;
                }
                for r in &list {
                    print_record(out, &d, r, json_out)?;
                }
                let shown = list.len() as u64;
                let kept_note = if total > shown && after == 0 {
                    format!(" ({total} found; the journal keeps {shown} of them)")
                } else {
                    String::new()
                };
                out.line(&match shown {
                    0 => format!("{d}: no violations"),
                    1 => format!("{d}: 1 violation{kept_note}"),
                    n => format!("{d}: {n} violations{kept_note}"),
                })?;
            }
            if json_out {
                out.line(&violations_json(all))?;
            }
            Ok(())
        }
        CtlCmd::Stats { device } => {
            let mut req = json!({"op": "stats"});
            if let Some(d) = &device {
                req["device"] = json!(d);
            }
            let v = c.request(&req)?;
            if json_out {
                return out.line(&v.to_string());
            }
            if let Some(stats) = v.get("stats").and_then(Value::as_object) {
                for (id, s) in stats {
                    out.line(&format!("{id}: {}{}", stats_line(s), reply_text(s)))?;
                }
            }
            Ok(())
        }
        CtlCmd::Status { device } => {
            let mut req = json!({"op": "status"});
            if let Some(d) = &device {
                req["device"] = json!(d);
            }
            let v = c.request(&req)?;
            if json_out {
                return out.line(&v.to_string());
            }
            let id = v.get("device").and_then(Value::as_str).unwrap_or("?");
            let status = v.get("status").cloned().unwrap_or(Value::Null);
            out.line(&format!("{id}: {}", serde_json::to_string_pretty(&status)?))
        }
        CtlCmd::Inject { device, fault } => {
            let mut req = json!({"op": "inject", "fault": fault});
            if let Some(d) = &device {
                req["device"] = json!(d);
            }
            let v = c.request(&req)?;
            if json_out {
                return out.line(&v.to_string());
            }
            let id = v.get("device").and_then(Value::as_str).unwrap_or("?");
            out.line(&format!("{id}: injected {fault}"))
        }
    }
}

/// `; 1234 vfio-user replies, slowest 301.2 ms (DEVICE_RESET), mean 0.042 ms` from a device's
/// `stats` object (its `reply_latency`), or nothing when the server does not report it.
fn reply_text(stats: &Value) -> String {
    let l = &stats["reply_latency"];
    let Some(replies) = l["replies"].as_u64() else {
        return String::new();
    };
    if replies == 0 {
        return "; no vfio-user replies yet".to_string();
    }
    let ms = |ns: u64| ns as f64 / 1e6;
    format!(
        "; {replies} vfio-user replies, slowest {:.1} ms ({}), mean {:.3} ms",
        ms(l["max_ns"].as_u64().unwrap_or(0)),
        l["max_command"].as_str().unwrap_or("?"),
        ms(l["total_ns"].as_u64().unwrap_or(0) / replies)
    )
}

/// The device named, checked against the server's list, or every device.
fn devices(c: &mut ControlClient, device: Option<String>) -> Result<Vec<String>> {
    let all: Vec<String> = c.list()?.into_iter().map(|d| d.id).collect();
    match device {
        Some(d) if all.contains(&d) => Ok(vec![d]),
        Some(d) => bail!("unknown device {d:?} (devices: {})", all.join(", ")),
        None => Ok(all),
    }
}

/// `record` (its wire form) with a `"device"` field added.
fn with_device(device: &str, record: &Record) -> Value {
    let mut r = serde_json::to_value(record).unwrap_or(Value::Null);
    if let Some(m) = r.as_object_mut() {
        m.insert("device".into(), json!(device));
    }
    r
}

/// `violations --json`: one JSON array of the records (`[]` when there are none).
fn violations_json(records: Vec<Value>) -> String {
    Value::Array(records).to_string()
}

fn print_record(out: &mut Out, device: &str, record: &Record, json_out: bool) -> Result<()> {
    if json_out {
        out.line(&with_device(device, record).to_string())
    } else {
        out.line(&format_record(device, record))
    }
}

fn journal(
    c: &mut ControlClient,
    device: Option<String>,
    follow: bool,
    after: u64,
    json_out: bool,
    out: &mut Out,
) -> Result<()> {
    let ids = devices(c, device)?;
    let mut cursors: BTreeMap<String, u64> = ids.iter().map(|d| (d.clone(), after)).collect();
    loop {
        for (d, cursor) in cursors.iter_mut() {
            loop {
                let slice = c.journal(d, *cursor, None)?;
                if slice.lost > 0 {
                    let note = format!(
                        "{d}: {} records lost (dropped from the journal ring before they were read)",
                        slice.lost
                    );
                    if json_out {
                        pcisim_lab::note!("pcisim ctl: {note}");
                    } else {
                        out.line(&note)?;
                    }
                }
                for what in &slice.degraded {
                    // Not silently dropped: a record this build cannot read, or a degraded
                    // window, is said on stderr.
                    pcisim_lab::note!("pcisim ctl: {d}: {what}");
                }
                for r in &slice.records {
                    print_record(out, d, r, json_out)?;
                }
                *cursor = slice.next_after;
                if !slice.more {
                    break;
                }
            }
        }
        if !follow {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_INTERVAL);
    }
}

/// `journal --timeline FILE`: one device's records after `after` drawn as an SVG timeline, with
/// the guest's events from `guest_events` (see `pcisim_journal::timeline`).
fn timeline(
    c: &mut ControlClient,
    device: Option<String>,
    after: u64,
    file: &Path,
    guest_events: Option<&Path>,
    out: &mut Out,
) -> Result<()> {
    let ids = devices(c, device)?;
    let [d] = ids.as_slice() else {
        bail!(
            "--timeline draws one device: name it (devices: {})",
            ids.join(", ")
        );
    };
    let slice = c.journal_all(d, after)?;
    for what in &slice.degraded {
        pcisim_lab::note!("pcisim ctl: {d}: {what}");
    }
    let records = slice.records;
    let guest = match guest_events {
        Some(p) => timeline::parse_guest_events(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        ),
        None => Vec::new(),
    };
    let mut title = format!("{d}: journal after #{after}");
    if slice.lost > 0 {
        title.push_str(&format!(
            " ({} records lost from the ring before they were read)",
            slice.lost
        ));
    }
    let svg = timeline::render_svg(&title, &records, &guest);
    std::fs::write(file, svg).with_context(|| format!("writing {}", file.display()))?;
    let anchored = match timeline::find_anchor(&records, &guest) {
        Some(a) => format!("aligned on pasid {}'s bind", a.pasid),
        None if guest.is_empty() => "no guest events".to_string(),
        None => "guest events NOT aligned (no anchor)".to_string(),
    };
    out.line(&format!(
        "{d}: {} records, {} guest events ({anchored}): {}",
        records.len(),
        guest.len(),
        file.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_violations_json_empty_is_empty_array() {
        let out = violations_json(Vec::new());
        assert_eq!(out, "[]");
        assert_eq!(serde_json::from_str::<Value>(&out).ok(), Some(json!([])));
    }

    #[test]
    fn test_violations_json_records_with_device_in_one_array() {
        let rec = Record {
            seq: 7,
            t_ns: 0,
            event: pcisim_journal::Event::Violation {
                kind: pcisim_journal::ViolationKind::DmaAfterUnmap,
                detail: String::new(),
            },
        };
        let out = violations_json(vec![with_device("gpu0", &rec), with_device("npu0", &rec)]);
        let v: Value = serde_json::from_str(&out).unwrap_or_default();
        assert_eq!(v.as_array().map(Vec::len), Some(2), "{out}");
        assert_eq!(v[0]["device"], "gpu0");
        assert_eq!(v[1]["device"], "npu0");
        assert_eq!(v[1]["kind"], "dma_after_unmap");
    }
}
