//! vfio-user server side for pcisim: the wire format, the DMA map, interrupt eventfds and the
//! [`Device`] trait a backend implements.

pub mod device;
pub mod dma;
pub mod irq;
pub mod latency;
pub mod proto;

pub use device::{
    irq_index, region, ClientLink, Device, DeviceError, IrqInfo, RegionFlags, RegionInfo,
    RegionMmap, SparseArea,
};
pub use dma::{DmaError, DmaSpace};
pub use irq::{Interrupts, IrqError, Signal};
pub use latency::{LatencySnapshot, ReplyLatency};
mod conn;
mod evloop;
mod reader;
pub mod server;
pub mod shm;
mod sys;

pub use server::{ConnectionEnd, PeerCred, Server, ServerError, ServerOptions};
