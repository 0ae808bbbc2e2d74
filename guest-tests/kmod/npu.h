/* SPDX-License-Identifier: GPL-2.0 */
/*
 * npu.h - what the parts of pcisim_npu.ko share: the device, context and work structs, the
 * register accessors and the functions one part calls in another. The parts: npu_main.c (probe,
 * remove, sysfs, the module), npu_sva.c (the command mailbox, PASID bind/unbind, the mmu
 * notifier, open and release), npu_queue.c (the queues, the interrupt, the SUBMIT/WAIT ioctls,
 * mmap) and npu_peer.c (the GPU peer). The design is in npu_main.c's opening comment.
 */
#ifndef PCISIM_NPU_H
#define PCISIM_NPU_H

#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/mmu_notifier.h>
#include <linux/mutex.h>
#include <linux/notifier.h>
#include <linux/pci.h>
#include <linux/spinlock.h>
#include <linux/wait.h>

#include "pcisim_npu_uapi.h"
#include "pcisim_kmod_common.h"
/*
 * Registers, bit fields, queue entry layouts (struct npu_desc, npu_cqe, npu_fault) and IDs:
 * generated from crates/abi (docs/npu.md is the contract).
 */
#include "pcisim_regs.h"

#define DRV_NAME "pcisim_npu"

#define SQ_ENTRIES       64
#define CQ_ENTRIES       128 /* > SQ_ENTRIES: the CQ can never fill (docs/sva.md) */
#define FQ_ENTRIES       64

/* How long the driver waits for the device's mailbox before declaring it dead. */
#define CMD_TIMEOUT_US   (5 * USEC_PER_SEC)
/* Resubmissions after serviced translation faults before giving up. */
#define MAX_FAULTS       4096

enum npu_bug {
	NPU_BUG_NONE,
	NPU_BUG_SKIP_INVALIDATE,
	NPU_BUG_NO_MM_RELEASE,
	NPU_BUG_ACK_WITHOUT_DRAIN,
	NPU_BUG_LEAK_PEER_REF,
	NPU_BUG_RESET_IN_PROBE,
	NPU_NR_BUGS,
};

/* The deliberate bug the module was loaded with (an enum npu_bug), and the variants' names. */
extern int npu_bug_mode;
extern const char *const npu_bug_names[NPU_NR_BUGS];

struct npu;

/* One submitted piece of work (one SUBMIT; resubmissions after faults reuse it). */
struct npu_work {
	struct list_head node;  /* in ctx->works */
	u64 ticket;             /* user-visible id, unique per device */
	u64 tag;                /* tag of the descriptor in flight */
	bool done;              /* the descriptor completed (CQ entry reaped) */
	bool in_flight;         /* a descriptor of it is in the SQ */
	u32 op, flags;
	u64 src, dst, len;      /* the remaining work */
	u64 done_bytes;         /* over all resubmissions */
	u32 status;
	u64 result;
	u32 faults;
	u64 fault_va;
};

/* One open file: one PASID binding of one mm. */
struct npu_ctx {
	struct npu *npu;
	struct mm_struct *mm;   /* mmgrab'ed: the struct, not the address space */
	pid_t owner;
	u32 pasid;
	u64 root;
	bool bound;             /* under npu->mbox_lock */
	struct mmu_notifier mn;
	bool mn_registered;
	struct list_head node;  /* in npu->ctxs */
	struct list_head works; /* under npu->q_lock */
	struct pcisim_npu_status *status; /* the page mmap() maps */
};

struct npu {
	struct kref ref;
	struct pci_dev *pdev;
	void __iomem *regs;
	struct pcisim_chardev cdev; /* /dev/pcisim-npuN */
	bool sva;               /* DMA addresses are physical addresses */
	bool gone;              /* removed: no register access (under mbox_lock and q_lock) */

	spinlock_t mbox_lock;   /* the command mailbox; also guards ctx->bound */

	spinlock_t q_lock;      /* queues, works, tickets */
	struct npu_desc *sq;
	dma_addr_t sq_dma;
	u32 sq_tail, sq_head;   /* driver's view; head from reaped completions */
	struct npu_cqe *cq;
	dma_addr_t cq_dma;
	u32 cq_head;
	struct npu_fault *fq;
	dma_addr_t fq_dma;
	u32 fq_head;
	struct npu_work *slot_work[SQ_ENTRIES];
	u64 next_tag;
	wait_queue_head_t wq;
	int irq;

	struct mutex ctx_lock;
	struct list_head ctxs;
	unsigned int nctx;
	struct ida pasids;

	/* The GPU peer named by the vendor capability (issue 5's H6). */
	bool has_peer;
	u16 peer_vendor, peer_device;
	u32 peer_id;
	struct mutex peer_lock;
	struct pci_dev *peer;   /* a counted reference while the peer exists */
	char peer_name[32];     /* for the log, kept after the reference is dropped */
	bool peer_leaked;
	struct notifier_block bus_nb;
};

static inline u32 rd(struct npu *npu, u32 off)
{
	return readl(npu->regs + off);
}

static inline void wr(struct npu *npu, u32 off, u32 val)
{
	writel(val, npu->regs + off);
}


/* npu_main.c */
void npu_free(struct kref *ref);

/* npu_sva.c */
int npu_open(struct inode *inode, struct file *file);
int npu_release(struct inode *inode, struct file *file);
bool npu_ctx_bound(struct npu_ctx *ctx);
void npu_unbind(struct npu_ctx *ctx, bool abort, bool drain, const char *why);

/* npu_queue.c */
irqreturn_t npu_irq(int irq, void *data);
long npu_ioctl(struct file *file, unsigned int cmd, unsigned long arg);
int npu_mmap(struct file *file, struct vm_area_struct *vma);

/* npu_peer.c */
void npu_find_peer(struct npu *npu);
int npu_bus_notify(struct notifier_block *nb, unsigned long action, void *data);
extern struct device_attribute dev_attr_pcisim_peer;

#endif /* PCISIM_NPU_H */
