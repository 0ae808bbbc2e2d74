//! H1 (hot-add), H2 (hot-remove) and H3 (add/remove cycles without a leak in the server).

use super::*;

pub(super) fn h1_hot_add(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
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
    let argv = ctx.guest_argv(&id, E1Options::at(&bdf))?;
    ctx.guest_test(&format!("{id} at {bdf} passes E1"), &argv)?;
    let msi = msi_applies(ctx, &id)?;
    if msi {
        check_msi_cap(ctx, &id, &bdf)?;
    }
    let argv = ctx.guest_argv(&id, Options::E2(SelectOptions::at(&bdf)))?;
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
pub(super) fn described_cap(description: &Value, cap_id: u64) -> Option<u64> {
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
pub(super) fn msi_required(opts: &[String], described: bool) -> Result<bool, String> {
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
pub(super) fn msi_applies(ctx: &mut HostCtx<'_>, id: &str) -> Result<bool, HostError> {
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
pub(super) fn check_msi_cap(ctx: &mut HostCtx<'_>, id: &str, bdf: &str) -> Result<(), HostError> {
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
pub(super) const H1_MSI_VECTORS: &[u32] = &[0, 1, 5];

/// MSI delivery in the guest: E3 with `--irq msi` through a guest vfio user, and the device's
/// journal of the step: one `interrupt` record `delivered` per doorbell, nothing held back.
pub(super) fn check_msi_delivery(
    ctx: &mut HostCtx<'_>,
    id: &str,
    bdf: &str,
) -> Result<(), HostError> {
    let name = "MSI delivery in the guest through vfio-pci";
    let mark = ctx.control().last_seq(id)?;
    let argv = ctx.guest_argv(
        id,
        E3Options {
            vectors: Some(H1_MSI_VECTORS.to_vec()),
            irq: Some(IrqMode::Msi),
            bdf: Some(bdf.to_string()),
        },
    )?;
    ctx.guest_test(&format!("{name}: {id} at {bdf} passes E3 --irq msi"), &argv)?;
    let w = ctx.window(id, mark)?.records;
    let doorbells = H1_MSI_VECTORS.len();
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

pub(super) fn h2_hot_remove(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
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

pub(super) fn summary(ds: &[Duration]) -> String {
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
pub(super) struct Tally {
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

pub(super) fn h3_add_remove_cycles(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
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
        let argv = ctx.guest_argv(
            &id,
            VfioUserOptions {
                bdf: Some(bdf.clone()),
                dma_kib: Some(H3_DMA_KIB as u64),
                req: Some(ReqMode::Off),
                ..VfioUserOptions::default()
            },
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
