//! M8, M8b and M8d: GPU userptr work through the guest GPU driver
//! (`guest-tests/kmod/gpu_*.c`), seed 004. The guest program `userptr` has the ring fill a
//! process's memory (DMA-mapped through the vIOMMU: the GPU has no PASID) and takes the memory
//! away (munmap, MADV_DONTNEED) while the ring still writes; these host steps check the GPU's
//! journal around it:
//!
//! - **M8** (mmu interval notifier, correct): the invalidation waits for the ring's fence, so the
//!   journal shows the ring's last DMA into the range, then the range's DMA_UNMAP; no violation.
//! - **M8b** (`bug=no_fence_wait`): the invalidation unmaps at once; the ring's next access hits
//!   the unmapped IOVA: `dma_after_unmap`, declared as the expected violation.
//! - **M8d** (pinned pages, no notifier): munmap returns while the ring writes on into the
//!   pinned pages; the range stays DMA-mapped until the driver releases it (the DMA_UNMAP comes
//!   after the last DMA); no violation; the pages stay pinned meanwhile.
//!
//! The guest's IOMMU group of the GPU is switched to strict invalidation (`DMA`, not the
//! default lazy `DMA-FQ`) before the driver binds: a lazy unmap reaches the device up to a
//! flush-queue period later, and meanwhile a buggy driver's device would write into pages the
//! guest already reused. docs/userptr.md has the contract and the figures.

use pcisim_journal::{Dir, Event, Record};

use crate::guestops;
use crate::harness::host::{HostCtx, HostError, HostProgram};
use crate::vm::kmod::GPU_MODULE;
use crate::vm::profile::ProfileId;
use pcisim_guest_wire::{
    GuestProgram as Invocation, OnOff, UnmapCall, UserptrMode, UserptrOptions,
};

/// The GPU of the `gpu-userptr` profile.
const GPU: &str = "gpu0";

/// `M8 userptr-notifier`: munmap and MADV_DONTNEED of a userptr the ring is filling; the
/// driver's mmu interval notifier waits for the ring's fence before it unmaps.
pub const M8: HostProgram = HostProgram {
    name: "m8-userptr-notifier",
    profile: ProfileId::GpuUserptr,
    run: m8_userptr_notifier,
};

/// `M8b userptr-no-fence-wait`: the notifier unmaps without waiting: `dma_after_unmap`.
pub const M8B: HostProgram = HostProgram {
    name: "m8b-userptr-no-fence-wait",
    profile: ProfileId::GpuUserptr,
    run: m8b_no_fence_wait,
};

/// `M8d userptr-pinned`: pinned pages, no notifier: munmap does not stop the ring, the pages
/// stay pinned and mapped until the driver releases them; no violation.
pub const M8D: HostProgram = HostProgram {
    name: "m8d-userptr-pinned",
    profile: ProfileId::GpuUserptr,
    run: m8d_pinned,
};

/// `M8c userptr-alloc-in-signalling`: the fence signalling section allocates with GFP_KERNEL;
/// lockdep (primed by dma-resv.c with fs_reclaim → mmu notifier → fence wait) reports the
/// circular dependency. Needs a lockdep kernel: elsewhere it is reported as SKIP with the reason.
pub const M8C: HostProgram = HostProgram {
    name: "m8c-userptr-alloc-in-signalling",
    profile: ProfileId::GpuUserptr,
    run: m8c_alloc_in_signalling,
};

/// Why M8c cannot run on this guest kernel, or `None` if lockdep is on and armed.
fn lockdep_missing(ctx: &mut HostCtx<'_>) -> Result<Result<(), String>, HostError> {
    // /proc/lockdep_chains exists only with CONFIG_PROVE_LOCKING (kernel/locking/lockdep_proc.c);
    // lockdep_stats says whether it is still armed (the first report switches it off).
    let out = ctx.sh(
        "if [ -e /proc/lockdep_chains ]; then grep -E 'debug_locks' /proc/lockdep_stats; \
         else echo no-prove-locking; fi",
    )?;
    Ok(if out.contains("no-prove-locking") {
        Err("no-prove-locking".into())
    } else {
        let armed = out
            .split_whitespace()
            .last()
            .is_some_and(|v| v.trim() == "1");
        if armed {
            Ok(())
        } else {
            Err(format!("lockdep is off: {}", out.trim()))
        }
    })
}

fn m8c_alloc_in_signalling(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    match lockdep_missing(ctx)? {
        Ok(()) => ctx.pass("the guest kernel has lockdep (CONFIG_PROVE_LOCKING), armed"),
        Err(why) if why == "no-prove-locking" => {
            ctx.skip_all(
                "needs a guest kernel with lockdep (CONFIG_PROVE_LOCKING; no /proc/lockdep_chains \
                 here): run it with the debug kernel",
            );
            return Ok(());
        }
        Err(why) => {
            // The instrument exists but will not report: a failure, not a skip.
            ctx.fail("lockdep armed (debug_locks 1)", &why);
            return Ok(());
        }
    }
    let bdf = ctx.bdf_of(GPU)?;
    load_driver(ctx, &bdf, "alloc_in_signalling")?;
    run_userptr(
        ctx,
        "tracked userptr (bug=alloc_in_signalling), munmap while the ring fills it",
        UserptrOptions {
            unmap: Some(UnmapCall::Munmap),
            ..UserptrOptions::new(&bdf, UserptrMode::Tracked)
        },
    )?;
    let splat = ctx.sh(
        "dmesg | grep -A40 'possible circular locking dependency detected' | \
         grep -E 'dma_fence_map|fs_reclaim|pcisim_gpu|gpu_irq_thread' | head -n 12; true",
    )?;
    for l in splat.lines() {
        ctx.diag(&format!("guest: {}", l.trim()));
    }
    ctx.check(
        "lockdep's circular dependency names dma_fence_map and fs_reclaim",
        splat.contains("dma_fence_map") && splat.contains("fs_reclaim"),
        "no `possible circular locking dependency` naming dma_fence_map and fs_reclaim",
    );
    unload_driver(ctx)
}

/// (Re)loads the guest GPU driver with `bug` (strict IOMMU invalidation first:
/// [`guestops::driver::load_gpu`]); a subtest, and an error if the driver does not come up.
fn load_driver(ctx: &mut HostCtx<'_>, bdf: &str, bug: &str) -> Result<(), HostError> {
    let loaded = guestops::driver::load_gpu(ctx, bdf, bug);
    ctx.checked(
        &format!("{GPU_MODULE}.ko (bug={bug}) bound to {bdf}, IOMMU group strict (DMA)"),
        loaded,
    )?;
    Ok(())
}

/// The `pcisim_gpu unloads` subtest ([`guestops::driver::unload_gpu`]); its failure does not
/// end the scenario (it is the last step).
fn unload_driver(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let unloaded = guestops::driver::unload_gpu(ctx);
    let _ = ctx.checked(&format!("{GPU_MODULE} unloads"), unloaded);
    Ok(())
}

/// A `# name value` diagnostic the guest program printed.
fn figure<'a>(stdout: &'a str, name: &str) -> Option<&'a str> {
    stdout.lines().find_map(|l| {
        l.trim()
            .strip_prefix("# ")?
            .strip_prefix(name)?
            .strip_prefix(' ')
            .map(str::trim)
    })
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Whether `a..a+alen` and `b..b+blen` overlap.
fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// What the journal says about one IOVA range.
#[derive(Debug, Default, PartialEq, Eq)]
struct RangeStory {
    /// Device writes into the range (aggregated records).
    writes: usize,
    /// Bytes written into it.
    bytes: u64,
    /// Index of the last write record.
    last_write: Option<usize>,
    /// Index of the first DMA_UNMAP covering part of it.
    first_unmap: Option<usize>,
    /// Faulted accesses into it.
    faults: usize,
}

fn range_story(records: &[Record], iova: u64, len: u64) -> RangeStory {
    let mut s = RangeStory::default();
    for (i, r) in records.iter().enumerate() {
        match &r.event {
            Event::Dma {
                dir: Dir::Write,
                iova: a,
                len: l,
                bytes,
                ..
            } if overlaps(*a, *l, iova, len) => {
                s.writes += 1;
                s.bytes += bytes;
                s.last_write = Some(i);
            }
            Event::DmaUnmapped { iova: a, size } if overlaps(*a, *size, iova, len) => {
                s.first_unmap.get_or_insert(i);
            }
            Event::DmaFault {
                iova: a, len: l, ..
            } if overlaps(*a, *l, iova, len) => s.faults += 1,
            _ => {}
        }
    }
    s
}

/// A userptr's IOVA range: (first IOVA, length).
type IovaRange = (u64, u64);

/// One guest `userptr` run against the loaded driver; returns the journal window of the run
/// and the userptr's IOVA range (`None`, with a failed subtest, if it is not one range).
fn run_userptr(
    ctx: &mut HostCtx<'_>,
    name: &str,
    options: UserptrOptions,
) -> Result<(Vec<Record>, Option<IovaRange>), HostError> {
    let mark = ctx.control().last_seq(GPU)?;
    // `userptr` finds the GPU by its BDF (no --vendor/--device).
    let argv = Invocation::new(options).to_argv();
    let (_, out) = ctx.guest_test_output(name, &argv)?;
    let records = ctx.window(GPU, mark)?.records;
    let iova = figure(&out.stdout, "iova").and_then(parse_u64);
    let len = figure(&out.stdout, "len").and_then(parse_u64);
    let nents = figure(&out.stdout, "nents").and_then(parse_u64);
    let range = match (iova, len, nents) {
        (Some(i), Some(l), Some(1)) => Some((i, l)),
        _ => {
            ctx.fail(
                "the userptr is one IOVA range",
                &format!("iova {iova:?} len {len:?} nents {nents:?}"),
            );
            None
        }
    };
    for f in [
        "unmap_us",
        "invalidate_wait_us",
        "pinned_after_unmap",
        "held_ms",
    ] {
        if let Some(v) = figure(&out.stdout, f) {
            ctx.progress(&format!("{name}: {f} {v}"));
        }
    }
    Ok((records, range))
}

fn m8_userptr_notifier(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let bdf = ctx.bdf_of(GPU)?;
    load_driver(ctx, &bdf, "none")?;
    for unmap in [UnmapCall::Munmap, UnmapCall::Dontneed] {
        let (records, range) = run_userptr(
            ctx,
            &format!("tracked userptr, {unmap} while the ring fills it"),
            UserptrOptions {
                unmap: Some(unmap),
                ..UserptrOptions::new(&bdf, UserptrMode::Tracked)
            },
        )?;
        let Some((iova, len)) = range else { continue };
        let s = range_story(&records, iova, len);
        ctx.diag(&format!(
            "{GPU}: {} write records ({} MiB) into {iova:#x}+{len:#x}, last at record {:?}; \
             first DMA_UNMAP of it at record {:?}; {} faults",
            s.writes,
            s.bytes >> 20,
            s.last_write,
            s.first_unmap,
            s.faults
        ));
        ctx.check(
            &format!("{unmap}: the journal shows the ring's last DMA, then the range's DMA_UNMAP"),
            s.writes > 0
                && s.faults == 0
                && matches!((s.last_write, s.first_unmap), (Some(w), Some(u)) if w < u),
            format!("{s:?}"),
        );
    }
    unload_driver(ctx)
}

fn m8b_no_fence_wait(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let bdf = ctx.bdf_of(GPU)?;
    load_driver(ctx, &bdf, "no_fence_wait")?;
    let (records, range) = run_userptr(
        ctx,
        "tracked userptr (bug=no_fence_wait), munmap while the ring fills it",
        UserptrOptions {
            unmap: Some(UnmapCall::Munmap),
            lenient: Some(OnOff::On),
            ..UserptrOptions::new(&bdf, UserptrMode::Tracked)
        },
    )?;
    if let Some((iova, len)) = range {
        let s = range_story(&records, iova, len);
        ctx.diag(&format!("{GPU}: {s:?}"));
        let fault_after_unmap = s.first_unmap.is_some_and(|u| {
            records[u..].iter().any(|r| {
                matches!(&r.event, Event::DmaFault { iova: a, len: l, .. } if overlaps(*a, *l, iova, len))
            })
        });
        ctx.check(
            "the range was unmapped while the ring still wrote: a faulted DMA into it after its \
             DMA_UNMAP",
            fault_after_unmap,
            format!("{s:?}"),
        );
    }
    unload_driver(ctx)
}

fn m8d_pinned(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let bdf = ctx.bdf_of(GPU)?;
    load_driver(ctx, &bdf, "none")?;
    let (records, range) = run_userptr(
        ctx,
        "pinned userptr, munmap while the ring fills it",
        UserptrOptions {
            unmap: Some(UnmapCall::Munmap),
            ..UserptrOptions::new(&bdf, UserptrMode::Pinned)
        },
    )?;
    if let Some((iova, len)) = range {
        let s = range_story(&records, iova, len);
        ctx.diag(&format!(
            "{GPU}: {} write records ({} MiB) into {iova:#x}+{len:#x}; last at record {:?}, \
             DMA_UNMAP at record {:?} (at RELEASE)",
            s.writes,
            s.bytes >> 20,
            s.last_write,
            s.first_unmap
        ));
        ctx.check(
            "the range stays mapped for the device until RELEASE: every DMA before its DMA_UNMAP",
            s.writes > 0
                && s.faults == 0
                && matches!((s.last_write, s.first_unmap), (Some(w), Some(u)) if w < u),
            format!("{s:?}"),
        );
    }
    unload_driver(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, event: Event) -> Record {
        Record {
            seq,
            t_ns: seq,
            event,
        }
    }

    #[test]
    fn test_range_story_orders_writes_and_unmaps() {
        let w = |iova| Event::Dma {
            dir: Dir::Write,
            pasid: None,
            iova,
            len: 0x1000,
            count: 1,
            bytes: 0x1000,
        };
        let recs = vec![
            rec(1, w(0x10000)),
            rec(2, w(0x90000)), // outside
            rec(3, w(0x11000)),
            rec(
                4,
                Event::DmaUnmapped {
                    iova: 0x10000,
                    size: 0x2000,
                },
            ),
            rec(
                5,
                Event::DmaFault {
                    dir: Dir::Write,
                    pasid: None,
                    iova: 0x10000,
                    len: 0x1000,
                },
            ),
        ];
        let s = range_story(&recs, 0x10000, 0x2000);
        assert_eq!(s.writes, 2);
        assert_eq!(s.bytes, 0x2000);
        assert_eq!(s.last_write, Some(2));
        assert_eq!(s.first_unmap, Some(3));
        assert_eq!(s.faults, 1);
        assert!(!overlaps(0x12000, 0x1000, 0x10000, 0x2000));
    }

    #[test]
    fn test_figures_from_diagnostics() {
        let out = "KTAP version 1\n# iova 0xfff00000\n# len 4194304\n# unmap_us 12\n";
        assert_eq!(figure(out, "iova").and_then(parse_u64), Some(0xfff0_0000));
        assert_eq!(figure(out, "len").and_then(parse_u64), Some(4 << 20));
        assert_eq!(figure(out, "unmap"), None);
        assert_eq!(figure(out, "held_ms"), None);
    }
}
