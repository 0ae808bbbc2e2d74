//! Named register fields: the single source of every mask in configuration space.
//!
//! A [`Field`] names a run of bits inside one register, its power-on value and its access
//! attribute as the specifications define them (PCI Express Base 4.0 §7.4, "Configuration
//! Register Types"). [`crate::ConfigSpace::from_fields`] turns a table of fields into the data,
//! writable, write-1-to-clear and sticky masks; nothing else writes masks.

use std::ops::RangeInclusive;

/// Access attribute of a field (PCIe Base 4.0 Table 7-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read-only: RO, HwInit, or a reserved field with a fixed value.
    Ro,
    /// Read-write (RW).
    Rw,
    /// Write-1-to-clear status (RW1C).
    W1c,
    /// Read-write, sticky (RWS): survives FLR, PM soft reset and hot reset.
    RwSticky,
    /// Write-1-to-clear, sticky (RW1CS).
    W1cSticky,
    /// Read-only, sticky (ROS): set by the device, survives resets.
    RoSticky,
    /// Writing 1 starts an action; reads return 0 and nothing is stored (e.g. Device Control
    /// "Initiate Function Level Reset"). Writes that set such bits are reported by
    /// [`crate::ConfigSpace::write`].
    Trigger,
}

impl Access {
    /// Whether software writes change the stored value (RW, RWS).
    pub const fn is_writable(self) -> bool {
        matches!(self, Access::Rw | Access::RwSticky)
    }

    /// Whether writing 1 clears the bit (RW1C, RW1CS).
    pub const fn is_w1c(self) -> bool {
        matches!(self, Access::W1c | Access::W1cSticky)
    }

    /// Whether the bit keeps its value across FLR and soft resets.
    pub const fn is_sticky(self) -> bool {
        matches!(
            self,
            Access::RwSticky | Access::W1cSticky | Access::RoSticky
        )
    }
}

/// A run of bits `lsb..=msb` of the little-endian register that starts at byte `offset`.
///
/// Bits are numbered inside a 32-bit window starting at `offset`, so a 16-bit register at
/// 0x06 uses bits 0..=15 and a field of the upper byte of a register may equally be written
/// as bits 8..=15 at the register offset. `value` is the power-on value of the field, in field
/// units (not shifted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Name as the specification spells it, prefixed by the register ("Command.BusMaster").
    pub name: &'static str,
    /// Byte offset of the register: relative to the capability inside capability layouts,
    /// absolute in configuration space once placed.
    pub offset: u16,
    /// Lowest bit of the field.
    pub lsb: u8,
    /// Highest bit of the field (at most 31).
    pub msb: u8,
    /// Access attribute.
    pub access: Access,
    /// Power-on value of the field.
    pub value: u32,
}

impl Field {
    /// A field covering `bits` of the register at `offset`, power-on value 0.
    pub const fn new(
        name: &'static str,
        offset: u16,
        bits: RangeInclusive<u8>,
        access: Access,
    ) -> Field {
        Field {
            name,
            offset,
            lsb: *bits.start(),
            msb: *bits.end(),
            access,
            value: 0,
        }
    }

    /// A one-bit field.
    pub const fn bit(name: &'static str, offset: u16, bit: u8, access: Access) -> Field {
        Field::new(name, offset, bit..=bit, access)
    }

    /// A read-only field with a fixed value.
    pub const fn ro(
        name: &'static str,
        offset: u16,
        bits: RangeInclusive<u8>,
        value: u32,
    ) -> Field {
        Field::new(name, offset, bits, Access::Ro).with_value(value)
    }

    /// The same field with power-on value `value`.
    pub const fn with_value(mut self, value: u32) -> Field {
        self.value = value;
        self
    }

    /// The same field moved by `base` bytes (used when a capability is placed).
    pub const fn moved(mut self, base: u16) -> Field {
        self.offset = self.offset.wrapping_add(base);
        self
    }

    /// Mask of the field's bits within the 32-bit window at `offset` (0 for a malformed
    /// field whose bit range is empty or past bit 31).
    pub const fn mask(&self) -> u32 {
        if self.lsb > self.msb || self.msb > 31 {
            return 0;
        }
        let width = (self.msb - self.lsb + 1) as u32;
        let ones = if width == 32 {
            u32::MAX
        } else {
            (1u32 << width) - 1
        };
        ones << self.lsb
    }

    /// Whether the bit range is well formed and `value` fits in it.
    pub const fn is_well_formed(&self) -> bool {
        if self.lsb > self.msb || self.msb > 31 {
            return false;
        }
        let width = (self.msb - self.lsb + 1) as u32;
        width == 32 || self.value >> width == 0
    }

    /// Offset one past the last byte the field touches.
    pub const fn end(&self) -> u32 {
        self.offset as u32 + (self.msb as u32 / 8) + 1
    }

    /// Offset of the first byte the field touches.
    pub const fn start(&self) -> u32 {
        self.offset as u32 + (self.lsb as u32 / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_field_mask_bit_range_matches_bits() {
        assert_eq!(Field::new("x", 0, 0..=31, Access::Rw).mask(), u32::MAX);
        assert_eq!(Field::new("x", 0, 4..=7, Access::Rw).mask(), 0xf0);
        assert_eq!(Field::bit("x", 0, 15, Access::Rw).mask(), 0x8000);
        assert_eq!(Field::new("x", 0, 8..=31, Access::Rw).start(), 1);
        assert_eq!(Field::new("x", 0, 8..=15, Access::Rw).end(), 2);
    }

    #[test]
    fn test_field_value_wider_than_bits_is_malformed() {
        assert!(!Field::ro("x", 0, 0..=2, 8).is_well_formed());
        assert!(Field::ro("x", 0, 0..=2, 7).is_well_formed());
        let reversed = Field {
            lsb: 5,
            msb: 4,
            ..Field::new("x", 0, 0..=0, Access::Rw)
        };
        assert!(!reversed.is_well_formed());
        assert!(!Field::new("x", 0, 0..=32, Access::Rw).is_well_formed());
    }
}
