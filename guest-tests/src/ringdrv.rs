//! The driver side of the GPU command ring (docs/programming-model.md, "Command ring"):
//! the ring lives in a DMA buffer, commands are written at the driver's tail, and writing
//! RING_TAIL rings the doorbell. Used by E4 and E5.

use crate::gpu::{self, encode_cmd};
use crate::ktap::Ktap;
use crate::vdev::{read_reg, read_u64_reg, write_reg, DmaBuffer, Vfio};

/// A ring of `entries` commands in `buf` (at its IOVA).
#[derive(Debug)]
pub struct RingDrv {
    pub buf: DmaBuffer,
    pub entries: u32,
    /// The next slot the driver writes (not yet submitted past the last doorbell).
    pub tail: u32,
}

/// The ring registers, for diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingState {
    pub ctrl: u32,
    pub head: u32,
    pub tail: u32,
    pub status: u32,
    pub error: u32,
    pub fault_addr: u64,
    pub last_fence: u64,
    pub completed: u32,
}

impl std::fmt::Display for RingState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CTRL {} HEAD {} TAIL {} STATUS {} ERROR 0x{:08x} FAULT_ADDR 0x{:x} LAST_FENCE 0x{:x} COMPLETED {}",
            self.ctrl,
            self.head,
            self.tail,
            self.status,
            self.error,
            self.fault_addr,
            self.last_fence,
            self.completed
        )
    }
}

/// Reads the ring registers.
pub fn state(v: &Vfio) -> Result<RingState, String> {
    Ok(RingState {
        ctrl: read_reg(v, gpu::RING_CTRL)?,
        head: read_reg(v, gpu::RING_HEAD)?,
        tail: read_reg(v, gpu::RING_TAIL)?,
        status: read_reg(v, gpu::RING_STATUS)?,
        error: read_reg(v, gpu::RING_ERROR)?,
        fault_addr: read_u64_reg(v, gpu::RING_FAULT_ADDR_LO)?,
        last_fence: read_u64_reg(v, gpu::LAST_FENCE_LO)?,
        completed: read_reg(v, gpu::CMDS_COMPLETED)?,
    })
}

impl RingDrv {
    /// Programs the device: VERSION must be 1.1 or later; RING_CTRL.RESET, RING_BASE =
    /// `buf.iova`, RING_SIZE = `entries`, FENCE_VECTOR / ERROR_VECTOR, then ENABLE; checks
    /// every register reads back and the ring is idle at slot 0.
    pub fn setup(
        v: &Vfio,
        buf: DmaBuffer,
        entries: u32,
        fence_vector: u32,
        error_vector: u32,
        k: &mut Ktap,
    ) -> Result<RingDrv, String> {
        let version = read_reg(v, gpu::VERSION)?;
        if version < gpu::VERSION_1_1 {
            return Err(format!(
                "VERSION 0x{version:08x}: the device has no command ring (needs 0x{:08x})",
                gpu::VERSION_1_1
            ));
        }
        if u64::from(entries) * gpu::CMD_SIZE > buf.len() as u64 {
            return Err(format!(
                "{entries} entries do not fit a {}-byte buffer",
                buf.len()
            ));
        }
        write_reg(v, gpu::RING_CTRL, gpu::ctrl::RESET)?;
        write_reg(v, gpu::RING_BASE_LO, buf.iova as u32)?;
        write_reg(v, gpu::RING_BASE_HI, (buf.iova >> 32) as u32)?;
        write_reg(v, gpu::RING_SIZE, entries)?;
        write_reg(v, gpu::FENCE_VECTOR, fence_vector)?;
        write_reg(v, gpu::ERROR_VECTOR, error_vector)?;
        let base = read_u64_reg(v, gpu::RING_BASE_LO)?;
        let size = read_reg(v, gpu::RING_SIZE)?;
        let fv = read_reg(v, gpu::FENCE_VECTOR)?;
        let ev = read_reg(v, gpu::ERROR_VECTOR)?;
        if (base, size, fv, ev) != (buf.iova, entries, fence_vector, error_vector) {
            return Err(format!(
                "ring registers read back base 0x{base:x} size {size} vectors {fv}/{ev}, wrote 0x{:x} {entries} {fence_vector}/{error_vector}",
                buf.iova
            ));
        }
        write_reg(v, gpu::RING_CTRL, gpu::ctrl::ENABLE)?;
        let st = state(v)?;
        k.diag(&format!(
            "ring at IOVA 0x{:x}, {entries} entries: {st}",
            buf.iova
        ));
        if st.ctrl != gpu::ctrl::ENABLE
            || st.status != gpu::status::IDLE
            || st.head != 0
            || st.error != 0
        {
            return Err(format!("ring not idle and enabled after setup: {st}"));
        }
        Ok(RingDrv {
            buf,
            entries,
            tail: 0,
        })
    }

    /// Writes `cmd` at the driver's tail and advances it (no doorbell). Returns the slot.
    pub fn push(&mut self, cmd: [u8; 32]) -> Result<u32, String> {
        let slot = self.tail;
        self.buf
            .write((u64::from(slot) * gpu::CMD_SIZE) as usize, &cmd)?;
        self.tail = (self.tail + 1) % self.entries;
        Ok(slot)
    }

    /// Pushes `fills` FILL commands (each writes `pattern` over `len` bytes at `dst`), then a
    /// WRITE_FENCE of `fence_value` at `fence_iova` with FENCE_IRQ, so the fence and its
    /// interrupt say every fill before it is done. No doorbell: the caller rings it when it is
    /// ready to watch the job (E5, R2 and the vfio reset scenarios).
    pub fn push_fill_and_fence(
        &mut self,
        fills: usize,
        dst: u64,
        pattern: u32,
        len: u64,
        fence_iova: u64,
        fence_value: u64,
    ) -> Result<(), String> {
        for _ in 0..fills {
            self.push(encode_cmd(gpu::op::FILL, 0, dst, u64::from(pattern), len))?;
        }
        self.push(encode_cmd(
            gpu::op::WRITE_FENCE,
            gpu::flag::FENCE_IRQ,
            fence_iova,
            fence_value,
            0,
        ))?;
        Ok(())
    }

    /// Rings the doorbell: RING_TAIL = the driver's tail.
    pub fn doorbell(&self, v: &Vfio) -> Result<(), String> {
        write_reg(v, gpu::RING_TAIL, self.tail)
    }

    /// RING_CTRL = RESET | ENABLE: the ring restarts at slot 0 (base and size kept).
    pub fn reset(&mut self, v: &Vfio) -> Result<RingState, String> {
        write_reg(v, gpu::RING_CTRL, gpu::ctrl::RESET | gpu::ctrl::ENABLE)?;
        self.tail = 0;
        state(v)
    }
}
