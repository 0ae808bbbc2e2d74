//! Command descriptor decoding: a 32-byte ring slot turned into a checked [`Command`] whose
//! operands are [`Loc`]s (client IOVA or VRAM offset). Every rule of the programming model that
//! can be checked without touching memory is checked here, before the engine runs anything.

use super::{err, flag, op, op_name, RawCommand, RingError, CMD_SIZE, MAX_LEN};

/// Where a COPY or FILL operand points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    /// An offset in VRAM.
    Vram(u64),
    /// A client IOVA.
    Iova(u64),
}

impl Loc {
    pub(super) fn addr(self) -> u64 {
        match self {
            Loc::Vram(a) | Loc::Iova(a) => a,
        }
    }

    pub(super) fn offset(self, by: u64) -> Loc {
        match self {
            Loc::Vram(a) => Loc::Vram(a.wrapping_add(by)),
            Loc::Iova(a) => Loc::Iova(a.wrapping_add(by)),
        }
    }

    pub(super) fn same_space(self, other: Loc) -> bool {
        matches!(
            (self, other),
            (Loc::Vram(_), Loc::Vram(_)) | (Loc::Iova(_), Loc::Iova(_))
        )
    }
}

/// A decoded, fully checked command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// NOP.
    Nop,
    /// COPY `len` bytes from `src` to `dst` (memmove semantics inside one space).
    Copy {
        /// Source.
        src: Loc,
        /// Destination.
        dst: Loc,
        /// Bytes.
        len: u64,
    },
    /// FILL `len` bytes at `dst` with `pattern` (little-endian, repeated).
    Fill {
        /// Destination.
        dst: Loc,
        /// The 32-bit pattern.
        pattern: u32,
        /// Bytes (a multiple of 4).
        len: u64,
    },
    /// WRITE_FENCE `value` at `iova`.
    WriteFence {
        /// IOVA of the 64-bit fence (8-byte aligned).
        iova: u64,
        /// Value.
        value: u64,
        /// Raise FENCE_VECTOR afterwards.
        irq: bool,
    },
    /// INTERRUPT: raise `vector`.
    Interrupt {
        /// The vector.
        vector: u16,
    },
}

/// Check that `len` bytes at `loc` exist: inside VRAM, or not wrapping past 2^64.
fn check_range(loc: Loc, len: u64, vram_size: u64, what: &str) -> Result<(), RingError> {
    let end = u128::from(loc.addr()) + u128::from(len);
    match loc {
        Loc::Vram(off) if end > u128::from(vram_size) => Err(RingError::new(
            err::VRAM_RANGE,
            off,
            format!("{what} VRAM {off:#x}+{len:#x} beyond VRAM size {vram_size:#x}"),
        )),
        Loc::Iova(iova) if end > 1u128 << 64 => Err(RingError::new(
            err::IOVA_RANGE,
            iova,
            format!("{what} IOVA {iova:#x}+{len:#x} wraps"),
        )),
        _ => Ok(()),
    }
}

/// Decode and check one command against a VRAM of `vram_size` bytes and `vectors` MSI-X
/// vectors. Every rule of the programming model that can be checked without touching memory is
/// checked here.
pub fn decode(
    raw: &[u8; CMD_SIZE as usize],
    vram_size: u64,
    vectors: u16,
) -> Result<Command, RingError> {
    let cmd = RawCommand::decode(raw);
    let (opcode, flags) = (cmd.opcode, cmd.flags);
    let (a, b, c) = (cmd.a, cmd.b, cmd.c);
    let name = op_name(opcode);
    let allowed = match opcode {
        op::NOP | op::INTERRUPT => 0,
        op::COPY => flag::SRC_VRAM | flag::DST_VRAM,
        op::FILL => flag::DST_VRAM,
        op::WRITE_FENCE => flag::FENCE_IRQ,
        _ => {
            return Err(RingError::new(
                err::BAD_OPCODE,
                u64::from(opcode),
                format!("bad opcode {opcode:#04x}"),
            ))
        }
    };
    if flags & !allowed != 0 {
        return Err(RingError::new(
            err::BAD_FLAGS,
            u64::from(flags),
            format!("{name}: undefined flags {:#04x}", flags & !allowed),
        ));
    }
    if cmd.reserved.iter().any(|&x| x != 0) {
        return Err(RingError::new(
            err::RESERVED,
            cmd.header(),
            format!("{name}: reserved header bytes 2..8 not zero"),
        ));
    }
    let unused_zero = |ops: &[(u64, &str)]| -> Result<(), RingError> {
        match ops.iter().find(|(v, _)| *v != 0) {
            Some((v, which)) => Err(RingError::new(
                err::RESERVED,
                *v,
                format!("{name}: unused operand {which} = {v:#x} not zero"),
            )),
            None => Ok(()),
        }
    };
    let loc = |vram: bool, addr: u64| {
        if vram {
            Loc::Vram(addr)
        } else {
            Loc::Iova(addr)
        }
    };
    let length = |len: u64| {
        if len > MAX_LEN {
            Err(RingError::new(
                err::LENGTH,
                len,
                format!("{name}: length {len:#x} above {MAX_LEN:#x}"),
            ))
        } else {
            Ok(())
        }
    };
    match opcode {
        op::NOP => {
            unused_zero(&[(a, "a"), (b, "b"), (c, "c")])?;
            Ok(Command::Nop)
        }
        op::COPY => {
            let src = loc(flags & flag::SRC_VRAM != 0, a);
            let dst = loc(flags & flag::DST_VRAM != 0, b);
            length(c)?;
            check_range(src, c, vram_size, "COPY source")?;
            check_range(dst, c, vram_size, "COPY destination")?;
            Ok(Command::Copy { src, dst, len: c })
        }
        op::FILL => {
            let dst = loc(flags & flag::DST_VRAM != 0, a);
            if b >> 32 != 0 {
                return Err(RingError::new(
                    err::RESERVED,
                    b,
                    format!("FILL: pattern {b:#x} wider than 32 bits"),
                ));
            }
            if !a.is_multiple_of(4) || !c.is_multiple_of(4) {
                let at = if a.is_multiple_of(4) { c } else { a };
                return Err(RingError::new(
                    err::ALIGNMENT,
                    at,
                    format!("FILL: destination {a:#x} or length {c:#x} not a multiple of 4"),
                ));
            }
            length(c)?;
            check_range(dst, c, vram_size, "FILL destination")?;
            Ok(Command::Fill {
                dst,
                pattern: b as u32,
                len: c,
            })
        }
        op::WRITE_FENCE => {
            unused_zero(&[(c, "c")])?;
            if !a.is_multiple_of(8) {
                return Err(RingError::new(
                    err::ALIGNMENT,
                    a,
                    format!("WRITE_FENCE: fence address {a:#x} not 8-byte aligned"),
                ));
            }
            Ok(Command::WriteFence {
                iova: a,
                value: b,
                irq: flags & flag::FENCE_IRQ != 0,
            })
        }
        _ => {
            // op::INTERRUPT (every other opcode returned above).
            unused_zero(&[(b, "b"), (c, "c")])?;
            match u16::try_from(a) {
                Ok(vector) if vector < vectors => Ok(Command::Interrupt { vector }),
                _ => Err(RingError::new(
                    err::BAD_VECTOR,
                    a,
                    format!("INTERRUPT: vector {a} out of range (0..{vectors})"),
                )),
            }
        }
    }
}
