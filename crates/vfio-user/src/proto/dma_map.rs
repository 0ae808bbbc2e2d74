//! DMA_MAP and DMA_UNMAP: the client announcing and withdrawing its memory, and their flags.

use super::error::short;
use super::{Command, ProtoError, Reader, Request};

/// DMA_UNMAP flag: return a dirty bitmap (not supported: we do no migration).
pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// DMA_UNMAP flag: unmap everything (`VFIO_DMA_UNMAP_FLAG_ALL` in linux/vfio.h).
pub const DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

/// DMA_MAP: `argsz`, protection flags, file offset, IOVA and size.
#[inline]
pub(super) fn decode_dma_map(
    cmd: Command,
    r: &mut Reader<'_>,
    len: usize,
) -> Result<Request, ProtoError> {
    let f = (r.u32(), r.u32(), r.u64(), r.u64(), r.u64());
    // A longer payload is accepted and its tail ignored (see `decode`'s doc).
    let (Some(argsz), Some(flags), Some(offset), Some(iova), Some(size)) = f else {
        return Err(short(cmd, len, "at least 32 bytes"));
    };
    if (argsz as usize) < 32 {
        return Err(ProtoError::BadField {
            command: cmd,
            field: "argsz",
        });
    }
    if flags & !(crate::dma::PROT_READ | crate::dma::PROT_WRITE) != 0 {
        return Err(ProtoError::BadField {
            command: cmd,
            field: "flags",
        });
    }
    Ok(Request::DmaMap {
        flags,
        offset,
        iova,
        size,
    })
}

/// DMA_UNMAP: `argsz`, flags (UNMAP_ALL, no dirty bitmap), IOVA and size.
#[inline]
pub(super) fn decode_dma_unmap(
    cmd: Command,
    r: &mut Reader<'_>,
    len: usize,
) -> Result<Request, ProtoError> {
    let f = (r.u32(), r.u32(), r.u64(), r.u64());
    let (Some(argsz), Some(flags), Some(iova), Some(size)) = f else {
        return Err(short(cmd, len, "at least 24 bytes"));
    };
    if (argsz as usize) < 24 {
        return Err(ProtoError::BadField {
            command: cmd,
            field: "argsz",
        });
    }
    if flags & !(DMA_UNMAP_FLAG_ALL | DMA_UNMAP_FLAG_GET_DIRTY_BITMAP) != 0 {
        return Err(ProtoError::BadField {
            command: cmd,
            field: "flags",
        });
    }
    if flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
        return Err(ProtoError::Unsupported(Command::DirtyPages));
    }
    if flags & DMA_UNMAP_FLAG_ALL != 0 && (iova != 0 || size != 0) {
        return Err(ProtoError::BadField {
            command: cmd,
            field: "address/size with UNMAP_ALL",
        });
    }
    Ok(Request::DmaUnmap {
        argsz,
        flags,
        iova,
        size,
    })
}
