//! The function's side of the link: DMA into client memory and MSI-X (or MSI) towards the
//! client, usable from any thread (engine threads keep a clone), obeying the rules hardware
//! obeys and testifying in the journal.
//!
//! ```text
//!   device model / engine thread
//!        │ dma_read / dma_write / raise_msix
//!        ▼
//!   ┌─────────── Bus ───────────┐
//!   │ gate: link up? not in      │──refused──▶ journal: dma_refused / interrupt refused:<why>
//!   │ reset? D0? Bus Master?     │
//!   │ injected DMA errors?       │
//!   └────────────┬───────────────┘
//!                ▼ performed
//!   client DmaSpace (bounds-checked) ──▶ journal: dma (aggregated) or dma_fault
//! ```
//!
//! The gate reflects the Command register, PMCSR, link and reset state that the endpoint pushes
//! into the bus as they change (PCIe Base 6.0 §7.5.1.1.3: a function with Bus Master Enable clear
//! issues no memory requests, MSI/MSI-X included; §5.3.1.4.1: in D3hot only configuration
//! requests are accepted). The journal's checker independently flags a DMA that *was performed*
//! in a forbidden state, so a device model that bypassed the gate would be caught.
//!
//! Unmap drains in-flight DMA: an access holds the client DMA map's read lock while it copies;
//! DMA_UNMAP takes the write lock, so it is acknowledged only after the accesses that were
//! already inside the range have finished.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use pcisim_vfio_user::{ClientLink, DmaError};

use crate::caps::msi::{MsiControl, MsiState};
use crate::msix::{MsixOutcome, MsixState};
use pcisim_journal::{Dir, Event, InterruptOutcome, IntxHold, Journal, MessageKind, Refusal};

/// Why a DMA did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DmaFault {
    /// The device refused: the rules forbid DMA now.
    #[error("DMA refused: {0:?}")]
    Refused(Refusal),
    /// No mapped, fd-backed memory at the address; nothing was touched.
    #[error("DMA to unmapped memory at {iova:#x}+{len:#x}")]
    Unmapped {
        /// Address.
        iova: u64,
        /// Length.
        len: u64,
    },
    /// The mapping does not permit this direction.
    #[error("DMA at {iova:#x}+{len:#x} not permitted by the mapping")]
    Protection {
        /// Address.
        iova: u64,
        /// Length.
        len: u64,
    },
}

struct Inner {
    name: String,
    journal: Journal,
    command: AtomicU16,
    power: AtomicU8,
    link_up: AtomicBool,
    resetting: AtomicBool,
    dma_errors: AtomicU32,
    inflight: AtomicU32,
    intx_level: AtomicBool,
    client: RwLock<Option<ClientLink>>,
    msix: Mutex<Option<MsixState>>,
    msi: Mutex<Option<MsiState>>,
}

/// A function's bus interface. Cheap to clone; all methods take `&self`.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("name", &self.inner.name)
            .field("command", &self.command())
            .field("link_up", &self.link_up())
            .finish_non_exhaustive()
    }
}

/// Bit 2 of the Command register.
const BUS_MASTER: u16 = 1 << 2;
/// Bit 10 of the Command register: INTx Emulation Disable.
const INTX_DISABLE: u16 = 1 << 10;
/// PMCSR.PowerState value of D3hot.
const D3HOT: u8 = 3;

/// Counts an access in flight (Transactions Pending) while alive.
#[derive(Debug)]
pub struct Transaction<'a> {
    bus: &'a Bus,
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        self.bus.inner.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Bus {
    /// A bus for function `name` recording into `journal`, with the function's MSI-X state.
    pub fn new(name: &str, journal: Journal, msix: Option<MsixState>) -> Bus {
        Bus::with_msi(name, journal, msix, None)
    }

    /// A bus for a function with MSI-X and/or MSI. [`Bus::raise_msix`] raises MSI when the
    /// function has MSI but no MSI-X.
    pub fn with_msi(
        name: &str,
        journal: Journal,
        msix: Option<MsixState>,
        msi: Option<MsiState>,
    ) -> Bus {
        Bus {
            inner: Arc::new(Inner {
                name: name.to_string(),
                journal,
                command: AtomicU16::new(0),
                power: AtomicU8::new(0),
                link_up: AtomicBool::new(true),
                resetting: AtomicBool::new(false),
                dma_errors: AtomicU32::new(0),
                inflight: AtomicU32::new(0),
                intx_level: AtomicBool::new(false),
                client: RwLock::new(None),
                msix: Mutex::new(msix),
                msi: Mutex::new(msi),
            }),
        }
    }

    /// The function's journal.
    pub fn journal(&self) -> &Journal {
        &self.inner.journal
    }

    /// The Command register as last written.
    pub fn command(&self) -> u16 {
        self.inner.command.load(Ordering::Acquire)
    }

    /// Command.Bus Master Enable.
    pub fn bus_master(&self) -> bool {
        self.command() & BUS_MASTER != 0
    }

    /// The link is up (not surprise-removed).
    pub fn link_up(&self) -> bool {
        self.inner.link_up.load(Ordering::Acquire)
    }

    /// A reset is in progress.
    pub fn resetting(&self) -> bool {
        self.inner.resetting.load(Ordering::Acquire)
    }

    /// PMCSR.PowerState (0 = D0, 3 = D3hot).
    pub fn power_state(&self) -> u8 {
        self.inner.power.load(Ordering::Acquire)
    }

    /// Accesses in flight right now.
    pub fn inflight(&self) -> u32 {
        self.inner.inflight.load(Ordering::Acquire)
    }

    /// A client is attached.
    pub fn client_attached(&self) -> bool {
        self.client().is_some()
    }

    fn client(&self) -> std::sync::RwLockReadGuard<'_, Option<ClientLink>> {
        self.inner
            .client
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Mark work in flight for as long as the guard lives (Device Status.Transactions Pending).
    pub fn transaction(&self) -> Transaction<'_> {
        self.inner.inflight.fetch_add(1, Ordering::AcqRel);
        Transaction { bus: self }
    }

    /// Whether the rules allow the function to master the bus now, and why not.
    pub fn may_master(&self) -> Result<(), Refusal> {
        self.gate(false)
    }

    /// [`Bus::may_master`], ignoring a reset in progress if `issued_before_reset`.
    fn gate(&self, issued_before_reset: bool) -> Result<(), Refusal> {
        if !self.link_up() {
            Err(Refusal::LinkDown)
        } else if self.resetting() && !issued_before_reset {
            Err(Refusal::Resetting)
        } else if self.power_state() == D3HOT {
            Err(Refusal::D3hot)
        } else if !self.bus_master() {
            Err(Refusal::BusMasterDisabled)
        } else {
            Ok(())
        }
    }

    /// Device read of client memory at `iova`.
    pub fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        self.dma(None, iova, Access::Read(buf))
    }

    /// Device write of client memory at `iova`.
    pub fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), DmaFault> {
        self.dma(None, iova, Access::Write(data))
    }

    /// A posted write the function issued before a reset began, landing now: performed (and
    /// journaled) even though the function is resetting — the journal's checker then sees DMA
    /// inside the reset. Every other rule (link, D3hot, Bus Master Enable, the DMA map) holds.
    /// Only an FLR initiated with Transactions Pending produces these
    /// ([`crate::PciFunction::flr_with_transactions_pending`]).
    pub fn dma_write_posted(&self, iova: u64, data: &[u8]) -> Result<(), DmaFault> {
        self.dma_gated(None, iova, Access::Write(data), true)
    }

    /// A read on behalf of PASID `pasid` (journaled with it) at the translated address.
    pub fn dma_read_pasid(&self, pasid: u32, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        self.dma(Some(pasid), addr, Access::Read(buf))
    }

    /// A write on behalf of PASID `pasid` (journaled with it) at the translated address.
    pub fn dma_write_pasid(&self, pasid: u32, addr: u64, data: &[u8]) -> Result<(), DmaFault> {
        self.dma(Some(pasid), addr, Access::Write(data))
    }

    fn dma(&self, pasid: Option<u32>, iova: u64, access: Access<'_>) -> Result<(), DmaFault> {
        self.dma_gated(pasid, iova, access, false)
    }

    /// A DMA through the gate; `issued_before_reset`: a posted write that passed the gate before
    /// a reset began (the reset does not stop it).
    fn dma_gated(
        &self,
        pasid: Option<u32>,
        iova: u64,
        access: Access<'_>,
        issued_before_reset: bool,
    ) -> Result<(), DmaFault> {
        let (dir, len) = match &access {
            Access::Read(b) => (Dir::Read, b.len() as u64),
            Access::Write(d) => (Dir::Write, d.len() as u64),
        };
        let refuse = |reason: Refusal| {
            self.journal().record(Event::DmaRefused {
                dir,
                iova,
                len,
                reason,
            });
            Err(DmaFault::Refused(reason))
        };
        // Counted in flight before the gate is checked, so a state change that drains
        // in-flight accesses cannot slip between our check and our access.
        let _tx = self.transaction();
        if let Err(reason) = self.gate(issued_before_reset) {
            return refuse(reason);
        }
        if self
            .inner
            .dma_errors
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            return refuse(Refusal::InjectedError);
        }
        let client = self.client();
        let Some(link) = client.as_ref() else {
            drop(client);
            return refuse(Refusal::NoClient);
        };
        // The access is journaled while the mappings are still held, so an unmap that follows
        // it cannot be journaled ahead of it (a false dma_after_unmap).
        let journal_ok = |r: &Result<(), DmaError>| {
            if r.is_ok() {
                self.journal().record(Event::Dma {
                    dir,
                    pasid,
                    iova,
                    len,
                    count: 1,
                    bytes: len,
                });
            }
        };
        let r = match access {
            Access::Read(b) => link.dma.read_then(iova, b, journal_ok),
            Access::Write(d) => link.dma.write_then(iova, d, journal_ok),
        };
        drop(client);
        match r {
            Ok(()) => Ok(()),
            Err(e) => {
                self.journal().record(Event::DmaFault {
                    dir,
                    pasid,
                    iova,
                    len,
                });
                Err(match e {
                    DmaError::Protection { .. } => DmaFault::Protection { iova, len },
                    _ => DmaFault::Unmapped { iova, len },
                })
            }
        }
    }

    /// A memory-to-memory copy of `len` bytes from client memory at `src` to client memory at
    /// `dst`, moved once, directly between the two mappings — if it can be done in full right
    /// now. Returns `true` when the copy was performed: then it is journaled exactly as the
    /// page-sized reads of the source followed by the page-sized writes of the destination
    /// would have been (one `dma` read record and one write record, `count` = the 4 KiB pages
    /// each range touches).
    ///
    /// Returns `false` when nothing was done and nothing journaled: the gate refuses (link,
    /// reset, D3hot, Bus Master), an injected DMA error is armed, no client is attached, the
    /// ranges overlap, `len` is 0, or some part of either range is not mapped, backed and
    /// permitted. The caller then issues the accesses one by one ([`Bus::dma_read`],
    /// [`Bus::dma_write`]), which refuse, fault and journal precisely where the problem is.
    ///
    /// Like every access it counts in flight from before the gate check until the copy is
    /// done, and holds the client's DMA map (read lock) while copying, so an unmap waits.
    pub fn try_dma_copy(&self, src: u64, dst: u64, len: usize) -> bool {
        if len == 0 {
            return false;
        }
        let _tx = self.transaction();
        if self.gate(false).is_err() || self.inner.dma_errors.load(Ordering::Acquire) != 0 {
            return false;
        }
        let client = self.client();
        let Some(link) = client.as_ref() else {
            return false;
        };
        // Journaled while the mappings are held: an unmap cannot be journaled in between.
        let r = link.dma.copy_then(src, dst, len, |r| {
            if r.is_ok() {
                let len = len as u64;
                for (dir, iova) in [(Dir::Read, src), (Dir::Write, dst)] {
                    self.journal().record(Event::Dma {
                        dir,
                        pasid: None,
                        iova,
                        len,
                        count: pages_touched(iova, len),
                        bytes: len,
                    });
                }
            }
        });
        if let Err(e) = r {
            log::trace!(
                "{}: direct copy {src:#x} -> {dst:#x} +{len:#x} not possible ({e}); \
                 accesses go one by one",
                self.inner.name
            );
            return false;
        }
        true
    }

    /// A write of `len` bytes to client memory at `iova` (on behalf of `pasid`, if given) as
    /// one access, byte `i` being `pattern[i % pattern.len()]` (a pattern as long as `len` is a
    /// plain write; the NPU's FILL passes one page of its pattern, which stays in cache) — if
    /// all of it can be written right now. Returns `true` when it was performed:
    /// then it is journaled as one `dma` write record of the whole range with `count` = the
    /// 4 KiB pages it touches, which is what the page-sized writes of the same bytes, issued
    /// back to back, are aggregated into (the checker sees the range once instead of page by
    /// page: the same addresses, state and PASID, so the same verdict).
    ///
    /// Returns `false` when nothing was done and nothing journaled: the gate refuses (link,
    /// reset, D3hot, Bus Master), an injected DMA error is armed, no client is attached, `len`
    /// or `pattern` is empty, or the range is not inside one mapping that is fd-backed and writable (a hole,
    /// a protection or a mapping boundary anywhere in it). The caller then writes page by page
    /// ([`Bus::dma_write_pasid`]), which refuses, faults and journals at the exact page. One
    /// exception, a client that truncates its file during the write: some bytes may have moved
    /// before the SIGBUS guard noticed; still nothing is journaled, and the page-by-page retry
    /// faults on the broken mapping.
    ///
    /// Like every access it counts in flight from before the gate check until the write is
    /// done, and holds the client's DMA map (read lock) while writing, so an unmap waits.
    pub fn try_dma_write_run(
        &self,
        pasid: Option<u32>,
        iova: u64,
        len: usize,
        pattern: &[u8],
    ) -> bool {
        if len == 0 || pattern.is_empty() {
            return false;
        }
        let _tx = self.transaction();
        if self.gate(false).is_err() || self.inner.dma_errors.load(Ordering::Acquire) != 0 {
            return false;
        }
        let client = self.client();
        let Some(link) = client.as_ref() else {
            return false;
        };
        // Journaled while the mappings are held: an unmap cannot be journaled in between.
        let r = link.dma.write_repeat_then(iova, len, pattern, |r| {
            let len = len as u64;
            if r.is_ok() {
                self.journal().record(Event::Dma {
                    dir: Dir::Write,
                    pasid,
                    iova,
                    len,
                    count: pages_touched(iova, len),
                    bytes: len,
                });
            }
        });
        if let Err(e) = r {
            log::trace!(
                "{}: write run {iova:#x}+{len:#x} not possible as one access ({e}); \
                 the pages go one by one",
                self.inner.name
            );
            return false;
        }
        true
    }

    /// Read client memory for the device's own *checking*, not as device DMA: not gated, not
    /// journaled, not counted in flight. The NPU's checking mode uses it to re-walk page tables
    /// on a translation-cache hit and compare; real hardware would not do this read, so it must
    /// not appear in the device's testimony.
    pub fn inspect(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let client = self.client();
        let link = client
            .as_ref()
            .ok_or(DmaFault::Refused(Refusal::NoClient))?;
        link.dma.read(iova, buf).map_err(|_| DmaFault::Unmapped {
            iova,
            len: buf.len() as u64,
        })
    }

    /// Raise MSI-X vector `vector` — or MSI vector `vector` for a function that has MSI and no
    /// MSI-X ([`Bus::raise_msi`]). An MSI-X message is a memory write: with Bus Master Enable
    /// clear, in D3hot, during a reset or with the link down the function sends nothing and
    /// keeps the vector pending (PBA).
    pub fn raise_msix(&self, vector: u16) -> MsixOutcome {
        if self.msix().is_none() && self.msi().is_some() {
            return self.raise_msi(vector);
        }
        // A message is a memory write: in flight from the gate check to its journal record.
        let _tx = self.transaction();
        // Lock order everywhere: client, then MSI/MSI-X state (see `deliver_pending_msix`).
        let client = self.client();
        let mut msix = self.msix();
        self.raise_vector(client.as_ref(), msix.as_mut(), vector)
    }

    /// Raise MSI vector `vector` (PCI 3.0 §6.8.3). Gated and journaled as MSI-X: an MSI message
    /// is a memory write, so with Bus Master Enable clear, in D3hot, during a reset or with the
    /// link down the function sends nothing and latches the vector pending; it is also latched
    /// while MSI is disabled, the vector masked or its eventfd not bound, and sent when that
    /// changes ([`Bus::deliver_pending_msix`]). Vectors beyond those allocated go out folded
    /// into the allocated ones (see [`crate::caps::msi`]); the journal has the vector raised.
    pub fn raise_msi(&self, vector: u16) -> MsixOutcome {
        let _tx = self.transaction();
        let client = self.client();
        let mut msi = self.msi();
        self.raise_vector(client.as_ref(), msi.as_mut(), vector)
    }

    /// The one place a message interrupt is raised: range check, the bus gate (refused →
    /// pending + journaled), delivery through the client's eventfd, journal record.
    fn raise_vector(
        &self,
        client: Option<&ClientLink>,
        state: Option<&mut impl Vectors>,
        vector: u16,
    ) -> MsixOutcome {
        let Some(m) = state else {
            return MsixOutcome::InvalidVector;
        };
        if vector >= m.vectors() {
            return MsixOutcome::InvalidVector;
        }
        let outcome = match self.may_master() {
            Err(reason) => {
                m.set_pending(vector, true);
                self.journal().record(Event::Interrupt {
                    vector,
                    outcome: InterruptOutcome::Refused(reason),
                });
                return MsixOutcome::Refused;
            }
            Ok(()) => m.raise(client.map(|l| &l.irqs), vector),
        };
        self.journal().record(Event::Interrupt {
            vector,
            outcome: journal_outcome(outcome),
        });
        outcome
    }

    /// Assert (`true`) or deassert the function's INTx line. INTx is level-triggered: Status
    /// .Interrupt follows the line; the message is sent when the line rises, and again each time
    /// the client unmasks the automasked interrupt while the line is still asserted (PCI Local
    /// Bus 3.0 §6.2.2; `VFIO_IRQ_INFO_AUTOMASKED`). INTx Emulation Disable, D3hot, a reset or a
    /// link down hold the message back; the line stays asserted. Bus Master Enable does not
    /// gate INTx (it is not a memory request).
    pub fn set_intx(&self, level: bool) {
        let was = self.inner.intx_level.swap(level, Ordering::AcqRel);
        if level && !was {
            self.service_intx();
        } else if !level && was {
            self.journal().record(Event::Note {
                text: "INTx deasserted".into(),
            });
        }
    }

    /// The INTx line is asserted (Status.Interrupt).
    pub fn intx_level(&self) -> bool {
        self.inner.intx_level.load(Ordering::Acquire)
    }

    /// Send the INTx message if the line is asserted and nothing holds it back (called on
    /// assertion, on unmask and when INTx Emulation Disable is cleared).
    pub fn service_intx(&self) {
        if !self.intx_level() {
            return;
        }
        let held = if !self.link_up() {
            Some(IntxHold::LinkDown)
        } else if self.resetting() {
            Some(IntxHold::Resetting)
        } else if self.power_state() == D3HOT {
            Some(IntxHold::D3hot)
        } else if self.command() & INTX_DISABLE != 0 {
            Some(IntxHold::IntxDisabled)
        } else {
            None
        };
        let outcome = match held {
            Some(why) => InterruptOutcome::IntxHeld(why),
            None => {
                let client = self.client();
                let r = client.as_ref().map(|l| {
                    l.irqs
                        .signal_automasked(pcisim_vfio_user::irq_index::INTX, 0)
                });
                match r {
                    Some(Ok(pcisim_vfio_user::Signal::Delivered)) => {
                        InterruptOutcome::IntxDelivered
                    }
                    Some(Ok(pcisim_vfio_user::Signal::Masked)) => InterruptOutcome::IntxMasked,
                    Some(Ok(pcisim_vfio_user::Signal::NotBound)) | None => {
                        InterruptOutcome::IntxUnbound
                    }
                    Some(Err(e)) => InterruptOutcome::IntxError(e.to_string()),
                }
            }
        };
        // "held" outcomes are the device obeying the rules; the checker only objects to
        // messages sent while disabled.
        self.journal()
            .record(Event::Interrupt { vector: 0, outcome });
    }

    /// Deliver pending MSI-X (and MSI) vectors whose eventfd is bound (after SET_IRQS, or after
    /// the function may master the bus again, or MSI was enabled or a vector unmasked). Returns
    /// how many were delivered.
    ///
    /// Each one is journaled as an `interrupt` record with outcome
    /// [`InterruptOutcome::DeliveredAfterHold`]
    /// (a message write like any other: the checker judges it against the state it is sent
    /// in), followed by a `pending_delivered` summary record (kind, count).
    pub fn deliver_pending_msix(&self) -> usize {
        // A message is a memory write: in flight from the gate check to its journal record.
        let _tx = self.transaction();
        if self.may_master().is_err() {
            return 0;
        }
        let client = self.client();
        let Some(link) = client.as_ref() else {
            return 0;
        };
        let mut total = 0;
        for (kind, sent) in [
            (
                MessageKind::Msix,
                self.msix().as_mut().map(|m| m.deliver_pending(&link.irqs)),
            ),
            (
                MessageKind::Msi,
                self.msi().as_mut().map(|m| m.deliver_pending(&link.irqs)),
            ),
        ] {
            let sent = sent.unwrap_or_default();
            for &vector in &sent {
                self.journal().record(Event::Interrupt {
                    vector,
                    outcome: InterruptOutcome::DeliveredAfterHold,
                });
            }
            if !sent.is_empty() {
                self.journal().record(Event::PendingDelivered {
                    kind,
                    count: sent.len() as u64,
                });
            }
            total += sent.len();
        }
        drop(client);
        total
    }

    /// The MSI-X state (locked).
    pub fn msix(&self) -> MutexGuard<'_, Option<MsixState>> {
        // MSI-X state stays consistent under a panic elsewhere (every update is a bit flip).
        self.inner
            .msix
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The MSI state (locked).
    pub fn msi(&self) -> MutexGuard<'_, Option<MsiState>> {
        self.inner
            .msi
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Endpoint side: MSI Message Control or Mask Bits changed.
    pub(crate) fn set_msi_control(&self, control: MsiControl) {
        if let Some(m) = self.msi().as_mut() {
            m.set_control(control);
        }
    }

    /// Endpoint side: the Command register changed.
    pub(crate) fn set_command(&self, v: u16) {
        self.inner.command.store(v, Ordering::Release);
    }

    /// Endpoint side: the power state changed.
    pub(crate) fn set_power(&self, state: u8) {
        self.inner.power.store(state, Ordering::Release);
    }

    /// Endpoint side: link up or down.
    pub(crate) fn set_link(&self, up: bool) {
        self.inner.link_up.store(up, Ordering::Release);
    }

    /// Endpoint side: a reset started or ended. A reset deasserts INTx.
    pub(crate) fn set_resetting(&self, on: bool) {
        self.inner.resetting.store(on, Ordering::Release);
        if on {
            self.inner.intx_level.store(false, Ordering::Release);
        }
    }

    /// Endpoint side: the next `n` DMA accesses fail.
    pub(crate) fn inject_dma_errors(&self, n: u32) {
        self.inner.dma_errors.store(n, Ordering::Release);
    }

    /// Endpoint side: the client attached (Some) or went away (None).
    pub(crate) fn set_client(&self, link: Option<ClientLink>) {
        *self
            .inner
            .client
            .write()
            .unwrap_or_else(PoisonError::into_inner) = link;
    }
}

enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// Page size of the requests a copy is journaled as (a PCIe memory request never crosses a
/// 4 KiB boundary).
const REQUEST_PAGE: u64 = 4096;

/// How many 4 KiB pages `iova..iova+len` touches (the requests it takes).
fn pages_touched(iova: u64, len: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    let first = iova / REQUEST_PAGE;
    let last = (u128::from(iova) + u128::from(len) - 1) / u128::from(REQUEST_PAGE);
    u64::try_from(last - u128::from(first) + 1).unwrap_or(u64::MAX)
}

/// The journal's outcome of a raised MSI or MSI-X vector that passed the bus gate. The MSI-X
/// and MSI states never refuse (the gate is the bus's); a `Refused` would mean the vector is
/// latched in the PBA, which is what `pending` records.
fn journal_outcome(o: MsixOutcome) -> InterruptOutcome {
    match o {
        MsixOutcome::Delivered => InterruptOutcome::Delivered,
        MsixOutcome::Pending | MsixOutcome::Refused => InterruptOutcome::Pending,
        MsixOutcome::InvalidVector => InterruptOutcome::Invalid,
    }
}

/// What raising a message interrupt needs from MSI-X or MSI state.
trait Vectors {
    fn vectors(&self) -> u16;
    fn set_pending(&mut self, vector: u16, on: bool);
    fn raise(&mut self, irqs: Option<&pcisim_vfio_user::Interrupts>, vector: u16) -> MsixOutcome;
}

impl Vectors for MsixState {
    fn vectors(&self) -> u16 {
        MsixState::vectors(self)
    }
    fn set_pending(&mut self, vector: u16, on: bool) {
        MsixState::set_pending(self, vector, on)
    }
    fn raise(&mut self, irqs: Option<&pcisim_vfio_user::Interrupts>, vector: u16) -> MsixOutcome {
        MsixState::raise(self, irqs, vector)
    }
}

impl Vectors for crate::caps::msi::MsiState {
    fn vectors(&self) -> u16 {
        crate::caps::msi::MsiState::vectors(self)
    }
    fn set_pending(&mut self, vector: u16, on: bool) {
        crate::caps::msi::MsiState::set_pending(self, vector, on)
    }
    fn raise(&mut self, irqs: Option<&pcisim_vfio_user::Interrupts>, vector: u16) -> MsixOutcome {
        crate::caps::msi::MsiState::raise(self, irqs, vector)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use pcisim_vfio_user::dma::{PROT_READ, PROT_WRITE};
    use pcisim_vfio_user::{DmaSpace, Interrupts};

    use super::*;

    const SRC: u64 = 0x10_0000;
    const DST: u64 = 0x20_0000;
    const SIZE: u64 = 0x4000;

    fn memfd(len: u64) -> OwnedFd {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        f.set_len(len).unwrap();
        OwnedFd::from(f)
    }

    /// A bus with Bus Master on and a client whose memory has `SRC` and `DST` mapped (the
    /// journal told so, as the endpoint would).
    fn bus() -> (Bus, DmaSpace) {
        let journal = Journal::new("bus-test", 1024);
        let bus = Bus::new("bus-test", journal.clone(), None);
        let dma = DmaSpace::new();
        journal.record(Event::ClientConnected);
        for iova in [SRC, DST] {
            dma.map(iova, SIZE, PROT_READ | PROT_WRITE, Some((memfd(SIZE), 0)))
                .unwrap();
            journal.record(Event::DmaMapped {
                iova,
                size: SIZE,
                backed: true,
                read: true,
                write: true,
            });
        }
        bus.set_client(Some(ClientLink {
            irqs: Interrupts::new(&[1, 0, 1, 1, 1]),
            dma: dma.clone(),
        }));
        journal.record(Event::Command {
            old: 0,
            new: BUS_MASTER,
        });
        bus.set_command(BUS_MASTER);
        (bus, dma)
    }

    fn dma_records(bus: &Bus) -> Vec<(Dir, u64, u64, u64)> {
        bus.journal()
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

    #[test]
    fn test_try_dma_copy_moves_bytes_journals_read_then_write_per_page_count() {
        let (bus, dma) = bus();
        let data: Vec<u8> = (0..0x2100u32).map(|i| (i % 251) as u8).collect();
        dma.write(SRC + 0x800, &data).unwrap();
        assert!(bus.try_dma_copy(SRC + 0x800, DST + 0xf00, data.len()));
        let mut back = vec![0u8; data.len()];
        dma.read(DST + 0xf00, &mut back).unwrap();
        assert_eq!(back, data);
        // 0x800..0x2900 touches pages 0..2 (3); 0xf00..0x3000 touches pages 0..2 (3).
        assert_eq!(
            dma_records(&bus),
            vec![
                (Dir::Read, SRC + 0x800, 0x2100, 3),
                (Dir::Write, DST + 0xf00, 0x2100, 3)
            ]
        );
        let st = bus.journal().stats();
        assert_eq!((st.dma_bytes, st.violations), (2 * 0x2100, 0));
        assert_eq!(bus.inflight(), 0);
    }

    #[test]
    fn test_try_dma_copy_refused_states_do_nothing_and_journal_nothing() {
        let (bus, dma) = bus();
        dma.write(SRC, &[7u8; 64]).unwrap();
        let before = bus.journal().last_seq();
        let untouched = |bus: &Bus| {
            let mut b = [0u8; 64];
            dma.read(DST, &mut b).unwrap();
            b == [0u8; 64] && bus.journal().last_seq() == before
        };
        bus.set_command(0);
        assert!(!bus.try_dma_copy(SRC, DST, 64) && untouched(&bus));
        bus.set_command(BUS_MASTER);
        bus.set_power(D3HOT);
        assert!(!bus.try_dma_copy(SRC, DST, 64) && untouched(&bus));
        bus.set_power(0);
        bus.set_link(false);
        assert!(!bus.try_dma_copy(SRC, DST, 64) && untouched(&bus));
        bus.set_link(true);
        bus.set_resetting(true);
        assert!(!bus.try_dma_copy(SRC, DST, 64) && untouched(&bus));
        bus.set_resetting(false);
        // An armed injected error is left for the access-by-access path to consume.
        bus.inject_dma_errors(1);
        assert!(!bus.try_dma_copy(SRC, DST, 64) && untouched(&bus));
        assert_eq!(
            bus.dma_read(SRC, &mut [0u8; 4]),
            Err(DmaFault::Refused(Refusal::InjectedError))
        );
        let before = bus.journal().last_seq();
        // Off the end of the destination mapping, overlapping ranges, zero length.
        assert!(!bus.try_dma_copy(SRC, DST + SIZE - 32, 64));
        assert!(!bus.try_dma_copy(SRC, SRC + 16, 64));
        assert!(!bus.try_dma_copy(SRC, DST, 0));
        assert_eq!(bus.journal().last_seq(), before);
        bus.set_client(None);
        assert!(!bus.try_dma_copy(SRC, DST, 64));
        assert_eq!(bus.journal().last_seq(), before);
        assert_eq!(bus.inflight(), 0);
        // Everything allowed again: the copy happens.
        bus.set_client(Some(ClientLink {
            irqs: Interrupts::new(&[1, 0, 1, 1, 1]),
            dma: dma.clone(),
        }));
        assert!(bus.try_dma_copy(SRC, DST, 64));
        let mut b = [0u8; 64];
        dma.read(DST, &mut b).unwrap();
        assert_eq!(b, [7u8; 64]);
    }

    #[test]
    fn test_try_dma_write_run_writes_once_journals_one_record_per_page_count() {
        let (bus, dma) = bus();
        // One page of pattern, repeated over three pages from the middle of one.
        let page: Vec<u8> = (0..0x1000u32).map(|i| (i % 251) as u8).collect();
        let data = page.repeat(3);
        assert!(bus.try_dma_write_run(Some(5), DST + 0x800, data.len(), &page));
        let mut back = vec![0u8; data.len()];
        dma.read(DST + 0x800, &mut back).unwrap();
        assert_eq!(back, data);
        // 0x800..0x3800 touches pages 0..3: what four page-sized writes fold into.
        assert_eq!(
            dma_records(&bus),
            vec![(Dir::Write, DST + 0x800, 0x3000, 4)]
        );
        let recs = bus.journal().since(0).0;
        assert!(recs.iter().any(|r| matches!(
            r.event,
            Event::Dma {
                pasid: Some(5),
                bytes: 0x3000,
                ..
            }
        )));
        let st = bus.journal().stats();
        assert_eq!(
            (st.dma_accesses, st.dma_bytes, st.violations),
            (4, 0x3000, 0)
        );
        assert_eq!(bus.inflight(), 0);
    }

    #[test]
    fn test_try_dma_write_run_anything_not_doable_in_full_does_nothing_journals_nothing() {
        let (bus, dma) = bus();
        // A read-only mapping right after DST: a run into it is a protection, one across the
        // boundary crosses mappings (both are mapped and backed).
        let ro = DST + SIZE;
        dma.map(ro, SIZE, PROT_READ, Some((memfd(SIZE), 0)))
            .unwrap();
        let data = [9u8; 0x2000];
        let before = bus.journal().last_seq();
        let untouched = |bus: &Bus, at: u64| {
            let mut b = vec![0u8; 0x1000];
            dma.read(at, &mut b).unwrap();
            b.iter().all(|&x| x == 0) && bus.journal().last_seq() == before
        };
        // Across the mapping boundary, into the read-only mapping, off the end of a mapping
        // into a hole, and empty.
        assert!(!bus.try_dma_write_run(None, ro - 0x1000, data.len(), &data));
        assert!(untouched(&bus, ro - 0x1000));
        assert!(!bus.try_dma_write_run(None, ro, data.len(), &data));
        assert!(!bus.try_dma_write_run(None, SRC + SIZE - 0x1000, data.len(), &data));
        assert!(untouched(&bus, SRC + SIZE - 0x1000));
        assert!(
            !bus.try_dma_write_run(None, DST, 0, &data)
                && !bus.try_dma_write_run(None, DST, 16, &[])
        );
        // Every state the gate refuses.
        bus.set_command(0);
        assert!(!bus.try_dma_write_run(None, DST, data.len(), &data) && untouched(&bus, DST));
        bus.set_command(BUS_MASTER);
        bus.set_power(D3HOT);
        assert!(!bus.try_dma_write_run(None, DST, data.len(), &data) && untouched(&bus, DST));
        bus.set_power(0);
        bus.set_link(false);
        assert!(!bus.try_dma_write_run(None, DST, data.len(), &data) && untouched(&bus, DST));
        bus.set_link(true);
        bus.set_resetting(true);
        assert!(!bus.try_dma_write_run(None, DST, data.len(), &data) && untouched(&bus, DST));
        bus.set_resetting(false);
        // An armed injected error is left for the page-by-page path to consume.
        bus.inject_dma_errors(1);
        assert!(!bus.try_dma_write_run(None, DST, data.len(), &data) && untouched(&bus, DST));
        assert_eq!(
            bus.dma_write(DST, &[1u8; 4]),
            Err(DmaFault::Refused(Refusal::InjectedError))
        );
        dma.write(DST, &[0u8; 4]).unwrap();
        let before = bus.journal().last_seq();
        bus.set_client(None);
        assert!(!bus.try_dma_write_run(None, DST, data.len(), &data));
        assert_eq!(bus.journal().last_seq(), before);
        assert_eq!(bus.inflight(), 0);
        // All allowed again: the same run is written (the instrument above can see one).
        bus.set_client(Some(ClientLink {
            irqs: Interrupts::new(&[1, 0, 1, 1, 1]),
            dma: dma.clone(),
        }));
        assert!(bus.try_dma_write_run(None, DST, data.len(), &data));
        let mut b = [0u8; 0x2000];
        dma.read(DST, &mut b).unwrap();
        assert_eq!(b, data);
        assert_eq!(bus.journal().last_seq(), before + 1);
    }

    #[test]
    fn test_pages_touched_counts_4k_pages() {
        assert_eq!(pages_touched(0, 0), 0);
        assert_eq!(pages_touched(0, 1), 1);
        assert_eq!(pages_touched(0, 4096), 1);
        assert_eq!(pages_touched(4095, 2), 2);
        assert_eq!(pages_touched(0x800, 0x10000), 17);
        assert_eq!(pages_touched(u64::MAX, 1), 1);
    }
}
