//! The NPU's state and its engine thread: register file, PASID contexts, translation (ATC +
//! page walker, with checking mode), and execution of submission-queue work.
//!
//! Concurrency: one [`Shared`] holds all state under a mutex. Register accesses (server thread)
//! and the engine thread take it; the engine performs every memory access *while holding it*
//! and releases it between chunks of at most one page (a FILL's write run: at most
//! [`RUN_MAX`], see `State::write_run`). Hence a command (INVALIDATE, UNBIND), a
//! disable or a reset that has taken the lock knows that no access is in flight, and the engine
//! re-checks its item (epoch, enable, PASID context) each time it takes the lock back. Interrupts
//! are raised after the lock is released.
//!
//! ```text
//!  server thread                      engine thread
//!  bar_write ─▶ lock ─▶ regs/command    loop: lock ─▶ fetch SQ entry ─▶ per chunk:
//!                  │                           translate (ATC ─miss─▶ walk) ─▶ DMA
//!                  └─ notify ──────────▶       unlock/relock between chunks
//!                                              completion (record VA, CQ) ─▶ unlock ─▶ MSI-X
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use log::{debug, warn};
use pcisim_journal::Event;
use pcisim_pci::MsixOutcome;

use super::atc::Atc;
use super::queue::{Completion, Descriptor, FaultRecord};
use super::regs;
use super::walk::{self, Access, MemError, PhysMem, WalkFault, PAGE_4K};

/// Something held while a work item is in flight (Transactions Pending).
pub trait InFlight {}
impl<T: ?Sized> InFlight for T {}

/// What the NPU needs from its bus: DMA (optionally PASID-tagged, for the journal), a way for
/// the checker to look at memory without performing a device access, MSI-X and the journal.
/// Implemented for [`pcisim_pci::Bus`]; tests implement it over an in-memory image.
pub trait NpuHost: Send + Sync {
    /// Whether the function may master the bus now (Bus Master Enable, D0, link, no reset).
    fn may_master(&self) -> bool;
    /// A device read of guest physical memory, on behalf of `pasid` if given.
    fn dma_read(&self, pasid: Option<u32>, addr: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// A device write of guest physical memory, on behalf of `pasid` if given.
    fn dma_write(&self, pasid: Option<u32>, addr: u64, data: &[u8]) -> Result<(), MemError>;
    /// Write `len` bytes (several pages at contiguous physical addresses), byte `i` being
    /// `pattern[i % pattern.len()]`, on behalf of `pasid` as one access, journaled as the
    /// page-sized writes of the same bytes would have been — if all of it can be written now.
    /// `false`: nothing was done and nothing journaled (the engine then writes page by page,
    /// which refuses or faults at the exact page). A host that cannot do this says `false`
    /// always (the default).
    fn try_dma_write_run(&self, pasid: u32, addr: u64, len: usize, pattern: &[u8]) -> bool {
        let _ = (pasid, addr, len, pattern);
        false
    }
    /// A read for the checker's re-walk of `pasid`'s tables: ideally not a device access (not
    /// gated, not journaled as DMA).
    fn inspect(&self, pasid: u32, addr: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// Raise MSI-X vector `vector`.
    fn raise_msix(&self, vector: u16) -> MsixOutcome;
    /// Record a journal event.
    fn record(&self, event: Event);
    /// Mark work in flight while the returned guard lives.
    fn in_flight(&self) -> Box<dyn InFlight + '_> {
        Box::new(())
    }
}

/// Static engine options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Name in log messages.
    pub name: String,
    /// Re-walk on every ATC hit and report stale translations.
    pub checking: bool,
    /// Maximum PASIDs bound at once.
    pub max_contexts: u32,
    /// ATC capacity.
    pub atc_entries: u32,
    /// Number of MSI-X vectors (interrupt registers name vectors below it).
    pub msix_vectors: u16,
    /// Time each chunk takes at least (a slower engine): keeps work in flight long enough
    /// for a scenario to race process exit against it. Zero: full speed.
    pub chunk_delay: std::time::Duration,
}

/// A ring in guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Ring {
    base: u64,
    size: u32,
    head: u32,
    tail: u32,
}

impl Ring {
    fn valid(&self, entry: u64) -> bool {
        self.size >= 2
            && self.size <= regs::MAX_QUEUE_SIZE
            && self.size.is_power_of_two()
            && self.base.is_multiple_of(entry.max(8))
            && self
                .base
                .checked_add(u64::from(self.size) * entry)
                .is_some()
    }

    fn used(&self) -> u32 {
        if self.size == 0 {
            0
        } else {
            self.tail.wrapping_sub(self.head) & (self.size - 1)
        }
    }

    fn full(&self) -> bool {
        self.size == 0 || (self.tail + 1) & (self.size - 1) == self.head
    }

    fn slot_addr(&self, slot: u32, entry: u64) -> u64 {
        self.base.wrapping_add(u64::from(slot) * entry)
    }

    fn advance(v: u32, size: u32) -> u32 {
        (v + 1) & (size.max(1) - 1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CtxState {
    Bound,
    /// UNBIND in progress: finish (or abort) items fetched before `target`.
    Draining {
        abort: bool,
        target: u64,
        aborted: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Context {
    root: u64,
    privileged: bool,
    state: CtxState,
}

impl Context {
    fn aborting(&self) -> bool {
        matches!(self.state, CtxState::Draining { abort: true, .. })
    }
}

/// Everything that resets.
#[derive(Debug, Default)]
struct Regs {
    control: u32,
    halted: bool,
    error: u32,
    sq: Ring,
    cq: Ring,
    fq: Ring,
    cq_irq: u32,
    fq_irq: u32,
    cmd_irq: u32,
    cmd_pasid: u32,
    cmd_flags: u32,
    cmd_addr: u64,
    cmd_len: u64,
    cmd_status: u32,
    cmd_result: u32,
    cmd_seq: u32,
    completed: u32,
    faults: u32,
    stale: u32,
    fq_lost: u32,
}

/// The NPU state shared by the register interface and the engine thread.
pub struct State {
    cfg: EngineConfig,
    host: Option<Arc<dyn NpuHost>>,
    shutdown: bool,
    epoch: u64,
    regs: Regs,
    /// Descriptors fetched since reset.
    fetched: u64,
    /// PASID of the item in flight.
    current: Option<u32>,
    /// The UNBIND the mailbox is busy with.
    pending_unbind: Option<u32>,
    bus_wait: bool,
    contexts: BTreeMap<u32, Context>,
    atc: Atc,
    irqs: Vec<u16>,
    /// Coalesced write runs performed since the engine started.
    runs: u64,
    /// The recency a run's ATC lookups replaced (reused from run to run).
    run_scratch: Vec<u64>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("name", &self.cfg.name)
            .field("regs", &self.regs)
            .field("contexts", &self.contexts)
            .finish_non_exhaustive()
    }
}

/// State, its condition variable and a count of register accesses waiting for the lock (the
/// engine steps aside for them between chunks).
pub struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    waiting: AtomicU32,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// How often the idle engine re-checks conditions nobody notifies it about (link state).
const IDLE_POLL: Duration = Duration::from_millis(20);

/// Most bytes of a coalesced write run: 16 pages, the GPU engine's chunk. Bounds how long the
/// engine holds its lock (register accesses and commands wait for the end of a run, as they
/// wait for the end of a page otherwise).
pub const RUN_MAX: u64 = 16 * PAGE_4K;

/// Internal outcome of a chunk step: the bus refused (Bus Master, power, link, reset); retry
/// the chunk once bus mastering is allowed. Never reaches a completion record.
const RETRY: u32 = u32::MAX;

/// Why a translation failed.
enum XlateError {
    Fault(WalkFault),
    /// The PASID's context went away or is being aborted.
    Gone,
    /// The walk's reads were refused by the bus: retry later.
    Refused,
}

/// Guest memory as the walker reads it: device reads tagged with the PASID.
struct DeviceMem<'a> {
    host: &'a dyn NpuHost,
    pasid: u32,
}

impl PhysMem for DeviceMem<'_> {
    fn read(&self, pa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.host.dma_read(Some(self.pasid), pa, buf)
    }
}

/// Guest memory as the checker reads it.
struct InspectMem<'a> {
    host: &'a dyn NpuHost,
    pasid: u32,
}

impl PhysMem for InspectMem<'_> {
    fn read(&self, pa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.host.inspect(self.pasid, pa, buf)
    }
}

fn set_lo(v: &mut u64, lo: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(lo);
}

fn set_hi(v: &mut u64, hi: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(hi) << 32);
}

impl Shared {
    /// Fresh state.
    pub fn new(cfg: EngineConfig) -> Shared {
        let atc = Atc::new(cfg.atc_entries as usize);
        Shared {
            state: Mutex::new(State {
                cfg,
                host: None,
                shutdown: false,
                epoch: 0,
                regs: Regs::default(),
                fetched: 0,
                current: None,
                pending_unbind: None,
                bus_wait: false,
                contexts: BTreeMap::new(),
                atc,
                irqs: Vec::new(),
                runs: 0,
                run_scratch: Vec::new(),
            }),
            cv: Condvar::new(),
            waiting: AtomicU32::new(0),
        }
    }

    /// Lock for a register access or control operation (the engine yields to it).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        // State stays consistent across a panic in another holder: every update is
        // a field assignment, and the engine re-validates its item after each lock.
        let g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        g
    }

    fn lock_engine(&self) -> MutexGuard<'_, State> {
        while self.waiting.load(Ordering::Acquire) > 0 {
            std::thread::yield_now();
        }
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wake the engine (after a register change it may care about).
    pub fn notify(&self) {
        self.cv.notify_all();
    }

    /// Ask the engine thread to exit.
    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.notify();
    }

    /// Raise interrupts collected under the lock, through the host.
    fn raise(&self, host: Option<&Arc<dyn NpuHost>>, irqs: Vec<u16>) {
        if let Some(h) = host {
            for v in irqs {
                h.raise_msix(v);
            }
        }
    }

    /// The engine thread's body: returns when [`Shared::shutdown`] is called.
    pub fn run(&self) {
        let mut g = self.lock_engine();
        loop {
            if g.shutdown {
                return;
            }
            let Some(host) = g.runnable() else {
                g.check_drains();
                let irqs = std::mem::take(&mut g.irqs);
                let h = g.host.clone();
                drop(g);
                self.raise(h.as_ref(), irqs);
                g = self.lock_engine();
                if g.shutdown {
                    return;
                }
                if g.runnable().is_none() {
                    g = self
                        .cv
                        .wait_timeout(g, IDLE_POLL)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                continue;
            };
            g = self.run_one(g, &host);
            let irqs = std::mem::take(&mut g.irqs);
            drop(g);
            self.raise(Some(&host), irqs);
            g = self.lock_engine();
        }
    }

    /// Fetch and run one descriptor. Called with the lock held and the engine runnable.
    fn run_one<'a>(
        &'a self,
        mut g: MutexGuard<'a, State>,
        host: &Arc<dyn NpuHost>,
    ) -> MutexGuard<'a, State> {
        let epoch = g.epoch;
        let sq = g.regs.sq;
        let slot = sq.head;
        let mut raw = [0u8; 64];
        match host.dma_read(None, sq.slot_addr(slot, regs::DESC_SIZE), &mut raw) {
            Ok(()) => {}
            Err(MemError::Refused) => {
                // Bus mastering went away since `runnable`: fetch again later.
                g.bus_wait = true;
                return g;
            }
            Err(e) => {
                g.halt(regs::ERROR_SQ_READ, &format!("reading SQ slot {slot}: {e}"));
                return g;
            }
        }
        g.regs.sq.head = Ring::advance(slot, sq.size);
        g.fetched += 1;
        let desc = Descriptor::decode(&raw);
        let mut outcome = g.prevalidate(&desc);
        if outcome.is_none() {
            g.current = Some(desc.pasid);
            let (og, o) = self.execute(g, host.as_ref(), &desc, epoch);
            g = og;
            outcome = o;
            if g.epoch != epoch || g.shutdown {
                // Reset or shutdown: the item vanishes with the state it belonged to.
                return g;
            }
            g.current = None;
        }
        let (status, result) = outcome.unwrap_or((regs::ST_OK, 0));
        g.complete(host.as_ref(), &desc, slot, status, result);
        g.check_drains();
        g
    }

    /// Run a validated descriptor chunk by chunk, releasing the lock between chunks. Returns
    /// the lock and the (status, result) — or None if the item was abandoned (reset).
    fn execute<'a>(
        &'a self,
        mut g: MutexGuard<'a, State>,
        host: &dyn NpuHost,
        d: &Descriptor,
        epoch: u64,
    ) -> (MutexGuard<'a, State>, Option<(u32, u64)>) {
        let mut done: u64 = 0;
        // Bounce buffers for MEMCPY and COMPARE (a FILL needs none).
        let bounce = if d.op == regs::DESC_FILL {
            0
        } else {
            PAGE_4K as usize
        };
        let mut buf_a = vec![0u8; bounce];
        let mut buf_b = vec![0u8; bounce];
        let delay = g.cfg.chunk_delay;
        // Coalesced write runs (see `State::write_run`): not in checking mode (it re-walks each
        // hit, page by page) nor on a slowed engine (it paces and yields per page).
        let runs = d.op == regs::DESC_FILL && !g.cfg.checking && delay.is_zero();
        // `done` below which no run is tried again: a run that could not be written as one
        // access goes page by page, so that the refusal or fault lands on its exact page.
        let mut pages_until = 0u64;
        // FILL: byte i of dst is byte i mod 8 of the pattern, so a chunk starting `done` bytes
        // in is this page-and-a-bit of repeated pattern from offset `done % 8` (built 8 bytes
        // at a time, not byte by byte). A run repeats one page of it (4096 is a multiple of
        // 8): the source stays in L1, where a run-long one would not.
        let fill: Vec<u8> = if d.op == regs::DESC_FILL {
            d.src.to_le_bytes().repeat((PAGE_4K as usize + 8) / 8)
        } else {
            Vec::new()
        };
        // Transactions Pending while the item runs (not while it waits for the bus).
        let mut busy = Some(host.in_flight());
        let mut retry = false;
        while done < d.len {
            // Step aside for register accesses, then re-validate the item.
            drop(g);
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            g = self.lock_engine();
            if std::mem::take(&mut retry) {
                g = self
                    .cv
                    .wait_timeout(g, IDLE_POLL)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            loop {
                if g.epoch != epoch || g.shutdown {
                    return (g, None);
                }
                let usable = g.contexts.get(&d.pasid).is_some_and(|c| !c.aborting());
                if !g.enabled() || !usable {
                    g.abort_item(d.pasid);
                    return (g, Some((regs::ST_ABORTED, done)));
                }
                if host.may_master() {
                    g.bus_wait = false;
                    if busy.is_none() {
                        busy = Some(host.in_flight());
                    }
                    break;
                }
                // No DMA while the bus says no: wait (config changes notify; link polls).
                g.bus_wait = true;
                busy = None;
                g = self
                    .cv
                    .wait_timeout(g, IDLE_POLL)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            let rem = d.len - done;
            let dst = d.dst.wrapping_add(done);
            let src = d.src.wrapping_add(done);
            let page_left = |va: u64| PAGE_4K - (va & (PAGE_4K - 1));
            let r = match d.op {
                regs::DESC_FILL => {
                    let at = (done % 8) as usize;
                    let run = if runs && done >= pages_until {
                        let page = &fill[at..at + PAGE_4K as usize];
                        let r = g.write_run(host, d, dst, rem.min(RUN_MAX), page);
                        if let Err(tried) = r {
                            pages_until = done + tried;
                        }
                        r.ok()
                    } else {
                        None
                    };
                    match run {
                        Some(n) => Ok(n),
                        None => {
                            let n = rem.min(page_left(dst));
                            g.write_va(host, d, dst, &fill[at..at + n as usize])
                                .map(|()| n)
                        }
                    }
                }
                regs::DESC_MEMCPY => {
                    let n = rem.min(page_left(dst)).min(page_left(src));
                    let chunk = &mut buf_a[..n as usize];
                    g.read_va(host, d, src, chunk)
                        .and_then(|()| g.write_va(host, d, dst, chunk))
                        .map(|()| n)
                }
                _ => {
                    // COMPARE
                    let n = rem.min(page_left(dst)).min(page_left(src));
                    let (a, b) = (&mut buf_a[..n as usize], &mut buf_b[..n as usize]);
                    match g
                        .read_va(host, d, src, a)
                        .and_then(|()| g.read_va(host, d, dst, b))
                    {
                        Ok(()) => match a.iter().zip(b.iter()).position(|(x, y)| x != y) {
                            Some(i) => return (g, Some((regs::ST_MISMATCH, done + i as u64))),
                            None => Ok(n),
                        },
                        Err(e) => Err(e),
                    }
                }
            };
            match r {
                Ok(n) => done += n,
                Err(RETRY) => retry = true,
                Err(st) => {
                    if st == regs::ST_ABORTED {
                        g.abort_item(d.pasid);
                    }
                    return (g, Some((st, done)));
                }
            }
        }
        (g, Some((regs::ST_OK, done)))
    }
}

impl State {
    fn record(&self, ev: Event) {
        match &self.host {
            Some(h) => h.record(ev),
            None => debug!("{}: (no bus) {ev:?}", self.cfg.name),
        }
    }

    fn note(&self, text: String) {
        warn!("{}: {text}", self.cfg.name);
        self.record(Event::Note { text });
    }

    /// Attach the bus side.
    pub fn set_host(&mut self, host: Arc<dyn NpuHost>) {
        self.host = Some(host);
    }

    /// Take the interrupts to raise (after unlocking).
    pub fn take_irqs(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.irqs)
    }

    fn irq(&mut self, reg: u32) {
        if reg & regs::IRQ_ENABLE != 0 {
            let v = (reg & regs::IRQ_VECTOR_MASK) as u16;
            if v < self.cfg.msix_vectors {
                self.irqs.push(v);
            }
        }
    }

    fn enabled(&self) -> bool {
        self.regs.control & regs::CONTROL_ENABLE != 0
    }

    /// The host, if the engine may fetch the next descriptor now.
    fn runnable(&mut self) -> Option<Arc<dyn NpuHost>> {
        let host = self.host.clone()?;
        if !self.enabled() || self.regs.halted || self.regs.sq.used() == 0 {
            self.bus_wait = false;
            return None;
        }
        if !host.may_master() {
            self.bus_wait = true;
            return None;
        }
        self.bus_wait = false;
        if self.regs.cq.full() {
            return None;
        }
        Some(host)
    }

    /// Whether the engine can make progress on fetched-but-unfinished work.
    fn progressing(&self) -> bool {
        self.host.is_some() && self.enabled() && !self.regs.halted && !self.bus_wait
    }

    fn halt(&mut self, error: u32, why: &str) {
        self.regs.halted = true;
        self.regs.error = error;
        self.note(format!("engine halted: {why}"));
        self.check_drains();
    }

    /// Completion status for a descriptor that needs no memory access, or None to execute it.
    fn prevalidate(&mut self, d: &Descriptor) -> Option<(u32, u64)> {
        if let Some(st) = d.validate() {
            self.record(Event::Note {
                text: format!(
                    "bad descriptor (status {st}): op {:#x} flags {:#x} pasid {:#x} len {:#x}",
                    d.op, d.flags, d.pasid, d.len
                ),
            });
            return Some((st, 0));
        }
        if d.op == regs::DESC_NOP {
            return Some((regs::ST_OK, 0));
        }
        match self.contexts.get_mut(&d.pasid) {
            None => Some((regs::ST_PASID_NOT_BOUND, 0)),
            Some(c) if c.aborting() => {
                if let CtxState::Draining { aborted, .. } = &mut c.state {
                    *aborted += 1;
                }
                Some((regs::ST_ABORTED, 0))
            }
            Some(_) if d.len == 0 => Some((regs::ST_OK, 0)),
            Some(_) => None,
        }
    }

    /// Count an item aborted mid-way for its PASID's drain.
    fn abort_item(&mut self, pasid: u32) {
        if let Some(Context {
            state: CtxState::Draining { aborted, .. },
            ..
        }) = self.contexts.get_mut(&pasid)
        {
            *aborted += 1;
        }
        self.current = None;
    }

    /// Translate `va` of `d.pasid` for an access; faults are reported (fault queue, journal).
    fn translate_reporting(
        &mut self,
        host: &dyn NpuHost,
        d: &Descriptor,
        va: u64,
        write: bool,
    ) -> Result<u64, u32> {
        match self.translate(host, d.pasid, va, write) {
            Ok(pa) => Ok(pa),
            Err(XlateError::Gone) => Err(regs::ST_ABORTED),
            Err(XlateError::Refused) => Err(RETRY),
            Err(XlateError::Fault(f)) => {
                let user = self.contexts.get(&d.pasid).is_some_and(|c| !c.privileged);
                self.report_fault(d, va, write, user, f);
                Err(regs::ST_TRANSLATION_FAULT)
            }
        }
    }

    /// The status of a failed data access: retry when the bus refused, else a DMA error.
    fn data_error(&self, d: &Descriptor, what: &str, va: u64, pa: u64, e: MemError) -> u32 {
        if e == MemError::Refused {
            return RETRY;
        }
        self.note(format!(
            "pasid {}: {what} of va {va:#x} (pa {pa:#x}): {e}",
            d.pasid
        ));
        regs::ST_DMA_ERROR
    }

    fn read_va(
        &mut self,
        host: &dyn NpuHost,
        d: &Descriptor,
        va: u64,
        buf: &mut [u8],
    ) -> Result<(), u32> {
        let pa = self.translate_reporting(host, d, va, false)?;
        host.dma_read(Some(d.pasid), pa, buf)
            .map_err(|e| self.data_error(d, "read", va, pa, e))
    }

    /// Write the longest prefix of `want` bytes at `va` (byte `i` being
    /// `pattern[i % pattern.len()]`) that is a *run*: at least two pages of
    /// `d.pasid` that all hit the ATC with write permission, back to back, at contiguous
    /// physical addresses — as one bus access ([`NpuHost::try_dma_write_run`]: one gate check,
    /// one DMA-map lookup, one journal record and one checker pass instead of one per page).
    /// Each page then counts as the ATC hit it is (same counters and recency as page by page).
    ///
    /// `Ok(n)`: `n` bytes written. `Err(tried)`: nothing was written, journaled or counted;
    /// `tried` bytes from `va` are to go page by page (0 when there was no run: the first
    /// page misses, lacks permission or the next page is not contiguous — the page-by-page
    /// path then walks, faults or writes just the one page; else the run's length: the bus
    /// could not do it in full, and page by page finds the exact page that refuses or faults).
    fn write_run(
        &mut self,
        host: &dyn NpuHost,
        d: &Descriptor,
        va: u64,
        want: u64,
        pattern: &[u8],
    ) -> Result<u64, u64> {
        let Some(ctx) = self.contexts.get(&d.pasid).filter(|c| !c.aborting()) else {
            return Err(0);
        };
        let access = Access {
            write: true,
            user: !ctx.privileged,
        };
        // Each page is looked up once, as page-by-page translation would (recency updated):
        // counted as a hit when the run is written, put back when it is not.
        let mut saved = std::mem::take(&mut self.run_scratch);
        saved.clear();
        let permitted = |e: &super::atc::Entry| e.t.permits(access);
        let Some(first) = self.atc.touch_if(d.pasid, va, &mut saved, permitted) else {
            self.run_scratch = saved;
            return Err(0);
        };
        let pa = first.pa_of(va);
        let mut n = want.min(PAGE_4K - (va & (PAGE_4K - 1)));
        while n < want {
            let (Some(at), Some(expect)) = (va.checked_add(n), pa.checked_add(n)) else {
                break;
            };
            let next = |e: &super::atc::Entry| permitted(e) && e.pa_of(at) == expect;
            if self.atc.touch_if(d.pasid, at, &mut saved, next).is_none() {
                break;
            }
            n = want.min(n + PAGE_4K);
        }
        let pages = saved.len() as u64;
        let written = pages >= 2 && host.try_dma_write_run(d.pasid, pa, n as usize, pattern);
        if written {
            self.atc.count_hits(pages);
        } else {
            self.atc.untouch(d.pasid, va, &saved);
        }
        self.run_scratch = saved;
        if !written {
            return Err(if pages >= 2 { n } else { 0 });
        }
        self.runs += 1;
        Ok(n)
    }

    fn write_va(
        &mut self,
        host: &dyn NpuHost,
        d: &Descriptor,
        va: u64,
        data: &[u8],
    ) -> Result<(), u32> {
        let pa = self.translate_reporting(host, d, va, true)?;
        host.dma_write(Some(d.pasid), pa, data)
            .map_err(|e| self.data_error(d, "write", va, pa, e))
    }

    /// Translate through the ATC, walking on a miss. In checking mode an ATC hit is compared
    /// with a fresh walk (through the checker's view of memory) and a disagreement is
    /// journaled as `StaleTranslationUsed` — the cached translation is still used, as hardware
    /// would.
    fn translate(
        &mut self,
        host: &dyn NpuHost,
        pasid: u32,
        va: u64,
        write: bool,
    ) -> Result<u64, XlateError> {
        let ctx = match self.contexts.get(&pasid) {
            Some(c) if !c.aborting() => *c,
            _ => return Err(XlateError::Gone),
        };
        let access = Access {
            write,
            user: !ctx.privileged,
        };
        if let Some(e) = self.atc.lookup(pasid, va) {
            if e.t.permits(access) {
                let pa = e.pa_of(va);
                if self.cfg.checking && !e.stale_reported {
                    self.check_hit(host, pasid, ctx.root, va, pa, access);
                }
                return Ok(pa);
            }
            // Cached without the permission: the tables may have been upgraded; walk again.
            self.atc.remove(pasid, va);
        }
        let mem = DeviceMem { host, pasid };
        let r = walk::walk_access(&mem, ctx.root, va, access);
        if matches!(
            r,
            Err(WalkFault {
                reason: walk::FaultReason::TableUnreadable,
                ..
            })
        ) && !host.may_master()
        {
            // Table reads refused by the bus are not the page tables' fault: retry later.
            return Err(XlateError::Refused);
        }
        self.record(Event::PageWalk {
            pasid,
            va,
            pa: r.as_ref().ok().map(|t| t.pa),
        });
        match r {
            Ok(t) => {
                self.atc.insert(pasid, va, t);
                Ok(t.pa)
            }
            Err(f) => Err(XlateError::Fault(f)),
        }
    }

    fn check_hit(
        &mut self,
        host: &dyn NpuHost,
        pasid: u32,
        root: u64,
        va: u64,
        cached_pa: u64,
        access: Access,
    ) {
        let walked = walk::walk(&InspectMem { host, pasid }, root, va);
        let walked_pa = match walked {
            Ok(t) if t.pa == cached_pa && t.permits(access) => return,
            Ok(t) => Some(t.pa),
            // The checker could not read the tables: no verdict.
            Err(WalkFault {
                reason: walk::FaultReason::TableUnreadable,
                ..
            }) => return,
            Err(_) => None,
        };
        self.regs.stale = self.regs.stale.wrapping_add(1);
        self.atc.mark_stale_reported(pasid, va);
        warn!(
            "{}: pasid {pasid}: stale translation used: va {va:#x} cached pa {cached_pa:#x}, \
             tables now {walked_pa:x?}",
            self.cfg.name
        );
        self.record(Event::StaleTranslationUsed {
            pasid,
            va,
            cached_pa,
            walked_pa,
        });
    }

    fn report_fault(&mut self, d: &Descriptor, va: u64, write: bool, user: bool, f: WalkFault) {
        self.regs.faults = self.regs.faults.wrapping_add(1);
        self.record(Event::TranslationFault {
            pasid: d.pasid,
            va,
            write,
        });
        let mut access = 0;
        if write {
            access |= regs::FAULT_ACCESS_WRITE;
        }
        if user {
            access |= regs::FAULT_ACCESS_USER;
        }
        let rec = FaultRecord {
            va,
            pasid: d.pasid,
            access,
            reason: f.reason.code(),
            level: u32::from(f.level),
            tag: d.tag,
        };
        let fq = self.regs.fq;
        if !fq.valid(regs::FAULT_SIZE) || fq.full() {
            self.regs.fq_lost = self.regs.fq_lost.wrapping_add(1);
            return;
        }
        let Some(host) = self.host.clone() else {
            self.regs.fq_lost = self.regs.fq_lost.wrapping_add(1);
            return;
        };
        match host.dma_write(None, fq.slot_addr(fq.tail, regs::FAULT_SIZE), &rec.encode()) {
            Ok(()) => {
                self.regs.fq.tail = Ring::advance(fq.tail, fq.size);
                self.irq(self.regs.fq_irq);
            }
            Err(e) => {
                self.regs.fq_lost = self.regs.fq_lost.wrapping_add(1);
                self.note(format!("writing fault record: {e}"));
            }
        }
    }

    /// Write the completion: the descriptor's record in the PASID (when it has one and the
    /// PASID is usable), then the CQ entry.
    fn complete(&mut self, host: &dyn NpuHost, d: &Descriptor, slot: u32, status: u32, res: u64) {
        let c = Completion {
            tag: d.tag,
            status,
            slot,
            result: res,
            pasid: d.pasid,
        };
        let usable = self
            .contexts
            .get(&d.pasid)
            .is_some_and(|ctx| !ctx.aborting());
        if d.crec != 0
            && d.crec.is_multiple_of(8)
            && usable
            && !matches!(status, regs::ST_ABORTED | regs::ST_PASID_NOT_BOUND)
        {
            // 32 bytes at an 8-byte aligned VA may cross a page: write per page.
            let bytes = c.encode();
            let first = ((PAGE_4K - (d.crec & (PAGE_4K - 1))) as usize).min(bytes.len());
            let (a, b) = bytes.split_at(first);
            let _ = self
                .write_va(host, d, d.crec, a)
                .and_then(|()| match b.is_empty() {
                    true => Ok(()),
                    false => self.write_va(host, d, d.crec + first as u64, b),
                });
        }
        self.regs.completed = self.regs.completed.wrapping_add(1);
        let cq = self.regs.cq;
        if !cq.valid(regs::COMPLETION_SIZE) || cq.full() {
            self.note(format!(
                "completion of slot {slot} (tag {:#x}, status {status}) lost: CQ full or invalid",
                d.tag
            ));
            return;
        }
        match host.dma_write(
            None,
            cq.slot_addr(cq.tail, regs::COMPLETION_SIZE),
            &c.encode(),
        ) {
            Ok(()) => {
                self.regs.cq.tail = Ring::advance(cq.tail, cq.size);
                if d.flags & regs::DESC_FLAG_IRQ != 0 {
                    self.irq(self.regs.cq_irq);
                }
            }
            Err(MemError::Refused) => self.note(format!(
                "completion of slot {slot} (tag {:#x}, status {status}) lost: bus refused",
                d.tag
            )),
            Err(e) => self.halt(regs::ERROR_CQ_WRITE, &format!("writing CQ slot: {e}")),
        }
    }

    // ---- commands ----------------------------------------------------------------------------

    fn complete_command(&mut self, status: u32, result: u32) {
        self.regs.cmd_status = status;
        self.regs.cmd_result = result;
        self.regs.cmd_seq = self.regs.cmd_seq.wrapping_add(1);
        self.irq(self.regs.cmd_irq);
    }

    fn command(&mut self, op: u32) {
        if self.regs.cmd_status & regs::CMD_BUSY != 0 {
            warn!(
                "{}: command {op} while busy ignored (UNBIND of {:?} draining)",
                self.cfg.name, self.pending_unbind
            );
            return;
        }
        let (pasid, flags) = (self.regs.cmd_pasid, self.regs.cmd_flags);
        let known = match op {
            regs::OP_BIND => regs::BIND_FLAG_PRIV,
            regs::OP_UNBIND => regs::UNBIND_FLAG_ABORT,
            regs::OP_INVALIDATE => 0,
            _ => return self.complete_command(regs::CMD_BAD_OPCODE, 0),
        };
        if pasid == 0 || pasid >= regs::PASID_LIMIT {
            return self.complete_command(regs::CMD_BAD_PASID, 0);
        }
        if flags & !known != 0 {
            return self.complete_command(regs::CMD_BAD_FLAGS, 0);
        }
        match op {
            regs::OP_BIND => self.bind(pasid, flags),
            regs::OP_UNBIND => self.unbind(pasid, flags),
            _ => self.invalidate(pasid),
        }
    }

    fn bind(&mut self, pasid: u32, flags: u32) {
        if self.contexts.contains_key(&pasid) {
            return self.complete_command(regs::CMD_ALREADY_BOUND, 0);
        }
        if self.contexts.len() >= self.cfg.max_contexts as usize {
            return self.complete_command(regs::CMD_NO_RESOURCES, 0);
        }
        let root = self.regs.cmd_addr;
        self.atc.drop_pasid(pasid);
        self.contexts.insert(
            pasid,
            Context {
                root,
                privileged: flags & regs::BIND_FLAG_PRIV != 0,
                state: CtxState::Bound,
            },
        );
        self.record(Event::PasidBind { pasid, root });
        self.complete_command(regs::CMD_OK, 0);
    }

    fn unbind(&mut self, pasid: u32, flags: u32) {
        let outstanding = if self.progressing() {
            u64::from(self.regs.sq.used())
        } else {
            0
        };
        let target = self.fetched + outstanding;
        match self.contexts.get_mut(&pasid) {
            Some(c) if c.state == CtxState::Bound => {
                c.state = CtxState::Draining {
                    abort: flags & regs::UNBIND_FLAG_ABORT != 0,
                    target,
                    aborted: 0,
                };
            }
            _ => return self.complete_command(regs::CMD_NOT_BOUND, 0),
        }
        self.record(Event::PasidUnbindBegin { pasid });
        self.regs.cmd_status = regs::CMD_BUSY;
        self.pending_unbind = Some(pasid);
        self.check_drains();
    }

    fn invalidate(&mut self, pasid: u32) {
        let (va, len) = (self.regs.cmd_addr, self.regs.cmd_len);
        let n = self.atc.invalidate(pasid, va, len);
        debug!(
            "{}: invalidate pasid {pasid} {va:#x}+{len:#x}: {n} entries",
            self.cfg.name
        );
        self.record(Event::Invalidate { pasid, va, len });
        self.complete_command(regs::CMD_OK, 0);
    }

    /// Finish every drain whose work is done: nothing of the PASID in flight and the engine
    /// past the drain point, or the engine stopped (nothing more of the PASID will run).
    fn check_drains(&mut self) {
        let progressing = self.progressing();
        let done: Vec<(u32, u64)> = self
            .contexts
            .iter()
            .filter_map(|(&p, c)| match c.state {
                CtxState::Draining {
                    target, aborted, ..
                } if self.current != Some(p) && (self.fetched >= target || !progressing) => {
                    Some((p, aborted))
                }
                _ => None,
            })
            .collect();
        for (pasid, aborted) in done {
            self.contexts.remove(&pasid);
            self.atc.drop_pasid(pasid);
            self.record(Event::PasidDrained { pasid, aborted });
            self.record(Event::PasidUnbindAck { pasid });
            self.record(Event::PasidReleased { pasid });
            if self.pending_unbind == Some(pasid) {
                self.pending_unbind = None;
                self.complete_command(regs::CMD_OK, u32::try_from(aborted).unwrap_or(u32::MAX));
            }
        }
    }

    // ---- registers ---------------------------------------------------------------------------

    /// Read the 32-bit register at `off` (None: undefined offset).
    pub fn read(&self, off: u64) -> Option<u32> {
        let r = &self.regs;
        let atc = self.atc.stats();
        let lo = |v: u64| v as u32;
        let hi = |v: u64| (v >> 32) as u32;
        Some(match off {
            regs::MAX_CONTEXTS => self.cfg.max_contexts,
            regs::ATC_ENTRIES => self.cfg.atc_entries,
            regs::CONTROL => r.control,
            regs::STATUS => {
                let mut s = 0;
                if self.enabled() {
                    s |= regs::STATUS_ENABLED;
                }
                if r.halted {
                    s |= regs::STATUS_HALTED;
                }
                if self.current.is_none() && (!self.progressing() || r.sq.used() == 0) {
                    s |= regs::STATUS_IDLE;
                }
                if self.bus_wait {
                    s |= regs::STATUS_BUS_WAIT;
                }
                if self.enabled() && r.cq.full() && r.sq.used() > 0 {
                    s |= regs::STATUS_CQ_FULL;
                }
                s
            }
            regs::ERROR => r.error,
            regs::COMPLETED => r.completed,
            regs::FAULTS => r.faults,
            regs::STALE_USES => r.stale,
            regs::ATC_HITS => atc.hits as u32,
            regs::ATC_MISSES => atc.misses as u32,
            regs::ATC_INVALIDATIONS => atc.invalidations as u32,
            regs::CMD_PASID => r.cmd_pasid,
            regs::CMD_FLAGS => r.cmd_flags,
            regs::CMD_ADDR_LO => lo(r.cmd_addr),
            regs::CMD_ADDR_HI => hi(r.cmd_addr),
            regs::CMD_LEN_LO => lo(r.cmd_len),
            regs::CMD_LEN_HI => hi(r.cmd_len),
            regs::CMD_OP => 0,
            regs::CMD_STATUS => r.cmd_status,
            regs::CMD_RESULT => r.cmd_result,
            regs::CMD_IRQ => r.cmd_irq,
            regs::CMD_SEQ => r.cmd_seq,
            regs::SQ_BASE_LO => lo(r.sq.base),
            regs::SQ_BASE_HI => hi(r.sq.base),
            regs::SQ_SIZE => r.sq.size,
            regs::SQ_HEAD => r.sq.head,
            regs::SQ_TAIL => r.sq.tail,
            regs::CQ_BASE_LO => lo(r.cq.base),
            regs::CQ_BASE_HI => hi(r.cq.base),
            regs::CQ_SIZE => r.cq.size,
            regs::CQ_HEAD => r.cq.head,
            regs::CQ_TAIL => r.cq.tail,
            regs::CQ_IRQ => r.cq_irq,
            regs::FQ_BASE_LO => lo(r.fq.base),
            regs::FQ_BASE_HI => hi(r.fq.base),
            regs::FQ_SIZE => r.fq.size,
            regs::FQ_HEAD => r.fq.head,
            regs::FQ_TAIL => r.fq.tail,
            regs::FQ_IRQ => r.fq_irq,
            regs::FQ_LOST => r.fq_lost,
            _ => return None,
        })
    }

    /// Write the 32-bit register at `off`. Returns false for an undefined or read-only offset.
    pub fn write(&mut self, off: u64, v: u32) -> bool {
        let name = self.cfg.name.clone();
        let enabled = self.enabled();
        let r = &mut self.regs;
        let irq_mask = regs::IRQ_ENABLE | regs::IRQ_VECTOR_MASK;
        // Queue geometry changes only while the engine is disabled (and resets the indices).
        let ring_cfg = |ring: &mut Ring, f: &dyn Fn(&mut Ring)| {
            if enabled {
                warn!("{name}: queue register {off:#x} written while enabled: ignored");
            } else {
                f(ring);
                ring.head = 0;
                ring.tail = 0;
            }
        };
        match off {
            regs::CONTROL => self.set_control(v),
            regs::CMD_PASID => r.cmd_pasid = v,
            regs::CMD_FLAGS => r.cmd_flags = v,
            regs::CMD_ADDR_LO => set_lo(&mut r.cmd_addr, v),
            regs::CMD_ADDR_HI => set_hi(&mut r.cmd_addr, v),
            regs::CMD_LEN_LO => set_lo(&mut r.cmd_len, v),
            regs::CMD_LEN_HI => set_hi(&mut r.cmd_len, v),
            regs::CMD_OP => self.command(v),
            regs::CMD_IRQ => r.cmd_irq = v & irq_mask,
            regs::SQ_BASE_LO => ring_cfg(&mut r.sq, &|q| set_lo(&mut q.base, v)),
            regs::SQ_BASE_HI => ring_cfg(&mut r.sq, &|q| set_hi(&mut q.base, v)),
            regs::SQ_SIZE => ring_cfg(&mut r.sq, &|q| q.size = v),
            regs::SQ_TAIL => {
                if r.sq.size != 0 && v < r.sq.size {
                    r.sq.tail = v;
                } else {
                    warn!(
                        "{name}: SQ_TAIL {v} outside the queue (size {}) ignored",
                        r.sq.size
                    );
                }
            }
            regs::CQ_BASE_LO => ring_cfg(&mut r.cq, &|q| set_lo(&mut q.base, v)),
            regs::CQ_BASE_HI => ring_cfg(&mut r.cq, &|q| set_hi(&mut q.base, v)),
            regs::CQ_SIZE => ring_cfg(&mut r.cq, &|q| q.size = v),
            regs::CQ_HEAD => {
                if r.cq.size != 0 && v < r.cq.size {
                    r.cq.head = v;
                } else {
                    warn!(
                        "{name}: CQ_HEAD {v} outside the queue (size {}) ignored",
                        r.cq.size
                    );
                }
            }
            regs::CQ_IRQ => r.cq_irq = v & irq_mask,
            // The fault queue may be (re)configured at any time.
            regs::FQ_BASE_LO => {
                set_lo(&mut r.fq.base, v);
                (r.fq.head, r.fq.tail) = (0, 0);
            }
            regs::FQ_BASE_HI => {
                set_hi(&mut r.fq.base, v);
                (r.fq.head, r.fq.tail) = (0, 0);
            }
            regs::FQ_SIZE => {
                r.fq.size = v;
                (r.fq.head, r.fq.tail) = (0, 0);
            }
            regs::FQ_HEAD => {
                if r.fq.size != 0 && v < r.fq.size {
                    r.fq.head = v;
                } else {
                    warn!(
                        "{name}: FQ_HEAD {v} outside the queue (size {}) ignored",
                        r.fq.size
                    );
                }
            }
            regs::FQ_IRQ => r.fq_irq = v & irq_mask,
            _ => return false,
        }
        true
    }

    fn set_control(&mut self, v: u32) {
        let was = self.enabled();
        let on = v & regs::CONTROL_ENABLE != 0;
        if v & !regs::CONTROL_ENABLE != 0 {
            warn!(
                "{}: CONTROL bits {v:#x}: only ENABLE is defined",
                self.cfg.name
            );
        }
        self.regs.control = v & regs::CONTROL_ENABLE;
        match (was, on) {
            (false, true) => {
                if !self.regs.sq.valid(regs::DESC_SIZE)
                    || !self.regs.cq.valid(regs::COMPLETION_SIZE)
                {
                    self.halt(
                        regs::ERROR_QUEUE_CONFIG,
                        &format!(
                            "invalid queue configuration: SQ {:x?}, CQ {:x?}",
                            self.regs.sq, self.regs.cq
                        ),
                    );
                } else {
                    self.regs.halted = false;
                    self.regs.error = regs::ERROR_NONE;
                }
            }
            (true, false) => {
                self.regs.halted = false;
                self.regs.error = regs::ERROR_NONE;
                self.check_drains();
            }
            _ => {}
        }
    }

    /// Power-on state: every register, every PASID context and the ATC. Bound PASIDs are
    /// journaled as released. Bumps the epoch so the engine abandons its item.
    pub fn reset(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        let pasids: Vec<u32> = self.contexts.keys().copied().collect();
        for pasid in pasids {
            self.record(Event::PasidReleased { pasid });
        }
        self.contexts.clear();
        self.atc.clear();
        self.atc.reset_stats();
        self.regs = Regs::default();
        self.fetched = 0;
        self.current = None;
        self.pending_unbind = None;
        self.bus_wait = false;
        self.irqs.clear();
    }

    /// The ATC counters.
    pub fn atc_stats(&self) -> super::atc::AtcStats {
        self.atc.stats()
    }

    /// Coalesced write runs performed since the engine started (test and bench view: says
    /// whether work went to the bus in runs or page by page).
    pub fn coalesced_runs(&self) -> u64 {
        self.runs
    }

    /// Bound PASIDs (test and status view).
    pub fn bound_pasids(&self) -> Vec<u32> {
        self.contexts.keys().copied().collect()
    }
}
