//! NPU tests through the endpoint (BAR0 via the `Device` trait), against an in-memory guest
//! image with real x86-64 page tables — plus one run over the real [`pcisim_pci::Bus`] and a
//! client `DmaSpace`. Named after the rules of docs/npu.md they check.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use pcisim_journal::{Dir, Event, Journal, Refusal, ViolationKind};
use pcisim_pci::{Endpoint, MsixOutcome};
use pcisim_vfio_user::{region, Device};

use super::engine::{InFlight, NpuHost};
use super::queue::{Completion, Descriptor, FaultRecord};
use super::regs::*;
use super::walk::testmem::{SparseMem, Tables};
use super::walk::{FaultReason, MemError, PhysMem, PAGE_1G, PAGE_2M, PAGE_4K, PTE_RW, PTE_US};
use super::*;

// ---- guest image layout ----------------------------------------------------------------------

const ROOT_A: u64 = 0x10_0000;
const ROOT_B: u64 = 0x18_0000;
const SQ: u64 = 0x20_0000;
const CQ: u64 = 0x21_0000;
const FQ: u64 = 0x22_0000;
const QSIZE: u32 = 64;
const DATA: u64 = 0x100_0000;
const VA: u64 = 0x7f00_0000_0000;
const UF: u64 = PTE_RW | PTE_US;
const PA5: u32 = 5;
const PA6: u32 = 6;
const CQ_VEC: u16 = 1;
const FQ_VEC: u16 = 2;
const CMD_VEC: u16 = 3;
const WAIT: Duration = Duration::from_secs(10);

// ---- the test host ---------------------------------------------------------------------------

#[derive(Default)]
struct Gate {
    armed: bool,
    blocked: bool,
    /// Accesses let through while armed ([`TestHost::step_gate`]).
    passes: u32,
}

/// Guest memory, journal and interrupts for an NPU under test.
struct TestHost {
    mem: SparseMem,
    journal: Journal,
    irqs: Mutex<Vec<u16>>,
    master: AtomicBool,
    /// Successful writes: (pasid, address, length).
    writes: Mutex<Vec<(Option<u32>, u64, usize)>>,
    gate: Mutex<Gate>,
    gate_cv: Condvar,
    /// Work items in flight (Transactions Pending).
    inflight: AtomicU32,
    /// Accesses refused because bus mastering was off.
    refused: AtomicU32,
}

struct TestInFlight<'a>(&'a AtomicU32);

impl Drop for TestInFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl TestHost {
    fn new() -> TestHost {
        // The journal's checker must see what the real endpoint would have told it: a client
        // with all of the image mapped, and Bus Master on.
        let journal = Journal::new("npu-test", 1 << 16);
        journal.record(Event::ClientConnected);
        journal.record(Event::DmaMapped {
            iova: 0,
            size: 1 << 40,
            backed: true,
            read: true,
            write: true,
        });
        journal.record(Event::Command {
            old: 0,
            new: 0x0006,
        });
        TestHost {
            mem: SparseMem::new(1 << 40),
            journal,
            irqs: Mutex::new(Vec::new()),
            master: AtomicBool::new(true),
            writes: Mutex::new(Vec::new()),
            gate: Mutex::new(Gate::default()),
            gate_cv: Condvar::new(),
            inflight: AtomicU32::new(0),
            refused: AtomicU32::new(0),
        }
    }

    fn pass_gate(&self, pasid: Option<u32>) {
        if pasid.is_none() {
            return;
        }
        let mut g = self.gate.lock().unwrap();
        while g.armed {
            if g.passes > 0 {
                g.passes -= 1;
                return;
            }
            g.blocked = true;
            self.gate_cv.notify_all();
            g = self.gate_cv.wait(g).unwrap();
        }
    }

    fn arm_gate(&self) {
        let mut g = self.gate.lock().unwrap();
        g.armed = true;
        g.blocked = false;
    }

    fn wait_blocked(&self) {
        let deadline = Instant::now() + WAIT;
        let mut g = self.gate.lock().unwrap();
        while !g.blocked {
            assert!(Instant::now() < deadline, "engine never reached the gate");
            g = self
                .gate_cv
                .wait_timeout(g, Duration::from_millis(10))
                .unwrap()
                .0;
        }
    }

    /// Let the blocked access through and hold the next one (the gate stays armed).
    fn step_gate(&self) {
        let mut g = self.gate.lock().unwrap();
        g.blocked = false;
        g.passes = 1;
        self.gate_cv.notify_all();
    }

    fn open_gate(&self) {
        self.gate.lock().unwrap().armed = false;
        self.gate_cv.notify_all();
    }

    /// Refuse like the bus does when bus mastering is off.
    fn refuse(&self, dir: Dir, addr: u64, len: u64) -> Result<(), MemError> {
        if self.may_master() {
            return Ok(());
        }
        self.refused.fetch_add(1, Ordering::AcqRel);
        self.journal.record(Event::DmaRefused {
            dir,
            iova: addr,
            len,
            reason: Refusal::BusMasterDisabled,
        });
        Err(MemError::Refused)
    }

    fn irqs(&self) -> Vec<u16> {
        self.irqs.lock().unwrap().clone()
    }

    /// The interrupts raised, once there are at least `n` (the engine raises them after it
    /// released its lock, so after the completion is visible).
    fn wait_irqs(&self, n: usize) -> Vec<u16> {
        wait_until("interrupts", || self.irqs().len() >= n);
        self.irqs()
    }

    fn events(&self) -> Vec<Event> {
        self.journal
            .since(0)
            .0
            .into_iter()
            .map(|r| r.event)
            .collect()
    }
}

impl NpuHost for TestHost {
    fn may_master(&self) -> bool {
        self.master.load(Ordering::Acquire)
    }

    fn dma_read(&self, pasid: Option<u32>, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.pass_gate(pasid);
        let len = buf.len() as u64;
        self.refuse(Dir::Read, addr, len)?;
        match self.mem.read_bytes(addr, buf) {
            Ok(()) => {
                self.journal.record(Event::Dma {
                    dir: Dir::Read,
                    pasid,
                    iova: addr,
                    len,
                    count: 1,
                    bytes: len,
                });
                Ok(())
            }
            Err(e) => {
                self.journal.record(Event::DmaFault {
                    dir: Dir::Read,
                    pasid,
                    iova: addr,
                    len,
                });
                Err(e)
            }
        }
    }

    fn dma_write(&self, pasid: Option<u32>, addr: u64, data: &[u8]) -> Result<(), MemError> {
        self.pass_gate(pasid);
        let len = data.len() as u64;
        self.refuse(Dir::Write, addr, len)?;
        match self.mem.write_bytes(addr, data) {
            Ok(()) => {
                self.writes.lock().unwrap().push((pasid, addr, data.len()));
                self.journal.record(Event::Dma {
                    dir: Dir::Write,
                    pasid,
                    iova: addr,
                    len,
                    count: 1,
                    bytes: len,
                });
                Ok(())
            }
            Err(e) => {
                self.journal.record(Event::DmaFault {
                    dir: Dir::Write,
                    pasid,
                    iova: addr,
                    len,
                });
                Err(e)
            }
        }
    }

    fn inspect(&self, _pasid: u32, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.mem.read(addr, buf)
    }

    fn raise_msix(&self, vector: u16) -> MsixOutcome {
        self.irqs.lock().unwrap().push(vector);
        MsixOutcome::Delivered
    }

    fn record(&self, event: Event) {
        self.journal.record(event);
    }

    fn in_flight(&self) -> Box<dyn InFlight + '_> {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        Box::new(TestInFlight(&self.inflight))
    }
}

// ---- the rig ---------------------------------------------------------------------------------

struct Rig {
    ep: Endpoint<Npu>,
    host: Arc<TestHost>,
    next_table: [u64; 2],
    sq_tail: u32,
    cq_seen: u32,
}

fn rd(ep: &mut Endpoint<Npu>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    ep.region_read(0, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn wr(ep: &mut Endpoint<Npu>, off: u64, v: u32) {
    ep.region_write(0, off, &v.to_le_bytes()).unwrap();
}

fn wr64(ep: &mut Endpoint<Npu>, off: u64, v: u64) {
    ep.region_write(0, off, &v.to_le_bytes()).unwrap();
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Write the command registers and the opcode (no waiting).
fn cmd_start(ep: &mut Endpoint<Npu>, op: u32, pasid: u32, flags: u32, addr: u64, len: u64) {
    wr(ep, CMD_PASID, pasid);
    wr(ep, CMD_FLAGS, flags);
    wr64(ep, CMD_ADDR_LO, addr);
    wr64(ep, CMD_LEN_LO, len);
    wr(ep, CMD_OP, op);
}

/// Run a command and wait for it: (status, result).
fn cmd(ep: &mut Endpoint<Npu>, op: u32, pasid: u32, flags: u32, addr: u64, len: u64) -> (u32, u32) {
    cmd_start(ep, op, pasid, flags, addr, len);
    wait_until("command completion", || rd(ep, CMD_STATUS) & CMD_BUSY == 0);
    (rd(ep, CMD_STATUS), rd(ep, CMD_RESULT))
}

impl Rig {
    fn new() -> Rig {
        Rig::with(NpuConfig::default())
    }

    fn with(cfg: NpuConfig) -> Rig {
        let mut ep = endpoint(&cfg).unwrap();
        // Memory Space on (BAR access); bus mastering is the test host's business.
        ep.region_write(region::CONFIG, 0x04, &0x0006u16.to_le_bytes())
            .unwrap();
        let host = Arc::new(TestHost::new());
        ep.function_mut().attach_host(host.clone());
        for q in [SQ, CQ, FQ] {
            host.mem.touch(q);
        }
        host.mem.touch(ROOT_A);
        host.mem.touch(ROOT_B);
        Rig {
            ep,
            host,
            next_table: [ROOT_A + 4096, ROOT_B + 4096],
            sq_tail: 0,
            cq_seen: 0,
        }
    }

    fn tables(&mut self, root: u64) -> Tables<'_> {
        let i = usize::from(root == ROOT_B);
        Tables {
            mem: &self.host.mem,
            root,
            next: self.next_table[i],
        }
    }

    /// Map `pages` 4 KiB pages at `va` to `pa` in the tables at `root`, creating the data pages.
    fn map(&mut self, root: u64, va: u64, pa: u64, pages: u64, flags: u64) {
        let i = usize::from(root == ROOT_B);
        let mut t = self.tables(root);
        for p in 0..pages {
            t.map(va + p * PAGE_4K, pa + p * PAGE_4K, PAGE_4K, flags);
        }
        let next = t.next;
        self.next_table[i] = next;
        for p in 0..pages {
            self.host.mem.touch(pa + p * PAGE_4K);
        }
    }

    fn set_leaf(&mut self, root: u64, va: u64, raw: u64) {
        let i = usize::from(root == ROOT_B);
        let mut t = self.tables(root);
        t.set_entry(va, 1, raw);
        let next = t.next;
        self.next_table[i] = next;
    }

    fn rd(&mut self, off: u64) -> u32 {
        rd(&mut self.ep, off)
    }

    /// Command: Memory Space and Bus Master on (as the guest restores after a reset).
    fn enable_memory(&mut self) {
        self.ep
            .region_write(region::CONFIG, 0x04, &0x0006u16.to_le_bytes())
            .unwrap();
    }

    /// Function Level Reset through Device Control, then the guest's restore of Command.
    fn flr(&mut self) {
        let devctl = self.ep.cap_offsets().pcie.unwrap().0 + pcisim_pci::caps::pcie::DEVCTL;
        self.ep
            .region_write(region::CONFIG, u64::from(devctl), &0x8000u16.to_le_bytes())
            .unwrap();
        self.enable_memory();
    }

    fn wr(&mut self, off: u64, v: u32) {
        wr(&mut self.ep, off, v)
    }

    fn cmd(&mut self, op: u32, pasid: u32, flags: u32, addr: u64, len: u64) -> (u32, u32) {
        cmd(&mut self.ep, op, pasid, flags, addr, len)
    }

    fn bind(&mut self, pasid: u32, root: u64) {
        assert_eq!(self.cmd(OP_BIND, pasid, 0, root, 0), (CMD_OK, 0));
    }

    /// Configure SQ/CQ/FQ (with interrupts) and enable the engine.
    fn start(&mut self) {
        let ep = &mut self.ep;
        wr64(ep, SQ_BASE_LO, SQ);
        wr(ep, SQ_SIZE, QSIZE);
        wr64(ep, CQ_BASE_LO, CQ);
        wr(ep, CQ_SIZE, QSIZE);
        wr64(ep, FQ_BASE_LO, FQ);
        wr(ep, FQ_SIZE, QSIZE);
        wr(ep, CQ_IRQ, IRQ_ENABLE | u32::from(CQ_VEC));
        wr(ep, FQ_IRQ, IRQ_ENABLE | u32::from(FQ_VEC));
        wr(ep, CONTROL, CONTROL_ENABLE);
        assert_eq!(
            rd(ep, STATUS) & (STATUS_ENABLED | STATUS_HALTED),
            STATUS_ENABLED
        );
        self.sq_tail = 0;
        self.cq_seen = 0;
    }

    fn submit(&mut self, d: &Descriptor) {
        self.submit_all(&[*d]);
    }

    /// Write the descriptors into the SQ, then ring the doorbell once.
    fn submit_all(&mut self, ds: &[Descriptor]) {
        for d in ds {
            self.host
                .mem
                .poke(SQ + u64::from(self.sq_tail) * DESC_SIZE, &d.encode());
            self.sq_tail = (self.sq_tail + 1) % QSIZE;
        }
        let tail = self.sq_tail;
        self.wr(SQ_TAIL, tail);
    }

    /// Wait for `n` more completions, consume them (CQ_HEAD) and return them.
    fn completions(&mut self, n: u32) -> Vec<Completion> {
        let target = (self.cq_seen + n) % QSIZE;
        wait_until("completions", || rd(&mut self.ep, CQ_TAIL) == target);
        let mut out = Vec::new();
        for _ in 0..n {
            let raw: [u8; 32] = self
                .host
                .mem
                .peek(CQ + u64::from(self.cq_seen) * COMPLETION_SIZE, 32)
                .try_into()
                .unwrap();
            out.push(Completion::decode(&raw).expect("valid completion"));
            self.cq_seen = (self.cq_seen + 1) % QSIZE;
        }
        self.wr(CQ_HEAD, self.cq_seen);
        out
    }

    fn run(&mut self, d: &Descriptor) -> Completion {
        self.submit(d);
        self.completions(1)[0]
    }

    fn fault_records(&mut self) -> Vec<FaultRecord> {
        let tail = self.rd(FQ_TAIL);
        let mut head = self.rd(FQ_HEAD);
        let mut out = Vec::new();
        while head != tail {
            let raw: [u8; 32] = self
                .host
                .mem
                .peek(FQ + u64::from(head) * FAULT_SIZE, 32)
                .try_into()
                .unwrap();
            out.push(FaultRecord::decode(&raw));
            head = (head + 1) % QSIZE;
        }
        self.wr(FQ_HEAD, head);
        out
    }
}

fn memcpy(pasid: u32, src: u64, dst: u64, len: u64, tag: u64) -> Descriptor {
    Descriptor {
        op: DESC_MEMCPY,
        flags: DESC_FLAG_IRQ,
        pasid,
        src,
        dst,
        len,
        tag,
        ..Descriptor::default()
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (seed.wrapping_add(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
        .collect()
}

fn count<F: Fn(&Event) -> bool>(events: &[Event], f: F) -> usize {
    events.iter().filter(|e| f(e)).count()
}

fn position<F: Fn(&Event) -> bool>(events: &[Event], f: F) -> usize {
    events.iter().position(f).expect("event present")
}

// ---- identity, capabilities, peer ------------------------------------------------------------

#[test]
fn test_regs_identity_ro_values() {
    let mut r = Rig::new();
    let mut id = [0u8; 4];
    r.ep.region_read(0, ID, &mut id).unwrap();
    assert_eq!(&id, b"PCSN");
    assert_eq!(r.rd(VERSION), 0x0001_0000);
    assert_eq!(
        r.rd(FEATURES),
        FEATURE_PASID | FEATURE_ATC | FEATURE_FAULT_QUEUE | FEATURE_CHECKING
    );
    assert_eq!(r.rd(super::regs::MSIX_VECTORS), 16);
    assert_eq!(r.rd(MAX_CONTEXTS), 256);
    assert_eq!(r.rd(ATC_ENTRIES), 512);
    assert_eq!(r.rd(PEER_STATUS), 0);
    for reg in [
        ID, VERSION, FEATURES, STATUS, SQ_HEAD, CQ_TAIL, FQ_TAIL, COMPLETED,
    ] {
        let before = r.rd(reg);
        r.wr(reg, 0x5a5a_5a5a);
        assert_eq!(r.rd(reg), before, "register {reg:#x} is RO");
    }
}

#[test]
fn test_regs_undefined_offsets_read_zero_ignore_writes() {
    let mut r = Rig::new();
    for off in [0x02c, 0x03c, 0x06c, 0x0fc, 0x114, 0x19c, 0x200, 0x7ffc] {
        r.wr(off, 0xffff_ffff);
        assert_eq!(r.rd(off), 0, "offset {off:#x}");
    }
    assert_eq!(r.rd(CMD_OP), 0, "the doorbell reads 0");
}

#[test]
fn test_describe_npu_ids_class_and_capabilities() {
    let ep = endpoint(&NpuConfig::default()).unwrap();
    let d = ep.describe();
    assert_eq!((d.vendor_id, d.device_id), (0x1234, 0x0b20));
    assert_eq!(d.class_code, 0x12_0000);
    assert_eq!(d.revision, 1);
    assert_eq!(d.bars.len(), 1);
    assert_eq!(
        (d.bars[0].size, d.bars[0].mem64, d.bars[0].prefetchable),
        (64 << 10, true, false)
    );
    let ids: Vec<u8> = d.capabilities.iter().map(|c| c.id).collect();
    assert_eq!(
        ids,
        vec![0x01, 0x11, 0x10],
        "PM, MSI-X, PCIe; no vendor cap without a peer"
    );
    let ext: Vec<u16> = d.ext_capabilities.iter().map(|c| c.id).collect();
    assert_eq!(
        ext,
        vec![0x0001, 0x000f, 0x001b, 0x0013],
        "AER, ATS, PASID, PRI"
    );
    // PASID: Max PASID Width 20, privileged mode supported, exec not.
    let pasid = d.ext_capabilities[2].offset;
    let mut cap = [0u8; 2];
    let mut ep = ep;
    ep.region_read(region::CONFIG, u64::from(pasid) + 4, &mut cap)
        .unwrap();
    let v = u16::from_le_bytes(cap);
    assert_eq!((v >> 8) & 0x1f, 20);
    assert_eq!(v & 0b110, 0b100);
}

#[test]
fn test_peer_vendor_capability_and_status_follow_presence() {
    let peer = PeerConfig {
        id: peer_id_from_name("/run/pcisim/gpu0.sock"),
        vendor_id: 0x1234,
        device_id: 0x0b10,
    };
    assert_ne!(peer.id, 0);
    let mut r = Rig::with(NpuConfig {
        peer: Some(peer),
        ..NpuConfig::default()
    });
    let d = r.ep.describe();
    let vcap = d.capabilities.iter().find(|c| c.id == 0x09).unwrap();
    let mut b = [0u8; 12];
    r.ep.region_read(region::CONFIG, u64::from(vcap.offset), &mut b)
        .unwrap();
    assert_eq!(b[0], 0x09);
    assert_eq!(b[2], 12, "vendor capability length");
    assert_eq!(b[3], VSEC_KIND_GPU_PEER);
    assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), peer.id);
    assert_eq!(u16::from_le_bytes([b[8], b[9]]), 0x1234);
    assert_eq!(u16::from_le_bytes([b[10], b[11]]), 0x0b10);
    assert_eq!(r.rd(PEER_ID), peer.id);
    assert_ne!(r.rd(FEATURES) & FEATURE_PEER, 0);
    assert_eq!(r.rd(PEER_STATUS), PEER_CONFIGURED);
    let presence = r.ep.function().peer_presence();
    presence.set(true);
    assert_eq!(r.rd(PEER_STATUS), PEER_CONFIGURED | PEER_PRESENT);
    presence.set(false);
    assert_eq!(r.rd(PEER_STATUS), PEER_CONFIGURED, "the peer went away");
}

// ---- commands --------------------------------------------------------------------------------

#[test]
fn test_commands_invalid_arguments_status_codes() {
    let mut r = Rig::new();
    assert_eq!(r.cmd(9, 1, 0, 0, 0).0, CMD_BAD_OPCODE);
    assert_eq!(r.cmd(OP_BIND, 0, 0, ROOT_A, 0).0, CMD_BAD_PASID);
    assert_eq!(r.cmd(OP_BIND, 1 << 20, 0, ROOT_A, 0).0, CMD_BAD_PASID);
    assert_eq!(r.cmd(OP_BIND, 1, 0x80, ROOT_A, 0).0, CMD_BAD_FLAGS);
    assert_eq!(r.cmd(OP_INVALIDATE, 1, 1, 0, 0).0, CMD_BAD_FLAGS);
    assert_eq!(r.cmd(OP_UNBIND, 1, 0, 0, 0).0, CMD_NOT_BOUND);
    assert_eq!(r.cmd(OP_BIND, 1, 0, ROOT_A, 0).0, CMD_OK);
    assert_eq!(r.cmd(OP_BIND, 1, 0, ROOT_B, 0).0, CMD_ALREADY_BOUND);
    assert_eq!(r.rd(CMD_SEQ), 8);
}

#[test]
fn test_bind_beyond_max_contexts_no_resources() {
    let mut r = Rig::with(NpuConfig {
        max_contexts: 2,
        ..NpuConfig::default()
    });
    r.bind(1, ROOT_A);
    r.bind(2, ROOT_A);
    assert_eq!(r.cmd(OP_BIND, 3, 0, ROOT_A, 0).0, CMD_NO_RESOURCES);
    assert_eq!(r.cmd(OP_UNBIND, 2, 0, 0, 0), (CMD_OK, 0));
    r.bind(3, ROOT_A);
}

#[test]
fn test_command_completion_raises_cmd_irq() {
    let mut r = Rig::new();
    r.wr(CMD_IRQ, IRQ_ENABLE | 7);
    r.bind(1, ROOT_A);
    r.wr(CMD_IRQ, 7);
    r.bind(2, ROOT_A);
    assert_eq!(r.host.irqs(), vec![7], "one interrupt, while enabled");
}

#[test]
fn test_unbind_idle_pasid_acks_at_once_then_work_not_bound() {
    let mut r = Rig::new();
    r.map(ROOT_A, VA, DATA, 2, UF);
    r.start();
    r.bind(PA5, ROOT_A);
    assert_eq!(r.cmd(OP_UNBIND, PA5, 0, 0, 0), (CMD_OK, 0));
    let ev = r.host.events();
    let begin = position(&ev, |e| matches!(e, Event::PasidUnbindBegin { pasid: 5 }));
    let drained = position(&ev, |e| {
        matches!(
            e,
            Event::PasidDrained {
                pasid: 5,
                aborted: 0
            }
        )
    });
    let ack = position(&ev, |e| matches!(e, Event::PasidUnbindAck { pasid: 5 }));
    assert!(begin < drained && drained < ack);
    let seq = r.host.journal.last_seq();
    let c = r.run(&memcpy(PA5, VA, VA + 4096, 64, 1));
    assert_eq!(c.status, ST_PASID_NOT_BOUND);
    let (later, _) = r.host.journal.since(seq);
    assert!(
        !later
            .iter()
            .any(|rec| matches!(rec.event, Event::Dma { pasid: Some(_), .. })),
        "no access through the PASID after the ack"
    );
    assert!(r.host.journal.violations().is_empty());
}

// ---- work ------------------------------------------------------------------------------------

#[test]
fn test_memcpy_over_va_completion_record_cq_and_msix() {
    let mut r = Rig::new();
    // Source: 3 pages; destination: 3 pages elsewhere, physically scattered (reverse order).
    r.map(ROOT_A, VA, DATA, 3, UF);
    for p in 0..3u64 {
        r.map(
            ROOT_A,
            VA + 0x10_0000 + p * PAGE_4K,
            DATA + 0x8_0000 - p * PAGE_4K,
            1,
            UF,
        );
    }
    r.map(ROOT_A, VA + 0x20_0000, DATA + 0x9_0000, 1, UF);
    let data = pattern(7, 3 * 4096);
    r.host.mem.poke(DATA, &data);
    r.start();
    r.bind(PA5, ROOT_A);
    // Unaligned source and destination, crossing page boundaries on both sides.
    let (src, dst, len) = (VA + 0x123, VA + 0x10_0000 + 0x456, 6000u64);
    let crec = VA + 0x20_0000 + 0x40;
    let c = r.run(&Descriptor {
        crec,
        ..memcpy(PA5, src, dst, len, 0xabc)
    });
    assert_eq!(
        c,
        Completion {
            tag: 0xabc,
            status: ST_OK,
            slot: 0,
            result: len,
            pasid: PA5
        }
    );
    // Read the destination back through the (reverse-ordered) physical pages.
    let mut got = Vec::new();
    let mut va = dst;
    while va < dst + len {
        let page = (va - (VA + 0x10_0000)) / PAGE_4K;
        let off = va % PAGE_4K;
        let n = (PAGE_4K - off).min(dst + len - va);
        got.extend(
            r.host
                .mem
                .peek(DATA + 0x8_0000 - page * PAGE_4K + off, n as usize),
        );
        va += n;
    }
    assert_eq!(got, data[0x123..0x123 + len as usize]);
    // The per-descriptor completion record, in the process's address space.
    let rec: [u8; 32] = r.host.mem.peek(DATA + 0x9_0040, 32).try_into().unwrap();
    assert_eq!(Completion::decode(&rec), Some(c));
    assert_eq!(r.host.wait_irqs(1), vec![CQ_VEC]);
    assert_eq!(r.rd(COMPLETED), 1);
    assert_eq!(r.rd(SQ_HEAD), 1);
    let ev = r.host.events();
    assert!(
        count(&ev, |e| matches!(
            e,
            Event::PasidBind {
                pasid: 5,
                root: ROOT_A
            }
        )) == 1
    );
    assert!(
        count(&ev, |e| matches!(
            e,
            Event::PageWalk {
                pasid: 5,
                pa: Some(_),
                ..
            }
        )) >= 5
    );
    assert!(
        count(&ev, |e| matches!(
            e,
            Event::Dma {
                pasid: Some(5),
                dir: Dir::Write,
                ..
            }
        )) > 0
    );
    assert!(r.host.journal.violations().is_empty());
    assert_ne!(r.rd(STATUS) & STATUS_IDLE, 0);
}

#[test]
fn test_fill_and_compare_results() {
    let mut r = Rig::new();
    r.map(ROOT_A, VA, DATA, 4, UF);
    r.start();
    r.bind(PA5, ROOT_A);
    let pat = 0x0807_0605_0403_0201u64;
    let c = r.run(&Descriptor {
        op: DESC_FILL,
        pasid: PA5,
        src: pat,
        dst: VA + 5,
        len: 5000,
        ..Descriptor::default()
    });
    assert_eq!((c.status, c.result), (ST_OK, 5000));
    let got = r.host.mem.peek(DATA + 5, 5000);
    for (i, b) in got.iter().enumerate() {
        assert_eq!(*b, (i % 8) as u8 + 1, "byte {i}");
    }
    assert_eq!(
        r.host.mem.peek(DATA, 5),
        vec![0; 5],
        "before the range untouched"
    );
    // Copy, then compare equal; then change a byte and compare again.
    assert_eq!(
        r.run(&memcpy(PA5, VA, VA + 2 * 4096, 6000, 2)).status,
        ST_OK
    );
    let cmp = Descriptor {
        op: DESC_COMPARE,
        ..memcpy(PA5, VA, VA + 2 * 4096, 6000, 3)
    };
    assert_eq!(r.run(&cmp).status, ST_OK);
    assert_eq!(r.host.wait_irqs(2).len(), 2);
    r.host.mem.poke(DATA + 2 * 4096 + 4321, &[0xee]);
    let c = r.run(&cmp);
    assert_eq!((c.status, c.result), (ST_MISMATCH, 4321));
}

#[test]
fn test_nop_and_zero_length_complete_without_access() {
    let mut r = Rig::new();
    r.start();
    r.bind(PA5, ROOT_A);
    let seq = r.host.journal.last_seq();
    let nop = Descriptor {
        op: DESC_NOP,
        pasid: 77,
        ..Descriptor::default()
    };
    assert_eq!(r.run(&nop).status, ST_OK);
    assert_eq!(r.run(&memcpy(PA5, VA, VA, 0, 1)).status, ST_OK);
    let (later, _) = r.host.journal.since(seq);
    assert!(!later.iter().any(|rec| matches!(
        rec.event,
        Event::Dma { pasid: Some(_), .. } | Event::PageWalk { .. }
    )));
}

#[test]
fn test_memcpy_through_2m_and_1g_pages() {
    let mut r = Rig::new();
    {
        let mut t = r.tables(ROOT_A);
        t.map(0x4000_0000 + PAGE_2M, 0x8020_0000, PAGE_2M, UF);
        t.map(0x80_0000_0000, 0x1_0000_0000, PAGE_1G, UF);
        r.next_table[0] = t.next;
    }
    // Source straddles the end of the 2 MiB page: only its last 4 KiB exist in the image.
    let src = 0x4000_0000 + 2 * PAGE_2M - 0x800;
    r.host.mem.poke(0x8040_0000 - 0x800, &pattern(1, 0x800));
    r.map(ROOT_A, 0x4000_0000 + 2 * PAGE_2M, 0x9000_0000, 1, UF);
    r.host.mem.poke(0x9000_0000, &pattern(2, 0x800));
    let dst = 0x80_0000_0000 + 0x1234_5678;
    r.host.mem.touch(0x1_1234_5000);
    r.host.mem.touch(0x1_1234_6000);
    r.start();
    r.bind(PA5, ROOT_A);
    let c = r.run(&memcpy(PA5, src, dst, 0x1000, 1));
    assert_eq!((c.status, c.result), (ST_OK, 0x1000));
    let got = r.host.mem.peek(0x1_1234_5678, 0x1000);
    assert_eq!(&got[..0x800], &pattern(1, 0x800)[..]);
    assert_eq!(&got[0x800..], &pattern(2, 0x800)[..]);
}

// ---- faults ----------------------------------------------------------------------------------

#[test]
fn test_translation_fault_not_present_fault_record_and_irq() {
    let mut r = Rig::new();
    r.map(ROOT_A, VA, DATA, 2, UF);
    r.map(ROOT_A, VA + 0x10_0000, DATA + 0x10_000, 1, UF);
    r.start();
    r.bind(PA5, ROOT_A);
    // The destination's second page is not mapped: 4096 - 0x100 bytes get done.
    let c = r.run(&memcpy(PA5, VA, VA + 0x10_0000 + 0x100, 8192, 0x77));
    assert_eq!((c.status, c.result), (ST_TRANSLATION_FAULT, 4096 - 0x100));
    let f = r.fault_records();
    assert_eq!(
        f,
        vec![FaultRecord {
            va: VA + 0x10_1000,
            pasid: PA5,
            access: FAULT_ACCESS_WRITE | FAULT_ACCESS_USER,
            reason: FaultReason::NotPresent.code(),
            level: 1,
            tag: 0x77,
        }]
    );
    assert_eq!(
        r.host.wait_irqs(2),
        vec![FQ_VEC, CQ_VEC],
        "fault interrupt, then completion"
    );
    assert_eq!(r.rd(FAULTS), 1);
    let ev = r.host.events();
    assert_eq!(
        count(&ev, |e| matches!(
            e,
            Event::TranslationFault {
                pasid: 5,
                write: true,
                ..
            }
        )),
        1
    );
    assert!(count(&ev, |e| matches!(e, Event::PageWalk { pa: None, .. })) == 1);
    // After the driver maps the page (PRI-like service), a resubmission succeeds.
    r.map(ROOT_A, VA + 0x10_1000, DATA + 0x11_000, 2, UF);
    assert_eq!(
        r.run(&memcpy(PA5, VA, VA + 0x10_0000 + 0x100, 8192, 0x78))
            .status,
        ST_OK
    );
}

#[test]
fn test_write_to_readonly_page_write_protect_fault() {
    let mut r = Rig::new();
    r.map(ROOT_A, VA, DATA, 1, UF);
    r.map(ROOT_A, VA + 0x1000, DATA + 0x1000, 1, PTE_US);
    r.start();
    r.bind(PA5, ROOT_A);
    let c = r.run(&memcpy(PA5, VA, VA + 0x1000, 16, 1));
    assert_eq!((c.status, c.result), (ST_TRANSLATION_FAULT, 0));
    let f = r.fault_records();
    assert_eq!(f[0].reason, FaultReason::WriteProtect.code());
    // Reading it is fine.
    assert_eq!(r.run(&memcpy(PA5, VA + 0x1000, VA, 16, 2)).status, ST_OK);
    assert!(r
        .host
        .writes
        .lock()
        .unwrap()
        .iter()
        .all(|w| w.1 != DATA + 0x1000));
}

#[test]
fn test_supervisor_page_faults_for_user_pasid_allowed_privileged() {
    let mut r = Rig::new();
    r.map(ROOT_A, VA, DATA, 2, PTE_RW);
    r.start();
    r.bind(PA5, ROOT_A);
    assert_eq!(r.cmd(OP_BIND, PA6, BIND_FLAG_PRIV, ROOT_A, 0), (CMD_OK, 0));
    let c = r.run(&memcpy(PA5, VA, VA + 0x1000, 16, 1));
    assert_eq!(c.status, ST_TRANSLATION_FAULT);
    let f = r.fault_records();
    assert_eq!(
        (f[0].reason, f[0].access),
        (FaultReason::UserProtect.code(), FAULT_ACCESS_USER)
    );
    assert_eq!(r.run(&memcpy(PA6, VA, VA + 0x1000, 16, 2)).status, ST_OK);
}

#[test]
fn test_fault_queue_full_counts_lost_records() {
    let mut r = Rig::new();
    r.start();
    r.wr(FQ_SIZE, 2); // holds one record
    r.bind(PA5, ROOT_A);
    for i in 0..3 {
        assert_eq!(
            r.run(&memcpy(PA5, VA, VA + 0x1000, 16, i)).status,
            ST_TRANSLATION_FAULT
        );
    }
    assert_eq!(r.rd(FQ_TAIL), 1);
    assert_eq!(r.rd(FQ_LOST), 2);
    assert_eq!(r.rd(FAULTS), 3);
}

#[test]
fn test_walk_through_unreadable_table_faults_never_panics() {
    let mut r = Rig::new();
    r.start();
    // PML4 entry points outside the image.
    r.host
        .mem
        .poke(ROOT_A, &(0xdd_0000_0000u64 | 0x7).to_le_bytes());
    r.bind(PA5, ROOT_A);
    let c = r.run(&memcpy(PA5, 0x1000, 0x2000, 16, 1));
    assert_eq!(c.status, ST_TRANSLATION_FAULT);
    let f = r.fault_records();
    assert_eq!(
        (f[0].reason, f[0].level),
        (FaultReason::TableUnreadable.code(), 3)
    );
}

// ---- the ATC and checking mode ---------------------------------------------------------------

/// Run a copy, then point the destination VA at another physical page (munmap + mmap by the
/// process) with or without an INVALIDATE, and copy again.
fn remap_scenario(checking: bool, invalidate: bool) -> (Rig, Completion) {
    let mut r = Rig::with(NpuConfig {
        checking,
        ..NpuConfig::default()
    });
    r.map(ROOT_A, VA, DATA, 1, UF);
    r.map(ROOT_A, VA + 0x1000, DATA + 0x1000, 1, UF);
    r.host.mem.poke(DATA, &pattern(3, 64));
    r.start();
    r.bind(PA5, ROOT_A);
    assert_eq!(r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 1)).status, ST_OK);
    assert_eq!(r.rd(ATC_MISSES), 2);
    if invalidate {
        assert_eq!(
            r.cmd(OP_INVALIDATE, PA5, 0, VA + 0x1000, 0x1000),
            (CMD_OK, 0)
        );
    }
    r.host.mem.touch(DATA + 0x5000);
    r.set_leaf(ROOT_A, VA + 0x1000, (DATA + 0x5000) | UF | 1);
    let c = r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 2));
    (r, c)
}

#[test]
fn test_remap_without_invalidate_stale_use_journaled_as_violation() {
    let (mut r, c) = remap_scenario(true, false);
    assert_eq!(c.status, ST_OK);
    let ev = r.host.events();
    assert_eq!(
        count(&ev, |e| matches!(
            e,
            Event::StaleTranslationUsed {
                pasid: 5,
                va,
                cached_pa,
                walked_pa: Some(w),
            } if *va == VA + 0x1000 && *cached_pa == DATA + 0x1000 && *w == DATA + 0x5000
        )),
        1
    );
    // Judged when the binding ends without an invalidation having covered the use.
    assert!(r.host.journal.violations().is_empty());
    assert_eq!(r.cmd(OP_UNBIND, PA5, 0, 0, 0), (CMD_OK, 0));
    let v = r.host.journal.violations();
    assert_eq!(v.len(), 1);
    assert!(matches!(
        v[0].event,
        Event::Violation {
            kind: ViolationKind::StaleTranslation,
            ..
        }
    ));
    assert_eq!(r.rd(STALE_USES), 1);
    assert_eq!(r.rd(ATC_HITS), 2);
    // Hardware uses what it cached: the old page got the data, the new one did not.
    assert_eq!(r.host.mem.peek(DATA + 0x1000, 64), pattern(3, 64));
    assert_eq!(r.host.mem.peek(DATA + 0x5000, 64), vec![0; 64]);
}

#[test]
fn test_unmap_without_invalidate_stale_use_walked_none() {
    let mut r = Rig::new();
    r.map(ROOT_A, VA, DATA, 2, UF);
    r.start();
    r.bind(PA5, ROOT_A);
    assert_eq!(r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 1)).status, ST_OK);
    r.set_leaf(ROOT_A, VA + 0x1000, 0);
    assert_eq!(r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 2)).status, ST_OK);
    let ev = r.host.events();
    assert_eq!(
        count(&ev, |e| matches!(
            e,
            Event::StaleTranslationUsed {
                walked_pa: None,
                ..
            }
        )),
        1
    );
    // Reported once per cached entry, not on every use.
    assert_eq!(r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 3)).status, ST_OK);
    assert_eq!(r.rd(STALE_USES), 1);
}

#[test]
fn test_invalidate_before_remap_no_stale_use() {
    let (mut r, c) = remap_scenario(true, true);
    assert_eq!(c.status, ST_OK);
    let ev = r.host.events();
    assert_eq!(
        count(&ev, |e| matches!(e, Event::StaleTranslationUsed { .. })),
        0
    );
    assert_eq!(
        count(&ev, |e| matches!(
            e,
            Event::Invalidate {
                pasid: 5,
                len: 0x1000,
                ..
            }
        )),
        1
    );
    assert!(r.host.journal.violations().is_empty());
    assert_eq!(
        r.host.mem.peek(DATA + 0x5000, 64),
        pattern(3, 64),
        "new page written"
    );
    assert_eq!(r.rd(ATC_INVALIDATIONS), 1);
    assert_eq!(r.rd(STALE_USES), 0);
}

#[test]
fn test_checking_off_stale_use_not_reported() {
    let (mut r, c) = remap_scenario(false, false);
    assert_eq!(c.status, ST_OK);
    assert_eq!(r.rd(FEATURES) & FEATURE_CHECKING, 0);
    assert_eq!(
        count(&r.host.events(), |e| matches!(
            e,
            Event::StaleTranslationUsed { .. }
        )),
        0
    );
}

#[test]
fn test_invalidate_all_of_pasid_forces_walks() {
    let mut r = Rig::new();
    r.map(ROOT_A, VA, DATA, 2, UF);
    r.start();
    r.bind(PA5, ROOT_A);
    r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 1));
    r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 2));
    assert_eq!((r.rd(ATC_MISSES), r.rd(ATC_HITS)), (2, 2));
    assert_eq!(r.cmd(OP_INVALIDATE, PA5, 0, 0, u64::MAX).0, CMD_OK);
    r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 3));
    assert_eq!((r.rd(ATC_MISSES), r.rd(ATC_HITS)), (4, 2));
}

#[test]
fn test_mprotect_readonly_without_invalidate_stale_write_reported() {
    let mut r = Rig::new();
    r.map(ROOT_A, VA, DATA, 2, UF);
    r.start();
    r.bind(PA5, ROOT_A);
    r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 1));
    // mprotect(PROT_READ) without an invalidation: the cached writable entry is stale.
    r.set_leaf(ROOT_A, VA + 0x1000, (DATA + 0x1000) | PTE_US | 1);
    r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 2));
    assert_eq!(r.rd(STALE_USES), 1);
}

// ---- unbind with drain -----------------------------------------------------------------------

/// Four 16 KiB copies alternating PASIDs 5 and 6 (both bound to the same tables); the engine
/// is held at its first PASID access, then UNBIND(5) is issued with `flags`.
fn unbind_with_queued_work(flags: u32, cmd_irq: bool) -> (Rig, Vec<Completion>, (u32, u32)) {
    let mut r = Rig::new();
    if cmd_irq {
        r.wr(CMD_IRQ, IRQ_ENABLE | u32::from(CMD_VEC));
    }
    r.map(ROOT_A, VA, DATA, 4, UF);
    r.map(ROOT_A, VA + 0x10_0000, DATA + 0x10_0000, 4, UF);
    r.host.mem.poke(DATA, &pattern(9, 4 * 4096));
    r.start();
    r.bind(PA5, ROOT_A);
    assert_eq!(r.cmd(OP_BIND, PA6, 0, ROOT_A, 0).0, CMD_OK);
    r.host.arm_gate();
    let items: Vec<Descriptor> = [PA5, PA6, PA5, PA6]
        .into_iter()
        .enumerate()
        .map(|(i, p)| memcpy(p, VA, VA + 0x10_0000, 4 * 4096, i as u64))
        .collect();
    // The arguments first: once the engine is held, the opcode is one register write.
    r.wr(CMD_PASID, PA5);
    r.wr(CMD_FLAGS, flags);
    r.submit_all(&items);
    r.host.wait_blocked();
    let host = r.host.clone();
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        host.open_gate();
    });
    // Blocks until the engine finishes its chunk and steps aside.
    r.wr(CMD_OP, OP_UNBIND);
    wait_until("unbind", || rd(&mut r.ep, CMD_STATUS) & CMD_BUSY == 0);
    let res = (r.rd(CMD_STATUS), r.rd(CMD_RESULT));
    opener.join().unwrap();
    let cs = r.completions(4);
    (r, cs, res)
}

#[test]
fn test_unbind_abort_with_queued_work_aborts_drains_then_acks() {
    let (r, cs, (status, aborted)) = unbind_with_queued_work(UNBIND_FLAG_ABORT, false);
    assert_eq!(status, CMD_OK);
    let st: Vec<(u32, u32)> = cs.iter().map(|c| (c.pasid, c.status)).collect();
    assert_eq!(
        st,
        vec![
            (PA5, ST_ABORTED),
            (PA6, ST_OK),
            (PA5, ST_ABORTED),
            (PA6, ST_OK)
        ]
    );
    assert_eq!(
        cs[0].result, 4096,
        "the item in flight stopped after its first page"
    );
    assert_eq!(aborted, 2);
    let ev = r.host.events();
    let begin = position(&ev, |e| matches!(e, Event::PasidUnbindBegin { pasid: 5 }));
    let drained = position(&ev, |e| {
        matches!(
            e,
            Event::PasidDrained {
                pasid: 5,
                aborted: 2
            }
        )
    });
    let ack = position(&ev, |e| matches!(e, Event::PasidUnbindAck { pasid: 5 }));
    assert!(begin < drained && drained < ack);
    let last_access = ev
        .iter()
        .rposition(|e| matches!(e, Event::Dma { pasid: Some(5), .. }))
        .unwrap();
    assert!(last_access < ack, "no PASID 5 access after the ack");
    assert!(r.host.journal.violations().is_empty());
    assert!(!r
        .ep
        .function()
        .shared()
        .lock()
        .bound_pasids()
        .contains(&PA5));
}

#[test]
fn test_unbind_finish_with_queued_work_completes_then_acks() {
    let (mut r, cs, (status, aborted)) = unbind_with_queued_work(0, true);
    assert_eq!((status, aborted), (CMD_OK, 0));
    assert!(cs.iter().all(|c| c.status == ST_OK && c.result == 4 * 4096));
    let ev = r.host.events();
    let ack = position(&ev, |e| matches!(e, Event::PasidUnbindAck { pasid: 5 }));
    let last_access = ev
        .iter()
        .rposition(|e| matches!(e, Event::Dma { pasid: Some(5), .. }))
        .unwrap();
    assert!(last_access < ack);
    assert_eq!(
        r.host.mem.peek(DATA + 0x10_0000, 4 * 4096),
        pattern(9, 4 * 4096)
    );
    // The acknowledgement came with the command interrupt.
    wait_until("command interrupt", || r.host.irqs().contains(&CMD_VEC));
    assert_eq!(
        r.run(&memcpy(PA5, VA, VA + 0x10_0000, 16, 9)).status,
        ST_PASID_NOT_BOUND
    );
}

#[test]
fn test_command_while_unbind_busy_ignored() {
    let mut r = Rig::new();
    r.map(ROOT_A, VA, DATA, 2, UF);
    r.map(ROOT_A, VA + 0x10_0000, DATA + 0x10_0000, 2, UF);
    r.start();
    r.bind(PA5, ROOT_A);
    // Hold an item of PASID 5 in flight: started, then waiting for Bus Master.
    r.host.arm_gate();
    r.submit(&memcpy(PA5, VA, VA + 0x10_0000, 2 * 4096, 1));
    r.host.wait_blocked();
    r.host.master.store(false, Ordering::Release);
    r.host.open_gate();
    wait_until("bus wait", || rd(&mut r.ep, STATUS) & STATUS_BUS_WAIT != 0);
    // UNBIND (finish) stays busy while the item is in flight.
    cmd_start(&mut r.ep, OP_UNBIND, PA5, 0, 0, 0);
    assert_eq!(r.rd(CMD_STATUS), CMD_BUSY);
    let seq = r.rd(CMD_SEQ);
    cmd_start(&mut r.ep, OP_BIND, PA6, 0, ROOT_A, 0);
    assert_eq!(
        (r.rd(CMD_STATUS), r.rd(CMD_SEQ)),
        (CMD_BUSY, seq),
        "ignored"
    );
    r.host.master.store(true, Ordering::Release);
    assert_eq!(r.completions(1)[0].status, ST_OK, "finished, not aborted");
    wait_until("unbind", || rd(&mut r.ep, CMD_STATUS) & CMD_BUSY == 0);
    assert_eq!((r.rd(CMD_STATUS), r.rd(CMD_SEQ)), (CMD_OK, seq + 1));
    assert!(r.ep.function().shared().lock().bound_pasids().is_empty());
}

#[test]
fn test_flr_drops_contexts_atc_and_registers() {
    let mut r = Rig::new();
    r.map(ROOT_A, VA, DATA, 2, UF);
    r.start();
    r.bind(PA5, ROOT_A);
    r.bind(PA6, ROOT_A);
    r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 1));
    r.flr();
    assert!(r.ep.function().shared().lock().bound_pasids().is_empty());
    for reg in [
        CONTROL, SQ_SIZE, CQ_TAIL, COMPLETED, ATC_MISSES, CMD_SEQ, CQ_IRQ,
    ] {
        assert_eq!(r.rd(reg), 0, "register {reg:#x}");
    }
    assert_eq!(r.ep.function().shared().lock().atc_stats().misses, 0);
    let ev = r.host.events();
    assert_eq!(count(&ev, |e| matches!(e, Event::PasidReleased { .. })), 2);
    // The function works again after the driver sets it up anew.
    r.start();
    r.bind(PA5, ROOT_A);
    assert_eq!(r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 2)).status, ST_OK);
}

#[test]
fn test_reset_with_item_in_flight_abandons_it_no_later_access() {
    let mut r = Rig::new();
    r.map(ROOT_A, VA, DATA, 16, UF);
    r.map(ROOT_A, VA + 0x10_0000, DATA + 0x10_0000, 16, UF);
    r.start();
    r.bind(PA5, ROOT_A);
    r.host.arm_gate();
    r.submit(&memcpy(PA5, VA, VA + 0x10_0000, 16 * 4096, 1));
    r.host.wait_blocked();
    let host = r.host.clone();
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        host.open_gate();
    });
    r.ep.reset().unwrap();
    r.enable_memory();
    opener.join().unwrap();
    let seq = r.host.journal.last_seq();
    std::thread::sleep(Duration::from_millis(100));
    let (later, _) = r.host.journal.since(seq);
    assert!(
        later
            .iter()
            .all(|rec| !matches!(rec.event, Event::Dma { .. })),
        "no DMA after the reset returned: {later:?}"
    );
    assert_eq!(r.rd(CQ_TAIL), 0);
    assert_ne!(r.rd(STATUS) & STATUS_IDLE, 0);
}

#[test]
fn test_enable_with_bad_queue_config_halts_error1() {
    let mut r = Rig::new();
    r.wr(SQ_SIZE, 3);
    r.wr(CQ_SIZE, 4);
    r.wr(CONTROL, CONTROL_ENABLE);
    assert_eq!(
        r.rd(STATUS) & (STATUS_ENABLED | STATUS_HALTED),
        STATUS_ENABLED | STATUS_HALTED
    );
    assert_eq!(r.rd(ERROR), ERROR_QUEUE_CONFIG);
    r.wr(CONTROL, 0);
    assert_eq!((r.rd(STATUS) & STATUS_HALTED, r.rd(ERROR)), (0, 0));
    // Misaligned SQ base.
    wr64(&mut r.ep, SQ_BASE_LO, SQ + 8);
    r.wr(SQ_SIZE, 4);
    r.wr(CONTROL, CONTROL_ENABLE);
    assert_eq!(r.rd(ERROR), ERROR_QUEUE_CONFIG);
}

#[test]
fn test_sq_outside_memory_halts_error2() {
    let mut r = Rig::new();
    wr64(&mut r.ep, SQ_BASE_LO, 0xee_0000_0000);
    r.wr(SQ_SIZE, 4);
    wr64(&mut r.ep, CQ_BASE_LO, CQ);
    r.wr(CQ_SIZE, 4);
    r.wr(CONTROL, CONTROL_ENABLE);
    r.wr(SQ_TAIL, 1);
    wait_until("halt", || rd(&mut r.ep, STATUS) & STATUS_HALTED != 0);
    assert_eq!(r.rd(ERROR), ERROR_SQ_READ);
}

#[test]
fn test_queue_geometry_locked_while_enabled() {
    let mut r = Rig::new();
    r.start();
    r.wr(SQ_SIZE, 8);
    wr64(&mut r.ep, CQ_BASE_LO, 0x4000_0000);
    assert_eq!(r.rd(SQ_SIZE), QSIZE);
    assert_eq!(r.rd(CQ_BASE_LO), CQ as u32);
    r.wr(SQ_TAIL, QSIZE);
    assert_eq!(r.rd(SQ_TAIL), 0, "tail outside the ring ignored");
}

#[test]
fn test_disable_aborts_item_in_flight() {
    let mut r = Rig::new();
    r.map(ROOT_A, VA, DATA, 8, UF);
    r.map(ROOT_A, VA + 0x10_0000, DATA + 0x10_0000, 8, UF);
    r.start();
    r.bind(PA5, ROOT_A);
    r.host.arm_gate();
    r.submit(&memcpy(PA5, VA, VA + 0x10_0000, 8 * 4096, 1));
    r.host.wait_blocked();
    let host = r.host.clone();
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        host.open_gate();
    });
    r.wr(CONTROL, 0);
    opener.join().unwrap();
    let c = r.completions(1)[0];
    assert_eq!((c.status, c.result), (ST_ABORTED, 4096));
}

#[test]
fn test_engine_waits_while_bus_master_refused() {
    let mut r = Rig::new();
    r.map(ROOT_A, VA, DATA, 2, UF);
    r.start();
    r.bind(PA5, ROOT_A);
    r.host.master.store(false, Ordering::Release);
    r.submit(&memcpy(PA5, VA, VA + 0x1000, 64, 1));
    wait_until("bus wait", || rd(&mut r.ep, STATUS) & STATUS_BUS_WAIT != 0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.rd(CQ_TAIL), 0, "nothing done while bus mastering is off");
    assert_eq!(r.completions(0).len(), 0);
    // UNBIND while the engine cannot progress completes at once: nothing of the PASID has
    // been fetched, and once bus mastering returns the queued item finds the PASID unbound.
    assert_eq!(r.cmd(OP_UNBIND, PA5, 0, 0, 0), (CMD_OK, 0));
    r.host.master.store(true, Ordering::Release);
    assert_eq!(r.completions(1)[0].status, ST_PASID_NOT_BOUND);
    r.bind(PA5, ROOT_A);
    assert_eq!(r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 2)).status, ST_OK);
    assert_eq!(r.rd(COMPLETED), 2);
    assert!(r.host.journal.violations().is_empty());
}

#[test]
fn test_bus_master_cleared_mid_item_pauses_then_resumes() {
    let mut r = Rig::new();
    r.map(ROOT_A, VA, DATA, 4, UF);
    r.map(ROOT_A, VA + 0x10_0000, DATA + 0x10_0000, 4, UF);
    r.host.mem.poke(DATA, &pattern(4, 4 * 4096));
    r.start();
    r.bind(PA5, ROOT_A);
    r.host.arm_gate();
    r.submit(&memcpy(PA5, VA, VA + 0x10_0000, 4 * 4096, 1));
    r.host.wait_blocked();
    assert_eq!(
        r.host.inflight.load(Ordering::Acquire),
        1,
        "Transactions Pending"
    );
    // Bus Master cleared while an access is on its way: it is refused, the item waits.
    r.host.master.store(false, Ordering::Release);
    r.host.open_gate();
    wait_until("bus wait", || rd(&mut r.ep, STATUS) & STATUS_BUS_WAIT != 0);
    assert!(r.host.refused.load(Ordering::Acquire) >= 1);
    assert_eq!(
        r.host.inflight.load(Ordering::Acquire),
        0,
        "nothing pending while waiting"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.rd(CQ_TAIL), 0);
    assert_eq!(r.rd(FAULTS), 0, "a refused walk is not a translation fault");
    r.host.master.store(true, Ordering::Release);
    let c = r.completions(1)[0];
    assert_eq!((c.status, c.result), (ST_OK, 4 * 4096));
    assert_eq!(
        r.host.mem.peek(DATA + 0x10_0000, 4 * 4096),
        pattern(4, 4 * 4096)
    );
    assert!(r.host.journal.violations().is_empty());
}

// ---- robustness ------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn test_garbage_descriptors_never_panic_never_write_outside_writable_pages() {
    let mut r = Rig::new();
    // PASID 5: 8 writable + 4 read-only pages; PASID 6 (privileged): 4 supervisor pages, on
    // other tables.
    r.map(ROOT_A, VA, DATA, 8, UF);
    r.map(ROOT_A, VA + 0x8000, DATA + 0x8000, 4, PTE_US);
    r.map(ROOT_B, 0xffff_8000_0000_0000, DATA + 0x20_000, 4, PTE_RW);
    r.host.mem.poke(DATA + 0x8000, &pattern(5, 4 * 4096));
    r.start();
    r.bind(PA5, ROOT_A);
    assert_eq!(r.cmd(OP_BIND, PA6, BIND_FLAG_PRIV, ROOT_B, 0).0, CMD_OK);
    let table_pages: Vec<Vec<u8>> = (0..64u64)
        .map(|i| {
            let a = ROOT_A + i * 4096;
            if r.host.mem.has(a) {
                r.host.mem.peek(a, 4096)
            } else {
                Vec::new()
            }
        })
        .collect();
    let ro_before = r.host.mem.peek(DATA + 0x8000, 4 * 4096);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let vas = [
        VA,
        VA + 0x8000,
        0xffff_8000_0000_0000,
        0,
        0x8000_0000_0000,
        u64::MAX - 100,
    ];
    let mut submitted = 0u32;
    for _round in 0..60 {
        let batch = 1 + rng.below(30) as u32;
        for _ in 0..batch {
            let d = Descriptor {
                op: rng.below(6) as u8,
                flags: if rng.below(8) == 0 {
                    rng.next() as u8
                } else {
                    DESC_FLAG_IRQ
                },
                pasid: [PA5, PA6, 0, rng.next() as u32][rng.below(4) as usize],
                src: vas[rng.below(vas.len() as u64) as usize].wrapping_add(rng.below(0x9000)),
                dst: vas[rng.below(vas.len() as u64) as usize].wrapping_add(rng.below(0x9000)),
                len: match rng.below(4) {
                    0 => rng.next(),
                    1 => rng.below(64),
                    _ => rng.below(3 * 4096),
                },
                crec: match rng.below(3) {
                    0 => 0,
                    1 => VA + rng.below(0x9000) / 8 * 8,
                    _ => rng.next(),
                },
                tag: rng.next(),
                reserved_set: false,
            };
            let mut raw = d.encode();
            if rng.below(10) == 0 {
                raw[0x30 + rng.below(16) as usize] = 1;
            }
            r.host.mem.poke(SQ + u64::from(r.sq_tail) * DESC_SIZE, &raw);
            r.sq_tail = (r.sq_tail + 1) % QSIZE;
            let tail = r.sq_tail;
            r.wr(SQ_TAIL, tail);
            submitted += 1;
        }
        let cs = r.completions(batch);
        assert!(cs.iter().all(|c| c.status <= ST_DMA_ERROR));
        r.fault_records();
    }
    assert_eq!(r.rd(COMPLETED), submitted);
    // Writes: only the rings (untagged) and writable pages of the right PASID.
    let writable5: HashSet<u64> = (0..8).map(|p| DATA + p * 4096).collect();
    let writable6: HashSet<u64> = (0..4).map(|p| DATA + 0x20_000 + p * 4096).collect();
    for &(pasid, addr, len) in r.host.writes.lock().unwrap().iter() {
        let page = addr & !0xfff;
        assert_eq!(
            (addr + len as u64 - 1) & !0xfff,
            page,
            "write crosses a page"
        );
        match pasid {
            None => assert!(page == CQ || page == FQ, "untagged write at {addr:#x}"),
            Some(5) => assert!(writable5.contains(&page), "pasid 5 write at {addr:#x}"),
            Some(6) => assert!(writable6.contains(&page), "pasid 6 write at {addr:#x}"),
            Some(p) => panic!("write through unbound pasid {p}"),
        }
    }
    assert_eq!(r.host.mem.peek(DATA + 0x8000, 4 * 4096), ro_before);
    for (i, before) in table_pages.iter().enumerate() {
        if !before.is_empty() {
            assert_eq!(&r.host.mem.peek(ROOT_A + i as u64 * 4096, 4096), before);
        }
    }
    // Still healthy.
    assert_eq!(r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 1)).status, ST_OK);
    assert_eq!(r.rd(STATUS) & STATUS_HALTED, 0);
}

#[test]
fn test_random_register_writes_never_panic_flr_recovers() {
    let mut r = Rig::new();
    r.map(ROOT_A, VA, DATA, 2, UF);
    let mut rng = Rng(0xfeed_f00d_1234_0001);
    for _ in 0..5000 {
        let off = rng.below(0x200) & !3;
        let v = match rng.below(4) {
            0 => rng.below(8) as u32,
            1 => rng.below(u64::from(QSIZE)) as u32,
            _ => rng.next() as u32,
        };
        r.wr(off, v);
        let _ = r.rd(rng.below(0x200) & !3);
    }
    r.flr();
    r.start();
    r.bind(PA5, ROOT_A);
    assert_eq!(r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 1)).status, ST_OK);
}

// ---- over the real Bus -----------------------------------------------------------------------

#[test]
fn test_bus_memcpy_through_client_dma_space_journaled_with_pasid() {
    use std::os::unix::fs::FileExt;

    use pcisim_vfio_user::dma::{PROT_READ, PROT_WRITE};
    use pcisim_vfio_user::{ClientLink, DmaSpace, Interrupts};

    const SIZE: u64 = 32 << 20;
    let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    file.set_len(SIZE).unwrap();
    // Build tables and data in a sparse image, then copy its pages into the client's memory.
    let img = SparseMem::new(SIZE);
    let mut t = Tables::new(&img, ROOT_A);
    t.map(VA, DATA, PAGE_4K, UF);
    t.map(VA + 0x1000, DATA + 0x1000, PAGE_4K, UF);
    img.poke(DATA, &pattern(11, 4096));
    for page in (0..SIZE).step_by(4096) {
        if img.has(page) {
            file.write_at(&img.peek(page, 4096), page).unwrap();
        }
    }
    let dma = DmaSpace::new();
    dma.map(
        0,
        SIZE,
        PROT_READ | PROT_WRITE,
        Some((file.try_clone().unwrap().into(), 0)),
    )
    .unwrap();
    let mut ep = endpoint(&NpuConfig::default()).unwrap();
    ep.attach(ClientLink {
        irqs: Interrupts::new(&[1, 0, u32::from(super::MSIX_VECTORS), 1, 1]),
        dma: dma.clone(),
    });
    for m in dma.mappings() {
        ep.dma_mapped(&m);
    }
    // Memory Space + Bus Master.
    ep.region_write(region::CONFIG, 0x04, &0x0006u16.to_le_bytes())
        .unwrap();
    wr64(&mut ep, SQ_BASE_LO, SQ);
    wr(&mut ep, SQ_SIZE, 4);
    wr64(&mut ep, CQ_BASE_LO, CQ);
    wr(&mut ep, CQ_SIZE, 4);
    wr(&mut ep, CQ_IRQ, IRQ_ENABLE | u32::from(CQ_VEC));
    wr(&mut ep, CONTROL, CONTROL_ENABLE);
    assert_eq!(cmd(&mut ep, OP_BIND, PA5, 0, ROOT_A, 0), (CMD_OK, 0));
    file.write_at(&memcpy(PA5, VA, VA + 0x1000, 4096, 0x99).encode(), SQ)
        .unwrap();
    wr(&mut ep, SQ_TAIL, 1);
    wait_until("completion", || rd(&mut ep, CQ_TAIL) == 1);
    let mut raw = [0u8; 32];
    file.read_at(&mut raw, CQ).unwrap();
    let c = Completion::decode(&raw).unwrap();
    assert_eq!((c.tag, c.status, c.result), (0x99, ST_OK, 4096));
    let mut out = vec![0u8; 4096];
    file.read_at(&mut out, DATA + 0x1000).unwrap();
    assert_eq!(out, pattern(11, 4096));
    let recs = ep.journal().since(0).0;
    let has = |f: &dyn Fn(&Event) -> bool| recs.iter().any(|r| f(&r.event));
    assert!(has(&|e| matches!(e, Event::PasidBind { pasid: 5, .. })));
    assert!(has(&|e| matches!(
        e,
        Event::Dma {
            pasid: Some(5),
            dir: Dir::Write,
            ..
        }
    )));
    assert!(has(&|e| matches!(
        e,
        Event::Dma {
            pasid: None,
            dir: Dir::Read,
            ..
        }
    )));
    wait_until("interrupt record", || {
        ep.journal()
            .since(0)
            .0
            .iter()
            .any(|r| matches!(r.event, Event::Interrupt { vector: CQ_VEC, .. }))
    });
    assert!(
        ep.journal().violations().is_empty(),
        "{:?}",
        ep.journal().violations()
    );
    // Bus Master off: the engine waits instead of issuing refused DMA.
    ep.region_write(region::CONFIG, 0x04, &0x0002u16.to_le_bytes())
        .unwrap();
    file.write_at(&memcpy(PA5, VA, VA + 0x1000, 16, 0x9a).encode(), SQ + 64)
        .unwrap();
    wr(&mut ep, SQ_TAIL, 2);
    wait_until("bus wait", || rd(&mut ep, STATUS) & STATUS_BUS_WAIT != 0);
    assert_eq!(rd(&mut ep, CQ_TAIL), 1);
    ep.region_write(region::CONFIG, 0x04, &0x0006u16.to_le_bytes())
        .unwrap();
    wait_until("completion", || rd(&mut ep, CQ_TAIL) == 2);
    assert!(ep.journal().violations().is_empty());
    assert_eq!(ep.journal().stats().dma_refused, 0);
}

// ---- coalesced write runs over the real Bus --------------------------------------------------

/// Pages each FILL of the run tests covers, and the client memory behind them.
const RUN_PAGES: u64 = 64;
const RUN_MEM: u64 = 32 << 20;
/// Where [`RunLayout::far`] sends its page: outside the FILL's physical range.
const FAR: u64 = DATA + 0x80_0000;

/// How the client maps its memory and the PASID maps the FILL's pages.
#[derive(Clone, Copy, Default)]
struct RunLayout {
    /// The client's DMA mappings end (and the next begins) at these pages of `DATA`.
    splits: &'static [u64],
    /// This page of the FILL translates to `FAR` instead of `DATA` + page (the physical
    /// addresses are not contiguous around it).
    far: Option<u64>,
}

/// An NPU over the real [`pcisim_pci::Bus`] and a client `DmaSpace` with `PA5` bound to 4 KiB
/// user pages `VA`.. → `DATA`.. (see [`RunLayout`]).
struct RunRig {
    ep: Endpoint<Npu>,
    file: std::fs::File,
    dma: pcisim_vfio_user::DmaSpace,
    slot: u32,
    tag: u64,
}

impl RunRig {
    fn new(checking: bool, chunk_delay: Duration, layout: RunLayout) -> RunRig {
        use std::os::unix::fs::FileExt;

        use pcisim_vfio_user::dma::{PROT_READ, PROT_WRITE};
        use pcisim_vfio_user::{ClientLink, DmaSpace, Interrupts};

        let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.set_len(RUN_MEM).unwrap();
        let img = SparseMem::new(RUN_MEM);
        let mut t = Tables::new(&img, ROOT_A);
        for p in 0..RUN_PAGES {
            let pa = match layout.far {
                Some(f) if f == p => FAR,
                _ => DATA + p * PAGE_4K,
            };
            t.map(VA + p * PAGE_4K, pa, PAGE_4K, UF);
        }
        for page in (0..RUN_MEM).step_by(4096) {
            if img.has(page) {
                file.write_at(&img.peek(page, 4096), page).unwrap();
            }
        }
        let dma = DmaSpace::new();
        let mut bounds = vec![0];
        bounds.extend(layout.splits.iter().map(|p| DATA + p * PAGE_4K));
        bounds.push(RUN_MEM);
        for w in bounds.windows(2) {
            let fd = file.try_clone().unwrap().into();
            dma.map(w[0], w[1] - w[0], PROT_READ | PROT_WRITE, Some((fd, w[0])))
                .unwrap();
        }
        let mut ep = endpoint(&NpuConfig {
            checking,
            chunk_delay,
            ..NpuConfig::default()
        })
        .unwrap();
        ep.attach(ClientLink {
            irqs: Interrupts::new(&[1, 0, u32::from(super::MSIX_VECTORS), 1, 1]),
            dma: dma.clone(),
        });
        for m in dma.mappings() {
            ep.dma_mapped(&m);
        }
        ep.region_write(region::CONFIG, 0x04, &0x0006u16.to_le_bytes())
            .unwrap();
        wr64(&mut ep, SQ_BASE_LO, SQ);
        wr(&mut ep, SQ_SIZE, 8);
        wr64(&mut ep, CQ_BASE_LO, CQ);
        wr(&mut ep, CQ_SIZE, 8);
        wr(&mut ep, CONTROL, CONTROL_ENABLE);
        assert_eq!(cmd(&mut ep, OP_BIND, PA5, 0, ROOT_A, 0), (CMD_OK, 0));
        RunRig {
            ep,
            file,
            dma,
            slot: 0,
            tag: 0,
        }
    }

    /// FILL the pages with `pattern` and wait for it: (status, result).
    fn fill(&mut self, pattern: u64) -> (u32, u64) {
        use std::os::unix::fs::FileExt;
        self.tag += 1;
        let d = Descriptor {
            op: DESC_FILL,
            pasid: PA5,
            src: pattern,
            dst: VA,
            len: RUN_PAGES * PAGE_4K,
            tag: self.tag,
            ..Descriptor::default()
        };
        let slot = self.slot;
        self.file
            .write_at(&d.encode(), SQ + u64::from(slot) * 64)
            .unwrap();
        self.slot = (slot + 1) % 8;
        wr(&mut self.ep, SQ_TAIL, self.slot);
        let want = self.slot;
        wait_until("completion", || rd(&mut self.ep, CQ_TAIL) == want);
        wr(&mut self.ep, CQ_HEAD, want);
        let mut raw = [0u8; 32];
        self.file
            .read_at(&mut raw, CQ + u64::from(slot) * 32)
            .unwrap();
        let c = Completion::decode(&raw).unwrap();
        assert_eq!(c.tag, self.tag);
        (c.status, c.result)
    }

    /// Whether the 4 KiB page at `pa` holds FILL `pattern` throughout.
    fn holds(&self, pa: u64, pattern: u64) -> bool {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; 4096];
        self.file.read_at(&mut b, pa).unwrap();
        b == pattern.to_le_bytes().repeat(512)
    }

    /// DMA_UNMAP of the client mapping at `page` of `DATA` (applied, then journaled, as the
    /// server does).
    fn unmap(&mut self, page: u64) {
        let removed = self.dma.unmap(DATA + page * PAGE_4K, PAGE_4K).unwrap();
        assert_eq!(removed.len(), 1);
        self.ep.dma_unmapped(&removed);
    }

    fn runs(&self) -> u64 {
        self.ep.function().shared().lock().coalesced_runs()
    }

    fn events(&self) -> Vec<Event> {
        self.ep
            .journal()
            .since(0)
            .0
            .into_iter()
            .map(|r| r.event)
            .collect()
    }
}

/// The engines compared: coalescing (checking off, full speed) against page by page (the
/// same, slowed by 1 µs per chunk: a paced engine never coalesces).
fn run_rigs(layout: RunLayout) -> (RunRig, RunRig) {
    (
        RunRig::new(false, Duration::ZERO, layout),
        RunRig::new(false, Duration::from_micros(1), layout),
    )
}

#[test]
fn test_fill_runs_stop_at_mapping_boundaries_fault_at_the_unmapped_page_as_page_by_page() {
    // Mappings end at pages 24, 40 and 41 (page 40 is a mapping of its own).
    let layout = RunLayout {
        splits: &[24, 40, 41],
        far: None,
    };
    let (mut fast, mut slow) = run_rigs(layout);
    for r in [&mut fast, &mut slow] {
        // Cold: every page walks. Warm: every page hits the ATC.
        assert_eq!(r.fill(0x1111), (ST_OK, RUN_PAGES * PAGE_4K));
        assert_eq!(r.fill(0x2222), (ST_OK, RUN_PAGES * PAGE_4K));
        assert!((0..RUN_PAGES).all(|p| r.holds(DATA + p * PAGE_4K, 0x2222)));
    }
    // Runs of 16 pages: [0,16) and [48,64) are inside one mapping each; [16,32) and [32,48)
    // cross a boundary and went page by page. The paced engine never coalesced.
    assert_eq!((fast.runs(), slow.runs()), (2, 0));
    for r in [&mut fast, &mut slow] {
        r.unmap(40);
        // Stops with a DMA error exactly at page 40, pages before it written, after not.
        assert_eq!(r.fill(0x3333), (ST_DMA_ERROR, 40 * PAGE_4K));
        assert!((0..40).all(|p| r.holds(DATA + p * PAGE_4K, 0x3333)));
        assert!((41..RUN_PAGES).all(|p| r.holds(DATA + p * PAGE_4K, 0x2222)));
    }
    // [0,16) went as a run once more; the run over the hole did nothing.
    assert_eq!((fast.runs(), slow.runs()), (3, 0));
    let events = fast.events();
    assert_eq!(events, slow.events(), "the journals differ");
    // The fault and its violation name page 40; the writes before it are one record saying
    // what was written (pages 0..40 of the third FILL: the run and the 24 pages after it).
    assert!(events.contains(&Event::DmaFault {
        dir: Dir::Write,
        pasid: Some(PA5),
        iova: DATA + 40 * PAGE_4K,
        len: PAGE_4K,
    }));
    assert!(events.contains(&Event::Dma {
        dir: Dir::Write,
        pasid: Some(PA5),
        iova: DATA,
        len: 40 * PAGE_4K,
        count: 40,
        bytes: 40 * PAGE_4K,
    }));
    let violations = fast.ep.journal().violations();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(matches!(
        &violations[0].event,
        Event::Violation { kind: ViolationKind::DmaAfterUnmap, detail }
            if detail.contains(&format!("{:#x}", DATA + 40 * PAGE_4K))
    ));
}

#[test]
fn test_fill_runs_stop_at_a_physical_discontinuity_journal_as_page_by_page() {
    // Page 20 of the FILL lives at FAR: the pages around it are not contiguous with it.
    let layout = RunLayout {
        splits: &[],
        far: Some(20),
    };
    let (mut fast, mut slow) = run_rigs(layout);
    for r in [&mut fast, &mut slow] {
        assert_eq!(r.fill(0x4444), (ST_OK, RUN_PAGES * PAGE_4K));
        assert_eq!(r.fill(0x5555), (ST_OK, RUN_PAGES * PAGE_4K));
        assert!(r.holds(FAR, 0x5555));
        // DATA + page 20 is nobody's page: untouched.
        assert!(r.holds(DATA + 20 * PAGE_4K, 0));
        assert!((0..RUN_PAGES)
            .filter(|&p| p != 20)
            .all(|p| r.holds(DATA + p * PAGE_4K, 0x5555)));
    }
    // Warm FILL: [0,16), [16,20), page 20 alone, [21,37), [37,53), [53,64).
    assert_eq!((fast.runs(), slow.runs()), (5, 0));
    let events = fast.events();
    assert_eq!(events, slow.events(), "the journals differ");
    let far = |e: &Event| {
        matches!(
            e,
            Event::Dma {
                dir: Dir::Write,
                pasid: Some(PA5),
                iova: FAR,
                len: PAGE_4K,
                count: 1,
                ..
            }
        )
    };
    assert_eq!(count(&events, far), 2);
    assert!(events.contains(&Event::Dma {
        dir: Dir::Write,
        pasid: Some(PA5),
        iova: DATA + 21 * PAGE_4K,
        len: 43 * PAGE_4K,
        count: 43,
        bytes: 43 * PAGE_4K,
    }));
    assert!(fast.ep.journal().violations().is_empty());
    // The ATC saw every page as the hit it is, runs or not.
    let hits = |r: &RunRig| r.ep.function().shared().lock().atc_stats();
    let (a, b) = (hits(&fast), hits(&slow));
    assert_eq!((a.hits, a.misses), (RUN_PAGES, RUN_PAGES));
    assert_eq!((a.hits, a.misses), (b.hits, b.misses));
}

#[test]
fn test_fill_in_checking_mode_never_coalesces() {
    let mut r = RunRig::new(true, Duration::ZERO, RunLayout::default());
    assert_eq!(r.fill(0x6666), (ST_OK, RUN_PAGES * PAGE_4K));
    assert_eq!(r.fill(0x7777), (ST_OK, RUN_PAGES * PAGE_4K));
    assert!((0..RUN_PAGES).all(|p| r.holds(DATA + p * PAGE_4K, 0x7777)));
    assert_eq!(r.runs(), 0);
    // The same rig without checking does (the instrument sees runs when there are some).
    let mut r = RunRig::new(false, Duration::ZERO, RunLayout::default());
    r.fill(0x6666);
    r.fill(0x7777);
    assert_eq!(r.runs(), 4);
}

// ---- which lifetime rule broke (docs/sva.md): the address space torn down ------------------

/// The PML4 entry of `va` in `root`: what `exit_mmap`'s `free_pgtables` clears.
fn pml4_entry(root: u64, va: u64) -> u64 {
    root + 8 * ((va >> 39) & 0x1ff)
}

fn violation_kinds(r: &Rig) -> Vec<ViolationKind> {
    r.host
        .journal
        .violations()
        .into_iter()
        .filter_map(|v| match v.event {
            Event::Violation { kind, .. } => Some(kind),
            _ => None,
        })
        .collect()
}

/// PASID 5 bound to ROOT_A with two data pages at VA (the only user mapping), cached by a
/// copy.
fn bound_and_cached() -> Rig {
    let mut r = Rig::new();
    r.map(ROOT_A, VA, DATA, 2, UF);
    r.start();
    r.bind(PA5, ROOT_A);
    assert_eq!(r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 1)).status, ST_OK);
    r
}

#[test]
fn test_address_space_torn_down_while_bound_is_binding_outlived_mm() {
    // M6b: the driver ignores mm release; exit_mmap zaps the PTEs and frees the tables.
    let mut r = bound_and_cached();
    r.set_leaf(ROOT_A, VA, 0);
    r.host.mem.poke(pml4_entry(ROOT_A, VA), &0u64.to_le_bytes());
    // The device goes on with the cached translations (hardware would) and says what it saw.
    assert_eq!(r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 2)).status, ST_OK);
    // A miss walks into the empty root: a fault, and no second report for the binding.
    let c = r.run(&memcpy(PA5, VA + 0x8000, VA + 0x1000, 64, 3));
    assert_eq!(c.status, ST_TRANSLATION_FAULT);
    assert_eq!(r.cmd(OP_UNBIND, PA5, UNBIND_FLAG_ABORT, 0, 0), (CMD_OK, 0));
    let ev = r.host.events();
    assert_eq!(
        count(&ev, |e| matches!(e, Event::AddressSpaceEmpty { pasid: 5 })),
        1
    );
    let empty = position(&ev, |e| matches!(e, Event::AddressSpaceEmpty { pasid: 5 }));
    let first_stale = position(&ev, |e| matches!(e, Event::StaleTranslationUsed { .. }));
    assert!(empty < first_stale, "the cause before its consequence");
    assert_eq!(r.rd(STALE_USES), 2);
    // One verdict, naming the rule: the stale uses are this bug's, not missed invalidations.
    assert_eq!(violation_kinds(&r), [ViolationKind::BindingOutlivedMm]);
}

#[test]
fn test_address_space_torn_down_found_at_unbind() {
    // Nothing ran after the teardown: the late UNBIND (file release) finds the empty root.
    let mut r = bound_and_cached();
    r.host.mem.poke(pml4_entry(ROOT_A, VA), &0u64.to_le_bytes());
    assert_eq!(r.cmd(OP_UNBIND, PA5, UNBIND_FLAG_ABORT, 0, 0), (CMD_OK, 0));
    let ev = r.host.events();
    let empty = position(&ev, |e| matches!(e, Event::AddressSpaceEmpty { pasid: 5 }));
    let begin = position(&ev, |e| matches!(e, Event::PasidUnbindBegin { pasid: 5 }));
    assert!(empty < begin);
    assert_eq!(violation_kinds(&r), [ViolationKind::BindingOutlivedMm]);
}

#[test]
fn test_unbind_before_teardown_or_live_mapping_no_address_space_empty() {
    // M6: the driver unbinds on mm release, then the tables go.
    let mut r = bound_and_cached();
    assert_eq!(r.cmd(OP_UNBIND, PA5, UNBIND_FLAG_ABORT, 0, 0), (CMD_OK, 0));
    r.host.mem.poke(pml4_entry(ROOT_A, VA), &0u64.to_le_bytes());
    assert!(violation_kinds(&r).is_empty());
    // A live process keeps a mapping somewhere in the user half: one region gone (munmap of
    // a whole 512 GiB slot) without an invalidation is a missed invalidation, nothing more.
    let mut r = bound_and_cached();
    r.map(ROOT_A, 0x40_0000, DATA + 0x4_0000, 1, UF);
    r.host.mem.poke(pml4_entry(ROOT_A, VA), &0u64.to_le_bytes());
    assert_eq!(r.run(&memcpy(PA5, VA, VA + 0x1000, 64, 2)).status, ST_OK);
    assert_eq!(r.cmd(OP_UNBIND, PA5, UNBIND_FLAG_ABORT, 0, 0), (CMD_OK, 0));
    let ev = r.host.events();
    assert_eq!(
        count(&ev, |e| matches!(e, Event::AddressSpaceEmpty { .. })),
        0
    );
    assert_eq!(
        violation_kinds(&r),
        [
            ViolationKind::StaleTranslation,
            ViolationKind::StaleTranslation
        ]
    );
}

#[test]
fn test_address_space_empty_not_for_privileged_or_without_checking() {
    // A supervisor binding may have nothing in the user half; checking mode off looks at
    // nothing.
    let mut r = Rig::new();
    r.start();
    assert_eq!(r.cmd(OP_BIND, PA5, BIND_FLAG_PRIV, ROOT_A, 0), (CMD_OK, 0));
    assert_eq!(r.cmd(OP_UNBIND, PA5, 0, 0, 0), (CMD_OK, 0));
    let mut q = Rig::with(NpuConfig {
        checking: false,
        ..NpuConfig::default()
    });
    q.start();
    q.bind(PA5, ROOT_A);
    assert_eq!(q.cmd(OP_UNBIND, PA5, 0, 0, 0), (CMD_OK, 0));
    for rig in [&r, &q] {
        assert_eq!(
            count(&rig.host.events(), |e| matches!(
                e,
                Event::AddressSpaceEmpty { .. }
            )),
            0
        );
        assert!(violation_kinds(rig).is_empty());
    }
    // The instrument works: the same empty root, bound as a user PASID with checking on.
    let mut u = Rig::new();
    u.start();
    u.bind(PA5, ROOT_A);
    assert_eq!(u.cmd(OP_UNBIND, PA5, 0, 0, 0), (CMD_OK, 0));
    assert_eq!(violation_kinds(&u), [ViolationKind::BindingOutlivedMm]);
}

/// M6c on the device: a copy of PASID 5 whose translations are cached runs while UNBIND with
/// `flags` begins after its first page. Without `teardown`, the PTE of the copy's second
/// source page is zapped while the first page is held (before the UNBIND: the stale use
/// comes after it, in the second page). With `teardown` (finish mode only: an aborted item
/// never reaches its second page), the PML4 entry is cleared, as `exit_mmap` leaves it, once
/// the UNBIND began and the second page's source read is held.
fn drain_while_tables_change(flags: u32, teardown: bool) -> (Rig, Completion) {
    let mut r = Rig::new();
    r.map(ROOT_A, VA, DATA, 4, UF);
    r.map(ROOT_A, VA + 0x10_0000, DATA + 0x10_0000, 4, UF);
    r.start();
    r.bind(PA5, ROOT_A);
    let copy = |tag| memcpy(PA5, VA, VA + 0x10_0000, 4 * 4096, tag);
    assert_eq!(r.run(&copy(1)).status, ST_OK);
    let changed = if teardown {
        pml4_entry(ROOT_A, VA)
    } else {
        r.tables(ROOT_A).entry_addr(VA + 0x1000, 1)
    };
    r.host.arm_gate();
    r.wr(CMD_PASID, PA5);
    r.wr(CMD_FLAGS, flags);
    r.submit(&copy(2));
    r.host.wait_blocked();
    let host = r.host.clone();
    let shared = r.ep.function().shared().clone();
    let helper = std::thread::spawn(move || {
        // The UNBIND below waits for the engine's lock (held: the engine is at the gate).
        wait_until("the UNBIND waiting for the engine", || {
            shared.lock_waiters() > 0
        });
        // The first page's source read goes through; its destination write is held.
        host.step_gate();
        host.wait_blocked();
        if teardown {
            // The first page completes, the waiting UNBIND runs (the engine yields to it
            // between pages), and the second page's source read is held.
            host.step_gate();
            host.wait_blocked();
        }
        host.mem.poke(changed, &0u64.to_le_bytes());
        host.open_gate();
    });
    r.wr(CMD_OP, OP_UNBIND);
    helper.join().unwrap();
    wait_until("unbind", || rd(&mut r.ep, CMD_STATUS) & CMD_BUSY == 0);
    let c = r.completions(1)[0];
    (r, c)
}

#[test]
fn test_tables_change_during_finish_drain_is_drain_not_awaited() {
    // The driver issued UNBIND (finish) and did not wait: the mm goes while the work runs.
    let (r, c) = drain_while_tables_change(0, false);
    assert_eq!(c.status, ST_OK, "finish mode completes the item");
    let ev = r.host.events();
    let begin = position(&ev, |e| matches!(e, Event::PasidUnbindBegin { pasid: 5 }));
    let stale = position(
        &ev,
        |e| matches!(e, Event::StaleTranslationUsed { pasid: 5, va, .. } if *va == VA + 0x1000),
    );
    assert!(begin < stale, "the stale use came during the drain");
    assert_eq!(violation_kinds(&r), [ViolationKind::DrainNotAwaited]);
    // The whole address space torn down during the drain: the same rule, said for the root
    // and for each stale use.
    let (r, _) = drain_while_tables_change(0, true);
    let kinds = violation_kinds(&r);
    assert!(
        !kinds.is_empty() && kinds.iter().all(|k| *k == ViolationKind::DrainNotAwaited),
        "{kinds:?}"
    );
    assert_eq!(
        count(&r.host.events(), |e| matches!(
            e,
            Event::AddressSpaceEmpty { pasid: 5 }
        )),
        1
    );
}

#[test]
fn test_tables_change_after_abort_unbind_no_violation() {
    // The correct driver: UNBIND with ABORT; the item stops at its next page boundary and
    // nothing of the PASID is translated again, whatever happens to the tables.
    let (r, c) = drain_while_tables_change(UNBIND_FLAG_ABORT, false);
    assert_eq!((c.status, c.result), (ST_ABORTED, 4096));
    let ev = r.host.events();
    assert_eq!(
        count(&ev, |e| matches!(
            e,
            Event::StaleTranslationUsed { .. } | Event::AddressSpaceEmpty { .. }
        )),
        0
    );
    assert!(violation_kinds(&r).is_empty());
}
