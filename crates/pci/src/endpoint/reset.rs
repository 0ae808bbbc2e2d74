//! The reset sequence of every kind (FLR, PM, client, lost connection): state changes that close
//! the bus gate, the drain of accesses in flight ([`DRAIN_LIMIT`](super::DRAIN_LIMIT)), config space and MSI-X back
//! to power-on, then [`PciFunction::reset`]. One place so that every reset kind orders these
//! steps the same way.

use log::{info, warn};
use std::time::{Duration, Instant};

use super::Endpoint;
use crate::bus::Bus;
use crate::function::{ConfigEvent, PciFunction, ResetKind};
use crate::header::reg;
use pcisim_journal::Event;

impl<F: PciFunction> Endpoint<F> {
    /// Device Control "Initiate FLR" was written (PCIe Base 6.0 §6.6.2). Software must wait
    /// for Transactions Pending to clear before it initiates an FLR (the kernel's
    /// `pcie_flr` does, after clearing Bus Master Enable). If it did not, the writes the
    /// function has already issued are still on their way: the function holds them and they
    /// land after `reset_begin` — the journal's checker reports them as `dma_during_reset`.
    /// With Transactions Pending clear nothing is in flight and the function stops at once.
    pub(super) fn initiate_flr(&mut self) {
        let pending = self.bus.inflight() > 0;
        let posted = pending && self.function.flr_with_transactions_pending();
        if posted {
            warn!(
                "{}: FLR initiated with Transactions Pending: the writes in flight land after the reset began",
                self.name
            );
            self.journal.record(Event::FlrWithTransactionsPending);
        } else {
            self.function.on_config_event(ConfigEvent::Flr);
        }
        self.reset_function_inner(ResetKind::Flr, posted);
    }

    /// Run a reset of `kind`: config space, MSI-X, then the function.
    pub fn reset_function(&mut self, kind: ResetKind) {
        self.reset_function_inner(kind, false);
    }

    /// [`Endpoint::reset_function`]; `posted_in_flight`: the function holds posted writes that
    /// land during [`PciFunction::reset`] (an FLR with Transactions Pending), so the reset
    /// begins without waiting for in-flight accesses.
    fn reset_function_inner(&mut self, kind: ResetKind, posted_in_flight: bool) {
        info!("{}: {kind:?} reset", self.name);
        let old_command = self.config.read_u16(reg::COMMAND);
        // From here the bus refuses DMA and interrupts; accesses already past the gate finish
        // (and are journaled) before the reset is; the function stops its engines in `reset`.
        self.bus.set_resetting(true);
        if !posted_in_flight {
            self.drain_inflight();
        }
        self.journal.record(Event::ResetBegin { kind });
        if kind == ResetKind::LostConnection {
            self.config.power_on_reset();
            // A new client is a new card in the slot: injected faults go with the old one,
            // except the configured reset latency.
            if self.faults.link_down {
                self.journal.record(Event::Link { up: true });
            }
            self.faults.link_down = false;
            self.faults.stuck_tp = false;
            self.bus.set_link(true);
            self.bus.inject_dma_errors(0);
        } else {
            self.config.reset();
        }
        // The function stops its engines first, so nothing it raised on the way out survives
        // in the PBA.
        self.function.reset(kind);
        if let Some(m) = self.bus.msix().as_mut() {
            m.reset();
        }
        if let Some(m) = self.bus.msi().as_mut() {
            m.reset();
        }
        let command = self.config.read_u16(reg::COMMAND);
        self.bus.set_command(command);
        self.bus.set_power(self.power_bits());
        if command != old_command {
            self.journal.record(Event::Command {
                old: old_command,
                new: command,
            });
        }
        self.bus.set_resetting(false);
        self.journal.record(Event::ResetEnd { kind });
        // Slow or failed reset (fault injection): config space reads all-ones for a while, or
        // for good. The reset itself is complete on our side; the function looks not ready.
        self.faults.never_ready = self.faults.slow_reset_ms == u32::MAX;
        self.faults.not_ready_until = match self.faults.slow_reset_ms {
            0 | u32::MAX => None,
            ms => Some(Instant::now() + Duration::from_millis(u64::from(ms))),
        };
    }

    /// Apply a change of the state that gates the bus and journal it, in the order that keeps
    /// the journal truthful with engine threads running: an enabling change is recorded before
    /// it takes effect (no DMA can be journaled ahead of the permission it relied on); a
    /// disabling change takes effect first, then accesses already past the gate drain, then it
    /// is recorded (they land before it, as they happened before it).
    pub(super) fn change_state(&mut self, disabling: bool, event: Event, apply: impl FnOnce(&Bus)) {
        if disabling {
            apply(&self.bus);
            self.drain_inflight();
            self.journal.record(event);
        } else {
            self.journal.record(event);
            apply(&self.bus);
        }
    }

    /// Wait until DMA already past the bus gate has finished, so that the state change is
    /// journaled after the last access it let through (the journal's order must be the true
    /// order, or the checker reports accesses that were legal). Accesses are copies of at most
    /// a chunk and need nothing this thread holds, so they finish — but a loaded host can
    /// deschedule an engine thread for hundreds of milliseconds (seen: ~600 ms under load 8),
    /// so the wait is long; only a wedged access (a bug) hits the limit. That is logged and
    /// journaled as `checker_degraded` (the journal's order around the change may be wrong,
    /// so the checker's verdict on it cannot be trusted): the reader's window is not clean.
    pub(super) fn drain_inflight(&self) {
        let start = Instant::now();
        let mut spins = 0u32;
        while self.bus.inflight() > 0 {
            let waited = start.elapsed();
            if waited >= self.drain_limit {
                let what = format!(
                    "drain timed out: {} access(es) still in flight after {waited:?} (limit \
                     {:?}); the state change is journaled anyway, so the journal's order \
                     around it may be wrong",
                    self.bus.inflight(),
                    self.drain_limit
                );
                warn!("{}: {what}", self.name);
                self.journal.degraded(what);
                return;
            }
            if spins < 1000 {
                spins += 1;
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}
