//! What a device model implements: [`PciFunction`], and what it gets to use while handling an
//! access: [`FunctionCtx`].

use pcisim_vfio_user::RegionMmap;

use crate::bus::Bus;

use crate::caps::pcie::{DEVSTA, DEVSTA_TRANSACTIONS_PENDING};
use crate::caps::pm::{PowerState, PMCSR};
use crate::caps::CapOffset;
use crate::config::ConfigSpace;
use crate::header::{command, reg};
use crate::msix::MsixOutcome;

/// Why a function is being reset: the journal's type (the [`PciFunction::reset`] argument is
/// exactly what the journal's `reset_begin` records).
pub use pcisim_journal::ResetKind;

/// A configuration change a function may react to. Delivered after the write took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigEvent {
    /// The Command register changed (Memory Space, Bus Master, INTx Disable, ...).
    CommandChanged {
        /// Previous value.
        old: u16,
        /// New value.
        new: u16,
    },
    /// PMCSR.PowerState changed.
    PowerState {
        /// Previous state.
        from: PowerState,
        /// New state.
        to: PowerState,
    },
    /// MSI-X Message Control changed.
    MsixControl {
        /// MSI-X Enable.
        enable: bool,
        /// Function Mask.
        function_mask: bool,
    },
    /// The guest initiated an FLR; [`PciFunction::reset`] with [`ResetKind::Flr`] follows.
    Flr,
    /// PASID Control changed.
    PasidControl {
        /// PASID Enable.
        enable: bool,
        /// Execute Permission Enable.
        exec: bool,
        /// Privileged Mode Enable.
        privileged: bool,
    },
    /// ATS Control changed.
    AtsControl {
        /// ATS Enable.
        enable: bool,
        /// Smallest Translation Unit (pages of 2^(12+stu) bytes).
        stu: u8,
    },
    /// PRI Control Enable changed.
    PriControl {
        /// PRI Enable.
        enable: bool,
    },
    /// PRI Control Reset was written with 1 (clear outstanding page request state).
    PriReset,
}

/// A device model behind an [`crate::Endpoint`]: BAR registers and reset behaviour. The
/// endpoint owns configuration space, MSI-X, bounds checks and reset sequencing; accesses
/// reaching the function are inside a BAR it defined, outside the MSI-X table and PBA.
pub trait PciFunction: Send {
    /// Read `data.len()` bytes at `offset` of BAR `bar`.
    fn bar_read(&mut self, ctx: &mut FunctionCtx<'_>, bar: u32, offset: u64, data: &mut [u8]);
    /// Write `data` at `offset` of BAR `bar`.
    fn bar_write(&mut self, ctx: &mut FunctionCtx<'_>, bar: u32, offset: u64, data: &[u8]);
    /// Reset device state. Configuration space and MSI-X are already reset.
    fn reset(&mut self, kind: ResetKind);
    /// React to a configuration change.
    fn on_config_event(&mut self, ev: ConfigEvent) {
        let _ = ev;
    }
    /// An FLR was initiated while the function had Transactions Pending (software must wait
    /// for it to clear first: PCIe Base 6.0 §6.6.2). Return `true` if writes the function has
    /// already issued are still on their way: the function holds them until
    /// [`PciFunction::reset`] with [`ResetKind::Flr`], where they land — after the endpoint
    /// journaled `reset_begin`, which it does without waiting for them. Instead of
    /// [`ConfigEvent::Flr`]. The default: nothing in flight.
    fn flr_with_transactions_pending(&mut self) -> bool {
        false
    }
    /// How BAR `bar` can be mmapped by the client, if at all.
    fn bar_mmap(&self, bar: u32) -> Option<RegionMmap> {
        let _ = bar;
        None
    }
    /// The function's bus interface, given once when the endpoint is built. Functions with
    /// engine threads keep a clone for DMA, interrupts and the journal.
    fn attach_bus(&mut self, bus: Bus) {
        let _ = bus;
    }
}

/// What a function can do while handling an access: raise MSI-X vectors, look at its command
/// and power state, report Transactions Pending, and (later) DMA.
#[derive(Debug)]
pub struct FunctionCtx<'a> {
    pub(crate) bus: &'a Bus,
    pub(crate) config: &'a mut ConfigSpace,
    pub(crate) pm: Option<CapOffset>,
    pub(crate) pcie: Option<CapOffset>,
}

impl FunctionCtx<'_> {
    /// Raise MSI-X vector `vector` through the bus (gated and journaled; delivery rule in
    /// [`crate::msix`]).
    pub fn raise_msix(&mut self, vector: u16) -> MsixOutcome {
        self.bus.raise_msix(vector)
    }

    /// The function's bus interface (DMA, interrupts, journal).
    pub fn bus(&self) -> &Bus {
        self.bus
    }

    /// The Command register.
    pub fn command(&self) -> u16 {
        self.config.read_u16(reg::COMMAND)
    }

    /// Command.MemorySpace.
    pub fn memory_enabled(&self) -> bool {
        self.command() & (1 << command::MEMORY_SPACE) != 0
    }

    /// Command.BusMaster.
    pub fn bus_master_enabled(&self) -> bool {
        self.command() & (1 << command::BUS_MASTER) != 0
    }

    /// The current power state (D0 without a PM capability).
    pub fn power_state(&self) -> PowerState {
        self.pm.map_or(PowerState::D0, |pm| {
            PowerState::from_bits(self.config.read_u16(pm.reg(PMCSR)))
        })
    }

    /// Set or clear Device Status "Transactions Pending".
    pub fn set_transactions_pending(&mut self, pending: bool) {
        if let Some(pcie) = self.pcie {
            let bit = 1u32 << DEVSTA_TRANSACTIONS_PENDING;
            self.config
                .set_bits(pcie.reg(DEVSTA), bit, if pending { bit } else { 0 });
        }
    }
}
