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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, warn};
use pcisim_journal::{Event, RingErrorCode};
use pcisim_pci::MsixOutcome;

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

/// Why a DMA did not happen (the engine's view of the bus's answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaFailure {
    /// The rules forbid DMA now (the bus journaled the refusal).
    Refused,
    /// No mapped memory there (journaled as a fault).
    Fault,
    /// Mapped, but the mapping forbids the direction: a write into memory the client mapped
    /// read-only (journaled as a fault).
    Protection,
}

/// What the engine needs from the bus: gated, journaled DMA and MSI-X, a journal for its events,
/// and Transactions Pending while a command runs. [`pcisim_pci::Bus`] implements it; tests use
/// an in-memory image.
pub trait EngineBus: Clone + Send + Sync + 'static {
    /// A guard that keeps Transactions Pending set while alive.
    type Tx<'a>
    where
        Self: 'a;
    /// Mark work in flight for as long as the guard lives.
    fn transaction(&self) -> Self::Tx<'_>;
    /// Read client memory at `iova` (never crosses a [`DMA_PAGE`] boundary).
    fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFailure>;
    /// Write client memory at `iova` (never crosses a [`DMA_PAGE`] boundary).
    fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), DmaFailure>;
    /// Raise MSI-X vector `vector`.
    fn raise_msix(&self, vector: u16) -> MsixOutcome;
    /// Journal a device event (ring errors, aborted commands, posted writes landing).
    fn journal(&self, event: Event);
    /// A posted write issued before a reset began, landing now (the reset does not stop it).
    fn dma_write_posted(&self, iova: u64, data: &[u8]) -> Result<(), DmaFailure> {
        self.dma_write(iova, data)
    }
    /// Copy `len` bytes of client memory from `src` to `dst` directly (one memcpy, journaled
    /// as the page-sized reads then writes it stands for) if that can be done in full now;
    /// `false`: nothing was done, and the engine goes page by page through
    /// [`EngineBus::dma_read`] and [`EngineBus::dma_write`]. The default never copies.
    fn dma_copy(&self, src: u64, dst: u64, len: usize) -> bool {
        let _ = (src, dst, len);
        false
    }
}

impl EngineBus for pcisim_pci::Bus {
    type Tx<'a> = pcisim_pci::bus::Transaction<'a>;

    fn transaction(&self) -> Self::Tx<'_> {
        pcisim_pci::Bus::transaction(self)
    }

    fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFailure> {
        pcisim_pci::Bus::dma_read(self, iova, buf).map_err(failure)
    }

    fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), DmaFailure> {
        pcisim_pci::Bus::dma_write(self, iova, data).map_err(failure)
    }

    fn raise_msix(&self, vector: u16) -> MsixOutcome {
        pcisim_pci::Bus::raise_msix(self, vector)
    }

    fn journal(&self, event: Event) {
        pcisim_pci::Bus::journal(self).record(event);
    }

    fn dma_write_posted(&self, iova: u64, data: &[u8]) -> Result<(), DmaFailure> {
        pcisim_pci::Bus::dma_write_posted(self, iova, data).map_err(failure)
    }

    fn dma_copy(&self, src: u64, dst: u64, len: usize) -> bool {
        pcisim_pci::Bus::try_dma_copy(self, src, dst, len)
    }
}

fn failure(f: pcisim_pci::bus::DmaFault) -> DmaFailure {
    match f {
        pcisim_pci::bus::DmaFault::Refused(_) => DmaFailure::Refused,
        pcisim_pci::bus::DmaFault::Protection { .. } => DmaFailure::Protection,
        _ => DmaFailure::Fault,
    }
}

/// Where a COPY or FILL operand points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    /// An offset in VRAM.
    Vram(u64),
    /// A client IOVA.
    Iova(u64),
}

impl Loc {
    fn addr(self) -> u64 {
        match self {
            Loc::Vram(a) | Loc::Iova(a) => a,
        }
    }

    fn offset(self, by: u64) -> Loc {
        match self {
            Loc::Vram(a) => Loc::Vram(a.wrapping_add(by)),
            Loc::Iova(a) => Loc::Iova(a.wrapping_add(by)),
        }
    }

    fn same_space(self, other: Loc) -> bool {
        matches!(
            (self, other),
            (Loc::Vram(_), Loc::Vram(_)) | (Loc::Iova(_), Loc::Iova(_))
        )
    }
}

/// A decoded, fully checked command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// NOP.
    Nop,
    /// COPY `len` bytes from `src` to `dst` (memmove semantics inside one space).
    Copy {
        /// Source.
        src: Loc,
        /// Destination.
        dst: Loc,
        /// Bytes.
        len: u64,
    },
    /// FILL `len` bytes at `dst` with `pattern` (little-endian, repeated).
    Fill {
        /// Destination.
        dst: Loc,
        /// The 32-bit pattern.
        pattern: u32,
        /// Bytes (a multiple of 4).
        len: u64,
    },
    /// WRITE_FENCE `value` at `iova`.
    WriteFence {
        /// IOVA of the 64-bit fence (8-byte aligned).
        iova: u64,
        /// Value.
        value: u64,
        /// Raise FENCE_VECTOR afterwards.
        irq: bool,
    },
    /// INTERRUPT: raise `vector`.
    Interrupt {
        /// The vector.
        vector: u16,
    },
}

/// Why a command (or the ring) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingError {
    /// An [`err`] code.
    pub code: u32,
    /// The offending address or operand (RING_FAULT_ADDR).
    pub addr: u64,
    /// Text for the journal.
    pub detail: String,
}

impl RingError {
    fn new(code: u32, addr: u64, detail: impl Into<String>) -> RingError {
        RingError {
            code,
            addr,
            detail: detail.into(),
        }
    }
}

/// Check that `len` bytes at `loc` exist: inside VRAM, or not wrapping past 2^64.
fn check_range(loc: Loc, len: u64, vram_size: u64, what: &str) -> Result<(), RingError> {
    let end = u128::from(loc.addr()) + u128::from(len);
    match loc {
        Loc::Vram(off) if end > u128::from(vram_size) => Err(RingError::new(
            err::VRAM_RANGE,
            off,
            format!("{what} VRAM {off:#x}+{len:#x} beyond VRAM size {vram_size:#x}"),
        )),
        Loc::Iova(iova) if end > 1u128 << 64 => Err(RingError::new(
            err::IOVA_RANGE,
            iova,
            format!("{what} IOVA {iova:#x}+{len:#x} wraps"),
        )),
        _ => Ok(()),
    }
}

/// Decode and check one command against a VRAM of `vram_size` bytes and `vectors` MSI-X
/// vectors. Every rule of the programming model that can be checked without touching memory is
/// checked here.
pub fn decode(
    raw: &[u8; CMD_SIZE as usize],
    vram_size: u64,
    vectors: u16,
) -> Result<Command, RingError> {
    let cmd = RawCommand::decode(raw);
    let (opcode, flags) = (cmd.opcode, cmd.flags);
    let (a, b, c) = (cmd.a, cmd.b, cmd.c);
    let name = op_name(opcode);
    let allowed = match opcode {
        op::NOP | op::INTERRUPT => 0,
        op::COPY => flag::SRC_VRAM | flag::DST_VRAM,
        op::FILL => flag::DST_VRAM,
        op::WRITE_FENCE => flag::FENCE_IRQ,
        _ => {
            return Err(RingError::new(
                err::BAD_OPCODE,
                u64::from(opcode),
                format!("bad opcode {opcode:#04x}"),
            ))
        }
    };
    if flags & !allowed != 0 {
        return Err(RingError::new(
            err::BAD_FLAGS,
            u64::from(flags),
            format!("{name}: undefined flags {:#04x}", flags & !allowed),
        ));
    }
    if cmd.reserved.iter().any(|&x| x != 0) {
        return Err(RingError::new(
            err::RESERVED,
            cmd.header(),
            format!("{name}: reserved header bytes 2..8 not zero"),
        ));
    }
    let unused_zero = |ops: &[(u64, &str)]| -> Result<(), RingError> {
        match ops.iter().find(|(v, _)| *v != 0) {
            Some((v, which)) => Err(RingError::new(
                err::RESERVED,
                *v,
                format!("{name}: unused operand {which} = {v:#x} not zero"),
            )),
            None => Ok(()),
        }
    };
    let loc = |vram: bool, addr: u64| {
        if vram {
            Loc::Vram(addr)
        } else {
            Loc::Iova(addr)
        }
    };
    let length = |len: u64| {
        if len > MAX_LEN {
            Err(RingError::new(
                err::LENGTH,
                len,
                format!("{name}: length {len:#x} above {MAX_LEN:#x}"),
            ))
        } else {
            Ok(())
        }
    };
    match opcode {
        op::NOP => {
            unused_zero(&[(a, "a"), (b, "b"), (c, "c")])?;
            Ok(Command::Nop)
        }
        op::COPY => {
            let src = loc(flags & flag::SRC_VRAM != 0, a);
            let dst = loc(flags & flag::DST_VRAM != 0, b);
            length(c)?;
            check_range(src, c, vram_size, "COPY source")?;
            check_range(dst, c, vram_size, "COPY destination")?;
            Ok(Command::Copy { src, dst, len: c })
        }
        op::FILL => {
            let dst = loc(flags & flag::DST_VRAM != 0, a);
            if b >> 32 != 0 {
                return Err(RingError::new(
                    err::RESERVED,
                    b,
                    format!("FILL: pattern {b:#x} wider than 32 bits"),
                ));
            }
            if !a.is_multiple_of(4) || !c.is_multiple_of(4) {
                let at = if a.is_multiple_of(4) { c } else { a };
                return Err(RingError::new(
                    err::ALIGNMENT,
                    at,
                    format!("FILL: destination {a:#x} or length {c:#x} not a multiple of 4"),
                ));
            }
            length(c)?;
            check_range(dst, c, vram_size, "FILL destination")?;
            Ok(Command::Fill {
                dst,
                pattern: b as u32,
                len: c,
            })
        }
        op::WRITE_FENCE => {
            unused_zero(&[(c, "c")])?;
            if !a.is_multiple_of(8) {
                return Err(RingError::new(
                    err::ALIGNMENT,
                    a,
                    format!("WRITE_FENCE: fence address {a:#x} not 8-byte aligned"),
                ));
            }
            Ok(Command::WriteFence {
                iova: a,
                value: b,
                irq: flags & flag::FENCE_IRQ != 0,
            })
        }
        _ => {
            // op::INTERRUPT (every other opcode returned above).
            unused_zero(&[(b, "b"), (c, "c")])?;
            match u16::try_from(a) {
                Ok(vector) if vector < vectors => Ok(Command::Interrupt { vector }),
                _ => Err(RingError::new(
                    err::BAD_VECTOR,
                    a,
                    format!("INTERRUPT: vector {a} out of range (0..{vectors})"),
                )),
            }
        }
    }
}

/// The ring registers (everything [`Engine::reset`] restores).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingRegs {
    /// RING_BASE as written.
    pub base: u64,
    /// RING_SIZE as written.
    pub size: u32,
    /// RING_HEAD: the next slot the engine processes.
    pub head: u32,
    /// RING_TAIL: one past the last slot the driver submitted.
    pub tail: u32,
    /// RING_CTRL.ENABLE.
    pub enabled: bool,
    /// Base latched at enable.
    pub active_base: u64,
    /// Size latched at enable.
    pub active_size: u32,
    /// Stopped on an error.
    pub error: Option<(u32, u32)>,
    /// RING_FAULT_ADDR.
    pub fault_addr: u64,
    /// LAST_FENCE.
    pub last_fence: u64,
    /// FENCE_VECTOR.
    pub fence_vector: u16,
    /// ERROR_VECTOR.
    pub error_vector: u16,
    /// CMDS_COMPLETED.
    pub completed: u32,
    /// RING_ERRORS: how many times the ring stopped on an error.
    pub errors: u32,
}

impl Default for RingRegs {
    fn default() -> RingRegs {
        RingRegs {
            base: 0,
            size: 0,
            head: 0,
            tail: 0,
            enabled: false,
            active_base: 0,
            active_size: 0,
            error: None,
            fault_addr: 0,
            last_fence: 0,
            fence_vector: DEFAULT_FENCE_VECTOR,
            error_vector: DEFAULT_ERROR_VECTOR,
            completed: 0,
            errors: 0,
        }
    }
}

impl RingRegs {
    /// RING_STATUS.
    pub fn status(&self) -> u32 {
        if self.error.is_some() {
            status::ERROR
        } else if self.enabled && self.head != self.tail {
            status::BUSY
        } else {
            status::IDLE
        }
    }

    /// RING_ERROR: code | slot << 16.
    pub fn error_reg(&self) -> u32 {
        self.error
            .map_or(err::NONE, |(code, slot)| ring_error(code, slot))
    }

    fn runnable(&self) -> bool {
        self.enabled && self.error.is_none() && self.head != self.tail
    }

    fn stop(&mut self, code: u32, slot: u32, addr: u64) {
        self.error = Some((code, slot));
        self.fault_addr = addr;
        self.errors = self.errors.wrapping_add(1);
    }
}

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

    fn lock(&self) -> MutexGuard<'_, State> {
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

/// The journal's code for a RING_ERROR code (`err::NONE` never stops a ring: `Unknown`).
pub fn journal_code(code: u32) -> RingErrorCode {
    match code {
        err::BAD_OPCODE => RingErrorCode::BadOpcode,
        err::BAD_FLAGS => RingErrorCode::BadFlags,
        err::RESERVED => RingErrorCode::Reserved,
        err::ALIGNMENT => RingErrorCode::Alignment,
        err::LENGTH => RingErrorCode::Length,
        err::VRAM_RANGE => RingErrorCode::VramRange,
        err::IOVA_RANGE => RingErrorCode::IovaRange,
        err::DMA_FAULT => RingErrorCode::DmaFault,
        err::DMA_REFUSED => RingErrorCode::DmaRefused,
        err::BAD_VECTOR => RingErrorCode::BadVector,
        err::BAD_RING => RingErrorCode::BadRing,
        err::BAD_TAIL => RingErrorCode::BadTail,
        _ => RingErrorCode::Unknown,
    }
}

fn worker<B: EngineBus>(shared: &Shared, bus: &B) {
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
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update of the state is a plain assignment: a panic elsewhere cannot leave it
        // half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn aborted(&self, job: &Job) -> bool {
        self.generation.load(Ordering::Acquire) != job.generation
    }

    /// Take the next command if the ring is runnable; marks the engine busy.
    fn take(&self, st: &mut State) -> Option<Job> {
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
    fn quiesce<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
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
    fn run<B: EngineBus>(&self, bus: &B, job: Job) {
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
    /// chunk in flight ([`Engine::hold_posted`]): held there, it lands as posted writes once
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

    /// If an FLR asked for a hold ([`Engine::hold_posted`]), wait here with the chunk until the
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
fn page_piece(at: u64, left: usize) -> usize {
    let to_page_end = DMA_PAGE - (at % DMA_PAGE);
    left.min(usize::try_from(to_page_end).unwrap_or(usize::MAX))
}

fn dma_error(f: DmaFailure, dir: &str, at: u64, n: usize) -> RingError {
    match f {
        DmaFailure::Refused => RingError::new(
            err::DMA_REFUSED,
            at,
            format!("DMA {dir} of {n} bytes at IOVA {at:#x} refused by the bus"),
        ),
        DmaFailure::Fault => RingError::new(
            err::DMA_FAULT,
            at,
            format!("DMA {dir} of {n} bytes at IOVA {at:#x} hit no mapped memory"),
        ),
        DmaFailure::Protection => RingError::new(
            err::DMA_FAULT,
            at,
            if dir == "write" {
                format!("DMA write of {n} bytes at IOVA {at:#x}: write to read-only mapping")
            } else {
                format!("DMA read of {n} bytes at IOVA {at:#x}: read of write-only mapping")
            },
        ),
    }
}

fn with_detail(mut e: RingError, what: &str) -> RingError {
    e.detail = format!("{what}: {}", e.detail);
    e
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
