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

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::ktap::{Ktap, Outcome};
use pcisim_guest_wire::{OnOff, SvaOptions};

// ---------------------------------------------------------------------------------------------
// The driver's uapi (pcisim_npu_uapi.h)
// ---------------------------------------------------------------------------------------------

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
fn stamp_at(ns: u64, event: &str) {
    println!("# t {ns} {event}");
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn strerror(e: i32) -> String {
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

    fn from_fd(fd: OwnedFd) -> Npu {
        Npu {
            file: File::from(fd),
        }
    }

    /// A second handle on an open descriptor owned elsewhere (an inherited copy, or the
    /// `Npu` of another thread that outlives this handle); it never closes the descriptor.
    fn borrowed(fd: RawFd) -> std::mem::ManuallyDrop<Npu> {
        // SAFETY: `fd` is open for as long as the handle is used (the callers guarantee it),
        // and ManuallyDrop keeps the File from closing it.
        let file = unsafe { File::from_raw_fd(fd) };
        std::mem::ManuallyDrop::new(Npu { file })
    }

    fn fd(&self) -> RawFd {
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

    fn work_ioctl(&self, req: u64, w: &mut Work) -> Result<(), i32> {
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
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap {len} bytes: {}", strerror(errno())));
        }
        Ok(Region {
            ptr: p.cast(),
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

// ---------------------------------------------------------------------------------------------
// Process plumbing
// ---------------------------------------------------------------------------------------------

/// A pipe for one line of text from a child.
fn pipe() -> Result<(File, File), String> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(format!("pipe: {}", strerror(errno())));
    }
    // SAFETY: both are new descriptors owned by nothing else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// Forks; the child runs `f` and `_exit`s with its code.
fn fork_run(f: impl FnOnce() -> i32) -> Result<libc::pid_t, String> {
    // SAFETY: this program is single-threaded when it forks (threads are only used inside
    // one step and joined); the child only runs `f` and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", strerror(errno())));
    }
    if pid == 0 {
        let code = f();
        // SAFETY: leaves the child without running the parent's atexit handlers twice.
        unsafe { libc::_exit(code) };
    }
    Ok(pid)
}

/// How a child ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Exited(i32),
    Signaled(i32),
}

fn waitpid(pid: libc::pid_t) -> Result<Ended, String> {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; `status` is written by the kernel.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && errno() != libc::EINTR {
            return Err(format!("waitpid {pid}: {}", strerror(errno())));
        }
    }
    if libc::WIFSIGNALED(status) {
        Ok(Ended::Signaled(libc::WTERMSIG(status)))
    } else {
        Ok(Ended::Exited(libc::WEXITSTATUS(status)))
    }
}

fn read_line(f: &mut File, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no answer within {timeout:?} (got {:?})",
                String::from_utf8_lossy(&out)
            ));
        }
        let ready = crate::sys::poll(&[(f.as_raw_fd(), libc::POLLIN)], Some(left))?;
        if ready.is_empty() {
            continue;
        }
        match f.read(&mut b) {
            Ok(0) => return Ok(String::from_utf8_lossy(&out).into_owned()),
            Ok(_) if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&out).into_owned()),
            Ok(_) => out.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Lines from children, which may arrive in any order: [`Lines::expect`] takes the first with
/// a given prefix and keeps the others for later.
struct Lines {
    file: File,
    stash: Vec<String>,
}

impl Lines {
    fn expect(&mut self, prefix: &str, timeout: Duration) -> Result<String, String> {
        if let Some(i) = self.stash.iter().position(|l| l.starts_with(prefix)) {
            return Ok(self.stash.remove(i));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = read_line(&mut self.file, left.max(Duration::from_millis(1)))?;
            if line.starts_with(prefix) {
                return Ok(line);
            }
            if line.starts_with("error ") {
                return Err(format!("worker: {line}"));
            }
            self.stash.push(line);
        }
    }
}

/// Writes one line with a single write (atomic on a pipe: several children share one).
fn say(f: &mut File, line: &str) {
    let _ = f.write_all(format!("{line}\n").as_bytes());
}

fn socketpair() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } < 0
    {
        return Err(format!("socketpair: {}", strerror(errno())));
    }
    // SAFETY: both are new descriptors owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Kernel log lines (from /dev/kmsg) printed since the program started reading.
struct Kmsg {
    file: File,
}

impl Kmsg {
    /// Opens /dev/kmsg positioned at the end of the log.
    fn open() -> Result<Kmsg, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .map_err(|e| format!("/dev/kmsg: {e}"))?;
        // SAFETY: lseek on our own descriptor.
        unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
        Ok(Kmsg { file })
    }

    /// The messages logged since the last call.
    fn drain(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    if let Some((_, msg)) = rec.split_once(';') {
                        out.push(msg.lines().next().unwrap_or("").to_string());
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------

/// Where the device is: its sysfs directory and character device.
struct Target {
    sysfs: String,
    dev: String,
}

impl Target {
    fn find(bdf: &str) -> Result<Target, String> {
        let sysfs = format!("/sys/bus/pci/devices/{bdf}");
        let name = std::fs::read_to_string(format!("{sysfs}/pcisim_chardev"))
            .map_err(|e| format!("{sysfs}/pcisim_chardev: {e} (is pcisim_npu bound to {bdf}?)"))?;
        Ok(Target {
            sysfs,
            dev: format!("/dev/{}", name.trim()),
        })
    }

    /// Live contexts (open files) of the device.
    fn contexts(&self) -> Result<u32, String> {
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
const STREAM_LEN: usize = 64 * 1024;
/// Items queued at once (the driver's SQ holds 63).
const STREAM_ITEMS: usize = 32;

/// Queues STREAM_ITEMS compares of src with dst (equal contents: each runs its whole length)
/// without waiting; returns the tickets. Reads only: the deliberately buggy driver variants let
/// the device go on with translations of freed pages, and reads of those cannot corrupt the
/// guest.
fn start_stream(npu: &Npu, src: &Region, dst: &Region) -> Result<Vec<u64>, String> {
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
fn stream_buffers() -> Result<(Region, Region), String> {
    let mut src = Region::new(STREAM_LEN)?;
    let mut dst = Region::new(STREAM_LEN)?;
    src.fill(0x3c);
    dst.fill(0x3c);
    src.madvise(libc::MADV_DONTFORK)?;
    dst.madvise(libc::MADV_DONTFORK)?;
    Ok((src, dst))
}

/// What a strict check becomes under `--lenient`: a diagnostic.
struct Checks<'a> {
    k: &'a mut Ktap,
    lenient: bool,
}

impl Checks<'_> {
    fn check(&mut self, name: &str, r: Result<(), String>) {
        self.k.check(name, r);
    }

    /// A check the deliberately buggy driver is expected to break.
    fn strict(&mut self, name: &str, r: Result<(), String>) {
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

fn expect(cond: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(why())
    }
}

/// M6 basic: bind, work on heap and mmap'd memory, faults serviced, the status page.
fn case_basic(c: &mut Checks<'_>, t: &Target) -> Result<(), String> {
    let npu = Npu::open(&t.dev)?;
    let info = npu.info().map_err(|e| format!("INFO: {}", strerror(e)))?;
    println!("# pasid {}", info.pasid);
    c.k.diag(&format!(
        "pasid {} root {:#x} flags {:#x}",
        info.pasid, info.root, info.flags
    ));
    c.check(
        "open binds the opener's mm: a PASID, bound, the device reaches physical memory",
        expect(
            info.pasid > 0
                && info.flags & INFO_BOUND != 0
                && info.flags & INFO_SVA != 0
                && info.owner_pid == std::process::id(),
            || format!("{info:?}"),
        ),
    );

    // FILL into mmap'd memory, MEMCPY from the heap, COMPARE.
    let mut a = Region::new(3 * 4096 + 512)?;
    a.fill(0);
    let r = npu.run(OP_FILL, 0, 0x0807_0605_0403_0201, a.addr() + 100, 3 * 4096);
    c.check(
        "FILL of 12 KiB at an unaligned VA of an mmap'd buffer",
        match r {
            Ok(w) if w.status == ST_OK && w.result == 3 * 4096 => {
                let b = a.bytes();
                let bad = (0..3 * 4096).find(|&i| b[100 + i] != (i % 8) as u8 + 1);
                expect(
                    bad.is_none() && b[99] == 0 && b[100 + 3 * 4096] == 0,
                    || format!("byte {bad:?} wrong (or the neighbours were touched)"),
                )
            }
            Ok(w) => Err(format!("status {} result {}", w.status, w.result)),
            Err((e, _)) => Err(strerror(e)),
        },
    );
    let heap: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut b = Region::new(20_000)?;
    b.fill(0xff);
    let r = npu.run(
        OP_MEMCPY,
        0,
        heap.as_ptr() as u64,
        b.addr(),
        heap.len() as u64,
    );
    c.check(
        "MEMCPY of 20000 bytes from the heap (malloc) to an mmap'd buffer",
        match r {
            Ok(w) if w.status == ST_OK => {
                expect(b.bytes() == heap.as_slice(), || "the copy differs".into())
            }
            Ok(w) => Err(format!("status {} result {}", w.status, w.result)),
            Err((e, _)) => Err(strerror(e)),
        },
    );
    let eq = npu.run(
        OP_COMPARE,
        0,
        heap.as_ptr() as u64,
        b.addr(),
        heap.len() as u64,
    );
    let mut heap2 = heap.clone();
    heap2[12_345] ^= 0x40;
    let ne = npu.run(
        OP_COMPARE,
        0,
        heap2.as_ptr() as u64,
        b.addr(),
        heap.len() as u64,
    );
    c.check(
        "COMPARE: equal ranges OK, one flipped byte reported at its offset",
        match (eq, ne) {
            (Ok(e), Ok(n)) => expect(
                e.status == ST_OK && n.status == ST_MISMATCH && n.result == 12_345,
                || {
                    format!(
                        "equal: status {}; different: status {} offset {}",
                        e.status, n.status, n.result
                    )
                },
            ),
            (Err((e, _)), _) | (_, Err((e, _))) => Err(strerror(e)),
        },
    );

    // Memory the process never touched: the device faults, the driver faults the pages in.
    let fresh = Region::new(8 * 4096)?;
    let source: Vec<u8> = (0..8 * 4096u32).map(|i| (i * 13 % 241) as u8).collect();
    let r = npu.run(OP_MEMCPY, 0, source.as_ptr() as u64, fresh.addr(), 8 * 4096);
    if let Ok(w) = &r {
        c.k.diag(&format!(
            "{} fault(s) serviced for 8 untouched pages",
            w.faults
        ));
    }
    c.check(
        "MEMCPY into untouched memory: translation faults serviced by the driver, data correct",
        match r {
            Ok(w) if w.status == ST_OK => {
                expect(w.faults >= 1 && fresh.bytes() == source.as_slice(), || {
                    format!(
                        "{} faults, data equal: {}",
                        w.faults,
                        fresh.bytes() == source.as_slice()
                    )
                })
            }
            Ok(w) => Err(format!(
                "status {} result {} faults {}",
                w.status, w.result, w.faults
            )),
            Err((e, w)) => Err(format!("{} (fault va {:#x})", strerror(e), w.fault_va)),
        },
    );

    let st = StatusMap::map(&npu)?;
    let s = st.read();
    c.check(
        "the status page (mmap of the device file) shows the binding and its counters",
        expect(
            s.magic == STATUS_MAGIC
                && s.pasid == info.pasid
                && s.bound == 1
                && s.submitted >= 5
                && s.faults >= 1,
            || format!("{s:?}"),
        ),
    );
    // SAFETY: mmap with PROT_WRITE of the device file must be refused; nothing is mapped on
    // failure, and a success is unmapped at once.
    let w = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            npu.fd(),
            0,
        )
    };
    let refused = w == libc::MAP_FAILED;
    if !refused {
        // SAFETY: unmaps the mapping just made.
        unsafe { libc::munmap(w, 4096) };
    }
    c.check(
        "a writable mapping of the status page is refused",
        expect(refused, || "mapped".into()),
    );
    Ok(())
}

/// A worker's report: `started <pasid>`.
/// A worker's report: `started <pasid> <t_open> <t_bound> <t_queued>`.
fn parse_started(line: &str) -> Result<(u32, [u64; 3]), String> {
    let bad = || format!("worker said {line:?}");
    let mut w = line
        .strip_prefix("started ")
        .ok_or_else(bad)?
        .split_whitespace();
    let pasid = w.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let mut t = [0u64; 3];
    for v in &mut t {
        *v = w.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    }
    Ok((pasid, t))
}

/// The lifetime cases: a worker binds, queues work, and leaves in one of several ways.
fn case_lifetime(c: &mut Checks<'_>, t: &Target, how: &str) -> Result<(), String> {
    let mut kmsg = Kmsg::open()?;
    let before = t.contexts()?;
    let (rd, wr) = pipe()?;
    let (go_rd, mut go_wr) = pipe()?;
    let (sock_a, sock_b) = socketpair()?;
    let dev = t.dev.clone();

    // The receiver of a passed fd (scm), started before the opener.
    let receiver = if how == "scm" {
        let mut wr2 = wr.try_clone().map_err(|e| e.to_string())?;
        let sock = sock_b.as_fd();
        let mut go = go_rd.try_clone().map_err(|e| e.to_string())?;
        Some(fork_run(move || {
            let fd = match crate::sys::recv_fds(sock, 1, Duration::from_secs(60)).and_then(|v| {
                v.into_iter()
                    .next()
                    .ok_or_else(|| "no fd received".to_string())
            }) {
                Ok(fd) => fd,
                Err(e) => {
                    say(&mut wr2, &format!("receiver: {e}"));
                    return 1;
                }
            };
            let npu = Npu::from_fd(fd);
            let _ = read_line(&mut go, Duration::from_secs(60));
            report_foreign(&npu, &mut wr2, "receiver");
            0
        })?)
    } else {
        None
    };

    let start = Instant::now();
    let sock = sock_a.as_fd();
    let mut wr_w = wr.try_clone().map_err(|e| e.to_string())?;
    let go_w = go_rd.try_clone().map_err(|e| e.to_string())?;
    let how_w = how.to_string();
    let worker = fork_run(move || {
        let r = (|| -> Result<i32, String> {
            let t_open = now_ns();
            let npu = Npu::open(&dev)?;
            let t_bound = now_ns();
            let info = npu.info().map_err(strerror)?;
            let (src, dst) = stream_buffers()?;
            let status = if how_w == "mmap" {
                Some(StatusMap::map(&npu)?)
            } else {
                None
            };
            let tickets = start_stream(&npu, &src, &dst)?;
            // The buffers stay mapped until the address space dies (exit_mmap), not unmapped
            // on the way out: the binding must end before that teardown.
            std::mem::forget(src);
            std::mem::forget(dst);
            match how_w.as_str() {
                "fork" => {
                    let mut wr3 = wr_w.try_clone().map_err(|e| e.to_string())?;
                    let mut go = go_w.try_clone().map_err(|e| e.to_string())?;
                    let npu_fd = npu.fd();
                    fork_run(move || {
                        let npu = Npu::borrowed(npu_fd);
                        let mut w = Work {
                            op: OP_FILL,
                            flags: WAIT,
                            src: 1,
                            dst: 0x1000,
                            len: 8,
                            ..Work::default()
                        };
                        let e = npu.submit(&mut w).err().unwrap_or(0);
                        say(&mut wr3, &format!("child-submit {e}"));
                        let _ = read_line(&mut go, Duration::from_secs(60));
                        report_foreign(&npu, &mut wr3, "child");
                        0
                    })?;
                    // fork() flushed the whole mm from the device's ATC (dup_mmap's TLB
                    // flush reaches the notifier): let the device cache the buffers again
                    // (an item takes ~10 ms) so that the exit races translations in use.
                    std::thread::sleep(Duration::from_millis(40));
                }
                "scm" => crate::sys::send_fds(sock, &[npu.fd()])?,
                _ => {}
            }
            let t_queued = now_ns();
            say(
                &mut wr_w,
                &format!("started {} {t_open} {t_bound} {t_queued}", info.pasid),
            );
            match how_w.as_str() {
                "kill" => {
                    // Block in WAIT on the last item until the parent kills us.
                    let mut w = Work {
                        ticket: tickets[tickets.len() - 1],
                        ..Work::default()
                    };
                    let _ = npu.wait(&mut w);
                    Ok(3)
                }
                "mmap" => {
                    drop(npu); // the mapping keeps the file open
                    let s = status.as_ref().map(StatusMap::read).unwrap_or_default();
                    say(
                        &mut wr_w,
                        &format!(
                            "status {} {} {} {}",
                            s.magic == STATUS_MAGIC,
                            s.pasid,
                            s.bound,
                            s.submitted
                        ),
                    );
                    Ok(0)
                }
                _ => Ok(0),
            }
        })();
        match r {
            Ok(code) => code,
            Err(e) => {
                say(&mut wr_w, &format!("error {e}"));
                1
            }
        }
    })?;
    drop(sock_a);
    drop(sock_b);
    drop(go_rd);

    let mut lines = Lines {
        file: rd,
        stash: Vec::new(),
    };
    let line = lines.expect("started ", Duration::from_secs(30))?;
    let (pasid, [t_open, t_bound, t_queued]) = parse_started(&line)?;
    stamp_at(
        t_open,
        &format!("worker {worker}: open /dev/pcisim-npu (bind)"),
    );
    stamp_at(
        t_bound,
        &format!("worker {worker}: open returned, pasid {pasid} bound"),
    );
    stamp_at(
        t_queued,
        &format!("worker {worker}: {STREAM_ITEMS} compares queued"),
    );
    println!("# pasid {pasid}");
    c.k.diag(&format!(
        "worker {worker} bound pasid {pasid} and queued {STREAM_ITEMS} compares of {} KiB",
        STREAM_LEN / 1024
    ));
    let mut mmap_status = None;
    if how == "mmap" {
        mmap_status = Some(lines.expect("status ", Duration::from_secs(30))?);
    }
    if how == "kill" {
        std::thread::sleep(Duration::from_millis(50));
        stamp_at(now_ns(), &format!("SIGKILL sent to worker {worker}"));
        // SAFETY: signals our own child.
        unsafe { libc::kill(worker, libc::SIGKILL) };
    }
    let ended = waitpid(worker)?;
    stamp_at(now_ns(), &format!("worker {worker} reaped ({ended:?})"));
    let exit_ms = start.elapsed().as_secs_f64() * 1000.0;
    c.k.diag(&format!(
        "worker ended ({ended:?}) {exit_ms:.1} ms after it started"
    ));
    println!("# exit_done pasid {pasid}");
    let want = if how == "kill" {
        Ended::Signaled(libc::SIGKILL)
    } else {
        Ended::Exited(0)
    };
    c.check(
        &format!(
            "the worker {}",
            if how == "kill" {
                "was killed by SIGKILL with work in flight"
            } else {
                "exited with work in flight"
            }
        ),
        expect(ended == want, || format!("{ended:?}")),
    );
    if let Some(s) = mmap_status {
        c.check(
            "with the fd closed, the status page mapping still shows the bound context",
            expect(s == format!("status true {pasid} 1 {STREAM_ITEMS}"), || {
                s.clone()
            }),
        );
    }

    // The process that still holds the fd (fork: the child, scm: the receiver).
    if how == "fork" {
        let l = lines.expect("child-submit ", Duration::from_secs(30))?;
        c.check(
            "a forked child cannot submit on the parent's binding (EPERM)",
            expect(l == format!("child-submit {}", libc::EPERM), || l.clone()),
        );
    }
    let holder = match how {
        "fork" | "scm" => {
            // Give the device time on its own before the holder acts (and, with a driver that
            // keeps the binding past the opener's exit, before the holder's close unbinds).
            std::thread::sleep(Duration::from_millis(100));
            let _ = go_wr.write_all(b"go\n");
            let who = if how == "fork" { "child " } else { "receiver " };
            let line = lines.expect(who, Duration::from_secs(30))?;
            c.strict(
                &format!("after the opener's exit the {} holds an unbound file: INFO not bound, SUBMIT EPERM", if how == "fork" { "child" } else { "receiver" }),
                expect(line.ends_with(&format!("bound=0 submit={}", libc::EPERM)), || line.clone()),
            );
            true
        }
        _ => false,
    };
    drop(go_wr);
    if let Some(pid) = receiver {
        waitpid(pid)?;
        stamp_at(now_ns(), &format!("receiver {pid} reaped"));
    }
    if holder {
        // The fork case's grandchild was reparented; wait for the count to settle.
        let deadline = Instant::now() + Duration::from_secs(10);
        while t.contexts()? > before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let after = t.contexts()?;
    stamp_at(now_ns(), &format!("{after} context(s) left on the device"));
    c.check(
        NO_LEAK,
        expect(after == before, || {
            format!("{before} context(s) before, {after} after")
        }),
    );
    let logs = kmsg.drain();
    let unbound: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains(&format!("pasid {pasid} unbound on")))
        .collect();
    for l in &unbound {
        c.k.diag(&format!("kernel: {l}"));
    }
    c.strict(
        UNBOUND_ON_RELEASE,
        expect(
            unbound.iter().any(|l| l.contains("unbound on mm release")),
            || {
                format!(
                    "kernel log: {:?}",
                    logs.iter()
                        .filter(|l| l.contains(&format!("pasid {pasid}")))
                        .collect::<Vec<_>>()
                )
            },
        ),
    );
    Ok(())
}

/// What a process holding someone else's binding sees: `<who> bound=B submit=ERRNO`.
fn report_foreign(npu: &Npu, out: &mut File, who: &str) {
    let bound = npu
        .info()
        .map(|i| u32::from(i.flags & INFO_BOUND != 0))
        .unwrap_or(9);
    let mut w = Work {
        op: OP_FILL,
        flags: WAIT,
        src: 1,
        dst: 0x1000,
        len: 8,
        ..Work::default()
    };
    let e = npu.submit(&mut w).err().unwrap_or(0);
    say(out, &format!("{who} bound={bound} submit={e}"));
}

const M7_LEN: usize = 16 * 4096;

/// M7: the CPU changes the page tables under the device; invalidations must come first.
fn case_m7(c: &mut Checks<'_>, t: &Target) -> Result<(), String> {
    let npu = Npu::open(&t.dev)?;
    let info = npu.info().map_err(strerror)?;
    println!("# pasid {}", info.pasid);

    // MADV_DONTNEED: the pages go; the device must not read the old ones.
    let mut b = Region::new(M7_LEN)?;
    let mut cbuf = Region::new(M7_LEN)?;
    b.fill(0xa5);
    cbuf.fill(0);
    let first = npu.run(OP_MEMCPY, 0, b.addr(), cbuf.addr(), M7_LEN as u64);
    c.check(
        "a copy caches the buffer's translations (data copied)",
        match first {
            Ok(w) if w.status == ST_OK => expect(cbuf.bytes().iter().all(|&x| x == 0xa5), || {
                "wrong data".into()
            }),
            Ok(w) => Err(format!("status {}", w.status)),
            Err((e, _)) => Err(strerror(e)),
        },
    );
    b.madvise(libc::MADV_DONTNEED)?;
    let second = npu.run(OP_MEMCPY, 0, b.addr(), cbuf.addr(), M7_LEN as u64);
    if let Ok(w) = &second {
        c.k.diag(&format!(
            "{} fault(s) serviced after MADV_DONTNEED",
            w.faults
        ));
    }
    c.strict(
        "after MADV_DONTNEED the device faults on the discarded pages and copies zeros (no stale page read)",
        match second {
            Ok(w) if w.status == ST_OK => {
                let zeros = cbuf.bytes().iter().all(|&x| x == 0);
                expect(zeros && w.faults >= 1, || format!("{} faults, destination all zeros: {zeros}", w.faults))
            }
            Ok(w) => Err(format!("status {}", w.status)),
            Err((e, _)) => Err(strerror(e)),
        },
    );

    // munmap: the device must fault, not read the freed pages.
    let mut d = Region::new(M7_LEN)?;
    d.fill(0x77);
    let _ = npu.run(OP_MEMCPY, 0, d.addr(), cbuf.addr(), M7_LEN as u64);
    let gone = d.addr();
    d.unmap()?;
    let r = npu.run(OP_MEMCPY, 0, gone, cbuf.addr(), M7_LEN as u64);
    c.strict(
        "after munmap a copy from the range fails with a translation fault (EFAULT), nothing read",
        match r {
            Err((libc::EFAULT, w)) if w.status == ST_TRANSLATION_FAULT => expect(
                w.fault_va >= gone && w.fault_va < gone + M7_LEN as u64,
                || format!("fault va {:#x} outside the range", w.fault_va),
            ),
            Err((e, w)) => Err(format!("{} status {}", strerror(e), w.status)),
            Ok(w) => Err(format!(
                "succeeded (status {}, {} bytes): read through a stale translation",
                w.status, w.result
            )),
        },
    );

    // mprotect(PROT_READ): the device's cached write permission must go.
    let mut e = Region::new(M7_LEN)?;
    e.fill(0x11);
    let _ = npu.run(OP_FILL, 0, 0x2222_2222_2222_2222, e.addr(), M7_LEN as u64);
    e.protect(libc::PROT_READ)?;
    let r = npu.run(
        OP_FILL,
        NO_FAULT_SERVICE,
        0x3333_3333_3333_3333,
        e.addr(),
        M7_LEN as u64,
    );
    let untouched = e.bytes().iter().all(|&x| x == 0x22);
    c.strict(
        "after mprotect(PROT_READ) a device write faults (write to read-only) and the memory is unchanged",
        match r {
            Err((libc::EFAULT, w)) if w.status == ST_TRANSLATION_FAULT => expect(untouched, || "memory changed".into()),
            Err((e, w)) => Err(format!("{} status {}", strerror(e), w.status)),
            Ok(w) => Err(format!("the write succeeded (status {}), memory unchanged: {untouched}", w.status)),
        },
    );

    // Concurrent: copies from a range while the CPU discards it repeatedly.
    let mut f = Region::new(4 * M7_LEN)?;
    let g = Region::new(4 * M7_LEN)?;
    f.fill(0x5a);
    let (fa, ga) = (f.addr(), g.addr());
    let npu_fd = npu.fd();
    let copier = std::thread::spawn(move || {
        let n = Npu::borrowed(npu_fd);
        let mut res = Vec::new();
        for _ in 0..12 {
            res.push(
                n.run(OP_MEMCPY, 0, fa, ga, 4 * M7_LEN as u64)
                    .map(|w| (w.status, w.faults))
                    .map_err(|(e, _)| e),
            );
        }
        res
    });
    for _ in 0..12 {
        f.madvise(libc::MADV_DONTNEED)?;
        std::thread::sleep(Duration::from_millis(15));
    }
    let res = copier
        .join()
        .map_err(|_| "the copier thread panicked".to_string())?;
    let faults: u32 = res.iter().filter_map(|r| r.ok()).map(|(_, f)| f).sum();
    c.k.diag(&format!(
        "12 copies raced 12 MADV_DONTNEEDs: {faults} fault(s) serviced"
    ));
    c.check(
        "copies racing MADV_DONTNEED of their source all complete (faults serviced, no error)",
        expect(res.iter().all(|r| matches!(r, Ok((ST_OK, _)))), || {
            format!("{res:?}")
        }),
    );
    drop(g);
    drop(npu);
    Ok(())
}

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
mod tests {
    use super::*;
    use crate::ktap::declared_name_matches;

    /// The names a lifetime case builds at run time are the ones its declaration allows.
    #[test]
    fn test_declared_patterns_allow_the_built_names() {
        for name in [
            "the worker was killed by SIGKILL with work in flight",
            "the worker exited with work in flight",
        ] {
            assert!(declared_name_matches(WORKER_ENDED, name), "{name}");
        }
        assert!(!declared_name_matches(WORKER_ENDED, "the worker hung"));
        for who in ["child", "receiver"] {
            let name = format!(
                "after the opener's exit the {who} holds an unbound file: INFO not bound, SUBMIT EPERM"
            );
            assert!(declared_name_matches(HOLDER_UNBOUND, &name), "{name}");
        }
        // One plan per case, as many entries as each case reports.
        let plans: Vec<usize> = [BASIC, EXIT_KILL, MMAP, FORK, SCM, M7]
            .iter()
            .map(|s| s.len())
            .collect();
        assert_eq!(plans, [7, 3, 4, 5, 4, 5]);
    }
}
