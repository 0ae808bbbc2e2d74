//! Fuzz harnesses over pcisim's real code (docs/fuzzing.md). Each module has a `run(data)` that
//! a cargo-fuzz target in `fuzz_targets/` calls, and that the tests of this crate call on the
//! seed corpus:
//!
//! - [`frame`]: the vfio-user frame decoder — `proto::decode` on every frame, then the same byte
//!   stream (with fds) through a real [`pcisim_vfio_user::Server`] connection;
//! - [`config`]: config-space write sequences on the real GPU and NPU functions, checked
//!   against the masks after every write;
//! - [`region`]: region accesses of any offset and size through the `Device` trait;
//! - [`gpu_ring`]: GPU command-ring descriptors executed against a mapped memory image;
//! - [`npu_queue`]: NPU descriptors and page tables executed against a mapped memory image.
//!
//! A harness panics (a libFuzzer finding) when the code under test panics or when one of the
//! invariants it checks does not hold.

pub mod config;
pub mod frame;
pub mod gpu_ring;
pub mod npu_queue;
pub mod region;
pub mod seeds;

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

/// A cursor over the fuzzer's bytes that never runs dry: past the end it yields zeros.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }

    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    /// The next `n` bytes, or fewer at the end.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = end;
        &self.data[start..end]
    }

    /// The next `N` bytes, zero-padded.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// Everything not consumed yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        self.pos = self.data.len();
        &self.data[start..]
    }
}

/// A memfd of `size` bytes (zeroed), as QEMU's guest RAM backend would pass.
pub fn memfd(name: &std::ffi::CStr, size: u64) -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).expect("sizing the memfd");
    file
}

/// An eventfd.
pub fn eventfd() -> OwnedFd {
    // SAFETY: eventfd takes an initial value and flags and returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Panic (with the journal's last records) if `journal` ever recorded a violation.
pub fn assert_no_violations(journal: &pcisim_journal::Journal, what: &dyn Fn() -> String) {
    if journal.stats().violations == 0 {
        return;
    }
    let (recent, _) = journal.since(journal.last_seq().saturating_sub(60));
    let recent: Vec<String> = recent
        .iter()
        .map(|r| format!("  {} {:>12} {:?}", r.seq, r.t_ns, r.event))
        .collect();
    panic!(
        "{}: after {}: journal violations: {:?}\nlast records:\n{}",
        journal.name(),
        what(),
        journal.violations(),
        recent.join("\n")
    );
}

/// Run every committed seed of `target` through `run` (used by this crate's tests).
#[cfg(test)]
fn run_seeds(target: &str, run: fn(&[u8])) {
    let seeds = seeds::all(target);
    assert!(!seeds.is_empty(), "no seeds for {target}");
    for (name, bytes) in seeds {
        eprintln!("{target}: seed {name} ({} bytes)", bytes.len());
        run(&bytes);
    }
}
