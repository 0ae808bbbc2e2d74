//! What the VRAM commands compute (docs/programming-model.md, VRAM_CMD): CHECKSUM is FNV-1a-64
//! over the window, FILL writes [`fill_byte`] at every offset. Both sides (the device and a
//! test that predicts its result) need the same formulas, so they live here.

/// FNV-1a-64 offset basis (the hash of the empty input).
pub const FNV1A64_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a-64 prime.
pub const FNV1A64_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Continues an FNV-1a-64 hash `h` over `data` (start from [`FNV1A64_OFFSET_BASIS`]).
pub fn fnv1a64_update(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(FNV1A64_PRIME);
    }
    h
}

/// FNV-1a-64 over `data`: what VRAM_CMD CHECKSUM leaves in VRAM_RESULT.
pub fn fnv1a64(data: &[u8]) -> u64 {
    fnv1a64_update(FNV1A64_OFFSET_BASIS, data)
}

/// Byte `i` (from the window start) of the FILL pattern for `seed`: the top byte of
/// (seed + i) * 0x9E3779B97F4A7C15 (the seed widened to 64 bits first).
pub fn fill_byte(seed: u32, i: u64) -> u8 {
    ((u64::from(seed).wrapping_add(i)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
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
    }
}
