//! [`Endpoint`]: a PCIe endpoint function served over vfio-user. It owns configuration space,
//! the MSI-X table and PBA and the reset sequence, and hands BAR accesses to a
//! [`PciFunction`].
//!
//! Reset sequence (every kind): configuration space back to its power-on snapshot (sticky bits
//! kept, except on [`ResetKind::LostConnection`](crate::ResetKind::LostConnection), which is a power cycle), MSI-X table masked and
//! PBA cleared, then [`PciFunction::reset`]. Interrupt eventfd bindings are kept: QEMU does not
//! resend SET_IRQS after an FLR or PM reset it did not see.
//!
//! The endpoint is split by concept: `build` ([`EndpointBuilder`], construction and
//! description), `config_dispatch` (config space writes and the events they raise), `regions`
//! (the vfio-user [`Device`](pcisim_vfio_user::Device) implementation: BAR and config regions,
//! interrupts, client lifetime), `reset` (every reset kind) and `faults` (the
//! [`Controllable`](crate::Controllable) side: status, fault injection, AER). This file holds
//! the [`Endpoint`] itself and its accessors.

mod build;
mod config_dispatch;
mod faults;
mod regions;
mod reset;

pub use build::{BarDescription, BuildError, CapOffsets, Description, EndpointBuilder};

use std::time::{Duration, Instant};

use crate::bus::Bus;
use crate::caps::msi::MsiState;
use crate::caps::{CapRecord, ExtCapRecord};
use crate::config::ConfigSpace;
use crate::function::{FunctionCtx, PciFunction};
use crate::header::{BarKind, Bars, Identity};
use crate::msix::MsixState;
use pcisim_journal::Journal;

/// Registers the endpoint watches to turn config writes into [`ConfigEvent`](crate::ConfigEvent)s.
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

/// Injected faults and their state (see [`Fault`](crate::Fault)).
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
}
