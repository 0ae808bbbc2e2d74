//! A sub-second answer to "can this host's KVM run our guest?", through `kvm-ioctls`.
//!
//! `/dev/kvm` opening proves little. On the machines this lab was written on, `/dev/kvm` is
//! served by `kvm_pvm` (PVM, a shadow-paging KVM for hosts that are themselves VMs without
//! VMX/SVM): it runs some guest code natively but *emulates* other guest kernel code with
//! KVM's x86 instruction emulator, which knows no VEX-encoded instructions. The Debian guest
//! kernel's zstd decompressor executes `SHLX` (`c4 42 69 f7 c0`, BMI2) at CPL 0 in long mode
//! from a low identity-mapped address, and QEMU stops with "KVM internal error. Suberror: 1
//! (emulation failure)". docs/lab.md has the whole investigation.
//!
//! The probe builds a minimal guest the same way and runs it: one VM per check, 64 KiB of
//! anonymous memory, one vCPU set straight into 64-bit long mode (4-level paging identity-maps
//! the first 64 KiB and aliases it at the kernel-text address `0xffffffff80000000`), and a few
//! instructions that end with `out 0x10, eax; hlt`. The checks:
//!
//! - `plain`: `mov`/`add` only, the value read back from the port exit (does a vCPU run at all?);
//! - `vex-low`: the decompressor's very `SHLX` at CPL 0 from a low address;
//! - `vex-high`: the same from the kernel-text alias (where the decompressed kernel runs).
//!
//! KVM is usable when every check returns the right value. Whatever happens (an internal
//! error, a triple fault, a wrong value, a failed ioctl, a vCPU that never returns) is a
//! verdict with a reason, never a panic; the whole probe answers within [`PROBE_TIMEOUT`]
//! (about 10 ms on a host whose KVM works or fails cleanly).
//!
//! All `unsafe` is here at the mmap/ioctl boundary: the guest memory mapping, registering it
//! with KVM, and reading the `kvm_run` union after an internal-error exit.

use std::fmt::Write as _;
use std::io;
use std::ptr::NonNull;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};
use serde::Serialize;

/// How long the probe may take before it answers "unusable: no answer". A vCPU stuck in
/// `KVM_RUN` is left behind on its thread (it dies with the process).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Guest memory: 16 pages from guest physical address 0.
const MEM_SIZE: usize = 0x10000;
/// The GDT (null, 64-bit code, data, a 16-byte TSS descriptor).
const GDT: u64 = 0x0500;
/// Page tables: PML4, the low and the high PDPT, one PD, one PT.
const PML4: u64 = 0x1000;
const PDPT_LOW: u64 = 0x2000;
const PDPT_HIGH: u64 = 0x3000;
const PD: u64 = 0x4000;
const PT: u64 = 0x5000;
/// Where the check's code goes.
const CODE: u64 = 0x8000;
/// Top of the stack (nothing pushes, but a sane RSP costs nothing).
const STACK_TOP: u64 = 0xf000;
/// The alias of guest physical 0 at the x86-64 kernel-text base.
const HIGH_BASE: u64 = 0xffff_ffff_8000_0000;
/// The port the checks write their result to.
const PORT: u16 = 0x10;
/// At most this many exits per check (each check makes two).
const MAX_EXITS: usize = 16;

/// Page-table entry bits: present, writable, accessed.
const PTE_P_RW: u64 = 0x3;
/// CR0: PE, MP, ET, NE, WP, PG (what the kernel's decompressor runs with).
const CR0: u64 = 0x8005_0033;
/// CR4: PAE only (the decompressor ran its SHLX with CR4 = 0x20).
const CR4: u64 = 0x20;
/// EFER: LME and LMA.
const EFER: u64 = 0x500;

/// `mov eax, 0x2a; add eax, 0x10; out 0x10, eax; hlt`: 0x3a.
const PLAIN: &[u8] = &[
    0xb8, 0x2a, 0, 0, 0, 0x83, 0xc0, 0x10, 0xe7, PORT as u8, 0xf4,
];
/// `mov eax, 1; mov edx, 5; mov r8d, eax; shlx r8d, r8d, edx; mov eax, r8d; out 0x10, eax;
/// hlt`: 32. The SHLX bytes are exactly those the Debian kernel's decompressor failed on.
const VEX: &[u8] = &[
    0xb8, 1, 0, 0, 0, // mov eax, 1
    0xba, 5, 0, 0, 0, // mov edx, 5
    0x41, 0x89, 0xc0, // mov r8d, eax
    0xc4, 0x42, 0x69, 0xf7, 0xc0, // shlx r8d, r8d, edx
    0x44, 0x89, 0xc0, // mov eax, r8d
    0xe7, PORT as u8, // out 0x10, eax
    0xf4,       // hlt
];

/// One probe program.
struct Program {
    name: &'static str,
    what: &'static str,
    code: &'static [u8],
    /// The virtual address the guest's page tables map `CODE` at, minus `CODE`.
    base: u64,
    expected: u32,
}

const PROGRAMS: [Program; 3] = [
    Program {
        name: "plain",
        what: "mov/add/out/hlt at CPL 0 in long mode",
        code: PLAIN,
        base: 0,
        expected: 0x3a,
    },
    Program {
        name: "vex-low",
        what: "SHLX (c4 42 69 f7 c0) at CPL 0 from a low identity-mapped address, like the \
               kernel decompressor",
        code: VEX,
        base: 0,
        expected: 32,
    },
    Program {
        name: "vex-high",
        what: "the same SHLX from the kernel-text alias 0xffffffff80008000",
        code: VEX,
        base: HIGH_BASE,
        expected: 32,
    },
];

/// How one check ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// The guest wrote the expected value and halted.
    Ok {
        /// The value it wrote.
        value: u32,
    },
    /// The guest halted having written something else (or nothing).
    Wrong {
        /// What it should have written.
        expected: u32,
        /// What it wrote, if anything.
        got: Option<u32>,
    },
    /// `KVM_EXIT_INTERNAL_ERROR`: suberror 1 is an emulation failure.
    InternalError {
        /// `KVM_INTERNAL_ERROR_*`.
        suberror: u32,
        /// The instruction bytes KVM reported (hex), if it did.
        insn: Option<String>,
    },
    /// Any other exit the checks do not make (triple fault, failed entry, ...).
    Exit {
        /// The exit, as `kvm-ioctls` names it.
        exit: String,
    },
    /// An ioctl or mmap failed.
    Error {
        /// What failed, with the OS error.
        error: String,
    },
}

impl Outcome {
    fn describe(&self) -> String {
        match self {
            Outcome::Ok { value } => format!("ok ({value:#x})"),
            Outcome::Wrong { expected, got } => match got {
                Some(v) => format!("wrong value {v:#x} (expected {expected:#x})"),
                None => format!("halted without writing a value (expected {expected:#x})"),
            },
            Outcome::InternalError { suberror, insn } => {
                let what = if *suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                    " (emulation failure: KVM's instruction emulator cannot execute it)"
                } else {
                    ""
                };
                match insn {
                    Some(bytes) => {
                        format!("KVM internal error, suberror {suberror}{what} on {bytes}")
                    }
                    None => format!("KVM internal error, suberror {suberror}{what}"),
                }
            }
            Outcome::Exit { exit } => format!("unexpected exit {exit}"),
            Outcome::Error { error } => error.clone(),
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `plain`, `vex-low`, `vex-high`.
    pub name: &'static str,
    /// What it runs.
    pub what: &'static str,
    /// How it ended.
    pub outcome: Outcome,
}

/// The probe's answer.
#[derive(Debug, Clone, Serialize)]
pub struct KvmVerdict {
    /// Whether the lab may boot its guest with `-accel kvm`.
    pub usable: bool,
    /// Why, in one line.
    pub reason: String,
    /// The loaded KVM vendor module (`kvm_intel`, `kvm_amd`, `kvm_pvm`), if one is.
    pub module: Option<String>,
    /// The checks that ran (empty when `/dev/kvm` did not open).
    pub checks: Vec<Check>,
    /// How long the probe took.
    pub elapsed_ms: f64,
}

impl KvmVerdict {
    /// The verdict as `qemu-scripts/provision.sh` takes it in `$PCISIM_KVM_VERDICT`:
    /// `usable` or `unusable: <reason>` (one line).
    pub fn script_line(&self) -> String {
        if self.usable {
            "usable".to_string()
        } else {
            format!("unusable: {}", self.reason.replace(['\n', '\r'], " "))
        }
    }
}

/// Runs the probe: answers within [`PROBE_TIMEOUT`] whatever the host does.
pub fn probe() -> KvmVerdict {
    let start = Instant::now();
    let module = vendor_module();
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("kvm-probe".into())
        .spawn(move || {
            // The receiver may have given up (timeout): nothing to do then.
            let _ = tx.send(run_checks());
        });
    let (usable, reason, checks) = match spawned {
        Err(e) => (
            false,
            format!("cannot start the probe thread: {e}"),
            Vec::new(),
        ),
        Ok(_) => match rx.recv_timeout(PROBE_TIMEOUT) {
            Ok(Err(reason)) => (false, reason, Vec::new()),
            Ok(Ok(checks)) => {
                let failed = checks
                    .iter()
                    .find(|c| !matches!(c.outcome, Outcome::Ok { .. }));
                match failed {
                    None => (
                        true,
                        "a long-mode vCPU ran plain and VEX (BMI2 SHLX) code at CPL 0, low and \
                         high, natively"
                            .to_string(),
                        checks,
                    ),
                    Some(c) => {
                        let reason =
                            format!("check {} ({}): {}", c.name, c.what, c.outcome.describe());
                        (false, reason, checks)
                    }
                }
            }
            Err(_) => (
                false,
                format!(
                    "no answer within {} ms (a vCPU is stuck in KVM_RUN)",
                    PROBE_TIMEOUT.as_millis()
                ),
                Vec::new(),
            ),
        },
    };
    let mut reason = reason;
    if !usable && module.as_deref() == Some("kvm_pvm") {
        reason.push_str(
            "; /dev/kvm is PVM (kvm_pvm: shadow-paging KVM without VMX/SVM), which emulates \
             guest kernel code it cannot run natively",
        );
    }
    let verdict = KvmVerdict {
        usable,
        reason,
        module,
        checks,
        elapsed_ms: start.elapsed().as_secs_f64() * 1e3,
    };
    log::info!(
        "kvm probe ({:.1} ms): {}",
        verdict.elapsed_ms,
        verdict.script_line()
    );
    log::debug!("kvm probe: {verdict:?}");
    verdict
}

/// The KVM vendor module loaded on this host, from `/sys/module`.
fn vendor_module() -> Option<String> {
    ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .find(|m| std::path::Path::new("/sys/module").join(m).exists())
        .map(str::to_string)
}

/// Opens `/dev/kvm` and runs every program in a fresh VM. `Err` only when KVM itself is
/// unavailable; a failing check is an [`Outcome`].
fn run_checks() -> Result<Vec<Check>, String> {
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm does not open: {e}"))?;
    Ok(PROGRAMS
        .iter()
        .map(|p| Check {
            name: p.name,
            what: p.what,
            outcome: run_program(&kvm, p).unwrap_or_else(|error| Outcome::Error { error }),
        })
        .collect())
}

/// Anonymous, private, zeroed memory for the guest, unmapped on drop.
struct GuestMemory {
    ptr: NonNull<u8>,
    len: usize,
}

impl GuestMemory {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous private mapping at an address the kernel chooses; no
        // existing memory is affected. The result is checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(GuestMemory { ptr, len })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live read-write mapping of `len` bytes owned by `self` (unmapped
        // only in drop); the `&mut self` borrow makes this the only reference to it from Rust.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    fn write(&mut self, gpa: u64, data: &[u8]) {
        let at = gpa as usize;
        self.bytes()[at..at + data.len()].copy_from_slice(data);
    }

    fn write_u64(&mut self, gpa: u64, value: u64) {
        self.write(gpa, &value.to_le_bytes());
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` created; nothing refers to it any more
        // (the VM that registered it is dropped first: it is declared after it).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Page tables, GDT and code for `program`.
fn build_guest(mem: &mut GuestMemory, program: &Program) {
    // GDT: null, code64 (0x08), data (0x10), TSS (0x18, 16 bytes).
    mem.write_u64(GDT, 0);
    mem.write_u64(GDT + 8, 0x00af_9b00_0000_ffff);
    mem.write_u64(GDT + 16, 0x00cf_9300_0000_ffff);
    mem.write_u64(GDT + 24, 0x0000_8b00_0000_0067);
    mem.write_u64(GDT + 32, 0);
    // PML4[0] -> low PDPT, PML4[511] -> high PDPT; PDPT_LOW[0] and PDPT_HIGH[510] -> PD;
    // PD[0] -> PT; PT maps the 16 pages of guest memory.
    mem.write_u64(PML4, PDPT_LOW | PTE_P_RW);
    mem.write_u64(PML4 + 511 * 8, PDPT_HIGH | PTE_P_RW);
    mem.write_u64(PDPT_LOW, PD | PTE_P_RW);
    mem.write_u64(PDPT_HIGH + 510 * 8, PD | PTE_P_RW);
    mem.write_u64(PD, PT | PTE_P_RW);
    for page in 0..(MEM_SIZE as u64 / 0x1000) {
        mem.write_u64(PT + page * 8, (page * 0x1000) | PTE_P_RW);
    }
    mem.write(CODE, program.code);
}

fn segment(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// One VM, one vCPU, one program. `Err` is a failed setup step (mmap, an ioctl).
fn run_program(kvm: &Kvm, program: &Program) -> Result<Outcome, String> {
    let mut mem = GuestMemory::new(MEM_SIZE).map_err(|e| format!("mmap of guest memory: {e}"))?;
    build_guest(&mut mem, program);
    // Declared after `mem`, so dropped (and the memory slot gone) before `mem` is unmapped.
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.ptr.as_ptr() as u64,
    };
    // SAFETY: the region is our own live mapping of `MEM_SIZE` bytes, which outlives `vm`
    // (see above); KVM may read and write it, which Rust code does not do concurrently (the
    // vCPU only runs inside `run` below, while `mem` is not borrowed).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;

    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs = segment(0x08, 0xb, 1, 0);
    let data = segment(0x10, 0x3, 0, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        s: 0,
        db: 0,
        g: 0,
        ..segment(0x18, 0xb, 0, 0)
    };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 39;
    sregs.cr0 = CR0;
    sregs.cr3 = PML4;
    sregs.cr4 = CR4;
    sregs.efer = EFER;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: program.base + CODE,
        rsp: program.base + STACK_TOP,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;

    let mut got = None;
    for _ in 0..MAX_EXITS {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        };
        match exit {
            VcpuExit::IoOut(PORT, data) => {
                let mut word = [0u8; 4];
                let n = data.len().min(4);
                word[..n].copy_from_slice(&data[..n]);
                got = Some(u32::from_le_bytes(word));
            }
            VcpuExit::Hlt => {
                return Ok(match got {
                    Some(value) if value == program.expected => Outcome::Ok { value },
                    _ => Outcome::Wrong {
                        expected: program.expected,
                        got,
                    },
                })
            }
            VcpuExit::InternalError => {
                let run = vcpu.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which the kernel
                // fills the `internal` member of the exit union; it is plain integers.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                return Ok(Outcome::InternalError {
                    suberror: internal.suberror,
                    insn: emulation_insn(internal.suberror, internal.ndata, &internal.data),
                });
            }
            other => {
                return Ok(Outcome::Exit {
                    exit: format!("{other:?}"),
                })
            }
        }
    }
    Ok(Outcome::Exit {
        exit: format!("more than {MAX_EXITS} exits without HLT"),
    })
}

/// The instruction bytes of an emulation failure, when KVM reports them: `data[0]` is the
/// flags (bit 0: bytes valid), then a byte of length and up to 15 bytes.
fn emulation_insn(suberror: u32, ndata: u32, data: &[u64; 16]) -> Option<String> {
    if suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION || ndata < 3 || data[0] & 1 == 0 {
        return None;
    }
    let mut bytes = Vec::with_capacity(16);
    bytes.extend_from_slice(&data[1].to_le_bytes());
    bytes.extend_from_slice(&data[2].to_le_bytes());
    let len = usize::from(bytes[0]).min(15);
    let mut text = String::new();
    for b in &bytes[1..1 + len] {
        let _ = write!(text, "{}{b:02x}", if text.is_empty() { "" } else { " " });
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_emulation_insn_decodes_kvm_layout() {
        // What this host's KVM reported for the decompressor (QEMU's dump of the same exit).
        let mut data = [0u64; 16];
        data[0] = 1;
        data[1] = 0x8d49_c0f7_6942_c40f;
        data[2] = 0x04e8_c1f9_894c_fc55;
        let insn = emulation_insn(1, 3, &data);
        assert_eq!(
            insn.as_deref(),
            Some("c4 42 69 f7 c0 49 8d 55 fc 4c 89 f9 c1 e8 04")
        );
        // No bytes flag, or another suberror: nothing.
        data[0] = 0;
        assert_eq!(emulation_insn(1, 3, &data), None);
        data[0] = 1;
        assert_eq!(emulation_insn(2, 3, &data), None);
    }

    #[test]
    fn test_script_line_is_one_line_verdict() {
        let mut v = KvmVerdict {
            usable: true,
            reason: "fine".into(),
            module: None,
            checks: Vec::new(),
            elapsed_ms: 1.0,
        };
        assert_eq!(v.script_line(), "usable");
        v.usable = false;
        v.reason = "a\nb\rc".into();
        assert_eq!(v.script_line(), "unusable: a b c");
    }

    #[test]
    fn test_programs_end_in_out_and_hlt() {
        for p in &PROGRAMS {
            assert_eq!(p.code.last(), Some(&0xf4), "{}", p.name);
            assert!(
                p.code.windows(2).any(|w| w == [0xe7, PORT as u8]),
                "{} writes its result to the port",
                p.name
            );
        }
        assert!(VEX.windows(5).any(|w| w == [0xc4, 0x42, 0x69, 0xf7, 0xc0]));
    }
}
