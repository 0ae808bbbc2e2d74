//! H7: add and remove under native PCIe hotplug (pciehp).

use super::*;

pub(super) fn h7_pciehp_add_remove(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let id = hotplug_device(ctx)?;
    if locate(ctx, &id)?.is_some() {
        unplug(ctx, &id)?;
    }
    for cycle in 1..=2 {
        let (info, took) = match plug(ctx, &id) {
            Ok(p) => p,
            Err(HostError::Step(why)) => {
                ctx.fail(&format!("cycle {cycle}: device_add {id} (pciehp)"), &why);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let bdf = info.bdf();
        ctx.progress(&format!(
            "cycle {cycle}: hot-add → probed (pciehp) {}",
            ms(took)
        ));
        ctx.pass(&format!(
            "cycle {cycle}: device_add {id}: pciehp powers the slot, the guest enumerates it at {bdf} ({})",
            ms(took)
        ));
        let services = sh_output(
            ctx,
            "ls /sys/bus/pci_express/devices/ | grep -c pcie004; true",
        )?;
        let n: u32 = services.stdout.trim().parse().unwrap_or(0);
        ctx.check(
            &format!("cycle {cycle}: the guest's pciehp driver services the root ports ({n} pcie004 services)"),
            n > 0,
            "no pciehp service: the slots are not under native hotplug",
        );
        let argv = ctx.guest_argv(&id, E1Options::at(&bdf))?;
        ctx.guest_test(&format!("cycle {cycle}: {id} at {bdf} passes E1"), &argv)?;
        let took = unplug(ctx, &id)?;
        ctx.progress(&format!(
            "cycle {cycle}: device_del → DEVICE_DELETED (pciehp) {}",
            ms(took)
        ));
        ctx.check(
            &format!("cycle {cycle}: device_del {id} → DEVICE_DELETED after pciehp's attention-button window ({})", ms(took)),
            took >= Duration::from_secs(4),
            format!("{} is shorter than pciehp's 5 s abort window: was this really native hotplug?", ms(took)),
        );
        let gone = sysfs::wait(ctx, &bdf, false, Duration::from_secs(10))?;
        let detached = wait_detached(ctx, &id)?;
        ctx.check(
            &format!("cycle {cycle}: the guest dropped {bdf} and the server saw {id}'s client go"),
            gone && detached,
            format!("sysfs entry gone: {gone}, client detached: {detached}"),
        );
    }
    Ok(())
}
