//! The invariant checker behind [`crate::Journal`]: a small state machine fed with every
//! event, answering which invariants (design.md §5) the event violates.
//!
//! The checker only interprets events; the endpoint, bus and device models emit them. This
//! module holds the state and [`Checker::check`] (one match over the event kinds); the rules
//! live by family in `dma` (bus mastering and the mapped set), `interrupt` (deliveries the
//! function's state forbids), `pasid` (PASID/SVA lifetimes) and `ranges` (the IOVA range map).
//! State it derives:
//!
//! - **Mapped set**: `DmaMapped` adds a range (replacing whatever overlapped), `DmaUnmapped`
//!   removes one; `ClientDisconnected` (and a `ClientConnected` that was not preceded by one)
//!   removes everything. Adjacent ranges with the same backing merge.
//! - **Unmapped history**: the parts of the mapped set that were removed and not mapped again,
//!   so a DMA there is [`ViolationKind::DmaAfterUnmap`] rather than
//!   [`ViolationKind::DmaOutsideMap`]. Only what was really mapped enters it (QEMU unmaps
//!   `0xfef00000..2^64` at power-off; the never-mapped parts of that stay "outside").
//! - **Bus master** (Command bit 2), **Interrupt Disable** (Command bit 10), **power state**
//!   (`Power.to == 3` is D3hot), **link** (`Link`; a "lost-connection" reset also brings it up:
//!   the next client gets a fresh card).
//! - **Reset**: `ResetBegin` puts the function in reset (Command back to 0, D0); `ResetEnd`
//!   (of any kind: "the function may be re-enabled") leaves it awaiting re-enable until a
//!   `Command` event sets Bus Master again. DMA in either phase is
//!   [`ViolationKind::DmaDuringReset`].
//! - **PASIDs**: `PasidUnbindAck` and `PasidReleased` mark a PASID, `PasidBind` clears the mark.
//! - **Stale translations**: a `StaleTranslationUsed` is held until an `Invalidate` of its
//!   PASID covering its VA arrives (then it was legal: Linux changes the page tables, then
//!   invalidates secondary TLBs — the mmu notifier — and only then frees the pages; a device
//!   may use its cached entry in between) or the PASID's binding ends (`PasidUnbindBegin`,
//!   `PasidReleased`, a new `PasidBind`): then it is a `stale_translation` violation, a missed
//!   invalidation. A use after the unbind was acknowledged is a violation at once.
//! - **Lifetime of the binding vs the mm** (docs/sva.md, the lifetime rules): a PASID is
//!   *draining* from `PasidUnbindBegin` to its `PasidUnbindAck`. The mailbox takes no
//!   INVALIDATE while an UNBIND drains, so the driver must keep the address space unchanged
//!   until the acknowledgement: a stale use, or an `AddressSpaceEmpty`, of a draining PASID is
//!   [`ViolationKind::DrainNotAwaited`] at once. An `AddressSpaceEmpty` of a PASID that is
//!   bound and not draining is [`ViolationKind::BindingOutlivedMm`] (once per binding): the
//!   mm was torn down under the binding; the stale uses held for that PASID, and those that
//!   follow until its binding ends, are this one bug's and get no verdict of their own.
//!
//! Interrupts: an MSI-X outcome `delivered` (also `delivered-after-hold`, a vector held
//! pending and sent later) or `pending` while Bus Master is off (including
//! after a reset until re-enabled), in D3hot, in reset or with the link down is
//! [`ViolationKind::InterruptWhileDisabled`]; so is `intx-delivered` in D3hot, in reset, with
//! the link down or with Interrupt Disable set (INTx is not a memory request: Bus Master does
//! not gate it). Other [`InterruptOutcome`]s (`refused:…`, `intx-held:…`, …) are the device
//! obeying.
//!
//! Each event yields at most one violation from the device-state/map chain (the most specific:
//! link down, then reset, then D3hot, then Bus Master, then the map) plus, for a PASID-tagged
//! access, [`ViolationKind::PasidAfterUnbind`], which is a distinct invariant.
//!
//! # Memory bounds
//!
//! - Mapped set: at most [`MAX_MAPPED_RANGES`] ranges (the server's own mapping limit). A map
//!   that would exceed it is not tracked and the checker stops judging map membership
//!   (`DmaOutsideMap`/`DmaAfterUnmap`) until the mapped set is known again (the next client
//!   disconnect or connect): no false violations from a truncated map, and a
//!   [`ViolationKind::CheckerDegraded`] record says the oracle went partly blind.
//! - Unmapped history: at most [`MAX_UNMAPPED_RANGES`] ranges, adjacent or overlapping ones
//!   merged; beyond that the least recently unmapped ranges are forgotten, an eighth of the
//!   bound at once (so trimming is amortized constant time: a disconnect may move 2^20 ranges
//!   here). A later DMA to a forgotten range is reported as `DmaOutsideMap` instead (still a
//!   violation; the detail says how many ranges were forgotten).
//! - PASIDs: only unbound or released PASIDs are remembered, at most [`MAX_TRACKED_PASIDS`];
//!   beyond that the oldest marks are forgotten, an eighth at once (a later access through a
//!   forgotten PASID goes unreported; each such trim is a [`ViolationKind::CheckerDegraded`]
//!   record).
//! - Everything else is a fixed handful of scalars.

use std::collections::{BTreeMap, BTreeSet};

mod dma;
mod interrupt;
mod pasid;
mod ranges;

use crate::event::{Dir, Event, InterruptOutcome, ResetKind, ViolationKind};

use self::pasid::PasidGone;
use self::ranges::Ranges;

/// The checker's verdict on one event: violations to record right after it.
pub type Findings = Vec<(ViolationKind, String)>;

/// Most mapped ranges tracked: the vfio-user server's own limit on simultaneous mappings
/// (`pcisim_vfio_user::dma::MAX_MAPPINGS`; pcisim-pci checks at compile time that they agree).
pub const MAX_MAPPED_RANGES: usize = 1 << 20;
/// Most ranges kept in the history of unmapped (and not re-mapped) ranges.
pub const MAX_UNMAPPED_RANGES: usize = 4096;
/// Most PASIDs remembered as unbound or released.
pub const MAX_TRACKED_PASIDS: usize = 4096;

/// Most stale translation uses awaiting their invalidation; beyond it the oldest is judged at
/// once (a violation).
pub const MAX_PENDING_STALE: usize = 4096;

/// Command.Bus Master Enable.
const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command.Interrupt Disable (INTx emulation).
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// PMCSR.PowerState for D3hot.
const D3HOT: u8 = 3;

/// Checker state (see the module documentation for what is tracked and its bounds).
#[derive(Debug)]
pub struct Checker {
    /// Events seen (a clock for eviction order).
    events: u64,
    /// Last Command register value.
    command: u16,
    /// Last PMCSR.PowerState.
    power: u8,
    /// Link up.
    link_up: bool,
    /// A reset of this kind is in progress.
    in_reset: Option<ResetKind>,
    /// A reset of this kind ended and Bus Master has not been set again since.
    awaiting_reenable: Option<ResetKind>,
    /// Mapped ranges → backed by an fd.
    mapped: Ranges<bool>,
    /// A map was not tracked (limit reached): map membership cannot be judged.
    mapped_untracked: bool,
    /// Ranges unmapped and not mapped again → when (event count).
    unmapped: Ranges<u64>,
    /// Unmapped-history ranges forgotten to stay within the bound.
    unmapped_forgotten: u64,
    /// PASIDs that may not be used.
    pasids: BTreeMap<u32, PasidGone>,
    /// Stale translation uses not yet judged: (pasid, va, detail). Each becomes a violation
    /// unless an invalidation covering it arrives before the PASID's unbind or release.
    stale_pending: Vec<(u32, u64, String)>,
    /// PASIDs whose unbind began and was not acknowledged yet (draining).
    draining: BTreeSet<u32>,
    /// PASIDs whose binding outlived their mm (reported) → stale uses attributed to it since.
    mm_gone: BTreeMap<u32, u64>,
}

impl Default for Checker {
    fn default() -> Self {
        Checker {
            events: 0,
            command: 0,
            power: 0,
            link_up: true,
            in_reset: None,
            awaiting_reenable: None,
            mapped: Ranges::default(),
            mapped_untracked: false,
            unmapped: Ranges::default(),
            unmapped_forgotten: 0,
            pasids: BTreeMap::new(),
            stale_pending: Vec::new(),
            draining: BTreeSet::new(),
            mm_gone: BTreeMap::new(),
        }
    }
}

fn dir_name(dir: Dir) -> &'static str {
    match dir {
        Dir::Read => "read",
        Dir::Write => "write",
    }
}

/// A DMA access, formatted only when a violation needs it ("dma write 0x1000+0x40", with
/// " pasid N" when tagged and the count when aggregated): the common, clean case allocates
/// nothing.
struct AccessText {
    what: &'static str,
    dir: Dir,
    pasid: Option<u32>,
    iova: u64,
    len: u64,
    count: u64,
    bytes: u64,
}

impl std::fmt::Display for AccessText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {:#x}+{:#x}",
            self.what,
            dir_name(self.dir),
            self.iova,
            self.len
        )?;
        if let Some(p) = self.pasid {
            write!(f, " pasid {p}")?;
        }
        if self.count != 1 {
            write!(f, " ({} accesses, {} bytes)", self.count, self.bytes)?;
        }
        Ok(())
    }
}

impl Checker {
    /// The violations `event` commits, given everything seen before it.
    pub fn check(&mut self, event: &Event) -> Findings {
        self.events += 1;
        let mut out = Findings::new();
        match event {
            Event::ClientConnected => {
                // A fresh client: anything still mapped belonged to the previous one.
                self.unmap_everything();
                self.command &= !COMMAND_BUS_MASTER;
            }
            Event::ClientDisconnected => {
                self.unmap_everything();
                self.command &= !COMMAND_BUS_MASTER;
            }
            Event::DmaMapped {
                iova, size, backed, ..
            } => out.extend(self.map(*iova, *size, *backed)),
            Event::DmaUnmapped { iova, size } => self.unmap(*iova, *size),
            Event::ResetBegin { kind } => {
                self.in_reset = Some(*kind);
                self.awaiting_reenable = None;
                // Every reset puts configuration space back to power-on: Command 0, D0.
                self.command = 0;
                self.power = 0;
                if *kind == ResetKind::LostConnection {
                    // A new client is a new card in the slot: the injected link-down goes
                    // with the old one (the endpoint brings the link up without a `Link`).
                    self.link_up = true;
                }
            }
            Event::ResetEnd { kind } => {
                self.in_reset = None;
                self.awaiting_reenable = Some(*kind);
            }
            Event::Command { new, .. } => {
                self.command = *new;
                if self.in_reset.is_none() && self.bus_master() {
                    self.awaiting_reenable = None;
                }
            }
            Event::Power { to, .. } => self.power = *to,
            Event::Link { up } => self.link_up = *up,
            Event::Dma {
                dir,
                pasid,
                iova,
                len,
                count,
                bytes,
            } => {
                let what = AccessText {
                    what: "dma",
                    dir: *dir,
                    pasid: *pasid,
                    iova: *iova,
                    len: *len,
                    count: *count,
                    bytes: *bytes,
                };
                if let Some(v) = self.state_forbids_dma(&what) {
                    out.push(v);
                } else if let Some(v) = self.map_violation(&what) {
                    out.push(v);
                }
                out.extend(self.pasid_violation(&what));
            }
            Event::DmaFault {
                dir,
                pasid,
                iova,
                len,
            } => {
                let what = AccessText {
                    what: "faulted dma",
                    dir: *dir,
                    pasid: *pasid,
                    iova: *iova,
                    len: *len,
                    count: 1,
                    bytes: 0,
                };
                // Inside a mapped range without an fd behind it (ROM, PAM windows): no
                // violation. Otherwise the device aimed at memory it was not given.
                out.extend(self.map_violation(&what));
                out.extend(self.pasid_violation(&what));
            }
            Event::DmaRefused { .. } => {}
            Event::Interrupt { vector, outcome } => match outcome {
                InterruptOutcome::Delivered
                | InterruptOutcome::DeliveredAfterHold
                | InterruptOutcome::Pending => {
                    out.extend(self.interrupt_violation(*vector, outcome))
                }
                InterruptOutcome::IntxDelivered => out.extend(self.intx_violation(outcome)),
                // The device obeying the rules, or nothing sent.
                InterruptOutcome::Refused(_)
                | InterruptOutcome::Invalid
                | InterruptOutcome::IntxHeld(_)
                | InterruptOutcome::IntxMasked
                | InterruptOutcome::IntxUnbound
                | InterruptOutcome::IntxError(_) => {}
            },
            Event::PasidBind { pasid, .. } => {
                out.extend(self.judge_stale(*pasid));
                self.pasids.remove(pasid);
                self.end_binding(*pasid);
            }
            Event::PasidUnbindBegin { pasid } => {
                out.extend(self.judge_stale(*pasid));
                out.extend(self.track_draining(*pasid));
            }
            Event::Invalidate { pasid, va, len } => {
                let end = if *len == u64::MAX {
                    u128::MAX
                } else {
                    u128::from(*va) + u128::from(*len)
                };
                let start = if *len == u64::MAX { 0 } else { u128::from(*va) };
                self.stale_pending.retain(|(p, v, _)| {
                    !(*p == *pasid && start <= u128::from(*v) && u128::from(*v) < end)
                });
            }
            Event::PasidUnbindAck { pasid } => {
                self.draining.remove(pasid);
                out.extend(self.mark_pasid(*pasid, |g| g.unbind_acked = true))
            }
            Event::PasidReleased { pasid } => {
                out.extend(self.judge_stale(*pasid));
                self.end_binding(*pasid);
                out.extend(self.mark_pasid(*pasid, |g| g.released = true))
            }
            Event::AddressSpaceEmpty { pasid } => out.extend(self.address_space_empty(*pasid)),
            Event::PageWalk { pasid, va, pa } => {
                if let Some(g) = self.pasids.get(pasid) {
                    let why = match (g.released, g.unbind_acked) {
                        (true, true) => "its mm was released and its unbind acknowledged",
                        (true, false) => "its mm was released",
                        _ => "its unbind was acknowledged",
                    };
                    let result = pa.map_or_else(|| "fault".to_string(), |p| format!("{p:#x}"));
                    out.push((
                        ViolationKind::WalkAfterRelease,
                        format!("page walk pasid {pasid} va {va:#x} (-> {result}) after {why}"),
                    ));
                }
            }
            Event::StaleTranslationUsed {
                pasid,
                va,
                cached_pa,
                walked_pa,
            } => {
                let now =
                    walked_pa.map_or_else(|| "not present".to_string(), |p| format!("{p:#x}"));
                let mut detail = format!(
                    "pasid {pasid} va {va:#x}: cached translation {cached_pa:#x} used, page \
                     tables then said {now}, and no invalidation covered it before the PASID \
                     was unbound"
                );
                if self.pasids.get(pasid).is_some_and(|g| g.unbind_acked) {
                    // Used after the unbind was acknowledged: nothing can make that right.
                    detail.push_str(" (the PASID's unbind was acknowledged)");
                    out.push((ViolationKind::StaleTranslation, detail));
                } else if let Some(n) = self.mm_gone.get_mut(pasid) {
                    // The binding outlived its mm (already a violation): this use is that
                    // bug's consequence, not a missed invalidation of its own.
                    *n += 1;
                } else if self.draining.contains(pasid) {
                    // No INVALIDATE can reach the device while the UNBIND drains: the driver
                    // let the address space change before the drain's acknowledgement.
                    out.push((
                        ViolationKind::DrainNotAwaited,
                        format!(
                            "pasid {pasid} va {va:#x}: cached translation {cached_pa:#x} used \
                             while its unbind was draining, and the page tables then said \
                             {now}: the address space changed before the drain was \
                             acknowledged (the mailbox takes no INVALIDATE during a drain; \
                             mm release must wait for the acknowledgement)"
                        ),
                    ));
                } else {
                    // Legal if the driver's invalidation is merely on its way: the CPU changes
                    // the page tables first and invalidates secondary TLBs before the pages are
                    // freed. Judged at the covering invalidation or at the unbind.
                    self.stale_pending.push((*pasid, *va, detail));
                    if self.stale_pending.len() > MAX_PENDING_STALE {
                        let (_, _, d) = self.stale_pending.remove(0);
                        out.push((ViolationKind::StaleTranslation, d));
                    }
                }
            }
            Event::PasidDrained { .. }
            | Event::TranslationFault { .. }
            | Event::FaultInjected { .. }
            | Event::FlrWithTransactionsPending
            | Event::PendingDelivered { .. }
            | Event::RingError { .. }
            | Event::RingCommandAborted { .. }
            | Event::PostedWritesLanded { .. }
            | Event::Note { .. }
            | Event::Violation { .. } => {}
        }
        out
    }
}

/// What a list over its bound `max` is trimmed to: the oldest eighth goes at once, so trimming
/// (linear in the list) is amortized constant per insertion.
fn trim_target(max: usize) -> usize {
    max - max / 8
}

/// The stamp of the `excess`-th oldest entry. Removing every entry with a smaller stamp (fewer
/// than `excess`), then entries with this stamp until `excess` are gone, removes exactly the
/// `excess` oldest.
fn oldest_cut(stamps: impl Iterator<Item = u64>, excess: usize) -> u64 {
    let mut v: Vec<u64> = stamps.collect();
    if excess == 0 || v.is_empty() {
        return 0;
    }
    let n = excess.min(v.len()) - 1;
    let (_, cut, _) = v.select_nth_unstable(n);
    *cut
}

#[cfg(test)]
#[path = "checker_tests.rs"]
mod tests;
