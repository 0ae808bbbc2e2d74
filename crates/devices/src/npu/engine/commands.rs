//! The command mailbox (BIND, UNBIND with drain, INVALIDATE), the register file and reset.
//! Moved out of `engine/mod.rs` as is.

use log::{debug, warn};
use pcisim_journal::Event;

use super::{regs, set_hi, set_lo, Context, CtxState, Regs, Ring, State};

impl State {
    // ---- commands ----------------------------------------------------------------------------

    pub(super) fn complete_command(&mut self, status: u32, result: u32) {
        self.regs.cmd_status = status;
        self.regs.cmd_result = result;
        self.regs.cmd_seq = self.regs.cmd_seq.wrapping_add(1);
        self.irq(self.regs.cmd_irq);
    }

    pub(super) fn command(&mut self, op: u32) {
        if self.regs.cmd_status & regs::CMD_BUSY != 0 {
            warn!(
                "{}: command {op} while busy ignored (UNBIND of {:?} draining)",
                self.cfg.name, self.pending_unbind
            );
            return;
        }
        let (pasid, flags) = (self.regs.cmd_pasid, self.regs.cmd_flags);
        let known = match op {
            regs::OP_BIND => regs::BIND_FLAG_PRIV,
            regs::OP_UNBIND => regs::UNBIND_FLAG_ABORT,
            regs::OP_INVALIDATE => 0,
            _ => return self.complete_command(regs::CMD_BAD_OPCODE, 0),
        };
        if pasid == 0 || pasid >= regs::PASID_LIMIT {
            return self.complete_command(regs::CMD_BAD_PASID, 0);
        }
        if flags & !known != 0 {
            return self.complete_command(regs::CMD_BAD_FLAGS, 0);
        }
        match op {
            regs::OP_BIND => self.bind(pasid, flags),
            regs::OP_UNBIND => self.unbind(pasid, flags),
            _ => self.invalidate(pasid),
        }
    }

    pub(super) fn bind(&mut self, pasid: u32, flags: u32) {
        if self.contexts.contains_key(&pasid) {
            return self.complete_command(regs::CMD_ALREADY_BOUND, 0);
        }
        if self.contexts.len() >= self.cfg.max_contexts as usize {
            return self.complete_command(regs::CMD_NO_RESOURCES, 0);
        }
        let root = self.regs.cmd_addr;
        self.atc.drop_pasid(pasid);
        self.contexts.insert(
            pasid,
            Context {
                root,
                privileged: flags & regs::BIND_FLAG_PRIV != 0,
                state: CtxState::Bound,
                empty_reported: false,
            },
        );
        self.record(Event::PasidBind { pasid, root });
        self.complete_command(regs::CMD_OK, 0);
    }

    pub(super) fn unbind(&mut self, pasid: u32, flags: u32) {
        let outstanding = if self.progressing() {
            u64::from(self.regs.sq.used())
        } else {
            0
        };
        let target = self.fetched + outstanding;
        if self
            .contexts
            .get(&pasid)
            .is_some_and(|c| c.state == CtxState::Bound)
        {
            // A binding that outlived its mm is still bound when the driver finally unbinds
            // it: say so before the unbind (checking mode).
            if let Some(host) = self.host.clone() {
                self.check_address_space(host.as_ref(), pasid);
            }
        }
        match self.contexts.get_mut(&pasid) {
            Some(c) if c.state == CtxState::Bound => {
                c.state = CtxState::Draining {
                    abort: flags & regs::UNBIND_FLAG_ABORT != 0,
                    target,
                    aborted: 0,
                };
            }
            _ => return self.complete_command(regs::CMD_NOT_BOUND, 0),
        }
        self.record(Event::PasidUnbindBegin { pasid });
        self.regs.cmd_status = regs::CMD_BUSY;
        self.pending_unbind = Some(pasid);
        self.check_drains();
    }

    pub(super) fn invalidate(&mut self, pasid: u32) {
        let (va, len) = (self.regs.cmd_addr, self.regs.cmd_len);
        let n = self.atc.invalidate(pasid, va, len);
        debug!(
            "{}: invalidate pasid {pasid} {va:#x}+{len:#x}: {n} entries",
            self.cfg.name
        );
        self.record(Event::Invalidate { pasid, va, len });
        self.complete_command(regs::CMD_OK, 0);
    }

    /// Finish every drain whose work is done: nothing of the PASID in flight and the engine
    /// past the drain point, or the engine stopped (nothing more of the PASID will run).
    pub(super) fn check_drains(&mut self) {
        let progressing = self.progressing();
        let done: Vec<(u32, u64)> = self
            .contexts
            .iter()
            .filter_map(|(&p, c)| match c.state {
                CtxState::Draining {
                    target, aborted, ..
                } if self.current != Some(p) && (self.fetched >= target || !progressing) => {
                    Some((p, aborted))
                }
                _ => None,
            })
            .collect();
        for (pasid, aborted) in done {
            self.contexts.remove(&pasid);
            self.atc.drop_pasid(pasid);
            self.record(Event::PasidDrained { pasid, aborted });
            self.record(Event::PasidUnbindAck { pasid });
            self.record(Event::PasidReleased { pasid });
            if self.pending_unbind == Some(pasid) {
                self.pending_unbind = None;
                self.complete_command(regs::CMD_OK, u32::try_from(aborted).unwrap_or(u32::MAX));
            }
        }
    }

    // ---- registers ---------------------------------------------------------------------------

    /// Read the 32-bit register at `off` (None: undefined offset).
    pub fn read(&self, off: u64) -> Option<u32> {
        let r = &self.regs;
        let atc = self.atc.stats();
        let lo = |v: u64| v as u32;
        let hi = |v: u64| (v >> 32) as u32;
        Some(match off {
            regs::MAX_CONTEXTS => self.cfg.max_contexts,
            regs::ATC_ENTRIES => self.cfg.atc_entries,
            regs::CONTROL => r.control,
            regs::STATUS => {
                let mut s = 0;
                if self.enabled() {
                    s |= regs::STATUS_ENABLED;
                }
                if r.halted {
                    s |= regs::STATUS_HALTED;
                }
                if self.current.is_none() && (!self.progressing() || r.sq.used() == 0) {
                    s |= regs::STATUS_IDLE;
                }
                if self.bus_wait {
                    s |= regs::STATUS_BUS_WAIT;
                }
                if self.enabled() && r.cq.full() && r.sq.used() > 0 {
                    s |= regs::STATUS_CQ_FULL;
                }
                s
            }
            regs::ERROR => r.error,
            regs::COMPLETED => r.completed,
            regs::FAULTS => r.faults,
            regs::STALE_USES => r.stale,
            regs::ATC_HITS => atc.hits as u32,
            regs::ATC_MISSES => atc.misses as u32,
            regs::ATC_INVALIDATIONS => atc.invalidations as u32,
            regs::CMD_PASID => r.cmd_pasid,
            regs::CMD_FLAGS => r.cmd_flags,
            regs::CMD_ADDR_LO => lo(r.cmd_addr),
            regs::CMD_ADDR_HI => hi(r.cmd_addr),
            regs::CMD_LEN_LO => lo(r.cmd_len),
            regs::CMD_LEN_HI => hi(r.cmd_len),
            regs::CMD_OP => 0,
            regs::CMD_STATUS => r.cmd_status,
            regs::CMD_RESULT => r.cmd_result,
            regs::CMD_IRQ => r.cmd_irq,
            regs::CMD_SEQ => r.cmd_seq,
            regs::SQ_BASE_LO => lo(r.sq.base),
            regs::SQ_BASE_HI => hi(r.sq.base),
            regs::SQ_SIZE => r.sq.size,
            regs::SQ_HEAD => r.sq.head,
            regs::SQ_TAIL => r.sq.tail,
            regs::CQ_BASE_LO => lo(r.cq.base),
            regs::CQ_BASE_HI => hi(r.cq.base),
            regs::CQ_SIZE => r.cq.size,
            regs::CQ_HEAD => r.cq.head,
            regs::CQ_TAIL => r.cq.tail,
            regs::CQ_IRQ => r.cq_irq,
            regs::FQ_BASE_LO => lo(r.fq.base),
            regs::FQ_BASE_HI => hi(r.fq.base),
            regs::FQ_SIZE => r.fq.size,
            regs::FQ_HEAD => r.fq.head,
            regs::FQ_TAIL => r.fq.tail,
            regs::FQ_IRQ => r.fq_irq,
            regs::FQ_LOST => r.fq_lost,
            _ => return None,
        })
    }

    /// Write the 32-bit register at `off`. Returns false for an undefined or read-only offset.
    pub fn write(&mut self, off: u64, v: u32) -> bool {
        let name = self.cfg.name.clone();
        let enabled = self.enabled();
        let r = &mut self.regs;
        let irq_mask = regs::IRQ_ENABLE | regs::IRQ_VECTOR_MASK;
        // Queue geometry changes only while the engine is disabled (and resets the indices).
        let ring_cfg = |ring: &mut Ring, f: &dyn Fn(&mut Ring)| {
            if enabled {
                warn!("{name}: queue register {off:#x} written while enabled: ignored");
            } else {
                f(ring);
                ring.head = 0;
                ring.tail = 0;
            }
        };
        match off {
            regs::CONTROL => self.set_control(v),
            regs::CMD_PASID => r.cmd_pasid = v,
            regs::CMD_FLAGS => r.cmd_flags = v,
            regs::CMD_ADDR_LO => set_lo(&mut r.cmd_addr, v),
            regs::CMD_ADDR_HI => set_hi(&mut r.cmd_addr, v),
            regs::CMD_LEN_LO => set_lo(&mut r.cmd_len, v),
            regs::CMD_LEN_HI => set_hi(&mut r.cmd_len, v),
            regs::CMD_OP => self.command(v),
            regs::CMD_IRQ => r.cmd_irq = v & irq_mask,
            regs::SQ_BASE_LO => ring_cfg(&mut r.sq, &|q| set_lo(&mut q.base, v)),
            regs::SQ_BASE_HI => ring_cfg(&mut r.sq, &|q| set_hi(&mut q.base, v)),
            regs::SQ_SIZE => ring_cfg(&mut r.sq, &|q| q.size = v),
            regs::SQ_TAIL => {
                if r.sq.size != 0 && v < r.sq.size {
                    r.sq.tail = v;
                } else {
                    warn!(
                        "{name}: SQ_TAIL {v} outside the queue (size {}) ignored",
                        r.sq.size
                    );
                }
            }
            regs::CQ_BASE_LO => ring_cfg(&mut r.cq, &|q| set_lo(&mut q.base, v)),
            regs::CQ_BASE_HI => ring_cfg(&mut r.cq, &|q| set_hi(&mut q.base, v)),
            regs::CQ_SIZE => ring_cfg(&mut r.cq, &|q| q.size = v),
            regs::CQ_HEAD => {
                if r.cq.size != 0 && v < r.cq.size {
                    r.cq.head = v;
                } else {
                    warn!(
                        "{name}: CQ_HEAD {v} outside the queue (size {}) ignored",
                        r.cq.size
                    );
                }
            }
            regs::CQ_IRQ => r.cq_irq = v & irq_mask,
            // The fault queue may be (re)configured at any time.
            regs::FQ_BASE_LO => {
                set_lo(&mut r.fq.base, v);
                (r.fq.head, r.fq.tail) = (0, 0);
            }
            regs::FQ_BASE_HI => {
                set_hi(&mut r.fq.base, v);
                (r.fq.head, r.fq.tail) = (0, 0);
            }
            regs::FQ_SIZE => {
                r.fq.size = v;
                (r.fq.head, r.fq.tail) = (0, 0);
            }
            regs::FQ_HEAD => {
                if r.fq.size != 0 && v < r.fq.size {
                    r.fq.head = v;
                } else {
                    warn!(
                        "{name}: FQ_HEAD {v} outside the queue (size {}) ignored",
                        r.fq.size
                    );
                }
            }
            regs::FQ_IRQ => r.fq_irq = v & irq_mask,
            _ => return false,
        }
        true
    }

    pub(super) fn set_control(&mut self, v: u32) {
        let was = self.enabled();
        let on = v & regs::CONTROL_ENABLE != 0;
        if v & !regs::CONTROL_ENABLE != 0 {
            warn!(
                "{}: CONTROL bits {v:#x}: only ENABLE is defined",
                self.cfg.name
            );
        }
        self.regs.control = v & regs::CONTROL_ENABLE;
        match (was, on) {
            (false, true) => {
                if !self.regs.sq.valid(regs::DESC_SIZE)
                    || !self.regs.cq.valid(regs::COMPLETION_SIZE)
                {
                    self.halt(
                        regs::ERROR_QUEUE_CONFIG,
                        &format!(
                            "invalid queue configuration: SQ {:x?}, CQ {:x?}",
                            self.regs.sq, self.regs.cq
                        ),
                    );
                } else {
                    self.regs.halted = false;
                    self.regs.error = regs::ERROR_NONE;
                }
            }
            (true, false) => {
                self.regs.halted = false;
                self.regs.error = regs::ERROR_NONE;
                self.check_drains();
            }
            _ => {}
        }
    }

    /// Power-on state: every register, every PASID context and the ATC. Bound PASIDs are
    /// journaled as released. Bumps the epoch so the engine abandons its item.
    pub fn reset(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        let pasids: Vec<u32> = self.contexts.keys().copied().collect();
        for pasid in pasids {
            self.record(Event::PasidReleased { pasid });
        }
        self.contexts.clear();
        self.atc.clear();
        self.atc.reset_stats();
        self.regs = Regs::default();
        self.fetched = 0;
        self.current = None;
        self.pending_unbind = None;
        self.bus_wait = false;
        self.irqs.clear();
    }

    /// The ATC counters.
    pub fn atc_stats(&self) -> super::super::atc::AtcStats {
        self.atc.stats()
    }

    /// Coalesced write runs performed since the engine started (test and bench view: says
    /// whether work went to the bus in runs or page by page).
    pub fn coalesced_runs(&self) -> u64 {
        self.runs
    }

    /// Bound PASIDs (test and status view).
    pub fn bound_pasids(&self) -> Vec<u32> {
        self.contexts.keys().copied().collect()
    }
}
