//! Configuration space as data: 4096 bytes plus per-byte writable, write-1-to-clear and sticky
//! masks, built from a table of named [`Field`]s.
//!
//! A software write of byte `v` over stored byte `d` yields
//! `((d & !wmask) | (v & wmask)) & !(v & w1cmask)` — QEMU's rule. A reset restores the
//! power-on snapshot except the sticky bits, which keep their current value.

use crate::field::{Access, Field};

/// Size of PCI Express configuration space.
pub const CONFIG_SPACE_SIZE: usize = 4096;

/// Errors of building or accessing a configuration space.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// An access of zero bytes.
    #[error("Empty configuration space access at {offset:#x}")]
    EmptyAccess {
        /// Offset of the access.
        offset: u64,
    },
    /// Two fields claim the same bit.
    #[error("Field {field} at {offset:#x} overlaps another field")]
    FieldOverlap {
        /// Name of the field that was added second.
        field: &'static str,
        /// Its offset.
        offset: u16,
    },
    /// A field's bit range is malformed or its value does not fit.
    #[error("Field {field} at {offset:#x} is malformed (bits or value)")]
    MalformedField {
        /// Name of the field.
        field: &'static str,
        /// Its offset.
        offset: u16,
    },
    /// A bit ended up both writable and write-1-to-clear (cannot happen with one access per
    /// field; checked anyway).
    #[error("Writable and write-1-to-clear masks overlap at {offset:#x}")]
    MaskOverlap {
        /// Offset of the byte.
        offset: usize,
    },
    /// The access or field lies (partly) outside configuration space.
    #[error("Configuration space access at {offset:#x}+{len} is out of range")]
    OutOfRange {
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
    },
}

/// Bits of trigger fields that a write set to 1: `(offset, bits)` per byte.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Triggers(Vec<(u16, u8)>);

impl Triggers {
    /// Whether the write set bit `bit` of the register at `offset`.
    pub fn contains(&self, offset: u16, bit: u8) -> bool {
        let byte = offset.wrapping_add(u16::from(bit / 8));
        let mask = 1u8 << (bit % 8);
        self.0.iter().any(|&(o, b)| o == byte && b & mask != 0)
    }

    /// Whether no trigger bit was written.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

type Bytes = Box<[u8; CONFIG_SPACE_SIZE]>;

fn zeroed() -> Bytes {
    Box::new([0u8; CONFIG_SPACE_SIZE])
}

/// A function's 4 KiB configuration space.
#[derive(Clone)]
pub struct ConfigSpace {
    data: Bytes,
    wmask: Bytes,
    w1cmask: Bytes,
    sticky: Bytes,
    trigger: Bytes,
    power_on: Bytes,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("vendor_id", &format_args!("{:#06x}", self.read_u16(0)))
            .field("device_id", &format_args!("{:#06x}", self.read_u16(2)))
            .finish_non_exhaustive()
    }
}

fn check_range(offset: u64, len: usize) -> Result<usize, ConfigError> {
    if len == 0 {
        return Err(ConfigError::EmptyAccess { offset });
    }
    let start = usize::try_from(offset).map_err(|_| ConfigError::OutOfRange { offset, len })?;
    match start.checked_add(len) {
        Some(end) if end <= CONFIG_SPACE_SIZE => Ok(start),
        _ => Err(ConfigError::OutOfRange { offset, len }),
    }
}

impl ConfigSpace {
    /// Build a configuration space from a field table. Bytes no field covers read 0 and ignore
    /// writes (reserved). The result's current contents are its power-on snapshot.
    pub fn from_fields(fields: &[Field]) -> Result<ConfigSpace, ConfigError> {
        let mut cs = ConfigSpace {
            data: zeroed(),
            wmask: zeroed(),
            w1cmask: zeroed(),
            sticky: zeroed(),
            trigger: zeroed(),
            power_on: zeroed(),
        };
        let mut claimed = zeroed();
        for f in fields {
            if !f.is_well_formed() {
                return Err(ConfigError::MalformedField {
                    field: f.name,
                    offset: f.offset,
                });
            }
            if f.end() as usize > CONFIG_SPACE_SIZE {
                return Err(ConfigError::OutOfRange {
                    offset: u64::from(f.offset),
                    len: (f.msb / 8 + 1) as usize,
                });
            }
            let mask = f.mask();
            let value = f.value << f.lsb;
            for k in 0..4usize {
                let m = (mask >> (8 * k)) as u8;
                if m == 0 {
                    continue;
                }
                let at = f.offset as usize + k;
                let (Some(c), Some(d)) = (claimed.get_mut(at), cs.data.get_mut(at)) else {
                    return Err(ConfigError::OutOfRange {
                        offset: u64::from(f.offset),
                        len: k + 1,
                    });
                };
                if *c & m != 0 {
                    return Err(ConfigError::FieldOverlap {
                        field: f.name,
                        offset: f.offset,
                    });
                }
                *c |= m;
                // Trigger fields read 0 whatever their nominal value.
                if f.access != Access::Trigger {
                    *d |= (value >> (8 * k)) as u8 & m;
                }
                let set = |arr: &mut Bytes, on: bool| {
                    if let Some(b) = arr.get_mut(at) {
                        if on {
                            *b |= m;
                        }
                    }
                };
                set(&mut cs.wmask, f.access.is_writable());
                set(&mut cs.w1cmask, f.access.is_w1c());
                set(&mut cs.sticky, f.access.is_sticky());
                set(&mut cs.trigger, f.access == Access::Trigger);
            }
        }
        if let Some(offset) = cs
            .wmask
            .iter()
            .zip(cs.w1cmask.iter())
            .position(|(w, c)| w & c != 0)
        {
            return Err(ConfigError::MaskOverlap { offset });
        }
        cs.power_on = cs.data.clone();
        Ok(cs)
    }

    /// Read `buf.len()` bytes (1..=4096) at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ConfigError> {
        let start = check_range(offset, buf.len())?;
        let src = self
            .data
            .get(start..start + buf.len())
            .ok_or(ConfigError::OutOfRange {
                offset,
                len: buf.len(),
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    /// A software (guest) write of `data` at `offset`, honouring the masks. Returns the trigger
    /// bits the write set.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<Triggers, ConfigError> {
        let start = check_range(offset, data.len())?;
        let mut triggers = Triggers::default();
        for (i, &v) in data.iter().enumerate() {
            let at = start + i;
            let (Some(d), Some(&w), Some(&c), Some(&t)) = (
                self.data.get_mut(at),
                self.wmask.get(at),
                self.w1cmask.get(at),
                self.trigger.get(at),
            ) else {
                return Err(ConfigError::OutOfRange {
                    offset,
                    len: data.len(),
                });
            };
            *d = ((*d & !w) | (v & w)) & !(v & c);
            if v & t != 0 {
                // `at` < 4096 by check_range.
                triggers.0.push((at as u16, v & t));
            }
        }
        Ok(triggers)
    }

    /// Restore the power-on snapshot except sticky bits (FLR, PM soft reset, hot reset).
    pub fn reset(&mut self) {
        for ((d, p), s) in self
            .data
            .iter_mut()
            .zip(self.power_on.iter())
            .zip(self.sticky.iter())
        {
            *d = (*p & !*s) | (*d & *s);
        }
    }

    /// Restore the power-on snapshot including sticky bits (cold reset: power removed).
    pub fn power_on_reset(&mut self) {
        self.data.copy_from_slice(&self.power_on[..]);
    }

    /// The device's own view: the byte at `offset` (0 outside the space).
    pub fn read_u8(&self, offset: u16) -> u8 {
        self.data.get(offset as usize).copied().unwrap_or(0)
    }

    /// The 16-bit register at `offset` (bytes outside the space read 0).
    pub fn read_u16(&self, offset: u16) -> u16 {
        u16::from_le_bytes([self.read_u8(offset), self.read_u8(offset.wrapping_add(1))])
    }

    /// The 32-bit register at `offset` (bytes outside the space read 0).
    pub fn read_u32(&self, offset: u16) -> u32 {
        u32::from_le_bytes([
            self.read_u8(offset),
            self.read_u8(offset.wrapping_add(1)),
            self.read_u8(offset.wrapping_add(2)),
            self.read_u8(offset.wrapping_add(3)),
        ])
    }

    /// A device-side update that bypasses the access masks: the bits of `mask` in the 32-bit
    /// window at `offset` take the values of `value` (e.g. Transactions Pending, PME_Status, an
    /// AER status bit). Bytes outside the space are ignored.
    pub fn set_bits(&mut self, offset: u16, mask: u32, value: u32) {
        for k in 0..4u16 {
            let m = (mask >> (8 * k)) as u8;
            if m == 0 {
                continue;
            }
            if let Some(d) = self.data.get_mut(offset.wrapping_add(k) as usize) {
                *d = (*d & !m) | ((value >> (8 * k)) as u8 & m);
            }
        }
    }

    /// Change power-on values, as a mis-programmed strap or EEPROM would: the bits of `mask` in
    /// the 32-bit window at `offset` take `value` now and after every reset. Used by fault
    /// injection (a device that advertises one thing and presents another).
    pub fn set_power_on_bits(&mut self, offset: u16, mask: u32, value: u32) {
        self.set_bits(offset, mask, value);
        for k in 0..4u16 {
            let m = (mask >> (8 * k)) as u8;
            if let Some(p) = self.power_on.get_mut(offset.wrapping_add(k) as usize) {
                *p = (*p & !m) | ((value >> (8 * k)) as u8 & m);
            }
        }
    }

    /// Writable mask of the 32-bit window at `offset` (for tests and dumps).
    pub fn wmask_u32(&self, offset: u16) -> u32 {
        window(&self.wmask, offset)
    }

    /// Write-1-to-clear mask of the 32-bit window at `offset`.
    pub fn w1cmask_u32(&self, offset: u16) -> u32 {
        window(&self.w1cmask, offset)
    }

    /// Sticky mask of the 32-bit window at `offset`.
    pub fn sticky_u32(&self, offset: u16) -> u32 {
        window(&self.sticky, offset)
    }

    /// The power-on value of the 32-bit window at `offset`.
    pub fn power_on_u32(&self, offset: u16) -> u32 {
        window(&self.power_on, offset)
    }
}

fn window(arr: &Bytes, offset: u16) -> u32 {
    let b = |k: u16| {
        arr.get(offset.wrapping_add(k) as usize)
            .copied()
            .unwrap_or(0)
    };
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        ConfigSpace::from_fields(&[
            Field::ro("Id", 0x00, 0..=15, 0x1234),
            Field::new("Ctl.A", 0x04, 0..=3, Access::Rw).with_value(0x5),
            Field::new("Ctl.Status", 0x04, 8..=11, Access::W1c),
            Field::new("Ctl.Go", 0x04, 15..=15, Access::Trigger),
            Field::new("Sticky.Rw", 0x08, 0..=7, Access::RwSticky),
            Field::new("Sticky.W1c", 0x08, 8..=15, Access::W1cSticky),
            Field::new("Wide", 0xffc, 0..=31, Access::Rw),
        ])
        .unwrap()
    }

    #[test]
    fn test_config_ro_field_write_ignored() {
        let mut cs = space();
        cs.write(0, &[0xff, 0xff]).unwrap();
        assert_eq!(cs.read_u16(0), 0x1234);
    }

    #[test]
    fn test_config_rw_field_write_only_masked_bits() {
        let mut cs = space();
        cs.write(4, &[0xfa]).unwrap();
        assert_eq!(cs.read_u8(4), 0x0a, "bits 7:4 are reserved and read 0");
    }

    #[test]
    fn test_config_w1c_clears_only_ones_written() {
        let mut cs = space();
        cs.set_bits(4, 0xf00, 0xf00);
        cs.write(5, &[0b0101]).unwrap();
        assert_eq!(cs.read_u8(5), 0b1010);
        cs.write(5, &[0]).unwrap();
        assert_eq!(cs.read_u8(5), 0b1010, "writing 0 keeps W1C bits");
    }

    #[test]
    fn test_config_trigger_reads_zero_and_is_reported() {
        let mut cs = space();
        let t = cs.write(4, &[0x00, 0x80]).unwrap();
        assert!(t.contains(4, 15));
        assert!(!t.contains(4, 14));
        assert_eq!(cs.read_u16(4) & 0x8000, 0);
        assert!(cs.write(4, &[0x00, 0x00]).unwrap().is_empty());
    }

    #[test]
    fn test_config_reset_restores_snapshot_keeps_sticky() {
        let mut cs = space();
        cs.write(4, &[0x03]).unwrap();
        cs.write(8, &[0x77]).unwrap();
        cs.set_bits(8, 0xff00, 0x1100);
        cs.reset();
        assert_eq!(cs.read_u8(4), 0x05, "RW field back to its power-on value");
        assert_eq!(cs.read_u16(8), 0x1177, "sticky bits survive");
        cs.power_on_reset();
        assert_eq!(cs.read_u16(8), 0);
    }

    #[test]
    fn test_config_access_out_of_range_errors() {
        let mut cs = space();
        let mut b = [0u8; 4];
        assert!(cs.read(4093, &mut b).is_err());
        assert!(cs.read(u64::MAX, &mut b).is_err());
        assert!(cs.write(4096, &[0]).is_err());
        assert!(matches!(
            cs.read(0, &mut []),
            Err(ConfigError::EmptyAccess { .. })
        ));
        let mut all = vec![0u8; 4096];
        cs.read(0, &mut all).unwrap();
        cs.write(0, &all).unwrap();
        cs.read(4092, &mut b).unwrap();
        assert!(cs.read(0, &mut [0u8; 4097]).is_err());
    }

    #[test]
    fn test_config_any_length_any_offset_never_panics() {
        let mut cs = space();
        for off in [0u64, 1, 3, 255, 256, 4000, 4095] {
            for len in [1usize, 2, 3, 4, 7, 8, 64, 96, 4096] {
                let mut b = vec![0xffu8; len];
                let fits = off as usize + len <= 4096;
                assert_eq!(cs.read(off, &mut b).is_ok(), fits);
                assert_eq!(cs.write(off, &b).is_ok(), fits);
            }
        }
    }

    #[test]
    fn test_config_overlapping_fields_rejected() {
        let e = ConfigSpace::from_fields(&[
            Field::new("A", 0x04, 0..=7, Access::Rw),
            Field::new("B", 0x05, 0..=0, Access::Rw),
            Field::new("C", 0x04, 7..=7, Access::W1c),
        ])
        .unwrap_err();
        assert_eq!(
            e,
            ConfigError::FieldOverlap {
                field: "C",
                offset: 4
            }
        );
    }

    #[test]
    fn test_config_field_past_end_rejected() {
        let e = ConfigSpace::from_fields(&[Field::new("A", 0xffe, 0..=31, Access::Rw)]);
        assert!(matches!(e, Err(ConfigError::OutOfRange { .. })));
    }

    #[test]
    fn test_config_masks_disjoint_for_every_access() {
        let cs = space();
        for off in (0..4096u16).step_by(4) {
            assert_eq!(cs.wmask_u32(off) & cs.w1cmask_u32(off), 0);
        }
        assert_eq!(cs.sticky_u32(8), 0xffff);
    }
}
