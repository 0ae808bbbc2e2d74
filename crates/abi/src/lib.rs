//! The register-level contract of pcisim's GPU and NPU functions, in one place.
//!
//! Everything a driver and the device must agree on byte for byte lives here and only here:
//! BAR0 register offsets and their bit fields ([`gpu::regs`], [`npu::regs`]), the GPU command
//! ring entry ([`gpu::ring`]), the NPU submission/completion/fault queue entries
//! ([`npu::queue`]), the vendor-specific capability that names the NPU's GPU peer
//! ([`npu::vsec`]), the NPU guest driver's uapi ([`npu::uapi`]) and the PCI identities
//! ([`ids`]). The device models (`pcisim-devices`), the guest programs (`guest-tests/`), the lab
//! and the C guest driver (through the generated `guest-tests/kmod/pcisim_regs.h`, see [`c`])
//! all take their numbers from here, so a register cannot mean one thing to the device and
//! another to a test.
//!
//! The prose contract stays in docs/programming-model.md (GPU) and docs/npu.md (NPU); the doc
//! comments here say what each number is and why, and a test checks the docs' register tables
//! against these tables.
//!
//! `no_std` and dependency-free: the guest programs are built statically for the guest, and a
//! kernel-side or firmware-side user should be able to take it as is.
//!
//! Adding a register: add one line (with its doc comment) to the table macro of the function's
//! `regs` module, describe it in the docs' table, and regenerate the C header
//! (`cargo run -p pcisim-abi --example c-header > guest-tests/kmod/pcisim_regs.h`); the
//! `pcisim-abi` tests fail until both are done.

#![no_std]
#![deny(missing_docs)]

#[macro_use]
mod table;
pub mod c;
pub mod gpu;
pub mod ids;
pub mod le;
pub mod npu;
