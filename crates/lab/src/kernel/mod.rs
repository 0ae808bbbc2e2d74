//! The guest kernel: which one (a Debian series, our debug build of a series, a user's image, a
//! user's built tree), its own cache entry, and a check of its configuration against what the VM
//! profiles need, before boot.
//!
//! | flag | kernel | modules | KDIR for our modules | cache entry |
//! |---|---|---|---|---|
//! | `--kernel 6.12` / `7.3` | Debian trixie / trixie-backports | the package's | its `linux-headers` in the trixie root | `guest/debian-<series>` (provision.sh) |
//! | `--kernel-image PATH [--modules DIR]` | `PATH` (bzImage/vmlinuz) | `DIR` (an `INSTALL_MOD_PATH` tree or the `<kver>` directory itself) | the tree the modules' `build` link names, if on this host; else none (our modules are not built) | `guest/image-<hash>` |
//! | `--kernel-tree DIR` | `DIR/arch/x86/boot/bzImage` | `make modules_install` into the entry | `DIR` (built with the host's make and gcc, the tree's own; chrooted into the trixie root when `DIR` is inside it) | `guest/tree-<hash>` |
//! | `--kernel 6.12-debug` | Debian's `linux-source-6.12` built by `qemu-scripts/debug-kernel.sh` ([`debug`]) into the trixie root, then taken as a `--kernel-tree` | as a tree | the tree, chrooted | the tree in `trixie-root/usr/src/pcisim-kernel/`, then `guest/tree-<hash>` |
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

//!
//! Submodules: [`config`] (the options the profiles need and the check), [`image`] (reading
//! images and module trees), [`entry`] (cache entries of users' kernels), [`prepare`] (the
//! kernel of a run, end to end), [`debug`] (the debug kernel's build).

use std::io;
use std::path::{Path, PathBuf};

use crate::vm::provision::ProvisionError;

pub mod config;
pub mod debug;
pub mod entry;
pub mod image;
pub mod prepare;

pub use config::*;
pub use entry::{image_entry_name, tree_entry_name, tree_release};
pub use image::*;
pub use prepare::{build_link_tree, prepare, PreparedKernel};

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
    #[error("Unsupported --kernel {0:?} (supported: {supported}; each also as SERIES-debug, our debug build of it; or --kernel-image PATH [--modules DIR], --kernel-tree DIR)", supported = supported_series())]
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
    /// The debug kernel could not be built (`qemu-scripts/debug-kernel.sh` failed).
    #[error("Building the {name} kernel failed ({status}): {reason}; the whole log: {log}")]
    DebugBuild {
        /// The kernel asked for (`6.12-debug`).
        name: String,
        /// How the script ended.
        status: String,
        /// Its last error line (or what went wrong running it).
        reason: String,
        /// Its log.
        log: PathBuf,
    },
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

pub(crate) fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> KernelError {
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
    /// Our debug build of a Debian series (`--kernel 6.12-debug`): Debian's `linux-source-<series>`
    /// built by `qemu-scripts/debug-kernel.sh` with a debug config fragment ([`debug`]), then
    /// used as a [`KernelSource::Tree`].
    Debug {
        /// The Debian series (`6.12`).
        series: String,
        /// The build variant ([`debug::VARIANTS`]: `debug`).
        variant: String,
    },
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
                let known = |series: &str| DEBIAN_SERIES.iter().any(|(name, _)| *name == series);
                if known(&s) {
                    return Ok(KernelSource::Series(s));
                }
                match s.split_once('-') {
                    Some((series, variant))
                        if known(series) && debug::VARIANTS.contains(&variant) =>
                    {
                        KernelSource::Debug {
                            series: series.to_string(),
                            variant: variant.to_string(),
                        }
                    }
                    _ => return Err(KernelError::UnsupportedSeries(s)),
                }
            }
            (_, Some(image), _) => KernelSource::Image { image, modules },
            (_, _, Some(tree)) => KernelSource::Tree(tree),
            _ => KernelSource::default(),
        })
    }

    /// The Debian series `provision.sh` is run with.
    pub fn provision_series(&self) -> &str {
        match self {
            KernelSource::Series(s) | KernelSource::Debug { series: s, .. } => s,
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
            KernelSource::Debug { series, variant } => {
                format!("{series}-{variant} (Debian linux-source-{series}, our {variant} build)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Our debug build of a series, named SERIES-VARIANT; only known series and variants.
        let d = KernelSource::from_flags(Some("6.12-debug".into()), None, None, None).unwrap();
        assert_eq!(
            d,
            KernelSource::Debug {
                series: "6.12".into(),
                variant: "debug".into()
            }
        );
        assert_eq!(d.provision_series(), "6.12");
        assert!(d
            .describe()
            .starts_with("6.12-debug (Debian linux-source-6.12"));
        for bad in ["6.1-debug", "6.12-fast", "6.12-", "-debug"] {
            let e = KernelSource::from_flags(Some(bad.into()), None, None, None).unwrap_err();
            assert!(matches!(e, KernelError::UnsupportedSeries(_)), "{bad}: {e}");
            assert!(e.to_string().contains("SERIES-debug"), "{e}");
        }
        assert!(KernelSource::from_flags(None, None, Some("m".into()), None).is_err());
        assert!(KernelSource::from_flags(None, Some("i".into()), None, Some("t".into())).is_err());
        assert_eq!(
            KernelSource::from_flags(None, Some("i".into()), Some("m".into()), None)
                .unwrap()
                .provision_series(),
            DEFAULT_SERIES
        );
    }
}

/// Helpers shared by the submodules' tests.
#[cfg(test)]
pub(crate) mod testutil {
    use std::fs;
    use std::path::PathBuf;

    use super::config::{requirements, Need};
    use super::image::decompress;
    use crate::vm::profile::ProfileId;

    pub(crate) fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pcisim-kernel-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
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

    pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
        decompress_like("gzip", &["-c", "-n"], data)
    }

    pub(crate) fn decompress_like(tool: &str, args: &[&str], data: &[u8]) -> Vec<u8> {
        let out = decompress(tool, args, data).expect("host tool");
        assert!(!out.is_empty());
        out
    }

    /// A config with every option every suite profile needs.
    pub(crate) fn full_config() -> String {
        requirements(
            ProfileId::SUITE
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
}
