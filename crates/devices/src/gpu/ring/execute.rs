//! The engine thread: taking commands from the ring, executing COPY/FILL/FENCE in 64 KiB
//! chunks with an abort check between chunks, client DMA page by page through the bus (or one
//! direct client-to-client move), VRAM accesses bounds-checked, the posted-write hold point,
//! and publishing each command's result (head, LAST_FENCE, the fence interrupt).

use std::sync::atomic::Ordering;
use std::sync::{MutexGuard, PoisonError};
use std::time::Instant;

use log::{debug, warn};
use pcisim_journal::Event;

use super::errors::{dma_error, with_detail};
use super::{
    decode, err, journal_code, Command, EngineBus, Hold, Job, Loc, RingError, Shared, State, Stop,
    CHUNK, CMD_SIZE, DMA_PAGE, RESET_WAIT,
};

pub(super) fn worker<B: EngineBus>(shared: &Shared, bus: &B) {
    loop {
        let job = {
            let mut st = shared.lock();
            loop {
                if st.shutdown {
                    return;
                }
                if let Some(j) = shared.take(&mut st) {
                    break j;
                }
                st = shared.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
        };
        shared.run(bus, job);
    }
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // Every update of the state is a plain assignment: a panic elsewhere cannot leave it
        // half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn aborted(&self, job: &Job) -> bool {
        self.generation.load(Ordering::Acquire) != job.generation
    }

    /// Take the next command if the ring is runnable; marks the engine busy.
    pub(super) fn take(&self, st: &mut State) -> Option<Job> {
        if st.busy || st.shutdown || !st.regs.runnable() {
            return None;
        }
        st.busy = true;
        let r = &st.regs;
        Some(Job {
            slot: r.head,
            addr: r
                .active_base
                .wrapping_add(u64::from(r.head).wrapping_mul(CMD_SIZE)),
            generation: self.generation.load(Ordering::Acquire),
        })
    }

    /// Stop the engine: disable, start a new generation, and wait until the engine has left
    /// the command it was in. Returns with the lock held.
    pub(super) fn quiesce<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        st.regs.enabled = false;
        self.generation.fetch_add(1, Ordering::AcqRel);
        // A chunk held for an FLR with Transactions Pending lands now (the reset has begun);
        // a hold still only requested is dropped.
        st.hold = match st.hold {
            Hold::Holding => Hold::Released,
            _ => Hold::None,
        };
        self.cv.notify_all();
        let deadline = Instant::now() + RESET_WAIT;
        while st.busy {
            let now = Instant::now();
            if now >= deadline {
                warn!(
                    "{}: ring engine did not stop within {:?}; its result will be discarded",
                    self.name, RESET_WAIT
                );
                break;
            }
            st = match self.cv.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        st
    }

    /// Execute `job` and publish its result (unless a reset intervened).
    pub(super) fn run<B: EngineBus>(&self, bus: &B, job: Job) {
        let result = {
            let _tx = bus.transaction();
            self.execute(bus, job)
        };
        let mut st = self.lock();
        if self.aborted(&job) {
            // A reset happened meanwhile: it owns the registers now.
            st.busy = false;
            drop(st);
            let how = match result {
                Err(Stop::Aborted { done }) => format!("after {done} bytes"),
                Err(Stop::Error(e)) => format!("({})", e.detail),
                Ok((_, moved)) => format!("at its end ({moved} bytes)"),
            };
            bus.journal(Event::RingCommandAborted {
                slot: job.slot,
                detail: how,
            });
            self.cv.notify_all();
            return;
        }
        let r = &mut st.regs;
        let mut irq = None;
        let mut note = None;
        match result {
            Ok((cmd, _)) => {
                r.head = (r.head + 1) % r.active_size.max(1);
                r.completed = r.completed.wrapping_add(1);
                if let Command::WriteFence {
                    value, irq: want, ..
                } = cmd
                {
                    r.last_fence = value;
                    if want {
                        irq = Some(r.fence_vector);
                    }
                }
            }
            Err(Stop::Error(e)) => {
                r.stop(e.code, job.slot, e.addr);
                irq = Some(r.error_vector);
                warn!(
                    "{}: ring error at slot {}: {}",
                    self.name, job.slot, e.detail
                );
                note = Some(Event::RingError {
                    code: journal_code(e.code),
                    slot: job.slot,
                    detail: e.detail.clone(),
                });
            }
            Err(Stop::Aborted { .. }) => {
                // Unreachable: an aborted command's generation is stale (handled above).
            }
        }
        drop(st);
        if let Some(event) = note {
            bus.journal(event);
        }
        // Interrupts are raised while still busy, so a reset waits for them too.
        if let Some(v) = irq {
            if !self.aborted(&job) {
                bus.raise_msix(v);
            }
        }
        self.lock().busy = false;
        self.cv.notify_all();
    }

    /// Fetch, decode and execute the command of `job`. On success returns the command and the
    /// bytes it moved.
    fn execute<B: EngineBus>(&self, bus: &B, job: Job) -> Result<(Command, u64), Stop> {
        let mut raw = [0u8; CMD_SIZE as usize];
        self.dma_read(bus, job.addr, &mut raw)
            .map_err(|e| with_detail(e, &format!("fetching slot {}", job.slot)))?;
        let cmd = decode(&raw, self.vram.size(), self.vectors)?;
        debug!("{}: slot {}: {cmd:?}", self.name, job.slot);
        let moved = match cmd {
            Command::Nop => 0,
            Command::Copy { src, dst, len } => self.copy(bus, &job, src, dst, len)?,
            Command::Fill { dst, pattern, len } => self.fill(bus, &job, dst, pattern, len)?,
            Command::WriteFence { iova, value, .. } => {
                self.check_abort(&job, 0)?;
                self.dma_write(bus, iova, &value.to_le_bytes())
                    .map_err(|e| with_detail(e, "WRITE_FENCE"))?;
                8
            }
            Command::Interrupt { vector } => {
                self.check_abort(&job, 0)?;
                bus.raise_msix(vector);
                0
            }
        };
        Ok((cmd, moved))
    }

    fn check_abort(&self, job: &Job, done: u64) -> Result<(), Stop> {
        if self.aborted(job) {
            Err(Stop::Aborted { done })
        } else {
            Ok(())
        }
    }

    fn copy<B: EngineBus>(
        &self,
        bus: &B,
        job: &Job,
        src: Loc,
        dst: Loc,
        len: u64,
    ) -> Result<u64, Stop> {
        let chunks = len.div_ceil(CHUNK as u64);
        // memmove: copy backwards when the destination starts inside the source.
        let backwards = src.same_space(dst)
            && dst.addr() > src.addr()
            && u128::from(dst.addr()) < u128::from(src.addr()) + u128::from(len);
        // The bounce buffer of chunks that cannot be copied directly (allocated on first use).
        let mut buf = Vec::new();
        let mut done = 0u64;
        for k in 0..chunks {
            let idx = if backwards { chunks - 1 - k } else { k };
            let off = idx * CHUNK as u64;
            let n = (len - off).min(CHUNK as u64) as usize;
            self.check_abort(job, done)?;
            if self.direct_copy(bus, src.offset(off), dst.offset(off), n) {
                done += n as u64;
                continue;
            }
            if buf.is_empty() {
                buf = vec![0u8; CHUNK.min(len as usize)];
            }
            let piece = &mut buf[..n];
            self.read_loc(bus, src.offset(off), piece)
                .map_err(|e| with_detail(e, "COPY source"))?;
            self.write_chunk(bus, dst.offset(off), piece)
                .map_err(|e| with_detail(e, "COPY destination"))?;
            done += n as u64;
        }
        Ok(done)
    }

    /// A client-to-client chunk copied in one move by the bus ([`EngineBus::dma_copy`]) when
    /// the two ranges do not overlap and no FLR is holding the engine's writes (a held chunk
    /// goes the access-by-access way, where [`Shared::hold_point`] sits). `false`: nothing
    /// was done.
    fn direct_copy<B: EngineBus>(&self, bus: &B, src: Loc, dst: Loc, n: usize) -> bool {
        let (Loc::Iova(s), Loc::Iova(d)) = (src, dst) else {
            return false;
        };
        let overlap =
            u128::from(s) < u128::from(d) + n as u128 && u128::from(d) < u128::from(s) + n as u128;
        if overlap || self.lock().hold != Hold::None {
            return false;
        }
        bus.dma_copy(s, d, n)
    }

    fn fill<B: EngineBus>(
        &self,
        bus: &B,
        job: &Job,
        dst: Loc,
        pattern: u32,
        len: u64,
    ) -> Result<u64, Stop> {
        let p = pattern.to_le_bytes();
        let buf: Vec<u8> = (0..CHUNK.min(len as usize)).map(|i| p[i % 4]).collect();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            self.check_abort(job, done)?;
            self.write_chunk(bus, dst.offset(done), &buf[..n])
                .map_err(|e| with_detail(e, "FILL destination"))?;
            done += n as u64;
        }
        Ok(done)
    }

    fn read_loc<B: EngineBus>(&self, bus: &B, at: Loc, buf: &mut [u8]) -> Result<(), RingError> {
        match at {
            Loc::Vram(off) => self
                .vram
                .read(off, buf)
                .map_err(|e| RingError::new(err::VRAM_RANGE, off, e.to_string())),
            Loc::Iova(iova) => self.dma_read(bus, iova, buf),
        }
    }

    /// A chunk's write. A client write is where an FLR with Transactions Pending finds the
    /// chunk in flight ([`Engine::hold_posted`](super::Engine::hold_posted)): held there, it lands as posted writes once
    /// the reset began.
    fn write_chunk<B: EngineBus>(&self, bus: &B, at: Loc, data: &[u8]) -> Result<(), RingError> {
        match at {
            Loc::Iova(iova) if self.hold_point() => {
                let mut done = 0usize;
                while done < data.len() {
                    let a = iova.wrapping_add(done as u64);
                    let n = page_piece(a, data.len() - done);
                    bus.dma_write_posted(a, &data[done..done + n])
                        .map_err(|f| dma_error(f, "write", a, n))?;
                    done += n;
                }
                bus.journal(Event::PostedWritesLanded {
                    iova,
                    bytes: data.len() as u64,
                });
                Ok(())
            }
            _ => self.write_loc(bus, at, data),
        }
    }

    /// If an FLR asked for a hold ([`Engine::hold_posted`](super::Engine::hold_posted)), wait here with the chunk until the
    /// reset releases it. Returns whether the chunk's write is a posted write landing now.
    fn hold_point(&self) -> bool {
        let mut st = self.lock();
        if st.hold != Hold::Requested {
            return false;
        }
        st.hold = Hold::Holding;
        self.cv.notify_all();
        let deadline = Instant::now() + RESET_WAIT;
        while st.hold == Hold::Holding {
            let now = Instant::now();
            if now >= deadline {
                warn!(
                    "{}: held chunk not released within {RESET_WAIT:?}; it lands now",
                    self.name
                );
                break;
            }
            st = match self.cv.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        st.hold = Hold::None;
        true
    }

    fn write_loc<B: EngineBus>(&self, bus: &B, at: Loc, data: &[u8]) -> Result<(), RingError> {
        match at {
            Loc::Vram(off) => self
                .vram
                .write(off, data)
                .map_err(|e| RingError::new(err::VRAM_RANGE, off, e.to_string())),
            Loc::Iova(iova) => self.dma_write(bus, iova, data),
        }
    }

    /// Client read in pieces that never cross a page.
    fn dma_read<B: EngineBus>(&self, bus: &B, iova: u64, buf: &mut [u8]) -> Result<(), RingError> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = iova.wrapping_add(done as u64);
            let n = page_piece(at, buf.len() - done);
            bus.dma_read(at, &mut buf[done..done + n])
                .map_err(|f| dma_error(f, "read", at, n))?;
            done += n;
        }
        Ok(())
    }

    /// Client write in pieces that never cross a page.
    fn dma_write<B: EngineBus>(&self, bus: &B, iova: u64, data: &[u8]) -> Result<(), RingError> {
        let mut done = 0usize;
        while done < data.len() {
            let at = iova.wrapping_add(done as u64);
            let n = page_piece(at, data.len() - done);
            bus.dma_write(at, &data[done..done + n])
                .map_err(|f| dma_error(f, "write", at, n))?;
            done += n;
        }
        Ok(())
    }
}

/// Bytes from `at` to the end of its page, at most `left`.
pub(super) fn page_piece(at: u64, left: usize) -> usize {
    let to_page_end = DMA_PAGE - (at % DMA_PAGE);
    left.min(usize::try_from(to_page_end).unwrap_or(usize::MAX))
}
