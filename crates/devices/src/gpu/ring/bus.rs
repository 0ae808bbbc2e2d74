//! The engine's view of the bus: the [`EngineBus`] trait (transactions, DMA, MSI-X, journal)
//! with its implementation for the real [`pcisim_pci::Bus`], and [`DmaFailure`], the engine's
//! reading of the bus's answer. A trait so that the engine tests run over an in-memory image.

use pcisim_journal::Event;
use pcisim_pci::MsixOutcome;

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
    /// Read client memory at `iova` (never crosses a [`DMA_PAGE`](super::DMA_PAGE) boundary).
    fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFailure>;
    /// Write client memory at `iova` (never crosses a [`DMA_PAGE`](super::DMA_PAGE) boundary).
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
