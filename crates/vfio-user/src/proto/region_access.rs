//! REGION_READ, REGION_WRITE and REGION_WRITE_MULTI: the guest's accesses to device regions.
//! REGION_READ is the hot path (every guest MMIO read): its decoder keeps its exact-length check
//! and reads the three fields straight from the cursor.

use super::error::short;
use super::{Command, Limits, MultiWrite, ProtoError, Reader, Request};

/// REGION_WRITE_MULTI: bytes of data in one coalesced write.
pub const MULTI_DATA: usize = 8;
/// REGION_WRITE_MULTI: most writes in one message (QEMU's `VFIO_USER_MULTI_MAX`).
pub const MULTI_MAX: u64 = 200;

/// REGION_READ: offset, region and count, exactly 16 bytes.
#[inline]
pub(super) fn decode_region_read(
    cmd: Command,
    r: &mut Reader<'_>,
    len: usize,
    limits: &Limits,
) -> Result<Request, ProtoError> {
    if len != 16 {
        return Err(short(cmd, len, "16 bytes"));
    }
    let (Some(offset), Some(region), Some(count)) = (r.u64(), r.u32(), r.u32()) else {
        return Err(short(cmd, len, "16 bytes"));
    };
    if count as usize > limits.max_data_xfer_size {
        return Err(ProtoError::TooBig {
            command: cmd,
            count: count.into(),
            max: limits.max_data_xfer_size,
        });
    }
    Ok(Request::RegionRead {
        offset,
        region,
        count,
    })
}

/// REGION_WRITE: offset, region, count and `count` bytes of data.
#[inline]
pub(super) fn decode_region_write(
    cmd: Command,
    r: &mut Reader<'_>,
    len: usize,
    limits: &Limits,
) -> Result<Request, ProtoError> {
    let (Some(offset), Some(region), Some(count)) = (r.u64(), r.u32(), r.u32()) else {
        return Err(short(cmd, len, "at least 16 bytes"));
    };
    if count as usize > limits.max_data_xfer_size {
        return Err(ProtoError::TooBig {
            command: cmd,
            count: count.into(),
            max: limits.max_data_xfer_size,
        });
    }
    let data = r.rest();
    if data.len() != count as usize {
        return Err(short(cmd, len, "16 bytes + count"));
    }
    Ok(Request::RegionWrite {
        offset,
        region,
        data: data.to_vec(),
    })
}

/// REGION_WRITE_MULTI: a count of writes, then 24 bytes each (at most 8 bytes of data).
#[inline]
pub(super) fn decode_region_write_multi(
    cmd: Command,
    r: &mut Reader<'_>,
    len: usize,
) -> Result<Request, ProtoError> {
    let Some(n) = r.u64() else {
        return Err(short(cmd, len, "at least 8 bytes"));
    };
    if n == 0 || n > MULTI_MAX {
        return Err(ProtoError::BadField {
            command: cmd,
            field: "wr_cnt",
        });
    }
    // QEMU sends the whole array of MULTI_MAX slots or just the used ones; accept both.
    let need = 24 * n as usize;
    if r.rest().len() < need
        || !(r.rest().len() - need).is_multiple_of(24)
        || r.rest().len() > 24 * MULTI_MAX as usize
    {
        return Err(short(cmd, len, "8 + 24 * wr_cnt bytes"));
    }
    let mut writes = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let (Some(offset), Some(region), Some(count), Some(data)) =
            (r.u64(), r.u32(), r.u32(), r.bytes(MULTI_DATA))
        else {
            return Err(short(cmd, len, "8 + 24 * wr_cnt bytes"));
        };
        if count == 0 || count as usize > MULTI_DATA {
            return Err(ProtoError::BadField {
                command: cmd,
                field: "count",
            });
        }
        let data = data.get(..count as usize).unwrap_or(&[]).to_vec();
        writes.push(MultiWrite {
            offset,
            region,
            data,
        });
    }
    Ok(Request::RegionWriteMulti { writes })
}
