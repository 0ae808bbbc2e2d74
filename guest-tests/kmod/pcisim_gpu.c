// SPDX-License-Identifier: GPL-2.0
/*
 * pcisim_gpu.c - guest driver for pcisim's GPU function (vendor 0x1234, device 0x0b10): userptr
 * work on the command ring, fenced with dma_fences (seed 004; docs/userptr.md).
 *
 * The GPU has no PASID: it reaches memory through IOVAs the IOMMU translates, so a process's
 * pages must be DMA-mapped, and the driver must keep the mapping and the process's address
 * space in step. A file's userptr is kept valid one of two ways:
 *
 *  - tracked: an mmu_interval_notifier over the range. Before the pages change (munmap,
 *    MADV_DONTNEED, exit), the invalidate callback waits for the ring's last fence on the
 *    userptr (dma_fence_wait) when the range is blockable, and refuses (returns false) when it
 *    is not and the fence is pending; then it DMA-unmaps the pages and drops its page
 *    references. Submission takes the same lock and checks the notifier sequence
 *    (mmu_interval_read_begin / mmu_interval_read_retry), so no work starts on a stale mapping.
 *  - pinned (PCISIM_GPU_USERPTR_PIN): pin_user_pages_fast(FOLL_LONGTERM), no notifier: the pages
 *    stay pinned and mapped until RELEASE or close, whatever the process does with the range.
 *
 * Fences: each FILL ioctl queues FILL commands and a WRITE_FENCE with FENCE_IRQ; a dma_fence is
 * signalled from the completion interrupt's thread, inside dma_fence_begin_signalling() /
 * dma_fence_end_signalling(): nothing in there may allocate with GFP_KERNEL or take a lock
 * that is held while waiting for a fence (drivers/dma-buf/dma-fence.c, "fence signalling
 * critical section"; dma-resv.c primes lockdep with fs_reclaim -> mmu notifier -> fence wait).
 *
 * PCIe error recovery (docs/reset.md, R12): pci_error_handlers. error_detected marks the GPU as
 * recovering (new FILLs fail with -EIO) and asks for a reset; the AER core then resets the slot
 * (for a fatal error) and calls slot_reset, which restores config space (pci_restore_state: the
 * bus or slot reset the core performs does not), fails the fences of the work the reset
 * discarded with -EIO and programs the ring again; resume lets work in again. Each callback logs
 * one line and is recorded, in order, in the pcisim_recovery sysfs attribute.
 *
 * Buggy variants (module parameter `bug`, for testing the lab's oracle; never for real use):
 *   no_fence_wait        - the invalidate callback unmaps without waiting for the fence: the
 *                          ring goes on writing through an IOVA that is gone (dma_after_unmap)
 *   alloc_in_signalling  - the fence signalling section allocates with GFP_KERNEL (lockdep:
 *                          fs_reclaim inside dma_fence_map, a circular dependency)
 *
 * Kernel sources read (6.12): include/linux/mmu_notifier.h and mm/mmu_notifier.c (interval
 * notifiers, the invalidate contract, blockable ranges), drivers/dma-buf/dma-fence.c and
 * dma-resv.c (signalling annotations, the lockdep priming), mm/gup.c (pin_user_pages,
 * FOLL_LONGTERM), drivers/gpu/drm/nouveau/nouveau_svm.c and amdgpu_hmm.c (how real drivers
 * use interval notifiers), drivers/pci/pcie/err.c and Documentation/PCI/pci-error-recovery.rst
 * (the recovery sequence and what each callback may assume).
 */
#include <linux/dma-fence.h>
#include <linux/dma-mapping.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/interrupt.h>
#include <linux/ktime.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/scatterlist.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "pcisim_gpu_uapi.h"
#include "pcisim_regs.h"

#define DRV_NAME "pcisim_gpu"

#define RING_ENTRIES   4096
#define FENCE_VECTOR   0
#define ERROR_VECTOR   1
#define MAX_USERPTR    (64ull << 20)
#define MAX_RECOVERY_STEPS 16

enum gpu_bug {
	GPU_BUG_NONE,
	GPU_BUG_NO_FENCE_WAIT,
	GPU_BUG_ALLOC_IN_SIGNALLING,
};

static const char *const bug_names[] = {
	[GPU_BUG_NONE] = "none",
	[GPU_BUG_NO_FENCE_WAIT] = "no_fence_wait",
	[GPU_BUG_ALLOC_IN_SIGNALLING] = "alloc_in_signalling",
};

static char *bug = "none";
module_param(bug, charp, 0444);
MODULE_PARM_DESC(bug, "deliberate bug for testing the lab: none, no_fence_wait, alloc_in_signalling");
static enum gpu_bug the_bug;

static DEFINE_IDA(gpu_ids);

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
	int irqs[2];
	int id;
	char name[32];
	struct miscdevice misc;
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

static u32 rd(struct gpu *gpu, u32 off)
{
	return readl(gpu->regs + off);
}

static void wr(struct gpu *gpu, u32 off, u32 val)
{
	writel(val, gpu->regs + off);
}

static void gpu_ring_stop(struct gpu *gpu)
{
	wr(gpu, GPU_REG_RING_CTRL, GPU_RING_CTRL_RESET);
}

/* Programs an empty ring and starts it (probe; slot_reset, after the reset cleared it). */
static void gpu_ring_start(struct gpu *gpu)
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
 * The fence and error interrupts' thread: signals every pending fence the ring has passed (all
 * of them, with -EIO, if the ring stopped on an error). The whole path from the interrupt to
 * dma_fence_signal is a fence signalling critical section.
 */
static irqreturn_t gpu_irq_thread(int irq, void *data)
{
	struct gpu *gpu = data;
	struct gpu_fence *f, *next;
	unsigned long flags;
	bool cookie;
	bool stopped;
	u64 done;

	cookie = dma_fence_begin_signalling();
	if (the_bug == GPU_BUG_ALLOC_IN_SIGNALLING) {
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
		if (f->base.seqno > done)
			dma_fence_set_error(&f->base, -EIO);
		list_del(&f->node);
		dma_fence_signal_locked(&f->base);
		atomic64_inc(&gpu->fences_signaled);
		dma_fence_put(&f->base);
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

/* ---- userptr ----------------------------------------------------------------------------- */

/* Unmaps and lets go of the pages (up->lock held, or the userptr private to the caller). */
static void gpu_userptr_unmap(struct gpu_userptr *up)
{
	struct device *dev = &up->gpu->pdev->dev;

	if (!up->mapped)
		return;
	dma_unmap_sgtable(dev, &up->sgt, DMA_BIDIRECTIONAL, 0);
	sg_free_table(&up->sgt);
	if (up->pinned) {
		unpin_user_pages_dirty_lock(up->pages, up->npages, true);
		atomic64_sub(up->npages, &up->gpu->pinned_pages);
	} else {
		unsigned long i;

		for (i = 0; i < up->npages; i++) {
			set_page_dirty_lock(up->pages[i]);
			put_page(up->pages[i]);
		}
	}
	up->mapped = false;
}

static void gpu_note_wait(struct gpu *gpu, u64 ns)
{
	u64 max = atomic64_read(&gpu->max_wait_ns);

	atomic64_inc(&gpu->invalidate_waits);
	atomic64_set(&gpu->last_wait_ns, ns);
	while (ns > max) {
		u64 old = atomic64_cmpxchg(&gpu->max_wait_ns, max, ns);

		if (old == max)
			break;
		max = old;
	}
}

/*
 * The range is about to change: stop the device using it before the pages go. Blockable: wait
 * for the ring's fence, then unmap. Not blockable (the OOM reaper) with work pending: refuse.
 */
static bool gpu_userptr_invalidate(struct mmu_interval_notifier *mni,
				   const struct mmu_notifier_range *range, unsigned long cur_seq)
{
	struct gpu_userptr *up = container_of(mni, struct gpu_userptr, notifier);
	struct gpu *gpu = up->gpu;
	bool blockable = mmu_notifier_range_blockable(range);

	if (blockable)
		mutex_lock(&up->lock);
	else if (!mutex_trylock(&up->lock))
		return false;
	if (up->fence && !dma_fence_is_signaled(up->fence)) {
		if (!blockable) {
			atomic64_inc(&gpu->refused_nonblock);
			mutex_unlock(&up->lock);
			return false;
		}
		if (the_bug == GPU_BUG_NO_FENCE_WAIT) {
			dev_info(&gpu->pdev->dev, "invalidate: fence %llu pending, unmapping anyway (bug %s)\n",
				 up->fence->seqno, bug_names[the_bug]);
		} else {
			ktime_t t0 = ktime_get();

			dma_fence_wait(up->fence, false);
			gpu_note_wait(gpu, ktime_to_ns(ktime_sub(ktime_get(), t0)));
		}
	}
	mmu_interval_set_seq(mni, cur_seq);
	if (up->mapped)
		atomic64_inc(&gpu->invalidations);
	gpu_userptr_unmap(up);
	mutex_unlock(&up->lock);
	return true;
}

static const struct mmu_interval_notifier_ops gpu_userptr_ops = {
	.invalidate = gpu_userptr_invalidate,
};

/* Takes the pages and maps them (tracked: retried until no invalidation raced). */
static int gpu_userptr_map(struct gpu_userptr *up)
{
	struct device *dev = &up->gpu->pdev->dev;
	unsigned long seq = 0;
	int n, ret;

again:
	if (up->tracked)
		seq = mmu_interval_read_begin(&up->notifier);
	if (up->pinned)
		n = pin_user_pages_fast(up->addr, up->npages, FOLL_WRITE | FOLL_LONGTERM, up->pages);
	else
		n = get_user_pages_fast(up->addr, up->npages, FOLL_WRITE, up->pages);
	if (n != up->npages) {
		ret = n < 0 ? n : -EFAULT;
		if (n > 0) {
			if (up->pinned)
				unpin_user_pages(up->pages, n);
			else
				while (n--)
					put_page(up->pages[n]);
		}
		return ret;
	}
	ret = sg_alloc_table_from_pages(&up->sgt, up->pages, up->npages, 0, up->len, GFP_KERNEL);
	if (ret)
		goto err_pages;
	ret = dma_map_sgtable(dev, &up->sgt, DMA_BIDIRECTIONAL, 0);
	if (ret)
		goto err_sgt;
	mutex_lock(&up->lock);
	up->mapped = true;
	if (up->tracked && mmu_interval_read_retry(&up->notifier, seq)) {
		/* An invalidation ran meanwhile: these pages may be stale. */
		gpu_userptr_unmap(up);
		mutex_unlock(&up->lock);
		goto again;
	}
	up->seq = seq;
	if (up->pinned)
		atomic64_add(up->npages, &up->gpu->pinned_pages);
	mutex_unlock(&up->lock);
	return 0;

err_sgt:
	sg_free_table(&up->sgt);
err_pages:
	if (up->pinned) {
		unpin_user_pages(up->pages, up->npages);
	} else {
		unsigned long i;

		for (i = 0; i < up->npages; i++)
			put_page(up->pages[i]);
	}
	return ret;
}

/* Waits for the last work, removes the notifier, unmaps and frees. */
static void gpu_userptr_free(struct gpu_userptr *up)
{
	if (up->fence)
		dma_fence_wait(up->fence, false);
	if (up->tracked)
		mmu_interval_notifier_remove(&up->notifier);
	mutex_lock(&up->lock);
	gpu_userptr_unmap(up);
	mutex_unlock(&up->lock);
	dma_fence_put(up->fence);
	kvfree(up->pages);
	kfree(up);
}

static long gpu_ioctl_userptr(struct gpu_file *gf, struct pcisim_gpu_userptr __user *uarg)
{
	struct pcisim_gpu_userptr a;
	struct gpu_userptr *up;
	int ret;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (gf->up)
		return -EBUSY;
	if (a.flags & ~PCISIM_GPU_USERPTR_PIN || !a.len || a.len > MAX_USERPTR ||
	    !PAGE_ALIGNED(a.addr) || !PAGE_ALIGNED(a.len) || a.addr + a.len < a.addr)
		return -EINVAL;
	up = kzalloc(sizeof(*up), GFP_KERNEL);
	if (!up)
		return -ENOMEM;
	up->gpu = gf->gpu;
	mutex_init(&up->lock);
	up->addr = a.addr;
	up->len = a.len;
	up->npages = a.len >> PAGE_SHIFT;
	up->pinned = a.flags & PCISIM_GPU_USERPTR_PIN;
	up->pages = kvcalloc(up->npages, sizeof(*up->pages), GFP_KERNEL);
	if (!up->pages) {
		kfree(up);
		return -ENOMEM;
	}
	if (!up->pinned) {
		ret = mmu_interval_notifier_insert(&up->notifier, current->mm, a.addr, a.len,
						   &gpu_userptr_ops);
		if (ret)
			goto err;
		up->tracked = true;
	}
	ret = gpu_userptr_map(up);
	if (ret)
		goto err;
	a.nents = up->sgt.nents;
	a.iova = sg_dma_address(up->sgt.sgl);
	if (copy_to_user(uarg, &a, sizeof(a))) {
		ret = -EFAULT;
		goto err;
	}
	gf->up = up;
	dev_info(&gf->gpu->pdev->dev, "userptr %#llx+%#llx %s: %u segment(s) at iova %#llx\n",
		 a.addr, a.len, up->pinned ? "pinned" : "tracked", a.nents, a.iova);
	return 0;
err:
	gpu_userptr_free(up);
	return ret;
}

/* Free ring slots (one is always left empty). */
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

static long gpu_ioctl_fill(struct gpu_file *gf, struct pcisim_gpu_fill __user *uarg)
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

static long gpu_ioctl_wait(struct gpu_file *gf, struct pcisim_gpu_wait __user *uarg)
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

static long gpu_ioctl_stats(struct gpu *gpu, struct pcisim_gpu_stats __user *uarg)
{
	struct pcisim_gpu_stats s = {
		.invalidations = atomic64_read(&gpu->invalidations),
		.invalidate_waits = atomic64_read(&gpu->invalidate_waits),
		.last_wait_ns = atomic64_read(&gpu->last_wait_ns),
		.max_wait_ns = atomic64_read(&gpu->max_wait_ns),
		.refused_nonblock = atomic64_read(&gpu->refused_nonblock),
		.pinned_pages = atomic64_read(&gpu->pinned_pages),
		.fences_emitted = atomic64_read(&gpu->fences_emitted),
		.fences_signaled = atomic64_read(&gpu->fences_signaled),
	};

	return copy_to_user(uarg, &s, sizeof(s)) ? -EFAULT : 0;
}

static long gpu_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct gpu_file *gf = file->private_data;
	void __user *uarg = (void __user *)arg;
	long ret;

	mutex_lock(&gf->lock);
	switch (cmd) {
	case PCISIM_GPU_IOC_USERPTR:
		ret = gpu_ioctl_userptr(gf, uarg);
		break;
	case PCISIM_GPU_IOC_FILL:
		ret = gpu_ioctl_fill(gf, uarg);
		break;
	case PCISIM_GPU_IOC_WAIT:
		ret = gpu_ioctl_wait(gf, uarg);
		break;
	case PCISIM_GPU_IOC_STATS:
		ret = gpu_ioctl_stats(gf->gpu, uarg);
		break;
	case PCISIM_GPU_IOC_RELEASE:
		ret = gf->up ? 0 : -ENOENT;
		if (gf->up) {
			gpu_userptr_free(gf->up);
			gf->up = NULL;
		}
		break;
	default:
		ret = -ENOTTY;
	}
	mutex_unlock(&gf->lock);
	return ret;
}

static int gpu_open(struct inode *inode, struct file *file)
{
	struct miscdevice *misc = file->private_data;
	struct gpu_file *gf;

	gf = kzalloc(sizeof(*gf), GFP_KERNEL);
	if (!gf)
		return -ENOMEM;
	gf->gpu = container_of(misc, struct gpu, misc);
	mutex_init(&gf->lock);
	file->private_data = gf;
	return 0;
}

static int gpu_release(struct inode *inode, struct file *file)
{
	struct gpu_file *gf = file->private_data;

	if (gf->up)
		gpu_userptr_free(gf->up);
	kfree(gf);
	return 0;
}

static const struct file_operations gpu_fops = {
	.owner = THIS_MODULE,
	.open = gpu_open,
	.release = gpu_release,
	.unlocked_ioctl = gpu_ioctl,
	.llseek = noop_llseek,
};

/* ---- the PCI driver -------------------------------------------------------------------- */

static ssize_t pcisim_chardev_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct gpu *gpu = pci_get_drvdata(to_pci_dev(dev));

	return sysfs_emit(buf, "%s\n", gpu->name);
}
static DEVICE_ATTR_RO(pcisim_chardev);

static ssize_t pcisim_pinned_pages_show(struct device *dev, struct device_attribute *attr,
					char *buf)
{
	struct gpu *gpu = pci_get_drvdata(to_pci_dev(dev));

	return sysfs_emit(buf, "%lld\n", (long long)atomic64_read(&gpu->pinned_pages));
}
static DEVICE_ATTR_RO(pcisim_pinned_pages);

/* ---- PCIe error recovery ------------------------------------------------------------- */

enum gpu_recovery_step {
	GPU_STEP_ERROR_DETECTED,
	GPU_STEP_SLOT_RESET,
	GPU_STEP_RESUME,
	GPU_NR_STEPS,
};

static const char *const step_names[GPU_NR_STEPS] = {
	[GPU_STEP_ERROR_DETECTED] = "error_detected",
	[GPU_STEP_SLOT_RESET] = "slot_reset",
	[GPU_STEP_RESUME] = "resume",
};

/* Records a recovery callback (the first MAX_RECOVERY_STEPS since load; the rest counted). */
static void gpu_note_step(struct gpu *gpu, enum gpu_recovery_step step)
{
	spin_lock(&gpu->recovery_lock);
	if (gpu->nr_recovery_steps < MAX_RECOVERY_STEPS)
		gpu->recovery_steps[gpu->nr_recovery_steps] = step;
	gpu->nr_recovery_steps++;
	spin_unlock(&gpu->recovery_lock);
}

/*
 * `pcisim_recovery`: the error recovery callbacks since load, in order, then one count per
 * callback, e.g. "steps error_detected slot_reset resume\nerror_detected 1\n...".
 */
static ssize_t pcisim_recovery_show(struct device *dev, struct device_attribute *attr,
				    char *buf)
{
	struct gpu *gpu = pci_get_drvdata(to_pci_dev(dev));
	unsigned int counts[GPU_NR_STEPS] = { 0 };
	u8 steps[MAX_RECOVERY_STEPS];
	unsigned int i, n, shown;
	int len;

	spin_lock(&gpu->recovery_lock);
	n = gpu->nr_recovery_steps;
	shown = min_t(unsigned int, n, MAX_RECOVERY_STEPS);
	memcpy(steps, gpu->recovery_steps, shown);
	spin_unlock(&gpu->recovery_lock);
	len = sysfs_emit(buf, "steps");
	for (i = 0; i < shown; i++) {
		len += sysfs_emit_at(buf, len, " %s", step_names[steps[i]]);
		counts[steps[i]]++;
	}
	len += sysfs_emit_at(buf, len, "%s\n", n > shown ? " ..." : "");
	for (i = 0; i < GPU_NR_STEPS; i++)
		len += sysfs_emit_at(buf, len, "%s %u\n", step_names[i], counts[i]);
	len += sysfs_emit_at(buf, len, "total %u\n", n);
	return len;
}
static DEVICE_ATTR_RO(pcisim_recovery);

static const char *channel_name(pci_channel_state_t state)
{
	switch (state) {
	case pci_channel_io_normal:
		return "normal";
	case pci_channel_io_frozen:
		return "frozen";
	case pci_channel_io_perm_failure:
		return "perm_failure";
	}
	return "unknown";
}

/* Signals every pending fence with -EIO: the work it stood for will never complete. */
static void gpu_fail_pending(struct gpu *gpu)
{
	struct gpu_fence *f, *next;
	unsigned long flags;
	unsigned int n = 0;
	bool cookie;

	cookie = dma_fence_begin_signalling();
	spin_lock_irqsave(&gpu->fence_lock, flags);
	list_for_each_entry_safe(f, next, &gpu->pending, node) {
		dma_fence_set_error(&f->base, -EIO);
		list_del(&f->node);
		dma_fence_signal_locked(&f->base);
		atomic64_inc(&gpu->fences_signaled);
		dma_fence_put(&f->base);
		n++;
	}
	spin_unlock_irqrestore(&gpu->fence_lock, flags);
	dma_fence_end_signalling(cookie);
	if (n)
		dev_info(&gpu->pdev->dev, "recovery: %u pending fence(s) failed with -EIO\n", n);
}

/*
 * An uncorrectable error below our port. Frozen: the core will reset the slot, and MMIO may not
 * reach the device meanwhile, so touch nothing; normal: stop the ring ourselves. Either way no
 * new work until resume, and ask for a reset.
 */
static pci_ers_result_t gpu_error_detected(struct pci_dev *pdev, pci_channel_state_t state)
{
	struct gpu *gpu = pci_get_drvdata(pdev);

	gpu_note_step(gpu, GPU_STEP_ERROR_DETECTED);
	dev_info(&pdev->dev, "error_detected: channel %s\n", channel_name(state));
	if (state == pci_channel_io_perm_failure)
		return PCI_ERS_RESULT_DISCONNECT;
	mutex_lock(&gpu->ring_lock);
	gpu->recovering = true;
	if (state == pci_channel_io_normal)
		gpu_ring_stop(gpu);
	mutex_unlock(&gpu->ring_lock);
	return PCI_ERS_RESULT_NEED_RESET;
}

/*
 * After the slot reset (fatal errors; for non-fatal ones 6.12's core calls this without
 * resetting anything): config space back from the copy probe saved (the core's bus/slot reset
 * does not restore it: pci_bus_error_reset()), the device answering as our GPU again, the
 * ring stopped and empty, the fences of the lost work failed, the ring programmed again.
 */
static pci_ers_result_t gpu_slot_reset(struct pci_dev *pdev)
{
	struct gpu *gpu = pci_get_drvdata(pdev);
	u32 id;

	gpu_note_step(gpu, GPU_STEP_SLOT_RESET);
	pci_restore_state(pdev);
	pci_save_state(pdev); /* pci_restore_state() used up the saved copy */
	id = rd(gpu, GPU_REG_ID);
	if (id != GPU_ID_MAGIC) {
		dev_err(&pdev->dev, "slot_reset: ID register %#x is not the GPU's %#x\n", id,
			GPU_ID_MAGIC);
		return PCI_ERS_RESULT_DISCONNECT;
	}
	/* No FILL can queue work meanwhile (recovering); the fences are failed outside ring_lock,
	 * which must never be held inside a fence signalling section. */
	mutex_lock(&gpu->ring_lock);
	gpu_ring_stop(gpu);
	mutex_unlock(&gpu->ring_lock);
	gpu_fail_pending(gpu);
	mutex_lock(&gpu->ring_lock);
	gpu_ring_start(gpu);
	mutex_unlock(&gpu->ring_lock);
	dev_info(&pdev->dev, "slot_reset: config space restored, ring restarted\n");
	return PCI_ERS_RESULT_RECOVERED;
}

static void gpu_resume(struct pci_dev *pdev)
{
	struct gpu *gpu = pci_get_drvdata(pdev);

	gpu_note_step(gpu, GPU_STEP_RESUME);
	mutex_lock(&gpu->ring_lock);
	gpu->recovering = false;
	mutex_unlock(&gpu->ring_lock);
	dev_info(&pdev->dev, "resume: accepting work again\n");
}

static const struct pci_error_handlers gpu_err_handler = {
	.error_detected = gpu_error_detected,
	.slot_reset = gpu_slot_reset,
	.resume = gpu_resume,
};

static struct attribute *gpu_attrs[] = {
	&dev_attr_pcisim_chardev.attr,
	&dev_attr_pcisim_pinned_pages.attr,
	&dev_attr_pcisim_recovery.attr,
	NULL,
};
ATTRIBUTE_GROUPS(gpu);

static int gpu_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct device *dev = &pdev->dev;
	struct gpu *gpu;
	int ret, i;

	gpu = devm_kzalloc(dev, sizeof(*gpu), GFP_KERNEL);
	if (!gpu)
		return -ENOMEM;
	gpu->pdev = pdev;
	mutex_init(&gpu->ring_lock);
	spin_lock_init(&gpu->fence_lock);
	spin_lock_init(&gpu->recovery_lock);
	INIT_LIST_HEAD(&gpu->pending);
	gpu->fence_context = dma_fence_context_alloc(1);

	ret = pcim_enable_device(pdev);
	if (ret)
		return ret;
	ret = pcim_iomap_regions(pdev, BIT(0), DRV_NAME);
	if (ret)
		return ret;
	gpu->regs = pcim_iomap_table(pdev)[0];
	if (rd(gpu, GPU_REG_ID) != GPU_ID_MAGIC) {
		dev_err(dev, "ID register %#x is not the GPU's %#x\n", rd(gpu, GPU_REG_ID),
			GPU_ID_MAGIC);
		return -ENODEV;
	}
	ret = dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64));
	if (ret)
		return ret;
	/*
	 * One FILL/COPY command moves up to GPU_RING_MAX_LEN bytes, so a DMA segment may be that
	 * long; without this the DMA layer assumes 64 KiB (dma_get_max_seg_size) and a 2 MiB
	 * huge-page segment of a userptr breaks that promise (CONFIG_DMA_API_DEBUG reports
	 * "mapping sg segment longer than device claims to support" on the debug kernel).
	 */
	dma_set_max_seg_size(dev, GPU_RING_MAX_LEN); /* void since 6.12; PCI devices have dma_parms */
	gpu->ring = dmam_alloc_coherent(dev, RING_ENTRIES * sizeof(*gpu->ring), &gpu->ring_dma,
					GFP_KERNEL);
	gpu->fence_cpu = dmam_alloc_coherent(dev, PAGE_SIZE, &gpu->fence_dma, GFP_KERNEL);
	if (!gpu->ring || !gpu->fence_cpu)
		return -ENOMEM;
	pci_set_master(pdev);

	ret = pci_alloc_irq_vectors(pdev, 2, 2, PCI_IRQ_MSIX);
	if (ret < 0)
		return ret;
	for (i = 0; i < 2; i++) {
		gpu->irqs[i] = pci_irq_vector(pdev, i);
		ret = request_threaded_irq(gpu->irqs[i], NULL, gpu_irq_thread, IRQF_ONESHOT,
					   DRV_NAME, gpu);
		if (ret) {
			while (i--)
				free_irq(gpu->irqs[i], gpu);
			goto err_vectors;
		}
	}

	gpu_ring_start(gpu);

	gpu->id = ida_alloc(&gpu_ids, GFP_KERNEL);
	if (gpu->id < 0) {
		ret = gpu->id;
		goto err_irqs;
	}
	snprintf(gpu->name, sizeof(gpu->name), "pcisim-gpu%d", gpu->id);
	gpu->misc.minor = MISC_DYNAMIC_MINOR;
	gpu->misc.name = gpu->name;
	gpu->misc.fops = &gpu_fops;
	gpu->misc.parent = dev;
	pci_set_drvdata(pdev, gpu);
	ret = misc_register(&gpu->misc);
	if (ret)
		goto err_id;
	pci_save_state(pdev); /* what slot_reset restores after an error recovery's reset */
	dev_info(dev, "%s: ring of %u entries at iova %#llx, bug %s\n", gpu->name, RING_ENTRIES,
		 (u64)gpu->ring_dma, bug_names[the_bug]);
	return 0;

err_id:
	ida_free(&gpu_ids, gpu->id);
err_irqs:
	gpu_ring_stop(gpu);
	for (i = 0; i < 2; i++)
		free_irq(gpu->irqs[i], gpu);
err_vectors:
	pci_free_irq_vectors(pdev);
	return ret;
}

/* Open files hold the module, so every file is closed (every userptr freed) before remove. */
static void gpu_remove(struct pci_dev *pdev)
{
	struct gpu *gpu = pci_get_drvdata(pdev);
	int i;

	misc_deregister(&gpu->misc);
	gpu_ring_stop(gpu);
	for (i = 0; i < 2; i++)
		free_irq(gpu->irqs[i], gpu);
	pci_free_irq_vectors(pdev);
	ida_free(&gpu_ids, gpu->id);
	dev_info(&pdev->dev, "%s removed\n", gpu->name);
}

static const struct pci_device_id gpu_ids_table[] = {
	{ PCI_DEVICE(PCISIM_VENDOR_ID, PCISIM_GPU_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, gpu_ids_table);

static struct pci_driver gpu_driver = {
	.name = DRV_NAME,
	.id_table = gpu_ids_table,
	.probe = gpu_probe,
	.remove = gpu_remove,
	.err_handler = &gpu_err_handler,
	.dev_groups = gpu_groups,
};

static int __init gpu_init(void)
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
	if (the_bug != GPU_BUG_NONE)
		pr_warn(DRV_NAME ": loaded with deliberate bug %s\n", bug_names[the_bug]);
	return pci_register_driver(&gpu_driver);
}

static void __exit gpu_exit(void)
{
	pci_unregister_driver(&gpu_driver);
	ida_destroy(&gpu_ids);
}

module_init(gpu_init);
module_exit(gpu_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("pcisim GPU: userptr ring work with dma_fences and mmu interval notifiers");
