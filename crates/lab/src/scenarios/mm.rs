//! The guest vfio mm-teardown scenarios M1–M5, run on the host side ([`crate::harness::host`]) in the
//! `gpu` profile (intel-iommu, guest vfio type1).
//!
//! Each runs `pcisim-guest mm-teardown --case ...` (guest-tests/src/mmtear.rs): a guest process
//! opens the GPU through vfio, maps a ring page and a 16 MiB buffer of its own memory, and keeps
//! the GPU's ring streaming FILLs into the buffer; then it exits (M1), is SIGKILLed (M2), forks
//! and exits leaving the child the fds (M3), passes the fds over `SCM_RIGHTS` and exits (M4),
//! or mmaps BAR0 through the device fd, closes every vfio fd and goes on through the mapping
//! (M5). The guest program checks its side (streaming, exit status, progress after the first
//! exit, the group free again once `waitpid` returned).
//!
//! The host then reads the device's journal for the scenario and correlates it with the guest's
//! steps through **marker** DMA mappings (a one-page `VFIO_IOMMU_MAP_DMA` at a known IOVA is a
//! `dma_mapped` record, journaled before the guest's ioctl returns): [`MARK_FIRST_EXIT`] just
//! before the first process goes away, [`MARK_HOLDER`] (M3/M4) by the remaining holder once the
//! first `waitpid` returned, [`MARK_WAITED`] by the guest supervisor after the last `waitpid`
//! returned. It asserts (see [`analyze`]) that the buffer was streamed, that DMA was still
//! running when the process went away (M1/M2) or continued after the first exit (M3/M4) or after
//! the fds were closed (M5), that the device was reset and the process's mappings removed
//! before `waitpid` returned, and that no DMA touched the buffer after its unmap; it reports the
//! reset kind and the order of the teardown (`Bus Master off → reset(flr) → unmap ...`).
//! docs/mm-teardown.md has the figures.

use pcisim_journal::{Dir, Event, Record, Refusal, RingErrorCode};

use crate::harness::host::reset_kinds;
use crate::harness::host::{HostCtx, HostError, HostProgram};
use crate::vm::profile::ProfileId;
use pcisim_guest_wire::MmTeardownOptions;

/// The base of the guest program's IOVA layout (`--iova`).
pub const IOVA: u64 = 0x5000_0000;
/// The ring page: at the base.
pub const RING: u64 = IOVA;
/// The streamed buffer: base + 2 MiB.
pub const BUF: u64 = IOVA + 0x20_0000;
/// Its length (`--buf-kib`): 16 MiB, so that one FILL keeps the engine busy for a few ms and a
/// full ring (127 FILLs) outlasts the guest kernel's exit path. The guest backs it with
/// transparent huge pages: each is one IOMMU superpage, one DMA_MAP (8 in all, not 4096).
pub const BUF_LEN: u64 = 16 << 20;
/// Marker `n` is the page at base + 128 MiB + n pages.
const MARK_BASE: u64 = IOVA + 0x800_0000;
/// Marker: the first process is about to exit, be killed or close its fds.
pub const MARK_FIRST_EXIT: u64 = MARK_BASE;
/// Marker (M3/M4): the remaining holder learnt that the first `waitpid` returned.
pub const MARK_HOLDER: u64 = MARK_BASE + 0x1000;
/// Marker: the guest supervisor's last `waitpid` returned.
pub const MARK_WAITED: u64 = MARK_BASE + 0x2000;

const PAGE: u64 = 0x1000;
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_MASTER: u16 = 1 << 2;

/// How the process goes away: the guest program's `--case` (M1 exit, M2 SIGKILL, M3 fork: the
/// child inherits the fds, M4 the fds passed over `SCM_RIGHTS`, M5 BAR0 mmapped and every vfio
/// fd closed).
pub use pcisim_guest_wire::MmCase as Case;

/// Whether a second process holds the device after the first exit (a [`MARK_HOLDER`]).
fn has_holder(case: Case) -> bool {
    matches!(case, Case::Fork | Case::Pass)
}

/// The guest step's name.
fn what(case: Case) -> &'static str {
    match case {
        Case::Exit => "a vfio user streaming DMA into its buffer exits normally",
        Case::Kill => "a vfio user streaming DMA into its buffer is SIGKILLed",
        Case::Fork => "fork: the child inherits the fds and streams on, the parent exits, then the child",
        Case::Pass => "the fds passed over SCM_RIGHTS: the receiver streams on, the opener exits, then the receiver",
        Case::BarMmap => "BAR0 mmapped through the device fd, every vfio fd closed: streaming through the mapping, then exit",
    }
}

/// `M1 mm-vfio-exit`.
pub const M1: HostProgram = HostProgram {
    name: "m1-mm-vfio-exit",
    profile: ProfileId::Gpu,
    run: m1,
};

/// `M2 mm-vfio-sigkill`.
pub const M2: HostProgram = HostProgram {
    name: "m2-mm-vfio-sigkill",
    profile: ProfileId::Gpu,
    run: m2,
};

/// `M3 mm-vfio-fork`.
pub const M3: HostProgram = HostProgram {
    name: "m3-mm-vfio-fork",
    profile: ProfileId::Gpu,
    run: m3,
};

/// `M4 mm-vfio-scm-rights`.
pub const M4: HostProgram = HostProgram {
    name: "m4-mm-vfio-scm-rights",
    profile: ProfileId::Gpu,
    run: m4,
};

/// `M5 mm-vfio-bar-mmap`.
pub const M5: HostProgram = HostProgram {
    name: "m5-mm-vfio-bar-mmap",
    profile: ProfileId::Gpu,
    run: m5,
};

fn m1(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    run_case(ctx, Case::Exit)
}

fn m2(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    run_case(ctx, Case::Kill)
}

fn m3(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    run_case(ctx, Case::Fork)
}

fn m4(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    run_case(ctx, Case::Pass)
}

fn m5(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    run_case(ctx, Case::BarMmap)
}

fn run_case(ctx: &mut HostCtx<'_>, case: Case) -> Result<(), HostError> {
    let dev = "gpu0";
    let bdf = ctx.bdf_of(dev)?;
    let mark = ctx.control().last_seq(dev)?;
    let argv = ctx.guest_argv(
        dev,
        MmTeardownOptions {
            case,
            bdf: Some(bdf.clone()),
            iova: Some(IOVA),
            buf_kib: Some(BUF_LEN >> 10),
        },
    )?;
    ctx.guest_test(&format!("guest: {}", what(case)), &argv)?;
    // An incomplete window (records dropped before they were read) ends the scenario with
    // "journal window incomplete".
    let window = ctx.window(dev, mark)?;
    ctx.pass(&format!(
        "{dev}: the scenario's journal is complete ({} records, none dropped)",
        window.records.len()
    ));
    let a = analyze(&window.records, case);
    for line in &a.notes {
        ctx.diag(line);
    }
    if let Some(order) = &a.order {
        ctx.progress(&format!("teardown: {order}"));
    }
    for c in &a.checks {
        ctx.check(&format!("{dev}: {}", c.name), c.ok, &c.why);
    }
    Ok(())
}

/// One assertion over the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What must hold.
    pub name: String,
    /// Whether it did.
    pub ok: bool,
    /// Why not (when it did not).
    pub why: String,
}

/// What [`analyze`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Analysis {
    /// The assertions, in order.
    pub checks: Vec<Check>,
    /// Observations for the report (reset kinds, the teardown's order, what was cut off).
    pub notes: Vec<String>,
    /// The teardown's order, one line (`Bus Master off → reset(flr) → unmap ×257 → ...`).
    pub order: Option<String>,
}

impl Analysis {
    fn check(&mut self, name: impl Into<String>, ok: bool, why: impl Into<String>) {
        self.checks.push(Check {
            name: name.into(),
            ok,
            why: if ok { String::new() } else { why.into() },
        });
    }
}

/// The IOVA range a record is about: `[iova, iova + len|size)`.
fn range(r: &Record) -> Option<(u64, u64)> {
    let (iova, len) = match r.event {
        Event::Dma { iova, len, .. }
        | Event::DmaFault { iova, len, .. }
        | Event::DmaRefused { iova, len, .. } => (iova, len),
        Event::DmaMapped { iova, size, .. } | Event::DmaUnmapped { iova, size } => (iova, size),
        Event::PostedWritesLanded { iova, bytes } => (iova, bytes),
        _ => return None,
    };
    Some((iova, iova.saturating_add(len)))
}

fn overlaps(r: &Record, lo: u64, hi: u64) -> bool {
    range(r).is_some_and(|(a, b)| a < hi && lo < b)
}

/// The process's own mappings: the ring page and the buffer.
fn touches_process_memory(r: &Record) -> bool {
    overlaps(r, RING, RING + PAGE) || overlaps(r, BUF, BUF + BUF_LEN)
}

fn is_marker(r: &Record, at: u64) -> bool {
    matches!(r.event, Event::DmaMapped { iova, .. } if iova == at)
}

fn is_buffer_write(r: &Record) -> bool {
    matches!(
        r.event,
        Event::Dma {
            dir: Dir::Write,
            ..
        }
    ) && overlaps(r, BUF, BUF + BUF_LEN)
}

/// A Command change that clears Bus Master Enable.
fn clears_master(r: &Record) -> bool {
    matches!(r.event, Event::Command { old, new }
        if old & COMMAND_MASTER != 0 && new & COMMAND_MASTER == 0)
}

fn is_reset_begin(r: &Record) -> bool {
    matches!(r.event, Event::ResetBegin { .. })
}

fn is_unmap(r: &Record) -> bool {
    matches!(r.event, Event::DmaUnmapped { .. })
}

fn is_refused(r: &Record) -> bool {
    matches!(r.event, Event::DmaRefused { .. })
}

/// A record that belongs to the device's teardown: Bus Master cleared, an access refused for
/// it or for a reset, a reset, or an unmap of the process's memory. (A disabling Command change
/// is journaled after the accesses it cut off drained: the refusals come first.)
fn is_teardown(r: &Record) -> bool {
    clears_master(r)
        || is_reset_begin(r)
        || (is_unmap(r) && touches_process_memory(r))
        || matches!(
            r.event,
            Event::DmaRefused {
                reason: Refusal::BusMasterDisabled | Refusal::Resetting,
                ..
            }
        )
}

/// A record as one line of JSON (for a check's explanation).
fn json(r: &Record) -> String {
    serde_json::to_string(r).unwrap_or_default()
}

/// Whether the `dma_unmapped` records cover `[lo, hi)` completely.
fn covered(unmapped: &[(u64, u64)], lo: u64, hi: u64) -> Result<(), u64> {
    let mut v: Vec<(u64, u64)> = unmapped.to_vec();
    v.sort_unstable();
    let mut at = lo;
    for (a, b) in v {
        if a > at {
            break;
        }
        at = at.max(b);
        if at >= hi {
            return Ok(());
        }
    }
    Err(at)
}

/// A short label for the teardown's order, or `None` for records left out of it.
fn label(r: &Record) -> Option<String> {
    Some(match &r.event {
        Event::Command { old, new } => {
            let (o, n) = (*old, *new);
            if clears_master(r) {
                "Bus Master off".into()
            } else if o & COMMAND_MASTER == 0 && n & COMMAND_MASTER != 0 {
                "Bus Master on".into()
            } else if o & COMMAND_MEMORY != 0 && n & COMMAND_MEMORY == 0 {
                "Memory off".into()
            } else if o & COMMAND_MEMORY == 0 && n & COMMAND_MEMORY != 0 {
                "Memory on".into()
            } else {
                format!("Command 0x{o:x}->0x{n:x}")
            }
        }
        Event::ResetBegin { kind } => format!("reset({kind})"),
        Event::DmaUnmapped { .. } if touches_process_memory(r) => "unmap (process memory)".into(),
        Event::DmaUnmapped { .. } => "unmap (other)".into(),
        Event::DmaMapped { .. } if is_marker(r, MARK_WAITED) => "[waitpid returned]".into(),
        Event::DmaMapped { .. } => "map".into(),
        Event::Dma { .. } if touches_process_memory(r) => "DMA".into(),
        Event::Dma { .. } => "DMA (elsewhere)".into(),
        Event::DmaRefused { reason, .. } => format!("DMA refused ({reason})"),
        Event::DmaFault { .. } => "DMA fault".into(),
        Event::Power { from, to } => format!("D{from}->D{to}"),
        Event::Interrupt { outcome, .. } => format!("interrupt {outcome}"),
        Event::RingCommandAborted { .. } => "ring command aborted by reset".into(),
        Event::RingError { code, .. } => format!("ring error {code}"),
        Event::Note { .. } => "note".into(),
        Event::ClientConnected => "client_connected".into(),
        Event::ClientDisconnected => "client_disconnected".into(),
        Event::Violation { .. } => "violation".into(),
        Event::Link { .. } => "link".into(),
        _ => return None,
    })
}

/// The labels of `records`, runs of the same label collapsed (`unmap (process memory) ×257`).
fn collapse(records: &[Record]) -> String {
    let mut out: Vec<(String, usize)> = Vec::new();
    for l in records.iter().filter_map(label) {
        match out.last_mut() {
            Some((last, n)) if *last == l => *n += 1,
            _ => out.push((l, 1)),
        }
    }
    out.into_iter()
        .map(|(l, n)| if n == 1 { l } else { format!("{l} ×{n}") })
        .collect::<Vec<_>>()
        .join(" → ")
}

/// The assertions over a scenario's journal (`records`: everything the GPU journaled while it
/// ran, oldest first). Each check names what must hold; the notes say what was seen.
pub fn analyze(records: &[Record], case: Case) -> Analysis {
    let mut a = Analysis::default();
    let find = |iova: u64, from: usize| {
        records[from.min(records.len())..]
            .iter()
            .position(|r| is_marker(r, iova))
            .map(|i| i + from)
    };
    let first = find(MARK_FIRST_EXIT, 0);
    let holder = if has_holder(case) {
        first.and_then(|f| find(MARK_HOLDER, f + 1))
    } else {
        first
    };
    let waited = holder.and_then(|h| find(MARK_WAITED, h + 1));
    let (Some(first), Some(last), Some(waited)) = (first, holder, waited) else {
        a.check(
            "the guest's markers are journaled in order",
            false,
            format!(
                "first-exit marker: {}, {}waitpid marker: {}",
                if first.is_some() { "yes" } else { "missing" },
                if has_holder(case) {
                    format!(
                        "holder marker: {}, ",
                        if holder.is_some() { "yes" } else { "missing" }
                    )
                } else {
                    String::new()
                },
                if waited.is_some() { "yes" } else { "missing" },
            ),
        );
        return a;
    };
    a.check("the guest's markers are journaled in order", true, "");

    let before = &records[..first];
    let streamed = before.iter().filter(|r| is_buffer_write(r)).count();
    a.check(
        "the device streamed into the process's buffer before the first exit",
        streamed > 0,
        "no DMA write to the buffer before the first-exit marker",
    );

    // The teardown: from the first Bus Master clear, reset or unmap of the process's memory
    // after the last holder marker, up to the waitpid marker.
    let teardown = records[last + 1..waited]
        .iter()
        .position(is_teardown)
        .map(|i| i + last + 1);

    match case {
        Case::Fork | Case::Pass => {
            let between = &records[first + 1..last];
            let torn: Vec<&Record> = between.iter().filter(|r| is_teardown(r)).collect();
            let who = if case == Case::Fork {
                "the parent"
            } else {
                "the opener"
            };
            a.check(
                format!(
                    "{who}'s exit left the device running (no Bus Master clear, reset or unmap of the process's memory between its exit and the holder's marker)"
                ),
                torn.is_empty(),
                format!(
                    "{} teardown records, first: {}",
                    torn.len(),
                    torn.first().map(|r| json(r)).unwrap_or_default()
                ),
            );
            let after = &records[last + 1..teardown.unwrap_or(waited)];
            let n = after.iter().filter(|r| is_buffer_write(r)).count();
            a.check(
                format!(
                    "DMA continued for the {} after {who}'s exit completed",
                    if case == Case::Fork {
                        "child"
                    } else {
                        "receiver"
                    }
                ),
                n > 0,
                "no DMA write to the buffer between the holder's marker and the teardown",
            );
        }
        Case::Exit | Case::Kill | Case::BarMmap => {
            let after = &records[first + 1..teardown.unwrap_or(waited)];
            let n = after.iter().filter(|r| is_buffer_write(r)).count();
            let what = match case {
                Case::Exit => "the device was still writing the buffer as the process exited",
                Case::Kill => "the device was still writing the buffer as the process was killed",
                _ => "DMA continued through the BAR mapping after every vfio fd was closed",
            };
            a.check(
                what,
                n > 0,
                "no DMA write to the buffer between the marker and the teardown",
            );
        }
    }

    let Some(td) = teardown else {
        a.check(
            "the device was reset and the process's memory unmapped before waitpid returned",
            false,
            "no Bus Master clear, reset or unmap of the process's memory before the waitpid marker",
        );
        return a;
    };
    let window = &records[td..waited];
    let (kinds, paired) = reset_kinds(window);
    a.notes.push(format!(
        "teardown (between the last holder's marker and waitpid): resets {:?}",
        kinds.iter().map(|k| k.name()).collect::<Vec<_>>()
    ));
    a.check(
        format!(
            "the device was reset before waitpid returned ({})",
            if kinds.is_empty() {
                "no reset".to_string()
            } else {
                kinds
                    .iter()
                    .map(|k| format!("kind={k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ),
        !kinds.is_empty() && paired,
        if kinds.is_empty() {
            "no reset_begin between the teardown's start and the waitpid marker".to_string()
        } else {
            "a reset_begin without its reset_end before the waitpid marker".to_string()
        },
    );
    let unmapped: Vec<(u64, u64)> = window
        .iter()
        .filter(|r| is_unmap(r))
        .filter_map(range)
        .collect();
    let ring = covered(&unmapped, RING, RING + PAGE);
    let buf = covered(&unmapped, BUF, BUF + BUF_LEN);
    a.check(
        "the process's ring and buffer were unmapped before waitpid returned",
        ring.is_ok() && buf.is_ok(),
        format!(
            "not covered by dma_unmapped before the waitpid marker: {}",
            [("ring", ring, RING), ("buffer", buf, BUF)]
                .iter()
                .filter_map(|(n, r, _)| r.err().map(|at| format!("{n} from 0x{at:x}")))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    // No DMA to the process's memory once any of it was unmapped (the checker judges each
    // page; this is the scenario's own, stricter, reading).
    let first_unmap = records[last + 1..]
        .iter()
        .position(|r| is_unmap(r) && touches_process_memory(r))
        .map(|i| i + last + 1);
    if let Some(u) = first_unmap {
        let late: Vec<&Record> = records[u + 1..]
            .iter()
            .filter(|r| {
                matches!(r.event, Event::Dma { .. } | Event::DmaFault { .. })
                    && touches_process_memory(r)
            })
            .collect();
        a.check(
            "no DMA to the process's memory after its unmap",
            late.is_empty(),
            format!(
                "{} DMA records after the first unmap, first: {}",
                late.len(),
                late.first().map(|r| json(r)).unwrap_or_default()
            ),
        );
    }

    // What the teardown looked like, for the report.
    let pos = |p: &dyn Fn(&Record) -> bool| window.iter().position(p);
    let bme = pos(&clears_master);
    let reset = pos(&is_reset_begin);
    let unmap = pos(&|r| is_unmap(r) && touches_process_memory(r));
    let refused = window.iter().filter(|r| is_refused(r)).count();
    let aborted = window.iter().any(|r| {
        matches!(
            r.event,
            Event::RingCommandAborted { .. }
                | Event::RingError {
                    code: RingErrorCode::DmaRefused,
                    ..
                }
        )
    });
    let mut firsts: Vec<(usize, &str)> =
        [(bme, "Bus Master off"), (reset, "reset"), (unmap, "unmap")]
            .into_iter()
            .filter_map(|(p, n)| p.map(|p| (p, n)))
            .collect();
    firsts.sort_unstable();
    a.notes.push(format!(
        "first of each: {}",
        firsts
            .iter()
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(" → ")
    ));
    a.check(
        "the kernel stopped the device while the ring's DMA was still running (an access refused once Bus Master was off)",
        refused > 0,
        format!(
            "no refused access in the teardown: the ring had drained before it{}",
            if aborted { " (a ring command was aborted by the reset)" } else { "" }
        ),
    );
    let order = collapse(&records[td..=waited]);
    a.notes.push(format!("teardown order: {order}"));
    a.order = Some(order);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcisim_journal::ResetKind;

    fn rec(event: Event) -> Record {
        Record {
            seq: 0,
            t_ns: 0,
            event,
        }
    }
    fn mapped(iova: u64, size: u64) -> Record {
        rec(Event::DmaMapped {
            iova,
            size,
            backed: true,
            read: true,
            write: true,
        })
    }
    fn marker(iova: u64) -> Record {
        mapped(iova, PAGE)
    }
    fn write(iova: u64, len: u64) -> Record {
        rec(Event::Dma {
            dir: Dir::Write,
            pasid: None,
            iova,
            len,
            count: 1,
            bytes: len,
        })
    }
    fn unmap(iova: u64, size: u64) -> Record {
        rec(Event::DmaUnmapped { iova, size })
    }
    fn command(old: u16, new: u16) -> Record {
        rec(Event::Command { old, new })
    }
    fn reset(kind: ResetKind) -> [Record; 2] {
        [
            rec(Event::ResetBegin { kind }),
            rec(Event::ResetEnd { kind }),
        ]
    }
    fn ring_refused(slot: u32, detail: &str) -> Record {
        rec(Event::RingError {
            code: RingErrorCode::DmaRefused,
            slot,
            detail: detail.into(),
        })
    }

    /// What a correct kernel shows for M1: streaming, the exit marker, more streaming, Bus
    /// Master off, a refused access, FLR, the unmaps, D3hot, then the waitpid marker.
    fn good_exit() -> Vec<Record> {
        let mut v = vec![
            mapped(RING, PAGE),
            write(BUF, BUF_LEN),
            marker(MARK_FIRST_EXIT),
            write(BUF, BUF_LEN / 2),
            rec(Event::DmaRefused {
                dir: Dir::Write,
                iova: BUF + BUF_LEN / 2,
                len: PAGE,
                reason: Refusal::BusMasterDisabled,
            }),
            ring_refused(72, "FILL destination: ..."),
            command(0x406, 0x402),
            command(0x402, 0x400),
        ];
        v.extend(reset(ResetKind::Flr));
        v.push(unmap(RING, PAGE));
        v.push(unmap(BUF, BUF_LEN / 2));
        v.push(unmap(BUF + BUF_LEN / 2, BUF_LEN / 2));
        v.push(unmap(MARK_FIRST_EXIT, PAGE));
        v.push(rec(Event::Power { from: 0, to: 3 }));
        v.push(marker(MARK_WAITED));
        v
    }

    fn failed(a: &Analysis) -> Vec<String> {
        a.checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.clone())
            .collect()
    }

    #[test]
    fn test_a_correct_teardown_passes_and_is_described() {
        let a = analyze(&good_exit(), Case::Exit);
        assert_eq!(failed(&a), Vec::<String>::new(), "{a:#?}");
        assert_eq!(a.checks.len(), 7);
        assert!(a.checks.iter().any(|c| c.name.contains("kind=flr")));
        assert_eq!(
            a.order.as_deref(),
            Some(
                "DMA refused (bus_master_disabled) → ring error dma_refused → Bus Master off → \
                 Memory off → reset(flr) → unmap (process memory) ×3 → unmap (other) → D0->D3 → \
                 [waitpid returned]"
            )
        );
        assert!(a
            .notes
            .iter()
            .any(|n| n.contains("Bus Master off → reset → unmap")));
    }

    #[test]
    fn test_each_check_can_fail() {
        // No reset at all.
        let v: Vec<Record> = good_exit()
            .into_iter()
            .filter(|r| !matches!(r.event, Event::ResetBegin { .. } | Event::ResetEnd { .. }))
            .collect();
        assert_eq!(
            failed(&analyze(&v, Case::Exit)),
            ["the device was reset before waitpid returned (no reset)"]
        );
        // Part of the buffer still mapped when waitpid returned (its unmap came later).
        let mut v = good_exit();
        let i = v
            .iter()
            .position(|r| r == &unmap(BUF + BUF_LEN / 2, BUF_LEN / 2))
            .unwrap();
        let late = v.remove(i);
        v.push(late);
        assert_eq!(
            failed(&analyze(&v, Case::Exit)),
            ["the process's ring and buffer were unmapped before waitpid returned"]
        );
        // DMA to the buffer after its unmap.
        let mut v = good_exit();
        let i = v.iter().position(|r| r == &unmap(RING, PAGE)).unwrap();
        v.insert(i + 1, write(BUF + 0x1000, 0x1000));
        assert_eq!(
            failed(&analyze(&v, Case::Exit)),
            ["no DMA to the process's memory after its unmap"]
        );
        // The ring had drained before the kernel stopped the device: nothing refused.
        let v: Vec<Record> = good_exit().into_iter().filter(|r| !is_refused(r)).collect();
        assert_eq!(
            failed(&analyze(&v, Case::Exit)),
            ["the kernel stopped the device while the ring's DMA was still running (an access refused once Bus Master was off)"]
        );
        // Nothing streamed before the first exit.
        let mut v = good_exit();
        v.remove(1);
        assert_eq!(
            failed(&analyze(&v, Case::Exit)),
            ["the device streamed into the process's buffer before the first exit"]
        );
        // The ring was idle when the process exited.
        let mut v = good_exit();
        v.remove(3);
        assert_eq!(
            failed(&analyze(&v, Case::Exit)),
            ["the device was still writing the buffer as the process exited"]
        );
        // No teardown at all before waitpid returned.
        let v: Vec<Record> = good_exit()
            .into_iter()
            .filter(|r| !is_teardown(r))
            .collect();
        assert_eq!(
            failed(&analyze(&v, Case::Exit)),
            ["the device was reset and the process's memory unmapped before waitpid returned"]
        );
        // A missing marker.
        let v: Vec<Record> = good_exit()
            .into_iter()
            .filter(|r| !is_marker(r, MARK_WAITED))
            .collect();
        assert_eq!(
            failed(&analyze(&v, Case::Kill)),
            ["the guest's markers are journaled in order"]
        );
    }

    /// M3/M4: the first exit, DMA, the holder's marker, DMA for the holder, then the
    /// teardown.
    fn good_fork() -> Vec<Record> {
        let mut v = good_exit();
        let i = v.iter().position(is_refused).unwrap();
        // [.., marker A, write, (here) refused, ..]
        v.insert(i, marker(MARK_HOLDER));
        v.insert(i + 1, write(BUF, BUF_LEN));
        v
    }

    #[test]
    fn test_fork_and_pass_need_dma_after_the_first_exit_and_no_early_teardown() {
        for case in [Case::Fork, Case::Pass] {
            let a = analyze(&good_fork(), case);
            assert_eq!(failed(&a), Vec::<String>::new(), "{a:#?}");
            // The first exit reset the device: the holder's DMA is gone too.
            let mut v = good_fork();
            let m = v.iter().position(|r| is_marker(r, MARK_HOLDER)).unwrap();
            let [b, e] = reset(ResetKind::Flr);
            v.insert(m, b);
            v.insert(m + 1, e);
            let f = failed(&analyze(&v, case));
            assert_eq!(f.len(), 1, "{f:?}");
            assert!(f[0].contains("exit left the device running"), "{f:?}");
            // No DMA after the first exit completed.
            let mut v = good_fork();
            v.remove(m + 1);
            let f = failed(&analyze(&v, case));
            assert_eq!(f.len(), 1, "{f:?}");
            assert!(f[0].starts_with("DMA continued for the"), "{f:?}");
            // Without the holder's marker the window cannot be placed.
            assert_eq!(
                failed(&analyze(&good_exit(), case)),
                ["the guest's markers are journaled in order"]
            );
        }
    }

    #[test]
    fn test_bar_mmap_needs_dma_after_the_fds_closed() {
        assert!(failed(&analyze(&good_exit(), Case::BarMmap)).is_empty());
        let mut v = good_exit();
        v.remove(3);
        assert_eq!(
            failed(&analyze(&v, Case::BarMmap)),
            ["DMA continued through the BAR mapping after every vfio fd was closed"]
        );
    }

    #[test]
    fn test_coverage_and_labels() {
        assert_eq!(covered(&[(0, 10), (10, 20)], 0, 20), Ok(()));
        assert_eq!(covered(&[(10, 20), (0, 12)], 0, 20), Ok(()));
        assert_eq!(covered(&[(0, 10), (11, 20)], 0, 20), Err(10));
        assert_eq!(covered(&[], 5, 6), Err(5));
        assert_eq!(covered(&[(0, 100)], 5, 6), Ok(()));
        let recs = [
            write(BUF, 4),
            write(0x9000_0000, 4),
            ring_refused(3, "x"),
            // Left out of the order.
            rec(Event::PageWalk {
                pasid: 1,
                va: 0,
                pa: None,
            }),
        ];
        assert_eq!(
            collapse(&recs),
            "DMA → DMA (elsewhere) → ring error dma_refused"
        );
        assert!(!touches_process_memory(&unmap(BUF + BUF_LEN, PAGE)));
        assert!(touches_process_memory(&unmap(BUF + BUF_LEN - 1, PAGE)));
    }
}
