//! The NPU driver's uapi (pcisim_npu_uapi.h) and its handles: the character device, a
//! region of our own memory, the status page mapping; the guest clock for `# t` lines.

use crate::sys;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub use pcisim_abi::npu::uapi::{
    Info, StatusPage, Work, INFO_BOUND, INFO_SVA, NO_FAULT_SERVICE, OP_COMPARE, OP_FILL, OP_MEMCPY,
    STATUS_MAGIC, ST_MISMATCH, ST_OK, ST_TRANSLATION_FAULT, WAIT,
};
use pcisim_abi::npu::uapi::{IOC_INFO, IOC_SUBMIT, IOC_WAIT};

/// CLOCK_MONOTONIC in nanoseconds: the guest's clock for the `# t <ns> <event>` lines a
/// timeline is drawn from (the lab aligns them with the device journal on the BIND).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Prints a process event for the timeline: `# t <ns> <event>`.
pub(super) fn stamp_at(ns: u64, event: &str) {
    println!("# t {ns} {event}");
}

pub(super) fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

pub(super) fn strerror(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

/// An open `/dev/pcisim-npuN`: one PASID binding of the opener's mm.
pub struct Npu {
    file: File,
}

impl Npu {
    pub fn open(path: &str) -> Result<Npu, String> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| format!("open {path}: {e}"))?;
        Ok(Npu { file })
    }

    pub(super) fn from_fd(fd: OwnedFd) -> Npu {
        Npu {
            file: File::from(fd),
        }
    }

    /// A second handle on an open descriptor owned elsewhere (an inherited copy, or the
    /// `Npu` of another thread that outlives this handle); it never closes the descriptor.
    pub(super) fn borrowed(fd: RawFd) -> std::mem::ManuallyDrop<Npu> {
        // SAFETY: `fd` is open for as long as the handle is used (the callers guarantee it),
        // and ManuallyDrop keeps the File from closing it.
        let file = unsafe { File::from_raw_fd(fd) };
        std::mem::ManuallyDrop::new(Npu { file })
    }

    pub(super) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// INFO, or the errno.
    pub fn info(&self) -> Result<Info, i32> {
        let mut info = Info::default();
        // SAFETY: INFO writes one `struct pcisim_npu_info` (mirrored by `Info`, same size as
        // encoded in the request) into the exclusively borrowed `info`.
        let r = unsafe { libc::ioctl(self.fd(), IOC_INFO as _, &mut info as *mut Info) };
        if r < 0 {
            Err(errno())
        } else {
            Ok(info)
        }
    }

    pub(super) fn work_ioctl(&self, req: u64, w: &mut Work) -> Result<(), i32> {
        // SAFETY: SUBMIT/WAIT read and write one `struct pcisim_npu_work` (mirrored by `Work`)
        // in the exclusively borrowed `w`; the VAs inside are only used by the device.
        let r = unsafe { libc::ioctl(self.fd(), req as _, w as *mut Work) };
        if r < 0 {
            Err(errno())
        } else {
            Ok(())
        }
    }

    /// SUBMIT; `w` gets the ticket (async) or the outcome (with [`WAIT`]).
    pub fn submit(&self, w: &mut Work) -> Result<(), i32> {
        self.work_ioctl(IOC_SUBMIT, w)
    }

    /// WAIT for `w.ticket`.
    pub fn wait(&self, w: &mut Work) -> Result<(), i32> {
        self.work_ioctl(IOC_WAIT, w)
    }

    /// Runs one operation and waits for it (faults serviced unless `flags` says otherwise).
    pub fn run(
        &self,
        op: u32,
        flags: u32,
        src: u64,
        dst: u64,
        len: u64,
    ) -> Result<Work, (i32, Work)> {
        let mut w = Work {
            op,
            flags: flags | WAIT,
            src,
            dst,
            len,
            ..Work::default()
        };
        match self.submit(&mut w) {
            Ok(()) => Ok(w),
            Err(e) => Err((e, w)),
        }
    }
}

/// An anonymous private mapping, unmapped on drop (unless unmapped already).
pub struct Region {
    ptr: *mut u8,
    len: usize,
    mapped: bool,
}

impl Region {
    pub fn new(len: usize) -> Result<Region, String> {
        Ok(Region {
            ptr: sys::mmap_anon(len)?,
            len,
            mapped: true,
        })
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// The contents (the region must be mapped and readable).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is our own readable mapping for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn fill(&mut self, v: u8) {
        // SAFETY: `ptr..ptr+len` is our own writable mapping; nothing else borrows it.
        unsafe { std::ptr::write_bytes(self.ptr, v, self.len) }
    }

    pub fn madvise(&self, advice: libc::c_int) -> Result<(), String> {
        // SAFETY: advice on our own mapping; the kernel validates the range.
        let r = unsafe { libc::madvise(self.ptr.cast(), self.len, advice) };
        if r < 0 {
            return Err(format!("madvise({advice}): {}", strerror(errno())));
        }
        Ok(())
    }

    pub fn protect(&self, prot: libc::c_int) -> Result<(), String> {
        // SAFETY: changes the protection of our own mapping only.
        let r = unsafe { libc::mprotect(self.ptr.cast(), self.len, prot) };
        if r < 0 {
            return Err(format!("mprotect: {}", strerror(errno())));
        }
        Ok(())
    }

    pub fn unmap(&mut self) -> Result<(), String> {
        if self.mapped {
            // SAFETY: our own mapping; no reference into it outlives this call (bytes()
            // borrows self).
            let r = unsafe { libc::munmap(self.ptr.cast(), self.len) };
            if r < 0 {
                return Err(format!("munmap: {}", strerror(errno())));
            }
            self.mapped = false;
        }
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        let _ = self.unmap();
    }
}

/// The status page of an open NPU file, mapped read-only.
pub struct StatusMap {
    ptr: *const StatusPage,
}

impl StatusMap {
    pub fn map(npu: &Npu) -> Result<StatusMap, String> {
        // SAFETY: a new shared read-only mapping of one page of the device file.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_SHARED,
                npu.fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap of the device file: {}", strerror(errno())));
        }
        Ok(StatusMap { ptr: p.cast() })
    }

    pub fn read(&self) -> StatusPage {
        // SAFETY: the page stays mapped while `self` lives; the driver updates it, so read
        // volatile.
        unsafe { std::ptr::read_volatile(self.ptr) }
    }
}

impl Drop for StatusMap {
    fn drop(&mut self) {
        // SAFETY: unmaps the page mapped in `map`.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, 4096) };
    }
}
