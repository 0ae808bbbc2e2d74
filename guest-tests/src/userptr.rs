//! `userptr`: M8/M8b/M8d — the GPU's command ring fills a process's own memory through the guest
//! GPU driver (guest-tests/kmod/gpu_*.c, `/dev/pcisim-gpuN`), and the process takes the
//! memory away (munmap or MADV_DONTNEED) while the ring still writes.
//!
//! - `--mode tracked`: the driver watches the range with an mmu interval notifier; the unmap
//!   must wait for the ring's fence (the fence is signalled when munmap returns), and the
//!   userptr is invalidated (a new FILL gets EAGAIN).
//! - `--mode pinned`: the pages are pinned (FOLL_LONGTERM); the unmap returns at once, the ring
//!   keeps writing into the pinned pages, which stay pinned until RELEASE.
//!
//! `--lenient on` (the deliberately buggy driver) turns the checks the bug breaks into
//! diagnostics. Figures are printed as `# name value` diagnostics for the host
//! (crates/lab/src/scenarios/userptr.rs) and docs/userptr.md. The uapi is guest-tests/kmod/pcisim_gpu_uapi.h,
//! mirrored below.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::time::Instant;

use crate::ktap::{Ktap, Outcome};
use crate::sys;
use pcisim_guest_wire::{OnOff, UnmapCall, UserptrMode, UserptrOptions};

/// `struct pcisim_gpu_userptr`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Userptr {
    addr: u64,
    len: u64,
    flags: u32,
    nents: u32,
    iova: u64,
}

/// `struct pcisim_gpu_fill`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Fill {
    pattern: u32,
    repeat: u32,
    seqno: u64,
}

/// `struct pcisim_gpu_wait`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Wait {
    timeout_ms: u32,
    error: i32,
    signaled: u32,
    reserved: u32,
}

/// `struct pcisim_gpu_stats`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    invalidations: u64,
    invalidate_waits: u64,
    last_wait_ns: u64,
    max_wait_ns: u64,
    refused_nonblock: u64,
    pinned_pages: u64,
    fences_emitted: u64,
    fences_signaled: u64,
}

/// `PCISIM_GPU_USERPTR_PIN`.
const USERPTR_PIN: u32 = 1;

/// `_IOC(dir, 'G', nr, size)` as the kernel encodes it on x86.
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((b'G' as u64) << 8) | nr
}
const IOC_RW: u64 = 3;
const IOC_R: u64 = 2;
const IOC_USERPTR: u64 = ioc(IOC_RW, 1, std::mem::size_of::<Userptr>());
const IOC_FILL: u64 = ioc(IOC_RW, 2, std::mem::size_of::<Fill>());
const IOC_WAIT: u64 = ioc(IOC_RW, 3, std::mem::size_of::<Wait>());
const IOC_STATS: u64 = ioc(IOC_R, 4, std::mem::size_of::<Stats>());
const IOC_RELEASE: u64 = ioc(0, 5, 0);

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn strerror(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

/// An open `/dev/pcisim-gpuN`.
struct Gpu {
    file: File,
}

impl Gpu {
    fn open(bdf: &str) -> Result<Gpu, String> {
        let attr = format!("/sys/bus/pci/devices/{bdf}/pcisim_chardev");
        let name = std::fs::read_to_string(&attr)
            .map_err(|e| format!("{attr}: {e} (is pcisim_gpu bound to {bdf}?)"))?;
        let path = format!("/dev/{}", name.trim());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("open {path}: {e}"))?;
        Ok(Gpu { file })
    }

    /// One ioctl with a pointer argument (or none for a null `arg`).
    fn ioctl<T>(&self, req: u64, arg: *mut T) -> Result<(), i32> {
        // SAFETY: `req` encodes the size of `T`, the struct the driver reads and writes
        // (pcisim_gpu_uapi.h, mirrored above); `arg` is an exclusively borrowed `T` or null
        // for RELEASE, which takes no argument.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), req as _, arg) };
        if r < 0 {
            Err(errno())
        } else {
            Ok(())
        }
    }

    fn stats(&self) -> Result<Stats, String> {
        let mut s = Stats::default();
        self.ioctl(IOC_STATS, &mut s)
            .map_err(|e| format!("STATS: {}", strerror(e)))?;
        Ok(s)
    }

    fn wait(&self, timeout_ms: u32) -> Result<Wait, String> {
        let mut w = Wait {
            timeout_ms,
            ..Wait::default()
        };
        self.ioctl(IOC_WAIT, &mut w)
            .map_err(|e| format!("WAIT: {}", strerror(e)))?;
        Ok(w)
    }

    fn fill(&self, pattern: u32, repeat: u32) -> Result<u64, i32> {
        let mut f = Fill {
            pattern,
            repeat,
            seqno: 0,
        };
        self.ioctl(IOC_FILL, &mut f)?;
        Ok(f.seqno)
    }
}

/// Anonymous private memory, unmapped on drop unless already gone.
struct Mapping {
    ptr: *mut u8,
    len: usize,
    mapped: bool,
}

impl Mapping {
    fn new(len: usize) -> Result<Mapping, String> {
        let m = Mapping {
            ptr: sys::mmap_anon(len)?,
            len,
            mapped: true,
        };
        // Fault every page in (the driver takes the pages the process has).
        for off in (0..len).step_by(4096) {
            // SAFETY: `off` < len, inside the mapping just created, which is writable.
            unsafe { m.ptr.add(off).write_volatile(0) };
        }
        Ok(m)
    }

    fn munmap(&mut self) -> Result<(), String> {
        // SAFETY: unmaps exactly the mapping this value created; nothing reads it afterwards
        // (`mapped` is cleared).
        let r = unsafe { libc::munmap(self.ptr.cast(), self.len) };
        if r != 0 {
            return Err(format!("munmap: {}", strerror(errno())));
        }
        self.mapped = false;
        Ok(())
    }

    fn dontneed(&self) -> Result<(), String> {
        // SAFETY: discards the pages of this mapping only; it stays mapped (zero-filled).
        let r = unsafe { libc::madvise(self.ptr.cast(), self.len, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(format!("madvise(MADV_DONTNEED): {}", strerror(errno())));
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: as in `munmap`.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }
}

/// The subtests of `--mode tracked`, in order (`*` is the size, or the unmap call; the third
/// is `waited for` under `--lenient on`, a skip).
const TRACKED: &[&str] = &[
    "USERPTR * MiB tracked",
    "* returned only after the ring's fence|* waited for the ring's fence",
    "the userptr is invalidated: a new FILL gets EAGAIN",
    "the ring's fence signalled without error",
    "RELEASE: no page left pinned",
];

/// The subtests of `--mode pinned`, in order.
const PINNED: &[&str] = &[
    "USERPTR * MiB pinned",
    "* returned while the ring still writes (pinning does not stop it)",
    "all * pages stay pinned after *",
    "the ring's fence signalled without error",
    "RELEASE: no page left pinned",
];

/// `userptr --bdf BDF --mode tracked|pinned [--unmap munmap|dontneed] [--mib N] [--repeat N]
/// [--lenient on]`
pub fn run(o: UserptrOptions) -> i32 {
    let pinned = o.mode == UserptrMode::Pinned;
    let mut k = Ktap::declared(if pinned { PINNED } else { TRACKED });
    let code = match case(&o, &mut k) {
        Ok(()) => None,
        Err(e) => {
            k.diag(&format!("stopped: {e}"));
            Some(1)
        }
    };
    let c = k.finish();
    code.unwrap_or(c)
}

fn case(o: &UserptrOptions, k: &mut Ktap) -> Result<(), String> {
    let bdf = o.bdf.as_str();
    let pinned = o.mode == UserptrMode::Pinned;
    let dontneed = o.unmap == Some(UnmapCall::Dontneed);
    let lenient = o.lenient.is_some_and(OnOff::is_on);
    let len = (o.mib.unwrap_or(4) as usize) << 20;
    let repeat = o.repeat.unwrap_or(256);
    let pages = (len / 4096) as u64;

    let gpu = Gpu::open(bdf)?;
    let mut mem = Mapping::new(len)?;
    let mut up = Userptr {
        addr: mem.ptr as u64,
        len: len as u64,
        flags: if pinned { USERPTR_PIN } else { 0 },
        ..Userptr::default()
    };
    let r = gpu.ioctl(IOC_USERPTR, &mut up);
    k.check(
        &format!(
            "USERPTR {} MiB {}",
            len >> 20,
            if pinned { "pinned" } else { "tracked" }
        ),
        r.map_err(strerror),
    );
    k.diag(&format!("iova {:#x}", up.iova));
    k.diag(&format!("len {len}"));
    k.diag(&format!("nents {}", up.nents));
    let before = gpu.stats()?;

    let seqno = gpu
        .fill(0xa5a5_a5a5, repeat)
        .map_err(|e| format!("FILL: {}", strerror(e)))?;
    k.diag(&format!(
        "seqno {seqno}: {repeat} fills of the range queued"
    ));
    // Take the memory away while the ring writes.
    let t = Instant::now();
    if dontneed {
        mem.dontneed()?;
    } else {
        mem.munmap()?;
    }
    let unmap_us = t.elapsed().as_micros();
    let at_unmap = gpu.wait(0)?;
    let what = if dontneed { "MADV_DONTNEED" } else { "munmap" };
    k.diag(&format!("unmap_us {unmap_us}"));
    k.diag(&format!("signaled_at_unmap {}", at_unmap.signaled));
    let after_unmap = gpu.stats()?;
    if pinned {
        k.check(
            &format!("{what} returned while the ring still writes (pinning does not stop it)"),
            if at_unmap.signaled == 0 {
                Ok(())
            } else {
                Err(format!(
                    "the fence was already signalled after {unmap_us} us"
                ))
            },
        );
        k.diag(&format!("pinned_after_unmap {}", after_unmap.pinned_pages));
        k.check(
            &format!("all {pages} pages stay pinned after {what}"),
            if after_unmap.pinned_pages >= pages {
                Ok(())
            } else {
                Err(format!("{} pages pinned", after_unmap.pinned_pages))
            },
        );
    } else {
        let waited = after_unmap.invalidate_waits - before.invalidate_waits;
        k.diag(&format!(
            "invalidate_wait_us {}",
            after_unmap.last_wait_ns / 1000
        ));
        let r = if at_unmap.signaled == 1 && waited >= 1 {
            Ok(())
        } else {
            Err(format!(
                "fence signalled: {}, fence waits in invalidate: {waited}",
                at_unmap.signaled
            ))
        };
        if lenient {
            k.diag(&format!("(lenient) {what} waited for the fence: {r:?}"));
            k.result(
                &format!("{what} waited for the ring's fence"),
                Outcome::Skip("the buggy driver does not wait".into()),
            );
        } else {
            k.check(&format!("{what} returned only after the ring's fence"), r);
        }
        let again = gpu.fill(0x5a5a_5a5a, 1);
        k.check(
            "the userptr is invalidated: a new FILL gets EAGAIN",
            match again {
                Err(libc::EAGAIN) => Ok(()),
                Err(e) => Err(format!("FILL: {}", strerror(e))),
                Ok(s) => Err(format!("FILL queued fence {s}")),
            },
        );
    }
    let t_wait = Instant::now();
    let done = gpu.wait(60_000)?;
    let wait_ms = t_wait.elapsed().as_millis();
    k.diag(&format!(
        "fence after {wait_ms} ms more: signaled {} error {}",
        done.signaled, done.error
    ));
    let r = if done.signaled == 1 && done.error == 0 {
        Ok(())
    } else {
        Err(format!("signaled {} error {}", done.signaled, done.error))
    };
    if lenient {
        k.diag(&format!("(lenient) the ring completed its work: {r:?}"));
        k.result(
            "the ring's fence signalled without error",
            Outcome::Skip("the buggy driver's ring may stop on a DMA fault".into()),
        );
    } else {
        k.check("the ring's fence signalled without error", r);
    }
    if pinned {
        k.diag(&format!(
            "held_ms {} (pinned pages held after {what} until RELEASE)",
            t.elapsed().as_millis()
        ));
    }
    gpu.ioctl::<u8>(IOC_RELEASE, std::ptr::null_mut())
        .map_err(|e| format!("RELEASE: {}", strerror(e)))?;
    let end = gpu.stats()?;
    k.diag(&format!("pinned_after_release {}", end.pinned_pages));
    k.check(
        "RELEASE: no page left pinned",
        if end.pinned_pages == 0 {
            Ok(())
        } else {
            Err(format!("{} pages pinned", end.pinned_pages))
        },
    );
    k.diag(&format!(
        "stats: invalidations {} waits {} max_wait_us {} refused_nonblock {} fences {}/{}",
        end.invalidations,
        end.invalidate_waits,
        end.max_wait_ns / 1000,
        end.refused_nonblock,
        end.fences_signaled,
        end.fences_emitted
    ));
    drop(mem);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names `case` reports (as its format strings make them) are the declared ones, in
    /// order, for each mode and unmap call; the other mode's names are refused.
    #[test]
    fn reported_names_are_declared() {
        use crate::ktap::declared_name_matches as ok;
        for what in ["munmap", "MADV_DONTNEED"] {
            let tracked = [
                "USERPTR 4 MiB tracked".to_string(),
                format!("{what} returned only after the ring's fence"),
                "the userptr is invalidated: a new FILL gets EAGAIN".to_string(),
                "the ring's fence signalled without error".to_string(),
                "RELEASE: no page left pinned".to_string(),
            ];
            let pinned = [
                "USERPTR 4 MiB pinned".to_string(),
                format!("{what} returned while the ring still writes (pinning does not stop it)"),
                format!("all 1024 pages stay pinned after {what}"),
                "the ring's fence signalled without error".to_string(),
                "RELEASE: no page left pinned".to_string(),
            ];
            for (d, n) in TRACKED.iter().zip(&tracked) {
                assert!(ok(d, n), "{d:?} {n:?}");
            }
            for (d, n) in PINNED.iter().zip(&pinned) {
                assert!(ok(d, n), "{d:?} {n:?}");
            }
            assert!(ok(
                TRACKED[1],
                &format!("{what} waited for the ring's fence")
            ));
            assert!(!ok(TRACKED[0], &pinned[0]) && !ok(PINNED[2], &tracked[2]));
        }
    }

    #[test]
    fn test_ioctl_numbers_match_the_header() {
        // _IOWR('G', 1, 32 bytes), _IOWR('G', 2, 16), _IOWR('G', 3, 16), _IOR('G', 4, 64), _IO('G', 5)
        assert_eq!(IOC_USERPTR, 0xc020_4701);
        assert_eq!(IOC_FILL, 0xc010_4702);
        assert_eq!(IOC_WAIT, 0xc010_4703);
        assert_eq!(IOC_STATS, 0x8040_4704);
        assert_eq!(IOC_RELEASE, 0x4705);
    }
}
