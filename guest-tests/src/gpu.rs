//! The GPU function's register interface (docs/programming-model.md) and the pure
//! computations the tests compare against.

pub const REG_ID: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_VRAM_SIZE_LO: u64 = 0x008;
pub const REG_VRAM_SIZE_HI: u64 = 0x00C;
pub const REG_MSIX_VECTORS: u64 = 0x010;
pub const REG_SCRATCH0: u64 = 0x040;
pub const SCRATCH_COUNT: u64 = 16;
pub const REG_IRQ_DOORBELL: u64 = 0x080;
pub const REG_IRQ_COUNT: u64 = 0x084;
pub const REG_IRQ_LAST_ERROR: u64 = 0x088;
pub const REG_VRAM_OFFSET_LO: u64 = 0x100;
pub const REG_VRAM_OFFSET_HI: u64 = 0x104;
pub const REG_VRAM_LENGTH_LO: u64 = 0x108;
pub const REG_VRAM_LENGTH_HI: u64 = 0x10C;
pub const REG_VRAM_SEED: u64 = 0x110;
pub const REG_VRAM_CMD: u64 = 0x114;
pub const REG_VRAM_STATUS: u64 = 0x118;
pub const REG_VRAM_RESULT_LO: u64 = 0x120;
pub const REG_VRAM_RESULT_HI: u64 = 0x124;

pub const REG_RING_BASE_LO: u64 = 0x200;
pub const REG_RING_BASE_HI: u64 = 0x204;
pub const REG_RING_SIZE: u64 = 0x208;
pub const REG_RING_CTRL: u64 = 0x20C;
pub const REG_RING_HEAD: u64 = 0x210;
pub const REG_RING_TAIL: u64 = 0x214;
pub const REG_RING_STATUS: u64 = 0x218;
pub const REG_RING_ERROR: u64 = 0x21C;
pub const REG_RING_FAULT_ADDR_LO: u64 = 0x220;
pub const REG_RING_FAULT_ADDR_HI: u64 = 0x224;
pub const REG_LAST_FENCE_LO: u64 = 0x228;
pub const REG_LAST_FENCE_HI: u64 = 0x22C;
pub const REG_FENCE_VECTOR: u64 = 0x230;
pub const REG_ERROR_VECTOR: u64 = 0x234;
pub const REG_CMDS_COMPLETED: u64 = 0x238;
pub const REG_RING_ERRORS: u64 = 0x23C;

/// "PCSG" in memory order.
pub const ID_MAGIC: u32 = 0x4753_4350;
/// 1.1: the 1.0 registers plus the command ring.
pub const INTERFACE_VERSION: u32 = 0x0001_0001;

pub const RING_CTRL_ENABLE: u32 = 1 << 0;
pub const RING_CTRL_RESET: u32 = 1 << 1;

pub const RING_STATUS_IDLE: u32 = 0;
pub const RING_STATUS_BUSY: u32 = 1;
pub const RING_STATUS_ERROR: u32 = 2;

/// Bytes per ring entry.
pub const CMD_SIZE: u64 = 32;

pub const OP_NOP: u8 = 0x00;
pub const OP_COPY: u8 = 0x01;
pub const OP_FILL: u8 = 0x02;
pub const OP_WRITE_FENCE: u8 = 0x03;
pub const OP_INTERRUPT: u8 = 0x04;

pub const FLAG_SRC_VRAM: u8 = 1 << 0;
pub const FLAG_DST_VRAM: u8 = 1 << 1;
pub const FLAG_FENCE_IRQ: u8 = 1 << 2;

pub const ERR_BAD_OPCODE: u32 = 1;
pub const ERR_ALIGNMENT: u32 = 4;
pub const ERR_DMA_FAULT: u32 = 8;
pub const ERR_DMA_REFUSED: u32 = 9;

/// RING_ERROR's value for `code` at `slot`.
pub fn ring_error(code: u32, slot: u32) -> u32 {
    (code & 0xff) | ((slot & 0xfff) << 16)
}

/// One 32-byte ring command: opcode, flags, six reserved zero bytes, operands a, b, c (LE).
pub fn encode_cmd(opcode: u8, flags: u8, a: u64, b: u64, c: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[0] = opcode;
    out[1] = flags;
    out[8..16].copy_from_slice(&a.to_le_bytes());
    out[16..24].copy_from_slice(&b.to_le_bytes());
    out[24..32].copy_from_slice(&c.to_le_bytes());
    out
}

/// `len` bytes of a FILL with the 32-bit `pattern` (little-endian, repeated).
pub fn fill32(pattern: u32, len: usize) -> Vec<u8> {
    let p = pattern.to_le_bytes();
    (0..len).map(|i| p[i % 4]).collect()
}

pub const VRAM_CMD_CHECKSUM: u32 = 1;
pub const VRAM_CMD_FILL: u32 = 2;

pub const VRAM_STATUS_OK: u32 = 0;
pub const VRAM_STATUS_RANGE: u32 = 1;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a-64 over `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_update(FNV_OFFSET_BASIS, bytes)
}

/// Continues an FNV-1a-64 hash (start with [`fnv1a64`] of the empty slice).
pub fn fnv1a64_update(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// Byte `i` of a FILL window with `seed` (programming model, "FILL pattern").
pub fn fill_byte(seed: u32, i: u64) -> u8 {
    ((u64::from(seed).wrapping_add(i)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// The first `len` bytes of a FILL window with `seed`.
pub fn fill_pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| fill_byte(seed, i)).collect()
}

/// A small deterministic PRNG (splitmix64) for test patterns.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_known_vectors() {
        // Reference values from the FNV specification's test suite.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"b"), 0xaf63df4c8601f1a5);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
        // Incremental hashing matches one-shot hashing.
        let h = fnv1a64_update(fnv1a64(b"foo"), b"bar");
        assert_eq!(h, fnv1a64(b"foobar"));
    }

    #[test]
    fn fill_formula() {
        // seed 0, i 0: 0 * k >> 56 = 0.
        assert_eq!(fill_byte(0, 0), 0);
        // seed 0, i 1: top byte of the golden-ratio constant.
        assert_eq!(fill_byte(0, 1), 0x9E);
        // (2 * 0x9E3779B97F4A7C15) mod 2^64 = 0x3C6EF372FE94F82A.
        assert_eq!(fill_byte(0, 2), 0x3C);
        assert_eq!(fill_byte(1, 1), fill_byte(0, 2));
        // The seed is widened to u64 before adding (no u32 wrap-around).
        assert_eq!(fill_byte(u32::MAX, 1), {
            let x = (1u64 << 32).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            (x >> 56) as u8
        });
        let p = fill_pattern(7, 5);
        assert_eq!(p.len(), 5);
        for (i, b) in p.iter().enumerate() {
            assert_eq!(*b, fill_byte(7, i as u64));
        }
    }

    #[test]
    fn test_ring_command_encode_fields_little_endian() {
        let c = encode_cmd(OP_COPY, FLAG_DST_VRAM, 0x1122, 0x3344, 0x10);
        assert_eq!(c[0], 1);
        assert_eq!(c[1], 2);
        assert_eq!(&c[2..8], &[0; 6]);
        assert_eq!(&c[8..10], &[0x22, 0x11]);
        assert_eq!(&c[16..18], &[0x44, 0x33]);
        assert_eq!(c[24], 0x10);
        assert_eq!(ring_error(ERR_BAD_OPCODE, 3), 0x0003_0001);
        assert_eq!(fill32(0x0403_0201, 6), [1, 2, 3, 4, 1, 2]);
    }

    #[test]
    fn splitmix_is_deterministic_and_fills_tails() {
        let mut a = SplitMix64::new(1);
        let mut b = SplitMix64::new(1);
        assert_eq!(a.next_u64(), b.next_u64());
        let mut buf = [0u8; 13];
        a.fill(&mut buf);
        assert!(buf.iter().any(|&x| x != 0));
        // Known first output of splitmix64 seeded with 0.
        assert_eq!(SplitMix64::new(0).next_u64(), 0xe220a8397b1dcdaf);
    }
}
