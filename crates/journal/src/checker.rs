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

use std::collections::BTreeMap;

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
            }
            Event::PasidUnbindBegin { pasid } => out.extend(self.judge_stale(*pasid)),
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
                out.extend(self.mark_pasid(*pasid, |g| g.unbind_acked = true))
            }
            Event::PasidReleased { pasid } => {
                out.extend(self.judge_stale(*pasid));
                out.extend(self.mark_pasid(*pasid, |g| g.released = true))
            }
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
mod tests {
    use super::*;
    use crate::event::Refusal;
    use crate::journal::Journal;

    const BME: u16 = 0x0006;

    fn dma(dir: Dir, pasid: Option<u32>, iova: u64, len: u64) -> Event {
        Event::Dma {
            dir,
            pasid,
            iova,
            len,
            count: 1,
            bytes: len,
        }
    }

    fn write(iova: u64, len: u64) -> Event {
        dma(Dir::Write, None, iova, len)
    }

    fn fault(pasid: Option<u32>, iova: u64, len: u64) -> Event {
        Event::DmaFault {
            dir: Dir::Read,
            pasid,
            iova,
            len,
        }
    }

    fn map(iova: u64, size: u64) -> Event {
        Event::DmaMapped {
            iova,
            size,
            backed: true,
            read: true,
            write: true,
        }
    }

    fn unmap(iova: u64, size: u64) -> Event {
        Event::DmaUnmapped { iova, size }
    }

    fn command(new: u16) -> Event {
        Event::Command { old: 0, new }
    }

    fn irq(outcome: &str) -> Event {
        Event::Interrupt {
            vector: 1,
            outcome: outcome.parse().unwrap(),
        }
    }

    /// A connected client, 0x1000..0x2000 mapped, memory and bus master enabled.
    fn enabled() -> Vec<Event> {
        vec![Event::ClientConnected, map(0x1000, 0x1000), command(BME)]
    }

    fn with(mut base: Vec<Event>, more: impl IntoIterator<Item = Event>) -> Vec<Event> {
        base.extend(more);
        base
    }

    /// Violations found (kind and detail) when recording `events` in a fresh journal.
    fn run(events: Vec<Event>) -> Vec<(ViolationKind, String)> {
        let j = Journal::new("t", 4096);
        for e in events {
            j.record(e);
        }
        j.violations()
            .into_iter()
            .filter_map(|r| match r.event {
                Event::Violation { kind, detail } => Some((kind, detail)),
                _ => None,
            })
            .collect()
    }

    /// Exactly one violation, of `kind`; returns its detail.
    fn only(kind: ViolationKind, events: Vec<Event>) -> String {
        let v = run(events);
        assert_eq!(v.len(), 1, "expected exactly one {kind:?}, got {v:?}");
        assert_eq!(v[0].0, kind, "{v:?}");
        v[0].1.clone()
    }

    fn none(events: Vec<Event>) {
        let v = run(events);
        assert!(v.is_empty(), "expected no violation, got {v:?}");
    }

    // --- DmaOutsideMap ---

    #[test]
    fn test_dma_outside_any_map_is_outside_map() {
        let d = only(
            ViolationKind::DmaOutsideMap,
            with(enabled(), [write(0x5000, 0x40)]),
        );
        assert!(d.contains("dma write 0x5000+0x40"), "{d}");
        assert!(d.contains("nearest below 0x1000..0x2000"), "{d}");
    }

    #[test]
    fn test_dma_inside_map_no_violation() {
        none(with(
            enabled(),
            [
                write(0x1000, 0x40),
                write(0x1fc0, 0x40),
                dma(Dir::Read, None, 0x1800, 8),
            ],
        ));
    }

    #[test]
    fn test_dma_crossing_map_end_is_outside_map() {
        let d = only(
            ViolationKind::DmaOutsideMap,
            with(enabled(), [write(0x1fc0, 0x80)]),
        );
        assert!(d.contains("0x2000..0x2040"), "{d}");
    }

    #[test]
    fn test_dma_spanning_adjacent_maps_no_violation() {
        none(with(
            enabled(),
            [
                Event::DmaMapped {
                    iova: 0x2000,
                    size: 0x1000,
                    backed: false,
                    read: true,
                    write: true,
                },
                write(0x1fc0, 0x80),
            ],
        ));
    }

    #[test]
    fn test_dma_fault_never_mapped_is_outside_map() {
        only(
            ViolationKind::DmaOutsideMap,
            with(enabled(), [fault(None, 0x8000, 4)]),
        );
    }

    #[test]
    fn test_dma_fault_in_unbacked_map_no_violation() {
        none(with(
            enabled(),
            [
                Event::DmaMapped {
                    iova: 0xc0000,
                    size: 0x20000,
                    backed: false,
                    read: true,
                    write: true,
                },
                fault(None, 0xc1000, 4),
            ],
        ));
    }

    // --- DmaAfterUnmap ---

    #[test]
    fn test_dma_after_unmap_is_after_unmap() {
        let d = only(
            ViolationKind::DmaAfterUnmap,
            with(enabled(), [unmap(0x1000, 0x1000), write(0x1800, 0x40)]),
        );
        assert!(d.contains("0x1800..0x1840"), "{d}");
        assert!(d.contains("0x1000..0x2000"), "{d}");
    }

    #[test]
    fn test_dma_map_use_unmap_no_violation() {
        none(with(
            enabled(),
            [write(0x1000, 0x40), unmap(0x1000, 0x1000)],
        ));
    }

    #[test]
    fn test_dma_after_remap_no_violation() {
        none(with(
            enabled(),
            [
                unmap(0x1000, 0x1000),
                map(0x1000, 0x1000),
                write(0x1000, 0x40),
            ],
        ));
    }

    #[test]
    fn test_dma_fault_after_unmap_is_after_unmap() {
        only(
            ViolationKind::DmaAfterUnmap,
            with(enabled(), [unmap(0x1000, 0x1000), fault(None, 0x1000, 4)]),
        );
    }

    #[test]
    fn test_dma_partial_unmap_only_hole_is_after_unmap() {
        let base = vec![Event::ClientConnected, map(0, 0x4000), command(BME)];
        let base = with(base, [unmap(0x1000, 0x1000)]);
        none(with(base.clone(), [write(0, 0x40), write(0x3000, 0x40)]));
        only(
            ViolationKind::DmaAfterUnmap,
            with(base, [write(0x1800, 0x40)]),
        );
    }

    #[test]
    fn test_dma_unmap_to_2_pow_64_only_mapped_part_is_after_unmap() {
        // QEMU unmaps 0xfef00000..2^64 at power-off.
        let base = with(
            enabled(),
            [
                map(0xfef0_0000, 0x1000),
                unmap(0xfef0_0000, 0u64.wrapping_sub(0xfef0_0000)),
            ],
        );
        only(
            ViolationKind::DmaAfterUnmap,
            with(base.clone(), [write(0xfef0_0000, 4)]),
        );
        only(
            ViolationKind::DmaOutsideMap,
            with(base.clone(), [write(0xff00_0000, 4)]),
        );
        only(
            ViolationKind::DmaOutsideMap,
            with(base, [write(u64::MAX, 1)]),
        );
    }

    #[test]
    fn test_dma_after_client_reconnect_is_after_unmap() {
        only(
            ViolationKind::DmaAfterUnmap,
            with(
                enabled(),
                [
                    write(0x1000, 0x40),
                    Event::ClientDisconnected,
                    Event::ClientConnected,
                    command(BME),
                    write(0x1000, 0x40),
                ],
            ),
        );
    }

    // --- DmaWithoutBusMaster ---

    #[test]
    fn test_dma_bus_master_off_is_without_bus_master() {
        let d = only(
            ViolationKind::DmaWithoutBusMaster,
            with(enabled(), [command(0x0002), write(0x1000, 0x40)]),
        );
        assert_eq!(
            d,
            "dma write 0x1000+0x40 while Command=0x0002 (bus master off)"
        );
    }

    #[test]
    fn test_dma_bus_master_never_set_is_without_bus_master() {
        only(
            ViolationKind::DmaWithoutBusMaster,
            vec![
                Event::ClientConnected,
                map(0x1000, 0x1000),
                write(0x1000, 4),
            ],
        );
    }

    #[test]
    fn test_dma_bus_master_cleared_then_set_no_violation() {
        none(with(
            enabled(),
            [command(0x0002), command(BME), write(0x1000, 0x40)],
        ));
    }

    #[test]
    fn test_dma_refused_never_a_violation() {
        none(vec![
            Event::Link { up: false },
            Event::DmaRefused {
                dir: Dir::Write,
                iova: 0x9000,
                len: 4,
                reason: Refusal::LinkDown,
            },
            Event::ResetBegin {
                kind: ResetKind::Flr,
            },
            Event::DmaRefused {
                dir: Dir::Read,
                iova: 0,
                len: 4,
                reason: Refusal::Resetting,
            },
        ]);
    }

    // --- DmaInD3hot ---

    #[test]
    fn test_dma_in_d3hot_is_in_d3hot() {
        let d = only(
            ViolationKind::DmaInD3hot,
            with(
                enabled(),
                [Event::Power { from: 0, to: 3 }, write(0x1000, 0x40)],
            ),
        );
        assert!(d.contains("D3hot"), "{d}");
    }

    #[test]
    fn test_dma_back_in_d0_no_violation() {
        // No_Soft_Reset=1: D3hot -> D0 keeps the configuration.
        none(with(
            enabled(),
            [
                Event::Power { from: 0, to: 3 },
                Event::Power { from: 3, to: 0 },
                write(0x1000, 0x40),
            ],
        ));
    }

    // --- DmaLinkDown ---

    #[test]
    fn test_dma_link_down_is_link_down() {
        only(
            ViolationKind::DmaLinkDown,
            with(enabled(), [Event::Link { up: false }, write(0x1000, 0x40)]),
        );
    }

    #[test]
    fn test_dma_link_back_up_no_violation() {
        none(with(
            enabled(),
            [
                Event::Link { up: false },
                Event::Link { up: true },
                write(0x1000, 0x40),
            ],
        ));
    }

    // --- DmaDuringReset ---

    #[test]
    fn test_dma_during_reset_is_during_reset() {
        let d = only(
            ViolationKind::DmaDuringReset,
            with(
                enabled(),
                [
                    Event::ResetBegin {
                        kind: ResetKind::Flr,
                    },
                    write(0x1000, 0x40),
                ],
            ),
        );
        assert!(d.contains("flr"), "{d}");
    }

    #[test]
    fn test_dma_after_reset_before_reenable_is_during_reset() {
        let d = only(
            ViolationKind::DmaDuringReset,
            with(
                enabled(),
                [
                    Event::ResetBegin {
                        kind: ResetKind::Flr,
                    },
                    Event::ResetEnd {
                        kind: ResetKind::Flr,
                    },
                    write(0x1000, 0x40),
                ],
            ),
        );
        assert!(d.contains("before re-enable"), "{d}");
    }

    #[test]
    fn test_dma_command_without_bus_master_after_reset_is_during_reset() {
        only(
            ViolationKind::DmaDuringReset,
            with(
                enabled(),
                [
                    Event::ResetBegin {
                        kind: ResetKind::DeviceReset,
                    },
                    Event::ResetEnd {
                        kind: ResetKind::DeviceReset,
                    },
                    command(0x0002),
                    write(0x1000, 0x40),
                ],
            ),
        );
    }

    #[test]
    fn test_dma_after_reset_and_reenable_no_violation() {
        none(with(
            enabled(),
            [
                Event::ResetBegin {
                    kind: ResetKind::Flr,
                },
                Event::ResetEnd {
                    kind: ResetKind::Flr,
                },
                command(BME),
                write(0x1000, 0x40),
            ],
        ));
    }

    #[test]
    fn test_dma_bus_master_set_during_reset_still_during_reset() {
        only(
            ViolationKind::DmaDuringReset,
            with(
                enabled(),
                [
                    Event::ResetBegin {
                        kind: ResetKind::Flr,
                    },
                    command(BME),
                    Event::ResetEnd {
                        kind: ResetKind::Flr,
                    },
                    write(0x1000, 0x40),
                ],
            ),
        );
    }

    // --- InterruptWhileDisabled ---

    #[test]
    fn test_interrupt_bus_master_off_is_while_disabled() {
        let d = only(
            ViolationKind::InterruptWhileDisabled,
            with(enabled(), [command(0x0002), irq("delivered")]),
        );
        assert!(d.contains("vector 1 delivered"), "{d}");
        assert!(d.contains("Command=0x0002 (bus master off)"), "{d}");
    }

    #[test]
    fn test_interrupt_pending_in_d3hot_is_while_disabled() {
        only(
            ViolationKind::InterruptWhileDisabled,
            with(enabled(), [Event::Power { from: 0, to: 3 }, irq("pending")]),
        );
    }

    #[test]
    fn test_interrupt_link_down_is_while_disabled() {
        only(
            ViolationKind::InterruptWhileDisabled,
            with(enabled(), [Event::Link { up: false }, irq("delivered")]),
        );
    }

    #[test]
    fn test_interrupt_during_reset_is_while_disabled() {
        only(
            ViolationKind::InterruptWhileDisabled,
            with(
                enabled(),
                [
                    Event::ResetBegin {
                        kind: ResetKind::PmSoftReset,
                    },
                    irq("delivered"),
                ],
            ),
        );
    }

    /// A vector held while the function could not send it and sent later is an `interrupt`
    /// record (outcome `delivered-after-hold`) judged like any other delivery.
    #[test]
    fn test_interrupt_delivered_after_hold_judged_like_any_delivery() {
        let held = "delivered-after-hold";
        let d = only(
            ViolationKind::InterruptWhileDisabled,
            with(enabled(), [command(0x0002), irq(held)]),
        );
        assert!(d.contains("vector 1 delivered-after-hold"), "{d}");
        assert!(d.contains("bus master off"), "{d}");
        let d = only(
            ViolationKind::InterruptWhileDisabled,
            with(enabled(), [Event::Power { from: 0, to: 3 }, irq(held)]),
        );
        assert!(d.contains("D3hot"), "{d}");
        none(with(
            enabled(),
            [
                Event::Power { from: 0, to: 3 },
                irq("refused:d3hot"),
                Event::Power { from: 3, to: 0 },
                irq(held),
            ],
        ));
    }

    #[test]
    fn test_interrupt_enabled_or_refused_no_violation() {
        none(with(
            enabled(),
            [
                irq("delivered"),
                irq("pending"),
                command(0x0002),
                irq("refused:bus_master_disabled"),
                Event::Power { from: 0, to: 3 },
                irq("refused:d3hot"),
            ],
        ));
    }

    #[test]
    fn test_interrupt_intx_while_interrupt_disable_is_while_disabled() {
        let d = only(
            ViolationKind::InterruptWhileDisabled,
            with(enabled(), [command(0x0406), irq("intx-delivered")]),
        );
        assert!(d.contains("Interrupt Disable"), "{d}");
    }

    #[test]
    fn test_interrupt_intx_bus_master_off_or_held_no_violation() {
        none(with(
            enabled(),
            [
                command(0x0002),
                irq("intx-delivered"),
                command(0x0402),
                irq("intx-held:intx_disabled"),
                Event::Power { from: 0, to: 3 },
                irq("intx-held:d3hot"),
            ],
        ));
    }

    #[test]
    fn test_link_down_then_lost_connection_reset_new_client_no_violation() {
        none(with(
            enabled(),
            [
                Event::Link { up: false },
                Event::ClientDisconnected,
                Event::ResetBegin {
                    kind: ResetKind::LostConnection,
                },
                Event::ResetEnd {
                    kind: ResetKind::LostConnection,
                },
                Event::ClientConnected,
                map(0x1000, 0x1000),
                command(BME),
                write(0x1000, 0x40),
                irq("delivered"),
            ],
        ));
    }

    // --- PasidAfterUnbind ---

    fn unbound(pasid: u32) -> Vec<Event> {
        with(
            enabled(),
            [
                Event::PasidBind {
                    pasid,
                    root: 0x10_0000,
                },
                dma(Dir::Read, Some(pasid), 0x1000, 8),
                Event::PasidUnbindBegin { pasid },
                Event::PasidDrained { pasid, aborted: 0 },
                Event::PasidUnbindAck { pasid },
            ],
        )
    }

    #[test]
    fn test_pasid_dma_after_unbind_ack_is_after_unbind() {
        let d = only(
            ViolationKind::PasidAfterUnbind,
            with(unbound(5), [dma(Dir::Read, Some(5), 0x1000, 8)]),
        );
        assert!(d.contains("pasid 5"), "{d}");
    }

    #[test]
    fn test_pasid_fault_after_unbind_ack_is_after_unbind() {
        let base = with(
            unbound(5),
            [Event::DmaMapped {
                iova: 0xc0000,
                size: 0x1000,
                backed: false,
                read: true,
                write: true,
            }],
        );
        only(
            ViolationKind::PasidAfterUnbind,
            with(base, [fault(Some(5), 0xc0000, 8)]),
        );
    }

    #[test]
    fn test_pasid_dma_during_unbind_or_after_rebind_no_violation() {
        none(with(
            enabled(),
            [
                Event::PasidBind { pasid: 5, root: 0 },
                Event::PasidUnbindBegin { pasid: 5 },
                dma(Dir::Write, Some(5), 0x1000, 8),
                Event::PasidDrained {
                    pasid: 5,
                    aborted: 1,
                },
                Event::PasidUnbindAck { pasid: 5 },
                dma(Dir::Write, Some(6), 0x1000, 8),
                write(0x1000, 8),
                Event::PasidBind { pasid: 5, root: 0 },
                dma(Dir::Write, Some(5), 0x1000, 8),
            ],
        ));
    }

    #[test]
    fn test_pasid_after_unbind_with_bus_master_off_two_violations() {
        let v = run(with(
            unbound(7),
            [command(0), dma(Dir::Read, Some(7), 0x1000, 8)],
        ));
        let kinds: Vec<ViolationKind> = v.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            [
                ViolationKind::DmaWithoutBusMaster,
                ViolationKind::PasidAfterUnbind
            ]
        );
    }

    // --- StaleTranslation ---

    #[test]
    fn test_stale_translation_used_is_stale_translation() {
        let d = only(
            ViolationKind::StaleTranslation,
            with(
                enabled(),
                [
                    Event::PasidBind { pasid: 3, root: 0 },
                    Event::StaleTranslationUsed {
                        pasid: 3,
                        va: 0x7f00_0000,
                        cached_pa: 0x1000,
                        walked_pa: Some(0x3000),
                    },
                    // An invalidation of another range or PASID does not excuse it.
                    Event::Invalidate {
                        pasid: 3,
                        va: 0x7f00_1000,
                        len: 0x1000,
                    },
                    Event::Invalidate {
                        pasid: 4,
                        va: 0,
                        len: u64::MAX,
                    },
                    Event::PasidUnbindBegin { pasid: 3 },
                ],
            ),
        );
        assert!(d.contains("0x7f000000"), "{d}");
        assert!(d.contains("0x1000"), "{d}");
        assert!(d.contains("0x3000"), "{d}");
    }

    fn stale(pasid: u32, va: u64) -> Event {
        Event::StaleTranslationUsed {
            pasid,
            va,
            cached_pa: 0x1000,
            walked_pa: None,
        }
    }

    #[test]
    fn test_stale_translation_judged_only_when_the_binding_ends() {
        // Held: no violation while the invalidation may still be on its way.
        none(with(
            enabled(),
            [
                Event::PasidBind { pasid: 3, root: 0 },
                stale(3, 0x7f00_0000),
            ],
        ));
        // Released without an invalidation: a violation.
        only(
            ViolationKind::StaleTranslation,
            with(
                enabled(),
                [
                    Event::PasidBind { pasid: 3, root: 0 },
                    stale(3, 0x7f00_0000),
                    Event::PasidReleased { pasid: 3 },
                ],
            ),
        );
    }

    #[test]
    fn test_stale_translation_then_covering_invalidation_is_legal() {
        none(with(
            enabled(),
            [
                Event::PasidBind { pasid: 3, root: 0 },
                stale(3, 0x7f00_3000),
                Event::Invalidate {
                    pasid: 3,
                    va: 0x7f00_0000,
                    len: 0x10000,
                },
                stale(3, 0x7f10_0000),
                Event::Invalidate {
                    pasid: 3,
                    va: 0,
                    len: u64::MAX,
                },
                Event::PasidUnbindBegin { pasid: 3 },
                Event::PasidUnbindAck { pasid: 3 },
                Event::PasidReleased { pasid: 3 },
            ],
        ));
    }

    #[test]
    fn test_stale_translation_after_unbind_ack_is_immediate() {
        only(
            ViolationKind::StaleTranslation,
            with(
                enabled(),
                [
                    Event::PasidBind { pasid: 3, root: 0 },
                    Event::PasidUnbindBegin { pasid: 3 },
                    Event::PasidUnbindAck { pasid: 3 },
                    stale(3, 0x7f00_0000),
                ],
            ),
        );
    }

    #[test]
    fn test_stale_translation_walk_invalidate_walk_no_violation() {
        none(with(
            enabled(),
            [
                Event::PasidBind { pasid: 3, root: 0 },
                Event::PageWalk {
                    pasid: 3,
                    va: 0x7f00_0000,
                    pa: Some(0x1000),
                },
                Event::Invalidate {
                    pasid: 3,
                    va: 0x7f00_0000,
                    len: 0x1000,
                },
                Event::PageWalk {
                    pasid: 3,
                    va: 0x7f00_0000,
                    pa: None,
                },
                Event::TranslationFault {
                    pasid: 3,
                    va: 0x7f00_0000,
                    write: true,
                },
            ],
        ));
    }

    // --- WalkAfterRelease ---

    fn walk(pasid: u32) -> Event {
        Event::PageWalk {
            pasid,
            va: 0x4000,
            pa: None,
        }
    }

    #[test]
    fn test_walk_after_release_is_walk_after_release() {
        let d = only(
            ViolationKind::WalkAfterRelease,
            vec![
                Event::PasidBind { pasid: 9, root: 0 },
                walk(9),
                Event::PasidReleased { pasid: 9 },
                walk(9),
            ],
        );
        assert!(d.contains("pasid 9 va 0x4000"), "{d}");
        assert!(d.contains("released"), "{d}");
    }

    #[test]
    fn test_walk_after_unbind_ack_is_walk_after_release() {
        only(
            ViolationKind::WalkAfterRelease,
            vec![
                Event::PasidBind { pasid: 9, root: 0 },
                Event::PasidUnbindAck { pasid: 9 },
                walk(9),
            ],
        );
    }

    #[test]
    fn test_walk_bound_or_rebound_no_violation() {
        none(vec![
            Event::PasidBind { pasid: 9, root: 0 },
            walk(9),
            Event::PasidReleased { pasid: 9 },
            walk(10),
            Event::PasidBind { pasid: 9, root: 0 },
            walk(9),
        ]);
    }

    // --- ordering, bounds, internals ---

    #[test]
    fn test_violation_record_follows_its_event() {
        let j = Journal::new("t", 64);
        for e in with(enabled(), [write(0x9000, 4)]) {
            j.record(e);
        }
        let (recs, _) = j.since(0);
        let n = recs.len();
        assert!(n >= 2);
        assert!(matches!(recs[n - 2].event, Event::Dma { iova: 0x9000, .. }));
        assert!(matches!(
            recs[n - 1].event,
            Event::Violation {
                kind: ViolationKind::DmaOutsideMap,
                ..
            }
        ));
    }

    #[test]
    fn test_unmapped_history_over_bound_forgets_oldest() {
        let mut c = Checker::default();
        c.check(&command(BME));
        let n = MAX_UNMAPPED_RANGES as u64 + 10;
        for i in 0..n {
            // Disjoint, non-adjacent pages.
            c.check(&map(i * 0x2000, 0x1000));
            c.check(&unmap(i * 0x2000, 0x1000));
        }
        // Trimmed once, to 7/8 of the bound, when the 4097th range came; 9 more since.
        let kept = MAX_UNMAPPED_RANGES - MAX_UNMAPPED_RANGES / 8 + 9;
        assert_eq!(c.unmapped.len(), kept);
        assert_eq!(c.unmapped_forgotten, n - kept as u64);
        // Exactly the oldest went.
        let first_kept = c.unmapped.map.keys().next().copied();
        assert_eq!(first_kept, Some(u128::from(n - kept as u64) * 0x2000));
        let old = c.check(&write(0, 4));
        assert_eq!(old.len(), 1);
        assert_eq!(old[0].0, ViolationKind::DmaOutsideMap);
        assert!(old[0].1.contains("513 older unmapped ranges forgotten"));
        let recent = c.check(&write((n - 1) * 0x2000, 4));
        assert_eq!(recent.len(), 1);
        assert_eq!(recent[0].0, ViolationKind::DmaAfterUnmap);
    }

    #[test]
    fn test_unmapped_history_adjacent_ranges_merge() {
        let mut c = Checker::default();
        for i in 0..100u64 {
            c.check(&map(i * 0x1000, 0x1000));
        }
        // Adjacent maps with the same backing are one range.
        assert_eq!(c.mapped.len(), 1);
        for i in 0..100u64 {
            c.check(&unmap(i * 0x1000, 0x1000));
        }
        assert_eq!(c.mapped.len(), 0);
        assert_eq!(c.unmapped.len(), 1);
    }

    /// The checker's findings of kind `checker_degraded` among `v`.
    fn degraded(v: &Findings) -> Vec<&String> {
        v.iter()
            .filter(|(k, _)| *k == ViolationKind::CheckerDegraded)
            .map(|(_, d)| d)
            .collect()
    }

    #[test]
    fn test_mapped_set_over_bound_stops_judging_membership() {
        let mut c = Checker::default();
        c.check(&command(BME));
        for i in 0..MAX_MAPPED_RANGES as u64 {
            let v = c.check(&map(i * 0x2000, 0x1000));
            assert!(v.is_empty(), "map {i}: {v:?}");
        }
        // The map past the bound: the oracle goes partly blind, and says so once.
        let v = c.check(&map(MAX_MAPPED_RANGES as u64 * 0x2000, 0x1000));
        let d = degraded(&v);
        assert_eq!(d.len(), 1, "{v:?}");
        assert!(d[0].contains("mapped set overflow"), "{}", d[0]);
        let v = c.check(&map((MAX_MAPPED_RANGES as u64 + 1) * 0x2000, 0x1000));
        assert!(v.is_empty(), "reported once per episode: {v:?}");
        assert!(c.mapped.len() <= MAX_MAPPED_RANGES);
        assert!(c.mapped_untracked);
        // Unknown: no false violation.
        assert!(c.check(&write(u64::MAX - 0x1000, 4)).is_empty());
        c.check(&Event::ClientDisconnected);
        // Everything mapped moved to the history, which stays bounded.
        assert_eq!(c.mapped.len(), 0);
        assert!(c.unmapped.len() <= MAX_UNMAPPED_RANGES);
        c.check(&Event::ClientConnected);
        c.check(&command(BME));
        assert!(!c.mapped_untracked);
        let v = c.check(&write(u64::MAX - 0x1000, 4));
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].0, ViolationKind::DmaOutsideMap);
    }

    #[test]
    fn test_pasid_marks_over_bound_stay_bounded() {
        let mut c = Checker::default();
        let mut reports = Vec::new();
        for p in 0..(MAX_TRACKED_PASIDS as u32 + 100) {
            let v = c.check(&Event::PasidUnbindAck { pasid: p });
            reports.extend(degraded(&v).into_iter().map(|d| (p, d.clone())));
        }
        // Forgetting marks is a degradation: reported at the one trim (an eighth at once).
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert_eq!(reports[0].0, MAX_TRACKED_PASIDS as u32);
        let gone = MAX_TRACKED_PASIDS + 1 - trim_target(MAX_TRACKED_PASIDS);
        assert!(
            reports[0]
                .1
                .contains(&format!("forgot {gone} unbound/released PASIDs")),
            "{}",
            reports[0].1
        );
        assert!(c.pasids.len() <= MAX_TRACKED_PASIDS);
        // The oldest were forgotten, the newest are kept.
        let first_kept = c.pasids.keys().next().copied();
        assert_eq!(
            first_kept,
            Some(MAX_TRACKED_PASIDS as u32 + 100 - c.pasids.len() as u32)
        );
        assert!(c.pasids.contains_key(&(MAX_TRACKED_PASIDS as u32 + 99)));
    }

    #[test]
    fn test_ranges_carve_middle_splits_range() {
        let mut r: Ranges<bool> = Ranges::default();
        r.insert(0, 0x4000, true, |a, b| (a == b).then_some(a));
        let removed = r.carve(0x1000, 0x2000);
        assert_eq!(removed, [(0x1000, 0x2000, true)]);
        assert_eq!(r.len(), 2);
        assert_eq!(r.gaps(0, 0x4000), [(0x1000, 0x2000)]);
        assert!(r.contains(0, 0x1000));
        assert!(!r.contains(0x800, 0x1800));
    }
}
