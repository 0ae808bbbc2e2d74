//! The command line's definition: the `pcisim` subcommands and their arguments as clap types
//! ([`Cli`], [`Cmd`], [`LabCmd`], and the kernel and VM argument groups with their conversion
//! to the lab's options). What each command does is in `main.rs` (`run`), `serve.rs` and
//! `lab_cmds.rs`; keeping the definition apart lets `--help` text be read in one place.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::ctl;

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "pcisim",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("PCISIM_BUILD_COMMIT"), ")"),
    about = "vfio-user server emulating accelerator PCI functions, and its lab"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Cmd {
    /// Serve devices, each on its own vfio-user socket, until SIGINT/SIGTERM.
    Serve {
        /// `gpu:socket=PATH[,vram=SIZE][,id=NAME][,irq=msix|msi][,no_soft_reset=on|off][,journal=N][,vendor=..][,device=..][,class=..]`
        /// or `npu:socket=PATH[,id=NAME][,peer=GPU_ID][,checking=on|off][,chunk_delay_us=N]`
        #[arg(long = "device", required = true)]
        devices: Vec<String>,
        /// Serve the control socket (journal, stats, status, fault injection) at this path.
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Permission bits of the device sockets, in octal (connecting needs write permission,
        /// so 0600 admits only this user; 0660 also the socket's group). The control socket is
        /// always 0600.
        #[arg(long, value_name = "OCTAL", default_value = "0600", value_parser = parse_mode)]
        socket_mode: u32,
        /// Also serve clients running as this uid (repeatable); by default only clients of the
        /// server's own uid are served, others are refused at connect (SO_PEERCRED).
        #[arg(long = "allow-uid", value_name = "UID")]
        allow_uids: Vec<u32>,
        /// A vfio-user client must complete VERSION within this many milliseconds of
        /// connecting, or it is disconnected and the device serves the next client (0: no
        /// deadline).
        #[arg(long, value_name = "MS", default_value_t = 5000)]
        handshake_timeout: u64,
        /// A vfio-user message whose first byte has arrived must arrive whole within this many
        /// milliseconds, or the client is disconnected (0: no deadline). An idle client between
        /// messages is never timed out.
        #[arg(long, value_name = "MS", default_value_t = 5000)]
        frame_timeout: u64,
        /// A control-socket client that sends no request for this many milliseconds is
        /// disconnected (default 30 minutes; the lab holds one connection per VM session).
        #[arg(long, value_name = "MS", default_value_t = 30 * 60 * 1000)]
        control_idle_timeout: u64,
    },
    /// Talk to a running server's control socket: journal, violations, stats, faults.
    Ctl {
        /// The server's control socket (`pcisim serve --control PATH`).
        #[arg(long, global = true, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Print JSON (records as JSON lines) instead of text.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        cmd: ctl::CtlCmd,
    },
    /// Print each device's own description (IDs, BARs, capabilities) as JSON and exit.
    Describe {
        /// Same syntax as `serve --device`.
        #[arg(long = "device", required = true)]
        devices: Vec<String>,
    },
    /// The lab: provision QEMU and a guest, boot it with pcisim devices, run guest scenarios.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// Measure the server (one line per figure, with the floor measured in the same run).
    Bench {
        /// Fewer iterations (under ~20 s in total).
        #[arg(long)]
        quick: bool,
        /// Tiny counts, for the test that checks every line is printed (figures meaningless).
        #[arg(long, hide = true)]
        smoke: bool,
    },
}

/// The guest kernel flags of `lab suite` and `lab up` (docs/lab.md, "Your kernel").
#[derive(Debug, clap::Args)]
pub(crate) struct KernelArgs {
    /// Debian guest kernel series: 6.12 (trixie, the default) or 7.3 (trixie-backports); or
    /// SERIES-debug (e.g. 6.12-debug): Debian's linux-source-SERIES built with lockdep and the
    /// kernel's other checkers (qemu-scripts/debug-kernel.sh; built once, ~20 min, on first use).
    #[arg(long, value_name = "SERIES", conflicts_with_all = ["kernel_image", "kernel_tree"])]
    pub(crate) kernel: Option<String>,
    /// Your kernel image (bzImage/vmlinuz); its modules with --modules.
    #[arg(long, value_name = "PATH", conflicts_with = "kernel_tree")]
    pub(crate) kernel_image: Option<PathBuf>,
    /// The modules of --kernel-image: an INSTALL_MOD_PATH tree (DIR/lib/modules/<kver>/) or the
    /// <kver> directory itself.
    #[arg(long, value_name = "DIR", requires = "kernel_image")]
    pub(crate) modules: Option<PathBuf>,
    /// Your built Linux tree: its bzImage, its modules (installed into the lab's cache) and the
    /// tree as KDIR for the guest NPU driver.
    #[arg(long, value_name = "DIR")]
    pub(crate) kernel_tree: Option<PathBuf>,
}

impl KernelArgs {
    pub(crate) fn source(self) -> Result<pcisim_lab::kernel::KernelSource> {
        Ok(pcisim_lab::kernel::KernelSource::from_flags(
            self.kernel,
            self.kernel_image,
            self.modules,
            self.kernel_tree,
        )?)
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum LabCmd {
    /// Run the scenario catalogue in a fresh VM; KTAP on stdout, progress on stderr.
    Suite {
        /// Run only scenarios whose name contains this (e.g. `E1`, `E`, `msix`).
        #[arg(long)]
        filter: Option<String>,
        #[command(flatten)]
        kernel: KernelArgs,
        /// Extra `key=value` options appended to every GPU's device spec in every VM (fault knobs).
        #[arg(long = "device-opt")]
        device_opts: Vec<String>,
        /// Keep the run directory (sockets, logs, initramfs) even on success.
        #[arg(long)]
        keep: bool,
        /// Succeed even if scenarios were skipped (by default a skip makes the run exit 4).
        #[arg(long)]
        allow_skip: bool,
        /// Also run the scenario files (`*.toml`, docs/scenarios.md) in this directory or file,
        /// after the catalogue (repeatable).
        #[arg(long = "scenarios", value_name = "FILE|DIR")]
        scenario_files: Vec<PathBuf>,
        /// Print the selected scenarios (id, name, VM profile, expected failure kinds), one a
        /// line, tab-separated, and exit 0 (4 if none) without provisioning or booting anything.
        #[arg(long)]
        list: bool,
        /// Run only the K-th of N parts of the selection (e.g. `2/4`): deterministic, balanced by
        /// the scenarios' measured cost, and the N parts together are the selection, each
        /// scenario once (docs/ci.md).
        #[arg(long, value_name = "K/N")]
        shard: Option<pcisim_lab::harness::suite::Shard>,
        /// Also write the verdicts as JUnit XML to FILE (one testsuite, one testcase per
        /// scenario; docs/ci.md).
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
        /// How many VMs run at the same time (default: one more than the cores, as many as the
        /// available memory holds, 1 with --gdb). The KTAP order and numbers do not depend on it.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        jobs: Option<u16>,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Run scenario files (`*.toml`; a directory's, sorted by name): the TOML format of
    /// docs/scenarios.md, judged as the catalogue (KTAP, journal, guest kernel log). Every file
    /// is checked before anything boots; one VM per profile. KTAP on stdout, progress on
    /// stderr, exit codes as `lab suite`.
    Run {
        /// Scenario files or directories of them.
        #[arg(required = true, value_name = "FILE|DIR")]
        paths: Vec<PathBuf>,
        /// Run only scenarios whose name contains this.
        #[arg(long)]
        filter: Option<String>,
        #[command(flatten)]
        kernel: KernelArgs,
        /// Extra `key=value` options appended to every GPU's device spec in every VM.
        #[arg(long = "device-opt")]
        device_opts: Vec<String>,
        /// Keep the run directory even on success.
        #[arg(long)]
        keep: bool,
        /// Succeed even if scenarios were skipped.
        #[arg(long)]
        allow_skip: bool,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Whether this host's KVM can run the lab's guest: a sub-second kvm-ioctls probe (a
    /// long-mode vCPU running plain and VEX code). Prints the verdict and the reason; exits 0
    /// when KVM is usable, 1 when not (see docs/lab.md).
    KvmProbe {
        /// Print the verdict, the reason and each check as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The kernel's own selftests against pcisim's devices (`vfio`: tools/testing/selftests/vfio
    /// from Debian's linux-source-7.3, built statically, run against the GPU; docs/lab.md).
    Kselftest {
        /// The selftest collection (only `vfio`).
        #[arg(value_parser = ["vfio"])]
        collection: String,
        /// Run only the V scenarios (vfio selftests) whose name contains this (e.g. `V5`, `driver`).
        #[arg(long)]
        filter: Option<String>,
        /// The guest kernel (iommufd modes run if the guest has /dev/iommu, else type1).
        #[command(flatten)]
        kernel: KernelArgs,
        /// Keep the run directory even on success.
        #[arg(long)]
        keep: bool,
    },
    /// Start a VM with the profile's devices and free hot-add slots, left running (manual
    /// experiments; see docs/hotplug.md).
    Up {
        /// `manual` (gpu0 plugged, gpu1 with irq=msi to plug, one more free slot) or a suite
        /// profile (`gpu`, `gpu-npu`, `gpu-hotplug`, `gpu-nsr`).
        #[arg(long, default_value = "manual")]
        profile: String,
        #[command(flatten)]
        kernel: KernelArgs,
        /// State directory (default `$XDG_RUNTIME_DIR/pcisim-lab`, else `/tmp/pcisim-lab-UID`).
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
        /// Extra `key=value` options appended to every GPU's device spec (repeatable).
        #[arg(long = "device-opt", value_name = "KEY=VALUE")]
        device_opts: Vec<String>,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Copy a file between the host and the guest (`vm:PATH` is the guest's side), exactly,
    /// through the VM's 9p transfer share.
    Cp {
        /// The source (`vm:PATH` for the guest's).
        src: String,
        /// The destination (`vm:PATH` for the guest's); a directory gets the source's name.
        dst: String,
        /// State directory of the VM.
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
    },
    /// Hot-add a device of the running VM (QMP device_add) and wait until the guest sees it.
    Plug {
        /// The device id (`gpu1`).
        dev: String,
        /// The root port: its slot number (`3`) or id (`rp3`); default its own, else a free one.
        #[arg(long)]
        slot: Option<String>,
        /// State directory of the VM.
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
    },
    /// Hot-remove a device (QMP device_del) and wait for DEVICE_DELETED.
    Unplug {
        /// The device id.
        dev: String,
        /// device_del a device with MSI-X anyway (QEMU 11.1.3 aborts on it).
        #[arg(long)]
        force: bool,
        /// State directory of the VM.
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
    },
    /// Run a command in the guest through the agent; stdin (unless a terminal or -n) is its
    /// input, its output and exit status are passed on.
    Exec {
        /// Seconds before the guest kills the command.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Do not forward stdin (the command reads end of file).
        #[arg(short = 'n', long)]
        no_stdin: bool,
        /// State directory of the VM.
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
        /// The command and its arguments (after `--`).
        #[arg(trailing_var_arg = true, required = true)]
        argv: Vec<String>,
    },
    /// Attach the terminal to a shell in the guest (its ttyS2); Ctrl-] leaves.
    Console {
        /// State directory of the VM.
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
    },
    /// Show the running VM: processes, sockets, devices, slots (exit 1 if none runs).
    Status {
        /// State directory of the VM.
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
    },
    /// Power the VM off, stop QEMU and the server, remove the state directory.
    Down {
        /// Keep the state directory's logs.
        #[arg(long)]
        keep: bool,
        /// State directory of the VM.
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
    },
}

/// What `lab up` and `lab suite` add to each VM.
#[derive(Debug, clap::Args)]
pub(crate) struct VmArgs {
    /// Guest RAM in MiB (default: the profile's).
    #[arg(long, value_name = "MIB")]
    pub(crate) memory: Option<u64>,
    /// vCPUs (default 2).
    #[arg(long, value_name = "N")]
    pub(crate) smp: Option<u32>,
    /// Appended to the guest kernel command line (e.g. `dyndbg="module vfio_pci +p"`).
    #[arg(long, value_name = "TEXT")]
    pub(crate) append: Option<String>,
    /// One more argument for QEMU, verbatim (repeatable: `--qemu-arg=-d --qemu-arg=guest_errors`).
    #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub(crate) qemu_args: Vec<String>,
    /// QEMU's gdbstub on this TCP port (default 1234): `gdb vmlinux -ex 'target remote :1234'`.
    #[arg(long, value_name = "PORT", num_args = 0..=1, require_equals = true,
          default_missing_value = "1234")]
    pub(crate) gdb: Option<u16>,
    /// Mount a host directory read-write in the guest over virtio-9p, at GUEST_PATH (default:
    /// the same absolute path as on the host). Repeatable.
    #[arg(long = "share", value_name = "HOST_DIR[:GUEST_PATH]")]
    pub(crate) shares: Vec<String>,
}

impl VmArgs {
    pub(crate) fn options(self) -> Result<pcisim_lab::vm::qemu::VmOptions> {
        let shares = self
            .shares
            .iter()
            .map(|s| pcisim_lab::vm::qemu::Share::parse(s).map_err(anyhow::Error::msg))
            .collect::<Result<Vec<_>>>()?;
        if self.smp == Some(0) {
            anyhow::bail!("--smp must be at least 1");
        }
        Ok(pcisim_lab::vm::qemu::VmOptions {
            memory_mib: self.memory,
            smp: self.smp,
            append: self.append,
            qemu_args: self.qemu_args,
            gdb: self.gdb,
            shares,
        })
    }
}

/// `--socket-mode`: octal permission bits (`0660`, `660` or `0o660`), nothing beyond 0777.
pub(crate) fn parse_mode(s: &str) -> std::result::Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        Ok(m) => Err(format!("{m:#o} has bits beyond 0777")),
        Err(e) => Err(format!("{s:?} is not an octal mode: {e}")),
    }
}
