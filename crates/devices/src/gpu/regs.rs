//! BAR0 register offsets and values of the GPU function (docs/programming-model.md).

/// ID: magic "PCSG" in memory order.
pub const ID: u64 = 0x000;
/// VERSION: register interface version, major.minor 16.16.
pub const VERSION: u64 = 0x004;
/// VRAM size in bytes, low half.
pub const VRAM_SIZE_LO: u64 = 0x008;
/// VRAM size in bytes, high half.
pub const VRAM_SIZE_HI: u64 = 0x00c;
/// Number of MSI-X vectors.
pub const MSIX_VECTORS: u64 = 0x010;
/// First of 16 scratch registers.
pub const SCRATCH: u64 = 0x040;
/// Number of scratch registers.
pub const SCRATCH_COUNT: u64 = 16;
/// Write a vector number to raise it.
pub const IRQ_DOORBELL: u64 = 0x080;
/// IRQ_DOORBELL writes whose interrupt was delivered at once (IRQ_LAST_ERROR = 0) since reset.
/// Not counted: the ring's fence and error interrupts, and a doorbell held in the PBA and
/// delivered later.
pub const IRQ_COUNT: u64 = 0x084;
/// Outcome of the last doorbell write.
pub const IRQ_LAST_ERROR: u64 = 0x088;
/// VRAM window start, low half.
pub const VRAM_OFFSET_LO: u64 = 0x100;
/// VRAM window start, high half.
pub const VRAM_OFFSET_HI: u64 = 0x104;
/// VRAM window length, low half.
pub const VRAM_LENGTH_LO: u64 = 0x108;
/// VRAM window length, high half.
pub const VRAM_LENGTH_HI: u64 = 0x10c;
/// Seed for FILL.
pub const VRAM_SEED: u64 = 0x110;
/// Command register.
pub const VRAM_CMD: u64 = 0x114;
/// Status of the last command.
pub const VRAM_STATUS: u64 = 0x118;
/// Checksum result, low half.
pub const VRAM_RESULT_LO: u64 = 0x120;
/// Checksum result, high half.
pub const VRAM_RESULT_HI: u64 = 0x124;

/// Command ring base IOVA, low half (4 KiB aligned; latched at enable).
pub const RING_BASE_LO: u64 = 0x200;
/// Command ring base IOVA, high half.
pub const RING_BASE_HI: u64 = 0x204;
/// Ring size in entries: a power of two in 2..=4096 (latched at enable).
pub const RING_SIZE: u64 = 0x208;
/// Ring control: bit 0 ENABLE, bit 1 RESET (write 1; reads 0).
pub const RING_CTRL: u64 = 0x20c;
/// The slot the engine processes next (read-only).
pub const RING_HEAD: u64 = 0x210;
/// One past the last submitted slot; writing it is the doorbell.
pub const RING_TAIL: u64 = 0x214;
/// 0 idle, 1 busy, 2 error (read-only).
pub const RING_STATUS: u64 = 0x218;
/// Error code (bits 0..7) and slot (bits 16..27) of the command that stopped the ring.
pub const RING_ERROR: u64 = 0x21c;
/// The offending address or operand of the error, low half.
pub const RING_FAULT_ADDR_LO: u64 = 0x220;
/// The offending address or operand of the error, high half.
pub const RING_FAULT_ADDR_HI: u64 = 0x224;
/// Value of the last WRITE_FENCE executed, low half.
pub const LAST_FENCE_LO: u64 = 0x228;
/// Value of the last WRITE_FENCE executed, high half.
pub const LAST_FENCE_HI: u64 = 0x22c;
/// MSI-X vector raised by WRITE_FENCE with FENCE_IRQ (default 0).
pub const FENCE_VECTOR: u64 = 0x230;
/// MSI-X vector raised when the ring stops on an error (default 1).
pub const ERROR_VECTOR: u64 = 0x234;
/// Commands completed since reset (wraps).
pub const CMDS_COMPLETED: u64 = 0x238;
/// Times the ring stopped on an error since reset (wraps).
pub const RING_ERRORS: u64 = 0x23c;

/// Value of [`ID`].
pub const ID_MAGIC: u32 = 0x4753_4350;
/// Value of [`VERSION`] before the command ring (1.0).
pub const VERSION_1_0: u32 = 0x0001_0000;
/// Value of [`VERSION`]: 1.1, registers of 1.0 plus the command ring.
pub const VERSION_1_1: u32 = 0x0001_0001;

/// IRQ_LAST_ERROR: the interrupt was delivered.
pub const IRQ_OK: u32 = 0;
/// IRQ_LAST_ERROR: the vector is not below MSIX_VECTORS.
pub const IRQ_ERR_VECTOR_RANGE: u32 = 1;
/// IRQ_LAST_ERROR: no eventfd is bound for the vector; it is pending in the PBA.
pub const IRQ_ERR_NOT_BOUND: u32 = 2;
/// IRQ_LAST_ERROR: the function may not send messages (Bus Master Enable clear, D3hot, reset,
/// link down); the vector is pending in the PBA.
pub const IRQ_ERR_BUS_MASTER_OFF: u32 = 3;

/// VRAM_CMD: FNV-1a-64 checksum of the window.
pub const CMD_CHECKSUM: u32 = 1;
/// VRAM_CMD: fill the window with the FILL pattern.
pub const CMD_FILL: u32 = 2;

/// VRAM_STATUS: idle or the last command succeeded.
pub const STATUS_OK: u32 = 0;
/// VRAM_STATUS: the window is not inside VRAM.
pub const STATUS_OUT_OF_RANGE: u32 = 1;
/// VRAM_STATUS: unknown command.
pub const STATUS_UNKNOWN_COMMAND: u32 = 2;
