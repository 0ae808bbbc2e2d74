//! Vendor-specific capability (PCI Local Bus 3.0 §6.7, ID 0x09): ID, next, a length byte and
//! arbitrary read-only bytes.

use crate::caps::{id, CapError, Capability};
use crate::field::Field;

/// The vendor-specific capability carrying `data` (read-only) after its 3-byte header.
pub fn capability(data: &[u8]) -> Result<Capability, CapError> {
    let len = u8::try_from(data.len() + 3)
        .ok()
        .filter(|&l| u16::from(l) <= super::STD_CAP_END - super::STD_CAP_START)
        .ok_or(CapError::BadLayout {
            id: u16::from(id::VENDOR),
            reason: "vendor data does not fit in standard capability space",
        })?;
    let mut fields = vec![Field::ro("Vendor.Length", 2, 0..=7, u32::from(len))];
    for (i, &b) in data.iter().enumerate() {
        // i + 3 < len <= 0xc0.
        fields.push(Field::ro("Vendor.Data", 3 + i as u16, 0..=7, u32::from(b)));
    }
    Ok(Capability {
        id: id::VENDOR,
        len: u16::from(len),
        fields,
    })
}
