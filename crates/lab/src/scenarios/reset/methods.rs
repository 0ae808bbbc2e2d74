//! R3-R8: the kernel's other reset methods (pm, bus, slot, vfio device reset, hot reset) and
//! a slow or failed reset.

use super::*;

/// The guest's `reset-vfio` rings these vectors just before and just after the reset.
pub(super) const GUEST_MARK_BEFORE: u8 = 2;
pub(super) const GUEST_MARK_AFTER: u8 = 3;

pub(super) fn r3_pm_reset(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let (dev, nsr) = ("gpu0", "gpu1");
    let bdf = ctx.bdf_of(dev)?;
    let nsr_bdf = ctx.bdf_of(nsr)?;

    let argv = ctx.guest_argv(dev, reset_at(&bdf, ResetMethod::Pm))?;
    let w = reset_step(
        ctx,
        dev,
        &format!("{dev}: reset_method=pm, reset: registers back to defaults"),
        &argv,
        &format!("{dev} pm"),
        &[ResetKind::PmSoftReset],
    )?;
    let to_d3 = count_records(&w, is_power);
    ctx.diag(&format!("{dev}: {to_d3} power state changes journaled"));

    let m = mark(ctx, nsr)?;
    let argv = ctx.guest_argv(
        nsr,
        ResetOptions {
            absent: Some(vec![ResetMethod::Pm]),
            errno: Some(22),
            expect: Some(ResetExpect::Kept),
            ..reset_at(&nsr_bdf, ResetMethod::Pm)
        },
    )?;
    guest_step(
        ctx,
        &format!("{nsr} (No_Soft_Reset=1): pm not offered, reset_method=pm refused (EINVAL)"),
        &argv,
    )?;
    let argv = ctx.guest_argv(
        nsr,
        ResetOptions {
            expect: Some(ResetExpect::Kept),
            ..reset_at(&nsr_bdf, ResetMethod::PmCycle)
        },
    )?;
    guest_step(
        ctx,
        &format!("{nsr} (No_Soft_Reset=1): D3hot -> D0 keeps the registers"),
        &argv,
    )?;
    let w = since(ctx, nsr, m)?;
    check_kinds(ctx, &format!("{nsr} No_Soft_Reset=1"), &w, &[]);
    let d3 = count_records(&w, |e| matches!(e, Event::Power { to: 3, .. }));
    ctx.check(
        &format!("{nsr}: the device saw D0 -> D3hot -> D0"),
        d3 == 1 && count_records(&w, is_power) == 2,
        format!(
            "{} power records, {d3} into D3hot",
            count_records(&w, is_power)
        ),
    );

    let argv = ctx.guest_argv(
        dev,
        ResetOptions {
            expect: Some(ResetExpect::Cleared),
            ..reset_at(&bdf, ResetMethod::PmCycle)
        },
    )?;
    reset_step(
        ctx,
        dev,
        &format!("{dev} (No_Soft_Reset=0): the same D3hot -> D0 resets it"),
        &argv,
        &format!("{dev} D3hot -> D0"),
        &[ResetKind::PmSoftReset],
    )?;
    Ok(())
}

pub(super) fn r4_bus_reset(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let dev = "gpu0";
    let bdf = ctx.bdf_of(dev)?;
    // Under ACPI hotplug QEMU's root port advertises Data Link Layer Link Active Reporting but
    // never sets Link Active; the port is a 16 GT/s one, so after the SBR the kernel waits for
    // Link Active (PCIe Base 6.0 §6.6.1), gives up after 100 ms + 1 s and returns ENOTTY. The
    // reset has happened by then and the kernel restores config space anyway.
    let argv = ctx.guest_argv(
        dev,
        ResetOptions {
            offered: Some(vec![ResetMethod::Flr, ResetMethod::Pm, ResetMethod::Bus]),
            errno: Some(25),
            kmsg: Some("Data Link Layer Link Active not set".into()),
            ..reset_at(&bdf, ResetMethod::Bus)
        },
    )?;
    reset_step(ctx, dev, &format!(
            "{dev}: reset_method=bus: registers back to defaults; the kernel then times out on Link Active (ENOTTY)"
        ), &argv, &format!("{dev} bus"), &[ResetKind::DeviceReset])?;
    Ok(())
}

pub(super) fn r5_slot_reset(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let dev = "gpu0";
    let pci = ctx.qmp().query_pci()?;
    let info = pci
        .iter()
        .find(|p| p.qdev_id == dev)
        .cloned()
        .ok_or_else(|| HostError::Step(format!("{dev} is not in query-pci")))?;
    let bdf = info.bdf();
    let port = info
        .parent
        .as_deref()
        .and_then(|rp| pci.iter().find(|p| p.qdev_id == rp))
        .map(PciDeviceInfo::bdf)
        .unwrap_or_default();
    let slot = format!("0000:{:02x}:{:02x}", info.bus, info.slot);
    let slots = ctx.sh(
        "ls /sys/bus/pci_express/devices; for s in /sys/bus/pci/slots/*; do echo slot $(cat $s/address) $(cat $s/adapter); done",
    )?;
    ctx.check(
        &format!("pciehp drives {dev}'s root port {port} and its slot {slot}"),
        !port.is_empty()
            && slots.contains(&format!("{port}:pcie004"))
            && slots.lines().any(|l| l.trim() == format!("slot {slot} 1")),
        slots.trim().replace('\n', "; "),
    );
    let argv = ctx.guest_argv(
        dev,
        ResetOptions {
            offered: Some(vec![ResetMethod::Flr, ResetMethod::Bus]),
            ..reset_at(&bdf, ResetMethod::Bus)
        },
    )?;
    reset_step(
        ctx,
        dev,
        &format!("{dev}: reset_method=bus is pciehp's slot reset: registers back to defaults"),
        &argv,
        &format!("{dev} slot"),
        &[ResetKind::DeviceReset],
    )?;
    let after = ctx.sh(&format!(
        "cat /sys/bus/pci/slots/*/address /sys/bus/pci/slots/*/adapter; ls /sys/bus/pci/devices/{bdf}"
    ))?;
    ctx.check(
        &format!("the slot still holds {dev} (no hot-remove)"),
        after.contains(&slot) && after.contains("config"),
        after.trim().replace('\n', "; "),
    );
    Ok(())
}

pub(super) fn r6_vfio_device_reset(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let dev = "gpu0";
    let bdf = ctx.bdf_of(dev)?;
    let methods = ctx.sh(&format!("cat /sys/bus/pci/devices/{bdf}/reset_method"))?;
    let first = methods.split_whitespace().next().unwrap_or("").to_string();
    ctx.diag(&format!("{dev} reset_method: {}", methods.trim()));
    let argv = ctx.guest_argv(
        dev,
        ResetVfioOptions {
            bdf: Some(bdf.clone()),
            op: VfioResetOp::Ioctl,
            ring: Some(OnOff::On),
        },
    )?;
    let w = journaled_step(
        ctx,
        dev,
        &format!("{dev}: VFIO_DEVICE_RESET from a guest vfio driver, usable afterwards"),
        &argv,
    )?;
    // pci_try_reset_function uses the first method that works: the first one offered.
    let want = if first == "bus" {
        Some(ResetKind::DeviceReset)
    } else {
        ResetKind::ALL.into_iter().find(|k| k.name() == first)
    };
    let name = want.map_or_else(|| first.clone(), |k| k.name().to_string());
    let what = format!("{dev} VFIO_DEVICE_RESET: journaled reset_begin/reset_end kind={name}");
    match want {
        None => ctx.fail(
            &what,
            &format!("the kernel's first reset method {first:?} is no reset kind the device has"),
        ),
        Some(want) => {
            if let Some(b) = marked_window(ctx, &what, &w) {
                check_kinds(
                    ctx,
                    &format!("{dev} VFIO_DEVICE_RESET (the kernel's first method, {first})"),
                    b,
                    &[want],
                );
            }
        }
    }
    Ok(())
}

pub(super) fn r7_hot_reset(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let (d0, d1) = ("gpu0", "npu1");
    let (f0, f1) = (ctx.bdf_of(d0)?, ctx.bdf_of(d1)?);
    let (m0, m1) = (mark(ctx, d0)?, mark(ctx, d1)?);
    let peer = &ctx.device(d1)?.description;
    let (peer_vendor, peer_device) = (peer.vendor_id, peer.device_id);
    let argv = ctx.guest_argv(
        d0,
        ResetHotOptions {
            bdf: f0.clone(),
            peer: f1.clone(),
            peer_vendor: Some(peer_vendor),
            peer_device: Some(peer_device),
        },
    )?;
    guest_step(
        ctx,
        &format!("hot reset of {f0} + {f1}: refused owning one, done owning both"),
        &argv,
    )?;
    for (dev, m) in [(d0, m0), (d1, m1)] {
        let w = since(ctx, dev, m)?;
        let first_marker = w
            .iter()
            .position(|r| delivered(&r.event, GUEST_MARK_BEFORE))
            .unwrap_or(w.len());
        let (early, _) = reset_kinds(&w[..first_marker]);
        ctx.check(
            &format!("{dev}: no device reset while the hot reset was refused"),
            !early.contains(&ResetKind::DeviceReset),
            format!("resets before the marker: {early:?}"),
        );
        let what = format!("{dev} hot reset: journaled reset_begin/reset_end kind=device");
        if let Some(b) = marked_window(ctx, &what, &w) {
            check_kinds(
                ctx,
                &format!("{dev} hot reset"),
                b,
                &[ResetKind::DeviceReset],
            );
        }
    }
    Ok(())
}

pub(super) fn r8_slow_failed_reset(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let dev = "gpu0";
    let bdf = ctx.bdf_of(dev)?;

    // Slow: config space reads all-ones for 1.5 s after the FLR.
    ctx.inject(dev, "slow-reset=1500")?;
    let argv = ctx.guest_argv(
        dev,
        ResetOptions {
            min_ms: Some(1500),
            kmsg: Some("after FLR".into()),
            ..reset_at(&bdf, ResetMethod::Flr)
        },
    )?;
    reset_step(
        ctx,
        dev,
        &format!("{dev} slow-reset=1500: the guest's FLR waits >= 1.5 s and succeeds"),
        &argv,
        &format!("{dev} slow FLR"),
        &[ResetKind::Flr],
    )?;

    // Never: the kernel polls ~65 s, gives up, and the function stays not ready.
    ctx.inject(dev, "slow-reset=never")?;
    let argv = ctx.guest_argv(
        dev,
        ResetOptions {
            errno: Some(25),
            expect: Some(ResetExpect::Dead),
            kmsg: Some("giving up".into()),
            ..reset_at(&bdf, ResetMethod::Flr)
        },
    )?;
    ctx.progress("slow-reset=never: the guest's FLR waits ~65 s before giving up");
    reset_step(
        ctx,
        dev,
        &format!("{dev} slow-reset=never: the kernel gives up (ENOTTY, logged)"),
        &argv,
        &format!("{dev} failed FLR"),
        &[ResetKind::Flr],
    )?;
    let status = ctx.control().status(dev)?;
    ctx.check(
        &format!("{dev} reports itself not ready"),
        status["faults"]["not_ready"] == Value::Bool(true),
        format!("status faults: {}", status["faults"]),
    );

    // Recovery: the fault off, a conventional reset (SBR) reaches the function.
    ctx.inject(dev, "slow-reset=0")?;
    let m = mark(ctx, dev)?;
    let argv = ctx.guest_argv(
        dev,
        ResetOptions {
            dirty: Some(OnOff::Off),
            expect: Some(ResetExpect::Cleared),
            ..reset_at(&bdf, ResetMethod::Sbr)
        },
    )?;
    guest_step(
        ctx,
        &format!("{dev}: remove, Secondary Bus Reset, rescan: the function is back"),
        &argv,
    )?;
    let w = since(ctx, dev, m)?;
    check_kinds(
        ctx,
        &format!("{dev} recovery"),
        &w,
        &[ResetKind::DeviceReset],
    );
    let argv = ctx.guest_argv(dev, E1Options::at(&bdf))?;
    ctx.guest_test(&format!("{dev} enumerates as before (E1)"), &argv)?;
    Ok(())
}
