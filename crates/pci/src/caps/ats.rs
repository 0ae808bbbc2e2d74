//! Address Translation Services extended capability (PCIe Base 4.0 §10.5.1).
//!
//! ```text
//! +0x00  header (0x000F, v1)
//! +0x04  ATS Control (Enable bit 15, STU 4:0) | ATS Capability (queue depth 4:0, page
//!                                              aligned request 5)
//! ```

use crate::caps::{ext_id, ExtCapability};
use crate::field::{Access, Field};

/// ATS Capability register.
pub const CAPABILITY: u16 = 0x04;
/// ATS Control register.
pub const CONTROL: u16 = 0x06;
/// Control: Enable bit.
pub const CONTROL_ENABLE: u8 = 15;
/// Control: Smallest Translation Unit mask (bits 4:0).
pub const CONTROL_STU_MASK: u16 = 0x1f;
/// Length of the capability.
pub const LEN: u16 = 8;

/// Options of the ATS capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AtsConfig {
    /// Invalidate Queue Depth (0 means 32).
    pub invalidate_queue_depth: u8,
}

/// The ATS capability.
pub fn capability(cfg: &AtsConfig) -> ExtCapability {
    ExtCapability {
        id: ext_id::ATS,
        version: 1,
        len: LEN,
        fields: vec![
            Field::ro(
                "ATSCap.InvalidateQueueDepth",
                CAPABILITY,
                0..=4,
                u32::from(cfg.invalidate_queue_depth & 0x1f),
            ),
            Field::ro("ATSCap.PageAlignedRequest", CAPABILITY, 5..=5, 1),
            Field::ro("ATSCap.GlobalInvalidateSupported", CAPABILITY, 6..=6, 0),
            Field::new("ATSCtl.SmallestTranslationUnit", CONTROL, 0..=4, Access::Rw),
            Field::bit("ATSCtl.Enable", CONTROL, CONTROL_ENABLE, Access::Rw),
        ],
    }
}
