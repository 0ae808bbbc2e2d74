//! The hotplug scenarios, run on the host side ([`crate::harness::host`]). In the `gpu-hotplug` VM: H1
//! (hot-add: the guest probes the device, a driver binds, BAR access works), H2 (hot-remove
//! with a driver bound), H3 (100 add/remove cycles on the same socket, each with a guest vfio
//! user mapping DMA, without a leak in the server), H4 (removal while a guest vfio user holds
//! the device: REQ, cooperative and not) and H5 (surprise removal: link-down). In the
//! `gpu-npu-hotplug` VM: H6 (removing the GPU an NPU names as its peer).
//!
//! The hot-plugged GPU is the profile's device that is not plugged at boot (`gpu1`). It uses MSI
//! instead of MSI-X (`irq=msi`): QEMU 11.1.3 aborts on `device_del` of any `vfio-user-pci`
//! device with MSI-X (`vfio_user_pci_finalize` deletes the PBA subregion from a BAR container
//! that is already gone; docs/lab.md).

use std::thread;
use std::time::{Duration, Instant};

use pcisim_abi::gpu::regs as gpu_regs;
use pcisim_abi::npu::regs as npu_regs;
use pcisim_journal::{
    Dir, Event, InterruptOutcome, MessageKind, Record, Refusal, ResetKind, RingErrorCode,
};
use serde_json::Value;

use crate::guestops::{self, sh_output, sysfs};
use crate::harness::host::{count_records, HostCtx, HostError, HostProgram};
use crate::vm::boot::tail_lines;
use crate::vm::kmod::NPU_MODULE;
use crate::vm::profile::ProfileId;
use crate::vm::qmp::{PciDeviceInfo, QmpError};
use crate::vm::server::{server_pid, usage};
use pcisim_guest_wire::{
    BarIoOptions, DmaStreamOptions, E1Options, E3Options, GuestProgram as Invocation, IrqMode,
    Options, ReqMode, SelectOptions, VfioUserOptions,
};

mod add_remove;
mod held;
mod pciehp;
mod peer;
mod surprise;
use self::add_remove::*;
use self::held::*;
use self::pciehp::*;
use self::peer::*;
use self::surprise::*;

/// `H1 hot-add`: `device_add` of the unplugged GPU onto its free root port; the guest
/// enumerates it (its sysfs entry appears: hot-add → probed is measured), it passes E1 at its
/// address, its BARs work (E2), its MSI reaches a guest vfio user (E3 with `--irq msi`: eventfds
/// on `VFIO_PCI_MSI_IRQ_INDEX`, doorbells, `vfio-msi[V]` lines in `/proc/interrupts`; the device
/// journals each doorbell delivered), and vfio-pci binds it through `driver_override`. It stays
/// plugged and bound for H2.
pub const H1: HostProgram = HostProgram {
    name: "h1-hot-add",
    profile: ProfileId::GpuHotplug,
    run: h1_hot_add,
};

/// `H2 hot-remove`: `device_del` of the hot-plugged GPU while vfio-pci is bound to it:
/// `DEVICE_DELETED` arrives (device_del → DEVICE_DELETED is measured), QEMU lives on, the
/// guest's sysfs entry is gone, and the server saw the client go (EOF): the device journals
/// `client_disconnected` and a `lost-connection` reset.
pub const H2: HostProgram = HostProgram {
    name: "h2-hot-remove",
    profile: ProfileId::GpuHotplug,
    run: h2_hot_remove,
};

/// `H3 add-remove-cycles`: [`H3_CYCLES`] device_add/device_del cycles on the same socket; the
/// guest enumerates the device every time and a guest vfio user (`pcisim-guest vfio-user`)
/// binds it, opens it and maps a DMA buffer through the vIOMMU (DMA_MAPs and DMA_UNMAPs in
/// the server), and the server's open fds and threads do not grow at all, its RSS by at most
/// [`RSS_TOLERANCE_KIB`].
pub const H3: HostProgram = HostProgram {
    name: "h3-add-remove-cycles",
    profile: ProfileId::GpuHotplug,
    run: h3_add_remove_cycles,
};

/// `H4 remove-while-held`: `device_del` while a guest vfio user holds the device. A
/// cooperative holder (`vfio-user --req release`) gets the kernel's device request on its REQ
/// eventfd (`VFIO_PCI_REQ_IRQ_INDEX`), closes the device, and the removal completes
/// (`DEVICE_DELETED`). An uncooperative one (`--req ignore`) keeps it: the removal stays
/// pending (no `DEVICE_DELETED`; vfio-pci logs "Relaying device request to user" every 10 s)
/// until the host has the agent kill it, and then completes.
pub const H4: HostProgram = HostProgram {
    name: "h4-remove-while-held",
    profile: ProfileId::GpuHotplug,
    run: h4_remove_while_held,
};

/// How long H4's uncooperative variant leaves the removal pending (two 10 s relays).
const H4_PENDING: Duration = Duration::from_secs(21);

/// `H5 surprise-removal`: first with DMA in flight: a guest vfio user (`pcisim-guest
/// dma-stream`) keeps the plugged GPU's command ring streaming 64 MiB FILLs (and fences with
/// their interrupt) into its own memory, and the host injects `link-down` while it runs. The
/// device's journal shows DMA writes before the link went down, the ring's next access refused
/// (`dma_refused`, `link_down`) after it, and no DMA and no interrupt sent between link-down
/// and link-up (the checker would add `dma_link_down` / `interrupt_while_disabled`); the
/// program sees all-ones instead of hanging, and after `link-up` finds the ring stopped on
/// DMA_REFUSED, gets the error interrupt that was held back, restarts the ring and releases the
/// device (it ends within a bound, or is killed and the scenario fails).
///
/// Then, the device unbound (BAR0 through sysfs `resource0`): config space and BAR0 read
/// all-ones in the guest, writes are dropped (a scratch register keeps its value, an IRQ
/// doorbell raises nothing), the device journals no DMA and no interrupt and no violation;
/// `link-up` brings valid reads back. Then link-down again and `device_del`: `DEVICE_DELETED`,
/// `client_disconnected`, and the device serves the next client with the link up.
pub const H5: HostProgram = HostProgram {
    name: "h5-surprise-removal",
    profile: ProfileId::GpuHotplug,
    run: h5_surprise_removal,
};

/// `H6 gpu-npu-peer`: in `gpu-npu-hotplug`, the guest NPU driver (`pcisim_npu.ko`) drives the
/// NPU; `device_add` of the GPU the NPU names as its peer: the driver takes a reference on the
/// GPU's `pci_dev` (its sysfs `pcisim_peer` reads `held <bdf>`) and the NPU's PEER_STATUS reads
/// configured | present; `device_del` of the GPU: the driver drops its reference, the kernel
/// frees the GPU's `pci_dev` (its kobject is released: `kobject_cleanup` with lib/kobject.c's
/// dynamic debug on), PEER_STATUS = configured, and nothing of the GPU is left (no
/// `/sys/bus/pci/devices/<bdf>`, no IOMMU group member, no driver link).
pub const H6: HostProgram = HostProgram {
    name: "h6-gpu-npu-peer",
    profile: ProfileId::GpuNpuHotplug,
    run: h6_gpu_npu_peer,
};

/// `H6b gpu-peer-ref-leak`: the same with the driver's deliberate bug `leak_peer_ref` (it keeps
/// its reference on the removed GPU's `pci_dev`, the seed's NPU refcount leak). Everything
/// visible in sysfs looks clean, but the `pci_dev` is never freed: the scenario passes only if
/// the lab catches that (no `kobject_cleanup` of the GPU's BDF; the driver reports the
/// reference `leaked`) — an expected failure of the driver, checked.
pub const H6B: HostProgram = HostProgram {
    name: "h6b-gpu-peer-ref-leak",
    profile: ProfileId::GpuNpuHotplug,
    run: h6b_gpu_peer_ref_leak,
};

/// `H7 pciehp-add-remove`: H1/H2's cycle under native PCIe hotplug (`gpu-pciehp`): the guest's
/// pciehp driver powers the slot on at `device_add` (the GPU is enumerated and passes E1), and
/// `device_del` presses the attention button: pciehp waits its 5 s abort window, powers the slot
/// off and QEMU reports `DEVICE_DELETED`; the server sees the client go and takes the next one
/// on the same socket (a second add/remove cycle).
pub const H7: HostProgram = HostProgram {
    name: "h7-pciehp-add-remove",
    profile: ProfileId::GpuPciehp,
    run: h7_pciehp_add_remove,
};

/// How many add/remove cycles H3 runs.
pub const H3_CYCLES: usize = 100;
/// Cycles H3 runs before it takes the baseline (not counted in [`H3_CYCLES`]).
pub const H3_WARMUP: usize = 20;
/// Link-down/link-up pairs H3 injects first to fill the device journal's ring (4096 records).
const JOURNAL_FILL_PAIRS: usize = 2100;
/// The DMA buffer H3's guest vfio user maps each cycle, in KiB (one DMA_MAP per 4 KiB page).
const H3_DMA_KIB: usize = 16;
/// How long the guest has to enumerate a hot-added device (ACPI: ~0.1 s).
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `DEVICE_DELETED` may take (ACPI: ~20 ms; native pciehp: ~6 s).
const DELETE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server has to notice that the client went away.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);
/// Open fds the server may gain over H3's cycles (none is expected).
const FD_TOLERANCE: usize = 0;
/// Threads the server may gain over H3's cycles (none is expected).
const THREAD_TOLERANCE: usize = 0;
/// RSS the server may gain over H3's cycles, in KiB (allocator slack, not a per-cycle leak).
const RSS_TOLERANCE_KIB: u64 = 512;

/// The profile's device that is not plugged at boot.
fn hotplug_device(ctx: &HostCtx<'_>) -> Result<String, HostError> {
    ctx.layout()
        .devices
        .iter()
        .find(|d| !d.at_boot)
        .map(|d| d.id.clone())
        .ok_or_else(|| HostError::Step("the profile has no device left for device_add".into()))
}

/// Where QEMU has `id`, if it is on the machine.
fn locate(ctx: &mut HostCtx<'_>, id: &str) -> Result<Option<PciDeviceInfo>, HostError> {
    Ok(ctx.qmp().query_pci()?.into_iter().find(|p| p.qdev_id == id))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// `device_add id`, then waits until the guest has enumerated it. Returns where it is and the
/// time from `device_add` to the guest seeing its sysfs entry (what the host sees: it includes
/// one agent round trip).
fn plug(ctx: &mut HostCtx<'_>, id: &str) -> Result<(PciDeviceInfo, Duration), HostError> {
    let t = Instant::now();
    ctx.device_add(id)?;
    let info = locate(ctx, id)?.ok_or_else(|| {
        HostError::Step(format!(
            "QEMU does not list {id} in query-pci after device_add"
        ))
    })?;
    let bdf = info.bdf();
    let out = sh_output(ctx, &sysfs::wait_script(&bdf, true, PROBE_TIMEOUT))?;
    let took = t.elapsed();
    if out.exit != Some(0) {
        return Err(HostError::Step(format!(
            "the guest did not enumerate {id} at {bdf} within {} s of device_add",
            PROBE_TIMEOUT.as_secs()
        )));
    }
    Ok((info, took))
}

/// `device_del id` and waits for `DEVICE_DELETED`; returns the time from the accepted
/// `device_del` to the event. Under native pciehp QEMU refuses a `device_del` while the slot's
/// power indicator still blinks from the hot-add ("guest is busy"): it is retried every 100 ms
/// (for up to [`DELETE_TIMEOUT`]). If QEMU died on the way, its log's last lines become
/// diagnostics.
fn unplug(ctx: &mut HostCtx<'_>, id: &str) -> Result<Duration, HostError> {
    let deadline = Instant::now() + DELETE_TIMEOUT;
    let r = loop {
        match ctx.device_del(id, DELETE_TIMEOUT) {
            Err(HostError::Qmp(QmpError::Command { desc, .. }))
                if desc.contains("guest is busy") && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(100));
            }
            r => break r,
        }
    };
    match r {
        Ok(t) => Ok(t),
        Err(e) => {
            thread::sleep(Duration::from_millis(200));
            if let Err(dead) = ctx.check_qemu() {
                let log = ctx.vm_dir().join("qemu.log");
                for l in tail_lines(&log, 5) {
                    ctx.diag(&format!("qemu.log: {l}"));
                }
                return Err(dead);
            }
            Err(e)
        }
    }
}

/// Waits until the server reports no client attached to `id`.
fn wait_detached(ctx: &mut HostCtx<'_>, id: &str) -> Result<bool, HostError> {
    let deadline = Instant::now() + DETACH_TIMEOUT;
    loop {
        let st = ctx.control().status(id)?;
        if st.get("client_attached") == Some(&Value::Bool(false)) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Plugs `id` and binds vfio-pci unless that is already so (H2 run alone); returns its BDF.
fn ensure_bound(ctx: &mut HostCtx<'_>, id: &str) -> Result<String, HostError> {
    let bdf = match locate(ctx, id)? {
        Some(info) => info.bdf(),
        None => {
            let (info, took) = plug(ctx, id)?;
            ctx.diag(&format!(
                "setup: hot-added {id} at {} ({})",
                info.bdf(),
                ms(took)
            ));
            info.bdf()
        }
    };
    if sysfs::driver(ctx, &bdf)? != "vfio-pci" {
        let (driver, _) = sysfs::bind_vfio(ctx, &bdf)?;
        if driver != "vfio-pci" {
            return Err(HostError::Step(format!(
                "setup: vfio-pci did not bind {bdf} (driver: {driver:?})"
            )));
        }
    }
    Ok(bdf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_described_cap() {
        let d =
            serde_json::json!({"capabilities": [{"id": 1, "offset": 64}, {"id": 5, "offset": 72}]});
        assert_eq!(described_cap(&d, 5), Some(72));
        assert_eq!(described_cap(&d, 0x11), None);
        assert_eq!(described_cap(&serde_json::json!({}), 5), None);
    }

    #[test]
    fn test_dyndbg_enabled_reads_the_control_file() {
        let on = "lib/kobject.c:110 [kobject]kobject_add_internal =p \"'%s' (%p): %s: parent: '%s', set: '%s'\\012\"\n\
                  lib/kobject.c:667 [kobject]kobject_cleanup =pmf \"'%s' (%p): %s, parent %p\\012\"\n";
        assert_eq!(
            dyndbg_enabled(on, "lib/kobject.c", "kobject_cleanup"),
            Ok(true)
        );
        let off = on.replace("=pmf", "=_");
        assert_eq!(
            dyndbg_enabled(&off, "lib/kobject.c", "kobject_cleanup"),
            Ok(false)
        );
        // No such site (dynamic debug compiled out, another file): an error, not "off".
        assert!(dyndbg_enabled("", "lib/kobject.c", "kobject_cleanup").is_err());
        assert!(dyndbg_enabled(on, "lib/kobject_uevent.c", "kobject_cleanup").is_err());
        assert!(dyndbg_enabled(on, "lib/kobject.c", "kobject_release").is_err());
    }

    #[test]
    fn test_msi_required_follows_the_profile() {
        let msi = vec!["irq=msi".to_string()];
        assert_eq!(msi_required(&msi, true), Ok(true));
        // irq=msi and no MSI capability: an error, not a skip.
        assert!(msi_required(&msi, false)
            .unwrap_err()
            .contains("irq=msi, but it describes no MSI capability"));
        // MSI-X: not applicable, unless the device describes MSI anyway (then it is checked).
        assert_eq!(msi_required(&[], false), Ok(false));
        assert_eq!(msi_required(&["vram=1M".to_string()], true), Ok(true));
    }

    #[test]
    fn test_down_start() {
        let rec = |event| Record {
            seq: 0,
            t_ns: 0,
            event,
        };
        let refused = |reason| {
            rec(Event::DmaRefused {
                dir: Dir::Write,
                iova: 0,
                len: 4,
                reason,
            })
        };
        let w = vec![
            rec(Event::Dma {
                dir: Dir::Write,
                pasid: None,
                iova: 0,
                len: 4,
                count: 1,
                bytes: 4,
            }),
            refused(Refusal::LinkDown),
            rec(Event::RingError {
                code: RingErrorCode::DmaRefused,
                slot: 3,
                detail: String::new(),
            }),
            rec(Event::Interrupt {
                vector: 1,
                outcome: InterruptOutcome::Refused(Refusal::LinkDown),
            }),
            rec(Event::Link { up: false }),
            rec(Event::Link { up: true }),
        ];
        assert_eq!(link_record(&w, false, 0), Some(4));
        assert_eq!(link_record(&w, true, 4), Some(5));
        assert_eq!(link_record(&w, true, 6), None);
        // The refusal journaled before the link record starts the period.
        assert_eq!(down_start(&w), Some(1));
        // A refusal for another reason does not.
        let w2 = vec![
            refused(Refusal::BusMasterDisabled),
            rec(Event::Link { up: false }),
        ];
        assert_eq!(down_start(&w2), Some(1));
        assert_eq!(down_start(&w2[..1]), None);
    }

    #[test]
    fn test_summary() {
        let d = |m| Duration::from_millis(m);
        assert_eq!(
            summary(&[d(30), d(10), d(20)]),
            "min 10.0 ms / median 20.0 ms / max 30.0 ms"
        );
        assert_eq!(summary(&[]), "none");
    }
}
