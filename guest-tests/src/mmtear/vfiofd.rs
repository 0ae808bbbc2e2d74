//! The vfio fd boundary: container, group and device fds of the legacy vfio API, DMA
//! mapping of our own pages, and the marker pages the host correlates with.

use crate::sys;
use crate::vdev::{PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY};
use crate::vfio::{
    self, ioctl_ptr, ioctl_val, open_rw, DeviceInfo, DmaMap, GroupStatus, RegionInfo,
};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

use super::{Layout, PAGE};

/// A new container with the type1v2 IOMMU available.
pub(super) fn open_container() -> Result<OwnedFd, String> {
    let c = OwnedFd::from(open_rw("/dev/vfio/vfio")?);
    let api = ioctl_val(
        &c.as_fd(),
        vfio::VFIO_GET_API_VERSION,
        0,
        "VFIO_GET_API_VERSION",
    )?;
    if api != vfio::VFIO_API_VERSION {
        return Err(format!("VFIO_GET_API_VERSION returned {api}"));
    }
    let ext = ioctl_val(
        &c.as_fd(),
        vfio::VFIO_CHECK_EXTENSION,
        libc::c_ulong::from(vfio::VFIO_TYPE1V2_IOMMU),
        "VFIO_CHECK_EXTENSION",
    )?;
    if ext <= 0 {
        return Err("VFIO_CHECK_EXTENSION(VFIO_TYPE1v2_IOMMU) is false".into());
    }
    Ok(c)
}

/// Opens group `group` and attaches it to `container` (type1v2).
pub(super) fn attach_group(container: BorrowedFd<'_>, group: &str) -> Result<OwnedFd, String> {
    let g = OwnedFd::from(open_rw(&format!("/dev/vfio/{group}"))?);
    let mut st = GroupStatus {
        argsz: std::mem::size_of::<GroupStatus>() as u32,
        flags: 0,
    };
    // SAFETY: VFIO_GROUP_GET_STATUS reads/writes a vfio_group_status of argsz bytes.
    unsafe {
        ioctl_ptr(
            &g.as_fd(),
            vfio::VFIO_GROUP_GET_STATUS,
            &mut st,
            "VFIO_GROUP_GET_STATUS",
        )
    }?;
    if st.flags & vfio::VFIO_GROUP_FLAGS_VIABLE == 0 {
        return Err(format!("group {group} not viable (flags 0x{:x})", st.flags));
    }
    let mut fd: i32 = container.as_raw_fd();
    // SAFETY: VFIO_GROUP_SET_CONTAINER reads one __s32 through the pointer.
    unsafe {
        ioctl_ptr(
            &g.as_fd(),
            vfio::VFIO_GROUP_SET_CONTAINER,
            &mut fd,
            "VFIO_GROUP_SET_CONTAINER",
        )
    }?;
    ioctl_val(
        &container,
        vfio::VFIO_SET_IOMMU,
        libc::c_ulong::from(vfio::VFIO_TYPE1V2_IOMMU),
        "VFIO_SET_IOMMU",
    )?;
    Ok(g)
}

/// `VFIO_GROUP_GET_DEVICE_FD` for `bdf`.
pub(super) fn get_device(group: BorrowedFd<'_>, bdf: &str) -> Result<File, String> {
    let mut name = std::ffi::CString::new(bdf)
        .map_err(|_| format!("{bdf:?} contains NUL"))?
        .into_bytes_with_nul();
    // SAFETY: the kernel reads a NUL-terminated string from the live, NUL-terminated buffer.
    let fd = unsafe {
        ioctl_ptr(
            &group,
            vfio::VFIO_GROUP_GET_DEVICE_FD,
            name.as_mut_ptr(),
            "VFIO_GROUP_GET_DEVICE_FD",
        )
    }?;
    // SAFETY: on success the ioctl returned a new descriptor that we own.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// `VFIO_IOMMU_MAP_DMA` of `pages` at `iova`, read/write.
pub(super) fn map_dma(container: BorrowedFd<'_>, pages: &Pages, iova: u64) -> Result<(), String> {
    let mut m = DmaMap {
        argsz: std::mem::size_of::<DmaMap>() as u32,
        flags: vfio::VFIO_DMA_MAP_FLAG_READ | vfio::VFIO_DMA_MAP_FLAG_WRITE,
        vaddr: pages.ptr.as_ptr() as u64,
        iova,
        size: pages.len as u64,
    };
    // SAFETY: the kernel reads a vfio_iommu_type1_dma_map of argsz bytes. The memory it names
    // is a `Pages` mapping, which is never unmapped while DMA-mapped (see `Pages`).
    unsafe {
        ioctl_ptr(
            &container,
            vfio::VFIO_IOMMU_MAP_DMA,
            &mut m,
            "VFIO_IOMMU_MAP_DMA",
        )
    }?;
    Ok(())
}

/// The open vfio objects of a worker, as raw fds it may pass on or close.
pub(super) struct Handles {
    pub(super) container: OwnedFd,
    pub(super) group: OwnedFd,
    pub(super) device: File,
    pub(super) bar0: RegionInfo,
    pub(super) config: RegionInfo,
}

impl Handles {
    /// Opens container, group and device (legacy API, type1v2).
    pub(super) fn open(bdf: &str, group: &str) -> Result<Handles, String> {
        let container = open_container()?;
        let group = attach_group(container.as_fd(), group)?;
        let device = get_device(group.as_fd(), bdf)?;
        Handles::from_parts(container, group, device)
    }

    /// Wraps fds opened elsewhere (received over a socket) and reads the regions.
    pub(super) fn from_parts(
        container: OwnedFd,
        group: OwnedFd,
        device: File,
    ) -> Result<Handles, String> {
        let mut info = DeviceInfo {
            argsz: std::mem::size_of::<DeviceInfo>() as u32,
            ..Default::default()
        };
        // SAFETY: VFIO_DEVICE_GET_INFO accesses at most argsz bytes of a vfio_device_info.
        unsafe {
            ioctl_ptr(
                &device.as_fd(),
                vfio::VFIO_DEVICE_GET_INFO,
                &mut info,
                "VFIO_DEVICE_GET_INFO",
            )
        }?;
        if info.flags & vfio::VFIO_DEVICE_FLAGS_PCI == 0
            || info.num_regions <= vfio::VFIO_PCI_CONFIG_REGION_INDEX
        {
            return Err(format!(
                "not a vfio PCI device with a config region (flags 0x{:x}, {} regions)",
                info.flags, info.num_regions
            ));
        }
        let bar0 = vfio::region_info(&device, vfio::VFIO_PCI_BAR0_REGION_INDEX)?;
        let config = vfio::region_info(&device, vfio::VFIO_PCI_CONFIG_REGION_INDEX)?;
        let rw = vfio::VFIO_REGION_INFO_FLAG_READ | vfio::VFIO_REGION_INFO_FLAG_WRITE;
        if bar0.flags & rw != rw || bar0.size < PAGE as u64 || config.flags & rw != rw {
            return Err(format!(
                "BAR0 (flags 0x{:x}, size 0x{:x}) or config (flags 0x{:x}) not read/write",
                bar0.flags, bar0.size, config.flags
            ));
        }
        Ok(Handles {
            container,
            group,
            device,
            bar0,
            config,
        })
    }

    /// Command |= Memory Space | Bus Master through the config region.
    pub(super) fn enable_command(&self) -> Result<u16, String> {
        let off = self.config.offset + PCI_COMMAND;
        let mut b = [0u8; 2];
        self.device
            .read_exact_at(&mut b, off)
            .map_err(|e| format!("read Command: {e}"))?;
        let want = u16::from_le_bytes(b) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        self.device
            .write_all_at(&want.to_le_bytes(), off)
            .map_err(|e| format!("write Command: {e}"))?;
        self.device
            .read_exact_at(&mut b, off)
            .map_err(|e| format!("read Command: {e}"))?;
        let after = u16::from_le_bytes(b);
        if after & (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
            != PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        {
            return Err(format!(
                "Command reads 0x{after:04x} after writing 0x{want:04x}"
            ));
        }
        Ok(after)
    }
}

/// Anonymous, populated, private memory that stays mapped until the process exits: a worker
/// never unmaps it (exiting with it mapped for the device is what the scenarios are about), so
/// a DMA mapping of it can never outlive the memory. [`Pages::free`] is for memory whose DMA
/// mapping was removed.
pub(super) struct Pages {
    pub(super) ptr: NonNull<u8>,
    pub(super) len: usize,
}

impl Pages {
    pub(super) fn new(len: usize) -> Result<Pages, String> {
        let ptr = sys::mmap_anon_populated(len)?;
        Ok(Pages { ptr, len })
    }

    /// `len` bytes (a multiple of 2 MiB) at a 2 MiB-aligned address, backed by transparent
    /// huge pages where the kernel can: pinned for DMA, each huge page is one IOMMU
    /// superpage mapping, i.e. one DMA_MAP for the device instead of 512.
    pub(super) fn new_huge(len: usize) -> Result<Pages, String> {
        const HUGE: usize = 2 << 20;
        if len == 0 || len % HUGE != 0 {
            return Err(format!("{len:#x} is not a multiple of 2 MiB"));
        }
        let span = len + HUGE;
        let p = sys::mmap_anon(span)?.cast::<libc::c_void>();
        let start = p as usize;
        let aligned = start.next_multiple_of(HUGE);
        let (head, tail) = (aligned - start, start + span - (aligned + len));
        // SAFETY: the head and tail are the parts of our own new mapping outside
        // `aligned..aligned+len`; nothing refers to them.
        unsafe {
            if head > 0 {
                libc::munmap(p, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        // SAFETY: advice on our own mapping; failure only means small pages.
        unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        let ptr = NonNull::new(aligned as *mut u8).ok_or("mmap returned NULL")?;
        let pages = Pages { ptr, len };
        // Populate (after the advice, so that the faults allocate huge pages).
        for off in (0..len).step_by(PAGE) {
            pages.write(off, &[0])?;
        }
        Ok(pages)
    }

    pub(super) fn write(&self, off: usize, data: &[u8]) -> Result<(), String> {
        if off.checked_add(data.len()).map_or(true, |e| e > self.len) {
            return Err(format!("write {off:#x}+{:#x} out of bounds", data.len()));
        }
        for (i, &b) in data.iter().enumerate() {
            // SAFETY: in bounds (checked above) of our live mapping.
            unsafe { self.ptr.as_ptr().add(off + i).write_volatile(b) };
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The little-endian u32 at `off` (the device may write it at any time: volatile).
    pub(super) fn read_u32(&self, off: usize) -> Result<u32, String> {
        if off % 4 != 0 || off.checked_add(4).map_or(true, |e| e > self.len) {
            return Err(format!("read u32 at {off:#x} out of bounds"));
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: aligned (page-aligned base, 4-aligned offset) and in bounds of our mapping.
        let v = unsafe { self.ptr.as_ptr().add(off).cast::<u32>().read_volatile() };
        Ok(u32::from_le(v))
    }

    /// Unmaps memory that no DMA mapping refers to any more.
    pub(super) fn free(self) {
        // SAFETY: `ptr..ptr+len` is our own mapping; the caller removed its DMA mapping, and
        // `self` is consumed, so nothing refers to it afterwards.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Maps a fresh marker page at the layout's marker `n`.
pub(super) fn mark(container: BorrowedFd<'_>, layout: &Layout, n: u64) -> Result<(), String> {
    let p = Pages::new(PAGE)?;
    map_dma(container, &p, layout.mark(n)).map_err(|e| format!("marker {n}: {e}"))
}

// -- registers and the ring -------------------------------------------------------------------
