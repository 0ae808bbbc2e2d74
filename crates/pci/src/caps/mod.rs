//! Capabilities as data and the builder that chains them.
//!
//! A capability is its ID plus a table of [`Field`]s with offsets relative to the capability's
//! start. The [`CapChainBuilder`] places standard capabilities from 0x40 (dword aligned,
//! linked through their `next` byte, head in the Capabilities Pointer at 0x34, Status
//! "Capabilities List" set) and extended capabilities from 0x100 (header dword: ID in bits
//! 15:0, version in 19:16, next offset in 31:20), checks overlaps and bounds, and records what
//! it placed in chain order.
//!
//! ```text
//! standard:  0x34 --> [id|next|...] --> [id|next|...] --> 0        (0x40 ..= 0xff)
//! extended:  0x100: [id:16|ver:4|next:12] --> [...] --> next = 0   (0x100 ..= 0xfff)
//! ```

pub mod aer;
pub mod ats;
pub mod msi;
pub mod msix;
pub mod pasid;
pub mod pcie;
pub mod pm;
pub mod pri;
pub mod vendor;

use serde::Serialize;

use crate::field::Field;
use crate::header::{reg, status};

/// Start of the standard capability area.
pub const STD_CAP_START: u16 = 0x40;
/// End (exclusive) of the standard capability area.
pub const STD_CAP_END: u16 = 0x100;
/// Start of the extended capability area; the first extended capability lives here.
pub const EXT_CAP_START: u16 = 0x100;
/// End (exclusive) of the extended capability area.
pub const EXT_CAP_END: u16 = 0x1000;

/// Standard capability IDs (PCI Code and ID Assignment §2).
pub mod id {
    /// Power Management.
    pub const PM: u8 = 0x01;
    /// MSI.
    pub const MSI: u8 = 0x05;
    /// Vendor-specific.
    pub const VENDOR: u8 = 0x09;
    /// PCI Express.
    pub const PCIE: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// Extended capability IDs (PCI Code and ID Assignment §3).
pub mod ext_id {
    /// Advanced Error Reporting.
    pub const AER: u16 = 0x0001;
    /// Address Translation Services.
    pub const ATS: u16 = 0x000f;
    /// Page Request Interface.
    pub const PRI: u16 = 0x0013;
    /// Process Address Space ID.
    pub const PASID: u16 = 0x001b;
}

/// A standard capability: ID, length in bytes (including the two header bytes) and fields
/// relative to its start (not covering the ID and next bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// Capability ID.
    pub id: u8,
    /// Length in bytes, header included.
    pub len: u16,
    /// Fields, offsets relative to the capability.
    pub fields: Vec<Field>,
}

/// An extended capability: ID, version, length (header included) and fields relative to its
/// start (not covering the header dword).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtCapability {
    /// Extended capability ID.
    pub id: u16,
    /// Capability version (4 bits).
    pub version: u8,
    /// Length in bytes, header included.
    pub len: u16,
    /// Fields, offsets relative to the capability.
    pub fields: Vec<Field>,
}

/// Where a capability was placed (byte offset in configuration space).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CapOffset(pub u16);

impl CapOffset {
    /// The offset of register `rel` of the capability.
    pub const fn reg(self, rel: u16) -> u16 {
        self.0.wrapping_add(rel)
    }
}

/// A placed standard capability, as recorded by the builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CapRecord {
    /// Capability ID.
    pub id: u8,
    /// Offset in configuration space.
    pub offset: u16,
    /// Length in bytes.
    #[serde(skip)]
    pub len: u16,
}

/// A placed extended capability, as recorded by the builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExtCapRecord {
    /// Extended capability ID.
    pub id: u16,
    /// Offset in configuration space.
    pub offset: u16,
    /// Capability version.
    pub version: u8,
    /// Length in bytes.
    #[serde(skip)]
    pub len: u16,
}

/// Errors of capability placement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapError {
    /// The capability would extend past its area (0x100 for standard, 0x1000 for extended)
    /// or start before it.
    #[error("Capability {id:#x} at {offset:#x}+{len:#x} is outside its area")]
    OutOfBounds {
        /// Capability ID.
        id: u16,
        /// Offset.
        offset: u16,
        /// Length.
        len: u16,
    },
    /// The offset is not dword aligned.
    #[error("Capability {id:#x} offset {offset:#x} is not dword aligned")]
    Misaligned {
        /// Capability ID.
        id: u16,
        /// Offset.
        offset: u16,
    },
    /// The capability overlaps one already placed.
    #[error(
        "Capability {id:#x} at {offset:#x} overlaps capability {other:#x} at {other_offset:#x}"
    )]
    Overlap {
        /// Capability ID.
        id: u16,
        /// Offset.
        offset: u16,
        /// The capability it overlaps.
        other: u16,
        /// Where that one is.
        other_offset: u16,
    },
    /// The length is too small for the header, or a field lies outside the capability or on
    /// its header.
    #[error("Capability {id:#x} layout is invalid: {reason}")]
    BadLayout {
        /// Capability ID.
        id: u16,
        /// What is wrong.
        reason: &'static str,
    },
    /// The first extended capability must be at 0x100.
    #[error("The first extended capability must be at 0x100, not {0:#x}")]
    ExtChainHead(u16),
}

#[derive(Debug, Clone)]
struct Placed {
    id: u16,
    version: u8,
    offset: u16,
    len: u16,
    fields: Vec<Field>,
}

impl Placed {
    fn end(&self) -> u32 {
        u32::from(self.offset) + u32::from(self.len)
    }
}

/// Places capabilities and produces the fields of the chain.
#[derive(Debug, Clone, Default)]
pub struct CapChainBuilder {
    std: Vec<Placed>,
    ext: Vec<Placed>,
}

fn check_fields(id: u16, header: u16, len: u16, fields: &[Field]) -> Result<(), CapError> {
    if len < header {
        return Err(CapError::BadLayout {
            id,
            reason: "shorter than its header",
        });
    }
    for f in fields {
        if !f.is_well_formed() {
            return Err(CapError::BadLayout {
                id,
                reason: "malformed field",
            });
        }
        if f.start() < u32::from(header) || f.end() > u32::from(len) {
            return Err(CapError::BadLayout {
                id,
                reason: "field outside the capability body",
            });
        }
    }
    Ok(())
}

fn place(
    list: &[Placed],
    id: u16,
    offset: u16,
    len: u16,
    area: (u16, u16),
) -> Result<(), CapError> {
    if !offset.is_multiple_of(4) {
        return Err(CapError::Misaligned { id, offset });
    }
    let end = u32::from(offset) + u32::from(len);
    if offset < area.0 || end > u32::from(area.1) {
        return Err(CapError::OutOfBounds { id, offset, len });
    }
    if let Some(o) = list
        .iter()
        .find(|p| u32::from(p.offset) < end && u32::from(offset) < p.end())
    {
        return Err(CapError::Overlap {
            id,
            offset,
            other: o.id,
            other_offset: o.offset,
        });
    }
    Ok(())
}

fn next_free(list: &[Placed], start: u16) -> u16 {
    let end = list
        .iter()
        .map(Placed::end)
        .max()
        .unwrap_or(u32::from(start));
    // Dword align; clamp to u16 (an out-of-area result is rejected by `place`).
    u16::try_from((end + 3) & !3).unwrap_or(!3)
}

impl CapChainBuilder {
    /// An empty chain.
    pub fn new() -> CapChainBuilder {
        CapChainBuilder::default()
    }

    /// Append a standard capability at the next free dword after the last one (0x40 first).
    pub fn add(&mut self, cap: Capability) -> Result<CapOffset, CapError> {
        let at = next_free(&self.std, STD_CAP_START);
        self.add_at(at, cap)
    }

    /// Append a standard capability at `offset` (it is linked after the previously added one).
    pub fn add_at(&mut self, offset: u16, cap: Capability) -> Result<CapOffset, CapError> {
        let id = u16::from(cap.id);
        check_fields(id, 2, cap.len, &cap.fields)?;
        place(&self.std, id, offset, cap.len, (STD_CAP_START, STD_CAP_END))?;
        self.std.push(Placed {
            id,
            version: 0,
            offset,
            len: cap.len,
            fields: cap.fields,
        });
        Ok(CapOffset(offset))
    }

    /// Append an extended capability at the next free dword (0x100 first).
    pub fn add_ext(&mut self, cap: ExtCapability) -> Result<CapOffset, CapError> {
        let at = next_free(&self.ext, EXT_CAP_START);
        self.add_ext_at(at, cap)
    }

    /// Append an extended capability at `offset` (the first one must be at 0x100).
    pub fn add_ext_at(&mut self, offset: u16, cap: ExtCapability) -> Result<CapOffset, CapError> {
        check_fields(cap.id, 4, cap.len, &cap.fields)?;
        if cap.version > 0xf {
            return Err(CapError::BadLayout {
                id: cap.id,
                reason: "version wider than 4 bits",
            });
        }
        place(
            &self.ext,
            cap.id,
            offset,
            cap.len,
            (EXT_CAP_START, EXT_CAP_END),
        )?;
        if self.ext.is_empty() && offset != EXT_CAP_START {
            return Err(CapError::ExtChainHead(offset));
        }
        self.ext.push(Placed {
            id: cap.id,
            version: cap.version,
            offset,
            len: cap.len,
            fields: cap.fields,
        });
        Ok(CapOffset(offset))
    }

    /// The standard capabilities in chain order.
    pub fn capabilities(&self) -> Vec<CapRecord> {
        self.std
            .iter()
            .map(|p| CapRecord {
                id: p.id as u8,
                offset: p.offset,
                len: p.len,
            })
            .collect()
    }

    /// The extended capabilities in chain order.
    pub fn ext_capabilities(&self) -> Vec<ExtCapRecord> {
        self.ext
            .iter()
            .map(|p| ExtCapRecord {
                id: p.id,
                offset: p.offset,
                version: p.version,
                len: p.len,
            })
            .collect()
    }

    /// All fields of the chain with absolute offsets: the Capabilities Pointer, Status
    /// "Capabilities List", each capability's header (read-only) and body.
    pub fn fields(&self) -> Vec<Field> {
        let mut out = Vec::new();
        let head = self.std.first().map_or(0, |p| p.offset);
        out.push(Field::ro(
            "CapabilitiesPointer",
            reg::CAPABILITIES_POINTER,
            0..=7,
            u32::from(head),
        ));
        out.push(Field::ro(
            "Status.CapabilitiesList",
            reg::STATUS,
            status::CAPABILITIES_LIST..=status::CAPABILITIES_LIST,
            u32::from(!self.std.is_empty()),
        ));
        for (i, p) in self.std.iter().enumerate() {
            let next = self.std.get(i + 1).map_or(0, |n| n.offset);
            out.push(Field::ro("Cap.ID", p.offset, 0..=7, u32::from(p.id)));
            out.push(Field::ro("Cap.Next", p.offset, 8..=15, u32::from(next)));
            out.extend(p.fields.iter().map(|f| f.moved(p.offset)));
        }
        for (i, p) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map_or(0, |n| n.offset);
            out.push(Field::ro("ExtCap.ID", p.offset, 0..=15, u32::from(p.id)));
            out.push(Field::ro(
                "ExtCap.Version",
                p.offset,
                16..=19,
                u32::from(p.version),
            ));
            out.push(Field::ro("ExtCap.Next", p.offset, 20..=31, u32::from(next)));
            out.extend(p.fields.iter().map(|f| f.moved(p.offset)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::Access;
    use crate::ConfigSpace;

    fn cap(id: u8, len: u16) -> Capability {
        Capability {
            id,
            len,
            fields: vec![Field::new("Body", 2, 0..=15, Access::Rw)],
        }
    }

    fn ext(id: u16, len: u16) -> ExtCapability {
        ExtCapability {
            id,
            version: 1,
            len,
            fields: vec![Field::new("Body", 4, 0..=31, Access::Rw)],
        }
    }

    #[test]
    fn test_cap_chain_std_offsets_and_next_pointers() {
        let mut b = CapChainBuilder::new();
        assert_eq!(b.add(cap(0x01, 8)).unwrap(), CapOffset(0x40));
        assert_eq!(b.add(cap(0x11, 12)).unwrap(), CapOffset(0x48));
        assert_eq!(b.add(cap(0x10, 6)).unwrap(), CapOffset(0x54));
        assert_eq!(
            b.add(cap(0x09, 5)).unwrap(),
            CapOffset(0x5c),
            "dword aligned"
        );
        let cs = ConfigSpace::from_fields(&b.fields()).unwrap();
        assert_eq!(cs.read_u8(0x34), 0x40);
        assert_ne!(cs.read_u16(0x06) & (1 << 4), 0, "Status.CapabilitiesList");
        let mut chain = vec![];
        let mut at = cs.read_u8(0x34) as u16;
        while at != 0 {
            chain.push((cs.read_u8(at), at));
            at = cs.read_u8(at + 1) as u16;
        }
        assert_eq!(
            chain,
            [(0x01, 0x40), (0x11, 0x48), (0x10, 0x54), (0x09, 0x5c)]
        );
        assert_eq!(cs.wmask_u32(0x40) & 0xffff, 0, "header bytes read-only");
        assert_eq!(cs.wmask_u32(0x40) >> 16, 0xffff, "body placed after header");
    }

    #[test]
    fn test_cap_chain_ext_headers_id_version_next() {
        let mut b = CapChainBuilder::new();
        assert_eq!(b.add_ext(ext(0x0001, 0x48)).unwrap(), CapOffset(0x100));
        assert_eq!(b.add_ext(ext(0x000f, 8)).unwrap(), CapOffset(0x148));
        assert_eq!(b.add_ext(ext(0x001b, 8)).unwrap(), CapOffset(0x150));
        let cs = ConfigSpace::from_fields(&b.fields()).unwrap();
        assert_eq!(cs.read_u32(0x100), 0x0001 | (1 << 16) | (0x148 << 20));
        assert_eq!(cs.read_u32(0x148), 0x000f | (1 << 16) | (0x150 << 20));
        assert_eq!(cs.read_u32(0x150), 0x001b | (1 << 16));
        assert_eq!(cs.read_u8(0x34), 0, "no standard capabilities");
        assert_eq!(cs.read_u16(0x06) & (1 << 4), 0);
    }

    #[test]
    fn test_cap_chain_overlap_detected() {
        let mut b = CapChainBuilder::new();
        b.add_at(0x40, cap(0x01, 8)).unwrap();
        assert_eq!(
            b.add_at(0x44, cap(0x11, 12)),
            Err(CapError::Overlap {
                id: 0x11,
                offset: 0x44,
                other: 0x01,
                other_offset: 0x40
            })
        );
        b.add_ext(ext(1, 0x10)).unwrap();
        assert!(matches!(
            b.add_ext_at(0x10c, ext(2, 8)),
            Err(CapError::Overlap { .. })
        ));
    }

    #[test]
    fn test_cap_chain_bounds_and_alignment_checked() {
        let mut b = CapChainBuilder::new();
        assert!(matches!(
            b.add_at(0x3c, cap(1, 8)),
            Err(CapError::OutOfBounds { .. })
        ));
        assert!(matches!(
            b.add_at(0xfc, cap(1, 8)),
            Err(CapError::OutOfBounds { .. })
        ));
        assert!(matches!(
            b.add_at(0x42, cap(1, 8)),
            Err(CapError::Misaligned { .. })
        ));
        assert_eq!(
            b.add_ext_at(0x200, ext(1, 8)),
            Err(CapError::ExtChainHead(0x200))
        );
        assert!(matches!(
            b.add_ext_at(0xffc, ext(1, 8)),
            Err(CapError::OutOfBounds { .. })
        ));
        b.add_at(0xf8, cap(1, 8)).unwrap();
        assert!(matches!(
            b.add(cap(2, 4)),
            Err(CapError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn test_cap_chain_field_outside_body_rejected() {
        let mut b = CapChainBuilder::new();
        let mut c = cap(1, 4);
        c.fields = vec![Field::new("Bad", 2, 0..=31, Access::Rw)];
        assert!(matches!(b.add(c), Err(CapError::BadLayout { .. })));
        let mut c = cap(1, 4);
        c.fields = vec![Field::new("OnHeader", 0, 8..=15, Access::Rw)];
        assert!(matches!(b.add(c), Err(CapError::BadLayout { .. })));
        let mut e = ext(1, 8);
        e.fields = vec![Field::new("OnHeader", 0, 0..=7, Access::Rw)];
        assert!(matches!(b.add_ext(e), Err(CapError::BadLayout { .. })));
    }
}
