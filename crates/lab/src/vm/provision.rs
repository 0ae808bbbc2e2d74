//! Provisioning: runs `qemu-scripts/provision.sh` and parses the `PCISIM_*` lines it prints.
//!
//! The script is idempotent (a second run takes about a second) and prints on stdout exactly
//! `KEY=VALUE` lines; its log goes to stderr, which the lab keeps in the run directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::vm::process::{self, describe_status, ProcessError};

/// How long provisioning may take: the first run downloads a trixie root (~500 MB).
pub const PROVISION_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Errors from provisioning.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The provision script is not where it should be.
    #[error("Provision script {0} not found (set PCISIM_SCRIPTS to the qemu-scripts directory)")]
    ScriptMissing(PathBuf),
    /// Running the script failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The script exited with an error.
    #[error("{script} failed ({status}); its log: {log}")]
    Failed {
        /// The script.
        script: PathBuf,
        /// How it ended.
        status: String,
        /// Where its stderr went.
        log: PathBuf,
    },
    /// A line of its output is not `KEY=VALUE`.
    #[error("Provision output line {line}: expected KEY=VALUE, got {text:?}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A required key is missing or empty.
    #[error("Provision output lacks {0}")]
    Missing(&'static str),
    /// A value is not one of the allowed ones.
    #[error("Provision output: {key}={value:?} is not one of {allowed}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// Its value.
        value: String,
        /// What would have been accepted.
        allowed: &'static str,
    },
}

/// The accelerator QEMU should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation (always works; boots the guest in seconds).
    Tcg,
    /// Hardware virtualization (only if the provision probe booted a guest with it).
    Kvm,
}

impl Accel {
    /// The value for QEMU's `-accel`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// Everything provisioning produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionEnv {
    /// `PCISIM_QEMU`: run it like `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `PCISIM_QEMU_VERSION`, e.g. `11.1.3`.
    pub qemu_version: String,
    /// `PCISIM_KERNEL`: the guest's vmlinuz.
    pub kernel: PathBuf,
    /// `PCISIM_KVER`: the guest kernel release (`uname -r`).
    pub kver: String,
    /// `PCISIM_MODULES`: the guest's `lib/modules/<kver>` directory (with `modules.dep`).
    pub modules: PathBuf,
    /// `PCISIM_BUSYBOX`: a static busybox.
    pub busybox: PathBuf,
    /// `PCISIM_ACCEL`.
    pub accel: Accel,
    /// `PCISIM_CPU`: QEMU's `-cpu` (`max` with TCG, `host` with KVM).
    pub cpu: String,
    /// `PCISIM_KBUILD_ROOT`: the Debian root holding the guest kernel module toolchain (the
    /// guest kernel's headers, its gcc, make); guest modules are built chrooted into it
    /// ([`crate::vm::kmod`]).
    pub kbuild_root: PathBuf,
    /// `PCISIM_KHEADERS`: the guest kernel's headers directory *as seen inside*
    /// [`kbuild_root`](Self::kbuild_root) (`/usr/src/linux-headers-<kver>`), for `make -C`.
    pub kheaders: PathBuf,
    /// `PCISIM_KCONFIG`: the guest kernel's `.config`.
    pub kconfig: PathBuf,
    /// `PCISIM_CACHE`: the provisioning cache (user kernels get entries in its `guest/`).
    pub cache: PathBuf,
    /// Not from the script: a user's kernel build tree on the host; when set, guest modules are
    /// built against it with the host's make and compiler instead of chrooted into
    /// [`kbuild_root`](Self::kbuild_root) ([`crate::kernel::prepare`] sets it).
    pub kdir_host: Option<PathBuf>,
}

impl ProvisionEnv {
    /// The kernel build directory (`KDIR`) as seen on the host: the user's tree, else the
    /// headers inside the root.
    pub fn kdir_on_host(&self) -> PathBuf {
        match &self.kdir_host {
            Some(dir) => dir.clone(),
            None => self
                .kbuild_root
                .join(self.kheaders.strip_prefix("/").unwrap_or(&self.kheaders)),
        }
    }
}

impl ProvisionEnv {
    /// Parses the script's stdout. Unknown `PCISIM_*` keys are ignored (newer scripts may add
    /// some); blank lines are skipped; anything else that is not `KEY=VALUE` is an error.
    pub fn parse(text: &str) -> Result<Self, ProvisionError> {
        let mut map = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let bad = || ProvisionError::BadLine {
                line: i + 1,
                text: line.to_string(),
            };
            let (key, value) = line.split_once('=').ok_or_else(bad)?;
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(bad());
            }
            map.insert(key.to_string(), value.to_string());
        }
        let get = |key: &'static str| -> Result<String, ProvisionError> {
            match map.get(key) {
                Some(v) if !v.is_empty() => Ok(v.clone()),
                _ => Err(ProvisionError::Missing(key)),
            }
        };
        let accel = match get("PCISIM_ACCEL")?.as_str() {
            "tcg" => Accel::Tcg,
            "kvm" => Accel::Kvm,
            other => {
                return Err(ProvisionError::BadValue {
                    key: "PCISIM_ACCEL",
                    value: other.to_string(),
                    allowed: "tcg, kvm",
                })
            }
        };
        Ok(ProvisionEnv {
            qemu: get("PCISIM_QEMU")?.into(),
            qemu_version: get("PCISIM_QEMU_VERSION")?,
            kernel: get("PCISIM_KERNEL")?.into(),
            kver: get("PCISIM_KVER")?,
            modules: get("PCISIM_MODULES")?.into(),
            busybox: get("PCISIM_BUSYBOX")?.into(),
            accel,
            cpu: get("PCISIM_CPU")?,
            kbuild_root: get("PCISIM_KBUILD_ROOT")?.into(),
            kheaders: get("PCISIM_KHEADERS")?.into(),
            kconfig: get("PCISIM_KCONFIG")?.into(),
            cache: get("PCISIM_CACHE")?.into(),
            kdir_host: None,
        })
    }
}

/// The repository root this crate was built from.
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    match manifest_dir.parent().and_then(Path::parent) {
        Some(root) => root.to_path_buf(),
        None => manifest_dir.join("../.."),
    }
}

/// The `qemu-scripts` directory: `$PCISIM_SCRIPTS` if set, else the repository's.
pub fn scripts_dir() -> PathBuf {
    match std::env::var_os("PCISIM_SCRIPTS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => repo_root().join("qemu-scripts"),
    }
}

/// Runs `provision.sh --kernel <kernel>` from `scripts` and parses its output. The script's
/// stderr goes to `log` (and to the `debug` log).
pub fn provision(scripts: &Path, kernel: &str, log: &Path) -> Result<ProvisionEnv, ProvisionError> {
    let script = scripts.join("provision.sh");
    if !script.is_file() {
        return Err(ProvisionError::ScriptMissing(script));
    }
    let mut cmd = Command::new("bash");
    cmd.arg(&script).args(["--kernel", kernel]);
    // The accelerator verdict comes from the sub-second kvm-ioctls probe, not from a KVM boot
    // that can hang for a minute on a broken host (the script uses it when it has no verdict
    // cached for this host boot).
    cmd.env(
        "PCISIM_KVM_VERDICT",
        crate::vm::kvmprobe::probe().script_line(),
    );
    let out = process::run_captured("provision.sh", &mut cmd, PROVISION_TIMEOUT, log)?;
    if !out.status.success() {
        return Err(ProvisionError::Failed {
            script,
            status: describe_status(out.status),
            log: log.to_path_buf(),
        });
    }
    ProvisionEnv::parse(&String::from_utf8_lossy(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "PCISIM_QEMU=/c/bin/qemu-system-x86_64
PCISIM_QEMU_VERSION=11.1.3
PCISIM_KERNEL=/c/guest/6.12/vmlinuz
PCISIM_KVER=6.12.48+deb13-amd64
PCISIM_MODULES=/c/guest/6.12/modules
PCISIM_BUSYBOX=/c/guest/busybox
PCISIM_ACCEL=tcg
PCISIM_CPU=max
PCISIM_KBUILD_ROOT=/c/trixie-root
PCISIM_KHEADERS=/usr/src/linux-headers-6.12.48+deb13-amd64
PCISIM_KCONFIG=/c/guest/debian-6.12/config
PCISIM_CACHE=/c
";

    #[test]
    fn test_parse_sample_all_fields() {
        let env = ProvisionEnv::parse(SAMPLE).unwrap();
        assert_eq!(env.qemu, PathBuf::from("/c/bin/qemu-system-x86_64"));
        assert_eq!(env.qemu_version, "11.1.3");
        assert_eq!(env.kernel, PathBuf::from("/c/guest/6.12/vmlinuz"));
        assert_eq!(env.kver, "6.12.48+deb13-amd64");
        assert_eq!(env.modules, PathBuf::from("/c/guest/6.12/modules"));
        assert_eq!(env.busybox, PathBuf::from("/c/guest/busybox"));
        assert_eq!(env.accel, Accel::Tcg);
        assert_eq!(env.cpu, "max");
        assert_eq!(env.kbuild_root, PathBuf::from("/c/trixie-root"));
        assert_eq!(
            env.kheaders,
            PathBuf::from("/usr/src/linux-headers-6.12.48+deb13-amd64")
        );
        assert_eq!(env.kconfig, PathBuf::from("/c/guest/debian-6.12/config"));
        assert_eq!(env.cache, PathBuf::from("/c"));
        assert_eq!(env.kdir_host, None);
        assert_eq!(
            env.kdir_on_host(),
            PathBuf::from("/c/trixie-root/usr/src/linux-headers-6.12.48+deb13-amd64")
        );
    }

    #[test]
    fn test_parse_kvm_extra_keys_and_blank_lines_accepted() {
        let text = SAMPLE.replace("PCISIM_ACCEL=tcg", "PCISIM_ACCEL=kvm") + "\nPCISIM_NEW=1\n";
        let env = ProvisionEnv::parse(&text).unwrap();
        assert_eq!(env.accel, Accel::Kvm);
        assert_eq!(env.accel.as_str(), "kvm");
    }

    #[test]
    fn test_parse_missing_key_is_error() {
        let text = SAMPLE.replace("PCISIM_KVER=6.12.48+deb13-amd64\n", "");
        assert!(matches!(
            ProvisionEnv::parse(&text),
            Err(ProvisionError::Missing("PCISIM_KVER"))
        ));
        let text = SAMPLE.replace("PCISIM_CPU=max", "PCISIM_CPU=");
        assert!(matches!(
            ProvisionEnv::parse(&text),
            Err(ProvisionError::Missing("PCISIM_CPU"))
        ));
        // An older script without the kernel module toolchain lines is refused.
        let text = SAMPLE.replace("PCISIM_KBUILD_ROOT=/c/trixie-root\n", "");
        assert!(matches!(
            ProvisionEnv::parse(&text),
            Err(ProvisionError::Missing("PCISIM_KBUILD_ROOT"))
        ));
        let text = SAMPLE.replace("PCISIM_KHEADERS=", "PCISIM_KHEADERS_X=");
        assert!(matches!(
            ProvisionEnv::parse(&text),
            Err(ProvisionError::Missing("PCISIM_KHEADERS"))
        ));
    }

    #[test]
    fn test_parse_garbage_line_is_error() {
        let text = format!("{SAMPLE}some log line\n");
        assert!(matches!(
            ProvisionEnv::parse(&text),
            Err(ProvisionError::BadLine { line: 13, .. })
        ));
        let text = SAMPLE.replace("PCISIM_ACCEL=tcg", "PCISIM_ACCEL=hvf");
        assert!(matches!(
            ProvisionEnv::parse(&text),
            Err(ProvisionError::BadValue { .. })
        ));
    }

    #[test]
    fn test_value_with_equals_sign_kept_whole() {
        let text = SAMPLE.replace("/c/guest/busybox", "/c/a=b/busybox");
        let env = ProvisionEnv::parse(&text).unwrap();
        assert_eq!(env.busybox, PathBuf::from("/c/a=b/busybox"));
    }
}
