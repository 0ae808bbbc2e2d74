//! H5: surprise removal (link-down) with DMA streaming across it.

use super::*;

/// `pcisim-guest bar-io` at `bdf`'s BAR0: writes `write` (offset, value) first, then reads
/// `offs`; returns the values read.
pub(super) fn bar_io(
    ctx: &mut HostCtx<'_>,
    bdf: &str,
    offs: &[u64],
    write: Option<(u64, u32)>,
) -> Result<Vec<u32>, HostError> {
    let mut off: Vec<u64> = Vec::new();
    if let Some((o, _)) = write {
        off.push(o);
    }
    off.extend_from_slice(offs);
    let argv = Invocation::new(BarIoOptions {
        bdf: bdf.to_string(),
        bar: None,
        off,
        write: write.map(|(_, v)| v),
    })
    .to_argv();
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
pub(super) fn config_ids(ctx: &mut HostCtx<'_>, bdf: &str) -> Result<(u32, u32), HostError> {
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
pub(super) const H5_STREAM: &str = "/tmp/h5-stream";
/// How long the guest stream waits for the link to come back before it gives up.
pub(super) const H5_DOWN_WAIT_S: u64 = 30;
/// How long H5 waits for each of the guest stream's steps (ready, link down seen, the end).
pub(super) const H5_STEP: Duration = Duration::from_secs(60);

/// Waits (10 ms steps, at most `limit`) until the guest file `path` exists; `Ok(false)` if it
/// did not appear, or the stream program ended first (its `.rc` exists).
pub(super) fn wait_guest_file(
    ctx: &mut HostCtx<'_>,
    path: &str,
    limit: Duration,
) -> Result<bool, HostError> {
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
pub(super) fn link_record(records: &[Record], up: bool, from: usize) -> Option<usize> {
    records
        .iter()
        .skip(from)
        .position(|r| r.event == Event::Link { up })
        .map(|p| p + from)
}

/// A DMA refused because the link is down.
pub(super) fn refused_link_down(e: &Event) -> bool {
    matches!(
        e,
        Event::DmaRefused {
            reason: Refusal::LinkDown,
            ..
        }
    )
}

/// An interrupt held back because the link is down.
pub(super) fn held_link_down(e: &Event) -> bool {
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
pub(super) fn down_start(records: &[Record]) -> Option<usize> {
    let link = link_record(records, false, 0)?;
    let refused = records[..link]
        .iter()
        .position(|r| refused_link_down(&r.event) || held_link_down(&r.event));
    Some(refused.unwrap_or(link))
}

pub(super) fn t_ms(r: &Record) -> f64 {
    r.t_ns as f64 / 1e6
}

/// H5 with DMA in flight (see [`H5`]): starts the guest stream, pulls the link while it runs,
/// brings it back, waits for the program to end and checks the journal window.
pub(super) fn h5_dma_across_link_down(
    ctx: &mut HostCtx<'_>,
    id: &str,
    bdf: &str,
) -> Result<(), HostError> {
    let raw = ctx.device(id)?.description.raw.clone();
    let irq = if described_cap(&raw, 0x05).is_some() {
        IrqMode::Msi
    } else {
        IrqMode::Msix
    };
    let argv = ctx.guest_argv(
        id,
        DmaStreamOptions {
            bdf: Some(bdf.to_string()),
            irq: Some(irq),
            ready_file: Some(format!("{H5_STREAM}.ready")),
            down_file: Some(format!("{H5_STREAM}.down")),
            down_wait_s: Some(H5_DOWN_WAIT_S),
            ..DmaStreamOptions::default()
        },
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
pub(super) fn h5_stream_end(ctx: &mut HostCtx<'_>, id: &str, kill: bool) -> Result<(), HostError> {
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
pub(super) fn h5_check_window(ctx: &mut HostCtx<'_>, id: &str, mark: u64) -> Result<(), HostError> {
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

pub(super) fn h5_surprise_removal(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
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
