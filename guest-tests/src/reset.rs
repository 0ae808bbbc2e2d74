//! `reset`: one function reset of a device with no driver bound, the way an administrator (or
//! a hypervisor's management stack) does it: through the kernel's sysfs `reset_method` and
//! `reset` attributes, or by hand through config space. Used by R1, R3, R4 and R8.
//!
//! Before the reset the device's BAR0 registers are dirtied (scratch registers, ring vectors,
//! the VRAM window) through sysfs `resource0`; after it they must read back as their defaults
//! (`--expect cleared`), unchanged (`--expect kept`), or the function must not answer at all
//! (`--expect dead`: the kernel gave up waiting for it). The time the reset takes as the guest
//! sees it (around the `reset` write) is printed as `# latency_ms <method> <ms>`.
//!
//! Methods:
//! - `flr`, `pm`, `bus`: the kernel's methods (`reset_method` = the method, then `reset` = 1);
//!   the kernel saves config space, disables the function, resets, waits for it to be ready
//!   and restores config space.
//! - `pm-cycle`: PMCSR D3hot, 10 ms, D0, 10 ms written by hand through sysfs `config` (what a
//!   driver's suspend/resume does): a function with No_Soft_Reset = 0 resets itself, one with
//!   No_Soft_Reset = 1 keeps its state. Config space is restored by hand if it was lost.
//! - `sbr`: the recovery of a function that never became ready: remove it from the kernel,
//!   assert Secondary Bus Reset on its parent bridge by hand, rescan.

use crate::e1::setup_failure;
use crate::gpu;
use crate::ktap::{Ktap, Outcome};
use crate::mmio::Mapping;
use crate::pci::{self, walk_capabilities, Function};
use crate::sys;
use pcisim_guest_wire::{DeviceIds, OnOff, ResetExpect, ResetOptions};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_BRIDGE_CONTROL: u64 = 0x3e;
const PCI_BRIDGE_CTL_BUS_RESET: u16 = 1 << 6;
const PCI_CAP_ID_PM: u8 = 0x01;
const PMCSR: u64 = 4;
/// PCI PM 1.2 §5.6.1: 10 ms recovery after D3hot → D0 (and before leaving D3hot).
const D3HOT_DELAY: Duration = Duration::from_millis(10);

/// BAR0 registers the test dirties, with the value written and the default after a reset.
pub fn dirty_set() -> Vec<(u64, u32, u32)> {
    let mut v: Vec<(u64, u32, u32)> = (0..gpu::SCRATCH_COUNT)
        .map(|i| (gpu::SCRATCH + 4 * i, 0xA5A5_0000 | (i as u32 * 0x111), 0))
        .collect();
    v.push((gpu::FENCE_VECTOR, 7, 0));
    v.push((gpu::ERROR_VECTOR, 3, 1));
    v.push((gpu::VRAM_OFFSET_LO, 0x1000, 0));
    v.push((gpu::VRAM_SEED, 0xDEAD_BEEF, 0));
    v
}

/// Compares the dirtied registers with what a reset should have left (`cleared`: the
/// defaults; else the values written). Reads through `rd`.
pub fn check_dirty_state(
    expect_cleared: bool,
    rd: impl FnMut(u64) -> Result<u32, String>,
) -> Result<(), String> {
    let want: Vec<(u64, u32)> = dirty_set()
        .into_iter()
        .map(|(off, written, default)| (off, if expect_cleared { default } else { written }))
        .collect();
    let what = if expect_cleared {
        "not back to their defaults"
    } else {
        "lost their values"
    };
    check_registers((gpu::ID, gpu::ID_MAGIC), &want, what, rd)
}

/// Reads the ID register `id.0` through `rd` (it must read `id.1`: the function still
/// answers as itself), then every register of `want` (offset, value); fails listing each one
/// that differs as `0xOFF=0xGOT (want 0xWANT)` after "N of M registers `what`". The after-reset
/// register check of the GPU (here) and the NPU (`npu::check_dirty_state`).
pub fn check_registers(
    id: (u64, u32),
    want: &[(u64, u32)],
    what: &str,
    mut rd: impl FnMut(u64) -> Result<u32, String>,
) -> Result<(), String> {
    let (id_off, magic) = id;
    let got = rd(id_off)?;
    if got != magic {
        return Err(format!("ID reads 0x{got:08x}, expected 0x{magic:08x}"));
    }
    let mut wrong = Vec::new();
    for &(off, want) in want {
        let got = rd(off)?;
        if got != want {
            wrong.push(format!("0x{off:03x}=0x{got:x} (want 0x{want:x})"));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {} registers {what}: {}",
            wrong.len(),
            want.len(),
            wrong.join(" ")
        ))
    }
}

/// Writes `value` to a sysfs attribute in one `write`, keeping the OS error (for errno checks).
fn write_attr_raw(path: &Path, value: &str) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes())
}

/// A function's config space through sysfs `config`.
fn cfg_read(func_path: &Path, off: u64, len: usize) -> Result<Vec<u8>, String> {
    let p = func_path.join("config");
    let f = std::fs::File::open(&p).map_err(|e| format!("open {}: {e}", p.display()))?;
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off)
        .map_err(|e| format!("read {} at 0x{off:x}: {e}", p.display()))?;
    Ok(b)
}

fn cfg_read16(func_path: &Path, off: u64) -> Result<u16, String> {
    let b = cfg_read(func_path, off, 2)?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

fn cfg_write16(func_path: &Path, off: u64, v: u16) -> Result<(), String> {
    let p = func_path.join("config");
    let f = OpenOptions::new()
        .write(true)
        .open(&p)
        .map_err(|e| format!("open {}: {e}", p.display()))?;
    f.write_all_at(&v.to_le_bytes(), off)
        .map_err(|e| format!("write {} at 0x{off:x}: {e}", p.display()))
}

/// One kernel log record: its sequence number and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsgRecord {
    pub seq: u64,
    pub text: String,
}

/// Parses a `/dev/kmsg` record (`prio,seq,ts,flags;text\n[continuation]`).
pub fn parse_kmsg(rec: &str) -> Option<KmsgRecord> {
    let (head, text) = rec.split_once(';')?;
    let seq = head.split(',').nth(1)?.parse().ok()?;
    Some(KmsgRecord {
        seq,
        text: text.lines().next().unwrap_or("").to_string(),
    })
}

/// Every kernel log record still in the buffer, oldest first.
pub fn kmsg_records() -> Vec<KmsgRecord> {
    sys::kmsg_read_all()
        .iter()
        .filter_map(|rec| parse_kmsg(rec))
        .collect()
}

/// The sequence number of the newest kernel log record (0 if none).
pub fn kmsg_last_seq() -> u64 {
    kmsg_records().last().map_or(0, |r| r.seq)
}

/// Kernel log lines after `seq` that mention `needle`.
pub fn kmsg_since(seq: u64, needle: &str) -> Vec<String> {
    kmsg_since_any(seq, &[needle])
}

/// Kernel log lines after `seq` that mention any of `needles`.
pub fn kmsg_since_any(seq: u64, needles: &[&str]) -> Vec<String> {
    kmsg_records()
        .into_iter()
        .filter(|r| r.seq > seq && needles.iter().any(|n| r.text.contains(n)))
        .map(|r| r.text)
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Cleared,
    Kept,
    Dead,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Method {
    /// A kernel reset method (`flr`, `pm`, `bus`, ...).
    Kernel(String),
    PmCycle,
    Sbr,
}

struct Opts {
    method: Method,
    dirty: bool,
    expect: Expect,
    offered: Vec<String>,
    absent: Vec<String>,
    min_ms: Option<u64>,
    errno: Option<i32>,
    kmsg: Vec<String>,
}

/// The program's view of its options: the method kinds it tells apart, the defaults applied,
/// and the method itself among those `reset_method` must offer when no error is expected.
fn parse_opts(o: &ResetOptions) -> Opts {
    use pcisim_guest_wire::ResetMethod as W;
    let method = match o.method {
        W::PmCycle => Method::PmCycle,
        W::Sbr => Method::Sbr,
        m => Method::Kernel(m.word().to_string()),
    };
    let expect = match o.expect.unwrap_or(ResetExpect::Cleared) {
        ResetExpect::Cleared => Expect::Cleared,
        ResetExpect::Kept => Expect::Kept,
        ResetExpect::Dead => Expect::Dead,
    };
    let words = |l: &Option<Vec<W>>| -> Vec<String> {
        l.iter().flatten().map(|m| m.word().to_string()).collect()
    };
    let mut offered = words(&o.offered);
    if let Method::Kernel(m) = &method {
        if o.errno.is_none() && !offered.contains(m) {
            offered.push(m.clone());
        }
    }
    Opts {
        method,
        dirty: o.dirty.unwrap_or(OnOff::On).is_on(),
        expect,
        offered,
        absent: words(&o.absent),
        min_ms: o.min_ms,
        errno: o.errno,
        kmsg: o
            .kmsg
            .as_deref()
            .map(|s| s.split('|').map(str::to_string).collect())
            .unwrap_or_default(),
    }
}

/// BAR0 through sysfs `resource0` (memory decoding turned on with `enable`).
fn map_bar0(func: &Function) -> Result<Mapping, String> {
    // `enable` counts: write it only when the function is not enabled yet.
    let enabled = func.read_attr("enable")?.trim() != "0";
    let enabling = if enabled {
        Ok(())
    } else {
        func.write_attr("enable", "1")
    };
    if let Err(e) = enabling {
        return Err(match func.driver() {
            Some(d) => format!("{e} (driver {d} is bound; the test needs the device unbound)"),
            None => e,
        });
    }
    let res = func.resources()?;
    let r = *res.first().ok_or("resource file has no line for BAR0")?;
    if r.flags & pci::IORESOURCE_MEM == 0 || r.size() == 0 {
        return Err(format!("BAR0 is not a memory BAR with a size: {r:?}"));
    }
    let len = usize::try_from(r.size()).map_err(|_| "BAR0 too large".to_string())?;
    Mapping::map_file(&func.attr("resource0"), len.min(0x1000))
}

fn dirty(func: &Function) -> Result<(), String> {
    let m = map_bar0(func)?;
    for (off, v, _) in dirty_set() {
        m.write32(off, v)?;
    }
    check_dirty_state(false, |off| m.read32(off)).map_err(|e| format!("before the reset: {e}"))
}

/// What a reset did, as the guest saw it.
struct Done {
    elapsed: Duration,
    /// The OS error of the write that failed, if one did.
    error: Option<std::io::Error>,
    /// Which write failed (`reset_method` or `reset`).
    failed_at: &'static str,
}

fn kernel_reset(func: &Function, method: &str) -> Done {
    if let Err(e) = write_attr_raw(&func.attr("reset_method"), method) {
        return Done {
            elapsed: Duration::ZERO,
            error: Some(e),
            failed_at: "reset_method",
        };
    }
    let t0 = Instant::now();
    let r = write_attr_raw(&func.attr("reset"), "1");
    Done {
        elapsed: t0.elapsed(),
        error: r.err(),
        failed_at: "reset",
    }
}

fn pm_offset(func: &Function) -> Result<u64, String> {
    let cfg = cfg_read(&func.path, 0, 256)?;
    walk_capabilities(&cfg)
        .caps
        .iter()
        .find(|c| c.id == PCI_CAP_ID_PM)
        .map(|c| u64::from(c.offset))
        .ok_or_else(|| "no PM capability".to_string())
}

/// D3hot and back by hand; restores Command if the function lost it. Returns the elapsed time
/// and a note about what happened to Command.
fn pm_cycle(func: &Function, k: &mut Ktap) -> Result<Duration, String> {
    let pm = pm_offset(func)?;
    let command = cfg_read16(&func.path, PCI_COMMAND)?;
    let pmcsr = cfg_read16(&func.path, pm + PMCSR)?;
    k.diag(&format!(
        "PM capability at 0x{pm:02x}: PMCSR 0x{pmcsr:04x} (No_Soft_Reset {}), Command 0x{command:04x}",
        (pmcsr >> 3) & 1
    ));
    let t0 = Instant::now();
    cfg_write16(&func.path, pm + PMCSR, (pmcsr & !3) | 3)?;
    std::thread::sleep(D3HOT_DELAY);
    let in_d3 = cfg_read16(&func.path, pm + PMCSR)?;
    cfg_write16(&func.path, pm + PMCSR, pmcsr & !3)?;
    std::thread::sleep(D3HOT_DELAY);
    let elapsed = t0.elapsed();
    let after = cfg_read16(&func.path, pm + PMCSR)?;
    let cmd_after = cfg_read16(&func.path, PCI_COMMAND)?;
    k.diag(&format!(
        "PMCSR 0x{in_d3:04x} in D3hot, 0x{after:04x} back in D0; Command 0x{cmd_after:04x}"
    ));
    if in_d3 & 3 != 3 || after & 3 != 0 {
        return Err(format!(
            "PMCSR power state did not follow: 0x{in_d3:04x} then 0x{after:04x}"
        ));
    }
    if cmd_after != command {
        k.diag(&format!(
            "the function reset itself (Command 0x{cmd_after:04x}): restoring Command 0x{command:04x} as a driver's resume would"
        ));
        cfg_write16(&func.path, PCI_COMMAND, command)?;
    }
    Ok(elapsed)
}

/// The parent bridge's sysfs path.
fn parent_bridge(func: &Function) -> Result<PathBuf, String> {
    let real = std::fs::canonicalize(&func.path)
        .map_err(|e| format!("canonicalize {}: {e}", func.path.display()))?;
    let parent = real.parent().ok_or("no parent device")?.to_path_buf();
    if !parent.join("config").exists() {
        return Err(format!(
            "{} has no parent bridge ({} is not a PCI device)",
            func.bdf,
            parent.display()
        ));
    }
    Ok(parent)
}

/// Remove the function, assert Secondary Bus Reset on its parent bridge, rescan, wait for the
/// function to come back.
fn sbr_rescan(func: &Function, k: &mut Ktap) -> Result<Duration, String> {
    let bridge = parent_bridge(func)?;
    let bname = bridge
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    func.write_attr("remove", "1")?;
    let gone = crate::vdev::wait_for(Duration::from_secs(5), || {
        (!func.path.exists()).then_some(())
    });
    if gone.is_none() {
        return Err(format!("{} still present after remove", func.bdf));
    }
    let t0 = Instant::now();
    let ctl = cfg_read16(&bridge, PCI_BRIDGE_CONTROL)?;
    cfg_write16(&bridge, PCI_BRIDGE_CONTROL, ctl | PCI_BRIDGE_CTL_BUS_RESET)?;
    // PCI 3.0 §7.6.4.2: Trst at least 1 ms (the kernel holds it 2 ms).
    std::thread::sleep(Duration::from_millis(2));
    cfg_write16(&bridge, PCI_BRIDGE_CONTROL, ctl & !PCI_BRIDGE_CTL_BUS_RESET)?;
    // PCIe Base 6.0 §6.6.1: 100 ms before the first configuration request.
    std::thread::sleep(Duration::from_millis(100));
    k.diag(&format!(
        "removed {}, Secondary Bus Reset on {bname} (Bridge Control 0x{ctl:04x}), rescanning",
        func.bdf
    ));
    pci::write_sysfs(Path::new("/sys/bus/pci/rescan"), "1")?;
    let back = crate::vdev::wait_for(Duration::from_secs(10), || {
        func.path.join("config").exists().then_some(())
    });
    let elapsed = t0.elapsed();
    if back.is_none() {
        return Err(format!("{} did not come back after the rescan", func.bdf));
    }
    Ok(elapsed)
}

fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EINVAL => "EINVAL",
        libc::ENOTTY => "ENOTTY",
        libc::EBUSY => "EBUSY",
        libc::EAGAIN => "EAGAIN",
        libc::EIO => "EIO",
        libc::ENODEV => "ENODEV",
        _ => "?",
    }
}

/// The subtests, in the order they are reported: the reset is named after its method
/// (`reset-flr`, `reset-pm-cycle`, ...), the state check after `--expect` (dead, kept, cleared).
const SUBTESTS: &[&str] = &[
    "reset-methods",
    "dirty",
    "reset-*",
    "kernel-log",
    "state-not-ready|state-kept|state-cleared",
    "config-restored",
];

pub fn run(ids: DeviceIds, options: ResetOptions) -> i32 {
    let prepared = (|| -> Result<_, String> {
        let opts = parse_opts(&options);
        let (func, note) = pci::select_function(ids.vendor, ids.device, options.bdf.as_deref())?;
        if let Some(d) = func.driver() {
            return Err(format!(
                "{} is bound to {d}; the test needs it unbound",
                func.bdf
            ));
        }
        Ok((func, note, opts))
    })();
    let (func, note, o) = match prepared {
        Ok(p) => p,
        Err(e) => return setup_failure(&e),
    };
    let method_name = match &o.method {
        Method::Kernel(m) => m.clone(),
        Method::PmCycle => "pm-cycle".into(),
        Method::Sbr => "sbr".into(),
    };
    let mut k = Ktap::declared(SUBTESTS);
    k.diag(&format!(
        "reset of {} by {method_name} (no driver bound)",
        func.bdf
    ));
    if let Some(n) = note {
        k.diag(&n);
    }
    let kmsg_start = kmsg_last_seq();
    // The kernel logs about the function and about its parent bridge (bus and slot resets).
    let bridge_bdf = parent_bridge(&func)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();

    // 1. The methods the kernel offers.
    let original_methods = func.read_attr("reset_method").map(|s| s.trim().to_string());
    let r = match &original_methods {
        Ok(m) => {
            k.diag(&format!("reset_method: {m}"));
            let offered: Vec<&str> = m.split_whitespace().collect();
            let missing: Vec<&String> = o
                .offered
                .iter()
                .filter(|x| !offered.contains(&x.as_str()))
                .collect();
            let present: Vec<&String> = o
                .absent
                .iter()
                .filter(|x| offered.contains(&x.as_str()))
                .collect();
            if !missing.is_empty() {
                Err(format!("{missing:?} not offered (reset_method: {m})"))
            } else if !present.is_empty() {
                Err(format!(
                    "{present:?} offered but must not be (reset_method: {m})"
                ))
            } else {
                Ok(())
            }
        }
        Err(e) => Err(e.clone()),
    };
    k.check("reset-methods", r);

    // 2. Dirty the registers.
    let dirtied = if o.dirty {
        let r = dirty(&func);
        k.check("dirty", r)
    } else {
        k.result("dirty", Outcome::Skip("--dirty off".into()));
        false
    };
    // Dirtying turned memory decoding on: that is the state the reset must restore.
    let command_before = cfg_read16(&func.path, PCI_COMMAND);

    // 3. The reset.
    let (done, reset_ok) = match &o.method {
        Method::Kernel(m) => {
            let d = kernel_reset(&func, m);
            let ok = match (&d.error, o.errno) {
                (None, None) => Ok(()),
                (None, Some(want)) => Err(format!(
                    "the reset succeeded but errno {want} ({}) was expected",
                    errno_name(want)
                )),
                (Some(e), None) => Err(format!("write to {}: {e}", d.failed_at)),
                (Some(e), Some(want)) => {
                    let got = e.raw_os_error().unwrap_or(0);
                    k.diag(&format!(
                        "write to {} failed as expected: {e} (errno {got} {})",
                        d.failed_at,
                        errno_name(got)
                    ));
                    if got == want {
                        Ok(())
                    } else {
                        Err(format!(
                            "write to {} failed with errno {got}, expected {want} ({})",
                            d.failed_at,
                            errno_name(want)
                        ))
                    }
                }
            };
            (Some(d), ok)
        }
        Method::PmCycle => match pm_cycle(&func, &mut k) {
            Ok(elapsed) => (
                Some(Done {
                    elapsed,
                    error: None,
                    failed_at: "",
                }),
                Ok(()),
            ),
            Err(e) => (None, Err(e)),
        },
        Method::Sbr => match sbr_rescan(&func, &mut k) {
            Ok(elapsed) => (
                Some(Done {
                    elapsed,
                    error: None,
                    failed_at: "",
                }),
                Ok(()),
            ),
            Err(e) => (None, Err(e)),
        },
    };
    let attempted = done.as_ref().is_some_and(|d| d.failed_at != "reset_method");
    if let Some(d) = done.as_ref().filter(|_| attempted) {
        k.diag(&format!(
            "latency_ms {method_name} {:.1}",
            d.elapsed.as_secs_f64() * 1000.0
        ));
    }
    let reset_ok = reset_ok.and_then(|()| match (o.min_ms, &done) {
        (Some(min), Some(d)) if d.elapsed < Duration::from_millis(min) => Err(format!(
            "the reset took {} ms, expected at least {min} ms",
            d.elapsed.as_millis()
        )),
        _ => Ok(()),
    });
    k.check(&format!("reset-{method_name}"), reset_ok);

    // 4. What the kernel logged about the function during the reset.
    let needles: Vec<&str> = [func.bdf.as_str(), bridge_bdf.as_str()]
        .into_iter()
        .filter(|n| !n.is_empty())
        .collect();
    let logged = kmsg_since_any(kmsg_start, &needles);
    for l in &logged {
        k.diag(&format!("kmsg: {l}"));
    }
    if o.kmsg.is_empty() {
        k.result("kernel-log", Outcome::Skip("no --kmsg expectation".into()));
    } else {
        let missing: Vec<&String> = o
            .kmsg
            .iter()
            .filter(|w| !logged.iter().any(|l| l.contains(w.as_str())))
            .collect();
        k.check(
            "kernel-log",
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "no kernel log line about {} with {missing:?}",
                    func.bdf
                ))
            },
        );
    }

    // 5. The device's state after the reset.
    match o.expect {
        Expect::Dead => {
            let r = cfg_read16(&func.path, 0).and_then(|vendor| {
                let cmd = cfg_read16(&func.path, PCI_COMMAND)?;
                k.diag(&format!(
                    "after the failed reset: Vendor ID 0x{vendor:04x}, Command 0x{cmd:04x}"
                ));
                if vendor == 0xffff && cmd == 0xffff {
                    Ok(())
                } else {
                    Err(format!(
                        "the function answers (Vendor ID 0x{vendor:04x}, Command 0x{cmd:04x}) although the kernel gave up on it"
                    ))
                }
            });
            k.check("state-not-ready", r);
        }
        Expect::Kept if !dirtied => {
            k.result(
                "state-kept",
                Outcome::Skip("registers were not dirtied".into()),
            );
        }
        // Registers at their defaults: after the reset whether or not they were dirtied.
        Expect::Cleared | Expect::Kept => {
            let cleared = o.expect == Expect::Cleared;
            let r = map_bar0(&func).and_then(|m| check_dirty_state(cleared, |off| m.read32(off)));
            k.check(
                if cleared {
                    "state-cleared"
                } else {
                    "state-kept"
                },
                r,
            );
        }
    }

    // 6. Config space as the guest left it (the kernel restored it after its methods).
    match (&o.method, o.expect, &command_before) {
        (Method::Sbr, _, _) => k.result(
            "config-restored",
            Outcome::Skip("the function was enumerated again".into()),
        ),
        (_, Expect::Dead, _) => k.result(
            "config-restored",
            Outcome::Skip("the function is not ready".into()),
        ),
        (_, _, Err(e)) => k.result("config-restored", Outcome::Fail(e.clone())),
        (_, _, Ok(before)) => {
            let r = cfg_read16(&func.path, PCI_COMMAND).and_then(|after| {
                k.diag(&format!(
                    "Command 0x{before:04x} before, 0x{after:04x} after"
                ));
                if after == *before && after & PCI_COMMAND_MEMORY == before & PCI_COMMAND_MEMORY {
                    Ok(())
                } else {
                    Err(format!("Command 0x{after:04x}, was 0x{before:04x}"))
                }
            });
            k.check("config-restored", r);
        }
    }

    // Leave the function as it was found: its default reset methods.
    if matches!(o.method, Method::Kernel(_)) && o.expect != Expect::Dead {
        if let Ok(m) = &original_methods {
            if let Err(e) = func.write_attr("reset_method", m) {
                k.diag(&format!("restoring reset_method {m:?}: {e}"));
            }
        }
    }
    k.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_check_lists_the_wrong_ones() {
        let regs = |off: u64| -> Result<u32, String> {
            Ok(match off {
                0 => 0xC0DE,
                0x10 => 1,
                _ => 7,
            })
        };
        let want = [(0x10, 1), (0x20, 2), (0x30, 7)];
        assert_eq!(
            check_registers((0, 0xC0DE), &want[..1], "kept", regs),
            Ok(())
        );
        assert_eq!(
            check_registers((0, 0xC0DE), &want, "not back to 0", regs),
            Err("1 of 3 registers not back to 0: 0x020=0x7 (want 0x2)".to_string())
        );
        assert_eq!(
            check_registers((0, 0xBEEF), &want, "x", regs),
            Err("ID reads 0x0000c0de, expected 0x0000beef".to_string())
        );
    }

    #[test]
    fn parses_kmsg_records() {
        let r = parse_kmsg("4,1234,5678901,-;pci 0000:01:00.0: not ready 1023ms after FLR; waiting\n SUBSYSTEM=pci\n").unwrap();
        assert_eq!(r.seq, 1234);
        assert_eq!(
            r.text,
            "pci 0000:01:00.0: not ready 1023ms after FLR; waiting"
        );
        assert!(parse_kmsg("garbage").is_none());
    }

    #[test]
    fn dirty_state_check() {
        let set = dirty_set();
        let written = |off: u64| -> Result<u32, String> {
            if off == gpu::ID {
                return Ok(gpu::ID_MAGIC);
            }
            Ok(set.iter().find(|r| r.0 == off).map_or(0, |r| r.1))
        };
        assert!(check_dirty_state(false, written).is_ok());
        assert!(check_dirty_state(true, written).is_err());
        let defaults = |off: u64| -> Result<u32, String> {
            if off == gpu::ID {
                return Ok(gpu::ID_MAGIC);
            }
            Ok(set.iter().find(|r| r.0 == off).map_or(0, |r| r.2))
        };
        assert!(check_dirty_state(true, defaults).is_ok());
        assert!(check_dirty_state(false, defaults).is_err());
        assert!(check_dirty_state(true, |_| Ok(0xffff_ffff)).is_err());
    }
}
