//! The reset scenarios, run on the host side ([`crate::harness::host`]): R0 (the two-function VM
//! enumerates), R1 (FLR through sysfs, unbound and under a guest vfio driver), R2 (FLR with DMA
//! in flight, the kernel's way) and R2b (the same by a buggy driver: an expected violation), R3
//! (PM soft reset, and No_Soft_Reset = 1), R4 (secondary bus reset under ACPI hotplug), R5 (slot
//! reset under native pciehp), R6 (`VFIO_DEVICE_RESET`), R7 (`VFIO_DEVICE_PCI_HOT_RESET` on the
//! two-function slot), R8 (slow and failed reset, recovery), R9 (`system_reset`) and R12 (AER
//! error recovery through the guest GPU driver's `pci_error_handlers`, in [`aer`]).
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
use pcisim_guest_wire::{
    E1Options, NpuPeerOptions, OnOff, ResetDmaMode, ResetDmaOptions, ResetExpect, ResetHotOptions,
    ResetMethod, ResetOptions, ResetVfioOptions, VfioResetOp, YesNo,
};

mod aer;
mod flr;
mod methods;
mod system;
pub use self::aer::R12;
use self::flr::*;
use self::methods::*;
use self::system::*;

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

/// `reset --bdf bdf --method method`, every other option at its default.
fn reset_at(bdf: &str, method: ResetMethod) -> ResetOptions {
    ResetOptions {
        bdf: Some(bdf.to_string()),
        ..ResetOptions::new(method)
    }
}

/// Runs guest step `argv` as the subtest `name` ([`guest_step`]) and returns the records `dev`
/// journaled meanwhile: the resets that step caused and nothing from before it.
fn journaled_step(
    ctx: &mut HostCtx<'_>,
    dev: &str,
    name: &str,
    argv: &[String],
) -> Result<Vec<Record>, HostError> {
    let m = mark(ctx, dev)?;
    guest_step(ctx, name, argv)?;
    since(ctx, dev, m)
}

/// A reset step: [`journaled_step`], then the check (named after `what`) that `dev` journaled
/// exactly the resets `want`. Returns the step's records.
fn reset_step(
    ctx: &mut HostCtx<'_>,
    dev: &str,
    name: &str,
    argv: &[String],
    what: &str,
    want: &[ResetKind],
) -> Result<Vec<Record>, HostError> {
    let w = journaled_step(ctx, dev, name, argv)?;
    check_kinds(ctx, what, &w, want);
    Ok(w)
}

/// A step whose guest program rings the marker interrupts just before and just after its reset
/// (`reset-vfio`, `reset-dma`): [`journaled_step`], and the records between the markers, or
/// `None` with a failed check `what` when not both markers are in the journal. Returns the
/// step's records and the marked window.
fn marked_step(
    ctx: &mut HostCtx<'_>,
    dev: &str,
    name: &str,
    argv: &[String],
    what: &str,
) -> Result<(Vec<Record>, Option<Vec<Record>>), HostError> {
    let w = journaled_step(ctx, dev, name, argv)?;
    let marked = marked_window(ctx, what, &w).map(<[Record]>::to_vec);
    Ok((w, marked))
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
