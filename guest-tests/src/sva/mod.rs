//! `sva`: M6/M7 — a process's own memory worked on by the NPU through the guest NPU driver
//! (guest-tests/kmod/npu_*.c, `/dev/pcisim-npuN`), and what happens to the binding when the
//! process exits, is killed, forks, passes its fd on or keeps the fd mmapped (M6), and when it
//! unmaps, protects or discards memory the device has cached translations for (M7).
//!
//! The driver's uapi is guest-tests/kmod/pcisim_npu_uapi.h; pcisim-abi's `npu::uapi` mirrors it
//! (its tests check the header against it). The
//! host checks the NPU's journal around each case (crates/lab/src/sva.rs); this program checks
//! what the process sees. `--lenient on` (the deliberately buggy driver variants) turns the
//! checks that a buggy driver is expected to break into diagnostics.

mod basic;
mod dev;
mod lifetime;
mod m7;
mod proc;
mod target;

use self::basic::case_basic;
use self::lifetime::case_lifetime;
use self::m7::case_m7;
use self::target::{Checks, Target};

use crate::ktap::Ktap;
use pcisim_guest_wire::{OnOff, SvaOptions};

// The subtests of each case, in the order they are reported (`Ktap::declared`: the plan is
// their count, and a result under another name fails the run).

/// `--case basic`.
const BASIC: &[&str] = &[
    "open binds the opener's mm: a PASID, bound, the device reaches physical memory",
    "FILL of 12 KiB at an unaligned VA of an mmap'd buffer",
    "MEMCPY of 20000 bytes from the heap (malloc) to an mmap'd buffer",
    "COMPARE: equal ranges OK, one flipped byte reported at its offset",
    "MEMCPY into untouched memory: translation faults serviced by the driver, data correct",
    "the status page (mmap of the device file) shows the binding and its counters",
    "a writable mapping of the status page is refused",
];

/// How the worker of a lifetime case ended.
const WORKER_ENDED: &str =
    "the worker was killed by SIGKILL with work in flight|the worker exited with work in flight";
/// No context left once nobody holds the file.
const NO_LEAK: &str =
    "every context is gone once no process holds the file (no leak through fork, SCM_RIGHTS or mmap)";
/// The kernel log says the PASID was unbound on mm release.
const UNBOUND_ON_RELEASE: &str = "the driver unbound (and drained) the PASID on mm release, before the address space was torn down";
/// The fd's holder (fork: the child, scm: the receiver) after the opener's exit.
const HOLDER_UNBOUND: &str =
    "after the opener's exit the * holds an unbound file: INFO not bound, SUBMIT EPERM";

/// `--case exit` and `--case kill`.
const EXIT_KILL: &[&str] = &[WORKER_ENDED, NO_LEAK, UNBOUND_ON_RELEASE];
/// `--case mmap`.
const MMAP: &[&str] = &[
    WORKER_ENDED,
    "with the fd closed, the status page mapping still shows the bound context",
    NO_LEAK,
    UNBOUND_ON_RELEASE,
];
/// `--case fork`.
const FORK: &[&str] = &[
    WORKER_ENDED,
    "a forked child cannot submit on the parent's binding (EPERM)",
    HOLDER_UNBOUND,
    NO_LEAK,
    UNBOUND_ON_RELEASE,
];
/// `--case scm`.
const SCM: &[&str] = &[WORKER_ENDED, HOLDER_UNBOUND, NO_LEAK, UNBOUND_ON_RELEASE];
/// `--case m7`.
const M7: &[&str] = &[
    "a copy caches the buffer's translations (data copied)",
    "after MADV_DONTNEED the device faults on the discarded pages and copies zeros (no stale page read)",
    "after munmap a copy from the range fails with a translation fault (EFAULT), nothing read",
    "after mprotect(PROT_READ) a device write faults (write to read-only) and the memory is unchanged",
    "copies racing MADV_DONTNEED of their source all complete (faults serviced, no error)",
];

pub fn run(o: SvaOptions) -> i32 {
    let (bdf, case) = (o.bdf.as_str(), o.case.as_str());
    let lenient = o.lenient.is_some_and(OnOff::is_on);
    let subtests = match case {
        "basic" => BASIC,
        "exit" | "kill" => EXIT_KILL,
        "mmap" => MMAP,
        "fork" => FORK,
        "scm" => SCM,
        "m7" => M7,
        other => {
            eprintln!("sva: unknown --case {other}");
            return 2;
        }
    };
    let mut k = Ktap::declared(subtests);
    let target = match Target::find(bdf) {
        Ok(t) => t,
        Err(e) => {
            k.diag(&e);
            return k.finish();
        }
    };
    let mut c = Checks { k: &mut k, lenient };
    let r = match case {
        "basic" => case_basic(&mut c, &target),
        "m7" => case_m7(&mut c, &target),
        how => case_lifetime(&mut c, &target, how),
    };
    if let Err(e) = r {
        k.diag(&format!("setup failed: {e}"));
    }
    k.finish()
}

#[cfg(test)]
mod tests;
