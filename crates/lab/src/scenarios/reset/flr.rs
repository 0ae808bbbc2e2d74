//! R1 (FLR), R2 (FLR with DMA in flight) and R2b (the driver that writes Initiate FLR itself).

use super::*;

pub(super) fn r1_flr(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let dev = "gpu0";
    let bdf = ctx.bdf_of(dev)?;

    let argv = ctx.guest_argv(dev, reset_at(&bdf, ResetMethod::Flr))?;
    reset_step(
        ctx,
        dev,
        &format!("{dev} unbound: reset_method=flr, reset: registers back to defaults"),
        &argv,
        &format!("{dev} unbound"),
        &[ResetKind::Flr],
    )?;

    let argv = ctx.guest_argv(
        dev,
        ResetVfioOptions {
            bdf: Some(bdf.clone()),
            op: VfioResetOp::SysfsFlr,
            ring: Some(OnOff::On),
        },
    )?;
    let (w, marked) = marked_step(
        ctx,
        dev,
        &format!("{dev} under a guest vfio driver: sysfs FLR, interrupts and DMA after it"),
        &argv,
        &format!("{dev} between the marker interrupts: journaled reset_begin/reset_end kind=flr"),
    )?;
    let (all, _) = reset_kinds(&w);
    ctx.diag(&format!(
        "{dev}: the vfio session journaled resets {:?} (vfio-pci resets on open and close; runtime PM resumes from D3hot)",
        all.iter().map(|k| k.name()).collect::<Vec<_>>()
    ));
    if let Some(b) = marked {
        check_kinds(
            ctx,
            &format!("{dev} between the marker interrupts"),
            &b,
            &[ResetKind::Flr],
        );
    }
    Ok(())
}

/// The records of `type` in `records` and their positions.
pub(super) fn first(records: &[Record], pred: impl Fn(&Event) -> bool) -> Option<usize> {
    records.iter().position(|r| pred(&r.event))
}

/// Bytes of DMA writes in `records`.
pub(super) fn dma_write_bytes(records: &[Record]) -> u64 {
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
pub(super) fn journaled(records: &[Record], pred: impl Fn(&Event) -> bool) -> bool {
    records.iter().any(|r| pred(&r.event))
}

/// The ring stopped on a refused DMA.
pub(super) fn ring_refused(e: &Event) -> bool {
    matches!(
        e,
        Event::RingError {
            code: RingErrorCode::DmaRefused,
            ..
        }
    )
}

/// R2's and R2b's step: `reset-dma --mode MODE` on `gpu0` (the ring's FILL running, then an
/// FLR between the marker interrupts), and the check that the one reset between the markers
/// is an FLR (`kinds_what`). Returns the marked window (`None`: the markers are missing, a
/// failed check says so).
fn flr_with_dma_step(
    ctx: &mut HostCtx<'_>,
    mode: ResetDmaMode,
    name: &str,
    kinds_what: &str,
) -> Result<Option<Vec<Record>>, HostError> {
    let dev = "gpu0";
    let bdf = ctx.bdf_of(dev)?;
    let argv = ctx.guest_argv(
        dev,
        ResetDmaOptions {
            bdf: Some(bdf),
            mode,
            len: None,
        },
    )?;
    let what = format!("{dev}: the reset between the marker interrupts");
    let (_, marked) = marked_step(ctx, dev, name, &argv, &what)?;
    if let Some(b) = &marked {
        check_kinds(ctx, kinds_what, b, &[ResetKind::Flr]);
    }
    Ok(marked)
}

pub(super) fn r2_flr_with_dma(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let dev = "gpu0";
    let Some(b) = flr_with_dma_step(
        ctx,
        ResetDmaMode::Correct,
        &format!("{dev}: FILL running, Transactions Pending seen, VFIO_DEVICE_RESET"),
        &format!("{dev} FLR with DMA in flight"),
    )?
    else {
        return Ok(());
    };
    let b = b.as_slice();
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

pub(super) fn r2b_flr_dma_buggy_driver(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let dev = "gpu0";
    let Some(b) = flr_with_dma_step(
        ctx,
        ResetDmaMode::Buggy,
        &format!("{dev}: FILL running, the program writes Initiate FLR itself (driver bug)"),
        &format!("{dev} raw FLR"),
    )?
    else {
        return Ok(());
    };
    let b = b.as_slice();
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

pub(super) fn is_dma(e: &Event) -> bool {
    matches!(e, Event::Dma { .. })
}

pub(super) fn is_power(e: &Event) -> bool {
    matches!(e, Event::Power { .. })
}
