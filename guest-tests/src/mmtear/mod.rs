//! `mm-teardown`: M1–M5 — what the guest kernel does with a vfio user's device and DMA
//! mappings when the processes holding them go away (docs/mm-teardown.md).
//!
//! The program is a **supervisor** that binds the GPU to vfio-pci and starts worker processes
//! (`pcisim-guest mm-teardown-worker`, never run by hand). The **opener** opens the device
//! through the legacy vfio API (container with the type1v2 IOMMU behind the vIOMMU, group,
//! device), maps a ring page and a streamed buffer of its own memory (`VFIO_IOMMU_MAP_DMA`),
//! fills every ring slot with a FILL of the whole buffer and keeps the GPU streaming DMA into
//! it by advancing RING_TAIL (the ring's contents never change, so whoever holds the device fd
//! — or only a mapping of BAR0 — can keep the device working without touching the memory).
//! Then, by `--case`:
//!
//! - `exit` (M1): it queues a full ring and exits normally (`exit(0)`, no cleanup);
//! - `kill` (M2): it queues a full ring, keeps streaming, and the supervisor SIGKILLs it;
//! - `fork` (M3): it forks; the child inherits the fds and takes the ring over, the parent
//!   exits; the child keeps streaming, shows progress after the parent's exit (CMDS_COMPLETED
//!   through its inherited device fd), queues a full ring and exits;
//! - `pass` (M4): it sends the container, group and device fds over `SCM_RIGHTS` to a
//!   **receiver** (a second worker the supervisor started), which takes the ring over; the
//!   opener exits; the receiver shows progress, queues a full ring and exits;
//! - `bar-mmap` (M5): it mmaps BAR0's register page through the device fd, closes the
//!   device, group and container fds, keeps streaming through the mapping alone (progress read
//!   through it), queues a full ring and exits.
//!
//! The supervisor `waitpid`s each exit; after the last one it opens the group again (which
//! fails with EBUSY if anything still holds it) and maps a marker page. Workers report to the
//! supervisor with one line per event on their stdout (`<role> <event> key=value ...`).
//!
//! **Markers.** The host correlates the guest's steps with the device's journal through
//! `dma_mapped` records at marker IOVAs (a one-page `VFIO_IOMMU_MAP_DMA`: with `caching-mode=on`
//! QEMU forwards it synchronously, so it is journaled before the ioctl returns):
//! [`MARK_FIRST_EXIT`] just before the first process exits (or is killed, or closes its fds),
//! [`MARK_HOLDER`] by the remaining holder once the supervisor told it the first exit completed
//! (`waitpid` returned), [`MARK_WAITED`] by the supervisor after the last `waitpid` returned.
//!
//! Layout from `--iova BASE`: ring page at BASE, the buffer at BASE + 2 MiB (`--buf-kib`,
//! default 16384: 16 MiB, transparent huge pages), marker `n` at BASE + 128 MiB + n pages.

mod ring;
mod scenario;
mod supervisor;
mod vfiofd;
mod worker;

use self::scenario::drive;
use self::supervisor::{Procs, Reports, Steps, Super};
use self::worker::buf_len;
pub use self::worker::worker;
use crate::sys::last_err as os_err;

use crate::e1::setup_failure;
use crate::ktap::Ktap;
use crate::pci::{self};
use crate::vdev::{self, Binding};
use pcisim_guest_wire::{DeviceIds, MmTeardownOptions};
use std::time::Duration;

/// Default base of the IOVA layout.
pub const DEFAULT_IOVA: u64 = 0x5000_0000;
/// The ring page's offset from the base.
pub const RING_OFF: u64 = 0;
/// The streamed buffer's offset from the base.
pub const BUF_OFF: u64 = 0x20_0000;
/// The marker pages' offset from the base.
pub const MARK_OFF: u64 = 0x800_0000;
/// Marker: the first process is about to exit / be killed / close its fds.
pub const MARK_FIRST_EXIT: u64 = 0;
/// Marker: the remaining holder (M3 child, M4 receiver) learnt the first exit completed.
pub const MARK_HOLDER: u64 = 1;
/// Marker: the supervisor's last `waitpid` returned.
pub const MARK_WAITED: u64 = 2;

const PAGE: usize = 4096;
const DEFAULT_BUF_KIB: usize = 16 * 1024;
const RING_ENTRIES: u32 = 128;
/// FILL pattern of ring slot `i`: `PATTERN_BASE | i` ("MM" and the slot).
const PATTERN_BASE: u32 = 0x4D4D_0000;
const PATTERN_MASK: u32 = 0xFFFF_FF80;
/// Streaming: this many commands added per tick...
const STREAM_BATCH: u32 = 1;
/// ...every tick (a 16 MiB FILL takes the engine a few ms: the journal stays small and the
/// host is not flooded).
const STREAM_PACE: Duration = Duration::from_millis(20);
/// How long the opener streams before its case begins.
const STREAM_FIRST: Duration = Duration::from_millis(300);
/// How long a holder streams to show progress.
const HOLD: Duration = Duration::from_millis(400);
/// How long any one step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The five cases: the `--case` value (guest-wire's, shared with the lab).
use pcisim_guest_wire::MmCase as Case;

/// The KTAP tests the supervisor reports for `case`, in order.
fn tests(case: Case) -> &'static [&'static str] {
    match case {
        Case::Exit => &[
            "vfio-bind",
            "opener-streams",
            "exit-with-dma-running",
            "released-before-waitpid",
            "vfio-release",
        ],
        Case::Kill => &[
            "vfio-bind",
            "opener-streams",
            "sigkill-with-dma-running",
            "released-before-waitpid",
            "vfio-release",
        ],
        Case::Fork => &[
            "vfio-bind",
            "opener-streams",
            "child-takes-over",
            "parent-exits-device-kept",
            "dma-continues-for-child",
            "child-exits",
            "released-before-waitpid",
            "vfio-release",
        ],
        Case::Pass => &[
            "vfio-bind",
            "opener-streams",
            "fds-passed",
            "opener-exits-device-kept",
            "dma-continues-for-receiver",
            "receiver-exits",
            "released-before-waitpid",
            "vfio-release",
        ],
        Case::BarMmap => &[
            "vfio-bind",
            "opener-streams",
            "bar-mmap-outlives-fds",
            "dma-continues-through-mapping",
            "exit-with-mapping",
            "released-before-waitpid",
            "vfio-release",
        ],
    }
}

/// The IOVA layout.
#[derive(Debug, Clone, Copy)]
struct Layout {
    base: u64,
    buf_len: usize,
}

impl Layout {
    fn ring(&self) -> u64 {
        self.base + RING_OFF
    }

    fn buf(&self) -> u64 {
        self.base + BUF_OFF
    }

    fn mark(&self, n: u64) -> u64 {
        self.base + MARK_OFF + n * PAGE as u64
    }
}

/// `pcisim-guest mm-teardown --vendor V --device D --case C [--bdf BDF] [--iova A] [--buf-kib N]`
pub fn run(ids: DeviceIds, o: MmTeardownOptions) -> i32 {
    let prepared = (|| -> Result<_, String> {
        let case = o.case;
        let layout = Layout {
            base: o.iova.unwrap_or(DEFAULT_IOVA),
            buf_len: buf_len(o.buf_kib)?,
        };
        if layout.base % (2 << 20) != 0 {
            return Err(format!("--iova 0x{:x}: not 2 MiB aligned", layout.base));
        }
        let (func, note) = pci::select_function(ids.vendor, ids.device, o.bdf.as_deref())?;
        Ok((case, layout, func, note))
    })();
    let (case, layout, func, note) = match prepared {
        Ok(p) => p,
        Err(e) => return setup_failure(&e),
    };
    let names = tests(case);
    let mut steps = Steps {
        k: Ktap::new(names.len()),
        names,
        next: 0,
        failed: None,
    };
    steps.k.diag(&format!(
        "mm teardown ({}) on {}: ring 0x{:x}, buffer 0x{:x}+0x{:x}, markers at 0x{:x}",
        case.word(),
        func.bdf,
        layout.ring(),
        layout.buf(),
        layout.buf_len,
        layout.mark(0)
    ));
    if let Some(n) = note {
        steps.k.diag(&n);
    }
    // The M3 child is reparented to us when its parent exits, so that we can waitpid it.
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes integers only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } < 0 {
        steps.k.diag(&os_err("PR_SET_CHILD_SUBREAPER"));
    }
    let mut binding = Binding::default();
    let r = vdev::bind(&func, &mut binding, &mut steps.k);
    if steps.done("vfio-bind", r).is_ok() {
        let mut sup = Super {
            case,
            func: &func,
            group: binding.group.clone().unwrap_or_default(),
            layout,
            reports: Reports::new(),
            procs: Procs::default(),
        };
        if drive(&mut sup, &mut steps).is_err() {
            sup.procs.kill_all();
        }
    }
    steps.skip_rest_before("vfio-release");
    let r = vdev::release(&func, &binding, None, false);
    let _ = steps.done("vfio-release", r);
    steps.k.finish()
}

#[cfg(test)]
mod tests;
