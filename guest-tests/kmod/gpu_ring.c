// SPDX-License-Identifier: GPL-2.0
/*
 * gpu_ring.c - pcisim_gpu.ko's command ring and its dma_fences: programming the ring, queueing
 * FILL work with a WRITE_FENCE (the FILL ioctl), the interrupt thread that signals the fences
 * (a fence signalling critical section), waiting on them (the WAIT ioctl) and failing them after
 * a reset lost their work. See gpu_main.c's opening comment for the design.
 */
#include <linux/dma-fence.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "gpu.h"

/* Programs an empty ring and starts it (probe; slot_reset, after the reset cleared it). */
void gpu_ring_start(struct gpu *gpu)
{
	gpu_ring_stop(gpu);
	wr(gpu, GPU_REG_RING_BASE_LO, lower_32_bits(gpu->ring_dma));
	wr(gpu, GPU_REG_RING_BASE_HI, upper_32_bits(gpu->ring_dma));
	wr(gpu, GPU_REG_RING_SIZE, RING_ENTRIES);
	wr(gpu, GPU_REG_FENCE_VECTOR, FENCE_VECTOR);
	wr(gpu, GPU_REG_ERROR_VECTOR, ERROR_VECTOR);
	wr(gpu, GPU_REG_RING_CTRL, GPU_RING_CTRL_ENABLE);
	gpu->tail = 0;
}

/* ---- fences ---------------------------------------------------------------------------- */

static const char *gpu_fence_driver_name(struct dma_fence *f)
{
	return DRV_NAME;
}

static const char *gpu_fence_timeline_name(struct dma_fence *f)
{
	return "ring";
}

static const struct dma_fence_ops gpu_fence_ops = {
	.get_driver_name = gpu_fence_driver_name,
	.get_timeline_name = gpu_fence_timeline_name,
};

/*
 * Signals a pending fence, failed with @error if that is not 0, and drops the pending list's
 * reference. fence_lock held, inside a fence signalling critical section.
 */
static void gpu_fence_retire(struct gpu *gpu, struct gpu_fence *f, int error)
{
	if (error)
		dma_fence_set_error(&f->base, error);
	list_del(&f->node);
	dma_fence_signal_locked(&f->base);
	atomic64_inc(&gpu->fences_signaled);
	dma_fence_put(&f->base);
}

/*
 * The fence and error interrupts' thread: signals every pending fence the ring has passed (all
 * of them, with -EIO, if the ring stopped on an error). The whole path from the interrupt to
 * dma_fence_signal is a fence signalling critical section.
 */
irqreturn_t gpu_irq_thread(int irq, void *data)
{
	struct gpu *gpu = data;
	struct gpu_fence *f, *next;
	unsigned long flags;
	bool cookie;
	bool stopped;
	u64 done;

	cookie = dma_fence_begin_signalling();
	if (gpu_bug_mode == GPU_BUG_ALLOC_IN_SIGNALLING) {
		/* Wrong: reclaim may wait for this very fence (an mmu notifier's fence wait). */
		void *p = kmalloc(4096, GFP_KERNEL);

		kfree(p);
	}
	stopped = rd(gpu, GPU_REG_RING_STATUS) == GPU_RING_STATUS_ERROR;
	done = READ_ONCE(*gpu->fence_cpu);
	spin_lock_irqsave(&gpu->fence_lock, flags);
	list_for_each_entry_safe(f, next, &gpu->pending, node) {
		if (f->base.seqno > done && !stopped)
			break;
		gpu_fence_retire(gpu, f, f->base.seqno > done ? -EIO : 0);
	}
	spin_unlock_irqrestore(&gpu->fence_lock, flags);
	dma_fence_end_signalling(cookie);
	if (stopped)
		dev_warn_ratelimited(&gpu->pdev->dev, "ring stopped: error %#x at %#llx\n",
				     rd(gpu, GPU_REG_RING_ERROR),
				     (u64)rd(gpu, GPU_REG_RING_FAULT_ADDR_LO) |
				     (u64)rd(gpu, GPU_REG_RING_FAULT_ADDR_HI) << 32);
	return IRQ_HANDLED;
}

static u32 gpu_ring_space(struct gpu *gpu)
{
	u32 head = rd(gpu, GPU_REG_RING_HEAD);

	return (head - gpu->tail - 1) & (RING_ENTRIES - 1);
}

static void gpu_ring_put(struct gpu *gpu, u8 op, u8 flags, u64 a, u64 b, u64 c)
{
	struct gpu_ring_cmd *cmd = &gpu->ring[gpu->tail];

	memset(cmd, 0, sizeof(*cmd));
	cmd->opcode = op;
	cmd->flags = flags;
	cmd->a = cpu_to_le64(a);
	cmd->b = cpu_to_le64(b);
	cmd->c = cpu_to_le64(c);
	gpu->tail = (gpu->tail + 1) & (RING_ENTRIES - 1);
}

long gpu_ioctl_fill(struct gpu_file *gf, struct pcisim_gpu_fill __user *uarg)
{
	struct gpu *gpu = gf->gpu;
	struct gpu_userptr *up = gf->up;
	struct pcisim_gpu_fill a;
	struct gpu_fence *f;
	struct scatterlist *sg;
	unsigned long flags;
	u32 need, r;
	int i, ret = 0;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (!up)
		return -ENOENT;
	if (!a.repeat)
		return -EINVAL;
	f = kzalloc(sizeof(*f), GFP_KERNEL); /* before the fence is visible to anyone */
	if (!f)
		return -ENOMEM;
	mutex_lock(&up->lock);
	if (!up->mapped || (up->tracked && mmu_interval_check_retry(&up->notifier, up->seq))) {
		ret = -EAGAIN; /* invalidated: the range is gone or changed */
		goto out_up;
	}
	mutex_lock(&gpu->ring_lock);
	if (gpu->recovering) {
		ret = -EIO; /* between error_detected and resume: the ring is not ours */
		goto out_ring;
	}
	need = a.repeat * up->sgt.nents + 1;
	if ((u64)a.repeat * up->sgt.nents + 1 > RING_ENTRIES - 1 || gpu_ring_space(gpu) < need) {
		ret = -EBUSY;
		goto out_ring;
	}
	for (r = 0; r < a.repeat; r++)
		for_each_sgtable_dma_sg(&up->sgt, sg, i)
			gpu_ring_put(gpu, GPU_OP_FILL, 0, sg_dma_address(sg), a.pattern,
				     sg_dma_len(sg));
	dma_fence_init(&f->base, &gpu_fence_ops, &gpu->fence_lock, gpu->fence_context,
		       ++gpu->seqno);
	gpu_ring_put(gpu, GPU_OP_WRITE_FENCE, GPU_FLAG_FENCE_IRQ, gpu->fence_dma, gpu->seqno, 0);
	spin_lock_irqsave(&gpu->fence_lock, flags);
	list_add_tail(&f->node, &gpu->pending);
	dma_fence_get(&f->base); /* the pending list's reference */
	spin_unlock_irqrestore(&gpu->fence_lock, flags);
	atomic64_inc(&gpu->fences_emitted);
	dma_fence_put(up->fence);
	up->fence = &f->base;   /* the file's reference */
	f = NULL;
	a.seqno = gpu->seqno;
	wmb(); /* the commands before the tail */
	wr(gpu, GPU_REG_RING_TAIL, gpu->tail);
out_ring:
	mutex_unlock(&gpu->ring_lock);
out_up:
	mutex_unlock(&up->lock);
	kfree(f);
	if (!ret && copy_to_user(uarg, &a, sizeof(a)))
		ret = -EFAULT;
	return ret;
}

long gpu_ioctl_wait(struct gpu_file *gf, struct pcisim_gpu_wait __user *uarg)
{
	struct pcisim_gpu_wait a;
	struct dma_fence *f = NULL;
	long left;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (gf->up) {
		mutex_lock(&gf->up->lock);
		f = dma_fence_get(gf->up->fence);
		mutex_unlock(&gf->up->lock);
	}
	if (!f)
		return -ENOENT;
	left = dma_fence_wait_timeout(f, true, msecs_to_jiffies(a.timeout_ms));
	if (left < 0) {
		dma_fence_put(f);
		return left;
	}
	a.signaled = dma_fence_is_signaled(f);
	a.error = a.signaled ? dma_fence_get_status(f) : 0;
	if (a.error > 0)
		a.error = 0;
	dma_fence_put(f);
	return copy_to_user(uarg, &a, sizeof(a)) ? -EFAULT : 0;
}

/* Signals every pending fence with -EIO: the work it stood for will never complete. */
void gpu_fail_pending(struct gpu *gpu)
{
	struct gpu_fence *f, *next;
	unsigned long flags;
	unsigned int n = 0;
	bool cookie;

	cookie = dma_fence_begin_signalling();
	spin_lock_irqsave(&gpu->fence_lock, flags);
	list_for_each_entry_safe(f, next, &gpu->pending, node) {
		gpu_fence_retire(gpu, f, -EIO);
		n++;
	}
	spin_unlock_irqrestore(&gpu->fence_lock, flags);
	dma_fence_end_signalling(cookie);
	if (n)
		dev_info(&gpu->pdev->dev, "recovery: %u pending fence(s) failed with -EIO\n", n);
}
