//! The one boot sequence of a lab VM, shared by the suite ([`crate::harness::suite`]) and the
//! manual lab ([`crate::manual`]): [`prepare`] provisions QEMU and the guest kernel, builds the
//! guest programs, our guest kernel modules and the initramfs; [`qemu_config`] is the QEMU
//! machine for a profile; [`Vm::boot`] starts the device server and QEMU and waits for the guest
//! agent; [`tail_lines`] shows what a failed step logged.
//!
//! What differs between the two callers is a parameter, [`Lifetime`]: the suite's VMs are
//! [`Lifetime::Attached`] (children that die with the lab; the lab listens on the agent's socket
//! and keeps the one link), `lab up`'s are [`Lifetime::Detached`] (own sessions, released once
//! booted so they outlive the command; QEMU listens on the agent's socket so every later command
//! connects anew, and on a console shell's). Progress lines and a failed boot's diagnostics
//! (console, QEMU output, what the threads were doing) go to the caller's [`Progress`].

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, warn};

use crate::error::LabError;
use crate::kernel::{self, KernelSource, PreparedKernel};
use crate::vm::agent::{self, Agent, AgentError, AgentListener, Ready};
use crate::vm::initramfs::{self, Initramfs};
use crate::vm::process::{self, describe_status, ChildGuard, Group};
use crate::vm::profile::{VmLayout, VmProfile};
use crate::vm::provision::{self, Accel, ProvisionEnv};
use crate::vm::qemu::{QemuConfig, VmOptions, DEFAULT_APPEND};
use crate::vm::qmp::Qmp;
use crate::vm::server::Server;
use crate::vm::{guest_build, kmod, pvh, stall};

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
    // Under TCG the bzImage's decompressor is emulated: boot the PVH vmlinux where there is one.
    let mut env = env;
    if env.accel == Accel::Tcg {
        let t = Instant::now();
        match pvh::pvh_kernel(&env.kernel, &env.cache) {
            Some(vmlinux) => {
                progress(&format!(
                    "booting the guest kernel through its PVH entry ({}, {:.1} s): no \
                     decompressor under TCG",
                    vmlinux.display(),
                    secs(t)
                ))?;
                env.kernel = vmlinux;
            }
            None => progress(&format!(
                "booting {} as given (no PVH entry, or it cannot be extracted)",
                env.kernel.display()
            ))?,
        }
    }

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
    let share_names: Vec<String> = initrd
        .share_modules
        .iter()
        .map(|m| initramfs::module_name(m))
        .collect();
    progress(&format!(
        "initramfs built in {:.1} s: {:.1} MiB, modules {} (for a share: {}){}",
        secs(t),
        initrd.size as f64 / (1024.0 * 1024.0),
        names.join(" "),
        share_names.join(" "),
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
        agent_listens: false,
        console_socket: None,
        qmp_socket: dir.join("qmp.sock"),
        viommu: profile.viommu,
        hotplug: profile.hotplug,
        root_ports: layout.root_ports.clone(),
        devices: layout.devices.clone(),
        extra,
    }
}

/// How a VM's server and QEMU live, and how the lab reaches the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifetime {
    /// Children of the lab, each leading its own process group, killed with it (the suite).
    /// QEMU connects to the agent socket the lab listens on: one link for the VM's life.
    Attached,
    /// Own sessions without a parent-death signal, meant to be [`Vm::release`]d once booted
    /// (`lab up`): they outlive the command. QEMU listens on the agent's socket (each later
    /// command connects anew) and on `console` for a third serial port (ttyS2, the console
    /// shell). A boot that fails still stops them.
    Detached {
        /// The console shell's socket.
        console: PathBuf,
    },
}

impl Lifetime {
    fn group(&self) -> Group {
        match self {
            Lifetime::Attached => Group::Own,
            Lifetime::Detached { .. } => Group::Session,
        }
    }
}

/// A child [`Vm::boot`] just started, for a caller that records it at once (`lab up` writes
/// its state file, so that a VM whose `up` was killed can still be brought down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spawned {
    /// The device server, with its pid.
    Server(u32),
    /// QEMU, with its pid.
    Qemu(u32),
}

/// What [`Vm::boot`] brings up.
#[derive(Debug, Clone)]
pub struct VmSpec<'a> {
    /// The `pcisim` binary (for `serve`).
    pub pcisim_exe: &'a Path,
    /// QEMU and the guest kernel.
    pub env: &'a ProvisionEnv,
    /// The initramfs.
    pub initrd: &'a Path,
    /// The VM profile.
    pub profile: &'a VmProfile,
    /// Its root ports and devices (sockets in `dir`).
    pub layout: &'a VmLayout,
    /// The server's `--device` specs, one per device of the layout.
    pub specs: &'a [String],
    /// The VM's directory: logs (`server.log`, `qemu.log`, `console.log`, `agent.log`,
    /// `qmp.log`, `qemu-cmdline.sh`, `stall.txt`) and sockets.
    pub dir: &'a Path,
    /// The user's QEMU options (`--memory`, `--qemu-arg`, shares).
    pub extra: VmOptions,
    /// Attached or detached.
    pub lifetime: Lifetime,
}

/// A booted VM: its device server (with a control socket, `control.sock`), QEMU, the agent
/// link (after its greeting) and a QMP session.
pub struct Vm {
    /// The device server.
    pub server: Server,
    /// QEMU.
    pub qemu: ChildGuard,
    /// The guest agent, greeted.
    pub agent: Agent,
    /// QMP (transcript in `qmp.log`).
    pub qmp: Qmp,
    /// The agent's greeting (guest kernel release, guest uptime).
    pub ready: Ready,
    /// From QEMU's start to the agent's greeting.
    pub boot_time: Duration,
    /// The CPU time QEMU had used by the agent's greeting ([`process::cpu_time`]).
    pub qemu_cpu: Option<Duration>,
    /// The QEMU machine.
    pub config: QemuConfig,
}

impl Vm {
    /// Starts the device server (`--control dir/control.sock`, waiting for its sockets), then
    /// QEMU (`qemu-cmdline.sh` records its command line), waits for the agent's greeting and
    /// connects QMP. `spawned` hears of each child as soon as it runs. Progress lines go to
    /// `progress`; when the guest does not come up, so do the console's key lines and tail, QEMU's
    /// output and, if QEMU still runs, what its and the server's threads were doing
    /// (`stall.txt`). On an error every child started is stopped, whatever the lifetime.
    pub fn boot<E: From<LabError>>(
        spec: &VmSpec<'_>,
        progress: Progress<'_>,
        spawned: &mut dyn FnMut(Spawned) -> Result<(), E>,
    ) -> Result<Vm, E> {
        let dir = spec.dir;
        let group = spec.lifetime.group();

        // The device server, with its control socket (journals, violations).
        let sockets: Vec<PathBuf> = spec
            .layout
            .devices
            .iter()
            .map(|d| d.socket.clone())
            .collect();
        let server_log = dir.join("server.log");
        let t = Instant::now();
        let server = match Server::start_in(
            spec.pcisim_exe,
            spec.specs,
            &sockets,
            Some(&dir.join("control.sock")),
            &server_log,
            group,
        ) {
            Ok(s) => s,
            Err(e) => {
                show_tail(progress, "server log", &server_log, 20)?;
                return Err(LabError::from(e).into());
            }
        };
        spawned(Spawned::Server(server.pid()))?;
        progress(&format!(
            "device server up in {:.1} s (pid {}): [{}]",
            secs(t),
            server.pid(),
            spec.specs.join(" ")
        ))?;

        // QEMU.
        let listener = match spec.lifetime {
            Lifetime::Attached => {
                Some(AgentListener::bind(&dir.join("agent.sock")).map_err(LabError::from)?)
            }
            Lifetime::Detached { .. } => None,
        };
        let mut config = qemu_config(
            spec.env,
            spec.profile,
            spec.layout,
            spec.initrd,
            dir,
            &listener
                .as_ref()
                .map_or_else(|| dir.join("agent.sock"), |l| l.path().to_path_buf()),
            spec.extra.clone(),
        );
        if let Lifetime::Detached { console } = &spec.lifetime {
            config.agent_listens = true;
            config.console_socket = Some(console.clone());
        }
        match config.shell_line() {
            Ok(line) => {
                if let Err(e) = fs::write(dir.join("qemu-cmdline.sh"), format!("{line}\n")) {
                    warn!("cannot write qemu-cmdline.sh: {e}");
                }
            }
            Err(e) => warn!("{e}"),
        }
        let boot = Instant::now();
        let mut qemu = config
            .spawn_in(&dir.join("qemu.log"), group)
            .map_err(LabError::from)?;
        spawned(Spawned::Qemu(qemu.pid()))?;

        // The guest.
        let booted =
            greet(listener.as_ref(), &config, &mut qemu, dir).and_then(|(agent, ready)| {
                let boot_time = boot.elapsed();
                let qemu_cpu = process::cpu_time(qemu.pid());
                let transcript = File::create(dir.join("qmp.log"))
                    .map_err(|e| warn!("no QMP transcript: {e}"))
                    .ok();
                let qmp = Qmp::connect(&config.qmp_socket, CONNECT_TIMEOUT, transcript)?;
                Ok((agent, ready, boot_time, qemu_cpu, qmp))
            });
        let (agent, ready, boot_time, qemu_cpu, qmp) = match booted {
            Ok(x) => x,
            Err(e) => {
                if e.interrupt_signal().is_none() {
                    show_console(progress, &config.console_log)?;
                    show_tail(progress, "QEMU output", &dir.join("qemu.log"), 10)?;
                    // Whether the guest spins or QEMU waits (on our server?): the threads say.
                    if qemu.try_wait().ok().flatten().is_none() {
                        let file = dir.join("stall.txt");
                        let text = stall::describe_to(
                            &file,
                            &[(qemu.pid(), "QEMU"), (server.pid(), "device server")],
                        );
                        progress(&format!("threads at the timeout ({}):", file.display()))?;
                        for l in text.lines() {
                            progress(&format!("  {l}"))?;
                        }
                    }
                }
                return Err(e.into());
            }
        };
        Ok(Vm {
            server,
            qemu,
            agent,
            qmp,
            ready,
            boot_time,
            qemu_cpu,
            config,
        })
    }

    /// Lets the server and QEMU run on (a [`Lifetime::Detached`] VM outlives the command from
    /// here) and returns their pids: (server, QEMU). The agent link and QMP are closed.
    pub fn release(self) -> (u32, u32) {
        (self.server.release(), self.qemu.release())
    }
}

/// Waits for the agent: QEMU connecting to `listener` (attached) or its socket opening
/// (detached), then the greeting; either wait ends when QEMU exits.
fn greet(
    listener: Option<&AgentListener>,
    config: &QemuConfig,
    qemu: &mut ChildGuard,
    dir: &Path,
) -> Result<(Agent, Ready), LabError> {
    let mut watch = || {
        qemu.try_wait()
            .ok()
            .flatten()
            .map(|s| format!("QEMU exited ({})", describe_status(s)))
    };
    let boot_err = |source: AgentError| LabError::Boot {
        source,
        console: config.console_log.clone(),
    };
    let mut agent = match listener {
        Some(l) => l.accept(CONNECT_TIMEOUT, &mut watch),
        None => agent::connect(&config.agent_socket, CONNECT_TIMEOUT, &mut watch),
    }
    .map_err(boot_err)?;
    match File::create(dir.join("agent.log")) {
        Ok(f) => agent.set_transcript(f),
        Err(e) => warn!("no agent transcript: {e}"),
    }
    let ready = agent
        .wait_ready(BOOT_TIMEOUT, &mut watch)
        .map_err(boot_err)?;
    debug!(
        "agent ready: kernel {}, guest uptime {} ms",
        ready.kernel, ready.uptime_ms
    );
    Ok((agent, ready))
}

/// Lines of the console log shown when the guest does not come up: the last ones, and before them
/// at most this many "key" lines (init, panic, vfio, IOMMU).
const CONSOLE_TAIL: usize = 15;
const CONSOLE_KEY_LINES: usize = 20;

/// Console lines worth showing first when the guest did not come up.
pub fn is_key_console_line(line: &str) -> bool {
    const KEYS: &[&str] = &[
        "pcisim-init",
        "pcisim-guest",
        "Kernel panic",
        "not syncing",
        "Attempted to kill init",
        "insmod",
        "BUG:",
        "Oops",
        "vfio",
        "DMAR",
    ];
    KEYS.iter().any(|k| line.contains(k))
}

/// Reports the interesting console lines (init's own, panics, vfio/IOMMU) and then the last lines.
pub fn show_console(progress: Progress<'_>, console: &Path) -> Result<(), LabError> {
    let all = tail_lines(console, usize::MAX);
    let key: Vec<&String> = all.iter().filter(|l| is_key_console_line(l)).collect();
    if !key.is_empty() {
        progress(&format!(
            "guest console ({}), key lines:",
            console.display()
        ))?;
        for l in &key[key.len().saturating_sub(CONSOLE_KEY_LINES)..] {
            progress(&format!("  | {l}"))?;
        }
    }
    show_tail(progress, "guest console", console, CONSOLE_TAIL)
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
