//! `pcisim`: serve emulated PCI functions over vfio-user, describe them, run the guest lab, and
//! measure the server.

#![deny(missing_docs)]

mod bench;
mod control;
mod ctl;
mod devices;
mod spec;

use std::cell::Cell;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use pcisim_lab::note;
use pcisim_lab::output::PipeSafe;

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "pcisim",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("PCISIM_BUILD_COMMIT"), ")"),
    about = "vfio-user server emulating accelerator PCI functions, and its lab"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
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
struct KernelArgs {
    /// Debian guest kernel series: 6.12 (trixie, the default) or 7.3 (trixie-backports); or
    /// SERIES-debug (e.g. 6.12-debug): Debian's linux-source-SERIES built with lockdep and the
    /// kernel's other checkers (qemu-scripts/debug-kernel.sh; built once, ~20 min, on first use).
    #[arg(long, value_name = "SERIES", conflicts_with_all = ["kernel_image", "kernel_tree"])]
    kernel: Option<String>,
    /// Your kernel image (bzImage/vmlinuz); its modules with --modules.
    #[arg(long, value_name = "PATH", conflicts_with = "kernel_tree")]
    kernel_image: Option<PathBuf>,
    /// The modules of --kernel-image: an INSTALL_MOD_PATH tree (DIR/lib/modules/<kver>/) or the
    /// <kver> directory itself.
    #[arg(long, value_name = "DIR", requires = "kernel_image")]
    modules: Option<PathBuf>,
    /// Your built Linux tree: its bzImage, its modules (installed into the lab's cache) and the
    /// tree as KDIR for the guest NPU driver.
    #[arg(long, value_name = "DIR")]
    kernel_tree: Option<PathBuf>,
}

impl KernelArgs {
    fn source(self) -> Result<pcisim_lab::kernel::KernelSource> {
        Ok(pcisim_lab::kernel::KernelSource::from_flags(
            self.kernel,
            self.kernel_image,
            self.modules,
            self.kernel_tree,
        )?)
    }
}

#[derive(Debug, Subcommand)]
enum LabCmd {
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
        /// How many VMs run at the same time (default: one per core, as many as the available
        /// memory holds, 1 with --gdb). The KTAP order and numbers do not depend on it.
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
struct VmArgs {
    /// Guest RAM in MiB (default: the profile's).
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// vCPUs (default 2).
    #[arg(long, value_name = "N")]
    smp: Option<u32>,
    /// Appended to the guest kernel command line (e.g. `dyndbg="module vfio_pci +p"`).
    #[arg(long, value_name = "TEXT")]
    append: Option<String>,
    /// One more argument for QEMU, verbatim (repeatable: `--qemu-arg=-d --qemu-arg=guest_errors`).
    #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
    qemu_args: Vec<String>,
    /// QEMU's gdbstub on this TCP port (default 1234): `gdb vmlinux -ex 'target remote :1234'`.
    #[arg(long, value_name = "PORT", num_args = 0..=1, require_equals = true,
          default_missing_value = "1234")]
    gdb: Option<u16>,
    /// Mount a host directory read-write in the guest over virtio-9p, at GUEST_PATH (default:
    /// the same absolute path as on the host). Repeatable.
    #[arg(long = "share", value_name = "HOST_DIR[:GUEST_PATH]")]
    shares: Vec<String>,
}

impl VmArgs {
    fn options(self) -> Result<pcisim_lab::vm::qemu::VmOptions> {
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

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_micros()
        .init();
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            note!("pcisim: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

/// Writes `text` to stdout; a reader that went away is not an error (the rest is discarded),
/// any other write error is.
fn print_out(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = PipeSafe::stdout();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

fn parse_specs(devices: &[String]) -> Result<Vec<spec::DeviceSpec>> {
    devices
        .iter()
        .enumerate()
        .map(|(i, d)| spec::parse(d, i))
        .collect()
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Serve {
            devices,
            control,
            socket_mode,
            allow_uids,
            handshake_timeout,
            frame_timeout,
            control_idle_timeout,
        } => serve(
            &parse_specs(&devices)?,
            control.as_deref(),
            &Access {
                socket_mode,
                allow_uids,
                handshake_timeout: millis(handshake_timeout),
                frame_timeout: millis(frame_timeout),
                control_idle_timeout: std::time::Duration::from_millis(control_idle_timeout.max(1)),
            },
        ),
        Cmd::Ctl { control, json, cmd } => {
            let control = control.context(
                "ctl needs --control PATH (the socket given to `pcisim serve --control`)",
            )?;
            ctl::run(&control, json, cmd)
        }
        Cmd::Describe { devices } => {
            let mut out = Vec::new();
            let specs = parse_specs(&devices)?;
            for (s, built) in specs.iter().zip(devices::build_all(&specs)?) {
                out.push(serde_json::json!({
                    "id": s.id,
                    "kind": s.kind.name(),
                    "socket": s.socket,
                    "description": built.description,
                }));
            }
            print_out(&format!("{}\n", serde_json::to_string_pretty(&out)?))?;
            Ok(0)
        }
        Cmd::Lab { cmd } => match cmd {
            LabCmd::Suite {
                filter,
                kernel,
                device_opts,
                keep,
                allow_skip,
                scenario_files,
                list,
                shard,
                junit,
                jobs,
                vm,
            } => {
                let files = if scenario_files.is_empty() {
                    None
                } else {
                    match pcisim_lab::harness::file::load_paths(&scenario_files) {
                        Ok(s) => Some(s),
                        Err(e) => {
                            note!("pcisim: error: {e}");
                            return Ok(pcisim_lab::harness::suite::EXIT_INFRA);
                        }
                    }
                };
                if list {
                    let opts = pcisim_lab::SuiteOptions {
                        filter,
                        shard,
                        ..pcisim_lab::SuiteOptions::new("pcisim")
                    };
                    let mut all = pcisim_lab::catalogue();
                    all.extend(files.into_iter().flatten());
                    let selected = pcisim_lab::harness::suite::selection(&opts, all);
                    let mut text = String::new();
                    for l in pcisim_lab::harness::suite::list_lines(&selected) {
                        text.push_str(&l);
                        text.push('\n');
                    }
                    print_out(&text)?;
                    return Ok(if selected.is_empty() {
                        pcisim_lab::harness::suite::EXIT_NOT_ALL_RAN
                    } else {
                        0
                    });
                }
                let opts = pcisim_lab::SuiteOptions {
                    filter,
                    kernel: kernel.source()?,
                    device_opts,
                    keep,
                    allow_skip,
                    shard,
                    junit,
                    jobs: jobs.map(usize::from),
                    vm: vm.options()?,
                    ..pcisim_lab::SuiteOptions::new(
                        std::env::current_exe().context("locating the pcisim binary")?,
                    )
                };
                let mut out = std::io::stdout();
                let mut progress = std::io::stderr();
                let result = match files {
                    None => pcisim_lab::run_suite(&opts, &mut out, &mut progress),
                    Some(files) => {
                        let mut all = pcisim_lab::catalogue();
                        all.extend(files);
                        pcisim_lab::harness::suite::run_scenarios(
                            &opts,
                            all,
                            &mut out,
                            &mut progress,
                        )
                    }
                };
                // 0 all passed, 1 failed, 2 infrastructure, 4 not everything ran, 128 + signal
                // interrupted (after the lab cleaned up), 141 the report's reader went away.
                let code = pcisim_lab::harness::suite::exit_code(&result, allow_skip);
                if let Err(e) = &result {
                    let text = pcisim_lab::error::error_chain(e);
                    match code {
                        pcisim_lab::harness::suite::EXIT_INFRA => note!("pcisim: error: {text}"),
                        _ => note!("pcisim: {text}"),
                    }
                }
                Ok(code)
            }
            LabCmd::Run {
                paths,
                filter,
                kernel,
                device_opts,
                keep,
                allow_skip,
                vm,
            } => {
                let scenarios = match pcisim_lab::harness::file::load_paths(&paths) {
                    Ok(s) => s,
                    Err(e) => {
                        note!("pcisim: error: {e}");
                        return Ok(pcisim_lab::harness::suite::EXIT_INFRA);
                    }
                };
                let opts = pcisim_lab::SuiteOptions {
                    filter,
                    kernel: kernel.source()?,
                    device_opts,
                    keep,
                    allow_skip,
                    vm: vm.options()?,
                    ..pcisim_lab::SuiteOptions::new(
                        std::env::current_exe().context("locating the pcisim binary")?,
                    )
                };
                let result = pcisim_lab::harness::suite::run_scenarios(
                    &opts,
                    scenarios,
                    &mut std::io::stdout(),
                    &mut std::io::stderr(),
                );
                let code = pcisim_lab::harness::suite::exit_code(&result, allow_skip);
                if let Err(e) = &result {
                    note!("pcisim: error: {}", pcisim_lab::error::error_chain(e));
                }
                Ok(code)
            }
            LabCmd::KvmProbe { json } => {
                let v = pcisim_lab::vm::kvmprobe::probe();
                let text = if json {
                    serde_json::to_string_pretty(&v)?
                } else {
                    let verdict = if v.usable { "usable" } else { "unusable" };
                    format!("kvm: {verdict}: {} ({:.1} ms)", v.reason, v.elapsed_ms)
                };
                print_out(&format!("{text}\n"))?;
                Ok(if v.usable { 0 } else { 1 })
            }
            LabCmd::Kselftest {
                collection: _,
                filter,
                kernel,
                keep,
            } => lab_kselftest(filter, kernel, keep),
            cmd => lab_manual(cmd),
        },
        Cmd::Bench { quick, smoke } => match bench::run(quick, smoke) {
            Ok(()) => Ok(0),
            // As the suite: the report's reader went away, nothing more to say to anyone.
            Err(e) if e.is::<bench::ReaderGone>() => Ok(141),
            Err(e) => Err(e),
        },
    }
}

/// `pcisim lab kselftest vfio`: exit codes as `lab suite` (a selftest build failure is 2).
fn lab_kselftest(filter: Option<String>, kernel: KernelArgs, keep: bool) -> Result<i32> {
    use pcisim_lab::kselftest::{self, KselftestError};
    let opts = kselftest::KselftestOptions {
        suite: pcisim_lab::SuiteOptions {
            filter,
            kernel: kernel.source()?,
            keep,
            ..pcisim_lab::SuiteOptions::new(
                std::env::current_exe().context("locating the pcisim binary")?,
            )
        },
    };
    let result = kselftest::run(&opts, &mut std::io::stdout(), &mut std::io::stderr());
    Ok(match result {
        Ok(outcome) => outcome.exit_code(false),
        Err(KselftestError::Lab(e)) => {
            let r = Err(e);
            let code = pcisim_lab::harness::suite::exit_code(&r, false);
            if let Err(e) = &r {
                note!("pcisim: error: {}", pcisim_lab::error::error_chain(e));
            }
            code
        }
        Err(e) => {
            note!("pcisim: error: {}", pcisim_lab::error::error_chain(&e));
            pcisim_lab::harness::suite::EXIT_INFRA
        }
    })
}

/// The manual-experiment commands (`pcisim lab up|plug|unplug|exec|console|status|down`).
fn lab_manual(cmd: LabCmd) -> Result<i32> {
    use pcisim_lab::manual;
    let dir = |d: Option<PathBuf>| d.unwrap_or_else(manual::default_state_dir);
    // What these commands do (start a VM, plug, bring it down) must not depend on whether
    // anybody still reads what they say: a reader that went away only silences them.
    let mut out = PipeSafe::stdout();
    match cmd {
        LabCmd::Suite { .. }
        | LabCmd::Run { .. }
        | LabCmd::KvmProbe { .. }
        | LabCmd::Kselftest { .. } => {
            anyhow::bail!("not a manual command")
        }
        LabCmd::Up {
            profile,
            kernel,
            state,
            device_opts,
            vm,
        } => {
            let opts = manual::UpOptions {
                pcisim_exe: std::env::current_exe().context("locating the pcisim binary")?,
                dir: dir(state),
                profile: manual::profile_by_name(&profile)?,
                kernel: kernel.source()?,
                device_opts,
                vm: vm.options()?,
            };
            manual::up(&opts, &mut out)?;
        }
        LabCmd::Cp { src, dst, state } => {
            manual::cp(&dir(state), &src, &dst, &mut out)?;
        }
        LabCmd::Plug { dev, slot, state } => {
            manual::plug(&dir(state), &dev, slot.as_deref(), &mut out)?;
        }
        LabCmd::Unplug { dev, force, state } => {
            manual::unplug(&dir(state), &dev, force, &mut out)?;
        }
        LabCmd::Exec {
            timeout,
            no_stdin,
            state,
            argv,
        } => {
            use std::io::{IsTerminal, Read, Write};
            // Input from a pipe or file is forwarded (binary-safe); a terminal's is not (the
            // command is not interactive: use `lab console`).
            let mut input = Vec::new();
            if !no_stdin && !std::io::stdin().is_terminal() {
                std::io::stdin()
                    .read_to_end(&mut input)
                    .context("reading stdin")?;
            }
            let r = manual::exec(
                &dir(state),
                &argv,
                &input,
                std::time::Duration::from_secs(timeout),
            )?;
            {
                let mut o = PipeSafe::stdout();
                o.write_all(&r.stdout_bytes())
                    .and_then(|()| o.flush())
                    .context("writing to stdout")?;
            }
            {
                // The command's own stderr: passed on if anybody reads it.
                let mut err = std::io::stderr().lock();
                let _ = err
                    .write_all(r.stderr.as_bytes())
                    .and_then(|()| err.flush());
            }
            if r.timed_out {
                note!("pcisim: the guest killed the command after {timeout} s");
            }
            return Ok(match (r.exit, r.signal) {
                (Some(code), _) => code,
                (None, Some(sig)) => 128 + sig,
                _ => 1,
            });
        }
        LabCmd::Console { state } => manual::console(&dir(state))?,
        LabCmd::Status { state } => {
            return Ok(if manual::status(&dir(state), &mut out)? {
                0
            } else {
                1
            })
        }
        LabCmd::Down { keep, state } => manual::down(&dir(state), keep, &mut out)?,
    }
    Ok(0)
}

/// `--socket-mode`: octal permission bits (`0660`, `660` or `0o660`), nothing beyond 0777.
fn parse_mode(s: &str) -> std::result::Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        Ok(m) => Err(format!("{m:#o} has bits beyond 0777")),
        Err(e) => Err(format!("{s:?} is not an octal mode: {e}")),
    }
}

/// `0` → no deadline, otherwise that many milliseconds.
fn millis(ms: u64) -> Option<std::time::Duration> {
    (ms > 0).then(|| std::time::Duration::from_millis(ms))
}

/// Who may connect to the device sockets and how long they may take (`serve --socket-mode`,
/// `--allow-uid`, `--handshake-timeout`, `--frame-timeout`).
#[derive(Debug)]
struct Access {
    socket_mode: u32,
    allow_uids: Vec<u32>,
    handshake_timeout: Option<std::time::Duration>,
    frame_timeout: Option<std::time::Duration>,
    control_idle_timeout: std::time::Duration,
}

/// The socket files this process bound. Dropping it (at shutdown, or when startup fails after
/// some sockets were bound) removes each one that is still the socket we bound — compared by
/// st_dev/st_ino — and leaves alone whatever else now sits at its path.
#[derive(Debug, Default)]
struct BoundSockets(Vec<pcisim_vfio_user::server::SocketFile>);

impl Drop for BoundSockets {
    fn drop(&mut self) {
        for f in &self.0 {
            f.remove_if_ours();
        }
    }
}

/// SIGINT and SIGTERM as events of the main loop: each signal's handler (signal-hook's
/// async-signal-safe pipe writer) writes a byte to a socket pair whose other end is watched.
struct SignalWatch {
    /// The signal and the read end of its pair.
    pipes: Vec<(i32, UnixStream)>,
    /// Set to the signal that arrived: the loop then ends.
    stop: Rc<Cell<Option<i32>>>,
}

impl SignalWatch {
    fn new(stop: Rc<Cell<Option<i32>>>) -> std::io::Result<SignalWatch> {
        let mut pipes = Vec::new();
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            let (read, write) = UnixStream::pair()?;
            read.set_nonblocking(true)?;
            write.set_nonblocking(true)?;
            signal_hook::low_level::pipe::register(sig, write)?;
            pipes.push((sig, read));
        }
        Ok(SignalWatch { pipes, stop })
    }
}

impl MutEventSubscriber for SignalWatch {
    fn init(&mut self, ops: &mut EventOps) {
        for (sig, read) in &self.pipes {
            if let Err(e) = ops.add(Events::with_data(read, *sig as u32, EventSet::IN)) {
                log::error!("cannot watch signal {sig}: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        use std::io::Read;
        let sig = events.data() as i32;
        if let Some((_, read)) = self.pipes.iter().find(|(s, _)| *s == sig) {
            let mut buf = [0u8; 64];
            while matches!((&*read).read(&mut buf), Ok(n) if n > 0) {}
        }
        self.stop.set(Some(sig));
    }
}

fn serve(specs: &[spec::DeviceSpec], control_path: Option<&Path>, access: &Access) -> Result<i32> {
    // Build and bind everything first, so a bad option or a busy socket fails before any
    // device starts serving.
    let mut servers = Vec::new();
    // Declared before anything is bound: every early return below removes what was bound.
    let mut bound = BoundSockets::default();
    let mut controls = Vec::new();
    let mut built_all = devices::build_all(specs)?.into_iter();
    for s in specs {
        if let Some(other) = specs.iter().find(|o| o.id == s.id && !std::ptr::eq(*o, s)) {
            anyhow::bail!(
                "two devices are named {:?} ({} and {}): give each its own id=",
                s.id,
                s.socket.display(),
                other.socket.display()
            );
        }
        let built = built_all
            .next()
            .ok_or_else(|| anyhow::anyhow!("device {} was not built", s.id))?;
        controls.push(control::ControlDevice::new(
            &s.id,
            s.kind.name(),
            &s.socket,
            built.description.clone(),
            built.control,
        ));
        let opts = pcisim_vfio_user::ServerOptions {
            name: s.id.clone(),
            socket_mode: access.socket_mode,
            allowed_uids: access.allow_uids.clone(),
            handshake_timeout: access.handshake_timeout,
            frame_timeout: access.frame_timeout,
            ..Default::default()
        };
        let server = pcisim_vfio_user::Server::bind(&s.socket, built.device, opts)
            .with_context(|| format!("device {}", s.id))?;
        log::info!(
            "{}: {} serving on {} (mode {:04o})",
            s.id,
            s.kind.name(),
            s.socket.display(),
            access.socket_mode
        );
        bound.0.push(server.socket_file().clone());
        servers.push((s.id.clone(), server));
    }
    let control = match control_path {
        Some(path) => {
            // On failure `bound` leaves no device socket behind that nobody serves.
            let mut c = control::ControlServer::bind(path, controls)?;
            c.set_idle_timeout(access.control_idle_timeout);
            log::info!("control socket on {}", c.path().display());
            bound.0.push(c.socket_file().clone());
            Some(c)
        }
        None => None,
    };
    // The main thread's event loop: the signals and the control socket. Each device runs an
    // event loop of its own on its own thread (docs/architecture.md, "Threads and ownership":
    // a device handler may block for seconds, which must not stall the other devices).
    let stop = Rc::new(Cell::new(None));
    let signals = SignalWatch::new(Rc::clone(&stop)).context("installing signal handlers")?;
    let mut main_loop = EventManager::<Box<dyn MutEventSubscriber>>::new()
        .map_err(|e| anyhow::anyhow!("event loop: {e}"))?;
    main_loop.add_subscriber(Box::new(signals));
    if let Some(c) = &control {
        main_loop.add_subscriber(Box::new(
            c.subscriber().context("control socket event loop")?,
        ));
    }
    for (id, server) in servers {
        let server = Arc::new(server);
        std::thread::Builder::new()
            // The device's id names its thread (`ps -L`, the lab's stall report; Linux keeps
            // 15 bytes of it).
            .name(format!("{id}-vfio-user"))
            .spawn(move || {
                if let Err(e) = server.run() {
                    log::error!("{}: device loop ended: {e}", server.path().display());
                }
            })
            .context("spawning a server thread")?;
    }
    while stop.get().is_none() {
        main_loop
            .run()
            .map_err(|e| anyhow::anyhow!("event loop: {e}"))?;
    }
    if let Some(sig) = stop.get() {
        log::info!("signal {sig}: shutting down");
    }
    // Only what is still our socket is removed (see `BoundSockets`).
    drop(bound);
    Ok(0)
}
