//! BAR0 register offsets, queue formats and codes of the NPU function (docs/npu.md): defined in
//! `pcisim-abi` (the one copy device, guest programs, lab and C driver share), re-exported here.

pub use pcisim_abi::npu::regs::*;
