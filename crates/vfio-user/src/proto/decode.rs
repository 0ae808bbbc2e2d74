//! [`decode`], which checks the header and hands the payload to the decoder of the command's
//! family (the sibling modules). The family decoders are `#[inline]` so that `decode` compiles
//! to the single match it was written as before the split: REGION_READ runs through it on every
//! guest MMIO read. Kept apart from [`Request`] so that the families depend on the type and
//! this module on the families, one way.

use super::device_info::{decode_get_info, decode_get_irq_info, decode_get_region_info};
use super::dma_map::{decode_dma_map, decode_dma_unmap};
use super::error::short;
use super::negotiate::decode_version;
use super::region_access::{decode_region_read, decode_region_write, decode_region_write_multi};
use super::set_irqs::decode_set_irqs;
use super::{Command, Header, Limits, ProtoError, Reader, Request, FLAG_NO_REPLY, FLAG_TYPE_MASK};

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
