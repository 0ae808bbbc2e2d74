// SPDX-License-Identifier: GPL-2.0-only
/*
 * pcisim_gpu.c - a driver for pcisim's GPU function in the kernel's vfio selftests' driver
 * library (tools/testing/selftests/vfio/lib/drivers/), so that vfio_pci_driver_test can drive
 * DMA and interrupts on it. Upstream's drivers need real dsa/ioat/igb/nv_falcon hardware; this
 * one runs wherever pcisim does.
 *
 * `pcisim lab kselftest vfio` (crates/lab/src/kselftest.rs, qemu-scripts/kselftest.sh) copies
 * this directory and guest-tests/kmod/pcisim_regs.h (the register contract, generated from
 * crates/abi) into lib/drivers/pcisim_gpu/ of Debian's unpacked linux-source and adds the file
 * to the library's driver list; nothing of the kernel source is kept in pcisim's repository.
 *
 * How the ops map onto the GPU (docs/programming-model.md):
 *   - memcpy: COPY commands on the GPU's command ring (in driver.region, mapped for the device),
 *     followed by a WRITE_FENCE without interrupt; memcpy_wait polls the fence (and RING_STATUS
 *     for an error, which it reports and clears with RING_CTRL.RESET).
 *   - send_msi: a write of the vector to IRQ_DOORBELL, checked with IRQ_LAST_ERROR.
 *   - interrupts: MSI-X if the function has it, else MSI; only vector 0 (driver.msi) is
 *     enabled, and the ring's ERROR_VECTOR is 1, so a failed memcpy raises no interrupt the
 *     test can see (the library requires memcpy to raise none): vector 1 stays pending.
 *
 * Also here, because every selftest binary links the whole library: PCISIM_VFIO_IOMMU_MODE, if
 * set, replaces the library's default IOMMU mode (iommufd), which vfio_pci_device_test and
 * vfio_pci_driver_test's probe use with no other way to choose it. A kernel without IOMMUFD
 * (Debian's 6.12) runs them with PCISIM_VFIO_IOMMU_MODE=vfio_type1v2_iommu.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <linux/errno.h>
#include <linux/io.h>

#include <libvfio.h>

#include "pcisim_regs.h"

/* Ring entries: a power of two; one slot stays free (HEAD == TAIL means empty) and one is
 * the fence, so a batch holds RING_ENTRIES - 2 copies. */
#define RING_ENTRIES 64u
/* How long memcpy_wait waits for the fence before calling the device hung. */
#define WAIT_TIMEOUT_S 120

/* Lives at the start of driver.region (page aligned, so the ring is 4 KiB aligned). */
struct pcisim_gpu_state {
	struct gpu_ring_cmd ring[RING_ENTRIES];
	/* The device's WRITE_FENCE target. */
	volatile u64 fence;
	/* Driver bookkeeping (the device never reads it). */
	u32 tail;
	u64 seq;
};

_Static_assert(offsetof(struct pcisim_gpu_state, ring) == 0, "ring first");

static inline struct pcisim_gpu_state *to_state(struct vfio_pci_device *device)
{
	return device->driver.region.vaddr;
}

static inline void *regs(struct vfio_pci_device *device)
{
	return device->bars[0].vaddr;
}

static int pcisim_gpu_probe(struct vfio_pci_device *device)
{
	u32 id, version;

	if (!vfio_pci_device_match(device, PCISIM_VENDOR_ID, PCISIM_GPU_DEVICE_ID))
		return -EINVAL;

	VFIO_ASSERT_NOT_NULL(device->bars[0].vaddr);
	id = readl(regs(device) + GPU_REG_ID);
	version = readl(regs(device) + GPU_REG_VERSION);
	if (id != GPU_ID_MAGIC || version < GPU_VERSION_1_1) {
		dev_err(device, "pcisim_gpu: ID 0x%x VERSION 0x%x: not a pcisim GPU with a command ring\n",
			id, version);
		return -EINVAL;
	}
	return 0;
}

static bool has_msix(struct vfio_pci_device *device)
{
	return device->msix_info.count > 0;
}

/* RESET | ENABLE: stop the engine (aborting anything in flight), clear HEAD, TAIL and the
 * error state, and restart at slot 0 with the latched base and size. */
static void ring_restart(struct vfio_pci_device *device)
{
	struct pcisim_gpu_state *s = to_state(device);

	writel(GPU_RING_CTRL_RESET | GPU_RING_CTRL_ENABLE, regs(device) + GPU_REG_RING_CTRL);
	s->tail = 0;
	VFIO_ASSERT_EQ(readl(regs(device) + GPU_REG_RING_STATUS), GPU_RING_STATUS_IDLE);
}

static void pcisim_gpu_init(struct vfio_pci_device *device)
{
	struct pcisim_gpu_state *s = to_state(device);
	iova_t ring_iova, misalign;

	VFIO_ASSERT_GE(device->driver.region.size, sizeof(*s));
	memset(s, 0, sizeof(*s));

	vfio_pci_config_writew(device, PCI_COMMAND,
			       PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER |
			       PCI_COMMAND_INTX_DISABLE);

	ring_iova = to_iova(device, s->ring);
	misalign = ring_iova & (GPU_RING_BASE_ALIGN - 1);
	VFIO_ASSERT_EQ(misalign, 0);
	writel(GPU_RING_CTRL_RESET, regs(device) + GPU_REG_RING_CTRL);
	writel((u32)ring_iova, regs(device) + GPU_REG_RING_BASE_LO);
	writel((u32)(ring_iova >> 32), regs(device) + GPU_REG_RING_BASE_HI);
	writel(RING_ENTRIES, regs(device) + GPU_REG_RING_SIZE);
	writel(0, regs(device) + GPU_REG_FENCE_VECTOR);
	writel(1, regs(device) + GPU_REG_ERROR_VECTOR);
	ring_restart(device);

	if (has_msix(device))
		vfio_pci_msix_enable(device, 0, 1);
	else
		vfio_pci_msi_enable(device, 0, 1);

	device->driver.msi = 0;
	device->driver.max_memcpy_size = GPU_RING_MAX_LEN;
	device->driver.max_memcpy_count = RING_ENTRIES - 2;
}

static void pcisim_gpu_remove(struct vfio_pci_device *device)
{
	/* RESET returns once the engine has stopped: no access after this. */
	writel(GPU_RING_CTRL_RESET, regs(device) + GPU_REG_RING_CTRL);
	if (has_msix(device))
		vfio_pci_msix_disable(device);
	else
		vfio_pci_msi_disable(device);
}

static void push(struct pcisim_gpu_state *s, const struct gpu_ring_cmd *cmd)
{
	s->ring[s->tail] = *cmd;
	s->tail = (s->tail + 1) % RING_ENTRIES;
}

static void pcisim_gpu_memcpy_start(struct vfio_pci_device *device,
				    iova_t src, iova_t dst, u64 size, u64 count)
{
	struct pcisim_gpu_state *s = to_state(device);
	u64 i;

	VFIO_ASSERT_LE(count, RING_ENTRIES - 2);
	for (i = 0; i < count; i++) {
		struct gpu_ring_cmd copy = {
			.opcode = GPU_OP_COPY, .a = src, .b = dst, .c = size,
		};
		push(s, &copy);
	}
	s->seq++;
	{
		struct gpu_ring_cmd fence = {
			.opcode = GPU_OP_WRITE_FENCE,
			.a = to_iova(device, (void *)&s->fence),
			.b = s->seq,
		};
		push(s, &fence);
	}
	/* The commands must be in memory before the doorbell. */
	__sync_synchronize();
	writel(s->tail, regs(device) + GPU_REG_RING_TAIL);
}

static int pcisim_gpu_memcpy_wait(struct vfio_pci_device *device)
{
	struct pcisim_gpu_state *s = to_state(device);
	time_t deadline = time(NULL) + WAIT_TIMEOUT_S;
	u32 status, error;

	for (;;) {
		if (s->fence == s->seq)
			return 0;
		status = readl(regs(device) + GPU_REG_RING_STATUS);
		if (status == GPU_RING_STATUS_ERROR)
			break;
		/* The fence is written before the device moves on: look again once the ring
		 * says idle, then it must be there. */
		if (status == GPU_RING_STATUS_IDLE) {
			__sync_synchronize();
			if (s->fence == s->seq)
				return 0;
			dev_err(device, "pcisim_gpu: ring idle but fence %llu != %llu\n",
				(unsigned long long)s->fence, (unsigned long long)s->seq);
			ring_restart(device);
			return -1;
		}
		if (time(NULL) > deadline) {
			dev_err(device, "pcisim_gpu: fence %llu not written in %d s (HEAD %u TAIL %u)\n",
				(unsigned long long)s->seq, WAIT_TIMEOUT_S,
				readl(regs(device) + GPU_REG_RING_HEAD),
				readl(regs(device) + GPU_REG_RING_TAIL));
			ring_restart(device);
			return -1;
		}
		usleep(100);
	}

	error = readl(regs(device) + GPU_REG_RING_ERROR);
	dev_err(device, "pcisim_gpu: ring stopped: error %u at slot %u, fault address 0x%x%08x\n",
		error & GPU_RING_ERROR_CODE, error >> GPU_RING_ERROR_SLOT,
		readl(regs(device) + GPU_REG_RING_FAULT_ADDR_HI),
		readl(regs(device) + GPU_REG_RING_FAULT_ADDR_LO));
	ring_restart(device);
	return -1;
}

static void pcisim_gpu_send_msi(struct vfio_pci_device *device)
{
	writel(device->driver.msi, regs(device) + GPU_REG_IRQ_DOORBELL);
	VFIO_ASSERT_EQ(readl(regs(device) + GPU_REG_IRQ_LAST_ERROR), GPU_IRQ_OK);
}

const struct vfio_pci_driver_ops pcisim_gpu_ops = {
	.name = "pcisim_gpu",
	.probe = pcisim_gpu_probe,
	.init = pcisim_gpu_init,
	.remove = pcisim_gpu_remove,
	.memcpy_start = pcisim_gpu_memcpy_start,
	.memcpy_wait = pcisim_gpu_memcpy_wait,
	.send_msi = pcisim_gpu_send_msi,
};

/* See the top of the file: the IOMMU mode of the tests that take the library's default. */
__attribute__((constructor)) static void pcisim_iommu_mode_from_env(void)
{
	const char *mode = getenv("PCISIM_VFIO_IOMMU_MODE");

	if (mode && *mode)
		default_iommu_mode = mode;
}
