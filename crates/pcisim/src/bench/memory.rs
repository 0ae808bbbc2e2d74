//! Client memory for the DMA figures: sealed memfds as QEMU's memory backend makes them, this
//! process's own shared mappings of them (the floors touch exactly the pages the device does)
//! the fd a DMA_MAP sends, and attaching a client's DMA map to an in-process endpoint.

use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{Context, Result};
use pcisim_vfio_user::{ClientLink, Device, DmaSpace, Interrupts};

/// A memfd of `len` bytes sealed against shrinking, as QEMU's memory backend makes them.
pub(super) fn memfd(len: u64) -> Result<std::fs::File> {
    // SAFETY: the name is a valid NUL-terminated string; memfd_create touches no other memory.
    let raw = unsafe {
        libc::memfd_create(
            c"pcisim-bench".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: memfd_create returned a new fd that nothing else owns.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let f = std::fs::File::from(fd);
    f.set_len(len)?;
    // SAFETY: fcntl(F_ADD_SEALS) on our open memfd only changes its seals.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } < 0 {
        return Err(std::io::Error::last_os_error()).context("sealing the memfd");
    }
    Ok(f)
}

/// Our own shared mapping of a memfd (the floors touch exactly the pages the device does).
pub(super) struct Mapping {
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
}

impl Mapping {
    pub(super) fn new(f: &std::fs::File, len: usize) -> Result<Mapping> {
        // SAFETY: a fresh shared mapping of `len` bytes of an fd that is at least that long
        // (we sized it); the kernel picks the address, nothing else is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap");
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// memcpy `len` bytes from `self` at 0 to `to` at 0.
    pub(super) fn copy_to(&self, to: &Mapping, len: usize) {
        let len = len.min(self.len).min(to.len);
        // SAFETY: both ranges lie inside live mappings of distinct memfds, so they do not
        // overlap; no Rust reference to either exists (the device writes them through its own
        // mappings, never while the floor runs).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, to.ptr, len) };
        // The memory is only ever read by someone the compiler cannot see: keep every copy.
        std::hint::black_box(to.ptr);
    }

    /// memset `len` bytes at `at` to `v`.
    pub(super) fn fill(&self, at: usize, len: usize, v: u8) {
        if at.checked_add(len).is_some_and(|e| e <= self.len) {
            // SAFETY: the range lies inside the live mapping (checked); no Rust reference to
            // it exists.
            unsafe { std::ptr::write_bytes(self.ptr.add(at), v, len) };
            std::hint::black_box(self.ptr);
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping `new` made, once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

pub(super) fn dma_fd(f: &std::fs::File) -> Result<(OwnedFd, u64)> {
    Ok((OwnedFd::from(f.try_clone()?), 0))
}

/// Attach `dma` to `ep` as a client does (interrupt eventfds included), tell the device about
/// every mapping as the server does (its journal checks every DMA against them), and turn on
/// Memory Space and Bus Master in Command, as a driver would before using the device.
pub(super) fn attach_client(ep: &mut impl Device, dma: &DmaSpace) -> Result<()> {
    ep.attach(ClientLink {
        irqs: Interrupts::new(&[1, 0, 16, 1, 1]),
        dma: dma.clone(),
    });
    for m in dma.mappings() {
        ep.dma_mapped(&m);
    }
    ep.region_write(7, 4, &0x0006u16.to_le_bytes())?;
    Ok(())
}
