//! The invariant checker behind [`crate::Journal`]: a small state machine fed with every
//! event, answering which invariants (design.md §5) the event violates.
//!
//! The checker only interprets events; the endpoint, bus and device models emit them. State it
//! derives:
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

use crate::event::{Dir, Event, InterruptOutcome, ResetKind, ViolationKind};

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
/// One past the last IOVA.
const SPACE_END: u128 = 1 << 64;

/// `iova..iova+len` as a half-open u128 range clipped to the address space (a range may end at
/// exactly 2^64).
fn span(iova: u64, len: u64) -> (u128, u128) {
    let s = u128::from(iova);
    (s, (s + u128::from(len)).min(SPACE_END))
}

/// The bytes an access touches; an empty access is checked as its first byte.
fn access_span(iova: u64, len: u64) -> (u128, u128) {
    span(iova, len.max(1))
}

/// Disjoint half-open ranges of the IOVA space, each with a value.
#[derive(Debug, Clone)]
struct Ranges<V> {
    /// start → (end, value); ranges never overlap.
    map: BTreeMap<u128, (u128, V)>,
}

impl<V> Default for Ranges<V> {
    fn default() -> Self {
        Ranges {
            map: BTreeMap::new(),
        }
    }
}

impl<V: Copy> Ranges<V> {
    fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether one range contains all of `s..e` (the common case, without allocating).
    fn contains(&self, s: u128, e: u128) -> bool {
        self.map
            .range(..=s)
            .next_back()
            .is_some_and(|(_, &(end, _))| end >= e)
    }

    /// Ranges overlapping `s..e`, in order.
    fn overlapping(&self, s: u128, e: u128) -> Vec<(u128, u128, V)> {
        let mut out = Vec::new();
        if s >= e {
            return out;
        }
        if let Some((&k, &(end, v))) = self.map.range(..s).next_back() {
            if end > s {
                out.push((k, end, v));
            }
        }
        out.extend(self.map.range(s..e).map(|(&k, &(end, v))| (k, end, v)));
        out
    }

    /// The parts of `s..e` no range covers, in order.
    fn gaps(&self, s: u128, e: u128) -> Vec<(u128, u128)> {
        let mut out = Vec::new();
        let mut at = s;
        for (k, end, _) in self.overlapping(s, e) {
            if k > at {
                out.push((at, k));
            }
            at = at.max(end);
        }
        if at < e {
            out.push((at, e));
        }
        out
    }

    /// Remove `s..e` (splitting ranges that stick out); returns the removed pieces.
    fn carve(&mut self, s: u128, e: u128) -> Vec<(u128, u128, V)> {
        let hit = self.overlapping(s, e);
        let mut removed = Vec::with_capacity(hit.len());
        for (k, end, v) in hit {
            self.map.remove(&k);
            if k < s {
                self.map.insert(k, (s, v));
            }
            if end > e {
                self.map.insert(e, (end, v));
            }
            removed.push((k.max(s), end.min(e), v));
        }
        removed
    }

    /// Set `s..e` to `v`, merging with an adjacent range when `merge` allows.
    fn insert(&mut self, s: u128, e: u128, v: V, merge: impl Fn(V, V) -> Option<V>) {
        if s >= e {
            return;
        }
        self.carve(s, e);
        let (mut s, mut e, mut v) = (s, e, v);
        if let Some((&k, &(end, lv))) = self.map.range(..s).next_back() {
            if end == s {
                if let Some(m) = merge(lv, v) {
                    self.map.remove(&k);
                    (s, v) = (k, m);
                }
            }
        }
        if let Some(&(end, rv)) = self.map.get(&e) {
            if let Some(m) = merge(v, rv) {
                self.map.remove(&e);
                (e, v) = (end, m);
            }
        }
        self.map.insert(s, (e, v));
    }

    /// Remove everything; returns what was there.
    fn take_all(&mut self) -> Vec<(u128, u128, V)> {
        std::mem::take(&mut self.map)
            .into_iter()
            .map(|(k, (end, v))| (k, end, v))
            .collect()
    }
}

/// What is known about a PASID that may no longer be used.
#[derive(Debug, Clone, Copy)]
struct PasidGone {
    /// The unbind was acknowledged to the driver.
    unbind_acked: bool,
    /// The address space was released.
    released: bool,
    /// When the mark was last set (checker event count), for eviction.
    stamp: u64,
}

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

    fn bus_master(&self) -> bool {
        self.command & COMMAND_BUS_MASTER != 0
    }

    /// "Command=0x0002 (bus master off)".
    fn command_text(&self) -> String {
        format!(
            "Command={:#06x} (bus master {})",
            self.command,
            if self.bus_master() { "on" } else { "off" }
        )
    }

    /// Why the function may not master the bus right now: link, reset, power, Bus Master.
    fn state_forbids_dma(&self, what: &AccessText) -> Option<(ViolationKind, String)> {
        if !self.link_up {
            return Some((
                ViolationKind::DmaLinkDown,
                format!("{what} while the link is down"),
            ));
        }
        if let Some(kind) = self.in_reset {
            return Some((
                ViolationKind::DmaDuringReset,
                format!("{what} during a {kind} reset (not yet ended)"),
            ));
        }
        if let Some(kind) = self.awaiting_reenable {
            return Some((
                ViolationKind::DmaDuringReset,
                format!(
                    "{what} after a {kind} reset, before re-enable ({}; Bus Master not set \
                     since the reset)",
                    self.command_text()
                ),
            ));
        }
        if self.power == D3HOT {
            return Some((
                ViolationKind::DmaInD3hot,
                format!(
                    "{what} while in D3hot (PowerState=3, {})",
                    self.command_text()
                ),
            ));
        }
        if !self.bus_master() {
            return Some((
                ViolationKind::DmaWithoutBusMaster,
                format!("{what} while {}", self.command_text()),
            ));
        }
        None
    }

    /// Whether `iova..iova+len` lies outside the mapped set, and how.
    fn map_violation(&self, what: &AccessText) -> Option<(ViolationKind, String)> {
        if self.mapped_untracked {
            return None;
        }
        let (s, e) = access_span(what.iova, what.len);
        if self.mapped.contains(s, e) {
            return None;
        }
        let gaps = self.mapped.gaps(s, e);
        let (gs, ge) = *gaps.first()?;
        for &(a, b) in &gaps {
            if let Some(&(hs, he, _)) = self.unmapped.overlapping(a, b).first() {
                let (xs, xe) = (a.max(hs), b.min(he));
                return Some((
                    ViolationKind::DmaAfterUnmap,
                    format!(
                        "{what}: {xs:#x}..{xe:#x} was unmapped (DMA_UNMAP acknowledged for \
                         {hs:#x}..{he:#x}) and not mapped again"
                    ),
                ));
            }
        }
        let mut detail = format!(
            "{what}: {gs:#x}..{ge:#x} is outside every mapped range ({} mapped",
            self.mapped.len()
        );
        if let Some((&ns, &(ne, _))) = self.mapped.map.range(..gs).next_back() {
            detail.push_str(&format!("; nearest below {ns:#x}..{ne:#x}"));
        }
        detail.push(')');
        if self.unmapped_forgotten > 0 {
            detail.push_str(&format!(
                " [{} older unmapped ranges forgotten: it may have been mapped before]",
                self.unmapped_forgotten
            ));
        }
        Some((ViolationKind::DmaOutsideMap, detail))
    }

    fn pasid_violation(&self, what: &AccessText) -> Option<(ViolationKind, String)> {
        let p = what.pasid?;
        let g = self.pasids.get(&p)?;
        g.unbind_acked.then(|| {
            (
                ViolationKind::PasidAfterUnbind,
                format!("{what}: pasid {p} used after its unbind was acknowledged"),
            )
        })
    }

    fn interrupt_violation(
        &self,
        vector: u16,
        outcome: &InterruptOutcome,
    ) -> Option<(ViolationKind, String)> {
        let what = format!("interrupt vector {vector} {outcome}");
        let why = if !self.link_up {
            "while the link is down".to_string()
        } else if let Some(kind) = self.in_reset {
            format!("during a {kind} reset (not yet ended)")
        } else if self.power == D3HOT {
            format!("while in D3hot (PowerState=3, {})", self.command_text())
        } else if !self.bus_master() {
            match self.awaiting_reenable {
                Some(kind) => format!(
                    "while {}, not re-enabled since a {kind} reset",
                    self.command_text()
                ),
                None => format!("while {}", self.command_text()),
            }
        } else {
            return None;
        };
        Some((
            ViolationKind::InterruptWhileDisabled,
            format!("{what} {why}"),
        ))
    }

    /// INTx is not a memory request: Bus Master does not gate it, Interrupt Disable does.
    fn intx_violation(&self, outcome: &InterruptOutcome) -> Option<(ViolationKind, String)> {
        let why = if !self.link_up {
            "while the link is down".to_string()
        } else if let Some(kind) = self.in_reset {
            format!("during a {kind} reset (not yet ended)")
        } else if self.power == D3HOT {
            "while in D3hot (PowerState=3)".to_string()
        } else if self.command & COMMAND_INTX_DISABLE != 0 {
            format!(
                "while Command={:#06x} (Interrupt Disable set)",
                self.command
            )
        } else {
            return None;
        };
        Some((
            ViolationKind::InterruptWhileDisabled,
            format!("interrupt {outcome} {why}"),
        ))
    }

    /// Add a mapping; a `checker_degraded` finding when the mapped set overflows (once, until
    /// the mapped set is known again).
    fn map(&mut self, iova: u64, size: u64, backed: bool) -> Option<(ViolationKind, String)> {
        let (s, e) = span(iova, size);
        if s >= e {
            return None;
        }
        // Mapped again: no longer "after unmap".
        self.unmapped.carve(s, e);
        self.mapped
            .insert(s, e, backed, |a, b| (a == b).then_some(a));
        if self.mapped.len() <= MAX_MAPPED_RANGES {
            return None;
        }
        // Keep the bound; membership can no longer be judged.
        self.mapped.carve(s, e);
        if std::mem::replace(&mut self.mapped_untracked, true) {
            return None;
        }
        Some((
            ViolationKind::CheckerDegraded,
            format!(
                "mapped set overflow: map {iova:#x}+{size:#x} would be range {} (the checker \
                 tracks {MAX_MAPPED_RANGES}); DMA is not judged against the map \
                 (dma_outside_map, dma_after_unmap) until the client reconnects",
                MAX_MAPPED_RANGES + 1
            ),
        ))
    }

    fn unmap(&mut self, iova: u64, size: u64) {
        let (s, e) = span(iova, size);
        for (a, b, _) in self.mapped.carve(s, e) {
            self.remember_unmapped(a, b);
        }
    }

    fn unmap_everything(&mut self) {
        for (a, b, _) in self.mapped.take_all() {
            self.remember_unmapped(a, b);
        }
        self.mapped_untracked = false;
    }

    fn remember_unmapped(&mut self, s: u128, e: u128) {
        let now = self.events;
        self.unmapped.insert(s, e, now, |a, b| Some(a.max(b)));
        let len = self.unmapped.len();
        if len <= MAX_UNMAPPED_RANGES {
            return;
        }
        let excess = len - trim_target(MAX_UNMAPPED_RANGES);
        let cut = oldest_cut(self.unmapped.map.values().map(|&(_, t)| t), excess);
        self.unmapped.map.retain(|_, &mut (_, t)| t >= cut);
        let mut gone = len - self.unmapped.len();
        self.unmapped.map.retain(|_, &mut (_, t)| {
            let keep = t != cut || gone >= excess;
            gone += usize::from(!keep);
            keep
        });
        self.unmapped_forgotten += gone as u64;
    }

    /// The pending stale uses of `pasid` become violations: its binding ends (or restarts)
    /// and no invalidation covered them.
    fn judge_stale(&mut self, pasid: u32) -> Vec<(ViolationKind, String)> {
        let mut out = Vec::new();
        self.stale_pending.retain(|(p, _, d)| {
            if *p == pasid {
                out.push((ViolationKind::StaleTranslation, d.clone()));
                false
            } else {
                true
            }
        });
        out
    }

    /// The binding of `pasid` ended (released) or restarted (bound again): its drain and
    /// mm-gone state go.
    fn end_binding(&mut self, pasid: u32) {
        self.draining.remove(&pasid);
        self.mm_gone.remove(&pasid);
    }

    /// `pasid` starts draining; a `checker_degraded` finding when the set is full (the device
    /// bounds its contexts far lower; a journal that unbinds without acknowledging could not).
    fn track_draining(&mut self, pasid: u32) -> Option<(ViolationKind, String)> {
        if self.draining.len() >= MAX_TRACKED_PASIDS && !self.draining.contains(&pasid) {
            return Some((
                ViolationKind::CheckerDegraded,
                format!(
                    "more than {MAX_TRACKED_PASIDS} PASIDs draining at once: pasid {pasid}'s \
                     drain is not tracked (a stale use during it is judged at the unbind's end)"
                ),
            ));
        }
        self.draining.insert(pasid);
        None
    }

    /// The device found `pasid`'s page tables empty (its address space torn down).
    fn address_space_empty(&mut self, pasid: u32) -> Option<(ViolationKind, String)> {
        if self.pasids.contains_key(&pasid) || self.mm_gone.contains_key(&pasid) {
            // Unbound (any walk is `walk_after_release`'s), or already judged.
            return None;
        }
        if self.draining.contains(&pasid) {
            return Some((
                ViolationKind::DrainNotAwaited,
                format!(
                    "pasid {pasid}: its page tables map no user address any more (the address \
                     space was torn down) while its unbind was still draining: the driver let \
                     the mm go before the drain was acknowledged (mm release must wait for it)"
                ),
            ));
        }
        if self.mm_gone.len() >= MAX_TRACKED_PASIDS {
            // Bounded like the other PASID sets; forgetting one only loses the attribution of
            // its later stale uses (they are then judged as missed invalidations).
            self.mm_gone.pop_first();
        }
        let mut held = 0u64;
        self.stale_pending.retain(|(p, _, _)| {
            let mine = *p == pasid;
            held += u64::from(mine);
            !mine
        });
        self.mm_gone.insert(pasid, held);
        let mut detail = format!(
            "pasid {pasid}: its page tables map no user address any more (the address space was \
             torn down) while the PASID is still bound and no unbind began: the binding \
             outlived its mm (the driver must unbind, and drain, from the mmu notifier's \
             release, before exit_mmap tears the tables down)"
        );
        if held > 0 {
            detail.push_str(&format!(
                "; {held} stale translation use(s) held for it are this bug's"
            ));
        }
        Some((ViolationKind::BindingOutlivedMm, detail))
    }

    /// Mark `pasid`; a `checker_degraded` finding when older marks had to be forgotten.
    fn mark_pasid(
        &mut self,
        pasid: u32,
        set: impl FnOnce(&mut PasidGone),
    ) -> Option<(ViolationKind, String)> {
        let now = self.events;
        let g = self.pasids.entry(pasid).or_insert(PasidGone {
            unbind_acked: false,
            released: false,
            stamp: now,
        });
        set(g);
        g.stamp = now;
        let len = self.pasids.len();
        if len <= MAX_TRACKED_PASIDS {
            return None;
        }
        let excess = len - trim_target(MAX_TRACKED_PASIDS);
        let cut = oldest_cut(self.pasids.values().map(|g| g.stamp), excess);
        self.pasids.retain(|_, g| g.stamp >= cut);
        let mut gone = len - self.pasids.len();
        self.pasids.retain(|_, g| {
            let keep = g.stamp != cut || gone >= excess;
            gone += usize::from(!keep);
            keep
        });
        Some((
            ViolationKind::CheckerDegraded,
            format!(
                "forgot {gone} unbound/released PASIDs (more than {MAX_TRACKED_PASIDS} \
                 tracked): a later access or walk through them goes unreported"
            ),
        ))
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
