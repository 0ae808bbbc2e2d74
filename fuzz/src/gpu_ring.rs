//! Target `gpu_ring`: GPU command-ring descriptors executed against a mapped memory image.
//!
//! The fuzzer input becomes the contents of a 64 KiB memfd that a real `DmaSpace` maps as a
//! client would (read-write, read-only and write-only ranges, a hole, and a range announced
//! without an fd), attached to a real GPU endpoint's `Bus`. The real ring `Engine` runs on the
//! calling thread ([`ring::Engine::step`]) over that bus, through a wrapper that records every
//! DMA access and its outcome. Ring registers come from the input's header; Bus Master Enable
//! may be switched off and on between commands (through config space).
//!
//! Invariants, after every command:
//! - exactly one of: the command completed (HEAD advanced by one, CMDS_COMPLETED + 1) or the
//!   ring stopped (RING_ERROR set for this slot, RING_ERRORS + 1, HEAD unchanged);
//! - the first access is the fetch of the slot (32 bytes at base + 32 × head);
//! - every access is non-empty and inside one 4 KiB page; every access that succeeded lies in a
//!   mapping whose protection allows it (the `DmaSpace` enforces it; this checks the engine
//!   never got around it);
//! - a failed DMA is the last access of the command and is reported: DMA_FAULT (no memory or
//!   protection) or DMA_REFUSED (the bus said no), with RING_FAULT_ADDR = the failing address;
//!   conversely a DMA error code always has a failed access behind it;
//! - any other error stops the command before any access but the fetch, and agrees with
//!   `ring::decode` of the fetched bytes; a completed command moved exactly its length through
//!   client memory (COPY/FILL) or wrote its fence (WRITE_FENCE, LAST_FENCE = value);
//! - the engine halts: after at most size + 1 commands nothing is runnable;
//! - the journal's checker records no violation but the device's own report of an attempt the
//!   map refused (no DMA performed outside the map, none while Bus Master is off).
//!
//! Input: `flags: u8`, `base: u16`, `size: u8`, `tail: u16`, `fence vector: u8`,
//! `error vector: u8`, `toggle steps: [u8; 2]`, optional raw base (u64, flags bit 0) and raw
//! size (u32, bit 1), then the memory image.

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};

use pcisim_devices::gpu::ring::{self, err, Command, DmaFailure, EngineBus, Loc, CMD_SIZE};
use pcisim_devices::gpu::{self, GpuConfig, Vram};
use pcisim_journal::{Event, ViolationKind};
use pcisim_pci::{Bus, Endpoint, MsixOutcome};
use pcisim_vfio_user::dma::{MappingInfo, PROT_READ, PROT_WRITE};
use pcisim_vfio_user::{region, ClientLink, Device, DmaSpace, Interrupts};

use crate::Input;

/// Size of the memory image (the memfd).
pub const IMAGE: usize = 64 << 10;
/// VRAM of the engine under test.
pub const VRAM_SIZE: u64 = 64 << 10;
const PAGE: u64 = 4096;

/// The client mappings: IOVA, size, protection, offset in the image (None: announced without
/// an fd, unreachable).
pub const MAPS: [(u64, u64, u32, Option<u64>); 4] = [
    (0x0000, 0xe000, PROT_READ | PROT_WRITE, Some(0x0000)),
    (0xe000, 0x1000, PROT_READ, Some(0xe000)),
    (0x11000, 0x1000, PROT_WRITE, Some(0xf000)),
    (0x20000, 0x1000, PROT_READ | PROT_WRITE, None),
];

/// Whether `len` bytes at `iova` lie in a mapping with an fd that allows the access.
pub fn permitted(iova: u64, len: usize, write: bool) -> bool {
    let need = if write { PROT_WRITE } else { PROT_READ };
    MAPS.iter().any(|&(start, size, prot, fd)| {
        fd.is_some()
            && prot & need != 0
            && iova >= start
            && u128::from(iova) + len as u128 <= u128::from(start) + u128::from(size)
    })
}

/// One DMA access the engine made.
#[derive(Debug, Clone)]
struct Access {
    write: bool,
    iova: u64,
    len: usize,
    result: Result<(), DmaFailure>,
    /// The first 32 bytes read (the fetched command, for the first access).
    head: [u8; 32],
}

/// The GPU function's bus, recording what the engine does with it.
#[derive(Clone)]
struct Watch {
    bus: Bus,
    log: Arc<Mutex<Vec<Access>>>,
}

impl Watch {
    fn log(&self) -> MutexGuard<'_, Vec<Access>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, write: bool, iova: u64, data: &[u8], result: Result<(), DmaFailure>) {
        let mut head = [0u8; 32];
        let n = data.len().min(32);
        head[..n].copy_from_slice(&data[..n]);
        self.log().push(Access {
            write,
            iova,
            len: data.len(),
            result,
            head,
        });
    }
}

impl EngineBus for Watch {
    type Tx<'a> = pcisim_pci::Transaction<'a>;

    fn transaction(&self) -> Self::Tx<'_> {
        self.bus.transaction()
    }

    fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFailure> {
        let r = <Bus as EngineBus>::dma_read(&self.bus, iova, buf);
        self.record(false, iova, buf, r);
        r
    }

    fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), DmaFailure> {
        let r = <Bus as EngineBus>::dma_write(&self.bus, iova, data);
        self.record(true, iova, data, r);
        r
    }

    fn dma_write_posted(&self, iova: u64, data: &[u8]) -> Result<(), DmaFailure> {
        let r = <Bus as EngineBus>::dma_write_posted(&self.bus, iova, data);
        self.record(true, iova, data, r);
        r
    }

    fn raise_msix(&self, vector: u16) -> MsixOutcome {
        self.bus.raise_msix(vector)
    }

    fn journal(&self, event: Event) {
        <Bus as EngineBus>::journal(&self.bus, event);
    }
}

struct Rig {
    ep: Endpoint<gpu::Gpu>,
    image: File,
    vram: Arc<Vram>,
    engine: ring::Engine<Watch>,
    watch: Watch,
    buf: Vec<u8>,
}

fn build() -> Rig {
    let ep = gpu::endpoint(&GpuConfig {
        name: "fuzz-gpu".into(),
        vram_size: VRAM_SIZE,
        ..GpuConfig::default()
    })
    .expect("gpu");
    let image = crate::memfd(c"fuzz-image", IMAGE as u64);
    let dma = DmaSpace::new();
    let mut ep = ep;
    for &(iova, size, prot, off) in &MAPS {
        let fd = off.map(|o| {
            let f = image.try_clone().expect("dup of the image fd");
            (OwnedFd::from(f), o)
        });
        dma.map(iova, size, prot, fd).expect("mapping the image");
    }
    ep.attach(ClientLink {
        irqs: Interrupts::new(&[1, 0, 16, 1, 1]),
        dma: dma.clone(),
    });
    for &(iova, size, prot, off) in &MAPS {
        ep.dma_mapped(&MappingInfo {
            iova,
            size,
            prot,
            backed: off.is_some(),
        });
    }
    let watch = Watch {
        bus: ep.bus().clone(),
        log: Arc::new(Mutex::new(Vec::new())),
    };
    let vram = Arc::new(Vram::new(VRAM_SIZE).expect("vram"));
    let mut engine = ring::Engine::new("fuzz-ring", vram.clone(), gpu::MSIX_VECTORS);
    engine.attach_manual(watch.clone());
    Rig {
        ep,
        image,
        vram,
        engine,
        watch,
        buf: vec![0u8; IMAGE],
    }
}

fn set_bus_master(ep: &mut Endpoint<gpu::Gpu>, on: bool) {
    let v: u8 = if on { 0b110 } else { 0b010 };
    ep.region_write(region::CONFIG, 4, &[v, 0])
        .expect("writing Command");
}

impl Rig {
    fn run(&mut self, inp: &mut Input<'_>) {
        let flags = inp.u8();
        let base_sel = inp.u16();
        let size_sel = inp.u8();
        let tail_sel = inp.u16();
        let fence_vector = inp.u8();
        let error_vector = inp.u8();
        let toggles = inp.array::<2>();
        let base = if flags & 1 != 0 {
            inp.u64()
        } else {
            u64::from(base_sel % 0x22) * PAGE
        };
        let size = if flags & 2 != 0 {
            inp.u32()
        } else {
            1 << (1 + size_sel % 6)
        };
        let tail = if flags & 4 != 0 || size == 0 {
            u32::from(tail_sel)
        } else {
            u32::from(tail_sel) % size
        };

        // The memory image and a clean engine.
        let img = inp.rest();
        let n = img.len().min(IMAGE);
        self.buf[..n].copy_from_slice(&img[..n]);
        self.buf[n..].fill(0);
        self.image
            .write_all_at(&self.buf, 0)
            .expect("writing the image");
        self.buf.fill(0);
        self.vram.write(0, &self.buf).expect("clearing VRAM");
        self.engine.reset();
        set_bus_master(&mut self.ep, true);
        let seq = self.ep.journal().last_seq();
        self.watch.log().clear();

        let e = &self.engine;
        e.write_vector(true, u32::from(fence_vector));
        e.write_vector(false, u32::from(error_vector));
        e.write_base(false, base as u32);
        e.write_base(true, (base >> 32) as u32);
        e.write_size(size);
        if flags & 8 != 0 {
            // Doorbell before enable: checked at enable.
            e.write_tail(tail);
            e.write_ctrl(ring::ctrl::ENABLE);
        } else {
            e.write_ctrl(ring::ctrl::ENABLE);
            e.write_tail(tail);
        }
        let setup: Vec<Access> = std::mem::take(&mut *self.watch.log());
        assert!(setup.is_empty(), "DMA before any command ran: {setup:?}");

        let bound = size.min(ring::MAX_ENTRIES) as usize + 2;
        let mut bus_master = true;
        for step in 0..bound {
            if toggles.contains(&(step as u8)) {
                bus_master = !bus_master;
                set_bus_master(&mut self.ep, bus_master);
            }
            let before = self.engine.regs();
            if !self.engine.step() {
                break;
            }
            let after = self.engine.regs();
            let log: Vec<Access> = std::mem::take(&mut *self.watch.log());
            check_step(&before, &after, &log);
        }
        let regs = self.engine.regs();
        assert_ne!(
            regs.status(),
            ring::status::BUSY,
            "the ring did not halt after {bound} commands: {regs:?}"
        );
        check_journal(self.ep.journal(), seq, false);
    }
}

/// The journal since `seq` holds no violation except attempts the map refused (`faulted` DMA
/// outside the map: the device reports the driver's bad address) and, if `sva_ok`, the NPU's
/// reports of the input's driver breaking the SVA rules (docs/sva.md): a stale translation used
/// (a missing invalidation), a binding whose address space is empty (`binding_outlived_mm`,
/// only after the device's own `address_space_empty` in the same window: the fuzzer's page
/// tables are the input's, an empty lower half is the input's doing) and a draining PASID used
/// or found empty (`drain_not_awaited`: the input unbinds while work runs).
pub fn check_journal(journal: &pcisim_journal::Journal, seq: u64, sva_ok: bool) {
    let (records, lost) = journal.since(seq);
    if lost > 0 {
        return;
    }
    let mut empty_seen = false;
    for r in records {
        match r.event {
            Event::AddressSpaceEmpty { .. } => empty_seen = true,
            Event::Violation { kind, detail } => {
                let allowed = match kind {
                    ViolationKind::DmaOutsideMap => detail.starts_with("faulted "),
                    ViolationKind::StaleTranslation | ViolationKind::DrainNotAwaited => sva_ok,
                    ViolationKind::BindingOutlivedMm => sva_ok && empty_seen,
                    _ => false,
                };
                assert!(allowed, "journal violation {kind:?}: {detail}");
            }
            _ => {}
        }
    }
}

/// The invariants of one command (see the module documentation).
fn check_step(before: &ring::RingRegs, after: &ring::RingRegs, log: &[Access]) {
    let ctx = || {
        format!(
            "slot {} ({before:?} -> {after:?}), accesses {log:x?}",
            before.head
        )
    };
    for a in log {
        assert!(a.len > 0, "empty access: {}", ctx());
        assert!(
            a.iova % PAGE + a.len as u64 <= PAGE,
            "access crosses a page: {}",
            ctx()
        );
        if a.result.is_ok() {
            assert!(
                permitted(a.iova, a.len, a.write),
                "access outside the permitted map succeeded: {}",
                ctx()
            );
        }
    }
    let failed = log.iter().position(|a| a.result.is_err());
    if let Some(i) = failed {
        assert_eq!(i, log.len() - 1, "access after a failed DMA: {}", ctx());
    }
    let fetch = log.first().unwrap_or_else(|| panic!("no fetch: {}", ctx()));
    let slot_addr = before
        .active_base
        .wrapping_add(u64::from(before.head) * CMD_SIZE);
    assert!(
        !fetch.write && fetch.iova == slot_addr && fetch.len == CMD_SIZE as usize,
        "first access is not the fetch of the slot: {}",
        ctx()
    );
    assert_eq!(
        before.error,
        None,
        "a stopped ring ran a command: {}",
        ctx()
    );

    if let Some((code, slot)) = after.error {
        assert_eq!(slot, before.head, "error slot: {}", ctx());
        assert_eq!(after.head, before.head, "HEAD moved on an error: {}", ctx());
        assert_eq!(after.completed, before.completed, "{}", ctx());
        assert_eq!(after.errors, before.errors.wrapping_add(1), "{}", ctx());
        match failed {
            Some(i) => {
                let a = &log[i];
                let want = match a.result {
                    Err(DmaFailure::Refused) => err::DMA_REFUSED,
                    _ => err::DMA_FAULT,
                };
                assert_eq!(code, want, "failed DMA reported as {code}: {}", ctx());
                assert_eq!(after.fault_addr, a.iova, "RING_FAULT_ADDR: {}", ctx());
            }
            None => {
                assert!(
                    code != err::DMA_FAULT && code != err::DMA_REFUSED,
                    "DMA error {code} without a failed access: {}",
                    ctx()
                );
                assert_eq!(log.len(), 1, "error {code} after data accesses: {}", ctx());
                let e = ring::decode(&fetch.head, VRAM_SIZE, gpu::MSIX_VECTORS)
                    .expect_err("the fetched command decodes, yet the ring stopped");
                assert_eq!(e.code, code, "decode and engine disagree: {}", ctx());
                assert_eq!(e.addr, after.fault_addr, "{}", ctx());
            }
        }
        return;
    }

    assert!(failed.is_none(), "failed DMA ignored: {}", ctx());
    let size = after.active_size.max(1);
    assert_eq!(after.head, (before.head + 1) % size, "HEAD: {}", ctx());
    assert_eq!(
        after.completed,
        before.completed.wrapping_add(1),
        "{}",
        ctx()
    );
    assert_eq!(after.errors, before.errors, "{}", ctx());
    let cmd = ring::decode(&fetch.head, VRAM_SIZE, gpu::MSIX_VECTORS).unwrap_or_else(|e| {
        panic!(
            "completed a command that does not decode ({e:?}): {}",
            ctx()
        )
    });
    let data = &log[1..];
    let moved = |write: bool| -> u64 {
        data.iter()
            .filter(|a| a.write == write)
            .map(|a| a.len as u64)
            .sum()
    };
    match cmd {
        Command::Nop | Command::Interrupt { .. } => {
            assert!(data.is_empty(), "{cmd:?} accessed memory: {}", ctx());
        }
        Command::WriteFence { iova, value, .. } => {
            assert_eq!(after.last_fence, value, "LAST_FENCE: {}", ctx());
            assert!(
                data.len() == 1 && data[0].write && data[0].iova == iova && data[0].len == 8,
                "fence write: {}",
                ctx()
            );
        }
        Command::Copy { src, dst, len } => {
            let r = if matches!(src, Loc::Iova(_)) { len } else { 0 };
            let w = if matches!(dst, Loc::Iova(_)) { len } else { 0 };
            assert_eq!((moved(false), moved(true)), (r, w), "COPY bytes: {}", ctx());
        }
        Command::Fill { dst, len, .. } => {
            let w = if matches!(dst, Loc::Iova(_)) { len } else { 0 };
            assert_eq!((moved(false), moved(true)), (0, w), "FILL bytes: {}", ctx());
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
    fn test_gpu_ring_seeds() {
        crate::run_seeds("gpu_ring", super::run);
    }
}
