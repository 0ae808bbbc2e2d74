//! E2: BAR MMIO from the guest with no kernel driver bound: registers through
//! the sysfs `resource0` mapping, VRAM through `resource2`.

use crate::e1::setup_failure;
use crate::gpu::{self, SplitMix64};
use crate::ktap::Ktap;
use crate::mmio::Mapping;
use crate::pci::{self, Function};
use pcisim_guest_wire::{DeviceIds, SelectOptions};

/// A window of VRAM: `(offset, length)`.
pub type Window = (u64, u64);

/// The windows the guest-to-device test writes: the first 4 KiB, an unaligned
/// window around the middle, the last 4 KiB (clamped for small VRAM).
pub fn guest_windows(vram: u64) -> Vec<Window> {
    let first = (0, vram.min(4096));
    let mid_off = (vram / 2).saturating_sub(1021);
    let mid = (mid_off, (vram - mid_off).min(2051));
    let last_len = vram.min(4096);
    let last = (vram - last_len, last_len);
    vec![first, mid, last]
}

/// The windows (and seeds) the device-to-guest test fills.
pub fn fill_windows(vram: u64) -> Vec<(Window, u32)> {
    let a_off = (vram / 4 + 3).min(vram.saturating_sub(1));
    let a = ((a_off, (vram - a_off).min(4101)), 0x1234_5678);
    let b_len = vram.min(512);
    let b = ((vram - b_len, b_len), 0xffff_ffff);
    let c = ((0, vram.min(64)), 0);
    vec![a, b, c]
}

/// The index of the first differing byte, if any.
pub fn first_mismatch(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

struct Gpu {
    regs: Mapping,
    vram: Mapping,
    vram_size: u64,
}

impl Gpu {
    fn rd(&self, off: u64) -> Result<u32, String> {
        self.regs.read32(off)
    }

    fn wr(&self, off: u64, v: u32) -> Result<(), String> {
        self.regs.write32(off, v)
    }

    fn set_window(&self, (off, len): Window) -> Result<(), String> {
        self.wr(gpu::VRAM_OFFSET_LO, off as u32)?;
        self.wr(gpu::VRAM_OFFSET_HI, (off >> 32) as u32)?;
        self.wr(gpu::VRAM_LENGTH_LO, len as u32)?;
        self.wr(gpu::VRAM_LENGTH_HI, (len >> 32) as u32)
    }

    /// Runs a VRAM command and returns VRAM_STATUS.
    fn command(&self, w: Window, cmd: u32) -> Result<u32, String> {
        self.set_window(w)?;
        // Make sure the VRAM stores through the other mapping are issued first.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.wr(gpu::VRAM_CMD, cmd)?;
        self.rd(gpu::VRAM_STATUS)
    }

    fn checksum(&self, w: Window) -> Result<(u32, u64), String> {
        let status = self.command(w, gpu::CMD_CHECKSUM)?;
        let lo = self.rd(gpu::VRAM_RESULT_LO)?;
        let hi = self.rd(gpu::VRAM_RESULT_HI)?;
        Ok((status, u64::from(lo) | (u64::from(hi) << 32)))
    }
}

fn test_id(g: &Gpu, k: &mut Ktap) -> Result<(), String> {
    let id = g.rd(gpu::ID)?;
    let version = g.rd(gpu::VERSION)?;
    let lo = g.rd(gpu::VRAM_SIZE_LO)?;
    let hi = g.rd(gpu::VRAM_SIZE_HI)?;
    let vectors = g.rd(gpu::MSIX_VECTORS)?;
    let size = u64::from(lo) | (u64::from(hi) << 32);
    k.diag(&format!(
        "ID=0x{id:08x} VERSION=0x{version:08x} VRAM_SIZE=0x{size:x} MSIX_VECTORS={vectors}"
    ));
    let mut errs = Vec::new();
    if id != gpu::ID_MAGIC {
        errs.push(format!(
            "ID expected 0x{:08x}, got 0x{id:08x}",
            gpu::ID_MAGIC
        ));
    }
    if version != gpu::VERSION_1_1 {
        errs.push(format!(
            "VERSION expected 0x{:08x}, got 0x{version:08x}",
            gpu::VERSION_1_1
        ));
    }
    if size != g.vram_size {
        errs.push(format!(
            "VRAM_SIZE expected 0x{:x} (BAR2 size), got 0x{size:x}",
            g.vram_size
        ));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

fn test_scratch(g: &Gpu) -> Result<(), String> {
    let regs: Vec<u64> = (0..gpu::SCRATCH_COUNT)
        .map(|i| gpu::SCRATCH + 4 * i)
        .collect();
    let mut rng = SplitMix64::new(0x5c7a_7c40);
    let rounds: Vec<Vec<u32>> = vec![
        // Distinct per register: index in the top byte, random below.
        (0..regs.len() as u32)
            .map(|i| (i << 24) | (rng.next_u64() as u32 & 0x00ff_ffff))
            .collect(),
        // Walking ones.
        (0..regs.len() as u32)
            .map(|i| 1u32 << (i * 2 + 1))
            .collect(),
        vec![0xffff_ffff; regs.len()],
        vec![0; regs.len()],
    ];
    for (round, values) in rounds.iter().enumerate() {
        for (r, v) in regs.iter().zip(values) {
            g.wr(*r, *v)?;
        }
        for (r, v) in regs.iter().zip(values) {
            let got = g.rd(*r)?;
            if got != *v {
                return Err(format!(
                    "round {round}: SCRATCH at 0x{r:03x} expected 0x{v:08x}, got 0x{got:08x}"
                ));
            }
        }
    }
    Ok(())
}

fn test_guest_to_device(g: &Gpu, k: &mut Ktap) -> Result<(), String> {
    for (n, w) in guest_windows(g.vram_size).into_iter().enumerate() {
        let (off, len) = w;
        let mut data = vec![0u8; len as usize];
        SplitMix64::new(0xfeed_0000 + n as u64).fill(&mut data);
        g.vram.write_bytes(off, &data)?;
        let back = g.vram.read_bytes(off, data.len())?;
        if let Some(i) = first_mismatch(&data, &back) {
            return Err(format!(
                "window 0x{off:x}+0x{len:x}: guest read-back differs at byte {i}"
            ));
        }
        let expected = gpu::fnv1a64(&data);
        let (status, got) = g.checksum(w)?;
        k.diag(&format!(
            "window 0x{off:x}+0x{len:x}: status {status} device 0x{got:016x} guest 0x{expected:016x}"
        ));
        if status != gpu::STATUS_OK {
            return Err(format!(
                "window 0x{off:x}+0x{len:x}: VRAM_STATUS {status}, expected 0"
            ));
        }
        if got != expected {
            return Err(format!(
                "window 0x{off:x}+0x{len:x}: checksum expected 0x{expected:016x}, got 0x{got:016x}"
            ));
        }
    }
    Ok(())
}

fn test_device_to_guest(g: &Gpu, k: &mut Ktap) -> Result<(), String> {
    for (w, seed) in fill_windows(g.vram_size) {
        let (off, len) = w;
        // Scribble over the window first so a FILL that does nothing is caught.
        let mut junk = vec![0u8; len as usize];
        SplitMix64::new(u64::from(seed) ^ 0xa5a5).fill(&mut junk);
        g.vram.write_bytes(off, &junk)?;
        g.wr(gpu::VRAM_SEED, seed)?;
        let status = g.command(w, gpu::CMD_FILL)?;
        if status != gpu::STATUS_OK {
            return Err(format!(
                "FILL 0x{off:x}+0x{len:x} seed 0x{seed:08x}: VRAM_STATUS {status}, expected 0"
            ));
        }
        let expected = gpu::fill_pattern(seed, len as usize);
        let got = g.vram.read_bytes(off, len as usize)?;
        if let Some(i) = first_mismatch(&expected, &got) {
            return Err(format!(
                "FILL 0x{off:x}+0x{len:x} seed 0x{seed:08x}: byte {i} expected 0x{:02x}, got 0x{:02x}",
                expected.get(i).copied().unwrap_or(0),
                got.get(i).copied().unwrap_or(0)
            ));
        }
        // Cross-check: the device's checksum of what it wrote.
        let (status, sum) = g.checksum(w)?;
        let want = gpu::fnv1a64(&expected);
        if status != gpu::STATUS_OK || sum != want {
            return Err(format!(
                "checksum after FILL 0x{off:x}+0x{len:x}: status {status}, 0x{sum:016x} expected 0x{want:016x}"
            ));
        }
        k.diag(&format!(
            "FILL 0x{off:x}+0x{len:x} seed 0x{seed:08x}: {len} bytes match"
        ));
    }
    Ok(())
}

fn test_window_range(g: &Gpu) -> Result<(), String> {
    let s = g.vram_size;
    let tail_len = s.min(4096);
    let tail_off = s - tail_len;
    let tail_before = g.vram.read_bytes(tail_off, tail_len as usize)?;
    let cases: [(&str, Window, u32); 4] = [
        (
            "CHECKSUM straddling the end",
            (s - tail_len, 2 * tail_len),
            gpu::CMD_CHECKSUM,
        ),
        ("FILL starting at the end", (s, 1), gpu::CMD_FILL),
        ("FILL straddling the end", (s - 16, 32), gpu::CMD_FILL),
        (
            "CHECKSUM with offset+length wrapping around 2^64",
            (u64::MAX - 15, 32),
            gpu::CMD_CHECKSUM,
        ),
    ];
    g.wr(gpu::VRAM_SEED, 0x0bad_5eed)?;
    for (what, w, cmd) in cases {
        let status = g.command(w, cmd)?;
        if status != gpu::STATUS_OUT_OF_RANGE {
            return Err(format!(
                "{what} (0x{:x}+0x{:x}): VRAM_STATUS {status}, expected 1",
                w.0, w.1
            ));
        }
    }
    let tail_after = g.vram.read_bytes(tail_off, tail_len as usize)?;
    if let Some(i) = first_mismatch(&tail_before, &tail_after) {
        return Err(format!(
            "a rejected FILL changed VRAM at 0x{:x}",
            tail_off + i as u64
        ));
    }
    // A valid command afterwards succeeds again.
    let (status, _) = g.checksum((0, 16))?;
    if status != gpu::STATUS_OK {
        return Err(format!(
            "valid CHECKSUM after range errors: VRAM_STATUS {status}, expected 0"
        ));
    }
    Ok(())
}

fn test_bad_command(g: &Gpu) -> Result<(), String> {
    let status = g.command((0, 16), 0x7f)?;
    if status != 2 {
        return Err(format!("VRAM_CMD 0x7f: VRAM_STATUS {status}, expected 2"));
    }
    let (status, _) = g.checksum((0, 16))?;
    if status != gpu::STATUS_OK {
        return Err(format!(
            "valid CHECKSUM after a bad command: VRAM_STATUS {status}, expected 0"
        ));
    }
    Ok(())
}

fn setup(func: &Function) -> Result<(Gpu, String), String> {
    let was_enabled = func.read_attr("enable")?.trim().to_string();
    if let Err(e) = func.write_attr("enable", "1") {
        // sysfs refuses `enable` (EBUSY) while a driver is bound.
        return Err(match func.driver() {
            Some(d) => format!("{e} (driver {d} is bound; E2 needs the device unbound)"),
            None => e,
        });
    }
    let res = func.resources()?;
    let bar = |i: usize| -> Result<u64, String> {
        let r = res
            .get(i)
            .ok_or_else(|| format!("resource file has no line for BAR{i}"))?;
        if r.flags & pci::IORESOURCE_MEM == 0 || r.size() == 0 {
            return Err(format!("BAR{i} is not a memory BAR with a size: {r:?}"));
        }
        Ok(r.size())
    };
    let bar0 = bar(0)?;
    let bar2 = bar(2)?;
    let as_len = |v: u64| usize::try_from(v).map_err(|_| format!("BAR size {v:#x} too large"));
    let regs = Mapping::map_file(&func.attr("resource0"), as_len(bar0)?)?;
    let vram = Mapping::map_file(&func.attr("resource2"), as_len(bar2)?)?;
    Ok((
        Gpu {
            regs,
            vram,
            vram_size: bar2,
        },
        was_enabled,
    ))
}

/// E2's subtests, in the order they are reported.
const SUBTESTS: &[&str] = &[
    "id",
    "scratch",
    "vram-guest-to-device",
    "vram-device-to-guest",
    "vram-window-range",
    "vram-bad-command",
];

pub fn run(ids: DeviceIds, o: SelectOptions) -> i32 {
    let prepared = (|| -> Result<_, String> {
        let (func, note) = pci::select_function(ids.vendor, ids.device, o.bdf.as_deref())?;
        let (gpu, was_enabled) = setup(&func)?;
        Ok((func, note, gpu, was_enabled))
    })();
    let (func, note, g, was_enabled) = match prepared {
        Ok(p) => p,
        Err(e) => return setup_failure(&e),
    };

    let mut k = Ktap::declared(SUBTESTS);
    k.diag(&format!(
        "E2 BAR MMIO on {} (BAR0 {:#x} bytes, BAR2 {:#x} bytes, enable was {was_enabled})",
        func.bdf,
        g.regs.len(),
        g.vram_size
    ));
    if let Some(n) = note {
        k.diag(&n);
    }
    let r = test_id(&g, &mut k);
    k.check("id", r);
    k.check("scratch", test_scratch(&g));
    let r = test_guest_to_device(&g, &mut k);
    k.check("vram-guest-to-device", r);
    let r = test_device_to_guest(&g, &mut k);
    k.check("vram-device-to-guest", r);
    k.check("vram-window-range", test_window_range(&g));
    k.check("vram-bad-command", test_bad_command(&g));

    drop(g);
    if was_enabled == "0" {
        if let Err(e) = func.write_attr("enable", "0") {
            k.diag(&format!("restoring enable=0: {e}"));
        }
    }
    k.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_fit_in_vram() {
        for vram in [4096u64, 8192, 1 << 20, 256 << 20, 16 << 30] {
            for (off, len) in guest_windows(vram) {
                assert!(len > 0 && off + len <= vram, "{vram:#x}: {off:#x}+{len:#x}");
            }
            for ((off, len), _) in fill_windows(vram) {
                assert!(len > 0 && off + len <= vram, "{vram:#x}: {off:#x}+{len:#x}");
            }
        }
        let w = guest_windows(256 << 20);
        assert_eq!(w[0], (0, 4096));
        assert_eq!(w[2], ((256 << 20) - 4096, 4096));
        assert_ne!(w[1].0 % 4, 0, "the middle window is deliberately unaligned");
    }

    #[test]
    fn mismatch_index() {
        assert_eq!(first_mismatch(b"abc", b"abc"), None);
        assert_eq!(first_mismatch(b"abc", b"abd"), Some(2));
        assert_eq!(first_mismatch(b"ab", b"abc"), Some(2));
    }
}
