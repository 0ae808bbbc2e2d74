//! The GPU command ring and its engine thread (docs/programming-model.md, "Command ring").
//!
//! ```text
//!  driver                         register side (server thread)        engine thread
//!  ──────                         ─────────────────────────────        ─────────────
//!  commands → ring in its memory
//!  RING_TAIL = t  ───────────────▶ tail = t; notify ─────────────────▶ wake: head != tail
//!                                  (returns at once)                   fetch slot `head` (DMA)
//!                                                                      decode, check operands
//!                                                                      execute in 64 KiB chunks
//!                                                                        (abort checked between
//!                                                                         chunks; DMA through
//!                                                                         the bus, page by page;
//!                                                                         client-to-client COPY
//!                                                                         chunks in one move)
//!                                                                      head += 1; LAST_FENCE;
//!  eventfd of FENCE_VECTOR ◀──────────────────────────────────────────  MSI-X (through the bus)
//! ```
//!
//! A COPY chunk from client memory to client memory is moved by the bus in one memcpy,
//! straight from mapping to mapping ([`EngineBus::dma_copy`]), and journaled as the page-sized
//! reads and writes it stands for. When that cannot be done in full (a refusal, an injected
//! error, a hole or protection anywhere in either range, overlapping ranges, a pending hold)
//! nothing is done and the chunk goes through a bounce buffer page by page as before, so a
//! fault or refusal is reported at the exact page.
//!
//! A malformed command (bad opcode, flags, reserved bits, alignment, length, range, vector) or
//! a DMA the bus refuses or cannot perform stops the ring: RING_STATUS = ERROR, RING_ERROR =
//! code | slot << 16, RING_FAULT_ADDR = the offending address, ERROR_VECTOR raised and a `Note`
//! journaled. Nothing outside mapped client memory or VRAM is ever touched: every VRAM access
//! is bounds-checked and every client access goes through the bus, which checks the DMA map.
//!
//! Reset ([`Engine::reset`], [`Engine::reset_ring`]) bumps a generation counter, waits until
//! the engine has left the command it was executing (the engine compares the command's
//! generation with the current one before every chunk, so the wait is at most one chunk), and
//! only then puts the registers back: once it returns, the engine performs no DMA and raises no
//! interrupt for anything submitted before.
//!
//! FLR with Transactions Pending ([`Engine::hold_posted`]): a driver that initiates an FLR
//! without waiting for Transactions Pending to clear (PCIe Base 6.0 §6.6.2) finds the engine
//! with writes in flight. The engine models them as the client writes of one chunk, issued and
//! not yet landed: it stops before the client write of its current (or next) chunk and holds
//! it; the reset that follows releases it, the chunk lands (after `reset_begin`: the journal's
//! checker sees `dma_during_reset`) and the engine aborts at the chunk's end.
//!
//! The ring is split by concept: `decode` (command descriptors → checked [`Command`]s),
//! `errors` ([`RingError`] and its codes), `regs` ([`RingRegs`]), `bus` ([`EngineBus`], the
//! engine's view of the bus), `engine` (the register side: [`Engine`], resets, fences and error
//! reports) and `execute` (the engine thread). This file holds the state the register side and
//! the engine thread share.

mod bus;
mod decode;
mod engine;
mod errors;
mod execute;
mod regs;

pub use bus::{DmaFailure, EngineBus};
pub use decode::{decode, Command, Loc};
pub use engine::Engine;
pub use errors::{journal_code, RingError};
pub use regs::RingRegs;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::Vram;

pub use pcisim_abi::gpu::ring::{
    ctrl, encode, err, err_name, flag, op, op_name, ring_error, status, RawCommand, CMD_SIZE,
    DEFAULT_ERROR_VECTOR, DEFAULT_FENCE_VECTOR, MAX_ENTRIES, MAX_LEN, MIN_ENTRIES, RING_ALIGN,
};

/// The engine moves data in chunks of this size and checks for an abort between chunks.
pub const CHUNK: usize = 64 << 10;
/// Client DMA is issued in pieces that never cross a page boundary (with a vIOMMU, every
/// guest IOMMU page arrives as its own DMA mapping).
pub const DMA_PAGE: u64 = 4096;

#[derive(Debug)]
struct State {
    regs: RingRegs,
    /// The engine is inside a command (between taking it and publishing its result).
    busy: bool,
    shutdown: bool,
    /// An FLR with Transactions Pending: the engine's hold of a chunk's client write.
    hold: Hold,
}

/// The hold of a posted chunk write ([`Engine::hold_posted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Nothing held.
    None,
    /// The FLR asks the engine to stop before its next chunk's client write.
    Requested,
    /// The engine waits there with the chunk's data.
    Holding,
    /// The reset began: the chunk lands.
    Released,
}

#[derive(Debug)]
struct Shared {
    name: String,
    vram: Arc<Vram>,
    vectors: u16,
    state: Mutex<State>,
    cv: Condvar,
    /// Bumped (under the state lock) by every reset and at shutdown: a command taken under an
    /// older generation stops before its next chunk and its result is discarded.
    generation: AtomicU64,
}

/// A command taken from the ring.
#[derive(Debug, Clone, Copy)]
struct Job {
    slot: u32,
    addr: u64,
    generation: u64,
}

/// How long a reset waits for the engine to leave a command before giving up (it never should
/// take more than one chunk; the bound keeps a client request from ever hanging).
const RESET_WAIT: Duration = Duration::from_secs(2);
/// How long an FLR with Transactions Pending waits for the engine to reach a chunk's client
/// write ([`Engine::hold_posted`]); a chunk takes well under a millisecond.
pub const HOLD_WAIT: Duration = Duration::from_millis(100);

/// Why execution stopped early.
enum Stop {
    Error(RingError),
    Aborted { done: u64 },
}

impl From<RingError> for Stop {
    fn from(e: RingError) -> Stop {
        Stop::Error(e)
    }
}

/// The COPY fast path over the real [`pcisim_pci::Bus`] and a client `DmaSpace` (the engine
/// tests in ring_tests.rs use an in-memory image, whose bus copies access by access).
#[cfg(test)]
mod direct_copy_tests {
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, Instant};

    use pcisim_journal::{Dir, Event, RingErrorCode};
    use pcisim_pci::Endpoint;
    use pcisim_vfio_user::dma::{PROT_READ, PROT_WRITE};
    use pcisim_vfio_user::{ClientLink, Device, DmaSpace, Interrupts};

    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use pcisim_pci::MsixOutcome;

    use super::{encode, err, op, status, DmaFailure, Engine, EngineBus};
    use crate::gpu::regs::*;
    use crate::gpu::Vram;
    use crate::gpu::{endpoint, Gpu, GpuConfig};

    /// Client memory: one file, IOVA = file offset.
    const MEM: u64 = 4 << 20;
    const RING: u64 = 0x1000;
    const SRC: u64 = 0x10_0000;
    const DST: u64 = 0x20_0000;

    struct Rig {
        ep: Endpoint<Gpu>,
        file: std::fs::File,
        dma: DmaSpace,
    }

    /// A GPU whose client mapped `MEM` except `holes`, with pages of `paged` ranges mapped one
    /// page at a time (as a vIOMMU does); a 16-slot ring at `RING`, enabled.
    fn rig(holes: &[(u64, u64)], paged: &[(u64, u64)]) -> Rig {
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.set_len(MEM).unwrap();
        let dma = DmaSpace::new();
        let inside =
            |ranges: &[(u64, u64)], at: u64| ranges.iter().any(|&(s, l)| s <= at && at < s + l);
        let mut at = 0;
        while at < MEM {
            if inside(holes, at) {
                at += 0x1000;
                continue;
            }
            // Extend a run until a hole or a paged range boundary.
            let mut end = at + 0x1000;
            if !inside(paged, at) {
                while end < MEM && !inside(holes, end) && !inside(paged, end) {
                    end += 0x1000;
                }
            }
            let fd = file.try_clone().unwrap();
            dma.map(at, end - at, PROT_READ | PROT_WRITE, Some((fd.into(), at)))
                .unwrap();
            at = end;
        }
        let mut ep = endpoint(&GpuConfig {
            vram_size: 1 << 20,
            ..GpuConfig::default()
        })
        .unwrap();
        ep.attach(ClientLink {
            irqs: Interrupts::new(&[1, 0, 16, 1, 1]),
            dma: dma.clone(),
        });
        for m in dma.mappings() {
            ep.dma_mapped(&m);
        }
        ep.region_write(7, 4, &0x0006u16.to_le_bytes()).unwrap();
        let mut r = Rig { ep, file, dma };
        r.wr(RING_BASE_LO, RING as u32);
        r.wr(RING_BASE_HI, 0);
        r.wr(RING_SIZE, 16);
        r.wr(RING_CTRL, super::ctrl::ENABLE);
        r
    }

    impl Rig {
        fn wr(&mut self, off: u64, v: u32) {
            self.ep.region_write(0, off, &v.to_le_bytes()).unwrap();
        }

        fn rd(&mut self, off: u64) -> u32 {
            let mut b = [0u8; 4];
            self.ep.region_read(0, off, &mut b).unwrap();
            u32::from_le_bytes(b)
        }

        /// Submit COPY `src` → `dst` of `len` in slot 0 and wait until the ring is idle or
        /// stopped; returns RING_STATUS.
        fn copy(&mut self, src: u64, dst: u64, len: u64) -> u32 {
            self.file
                .write_at(&encode(op::COPY, 0, src, dst, len), RING)
                .unwrap();
            self.wr(RING_TAIL, 1);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let st = self.rd(RING_STATUS);
                if st != status::BUSY {
                    return st;
                }
                assert!(Instant::now() < deadline, "ring never finished");
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        fn dma(&self) -> Vec<(Dir, u64, u64, u64)> {
            self.ep
                .journal()
                .since(0)
                .0
                .into_iter()
                .filter_map(|r| match r.event {
                    Event::Dma {
                        dir,
                        iova,
                        len,
                        count,
                        ..
                    } => Some((dir, iova, len, count)),
                    _ => None,
                })
                .collect()
        }
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    #[test]
    fn test_copy_direct_across_page_mappings_bytes_and_journal_as_page_accesses() {
        // The destination's second 64 KiB is mapped page by page.
        let mut r = rig(&[], &[(DST + 0x10000, 0x10000)]);
        let len = 0x2_0800u64; // two full chunks and 2 KiB
        let data = pattern(1, len as usize);
        r.file.write_at(&data, SRC + 0x100).unwrap();
        assert_eq!(r.copy(SRC + 0x100, DST + 0x80, len), status::IDLE);
        let mut back = vec![0u8; len as usize];
        r.file.read_at(&mut back, DST + 0x80).unwrap();
        assert_eq!(back, data);
        let mut after = [0xffu8; 1];
        r.file.read_at(&mut after, DST + 0x80 + len).unwrap();
        assert_eq!(after, [0], "nothing written past the end");
        // Slot fetch, then per chunk one read and one write record, counted in 4 KiB pages.
        let c = 0x10000u64;
        assert_eq!(
            r.dma(),
            vec![
                (Dir::Read, RING, 32, 1),
                (Dir::Read, SRC + 0x100, c, 17),
                (Dir::Write, DST + 0x80, c, 17),
                (Dir::Read, SRC + 0x100 + c, c, 17),
                (Dir::Write, DST + 0x80 + c, c, 17),
                (Dir::Read, SRC + 0x100 + 2 * c, 0x800, 1),
                (Dir::Write, DST + 0x80 + 2 * c, 0x800, 1),
            ]
        );
        assert!(r.ep.journal().violations().is_empty());
    }

    /// The endpoint's bus, counting what the engine asks of it.
    #[derive(Clone)]
    struct Counting {
        bus: pcisim_pci::Bus,
        copies: Arc<AtomicU64>,
        writes: Arc<AtomicU64>,
    }

    impl EngineBus for Counting {
        type Tx<'a> = pcisim_pci::bus::Transaction<'a>;

        fn transaction(&self) -> Self::Tx<'_> {
            self.bus.transaction()
        }

        fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFailure> {
            EngineBus::dma_read(&self.bus, iova, buf)
        }

        fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), DmaFailure> {
            self.writes.fetch_add(1, Ordering::AcqRel);
            EngineBus::dma_write(&self.bus, iova, data)
        }

        fn raise_msix(&self, vector: u16) -> MsixOutcome {
            self.bus.raise_msix(vector)
        }

        fn journal(&self, event: Event) {
            EngineBus::journal(&self.bus, event);
        }

        fn dma_copy(&self, src: u64, dst: u64, len: usize) -> bool {
            let done = EngineBus::dma_copy(&self.bus, src, dst, len);
            if done {
                self.copies.fetch_add(1, Ordering::AcqRel);
            }
            done
        }
    }

    #[test]
    fn test_copy_client_to_client_chunks_take_the_direct_path() {
        let r = rig(&[], &[]);
        let data = pattern(4, 0x2_0000);
        r.file.write_at(&data, SRC).unwrap();
        r.file
            .write_at(&encode(op::COPY, 0, SRC, DST, 0x2_0000), RING)
            .unwrap();
        let bus = Counting {
            bus: r.ep.bus().clone(),
            copies: Arc::default(),
            writes: Arc::default(),
        };
        let mut e = Engine::new("t", Arc::new(Vram::new(1 << 20).unwrap()), 16);
        e.attach_manual(bus.clone());
        e.write_base(false, RING as u32);
        e.write_size(16);
        e.write_ctrl(super::ctrl::ENABLE);
        e.write_tail(1);
        assert!(e.step());
        assert_eq!(e.regs().status(), status::IDLE);
        assert_eq!(bus.copies.load(Ordering::Acquire), 2, "one move per chunk");
        assert_eq!(
            bus.writes.load(Ordering::Acquire),
            0,
            "no page-by-page writes"
        );
        let mut back = vec![0u8; data.len()];
        r.file.read_at(&mut back, DST).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn test_copy_into_hole_falls_back_faults_at_the_page_earlier_pages_written() {
        let hole = DST + 0x13000;
        let mut r = rig(&[(hole, 0x1000)], &[]);
        let data = pattern(2, 0x20000);
        r.file.write_at(&data, SRC).unwrap();
        assert_eq!(r.copy(SRC, DST, 0x20000), status::ERROR);
        assert_eq!(r.rd(RING_ERROR) & 0xff, err::DMA_FAULT);
        assert_eq!(r.rd(RING_FAULT_ADDR_LO), hole as u32);
        // The first chunk went directly; the second page by page up to the hole.
        let mut back = vec![0u8; 0x13000];
        r.file.read_at(&mut back, DST).unwrap();
        assert_eq!(back, data[..0x13000]);
        let mut past = vec![0xffu8; 0xc000];
        r.file.read_at(&mut past, hole + 0x1000).unwrap();
        assert!(past.iter().all(|&b| b == 0), "nothing after the fault");
        let faults: Vec<u64> =
            r.ep.journal()
                .since(0)
                .0
                .into_iter()
                .filter_map(|rec| match rec.event {
                    Event::DmaFault { iova, .. } => Some(iova),
                    _ => None,
                })
                .collect();
        assert_eq!(faults, vec![hole]);
    }

    #[test]
    fn test_copy_into_read_only_mapping_is_a_dma_fault_named_as_such() {
        // Issue 11 item 10: refused as before, but not described as unmapped memory.
        let mut r = rig(&[(DST, 0x1000)], &[]);
        let fd = r.file.try_clone().unwrap();
        r.dma
            .map(DST, 0x1000, PROT_READ, Some((fd.into(), DST)))
            .unwrap();
        assert_eq!(r.copy(SRC, DST + 0x10, 16), status::ERROR);
        assert_eq!(r.rd(RING_ERROR) & 0xff, err::DMA_FAULT);
        let errors: Vec<(RingErrorCode, String)> =
            r.ep.journal()
                .since(0)
                .0
                .into_iter()
                .filter_map(|rec| match rec.event {
                    Event::RingError { code, detail, .. } => Some((code, detail)),
                    _ => None,
                })
                .collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let (code, detail) = &errors[0];
        assert_eq!(*code, RingErrorCode::DmaFault);
        assert!(
            detail.contains("write to read-only mapping") && !detail.contains("no mapped memory"),
            "{detail}"
        );
    }

    #[test]
    fn test_copy_overlapping_memmove_both_paths_match_reference() {
        // Shift by 100 KiB (chunks do not overlap: direct) and by 4 KiB (bounce buffer).
        for shift in [0x1_9000u64, 0x1000] {
            let mut r = rig(&[], &[]);
            let len = 0x4_0000u64;
            let mut img = vec![0u8; (len + shift) as usize];
            img[..len as usize].copy_from_slice(&pattern(3, len as usize));
            r.file.write_at(&img, SRC).unwrap();
            assert_eq!(r.copy(SRC, SRC + shift, len), status::IDLE);
            img.copy_within(..len as usize, shift as usize);
            let mut back = vec![0u8; img.len()];
            r.file.read_at(&mut back, SRC).unwrap();
            assert!(back == img, "memmove by {shift:#x} differs");
            // And backwards (destination below the source).
            r.wr(RING_CTRL, super::ctrl::RESET);
            r.wr(RING_CTRL, super::ctrl::ENABLE);
            assert_eq!(r.copy(SRC + shift, SRC, len), status::IDLE);
            img.copy_within(shift as usize.., 0);
            r.file.read_at(&mut back, SRC).unwrap();
            assert!(back == img, "memmove by -{shift:#x} differs");
            assert!(r.ep.journal().violations().is_empty());
        }
    }
}
