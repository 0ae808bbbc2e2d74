//! The client's DMA map: IOVA ranges announced with DMA_MAP, backed (when the client passed an
//! fd) by our own shared mapping of the client's memory, and the bounds-checked accessors devices
//! use for DMA.
//!
//! Unmap semantics are the kernel's type1 IOMMU semantics (drivers/vfio/vfio_iommu_type1.c):
//! DMA_UNMAP removes every mapping that lies entirely inside the range and succeeds when nothing
//! does; a range that cuts a mapping in two is refused. QEMU relies on this when a guest enables
//! its vIOMMU and unmaps the whole 48-bit space in power-of-two chunks.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, PoisonError, RwLock};

use vm_memory::mmap::MmapRegion;
use vm_memory::volatile_memory::VolatileMemory;
use vm_memory::FileOffset;

/// `VFIO_USER_F_DMA_REGION_READ`: the client allows device reads of the range.
pub const PROT_READ: u32 = 1 << 0;
/// `VFIO_USER_F_DMA_REGION_WRITE`: the client allows device writes to the range.
pub const PROT_WRITE: u32 = 1 << 1;

/// Errors of DMA map management and DMA access, each with the errno an error reply carries.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// The new mapping overlaps an existing one.
    #[error("DMA map {iova:#x}+{size:#x} overlaps an existing mapping")]
    Overlap {
        /// IOVA of the new mapping.
        iova: u64,
        /// Size of the new mapping.
        size: u64,
    },
    /// The mapping is empty, wraps around, or is not page aligned.
    #[error("DMA map {iova:#x}+{size:#x} is empty, wraps or is not page aligned")]
    BadRange {
        /// IOVA of the mapping.
        iova: u64,
        /// Size of the mapping.
        size: u64,
    },
    /// The range to unmap cuts a mapping in two.
    #[error("DMA unmap {iova:#x}+{size:#x} splits the mapping at {mapping:#x}")]
    SplitsMapping {
        /// IOVA of the unmap request.
        iova: u64,
        /// Size of the unmap request.
        size: u64,
        /// IOVA of the mapping it would split.
        mapping: u64,
    },
    /// Too many mappings.
    #[error("Too many DMA mappings (limit {0})")]
    TooMany(usize),
    /// mmap of the client's fd failed, or the fd is shorter than the mapping.
    #[error("Cannot map the client's fd for {iova:#x}+{size:#x}: {reason}")]
    Mmap {
        /// IOVA of the mapping.
        iova: u64,
        /// Size of the mapping.
        size: u64,
        /// What failed.
        reason: String,
    },
    /// A device access touched an IOVA that no mapping covers, or one without backing memory.
    #[error("DMA {dir} {iova:#x}+{len:#x} is not inside any mapped, fd-backed range")]
    Unmapped {
        /// "read" or "write".
        dir: &'static str,
        /// IOVA of the access.
        iova: u64,
        /// Length of the access.
        len: usize,
    },
    /// A device access violates the mapping's protection.
    #[error("DMA {dir} {iova:#x}+{len:#x} is not permitted by the mapping's protection")]
    Protection {
        /// "read" or "write".
        dir: &'static str,
        /// IOVA of the access.
        iova: u64,
        /// Length of the access.
        len: usize,
    },
}

impl DmaError {
    /// The errno for an error reply.
    pub fn errno(&self) -> i32 {
        match self {
            DmaError::Overlap { .. } => libc::EEXIST,
            DmaError::TooMany(_) => libc::ENOSPC,
            DmaError::Mmap { .. } => libc::EINVAL,
            DmaError::Protection { .. } => libc::EPERM,
            _ => libc::EINVAL,
        }
    }
}

/// One DMA_MAP entry.
#[derive(Debug)]
struct Mapping {
    iova: u64,
    size: u64,
    prot: u32,
    /// Our mapping of the client's memory; `None` for ranges the client announced without an fd
    /// (QEMU does this for ROM and PAM windows): they exist but the device cannot reach them.
    region: Option<MmapRegion>,
}

impl Mapping {
    /// One past the last byte. u128: a range may end exactly at 2^64 (QEMU unmaps up to there).
    fn end(&self) -> u128 {
        u128::from(self.iova) + u128::from(self.size)
    }
}

/// One past the last byte of `iova..iova+size`, or `None` if it lies beyond 2^64.
fn range_end(iova: u64, size: u64) -> Option<u128> {
    let end = u128::from(iova) + u128::from(size);
    (end <= 1u128 << 64).then_some(end)
}

/// A snapshot-free view of the client's DMA map, shared by the server (which changes it) and
/// devices (which access memory through it).
#[derive(Debug, Clone, Default)]
pub struct DmaSpace {
    inner: Arc<RwLock<Vec<Mapping>>>,
}

/// A description of one mapping, for diagnostics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappingInfo {
    /// First IOVA.
    pub iova: u64,
    /// Size in bytes.
    pub size: u64,
    /// `PROT_READ` / `PROT_WRITE`.
    pub prot: u32,
    /// Whether the server holds a mapping of the client's memory for it.
    pub backed: bool,
}

/// Upper bound of simultaneous mappings (QEMU advertises 65535).
pub const MAX_MAPPINGS: usize = 65535;

const PAGE: u64 = 4096;

impl DmaSpace {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, Vec<Mapping>> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Mapping>> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Add a mapping. With `fd`, the server maps `size` bytes of it at `offset` (shared, with the
    /// protection the client granted).
    pub fn map(
        &self,
        iova: u64,
        size: u64,
        prot: u32,
        fd: Option<(OwnedFd, u64)>,
    ) -> Result<(), DmaError> {
        let end = range_end(iova, size).ok_or(DmaError::BadRange { iova, size })?;
        if size == 0 || !iova.is_multiple_of(PAGE) || !size.is_multiple_of(PAGE) {
            return Err(DmaError::BadRange { iova, size });
        }
        {
            let maps = self.read_lock();
            if maps.len() >= MAX_MAPPINGS {
                return Err(DmaError::TooMany(MAX_MAPPINGS));
            }
            if maps
                .iter()
                .any(|m| u128::from(m.iova) < end && u128::from(iova) < m.end())
            {
                return Err(DmaError::Overlap { iova, size });
            }
        }
        let region = match fd {
            None => None,
            Some((fd, offset)) => Some(map_fd(fd, offset, iova, size, prot)?),
        };
        let mut maps = self.write_lock();
        // Re-check under the write lock: only the server thread maps, but stay correct anyway.
        if maps
            .iter()
            .any(|m| u128::from(m.iova) < end && u128::from(iova) < m.end())
        {
            return Err(DmaError::Overlap { iova, size });
        }
        let pos = maps.partition_point(|m| m.iova < iova);
        maps.insert(
            pos,
            Mapping {
                iova,
                size,
                prot,
                region,
            },
        );
        Ok(())
    }

    /// Remove every mapping inside `iova..iova+size`; returns the removed ranges.
    pub fn unmap(&self, iova: u64, size: u64) -> Result<Vec<MappingInfo>, DmaError> {
        let end = range_end(iova, size).ok_or(DmaError::BadRange { iova, size })?;
        let start = u128::from(iova);
        let mut maps = self.write_lock();
        if let Some(m) = maps.iter().find(|m| {
            let ms = u128::from(m.iova);
            ms < end && start < m.end() && (ms < start || m.end() > end)
        }) {
            return Err(DmaError::SplitsMapping {
                iova,
                size,
                mapping: m.iova,
            });
        }
        let mut removed = Vec::new();
        maps.retain(|m| {
            let inside = u128::from(m.iova) >= start && m.end() <= end;
            if inside {
                removed.push(info(m));
            }
            !inside
        });
        Ok(removed)
    }

    /// Remove every mapping (unmap-all flag, or the client went away).
    pub fn unmap_all(&self) -> Vec<MappingInfo> {
        let mut maps = self.write_lock();
        let removed = maps.iter().map(info).collect();
        maps.clear();
        removed
    }

    /// The current mappings, sorted by IOVA.
    pub fn mappings(&self) -> Vec<MappingInfo> {
        self.read_lock().iter().map(info).collect()
    }

    /// Device read of `buf.len()` bytes at `iova`. The whole access must lie inside one
    /// fd-backed mapping that permits reads.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.read_then(iova, buf, |_| ())
    }

    /// [`DmaSpace::read`], then `then(&result)` while the mappings are still held: an unmap
    /// cannot be acknowledged between the access and what `then` does (the device journals
    /// the access there, so the journal never shows it after the unmap it preceded).
    pub fn read_then(
        &self,
        iova: u64,
        buf: &mut [u8],
        then: impl FnOnce(&Result<(), DmaError>),
    ) -> Result<(), DmaError> {
        let maps = self.read_lock();
        let r = read_in(&maps, iova, buf);
        then(&r);
        r
    }

    /// Device write of `data` at `iova`, with the same rules as [`DmaSpace::read`].
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        self.write_then(iova, data, |_| ())
    }

    /// [`DmaSpace::write`], then `then(&result)` while the mappings are still held (see
    /// [`DmaSpace::read_then`]).
    pub fn write_then(
        &self,
        iova: u64,
        data: &[u8],
        then: impl FnOnce(&Result<(), DmaError>),
    ) -> Result<(), DmaError> {
        let maps = self.read_lock();
        let r = write_in(&maps, iova, data);
        then(&r);
        r
    }

    /// Device copy of `len` bytes from client memory at `src` to client memory at `dst`,
    /// straight from one mapping into the other (no intermediate buffer: a DMA engine's
    /// memory-to-memory copy costs one memcpy, not two).
    ///
    /// Either range may span several adjacent mappings (with a vIOMMU every guest page is a
    /// mapping of its own); every part must be fd-backed, the source readable and the
    /// destination writable. Everything is checked before any byte moves, so on error nothing
    /// was copied; the error names the side that failed (`dir` "read" for the source, "write"
    /// for the destination) with the whole access. Overlapping IOVA ranges are refused with
    /// [`DmaError::BadRange`]: memmove order is the caller's business.
    pub fn copy(&self, src: u64, dst: u64, len: usize) -> Result<(), DmaError> {
        self.copy_then(src, dst, len, |_| ())
    }

    /// [`DmaSpace::copy`], then `then(&result)` while the mappings are still held (see
    /// [`DmaSpace::read_then`]).
    pub fn copy_then(
        &self,
        src: u64,
        dst: u64,
        len: usize,
        then: impl FnOnce(&Result<(), DmaError>),
    ) -> Result<(), DmaError> {
        let maps = self.read_lock();
        let r = copy_in(&maps, src, dst, len);
        then(&r);
        r
    }
}

/// The mapping holding `at` for a piece of a [`DmaSpace::copy`], checked for backing and
/// protection, and the offset of `at` in it; errors describe the whole access `iova`+`len`.
fn piece<'a>(
    maps: &'a [Mapping],
    at: u64,
    prot: u32,
    dir: &'static str,
    iova: u64,
    len: usize,
) -> Result<(&'a Mapping, usize), DmaError> {
    let (m, off) = find(maps, at, 1, dir).map_err(|_| DmaError::Unmapped { dir, iova, len })?;
    if m.prot & prot == 0 {
        return Err(DmaError::Protection { dir, iova, len });
    }
    let backed = m
        .region
        .as_ref()
        .is_some_and(|r| r.get_slice(off, 1).is_ok());
    if !backed {
        return Err(DmaError::Unmapped { dir, iova, len });
    }
    Ok((m, off))
}

fn info(m: &Mapping) -> MappingInfo {
    MappingInfo {
        iova: m.iova,
        size: m.size,
        prot: m.prot,
        backed: m.region.is_some(),
    }
}

fn find<'a>(
    maps: &'a [Mapping],
    iova: u64,
    len: usize,
    dir: &'static str,
) -> Result<(&'a Mapping, usize), DmaError> {
    let err = DmaError::Unmapped { dir, iova, len };
    let end = u128::from(iova) + len as u128;
    let pos = maps.partition_point(|m| m.iova <= iova);
    let m = pos.checked_sub(1).and_then(|i| maps.get(i)).ok_or(err)?;
    if end > m.end() {
        return Err(DmaError::Unmapped { dir, iova, len });
    }
    let off = usize::try_from(iova - m.iova).map_err(|_| DmaError::Unmapped { dir, iova, len })?;
    Ok((m, off))
}

fn map_fd(
    fd: OwnedFd,
    offset: u64,
    iova: u64,
    size: u64,
    prot: u32,
) -> Result<MmapRegion, DmaError> {
    let fail = |reason: String| DmaError::Mmap { iova, size, reason };
    let file = File::from(fd);
    // Refuse a file shorter than the mapping: touching a page past its end would raise SIGBUS.
    let len = file
        .metadata()
        .map_err(|e| fail(format!("fstat: {e}")))?
        .len();
    let end = offset
        .checked_add(size)
        .ok_or_else(|| fail("offset + size overflows".into()))?;
    if end > len {
        return Err(fail(format!(
            "file is {len:#x} bytes, mapping needs {end:#x}"
        )));
    }
    warn_unless_sealed(&file, iova);
    let mut mprot = 0;
    if prot & PROT_READ != 0 {
        mprot |= libc::PROT_READ;
    }
    if prot & PROT_WRITE != 0 {
        mprot |= libc::PROT_WRITE;
    }
    let size = usize::try_from(size).map_err(|_| fail("size exceeds the address space".into()))?;
    MmapRegion::build(
        Some(FileOffset::new(file, offset)),
        size,
        mprot,
        libc::MAP_SHARED | libc::MAP_NORESERVE,
    )
    .map_err(|e| fail(e.to_string()))
}

/// A client that can shrink the file after mapping could make our accesses fault (SIGBUS).
/// QEMU's memfd backend seals its memfds against shrinking by default (`seal=on`); say so when a
/// client's fd is not.
fn warn_unless_sealed(file: &File, iova: u64) {
    let fd = file.as_fd();
    // F_GET_SEALS is a plain fcntl on an fd we own; it reads flags and touches no memory.
    let seals = rustix_free_fcntl_get_seals(fd);
    if seals & libc::F_SEAL_SHRINK == 0 {
        log::warn!(
            "DMA map at {iova:#x}: client fd is not sealed against shrinking; a client that \
             truncates it can crash the server"
        );
    }
}

fn rustix_free_fcntl_get_seals(fd: std::os::fd::BorrowedFd<'_>) -> i32 {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl(F_GET_SEALS) on a valid, open fd (borrowed for the call) only returns flags.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    r.max(0)
}

/// A device read under the caller's hold of the mappings.
fn read_in(maps: &[Mapping], iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
    let (m, off) = find(maps, iova, buf.len(), "read")?;
    if m.prot & PROT_READ == 0 {
        return Err(DmaError::Protection {
            dir: "read",
            iova,
            len: buf.len(),
        });
    }
    let unmapped = || DmaError::Unmapped {
        dir: "read",
        iova,
        len: buf.len(),
    };
    let region = m.region.as_ref().ok_or_else(unmapped)?;
    let slice = region.get_slice(off, buf.len()).map_err(|_| unmapped())?;
    slice.copy_to(buf);
    Ok(())
}

/// A device write under the caller's hold of the mappings.
fn write_in(maps: &[Mapping], iova: u64, data: &[u8]) -> Result<(), DmaError> {
    let (m, off) = find(maps, iova, data.len(), "write")?;
    if m.prot & PROT_WRITE == 0 {
        return Err(DmaError::Protection {
            dir: "write",
            iova,
            len: data.len(),
        });
    }
    let unmapped = || DmaError::Unmapped {
        dir: "write",
        iova,
        len: data.len(),
    };
    let region = m.region.as_ref().ok_or_else(unmapped)?;
    let slice = region.get_slice(off, data.len()).map_err(|_| unmapped())?;
    slice.copy_from(data);
    Ok(())
}

/// A device copy under the caller's hold of the mappings (see [`DmaSpace::copy`]).
fn copy_in(maps: &[Mapping], src: u64, dst: u64, len: usize) -> Result<(), DmaError> {
    let n = len as u64;
    let (Some(src_end), Some(dst_end)) = (range_end(src, n), range_end(dst, n)) else {
        return Err(DmaError::Unmapped {
            dir: "read",
            iova: src,
            len,
        });
    };
    if len > 0 && u128::from(src) < dst_end && u128::from(dst) < src_end {
        return Err(DmaError::BadRange { iova: dst, size: n });
    }
    // Pass 0 checks every piece, pass 1 copies: a failure leaves memory untouched.
    for pass in 0..2 {
        let mut done = 0usize;
        while done < len {
            let (s, d) = (src + done as u64, dst + done as u64);
            let (sm, soff) = piece(maps, s, PROT_READ, "read", src, len)?;
            let (dm, doff) = piece(maps, d, PROT_WRITE, "write", dst, len)?;
            // Bytes to the end of whichever mapping ends first (fits: both are ≤ len).
            let left = (len - done) as u128;
            let k = left
                .min(sm.end() - u128::from(s))
                .min(dm.end() - u128::from(d)) as usize;
            if pass == 1 {
                let fail = |dir, iova| DmaError::Unmapped { dir, iova, len };
                let from = sm
                    .region
                    .as_ref()
                    .and_then(|r| r.get_slice(soff, k).ok())
                    .ok_or_else(|| fail("read", src))?;
                let to = dm
                    .region
                    .as_ref()
                    .and_then(|r| r.get_slice(doff, k).ok())
                    .ok_or_else(|| fail("write", dst))?;
                from.copy_to_volatile_slice(to);
            }
            done += k;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn memfd(len: u64) -> OwnedFd {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        f.set_len(len).unwrap();
        OwnedFd::from(f)
    }

    #[test]
    fn test_map_overlap_refused_with_eexist() {
        let d = DmaSpace::new();
        d.map(0x1000, 0x2000, PROT_READ, None).unwrap();
        let e = d.map(0x2000, 0x1000, PROT_READ, None).unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST);
    }

    #[test]
    fn test_unmap_range_covering_nothing_succeeds() {
        let d = DmaSpace::new();
        d.map(0x10000, 0x1000, PROT_READ, None).unwrap();
        assert!(d.unmap(0, 0x1000).unwrap().is_empty());
        assert_eq!(d.mappings().len(), 1);
    }

    #[test]
    fn test_unmap_large_range_removes_all_inside() {
        let d = DmaSpace::new();
        d.map(0x10000, 0x1000, PROT_READ, None).unwrap();
        d.map(0x20000, 0x1000, PROT_READ, None).unwrap();
        let removed = d.unmap(0, 1 << 47).unwrap();
        assert_eq!(removed.len(), 2);
        assert!(d.mappings().is_empty());
    }

    #[test]
    fn test_unmap_range_ending_at_2_pow_64_is_accepted() {
        // QEMU unmaps 0xfef00000..2^64 at guest power-off.
        let d = DmaSpace::new();
        d.map(0xfef0_0000, 0x1000, PROT_READ, None).unwrap();
        let removed = d
            .unmap(0xfef0_0000, 0u64.wrapping_sub(0xfef0_0000))
            .unwrap();
        assert_eq!(removed.len(), 1);
        assert!(matches!(
            d.unmap(0xffff_ffff_ffff_f000, 0x2000),
            Err(DmaError::BadRange { .. })
        ));
    }

    #[test]
    fn test_unmap_splitting_a_mapping_is_refused() {
        let d = DmaSpace::new();
        d.map(0x10000, 0x2000, PROT_READ, None).unwrap();
        assert!(matches!(
            d.unmap(0x10000, 0x1000),
            Err(DmaError::SplitsMapping { .. })
        ));
    }

    #[test]
    fn test_dma_read_write_roundtrip_and_bounds() {
        let d = DmaSpace::new();
        d.map(
            0x4000,
            0x2000,
            PROT_READ | PROT_WRITE,
            Some((memfd(0x3000), 0x1000)),
        )
        .unwrap();
        d.write(0x4ff0, b"hello").unwrap();
        let mut b = [0u8; 5];
        d.read(0x4ff0, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        // Crossing the end of the mapping is refused, never touches memory past it.
        assert!(d.read(0x5ffe, &mut [0u8; 4]).is_err());
        assert!(d.read(0x3ffe, &mut [0u8; 4]).is_err());
        assert!(d.write(u64::MAX - 1, &[0u8; 4]).is_err());
    }

    #[test]
    fn test_then_runs_before_a_concurrent_unmap_completes() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let d = DmaSpace::new();
        d.map(
            0x4000,
            0x1000,
            PROT_READ | PROT_WRITE,
            Some((memfd(0x1000), 0)),
        )
        .unwrap();
        let unmapped = Arc::new(AtomicBool::new(false));
        let mut seen_mapped_in_then = None;
        let mut b = [0u8; 8];
        let r = d.read_then(0x4000, &mut b, |r| {
            assert!(r.is_ok());
            let (d2, flag) = (d.clone(), unmapped.clone());
            let t = std::thread::spawn(move || {
                d2.unmap(0x4000, 0x1000).unwrap();
                flag.store(true, Ordering::SeqCst);
            });
            // The unmapping thread must wait for us: whatever we record here (the device's
            // journal) is ordered before the unmap.
            std::thread::sleep(std::time::Duration::from_millis(50));
            seen_mapped_in_then = Some(!unmapped.load(Ordering::SeqCst));
            drop(t);
        });
        assert!(r.is_ok());
        assert_eq!(seen_mapped_in_then, Some(true));
        // Once `then` returned the unmap goes through.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !unmapped.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(unmapped.load(Ordering::SeqCst));
        assert!(d.read(0x4000, &mut b).is_err());
    }

    #[test]
    fn test_dma_respects_protection() {
        let d = DmaSpace::new();
        d.map(0x4000, 0x1000, PROT_READ, Some((memfd(0x1000), 0)))
            .unwrap();
        let e = d.write(0x4000, &[1]).unwrap_err();
        assert!(matches!(e, DmaError::Protection { .. }));
    }

    #[test]
    fn test_map_fd_shorter_than_mapping_is_refused() {
        let d = DmaSpace::new();
        let e = d
            .map(0x4000, 0x2000, PROT_READ, Some((memfd(0x1000), 0)))
            .unwrap_err();
        assert!(matches!(e, DmaError::Mmap { .. }));
    }

    #[test]
    fn test_copy_across_page_mappings_moves_bytes_once() {
        // Source: one 3-page mapping; destination: three 1-page mappings (as with a vIOMMU).
        let d = DmaSpace::new();
        let rw = PROT_READ | PROT_WRITE;
        d.map(0x10000, 0x3000, rw, Some((memfd(0x3000), 0)))
            .unwrap();
        let dst_fd = memfd(0x3000);
        for p in 0..3u64 {
            let fd = dst_fd.try_clone().unwrap();
            d.map(0x40000 + p * 0x1000, 0x1000, rw, Some((fd, p * 0x1000)))
                .unwrap();
        }
        let data: Vec<u8> = (0..0x2800u32).map(|i| (i * 7 + 3) as u8).collect();
        d.write_all_pages(0x10400, &data);
        d.copy(0x10400, 0x40200, data.len()).unwrap();
        let mut back = vec![0u8; data.len()];
        d.read_all_pages(0x40200, &mut back);
        assert_eq!(back, data);
        // Bytes around the destination range are untouched.
        let mut edge = [0xffu8; 1];
        d.read(0x401ff, &mut edge).unwrap();
        assert_eq!(edge, [0]);
        d.read(0x40200 + data.len() as u64, &mut edge).unwrap();
        assert_eq!(edge, [0]);
    }

    #[test]
    fn test_copy_failing_piece_copies_nothing_and_names_the_side() {
        let d = DmaSpace::new();
        let rw = PROT_READ | PROT_WRITE;
        d.map(0x10000, 0x2000, rw, Some((memfd(0x2000), 0)))
            .unwrap();
        d.map(0x20000, 0x1000, rw, Some((memfd(0x1000), 0)))
            .unwrap();
        d.map(0x30000, 0x1000, PROT_WRITE, Some((memfd(0x1000), 0)))
            .unwrap();
        d.map(0x40000, 0x1000, PROT_READ, Some((memfd(0x1000), 0)))
            .unwrap();
        d.map(0x50000, 0x1000, rw, None).unwrap();
        d.write(0x10000, &[0x5a; 0x2000]).unwrap();
        // The destination runs off its mapping after one page: nothing is written.
        let e = d.copy(0x10000, 0x20000, 0x2000).unwrap_err();
        assert!(matches!(
            e,
            DmaError::Unmapped {
                dir: "write",
                iova: 0x20000,
                ..
            }
        ));
        let mut b = [0u8; 0x1000];
        d.read(0x20000, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        // Protection on either side, fd-less memory, overlapping ranges, wrap-around.
        let e = d.copy(0x30000, 0x20000, 16).unwrap_err();
        assert!(matches!(e, DmaError::Protection { dir: "read", .. }));
        let e = d.copy(0x10000, 0x40000, 16).unwrap_err();
        assert!(matches!(e, DmaError::Protection { dir: "write", .. }));
        let e = d.copy(0x50000, 0x20000, 16).unwrap_err();
        assert!(matches!(e, DmaError::Unmapped { dir: "read", .. }));
        let e = d.copy(0x10000, 0x10010, 0x100).unwrap_err();
        assert!(matches!(e, DmaError::BadRange { .. }));
        assert!(d.copy(u64::MAX - 4, 0x20000, 16).is_err());
        d.read(0x20000, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        // Zero bytes: nothing to check, nothing moves.
        d.copy(0x99000, 0x98000, 0).unwrap();
    }

    impl DmaSpace {
        fn write_all_pages(&self, iova: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                self.write(iova + i as u64, &[*b]).unwrap();
            }
        }

        fn read_all_pages(&self, iova: u64, buf: &mut [u8]) {
            for (i, b) in buf.iter_mut().enumerate() {
                let mut one = [0u8];
                self.read(iova + i as u64, &mut one).unwrap();
                *b = one[0];
            }
        }
    }

    #[test]
    fn test_fdless_mapping_exists_but_is_not_accessible() {
        let d = DmaSpace::new();
        d.map(0xc0000, 0x10000, PROT_READ, None).unwrap();
        assert!(d.read(0xc0000, &mut [0u8; 1]).is_err());
        let _ = std::io::sink().write(b"");
    }
}
