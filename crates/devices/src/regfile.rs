//! A BAR of 32-bit registers, as both functions' BAR0 is: how a client access of some size maps
//! onto register reads and writes.
//!
//! Accepted: a 4-byte access at a 4-byte aligned offset (one register), and an 8-byte access at
//! an 8-byte aligned offset (two registers, the low half first, exactly as two 4-byte accesses
//! would be). Anything else reads 0 and is ignored on write, with a warning — what a device whose
//! registers only decode dword accesses does.

use log::warn;
use pcisim_pci::FunctionCtx;

/// The registers one access touches: one dword, or a qword's low and high dwords.
fn dwords(offset: u64, len: usize) -> Option<(u64, Option<u64>)> {
    match (len, offset % 8, offset % 4) {
        (4, _, 0) => Some((offset, None)),
        (8, 0, _) => Some((offset, offset.checked_add(4))),
        _ => None,
    }
}

/// A device's 32-bit register file.
pub(crate) trait RegisterFile {
    /// Name for log messages.
    fn name(&self) -> &str;
    /// Read the register at `offset` (4-byte aligned).
    fn read_reg(&self, offset: u64) -> u32;
    /// Write the register at `offset` (4-byte aligned).
    fn write_reg(&mut self, ctx: &mut FunctionCtx<'_>, offset: u64, value: u32);

    /// A client read of `data.len()` bytes at `offset`.
    fn regs_read(&mut self, offset: u64, data: &mut [u8]) {
        match dwords(offset, data.len()) {
            Some((lo, hi)) => {
                let mut v = u64::from(self.read_reg(lo));
                if let Some(hi) = hi {
                    v |= u64::from(self.read_reg(hi)) << 32;
                }
                let bytes = v.to_le_bytes();
                data.copy_from_slice(bytes.get(..data.len()).unwrap_or(&[]));
            }
            None => {
                warn!(
                    "{}: {}-byte register read at {offset:#x} not supported, reads 0",
                    self.name(),
                    data.len()
                );
                data.fill(0);
            }
        }
    }

    /// A client write of `data` at `offset`.
    fn regs_write(&mut self, ctx: &mut FunctionCtx<'_>, offset: u64, data: &[u8]) {
        let dword = |b: &[u8]| -> Option<u32> { Some(u32::from_le_bytes(b.try_into().ok()?)) };
        match dwords(offset, data.len()) {
            Some((lo, None)) => {
                if let Some(v) = dword(data) {
                    self.write_reg(ctx, lo, v);
                }
            }
            Some((lo, Some(hi))) => {
                if let (Some(l), Some(h)) =
                    (data.get(..4).and_then(dword), data.get(4..).and_then(dword))
                {
                    self.write_reg(ctx, lo, l);
                    self.write_reg(ctx, hi, h);
                }
            }
            None => warn!(
                "{}: {}-byte register write at {offset:#x} not supported, ignored",
                self.name(),
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::dwords;

    #[test]
    fn test_dwords_aligned_dword_and_qword_only() {
        assert_eq!(dwords(0x40, 4), Some((0x40, None)));
        assert_eq!(dwords(0x44, 4), Some((0x44, None)));
        assert_eq!(dwords(0x40, 8), Some((0x40, Some(0x44))));
        assert_eq!(dwords(0x44, 8), None, "qword must be 8-byte aligned");
        assert_eq!(dwords(0x41, 4), None);
        assert_eq!(dwords(0x40, 2), None);
        assert_eq!(
            dwords(u64::MAX - 7, 8),
            Some((u64::MAX - 7, Some(u64::MAX - 3)))
        );
    }
}
