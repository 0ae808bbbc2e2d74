//! The NPU function (docs/npu.md): BAR0 registers, queue entries, the vendor-specific capability
//! naming its GPU peer, and the uapi of its guest driver.

pub mod queue;
pub mod regs;
pub mod uapi;
pub mod vsec;
