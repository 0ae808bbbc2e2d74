//! Target `region`: reads and writes of any offset and size to every region (BARs 0..5, ROM,
//! config, VGA, and indices past the last) of a GPU and an NPU function, through the `Device`
//! trait as the server calls it.
//!
//! Invariants, after every access:
//! - no panic; an access succeeds iff the region is a BAR or config space, the access is not
//!   empty, lies inside the region and — with Memory Space on — does not straddle the MSI-X
//!   table or PBA edge;
//! - with Memory Space off (or D3hot) BAR reads return all-ones (nothing decodes them);
//! - a BAR0 read of a dword no register decodes (or of an unsupported size) returns 0;
//! - a write that no register takes (undefined or read-only offset, unsupported size or
//!   alignment, the PBA, a BAR while Memory Space is off) changes nothing: every register that
//!   only software changes, the MSI-X table and config space are compared before and after;
//! - a write to a plain register (GPU scratch and VRAM window, NPU command arguments) or to
//!   VRAM reads back as written;
//! - no journal violation is recorded.
//!
//! The engines run on their threads meanwhile (with no client attached their DMA is refused),
//! so registers they update (ring head/status/errors, NPU status/counters/queue tails) are not
//! compared.
//!
//! Input: `device: u8` (GPU, GPU with MSI, NPU, NPU with a peer; bit 2: Bus Master on), then
//! operations `op: u8` (bits 0..2 region, bit 3 write, bits 4..6 length, bit 7 a u64 offset
//! instead of a u16), offset, data.

use std::cell::RefCell;

use pcisim_devices::gpu::{self, regs as gregs, GpuConfig, IrqMode};
use pcisim_devices::npu::{self, regs as nregs, NpuConfig, PeerConfig};
use pcisim_pci::caps::{msi, pcie, pri};
use pcisim_pci::header::reg;
use pcisim_pci::{Endpoint, PciFunction, CONFIG_SPACE_SIZE};
use pcisim_vfio_user::{region, Device};

use crate::Input;

const MAX_OPS: usize = 64;

/// Register map of a function's BAR0, for the checks.
struct RegMap {
    /// Every offset a read decodes: the abi crate's register table (`regs::REGISTERS`), so a
    /// register added there is known here without a second list. Which of them a write acts
    /// on, holds as written or the engine updates is the device's behaviour, listed below.
    defined: Vec<u64>,
    /// Offsets a write acts on.
    writable: Vec<u64>,
    /// Offsets that hold exactly what was written.
    plain: Vec<u64>,
    /// Offsets the engine thread updates on its own.
    volatile: Vec<u64>,
}

/// The offsets of a register table, in order; `SCRATCH` (the first of `scratch` registers) stands
/// for all of them.
fn table_offsets(table: &[pcisim_abi::c::Define], scratch: Option<(u64, u64)>) -> Vec<u64> {
    let mut out = Vec::new();
    for d in table {
        match scratch {
            Some((first, count)) if d.value == first => {
                out.extend((0..count).map(|k| first + 4 * k))
            }
            _ => out.push(d.value),
        }
    }
    out
}

fn gpu_map() -> RegMap {
    use gregs::*;
    let scratch: Vec<u64> = (0..SCRATCH_COUNT).map(|k| SCRATCH + 4 * k).collect();
    let defined = table_offsets(REGISTERS, Some((SCRATCH, SCRATCH_COUNT)));
    let mut writable = vec![
        IRQ_DOORBELL,
        VRAM_OFFSET_LO,
        VRAM_OFFSET_HI,
        VRAM_LENGTH_LO,
        VRAM_LENGTH_HI,
        VRAM_SEED,
        VRAM_CMD,
        RING_BASE_LO,
        RING_BASE_HI,
        RING_SIZE,
        RING_CTRL,
        RING_TAIL,
        FENCE_VECTOR,
        ERROR_VECTOR,
    ];
    writable.extend(&scratch);
    let mut plain = vec![
        VRAM_OFFSET_LO,
        VRAM_OFFSET_HI,
        VRAM_LENGTH_LO,
        VRAM_LENGTH_HI,
        VRAM_SEED,
    ];
    plain.extend(&scratch);
    let volatile = vec![
        RING_HEAD,
        RING_STATUS,
        RING_ERROR,
        RING_FAULT_ADDR_LO,
        RING_FAULT_ADDR_HI,
        LAST_FENCE_LO,
        LAST_FENCE_HI,
        CMDS_COMPLETED,
        RING_ERRORS,
    ];
    RegMap {
        defined,
        writable,
        plain,
        volatile,
    }
}

fn npu_map() -> RegMap {
    use nregs::*;
    let writable = vec![
        CONTROL,
        CMD_PASID,
        CMD_FLAGS,
        CMD_ADDR_LO,
        CMD_ADDR_HI,
        CMD_LEN_LO,
        CMD_LEN_HI,
        CMD_OP,
        CMD_IRQ,
        SQ_BASE_LO,
        SQ_BASE_HI,
        SQ_SIZE,
        SQ_TAIL,
        CQ_BASE_LO,
        CQ_BASE_HI,
        CQ_SIZE,
        CQ_HEAD,
        CQ_IRQ,
        FQ_BASE_LO,
        FQ_BASE_HI,
        FQ_SIZE,
        FQ_HEAD,
        FQ_IRQ,
    ];
    let defined = table_offsets(REGISTERS, None);
    let plain = vec![
        CMD_PASID,
        CMD_FLAGS,
        CMD_ADDR_LO,
        CMD_ADDR_HI,
        CMD_LEN_LO,
        CMD_LEN_HI,
    ];
    let volatile = vec![
        STATUS,
        ERROR,
        COMPLETED,
        FAULTS,
        STALE_USES,
        ATC_HITS,
        ATC_MISSES,
        ATC_INVALIDATIONS,
        CMD_STATUS,
        CMD_RESULT,
        CMD_SEQ,
        SQ_HEAD,
        CQ_TAIL,
        FQ_TAIL,
        FQ_LOST,
        // CONTROL itself only changes on writes, but SQ/CQ geometry writes are refused while
        // enabled, and the engine may halt; keep the comparison to what software owns.
    ];
    RegMap {
        defined,
        writable,
        plain,
        volatile,
    }
}

/// What stays the same when a write is ignored.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    regs: Vec<(u64, u32)>,
    msix_table: Vec<u8>,
    config: Vec<u8>,
}

struct Rig<F: PciFunction> {
    name: &'static str,
    ep: Endpoint<F>,
    map: RegMap,
    /// Config-space bits the function updates itself (masked out of the comparison).
    dev: Vec<u8>,
}

impl<F: PciFunction> Rig<F> {
    fn new(name: &'static str, ep: Endpoint<F>, map: RegMap) -> Self {
        let offs = ep.cap_offsets();
        let mut dev = vec![0u8; CONFIG_SPACE_SIZE];
        dev[reg::STATUS as usize] |= 1 << 3;
        if let Some(p) = offs.pcie {
            dev[p.reg(pcie::DEVSTA) as usize] |= 1 << pcie::DEVSTA_TRANSACTIONS_PENDING;
        }
        if let Some(p) = offs.pri {
            dev[p.reg(pri::STATUS) as usize + 1] |= 1;
        }
        if let Some(m) = offs.msi {
            for k in 0..4 {
                dev[m.reg(msi::PENDING_BITS) as usize + k] = 0xff;
            }
        }
        Rig { name, ep, map, dev }
    }

    fn read_reg(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.ep
            .region_read(0, off, &mut b)
            .expect("reading a BAR0 register");
        u32::from_le_bytes(b)
    }

    fn snapshot(&mut self) -> Snapshot {
        let stable: Vec<u64> = self
            .map
            .defined
            .iter()
            .copied()
            .filter(|o| !self.map.volatile.contains(o))
            .collect();
        let regs = stable.into_iter().map(|o| (o, self.read_reg(o))).collect();
        let msix_table = self.ep.msix().map_or_else(Vec::new, |m| {
            let mut t = vec![0u8; m.config().table_len() as usize];
            m.table_read(0, &mut t);
            t
        });
        let mut config = vec![0u8; CONFIG_SPACE_SIZE];
        self.ep
            .config()
            .read(0, &mut config)
            .expect("reading config space");
        for (c, d) in config.iter_mut().zip(&self.dev) {
            *c &= !d;
        }
        Snapshot {
            regs,
            msix_table,
            config,
        }
    }

    /// Whether BAR accesses are dropped (Memory Space off or D3hot).
    fn bar_dead(&self) -> bool {
        let cs = self.ep.config();
        let mem_off = cs.read_u16(reg::COMMAND) & 2 == 0;
        let d3 = self
            .ep
            .cap_offsets()
            .pm
            .is_some_and(|p| cs.read_u16(p.reg(pcisim_pci::caps::pm::PMCSR)) & 3 == 3);
        mem_off || d3
    }

    /// The result an access must have with Memory Space on, and whether it hits the MSI-X
    /// table (`Some(true)`) or PBA.
    fn expected_ok(&self, index: u32, off: u64, len: usize) -> (bool, Option<bool>) {
        let inside = |size: u64| in_bar(off, len, size);
        if index == region::CONFIG {
            return (inside(CONFIG_SPACE_SIZE as u64), None);
        }
        let Some(bar) = self.ep.bars().get(index) else {
            return (false, None);
        };
        if !inside(bar.size) {
            return (false, None);
        }
        let Some(m) = self.ep.msix() else {
            return (true, None);
        };
        match (m.table_hit(index, off, len), m.pba_hit(index, off, len)) {
            (Some(false), _) | (_, Some(false)) => (false, None),
            (Some(true), _) => (true, Some(true)),
            (_, Some(true)) => (true, Some(false)),
            (None, None) => (true, None),
        }
    }

    /// The BAR0 registers a register-file access of `len` bytes at `off` touches.
    fn dwords(off: u64, len: usize) -> Option<Vec<u64>> {
        match (len, off % 8, off % 4) {
            (4, _, 0) => Some(vec![off]),
            (8, 0, _) => Some(vec![off, off + 4]),
            _ => None,
        }
    }

    fn access(&mut self, index: u32, off: u64, len: usize, data: Option<&[u8]>) {
        let what = format!(
            "{} of {len} bytes at region {index} offset {off:#x}",
            if data.is_some() { "write" } else { "read" }
        );
        let (mut ok, msix) = self.expected_ok(index, off, len);
        let dead = index != region::CONFIG && self.bar_dead();
        if dead
            && self
                .ep
                .bars()
                .get(index)
                .is_some_and(|b| in_bar(off, len, b.size))
        {
            // Nothing decodes the access (master abort): even one straddling the MSI-X table
            // edge completes, as all-ones or dropped.
            ok = true;
        }
        match data {
            None => {
                let mut buf = vec![0x5au8; len];
                let r = self.ep.region_read(index, off, &mut buf);
                assert_eq!(r.is_ok(), ok, "{}: {what}: {r:?}", self.name);
                if ok && dead {
                    assert!(
                        buf.iter().all(|&b| b == 0xff),
                        "{}: {what} with Memory Space off returned {buf:02x?}",
                        self.name
                    );
                } else if ok && index == 0 && msix.is_none() {
                    let decoded = Self::dwords(off, len)
                        .is_some_and(|ds| ds.iter().any(|d| self.map.defined.contains(d)));
                    if !decoded {
                        assert!(
                            buf.iter().all(|&b| b == 0),
                            "{}: {what} (no register) returned {buf:02x?}",
                            self.name
                        );
                    }
                }
            }
            Some(data) => {
                let ignored = ok
                    && index == 0
                    && (dead
                        || msix == Some(false)
                        || (msix.is_none()
                            && Self::dwords(off, len).is_none_or(|ds| {
                                ds.iter().all(|d| !self.map.writable.contains(d))
                            })));
                let before = ignored.then(|| self.snapshot());
                let r = self.ep.region_write(index, off, data);
                assert_eq!(r.is_ok(), ok, "{}: {what}: {r:?}", self.name);
                if let Some(before) = before {
                    let after = self.snapshot();
                    if before != after {
                        let regs: Vec<_> = before
                            .regs
                            .iter()
                            .zip(&after.regs)
                            .filter(|(a, b)| a != b)
                            .collect();
                        panic!(
                            "{}: ignored {what} changed state: registers {regs:x?}, table \
                             changed: {}, config changed: {}",
                            self.name,
                            before.msix_table != after.msix_table,
                            before.config != after.config
                        );
                    }
                } else if ok && !dead && index == 0 && msix.is_none() {
                    if let Some(ds) = Self::dwords(off, len) {
                        for (k, d) in ds.iter().enumerate() {
                            if self.map.plain.contains(d) {
                                let v = u32::from_le_bytes([
                                    data[4 * k],
                                    data[4 * k + 1],
                                    data[4 * k + 2],
                                    data[4 * k + 3],
                                ]);
                                let got = self.read_reg(*d);
                                assert_eq!(got, v, "{}: register {d:#x} after {what}", self.name);
                            }
                        }
                    }
                } else if ok && !dead && index == u32::from(gpu::VRAM_BAR) {
                    let mut back = vec![0u8; len];
                    self.ep
                        .region_read(index, off, &mut back)
                        .expect("reading VRAM back");
                    assert_eq!(back, data, "{}: VRAM after {what}", self.name);
                }
            }
        }
        crate::assert_no_violations(self.ep.journal(), &|| what.clone());
    }

    fn run(&mut self, inp: &mut Input<'_>, bus_master: bool) {
        self.ep.detach();
        let command: u8 = if bus_master { 0b110 } else { 0b010 };
        self.ep
            .region_write(region::CONFIG, u64::from(reg::COMMAND), &[command, 0])
            .expect("enabling memory space");
        for _ in 0..MAX_OPS {
            if inp.is_empty() {
                break;
            }
            let op = inp.u8();
            let index = match op & 7 {
                3 => 2,
                4 => region::CONFIG,
                5 => u32::from(inp.u8() % 12),
                _ => 0,
            };
            let len = match (op >> 4) & 7 {
                0 | 1 => 4,
                2 => 8,
                3 => 1,
                4 => 2,
                5 => 3,
                6 => 0,
                _ => usize::from(inp.u16() % 4097),
            };
            let off = if op & 0x80 == 0 {
                u64::from(inp.u16())
            } else {
                inp.u64()
            };
            if op & 8 != 0 {
                let mut data = inp.bytes(len).to_vec();
                data.resize(len, 0);
                self.access(index, off, len, Some(&data));
            } else {
                self.access(index, off, len, None);
            }
        }
    }
}

fn in_bar(off: u64, len: usize, size: u64) -> bool {
    len > 0 && off.checked_add(len as u64).is_some_and(|e| e <= size)
}

struct Rigs {
    gpu: Rig<gpu::Gpu>,
    gpu_msi: Rig<gpu::Gpu>,
    npu: Rig<npu::Npu>,
    npu_peer: Rig<npu::Npu>,
}

fn build() -> Rigs {
    let g = GpuConfig {
        vram_size: 1 << 20,
        ..GpuConfig::default()
    };
    let gm = GpuConfig {
        name: "gpu-msi".into(),
        irq: IrqMode::Msi,
        ..g.clone()
    };
    let np = NpuConfig {
        name: "npu-peer".into(),
        peer: Some(PeerConfig {
            id: 7,
            vendor_id: 0x1234,
            device_id: 0x0b10,
        }),
        ..NpuConfig::default()
    };
    Rigs {
        gpu: Rig::new("gpu", gpu::endpoint(&g).expect("gpu"), gpu_map()),
        gpu_msi: Rig::new("gpu-msi", gpu::endpoint(&gm).expect("gpu"), gpu_map()),
        npu: Rig::new(
            "npu",
            npu::endpoint(&NpuConfig::default()).expect("npu"),
            npu_map(),
        ),
        npu_peer: Rig::new("npu-peer", npu::endpoint(&np).expect("npu"), npu_map()),
    }
}

thread_local! {
    static RIGS: RefCell<Option<Rigs>> = const { RefCell::new(None) };
}

/// The harness (see the module documentation).
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let sel = inp.u8();
    let bus_master = sel & 4 != 0;
    RIGS.with(|r| {
        let mut r = r.borrow_mut();
        let rigs = r.get_or_insert_with(build);
        match sel % 4 {
            0 => rigs.gpu.run(&mut inp, bus_master),
            1 => rigs.gpu_msi.run(&mut inp, bus_master),
            2 => rigs.npu.run(&mut inp, bus_master),
            _ => rigs.npu_peer.run(&mut inp, bus_master),
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn test_region_seeds() {
        crate::run_seeds("region", super::run);
    }

    /// The behaviour lists name only registers of the abi's table (a write-only or plain
    /// register missing from the table would be "no register" to the read check), every
    /// offset once, and the GPU's SCRATCH stands for its 16 registers.
    #[test]
    fn test_register_maps_are_the_abi_tables() {
        use super::{gpu_map, gregs, npu_map, nregs};
        for (name, map, table_len) in [
            (
                "gpu",
                gpu_map(),
                gregs::REGISTERS.len() - 1 + gregs::SCRATCH_COUNT as usize,
            ),
            ("npu", npu_map(), nregs::REGISTERS.len()),
        ] {
            let mut seen = map.defined.clone();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), map.defined.len(), "{name}: an offset twice");
            assert_eq!(map.defined.len(), table_len, "{name}: defined offsets");
            for o in map.writable.iter().chain(&map.plain).chain(&map.volatile) {
                assert!(
                    map.defined.contains(o),
                    "{name}: {o:#x} is not in the abi table"
                );
            }
        }
        let gpu = gpu_map();
        let scratch = gregs::SCRATCH..gregs::SCRATCH + 4 * gregs::SCRATCH_COUNT;
        let in_scratch = gpu.defined.iter().filter(|o| scratch.contains(o)).count();
        assert_eq!(
            in_scratch as u64,
            gregs::SCRATCH_COUNT,
            "gpu: scratch registers"
        );
        assert!(gpu.defined.contains(&gregs::RING_ERRORS));
    }
}
