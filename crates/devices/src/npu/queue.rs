//! Queue entry formats (docs/npu.md, "Queues"): submission descriptors in, completion and fault
//! records out. Defined with their encode/decode in `pcisim-abi`, re-exported here.

pub use pcisim_abi::npu::queue::{Completion, Descriptor, FaultRecord};
