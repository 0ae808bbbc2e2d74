//! The GPU function, v1 (docs/programming-model.md, "GPU function").
//!
//! ```text
//! BAR0 (64 KiB, 64-bit)            BAR2 (vram, 64-bit prefetchable, memfd, mmap-able)
//! 0x0000 registers (regs.rs)       0 .. vram_size: VRAM
//! 0x8000 MSI-X table (16 vectors)
//! 0xC000 MSI-X PBA
//! ```
//!
//! With `irq: IrqMode::Msi` the function has an MSI capability (16 vectors, 64-bit, per-vector
//! masking) instead of MSI-X, and no table or PBA in BAR0; the vector numbers are the same. QEMU
//! 11.1.3 aborts on `device_del` of a `vfio-user-pci` device with MSI-X (docs/lab.md), so a GPU
//! meant to be hot-removed uses MSI.
//!
//! The command ring (ring.rs) is processed by an engine thread that does all client-memory
//! access through the function's [`Bus`], started when the endpoint attaches the bus.
//!
//! Registers return to their defaults on every reset kind; the ring engine is stopped (the
//! command in flight aborted) before a reset returns. VRAM contents survive FLR, PM soft
//! reset and DEVICE_RESET (as on real GPUs, where a function reset does not scrub memory); on
//! a lost connection VRAM is discarded (zeroed, pages returned), since the next client is a new
//! machine.

pub mod regs;
pub mod ring;
mod vram;

#[cfg(test)]
mod ring_tests;

impl crate::regfile::RegisterFile for Gpu {
    fn name(&self) -> &str {
        &self.name
    }
    fn read_reg(&self, offset: u64) -> u32 {
        Gpu::read_reg(self, offset)
    }
    fn write_reg(&mut self, ctx: &mut FunctionCtx<'_>, offset: u64, value: u32) {
        Gpu::write_reg(self, ctx, offset, value)
    }
}

#[cfg(test)]
mod tests;

use crate::regfile::RegisterFile as _;
use log::warn;
use pcisim_abi::ids;
use pcisim_pci::caps::ats::AtsConfig;
use pcisim_pci::caps::msi::MsiConfig;
use pcisim_pci::caps::msix::MsixConfig;
use pcisim_pci::caps::pasid::PasidConfig;
use pcisim_pci::caps::pcie::PcieConfig;
use pcisim_pci::caps::pm::PmConfig;
use pcisim_pci::caps::pri::PriConfig;
use pcisim_pci::{
    Bar, BuildError, Bus, ConfigEvent, Endpoint, EndpointBuilder, FunctionCtx, Identity,
    MsixOutcome, PciFunction, ResetKind,
};
use pcisim_vfio_user::RegionMmap;
use std::sync::Arc;

pub use vram::{Vram, VramError};

/// The VRAM commands' formulas (CHECKSUM's FNV-1a-64, FILL's pattern), from pcisim-abi.
pub use pcisim_abi::gpu::vram::{fill_byte, fnv1a64_update, FNV1A64_OFFSET_BASIS, FNV1A64_PRIME};

/// BAR holding registers, MSI-X table and PBA.
pub const REGS_BAR: u8 = 0;
/// Size of BAR0.
pub const REGS_BAR_SIZE: u64 = 64 << 10;
/// BAR holding VRAM.
pub const VRAM_BAR: u8 = 2;
/// Offset of the MSI-X table in BAR0.
pub const MSIX_TABLE_OFFSET: u32 = 0x8000;
/// Offset of the MSI-X PBA in BAR0.
pub const MSIX_PBA_OFFSET: u32 = 0xc000;
/// Number of MSI-X vectors (and of MSI vectors with [`IrqMode::Msi`]).
pub const MSIX_VECTORS: u16 = 16;

/// Which message interrupts the GPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IrqMode {
    /// MSI-X, table and PBA in BAR0 (the default).
    #[default]
    Msix,
    /// MSI with [`MSIX_VECTORS`] vectors and per-vector masking; nothing in BAR0.
    Msi,
}
/// Default VRAM size.
pub const DEFAULT_VRAM_SIZE: u64 = 256 << 20;

/// How to build a GPU function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuConfig {
    /// Name used in log messages.
    pub name: String,
    /// VRAM (BAR2) size: a power of two ≥ 4 KiB.
    pub vram_size: u64,
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// 24-bit class code.
    pub class_code: u32,
    /// Revision ID.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// PMCSR No_Soft_Reset: D3hot→D0 keeps state.
    pub no_soft_reset: bool,
    /// Status "Immediate Readiness".
    pub immediate_readiness: bool,
    /// Records the journal ring keeps (`journal=N`).
    pub journal_records: usize,
    /// MSI-X or MSI.
    pub irq: IrqMode,
}

impl Default for GpuConfig {
    fn default() -> GpuConfig {
        GpuConfig {
            name: "gpu".to_string(),
            vram_size: DEFAULT_VRAM_SIZE,
            vendor_id: ids::VENDOR_ID,
            device_id: ids::GPU_DEVICE_ID,
            class_code: ids::GPU_CLASS_CODE,
            revision: ids::REVISION,
            subsystem_vendor_id: ids::SUBSYSTEM_VENDOR_ID,
            subsystem_id: ids::SUBSYSTEM_ID,
            no_soft_reset: false,
            immediate_readiness: false,
            journal_records: pcisim_journal::DEFAULT_CAPACITY,
            irq: IrqMode::default(),
        }
    }
}

/// Errors of building a GPU.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The endpoint could not be built.
    #[error("Building the GPU endpoint failed")]
    Build(#[from] BuildError),
    /// VRAM could not be created.
    #[error("Creating VRAM failed")]
    Vram(#[from] VramError),
}

/// BAR0 register state (everything that resets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Regs {
    scratch: [u32; SCRATCH_LEN],
    irq_count: u32,
    irq_last_error: u32,
    window_offset: u64,
    window_length: u64,
    seed: u32,
    status: u32,
    result: u64,
}

const SCRATCH_LEN: usize = regs::SCRATCH_COUNT as usize;

fn set_lo(v: &mut u64, lo: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(lo);
}

fn set_hi(v: &mut u64, hi: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(hi) << 32);
}

/// The GPU function.
#[derive(Debug)]
pub struct Gpu {
    name: String,
    regs: Regs,
    vram: Arc<Vram>,
    ring: ring::Engine<Bus>,
    bus: Option<Bus>,
}

/// Build the GPU endpoint described by `cfg`.
pub fn endpoint(cfg: &GpuConfig) -> Result<Endpoint<Gpu>, GpuError> {
    let gpu = Gpu::new(cfg)?;
    let identity = Identity {
        vendor_id: cfg.vendor_id,
        device_id: cfg.device_id,
        class_code: cfg.class_code,
        revision: cfg.revision,
        subsystem_vendor_id: cfg.subsystem_vendor_id,
        subsystem_id: cfg.subsystem_id,
    };
    let ep = EndpointBuilder::new(cfg.name.clone(), identity)
        .bar(REGS_BAR, Bar::mem64(REGS_BAR_SIZE))
        .bar(VRAM_BAR, Bar::mem64(cfg.vram_size).prefetchable())
        .pm(PmConfig {
            no_soft_reset: cfg.no_soft_reset,
        });
    let ep = match cfg.irq {
        IrqMode::Msix => ep.msix(MsixConfig {
            vectors: MSIX_VECTORS,
            table_bar: REGS_BAR,
            table_offset: MSIX_TABLE_OFFSET,
            pba_bar: REGS_BAR,
            pba_offset: MSIX_PBA_OFFSET,
        }),
        IrqMode::Msi => ep.msi(MsiConfig {
            vectors: MSIX_VECTORS as u8,
            per_vector_mask: true,
        }),
    };
    let ep = ep
        .pcie(PcieConfig { flr: true })
        .aer()
        .ats(AtsConfig::default())
        .pasid(PasidConfig::default())
        .pri(PriConfig::default())
        .immediate_readiness(cfg.immediate_readiness)
        .journal_records(cfg.journal_records)
        .build(gpu)?;
    Ok(ep)
}

impl Gpu {
    /// A GPU with fresh (zeroed) VRAM of `cfg.vram_size` bytes.
    pub fn new(cfg: &GpuConfig) -> Result<Gpu, GpuError> {
        let vram = Arc::new(Vram::new(cfg.vram_size)?);
        Ok(Gpu {
            name: cfg.name.clone(),
            regs: Regs::default(),
            ring: ring::Engine::new(&cfg.name, vram.clone(), MSIX_VECTORS),
            vram,
            bus: None,
        })
    }

    /// The command ring's registers (a snapshot).
    pub fn ring_regs(&self) -> ring::RingRegs {
        self.ring.regs()
    }

    /// The VRAM.
    pub fn vram(&self) -> &Vram {
        &self.vram
    }

    fn read_reg(&self, off: u64) -> u32 {
        let r = &self.regs;
        match off {
            regs::ID => regs::ID_MAGIC,
            regs::VERSION => regs::VERSION_1_1,
            regs::VRAM_SIZE_LO => self.vram.size() as u32,
            regs::VRAM_SIZE_HI => (self.vram.size() >> 32) as u32,
            regs::MSIX_VECTORS => u32::from(MSIX_VECTORS),
            o if (regs::SCRATCH..regs::SCRATCH + 4 * regs::SCRATCH_COUNT).contains(&o) => r
                .scratch
                .get(((o - regs::SCRATCH) / 4) as usize)
                .copied()
                .unwrap_or(0),
            regs::IRQ_DOORBELL | regs::VRAM_CMD => 0,
            regs::IRQ_COUNT => r.irq_count,
            regs::IRQ_LAST_ERROR => r.irq_last_error,
            regs::VRAM_OFFSET_LO => r.window_offset as u32,
            regs::VRAM_OFFSET_HI => (r.window_offset >> 32) as u32,
            regs::VRAM_LENGTH_LO => r.window_length as u32,
            regs::VRAM_LENGTH_HI => (r.window_length >> 32) as u32,
            regs::VRAM_SEED => r.seed,
            regs::VRAM_STATUS => r.status,
            regs::VRAM_RESULT_LO => r.result as u32,
            regs::VRAM_RESULT_HI => (r.result >> 32) as u32,
            o if (regs::RING_BASE_LO..=regs::RING_ERRORS).contains(&o) => self.read_ring(o),
            _ => {
                warn!("{}: read of undefined BAR0 offset {off:#x}", self.name);
                0
            }
        }
    }

    fn write_reg(&mut self, ctx: &mut FunctionCtx<'_>, off: u64, v: u32) {
        let r = &mut self.regs;
        match off {
            o if (regs::SCRATCH..regs::SCRATCH + 4 * regs::SCRATCH_COUNT).contains(&o) => {
                if let Some(s) = r.scratch.get_mut(((o - regs::SCRATCH) / 4) as usize) {
                    *s = v;
                }
            }
            regs::IRQ_DOORBELL => self.doorbell(ctx, v),
            regs::VRAM_OFFSET_LO => set_lo(&mut r.window_offset, v),
            regs::VRAM_OFFSET_HI => set_hi(&mut r.window_offset, v),
            regs::VRAM_LENGTH_LO => set_lo(&mut r.window_length, v),
            regs::VRAM_LENGTH_HI => set_hi(&mut r.window_length, v),
            regs::VRAM_SEED => r.seed = v,
            regs::VRAM_CMD => self.command(v),
            regs::RING_BASE_LO => self.ring.write_base(false, v),
            regs::RING_BASE_HI => self.ring.write_base(true, v),
            regs::RING_SIZE => self.ring.write_size(v),
            regs::RING_CTRL => self.ring.write_ctrl(v),
            regs::RING_TAIL => self.ring.write_tail(v),
            regs::FENCE_VECTOR => self.ring.write_vector(true, v),
            regs::ERROR_VECTOR => self.ring.write_vector(false, v),
            regs::ID
            | regs::VERSION
            | regs::VRAM_SIZE_LO
            | regs::VRAM_SIZE_HI
            | regs::MSIX_VECTORS
            | regs::IRQ_COUNT
            | regs::IRQ_LAST_ERROR
            | regs::VRAM_STATUS
            | regs::VRAM_RESULT_LO
            | regs::VRAM_RESULT_HI
            | regs::RING_HEAD
            | regs::RING_STATUS
            | regs::RING_ERROR
            | regs::RING_FAULT_ADDR_LO
            | regs::RING_FAULT_ADDR_HI
            | regs::LAST_FENCE_LO
            | regs::LAST_FENCE_HI
            | regs::CMDS_COMPLETED
            | regs::RING_ERRORS => {
                warn!(
                    "{}: write to read-only register {off:#x} ignored",
                    self.name
                );
            }
            _ => warn!(
                "{}: write of {v:#x} to undefined BAR0 offset {off:#x} ignored",
                self.name
            ),
        }
    }

    fn read_ring(&self, off: u64) -> u32 {
        let r = self.ring.regs();
        match off {
            regs::RING_BASE_LO => r.base as u32,
            regs::RING_BASE_HI => (r.base >> 32) as u32,
            regs::RING_SIZE => r.size,
            regs::RING_CTRL => u32::from(r.enabled) * ring::ctrl::ENABLE,
            regs::RING_HEAD => r.head,
            regs::RING_TAIL => r.tail,
            regs::RING_STATUS => r.status(),
            regs::RING_ERROR => r.error_reg(),
            regs::RING_FAULT_ADDR_LO => r.fault_addr as u32,
            regs::RING_FAULT_ADDR_HI => (r.fault_addr >> 32) as u32,
            regs::LAST_FENCE_LO => r.last_fence as u32,
            regs::LAST_FENCE_HI => (r.last_fence >> 32) as u32,
            regs::FENCE_VECTOR => u32::from(r.fence_vector),
            regs::ERROR_VECTOR => u32::from(r.error_vector),
            regs::CMDS_COMPLETED => r.completed,
            regs::RING_ERRORS => r.errors,
            _ => 0,
        }
    }

    fn doorbell(&mut self, ctx: &mut FunctionCtx<'_>, v: u32) {
        let r = &mut self.regs;
        let outcome = match u16::try_from(v) {
            Ok(vector) if vector < MSIX_VECTORS => ctx.raise_msix(vector),
            _ => MsixOutcome::InvalidVector,
        };
        r.irq_last_error = match outcome {
            MsixOutcome::Delivered => {
                r.irq_count = r.irq_count.wrapping_add(1);
                regs::IRQ_OK
            }
            MsixOutcome::Pending => regs::IRQ_ERR_NOT_BOUND,
            MsixOutcome::Refused => regs::IRQ_ERR_BUS_MASTER_OFF,
            MsixOutcome::InvalidVector => regs::IRQ_ERR_VECTOR_RANGE,
        };
    }

    fn command(&mut self, cmd: u32) {
        let (offset, len) = (self.regs.window_offset, self.regs.window_length);
        let result = match cmd {
            regs::CMD_CHECKSUM => self.vram.checksum(offset, len).map(Some),
            regs::CMD_FILL => self.vram.fill(offset, len, self.regs.seed).map(|()| None),
            _ => {
                warn!("{}: unknown VRAM command {cmd}", self.name);
                self.regs.status = regs::STATUS_UNKNOWN_COMMAND;
                return;
            }
        };
        match result {
            Ok(sum) => {
                if let Some(sum) = sum {
                    self.regs.result = sum;
                }
                self.regs.status = regs::STATUS_OK;
            }
            Err(e) => {
                warn!("{}: VRAM command {cmd}: {e}", self.name);
                self.regs.status = regs::STATUS_OUT_OF_RANGE;
            }
        }
    }
}

impl PciFunction for Gpu {
    fn bar_read(&mut self, _ctx: &mut FunctionCtx<'_>, bar: u32, offset: u64, data: &mut [u8]) {
        match bar {
            b if b == u32::from(REGS_BAR) => self.regs_read(offset, data),
            b if b == u32::from(VRAM_BAR) => {
                if let Err(e) = self.vram.read(offset, data) {
                    warn!("{}: {e}", self.name);
                    data.fill(0xff);
                }
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, ctx: &mut FunctionCtx<'_>, bar: u32, offset: u64, data: &[u8]) {
        match bar {
            b if b == u32::from(REGS_BAR) => self.regs_write(ctx, offset, data),
            b if b == u32::from(VRAM_BAR) => {
                if let Err(e) = self.vram.write(offset, data) {
                    warn!("{}: {e}", self.name);
                }
            }
            _ => {}
        }
    }

    fn reset(&mut self, kind: ResetKind) {
        // Stop the engine first: once this returns it performs no DMA and raises nothing.
        self.ring.reset();
        if let Some(bus) = self.bus.as_ref() {
            // An interrupt the engine raised while the endpoint was already resetting was
            // refused and left pending after the endpoint cleared the PBA; the reset state has
            // nothing pending.
            if let Some(m) = bus.msix().as_mut() {
                m.reset();
            }
        }
        self.regs = Regs::default();
        if kind == ResetKind::LostConnection {
            if let Err(e) = self.vram.discard() {
                warn!("{}: discarding VRAM failed: {e}", self.name);
            }
        }
    }

    fn bar_mmap(&self, bar: u32) -> Option<RegionMmap> {
        (bar == u32::from(VRAM_BAR)).then(|| self.vram.region_mmap())
    }

    fn flr_with_transactions_pending(&mut self) -> bool {
        // The chunk in flight is held and lands when `reset` stops the engine.
        self.ring.hold_posted()
    }

    fn on_config_event(&mut self, ev: ConfigEvent) {
        if ev == ConfigEvent::Flr {
            // Stop the engine before the endpoint's reset begins, so no access of the command
            // in flight lands inside the reset.
            self.ring.reset();
        }
    }

    fn attach_bus(&mut self, bus: Bus) {
        self.ring.attach(bus.clone());
        self.bus = Some(bus);
    }
}
