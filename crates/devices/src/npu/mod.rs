//! The NPU function, v1 (docs/npu.md): work queues in guest memory executed by an engine thread
//! over *process virtual addresses*, through PASID contexts whose page tables the device walks
//! itself and caches in a translation cache (ATC) the driver must invalidate.
//!
//! ```text
//! BAR0 (64 KiB, 64-bit)
//! 0x0000 registers (regs.rs): identity, peer, engine control/status, command mailbox
//!        (BIND / UNBIND with drain / INVALIDATE), SQ / CQ / fault queue
//! 0x8000 MSI-X table (16 vectors)
//! 0xC000 MSI-X PBA
//!
//!  SQ entry ─▶ engine ─▶ translate VA (ATC ─miss─▶ walk.rs) ─▶ Bus DMA tagged with the PASID
//!                    └─▶ completion record (VA) + CQ entry ─▶ MSI-X
//!                    └─▶ translation fault ─▶ fault queue record ─▶ MSI-X
//! ```
//!
//! All guest memory access — descriptors, page-table walks, data, completions, fault records —
//! goes through the function's [`Bus`] (gated by Bus Master Enable, power, link and reset, and
//! journaled; PASID work is journaled with its PASID). PASID lifecycle events (bind, unbind
//! begin/drained/ack, release, invalidations, walks, faults, stale translation uses) are
//! recorded in the function's journal, whose checker judges them.
//!
//! Every reset kind stops the engine (the item in flight is abandoned before the reset
//! returns), drops every PASID context and the ATC, and returns the registers to their
//! power-on values.

pub mod atc;
pub mod engine;
pub mod queue;
pub mod regs;
pub mod walk;

impl crate::regfile::RegisterFile for Npu {
    fn name(&self) -> &str {
        &self.name
    }
    fn read_reg(&self, offset: u64) -> u32 {
        Npu::read_reg(self, offset)
    }
    fn write_reg(&mut self, ctx: &mut FunctionCtx<'_>, offset: u64, value: u32) {
        Npu::write_reg(self, ctx, offset, value)
    }
}

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::regfile::RegisterFile as _;
use log::warn;
use pcisim_abi::ids;
use pcisim_journal::{Event, Refusal};
use pcisim_pci::caps::ats::AtsConfig;
use pcisim_pci::caps::msix::MsixConfig;
use pcisim_pci::caps::pasid::PasidConfig;
use pcisim_pci::caps::pcie::PcieConfig;
use pcisim_pci::caps::pm::PmConfig;
use pcisim_pci::caps::pri::PriConfig;
use pcisim_pci::{
    Bar, BuildError, Bus, ConfigEvent, DmaFault, Endpoint, EndpointBuilder, FunctionCtx, Identity,
    MsixOutcome, PciFunction, ResetKind,
};

use engine::{EngineConfig, InFlight, NpuHost, Shared};
use walk::MemError;

/// BAR holding registers, MSI-X table and PBA.
pub const REGS_BAR: u8 = 0;
/// Size of BAR0.
pub const REGS_BAR_SIZE: u64 = 64 << 10;
/// Offset of the MSI-X table in BAR0.
pub const MSIX_TABLE_OFFSET: u32 = 0x8000;
/// Offset of the MSI-X PBA in BAR0.
pub const MSIX_PBA_OFFSET: u32 = 0xc000;
/// Number of MSI-X vectors.
pub const MSIX_VECTORS: u16 = 16;
/// Vendor-specific capability kind byte: "GPU peer".
pub use pcisim_abi::npu::vsec::KIND_GPU_PEER as VSEC_KIND_GPU_PEER;

/// The GPU peer an NPU names in its vendor-specific capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerConfig {
    /// Peer identity (e.g. [`peer_id_from_name`] of the peer's socket path).
    pub id: u32,
    /// The peer's vendor ID.
    pub vendor_id: u16,
    /// The peer's device ID.
    pub device_id: u16,
}

/// A peer identity derived from a name (the peer's socket path): FNV-1a-64 folded to 32 bits,
/// never 0.
pub fn peer_id_from_name(name: &str) -> u32 {
    let h = crate::gpu::fnv1a64_update(crate::gpu::FNV1A64_OFFSET_BASIS, name.as_bytes());
    let id = (h ^ (h >> 32)) as u32;
    id.max(1)
}

/// Whether the GPU peer is present, shared between whoever tracks the peer (the server) and
/// the NPU, which reports it in PEER_STATUS.
#[derive(Debug, Clone, Default)]
pub struct PeerPresence(Arc<AtomicBool>);

impl PeerPresence {
    /// Set presence.
    pub fn set(&self, present: bool) {
        self.0.store(present, Ordering::Release);
    }

    /// Current presence.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// How to build an NPU function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpuConfig {
    /// Name used in log messages.
    pub name: String,
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
    /// The GPU peer named in the vendor-specific capability, if any.
    pub peer: Option<PeerConfig>,
    /// Checking mode: re-walk on every ATC hit and journal stale translation uses.
    pub checking: bool,
    /// ATC capacity in entries.
    pub atc_entries: u32,
    /// Maximum PASIDs bound at once.
    pub max_contexts: u32,
    /// Minimum time per chunk (at most one page) of a descriptor: a slower engine, so that
    /// work is reliably still in flight when a process exits (the SVA scenarios). Zero: full
    /// speed.
    pub chunk_delay: std::time::Duration,
}

impl Default for NpuConfig {
    fn default() -> NpuConfig {
        NpuConfig {
            name: "npu".to_string(),
            vendor_id: ids::VENDOR_ID,
            device_id: ids::NPU_DEVICE_ID,
            class_code: ids::NPU_CLASS_CODE,
            revision: ids::REVISION,
            subsystem_vendor_id: ids::SUBSYSTEM_VENDOR_ID,
            subsystem_id: ids::SUBSYSTEM_ID,
            no_soft_reset: false,
            immediate_readiness: false,
            journal_records: pcisim_journal::DEFAULT_CAPACITY,
            peer: None,
            checking: true,
            atc_entries: atc::DEFAULT_CAPACITY as u32,
            max_contexts: 256,
            chunk_delay: std::time::Duration::ZERO,
        }
    }
}

/// Errors of building an NPU.
#[derive(Debug, thiserror::Error)]
pub enum NpuError {
    /// The endpoint could not be built.
    #[error("Building the NPU endpoint failed")]
    Build(#[from] BuildError),
    /// The engine thread could not be started.
    #[error("Starting the NPU engine thread failed")]
    Spawn(#[source] std::io::Error),
    /// A configuration value is out of range.
    #[error("Invalid NPU configuration: {0}")]
    Config(&'static str),
}

/// The vendor-specific capability bytes (after the 3-byte header) naming `peer`.
///
/// ```text
/// +3 u8 kind (0x01 GPU peer) | +4 u32 peer id | +8 u16 peer vendor | +10 u16 peer device
/// ```
pub fn peer_capability_data(peer: &PeerConfig) -> Vec<u8> {
    pcisim_abi::npu::vsec::PeerCapability {
        id: peer.id,
        vendor_id: peer.vendor_id,
        device_id: peer.device_id,
    }
    .data()
    .to_vec()
}

/// Build the NPU endpoint described by `cfg`.
pub fn endpoint(cfg: &NpuConfig) -> Result<Endpoint<Npu>, NpuError> {
    let npu = Npu::new(cfg)?;
    let identity = Identity {
        vendor_id: cfg.vendor_id,
        device_id: cfg.device_id,
        class_code: cfg.class_code,
        revision: cfg.revision,
        subsystem_vendor_id: cfg.subsystem_vendor_id,
        subsystem_id: cfg.subsystem_id,
    };
    let mut b = EndpointBuilder::new(cfg.name.clone(), identity)
        .bar(REGS_BAR, Bar::mem64(REGS_BAR_SIZE))
        .pm(PmConfig {
            no_soft_reset: cfg.no_soft_reset,
        })
        .msix(MsixConfig {
            vectors: MSIX_VECTORS,
            table_bar: REGS_BAR,
            table_offset: MSIX_TABLE_OFFSET,
            pba_bar: REGS_BAR,
            pba_offset: MSIX_PBA_OFFSET,
        })
        .pcie(PcieConfig { flr: true });
    if let Some(peer) = &cfg.peer {
        b = b.vendor_specific(&peer_capability_data(peer));
    }
    let ep = b
        .aer()
        .ats(AtsConfig::default())
        .pasid(PasidConfig {
            exec: false,
            privileged: true,
            max_width: 20,
        })
        .pri(PriConfig::default())
        .immediate_readiness(cfg.immediate_readiness)
        .journal_records(cfg.journal_records)
        .build(npu)?;
    Ok(ep)
}

/// [`NpuHost`] over the function's [`Bus`].
#[derive(Debug, Clone)]
pub struct BusHost(pub Bus);

fn mem_err(f: DmaFault) -> MemError {
    match f {
        DmaFault::Refused(
            Refusal::BusMasterDisabled | Refusal::D3hot | Refusal::LinkDown | Refusal::Resetting,
        ) => MemError::Refused,
        DmaFault::Refused(Refusal::NoClient | Refusal::InjectedError) => MemError::Failed,
        DmaFault::Unmapped { iova, len } | DmaFault::Protection { iova, len } => {
            MemError::Unmapped { pa: iova, len }
        }
    }
}

impl NpuHost for BusHost {
    fn may_master(&self) -> bool {
        self.0.may_master().is_ok()
    }

    fn dma_read(&self, pasid: Option<u32>, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        match pasid {
            Some(p) => self.0.dma_read_pasid(p, addr, buf),
            None => self.0.dma_read(addr, buf),
        }
        .map_err(mem_err)
    }

    fn dma_write(&self, pasid: Option<u32>, addr: u64, data: &[u8]) -> Result<(), MemError> {
        match pasid {
            Some(p) => self.0.dma_write_pasid(p, addr, data),
            None => self.0.dma_write(addr, data),
        }
        .map_err(mem_err)
    }

    fn try_dma_write_run(&self, pasid: u32, addr: u64, len: usize, pattern: &[u8]) -> bool {
        self.0.try_dma_write_run(Some(pasid), addr, len, pattern)
    }

    fn inspect(&self, pasid: u32, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        // The checking re-walk is the oracle's read, not device DMA: unjournaled, ungated.
        let _ = pasid;
        self.0.inspect(addr, buf).map_err(mem_err)
    }

    fn raise_msix(&self, vector: u16) -> MsixOutcome {
        self.0.raise_msix(vector)
    }

    fn record(&self, event: Event) {
        self.0.journal().record(event);
    }

    fn in_flight(&self) -> Box<dyn InFlight + '_> {
        Box::new(self.0.transaction())
    }
}

/// The NPU function.
pub struct Npu {
    name: String,
    shared: Arc<Shared>,
    engine: Option<JoinHandle<()>>,
    host: Option<Arc<dyn NpuHost>>,
    peer: Option<PeerConfig>,
    presence: PeerPresence,
    checking: bool,
}

impl std::fmt::Debug for Npu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Npu")
            .field("name", &self.name)
            .field("peer", &self.peer)
            .field("checking", &self.checking)
            .finish_non_exhaustive()
    }
}

impl Npu {
    /// An NPU with its engine thread started (idle until a bus is attached and the driver
    /// enables it).
    pub fn new(cfg: &NpuConfig) -> Result<Npu, NpuError> {
        if cfg.atc_entries == 0 || cfg.max_contexts == 0 {
            return Err(NpuError::Config(
                "atc_entries and max_contexts must be at least 1",
            ));
        }
        let shared = Arc::new(Shared::new(EngineConfig {
            name: cfg.name.clone(),
            checking: cfg.checking,
            max_contexts: cfg.max_contexts,
            atc_entries: cfg.atc_entries,
            msix_vectors: MSIX_VECTORS,
            chunk_delay: cfg.chunk_delay,
        }));
        let s = shared.clone();
        let engine = std::thread::Builder::new()
            .name(format!("npu-engine:{}", cfg.name))
            .spawn(move || s.run())
            .map_err(NpuError::Spawn)?;
        Ok(Npu {
            name: cfg.name.clone(),
            shared,
            engine: Some(engine),
            host: None,
            peer: cfg.peer,
            presence: PeerPresence::default(),
            checking: cfg.checking,
        })
    }

    /// Connect the engine to its memory, interrupts and journal (done by
    /// [`PciFunction::attach_bus`]; tests attach their own host).
    pub fn attach_host(&mut self, host: Arc<dyn NpuHost>) {
        self.host = Some(host.clone());
        self.shared.lock().set_host(host);
        self.shared.notify();
    }

    /// The peer-presence handle to share with whoever tracks the GPU peer.
    pub fn peer_presence(&self) -> PeerPresence {
        self.presence.clone()
    }

    /// The shared state (tests and status views).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn peer_status(&self) -> u32 {
        match self.peer {
            None => 0,
            Some(_) if self.presence.get() => regs::PEER_CONFIGURED | regs::PEER_PRESENT,
            Some(_) => regs::PEER_CONFIGURED,
        }
    }

    fn features(&self) -> u32 {
        let mut f = regs::FEATURE_PASID | regs::FEATURE_ATC | regs::FEATURE_FAULT_QUEUE;
        if self.checking {
            f |= regs::FEATURE_CHECKING;
        }
        if self.peer.is_some() {
            f |= regs::FEATURE_PEER;
        }
        f
    }

    fn read_reg(&self, off: u64) -> u32 {
        match off {
            regs::ID => regs::ID_MAGIC,
            regs::VERSION => regs::VERSION_1_0,
            regs::FEATURES => self.features(),
            regs::MSIX_VECTORS => u32::from(MSIX_VECTORS),
            regs::PEER_STATUS => self.peer_status(),
            regs::PEER_ID => self.peer.map_or(0, |p| p.id),
            _ => match self.shared.lock().read(off) {
                Some(v) => v,
                None => {
                    warn!("{}: read of undefined BAR0 offset {off:#x}", self.name);
                    0
                }
            },
        }
    }

    fn write_reg(&mut self, ctx: &mut FunctionCtx<'_>, off: u64, v: u32) {
        let mut g = self.shared.lock();
        let known = g.write(off, v);
        let irqs = g.take_irqs();
        drop(g);
        self.shared.notify();
        if !known {
            warn!(
                "{}: write of {v:#x} to read-only or undefined BAR0 offset {off:#x} ignored",
                self.name
            );
        }
        for vector in irqs {
            match &self.host {
                Some(h) => h.raise_msix(vector),
                None => ctx.raise_msix(vector),
            };
        }
    }
}

impl PciFunction for Npu {
    fn bar_read(&mut self, _ctx: &mut FunctionCtx<'_>, bar: u32, offset: u64, data: &mut [u8]) {
        if bar == u32::from(REGS_BAR) {
            self.regs_read(offset, data);
        } else {
            data.fill(0);
        }
    }

    fn bar_write(&mut self, ctx: &mut FunctionCtx<'_>, bar: u32, offset: u64, data: &[u8]) {
        if bar == u32::from(REGS_BAR) {
            self.regs_write(ctx, offset, data);
        }
    }

    fn reset(&mut self, kind: ResetKind) {
        log::info!(
            "{}: {kind:?} reset: engine stopped, PASIDs and ATC dropped",
            self.name
        );
        self.shared.lock().reset();
        self.shared.notify();
    }

    fn on_config_event(&mut self, _ev: ConfigEvent) {
        // Bus Master, power and MSI-X changes may let the engine run (or make it wait).
        self.shared.notify();
    }

    fn attach_bus(&mut self, bus: Bus) {
        self.attach_host(Arc::new(BusHost(bus)));
    }
}

impl Drop for Npu {
    fn drop(&mut self) {
        self.shared.shutdown();
        if let Some(t) = self.engine.take() {
            if t.join().is_err() {
                warn!("{}: engine thread panicked", self.name);
            }
        }
    }
}
