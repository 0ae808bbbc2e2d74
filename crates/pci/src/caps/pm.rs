//! Power Management capability (PCI Bus Power Management Interface 1.2 §3.2).
//!
//! ```text
//!  31                16 15     8 7      0
//! +--------------------+--------+--------+ +0
//! |        PMC         |  next  |  0x01  |
//! +--------+-----------+--------+--------+ +4
//! |  Data  |  BSE      |      PMCSR      |
//! +--------+-----------+-----------------+
//! ```
//!
//! D0 and D3hot only (D3hot support is mandatory; D1/D2 are not advertised). No PME#
//! generation is advertised (PME_Support = 0, PME_En hardwired 0); PME_Status is still
//! implemented as RW1C so the device can report it.

use crate::caps::{id, Capability};
use crate::field::{Access, Field};

/// PMC register offset.
pub const PMC: u16 = 0x02;
/// PMCSR register offset.
pub const PMCSR: u16 = 0x04;
/// PMCSR PowerState bits 1:0.
pub const PMCSR_POWER_STATE_MASK: u16 = 0b11;
/// PMCSR No_Soft_Reset bit.
pub const PMCSR_NO_SOFT_RESET: u8 = 3;
/// PMCSR PME_Status bit.
pub const PMCSR_PME_STATUS: u8 = 15;
/// Length of the capability.
pub const LEN: u16 = 8;

/// Options of the PM capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PmConfig {
    /// No_Soft_Reset: when set, a D3hot→D0 transition keeps the function's state (no
    /// internal reset).
    pub no_soft_reset: bool,
}

/// Device power states as encoded in PMCSR.PowerState.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    /// D0 (full power).
    D0,
    /// D1 (not supported by our functions).
    D1,
    /// D2 (not supported by our functions).
    D2,
    /// D3hot.
    D3Hot,
}

impl PowerState {
    /// Decode PMCSR bits 1:0.
    pub fn from_bits(bits: u16) -> PowerState {
        match bits & PMCSR_POWER_STATE_MASK {
            0 => PowerState::D0,
            1 => PowerState::D1,
            2 => PowerState::D2,
            _ => PowerState::D3Hot,
        }
    }
}

/// The PM capability.
pub fn capability(cfg: &PmConfig) -> Capability {
    Capability {
        id: id::PM,
        len: LEN,
        fields: vec![
            // PMC (RO). Version 011b: PCI PM 1.2.
            Field::ro("PMC.Version", PMC, 0..=2, 3),
            Field::ro("PMC.PMEClock", PMC, 3..=3, 0),
            Field::ro("PMC.DSI", PMC, 5..=5, 0),
            Field::ro("PMC.AuxCurrent", PMC, 6..=8, 0),
            Field::ro("PMC.D1Support", PMC, 9..=9, 0),
            Field::ro("PMC.D2Support", PMC, 10..=10, 0),
            Field::ro("PMC.PMESupport", PMC, 11..=15, 0),
            // PMCSR.
            Field::new("PMCSR.PowerState", PMCSR, 0..=1, Access::Rw),
            Field::ro(
                "PMCSR.NoSoftReset",
                PMCSR,
                3..=3,
                u32::from(cfg.no_soft_reset),
            ),
            Field::ro("PMCSR.PMEEn", PMCSR, 8..=8, 0),
            Field::ro("PMCSR.DataSelect", PMCSR, 9..=12, 0),
            Field::ro("PMCSR.DataScale", PMCSR, 13..=14, 0),
            Field::bit("PMCSR.PMEStatus", PMCSR, PMCSR_PME_STATUS, Access::W1c),
            Field::ro("PMCSR_BSE", 0x06, 0..=7, 0),
            Field::ro("Data", 0x07, 0..=7, 0),
        ],
    }
}
