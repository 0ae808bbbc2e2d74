//! How a command or the ring fails: [`RingError`] (RING_ERROR code, faulting address, detail
//! for the journal), the RING_ERROR code ↔ journal code mapping, and the conversion of a bus
//! refusal or fault into the error the engine reports at the exact page.

use pcisim_journal::RingErrorCode;

use super::{err, DmaFailure};

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
    pub(super) fn new(code: u32, addr: u64, detail: impl Into<String>) -> RingError {
        RingError {
            code,
            addr,
            detail: detail.into(),
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

pub(super) fn dma_error(f: DmaFailure, dir: &str, at: u64, n: usize) -> RingError {
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

pub(super) fn with_detail(mut e: RingError, what: &str) -> RingError {
    e.detail = format!("{what}: {}", e.detail);
    e
}
