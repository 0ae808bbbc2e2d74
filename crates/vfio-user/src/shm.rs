//! The server's mappings of memory a client shared with it (DMA_MAP fds), and surviving a
//! client that truncates such a file while it is mapped.
//!
//! A shared mapping of a file that shrinks raises SIGBUS on the next access to a page past the
//! new end — in whichever server thread touches it, killing every device of the process.
//! Files sealed against shrinking (`F_SEAL_SHRINK`, QEMU's memfd backend by default) cannot
//! shrink; everything else (file and hugetlbfs backends, a hostile client's tmpfile) is
//! *guarded*: its mapping is entered in a fixed, lock-free registry, and a process-wide SIGBUS
//! handler — libwayland-server's technique for client shm pools — checks whether the faulting
//! address lies inside a guarded mapping. If so it maps anonymous memory over the whole mapping
//! (`MAP_FIXED`), marks it broken and returns: the faulting access completes (reads zeros,
//! writes go nowhere) and every access to the mapping from then on is refused by its owner
//! ([`SharedMap::is_broken`]), which reports it as a DMA error. Any other SIGBUS gets the
//! disposition that was installed before ours (the default: the process dies as it would have).
//!
//! The handler is async-signal-safe: it reads atomics and calls `mmap` and `sigaction`, nothing
//! else — no allocation, no locks, no logging.
//!
//! All of this crate's `unsafe` for shared client memory lives here.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

use vm_memory::VolatileSlice;

/// Guarded mappings the process can hold at once. One per (unsealed file, 1 GiB chunk) the
/// clients of this process mapped (see dma.rs), so a few per client in practice; a map that
/// would need more is refused. 24 bytes each, zero pages until used.
pub const MAX_GUARDED: usize = 65536;

const FREE: u8 = 0;
/// Being filled in or torn down: the handler ignores it.
const BUSY: u8 = 1;
const LIVE: u8 = 2;
const BROKEN: u8 = 3;

struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    len: AtomicUsize,
}

// Not `Copy`: the array is built by a const initializer.
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    state: AtomicU8::new(FREE),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
};

static SLOTS: [Slot; MAX_GUARDED] = [EMPTY; MAX_GUARDED];
/// Where the next free-slot search starts (a hint; correctness does not depend on it).
static HINT: AtomicUsize = AtomicUsize::new(0);
/// SIGBUSes the handler recovered from, process-wide.
static RECOVERED: AtomicU64 = AtomicU64::new(0);
/// Bytes of address space held by [`SharedMap`]s, process-wide.
static MAPPED_BYTES: AtomicU64 = AtomicU64::new(0);

/// The SIGBUS disposition before ours, restored for a SIGBUS that is not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// SIGBUSes recovered from so far (process-wide).
pub fn recovered() -> u64 {
    RECOVERED.load(Ordering::Relaxed)
}

/// Bytes of address space the process's client mappings hold.
pub fn mapped_bytes() -> u64 {
    MAPPED_BYTES.load(Ordering::Relaxed)
}

/// Install the SIGBUS handler (once per process). Errors if sigaction fails.
pub fn install_sigbus_handler() -> io::Result<()> {
    INSTALL.call_once(|| {
        // SAFETY: sigaction is a plain C struct for which all-zeroes is a valid value.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigbus
            as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
            as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: sigemptyset writes the mask inside `action`, which this frame owns.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: all-zeroes is a valid sigaction.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // Read the current disposition first and publish it before ours can run.
        // SAFETY: a null new action only reads the current one into `old`, owned by this frame.
        if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) } != 0 {
            return;
        }
        let _ = PREVIOUS.set(old);
        // SAFETY: `action` is a valid sigaction whose handler is async-signal-safe (see
        // `on_sigbus`); the old disposition is not needed again (read above).
        if unsafe { libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) } == 0 {
            INSTALLED.store(true, Ordering::Release);
        }
    });
    if INSTALLED.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(io::Error::other("installing the SIGBUS handler failed"))
    }
}

/// The process-wide SIGBUS handler. Only atomics, `mmap` and `sigaction`/`raise`: all
/// async-signal-safe.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
    // A kernel-raised fault (code > 0) inside a guarded mapping is ours.
    if code > 0 {
        for slot in SLOTS.iter() {
            let state = slot.state.load(Ordering::Acquire);
            if state != LIVE && state != BROKEN {
                continue;
            }
            let (start, len) = (
                slot.start.load(Ordering::Relaxed),
                slot.len.load(Ordering::Relaxed),
            );
            if addr < start || addr - start >= len {
                continue;
            }
            // SAFETY: `start..start+len` is a mapping a live SharedMap owns (registered until
            // its drop unmaps it, and no access runs while it drops); replacing it with
            // anonymous memory of the same size changes no other mapping.
            let p = unsafe {
                libc::mmap(
                    start as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                break;
            }
            slot.state.store(BROKEN, Ordering::Release);
            RECOVERED.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    // Not ours: the disposition we replaced decides (the default kills the process, with the
    // right signal and address, when the access is retried).
    match PREVIOUS.get() {
        Some(prev) if prev.sa_flags & libc::SA_SIGINFO != 0 && prev.sa_sigaction > 1 => {
            // SAFETY: a previous SA_SIGINFO handler (e.g. Rust's stack-overflow handler) gets
            // exactly what the kernel gave us.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(prev.sa_sigaction) };
            f(sig, info, ctx);
        }
        Some(prev) => {
            // SAFETY: restoring a disposition the kernel gave us; sigaction is async-signal-safe.
            unsafe { libc::sigaction(libc::SIGBUS, prev, std::ptr::null_mut()) };
            if code <= 0 {
                // Sent, not a fault: retrying would not raise it again.
                // SAFETY: raise is async-signal-safe.
                unsafe { libc::raise(sig) };
            }
        }
        None => {
            // SAFETY: as above, with the default disposition.
            unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
            if code <= 0 {
                // SAFETY: raise is async-signal-safe.
                unsafe { libc::raise(sig) };
            }
        }
    }
}

/// Take a free registry slot for `start..start+len`; `None` if the registry is full.
fn register(start: usize, len: usize) -> Option<usize> {
    let hint = HINT.load(Ordering::Relaxed);
    for k in 0..MAX_GUARDED {
        let i = (hint + k) % MAX_GUARDED;
        let slot = &SLOTS[i];
        if slot
            .state
            .compare_exchange(FREE, BUSY, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            slot.start.store(start, Ordering::Relaxed);
            slot.len.store(len, Ordering::Relaxed);
            slot.state.store(LIVE, Ordering::Release);
            HINT.store((i + 1) % MAX_GUARDED, Ordering::Relaxed);
            return Some(i);
        }
    }
    None
}

/// Whether `file` is sealed against shrinking (then it cannot raise SIGBUS under us).
pub fn sealed_against_shrinking(file: &File) -> bool {
    // SAFETY: fcntl(F_GET_SEALS) on a valid, open fd (borrowed for the call) only returns flags;
    // files that do not support seals answer -1 (EINVAL).
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals > 0 && seals & libc::F_SEAL_SHRINK != 0
}

/// One shared mapping of a client's file. Unmapped on drop.
#[derive(Debug)]
pub struct SharedMap {
    addr: usize,
    len: usize,
    /// Registry slot of a guarded (not shrink-sealed) mapping.
    slot: Option<usize>,
}

impl SharedMap {
    /// Map `len` bytes of `file` at `offset` (page aligned), shared, with `prot`
    /// (`libc::PROT_*`). A file not sealed against shrinking is guarded (the SIGBUS handler is
    /// installed on first use). The caller may close `file` afterwards: the mapping keeps the
    /// memory.
    pub fn new(file: &File, offset: u64, len: usize, prot: i32) -> io::Result<SharedMap> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let guarded = !sealed_against_shrinking(file);
        if guarded {
            install_sigbus_handler()?;
        }
        // SAFETY: a fresh mapping at an address the kernel picks; it aliases nothing of ours.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut map = SharedMap {
            addr: p as usize,
            len,
            slot: None,
        };
        MAPPED_BYTES.fetch_add(len as u64, Ordering::Relaxed);
        if guarded {
            // On failure `map` drops and unmaps.
            map.slot = Some(register(map.addr, len).ok_or_else(|| {
                io::Error::other(format!(
                    "{MAX_GUARDED} client mappings of files not sealed against shrinking are \
                     already held"
                ))
            })?);
        }
        Ok(map)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true (a mapping is not empty); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the file was sealed against shrinking when mapped (no SIGBUS guard needed).
    pub fn is_guarded(&self) -> bool {
        self.slot.is_some()
    }

    /// Whether a SIGBUS replaced this mapping with anonymous memory (the client truncated the
    /// file). Once true it stays true: the memory is no longer the client's.
    pub fn is_broken(&self) -> bool {
        self.slot
            .is_some_and(|i| SLOTS[i].state.load(Ordering::Acquire) == BROKEN)
    }

    /// `len` bytes at `off`, or `None` if that is not inside the mapping.
    pub fn slice(&self, off: usize, len: usize) -> Option<VolatileSlice<'_>> {
        let end = off.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: `addr+off .. addr+end` lies inside our live mapping (checked above), which
        // outlives the returned slice (it borrows `self`). The memory is shared with the client
        // and may change under us: VolatileSlice only does volatile accesses, and a SIGBUS on
        // it (truncation) is recovered by the handler.
        Some(unsafe { VolatileSlice::new((self.addr + off) as *mut u8, len) })
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            // The handler ignores the slot from now on (no access runs while we drop).
            SLOTS[i].state.store(BUSY, Ordering::Release);
        }
        // SAFETY: unmapping exactly the mapping this value owns; no slice of it outlives `self`.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        MAPPED_BYTES.fetch_sub(self.len as u64, Ordering::Relaxed);
        if let Some(i) = self.slot {
            SLOTS[i].state.store(FREE, Ordering::Release);
        }
    }
}

// SAFETY: the mapping is plain shared memory; all access goes through volatile slices, and the
// registry is atomics.
unsafe impl Send for SharedMap {}
// SAFETY: as above: `&SharedMap` only hands out volatile slices.
unsafe impl Sync for SharedMap {}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpfile(len: u64) -> File {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn test_truncated_guarded_mapping_is_replaced_and_marked_broken() {
        let f = tmpfile(0x4000);
        let m = SharedMap::new(&f, 0, 0x4000, libc::PROT_READ | libc::PROT_WRITE).unwrap();
        assert!(m.is_guarded());
        m.slice(0x3000, 4).unwrap().copy_from(&[1u8, 2, 3, 4]);
        assert!(!m.is_broken());
        f.set_len(0).unwrap();
        let before = recovered();
        let mut b = [0xffu8; 4];
        // Without the handler this read kills the test process with SIGBUS.
        m.slice(0x3000, 4).unwrap().copy_to(&mut b[..]);
        assert_eq!(b, [0; 4], "the replacement memory reads zeros");
        assert!(m.is_broken());
        assert!(recovered() > before);
        // Writes complete too, and go nowhere.
        m.slice(0, 4).unwrap().copy_from(&[9u8; 4]);
        drop(m);
    }

    #[test]
    fn test_sealed_memfd_is_not_guarded() {
        // SAFETY: valid NUL-terminated name.
        let raw = unsafe {
            libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(raw >= 0);
        // SAFETY: a fresh fd nothing else owns.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        f.set_len(0x1000).unwrap();
        // SAFETY: fcntl on our own fd.
        let r = unsafe { libc::fcntl(raw, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(r, 0);
        let m = SharedMap::new(&f, 0, 0x1000, libc::PROT_READ).unwrap();
        assert!(!m.is_guarded());
        assert!(f.set_len(0).is_err(), "the seal holds");
    }

    #[test]
    fn test_sigbus_outside_any_guarded_mapping_still_kills() {
        install_sigbus_handler().unwrap();
        let f = tmpfile(0x1000);
        // An unguarded mapping (plain mmap, not a SharedMap): a SIGBUS there is not ours.
        // SAFETY: fresh mapping of our own file.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                0x1000,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        f.set_len(0).unwrap();
        // SAFETY: fork in a test; the child only reads memory and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: reading our mapping; the truncation makes this raise SIGBUS.
            let v = unsafe { std::ptr::read_volatile(p as *const u8) };
            // SAFETY: _exit is always safe; reaching it means the SIGBUS was swallowed.
            unsafe { libc::_exit(i32::from(v) + 3) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
            "status {status:#x}: a foreign SIGBUS must keep its default action"
        );
        // SAFETY: our own mapping.
        unsafe { libc::munmap(p, 0x1000) };
    }
}
