/* SPDX-License-Identifier: GPL-2.0 */
/*
 * pcisim_kmod_common.h - the probe and module boilerplate the pcisim guest drivers share
 * (pcisim_gpu.ko, pcisim_npu.ko): the `bug=` module parameter, BAR 0 and the ID register, the
 * interrupt vectors, the /dev/pcisim-<kind>N misc device and its `pcisim_chardev` attribute,
 * and module init/exit.
 *
 * Static inlines rather than a shared object: a .o cannot be linked into two modules of one
 * Kbuild, and a third module exporting symbols would make the drivers depend on it at load time.
 */
#ifndef PCISIM_KMOD_COMMON_H
#define PCISIM_KMOD_COMMON_H

#include <linux/device.h>
#include <linux/device/driver.h>
#include <linux/idr.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/kernel.h>
#include <linux/miscdevice.h>
#include <linux/moduleparam.h>
#include <linux/pci.h>
#include <linux/string.h>
#include <linux/sysfs.h>

/*
 * The `bug` module parameter: which deliberate bug (for testing the lab's oracle) the module
 * runs with, by name. Declares `static char *bug` in the file that uses it (the one with
 * module_init).
 */
#define PCISIM_BUG_PARAM(desc)					\
	static char *bug = "none";				\
	module_param(bug, charp, 0444);				\
	MODULE_PARM_DESC(bug, desc)

/**
 * pcisim_pick_bug() - Looks up the `bug` parameter among the driver's variants.
 * @drv: the driver's name, for the log
 * @param: the parameter's value
 * @names: the variants' names; names[0] is "none"
 * @n: how many names
 *
 * Logs "<drv>: unknown bug=<param>" for an unknown name and "<drv>: loaded with deliberate bug
 * <name>" for any variant but the first.
 *
 * Return: the variant's index, or -EINVAL.
 */
static inline int pcisim_pick_bug(const char *drv, const char *param, const char *const *names,
				  unsigned int n)
{
	unsigned int i;

	for (i = 0; i < n; i++)
		if (sysfs_streq(param, names[i]))
			break;
	if (i == n) {
		pr_err("%s: unknown bug=%s\n", drv, param);
		return -EINVAL;
	}
	if (i)
		pr_warn("%s: loaded with deliberate bug %s\n", drv, names[i]);
	return i;
}

/**
 * pcisim_map_bar0() - Enables the device (managed) and maps BAR 0, the registers.
 * @pdev: the device
 * @drv: the driver's name, the regions' owner
 * @regs: where the mapping goes
 *
 * Return: 0 or a negative errno.
 */
static inline int pcisim_map_bar0(struct pci_dev *pdev, const char *drv, void __iomem **regs)
{
	int ret;

	ret = pcim_enable_device(pdev);
	if (ret)
		return ret;
	ret = pcim_iomap_regions(pdev, BIT(0), drv);
	if (ret)
		return ret;
	*regs = pcim_iomap_table(pdev)[0];
	return 0;
}

/**
 * pcisim_check_id() - Checks the ID register: is this the device the driver is for?
 * @pdev: the device
 * @regs: its BAR 0
 * @off: the ID register's offset
 * @magic: the value it must read
 * @what: the device's kind for the log ("GPU")
 * @prefix: put before the log line ("slot_reset: "), or ""
 *
 * Return: 0, or -ENODEV after logging "<prefix>ID register <id> is not the <what>'s <magic>".
 */
static inline int pcisim_check_id(struct pci_dev *pdev, void __iomem *regs, u32 off, u32 magic,
				  const char *what, const char *prefix)
{
	u32 id = readl(regs + off);

	if (id == magic)
		return 0;
	dev_err(&pdev->dev, "%sID register %#x is not the %s's %#x\n", prefix, id, what, magic);
	return -ENODEV;
}

/**
 * pcisim_request_irqs() - Allocates interrupt vectors and requests one handler on each.
 * @pdev: the device
 * @irqs: the vectors' Linux interrupt numbers, filled in
 * @nvec: how many vectors (exactly)
 * @types: PCI_IRQ_* kinds allowed
 * @handler: the hard handler (or NULL with @thread_fn)
 * @thread_fn: the threaded handler, or NULL
 * @irqflags: IRQF_* flags
 * @name: the name in /proc/interrupts
 * @data: the handlers' argument
 *
 * On failure nothing is left allocated.
 *
 * Return: 0 or a negative errno.
 */
static inline int pcisim_request_irqs(struct pci_dev *pdev, int *irqs, unsigned int nvec,
				      unsigned int types, irq_handler_t handler,
				      irq_handler_t thread_fn, unsigned long irqflags,
				      const char *name, void *data)
{
	unsigned int i;
	int ret;

	ret = pci_alloc_irq_vectors(pdev, nvec, nvec, types);
	if (ret < 0)
		return ret;
	for (i = 0; i < nvec; i++) {
		irqs[i] = pci_irq_vector(pdev, i);
		ret = request_threaded_irq(irqs[i], handler, thread_fn, irqflags, name, data);
		if (ret) {
			while (i--)
				free_irq(irqs[i], data);
			pci_free_irq_vectors(pdev);
			return ret;
		}
	}
	return 0;
}

/**
 * pcisim_free_irqs() - Undoes pcisim_request_irqs().
 * @pdev: the device
 * @irqs: the interrupt numbers
 * @nvec: how many
 * @data: the handlers' argument
 */
static inline void pcisim_free_irqs(struct pci_dev *pdev, const int *irqs, unsigned int nvec,
				    void *data)
{
	unsigned int i;

	for (i = 0; i < nvec; i++)
		free_irq(irqs[i], data);
	pci_free_irq_vectors(pdev);
}

/**
 * struct pcisim_chardev - A device's misc device, /dev/<prefix><id>.
 * @misc: the misc device; its open() finds the driver's struct with container_of()
 * @id: the number from the driver's IDA, -1 before registration
 * @name: "<prefix><id>", what the `pcisim_chardev` attribute reads
 */
struct pcisim_chardev {
	struct miscdevice misc;
	int id;
	char name[32];
};

/**
 * pcisim_chardev_register() - Numbers and registers the misc device.
 * @cd: the misc device
 * @ids: the driver's IDA
 * @prefix: the name's prefix ("pcisim-gpu")
 * @fops: its file operations
 * @parent: the PCI device
 *
 * Return: 0, or a negative errno with nothing left allocated.
 */
static inline int pcisim_chardev_register(struct pcisim_chardev *cd, struct ida *ids,
					  const char *prefix,
					  const struct file_operations *fops,
					  struct device *parent)
{
	int ret;

	cd->id = ida_alloc(ids, GFP_KERNEL);
	if (cd->id < 0)
		return cd->id;
	snprintf(cd->name, sizeof(cd->name), "%s%d", prefix, cd->id);
	cd->misc.minor = MISC_DYNAMIC_MINOR;
	cd->misc.name = cd->name;
	cd->misc.fops = fops;
	cd->misc.parent = parent;
	ret = misc_register(&cd->misc);
	if (ret) {
		ida_free(ids, cd->id);
		cd->id = -1;
	}
	return ret;
}

/**
 * pcisim_chardev_unregister() - Undoes pcisim_chardev_register() (the name stays readable).
 * @cd: the misc device
 * @ids: the driver's IDA
 */
static inline void pcisim_chardev_unregister(struct pcisim_chardev *cd, struct ida *ids)
{
	misc_deregister(&cd->misc);
	ida_free(ids, cd->id);
}

/*
 * The `pcisim_chardev` attribute (dev_attr_pcisim_chardev): the name of the misc device, from
 * member @member (a struct pcisim_chardev) of the driver data, of type @type; -ENODEV once the
 * driver data is gone.
 */
#define PCISIM_CHARDEV_ATTR(type, member)						\
	static ssize_t pcisim_chardev_show(struct device *dev,				\
					   struct device_attribute *attr, char *buf)	\
	{										\
		type *p = pci_get_drvdata(to_pci_dev(dev));				\
											\
		return p ? sysfs_emit(buf, "%s\n", p->member.name) : -ENODEV;		\
	}										\
	static DEVICE_ATTR_RO(pcisim_chardev)

/**
 * pcisim_module_init() - Picks the bug variant and registers the PCI driver.
 * @drv: the driver (its name is the log's)
 * @param: the `bug` parameter
 * @names: the variants' names; names[0] is "none"
 * @n: how many names
 * @variant: where the chosen variant's index goes
 * @ids: the IDA of the driver's misc devices (for pcisim_module_exit())
 *
 * With pcisim_module_exit(), the register and unregister functions of module_driver():
 * ``module_driver(drv, pcisim_module_init, pcisim_module_exit, bug, names, n, &variant, &ids)``.
 *
 * Return: 0 or a negative errno.
 */
static inline int pcisim_module_init(struct pci_driver *drv, const char *param,
				     const char *const *names, unsigned int n, int *variant,
				     struct ida *ids)
{
	int v = pcisim_pick_bug(drv->name, param, names, n);

	if (v < 0)
		return v;
	*variant = v;
	return pci_register_driver(drv);
}

/**
 * pcisim_module_exit() - Unregisters the PCI driver and empties its IDA.
 * @drv: the driver
 * @param: unused (module_driver() passes pcisim_module_init()'s arguments)
 * @names: unused
 * @n: unused
 * @variant: unused
 * @ids: the IDA of its misc devices
 */
static inline void pcisim_module_exit(struct pci_driver *drv, const char *param,
				      const char *const *names, unsigned int n, int *variant,
				      struct ida *ids)
{
	pci_unregister_driver(drv);
	ida_destroy(ids);
}

#endif /* PCISIM_KMOD_COMMON_H */
