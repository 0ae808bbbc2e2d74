//! The one boot sequence of a lab VM, shared by the suite ([`crate::harness::suite`]) and the
//! manual lab ([`crate::manual`]): [`prepare`] provisions QEMU and the guest kernel, builds the
//! guest programs, our guest kernel modules and the initramfs; [`qemu_config`] is the QEMU
//! machine for a profile; [`tail_lines`] shows what a failed step logged. The suite keeps its
//! children attached (they die with the lab), `lab up` detaches them; both go through these.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::LabError;
use crate::kernel::{self, KernelSource, PreparedKernel};
use crate::vm::initramfs::{self, Initramfs};
use crate::vm::process;
use crate::vm::profile::{VmLayout, VmProfile};
use crate::vm::provision::{self, ProvisionEnv};
use crate::vm::qemu::{QemuConfig, VmOptions, DEFAULT_APPEND};
use crate::vm::{guest_build, kmod};

/// How long the guest has from QEMU's start to the agent's greeting.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long QEMU has to connect the agent's serial port after starting.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guest has to power off after the agent acknowledged.
pub const POWEROFF_TIMEOUT: Duration = Duration::from_secs(60);
/// The guest serial port of the agent.
pub const AGENT_PORT: &str = "/dev/ttyS1";

/// Where a progress line goes (the suite's report, the manual lab's stderr); an `Err` (the
/// report's reader gone) stops the sequence.
pub type Progress<'a> = &'a mut dyn FnMut(&str) -> Result<(), LabError>;

/// What the VMs of a run boot: the provisioned tools and kernel, and the initramfs.
#[derive(Debug)]
pub struct Prepared {
    /// QEMU, the guest kernel and its modules, busybox.
    pub env: ProvisionEnv,
    /// The guest kernel as chosen and checked against the profiles.
    pub kernel: PreparedKernel,
    /// The initramfs (guest programs, agent, modules).
    pub initrd: Initramfs,
}

/// Provisions (`provision.log`), builds the guest programs (`guest-build.log`), our guest kernel
/// modules (`kmod-build.log`, skipped only without a build tree or a `.c` file) and the
/// initramfs (`initramfs.cpio`, then `extra_initramfs` appended) in `dir`, for VMs of
/// `profiles`. Each step reports a line to `progress`; a failed step shows its log's last lines.
pub fn prepare(
    source: &KernelSource,
    profiles: &[VmProfile],
    extra_initramfs: &[PathBuf],
    dir: &Path,
    progress: Progress<'_>,
) -> Result<Prepared, LabError> {
    // 1. Provision.
    let scripts = provision::scripts_dir();
    progress(&format!(
        "provisioning with {}/provision.sh (the first run downloads QEMU and a guest kernel)",
        scripts.display()
    ))?;
    let t = Instant::now();
    let provision_log = dir.join("provision.log");
    let (env, kernel) = match kernel::prepare(source, profiles, false, &scripts, &provision_log) {
        Ok(r) => r,
        Err(e) => {
            if matches!(e, kernel::KernelError::Provision(_)) {
                show_tail(progress, "provision log", &provision_log, 20)?;
            }
            return Err(e.into());
        }
    };
    progress(&format!(
        "guest kernel {}: {} (cache entry {}); {}",
        kernel.kver,
        kernel.what,
        kernel.entry,
        kernel.check.summary()
    ))?;
    progress(&format!(
        "provisioned in {:.1} s: QEMU {}, guest kernel {}, accel {} (cpu {})",
        secs(t),
        env.qemu_version,
        env.kver,
        env.accel.as_str(),
        env.cpu
    ))?;

    // 2. Guest programs.
    progress(&format!(
        "building the guest programs ({})",
        guest_build::guest_manifest().display()
    ))?;
    let t = Instant::now();
    let guest_log = dir.join("guest-build.log");
    let guest_bin = match guest_build::build(&guest_log) {
        Ok(p) => p,
        Err(e) => {
            show_tail(progress, "guest build log", &guest_log, 30)?;
            return Err(e.into());
        }
    };
    progress(&format!(
        "guest programs built in {:.1} s: {}",
        secs(t),
        guest_bin.display()
    ))?;

    // 3. Our guest kernel modules (skipped only when guest-tests/kmod has no .c file).
    let t = Instant::now();
    let kmod_log = dir.join("kmod-build.log");
    let built = if kernel.can_build_modules {
        kmod::build(&env, &kmod_log).map(Some)
    } else {
        progress(&format!(
            "no kernel build tree for {} (its modules' build link names none): our guest modules are not built, scenarios that insmod them fail (use --kernel-tree or a Debian series)",
            kernel.what
        ))?;
        Ok(None)
    };
    let extra_modules = match built {
        Ok(None) => Vec::new(),
        Ok(Some(Some(b))) => {
            let names: Vec<String> = b.modules.iter().map(|m| m.name.clone()).collect();
            progress(&format!(
                "guest kernel modules {} in {:.1} s: {} (key {})",
                if b.cached {
                    "taken from the cache"
                } else {
                    "built"
                },
                secs(t),
                names.join(" "),
                b.key
            ))?;
            b.modules.into_iter().map(|m| m.path).collect()
        }
        Ok(Some(None)) => {
            progress(&format!(
                "no .c file in {}: no guest kernel module to build",
                kmod::kmod_src_dir().display()
            ))?;
            Vec::new()
        }
        Err(e) => {
            show_tail(progress, "kernel module build log", &kmod_log, 30)?;
            return Err(e.into());
        }
    };

    // 4. Initramfs.
    let t = Instant::now();
    let initrd = initramfs::build(
        &initramfs::InitramfsSpec {
            busybox: env.busybox.clone(),
            guest_bin,
            modules_dir: env.modules.clone(),
            kver: env.kver.clone(),
            modules: initramfs::VFIO_MODULES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            extra_modules,
            agent_port: AGENT_PORT.into(),
            userland_root: Some(env.kbuild_root.clone()),
        },
        &dir.join("initramfs.cpio"),
    )?;
    initramfs::append_archives(&initrd.path, extra_initramfs)?;
    let names: Vec<String> = initrd
        .modules
        .iter()
        .map(|m| initramfs::module_name(m))
        .collect();
    progress(&format!(
        "initramfs built in {:.1} s: {:.1} MiB, modules {}{}",
        secs(t),
        initrd.size as f64 / (1024.0 * 1024.0),
        names.join(" "),
        if initrd.extra_modules.is_empty() {
            String::new()
        } else {
            format!(
                "; ours, for the scenarios to insmod: {}",
                initrd.extra_modules.join(" ")
            )
        }
    ))?;
    Ok(Prepared {
        env,
        kernel,
        initrd,
    })
}

/// The QEMU machine of `profile` (its `layout` in `dir`) booting `initrd`: console log, QMP
/// socket, root ports and devices from the layout, the vIOMMU only where the profile has one;
/// `extra` are the user's options (`--memory`, `--qemu-arg`, shares).
pub fn qemu_config(
    env: &ProvisionEnv,
    profile: &VmProfile,
    layout: &VmLayout,
    initrd: &Path,
    dir: &Path,
    agent_socket: &Path,
    extra: VmOptions,
) -> QemuConfig {
    QemuConfig {
        qemu: env.qemu.clone(),
        accel: env.accel.as_str().into(),
        cpu: env.cpu.clone(),
        memory_mib: profile.memory_mib,
        smp: 2,
        kernel: env.kernel.clone(),
        initrd: initrd.to_path_buf(),
        append: if profile.viommu {
            DEFAULT_APPEND.to_string()
        } else {
            DEFAULT_APPEND.replace(" intel_iommu=on", "")
        },
        console_log: dir.join("console.log"),
        agent_socket: agent_socket.to_path_buf(),
        qmp_socket: dir.join("qmp.sock"),
        viommu: profile.viommu,
        hotplug: profile.hotplug,
        root_ports: layout.root_ports.clone(),
        devices: layout.devices.clone(),
        extra,
    }
}

/// Seconds since `since`, for progress lines.
pub fn secs(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}

/// Reports the last `n` lines of the log at `path` under `title` (not after an interrupt: the
/// user asked to stop, not for logs).
pub fn show_tail(
    progress: Progress<'_>,
    title: &str,
    path: &Path,
    n: usize,
) -> Result<(), LabError> {
    if process::interrupted().is_some() {
        return Ok(());
    }
    progress(&format!("{title} ({}), last lines:", path.display()))?;
    for l in tail_lines(path, n) {
        progress(&format!("  | {l}"))?;
    }
    Ok(())
}

/// The last `n` lines of a text file (lossy UTF-8), or an explanation if it cannot be read.
pub fn tail_lines(path: &Path, n: usize) -> Vec<String> {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..]
                .iter()
                .map(|l| l.trim_end_matches('\r').to_string())
                .collect()
        }
        Err(e) => vec![format!("(cannot read {}: {e})", path.display())],
    }
}
