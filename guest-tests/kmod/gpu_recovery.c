// SPDX-License-Identifier: GPL-2.0
/*
 * gpu_recovery.c - pcisim_gpu.ko's PCIe error recovery (docs/reset.md, R12): the
 * pci_error_handlers and the `pcisim_recovery` attribute that records their calls in order.
 */
#include <linux/pci.h>
#include <linux/spinlock.h>
#include <linux/sysfs.h>

#include "gpu.h"

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
DEVICE_ATTR_RO(pcisim_recovery);

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

	gpu_note_step(gpu, GPU_STEP_SLOT_RESET);
	pci_restore_state(pdev);
	pci_save_state(pdev); /* pci_restore_state() used up the saved copy */
	if (pcisim_check_id(pdev, gpu->regs, GPU_REG_ID, GPU_ID_MAGIC, "GPU", "slot_reset: "))
		return PCI_ERS_RESULT_DISCONNECT;
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

const struct pci_error_handlers gpu_err_handler = {
	.error_detected = gpu_error_detected,
	.slot_reset = gpu_slot_reset,
	.resume = gpu_resume,
};
