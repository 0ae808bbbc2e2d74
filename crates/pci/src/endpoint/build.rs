//! Building an [`Endpoint`]: the [`EndpointBuilder`] that lays out the capability chain and
//! checks BAR and MSI-X placement, its [`BuildError`], and the [`Description`] of what was built
//! (capability offsets, BARs) that `pcisim ctl` and the lab's E1 comparison read. Construction
//! is apart from the running endpoint because it runs once, before any client connects.

use serde::Serialize;

use super::{Endpoint, Faults, DRAIN_LIMIT};
use crate::bus::Bus;
use crate::caps::ats::AtsConfig;
use crate::caps::msi::{MsiConfig, MsiState};
use crate::caps::msix::MsixConfig;
use crate::caps::pasid::PasidConfig;
use crate::caps::pcie::PcieConfig;
use crate::caps::pm::PmConfig;
use crate::caps::pri::PriConfig;
use crate::caps::{
    aer, ats, msi as msi_cap, msix as msix_cap, pasid, pcie, pm, pri, vendor, CapChainBuilder,
    CapError, CapOffset, CapRecord, ExtCapRecord,
};
use crate::config::{ConfigError, ConfigSpace};
use crate::function::PciFunction;
use crate::header::{header_fields, Bar, BarError, Bars, Identity};
use crate::msix::MsixState;
use pcisim_journal::{Journal, DEFAULT_CAPACITY};

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
