//! The GPU function's register interface (docs/programming-model.md; defined in pcisim-abi)
//! and the pure computations the tests compare against.

// The register interface itself is pcisim-abi's (the one copy the device, the lab and the C
// driver share).
pub use pcisim_abi::gpu::regs::*;
pub use pcisim_abi::gpu::ring::encode as encode_cmd;
pub use pcisim_abi::gpu::ring::{ctrl, err, flag, op, ring_error, status, CMD_SIZE};

/// `len` bytes of a FILL with the 32-bit `pattern` (little-endian, repeated).
pub fn fill32(pattern: u32, len: usize) -> Vec<u8> {
    let p = pattern.to_le_bytes();
    (0..len).map(|i| p[i % 4]).collect()
}

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
