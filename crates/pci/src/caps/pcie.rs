//! PCI Express capability, version 2, for an endpoint (PCIe Base 4.0 §7.5.3).
//!
//! ```text
//! +0x00  PCIe Capabilities | next | 0x10
//! +0x04  Device Capabilities
//! +0x08  Device Status     | Device Control
//! +0x0C  Link Capabilities
//! +0x10  Link Status       | Link Control
//! +0x14  Slot Capabilities                    (no slot: 0)
//! +0x18  Slot Status       | Slot Control     (0)
//! +0x1C  Root Capabilities | Root Control     (root ports only: 0)
//! +0x20  Root Status                          (0)
//! +0x24  Device Capabilities 2
//! +0x28  Device Status 2   | Device Control 2
//! +0x2C  Link Capabilities 2
//! +0x30  Link Status 2     | Link Control 2
//! +0x34  Slot Capabilities 2                  (0)
//! +0x38  Slot Status 2     | Slot Control 2   (0)
//! ```
//!
//! The link is x1 at 2.5 GT/s. An endpoint's port is an Upstream Port, so Link Capabilities'
//! Data Link Layer Link Active Reporting Capable and Link Status' Data Link Layer Link Active
//! are both hardwired to 0 (PCIe Base 6.0 §7.5.3.6 bit 20: "For Upstream Ports and components
//! that do not support this optional capability, this bit must be hardwired to 0b";
//! §7.5.3.8 bit 13: implemented only when the capability bit is 1b, otherwise "hardwired to
//! 0b"). Software learns the link state from the Downstream Port above (the root port), which
//! is where Linux looks (`pcie_wait_for_link`). A modelled link-down shows as all-ones config
//! reads instead.

use crate::caps::{id, Capability};
use crate::field::{Access, Field};

/// PCI Express Capabilities register.
pub const PCIE_CAPS: u16 = 0x02;
/// Device Capabilities.
pub const DEVCAP: u16 = 0x04;
/// Device Control.
pub const DEVCTL: u16 = 0x08;
/// Device Status.
pub const DEVSTA: u16 = 0x0a;
/// Link Capabilities.
pub const LNKCAP: u16 = 0x0c;
/// Link Control.
pub const LNKCTL: u16 = 0x10;
/// Link Status.
pub const LNKSTA: u16 = 0x12;
/// Device Capabilities 2.
pub const DEVCAP2: u16 = 0x24;
/// Device Control 2.
pub const DEVCTL2: u16 = 0x28;
/// Link Capabilities 2.
pub const LNKCAP2: u16 = 0x2c;
/// Link Control 2.
pub const LNKCTL2: u16 = 0x30;
/// Length of a version 2 endpoint capability.
pub const LEN: u16 = 0x3c;

/// Device Control: Initiate Function Level Reset.
pub const DEVCTL_INITIATE_FLR: u8 = 15;
/// Device Status: Transactions Pending.
pub const DEVSTA_TRANSACTIONS_PENDING: u8 = 5;
/// Link Status: Data Link Layer Link Active.
pub const LNKSTA_DLL_LINK_ACTIVE: u8 = 13;

/// Options of the PCIe capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcieConfig {
    /// Device Capabilities "Function Level Reset Capability".
    pub flr: bool,
}

impl Default for PcieConfig {
    fn default() -> PcieConfig {
        PcieConfig { flr: true }
    }
}

/// The PCIe capability.
pub fn capability(cfg: &PcieConfig) -> Capability {
    use Access::*;
    let mut fields = vec![
        // PCI Express Capabilities: version 2, Device/Port Type 0000b (PCI Express Endpoint),
        // no slot, interrupt message number 0.
        Field::ro("PCIeCaps.Version", PCIE_CAPS, 0..=3, 2),
        Field::ro("PCIeCaps.DevicePortType", PCIE_CAPS, 4..=7, 0),
        Field::ro("PCIeCaps.SlotImplemented", PCIE_CAPS, 8..=8, 0),
        Field::ro("PCIeCaps.InterruptMessageNumber", PCIE_CAPS, 9..=13, 0),
        // Device Capabilities.
        Field::ro("DevCap.MaxPayloadSizeSupported", DEVCAP, 0..=2, 0b001), // 256 bytes
        Field::ro("DevCap.PhantomFunctions", DEVCAP, 3..=4, 0),
        Field::ro("DevCap.ExtendedTagField", DEVCAP, 5..=5, 1),
        Field::ro("DevCap.L0sAcceptableLatency", DEVCAP, 6..=8, 0),
        Field::ro("DevCap.L1AcceptableLatency", DEVCAP, 9..=11, 0),
        Field::ro("DevCap.RoleBasedErrorReporting", DEVCAP, 15..=15, 1),
        Field::ro("DevCap.SlotPowerLimitValue", DEVCAP, 18..=25, 0),
        Field::ro("DevCap.SlotPowerLimitScale", DEVCAP, 26..=27, 0),
        Field::ro("DevCap.FLRCapability", DEVCAP, 28..=28, u32::from(cfg.flr)),
        // Device Control.
        Field::bit("DevCtl.CorrectableErrorReportingEnable", DEVCTL, 0, Rw),
        Field::bit("DevCtl.NonFatalErrorReportingEnable", DEVCTL, 1, Rw),
        Field::bit("DevCtl.FatalErrorReportingEnable", DEVCTL, 2, Rw),
        Field::bit("DevCtl.UnsupportedRequestReportingEnable", DEVCTL, 3, Rw),
        Field::bit("DevCtl.EnableRelaxedOrdering", DEVCTL, 4, Rw).with_value(1),
        Field::new("DevCtl.MaxPayloadSize", DEVCTL, 5..=7, Rw), // 128 bytes
        Field::bit("DevCtl.ExtendedTagFieldEnable", DEVCTL, 8, Rw).with_value(1),
        Field::ro("DevCtl.PhantomFunctionsEnable", DEVCTL, 9..=9, 0),
        Field::ro("DevCtl.AuxPowerPMEnable", DEVCTL, 10..=10, 0),
        Field::bit("DevCtl.EnableNoSnoop", DEVCTL, 11, Rw).with_value(1),
        Field::new("DevCtl.MaxReadRequestSize", DEVCTL, 12..=14, Rw).with_value(0b010), // 512 B
        // Device Status.
        Field::bit("DevSta.CorrectableErrorDetected", DEVSTA, 0, W1c),
        Field::bit("DevSta.NonFatalErrorDetected", DEVSTA, 1, W1c),
        Field::bit("DevSta.FatalErrorDetected", DEVSTA, 2, W1c),
        Field::bit("DevSta.UnsupportedRequestDetected", DEVSTA, 3, W1c),
        Field::ro("DevSta.AuxPowerDetected", DEVSTA, 4..=4, 0),
        Field::bit(
            "DevSta.TransactionsPending",
            DEVSTA,
            DEVSTA_TRANSACTIONS_PENDING,
            Ro,
        ),
        // Link Capabilities: Max Link Speed = Supported Link Speeds Vector bit 0 (2.5 GT/s),
        // x1, no ASPM, ASPM Optionality Compliance. DLL Link Active Reporting Capable is 0: an
        // Upstream Port must hardwire it to 0b (§7.5.3.6).
        Field::ro("LnkCap.MaxLinkSpeed", LNKCAP, 0..=3, 1),
        Field::ro("LnkCap.MaxLinkWidth", LNKCAP, 4..=9, 1),
        Field::ro("LnkCap.ASPMSupport", LNKCAP, 10..=11, 0),
        Field::ro("LnkCap.L0sExitLatency", LNKCAP, 12..=14, 0),
        Field::ro("LnkCap.L1ExitLatency", LNKCAP, 15..=17, 0),
        Field::ro("LnkCap.ClockPowerManagement", LNKCAP, 18..=18, 0),
        Field::ro("LnkCap.SurpriseDownErrorReporting", LNKCAP, 19..=19, 0),
        Field::ro("LnkCap.DLLLinkActiveReporting", LNKCAP, 20..=20, 0),
        Field::ro("LnkCap.LinkBandwidthNotification", LNKCAP, 21..=21, 0),
        Field::ro("LnkCap.ASPMOptionalityCompliance", LNKCAP, 22..=22, 1),
        Field::ro("LnkCap.PortNumber", LNKCAP, 24..=31, 0),
        // Link Control.
        Field::new("LnkCtl.ASPMControl", LNKCTL, 0..=1, Rw),
        Field::bit("LnkCtl.ReadCompletionBoundary", LNKCTL, 3, Rw),
        Field::bit("LnkCtl.CommonClockConfiguration", LNKCTL, 6, Rw),
        Field::bit("LnkCtl.ExtendedSynch", LNKCTL, 7, Rw),
        // Link Status.
        Field::ro("LnkSta.CurrentLinkSpeed", LNKSTA, 0..=3, 1),
        Field::ro("LnkSta.NegotiatedLinkWidth", LNKSTA, 4..=9, 1),
        Field::ro("LnkSta.LinkTraining", LNKSTA, 11..=11, 0),
        Field::ro("LnkSta.SlotClockConfiguration", LNKSTA, 12..=12, 0),
        // Data Link Layer Link Active: hardwired 0b since the reporting capability is 0b
        // (§7.5.3.8).
        Field::ro(
            "LnkSta.DataLinkLayerLinkActive",
            LNKSTA,
            LNKSTA_DLL_LINK_ACTIVE..=LNKSTA_DLL_LINK_ACTIVE,
            0,
        ),
        // Device Capabilities 2: completion timeout ranges A (50us-10ms) and B (10ms-250ms),
        // completion timeout disable supported.
        Field::ro(
            "DevCap2.CompletionTimeoutRangesSupported",
            DEVCAP2,
            0..=3,
            0b0011,
        ),
        Field::ro(
            "DevCap2.CompletionTimeoutDisableSupported",
            DEVCAP2,
            4..=4,
            1,
        ),
        // Device Control 2.
        Field::new("DevCtl2.CompletionTimeoutValue", DEVCTL2, 0..=3, Rw),
        Field::bit("DevCtl2.CompletionTimeoutDisable", DEVCTL2, 4, Rw),
        // Link Capabilities 2: Supported Link Speeds Vector = 2.5 GT/s.
        Field::ro(
            "LnkCap2.SupportedLinkSpeedsVector",
            LNKCAP2,
            1..=7,
            0b000_0001,
        ),
        // Link Control 2: Target Link Speed (RWS), default = Max Link Speed.
        Field::new("LnkCtl2.TargetLinkSpeed", LNKCTL2, 0..=3, RwSticky).with_value(1),
    ];
    if cfg.flr {
        fields.push(Field::bit(
            "DevCtl.InitiateFLR",
            DEVCTL,
            DEVCTL_INITIATE_FLR,
            Trigger,
        ));
    }
    Capability {
        id: id::PCIE,
        len: LEN,
        fields,
    }
}
