//! BAR0 register offsets, queue-entry codes and command codes of the NPU function (docs/npu.md).
//! Registers are 32 bits wide, little-endian, at 4-byte aligned offsets; 64-bit quantities are
//! split into `_LO`/`_HI` halves, low half first.

abi_table! {
    /// The BAR0 registers (for the C header and the docs check).
    REGISTERS;
    // ---- identity and status -------------------------------------------------------------------

    /// ID: magic "PCSN" in memory order.
    ID: u64 = 0x000;
    /// VERSION: register interface version, major.minor 16.16.
    VERSION: u64 = 0x004;
    /// FEATURES: what this instance implements (`FEATURE_*`).
    FEATURES: u64 = 0x008;
    /// Number of MSI-X vectors.
    MSIX_VECTORS: u64 = 0x00c;
    /// Maximum number of PASIDs bound at once.
    MAX_CONTEXTS: u64 = 0x010;
    /// Number of ATC entries.
    ATC_ENTRIES: u64 = 0x014;
    /// Peer status: bit 0 configured, bit 1 present.
    PEER_STATUS: u64 = 0x018;
    /// Peer identity (as in the vendor-specific capability; 0 without a peer).
    PEER_ID: u64 = 0x01c;
    /// Engine control: bit 0 ENABLE.
    CONTROL: u64 = 0x020;
    /// Engine status (`STATUS_*` bits).
    STATUS: u64 = 0x024;
    /// Why the engine halted (`ERROR_*`), 0 if it did not.
    ERROR: u64 = 0x028;
    /// Descriptors completed since reset (any status).
    COMPLETED: u64 = 0x030;
    /// Translation faults since reset.
    FAULTS: u64 = 0x034;
    /// Stale translation uses found by checking mode since reset.
    STALE_USES: u64 = 0x038;
    /// ATC hits since reset.
    ATC_HITS: u64 = 0x080;
    /// ATC misses (page walks) since reset.
    ATC_MISSES: u64 = 0x084;
    /// ATC invalidation commands since reset.
    ATC_INVALIDATIONS: u64 = 0x088;

    // ---- command mailbox -------------------------------------------------------------------------

    /// Command argument: PASID.
    CMD_PASID: u64 = 0x040;
    /// Command argument: flags (`BIND_FLAG_*`, `UNBIND_FLAG_*`).
    CMD_FLAGS: u64 = 0x044;
    /// Command argument: address (BIND: page-table root; INVALIDATE: first VA), low half.
    CMD_ADDR_LO: u64 = 0x048;
    /// Command argument: address, high half.
    CMD_ADDR_HI: u64 = 0x04c;
    /// Command argument: length (INVALIDATE; all-ones: the whole PASID), low half.
    CMD_LEN_LO: u64 = 0x050;
    /// Command argument: length, high half.
    CMD_LEN_HI: u64 = 0x054;
    /// Command doorbell: writing an opcode (`OP_*`) runs the command; reads 0.
    CMD_OP: u64 = 0x058;
    /// Command status: bit 31 BUSY, bits 7:0 result (`CMD_*` codes).
    CMD_STATUS: u64 = 0x05c;
    /// Command result (UNBIND: work items aborted).
    CMD_RESULT: u64 = 0x060;
    /// Command interrupt: bit 31 enable, bits 10:0 vector; raised when a command completes.
    CMD_IRQ: u64 = 0x064;
    /// Commands completed since reset.
    CMD_SEQ: u64 = 0x068;

    // ---- queues ----------------------------------------------------------------------------------

    /// Submission queue base (guest physical / IOVA, 64-byte aligned), low half.
    SQ_BASE_LO: u64 = 0x100;
    /// Submission queue base, high half.
    SQ_BASE_HI: u64 = 0x104;
    /// Submission queue size in entries (power of two, 2..=65536).
    SQ_SIZE: u64 = 0x108;
    /// Submission queue head: next slot the device fetches (RO).
    SQ_HEAD: u64 = 0x10c;
    /// Submission queue tail: the driver's next free slot (doorbell).
    SQ_TAIL: u64 = 0x110;
    /// Completion queue base (32-byte aligned), low half.
    CQ_BASE_LO: u64 = 0x140;
    /// Completion queue base, high half.
    CQ_BASE_HI: u64 = 0x144;
    /// Completion queue size in entries (power of two, 2..=65536).
    CQ_SIZE: u64 = 0x148;
    /// Completion queue head: the driver's consumer index.
    CQ_HEAD: u64 = 0x14c;
    /// Completion queue tail: next slot the device writes (RO).
    CQ_TAIL: u64 = 0x150;
    /// Completion interrupt: bit 31 enable, bits 10:0 vector.
    CQ_IRQ: u64 = 0x154;
    /// Fault queue base (32-byte aligned), low half.
    FQ_BASE_LO: u64 = 0x180;
    /// Fault queue base, high half.
    FQ_BASE_HI: u64 = 0x184;
    /// Fault queue size in entries (0: no fault queue; else power of two, 2..=65536).
    FQ_SIZE: u64 = 0x188;
    /// Fault queue head: the driver's consumer index.
    FQ_HEAD: u64 = 0x18c;
    /// Fault queue tail: next slot the device writes (RO).
    FQ_TAIL: u64 = 0x190;
    /// Fault interrupt: bit 31 enable, bits 10:0 vector.
    FQ_IRQ: u64 = 0x194;
    /// Fault records lost because the fault queue was full, absent or unwritable (RO).
    FQ_LOST: u64 = 0x198;
}

abi_table! {
    /// The register values and bit fields (for the C header).
    VALUES;
    // ---- values ----------------------------------------------------------------------------------

    /// Value of [`ID`].
    ID_MAGIC: u32 = 0x4e53_4350;
    /// Value of [`VERSION`].
    VERSION_1_0: u32 = 0x0001_0000;

    /// FEATURES: PASID contexts with device-walked page tables.
    FEATURE_PASID: u32 = 1 << 0;
    /// FEATURES: a translation cache the driver invalidates.
    FEATURE_ATC: u32 = 1 << 1;
    /// FEATURES: fault queue.
    FEATURE_FAULT_QUEUE: u32 = 1 << 2;
    /// FEATURES: checking mode is on (every ATC hit is re-walked and compared).
    FEATURE_CHECKING: u32 = 1 << 3;
    /// FEATURES: a GPU peer is configured (vendor-specific capability present).
    FEATURE_PEER: u32 = 1 << 4;

    /// PEER_STATUS: a peer is configured.
    PEER_CONFIGURED: u32 = 1 << 0;
    /// PEER_STATUS: the peer is present.
    PEER_PRESENT: u32 = 1 << 1;

    /// CONTROL: the engine fetches and runs submission-queue entries.
    CONTROL_ENABLE: u32 = 1 << 0;

    /// STATUS: the engine is enabled.
    STATUS_ENABLED: u32 = 1 << 0;
    /// STATUS: the engine halted on a queue error (see ERROR); cleared by CONTROL.ENABLE = 0.
    STATUS_HALTED: u32 = 1 << 1;
    /// STATUS: no work item in flight and nothing to fetch.
    STATUS_IDLE: u32 = 1 << 2;
    /// STATUS: the engine waits for bus mastering to be allowed (Bus Master Enable, D0, link).
    STATUS_BUS_WAIT: u32 = 1 << 3;
    /// STATUS: the engine waits for room in the completion queue.
    STATUS_CQ_FULL: u32 = 1 << 4;

    /// ERROR: none.
    ERROR_NONE: u32 = 0;
    /// ERROR: submission or completion queue base/size invalid when enabled.
    ERROR_QUEUE_CONFIG: u32 = 1;
    /// ERROR: reading a submission-queue entry failed.
    ERROR_SQ_READ: u32 = 2;
    /// ERROR: writing a completion-queue entry failed.
    ERROR_CQ_WRITE: u32 = 3;

    /// Interrupt registers: enable bit.
    IRQ_ENABLE: u32 = 1 << 31;
    /// Interrupt registers: vector mask.
    IRQ_VECTOR_MASK: u32 = 0x7ff;

    /// Command: bind PASID to a page-table root (CMD_ADDR), flags `BIND_FLAG_*`.
    OP_BIND: u32 = 1;
    /// Command: unbind PASID after draining its work, flags `UNBIND_FLAG_*`.
    OP_UNBIND: u32 = 2;
    /// Command: invalidate cached translations of PASID for CMD_ADDR..CMD_ADDR+CMD_LEN.
    OP_INVALIDATE: u32 = 3;

    /// BIND flag: requests are privileged (supervisor): pages need not be user-accessible.
    BIND_FLAG_PRIV: u32 = 1 << 0;
    /// UNBIND flag: abort the PASID's outstanding work instead of finishing it.
    UNBIND_FLAG_ABORT: u32 = 1 << 0;

    /// CMD_STATUS: busy (an UNBIND is draining).
    CMD_BUSY: u32 = 1 << 31;
    /// CMD_STATUS: mask of the last command's result (bits 7:0, `CMD_OK`..).
    CMD_RESULT_MASK: u32 = 0xff;
    /// Command result: success.
    CMD_OK: u32 = 0;
    /// Command result: unknown opcode.
    CMD_BAD_OPCODE: u32 = 1;
    /// Command result: PASID 0 or not below 2^20.
    CMD_BAD_PASID: u32 = 2;
    /// Command result: BIND of a PASID that is bound (or draining).
    CMD_ALREADY_BOUND: u32 = 3;
    /// Command result: UNBIND of a PASID that is not bound.
    CMD_NOT_BOUND: u32 = 4;
    /// Command result: BIND with every context in use.
    CMD_NO_RESOURCES: u32 = 5;
    /// Command result: unknown flag bits.
    CMD_BAD_FLAGS: u32 = 6;

    /// Largest PASID + 1 (20-bit PASIDs).
    PASID_LIMIT: u32 = 1 << 20;
}

abi_table! {
    /// The queue-entry sizes, opcodes, flags, status and fault codes (for the C header).
    QUEUE_VALUES;
    // ---- descriptors -----------------------------------------------------------------------------

    /// Size of a submission-queue entry.
    DESC_SIZE: u64 = 64;
    /// Size of a completion record (CQ entry and the per-descriptor record).
    COMPLETION_SIZE: u64 = 32;
    /// Size of a fault record.
    FAULT_SIZE: u64 = 32;
    /// Largest descriptor length.
    MAX_LEN: u64 = 1 << 30;
    /// Largest queue size in entries.
    MAX_QUEUE_SIZE: u32 = 1 << 16;

    /// Opcode: do nothing (no memory access), complete with OK.
    DESC_NOP: u8 = 0;
    /// Opcode: copy `len` bytes from `src` to `dst` (virtual addresses).
    DESC_MEMCPY: u8 = 1;
    /// Opcode: fill `len` bytes at `dst` with the 8-byte pattern in `src`.
    DESC_FILL: u8 = 2;
    /// Opcode: compare `len` bytes at `src` and `dst`.
    DESC_COMPARE: u8 = 3;

    /// Descriptor flag: raise the completion interrupt (if CQ_IRQ is enabled).
    DESC_FLAG_IRQ: u8 = 1 << 0;
    /// Descriptor flags the device knows.
    DESC_FLAGS_KNOWN: u8 = DESC_FLAG_IRQ;

    /// Completion status: success.
    ST_OK: u32 = 0;
    /// Completion status: COMPARE found a difference at byte `result`.
    ST_MISMATCH: u32 = 1;
    /// Completion status: unknown opcode.
    ST_BAD_OPCODE: u32 = 2;
    /// Completion status: reserved bits or unknown flags set, or a misaligned completion address.
    ST_BAD_DESCRIPTOR: u32 = 3;
    /// Completion status: length above MAX_LEN or a range wrapping the address space.
    ST_BAD_LENGTH: u32 = 4;
    /// Completion status: the PASID is not bound.
    ST_PASID_NOT_BOUND: u32 = 5;
    /// Completion status: a translation fault (recorded in the fault queue); `result` = bytes done.
    ST_TRANSLATION_FAULT: u32 = 6;
    /// Completion status: aborted (UNBIND with abort, engine disabled); `result` = bytes done.
    ST_ABORTED: u32 = 7;
    /// Completion status: a translated physical address was not reachable; `result` = bytes done.
    ST_DMA_ERROR: u32 = 8;

    /// Completion record word 7: the record is valid.
    COMPLETION_VALID: u32 = 1;

    /// Fault record access bit: write.
    FAULT_ACCESS_WRITE: u32 = 1 << 0;
    /// Fault record access bit: user.
    FAULT_ACCESS_USER: u32 = 1 << 1;

    /// Fault reason: an entry on the path is not present.
    FAULT_NOT_PRESENT: u32 = 1;
    /// Fault reason: a write to a page that is read-only at some level.
    FAULT_WRITE_PROTECT: u32 = 2;
    /// Fault reason: a user access to a page that is supervisor-only at some level.
    FAULT_USER_PROTECT: u32 = 3;
    /// Fault reason: a reserved bit is set in an entry.
    FAULT_RESERVED: u32 = 4;
    /// Fault reason: the virtual address is not canonical (level 4).
    FAULT_NON_CANONICAL: u32 = 5;
    /// Fault reason: a table on the path could not be read.
    FAULT_TABLE_UNREADABLE: u32 = 6;
}
