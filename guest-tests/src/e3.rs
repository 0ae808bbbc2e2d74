//! E3: MSI-X delivery through a guest vfio userspace driver (vfio-pci, legacy
//! container/group API, type1v2 IOMMU behind the vIOMMU).

use crate::args::{self, Args};
use crate::e1::setup_failure;
use crate::gpu;
use crate::ktap::{Ktap, Outcome};
use crate::pci;
use crate::sys;
use crate::vdev::{self, bind, enable_command, open_vfio, release, Binding, Vfio};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

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

/// Eventfds per tested vector.
struct Irqs {
    fds: BTreeMap<u32, File>,
    baseline: String,
}

fn enable_msix(v: &Vfio, vectors: &[u32], k: &mut Ktap) -> Result<Irqs, String> {
    let fds = vdev::msix_eventfds(v, vectors, MSIX_MIN_VECTORS, k)?;
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
}
