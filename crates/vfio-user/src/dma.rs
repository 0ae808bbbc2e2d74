//! The client's DMA map: IOVA ranges announced with DMA_MAP, backed (when the client passed an
//! fd) by our own shared mapping of the client's memory, and the bounds-checked accessors devices
//! use for DMA.
//!
//! Unmap semantics are the kernel's type1 IOMMU semantics (drivers/vfio/vfio_iommu_type1.c):
//! DMA_UNMAP removes every mapping that lies entirely inside the range and succeeds when nothing
//! does; a range that cuts a mapping in two is refused. QEMU relies on this when a guest enables
//! its vIOMMU and unmaps the whole 48-bit space in power-of-two chunks.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use vm_memory::VolatileSlice;

use crate::shm::SharedMap;

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
    #[error(
        "Too many DMA mappings: the server holds at most {0} (the max_dma_maps it advertised)"
    )]
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
    /// A device access violates the mapping's protection: a write into a mapping the client
    /// granted read-only, or a read of a write-only one.
    #[error("DMA {dir} {iova:#x}+{len:#x}: {}", protection_reason(dir))]
    Protection {
        /// "read" or "write".
        dir: &'static str,
        /// IOVA of the access.
        iova: u64,
        /// Length of the access.
        len: usize,
    },
    /// The client truncated the file behind the mapping while it was mapped: the access hit
    /// pages that no longer exist (SIGBUS, recovered by [`crate::shm`]); the mapping is broken
    /// for good and every access to it fails.
    #[error(
        "DMA {dir} {iova:#x}+{len:#x} hit a mapping whose file the client truncated (SIGBUS \
         recovered; the mapping is broken)"
    )]
    Truncated {
        /// "read" or "write".
        dir: &'static str,
        /// IOVA of the access.
        iova: u64,
        /// Length of the access.
        len: usize,
    },
}

fn protection_reason(dir: &str) -> &'static str {
    if dir == "write" {
        "write to read-only mapping"
    } else {
        "read of write-only mapping"
    }
}

impl DmaError {
    /// The errno for an error reply.
    pub fn errno(&self) -> i32 {
        match self {
            DmaError::Overlap { .. } => libc::EEXIST,
            DmaError::TooMany(_) => libc::ENOSPC,
            DmaError::Mmap { .. } => libc::EINVAL,
            DmaError::Protection { .. } => libc::EPERM,
            DmaError::Truncated { .. } => libc::EFAULT,
            _ => libc::EINVAL,
        }
    }
}

/// One shared mapping of a client file that DMA mappings point into: a 1 GiB-aligned chunk of
/// the file (shared by every DMA mapping inside it, however many), or the exact window of one
/// DMA mapping that does not fit a chunk.
#[derive(Debug)]
struct Backing {
    map: SharedMap,
    /// File offset of the first mapped byte.
    file_offset: u64,
    /// Set once the broken mapping was logged.
    reported: AtomicBool,
}

impl Backing {
    fn broken(&self, dir: &'static str, iova: u64, len: usize) -> Option<DmaError> {
        if !self.map.is_broken() {
            return None;
        }
        if !self.reported.swap(true, Ordering::Relaxed) {
            log::error!(
                "DMA {dir} {iova:#x}+{len:#x}: the client truncated the file behind this DMA \
                 mapping while it was mapped (SIGBUS recovered); its {} bytes are replaced by \
                 anonymous memory and every device access to them fails",
                self.map.len()
            );
        }
        Some(DmaError::Truncated { dir, iova, len })
    }
}

/// Chunk size of shared backings: a DMA mapping that lies inside one 1 GiB-aligned chunk of
/// its file uses the chunk's one mapping (one VMA, no fd) however many DMA mappings share it.
const CHUNK: u64 = 1 << 30;
/// Address space the process may hold in shared chunks (which can be larger than the DMA
/// mappings in them); past it each DMA mapping maps only its own window.
const CHUNK_BUDGET: u64 = 16 << 40;

/// A shared chunk's identity: the file (device, inode), our mmap protection, the chunk index.
type ChunkKey = (u64, u64, i32, u64);

/// One DMA_MAP entry (the IOVA is the key of the map holding it). 32 bytes.
#[derive(Debug)]
struct Mapping {
    size: u64,
    prot: u32,
    /// Our mapping of the client's memory and this mapping's offset in it; `None` for ranges
    /// the client announced without an fd (QEMU does this for ROM and PAM windows): they exist
    /// but the device cannot reach them.
    backing: Option<(Arc<Backing>, usize)>,
}

fn end_of(iova: u64, m: &Mapping) -> u128 {
    u128::from(iova) + u128::from(m.size)
}

/// One past the last byte of `iova..iova+size`, or `None` if it lies beyond 2^64.
fn range_end(iova: u64, size: u64) -> Option<u128> {
    let end = u128::from(iova) + u128::from(size);
    (end <= 1u128 << 64).then_some(end)
}

/// The map proper: mappings by IOVA, and the shared chunks they point into.
#[derive(Debug, Default)]
struct Maps {
    by_iova: BTreeMap<u64, Mapping>,
    chunks: HashMap<ChunkKey, Arc<Backing>>,
}

impl Maps {
    /// The mapping with the greatest IOVA ≤ `iova`.
    fn at_or_before(&self, iova: u64) -> Option<(u64, &Mapping)> {
        self.by_iova
            .range(..=iova)
            .next_back()
            .map(|(&k, m)| (k, m))
    }

    fn overlaps(&self, iova: u64, end: u128) -> bool {
        // The last mapping starting before `end` overlaps iff it ends after `iova`.
        let last = u64::try_from(end - 1).unwrap_or(u64::MAX);
        self.at_or_before(last)
            .is_some_and(|(k, m)| end_of(k, m) > u128::from(iova))
    }

    /// Drop a removed mapping's share of its chunk: the chunk is unmapped with its last user.
    fn release(&mut self, m: &Mapping) {
        let Some((b, _)) = &m.backing else { return };
        // Ours and the chunk table's: nobody else uses the chunk.
        if Arc::strong_count(b) == 2 {
            self.chunks.retain(|_, c| !Arc::ptr_eq(c, b));
        }
    }
}

/// A snapshot-free view of the client's DMA map, shared by the server (which changes it) and
/// devices (which access memory through it).
///
/// Holds no client fd: each fd is closed once mapped. DMA mappings that lie in the same 1 GiB
/// chunk of the same file share one mapping of it (a guest vIOMMU maps its RAM page by page:
/// 262,144 DMA_MAPs for 1 GiB, each with an fd, become one mmap). Map, unmap and lookup are
/// O(log n) in the number of mappings.
#[derive(Debug, Clone, Default)]
pub struct DmaSpace {
    inner: Arc<RwLock<Maps>>,
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

/// Upper bound of simultaneous mappings per client (2^20, four times what a guest mapping
/// 1 GiB in 4 KiB pages needs); one more is refused with `ENOSPC`. Each costs about 80 bytes of
/// server memory (docs/security.md), so a client holding all of them costs ~85 MB.
pub const MAX_MAPPINGS: usize = 1 << 20;

/// `max_dma_maps` when the client's VERSION does not name one (the protocol's default).
pub const DEFAULT_CLIENT_MAX_DMA_MAPS: u64 = 65535;

/// The `max_dma_maps` the server replies at VERSION: what it holds ([`MAX_MAPPINGS`]), but no
/// more than the client offered (`client`, or the protocol default 65535 when it named none).
/// QEMU 11.1 refuses a device whose reply raises its own value ("max_dma_maps too large": the
/// server "can only lower it", hw/vfio-user/proxy.c `check_max_dma`), and it offers 65535; it
/// does not limit its own DMA_MAPs by the value (a vIOMMU guest mapping 1 GiB page by page
/// sends 262,144), so the server holds [`MAX_MAPPINGS`] whatever it advertised.
pub fn advertised_max_dma_maps(client: Option<u64>) -> u64 {
    client
        .unwrap_or(DEFAULT_CLIENT_MAX_DMA_MAPS)
        .min(MAX_MAPPINGS as u64)
}

const PAGE: u64 = 4096;

impl DmaSpace {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, Maps> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, Maps> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Add a mapping. With `fd`, the server maps `size` bytes of it at `offset` (shared, with the
    /// protection the client granted) and closes the fd.
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
        let mut maps = self.write_lock();
        if maps.by_iova.len() >= MAX_MAPPINGS {
            return Err(DmaError::TooMany(MAX_MAPPINGS));
        }
        if maps.overlaps(iova, end) {
            return Err(DmaError::Overlap { iova, size });
        }
        let backing = match fd {
            None => None,
            // The fd is closed when `file` drops at the end of this call.
            Some((fd, offset)) => Some(backing_for(
                &mut maps,
                File::from(fd),
                offset,
                iova,
                size,
                prot,
            )?),
        };
        maps.by_iova.insert(
            iova,
            Mapping {
                size,
                prot,
                backing,
            },
        );
        Ok(())
    }

    /// Remove every mapping inside `iova..iova+size`; returns the removed ranges.
    pub fn unmap(&self, iova: u64, size: u64) -> Result<Vec<MappingInfo>, DmaError> {
        let end = range_end(iova, size).ok_or(DmaError::BadRange { iova, size })?;
        let start = u128::from(iova);
        let mut maps = self.write_lock();
        let last = u64::try_from(end.saturating_sub(1)).unwrap_or(u64::MAX);
        // Only the mappings at either edge can straddle it.
        let split = [iova.checked_sub(1), Some(last)]
            .into_iter()
            .flatten()
            .filter_map(|at| maps.at_or_before(at))
            .find(|&(k, m)| {
                let ms = u128::from(k);
                ms < end && start < end_of(k, m) && (ms < start || end_of(k, m) > end)
            });
        if let Some((mapping, _)) = split {
            return Err(DmaError::SplitsMapping {
                iova,
                size,
                mapping,
            });
        }
        if size == 0 {
            return Ok(Vec::new());
        }
        let keys: Vec<u64> = maps.by_iova.range(iova..=last).map(|(&k, _)| k).collect();
        let mut removed = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(m) = maps.by_iova.remove(&k) {
                removed.push(info(k, &m));
                maps.release(&m);
            }
        }
        Ok(removed)
    }

    /// Remove every mapping (unmap-all flag, or the client went away).
    pub fn unmap_all(&self) -> Vec<MappingInfo> {
        let mut maps = self.write_lock();
        let removed = maps.by_iova.iter().map(|(&k, m)| info(k, m)).collect();
        maps.by_iova.clear();
        maps.chunks.clear();
        removed
    }

    /// The current mappings, sorted by IOVA.
    pub fn mappings(&self) -> Vec<MappingInfo> {
        self.read_lock()
            .by_iova
            .iter()
            .map(|(&k, m)| info(k, m))
            .collect()
    }

    /// How many mappings there are.
    pub fn len(&self) -> usize {
        self.read_lock().by_iova.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    /// Device write of `len` bytes at `iova` whose byte `i` is `pattern[i % pattern.len()]`
    /// (a fill), with the same rules as [`DmaSpace::write`]: the whole range inside one
    /// fd-backed writable mapping, checked before any byte moves. Then `then(&result)` while
    /// the mappings are still held (see [`DmaSpace::read_then`]). A short pattern repeated
    /// stays in the CPU's L1 cache however long the range: copying the same bytes from a
    /// buffer as long as the range (64 KiB) costs about twice the stores alone.
    pub fn write_repeat_then(
        &self,
        iova: u64,
        len: usize,
        pattern: &[u8],
        then: impl FnOnce(&Result<(), DmaError>),
    ) -> Result<(), DmaError> {
        let maps = self.read_lock();
        let r = write_repeat_in(&maps, iova, len, pattern);
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
    /// [`DmaError::BadRange`]: memmove order is the caller's business. A mapping whose file
    /// the client truncated during the copy fails it with [`DmaError::Truncated`] (some bytes
    /// may have moved).
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

/// The backing of a new mapping of `size` bytes at `offset` in `file`: the shared chunk it
/// lies in (mapped now if it is not yet), or a window of its own.
fn backing_for(
    maps: &mut Maps,
    file: File,
    offset: u64,
    iova: u64,
    size: u64,
    prot: u32,
) -> Result<(Arc<Backing>, usize), DmaError> {
    let fail = |reason: String| DmaError::Mmap { iova, size, reason };
    // Refuse a file shorter than the mapping: touching a page past its end would raise SIGBUS.
    let meta = file.metadata().map_err(|e| fail(format!("fstat: {e}")))?;
    let len = meta.len();
    let end = offset
        .checked_add(size)
        .ok_or_else(|| fail("offset + size overflows".into()))?;
    if end > len {
        return Err(fail(format!(
            "file is {len:#x} bytes, mapping needs {end:#x}"
        )));
    }
    if !offset.is_multiple_of(PAGE) {
        return Err(fail(format!("file offset {offset:#x} is not page aligned")));
    }
    let mut mprot = 0;
    if prot & PROT_READ != 0 {
        mprot |= libc::PROT_READ;
    }
    if prot & PROT_WRITE != 0 {
        mprot |= libc::PROT_WRITE;
    }
    let ft = meta.file_type();
    let chunk = offset / CHUNK;
    // Regular files (memfd, tmpfs, hugetlbfs, disk files) only: a device file's mmap may not
    // behave like memory beyond the window asked for.
    let shareable = ft.is_file() && (end - 1) / CHUNK == chunk;
    if shareable {
        let key = (meta.dev(), meta.ino(), mprot, chunk);
        let chunk_start = chunk * CHUNK;
        if let Some(b) = maps.chunks.get(&key) {
            let off = offset - b.file_offset;
            if off + size <= b.map.len() as u64 {
                return Ok((b.clone(), off as usize));
            }
            // The file grew since the chunk was mapped: map it again at its new length (the
            // old chunk lives on while mappings use it).
        }
        let chunk_len = (len - chunk_start).min(CHUNK);
        if crate::shm::mapped_bytes() + chunk_len <= CHUNK_BUDGET {
            let b = Arc::new(new_backing(
                &file,
                chunk_start,
                chunk_len,
                mprot,
                iova,
                size,
            )?);
            maps.chunks.insert(key, b.clone());
            return Ok((b, (offset - chunk_start) as usize));
        }
    }
    let b = Arc::new(new_backing(&file, offset, size, mprot, iova, size)?);
    Ok((b, 0))
}

fn new_backing(
    file: &File,
    offset: u64,
    len: u64,
    mprot: i32,
    iova: u64,
    size: u64,
) -> Result<Backing, DmaError> {
    let fail = |reason: String| DmaError::Mmap { iova, size, reason };
    let n = usize::try_from(len).map_err(|_| fail("size exceeds the address space".into()))?;
    let map = SharedMap::new(file, offset, n, mprot).map_err(|e| fail(format!("mmap: {e}")))?;
    if map.is_guarded() {
        log::warn!(
            "DMA map at {iova:#x}: client fd is not sealed against shrinking; if the client \
             truncates it, device accesses to it fail as DMA errors (the server survives)"
        );
    }
    Ok(Backing {
        map,
        file_offset: offset,
        reported: AtomicBool::new(false),
    })
}

fn info(iova: u64, m: &Mapping) -> MappingInfo {
    MappingInfo {
        iova,
        size: m.size,
        prot: m.prot,
        backed: m.backing.is_some(),
    }
}

/// The mapping holding all of `iova..iova+len`, with its IOVA and the offset of `iova` in it.
fn find<'a>(
    maps: &'a Maps,
    iova: u64,
    len: usize,
    dir: &'static str,
) -> Result<(u64, &'a Mapping, usize), DmaError> {
    let err = || DmaError::Unmapped { dir, iova, len };
    let end = u128::from(iova) + len as u128;
    let (k, m) = maps.at_or_before(iova).ok_or_else(err)?;
    if end > end_of(k, m) {
        return Err(err());
    }
    let off = usize::try_from(iova - k).map_err(|_| err())?;
    Ok((k, m, off))
}

/// The backing slice for `len` bytes at `off` of mapping `m`, checked for protection `need`,
/// backing and a truncation that already broke it. Errors describe the access `iova`+`alen`.
fn slice_of<'a>(
    m: &'a Mapping,
    off: usize,
    len: usize,
    need: u32,
    dir: &'static str,
    iova: u64,
    alen: usize,
) -> Result<(&'a Backing, VolatileSlice<'a>), DmaError> {
    if m.prot & need == 0 {
        return Err(DmaError::Protection {
            dir,
            iova,
            len: alen,
        });
    }
    let unmapped = || DmaError::Unmapped {
        dir,
        iova,
        len: alen,
    };
    let (b, base) = m.backing.as_ref().ok_or_else(unmapped)?;
    if let Some(e) = b.broken(dir, iova, alen) {
        return Err(e);
    }
    let s = b
        .map
        .slice(base.checked_add(off).ok_or_else(unmapped)?, len)
        .ok_or_else(unmapped)?;
    Ok((b, s))
}

/// A device read under the caller's hold of the mappings.
fn read_in(maps: &Maps, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
    let n = buf.len();
    let (_, m, off) = find(maps, iova, n, "read")?;
    let (b, s) = slice_of(m, off, n, PROT_READ, "read", iova, n)?;
    s.copy_to(buf);
    // A truncation that raced with the copy: what was read is not the client's memory.
    match b.broken("read", iova, n) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A device write under the caller's hold of the mappings.
fn write_in(maps: &Maps, iova: u64, data: &[u8]) -> Result<(), DmaError> {
    let n = data.len();
    let (_, m, off) = find(maps, iova, n, "write")?;
    let (b, s) = slice_of(m, off, n, PROT_WRITE, "write", iova, n)?;
    s.copy_from(data);
    match b.broken("write", iova, n) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A repeated-pattern write under the caller's hold of the mappings (see
/// [`DmaSpace::write_repeat_then`]).
fn write_repeat_in(maps: &Maps, iova: u64, len: usize, pattern: &[u8]) -> Result<(), DmaError> {
    if pattern.is_empty() && len > 0 {
        return Err(DmaError::BadRange {
            iova,
            size: len as u64,
        });
    }
    let (_, m, off) = find(maps, iova, len, "write")?;
    let (b, s) = slice_of(m, off, len, PROT_WRITE, "write", iova, len)?;
    let mut done = 0;
    while done < len {
        let k = pattern.len().min(len - done);
        let part = s.subslice(done, k).map_err(|_| DmaError::Unmapped {
            dir: "write",
            iova,
            len,
        })?;
        part.copy_from(&pattern[..k]);
        done += k;
    }
    match b.broken("write", iova, len) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The mapping holding `at` for a piece of a [`DmaSpace::copy`]: its IOVA, the mapping and the
/// offset of `at` in it; errors describe the whole access `iova`+`len`.
fn piece<'a>(
    maps: &'a Maps,
    at: u64,
    prot: u32,
    dir: &'static str,
    iova: u64,
    len: usize,
) -> Result<(u64, &'a Mapping, usize), DmaError> {
    let (k, m, off) = find(maps, at, 1, dir).map_err(|_| DmaError::Unmapped { dir, iova, len })?;
    slice_of(m, off, 1, prot, dir, iova, len)?;
    Ok((k, m, off))
}

/// A device copy under the caller's hold of the mappings (see [`DmaSpace::copy`]).
fn copy_in(maps: &Maps, src: u64, dst: u64, len: usize) -> Result<(), DmaError> {
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
            let (sk, sm, soff) = piece(maps, s, PROT_READ, "read", src, len)?;
            let (dk, dm, doff) = piece(maps, d, PROT_WRITE, "write", dst, len)?;
            // Bytes to the end of whichever mapping ends first (fits: both are ≤ len).
            let left = (len - done) as u128;
            let k = left
                .min(end_of(sk, sm) - u128::from(s))
                .min(end_of(dk, dm) - u128::from(d)) as usize;
            if pass == 1 {
                let (sb, from) = slice_of(sm, soff, k, PROT_READ, "read", src, len)?;
                let (db, to) = slice_of(dm, doff, k, PROT_WRITE, "write", dst, len)?;
                from.copy_to_volatile_slice(to);
                if let Some(e) = sb.broken("read", src, len) {
                    return Err(e);
                }
                if let Some(e) = db.broken("write", dst, len) {
                    return Err(e);
                }
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
    fn test_write_into_read_only_mapping_says_so() {
        // Issue 11 item 10: refused, and described as what it is, not as unmapped memory.
        let d = DmaSpace::new();
        d.map(0x4000, 0x1000, PROT_READ, Some((memfd(0x1000), 0)))
            .unwrap();
        d.map(0x8000, 0x1000, PROT_WRITE, Some((memfd(0x1000), 0)))
            .unwrap();
        let e = d.write(0x4010, &[1, 2]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "DMA write 0x4010+0x2: write to read-only mapping"
        );
        assert_eq!(e.errno(), libc::EPERM);
        let e = d.read(0x8000, &mut [0u8; 4]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "DMA read 0x8000+0x4: read of write-only mapping"
        );
        let e = d.copy(0x8000, 0x4000, 4).unwrap_err();
        assert!(e.to_string().contains("read of write-only mapping"), "{e}");
        // Unmapped memory keeps its own message.
        let e = d.write(0x20000, &[1]).unwrap_err();
        assert!(e.to_string().contains("not inside any mapped"), "{e}");
    }

    #[test]
    fn test_truncated_file_fails_accesses_as_dma_errors_not_sigbus() {
        let d = DmaSpace::new();
        let rw = PROT_READ | PROT_WRITE;
        let victim = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        victim.set_len(0x4000).unwrap();
        let fd = OwnedFd::from(victim.try_clone().unwrap());
        d.map(0x10000, 0x4000, rw, Some((fd, 0))).unwrap();
        d.map(0x40000, 0x1000, rw, Some((memfd(0x1000), 0)))
            .unwrap();
        d.write(0x13000, b"live").unwrap();
        victim.set_len(0).unwrap();
        // Without the SIGBUS guard each of these kills the test process.
        let e = d.read(0x13000, &mut [0u8; 4]).unwrap_err();
        assert!(
            matches!(
                e,
                DmaError::Truncated {
                    dir: "read",
                    iova: 0x13000,
                    len: 4
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = d.write(0x10000, &[1]).unwrap_err();
        assert!(matches!(e, DmaError::Truncated { dir: "write", .. }), "{e}");
        let e = d.copy(0x10000, 0x40000, 16).unwrap_err();
        assert!(matches!(e, DmaError::Truncated { dir: "read", .. }), "{e}");
        let e = d.copy(0x40000, 0x11000, 16).unwrap_err();
        assert!(matches!(e, DmaError::Truncated { dir: "write", .. }), "{e}");
        // Another mapping is untouched; the broken one unmaps normally.
        d.write(0x40000, b"ok").unwrap();
        assert_eq!(d.unmap(0x10000, 0x4000).unwrap().len(), 1);
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn test_page_maps_of_one_file_share_one_mapping() {
        let d = DmaSpace::new();
        let rw = PROT_READ | PROT_WRITE;
        let file = memfd(256 * PAGE);
        for p in 0..256u64 {
            let fd = file.try_clone().unwrap();
            d.map(0x100000 + p * PAGE, PAGE, rw, Some((fd, p * PAGE)))
                .unwrap();
        }
        {
            let maps = d.read_lock();
            assert_eq!(maps.chunks.len(), 1, "one shared chunk for the file");
            let (b, _) = maps
                .by_iova
                .values()
                .next()
                .unwrap()
                .backing
                .as_ref()
                .unwrap();
            assert_eq!(b.map.len() as u64, 256 * PAGE);
            assert_eq!(Arc::strong_count(b), 257);
        }
        // Page p of the IOVA range is page p of the file.
        d.write(0x100000 + 255 * PAGE + 8, b"last").unwrap();
        let mut b = [0u8; 4];
        std::os::unix::fs::FileExt::read_at(
            &File::from(file.try_clone().unwrap()),
            &mut b,
            255 * PAGE + 8,
        )
        .unwrap();
        assert_eq!(&b, b"last");
        // A read-only map of the same file is a chunk of its own (mapped PROT_READ).
        d.map(
            0x900000,
            PAGE,
            PROT_READ,
            Some((file.try_clone().unwrap(), 0)),
        )
        .unwrap();
        assert_eq!(d.read_lock().chunks.len(), 2);
        assert_eq!(d.unmap(0x100000, 128 * PAGE).unwrap().len(), 128);
        assert_eq!(
            d.read_lock().chunks.len(),
            2,
            "still used by the other half"
        );
        assert_eq!(
            d.unmap(0x100000 + 128 * PAGE, 128 * PAGE).unwrap().len(),
            128
        );
        assert_eq!(d.read_lock().chunks.len(), 1, "unmapped with its last user");
        d.unmap_all();
        assert!(d.read_lock().chunks.is_empty());
    }

    #[test]
    fn test_a_million_mappings_then_enospc() {
        // fd-less maps (no mmap per map; the shared-chunk test covers backing): the table
        // holds MAX_MAPPINGS, lookups and unmaps stay logarithmic, one more is ENOSPC.
        let d = DmaSpace::new();
        let t = std::time::Instant::now();
        for i in 0..MAX_MAPPINGS as u64 {
            d.map(i * 2 * PAGE, PAGE, PROT_READ, None).unwrap();
        }
        let e = d
            .map(u64::MAX - PAGE + 1, PAGE, PROT_READ, None)
            .unwrap_err();
        assert!(matches!(e, DmaError::TooMany(MAX_MAPPINGS)));
        assert_eq!(e.errno(), libc::ENOSPC);
        assert!(e.to_string().contains("max_dma_maps"), "{e}");
        let last = (MAX_MAPPINGS as u64 - 1) * 2 * PAGE;
        let e = d
            .map(last + PAGE / 2 * 2, PAGE, PROT_READ, None)
            .unwrap_err();
        assert!(matches!(e, DmaError::Overlap { .. } | DmaError::TooMany(_)));
        assert!(matches!(
            d.read(last, &mut [0u8; 1]),
            Err(DmaError::Unmapped { .. })
        ));
        assert_eq!(d.unmap(last, PAGE).unwrap().len(), 1);
        d.map(last + PAGE, PAGE, PROT_READ, None).unwrap();
        assert_eq!(d.unmap_all().len(), MAX_MAPPINGS);
        eprintln!("{} maps + unmap_all: {:?}", MAX_MAPPINGS, t.elapsed());
    }

    #[test]
    fn test_advertised_max_dma_maps_never_raises_the_clients() {
        // QEMU offers 65535 and refuses a larger reply.
        assert_eq!(advertised_max_dma_maps(Some(65535)), 65535);
        assert_eq!(advertised_max_dma_maps(None), 65535);
        assert_eq!(advertised_max_dma_maps(Some(16)), 16);
        // A client that accepts more learns what the server truly holds.
        assert_eq!(advertised_max_dma_maps(Some(u64::MAX)), 1 << 20);
    }

    #[test]
    fn test_unmap_edges_detect_straddling_mappings() {
        let d = DmaSpace::new();
        d.map(0x10000, 0x3000, PROT_READ, None).unwrap();
        d.map(0x20000, 0x1000, PROT_READ, None).unwrap();
        for (iova, size) in [(0x11000, 0x10000), (0x8000, 0x9000), (0x11000, 0x1000)] {
            assert!(
                matches!(
                    d.unmap(iova, size),
                    Err(DmaError::SplitsMapping {
                        mapping: 0x10000,
                        ..
                    })
                ),
                "{iova:#x}+{size:#x}"
            );
        }
        assert_eq!(d.unmap(0x13000, 0x10000).unwrap().len(), 1);
        assert_eq!(d.mappings()[0].iova, 0x10000);
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
    fn test_write_repeat_fills_with_the_pattern_or_writes_nothing() {
        let d = DmaSpace::new();
        let rw = PROT_READ | PROT_WRITE;
        d.map(0x10000, 0x3000, rw, Some((memfd(0x3000), 0)))
            .unwrap();
        d.map(0x13000, 0x1000, rw, Some((memfd(0x1000), 0)))
            .unwrap();
        d.map(0x20000, 0x1000, PROT_READ, Some((memfd(0x1000), 0)))
            .unwrap();
        let pattern: Vec<u8> = (0..24u8).collect();
        let mut seen = None;
        d.write_repeat_then(0x10010, 0x2100, &pattern, |r| seen = Some(r.is_ok()))
            .unwrap();
        assert_eq!(seen, Some(true));
        let mut b = vec![0u8; 0x2120];
        d.read(0x10000, &mut b).unwrap();
        assert!(b[..0x10].iter().all(|&x| x == 0));
        assert!(b[0x10..0x2110]
            .iter()
            .enumerate()
            .all(|(i, &x)| x == pattern[i % 24]));
        assert!(b[0x2110..].iter().all(|&x| x == 0));
        // Across the mapping boundary, read-only, empty pattern: nothing written.
        let e = d
            .write_repeat_then(0x12000, 0x2000, &[7; 8], |_| ())
            .unwrap_err();
        assert!(matches!(e, DmaError::Unmapped { dir: "write", .. }));
        let e = d
            .write_repeat_then(0x20000, 0x10, &[7; 8], |_| ())
            .unwrap_err();
        assert!(matches!(e, DmaError::Protection { dir: "write", .. }));
        assert!(d.write_repeat_then(0x10000, 8, &[], |_| ()).is_err());
        let mut b = vec![0u8; 0xef0];
        d.read(0x12110, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        let mut b = vec![0u8; 0x1000];
        d.read(0x13000, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
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
