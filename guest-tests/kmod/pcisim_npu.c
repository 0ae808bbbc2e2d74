// SPDX-License-Identifier: GPL-2.0
/*
 * pcisim_npu.c - guest driver for pcisim's NPU function (vendor 0x1234, device 0x0b20).
 *
 * The device runs work over process virtual addresses: the driver binds a PASID to a process's
 * page tables (BIND with the physical address of the mm's top-level table) and the device walks
 * them itself, caching translations in its ATC. The contract is docs/npu.md; the lifetime rules
 * this driver implements, and why, are docs/sva.md. In short:
 *
 *  - open() binds the opener's mm: PASID, mmu notifier, BIND. The binding belongs to that mm.
 *  - the notifier's arch_invalidate_secondary_tlbs callback (called after the CPU's page table
 *    entries changed and before the pages are freed, in atomic context) sends INVALIDATE and
 *    waits for the device; release (exit_mmap, before the page tables are torn down) sends
 *    UNBIND with ABORT and waits for the drain to be acknowledged.
 *  - the file holds the mm_struct (mmgrab), never the address space (mmget): an mmap of the file
 *    inside the same mm must not keep the mm's pages alive, or exit_mmap would never run.
 *  - only the bound mm may submit work; a forked child or the receiver of a passed fd gets EPERM.
 *
 * Buggy variants (module parameter `bug`, for testing the lab's oracle; never for real use):
 *   skip_invalidate   - the invalidation callback does nothing (missed mmu-notifier invalidation)
 *   no_mm_release     - nothing on mm release: the PASID is unbound at file release only
 *   ack_without_drain - mm release sends UNBIND (finish queued work) and returns without waiting
 *   leak_peer_ref     - the reference taken on the GPU peer's pci_dev is kept after its removal
 *   reset_in_probe    - probe resets the device with pci_reset_function(), which takes the device
 *                       lock the driver core already holds around probe: the probing task
 *                       deadlocks on itself (seed 002; docs/reset.md, R10b)
 *
 * Probe resets the function before using it (R10): pci_reset_function_locked(), the variant for
 * callers that already hold the device lock (drivers/pci/pci.c in 6.12: pci_reset_function()
 * takes pci_dev_lock() of the upstream bridge and of the device itself, i.e. device_lock();
 * __driver_attach() holds that lock around ->probe(); pci_reset_function_locked() only saves
 * config space, runs __pci_reset_function_locked() - the first reset method that works, FLR
 * here - and restores it).
 *
 * Kernel sources read: include/linux/mmu_notifier.h and mm/mmu_notifier.c (release,
 * arch_invalidate_secondary_tlbs, register/unregister semantics), arch/x86/mm/tlb.c (where the
 * secondary-TLB callback runs), drivers/iommu/intel/svm.c and drivers/iommu/iommu-sva.c (what
 * SVA does in the same callbacks), drivers/misc/uacce (fd vs mm lifetime).
 */
#include <linux/delay.h>
#include <linux/device.h>
#include <linux/dma-mapping.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/interrupt.h>
#include <linux/iommu.h>
#include <linux/kref.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/module.h>
#include <linux/pagemap.h>
#include <linux/pci.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/wait.h>

#include "pcisim_npu_uapi.h"
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
};

static const char *const bug_names[] = {
	[NPU_BUG_NONE] = "none",
	[NPU_BUG_SKIP_INVALIDATE] = "skip_invalidate",
	[NPU_BUG_NO_MM_RELEASE] = "no_mm_release",
	[NPU_BUG_ACK_WITHOUT_DRAIN] = "ack_without_drain",
	[NPU_BUG_LEAK_PEER_REF] = "leak_peer_ref",
	[NPU_BUG_RESET_IN_PROBE] = "reset_in_probe",
};

static char *bug = "none";
module_param(bug, charp, 0444);
MODULE_PARM_DESC(bug, "deliberate bug for testing the lab: none, skip_invalidate, no_mm_release, ack_without_drain, leak_peer_ref, reset_in_probe");
static enum npu_bug the_bug;

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
	int id;
	char name[32];
	struct miscdevice misc;
	bool misc_registered;
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

static DEFINE_IDA(npu_ids);

static void npu_free(struct kref *ref)
{
	struct npu *npu = container_of(ref, struct npu, ref);

	ida_destroy(&npu->pasids);
	pci_dev_put(npu->pdev);
	kfree(npu);
}

static u32 rd(struct npu *npu, u32 off)
{
	return readl(npu->regs + off);
}

static void wr(struct npu *npu, u32 off, u32 val)
{
	writel(val, npu->regs + off);
}

/* ------------------------------------------------------------------------------------------ */
/* Command mailbox. Callers hold mbox_lock (a spinlock: invalidations come in atomic context).  */
/* ------------------------------------------------------------------------------------------ */

static int npu_cmd_wait_idle(struct npu *npu, u32 *status)
{
	u32 st;
	unsigned long waited = 0;

	for (;;) {
		st = rd(npu, NPU_REG_CMD_STATUS);
		if (st == ~0u) {
			dev_warn_ratelimited(&npu->pdev->dev, "mailbox reads all-ones (device gone?)\n");
			return -ENODEV;
		}
		if (!(st & NPU_CMD_BUSY))
			break;
		if (waited >= CMD_TIMEOUT_US) {
			dev_err(&npu->pdev->dev, "mailbox busy for %lu us, giving up\n", waited);
			return -ETIMEDOUT;
		}
		udelay(10);
		waited += 10;
	}
	if (status)
		*status = st & NPU_CMD_RESULT_MASK;
	return 0;
}

/*
 * Runs one command. With `wait`, returns after the device acknowledged it (CMD_STATUS not busy)
 * with the device's result code in *result; without, returns once the command was issued.
 */
static int npu_cmd(struct npu *npu, u32 op, u32 pasid, u32 flags, u64 addr, u64 len,
		   bool wait, u32 *result)
{
	u32 st;
	int ret;

	lockdep_assert_held(&npu->mbox_lock);
	if (npu->gone)
		return -ENODEV;
	ret = npu_cmd_wait_idle(npu, NULL);
	if (ret)
		return ret;
	wr(npu, NPU_REG_CMD_PASID, pasid);
	wr(npu, NPU_REG_CMD_FLAGS, flags);
	wr(npu, NPU_REG_CMD_ADDR_LO, lower_32_bits(addr));
	wr(npu, NPU_REG_CMD_ADDR_HI, upper_32_bits(addr));
	wr(npu, NPU_REG_CMD_LEN_LO, lower_32_bits(len));
	wr(npu, NPU_REG_CMD_LEN_HI, upper_32_bits(len));
	wr(npu, NPU_REG_CMD_OP, op);
	if (!wait)
		return 0;
	ret = npu_cmd_wait_idle(npu, &st);
	if (ret)
		return ret;
	if (result)
		*result = st;
	return st ? -EIO : 0;
}

/* Drops the device's translations of [start, end) for the context, and waits for it. */
static void npu_invalidate(struct npu_ctx *ctx, unsigned long start, unsigned long end)
{
	struct npu *npu = ctx->npu;
	unsigned long flags;
	u64 len;
	u32 res = 0;
	int ret;

	/* A flush of everything (or of a huge span) drops the PASID's whole ATC. */
	if (end <= start || end - start >= (1ULL << 47))
		len = ~0ULL;
	else
		len = end - start;
	spin_lock_irqsave(&npu->mbox_lock, flags);
	if (ctx->bound) {
		ret = npu_cmd(npu, NPU_OP_INVALIDATE, ctx->pasid, 0, start, len, true, &res);
		if (ret && ret != -ENODEV)
			dev_err_ratelimited(&npu->pdev->dev,
					    "INVALIDATE pasid %u [%#lx, %#lx) failed: %d (result %u)\n",
					    ctx->pasid, start, end, ret, res);
	}
	spin_unlock_irqrestore(&npu->mbox_lock, flags);
}

/*
 * Unbinds the context's PASID. With `drain`, returns after the device acknowledged the drain:
 * from then on it never touches memory through the PASID. Idempotent.
 */
static void npu_unbind(struct npu_ctx *ctx, bool abort, bool drain, const char *why)
{
	struct npu *npu = ctx->npu;
	unsigned long flags;
	u32 res = 0;
	int ret;

	spin_lock_irqsave(&npu->mbox_lock, flags);
	if (!ctx->bound) {
		spin_unlock_irqrestore(&npu->mbox_lock, flags);
		return;
	}
	ctx->bound = false;
	ret = npu_cmd(npu, NPU_OP_UNBIND, ctx->pasid, abort ? NPU_UNBIND_FLAG_ABORT : 0, 0, 0, drain, &res);
	if (drain && !ret)
		res = rd(npu, NPU_REG_CMD_RESULT);
	spin_unlock_irqrestore(&npu->mbox_lock, flags);
	if (ctx->status)
		WRITE_ONCE(ctx->status->bound, 0);
	if (ret && ret != -ENODEV)
		dev_err(&npu->pdev->dev, "UNBIND pasid %u (%s) failed: %d\n", ctx->pasid, why, ret);
	else if (drain)
		dev_info(&npu->pdev->dev, "pasid %u unbound on %s: %u item(s) aborted\n",
			 ctx->pasid, why, ret ? 0 : res);
	else
		dev_info(&npu->pdev->dev, "pasid %u: UNBIND issued on %s, not waiting (bug %s)\n",
			 ctx->pasid, why, bug_names[the_bug]);
}

/* ------------------------------------------------------------------------------------------ */
/* The mmu notifier: how the device learns about the CPU's page-table changes.                 */
/* ------------------------------------------------------------------------------------------ */

/*
 * Called after the CPU's page-table entries of [start, end) were changed or cleared and the CPU
 * TLBs flushed, before the pages or page tables are freed (arch/x86/mm/tlb.c calls it from
 * flush_tlb_mm_range() and when batching unmap flushes). Atomic context: no sleeping.
 * invalidate_range_start would be too early for a device that walks on its own: it could walk
 * and cache the old entry again between the callback and the PTE change.
 */
static void npu_mn_invalidate(struct mmu_notifier *mn, struct mm_struct *mm,
			      unsigned long start, unsigned long end)
{
	struct npu_ctx *ctx = container_of(mn, struct npu_ctx, mn);

	if (the_bug == NPU_BUG_SKIP_INVALIDATE)
		return;
	npu_invalidate(ctx, start, end);
}

/*
 * Called once, from exit_mmap() before the address space is torn down, or from
 * mmu_notifier_unregister() if the file goes first. The device must stop walking the tables
 * before this returns.
 */
static void npu_mn_release(struct mmu_notifier *mn, struct mm_struct *mm)
{
	struct npu_ctx *ctx = container_of(mn, struct npu_ctx, mn);

	switch (the_bug) {
	case NPU_BUG_NO_MM_RELEASE:
		return;
	case NPU_BUG_ACK_WITHOUT_DRAIN:
		npu_unbind(ctx, false, false, "mm release");
		return;
	default:
		npu_unbind(ctx, true, true, "mm release");
	}
}

static const struct mmu_notifier_ops npu_mn_ops = {
	.release = npu_mn_release,
	.arch_invalidate_secondary_tlbs = npu_mn_invalidate,
};

/* ------------------------------------------------------------------------------------------ */
/* Queues                                                                                       */
/* ------------------------------------------------------------------------------------------ */

/* Reaps completions and fault records. Called from the interrupt handler and by waiters. */
static void npu_reap(struct npu *npu)
{
	unsigned long flags;
	bool woke = false;
	u32 tail;

	spin_lock_irqsave(&npu->q_lock, flags);
	if (npu->gone) {
		spin_unlock_irqrestore(&npu->q_lock, flags);
		return;
	}
	tail = rd(npu, NPU_REG_FQ_TAIL);
	while (tail < FQ_ENTRIES && npu->fq_head != tail) {
		struct npu_fault *f = &npu->fq[npu->fq_head];

		dev_info_ratelimited(&npu->pdev->dev,
				     "translation fault: pasid %u va %#llx %s%s reason %u level %u tag %llu\n",
				     f->pasid, f->va, f->access & NPU_FAULT_ACCESS_WRITE ? "write" : "read",
				     f->access & 2 ? " user" : "", f->reason, f->level, f->tag);
		npu->fq_head = (npu->fq_head + 1) % FQ_ENTRIES;
	}
	wr(npu, NPU_REG_FQ_HEAD, npu->fq_head);

	tail = rd(npu, NPU_REG_CQ_TAIL);
	while (tail < CQ_ENTRIES && npu->cq_head != tail) {
		struct npu_cqe e;
		struct npu_work *w;

		dma_rmb();
		e = npu->cq[npu->cq_head];
		if (e.slot < SQ_ENTRIES) {
			/* Descriptors complete in SQ order: the SQ head follows the completions. */
			npu->sq_head = (e.slot + 1) % SQ_ENTRIES;
			w = npu->slot_work[e.slot];
			if (w && w->tag == e.tag) {
				npu->slot_work[e.slot] = NULL;
				w->in_flight = false;
				w->done = true;
				w->status = e.status;
				w->result = e.result;
				woke = true;
			}
		} else {
			dev_warn_ratelimited(&npu->pdev->dev, "CQ entry with slot %u\n", e.slot);
		}
		npu->cq_head = (npu->cq_head + 1) % CQ_ENTRIES;
	}
	wr(npu, NPU_REG_CQ_HEAD, npu->cq_head);
	spin_unlock_irqrestore(&npu->q_lock, flags);
	if (woke)
		wake_up_all(&npu->wq);
}

static irqreturn_t npu_irq(int irq, void *data)
{
	npu_reap(data);
	return IRQ_HANDLED;
}

/* Puts the work's remaining range in the SQ. q_lock held. */
static int npu_queue_locked(struct npu_ctx *ctx, struct npu_work *w)
{
	struct npu *npu = ctx->npu;
	struct npu_desc *d;
	u32 slot = npu->sq_tail;

	if (npu->gone)
		return -ENODEV;
	if ((slot + 1) % SQ_ENTRIES == npu->sq_head)
		return -EBUSY;
	w->tag = ++npu->next_tag;
	w->done = false;
	w->in_flight = true;
	w->status = PCISIM_NPU_ST_PENDING;
	d = &npu->sq[slot];
	memset(d, 0, sizeof(*d));
	d->op = w->op;
	d->flags = NPU_DESC_FLAG_IRQ;
	d->pasid = ctx->pasid;
	d->src = w->src;
	d->dst = w->dst;
	d->len = w->len;
	d->tag = w->tag;
	npu->slot_work[slot] = w;
	npu->sq_tail = (slot + 1) % SQ_ENTRIES;
	dma_wmb();
	wr(npu, NPU_REG_SQ_TAIL, npu->sq_tail);
	if (ctx->status)
		WRITE_ONCE(ctx->status->submitted, ctx->status->submitted + 1);
	return 0;
}

/* Queues the work, waiting for a free SQ slot. */
static int npu_queue(struct npu_ctx *ctx, struct npu_work *w)
{
	struct npu *npu = ctx->npu;
	unsigned long flags;
	int ret;

	for (;;) {
		spin_lock_irqsave(&npu->q_lock, flags);
		ret = npu_queue_locked(ctx, w);
		spin_unlock_irqrestore(&npu->q_lock, flags);
		if (ret != -EBUSY)
			return ret;
		npu_reap(npu);
		if (wait_event_killable_timeout(npu->wq, false, msecs_to_jiffies(1)) < 0)
			return -EINTR;
	}
}

/* Waits for the work's descriptor to complete (polling as a fallback to the interrupt). */
static int npu_wait_done(struct npu *npu, struct npu_work *w)
{
	long left;

	for (;;) {
		npu_reap(npu);
		if (READ_ONCE(w->done))
			return 0;
		if (READ_ONCE(npu->gone))
			return -ENODEV;
		left = wait_event_killable_timeout(npu->wq, READ_ONCE(w->done) || READ_ONCE(npu->gone),
						   msecs_to_jiffies(20));
		if (left < 0)
			return -EINTR;
	}
}

/*
 * Waits for the work and services translation faults PRI-style: the faulting page is faulted in
 * for the caller (who must be the bound mm) and the remainder resubmitted. Returns 0 when the
 * work completed (any device status), -EFAULT when a fault could not be serviced.
 */
static int npu_finish(struct npu_ctx *ctx, struct npu_work *w)
{
	struct npu *npu = ctx->npu;
	int ret;

	for (;;) {
		u64 done;

		ret = npu_wait_done(npu, w);
		if (ret)
			return ret;
		done = w->status == PCISIM_NPU_ST_MISMATCH ? 0 : w->result;
		if (w->status != PCISIM_NPU_ST_TRANSLATION_FAULT) {
			w->done_bytes += w->status == PCISIM_NPU_ST_MISMATCH ? 0 : done;
			if (w->status == PCISIM_NPU_ST_MISMATCH)
				w->result += w->done_bytes;
			else
				w->result = w->done_bytes;
			return 0;
		}
		/* Translation fault after `done` bytes: service the page and resubmit the rest. */
		w->done_bytes += done;
		w->src += w->op == PCISIM_NPU_OP_FILL ? 0 : done;
		w->dst += done;
		w->len -= done;
		w->fault_va = w->op == PCISIM_NPU_OP_FILL ? w->dst : w->src;
		if (ctx->status) {
			WRITE_ONCE(ctx->status->faults, ctx->status->faults + 1);
			WRITE_ONCE(ctx->status->last_fault_va, w->fault_va);
		}
		if ((w->flags & PCISIM_NPU_NO_FAULT_SERVICE) || current->mm != ctx->mm ||
		    w->faults >= MAX_FAULTS)
			return -EFAULT;
		if (w->op != PCISIM_NPU_OP_FILL &&
		    fault_in_readable((const char __user *)(uintptr_t)w->src, 1))
			return -EFAULT;
		if (w->op == PCISIM_NPU_OP_COMPARE) {
			if (fault_in_readable((const char __user *)(uintptr_t)w->dst, 1))
				return -EFAULT;
		} else if (fault_in_writeable((char __user *)(uintptr_t)w->dst, 1)) {
			w->fault_va = w->dst;
			return -EFAULT;
		}
		w->faults++;
		ret = npu_queue(ctx, w);
		if (ret)
			return ret;
	}
}

/* ------------------------------------------------------------------------------------------ */
/* File operations                                                                              */
/* ------------------------------------------------------------------------------------------ */

static u64 npu_page_table_root(struct mm_struct *mm)
{
	pgd_t *pgd = mm->pgd;

	/*
	 * The device walks x86-64 4-level tables. With 5-level paging the user half below 2^47 is
	 * the first PML5 entry's PML4 table, which stays until the mm dies.
	 */
	if (pgtable_l5_enabled()) {
		p4d_t *p4d = p4d_offset(pgd, 0);

		return __pa(p4d);
	}
	return __pa(pgd);
}

static int npu_open(struct inode *inode, struct file *file)
{
	struct npu *npu = container_of(file->private_data, struct npu, misc);
	struct npu_ctx *ctx;
	unsigned long flags;
	u32 res = 0;
	int pasid, ret;

	if (!current->mm)
		return -EINVAL;
	if (!npu->sva) {
		dev_info(&npu->pdev->dev, "open refused: DMA is translated by an IOMMU, the device cannot walk process page tables\n");
		return -EOPNOTSUPP;
	}
	ctx = kzalloc(sizeof(*ctx), GFP_KERNEL);
	if (!ctx)
		return -ENOMEM;
	ctx->status = (void *)get_zeroed_page(GFP_KERNEL);
	if (!ctx->status) {
		ret = -ENOMEM;
		goto err_ctx;
	}
	pasid = ida_alloc_range(&npu->pasids, 1, NPU_PASID_LIMIT - 1, GFP_KERNEL);
	if (pasid < 0) {
		ret = pasid;
		goto err_page;
	}
	ctx->npu = npu;
	ctx->pasid = pasid;
	ctx->owner = current->tgid;
	ctx->mm = current->mm;
	mmgrab(ctx->mm);
	INIT_LIST_HEAD(&ctx->works);
	ctx->status->magic = PCISIM_NPU_STATUS_MAGIC;
	ctx->status->pasid = pasid;

	/* Notifier first: no invalidation may be missed once the device can cache. */
	ctx->mn.ops = &npu_mn_ops;
	ret = mmu_notifier_register(&ctx->mn, ctx->mm);
	if (ret)
		goto err_mm;
	ctx->mn_registered = true;

	mmap_read_lock(ctx->mm);
	ctx->root = npu_page_table_root(ctx->mm);
	mmap_read_unlock(ctx->mm);
	spin_lock_irqsave(&npu->mbox_lock, flags);
	ret = npu_cmd(npu, NPU_OP_BIND, ctx->pasid, 0, ctx->root, 0, true, &res);
	if (!ret)
		ctx->bound = true;
	spin_unlock_irqrestore(&npu->mbox_lock, flags);
	if (ret) {
		dev_err(&npu->pdev->dev, "BIND pasid %u root %#llx failed: %d (result %u)\n",
			ctx->pasid, ctx->root, ret, res);
		ret = ret == -EIO ? -EBUSY : ret;
		goto err_mn;
	}
	ctx->status->bound = 1;
	mutex_lock(&npu->ctx_lock);
	list_add(&ctx->node, &npu->ctxs);
	npu->nctx++;
	mutex_unlock(&npu->ctx_lock);
	kref_get(&npu->ref);
	file->private_data = ctx;
	dev_info(&npu->pdev->dev, "pid %d bound pasid %u (root %#llx)\n", ctx->owner, ctx->pasid,
		 ctx->root);
	return 0;

err_mn:
	mmu_notifier_unregister(&ctx->mn, ctx->mm);
err_mm:
	mmdrop(ctx->mm);
	ida_free(&npu->pasids, pasid);
err_page:
	free_page((unsigned long)ctx->status);
err_ctx:
	kfree(ctx);
	return ret;
}

static int npu_release(struct inode *inode, struct file *file)
{
	struct npu_ctx *ctx = file->private_data;
	struct npu *npu = ctx->npu;
	struct npu_work *w, *tmp;
	unsigned long flags;
	int i;

	/*
	 * mmu_notifier_unregister() runs the release callback if exit_mmap() has not: either way
	 * the PASID is unbound and drained before the notifier is gone. The buggy variants that
	 * skip it there get their unbind here.
	 */
	mmu_notifier_unregister(&ctx->mn, ctx->mm);
	npu_unbind(ctx, true, true, "file release");
	mmdrop(ctx->mm);

	/* Works still in the SQ complete later as ABORTED / PASID_NOT_BOUND: forget them. */
	spin_lock_irqsave(&npu->q_lock, flags);
	list_for_each_entry_safe(w, tmp, &ctx->works, node) {
		for (i = 0; i < SQ_ENTRIES; i++)
			if (npu->slot_work[i] == w)
				npu->slot_work[i] = NULL;
		list_del(&w->node);
		kfree(w);
	}
	spin_unlock_irqrestore(&npu->q_lock, flags);

	mutex_lock(&npu->ctx_lock);
	list_del(&ctx->node);
	npu->nctx--;
	mutex_unlock(&npu->ctx_lock);
	ida_free(&npu->pasids, ctx->pasid);
	dev_info(&npu->pdev->dev, "pasid %u of pid %d released\n", ctx->pasid, ctx->owner);
	free_page((unsigned long)ctx->status);
	kfree(ctx);
	kref_put(&npu->ref, npu_free);
	return 0;
}

static bool npu_ctx_bound(struct npu_ctx *ctx)
{
	unsigned long flags;
	bool bound;

	spin_lock_irqsave(&ctx->npu->mbox_lock, flags);
	bound = ctx->bound && !ctx->npu->gone;
	spin_unlock_irqrestore(&ctx->npu->mbox_lock, flags);
	return bound;
}

static struct npu_work *npu_find_work(struct npu_ctx *ctx, u64 ticket)
{
	struct npu_work *w;

	list_for_each_entry(w, &ctx->works, node)
		if (w->ticket == ticket)
			return w;
	return NULL;
}

static void npu_work_out(const struct npu_work *w, struct pcisim_npu_work *u)
{
	u->ticket = w->ticket;
	u->status = w->status;
	u->faults = w->faults;
	u->result = w->result;
	u->fault_va = w->fault_va;
}

/* Frees a finished work (it is no longer referenced by the SQ). */
static void npu_drop_work(struct npu_ctx *ctx, struct npu_work *w)
{
	unsigned long flags;

	spin_lock_irqsave(&ctx->npu->q_lock, flags);
	if (w->in_flight) {
		/* Interrupted wait: the descriptor still runs; keep it until the file goes. */
		spin_unlock_irqrestore(&ctx->npu->q_lock, flags);
		return;
	}
	list_del(&w->node);
	spin_unlock_irqrestore(&ctx->npu->q_lock, flags);
	if (ctx->status)
		WRITE_ONCE(ctx->status->completed, ctx->status->completed + 1);
	kfree(w);
}

static long npu_ioctl_submit(struct npu_ctx *ctx, struct pcisim_npu_work __user *uarg)
{
	struct npu *npu = ctx->npu;
	struct pcisim_npu_work u;
	struct npu_work *w;
	unsigned long flags;
	int ret;

	if (copy_from_user(&u, uarg, sizeof(u)))
		return -EFAULT;
	if (u.op < PCISIM_NPU_OP_MEMCPY || u.op > PCISIM_NPU_OP_COMPARE ||
	    (u.flags & ~(PCISIM_NPU_WAIT | PCISIM_NPU_NO_FAULT_SERVICE)))
		return -EINVAL;
	/* The VAs mean something only in the bound mm. */
	if (current->mm != ctx->mm)
		return -EPERM;
	if (!npu_ctx_bound(ctx))
		return READ_ONCE(npu->gone) ? -ENODEV : -ENXIO;
	w = kzalloc(sizeof(*w), GFP_KERNEL);
	if (!w)
		return -ENOMEM;
	w->op = u.op;
	w->flags = u.flags;
	w->src = u.src;
	w->dst = u.dst;
	w->len = u.len;
	spin_lock_irqsave(&npu->q_lock, flags);
	w->ticket = ++npu->next_tag;
	list_add_tail(&w->node, &ctx->works);
	spin_unlock_irqrestore(&npu->q_lock, flags);

	ret = npu_queue(ctx, w);
	if (ret) {
		w->in_flight = false;
		npu_drop_work(ctx, w);
		return ret;
	}
	if (!(u.flags & PCISIM_NPU_WAIT)) {
		u.ticket = w->ticket;
		u.status = PCISIM_NPU_ST_PENDING;
		return copy_to_user(uarg, &u, sizeof(u)) ? -EFAULT : 0;
	}
	ret = npu_finish(ctx, w);
	npu_work_out(w, &u);
	if (ret != -EINTR)
		npu_drop_work(ctx, w);
	if (copy_to_user(uarg, &u, sizeof(u)))
		return -EFAULT;
	return ret;
}

static long npu_ioctl_wait(struct npu_ctx *ctx, struct pcisim_npu_work __user *uarg)
{
	struct pcisim_npu_work u;
	struct npu_work *w;
	unsigned long flags;
	int ret;

	if (copy_from_user(&u, uarg, sizeof(u)))
		return -EFAULT;
	if (current->mm != ctx->mm)
		return -EPERM;
	spin_lock_irqsave(&ctx->npu->q_lock, flags);
	w = npu_find_work(ctx, u.ticket);
	spin_unlock_irqrestore(&ctx->npu->q_lock, flags);
	if (!w)
		return -ENOENT;
	ret = npu_finish(ctx, w);
	npu_work_out(w, &u);
	if (ret != -EINTR)
		npu_drop_work(ctx, w);
	if (copy_to_user(uarg, &u, sizeof(u)))
		return -EFAULT;
	return ret;
}

static long npu_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct npu_ctx *ctx = file->private_data;
	struct npu *npu = ctx->npu;
	struct pcisim_npu_info info = {};

	switch (cmd) {
	case PCISIM_NPU_IOC_INFO:
		info.pasid = ctx->pasid;
		info.flags = (npu_ctx_bound(ctx) ? PCISIM_NPU_INFO_BOUND : 0) |
			     (npu->sva ? PCISIM_NPU_INFO_SVA : 0) |
			     (READ_ONCE(npu->gone) ? PCISIM_NPU_INFO_REMOVED : 0);
		info.root = ctx->root;
		info.owner_pid = ctx->owner;
		info.contexts = READ_ONCE(npu->nctx);
		return copy_to_user((void __user *)arg, &info, sizeof(info)) ? -EFAULT : 0;
	case PCISIM_NPU_IOC_SUBMIT:
		return npu_ioctl_submit(ctx, (void __user *)arg);
	case PCISIM_NPU_IOC_WAIT:
		return npu_ioctl_wait(ctx, (void __user *)arg);
	default:
		return -ENOTTY;
	}
}

/*
 * mmap maps the context's status page read-only. The mapping holds the file, and the file holds
 * only the mm_struct, so exit_mmap() still runs (and unbinds) while the mapping exists.
 */
static int npu_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct npu_ctx *ctx = file->private_data;

	if (vma->vm_pgoff || vma->vm_end - vma->vm_start != PAGE_SIZE)
		return -EINVAL;
	if (vma->vm_flags & VM_WRITE)
		return -EPERM;
	vm_flags_clear(vma, VM_MAYWRITE);
	return vm_insert_page(vma, vma->vm_start, virt_to_page(ctx->status));
}

static const struct file_operations npu_fops = {
	.owner = THIS_MODULE,
	.open = npu_open,
	.release = npu_release,
	.unlocked_ioctl = npu_ioctl,
	.mmap = npu_mmap,
};

/* ------------------------------------------------------------------------------------------ */
/* The GPU peer                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static bool npu_is_peer(struct npu *npu, struct pci_dev *pdev)
{
	return npu->has_peer && pdev != npu->pdev && pdev->vendor == npu->peer_vendor &&
	       pdev->device == npu->peer_device;
}

/* Takes a reference on the GPU peer: the NPU uses it (peer-to-peer work). peer_lock held. */
static void npu_take_peer(struct npu *npu, struct pci_dev *pdev)
{
	if (npu->peer)
		return;
	npu->peer = pci_dev_get(pdev);
	npu->peer_leaked = false;
	strscpy(npu->peer_name, pci_name(pdev), sizeof(npu->peer_name));
	dev_info(&npu->pdev->dev, "GPU peer %s (%04x:%04x) acquired\n", npu->peer_name,
		 pdev->vendor, pdev->device);
}

static int npu_bus_notify(struct notifier_block *nb, unsigned long action, void *data)
{
	struct npu *npu = container_of(nb, struct npu, bus_nb);
	struct pci_dev *pdev = to_pci_dev(data);

	mutex_lock(&npu->peer_lock);
	if (action == BUS_NOTIFY_ADD_DEVICE && npu_is_peer(npu, pdev)) {
		npu_take_peer(npu, pdev);
	} else if (action == BUS_NOTIFY_DEL_DEVICE && pdev == npu->peer) {
		if (the_bug == NPU_BUG_LEAK_PEER_REF) {
			dev_info(&npu->pdev->dev, "GPU peer %s removed; keeping its reference (bug %s)\n",
				 npu->peer_name, bug_names[the_bug]);
			npu->peer_leaked = true;
			npu->peer = NULL; /* forgotten, never put: the leak */
		} else {
			dev_info(&npu->pdev->dev, "GPU peer %s removed; reference dropped\n",
				 npu->peer_name);
			pci_dev_put(npu->peer);
			npu->peer = NULL;
		}
	}
	mutex_unlock(&npu->peer_lock);
	return NOTIFY_OK;
}

static void npu_find_peer(struct npu *npu)
{
	struct pci_dev *pdev = npu->pdev;
	struct pci_dev *other = NULL;
	int pos;

	for (pos = pci_find_capability(pdev, PCI_CAP_ID_VNDR); pos;
	     pos = pci_find_next_capability(pdev, pos, PCI_CAP_ID_VNDR)) {
		u8 kind;

		pci_read_config_byte(pdev, pos + PCISIM_VSEC_KIND_OFFSET, &kind);
		if (kind != PCISIM_VSEC_KIND_GPU_PEER)
			continue;
		pci_read_config_dword(pdev, pos + PCISIM_VSEC_PEER_ID_OFFSET, &npu->peer_id);
		pci_read_config_word(pdev, pos + PCISIM_VSEC_PEER_VENDOR_OFFSET, &npu->peer_vendor);
		pci_read_config_word(pdev, pos + PCISIM_VSEC_PEER_DEVICE_OFFSET, &npu->peer_device);
		npu->has_peer = true;
		break;
	}
	if (!npu->has_peer)
		return;
	dev_info(&pdev->dev, "GPU peer named: %04x:%04x id %#x\n", npu->peer_vendor,
		 npu->peer_device, npu->peer_id);
	mutex_lock(&npu->peer_lock);
	while ((other = pci_get_device(npu->peer_vendor, npu->peer_device, other))) {
		if (npu_is_peer(npu, other)) {
			npu_take_peer(npu, other);
			pci_dev_put(other);
			break;
		}
	}
	mutex_unlock(&npu->peer_lock);
}

static ssize_t pcisim_peer_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct npu *npu = pci_get_drvdata(to_pci_dev(dev));
	ssize_t n;

	if (!npu)
		return -ENODEV;
	mutex_lock(&npu->peer_lock);
	if (!npu->has_peer)
		n = sysfs_emit(buf, "none\n");
	else if (npu->peer)
		n = sysfs_emit(buf, "held %s\n", npu->peer_name);
	else if (npu->peer_leaked)
		n = sysfs_emit(buf, "leaked %s\n", npu->peer_name);
	else
		n = sysfs_emit(buf, "absent\n");
	mutex_unlock(&npu->peer_lock);
	return n;
}
static DEVICE_ATTR_RO(pcisim_peer);

static ssize_t pcisim_contexts_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct npu *npu = pci_get_drvdata(to_pci_dev(dev));

	return npu ? sysfs_emit(buf, "%u\n", READ_ONCE(npu->nctx)) : -ENODEV;
}
static DEVICE_ATTR_RO(pcisim_contexts);

static ssize_t pcisim_chardev_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct npu *npu = pci_get_drvdata(to_pci_dev(dev));

	return npu ? sysfs_emit(buf, "%s\n", npu->name) : -ENODEV;
}
static DEVICE_ATTR_RO(pcisim_chardev);

/* The device's PEER_STATUS register (bit 0 peer configured, bit 1 present), read live. */
static ssize_t pcisim_peer_status_show(struct device *dev, struct device_attribute *attr,
				       char *buf)
{
	struct npu *npu = pci_get_drvdata(to_pci_dev(dev));

	if (!npu || READ_ONCE(npu->gone))
		return -ENODEV;
	return sysfs_emit(buf, "%#x\n", rd(npu, NPU_REG_PEER_STATUS));
}
static DEVICE_ATTR_RO(pcisim_peer_status);

static struct attribute *npu_attrs[] = {
	&dev_attr_pcisim_peer.attr,
	&dev_attr_pcisim_peer_status.attr,
	&dev_attr_pcisim_contexts.attr,
	&dev_attr_pcisim_chardev.attr,
	NULL,
};
ATTRIBUTE_GROUPS(npu);

/* ------------------------------------------------------------------------------------------ */
/* Probe and remove                                                                             */
/* ------------------------------------------------------------------------------------------ */

static int npu_start_engine(struct npu *npu)
{
	struct device *dev = &npu->pdev->dev;
	u32 st;

	npu->sq = dmam_alloc_coherent(dev, SQ_ENTRIES * sizeof(struct npu_desc), &npu->sq_dma,
				      GFP_KERNEL);
	npu->cq = dmam_alloc_coherent(dev, CQ_ENTRIES * sizeof(struct npu_cqe), &npu->cq_dma,
				      GFP_KERNEL);
	npu->fq = dmam_alloc_coherent(dev, FQ_ENTRIES * sizeof(struct npu_fault), &npu->fq_dma,
				      GFP_KERNEL);
	if (!npu->sq || !npu->cq || !npu->fq)
		return -ENOMEM;
	wr(npu, NPU_REG_CONTROL, 0);
	wr(npu, NPU_REG_SQ_BASE_LO, lower_32_bits(npu->sq_dma));
	wr(npu, NPU_REG_SQ_BASE_HI, upper_32_bits(npu->sq_dma));
	wr(npu, NPU_REG_SQ_SIZE, SQ_ENTRIES);
	wr(npu, NPU_REG_CQ_BASE_LO, lower_32_bits(npu->cq_dma));
	wr(npu, NPU_REG_CQ_BASE_HI, upper_32_bits(npu->cq_dma));
	wr(npu, NPU_REG_CQ_SIZE, CQ_ENTRIES);
	wr(npu, NPU_REG_FQ_BASE_LO, lower_32_bits(npu->fq_dma));
	wr(npu, NPU_REG_FQ_BASE_HI, upper_32_bits(npu->fq_dma));
	wr(npu, NPU_REG_FQ_SIZE, FQ_ENTRIES);
	wr(npu, NPU_REG_CQ_IRQ, NPU_IRQ_ENABLE | 0);
	wr(npu, NPU_REG_FQ_IRQ, NPU_IRQ_ENABLE | 0);
	wr(npu, NPU_REG_CONTROL, NPU_CONTROL_ENABLE);
	st = rd(npu, NPU_REG_STATUS);
	if (!(st & NPU_STATUS_ENABLED) || (st & NPU_STATUS_HALTED)) {
		dev_err(dev, "engine did not start: STATUS %#x ERROR %u\n", st, rd(npu, NPU_REG_ERROR));
		return -EIO;
	}
	return 0;
}

static bool npu_dma_is_physical(struct pci_dev *pdev)
{
	struct iommu_domain *dom = iommu_get_domain_for_dev(&pdev->dev);

	return !dom || dom->type == IOMMU_DOMAIN_IDENTITY;
}

/*
 * Resets the function from probe, before bus mastering and the engine are on: whatever an
 * earlier owner (firmware, a previous driver, vfio) left running is gone. The driver core holds
 * the device lock around probe, so only the _locked variant is correct here; the buggy variant
 * calls pci_reset_function(), whose device_lock() never returns.
 */
static int npu_probe_reset(struct pci_dev *pdev)
{
	int ret;

	if (the_bug == NPU_BUG_RESET_IN_PROBE) {
		dev_info(&pdev->dev, "probe: pci_reset_function() under the device lock (bug %s)\n",
			 bug_names[the_bug]);
		ret = pci_reset_function(pdev);
	} else {
		dev_info(&pdev->dev, "probe: pci_reset_function_locked()\n");
		ret = pci_reset_function_locked(pdev);
	}
	if (ret)
		dev_err(&pdev->dev, "probe: reset failed: %d\n", ret);
	else
		dev_info(&pdev->dev, "probe: function reset done\n");
	return ret;
}

static int npu_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct npu *npu;
	u32 magic;
	int ret;

	npu = kzalloc(sizeof(*npu), GFP_KERNEL);
	if (!npu)
		return -ENOMEM;
	kref_init(&npu->ref);
	npu->pdev = pci_dev_get(pdev);
	spin_lock_init(&npu->mbox_lock);
	spin_lock_init(&npu->q_lock);
	init_waitqueue_head(&npu->wq);
	mutex_init(&npu->ctx_lock);
	mutex_init(&npu->peer_lock);
	INIT_LIST_HEAD(&npu->ctxs);
	ida_init(&npu->pasids);
	npu->id = -1;

	ret = pcim_enable_device(pdev);
	if (ret)
		goto err;
	ret = pcim_iomap_regions(pdev, BIT(0), DRV_NAME);
	if (ret)
		goto err;
	npu->regs = pcim_iomap_table(pdev)[0];
	ret = npu_probe_reset(pdev);
	if (ret)
		goto err;
	magic = rd(npu, NPU_REG_ID);
	if (magic != NPU_ID_MAGIC) {
		dev_err(&pdev->dev, "ID register %#x is not the NPU's %#x\n", magic, NPU_ID_MAGIC);
		ret = -ENODEV;
		goto err;
	}
	ret = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(64));
	if (ret)
		goto err;
	pci_set_master(pdev);
	npu->sva = npu_dma_is_physical(pdev);

	ret = npu_start_engine(npu);
	if (ret)
		goto err;
	ret = pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_MSIX | PCI_IRQ_MSI | PCI_IRQ_INTX);
	if (ret < 0)
		goto err_engine;
	npu->irq = pci_irq_vector(pdev, 0);
	ret = request_irq(npu->irq, npu_irq, IRQF_SHARED, DRV_NAME, npu);
	if (ret)
		goto err_vectors;

	npu->id = ida_alloc(&npu_ids, GFP_KERNEL);
	if (npu->id < 0) {
		ret = npu->id;
		goto err_irq;
	}
	snprintf(npu->name, sizeof(npu->name), "pcisim-npu%d", npu->id);
	npu->misc.minor = MISC_DYNAMIC_MINOR;
	npu->misc.name = npu->name;
	npu->misc.fops = &npu_fops;
	npu->misc.parent = &pdev->dev;
	pci_set_drvdata(pdev, npu);
	ret = misc_register(&npu->misc);
	if (ret)
		goto err_id;
	npu->misc_registered = true;

	npu_find_peer(npu);
	npu->bus_nb.notifier_call = npu_bus_notify;
	if (npu->has_peer)
		bus_register_notifier(&pci_bus_type, &npu->bus_nb);

	dev_info(&pdev->dev, "%s: %u contexts, sva %s, bug %s\n", npu->name,
		 rd(npu, NPU_REG_MAX_CONTEXTS), npu->sva ? "yes" : "no (IOMMU translates DMA)",
		 bug_names[the_bug]);
	return 0;

err_id:
	pci_set_drvdata(pdev, NULL);
	ida_free(&npu_ids, npu->id);
err_irq:
	free_irq(npu->irq, npu);
err_vectors:
	pci_free_irq_vectors(pdev);
err_engine:
	wr(npu, NPU_REG_CONTROL, 0);
err:
	kref_put(&npu->ref, npu_free);
	return ret;
}

static void npu_remove(struct pci_dev *pdev)
{
	struct npu *npu = pci_get_drvdata(pdev);
	struct npu_ctx *ctx;
	unsigned long flags;
	int i;

	if (npu->has_peer)
		bus_unregister_notifier(&pci_bus_type, &npu->bus_nb);
	mutex_lock(&npu->peer_lock);
	if (npu->peer) {
		pci_dev_put(npu->peer);
		npu->peer = NULL;
	}
	mutex_unlock(&npu->peer_lock);
	misc_deregister(&npu->misc);

	/* Open files outlive the device: unbind them now, then cut register access. */
	mutex_lock(&npu->ctx_lock);
	list_for_each_entry(ctx, &npu->ctxs, node)
		npu_unbind(ctx, true, true, "device removal");
	mutex_unlock(&npu->ctx_lock);
	wr(npu, NPU_REG_CONTROL, 0);
	free_irq(npu->irq, npu);
	pci_free_irq_vectors(pdev);

	spin_lock_irqsave(&npu->mbox_lock, flags);
	spin_lock(&npu->q_lock);
	npu->gone = true;
	for (i = 0; i < SQ_ENTRIES; i++) {
		struct npu_work *w = npu->slot_work[i];

		if (w) {
			w->in_flight = false;
			w->done = true;
			w->status = PCISIM_NPU_ST_ABORTED;
			npu->slot_work[i] = NULL;
		}
	}
	spin_unlock(&npu->q_lock);
	spin_unlock_irqrestore(&npu->mbox_lock, flags);
	wake_up_all(&npu->wq);
	pci_set_drvdata(pdev, NULL);
	ida_free(&npu_ids, npu->id);
	dev_info(&pdev->dev, "%s removed\n", npu->name);
	kref_put(&npu->ref, npu_free);
}

static const struct pci_device_id npu_ids_table[] = {
	{ PCI_DEVICE(PCISIM_VENDOR_ID, PCISIM_NPU_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, npu_ids_table);

static struct pci_driver npu_driver = {
	.name = DRV_NAME,
	.id_table = npu_ids_table,
	.probe = npu_probe,
	.remove = npu_remove,
	.dev_groups = npu_groups,
};

static int __init npu_init(void)
{
	int i;

	for (i = 0; i < ARRAY_SIZE(bug_names); i++)
		if (sysfs_streq(bug, bug_names[i]))
			break;
	if (i == ARRAY_SIZE(bug_names)) {
		pr_err(DRV_NAME ": unknown bug=%s\n", bug);
		return -EINVAL;
	}
	the_bug = i;
	if (the_bug != NPU_BUG_NONE)
		pr_warn(DRV_NAME ": loaded with deliberate bug %s\n", bug_names[the_bug]);
	return pci_register_driver(&npu_driver);
}

static void __exit npu_exit(void)
{
	pci_unregister_driver(&npu_driver);
	ida_destroy(&npu_ids);
}

module_init(npu_init);
module_exit(npu_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("pcisim NPU: PASID-bound work on process address spaces (SVA-style)");
