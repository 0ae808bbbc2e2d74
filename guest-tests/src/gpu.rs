//! The GPU function's register interface (docs/programming-model.md; defined in pcisim-abi)
//! and the pure computations the tests compare against.

// The register interface itself is pcisim-abi's (the one copy the device, the lab and the C
// driver share).
pub use pcisim_abi::gpu::regs::*;
pub use pcisim_abi::gpu::ring::encode as encode_cmd;
pub use pcisim_abi::gpu::ring::{ctrl, err, flag, op, ring_error, status, CMD_SIZE};
pub use pcisim_abi::gpu::vram::{fill_byte, fnv1a64};

/// `len` bytes of a FILL with the 32-bit `pattern` (little-endian, repeated).
pub fn fill32(pattern: u32, len: usize) -> Vec<u8> {
    let p = pattern.to_le_bytes();
    (0..len).map(|i| p[i % 4]).collect()
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
    fn fill_pattern_is_fill_byte() {
        // (The FNV-1a-64 vectors and the fill formula are tested in pcisim-abi.)
        let p = fill_pattern(7, 5);
        assert_eq!(p.len(), 5);
        for (i, b) in p.iter().enumerate() {
            assert_eq!(*b, fill_byte(7, i as u64));
        }
    }

    #[test]
    fn test_fill32_repeats_the_little_endian_pattern() {
        // (The ring command encoding is tested in pcisim-abi.)
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
