/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * pcisim_regs.h - the register-level contract of pcisim's GPU and NPU functions.
 *
 * GENERATED from crates/abi (pcisim-abi); do not edit. Regenerate with
 *   cargo run -p pcisim-abi --example c-header > guest-tests/kmod/pcisim_regs.h
 * The prose contract is docs/programming-model.md (GPU) and docs/npu.md (NPU).
 * Entries are little-endian; these structs match them on a little-endian CPU.
 */
#ifndef PCISIM_REGS_H
#define PCISIM_REGS_H

#include <linux/stddef.h>
#include <linux/types.h>

/* ---- PCI identities (defaults) ---- */

/* Vendor ID of both functions (QEMU's and many emulators' test vendor 0x1234). */
#define PCISIM_VENDOR_ID 0x1234u

/* Device ID of the GPU function. */
#define PCISIM_GPU_DEVICE_ID 0xb10u

/* Device ID of the NPU function. */
#define PCISIM_NPU_DEVICE_ID 0xb20u

/* Class code of the GPU function: 0x0302 3D controller (no VGA, so no legacy ranges). */
#define PCISIM_GPU_CLASS_CODE 0x30200u

/* Class code of the NPU function: 0x1200 processing accelerator. */
#define PCISIM_NPU_CLASS_CODE 0x120000u

/* Revision ID of both functions. */
#define PCISIM_REVISION 0x1u

/* Subsystem vendor ID of both functions. */
#define PCISIM_SUBSYSTEM_VENDOR_ID 0x1234u

/* Subsystem ID of both functions. */
#define PCISIM_SUBSYSTEM_ID 0x1u

/* ---- GPU BAR0 register offsets ---- */

/* ID: magic "PCSG" in memory order, so a driver can tell it mapped the right BAR. */
#define GPU_REG_ID 0x0u

/* VERSION: register interface version, major.minor 16.16. */
#define GPU_REG_VERSION 0x4u

/* VRAM size in bytes, low half. */
#define GPU_REG_VRAM_SIZE_LO 0x8u

/* VRAM size in bytes, high half. */
#define GPU_REG_VRAM_SIZE_HI 0xcu

/* Number of MSI-X vectors. */
#define GPU_REG_MSIX_VECTORS 0x10u

/* First of 16 scratch registers (read/write, reset to 0: the cheapest reset witness). */
#define GPU_REG_SCRATCH 0x40u

/* Write a vector number to raise it. */
#define GPU_REG_IRQ_DOORBELL 0x80u

/* IRQ_DOORBELL writes whose interrupt was delivered at once (IRQ_LAST_ERROR = 0) since reset. Not counted: the ring's fence and error interrupts, and a doorbell held in the PBA and delivered later. */
#define GPU_REG_IRQ_COUNT 0x84u

/* Outcome of the last doorbell write (IRQ_OK, IRQ_ERR_*). */
#define GPU_REG_IRQ_LAST_ERROR 0x88u

/* VRAM window start, low half. */
#define GPU_REG_VRAM_OFFSET_LO 0x100u

/* VRAM window start, high half. */
#define GPU_REG_VRAM_OFFSET_HI 0x104u

/* VRAM window length, low half. */
#define GPU_REG_VRAM_LENGTH_LO 0x108u

/* VRAM window length, high half. */
#define GPU_REG_VRAM_LENGTH_HI 0x10cu

/* Seed for FILL. */
#define GPU_REG_VRAM_SEED 0x110u

/* Command register (CMD_*): runs a command over the VRAM window; reads 0. */
#define GPU_REG_VRAM_CMD 0x114u

/* Status of the last command (STATUS_*). */
#define GPU_REG_VRAM_STATUS 0x118u

/* Checksum result, low half. */
#define GPU_REG_VRAM_RESULT_LO 0x120u

/* Checksum result, high half. */
#define GPU_REG_VRAM_RESULT_HI 0x124u

/* Command ring base IOVA, low half (4 KiB aligned; latched at enable). */
#define GPU_REG_RING_BASE_LO 0x200u

/* Command ring base IOVA, high half. */
#define GPU_REG_RING_BASE_HI 0x204u

/* Ring size in entries: a power of two in 2..=4096 (latched at enable). */
#define GPU_REG_RING_SIZE 0x208u

/* Ring control: bit 0 ENABLE, bit 1 RESET (write 1; reads 0); see ring::ctrl. */
#define GPU_REG_RING_CTRL 0x20cu

/* The slot the engine processes next (read-only). */
#define GPU_REG_RING_HEAD 0x210u

/* One past the last submitted slot; writing it is the doorbell. */
#define GPU_REG_RING_TAIL 0x214u

/* 0 idle, 1 busy, 2 error (read-only); see ring::status. */
#define GPU_REG_RING_STATUS 0x218u

/* Error code (bits 0..7) and slot (bits 16..27) of the command that stopped the ring. */
#define GPU_REG_RING_ERROR 0x21cu

/* The offending address or operand of the error, low half. */
#define GPU_REG_RING_FAULT_ADDR_LO 0x220u

/* The offending address or operand of the error, high half. */
#define GPU_REG_RING_FAULT_ADDR_HI 0x224u

/* Value of the last WRITE_FENCE executed, low half. */
#define GPU_REG_LAST_FENCE_LO 0x228u

/* Value of the last WRITE_FENCE executed, high half. */
#define GPU_REG_LAST_FENCE_HI 0x22cu

/* MSI-X vector raised by WRITE_FENCE with FENCE_IRQ (default 0). */
#define GPU_REG_FENCE_VECTOR 0x230u

/* MSI-X vector raised when the ring stops on an error (default 1). */
#define GPU_REG_ERROR_VECTOR 0x234u

/* Commands completed since reset (wraps). */
#define GPU_REG_CMDS_COMPLETED 0x238u

/* Times the ring stopped on an error since reset (wraps). */
#define GPU_REG_RING_ERRORS 0x23cu

/* ---- GPU BAR0 register values ---- */

/* Number of scratch registers from SCRATCH on. */
#define GPU_SCRATCH_COUNT 0x10u

/* Value of ID. */
#define GPU_ID_MAGIC 0x47534350u

/* Value of VERSION before the command ring (1.0). */
#define GPU_VERSION_1_0 0x10000u

/* Value of VERSION: 1.1, registers of 1.0 plus the command ring. */
#define GPU_VERSION_1_1 0x10001u

/* IRQ_LAST_ERROR: the interrupt was delivered. */
#define GPU_IRQ_OK 0x0u

/* IRQ_LAST_ERROR: the vector is not below MSIX_VECTORS. */
#define GPU_IRQ_ERR_VECTOR_RANGE 0x1u

/* IRQ_LAST_ERROR: no eventfd is bound for the vector; it is pending in the PBA. */
#define GPU_IRQ_ERR_NOT_BOUND 0x2u

/* IRQ_LAST_ERROR: the function may not send messages (Bus Master Enable clear, D3hot, reset, link down); the vector is pending in the PBA. */
#define GPU_IRQ_ERR_BUS_MASTER_OFF 0x3u

/* VRAM_CMD: FNV-1a-64 checksum of the window. */
#define GPU_CMD_CHECKSUM 0x1u

/* VRAM_CMD: fill the window with the FILL pattern. */
#define GPU_CMD_FILL 0x2u

/* VRAM_STATUS: idle or the last command succeeded. */
#define GPU_STATUS_OK 0x0u

/* VRAM_STATUS: the window is not inside VRAM. */
#define GPU_STATUS_OUT_OF_RANGE 0x1u

/* VRAM_STATUS: unknown command. */
#define GPU_STATUS_UNKNOWN_COMMAND 0x2u

/* ---- GPU command ring ---- */

/* Size of one command in bytes. */
#define GPU_RING_CMD_SIZE 0x20u

/* Smallest ring (entries). */
#define GPU_RING_MIN_ENTRIES 0x2u

/* Largest ring (entries). */
#define GPU_RING_MAX_ENTRIES 0x1000u

/* Required alignment of RING_BASE. */
#define GPU_RING_BASE_ALIGN 0x1000u

/* Largest length a COPY or FILL may move. */
#define GPU_RING_MAX_LEN 0x4000000u

/* RING_ERROR: mask of the error code. */
#define GPU_RING_ERROR_CODE 0xffu

/* RING_ERROR: shift of the slot. */
#define GPU_RING_ERROR_SLOT 0x10u

/* ---- GPU command ring: opcodes ---- */

/* Do nothing. */
#define GPU_OP_NOP 0x0u

/* Copy c bytes from a to b. */
#define GPU_OP_COPY 0x1u

/* Fill c bytes at a with the 32-bit pattern b. */
#define GPU_OP_FILL 0x2u

/* Write the 64-bit value b at IOVA a; LAST_FENCE = b. */
#define GPU_OP_WRITE_FENCE 0x3u

/* Raise MSI-X vector a. */
#define GPU_OP_INTERRUPT 0x4u

/* ---- GPU command ring: flags ---- */

/* COPY: the source is a VRAM offset (else a client IOVA). */
#define GPU_FLAG_SRC_VRAM 0x1u

/* COPY, FILL: the destination is a VRAM offset (else a client IOVA). */
#define GPU_FLAG_DST_VRAM 0x2u

/* WRITE_FENCE: raise FENCE_VECTOR once the fence is written. */
#define GPU_FLAG_FENCE_IRQ 0x4u

/* ---- GPU RING_CTRL bits ---- */

/* The engine processes commands while set. Setting it latches and checks RING_BASE and RING_SIZE. */
#define GPU_RING_CTRL_ENABLE 0x1u

/* Write 1: stop the engine (abort the command in flight), clear ENABLE, HEAD, TAIL and the error state. Reads 0. */
#define GPU_RING_CTRL_RESET 0x2u

/* ---- GPU RING_STATUS values ---- */

/* Nothing to do (or disabled). */
#define GPU_RING_STATUS_IDLE 0x0u

/* Enabled and HEAD != TAIL: commands are being processed. */
#define GPU_RING_STATUS_BUSY 0x1u

/* Stopped on an error (RING_ERROR says which and where) until RING_CTRL.RESET. */
#define GPU_RING_STATUS_ERROR 0x2u

/* ---- GPU RING_ERROR codes ---- */

/* No error. */
#define GPU_ERR_NONE 0x0u

/* Unknown opcode. */
#define GPU_ERR_BAD_OPCODE 0x1u

/* A flag the opcode does not define is set. */
#define GPU_ERR_BAD_FLAGS 0x2u

/* A reserved field or an operand the opcode does not use is not zero. */
#define GPU_ERR_RESERVED 0x3u

/* An operand is not aligned as the opcode requires. */
#define GPU_ERR_ALIGNMENT 0x4u

/* A length above super::MAX_LEN. */
#define GPU_ERR_LENGTH 0x5u

/* A VRAM range outside VRAM. */
#define GPU_ERR_VRAM_RANGE 0x6u

/* An IOVA range that wraps past 2^64. */
#define GPU_ERR_IOVA_RANGE 0x7u

/* A client access hit no mapped memory (or the mapping's protection forbids it). */
#define GPU_ERR_DMA_FAULT 0x8u

/* The bus refused the access: Bus Master Enable clear, D3hot, link down, reset, no client. */
#define GPU_ERR_DMA_REFUSED 0x9u

/* An MSI-X vector that does not exist. */
#define GPU_ERR_BAD_VECTOR 0xau

/* RING_BASE not 4 KiB aligned or RING_SIZE not a power of two in 2..=4096 at enable. */
#define GPU_ERR_BAD_RING 0xbu

/* RING_TAIL written with a value not below RING_SIZE. */
#define GPU_ERR_BAD_TAIL 0xcu

/* ---- NPU BAR0 register offsets ---- */

/* ID: magic "PCSN" in memory order. */
#define NPU_REG_ID 0x0u

/* VERSION: register interface version, major.minor 16.16. */
#define NPU_REG_VERSION 0x4u

/* FEATURES: what this instance implements (FEATURE_*). */
#define NPU_REG_FEATURES 0x8u

/* Number of MSI-X vectors. */
#define NPU_REG_MSIX_VECTORS 0xcu

/* Maximum number of PASIDs bound at once. */
#define NPU_REG_MAX_CONTEXTS 0x10u

/* Number of ATC entries. */
#define NPU_REG_ATC_ENTRIES 0x14u

/* Peer status: bit 0 configured, bit 1 present. */
#define NPU_REG_PEER_STATUS 0x18u

/* Peer identity (as in the vendor-specific capability; 0 without a peer). */
#define NPU_REG_PEER_ID 0x1cu

/* Engine control: bit 0 ENABLE. */
#define NPU_REG_CONTROL 0x20u

/* Engine status (STATUS_* bits). */
#define NPU_REG_STATUS 0x24u

/* Why the engine halted (ERROR_*), 0 if it did not. */
#define NPU_REG_ERROR 0x28u

/* Descriptors completed since reset (any status). */
#define NPU_REG_COMPLETED 0x30u

/* Translation faults since reset. */
#define NPU_REG_FAULTS 0x34u

/* Stale translation uses found by checking mode since reset. */
#define NPU_REG_STALE_USES 0x38u

/* ATC hits since reset. */
#define NPU_REG_ATC_HITS 0x80u

/* ATC misses (page walks) since reset. */
#define NPU_REG_ATC_MISSES 0x84u

/* ATC invalidation commands since reset. */
#define NPU_REG_ATC_INVALIDATIONS 0x88u

/* Command argument: PASID. */
#define NPU_REG_CMD_PASID 0x40u

/* Command argument: flags (BIND_FLAG_*, UNBIND_FLAG_*). */
#define NPU_REG_CMD_FLAGS 0x44u

/* Command argument: address (BIND: page-table root; INVALIDATE: first VA), low half. */
#define NPU_REG_CMD_ADDR_LO 0x48u

/* Command argument: address, high half. */
#define NPU_REG_CMD_ADDR_HI 0x4cu

/* Command argument: length (INVALIDATE; all-ones: the whole PASID), low half. */
#define NPU_REG_CMD_LEN_LO 0x50u

/* Command argument: length, high half. */
#define NPU_REG_CMD_LEN_HI 0x54u

/* Command doorbell: writing an opcode (OP_*) runs the command; reads 0. */
#define NPU_REG_CMD_OP 0x58u

/* Command status: bit 31 BUSY, bits 7:0 result (CMD_* codes). */
#define NPU_REG_CMD_STATUS 0x5cu

/* Command result (UNBIND: work items aborted). */
#define NPU_REG_CMD_RESULT 0x60u

/* Command interrupt: bit 31 enable, bits 10:0 vector; raised when a command completes. */
#define NPU_REG_CMD_IRQ 0x64u

/* Commands completed since reset. */
#define NPU_REG_CMD_SEQ 0x68u

/* Submission queue base (guest physical / IOVA, 64-byte aligned), low half. */
#define NPU_REG_SQ_BASE_LO 0x100u

/* Submission queue base, high half. */
#define NPU_REG_SQ_BASE_HI 0x104u

/* Submission queue size in entries (power of two, 2..=65536). */
#define NPU_REG_SQ_SIZE 0x108u

/* Submission queue head: next slot the device fetches (RO). */
#define NPU_REG_SQ_HEAD 0x10cu

/* Submission queue tail: the driver's next free slot (doorbell). */
#define NPU_REG_SQ_TAIL 0x110u

/* Completion queue base (32-byte aligned), low half. */
#define NPU_REG_CQ_BASE_LO 0x140u

/* Completion queue base, high half. */
#define NPU_REG_CQ_BASE_HI 0x144u

/* Completion queue size in entries (power of two, 2..=65536). */
#define NPU_REG_CQ_SIZE 0x148u

/* Completion queue head: the driver's consumer index. */
#define NPU_REG_CQ_HEAD 0x14cu

/* Completion queue tail: next slot the device writes (RO). */
#define NPU_REG_CQ_TAIL 0x150u

/* Completion interrupt: bit 31 enable, bits 10:0 vector. */
#define NPU_REG_CQ_IRQ 0x154u

/* Fault queue base (32-byte aligned), low half. */
#define NPU_REG_FQ_BASE_LO 0x180u

/* Fault queue base, high half. */
#define NPU_REG_FQ_BASE_HI 0x184u

/* Fault queue size in entries (0: no fault queue; else power of two, 2..=65536). */
#define NPU_REG_FQ_SIZE 0x188u

/* Fault queue head: the driver's consumer index. */
#define NPU_REG_FQ_HEAD 0x18cu

/* Fault queue tail: next slot the device writes (RO). */
#define NPU_REG_FQ_TAIL 0x190u

/* Fault interrupt: bit 31 enable, bits 10:0 vector. */
#define NPU_REG_FQ_IRQ 0x194u

/* Fault records lost because the fault queue was full, absent or unwritable (RO). */
#define NPU_REG_FQ_LOST 0x198u

/* ---- NPU BAR0 register values and bit fields ---- */

/* Value of ID. */
#define NPU_ID_MAGIC 0x4e534350u

/* Value of VERSION. */
#define NPU_VERSION_1_0 0x10000u

/* FEATURES: PASID contexts with device-walked page tables. */
#define NPU_FEATURE_PASID 0x1u

/* FEATURES: a translation cache the driver invalidates. */
#define NPU_FEATURE_ATC 0x2u

/* FEATURES: fault queue. */
#define NPU_FEATURE_FAULT_QUEUE 0x4u

/* FEATURES: checking mode is on (every ATC hit is re-walked and compared). */
#define NPU_FEATURE_CHECKING 0x8u

/* FEATURES: a GPU peer is configured (vendor-specific capability present). */
#define NPU_FEATURE_PEER 0x10u

/* PEER_STATUS: a peer is configured. */
#define NPU_PEER_CONFIGURED 0x1u

/* PEER_STATUS: the peer is present. */
#define NPU_PEER_PRESENT 0x2u

/* CONTROL: the engine fetches and runs submission-queue entries. */
#define NPU_CONTROL_ENABLE 0x1u

/* STATUS: the engine is enabled. */
#define NPU_STATUS_ENABLED 0x1u

/* STATUS: the engine halted on a queue error (see ERROR); cleared by CONTROL.ENABLE = 0. */
#define NPU_STATUS_HALTED 0x2u

/* STATUS: no work item in flight and nothing to fetch. */
#define NPU_STATUS_IDLE 0x4u

/* STATUS: the engine waits for bus mastering to be allowed (Bus Master Enable, D0, link). */
#define NPU_STATUS_BUS_WAIT 0x8u

/* STATUS: the engine waits for room in the completion queue. */
#define NPU_STATUS_CQ_FULL 0x10u

/* ERROR: none. */
#define NPU_ERROR_NONE 0x0u

/* ERROR: submission or completion queue base/size invalid when enabled. */
#define NPU_ERROR_QUEUE_CONFIG 0x1u

/* ERROR: reading a submission-queue entry failed. */
#define NPU_ERROR_SQ_READ 0x2u

/* ERROR: writing a completion-queue entry failed. */
#define NPU_ERROR_CQ_WRITE 0x3u

/* Interrupt registers: enable bit. */
#define NPU_IRQ_ENABLE 0x80000000u

/* Interrupt registers: vector mask. */
#define NPU_IRQ_VECTOR_MASK 0x7ffu

/* Command: bind PASID to a page-table root (CMD_ADDR), flags BIND_FLAG_*. */
#define NPU_OP_BIND 0x1u

/* Command: unbind PASID after draining its work, flags UNBIND_FLAG_*. */
#define NPU_OP_UNBIND 0x2u

/* Command: invalidate cached translations of PASID for CMD_ADDR..CMD_ADDR+CMD_LEN. */
#define NPU_OP_INVALIDATE 0x3u

/* BIND flag: requests are privileged (supervisor): pages need not be user-accessible. */
#define NPU_BIND_FLAG_PRIV 0x1u

/* UNBIND flag: abort the PASID's outstanding work instead of finishing it. */
#define NPU_UNBIND_FLAG_ABORT 0x1u

/* CMD_STATUS: busy (an UNBIND is draining). */
#define NPU_CMD_BUSY 0x80000000u

/* CMD_STATUS: mask of the last command's result (bits 7:0, CMD_OK..). */
#define NPU_CMD_RESULT_MASK 0xffu

/* Command result: success. */
#define NPU_CMD_OK 0x0u

/* Command result: unknown opcode. */
#define NPU_CMD_BAD_OPCODE 0x1u

/* Command result: PASID 0 or not below 2^20. */
#define NPU_CMD_BAD_PASID 0x2u

/* Command result: BIND of a PASID that is bound (or draining). */
#define NPU_CMD_ALREADY_BOUND 0x3u

/* Command result: UNBIND of a PASID that is not bound. */
#define NPU_CMD_NOT_BOUND 0x4u

/* Command result: BIND with every context in use. */
#define NPU_CMD_NO_RESOURCES 0x5u

/* Command result: unknown flag bits. */
#define NPU_CMD_BAD_FLAGS 0x6u

/* Largest PASID + 1 (20-bit PASIDs). */
#define NPU_PASID_LIMIT 0x100000u

/* ---- NPU queue entries ---- */

/* Size of a submission-queue entry. */
#define NPU_DESC_SIZE 0x40u

/* Size of a completion record (CQ entry and the per-descriptor record). */
#define NPU_COMPLETION_SIZE 0x20u

/* Size of a fault record. */
#define NPU_FAULT_SIZE 0x20u

/* Largest descriptor length. */
#define NPU_MAX_LEN 0x40000000u

/* Largest queue size in entries. */
#define NPU_MAX_QUEUE_SIZE 0x10000u

/* Opcode: do nothing (no memory access), complete with OK. */
#define NPU_DESC_NOP 0x0u

/* Opcode: copy len bytes from src to dst (virtual addresses). */
#define NPU_DESC_MEMCPY 0x1u

/* Opcode: fill len bytes at dst with the 8-byte pattern in src. */
#define NPU_DESC_FILL 0x2u

/* Opcode: compare len bytes at src and dst. */
#define NPU_DESC_COMPARE 0x3u

/* Descriptor flag: raise the completion interrupt (if CQ_IRQ is enabled). */
#define NPU_DESC_FLAG_IRQ 0x1u

/* Descriptor flags the device knows. */
#define NPU_DESC_FLAGS_KNOWN 0x1u

/* Completion status: success. */
#define NPU_ST_OK 0x0u

/* Completion status: COMPARE found a difference at byte result. */
#define NPU_ST_MISMATCH 0x1u

/* Completion status: unknown opcode. */
#define NPU_ST_BAD_OPCODE 0x2u

/* Completion status: reserved bits or unknown flags set, or a misaligned completion address. */
#define NPU_ST_BAD_DESCRIPTOR 0x3u

/* Completion status: length above MAX_LEN or a range wrapping the address space. */
#define NPU_ST_BAD_LENGTH 0x4u

/* Completion status: the PASID is not bound. */
#define NPU_ST_PASID_NOT_BOUND 0x5u

/* Completion status: a translation fault (recorded in the fault queue); result = bytes done. */
#define NPU_ST_TRANSLATION_FAULT 0x6u

/* Completion status: aborted (UNBIND with abort, engine disabled); result = bytes done. */
#define NPU_ST_ABORTED 0x7u

/* Completion status: a translated physical address was not reachable; result = bytes done. */
#define NPU_ST_DMA_ERROR 0x8u

/* Completion record word 7: the record is valid. */
#define NPU_COMPLETION_VALID 0x1u

/* Fault record access bit: write. */
#define NPU_FAULT_ACCESS_WRITE 0x1u

/* Fault record access bit: user. */
#define NPU_FAULT_ACCESS_USER 0x2u

/* Fault reason: an entry on the path is not present. */
#define NPU_FAULT_NOT_PRESENT 0x1u

/* Fault reason: a write to a page that is read-only at some level. */
#define NPU_FAULT_WRITE_PROTECT 0x2u

/* Fault reason: a user access to a page that is supervisor-only at some level. */
#define NPU_FAULT_USER_PROTECT 0x3u

/* Fault reason: a reserved bit is set in an entry. */
#define NPU_FAULT_RESERVED 0x4u

/* Fault reason: the virtual address is not canonical (level 4). */
#define NPU_FAULT_NON_CANONICAL 0x5u

/* Fault reason: a table on the path could not be read. */
#define NPU_FAULT_TABLE_UNREADABLE 0x6u

/* ---- NPU vendor-specific capability naming the GPU peer (offsets from the capability) ---- */

/* PCI capability ID of a vendor-specific capability. */
#define PCISIM_VSEC_CAP_ID 0x9u

/* Length of the capability in bytes, header included. */
#define PCISIM_VSEC_LENGTH 0xcu

/* Offset of the kind byte (the first byte after the standard 3-byte header). */
#define PCISIM_VSEC_KIND_OFFSET 0x3u

/* Kind: the capability names a GPU peer. */
#define PCISIM_VSEC_KIND_GPU_PEER 0x1u

/* Offset of the peer ID (u32; pcisim derives it from the peer's socket path, never 0). */
#define PCISIM_VSEC_PEER_ID_OFFSET 0x4u

/* Offset of the peer's vendor ID (u16). */
#define PCISIM_VSEC_PEER_VENDOR_OFFSET 0x8u

/* Offset of the peer's device ID (u16). */
#define PCISIM_VSEC_PEER_DEVICE_OFFSET 0xau

/* ---- entry layouts ---- */

/* One GPU command ring entry. (32 bytes) */
struct gpu_ring_cmd {
	__u8 opcode; /* opcode (GPU_OP_*) */
	__u8 flags; /* flags (GPU_FLAG_*) */
	__u8 reserved[6]; /* must be 0 */
	__u64 a; /* operand a */
	__u64 b; /* operand b */
	__u64 c; /* operand c */
};
_Static_assert(sizeof(struct gpu_ring_cmd) == 32, "gpu_ring_cmd size");
_Static_assert(offsetof(struct gpu_ring_cmd, opcode) == 0, "gpu_ring_cmd.opcode offset");
_Static_assert(offsetof(struct gpu_ring_cmd, flags) == 1, "gpu_ring_cmd.flags offset");
_Static_assert(offsetof(struct gpu_ring_cmd, reserved) == 2, "gpu_ring_cmd.reserved offset");
_Static_assert(offsetof(struct gpu_ring_cmd, a) == 8, "gpu_ring_cmd.a offset");
_Static_assert(offsetof(struct gpu_ring_cmd, b) == 16, "gpu_ring_cmd.b offset");
_Static_assert(offsetof(struct gpu_ring_cmd, c) == 24, "gpu_ring_cmd.c offset");

/* NPU submission-queue entry (descriptor). (64 bytes) */
struct npu_desc {
	__u8 op; /* opcode (NPU_DESC_NOP..NPU_DESC_COMPARE) */
	__u8 flags; /* NPU_DESC_FLAG_* */
	__u16 reserved0; /* must be 0 */
	__u32 pasid; /* PASID whose address space src, dst, completion are in */
	__u64 src; /* source VA (FILL: the 8-byte pattern) */
	__u64 dst; /* destination VA */
	__u64 len; /* length in bytes */
	__u64 completion; /* completion record VA (0: none; 8-byte aligned) */
	__u64 tag; /* echoed in the completion */
	__u64 reserved1[2]; /* must be 0 */
};
_Static_assert(sizeof(struct npu_desc) == 64, "npu_desc size");
_Static_assert(offsetof(struct npu_desc, op) == 0, "npu_desc.op offset");
_Static_assert(offsetof(struct npu_desc, flags) == 1, "npu_desc.flags offset");
_Static_assert(offsetof(struct npu_desc, reserved0) == 2, "npu_desc.reserved0 offset");
_Static_assert(offsetof(struct npu_desc, pasid) == 4, "npu_desc.pasid offset");
_Static_assert(offsetof(struct npu_desc, src) == 8, "npu_desc.src offset");
_Static_assert(offsetof(struct npu_desc, dst) == 16, "npu_desc.dst offset");
_Static_assert(offsetof(struct npu_desc, len) == 24, "npu_desc.len offset");
_Static_assert(offsetof(struct npu_desc, completion) == 32, "npu_desc.completion offset");
_Static_assert(offsetof(struct npu_desc, tag) == 40, "npu_desc.tag offset");
_Static_assert(offsetof(struct npu_desc, reserved1) == 48, "npu_desc.reserved1 offset");

/* NPU completion record (CQ entry and per-descriptor record). (32 bytes) */
struct npu_cqe {
	__u64 tag; /* the descriptor's tag */
	__u32 status; /* NPU_ST_* */
	__u32 slot; /* SQ slot of the descriptor */
	__u64 result; /* bytes done (COMPARE mismatch: offset) */
	__u32 pasid; /* the descriptor's PASID */
	__u32 valid; /* bit 0: NPU_COMPLETION_VALID */
};
_Static_assert(sizeof(struct npu_cqe) == 32, "npu_cqe size");
_Static_assert(offsetof(struct npu_cqe, tag) == 0, "npu_cqe.tag offset");
_Static_assert(offsetof(struct npu_cqe, status) == 8, "npu_cqe.status offset");
_Static_assert(offsetof(struct npu_cqe, slot) == 12, "npu_cqe.slot offset");
_Static_assert(offsetof(struct npu_cqe, result) == 16, "npu_cqe.result offset");
_Static_assert(offsetof(struct npu_cqe, pasid) == 24, "npu_cqe.pasid offset");
_Static_assert(offsetof(struct npu_cqe, valid) == 28, "npu_cqe.valid offset");

/* NPU fault record. (32 bytes) */
struct npu_fault {
	__u64 va; /* faulting VA */
	__u32 pasid; /* PASID */
	__u32 access; /* NPU_FAULT_ACCESS_* */
	__u32 reason; /* NPU_FAULT_* reason code */
	__u32 level; /* paging level of the faulting entry (4..1) */
	__u64 tag; /* the descriptor's tag */
};
_Static_assert(sizeof(struct npu_fault) == 32, "npu_fault size");
_Static_assert(offsetof(struct npu_fault, va) == 0, "npu_fault.va offset");
_Static_assert(offsetof(struct npu_fault, pasid) == 8, "npu_fault.pasid offset");
_Static_assert(offsetof(struct npu_fault, access) == 12, "npu_fault.access offset");
_Static_assert(offsetof(struct npu_fault, reason) == 16, "npu_fault.reason offset");
_Static_assert(offsetof(struct npu_fault, level) == 20, "npu_fault.level offset");
_Static_assert(offsetof(struct npu_fault, tag) == 24, "npu_fault.tag offset");

#endif /* PCISIM_REGS_H */
