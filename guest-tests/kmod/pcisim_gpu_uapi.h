/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * pcisim_gpu_uapi.h - the user interface of the pcisim GPU guest driver (pcisim_gpu.ko).
 *
 * One character device per GPU function: /dev/pcisim-gpuN. A file holds at most one userptr:
 * a page-aligned range of the caller's memory the GPU's command ring writes into, DMA-mapped
 * through the IOMMU. Two ways to keep it valid (docs/userptr.md):
 *   - tracked (default): an mmu_interval_notifier over the range; when the range is unmapped or
 *     discarded the driver waits for the ring's fence, then DMA-unmaps the pages;
 *   - pinned (PCISIM_GPU_USERPTR_PIN): pin_user_pages(FOLL_LONGTERM), no notifier: the pages stay
 *     pinned and mapped until RELEASE or close, whatever the process does with the range.
 *
 * guest-tests/src/userptr.rs mirrors these definitions for the guest program.
 */
#ifndef PCISIM_GPU_UAPI_H
#define PCISIM_GPU_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define PCISIM_GPU_IOC_MAGIC 'G'

/* pcisim_gpu_userptr.flags */
#define PCISIM_GPU_USERPTR_PIN (1u << 0) /* pin the pages (FOLL_LONGTERM), no mmu notifier */

struct pcisim_gpu_userptr {
	__u64 addr;  /* in: page-aligned start */
	__u64 len;   /* in: page-aligned length, at most 64 MiB */
	__u32 flags; /* in: PCISIM_GPU_USERPTR_* */
	__u32 nents; /* out: DMA segments (IOVA ranges) the pages were mapped as */
	__u64 iova;  /* out: IOVA of the first segment */
};

struct pcisim_gpu_fill {
	__u32 pattern; /* in: 32-bit fill pattern */
	__u32 repeat;  /* in: how many times the ring fills the whole userptr (>= 1) */
	__u64 seqno;   /* out: the fence that signals when the last fill is done */
};

struct pcisim_gpu_wait {
	__u32 timeout_ms; /* in: 0 = just look */
	__s32 error;      /* out: the fence's error (0, or -EIO if the ring stopped) */
	__u32 signaled;   /* out: 1 if the file's last fence is signalled */
	__u32 reserved;
};

/* Per device, since load. */
struct pcisim_gpu_stats {
	__u64 invalidations;       /* invalidate callbacks that overlapped a mapped userptr */
	__u64 invalidate_waits;    /* of which waited for a pending fence */
	__u64 last_wait_ns;        /* the last such wait */
	__u64 max_wait_ns;         /* the longest such wait */
	__u64 refused_nonblock;    /* invalidations refused (non-blockable, fence pending) */
	__u64 pinned_pages;        /* pages pinned right now (PCISIM_GPU_USERPTR_PIN) */
	__u64 fences_emitted;
	__u64 fences_signaled;
};

#define PCISIM_GPU_IOC_USERPTR _IOWR(PCISIM_GPU_IOC_MAGIC, 1, struct pcisim_gpu_userptr)
#define PCISIM_GPU_IOC_FILL    _IOWR(PCISIM_GPU_IOC_MAGIC, 2, struct pcisim_gpu_fill)
#define PCISIM_GPU_IOC_WAIT    _IOWR(PCISIM_GPU_IOC_MAGIC, 3, struct pcisim_gpu_wait)
#define PCISIM_GPU_IOC_STATS   _IOR(PCISIM_GPU_IOC_MAGIC, 4, struct pcisim_gpu_stats)
/* Waits for the file's last fence, then unmaps and releases (unpins) the userptr. */
#define PCISIM_GPU_IOC_RELEASE _IO(PCISIM_GPU_IOC_MAGIC, 5)

#endif /* PCISIM_GPU_UAPI_H */
