//! The `Device` trait: what a backend implements so the server can expose it over vfio-user.
//!
//! The server owns everything that belongs to the *client relationship*: the socket, the DMA map
//! table and the interrupt eventfds. A device owns its registers and state. The two meet through
//! [`Device`] (the server calls into the device for region accesses and resets) and [`ClientLink`]
//! (the device signals interrupts and performs DMA through handles the server gives it when a
//! client attaches).

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::dma::DmaSpace;
use crate::irq::Interrupts;

/// Region indices of a vfio PCI device (`VFIO_PCI_*_REGION_INDEX` in linux/vfio.h).
pub mod region {
    /// BAR0 .. BAR5 are regions 0 .. 5.
    pub const BAR0: u32 = 0;
    /// BAR2, the usual home of a large prefetchable aperture.
    pub const BAR2: u32 = 2;
    /// The expansion ROM.
    pub const ROM: u32 = 6;
    /// PCI configuration space.
    pub const CONFIG: u32 = 7;
    /// The VGA legacy ranges.
    pub const VGA: u32 = 8;
    /// Number of regions a vfio PCI device reports.
    pub const COUNT: u32 = 9;
}

/// Interrupt indices of a vfio PCI device (`VFIO_PCI_*_IRQ_INDEX` in linux/vfio.h).
pub mod irq_index {
    /// Legacy INTx.
    pub const INTX: u32 = 0;
    /// MSI.
    pub const MSI: u32 = 1;
    /// MSI-X.
    pub const MSIX: u32 = 2;
    /// Error notification (AER to userspace). Signalling it stops QEMU's VM: never signal it.
    pub const ERR: u32 = 3;
    /// Device request (the kernel asks userspace to release the device).
    pub const REQ: u32 = 4;
    /// Number of interrupt indices a vfio PCI device reports.
    pub const COUNT: u32 = 5;
}

/// Access rights and properties of a region, as reported in DEVICE_GET_REGION_INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegionFlags {
    /// The client may read the region.
    pub read: bool,
    /// The client may write the region.
    pub write: bool,
    /// (Parts of) the region may be mmapped through the fd in [`RegionMmap`].
    pub mmap: bool,
}

/// A part of a region the client may map directly (an area of the sparse-mmap capability).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseArea {
    /// Offset of the area inside the region.
    pub offset: u64,
    /// Size of the area in bytes.
    pub size: u64,
}

/// How a region's mmap-able parts are backed: the fd sent with DEVICE_GET_REGION_INFO.
#[derive(Debug, Clone)]
pub struct RegionMmap {
    /// The file backing the region (e.g. a memfd for VRAM). Region offset 0 is file offset
    /// `file_offset`.
    pub fd: Arc<OwnedFd>,
    /// File offset of region offset 0; reported as the region's `offset` field.
    pub file_offset: u64,
    /// The mmap-able areas, reported through `VFIO_REGION_INFO_CAP_SPARSE_MMAP`.
    pub areas: Vec<SparseArea>,
}

/// One region as the client sees it.
#[derive(Debug, Clone, Default)]
pub struct RegionInfo {
    /// Size in bytes (0 for an absent region, e.g. an unused BAR).
    pub size: u64,
    /// Access flags.
    pub flags: RegionFlags,
    /// Direct-mapping information for mmap-able regions.
    pub mmap: Option<RegionMmap>,
}

/// One interrupt index as the client sees it (`struct vfio_irq_info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IrqInfo {
    /// Number of vectors (0: the index is not supported).
    pub count: u32,
    /// `VFIO_IRQ_INFO_*` flags (EVENTFD, MASKABLE, AUTOMASKED, NORESIZE).
    pub flags: u32,
}

/// Errors a device returns from a region access or reset. Each maps to the errno the client
/// receives in the error reply.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The access falls outside the region, or the region does not exist or is not accessible.
    #[error("Region {region} access at {offset:#x}+{len} is out of range")]
    OutOfRange {
        /// Region index.
        region: u32,
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
    },
    /// The access has a size or alignment the region does not accept.
    #[error("Region {region} does not accept a {len}-byte access at {offset:#x}")]
    BadAccess {
        /// Region index.
        region: u32,
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
    },
    /// The device cannot do this (e.g. no reset).
    #[error("Not supported: {0}")]
    NotSupported(&'static str),
    /// The device is busy and the client should retry.
    #[error("Device busy: {0}")]
    Busy(&'static str),
    /// Backing storage failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl DeviceError {
    /// The errno carried by the error reply. Never 0: QEMU treats error 0 as success.
    pub fn errno(&self) -> i32 {
        match self {
            DeviceError::OutOfRange { .. } => libc::EINVAL,
            DeviceError::BadAccess { .. } => libc::EINVAL,
            DeviceError::NotSupported(_) => libc::ENOTSUP,
            DeviceError::Busy(_) => libc::EBUSY,
            DeviceError::Io(e) => e.raw_os_error().filter(|e| *e != 0).unwrap_or(libc::EIO),
        }
    }
}

/// What the server hands a device when a client attaches: the client's interrupt eventfds and
/// its DMA address space. Both handles are cheap to clone and may be used from device threads.
#[derive(Debug, Clone)]
pub struct ClientLink {
    /// Interrupt signalling towards the client.
    pub irqs: Interrupts,
    /// DMA into the client's mapped memory.
    pub dma: DmaSpace,
}

/// A device backend served over vfio-user. One instance per socket; it outlives clients.
///
/// Its regions and interrupt indices (what `region_info` and `irq_info` report) are fixed for
/// its lifetime: the server reads them once per client.
///
/// Every method must return promptly: the client waits synchronously for most replies and
/// declares the server dead after its message timeout (QEMU: 5 s).
pub trait Device: Send {
    /// `VFIO_DEVICE_FLAGS_*` reported by DEVICE_GET_INFO (the server adds nothing).
    fn device_flags(&self) -> u32;
    /// The region with this index, or `None` past the last region.
    fn region_info(&self, index: u32) -> Option<RegionInfo>;
    /// The interrupt index with this number, or `None` past the last index.
    fn irq_info(&self, index: u32) -> Option<IrqInfo>;
    /// A client read of `buf.len()` bytes at `offset` in region `index`.
    fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;
    /// A client write of `data` at `offset` in region `index`.
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError>;
    /// A client attached: from now on interrupts and DMA go through `link`.
    fn attach(&mut self, link: ClientLink);
    /// The client went away (EOF, protocol error, or kill). DMA and eventfds are already gone;
    /// the device keeps its identity and waits for the next client.
    fn detach(&mut self);
    /// DEVICE_RESET from the client (machine reset, secondary bus or slot reset).
    fn reset(&mut self) -> Result<(), DeviceError>;
    /// A DMA_MAP was applied (before the client is told). For the device's journal.
    fn dma_mapped(&mut self, mapping: &crate::dma::MappingInfo) {
        let _ = mapping;
    }
    /// DMA_UNMAP removed these mappings; in-flight accesses to them have drained. Called before
    /// the client is told.
    fn dma_unmapped(&mut self, removed: &[crate::dma::MappingInfo]) {
        let _ = removed;
    }
    /// The client changed the eventfds or masks of interrupt index `index` (e.g. so the device
    /// can deliver interrupts that were pending while no eventfd was bound).
    fn irqs_changed(&mut self, index: u32) {
        let _ = index;
    }
}

/// Lock a shared device, ignoring poison.
pub(crate) fn lock<'a>(d: &'a Mutex<dyn Device + 'static>) -> MutexGuard<'a, dyn Device + 'static> {
    // Device state stays usable after a panic elsewhere; there is no invariant a half-finished
    // region access could break that a reset would not repair.
    d.lock().unwrap_or_else(PoisonError::into_inner)
}
