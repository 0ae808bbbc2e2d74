//! Configuration space accesses: a config write applied through the register masks, the
//! watched registers (Command, PMCSR, MSI/MSI-X/PASID/ATS/PRI control) turned into
//! [`ConfigEvent`]s for the function, and the readiness checks (link down, not ready after a
//! reset) that make config space answer all-ones.

use log::{trace, warn};
use std::time::Instant;

use pcisim_vfio_user::{region, DeviceError};

use super::{bit, Endpoint, Watched, BUS_MASTER_BIT};
use crate::caps::msi::MsiControl;
use crate::caps::pm::PowerState;
use crate::caps::{ats, msi as msi_cap, msix as msix_cap, pasid, pcie, pm, pri, CapOffset};
use crate::config::ConfigError;
use crate::function::{ConfigEvent, PciFunction, ResetKind};
use crate::header::reg;
use pcisim_journal::Event;

impl<F: PciFunction> Endpoint<F> {
    pub(super) fn msi_per_vector_mask(&self) -> bool {
        self.bus
            .msi()
            .as_ref()
            .is_some_and(|m| m.config().per_vector_mask)
    }

    #[inline]
    pub(super) fn power_bits(&self) -> u8 {
        self.offsets
            .pm
            .map_or(0, |pm| (self.config.read_u16(pm.reg(pm::PMCSR)) & 3) as u8)
    }

    /// Config space answers all-ones: the link is down or the function is not ready after a
    /// reset (the guest's `pci_dev_wait` polls Command until it is not all-ones).
    #[inline]
    pub(super) fn config_dead(&mut self) -> bool {
        if self.faults.link_down || self.faults.never_ready {
            return true;
        }
        match self.faults.not_ready_until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                self.faults.not_ready_until = None;
                false
            }
            None => false,
        }
    }

    /// Device Status.Transactions Pending follows DMA in flight (or the stuck fault).
    pub(super) fn update_transactions_pending(&mut self) {
        if let Some(pcie) = self.offsets.pcie {
            let bit = 1u32 << pcie::DEVSTA_TRANSACTIONS_PENDING;
            let on = self.faults.stuck_tp || self.bus.inflight() > 0;
            self.config
                .set_bits(pcie.reg(pcie::DEVSTA), bit, if on { bit } else { 0 });
        }
    }

    /// BAR accesses reach the function only in D0 with Memory Space enabled and the link up;
    /// otherwise reads return all-ones and writes are dropped (a master abort on real hardware).
    #[inline]
    pub(super) fn bar_dead(&self) -> Option<&'static str> {
        if self.faults.link_down {
            Some("link down")
        } else if self.power_bits() == 3 {
            Some("D3hot")
        } else if self.config.read_u16(reg::COMMAND) & (1 << crate::header::command::MEMORY_SPACE)
            == 0
        {
            Some("memory space disabled")
        } else {
            None
        }
    }

    fn watched(&self) -> Watched {
        let r = |c: Option<CapOffset>, rel: u16| c.map_or(0, |c| self.config.read_u16(c.reg(rel)));
        Watched {
            command: self.config.read_u16(reg::COMMAND),
            pmcsr: r(self.offsets.pm, pm::PMCSR),
            msi_control: r(self.offsets.msi, msi_cap::MESSAGE_CONTROL),
            msi_mask: self
                .offsets
                .msi
                .filter(|_| self.msi_per_vector_mask())
                .map_or(0, |o| self.config.read_u32(o.reg(msi_cap::MASK_BITS))),
            msix_control: r(self.offsets.msix, msix_cap::MESSAGE_CONTROL),
            pasid_control: r(self.offsets.pasid, pasid::CONTROL),
            ats_control: r(self.offsets.ats, ats::CONTROL),
            pri_control: r(self.offsets.pri, pri::CONTROL),
        }
    }

    pub(super) fn config_write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if self.config_dead() {
            // Bounds are still checked so a bad client gets its error.
            let mut scratch = vec![0u8; data.len()];
            self.config
                .read(offset, &mut scratch)
                .map_err(|e| cfg_err(e, offset, data.len()))?;
            warn!(
                "{}: config write at {offset:#x} dropped (link down or not ready)",
                self.name
            );
            return Ok(());
        }
        let before = self.watched();
        let triggers = self
            .config
            .write(offset, data)
            .map_err(|e| cfg_err(e, offset, data.len()))?;
        if let Some(pcie) = self.offsets.pcie {
            if triggers.contains(pcie.reg(pcie::DEVCTL), pcie::DEVCTL_INITIATE_FLR) {
                self.initiate_flr();
                return Ok(());
            }
        }
        // PM 1.2 §5.4.1: writes of an unsupported state complete but change nothing.
        if let Some(pmo) = self.offsets.pm {
            let at = pmo.reg(pm::PMCSR);
            let now = self.config.read_u16(at);
            if matches!(PowerState::from_bits(now), PowerState::D1 | PowerState::D2) {
                warn!(
                    "{}: write of unsupported power state {:?} ignored",
                    self.name,
                    PowerState::from_bits(now)
                );
                self.config.set_bits(
                    at,
                    u32::from(pm::PMCSR_POWER_STATE_MASK),
                    u32::from(before.pmcsr),
                );
            }
        }
        let after = self.watched();
        let mut events = Vec::new();
        if before.command != after.command {
            events.push(ConfigEvent::CommandChanged {
                old: before.command,
                new: after.command,
            });
        }
        let (from, to) = (
            PowerState::from_bits(before.pmcsr),
            PowerState::from_bits(after.pmcsr),
        );
        if from != to {
            events.push(ConfigEvent::PowerState { from, to });
        }
        if (before.msi_control, before.msi_mask) != (after.msi_control, after.msi_mask) {
            // QEMU binds the MSI eventfds (SET_IRQS) after forwarding this write; pending
            // vectors go out then (`irqs_changed`), or below if only a mask bit was cleared.
            self.bus.set_msi_control(MsiControl::from_registers(
                after.msi_control,
                after.msi_mask,
            ));
        }
        if before.msix_control != after.msix_control {
            events.push(ConfigEvent::MsixControl {
                enable: bit(after.msix_control, msix_cap::CONTROL_ENABLE),
                function_mask: bit(after.msix_control, msix_cap::CONTROL_FUNCTION_MASK),
            });
        }
        if before.pasid_control != after.pasid_control {
            events.push(ConfigEvent::PasidControl {
                enable: bit(after.pasid_control, pasid::CONTROL_ENABLE),
                exec: bit(after.pasid_control, pasid::CONTROL_EXEC),
                privileged: bit(after.pasid_control, pasid::CONTROL_PRIV),
            });
        }
        if before.ats_control != after.ats_control {
            events.push(ConfigEvent::AtsControl {
                enable: bit(after.ats_control, ats::CONTROL_ENABLE),
                stu: (after.ats_control & ats::CONTROL_STU_MASK) as u8,
            });
        }
        if let Some(prio) = self.offsets.pri {
            if before.pri_control != after.pri_control {
                let enable = bit(after.pri_control, pri::CONTROL_ENABLE);
                // No page requests are in flight yet: the interface is stopped iff disabled.
                let stopped = 1u32 << pri::STATUS_STOPPED;
                self.config.set_bits(
                    prio.reg(pri::STATUS),
                    stopped,
                    if enable { 0 } else { stopped },
                );
                events.push(ConfigEvent::PriControl { enable });
            }
            if triggers.contains(prio.reg(pri::CONTROL), pri::CONTROL_RESET) {
                events.push(ConfigEvent::PriReset);
            }
        }
        // PCI PM 1.2 §3.2.4 (PMCSR No_Soft_Reset) and PCIe Base 6.0 §7.5.2.2: with
        // No_Soft_Reset clear, D3hot→D0 performs an internal reset and the function's context
        // is lost — MSI-X Pending Bits included, as an FLR loses them (§6.6.2). The transition
        // and the reset are one step: the function never acts in D0 with its pre-reset state,
        // so nothing held in D3hot goes out on the way (the bus gate stays closed, D3hot, until
        // the reset closes it for its own reasons and clears the PBA).
        let soft_reset = from == PowerState::D3Hot && to == PowerState::D0 && !self.no_soft_reset;
        for ev in events {
            trace!("{}: {ev:?}", self.name);
            match ev {
                ConfigEvent::CommandChanged { old, new } => {
                    let disabling = old & BUS_MASTER_BIT != 0 && new & BUS_MASTER_BIT == 0;
                    self.change_state(disabling, Event::Command { old, new }, |b| {
                        b.set_command(new)
                    });
                }
                ConfigEvent::PowerState { from, to } => {
                    let bits = self.power_bits();
                    self.change_state(
                        to == PowerState::D3Hot,
                        Event::Power {
                            from: from as u8,
                            to: to as u8,
                        },
                        // Leaving D3hot through a soft reset: the reset opens the gate.
                        |b| {
                            if !soft_reset {
                                b.set_power(bits)
                            }
                        },
                    );
                }
                _ => {}
            }
            self.function.on_config_event(ev);
        }
        if soft_reset {
            // Held interrupts are discarded by the reset (it clears the PBA and deasserts
            // INTx), never sent.
            self.reset_function(ResetKind::PmSoftReset);
            return Ok(());
        }
        // Interrupts held back while the function could not send them go out now.
        self.bus.deliver_pending_msix();
        if before.command & (1 << 10) != 0 && after.command & (1 << 10) == 0 {
            self.bus.service_intx();
        }
        Ok(())
    }
}

#[inline]
pub(super) fn cfg_err(e: ConfigError, offset: u64, len: usize) -> DeviceError {
    match e {
        ConfigError::EmptyAccess { .. } => DeviceError::BadAccess {
            region: region::CONFIG,
            offset,
            len,
        },
        _ => DeviceError::OutOfRange {
            region: region::CONFIG,
            offset,
            len,
        },
    }
}
