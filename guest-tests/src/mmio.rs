//! A memory-mapped BAR (sysfs `resourceN`) with bounds-checked volatile access.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;

/// A shared, read-write mapping of a BAR. Every access is bounds- and
/// alignment-checked and volatile (the compiler may not merge, split or elide it).
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps the first `len` bytes of `path` (a sysfs `resourceN` file).
    pub fn map_file(path: &Path, len: usize) -> Result<Self, String> {
        if len == 0 {
            return Err(format!("{}: refusing to map 0 bytes", path.display()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        // SAFETY: mapping a new region (addr NULL) cannot affect existing memory;
        // the fd is valid for the duration of the call, and the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap {} ({len} bytes): {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        // The mapping stays valid after the file is closed.
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| format!("mmap {} returned NULL", path.display()))?;
        Ok(Mapping { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn check(&self, off: u64, size: usize, align: usize) -> Result<usize, String> {
        let o = usize::try_from(off).map_err(|_| format!("offset {off:#x} too large"))?;
        let end = o
            .checked_add(size)
            .ok_or_else(|| format!("offset {off:#x} overflows"))?;
        if end > self.len {
            return Err(format!(
                "access at {off:#x}+{size} outside the {:#x}-byte mapping",
                self.len
            ));
        }
        if o % align != 0 {
            return Err(format!("unaligned {size}-byte access at {off:#x}"));
        }
        Ok(o)
    }

    pub fn read32(&self, off: u64) -> Result<u32, String> {
        let o = self.check(off, 4, 4)?;
        // SAFETY: `o + 4 <= len` and `o` is 4-aligned (checked above), so the
        // pointer is inside our live mapping and aligned for u32.
        Ok(unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(o).cast::<u32>()) })
    }

    pub fn write32(&self, off: u64, v: u32) -> Result<(), String> {
        let o = self.check(off, 4, 4)?;
        // SAFETY: as in `read32`; the mapping is writable (PROT_WRITE).
        unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(o).cast::<u32>(), v) };
        Ok(())
    }

    fn read8(&self, o: usize) -> u8 {
        // SAFETY: callers pass `o < len` (checked by `read_bytes`).
        unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(o)) }
    }

    fn write8(&self, o: usize, v: u8) {
        // SAFETY: callers pass `o < len` (checked by `write_bytes`).
        unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(o), v) }
    }

    /// Writes `data` at `off`: byte accesses up to 4-byte alignment, then 32-bit
    /// accesses, then bytes for the tail.
    pub fn write_bytes(&self, off: u64, data: &[u8]) -> Result<(), String> {
        let start = self.check(off, data.len(), 1)?;
        let mut i = 0;
        while i < data.len() {
            let o = start + i;
            if o % 4 == 0 && i + 4 <= data.len() {
                let w = u32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
                self.write32(o as u64, w)?;
                i += 4;
            } else {
                self.write8(o, data[i]);
                i += 1;
            }
        }
        Ok(())
    }

    /// Reads `len` bytes at `off` (same access pattern as `write_bytes`).
    pub fn read_bytes(&self, off: u64, len: usize) -> Result<Vec<u8>, String> {
        let start = self.check(off, len, 1)?;
        let mut out = Vec::with_capacity(len);
        let mut i = 0;
        while i < len {
            let o = start + i;
            if o % 4 == 0 && i + 4 <= len {
                out.extend_from_slice(&self.read32(o as u64)?.to_le_bytes());
                i += 4;
            } else {
                out.push(self.read8(o));
                i += 1;
            }
        }
        Ok(out)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; no reference into the
        // mapping outlives `self` (all accessors copy values out).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_a_file_and_accesses_it() {
        let path = std::env::temp_dir().join(format!("pcisim-guest-mmio-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let m = Mapping::map_file(&path, 8192).unwrap();
        assert_eq!(m.len(), 8192);
        m.write32(4, 0xdead_beef).unwrap();
        assert_eq!(m.read32(4).unwrap(), 0xdead_beef);
        assert!(m.read32(2).is_err());
        assert!(m.read32(8192).is_err());
        assert!(m.write32(8190, 0).is_err());
        let data: Vec<u8> = (0..37u8).collect();
        m.write_bytes(4097, &data).unwrap();
        assert_eq!(m.read_bytes(4097, 37).unwrap(), data);
        assert!(m.write_bytes(8190, &data).is_err());
        assert!(m.read_bytes(u64::MAX, 2).is_err());
        drop(m);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[4097..4097 + 37], &data[..]);
        std::fs::remove_file(&path).unwrap();
        assert!(Mapping::map_file(&path, 4096).is_err());
    }
}
