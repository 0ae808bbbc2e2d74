//! PCI/PCIe configuration space, capabilities, BARs and MSI-X as data, and the [`Endpoint`]
//! that serves a [`PciFunction`] over vfio-user.
//!
//! Every register is described by named [`Field`]s (offset, bits, [`Access`], power-on
//! value); [`ConfigSpace::from_fields`] derives the writable, write-1-to-clear and sticky masks
//! from them. Capabilities are field tables placed by [`CapChainBuilder`].
//!
//! ```
//! use pcisim_pci::{
//!     caps::{msix::MsixConfig, pcie::PcieConfig, pm::PmConfig},
//!     Bar, EndpointBuilder, FunctionCtx, Identity, PciFunction, ResetKind,
//! };
//!
//! struct Null;
//! impl PciFunction for Null {
//!     fn bar_read(&mut self, _: &mut FunctionCtx<'_>, _: u32, _: u64, data: &mut [u8]) {
//!         data.fill(0);
//!     }
//!     fn bar_write(&mut self, _: &mut FunctionCtx<'_>, _: u32, _: u64, _: &[u8]) {}
//!     fn reset(&mut self, _: ResetKind) {}
//! }
//!
//! let id = Identity {
//!     vendor_id: 0x1234,
//!     device_id: 0x0001,
//!     class_code: 0x120000,
//!     revision: 1,
//!     subsystem_vendor_id: 0x1234,
//!     subsystem_id: 1,
//! };
//! let ep = EndpointBuilder::new("null0", id)
//!     .bar(0, Bar::mem64(0x10000))
//!     .pm(PmConfig::default())
//!     .msix(MsixConfig { vectors: 4, table_bar: 0, table_offset: 0x8000, pba_bar: 0, pba_offset: 0xc000 })
//!     .pcie(PcieConfig::default())
//!     .build(Null)
//!     .unwrap();
//! assert_eq!(ep.describe().capabilities[0].offset, 0x40);
//! ```
#![deny(missing_docs)]

pub mod bus;
pub mod caps;
pub mod config;
pub mod control;
pub mod endpoint;
pub mod field;
pub mod function;
pub mod header;
pub mod msix;

pub use bus::{Bus, DmaFault, Transaction};
pub use caps::msi::{MsiConfig, MsiState};
pub use caps::{
    CapChainBuilder, CapError, CapOffset, CapRecord, Capability, ExtCapRecord, ExtCapability,
};
pub use config::{ConfigError, ConfigSpace, Triggers, CONFIG_SPACE_SIZE};
pub use control::{Controllable, Fault};
pub use endpoint::{
    BarDescription, BuildError, CapOffsets, Description, Endpoint, EndpointBuilder,
};
pub use field::{Access, Field};
pub use function::{ConfigEvent, FunctionCtx, PciFunction, ResetKind};
pub use header::{Bar, BarError, BarKind, Bars, Identity};
pub use msix::{MsixOutcome, MsixState};

#[cfg(test)]
mod tests;

// The checker tracks as many mapped ranges as the server accepts: a drift would make it
// report a degraded oracle for a legal mapping count, or track fewer than the server maps.
const _: () =
    assert!(pcisim_journal::checker::MAX_MAPPED_RANGES == pcisim_vfio_user::dma::MAX_MAPPINGS);
