//! BAR0 register offsets and values of the GPU function (docs/programming-model.md, "BAR0
//! registers"). Registers are 32 bits wide, little-endian, at 4-byte aligned offsets; 64-bit
//! quantities are split into `_LO`/`_HI` halves, low half first.

abi_table! {
    /// The BAR0 registers in offset order (for the C header and the docs check).
    REGISTERS;
    /// ID: magic "PCSG" in memory order, so a driver can tell it mapped the right BAR.
    ID: u64 = 0x000;
    /// VERSION: register interface version, major.minor 16.16.
    VERSION: u64 = 0x004;
    /// VRAM size in bytes, low half.
    VRAM_SIZE_LO: u64 = 0x008;
    /// VRAM size in bytes, high half.
    VRAM_SIZE_HI: u64 = 0x00c;
    /// Number of MSI-X vectors.
    MSIX_VECTORS: u64 = 0x010;
    /// First of 16 scratch registers (read/write, reset to 0: the cheapest reset witness).
    SCRATCH: u64 = 0x040;
    /// Write a vector number to raise it.
    IRQ_DOORBELL: u64 = 0x080;
    /// IRQ_DOORBELL writes whose interrupt was delivered at once (IRQ_LAST_ERROR = 0) since
    /// reset. Not counted: the ring's fence and error interrupts, and a doorbell held in the PBA
    /// and delivered later.
    IRQ_COUNT: u64 = 0x084;
    /// Outcome of the last doorbell write (`IRQ_OK`, `IRQ_ERR_*`).
    IRQ_LAST_ERROR: u64 = 0x088;
    /// VRAM window start, low half.
    VRAM_OFFSET_LO: u64 = 0x100;
    /// VRAM window start, high half.
    VRAM_OFFSET_HI: u64 = 0x104;
    /// VRAM window length, low half.
    VRAM_LENGTH_LO: u64 = 0x108;
    /// VRAM window length, high half.
    VRAM_LENGTH_HI: u64 = 0x10c;
    /// Seed for FILL.
    VRAM_SEED: u64 = 0x110;
    /// Command register (`CMD_*`): runs a command over the VRAM window; reads 0.
    VRAM_CMD: u64 = 0x114;
    /// Status of the last command (`STATUS_*`).
    VRAM_STATUS: u64 = 0x118;
    /// Checksum result, low half.
    VRAM_RESULT_LO: u64 = 0x120;
    /// Checksum result, high half.
    VRAM_RESULT_HI: u64 = 0x124;
    /// Command ring base IOVA, low half (4 KiB aligned; latched at enable).
    RING_BASE_LO: u64 = 0x200;
    /// Command ring base IOVA, high half.
    RING_BASE_HI: u64 = 0x204;
    /// Ring size in entries: a power of two in 2..=4096 (latched at enable).
    RING_SIZE: u64 = 0x208;
    /// Ring control: bit 0 ENABLE, bit 1 RESET (write 1; reads 0); see `ring::ctrl`.
    RING_CTRL: u64 = 0x20c;
    /// The slot the engine processes next (read-only).
    RING_HEAD: u64 = 0x210;
    /// One past the last submitted slot; writing it is the doorbell.
    RING_TAIL: u64 = 0x214;
    /// 0 idle, 1 busy, 2 error (read-only); see `ring::status`.
    RING_STATUS: u64 = 0x218;
    /// Error code (bits 0..7) and slot (bits 16..27) of the command that stopped the ring.
    RING_ERROR: u64 = 0x21c;
    /// The offending address or operand of the error, low half.
    RING_FAULT_ADDR_LO: u64 = 0x220;
    /// The offending address or operand of the error, high half.
    RING_FAULT_ADDR_HI: u64 = 0x224;
    /// Value of the last WRITE_FENCE executed, low half.
    LAST_FENCE_LO: u64 = 0x228;
    /// Value of the last WRITE_FENCE executed, high half.
    LAST_FENCE_HI: u64 = 0x22c;
    /// MSI-X vector raised by WRITE_FENCE with FENCE_IRQ (default 0).
    FENCE_VECTOR: u64 = 0x230;
    /// MSI-X vector raised when the ring stops on an error (default 1).
    ERROR_VECTOR: u64 = 0x234;
    /// Commands completed since reset (wraps).
    CMDS_COMPLETED: u64 = 0x238;
    /// Times the ring stopped on an error since reset (wraps).
    RING_ERRORS: u64 = 0x23c;
}

abi_table! {
    /// The register values and bit fields (for the C header).
    VALUES;
    /// Number of scratch registers from [`SCRATCH`] on.
    SCRATCH_COUNT: u64 = 16;
    /// Value of [`ID`].
    ID_MAGIC: u32 = 0x4753_4350;
    /// Value of [`VERSION`] before the command ring (1.0).
    VERSION_1_0: u32 = 0x0001_0000;
    /// Value of [`VERSION`]: 1.1, registers of 1.0 plus the command ring.
    VERSION_1_1: u32 = 0x0001_0001;
    /// IRQ_LAST_ERROR: the interrupt was delivered.
    IRQ_OK: u32 = 0;
    /// IRQ_LAST_ERROR: the vector is not below MSIX_VECTORS.
    IRQ_ERR_VECTOR_RANGE: u32 = 1;
    /// IRQ_LAST_ERROR: no eventfd is bound for the vector; it is pending in the PBA.
    IRQ_ERR_NOT_BOUND: u32 = 2;
    /// IRQ_LAST_ERROR: the function may not send messages (Bus Master Enable clear, D3hot,
    /// reset, link down); the vector is pending in the PBA.
    IRQ_ERR_BUS_MASTER_OFF: u32 = 3;
    /// VRAM_CMD: FNV-1a-64 checksum of the window.
    CMD_CHECKSUM: u32 = 1;
    /// VRAM_CMD: fill the window with the FILL pattern.
    CMD_FILL: u32 = 2;
    /// VRAM_STATUS: idle or the last command succeeded.
    STATUS_OK: u32 = 0;
    /// VRAM_STATUS: the window is not inside VRAM.
    STATUS_OUT_OF_RANGE: u32 = 1;
    /// VRAM_STATUS: unknown command.
    STATUS_UNKNOWN_COMMAND: u32 = 2;
}
