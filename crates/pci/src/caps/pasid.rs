//! Process Address Space ID extended capability (PCIe Base 4.0 §7.8.8).
//!
//! ```text
//! +0x00  header (0x001B, v1)
//! +0x04  PASID Control (Enable 0, Exec 1, Priv 2) | PASID Capability (Exec 1, Priv 2,
//!                                                   Max PASID Width 12:8)
//! ```

use crate::caps::{ext_id, ExtCapability};
use crate::field::{Access, Field};

/// PASID Capability register.
pub const CAPABILITY: u16 = 0x04;
/// PASID Control register.
pub const CONTROL: u16 = 0x06;
/// Control: PASID Enable.
pub const CONTROL_ENABLE: u8 = 0;
/// Control: Execute Permission Enable.
pub const CONTROL_EXEC: u8 = 1;
/// Control: Privileged Mode Enable.
pub const CONTROL_PRIV: u8 = 2;
/// Length of the capability.
pub const LEN: u16 = 8;

/// Options of the PASID capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasidConfig {
    /// Execute Permission Supported.
    pub exec: bool,
    /// Privileged Mode Supported.
    pub privileged: bool,
    /// Max PASID Width (1..=20).
    pub max_width: u8,
}

impl Default for PasidConfig {
    fn default() -> PasidConfig {
        PasidConfig {
            exec: true,
            privileged: true,
            max_width: 20,
        }
    }
}

/// The PASID capability. Exec/Priv enables are writable only when supported.
pub fn capability(cfg: &PasidConfig) -> ExtCapability {
    let en = |supported: bool| if supported { Access::Rw } else { Access::Ro };
    ExtCapability {
        id: ext_id::PASID,
        version: 1,
        len: LEN,
        fields: vec![
            Field::ro(
                "PASIDCap.ExecutePermissionSupported",
                CAPABILITY,
                1..=1,
                u32::from(cfg.exec),
            ),
            Field::ro(
                "PASIDCap.PrivilegedModeSupported",
                CAPABILITY,
                2..=2,
                u32::from(cfg.privileged),
            ),
            Field::ro(
                "PASIDCap.MaxPASIDWidth",
                CAPABILITY,
                8..=12,
                u32::from(cfg.max_width.min(20)),
            ),
            Field::bit("PASIDCtl.Enable", CONTROL, CONTROL_ENABLE, Access::Rw),
            Field::bit(
                "PASIDCtl.ExecutePermissionEnable",
                CONTROL,
                CONTROL_EXEC,
                en(cfg.exec),
            ),
            Field::bit(
                "PASIDCtl.PrivilegedModeEnable",
                CONTROL,
                CONTROL_PRIV,
                en(cfg.privileged),
            ),
        ],
    }
}
