//! The GPU command ring end to end on the host: the real vfio-user server and the function's
//! real `Bus`, the rust-vmm client as the VMM, a memfd as guest memory (DMA_MAP with an fd),
//! real eventfds for MSI-X. The same steps as the guest's E4 and E5.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pcisim_devices::gpu::ring::{ctrl, encode, err, flag, op, status};
use pcisim_devices::gpu::{self, regs, GpuConfig};
use pcisim_journal::{Event, Journal, RingErrorCode};
use pcisim_vfio_user::{irq_index, region, Server, ServerOptions};
use vfio_bindings::bindings::vfio::{VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

const MEM: u64 = 0x10_0000;
const IOVA: u64 = 0x4000_0000;
const RING: u64 = IOVA;
const FENCE: u64 = IOVA + 0x1000;
const A: u64 = IOVA + 0x1_0000;
const B: u64 = IOVA + 0x3_0000;
const C: u64 = IOVA + 0x5_0000;
const LEN: u64 = 0x1_2345;

struct Harness {
    path: PathBuf,
    _dir: TempDir,
    journal: Journal,
    mem: File,
    pcie: u64,
}

fn memfd(size: u64) -> File {
    // SAFETY: a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(size).unwrap();
    f
}

fn start() -> Harness {
    let dir = TempDir::new_with_prefix("/tmp/pcisim-ring").unwrap();
    let path = dir.as_path().join("gpu.sock");
    let ep = gpu::endpoint(&GpuConfig {
        vram_size: 1 << 20,
        ..GpuConfig::default()
    })
    .unwrap();
    let journal = ep.journal().clone();
    let pcie = u64::from(ep.cap_offsets().pcie.unwrap().0);
    let server = Server::bind(&path, Arc::new(Mutex::new(ep)), ServerOptions::default()).unwrap();
    std::thread::spawn(move || server.run());
    Harness {
        path,
        _dir: dir,
        journal,
        mem: memfd(MEM),
        pcie,
    }
}

fn rd(c: &mut vfio_user::Client, off: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(0, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn wr(c: &mut vfio_user::Client, off: u64, v: u32) {
    c.region_write(0, off, &v.to_le_bytes()).unwrap();
}

fn command(c: &mut vfio_user::Client, v: u16) {
    c.region_write(region::CONFIG, 4, &v.to_le_bytes()).unwrap();
}

fn put(h: &Harness, slot: u64, cmd: [u8; 32]) {
    h.mem.write_all_at(&cmd, RING - IOVA + slot * 32).unwrap();
}

fn read_mem(h: &Harness, iova: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    h.mem.read_exact_at(&mut b, iova - IOVA).unwrap();
    b
}

fn wait_fd(e: &EventFd, timeout: Duration) -> u64 {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Ok(n) = e.read() {
            return n;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    0
}

/// Client attached with guest memory mapped, Memory + Bus Master on, eventfds on vectors 0
/// (fence) and 1 (error), ring of 16 entries enabled.
fn setup(h: &Harness) -> (vfio_user::Client, EventFd, EventFd) {
    let mut c = vfio_user::Client::new(&h.path).unwrap();
    c.dma_map(0, IOVA, MEM, h.mem.as_raw_fd()).unwrap();
    command(&mut c, 0x6);
    let fence = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let error = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    c.set_irqs(
        irq_index::MSIX,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        2,
        &[fence.as_raw_fd(), error.as_raw_fd()],
    )
    .unwrap();
    wr(&mut c, regs::RING_BASE_LO, RING as u32);
    wr(&mut c, regs::RING_BASE_HI, (RING >> 32) as u32);
    wr(&mut c, regs::RING_SIZE, 16);
    wr(&mut c, regs::RING_CTRL, ctrl::ENABLE);
    (c, fence, error)
}

#[test]
fn test_ring_fill_copy_fence_through_server_bus_data_exact() {
    let h = start();
    let (mut c, fence, error) = setup(&h);
    assert_eq!(rd(&mut c, regs::VERSION), regs::VERSION_1_1);
    assert_eq!(rd(&mut c, regs::FENCE_VECTOR), 0);
    assert_eq!(rd(&mut c, regs::ERROR_VECTOR), 1);
    let data: Vec<u8> = (0..LEN).map(|i| (i * 7 + 3) as u8).collect();
    h.mem.write_all_at(&data, A - IOVA).unwrap();
    put(&h, 0, encode(op::FILL, 0, C, 0xa1b2_c3d4, 0x8000));
    put(&h, 1, encode(op::COPY, flag::DST_VRAM, A, 0x101, LEN));
    put(&h, 2, encode(op::COPY, flag::SRC_VRAM, 0x101, B + 3, LEN));
    put(&h, 3, encode(op::COPY, 0, B + 3, C + 0x9001, LEN));
    put(
        &h,
        4,
        encode(op::WRITE_FENCE, flag::FENCE_IRQ, FENCE, 0x1234_5678_9abc, 0),
    );
    wr(&mut c, regs::RING_TAIL, 5);
    assert_eq!(wait_fd(&fence, Duration::from_secs(5)), 1);
    assert_eq!(read_mem(&h, FENCE, 8), 0x1234_5678_9abcu64.to_le_bytes());
    assert_eq!(rd(&mut c, regs::LAST_FENCE_LO), 0x5678_9abc);
    assert_eq!(rd(&mut c, regs::LAST_FENCE_HI), 0x1234);
    assert_eq!(rd(&mut c, regs::RING_HEAD), 5);
    assert_eq!(rd(&mut c, regs::RING_STATUS), status::IDLE);
    assert_eq!(rd(&mut c, regs::CMDS_COMPLETED), 5);
    assert!(read_mem(&h, C, 0x8000)
        .chunks(4)
        .all(|w| w == [0xd4, 0xc3, 0xb2, 0xa1]));
    assert_eq!(read_mem(&h, B + 3, LEN), data);
    assert_eq!(read_mem(&h, C + 0x9001, LEN), data);
    let mut v = vec![0u8; LEN as usize];
    c.region_read(2, 0x101, &mut v).unwrap();
    assert_eq!(v, data);
    assert_eq!(error.read().ok(), None);

    // A malformed command: error status, error vector, a note; nothing else moves.
    put(&h, 5, encode(op::FILL, 0, C + 2, 0, 8));
    wr(&mut c, regs::RING_TAIL, 6);
    assert_eq!(wait_fd(&error, Duration::from_secs(5)), 1);
    assert_eq!(rd(&mut c, regs::RING_STATUS), status::ERROR);
    assert_eq!(rd(&mut c, regs::RING_ERROR), err::ALIGNMENT | (5 << 16));
    assert_eq!(rd(&mut c, regs::RING_FAULT_ADDR_LO), (C + 2) as u32);
    let (recs, _) = h.journal.since(0);
    assert!(recs.iter().any(|r| matches!(
        &r.event,
        Event::RingError {
            code: RingErrorCode::Alignment,
            slot: 5,
            ..
        }
    )));
    assert!(
        h.journal.violations().is_empty(),
        "{:?}",
        h.journal.violations()
    );
}

#[test]
fn test_ring_bus_master_off_fill_refused_then_works_after_reenable() {
    let h = start();
    let (mut c, fence, error) = setup(&h);
    h.mem.write_all_at(&[0x77; 0x1000], C - IOVA).unwrap();
    put(&h, 0, encode(op::FILL, 0, C, 0, 0x1000));
    put(&h, 1, encode(op::WRITE_FENCE, flag::FENCE_IRQ, FENCE, 1, 0));
    let mark = h.journal.last_seq();
    command(&mut c, 0x2); // Memory on, Bus Master off.
    wr(&mut c, regs::RING_TAIL, 2);
    let t0 = Instant::now();
    while rd(&mut c, regs::RING_STATUS) != status::ERROR {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(rd(&mut c, regs::RING_ERROR), err::DMA_REFUSED);
    assert_eq!(read_mem(&h, C, 0x1000), vec![0x77; 0x1000]);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(error.read().ok(), None, "no MSI-X without Bus Master");
    let (recs, _) = h.journal.since(mark);
    assert!(
        recs.iter()
            .any(|r| matches!(r.event, Event::DmaRefused { .. })),
        "{recs:?}"
    );
    assert!(!recs.iter().any(|r| matches!(r.event, Event::Dma { .. })));
    // Bus Master back on: the held-back error interrupt goes out; reset the ring and retry.
    command(&mut c, 0x6);
    assert_eq!(wait_fd(&error, Duration::from_secs(5)), 1);
    wr(&mut c, regs::RING_CTRL, ctrl::RESET | ctrl::ENABLE);
    assert_eq!(rd(&mut c, regs::RING_STATUS), status::IDLE);
    wr(&mut c, regs::RING_TAIL, 2);
    assert_eq!(wait_fd(&fence, Duration::from_secs(5)), 1);
    assert_eq!(read_mem(&h, C, 0x1000), vec![0; 0x1000]);
    assert!(
        h.journal.violations().is_empty(),
        "{:?}",
        h.journal.violations()
    );
}

/// Eight 64 MiB FILLs into a mapped region, the first started.
fn long_fill(h: &Harness, c: &mut vfio_user::Client) {
    let big = memfd(64 << 20);
    c.dma_map(0, 0x1_0000_0000, 64 << 20, big.as_raw_fd())
        .unwrap();
    for k in 0..8u64 {
        put(
            h,
            k,
            encode(op::FILL, 0, 0x1_0000_0000, 0x5555_5555 + k, 64 << 20),
        );
    }
    wr(c, regs::RING_TAIL, 8);
    let t0 = Instant::now();
    while h.journal.stats().dma_bytes < 1 << 20 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the fill never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Device Control "Initiate FLR" (PCIe cap).
fn flr(h: &Harness, c: &mut vfio_user::Client) {
    let mut devctl = [0u8; 2];
    c.region_read(region::CONFIG, h.pcie + 8, &mut devctl)
        .unwrap();
    let v = u16::from_le_bytes(devctl) | 0x8000;
    c.region_write(region::CONFIG, h.pcie + 8, &v.to_le_bytes())
        .unwrap();
}

fn transactions_pending(h: &Harness, c: &mut vfio_user::Client) -> bool {
    let mut devsta = [0u8; 2];
    c.region_read(region::CONFIG, h.pcie + 0xa, &mut devsta)
        .unwrap();
    u16::from_le_bytes(devsta) & (1 << 5) != 0
}

fn registers_back_to_defaults_and_quiet(h: &Harness, c: &mut vfio_user::Client) {
    command(c, 0x2);
    assert_eq!(rd(c, regs::RING_CTRL), 0);
    assert_eq!(rd(c, regs::RING_HEAD), 0);
    assert_eq!(rd(c, regs::RING_SIZE), 0);
    assert_eq!(rd(c, regs::CMDS_COMPLETED), 0);
    let n = h.journal.stats().dma_bytes;
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.journal.stats().dma_bytes, n, "no DMA after the FLR");
}

fn noted(h: &Harness, what: impl Fn(&Event) -> bool) -> bool {
    let (recs, _) = h.journal.since(0);
    recs.iter().any(|r| what(&r.event))
}

/// The driver's side done right (the kernel's `pcie_flr`): Bus Master Enable cleared, wait for
/// Transactions Pending to clear, then FLR. The fill's DMA is refused, nothing lands inside
/// the reset.
#[test]
fn test_ring_flr_after_bus_master_off_and_tp_clear_no_dma_inside_reset() {
    let h = start();
    let (mut c, _fence, _error) = setup(&h);
    long_fill(&h, &mut c);
    assert!(transactions_pending(&h, &mut c), "TP while the fill runs");
    command(&mut c, 0x2);
    let t0 = Instant::now();
    while transactions_pending(&h, &mut c) {
        assert!(t0.elapsed() < Duration::from_secs(1), "TP never cleared");
        std::thread::sleep(Duration::from_millis(1));
    }
    flr(&h, &mut c);
    registers_back_to_defaults_and_quiet(&h, &mut c);
    // The fill stopped on its first refused access, before the FLR.
    assert!(noted(&h, |e| matches!(
        e,
        Event::RingError {
            code: RingErrorCode::DmaRefused,
            ..
        }
    )));
    assert!(!noted(&h, |e| matches!(
        e,
        Event::FlrWithTransactionsPending
    )));
    assert!(
        h.journal.violations().is_empty(),
        "{:?}",
        h.journal.violations()
    );
}

/// A driver bug: FLR while the fill runs (Transactions Pending set, Bus Master on). The chunk
/// the engine has in flight lands after `reset_begin` (posted writes already issued); the
/// checker reports exactly those writes as `dma_during_reset`. The engine then stops.
#[test]
fn test_ring_flr_with_transactions_pending_chunk_in_flight_lands_inside_reset() {
    let h = start();
    let (mut c, _fence, _error) = setup(&h);
    long_fill(&h, &mut c);
    assert!(transactions_pending(&h, &mut c), "TP while the fill runs");
    flr(&h, &mut c);
    registers_back_to_defaults_and_quiet(&h, &mut c);
    assert!(noted(&h, |e| matches!(e, Event::RingCommandAborted { .. })));
    assert!(noted(&h, |e| matches!(e, Event::PostedWritesLanded { .. })));
    let (recs, _) = h.journal.since(0);
    let begin = recs
        .iter()
        .position(|r| matches!(r.event, Event::ResetBegin { .. }))
        .expect("reset_begin");
    assert!(
        matches!(&recs[begin - 1].event, Event::FlrWithTransactionsPending),
        "{:?}",
        recs[begin - 1]
    );
    let end = recs
        .iter()
        .position(|r| matches!(r.event, Event::ResetEnd { .. }))
        .expect("reset_end");
    let inside: u64 = recs[begin..end]
        .iter()
        .map(|r| match r.event {
            Event::Dma { bytes, .. } => bytes,
            _ => 0,
        })
        .sum();
    assert_eq!(inside, 64 << 10, "one 64 KiB chunk lands inside the reset");
    let v = h.journal.violations();
    assert!(!v.is_empty());
    assert!(v.iter().all(|r| matches!(
        r.event,
        Event::Violation {
            kind: pcisim_journal::ViolationKind::DmaDuringReset,
            ..
        }
    )));
}

/// IRQ_COUNT counts what docs/programming-model.md says: IRQ_DOORBELL writes whose interrupt
/// went out at once (IRQ_LAST_ERROR = 0). Not the ring's fence/error interrupts, not a
/// doorbell held in the PBA and delivered later.
#[test]
fn test_irq_count_counts_doorbells_delivered_at_once_only() {
    let h = start();
    let (mut c, fence, _error) = setup(&h);
    assert_eq!(rd(&mut c, regs::IRQ_COUNT), 0);
    // A ring fence interrupt, delivered: not counted.
    put(
        &h,
        0,
        encode(op::WRITE_FENCE, flag::FENCE_IRQ, FENCE, 0x77, 0),
    );
    wr(&mut c, regs::RING_TAIL, 1);
    assert_eq!(wait_fd(&fence, Duration::from_secs(5)), 1);
    assert_eq!(rd(&mut c, regs::LAST_FENCE_LO), 0x77);
    assert_eq!(
        rd(&mut c, regs::IRQ_COUNT),
        0,
        "ring interrupts are not counted"
    );
    // A doorbell on a bound vector: counted.
    wr(&mut c, regs::IRQ_DOORBELL, 0);
    assert_eq!(fence.read().unwrap(), 1);
    assert_eq!(rd(&mut c, regs::IRQ_LAST_ERROR), regs::IRQ_OK);
    assert_eq!(
        rd(&mut c, regs::IRQ_COUNT),
        1,
        "a doorbell delivered at once"
    );
    // A doorbell on an unbound vector: pending, not counted; delivered on bind, still not.
    wr(&mut c, regs::IRQ_DOORBELL, 9);
    assert_eq!(rd(&mut c, regs::IRQ_LAST_ERROR), regs::IRQ_ERR_NOT_BOUND);
    let late = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    c.set_irqs(
        irq_index::MSIX,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        9,
        1,
        &[late.as_raw_fd()],
    )
    .unwrap();
    assert_eq!(
        late.read().unwrap(),
        1,
        "the held doorbell went out on bind"
    );
    assert_eq!(
        rd(&mut c, regs::IRQ_COUNT),
        1,
        "a later delivery from the PBA is not counted"
    );
    assert!(h.journal.violations().is_empty());
}
