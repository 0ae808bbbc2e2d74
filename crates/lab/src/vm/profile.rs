//! VM profiles: which devices a lab VM has, where they sit, and how the machine is set up.
//!
//! A scenario names the profile it needs ([`ProfileId`]); the suite boots one VM per distinct
//! profile among the selected scenarios. One `pcisim serve` serves all of a VM's devices
//! (`--device` repeated), each on its own socket in the VM's directory.
//!
//! | profile | devices | hotplug | free ports | vIOMMU |
//! |---|---|---|---|---|
//! | `gpu` (default) | `gpu0` alone behind `rp1` | ACPI | 0 | yes |
//! | `gpu-npu` | `gpu0` (GPU) and `npu1` (NPU, `peer=gpu0`) as functions 0 and 1 of one slot behind `rp1` | native pciehp | 1 (`rp2`) | yes |
//! | `gpu-hotplug` | `gpu0` behind `rp1`; `gpu1` (`irq=msi`) served, unplugged, for `device_add` onto `rp2` | ACPI | 0 | yes |
//! | `gpu-npu-hotplug` | `gpu1` (`irq=msi`) served, unplugged, for `device_add` onto `rp1`; `npu0` (`peer=gpu1`) behind `rp2` | ACPI | 0 | yes |
//! | `gpu-pciehp` | as `gpu-hotplug`, with native PCIe hotplug (pciehp) | native pciehp | 0 | yes |
//! | `npu-sva` | `npu0` (`chunk_delay_us=500,journal=32768`) alone behind `rp1`, bound to the guest NPU driver | ACPI | 0 | no |
//! | `gpu-nsr` | `gpu0` behind `rp1`, `gpu1` (`no_soft_reset=on`) behind `rp2` | native pciehp | 0 | yes |
//! | `npu-probe-hang` | `npu0` alone behind `rp1`, for R10 then R10b, whose deadlocked probe leaves the VM unable to power off | ACPI | 0 | no |
//! | `gpu-userptr` | `gpu0` alone behind `rp1`, driven by the guest GPU driver (`pcisim_gpu.ko`) | native pciehp | 0 | yes |
//! | `gpu-2g` | as `gpu`, with 2 GiB of guest RAM (every other profile has 1 GiB) | ACPI | 0 | yes |
//!
//! Root ports are `rp1`, `rp2`, ... with `chassis` = `slot` = their number, created in the order
//! their first device appears in the profile, then the free ones (hotplug-capable, empty at
//! boot). Devices with `plugged: false` are served but left off the command line: their root
//! port exists, and [`crate::harness::host::HostCtx::device_add`] plugs them.

use std::path::Path;

use crate::vm::qemu::{HotplugMode, RootPort, VfioUserDevice};
use crate::vm::server;

/// The longest profile name or device id (they name the VM's directory and the devices' unix
/// sockets in it, and a socket path has at most 107 bytes).
pub const MAX_NAME_LEN: usize = 16;

/// Errors in a profile.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProfileError {
    /// A name or id is empty, too long or has characters QEMU or a path would not take.
    #[error("Profile {profile}: bad {what} {value:?} (letters, digits, '-' and '_', starting with a letter{limit})")]
    BadName {
        /// The profile.
        profile: String,
        /// `name` or `device id`.
        what: String,
        /// The value.
        value: String,
        /// A length limit, if any, as text.
        limit: String,
    },
    /// Two devices have the same id.
    #[error("Profile {profile}: device id {id:?} is used twice")]
    DuplicateId {
        /// The profile.
        profile: String,
        /// The id.
        id: String,
    },
    /// A slot's functions are inconsistent.
    #[error("Profile {profile}: slot {slot:?}: {what}")]
    BadSlot {
        /// The profile.
        profile: String,
        /// The slot's name.
        slot: String,
        /// What is wrong.
        what: String,
    },
    /// No device at all.
    #[error("Profile {0} has no device")]
    Empty(String),
    /// More root ports than chassis numbers.
    #[error("Profile {0} needs more than 255 root ports")]
    TooManyPorts(String),
}

/// What a device is (the `pcisim serve --device KIND:...` kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// The GPU function.
    Gpu,
    /// The NPU function (needs `pcisim serve --device npu:...`).
    Npu,
}

impl DeviceKind {
    /// `gpu`, `npu`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Gpu => "gpu",
            DeviceKind::Npu => "npu",
        }
    }
}

/// Where a device sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Function 0, alone behind its own root port.
    OwnPort,
    /// Function `function` of a multifunction slot: every device naming the same `slot` sits
    /// behind one root port; function 0 carries `multifunction=on` (QEMU's vfio code emulates
    /// the header type's multifunction bit).
    Function {
        /// The slot's name, local to the profile.
        slot: String,
        /// 0..=7.
        function: u8,
    },
}

/// One device of a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSlot {
    /// Its id: the server's device id, QEMU's device id, the socket's name (`gpu0.sock`).
    pub id: String,
    /// What it is.
    pub kind: DeviceKind,
    /// Extra `k=v` options for its `--device` spec (the suite's `--device-opt`s are added to
    /// every GPU's).
    pub opts: Vec<String>,
    /// Where it sits.
    pub placement: Placement,
    /// On the command line at boot (else served and left for `device_add`).
    pub plugged: bool,
}

impl DeviceSlot {
    /// A device alone behind its own root port, plugged at boot.
    pub fn own_port(id: &str, kind: DeviceKind) -> DeviceSlot {
        DeviceSlot {
            id: id.into(),
            kind,
            opts: Vec::new(),
            placement: Placement::OwnPort,
            plugged: true,
        }
    }

    /// Function `function` of multifunction slot `slot`, plugged at boot.
    pub fn function(id: &str, kind: DeviceKind, slot: &str, function: u8) -> DeviceSlot {
        DeviceSlot {
            placement: Placement::Function {
                slot: slot.into(),
                function,
            },
            ..DeviceSlot::own_port(id, kind)
        }
    }
}

/// A VM's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmProfile {
    /// Its name (also the VM's directory in the run directory).
    pub name: String,
    /// Its devices; the first is the one single-device scenarios (E1...) run against.
    pub devices: Vec<DeviceSlot>,
    /// ACPI or native PCIe hotplug.
    pub hotplug: HotplugMode,
    /// Empty hotplug-capable root ports for hot-add, after the devices' ports.
    pub free_ports: u8,
    /// An intel-iommu (a guest vfio user needs one: the Debian kernel has no VFIO_NOIOMMU).
    pub viommu: bool,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
}

/// Guest RAM of every profile but `gpu-2g`.
pub const DEFAULT_MEMORY_MIB: u64 = 1024;

/// The profiles scenarios can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProfileId {
    /// `gpu`: one GPU alone behind a root port, ACPI hotplug, vIOMMU.
    #[default]
    Gpu,
    /// `gpu-npu`: a GPU (`gpu0`) and an NPU (`npu1`, its peer `gpu0`) as functions 0 and 1 of
    /// one slot, so a bus/slot reset or a vfio hot reset covers both; native pciehp, one free
    /// port, vIOMMU. R0 and R7 run here.
    GpuNpu,
    /// `gpu-hotplug`: `gpu0` plugged behind `rp1` and `gpu1` served but unplugged, for
    /// `device_add` onto `rp2` (with MSI instead of MSI-X: QEMU 11.1.3 aborts on `device_del`
    /// of a device with MSI-X); ACPI hotplug, vIOMMU. The hotplug scenarios H1-H5 run here.
    GpuHotplug,
    /// `gpu-nsr`: `gpu0` behind `rp1` and `gpu1` with No_Soft_Reset = 1 behind `rp2`, each
    /// alone in its slot (so the guest offers `bus`, i.e. the slot reset); native pciehp (QEMU's
    /// root ports report Data Link Layer Link Active only then), vIOMMU. The reset scenarios
    /// R1, R3, R5, R6 and R8 run here.
    GpuNsr,
    /// `gpu-npu-hotplug`: `gpu1` (MSI) served but unplugged, for `device_add` onto `rp1`, and
    /// `npu0` (its peer `gpu1`) plugged behind `rp2`; ACPI hotplug, vIOMMU. H6 runs here.
    GpuNpuHotplug,
    /// `gpu-pciehp`: the `gpu-hotplug` devices (`gpu0` plugged, `gpu1` with MSI served for
    /// `device_add`) under native PCIe hotplug: the guest's pciehp driver handles the slots
    /// (attention button, power indicator, Data Link Layer state). H7 runs here.
    GpuPciehp,
    /// `npu-sva`: `npu0` alone behind `rp1`, with a slow engine (`chunk_delay_us=500`, so work
    /// is still in flight when a process exits); no vIOMMU: the NPU walks process page tables
    /// by physical address, which needs untranslated DMA (docs/sva.md). The guest NPU driver
    /// (`pcisim_npu.ko`) drives it. M6 and M7 run here.
    NpuSva,
    /// `npu-probe-hang`: `npu0` alone behind `rp1`, no vIOMMU, for R10 and then R10b: R10b's
    /// buggy probe deadlocks on the device lock for good, so nothing can run after it, and the
    /// power-off hangs in `device_shutdown()` (the suite kills QEMU after its power-off timeout).
    NpuProbeHang,
    /// `gpu-userptr`: the `gpu` profile's machine, under native PCIe hotplug, for the guest GPU
    /// driver (`pcisim_gpu.ko`, userptr through the vIOMMU): M8, M8b, M8d, M8c and R12 (AER
    /// recovery, which needs pciehp's slot reset) run here, apart from the vfio scenarios.
    GpuUserptr,
    /// `gpu-2g`: the `gpu` profile with 2 GiB of guest RAM, for a guest vfio user that maps
    /// 1 GiB of its own memory. M9 runs here.
    GpuLarge,
}

impl ProfileId {
    /// Why the guest of this profile cannot power off after its scenarios, if it cannot: the
    /// suite then ends QEMU at once instead of waiting out the power-off timeout (60 s).
    pub fn cannot_power_off(self) -> Option<&'static str> {
        match self {
            ProfileId::NpuProbeHang => Some(
                "R10b leaves its probing task deadlocked holding the NPU's device lock, which the \
                 guest's power-off (device_shutdown()) would wait for forever",
            ),
            _ => None,
        }
    }
    /// The suite's profiles (not [`ProfileId::GpuLarge`], the vfio selftests' machine).
    pub const SUITE: [ProfileId; 9] = [
        ProfileId::Gpu,
        ProfileId::GpuNpu,
        ProfileId::GpuHotplug,
        ProfileId::GpuNsr,
        ProfileId::GpuNpuHotplug,
        ProfileId::NpuSva,
        ProfileId::GpuPciehp,
        ProfileId::NpuProbeHang,
        ProfileId::GpuUserptr,
    ];

    /// The profile.
    pub fn profile(self) -> VmProfile {
        match self {
            ProfileId::Gpu => VmProfile {
                name: "gpu".into(),
                devices: vec![DeviceSlot::own_port("gpu0", DeviceKind::Gpu)],
                hotplug: HotplugMode::Acpi,
                free_ports: 0,
                viommu: true,
                memory_mib: DEFAULT_MEMORY_MIB,
            },
            ProfileId::GpuNpu => VmProfile {
                name: "gpu-npu".into(),
                devices: vec![
                    DeviceSlot::function("gpu0", DeviceKind::Gpu, "s1", 0),
                    DeviceSlot {
                        opts: vec!["peer=gpu0".into()],
                        ..DeviceSlot::function("npu1", DeviceKind::Npu, "s1", 1)
                    },
                ],
                hotplug: HotplugMode::NativePciehp,
                free_ports: 1,
                viommu: true,
                memory_mib: DEFAULT_MEMORY_MIB,
            },
            ProfileId::GpuHotplug => VmProfile {
                name: "gpu-hotplug".into(),
                devices: vec![
                    DeviceSlot::own_port("gpu0", DeviceKind::Gpu),
                    // MSI, not MSI-X: QEMU 11.1.3 aborts on device_del of a vfio-user-pci
                    // device with MSI-X (docs/lab.md).
                    DeviceSlot {
                        plugged: false,
                        opts: vec!["irq=msi".into()],
                        ..DeviceSlot::own_port("gpu1", DeviceKind::Gpu)
                    },
                ],
                hotplug: HotplugMode::Acpi,
                free_ports: 0,
                viommu: true,
                memory_mib: DEFAULT_MEMORY_MIB,
            },
            ProfileId::GpuNpuHotplug => VmProfile {
                name: "gpu-npu-hotplug".into(),
                devices: vec![
                    DeviceSlot {
                        plugged: false,
                        opts: vec!["irq=msi".into()],
                        ..DeviceSlot::own_port("gpu1", DeviceKind::Gpu)
                    },
                    DeviceSlot {
                        opts: vec!["peer=gpu1".into()],
                        ..DeviceSlot::own_port("npu0", DeviceKind::Npu)
                    },
                ],
                hotplug: HotplugMode::Acpi,
                free_ports: 0,
                viommu: true,
                memory_mib: DEFAULT_MEMORY_MIB,
            },
            ProfileId::GpuPciehp => VmProfile {
                name: "gpu-pciehp".into(),
                hotplug: HotplugMode::NativePciehp,
                ..ProfileId::GpuHotplug.profile()
            },
            ProfileId::NpuSva => VmProfile {
                name: "npu-sva".into(),
                devices: vec![DeviceSlot {
                    // M7's window (MADV_DONTNEED, munmap, mprotect and racing discards) journals
                    // ~4,500 records between two reads: more than the default 4,096-record ring,
                    // and a window that lost records fails (docs/journal.md).
                    opts: vec!["chunk_delay_us=500".into(), "journal=32768".into()],
                    ..DeviceSlot::own_port("npu0", DeviceKind::Npu)
                }],
                hotplug: HotplugMode::Acpi,
                free_ports: 0,
                viommu: false,
                memory_mib: DEFAULT_MEMORY_MIB,
            },
            ProfileId::NpuProbeHang => VmProfile {
                name: "npu-probe-hang".into(),
                devices: vec![DeviceSlot::own_port("npu0", DeviceKind::Npu)],
                hotplug: HotplugMode::Acpi,
                free_ports: 0,
                viommu: false,
                memory_mib: DEFAULT_MEMORY_MIB,
            },
            ProfileId::GpuUserptr => VmProfile {
                name: "gpu-userptr".into(),
                // R12's AER recovery resets the slot: under ACPI hotplug that is a plain SBR,
                // which 6.12 fails with ENOTTY (no Link Active, docs/reset.md).
                hotplug: HotplugMode::NativePciehp,
                ..ProfileId::Gpu.profile()
            },
            ProfileId::GpuLarge => VmProfile {
                name: "gpu-2g".into(),
                memory_mib: 2048,
                ..ProfileId::Gpu.profile()
            },
            ProfileId::GpuNsr => VmProfile {
                name: "gpu-nsr".into(),
                devices: vec![
                    DeviceSlot::own_port("gpu0", DeviceKind::Gpu),
                    DeviceSlot {
                        opts: vec!["no_soft_reset=on".into()],
                        ..DeviceSlot::own_port("gpu1", DeviceKind::Gpu)
                    },
                ],
                hotplug: HotplugMode::NativePciehp,
                free_ports: 0,
                viommu: true,
                memory_mib: DEFAULT_MEMORY_MIB,
            },
        }
    }
}

/// A profile laid out for QEMU: its root ports and devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmLayout {
    /// Every root port, in order.
    pub root_ports: Vec<RootPort>,
    /// Every device (plugged at boot or not), in the profile's order.
    pub devices: Vec<VfioUserDevice>,
    /// The ids of the empty ports for hot-add.
    pub free_ports: Vec<String>,
}

impl VmLayout {
    /// The device with QEMU id `id`.
    pub fn device(&self, id: &str) -> Option<&VfioUserDevice> {
        self.devices.iter().find(|d| d.id == id)
    }
}

fn good_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl VmProfile {
    /// Checks names, ids and slots.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let bad = |what: &str, value: &str, limit: &str| ProfileError::BadName {
            profile: self.name.clone(),
            what: what.into(),
            value: value.into(),
            limit: limit.into(),
        };
        if !good_name(&self.name, MAX_NAME_LEN) {
            return Err(bad(
                "name",
                &self.name,
                &format!(", at most {MAX_NAME_LEN}"),
            ));
        }
        if self.devices.is_empty() {
            return Err(ProfileError::Empty(self.name.clone()));
        }
        let mut slots: Vec<(&str, Vec<(u8, bool)>)> = Vec::new();
        for (i, d) in self.devices.iter().enumerate() {
            if !good_name(&d.id, MAX_NAME_LEN) {
                return Err(bad(
                    "device id",
                    &d.id,
                    &format!(", at most {MAX_NAME_LEN}"),
                ));
            }
            if self.devices[..i].iter().any(|o| o.id == d.id) {
                return Err(ProfileError::DuplicateId {
                    profile: self.name.clone(),
                    id: d.id.clone(),
                });
            }
            if let Placement::Function { slot, function } = &d.placement {
                match slots.iter_mut().find(|(s, _)| s == slot) {
                    Some((_, fns)) => fns.push((*function, d.plugged)),
                    None => slots.push((slot, vec![(*function, d.plugged)])),
                }
            }
        }
        for (slot, fns) in &slots {
            let err = |what: String| ProfileError::BadSlot {
                profile: self.name.clone(),
                slot: slot.to_string(),
                what,
            };
            for (i, (f, _)) in fns.iter().enumerate() {
                if *f > 7 {
                    return Err(err(format!("function {f} (0..=7)")));
                }
                if fns[..i].iter().any(|(g, _)| g == f) {
                    return Err(err(format!("function {f} twice")));
                }
            }
            match fns.iter().find(|(f, _)| *f == 0) {
                None => return Err(err("no function 0".into())),
                Some((_, false)) if fns.iter().any(|(_, plugged)| *plugged) => {
                    return Err(err(
                        "function 0 must be plugged at boot if another function is".into(),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Root ports and devices (sockets `<socket_dir>/<id>.sock`).
    pub fn layout(&self, socket_dir: &Path) -> Result<VmLayout, ProfileError> {
        self.validate()?;
        let mut root_ports: Vec<RootPort> = Vec::new();
        let mut slot_ports: Vec<(&str, String)> = Vec::new();
        let new_port = |ports: &mut Vec<RootPort>, hotplug: bool| {
            let n = u8::try_from(ports.len() + 1)
                .map_err(|_| ProfileError::TooManyPorts(self.name.clone()))?;
            let id = format!("rp{n}");
            ports.push(RootPort {
                id: id.clone(),
                chassis: n,
                hotplug,
            });
            Ok::<String, ProfileError>(id)
        };
        let mut devices = Vec::new();
        for d in &self.devices {
            let (bus, addr, multifunction) = match &d.placement {
                Placement::OwnPort => (new_port(&mut root_ports, !d.plugged)?, None, false),
                Placement::Function { slot, function } => {
                    let bus = match slot_ports.iter().find(|(s, _)| s == slot) {
                        Some((_, bus)) => bus.clone(),
                        None => {
                            let bus = new_port(&mut root_ports, !d.plugged)?;
                            slot_ports.push((slot, bus.clone()));
                            bus
                        }
                    };
                    let more = self.devices.iter().any(|o| {
                        matches!(&o.placement, Placement::Function { slot: s, function: f }
                            if s == slot && *f != 0)
                    });
                    (bus, Some(format!("00.{function}")), *function == 0 && more)
                }
            };
            devices.push(VfioUserDevice {
                id: d.id.clone(),
                socket: socket_dir.join(format!("{}.sock", d.id)),
                bus,
                addr,
                multifunction,
                at_boot: d.plugged,
            });
        }
        let mut free_ports = Vec::new();
        for _ in 0..self.free_ports {
            free_ports.push(new_port(&mut root_ports, true)?);
        }
        Ok(VmLayout {
            root_ports,
            devices,
            free_ports,
        })
    }

    /// The `--device` specs for `pcisim serve`/`describe`, with `gpu_opts` added to every GPU's.
    pub fn specs(&self, layout: &VmLayout, gpu_opts: &[String]) -> Vec<String> {
        self.devices
            .iter()
            .zip(&layout.devices)
            .map(|(d, v)| {
                let mut opts = d.opts.clone();
                if d.kind == DeviceKind::Gpu {
                    opts.extend(gpu_opts.iter().cloned());
                }
                server::device_spec(d.kind.as_str(), &v.socket, &d.id, &opts)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_default_profile_is_todays_vm() {
        let p = ProfileId::default().profile();
        assert_eq!(p.name, "gpu");
        let l = p.layout(Path::new("/run/lab/gpu")).unwrap();
        assert_eq!(
            l.root_ports,
            [RootPort {
                id: "rp1".into(),
                chassis: 1,
                hotplug: false
            }]
        );
        assert_eq!(
            l.devices,
            [VfioUserDevice {
                id: "gpu0".into(),
                socket: "/run/lab/gpu/gpu0.sock".into(),
                bus: "rp1".into(),
                addr: None,
                multifunction: false,
                at_boot: true,
            }]
        );
        assert!(l.free_ports.is_empty());
        assert_eq!(
            p.specs(&l, &["x-corrupt-class=1".into()]),
            ["gpu:socket=/run/lab/gpu/gpu0.sock,id=gpu0,x-corrupt-class=1"]
        );
        assert_eq!(p.hotplug, HotplugMode::Acpi);
        assert!(p.viommu);
    }

    #[test]
    fn test_gpu_npu_profile_two_functions_one_port_and_a_free_one() {
        let p = ProfileId::GpuNpu.profile();
        assert_eq!(p.name, "gpu-npu");
        let l = p.layout(Path::new("/r")).unwrap();
        assert_eq!(l.root_ports.len(), 2);
        assert_eq!(
            l.root_ports[1].arg(),
            "pcie-root-port,id=rp2,chassis=2,slot=2,hotplug=on,pref64-reserve=1G"
        );
        assert_eq!(l.free_ports, ["rp2"]);
        let f0 = l.device("gpu0").unwrap();
        let f1 = l.device("npu1").unwrap();
        assert_eq!(
            (f0.bus.as_str(), f0.addr.as_deref(), f0.multifunction),
            ("rp1", Some("00.0"), true)
        );
        assert_eq!(
            (f1.bus.as_str(), f1.addr.as_deref(), f1.multifunction),
            ("rp1", Some("00.1"), false)
        );
        assert_eq!(p.hotplug, HotplugMode::NativePciehp);
        assert_eq!(
            p.specs(&l, &["vram=1M".into()]),
            [
                "gpu:socket=/r/gpu0.sock,id=gpu0,vram=1M",
                "npu:socket=/r/npu1.sock,id=npu1,peer=gpu0"
            ]
        );
    }

    #[test]
    fn test_unplugged_device_gets_a_hotplug_port_and_stays_off_the_command_line() {
        let mut p = ProfileId::Gpu.profile();
        let mut npu = DeviceSlot::own_port("npu0", DeviceKind::Npu);
        npu.plugged = false;
        npu.opts.push("peer=gpu0".into());
        p.devices.push(npu);
        let l = p.layout(Path::new("/r")).unwrap();
        assert_eq!(
            l.root_ports[1].arg(),
            "pcie-root-port,id=rp2,chassis=2,slot=2,hotplug=on,pref64-reserve=1G"
        );
        assert!(!l.device("npu0").unwrap().at_boot);
        assert_eq!(
            p.specs(&l, &["vram=1M".into()])[1],
            "npu:socket=/r/npu0.sock,id=npu0,peer=gpu0",
            "GPU options go to GPUs only"
        );
    }

    #[test]
    fn test_validation() {
        let base = ProfileId::GpuNpu.profile();
        let check = |f: &dyn Fn(&mut VmProfile)| {
            let mut p = base.clone();
            f(&mut p);
            p.validate()
        };
        assert_eq!(check(&|_| {}), Ok(()));
        assert!(matches!(
            check(&|p| p.name = "a-very-long-profile-name".into()),
            Err(ProfileError::BadName { .. })
        ));
        assert!(matches!(
            check(&|p| p.devices[1].id = "gpu0".into()),
            Err(ProfileError::DuplicateId { .. })
        ));
        assert!(matches!(
            check(&|p| p.devices[1].id = "gpu 1".into()),
            Err(ProfileError::BadName { .. })
        ));
        assert!(matches!(
            check(&|p| p.devices[1] = DeviceSlot::function("gpu1", DeviceKind::Gpu, "s1", 0)),
            Err(ProfileError::BadSlot { .. })
        ));
        assert!(matches!(
            check(&|p| p.devices[1] = DeviceSlot::function("gpu1", DeviceKind::Gpu, "s1", 8)),
            Err(ProfileError::BadSlot { .. })
        ));
        assert!(matches!(
            check(&|p| {
                p.devices.remove(0);
            }),
            Err(ProfileError::BadSlot { .. })
        ));
        assert!(matches!(
            check(&|p| p.devices[0].plugged = false),
            Err(ProfileError::BadSlot { .. })
        ));
        assert!(matches!(
            check(&|p| p.devices.clear()),
            Err(ProfileError::Empty(_))
        ));
    }
}
