//! Page Request Interface extended capability (PCIe Base 4.0 §10.5.2).
//!
//! ```text
//! +0x00  header (0x0013, v1)
//! +0x04  Status (Response Failure 0 RW1C, UPRGI 1 RW1C, Stopped 8 RO,
//!        PRG Response PASID Required 15 RO) | Control (Enable 0 RW, Reset 1 trigger)
//! +0x08  Outstanding Page Request Capacity   RO
//! +0x0C  Outstanding Page Request Allocation RW
//! ```
//! Stopped reads 1 while the interface is disabled and idle (software checks it before
//! enabling); the endpoint keeps it equal to "not enabled" as no page requests are modelled
//! in flight yet.

use crate::caps::{ext_id, ExtCapability};
use crate::field::{Access, Field};

/// Page Request Control.
pub const CONTROL: u16 = 0x04;
/// Page Request Status.
pub const STATUS: u16 = 0x06;
/// Outstanding Page Request Capacity.
pub const CAPACITY: u16 = 0x08;
/// Outstanding Page Request Allocation.
pub const ALLOCATION: u16 = 0x0c;
/// Control: Enable.
pub const CONTROL_ENABLE: u8 = 0;
/// Control: Reset.
pub const CONTROL_RESET: u8 = 1;
/// Status: Stopped.
pub const STATUS_STOPPED: u8 = 8;
/// Length of the capability.
pub const LEN: u16 = 16;

/// Options of the PRI capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriConfig {
    /// Outstanding Page Request Capacity.
    pub capacity: u32,
    /// PRG Response PASID Required.
    pub response_pasid_required: bool,
}

impl Default for PriConfig {
    fn default() -> PriConfig {
        PriConfig {
            capacity: 32,
            response_pasid_required: true,
        }
    }
}

/// The PRI capability.
pub fn capability(cfg: &PriConfig) -> ExtCapability {
    ExtCapability {
        id: ext_id::PRI,
        version: 1,
        len: LEN,
        fields: vec![
            Field::bit("PRICtl.Enable", CONTROL, CONTROL_ENABLE, Access::Rw),
            Field::bit("PRICtl.Reset", CONTROL, CONTROL_RESET, Access::Trigger),
            Field::bit("PRISta.ResponseFailure", STATUS, 0, Access::W1c),
            Field::bit("PRISta.UnexpectedPRGIndex", STATUS, 1, Access::W1c),
            Field::ro("PRISta.Stopped", STATUS, 8..=8, 1),
            Field::ro(
                "PRISta.PRGResponsePASIDRequired",
                STATUS,
                15..=15,
                u32::from(cfg.response_pasid_required),
            ),
            Field::ro(
                "PRI.OutstandingPageRequestCapacity",
                CAPACITY,
                0..=31,
                cfg.capacity,
            ),
            Field::new(
                "PRI.OutstandingPageRequestAllocation",
                ALLOCATION,
                0..=31,
                Access::Rw,
            ),
        ],
    }
}
