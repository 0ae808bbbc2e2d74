//! [`Endpoint`]: a PCIe endpoint function served over vfio-user. It owns configuration space,
//! the MSI-X table and PBA and the reset sequence, and hands BAR accesses to a
//! [`PciFunction`].
//!
//! Reset sequence (every kind): configuration space back to its power-on snapshot (sticky bits
//! kept, except on [`ResetKind::LostConnection`], which is a power cycle), MSI-X table masked and
//! PBA cleared, then [`PciFunction::reset`]. Interrupt eventfd bindings are kept: QEMU does not
//! resend SET_IRQS after an FLR or PM reset it did not see.

use log::{info, trace, warn};
use std::time::{Duration, Instant};

use pcisim_vfio_user::dma::{MappingInfo, PROT_READ, PROT_WRITE};
use pcisim_vfio_user::{
    irq_index, region, ClientLink, Device, DeviceError, IrqInfo, RegionFlags, RegionInfo,
};
use serde::Serialize;
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE, VFIO_IRQ_INFO_NORESIZE,
};

use crate::bus::Bus;
use crate::caps::ats::AtsConfig;
use crate::caps::msi::{MsiConfig, MsiControl, MsiState};
use crate::caps::msix::MsixConfig;
use crate::caps::pasid::PasidConfig;
use crate::caps::pcie::PcieConfig;
use crate::caps::pm::{PmConfig, PowerState};
use crate::caps::pri::PriConfig;
use crate::caps::{
    aer, ats, msi as msi_cap, msix as msix_cap, pasid, pcie, pm, pri, vendor, CapChainBuilder,
    CapError, CapOffset, CapRecord, ExtCapRecord,
};
use crate::config::{ConfigError, ConfigSpace, CONFIG_SPACE_SIZE};
use crate::control::{Controllable, Fault};
use crate::function::{ConfigEvent, FunctionCtx, PciFunction, ResetKind};
use crate::header::{header_fields, reg, Bar, BarError, BarKind, Bars, Identity};
use crate::msix::MsixState;
use pcisim_journal::{Event, Journal, DEFAULT_CAPACITY};

/// Errors of building an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A BAR definition is invalid.
    #[error("Invalid BAR")]
    Bar(#[from] BarError),
    /// A capability could not be placed.
    #[error("Invalid capability layout")]
    Cap(#[from] CapError),
    /// The field tables conflict.
    #[error("Invalid configuration space")]
    Config(#[from] ConfigError),
    /// The MSI-X table or PBA does not fit its BAR, overlaps the other, or the vector count is
    /// out of range.
    #[error("Invalid MSI-X layout: {0}")]
    Msix(&'static str),
    /// The MSI vector count is not a power of two in 1..=32, or the function also has MSI-X.
    #[error("Invalid MSI configuration: {0}")]
    Msi(&'static str),
}

/// Offsets of the capabilities the endpoint itself interprets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapOffsets {
    /// Power Management.
    pub pm: Option<CapOffset>,
    /// MSI.
    pub msi: Option<CapOffset>,
    /// MSI-X.
    pub msix: Option<CapOffset>,
    /// PCI Express.
    pub pcie: Option<CapOffset>,
    /// AER.
    pub aer: Option<CapOffset>,
    /// ATS.
    pub ats: Option<CapOffset>,
    /// PASID.
    pub pasid: Option<CapOffset>,
    /// PRI.
    pub pri: Option<CapOffset>,
}

/// One BAR in a [`Description`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BarDescription {
    /// BAR index.
    pub index: u8,
    /// Size in bytes.
    pub size: u64,
    /// 64-bit BAR.
    pub mem64: bool,
    /// Prefetchable.
    pub prefetchable: bool,
}

/// What the endpoint advertises, for comparison with a guest's decoded view. Field names are a
/// contract with the guest programs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Description {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// 24-bit class code.
    pub class_code: u32,
    /// Revision ID.
    pub revision: u8,
    /// Subsystem Vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Implemented BARs in index order.
    pub bars: Vec<BarDescription>,
    /// Standard capabilities in chain order.
    pub capabilities: Vec<CapRecord>,
    /// Extended capabilities in chain order.
    pub ext_capabilities: Vec<ExtCapRecord>,
}

/// Builds an [`Endpoint`]. Standard capabilities are placed in the order PM, MSI, MSI-X, PCIe,
/// vendor-specific; extended ones in the order AER, ATS, PASID, PRI. A function has MSI or
/// MSI-X, not both.
#[derive(Debug, Clone)]
pub struct EndpointBuilder {
    name: String,
    identity: Identity,
    bars: Vec<(u8, Bar)>,
    pm: Option<PmConfig>,
    msi: Option<MsiConfig>,
    msix: Option<MsixConfig>,
    pcie: Option<PcieConfig>,
    vendor: Vec<Vec<u8>>,
    aer: bool,
    ats: Option<AtsConfig>,
    pasid: Option<PasidConfig>,
    pri: Option<PriConfig>,
    immediate_readiness: bool,
    journal_records: usize,
}

impl EndpointBuilder {
    /// A function with these IDs and nothing else; `name` prefixes its log messages.
    pub fn new(name: impl Into<String>, identity: Identity) -> EndpointBuilder {
        EndpointBuilder {
            name: name.into(),
            identity,
            bars: Vec::new(),
            pm: None,
            msi: None,
            msix: None,
            pcie: None,
            vendor: Vec::new(),
            aer: false,
            ats: None,
            pasid: None,
            pri: None,
            immediate_readiness: false,
            journal_records: DEFAULT_CAPACITY,
        }
    }

    /// Define BAR `index`.
    pub fn bar(mut self, index: u8, bar: Bar) -> Self {
        self.bars.push((index, bar));
        self
    }

    /// Add the PM capability.
    pub fn pm(mut self, cfg: PmConfig) -> Self {
        self.pm = Some(cfg);
        self
    }

    /// Add the MSI capability (64-bit address; QEMU emulates it for the guest and binds one
    /// eventfd per allocated vector when the guest enables it). Excludes MSI-X.
    pub fn msi(mut self, cfg: MsiConfig) -> Self {
        self.msi = Some(cfg);
        self
    }

    /// Add the MSI-X capability (the table and PBA are served by the endpoint).
    pub fn msix(mut self, cfg: MsixConfig) -> Self {
        self.msix = Some(cfg);
        self
    }

    /// Add the PCI Express capability.
    pub fn pcie(mut self, cfg: PcieConfig) -> Self {
        self.pcie = Some(cfg);
        self
    }

    /// Add a vendor-specific capability with these bytes.
    pub fn vendor_specific(mut self, data: &[u8]) -> Self {
        self.vendor.push(data.to_vec());
        self
    }

    /// Add the AER extended capability.
    pub fn aer(mut self) -> Self {
        self.aer = true;
        self
    }

    /// Add the ATS extended capability.
    pub fn ats(mut self, cfg: AtsConfig) -> Self {
        self.ats = Some(cfg);
        self
    }

    /// Add the PASID extended capability.
    pub fn pasid(mut self, cfg: PasidConfig) -> Self {
        self.pasid = Some(cfg);
        self
    }

    /// Add the PRI extended capability.
    pub fn pri(mut self, cfg: PriConfig) -> Self {
        self.pri = Some(cfg);
        self
    }

    /// How many records the function's journal ring keeps (at least 16; default
    /// [`DEFAULT_CAPACITY`]). A reader that falls further behind loses records and its window
    /// is incomplete (docs/journal.md), so a scenario that journals more between two reads
    /// needs a bigger ring.
    pub fn journal_records(mut self, records: usize) -> Self {
        self.journal_records = records;
        self
    }

    /// Set Status "Immediate Readiness" (PCIe 4.0): software need not wait after reset.
    pub fn immediate_readiness(mut self, on: bool) -> Self {
        self.immediate_readiness = on;
        self
    }

    fn check_msix(cfg: &MsixConfig, bars: &Bars) -> Result<(), BuildError> {
        if cfg.vectors == 0 || cfg.vectors > msix_cap::MAX_VECTORS {
            return Err(BuildError::Msix("vector count must be 1..=2048"));
        }
        if !cfg.table_offset.is_multiple_of(8) || !cfg.pba_offset.is_multiple_of(8) {
            return Err(BuildError::Msix(
                "table and PBA offsets must be 8-byte aligned",
            ));
        }
        let fits = |bar: u8, off: u32, len: u64| {
            bars.get(u32::from(bar))
                .is_some_and(|b| u64::from(off) + len <= b.size)
        };
        if !fits(cfg.table_bar, cfg.table_offset, cfg.table_len()) {
            return Err(BuildError::Msix("table does not fit its BAR"));
        }
        if !fits(cfg.pba_bar, cfg.pba_offset, cfg.pba_len()) {
            return Err(BuildError::Msix("PBA does not fit its BAR"));
        }
        let (t0, t1) = (
            u64::from(cfg.table_offset),
            u64::from(cfg.table_offset) + cfg.table_len(),
        );
        let (p0, p1) = (
            u64::from(cfg.pba_offset),
            u64::from(cfg.pba_offset) + cfg.pba_len(),
        );
        if cfg.table_bar == cfg.pba_bar && t0 < p1 && p0 < t1 {
            return Err(BuildError::Msix("table and PBA overlap"));
        }
        Ok(())
    }

    /// Build the endpoint around `function`.
    pub fn build<F: PciFunction>(self, function: F) -> Result<Endpoint<F>, BuildError> {
        let mut bars = Bars::new();
        for (i, b) in &self.bars {
            bars.set(*i, *b)?;
        }
        let mut chain = CapChainBuilder::new();
        let mut offsets = CapOffsets::default();
        if let Some(c) = &self.pm {
            offsets.pm = Some(chain.add(pm::capability(c))?);
        }
        if let Some(c) = &self.msi {
            if !c.is_valid() {
                return Err(BuildError::Msi(
                    "vector count must be a power of two, 1..=32",
                ));
            }
            if self.msix.is_some() {
                return Err(BuildError::Msi("a function has MSI or MSI-X, not both"));
            }
            offsets.msi = Some(chain.add(msi_cap::capability(c))?);
        }
        if let Some(c) = &self.msix {
            Self::check_msix(c, &bars)?;
            offsets.msix = Some(chain.add(msix_cap::capability(c))?);
        }
        if let Some(c) = &self.pcie {
            offsets.pcie = Some(chain.add(pcie::capability(c))?);
        }
        for v in &self.vendor {
            chain.add(vendor::capability(v)?)?;
        }
        if self.aer {
            offsets.aer = Some(chain.add_ext(aer::capability())?);
        }
        if let Some(c) = &self.ats {
            offsets.ats = Some(chain.add_ext(ats::capability(c))?);
        }
        if let Some(c) = &self.pasid {
            offsets.pasid = Some(chain.add_ext(pasid::capability(c))?);
        }
        if let Some(c) = &self.pri {
            offsets.pri = Some(chain.add_ext(pri::capability(c))?);
        }
        let mut fields = header_fields(&self.identity, self.immediate_readiness);
        fields.extend(bars.fields());
        fields.extend(chain.fields());
        let config = ConfigSpace::from_fields(&fields)?;
        let journal = Journal::new(&self.name, self.journal_records);
        let bus = Bus::with_msi(
            &self.name,
            journal.clone(),
            self.msix.map(MsixState::new),
            self.msi.map(MsiState::new),
        );
        let mut function = function;
        function.attach_bus(bus.clone());
        Ok(Endpoint {
            name: self.name,
            identity: self.identity,
            config,
            bars,
            offsets,
            no_soft_reset: self.pm.is_some_and(|p| p.no_soft_reset),
            caps: chain.capabilities(),
            ext_caps: chain.ext_capabilities(),
            bus,
            journal,
            faults: Faults::default(),
            presence: Vec::new(),
            drain_limit: DRAIN_LIMIT,
            function,
        })
    }
}

/// Registers the endpoint watches to turn config writes into [`ConfigEvent`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Watched {
    command: u16,
    pmcsr: u16,
    msi_control: u16,
    msi_mask: u32,
    msix_control: u16,
    pasid_control: u16,
    ats_control: u16,
    pri_control: u16,
}

/// A PCIe endpoint: configuration space, MSI-X and reset handling around a [`PciFunction`].
pub struct Endpoint<F: PciFunction> {
    name: String,
    identity: Identity,
    config: ConfigSpace,
    bars: Bars,
    offsets: CapOffsets,
    no_soft_reset: bool,
    caps: Vec<CapRecord>,
    ext_caps: Vec<ExtCapRecord>,
    bus: Bus,
    journal: Journal,
    faults: Faults,
    presence: Vec<PresenceListener>,
    /// How long a gate-closing change waits for accesses in flight ([`DRAIN_LIMIT`]).
    drain_limit: Duration,
    function: F,
}

impl<F: PciFunction> std::fmt::Debug for Endpoint<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("bus", &self.bus)
            .finish_non_exhaustive()
    }
}

/// Told `true` when a client attaches to this function and `false` when it goes away (e.g. an
/// NPU that reports whether its GPU peer is present).
pub type PresenceListener = Box<dyn Fn(bool) + Send>;

/// Injected faults and their state (see [`Fault`]).
#[derive(Debug, Default)]
struct Faults {
    /// Surprise removal: all-ones reads, dropped writes.
    link_down: bool,
    /// Not-ready time after each reset (ms); `u32::MAX`: never ready again.
    slow_reset_ms: u32,
    /// Config space reads all-ones until then (None: ready).
    not_ready_until: Option<Instant>,
    /// The last reset never completes (until the next reset with the fault off).
    never_ready: bool,
    /// Device Status.Transactions Pending stuck at 1.
    stuck_tp: bool,
}

/// Command.Bus Master Enable.
const BUS_MASTER_BIT: u16 = 1 << 2;

/// How long a state change that closes the bus gate waits for accesses already through it.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(10);

fn bit(v: u16, b: u8) -> bool {
    v & (1 << b) != 0
}

impl<F: PciFunction> Endpoint<F> {
    /// The function.
    pub fn function(&self) -> &F {
        &self.function
    }

    /// The function, mutably.
    pub fn function_mut(&mut self) -> &mut F {
        &mut self.function
    }

    /// Configuration space.
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// Configuration space, mutably (device-side updates such as error status bits).
    pub fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    /// A snapshot of the MSI-X state, if the function has MSI-X.
    pub fn msix(&self) -> Option<MsixState> {
        self.bus.msix().clone()
    }

    /// A snapshot of the MSI state, if the function has MSI.
    pub fn msi(&self) -> Option<MsiState> {
        self.bus.msi().clone()
    }

    /// The function's bus interface (shared with its threads).
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The function's journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Call `listener` with `true` whenever a client attaches and `false` when it goes away.
    pub fn on_presence(&mut self, listener: PresenceListener) {
        listener(self.bus.client_attached());
        self.presence.push(listener);
    }

    /// Where the interpreted capabilities are.
    pub fn cap_offsets(&self) -> CapOffsets {
        self.offsets
    }

    /// Sets how long a state change that closes the bus gate waits for accesses already
    /// through it (default [`DRAIN_LIMIT`], 10 s). For tests of the timeout.
    #[doc(hidden)]
    pub fn set_drain_limit(&mut self, limit: Duration) {
        self.drain_limit = limit;
    }

    /// The name used in log messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The BAR table.
    pub fn bars(&self) -> &Bars {
        &self.bars
    }

    /// What the endpoint advertises, from the builder's record of what it placed.
    pub fn describe(&self) -> Description {
        Description {
            vendor_id: self.identity.vendor_id,
            device_id: self.identity.device_id,
            class_code: self.identity.class_code & 0x00ff_ffff,
            revision: self.identity.revision,
            subsystem_vendor_id: self.identity.subsystem_vendor_id,
            subsystem_id: self.identity.subsystem_id,
            bars: self
                .bars
                .iter()
                .map(|(index, b)| BarDescription {
                    index,
                    size: b.size,
                    mem64: b.kind == BarKind::Mem64,
                    prefetchable: b.prefetchable,
                })
                .collect(),
            capabilities: self.caps.clone(),
            ext_capabilities: self.ext_caps.clone(),
        }
    }

    /// Raise an MSI-X vector outside a BAR access (e.g. from a timer in the server loop).
    pub fn raise_msix(&mut self, vector: u16) -> crate::MsixOutcome {
        self.bus.raise_msix(vector)
    }

    fn ctx_parts(&mut self) -> (FunctionCtx<'_>, &mut F) {
        (
            FunctionCtx {
                bus: &self.bus,
                config: &mut self.config,
                pm: self.offsets.pm,
                pcie: self.offsets.pcie,
            },
            &mut self.function,
        )
    }

    /// Device Control "Initiate FLR" was written (PCIe Base 6.0 §6.6.2). Software must wait
    /// for Transactions Pending to clear before it initiates an FLR (the kernel's
    /// `pcie_flr` does, after clearing Bus Master Enable). If it did not, the writes the
    /// function has already issued are still on their way: the function holds them and they
    /// land after `reset_begin` — the journal's checker reports them as `dma_during_reset`.
    /// With Transactions Pending clear nothing is in flight and the function stops at once.
    fn initiate_flr(&mut self) {
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
    fn change_state(&mut self, disabling: bool, event: Event, apply: impl FnOnce(&Bus)) {
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
    fn drain_inflight(&self) {
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

    fn msi_per_vector_mask(&self) -> bool {
        self.bus
            .msi()
            .as_ref()
            .is_some_and(|m| m.config().per_vector_mask)
    }

    fn power_bits(&self) -> u8 {
        self.offsets
            .pm
            .map_or(0, |pm| (self.config.read_u16(pm.reg(pm::PMCSR)) & 3) as u8)
    }

    /// Config space answers all-ones: the link is down or the function is not ready after a
    /// reset (the guest's `pci_dev_wait` polls Command until it is not all-ones).
    fn config_dead(&mut self) -> bool {
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
    fn update_transactions_pending(&mut self) {
        if let Some(pcie) = self.offsets.pcie {
            let bit = 1u32 << pcie::DEVSTA_TRANSACTIONS_PENDING;
            let on = self.faults.stuck_tp || self.bus.inflight() > 0;
            self.config
                .set_bits(pcie.reg(pcie::DEVSTA), bit, if on { bit } else { 0 });
        }
    }

    /// BAR accesses reach the function only in D0 with Memory Space enabled and the link up;
    /// otherwise reads return all-ones and writes are dropped (a master abort on real hardware).
    fn bar_dead(&self) -> Option<&'static str> {
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

    fn config_write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
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

fn cfg_err(e: ConfigError, offset: u64, len: usize) -> DeviceError {
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
