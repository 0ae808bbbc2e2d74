//! Where the device is, the streamed work a lifetime case queues, and how a case records
//! its checks.

use crate::ktap::{Ktap, Outcome};

use super::dev::{strerror, Npu, Region};
use super::dev::{Work, OP_COMPARE};

/// Where the device is: its sysfs directory and character device.
pub(super) struct Target {
    pub(super) sysfs: String,
    pub(super) dev: String,
}

impl Target {
    pub(super) fn find(bdf: &str) -> Result<Target, String> {
        let sysfs = format!("/sys/bus/pci/devices/{bdf}");
        let name = std::fs::read_to_string(format!("{sysfs}/pcisim_chardev"))
            .map_err(|e| format!("{sysfs}/pcisim_chardev: {e} (is pcisim_npu bound to {bdf}?)"))?;
        Ok(Target {
            sysfs,
            dev: format!("/dev/{}", name.trim()),
        })
    }

    /// Live contexts (open files) of the device.
    pub(super) fn contexts(&self) -> Result<u32, String> {
        let p = format!("{}/pcisim_contexts", self.sysfs);
        std::fs::read_to_string(&p)
            .map_err(|e| format!("{p}: {e}"))?
            .trim()
            .parse()
            .map_err(|e| format!("{p}: {e}"))
    }
}

/// Stream buffers: 64 KiB each (16 pages, well inside the ATC), so every item after the first
/// hits the ATC for pages it already walked.
pub(super) const STREAM_LEN: usize = 64 * 1024;
/// Items queued at once (the driver's SQ holds 63).
pub(super) const STREAM_ITEMS: usize = 32;

/// Queues STREAM_ITEMS compares of src with dst (equal contents: each runs its whole length)
/// without waiting; returns the tickets. Reads only: the deliberately buggy driver variants let
/// the device go on with translations of freed pages, and reads of those cannot corrupt the
/// guest.
pub(super) fn start_stream(npu: &Npu, src: &Region, dst: &Region) -> Result<Vec<u64>, String> {
    let mut tickets = Vec::new();
    for _ in 0..STREAM_ITEMS {
        let mut w = Work {
            op: OP_COMPARE,
            src: src.addr(),
            dst: dst.addr(),
            len: STREAM_LEN as u64,
            ..Work::default()
        };
        npu.submit(&mut w)
            .map_err(|e| format!("async SUBMIT: {}", strerror(e)))?;
        tickets.push(w.ticket);
    }
    Ok(tickets)
}

/// Buffers for a stream, touched by the CPU and kept out of children (MADV_DONTFORK, as
/// RDMA-style users do: a fork would otherwise make them copy-on-write under the device).
pub(super) fn stream_buffers() -> Result<(Region, Region), String> {
    let mut src = Region::new(STREAM_LEN)?;
    let mut dst = Region::new(STREAM_LEN)?;
    src.fill(0x3c);
    dst.fill(0x3c);
    src.madvise(libc::MADV_DONTFORK)?;
    dst.madvise(libc::MADV_DONTFORK)?;
    Ok((src, dst))
}

/// What a strict check becomes under `--lenient`: a diagnostic.
pub(super) struct Checks<'a> {
    pub(super) k: &'a mut Ktap,
    pub(super) lenient: bool,
}

impl Checks<'_> {
    pub(super) fn check(&mut self, name: &str, r: Result<(), String>) {
        self.k.check(name, r);
    }

    /// A check the deliberately buggy driver is expected to break.
    pub(super) fn strict(&mut self, name: &str, r: Result<(), String>) {
        match r {
            Err(e) if self.lenient => {
                self.k
                    .diag(&format!("{name}: {e} (expected with the buggy driver)"));
                self.k
                    .result(name, Outcome::Skip("lenient: buggy driver variant".into()));
            }
            r => {
                self.k.check(name, r);
            }
        }
    }
}

pub(super) fn expect(cond: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(why())
    }
}
