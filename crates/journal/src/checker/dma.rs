//! DMA and mapping rules: whether the function may master the bus (link, reset, power state,
//! Bus Master Enable), whether an access falls in mapped, backed space, and the bookkeeping of
//! DMA_MAP/UNMAP (mapped ranges, the bounded history of unmapped ones).

use super::ranges::{access_span, span};
use super::{
    oldest_cut, trim_target, AccessText, Checker, COMMAND_BUS_MASTER, D3HOT, MAX_MAPPED_RANGES,
    MAX_UNMAPPED_RANGES,
};
use crate::event::ViolationKind;

impl Checker {
    pub(super) fn bus_master(&self) -> bool {
        self.command & COMMAND_BUS_MASTER != 0
    }

    /// "Command=0x0002 (bus master off)".
    pub(super) fn command_text(&self) -> String {
        format!(
            "Command={:#06x} (bus master {})",
            self.command,
            if self.bus_master() { "on" } else { "off" }
        )
    }

    /// Why the function may not master the bus right now: link, reset, power, Bus Master.
    pub(super) fn state_forbids_dma(&self, what: &AccessText) -> Option<(ViolationKind, String)> {
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
    pub(super) fn map_violation(&self, what: &AccessText) -> Option<(ViolationKind, String)> {
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

    /// Add a mapping; a `checker_degraded` finding when the mapped set overflows (once, until
    /// the mapped set is known again).
    pub(super) fn map(
        &mut self,
        iova: u64,
        size: u64,
        backed: bool,
    ) -> Option<(ViolationKind, String)> {
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

    pub(super) fn unmap(&mut self, iova: u64, size: u64) {
        let (s, e) = span(iova, size);
        for (a, b, _) in self.mapped.carve(s, e) {
            self.remember_unmapped(a, b);
        }
    }

    pub(super) fn unmap_everything(&mut self) {
        for (a, b, _) in self.mapped.take_all() {
            self.remember_unmapped(a, b);
        }
        self.mapped_untracked = false;
    }

    pub(super) fn remember_unmapped(&mut self, s: u128, e: u128) {
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
}
