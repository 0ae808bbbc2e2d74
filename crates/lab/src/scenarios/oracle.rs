//! The K scenarios: the guest kernel oracle ([`crate::harness::dmesg`]) tests itself.
//!
//! Each loads `pcisim_oops.ko` (guest-tests/kmod/pcisim_oops.c), makes it provoke one kernel
//! report, and unloads it. The catalogue declares the report each provokes
//! ([`crate::harness::scenario::Scenario::kernel_reports`]), so the scenario passes as `ok ... # XFAIL`
//! only if the oracle found that report in the scenario's kernel log slice and nothing else;
//! the same scenario without the declaration is `not ok` (crates/pcisim/tests/lab_suite.rs).

use std::time::Instant;

use crate::harness::host::{HostCtx, HostError, HostProgram};
use crate::vm::kmod::guest_module_path_sh;
use crate::vm::profile::ProfileId;

/// The module name of the report-provoking test module.
pub const OOPS_MODULE: &str = "pcisim_oops";

/// How long K2's writer sleeps in state D: more than two hung task check periods (the lab's
/// guests set `kernel.hung_task_timeout_secs` to [`crate::vm::qemu::HUNG_TASK_TIMEOUT_SECS`];
/// khungtaskd checks every period and reports a task not scheduled since the previous check).
pub const HANG_SECS: u64 = 3 * crate::vm::qemu::HUNG_TASK_TIMEOUT_SECS;

/// `K1 kernel-warn-caught`: the module WARNs on request.
pub const K1: HostProgram = HostProgram {
    name: "k1-kernel-warn",
    profile: ProfileId::Gpu,
    run: k1_warn,
};

/// `K2 kernel-hung-task-caught`: a task sleeps uninterruptibly for [`HANG_SECS`].
pub const K2: HostProgram = HostProgram {
    name: "k2-kernel-hung-task",
    profile: ProfileId::Gpu,
    run: k2_hung_task,
};

/// Loads `pcisim_oops.ko` (a subtest).
fn load(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let ko = guest_module_path_sh(OOPS_MODULE);
    ctx.sh(&format!(
        "rmmod {OOPS_MODULE} 2>/dev/null; insmod {ko} && [ -e /sys/module/{OOPS_MODULE}/parameters/warn ]"
    ))?;
    ctx.pass(&format!("{OOPS_MODULE}.ko loaded"));
    Ok(())
}

/// Unloads it (a subtest).
fn unload(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    ctx.sh(&format!("rmmod {OOPS_MODULE}"))?;
    ctx.pass(&format!("{OOPS_MODULE}.ko unloaded"));
    Ok(())
}

fn k1_warn(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    load(ctx)?;
    ctx.sh(&format!(
        "echo 1 > /sys/module/{OOPS_MODULE}/parameters/warn"
    ))?;
    ctx.pass("the module was asked to WARN (the kernel log verdict judges it)");
    unload(ctx)
}

fn k2_hung_task(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let timeout = ctx.sh("cat /proc/sys/kernel/hung_task_timeout_secs")?;
    let want = crate::vm::qemu::HUNG_TASK_TIMEOUT_SECS.to_string();
    ctx.check(
        &format!("kernel.hung_task_timeout_secs is {want} (set on the kernel command line)"),
        timeout.trim() == want,
        format!("it is {:?}", timeout.trim()),
    );
    load(ctx)?;
    let t = Instant::now();
    ctx.sh(&format!(
        "echo {HANG_SECS} > /sys/module/{OOPS_MODULE}/parameters/hang_secs"
    ))?;
    let slept = t.elapsed().as_secs_f64();
    ctx.check(
        &format!("a task slept {HANG_SECS} s in state D (the kernel log verdict judges it)"),
        slept >= HANG_SECS as f64,
        format!("the write returned after {slept:.1} s"),
    );
    unload(ctx)
}
