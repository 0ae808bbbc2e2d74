//! DEVICE_SET_IRQS: binding, masking, unmasking and triggering interrupts, with its DATA_* and
//! ACTION_* flag bits (exactly one of each per request).

use super::error::short;
use super::{Command, ProtoError, Reader, Request};

/// `VFIO_IRQ_SET_DATA_NONE`.
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// `VFIO_IRQ_SET_DATA_BOOL`.
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
/// `VFIO_IRQ_SET_DATA_EVENTFD`.
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// `VFIO_IRQ_SET_ACTION_MASK`.
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
/// `VFIO_IRQ_SET_ACTION_UNMASK`.
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
/// `VFIO_IRQ_SET_ACTION_TRIGGER`.
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
const IRQ_SET_DATA_MASK: u32 = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD;
const IRQ_SET_ACTION_MASK_ALL: u32 =
    IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER;

/// DEVICE_SET_IRQS: flags, index, start, count and, for DATA_BOOL, one byte per vector.
#[inline]
pub(super) fn decode_set_irqs(
    cmd: Command,
    r: &mut Reader<'_>,
    len: usize,
) -> Result<Request, ProtoError> {
    let f = (r.u32(), r.u32(), r.u32(), r.u32(), r.u32());
    let (Some(argsz), Some(flags), Some(index), Some(start), Some(count)) = f else {
        return Err(short(cmd, len, "at least 20 bytes"));
    };
    let data = flags & IRQ_SET_DATA_MASK;
    let action = flags & IRQ_SET_ACTION_MASK_ALL;
    let unknown = flags & !(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK_ALL);
    if unknown != 0 || data.count_ones() != 1 || action.count_ones() != 1 {
        return Err(ProtoError::BadField {
            command: cmd,
            field: "flags",
        });
    }
    // As the kernel (vfio_set_irqs_validate_and_prepare): the data is `count` elements
    // right after the structure, and whatever follows them is ignored. DATA_NONE and
    // DATA_EVENTFD carry no in-band data (eventfds travel as SCM_RIGHTS), so any tail
    // after the 20 bytes is ignored too.
    let rest = r.rest();
    let bools = if data == IRQ_SET_DATA_BOOL {
        match rest.get(..count as usize) {
            Some(b) => b.to_vec(),
            None => return Err(short(cmd, len, "20 bytes + one byte per vector")),
        }
    } else {
        Vec::new()
    };
    // argsz covers the structure and, for DATA_BOOL, the bools that follow it (QEMU
    // sends argsz = 20 + count; the kernel's rule is argsz - 20 >= count * data size).
    // Eventfds travel as SCM_RIGHTS, so for DATA_EVENTFD only the 20 bytes count
    // (QEMU sends 20; a client copying the ioctl's argsz may send 20 + 4 * count).
    let needed = if data == IRQ_SET_DATA_BOOL {
        20 + u64::from(count)
    } else {
        20
    };
    if u64::from(argsz) < needed {
        return Err(ProtoError::BadField {
            command: cmd,
            field: "argsz",
        });
    }
    Ok(Request::SetIrqs {
        flags,
        index,
        start,
        count,
        bools,
    })
}
