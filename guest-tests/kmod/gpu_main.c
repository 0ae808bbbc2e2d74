// SPDX-License-Identifier: GPL-2.0
/*
 * pcisim_gpu.ko - guest driver for pcisim's GPU function (vendor 0x1234, device 0x0b10): userptr
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
 * The module's parts: gpu_main.c (this file: probe, remove, the file and its ioctls, the
 * module), gpu_ring.c (the ring, fences, the interrupt thread), gpu_userptr.c (userptrs) and
 * gpu_recovery.c (PCIe error recovery); gpu.h is what they share, pcisim_kmod_common.h the
 * boilerplate shared with pcisim_npu.ko.
 *
 * Kernel sources read (6.12): include/linux/mmu_notifier.h and mm/mmu_notifier.c (interval
 * notifiers, the invalidate contract, blockable ranges), drivers/dma-buf/dma-fence.c and
 * dma-resv.c (signalling annotations, the lockdep priming), mm/gup.c (pin_user_pages,
 * FOLL_LONGTERM), drivers/gpu/drm/nouveau/nouveau_svm.c and amdgpu_hmm.c (how real drivers
 * use interval notifiers), drivers/pci/pcie/err.c and Documentation/PCI/pci-error-recovery.rst
 * (the recovery sequence and what each callback may assume).
 */
#include <linux/device.h>
#include <linux/dma-fence.h>
#include <linux/dma-mapping.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "gpu.h"

const char *const gpu_bug_names[GPU_NR_BUGS] = {
	[GPU_BUG_NONE] = "none",
	[GPU_BUG_NO_FENCE_WAIT] = "no_fence_wait",
	[GPU_BUG_ALLOC_IN_SIGNALLING] = "alloc_in_signalling",
};

PCISIM_BUG_PARAM("deliberate bug for testing the lab: none, no_fence_wait, alloc_in_signalling");
int gpu_bug_mode;

static DEFINE_IDA(gpu_ids);

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
	gf->gpu = container_of(misc, struct gpu, cdev.misc);
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

PCISIM_CHARDEV_ATTR(struct gpu, cdev);

static ssize_t pcisim_pinned_pages_show(struct device *dev, struct device_attribute *attr,
					char *buf)
{
	struct gpu *gpu = pci_get_drvdata(to_pci_dev(dev));

	return sysfs_emit(buf, "%lld\n", (long long)atomic64_read(&gpu->pinned_pages));
}
static DEVICE_ATTR_RO(pcisim_pinned_pages);

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
	int ret;

	gpu = devm_kzalloc(dev, sizeof(*gpu), GFP_KERNEL);
	if (!gpu)
		return -ENOMEM;
	gpu->pdev = pdev;
	mutex_init(&gpu->ring_lock);
	spin_lock_init(&gpu->fence_lock);
	spin_lock_init(&gpu->recovery_lock);
	INIT_LIST_HEAD(&gpu->pending);
	gpu->fence_context = dma_fence_context_alloc(1);

	ret = pcisim_map_bar0(pdev, DRV_NAME, &gpu->regs);
	if (ret)
		return ret;
	ret = pcisim_check_id(pdev, gpu->regs, GPU_REG_ID, GPU_ID_MAGIC, "GPU", "");
	if (ret)
		return ret;
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

	ret = pcisim_request_irqs(pdev, gpu->irqs, GPU_NR_VECTORS, PCI_IRQ_MSIX, NULL, gpu_irq_thread,
				  IRQF_ONESHOT, DRV_NAME, gpu);
	if (ret)
		return ret;

	gpu_ring_start(gpu);

	pci_set_drvdata(pdev, gpu);
	ret = pcisim_chardev_register(&gpu->cdev, &gpu_ids, "pcisim-gpu", &gpu_fops, dev);
	if (ret) {
		gpu_ring_stop(gpu);
		pcisim_free_irqs(pdev, gpu->irqs, GPU_NR_VECTORS, gpu);
		return ret;
	}
	pci_save_state(pdev); /* what slot_reset restores after an error recovery's reset */
	dev_info(dev, "%s: ring of %u entries at iova %#llx, bug %s\n", gpu->cdev.name,
		 RING_ENTRIES, (u64)gpu->ring_dma, gpu_bug_names[gpu_bug_mode]);
	return 0;
}

/* Open files hold the module, so every file is closed (every userptr freed) before remove. */
static void gpu_remove(struct pci_dev *pdev)
{
	struct gpu *gpu = pci_get_drvdata(pdev);

	pcisim_chardev_unregister(&gpu->cdev, &gpu_ids);
	gpu_ring_stop(gpu);
	pcisim_free_irqs(pdev, gpu->irqs, GPU_NR_VECTORS, gpu);
	dev_info(&pdev->dev, "%s removed\n", gpu->cdev.name);
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

/* Init picks the `bug` variant and registers the driver; exit unregisters it. */
module_driver(gpu_driver, pcisim_module_init, pcisim_module_exit, bug, gpu_bug_names, GPU_NR_BUGS,
	      &gpu_bug_mode, &gpu_ids);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("pcisim GPU: userptr ring work with dma_fences and mmu interval notifiers");
