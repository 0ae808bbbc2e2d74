//! The user interface of the NPU guest driver `pcisim_npu.ko` (guest-tests/kmod/
//! pcisim_npu_uapi.h, which stays a hand-written uapi header; the test `c_header` parses it and
//! checks every number and struct layout here against it).
//!
//! One character device per NPU function, `/dev/pcisim-npuN`: open() binds the opener's mm to a
//! fresh PASID; the ioctls submit work on the opener's virtual addresses (docs/sva.md).

use super::regs;

/// `struct pcisim_npu_info` (out of [`IOC_INFO`]).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    /// The PASID of this file's binding.
    pub pasid: u32,
    /// `INFO_*`.
    pub flags: u32,
    /// Physical address of the page-table root given to BIND.
    pub root: u64,
    /// tgid of the opener.
    pub owner_pid: u32,
    /// Live contexts (open files) of the device.
    pub contexts: u32,
    /// Reserved.
    pub reserved: u64,
}

/// `struct pcisim_npu_work` (in and out of [`IOC_SUBMIT`], [`IOC_WAIT`]).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    /// In: `OP_*`.
    pub op: u32,
    /// In: [`WAIT`], [`NO_FAULT_SERVICE`].
    pub flags: u32,
    /// In: source VA (FILL: pattern).
    pub src: u64,
    /// In: destination VA.
    pub dst: u64,
    /// In: bytes.
    pub len: u64,
    /// Out of SUBMIT, in to WAIT.
    pub ticket: u64,
    /// Out: `ST_*` of the last descriptor.
    pub status: u32,
    /// Out: translation faults serviced by faulting the pages in.
    pub faults: u32,
    /// Out: bytes done (COMPARE mismatch: offset) over all resubmissions.
    pub result: u64,
    /// Out: the last faulting VA (0: none).
    pub fault_va: u64,
}

/// `struct pcisim_npu_status`: the page an mmap() of the device file maps (read-only, one page,
/// offset 0).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatusPage {
    /// [`STATUS_MAGIC`].
    pub magic: u32,
    /// The binding's PASID.
    pub pasid: u32,
    /// Whether the PASID is bound.
    pub bound: u32,
    /// Reserved.
    pub reserved: u32,
    /// Work items submitted.
    pub submitted: u64,
    /// Work items completed.
    pub completed: u64,
    /// Translation faults.
    pub faults: u64,
    /// The last faulting VA.
    pub last_fault_va: u64,
}

abi_table! {
    /// The uapi's numbers; the C names are `PCISIM_NPU_<name>`.
    TABLE;
    /// The ioctl type byte ('N').
    IOC_MAGIC: u8 = b'N';
    /// Info flag: the PASID is bound (the opener's mm is alive).
    INFO_BOUND: u32 = 1 << 0;
    /// Info flag: the device reaches physical memory untranslated.
    INFO_SVA: u32 = 1 << 1;
    /// Info flag: the device was removed.
    INFO_REMOVED: u32 = 1 << 2;
    /// Work op: the device's MEMCPY descriptor.
    OP_MEMCPY: u32 = regs::DESC_MEMCPY as u32;
    /// Work op: the device's FILL descriptor (src is the 8-byte pattern).
    OP_FILL: u32 = regs::DESC_FILL as u32;
    /// Work op: the device's COMPARE descriptor.
    OP_COMPARE: u32 = regs::DESC_COMPARE as u32;
    /// Work flag: SUBMIT waits for completion (else returns a ticket).
    WAIT: u32 = 1 << 0;
    /// Work flag: report translation faults, do not fault pages in.
    NO_FAULT_SERVICE: u32 = 1 << 1;
    /// Work status: the device's completion status OK.
    ST_OK: u32 = regs::ST_OK;
    /// Work status: COMPARE found a difference.
    ST_MISMATCH: u32 = regs::ST_MISMATCH;
    /// Work status: unknown opcode.
    ST_BAD_OPCODE: u32 = regs::ST_BAD_OPCODE;
    /// Work status: bad descriptor.
    ST_BAD_DESCRIPTOR: u32 = regs::ST_BAD_DESCRIPTOR;
    /// Work status: bad length.
    ST_BAD_LENGTH: u32 = regs::ST_BAD_LENGTH;
    /// Work status: the PASID is not bound.
    ST_PASID_NOT_BOUND: u32 = regs::ST_PASID_NOT_BOUND;
    /// Work status: a translation fault not serviced.
    ST_TRANSLATION_FAULT: u32 = regs::ST_TRANSLATION_FAULT;
    /// Work status: aborted.
    ST_ABORTED: u32 = regs::ST_ABORTED;
    /// Work status: DMA error.
    ST_DMA_ERROR: u32 = regs::ST_DMA_ERROR;
    /// Work status: not completed yet (a ticket still pending).
    ST_PENDING: u32 = 0xffff_ffff;
    /// [`StatusPage::magic`]: "SUPN".
    STATUS_MAGIC: u32 = 0x4e50_5553;
    /// `_IOR('N', 0, struct pcisim_npu_info)`: read the binding's [`Info`].
    IOC_INFO: u64 = ioc(IOC_READ, 0, core::mem::size_of::<Info>());
    /// `_IOWR('N', 1, struct pcisim_npu_work)`: submit a [`Work`].
    IOC_SUBMIT: u64 = ioc(IOC_READ | IOC_WRITE, 1, core::mem::size_of::<Work>());
    /// `_IOWR('N', 2, struct pcisim_npu_work)`: wait for a ticket.
    IOC_WAIT: u64 = ioc(IOC_READ | IOC_WRITE, 2, core::mem::size_of::<Work>());
}

/// Linux `_IOC_WRITE` (user to kernel) direction bit (x86, asm-generic).
pub const IOC_WRITE: u64 = 1;
/// Linux `_IOC_READ` (kernel to user) direction bit.
pub const IOC_READ: u64 = 2;

/// Linux `_IOC(dir, IOC_MAGIC, nr, size)` (asm-generic/ioctl.h: nr bits 0..7, type 8..15, size
/// 16..29, dir 30..31).
pub const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((IOC_MAGIC as u64) << 8) | nr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ioctl_numbers_match_linux_encoding() {
        // _IOR('N', 0, 32-byte struct) = 0x8020_4e00; _IOWR('N', 1, 64 bytes) = 0xc040_4e01.
        assert_eq!(core::mem::size_of::<Info>(), 32);
        assert_eq!(core::mem::size_of::<Work>(), 64);
        assert_eq!(core::mem::size_of::<StatusPage>(), 48);
        assert_eq!(IOC_INFO, 0x8020_4e00);
        assert_eq!(IOC_SUBMIT, 0xc040_4e01);
        assert_eq!(IOC_WAIT, 0xc040_4e02);
    }
}
