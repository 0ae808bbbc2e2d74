//! R0 (two functions of one device enumerate) and R9 (a system reset keeps the devices).

use super::*;

pub(super) fn first_device(ctx: &HostCtx<'_>) -> Result<String, HostError> {
    ctx.profile()
        .devices
        .first()
        .map(|d| d.id.clone())
        .ok_or_else(|| HostError::Step("the profile has no device".into()))
}

pub(super) fn r9_system_reset(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let dev = first_device(ctx)?;
    let took = ctx.system_reset()?;
    ctx.pass(&format!(
        "system_reset: the guest rebooted, agent ready after {:.1} s",
        took.as_secs_f64()
    ));
    let records = ctx.journal(&dev)?;
    let is_begin = |e: &Event| is_reset_begin(e, ResetKind::DeviceReset);
    let is_end = |e: &Event| {
        *e == Event::ResetEnd {
            kind: ResetKind::DeviceReset,
        }
    };
    let begin = records.iter().position(|r| is_begin(&r.event));
    let end = begin.and_then(|b| {
        records[b..]
            .iter()
            .position(|r| is_end(&r.event))
            .map(|e| b + e)
    });
    let (begins, ends) = (
        count_records(&records, is_begin),
        count_records(&records, is_end),
    );
    ctx.diag(&format!(
        "{dev} journaled {begins} device reset(s) since the scenario started ({} records)",
        records.len()
    ));
    ctx.check(
        &format!("{dev} journaled reset_begin kind=device"),
        begin.is_some(),
        "no reset_begin with kind=device since the scenario started",
    );
    ctx.check(
        &format!("{dev} journaled reset_end kind=device after it"),
        end.is_some(),
        "no reset_end with kind=device after the reset_begin",
    );
    ctx.check(
        &format!("{dev}: every device reset ended"),
        begins == ends,
        format!("{begins} reset_begin but {ends} reset_end"),
    );
    let argv = ctx.guest_argv(&dev, E1Options::default())?;
    ctx.guest_test(
        &format!("{dev} enumerates again after the reboot (E1)"),
        &argv,
    )?;
    Ok(())
}

pub(super) fn r0_two_function_enumeration(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let ids: Vec<String> = ctx
        .layout()
        .devices
        .iter()
        .filter(|d| d.at_boot)
        .map(|d| d.id.clone())
        .collect();
    let pci = ctx.qmp().query_pci()?;
    let mut placed: Vec<(String, PciDeviceInfo)> = Vec::new();
    for id in &ids {
        match pci.iter().find(|p| &p.qdev_id == id) {
            Some(p) => placed.push((id.clone(), p.clone())),
            None => ctx.fail(
                &format!("QEMU lists {id}"),
                "not in query-pci: the device is not on the machine",
            ),
        }
    }
    if placed.len() != ids.len() || placed.len() < 2 {
        return Ok(());
    }
    let (f0, f1) = (&placed[0].1, &placed[1].1);
    ctx.diag(&format!(
        "QEMU: {} at {} and {} at {} behind {}",
        placed[0].0,
        f0.bdf(),
        placed[1].0,
        f1.bdf(),
        f0.parent.as_deref().unwrap_or("?")
    ));
    ctx.check(
        "QEMU places the two devices as functions 0 and 1 of one slot",
        f0.bus == f1.bus
            && f0.slot == f1.slot
            && f0.parent == f1.parent
            && f0.parent.is_some()
            && (f0.function, f1.function) == (0, 1),
        format!("{} and {}", f0.bdf(), f1.bdf()),
    );
    let port = f0
        .parent
        .as_deref()
        .and_then(|rp| pci.iter().find(|p| p.qdev_id == rp))
        .map(PciDeviceInfo::bdf)
        .unwrap_or_default();

    // The guest's view.
    let listing = ctx.sh("ls /sys/bus/pci/devices")?;
    let present: Vec<&str> = listing.split_whitespace().collect();
    let missing: Vec<String> = placed
        .iter()
        .map(|(_, p)| p.bdf())
        .filter(|b| !present.contains(&b.as_str()))
        .collect();
    ctx.check(
        "the guest enumerates both functions",
        missing.is_empty(),
        format!(
            "missing {missing:?}; /sys/bus/pci/devices: {}",
            present.join(" ")
        ),
    );
    let header = ctx.sh(&format!(
        "for f in {} {}; do od -An -tx1 -j14 -N1 /sys/bus/pci/devices/$f/config; done",
        f0.bdf(),
        f1.bdf()
    ))?;
    let types: Vec<&str> = header.split_whitespace().collect();
    ctx.check(
        "header type: function 0 has the multifunction bit, function 1 is type 0",
        types.len() == 2
            && u8::from_str_radix(types[0], 16).is_ok_and(|t| t == 0x80)
            && u8::from_str_radix(types[1], 16).is_ok_and(|t| t & 0x7f == 0),
        format!("header types {types:?}"),
    );
    for (id, p) in placed.clone() {
        let bdf = p.bdf();
        let argv = ctx.guest_argv(&id, E1Options::at(&bdf))?;
        ctx.guest_test(&format!("{id} at {bdf} passes E1"), &argv)?;
    }
    // An NPU with a GPU peer reports it configured and present (the server tracks the GPU).
    let npus: Vec<(String, String)> = ctx
        .profile()
        .devices
        .iter()
        .filter(|d| d.kind == DeviceKind::Npu)
        .filter_map(|d| {
            let peer = d.opts.iter().find_map(|o| o.strip_prefix("peer="))?;
            Some((d.id.clone(), peer.to_string()))
        })
        .collect();
    for (id, peer) in npus {
        if let Some((_, p)) = placed.iter().find(|(d, _)| *d == id) {
            let bdf = p.bdf();
            let argv = ctx.guest_argv(
                &id,
                NpuPeerOptions {
                    bdf: Some(bdf.clone()),
                    present: YesNo::Yes,
                },
            )?;
            ctx.guest_test(
                &format!("{id} PEER_STATUS: peer {peer} configured and present"),
                &argv,
            )?;
        }
    }

    // Native pciehp drives the root ports (the profile turns ACPI hotplug off).
    let services = ctx.sh("ls /sys/bus/pci_express/devices; cat /sys/bus/pci/slots/*/address")?;
    ctx.check(
        &format!("pciehp drives the root port {port}"),
        !port.is_empty() && services.contains(&format!("{port}:pcie004")),
        format!("no {port}:pcie004 in /sys/bus/pci_express/devices"),
    );
    let slot = format!("0000:{:02x}:{:02x}", f0.bus, f0.slot);
    ctx.check(
        &format!("a hotplug slot with address {slot}"),
        services.lines().any(|l| l.trim() == slot),
        "not in /sys/bus/pci/slots/*/address",
    );
    let free = ctx.layout().free_ports.len();
    let hotplug_ports = services.matches(":pcie004").count();
    ctx.check(
        "every root port, the free ones too, has a pciehp slot",
        hotplug_ports == 1 + free,
        format!(
            "{hotplug_ports} pciehp services for {} root ports",
            1 + free
        ),
    );
    let methods = ctx.sh(&format!(
        "for f in {} {}; do echo $f $(cat /sys/bus/pci/devices/$f/reset_method); done",
        f0.bdf(),
        f1.bdf()
    ))?;
    for l in methods.lines() {
        ctx.diag(&format!("reset_method {l}"));
    }
    ctx.check(
        "both functions offer FLR",
        methods.lines().filter(|l| l.contains(" flr")).count() == 2,
        methods.trim().replace('\n', "; "),
    );
    Ok(())
}

// -- R1-R8: resets the guest performs, checked against the device's journal ------------------
