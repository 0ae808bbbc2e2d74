//! `reset-vfio`: a function reset while a guest vfio userspace driver owns the device with
//! MSI-X live (R1, R6).
//!
//! The driver binds the device to vfio-pci, enables memory and bus mastering, binds eventfds to
//! MSI-X vectors 0-3 and checks that a vector rung through the IRQ doorbell fires; it dirties
//! BAR0 registers, then resets the function with `--op`:
//!
//! - `sysfs-flr`: `reset_method` = `flr`, `reset` = 1 in sysfs while the device is open (the
//!   kernel saves config space, FLRs, waits, restores config space including MSI-X);
//! - `ioctl`: `VFIO_DEVICE_RESET` on the device fd (vfio-pci's `pci_try_reset_function`: the
//!   first of the function's reset methods that works).
//!
//! Afterwards the registers must be back at their defaults, Command still enable memory and
//! bus mastering (restored by the kernel), every vector still deliver, and (`--ring on`) the
//! command ring run a FILL and a fence with its interrupt. Vector 2 is rung just before the
//! reset and vector 3 first after it, so the device's journal brackets the reset between
//! their `interrupt` records (the host checks the kind of the one reset between them).

use crate::e1::setup_failure;
use crate::gpu;
use crate::ktap::{Ktap, Outcome};
use crate::pci::{self, Function};
use crate::reset::{check_dirty_state, dirty_set, kmsg_last_seq, kmsg_since};
use crate::ringdrv::{self, RingDrv};
use crate::sys;
use crate::vdev::{
    self, bind_and_open, enable_command, read_reg, release, wait_eventfd, write_reg, Binding,
    DmaBuffer, Vfio, PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY,
};
use crate::vfio;
use pcisim_guest_wire::{DeviceIds, OnOff, ResetVfioOptions, VfioResetOp};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// The vectors with eventfds: 0 fence, 1 ring error, 2 the marker before the reset, 3 after.
pub const VECTORS: [u32; 4] = [0, 1, 2, 3];
/// Rung just before the reset.
pub const MARK_BEFORE: u32 = 2;
/// Rung first after the reset.
pub const MARK_AFTER: u32 = 3;
const IRQ_TIMEOUT: Duration = Duration::from_secs(5);
const IOVA_BASE: u64 = 0x2000_0000;
const RING_IOVA: u64 = IOVA_BASE;
const FENCE_IOVA: u64 = IOVA_BASE + 0x1000;
const DATA_IOVA: u64 = IOVA_BASE + 0x10_0000;
const DATA_LEN: usize = 0x1_0000;
const FILL_PATTERN: u32 = 0x5EED_F111;
const FENCE_VALUE: u64 = 0xF1F0_0000_0000_0001;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    SysfsFlr,
    Ioctl,
}

/// Sets Memory Space and Bus Master and binds an eventfd to each of [`VECTORS`], reporting
/// `enable` (skipped when `vfio-open` failed, `vfio` None); the eventfds by vector. Shared
/// with the FLR-with-DMA scenario (resetdma).
pub fn enable_vectors(vfio: Option<&Vfio>, k: &mut Ktap) -> Option<BTreeMap<u32, File>> {
    let Some(v) = vfio else {
        k.result("enable", Outcome::Skip("vfio-open failed".to_string()));
        return None;
    };
    let r = enable_command(v, k)
        .and_then(|()| vdev::msix_eventfds(v, &VECTORS, VECTORS.len() as u32, k));
    k.check_value("enable", r)
}

/// Rings `vector` through the IRQ doorbell and checks that exactly its eventfd fires once.
pub fn ring_vector(
    v: &Vfio,
    fds: &mut BTreeMap<u32, File>,
    vector: u32,
    k: &mut Ktap,
) -> Result<(), String> {
    for f in fds.values_mut() {
        sys::eventfd_take(f)?;
    }
    let before = read_reg(v, gpu::IRQ_COUNT)?;
    let t0 = Instant::now();
    write_reg(v, gpu::IRQ_DOORBELL, vector)?;
    let f = fds
        .get_mut(&vector)
        .ok_or_else(|| format!("no eventfd for vector {vector}"))?;
    let fired = sys::wait_readable(f.as_fd(), IRQ_TIMEOUT)?;
    let us = t0.elapsed().as_micros();
    let after = read_reg(v, gpu::IRQ_COUNT)?;
    let last_error = read_reg(v, gpu::IRQ_LAST_ERROR)?;
    if !fired {
        return Err(format!(
            "vector {vector}: no interrupt within {} s (IRQ_COUNT {before} -> {after}, IRQ_LAST_ERROR {last_error})",
            IRQ_TIMEOUT.as_secs()
        ));
    }
    let n = sys::eventfd_take(f)?;
    std::thread::sleep(Duration::from_millis(50));
    let mut errs = Vec::new();
    if n != 1 {
        errs.push(format!("vector {vector} fired {n} times"));
    }
    for (other, f) in fds.iter_mut() {
        let m = sys::eventfd_take(f)?;
        if m != 0 {
            errs.push(format!("vector {other} fired {m} more time(s)"));
        }
    }
    if after != before.wrapping_add(1) {
        errs.push(format!("IRQ_COUNT {before} -> {after}, expected +1"));
    }
    k.diag(&format!(
        "vector {vector}: eventfd after {us} us, IRQ_COUNT {before} -> {after}"
    ));
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

fn dirty(v: &Vfio) -> Result<(), String> {
    for (off, val, _) in dirty_set() {
        write_reg(v, off, val)?;
    }
    check_dirty_state(false, |off| read_reg(v, off)).map_err(|e| format!("before the reset: {e}"))
}

fn do_reset(func: &Function, v: &Vfio, op: Op) -> Result<Duration, String> {
    match op {
        Op::SysfsFlr => {
            func.write_attr("reset_method", "flr")?;
            let t0 = Instant::now();
            let r = func.write_attr("reset", "1");
            let took = t0.elapsed();
            r.map(|()| took)
        }
        Op::Ioctl => {
            let t0 = Instant::now();
            v.device.reset()?;
            Ok(t0.elapsed())
        }
    }
}

/// After the reset: the ring set up again, a FILL and a fence with its interrupt.
fn ring_after(v: &Vfio, fds: &mut BTreeMap<u32, File>, k: &mut Ktap) -> Result<(), String> {
    let ringbuf = DmaBuffer::map(&v.container, RING_IOVA, 4096)?;
    let fence = DmaBuffer::map(&v.container, FENCE_IOVA, 4096)?;
    let data = DmaBuffer::map(&v.container, DATA_IOVA, DATA_LEN)?;
    data.fill(0, DATA_LEN, 0xEE)?;
    let mut ring = RingDrv::setup(v, ringbuf, 16, 0, 1, k)?;
    ring.push_fill_and_fence(
        1,
        DATA_IOVA,
        FILL_PATTERN,
        DATA_LEN as u64,
        FENCE_IOVA,
        FENCE_VALUE,
    )?;
    for f in fds.values_mut() {
        sys::eventfd_take(f)?;
    }
    let t0 = Instant::now();
    ring.doorbell(v)?;
    let f = fds.get_mut(&0).ok_or("no eventfd for vector 0")?;
    let n = wait_eventfd(f, IRQ_TIMEOUT)?;
    let st = ringdrv::state(v)?;
    k.diag(&format!(
        "FILL {DATA_LEN:#x} bytes + WRITE_FENCE: fence interrupt after {} ms; {st}",
        t0.elapsed().as_millis()
    ));
    if n == 0 {
        return Err(format!("no fence interrupt: {st}"));
    }
    let got = fence.read_u64(0)?;
    if got != FENCE_VALUE {
        return Err(format!("fence 0x{got:x}, expected 0x{FENCE_VALUE:x}"));
    }
    let want = gpu::fill32(FILL_PATTERN, DATA_LEN);
    let have = data.read(0, DATA_LEN)?;
    if let Some(i) = have.iter().zip(&want).position(|(a, b)| a != b) {
        return Err(format!("FILL data differs at +0x{i:x}"));
    }
    // Stop the ring before the buffers go away.
    ring.reset(v)?;
    Ok(())
}

/// The subtests, in the order they are reported: the reset is named after its operation
/// (`reset-<op>`); `irq-after-3` rings [`MARK_AFTER`].
const SUBTESTS: &[&str] = &[
    "vfio-bind",
    "vfio-open",
    "enable",
    "irq-before",
    "dirty",
    "reset-*",
    "state-cleared",
    "config-restored",
    "irq-after-3",
    "irq-after-0",
    "irq-after-1",
    "ring-after",
    "vfio-release",
];

pub fn run(ids: DeviceIds, o: ResetVfioOptions) -> i32 {
    let prepared = (|| -> Result<_, String> {
        let op = match o.op {
            VfioResetOp::SysfsFlr => Op::SysfsFlr,
            VfioResetOp::Ioctl => Op::Ioctl,
        };
        let ring = o.ring.unwrap_or(OnOff::Off).is_on();
        let (func, note) = pci::select_function(ids.vendor, ids.device, o.bdf.as_deref())?;
        Ok((func, note, op, ring))
    })();
    let (func, note, op, with_ring) = match prepared {
        Ok(p) => p,
        Err(e) => return setup_failure(&e),
    };
    let op_name = match op {
        Op::SysfsFlr => "sysfs-flr",
        Op::Ioctl => "vfio-device-reset",
    };
    let mut k = Ktap::declared(SUBTESTS);
    k.diag(&format!(
        "{op_name} of {} while a guest vfio driver owns it with MSI-X live",
        func.bdf
    ));
    if let Some(n) = note {
        k.diag(&n);
    }
    let original_methods = func.read_attr("reset_method").map(|s| s.trim().to_string());
    if let Ok(m) = &original_methods {
        k.diag(&format!("reset_method: {m}"));
    }
    let mut binding = Binding::default();
    let skip = |why: &str| Outcome::Skip(format!("{why} failed"));

    let vfio = bind_and_open(&func, &mut binding, &mut k, |v| {
        let info = v.device.info()?;
        if op == Op::Ioctl && info.flags & vfio::VFIO_DEVICE_FLAGS_RESET == 0 {
            return Err(format!(
                "device flags 0x{:x} lack VFIO_DEVICE_FLAGS_RESET: the kernel found no reset method",
                info.flags
            ));
        }
        Ok(())
    });

    let mut fds = enable_vectors(vfio.as_ref(), &mut k);

    // Everything below needs the open device and its eventfds.
    let ready = vfio.as_ref().zip(fds.as_mut());
    let mut reset_done = false;
    if let Some((v, fds)) = ready {
        let r = ring_vector(v, fds, MARK_BEFORE, &mut k);
        k.check("irq-before", r);
        let r = dirty(v);
        k.check("dirty", r);
        let kmsg_start = kmsg_last_seq();
        match do_reset(&func, v, op) {
            Ok(took) => {
                reset_done = true;
                k.diag(&format!(
                    "latency_ms {op_name} {:.1}",
                    took.as_secs_f64() * 1000.0
                ));
                k.result(&format!("reset-{op_name}"), Outcome::Pass);
            }
            Err(e) => k.result(&format!("reset-{op_name}"), Outcome::Fail(e)),
        }
        for l in kmsg_since(kmsg_start, &func.bdf) {
            k.diag(&format!("kmsg: {l}"));
        }
        let r = check_dirty_state(true, |off| read_reg(v, off)).and_then(|()| {
            let n = read_reg(v, gpu::IRQ_COUNT)?;
            if n == 0 {
                Ok(())
            } else {
                Err(format!("IRQ_COUNT {n} after the reset, expected 0"))
            }
        });
        k.check("state-cleared", r);
        let r = v.device.read_u16(&v.config, PCI_COMMAND).and_then(|c| {
            k.diag(&format!("Command after the reset: 0x{c:04x}"));
            let want = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
            if c & want == want {
                Ok(())
            } else {
                Err(format!(
                    "Command 0x{c:04x}: memory/bus master not restored by the kernel"
                ))
            }
        });
        k.check("config-restored", r);
        let r = ring_vector(v, fds, MARK_AFTER, &mut k);
        k.check(&format!("irq-after-{MARK_AFTER}"), r);
        let r = ring_vector(v, fds, 0, &mut k);
        k.check("irq-after-0", r);
        let r = ring_vector(v, fds, 1, &mut k);
        k.check("irq-after-1", r);
        if with_ring {
            let r = ring_after(v, fds, &mut k);
            k.check("ring-after", r);
        } else {
            k.result("ring-after", Outcome::Skip("--ring off".into()));
        }
    } else {
        for name in [
            "irq-before",
            "dirty",
            &format!("reset-{op_name}"),
            "state-cleared",
            "config-restored",
            &format!("irq-after-{MARK_AFTER}"),
            "irq-after-0",
            "irq-after-1",
            "ring-after",
        ] {
            k.result(name, skip("enable"));
        }
    }

    if op == Op::SysfsFlr && reset_done {
        if let Ok(m) = &original_methods {
            if let Err(e) = func.write_attr("reset_method", m) {
                k.diag(&format!("restoring reset_method {m:?}: {e}"));
            }
        }
    }
    let irqs_on = fds.is_some();
    let r = release(&func, &binding, vfio, irqs_on);
    drop(fds);
    k.check("vfio-release", r);
    k.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ktap::declared_name_matches;

    #[test]
    fn declared_names_follow_the_constants() {
        // The declaration spells the vector out; the program formats it from MARK_AFTER.
        assert!(declared_name_matches(
            SUBTESTS[8],
            &format!("irq-after-{MARK_AFTER}")
        ));
        assert!(declared_name_matches(
            SUBTESTS[5],
            "reset-vfio-device-reset"
        ));
    }
}
