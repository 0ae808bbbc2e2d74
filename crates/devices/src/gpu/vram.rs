//! VRAM: a memfd the server maps (MAP_SHARED) for its own accesses and offers to the client
//! for direct mapping. Pages cost nothing until touched.
//!
//! The memfd is sealed against shrinking, growing and further sealing before anyone else sees
//! it: every client gets it read-write (GET_REGION_INFO), and one that could `ftruncate` it
//! would make the server's next VRAM access raise SIGBUS (killing every device of the process);
//! one that could add F_SEAL_WRITE / F_SEAL_FUTURE_WRITE would stop VRAM discards and the next
//! client's writable mapping.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use pcisim_vfio_user::{RegionMmap, SparseArea};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use super::{fill_byte, fnv1a64_update, FNV1A64_OFFSET_BASIS};

/// Chunk size for checksum and fill passes.
const CHUNK: usize = 64 << 10;

/// Errors of VRAM creation and access.
#[derive(Debug, thiserror::Error)]
pub enum VramError {
    /// The size is not a power of two of at least 4 KiB (or does not fit the address space).
    #[error("VRAM size {0:#x} is not a power of two >= 4 KiB")]
    BadSize(u64),
    /// memfd_create or ftruncate failed.
    #[error("Creating the VRAM memfd failed")]
    Memfd(#[source] io::Error),
    /// Mapping the memfd failed.
    #[error("Mapping VRAM failed: {0}")]
    Mmap(String),
    /// An access outside VRAM.
    #[error("VRAM access at {offset:#x}+{len:#x} is out of range")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

/// The GPU's VRAM.
#[derive(Debug)]
pub struct Vram {
    fd: Arc<OwnedFd>,
    map: MmapRegion,
    size: u64,
}

impl Vram {
    /// Smallest VRAM size.
    pub const MIN_SIZE: u64 = 4096;

    /// Create `size` bytes of VRAM (a power of two ≥ 4 KiB), zero-filled.
    pub fn new(size: u64) -> Result<Vram, VramError> {
        let len = usize::try_from(size).map_err(|_| VramError::BadSize(size))?;
        if !size.is_power_of_two() || size < Self::MIN_SIZE {
            return Err(VramError::BadSize(size));
        }
        // SAFETY: the name is a valid NUL-terminated string; memfd_create touches no other
        // memory of ours.
        let raw = unsafe {
            libc::memfd_create(
                c"pcisim-vram".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(VramError::Memfd(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly created descriptor nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        file.set_len(size).map_err(VramError::Memfd)?;
        // SAFETY: fcntl(F_ADD_SEALS) on our own open fd; it only changes the file's seals.
        let sealed = unsafe {
            libc::fcntl(
                raw,
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if sealed != 0 {
            return Err(VramError::Memfd(io::Error::last_os_error()));
        }
        let clone = file.try_clone().map_err(VramError::Memfd)?;
        let map = MmapRegion::from_file(FileOffset::new(clone, 0), len)
            .map_err(|e| VramError::Mmap(e.to_string()))?;
        Ok(Vram {
            fd: Arc::new(OwnedFd::from(file)),
            map,
            size,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd backing VRAM.
    pub fn fd(&self) -> &Arc<OwnedFd> {
        &self.fd
    }

    /// How the client may map VRAM: one sparse area covering all of it.
    pub fn region_mmap(&self) -> RegionMmap {
        RegionMmap {
            fd: self.fd.clone(),
            file_offset: 0,
            areas: vec![SparseArea {
                offset: 0,
                size: self.size,
            }],
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(usize, usize), VramError> {
        let oor = VramError::OutOfRange { offset, len };
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok((
                usize::try_from(offset).map_err(|_| VramError::OutOfRange { offset, len })?,
                usize::try_from(len).map_err(|_| VramError::OutOfRange { offset, len })?,
            )),
            _ => Err(oor),
        }
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VramError> {
        let (off, len) = self.check(offset, buf.len() as u64)?;
        let slice = self
            .map
            .get_slice(off, len)
            .map_err(|_| VramError::OutOfRange {
                offset,
                len: len as u64,
            })?;
        slice.copy_to(buf);
        Ok(())
    }

    /// Write `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), VramError> {
        let (off, len) = self.check(offset, data.len() as u64)?;
        let slice = self
            .map
            .get_slice(off, len)
            .map_err(|_| VramError::OutOfRange {
                offset,
                len: len as u64,
            })?;
        slice.copy_from(data);
        Ok(())
    }

    /// FNV-1a-64 over `len` bytes at `offset`.
    pub fn checksum(&self, offset: u64, len: u64) -> Result<u64, VramError> {
        self.check(offset, len)?;
        let mut buf = vec![0u8; CHUNK];
        let mut h = FNV1A64_OFFSET_BASIS;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let chunk = buf
                .get_mut(..n)
                .ok_or(VramError::OutOfRange { offset, len })?;
            self.read(offset + done, chunk)?;
            h = fnv1a64_update(h, chunk);
            done += n as u64;
        }
        Ok(h)
    }

    /// Write the FILL pattern for `seed` over `len` bytes at `offset` (byte `i` of the window
    /// is `fill_byte(seed, i)`).
    pub fn fill(&self, offset: u64, len: u64, seed: u32) -> Result<(), VramError> {
        self.check(offset, len)?;
        let mut buf = vec![0u8; CHUNK];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let chunk = buf
                .get_mut(..n)
                .ok_or(VramError::OutOfRange { offset, len })?;
            for (k, b) in chunk.iter_mut().enumerate() {
                *b = fill_byte(seed, done + k as u64);
            }
            self.write(offset + done, chunk)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Zero VRAM and give its pages back to the system (punch a hole over the whole memfd).
    pub fn discard(&self) -> Result<(), VramError> {
        fallocate(&*self.fd, FallocateMode::PunchHole, true, 0, self.size)
            .map_err(|e| VramError::Memfd(io::Error::from_raw_os_error(e.errno())))
    }
}
