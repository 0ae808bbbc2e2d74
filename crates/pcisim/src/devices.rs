//! Building device models from command-line specs.

use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use pcisim_devices::gpu::{self, Gpu, GpuConfig, IrqMode};
use pcisim_devices::npu::{self, NpuConfig, PeerConfig};
use pcisim_pci::Endpoint;
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

/// Build the device a spec names, validating every option. (An NPU naming a peer needs
/// [`build_all`].)
pub fn build(spec: &DeviceSpec) -> Result<Built> {
    build_all(std::slice::from_ref(spec)).and_then(|mut v| {
        v.pop()
            .ok_or_else(|| anyhow::anyhow!("device {} was not built", spec.id))
    })
}

/// Options every PCI function takes (identity and reset behaviour).
#[derive(Debug)]
struct Common<'a> {
    vendor_id: &'a mut u16,
    device_id: &'a mut u16,
    class_code: &'a mut u32,
    no_soft_reset: &'a mut bool,
    immediate_readiness: &'a mut bool,
    journal_records: &'a mut usize,
}

/// The largest journal ring a device option may ask for (a record is ~100-200 bytes: at most a
/// few hundred MiB when full).
const MAX_JOURNAL_RECORDS: u64 = 1 << 20;

/// The common option names, for error messages.
const COMMON_OPTIONS: &str = "vendor, device, class, no_soft_reset, immediate_readiness, journal";

impl Common<'_> {
    /// Apply `k=v` if it is a common option; `Ok(false)` if it is not one.
    fn apply(&mut self, id: &str, k: &str, v: &str) -> Result<bool> {
        let ctx = || format!("device {id}: option {k}={v}");
        let id16 = |v: &str| -> Result<u16> {
            u16::try_from(parse_u64(v)?).map_err(|_| anyhow::anyhow!("{v} does not fit 16 bits"))
        };
        match k {
            "vendor" => *self.vendor_id = id16(v).with_context(ctx)?,
            "device" => *self.device_id = id16(v).with_context(ctx)?,
            "class" => {
                let c = parse_u64(v).with_context(ctx)?;
                if c > 0xff_ffff {
                    bail!("device {id}: class {v} does not fit 24 bits");
                }
                *self.class_code = c as u32;
            }
            "no_soft_reset" => *self.no_soft_reset = parse_bool(v).with_context(ctx)?,
            "immediate_readiness" => *self.immediate_readiness = parse_bool(v).with_context(ctx)?,
            "journal" => {
                let n = parse_u64(v).with_context(ctx)?;
                if !(16..=MAX_JOURNAL_RECORDS).contains(&n) {
                    bail!(
                        "device {id}: journal={v}: records kept must be 16..={MAX_JOURNAL_RECORDS}"
                    );
                }
                *self.journal_records = n as usize;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// A GPU already built, for NPUs that name it as peer: id, socket path, endpoint.
struct GpuPeer {
    id: String,
    socket: String,
    endpoint: Arc<Mutex<Endpoint<Gpu>>>,
}

/// Build every device, in order, and link NPUs to the GPUs they name with `peer=ID`: the NPU
/// reports the GPU present while a client (QEMU) is attached to it.
pub fn build_all(specs: &[DeviceSpec]) -> Result<Vec<Built>> {
    let mut gpus: Vec<GpuPeer> = Vec::new();
    let mut out = Vec::new();
    for spec in specs {
        match spec.kind {
            Kind::Gpu => {
                let (ep, description) = build_gpu(spec)?;
                let ep = Arc::new(Mutex::new(ep));
                gpus.push(GpuPeer {
                    id: spec.id.clone(),
                    socket: spec.socket.display().to_string(),
                    endpoint: ep.clone(),
                });
                out.push(Built {
                    device: ep.clone(),
                    control: ep,
                    description,
                });
            }
            Kind::Npu => out.push(build_npu(spec, &gpus)?),
        }
    }
    Ok(out)
}

fn build_npu(spec: &DeviceSpec, gpus: &[GpuPeer]) -> Result<Built> {
    let mut cfg = NpuConfig {
        name: spec.id.clone(),
        ..NpuConfig::default()
    };
    let mut peer = None;
    for (k, v) in &spec.opts {
        let mut common = Common {
            vendor_id: &mut cfg.vendor_id,
            device_id: &mut cfg.device_id,
            class_code: &mut cfg.class_code,
            no_soft_reset: &mut cfg.no_soft_reset,
            immediate_readiness: &mut cfg.immediate_readiness,
            journal_records: &mut cfg.journal_records,
        };
        if common.apply(&spec.id, k, v)? {
            continue;
        }
        let ctx = || format!("device {}: option {k}={v}", spec.id);
        match k.as_str() {
            "checking" => cfg.checking = parse_bool(v).with_context(ctx)?,
            "chunk_delay_us" => {
                let us: u64 = v.parse().with_context(ctx)?;
                cfg.chunk_delay = std::time::Duration::from_micros(us);
            }
            "peer" => {
                let g = gpus.iter().find(|g| g.id == *v).ok_or_else(|| {
                    anyhow::anyhow!(
                        "device {}: peer={v} names no GPU declared before it (GPUs: {})",
                        spec.id,
                        gpus.iter()
                            .map(|g| g.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?;
                peer = Some(g);
            }
            other => bail!(
                "device {}: unknown npu option {other:?} (known: peer, checking, chunk_delay_us, {COMMON_OPTIONS})",
                spec.id
            ),
        }
    }
    if let Some(GpuPeer {
        socket, endpoint, ..
    }) = peer
    {
        let g = endpoint
            .lock()
            .map_err(|_| anyhow::anyhow!("GPU lock poisoned"))?;
        let d = g.describe();
        cfg.peer = Some(PeerConfig {
            id: npu::peer_id_from_name(socket),
            vendor_id: d.vendor_id,
            device_id: d.device_id,
        });
    }
    let ep = npu::endpoint(&cfg).with_context(|| format!("device {}", spec.id))?;
    let description = ep.describe();
    if let Some(GpuPeer {
        id: gpu_id,
        endpoint,
        ..
    }) = peer
    {
        let presence = ep.function().peer_presence();
        let npu_id = spec.id.clone();
        let gpu_id = gpu_id.clone();
        endpoint
            .lock()
            .map_err(|_| anyhow::anyhow!("GPU lock poisoned"))?
            .on_presence(Box::new(move |present| {
                log::info!(
                    "{npu_id}: GPU peer {gpu_id} {}",
                    if present { "present" } else { "gone" }
                );
                presence.set(present);
            }));
    }
    let ep = Arc::new(Mutex::new(ep));
    Ok(Built {
        device: ep.clone(),
        control: ep,
        description,
    })
}

fn build_gpu(spec: &DeviceSpec) -> Result<(Endpoint<Gpu>, Description)> {
    let mut cfg = GpuConfig {
        name: spec.id.clone(),
        ..GpuConfig::default()
    };
    let mut corrupt_class = false;
    for (k, v) in &spec.opts {
        let mut common = Common {
            vendor_id: &mut cfg.vendor_id,
            device_id: &mut cfg.device_id,
            class_code: &mut cfg.class_code,
            no_soft_reset: &mut cfg.no_soft_reset,
            immediate_readiness: &mut cfg.immediate_readiness,
            journal_records: &mut cfg.journal_records,
        };
        if common.apply(&spec.id, k, v)? {
            continue;
        }
        let ctx = || format!("device {}: option {k}={v}", spec.id);
        match k.as_str() {
            "vram" => cfg.vram_size = parse_size(v).with_context(ctx)?,
            // MSI instead of MSI-X: QEMU 11.1.3 aborts on device_del of a vfio-user-pci device
            // with MSI-X, so a GPU meant for hot-remove uses MSI.
            "irq" => {
                cfg.irq = match v.as_str() {
                    "msix" => IrqMode::Msix,
                    "msi" => IrqMode::Msi,
                    _ => bail!("device {}: irq={v}: expected msix or msi", spec.id),
                }
            }
            // Fault knob: the function presents a class code other than the one it describes
            // (a mis-programmed strap). The guest suite's E1 must catch it.
            "x-corrupt-class" => corrupt_class = parse_bool(v).with_context(ctx)?,
            other => bail!(
                "device {}: unknown gpu option {other:?} (known: vram, irq, x-corrupt-class, \
                 {COMMON_OPTIONS})",
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
    Ok((ep, description))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn gpu(opts: &str) -> Result<Built> {
        build(&crate::spec::parse(
            &format!("gpu:socket=/tmp/unused.sock,id=g,vram=1M{opts}"),
            0,
        )?)
    }

    #[test]
    fn test_gpu_irq_option_selects_msi_or_msix() {
        let ids =
            |b: &Built| -> Vec<u8> { b.description.capabilities.iter().map(|c| c.id).collect() };
        assert_eq!(
            ids(&gpu("").unwrap()),
            [0x01, 0x11, 0x10],
            "MSI-X by default"
        );
        assert_eq!(ids(&gpu(",irq=msix").unwrap()), [0x01, 0x11, 0x10]);
        assert_eq!(ids(&gpu(",irq=msi").unwrap()), [0x01, 0x05, 0x10]);
        let e = gpu(",irq=intx").err().unwrap().to_string();
        assert!(e.contains("expected msix or msi"), "{e}");
    }

    /// Records `n` notes into a built device's journal and returns (records readable from
    /// the start, records lost).
    fn fill_journal(b: &Built, n: u64) -> (usize, u64) {
        let journal = b.control.lock().unwrap().journal();
        let start = journal.last_seq();
        for i in 0..n {
            journal.record(pcisim_journal::Event::Note {
                text: format!("note {i}"),
            });
        }
        let (records, lost) = journal.since(start);
        (records.len(), lost)
    }

    #[test]
    fn test_journal_option_sizes_the_ring_for_gpu_and_npu() {
        let default = pcisim_journal::DEFAULT_CAPACITY as u64;
        // The default ring loses what exceeds it (the instrument can see a loss) ...
        let (kept, lost) = fill_journal(&gpu("").unwrap(), default + 500);
        assert_eq!((kept as u64, lost), (default, 500));
        // ... and journal=N keeps N.
        let (kept, lost) = fill_journal(&gpu(",journal=16384").unwrap(), default + 500);
        assert_eq!((kept as u64, lost), (default + 500, 0));
        let npu =
            build(&crate::spec::parse("npu:socket=/tmp/unused.sock,id=n,journal=9000", 0).unwrap())
                .unwrap();
        let (kept, lost) = fill_journal(&npu, 9000);
        assert_eq!((kept, lost), (9000, 0));
        for bad in ["8", "x", "2000000"] {
            let e = gpu(&format!(",journal={bad}")).err().unwrap().to_string();
            assert!(e.contains("journal="), "{bad}: {e}");
        }
    }
}
