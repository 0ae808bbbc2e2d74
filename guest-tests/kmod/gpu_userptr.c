// SPDX-License-Identifier: GPL-2.0
/*
 * gpu_userptr.c - pcisim_gpu.ko's userptrs (the USERPTR ioctl): a process range taken with
 * get_user_pages_fast() and kept in step with the process by an mmu_interval_notifier
 * (tracked), or pinned with FOLL_LONGTERM (PCISIM_GPU_USERPTR_PIN); DMA-mapped either way. See
 * gpu_main.c's opening comment for the invalidation contract.
 */
#include <linux/dma-mapping.h>
#include <linux/ktime.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "gpu.h"

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
		if (gpu_bug_mode == GPU_BUG_NO_FENCE_WAIT) {
			dev_info(&gpu->pdev->dev, "invalidate: fence %llu pending, unmapping anyway (bug %s)\n",
				 up->fence->seqno, gpu_bug_names[gpu_bug_mode]);
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
void gpu_userptr_free(struct gpu_userptr *up)
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

long gpu_ioctl_userptr(struct gpu_file *gf, struct pcisim_gpu_userptr __user *uarg)
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

