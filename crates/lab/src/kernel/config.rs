//! The configuration a run needs: the options each VM profile requires ([`requirements`]), a
//! parsed kernel `.config` ([`KConfig`]) and the check of one against the other ([`check`]).

use std::collections::{BTreeMap, BTreeSet};

use super::KernelError;
use crate::vm::profile::{DeviceKind, VmProfile};
use crate::vm::qemu::HotplugMode;

/// A parsed kernel `.config`: option (without `CONFIG_`) → value (`y`, `m`, `"text"`, a number;
/// `n` for `# CONFIG_X is not set`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KConfig {
    pub(crate) values: BTreeMap<String, String>,
}

impl KConfig {
    /// Parses `.config` text.
    pub fn parse(text: &str) -> KConfig {
        let mut values = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# CONFIG_") {
                if let Some(name) = rest.strip_suffix(" is not set") {
                    values.insert(name.to_string(), "n".to_string());
                }
            } else if let Some(rest) = line.strip_prefix("CONFIG_") {
                if let Some((name, value)) = rest.split_once('=') {
                    values.insert(name.to_string(), value.to_string());
                }
            }
        }
        KConfig { values }
    }

    /// The value of `option` (without `CONFIG_`); `None` if the config does not mention it
    /// (which for a bool/tristate means `n`: the option's dependencies are off).
    pub fn get(&self, option: &str) -> Option<&str> {
        self.values.get(option).map(String::as_str)
    }

    /// How many options it sets or mentions.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether it mentions no option at all (not a kernel config).
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// What an option must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// `=y` (used before any module can be loaded, or not a tristate).
    Builtin,
    /// `=y` or `=m` (the lab's initramfs loads the module).
    Enabled,
}

/// When an option is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// By every run of a profile with this group.
    Always,
    /// Only with `--share` (virtio-9p host directories).
    Share,
}

/// One configuration option a profile needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirement {
    /// The option without `CONFIG_` (`VFIO_PCI`).
    pub option: &'static str,
    /// What it must be.
    pub need: Need,
    /// Its module's name as in `modules.dep` (`vfio_pci`), for the check without a config.
    pub module: Option<&'static str>,
    /// Why the lab needs it.
    pub why: &'static str,
    /// When.
    pub purpose: Purpose,
}

const fn req(
    option: &'static str,
    need: Need,
    module: Option<&'static str>,
    why: &'static str,
) -> Requirement {
    Requirement {
        option,
        need,
        module,
        why,
        purpose: Purpose::Always,
    }
}

/// A named group of requirements; a profile needs the union of its groups ([`requirements`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequirementGroup {
    /// Its name (`vfio`, `viommu`, ...).
    pub name: &'static str,
    /// Its options.
    pub options: &'static [Requirement],
}

/// Every lab VM: the initramfs, the consoles, PCIe root ports with MSI/MSI-X, and vfio with the
/// type1 IOMMU backend (what the guest programs use; iommufd is not needed).
pub const BASE: RequirementGroup = RequirementGroup {
    name: "base",
    options: &[
        req(
            "BLK_DEV_INITRD",
            Need::Builtin,
            None,
            "the lab boots an initramfs",
        ),
        req("DEVTMPFS", Need::Builtin, None, "/init mounts devtmpfs"),
        req(
            "SERIAL_8250",
            Need::Builtin,
            None,
            "console and agent on ttyS0-2",
        ),
        req("SERIAL_8250_CONSOLE", Need::Builtin, None, "console=ttyS0"),
        req(
            "MODULES",
            Need::Builtin,
            None,
            "/init loads the vfio modules",
        ),
        req("PCI_MSI", Need::Builtin, None, "the devices' MSI/MSI-X"),
        req(
            "PCIEPORTBUS",
            Need::Builtin,
            None,
            "the devices sit behind PCIe root ports",
        ),
        req(
            "VFIO",
            Need::Enabled,
            Some("vfio"),
            "the guest programs drive the devices through vfio",
        ),
        req(
            "VFIO_PCI",
            Need::Enabled,
            Some("vfio_pci"),
            "vfio-pci binds the devices",
        ),
        req(
            "VFIO_IOMMU_TYPE1",
            Need::Enabled,
            Some("vfio_iommu_type1"),
            "the guest programs use the type1 container",
        ),
    ],
};

/// Profiles with an intel-iommu (vfio needs an IOMMU: VFIO_NOIOMMU is off in Debian's kernels).
pub const VIOMMU: RequirementGroup = RequirementGroup {
    name: "viommu",
    options: &[
        req("IOMMU_SUPPORT", Need::Builtin, None, "the vIOMMU"),
        req(
            "INTEL_IOMMU",
            Need::Builtin,
            None,
            "QEMU's intel-iommu (intel_iommu=on)",
        ),
    ],
};

/// Profiles with ACPI hotplug (QEMU's default for root ports).
pub const ACPI_HOTPLUG: RequirementGroup = RequirementGroup {
    name: "acpi-hotplug",
    options: &[
        req("HOTPLUG_PCI", Need::Builtin, None, "PCI hotplug"),
        req(
            "HOTPLUG_PCI_ACPI",
            Need::Builtin,
            None,
            "ACPI PCI hotplug (acpiphp)",
        ),
    ],
};

/// Profiles with native PCIe hotplug (pciehp: hotplug, slot resets).
pub const PCIE_HOTPLUG: RequirementGroup = RequirementGroup {
    name: "pciehp",
    options: &[
        req("HOTPLUG_PCI", Need::Builtin, None, "PCI hotplug"),
        req(
            "HOTPLUG_PCI_PCIE",
            Need::Builtin,
            None,
            "native PCIe hotplug (pciehp), slot resets",
        ),
    ],
};

/// Profiles with an NPU: the scenarios load our guest driver `pcisim_npu.ko` and unload it.
pub const NPU_DRIVER: RequirementGroup = RequirementGroup {
    name: "npu-driver",
    options: &[req(
        "MODULE_UNLOAD",
        Need::Builtin,
        None,
        "the NPU scenarios rmmod pcisim_npu",
    )],
};

/// `--share` (virtio-9p); checked only when a run shares a directory.
pub const SHARE: RequirementGroup = RequirementGroup {
    name: "share",
    options: &[
        Requirement {
            purpose: Purpose::Share,
            ..req("NET_9P", Need::Enabled, Some("9pnet"), "needed for --share")
        },
        Requirement {
            purpose: Purpose::Share,
            ..req(
                "NET_9P_VIRTIO",
                Need::Enabled,
                Some("9pnet_virtio"),
                "needed for --share",
            )
        },
        Requirement {
            purpose: Purpose::Share,
            ..req("9P_FS", Need::Enabled, Some("9p"), "needed for --share")
        },
    ],
};

/// The requirement groups of a VM profile: [`BASE`] and [`SHARE`] always, [`VIOMMU`] with a
/// vIOMMU, [`ACPI_HOTPLUG`] or [`PCIE_HOTPLUG`] after its hotplug mode, [`NPU_DRIVER`] with an NPU.
pub fn requirement_groups(profile: &VmProfile) -> Vec<&'static RequirementGroup> {
    let mut groups = vec![&BASE];
    if profile.viommu {
        groups.push(&VIOMMU);
    }
    groups.push(match profile.hotplug {
        HotplugMode::Acpi => &ACPI_HOTPLUG,
        HotplugMode::NativePciehp => &PCIE_HOTPLUG,
    });
    if profile.devices.iter().any(|d| d.kind == DeviceKind::Npu) {
        groups.push(&NPU_DRIVER);
    }
    groups.push(&SHARE);
    groups
}

/// The options the given profiles need together, each once, in table order.
pub fn requirements<'a>(profiles: impl IntoIterator<Item = &'a VmProfile>) -> Vec<Requirement> {
    let mut out: Vec<Requirement> = Vec::new();
    for p in profiles {
        for g in requirement_groups(p) {
            for r in g.options {
                if !out.iter().any(|o| o.option == r.option) {
                    out.push(*r);
                }
            }
        }
    }
    out
}

/// What the check can read about a kernel.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// Its config and where it came from.
    pub config: Option<(KConfig, String)>,
    /// Module names in its `modules.dep` (loadable) and `modules.builtin` (built in).
    pub loadable: BTreeSet<String>,
    /// See [`loadable`](Self::loadable).
    pub builtin: BTreeSet<String>,
}

/// One requirement the kernel does not meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmet {
    /// The requirement.
    pub req: Requirement,
    /// What was found (`is not set`, `=m`, `no vfio_pci.ko in modules.dep or modules.builtin`).
    pub found: String,
}

/// The outcome of [`check`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Where the verdicts come from (`config /x/.config`, `modules tree (no config)`).
    pub source: String,
    /// Unmet requirements the run needs: the run must not boot.
    pub missing: Vec<Unmet>,
    /// Unmet `--share` requirements of a run without `--share` (a note).
    pub share_missing: Vec<Unmet>,
    /// Requirements that could not be checked (no config: built-in options).
    pub unchecked: Vec<Requirement>,
    /// Requirements met.
    pub met: usize,
}

fn describe_value(v: Option<&str>) -> String {
    match v {
        None => "absent (its dependencies are off)".into(),
        Some("n") => "is not set".into(),
        Some(v) => format!("={v}"),
    }
}

/// Checks `reqs` against what is known about a kernel. `share`: the run shares directories
/// (else [`Purpose::Share`] options are only noted).
pub fn check(reqs: &[Requirement], ev: &Evidence, share: bool) -> CheckReport {
    let mut report = CheckReport {
        source: match &ev.config {
            Some((_, from)) => format!("config {from}"),
            None => "the module tree (no config found)".into(),
        },
        ..CheckReport::default()
    };
    for r in reqs {
        let unmet = match &ev.config {
            Some((cfg, _)) => {
                let v = cfg.get(r.option);
                let ok = match r.need {
                    Need::Builtin => v == Some("y"),
                    Need::Enabled => matches!(v, Some("y" | "m")),
                };
                (!ok).then(|| describe_value(v))
            }
            None => match r.module {
                Some(m) if ev.loadable.contains(m) || ev.builtin.contains(m) => None,
                Some(m) => Some(format!(
                    "no {m} module in modules.dep and not in modules.builtin"
                )),
                None => {
                    report.unchecked.push(*r);
                    continue;
                }
            },
        };
        match unmet {
            None => report.met += 1,
            Some(found) => {
                let u = Unmet { req: *r, found };
                if r.purpose == Purpose::Share && !share {
                    report.share_missing.push(u);
                } else {
                    report.missing.push(u);
                }
            }
        }
    }
    report
}

impl CheckReport {
    /// The error for a kernel that misses options, naming every `CONFIG_` option.
    pub fn error(&self, kernel: &str, profiles: &str) -> Option<KernelError> {
        if self.missing.is_empty() {
            return None;
        }
        let lines: Vec<String> = self
            .missing
            .iter()
            .map(|u| {
                format!(
                    "  CONFIG_{} {} (need {}: {})",
                    u.req.option,
                    u.found,
                    match u.req.need {
                        Need::Builtin => "=y",
                        Need::Enabled => "=y or =m",
                    },
                    u.req.why
                )
            })
            .collect();
        let names: Vec<String> = self
            .missing
            .iter()
            .map(|u| format!("CONFIG_{}", u.req.option))
            .collect();
        Some(KernelError::Config(format!(
            "The guest kernel ({kernel}) lacks what the profile(s) {profiles} need, checked in {} before boot:\n{}\nEnable {} and rebuild (e.g. scripts/config --enable/--module NAME; make olddefconfig).",
            self.source,
            lines.join("\n"),
            names.join(" ")
        )))
    }

    /// A one-line summary for the progress report.
    pub fn summary(&self) -> String {
        let mut s = format!("{} option(s) checked in {}: all met", self.met, self.source);
        if !self.unchecked.is_empty() {
            let names: Vec<String> = self
                .unchecked
                .iter()
                .map(|r| format!("CONFIG_{}", r.option))
                .collect();
            s.push_str(&format!(
                "; not checkable without a config: {}",
                names.join(" ")
            ));
        }
        if !self.share_missing.is_empty() {
            let names: Vec<String> = self
                .share_missing
                .iter()
                .map(|u| format!("CONFIG_{}", u.req.option))
                .collect();
            s.push_str(&format!("; --share would need {}", names.join(" ")));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::module_names;
    use crate::kernel::testutil::full_config;
    use crate::vm::profile::ProfileId;

    /// The per-profile table: which requirement groups each suite profile needs.
    #[test]
    fn test_requirement_groups_per_profile() {
        let table: [(ProfileId, &[&str]); 7] = [
            (ProfileId::Gpu, &["base", "viommu", "acpi-hotplug", "share"]),
            (
                ProfileId::GpuNpu,
                &["base", "viommu", "pciehp", "npu-driver", "share"],
            ),
            (
                ProfileId::GpuHotplug,
                &["base", "viommu", "acpi-hotplug", "share"],
            ),
            (ProfileId::GpuNsr, &["base", "viommu", "pciehp", "share"]),
            (
                ProfileId::GpuNpuHotplug,
                &["base", "viommu", "acpi-hotplug", "npu-driver", "share"],
            ),
            (
                ProfileId::NpuSva,
                &["base", "acpi-hotplug", "npu-driver", "share"],
            ),
            (ProfileId::GpuPciehp, &["base", "viommu", "pciehp", "share"]),
        ];
        for (id, want) in table {
            let got: Vec<&str> = requirement_groups(&id.profile())
                .iter()
                .map(|g| g.name)
                .collect();
            assert_eq!(got, want, "{id:?}");
        }
        // Every group's options are CONFIG_ names without the prefix, each once per group.
        for g in [
            &BASE,
            &VIOMMU,
            &ACPI_HOTPLUG,
            &PCIE_HOTPLUG,
            &NPU_DRIVER,
            &SHARE,
        ] {
            for r in g.options {
                assert!(!r.option.starts_with("CONFIG_"), "{}", r.option);
                assert!(!r.why.is_empty());
            }
        }
        let all = requirements(
            ProfileId::SUITE
                .iter()
                .map(|id| id.profile())
                .collect::<Vec<_>>()
                .iter(),
        );
        let names: Vec<&str> = all.iter().map(|r| r.option).collect();
        for must in [
            "VFIO",
            "VFIO_PCI",
            "VFIO_IOMMU_TYPE1",
            "INTEL_IOMMU",
            "HOTPLUG_PCI_PCIE",
            "HOTPLUG_PCI_ACPI",
            "NET_9P",
            "NET_9P_VIRTIO",
            "9P_FS",
        ] {
            assert_eq!(names.iter().filter(|n| **n == must).count(), 1, "{must}");
        }
        // npu-sva has no vIOMMU: INTEL_IOMMU is not required there.
        let sva = requirements([ProfileId::NpuSva.profile()].iter());
        assert!(!sva.iter().any(|r| r.option == "INTEL_IOMMU"));
    }

    #[test]
    fn test_kconfig_parse() {
        let c = KConfig::parse(
            "# comment\nCONFIG_VFIO=m\nCONFIG_INTEL_IOMMU=y\n# CONFIG_IOMMUFD is not set\nCONFIG_CC_VERSION_TEXT=\"gcc 14\"\nCONFIG_NR_CPUS=64\n",
        );
        assert_eq!(c.get("VFIO"), Some("m"));
        assert_eq!(c.get("INTEL_IOMMU"), Some("y"));
        assert_eq!(c.get("IOMMUFD"), Some("n"));
        assert_eq!(c.get("CC_VERSION_TEXT"), Some("\"gcc 14\""));
        assert_eq!(c.get("VFIO_PCI"), None);
        assert_eq!(c.len(), 5);
        assert!(KConfig::parse("hello\n").is_empty());
    }

    #[test]
    fn test_check_config_names_missing_options() {
        let reqs = requirements([ProfileId::GpuNsr.profile()].iter());
        // A complete config passes.
        let ev = Evidence {
            config: Some((KConfig::parse(&full_config()), "full".into())),
            ..Evidence::default()
        };
        let r = check(&reqs, &ev, false);
        assert!(r.missing.is_empty(), "{r:?}");
        assert!(r.error("k", "gpu-nsr").is_none());
        assert_eq!(r.met, reqs.len());
        // Without VFIO, with pciehp as a module (must be built in) and no 9p.
        let text = full_config()
            .replace("CONFIG_VFIO=m\n", "# CONFIG_VFIO is not set\n")
            .replace("CONFIG_HOTPLUG_PCI_PCIE=y", "CONFIG_HOTPLUG_PCI_PCIE=m")
            .replace("CONFIG_9P_FS=m\n", "");
        let ev = Evidence {
            config: Some((KConfig::parse(&text), "/x/.config".into())),
            ..Evidence::default()
        };
        let r = check(&reqs, &ev, false);
        let missing: Vec<&str> = r.missing.iter().map(|u| u.req.option).collect();
        assert_eq!(missing, ["VFIO", "HOTPLUG_PCI_PCIE"]);
        // 9p is only needed for --share: a note without, an error with.
        assert_eq!(r.share_missing.len(), 1);
        assert!(
            r.summary().contains("--share would need CONFIG_9P_FS"),
            "{}",
            r.summary()
        );
        let e = r.error("my kernel", "gpu-nsr").unwrap().to_string();
        assert!(e.contains("CONFIG_VFIO is not set"), "{e}");
        assert!(e.contains("CONFIG_HOTPLUG_PCI_PCIE =m (need =y"), "{e}");
        assert!(e.contains("/x/.config"), "{e}");
        let r = check(&reqs, &ev, true);
        assert!(r.missing.iter().any(|u| u.req.option == "9P_FS"));
    }

    #[test]
    fn test_check_without_config_uses_module_tree() {
        let reqs = requirements([ProfileId::Gpu.profile()].iter());
        let mut ev = Evidence {
            loadable: module_names(
                "kernel/drivers/vfio/vfio.ko.xz:\nkernel/drivers/vfio/pci/vfio-pci.ko.xz: kernel/drivers/vfio/vfio.ko.xz\n",
            ),
            builtin: module_names("kernel/drivers/vfio/vfio_iommu_type1.ko\n"),
            config: None,
        };
        let r = check(&reqs, &ev, false);
        assert!(r.missing.is_empty(), "{r:?}");
        assert!(r.source.contains("no config"));
        // Built-in-only options cannot be checked from modules: reported, not passed silently.
        assert!(r.unchecked.iter().any(|q| q.option == "INTEL_IOMMU"));
        assert!(r.summary().contains("not checkable without a config"));
        ev.loadable.remove("vfio_pci");
        let r = check(&reqs, &ev, false);
        assert_eq!(r.missing.len(), 1);
        assert_eq!(r.missing[0].req.option, "VFIO_PCI");
        assert!(r
            .error("k", "gpu")
            .unwrap()
            .to_string()
            .contains("CONFIG_VFIO_PCI no vfio_pci module"));
    }
}
