//! The guest kernel: which one (a Debian series, a user's image, a user's built tree), its own
//! cache entry, and a check of its configuration against what the VM profiles need, before boot.
//!
//! | flag | kernel | modules | KDIR for our modules | cache entry |
//! |---|---|---|---|---|
//! | `--kernel 6.12` / `7.3` | Debian trixie / trixie-backports | the package's | its `linux-headers` in the trixie root | `guest/debian-<series>` (provision.sh) |
//! | `--kernel-image PATH [--modules DIR]` | `PATH` (bzImage/vmlinuz) | `DIR` (an `INSTALL_MOD_PATH` tree or the `<kver>` directory itself) | the tree the modules' `build` link names, if on this host; else none (our modules are not built) | `guest/image-<hash>` |
//! | `--kernel-tree DIR` | `DIR/arch/x86/boot/bzImage` | `make modules_install` into the entry | `DIR` (built with the host's make and gcc, the tree's own) | `guest/tree-<hash>` |
//!
//! `provision.sh` always runs (QEMU, busybox, the trixie root, the accelerator verdict) for a
//! Debian series: the one asked for, or [`DEFAULT_SERIES`] for a user's kernel, which then gets an
//! entry of its own next to the Debian ones. Nothing here writes into another kernel's entry, the
//! QEMU wrapper or the trixie root (apart from its world-writable `/tmp`).
//!
//! The configuration check ([`check`]) reads the kernel's config (a tree's `.config`; for an
//! image a `config`/`config-<kver>` beside its modules, else the config embedded in the image
//! with `CONFIG_IKCONFIG`; for a Debian series the package's) and compares it with the
//! [`requirements`] of the profiles the run uses. Without any config the module tree is checked
//! instead (`vfio.ko`, `vfio-pci.ko`, `vfio_iommu_type1.ko` in `modules.dep` or
//! `modules.builtin`), and the built-in-only options are reported as unchecked.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::UNIX_EPOCH;

use log::{debug, warn};

use crate::vm::profile::{DeviceKind, VmProfile};
use crate::vm::provision::{self, ProvisionEnv, ProvisionError};
use crate::vm::qemu::HotplugMode;

/// The Debian kernel series `--kernel` accepts (the same list as `kernel_suite()` in
/// `qemu-scripts/provision.sh`), with the suite each comes from.
pub const DEBIAN_SERIES: &[(&str, &str)] = &[("6.12", "trixie"), ("7.3", "trixie-backports")];

/// The series provisioned when none is asked for, and the base (QEMU, busybox, accel probe) of
/// runs with a user's kernel.
pub const DEFAULT_SERIES: &str = "6.12";

/// Errors selecting, checking or caching the guest kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// `--kernel` names no series we provision.
    #[error("Unsupported --kernel {0:?} (supported: {supported}; or --kernel-image PATH [--modules DIR], --kernel-tree DIR)", supported = supported_series())]
    UnsupportedSeries(String),
    /// Contradictory flags.
    #[error("{0}")]
    Flags(String),
    /// A file or directory could not be read, written or found.
    #[error("{what} {path}")]
    Io {
        /// What was being done ("Cannot read").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The user's kernel is not usable as given (not a bzImage, modules of another release...).
    #[error("{0}")]
    Unusable(String),
    /// The kernel lacks configuration the run needs (found before boot).
    #[error("{0}")]
    Config(String),
    /// Provisioning (QEMU, busybox, the Debian kernel) failed.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// A helper command (make modules_install, depmod, cp) failed.
    #[error("{what} failed ({status}); see {log}")]
    Command {
        /// The command.
        what: String,
        /// How it ended.
        status: String,
        /// Its log.
        log: PathBuf,
    },
}

fn supported_series() -> String {
    DEBIAN_SERIES
        .iter()
        .map(|(s, suite)| format!("{s} (Debian {suite})"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> KernelError {
    let path = path.to_path_buf();
    move |source| KernelError::Io { what, path, source }
}

// ---------------------------------------------------------------------------------------------
// Which kernel
// ---------------------------------------------------------------------------------------------

/// The guest kernel a run asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// A Debian series (`6.12`, `7.3`), provisioned by `provision.sh`.
    Series(String),
    /// A user's bzImage/vmlinuz and, optionally, its installed modules.
    Image {
        /// The kernel image.
        image: PathBuf,
        /// An `INSTALL_MOD_PATH` tree (`DIR/lib/modules/<kver>/`) or the `<kver>` directory.
        modules: Option<PathBuf>,
    },
    /// A user's built Linux tree.
    Tree(PathBuf),
}

impl Default for KernelSource {
    fn default() -> Self {
        KernelSource::Series(DEFAULT_SERIES.into())
    }
}

impl KernelSource {
    /// From the command-line flags: `--kernel SERIES`, `--kernel-image PATH [--modules DIR]`,
    /// `--kernel-tree DIR` (at most one kind; `--modules` only with `--kernel-image`).
    pub fn from_flags(
        series: Option<String>,
        image: Option<PathBuf>,
        modules: Option<PathBuf>,
        tree: Option<PathBuf>,
    ) -> Result<Self, KernelError> {
        let given = usize::from(series.is_some())
            + usize::from(image.is_some())
            + usize::from(tree.is_some());
        if given > 1 {
            return Err(KernelError::Flags(
                "--kernel, --kernel-image and --kernel-tree exclude each other".into(),
            ));
        }
        if modules.is_some() && image.is_none() {
            return Err(KernelError::Flags(
                "--modules DIR goes with --kernel-image PATH (a --kernel-tree installs its own modules)".into(),
            ));
        }
        Ok(match (series, image, tree) {
            (Some(s), _, _) => {
                if !DEBIAN_SERIES.iter().any(|(name, _)| *name == s) {
                    return Err(KernelError::UnsupportedSeries(s));
                }
                KernelSource::Series(s)
            }
            (_, Some(image), _) => KernelSource::Image { image, modules },
            (_, _, Some(tree)) => KernelSource::Tree(tree),
            _ => KernelSource::default(),
        })
    }

    /// The Debian series `provision.sh` is run with.
    pub fn provision_series(&self) -> &str {
        match self {
            KernelSource::Series(s) => s,
            _ => DEFAULT_SERIES,
        }
    }

    /// How reports name it.
    pub fn describe(&self) -> String {
        match self {
            KernelSource::Series(s) => {
                let suite = DEBIAN_SERIES
                    .iter()
                    .find(|(n, _)| n == s)
                    .map_or("?", |(_, suite)| suite);
                format!("Debian {s} ({suite})")
            }
            KernelSource::Image { image, modules } => match modules {
                Some(m) => format!("image {} with modules {}", image.display(), m.display()),
                None => format!("image {} (no modules)", image.display()),
            },
            KernelSource::Tree(t) => format!("tree {}", t.display()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// A parsed kernel `.config`: option (without `CONFIG_`) → value (`y`, `m`, `"text"`, a number;
/// `n` for `# CONFIG_X is not set`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KConfig {
    values: BTreeMap<String, String>,
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

// ---------------------------------------------------------------------------------------------
// Kernel images
// ---------------------------------------------------------------------------------------------

/// The kernel release (`uname -r`) in an x86 bzImage's setup header (`kernel_version`, boot
/// protocol ≥ 2.00): the first word of the version string.
pub fn image_release(image: &[u8]) -> Option<String> {
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let ptr = u16::from_le_bytes([*image.get(0x20e)?, *image.get(0x20f)?]);
    if ptr == 0 {
        return None;
    }
    let start = usize::from(ptr) + 0x200;
    let rest = image.get(start..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    let text = std::str::from_utf8(&rest[..end]).ok()?;
    text.split_whitespace().next().map(str::to_string)
}

/// The config embedded in a kernel image (`CONFIG_IKCONFIG`: gzip data between `IKCFG_ST` and
/// `IKCFG_ED`), like the kernel's `scripts/extract-ikconfig`: looked for in the file itself (a
/// vmlinux) and in every gzip/xz/zstd/bzip2/lzma/lz4 stream found in it (a bzImage's payload),
/// decompressed with the host's tools. `None` if there is none (or no tool to find it).
pub fn ikconfig(image: &[u8]) -> Option<String> {
    if let Some(c) = ikconfig_in(image) {
        return Some(c);
    }
    const STREAMS: &[(&[u8], &str)] = &[
        (b"\x1f\x8b\x08", "gzip"),
        (b"\xfd7zXZ\x00", "xz"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"BZh", "bzip2"),
        (b"\x5d\x00\x00\x00", "xz"),
        (b"\x02\x21\x4c\x18", "lz4"),
    ];
    for (magic, tool) in STREAMS {
        let mut from = 0;
        let mut tries = 0;
        while let Some(pos) = find(&image[from..], magic).map(|p| p + from) {
            from = pos + 1;
            tries += 1;
            if tries > 8 {
                break;
            }
            let args: &[&str] = match (*tool, magic.first()) {
                ("xz", Some(0x5d)) => &["-dcq", "--format=lzma"],
                ("lz4", _) => &["-dcq", "-"],
                _ => &["-dcq"],
            };
            if let Some(out) = decompress(tool, args, &image[pos..]) {
                if let Some(c) = ikconfig_in(&out) {
                    return Some(c);
                }
            }
        }
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn ikconfig_in(data: &[u8]) -> Option<String> {
    let start = find(data, b"IKCFG_ST")? + 8;
    let len = find(&data[start..], b"IKCFG_ED")?;
    let out = decompress("gzip", &["-dcq"], &data[start..start + len])?;
    String::from_utf8(out).ok()
}

/// Runs `tool args` with `input` on stdin; whatever it wrote before failing counts (trailing
/// garbage after a stream is normal here). `None` if it wrote nothing or does not exist.
fn decompress(tool: &str, args: &[&str], input: &[u8]) -> Option<Vec<u8>> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let data = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let mut out = Vec::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_end(&mut out);
    }
    let _ = child.wait();
    let _ = writer.join();
    (!out.is_empty()).then_some(out)
}

// ---------------------------------------------------------------------------------------------
// Module trees
// ---------------------------------------------------------------------------------------------

/// Whether `dir` is a `lib/modules/<kver>` directory itself.
fn is_kver_dir(dir: &Path) -> bool {
    ["modules.dep", "modules.order", "modules.builtin", "kernel"]
        .iter()
        .any(|f| dir.join(f).exists())
}

/// The `<kver>` module directory `--modules DIR` means, for kernel release `kver`: `DIR` itself
/// if it is one (has `modules.dep`, `modules.order`, `modules.builtin` or `kernel/`), else
/// `DIR/lib/modules/<kver>` or `DIR/usr/lib/modules/<kver>` (an `INSTALL_MOD_PATH` tree).
pub fn resolve_modules_dir(dir: &Path, kver: &str) -> Result<PathBuf, KernelError> {
    if !dir.is_dir() {
        return Err(KernelError::Unusable(format!(
            "--modules {}: not a directory",
            dir.display()
        )));
    }
    if is_kver_dir(dir) {
        return Ok(dir.to_path_buf());
    }
    let mut found = Vec::new();
    for base in ["lib/modules", "usr/lib/modules"] {
        let b = dir.join(base);
        let c = b.join(kver);
        if c.is_dir() {
            return Ok(c);
        }
        if let Ok(entries) = fs::read_dir(&b) {
            found.extend(
                entries
                    .flatten()
                    .map(|e| format!("{base}/{}", e.file_name().to_string_lossy())),
            );
        }
    }
    Err(KernelError::Unusable(format!(
        "--modules {}: no modules for the image's release {kver}: expected {0}/lib/modules/{kver}/ (an INSTALL_MOD_PATH tree) or the {kver} directory itself{1}",
        dir.display(),
        if found.is_empty() {
            String::new()
        } else {
            format!(" (it has {})", found.join(", "))
        }
    )))
}

/// Module names listed in a `modules.dep` or `modules.builtin` text (`kernel/.../vfio-pci.ko.xz:
/// deps` → `vfio_pci`).
pub fn module_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(crate::vm::initramfs::module_name)
        .collect()
}

/// Reads `modules.dep` and `modules.builtin` of a `<kver>` directory into `ev`.
fn read_module_lists(moddir: &Path, ev: &mut Evidence) {
    if let Ok(t) = fs::read_to_string(moddir.join("modules.dep")) {
        ev.loadable = module_names(&t);
    }
    if let Ok(t) = fs::read_to_string(moddir.join("modules.builtin")) {
        ev.builtin = module_names(&t);
    }
}

/// A config file found beside a module tree: `<kver>/config` (Debian 7.x packages),
/// `<kver>/build/.config`, `DIR/boot/config-<kver>`, `DIR/config-<kver>`.
fn config_near_modules(dir: &Path, moddir: &Path, kver: &str) -> Option<PathBuf> {
    [
        moddir.join("config"),
        moddir.join("build/.config"),
        dir.join(format!("boot/config-{kver}")),
        dir.join(format!("config-{kver}")),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

// ---------------------------------------------------------------------------------------------
// Cache entries and keys
// ---------------------------------------------------------------------------------------------

/// FNV-1a, 64 bits (stable across Rust releases), length-prefixed fields.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn field(&mut self, data: &[u8]) {
        for &b in (data.len() as u64).to_le_bytes().iter().chain(data) {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Size and modification time (ns) of a file, for keys that must not read big files.
fn stamp(path: &Path) -> Vec<u8> {
    let m = fs::metadata(path).ok();
    let size = m.as_ref().map_or(0, fs::Metadata::len);
    let mtime = m
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{size}:{mtime}").into_bytes()
}

/// The cache entry name of a user image: `image-<hash>` over the image's bytes, its release and
/// the module tree's identity (its directory, `modules.dep`, `modules.builtin`, `modules.order`
/// and the newest-changed stamps of those lists).
pub fn image_entry_name(image: &[u8], kver: &str, moddir: Option<&Path>) -> String {
    let mut h = Fnv::new();
    h.field(b"pcisim kernel image v1");
    h.field(image);
    h.field(kver.as_bytes());
    if let Some(m) = moddir {
        h.field(m.as_os_str().as_encoded_bytes());
        for f in ["modules.dep", "modules.builtin", "modules.order"] {
            h.field(&fs::read(m.join(f)).unwrap_or_default());
            h.field(&stamp(&m.join(f)));
        }
    }
    format!("image-{}", h.hex())
}

/// The cache entry name of a built tree: `tree-<hash>` over its path,
/// `include/generated/utsrelease.h`, `.config` and the bzImage's size and mtime (a rebuild
/// changes at least the last).
pub fn tree_entry_name(tree: &Path) -> String {
    let mut h = Fnv::new();
    h.field(b"pcisim kernel tree v1");
    h.field(tree.as_os_str().as_encoded_bytes());
    h.field(&fs::read(tree.join("include/generated/utsrelease.h")).unwrap_or_default());
    h.field(&fs::read(tree.join(".config")).unwrap_or_default());
    h.field(&stamp(&tree.join("arch/x86/boot/bzImage")));
    format!("tree-{}", h.hex())
}

/// The release a built tree says it is (`include/config/kernel.release`, else
/// `include/generated/utsrelease.h`).
pub fn tree_release(tree: &Path) -> Option<String> {
    if let Ok(t) = fs::read_to_string(tree.join("include/config/kernel.release")) {
        let t = t.trim();
        if !t.is_empty() {
            return Some(t.to_string());
        }
    }
    let t = fs::read_to_string(tree.join("include/generated/utsrelease.h")).ok()?;
    let start = t.find("UTS_RELEASE \"")? + "UTS_RELEASE \"".len();
    let end = t[start..].find('"')?;
    Some(t[start..start + end].to_string())
}

// ---------------------------------------------------------------------------------------------
// Preparing the kernel of a run
// ---------------------------------------------------------------------------------------------

/// What [`prepare`] did, for the report.
#[derive(Debug, Clone)]
pub struct PreparedKernel {
    /// The kernel as asked for ([`KernelSource::describe`]).
    pub what: String,
    /// Its cache entry (`debian-6.12`, `image-<hash>`, `tree-<hash>`).
    pub entry: String,
    /// Its release.
    pub kver: String,
    /// The configuration check.
    pub check: CheckReport,
    /// Whether our guest modules can be built for it (a Debian series, a tree, an image whose
    /// module directory's `build` link names a build tree on this host).
    pub can_build_modules: bool,
}

/// A user kernel, inspected (config checked) but not yet cached.
struct Inspected {
    kver: String,
    image_path: PathBuf,
    image: Vec<u8>,
    moddir: Option<PathBuf>,
    evidence: Evidence,
    /// A kernel build tree to build our modules against (a tree itself, or the `build` link
    /// of an image's module directory when it names one).
    kdir: Option<PathBuf>,
}

/// The build tree a module directory's `build` link names, if it is one on this host (has a
/// `Makefile` and a `Module.symvers`), canonical.
pub fn build_link_tree(moddir: &Path) -> Option<PathBuf> {
    let t = fs::canonicalize(moddir.join("build")).ok()?;
    (t.join("Makefile").is_file() && t.join("Module.symvers").is_file()).then_some(t)
}

fn inspect_image(image: &Path, modules: Option<&Path>) -> Result<Inspected, KernelError> {
    let data = fs::read(image).map_err(io_err("Cannot read the kernel image", image))?;
    let kver = image_release(&data).ok_or_else(|| {
        KernelError::Unusable(format!(
            "{} is not an x86 bzImage/vmlinuz (no kernel_version in its setup header)",
            image.display()
        ))
    })?;
    let mut ev = Evidence::default();
    let moddir = match modules {
        Some(dir) => {
            let m = resolve_modules_dir(dir, &kver)?;
            read_module_lists(&m, &mut ev);
            if let Some(cfg) = config_near_modules(dir, &m, &kver) {
                let text = fs::read_to_string(&cfg).map_err(io_err("Cannot read", &cfg))?;
                ev.config = Some((KConfig::parse(&text), cfg.display().to_string()));
            }
            Some(m)
        }
        None => None,
    };
    if ev.config.is_none() {
        if let Some(text) = ikconfig(&data) {
            ev.config = Some((
                KConfig::parse(&text),
                format!("{} (embedded, CONFIG_IKCONFIG)", image.display()),
            ));
        }
    }
    if ev.config.is_none() && moddir.is_none() {
        return Err(KernelError::Unusable(format!(
            "{}: no config to check (no --modules DIR with a config, and no embedded CONFIG_IKCONFIG) and no module tree: pass --modules DIR (its INSTALL_MOD_PATH tree)",
            image.display()
        )));
    }
    let kdir = moddir.as_deref().and_then(build_link_tree);
    Ok(Inspected {
        kver,
        image_path: image.to_path_buf(),
        image: data,
        moddir,
        evidence: ev,
        kdir,
    })
}

fn inspect_tree(tree: &Path) -> Result<Inspected, KernelError> {
    let config_path = tree.join(".config");
    let bz = tree.join("arch/x86/boot/bzImage");
    if !config_path.is_file() || !bz.is_file() {
        return Err(KernelError::Unusable(format!(
            "--kernel-tree {}: not a built Linux tree (need .config and arch/x86/boot/bzImage: run make there first)",
            tree.display()
        )));
    }
    let text = fs::read_to_string(&config_path).map_err(io_err("Cannot read", &config_path))?;
    let data = fs::read(&bz).map_err(io_err("Cannot read", &bz))?;
    let kver = tree_release(tree)
        .or_else(|| image_release(&data))
        .ok_or_else(|| {
            KernelError::Unusable(format!(
                "--kernel-tree {}: no include/config/kernel.release",
                tree.display()
            ))
        })?;
    Ok(Inspected {
        kver,
        image_path: bz,
        image: data,
        moddir: None,
        evidence: Evidence {
            config: Some((KConfig::parse(&text), config_path.display().to_string())),
            ..Evidence::default()
        },
        kdir: Some(fs::canonicalize(tree).map_err(io_err("Cannot resolve", tree))?),
    })
}

/// Selects, checks and (for a user's kernel) caches the guest kernel of a run, and provisions
/// the rest. The configuration is checked against `profiles` before anything is booted (for a
/// user's kernel even before provisioning). Returns the provisioning environment pointing at
/// the chosen kernel (`kernel`, `kver`, `modules`, `kconfig`; `kdir_host` for a tree).
pub fn prepare(
    source: &KernelSource,
    profiles: &[VmProfile],
    share: bool,
    scripts: &Path,
    log: &Path,
) -> Result<(ProvisionEnv, PreparedKernel), KernelError> {
    let mut reqs = requirements(profiles);
    if matches!(source, KernelSource::Image { modules: None, .. }) {
        // No module tree to load anything from: every option must be built in.
        for r in &mut reqs {
            r.need = Need::Builtin;
        }
    }
    let names: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
    let names = names.join(", ");
    let what = source.describe();
    // A user's kernel is inspected first: a bad one fails in a second, before provisioning.
    let inspected = match source {
        KernelSource::Series(_) => None,
        KernelSource::Image { image, modules } => Some(inspect_image(image, modules.as_deref())?),
        KernelSource::Tree(tree) => Some(inspect_tree(tree)?),
    };
    if let Some(i) = &inspected {
        let report = check(&reqs, &i.evidence, share);
        if let Some(e) = report.error(&format!("{what}, {}", i.kver), &names) {
            return Err(e);
        }
    }
    let mut env = provision::provision(scripts, source.provision_series(), log)?;
    let Some(i) = inspected else {
        let mut ev = Evidence::default();
        let text = fs::read_to_string(&env.kconfig).map_err(io_err("Cannot read", &env.kconfig))?;
        ev.config = Some((KConfig::parse(&text), env.kconfig.display().to_string()));
        let report = check(&reqs, &ev, share);
        if let Some(e) = report.error(&format!("{what}, {}", env.kver), &names) {
            return Err(e);
        }
        let entry = env
            .kernel
            .parent()
            .and_then(Path::file_name)
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let kver = env.kver.clone();
        return Ok((
            env,
            PreparedKernel {
                what,
                entry,
                kver,
                check: report,
                can_build_modules: true,
            },
        ));
    };
    let report = check(&reqs, &i.evidence, share);
    let guest = env.cache.join("guest");
    let entry_name = match source {
        KernelSource::Tree(tree) => tree_entry_name(tree),
        _ => image_entry_name(&i.image, &i.kver, i.moddir.as_deref()),
    };
    let entry = guest.join(&entry_name);
    if entry.join("kver").is_file() {
        debug!("guest kernel {}: cached entry {}", i.kver, entry.display());
    } else {
        let tree = match source {
            KernelSource::Tree(t) => Some(t.as_path()),
            _ => None,
        };
        make_entry(&guest, &entry, &i, tree, &reqs, log)?;
    }
    env.kernel = entry.join("vmlinuz");
    env.modules = entry.join("modules");
    env.kver = i.kver.clone();
    env.kconfig = entry.join("config");
    let can_build_modules = i.kdir.is_some();
    if let Some(kdir) = &i.kdir {
        env.kdir_host = Some(kdir.clone());
    }
    Ok((
        env,
        PreparedKernel {
            what,
            entry: entry_name,
            kver: i.kver,
            check: report,
            can_build_modules,
        },
    ))
}

/// Builds a user kernel's cache entry in a scratch directory beside it, then renames it into
/// place (`kver` last: it marks a complete entry): `vmlinuz`, `config` (if known), `source`
/// (what it was made from) and `modules/` (the `<kver>` tree, depmod'ed).
fn make_entry(
    guest: &Path,
    entry: &Path,
    i: &Inspected,
    tree: Option<&Path>,
    reqs: &[Requirement],
    log: &Path,
) -> Result<(), KernelError> {
    fs::create_dir_all(guest).map_err(io_err("Cannot create", guest))?;
    let scratch = guest.join(format!(
        ".{}.tmp.{}",
        entry
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        std::process::id()
    ));
    if scratch.exists() {
        fs::remove_dir_all(&scratch).map_err(io_err("Cannot remove", &scratch))?;
    }
    fs::create_dir_all(&scratch).map_err(io_err("Cannot create", &scratch))?;
    let result = fill_entry(&scratch, i, tree, reqs, log);
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&scratch);
        return Err(e);
    }
    if let Err(e) = fs::rename(&scratch, entry) {
        let _ = fs::remove_dir_all(&scratch);
        // Another run made the same entry first: use it.
        if !entry.join("kver").is_file() {
            return Err(KernelError::Io {
                what: "Cannot move the kernel into the cache",
                path: entry.to_path_buf(),
                source: e,
            });
        }
    }
    debug!("guest kernel {} cached in {}", i.kver, entry.display());
    Ok(())
}

fn fill_entry(
    scratch: &Path,
    i: &Inspected,
    tree: Option<&Path>,
    reqs: &[Requirement],
    log: &Path,
) -> Result<(), KernelError> {
    let vmlinuz = scratch.join("vmlinuz");
    fs::write(&vmlinuz, &i.image).map_err(io_err("Cannot write", &vmlinuz))?;
    if let Some((cfg, from)) = &i.evidence.config {
        // The original text is not kept in KConfig; copy the file when there is one.
        let p = Path::new(from);
        let dst = scratch.join("config");
        if p.is_file() {
            fs::copy(p, &dst).map_err(io_err("Cannot copy", p))?;
        } else {
            let text: String = cfg
                .values
                .iter()
                .map(|(k, v)| format!("CONFIG_{k}={v}\n"))
                .collect();
            fs::write(&dst, text).map_err(io_err("Cannot write", &dst))?;
        }
    }
    let stage = scratch.join("stage");
    let kdir = stage.join("lib/modules").join(&i.kver);
    match (tree, &i.moddir) {
        (Some(tree), _) if tree_has_modules(i) => {
            run_logged(
                "make modules_install",
                Command::new("make")
                    .arg("-C")
                    .arg(tree)
                    .arg(format!("INSTALL_MOD_PATH={}", stage.display()))
                    .arg("INSTALL_MOD_STRIP=1")
                    .arg("modules_install"),
                log,
            )?;
        }
        (None, Some(moddir)) => {
            fs::create_dir_all(kdir.parent().unwrap_or(&stage))
                .map_err(io_err("Cannot create", &stage))?;
            run_logged(
                "cp -a (the module tree)",
                Command::new("cp").arg("-a").arg(moddir).arg(&kdir),
                log,
            )?;
            // Links to the build and source trees would point anywhere.
            for l in ["build", "source"] {
                let p = kdir.join(l);
                if p.symlink_metadata()
                    .is_ok_and(|m| m.file_type().is_symlink())
                {
                    let _ = fs::remove_file(&p);
                }
            }
        }
        _ => {
            // No loadable modules at all: every requirement is built in (the check said so).
            fs::create_dir_all(&kdir).map_err(io_err("Cannot create", &kdir))?;
            let builtin: String = reqs
                .iter()
                .filter_map(|r| r.module)
                .map(|m| format!("kernel/{m}.ko\n"))
                .collect();
            let mut text = match tree.map(|t| t.join("modules.builtin")) {
                Some(p) if p.is_file() => {
                    fs::read_to_string(&p).map_err(io_err("Cannot read", &p))?
                }
                _ => String::new(),
            };
            text.push_str(&builtin);
            fs::write(kdir.join("modules.builtin"), text).map_err(io_err("Cannot write", &kdir))?;
            fs::write(kdir.join("modules.dep"), "").map_err(io_err("Cannot write", &kdir))?;
        }
    }
    if !kdir.join("modules.dep").is_file() {
        run_logged(
            "depmod",
            Command::new("depmod").arg("-b").arg(&stage).arg(&i.kver),
            log,
        )?;
    }
    if !kdir.join("modules.dep").is_file() {
        return Err(KernelError::Unusable(format!(
            "no modules.dep for {} after depmod",
            i.kver
        )));
    }
    let modules = scratch.join("modules");
    fs::rename(&kdir, &modules).map_err(io_err("Cannot move", &kdir))?;
    let _ = fs::remove_dir_all(&stage);
    let source = scratch.join("source");
    let text = match tree {
        Some(t) => format!("tree {}\n", t.display()),
        None => format!(
            "image {}\nmodules {}\n",
            i.image_path.display(),
            i.moddir
                .as_ref()
                .map_or_else(|| "-".into(), |m| m.display().to_string())
        ),
    };
    fs::write(&source, text).map_err(io_err("Cannot write", &source))?;
    let kver = scratch.join("kver");
    fs::write(&kver, format!("{}\n", i.kver)).map_err(io_err("Cannot write", &kver))?;
    Ok(())
}

fn tree_has_modules(i: &Inspected) -> bool {
    i.evidence
        .config
        .as_ref()
        .is_some_and(|(c, _)| c.get("MODULES") == Some("y"))
}

/// Runs a helper command, its output appended to `log`.
fn run_logged(what: &str, cmd: &mut Command, log: &Path) -> Result<(), KernelError> {
    debug!("{what}: {cmd:?}");
    let out = crate::vm::process::run_captured(what, cmd, crate::vm::kmod::BUILD_TIMEOUT, log)
        .map_err(|e| KernelError::Command {
            what: format!("{what}: {e}"),
            status: "did not run".into(),
            log: log.to_path_buf(),
        })?;
    if !out.status.success() {
        warn!("{what} failed; see {}", log.display());
        return Err(KernelError::Command {
            what: what.to_string(),
            status: crate::vm::process::describe_status(out.status),
            log: log.to_path_buf(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::profile::ProfileId;

    const ALL_PROFILES: [ProfileId; 7] = [
        ProfileId::Gpu,
        ProfileId::GpuNpu,
        ProfileId::GpuHotplug,
        ProfileId::GpuNsr,
        ProfileId::GpuNpuHotplug,
        ProfileId::NpuSva,
        ProfileId::GpuPciehp,
    ];

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pcisim-kernel-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

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
            ALL_PROFILES
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

    fn full_config() -> String {
        requirements(
            ALL_PROFILES
                .iter()
                .map(|id| id.profile())
                .collect::<Vec<_>>()
                .iter(),
        )
        .iter()
        .map(|r| match r.need {
            Need::Builtin => format!("CONFIG_{}=y\n", r.option),
            Need::Enabled => format!("CONFIG_{}=m\n", r.option),
        })
        .collect()
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

    /// A fake bzImage: the setup header magic and a kernel_version string.
    pub(crate) fn fake_bzimage(release: &str, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 0x400];
        b[0x202..0x206].copy_from_slice(b"HdrS");
        let ptr: u16 = 0x300 - 0x200;
        b[0x20e..0x210].copy_from_slice(&ptr.to_le_bytes());
        let v = format!("{release} (me@host) #1 SMP PREEMPT_DYNAMIC\0");
        b[0x300..0x300 + v.len()].copy_from_slice(v.as_bytes());
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn test_image_release_from_setup_header() {
        assert_eq!(
            image_release(&fake_bzimage("6.12.0-dbg", b"")).as_deref(),
            Some("6.12.0-dbg")
        );
        assert_eq!(image_release(b"not a kernel"), None);
        let mut b = fake_bzimage("x", b"");
        b[0x202] = b'X';
        assert_eq!(image_release(&b), None);
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        decompress_like("gzip", &["-c", "-n"], data)
    }

    fn decompress_like(tool: &str, args: &[&str], data: &[u8]) -> Vec<u8> {
        let out = decompress(tool, args, data).expect("host tool");
        assert!(!out.is_empty());
        out
    }

    #[test]
    fn test_ikconfig_found_in_vmlinux_and_in_compressed_payload() {
        let cfg = "CONFIG_VFIO=y\n# CONFIG_IOMMUFD is not set\n";
        let mut vmlinux = b"\x7fELF junk IKCFG_ST".to_vec();
        vmlinux.extend(gzip(cfg.as_bytes()));
        vmlinux.extend_from_slice(b"IKCFG_ED more junk");
        assert_eq!(ikconfig(&vmlinux).as_deref(), Some(cfg));
        // Inside a compressed payload (as in a bzImage), here xz and zstd.
        for (tool, args) in [("xz", &["-c"][..]), ("zstd", &["-c", "-q"][..])] {
            let payload = decompress_like(tool, args, &vmlinux);
            let bz = fake_bzimage("6.12.0", &payload);
            assert_eq!(ikconfig(&bz).as_deref(), Some(cfg), "{tool}");
        }
        // No embedded config: None (the instrument above shows a present one is found).
        assert_eq!(ikconfig(&fake_bzimage("6.12.0", b"plain payload")), None);
    }

    #[test]
    fn test_modules_dir_layouts() {
        let d = scratch("layouts");
        // An INSTALL_MOD_PATH tree: DIR/lib/modules/<kver>/.
        let inst = d.join("inst");
        fs::create_dir_all(inst.join("lib/modules/6.12.0-x/kernel")).unwrap();
        fs::create_dir_all(inst.join("lib/modules/6.1.0-old/kernel")).unwrap();
        assert_eq!(
            resolve_modules_dir(&inst, "6.12.0-x").unwrap(),
            inst.join("lib/modules/6.12.0-x")
        );
        // Merged /usr.
        let usr = d.join("usr");
        fs::create_dir_all(usr.join("usr/lib/modules/6.12.0-x")).unwrap();
        assert_eq!(
            resolve_modules_dir(&usr, "6.12.0-x").unwrap(),
            usr.join("usr/lib/modules/6.12.0-x")
        );
        // The <kver> directory itself, whatever its name.
        let direct = d.join("modules");
        fs::create_dir_all(&direct).unwrap();
        fs::write(direct.join("modules.dep"), "").unwrap();
        assert_eq!(resolve_modules_dir(&direct, "6.12.0-x").unwrap(), direct);
        // The wrong release: the error names what is there.
        let e = resolve_modules_dir(&inst, "7.0.0").unwrap_err().to_string();
        assert!(
            e.contains("7.0.0") && e.contains("lib/modules/6.12.0-x"),
            "{e}"
        );
        assert!(resolve_modules_dir(&d.join("nope"), "x").is_err());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn test_cache_entry_names() {
        let d = scratch("keys");
        let a = image_entry_name(b"image A", "6.12.0", None);
        assert!(a.starts_with("image-") && a.len() == 6 + 16, "{a}");
        assert_eq!(a, image_entry_name(b"image A", "6.12.0", None));
        assert_ne!(a, image_entry_name(b"image B", "6.12.0", None));
        assert_ne!(a, image_entry_name(b"image A", "6.12.1", None));
        // The module tree is part of the key: a re-installed modules.dep changes it.
        let m = d.join("m");
        fs::create_dir_all(&m).unwrap();
        fs::write(m.join("modules.dep"), "a.ko:\n").unwrap();
        let with = image_entry_name(b"image A", "6.12.0", Some(&m));
        assert_ne!(a, with);
        fs::write(m.join("modules.dep"), "a.ko:\nb.ko:\n").unwrap();
        assert_ne!(with, image_entry_name(b"image A", "6.12.0", Some(&m)));
        // A tree: its release header, .config and bzImage stamp.
        let t = d.join("tree");
        fs::create_dir_all(t.join("include/generated")).unwrap();
        fs::create_dir_all(t.join("arch/x86/boot")).unwrap();
        fs::write(
            t.join("include/generated/utsrelease.h"),
            "#define UTS_RELEASE \"6.12.0-dbg\"\n",
        )
        .unwrap();
        fs::write(t.join(".config"), "CONFIG_VFIO=m\n").unwrap();
        fs::write(t.join("arch/x86/boot/bzImage"), "1").unwrap();
        let k1 = tree_entry_name(&t);
        assert!(k1.starts_with("tree-"), "{k1}");
        assert_eq!(k1, tree_entry_name(&t));
        assert_eq!(tree_release(&t).as_deref(), Some("6.12.0-dbg"));
        fs::write(t.join(".config"), "CONFIG_VFIO=y\n").unwrap();
        let k2 = tree_entry_name(&t);
        assert_ne!(k1, k2);
        fs::write(t.join("arch/x86/boot/bzImage"), "12").unwrap();
        assert_ne!(k2, tree_entry_name(&t));
        fs::create_dir_all(t.join("include/config")).unwrap();
        fs::write(t.join("include/config/kernel.release"), "6.12.0-dbg+\n").unwrap();
        assert_eq!(tree_release(&t).as_deref(), Some("6.12.0-dbg+"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn test_flags() {
        assert_eq!(
            KernelSource::from_flags(None, None, None, None).unwrap(),
            KernelSource::Series("6.12".into())
        );
        assert_eq!(
            KernelSource::from_flags(Some("7.3".into()), None, None, None).unwrap(),
            KernelSource::Series("7.3".into())
        );
        let e = KernelSource::from_flags(Some("6.1".into()), None, None, None).unwrap_err();
        assert!(
            e.to_string()
                .contains("6.12 (Debian trixie), 7.3 (Debian trixie-backports)"),
            "{e}"
        );
        assert!(KernelSource::from_flags(None, None, Some("m".into()), None).is_err());
        assert!(KernelSource::from_flags(None, Some("i".into()), None, Some("t".into())).is_err());
        assert_eq!(
            KernelSource::from_flags(None, Some("i".into()), Some("m".into()), None)
                .unwrap()
                .provision_series(),
            DEFAULT_SERIES
        );
    }

    /// A user kernel that lacks VFIO fails in `prepare` before provisioning (the scripts
    /// directory given does not even exist) and names CONFIG_VFIO; a tree without bzImage is
    /// refused clearly.
    #[test]
    fn test_prepare_fails_before_provisioning_on_missing_config() {
        let d = scratch("prepare");
        let t = d.join("tree");
        fs::create_dir_all(t.join("arch/x86/boot")).unwrap();
        fs::create_dir_all(t.join("include/config")).unwrap();
        let e = prepare(
            &KernelSource::Tree(t.clone()),
            &[ProfileId::Gpu.profile()],
            false,
            &d.join("no-scripts"),
            &d.join("log"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a built Linux tree"), "{e}");
        fs::write(
            t.join("arch/x86/boot/bzImage"),
            fake_bzimage("6.12.0-t", b""),
        )
        .unwrap();
        fs::write(t.join("include/config/kernel.release"), "6.12.0-t\n").unwrap();
        fs::write(
            t.join(".config"),
            full_config().replace("CONFIG_VFIO=m\n", "# CONFIG_VFIO is not set\n"),
        )
        .unwrap();
        let e = prepare(
            &KernelSource::Tree(t.clone()),
            &[ProfileId::Gpu.profile()],
            false,
            &d.join("no-scripts"),
            &d.join("log"),
        )
        .unwrap_err();
        assert!(matches!(e, KernelError::Config(_)), "{e}");
        assert!(e.to_string().contains("CONFIG_VFIO is not set"), "{e}");
        // The same through an image whose modules directory carries the config.
        let m = d.join("mods/lib/modules/6.12.0-t");
        fs::create_dir_all(&m).unwrap();
        fs::write(m.join("modules.dep"), "").unwrap();
        fs::copy(t.join(".config"), m.join("config")).unwrap();
        let e = prepare(
            &KernelSource::Image {
                image: t.join("arch/x86/boot/bzImage"),
                modules: Some(d.join("mods")),
            },
            &[ProfileId::Gpu.profile()],
            false,
            &d.join("no-scripts"),
            &d.join("log"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("CONFIG_VFIO is not set"), "{e}");
        // With the option on, the check passes and prepare goes on to provisioning (which
        // fails here: the instrument above is not just "prepare always fails").
        fs::write(m.join("config"), full_config()).unwrap();
        let e = prepare(
            &KernelSource::Image {
                image: t.join("arch/x86/boot/bzImage"),
                modules: Some(d.join("mods")),
            },
            &[ProfileId::Gpu.profile()],
            false,
            &d.join("no-scripts"),
            &d.join("log"),
        )
        .unwrap_err();
        assert!(matches!(e, KernelError::Provision(_)), "{e}");
        // An image without --modules: its embedded config must have everything built in.
        let mut vmlinux = b"IKCFG_ST".to_vec();
        vmlinux.extend(gzip(full_config().as_bytes()));
        vmlinux.extend_from_slice(b"IKCFG_ED");
        let bz = d.join("bzImage-ikconfig");
        fs::write(&bz, fake_bzimage("6.12.0-t", &vmlinux)).unwrap();
        let no_modules = KernelSource::Image {
            image: bz.clone(),
            modules: None,
        };
        let run = |src: &KernelSource| {
            prepare(
                src,
                &[ProfileId::Gpu.profile()],
                false,
                &d.join("no-scripts"),
                &d.join("log"),
            )
            .unwrap_err()
        };
        let e = run(&no_modules).to_string();
        assert!(e.contains("CONFIG_VFIO =m (need =y"), "{e}");
        assert!(e.contains("(embedded, CONFIG_IKCONFIG)"), "{e}");
        let mut vmlinux = b"IKCFG_ST".to_vec();
        vmlinux.extend(gzip(full_config().replace("=m\n", "=y\n").as_bytes()));
        vmlinux.extend_from_slice(b"IKCFG_ED");
        fs::write(&bz, fake_bzimage("6.12.0-t", &vmlinux)).unwrap();
        assert!(matches!(run(&no_modules), KernelError::Provision(_)));
        // And no config at all without modules: refused, saying so.
        fs::write(&bz, fake_bzimage("6.12.0-t", b"")).unwrap();
        let e = run(&no_modules).to_string();
        assert!(e.contains("no config to check"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }
}
