//! Queue entry formats (docs/npu.md, "Queues"): submission descriptors in, completion and fault
//! records out. Pure encode/decode; every byte pattern decodes to something.

use super::regs;
use crate::le;
use crate::table::{Field, Struct};

/// A submission-queue entry as fetched (64 bytes, little-endian).
///
/// ```text
/// 0x00 u8 op | u8 flags | u16 reserved | u32 pasid
/// 0x08 u64 src (VA; FILL: the 8-byte pattern)
/// 0x10 u64 dst (VA)
/// 0x18 u64 len
/// 0x20 u64 completion record VA in the PASID (0: none; 8-byte aligned)
/// 0x28 u64 tag (echoed in the completion)
/// 0x30 u64 reserved, 0x38 u64 reserved
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Descriptor {
    /// Opcode (`DESC_*`).
    pub op: u8,
    /// Flags (`DESC_FLAG_*`).
    pub flags: u8,
    /// PASID whose address space `src`, `dst` and `crec` live in.
    pub pasid: u32,
    /// Source VA (FILL: pattern).
    pub src: u64,
    /// Destination VA.
    pub dst: u64,
    /// Length in bytes.
    pub len: u64,
    /// Completion record VA (0: none).
    pub crec: u64,
    /// Opaque tag.
    pub tag: u64,
    /// Whether any reserved byte is non-zero.
    pub reserved_set: bool,
}

impl Descriptor {
    /// Decode 64 bytes.
    pub fn decode(b: &[u8; 64]) -> Descriptor {
        Descriptor {
            op: b[0],
            flags: b[1],
            pasid: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            src: le::u64_at(b, 0x08),
            dst: le::u64_at(b, 0x10),
            len: le::u64_at(b, 0x18),
            crec: le::u64_at(b, 0x20),
            tag: le::u64_at(b, 0x28),
            reserved_set: b[2] != 0 || b[3] != 0 || b[0x30..].iter().any(|&x| x != 0),
        }
    }

    /// Encode (reserved bytes zero).
    pub fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0] = self.op;
        b[1] = self.flags;
        b[4..8].copy_from_slice(&self.pasid.to_le_bytes());
        b[0x08..0x10].copy_from_slice(&self.src.to_le_bytes());
        b[0x10..0x18].copy_from_slice(&self.dst.to_le_bytes());
        b[0x18..0x20].copy_from_slice(&self.len.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&self.crec.to_le_bytes());
        b[0x28..0x30].copy_from_slice(&self.tag.to_le_bytes());
        b
    }

    /// The completion status of a descriptor that fails validation before any memory access,
    /// or None if it is well-formed.
    pub fn validate(&self) -> Option<u32> {
        if !matches!(
            self.op,
            regs::DESC_NOP | regs::DESC_MEMCPY | regs::DESC_FILL | regs::DESC_COMPARE
        ) {
            return Some(regs::ST_BAD_OPCODE);
        }
        if self.reserved_set
            || self.flags & !regs::DESC_FLAGS_KNOWN != 0
            || !self.crec.is_multiple_of(8)
        {
            return Some(regs::ST_BAD_DESCRIPTOR);
        }
        if self.op == regs::DESC_NOP {
            return None;
        }
        if self.len > regs::MAX_LEN {
            return Some(regs::ST_BAD_LENGTH);
        }
        let wraps = |a: u64| a.checked_add(self.len).is_none();
        let src_used = matches!(self.op, regs::DESC_MEMCPY | regs::DESC_COMPARE);
        if wraps(self.dst) || (src_used && wraps(self.src)) {
            return Some(regs::ST_BAD_LENGTH);
        }
        None
    }
}

/// A completion record (CQ entry and per-descriptor record, 32 bytes).
///
/// ```text
/// 0x00 u64 tag | 0x08 u32 status | 0x0C u32 SQ slot | 0x10 u64 result | 0x18 u32 pasid
/// 0x1C u32 flags: bit 0 valid
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Completion {
    /// The descriptor's tag.
    pub tag: u64,
    /// Status (`ST_*`).
    pub status: u32,
    /// SQ slot the descriptor came from.
    pub slot: u32,
    /// Bytes done, or the mismatch offset for COMPARE.
    pub result: u64,
    /// The descriptor's PASID.
    pub pasid: u32,
}

impl Completion {
    /// Encode with the valid bit set.
    pub fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..12].copy_from_slice(&self.status.to_le_bytes());
        b[12..16].copy_from_slice(&self.slot.to_le_bytes());
        b[16..24].copy_from_slice(&self.result.to_le_bytes());
        b[24..28].copy_from_slice(&self.pasid.to_le_bytes());
        b[28..32].copy_from_slice(&regs::COMPLETION_VALID.to_le_bytes());
        b
    }

    /// Decode (for tests and tools); None unless the valid bit is set.
    pub fn decode(b: &[u8; 32]) -> Option<Completion> {
        let u32_at = |o: usize| le::u32_at(b, o);
        let u64_at = |o: usize| le::u64_at(b, o);
        (u32_at(28) & regs::COMPLETION_VALID != 0).then(|| Completion {
            tag: u64_at(0),
            status: u32_at(8),
            slot: u32_at(12),
            result: u64_at(16),
            pasid: u32_at(24),
        })
    }
}

/// A fault record (32 bytes).
///
/// ```text
/// 0x00 u64 va | 0x08 u32 pasid | 0x0C u32 access (bit 0 write, bit 1 user)
/// 0x10 u32 reason | 0x14 u32 level | 0x18 u64 tag of the descriptor
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultRecord {
    /// Faulting virtual address.
    pub va: u64,
    /// PASID.
    pub pasid: u32,
    /// Access bits (`FAULT_ACCESS_*`).
    pub access: u32,
    /// Reason code (`FAULT_*` in [`regs`]).
    pub reason: u32,
    /// Paging level of the fault (4..1).
    pub level: u32,
    /// The descriptor's tag.
    pub tag: u64,
}

impl FaultRecord {
    /// Encode.
    pub fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&self.va.to_le_bytes());
        b[8..12].copy_from_slice(&self.pasid.to_le_bytes());
        b[12..16].copy_from_slice(&self.access.to_le_bytes());
        b[16..20].copy_from_slice(&self.reason.to_le_bytes());
        b[20..24].copy_from_slice(&self.level.to_le_bytes());
        b[24..32].copy_from_slice(&self.tag.to_le_bytes());
        b
    }

    /// Decode (for tests and tools).
    pub fn decode(b: &[u8; 32]) -> FaultRecord {
        let u32_at = |o: usize| le::u32_at(b, o);
        let u64_at = |o: usize| le::u64_at(b, o);
        FaultRecord {
            va: u64_at(0),
            pasid: u32_at(8),
            access: u32_at(12),
            reason: u32_at(16),
            level: u32_at(20),
            tag: u64_at(24),
        }
    }
}

/// The descriptor layout, field by field (for the C header).
pub const DESCRIPTOR_LAYOUT: Struct = Struct {
    name: "npu_desc",
    size: regs::DESC_SIZE as usize,
    doc: "NPU submission-queue entry (descriptor).",
    fields: &[
        Field::new("op", 0x00, 1, 1, "opcode (NPU_DESC_NOP..NPU_DESC_COMPARE)"),
        Field::new("flags", 0x01, 1, 1, "NPU_DESC_FLAG_*"),
        Field::new("reserved0", 0x02, 2, 1, "must be 0"),
        Field::new(
            "pasid",
            0x04,
            4,
            1,
            "PASID whose address space src, dst, completion are in",
        ),
        Field::new("src", 0x08, 8, 1, "source VA (FILL: the 8-byte pattern)"),
        Field::new("dst", 0x10, 8, 1, "destination VA"),
        Field::new("len", 0x18, 8, 1, "length in bytes"),
        Field::new(
            "completion",
            0x20,
            8,
            1,
            "completion record VA (0: none; 8-byte aligned)",
        ),
        Field::new("tag", 0x28, 8, 1, "echoed in the completion"),
        Field::new("reserved1", 0x30, 8, 2, "must be 0"),
    ],
};

/// The completion record layout (for the C header).
pub const COMPLETION_LAYOUT: Struct = Struct {
    name: "npu_cqe",
    size: regs::COMPLETION_SIZE as usize,
    doc: "NPU completion record (CQ entry and per-descriptor record).",
    fields: &[
        Field::new("tag", 0x00, 8, 1, "the descriptor's tag"),
        Field::new("status", 0x08, 4, 1, "NPU_ST_*"),
        Field::new("slot", 0x0c, 4, 1, "SQ slot of the descriptor"),
        Field::new(
            "result",
            0x10,
            8,
            1,
            "bytes done (COMPARE mismatch: offset)",
        ),
        Field::new("pasid", 0x18, 4, 1, "the descriptor's PASID"),
        Field::new("valid", 0x1c, 4, 1, "bit 0: NPU_COMPLETION_VALID"),
    ],
};

/// The fault record layout (for the C header).
pub const FAULT_LAYOUT: Struct = Struct {
    name: "npu_fault",
    size: regs::FAULT_SIZE as usize,
    doc: "NPU fault record.",
    fields: &[
        Field::new("va", 0x00, 8, 1, "faulting VA"),
        Field::new("pasid", 0x08, 4, 1, "PASID"),
        Field::new("access", 0x0c, 4, 1, "NPU_FAULT_ACCESS_*"),
        Field::new("reason", 0x10, 4, 1, "NPU_FAULT_* reason code"),
        Field::new(
            "level",
            0x14,
            4,
            1,
            "paging level of the faulting entry (4..1)",
        ),
        Field::new("tag", 0x18, 8, 1, "the descriptor's tag"),
    ],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_descriptor_roundtrip_fields() {
        let d = Descriptor {
            op: regs::DESC_MEMCPY,
            flags: regs::DESC_FLAG_IRQ,
            pasid: 0xabcde,
            src: 0x1111_2222_3333_4444,
            dst: 0x5555_6666_7777_8888,
            len: 0x1000,
            crec: 0x7000_0000_0040,
            tag: 0xfeed,
            reserved_set: false,
        };
        assert_eq!(Descriptor::decode(&d.encode()), d);
        assert_eq!(d.validate(), None);
    }

    #[test]
    fn test_descriptor_reserved_bytes_detected() {
        for i in [2usize, 3, 0x30, 0x3f] {
            let mut b = Descriptor::default().encode();
            b[i] = 1;
            let d = Descriptor::decode(&b);
            assert!(d.reserved_set, "byte {i}");
            assert_eq!(d.validate(), Some(regs::ST_BAD_DESCRIPTOR));
        }
    }

    #[test]
    fn test_descriptor_validate_rejects_bad_fields() {
        let ok = Descriptor {
            op: regs::DESC_MEMCPY,
            len: 16,
            ..Descriptor::default()
        };
        assert_eq!(ok.validate(), None);
        let cases = [
            (Descriptor { op: 9, ..ok }, regs::ST_BAD_OPCODE),
            (Descriptor { flags: 0x80, ..ok }, regs::ST_BAD_DESCRIPTOR),
            (Descriptor { crec: 4, ..ok }, regs::ST_BAD_DESCRIPTOR),
            (
                Descriptor {
                    len: regs::MAX_LEN + 1,
                    ..ok
                },
                regs::ST_BAD_LENGTH,
            ),
            (
                Descriptor {
                    src: u64::MAX - 8,
                    ..ok
                },
                regs::ST_BAD_LENGTH,
            ),
            (
                Descriptor {
                    dst: u64::MAX,
                    ..ok
                },
                regs::ST_BAD_LENGTH,
            ),
        ];
        for (d, st) in cases {
            assert_eq!(d.validate(), Some(st), "{d:?}");
        }
        // FILL's src is a pattern, not an address.
        let fill = Descriptor {
            op: regs::DESC_FILL,
            src: u64::MAX,
            ..ok
        };
        assert_eq!(fill.validate(), None);
    }

    #[test]
    fn test_completion_and_fault_roundtrip() {
        let c = Completion {
            tag: 7,
            status: regs::ST_TRANSLATION_FAULT,
            slot: 3,
            result: 4096,
            pasid: 42,
        };
        assert_eq!(Completion::decode(&c.encode()), Some(c));
        assert_eq!(Completion::decode(&[0u8; 32]), None);
        let f = FaultRecord {
            va: 0x7fff_0000_1000,
            pasid: 42,
            access: regs::FAULT_ACCESS_WRITE | regs::FAULT_ACCESS_USER,
            reason: 1,
            level: 1,
            tag: 9,
        };
        assert_eq!(FaultRecord::decode(&f.encode()), f);
    }
}
