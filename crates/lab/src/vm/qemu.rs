//! The QEMU command line for a lab VM and the QEMU child process.
//!
//! One q35 machine with fd-backed shared RAM (so DMA_MAP carries an fd), optionally an
//! intel-iommu (placed before the devices, caching mode on, so every guest IOMMU mapping reaches
//! the server), `pcie-root-port`s with the vfio-user devices behind them (one per port, or several
//! functions of one multifunction slot), optionally native PCIe hotplug instead of ACPI's, the
//! console on ttyS0 (into a file), the agent link on ttyS1 (a unix socket the lab listens on) and
//! QMP on a unix socket. The layout comes from a [`crate::vm::profile::VmProfile`].
//!
//! `-no-reboot` is always set, so a guest that panics or reboots stops QEMU at once (the lab
//! sees it); a scenario that resets the machine (`system_reset`) switches QEMU to rebooting
//! with QMP `set-action` for the duration (see [`crate::vm::qmp::Qmp::set_reboot_action`]).

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::vm::process::{ChildGuard, Group, ProcessError};

/// The kernel command line of lab guests.
///
/// `pci=no_e820`: with `-cpu max` under TCG (an AMD vendor) QEMU reserves the HyperTransport
/// hole 0xfd00000000-0xffffffffff in the e820 map, SeaBIOS places the 64-bit PCI window at the
/// top of the 40-bit physical space (0xff00000000), inside that hole, and Linux then refuses to
/// allocate a hot-added device's 64-bit BAR there ("resource: avoiding allocation from e820
/// entry", "BAR 2: can't assign; no space"). Boot-time BARs are unaffected (firmware-assigned).
///
/// `no_timer_check`: at boot the kernel checks that the IO-APIC timer ticks within a busy-wait
/// (`timer_irq_works()` in arch/x86/kernel/apic/io_apic.c); under TCG on a loaded host the
/// emulated timer can miss that window, and with intel-iommu's interrupt remapping the kernel
/// then panics ("timer doesn't work through Interrupt-remapped IO-APIC") — seen on this 2-core
/// machine at load ~10. The parameter skips the check; the timer works, it is merely slow.
///
/// `cryptomgr.notests`: boot time. Debian's kernels self-test every crypto algorithm they
/// register (`CONFIG_CRYPTO_MANAGER_DISABLE_TESTS` unset); under TCG that is the largest single
/// item of the kernel's own boot (`initcall_debug`: `crypto_kdf108_init` 0.7 s, which
/// instantiates and so tests hmac(sha256), `crypto_algapi_init` 0.26 s), about 0.8 s of QEMU's
/// CPU time per boot (docs/perf.md). The lab tests PCI functions, not the kernel's crypto;
/// `--append cryptomgr.notests=0` brings the tests back.
pub const DEFAULT_APPEND: &str = "console=ttyS0 intel_iommu=on panic=-1 loglevel=4 pci=no_e820 \
     no_timer_check log_buf_len=4M sysctl.kernel.hung_task_timeout_secs=10 \
     sysctl.kernel.hung_task_warnings=-1 cryptomgr.notests";

/// The guests' `kernel.hung_task_timeout_secs` (in [`DEFAULT_APPEND`]): a task in state D this
/// long is reported (`INFO: task ... blocked for more than 10 seconds.`), which the kernel log
/// verdict catches (crates/lab/src/dmesg.rs). `hung_task_warnings=-1` keeps every report
/// (the default stops after 10 per boot); `log_buf_len=4M` keeps a busy scenario's slice in
/// the ring until the lab reads it (the Debian default is 128 KiB).
pub const HUNG_TASK_TIMEOUT_SECS: u64 = 10;

/// Errors building or starting QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// A path cannot be put on QEMU's command line (QEMU's JSON options need UTF-8).
    #[error("Path {0} is not valid UTF-8")]
    NonUtf8Path(PathBuf),
    /// QEMU's log file could not be created.
    #[error("Cannot create {path}")]
    Log {
        /// The log file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU did not start.
    #[error(transparent)]
    Process(#[from] ProcessError),
}

/// A vfio-user device to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioUserDevice {
    /// QEMU device id (also the `qom` name), e.g. `gpu0`.
    pub id: String,
    /// The server's socket.
    pub socket: PathBuf,
    /// The root port it sits behind (`rp1`).
    pub bus: String,
    /// `addr` on that bus (`00.1`), if not QEMU's choice (function 0 of the first free slot).
    pub addr: Option<String>,
    /// Whether it is function 0 of a multifunction slot (sets the header's multifunction bit).
    pub multifunction: bool,
    /// Whether it is on the command line (else it is for `device_add`).
    pub at_boot: bool,
}

impl VfioUserDevice {
    /// Its JSON device description, for `-device` and for QMP `device_add`.
    pub fn json(&self) -> Result<serde_json::Value, QemuError> {
        let mut v = serde_json::json!({
            "driver": "vfio-user-pci",
            "socket": {"type": "unix", "path": utf8(&self.socket)?},
            "id": self.id,
            "bus": self.bus,
        });
        if let Some(addr) = &self.addr {
            v["addr"] = serde_json::json!(addr);
        }
        if self.multifunction {
            v["multifunction"] = serde_json::json!(true);
        }
        Ok(v)
    }
}

/// A `pcie-root-port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootPort {
    /// Its id (`rp1`), the `bus` of what sits behind it.
    pub id: String,
    /// `chassis` and `slot` (the guest's slot number): unique per port.
    pub chassis: u8,
    /// Whether the port is meant for hot-add: `hotplug=on` is spelled out (QEMU's default is on)
    /// and [`HOTPLUG_PREF64_RESERVE`] of 64-bit prefetchable window is reserved (`pref64-reserve`,
    /// honoured by the firmware), or a hot-added GPU's VRAM BAR finds no space behind the port
    /// (the firmware sizes an empty port's windows for nothing; the guest then leaves BAR2
    /// unassigned).
    pub hotplug: bool,
}

/// The 64-bit prefetchable window reserved behind a hot-add port (room for a GPU's VRAM BAR;
/// address space only, nothing is allocated).
pub const HOTPLUG_PREF64_RESERVE: &str = "1G";

impl RootPort {
    /// The `-device` argument.
    pub fn arg(&self) -> String {
        let mut a = format!(
            "pcie-root-port,id={},chassis={n},slot={n}",
            self.id,
            n = self.chassis
        );
        if self.hotplug {
            a.push_str(",hotplug=on,pref64-reserve=");
            a.push_str(HOTPLUG_PREF64_RESERVE);
        }
        a
    }
}

/// How the guest is told about hot-add and hot-remove on root ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HotplugMode {
    /// q35's default: ACPI hotplug on root ports (device_add visible in ~0.1 s, device_del ~20 ms).
    #[default]
    Acpi,
    /// Native PCIe hotplug (pciehp) in the guest:
    /// `-global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off`. device_del takes ~6 s (the 5 s
    /// attention-button delay); the guest's `bus` reset method of an endpoint is the slot's.
    NativePciehp,
}

/// Everything that goes on a lab VM's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuConfig {
    /// The QEMU binary (or wrapper script).
    pub qemu: PathBuf,
    /// `-accel`: `tcg` or `kvm`.
    pub accel: String,
    /// `-cpu`: `max` or `host`.
    pub cpu: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub smp: u32,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The kernel command line.
    pub append: String,
    /// Where ttyS0 (the console) is written.
    pub console_log: PathBuf,
    /// The unix socket of ttyS1 (the agent): the lab listens and QEMU connects, unless
    /// `agent_listens`.
    pub agent_socket: PathBuf,
    /// QEMU listens on `agent_socket` (`server=on,wait=off`) and every client connects anew
    /// (`lab up`'s later commands), instead of connecting to the lab's listener once.
    pub agent_listens: bool,
    /// A third serial port (ttyS2) on a unix socket QEMU listens on: the console shell of
    /// `pcisim lab console`.
    pub console_socket: Option<PathBuf>,
    /// The QMP socket QEMU listens on.
    pub qmp_socket: PathBuf,
    /// Whether the machine has an `intel-iommu` (caching mode, before the devices).
    pub viommu: bool,
    /// ACPI or native hotplug.
    pub hotplug: HotplugMode,
    /// Root ports, in order.
    pub root_ports: Vec<RootPort>,
    /// vfio-user devices (those with `at_boot`), each on one of `root_ports`.
    pub devices: Vec<VfioUserDevice>,
    /// What the user added (`--share`, `--memory`, `--smp`, `--append`, `--qemu-arg`, `--gdb`).
    pub extra: VmOptions,
}

/// A host directory shared into the guest read-write over virtio-9p (`--share HOST[:GUEST]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The host directory (absolute).
    pub host: PathBuf,
    /// Where the guest mounts it (absolute; by default the host path).
    pub guest: String,
    /// Mount with the guest's page cache (`cache=loose`: about twice as fast, but a host-side
    /// change may not show in the guest): for the lab's own transfer share, whose files have
    /// unique names and are written whole before they are read. User shares are `cache=none`.
    pub cached: bool,
}

/// The 9p mount tag of the `index`-th share (QEMU limits tags to 31 bytes).
pub fn share_tag(index: usize) -> String {
    format!("pcisim{index}")
}

/// The kernel command line parameter naming where the guest's /init mounts each 9p share
/// (`pcisim.share=TAG:GUEST_PATH`).
pub const SHARE_PARAM: &str = "pcisim.share";

/// The kernel command line parameter marking a share to mount with `cache=loose`
/// (`pcisim.share_cached=TAG`).
pub const SHARE_CACHED_PARAM: &str = "pcisim.share_cached";

impl Share {
    /// Parses `HOST_DIR[:GUEST_PATH]`: the host directory must exist (it is made absolute);
    /// the guest path defaults to the host's absolute path (as virtme-ng does) and may not
    /// contain whitespace, quotes or commas (it travels on the kernel command line).
    pub fn parse(arg: &str) -> Result<Share, String> {
        let (host, guest) = match arg.split_once(':') {
            Some((h, g)) => (h, Some(g)),
            None => (arg, None),
        };
        if host.is_empty() {
            return Err(format!("--share {arg:?}: no host directory"));
        }
        let host = std::fs::canonicalize(host)
            .map_err(|e| format!("--share {arg:?}: host directory {host}: {e}"))?;
        if !host.is_dir() {
            return Err(format!(
                "--share {arg:?}: {} is not a directory",
                host.display()
            ));
        }
        let guest = match guest {
            Some(g) => g.to_string(),
            None => host
                .to_str()
                .ok_or_else(|| format!("--share {arg:?}: the host path is not UTF-8"))?
                .to_string(),
        };
        if !guest.starts_with('/') {
            return Err(format!(
                "--share {arg:?}: the guest path {guest:?} must be absolute"
            ));
        }
        if guest
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\'' || c == ',')
        {
            return Err(format!(
                "--share {arg:?}: the guest path {guest:?} may not contain whitespace, quotes or \
                 commas (it is passed on the kernel command line); give one with GUEST_PATH"
            ));
        }
        Ok(Share {
            host,
            guest,
            cached: false,
        })
    }
}

/// The user's additions to a lab VM (`lab up` and `lab suite` flags). Default: nothing added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmOptions {
    /// `--memory MIB`: guest RAM instead of the profile's.
    pub memory_mib: Option<u64>,
    /// `--smp N`: vCPUs instead of 2.
    pub smp: Option<u32>,
    /// `--append TEXT`: added to the kernel command line (after the lab's own, so it wins).
    pub append: Option<String>,
    /// `--qemu-arg ARG` (repeatable): appended verbatim to QEMU's command line.
    pub qemu_args: Vec<String>,
    /// `--gdb[=PORT]`: QEMU's gdbstub on this TCP port (the guest runs; attach at any time).
    pub gdb: Option<u16>,
    /// `--share HOST[:GUEST]` (repeatable).
    pub shares: Vec<Share>,
}

/// The msize of 9p mounts: large requests for throughput (the default 8 KiB is ~20x slower).
pub const SHARE_MSIZE: u32 = 512_000;

/// Escapes a value for QEMU's `key=value,...` option syntax (a comma is written twice).
pub fn qemu_opt_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// Quotes `word` for a POSIX shell (unchanged if it only has safe characters).
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

fn utf8(path: &Path) -> Result<&str, QemuError> {
    path.to_str()
        .ok_or_else(|| QemuError::NonUtf8Path(path.to_path_buf()))
}

impl QemuConfig {
    /// The arguments (after the program name).
    pub fn args(&self) -> Result<Vec<OsString>, QemuError> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        let x = &self.extra;
        let mem = format!("{}M", x.memory_mib.unwrap_or(self.memory_mib));
        let mut append = self.append.clone();
        for (i, s) in x.shares.iter().enumerate() {
            append.push_str(&format!(" {SHARE_PARAM}={}:{}", share_tag(i), s.guest));
            if s.cached {
                append.push_str(&format!(" {SHARE_CACHED_PARAM}={}", share_tag(i)));
            }
        }
        if let Some(extra) = &x.append {
            append.push(' ');
            append.push_str(extra);
        }
        push(&[
            "-machine",
            "q35,memory-backend=mem",
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            "-m",
            &mem,
            "-smp",
            &x.smp.unwrap_or(self.smp).to_string(),
            "-accel",
            &self.accel,
            "-cpu",
            &self.cpu,
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
            "-kernel",
            utf8(&self.kernel)?,
            "-initrd",
            utf8(&self.initrd)?,
            "-append",
            &append,
            "-chardev",
            &format!(
                "socket,id=agent,path={}{}",
                qemu_opt_escape(utf8(&self.agent_socket)?),
                if self.agent_listens {
                    ",server=on,wait=off"
                } else {
                    ""
                }
            ),
            "-serial",
            &format!("file:{}", utf8(&self.console_log)?),
            "-serial",
            "chardev:agent",
            "-qmp",
            &format!(
                "unix:{},server=on,wait=off",
                qemu_opt_escape(utf8(&self.qmp_socket)?)
            ),
        ]);
        if let Some(console) = &self.console_socket {
            push(&[
                "-chardev",
                &format!(
                    "socket,id=shell,path={},server=on,wait=off",
                    qemu_opt_escape(utf8(console)?)
                ),
                "-serial",
                "chardev:shell",
            ]);
        }
        if self.hotplug == HotplugMode::NativePciehp {
            push(&[
                "-global",
                "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
            ]);
        }
        if self.viommu {
            push(&["-device", "intel-iommu,caching-mode=on"]);
        }
        for port in &self.root_ports {
            push(&["-device", &port.arg()]);
        }
        for dev in self.devices.iter().filter(|d| d.at_boot) {
            push(&["-device", &dev.json()?.to_string()]);
        }
        for (i, s) in x.shares.iter().enumerate() {
            let tag = share_tag(i);
            push(&[
                "-fsdev",
                &format!(
                    "local,id={tag},path={},security_model=none",
                    qemu_opt_escape(utf8(&s.host)?)
                ),
                "-device",
                &format!("virtio-9p-pci,fsdev={tag},mount_tag={tag}"),
            ]);
        }
        if let Some(port) = x.gdb {
            push(&["-gdb", &format!("tcp::{port}")]);
        }
        a.extend(x.qemu_args.iter().cloned());
        Ok(a.into_iter().map(OsString::from).collect())
    }

    /// The command line as one shell-quoted line, to rerun the VM by hand.
    pub fn shell_line(&self) -> Result<String, QemuError> {
        let mut words = vec![utf8(&self.qemu)?.to_string()];
        for a in self.args()? {
            words.push(a.to_string_lossy().into_owned());
        }
        Ok(words
            .iter()
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" "))
    }

    /// The command, ready to spawn.
    pub fn command(&self) -> Result<Command, QemuError> {
        let mut cmd = Command::new(&self.qemu);
        cmd.args(self.args()?);
        Ok(cmd)
    }

    /// Starts QEMU with stdout and stderr into `log`, in its own process group, killed with the
    /// lab.
    pub fn spawn(&self, log: &Path) -> Result<ChildGuard, QemuError> {
        self.spawn_in(log, Group::Own)
    }

    /// [`QemuConfig::spawn`] with the child placed in `group` ([`Group::Session`]: a VM that
    /// outlives the lab once released).
    pub fn spawn_in(&self, log: &Path, group: Group) -> Result<ChildGuard, QemuError> {
        let mut cmd = self.command()?;
        let err = |source| QemuError::Log {
            path: log.to_path_buf(),
            source,
        };
        let file = File::create(log).map_err(err)?;
        let file2 = file.try_clone().map_err(err)?;
        cmd.stdin(Stdio::null()).stdout(file).stderr(file2);
        log::debug!("starting QEMU: {cmd:?}");
        Ok(ChildGuard::spawn("QEMU", &mut cmd, group)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> QemuConfig {
        QemuConfig {
            qemu: "/c/bin/qemu-system-x86_64".into(),
            accel: "tcg".into(),
            cpu: "max".into(),
            memory_mib: 1024,
            smp: 2,
            kernel: "/c/vmlinuz".into(),
            initrd: "/run/lab/initramfs.cpio".into(),
            append: DEFAULT_APPEND.into(),
            console_log: "/run/lab/console.log".into(),
            agent_socket: "/run/lab/agent.sock".into(),
            agent_listens: false,
            console_socket: None,
            qmp_socket: "/run/lab/qmp.sock".into(),
            viommu: true,
            hotplug: HotplugMode::Acpi,
            root_ports: vec![port(1)],
            devices: vec![device("gpu0", "rp1")],
            extra: VmOptions::default(),
        }
    }

    fn port(n: u8) -> RootPort {
        RootPort {
            id: format!("rp{n}"),
            chassis: n,
            hotplug: false,
        }
    }

    fn device(id: &str, bus: &str) -> VfioUserDevice {
        VfioUserDevice {
            id: id.into(),
            socket: format!("/run/lab/{id}.sock").into(),
            bus: bus.into(),
            addr: None,
            multifunction: false,
            at_boot: true,
        }
    }

    /// The values of every `-device`.
    fn devices(a: &[String]) -> Vec<&str> {
        a.iter()
            .enumerate()
            .filter(|(_, x)| *x == "-device")
            .map(|(i, _)| a[i + 1].as_str())
            .collect()
    }

    fn args(c: &QemuConfig) -> Vec<String> {
        c.args()
            .unwrap()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    /// The value following `flag` (the first occurrence).
    fn value<'a>(a: &'a [String], flag: &str) -> &'a str {
        let i = a.iter().position(|x| x == flag).unwrap();
        &a[i + 1]
    }

    #[test]
    fn test_command_line_machine_memory_accel() {
        let a = args(&config());
        assert_eq!(value(&a, "-machine"), "q35,memory-backend=mem");
        assert_eq!(
            value(&a, "-object"),
            "memory-backend-memfd,id=mem,size=1024M,share=on"
        );
        assert_eq!(value(&a, "-m"), "1024M");
        assert_eq!(value(&a, "-smp"), "2");
        assert_eq!(value(&a, "-accel"), "tcg");
        assert_eq!(value(&a, "-cpu"), "max");
        assert_eq!(value(&a, "-append"), DEFAULT_APPEND);
        assert_eq!(value(&a, "-kernel"), "/c/vmlinuz");
        assert!(a.contains(&"-no-reboot".to_string()));
        assert_eq!(
            value(&a, "-qmp"),
            "unix:/run/lab/qmp.sock,server=on,wait=off"
        );
    }

    #[test]
    fn test_command_line_serial_console_then_agent() {
        let a = args(&config());
        let serials: Vec<&str> = a
            .iter()
            .enumerate()
            .filter(|(_, x)| *x == "-serial")
            .map(|(i, _)| a[i + 1].as_str())
            .collect();
        assert_eq!(serials, ["file:/run/lab/console.log", "chardev:agent"]);
        assert_eq!(
            value(&a, "-chardev"),
            "socket,id=agent,path=/run/lab/agent.sock"
        );
    }

    #[test]
    fn test_command_line_listening_agent_and_console_shell_port() {
        let mut c = config();
        c.agent_listens = true;
        c.console_socket = Some("/run/lab/console.sock".into());
        let a = args(&c);
        let values = |flag: &str| -> Vec<&str> {
            a.iter()
                .enumerate()
                .filter(|(_, x)| *x == flag)
                .map(|(i, _)| a[i + 1].as_str())
                .collect()
        };
        // ttyS0 the console log, ttyS1 the agent, ttyS2 the shell.
        assert_eq!(
            values("-serial"),
            [
                "file:/run/lab/console.log",
                "chardev:agent",
                "chardev:shell"
            ]
        );
        assert_eq!(
            values("-chardev"),
            [
                "socket,id=agent,path=/run/lab/agent.sock,server=on,wait=off",
                "socket,id=shell,path=/run/lab/console.sock,server=on,wait=off"
            ]
        );
    }

    #[test]
    fn test_command_line_iommu_before_root_port_before_device() {
        let mut c = config();
        c.root_ports.push(port(2));
        let mut npu = device("npu0", "rp2");
        npu.socket = "/run/lab/npu,0.sock".into();
        c.devices.push(npu);
        let a = args(&c);
        let devices = devices(&a);
        assert_eq!(devices[0], "intel-iommu,caching-mode=on");
        assert_eq!(devices[1], "pcie-root-port,id=rp1,chassis=1,slot=1");
        assert_eq!(devices[2], "pcie-root-port,id=rp2,chassis=2,slot=2");
        let gpu: serde_json::Value = serde_json::from_str(devices[3]).unwrap();
        assert_eq!(
            gpu,
            serde_json::json!({"driver": "vfio-user-pci",
                "socket": {"type": "unix", "path": "/run/lab/gpu0.sock"},
                "id": "gpu0", "bus": "rp1"})
        );
        let npu: serde_json::Value = serde_json::from_str(devices[4]).unwrap();
        // JSON needs no comma escaping.
        assert_eq!(npu["socket"]["path"], "/run/lab/npu,0.sock");
        assert_eq!(npu["bus"], "rp2");
        assert!(
            !a.contains(&"-global".to_string()),
            "ACPI hotplug by default"
        );
    }

    #[test]
    fn test_command_line_multifunction_pciehp_no_iommu_hotplug_port() {
        let mut c = config();
        c.viommu = false;
        c.hotplug = HotplugMode::NativePciehp;
        c.root_ports.push(RootPort {
            hotplug: true,
            ..port(2)
        });
        c.devices[0].addr = Some("00.0".into());
        c.devices[0].multifunction = true;
        let mut f1 = device("gpu1", "rp1");
        f1.addr = Some("00.1".into());
        c.devices.push(f1);
        let mut later = device("gpu2", "rp2");
        later.at_boot = false;
        c.devices.push(later.clone());
        let a = args(&c);
        assert_eq!(
            value(&a, "-global"),
            "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"
        );
        let devices = devices(&a);
        assert_eq!(
            devices[..2],
            [
                "pcie-root-port,id=rp1,chassis=1,slot=1",
                "pcie-root-port,id=rp2,chassis=2,slot=2,hotplug=on,pref64-reserve=1G"
            ]
        );
        let f0: serde_json::Value = serde_json::from_str(devices[2]).unwrap();
        assert_eq!(f0["addr"], "00.0");
        assert_eq!(f0["multifunction"], true);
        assert_eq!(f0["bus"], "rp1");
        let f1: serde_json::Value = serde_json::from_str(devices[3]).unwrap();
        assert_eq!(f1["addr"], "00.1");
        assert!(f1.get("multifunction").is_none());
        assert_eq!(f1["bus"], "rp1");
        // The device left for device_add is not on the command line.
        assert_eq!(devices.len(), 4);
        assert_eq!(
            later.json().unwrap(),
            serde_json::json!({"driver": "vfio-user-pci",
                "socket": {"type": "unix", "path": "/run/lab/gpu2.sock"},
                "id": "gpu2", "bus": "rp2"})
        );
    }

    #[test]
    fn test_shell_line_quotes_json_and_spaces() {
        let line = config().shell_line().unwrap();
        assert!(line.starts_with("/c/bin/qemu-system-x86_64 -machine q35,memory-backend=mem "));
        assert!(line.contains(
            " -append 'console=ttyS0 intel_iommu=on panic=-1 loglevel=4 pci=no_e820 no_timer_check log_buf_len=4M \
             sysctl.kernel.hung_task_timeout_secs=10 sysctl.kernel.hung_task_warnings=-1 cryptomgr.notests' "
        ));
        assert!(line.contains(r#"'{"bus":"rp1","driver":"vfio-user-pci","#));
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn test_commas_in_paths_escaped() {
        let mut c = config();
        c.agent_socket = "/run/a,b/agent.sock".into();
        let a = args(&c);
        assert_eq!(
            value(&a, "-chardev"),
            "socket,id=agent,path=/run/a,,b/agent.sock"
        );
    }

    #[test]
    fn test_vm_options_shares_gdb_qemu_args_memory() {
        let mut c = config();
        let tmp = std::env::temp_dir();
        c.extra = VmOptions {
            memory_mib: Some(3072),
            smp: Some(4),
            append: Some("dyndbg=+p".into()),
            qemu_args: vec!["-d".into(), "guest_errors".into()],
            gdb: Some(1234),
            shares: vec![
                Share::parse(tmp.to_str().unwrap()).unwrap(),
                Share::parse(&format!("{}:/mnt/x", tmp.display())).unwrap(),
            ],
        };
        let a = args(&c);
        assert_eq!(value(&a, "-m"), "3072M");
        assert_eq!(value(&a, "-smp"), "4");
        let host = std::fs::canonicalize(&tmp).unwrap();
        assert_eq!(
            value(&a, "-append"),
            format!(
                "{DEFAULT_APPEND} pcisim.share=pcisim0:{} pcisim.share=pcisim1:/mnt/x dyndbg=+p",
                host.display()
            )
        );
        assert_eq!(
            value(&a, "-fsdev"),
            format!(
                "local,id=pcisim0,path={},security_model=none",
                host.display()
            )
        );
        assert!(devices(&a).contains(&"virtio-9p-pci,fsdev=pcisim1,mount_tag=pcisim1"));
        assert_eq!(value(&a, "-gdb"), "tcp::1234");
        assert_eq!(&a[a.len() - 2..], ["-d", "guest_errors"]);
    }

    #[test]
    fn test_share_parse_errors() {
        assert!(Share::parse("/nonexistent/dir")
            .unwrap_err()
            .contains("/nonexistent/dir"));
        let tmp = std::env::temp_dir();
        let t = tmp.to_str().unwrap();
        assert!(Share::parse(&format!("{t}:rel"))
            .unwrap_err()
            .contains("absolute"));
        assert!(Share::parse(&format!("{t}:/a b"))
            .unwrap_err()
            .contains("whitespace"));
        assert!(Share::parse(":/x").is_err());
    }
}
