//! The [`Controllable`] side of the endpoint: its status for `pcisim ctl`, fault injection
//! ([`Fault`]: surprise removal, slow or never-ending reset, stuck Transactions Pending, AER
//! errors) and the AER status bits an injected error sets.

use log::info;

use super::Endpoint;
use crate::caps::{aer, pcie};
use crate::control::{Controllable, Fault};
use crate::function::PciFunction;
use crate::header::reg;
use pcisim_journal::{Event, Journal};

impl<F: PciFunction> Controllable for Endpoint<F> {
    fn journal(&self) -> Journal {
        self.journal.clone()
    }

    fn status(&self) -> serde_json::Value {
        let pending: Vec<u16> = self.bus.msix().as_ref().map_or_else(Vec::new, |m| {
            (0..m.vectors()).filter(|&v| m.is_pending(v)).collect()
        });
        serde_json::json!({
            "name": self.name,
            "command": format!("{:#06x}", self.config.read_u16(reg::COMMAND)),
            "status": format!("{:#06x}", self.config.read_u16(reg::STATUS)),
            "power_state": format!("D{}", self.power_bits()),
            "bus_master": self.bus.bus_master(),
            "link_up": !self.faults.link_down,
            "client_attached": self.bus.client_attached(),
            "dma_inflight": self.bus.inflight(),
            "msix_pending": pending,
            "msi_pending": self.bus.msi().as_ref().map_or_else(Vec::new, |m| {
                (0..m.vectors()).filter(|&v| m.is_pending(v)).collect::<Vec<u16>>()
            }),
            "faults": {
                "slow_reset_ms": self.faults.slow_reset_ms,
                "not_ready": self.faults.never_ready || self.faults.not_ready_until.is_some(),
                "stuck_transactions_pending": self.faults.stuck_tp,
            },
            "journal": self.journal.stats(),
        })
    }

    fn inject(&mut self, fault: &Fault) -> Result<(), String> {
        info!("{}: injecting {fault:?}", self.name);
        match *fault {
            Fault::LinkDown => {
                self.faults.link_down = true;
                self.change_state(true, Event::Link { up: false }, |b| b.set_link(false));
            }
            Fault::LinkUp => {
                self.faults.link_down = false;
                self.change_state(false, Event::Link { up: true }, |b| b.set_link(true));
            }
            Fault::DmaError { count } => self.bus.inject_dma_errors(count),
            Fault::SlowReset { ms } => self.faults.slow_reset_ms = ms,
            Fault::StuckTransactionsPending { on } => self.faults.stuck_tp = on,
            Fault::AerCorrectable => self.signal_aer(false, false)?,
            Fault::AerUncorrectable { fatal } => self.signal_aer(true, fatal)?,
        }
        self.journal.record(Event::FaultInjected {
            fault: format!("{fault:?}"),
        });
        Ok(())
    }
}

impl<F: PciFunction> Endpoint<F> {
    /// Record an AER error the way the function would on detecting it: the AER status bit
    /// (Receiver Error, correctable; Completion Timeout, uncorrectable) and the Device Status
    /// error bit (PCIe Base §7.5.3.5; §7.8.4). No message is sent upstream: there is no
    /// upstream to send it to through vfio-user, and signalling QEMU's ERR eventfd stops the VM.
    fn signal_aer(&mut self, uncorrectable: bool, fatal: bool) -> Result<(), String> {
        let aer_off = self
            .offsets
            .aer
            .ok_or("the function has no AER capability")?;
        let pcie_off = self
            .offsets
            .pcie
            .ok_or("the function has no PCIe capability")?;
        let (reg_at, bit) = if uncorrectable {
            (aer_off.reg(aer::UNCOR_STATUS), 1u32 << 14)
        } else {
            (aer_off.reg(aer::COR_STATUS), 1u32)
        };
        self.config.set_bits(reg_at, bit, bit);
        // Device Status: bit 0 correctable, 1 non-fatal, 2 fatal error detected.
        let ds = match (uncorrectable, fatal) {
            (false, _) => 1u32,
            (true, false) => 2,
            (true, true) => 4,
        };
        self.config.set_bits(pcie_off.reg(pcie::DEVSTA), ds, ds);
        Ok(())
    }
}
