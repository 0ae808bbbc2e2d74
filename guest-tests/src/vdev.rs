//! A guest vfio userspace driver session, shared by the scenario programs that drive
//! the device through vfio-pci (E3, E4, E5): bind to vfio-pci, open container/group/
//! device (legacy API, type1v2 IOMMU behind the vIOMMU), Command register, MSI-X
//! eventfds, DMA buffers mapped through the IOMMU, and the release that undoes it all.

use crate::gpu;
use crate::ktap::{all_ok, Ktap, Outcome};
use crate::pci::{write_sysfs, Function};
use crate::sys;
use crate::vfio::{self, Container, Device, Group, RegionInfo};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

pub const PCI_COMMAND: u64 = 0x04;
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// The last few kernel log records mentioning any of `needles` (diagnostics).
pub fn kernel_log_tail(needles: &[&str], max: usize) -> Vec<String> {
    let mut out: Vec<String> = sys::kmsg_read_all()
        .iter()
        .map(|rec| {
            let msg = rec.split_once(';').map(|(_, m)| m).unwrap_or(rec);
            msg.lines().next().unwrap_or("").to_string()
        })
        .filter(|msg| needles.iter().any(|n| msg.contains(n)))
        .collect();
    let skip = out.len().saturating_sub(max);
    out.split_off(skip)
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn parse_dev_numbers(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Makes sure a device node exists, creating it from sysfs's `dev` if devtmpfs
/// did not. Returns a note when it had to create it.
fn ensure_node(node: &str, sysfs_dev: &str) -> Result<Option<String>, String> {
    if wait_for(Duration::from_secs(2), || {
        Path::new(node).exists().then_some(())
    })
    .is_some()
    {
        return Ok(None);
    }
    let text = std::fs::read_to_string(sysfs_dev)
        .map_err(|e| format!("{node} is missing and {sysfs_dev} unreadable: {e}"))?;
    let (major, minor) = parse_dev_numbers(&text)
        .ok_or_else(|| format!("{sysfs_dev}: unexpected contents {text:?}"))?;
    if let Some(parent) = Path::new(node).parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
    }
    sys::mknod_char(Path::new(node), major, minor)?;
    Ok(Some(format!(
        "created {node} ({major}:{minor}) from {sysfs_dev} (no devtmpfs node)"
    )))
}

/// State that `vfio-release` must undo.
#[derive(Debug, Default)]
pub struct Binding {
    pub original_driver: Option<String>,
    pub override_written: bool,
    pub group: Option<String>,
}

/// Binds `func` to vfio-pci (driver_override + drivers_probe) and finds its group and
/// device nodes.
pub fn bind(func: &Function, b: &mut Binding, k: &mut Ktap) -> Result<(), String> {
    b.original_driver = func.driver();
    k.diag(&format!(
        "{}: driver before the test: {}",
        func.bdf,
        b.original_driver.as_deref().unwrap_or("none")
    ));
    func.write_attr("driver_override", "vfio-pci")?;
    b.override_written = true;
    match b.original_driver.as_deref() {
        Some("vfio-pci") => {}
        Some(d) => {
            let unbind = func.attr("driver").join("unbind");
            write_sysfs(&unbind, &func.bdf).map_err(|e| format!("unbind from {d}: {e}"))?;
        }
        None => {}
    }
    if func.driver().as_deref() != Some("vfio-pci") {
        write_sysfs(Path::new("/sys/bus/pci/drivers_probe"), &func.bdf)?;
    }
    let bound = wait_for(Duration::from_secs(5), || {
        (func.driver().as_deref() == Some("vfio-pci")).then_some(())
    });
    if bound.is_none() {
        let log = kernel_log_tail(&[&func.bdf, "vfio"], 8);
        for l in &log {
            k.diag(&format!("kmsg: {l}"));
        }
        let has_group = func.attr("iommu_group").exists();
        return Err(format!(
            "not bound to vfio-pci after drivers_probe (driver: {}; iommu_group {}; is vfio-pci loaded?)",
            func.driver().as_deref().unwrap_or("none"),
            if has_group { "present" } else { "absent" }
        ));
    }
    let link = std::fs::read_link(func.attr("iommu_group"))
        .map_err(|e| format!("read iommu_group link: {e} (no vIOMMU?)"))?;
    let group = link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("odd iommu_group link {}", link.display()))?;
    k.diag(&format!(
        "{} bound to vfio-pci, iommu group {group}",
        func.bdf
    ));
    b.group = Some(group.clone());
    let groups = Path::new("/sys/kernel/iommu_groups")
        .join(&group)
        .join("devices");
    if let Ok(rd) = std::fs::read_dir(&groups) {
        let mut members: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        members.sort();
        k.diag(&format!("group {group} members: {}", members.join(" ")));
    }
    if let Some(n) = ensure_node("/dev/vfio/vfio", "/sys/class/misc/vfio/dev")? {
        k.diag(&n);
    }
    let node = format!("/dev/vfio/{group}");
    if let Some(n) = ensure_node(&node, &format!("/sys/class/vfio/{group}/dev"))? {
        k.diag(&n);
    }
    Ok(())
}

/// The open VFIO objects. Field order is drop order: device, group, container.
#[derive(Debug)]
pub struct Vfio {
    pub device: Device,
    pub group: Group,
    pub container: Container,
    pub bar0: RegionInfo,
    pub config: RegionInfo,
}

/// Opens the container (type1v2), the group and the device; checks the regions needed.
pub fn open_vfio(bdf: &str, group: &str, k: &mut Ktap) -> Result<Vfio, String> {
    let container = Container::open()?;
    let api = container.api_version()?;
    if api != vfio::VFIO_API_VERSION {
        return Err(format!(
            "VFIO_GET_API_VERSION returned {api}, expected {}",
            vfio::VFIO_API_VERSION
        ));
    }
    if !container.check_extension(vfio::VFIO_TYPE1V2_IOMMU)? {
        return Err("VFIO_CHECK_EXTENSION(VFIO_TYPE1v2_IOMMU) is false".into());
    }
    let group = Group::open(&format!("/dev/vfio/{group}"))?;
    let st = group.status()?;
    if st.flags & vfio::VFIO_GROUP_FLAGS_VIABLE == 0 {
        return Err(format!(
            "group {group:?} not viable (flags 0x{:x}): another device in the group is bound to a host driver",
            st.flags
        ));
    }
    group.set_container(&container)?;
    container.set_iommu(vfio::VFIO_TYPE1V2_IOMMU)?;
    let device = group.device(bdf)?;
    let info = device.info()?;
    k.diag(&format!(
        "device info: flags 0x{:x} regions {} irqs {}",
        info.flags, info.num_regions, info.num_irqs
    ));
    if info.flags & vfio::VFIO_DEVICE_FLAGS_PCI == 0 {
        return Err(format!(
            "device flags 0x{:x} lack VFIO_DEVICE_FLAGS_PCI",
            info.flags
        ));
    }
    if info.num_regions <= vfio::VFIO_PCI_CONFIG_REGION_INDEX
        || info.num_irqs <= vfio::VFIO_PCI_MSIX_IRQ_INDEX
    {
        return Err(format!(
            "device has {} regions and {} irq indexes, too few",
            info.num_regions, info.num_irqs
        ));
    }
    let bar0 = device.region_info(vfio::VFIO_PCI_BAR0_REGION_INDEX)?;
    let config = device.region_info(vfio::VFIO_PCI_CONFIG_REGION_INDEX)?;
    k.diag(&format!(
        "region 0 (BAR0): size 0x{:x} offset 0x{:x} flags 0x{:x}; region 7 (config): size 0x{:x} offset 0x{:x} flags 0x{:x}",
        bar0.size, bar0.offset, bar0.flags, config.size, config.offset, config.flags
    ));
    let rw = vfio::VFIO_REGION_INFO_FLAG_READ | vfio::VFIO_REGION_INFO_FLAG_WRITE;
    if bar0.flags & rw != rw || bar0.size < 0x1000 {
        return Err(format!(
            "BAR0 region not read/write or too small (flags 0x{:x} size 0x{:x})",
            bar0.flags, bar0.size
        ));
    }
    if config.flags & rw != rw {
        return Err(format!(
            "config region flags 0x{:x} not read/write",
            config.flags
        ));
    }
    Ok(Vfio {
        device,
        group,
        container,
        bar0,
        config,
    })
}

/// Binds `func` to vfio-pci and opens it, reporting `vfio-bind` and then `vfio-open`
/// (skipped when the bind failed). `check` judges the opened device before `vfio-open`
/// passes (a scenario that needs more than [`open_vfio`] checks, such as a reset flag);
/// its error fails `vfio-open` and closes the device. `b` records what the bind changed
/// whatever happens, for [`release`]. Used by E3, the FLR-with-DMA and the vfio reset
/// scenarios.
pub fn bind_and_open(
    func: &Function,
    b: &mut Binding,
    k: &mut Ktap,
    check: impl FnOnce(&Vfio) -> Result<(), String>,
) -> Option<Vfio> {
    let r = bind(func, b, k);
    if !k.check("vfio-bind", r) {
        k.result("vfio-open", Outcome::Skip("vfio-bind failed".to_string()));
        return None;
    }
    let group = b.group.clone().unwrap_or_default();
    let r = open_vfio(&func.bdf, &group, k).and_then(|v| check(&v).map(|()| v));
    k.check_value("vfio-open", r)
}

/// Opens the device bound by [`bind`] and sets Memory Space and Bus Master
/// ([`enable_command`]). On error the binding is undone ([`release`]; its own error is
/// dropped: the open error is the one to report) and the open error returned. Used by the
/// programs that report the open as one step (dmamap, vfiouser).
pub fn open_enabled(func: &Function, b: &Binding, k: &mut Ktap) -> Result<Vfio, String> {
    let group = b.group.clone().unwrap_or_default();
    let r = open_vfio(&func.bdf, &group, k).and_then(|v| {
        enable_command(&v, k)?;
        Ok(v)
    });
    if r.is_err() {
        let _ = release(func, b, None, false);
    }
    r
}

/// Command |= Memory Space | Bus Master through the config region; BAR0 ID readable.
pub fn enable_command(v: &Vfio, k: &mut Ktap) -> Result<(), String> {
    let before = v.device.read_u16(&v.config, PCI_COMMAND)?;
    let want = before | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
    v.device.write_u16(&v.config, PCI_COMMAND, want)?;
    let after = v.device.read_u16(&v.config, PCI_COMMAND)?;
    k.diag(&format!("Command 0x{before:04x} -> 0x{after:04x}"));
    if after & (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER) != PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
    {
        return Err(format!(
            "Command reads 0x{after:04x} after writing 0x{want:04x}: Memory/Bus Master not set"
        ));
    }
    let id = v.device.read_u32(&v.bar0, gpu::ID)?;
    if id != gpu::ID_MAGIC {
        return Err(format!(
            "BAR0 ID via the vfio device reads 0x{id:08x}, expected 0x{:08x}",
            gpu::ID_MAGIC
        ));
    }
    Ok(())
}

/// [`release`], then the `vfio-release` result: failed with every error of `earlier` (the
/// teardown the caller did first) and then release's own, joined by "; ". Used by E3 and
/// dmastream.
pub fn release_and_report(
    func: &Function,
    b: &Binding,
    vfio: Option<Vfio>,
    irqs_on: bool,
    mut earlier: Vec<String>,
    k: &mut Ktap,
) {
    if let Err(e) = release(func, b, vfio, irqs_on) {
        earlier.push(e);
    }
    k.check("vfio-release", all_ok(earlier));
}

/// Disables interrupts (if `irqs_on`), closes device, group and container, unbinds from
/// vfio-pci, clears driver_override and re-probes the original driver.
pub fn release(
    func: &Function,
    b: &Binding,
    vfio: Option<Vfio>,
    irqs_on: bool,
) -> Result<(), String> {
    let mut errs = Vec::new();
    if let Some(v) = vfio {
        if irqs_on {
            if let Err(e) = v.device.disable_irqs(vfio::VFIO_PCI_MSIX_IRQ_INDEX) {
                errs.push(e);
            }
        }
        let Vfio {
            device,
            group,
            container,
            ..
        } = v;
        drop(device);
        if let Err(e) = group.unset_container() {
            errs.push(e);
        }
        drop(group);
        drop(container);
    }
    if func.driver().as_deref() == Some("vfio-pci") {
        if let Err(e) = write_sysfs(Path::new("/sys/bus/pci/drivers/vfio-pci/unbind"), &func.bdf) {
            errs.push(e);
        }
    }
    if b.override_written {
        if let Err(e) = func.write_attr("driver_override", "\n") {
            errs.push(e);
        }
        match func.read_attr("driver_override") {
            Ok(s) if s.trim() == "(null)" || s.trim().is_empty() => {}
            Ok(s) => errs.push(format!("driver_override still {:?}", s.trim())),
            Err(e) => errs.push(e),
        }
    }
    if let Some(orig) = b.original_driver.as_deref().filter(|d| *d != "vfio-pci") {
        if let Err(e) = write_sysfs(Path::new("/sys/bus/pci/drivers_probe"), &func.bdf) {
            errs.push(e);
        } else if func.driver().as_deref() != Some(orig) {
            errs.push(format!(
                "original driver {orig} did not rebind (now: {})",
                func.driver().as_deref().unwrap_or("none")
            ));
        }
    } else if let Some(d) = func.driver() {
        errs.push(format!("device still bound to {d} after release"));
    }
    all_ok(errs)
}

/// Sets and clears Command bits through the config region; returns the value read back.
pub fn set_command(v: &Vfio, set: u16, clear: u16, k: &mut Ktap) -> Result<u16, String> {
    let before = v.device.read_u16(&v.config, PCI_COMMAND)?;
    let want = (before | set) & !clear;
    v.device.write_u16(&v.config, PCI_COMMAND, want)?;
    let after = v.device.read_u16(&v.config, PCI_COMMAND)?;
    k.diag(&format!("Command 0x{before:04x} -> 0x{after:04x}"));
    if after & (set | clear) != set {
        return Err(format!(
            "Command reads 0x{after:04x} after writing 0x{want:04x}"
        ));
    }
    Ok(after)
}

/// Binds one non-blocking eventfd per vector in `vectors` to MSI-X (the others de-assigned)
/// after checking the MSI-X IRQ info.
pub fn msix_eventfds(
    v: &Vfio,
    vectors: &[u32],
    min_count: u32,
    k: &mut Ktap,
) -> Result<BTreeMap<u32, File>, String> {
    let info = v.device.irq_info(vfio::VFIO_PCI_MSIX_IRQ_INDEX)?;
    k.diag(&format!(
        "MSI-X irq info: count {} flags 0x{:x}",
        info.count, info.flags
    ));
    if info.count < min_count {
        return Err(format!("MSI-X count {} < {min_count}", info.count));
    }
    if info.flags & vfio::VFIO_IRQ_INFO_EVENTFD == 0 {
        return Err(format!("MSI-X irq flags 0x{:x} lack EVENTFD", info.flags));
    }
    let max = vectors.iter().copied().max().unwrap_or(0);
    if max >= info.count {
        return Err(format!(
            "vector {max} out of range (device has {})",
            info.count
        ));
    }
    let mut fds = BTreeMap::new();
    for &vec in vectors {
        fds.insert(vec, sys::eventfd()?);
    }
    let raw: Vec<i32> = (0..=max)
        .map(|i| fds.get(&i).map_or(-1, |f| f.as_raw_fd()))
        .collect();
    v.device
        .set_irqs_eventfds(vfio::VFIO_PCI_MSIX_IRQ_INDEX, 0, &raw)?;
    Ok(fds)
}

/// Anonymous memory the device reaches through the IOMMU at `iova`. Accesses are volatile
/// (the device writes it behind the compiler's back) and bounds-checked.
#[derive(Debug)]
pub struct DmaBuffer {
    ptr: NonNull<u8>,
    len: usize,
    pub iova: u64,
    mapped: bool,
}

impl DmaBuffer {
    /// `len` bytes (a multiple of 4 KiB) of zeroed, populated anonymous memory, mapped for
    /// device read/write at `iova` in `container`.
    pub fn map(container: &Container, iova: u64, len: usize) -> Result<DmaBuffer, String> {
        if len == 0 || len % 4096 != 0 {
            return Err(format!(
                "DMA buffer length {len:#x} not a multiple of 4 KiB"
            ));
        }
        let ptr = crate::sys::mmap_anon_populated(len)?;
        let mut b = DmaBuffer {
            ptr,
            len,
            iova,
            mapped: false,
        };
        // SAFETY: the range is our own mapping, which `b` keeps until after the DMA mapping
        // is removed (`unmap`, or `Drop` on the container's close).
        unsafe { container.map_dma(ptr.as_ptr() as u64, iova, len as u64) }?;
        b.mapped = true;
        Ok(b)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn check(&self, off: usize, n: usize) -> Result<(), String> {
        match off.checked_add(n) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(format!(
                "access {off:#x}+{n:#x} outside the {:#x}-byte buffer",
                self.len
            )),
        }
    }

    /// Writes `data` at `off` (volatile bytes).
    pub fn write(&self, off: usize, data: &[u8]) -> Result<(), String> {
        self.check(off, data.len())?;
        for (i, &b) in data.iter().enumerate() {
            // SAFETY: in bounds (checked above) of our live mapping.
            unsafe { self.ptr.as_ptr().add(off + i).write_volatile(b) };
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Reads `n` bytes at `off` (volatile bytes).
    pub fn read(&self, off: usize, n: usize) -> Result<Vec<u8>, String> {
        self.check(off, n)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok((0..n)
            // SAFETY: in bounds (checked above) of our live mapping.
            .map(|i| unsafe { self.ptr.as_ptr().add(off + i).read_volatile() })
            .collect())
    }

    /// Fills `n` bytes at `off` with `b`.
    pub fn fill(&self, off: usize, n: usize, b: u8) -> Result<(), String> {
        self.write(off, &vec![b; n])
    }

    /// The little-endian u64 at `off`.
    pub fn read_u64(&self, off: usize) -> Result<u64, String> {
        let v = self.read(off, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&v);
        Ok(u64::from_le_bytes(a))
    }

    /// Removes the IOMMU mapping (the memory stays ours until drop).
    pub fn unmap(&mut self, container: &Container) -> Result<(), String> {
        if !self.mapped {
            return Ok(());
        }
        let n = container.unmap_dma(self.iova, self.len as u64)?;
        self.mapped = false;
        if n != self.len as u64 {
            return Err(format!(
                "VFIO_IOMMU_UNMAP_DMA at 0x{:x} unmapped {n:#x} bytes, expected {:#x}",
                self.iova, self.len
            ));
        }
        Ok(())
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        // A buffer still mapped is unmapped when its container closes; the pages stay
        // pinned until then, so freeing our mapping of them is safe either way.
        // SAFETY: `ptr..ptr+len` is the mapping we created and nothing else refers to it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Waits up to `timeout` for the eventfd to fire; returns its count (0: timed out).
pub fn wait_eventfd(f: &mut File, timeout: Duration) -> Result<u64, String> {
    use std::os::fd::AsFd;
    if !sys::wait_readable(f.as_fd(), timeout)? {
        return Ok(0);
    }
    sys::eventfd_take(f)
}

/// Polls a BAR0 register until `pred` holds or `timeout` passes; returns the last value and
/// whether `pred` held.
pub fn poll_reg(
    v: &Vfio,
    off: u64,
    timeout: Duration,
    pred: impl Fn(u32) -> bool,
) -> Result<(u32, bool), String> {
    let t0 = Instant::now();
    loop {
        let x = v.device.read_u32(&v.bar0, off)?;
        if pred(x) {
            return Ok((x, true));
        }
        if t0.elapsed() >= timeout {
            return Ok((x, false));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The 64-bit register whose halves are at `lo` and `lo + 4`.
pub fn read_u64_reg(v: &Vfio, lo: u64) -> Result<u64, String> {
    let l = v.device.read_u32(&v.bar0, lo)?;
    let h = v.device.read_u32(&v.bar0, lo + 4)?;
    Ok(u64::from(l) | (u64::from(h) << 32))
}

/// Writes a BAR0 register.
pub fn write_reg(v: &Vfio, off: u64, val: u32) -> Result<(), String> {
    v.device.write_u32(&v.bar0, off, val)
}

/// Reads a BAR0 register.
pub fn read_reg(v: &Vfio, off: u64) -> Result<u32, String> {
    v.device.read_u32(&v.bar0, off)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dev_numbers() {
        assert_eq!(parse_dev_numbers("10:196\n"), Some((10, 196)));
        assert_eq!(parse_dev_numbers("x"), None);
    }
}
