//! DEVICE_GET_INFO, DEVICE_GET_REGION_INFO and DEVICE_GET_IRQ_INFO: the device, region and
//! interrupt descriptions a client asks for at setup, and the VFIO flag bits their replies carry.

use super::error::short;
use super::{Command, ProtoError, Reader, Request};

/// `VFIO_DEVICE_FLAGS_RESET` (linux/vfio.h): the device supports DEVICE_RESET.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// `VFIO_DEVICE_FLAGS_PCI` (linux/vfio.h): the device is a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// `VFIO_REGION_INFO_FLAG_READ`.
pub const REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// `VFIO_REGION_INFO_FLAG_WRITE`.
pub const REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_REGION_INFO_FLAG_MMAP`.
pub const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// `VFIO_REGION_INFO_FLAG_CAPS`.
pub const REGION_INFO_FLAG_CAPS: u32 = 1 << 3;
/// `VFIO_REGION_INFO_CAP_SPARSE_MMAP`.
pub const REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;

/// `VFIO_IRQ_INFO_EVENTFD`.
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// `VFIO_IRQ_INFO_MASKABLE`.
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// `VFIO_IRQ_INFO_AUTOMASKED`.
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
/// `VFIO_IRQ_INFO_NORESIZE`.
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;

/// DEVICE_GET_INFO: the room the client has for the reply.
#[inline]
pub(super) fn decode_get_info(
    cmd: Command,
    r: &mut Reader<'_>,
    len: usize,
) -> Result<Request, ProtoError> {
    if len < 16 {
        return Err(short(cmd, len, "at least 16 bytes"));
    }
    let Some(argsz) = r.u32() else {
        return Err(short(cmd, len, "at least 16 bytes"));
    };
    if argsz < 16 {
        return Err(ProtoError::BadField {
            command: cmd,
            field: "argsz",
        });
    }
    Ok(Request::GetInfo { argsz })
}

/// DEVICE_GET_REGION_INFO: `argsz` and the region index.
#[inline]
pub(super) fn decode_get_region_info(
    cmd: Command,
    r: &mut Reader<'_>,
    len: usize,
) -> Result<Request, ProtoError> {
    let (argsz, index) = argsz_and_index(cmd, r, len, 32, "at least 32 bytes")?;
    Ok(Request::GetRegionInfo { argsz, index })
}

/// DEVICE_GET_IRQ_INFO: `argsz` and the interrupt index.
#[inline]
pub(super) fn decode_get_irq_info(
    cmd: Command,
    r: &mut Reader<'_>,
    len: usize,
) -> Result<Request, ProtoError> {
    let (argsz, index) = argsz_and_index(cmd, r, len, 16, "at least 16 bytes")?;
    Ok(Request::GetIrqInfo { argsz, index })
}

/// The `argsz`, `flags` (ignored) and `index` words that start DEVICE_GET_REGION_INFO and
/// DEVICE_GET_IRQ_INFO: the payload and `argsz` must both be at least `min` bytes (the
/// structure's size; `expected` says so in the error), a longer payload's tail is ignored.
#[inline]
fn argsz_and_index(
    cmd: Command,
    r: &mut Reader<'_>,
    len: usize,
    min: u32,
    expected: &'static str,
) -> Result<(u32, u32), ProtoError> {
    if len < min as usize {
        return Err(short(cmd, len, expected));
    }
    let (Some(argsz), Some(_flags), Some(index)) = (r.u32(), r.u32(), r.u32()) else {
        return Err(short(cmd, len, expected));
    };
    if argsz < min {
        return Err(ProtoError::BadField {
            command: cmd,
            field: "argsz",
        });
    }
    Ok((argsz, index))
}
