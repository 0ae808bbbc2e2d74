/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * pcisim_npu_uapi.h - the user interface of the pcisim NPU guest driver (pcisim_npu.ko).
 *
 * One character device per NPU function: /dev/pcisim-npuN. open() binds the opener's mm to a
 * fresh PASID on the device; the binding belongs to that mm (docs/sva.md explains the lifetime
 * rules). The ioctls below submit work on the opener's virtual addresses.
 *
 * pcisim-abi (crates/abi/src/npu/uapi.rs) mirrors these definitions in Rust for the guest
 * programs; its test c_header checks every number and struct layout here against it.
 */
#ifndef PCISIM_NPU_UAPI_H
#define PCISIM_NPU_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define PCISIM_NPU_IOC_MAGIC 'N'

/* pcisim_npu_info.flags */
#define PCISIM_NPU_INFO_BOUND  (1u << 0) /* the PASID is bound (the opener's mm is alive) */
#define PCISIM_NPU_INFO_SVA    (1u << 1) /* the device reaches physical memory untranslated */
#define PCISIM_NPU_INFO_REMOVED (1u << 2) /* the device was removed */

struct pcisim_npu_info {
	__u32 pasid;     /* the PASID of this file's binding */
	__u32 flags;     /* PCISIM_NPU_INFO_* */
	__u64 root;      /* physical address of the page-table root given to BIND */
	__u32 owner_pid; /* tgid of the opener */
	__u32 contexts;  /* live contexts (open files) of the device */
	__u64 reserved;
};

/* pcisim_npu_work.op: the device's descriptor opcodes */
#define PCISIM_NPU_OP_MEMCPY  1
#define PCISIM_NPU_OP_FILL    2 /* src is the 8-byte pattern */
#define PCISIM_NPU_OP_COMPARE 3

/* pcisim_npu_work.flags */
#define PCISIM_NPU_WAIT           (1u << 0) /* SUBMIT waits for completion (else returns a ticket) */
#define PCISIM_NPU_NO_FAULT_SERVICE (1u << 1) /* report translation faults, do not fault pages in */

/* pcisim_npu_work.status: the device's completion status */
#define PCISIM_NPU_ST_OK                0
#define PCISIM_NPU_ST_MISMATCH          1
#define PCISIM_NPU_ST_BAD_OPCODE        2
#define PCISIM_NPU_ST_BAD_DESCRIPTOR    3
#define PCISIM_NPU_ST_BAD_LENGTH        4
#define PCISIM_NPU_ST_PASID_NOT_BOUND   5
#define PCISIM_NPU_ST_TRANSLATION_FAULT 6
#define PCISIM_NPU_ST_ABORTED           7
#define PCISIM_NPU_ST_DMA_ERROR         8
#define PCISIM_NPU_ST_PENDING           0xffffffffu

struct pcisim_npu_work {
	__u32 op;       /* in: PCISIM_NPU_OP_* */
	__u32 flags;    /* in: PCISIM_NPU_* */
	__u64 src;      /* in: source VA (FILL: pattern) */
	__u64 dst;      /* in: destination VA */
	__u64 len;      /* in: bytes */
	__u64 ticket;   /* out of SUBMIT, in to WAIT */
	__u32 status;   /* out: PCISIM_NPU_ST_* of the last descriptor */
	__u32 faults;   /* out: translation faults serviced by faulting the pages in */
	__u64 result;   /* out: bytes done (COMPARE mismatch: offset) over all resubmissions */
	__u64 fault_va; /* out: the last faulting VA (0: none) */
};

#define PCISIM_NPU_IOC_INFO   _IOR(PCISIM_NPU_IOC_MAGIC, 0, struct pcisim_npu_info)
#define PCISIM_NPU_IOC_SUBMIT _IOWR(PCISIM_NPU_IOC_MAGIC, 1, struct pcisim_npu_work)
#define PCISIM_NPU_IOC_WAIT   _IOWR(PCISIM_NPU_IOC_MAGIC, 2, struct pcisim_npu_work)

/* The page an mmap() of the device file maps (read-only, one page, offset 0). */
#define PCISIM_NPU_STATUS_MAGIC 0x4e505553u /* "SUPN" */
struct pcisim_npu_status {
	__u32 magic;
	__u32 pasid;
	__u32 bound;
	__u32 reserved;
	__u64 submitted;
	__u64 completed;
	__u64 faults;
	__u64 last_fault_va;
};

#endif
