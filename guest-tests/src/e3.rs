//! E3: MSI-X delivery through a guest vfio userspace driver (vfio-pci, legacy
//! container/group API, type1v2 IOMMU behind the vIOMMU). `--irq msi` does the same through
//! MSI (`VFIO_PCI_MSI_IRQ_INDEX`), for a function that has an MSI capability instead of MSI-X
//! (the GPU with `irq=msi`, which hot-plug scenarios use).

use crate::e1::setup_failure;
use crate::gpu;
use crate::ktap::{Ktap, Outcome};
use crate::pci;
use crate::sys;
use crate::vdev::{self, bind_and_open, enable_command, release_and_report, Binding, Vfio};
use crate::vfio;
use pcisim_guest_wire::{DeviceIds, E3Options};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const MSIX_MIN_VECTORS: u32 = 16;
const IRQ_TIMEOUT: Duration = Duration::from_secs(5);
/// `VFIO_PCI_MSI_IRQ_INDEX` (after INTx, before MSI-X).
pub const VFIO_PCI_MSI_IRQ_INDEX: u32 = 1;
const PCI_CAP_ID_MSI: u8 = 0x05;
/// MSI Message Control: MSI Enable.
const PCI_MSI_FLAGS_ENABLE: u16 = 1 << 0;

/// Which message interrupts the program drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqMode {
    Msix,
    Msi,
}

impl IrqMode {
    /// The mode an `--irq` option names.
    pub fn of(w: pcisim_guest_wire::IrqMode) -> IrqMode {
        match w {
            pcisim_guest_wire::IrqMode::Msix => IrqMode::Msix,
            pcisim_guest_wire::IrqMode::Msi => IrqMode::Msi,
        }
    }

    /// The prefix of the KTAP test names (`msix-enable`, `msi-vector-5`, ...).
    fn prefix(self) -> &'static str {
        match self {
            IrqMode::Msix => "msix",
            IrqMode::Msi => "msi",
        }
    }

    /// The `/proc/interrupts` action name vfio-pci gives `vector` of `bdf`.
    pub fn irq_name(self, vector: u32, bdf: &str) -> String {
        match self {
            IrqMode::Msix => msix_irq_name(vector, bdf),
            IrqMode::Msi => msi_irq_name(vector, bdf),
        }
    }

    pub fn index(self) -> u32 {
        match self {
            IrqMode::Msix => vfio::VFIO_PCI_MSIX_IRQ_INDEX,
            IrqMode::Msi => VFIO_PCI_MSI_IRQ_INDEX,
        }
    }
}

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

/// The `/proc/interrupts` action name vfio-pci gives an MSI vector.
pub fn msi_irq_name(vector: u32, bdf: &str) -> String {
    format!("vfio-msi[{vector}]({bdf})")
}

fn read_proc_interrupts() -> Result<String, String> {
    std::fs::read_to_string("/proc/interrupts").map_err(|e| format!("read /proc/interrupts: {e}"))
}

/// The function's MSI Message Control as the guest kernel sees it (sysfs `config`, i.e. the
/// register QEMU emulates), and the capability's offset.
pub fn msi_control(bdf: &str) -> Result<(u16, u16), String> {
    let path = format!("/sys/bus/pci/devices/{bdf}/config");
    let f = File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
    let mut cfg = vec![0u8; 256];
    f.read_exact_at(&mut cfg, 0)
        .map_err(|e| format!("read {path}: {e}"))?;
    let cap = pci::walk_capabilities(&cfg)
        .caps
        .iter()
        .find(|c| c.id == PCI_CAP_ID_MSI)
        .map(|c| c.offset)
        .ok_or_else(|| format!("{bdf} has no MSI capability"))?;
    let at = usize::from(cap) + 2;
    Ok((cap, u16::from_le_bytes([cfg[at], cfg[at + 1]])))
}

/// MSI Multiple Message Enable: log2 of the vectors the kernel gave the function.
pub fn msi_mme(control: u16) -> u32 {
    u32::from((control >> 4) & 7)
}

/// Binds MSI through vfio-pci (`VFIO_PCI_MSI_IRQ_INDEX`): one eventfd per vector, for as many
/// vectors as the capability offers (GET_IRQ_INFO: Multiple Message Capable), or one if the
/// kernel cannot allocate that many. vfio-pci enables MSI only if it gets every vector asked
/// for, and otherwise returns the number it could have had (a positive value, not an error;
/// x86 allocates several MSI vectors only with interrupt remapping), so whether it worked is
/// read from `/proc/interrupts`: each bound vector has a `vfio-msi[V](<bdf>)` line. Returns
/// the eventfds by vector.
pub fn msi_eventfds(v: &Vfio, bdf: &str, k: &mut Ktap) -> Result<BTreeMap<u32, File>, String> {
    let info = v.device.irq_info(VFIO_PCI_MSI_IRQ_INDEX)?;
    k.diag(&format!(
        "MSI irq info: count {} flags 0x{:x}",
        info.count, info.flags
    ));
    if info.count == 0 {
        return Err("MSI irq count 0: the function has no MSI capability".into());
    }
    if info.flags & vfio::VFIO_IRQ_INFO_EVENTFD == 0 {
        return Err(format!("MSI irq flags 0x{:x} lack EVENTFD", info.flags));
    }
    let mut tries = vec![info.count];
    if info.count > 1 {
        tries.push(1);
    }
    for n in tries {
        let mut fds = BTreeMap::new();
        for vec in 0..n {
            fds.insert(vec, sys::eventfd()?);
        }
        let raw: Vec<i32> = fds.values().map(|f| f.as_raw_fd()).collect();
        v.device
            .set_irqs_eventfds(VFIO_PCI_MSI_IRQ_INDEX, 0, &raw)?;
        let text = read_proc_interrupts()?;
        let bound = (0..n)
            .filter(|&i| interrupt_count(&text, &msi_irq_name(i, bdf)).is_some())
            .count() as u32;
        if bound == n {
            k.diag(&format!(
                "SET_IRQS(MSI, count {n}): {n} vfio-msi vector(s) in /proc/interrupts"
            ));
            return Ok(fds);
        }
        if bound != 0 {
            return Err(format!(
                "SET_IRQS(MSI, count {n}) left {bound} of {n} vfio-msi lines in /proc/interrupts"
            ));
        }
        k.diag(&format!(
            "SET_IRQS(MSI, count {n}) enabled nothing (no vfio-msi line): the kernel cannot \
             allocate {n} MSI vectors here"
        ));
    }
    Err("SET_IRQS(MSI, count 1) enabled no vector: no vfio-msi line in /proc/interrupts".into())
}

/// Eventfds per tested vector.
struct Irqs {
    mode: IrqMode,
    fds: BTreeMap<u32, File>,
    baseline: String,
    /// MSI: the vectors the function may send (2^MME); a doorbell for vector `v` goes out as
    /// `v mod` this. MSI-X: `u32::MAX` (no folding).
    fold: u32,
}

impl Irqs {
    /// The vector whose eventfd a doorbell for `vector` fires.
    fn target(&self, vector: u32) -> u32 {
        vector % self.fold
    }
}

fn enable_msix(v: &Vfio, vectors: &[u32], k: &mut Ktap) -> Result<Irqs, String> {
    let fds = vdev::msix_eventfds(v, vectors, MSIX_MIN_VECTORS, k)?;
    let baseline = read_proc_interrupts()?;
    Ok(Irqs {
        mode: IrqMode::Msix,
        fds,
        baseline,
        fold: u32::MAX,
    })
}

/// MSI: binds every vector the kernel gives (see [`msi_eventfds`]), then checks the emulated
/// capability: MSI Enable set and 2^MME = the vectors bound. Every tested doorbell must be a
/// vector the capability offers.
fn enable_msi(v: &Vfio, bdf: &str, vectors: &[u32], k: &mut Ktap) -> Result<Irqs, String> {
    // The baseline comes first: the lines appear with the vectors.
    let baseline = read_proc_interrupts()?;
    let fds = msi_eventfds(v, bdf, k)?;
    let capable = v.device.irq_info(VFIO_PCI_MSI_IRQ_INDEX)?.count;
    if let Some(&max) = vectors.iter().max() {
        if max >= capable {
            return Err(format!(
                "vector {max} out of range (the MSI capability offers {capable})"
            ));
        }
    }
    let (cap, control) = msi_control(bdf)?;
    let mme = msi_mme(control);
    k.diag(&format!(
        "MSI capability at 0x{cap:02x}: Message Control 0x{control:04x} (enable {}, \
         {} vector(s) enabled of {capable})",
        control & PCI_MSI_FLAGS_ENABLE,
        1u32 << mme
    ));
    if control & PCI_MSI_FLAGS_ENABLE == 0 {
        return Err(format!(
            "MSI Enable is clear after SET_IRQS (Message Control 0x{control:04x})"
        ));
    }
    if 1usize << mme != fds.len() {
        return Err(format!(
            "Multiple Message Enable {mme} ({} vectors) but {} vector(s) bound",
            1u32 << mme,
            fds.len()
        ));
    }
    Ok(Irqs {
        mode: IrqMode::Msi,
        fds,
        baseline,
        fold: 1 << mme,
    })
}

fn ring_vector(v: &Vfio, irqs: &mut Irqs, vector: u32, k: &mut Ktap) -> Result<(), String> {
    let target = irqs.target(vector);
    // Anything already pending is reported and cleared, not counted.
    for (vec, f) in irqs.fds.iter_mut() {
        let n = sys::eventfd_take(f)?;
        if n != 0 {
            k.diag(&format!(
                "eventfd of vector {vec} had count {n} before ringing vector {vector}"
            ));
        }
    }
    let count_before = v.device.read_u32(&v.bar0, gpu::IRQ_COUNT)?;
    let t0 = Instant::now();
    v.device.write_u32(&v.bar0, gpu::IRQ_DOORBELL, vector)?;
    let f = irqs
        .fds
        .get_mut(&target)
        .ok_or_else(|| format!("no eventfd for vector {target}"))?;
    let fired = sys::wait_readable(f.as_fd(), IRQ_TIMEOUT)?;
    let latency = t0.elapsed();
    let count_after = v.device.read_u32(&v.bar0, gpu::IRQ_COUNT)?;
    let last_error = v.device.read_u32(&v.bar0, gpu::IRQ_LAST_ERROR)?;
    if !fired {
        return Err(format!(
            "no interrupt within {}s (IRQ_COUNT {count_before} -> {count_after}, IRQ_LAST_ERROR {last_error})",
            IRQ_TIMEOUT.as_secs()
        ));
    }
    let n = sys::eventfd_take(f)?;
    let via = if target == vector {
        String::new()
    } else {
        format!(
            " (sent as vector {target}: {} vector(s) enabled)",
            irqs.fold
        )
    };
    k.diag(&format!(
        "vector {vector}{via}: eventfd count {n} after {} us; IRQ_COUNT {count_before} -> {count_after}",
        latency.as_micros()
    ));
    let mut errs = Vec::new();
    if n != 1 {
        errs.push(format!("eventfd count {n}, expected exactly 1"));
    }
    // Give a stray interrupt a moment to show up on another vector.
    std::thread::sleep(Duration::from_millis(50));
    for (other, f) in irqs.fds.iter_mut() {
        if *other == target {
            let extra = sys::eventfd_take(f)?;
            if extra != 0 {
                errs.push(format!("vector {target} fired {extra} more time(s)"));
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
    // MSI binds every vector the kernel gave (16 with interrupt remapping): the ones not rung
    // and still at 0 are summed up in one line.
    let mut quiet = 0;
    for &vec in irqs.fds.keys() {
        let name = irqs.mode.irq_name(vec, bdf);
        let before = interrupt_count(&irqs.baseline, &name);
        let after = interrupt_count(&now, &name);
        if irqs.mode == IrqMode::Msi && !delivered.contains(&vec) && after == Some(0) {
            quiet += 1;
            continue;
        }
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
    if quiet > 0 {
        k.diag(&format!(
            "{quiet} other vfio-msi vector(s) of {bdf} listed, count 0"
        ));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

/// E3's subtests, in order: `vfio-bind vfio-open command-enable {msix,msi}-enable`, one
/// `{msix,msi}-vector-N` per vector, `proc-interrupts {msix,msi}-quiet vfio-release`.
fn subtests(mode: IrqMode, vectors: &[u32]) -> Vec<Cow<'static, str>> {
    let p = mode.prefix();
    let mut names: Vec<Cow<'static, str>> = vec![
        "vfio-bind".into(),
        "vfio-open".into(),
        "command-enable".into(),
        format!("{p}-enable").into(),
    ];
    names.extend(
        vectors
            .iter()
            .map(|v| Cow::Owned(format!("{p}-vector-{v}"))),
    );
    names.extend([
        "proc-interrupts".into(),
        format!("{p}-quiet").into(),
        "vfio-release".into(),
    ]);
    names
}

/// The vectors to ring: `--vectors` (default 0, 1, 5), not empty, none twice.
fn vectors(given: Option<Vec<u32>>) -> Result<Vec<u32>, String> {
    let v = given.unwrap_or_else(|| vec![0, 1, 5]);
    if v.is_empty() {
        return Err("empty vector list".into());
    }
    if let Some(d) = v.iter().enumerate().find(|(i, x)| v[..*i].contains(x)) {
        return Err(format!("vector {} listed twice", d.1));
    }
    Ok(v)
}

pub fn run(ids: DeviceIds, o: E3Options) -> i32 {
    let prepared = (|| -> Result<_, String> {
        let vectors = vectors(o.vectors)?;
        let mode = IrqMode::of(o.irq.unwrap_or(pcisim_guest_wire::IrqMode::Msix));
        let (func, note) = pci::select_function(ids.vendor, ids.device, o.bdf.as_deref())?;
        Ok((func, note, vectors, mode))
    })();
    let (func, note, vectors, mode) = match prepared {
        Ok(p) => p,
        Err(e) => return setup_failure(&e),
    };
    let p = mode.prefix();

    let mut k = Ktap::declared_names(subtests(mode, &vectors));
    k.diag(&format!(
        "E3 {} through guest vfio-pci on {}, vectors {:?}",
        match mode {
            IrqMode::Msix => "MSI-X",
            IrqMode::Msi => "MSI",
        },
        func.bdf,
        vectors
    ));
    if let Some(n) = note {
        k.diag(&n);
    }
    let mut binding = Binding::default();
    let skip = |why: &str| Outcome::Skip(format!("{why} failed"));

    let vfio = bind_and_open(&func, &mut binding, &mut k, |_| Ok(()));

    let mut cmd_ok = false;
    match &vfio {
        Some(v) => {
            let r = enable_command(v, &mut k);
            cmd_ok = k.check("command-enable", r);
        }
        None => k.result("command-enable", skip("vfio-open")),
    }

    let enable_name = format!("{p}-enable");
    let mut irqs = None;
    match &vfio {
        Some(v) if cmd_ok => {
            let r = match mode {
                IrqMode::Msix => enable_msix(v, &vectors, &mut k),
                IrqMode::Msi => enable_msi(v, &func.bdf, &vectors, &mut k),
            };
            match r {
                Ok(i) => {
                    irqs = Some(i);
                    k.result(&enable_name, Outcome::Pass);
                }
                Err(e) => k.result(&enable_name, Outcome::Fail(e)),
            }
        }
        _ => k.result(&enable_name, skip("command-enable")),
    }

    let mut delivered = Vec::new();
    for &vec in &vectors {
        let name = format!("{p}-vector-{vec}");
        match (&vfio, &mut irqs) {
            (Some(v), Some(i)) => {
                let target = i.target(vec);
                let r = ring_vector(v, i, vec, &mut k);
                if k.check(&name, r) {
                    delivered.push(target);
                }
            }
            _ => k.result(&name, skip(&enable_name)),
        }
    }

    match &irqs {
        Some(i) => {
            let r = check_proc_interrupts(&func.bdf, i, &delivered, &mut k);
            k.check("proc-interrupts", r);
        }
        None => k.result("proc-interrupts", skip(&enable_name)),
    }

    // Spurious-interrupt check over the whole run: the eventfds must be quiet
    // now (every delivered interrupt was consumed above).
    let quiet_name = format!("{p}-quiet");
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
                k.result(&quiet_name, Outcome::Pass);
            } else {
                k.result(
                    &quiet_name,
                    Outcome::Fail(format!("unexpected interrupts: {}", stray.join(", "))),
                );
            }
        }
        None => k.result(&quiet_name, skip(&enable_name)),
    }

    let mut errs = Vec::new();
    let msix_on = mode == IrqMode::Msix && irqs.is_some();
    // vdev::release tears down MSI-X only. MSI may also be on after a failed check that came
    // after SET_IRQS (and vfio-pci refuses to disable what is not enabled): its lines say.
    let msi_on = mode == IrqMode::Msi
        && read_proc_interrupts().map_or(irqs.is_some(), |t| {
            interrupt_count(&t, &msi_irq_name(0, &func.bdf)).is_some()
        });
    if msi_on {
        if let Some(Err(e)) = vfio.as_ref().map(|v| v.device.disable_irqs(mode.index())) {
            errs.push(e);
        }
    }
    release_and_report(&func, &binding, vfio, msix_on, errs, &mut k);
    drop(irqs);
    k.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_lists() {
        assert_eq!(vectors(None).unwrap(), vec![0, 1, 5]);
        assert_eq!(vectors(Some(vec![3])).unwrap(), vec![3]);
        assert!(vectors(Some(vec![])).is_err());
        assert!(vectors(Some(vec![1, 2, 1])).is_err());
    }

    #[test]
    fn declared_subtests_follow_mode_and_vectors() {
        let names: Vec<String> = subtests(IrqMode::Msi, &[0, 1, 5])
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "vfio-bind",
                "vfio-open",
                "command-enable",
                "msi-enable",
                "msi-vector-0",
                "msi-vector-1",
                "msi-vector-5",
                "proc-interrupts",
                "msi-quiet",
                "vfio-release"
            ]
        );
        assert_eq!(subtests(IrqMode::Msix, &[2]).len(), 8);
        assert_eq!(subtests(IrqMode::Msix, &[2])[4], "msix-vector-2");
    }

    const PROC: &str = "\
            CPU0       CPU1
   0:         36          0   IO-APIC   2-edge      timer
  24:          3          2   PCI-MSIX-0000:01:00.0   0-edge      vfio-msix[0](0000:01:00.0)
  25:          0          0   PCI-MSIX-0000:01:00.0   1-edge      vfio-msix[1](0000:01:00.0)
  26:          7          0   PCI-MSIX-0000:01:00.0   5-edge      vfio-msix[5](0000:01:00.0)
  27:          1          0   PCI-MSIX-0000:02:00.0   0-edge      vfio-msix[0](0000:02:00.0)
  28:          4          0   PCI-MSI-0000:03:00.0   0-edge      vfio-msi[0](0000:03:00.0)
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
        assert_eq!(
            interrupt_count(PROC, &msi_irq_name(0, "0000:03:00.0")),
            Some(4)
        );
        assert_eq!(
            interrupt_count(PROC, &IrqMode::Msi.irq_name(0, "0000:03:00.0")),
            Some(4)
        );
        assert_eq!(
            interrupt_count(PROC, &msi_irq_name(1, "0000:03:00.0")),
            None
        );
    }

    #[test]
    fn msi_control_fields() {
        // Enable, 64-bit, per-vector masking, MMC 16, MME 1 vector / 16 vectors.
        assert_eq!(msi_mme(0x0189), 0);
        assert_eq!(msi_mme(0x01c9), 4);
        assert_eq!(IrqMode::of(pcisim_guest_wire::IrqMode::Msi), IrqMode::Msi);
        assert_eq!(IrqMode::of(pcisim_guest_wire::IrqMode::Msix), IrqMode::Msix);
        assert_eq!(IrqMode::Msi.index(), 1);
        assert_eq!(IrqMode::Msix.index(), vfio::VFIO_PCI_MSIX_IRQ_INDEX);
    }
}
