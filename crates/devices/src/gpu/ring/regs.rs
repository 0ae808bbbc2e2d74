//! The ring's registers as the device exposes them ([`RingRegs`]): base, size, head, tail,
//! vectors, status and error, with the decoding of RING_STATUS and RING_ERROR. Kept apart from
//! the engine so the register side reads them without the engine's thread machinery.

use super::{err, ring_error, status, DEFAULT_ERROR_VECTOR, DEFAULT_FENCE_VECTOR};

/// The ring registers (everything [`Engine::reset`](super::Engine::reset) restores).
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

    pub(super) fn runnable(&self) -> bool {
        self.enabled && self.error.is_none() && self.head != self.tail
    }

    pub(super) fn stop(&mut self, code: u32, slot: u32, addr: u64) {
        self.error = Some((code, slot));
        self.fault_addr = addr;
        self.errors = self.errors.wrapping_add(1);
    }
}
