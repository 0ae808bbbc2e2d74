//! Ring engine tests against an in-memory client image (docs/programming-model.md, "Command
//! ring"): the decoder, the executor, errors, the engine thread and resets, and a fuzz-like run
//! over random rings and register writes.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pcisim_journal::{Event, RingErrorCode};
use pcisim_pci::MsixOutcome;

use super::ring::{
    ctrl, decode, encode, err, flag, op, status, Command, DmaFailure, Engine, EngineBus, Loc,
    CHUNK, CMD_SIZE, DMA_PAGE, MAX_LEN,
};
use super::Vram;

const VECTORS: u16 = 16;
const PAGE: u64 = 4096;
/// Image bytes outside every mapping hold this value; nothing may change them.
const CANARY: u8 = 0xa5;

/// One client memory: a backing array at `base` of which only `mapped` ranges are reachable.
struct ImageInner {
    base: u64,
    mem: Mutex<Vec<u8>>,
    mapped: Mutex<Vec<(u64, u64)>>,
    refuse_all: AtomicBool,
    refuse_writes: AtomicBool,
    irqs: Mutex<Vec<u16>>,
    notes: Mutex<Vec<Event>>,
    accesses: AtomicU64,
    /// Accesses that crossed a page or were performed outside the mappings (must stay 0).
    bad: AtomicU64,
    inflight: AtomicU32,
    delay: Mutex<Option<Duration>>,
    first_access: Mutex<Option<mpsc::Sender<()>>>,
}

#[derive(Clone)]
struct Image(Arc<ImageInner>);

struct Tx(Arc<ImageInner>);

impl Drop for Tx {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Image {
    /// `size` bytes of canary at `base`, with `mapped` ranges zeroed and reachable.
    fn new(base: u64, size: usize, mapped: &[(u64, u64)]) -> Image {
        let mut mem = vec![CANARY; size];
        for &(iova, len) in mapped {
            let at = (iova - base) as usize;
            mem[at..at + len as usize].fill(0);
        }
        Image(Arc::new(ImageInner {
            base,
            mem: Mutex::new(mem),
            mapped: Mutex::new(mapped.to_vec()),
            refuse_all: AtomicBool::new(false),
            refuse_writes: AtomicBool::new(false),
            irqs: Mutex::new(Vec::new()),
            notes: Mutex::new(Vec::new()),
            accesses: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            inflight: AtomicU32::new(0),
            delay: Mutex::new(None),
            first_access: Mutex::new(None),
        }))
    }

    fn mapped(&self, iova: u64, len: usize) -> Option<usize> {
        let end = u128::from(iova) + len as u128;
        self.0
            .mapped
            .lock()
            .unwrap()
            .iter()
            .any(|&(m, l)| {
                u128::from(m) <= u128::from(iova) && end <= u128::from(m) + u128::from(l)
            })
            .then(|| (iova - self.0.base) as usize)
    }

    fn access(&self, iova: u64, len: usize, write: bool) -> Result<usize, DmaFailure> {
        self.0.accesses.fetch_add(1, Ordering::AcqRel);
        if let Some(tx) = self.0.first_access.lock().unwrap().take() {
            let _ = tx.send(());
        }
        if let Some(d) = *self.0.delay.lock().unwrap() {
            std::thread::sleep(d);
        }
        if len as u64 > DMA_PAGE - iova % DMA_PAGE {
            self.0.bad.fetch_add(1, Ordering::AcqRel);
        }
        if self.0.refuse_all.load(Ordering::Acquire)
            || (write && self.0.refuse_writes.load(Ordering::Acquire))
        {
            return Err(DmaFailure::Refused);
        }
        self.mapped(iova, len).ok_or(DmaFailure::Fault)
    }

    fn read(&self, iova: u64, len: usize) -> Vec<u8> {
        let at = (iova - self.0.base) as usize;
        self.0.mem.lock().unwrap()[at..at + len].to_vec()
    }

    fn write(&self, iova: u64, data: &[u8]) {
        let at = (iova - self.0.base) as usize;
        self.0.mem.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
    }

    fn irqs(&self) -> Vec<u16> {
        self.0.irqs.lock().unwrap().clone()
    }

    fn notes(&self) -> Vec<Event> {
        self.0.notes.lock().unwrap().clone()
    }

    /// Every byte outside the mappings (page-aligned) still holds the canary.
    fn canaries_intact(&self) -> bool {
        let mem = self.0.mem.lock().unwrap();
        let mapped = self.0.mapped.lock().unwrap();
        mem.chunks(PAGE as usize).enumerate().all(|(p, page)| {
            let iova = self.0.base + p as u64 * PAGE;
            mapped.iter().any(|&(m, l)| m <= iova && iova < m + l)
                || page.iter().all(|&b| b == CANARY)
        })
    }
}

impl EngineBus for Image {
    type Tx<'a> = Tx;

    fn transaction(&self) -> Tx {
        self.0.inflight.fetch_add(1, Ordering::AcqRel);
        Tx(self.0.clone())
    }

    fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFailure> {
        let at = self.access(iova, buf.len(), false)?;
        buf.copy_from_slice(&self.0.mem.lock().unwrap()[at..at + buf.len()]);
        Ok(())
    }

    fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), DmaFailure> {
        let at = self.access(iova, data.len(), true)?;
        self.0.mem.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn raise_msix(&self, vector: u16) -> MsixOutcome {
        self.0.irqs.lock().unwrap().push(vector);
        MsixOutcome::Delivered
    }

    fn journal(&self, event: Event) {
        self.0.notes.lock().unwrap().push(event);
    }
}

const RING: u64 = 0x10_0000;
const BUF: u64 = RING + 4 * PAGE;
const BUF_LEN: u64 = 0x4_0000;
const FENCE: u64 = BUF + BUF_LEN + 2 * PAGE;
const VRAM_SIZE: u64 = 1 << 20;

/// Ring page at RING, a 256 KiB buffer at BUF, a fence page at FENCE; each page its own mapping
/// (as with a vIOMMU), with unmapped canary pages between the areas.
fn image() -> Image {
    let mut mapped = vec![(RING, PAGE), (FENCE, PAGE)];
    mapped.extend((0..BUF_LEN / PAGE).map(|p| (BUF + p * PAGE, PAGE)));
    Image::new(
        RING - PAGE,
        (FENCE + 2 * PAGE - (RING - PAGE)) as usize,
        &mapped,
    )
}

fn vram(size: u64) -> Arc<Vram> {
    Arc::new(Vram::new(size).unwrap())
}

fn put(img: &Image, slot: u64, cmd: [u8; 32]) {
    img.write(RING + slot * CMD_SIZE, &cmd);
}

fn run_all(e: &Engine<Image>) -> usize {
    let mut n = 0;
    while e.step() {
        n += 1;
    }
    n
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

fn vram_bytes(e: &Engine<Image>, v: &Vram, off: u64, len: usize) -> Vec<u8> {
    let _ = e;
    let mut b = vec![0u8; len];
    v.read(off, &mut b).unwrap();
    b
}

fn engine_with_vram(img: &Image, size: u32) -> (Engine<Image>, Arc<Vram>) {
    let v = vram(VRAM_SIZE);
    let mut e = Engine::new("t", v.clone(), VECTORS);
    e.attach_manual(img.clone());
    e.write_base(false, RING as u32);
    e.write_size(size);
    e.write_ctrl(ctrl::ENABLE);
    (e, v)
}

// ---- decoder ----

fn dec(opcode: u8, flags: u8, a: u64, b: u64, c: u64) -> Result<Command, u32> {
    decode(&encode(opcode, flags, a, b, c), VRAM_SIZE, VECTORS).map_err(|e| e.code)
}

#[test]
fn test_decode_each_opcode_valid_commands_decoded() {
    assert_eq!(dec(op::NOP, 0, 0, 0, 0), Ok(Command::Nop));
    assert_eq!(
        dec(op::COPY, flag::SRC_VRAM, 0x10, 0x2000, 3),
        Ok(Command::Copy {
            src: Loc::Vram(0x10),
            dst: Loc::Iova(0x2000),
            len: 3
        })
    );
    assert_eq!(
        dec(op::COPY, flag::DST_VRAM, 7, VRAM_SIZE - 5, 5),
        Ok(Command::Copy {
            src: Loc::Iova(7),
            dst: Loc::Vram(VRAM_SIZE - 5),
            len: 5
        })
    );
    assert_eq!(
        dec(op::FILL, flag::DST_VRAM, 8, 0xdead_beef, 16),
        Ok(Command::Fill {
            dst: Loc::Vram(8),
            pattern: 0xdead_beef,
            len: 16
        })
    );
    assert_eq!(
        dec(op::WRITE_FENCE, flag::FENCE_IRQ, 0x1000, u64::MAX, 0),
        Ok(Command::WriteFence {
            iova: 0x1000,
            value: u64::MAX,
            irq: true
        })
    );
    assert_eq!(
        dec(op::INTERRUPT, 0, 15, 0, 0),
        Ok(Command::Interrupt { vector: 15 })
    );
    assert_eq!(
        dec(op::COPY, 0, u64::MAX - 9, 0, 10),
        Ok(Command::Copy {
            src: Loc::Iova(u64::MAX - 9),
            dst: Loc::Iova(0),
            len: 10
        }),
        "an IOVA range may end exactly at 2^64"
    );
    assert_eq!(
        dec(op::COPY, 3, 0, 0, 0),
        Ok(Command::Copy {
            src: Loc::Vram(0),
            dst: Loc::Vram(0),
            len: 0
        }),
        "zero length is valid"
    );
}

#[test]
fn test_decode_unknown_opcodes_bad_opcode_error() {
    for o in [0x05u8, 0x10, 0x7f, 0xff] {
        assert_eq!(dec(o, 0, 0, 0, 0), Err(err::BAD_OPCODE), "opcode {o:#x}");
    }
}

#[test]
fn test_decode_undefined_flags_bad_flags_error() {
    assert_eq!(dec(op::NOP, 1, 0, 0, 0), Err(err::BAD_FLAGS));
    assert_eq!(dec(op::COPY, flag::FENCE_IRQ, 0, 0, 0), Err(err::BAD_FLAGS));
    assert_eq!(dec(op::FILL, flag::SRC_VRAM, 0, 0, 0), Err(err::BAD_FLAGS));
    assert_eq!(
        dec(op::WRITE_FENCE, flag::DST_VRAM, 0, 0, 0),
        Err(err::BAD_FLAGS)
    );
    assert_eq!(dec(op::INTERRUPT, 0x80, 0, 0, 0), Err(err::BAD_FLAGS));
}

#[test]
fn test_decode_reserved_fields_nonzero_reserved_error() {
    for byte in 2..8 {
        let mut raw = encode(op::NOP, 0, 0, 0, 0);
        raw[byte] = 1;
        assert_eq!(
            decode(&raw, VRAM_SIZE, VECTORS).map_err(|e| e.code),
            Err(err::RESERVED),
            "header byte {byte}"
        );
    }
    assert_eq!(dec(op::NOP, 0, 1, 0, 0), Err(err::RESERVED));
    assert_eq!(dec(op::WRITE_FENCE, 0, 8, 1, 1), Err(err::RESERVED));
    assert_eq!(dec(op::INTERRUPT, 0, 1, 1, 0), Err(err::RESERVED));
    assert_eq!(
        dec(op::FILL, 0, 0, 1 << 32, 4),
        Err(err::RESERVED),
        "pattern wider than 32 bits"
    );
}

#[test]
fn test_decode_misaligned_operands_alignment_error() {
    assert_eq!(dec(op::FILL, 0, 2, 0, 4), Err(err::ALIGNMENT));
    assert_eq!(dec(op::FILL, flag::DST_VRAM, 0, 0, 6), Err(err::ALIGNMENT));
    assert_eq!(dec(op::WRITE_FENCE, 0, 0x1004, 0, 0), Err(err::ALIGNMENT));
    assert!(dec(op::COPY, 0, 1, 3, 5).is_ok(), "COPY is byte-granular");
}

#[test]
fn test_decode_length_above_limit_length_error() {
    assert_eq!(dec(op::COPY, 0, 0, 0, MAX_LEN + 1), Err(err::LENGTH));
    assert_eq!(dec(op::FILL, 0, 0, 0, MAX_LEN + 4), Err(err::LENGTH));
    assert!(dec(op::COPY, 0, 0, 1 << 40, MAX_LEN).is_ok());
}

#[test]
fn test_decode_vram_outside_vram_range_error() {
    assert_eq!(
        dec(op::COPY, flag::SRC_VRAM, VRAM_SIZE - 1, 0, 2),
        Err(err::VRAM_RANGE)
    );
    assert_eq!(
        dec(op::COPY, flag::DST_VRAM, 0, VRAM_SIZE, 1),
        Err(err::VRAM_RANGE)
    );
    assert_eq!(
        dec(op::FILL, flag::DST_VRAM, u64::MAX - 3, 0, 8),
        Err(err::VRAM_RANGE),
        "offset + length wrapping 2^64"
    );
    assert_eq!(
        dec(op::COPY, flag::SRC_VRAM, VRAM_SIZE, 0, 0),
        Ok(Command::Copy {
            src: Loc::Vram(VRAM_SIZE),
            dst: Loc::Iova(0),
            len: 0
        }),
        "an empty range at the end is inside"
    );
}

#[test]
fn test_decode_iova_range_wrapping_iova_range_error() {
    assert_eq!(dec(op::COPY, 0, u64::MAX, 0, 2), Err(err::IOVA_RANGE));
    assert_eq!(dec(op::FILL, 0, u64::MAX - 3, 0, 8), Err(err::IOVA_RANGE));
}

#[test]
fn test_decode_interrupt_vector_out_of_range_bad_vector_error() {
    assert_eq!(dec(op::INTERRUPT, 0, 16, 0, 0), Err(err::BAD_VECTOR));
    assert_eq!(dec(op::INTERRUPT, 0, 1 << 20, 0, 0), Err(err::BAD_VECTOR));
}

// ---- executor ----

#[test]
fn test_ring_fill_copies_fence_all_data_byte_exact() {
    let img = image();
    let (e, v) = engine_with_vram(&img, 8);
    let src = pattern(1, 10_000);
    img.write(BUF, &src);
    // FILL the second 64 KiB of the buffer, COPY 10000 bytes guest→VRAM at an odd offset,
    // VRAM→guest, guest→guest across page boundaries, then the fence with its interrupt.
    put(
        &img,
        0,
        encode(op::FILL, 0, BUF + 0x1_0000, 0x1122_3344, 0x1_0000),
    );
    put(
        &img,
        1,
        encode(op::COPY, flag::DST_VRAM, BUF, 0x333, 10_000),
    );
    put(
        &img,
        2,
        encode(op::COPY, flag::SRC_VRAM, 0x333, BUF + 0x2_0001, 10_000),
    );
    put(&img, 3, encode(op::COPY, 0, BUF, BUF + 0x3_0ffd, 10_000));
    put(
        &img,
        4,
        encode(op::WRITE_FENCE, flag::FENCE_IRQ, FENCE + 8, 0xfeed_0001, 0),
    );
    e.write_tail(5);
    assert_eq!(e.regs().status(), status::BUSY);
    assert_eq!(run_all(&e), 5);
    let fill = img.read(BUF + 0x1_0000, 0x1_0000);
    assert!(fill.chunks(4).all(|c| c == [0x44, 0x33, 0x22, 0x11]));
    assert_eq!(vram_bytes(&e, &v, 0x333, 10_000), src);
    assert_eq!(img.read(BUF + 0x2_0001, 10_000), src);
    assert_eq!(img.read(BUF + 0x3_0ffd, 10_000), src);
    assert_eq!(img.read(FENCE + 8, 8), 0xfeed_0001u64.to_le_bytes());
    let r = e.regs();
    assert_eq!((r.head, r.tail, r.status()), (5, 5, status::IDLE));
    assert_eq!(r.last_fence, 0xfeed_0001);
    assert_eq!(r.completed, 5);
    assert_eq!(img.irqs(), [0], "FENCE_VECTOR defaults to 0");
    assert_eq!(
        img.0.bad.load(Ordering::Acquire),
        0,
        "no access crossed a page"
    );
    assert!(img.canaries_intact());
}

#[test]
fn test_ring_copy_overlapping_ranges_memmove_semantics() {
    let img = image();
    let (e, v) = engine_with_vram(&img, 8);
    let n = 3 * CHUNK + 123;
    let data = pattern(2, n);
    v.write(0, &data).unwrap();
    // Forward overlap in VRAM: destination above the source (must copy backwards).
    put(&img, 0, encode(op::COPY, 3, 0, 1000, n as u64));
    e.write_tail(1);
    run_all(&e);
    assert_eq!(vram_bytes(&e, &v, 1000, n), data);
    // Destination below the source.
    v.write(0, &data).unwrap();
    put(&img, 1, encode(op::COPY, 3, 1000, 10, n as u64));
    v.write(1000, &data).unwrap();
    e.write_tail(2);
    run_all(&e);
    assert_eq!(vram_bytes(&e, &v, 10, n), data);
    // Client memory overlapping by less than a chunk.
    let g = pattern(3, 100_000);
    img.write(BUF, &g);
    put(&img, 2, encode(op::COPY, 0, BUF, BUF + 7, 100_000));
    e.write_tail(3);
    run_all(&e);
    assert_eq!(img.read(BUF + 7, 100_000), g);
    assert_eq!(e.regs().error, None);
}

#[test]
fn test_ring_wraps_past_last_slot_head_follows() {
    let img = image();
    let (e, _v) = engine_with_vram(&img, 4);
    let mut tail = 0u64;
    for k in 0..10u64 {
        put(&img, tail, encode(op::WRITE_FENCE, 0, FENCE, k + 1, 0));
        tail = (tail + 1) % 4;
        e.write_tail(tail as u32);
        assert_eq!(run_all(&e), 1);
        assert_eq!(e.regs().last_fence, k + 1);
    }
    let r = e.regs();
    assert_eq!((r.head, r.completed), (2, 10));
    assert!(img.irqs().is_empty(), "no FENCE_IRQ flag, no interrupt");
}

#[test]
fn test_ring_interrupt_command_raises_vector_and_vectors_configurable() {
    let img = image();
    let (e, _v) = engine_with_vram(&img, 8);
    e.write_vector(true, 7);
    e.write_vector(false, 9);
    e.write_vector(true, 16);
    put(&img, 0, encode(op::INTERRUPT, 0, 5, 0, 0));
    put(
        &img,
        1,
        encode(op::WRITE_FENCE, flag::FENCE_IRQ, FENCE, 1, 0),
    );
    put(&img, 2, encode(op::NOP, 0x40, 0, 0, 0));
    e.write_tail(3);
    run_all(&e);
    assert_eq!(
        img.irqs(),
        [5, 7, 9],
        "INTERRUPT, FENCE_VECTOR, ERROR_VECTOR"
    );
    let r = e.regs();
    assert_eq!((r.fence_vector, r.error_vector), (7, 9), "16 ignored");
}

#[test]
fn test_ring_malformed_command_stops_ring_error_vector_and_note() {
    let img = image();
    let (e, _v) = engine_with_vram(&img, 8);
    put(&img, 0, encode(op::NOP, 0, 0, 0, 0));
    put(&img, 1, encode(0x7f, 0, 0, 0, 0));
    put(&img, 2, encode(op::WRITE_FENCE, 0, FENCE, 9, 0));
    e.write_tail(3);
    assert_eq!(run_all(&e), 2, "stops at the bad command");
    let r = e.regs();
    assert_eq!(r.status(), status::ERROR);
    assert_eq!(r.error_reg(), err::BAD_OPCODE | (1 << 16));
    assert_eq!((r.head, r.fault_addr, r.errors), (1, 0x7f, 1));
    assert_eq!(r.completed, 1);
    assert_eq!(img.irqs(), [1], "ERROR_VECTOR defaults to 1");
    let notes = img.notes();
    assert_eq!(notes.len(), 1);
    assert!(
        matches!(
            notes[0],
            Event::RingError {
                code: RingErrorCode::BadOpcode,
                slot: 1,
                ..
            }
        ),
        "{notes:?}"
    );
    // Stopped: more doorbells do nothing until RING_CTRL.RESET.
    e.write_tail(4);
    assert!(!e.step());
    assert_eq!(img.read(FENCE, 8), [0; 8]);
    e.write_ctrl(ctrl::RESET | ctrl::ENABLE);
    let r = e.regs();
    assert_eq!(
        (r.head, r.tail, r.status(), r.error_reg()),
        (0, 0, status::IDLE, 0)
    );
    assert_eq!(r.errors, 1, "counters survive RING_CTRL.RESET");
    put(&img, 0, encode(op::WRITE_FENCE, 0, FENCE, 9, 0));
    e.write_tail(1);
    assert_eq!(run_all(&e), 1);
    assert_eq!(img.read(FENCE, 8), 9u64.to_le_bytes());
}

#[test]
fn test_ring_copy_into_unmapped_page_dma_fault_at_page() {
    let img = image();
    let (e, _v) = engine_with_vram(&img, 8);
    let g = pattern(4, 0x3000);
    img.write(BUF, &g);
    // The buffer's last two pages are mapped, the page after is not.
    let dst = BUF + BUF_LEN - 0x2000;
    put(&img, 0, encode(op::COPY, 0, BUF, dst, 0x3000));
    e.write_tail(1);
    run_all(&e);
    let r = e.regs();
    assert_eq!(r.error_reg(), err::DMA_FAULT);
    assert_eq!(r.fault_addr, BUF + BUF_LEN);
    assert!(img.canaries_intact());
    assert_eq!(img.irqs(), [1]);
}

#[test]
fn test_ring_dma_refused_fetch_or_data_refused_code_no_data_change() {
    let img = image();
    let (e, v) = engine_with_vram(&img, 8);
    put(&img, 0, encode(op::FILL, 0, BUF, 0xffff_ffff, 4096));
    img.0.refuse_all.store(true, Ordering::Release);
    e.write_tail(1);
    run_all(&e);
    let r = e.regs();
    assert_eq!(
        r.error_reg(),
        err::DMA_REFUSED,
        "the fetch itself is refused"
    );
    assert_eq!(r.fault_addr, RING);
    assert_eq!(img.read(BUF, 4096), vec![0; 4096]);
    // Writes refused only: the command is fetched, its data write refused.
    img.0.refuse_all.store(false, Ordering::Release);
    img.0.refuse_writes.store(true, Ordering::Release);
    e.write_ctrl(ctrl::RESET | ctrl::ENABLE);
    e.write_tail(1);
    run_all(&e);
    let r = e.regs();
    assert_eq!(r.error_reg(), err::DMA_REFUSED);
    assert_eq!(r.fault_addr, BUF);
    assert_eq!(img.read(BUF, 4096), vec![0; 4096]);
    // VRAM destinations need no DMA and still work; then allowed again, the FILL works.
    put(&img, 0, encode(op::FILL, flag::DST_VRAM, 0, 0x0102_0304, 8));
    e.write_ctrl(ctrl::RESET | ctrl::ENABLE);
    e.write_tail(1);
    run_all(&e);
    assert_eq!(e.regs().error, None);
    assert_eq!(vram_bytes(&e, &v, 0, 8), [4, 3, 2, 1, 4, 3, 2, 1]);
    img.0.refuse_writes.store(false, Ordering::Release);
    put(&img, 1, encode(op::FILL, 0, BUF, 0xffff_ffff, 4096));
    e.write_tail(2);
    run_all(&e);
    assert_eq!(e.regs().error, None);
    assert_eq!(img.read(BUF, 4096), vec![0xff; 4096]);
}

#[test]
fn test_ring_enable_bad_base_or_size_bad_ring_error() {
    for (base, size) in [(RING + 8, 8), (RING, 3), (RING, 1), (RING, 8192), (RING, 0)] {
        let img = image();
        let mut e = Engine::new("t", vram(VRAM_SIZE), VECTORS);
        e.attach_manual(img.clone());
        e.write_base(false, base as u32);
        e.write_size(size);
        e.write_ctrl(ctrl::ENABLE);
        let r = e.regs();
        assert_eq!(r.status(), status::ERROR, "base {base:#x} size {size}");
        assert_eq!(r.error_reg() & 0xff, err::BAD_RING);
        assert!(!r.enabled);
        assert_eq!(img.irqs(), [1]);
    }
}

#[test]
fn test_ring_enable_smaller_size_with_head_beyond_bad_ring_error() {
    let img = image();
    let (e, _v) = engine_with_vram(&img, 8);
    for slot in 0..6 {
        put(&img, slot, encode(op::NOP, 0, 0, 0, 0));
    }
    e.write_tail(6);
    run_all(&e);
    e.write_ctrl(0);
    e.write_size(4);
    e.write_tail(1);
    e.write_ctrl(ctrl::ENABLE);
    let r = e.regs();
    assert_eq!(r.error_reg(), err::BAD_RING | (6 << 16));
    assert_eq!(r.fault_addr, 4);
    // Stopped: ENABLE latches nothing until RESET.
    e.write_ctrl(0);
    e.write_ctrl(ctrl::ENABLE);
    assert_eq!(e.regs().active_size, 8);
    e.write_ctrl(ctrl::RESET | ctrl::ENABLE);
    let r = e.regs();
    assert_eq!((r.active_size, r.head, r.error), (4, 0, None));
}

#[test]
fn test_ring_tail_not_below_size_bad_tail_error() {
    let img = image();
    let (e, _v) = engine_with_vram(&img, 8);
    e.write_tail(8);
    let r = e.regs();
    assert_eq!(r.error_reg(), err::BAD_TAIL);
    assert_eq!(r.fault_addr, 8);
    assert_eq!(img.irqs(), [1]);
    // A tail written while disabled is checked at enable.
    e.write_ctrl(ctrl::RESET);
    e.write_tail(100);
    e.write_ctrl(ctrl::ENABLE);
    assert_eq!(e.regs().error_reg(), err::BAD_TAIL);
}

#[test]
fn test_ring_base_and_size_written_while_enabled_ignored() {
    let img = image();
    let (e, _v) = engine_with_vram(&img, 8);
    e.write_base(false, 0x5000);
    e.write_size(2);
    let r = e.regs();
    assert_eq!((r.base, r.size), (RING, 8));
    // Disable mid-ring: nothing runs until enabled again.
    put(&img, 0, encode(op::NOP, 0, 0, 0, 0));
    e.write_ctrl(0);
    e.write_tail(1);
    assert!(!e.step());
    e.write_ctrl(ctrl::ENABLE);
    assert!(e.step());
}

#[test]
fn test_ring_function_reset_registers_back_to_defaults() {
    let img = image();
    let (e, _v) = engine_with_vram(&img, 8);
    e.write_vector(true, 3);
    put(&img, 0, encode(op::WRITE_FENCE, 0, FENCE, 5, 0));
    put(&img, 1, encode(0xee, 0, 0, 0, 0));
    e.write_tail(2);
    run_all(&e);
    e.reset();
    assert_eq!(e.regs(), super::ring::RingRegs::default());
}

// ---- engine thread ----

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    f()
}

fn threaded(img: &Image, vram_size: u64) -> (Engine<Image>, Arc<Vram>) {
    let v = vram(vram_size);
    let mut e = Engine::new("t", v.clone(), VECTORS);
    e.attach(img.clone());
    e.write_base(false, RING as u32);
    e.write_size(16);
    e.write_ctrl(ctrl::ENABLE);
    (e, v)
}

#[test]
fn test_engine_thread_doorbell_returns_at_once_work_done_async() {
    let img = image();
    let (e, _v) = threaded(&img, VRAM_SIZE);
    *img.0.delay.lock().unwrap() = Some(Duration::from_millis(20));
    put(
        &img,
        0,
        encode(op::WRITE_FENCE, flag::FENCE_IRQ, FENCE, 77, 0),
    );
    let t0 = Instant::now();
    e.write_tail(1);
    assert!(
        t0.elapsed() < Duration::from_millis(10),
        "the doorbell does not wait"
    );
    assert!(wait_until(Duration::from_secs(5), || e.regs().last_fence == 77));
    assert!(wait_until(Duration::from_secs(5), || img.irqs() == [0]));
    assert_eq!(img.read(FENCE, 8), 77u64.to_le_bytes());
    assert_eq!(e.regs().status(), status::IDLE);
}

/// A client image with one big mapping (so a long COPY is possible).
fn big_image(len: u64) -> Image {
    Image::new(
        RING,
        (BUF - RING + len) as usize,
        &[(RING, PAGE), (BUF, len)],
    )
}

#[test]
fn test_engine_reset_during_long_copy_stops_before_returning() {
    let len = 8u64 << 20;
    let img = big_image(len);
    let (e, v) = threaded(&img, 16 << 20);
    img.write(BUF, &vec![0x5a; len as usize]);
    *img.0.delay.lock().unwrap() = Some(Duration::from_micros(200));
    let (tx, rx) = mpsc::channel();
    put(&img, 0, encode(op::COPY, flag::DST_VRAM, BUF, 0, len));
    put(
        &img,
        1,
        encode(op::WRITE_FENCE, flag::FENCE_IRQ, RING + 0x800, 1, 0),
    );
    *img.0.first_access.lock().unwrap() = Some(tx);
    e.write_tail(2);
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    // Let a few chunks go by, then reset.
    std::thread::sleep(Duration::from_millis(30));
    let t0 = Instant::now();
    e.reset();
    let took = t0.elapsed();
    let after_reset = img.0.accesses.load(Ordering::Acquire);
    assert_eq!(e.regs(), super::ring::RingRegs::default());
    assert_eq!(
        img.0.inflight.load(Ordering::Acquire),
        0,
        "no transaction pending"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        img.0.accesses.load(Ordering::Acquire),
        after_reset,
        "no DMA after reset returned"
    );
    assert!(took < Duration::from_secs(1), "reset waited {took:?}");
    // Part of VRAM was copied, the end was not; the fence never ran.
    let mut head = [0u8; 1];
    v.read(0, &mut head).unwrap();
    assert_eq!(head[0], 0x5a);
    let mut tail = [0u8; 1];
    v.read(len - 1, &mut tail).unwrap();
    assert_eq!(tail[0], 0, "the copy was aborted");
    assert!(img.irqs().is_empty());
    assert!(
        wait_until(Duration::from_secs(1), || img
            .notes()
            .iter()
            .any(|n| matches!(n, Event::RingCommandAborted { .. }))),
        "{:?}",
        img.notes()
    );
}

#[test]
fn test_engine_ring_reset_during_long_fill_aborts_ring_reusable() {
    let len = 8u64 << 20;
    let img = big_image(len);
    let (e, _v) = threaded(&img, VRAM_SIZE);
    *img.0.delay.lock().unwrap() = Some(Duration::from_micros(200));
    let (tx, rx) = mpsc::channel();
    *img.0.first_access.lock().unwrap() = Some(tx);
    put(&img, 0, encode(op::FILL, 0, BUF, 0x1111_1111, len));
    e.write_tail(1);
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    e.write_ctrl(ctrl::RESET);
    let n = img.0.accesses.load(Ordering::Acquire);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(img.0.accesses.load(Ordering::Acquire), n);
    assert_eq!(img.read(BUF + len - 4, 4), [0; 4], "the fill stopped early");
    *img.0.delay.lock().unwrap() = None;
    put(
        &img,
        0,
        encode(op::WRITE_FENCE, flag::FENCE_IRQ, RING + 0x800, 3, 0),
    );
    e.write_ctrl(ctrl::ENABLE);
    e.write_tail(1);
    assert!(wait_until(Duration::from_secs(5), || e.regs().last_fence == 3));
    assert!(wait_until(Duration::from_secs(5), || img.irqs() == [0]));
}

#[test]
fn test_engine_drop_while_busy_joins_thread() {
    let len = 4u64 << 20;
    let img = big_image(len);
    let (e, _v) = threaded(&img, VRAM_SIZE);
    *img.0.delay.lock().unwrap() = Some(Duration::from_micros(200));
    put(&img, 0, encode(op::FILL, 0, BUF, 1, len));
    e.write_tail(1);
    std::thread::sleep(Duration::from_millis(10));
    let t0 = Instant::now();
    drop(e);
    assert!(t0.elapsed() < Duration::from_secs(1));
}

// ---- fuzz-like ----

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// An operand biased towards interesting values: near mapped areas, VRAM edges, limits.
    fn operand(&mut self) -> u64 {
        match self.below(10) {
            0 => self.next(),
            1 => u64::MAX - self.below(64),
            2 => BUF + self.below(BUF_LEN + 0x2000),
            3 => BUF + BUF_LEN - self.below(0x2000),
            4 => FENCE + self.below(2 * PAGE) - PAGE / 2,
            5 => VRAM_SIZE - self.below(0x2000),
            6 => self.below(VRAM_SIZE),
            7 => self.below(64),
            8 => RING + self.below(PAGE),
            _ => self.below(MAX_LEN + 16),
        }
    }

    fn command(&mut self) -> [u8; 32] {
        let opcode = match self.below(8) {
            0 => self.next() as u8,
            k => (k as u8 - 1) % 5,
        };
        let flags = if self.below(4) == 0 {
            self.next() as u8
        } else {
            self.below(8) as u8
        };
        let len = match self.below(4) {
            0 => self.operand(),
            1 => self.below(0x3000) & !3,
            2 => self.below(300),
            _ => self.below(CHUNK as u64 * 2),
        };
        let mut raw = encode(opcode, flags, self.operand(), self.operand(), len);
        if self.below(16) == 0 {
            raw[2 + self.below(6) as usize] = self.next() as u8;
        }
        if opcode == op::FILL && self.below(2) == 0 {
            raw[20..24].fill(0);
        }
        if opcode == op::INTERRUPT && self.below(2) == 0 {
            raw[1..8].fill(0);
            raw[16..32].fill(0);
            raw[8..16].copy_from_slice(&self.below(20).to_le_bytes());
        }
        raw
    }
}

#[test]
fn test_ring_fuzz_random_rings_no_panic_no_access_outside_map() {
    let mut rng = Rng(0x5eed);
    let mut stats = [0u32; 16];
    for round in 0..400 {
        let img = image();
        let (e, _v) = engine_with_vram(&img, 64);
        e.write_vector(true, rng.below(20) as u32);
        e.write_vector(false, rng.below(20) as u32);
        for slot in 0..64 {
            put(&img, slot, rng.command());
        }
        let mut budget = 200;
        while budget > 0 {
            budget -= 1;
            match rng.below(16) {
                0 => e.write_ctrl(rng.below(4) as u32),
                10 => e.write_size(match rng.below(3) {
                    0 => rng.next() as u32,
                    1 => 1 << rng.below(14),
                    _ => 64,
                }),
                11 => e.write_base(
                    rng.below(2) == 0,
                    match rng.below(3) {
                        0 => rng.next() as u32,
                        1 => (RING as u32) + 0x800,
                        _ => RING as u32,
                    },
                ),
                1 => e.write_tail(rng.below(70) as u32),
                2 => {
                    let slot = rng.below(64);
                    put(&img, slot, rng.command());
                }
                3 => img.0.refuse_all.store(rng.below(8) == 0, Ordering::Release),
                _ => {
                    e.step();
                }
            }
            let r = e.regs();
            assert!(
                r.head < 64 || r.active_size == 0,
                "round {round}: head {}",
                r.head
            );
            assert!(r.error_reg() & 0xff <= err::BAD_TAIL);
            stats[(r.error_reg() & 0xf) as usize] += 1;
        }
        assert_eq!(
            img.0.bad.load(Ordering::Acquire),
            0,
            "round {round}: access crossed a page"
        );
        assert!(
            img.canaries_intact(),
            "round {round}: memory outside the map changed"
        );
        assert!(img.irqs().iter().all(|&v| v < VECTORS));
    }
    // The generator reaches every error kind (it is not only exercising the happy path).
    assert!(
        (err::BAD_OPCODE..=err::BAD_TAIL).all(|code| stats[code as usize] > 0),
        "error kinds seen: {stats:?}"
    );
}

#[test]
fn test_ring_fuzz_random_commands_decode_never_panics() {
    let mut rng = Rng(42);
    for _ in 0..200_000 {
        let mut raw = [0u8; 32];
        for b in raw.chunks_mut(8) {
            b.copy_from_slice(&rng.next().to_le_bytes());
        }
        raw[0] = (rng.next() % 6) as u8;
        raw[1] &= if rng.below(2) == 0 { 7 } else { 0xff };
        if rng.below(2) == 0 {
            raw[2..8].fill(0);
        }
        let size = 1u64 << (12 + rng.below(30));
        if let Ok(cmd) = decode(&raw, size, VECTORS) {
            // Whatever decodes is inside VRAM and does not wrap.
            match cmd {
                Command::Copy { src, dst, len } => {
                    for l in [src, dst] {
                        match l {
                            Loc::Vram(o) => assert!(o + len <= size),
                            Loc::Iova(i) => assert!(u128::from(i) + u128::from(len) <= 1 << 64),
                        }
                    }
                    assert!(len <= MAX_LEN);
                }
                Command::Fill { dst, len, .. } => {
                    assert!(len <= MAX_LEN && len % 4 == 0);
                    if let Loc::Vram(o) = dst {
                        assert!(o + len <= size);
                    }
                }
                Command::WriteFence { iova, .. } => assert_eq!(iova % 8, 0),
                Command::Interrupt { vector } => assert!(vector < VECTORS),
                Command::Nop => {}
            }
        }
    }
}

#[test]
fn test_engine_hold_posted_idle_engine_holds_nothing() {
    let img = image();
    let (e, _v) = threaded(&img, VRAM_SIZE);
    assert!(!e.hold_posted(), "an idle engine has nothing in flight");
    // A VRAM-only copy reaches no client write: nothing held.
    put(
        &img,
        0,
        encode(
            op::COPY,
            flag::SRC_VRAM | flag::DST_VRAM,
            0,
            0x8_0000,
            0x4_0000,
        ),
    );
    e.write_tail(1);
    let _ = e.hold_posted();
    e.reset();
    assert!(img
        .notes()
        .iter()
        .all(|n| !matches!(n, Event::PostedWritesLanded { .. })));
}

#[test]
fn test_engine_hold_posted_long_fill_one_chunk_lands_at_reset() {
    let len = 8u64 << 20;
    let img = big_image(len);
    let (e, _v) = threaded(&img, VRAM_SIZE);
    *img.0.delay.lock().unwrap() = Some(Duration::from_micros(100));
    let (tx, rx) = mpsc::channel();
    *img.0.first_access.lock().unwrap() = Some(tx);
    put(&img, 0, encode(op::FILL, 0, BUF, 0x2222_2222, len));
    e.write_tail(1);
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(e.hold_posted(), "a chunk of the fill is held");
    // Held: the engine issues nothing more until the reset.
    let held = img.0.accesses.load(Ordering::Acquire);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(img.0.accesses.load(Ordering::Acquire), held);
    e.reset();
    let landed = img.0.accesses.load(Ordering::Acquire) - held;
    assert_eq!(
        landed,
        CHUNK as u64 / DMA_PAGE,
        "exactly the held chunk landed"
    );
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(img.0.accesses.load(Ordering::Acquire), held + landed);
    assert_eq!(e.regs(), super::ring::RingRegs::default());
    assert!(wait_until(Duration::from_secs(1), || {
        let n = img.notes();
        n.iter()
            .any(|t| matches!(t, Event::PostedWritesLanded { .. }))
            && n.iter()
                .any(|t| matches!(t, Event::RingCommandAborted { .. }))
    }));
}
