//! M6 and M7: PASID bindings of process address spaces through the guest NPU driver
//! (`guest-tests/kmod/npu_*.c`), checked from both sides — the guest program `sva` checks
//! what the process sees, these host steps check the NPU's journal: the PASID is bound, unbound
//! and drained (work was in flight: items aborted) before the device lets go of it, and the
//! checker's invariants (`stale_translation`, `walk_after_release`, `pasid_after_unbind`) hold.
//! The deliberately buggy driver variants (module parameter `bug=`) run the same steps and must
//! make the checker report the violation that names the rule they break (expected failures,
//! `# XFAIL`): `binding_outlived_mm` (M6b), `drain_not_awaited` (M6c), `stale_translation`
//! (M7b, the missed invalidation). docs/sva.md has the lifetime rules and the scenario table.

use std::time::{Duration, Instant};

use pcisim_journal::{Event, Record, ViolationKind};

use crate::guestops;
use crate::harness::host::{count_records, HostCtx, HostError, HostProgram};
use crate::harness::timeline;
use crate::vm::kmod::NPU_MODULE;
use crate::vm::profile::ProfileId;
use pcisim_guest_wire::{GuestProgram as Invocation, OnOff, SvaOptions};

/// The NPU of the `npu-sva` profile.
const NPU: &str = "npu0";

/// How long the host waits for the device to let go of a binding after the guest step.
const RELEASE_WAIT: Duration = Duration::from_secs(15);

/// `M6 sva-lifetimes`: a process binds its mm (open), works on its heap and mmap'd memory
/// (FILL, MEMCPY, COMPARE, translation faults serviced by the driver, the status page), then
/// five ways for a binding to end with work in flight: exit, SIGKILL, fork (the child keeps the
/// fd), SCM_RIGHTS (a receiver keeps it), and an mmap of the device file outliving the fd. In
/// every case the driver unbinds on mm release and the device drains (aborts) the PASID's work
/// before acknowledging; no context leaks.
pub const M6: HostProgram = HostProgram {
    name: "m6-sva-lifetimes",
    profile: ProfileId::NpuSva,
    run: m6_sva_lifetimes,
};

/// `M6b sva-no-mm-release`: the driver variant that ignores mm release (unbinds only when the
/// file goes), in the fork case: the binder exits while its child holds the fd, so the device
/// keeps working on the address space exit_mmap tore down until the child closes it; its
/// checking mode finds the PASID's tables emptied while it is still bound
/// (`binding_outlived_mm`, expected).
pub const M6B: HostProgram = HostProgram {
    name: "m6b-sva-no-mm-release",
    profile: ProfileId::NpuSva,
    run: m6b_no_mm_release,
};

/// `M6c sva-ack-without-drain`: the variant that issues UNBIND on mm release and returns
/// without waiting for the drain: the queued work runs on while the process (killed) loses its
/// pages, under a PASID whose unbind is still draining (`drain_not_awaited`, expected).
pub const M6C: HostProgram = HostProgram {
    name: "m6c-sva-ack-without-drain",
    profile: ProfileId::NpuSva,
    run: m6c_ack_without_drain,
};

/// `M7 sva-invalidation`: MADV_DONTNEED, munmap and mprotect of memory the device has cached
/// translations for, and copies racing repeated MADV_DONTNEEDs: the driver's mmu notifier
/// invalidates before the pages change, the device faults (reported through its fault queue,
/// serviced or returned as EFAULT) instead of using a stale translation.
pub const M7: HostProgram = HostProgram {
    name: "m7-sva-invalidation",
    profile: ProfileId::NpuSva,
    run: m7_invalidation,
};

/// `M7b sva-skip-invalidate`: the variant whose invalidation callback does nothing: the device
/// uses translations of discarded and unmapped pages of a live process, and no invalidation
/// covers them before the binding ends (`stale_translation`: a missed invalidation, expected).
pub const M7B: HostProgram = HostProgram {
    name: "m7b-sva-skip-invalidate",
    profile: ProfileId::NpuSva,
    run: m7b_skip_invalidate,
};

/// (Re)loads the guest NPU driver with `bug` and checks it drives the NPU at `bdf` (a subtest,
/// and an error if it does not).
fn load_driver(ctx: &mut HostCtx<'_>, bdf: &str, bug: &str) -> Result<(), HostError> {
    let loaded = guestops::driver::load_npu(ctx, bdf, bug);
    ctx.checked(
        &format!("{NPU_MODULE}.ko (bug={bug}) loaded and bound to {bdf}"),
        loaded,
    )
    .map(drop)
}

/// The PASID a guest `sva` step printed (`# pasid N`).
fn pasid_of(stdout: &str) -> Option<u64> {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("# pasid ")?.trim().parse().ok())
}

/// What happened to a PASID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Bind,
    UnbindBegin,
    Drained,
    UnbindAck,
    Released,
    PageWalk,
    Invalidate,
    TranslationFault,
}

/// The step `r` records for `pasid`, if it is one of those.
fn pasid_step(r: &Record, pasid: u64) -> Option<Step> {
    let (p, step) = match r.event {
        Event::PasidBind { pasid, .. } => (pasid, Step::Bind),
        Event::PasidUnbindBegin { pasid } => (pasid, Step::UnbindBegin),
        Event::PasidDrained { pasid, .. } => (pasid, Step::Drained),
        Event::PasidUnbindAck { pasid } => (pasid, Step::UnbindAck),
        Event::PasidReleased { pasid } => (pasid, Step::Released),
        Event::PageWalk { pasid, .. } => (pasid, Step::PageWalk),
        Event::Invalidate { pasid, .. } => (pasid, Step::Invalidate),
        Event::TranslationFault { pasid, .. } => (pasid, Step::TranslationFault),
        _ => return None,
    };
    (u64::from(p) == pasid).then_some(step)
}

fn pasid_is(r: &Record, step: Step, pasid: u64) -> bool {
    pasid_step(r, pasid) == Some(step)
}

/// The binding's life in the journal: (bind, unbind_begin, drained, ack, released) positions
/// and the items aborted by the drain.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Lifecycle {
    pub bind: Option<usize>,
    pub unbind_begin: Option<usize>,
    pub drained: Option<usize>,
    pub ack: Option<usize>,
    pub released: Option<usize>,
    pub aborted: u64,
    pub unbinds: usize,
}

impl Lifecycle {
    pub fn of(records: &[Record], pasid: u64) -> Lifecycle {
        let mut l = Lifecycle::default();
        for (i, r) in records.iter().enumerate() {
            match pasid_step(r, pasid) {
                Some(Step::Bind) if l.bind.is_none() => l.bind = Some(i),
                Some(Step::UnbindBegin) => {
                    l.unbinds += 1;
                    l.unbind_begin.get_or_insert(i);
                }
                Some(Step::Drained) if l.drained.is_none() => {
                    l.drained = Some(i);
                    if let Event::PasidDrained { aborted, .. } = r.event {
                        l.aborted = aborted;
                    }
                }
                Some(Step::UnbindAck) if l.ack.is_none() => l.ack = Some(i),
                Some(Step::Released) if l.released.is_none() => l.released = Some(i),
                _ => {}
            }
        }
        l
    }

    /// bind < unbind_begin < drained < ack, released after the ack, one unbind.
    pub fn in_order(&self) -> bool {
        match (
            self.bind,
            self.unbind_begin,
            self.drained,
            self.ack,
            self.released,
        ) {
            (Some(b), Some(u), Some(d), Some(a), Some(r)) => {
                b < u && u < d && d < a && a <= r && self.unbinds == 1
            }
            _ => false,
        }
    }
}

/// One guest `sva` case as a subtest, then the journal checks of its binding.
fn lifetime_case(
    ctx: &mut HostCtx<'_>,
    bdf: &str,
    case: &str,
    what: &str,
    lenient: bool,
) -> Result<Option<(u64, Vec<Record>)>, HostError> {
    let mark = ctx.control().last_seq(NPU)?;
    // `sva` finds the NPU by its BDF (no --vendor/--device).
    let argv = Invocation::new(SvaOptions {
        bdf: bdf.to_string(),
        case: case.to_string(),
        lenient: lenient.then_some(OnOff::On),
    })
    .to_argv();
    let (_, out) = ctx.guest_test_output(what, &argv)?;
    let Some(pasid) = pasid_of(&out.stdout) else {
        ctx.fail(
            &format!("{case}: the journal of the binding"),
            "the guest program printed no PASID",
        );
        return Ok(None);
    };
    // The device may still be draining (a driver that did not wait): judge once the binding
    // is gone from the device, or after a bound wait.
    let deadline = Instant::now() + RELEASE_WAIT;
    loop {
        let records = ctx.window(NPU, mark)?.records;
        let released = records.iter().any(|r| pasid_is(r, Step::Released, pasid));
        if released || Instant::now() >= deadline {
            if !released {
                ctx.diag(&format!(
                    "{case}: pasid {pasid} not released by the device within {RELEASE_WAIT:?}"
                ));
            }
            // The picture of one case: M6's kill and M6c's (the same case, buggy driver).
            if case == "kill" {
                timeline::save_case_timeline(ctx, case, NPU, &records, &out.stdout);
            }
            return Ok(Some((pasid, records)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks that the binding was unbound with its work drained, in order.
fn check_unbound_with_drain(ctx: &mut HostCtx<'_>, case: &str, pasid: u64, records: &[Record]) {
    let l = Lifecycle::of(records, pasid);
    let walks = records
        .iter()
        .filter(|r| pasid_is(r, Step::PageWalk, pasid))
        .count();
    ctx.diag(&format!(
        "{case}: pasid {pasid}: {walks} page walk(s), unbind drained {} item(s)",
        l.aborted
    ));
    ctx.check(
        &format!("{case}: pasid {pasid} journaled bind → unbind_begin → drained → unbind_ack → released, once"),
        l.in_order(),
        format!("{l:?}"),
    );
    ctx.check(
        &format!("{case}: work was in flight when the binding ended (the drain aborted items)"),
        l.aborted > 0,
        "the drain aborted nothing: the scenario did not race the exit",
    );
}

fn m6_sva_lifetimes(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let bdf = ctx.bdf_of(NPU)?;
    load_driver(ctx, &bdf, "none")?;
    if let Some((pasid, records)) = lifetime_case(
        ctx,
        &bdf,
        "basic",
        "basic: bind, FILL/MEMCPY/COMPARE on heap and mmap'd memory, faults serviced, status page",
        false,
    )? {
        let l = Lifecycle::of(&records, pasid);
        ctx.check(
            &format!("basic: pasid {pasid} journaled bind → unbind_begin → drained → unbind_ack → released, once (close with nothing in flight)"),
            l.in_order() && l.aborted == 0,
            format!("{l:?}"),
        );
    }
    for (case, what) in [
        ("exit", "exit: the process exits with work queued"),
        (
            "kill",
            "kill: the process is SIGKILLed while waiting for work",
        ),
        (
            "fork",
            "fork: the child keeps the fd, the parent (the binder) exits",
        ),
        (
            "scm",
            "scm: the fd is passed over SCM_RIGHTS, the opener exits",
        ),
        (
            "mmap",
            "mmap: the status page mapping outlives the fd, the process exits",
        ),
    ] {
        if let Some((pasid, records)) = lifetime_case(ctx, &bdf, case, what, false)? {
            check_unbound_with_drain(ctx, case, pasid, &records);
        }
    }
    Ok(())
}

/// Whether a checker detail is about `pasid` ("pasid 3 va 0x...", "pasid 3: ...": violations
/// have no PASID field of their own).
fn names_pasid(detail: &str, pasid: u64) -> bool {
    detail.contains(&format!("pasid {pasid} ")) || detail.contains(&format!("pasid {pasid}:"))
}

/// A buggy variant: loads it, runs `case` leniently, and checks the violation `kind` that
/// names its bug came for the case's PASID. The suite holds the scenario to exactly that
/// violation kind (the catalogue's `violations`).
fn buggy_variant(
    ctx: &mut HostCtx<'_>,
    bug: &str,
    case: &str,
    what: &str,
    kind: ViolationKind,
    rule: &str,
) -> Result<(), HostError> {
    let bdf = ctx.bdf_of(NPU)?;
    load_driver(ctx, &bdf, bug)?;
    let r = lifetime_case(ctx, &bdf, case, what, true)?;
    // Back to the correct driver for whatever runs next.
    let reload = load_driver(ctx, &bdf, "none");
    if let Some((pasid, records)) = r {
        let caught = records
            .iter()
            .filter(|r| {
                matches!(&r.event, Event::Violation { kind: k, detail }
                    if *k == kind && names_pasid(detail, pasid))
            })
            .count();
        ctx.diag(&format!(
            "bug={bug}: {caught} {kind} violation(s) for pasid {pasid}"
        ));
        ctx.check(
            &format!(
                "bug={bug}: the checker names the broken rule, {rule} ({kind} for pasid {pasid})"
            ),
            caught > 0,
            format!("no {kind} violation: the oracle missed the bug or named another"),
        );
    }
    reload
}

fn m6b_no_mm_release(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    buggy_variant(
        ctx,
        "no_mm_release",
        "fork",
        "fork, the binder exits with work queued, the driver ignoring mm release",
        ViolationKind::BindingOutlivedMm,
        "the mm's death ends the binding",
    )
}

fn m6c_ack_without_drain(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    buggy_variant(
        ctx,
        "ack_without_drain",
        "kill",
        "SIGKILL with work queued, the driver not waiting for the drain",
        ViolationKind::DrainNotAwaited,
        "mm release waits for the drain's acknowledgement",
    )
}

fn m7_invalidation(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let bdf = ctx.bdf_of(NPU)?;
    load_driver(ctx, &bdf, "none")?;
    let Some((pasid, records)) = lifetime_case(
        ctx,
        &bdf,
        "m7",
        "MADV_DONTNEED, munmap, mprotect and racing discards under the device",
        false,
    )?
    else {
        return Ok(());
    };
    let invalidations = records
        .iter()
        .filter(|r| pasid_is(r, Step::Invalidate, pasid))
        .count();
    let faults = records
        .iter()
        .filter(|r| pasid_is(r, Step::TranslationFault, pasid))
        .count();
    ctx.diag(&format!(
        "pasid {pasid}: {invalidations} invalidation(s), {faults} translation fault(s) journaled"
    ));
    ctx.check(
        &format!("the driver's mmu notifier invalidated the device's translations (pasid {pasid})"),
        invalidations >= 4,
        format!("{invalidations} invalidate record(s), expected at least one per step"),
    );
    ctx.check(
        "the device reported translation faults instead of using stale translations",
        faults >= 3 && count_records(&records, is_violation) == 0,
        format!(
            "{faults} fault(s), {} violation(s)",
            count_records(&records, is_violation)
        ),
    );
    Ok(())
}

fn is_violation(e: &Event) -> bool {
    matches!(e, Event::Violation { .. })
}

fn m7b_skip_invalidate(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    buggy_variant(
        ctx,
        "skip_invalidate",
        "m7",
        "the M7 steps with the driver skipping invalidations",
        ViolationKind::StaleTranslation,
        "the mmu notifier invalidates the device's translations",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ty: &str, pasid: u32) -> Record {
        let event = match ty {
            "pasid_bind" => Event::PasidBind { pasid, root: 0 },
            "pasid_unbind_begin" => Event::PasidUnbindBegin { pasid },
            "pasid_drained" => Event::PasidDrained { pasid, aborted: 0 },
            "pasid_unbind_ack" => Event::PasidUnbindAck { pasid },
            "pasid_released" => Event::PasidReleased { pasid },
            "page_walk" => Event::PageWalk {
                pasid,
                va: 0,
                pa: None,
            },
            other => panic!("no such test record {other}"),
        };
        Record {
            seq: 0,
            t_ns: 0,
            event,
        }
    }

    #[test]
    fn test_lifecycle_in_order() {
        let mut drained = rec("pasid_drained", 3);
        drained.event = Event::PasidDrained {
            pasid: 3,
            aborted: 5,
        };
        let recs = vec![
            rec("pasid_bind", 3),
            rec("page_walk", 3),
            rec("pasid_unbind_begin", 3),
            drained,
            rec("pasid_unbind_ack", 3),
            rec("pasid_released", 3),
            rec("pasid_bind", 4),
        ];
        let l = Lifecycle::of(&recs, 3);
        assert!(l.in_order(), "{l:?}");
        assert_eq!(l.aborted, 5);
        // Another PASID's records do not count.
        assert!(!Lifecycle::of(&recs, 4).in_order());
    }

    #[test]
    fn test_lifecycle_out_of_order_or_twice() {
        let recs = vec![
            rec("pasid_bind", 1),
            rec("pasid_unbind_ack", 1),
            rec("pasid_unbind_begin", 1),
            rec("pasid_drained", 1),
            rec("pasid_released", 1),
        ];
        assert!(!Lifecycle::of(&recs, 1).in_order());
        let recs = vec![
            rec("pasid_bind", 1),
            rec("pasid_unbind_begin", 1),
            rec("pasid_drained", 1),
            rec("pasid_unbind_ack", 1),
            rec("pasid_released", 1),
            rec("pasid_unbind_begin", 1),
        ];
        assert!(!Lifecycle::of(&recs, 1).in_order());
    }

    #[test]
    fn test_names_pasid() {
        assert!(names_pasid("pasid 3 va 0x1000: cached", 3));
        assert!(names_pasid(
            "pasid 3: its page tables map no user address",
            3
        ));
        assert!(!names_pasid("pasid 31: its page tables", 3));
        assert!(!names_pasid("pasid 13 va 0x1000", 3));
    }

    #[test]
    fn test_pasid_of() {
        assert_eq!(
            pasid_of("KTAP version 1\n1..3\n# pasid 17\nok 1 x\n"),
            Some(17)
        );
        assert_eq!(pasid_of("ok 1 x\n"), None);
    }
}
