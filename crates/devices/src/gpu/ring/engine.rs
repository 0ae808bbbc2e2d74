//! The register side of the ring ([`Engine`]): attaching a bus starts the engine thread; RING_*
//! register writes, doorbell (tail) notifications, error and fence reporting (MSI-X vectors,
//! journal notes), the resets ([`Engine::reset`], [`Engine::reset_ring`]) that wait for the
//! engine to leave its command, and the FLR hold of a posted chunk ([`Engine::hold_posted`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use log::warn;
use pcisim_journal::Event;

use super::execute::worker;
use super::Vram;
use super::{
    ctrl, err, journal_code, EngineBus, Hold, RingError, RingRegs, Shared, State, CMD_SIZE,
    HOLD_WAIT, MAX_ENTRIES, MIN_ENTRIES, RING_ALIGN,
};

/// The command ring: registers plus an engine thread once a bus is attached.
#[derive(Debug)]
pub struct Engine<B: EngineBus> {
    shared: Arc<Shared>,
    bus: Option<B>,
    worker: Option<JoinHandle<()>>,
}

impl<B: EngineBus> Engine<B> {
    /// A ring over `vram` with `vectors` MSI-X vectors; no engine thread until
    /// [`Engine::attach`].
    pub fn new(name: &str, vram: Arc<Vram>, vectors: u16) -> Engine<B> {
        Engine {
            shared: Arc::new(Shared {
                name: name.to_string(),
                vram,
                vectors,
                state: Mutex::new(State {
                    regs: RingRegs::default(),
                    busy: false,
                    shutdown: false,
                    hold: Hold::None,
                }),
                cv: Condvar::new(),
                generation: AtomicU64::new(0),
            }),
            bus: None,
            worker: None,
        }
    }

    /// Give the engine its bus and start the engine thread. A second call replaces the bus
    /// only if no thread runs yet.
    pub fn attach(&mut self, bus: B) {
        if self.worker.is_some() {
            warn!("{}: ring engine already attached", self.shared.name);
            return;
        }
        self.bus = Some(bus.clone());
        let shared = self.shared.clone();
        match std::thread::Builder::new()
            .name(format!("{}-ring", self.shared.name))
            .spawn(move || worker(&shared, &bus))
        {
            Ok(h) => self.worker = Some(h),
            Err(e) => warn!(
                "{}: starting the ring engine thread failed: {e}",
                self.shared.name
            ),
        }
    }

    /// Give the engine its bus without a thread: commands run only through [`Engine::step`]
    /// (deterministic tests).
    pub fn attach_manual(&mut self, bus: B) {
        self.bus = Some(bus);
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    /// A copy of the registers.
    pub fn regs(&self) -> RingRegs {
        self.lock().regs.clone()
    }

    /// Process one command on the calling thread if there is one (manual mode and tests).
    /// Returns whether a command was taken.
    pub fn step(&self) -> bool {
        let Some(bus) = self.bus.as_ref() else {
            return false;
        };
        let job = {
            let mut st = self.lock();
            match self.shared.take(&mut st) {
                Some(j) => j,
                None => return false,
            }
        };
        self.shared.run(bus, job);
        true
    }

    /// Set RING_BASE's low (`hi == false`) or high half. Ignored while enabled.
    pub fn write_base(&self, hi: bool, v: u32) {
        let mut st = self.lock();
        if st.regs.enabled {
            warn!(
                "{}: RING_BASE written while the ring is enabled, ignored",
                self.shared.name
            );
            return;
        }
        let b = &mut st.regs.base;
        *b = if hi {
            (*b & 0xffff_ffff) | (u64::from(v) << 32)
        } else {
            (*b & !0xffff_ffff) | u64::from(v)
        };
    }

    /// Set RING_SIZE. Ignored while enabled.
    pub fn write_size(&self, v: u32) {
        let mut st = self.lock();
        if st.regs.enabled {
            warn!(
                "{}: RING_SIZE written while the ring is enabled, ignored",
                self.shared.name
            );
            return;
        }
        st.regs.size = v;
    }

    /// Set FENCE_VECTOR (`fence`) or ERROR_VECTOR; values without a vector are ignored.
    pub fn write_vector(&self, fence: bool, v: u32) {
        let Some(v) = u16::try_from(v).ok().filter(|v| *v < self.shared.vectors) else {
            warn!(
                "{}: {} {v} out of range, ignored",
                self.shared.name,
                if fence {
                    "FENCE_VECTOR"
                } else {
                    "ERROR_VECTOR"
                }
            );
            return;
        };
        let mut st = self.lock();
        if fence {
            st.regs.fence_vector = v;
        } else {
            st.regs.error_vector = v;
        }
    }

    /// RING_TAIL doorbell. Returns at once; the engine thread does the work.
    pub fn write_tail(&self, v: u32) {
        let mut st = self.lock();
        let r = &mut st.regs;
        if r.enabled && r.error.is_none() && v >= r.active_size {
            let (head, vector) = (r.head, r.error_vector);
            let detail = format!("RING_TAIL {v} not below RING_SIZE {}", r.active_size);
            r.stop(err::BAD_TAIL, head, u64::from(v));
            drop(st);
            self.report(
                &RingError::new(err::BAD_TAIL, u64::from(v), detail),
                head,
                vector,
            );
            return;
        }
        r.tail = v;
        drop(st);
        self.shared.cv.notify_all();
    }

    /// RING_CTRL write.
    pub fn write_ctrl(&self, v: u32) {
        if v & ctrl::RESET != 0 {
            self.reset_ring();
        }
        let enable = v & ctrl::ENABLE != 0;
        let mut st = self.lock();
        let r = &mut st.regs;
        if enable == r.enabled {
            return;
        }
        if !enable || r.error.is_some() {
            // Disable: the command in flight completes, no new one starts. Stopped on an
            // error: nothing is latched or checked until RING_CTRL.RESET.
            r.enabled = enable;
            return;
        }
        let (head, vector) = (r.head, r.error_vector);
        let ok_size = r.size.is_power_of_two() && (MIN_ENTRIES..=MAX_ENTRIES).contains(&r.size);
        let ok_base = r.base.is_multiple_of(RING_ALIGN)
            && r.base.checked_add(u64::from(r.size) * CMD_SIZE).is_some();
        let failure = if !(ok_size && ok_base) {
            let addr = if ok_base { u64::from(r.size) } else { r.base };
            Some(RingError::new(
                err::BAD_RING,
                addr,
                format!(
                    "ring base {:#x} / size {} invalid (base 4 KiB aligned, size a power of two in {MIN_ENTRIES}..={MAX_ENTRIES})",
                    r.base, r.size
                ),
            ))
        } else if r.head >= r.size {
            Some(RingError::new(
                err::BAD_RING,
                u64::from(r.size),
                format!(
                    "RING_HEAD {} not below the new RING_SIZE {} (RESET the ring first)",
                    r.head, r.size
                ),
            ))
        } else if r.tail >= r.size {
            Some(RingError::new(
                err::BAD_TAIL,
                u64::from(r.tail),
                format!("RING_TAIL {} not below RING_SIZE {}", r.tail, r.size),
            ))
        } else {
            None
        };
        if let Some(e) = failure {
            r.stop(e.code, head, e.addr);
            drop(st);
            self.report(&e, head, vector);
            return;
        }
        r.enabled = true;
        r.active_base = r.base;
        r.active_size = r.size;
        drop(st);
        self.shared.cv.notify_all();
    }

    fn report(&self, e: &RingError, slot: u32, vector: u16) {
        warn!(
            "{}: ring error at slot {slot}: {}",
            self.shared.name, e.detail
        );
        if let Some(bus) = self.bus.as_ref() {
            bus.journal(Event::RingError {
                code: journal_code(e.code),
                slot,
                detail: e.detail.clone(),
            });
            bus.raise_msix(vector);
        }
    }

    /// RING_CTRL.RESET: stop the engine (abort the command in flight and wait for it to stop),
    /// then clear ENABLE, HEAD, TAIL and the error state. RING_BASE, RING_SIZE, the vectors,
    /// LAST_FENCE and the counters are kept.
    pub fn reset_ring(&self) {
        let mut st = self.shared.quiesce(self.lock());
        let r = &mut st.regs;
        r.enabled = false;
        r.head = 0;
        r.tail = 0;
        r.error = None;
        r.fault_addr = 0;
    }

    /// Function reset: stop the engine as [`Engine::reset_ring`] does, then every ring register
    /// back to its power-on value. A chunk held by [`Engine::hold_posted`] lands first.
    pub fn reset(&self) {
        let mut st = self.shared.quiesce(self.lock());
        st.regs = RingRegs::default();
    }

    /// An FLR was initiated while a command runs (Transactions Pending): stop the engine before
    /// the client write of its current or next chunk, with the chunk's data, and hold it there
    /// until [`Engine::reset`] releases it to land. Returns whether a chunk is held: `false` if
    /// the engine is idle or its command reaches no client write within [`HOLD_WAIT`] (a VRAM-only
    /// copy, a fence): then nothing of it is in flight.
    pub fn hold_posted(&self) -> bool {
        let mut st = self.lock();
        if !st.busy && !st.regs.runnable() {
            return false;
        }
        st.hold = Hold::Requested;
        let deadline = Instant::now() + HOLD_WAIT;
        while st.hold == Hold::Requested && (st.busy || st.regs.runnable()) && !st.shutdown {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = match self.shared.cv.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        if st.hold == Hold::Holding {
            true
        } else {
            st.hold = Hold::None;
            false
        }
    }
}

impl<B: EngineBus> Drop for Engine<B> {
    fn drop(&mut self) {
        {
            let mut st = self.lock();
            st.shutdown = true;
            if st.hold != Hold::None {
                st.hold = Hold::Released;
            }
            self.shared.generation.fetch_add(1, Ordering::AcqRel);
        }
        self.shared.cv.notify_all();
        if let Some(h) = self.worker.take() {
            if h.join().is_err() {
                warn!("{}: ring engine thread panicked", self.shared.name);
            }
        }
    }
}
