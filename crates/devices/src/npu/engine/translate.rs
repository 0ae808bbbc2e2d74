//! The engine's work on the queues: translation (ATC, page walk, checking mode), data access
//! through the PASID, fault records and completions. Moved out of `engine/mod.rs` as is.

use std::sync::Arc;

use log::{debug, warn};
use pcisim_journal::Event;

use super::super::queue::{Completion, FaultRecord};
use super::super::walk::{self, Access, MemError, WalkFault, PAGE_4K};
use super::{
    regs, Context, CtxState, Descriptor, DeviceMem, InspectMem, NpuHost, Ring, State, XlateError,
    RETRY,
};

impl State {
    pub(super) fn record(&self, ev: Event) {
        match &self.host {
            Some(h) => h.record(ev),
            None => debug!("{}: (no bus) {ev:?}", self.cfg.name),
        }
    }

    pub(super) fn note(&self, text: String) {
        warn!("{}: {text}", self.cfg.name);
        self.record(Event::Note { text });
    }

    /// Attach the bus side.
    pub fn set_host(&mut self, host: Arc<dyn NpuHost>) {
        self.host = Some(host);
    }

    /// Take the interrupts to raise (after unlocking).
    pub fn take_irqs(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.irqs)
    }

    pub(super) fn irq(&mut self, reg: u32) {
        if reg & regs::IRQ_ENABLE != 0 {
            let v = (reg & regs::IRQ_VECTOR_MASK) as u16;
            if v < self.cfg.msix_vectors {
                self.irqs.push(v);
            }
        }
    }

    pub(super) fn enabled(&self) -> bool {
        self.regs.control & regs::CONTROL_ENABLE != 0
    }

    /// The host, if the engine may fetch the next descriptor now.
    pub(super) fn runnable(&mut self) -> Option<Arc<dyn NpuHost>> {
        let host = self.host.clone()?;
        if !self.enabled() || self.regs.halted || self.regs.sq.used() == 0 {
            self.bus_wait = false;
            return None;
        }
        if !host.may_master() {
            self.bus_wait = true;
            return None;
        }
        self.bus_wait = false;
        if self.regs.cq.full() {
            return None;
        }
        Some(host)
    }

    /// Whether the engine can make progress on fetched-but-unfinished work.
    pub(super) fn progressing(&self) -> bool {
        self.host.is_some() && self.enabled() && !self.regs.halted && !self.bus_wait
    }

    pub(super) fn halt(&mut self, error: u32, why: &str) {
        self.regs.halted = true;
        self.regs.error = error;
        self.note(format!("engine halted: {why}"));
        self.check_drains();
    }

    /// Completion status for a descriptor that needs no memory access, or None to execute it.
    pub(super) fn prevalidate(&mut self, d: &Descriptor) -> Option<(u32, u64)> {
        if let Some(st) = d.validate() {
            self.record(Event::Note {
                text: format!(
                    "bad descriptor (status {st}): op {:#x} flags {:#x} pasid {:#x} len {:#x}",
                    d.op, d.flags, d.pasid, d.len
                ),
            });
            return Some((st, 0));
        }
        if d.op == regs::DESC_NOP {
            return Some((regs::ST_OK, 0));
        }
        match self.contexts.get_mut(&d.pasid) {
            None => Some((regs::ST_PASID_NOT_BOUND, 0)),
            Some(c) if c.aborting() => {
                if let CtxState::Draining { aborted, .. } = &mut c.state {
                    *aborted += 1;
                }
                Some((regs::ST_ABORTED, 0))
            }
            Some(_) if d.len == 0 => Some((regs::ST_OK, 0)),
            Some(_) => None,
        }
    }

    /// Count an item aborted mid-way for its PASID's drain.
    pub(super) fn abort_item(&mut self, pasid: u32) {
        if let Some(Context {
            state: CtxState::Draining { aborted, .. },
            ..
        }) = self.contexts.get_mut(&pasid)
        {
            *aborted += 1;
        }
        self.current = None;
    }

    /// Translate `va` of `d.pasid` for an access; faults are reported (fault queue, journal).
    pub(super) fn translate_reporting(
        &mut self,
        host: &dyn NpuHost,
        d: &Descriptor,
        va: u64,
        write: bool,
    ) -> Result<u64, u32> {
        match self.translate(host, d.pasid, va, write) {
            Ok(pa) => Ok(pa),
            Err(XlateError::Gone) => Err(regs::ST_ABORTED),
            Err(XlateError::Refused) => Err(RETRY),
            Err(XlateError::Fault(f)) => {
                let user = self.contexts.get(&d.pasid).is_some_and(|c| !c.privileged);
                self.report_fault(d, va, write, user, f);
                Err(regs::ST_TRANSLATION_FAULT)
            }
        }
    }

    /// The status of a failed data access: retry when the bus refused, else a DMA error.
    pub(super) fn data_error(
        &self,
        d: &Descriptor,
        what: &str,
        va: u64,
        pa: u64,
        e: MemError,
    ) -> u32 {
        if e == MemError::Refused {
            return RETRY;
        }
        self.note(format!(
            "pasid {}: {what} of va {va:#x} (pa {pa:#x}): {e}",
            d.pasid
        ));
        regs::ST_DMA_ERROR
    }

    pub(super) fn read_va(
        &mut self,
        host: &dyn NpuHost,
        d: &Descriptor,
        va: u64,
        buf: &mut [u8],
    ) -> Result<(), u32> {
        let pa = self.translate_reporting(host, d, va, false)?;
        host.dma_read(Some(d.pasid), pa, buf)
            .map_err(|e| self.data_error(d, "read", va, pa, e))
    }

    /// Write the longest prefix of `want` bytes at `va` (byte `i` being
    /// `pattern[i % pattern.len()]`) that is a *run*: at least two pages of
    /// `d.pasid` that all hit the ATC with write permission, back to back, at contiguous
    /// physical addresses — as one bus access ([`NpuHost::try_dma_write_run`]: one gate check,
    /// one DMA-map lookup, one journal record and one checker pass instead of one per page).
    /// Each page then counts as the ATC hit it is (same counters and recency as page by page).
    ///
    /// `Ok(n)`: `n` bytes written. `Err(tried)`: nothing was written, journaled or counted;
    /// `tried` bytes from `va` are to go page by page (0 when there was no run: the first
    /// page misses, lacks permission or the next page is not contiguous — the page-by-page
    /// path then walks, faults or writes just the one page; else the run's length: the bus
    /// could not do it in full, and page by page finds the exact page that refuses or faults).
    pub(super) fn write_run(
        &mut self,
        host: &dyn NpuHost,
        d: &Descriptor,
        va: u64,
        want: u64,
        pattern: &[u8],
    ) -> Result<u64, u64> {
        let Some(ctx) = self.contexts.get(&d.pasid).filter(|c| !c.aborting()) else {
            return Err(0);
        };
        let access = Access {
            write: true,
            user: !ctx.privileged,
        };
        // Each page is looked up once, as page-by-page translation would (recency updated):
        // counted as a hit when the run is written, put back when it is not.
        let mut saved = std::mem::take(&mut self.run_scratch);
        saved.clear();
        let permitted = |e: &super::super::atc::Entry| e.t.permits(access);
        let Some(first) = self.atc.touch_if(d.pasid, va, &mut saved, permitted) else {
            self.run_scratch = saved;
            return Err(0);
        };
        let pa = first.pa_of(va);
        let mut n = want.min(PAGE_4K - (va & (PAGE_4K - 1)));
        while n < want {
            let (Some(at), Some(expect)) = (va.checked_add(n), pa.checked_add(n)) else {
                break;
            };
            let next = |e: &super::super::atc::Entry| permitted(e) && e.pa_of(at) == expect;
            if self.atc.touch_if(d.pasid, at, &mut saved, next).is_none() {
                break;
            }
            n = want.min(n + PAGE_4K);
        }
        let pages = saved.len() as u64;
        let written = pages >= 2 && host.try_dma_write_run(d.pasid, pa, n as usize, pattern);
        if written {
            self.atc.count_hits(pages);
        } else {
            self.atc.untouch(d.pasid, va, &saved);
        }
        self.run_scratch = saved;
        if !written {
            return Err(if pages >= 2 { n } else { 0 });
        }
        self.runs += 1;
        Ok(n)
    }

    pub(super) fn write_va(
        &mut self,
        host: &dyn NpuHost,
        d: &Descriptor,
        va: u64,
        data: &[u8],
    ) -> Result<(), u32> {
        let pa = self.translate_reporting(host, d, va, true)?;
        host.dma_write(Some(d.pasid), pa, data)
            .map_err(|e| self.data_error(d, "write", va, pa, e))
    }

    /// Translate through the ATC, walking on a miss. In checking mode an ATC hit is compared
    /// with a fresh walk (through the checker's view of memory) and a disagreement is
    /// journaled as `StaleTranslationUsed` — the cached translation is still used, as hardware
    /// would.
    pub(super) fn translate(
        &mut self,
        host: &dyn NpuHost,
        pasid: u32,
        va: u64,
        write: bool,
    ) -> Result<u64, XlateError> {
        let ctx = match self.contexts.get(&pasid) {
            Some(c) if !c.aborting() => *c,
            _ => return Err(XlateError::Gone),
        };
        let access = Access {
            write,
            user: !ctx.privileged,
        };
        if let Some(e) = self.atc.lookup(pasid, va) {
            if e.t.permits(access) {
                let pa = e.pa_of(va);
                if self.cfg.checking && !e.stale_reported {
                    self.check_hit(host, pasid, ctx.root, va, pa, access);
                }
                return Ok(pa);
            }
            // Cached without the permission: the tables may have been upgraded; walk again.
            self.atc.remove(pasid, va);
        }
        let mem = DeviceMem { host, pasid };
        let r = walk::walk_access(&mem, ctx.root, va, access);
        if matches!(
            r,
            Err(WalkFault {
                reason: walk::FaultReason::TableUnreadable,
                ..
            })
        ) && !host.may_master()
        {
            // Table reads refused by the bus are not the page tables' fault: retry later.
            return Err(XlateError::Refused);
        }
        self.record(Event::PageWalk {
            pasid,
            va,
            pa: r.as_ref().ok().map(|t| t.pa),
        });
        match r {
            Ok(t) => {
                self.atc.insert(pasid, va, t);
                Ok(t.pa)
            }
            Err(f) => {
                if top_level_missing(&f) {
                    self.check_address_space(host, pasid);
                }
                Err(XlateError::Fault(f))
            }
        }
    }

    /// Checking mode: journal `AddressSpaceEmpty` (once per binding) if the lower half of
    /// `pasid`'s top-level table, read through the checker's view, maps nothing. A live
    /// process always maps something there (its code, its stack); after `exit_mmap` every
    /// table below the root is freed and those entries cleared. So a bound user PASID whose
    /// root maps no user address is a binding that outlived its mm (or, while draining, one
    /// whose driver did not wait for the drain): the journal's checker judges which. Not
    /// for privileged bindings (a kernel address space may map nothing below 2^47).
    pub(super) fn check_address_space(&mut self, host: &dyn NpuHost, pasid: u32) {
        if !self.cfg.checking {
            return;
        }
        let Some(c) = self.contexts.get(&pasid).copied() else {
            return;
        };
        if c.privileged || c.empty_reported {
            return;
        }
        // 256 entries: the user half (VAs below 2^47).
        let mut half = [0u8; 256 * 8];
        if host
            .inspect(pasid, c.root & walk::ADDR_MASK, &mut half)
            .is_err()
        {
            return;
        }
        if half
            .chunks_exact(8)
            .any(|e| e.try_into().map_or(0, u64::from_le_bytes) & walk::PTE_P != 0)
        {
            return;
        }
        if let Some(c) = self.contexts.get_mut(&pasid) {
            c.empty_reported = true;
        }
        warn!(
            "{}: pasid {pasid}: its page tables (root {:#x}) map no user address any more: \
             the address space was torn down under the binding",
            self.cfg.name, c.root
        );
        self.record(Event::AddressSpaceEmpty { pasid });
    }

    pub(super) fn check_hit(
        &mut self,
        host: &dyn NpuHost,
        pasid: u32,
        root: u64,
        va: u64,
        cached_pa: u64,
        access: Access,
    ) {
        let walked = walk::walk(&InspectMem { host, pasid }, root, va);
        let walked_pa = match walked {
            Ok(t) if t.pa == cached_pa && t.permits(access) => return,
            Ok(t) => Some(t.pa),
            // The checker could not read the tables: no verdict.
            Err(WalkFault {
                reason: walk::FaultReason::TableUnreadable,
                ..
            }) => return,
            Err(f) => {
                // The whole address space may be gone: say that first, the use is its
                // consequence.
                if top_level_missing(&f) {
                    self.check_address_space(host, pasid);
                }
                None
            }
        };
        self.regs.stale = self.regs.stale.wrapping_add(1);
        self.atc.mark_stale_reported(pasid, va);
        warn!(
            "{}: pasid {pasid}: stale translation used: va {va:#x} cached pa {cached_pa:#x}, \
             tables now {walked_pa:x?}",
            self.cfg.name
        );
        self.record(Event::StaleTranslationUsed {
            pasid,
            va,
            cached_pa,
            walked_pa,
        });
    }

    pub(super) fn report_fault(
        &mut self,
        d: &Descriptor,
        va: u64,
        write: bool,
        user: bool,
        f: WalkFault,
    ) {
        self.regs.faults = self.regs.faults.wrapping_add(1);
        self.record(Event::TranslationFault {
            pasid: d.pasid,
            va,
            write,
        });
        let mut access = 0;
        if write {
            access |= regs::FAULT_ACCESS_WRITE;
        }
        if user {
            access |= regs::FAULT_ACCESS_USER;
        }
        let rec = FaultRecord {
            va,
            pasid: d.pasid,
            access,
            reason: f.reason.code(),
            level: u32::from(f.level),
            tag: d.tag,
        };
        let fq = self.regs.fq;
        if !fq.valid(regs::FAULT_SIZE) || fq.full() {
            self.regs.fq_lost = self.regs.fq_lost.wrapping_add(1);
            return;
        }
        let Some(host) = self.host.clone() else {
            self.regs.fq_lost = self.regs.fq_lost.wrapping_add(1);
            return;
        };
        match host.dma_write(None, fq.slot_addr(fq.tail, regs::FAULT_SIZE), &rec.encode()) {
            Ok(()) => {
                self.regs.fq.tail = Ring::advance(fq.tail, fq.size);
                self.irq(self.regs.fq_irq);
            }
            Err(e) => {
                self.regs.fq_lost = self.regs.fq_lost.wrapping_add(1);
                self.note(format!("writing fault record: {e}"));
            }
        }
    }

    /// Write the completion: the descriptor's record in the PASID (when it has one and the
    /// PASID is usable), then the CQ entry.
    pub(super) fn complete(
        &mut self,
        host: &dyn NpuHost,
        d: &Descriptor,
        slot: u32,
        status: u32,
        res: u64,
    ) {
        let c = Completion {
            tag: d.tag,
            status,
            slot,
            result: res,
            pasid: d.pasid,
        };
        let usable = self
            .contexts
            .get(&d.pasid)
            .is_some_and(|ctx| !ctx.aborting());
        if d.crec != 0
            && d.crec.is_multiple_of(8)
            && usable
            && !matches!(status, regs::ST_ABORTED | regs::ST_PASID_NOT_BOUND)
        {
            // 32 bytes at an 8-byte aligned VA may cross a page: write per page.
            let bytes = c.encode();
            let first = ((PAGE_4K - (d.crec & (PAGE_4K - 1))) as usize).min(bytes.len());
            let (a, b) = bytes.split_at(first);
            let _ = self
                .write_va(host, d, d.crec, a)
                .and_then(|()| match b.is_empty() {
                    true => Ok(()),
                    false => self.write_va(host, d, d.crec + first as u64, b),
                });
        }
        self.regs.completed = self.regs.completed.wrapping_add(1);
        let cq = self.regs.cq;
        if !cq.valid(regs::COMPLETION_SIZE) || cq.full() {
            self.note(format!(
                "completion of slot {slot} (tag {:#x}, status {status}) lost: CQ full or invalid",
                d.tag
            ));
            return;
        }
        match host.dma_write(
            None,
            cq.slot_addr(cq.tail, regs::COMPLETION_SIZE),
            &c.encode(),
        ) {
            Ok(()) => {
                self.regs.cq.tail = Ring::advance(cq.tail, cq.size);
                if d.flags & regs::DESC_FLAG_IRQ != 0 {
                    self.irq(self.regs.cq_irq);
                }
            }
            Err(MemError::Refused) => self.note(format!(
                "completion of slot {slot} (tag {:#x}, status {status}) lost: bus refused",
                d.tag
            )),
            Err(e) => self.halt(regs::ERROR_CQ_WRITE, &format!("writing CQ slot: {e}")),
        }
    }
}

/// A walk that found no entry at the top level (PML4): the first sign of a torn-down address
/// space.
fn top_level_missing(f: &WalkFault) -> bool {
    f.level == 4 && f.reason == walk::FaultReason::NotPresent
}
