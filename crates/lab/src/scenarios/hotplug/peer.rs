//! H6 and H6b: removing the GPU an NPU names as its peer (with the correct driver, and with
//! the one that leaks the peer reference).

use super::*;

/// The profile's NPU (plugged at boot).
pub(super) fn npu_device(ctx: &HostCtx<'_>) -> Result<String, HostError> {
    ctx.layout()
        .devices
        .iter()
        .find(|d| d.at_boot && d.id.starts_with("npu"))
        .map(|d| d.id.clone())
        .ok_or_else(|| HostError::Step("the profile has no NPU plugged at boot".into()))
}

/// The NPU driver's view of its GPU peer (`none`, `absent`, `held <bdf>`, `leaked <bdf>`).
pub(super) fn npu_peer_ref(ctx: &mut HostCtx<'_>, npu_bdf: &str) -> Result<String, HostError> {
    Ok(ctx
        .sh(&format!("cat /sys/bus/pci/devices/{npu_bdf}/pcisim_peer"))?
        .trim()
        .to_string())
}

/// The guest's dynamic debug control file: procfs's (no debugfs needed), else debugfs's.
pub(super) const DYNDBG_CONTROL: &str = "c=/proc/dynamic_debug/control; [ -e $c ] || \
                              c=/sys/kernel/debug/dynamic_debug/control";

/// Whether the dynamic debug `control` text shows `func`'s pr_debug in `file` enabled (`=p`,
/// possibly with more flags); `Err` says what the text shows instead.
pub(super) fn dyndbg_enabled(control: &str, file: &str, func: &str) -> Result<bool, String> {
    let site = format!("]{func} ");
    let flags: Vec<&str> = control
        .lines()
        .filter(|l| l.starts_with(&format!("{file}:")) && l.contains(&site))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('=')))
        .collect();
    if flags.is_empty() {
        return Err(format!(
            "no {func} debug site of {file} in the dynamic debug control file"
        ));
    }
    Ok(flags.iter().all(|f| f.contains('p')))
}

/// Turns lib/kobject.c's dynamic debug on (or off) and reads the control file back: the
/// kobject release instrument is on (off) or this is an error. Every shell step is checked.
pub(super) fn kobject_debug(ctx: &mut HostCtx<'_>, on: bool) -> Result<(), HostError> {
    let sign = if on { '+' } else { '-' };
    let control = ctx.sh(&format!(
        "{DYNDBG_CONTROL}; echo 'file lib/kobject.c {sign}p' > $c && grep '^lib/kobject.c:' $c"
    ))?;
    match dyndbg_enabled(&control, "lib/kobject.c", "kobject_cleanup") {
        Ok(enabled) if enabled == on => Ok(()),
        Ok(enabled) => Err(HostError::Step(format!(
            "lib/kobject.c's kobject_cleanup debug message is {} after `{sign}p` (control: {})",
            if enabled { "still on" } else { "not on" },
            control.trim().replace('\n', " | ")
        ))),
        Err(why) => Err(HostError::Step(why)),
    }
}

/// How many times the kernel logged the release of a kobject named `bdf` (lib/kobject.c's
/// `kobject_cleanup` debug message, turned on by [`kobject_debug`]). A failing `dmesg` or
/// `grep`, or output that is not a count, is an error (never 0).
pub(super) fn kobject_cleanups(ctx: &mut HostCtx<'_>, bdf: &str) -> Result<usize, HostError> {
    // grep -c exits 1 when it counts 0, 2 on an error.
    let out = ctx.sh(&format!(
        "d=$(dmesg) || exit 2; printf '%s\\n' \"$d\" | grep -c \"'{bdf}' (.*kobject_cleanup\"; \
         [ $? -le 1 ]"
    ))?;
    out.trim().parse().map_err(|e| {
        HostError::Step(format!(
            "counting kobject releases of {bdf} in dmesg: {out:?} is not a count ({e})"
        ))
    })
}

/// Checks the NPU's PEER_STATUS register as the guest driver reads it (sysfs
/// `pcisim_peer_status`; the driver owns BAR0, so it cannot be mapped from user space).
pub(super) fn peer_status(
    ctx: &mut HostCtx<'_>,
    npu_bdf: &str,
    want: u32,
    what: &str,
) -> Result<(), HostError> {
    let text = ctx
        .sh(&format!(
            "cat /sys/bus/pci/devices/{npu_bdf}/pcisim_peer_status"
        ))?
        .trim()
        .to_string();
    let got = text
        .strip_prefix("0x")
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .or_else(|| (text == "0").then_some(0));
    ctx.check(
        what,
        got == Some(want),
        format!("PEER_STATUS reads {text:?}, expected {want:#x}"),
    );
    Ok(())
}

pub(super) fn h6_gpu_npu_peer(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    h6_flow(ctx, false)
}

pub(super) fn h6b_gpu_peer_ref_leak(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    h6_flow(ctx, true)
}

/// What one H6 add/remove cycle of the GPU peer left behind.
#[derive(Debug)]
pub(super) struct PeerCycle {
    /// The GPU's BDF.
    bdf: String,
    /// The kernel logged the release of the GPU's kobject after the removal.
    freed: bool,
    /// The NPU driver's view of its peer after the removal.
    after: String,
}

/// H6 (`leaky` false) and H6b (`leaky` true). The instrument (lib/kobject.c's release
/// messages) is switched on and read back first; H6b then proves it sees a release in this
/// very run (a cycle with the driver that does not leak: positive control) before it asserts
/// the absence of the leaked one.
pub(super) fn h6_flow(ctx: &mut HostCtx<'_>, leaky: bool) -> Result<(), HostError> {
    let gpu = hotplug_device(ctx)?;
    let npu = npu_device(ctx)?;
    let npu_bdf = locate(ctx, &npu)?
        .ok_or_else(|| HostError::Step(format!("QEMU does not list {npu}")))?
        .bdf();
    if locate(ctx, &gpu)?.is_some() {
        unplug(ctx, &gpu)?;
    }
    // Watch the kernel free the GPU's pci_dev: lib/kobject.c logs every kobject release.
    kobject_debug(ctx, true)?;
    ctx.pass("the kobject release instrument is on (lib/kobject.c kobject_cleanup =p, read back)");
    if leaky {
        let c = h6_cycle(ctx, &gpu, &npu, &npu_bdf, "none", "positive control: ")?;
        let proven = ctx.check(
            &format!(
                "positive control: with the driver that does not leak, the kernel logged the release of the removed {gpu}'s pci_dev ({}) and the driver holds nothing",
                c.bdf
            ),
            c.freed && c.after == "absent",
            format!("kobject released: {}, pcisim_peer reads {:?}", c.freed, c.after),
        );
        if !proven {
            kobject_debug(ctx, false)?;
            ctx.fail(
                "bug=leak_peer_ref caught",
                "not judged: the positive control saw no release, so an absence proves nothing",
            );
            return Ok(());
        }
    }
    let bug = if leaky { "leak_peer_ref" } else { "none" };
    let c = h6_cycle(ctx, &gpu, &npu, &npu_bdf, bug, "")?;
    kobject_debug(ctx, false)?;
    let (bdf, freed, after) = (&c.bdf, c.freed, &c.after);
    if leaky {
        ctx.check(
            &format!("bug=leak_peer_ref caught: the removed {gpu}'s pci_dev ({bdf}) was never freed (no kobject release) and the driver still holds it"),
            !freed && *after == format!("leaked {bdf}"),
            format!("kobject released: {freed}, pcisim_peer reads {after:?}"),
        );
    } else {
        ctx.check(
            &format!("the guest holds no reference to the removed {gpu}: the driver dropped it and the kernel freed its pci_dev ({bdf}: kobject released)"),
            freed && after == "absent",
            format!("kobject released: {freed}, pcisim_peer reads {after:?}"),
        );
    }
    // Leave the NPU unbound, as the profile's other users expect.
    sh_output(ctx, &format!("rmmod {} 2>/dev/null; true", NPU_MODULE))?;
    Ok(())
}

/// One H6 cycle with the NPU driver loaded with `bug`: `device_add` of the GPU peer, the
/// driver's reference, `device_del`, what is left and whether the kernel released the GPU's
/// kobject. Subtest names start with `tag`.
pub(super) fn h6_cycle(
    ctx: &mut HostCtx<'_>,
    gpu: &str,
    npu: &str,
    npu_bdf: &str,
    bug: &str,
    tag: &str,
) -> Result<PeerCycle, HostError> {
    let loaded = guestops::driver::load_npu(ctx, npu_bdf, bug);
    ctx.checked(
        &format!("{NPU_MODULE}.ko (bug={bug}) loaded and bound to {npu_bdf}"),
        loaded,
    )?;
    peer_status(
        ctx,
        npu_bdf,
        npu_regs::PEER_CONFIGURED,
        &format!("{tag}before device_add: {npu} PEER_STATUS = configured, peer absent"),
    )?;
    let (info, took) = plug(ctx, gpu)?;
    let bdf = info.bdf();
    ctx.pass(&format!(
        "{tag}device_add {gpu}: the guest enumerates it at {bdf} ({})",
        ms(took)
    ));
    peer_status(
        ctx,
        npu_bdf,
        npu_regs::PEER_CONFIGURED | npu_regs::PEER_PRESENT,
        &format!("{tag}{gpu} plugged: {npu} PEER_STATUS = configured | present"),
    )?;
    let held = npu_peer_ref(ctx, npu_bdf)?;
    ctx.check(
        &format!("{tag}the guest NPU driver took a reference on its GPU peer's pci_dev ({bdf})"),
        held == format!("held {bdf}"),
        format!("pcisim_peer reads {held:?}"),
    );
    let cleanups_before = kobject_cleanups(ctx, &bdf)?;
    let took = unplug(ctx, gpu)?;
    ctx.progress(&format!(
        "{tag}device_del {gpu} → DEVICE_DELETED {}",
        ms(took)
    ));
    ctx.pass(&format!(
        "{tag}device_del {gpu} → DEVICE_DELETED in {}",
        ms(took)
    ));
    let gone = sysfs::wait(ctx, &bdf, false, Duration::from_secs(10))?;
    let detached = wait_detached(ctx, gpu)?;
    ctx.check(
        &format!("{tag}the server saw {gpu}'s client go"),
        detached,
        "still attached",
    );
    peer_status(
        ctx,
        npu_bdf,
        npu_regs::PEER_CONFIGURED,
        &format!("{tag}{gpu} removed: {npu} PEER_STATUS = configured, peer gone"),
    )?;
    let left = sh_output(
        ctx,
        &format!(
            "ls -d /sys/bus/pci/devices/{bdf} /sys/kernel/iommu_groups/*/devices/{bdf} \
             /sys/bus/pci/drivers/*/{bdf} 2>/dev/null; true"
        ),
    )?
    .stdout;
    ctx.check(
        &format!("{tag}nothing of the removed {gpu} is visible: no sysfs entry, IOMMU group member or driver link for {bdf}"),
        gone && left.trim().is_empty(),
        format!("still there: {}", left.trim().replace('\n', " ")),
    );
    // The release may trail DEVICE_DELETED by a little: give it a moment (the leaky driver
    // costs the full wait).
    let mut freed = false;
    for _ in 0..20 {
        if kobject_cleanups(ctx, &bdf)? > cleanups_before {
            freed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = npu_peer_ref(ctx, npu_bdf)?;
    Ok(PeerCycle { bdf, freed, after })
}
