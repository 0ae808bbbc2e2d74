//! E3: MSI-X delivery through a guest vfio userspace driver (vfio-pci, legacy
//! container/group API, type1v2 IOMMU behind the vIOMMU).

use crate::args::{self, Args};
use crate::e1::setup_failure;
use crate::gpu;
use crate::ktap::{Ktap, Outcome};
use crate::pci::{self, write_sysfs, Function};
use crate::sys;
use crate::vfio::{self, Container, Device, Group, RegionInfo};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
const MSIX_MIN_VECTORS: u32 = 16;
const IRQ_TIMEOUT: Duration = Duration::from_secs(5);

/// Sums the per-CPU counts of the `/proc/interrupts` lines whose action name is
/// exactly `name`. `None` if there is no such line.
pub fn interrupt_count(proc_interrupts: &str, name: &str) -> Option<u64> {
    let mut found = None;
    for line in proc_interrupts.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if !first.ends_with(':') {
            continue; // the CPU header line
        }
        if line.split_whitespace().last() != Some(name) {
            continue;
        }
        let sum: u64 = fields.map_while(|f| f.parse::<u64>().ok()).sum();
        found = Some(found.unwrap_or(0) + sum);
    }
    found
}

/// The `/proc/interrupts` action name vfio-pci gives an MSI-X vector.
pub fn msix_irq_name(vector: u32, bdf: &str) -> String {
    format!("vfio-msix[{vector}]({bdf})")
}

fn read_proc_interrupts() -> Result<String, String> {
    std::fs::read_to_string("/proc/interrupts").map_err(|e| format!("read /proc/interrupts: {e}"))
}

/// The last few kernel log records mentioning any of `needles` (diagnostics).
fn kernel_log_tail(needles: &[&str], max: usize) -> Vec<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    // One record per read; stop at EAGAIN (end of the buffer) or after a bound.
    for _ in 0..100_000 {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let rec = String::from_utf8_lossy(&buf[..n]);
                let msg = rec.split_once(';').map(|(_, m)| m).unwrap_or(&rec);
                let msg = msg.lines().next().unwrap_or("").to_string();
                if needles.iter().any(|n| msg.contains(n)) {
                    out.push(msg);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => continue, // overwritten
            Err(_) => break,
        }
    }
    let skip = out.len().saturating_sub(max);
    out.split_off(skip)
}

fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
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
#[derive(Default)]
struct Binding {
    original_driver: Option<String>,
    override_written: bool,
    group: Option<String>,
}

fn bind(func: &Function, b: &mut Binding, k: &mut Ktap) -> Result<(), String> {
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
struct Vfio {
    device: Device,
    group: Group,
    _container: Container,
    bar0: RegionInfo,
    config: RegionInfo,
}

fn open_vfio(bdf: &str, group: &str, k: &mut Ktap) -> Result<Vfio, String> {
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
        _container: container,
        bar0,
        config,
    })
}

fn enable_command(v: &Vfio, k: &mut Ktap) -> Result<(), String> {
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
    let id = v.device.read_u32(&v.bar0, gpu::REG_ID)?;
    if id != gpu::ID_MAGIC {
        return Err(format!(
            "BAR0 ID via the vfio device reads 0x{id:08x}, expected 0x{:08x}",
            gpu::ID_MAGIC
        ));
    }
    Ok(())
}

/// Eventfds per tested vector.
struct Irqs {
    fds: BTreeMap<u32, File>,
    baseline: String,
}

fn enable_msix(v: &Vfio, vectors: &[u32], k: &mut Ktap) -> Result<Irqs, String> {
    let info = v.device.irq_info(vfio::VFIO_PCI_MSIX_IRQ_INDEX)?;
    k.diag(&format!(
        "MSI-X irq info: count {} flags 0x{:x}",
        info.count, info.flags
    ));
    if info.count < MSIX_MIN_VECTORS {
        return Err(format!("MSI-X count {} < {MSIX_MIN_VECTORS}", info.count));
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
    let baseline = read_proc_interrupts()?;
    Ok(Irqs { fds, baseline })
}

fn ring_vector(v: &Vfio, irqs: &mut Irqs, vector: u32, k: &mut Ktap) -> Result<(), String> {
    // Anything already pending is reported and cleared, not counted.
    for (vec, f) in irqs.fds.iter_mut() {
        let n = sys::eventfd_take(f)?;
        if n != 0 {
            k.diag(&format!(
                "eventfd of vector {vec} had count {n} before ringing vector {vector}"
            ));
        }
    }
    let count_before = v.device.read_u32(&v.bar0, gpu::REG_IRQ_COUNT)?;
    let t0 = Instant::now();
    v.device.write_u32(&v.bar0, gpu::REG_IRQ_DOORBELL, vector)?;
    let f = irqs
        .fds
        .get_mut(&vector)
        .ok_or_else(|| format!("no eventfd for vector {vector}"))?;
    let fired = sys::wait_readable(f.as_fd(), IRQ_TIMEOUT)?;
    let latency = t0.elapsed();
    let count_after = v.device.read_u32(&v.bar0, gpu::REG_IRQ_COUNT)?;
    let last_error = v.device.read_u32(&v.bar0, gpu::REG_IRQ_LAST_ERROR)?;
    if !fired {
        return Err(format!(
            "no interrupt within {}s (IRQ_COUNT {count_before} -> {count_after}, IRQ_LAST_ERROR {last_error})",
            IRQ_TIMEOUT.as_secs()
        ));
    }
    let n = sys::eventfd_take(f)?;
    k.diag(&format!(
        "vector {vector}: eventfd count {n} after {} us; IRQ_COUNT {count_before} -> {count_after}",
        latency.as_micros()
    ));
    let mut errs = Vec::new();
    if n != 1 {
        errs.push(format!("eventfd count {n}, expected exactly 1"));
    }
    // Give a stray interrupt a moment to show up on another vector.
    std::thread::sleep(Duration::from_millis(50));
    for (other, f) in irqs.fds.iter_mut() {
        if *other == vector {
            let extra = sys::eventfd_take(f)?;
            if extra != 0 {
                errs.push(format!("vector {vector} fired {extra} more time(s)"));
            }
            continue;
        }
        let m = sys::eventfd_take(f)?;
        if m != 0 {
            errs.push(format!("vector {other} also fired ({m})"));
        }
    }
    if count_after != count_before.wrapping_add(1) {
        errs.push(format!(
            "IRQ_COUNT went {count_before} -> {count_after}, expected +1"
        ));
    }
    if last_error != 0 {
        errs.push(format!("IRQ_LAST_ERROR {last_error}"));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

fn check_proc_interrupts(
    bdf: &str,
    irqs: &Irqs,
    delivered: &[u32],
    k: &mut Ktap,
) -> Result<(), String> {
    let now = read_proc_interrupts()?;
    let mut errs = Vec::new();
    for &vec in irqs.fds.keys() {
        let name = msix_irq_name(vec, bdf);
        let before = interrupt_count(&irqs.baseline, &name);
        let after = interrupt_count(&now, &name);
        k.diag(&format!(
            "{name}: {} -> {}",
            before.map_or("absent".into(), |c| c.to_string()),
            after.map_or("absent".into(), |c| c.to_string())
        ));
        match (before, after) {
            (_, None) => errs.push(format!("no /proc/interrupts line for {name}")),
            (b, Some(a)) => {
                let delta = a.saturating_sub(b.unwrap_or(0));
                if delivered.contains(&vec) && delta == 0 {
                    errs.push(format!("{name} count did not increase ({a})"));
                }
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

fn release(func: &Function, b: &Binding, vfio: Option<Vfio>, irqs_on: bool) -> Result<(), String> {
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
            _container,
            ..
        } = v;
        drop(device);
        if let Err(e) = group.unset_container() {
            errs.push(e);
        }
        drop(group);
        drop(_container);
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
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

pub fn run(argv: &[String]) -> i32 {
    let prepared = (|| -> Result<_, String> {
        let args = Args::parse(argv, &["vendor", "device", "vectors", "bdf"])?;
        let vendor = args.id16("vendor")?;
        let device = args.id16("device")?;
        let vectors = args::parse_vectors(args.get("vectors").unwrap_or("0,1,5"))?;
        let (func, note) = pci::select_function(vendor, device, args.get("bdf"))?;
        Ok((func, note, vectors))
    })();
    let (func, note, vectors) = match prepared {
        Ok(p) => p,
        Err(e) => return setup_failure(&e),
    };

    // vfio-bind vfio-open command-enable msix-enable, one per vector,
    // proc-interrupts msix-quiet vfio-release.
    let mut k = Ktap::new(4 + vectors.len() + 3);
    k.diag(&format!(
        "E3 MSI-X through guest vfio-pci on {}, vectors {:?}",
        func.bdf, vectors
    ));
    if let Some(n) = note {
        k.diag(&n);
    }
    let mut binding = Binding::default();
    let skip = |why: &str| Outcome::Skip(format!("{why} failed"));

    let bound = bind(&func, &mut binding, &mut k);
    let bound_ok = k.check("vfio-bind", bound);

    let mut vfio = None;
    if bound_ok {
        let group = binding.group.clone().unwrap_or_default();
        match open_vfio(&func.bdf, &group, &mut k) {
            Ok(v) => {
                vfio = Some(v);
                k.result("vfio-open", Outcome::Pass);
            }
            Err(e) => k.result("vfio-open", Outcome::Fail(e)),
        }
    } else {
        k.result("vfio-open", skip("vfio-bind"));
    }

    let mut cmd_ok = false;
    match &vfio {
        Some(v) => {
            let r = enable_command(v, &mut k);
            cmd_ok = k.check("command-enable", r);
        }
        None => k.result("command-enable", skip("vfio-open")),
    }

    let mut irqs = None;
    match &vfio {
        Some(v) if cmd_ok => match enable_msix(v, &vectors, &mut k) {
            Ok(i) => {
                irqs = Some(i);
                k.result("msix-enable", Outcome::Pass);
            }
            Err(e) => k.result("msix-enable", Outcome::Fail(e)),
        },
        _ => k.result("msix-enable", skip("command-enable")),
    }

    let mut delivered = Vec::new();
    for &vec in &vectors {
        let name = format!("msix-vector-{vec}");
        match (&vfio, &mut irqs) {
            (Some(v), Some(i)) => {
                let r = ring_vector(v, i, vec, &mut k);
                if k.check(&name, r) {
                    delivered.push(vec);
                }
            }
            _ => k.result(&name, skip("msix-enable")),
        }
    }

    match &irqs {
        Some(i) => {
            let r = check_proc_interrupts(&func.bdf, i, &delivered, &mut k);
            k.check("proc-interrupts", r);
        }
        None => k.result("proc-interrupts", skip("msix-enable")),
    }

    // Spurious-interrupt check over the whole run: the eventfds must be quiet
    // now (every delivered interrupt was consumed above).
    match irqs.as_mut() {
        Some(i) => {
            let mut stray = Vec::new();
            for (vec, f) in i.fds.iter_mut() {
                match sys::eventfd_take(f) {
                    Ok(0) => {}
                    Ok(n) => stray.push(format!("vector {vec}: {n}")),
                    Err(e) => stray.push(e),
                }
            }
            if stray.is_empty() {
                k.result("msix-quiet", Outcome::Pass);
            } else {
                k.result(
                    "msix-quiet",
                    Outcome::Fail(format!("unexpected interrupts: {}", stray.join(", "))),
                );
            }
        }
        None => k.result("msix-quiet", skip("msix-enable")),
    }

    let irqs_on = irqs.is_some();
    let r = release(&func, &binding, vfio, irqs_on);
    drop(irqs);
    k.check("vfio-release", r);
    k.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC: &str = "\
            CPU0       CPU1
   0:         36          0   IO-APIC   2-edge      timer
  24:          3          2   PCI-MSIX-0000:01:00.0   0-edge      vfio-msix[0](0000:01:00.0)
  25:          0          0   PCI-MSIX-0000:01:00.0   1-edge      vfio-msix[1](0000:01:00.0)
  26:          7          0   PCI-MSIX-0000:01:00.0   5-edge      vfio-msix[5](0000:01:00.0)
  27:          1          0   PCI-MSIX-0000:02:00.0   0-edge      vfio-msix[0](0000:02:00.0)
 NMI:          0          0   Non-maskable interrupts
 ERR:          0
";

    #[test]
    fn counts_interrupt_lines() {
        assert_eq!(
            interrupt_count(PROC, &msix_irq_name(0, "0000:01:00.0")),
            Some(5)
        );
        assert_eq!(
            interrupt_count(PROC, &msix_irq_name(1, "0000:01:00.0")),
            Some(0)
        );
        assert_eq!(
            interrupt_count(PROC, &msix_irq_name(5, "0000:01:00.0")),
            Some(7)
        );
        assert_eq!(
            interrupt_count(PROC, &msix_irq_name(0, "0000:02:00.0")),
            Some(1)
        );
        assert_eq!(
            interrupt_count(PROC, &msix_irq_name(2, "0000:01:00.0")),
            None
        );
        assert_eq!(interrupt_count(PROC, "timer"), Some(36));
        // A prefix of another name does not match.
        assert_eq!(interrupt_count(PROC, "vfio-msix[0](0000:01:00."), None);
    }

    #[test]
    fn parses_dev_numbers() {
        assert_eq!(parse_dev_numbers("10:196\n"), Some((10, 196)));
        assert_eq!(parse_dev_numbers("x"), None);
    }
}
