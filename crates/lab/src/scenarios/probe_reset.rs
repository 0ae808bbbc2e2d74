//! R10 and R10b: a driver that resets its device from probe (seed 002). The guest NPU driver
//! (`guest-tests/kmod/npu_*.c`) resets the function in `probe` before it turns bus
//! mastering and its engine on:
//!
//! - **R10** (correct): `pci_reset_function_locked()`, the variant for a caller that already
//!   holds the device lock (the driver core holds it around `probe`). The NPU journals exactly
//!   one FLR during the load, bus mastering comes back on only after it, and the probe
//!   completes (the driver is bound and its character device exists).
//! - **R10b** (expected failure, `bug=reset_in_probe`): `pci_reset_function()`, which takes the
//!   device lock itself: the probing task (`insmod`) sleeps forever in `device_lock()`;
//!   khungtaskd reports it (the declared kernel report, `KernelReport::HungTask`) and the NPU
//!   journals that no reset ever began. A positive control first proves the journal shows an
//!   FLR when one happens. The deadlock cannot be undone (the task waits on a lock it holds),
//!   and the guest's power-off takes the same lock in `device_shutdown()`: R10b has a VM of its
//!   own (`npu-probe-hang`), which the suite ends by terminating QEMU at once (`ProfileId::cannot_power_off`).
//!
//! docs/reset.md ("Reset from probe") has the kernel code paths and the measured figures.

use pcisim_journal::{Event, Record, ResetKind};

use crate::guestops;
use crate::harness::host::{count_records, is_reset_begin, HostCtx, HostError, HostProgram};
use crate::vm::kmod::{guest_module_path_sh, NPU_MODULE};
use crate::vm::profile::ProfileId;

/// The NPU of both profiles.
const NPU: &str = "npu0";

/// How long R10b waits for khungtaskd: the lab's guests report a task blocked for more than
/// [`crate::vm::qemu::HUNG_TASK_TIMEOUT_SECS`] at the next check, so within two periods; four give
/// TCG room.
const HUNG_WAIT_SECS: u64 = 4 * crate::vm::qemu::HUNG_TASK_TIMEOUT_SECS;
const _: () = assert!(HUNG_WAIT_SECS >= 2 * crate::vm::qemu::HUNG_TASK_TIMEOUT_SECS);

/// Where R10b's background `insmod` writes its output in the guest.
const INSMOD_LOG: &str = "/tmp/r10b-insmod.log";

/// `R10 probe-reset`: the guest NPU driver's probe resets the function with
/// `pci_reset_function_locked()`: exactly one FLR, inside the load, before bus mastering is
/// turned on; the probe completes.
pub const R10: HostProgram = HostProgram {
    name: "r10-probe-reset",
    profile: ProfileId::NpuProbeHang,
    run: r10_probe_reset,
};

/// `R10b probe-reset-deadlock`: `bug=reset_in_probe` calls `pci_reset_function()` from probe:
/// the probing task deadlocks on the device lock it holds (hung task report expected), and no
/// reset ever reaches the device.
pub const R10B: HostProgram = HostProgram {
    name: "r10b-probe-reset-deadlock",
    profile: ProfileId::NpuProbeHang,
    run: r10b_probe_reset_deadlock,
};

/// The Command register's Bus Master Enable bit.
const CMD_BUS_MASTER: u16 = 1 << 2;

/// Position of the first record `pred` accepts.
fn position(records: &[Record], pred: impl Fn(&Event) -> bool) -> Option<usize> {
    records.iter().position(|r| pred(&r.event))
}

/// Whether `e` is a Command change that turns Bus Master Enable on.
fn is_bus_master_on(e: &Event) -> bool {
    matches!(e, Event::Command { old, new } if old & CMD_BUS_MASTER == 0 && new & CMD_BUS_MASTER != 0)
}

/// Whether `e` begins a reset of any kind.
fn is_any_reset_begin(e: &Event) -> bool {
    matches!(e, Event::ResetBegin { .. })
}

/// The guest kernel log lines of our driver that contain `needle` (`dmesg | grep`).
fn dmesg_lines(ctx: &mut HostCtx<'_>, needle: &str) -> Result<Vec<String>, HostError> {
    let out = ctx.sh(&format!("dmesg | grep -F -- '{needle}' || true"))?;
    Ok(out.lines().map(str::to_string).collect())
}

fn r10_probe_reset(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let bdf = ctx.bdf_of(NPU)?;
    // Start from an unbound NPU, so that the window below holds this load's probe only.
    ctx.sh(&format!(
        "pkill -9 -f 'pcisim-guest sva' 2>/dev/null; sleep 0.1; rmmod {NPU_MODULE} 2>/dev/null; true"
    ))?;
    let mark = ctx.control().last_seq(NPU)?;
    let loaded = guestops::driver::load_npu(ctx, &bdf, "none");
    ctx.checked(
        &format!("{NPU_MODULE}.ko (bug=none) loaded and bound to {bdf}"),
        loaded,
    )?;
    let records = ctx.window(NPU, mark)?.records;

    let flr_begin = |e: &Event| is_reset_begin(e, ResetKind::Flr);
    let flr_end = |e: &Event| {
        *e == Event::ResetEnd {
            kind: ResetKind::Flr,
        }
    };
    let (begins, ends, all) = (
        count_records(&records, flr_begin),
        count_records(&records, flr_end),
        count_records(&records, is_any_reset_begin),
    );
    ctx.diag(&format!(
        "{NPU} journaled {begins} FLR begin(s), {ends} end(s), {all} reset(s) of any kind \
         during the load ({} records)",
        records.len()
    ));
    ctx.check(
        &format!("{NPU} journaled exactly one FLR during probe, and no other reset"),
        begins == 1 && ends == 1 && all == 1,
        format!("{begins} reset_begin kind=flr, {ends} reset_end kind=flr, {all} resets in all"),
    );
    let end = position(&records, flr_end);
    let master = position(&records, is_bus_master_on);
    ctx.check(
        "bus mastering turned on only after the FLR ended (pci_set_master after the reset)",
        matches!((end, master), (Some(e), Some(m)) if m > e),
        format!("reset_end at record {end:?}, bus master on at record {master:?}"),
    );
    if let (Some(b), Some(e)) = (position(&records, flr_begin), end) {
        let took_ms = records[e].t_ns.saturating_sub(records[b].t_ns) as f64 / 1e6;
        ctx.diag(&format!("device-side FLR {took_ms:.3} ms"));
    }
    let said = dmesg_lines(ctx, "probe: ")?;
    for l in &said {
        ctx.diag(&format!("guest: {}", l.trim()));
    }
    ctx.check(
        "the driver reset through pci_reset_function_locked() and the reset returned 0",
        said.iter()
            .any(|l| l.contains(&bdf) && l.contains("pci_reset_function_locked()"))
            && said
                .iter()
                .any(|l| l.contains(&bdf) && l.contains("function reset done")),
        "no `probe: pci_reset_function_locked()` / `function reset done` line for the NPU",
    );
    // The probe completed: load_driver saw the driver bound and its chardev. Unload again (the
    // remove path runs: the device lock is free).
    let unloaded = ctx.sh(&format!("rmmod {NPU_MODULE} && echo unloaded"));
    ctx.check(
        &format!("{NPU_MODULE} unloads again (remove ran under a free device lock)"),
        matches!(&unloaded, Ok(s) if s.contains("unloaded")),
        match &unloaded {
            Ok(s) => s.trim().to_string(),
            Err(e) => e.to_string(),
        },
    );
    Ok(())
}

fn r10b_probe_reset_deadlock(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let bdf = ctx.bdf_of(NPU)?;
    let dev = format!("/sys/bus/pci/devices/{bdf}");

    // The instrument first: an FLR through sysfs on the unbound NPU is journaled.
    let control = ctx.control().last_seq(NPU)?;
    ctx.sh(&format!(
        "echo flr > {dev}/reset_method && echo 1 > {dev}/reset"
    ))?;
    let seen = ctx.window(NPU, control)?.records;
    ctx.check(
        &format!("positive control: a sysfs FLR of the unbound {NPU} is journaled"),
        count_records(&seen, |e| is_reset_begin(e, ResetKind::Flr)) == 1,
        "no reset_begin kind=flr after `echo 1 > reset`: the journal cannot show a reset",
    );

    // The buggy load, in the background: insmod never returns.
    let mark = ctx.control().last_seq(NPU)?;
    let ko = guest_module_path_sh(NPU_MODULE);
    ctx.sh(&format!(
        "setsid sh -c 'insmod {ko} bug=reset_in_probe > {INSMOD_LOG} 2>&1; \
         echo \"insmod exited $?\" >> {INSMOD_LOG}' </dev/null >/dev/null 2>&1 &"
    ))?;
    ctx.progress("insmod bug=reset_in_probe started; waiting for khungtaskd");
    let waited = ctx.sh(&format!(
        "i=0; while ! dmesg | grep -q 'task insmod:[0-9]* blocked for more than'; do \
         i=$((i+1)); [ $i -gt {HUNG_WAIT_SECS} ] && exit 1; sleep 1; done; echo $i"
    ));
    let secs = match &waited {
        Ok(s) => s.trim().parse::<u64>().ok(),
        Err(_) => None,
    };
    ctx.check(
        "khungtaskd reports insmod blocked (the probe never returns)",
        secs.is_some(),
        format!("no `task insmod:PID blocked for more than` in {HUNG_WAIT_SECS} s"),
    );
    if let Some(s) = secs {
        ctx.diag(&format!("hung task report ~{s} s after insmod started"));
        ctx.progress(&format!("khungtaskd reported insmod after ~{s} s"));
    }
    let said = dmesg_lines(ctx, "probe: ")?;
    for l in &said {
        ctx.diag(&format!("guest: {}", l.trim()));
    }
    // (R10, its twin, may have loaded the correct driver in this VM before: only the lines
    // after the buggy call count.)
    let called = said.iter().rposition(|l| {
        l.contains(&bdf) && l.contains("pci_reset_function() under the device lock")
    });
    ctx.check(
        "the probe called pci_reset_function() and it never returned",
        called.is_some_and(|i| {
            !said[i..]
                .iter()
                .any(|l| l.contains(&bdf) && l.contains("reset done"))
        }),
        "no `pci_reset_function() under the device lock` line, or a `reset done` after it",
    );
    // Where the task sleeps: its kernel stack names the lock and the caller.
    let stack = ctx.sh(
        "p=$(pidof insmod) || exit 1; echo \"state $(awk '{print $3}' /proc/$p/stat)\"; \
         cat /proc/$p/stack",
    );
    let stack = stack.unwrap_or_else(|e| format!("(no insmod task: {e})"));
    for l in stack.lines() {
        ctx.diag(&format!("insmod: {}", l.trim()));
    }
    // (The stack shows no mutex frame: the sleeping lock functions are `__sched` and
    // stack_trace_save_tsk() leaves them out; pci_reset_function's only sleeping calls before
    // the reset are the two pci_dev_lock()s, and nobody holds the bridge's.)
    ctx.check(
        "insmod sleeps uninterruptibly in pci_reset_function, called from npu_probe",
        stack.contains("state D")
            && stack.contains("pci_reset_function+")
            && !stack.contains("pci_reset_function_locked")
            && stack.contains("npu_probe"),
        "its /proc/PID/stack does not show state D in pci_reset_function <- npu_probe",
    );
    let exited = ctx.sh(&format!("cat {INSMOD_LOG} 2>/dev/null; true"))?;
    ctx.check(
        "insmod has not returned",
        !exited.contains("insmod exited"),
        exited.trim(),
    );
    // really_probe() links the driver in sysfs before it calls probe, so the driver link says
    // nothing; the attributes (dev_groups) and the chardev come only after a successful probe.
    let probed = ctx.sh(&format!(
        "[ -e {dev}/pcisim_chardev ] && echo attributes; ls /dev | grep pcisim-npu; true"
    ))?;
    ctx.check(
        &format!("{bdf} has neither the driver's attributes nor a chardev (probe never completed)"),
        probed.trim().is_empty(),
        probed.trim().replace('\n', " "),
    );

    // The journal: no reset began since the buggy load started.
    let records = ctx.window(NPU, mark)?.records;
    let resets = count_records(&records, is_any_reset_begin);
    ctx.diag(&format!(
        "{NPU} journaled {} records since insmod started, {resets} reset(s)",
        records.len()
    ));
    ctx.check(
        &format!("{NPU} journaled no reset since insmod started (the reset never began)"),
        resets == 0,
        format!("{resets} reset_begin records"),
    );
    ctx.diag(
        "the VM cannot power off (device_shutdown() takes the same device lock): \
         the suite ends QEMU without asking for one",
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_bus_master_on_only_for_the_rising_edge() {
        assert!(is_bus_master_on(&Event::Command {
            old: 0x0402,
            new: 0x0406
        }));
        assert!(!is_bus_master_on(&Event::Command {
            old: 0x0406,
            new: 0x0406
        }));
        assert!(!is_bus_master_on(&Event::Command {
            old: 0x0406,
            new: 0x0400
        }));
        assert!(is_any_reset_begin(&Event::ResetBegin {
            kind: ResetKind::PmSoftReset
        }));
        assert!(!is_any_reset_begin(&Event::ResetEnd {
            kind: ResetKind::Flr
        }));
    }
}
