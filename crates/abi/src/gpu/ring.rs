//! The GPU command ring's entry format and codes (docs/programming-model.md, "Command ring").
//!
//! A ring is `RING_SIZE` 32-byte commands at `RING_BASE` in the driver's memory (an IOVA):
//!
//! ```text
//! byte 0 opcode | byte 1 flags | bytes 2..7 reserved (0) | 8..15 a | 16..23 b | 24..31 c
//! ```
//!
//! Operands are little-endian u64s whose meaning depends on the opcode ([`op`]). The checks a
//! device makes on a command (which flags an opcode allows, alignment, ranges) are the device's
//! business (`pcisim-devices`); this module is the byte layout and the numbers.

use crate::le;

/// Size of one command in bytes.
pub const CMD_SIZE: u64 = 32;
/// Smallest ring (entries).
pub const MIN_ENTRIES: u32 = 2;
/// Largest ring (entries).
pub const MAX_ENTRIES: u32 = 4096;
/// Required alignment of RING_BASE.
pub const RING_ALIGN: u64 = 4096;
/// Largest length a COPY or FILL may move.
pub const MAX_LEN: u64 = 64 << 20;
/// Default FENCE_VECTOR.
pub const DEFAULT_FENCE_VECTOR: u16 = 0;
/// Default ERROR_VECTOR.
pub const DEFAULT_ERROR_VECTOR: u16 = 1;
/// RING_ERROR: mask of the error code (bits 0..7).
pub const RING_ERROR_CODE_MASK: u32 = 0xff;
/// RING_ERROR: shift of the slot of the command that stopped the ring (bits 16..27).
pub const RING_ERROR_SLOT_SHIFT: u32 = 16;
/// RING_ERROR: mask of the slot after shifting it down.
pub const RING_ERROR_SLOT_MASK: u32 = 0xfff;

abi_table! {
    /// The ring geometry constants (for the C header).
    TABLE;
    /// Size of one command in bytes.
    RING_CMD_SIZE: u64 = CMD_SIZE;
    /// Smallest ring (entries).
    RING_MIN_ENTRIES: u32 = MIN_ENTRIES;
    /// Largest ring (entries).
    RING_MAX_ENTRIES: u32 = MAX_ENTRIES;
    /// Required alignment of RING_BASE.
    RING_BASE_ALIGN: u64 = RING_ALIGN;
    /// Largest length a COPY or FILL may move.
    RING_MAX_LEN: u64 = MAX_LEN;
    /// RING_ERROR: mask of the error code.
    RING_ERROR_CODE: u32 = RING_ERROR_CODE_MASK;
    /// RING_ERROR: shift of the slot.
    RING_ERROR_SLOT: u32 = RING_ERROR_SLOT_SHIFT;
}

/// Opcodes (byte 0 of a command).
pub mod op {
    abi_table! {
        /// The opcodes (for the C header).
        TABLE;
        /// Do nothing.
        NOP: u8 = 0x00;
        /// Copy `c` bytes from `a` to `b`.
        COPY: u8 = 0x01;
        /// Fill `c` bytes at `a` with the 32-bit pattern `b`.
        FILL: u8 = 0x02;
        /// Write the 64-bit value `b` at IOVA `a`; LAST_FENCE = `b`.
        WRITE_FENCE: u8 = 0x03;
        /// Raise MSI-X vector `a`.
        INTERRUPT: u8 = 0x04;
    }
}

/// Flags (byte 1 of a command).
pub mod flag {
    abi_table! {
        /// The flags (for the C header).
        TABLE;
        /// COPY: the source is a VRAM offset (else a client IOVA).
        SRC_VRAM: u8 = 1 << 0;
        /// COPY, FILL: the destination is a VRAM offset (else a client IOVA).
        DST_VRAM: u8 = 1 << 1;
        /// WRITE_FENCE: raise FENCE_VECTOR once the fence is written.
        FENCE_IRQ: u8 = 1 << 2;
    }
}

/// RING_CTRL bits.
pub mod ctrl {
    abi_table! {
        /// The RING_CTRL bits (for the C header).
        TABLE;
        /// The engine processes commands while set. Setting it latches and checks RING_BASE and
        /// RING_SIZE.
        ENABLE: u32 = 1 << 0;
        /// Write 1: stop the engine (abort the command in flight), clear ENABLE, HEAD, TAIL and
        /// the error state. Reads 0.
        RESET: u32 = 1 << 1;
    }
}

/// RING_STATUS values.
pub mod status {
    abi_table! {
        /// The RING_STATUS values (for the C header).
        TABLE;
        /// Nothing to do (or disabled).
        IDLE: u32 = 0;
        /// Enabled and HEAD != TAIL: commands are being processed.
        BUSY: u32 = 1;
        /// Stopped on an error (RING_ERROR says which and where) until RING_CTRL.RESET.
        ERROR: u32 = 2;
    }
}

/// RING_ERROR codes (bits 0..7; the slot is in bits 16..27).
pub mod err {
    abi_table! {
        /// The RING_ERROR codes (for the C header).
        TABLE;
        /// No error.
        NONE: u32 = 0;
        /// Unknown opcode.
        BAD_OPCODE: u32 = 1;
        /// A flag the opcode does not define is set.
        BAD_FLAGS: u32 = 2;
        /// A reserved field or an operand the opcode does not use is not zero.
        RESERVED: u32 = 3;
        /// An operand is not aligned as the opcode requires.
        ALIGNMENT: u32 = 4;
        /// A length above [`super::MAX_LEN`].
        LENGTH: u32 = 5;
        /// A VRAM range outside VRAM.
        VRAM_RANGE: u32 = 6;
        /// An IOVA range that wraps past 2^64.
        IOVA_RANGE: u32 = 7;
        /// A client access hit no mapped memory (or the mapping's protection forbids it).
        DMA_FAULT: u32 = 8;
        /// The bus refused the access: Bus Master Enable clear, D3hot, link down, reset, no
        /// client.
        DMA_REFUSED: u32 = 9;
        /// An MSI-X vector that does not exist.
        BAD_VECTOR: u32 = 10;
        /// RING_BASE not 4 KiB aligned or RING_SIZE not a power of two in 2..=4096 at enable.
        BAD_RING: u32 = 11;
        /// RING_TAIL written with a value not below RING_SIZE.
        BAD_TAIL: u32 = 12;
    }
}

/// RING_ERROR's value for error `code` at `slot`: code | slot << 16 (each masked to its field).
pub const fn ring_error(code: u32, slot: u32) -> u32 {
    (code & RING_ERROR_CODE_MASK) | ((slot & RING_ERROR_SLOT_MASK) << RING_ERROR_SLOT_SHIFT)
}

/// The name of an opcode, for messages.
pub fn op_name(opcode: u8) -> &'static str {
    match opcode {
        op::NOP => "NOP",
        op::COPY => "COPY",
        op::FILL => "FILL",
        op::WRITE_FENCE => "WRITE_FENCE",
        op::INTERRUPT => "INTERRUPT",
        _ => "?",
    }
}

/// The name of an error code, as the journal's ring-error notes spell it.
pub fn err_name(code: u32) -> &'static str {
    match code {
        err::NONE => "none",
        err::BAD_OPCODE => "bad_opcode",
        err::BAD_FLAGS => "bad_flags",
        err::RESERVED => "reserved",
        err::ALIGNMENT => "alignment",
        err::LENGTH => "length",
        err::VRAM_RANGE => "vram_range",
        err::IOVA_RANGE => "iova_range",
        err::DMA_FAULT => "dma_fault",
        err::DMA_REFUSED => "dma_refused",
        err::BAD_VECTOR => "bad_vector",
        err::BAD_RING => "bad_ring",
        err::BAD_TAIL => "bad_tail",
        _ => "unknown",
    }
}

/// One command as raw fields (no checks: every byte pattern decodes to one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RawCommand {
    /// Opcode ([`op`]).
    pub opcode: u8,
    /// Flags ([`flag`]).
    pub flags: u8,
    /// Bytes 2..7, which must be zero.
    pub reserved: [u8; 6],
    /// Operand a.
    pub a: u64,
    /// Operand b.
    pub b: u64,
    /// Operand c.
    pub c: u64,
}

impl RawCommand {
    /// Decodes 32 bytes.
    pub fn decode(raw: &[u8; CMD_SIZE as usize]) -> RawCommand {
        let mut reserved = [0u8; 6];
        reserved.copy_from_slice(&raw[2..8]);
        RawCommand {
            opcode: raw[0],
            flags: raw[1],
            reserved,
            a: le::u64_at(raw, 8),
            b: le::u64_at(raw, 16),
            c: le::u64_at(raw, 24),
        }
    }

    /// Encodes to 32 bytes (the inverse of [`RawCommand::decode`]).
    pub fn encode(&self) -> [u8; CMD_SIZE as usize] {
        let mut out = [0u8; CMD_SIZE as usize];
        out[0] = self.opcode;
        out[1] = self.flags;
        out[2..8].copy_from_slice(&self.reserved);
        le::put_u64(&mut out, 8, self.a);
        le::put_u64(&mut out, 16, self.b);
        le::put_u64(&mut out, 24, self.c);
        out
    }

    /// The 8 header bytes (opcode, flags, reserved) as one little-endian u64: what RING_FAULT_ADDR
    /// reports for a reserved-bytes error.
    pub fn header(&self) -> u64 {
        let mut h = [0u8; 8];
        h[0] = self.opcode;
        h[1] = self.flags;
        h[2..8].copy_from_slice(&self.reserved);
        u64::from_le_bytes(h)
    }
}

/// Encodes a command with zero reserved bytes.
pub fn encode(opcode: u8, flags: u8, a: u64, b: u64, c: u64) -> [u8; CMD_SIZE as usize] {
    RawCommand {
        opcode,
        flags,
        reserved: [0; 6],
        a,
        b,
        c,
    }
    .encode()
}

/// The command layout, field by field (for the C header).
pub const LAYOUT: crate::table::Struct = crate::table::Struct {
    name: "gpu_ring_cmd",
    size: CMD_SIZE as usize,
    doc: "One GPU command ring entry.",
    fields: &[
        crate::table::Field::new("opcode", 0, 1, 1, "opcode (GPU_OP_*)"),
        crate::table::Field::new("flags", 1, 1, 1, "flags (GPU_FLAG_*)"),
        crate::table::Field::new("reserved", 2, 1, 6, "must be 0"),
        crate::table::Field::new("a", 8, 8, 1, "operand a"),
        crate::table::Field::new("b", 16, 8, 1, "operand b"),
        crate::table::Field::new("c", 24, 8, 1, "operand c"),
    ],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ring_command_encode_fields_little_endian() {
        let c = encode(op::COPY, flag::DST_VRAM, 0x1122, 0x3344, 0x10);
        assert_eq!(c[0], 1);
        assert_eq!(c[1], 2);
        assert_eq!(&c[2..8], &[0; 6]);
        assert_eq!(&c[8..10], &[0x22, 0x11]);
        assert_eq!(&c[16..18], &[0x44, 0x33]);
        assert_eq!(c[24], 0x10);
        assert_eq!(ring_error(err::BAD_OPCODE, 3), 0x0003_0001);
        assert_eq!(ring_error(0x1ff, 0x1fff), 0x0fff_00ff, "fields masked");
    }

    #[test]
    fn test_raw_command_roundtrip_keeps_reserved_bytes() {
        let mut raw = [0u8; 32];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = i as u8 + 1;
        }
        let c = RawCommand::decode(&raw);
        assert_eq!(c.opcode, 1);
        assert_eq!(c.flags, 2);
        assert_eq!(c.reserved, [3, 4, 5, 6, 7, 8]);
        assert_eq!(c.a, u64::from_le_bytes([9, 10, 11, 12, 13, 14, 15, 16]));
        assert_eq!(c.header(), u64::from_le_bytes([1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(c.encode(), raw);
    }

    #[test]
    fn test_names_cover_every_code() {
        for d in err::TABLE {
            assert_ne!(err_name(d.value as u32), "unknown", "{}", d.name);
        }
        for d in op::TABLE {
            assert_ne!(op_name(d.value as u8), "?", "{}", d.name);
        }
        assert_eq!(err_name(13), "unknown");
        assert_eq!(op_name(5), "?");
    }
}
