//! Building device models from command-line specs.

use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use pcisim_devices::gpu::{self, GpuConfig};
use pcisim_pci::{Controllable, Description};
use pcisim_vfio_user::Device;

use crate::spec::{parse_bool, parse_size, parse_u64, DeviceSpec, Kind};

/// A device ready to serve, and what it says about itself.
pub struct Built {
    /// The backend.
    pub device: Arc<Mutex<dyn Device>>,
    /// The same endpoint, seen by the control socket (journal, status, fault injection).
    pub control: Arc<Mutex<dyn Controllable>>,
    /// Its own description (IDs, BARs, capabilities).
    pub description: Description,
}

/// Offset of the class code (revision is the byte below it) in the type 0 header.
const CLASS_REVISION: u16 = 0x08;

/// Build the device a spec names, validating every option.
pub fn build(spec: &DeviceSpec) -> Result<Built> {
    match spec.kind {
        Kind::Gpu => build_gpu(spec),
    }
}

fn build_gpu(spec: &DeviceSpec) -> Result<Built> {
    let mut cfg = GpuConfig {
        name: spec.id.clone(),
        ..GpuConfig::default()
    };
    let mut corrupt_class = false;
    for (k, v) in &spec.opts {
        let ctx = || format!("device {}: option {k}={v}", spec.id);
        match k.as_str() {
            "vram" => cfg.vram_size = parse_size(v).with_context(ctx)?,
            "vendor" => {
                cfg.vendor_id = u16::try_from(parse_u64(v).with_context(ctx)?).with_context(ctx)?
            }
            "device" => {
                cfg.device_id = u16::try_from(parse_u64(v).with_context(ctx)?).with_context(ctx)?
            }
            "class" => {
                let c = parse_u64(v).with_context(ctx)?;
                if c > 0xff_ffff {
                    bail!("device {}: class {v} does not fit 24 bits", spec.id);
                }
                cfg.class_code = c as u32;
            }
            "no_soft_reset" => cfg.no_soft_reset = parse_bool(v).with_context(ctx)?,
            "immediate_readiness" => cfg.immediate_readiness = parse_bool(v).with_context(ctx)?,
            // Fault knob: the function presents a class code other than the one it describes
            // (a mis-programmed strap). The guest suite's E1 must catch it.
            "x-corrupt-class" => corrupt_class = parse_bool(v).with_context(ctx)?,
            other => bail!(
                "device {}: unknown gpu option {other:?} (known: vram, vendor, device, class, \
                 no_soft_reset, immediate_readiness, x-corrupt-class)",
                spec.id
            ),
        }
    }
    let mut ep = gpu::endpoint(&cfg).with_context(|| format!("device {}", spec.id))?;
    let description = ep.describe();
    if corrupt_class {
        let wrong = cfg.class_code ^ 0x00_0100;
        log::warn!(
            "{}: fault x-corrupt-class: presenting class {wrong:06x}",
            spec.id
        );
        ep.config_mut()
            .set_power_on_bits(CLASS_REVISION, 0xffff_ff00, wrong << 8);
    }
    let ep = Arc::new(Mutex::new(ep));
    Ok(Built {
        device: ep.clone(),
        control: ep,
        description,
    })
}
