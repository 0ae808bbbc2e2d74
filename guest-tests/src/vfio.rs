//! The legacy VFIO container/group API, defined here from the Linux uapi header
//! `include/uapi/linux/vfio.h` (no bindings crate: the guest binary stays small
//! and the numbers are checked by unit tests against the header's definitions).
//!
//! Every ioctl is `_IO(VFIO_TYPE, VFIO_BASE + n)`: direction none and size 0,
//! i.e. `(';' << 8) | (100 + n)` on every architecture with the generic
//! `_IOC` layout (x86 included); the argument structs carry their own `argsz`.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

pub const VFIO_API_VERSION: i32 = 0;
pub const VFIO_TYPE1V2_IOMMU: u32 = 3;

const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;

/// `_IO(VFIO_TYPE, VFIO_BASE + n)`
const fn vfio_io(n: u32) -> u32 {
    (VFIO_TYPE << 8) | (VFIO_BASE + n)
}

pub const VFIO_GET_API_VERSION: u32 = vfio_io(0);
pub const VFIO_CHECK_EXTENSION: u32 = vfio_io(1);
pub const VFIO_SET_IOMMU: u32 = vfio_io(2);
pub const VFIO_GROUP_GET_STATUS: u32 = vfio_io(3);
pub const VFIO_GROUP_SET_CONTAINER: u32 = vfio_io(4);
pub const VFIO_GROUP_UNSET_CONTAINER: u32 = vfio_io(5);
pub const VFIO_GROUP_GET_DEVICE_FD: u32 = vfio_io(6);
pub const VFIO_DEVICE_GET_INFO: u32 = vfio_io(7);
pub const VFIO_DEVICE_GET_REGION_INFO: u32 = vfio_io(8);
pub const VFIO_DEVICE_GET_IRQ_INFO: u32 = vfio_io(9);
pub const VFIO_DEVICE_SET_IRQS: u32 = vfio_io(10);
pub const VFIO_DEVICE_RESET: u32 = vfio_io(11);
pub const VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: u32 = vfio_io(12);
/// Same number as `VFIO_IOMMU_MAP_DMA`: one is a device ioctl, the other a container one.
pub const VFIO_DEVICE_PCI_HOT_RESET: u32 = vfio_io(13);
pub const VFIO_IOMMU_MAP_DMA: u32 = vfio_io(13);
pub const VFIO_IOMMU_UNMAP_DMA: u32 = vfio_io(14);

pub const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
pub const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;

pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;
pub const VFIO_GROUP_FLAGS_CONTAINER_SET: u32 = 1 << 1;

pub const VFIO_DEVICE_FLAGS_RESET: u32 = 1 << 0;
pub const VFIO_DEVICE_FLAGS_PCI: u32 = 1 << 1;

pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;

pub const VFIO_IRQ_INFO_EVENTFD: u32 = 1 << 0;

pub const VFIO_IRQ_SET_DATA_NONE: u32 = 1 << 0;
pub const VFIO_IRQ_SET_DATA_BOOL: u32 = 1 << 1;
pub const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
pub const VFIO_IRQ_SET_ACTION_MASK: u32 = 1 << 3;
pub const VFIO_IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
pub const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

/// `VFIO_PCI_BAR0_REGION_INDEX`
pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
/// `VFIO_PCI_CONFIG_REGION_INDEX` (after BAR0-5 and the ROM)
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
/// `VFIO_PCI_MSIX_IRQ_INDEX` (after INTx and MSI)
pub const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;

/// `struct vfio_group_status`
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct GroupStatus {
    pub argsz: u32,
    pub flags: u32,
}

/// `struct vfio_device_info`. Kernels before 6.? end it at `cap_offset` (20
/// bytes); later ones add `pad` (24 bytes). The kernel only requires argsz to
/// cover `num_irqs`, so 24 works with both.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct DeviceInfo {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
    pub cap_offset: u32,
    pub pad: u32,
}

/// `struct vfio_region_info`
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

/// `struct vfio_irq_info`
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

/// `struct vfio_iommu_type1_dma_map`
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct DmaMap {
    pub argsz: u32,
    pub flags: u32,
    pub vaddr: u64,
    pub iova: u64,
    pub size: u64,
}

/// `struct vfio_iommu_type1_dma_unmap` (without the trailing `data[]`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub iova: u64,
    pub size: u64,
}

/// Size of the fixed part of `struct vfio_irq_set` (argsz, flags, index, start,
/// count); the data (`__u8 data[]`) follows.
pub const IRQ_SET_HEADER: usize = 20;

/// Builds a `struct vfio_irq_set` with `fds` (s32 each) as data, as u32 words
/// (so the buffer is suitably aligned).
pub fn irq_set_buf(flags: u32, index: u32, start: u32, count: u32, fds: &[i32]) -> Vec<u32> {
    let argsz = (IRQ_SET_HEADER + 4 * fds.len()) as u32;
    let mut v = vec![argsz, flags, index, start, count];
    v.extend(fds.iter().map(|&fd| fd as u32));
    v
}

/// `ioctl(fd, req, value)` for requests whose argument is an integer.
pub(crate) fn ioctl_val(
    fd: &impl AsRawFd,
    req: u32,
    arg: libc::c_ulong,
    what: &str,
) -> Result<i32, String> {
    // SAFETY: the request takes its argument by value (no memory is accessed
    // through it); the fd is borrowed for the call; the result is checked.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::Ioctl::from(req), arg) };
    if r < 0 {
        Err(crate::sys::last_err(what))
    } else {
        Ok(r)
    }
}

/// `ioctl(fd, req, &mut arg)` for requests taking a pointer to `T`.
///
/// # Safety
/// `req` must be a request whose kernel handler accesses at most
/// `size_of::<T>()` bytes through the pointer (for VFIO: at most `argsz`, which
/// the caller sets to the size of `T`).
pub(crate) unsafe fn ioctl_ptr<T>(
    fd: &impl AsRawFd,
    req: u32,
    arg: *mut T,
    what: &str,
) -> Result<i32, String> {
    // SAFETY: per this function's contract, `arg` points to a live `T` that the
    // kernel accesses within bounds; the fd is borrowed for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::Ioctl::from(req), arg) };
    if r < 0 {
        Err(crate::sys::last_err(what))
    } else {
        Ok(r)
    }
}

/// `VFIO_IOMMU_UNMAP_DMA` of `iova..iova+size` on a container fd; returns the number of bytes
/// unmapped: [`Container::unmap_dma`], and for programs that hold the container fd as a plain
/// fd (mm-teardown passes it between processes).
pub(crate) fn unmap_dma(container: &impl AsRawFd, iova: u64, size: u64) -> Result<u64, String> {
    let mut u = DmaUnmap {
        argsz: std::mem::size_of::<DmaUnmap>() as u32,
        flags: 0,
        iova,
        size,
    };
    // SAFETY: VFIO_IOMMU_UNMAP_DMA reads and writes a vfio_iommu_type1_dma_unmap of
    // argsz bytes (no bitmap: flags 0).
    unsafe {
        ioctl_ptr(
            container,
            VFIO_IOMMU_UNMAP_DMA,
            &mut u,
            "VFIO_IOMMU_UNMAP_DMA",
        )
    }?;
    Ok(u.size)
}

/// `VFIO_DEVICE_GET_REGION_INFO` of region `index` on a VFIO device fd: [`Device::region_info`],
/// and for programs that hold the device fd as a plain file (mm-teardown passes it between
/// processes).
pub(crate) fn region_info(device: &impl AsRawFd, index: u32) -> Result<RegionInfo, String> {
    let mut r = RegionInfo {
        argsz: std::mem::size_of::<RegionInfo>() as u32,
        index,
        ..Default::default()
    };
    // SAFETY: VFIO_DEVICE_GET_REGION_INFO accesses at most argsz bytes of a
    // vfio_region_info (the capability chain is only written if argsz is
    // larger than the struct, which it is not).
    unsafe {
        ioctl_ptr(
            device,
            VFIO_DEVICE_GET_REGION_INFO,
            &mut r,
            "VFIO_DEVICE_GET_REGION_INFO",
        )
    }?;
    Ok(r)
}

pub(crate) fn open_rw(path: &str) -> Result<File, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("open {path}: {e}"))
}

/// A VFIO container (`/dev/vfio/vfio`).
#[derive(Debug)]
pub struct Container(File);

impl Container {
    pub fn open() -> Result<Self, String> {
        Ok(Container(open_rw("/dev/vfio/vfio")?))
    }

    pub fn api_version(&self) -> Result<i32, String> {
        ioctl_val(&self.0, VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")
    }

    pub fn check_extension(&self, ext: u32) -> Result<bool, String> {
        ioctl_val(
            &self.0,
            VFIO_CHECK_EXTENSION,
            libc::c_ulong::from(ext),
            "VFIO_CHECK_EXTENSION",
        )
        .map(|r| r > 0)
    }

    /// `VFIO_IOMMU_MAP_DMA`: the device may read and write `size` bytes of our memory at
    /// `vaddr` through IOVA `iova`.
    ///
    /// # Safety
    /// `vaddr..vaddr+size` must be memory this process owns and keeps mapped until the
    /// mapping is removed: the device writes into it behind the compiler's back.
    pub unsafe fn map_dma(&self, vaddr: u64, iova: u64, size: u64) -> Result<(), String> {
        let mut m = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr,
            iova,
            size,
        };
        // SAFETY: VFIO_IOMMU_MAP_DMA reads a vfio_iommu_type1_dma_map of argsz bytes;
        // the memory it names is the caller's (this function's contract).
        unsafe { ioctl_ptr(&self.0, VFIO_IOMMU_MAP_DMA, &mut m, "VFIO_IOMMU_MAP_DMA") }?;
        Ok(())
    }

    /// `VFIO_IOMMU_UNMAP_DMA`; returns the number of bytes unmapped.
    pub fn unmap_dma(&self, iova: u64, size: u64) -> Result<u64, String> {
        unmap_dma(&self.0, iova, size)
    }

    pub fn set_iommu(&self, kind: u32) -> Result<(), String> {
        ioctl_val(
            &self.0,
            VFIO_SET_IOMMU,
            libc::c_ulong::from(kind),
            "VFIO_SET_IOMMU",
        )
        .map(|_| ())
    }
}

/// A VFIO group (`/dev/vfio/<n>`).
#[derive(Debug)]
pub struct Group(File);

impl Group {
    pub fn open(path: &str) -> Result<Self, String> {
        Ok(Group(open_rw(path)?))
    }

    pub fn status(&self) -> Result<GroupStatus, String> {
        let mut s = GroupStatus {
            argsz: std::mem::size_of::<GroupStatus>() as u32,
            flags: 0,
        };
        // SAFETY: VFIO_GROUP_GET_STATUS reads/writes a vfio_group_status, which
        // `GroupStatus` is, with argsz set to its size.
        unsafe {
            ioctl_ptr(
                &self.0,
                VFIO_GROUP_GET_STATUS,
                &mut s,
                "VFIO_GROUP_GET_STATUS",
            )
        }?;
        Ok(s)
    }

    pub fn set_container(&self, c: &Container) -> Result<(), String> {
        let mut fd: i32 = c.0.as_raw_fd();
        // SAFETY: VFIO_GROUP_SET_CONTAINER reads one __s32 (the container fd)
        // through the pointer.
        unsafe {
            ioctl_ptr(
                &self.0,
                VFIO_GROUP_SET_CONTAINER,
                &mut fd,
                "VFIO_GROUP_SET_CONTAINER",
            )
        }?;
        Ok(())
    }

    pub fn unset_container(&self) -> Result<(), String> {
        ioctl_val(
            &self.0,
            VFIO_GROUP_UNSET_CONTAINER,
            0,
            "VFIO_GROUP_UNSET_CONTAINER",
        )
        .map(|_| ())
    }

    pub fn device(&self, name: &str) -> Result<Device, String> {
        let mut c = std::ffi::CString::new(name)
            .map_err(|_| format!("device name {name:?} contains NUL"))?
            .into_bytes_with_nul();
        // SAFETY: VFIO_GROUP_GET_DEVICE_FD reads a NUL-terminated string (the
        // kernel uses strndup_user, stopping at the NUL) from the buffer, which
        // is live and NUL-terminated.
        let fd = unsafe {
            ioctl_ptr(
                &self.0,
                VFIO_GROUP_GET_DEVICE_FD,
                c.as_mut_ptr(),
                "VFIO_GROUP_GET_DEVICE_FD",
            )
        }?;
        // SAFETY: on success the ioctl returns a new descriptor that we own.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Device(File::from(owned)))
    }
}

impl AsRawFd for Group {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// One entry of `struct vfio_pci_hot_reset_info`: a device a hot reset affects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DependentDevice {
    pub group_id: u32,
    pub segment: u16,
    pub bus: u8,
    pub devfn: u8,
}

impl DependentDevice {
    /// `ssss:bb:dd.f`
    pub fn bdf(&self) -> String {
        format!(
            "{:04x}:{:02x}:{:02x}.{}",
            self.segment,
            self.bus,
            self.devfn >> 3,
            self.devfn & 7
        )
    }
}

/// Decodes the devices of a `vfio_pci_hot_reset_info` buffer (header of three words, then two
/// words per device: group id; segment | bus << 16 | devfn << 24).
pub fn parse_hot_reset_info(words: &[u32]) -> Vec<DependentDevice> {
    let count = words.get(2).copied().unwrap_or(0) as usize;
    words
        .get(3..)
        .unwrap_or(&[])
        .chunks_exact(2)
        .take(count)
        .map(|w| DependentDevice {
            group_id: w[0],
            segment: (w[1] & 0xffff) as u16,
            bus: (w[1] >> 16) as u8,
            devfn: (w[1] >> 24) as u8,
        })
        .collect()
}

/// A VFIO device fd.
#[derive(Debug)]
pub struct Device(File);

impl Device {
    /// `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`: the devices a bus/slot reset of this one affects
    /// (room for 32).
    pub fn hot_reset_info(&self) -> Result<Vec<DependentDevice>, String> {
        const MAX: usize = 32;
        let mut buf = vec![0u32; 3 + 2 * MAX];
        buf[0] = (buf.len() * 4) as u32;
        // SAFETY: the kernel reads the 12-byte header and writes at most argsz bytes (the
        // buffer's size) of it and the device entries.
        unsafe {
            ioctl_ptr(
                &self.0,
                VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
                buf.as_mut_ptr(),
                "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
            )
        }?;
        Ok(parse_hot_reset_info(&buf))
    }

    /// `VFIO_DEVICE_PCI_HOT_RESET` with the fds of the groups that own the affected devices.
    /// Returns the OS error as is (callers check the errno).
    pub fn hot_reset(&self, group_fds: &[i32]) -> std::io::Result<()> {
        let mut buf: Vec<u32> = vec![(12 + 4 * group_fds.len()) as u32, 0, group_fds.len() as u32];
        buf.extend(group_fds.iter().map(|&fd| fd as u32));
        // SAFETY: the kernel reads the 12-byte header and count * 4 bytes of group fds, all
        // within argsz = the buffer's size.
        let r = unsafe {
            libc::ioctl(
                self.0.as_raw_fd(),
                libc::Ioctl::from(VFIO_DEVICE_PCI_HOT_RESET),
                buf.as_mut_ptr(),
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// `VFIO_DEVICE_RESET`: the kernel resets the function with the first of its reset
    /// methods that works (saving and restoring config space around it).
    pub fn reset(&self) -> Result<(), String> {
        ioctl_val(&self.0, VFIO_DEVICE_RESET, 0, "VFIO_DEVICE_RESET").map(|_| ())
    }

    pub fn info(&self) -> Result<DeviceInfo, String> {
        let mut i = DeviceInfo {
            argsz: std::mem::size_of::<DeviceInfo>() as u32,
            ..Default::default()
        };
        // SAFETY: VFIO_DEVICE_GET_INFO accesses at most argsz bytes, argsz being
        // the size of `DeviceInfo` (the layout of vfio_device_info).
        unsafe {
            ioctl_ptr(
                &self.0,
                VFIO_DEVICE_GET_INFO,
                &mut i,
                "VFIO_DEVICE_GET_INFO",
            )
        }?;
        Ok(i)
    }

    pub fn region_info(&self, index: u32) -> Result<RegionInfo, String> {
        region_info(&self.0, index)
    }

    pub fn irq_info(&self, index: u32) -> Result<IrqInfo, String> {
        let mut i = IrqInfo {
            argsz: std::mem::size_of::<IrqInfo>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: VFIO_DEVICE_GET_IRQ_INFO accesses a vfio_irq_info of argsz bytes.
        unsafe {
            ioctl_ptr(
                &self.0,
                VFIO_DEVICE_GET_IRQ_INFO,
                &mut i,
                "VFIO_DEVICE_GET_IRQ_INFO",
            )
        }?;
        Ok(i)
    }

    /// `VFIO_DEVICE_SET_IRQS` with eventfd data (`-1` de-assigns a vector).
    pub fn set_irqs_eventfds(&self, index: u32, start: u32, fds: &[i32]) -> Result<(), String> {
        let mut buf = irq_set_buf(
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            fds.len() as u32,
            fds,
        );
        // SAFETY: the kernel reads the 20-byte header, then count * 4 bytes of
        // data, all within argsz = buf's size in bytes.
        unsafe {
            ioctl_ptr(
                &self.0,
                VFIO_DEVICE_SET_IRQS,
                buf.as_mut_ptr(),
                "VFIO_DEVICE_SET_IRQS(eventfd)",
            )
        }?;
        Ok(())
    }

    /// `VFIO_DEVICE_SET_IRQS` with DATA_NONE|ACTION_TRIGGER and count 0: disable.
    pub fn disable_irqs(&self, index: u32) -> Result<(), String> {
        let mut buf = irq_set_buf(
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            0,
            0,
            &[],
        );
        // SAFETY: the kernel reads the 20-byte header only (no data).
        unsafe {
            ioctl_ptr(
                &self.0,
                VFIO_DEVICE_SET_IRQS,
                buf.as_mut_ptr(),
                "VFIO_DEVICE_SET_IRQS(disable)",
            )
        }?;
        Ok(())
    }

    pub fn read_u32(&self, region: &RegionInfo, off: u64) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.0
            .read_exact_at(&mut b, region.offset + off)
            .map_err(|e| format!("pread region {} +0x{off:x}: {e}", region.index))?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn write_u32(&self, region: &RegionInfo, off: u64, v: u32) -> Result<(), String> {
        self.0
            .write_all_at(&v.to_le_bytes(), region.offset + off)
            .map_err(|e| format!("pwrite region {} +0x{off:x}: {e}", region.index))
    }

    pub fn read_u16(&self, region: &RegionInfo, off: u64) -> Result<u16, String> {
        let mut b = [0u8; 2];
        self.0
            .read_exact_at(&mut b, region.offset + off)
            .map_err(|e| format!("pread region {} +0x{off:x}: {e}", region.index))?;
        Ok(u16::from_le_bytes(b))
    }

    pub fn write_u16(&self, region: &RegionInfo, off: u64, v: u16) -> Result<(), String> {
        self.0
            .write_all_at(&v.to_le_bytes(), region.offset + off)
            .map_err(|e| format!("pwrite region {} +0x{off:x}: {e}", region.index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi_header() {
        // _IO(';', 100 + n) = 0x3b00 | (0x64 + n)
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_CHECK_EXTENSION, 0x3b65);
        assert_eq!(VFIO_SET_IOMMU, 0x3b66);
        assert_eq!(VFIO_GROUP_GET_STATUS, 0x3b67);
        assert_eq!(VFIO_GROUP_SET_CONTAINER, 0x3b68);
        assert_eq!(VFIO_GROUP_UNSET_CONTAINER, 0x3b69);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(VFIO_DEVICE_GET_INFO, 0x3b6b);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3b6c);
        assert_eq!(VFIO_DEVICE_GET_IRQ_INFO, 0x3b6d);
        assert_eq!(VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, 0x3b70);
        assert_eq!(VFIO_DEVICE_PCI_HOT_RESET, 0x3b71);
        let info = parse_hot_reset_info(&[44, 0, 2, 7, 0x0801_0000, 7, 0x0101_0000]);
        assert_eq!(info.len(), 2);
        assert_eq!(info[0].group_id, 7);
        assert_eq!(info[0].bdf(), "0000:01:01.0");
        assert_eq!(info[1].bdf(), "0000:01:00.1");
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3b6e);
        assert_eq!(VFIO_DEVICE_RESET, 0x3b6f);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3b72);
    }

    #[test]
    fn struct_layouts_match_the_uapi_header() {
        use std::mem::{offset_of, size_of};
        assert_eq!(size_of::<GroupStatus>(), 8);
        assert_eq!(size_of::<DeviceInfo>(), 24);
        assert_eq!(offset_of!(DeviceInfo, num_irqs), 12);
        assert_eq!(size_of::<RegionInfo>(), 32);
        assert_eq!(offset_of!(RegionInfo, size), 16);
        assert_eq!(offset_of!(RegionInfo, offset), 24);
        assert_eq!(size_of::<IrqInfo>(), 16);
        assert_eq!(size_of::<DmaMap>(), 32);
        assert_eq!(offset_of!(DmaMap, vaddr), 8);
        assert_eq!(offset_of!(DmaMap, iova), 16);
        assert_eq!(size_of::<DmaUnmap>(), 24);
        assert_eq!(offset_of!(DmaUnmap, size), 16);
    }

    #[test]
    fn irq_set_layout() {
        let b = irq_set_buf(
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            VFIO_PCI_MSIX_IRQ_INDEX,
            0,
            3,
            &[7, -1, 9],
        );
        assert_eq!(b, vec![32, 0x24, 2, 0, 3, 7, 0xffff_ffff, 9]);
        let d = irq_set_buf(
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            2,
            0,
            0,
            &[],
        );
        assert_eq!(d, vec![20, 0x21, 2, 0, 0]);
    }

    /// Cross-check against the host's installed uapi header when there is one.
    #[test]
    fn numbers_agree_with_host_header_if_present() {
        let Ok(h) = std::fs::read_to_string("/usr/include/linux/vfio.h") else {
            return;
        };
        let expect = [
            ("VFIO_GET_API_VERSION", 0),
            ("VFIO_CHECK_EXTENSION", 1),
            ("VFIO_SET_IOMMU", 2),
            ("VFIO_GROUP_GET_STATUS", 3),
            ("VFIO_GROUP_SET_CONTAINER", 4),
            ("VFIO_GROUP_UNSET_CONTAINER", 5),
            ("VFIO_GROUP_GET_DEVICE_FD", 6),
            ("VFIO_DEVICE_GET_INFO", 7),
            ("VFIO_DEVICE_GET_REGION_INFO", 8),
            ("VFIO_DEVICE_GET_IRQ_INFO", 9),
            ("VFIO_DEVICE_SET_IRQS", 10),
            ("VFIO_DEVICE_RESET", 11),
            ("VFIO_IOMMU_MAP_DMA", 13),
            ("VFIO_IOMMU_UNMAP_DMA", 14),
        ];
        for (name, n) in expect {
            let want = format!("_IO(VFIO_TYPE, VFIO_BASE + {n})");
            let line = h
                .lines()
                .find(|l| l.starts_with("#define") && l.split_whitespace().nth(1) == Some(name))
                .unwrap_or_else(|| panic!("{name} not in header"));
            assert!(line.contains(&want), "{name}: {line}");
        }
        assert!(h.contains("#define VFIO_TYPE\t(';')") || h.contains("#define VFIO_TYPE (';')"));
        assert!(h.contains("#define VFIO_BASE\t100") || h.contains("#define VFIO_BASE 100"));
        assert!(h.contains("#define VFIO_TYPE1v2_IOMMU\t\t3"));
    }
}
