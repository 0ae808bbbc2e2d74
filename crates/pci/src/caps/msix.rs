//! MSI-X capability (PCI Local Bus 3.0 §6.8.2).
//!
//! ```text
//!  31                16 15     8 7      0
//! +--------------------+--------+--------+ +0
//! |  Message Control   |  next  |  0x11  |
//! +--------------------+--------+---+----+ +4
//! |          Table Offset           |BIR |
//! +---------------------------------+----+ +8
//! |           PBA Offset            |BIR |
//! +---------------------------------+----+
//! ```
//! Message Control: Table Size (N-1) in 10:0 (RO), Function Mask bit 14 (RW), MSI-X Enable
//! bit 15 (RW).

use crate::caps::{id, Capability};
use crate::field::{Access, Field};

/// Message Control offset.
pub const MESSAGE_CONTROL: u16 = 0x02;
/// Table Offset/BIR offset.
pub const TABLE: u16 = 0x04;
/// PBA Offset/BIR offset.
pub const PBA: u16 = 0x08;
/// Message Control: Function Mask bit.
pub const CONTROL_FUNCTION_MASK: u8 = 14;
/// Message Control: MSI-X Enable bit.
pub const CONTROL_ENABLE: u8 = 15;
/// Length of the capability.
pub const LEN: u16 = 12;
/// Most vectors a function may have.
pub const MAX_VECTORS: u16 = 2048;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;

/// Where the MSI-X structures live and how many vectors there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixConfig {
    /// Number of vectors, 1..=2048.
    pub vectors: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR (8-byte aligned).
    pub table_offset: u32,
    /// BAR holding the PBA.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR (8-byte aligned).
    pub pba_offset: u32,
}

impl MsixConfig {
    /// Size of the table in bytes.
    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors) * ENTRY_SIZE
    }

    /// Size of the PBA in bytes (whole qwords).
    pub fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// The MSI-X capability. The caller validates `cfg` (see [`crate::EndpointBuilder`]).
pub fn capability(cfg: &MsixConfig) -> Capability {
    Capability {
        id: id::MSIX,
        len: LEN,
        fields: vec![
            Field::ro(
                "MessageControl.TableSize",
                MESSAGE_CONTROL,
                0..=10,
                u32::from(cfg.vectors.saturating_sub(1)) & 0x7ff,
            ),
            Field::bit(
                "MessageControl.FunctionMask",
                MESSAGE_CONTROL,
                CONTROL_FUNCTION_MASK,
                Access::Rw,
            ),
            Field::bit(
                "MessageControl.Enable",
                MESSAGE_CONTROL,
                CONTROL_ENABLE,
                Access::Rw,
            ),
            Field::ro("Table.BIR", TABLE, 0..=2, u32::from(cfg.table_bar & 7)),
            Field::ro("Table.Offset", TABLE, 3..=31, cfg.table_offset >> 3),
            Field::ro("PBA.BIR", PBA, 0..=2, u32::from(cfg.pba_bar & 7)),
            Field::ro("PBA.Offset", PBA, 3..=31, cfg.pba_offset >> 3),
        ],
    }
}
