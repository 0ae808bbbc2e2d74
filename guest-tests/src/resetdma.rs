//! `reset-dma`: an FLR while the GPU's command ring moves data into guest memory (R2, R2b).
//!
//! A guest vfio driver maps a destination buffer through the vIOMMU, submits three long FILLs
//! into it followed by a WRITE_FENCE with its interrupt, rings the doorbell and reads Device Status:
//! Transactions Pending must be set (the engine is working). Then it resets the function:
//!
//! - `--mode correct`: `VFIO_DEVICE_RESET`, i.e. the kernel's FLR path — it clears Bus Master
//!   Enable (the fill's next access is refused and the engine stops), waits for Transactions
//!   Pending to clear, then initiates the FLR and restores config space. Nothing lands after the
//!   reset; the fence never runs.
//! - `--mode buggy`: a driver bug — Device Control "Initiate FLR" written straight into config
//!   space (sysfs `config`, like `setpci`: vfio-pci's own config region would turn the write
//!   into the kernel's FLR path) with Bus Master on and Transactions Pending set. The writes the
//!   device has in flight land after the reset began; the device's journal reports them
//!   (`dma_during_reset`), which is what the scenario expects. The program then restores the
//!   Command register itself.
//!
//! Vector 2 is rung just before the doorbell and vector 3 after the reset, so the device's
//! journal brackets the FLR between their `interrupt` records.

use crate::e1::setup_failure;
use crate::ktap::{Ktap, Outcome};
use crate::pci::{self, walk_capabilities};
use crate::resetvfio::{enable_vectors, ring_vector, MARK_AFTER, MARK_BEFORE};
use crate::ringdrv::{self, RingDrv};
use crate::vdev::{
    self, bind_and_open, release, Binding, DmaBuffer, Vfio, PCI_COMMAND, PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
};
use pcisim_guest_wire::{DeviceIds, ResetDmaMode, ResetDmaOptions};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const IOVA_BASE: u64 = 0x3000_0000;
const RING_IOVA: u64 = IOVA_BASE;
const FENCE_IOVA: u64 = IOVA_BASE + 0x1000;
const DST_IOVA: u64 = IOVA_BASE + 0x100_0000;
/// The largest FILL (the ring's MAX_LEN), three times: long enough (tens of ms even with a
/// release build of the server) for the guest to see Transactions Pending and act while it runs.
const DEFAULT_LEN: usize = 64 << 20;
const FILLS: usize = 3;
const FILL_PATTERN: u32 = 0xF1F1_D0D0;
const FENCE_VALUE: u64 = 0xF1D0_0000_0000_0002;
const SENTINEL: u8 = 0xEE;
const PCI_CAP_ID_EXP: u8 = 0x10;
const PCI_EXP_DEVCTL: u64 = 0x08;
const PCI_EXP_DEVSTA: u64 = 0x0a;
const PCI_EXP_DEVCTL_BCR_FLR: u16 = 1 << 15;
const PCI_EXP_DEVSTA_TRPND: u16 = 1 << 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Correct,
    Buggy,
}

/// The PCIe capability's offset, from sysfs `config`.
fn pcie_cap(cfg_path: &std::path::Path) -> Result<u64, String> {
    let f = File::open(cfg_path).map_err(|e| format!("open {}: {e}", cfg_path.display()))?;
    let mut cfg = vec![0u8; 256];
    f.read_exact_at(&mut cfg, 0)
        .map_err(|e| format!("read {}: {e}", cfg_path.display()))?;
    walk_capabilities(&cfg)
        .caps
        .iter()
        .find(|c| c.id == PCI_CAP_ID_EXP)
        .map(|c| u64::from(c.offset))
        .ok_or_else(|| "no PCI Express capability".to_string())
}

/// How many bytes of `buf` hold the FILL pattern (the rest must still be the sentinel).
fn filled_bytes(buf: &DmaBuffer, len: usize) -> Result<(usize, usize), String> {
    let data = buf.read(0, len)?;
    let pat = FILL_PATTERN.to_le_bytes();
    let mut filled = 0;
    for (i, chunk) in data.chunks(4).enumerate() {
        if chunk == pat {
            filled += 4;
        } else if chunk.iter().any(|&b| b != SENTINEL) {
            return Err(format!(
                "word at +0x{:x} is {chunk:02x?}: neither the pattern nor the sentinel",
                i * 4
            ));
        }
    }
    Ok((filled, len - filled))
}

struct Run {
    ring: RingDrv,
    fence: DmaBuffer,
    dst: DmaBuffer,
}

fn submit(v: &Vfio, len: usize, k: &mut Ktap) -> Result<Run, String> {
    let t0 = Instant::now();
    let ringbuf = DmaBuffer::map(&v.container, RING_IOVA, 4096)?;
    let fence = DmaBuffer::map(&v.container, FENCE_IOVA, 4096)?;
    let dst = DmaBuffer::map(&v.container, DST_IOVA, len)?;
    dst.fill(0, len, SENTINEL)?;
    k.diag(&format!(
        "mapped ring, fence and a {len:#x}-byte destination through the vIOMMU in {} ms",
        t0.elapsed().as_millis()
    ));
    let mut ring = RingDrv::setup(v, ringbuf, 16, 0, 1, k)?;
    ring.push_fill_and_fence(
        FILLS,
        DST_IOVA,
        FILL_PATTERN,
        len as u64,
        FENCE_IOVA,
        FENCE_VALUE,
    )?;
    Ok(Run { ring, fence, dst })
}

/// Rings the doorbell and reads Device Status through the vfio config region: Transactions
/// Pending must be set while the fill runs. Device Status is read until it says so or the job
/// is over: the device's engine is a host thread that a loaded host may not run for a few
/// milliseconds after the doorbell (a real device's first descriptor fetch follows within
/// nanoseconds); a job that completes without Transactions Pending ever being seen fails.
fn doorbell_and_tp(v: &Vfio, run: &Run, pcie: u64, k: &mut Ktap) -> Result<Instant, String> {
    let t0 = Instant::now();
    run.ring.doorbell(v)?;
    let deadline = t0 + Duration::from_secs(10);
    let mut reads = 0u32;
    let (devsta, tp) = loop {
        let devsta = v.device.read_u16(&v.config, pcie + PCI_EXP_DEVSTA)?;
        reads += 1;
        if devsta & PCI_EXP_DEVSTA_TRPND != 0 {
            break (devsta, true);
        }
        let fenced = run.fence.read_u64(0)? == FENCE_VALUE;
        if fenced || Instant::now() >= deadline {
            break (devsta, false);
        }
        std::thread::sleep(Duration::from_micros(100));
    };
    let us = t0.elapsed().as_micros();
    k.diag(&format!(
        "Device Status 0x{devsta:04x} {us} us after the doorbell ({reads} read(s)): Transactions Pending {}",
        u8::from(tp)
    ));
    if tp {
        // Transactions Pending says the engine took the job; on a loaded host its thread may
        // not have moved a byte yet. The scenario is an FLR with DMA *in flight*: wait until the
        // fill's first bytes are in guest memory (they replace the sentinel), then reset.
        let deadline = t0 + Duration::from_secs(10);
        loop {
            if run.dst.read(0, 4)? == FILL_PATTERN.to_le_bytes() {
                k.diag(&format!(
                    "the fill's first bytes landed {} us after the doorbell",
                    t0.elapsed().as_micros()
                ));
                return Ok(t0);
            }
            if Instant::now() >= deadline {
                let st = ringdrv::state(v)?;
                return Err(format!(
                    "Transactions Pending set, but no byte of the fill landed in 10 s: {st}"
                ));
            }
            // Sleep, not spin: the engine is a host thread that needs the CPU this vCPU holds.
            std::thread::sleep(Duration::from_micros(100));
        }
    } else {
        let st = ringdrv::state(v)?;
        Err(format!(
            "Transactions Pending never seen in {reads} read(s) over {us} us after the doorbell \
             (the job ended or 10 s passed first): {st}"
        ))
    }
}

fn raw_flr(cfg_path: &std::path::Path, pcie: u64) -> Result<Duration, String> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(cfg_path)
        .map_err(|e| format!("open {}: {e}", cfg_path.display()))?;
    let mut b = [0u8; 2];
    f.read_exact_at(&mut b, pcie + PCI_EXP_DEVCTL)
        .map_err(|e| format!("read Device Control: {e}"))?;
    let v = u16::from_le_bytes(b) | PCI_EXP_DEVCTL_BCR_FLR;
    let t0 = Instant::now();
    f.write_all_at(&v.to_le_bytes(), pcie + PCI_EXP_DEVCTL)
        .map_err(|e| format!("write Device Control: {e}"))?;
    let took = t0.elapsed();
    // PCIe Base 6.0 §6.6.2: 100 ms before the function may be accessed again.
    std::thread::sleep(Duration::from_millis(100));
    Ok(took)
}

/// After the reset: the fence never ran, the fill stopped part-way, and nothing more lands.
fn check_after(v: &Vfio, run: &Run, len: usize, k: &mut Ktap) -> Result<(), String> {
    let (filled, left) = filled_bytes(&run.dst, len)?;
    let fence = run.fence.read_u64(0)?;
    let st = ringdrv::state(v)?;
    k.diag(&format!(
        "after the reset: {filled:#x} of {len:#x} bytes filled, fence 0x{fence:x}; {st}"
    ));
    std::thread::sleep(Duration::from_millis(50));
    let (filled2, _) = filled_bytes(&run.dst, len)?;
    let mut errs = Vec::new();
    if left == 0 {
        errs.push("the whole fill landed: nothing was in flight at the reset".to_string());
    }
    if fence != 0 {
        errs.push(format!("the fence ran (0x{fence:x})"));
    }
    if filled2 != filled {
        errs.push(format!(
            "DMA after the reset: {filled:#x} then {filled2:#x} bytes filled"
        ));
    }
    if st.ctrl != 0 || st.head != 0 || st.completed != 0 {
        errs.push(format!("ring registers not at their defaults: {st}"));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

/// The subtests, in the order they are reported: the reset is named after the mode
/// (`vfio-device-reset` when correct, `raw-flr` otherwise; `reset` when it could not be done).
const SUBTESTS: &[&str] = &[
    "vfio-bind",
    "vfio-open",
    "enable",
    "submit",
    "tp-seen",
    "vfio-device-reset|raw-flr|reset",
    "state-after",
    "irq-after",
    "vfio-release",
];

pub fn run(ids: DeviceIds, o: ResetDmaOptions) -> i32 {
    let prepared = (|| -> Result<_, String> {
        let mode = match o.mode {
            ResetDmaMode::Correct => Mode::Correct,
            ResetDmaMode::Buggy => Mode::Buggy,
        };
        let len = match o.len {
            Some(l) => usize::try_from(l).map_err(|_| format!("bad --len {l}"))?,
            None => DEFAULT_LEN,
        };
        if len == 0 || len % 4096 != 0 {
            return Err(format!(
                "--len {len:#x} must be a non-zero multiple of 4 KiB"
            ));
        }
        let (func, note) = pci::select_function(ids.vendor, ids.device, o.bdf.as_deref())?;
        let pcie = pcie_cap(&func.attr("config"))?;
        Ok((func, note, mode, len, pcie))
    })();
    let (func, note, mode, len, pcie) = match prepared {
        Ok(p) => p,
        Err(e) => return setup_failure(&e),
    };
    let mode_name = match mode {
        Mode::Correct => "VFIO_DEVICE_RESET (the kernel's FLR path)",
        Mode::Buggy => "a raw FLR without quiescing (driver bug)",
    };
    let mut k = Ktap::declared(SUBTESTS);
    k.diag(&format!(
        "FLR of {} with {FILLS} {len:#x}-byte FILLs queued, by {mode_name}",
        func.bdf
    ));
    if let Some(n) = note {
        k.diag(&n);
    }
    let mut binding = Binding::default();
    let skip = |why: &str| Outcome::Skip(format!("{why} failed"));
    let vfio = bind_and_open(&func, &mut binding, &mut k, |_| Ok(()));
    let mut fds = enable_vectors(vfio.as_ref(), &mut k);

    let mut run_state = None;
    if let Some((v, fds)) = vfio.as_ref().zip(fds.as_mut()) {
        let r = submit(v, len, &mut k).and_then(|run| {
            ring_vector(v, fds, MARK_BEFORE, &mut k)?;
            Ok(run)
        });
        match r {
            Ok(run) => {
                run_state = Some(run);
                k.result("submit", Outcome::Pass);
            }
            Err(e) => k.result("submit", Outcome::Fail(e)),
        }
    } else {
        k.result("submit", skip("enable"));
    }

    match (&vfio, &run_state, fds.as_mut()) {
        (Some(v), Some(run), Some(fds)) => {
            let t = doorbell_and_tp(v, run, pcie, &mut k);
            let tp_seen = t.is_ok();
            k.check("tp-seen", t.map(|_| ()));
            let r = match mode {
                Mode::Correct => {
                    let t0 = Instant::now();
                    v.device.reset().map(|()| t0.elapsed())
                }
                Mode::Buggy => raw_flr(&func.attr("config"), pcie).and_then(|took| {
                    // The FLR cleared Command behind vfio-pci's back: the buggy driver turns
                    // memory and bus mastering back on itself.
                    vdev::set_command(v, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 0, &mut k)?;
                    Ok(took)
                }),
            };
            match r {
                Ok(took) => {
                    k.diag(&format!(
                        "latency_ms {} {:.1}",
                        if mode == Mode::Correct {
                            "flr-with-dma"
                        } else {
                            "raw-flr"
                        },
                        took.as_secs_f64() * 1000.0
                    ));
                    k.result(
                        if mode == Mode::Correct {
                            "vfio-device-reset"
                        } else {
                            "raw-flr"
                        },
                        if tp_seen {
                            Outcome::Pass
                        } else {
                            Outcome::Fail("done, but Transactions Pending was not seen".into())
                        },
                    );
                }
                Err(e) => k.result("reset", Outcome::Fail(e)),
            }
            let r = check_after(v, run, len, &mut k);
            k.check("state-after", r);
            let r = v.device.read_u16(&v.config, PCI_COMMAND).and_then(|c| {
                k.diag(&format!("Command after the reset: 0x{c:04x}"));
                ring_vector(v, fds, MARK_AFTER, &mut k)
            });
            k.check("irq-after", r);
        }
        _ => {
            for name in ["tp-seen", "reset", "state-after", "irq-after"] {
                k.result(name, skip("submit"));
            }
        }
    }
    if let (Some(v), Some(run)) = (&vfio, run_state.as_mut()) {
        // Stop the ring before its buffers go away.
        if let Err(e) = run.ring.reset(v) {
            k.diag(&format!("ring reset: {e}"));
        }
    }
    drop(run_state);
    let irqs_on = fds.is_some();
    let r = release(&func, &binding, vfio, irqs_on);
    drop(fds);
    k.check("vfio-release", r);
    k.finish()
}
