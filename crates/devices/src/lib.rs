//! pcisim's emulated PCI functions. Each model implements [`pcisim_pci::PciFunction`] and is
//! served through a [`pcisim_pci::Endpoint`]; the models know nothing of sockets.
//!
//! ```no_run
//! use pcisim_devices::gpu::{self, GpuConfig};
//! use pcisim_vfio_user::Device;
//!
//! let ep = gpu::endpoint(&GpuConfig::default()).unwrap();
//! assert_eq!(ep.describe().device_id, 0x0b10);
//! assert_eq!(ep.region_info(2).unwrap().size, 256 << 20);
//! ```
#![deny(missing_docs)]

pub mod gpu;
pub mod npu;
mod regfile;
