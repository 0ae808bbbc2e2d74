//! Target `config`: sequences of configuration-space accesses on the real GPU and NPU
//! functions (built by `gpu::endpoint` / `npu::endpoint` exactly as the server builds them),
//! through the `Device` trait, checked against the masks after every access.
//!
//! Invariants, after every access (config space as the function sees it, byte by byte):
//! - a write changes exactly what `((d & !wmask) | (v & wmask)) & !(v & w1cmask)` says: read-only
//!   bits never change, write-1-to-clear bits clear only where ones were written and never set,
//!   writable bits take the written value; bytes outside the write do not change;
//! - a write that resets the function (Initiate FLR, PMCSR D3hot→D0 without No_Soft_Reset) is
//!   journaled as exactly one reset, and leaves the power-on values in every non-sticky bit and
//!   the written value in sticky ones; no other write resets anything; DEVICE_RESET likewise;
//! - PMCSR writes of D1/D2 (unsupported) leave the power state unchanged;
//! - masks never overlap (writable ∩ write-1-to-clear = ∅; checked once per device);
//! - BAR registers keep their type bits and read the size mask after all-ones is written;
//!   their address bits below the size stay 0;
//! - PRI Status.Stopped is the inverse of PRI Control.Enable;
//! - an access succeeds iff it lies inside the 4 KiB space and is not empty; a client read
//!   returns the space's bytes; no journal violation is recorded.
//!
//! Bits the function itself updates (Status.Interrupt, Device Status.Transactions Pending, PRI
//! Status.Stopped, MSI Pending Bits) are excluded from the byte comparison; the rules above
//! cover them where they have one.
//!
//! Input: `device: u8` (GPU, GPU with MSI, NPU, NPU with a peer), then operations:
//! `op: u8` — `op % 8` 0..=4 write, 5 client read, 6 BAR sizing probe, 7 DEVICE_RESET; length
//! from bits 3..5; offset a u16 (bits 6/7: near the end / any u64); then up to 8 data bytes.

use std::cell::RefCell;

use pcisim_devices::gpu::{self, GpuConfig, IrqMode};
use pcisim_devices::npu::{self, NpuConfig, PeerConfig};
use pcisim_pci::caps::{msi, pcie, pm, pri};
use pcisim_pci::header::reg;
use pcisim_pci::{BarKind, Endpoint, PciFunction, CONFIG_SPACE_SIZE};
use pcisim_vfio_user::{region, Device};

use crate::Input;

const N: usize = CONFIG_SPACE_SIZE;
type Bytes = Box<[u8; N]>;
const MAX_OPS: usize = 64;

fn zeroed() -> Bytes {
    Box::new([0u8; N])
}

/// One BAR register pair as the checks need it.
#[derive(Debug, Clone, Copy)]
struct BarReg {
    at: usize,
    size: u64,
    mem64: bool,
    /// Type and prefetchable bits of the low register.
    flags: u32,
}

/// A function plus what the checks derive once from it.
struct Rig<F: PciFunction> {
    name: &'static str,
    ep: Endpoint<F>,
    wmask: Bytes,
    w1c: Bytes,
    sticky: Bytes,
    power_on: Bytes,
    /// Bits the function updates itself.
    dev: Bytes,
    /// The non-zero bytes of `dev` and `sticky`, as (offset, mask).
    dev_list: Vec<(usize, u8)>,
    sticky_list: Vec<(usize, u8)>,
    bars: Vec<BarReg>,
    pmcsr: Option<usize>,
    flr: Option<usize>,
    pri: Option<(usize, usize)>,
    no_soft_reset: bool,
}

fn byte_masks(f: impl Fn(u16) -> u32) -> Bytes {
    let mut b = zeroed();
    for (i, v) in b.iter_mut().enumerate() {
        *v = f(i as u16) as u8;
    }
    b
}

impl<F: PciFunction> Rig<F> {
    fn new(name: &'static str, ep: Endpoint<F>, no_soft_reset: bool) -> Self {
        let cs = ep.config();
        let wmask = byte_masks(|o| cs.wmask_u32(o));
        let w1c = byte_masks(|o| cs.w1cmask_u32(o));
        let sticky = byte_masks(|o| cs.sticky_u32(o));
        let power_on = byte_masks(|o| cs.power_on_u32(o));
        for i in 0..N {
            assert_eq!(
                wmask[i] & w1c[i],
                0,
                "{name}: writable and W1C masks overlap at {i:#x}"
            );
        }
        let offs = ep.cap_offsets();
        let mut dev = zeroed();
        dev[reg::STATUS as usize] |= 1 << 3;
        if let Some(p) = offs.pcie {
            dev[p.reg(pcie::DEVSTA) as usize] |= 1 << pcie::DEVSTA_TRANSACTIONS_PENDING;
        }
        let pri = offs.pri.map(|p| {
            let sta = p.reg(pri::STATUS) as usize + 1;
            dev[sta] |= 1 << (pri::STATUS_STOPPED - 8);
            (p.reg(pri::CONTROL) as usize, sta)
        });
        if let Some(m) = offs.msi {
            for k in 0..4 {
                dev[m.reg(msi::PENDING_BITS) as usize + k] = 0xff;
            }
        }
        for i in 0..N {
            assert_eq!(
                dev[i] & (wmask[i] | w1c[i]),
                0,
                "{name}: a function-updated bit at {i:#x} is software-writable"
            );
        }
        let bars = ep
            .bars()
            .iter()
            .map(|(index, b)| {
                let mem64 = b.kind == BarKind::Mem64;
                BarReg {
                    at: reg::BAR0 as usize + 4 * usize::from(index),
                    size: b.size,
                    mem64,
                    flags: (if mem64 { 0b100 } else { 0 }) | (u32::from(b.prefetchable) << 3),
                }
            })
            .collect();
        let list = |b: &Bytes| -> Vec<(usize, u8)> {
            b.iter()
                .enumerate()
                .filter(|(_, &m)| m != 0)
                .map(|(i, &m)| (i, m))
                .collect()
        };
        Rig {
            name,
            dev_list: list(&dev),
            sticky_list: list(&sticky),
            pmcsr: offs.pm.map(|p| p.reg(pm::PMCSR) as usize),
            flr: offs.pcie.map(|p| p.reg(pcie::DEVCTL) as usize + 1),
            pri,
            bars,
            wmask,
            w1c,
            sticky,
            power_on,
            dev,
            ep,
            no_soft_reset,
        }
    }

    /// What a reset leaves: power-on values except in sticky bits, which keep `v`'s.
    fn reset_value(&self, v: &mut [u8; N]) {
        let mut r = self.power_on.clone();
        for &(i, m) in &self.sticky_list {
            r[i] = (r[i] & !m) | (v[i] & m);
        }
        v.copy_from_slice(&r[..]);
    }

    fn snapshot(&self) -> Bytes {
        let mut b = zeroed();
        self.ep
            .config()
            .read(0, &mut b[..])
            .expect("reading the whole config space");
        b
    }

    fn resets(&self) -> u64 {
        self.ep.journal().stats().resets
    }

    fn u32_at(b: &[u8; N], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// Compare `after` with `expected` outside the function-updated bits. The common case is
    /// two copies and a memcmp: the harness is instrumented too, and a loop over 4 KiB after
    /// every access would cost more than the access.
    fn compare(
        &self,
        what: &dyn Fn() -> String,
        before: &[u8; N],
        after: &[u8; N],
        expected: &[u8; N],
    ) {
        let (mut a, mut e) = (*after, *expected);
        for &(i, m) in &self.dev_list {
            a[i] &= !m;
            e[i] &= !m;
        }
        if a[..] == e[..] {
            return;
        }
        for i in 0..N {
            let diff = (after[i] ^ expected[i]) & !self.dev[i];
            if diff == 0 {
                continue;
            }
            let (w, c) = (self.wmask[i], self.w1c[i]);
            let kind = if diff & !(w | c) != 0 {
                "read-only bits changed"
            } else if diff & c != 0 {
                "write-1-to-clear bits wrong"
            } else {
                "writable bits wrong"
            };
            panic!(
                "{}: after {}: {kind} at {i:#x}: before {:#04x} after {:#04x} expected {:#04x} \
                 (wmask {w:#04x} w1c {c:#04x} sticky {:#04x})",
                self.name,
                what(),
                before[i],
                after[i],
                expected[i],
                self.sticky[i]
            );
        }
    }

    /// Invariants that hold whatever was done.
    fn check_global(&self, what: &dyn Fn() -> String, now: &[u8; N]) {
        for b in &self.bars {
            let lo = Self::u32_at(now, b.at);
            assert_eq!(
                lo & 0xf,
                b.flags,
                "{}: after {}: BAR type bits",
                self.name,
                what()
            );
            if b.size < 1 << 32 {
                assert_eq!(
                    lo & (b.size as u32 - 1) & !0xf,
                    0,
                    "{}: after {}: BAR address bits below the size",
                    self.name,
                    what()
                );
            }
            if b.mem64 {
                let hi = Self::u32_at(now, b.at + 4);
                assert_eq!(
                    hi & ((b.size - 1) >> 32) as u32,
                    0,
                    "{}: after {}: upper BAR bits below the size",
                    self.name,
                    what()
                );
            }
        }
        if let Some((ctl, sta)) = self.pri {
            let enabled = now[ctl] & (1 << pri::CONTROL_ENABLE) != 0;
            let stopped = now[sta] & 1 != 0;
            assert_eq!(
                stopped,
                !enabled,
                "{}: after {}: PRI Stopped vs Enable",
                self.name,
                what()
            );
        }
        crate::assert_no_violations(self.ep.journal(), what);
    }

    /// A client write of `data` at `off`, checked.
    fn write(&mut self, off: u64, data: &[u8]) {
        let before = self.snapshot();
        let resets = self.resets();
        let r = self.ep.region_write(region::CONFIG, off, data);
        let after = self.snapshot();
        let what = || format!("write {data:02x?} at {off:#x}");
        let inside = in_space(off, data.len());
        assert_eq!(r.is_ok(), inside, "{}: {}: {r:?}", self.name, what());
        let mut exp = before.clone();
        let mut reset = false;
        if let Some(start) = inside.then_some(off as usize) {
            for (k, &v) in data.iter().enumerate() {
                let i = start + k;
                exp[i] = ((before[i] & !self.wmask[i]) | (v & self.wmask[i])) & !(v & self.w1c[i]);
            }
            let flr = self.flr.is_some_and(|at| {
                (start..start + data.len()).contains(&at) && data[at - start] & 0x80 != 0
            });
            let mut pm_reset = false;
            if let Some(at) = self.pmcsr {
                let state = exp[at] & 3;
                if state == 1 || state == 2 {
                    exp[at] = (exp[at] & !3) | (before[at] & 3);
                }
                pm_reset = before[at] & 3 == 3 && exp[at] & 3 == 0 && !self.no_soft_reset;
            }
            reset = flr || pm_reset;
        }
        let delta = self.resets() - resets;
        assert_eq!(
            delta,
            u64::from(reset),
            "{}: {}: {delta} resets, expected {}",
            self.name,
            what(),
            u64::from(reset)
        );
        if reset {
            self.reset_value(&mut exp);
        }
        self.compare(&what, &before, &after, &exp);
        self.check_global(&what, &after);
    }

    /// A client read: succeeds iff inside, returns the space's bytes, changes nothing else.
    fn read(&mut self, off: u64, len: usize) {
        let before = self.snapshot();
        let mut buf = vec![0u8; len];
        let r = self.ep.region_read(region::CONFIG, off, &mut buf);
        let after = self.snapshot();
        let what = || format!("read {len} at {off:#x}");
        let inside = in_space(off, len);
        assert_eq!(r.is_ok(), inside, "{}: {}: {r:?}", self.name, what());
        if inside {
            let s = off as usize;
            assert_eq!(
                buf[..],
                after[s..s + len],
                "{}: {} returned",
                self.name,
                what()
            );
        }
        self.compare(&what, &before, &after, &before);
        self.check_global(&what, &after);
    }

    /// Size BAR `k` as a driver does: all-ones, read back, restore.
    fn probe(&mut self, k: usize) {
        let Some(b) = self.bars.get(k % self.bars.len().max(1)).copied() else {
            return;
        };
        let regs: &[usize] = if b.mem64 { &[0, 4] } else { &[0] };
        for &r in regs {
            let at = b.at + r;
            let old = self.snapshot();
            let saved = [old[at], old[at + 1], old[at + 2], old[at + 3]];
            self.write(at as u64, &[0xff; 4]);
            let mut v = [0u8; 4];
            self.ep
                .region_read(region::CONFIG, at as u64, &mut v)
                .expect("reading a BAR");
            let v = u32::from_le_bytes(v);
            let mask = !(b.size - 1);
            let expect = if r == 0 {
                (mask as u32 & !0xf) | b.flags
            } else {
                (mask >> 32) as u32
            };
            assert_eq!(
                v, expect,
                "{}: BAR at {at:#x} (size {:#x}) sizing read",
                self.name, b.size
            );
            self.write(at as u64, &saved);
        }
    }

    fn device_reset(&mut self) {
        let before = self.snapshot();
        let resets = self.resets();
        self.ep.reset().expect("DEVICE_RESET");
        let after = self.snapshot();
        assert_eq!(
            self.resets() - resets,
            1,
            "{}: DEVICE_RESET journaled",
            self.name
        );
        let mut exp = before.clone();
        self.reset_value(&mut exp);
        let what = || "DEVICE_RESET".to_string();
        self.compare(&what, &before, &after, &exp);
        self.check_global(&what, &after);
    }

    fn run(&mut self, inp: &mut Input<'_>) {
        // A new client: power-on state, sticky bits included.
        self.ep.detach();
        let now = self.snapshot();
        self.compare(
            &|| "power-on reset".into(),
            &now,
            &now,
            &self.power_on.clone(),
        );
        for _ in 0..MAX_OPS {
            if inp.is_empty() {
                break;
            }
            let op = inp.u8();
            match op % 8 {
                kind @ 0..=5 => {
                    let len = [4usize, 1, 2, 4, 8, 3, 0, 4][usize::from((op >> 3) & 7)];
                    let off = match op >> 6 {
                        0 | 1 => u64::from(inp.u16() & 0xfff),
                        2 => (N as u64 - 8) + u64::from(inp.u8() % 16),
                        _ => inp.u64(),
                    };
                    if kind == 5 {
                        self.read(off, len);
                    } else {
                        let data = inp.array::<8>();
                        self.write(off, &data[..len]);
                    }
                }
                6 => self.probe(usize::from(inp.u8())),
                _ => self.device_reset(),
            }
        }
    }
}

fn in_space(off: u64, len: usize) -> bool {
    len > 0 && off.checked_add(len as u64).is_some_and(|e| e <= N as u64)
}

struct Rigs {
    gpu: Rig<gpu::Gpu>,
    gpu_msi: Rig<gpu::Gpu>,
    npu: Rig<npu::Npu>,
    npu_peer: Rig<npu::Npu>,
}

fn build() -> Rigs {
    let g = GpuConfig::default();
    let gm = GpuConfig {
        name: "gpu-msi".into(),
        irq: IrqMode::Msi,
        no_soft_reset: true,
        immediate_readiness: true,
        ..GpuConfig::default()
    };
    let n = NpuConfig::default();
    let np = NpuConfig {
        name: "npu-peer".into(),
        peer: Some(PeerConfig {
            id: npu::peer_id_from_name("/tmp/gpu.sock"),
            vendor_id: 0x1234,
            device_id: 0x0b10,
        }),
        ..NpuConfig::default()
    };
    Rigs {
        gpu: Rig::new("gpu", gpu::endpoint(&g).expect("gpu"), g.no_soft_reset),
        gpu_msi: Rig::new(
            "gpu-msi",
            gpu::endpoint(&gm).expect("gpu"),
            gm.no_soft_reset,
        ),
        npu: Rig::new("npu", npu::endpoint(&n).expect("npu"), n.no_soft_reset),
        npu_peer: Rig::new(
            "npu-peer",
            npu::endpoint(&np).expect("npu"),
            np.no_soft_reset,
        ),
    }
}

thread_local! {
    static RIGS: RefCell<Option<Rigs>> = const { RefCell::new(None) };
}

/// The harness (see the module documentation).
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let which = inp.u8() % 4;
    RIGS.with(|r| {
        let mut r = r.borrow_mut();
        let rigs = r.get_or_insert_with(build);
        match which {
            0 => rigs.gpu.run(&mut inp),
            1 => rigs.gpu_msi.run(&mut inp),
            2 => rigs.npu.run(&mut inp),
            _ => rigs.npu_peer.run(&mut inp),
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn test_config_seeds() {
        crate::run_seeds("config", super::run);
    }
}
