// SPDX-License-Identifier: GPL-2.0
/*
 * npu_queue.c - pcisim_npu.ko's work: the submission, completion and fault queues, the
 * interrupt, translation faults serviced PRI-style, the INFO/SUBMIT/WAIT ioctls and the status
 * page mmap() maps (docs/npu.md, docs/sva.md).
 */
#include <linux/mm.h>
#include <linux/pagemap.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "npu.h"

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

irqreturn_t npu_irq(int irq, void *data)
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
/* Ioctls and mmap                                                                              */
/* ------------------------------------------------------------------------------------------ */

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

/*
 * Waits for the work (servicing faults), copies its outcome to user space and frees it, unless
 * the wait was interrupted (then the work stays for a later WAIT on its ticket).
 */
static long npu_finish_out(struct npu_ctx *ctx, struct npu_work *w, struct pcisim_npu_work *u,
			   struct pcisim_npu_work __user *uarg)
{
	int ret = npu_finish(ctx, w);

	npu_work_out(w, u);
	if (ret != -EINTR)
		npu_drop_work(ctx, w);
	if (copy_to_user(uarg, u, sizeof(*u)))
		return -EFAULT;
	return ret;
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
	return npu_finish_out(ctx, w, &u, uarg);
}

static long npu_ioctl_wait(struct npu_ctx *ctx, struct pcisim_npu_work __user *uarg)
{
	struct pcisim_npu_work u;
	struct npu_work *w;
	unsigned long flags;

	if (copy_from_user(&u, uarg, sizeof(u)))
		return -EFAULT;
	if (current->mm != ctx->mm)
		return -EPERM;
	spin_lock_irqsave(&ctx->npu->q_lock, flags);
	w = npu_find_work(ctx, u.ticket);
	spin_unlock_irqrestore(&ctx->npu->q_lock, flags);
	if (!w)
		return -ENOENT;
	return npu_finish_out(ctx, w, &u, uarg);
}

long npu_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
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
int npu_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct npu_ctx *ctx = file->private_data;

	if (vma->vm_pgoff || vma->vm_end - vma->vm_start != PAGE_SIZE)
		return -EINVAL;
	if (vma->vm_flags & VM_WRITE)
		return -EPERM;
	vm_flags_clear(vma, VM_MAYWRITE);
	return vm_insert_page(vma, vma->vm_start, virt_to_page(ctx->status));
}
