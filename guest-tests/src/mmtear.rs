//! `mm-teardown`: M1–M5 — what the guest kernel does with a vfio user's device and DMA
//! mappings when the processes holding them go away (docs/mm-teardown.md).
//!
//! The program is a **supervisor** that binds the GPU to vfio-pci and starts worker processes
//! (`pcisim-guest mm-teardown-worker`, never run by hand). The **opener** opens the device
//! through the legacy vfio API (container with the type1v2 IOMMU behind the vIOMMU, group,
//! device), maps a ring page and a streamed buffer of its own memory (`VFIO_IOMMU_MAP_DMA`),
//! fills every ring slot with a FILL of the whole buffer and keeps the GPU streaming DMA into
//! it by advancing RING_TAIL (the ring's contents never change, so whoever holds the device fd
//! — or only a mapping of BAR0 — can keep the device working without touching the memory).
//! Then, by `--case`:
//!
//! - `exit` (M1): it queues a full ring and exits normally (`exit(0)`, no cleanup);
//! - `kill` (M2): it queues a full ring, keeps streaming, and the supervisor SIGKILLs it;
//! - `fork` (M3): it forks; the child inherits the fds and takes the ring over, the parent
//!   exits; the child keeps streaming, shows progress after the parent's exit (CMDS_COMPLETED
//!   through its inherited device fd), queues a full ring and exits;
//! - `pass` (M4): it sends the container, group and device fds over `SCM_RIGHTS` to a
//!   **receiver** (a second worker the supervisor started), which takes the ring over; the
//!   opener exits; the receiver shows progress, queues a full ring and exits;
//! - `bar-mmap` (M5): it mmaps BAR0's register page through the device fd, closes the
//!   device, group and container fds, keeps streaming through the mapping alone (progress read
//!   through it), queues a full ring and exits.
//!
//! The supervisor `waitpid`s each exit; after the last one it opens the group again (which
//! fails with EBUSY if anything still holds it) and maps a marker page. Workers report to the
//! supervisor with one line per event on their stdout (`<role> <event> key=value ...`).
//!
//! **Markers.** The host correlates the guest's steps with the device's journal through
//! `dma_mapped` records at marker IOVAs (a one-page `VFIO_IOMMU_MAP_DMA`: with `caching-mode=on`
//! QEMU forwards it synchronously, so it is journaled before the ioctl returns):
//! [`MARK_FIRST_EXIT`] just before the first process exits (or is killed, or closes its fds),
//! [`MARK_HOLDER`] by the remaining holder once the supervisor told it the first exit completed
//! (`waitpid` returned), [`MARK_WAITED`] by the supervisor after the last `waitpid` returned.
//!
//! Layout from `--iova BASE`: ring page at BASE, the buffer at BASE + 2 MiB (`--buf-kib`,
//! default 16384: 16 MiB, transparent huge pages), marker `n` at BASE + 128 MiB + n pages.

use crate::e1::setup_failure;
use crate::gpu;
use crate::ktap::{Ktap, Outcome};
use crate::pci::{self, Function};
use crate::sys;
use crate::vdev::{self, Binding, PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY};
use crate::vfio::{
    self, ioctl_ptr, ioctl_val, open_rw, DeviceInfo, DmaMap, DmaUnmap, GroupStatus, RegionInfo,
};
use pcisim_guest_wire::{DeviceIds, MmRole, MmTeardownOptions, MmWorkerOptions, Program, Word};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

/// Default base of the IOVA layout.
pub const DEFAULT_IOVA: u64 = 0x5000_0000;
/// The ring page's offset from the base.
pub const RING_OFF: u64 = 0;
/// The streamed buffer's offset from the base.
pub const BUF_OFF: u64 = 0x20_0000;
/// The marker pages' offset from the base.
pub const MARK_OFF: u64 = 0x800_0000;
/// Marker: the first process is about to exit / be killed / close its fds.
pub const MARK_FIRST_EXIT: u64 = 0;
/// Marker: the remaining holder (M3 child, M4 receiver) learnt the first exit completed.
pub const MARK_HOLDER: u64 = 1;
/// Marker: the supervisor's last `waitpid` returned.
pub const MARK_WAITED: u64 = 2;

const PAGE: usize = 4096;
const DEFAULT_BUF_KIB: usize = 16 * 1024;
const RING_ENTRIES: u32 = 128;
/// FILL pattern of ring slot `i`: `PATTERN_BASE | i` ("MM" and the slot).
const PATTERN_BASE: u32 = 0x4D4D_0000;
const PATTERN_MASK: u32 = 0xFFFF_FF80;
/// Streaming: this many commands added per tick...
const STREAM_BATCH: u32 = 1;
/// ...every tick (a 16 MiB FILL takes the engine a few ms: the journal stays small and the
/// host is not flooded).
const STREAM_PACE: Duration = Duration::from_millis(20);
/// How long the opener streams before its case begins.
const STREAM_FIRST: Duration = Duration::from_millis(300);
/// How long a holder streams to show progress.
const HOLD: Duration = Duration::from_millis(400);
/// How long any one step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The five cases: the `--case` value (guest-wire's, shared with the lab).
use pcisim_guest_wire::MmCase as Case;

/// The KTAP tests the supervisor reports for `case`, in order.
fn tests(case: Case) -> &'static [&'static str] {
    match case {
        Case::Exit => &[
            "vfio-bind",
            "opener-streams",
            "exit-with-dma-running",
            "released-before-waitpid",
            "vfio-release",
        ],
        Case::Kill => &[
            "vfio-bind",
            "opener-streams",
            "sigkill-with-dma-running",
            "released-before-waitpid",
            "vfio-release",
        ],
        Case::Fork => &[
            "vfio-bind",
            "opener-streams",
            "child-takes-over",
            "parent-exits-device-kept",
            "dma-continues-for-child",
            "child-exits",
            "released-before-waitpid",
            "vfio-release",
        ],
        Case::Pass => &[
            "vfio-bind",
            "opener-streams",
            "fds-passed",
            "opener-exits-device-kept",
            "dma-continues-for-receiver",
            "receiver-exits",
            "released-before-waitpid",
            "vfio-release",
        ],
        Case::BarMmap => &[
            "vfio-bind",
            "opener-streams",
            "bar-mmap-outlives-fds",
            "dma-continues-through-mapping",
            "exit-with-mapping",
            "released-before-waitpid",
            "vfio-release",
        ],
    }
}

/// The IOVA layout.
#[derive(Debug, Clone, Copy)]
struct Layout {
    base: u64,
    buf_len: usize,
}

impl Layout {
    fn ring(&self) -> u64 {
        self.base + RING_OFF
    }

    fn buf(&self) -> u64 {
        self.base + BUF_OFF
    }

    fn mark(&self, n: u64) -> u64 {
        self.base + MARK_OFF + n * PAGE as u64
    }
}

// -- the vfio fd boundary ---------------------------------------------------------------------

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// A new container with the type1v2 IOMMU available.
fn open_container() -> Result<OwnedFd, String> {
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
fn attach_group(container: BorrowedFd<'_>, group: &str) -> Result<OwnedFd, String> {
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
fn get_device(group: BorrowedFd<'_>, bdf: &str) -> Result<File, String> {
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

fn region_info(device: &File, index: u32) -> Result<RegionInfo, String> {
    let mut r = RegionInfo {
        argsz: std::mem::size_of::<RegionInfo>() as u32,
        index,
        ..Default::default()
    };
    // SAFETY: VFIO_DEVICE_GET_REGION_INFO accesses at most argsz bytes of a vfio_region_info
    // (no capability chain: argsz is the struct's size).
    unsafe {
        ioctl_ptr(
            &device.as_fd(),
            vfio::VFIO_DEVICE_GET_REGION_INFO,
            &mut r,
            "VFIO_DEVICE_GET_REGION_INFO",
        )
    }?;
    Ok(r)
}

/// `VFIO_IOMMU_MAP_DMA` of `pages` at `iova`, read/write.
fn map_dma(container: BorrowedFd<'_>, pages: &Pages, iova: u64) -> Result<(), String> {
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

/// `VFIO_IOMMU_UNMAP_DMA`; returns the bytes unmapped.
fn unmap_dma(container: BorrowedFd<'_>, iova: u64, size: u64) -> Result<u64, String> {
    let mut u = DmaUnmap {
        argsz: std::mem::size_of::<DmaUnmap>() as u32,
        flags: 0,
        iova,
        size,
    };
    // SAFETY: the kernel reads and writes a vfio_iommu_type1_dma_unmap of argsz bytes.
    unsafe {
        ioctl_ptr(
            &container,
            vfio::VFIO_IOMMU_UNMAP_DMA,
            &mut u,
            "VFIO_IOMMU_UNMAP_DMA",
        )
    }?;
    Ok(u.size)
}

/// The open vfio objects of a worker, as raw fds it may pass on or close.
struct Handles {
    container: OwnedFd,
    group: OwnedFd,
    device: File,
    bar0: RegionInfo,
    config: RegionInfo,
}

impl Handles {
    /// Opens container, group and device (legacy API, type1v2).
    fn open(bdf: &str, group: &str) -> Result<Handles, String> {
        let container = open_container()?;
        let group = attach_group(container.as_fd(), group)?;
        let device = get_device(group.as_fd(), bdf)?;
        Handles::from_parts(container, group, device)
    }

    /// Wraps fds opened elsewhere (received over a socket) and reads the regions.
    fn from_parts(container: OwnedFd, group: OwnedFd, device: File) -> Result<Handles, String> {
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
        let bar0 = region_info(&device, vfio::VFIO_PCI_BAR0_REGION_INDEX)?;
        let config = region_info(&device, vfio::VFIO_PCI_CONFIG_REGION_INDEX)?;
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

    fn regs(&self) -> FdRegs<'_> {
        FdRegs {
            device: &self.device,
            bar0: self.bar0,
        }
    }

    /// Command |= Memory Space | Bus Master through the config region.
    fn enable_command(&self) -> Result<u16, String> {
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
struct Pages {
    ptr: NonNull<u8>,
    len: usize,
}

impl Pages {
    fn new(len: usize) -> Result<Pages, String> {
        // SAFETY: a new private anonymous mapping (addr NULL) cannot alias existing memory;
        // the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_err(&format!("mmap {len} anonymous bytes")));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or("mmap returned NULL")?;
        Ok(Pages { ptr, len })
    }

    /// `len` bytes (a multiple of 2 MiB) at a 2 MiB-aligned address, backed by transparent
    /// huge pages where the kernel can: pinned for DMA, each huge page is one IOMMU
    /// superpage mapping, i.e. one DMA_MAP for the device instead of 512.
    fn new_huge(len: usize) -> Result<Pages, String> {
        const HUGE: usize = 2 << 20;
        if len == 0 || len % HUGE != 0 {
            return Err(format!("{len:#x} is not a multiple of 2 MiB"));
        }
        let span = len + HUGE;
        // SAFETY: a new private anonymous mapping (addr NULL) cannot alias existing memory;
        // the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_err(&format!("mmap {span} anonymous bytes")));
        }
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

    fn write(&self, off: usize, data: &[u8]) -> Result<(), String> {
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
    fn read_u32(&self, off: usize) -> Result<u32, String> {
        if off % 4 != 0 || off.checked_add(4).map_or(true, |e| e > self.len) {
            return Err(format!("read u32 at {off:#x} out of bounds"));
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: aligned (page-aligned base, 4-aligned offset) and in bounds of our mapping.
        let v = unsafe { self.ptr.as_ptr().add(off).cast::<u32>().read_volatile() };
        Ok(u32::from_le(v))
    }

    /// Unmaps memory that no DMA mapping refers to any more.
    fn free(self) {
        // SAFETY: `ptr..ptr+len` is our own mapping; the caller removed its DMA mapping, and
        // `self` is consumed, so nothing refers to it afterwards.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Maps a fresh marker page at the layout's marker `n`.
fn mark(container: BorrowedFd<'_>, layout: &Layout, n: u64) -> Result<(), String> {
    let p = Pages::new(PAGE)?;
    map_dma(container, &p, layout.mark(n)).map_err(|e| format!("marker {n}: {e}"))
}

// -- registers and the ring -------------------------------------------------------------------

/// 32-bit BAR0 register access, through the device fd or through a mapping of BAR0.
trait Regs {
    fn rd(&self, off: u64) -> Result<u32, String>;
    fn wr(&self, off: u64, v: u32) -> Result<(), String>;
}

struct FdRegs<'a> {
    device: &'a File,
    bar0: RegionInfo,
}

impl Regs for FdRegs<'_> {
    fn rd(&self, off: u64) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.device
            .read_exact_at(&mut b, self.bar0.offset + off)
            .map_err(|e| format!("pread BAR0+0x{off:x}: {e}"))?;
        Ok(u32::from_le_bytes(b))
    }

    fn wr(&self, off: u64, v: u32) -> Result<(), String> {
        self.device
            .write_all_at(&v.to_le_bytes(), self.bar0.offset + off)
            .map_err(|e| format!("pwrite BAR0+0x{off:x}: {e}"))
    }
}

/// BAR0's first page mapped through the device fd (`mmap` of the vfio region). Never unmapped:
/// it lives until the process exits, which is what M5 is about.
struct BarMap {
    ptr: NonNull<u32>,
}

impl BarMap {
    fn map(device: &File, bar0: &RegionInfo) -> Result<BarMap, String> {
        if bar0.flags & vfio::VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(format!(
                "BAR0 region flags 0x{:x}: not mmap-able",
                bar0.flags
            ));
        }
        let off = libc::off_t::try_from(bar0.offset).map_err(|_| "BAR0 offset too large")?;
        // SAFETY: a new shared mapping of the device fd's BAR0 region (addr NULL: no existing
        // memory is replaced); the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_err("mmap BAR0 through the device fd"));
        }
        let ptr = NonNull::new(p.cast::<u32>()).ok_or("mmap returned NULL")?;
        Ok(BarMap { ptr })
    }

    fn index(off: u64) -> Result<usize, String> {
        if off % 4 != 0 || off >= PAGE as u64 {
            return Err(format!("register 0x{off:x} outside the mapped page"));
        }
        Ok((off / 4) as usize)
    }
}

impl Regs for BarMap {
    fn rd(&self, off: u64) -> Result<u32, String> {
        let i = BarMap::index(off)?;
        // SAFETY: an aligned 32-bit MMIO read inside the mapped page.
        Ok(u32::from_le(unsafe {
            self.ptr.as_ptr().add(i).read_volatile()
        }))
    }

    fn wr(&self, off: u64, v: u32) -> Result<(), String> {
        let i = BarMap::index(off)?;
        // SAFETY: an aligned 32-bit MMIO write inside the mapped page.
        unsafe { self.ptr.as_ptr().add(i).write_volatile(v.to_le()) };
        Ok(())
    }
}

fn slot_pattern(slot: u32) -> u32 {
    PATTERN_BASE | slot
}

/// Writes a FILL of the whole buffer (slot's own pattern) into every slot and programs and
/// enables the ring.
fn ring_setup(regs: &dyn Regs, ring: &Pages, layout: &Layout) -> Result<(), String> {
    let version = regs.rd(gpu::VERSION)?;
    if version < gpu::VERSION_1_1 {
        return Err(format!("VERSION 0x{version:08x}: no command ring"));
    }
    for slot in 0..RING_ENTRIES {
        let cmd = gpu::encode_cmd(
            gpu::op::FILL,
            0,
            layout.buf(),
            u64::from(slot_pattern(slot)),
            layout.buf_len as u64,
        );
        ring.write((u64::from(slot) * gpu::CMD_SIZE) as usize, &cmd)?;
    }
    regs.wr(gpu::RING_CTRL, gpu::ctrl::RESET)?;
    regs.wr(gpu::RING_BASE_LO, layout.ring() as u32)?;
    regs.wr(gpu::RING_BASE_HI, (layout.ring() >> 32) as u32)?;
    regs.wr(gpu::RING_SIZE, RING_ENTRIES)?;
    regs.wr(gpu::RING_CTRL, gpu::ctrl::ENABLE)?;
    let (ctrl, status, head) = (
        regs.rd(gpu::RING_CTRL)?,
        regs.rd(gpu::RING_STATUS)?,
        regs.rd(gpu::RING_HEAD)?,
    );
    if (ctrl, status, head) != (gpu::ctrl::ENABLE, gpu::status::IDLE, 0) {
        return Err(format!(
            "ring not enabled and idle at slot 0: CTRL {ctrl} STATUS {status} HEAD {head}"
        ));
    }
    Ok(())
}

/// The driver's side of the ring: its tail. Submitting is advancing RING_TAIL over slots whose
/// commands are already in place.
struct Stream {
    tail: u32,
}

impl Stream {
    /// Takes the ring over from its current RING_TAIL (another process streamed before).
    fn resume(regs: &dyn Regs) -> Result<Stream, String> {
        let tail = regs.rd(gpu::RING_TAIL)?;
        if tail >= RING_ENTRIES {
            return Err(format!("RING_TAIL reads {tail}"));
        }
        Ok(Stream { tail })
    }

    /// Adds up to `want` commands (never more than the ring holds); returns the commands
    /// outstanding after the doorbell. A stopped ring is an error.
    fn top_up(&mut self, regs: &dyn Regs, want: u32) -> Result<u32, String> {
        let status = regs.rd(gpu::RING_STATUS)?;
        if status == gpu::status::ERROR {
            let e = regs.rd(gpu::RING_ERROR)?;
            return Err(format!("the ring stopped: RING_ERROR 0x{e:08x}"));
        }
        let head = regs.rd(gpu::RING_HEAD)?;
        let outstanding = (self.tail + RING_ENTRIES - head) % RING_ENTRIES;
        let add = want.min(RING_ENTRIES - 1 - outstanding);
        if add > 0 {
            self.tail = (self.tail + add) % RING_ENTRIES;
            regs.wr(gpu::RING_TAIL, self.tail)?;
        }
        Ok(outstanding + add)
    }

    /// Fills the ring (127 FILLs of the whole buffer: hundreds of ms of work) and waits until
    /// the engine demonstrably works on it (RING_HEAD moved: a command of the burst completed,
    /// the next one runs). Returns the commands still outstanding then. The doorbell is a posted
    /// write: without the wait, a process killed right after it may go before the engine even
    /// fetched a command.
    fn burst(&mut self, regs: &dyn Regs) -> Result<u32, String> {
        let head0 = regs.rd(gpu::RING_HEAD)?;
        self.top_up(regs, RING_ENTRIES)?;
        let t0 = Instant::now();
        loop {
            let head = regs.rd(gpu::RING_HEAD)?;
            let outstanding = (self.tail + RING_ENTRIES - head) % RING_ENTRIES;
            if head != head0 {
                return Ok(outstanding);
            }
            if regs.rd(gpu::RING_STATUS)? == gpu::status::ERROR {
                return Err("the ring stopped during the burst".into());
            }
            if t0.elapsed() > Duration::from_secs(5) {
                return Err(format!(
                    "the engine did not start the burst within 5 s (HEAD {head}, TAIL {})",
                    self.tail
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Streams (a small batch every tick) for `d`.
    fn run_for(&mut self, regs: &dyn Regs, d: Duration) -> Result<(), String> {
        let t0 = Instant::now();
        while t0.elapsed() < d {
            self.top_up(regs, STREAM_BATCH)?;
            std::thread::sleep(STREAM_PACE);
        }
        Ok(())
    }

    /// Streams until a line containing `want` arrives on `input` (or `timeout` passes).
    fn run_until(
        &mut self,
        regs: &dyn Regs,
        input: BorrowedFd<'_>,
        want: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let t0 = Instant::now();
        let mut got = Vec::new();
        loop {
            self.top_up(regs, STREAM_BATCH)?;
            let rev = sys::poll(&[(input.as_raw_fd(), libc::POLLIN)], Some(STREAM_PACE))?;
            if rev
                .first()
                .is_some_and(|r| r & (libc::POLLIN | libc::POLLHUP) != 0)
            {
                let mut b = [0u8; 256];
                let n = read_fd(input, &mut b)?;
                if n == 0 {
                    return Err(format!("input closed before {want:?}"));
                }
                got.extend_from_slice(&b[..n]);
                if String::from_utf8_lossy(&got).contains(want) {
                    return Ok(());
                }
            }
            if t0.elapsed() > timeout {
                return Err(format!("no {want:?} within {} s", timeout.as_secs()));
            }
        }
    }
}

fn read_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, String> {
    // SAFETY: `buf` is a live, exclusively borrowed buffer of `buf.len()` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| os_err("read"))
}

fn write_fd(fd: BorrowedFd<'_>, data: &[u8]) -> Result<(), String> {
    // SAFETY: `data` is a live buffer of `data.len()` bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    if usize::try_from(n) == Ok(data.len()) {
        Ok(())
    } else {
        Err(os_err("write"))
    }
}

/// Streams until CMDS_COMPLETED advanced by at least 4 and the buffer holds one of the
/// slots' patterns (the device's FILLs land in our memory). Returns the advance and the word.
fn verify_streaming(regs: &dyn Regs, s: &mut Stream, buf: &Pages) -> Result<(u32, u32), String> {
    let c0 = regs.rd(gpu::CMDS_COMPLETED)?;
    let t0 = Instant::now();
    loop {
        s.top_up(regs, STREAM_BATCH)?;
        std::thread::sleep(STREAM_PACE);
        let advanced = regs.rd(gpu::CMDS_COMPLETED)?.wrapping_sub(c0);
        let word = buf.read_u32(0)?;
        let tail_word = buf.read_u32(buf.len - 4)?;
        if advanced >= 4 && word & PATTERN_MASK == PATTERN_BASE && tail_word == word {
            return Ok((advanced, word));
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "after 10 s: CMDS_COMPLETED advanced by {advanced}, buffer words 0x{word:08x} / 0x{tail_word:08x}"
            ));
        }
    }
}

// -- the worker processes ---------------------------------------------------------------------

/// One line to the supervisor.
fn report(role: &str, text: &str) {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // The supervisor notices a missing line; nothing else can be done about a broken pipe.
    let _ = writeln!(out, "{role} {text}");
    let _ = out.flush();
}

fn pid() -> u32 {
    std::process::id()
}

/// Ends a worker: `exit(2)` without unwinding or destructors — no close, no unmap, no ring
/// stop: the kernel tears everything down, which is what is observed.
fn exit_now(code: i32) -> ! {
    std::process::exit(code)
}

struct WorkerCfg {
    case: Case,
    bdf: String,
    group: String,
    layout: Layout,
}

/// `pcisim-guest mm-teardown-worker --role opener|receiver ...` (started by the supervisor).
pub fn worker(o: MmWorkerOptions) -> i32 {
    let parsed = (|| -> Result<(String, WorkerCfg), String> {
        let layout = Layout {
            base: o.iova,
            buf_len: buf_len(o.buf_kib)?,
        };
        Ok((
            o.role.word().to_string(),
            WorkerCfg {
                case: o.case,
                bdf: o.bdf.unwrap_or_default(),
                group: o.group.unwrap_or_default(),
                layout,
            },
        ))
    })();
    let (role, cfg) = match parsed {
        Ok(p) => p,
        Err(e) => {
            report("worker", &format!("error {e}"));
            return 2;
        }
    };
    let r = match role.as_str() {
        "opener" => opener(&cfg),
        "receiver" => receiver(&cfg),
        other => Err(format!("unknown role {other:?}")),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            report(&role, &format!("error {e}"));
            1
        }
    }
}

fn buf_len(kib: Option<u64>) -> Result<usize, String> {
    let kib = match kib {
        Some(k) => usize::try_from(k).map_err(|_| format!("--buf-kib {k}: too large"))?,
        None => DEFAULT_BUF_KIB,
    };
    if kib < 4 || kib % 4 != 0 || kib > 64 * 1024 {
        return Err(format!("--buf-kib {kib}: a multiple of 4 in 4..=65536"));
    }
    Ok(kib * 1024)
}

fn opener(cfg: &WorkerCfg) -> Result<(), String> {
    let h = Handles::open(&cfg.bdf, &cfg.group)?;
    h.enable_command()?;
    let id = h.regs().rd(gpu::ID)?;
    if id != gpu::ID_MAGIC {
        return Err(format!("BAR0 ID 0x{id:08x}"));
    }
    let ring = Pages::new(PAGE)?;
    map_dma(h.container.as_fd(), &ring, cfg.layout.ring())?;
    let buf = if cfg.layout.buf_len % (2 << 20) == 0 {
        Pages::new_huge(cfg.layout.buf_len)?
    } else {
        Pages::new(cfg.layout.buf_len)?
    };
    map_dma(h.container.as_fd(), &buf, cfg.layout.buf())?;
    ring_setup(&h.regs(), &ring, &cfg.layout)?;
    let mut s = Stream { tail: 0 };
    let (advanced, word) = verify_streaming(&h.regs(), &mut s, &buf)?;
    report(
        "opener",
        &format!(
            "ready pid={} completed={advanced} word=0x{word:08x} ring=0x{:x} buf=0x{:x}+0x{:x}",
            pid(),
            cfg.layout.ring(),
            cfg.layout.buf(),
            cfg.layout.buf_len
        ),
    );
    s.run_for(&h.regs(), STREAM_FIRST)?;
    match cfg.case {
        Case::Exit => {
            mark(h.container.as_fd(), &cfg.layout, MARK_FIRST_EXIT)?;
            let out = s.burst(&h.regs())?;
            let status = h.regs().rd(gpu::RING_STATUS)?;
            report(
                "opener",
                &format!("exiting outstanding={out} status={status}"),
            );
            exit_now(0)
        }
        Case::Kill => {
            mark(h.container.as_fd(), &cfg.layout, MARK_FIRST_EXIT)?;
            let out = s.burst(&h.regs())?;
            report("opener", &format!("burst outstanding={out}"));
            // Keep it busy until the SIGKILL comes.
            s.run_for(&h.regs(), Duration::from_secs(60))?;
            Err("not killed within 60 s".into())
        }
        Case::Fork => fork_case(&h, &buf, cfg),
        Case::Pass => pass_case(&h, cfg),
        Case::BarMmap => bar_case(h, s, cfg),
    }
}

/// A pipe (read end, write end), close-on-exec.
fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a live array of two ints for the kernel to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(os_err("pipe2"));
    }
    // SAFETY: both are new descriptors that we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Waits up to `timeout` for `fd` to be readable and reads what is there.
fn read_within(fd: BorrowedFd<'_>, timeout: Duration) -> Result<Vec<u8>, String> {
    let rev = sys::poll(&[(fd.as_raw_fd(), libc::POLLIN)], Some(timeout))?;
    if rev.is_empty() {
        return Err(format!("nothing within {} s", timeout.as_secs()));
    }
    let mut b = [0u8; 256];
    let n = read_fd(fd, &mut b)?;
    Ok(b[..n].to_vec())
}

fn fork_case(h: &Handles, buf: &Pages, cfg: &WorkerCfg) -> Result<(), String> {
    let (took_rd, took_wr) = pipe()?;
    // SAFETY: this process is single-threaded (the worker never starts threads), so the child
    // may run arbitrary code after fork.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(os_err("fork"));
    }
    if child == 0 {
        drop(took_rd);
        match child_holder(h, buf, took_wr, cfg) {
            Ok(()) => exit_now(0),
            Err(e) => {
                report("child", &format!("error {e}"));
                exit_now(1)
            }
        }
    }
    drop(took_wr);
    // The parent stops streaming here; the child takes over.
    let got = read_within(took_rd.as_fd(), STEP_TIMEOUT)?;
    if got.is_empty() {
        return Err("the child closed the takeover pipe without taking over".into());
    }
    mark(h.container.as_fd(), &cfg.layout, MARK_FIRST_EXIT)?;
    report("opener", &format!("handed-over child={child}"));
    exit_now(0)
}

/// The M3 child / M4 receiver after it holds the fds: take the ring over, stream until the
/// supervisor says the first process's exit completed, mark, show progress, queue a full ring
/// and exit. `copy` is the child's copy of the buffer (M3), to see whether it still shares
/// pages with the device.
fn hold(
    role: &str,
    h: &Handles,
    s: &mut Stream,
    input: BorrowedFd<'_>,
    copy: Option<&Pages>,
    layout: &Layout,
) -> Result<(), String> {
    let regs = h.regs();
    s.run_until(&regs, input, "opener-exited", STEP_TIMEOUT)?;
    mark(h.container.as_fd(), layout, MARK_HOLDER)?;
    let copy0 = copy.map(|b| b.read_u32(0)).transpose()?;
    let c0 = regs.rd(gpu::CMDS_COMPLETED)?;
    s.run_for(&regs, HOLD)?;
    let c1 = regs.rd(gpu::CMDS_COMPLETED)?;
    let copy1 = copy.map(|b| b.read_u32(0)).transpose()?;
    let copies = match (copy0, copy1) {
        (Some(a), Some(b)) => format!(" copy0=0x{a:08x} copy1=0x{b:08x}"),
        _ => String::new(),
    };
    report(role, &format!("progress c0={c0} c1={c1}{copies}"));
    let out = s.burst(&regs)?;
    report(role, &format!("exiting outstanding={out}"));
    exit_now(0)
}

fn child_holder(h: &Handles, buf: &Pages, took: OwnedFd, cfg: &WorkerCfg) -> Result<(), String> {
    report("child", &format!("started pid={}", pid()));
    let mut s = Stream::resume(&h.regs())?;
    s.top_up(&h.regs(), STREAM_BATCH)?;
    write_fd(took.as_fd(), b"t")?;
    drop(took);
    report("child", &format!("took-over tail={}", s.tail));
    let stdin = std::io::stdin();
    hold("child", h, &mut s, stdin.as_fd(), Some(buf), &cfg.layout)
}

fn pass_case(h: &Handles, cfg: &WorkerCfg) -> Result<(), String> {
    // fd 0 is our end of the SOCK_SEQPACKET pair with the receiver.
    let stdin = std::io::stdin();
    let sock = stdin.as_fd();
    sys::send_fds(
        sock,
        &[
            h.container.as_raw_fd(),
            h.group.as_raw_fd(),
            h.device.as_raw_fd(),
        ],
    )?;
    report("opener", "sent-fds n=3");
    let got = read_within(sock, STEP_TIMEOUT)?;
    if got != b"took-over" {
        return Err(format!(
            "expected the receiver's took-over, got {:?}",
            String::from_utf8_lossy(&got)
        ));
    }
    mark(h.container.as_fd(), &cfg.layout, MARK_FIRST_EXIT)?;
    report("opener", "handed-over");
    exit_now(0)
}

fn receiver(cfg: &WorkerCfg) -> Result<(), String> {
    let stdin = std::io::stdin();
    let sock = stdin.as_fd();
    let mut fds = sys::recv_fds(sock, 3, STEP_TIMEOUT)?.into_iter();
    let (Some(container), Some(group), Some(device), None) =
        (fds.next(), fds.next(), fds.next(), fds.next())
    else {
        return Err("expected exactly 3 fds".into());
    };
    let h = Handles::from_parts(container, group, File::from(device))?;
    let id = h.regs().rd(gpu::ID)?;
    report(
        "receiver",
        &format!(
            "got-fds n=3 pid={} container={} group={} device={} id=0x{id:08x}",
            pid(),
            h.container.as_raw_fd(),
            h.group.as_raw_fd(),
            h.device.as_raw_fd()
        ),
    );
    let mut s = Stream::resume(&h.regs())?;
    s.top_up(&h.regs(), STREAM_BATCH)?;
    write_fd(sock, b"took-over")?;
    report("receiver", &format!("took-over tail={}", s.tail));
    hold("receiver", &h, &mut s, sock, None, &cfg.layout)
}

/// Counts this process's fds that are vfio objects (`/dev/vfio/*`, `anon_inode:[vfio-device]`).
fn vfio_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|t| {
                    let t = t.to_string_lossy();
                    t.starts_with("/dev/vfio/") || t.contains("vfio-device")
                })
                .count()
        })
        .unwrap_or(usize::MAX)
}

fn bar_case(h: Handles, mut s: Stream, cfg: &WorkerCfg) -> Result<(), String> {
    let map = BarMap::map(&h.device, &h.bar0)?;
    let id = map.rd(gpu::ID)?;
    if id != gpu::ID_MAGIC {
        return Err(format!("ID through the BAR0 mapping reads 0x{id:08x}"));
    }
    mark(h.container.as_fd(), &cfg.layout, MARK_FIRST_EXIT)?;
    // Close the device, group and container fds: only the mapping is left.
    drop(h);
    let left = vfio_fds();
    report(
        "opener",
        &format!("fds-closed id=0x{id:08x} vfio-fds={left}"),
    );
    let c0 = map.rd(gpu::CMDS_COMPLETED)?;
    s.run_for(&map, HOLD)?;
    let c1 = map.rd(gpu::CMDS_COMPLETED)?;
    report("opener", &format!("progress c0={c0} c1={c1}"));
    let out = s.burst(&map)?;
    report("opener", &format!("exiting outstanding={out}"));
    exit_now(0)
}

// -- the supervisor ---------------------------------------------------------------------------

/// A worker's report line: `<role> <event> key=value ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    role: String,
    event: String,
    rest: String,
}

impl Line {
    fn parse(text: &str) -> Option<Line> {
        let mut w = text.trim().splitn(3, ' ');
        Some(Line {
            role: w.next()?.to_string(),
            event: w.next()?.to_string(),
            rest: w.next().unwrap_or("").to_string(),
        })
    }

    /// The value of `key=value` in the rest of the line.
    fn get(&self, key: &str) -> Option<&str> {
        self.rest
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }

    fn num(&self, key: &str) -> Result<u64, String> {
        let v = self
            .get(key)
            .ok_or_else(|| format!("no {key}= in {:?}", self.text()))?;
        pci::parse_number(v)
    }

    fn text(&self) -> String {
        format!("{} {} {}", self.role, self.event, self.rest)
            .trim_end()
            .to_string()
    }
}

/// Lines from the workers' stdout pipes.
struct Reports {
    pipes: Vec<(File, Vec<u8>, bool)>,
    /// Lines not taken yet, and whether each was shown as a diagnostic.
    lines: std::collections::VecDeque<(Line, bool)>,
}

impl Reports {
    fn new() -> Reports {
        Reports {
            pipes: Vec::new(),
            lines: std::collections::VecDeque::new(),
        }
    }

    fn add(&mut self, f: File) {
        self.pipes.push((f, Vec::new(), false));
    }

    /// Reads what is available (waits up to `timeout` for something).
    fn pump(&mut self, timeout: Duration) -> Result<bool, String> {
        let open: Vec<(RawFd, i16)> = self
            .pipes
            .iter()
            .filter(|p| !p.2)
            .map(|p| (p.0.as_raw_fd(), libc::POLLIN))
            .collect();
        if open.is_empty() {
            return Ok(false);
        }
        let rev = sys::poll(&open, Some(timeout))?;
        let mut any = false;
        for (i, r) in rev.iter().enumerate() {
            if *r == 0 {
                continue;
            }
            let fd = open[i].0;
            let Some(p) = self.pipes.iter_mut().find(|p| p.0.as_raw_fd() == fd) else {
                continue;
            };
            let mut b = [0u8; 4096];
            let n = p.0.read(&mut b).map_err(|e| format!("read reports: {e}"))?;
            if n == 0 {
                p.2 = true;
                continue;
            }
            any = true;
            p.1.extend_from_slice(&b[..n]);
            while let Some(nl) = p.1.iter().position(|&c| c == b'\n') {
                let text: Vec<u8> = p.1.drain(..=nl).collect();
                if let Some(l) = Line::parse(&String::from_utf8_lossy(&text)) {
                    self.lines.push_back((l, false));
                }
            }
        }
        Ok(any || rev.iter().any(|&r| r != 0))
    }

    /// Waits for `role event` (the first such line not taken yet); lines for later steps
    /// stay queued. Any `error` line of any role ends the wait with its text. Every line is
    /// shown once as a diagnostic when it arrives.
    fn expect(
        &mut self,
        role: &str,
        event: &str,
        timeout: Duration,
        k: &mut Ktap,
    ) -> Result<Line, String> {
        let t0 = Instant::now();
        loop {
            for (l, shown) in self.lines.iter_mut() {
                if !*shown {
                    k.diag(&l.text());
                    *shown = true;
                }
            }
            if let Some(e) = self.lines.iter().find(|(l, _)| l.event == "error") {
                return Err(format!("{}: {}", e.0.role, e.0.rest));
            }
            if let Some(i) = self
                .lines
                .iter()
                .position(|(l, _)| l.role == role && l.event == event)
            {
                if let Some((l, _)) = self.lines.remove(i) {
                    return Ok(l);
                }
            }
            let left = timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                return Err(format!(
                    "no \"{role} {event}\" within {} s",
                    timeout.as_secs()
                ));
            }
            if !self.pump(left.min(Duration::from_millis(500)))? && self.pipes.iter().all(|p| p.2) {
                return Err(format!(
                    "the workers' output ended before \"{role} {event}\""
                ));
            }
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Code(c) => write!(f, "exit {c}"),
            Ended::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// `waitpid(pid)` (polled, so that it can give up after `timeout`).
fn wait_ended(pid: i32, timeout: Duration) -> Result<Ended, String> {
    let t0 = Instant::now();
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid, exclusively borrowed int for the call.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Ok(if libc::WIFSIGNALED(status) {
                Ended::Signal(libc::WTERMSIG(status))
            } else {
                Ended::Code(libc::WEXITSTATUS(status))
            });
        }
        if r < 0 {
            return Err(os_err(&format!("waitpid({pid})")));
        }
        if t0.elapsed() > timeout {
            return Err(format!(
                "pid {pid} still running after {} s",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The supervisor's KTAP tests, reported in their planned order; a failed step skips the rest.
struct Steps {
    k: Ktap,
    names: &'static [&'static str],
    next: usize,
    failed: Option<&'static str>,
}

impl Steps {
    fn ok(&mut self, name: &'static str) -> Result<(), ()> {
        self.done(name, Ok(()))
    }

    /// Reports `name` (which must be the next planned test) from `r`.
    fn done(&mut self, name: &'static str, r: Result<(), String>) -> Result<(), ()> {
        self.skip_to(name);
        let ok = self.k.check(name, r);
        if ok {
            Ok(())
        } else {
            self.failed.get_or_insert(name);
            Err(())
        }
    }

    /// Skips planned tests before `name` (there should be none).
    fn skip_to(&mut self, name: &str) {
        while self.next < self.names.len() && self.names[self.next] != name {
            let n = self.names[self.next];
            self.k.result(n, Outcome::Skip("not reached".into()));
            self.next += 1;
        }
        self.next += 1;
    }

    /// Skips every planned test before `name` because of the failed step.
    fn skip_rest_before(&mut self, name: &str) {
        let why = format!("{} failed", self.failed.unwrap_or("a step"));
        while self.next < self.names.len() && self.names[self.next] != name {
            let n = self.names[self.next];
            self.k.result(n, Outcome::Skip(why.clone()));
            self.next += 1;
        }
    }
}

/// The workers the supervisor started (killed and reaped if a step fails).
#[derive(Default)]
struct Procs {
    live: Vec<i32>,
}

impl Procs {
    fn add(&mut self, pid: i32) {
        self.live.push(pid);
    }

    fn reaped(&mut self, pid: i32) {
        self.live.retain(|&p| p != pid);
    }

    fn kill_all(&mut self) {
        for pid in std::mem::take(&mut self.live) {
            // SAFETY: kill takes no pointers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = wait_ended(pid, Duration::from_secs(10));
        }
    }
}

struct Super<'a> {
    case: Case,
    func: &'a Function,
    group: String,
    layout: Layout,
    reports: Reports,
    procs: Procs,
}

impl Super<'_> {
    fn worker_cmd(&self, role: &str) -> Result<Command, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut c = Command::new(exe);
        let worker = MmWorkerOptions {
            role: MmRole::from_word(role)?,
            case: self.case,
            bdf: Some(self.func.bdf.clone()),
            group: Some(self.group.clone()),
            iova: self.layout.base,
            buf_kib: Some(self.layout.buf_len as u64 / 1024),
        };
        c.arg(Program::MmTeardownWorker.name())
            .args(worker.to_args());
        c.stdout(Stdio::piped()).stderr(Stdio::inherit());
        Ok(c)
    }

    /// Starts a worker with `stdin`; its stdout becomes a report pipe. Returns its pid.
    fn spawn(
        &mut self,
        role: &str,
        stdin: Stdio,
    ) -> Result<(i32, Option<std::process::ChildStdin>), String> {
        let mut c = self.worker_cmd(role)?;
        c.stdin(stdin);
        let mut child = c.spawn().map_err(|e| format!("start the {role}: {e}"))?;
        let pid = child.id() as i32;
        self.procs.add(pid);
        let out = child
            .stdout
            .take()
            .ok_or_else(|| format!("no stdout pipe for the {role}"))?;
        self.reports.add(File::from(OwnedFd::from(out)));
        Ok((pid, child.stdin.take()))
    }

    fn wait(&mut self, pid: i32) -> Result<Ended, String> {
        let e = wait_ended(pid, STEP_TIMEOUT)?;
        self.procs.reaped(pid);
        Ok(e)
    }
}

/// After the last `waitpid`: the group must be free again (nothing holds the device), and a
/// marker page mapped through a new container marks the moment in the device's journal.
fn waited_marker(group: &str, layout: &Layout) -> Result<String, String> {
    let c = open_container()?;
    let g = attach_group(c.as_fd(), group).map_err(|e| {
        format!("{e}: the group is still held after waitpid returned (the device was not released)")
    })?;
    let p = Pages::new(PAGE)?;
    let iova = layout.mark(MARK_WAITED);
    map_dma(c.as_fd(), &p, iova)?;
    let n = unmap_dma(c.as_fd(), iova, PAGE as u64)?;
    p.free();
    ioctl_val(
        &g.as_fd(),
        vfio::VFIO_GROUP_UNSET_CONTAINER,
        0,
        "VFIO_GROUP_UNSET_CONTAINER",
    )?;
    drop(g);
    drop(c);
    Ok(format!(
        "group {group} opened again after waitpid; marker page mapped at 0x{iova:x} and unmapped ({n} bytes)"
    ))
}

/// Whether opening the group fails with EBUSY (someone holds it).
fn group_busy(group: &str) -> Result<bool, String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/dev/vfio/{group}"))
    {
        Ok(_) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(true),
        Err(e) => Err(format!("open /dev/vfio/{group}: {e}")),
    }
}

/// `pcisim-guest mm-teardown --vendor V --device D --case C [--bdf BDF] [--iova A] [--buf-kib N]`
pub fn run(ids: DeviceIds, o: MmTeardownOptions) -> i32 {
    let prepared = (|| -> Result<_, String> {
        let case = o.case;
        let layout = Layout {
            base: o.iova.unwrap_or(DEFAULT_IOVA),
            buf_len: buf_len(o.buf_kib)?,
        };
        if layout.base % (2 << 20) != 0 {
            return Err(format!("--iova 0x{:x}: not 2 MiB aligned", layout.base));
        }
        let (func, note) = pci::select_function(ids.vendor, ids.device, o.bdf.as_deref())?;
        Ok((case, layout, func, note))
    })();
    let (case, layout, func, note) = match prepared {
        Ok(p) => p,
        Err(e) => return setup_failure(&e),
    };
    let names = tests(case);
    let mut steps = Steps {
        k: Ktap::new(names.len()),
        names,
        next: 0,
        failed: None,
    };
    steps.k.diag(&format!(
        "mm teardown ({}) on {}: ring 0x{:x}, buffer 0x{:x}+0x{:x}, markers at 0x{:x}",
        case.word(),
        func.bdf,
        layout.ring(),
        layout.buf(),
        layout.buf_len,
        layout.mark(0)
    ));
    if let Some(n) = note {
        steps.k.diag(&n);
    }
    // The M3 child is reparented to us when its parent exits, so that we can waitpid it.
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes integers only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } < 0 {
        steps.k.diag(&os_err("PR_SET_CHILD_SUBREAPER"));
    }
    let mut binding = Binding::default();
    let r = vdev::bind(&func, &mut binding, &mut steps.k);
    if steps.done("vfio-bind", r).is_ok() {
        let mut sup = Super {
            case,
            func: &func,
            group: binding.group.clone().unwrap_or_default(),
            layout,
            reports: Reports::new(),
            procs: Procs::default(),
        };
        if drive(&mut sup, &mut steps).is_err() {
            sup.procs.kill_all();
        }
    }
    steps.skip_rest_before("vfio-release");
    let r = vdev::release(&func, &binding, None, false);
    let _ = steps.done("vfio-release", r);
    steps.k.finish()
}

/// Runs the case; a failed step returns `Err(())` (already reported).
fn drive(sup: &mut Super<'_>, steps: &mut Steps) -> Result<(), ()> {
    let case = sup.case;
    // M4's receiver first: it waits on its end of the socket pair for the opener's fds.
    let mut to_receiver: Option<OwnedFd> = None;
    let mut receiver_pid = 0;
    let opener_stdin = if case == Case::Pass {
        let (a, b) = seqpacket_pair().map_err(|e| fail(steps, "opener-streams", e))?;
        let (pid, _) = sup
            .spawn("receiver", Stdio::from(b))
            .map_err(|e| fail(steps, "opener-streams", e))?;
        receiver_pid = pid;
        let dup = a
            .try_clone()
            .map_err(|e| fail(steps, "opener-streams", format!("dup: {e}")))?;
        to_receiver = Some(a);
        Stdio::from(dup)
    } else {
        Stdio::piped()
    };
    let (opener, mut opener_in) = sup
        .spawn("opener", opener_stdin)
        .map_err(|e| fail(steps, "opener-streams", e))?;
    let ready = sup
        .reports
        .expect("opener", "ready", STEP_TIMEOUT, &mut steps.k)
        .map_err(|e| fail(steps, "opener-streams", e))?;
    steps.k.diag(&format!(
        "opener pid {opener}: the ring's FILLs land in its buffer ({} commands, word {})",
        ready.get("completed").unwrap_or("?"),
        ready.get("word").unwrap_or("?")
    ));
    steps.ok("opener-streams")?;

    match case {
        Case::Exit => {
            let r = (|| {
                let l = sup
                    .reports
                    .expect("opener", "exiting", STEP_TIMEOUT, &mut steps.k)?;
                let out = l.num("outstanding")?;
                let t0 = Instant::now();
                let e = sup.wait(opener)?;
                steps.k.diag(&format!(
                    "waitpid(opener) returned {e} {} ms after its last report",
                    t0.elapsed().as_millis()
                ));
                check_ended(e, Ended::Code(0), "the opener")?;
                if out == 0 {
                    return Err("the ring was idle when the process exited".into());
                }
                Ok(())
            })();
            steps.done("exit-with-dma-running", r)?;
        }
        Case::Kill => {
            let r = (|| {
                let l = sup
                    .reports
                    .expect("opener", "burst", STEP_TIMEOUT, &mut steps.k)?;
                let out = l.num("outstanding")?;
                // SAFETY: kill takes no pointers.
                if unsafe { libc::kill(opener, libc::SIGKILL) } < 0 {
                    return Err(os_err("kill(SIGKILL)"));
                }
                let e = sup.wait(opener)?;
                steps
                    .k
                    .diag(&format!("SIGKILL with {out} commands queued; waitpid: {e}"));
                check_ended(e, Ended::Signal(libc::SIGKILL), "the opener")?;
                if out == 0 {
                    return Err("the ring was idle when the process was killed".into());
                }
                Ok(())
            })();
            steps.done("sigkill-with-dma-running", r)?;
        }
        Case::Fork | Case::Pass => {
            let (holder_role, took_test, exit_test, cont_test, holder_exits) = if case == Case::Fork
            {
                (
                    "child",
                    "child-takes-over",
                    "parent-exits-device-kept",
                    "dma-continues-for-child",
                    "child-exits",
                )
            } else {
                (
                    "receiver",
                    "fds-passed",
                    "opener-exits-device-kept",
                    "dma-continues-for-receiver",
                    "receiver-exits",
                )
            };
            // Who holds the device after the opener: the forked child (its pid reported), or
            // the receiver (started above).
            let r = (|| {
                let holder = if case == Case::Fork {
                    let l = sup
                        .reports
                        .expect("child", "started", STEP_TIMEOUT, &mut steps.k)?;
                    let pid = l.num("pid")? as i32;
                    sup.procs.add(pid);
                    pid
                } else {
                    sup.reports
                        .expect("receiver", "got-fds", STEP_TIMEOUT, &mut steps.k)?;
                    receiver_pid
                };
                sup.reports
                    .expect(holder_role, "took-over", STEP_TIMEOUT, &mut steps.k)?;
                Ok(holder)
            })();
            let holder = r.clone().unwrap_or(0);
            steps.done(took_test, r.map(|_| ()))?;

            let r = (|| {
                sup.reports
                    .expect("opener", "handed-over", STEP_TIMEOUT, &mut steps.k)?;
                let e = sup.wait(opener)?;
                check_ended(e, Ended::Code(0), "the opener")?;
                let busy = group_busy(&sup.group)?;
                steps.k.diag(&format!(
                    "waitpid(opener) returned {e}; group {} {}",
                    sup.group,
                    if busy { "still held (EBUSY)" } else { "free" }
                ));
                if !busy {
                    return Err(format!(
                        "group {} is free after the opener's exit: nothing holds the device",
                        sup.group
                    ));
                }
                Ok(())
            })();
            steps.done(exit_test, r)?;

            let r = (|| {
                let msg = b"opener-exited\n";
                match (to_receiver.as_ref(), opener_in.as_mut()) {
                    (Some(sock), _) => write_fd(sock.as_fd(), msg)?,
                    (None, Some(pipe)) => pipe
                        .write_all(msg)
                        .map_err(|e| format!("write to the child: {e}"))?,
                    (None, None) => return Err("no way to reach the holder".into()),
                }
                let l = sup
                    .reports
                    .expect(holder_role, "progress", STEP_TIMEOUT, &mut steps.k)?;
                let (c0, c1) = (l.num("c0")?, l.num("c1")?);
                let done = (c1 as u32).wrapping_sub(c0 as u32);
                steps.k.diag(&format!(
                    "{holder_role}: {done} commands completed in {} ms after the opener's exit",
                    HOLD.as_millis()
                ));
                if let (Some(a), Some(b)) = (l.get("copy0"), l.get("copy1")) {
                    steps.k.diag(&format!(
                        "the child's copy of the buffer's first word: {a} -> {b} ({})",
                        if a == b {
                            "unchanged: the device writes the parent's pinned pages, the child got copies at fork"
                        } else {
                            "changed: the child shares the device's pages"
                        }
                    ));
                }
                if done == 0 {
                    return Err(format!("CMDS_COMPLETED did not advance ({c0} -> {c1})"));
                }
                Ok(())
            })();
            steps.done(cont_test, r)?;

            let r = (|| {
                sup.reports
                    .expect(holder_role, "exiting", STEP_TIMEOUT, &mut steps.k)?;
                let e = sup.wait(holder)?;
                steps
                    .k
                    .diag(&format!("waitpid({holder_role}) returned {e}"));
                check_ended(e, Ended::Code(0), holder_role)
            })();
            steps.done(holder_exits, r)?;
        }
        Case::BarMmap => {
            let r = (|| {
                let l = sup
                    .reports
                    .expect("opener", "fds-closed", STEP_TIMEOUT, &mut steps.k)?;
                let left = l.num("vfio-fds")?;
                if left != 0 {
                    return Err(format!("{left} vfio fds still open"));
                }
                if l.num("id")? != u64::from(gpu::ID_MAGIC) {
                    return Err("ID through the mapping is wrong".into());
                }
                Ok(())
            })();
            steps.done("bar-mmap-outlives-fds", r)?;
            let r = (|| {
                let l = sup
                    .reports
                    .expect("opener", "progress", STEP_TIMEOUT, &mut steps.k)?;
                let (c0, c1) = (l.num("c0")?, l.num("c1")?);
                if (c1 as u32).wrapping_sub(c0 as u32) == 0 {
                    return Err(format!("CMDS_COMPLETED did not advance ({c0} -> {c1})"));
                }
                Ok(())
            })();
            steps.done("dma-continues-through-mapping", r)?;
            let r = (|| {
                sup.reports
                    .expect("opener", "exiting", STEP_TIMEOUT, &mut steps.k)?;
                let e = sup.wait(opener)?;
                steps.k.diag(&format!("waitpid(opener) returned {e}"));
                check_ended(e, Ended::Code(0), "the opener")
            })();
            steps.done("exit-with-mapping", r)?;
        }
    }
    let r = waited_marker(&sup.group, &sup.layout).map(|m| steps.k.diag(&m));
    steps.done("released-before-waitpid", r)?;
    drop(to_receiver);
    Ok(())
}

fn fail(steps: &mut Steps, name: &'static str, why: String) {
    let _ = steps.done(name, Err(why));
}

fn check_ended(e: Ended, want: Ended, who: &str) -> Result<(), String> {
    if e == want {
        Ok(())
    } else {
        Err(format!("{who} ended with {e}, expected {want}"))
    }
}

/// A close-on-exec AF_UNIX SOCK_SEQPACKET pair (message boundaries kept).
fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a live array of two ints for the kernel to fill.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(os_err("socketpair"));
    }
    // SAFETY: both are new descriptors that we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_patterns() {
        let l = Layout {
            base: DEFAULT_IOVA,
            buf_len: 1 << 20,
        };
        assert_eq!(l.ring(), 0x5000_0000);
        assert_eq!(l.buf(), 0x5020_0000);
        assert_eq!(l.mark(MARK_WAITED), 0x5800_2000);
        // Every slot's pattern is recognised, and nothing else of the family is.
        for s in 0..RING_ENTRIES {
            assert_eq!(slot_pattern(s) & PATTERN_MASK, PATTERN_BASE);
        }
        assert_ne!(0x4D4C_0001 & PATTERN_MASK, PATTERN_BASE);
        assert_ne!((PATTERN_BASE | 0x80) & PATTERN_MASK, PATTERN_BASE);
        assert_eq!(buf_len(None).unwrap(), 16 << 20);
        assert!(buf_len(Some(3)).is_err());
        assert_eq!(buf_len(Some(8)).unwrap(), 8192);
        for c in [
            Case::Exit,
            Case::Kill,
            Case::Fork,
            Case::Pass,
            Case::BarMmap,
        ] {
            let t = tests(c);
            assert_eq!(t.first(), Some(&"vfio-bind"));
            assert_eq!(t.last(), Some(&"vfio-release"));
            assert!(t.contains(&"released-before-waitpid"));
        }
    }

    #[test]
    fn report_lines_parse() {
        let l = Line::parse("child progress c0=10 c1=0x20 copy0=0x4d4d0001\n").unwrap();
        assert_eq!((l.role.as_str(), l.event.as_str()), ("child", "progress"));
        assert_eq!(l.num("c0").unwrap(), 10);
        assert_eq!(l.num("c1").unwrap(), 0x20);
        assert_eq!(l.get("copy0"), Some("0x4d4d0001"));
        // A key that is a prefix of another is not confused with it.
        assert!(l.get("c").is_none());
        assert!(l.num("missing").is_err());
        assert!(Line::parse("lonely").is_none());
        assert_eq!(Line::parse("opener ready").unwrap().rest, "");
    }

    #[test]
    fn scm_rights_round_trip() {
        let (a, b) = seqpacket_pair().unwrap();
        let (r, w) = pipe().unwrap();
        sys::send_fds(a.as_fd(), &[w.as_raw_fd()]).unwrap();
        let got = sys::recv_fds(b.as_fd(), 3, Duration::from_secs(5)).unwrap();
        assert_eq!(got.len(), 1);
        // The received fd is the same pipe: a write through it arrives at `r`.
        write_fd(got[0].as_fd(), b"x").unwrap();
        assert_eq!(
            read_within(r.as_fd(), Duration::from_secs(5)).unwrap(),
            b"x"
        );
    }

    // The children are reaped by `wait_ended`, which is what is tested.
    #[allow(clippy::zombie_processes)]
    #[test]
    fn wait_ended_reports_code_and_signal() {
        let c = Command::new("/bin/sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        assert_eq!(
            wait_ended(c.id() as i32, Duration::from_secs(10)).unwrap(),
            Ended::Code(3)
        );
        let c2 = Command::new("/bin/sh")
            .args(["-c", "kill -9 $$"])
            .spawn()
            .unwrap();
        assert_eq!(
            wait_ended(c2.id() as i32, Duration::from_secs(10)).unwrap(),
            Ended::Signal(9)
        );
        // Already reaped: an error, not a hang.
        assert!(wait_ended(c.id() as i32, Duration::from_millis(10)).is_err());
    }
}
