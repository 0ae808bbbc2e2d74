//! The [`Device`] side of the endpoint: region and interrupt descriptions for the client, BAR
//! and config region reads and writes (MSI-X table and PBA served here, the rest handed to the
//! [`PciFunction`]), client attach/detach, DMA map notifications and SET_IRQS. This is the
//! REGION_READ/REGION_WRITE path every guest MMIO access takes.

use log::{info, trace, warn};

use pcisim_vfio_user::dma::{MappingInfo, PROT_READ, PROT_WRITE};
use pcisim_vfio_user::{
    irq_index, region, ClientLink, Device, DeviceError, IrqInfo, RegionFlags, RegionInfo,
};
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE, VFIO_IRQ_INFO_NORESIZE,
};

use super::config_dispatch::cfg_err;
use super::Endpoint;
use crate::caps::msi as msi_cap;
use crate::config::CONFIG_SPACE_SIZE;
use crate::function::{PciFunction, ResetKind};
use crate::header::reg;
use pcisim_journal::Event;

impl<F: PciFunction> Endpoint<F> {
    fn bar_access_check(&self, index: u32, offset: u64, len: usize) -> Result<(), DeviceError> {
        let oor = DeviceError::OutOfRange {
            region: index,
            offset,
            len,
        };
        let bar = self.bars.get(index).ok_or(oor)?;
        if len == 0 {
            return Err(DeviceError::BadAccess {
                region: index,
                offset,
                len,
            });
        }
        match offset.checked_add(len as u64) {
            Some(end) if end <= bar.size => Ok(()),
            _ => Err(DeviceError::OutOfRange {
                region: index,
                offset,
                len,
            }),
        }
    }
}

/// Which MSI-X structure an access hits.
enum MsixHit {
    Table(u64),
    Pba(u64),
}

impl<F: PciFunction> Endpoint<F> {
    fn msix_hit(
        &self,
        index: u32,
        offset: u64,
        len: usize,
    ) -> Result<Option<MsixHit>, DeviceError> {
        let guard = self.bus.msix();
        let Some(m) = guard.as_ref() else {
            return Ok(None);
        };
        let bad = DeviceError::BadAccess {
            region: index,
            offset,
            len,
        };
        let cfg = m.config();
        match m.table_hit(index, offset, len) {
            Some(true) => return Ok(Some(MsixHit::Table(offset - u64::from(cfg.table_offset)))),
            Some(false) => return Err(bad),
            None => {}
        }
        match m.pba_hit(index, offset, len) {
            Some(true) => Ok(Some(MsixHit::Pba(offset - u64::from(cfg.pba_offset)))),
            Some(false) => Err(bad),
            None => Ok(None),
        }
    }
}

impl<F: PciFunction> Device for Endpoint<F> {
    fn device_flags(&self) -> u32 {
        VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let rw = RegionFlags {
            read: true,
            write: true,
            mmap: false,
        };
        match index {
            0..=5 => Some(match self.bars.get(index) {
                Some(bar) => {
                    let mmap = self.function.bar_mmap(index);
                    RegionInfo {
                        size: bar.size,
                        flags: RegionFlags {
                            mmap: mmap.is_some(),
                            ..rw
                        },
                        mmap,
                    }
                }
                None => RegionInfo::default(),
            }),
            region::CONFIG => Some(RegionInfo {
                size: CONFIG_SPACE_SIZE as u64,
                flags: rw,
                mmap: None,
            }),
            region::ROM | region::VGA => Some(RegionInfo::default()),
            _ => None,
        }
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        let msix_count = self
            .bus
            .msix()
            .as_ref()
            .map_or(0, |m| u32::from(m.vectors()));
        let msi_count = self
            .bus
            .msi()
            .as_ref()
            .map_or(0, |m| u32::from(m.vectors()));
        match index {
            irq_index::INTX => Some(IrqInfo {
                count: 1,
                flags: VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED,
            }),
            // Like vfio-pci: MSI vectors are set up all at once (QEMU binds 2^MME of them).
            irq_index::MSI => Some(IrqInfo {
                count: msi_count,
                flags: VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
            }),
            irq_index::MSIX => Some(IrqInfo {
                count: msix_count,
                flags: VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
            }),
            irq_index::ERR | irq_index::REQ => Some(IrqInfo {
                count: 1,
                flags: VFIO_IRQ_INFO_EVENTFD,
            }),
            _ => None,
        }
    }

    fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        if index == region::CONFIG {
            self.update_transactions_pending();
            // Status.Interrupt Status (bit 3) follows the INTx line (PCI 3.0 §6.2.3).
            let st = if self.bus.intx_level() { 1u32 << 3 } else { 0 };
            self.config.set_bits(reg::STATUS, 1 << 3, st);
            // MSI Pending Bits (with per-vector masking) are the function's latch.
            if let Some(o) = self.offsets.msi.filter(|_| self.msi_per_vector_mask()) {
                let (bits, pending) = self
                    .bus
                    .msi()
                    .as_ref()
                    .map_or((0, 0), |m| (m.config().vector_mask(), m.pending_bits()));
                self.config
                    .set_bits(o.reg(msi_cap::PENDING_BITS), bits, pending);
            }
            self.config
                .read(offset, buf)
                .map_err(|e| cfg_err(e, offset, buf.len()))?;
            if self.config_dead() {
                buf.fill(0xff);
            }
            trace!("{}: config read {offset:#x} {buf:02x?}", self.name);
            return Ok(());
        }
        self.bar_access_check(index, offset, buf.len())?;
        if let Some(why) = self.bar_dead() {
            trace!(
                "{}: BAR{index} read at {offset:#x} while {why}: all-ones",
                self.name
            );
            buf.fill(0xff);
            return Ok(());
        }
        match self.msix_hit(index, offset, buf.len())? {
            Some(MsixHit::Table(rel)) => {
                if let Some(m) = self.bus.msix().as_ref() {
                    m.table_read(rel, buf);
                }
            }
            Some(MsixHit::Pba(rel)) => {
                if let Some(m) = self.bus.msix().as_ref() {
                    m.pba_read(rel, buf);
                }
            }
            None => {
                let (mut ctx, f) = self.ctx_parts();
                f.bar_read(&mut ctx, index, offset, buf);
            }
        }
        trace!("{}: BAR{index} read {offset:#x} {buf:02x?}", self.name);
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if index == region::CONFIG {
            trace!("{}: config write {offset:#x} {data:02x?}", self.name);
            return self.config_write(offset, data);
        }
        self.bar_access_check(index, offset, data.len())?;
        trace!("{}: BAR{index} write {offset:#x} {data:02x?}", self.name);
        if let Some(why) = self.bar_dead() {
            warn!(
                "{}: BAR{index} write at {offset:#x} while {why}: dropped",
                self.name
            );
            return Ok(());
        }
        match self.msix_hit(index, offset, data.len())? {
            Some(MsixHit::Table(rel)) => {
                if let Some(m) = self.bus.msix().as_mut() {
                    m.table_write(rel, data);
                }
            }
            Some(MsixHit::Pba(_)) => {
                warn!("{}: write to the MSI-X PBA ignored", self.name);
            }
            None => {
                let (mut ctx, f) = self.ctx_parts();
                f.bar_write(&mut ctx, index, offset, data);
            }
        }
        Ok(())
    }

    fn attach(&mut self, link: ClientLink) {
        info!("{}: client attached", self.name);
        self.bus.set_client(Some(link));
        self.journal.record(Event::ClientConnected);
        for l in &self.presence {
            l(true);
        }
    }

    fn detach(&mut self) {
        info!("{}: client detached", self.name);
        self.bus.set_client(None);
        // The function may not master the bus once the client is gone (the checker holds Bus
        // Master off from `client_disconnected` on): close the gate for the lost-connection
        // reset now, and let what is already through it land before the record.
        self.bus.set_resetting(true);
        self.drain_inflight();
        self.journal.record(Event::ClientDisconnected);
        for l in &self.presence {
            l(false);
        }
        self.reset_function(ResetKind::LostConnection);
    }

    fn dma_mapped(&mut self, m: &MappingInfo) {
        self.journal.record(Event::DmaMapped {
            iova: m.iova,
            size: m.size,
            backed: m.backed,
            read: m.prot & PROT_READ != 0,
            write: m.prot & PROT_WRITE != 0,
        });
    }

    fn dma_unmapped(&mut self, removed: &[MappingInfo]) {
        for m in removed {
            self.journal.record(Event::DmaUnmapped {
                iova: m.iova,
                size: m.size,
            });
        }
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.reset_function(ResetKind::DeviceReset);
        Ok(())
    }

    fn irqs_changed(&mut self, index: u32) {
        if index == irq_index::INTX {
            // An unmask with the line still asserted signals again (level semantics).
            self.bus.service_intx();
            return;
        }
        if index != irq_index::MSIX && index != irq_index::MSI {
            return;
        }
        let n = self.bus.deliver_pending_msix();
        if n > 0 {
            trace!("{}: delivered {n} pending message interrupts", self.name);
        }
    }
}
