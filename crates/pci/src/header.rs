//! The Type 0 configuration header (PCI Local Bus 3.0 §6.2, PCIe Base 4.0 §7.5.1) and memory
//! BARs with their sizing semantics.
//!
//! ```text
//!  31            16 15             0
//! +----------------+----------------+ 0x00
//! |   Device ID    |   Vendor ID    |
//! +----------------+----------------+ 0x04
//! |     Status     |    Command     |
//! +----------------+--------+-------+ 0x08
//! |      Class Code         |  Rev  |
//! +-----+--------+----------+-------+ 0x0C
//! |BIST |HdrType | LatTimer |CacheLn|
//! +-----+--------+----------+-------+ 0x10 .. 0x24
//! |      Base Address Registers 0-5 |
//! +----------------+----------------+ 0x2C
//! |  Subsystem ID  | Subsys Vendor  |
//! +----------------+-------+--------+ 0x34
//! |    reserved            | CapPtr |
//! +-------+-------+--------+--------+ 0x3C
//! |MaxLat |MinGnt | IntPin |IntLine |
//! +-------+-------+--------+--------+
//! ```

use serde::Serialize;

use crate::field::{Access, Field};

/// Header register offsets.
pub mod reg {
    /// Vendor ID (16 bits).
    pub const VENDOR_ID: u16 = 0x00;
    /// Device ID (16 bits).
    pub const DEVICE_ID: u16 = 0x02;
    /// Command (16 bits).
    pub const COMMAND: u16 = 0x04;
    /// Status (16 bits).
    pub const STATUS: u16 = 0x06;
    /// Revision ID (8 bits) followed by the 24-bit class code.
    pub const CLASS_REVISION: u16 = 0x08;
    /// Cache Line Size (8 bits).
    pub const CACHE_LINE_SIZE: u16 = 0x0c;
    /// Header Type (8 bits).
    pub const HEADER_TYPE: u16 = 0x0e;
    /// BAR0; BAR n is at `BAR0 + 4 * n`.
    pub const BAR0: u16 = 0x10;
    /// Subsystem Vendor ID (16 bits).
    pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
    /// Subsystem ID (16 bits).
    pub const SUBSYSTEM_ID: u16 = 0x2e;
    /// Expansion ROM Base Address (32 bits).
    pub const ROM_ADDRESS: u16 = 0x30;
    /// Capabilities Pointer (8 bits).
    pub const CAPABILITIES_POINTER: u16 = 0x34;
    /// Interrupt Line (8 bits).
    pub const INTERRUPT_LINE: u16 = 0x3c;
    /// Interrupt Pin (8 bits).
    pub const INTERRUPT_PIN: u16 = 0x3d;
}

/// Bit numbers of the Command register (PCIe Base 4.0 §7.5.1.1.3).
pub mod command {
    /// I/O Space Enable.
    pub const IO_SPACE: u8 = 0;
    /// Memory Space Enable.
    pub const MEMORY_SPACE: u8 = 1;
    /// Bus Master Enable.
    pub const BUS_MASTER: u8 = 2;
    /// Parity Error Response.
    pub const PARITY_ERROR_RESPONSE: u8 = 6;
    /// SERR# Enable.
    pub const SERR: u8 = 8;
    /// Interrupt Disable (INTx).
    pub const INTX_DISABLE: u8 = 10;
}

/// Bit numbers of the Status register (PCIe Base 4.0 §7.5.1.1.4).
pub mod status {
    /// Immediate Readiness (PCIe 4.0).
    pub const IMMEDIATE_READINESS: u8 = 0;
    /// Interrupt Status (INTx asserted).
    pub const INTERRUPT_STATUS: u8 = 3;
    /// Capabilities List.
    pub const CAPABILITIES_LIST: u8 = 4;
    /// Master Data Parity Error.
    pub const MASTER_DATA_PARITY_ERROR: u8 = 8;
    /// Signaled Target Abort.
    pub const SIGNALED_TARGET_ABORT: u8 = 11;
    /// Received Target Abort.
    pub const RECEIVED_TARGET_ABORT: u8 = 12;
    /// Received Master Abort.
    pub const RECEIVED_MASTER_ABORT: u8 = 13;
    /// Signaled System Error.
    pub const SIGNALED_SYSTEM_ERROR: u8 = 14;
    /// Detected Parity Error.
    pub const DETECTED_PARITY_ERROR: u8 = 15;
}

/// Identity registers of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Class code: base class, subclass, programming interface (24 bits).
    pub class_code: u32,
    /// Revision ID.
    pub revision: u8,
    /// Subsystem Vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
}

/// Fields of the Type 0 header except the BARs, the Capabilities List status bit and the
/// Capabilities Pointer (those come from the BAR table and the capability chain).
pub fn header_fields(id: &Identity, immediate_readiness: bool) -> Vec<Field> {
    use reg::*;
    vec![
        Field::ro("VendorID", VENDOR_ID, 0..=15, u32::from(id.vendor_id)),
        Field::ro("DeviceID", DEVICE_ID, 0..=15, u32::from(id.device_id)),
        Field::bit("Command.IOSpace", COMMAND, command::IO_SPACE, Access::Rw),
        Field::bit(
            "Command.MemorySpace",
            COMMAND,
            command::MEMORY_SPACE,
            Access::Rw,
        ),
        Field::bit(
            "Command.BusMaster",
            COMMAND,
            command::BUS_MASTER,
            Access::Rw,
        ),
        Field::bit(
            "Command.ParityErrorResponse",
            COMMAND,
            command::PARITY_ERROR_RESPONSE,
            Access::Rw,
        ),
        Field::bit("Command.SERR", COMMAND, command::SERR, Access::Rw),
        Field::bit(
            "Command.INTxDisable",
            COMMAND,
            command::INTX_DISABLE,
            Access::Rw,
        ),
        Field::bit(
            "Status.ImmediateReadiness",
            STATUS,
            status::IMMEDIATE_READINESS,
            Access::Ro,
        )
        .with_value(u32::from(immediate_readiness)),
        Field::bit(
            "Status.InterruptStatus",
            STATUS,
            status::INTERRUPT_STATUS,
            Access::Ro,
        ),
        Field::bit(
            "Status.MasterDataParityError",
            STATUS,
            status::MASTER_DATA_PARITY_ERROR,
            Access::W1c,
        ),
        Field::bit(
            "Status.SignaledTargetAbort",
            STATUS,
            status::SIGNALED_TARGET_ABORT,
            Access::W1c,
        ),
        Field::bit(
            "Status.ReceivedTargetAbort",
            STATUS,
            status::RECEIVED_TARGET_ABORT,
            Access::W1c,
        ),
        Field::bit(
            "Status.ReceivedMasterAbort",
            STATUS,
            status::RECEIVED_MASTER_ABORT,
            Access::W1c,
        ),
        Field::bit(
            "Status.SignaledSystemError",
            STATUS,
            status::SIGNALED_SYSTEM_ERROR,
            Access::W1c,
        ),
        Field::bit(
            "Status.DetectedParityError",
            STATUS,
            status::DETECTED_PARITY_ERROR,
            Access::W1c,
        ),
        Field::ro("RevisionID", CLASS_REVISION, 0..=7, u32::from(id.revision)),
        Field::ro(
            "ClassCode",
            CLASS_REVISION,
            8..=31,
            id.class_code & 0x00ff_ffff,
        ),
        // PCIe: Cache Line Size is RW with no effect on device behaviour.
        Field::new("CacheLineSize", CACHE_LINE_SIZE, 0..=7, Access::Rw),
        // Header Type 0, single function.
        Field::ro("HeaderType", HEADER_TYPE, 0..=7, 0),
        Field::ro(
            "SubsystemVendorID",
            SUBSYSTEM_VENDOR_ID,
            0..=15,
            u32::from(id.subsystem_vendor_id),
        ),
        Field::ro(
            "SubsystemID",
            SUBSYSTEM_ID,
            0..=15,
            u32::from(id.subsystem_id),
        ),
        // No expansion ROM: the register is hardwired to 0.
        Field::ro("ExpansionROM", ROM_ADDRESS, 0..=31, 0),
        Field::new("InterruptLine", INTERRUPT_LINE, 0..=7, Access::Rw),
        // INTA#.
        Field::ro("InterruptPin", INTERRUPT_PIN, 0..=7, 1),
    ]
}

/// Kind of a memory BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum BarKind {
    /// 32-bit memory BAR (one register).
    Mem32,
    /// 64-bit memory BAR (two registers: this one and the next).
    Mem64,
}

/// A memory BAR: its size (a power of two, at least 16 bytes), width and prefetchability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// Size in bytes.
    pub size: u64,
    /// 32- or 64-bit.
    pub kind: BarKind,
    /// Prefetchable flag (bit 3).
    pub prefetchable: bool,
}

impl Bar {
    /// A non-prefetchable 32-bit memory BAR.
    pub const fn mem32(size: u64) -> Bar {
        Bar {
            size,
            kind: BarKind::Mem32,
            prefetchable: false,
        }
    }

    /// A non-prefetchable 64-bit memory BAR.
    pub const fn mem64(size: u64) -> Bar {
        Bar {
            size,
            kind: BarKind::Mem64,
            prefetchable: false,
        }
    }

    /// The same BAR, prefetchable.
    pub const fn prefetchable(mut self) -> Bar {
        self.prefetchable = true;
        self
    }
}

/// Errors of BAR definitions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BarError {
    /// The BAR index is not 0..=5, or a 64-bit BAR starts at 5.
    #[error("BAR index {0} is not usable")]
    BadIndex(u8),
    /// The size is not a power of two of at least 16 bytes (at most 2 GiB for 32-bit BARs).
    #[error("BAR {index} size {size:#x} is not a valid power of two")]
    BadSize {
        /// BAR index.
        index: u8,
        /// Requested size.
        size: u64,
    },
    /// The BAR register is already taken (by another BAR or the upper half of a 64-bit BAR).
    #[error("BAR {0} is already in use")]
    InUse(u8),
}

/// The six BAR slots of a Type 0 header.
#[derive(Debug, Clone, Default)]
pub struct Bars {
    slots: [Option<Bar>; 6],
    upper: [bool; 6],
}

impl Bars {
    /// No BARs.
    pub fn new() -> Bars {
        Bars::default()
    }

    /// Define BAR `index`.
    pub fn set(&mut self, index: u8, bar: Bar) -> Result<(), BarError> {
        let i = index as usize;
        let two = bar.kind == BarKind::Mem64;
        if i >= 6 || (two && i >= 5) {
            return Err(BarError::BadIndex(index));
        }
        let max_log2 = if two { 63 } else { 31 };
        if !bar.size.is_power_of_two() || bar.size < 16 || bar.size.trailing_zeros() > max_log2 {
            return Err(BarError::BadSize {
                index,
                size: bar.size,
            });
        }
        let taken = |j: usize| {
            self.slots.get(j).is_some_and(|s| s.is_some()) || self.upper.get(j) == Some(&true)
        };
        if taken(i) {
            return Err(BarError::InUse(index));
        }
        if two && taken(i + 1) {
            return Err(BarError::InUse(index + 1));
        }
        if let Some(s) = self.slots.get_mut(i) {
            *s = Some(bar);
        }
        if two {
            if let Some(u) = self.upper.get_mut(i + 1) {
                *u = true;
            }
        }
        Ok(())
    }

    /// BAR `index`, if defined (the upper half of a 64-bit BAR is not a BAR).
    pub fn get(&self, index: u32) -> Option<&Bar> {
        self.slots.get(index as usize).and_then(Option::as_ref)
    }

    /// The defined BARs with their indices, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &Bar)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|b| (i as u8, b)))
    }

    /// Fields of all six BAR registers. Unused registers are reserved (read 0, ignore
    /// writes). A memory BAR of size 2^n reads back, after all-ones is written, the address
    /// mask `!(2^n - 1)` with its type bits: bits n..=31 (and the whole upper register of a
    /// 64-bit BAR, from bit n-32 up) are writable.
    pub fn fields(&self) -> Vec<Field> {
        let mut out = Vec::new();
        for (index, bar) in self.iter() {
            let at = reg::BAR0 + 4 * u16::from(index);
            let log2 = bar.size.trailing_zeros() as u8;
            let mem64 = bar.kind == BarKind::Mem64;
            out.push(Field::ro("BAR.MemorySpaceIndicator", at, 0..=0, 0));
            out.push(Field::ro(
                "BAR.Type",
                at,
                1..=2,
                if mem64 { 0b10 } else { 0 },
            ));
            out.push(Field::ro(
                "BAR.Prefetchable",
                at,
                3..=3,
                u32::from(bar.prefetchable),
            ));
            if log2 <= 31 {
                out.push(Field::new("BAR.BaseAddress", at, log2..=31, Access::Rw));
            }
            if mem64 {
                let upper_lsb = log2.saturating_sub(32);
                out.push(Field::new(
                    "BAR.BaseAddressUpper",
                    at + 4,
                    upper_lsb..=31,
                    Access::Rw,
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConfigSpace;

    fn probe(bars: &Bars, index: u16) -> u32 {
        let mut cs = ConfigSpace::from_fields(&bars.fields()).unwrap();
        let at = u64::from(reg::BAR0 + 4 * index);
        cs.write(at, &[0xff; 4]).unwrap();
        cs.read_u32(at as u16)
    }

    #[test]
    fn test_bar_mem32_all_ones_reads_size_mask() {
        let mut bars = Bars::new();
        bars.set(0, Bar::mem32(0x1000)).unwrap();
        assert_eq!(probe(&bars, 0), 0xffff_f000);
    }

    #[test]
    fn test_bar_mem32_prefetch_keeps_type_bits() {
        let mut bars = Bars::new();
        bars.set(1, Bar::mem32(0x10).prefetchable()).unwrap();
        assert_eq!(probe(&bars, 1), 0xffff_fff0 | 0x8);
    }

    #[test]
    fn test_bar_mem64_both_registers_size() {
        let mut bars = Bars::new();
        bars.set(0, Bar::mem64(64 << 10)).unwrap();
        assert_eq!(probe(&bars, 0), 0xffff_0000 | 0b100);
        assert_eq!(probe(&bars, 1), 0xffff_ffff, "upper half fully writable");
        let cs = ConfigSpace::from_fields(&bars.fields()).unwrap();
        assert_eq!(cs.read_u32(0x10), 0b100, "power-on value carries type bits");
    }

    #[test]
    fn test_bar_mem64_prefetch_larger_than_4g_sizes_upper() {
        let mut bars = Bars::new();
        bars.set(2, Bar::mem64(16 << 30).prefetchable()).unwrap();
        assert_eq!(
            probe(&bars, 2),
            0b1100,
            "no low address bits for a 16 GiB BAR"
        );
        assert_eq!(probe(&bars, 3), 0xffff_fffc);
    }

    #[test]
    fn test_bar_unused_reads_zero_ignores_writes() {
        let mut bars = Bars::new();
        bars.set(0, Bar::mem64(0x1000)).unwrap();
        for i in 2..6 {
            assert_eq!(probe(&bars, i), 0);
        }
    }

    #[test]
    fn test_bar_invalid_definitions_rejected() {
        let mut bars = Bars::new();
        assert_eq!(
            bars.set(0, Bar::mem32(0x1800)),
            Err(BarError::BadSize {
                index: 0,
                size: 0x1800
            })
        );
        assert!(bars.set(0, Bar::mem32(8)).is_err());
        assert!(bars.set(0, Bar::mem32(1 << 32)).is_err());
        assert_eq!(bars.set(5, Bar::mem64(0x1000)), Err(BarError::BadIndex(5)));
        assert_eq!(bars.set(6, Bar::mem32(0x1000)), Err(BarError::BadIndex(6)));
        bars.set(2, Bar::mem64(0x1000)).unwrap();
        assert_eq!(bars.set(3, Bar::mem32(0x1000)), Err(BarError::InUse(3)));
        assert_eq!(bars.set(1, Bar::mem64(0x1000)), Err(BarError::InUse(2)));
        assert!(bars.get(3).is_none());
    }
}
