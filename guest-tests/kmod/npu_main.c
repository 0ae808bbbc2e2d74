// SPDX-License-Identifier: GPL-2.0
/*
 * pcisim_npu.ko - guest driver for pcisim's NPU function (vendor 0x1234, device 0x0b20).
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
 * The module's parts: npu_main.c (this file: probe, remove, sysfs, the module), npu_sva.c (the
 * mailbox, PASID bind/unbind, the mmu notifier, open and release), npu_queue.c (the queues, the
 * interrupt, the ioctls, mmap) and npu_peer.c (the GPU peer); npu.h is what they share,
 * pcisim_kmod_common.h the boilerplate shared with pcisim_gpu.ko.
 *
 * Kernel sources read: include/linux/mmu_notifier.h and mm/mmu_notifier.c (release,
 * arch_invalidate_secondary_tlbs, register/unregister semantics), arch/x86/mm/tlb.c (where the
 * secondary-TLB callback runs), drivers/iommu/intel/svm.c and drivers/iommu/iommu-sva.c (what
 * SVA does in the same callbacks), drivers/misc/uacce (fd vs mm lifetime).
 */
#include <linux/device.h>
#include <linux/dma-mapping.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/iommu.h>
#include <linux/kref.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/slab.h>

#include "npu.h"

const char *const npu_bug_names[NPU_NR_BUGS] = {
	[NPU_BUG_NONE] = "none",
	[NPU_BUG_SKIP_INVALIDATE] = "skip_invalidate",
	[NPU_BUG_NO_MM_RELEASE] = "no_mm_release",
	[NPU_BUG_ACK_WITHOUT_DRAIN] = "ack_without_drain",
	[NPU_BUG_LEAK_PEER_REF] = "leak_peer_ref",
	[NPU_BUG_RESET_IN_PROBE] = "reset_in_probe",
};

PCISIM_BUG_PARAM("deliberate bug for testing the lab: none, skip_invalidate, no_mm_release, ack_without_drain, leak_peer_ref, reset_in_probe");
int npu_bug_mode;

static DEFINE_IDA(npu_ids);

void npu_free(struct kref *ref)
{
	struct npu *npu = container_of(ref, struct npu, ref);

	ida_destroy(&npu->pasids);
	pci_dev_put(npu->pdev);
	kfree(npu);
}

static const struct file_operations npu_fops = {
	.owner = THIS_MODULE,
	.open = npu_open,
	.release = npu_release,
	.unlocked_ioctl = npu_ioctl,
	.mmap = npu_mmap,
};

/* ------------------------------------------------------------------------------------------ */
/* Sysfs                                                                                        */
/* ------------------------------------------------------------------------------------------ */

static ssize_t pcisim_contexts_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct npu *npu = pci_get_drvdata(to_pci_dev(dev));

	return npu ? sysfs_emit(buf, "%u\n", READ_ONCE(npu->nctx)) : -ENODEV;
}
static DEVICE_ATTR_RO(pcisim_contexts);

PCISIM_CHARDEV_ATTR(struct npu, cdev);

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

	if (npu_bug_mode == NPU_BUG_RESET_IN_PROBE) {
		dev_info(&pdev->dev, "probe: pci_reset_function() under the device lock (bug %s)\n",
			 npu_bug_names[npu_bug_mode]);
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
	npu->cdev.id = -1;

	ret = pcisim_map_bar0(pdev, DRV_NAME, &npu->regs);
	if (ret)
		goto err;
	ret = npu_probe_reset(pdev);
	if (ret)
		goto err;
	ret = pcisim_check_id(pdev, npu->regs, NPU_REG_ID, NPU_ID_MAGIC, "NPU", "");
	if (ret)
		goto err;
	ret = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(64));
	if (ret)
		goto err;
	pci_set_master(pdev);
	npu->sva = npu_dma_is_physical(pdev);

	ret = npu_start_engine(npu);
	if (ret)
		goto err;
	ret = pcisim_request_irqs(pdev, &npu->irq, 1, PCI_IRQ_MSIX | PCI_IRQ_MSI | PCI_IRQ_INTX,
				  npu_irq, NULL, IRQF_SHARED, DRV_NAME, npu);
	if (ret)
		goto err_engine;

	pci_set_drvdata(pdev, npu);
	ret = pcisim_chardev_register(&npu->cdev, &npu_ids, "pcisim-npu", &npu_fops, &pdev->dev);
	if (ret)
		goto err_irq;

	npu_find_peer(npu);
	npu->bus_nb.notifier_call = npu_bus_notify;
	if (npu->has_peer)
		bus_register_notifier(&pci_bus_type, &npu->bus_nb);

	dev_info(&pdev->dev, "%s: %u contexts, sva %s, bug %s\n", npu->cdev.name,
		 rd(npu, NPU_REG_MAX_CONTEXTS), npu->sva ? "yes" : "no (IOMMU translates DMA)",
		 npu_bug_names[npu_bug_mode]);
	return 0;

err_irq:
	pci_set_drvdata(pdev, NULL);
	pcisim_free_irqs(pdev, &npu->irq, 1, npu);
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
	pcisim_chardev_unregister(&npu->cdev, &npu_ids);

	/* Open files outlive the device: unbind them now, then cut register access. */
	mutex_lock(&npu->ctx_lock);
	list_for_each_entry(ctx, &npu->ctxs, node)
		npu_unbind(ctx, true, true, "device removal");
	mutex_unlock(&npu->ctx_lock);
	wr(npu, NPU_REG_CONTROL, 0);
	pcisim_free_irqs(pdev, &npu->irq, 1, npu);

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
	dev_info(&pdev->dev, "%s removed\n", npu->cdev.name);
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

/* Init picks the `bug` variant and registers the driver; exit unregisters it. */
module_driver(npu_driver, pcisim_module_init, pcisim_module_exit, bug, npu_bug_names, NPU_NR_BUGS,
	      &npu_bug_mode, &npu_ids);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("pcisim NPU: PASID-bound work on process address spaces (SVA-style)");
