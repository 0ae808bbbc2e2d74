//! The reset scenarios, run on the host side ([`crate::harness::host`]): R0 (the two-function VM
//! enumerates), R1 (FLR through sysfs, unbound and under a guest vfio driver), R2 (FLR with DMA
//! in flight, the kernel's way) and R2b (the same by a buggy driver: an expected violation), R3
//! (PM soft reset, and No_Soft_Reset = 1), R4 (secondary bus reset under ACPI hotplug), R5 (slot
//! reset under native pciehp), R6 (`VFIO_DEVICE_RESET`), R7 (`VFIO_DEVICE_PCI_HOT_RESET` on the
//! two-function slot), R8 (slow and failed reset, recovery) and R9 (`system_reset`).
//!
//! Each reset scenario runs guest programs (`pcisim-guest reset` / `reset-vfio`) that do the
//! reset and check the device from the guest's side, and asserts from the device's journal
//! which kind of reset the device actually received (`reset_begin`/`reset_end` with `kind`), in
//! a journal window around the guest step: exactly the resets that step caused. The guest
//! measures each reset's latency around the sysfs write or the ioctl and prints it as
//! `# latency_ms <method> <ms>`; the scenario repeats it as a diagnostic and a progress line.
//! docs/reset.md describes the reset kinds and the measured figures.

use pcisim_journal::{
    Dir, Event, InterruptOutcome, Record, ResetKind, RingErrorCode, ViolationKind,
};
use serde_json::Value;

use crate::harness::host::{
    count_records, is_reset_begin, reset_kinds, HostCtx, HostError, HostProgram,
};
use crate::vm::agent::RunOutput;
use crate::vm::profile::{DeviceKind, ProfileId};
use crate::vm::qmp::PciDeviceInfo;

/// `R0 two-function-enumeration`: in the `gpu-npu` VM, QEMU places `gpu0` (GPU) and `npu1`
/// (NPU) as functions 0 and 1 of one slot behind one root port, function 0 carries the
/// multifunction bit, the guest enumerates both (each passes E1's checks at its own BDF against
/// its own description), the NPU's PEER_STATUS reports its GPU peer configured and present, and
/// the root ports are driven by native pciehp.
pub const R0: HostProgram = HostProgram {
    name: "r0-two-function-enumeration",
    profile: ProfileId::GpuNpu,
    run: r0_two_function_enumeration,
};

/// `R9 system-reset`: QMP `system_reset` reboots the guest; the device journals a device reset
/// (`reset_begin`/`reset_end` with `kind: "device"`: QEMU sends DEVICE_RESET), and after the
/// reboot the guest enumerates the device again (E1).
pub const R9: HostProgram = HostProgram {
    name: "r9-system-reset",
    profile: ProfileId::Gpu,
    run: r9_system_reset,
};

fn first_device(ctx: &HostCtx<'_>) -> Result<String, HostError> {
    ctx.profile()
        .devices
        .first()
        .map(|d| d.id.clone())
        .ok_or_else(|| HostError::Step("the profile has no device".into()))
}

fn r9_system_reset(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
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
    let argv = ctx.guest_argv("e1", &dev, &[])?;
    ctx.guest_test(
        &format!("{dev} enumerates again after the reboot (E1)"),
        &argv,
    )?;
    Ok(())
}

fn r0_two_function_enumeration(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
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
        let argv = ctx.guest_argv("e1", &id, &["--bdf", &bdf])?;
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
            let argv = ctx.guest_argv("npu-peer", &id, &["--bdf", &bdf, "--present", "yes"])?;
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

/// `R1 flr`: FLR through sysfs (`reset_method` = `flr`, `reset` = 1) on the unbound `gpu0`
/// (registers back to defaults, config restored, exactly one `flr` reset journaled), then the
/// same while a guest vfio driver owns it with MSI-X live (the kernel restores config space
/// including MSI-X; every vector still delivers; the one reset between the marker interrupts is
/// an `flr`).
pub const R1: HostProgram = HostProgram {
    name: "r1-flr",
    profile: ProfileId::GpuNsr,
    run: r1_flr,
};

/// `R2 flr-with-dma`: a guest vfio driver starts a long FILL into guest memory, sees
/// Transactions Pending set, and resets the function with `VFIO_DEVICE_RESET` (the kernel's FLR
/// path: Bus Master Enable cleared, Transactions Pending waited for, FLR). The fill's in-flight
/// DMA is cut off (refused) before the FLR, the one reset between the marker interrupts is an
/// `flr`, and no DMA lands inside it.
pub const R2: HostProgram = HostProgram {
    name: "r2-flr-with-dma",
    profile: ProfileId::GpuNsr,
    run: r2_flr_with_dma,
};

/// `R2b flr-dma-buggy-driver`: the deliberately buggy variant — the guest program writes
/// Device Control "Initiate FLR" itself (raw config write) with Bus Master on and the fill
/// running. The writes the device had in flight land after `reset_begin`: the scenario expects
/// the device to journal `dma_during_reset` and the suite reports it as an expected failure
/// (`# XFAIL`); if the oracle missed it, the scenario fails.
pub const R2B: HostProgram = HostProgram {
    name: "r2b-flr-dma-buggy-driver",
    profile: ProfileId::GpuNsr,
    run: r2b_flr_dma_buggy_driver,
};

/// `R3 pm-reset`: the kernel's `pm` method on `gpu0` reaches the device as a PM soft reset
/// (`kind: "pm"`); `gpu1` has No_Soft_Reset = 1: the guest does not offer `pm` (writing it to
/// `reset_method` is refused) and a D3hot→D0 cycle keeps its state (no reset journaled), while
/// the same cycle on `gpu0` resets it.
pub const R3: HostProgram = HostProgram {
    name: "r3-pm-reset",
    profile: ProfileId::GpuNsr,
    run: r3_pm_reset,
};

/// `R4 bus-reset`: in the ACPI-hotplug VM the kernel's `bus` method is a plain Secondary Bus
/// Reset on the root port; it reaches the device as a DEVICE_RESET from QEMU (`kind:
/// "device"`). The kernel then waits for the port's Data Link Layer Link Active, which QEMU's
/// root port never sets under ACPI hotplug: the write fails with ENOTTY after ~1 s although
/// the reset happened (checked and documented rather than hidden).
pub const R4: HostProgram = HostProgram {
    name: "r4-bus-reset",
    profile: ProfileId::Gpu,
    run: r4_bus_reset,
};

/// `R5 slot-reset`: under native pciehp the kernel's `bus` method for a single-function slot
/// is the hotplug slot's reset (`pciehp_reset_slot`: an SBR with the slot's link and presence
/// events masked); it reaches the device as a DEVICE_RESET and the slot keeps its device.
pub const R5: HostProgram = HostProgram {
    name: "r5-slot-reset",
    profile: ProfileId::GpuNsr,
    run: r5_slot_reset,
};

/// `R6 vfio-device-reset`: a guest vfio driver's `VFIO_DEVICE_RESET` reaches the device as the
/// kernel's first working method (`flr`); the device is usable afterwards (MSI-X, ring DMA).
pub const R6: HostProgram = HostProgram {
    name: "r6-vfio-device-reset",
    profile: ProfileId::GpuNsr,
    run: r6_vfio_device_reset,
};

/// `R7 hot-reset`: in the two-function VM (GPU function 0, NPU function 1), a guest vfio driver
/// owning only function 0 is refused `VFIO_DEVICE_PCI_HOT_RESET` (EINVAL: function 1 is not in
/// vfio-pci's reset set); owning both, the hot reset (the slot's SBR) resets both: each
/// function journals exactly one `device` reset between its marker interrupts (the GPU's raised
/// through its IRQ doorbell, the NPU's through its command mailbox's CMD_IRQ) and none before.
pub const R7: HostProgram = HostProgram {
    name: "r7-hot-reset",
    profile: ProfileId::GpuNpu,
    run: r7_hot_reset,
};

/// `R8 slow-failed-reset`: with `slow-reset=1500` the guest's FLR waits (≥ 1.5 s) and succeeds;
/// with `slow-reset=never` the kernel gives up (its log says so, the write fails with ENOTTY)
/// and the function stays not ready; with the fault off, a Secondary Bus Reset (the function
/// removed, the bridge's SBR by hand, a rescan) brings it back (`kind: "device"`).
pub const R8: HostProgram = HostProgram {
    name: "r8-slow-failed-reset",
    profile: ProfileId::GpuNsr,
    run: r8_slow_failed_reset,
};

/// The latest journal sequence number of `dev` (a window starts after it).
fn mark(ctx: &mut HostCtx<'_>, dev: &str) -> Result<u64, HostError> {
    Ok(ctx.control().last_seq(dev)?)
}

/// The records `dev` journaled after `mark` (an incomplete window is an error).
fn since(ctx: &mut HostCtx<'_>, dev: &str, mark: u64) -> Result<Vec<Record>, HostError> {
    Ok(ctx.window(dev, mark)?.records)
}

/// A delivered interrupt of `vector`.
fn delivered(e: &Event, vector: u8) -> bool {
    matches!(e, Event::Interrupt {
        vector: v,
        outcome: InterruptOutcome::Delivered,
    } if *v == u16::from(vector))
}

/// The records strictly between the first delivered interrupt of vector `first` and the
/// first delivered interrupt of vector `second` after it.
pub fn between_interrupts(records: &[Record], first: u8, second: u8) -> Option<&[Record]> {
    let a = records.iter().position(|r| delivered(&r.event, first))?;
    let b = records[a + 1..]
        .iter()
        .position(|r| delivered(&r.event, second))?
        + a
        + 1;
    Some(&records[a + 1..b])
}

/// The records between the guest program's marker interrupts (vector [`GUEST_MARK_BEFORE`],
/// then [`GUEST_MARK_AFTER`]), where the step's reset must be; if the markers are not both in
/// the journal, `what` fails and there is no window.
fn marked_window<'a>(
    ctx: &mut HostCtx<'_>,
    what: &str,
    records: &'a [Record],
) -> Option<&'a [Record]> {
    let window = between_interrupts(records, GUEST_MARK_BEFORE, GUEST_MARK_AFTER);
    if window.is_none() {
        ctx.fail(
            what,
            "the marker interrupts (vectors 2 then 3) are not both in the journal",
        );
    }
    window
}

/// `# latency_ms <method> <ms>` from a guest program's KTAP.
pub fn latency_ms(stdout: &str) -> Option<(String, f64)> {
    stdout.lines().find_map(|l| {
        let mut w = l
            .trim_start()
            .strip_prefix("# latency_ms ")?
            .split_whitespace();
        let method = w.next()?.to_string();
        let ms = w.next()?.parse().ok()?;
        Some((method, ms))
    })
}

/// Passes if the window holds exactly `want` (kinds, in order), each reset ended.
fn check_kinds(ctx: &mut HostCtx<'_>, what: &str, window: &[Record], want: &[ResetKind]) -> bool {
    let (kinds, paired) = reset_kinds(window);
    ctx.check(
        &format!("{what}: journaled {}", describe_kinds(want)),
        kinds == want && paired,
        format!(
            "journaled {}{}",
            describe_kinds(&kinds),
            if paired {
                ""
            } else {
                " (a reset_begin without its reset_end)"
            }
        ),
    )
}

fn describe_kinds(kinds: &[ResetKind]) -> String {
    if kinds.is_empty() {
        "no reset".into()
    } else {
        let list: Vec<String> = kinds.iter().map(|k| format!("kind={k}")).collect();
        format!("reset_begin/reset_end {}", list.join(", "))
    }
}

/// Runs a guest program as a subtest (its KTAP nested) and reports the latency it measured.
/// Returns its output.
fn guest_step(ctx: &mut HostCtx<'_>, name: &str, argv: &[String]) -> Result<RunOutput, HostError> {
    let (_, out) = ctx.guest_test_output(name, argv)?;
    if let Some((method, ms)) = latency_ms(&out.stdout) {
        let line = format!("{method}: {ms:.1} ms as the guest saw it");
        ctx.progress(&line);
        ctx.diag(&line);
    }
    Ok(out)
}

fn r1_flr(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let dev = "gpu0";
    let bdf = ctx.bdf_of(dev)?;

    let m = mark(ctx, dev)?;
    let argv = ctx.guest_argv("reset", dev, &["--bdf", &bdf, "--method", "flr"])?;
    guest_step(
        ctx,
        &format!("{dev} unbound: reset_method=flr, reset: registers back to defaults"),
        &argv,
    )?;
    let w = since(ctx, dev, m)?;
    check_kinds(ctx, &format!("{dev} unbound"), &w, &[ResetKind::Flr]);

    let m = mark(ctx, dev)?;
    let argv = ctx.guest_argv(
        "reset-vfio",
        dev,
        &["--bdf", &bdf, "--op", "sysfs-flr", "--ring", "on"],
    )?;
    guest_step(
        ctx,
        &format!("{dev} under a guest vfio driver: sysfs FLR, interrupts and DMA after it"),
        &argv,
    )?;
    let w = since(ctx, dev, m)?;
    let (all, _) = reset_kinds(&w);
    ctx.diag(&format!(
        "{dev}: the vfio session journaled resets {:?} (vfio-pci resets on open and close; runtime PM resumes from D3hot)",
        all.iter().map(|k| k.name()).collect::<Vec<_>>()
    ));
    let what =
        format!("{dev} between the marker interrupts: journaled reset_begin/reset_end kind=flr");
    if let Some(b) = marked_window(ctx, &what, &w) {
        check_kinds(
            ctx,
            &format!("{dev} between the marker interrupts"),
            b,
            &[ResetKind::Flr],
        );
    }
    Ok(())
}

/// The records of `type` in `records` and their positions.
fn first(records: &[Record], pred: impl Fn(&Event) -> bool) -> Option<usize> {
    records.iter().position(|r| pred(&r.event))
}

/// Bytes of DMA writes in `records`.
fn dma_write_bytes(records: &[Record]) -> u64 {
    records
        .iter()
        .filter_map(|r| match r.event {
            Event::Dma {
                dir: Dir::Write,
                bytes,
                ..
            } => Some(bytes),
            _ => None,
        })
        .sum()
}

/// Whether an event `pred` accepts is among `records`.
fn journaled(records: &[Record], pred: impl Fn(&Event) -> bool) -> bool {
    records.iter().any(|r| pred(&r.event))
}

/// The ring stopped on a refused DMA.
fn ring_refused(e: &Event) -> bool {
    matches!(
        e,
        Event::RingError {
            code: RingErrorCode::DmaRefused,
            ..
        }
    )
}

fn r2_flr_with_dma(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let dev = "gpu0";
    let bdf = ctx.bdf_of(dev)?;
    let m = mark(ctx, dev)?;
    let argv = ctx.guest_argv("reset-dma", dev, &["--bdf", &bdf, "--mode", "correct"])?;
    guest_step(
        ctx,
        &format!("{dev}: FILL running, Transactions Pending seen, VFIO_DEVICE_RESET"),
        &argv,
    )?;
    let w = since(ctx, dev, m)?;
    let what = format!("{dev}: the reset between the marker interrupts");
    let Some(b) = marked_window(ctx, &what, &w) else {
        return Ok(());
    };
    check_kinds(
        ctx,
        &format!("{dev} FLR with DMA in flight"),
        b,
        &[ResetKind::Flr],
    );
    let begin = first(b, |e| matches!(e, Event::ResetBegin { .. })).unwrap_or(b.len());
    let (before, inside) = b.split_at(begin);
    let written = dma_write_bytes(before);
    let bme_off = journaled(
        before,
        |e| matches!(e, Event::Command { new, .. } if new & 4 == 0),
    );
    let refused = count_records(before, |e| matches!(e, Event::DmaRefused { .. }));
    ctx.diag(&format!(
        "{dev}: {written} bytes of the fill landed, then Bus Master Enable {} and {refused} access(es) refused, before reset_begin",
        if bme_off { "cleared" } else { "still set" }
    ));
    ctx.check(
        &format!("{dev}: the fill was running and the kernel stopped it (Bus Master off, DMA refused) before the FLR"),
        written > 0 && bme_off && refused > 0 && journaled(before, ring_refused),
        format!("{written} bytes written, Bus Master cleared: {bme_off}, {refused} refused"),
    );
    ctx.check(
        &format!("{dev}: no DMA inside the reset, no FLR with Transactions Pending"),
        dma_write_bytes(inside) == 0
            && count_records(inside, is_dma) == 0
            && !journaled(b, |e| *e == Event::FlrWithTransactionsPending),
        format!(
            "{} DMA records after reset_begin",
            count_records(inside, is_dma)
        ),
    );
    Ok(())
}

fn r2b_flr_dma_buggy_driver(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let dev = "gpu0";
    let bdf = ctx.bdf_of(dev)?;
    let m = mark(ctx, dev)?;
    let argv = ctx.guest_argv("reset-dma", dev, &["--bdf", &bdf, "--mode", "buggy"])?;
    guest_step(
        ctx,
        &format!("{dev}: FILL running, the program writes Initiate FLR itself (driver bug)"),
        &argv,
    )?;
    let w = since(ctx, dev, m)?;
    let what = format!("{dev}: the reset between the marker interrupts");
    let Some(b) = marked_window(ctx, &what, &w) else {
        return Ok(());
    };
    check_kinds(ctx, &format!("{dev} raw FLR"), b, &[ResetKind::Flr]);
    let begin = first(b, |e| matches!(e, Event::ResetBegin { .. })).unwrap_or(b.len());
    let end = first(b, |e| matches!(e, Event::ResetEnd { .. })).unwrap_or(b.len());
    let (before, inside) = (&b[..begin], &b[begin..end.max(begin)]);
    ctx.check(
        &format!("{dev}: the FLR came with Transactions Pending and Bus Master on"),
        journaled(before, |e| *e == Event::FlrWithTransactionsPending),
        "no flr_with_transactions_pending record before reset_begin",
    );
    let landed = dma_write_bytes(inside);
    let violations = count_records(inside, |e| {
        matches!(
            e,
            Event::Violation {
                kind: ViolationKind::DmaDuringReset,
                ..
            }
        )
    });
    ctx.diag(&format!(
        "{dev}: {landed} bytes of posted writes landed inside the reset, {violations} dma_during_reset violation(s) journaled"
    ));
    ctx.check(
        &format!(
            "{dev}: the writes in flight landed inside the reset and the checker flagged them"
        ),
        landed > 0
            && violations > 0
            && journaled(inside, |e| matches!(e, Event::RingCommandAborted { .. })),
        format!("{landed} bytes inside the reset, {violations} violations"),
    );
    Ok(())
}

fn is_dma(e: &Event) -> bool {
    matches!(e, Event::Dma { .. })
}

fn is_power(e: &Event) -> bool {
    matches!(e, Event::Power { .. })
}

/// The guest's `reset-vfio` rings these vectors just before and just after the reset.
const GUEST_MARK_BEFORE: u8 = 2;
const GUEST_MARK_AFTER: u8 = 3;

fn r3_pm_reset(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let (dev, nsr) = ("gpu0", "gpu1");
    let bdf = ctx.bdf_of(dev)?;
    let nsr_bdf = ctx.bdf_of(nsr)?;

    let m = mark(ctx, dev)?;
    let argv = ctx.guest_argv("reset", dev, &["--bdf", &bdf, "--method", "pm"])?;
    guest_step(
        ctx,
        &format!("{dev}: reset_method=pm, reset: registers back to defaults"),
        &argv,
    )?;
    let w = since(ctx, dev, m)?;
    check_kinds(ctx, &format!("{dev} pm"), &w, &[ResetKind::PmSoftReset]);
    let to_d3 = count_records(&w, is_power);
    ctx.diag(&format!("{dev}: {to_d3} power state changes journaled"));

    let m = mark(ctx, nsr)?;
    let argv = ctx.guest_argv(
        "reset",
        nsr,
        &[
            "--bdf", &nsr_bdf, "--method", "pm", "--absent", "pm", "--errno", "22", "--expect",
            "kept",
        ],
    )?;
    guest_step(
        ctx,
        &format!("{nsr} (No_Soft_Reset=1): pm not offered, reset_method=pm refused (EINVAL)"),
        &argv,
    )?;
    let argv = ctx.guest_argv(
        "reset",
        nsr,
        &[
            "--bdf", &nsr_bdf, "--method", "pm-cycle", "--expect", "kept",
        ],
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

    let m = mark(ctx, dev)?;
    let argv = ctx.guest_argv(
        "reset",
        dev,
        &["--bdf", &bdf, "--method", "pm-cycle", "--expect", "cleared"],
    )?;
    guest_step(
        ctx,
        &format!("{dev} (No_Soft_Reset=0): the same D3hot -> D0 resets it"),
        &argv,
    )?;
    let w = since(ctx, dev, m)?;
    check_kinds(
        ctx,
        &format!("{dev} D3hot -> D0"),
        &w,
        &[ResetKind::PmSoftReset],
    );
    Ok(())
}

fn r4_bus_reset(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let dev = "gpu0";
    let bdf = ctx.bdf_of(dev)?;
    let m = mark(ctx, dev)?;
    // Under ACPI hotplug QEMU's root port advertises Data Link Layer Link Active Reporting but
    // never sets Link Active; the port is a 16 GT/s one, so after the SBR the kernel waits for
    // Link Active (PCIe Base 6.0 §6.6.1), gives up after 100 ms + 1 s and returns ENOTTY. The
    // reset has happened by then and the kernel restores config space anyway.
    let argv = ctx.guest_argv(
        "reset",
        dev,
        &[
            "--bdf",
            &bdf,
            "--method",
            "bus",
            "--offered",
            "flr,pm,bus",
            "--errno",
            "25",
            "--kmsg",
            "Data Link Layer Link Active not set",
        ],
    )?;
    guest_step(
        ctx,
        &format!(
            "{dev}: reset_method=bus: registers back to defaults; the kernel then times out on Link Active (ENOTTY)"
        ),
        &argv,
    )?;
    let w = since(ctx, dev, m)?;
    check_kinds(ctx, &format!("{dev} bus"), &w, &[ResetKind::DeviceReset]);
    Ok(())
}

fn r5_slot_reset(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
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
    let m = mark(ctx, dev)?;
    let argv = ctx.guest_argv(
        "reset",
        dev,
        &["--bdf", &bdf, "--method", "bus", "--offered", "flr,bus"],
    )?;
    guest_step(
        ctx,
        &format!("{dev}: reset_method=bus is pciehp's slot reset: registers back to defaults"),
        &argv,
    )?;
    let w = since(ctx, dev, m)?;
    check_kinds(ctx, &format!("{dev} slot"), &w, &[ResetKind::DeviceReset]);
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

fn r6_vfio_device_reset(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let dev = "gpu0";
    let bdf = ctx.bdf_of(dev)?;
    let methods = ctx.sh(&format!("cat /sys/bus/pci/devices/{bdf}/reset_method"))?;
    let first = methods.split_whitespace().next().unwrap_or("").to_string();
    ctx.diag(&format!("{dev} reset_method: {}", methods.trim()));
    let m = mark(ctx, dev)?;
    let argv = ctx.guest_argv(
        "reset-vfio",
        dev,
        &["--bdf", &bdf, "--op", "ioctl", "--ring", "on"],
    )?;
    guest_step(
        ctx,
        &format!("{dev}: VFIO_DEVICE_RESET from a guest vfio driver, usable afterwards"),
        &argv,
    )?;
    let w = since(ctx, dev, m)?;
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

fn r7_hot_reset(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let (d0, d1) = ("gpu0", "npu1");
    let (f0, f1) = (ctx.bdf_of(d0)?, ctx.bdf_of(d1)?);
    let (m0, m1) = (mark(ctx, d0)?, mark(ctx, d1)?);
    let peer = &ctx.device(d1)?.description;
    let (peer_vendor, peer_device) = (
        format!("{:#06x}", peer.vendor_id),
        format!("{:#06x}", peer.device_id),
    );
    let argv = ctx.guest_argv(
        "reset-hot",
        d0,
        &[
            "--bdf",
            &f0,
            "--peer",
            &f1,
            "--peer-vendor",
            &peer_vendor,
            "--peer-device",
            &peer_device,
        ],
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

fn r8_slow_failed_reset(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let dev = "gpu0";
    let bdf = ctx.bdf_of(dev)?;

    // Slow: config space reads all-ones for 1.5 s after the FLR.
    ctx.inject(dev, "slow-reset=1500")?;
    let m = mark(ctx, dev)?;
    let argv = ctx.guest_argv(
        "reset",
        dev,
        &[
            "--bdf",
            &bdf,
            "--method",
            "flr",
            "--min-ms",
            "1500",
            "--kmsg",
            "after FLR",
        ],
    )?;
    guest_step(
        ctx,
        &format!("{dev} slow-reset=1500: the guest's FLR waits >= 1.5 s and succeeds"),
        &argv,
    )?;
    let w = since(ctx, dev, m)?;
    check_kinds(ctx, &format!("{dev} slow FLR"), &w, &[ResetKind::Flr]);

    // Never: the kernel polls ~65 s, gives up, and the function stays not ready.
    ctx.inject(dev, "slow-reset=never")?;
    let m = mark(ctx, dev)?;
    let argv = ctx.guest_argv(
        "reset",
        dev,
        &[
            "--bdf",
            &bdf,
            "--method",
            "flr",
            "--errno",
            "25",
            "--expect",
            "dead",
            "--kmsg",
            "giving up",
        ],
    )?;
    ctx.progress("slow-reset=never: the guest's FLR waits ~65 s before giving up");
    guest_step(
        ctx,
        &format!("{dev} slow-reset=never: the kernel gives up (ENOTTY, logged)"),
        &argv,
    )?;
    let w = since(ctx, dev, m)?;
    check_kinds(ctx, &format!("{dev} failed FLR"), &w, &[ResetKind::Flr]);
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
        "reset",
        dev,
        &[
            "--bdf", &bdf, "--method", "sbr", "--dirty", "off", "--expect", "cleared",
        ],
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
    let argv = ctx.guest_argv("e1", dev, &["--bdf", &bdf])?;
    ctx.guest_test(&format!("{dev} enumerates as before (E1)"), &argv)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(event: Event) -> Record {
        Record {
            seq: 0,
            t_ns: 0,
            event,
        }
    }

    fn begin(kind: ResetKind) -> Record {
        rec(Event::ResetBegin { kind })
    }

    fn end(kind: ResetKind) -> Record {
        rec(Event::ResetEnd { kind })
    }

    #[test]
    fn test_reset_kinds_pairs_begin_and_end() {
        let w = vec![
            rec(Event::Command { old: 6, new: 1024 }),
            begin(ResetKind::Flr),
            end(ResetKind::Flr),
            begin(ResetKind::PmSoftReset),
            end(ResetKind::PmSoftReset),
        ];
        assert_eq!(
            reset_kinds(&w),
            (vec![ResetKind::Flr, ResetKind::PmSoftReset], true)
        );
        assert_eq!(reset_kinds(&w[..2]), (vec![ResetKind::Flr], false));
        let crossed = vec![begin(ResetKind::Flr), end(ResetKind::DeviceReset)];
        assert!(!reset_kinds(&crossed).1);
        assert_eq!(reset_kinds(&[]), (vec![], true));
    }

    #[test]
    fn test_between_interrupts_and_latency() {
        let irq = |vector: u16, o: &str| {
            rec(Event::Interrupt {
                vector,
                outcome: o.parse().unwrap(),
            })
        };
        let w = vec![
            begin(ResetKind::PmSoftReset),
            irq(2, "delivered"),
            begin(ResetKind::Flr),
            irq(3, "refused:resetting"),
            end(ResetKind::Flr),
            irq(3, "delivered"),
            begin(ResetKind::Flr),
        ];
        let b = between_interrupts(&w, 2, 3).unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(reset_kinds(b), (vec![ResetKind::Flr], true));
        assert!(between_interrupts(&w, 3, 2).is_none());
        assert_eq!(
            latency_ms("KTAP version 1\n  # latency_ms flr 112.5\nok 1 x\n"),
            Some(("flr".into(), 112.5))
        );
        assert_eq!(latency_ms("# latency_ms\n"), None);
    }
}
