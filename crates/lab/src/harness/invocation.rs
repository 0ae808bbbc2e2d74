//! The command line of a guest program run against a device: its ids and, for E1, the
//! device's description. A leaf shared by the catalogue's guest scenarios
//! ([`crate::harness::scenario::Scenario::argv`]) and host scenarios' guest commands
//! ([`crate::harness::host::HostCtx::guest_argv`]); re-exported from
//! [`crate::harness::scenario`].

use pcisim_guest_wire::{DeviceIds, GuestProgram as Invocation, Options};

use crate::vm::server::DescribedDevice;

/// The invocation of a guest program with `options` against `device`: its ids as
/// `--vendor`/`--device` for the programs that take them, and for E1 (unless the options
/// already say) its description as `--expect`.
pub fn invocation(mut options: Options, device: &DescribedDevice) -> Invocation {
    let d = &device.description;
    if let Options::E1(o) = &mut options {
        if o.expect.is_none() && o.expect_file.is_none() {
            o.expect = Some(d.raw.clone());
        }
    }
    let takes_device = options.program().takes_device();
    let inv = Invocation::new(options);
    if takes_device {
        inv.device(DeviceIds {
            vendor: d.vendor_id,
            device: d.device_id,
        })
    } else {
        inv
    }
}
