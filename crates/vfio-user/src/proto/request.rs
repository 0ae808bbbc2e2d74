//! [`Request`], the decoded form of every command, and [`decode`], which checks the header and
//! hands the payload to the decoder of the command's family (the sibling modules). The family
//! decoders are `#[inline]` so that `decode` compiles to the single match it was written as
//! before the split: REGION_READ runs through it on every guest MMIO read.

use super::device_info::{decode_get_info, decode_get_irq_info, decode_get_region_info};
use super::dma_map::{decode_dma_map, decode_dma_unmap};
use super::error::short;
use super::negotiate::decode_version;
use super::region_access::{decode_region_read, decode_region_write, decode_region_write_multi};
use super::set_irqs::decode_set_irqs;
use super::{Command, Header, ProtoError, Reader, FLAG_NO_REPLY, FLAG_TYPE_MASK};

/// A decoded command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// VERSION.
    Version {
        /// Client major version.
        major: u16,
        /// Client minor version.
        minor: u16,
        /// The client's capabilities (`{"capabilities":{...}}`), `Null` if absent.
        caps: serde_json::Value,
    },
    /// DMA_MAP.
    DmaMap {
        /// READ/WRITE flags.
        flags: u32,
        /// Offset into the fd.
        offset: u64,
        /// IOVA.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// DMA_UNMAP.
    DmaUnmap {
        /// argsz as sent (echoed in the reply).
        argsz: u32,
        /// Flags.
        flags: u32,
        /// IOVA.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// DEVICE_GET_INFO.
    GetInfo {
        /// Room the client has for the reply payload.
        argsz: u32,
    },
    /// DEVICE_GET_REGION_INFO.
    GetRegionInfo {
        /// Room the client has for the reply payload.
        argsz: u32,
        /// Region index.
        index: u32,
    },
    /// DEVICE_GET_IRQ_INFO.
    GetIrqInfo {
        /// Room the client has for the reply payload.
        argsz: u32,
        /// Interrupt index.
        index: u32,
    },
    /// DEVICE_SET_IRQS.
    SetIrqs {
        /// DATA_* | ACTION_* flags (exactly one of each).
        flags: u32,
        /// Interrupt index.
        index: u32,
        /// First vector.
        start: u32,
        /// Number of vectors.
        count: u32,
        /// DATA_BOOL: one byte per vector.
        bools: Vec<u8>,
    },
    /// REGION_READ.
    RegionRead {
        /// Offset in the region.
        offset: u64,
        /// Region index.
        region: u32,
        /// Bytes to read.
        count: u32,
    },
    /// REGION_WRITE.
    RegionWrite {
        /// Offset in the region.
        offset: u64,
        /// Region index.
        region: u32,
        /// The bytes.
        data: Vec<u8>,
    },
    /// REGION_WRITE_MULTI.
    RegionWriteMulti {
        /// The writes, in order.
        writes: Vec<MultiWrite>,
    },
    /// DEVICE_RESET.
    DeviceReset,
}

/// One write of a REGION_WRITE_MULTI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiWrite {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// The bytes (at most 8).
    pub data: Vec<u8>,
}

/// Limits a decode must respect (negotiated or fixed by the server).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest REGION_READ/REGION_WRITE data transfer.
    pub max_data_xfer_size: usize,
}

/// Decode a complete command frame's payload. Pure: never panics, never allocates more than the
/// payload's size (plus a bounded number of small vectors).
///
/// Payload lengths follow the kernel's `argsz` convention wherever the request is a VFIO ioctl
/// structure (DMA_MAP, DMA_UNMAP, DEVICE_GET_INFO, DEVICE_GET_REGION_INFO, DEVICE_GET_IRQ_INFO,
/// DEVICE_SET_IRQS): a payload at least as long as the structure is accepted and its tail
/// ignored, because clients other than QEMU (libvfio-user's, and anything built on the ioctl
/// structures) send a request as long as the reply they expect — e.g. DEVICE_GET_REGION_INFO
/// with 64 bytes after a first reply said `argsz` = 64. A shorter payload is EINVAL. Requests
/// that are not ioctl structures keep exact lengths: VERSION (its JSON runs to the end),
/// REGION_READ (16 bytes: it has no `argsz` and no ioctl behind it), REGION_WRITE (16 + `count`), REGION_WRITE_MULTI (8 + 24 × n) and
/// DEVICE_RESET (no payload).
pub fn decode(header: &Header, payload: &[u8], limits: &Limits) -> Result<Request, ProtoError> {
    if !header.is_command() {
        return Err(ProtoError::NotACommand(header.flags & FLAG_TYPE_MASK));
    }
    // The spec defines the type, No_reply and Error bits; a command may only carry No_reply.
    if header.flags & !(FLAG_TYPE_MASK | FLAG_NO_REPLY) != 0 {
        return Err(ProtoError::BadHeaderFlags(header.flags));
    }
    let cmd =
        Command::from_u16(header.command).ok_or(ProtoError::UnknownCommand(header.command))?;
    let mut r = Reader::new(payload);
    let len = payload.len();
    match cmd {
        Command::Version => decode_version(cmd, &mut r, len),
        Command::DmaMap => decode_dma_map(cmd, &mut r, len),
        Command::DmaUnmap => decode_dma_unmap(cmd, &mut r, len),
        Command::DeviceGetInfo => decode_get_info(cmd, &mut r, len),
        Command::DeviceGetRegionInfo => decode_get_region_info(cmd, &mut r, len),
        Command::DeviceGetIrqInfo => decode_get_irq_info(cmd, &mut r, len),
        Command::DeviceSetIrqs => decode_set_irqs(cmd, &mut r, len),
        Command::RegionRead => decode_region_read(cmd, &mut r, len, limits),
        Command::RegionWrite => decode_region_write(cmd, &mut r, len, limits),
        Command::RegionWriteMulti => decode_region_write_multi(cmd, &mut r, len),
        Command::DeviceReset => {
            if len != 0 {
                return Err(short(cmd, len, "0 bytes"));
            }
            Ok(Request::DeviceReset)
        }
        Command::DeviceGetRegionIoFds
        | Command::DmaRead
        | Command::DmaWrite
        | Command::DirtyPages
        | Command::DeviceFeature
        | Command::MigDataRead
        | Command::MigDataWrite => Err(ProtoError::Unsupported(cmd)),
    }
}
