/* SPDX-License-Identifier: GPL-2.0 */
/*
 * gpu.h - what the parts of pcisim_gpu.ko share: the device, fence, userptr and file structs, the
 * register accessors and the functions one part calls in another. The parts: gpu_main.c (probe,
 * remove, the file and its ioctls, the module), gpu_ring.c (the command ring, dma_fences, the
 * interrupt thread), gpu_userptr.c (userptrs: mmu interval notifier, pinning, DMA mapping) and
 * gpu_recovery.c (PCIe error recovery). The design is in gpu_main.c's opening comment.
 */
#ifndef PCISIM_GPU_H
#define PCISIM_GPU_H

#include <linux/atomic.h>
#include <linux/dma-fence.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/list.h>
#include <linux/mmu_notifier.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/scatterlist.h>
#include <linux/spinlock.h>

#include "pcisim_gpu_uapi.h"
#include "pcisim_kmod_common.h"
#include "pcisim_regs.h"

#define DRV_NAME "pcisim_gpu"

#define RING_ENTRIES   4096
#define FENCE_VECTOR   0
#define ERROR_VECTOR   1
#define GPU_NR_VECTORS 2
#define MAX_USERPTR    (64ull << 20)
#define MAX_RECOVERY_STEPS 16

enum gpu_bug {
	GPU_BUG_NONE,
	GPU_BUG_NO_FENCE_WAIT,
	GPU_BUG_ALLOC_IN_SIGNALLING,
	GPU_NR_BUGS,
};

/* The deliberate bug the module was loaded with (an enum gpu_bug), and the variants' names. */
extern int gpu_bug_mode;
extern const char *const gpu_bug_names[GPU_NR_BUGS];

struct gpu {
	struct pci_dev *pdev;
	void __iomem *regs;
	struct gpu_ring_cmd *ring;
	dma_addr_t ring_dma;
	u64 *fence_cpu;
	dma_addr_t fence_dma;
	u32 tail;
	struct mutex ring_lock;     /* ring slots, tail, seqno */
	spinlock_t fence_lock;      /* pending list; the lock of every fence */
	struct list_head pending;
	u64 fence_context;
	u64 seqno;
	int irqs[GPU_NR_VECTORS];
	struct pcisim_chardev cdev; /* /dev/pcisim-gpuN */
	/* PCIe error recovery: set from error_detected to resume; FILL fails while set */
	bool recovering;            /* under ring_lock */
	spinlock_t recovery_lock;   /* recovery_steps, nr_recovery_steps */
	u8 recovery_steps[MAX_RECOVERY_STEPS];
	unsigned int nr_recovery_steps;
	/* statistics (struct pcisim_gpu_stats) */
	atomic64_t invalidations, invalidate_waits, last_wait_ns, max_wait_ns, refused_nonblock;
	atomic64_t pinned_pages, fences_emitted, fences_signaled;
};

struct gpu_fence {
	struct dma_fence base; /* first: dma_fence_free() frees the whole struct */
	struct list_head node; /* in gpu->pending */
};

/* A file's userptr. */
struct gpu_userptr {
	struct gpu *gpu;
	struct mutex lock;      /* the driver lock of the notifier: mapped, seq, fence */
	struct mmu_interval_notifier notifier;
	bool tracked;           /* notifier inserted */
	bool pinned;
	bool mapped;            /* pages held and DMA-mapped */
	unsigned long seq;
	u64 addr, len;
	unsigned long npages;
	struct page **pages;
	struct sg_table sgt;
	struct dma_fence *fence; /* the last work queued on it */
};

struct gpu_file {
	struct gpu *gpu;
	struct mutex lock;       /* serialises ioctls on the file */
	struct gpu_userptr *up;
};

static inline u32 rd(struct gpu *gpu, u32 off)
{
	return readl(gpu->regs + off);
}

static inline void wr(struct gpu *gpu, u32 off, u32 val)
{
	writel(val, gpu->regs + off);
}

static inline void gpu_ring_stop(struct gpu *gpu)
{
	wr(gpu, GPU_REG_RING_CTRL, GPU_RING_CTRL_RESET);
}

/* gpu_ring.c */
void gpu_ring_start(struct gpu *gpu);
irqreturn_t gpu_irq_thread(int irq, void *data);
long gpu_ioctl_fill(struct gpu_file *gf, struct pcisim_gpu_fill __user *uarg);
long gpu_ioctl_wait(struct gpu_file *gf, struct pcisim_gpu_wait __user *uarg);
void gpu_fail_pending(struct gpu *gpu);

/* gpu_userptr.c */
long gpu_ioctl_userptr(struct gpu_file *gf, struct pcisim_gpu_userptr __user *uarg);
void gpu_userptr_free(struct gpu_userptr *up);

/* gpu_recovery.c */
extern const struct pci_error_handlers gpu_err_handler;
extern struct device_attribute dev_attr_pcisim_recovery;

#endif /* PCISIM_GPU_H */
