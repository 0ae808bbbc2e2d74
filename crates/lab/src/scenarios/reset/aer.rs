//! R12: PCIe AER error recovery through the guest's AER driver and the guest GPU driver's
//! `pci_error_handlers` (`guest-tests/kmod/gpu_*.c`).
//!
//! QEMU's AER injection works at a device with QEMU's own AER model: the GPU's root port (at
//! our vfio-user-pci device QEMU drops the message). `pcie_aer_inject_error rp1 DLP` (HMP, through QMP `human-monitor-command`) makes
//! the port log a Data Link Protocol Error, which its Uncorrectable Error Severity register
//! calls fatal, and raise its AER interrupt; the guest's AER core names the port as the source
//! and runs recovery over everything below it: our driver's `error_detected` (frozen),
//! pciehp's slot reset (QEMU resets the devices below: a DEVICE_RESET to our server), the
//! driver's `slot_reset` (restores config space, restarts the ring) and `resume`.
//! docs/reset.md says why our own device cannot be the named source (QEMU keeps the message of
//! a vfio-user-pci device to itself) and why the VM needs native pciehp.

use std::time::{Duration, Instant};

use serde_json::json;

use super::*;
use crate::guestops;
use crate::vm::kmod::GPU_MODULE;
use pcisim_guest_wire::{GuestProgram as Invocation, UnmapCall, UserptrMode, UserptrOptions};

/// The GPU of the `gpu-userptr` profile.
const GPU: &str = "gpu0";

/// A fatal error by the root port's default severity (PCIe Base 6.0 §7.8.4.4: DLP is fatal).
const INJECTED_ERROR: &str = "DLP";

/// How long the guest's recovery may take before the scenario gives up waiting (measured:
/// ~0.15 s; pciehp's slot reset alone waits 100 ms after the SBR, 1 s more for Link Active).
const RECOVERY_WAIT: Duration = Duration::from_secs(30);

/// The kernel log lines written just before each injection; the scenario reads the log from
/// them.
const LOG_MARK: &str = "pcisim-lab: R12 injecting an AER error, device idle";
const LOG_MARK_INFLIGHT: &str = "pcisim-lab: R12 injecting an AER error, fill in flight";

/// `R12 aer-recovery`: an uncorrectable (fatal) error injected at the GPU's root port; the
/// guest's AER core recovers with the GPU driver's error handlers and one slot reset.
pub const R12: HostProgram = HostProgram {
    name: "r12-aer-recovery",
    profile: ProfileId::GpuUserptr,
    run: r12_aer_recovery,
};

/// A kernel log line's timestamp in seconds (`[   19.380477] ...`).
fn stamp(line: &str) -> Option<f64> {
    let rest = line.trim_start().strip_prefix('[')?;
    rest.split(']').next()?.trim().parse().ok()
}

/// The lines of `log` containing `needle`, with their timestamps.
fn find_lines<'a>(log: &'a str, needle: &str) -> Vec<(Option<f64>, &'a str)> {
    log.lines()
        .filter(|l| l.contains(needle))
        .map(|l| (stamp(l), l))
        .collect()
}

/// The steps of the recovery, in the order the kernel must log them: (what, log substring).
fn expected_steps(rp: &str, bdf: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "the port's AER error message",
            format!("{rp}: AER: Uncorrectable (Fatal) error message received from {rp}"),
        ),
        (
            "the driver's error_detected (frozen)",
            format!("{bdf}: error_detected: channel frozen"),
        ),
        (
            "the slot reset",
            format!("{rp}: AER: Root Port link has been reset (0)"),
        ),
        (
            "the driver's slot_reset",
            format!("{bdf}: slot_reset: config space restored, ring restarted"),
        ),
        (
            "the driver's resume",
            format!("{bdf}: resume: accepting work again"),
        ),
        (
            "the AER core's verdict",
            format!("{rp}: AER: device recovery successful"),
        ),
    ]
}

/// Checks that each step is logged exactly once and in order; returns their timestamps.
fn check_log_order(
    ctx: &mut HostCtx<'_>,
    log: &str,
    steps: &[(&'static str, String)],
) -> Vec<Option<f64>> {
    let mut stamps = Vec::new();
    let mut problems = Vec::new();
    for (what, needle) in steps {
        let found = find_lines(log, needle);
        if found.len() != 1 {
            problems.push(format!("{what}: {} lines with {needle:?}", found.len()));
        }
        stamps.push(found.first().and_then(|(t, _)| *t));
    }
    let ordered = stamps
        .windows(2)
        .all(|w| matches!((w[0], w[1]), (Some(a), Some(b)) if a <= b));
    if !ordered {
        problems.push(format!("timestamps out of order: {stamps:?}"));
    }
    let names: Vec<&str> = steps.iter().map(|(w, _)| *w).collect();
    ctx.check(
        &format!(
            "the guest kernel logged, once each and in this order: {}",
            names.join(" -> ")
        ),
        problems.is_empty(),
        problems.join("; "),
    );
    stamps
}

/// Where the scenario injects and what it watches.
struct Target {
    /// The GPU's BDF.
    bdf: String,
    /// The root port's QEMU id (`rp1`) and BDF.
    port_id: String,
    rp: String,
    /// The driver's `pcisim_recovery` attribute.
    attr: String,
}

/// Injects the fatal error at the root port and waits for the AER core's verdict; returns the
/// guest kernel log from the mark `log_mark` on.
fn inject_and_wait(ctx: &mut HostCtx<'_>, t: &Target, log_mark: &str) -> Result<String, HostError> {
    ctx.sh(&format!("echo '{log_mark}' > /dev/kmsg"))?;
    let command = format!("pcie_aer_inject_error {} {INJECTED_ERROR}", t.port_id);
    let reply = ctx.qmp().execute(
        "human-monitor-command",
        Some(json!({ "command-line": command })),
    )?;
    let reply = reply.as_str().unwrap_or_default().trim().to_string();
    ctx.check(
        &format!(
            "QEMU injected {INJECTED_ERROR} at {} (`{command}`)",
            t.port_id
        ),
        reply.starts_with(&format!("OK id: {}", t.port_id)),
        &reply,
    );
    // Wait for the AER core's verdict, either way.
    let script = format!("dmesg | sed -n '/{log_mark}/,$p'");
    let deadline = Instant::now() + RECOVERY_WAIT;
    let log = loop {
        let log = ctx.sh(&script)?;
        if log.contains("AER: device recovery") || Instant::now() >= deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for l in log.lines().skip(1) {
        ctx.diag(&format!("guest: {}", l.trim()));
    }
    Ok(log)
}

/// The checks every recovery must pass: the kernel log's steps in order, the driver's
/// callbacks (`rounds` recoveries since load), one `device` reset in the journal window `w`
/// followed by the driver's config restore. Returns whether the driver recovered.
fn check_recovery(
    ctx: &mut HostCtx<'_>,
    t: &Target,
    log: &str,
    w: &[Record],
    rounds: usize,
) -> Result<bool, HostError> {
    let steps = expected_steps(&t.rp, &t.bdf);
    let stamps = check_log_order(ctx, log, &steps);
    let want = vec!["error_detected slot_reset resume"; rounds].join(" ");
    let recovery = ctx.sh(&format!("cat {}", t.attr))?;
    let recovered = ctx.check(
        &format!("the driver's callbacks since load: {want}"),
        recovery.lines().next().map(str::trim) == Some(&format!("steps {want}"))
            && recovery
                .lines()
                .any(|l| l.trim() == format!("total {}", 3 * rounds)),
        recovery.trim().replace('\n', "; "),
    );

    // The device's side: exactly one conventional reset, then the driver's config restore.
    check_kinds(
        ctx,
        &format!("{GPU} AER recovery"),
        w,
        &[ResetKind::DeviceReset],
    );
    let begin = w
        .iter()
        .position(|r| matches!(r.event, Event::ResetBegin { .. }));
    let end = w
        .iter()
        .position(|r| matches!(r.event, Event::ResetEnd { .. }));
    let restore = end.and_then(|e| {
        w[e..].iter().enumerate().find_map(|(i, r)| match r.event {
            Event::Command { new, .. } => Some((e + i, new)),
            _ => None,
        })
    });
    ctx.check(
        "after the reset, the first Command write enables memory and Bus Master again \
         (slot_reset's pci_restore_state)",
        matches!(restore, Some((_, new)) if new & 0x6 == 0x6),
        format!("{:?}", restore.map(|(i, new)| (w[i].seq, new))),
    );
    if let (Some(b), Some((r, _))) = (begin, restore) {
        let dma_inside = count_records(&w[b..r], |e| matches!(e, Event::Dma { .. }));
        ctx.check(
            "no DMA from the reset until the driver restored Command",
            dma_inside == 0,
            format!("{dma_inside} DMA records"),
        );
        ctx.diag(&format!(
            "{GPU}: reset_begin to the restored Command: {:.1} ms (device time)",
            w[r].t_ns.saturating_sub(w[b].t_ns) as f64 / 1e6
        ));
    }
    if let [Some(msg), Some(detected), _, Some(slot_reset), Some(resume), _] = stamps[..] {
        let figures = format!(
            "guest kernel: AER message to resume {:.1} ms, error_detected to slot_reset {:.1} ms",
            (resume - msg) * 1e3,
            (slot_reset - detected) * 1e3
        );
        ctx.diag(&figures);
        ctx.progress(&figures);
    }
    Ok(recovered)
}

/// The guest program's output file for the fill that runs across the second recovery.
const INFLIGHT_OUT: &str = "/tmp/r12-inflight.out";

fn r12_aer_recovery(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let bdf = ctx.bdf_of(GPU)?;
    let port_id = ctx
        .layout()
        .device(GPU)
        .map(|d| d.bus.clone())
        .ok_or_else(|| HostError::NoDevice(GPU.into()))?;
    let rp = ctx.bdf_of(&port_id)?;
    let t = Target {
        attr: format!("/sys/bus/pci/devices/{bdf}/pcisim_recovery"),
        bdf,
        port_id,
        rp,
    };

    // The instrument: the guest's AER service drives the port natively, and pciehp its slot
    // (without it the recovery's reset is a plain SBR, which fails under QEMU: docs/reset.md).
    let services = ctx.sh(&format!(
        "dmesg | grep -E '{}: (AER: enabled|pciehp: Slot)'; true",
        t.rp
    ))?;
    ctx.check(
        &format!(
            "the guest's AER driver and pciehp drive root port {} ({})",
            t.rp, t.port_id
        ),
        services.contains("AER: enabled") && services.contains("pciehp: Slot"),
        services.trim().replace('\n', "; "),
    );

    let loaded = guestops::driver::load_gpu(ctx, &t.bdf, "none");
    ctx.checked(&format!("{GPU_MODULE}.ko bound to {}", t.bdf), loaded)?;
    let before = ctx.sh(&format!("cat {}", t.attr))?;
    ctx.check(
        "no recovery callback before the injection",
        before.lines().any(|l| l.trim() == "total 0"),
        before.trim().replace('\n', "; "),
    );

    // 1. The device idle.
    let at = mark(ctx, GPU)?;
    let log = inject_and_wait(ctx, &t, LOG_MARK)?;
    let w = since(ctx, GPU, at)?;
    if !check_recovery(ctx, &t, &log, &w, 1)? {
        // The driver never restored config space (no Bus Master, MSI-X off): work on the
        // device would never complete and the guest program would hang.
        ctx.fail(
            "with work in flight, and after recovery",
            "not run: the driver did not recover",
        );
        return Ok(());
    }

    // 2. Work in flight: a long fill into pinned memory when the error comes. The reset cuts
    // it off; the driver fails its fence with -EIO (`--lenient on`: the program reports the
    // fence's error instead of judging it; its output is read here).
    let at = mark(ctx, GPU)?;
    let argv = Invocation::new(UserptrOptions {
        unmap: Some(UnmapCall::Munmap),
        repeat: Some(1024),
        lenient: Some(OnOff::On),
        ..UserptrOptions::new(&t.bdf, UserptrMode::Pinned)
    })
    .to_argv();
    ctx.sh(&format!(
        "rm -f {INFLIGHT_OUT}; ({} > {INFLIGHT_OUT} 2>&1; echo \"exit $?\" >> {INFLIGHT_OUT}) \
         </dev/null >/dev/null 2>&1 &",
        argv.join(" ")
    ))?;
    let writing = ctx.wait_journal(GPU, RECOVERY_WAIT, |r| {
        r.seq > at
            && matches!(
                r.event,
                Event::Dma {
                    dir: Dir::Write,
                    ..
                }
            )
    })?;
    ctx.check(
        "the ring writes into the pinned userptr before the injection",
        writing.is_some(),
        "no DMA write journaled",
    );
    let log = inject_and_wait(ctx, &t, LOG_MARK_INFLIGHT)?;
    let deadline = Instant::now() + RECOVERY_WAIT;
    let out = loop {
        let out = ctx.sh(&format!("cat {INFLIGHT_OUT} 2>/dev/null; true"))?;
        if out.lines().any(|l| l.starts_with("exit ")) || Instant::now() >= deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let w = since(ctx, GPU, at)?;
    check_recovery(ctx, &t, &log, &w, 2)?;
    let fence = out
        .lines()
        .find(|l| l.contains("fence after"))
        .unwrap_or("(no fence line)")
        .trim()
        .to_string();
    ctx.check(
        "the fill cut off by the reset: its fence signalled with -EIO (error -5), the program ended",
        fence.ends_with("signaled 1 error -5") && out.contains("exit "),
        format!("{fence}; {}", out.lines().last().unwrap_or("")),
    );
    let failed = find_lines(&log, &format!("{}: recovery: ", t.bdf));
    let stopped = find_lines(&log, &format!("{}: ring stopped", t.bdf));
    ctx.diag(&format!(
        "{} pending-fence line(s) from slot_reset, {} ring-stopped line(s) from the interrupt",
        failed.len(),
        stopped.len()
    ));

    // 3. The device works again: a ring FILL into pinned user memory, fenced by interrupt.
    let at = mark(ctx, GPU)?;
    let argv = Invocation::new(UserptrOptions {
        unmap: Some(UnmapCall::Munmap),
        ..UserptrOptions::new(&t.bdf, UserptrMode::Pinned)
    })
    .to_argv();
    ctx.guest_test(
        "after recovery: the ring fills a pinned userptr and its fence signals",
        &argv,
    )?;
    let w = since(ctx, GPU, at)?;
    let writes = count_records(&w, |e| {
        matches!(
            e,
            Event::Dma {
                dir: Dir::Write,
                ..
            }
        )
    });
    let fence_irqs = count_records(&w, |e| delivered(e, 0));
    check_kinds(ctx, &format!("{GPU} after recovery"), &w, &[]);
    ctx.check(
        "the journal shows the ring's DMA writes and its fence interrupt (vector 0)",
        writes > 0 && fence_irqs > 0,
        format!("{writes} write records, {fence_irqs} vector 0 interrupts"),
    );

    // Its failure is a failed subtest, not the scenario's end (it is the last step).
    let unloaded = guestops::driver::unload_gpu(ctx);
    let _ = ctx.checked(&format!("{GPU_MODULE} unloads"), unloaded);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_stamp_and_find_lines() {
        let log = "[   19.380477] pcieport 0000:00:01.0: AER: x\n\
                   [   19.534885] pcisim_gpu 0000:01:00.0: resume: accepting work again\n\
                   no stamp AER: x";
        assert_eq!(stamp("[   19.380477] a"), Some(19.380477));
        assert_eq!(stamp("no stamp"), None);
        let found = find_lines(log, "AER: x");
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].0, Some(19.380477));
        assert_eq!(found[1].0, None);
    }

    #[test]
    fn test_expected_steps_name_port_and_device() {
        let steps = expected_steps("0000:00:01.0", "0000:01:00.0");
        assert_eq!(steps.len(), 6);
        assert!(steps[0]
            .1
            .starts_with("0000:00:01.0: AER: Uncorrectable (Fatal)"));
        assert!(steps[1].1.starts_with("0000:01:00.0: error_detected"));
        assert!(steps[5].1.ends_with("device recovery successful"));
    }
}
