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

use pcisim_journal::Event;
use pcisim_pci::MsixOutcome;

use super::atc::Atc;
use super::queue::Descriptor;
use super::regs;
use super::walk::{MemError, PhysMem, WalkFault, PAGE_4K};

mod commands;
mod translate;

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
    /// Checking mode found this binding's address space torn down (journaled once).
    empty_reported: bool,
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

    /// Register accesses waiting for the lock (tests order a command against the engine's
    /// next chunk with it: the engine yields to a waiter between chunks).
    #[cfg(test)]
    pub fn lock_waiters(&self) -> u32 {
        self.waiting.load(Ordering::Acquire)
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
