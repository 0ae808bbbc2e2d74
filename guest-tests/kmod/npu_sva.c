// SPDX-License-Identifier: GPL-2.0
/*
 * npu_sva.c - pcisim_npu.ko's PASID bindings (docs/sva.md): the command mailbox, BIND at open,
 * INVALIDATE from the mmu notifier's arch_invalidate_secondary_tlbs, UNBIND (with the drain
 * acknowledged) at mm release, file release and device removal. See npu_main.c's opening
 * comment for the lifetime rules.
 */
#include <linux/delay.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>

#include "npu.h"

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
	if (!wait) {
		/*
		 * Flush the posted MMIO write: a read from the device cannot pass the writes before
		 * it (PCIe ordering), so the device has the command when this returns. QEMU's
		 * vfio-user client posts region writes too: without the read, an UNBIND issued from
		 * mm release could reach the device after exit_mmap() freed the tables.
		 */
		rd(npu, NPU_REG_CMD_STATUS);
		return 0;
	}
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
void npu_unbind(struct npu_ctx *ctx, bool abort, bool drain, const char *why)
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
			 ctx->pasid, why, npu_bug_names[npu_bug_mode]);
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

	if (npu_bug_mode == NPU_BUG_SKIP_INVALIDATE)
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

	switch (npu_bug_mode) {
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
/* Open and release: a file is one PASID binding of the opener's mm                            */
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

int npu_open(struct inode *inode, struct file *file)
{
	struct npu *npu = container_of(file->private_data, struct npu, cdev.misc);
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

int npu_release(struct inode *inode, struct file *file)
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

bool npu_ctx_bound(struct npu_ctx *ctx)
{
	unsigned long flags;
	bool bound;

	spin_lock_irqsave(&ctx->npu->mbox_lock, flags);
	bound = ctx->bound && !ctx->npu->gone;
	spin_unlock_irqrestore(&ctx->npu->mbox_lock, flags);
	return bound;
}
