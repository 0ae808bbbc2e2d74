//! BAR0 register offsets and values of the GPU function (docs/programming-model.md): defined in
//! `pcisim-abi` (the one copy device, guest programs, lab and C driver share), re-exported here.

pub use pcisim_abi::gpu::regs::*;
