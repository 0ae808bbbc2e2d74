//! PASID/SVA lifetime rules: a DMA tagged with a PASID that was unbound or whose address space
//! was released, stale translations awaiting their invalidation, a binding that outlived its
//! address space, an unbind acknowledged before the device drained.

use super::{oldest_cut, trim_target, AccessText, Checker, MAX_TRACKED_PASIDS};
use crate::event::ViolationKind;

/// What is known about a PASID that may no longer be used.
#[derive(Debug, Clone, Copy)]
pub(super) struct PasidGone {
    /// The unbind was acknowledged to the driver.
    pub(super) unbind_acked: bool,
    /// The address space was released.
    pub(super) released: bool,
    /// When the mark was last set (checker event count), for eviction.
    pub(super) stamp: u64,
}

impl Checker {
    pub(super) fn pasid_violation(&self, what: &AccessText) -> Option<(ViolationKind, String)> {
        let p = what.pasid?;
        let g = self.pasids.get(&p)?;
        g.unbind_acked.then(|| {
            (
                ViolationKind::PasidAfterUnbind,
                format!("{what}: pasid {p} used after its unbind was acknowledged"),
            )
        })
    }

    /// The pending stale uses of `pasid` become violations: its binding ends (or restarts)
    /// and no invalidation covered them.
    pub(super) fn judge_stale(&mut self, pasid: u32) -> Vec<(ViolationKind, String)> {
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
    pub(super) fn end_binding(&mut self, pasid: u32) {
        self.draining.remove(&pasid);
        self.mm_gone.remove(&pasid);
    }

    /// `pasid` starts draining; a `checker_degraded` finding when the set is full (the device
    /// bounds its contexts far lower; a journal that unbinds without acknowledging could not).
    pub(super) fn track_draining(&mut self, pasid: u32) -> Option<(ViolationKind, String)> {
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
    pub(super) fn address_space_empty(&mut self, pasid: u32) -> Option<(ViolationKind, String)> {
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
    pub(super) fn mark_pasid(
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
