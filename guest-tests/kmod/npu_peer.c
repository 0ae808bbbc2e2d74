// SPDX-License-Identifier: GPL-2.0
/*
 * npu_peer.c - pcisim_npu.ko's GPU peer (H6; docs/npu.md): the peer the vendor capability
 * names, a counted reference on its pci_dev while it exists (dropped when a bus notifier sees it
 * go, unless bug=leak_peer_ref), and the `pcisim_peer` attribute.
 */
#include <linux/device.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/string.h>
#include <linux/sysfs.h>

#include "npu.h"

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

int npu_bus_notify(struct notifier_block *nb, unsigned long action, void *data)
{
	struct npu *npu = container_of(nb, struct npu, bus_nb);
	struct pci_dev *pdev = to_pci_dev(data);

	mutex_lock(&npu->peer_lock);
	if (action == BUS_NOTIFY_ADD_DEVICE && npu_is_peer(npu, pdev)) {
		npu_take_peer(npu, pdev);
	} else if (action == BUS_NOTIFY_DEL_DEVICE && pdev == npu->peer) {
		if (npu_bug_mode == NPU_BUG_LEAK_PEER_REF) {
			dev_info(&npu->pdev->dev, "GPU peer %s removed; keeping its reference (bug %s)\n",
				 npu->peer_name, npu_bug_names[npu_bug_mode]);
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

void npu_find_peer(struct npu *npu)
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
DEVICE_ATTR_RO(pcisim_peer);
