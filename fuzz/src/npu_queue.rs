//! Target `npu_queue`: NPU submission-queue descriptors and the page tables they are translated
//! through, executed against a mapped memory image.
//!
//! The fuzzer input becomes the contents of a 64 KiB memfd mapped by a real `DmaSpace` (the same
//! layout as `gpu_ring`: read-write, read-only, a hole, write-only, fd-less). The real NPU
//! endpoint is programmed as a driver would (queues, interrupt vectors, PASID binds with
//! page-table roots in the image, an optional INVALIDATE; the setup goes straight into the
//! register state, the doorbell and an optional UNBIND while work runs through BAR0) and its own
//! engine thread executes the queue; its host is the function's `Bus`
//! (`BusHost`) behind a wrapper that records every access. After at most 2048 accesses the
//! wrapper fails every further one, so every input terminates quickly while exercising the
//! error paths.
//!
//! Invariants, once the engine is quiet (halted or idle with no command busy, or stopped on a
//! full CQ, where an UNBIND waits too — within 5 s, else "the engine does not halt"):
//! - every access is non-empty and inside one 4 KiB page; every access that succeeded lies in a
//!   mapping whose protection allows it;
//! - COMPLETED = the number of descriptors fetched: each fetched descriptor completes once;
//! - a failed SQ fetch is the last one, and the engine halted with ERROR = SQ read; a failed CQ
//!   write halted it with ERROR = CQ write (checked when the CQ and fault queue do not overlap);
//! - FAULTS = fault records written + FQ_LOST (every translation fault is posted or counted);
//! - each completion written names its descriptor (tag, PASID, slot in order); a descriptor that
//!   fails validation completes with that status and result 0; OK means the whole length;
//!   DMA_ERROR has a failed access behind it, and a failed data access never yields OK (the only
//!   failure an OK item may have is its completion-record write);
//! - the journal records no violation except the device's own reports of what the input's
//!   driver did wrong: an access attempt the map refused, a stale translation used (a missing
//!   invalidation), a bound PASID whose page tables map no user address (`address_space_empty`,
//!   then `binding_outlived_mm`), a draining PASID used or found empty (`drain_not_awaited`).
//!   Inputs found by fuzzing that failed a rule here are replayed by `test_npu_queue_regressions`
//!   from `fuzz/regressions/npu_queue/`.
//!
//! Input: see [`Layout`].

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pcisim_devices::npu::engine::{InFlight, NpuHost};
use pcisim_devices::npu::queue::{Completion, Descriptor};
use pcisim_devices::npu::regs::*;
use pcisim_devices::npu::walk::MemError;
use pcisim_devices::npu::{self, BusHost, NpuConfig};
use pcisim_journal::Event;
use pcisim_pci::{Endpoint, MsixOutcome};
use pcisim_vfio_user::dma::MappingInfo;
use pcisim_vfio_user::{region, ClientLink, Device, DmaSpace, Interrupts};

use crate::gpu_ring::{permitted, IMAGE, MAPS};
use crate::Input;

/// Accesses allowed per input before the host fails every further one.
const BUDGET: u32 = 2048;
/// How long the engine may take to become quiet.
const QUIET: Duration = Duration::from_secs(5);
/// Addresses chosen by selector cover the image, its hole and the fd-less page.
const ADDR_SPAN: u64 = 0x22000;

/// One access the engine made through its host.
#[derive(Debug, Clone)]
struct Access {
    write: bool,
    /// A checking-mode read (not device DMA).
    inspect: bool,
    pasid: Option<u32>,
    addr: u64,
    len: usize,
    result: Result<(), MemError>,
    data: [u8; 64],
}

/// The function's `BusHost`, recording and budgeting.
struct Watch {
    inner: BusHost,
    log: Mutex<Vec<Access>>,
    budget: AtomicU32,
}

impl Watch {
    fn log(&self) -> MutexGuard<'_, Vec<Access>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spend(&self) -> bool {
        self.budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    fn record(&self, a: (bool, bool, Option<u32>, u64), bytes: &[u8], r: Result<(), MemError>) {
        let mut data = [0u8; 64];
        let n = bytes.len().min(64);
        data[..n].copy_from_slice(&bytes[..n]);
        self.log().push(Access {
            write: a.0,
            inspect: a.1,
            pasid: a.2,
            addr: a.3,
            len: bytes.len(),
            result: r,
            data,
        });
    }
}

impl NpuHost for Watch {
    fn may_master(&self) -> bool {
        self.inner.may_master()
    }

    fn dma_read(&self, pasid: Option<u32>, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let r = if self.spend() {
            self.inner.dma_read(pasid, addr, buf)
        } else {
            Err(MemError::Failed)
        };
        self.record((false, false, pasid, addr), buf, r);
        r
    }

    fn dma_write(&self, pasid: Option<u32>, addr: u64, data: &[u8]) -> Result<(), MemError> {
        let r = if self.spend() {
            self.inner.dma_write(pasid, addr, data)
        } else {
            Err(MemError::Failed)
        };
        self.record((true, false, pasid, addr), data, r);
        r
    }

    fn inspect(&self, pasid: u32, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let r = self.inner.inspect(pasid, addr, buf);
        self.record((false, true, Some(pasid), addr), buf, r);
        r
    }

    fn raise_msix(&self, vector: u16) -> MsixOutcome {
        self.inner.raise_msix(vector)
    }

    fn record(&self, event: Event) {
        self.inner.record(event);
    }

    fn in_flight(&self) -> Box<dyn InFlight + '_> {
        self.inner.in_flight()
    }
}

/// The header of an input, then the memory image.
///
/// ```text
/// flags u8: bits 0..1 binds (0..3), 2 INVALIDATE, 3 UNBIND after the doorbell, 4 UNBIND with
///           abort, 5 raw u64 queue bases (else selectors), 6 CQ_HEAD before enable
/// SQ: base sel u16, size sel u8, tail u16 | CQ: base sel u16, size sel u8, head u8
/// FQ: base sel u16, size sel u8 | CQ_IRQ, FQ_IRQ, CMD_IRQ: u8 each (bit 7: enabled)
/// per bind: pasid u16, root sel u16, flags u8 | INVALIDATE: pasid u16, addr u64, len u64
/// UNBIND: pasid u16 | [raw bases: SQ, CQ, FQ u64] | image
/// ```
#[derive(Debug, Default, Clone)]
pub struct Layout {
    flags: u8,
    sq: (u64, u32, u32),
    cq: (u64, u32, u32),
    fq: (u64, u32),
    irqs: [u32; 3],
    binds: Vec<(u32, u64, u32)>,
    invalidate: Option<(u32, u64, u64)>,
    unbind: Option<u32>,
}

fn addr(sel: u16) -> u64 {
    (u64::from(sel) * 32) % ADDR_SPAN
}

fn qsize(sel: u8) -> u32 {
    match sel {
        0..=0xef => 1 << (sel % 7),
        0xf0 => 0,
        0xf1 => 3,
        0xf2 => MAX_QUEUE_SIZE,
        0xf3 => MAX_QUEUE_SIZE * 2,
        _ => u32::from(sel),
    }
}

fn irq(v: u8) -> u32 {
    if v & 0x80 != 0 {
        IRQ_ENABLE | u32::from(v & 0x1f)
    } else {
        0
    }
}

impl Layout {
    fn parse(inp: &mut Input<'_>) -> Layout {
        let flags = inp.u8();
        let sq = (addr(inp.u16()), qsize(inp.u8()), u32::from(inp.u16()));
        let cq = (addr(inp.u16()), qsize(inp.u8()), u32::from(inp.u8()));
        let fq = (addr(inp.u16()), qsize(inp.u8()));
        let irqs = [irq(inp.u8()), irq(inp.u8()), irq(inp.u8())];
        let binds = (0..flags & 3)
            .map(|_| {
                let pasid = u32::from(inp.u16());
                let root = (u64::from(inp.u16()) << 12) % ADDR_SPAN;
                let f = u32::from(inp.u8());
                (pasid, root, f)
            })
            .collect();
        let invalidate = (flags & 4 != 0).then(|| (u32::from(inp.u16()), inp.u64(), inp.u64()));
        let unbind = (flags & 8 != 0).then(|| u32::from(inp.u16()));
        let mut l = Layout {
            flags,
            sq,
            cq,
            fq,
            irqs,
            binds,
            invalidate,
            unbind,
        };
        if flags & 0x20 != 0 {
            l.sq.0 = inp.u64();
            l.cq.0 = inp.u64();
            l.fq.0 = inp.u64();
        }
        l
    }
}

struct Rig {
    ep: Endpoint<npu::Npu>,
    image: File,
    watch: Arc<Watch>,
    buf: Vec<u8>,
}

fn build() -> Rig {
    let mut ep = npu::endpoint(&NpuConfig {
        name: "fuzz-npu".into(),
        ..NpuConfig::default()
    })
    .expect("npu");
    let image = crate::memfd(c"fuzz-npu-image", IMAGE as u64);
    let dma = DmaSpace::new();
    for &(iova, size, prot, off) in &MAPS {
        let fd = off.map(|o| (OwnedFd::from(image.try_clone().expect("dup")), o));
        dma.map(iova, size, prot, fd).expect("mapping the image");
    }
    ep.attach(ClientLink {
        irqs: Interrupts::new(&[1, 0, 16, 1, 1]),
        dma,
    });
    for &(iova, size, prot, off) in &MAPS {
        ep.dma_mapped(&MappingInfo {
            iova,
            size,
            prot,
            backed: off.is_some(),
        });
    }
    let watch = Arc::new(Watch {
        inner: BusHost(ep.bus().clone()),
        log: Mutex::new(Vec::new()),
        budget: AtomicU32::new(0),
    });
    ep.function_mut().attach_host(watch.clone());
    Rig {
        ep,
        image,
        watch,
        buf: vec![0u8; IMAGE],
    }
}

impl Rig {
    fn wr(&mut self, off: u64, v: u32) {
        self.ep
            .region_write(0, off, &v.to_le_bytes())
            .expect("NPU register write");
    }

    /// A register write straight into the NPU's state, without waking the engine thread (the
    /// setup of an input; the doorbell then goes through BAR0). Twenty-odd wake-ups per input
    /// would cost more than everything else.
    fn set(&mut self, off: u64, v: u32) {
        self.ep.function().shared().lock().write(off, v);
    }

    fn set64(&mut self, lo: u64, v: u64) {
        self.set(lo, v as u32);
        self.set(lo + 4, (v >> 32) as u32);
    }

    fn rd(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.ep
            .region_read(0, off, &mut b)
            .expect("NPU register read");
        u32::from_le_bytes(b)
    }

    /// A mailbox command; `doorbell`: the last write goes through BAR0 (wakes the engine).
    fn command(&mut self, op: u32, pasid: u32, flags: u32, addr: u64, len: u64, doorbell: bool) {
        self.set(CMD_PASID, pasid);
        self.set(CMD_FLAGS, flags);
        self.set64(CMD_ADDR_LO, addr);
        self.set64(CMD_LEN_LO, len);
        if doorbell {
            self.wr(CMD_OP, op);
        } else {
            self.set(CMD_OP, op);
        }
    }

    fn wait_quiet(&mut self, l: &Layout) -> u32 {
        let deadline = Instant::now() + QUIET;
        loop {
            let st = self.rd(STATUS);
            let busy = self.rd(CMD_STATUS) & CMD_BUSY != 0;
            // An UNBIND waits while the CQ is full (docs/npu.md): quiet too, until the driver
            // makes room.
            if st & STATUS_CQ_FULL != 0 || (st & (STATUS_HALTED | STATUS_IDLE) != 0 && !busy) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "the NPU engine did not become quiet within {QUIET:?}: status {st:#x}, \
                 command busy {busy}, layout {l:x?}"
            );
            std::thread::yield_now();
        }
    }

    fn run(&mut self, inp: &mut Input<'_>) {
        let l = Layout::parse(inp);
        let img = inp.rest();
        let n = img.len().min(IMAGE);
        self.buf[..n].copy_from_slice(&img[..n]);
        self.buf[n..].fill(0);

        // Power-on registers, no PASID bound, Bus Master on; then the image.
        self.ep.reset().expect("DEVICE_RESET");
        self.ep
            .region_write(region::CONFIG, 4, &[0b110, 0])
            .expect("Command");
        self.image
            .write_all_at(&self.buf, 0)
            .expect("writing the image");
        let seq = self.ep.journal().last_seq();
        self.watch.log().clear();
        self.watch.budget.store(BUDGET, Ordering::Release);

        self.set64(CQ_BASE_LO, l.cq.0);
        self.set(CQ_SIZE, l.cq.1);
        self.set64(FQ_BASE_LO, l.fq.0);
        self.set(FQ_SIZE, l.fq.1);
        self.set(CQ_IRQ, l.irqs[0]);
        self.set(FQ_IRQ, l.irqs[1]);
        self.set(CMD_IRQ, l.irqs[2]);
        for &(pasid, root, flags) in &l.binds {
            self.command(OP_BIND, pasid, flags, root, 0, false);
        }
        if let Some((pasid, va, len)) = l.invalidate {
            self.command(OP_INVALIDATE, pasid, 0, va, len, false);
        }
        self.set64(SQ_BASE_LO, l.sq.0);
        self.set(SQ_SIZE, l.sq.1);
        if l.flags & 0x40 != 0 {
            self.set(CQ_HEAD, l.cq.2);
        }
        self.set(CONTROL, CONTROL_ENABLE);
        self.wr(SQ_TAIL, l.sq.2);
        if let Some(pasid) = l.unbind {
            let flags = if l.flags & 0x10 != 0 {
                UNBIND_FLAG_ABORT
            } else {
                0
            };
            self.command(OP_UNBIND, pasid, flags, 0, 0, true);
        }
        let status = self.wait_quiet(&l);
        let regs = Regs {
            status,
            error: self.rd(ERROR),
            completed: self.rd(COMPLETED),
            faults: self.rd(FAULTS),
            fq_lost: self.rd(FQ_LOST),
        };
        // Quiet is stable: nothing more happens until the next input resets the function.
        let log: Vec<Access> = std::mem::take(&mut *self.watch.log());
        check(&l, &regs, &log);
        crate::gpu_ring::check_journal(self.ep.journal(), seq, true);
    }
}

#[derive(Debug)]
struct Regs {
    status: u32,
    error: u32,
    completed: u32,
    faults: u32,
    fq_lost: u32,
}

fn in_ring(addr: u64, base: u64, size: u32, entry: u64) -> bool {
    addr >= base
        && u128::from(addr) < u128::from(base) + u128::from(size) * u128::from(entry)
        && (addr - base).is_multiple_of(entry)
}

fn check(l: &Layout, regs: &Regs, log: &[Access]) {
    let ctx = || format!("layout {l:x?}, registers {regs:x?}");
    for a in log {
        assert!(a.len > 0, "empty access {a:x?}: {}", ctx());
        assert!(
            a.addr % 4096 + a.len as u64 <= 4096,
            "access crosses a page: {a:x?}: {}",
            ctx()
        );
        if a.result.is_ok() {
            assert!(
                permitted(a.addr, a.len, a.write),
                "access outside the permitted map succeeded: {a:x?}: {}",
                ctx()
            );
        }
    }
    let halted = regs.status & STATUS_HALTED != 0;
    let is_fetch = |a: &Access| a.pasid.is_none() && !a.write && !a.inspect;
    let fetches: Vec<usize> = (0..log.len()).filter(|&i| is_fetch(&log[i])).collect();
    let ok_fetches = fetches.iter().filter(|&&i| log[i].result.is_ok()).count();
    assert_eq!(
        regs.completed as usize,
        ok_fetches,
        "COMPLETED vs descriptors fetched: {}",
        ctx()
    );
    for (k, &i) in fetches.iter().enumerate() {
        let f = &log[i];
        assert_eq!(f.len, DESC_SIZE as usize, "fetch size: {}", ctx());
        if f.result.is_err() && f.result != Err(MemError::Refused) {
            assert_eq!(
                k,
                fetches.len() - 1,
                "fetch after a failed fetch: {}",
                ctx()
            );
            assert!(
                halted && regs.error == ERROR_SQ_READ,
                "failed SQ fetch not reported: {}",
                ctx()
            );
        }
    }

    // Writes without a PASID: CQ entries and fault records, told apart by the rings.
    let (cq_base, cq_size) = (l.cq.0, l.cq.1);
    let (fq_base, fq_size) = (l.fq.0, l.fq.1);
    let cq_end = u128::from(cq_base) + u128::from(cq_size) * 32;
    let fq_end = u128::from(fq_base) + u128::from(fq_size) * 32;
    let disjoint = cq_end <= u128::from(fq_base) || fq_end <= u128::from(cq_base);
    if !disjoint {
        return;
    }
    let is_cq = |a: &Access| {
        a.pasid.is_none() && a.write && in_ring(a.addr, cq_base, cq_size, COMPLETION_SIZE)
    };
    let is_fq =
        |a: &Access| a.pasid.is_none() && a.write && in_ring(a.addr, fq_base, fq_size, FAULT_SIZE);
    let fq_written = log.iter().filter(|a| is_fq(a) && a.result.is_ok()).count();
    assert_eq!(
        regs.faults as usize,
        fq_written + regs.fq_lost as usize,
        "FAULTS vs fault records written + FQ_LOST: {}",
        ctx()
    );
    for a in log.iter().filter(|a| is_cq(a)) {
        if a.result.is_err() && a.result != Err(MemError::Refused) {
            assert!(
                halted && regs.error == ERROR_CQ_WRITE,
                "failed CQ write not reported: {}",
                ctx()
            );
        }
    }

    // Item by item: from a successful fetch to the next fetch.
    let ok: Vec<usize> = fetches
        .iter()
        .copied()
        .filter(|&i| log[i].result.is_ok())
        .collect();
    for (k, &start) in ok.iter().enumerate() {
        let end = fetches
            .iter()
            .copied()
            .find(|&i| i > start)
            .unwrap_or(log.len());
        let item = &log[start + 1..end];
        let mut raw = [0u8; 64];
        raw.copy_from_slice(&log[start].data);
        let d = Descriptor::decode(&raw);
        let Some(cq) = item.iter().rev().find(|a| is_cq(a) && a.result.is_ok()) else {
            continue;
        };
        let mut rec = [0u8; 32];
        rec.copy_from_slice(&cq.data[..32]);
        let c = Completion::decode(&rec)
            .unwrap_or_else(|| panic!("CQ entry without the valid bit: {}", ctx()));
        let what = || format!("item {k} {d:x?} completed {c:x?}: {}", ctx());
        assert_eq!(
            (c.tag, c.pasid),
            (d.tag, d.pasid),
            "completion of another item: {}",
            what()
        );
        assert!(c.status <= ST_DMA_ERROR, "unknown status: {}", what());
        let sq_slot = (log[start].addr.wrapping_sub(l.sq.0) / DESC_SIZE) as u32;
        assert_eq!(c.slot, sq_slot, "completion slot: {}", what());
        if let Some(st) = d.validate() {
            assert_eq!((c.status, c.result), (st, 0), "{}", what());
            continue;
        }
        let failed_data = item
            .iter()
            .any(|a| a.pasid.is_some() && !a.inspect && a.result.is_err());
        match c.status {
            ST_OK if d.op != DESC_NOP => {
                assert_eq!(c.result, d.len, "OK with a partial length: {}", what());
                assert!(
                    !failed_data || d.crec != 0,
                    "a failed data access ended OK: {}",
                    what()
                );
            }
            ST_DMA_ERROR => assert!(failed_data, "DMA_ERROR without a failure: {}", what()),
            ST_MISMATCH => assert!(c.result < d.len, "{}", what()),
            ST_TRANSLATION_FAULT | ST_ABORTED => {
                assert!(c.result < d.len.max(1), "{}", what())
            }
            _ => {}
        }
    }
}

thread_local! {
    static RIG: RefCell<Option<Rig>> = const { RefCell::new(None) };
}

/// The harness (see the module documentation).
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    RIG.with(|r| {
        let mut r = r.borrow_mut();
        r.get_or_insert_with(build).run(&mut inp);
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn test_npu_queue_seeds() {
        crate::run_seeds("npu_queue", super::run);
    }

    /// Inputs libFuzzer found that broke a rule of this harness, kept as they were found.
    /// `binding-outlived-mm`: the input's page tables leave a bound PASID's lower half empty;
    /// since the NPU's checking mode reports that (`address_space_empty` →
    /// `binding_outlived_mm`), the harness took the device's report for a device bug.
    #[test]
    fn test_npu_queue_regressions() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions/npu_queue");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .collect();
        files.sort();
        assert!(
            !files.is_empty(),
            "no regression inputs in {}",
            dir.display()
        );
        for f in files {
            let bytes = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            eprintln!(
                "npu_queue: regression {} ({} bytes)",
                f.display(),
                bytes.len()
            );
            super::run(&bytes);
        }
    }
}
