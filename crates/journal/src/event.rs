//! The journal's vocabulary: [`Event`]s, the [`Record`] that stamps one, and the types their
//! fields use. The JSON form (`serde`) is the wire form of `pcisim ctl journal --json` and the
//! control socket: every name here is stable (docs/journal.md lists them).

use serde::{Deserialize, Serialize};

/// DMA direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dir {
    /// Device reads client memory.
    Read,
    /// Device writes client memory.
    Write,
}

/// Why the device refused to perform a DMA or raise an interrupt (hardware obeying the rules:
/// not a violation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// Command.Bus Master Enable is clear.
    BusMasterDisabled,
    /// The function is in D3hot.
    D3hot,
    /// The link is down (surprise removal modelled).
    LinkDown,
    /// A reset is in progress.
    Resetting,
    /// No client is attached.
    NoClient,
    /// An injected DMA error.
    InjectedError,
}

impl Refusal {
    /// The journal's name (as in `dma_refused.reason` and `refused:<reason>`).
    pub fn name(self) -> &'static str {
        match self {
            Refusal::BusMasterDisabled => "bus_master_disabled",
            Refusal::D3hot => "d3hot",
            Refusal::LinkDown => "link_down",
            Refusal::Resetting => "resetting",
            Refusal::NoClient => "no_client",
            Refusal::InjectedError => "injected_error",
        }
    }

    const ALL: [Refusal; 6] = [
        Refusal::BusMasterDisabled,
        Refusal::D3hot,
        Refusal::LinkDown,
        Refusal::Resetting,
        Refusal::NoClient,
        Refusal::InjectedError,
    ];
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a function is being reset (libvfio-user's taxonomy plus PM). Journaled as `flr`, `pm`,
/// `device` or `lost-connection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ResetKind {
    /// Function Level Reset: the guest set Device Control "Initiate FLR".
    #[serde(rename = "flr")]
    Flr,
    /// PM soft reset: PMCSR D3hot→D0 with No_Soft_Reset = 0.
    #[serde(rename = "pm")]
    PmSoftReset,
    /// DEVICE_RESET from the client (machine reset, secondary bus or slot reset).
    #[serde(rename = "device")]
    DeviceReset,
    /// The client went away; the device returns to its power-on state for the next one.
    #[serde(rename = "lost-connection")]
    LostConnection,
}

impl ResetKind {
    /// Every kind, in declaration order.
    pub const ALL: [ResetKind; 4] = [
        ResetKind::Flr,
        ResetKind::PmSoftReset,
        ResetKind::DeviceReset,
        ResetKind::LostConnection,
    ];

    /// The journal's name: `flr`, `pm`, `device` or `lost-connection`.
    pub fn name(self) -> &'static str {
        match self {
            ResetKind::Flr => "flr",
            ResetKind::PmSoftReset => "pm",
            ResetKind::DeviceReset => "device",
            ResetKind::LostConnection => "lost-connection",
        }
    }
}

impl std::fmt::Display for ResetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an asserted INTx line's message was held back (the line stays asserted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IntxHold {
    /// The link is down.
    LinkDown,
    /// A reset is in progress.
    Resetting,
    /// The function is in D3hot.
    D3hot,
    /// Command.Interrupt Disable is set.
    IntxDisabled,
}

impl IntxHold {
    /// The journal's name (`intx-held:<name>`).
    pub fn name(self) -> &'static str {
        match self {
            IntxHold::LinkDown => "link_down",
            IntxHold::Resetting => "resetting",
            IntxHold::D3hot => "d3hot",
            IntxHold::IntxDisabled => "intx_disabled",
        }
    }

    const ALL: [IntxHold; 4] = [
        IntxHold::LinkDown,
        IntxHold::Resetting,
        IntxHold::D3hot,
        IntxHold::IntxDisabled,
    ];
}

/// What became of a raised interrupt. Its JSON form is one string (the `outcome` field of an
/// `interrupt` record), e.g. `"delivered"`, `"refused:bus_master_disabled"`,
/// `"intx-held:d3hot"`; [`std::fmt::Display`] and [`std::str::FromStr`] convert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterruptOutcome {
    /// `delivered`: the MSI/MSI-X vector's eventfd was signalled.
    Delivered,
    /// `pending`: no eventfd bound or the vector masked; the pending bit is set.
    Pending,
    /// `refused:<reason>`: the function may not send messages now; the vector is held pending.
    Refused(Refusal),
    /// `delivered-after-hold`: a vector held back earlier (pending or refused) is sent now.
    DeliveredAfterHold,
    /// `invalid`: the vector number is not below the table size.
    Invalid,
    /// `intx-delivered`: the INTx message was sent.
    IntxDelivered,
    /// `intx-held:<why>`: the INTx message was held back.
    IntxHeld(IntxHold),
    /// `intx-masked`: the client masked INTx; the line stays asserted.
    IntxMasked,
    /// `intx-unbound`: no eventfd is bound to INTx (or no client).
    IntxUnbound,
    /// `intx-error:<error>`: signalling the eventfd failed.
    IntxError(String),
}

impl std::fmt::Display for InterruptOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InterruptOutcome::Delivered => f.write_str("delivered"),
            InterruptOutcome::Pending => f.write_str("pending"),
            InterruptOutcome::Refused(r) => write!(f, "refused:{}", r.name()),
            InterruptOutcome::DeliveredAfterHold => f.write_str("delivered-after-hold"),
            InterruptOutcome::Invalid => f.write_str("invalid"),
            InterruptOutcome::IntxDelivered => f.write_str("intx-delivered"),
            InterruptOutcome::IntxHeld(h) => write!(f, "intx-held:{}", h.name()),
            InterruptOutcome::IntxMasked => f.write_str("intx-masked"),
            InterruptOutcome::IntxUnbound => f.write_str("intx-unbound"),
            InterruptOutcome::IntxError(e) => write!(f, "intx-error:{e}"),
        }
    }
}

/// A string that is not an [`InterruptOutcome`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown interrupt outcome {0:?}")]
pub struct UnknownOutcome(pub String);

impl std::str::FromStr for InterruptOutcome {
    type Err = UnknownOutcome;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || UnknownOutcome(s.to_string());
        Ok(match s {
            "delivered" => InterruptOutcome::Delivered,
            "pending" => InterruptOutcome::Pending,
            "delivered-after-hold" => InterruptOutcome::DeliveredAfterHold,
            "invalid" => InterruptOutcome::Invalid,
            "intx-delivered" => InterruptOutcome::IntxDelivered,
            "intx-masked" => InterruptOutcome::IntxMasked,
            "intx-unbound" => InterruptOutcome::IntxUnbound,
            _ => {
                if let Some(r) = s.strip_prefix("refused:") {
                    let r = Refusal::ALL.into_iter().find(|x| x.name() == r);
                    InterruptOutcome::Refused(r.ok_or_else(unknown)?)
                } else if let Some(h) = s.strip_prefix("intx-held:") {
                    let h = IntxHold::ALL.into_iter().find(|x| x.name() == h);
                    InterruptOutcome::IntxHeld(h.ok_or_else(unknown)?)
                } else if let Some(e) = s.strip_prefix("intx-error:") {
                    InterruptOutcome::IntxError(e.to_string())
                } else {
                    return Err(unknown());
                }
            }
        })
    }
}

impl Serialize for InterruptOutcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for InterruptOutcome {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Kinds of invariant violation (design.md §5). Each is something real hardware with a correct
/// driver never does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// A DMA to an IOVA no DMA_MAP ever covered.
    DmaOutsideMap,
    /// A DMA to an IOVA whose mapping was removed (DMA_UNMAP acknowledged) and not mapped again.
    DmaAfterUnmap,
    /// A DMA performed while Bus Master Enable was clear.
    DmaWithoutBusMaster,
    /// A DMA performed in D3hot.
    DmaInD3hot,
    /// A DMA performed while the link was down.
    DmaLinkDown,
    /// A DMA performed between the start of a reset and re-enable (Bus Master set again).
    DmaDuringReset,
    /// An interrupt signalled while Bus Master Enable was clear, in D3hot or with the link down.
    InterruptWhileDisabled,
    /// An access through a PASID after its unbind was acknowledged.
    PasidAfterUnbind,
    /// A cached translation was used although the page tables no longer back it and no
    /// invalidation covered it before the binding ended, the address space being alive and
    /// the PASID not draining (a missed mmu-notifier invalidation); or any stale use after the
    /// unbind was acknowledged.
    StaleTranslation,
    /// A page-table walk for a PASID whose binding was released.
    WalkAfterRelease,
    /// A PASID was still bound (no unbind begun) when its address space was torn down: the
    /// driver did not end the binding on mm release (the mmu notifier's `release`), so the
    /// device kept translating through tables that no longer belong to a live mm.
    BindingOutlivedMm,
    /// A PASID's address space changed while its unbind was still draining (a cached
    /// translation went stale, or its tables were torn down): the mailbox takes no INVALIDATE
    /// during a drain, so the driver let the mm go before the drain was acknowledged.
    DrainNotAwaited,
    /// Not a device fault: the oracle lost sight of part of what follows (the checker's mapped
    /// set overflowed, PASID marks were forgotten, a drain of in-flight accesses timed out so
    /// the journal's order may be wrong). Recorded like a violation so that no window it
    /// affects can pass as clean.
    CheckerDegraded,
}

impl ViolationKind {
    /// Every kind, in declaration order.
    pub const ALL: [ViolationKind; 13] = [
        ViolationKind::DmaOutsideMap,
        ViolationKind::DmaAfterUnmap,
        ViolationKind::DmaWithoutBusMaster,
        ViolationKind::DmaInD3hot,
        ViolationKind::DmaLinkDown,
        ViolationKind::DmaDuringReset,
        ViolationKind::InterruptWhileDisabled,
        ViolationKind::PasidAfterUnbind,
        ViolationKind::StaleTranslation,
        ViolationKind::WalkAfterRelease,
        ViolationKind::BindingOutlivedMm,
        ViolationKind::DrainNotAwaited,
        ViolationKind::CheckerDegraded,
    ];

    /// The journal's name (`dma_after_unmap`).
    pub fn name(self) -> &'static str {
        match self {
            ViolationKind::DmaOutsideMap => "dma_outside_map",
            ViolationKind::DmaAfterUnmap => "dma_after_unmap",
            ViolationKind::DmaWithoutBusMaster => "dma_without_bus_master",
            ViolationKind::DmaInD3hot => "dma_in_d3hot",
            ViolationKind::DmaLinkDown => "dma_link_down",
            ViolationKind::DmaDuringReset => "dma_during_reset",
            ViolationKind::InterruptWhileDisabled => "interrupt_while_disabled",
            ViolationKind::PasidAfterUnbind => "pasid_after_unbind",
            ViolationKind::StaleTranslation => "stale_translation",
            ViolationKind::WalkAfterRelease => "walk_after_release",
            ViolationKind::BindingOutlivedMm => "binding_outlived_mm",
            ViolationKind::DrainNotAwaited => "drain_not_awaited",
            ViolationKind::CheckerDegraded => "checker_degraded",
        }
    }
}

impl std::fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A kind of message interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// MSI-X.
    Msix,
    /// MSI.
    Msi,
}

/// Why a command ring stopped (the GPU's RING_STATUS error codes, by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RingErrorCode {
    /// Unknown opcode.
    BadOpcode,
    /// A flag the opcode does not define is set.
    BadFlags,
    /// A reserved field or an operand the opcode does not use is not zero.
    Reserved,
    /// An operand is not aligned as the opcode requires.
    Alignment,
    /// A length above the engine's maximum.
    Length,
    /// A VRAM range outside VRAM.
    VramRange,
    /// An IOVA range that wraps past 2^64.
    IovaRange,
    /// A client access hit no mapped memory (or the mapping's protection forbids it).
    DmaFault,
    /// The bus refused the access: Bus Master Enable clear, D3hot, link down, reset, no client.
    DmaRefused,
    /// An MSI-X vector that does not exist.
    BadVector,
    /// RING_BASE not 4 KiB aligned or RING_SIZE not a power of two in range at enable.
    BadRing,
    /// RING_TAIL written with a value not below RING_SIZE.
    BadTail,
    /// A code this journal has no name for.
    Unknown,
}

impl RingErrorCode {
    /// The journal's name (`dma_refused`).
    pub fn name(self) -> &'static str {
        match self {
            RingErrorCode::BadOpcode => "bad_opcode",
            RingErrorCode::BadFlags => "bad_flags",
            RingErrorCode::Reserved => "reserved",
            RingErrorCode::Alignment => "alignment",
            RingErrorCode::Length => "length",
            RingErrorCode::VramRange => "vram_range",
            RingErrorCode::IovaRange => "iova_range",
            RingErrorCode::DmaFault => "dma_fault",
            RingErrorCode::DmaRefused => "dma_refused",
            RingErrorCode::BadVector => "bad_vector",
            RingErrorCode::BadRing => "bad_ring",
            RingErrorCode::BadTail => "bad_tail",
            RingErrorCode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for RingErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Something that happened to the function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A client attached (after VERSION).
    ClientConnected,
    /// The client went away.
    ClientDisconnected,
    /// A DMA_MAP was acknowledged.
    DmaMapped {
        /// First IOVA.
        iova: u64,
        /// Size.
        size: u64,
        /// Whether the server can reach it (the client passed an fd).
        backed: bool,
        /// The mapping permits device reads (DMA_MAP `VFIO_DMA_MAP_FLAG_READ`).
        read: bool,
        /// The mapping permits device writes (DMA_MAP `VFIO_DMA_MAP_FLAG_WRITE`).
        write: bool,
    },
    /// A DMA_UNMAP of this mapping was acknowledged (in-flight accesses had drained).
    DmaUnmapped {
        /// First IOVA.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// A reset began.
    ResetBegin {
        /// Which reset.
        kind: ResetKind,
    },
    /// A reset completed (the function may be re-enabled).
    ResetEnd {
        /// As in `ResetBegin`.
        kind: ResetKind,
    },
    /// The Command register changed.
    Command {
        /// Old value.
        old: u16,
        /// New value.
        new: u16,
    },
    /// PMCSR.PowerState changed (0 = D0, 3 = D3hot).
    Power {
        /// Old state.
        from: u8,
        /// New state.
        to: u8,
    },
    /// The link went down or came up (fault injection).
    Link {
        /// Link up.
        up: bool,
    },
    /// DMA performed (aggregated: `count` accesses, `bytes` in total, over `iova..iova+len`).
    Dma {
        /// Direction.
        dir: Dir,
        /// PASID, for PASID-tagged work.
        pasid: Option<u32>,
        /// First IOVA of the aggregated range.
        iova: u64,
        /// Length of the aggregated range.
        len: u64,
        /// Number of accesses aggregated here.
        count: u64,
        /// Bytes moved.
        bytes: u64,
    },
    /// The device did not perform a DMA because the rules forbade it.
    DmaRefused {
        /// Direction.
        dir: Dir,
        /// IOVA.
        iova: u64,
        /// Length.
        len: u64,
        /// Why.
        reason: Refusal,
    },
    /// A DMA attempt hit no mapped, fd-backed memory; nothing was touched.
    DmaFault {
        /// Direction.
        dir: Dir,
        /// PASID, for PASID-tagged work.
        pasid: Option<u32>,
        /// IOVA.
        iova: u64,
        /// Length.
        len: u64,
    },
    /// An interrupt was raised.
    Interrupt {
        /// MSI-X vector.
        vector: u16,
        /// What became of it (the checker objects only to signals sent while disabled).
        outcome: InterruptOutcome,
    },
    /// A PASID was bound to a page-table root.
    PasidBind {
        /// PASID.
        pasid: u32,
        /// Guest-physical address of the top-level page table.
        root: u64,
    },
    /// The driver asked to unbind a PASID; the device stops taking its work.
    PasidUnbindBegin {
        /// PASID.
        pasid: u32,
    },
    /// The PASID's work was finished or aborted.
    PasidDrained {
        /// PASID.
        pasid: u32,
        /// Work items aborted.
        aborted: u64,
    },
    /// The unbind was acknowledged to the driver: the PASID must not be used any more.
    PasidUnbindAck {
        /// PASID.
        pasid: u32,
    },
    /// The binding's address space was released (the mm is gone): no walk may follow.
    PasidReleased {
        /// PASID.
        pasid: u32,
    },
    /// The driver invalidated cached translations.
    Invalidate {
        /// PASID.
        pasid: u32,
        /// First virtual address.
        va: u64,
        /// Length (u64::MAX: everything).
        len: u64,
    },
    /// The device walked a PASID's page tables.
    PageWalk {
        /// PASID.
        pasid: u32,
        /// Virtual address translated.
        va: u64,
        /// Result: physical address, or None for a fault.
        pa: Option<u64>,
    },
    /// The device used a cached translation and, in checking mode, found the page tables no
    /// longer agree (the source decides; the checker turns it into a violation).
    StaleTranslationUsed {
        /// PASID.
        pasid: u32,
        /// Virtual address.
        va: u64,
        /// What the cache said.
        cached_pa: u64,
        /// What the page tables say now (None: not present).
        walked_pa: Option<u64>,
    },
    /// The device found, in checking mode, that a PASID's page tables map no user address any
    /// more (every entry of the lower half of its top-level table clear) while the PASID was
    /// still bound or draining: its address space was torn down (`exit_mmap` frees every table
    /// below the root) under the binding. Recorded once per binding, when a walk or re-walk
    /// fails at the top level and at UNBIND; the checker judges it.
    AddressSpaceEmpty {
        /// PASID.
        pasid: u32,
    },
    /// A translation fault was reported to the driver (PRI-like queue).
    TranslationFault {
        /// PASID.
        pasid: u32,
        /// Virtual address.
        va: u64,
        /// Write access.
        write: bool,
    },
    /// A fault was injected through the control socket.
    FaultInjected {
        /// The fault, as given.
        fault: String,
    },
    /// An FLR was initiated while the function had Transactions Pending (the driver did not
    /// wait for them): the writes already issued land after the `reset_begin` that follows.
    FlrWithTransactionsPending,
    /// Pending (held) message interrupts were sent: `count` vectors of `kind`, each with its
    /// own `interrupt` record (outcome `delivered-after-hold`) just before this summary.
    PendingDelivered {
        /// MSI-X or MSI.
        kind: MessageKind,
        /// Vectors sent.
        count: u64,
    },
    /// A command ring stopped on an error (the GPU: RING_STATUS.ERROR, the error interrupt
    /// follows).
    RingError {
        /// What went wrong.
        code: RingErrorCode,
        /// Ring slot of the command.
        slot: u32,
        /// Context (the address, the field).
        detail: String,
    },
    /// A reset aborted the ring command in flight.
    RingCommandAborted {
        /// Ring slot of the command.
        slot: u32,
        /// How far it got (`after 4096 bytes`, `at its end (65536 bytes)`, or the error it
        /// stopped on).
        detail: String,
    },
    /// Posted writes the engine had already issued when an FLR with Transactions Pending began
    /// landed after the reset began.
    PostedWritesLanded {
        /// First IOVA written.
        iova: u64,
        /// Bytes written.
        bytes: u64,
    },
    /// An informational device note nothing judges (e.g. "engine halted: bad descriptor",
    /// "INTx deasserted"). Anything a test or scenario asserts on is an event of its own.
    Note {
        /// Text.
        text: String,
    },
    /// An invariant was violated.
    Violation {
        /// Which invariant.
        kind: ViolationKind,
        /// Context: what was accessed, in which state.
        detail: String,
    },
}

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Sequence number, per device, from 1; gaps never occur (dropped records are counted).
    pub seq: u64,
    /// Monotonic nanoseconds since the journal was created.
    pub t_ns: u64,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
}

/// Counters that survive ring eviction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Records ever appended (including aggregated DMA updates as one each time a new record was
    /// started).
    pub records: u64,
    /// Records evicted from the ring.
    pub dropped: u64,
    /// DMA accesses performed.
    pub dma_accesses: u64,
    /// Bytes moved by DMA.
    pub dma_bytes: u64,
    /// DMA attempts refused by the device.
    pub dma_refused: u64,
    /// DMA attempts that found no memory.
    pub dma_faults: u64,
    /// `interrupt` records (any outcome; a vector held and sent later counts twice: when
    /// raised and when delivered after the hold).
    pub interrupts: u64,
    /// Resets begun.
    pub resets: u64,
    /// Violations found (`checker_degraded` records included).
    pub violations: u64,
    /// Of those, `checker_degraded` records: times the oracle lost sight of something.
    pub degraded: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(e: Event) -> String {
        serde_json::to_string(&Record {
            seq: 7,
            t_ns: 42,
            event: e,
        })
        .unwrap()
    }

    /// The JSON form is what `pcisim ctl journal --json` printed before the types were shared:
    /// the same names and the same strings, field for field.
    #[test]
    fn test_wire_form_is_stable() {
        let cases = [
            (
                Event::ResetBegin {
                    kind: ResetKind::Flr,
                },
                r#"{"seq":7,"t_ns":42,"type":"reset_begin","kind":"flr"}"#,
            ),
            (
                Event::ResetEnd {
                    kind: ResetKind::LostConnection,
                },
                r#"{"seq":7,"t_ns":42,"type":"reset_end","kind":"lost-connection"}"#,
            ),
            (
                Event::Interrupt {
                    vector: 3,
                    outcome: InterruptOutcome::Refused(Refusal::BusMasterDisabled),
                },
                r#"{"seq":7,"t_ns":42,"type":"interrupt","vector":3,"outcome":"refused:bus_master_disabled"}"#,
            ),
            (
                Event::Interrupt {
                    vector: 0,
                    outcome: InterruptOutcome::IntxHeld(IntxHold::IntxDisabled),
                },
                r#"{"seq":7,"t_ns":42,"type":"interrupt","vector":0,"outcome":"intx-held:intx_disabled"}"#,
            ),
            (
                Event::DmaRefused {
                    dir: Dir::Write,
                    iova: 16,
                    len: 4,
                    reason: Refusal::D3hot,
                },
                r#"{"seq":7,"t_ns":42,"type":"dma_refused","dir":"write","iova":16,"len":4,"reason":"d3hot"}"#,
            ),
            (
                Event::Violation {
                    kind: ViolationKind::CheckerDegraded,
                    detail: "x".into(),
                },
                r#"{"seq":7,"t_ns":42,"type":"violation","kind":"checker_degraded","detail":"x"}"#,
            ),
            (
                Event::AddressSpaceEmpty { pasid: 3 },
                r#"{"seq":7,"t_ns":42,"type":"address_space_empty","pasid":3}"#,
            ),
            (
                Event::Violation {
                    kind: ViolationKind::BindingOutlivedMm,
                    detail: "x".into(),
                },
                r#"{"seq":7,"t_ns":42,"type":"violation","kind":"binding_outlived_mm","detail":"x"}"#,
            ),
            (
                Event::Violation {
                    kind: ViolationKind::DrainNotAwaited,
                    detail: "x".into(),
                },
                r#"{"seq":7,"t_ns":42,"type":"violation","kind":"drain_not_awaited","detail":"x"}"#,
            ),
            (
                Event::Note { text: "hi".into() },
                r#"{"seq":7,"t_ns":42,"type":"note","text":"hi"}"#,
            ),
        ];
        for (event, json) in cases {
            assert_eq!(wire(event.clone()), json);
            let back: Record = serde_json::from_str(json).unwrap();
            assert_eq!(back.event, event, "{json}");
        }
    }

    /// Every outcome string reads back as the outcome it came from, and the names are the
    /// ones the bus journaled as text before.
    #[test]
    fn test_interrupt_outcome_round_trips() {
        let mut all = vec![
            InterruptOutcome::Delivered,
            InterruptOutcome::Pending,
            InterruptOutcome::DeliveredAfterHold,
            InterruptOutcome::Invalid,
            InterruptOutcome::IntxDelivered,
            InterruptOutcome::IntxMasked,
            InterruptOutcome::IntxUnbound,
            InterruptOutcome::IntxError("EBADF: bad fd".into()),
        ];
        all.extend(Refusal::ALL.map(InterruptOutcome::Refused));
        all.extend(IntxHold::ALL.map(InterruptOutcome::IntxHeld));
        let names: Vec<String> = all.iter().map(ToString::to_string).collect();
        for (o, s) in all.iter().zip(&names) {
            assert_eq!(&s.parse::<InterruptOutcome>().unwrap(), o, "{s}");
        }
        for s in [
            "delivered",
            "pending",
            "delivered-after-hold",
            "refused:link_down",
            "refused:injected_error",
            "intx-delivered",
            "intx-held:d3hot",
            "intx-unbound",
            "intx-error:EBADF: bad fd",
        ] {
            assert!(names.iter().any(|n| n == s), "{s} not produced");
        }
        // Unknown strings are errors, not a silent default.
        for bad in [
            "",
            "refused",
            "refused:bus-master-disabled",
            "intx-held:",
            "deliver",
        ] {
            assert!(bad.parse::<InterruptOutcome>().is_err(), "{bad:?}");
            let json =
                format!(r#"{{"seq":1,"t_ns":0,"type":"interrupt","vector":0,"outcome":"{bad}"}}"#);
            assert!(serde_json::from_str::<Record>(&json).is_err(), "{json}");
        }
    }

    /// The reset kinds' names, as `ResetKind::name`, `Display` and serde give them.
    #[test]
    fn test_reset_kind_names_agree() {
        for k in ResetKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
            assert_eq!(k.to_string(), k.name());
        }
        let names: Vec<&str> = ResetKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names, ["flr", "pm", "device", "lost-connection"]);
        for r in Refusal::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
        }
        for v in ViolationKind::ALL {
            assert_eq!(serde_json::to_value(v).unwrap(), v.name());
            assert_eq!(v.to_string(), v.name());
        }
    }
}
