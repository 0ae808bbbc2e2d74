// SPDX-License-Identifier: GPL-2.0
/*
 * pcisim_oops.c - provokes guest kernel reports on request, for testing the lab's guest kernel
 * oracle (crates/lab/src/dmesg.rs; the K scenarios). Never for real use.
 *
 * Writing a module parameter (root only) provokes a report in the writing task:
 *
 *   echo 1 > /sys/module/pcisim_oops/parameters/warn       WARN(1, ...): a WARNING splat, taint W
 *   echo N > /sys/module/pcisim_oops/parameters/hang_secs  the writer sleeps N s (at most 600)
 *                                                           uninterruptibly (state D), so
 *                                                           khungtaskd reports it once N exceeds
 *                                                           kernel.hung_task_timeout_secs
 *
 * Nothing is left behind: the hang ends on its own and the write returns, so the module can be
 * removed afterwards. Loading it taints the kernel O and E (out of tree, unsigned), like
 * pcisim_npu.
 */
#include <linux/bug.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/sched.h>

#define OOPS_MAX_HANG_SECS 600

static int oops_warn_set(const char *val, const struct kernel_param *kp)
{
	bool on;
	int ret = kstrtobool(val, &on);

	if (ret)
		return ret;
	WARN(on, "pcisim_oops: WARN requested through the warn parameter\n");
	return 0;
}

static int oops_hang_set(const char *val, const struct kernel_param *kp)
{
	unsigned int secs;
	int ret = kstrtouint(val, 0, &secs);

	if (ret)
		return ret;
	if (secs > OOPS_MAX_HANG_SECS)
		return -EINVAL;
	pr_info("pcisim_oops: sleeping %u s uninterruptibly (hung task test)\n", secs);
	schedule_timeout_uninterruptible((long)secs * HZ);
	pr_info("pcisim_oops: woke up after %u s\n", secs);
	return 0;
}

static const struct kernel_param_ops oops_warn_ops = {
	.set = oops_warn_set,
};

static const struct kernel_param_ops oops_hang_ops = {
	.set = oops_hang_set,
};

module_param_cb(warn, &oops_warn_ops, NULL, 0200);
MODULE_PARM_DESC(warn, "write 1: WARN() in the writing task");
module_param_cb(hang_secs, &oops_hang_ops, NULL, 0200);
MODULE_PARM_DESC(hang_secs, "write N: the writing task sleeps N seconds in state D (N <= 600)");

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("pcisim lab self-test: provokes a WARNING or a hung task on request");
