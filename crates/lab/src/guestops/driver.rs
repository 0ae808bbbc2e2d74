//! Our guest kernel drivers (guest-tests/kmod), loaded by the scenarios that need them.

use super::{sh, GuestShell, ShellError};
use crate::vm::kmod::{guest_module_path_sh, GPU_MODULE, NPU_MODULE};

/// (Re)loads the guest NPU driver with `bug` (`none` for the correct one; docs/sva.md) and
/// waits until it drives the NPU at `bdf`; returns its character device's name
/// (`pcisim-npuN`). Guest `sva` programs left over from an earlier step are killed first (they
/// would hold the module).
pub fn load_npu<G: GuestShell + ?Sized>(
    g: &mut G,
    bdf: &str,
    bug: &str,
) -> Result<String, G::Error> {
    let ko = guest_module_path_sh(NPU_MODULE);
    let script = format!(
        "pkill -9 -f 'pcisim-guest sva' 2>/dev/null; sleep 0.1; \
         rmmod {NPU_MODULE} 2>/dev/null; insmod {ko} bug={bug} || exit 1; \
         i=0; while [ ! -e /sys/bus/pci/drivers/{NPU_MODULE}/{bdf} ] && [ $i -lt 100 ]; do \
         sleep 0.05; i=$((i+1)); done; \
         cat /sys/bus/pci/devices/{bdf}/pcisim_chardev || {{ dmesg | tail -n 20 >&2; exit 1; }}"
    );
    let chardev = sh(g, &script)?.trim().to_string();
    if chardev.starts_with("pcisim-npu") {
        Ok(chardev)
    } else {
        Err(ShellError::Unexpected(format!("chardev: {chardev:?}")).into())
    }
}

/// (Re)loads the guest GPU driver with `bug` (`none` for the correct one; docs/userptr.md)
/// after switching the GPU's IOMMU group at `bdf` to strict invalidation (`DMA`, not the lazy
/// `DMA-FQ`: an unmap must reach the device before `dma_unmap` returns), and waits until it
/// drives the GPU; returns its character device's name (`pcisim-gpuN`).
pub fn load_gpu<G: GuestShell + ?Sized>(
    g: &mut G,
    bdf: &str,
    bug: &str,
) -> Result<String, G::Error> {
    let ko = guest_module_path_sh(GPU_MODULE);
    let dev = format!("/sys/bus/pci/devices/{bdf}");
    let script = format!(
        "rmmod {GPU_MODULE} 2>/dev/null; t={dev}/iommu_group/type; \
         [ \"$(cat $t)\" = DMA ] || echo DMA > $t || exit 1; \
         [ \"$(cat $t)\" = DMA ] || {{ echo \"iommu group type $(cat $t)\" >&2; exit 1; }}; \
         insmod {ko} bug={bug} || exit 1; \
         i=0; while [ ! -e {dev}/pcisim_chardev ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done; \
         cat {dev}/pcisim_chardev || {{ dmesg | tail -n 20 >&2; exit 1; }}"
    );
    let chardev = sh(g, &script)?.trim().to_string();
    if chardev.starts_with("pcisim-gpu") {
        Ok(chardev)
    } else {
        Err(ShellError::Unexpected(format!("chardev: {chardev:?}")).into())
    }
}

/// Unloads the guest GPU driver (`rmmod`); an error with what the guest said if it did not
/// unload (a device or file still holding it). The scenarios that loaded it with [`load_gpu`]
/// end with this as their "unloads" check (userptr, R12's AER recovery).
pub fn unload_gpu<G: GuestShell + ?Sized>(g: &mut G) -> Result<(), G::Error> {
    let out = sh(g, &format!("rmmod {GPU_MODULE} && echo unloaded"))?;
    if out.contains("unloaded") {
        Ok(())
    } else {
        Err(ShellError::Unexpected(out.trim().to_string()).into())
    }
}
