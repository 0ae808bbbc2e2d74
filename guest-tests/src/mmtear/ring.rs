//! BAR0 register access (through the device fd or a mapping of BAR0) and the ring that keeps
//! the GPU streaming DMA into the buffer.

use crate::gpu;
use crate::sys;
use crate::vfio::{self, RegionInfo};
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use super::vfiofd::{Handles, Pages};
use super::{Layout, PAGE, PATTERN_BASE, PATTERN_MASK, RING_ENTRIES, STREAM_BATCH, STREAM_PACE};
use crate::sys::last_err as os_err;

/// 32-bit BAR0 register access, through the device fd or through a mapping of BAR0.
pub(super) trait Regs {
    fn rd(&self, off: u64) -> Result<u32, String>;
    fn wr(&self, off: u64, v: u32) -> Result<(), String>;
}

pub(super) struct FdRegs<'a> {
    pub(super) device: &'a File,
    pub(super) bar0: RegionInfo,
}

impl Handles {
    /// The device's registers through its fd (BAR0 region reads and writes).
    pub(super) fn regs(&self) -> FdRegs<'_> {
        FdRegs {
            device: &self.device,
            bar0: self.bar0,
        }
    }
}

impl Regs for FdRegs<'_> {
    fn rd(&self, off: u64) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.device
            .read_exact_at(&mut b, self.bar0.offset + off)
            .map_err(|e| format!("pread BAR0+0x{off:x}: {e}"))?;
        Ok(u32::from_le_bytes(b))
    }

    fn wr(&self, off: u64, v: u32) -> Result<(), String> {
        self.device
            .write_all_at(&v.to_le_bytes(), self.bar0.offset + off)
            .map_err(|e| format!("pwrite BAR0+0x{off:x}: {e}"))
    }
}

/// BAR0's first page mapped through the device fd (`mmap` of the vfio region). Never unmapped:
/// it lives until the process exits, which is what M5 is about.
pub(super) struct BarMap {
    pub(super) ptr: NonNull<u32>,
}

impl BarMap {
    pub(super) fn map(device: &File, bar0: &RegionInfo) -> Result<BarMap, String> {
        if bar0.flags & vfio::VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(format!(
                "BAR0 region flags 0x{:x}: not mmap-able",
                bar0.flags
            ));
        }
        let off = libc::off_t::try_from(bar0.offset).map_err(|_| "BAR0 offset too large")?;
        // SAFETY: a new shared mapping of the device fd's BAR0 region (addr NULL: no existing
        // memory is replaced); the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_err("mmap BAR0 through the device fd"));
        }
        let ptr = NonNull::new(p.cast::<u32>()).ok_or("mmap returned NULL")?;
        Ok(BarMap { ptr })
    }

    pub(super) fn index(off: u64) -> Result<usize, String> {
        if off % 4 != 0 || off >= PAGE as u64 {
            return Err(format!("register 0x{off:x} outside the mapped page"));
        }
        Ok((off / 4) as usize)
    }
}

impl Regs for BarMap {
    fn rd(&self, off: u64) -> Result<u32, String> {
        let i = BarMap::index(off)?;
        // SAFETY: an aligned 32-bit MMIO read inside the mapped page.
        Ok(u32::from_le(unsafe {
            self.ptr.as_ptr().add(i).read_volatile()
        }))
    }

    fn wr(&self, off: u64, v: u32) -> Result<(), String> {
        let i = BarMap::index(off)?;
        // SAFETY: an aligned 32-bit MMIO write inside the mapped page.
        unsafe { self.ptr.as_ptr().add(i).write_volatile(v.to_le()) };
        Ok(())
    }
}

pub(super) fn slot_pattern(slot: u32) -> u32 {
    PATTERN_BASE | slot
}

/// Writes a FILL of the whole buffer (slot's own pattern) into every slot and programs and
/// enables the ring.
pub(super) fn ring_setup(regs: &dyn Regs, ring: &Pages, layout: &Layout) -> Result<(), String> {
    let version = regs.rd(gpu::VERSION)?;
    if version < gpu::VERSION_1_1 {
        return Err(format!("VERSION 0x{version:08x}: no command ring"));
    }
    for slot in 0..RING_ENTRIES {
        let cmd = gpu::encode_cmd(
            gpu::op::FILL,
            0,
            layout.buf(),
            u64::from(slot_pattern(slot)),
            layout.buf_len as u64,
        );
        ring.write((u64::from(slot) * gpu::CMD_SIZE) as usize, &cmd)?;
    }
    regs.wr(gpu::RING_CTRL, gpu::ctrl::RESET)?;
    regs.wr(gpu::RING_BASE_LO, layout.ring() as u32)?;
    regs.wr(gpu::RING_BASE_HI, (layout.ring() >> 32) as u32)?;
    regs.wr(gpu::RING_SIZE, RING_ENTRIES)?;
    regs.wr(gpu::RING_CTRL, gpu::ctrl::ENABLE)?;
    let (ctrl, status, head) = (
        regs.rd(gpu::RING_CTRL)?,
        regs.rd(gpu::RING_STATUS)?,
        regs.rd(gpu::RING_HEAD)?,
    );
    if (ctrl, status, head) != (gpu::ctrl::ENABLE, gpu::status::IDLE, 0) {
        return Err(format!(
            "ring not enabled and idle at slot 0: CTRL {ctrl} STATUS {status} HEAD {head}"
        ));
    }
    Ok(())
}

/// The driver's side of the ring: its tail. Submitting is advancing RING_TAIL over slots whose
/// commands are already in place.
pub(super) struct Stream {
    pub(super) tail: u32,
}

impl Stream {
    /// Takes the ring over from its current RING_TAIL (another process streamed before).
    pub(super) fn resume(regs: &dyn Regs) -> Result<Stream, String> {
        let tail = regs.rd(gpu::RING_TAIL)?;
        if tail >= RING_ENTRIES {
            return Err(format!("RING_TAIL reads {tail}"));
        }
        Ok(Stream { tail })
    }

    /// Adds up to `want` commands (never more than the ring holds); returns the commands
    /// outstanding after the doorbell. A stopped ring is an error.
    pub(super) fn top_up(&mut self, regs: &dyn Regs, want: u32) -> Result<u32, String> {
        let status = regs.rd(gpu::RING_STATUS)?;
        if status == gpu::status::ERROR {
            let e = regs.rd(gpu::RING_ERROR)?;
            return Err(format!("the ring stopped: RING_ERROR 0x{e:08x}"));
        }
        let head = regs.rd(gpu::RING_HEAD)?;
        let outstanding = (self.tail + RING_ENTRIES - head) % RING_ENTRIES;
        let add = want.min(RING_ENTRIES - 1 - outstanding);
        if add > 0 {
            self.tail = (self.tail + add) % RING_ENTRIES;
            regs.wr(gpu::RING_TAIL, self.tail)?;
        }
        Ok(outstanding + add)
    }

    /// Fills the ring (127 FILLs of the whole buffer: hundreds of ms of work) and waits until
    /// the engine demonstrably works on it (RING_HEAD moved: a command of the burst completed,
    /// the next one runs). Returns the commands still outstanding then. The doorbell is a posted
    /// write: without the wait, a process killed right after it may go before the engine even
    /// fetched a command.
    pub(super) fn burst(&mut self, regs: &dyn Regs) -> Result<u32, String> {
        let head0 = regs.rd(gpu::RING_HEAD)?;
        self.top_up(regs, RING_ENTRIES)?;
        let t0 = Instant::now();
        loop {
            let head = regs.rd(gpu::RING_HEAD)?;
            let outstanding = (self.tail + RING_ENTRIES - head) % RING_ENTRIES;
            if head != head0 {
                return Ok(outstanding);
            }
            if regs.rd(gpu::RING_STATUS)? == gpu::status::ERROR {
                return Err("the ring stopped during the burst".into());
            }
            if t0.elapsed() > Duration::from_secs(5) {
                return Err(format!(
                    "the engine did not start the burst within 5 s (HEAD {head}, TAIL {})",
                    self.tail
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Streams (a small batch every tick) for `d`.
    pub(super) fn run_for(&mut self, regs: &dyn Regs, d: Duration) -> Result<(), String> {
        let t0 = Instant::now();
        while t0.elapsed() < d {
            self.top_up(regs, STREAM_BATCH)?;
            std::thread::sleep(STREAM_PACE);
        }
        Ok(())
    }

    /// Streams until a line containing `want` arrives on `input` (or `timeout` passes).
    pub(super) fn run_until(
        &mut self,
        regs: &dyn Regs,
        input: BorrowedFd<'_>,
        want: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let t0 = Instant::now();
        let mut got = Vec::new();
        loop {
            self.top_up(regs, STREAM_BATCH)?;
            let rev = sys::poll(&[(input.as_raw_fd(), libc::POLLIN)], Some(STREAM_PACE))?;
            if rev
                .first()
                .is_some_and(|r| r & (libc::POLLIN | libc::POLLHUP) != 0)
            {
                let mut b = [0u8; 256];
                let n = read_fd(input, &mut b)?;
                if n == 0 {
                    return Err(format!("input closed before {want:?}"));
                }
                got.extend_from_slice(&b[..n]);
                if String::from_utf8_lossy(&got).contains(want) {
                    return Ok(());
                }
            }
            if t0.elapsed() > timeout {
                return Err(format!("no {want:?} within {} s", timeout.as_secs()));
            }
        }
    }
}

pub(super) fn read_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, String> {
    // SAFETY: `buf` is a live, exclusively borrowed buffer of `buf.len()` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| os_err("read"))
}

pub(super) fn write_fd(fd: BorrowedFd<'_>, data: &[u8]) -> Result<(), String> {
    // SAFETY: `data` is a live buffer of `data.len()` bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    if usize::try_from(n) == Ok(data.len()) {
        Ok(())
    } else {
        Err(os_err("write"))
    }
}

/// Streams until CMDS_COMPLETED advanced by at least 4 and the buffer holds one of the
/// slots' patterns (the device's FILLs land in our memory). Returns the advance and the word.
pub(super) fn verify_streaming(
    regs: &dyn Regs,
    s: &mut Stream,
    buf: &Pages,
) -> Result<(u32, u32), String> {
    let c0 = regs.rd(gpu::CMDS_COMPLETED)?;
    let t0 = Instant::now();
    loop {
        s.top_up(regs, STREAM_BATCH)?;
        std::thread::sleep(STREAM_PACE);
        let advanced = regs.rd(gpu::CMDS_COMPLETED)?.wrapping_sub(c0);
        let word = buf.read_u32(0)?;
        let tail_word = buf.read_u32(buf.len - 4)?;
        if advanced >= 4 && word & PATTERN_MASK == PATTERN_BASE && tail_word == word {
            return Ok((advanced, word));
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "after 10 s: CMDS_COMPLETED advanced by {advanced}, buffer words 0x{word:08x} / 0x{tail_word:08x}"
            ));
        }
    }
}

// -- the worker processes ---------------------------------------------------------------------
