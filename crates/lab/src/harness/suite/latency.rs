//! The device server's vfio-user reply latency, as the suite reports it (issue 15 §1: "the
//! server answers every synchronous request well inside QEMU's 5 s `x-msg-timeout` with
//! several VMs busy").
//!
//! At each VM's teardown (its server still running) the suite reads every device's
//! `reply_latency` from the control socket's `stats` (docs/protocol.md, "Reply latency") and
//! prints one line: `lab: [PROFILE] worst vfio-user reply: X ms (COMMAND on DEVICE), N
//! replies`. A reply slower than [`QEMU_MSG_TIMEOUT`] fails the run: QEMU had given that
//! request up, so whatever the guest saw next was not what the device answered. The run's
//! slowest reply (over all VMs) gets a line of its own before the total line.

use serde_json::{Map, Value};

use super::*;

/// QEMU's `vfio-user-pci` `x-msg-timeout` default: how long QEMU waits for a reply.
pub(super) const QEMU_MSG_TIMEOUT: Duration = Duration::from_secs(5);

/// The slowest reply of a VM (or of the run) and how many replies there were.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Tally {
    /// The slowest reply: (ns, command, device, profile).
    pub(super) worst: Option<(u64, String, String, String)>,
    /// Replies counted.
    pub(super) replies: u64,
    /// VMs whose figures were read.
    pub(super) vms: usize,
}

impl Tally {
    /// A VM's tally from a `stats` answer (device id → stats object). `None` when no device
    /// reports `reply_latency` (a server that does not measure it).
    pub(super) fn from_stats(profile: &str, stats: &Map<String, Value>) -> Option<Tally> {
        let mut t = Tally {
            vms: 1,
            ..Tally::default()
        };
        let mut any = false;
        for (device, s) in stats {
            let l = &s["reply_latency"];
            let Some(replies) = l["replies"].as_u64() else {
                continue;
            };
            any = true;
            t.replies += replies;
            let ns = l["max_ns"].as_u64().unwrap_or(0);
            if replies > 0 && t.worst.as_ref().is_none_or(|w| ns > w.0) {
                let command = l["max_command"].as_str().unwrap_or("?").to_string();
                t.worst = Some((ns, command, device.clone(), profile.to_string()));
            }
        }
        any.then_some(t)
    }

    /// Adds another VM's tally.
    pub(super) fn merge(&mut self, other: Tally) {
        self.replies += other.replies;
        self.vms += other.vms;
        if let Some(w) = other.worst {
            if self.worst.as_ref().is_none_or(|mine| w.0 > mine.0) {
                self.worst = Some(w);
            }
        }
    }

    /// `12.3 ms (REGION_READ on gpu0)`, or `none`.
    fn worst_text(&self, with_profile: bool) -> String {
        match &self.worst {
            None => "none".to_string(),
            Some((ns, command, device, profile)) => {
                let ms = *ns as f64 / 1e6;
                let ms = if ms >= 10.0 {
                    format!("{ms:.1}")
                } else {
                    format!("{ms:.3}")
                };
                if with_profile {
                    format!("{ms} ms ({command} on {device}, VM {profile})")
                } else {
                    format!("{ms} ms ({command} on {device})")
                }
            }
        }
    }

    /// Whether the slowest reply took longer than QEMU waits.
    fn over_timeout(&self) -> bool {
        self.worst
            .as_ref()
            .is_some_and(|w| Duration::from_nanos(w.0) > QEMU_MSG_TIMEOUT)
    }
}

/// Reads the VM's reply latencies through `watch`'s control connection, prints the VM's line,
/// and adds them to `report`'s run tally. `Ok(false)`: a reply took longer than QEMU's
/// x-msg-timeout (the run fails; said on the progress stream and in the KTAP). Figures that
/// cannot be read are said and not a failure (the journal checks judge the server).
pub(super) fn report_vm(
    watch: &mut JournalWatch,
    profile: &str,
    report: &mut Report<'_>,
) -> Result<bool, LabError> {
    let stats = match watch.client().stats(None) {
        Ok(s) => s,
        Err(e) => {
            report.line(&format!(
                "worst vfio-user reply: unavailable: {}",
                error_chain(&e)
            ))?;
            return Ok(true);
        }
    };
    let Some(tally) = Tally::from_stats(profile, &stats) else {
        report.line("worst vfio-user reply: unavailable: the server does not report it")?;
        return Ok(true);
    };
    report.line(&format!(
        "worst vfio-user reply: {}, {} replies",
        tally.worst_text(false),
        tally.replies
    ))?;
    let clean = !tally.over_timeout();
    if !clean {
        let what = format!(
            "{profile}: a vfio-user reply took {}: longer than QEMU's x-msg-timeout ({} s), so \
             QEMU had given the request up",
            tally.worst_text(false),
            QEMU_MSG_TIMEOUT.as_secs()
        );
        report.outside_failure(&what)?;
        report.line(&what)?;
    }
    report.replies.merge(tally);
    Ok(clean)
}

/// The run's line: `worst vfio-user reply of the run: X ms (COMMAND on DEVICE, VM PROFILE), N
/// replies in V VMs` (nothing when no VM's figures were read).
pub(super) fn run_line(tally: &Tally) -> Option<String> {
    (tally.vms > 0).then(|| {
        format!(
            "worst vfio-user reply of the run: {}, {} replies in {} VM{}",
            tally.worst_text(true),
            tally.replies,
            tally.vms,
            if tally.vms == 1 { "" } else { "s" }
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::{BufRead, BufReader};

    /// A control server that lists gpu0 and answers one `stats` with `gpu0`'s slowest reply
    /// `max_ns` (10 replies).
    fn server_with_worst(max_ns: u64) -> JournalWatch {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut r = BufReader::new(b.try_clone().unwrap());
            let mut w = b;
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            w.write_all(b"{\"ok\":true,\"devices\":[{\"id\":\"gpu0\"}]}\n")
                .unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("\"stats\""), "{line}");
            let reply = json!({"ok": true, "stats": {"gpu0": {"records": 1, "reply_latency":
                {"replies": 10, "max_ns": max_ns, "max_command": "DEVICE_RESET"}}}});
            w.write_all(format!("{reply}\n").as_bytes()).unwrap();
        });
        JournalWatch::new(crate::vm::control::ControlClient::from_stream(a)).unwrap()
    }

    /// What `report_vm` said and whether it judged the VM clean.
    fn judged(max_ns: u64) -> (bool, String, String, Tally) {
        let mut watch = server_with_worst(max_ns);
        let (mut ktap, mut progress) = (Vec::new(), Vec::new());
        let (clean, tally) = {
            let mut r = Report::new(&mut ktap, &mut progress);
            let clean = report_vm(&mut watch, "gpu-nsr", &mut r).unwrap();
            (clean, std::mem::take(&mut r.replies))
        };
        (
            clean,
            String::from_utf8(progress).unwrap(),
            String::from_utf8(ktap).unwrap(),
            tally,
        )
    }

    #[test]
    fn test_a_reply_over_qemus_timeout_fails_the_run() {
        let (clean, progress, ktap, tally) = judged(300_000_000);
        assert!(clean, "{progress}");
        assert_eq!(
            progress,
            "lab: worst vfio-user reply: 300.0 ms (DEVICE_RESET on gpu0), 10 replies\n"
        );
        assert!(ktap.is_empty(), "{ktap}");
        assert_eq!((tally.vms, tally.replies), (1, 10));

        let (clean, progress, ktap, _) = judged(5_200_000_000);
        assert!(!clean, "{progress}");
        assert!(
            ktap.contains(
                "gpu-nsr: a vfio-user reply took 5200.0 ms (DEVICE_RESET on gpu0): \
                 longer than QEMU's x-msg-timeout (5 s)"
            ),
            "{ktap}"
        );
        assert!(
            progress.contains("longer than QEMU's x-msg-timeout"),
            "{progress}"
        );
    }

    fn stats(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn test_tally_takes_the_slowest_device_and_sums_replies() {
        let s = stats(json!({
            "gpu0": {"records": 3, "reply_latency": {"replies": 10, "max_ns": 2_500_000,
                     "max_command": "REGION_READ"}},
            "npu0": {"reply_latency": {"replies": 5, "max_ns": 40_000_000,
                     "max_command": "DEVICE_RESET"}},
            "old0": {"records": 1},
        }));
        let t = Tally::from_stats("gpu-npu", &s).unwrap_or_default();
        assert_eq!(t.replies, 15);
        assert_eq!(t.worst_text(false), "40.0 ms (DEVICE_RESET on npu0)");
        assert!(!t.over_timeout());
        assert_eq!(
            Tally::from_stats("p", &stats(json!({"g": {"records": 1}}))),
            None
        );

        let mut run = Tally::default();
        assert_eq!(run_line(&run), None);
        run.merge(t);
        let slow = stats(json!({"gpu0": {"reply_latency": {"replies": 2,
            "max_ns": 5_000_000_001u64, "max_command": "DEVICE_RESET"}}}));
        let slow = Tally::from_stats("gpu-nsr", &slow).unwrap_or_default();
        assert!(slow.over_timeout());
        run.merge(slow);
        assert_eq!(
            run_line(&run).as_deref(),
            Some(
                "worst vfio-user reply of the run: 5000.0 ms (DEVICE_RESET on gpu0, VM \
                 gpu-nsr), 17 replies in 2 VMs"
            )
        );
    }
}
