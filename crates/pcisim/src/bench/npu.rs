//! The NPU translation figures: an NPU's work queue filling client pages through a PASID's
//! page tables (walks, ATC hits), with and without the checker, against the same fill done
//! directly.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use super::memory::{attach_client, dma_fd, memfd, Mapping};
use super::report::NamedFigure;
use super::POLL;

/// Client memory layout of the NPU figure (IOVA = offset in one memfd).
pub(super) mod npu_layout {
    /// The PASID's PML4; its lower tables follow.
    pub const ROOT: u64 = 0x10_0000;
    pub const SQ: u64 = 0x20_0000;
    pub const CQ: u64 = 0x21_0000;
    pub const QSIZE: u32 = 64;
    /// Physical pages behind the virtual range.
    pub const DATA: u64 = 0x100_0000;
    /// The virtual range (1 GiB aligned: one PD, one PT per 512 pages).
    pub const VA: u64 = 0x7f00_0000_0000;
    pub const PASID: u32 = 5;
    pub const MEM: u64 = 0x200_0000;
    /// Most pages the image holds.
    pub const MAX_PAGES: u64 = (MEM - DATA) / 4096;
    /// Pages each FILL covers (fits the default ATC twice over).
    pub const PAGES: u64 = 256;
    /// Translations per timed sample (descriptors queued back to back): 63 FILLs of `PAGES`,
    /// as many as the queue holds. A sample also pays one doorbell wake-up of the engine and
    /// the completion poll's 20 µs sleeps (plus timer slack); with 16 FILLs (4096 pages,
    /// ~0.4 ms once the FILL ran at half memset speed) those were a tenth or more of it, which
    /// the memset floor does not pay.
    pub const PER_SAMPLE: u64 = 63 * PAGES;
}

/// One NPU with a bound PASID over a memfd image with real 4-level tables mapping `pages`
/// user pages at `VA`.
pub(super) struct NpuRig {
    pub(super) ep: pcisim_pci::Endpoint<pcisim_devices::npu::Npu>,
    pub(super) atc_entries: u32,
    /// Checking mode on.
    pub(super) checking: bool,
    /// Write runs before the timed samples.
    pub(super) runs0: u64,
    pub(super) mem: std::fs::File,
    pub(super) map: Mapping,
    pub(super) tail: u32,
    pub(super) tag: u64,
}

impl NpuRig {
    pub(super) fn new(pages: u64, checking: bool, atc_entries: u32) -> Result<NpuRig> {
        use npu_layout::*;
        use pcisim_devices::npu::regs as r;
        use pcisim_vfio_user::dma::{PROT_READ, PROT_WRITE};
        use pcisim_vfio_user::DmaSpace;

        if pages == 0 || pages > MAX_PAGES {
            bail!("the NPU figure maps 1..={MAX_PAGES} pages");
        }
        let mem = memfd(MEM)?;
        // 4-level tables: PML4 → PDPT → PD → one PT per 2 MiB, user + writable at every level.
        const FLAGS: u64 = 0x7; // P | R/W | U/S
        let idx = |va: u64, level: u32| (va >> (12 + 9 * (level - 1))) & 0x1ff;
        let entry = |table: u64, i: u64, v: u64| mem.write_at(&v.to_le_bytes(), table + 8 * i);
        let (pdpt, pd) = (ROOT + 0x1000, ROOT + 0x2000);
        entry(ROOT, idx(VA, 4), pdpt | FLAGS)?;
        entry(pdpt, idx(VA, 3), pd | FLAGS)?;
        for p in 0..pages {
            let va = VA + p * 4096;
            let pt = ROOT + 0x3000 + (p / 512) * 0x1000;
            if p % 512 == 0 {
                entry(pd, idx(va, 2), pt | FLAGS)?;
            }
            entry(pt, idx(va, 1), (DATA + p * 4096) | FLAGS)?;
        }
        let mut ep = pcisim_devices::npu::endpoint(&pcisim_devices::npu::NpuConfig {
            name: format!("bench-npu-{checking}-{atc_entries}"),
            checking,
            atc_entries,
            ..Default::default()
        })?;
        let dma = DmaSpace::new();
        dma.map(0, MEM, PROT_READ | PROT_WRITE, Some(dma_fd(&mem)?))?;
        attach_client(&mut ep, &dma)?;
        let map = Mapping::new(&mem, MEM as usize)?;
        let mut rig = NpuRig {
            ep,
            atc_entries,
            checking,
            runs0: 0,
            mem,
            map,
            tail: 0,
            tag: 0,
        };
        rig.wr(r::SQ_BASE_LO, SQ as u32)?;
        rig.wr(r::SQ_SIZE, QSIZE)?;
        rig.wr(r::CQ_BASE_LO, CQ as u32)?;
        rig.wr(r::CQ_SIZE, QSIZE)?;
        rig.wr(r::CONTROL, r::CONTROL_ENABLE)?;
        rig.wr(r::CMD_PASID, PASID)?;
        rig.wr(r::CMD_FLAGS, 0)?;
        rig.wr(r::CMD_ADDR_LO, ROOT as u32)?;
        rig.wr(r::CMD_ADDR_HI, 0)?;
        rig.wr(r::CMD_OP, r::OP_BIND)?;
        if rig.rd(r::CMD_STATUS)? & 0xff != r::CMD_OK {
            bail!("the NPU refused to bind PASID {PASID}");
        }
        Ok(rig)
    }

    pub(super) fn wr(&mut self, off: u64, v: u32) -> Result<()> {
        use pcisim_vfio_user::Device;
        Ok(self.ep.region_write(0, off, &v.to_le_bytes())?)
    }

    pub(super) fn rd(&mut self, off: u64) -> Result<u32> {
        use pcisim_vfio_user::Device;
        let mut b = [0u8; 4];
        self.ep.region_read(0, off, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// `k` FILL descriptors of the first `pages` pages, queued at once; returns the seconds
    /// from the doorbell to the last completion.
    pub(super) fn fill(&mut self, k: u32, pages: u64) -> Result<f64> {
        use npu_layout::*;
        use pcisim_devices::npu::queue::{Completion, Descriptor};
        use pcisim_devices::npu::regs as r;
        if k == 0 || k >= QSIZE {
            bail!("1..{QSIZE} descriptors at a time");
        }
        let first = self.tail;
        for i in 0..k {
            self.tag += 1;
            let slot = (first + i) % QSIZE;
            self.mem.write_at(&[0u8; 32], CQ + u64::from(slot) * 32)?;
            let d = Descriptor {
                op: r::DESC_FILL,
                pasid: PASID,
                src: 0x0123_4567_89ab_cdef ^ self.tag,
                dst: VA,
                len: pages * 4096,
                tag: self.tag,
                ..Default::default()
            };
            self.mem
                .write_at(&d.encode(), SQ + u64::from(slot) * r::DESC_SIZE)?;
        }
        self.tail = (first + k) % QSIZE;
        let last = CQ + u64::from((first + k - 1) % QSIZE) * 32;
        let t = Instant::now();
        let tail = self.tail;
        self.wr(r::SQ_TAIL, tail)?;
        let mut raw = [0u8; 32];
        let done = loop {
            self.mem.read_at(&mut raw, last)?;
            if Completion::decode(&raw).is_some() {
                break t.elapsed().as_secs_f64();
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the NPU did not complete {k} FILLs in 60 s");
            }
            std::thread::sleep(POLL);
        };
        for i in 0..k {
            self.mem
                .read_at(&mut raw, CQ + u64::from((first + i) % QSIZE) * 32)?;
            let c = Completion::decode(&raw).ok_or_else(|| anyhow!("completion missing"))?;
            let tag = self.tag - u64::from(k - 1 - i);
            if (c.tag, c.status, c.result) != (tag, r::ST_OK, pages * 4096) {
                bail!("the NPU's FILL completed with {c:?}");
            }
        }
        self.wr(r::CQ_HEAD, tail)?;
        Ok(done)
    }

    /// (ATC hits, ATC misses) so far.
    pub(super) fn atc(&mut self) -> Result<(u32, u32)> {
        use pcisim_devices::npu::regs as r;
        Ok((self.rd(r::ATC_HITS)?, self.rd(r::ATC_MISSES)?))
    }
}

/// The NPU figures, in pages (= translations) per second of FILL descriptors over `PAGES`
/// pages: ATC hits against writing the same pages directly (memset), ATC misses (an ATC of
/// half the range, swept in order: every translation evicts and walks) against hits, and hits
/// in checking mode against hits. The samples of the four alternate, so a busy machine slows
/// them alike. Returns (name, value, floor name, floor).
pub(super) fn npu_translate(runs: usize) -> Result<Vec<NamedFigure>> {
    use npu_layout::*;
    let atc = pcisim_devices::npu::NpuConfig::default().atc_entries;
    let k = (PER_SAMPLE / PAGES) as u32;
    // (checking, ATC entries): hit, miss, hit with checking.
    let configs = [(false, atc), (false, (PAGES / 2) as u32), (true, atc)];
    let mut rigs = Vec::new();
    for (checking, entries) in configs {
        let mut rig = NpuRig::new(PAGES, checking, entries)?;
        rig.fill(1, PAGES)?; // warm-up: pages and tables faulted in, ATC filled
        rig.runs0 = rig.ep.function().shared().lock().coalesced_runs();
        let counters = rig.atc()?;
        rigs.push((rig, counters, Vec::with_capacity(runs)));
    }
    let mut memset = Vec::with_capacity(runs);
    for r in 0..runs {
        for (rig, _, secs) in rigs.iter_mut() {
            secs.push(rig.fill(k, PAGES)?);
        }
        let map = &rigs[0].0.map;
        let t = Instant::now();
        for _ in 0..k {
            map.fill(DATA as usize, (PAGES * 4096) as usize, r as u8);
        }
        memset.push(t.elapsed().as_secs_f64());
    }
    let per_sample = (PAGES * u64::from(k)) as f64;
    let mut rates = Vec::new();
    for (rig, (h0, m0), secs) in rigs.iter_mut() {
        let (h1, m1) = rig.atc()?;
        let n = PAGES * u64::from(k) * runs as u64;
        let (hits, misses) = (u64::from(h1 - *h0), u64::from(m1 - *m0));
        let want = if u64::from(rig.atc_entries) < PAGES {
            (0, n)
        } else {
            (n, 0)
        };
        if (hits, misses) != want {
            bail!("NPU figure not measuring what it says: {hits} hits, {misses} misses of {n}");
        }
        // Hits without checking mode go to the bus in write runs of 16 pages (the FILLs are
        // page-aligned); checking mode and misses go page by page.
        let runs = rig.ep.function().shared().lock().coalesced_runs() - rig.runs0;
        let pages_per_run = pcisim_devices::npu::engine::RUN_MAX / 4096;
        let want_runs = if !rig.checking && want.0 == n {
            n / pages_per_run
        } else {
            0
        };
        if runs != want_runs {
            bail!("NPU figure not measuring what it says: {runs} write runs, not {want_runs}");
        }
        if rig.ep.journal().stats().violations != 0 {
            bail!("the NPU figure produced journal violations");
        }
        rates.push(secs.iter().map(|t| per_sample / t).collect::<Vec<f64>>());
    }
    let memset: Vec<f64> = memset.iter().map(|t| per_sample / t).collect();
    let [hit, miss, checking]: [Vec<f64>; 3] = rates
        .try_into()
        .map_err(|_| anyhow!("three NPU configurations, three figures"))?;
    let hit_name = "npu_translate_atc_hit".to_string();
    Ok(vec![
        (
            "npu_translate_atc_hit",
            hit.clone(),
            format!("memset_{PAGES}_pages"),
            memset,
        ),
        (
            "npu_translate_atc_miss",
            miss,
            hit_name.clone(),
            hit.clone(),
        ),
        ("npu_translate_atc_hit_checking", checking, hit_name, hit),
    ])
}
