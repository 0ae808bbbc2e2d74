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

fn h1_hot_add(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let id = hotplug_device(ctx)?;
    if locate(ctx, &id)?.is_some() {
        let t = unplug(ctx, &id)?;
        ctx.diag(&format!("setup: {id} was plugged; removed it ({})", ms(t)));
    }
    // What one guest command costs, to read the hot-add latency against.
    let t = Instant::now();
    sh_output(ctx, "true")?;
    let agent_rt = t.elapsed();
    let (info, took) = match plug(ctx, &id) {
        Ok(p) => p,
        Err(HostError::Step(why)) => {
            ctx.fail(&format!("device_add {id}: the guest enumerates it"), &why);
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let bdf = info.bdf();
    ctx.diag(&format!(
        "one guest command costs {} from the host (included in the hot-add latency)",
        ms(agent_rt)
    ));
    ctx.progress(&format!("hot-add → probed (sysfs) {}", ms(took)));
    ctx.pass(&format!(
        "device_add {id}: the guest enumerates it at {bdf} (hot-add → probed {})",
        ms(took)
    ));
    ctx.check(
        &format!("QEMU places {id} behind its hot-add port"),
        info.parent.is_some(),
        "no parent bridge in query-pci",
    );
    let argv = ctx.guest_argv("e1", &id, &["--bdf", &bdf])?;
    ctx.guest_test(&format!("{id} at {bdf} passes E1"), &argv)?;
    let msi = msi_applies(ctx, &id)?;
    if msi {
        check_msi_cap(ctx, &id, &bdf)?;
    }
    let argv = ctx.guest_argv("e2", &id, &["--bdf", &bdf])?;
    ctx.guest_test(&format!("BAR access: {id} at {bdf} passes E2"), &argv)?;
    if msi {
        check_msi_delivery(ctx, &id, &bdf)?;
    }
    let (driver, bind_took) = sysfs::bind_vfio(ctx, &bdf)?;
    ctx.check(
        &format!(
            "vfio-pci binds {bdf} through driver_override (guest {})",
            ms(bind_took)
        ),
        driver == "vfio-pci",
        format!("driver after drivers_probe: {driver:?}"),
    );
    Ok(())
}

/// The offset of capability `cap_id` in a device description (`capabilities[].{id,offset}`).
fn described_cap(description: &Value, cap_id: u64) -> Option<u64> {
    description
        .get("capabilities")?
        .as_array()?
        .iter()
        .find(|c| c.get("id").and_then(Value::as_u64) == Some(cap_id))?
        .get("offset")?
        .as_u64()
}

/// Whether H1's MSI checks apply to a device served with `opts` that does (or does not)
/// describe an MSI capability: they follow from the profile, not from what the device happens
/// to describe. `irq=msi` requires MSI (a device without the capability is an error, never a
/// skip); a device with MSI described is checked whatever the profile says; otherwise (MSI-X)
/// they do not apply.
fn msi_required(opts: &[String], described: bool) -> Result<bool, String> {
    let profile_says_msi = opts.iter().any(|o| o == "irq=msi");
    match (profile_says_msi, described) {
        (true, false) => Err(
            "the profile serves it with irq=msi, but it describes no MSI capability".to_string(),
        ),
        (_, described) => Ok(described),
    }
}

/// Whether H1's MSI checks apply to `id` ([`msi_required`]); a contradiction between the
/// profile and the device is an error.
fn msi_applies(ctx: &mut HostCtx<'_>, id: &str) -> Result<bool, HostError> {
    let described = described_cap(&ctx.device(id)?.description.raw, 0x05).is_some();
    let opts = ctx
        .profile()
        .devices
        .iter()
        .find(|d| d.id == id)
        .map(|d| d.opts.clone())
        .ok_or_else(|| HostError::NoDevice(id.to_string()))?;
    let applies =
        msi_required(&opts, described).map_err(|why| HostError::Step(format!("{id}: {why}")))?;
    if !applies {
        ctx.diag(&format!(
            "{id} is served with MSI-X (no irq=msi in the profile) and describes no MSI \
             capability: the MSI checks do not apply"
        ));
    }
    Ok(applies)
}

/// The guest (through QEMU's MSI emulation) sees the MSI capability where the device describes
/// it, with the Message Control the function advertises (vectors, 64-bit, per-vector masking)
/// and MSI disabled.
fn check_msi_cap(ctx: &mut HostCtx<'_>, id: &str, bdf: &str) -> Result<(), HostError> {
    let raw = ctx.device(id)?.description.raw.clone();
    let Some(at) = described_cap(&raw, 0x05) else {
        return Err(HostError::Step(format!("{id} describes no MSI capability")));
    };
    let out = ctx.sh(&format!(
        "od -An -tx1 -j{at} -N4 /sys/bus/pci/devices/{bdf}/config"
    ))?;
    let b: Vec<u8> = out
        .split_whitespace()
        .filter_map(|x| u8::from_str_radix(x, 16).ok())
        .collect();
    let control = match b.as_slice() {
        [0x05, _, lo, hi] => Some(u16::from_le_bytes([*lo, *hi])),
        _ => None,
    };
    let vectors = control.map(|c| 1u32 << ((c >> 1) & 7));
    ctx.check(
        &format!(
            "the guest sees MSI at {at:#x}: {} vectors requested, 64-bit, per-vector masking, disabled",
            vectors.unwrap_or(0)
        ),
        control.is_some_and(|c| c & 0x0181 == 0x0180),
        format!("config bytes {at:#x}..+4: {}", out.trim()),
    );
    Ok(())
}

/// The doorbells H1's E3 rings over MSI (when the guest enables fewer vectors than the
/// capability offers, e.g. one without interrupt remapping, 1 and 5 fold onto them: docs/pci.md).
const H1_MSI_VECTORS: &str = "0,1,5";

/// MSI delivery in the guest: E3 with `--irq msi` through a guest vfio user, and the device's
/// journal of the step: one `interrupt` record `delivered` per doorbell, nothing held back.
fn check_msi_delivery(ctx: &mut HostCtx<'_>, id: &str, bdf: &str) -> Result<(), HostError> {
    let name = "MSI delivery in the guest through vfio-pci";
    let mark = ctx.control().last_seq(id)?;
    let argv = ctx.guest_argv(
        "e3",
        id,
        &["--bdf", bdf, "--irq", "msi", "--vectors", H1_MSI_VECTORS],
    )?;
    ctx.guest_test(&format!("{name}: {id} at {bdf} passes E3 --irq msi"), &argv)?;
    let w = ctx.window(id, mark)?.records;
    let doorbells = H1_MSI_VECTORS.split(',').count();
    let delivered = count_records(&w, |e| {
        matches!(
            e,
            Event::Interrupt {
                outcome: InterruptOutcome::Delivered,
                ..
            }
        )
    });
    let held: Vec<String> = w
        .iter()
        .filter_map(|r| match &r.event {
            Event::Interrupt { vector, outcome } if *outcome != InterruptOutcome::Delivered => {
                Some(format!("vector {vector} {outcome}"))
            }
            _ => None,
        })
        .collect();
    ctx.check(
        &format!(
            "{id} journaled the {doorbells} doorbells as MSI delivered ({delivered} delivered, none held back)"
        ),
        delivered == doorbells && held.is_empty(),
        format!(
            "{delivered} delivered interrupt records, expected {doorbells}; others: {}",
            if held.is_empty() { "none".into() } else { held.join(", ") }
        ),
    );
    Ok(())
}

fn h2_hot_remove(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let id = hotplug_device(ctx)?;
    let bdf = ensure_bound(ctx, &id)?;
    ctx.pass(&format!("{id} at {bdf} is plugged with vfio-pci bound"));
    let took = unplug(ctx, &id)?;
    ctx.progress(&format!("device_del → DEVICE_DELETED {}", ms(took)));
    ctx.pass(&format!("device_del {id} → DEVICE_DELETED in {}", ms(took)));
    thread::sleep(Duration::from_millis(200));
    ctx.check_qemu()?;
    ctx.pass("QEMU lives on after the unplug");
    let gone = sysfs::wait(ctx, &bdf, false, Duration::from_secs(10))?;
    ctx.check(
        &format!("the guest's sysfs entry {bdf} is gone"),
        gone,
        "still in /sys/bus/pci/devices 10 s after DEVICE_DELETED",
    );
    let listed = locate(ctx, &id)?;
    ctx.check(
        &format!("QEMU no longer lists {id}"),
        listed.is_none(),
        "still in query-pci",
    );
    let detached = wait_detached(ctx, &id)?;
    ctx.check(
        "the server saw the client go (no client attached)",
        detached,
        format!(
            "the server still reports a client {} s later",
            DETACH_TIMEOUT.as_secs()
        ),
    );
    let records = ctx.journal(&id)?;
    let disc = records
        .iter()
        .position(|r| r.event == Event::ClientDisconnected);
    ctx.check(
        &format!("{id} journaled client_disconnected"),
        disc.is_some(),
        "no client_disconnected since the scenario started",
    );
    let lost = |want: Event| disc.and_then(|d| records[d..].iter().position(|r| r.event == want));
    ctx.check(
        &format!("{id} journaled a lost-connection reset after it"),
        lost(Event::ResetBegin {
            kind: ResetKind::LostConnection,
        })
        .is_some()
            && lost(Event::ResetEnd {
                kind: ResetKind::LostConnection,
            })
            .is_some(),
        "no reset_begin/reset_end kind=lost-connection after client_disconnected",
    );
    Ok(())
}

fn summary(ds: &[Duration]) -> String {
    let mut v: Vec<Duration> = ds.to_vec();
    v.sort();
    match (v.first(), v.get(v.len() / 2), v.last()) {
        (Some(min), Some(med), Some(max)) => {
            format!("min {} / median {} / max {}", ms(*min), ms(*med), ms(*max))
        }
        _ => "none".into(),
    }
}

/// H3's running count of journal records.
#[derive(Debug, Default)]
struct Tally {
    after: u64,
    conn: usize,
    disc: usize,
    lost: usize,
    mapped: usize,
    unmapped: usize,
}

impl Tally {
    /// Counts the records since the previous read (an incomplete window is an error: the
    /// counts would be short).
    fn read(&mut self, ctx: &mut HostCtx<'_>, id: &str) -> Result<(), HostError> {
        let w = ctx.window(id, self.after)?;
        let r = &w.records;
        self.conn += count_records(r, |e| *e == Event::ClientConnected);
        self.disc += count_records(r, |e| *e == Event::ClientDisconnected);
        self.lost += count_records(r, |e| {
            *e == Event::ResetEnd {
                kind: ResetKind::LostConnection,
            }
        });
        self.mapped += count_records(r, |e| matches!(e, Event::DmaMapped { .. }));
        self.unmapped += count_records(r, |e| matches!(e, Event::DmaUnmapped { .. }));
        self.after = w.next_after;
        Ok(())
    }
}

fn h3_add_remove_cycles(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let id = hotplug_device(ctx)?;
    if locate(ctx, &id)?.is_some() {
        let t = unplug(ctx, &id)?;
        ctx.diag(&format!("setup: {id} was plugged; removed it ({})", ms(t)));
    }
    let control = ctx.control().path().to_path_buf();
    let Some(pid) = server_pid(&control) else {
        return Err(HostError::Step(format!(
            "no `pcisim serve` process with --control {}",
            control.display()
        )));
    };
    if !wait_detached(ctx, &id)? {
        return Err(HostError::Step(format!(
            "setup: the server still has a client on {id}"
        )));
    }
    // The device journal is a ring of up to 4096 records that grows to its bound over the
    // first ~80 cycles (~1 MiB of RSS): fill it first (link-down/link-up pairs of the idle
    // device) so that what is measured is the cycles, not the journal reaching its bound.
    let initial = usage(pid).map_err(HostError::Step)?;
    let t = Instant::now();
    for _ in 0..JOURNAL_FILL_PAIRS {
        ctx.inject(&id, "link-down")?;
        ctx.inject(&id, "link-up")?;
    }
    ctx.diag(&format!(
        "server (pid {pid}) at the start: {initial}; filled {id}'s journal ring with {} \
         link records in {}",
        2 * JOURNAL_FILL_PAIRS,
        ms(t.elapsed())
    ));
    let mut before = usage(pid).map_err(HostError::Step)?;
    let mut curve = Vec::new();
    let total = H3_WARMUP + H3_CYCLES;
    let (mut adds, mut dels, mut users) = (Vec::new(), Vec::new(), Vec::new());
    // The journal ring holds a few thousand records (fewer than 100 cycles make): it is read
    // as the cycles go.
    let mut tally = Tally {
        after: ctx.control().last_seq(&id)?,
        ..Tally::default()
    };
    for cycle in 1..=total {
        let name =
            format!("cycle {cycle}: device_add, probed, vfio user with DMA, device_del, detached");
        let (info, add) = match plug(ctx, &id) {
            Ok(p) => p,
            Err(HostError::Step(why)) => {
                ctx.fail(&name, &why);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let bdf = info.bdf();
        let kib = H3_DMA_KIB.to_string();
        let argv = ctx.guest_argv(
            "vfio-user",
            &id,
            &["--bdf", &bdf, "--dma-kib", &kib, "--req", "off"],
        )?;
        let t = Instant::now();
        let out = ctx.guest(&argv)?;
        let user = t.elapsed();
        if out.exit != Some(0) {
            for l in out.stdout.lines().filter(|l| l.contains("not ok")) {
                ctx.diag(l);
            }
            ctx.fail(
                &name,
                &format!(
                    "the guest vfio user failed on {bdf} (exit {:?}): {}",
                    out.exit,
                    out.stderr.trim()
                ),
            );
            return Ok(());
        }
        users.push(user);
        let del = unplug(ctx, &id)?;
        let gone = sysfs::wait(ctx, &bdf, false, Duration::from_secs(10))?;
        let detached = wait_detached(ctx, &id)?;
        if cycle % 10 == 0 {
            tally.read(ctx, &id)?;
        }
        if cycle == H3_WARMUP {
            thread::sleep(Duration::from_millis(200));
            before = usage(pid).map_err(HostError::Step)?;
        }
        if cycle % 10 == 0 {
            curve.push(usage(pid).map_err(HostError::Step)?.rss_kib.to_string());
        }
        if cycle % 10 == 0 || cycle == 1 {
            ctx.progress(&format!(
                "cycle {cycle}/{total}: probed {}, vfio user {}, DEVICE_DELETED {}",
                ms(add),
                ms(user),
                ms(del)
            ));
        }
        adds.push(add);
        dels.push(del);
        if !ctx.check(
            &format!("{name} ({} / {})", ms(add), ms(del)),
            gone && detached,
            match (gone, detached) {
                (false, _) => "the guest still lists the device",
                _ => "the server still reports a client",
            },
        ) {
            return Ok(());
        }
    }
    // Let the last lost-connection reset finish before measuring.
    thread::sleep(Duration::from_millis(200));
    let after = usage(pid).map_err(HostError::Step)?;
    tally.read(ctx, &id)?;
    ctx.diag(&format!("hot-add → probed: {}", summary(&adds)));
    ctx.diag(&format!("device_del → DEVICE_DELETED: {}", summary(&dels)));
    ctx.diag(&format!(
        "guest vfio user (bind, open, map {H3_DMA_KIB} KiB, unmap, unbind): {}",
        summary(&users)
    ));
    ctx.progress(&format!(
        "hot-add → probed {}; device_del → DEVICE_DELETED {}",
        summary(&adds),
        summary(&dels)
    ));
    ctx.diag(&format!(
        "server (pid {pid}) before (after {H3_WARMUP} warm-up cycles): {before}"
    ));
    ctx.diag(&format!(
        "server RSS every 10 cycles (KiB): {} (the first {H3_WARMUP} cycles are a warm-up: \
         allocator arenas and the journal's records settle)",
        curve.join(" ")
    ));
    ctx.diag(&format!("server (pid {pid}) after:  {after}"));
    ctx.progress(&format!(
        "server at the start {initial}; after {H3_WARMUP} warm-up cycles {before}; {H3_CYCLES} cycles later {after}"
    ));
    ctx.check(
        &format!(
            "no fd leak: equal over all {total} cycles ({} → {} → {})",
            initial.fds, before.fds, after.fds
        ),
        after.fds <= initial.fds + FD_TOLERANCE && before.fds == initial.fds,
        format!("{} → {} → {} open fds", initial.fds, before.fds, after.fds),
    );
    ctx.check(
        &format!(
            "no thread leak: equal over all {total} cycles ({} → {} → {})",
            initial.threads, before.threads, after.threads
        ),
        after.threads <= initial.threads + THREAD_TOLERANCE && before.threads == initial.threads,
        format!(
            "{} → {} → {} threads",
            initial.threads, before.threads, after.threads
        ),
    );
    ctx.check(
        &format!(
            "RSS does not grow over {H3_CYCLES} cycles ({} → {} KiB, tolerance {RSS_TOLERANCE_KIB} KiB)",
            before.rss_kib, after.rss_kib
        ),
        after.rss_kib <= before.rss_kib + RSS_TOLERANCE_KIB,
        format!("{} → {} KiB", before.rss_kib, after.rss_kib),
    );
    let Tally {
        conn,
        disc,
        lost,
        mapped,
        unmapped,
        ..
    } = tally;
    ctx.check(
        &format!("{id} journaled {total} connects, disconnects and lost-connection resets"),
        conn == total && disc == total && lost == total,
        format!(
            "{conn} client_connected, {disc} client_disconnected, {lost} lost-connection resets"
        ),
    );
    let pages = H3_DMA_KIB / 4;
    ctx.check(
        &format!(
            "{id} journaled the guest's DMA mappings: {mapped} DMA_MAPs, {unmapped} DMA_UNMAPs \
             (at least {pages} per cycle, all torn down)"
        ),
        mapped >= pages * total && unmapped >= pages * total,
        format!("{mapped} dma_mapped, {unmapped} dma_unmapped records"),
    );
    Ok(())
}

/// Plugs `id` if it is not plugged and leaves it without a driver bound; returns its BDF.
fn ensure_plugged_unbound(ctx: &mut HostCtx<'_>, id: &str) -> Result<String, HostError> {
    let bdf = match locate(ctx, id)? {
        Some(info) => info.bdf(),
        None => plug(ctx, id)?.0.bdf(),
    };
    sh_output(
        ctx,
        &format!(
            "d=/sys/bus/pci/devices/{bdf}; [ -e $d/driver ] && echo {bdf} > $d/driver/unbind; \
             echo > $d/driver_override; true"
        ),
    )?;
    Ok(bdf)
}

/// Starts `pcisim-guest vfio-user ... --req MODE` in the background in the guest and waits
/// until it holds the device (its ready file); returns its pid.
fn start_holder(
    ctx: &mut HostCtx<'_>,
    id: &str,
    bdf: &str,
    mode: &str,
    tag: &str,
) -> Result<u32, HostError> {
    let argv = ctx.guest_argv(
        "vfio-user",
        id,
        &[
            "--bdf",
            bdf,
            "--req",
            mode,
            "--ready-file",
            &format!("/tmp/{tag}.ready"),
            "--wait-s",
            "300",
        ],
    )?;
    let out = sh_output(
        ctx,
        &format!(
            "rm -f /tmp/{tag}.ready; {} > /tmp/{tag}.out 2>&1 < /dev/null & echo $!",
            argv.iter()
                .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    )?;
    let pid: u32 = out.stdout.trim().parse().map_err(|_| {
        HostError::Step(format!(
            "no pid from the background start: {:?}",
            out.stdout
        ))
    })?;
    let ready = sh_output(
        ctx,
        &format!(
            "n=0; while [ ! -e /tmp/{tag}.ready ]; do kill -0 {pid} 2>/dev/null || exit 2; \
             n=$((n+1)); [ $n -ge 3000 ] && exit 1; usleep 10000; done"
        ),
    )?;
    if ready.exit != Some(0) {
        let log = sh_output(ctx, &format!("cat /tmp/{tag}.out"))?.stdout;
        for l in log.lines() {
            ctx.diag(l);
        }
        return Err(HostError::Step(format!(
            "the guest vfio user ({mode}) did not get ready (exit {:?})",
            ready.exit
        )));
    }
    Ok(pid)
}

/// Waits (up to 30 s) for guest process `pid` to end; returns its output file.
fn wait_holder(ctx: &mut HostCtx<'_>, pid: u32, tag: &str) -> Result<(bool, String), HostError> {
    let out = sh_output(
        ctx,
        &format!(
            "n=0; while kill -0 {pid} 2>/dev/null; do n=$((n+1)); [ $n -ge 3000 ] && exit 1; \
             usleep 10000; done"
        ),
    )?;
    let log = sh_output(ctx, &format!("cat /tmp/{tag}.out"))?.stdout;
    Ok((out.exit == Some(0), log))
}

fn h4_remove_while_held(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let id = hotplug_device(ctx)?;
    // Cooperative: the holder releases on REQ.
    let bdf = ensure_plugged_unbound(ctx, &id)?;
    let pid = start_holder(ctx, &id, &bdf, "release", "h4a")?;
    ctx.pass(&format!(
        "a guest vfio user (pid {pid}) holds {id} at {bdf} with a DMA buffer mapped and watches REQ"
    ));
    let took = unplug(ctx, &id)?;
    ctx.progress(&format!(
        "cooperative holder: device_del → DEVICE_DELETED {}",
        ms(took)
    ));
    ctx.pass(&format!(
        "device_del {id} → DEVICE_DELETED in {} (the holder released)",
        ms(took)
    ));
    let (ended, log) = wait_holder(ctx, pid, "h4a")?;
    let got_req = log.contains("REQ fired") && log.contains("released the device");
    for l in log
        .lines()
        .filter(|l| l.contains("REQ") || l.starts_with("not ok"))
    {
        ctx.diag(l.trim_start_matches("# "));
    }
    ctx.check(
        "the holder received the device request (REQ eventfd), released and exited",
        ended && got_req,
        format!("ended: {ended}; output: {}", log.replace('\n', " | ")),
    );
    let gone = sysfs::wait(ctx, &bdf, false, Duration::from_secs(10))?;
    let detached = wait_detached(ctx, &id)?;
    ctx.check(
        "the guest's sysfs entry is gone and the server saw the client go",
        gone && detached,
        format!("sysfs gone: {gone}; server detached: {detached}"),
    );

    // Uncooperative: the holder ignores REQ until it is killed.
    let bdf = ensure_plugged_unbound(ctx, &id)?;
    let pid = start_holder(ctx, &id, &bdf, "ignore", "h4b")?;
    sh_output(ctx, "dmesg -c > /dev/null; true")?;
    ctx.pass(&format!(
        "an uncooperative guest vfio user (pid {pid}) holds {id} at {bdf} and ignores REQ"
    ));
    let mark = ctx.qmp().event_mark();
    ctx.qmp()
        .execute("device_del", Some(serde_json::json!({ "id": id })))?;
    let t = Instant::now();
    let is_ours = |e: &crate::vm::qmp::QmpEvent| {
        e.data.get("device").and_then(Value::as_str) == Some(id.as_str())
    };
    let early = match ctx
        .qmp()
        .wait_event_since(mark, "DEVICE_DELETED", is_ours, H4_PENDING)
    {
        Ok(_) => true,
        Err(QmpError::Timeout { .. }) => false,
        Err(e) => return Err(e.into()),
    };
    ctx.check(
        &format!(
            "the removal stays pending while the program holds the device ({} s, no DEVICE_DELETED)",
            H4_PENDING.as_secs()
        ),
        !early,
        format!("DEVICE_DELETED after {}", ms(t.elapsed())),
    );
    if early {
        return Ok(());
    }
    // vfio-pci signals the REQ eventfd every 10 s but logs only every 10th relay (#0, #10..).
    let kmsg = sh_output(ctx, "dmesg | grep -i 'device request'; true")?.stdout;
    let logged = kmsg
        .lines()
        .filter(|l| l.contains("Relaying device request"))
        .count();
    for l in kmsg.lines().take(4) {
        ctx.diag(&format!("kmsg: {}", l.trim()));
    }
    let held = sh_output(ctx, "cat /tmp/h4b.out")?.stdout;
    let reqs = held.lines().filter(|l| l.contains("REQ fired")).count();
    for l in held.lines().filter(|l| l.contains("REQ fired")) {
        ctx.diag(&format!("holder: {}", l.trim_start_matches("# ")));
    }
    ctx.check(
        &format!(
            "the guest kernel relays the request to the holder every 10 s ({reqs} REQs received, \
             relay logged in dmesg)"
        ),
        logged >= 1 && reqs >= 2,
        format!("{reqs} REQs received; {logged} 'Relaying device request' lines in dmesg"),
    );
    ctx.check_qemu()?;
    let listed = locate(ctx, &id)?.is_some();
    ctx.check(
        &format!("QEMU still lists {id} while the removal is pending"),
        listed,
        "gone from query-pci",
    );
    let t = Instant::now();
    sh_output(ctx, &format!("kill -9 {pid}"))?;
    let r = ctx
        .qmp()
        .wait_event_since(mark, "DEVICE_DELETED", is_ours, DELETE_TIMEOUT);
    let done = match r {
        Ok(_) => true,
        Err(QmpError::Timeout { .. }) => false,
        Err(e) => return Err(e.into()),
    };
    let took = t.elapsed();
    ctx.progress(&format!(
        "uncooperative holder: kill → DEVICE_DELETED {}",
        ms(took)
    ));
    ctx.check(
        &format!(
            "the agent kills the holder: the removal completes (DEVICE_DELETED {} after the kill)",
            ms(took)
        ),
        done,
        format!(
            "no DEVICE_DELETED within {} s of the kill",
            DELETE_TIMEOUT.as_secs()
        ),
    );
    let gone = sysfs::wait(ctx, &bdf, false, Duration::from_secs(10))?;
    let detached = wait_detached(ctx, &id)?;
    ctx.check(
        "the guest's sysfs entry is gone and the server saw the client go",
        gone && detached,
        format!("sysfs gone: {gone}; server detached: {detached}"),
    );
    let records = ctx.journal(&id)?;
    let disc = count_records(&records, |e| *e == Event::ClientDisconnected);
    ctx.check(
        &format!("{id} journaled client_disconnected for both removals"),
        disc >= 2,
        format!("{disc} client_disconnected"),
    );
    Ok(())
}

/// `pcisim-guest bar-io` at `bdf`'s BAR0: writes `write` (offset, value) first, then reads
/// `offs`; returns the values read.
fn bar_io(
    ctx: &mut HostCtx<'_>,
    bdf: &str,
    offs: &[u64],
    write: Option<(u64, u32)>,
) -> Result<Vec<u32>, HostError> {
    let mut list: Vec<String> = Vec::new();
    if let Some((o, _)) = write {
        list.push(format!("{o:#x}"));
    }
    list.extend(offs.iter().map(|o| format!("{o:#x}")));
    let mut argv: Vec<String> = [
        crate::harness::scenario::GUEST_BIN_PATH,
        "bar-io",
        "--bdf",
        bdf,
    ]
    .map(str::to_string)
    .to_vec();
    argv.push("--off".into());
    argv.push(list.join(","));
    if let Some((_, v)) = write {
        argv.push("--write".into());
        argv.push(format!("{v:#x}"));
    }
    let out = ctx.guest(&argv)?;
    if out.exit != Some(0) {
        return Err(HostError::Step(format!(
            "bar-io on {bdf} failed: {}",
            out.stderr.trim()
        )));
    }
    let vals: Vec<u32> = out
        .stdout
        .lines()
        .filter_map(|l| l.split_once('=')?.1.strip_prefix("0x"))
        .filter_map(|v| u32::from_str_radix(v, 16).ok())
        .collect();
    let skip = usize::from(write.is_some());
    if vals.len() != offs.len() + skip {
        return Err(HostError::Step(format!("bar-io output: {:?}", out.stdout)));
    }
    Ok(vals[skip..].to_vec())
}

/// Config dword 0 (vendor and device ID) and the Command register as the guest reads them
/// from sysfs `config`.
fn config_ids(ctx: &mut HostCtx<'_>, bdf: &str) -> Result<(u32, u32), HostError> {
    let out = ctx.sh(&format!(
        "od -An -tx4 -N8 /sys/bus/pci/devices/{bdf}/config"
    ))?;
    let w: Vec<u32> = out
        .split_whitespace()
        .filter_map(|x| u32::from_str_radix(x, 16).ok())
        .collect();
    match w.as_slice() {
        [a, b] => Ok((*a, *b)),
        _ => Err(HostError::Step(format!("config read: {out:?}"))),
    }
}

/// Where H5's guest stream keeps its files (`.out`, `.err`, `.pid`, `.rc`, `.ready`, `.down`).
const H5_STREAM: &str = "/tmp/h5-stream";
/// How long the guest stream waits for the link to come back before it gives up.
const H5_DOWN_WAIT_S: u64 = 30;
/// How long H5 waits for each of the guest stream's steps (ready, link down seen, the end).
const H5_STEP: Duration = Duration::from_secs(60);

/// Waits (10 ms steps, at most `limit`) until the guest file `path` exists; `Ok(false)` if it
/// did not appear, or the stream program ended first (its `.rc` exists).
fn wait_guest_file(ctx: &mut HostCtx<'_>, path: &str, limit: Duration) -> Result<bool, HostError> {
    let steps = (limit.as_millis() / 10).max(1);
    let out = sh_output(
        ctx,
        &format!(
            "n=0; while [ ! -e {path} ]; do [ -e {H5_STREAM}.rc ] && exit 2; n=$((n+1)); \
             [ $n -ge {steps} ] && exit 1; usleep 10000; done; exit 0"
        ),
    )?;
    Ok(out.exit == Some(0))
}

/// The position of the first `link` record with `up` after `from`.
fn link_record(records: &[Record], up: bool, from: usize) -> Option<usize> {
    records
        .iter()
        .skip(from)
        .position(|r| r.event == Event::Link { up })
        .map(|p| p + from)
}

/// A DMA refused because the link is down.
fn refused_link_down(e: &Event) -> bool {
    matches!(
        e,
        Event::DmaRefused {
            reason: Refusal::LinkDown,
            ..
        }
    )
}

/// An interrupt held back because the link is down.
fn held_link_down(e: &Event) -> bool {
    matches!(
        e,
        Event::Interrupt {
            outcome: InterruptOutcome::Refused(Refusal::LinkDown),
            ..
        }
    )
}

/// Where the link-down period starts in `records` (a window that began with the link up): at
/// the first access refused because of it, or at the `link` record. A disabling change is
/// journaled after the accesses already past the bus's gate drained (docs/journal.md), so the
/// engine's first refused access (and the ring error and held interrupt it causes) may come
/// just before the `link` record.
fn down_start(records: &[Record]) -> Option<usize> {
    let link = link_record(records, false, 0)?;
    let refused = records[..link]
        .iter()
        .position(|r| refused_link_down(&r.event) || held_link_down(&r.event));
    Some(refused.unwrap_or(link))
}

fn t_ms(r: &Record) -> f64 {
    r.t_ns as f64 / 1e6
}

/// H5 with DMA in flight (see [`H5`]): starts the guest stream, pulls the link while it runs,
/// brings it back, waits for the program to end and checks the journal window.
fn h5_dma_across_link_down(ctx: &mut HostCtx<'_>, id: &str, bdf: &str) -> Result<(), HostError> {
    let raw = ctx.device(id)?.description.raw.clone();
    let irq = if described_cap(&raw, 0x05).is_some() {
        "msi"
    } else {
        "msix"
    };
    let down_wait = H5_DOWN_WAIT_S.to_string();
    let argv = ctx.guest_argv(
        "dma-stream",
        id,
        &[
            "--bdf",
            bdf,
            "--irq",
            irq,
            "--ready-file",
            &format!("{H5_STREAM}.ready"),
            "--down-file",
            &format!("{H5_STREAM}.down"),
            "--down-wait-s",
            &down_wait,
        ],
    )?;
    let cmd = argv
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ");
    let mark = ctx.control().last_seq(id)?;
    // The program in the background, its pid and exit status in files (the subshell waits).
    sh_output(
        ctx,
        &format!(
            "rm -f {H5_STREAM}.*; ( {cmd} > {H5_STREAM}.out 2> {H5_STREAM}.err < /dev/null & \
             echo $! > {H5_STREAM}.pid; wait $!; echo $? > {H5_STREAM}.rc ) \
             > /dev/null 2>&1 < /dev/null &"
        ),
    )?;
    let t = Instant::now();
    let ready = wait_guest_file(ctx, &format!("{H5_STREAM}.ready"), H5_STEP)?;
    if !ctx.check(
        &format!("a guest vfio user streams FILLs into its own memory through {id}'s ring ({irq} interrupts)"),
        ready,
        format!("not streaming after {}", ms(t.elapsed())),
    ) {
        return h5_stream_end(ctx, id, true);
    }
    ctx.inject(id, "link-down")?;
    let t = Instant::now();
    ctx.pass(&format!(
        "pcisim ctl inject {id} link-down with the stream running"
    ));
    let seen = wait_guest_file(ctx, &format!("{H5_STREAM}.down"), H5_STEP)?;
    let took = t.elapsed();
    let what = sh_output(ctx, &format!("cat {H5_STREAM}.down 2>/dev/null; true"))?.stdout;
    ctx.progress(&format!(
        "link down: the guest stream saw it {} after the injection (agent round trip included)",
        ms(took)
    ));
    ctx.check(
        &format!(
            "the guest program sees the device gone (all-ones) instead of hanging ({} after link-down): {}",
            ms(took),
            what.trim()
        ),
        seen,
        format!("nothing seen within {} s", H5_STEP.as_secs()),
    );
    // Let the engine reach its next access (refused) before the link comes back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let w = ctx.window(id, mark)?.records;
        let refused =
            down_start(&w).is_some_and(|d| w[d..].iter().any(|r| refused_link_down(&r.event)));
        if refused || Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    ctx.inject(id, "link-up")?;
    h5_stream_end(ctx, id, false)?;
    h5_check_window(ctx, id, mark)
}

/// Waits for the guest stream to end (killing it after [`H5_STEP`]), nests its KTAP and shows
/// its stderr if it failed. `kill` ends it at once (it is not going to finish).
fn h5_stream_end(ctx: &mut HostCtx<'_>, id: &str, kill: bool) -> Result<(), HostError> {
    let t = Instant::now();
    let ended = !kill && wait_guest_file(ctx, &format!("{H5_STREAM}.rc"), H5_STEP)?;
    if !ended {
        sh_output(
            ctx,
            &format!(
                "kill -9 $(cat {H5_STREAM}.pid) 2>/dev/null; n=0; while [ ! -e {H5_STREAM}.rc ]; \
                 do n=$((n+1)); [ $n -ge 500 ] && break; usleep 10000; done; true"
            ),
        )?;
    }
    if !kill {
        ctx.check(
            &format!(
                "the guest program ends by itself after link-up ({})",
                ms(t.elapsed())
            ),
            ended,
            format!(
                "still running {} s after link-up: killed",
                H5_STEP.as_secs()
            ),
        );
    }
    let verdict = ctx.guest_test(
        &format!("the guest vfio user's report ({id}: stream, link down, link up, ring, release)"),
        &[
            "/bin/busybox".to_string(),
            "sh".into(),
            "-c".into(),
            format!("cat {H5_STREAM}.out; exit $(cat {H5_STREAM}.rc 2>/dev/null || echo 1)"),
        ],
    )?;
    if verdict != crate::harness::scenario::Verdict::Pass {
        let err = sh_output(ctx, &format!("tail -n 10 {H5_STREAM}.err; true"))?.stdout;
        for l in err.lines().filter(|l| !l.trim().is_empty()) {
            ctx.diag(&format!("stderr: {l}"));
        }
    }
    Ok(())
}

/// The journal window of the stream: DMA before link-down; refusals and nothing sent while
/// down; the held error interrupt after link-up; no violation.
fn h5_check_window(ctx: &mut HostCtx<'_>, id: &str, mark: u64) -> Result<(), HostError> {
    // Records evicted from the ring before they were read (a flood: the stream does not fill
    // it, a device working while down does) end the scenario: "journal window incomplete".
    let w = ctx.window(id, mark)?.records;
    let (Some(start), Some(down)) = (down_start(&w), link_record(&w, false, 0)) else {
        ctx.fail(
            &format!("{id} journaled the link going down and up"),
            "no link down record",
        );
        return Ok(());
    };
    let up = link_record(&w, true, down).unwrap_or(w.len());
    let (before, during) = (&w[..start], &w[start..up]);
    let after = w.get(up + 1..).unwrap_or(&[]);
    if start < down {
        ctx.diag(&format!(
            "the first refusal was journaled {:.2} ms before the link record ({} record(s) \
             earlier: a disabling change is journaled once the accesses in flight drained)",
            t_ms(&w[down]) - t_ms(&w[start]),
            down - start
        ));
    }
    let writes: Vec<(&Record, u64)> = before
        .iter()
        .filter_map(|r| match r.event {
            Event::Dma {
                dir: Dir::Write,
                bytes,
                ..
            } => Some((r, bytes)),
            _ => None,
        })
        .collect();
    let bytes: u64 = writes.iter().map(|(_, b)| b).sum();
    let last_write = writes
        .last()
        .map(|(r, _)| t_ms(&w[down]) - t_ms(r))
        .unwrap_or(f64::NAN);
    ctx.check(
        &format!(
            "before link-down: {} DMA writes ({} MiB) into the guest's buffer, the last journaled {last_write:.2} ms before the link record",
            writes.len(),
            bytes >> 20
        ),
        !writes.is_empty(),
        "no DMA write before the link went down",
    );
    let refused = count_records(during, refused_link_down);
    let dma = count_records(during, |e| matches!(e, Event::Dma { .. }));
    let sent: Vec<String> = during
        .iter()
        .filter_map(|r| match &r.event {
            Event::Interrupt { outcome, .. }
                if !matches!(outcome, InterruptOutcome::Refused(_)) =>
            {
                Some(outcome.to_string())
            }
            _ => None,
        })
        .collect();
    let held = count_records(during, held_link_down);
    let stopped = during.iter().any(|r| {
        matches!(
            r.event,
            Event::RingError {
                code: RingErrorCode::DmaRefused,
                ..
            }
        )
    });
    let first_refusal = during
        .iter()
        .find(|r| matches!(r.event, Event::DmaRefused { .. }))
        .map(|r| format!("{:+.2} ms", t_ms(r) - t_ms(&w[down])))
        .unwrap_or_else(|| "none".into());
    let down_for = if up < w.len() {
        format!("{:.0} ms", t_ms(&w[up]) - t_ms(&w[down]))
    } else {
        "no link-up record".into()
    };
    ctx.progress(&format!(
        "H5 stream: last DMA write {last_write:.2} ms before the link record, first refusal at {first_refusal}, link down {down_for}"
    ));
    ctx.check(
        &format!(
            "link down ({down_for}): the ring's next access refused ({refused} dma_refused link_down, the first at {first_refusal} from the link record; ring stopped: {stopped}), no DMA, no interrupt sent ({held} held back)"
        ),
        up < w.len() && refused >= 1 && stopped && dma == 0 && sent.is_empty(),
        format!(
            "link-up journaled: {}; {refused} refusals, ring_error dma_refused: {stopped}, {dma} dma records, interrupts sent: {sent:?}",
            up < w.len()
        ),
    );
    let flushed = after.iter().any(|r| {
        matches!(
            r.event,
            Event::PendingDelivered {
                kind: MessageKind::Msix | MessageKind::Msi,
                count: 1..,
            }
        )
    });
    ctx.check(
        &format!(
            "after link-up the error interrupt held back while the link was down ({held}) is sent"
        ),
        held >= 1 && flushed,
        format!("{held} interrupt(s) held back, no pending_delivered record after link-up"),
    );
    let violations: Vec<String> = w
        .iter()
        .filter(|r| matches!(r.event, Event::Violation { .. }))
        .map(|r| pcisim_journal::text::summarize(&r.event))
        .collect();
    ctx.check(
        &format!("{id} journaled no violation across the surprise removal (no dma_link_down, no interrupt_while_disabled)"),
        violations.is_empty(),
        violations.join("; "),
    );
    Ok(())
}

fn h5_surprise_removal(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let id = hotplug_device(ctx)?;
    let bdf = ensure_plugged_unbound(ctx, &id)?;
    h5_dma_across_link_down(ctx, &id, &bdf)?;
    // The stream's release leaves the function unbound.
    let bdf = ensure_plugged_unbound(ctx, &id)?;
    ctx.sh(&format!("echo 1 > /sys/bus/pci/devices/{bdf}/enable"))?;
    let (ids, _) = config_ids(ctx, &bdf)?;
    let before = bar_io(
        ctx,
        &bdf,
        &[gpu_regs::ID, gpu_regs::IRQ_COUNT],
        Some((gpu_regs::SCRATCH, 0x1234_5678)),
    )?;
    let (magic, irqs) = (before[0], before[1]);
    let ok_before = ids != u32::MAX && magic != u32::MAX;
    ctx.check(
        &format!("link up: {id} at {bdf} reads IDs {ids:#010x} and BAR0 ID {magic:#010x}"),
        ok_before,
        "all-ones before the fault",
    );
    if !ok_before {
        return Ok(());
    }
    let mark = ctx.control().last_seq(&id)?;
    ctx.inject(&id, "link-down")?;
    ctx.pass(&format!("pcisim ctl inject {id} link-down"));
    let (ids_down, cmd_down) = config_ids(ctx, &bdf)?;
    ctx.check(
        &format!("link down: the guest reads config all-ones ({ids_down:#010x} {cmd_down:#010x})"),
        ids_down == u32::MAX && cmd_down == u32::MAX,
        format!("config dwords 0 and 1: {ids_down:#010x} {cmd_down:#010x}"),
    );
    let down = bar_io(
        ctx,
        &bdf,
        &[gpu_regs::ID, gpu_regs::SCRATCH, gpu_regs::IRQ_COUNT],
        Some((gpu_regs::SCRATCH, 0xdead_beef)),
    )?;
    let _ = bar_io(
        ctx,
        &bdf,
        &[gpu_regs::ID],
        Some((gpu_regs::IRQ_DOORBELL, 0)),
    )?;
    ctx.check(
        &format!(
            "link down: BAR0 reads all-ones (ID {:#010x}, SCRATCH0 {:#010x}, IRQ_COUNT {:#010x})",
            down[0], down[1], down[2]
        ),
        down.iter().all(|v| *v == u32::MAX),
        format!("{down:08x?}"),
    );
    thread::sleep(Duration::from_millis(300));
    let during: Vec<Record> = ctx
        .journal(&id)?
        .into_iter()
        .filter(|r| r.seq > mark)
        .collect();
    let link_down = during.iter().any(|r| r.event == Event::Link { up: false });
    let active = count_records(&during, |e| {
        matches!(e, Event::Dma { .. } | Event::Interrupt { .. })
    });
    ctx.check(
        &format!("{id} journaled link down and no DMA or interrupt while down"),
        link_down && active == 0,
        format!("link down journaled: {link_down}; {active} dma/interrupt records"),
    );
    ctx.inject(&id, "link-up")?;
    let (ids_up, _) = config_ids(ctx, &bdf)?;
    let after = bar_io(
        ctx,
        &bdf,
        &[gpu_regs::ID, gpu_regs::SCRATCH, gpu_regs::IRQ_COUNT],
        None,
    )?;
    ctx.check(
        &format!(
            "link-up recovers: IDs {ids_up:#010x}, BAR0 ID {:#010x}, SCRATCH0 {:#010x} (the write while down was dropped), IRQ_COUNT {} (no doorbell)",
            after[0], after[1], after[2]
        ),
        ids_up == ids && after[0] == magic && after[1] == 0x1234_5678 && after[2] == irqs,
        format!(
            "expected IDs {ids:#010x}, ID {magic:#010x}, SCRATCH0 0x12345678, IRQ_COUNT {irqs}; got {ids_up:#010x} {after:08x?}"
        ),
    );

    // Surprise removal that does not come back: device_del cleans up.
    ctx.inject(&id, "link-down")?;
    let (ids_down, _) = config_ids(ctx, &bdf)?;
    ctx.check(
        "link down again: config reads all-ones",
        ids_down == u32::MAX,
        format!("{ids_down:#010x}"),
    );
    let took = unplug(ctx, &id)?;
    ctx.progress(&format!(
        "link down: device_del → DEVICE_DELETED {}",
        ms(took)
    ));
    ctx.pass(&format!(
        "device_del of the dead device → DEVICE_DELETED in {}",
        ms(took)
    ));
    let gone = sysfs::wait(ctx, &bdf, false, Duration::from_secs(10))?;
    let detached = wait_detached(ctx, &id)?;
    ctx.check(
        "the guest's sysfs entry is gone and the server saw the client go",
        gone && detached,
        format!("sysfs gone: {gone}; server detached: {detached}"),
    );
    let records = ctx.journal(&id)?;
    ctx.check(
        &format!("{id} journaled client_disconnected"),
        count_records(&records, |e| *e == Event::ClientDisconnected) >= 1,
        "none",
    );
    let st = ctx.control().status(&id)?;
    let link_up = st.get("link_up").cloned();
    ctx.check(
        "after the lost-connection reset the device's link is up again for the next client",
        link_up == Some(Value::Bool(true)),
        format!("status link_up: {link_up:?}"),
    );
    Ok(())
}

fn h7_pciehp_add_remove(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
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
        let argv = ctx.guest_argv("e1", &id, &["--bdf", &bdf])?;
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

/// The profile's NPU (plugged at boot).
fn npu_device(ctx: &HostCtx<'_>) -> Result<String, HostError> {
    ctx.layout()
        .devices
        .iter()
        .find(|d| d.at_boot && d.id.starts_with("npu"))
        .map(|d| d.id.clone())
        .ok_or_else(|| HostError::Step("the profile has no NPU plugged at boot".into()))
}

/// The NPU driver's view of its GPU peer (`none`, `absent`, `held <bdf>`, `leaked <bdf>`).
fn npu_peer_ref(ctx: &mut HostCtx<'_>, npu_bdf: &str) -> Result<String, HostError> {
    Ok(ctx
        .sh(&format!("cat /sys/bus/pci/devices/{npu_bdf}/pcisim_peer"))?
        .trim()
        .to_string())
}

/// The guest's dynamic debug control file: procfs's (no debugfs needed), else debugfs's.
const DYNDBG_CONTROL: &str = "c=/proc/dynamic_debug/control; [ -e $c ] || \
                              c=/sys/kernel/debug/dynamic_debug/control";

/// Whether the dynamic debug `control` text shows `func`'s pr_debug in `file` enabled (`=p`,
/// possibly with more flags); `Err` says what the text shows instead.
fn dyndbg_enabled(control: &str, file: &str, func: &str) -> Result<bool, String> {
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
fn kobject_debug(ctx: &mut HostCtx<'_>, on: bool) -> Result<(), HostError> {
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
fn kobject_cleanups(ctx: &mut HostCtx<'_>, bdf: &str) -> Result<usize, HostError> {
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
fn peer_status(
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

fn h6_gpu_npu_peer(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    h6_flow(ctx, false)
}

fn h6b_gpu_peer_ref_leak(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    h6_flow(ctx, true)
}

/// What one H6 add/remove cycle of the GPU peer left behind.
#[derive(Debug)]
struct PeerCycle {
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
fn h6_flow(ctx: &mut HostCtx<'_>, leaky: bool) -> Result<(), HostError> {
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
fn h6_cycle(
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
