//! Manual experiments (`pcisim lab up|plug|unplug|exec|console|status|down`): a VM that outlives
//! the command that started it, with devices to hot-add and a guest shell.
//!
//! `up` provisions like the suite, starts `pcisim serve` (every device of the profile, with a
//! control socket) and QEMU *detached* (own session, no parent-death signal), waits for the
//! guest agent and writes `state.json` into the state directory (default
//! `$XDG_RUNTIME_DIR/pcisim-lab`, else `/tmp/pcisim-lab-<uid>`). Unlike the suite's VMs, QEMU is
//! the *server* of the agent's serial socket (`agent.sock`), so every later command connects to
//! it anew; a third serial port (`ttyS2`, `console.sock`) carries a shell that `console` attaches
//! the terminal to. Commands that talk to the VM hold `lock` (flock) so they run one at a time.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::LabError;
use crate::guestops::{self, sysfs, Timed, TimedError};
use crate::vm::agent::{Agent, RunInput, RunOutput};
use crate::vm::boot::{self, Prepared, BOOT_TIMEOUT, CONNECT_TIMEOUT, POWEROFF_TIMEOUT};
use crate::vm::profile::{DeviceKind, DeviceSlot, ProfileId, VmProfile};
use crate::vm::qemu::{HotplugMode, Share, VmOptions};
use crate::vm::qmp::{PciDeviceInfo, Qmp, QmpError};
use crate::vm::server;

/// The serial port (in the guest) of the shell `console` attaches to.
pub const CONSOLE_PORT: &str = "ttyS2";
/// How long `plug` waits for the guest to enumerate a hot-added device.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `unplug` waits for `DEVICE_DELETED` (native pciehp needs ~6 s).
pub const DELETE_TIMEOUT: Duration = Duration::from_secs(30);
/// The byte that leaves `console` (Ctrl-]).
pub const CONSOLE_ESCAPE: u8 = 0x1d;
/// Where the manual VM mounts its private transfer share (the state directory's `xfer/`), which
/// `lab cp` copies through.
pub const XFER_GUEST: &str = "/run/pcisim-xfer";

/// Errors of the manual commands: each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    /// A user-facing error.
    #[error("{0}")]
    Msg(String),
    /// A lab building block failed.
    #[error(transparent)]
    Lab(#[from] LabError),
}

fn msg(s: impl Into<String>) -> ManualError {
    ManualError::Msg(s.into())
}

fn lab(e: impl Into<LabError>) -> ManualError {
    ManualError::Lab(e.into())
}

type Result<T> = std::result::Result<T, ManualError>;

/// The manual profile: `gpu0` plugged behind `rp1`, `gpu1` (`irq=msi`, so it can be
/// `device_del`ed) served but unplugged, for `rp2`, and one more free hot-add port (`rp3`); ACPI
/// hotplug, vIOMMU.
pub fn manual_profile() -> VmProfile {
    VmProfile {
        name: "manual".into(),
        devices: vec![
            DeviceSlot::own_port("gpu0", DeviceKind::Gpu),
            DeviceSlot {
                plugged: false,
                opts: vec!["irq=msi".into()],
                ..DeviceSlot::own_port("gpu1", DeviceKind::Gpu)
            },
        ],
        hotplug: HotplugMode::Acpi,
        free_ports: 1,
        viommu: true,
        // `lab up --memory` decides the manual VM's RAM.
        memory_mib: crate::vm::profile::DEFAULT_MEMORY_MIB,
    }
}

/// The profiles `up --profile` knows: `manual` (the default) and the suite's.
pub fn profile_by_name(name: &str) -> Result<VmProfile> {
    let mut all = vec![manual_profile()];
    all.extend(
        [
            ProfileId::Gpu,
            ProfileId::GpuNpu,
            ProfileId::GpuHotplug,
            ProfileId::GpuNsr,
            ProfileId::GpuNpuHotplug,
            ProfileId::NpuSva,
            ProfileId::GpuPciehp,
        ]
        .map(ProfileId::profile),
    );
    let names: Vec<String> = all.iter().map(|p| p.name.clone()).collect();
    all.into_iter().find(|p| p.name == name).ok_or_else(|| {
        msg(format!(
            "unknown profile {name:?}: the profiles are {}",
            names.join(", ")
        ))
    })
}

/// The default state directory: `$XDG_RUNTIME_DIR/pcisim-lab`, else `/tmp/pcisim-lab-<uid>`.
pub fn default_state_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() && Path::new(&d).is_dir() => Path::new(&d).join("pcisim-lab"),
        _ => {
            // SAFETY: getuid has no preconditions.
            let uid = unsafe { libc::getuid() };
            PathBuf::from(format!("/tmp/pcisim-lab-{uid}"))
        }
    }
}

/// One device of a running VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateDevice {
    /// Server and QEMU id.
    pub id: String,
    /// `gpu`, `npu`.
    pub kind: String,
    /// Its `--device` spec.
    pub spec: String,
    /// Its vfio-user socket.
    pub socket: PathBuf,
    /// The root port it was laid out on.
    pub bus: String,
    /// `addr` on that port, if fixed.
    pub addr: Option<String>,
    /// multifunction=on.
    pub multifunction: bool,
    /// Plugged at boot.
    pub at_boot: bool,
}

/// One root port of a running VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatePort {
    /// `rpN`.
    pub id: String,
    /// Its slot number (`--slot N`).
    pub slot: u8,
    /// Meant for hot-add (`pref64-reserve`).
    pub hotplug: bool,
}

/// `state.json`: what `up` started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabState {
    /// The profile's name.
    pub profile: String,
    /// The state directory.
    pub dir: PathBuf,
    /// `pcisim serve`'s pid.
    pub server_pid: u32,
    /// QEMU's pid.
    pub qemu_pid: u32,
    /// The server's control socket.
    pub control: PathBuf,
    /// QEMU's QMP socket.
    pub qmp: PathBuf,
    /// The agent's serial socket (QEMU listens).
    pub agent: PathBuf,
    /// The console shell's serial socket (QEMU listens).
    pub console: PathBuf,
    /// Every device.
    pub devices: Vec<StateDevice>,
    /// Every root port.
    pub ports: Vec<StatePort>,
    /// ACPI or native.
    pub hotplug: String,
    /// The user's `--share`s: (host dir, guest path).
    #[serde(default)]
    pub shares: Vec<(PathBuf, String)>,
    /// The host side of the transfer share `lab cp` uses (guest: [`XFER_GUEST`]).
    #[serde(default)]
    pub xfer: Option<PathBuf>,
}

impl LabState {
    fn device(&self, id: &str) -> Result<&StateDevice> {
        self.devices.iter().find(|d| d.id == id).ok_or_else(|| {
            let ids: Vec<&str> = self.devices.iter().map(|d| d.id.as_str()).collect();
            msg(format!(
                "unknown device {id:?}: this VM's devices are {}",
                ids.join(", ")
            ))
        })
    }

    fn device_json(&self, d: &StateDevice, bus: &str) -> Value {
        let mut v = serde_json::json!({
            "driver": "vfio-user-pci",
            "socket": {"type": "unix", "path": d.socket.to_string_lossy()},
            "id": d.id,
            "bus": bus,
        });
        if bus == d.bus {
            if let Some(addr) = &d.addr {
                v["addr"] = serde_json::json!(addr);
            }
            if d.multifunction {
                v["multifunction"] = serde_json::json!(true);
            }
        }
        v
    }
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

/// Reads `state.json` from `dir` ("no VM running" if there is none).
pub fn load_state(dir: &Path) -> Result<LabState> {
    let path = state_file(dir);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(msg(format!(
                "no lab VM is running (no {}): start one with `pcisim lab up`",
                path.display()
            )))
        }
        Err(e) => return Err(msg(format!("cannot read {}: {e}", path.display()))),
    };
    serde_json::from_str(&text).map_err(|e| msg(format!("{} is corrupt: {e}", path.display())))
}

/// Whether `pid` is a live (not zombie) process whose command line mentions `dir` (so a recycled
/// pid does not count).
pub fn alive(pid: u32, dir: &Path) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat.rsplit(')').next().unwrap_or("").trim_start();
    if state.starts_with('Z') || state.starts_with('X') {
        return false;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = dir.to_string_lossy();
    String::from_utf8_lossy(&cmdline).contains(needle.as_ref())
}

/// An exclusive lock on the state directory (one command at a time talks to the VM).
struct Lock {
    _file: File,
}

impl Lock {
    fn take(dir: &Path) -> Result<Lock> {
        let path = dir.join("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| msg(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: flock on a descriptor we own; no memory effects.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            crate::note!("waiting for another `pcisim lab` command on this VM...");
            // SAFETY: as above, blocking this time.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            if rc != 0 {
                return Err(msg(format!(
                    "flock {}: {}",
                    path.display(),
                    io::Error::last_os_error()
                )));
            }
        }
        Ok(Lock { _file: f })
    }
}

/// A running VM: state plus the lock.
struct Running {
    state: LabState,
    _lock: Lock,
}

fn running(dir: &Path) -> Result<Running> {
    let state = load_state(dir)?;
    let lock = Lock::take(dir)?;
    if !alive(state.qemu_pid, &state.dir) {
        return Err(msg(format!(
            "the lab VM in {} is not running any more (QEMU pid {} is gone; see {}): \
             `pcisim lab down` cleans up",
            dir.display(),
            state.qemu_pid,
            dir.join("qemu.log").display()
        )));
    }
    Ok(Running { state, _lock: lock })
}

fn qmp(state: &LabState) -> Result<Qmp> {
    let transcript = OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.dir.join("qmp.log"))
        .ok();
    Qmp::connect(&state.qmp, Duration::from_secs(5), transcript).map_err(lab)
}

fn agent(state: &LabState) -> Result<Agent> {
    let stream = UnixStream::connect(&state.agent).map_err(|e| {
        msg(format!(
            "cannot connect to the guest agent at {}: {e}",
            state.agent.display()
        ))
    })?;
    let mut a = Agent::new(stream);
    if let Ok(f) = OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.dir.join("agent.log"))
    {
        a.set_transcript(f);
    }
    Ok(a)
}

/// Runs a busybox `sh -c` script in the guest ([`guestops::sh_output`]; the caller judges it).
fn guest_sh(a: &mut Agent, script: &str, timeout: Duration) -> Result<RunOutput> {
    guestops::sh_output(&mut Timed { agent: a, timeout }, script).map_err(timed)
}

fn timed(e: TimedError) -> ManualError {
    match e {
        TimedError::Agent(e) => lab(e),
        TimedError::Shell(e) => msg(e.to_string()),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Spawns `cmd` detached: its own session (it survives the command and the terminal), no
/// parent-death signal, stdin from /dev/null, stdout+stderr into `log`.
fn spawn_detached(name: &str, cmd: &mut Command, log: &Path) -> Result<u32> {
    let file =
        File::create(log).map_err(|e| msg(format!("cannot create {}: {e}", log.display())))?;
    let file2 = file
        .try_clone()
        .map_err(|e| msg(format!("{}: {e}", log.display())))?;
    cmd.stdin(Stdio::null()).stdout(file).stderr(file2);
    // SAFETY: setsid is async-signal-safe and only affects the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        msg(format!(
            "cannot start {name} ({:?}): {e}",
            cmd.get_program()
        ))
    })?;
    // The child is not waited for: when this command exits it is re-parented (and reaped) by
    // init or the nearest subreaper.
    let pid = child.id();
    drop(child);
    Ok(pid)
}

fn is_socket(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// Sends `sig` to `pid` if it is still ours (see [`alive`]).
fn signal(pid: u32, dir: &Path, sig: libc::c_int) {
    if alive(pid, dir) {
        // SAFETY: kill has no memory effects; `alive` just checked the pid is ours.
        unsafe { libc::kill(pid as libc::pid_t, sig) };
    }
}

fn wait_dead(pid: u32, dir: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid, dir) {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
    true
}

/// SIGTERM, then SIGKILL after `grace`. Returns what it took.
fn stop(pid: u32, dir: &Path, grace: Duration) -> &'static str {
    if !alive(pid, dir) {
        return "not running";
    }
    signal(pid, dir, libc::SIGTERM);
    if wait_dead(pid, dir, grace) {
        return "stopped (SIGTERM)";
    }
    signal(pid, dir, libc::SIGKILL);
    wait_dead(pid, dir, Duration::from_secs(5));
    "killed (SIGKILL)"
}

/// Options of `up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The `pcisim` binary (for `serve`).
    pub pcisim_exe: PathBuf,
    /// The state directory.
    pub dir: PathBuf,
    /// The VM profile.
    pub profile: VmProfile,
    /// The guest kernel: a Debian series, a user's image or built tree.
    pub kernel: crate::kernel::KernelSource,
    /// Extra `key=value` options for every GPU's device spec (`--device-opt`).
    pub device_opts: Vec<String>,
    /// `--memory`, `--smp`, `--append`, `--qemu-arg`, `--gdb`, `--share`.
    pub vm: VmOptions,
}

/// `pcisim lab up`: starts the server and the VM, detached, and waits for the guest.
pub fn up(opts: &UpOptions, out: &mut dyn Write) -> Result<LabState> {
    let dir = &opts.dir;
    if let Ok(old) = load_state(dir) {
        if alive(old.qemu_pid, &old.dir) || alive(old.server_pid, &old.dir) {
            return Err(msg(format!(
                "a lab VM is already running (state {}, QEMU pid {}): `pcisim lab down` first, \
                 or give another --state",
                dir.display(),
                old.qemu_pid
            )));
        }
        crate::note!(
            "removing the stale state of a VM that is gone ({})",
            dir.display()
        );
        let _ = fs::remove_dir_all(dir);
    }
    // Leftovers (sockets, logs) from a VM that was not brought down: start clean, but never
    // empty a directory that is not ours.
    if let Ok(mut entries) = fs::read_dir(dir) {
        let ours = ["server.log", "qemu.log", "provision.log", "lock"]
            .iter()
            .any(|f| dir.join(f).exists());
        if entries.next().is_some() && !ours {
            return Err(msg(format!(
                "{} exists and is not a pcisim lab state directory: give an empty or new --state",
                dir.display()
            )));
        }
        fs::remove_dir_all(dir).map_err(|e| msg(format!("cannot clear {}: {e}", dir.display())))?;
    }
    fs::create_dir_all(dir).map_err(|e| msg(format!("cannot create {}: {e}", dir.display())))?;
    let dir = fs::canonicalize(dir).map_err(|e| msg(format!("{}: {e}", dir.display())))?;
    // sun_path holds 108 bytes.
    if dir.join("console.sock").as_os_str().len() > 100 {
        return Err(msg(format!(
            "the state directory {} is too long for unix sockets: use a shorter --state",
            dir.display()
        )));
    }
    let started = match start(opts, &dir) {
        Ok(s) => s,
        Err(e) => {
            // Leave nothing running; keep the directory (its logs) for the post-mortem.
            if let Ok(s) = load_state(&dir) {
                stop(s.qemu_pid, &dir, Duration::from_secs(5));
                stop(s.server_pid, &dir, Duration::from_secs(5));
                let _ = fs::remove_file(state_file(&dir));
            }
            crate::note!("logs kept in {}", dir.display());
            return Err(e);
        }
    };
    // The VM is up and detached from here on: whatever happens to the output (its reader gone,
    // a full disk) it stays up; a failure to describe it is reported, not undone.
    started.describe(out).map_err(|e| {
        msg(format!(
            "the lab VM is up (state {}), but describing it failed: {e}",
            started.state.dir.display()
        ))
    })?;
    Ok(started.state)
}

/// What `start` brought up, to describe once it is running.
struct Started {
    state: LabState,
    /// `lab VM up in ...`.
    headline: String,
    /// QEMU's view of the PCI devices right after the boot.
    pci: Vec<PciDeviceInfo>,
}

impl Started {
    fn describe(&self, out: &mut dyn Write) -> Result<()> {
        writeln!(out, "{}", self.headline).map_err(io_out)?;
        print_state(&self.state, Some(&self.pci), out)?;
        writeln!(
            out,
            "next: pcisim lab plug DEV [--slot N] | unplug DEV | exec -- CMD... | cp SRC vm:DST | console | status | down"
        )
        .and_then(|()| out.flush())
        .map_err(io_out)
    }
}

fn start(opts: &UpOptions, dir: &Path) -> Result<Started> {
    let t0 = Instant::now();
    let Prepared {
        env,
        kernel: _,
        initrd,
    } = boot::prepare(
        &opts.kernel,
        std::slice::from_ref(&opts.profile),
        &[],
        dir,
        &mut |l| {
            crate::note!("{l}");
            Ok(())
        },
    )
    .map_err(lab)?;

    let profile = &opts.profile;
    let layout = profile.layout(dir).map_err(lab)?;
    let specs = profile.specs(&layout, &opts.device_opts);
    let control = dir.join("control.sock");
    let mut cmd = Command::new(&opts.pcisim_exe);
    cmd.arg("serve");
    for s in &specs {
        cmd.args(["--device", s]);
    }
    cmd.arg("--control").arg(&control);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let server_pid = spawn_detached("the device server", &mut cmd, &dir.join("server.log"))?;
    let mut state = LabState {
        profile: profile.name.clone(),
        dir: dir.to_path_buf(),
        server_pid,
        qemu_pid: 0,
        control: control.clone(),
        qmp: dir.join("qmp.sock"),
        agent: dir.join("agent.sock"),
        console: dir.join("console.sock"),
        devices: profile
            .devices
            .iter()
            .zip(&layout.devices)
            .zip(&specs)
            .map(|((d, v), spec)| StateDevice {
                id: d.id.clone(),
                kind: d.kind.as_str().into(),
                spec: spec.clone(),
                socket: v.socket.clone(),
                bus: v.bus.clone(),
                addr: v.addr.clone(),
                multifunction: v.multifunction,
                at_boot: v.at_boot,
            })
            .collect(),
        ports: layout
            .root_ports
            .iter()
            .map(|p| StatePort {
                id: p.id.clone(),
                slot: p.chassis,
                hotplug: p.hotplug,
            })
            .collect(),
        hotplug: match profile.hotplug {
            HotplugMode::Acpi => "acpi".into(),
            HotplugMode::NativePciehp => "pciehp".into(),
        },
        shares: opts
            .vm
            .shares
            .iter()
            .map(|s| (s.host.clone(), s.guest.clone()))
            .collect(),
        xfer: Some(dir.join("xfer")),
    };
    save_state(&state)?;
    let deadline = Instant::now() + server::START_TIMEOUT;
    for s in layout
        .devices
        .iter()
        .map(|d| d.socket.as_path())
        .chain([control.as_path()])
    {
        while !is_socket(s) {
            if !alive(server_pid, dir) {
                return Err(msg(format!(
                    "the device server exited (see {})",
                    dir.join("server.log").display()
                )));
            }
            if Instant::now() >= deadline {
                return Err(msg(format!(
                    "the device server did not create {}",
                    s.display()
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    // The private transfer share of `lab cp`, after the user's.
    let xfer = dir.join("xfer");
    fs::create_dir_all(&xfer).map_err(|e| msg(format!("cannot create {}: {e}", xfer.display())))?;
    let mut extra = opts.vm.clone();
    extra.shares.push(Share {
        host: xfer,
        guest: XFER_GUEST.into(),
        cached: true,
    });
    let config = boot::qemu_config(
        &env,
        profile,
        &layout,
        &initrd.path,
        dir,
        &state.agent,
        extra,
    );
    // QEMU listens on the agent's socket (every command connects anew) and on a third serial
    // port's, the console shell's.
    let mut args: Vec<String> = config
        .args()
        .map_err(lab)?
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    for a in &mut args {
        if a.starts_with("socket,id=agent,") {
            a.push_str(",server=on,wait=off");
        }
    }
    args.extend([
        "-chardev".to_string(),
        format!(
            "socket,id=shell,path={},server=on,wait=off",
            crate::vm::qemu::qemu_opt_escape(&state.console.to_string_lossy())
        ),
        "-serial".into(),
        "chardev:shell".into(),
    ]);
    let line: Vec<String> = std::iter::once(env.qemu.to_string_lossy().into_owned())
        .chain(args.iter().cloned())
        .map(|w| crate::vm::qemu::shell_quote(&w))
        .collect();
    let _ = fs::write(dir.join("qemu-cmdline.sh"), format!("{}\n", line.join(" ")));
    let mut cmd = Command::new(&env.qemu);
    cmd.args(&args);
    let boot = Instant::now();
    state.qemu_pid = spawn_detached("QEMU", &mut cmd, &dir.join("qemu.log"))?;
    save_state(&state)?;

    // The agent's greeting.
    let stream = loop {
        match UnixStream::connect(&state.agent) {
            Ok(s) => break s,
            Err(e) => {
                if !alive(state.qemu_pid, dir) {
                    return Err(msg(format!(
                        "QEMU exited (see {})",
                        dir.join("qemu.log").display()
                    )));
                }
                if boot.elapsed() > CONNECT_TIMEOUT {
                    return Err(msg(format!(
                        "cannot connect to {}: {e}",
                        state.agent.display()
                    )));
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let mut a = Agent::new(stream);
    if let Ok(f) = File::create(dir.join("agent.log")) {
        a.set_transcript(f);
    }
    let (qpid, qdir) = (state.qemu_pid, dir.to_path_buf());
    let mut watch = move || (!alive(qpid, &qdir)).then(|| "QEMU exited".to_string());
    let ready = a.wait_ready(BOOT_TIMEOUT, &mut watch).map_err(|e| {
        msg(format!(
            "the guest did not boot: {e} (console log: {})",
            dir.join("console.log").display()
        ))
    })?;
    let booted = boot.elapsed();
    let shell = console_shell_script();
    let r = guest_sh(&mut a, &shell, Duration::from_secs(10))?;
    if r.exit != Some(0) {
        crate::note!(
            "warning: the console shell did not start: {}",
            r.stderr.trim()
        );
    }
    drop(a);
    let mut q = qmp(&state)?;
    let pci = q.query_pci().map_err(lab)?;

    let headline = format!(
        "lab VM up in {:.1} s (guest kernel {}, booted in {:.1} s to the agent, initramfs {:.1} MiB, \
         accel {}), profile {}",
        t0.elapsed().as_secs_f64(),
        ready.kernel,
        booted.as_secs_f64(),
        initrd.size as f64 / (1024.0 * 1024.0),
        env.accel.as_str(),
        profile.name
    );
    Ok(Started {
        state,
        headline,
        pci,
    })
}

/// The guest script that keeps a shell on the console port: bash (else busybox sh) in its own
/// session with ttyS2 as its controlling terminal (`setsid -c`: TIOCSCTTY on stdin), so job
/// control works and Ctrl-C/Ctrl-Z reach the foreground process; respawned when it exits. The
/// loop runs in its own session too, so the agent's process-group cleanup leaves it alone.
///
/// Not started with `&`: a non-interactive shell starts background commands with SIGINT and
/// SIGQUIT ignored, which every shell and program below would inherit (Ctrl-C would do
/// nothing). `exec setsid` from the process-group leader the agent made forks instead.
pub fn console_shell_script() -> String {
    format!(
        "exec /bin/busybox setsid /bin/busybox sh -c 'sh=/bin/sh; [ -x /usr/bin/bash ] && sh=/usr/bin/bash; \
         while :; do TERM=xterm /bin/busybox setsid -c $sh -l <>/dev/{CONSOLE_PORT} >&0 2>&1; \
         sleep 1; done' </dev/null >/dev/null 2>&1"
    )
}

fn io_out(e: io::Error) -> ManualError {
    msg(format!("cannot write the output: {e}"))
}

fn save_state(state: &LabState) -> Result<()> {
    let path = state_file(&state.dir);
    let tmp = state.dir.join("state.json.tmp");
    let text = serde_json::to_string_pretty(state).map_err(|e| msg(e.to_string()))?;
    fs::write(&tmp, text + "\n")
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(|e| msg(format!("cannot write {}: {e}", path.display())))
}

fn print_state(state: &LabState, pci: Option<&[PciDeviceInfo]>, out: &mut dyn Write) -> Result<()> {
    let w = |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(io_out);
    w(out, format!("  state dir   {}", state.dir.display()))?;
    w(
        out,
        format!(
            "  QEMU        pid {} ({}), QMP {}",
            state.qemu_pid,
            if alive(state.qemu_pid, &state.dir) {
                "running"
            } else {
                "gone"
            },
            state.qmp.display()
        ),
    )?;
    w(
        out,
        format!(
            "  server      pid {} ({}), control {}",
            state.server_pid,
            if alive(state.server_pid, &state.dir) {
                "running"
            } else {
                "gone"
            },
            state.control.display()
        ),
    )?;
    w(out, format!("  agent       {}", state.agent.display()))?;
    w(
        out,
        format!(
            "  console     {} (guest {CONSOLE_PORT})",
            state.console.display()
        ),
    )?;
    w(out, format!("  hotplug     {}", state.hotplug))?;
    for (host, guest) in &state.shares {
        w(
            out,
            format!("  share       {} -> guest {guest}", host.display()),
        )?;
    }
    for d in &state.devices {
        let at = pci.and_then(|p| p.iter().find(|x| x.qdev_id == d.id));
        let where_ = match at {
            Some(i) => format!(
                "plugged on {} at {}",
                i.parent.as_deref().unwrap_or("?"),
                i.bdf()
            ),
            None if pci.is_some() => "unplugged".into(),
            None => "?".into(),
        };
        w(
            out,
            format!("  device      {:<6} {:<40} {}", d.id, where_, d.spec),
        )?;
    }
    for p in &state.ports {
        let by = pci.map(|pci| {
            pci.iter()
                .filter(|x| x.parent.as_deref() == Some(p.id.as_str()))
                .map(|x| x.qdev_id.clone())
                .collect::<Vec<_>>()
        });
        let what = match by {
            Some(v) if v.is_empty() => "free".to_string(),
            Some(v) => format!("busy ({})", v.join(", ")),
            None => "?".into(),
        };
        w(
            out,
            format!(
                "  slot        {} ({}){} {}",
                p.slot,
                p.id,
                if p.hotplug { " hot-add" } else { "" },
                what
            ),
        )?;
    }
    Ok(())
}

/// `pcisim lab status`.
pub fn status(dir: &Path, out: &mut dyn Write) -> Result<bool> {
    let state = load_state(dir)?;
    let up = alive(state.qemu_pid, &state.dir);
    let pci = if up {
        let _lock = Lock::take(dir)?;
        qmp(&state)
            .and_then(|mut q| q.query_pci().map_err(lab))
            .ok()
    } else {
        None
    };
    writeln!(
        out,
        "lab VM (profile {}): {}",
        state.profile,
        if up {
            "running"
        } else {
            "NOT running (`pcisim lab down` cleans up)"
        }
    )
    .map_err(io_out)?;
    print_state(&state, pci.as_deref(), out)?;
    Ok(up)
}

fn port_by_arg<'a>(state: &'a LabState, slot: &str) -> Result<&'a StatePort> {
    let slot_t = slot.trim();
    state
        .ports
        .iter()
        .find(|p| p.id == slot_t || p.slot.to_string() == slot_t)
        .ok_or_else(|| {
            let all: Vec<String> = state
                .ports
                .iter()
                .map(|p| format!("{} ({})", p.slot, p.id))
                .collect();
            msg(format!(
                "no slot {slot:?} in this VM: the slots are {}",
                all.join(", ")
            ))
        })
}

/// What `plug` did.
#[derive(Debug, Clone)]
pub struct Plugged {
    /// The guest's sysfs name.
    pub bdf: String,
    /// The root port.
    pub port: String,
    /// device_add to the guest's sysfs entry (includes one agent round trip).
    pub took: Duration,
    /// The driver bound in the guest, if any.
    pub driver: String,
}

/// `pcisim lab plug DEV [--slot N]`: `device_add` on a free root port, then waits until the
/// guest has the device in sysfs.
pub fn plug(dir: &Path, id: &str, slot: Option<&str>, out: &mut dyn Write) -> Result<Plugged> {
    let r = running(dir)?;
    let state = &r.state;
    let dev = state.device(id)?;
    let mut q = qmp(state)?;
    let pci = q.query_pci().map_err(lab)?;
    if let Some(at) = pci.iter().find(|p| p.qdev_id == id) {
        return Err(msg(format!(
            "{id} is already plugged (on {} at {}): `pcisim lab unplug {id}` first",
            at.parent.as_deref().unwrap_or("?"),
            at.bdf()
        )));
    }
    let busy = |port: &str| -> Vec<String> {
        pci.iter()
            .filter(|p| p.parent.as_deref() == Some(port))
            .map(|p| format!("{} at {}", p.qdev_id, p.bdf()))
            .collect()
    };
    let port = match slot {
        Some(s) => {
            let p = port_by_arg(state, s)?;
            let b = busy(&p.id);
            if !b.is_empty() {
                return Err(msg(format!(
                    "slot {} ({}) is busy: {} sits there; free slots: {}",
                    p.slot,
                    p.id,
                    b.join(", "),
                    free_slots(state, &pci)
                )));
            }
            p.id.clone()
        }
        // Its own port if free, else the first free hot-add port.
        None if busy(&dev.bus).is_empty() => dev.bus.clone(),
        None => state
            .ports
            .iter()
            .find(|p| p.hotplug && busy(&p.id).is_empty())
            .map(|p| p.id.clone())
            .ok_or_else(|| {
                msg(format!(
                    "no free hot-add slot for {id}: unplug something first"
                ))
            })?,
    };
    let t = Instant::now();
    q.device_add(&state.device_json(dev, &port))
        .map_err(|e| msg(format!("device_add {id} on {port} failed: {e}")))?;
    let info = q
        .query_pci()
        .map_err(lab)?
        .into_iter()
        .find(|p| p.qdev_id == id)
        .ok_or_else(|| {
            msg(format!(
                "QEMU does not list {id} in query-pci after device_add"
            ))
        })?;
    let bdf = info.bdf();
    let mut a = agent(state)?;
    let o = guest_sh(
        &mut a,
        &sysfs::wait_script(&bdf, true, PROBE_TIMEOUT),
        PROBE_TIMEOUT + Duration::from_secs(5),
    )?;
    let took = t.elapsed();
    if o.exit != Some(0) {
        return Err(msg(format!(
            "QEMU added {id} at {bdf} but the guest did not enumerate it within {} s \
             (see {})",
            PROBE_TIMEOUT.as_secs(),
            dir.join("console.log").display()
        )));
    }
    let driver = sysfs::driver(
        &mut Timed {
            agent: &mut a,
            timeout: Duration::from_secs(10),
        },
        &bdf,
    )
    .map_err(timed)?;
    writeln!(
        out,
        "{id} plugged on {port} at {bdf}: the guest saw it {} after device_add (driver: {})",
        ms(took),
        if driver.is_empty() { "none" } else { &driver }
    )
    .map_err(io_out)?;
    Ok(Plugged {
        bdf,
        port,
        took,
        driver,
    })
}

fn free_slots(state: &LabState, pci: &[PciDeviceInfo]) -> String {
    let free: Vec<String> = state
        .ports
        .iter()
        .filter(|p| {
            !pci.iter()
                .any(|x| x.parent.as_deref() == Some(p.id.as_str()))
        })
        .map(|p| format!("{} ({})", p.slot, p.id))
        .collect();
    if free.is_empty() {
        "none".into()
    } else {
        free.join(", ")
    }
}

/// `pcisim lab unplug DEV`: `device_del` and waits for `DEVICE_DELETED` and for the guest's sysfs
/// entry to go. Refuses a device with MSI-X unless `force` (QEMU 11.1.3 aborts on it).
pub fn unplug(dir: &Path, id: &str, force: bool, out: &mut dyn Write) -> Result<Duration> {
    let r = running(dir)?;
    let state = &r.state;
    let dev = state.device(id)?;
    let mut q = qmp(state)?;
    let pci = q.query_pci().map_err(lab)?;
    let Some(info) = pci.iter().find(|p| p.qdev_id == id) else {
        return Err(msg(format!(
            "{id} is not plugged: `pcisim lab plug {id}` first"
        )));
    };
    let bdf = info.bdf();
    let msix = dev.kind == "gpu" && !dev.spec.split(',').any(|o| o == "irq=msi");
    if msix && !force {
        return Err(msg(format!(
            "{id} uses MSI-X, and QEMU 11.1.3 aborts on device_del of a vfio-user device with \
             MSI-X (memory_region_del_subregion assertion; the VM would be lost). Serve it with \
             irq=msi (as gpu1 of the manual profile), or pass --force to try anyway"
        )));
    }
    let t = Instant::now();
    let deadline = t + DELETE_TIMEOUT;
    let res = loop {
        match q.device_del(id, DELETE_TIMEOUT) {
            Err(QmpError::Command { desc, .. })
                if desc.contains("guest is busy") && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(100));
            }
            r => break r,
        }
    };
    let took = t.elapsed();
    if let Err(e) = res {
        thread::sleep(Duration::from_millis(200));
        let dead = !alive(state.qemu_pid, &state.dir);
        let mut m = format!("device_del {id}: {e}");
        if dead {
            m.push_str(&format!(
                "; QEMU died (see {}){}",
                dir.join("qemu.log").display(),
                if msix {
                    " — expected with MSI-X on QEMU 11.1.3 (use irq=msi)"
                } else {
                    ""
                }
            ));
        } else {
            m.push_str(&format!(
                " (no DEVICE_DELETED within {} s: the guest may hold the device, e.g. a vfio user \
                 that does not release it; QEMU finishes the removal when it does)",
                DELETE_TIMEOUT.as_secs()
            ));
        }
        return Err(msg(m));
    }
    let mut a = agent(state)?;
    let o = guest_sh(
        &mut a,
        &sysfs::wait_script(&bdf, false, Duration::from_secs(10)),
        Duration::from_secs(15),
    )?;
    if o.exit != Some(0) {
        return Err(msg(format!(
            "QEMU reported {id} deleted but the guest still has {bdf} in sysfs"
        )));
    }
    writeln!(
        out,
        "{id} unplugged from {} ({bdf}): DEVICE_DELETED {} after device_del; gone from the guest",
        info.parent.as_deref().unwrap_or("?"),
        ms(took)
    )
    .map_err(io_out)?;
    Ok(took)
}

/// `pcisim lab exec -- CMD...`: runs `argv` in the guest through the agent (`timeout`), with
/// `stdin` as its standard input (empty: end of file at once); its stdout comes back exactly
/// ([`RunOutput::stdout_bytes`]).
pub fn exec(dir: &Path, argv: &[String], stdin: &[u8], timeout: Duration) -> Result<RunOutput> {
    if argv.is_empty() {
        return Err(msg(
            "exec needs a command: pcisim lab exec -- CMD [ARGS...]",
        ));
    }
    let r = running(dir)?;
    let mut a = agent(&r.state)?;
    // Beyond a few KiB the input goes through the transfer share (the serial link carries
    // ~100 KB/s of base64).
    match &r.state.xfer {
        Some(xfer) if stdin.len() > EXEC_STDIN_INLINE => {
            let name = unique_name("stdin");
            let host = xfer.join(&name);
            fs::write(&host, stdin)
                .map_err(|e| msg(format!("cannot write {}: {e}", host.display())))?;
            let guest = format!("{XFER_GUEST}/{name}");
            let res = a.run_exact(argv, RunInput::GuestFile(&guest), timeout);
            let _ = fs::remove_file(&host);
            res.map_err(lab)
        }
        _ => a.run_binary(argv, stdin, timeout).map_err(lab),
    }
}

/// A file name in the transfer share never used before (pid and time).
fn unique_name(what: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(".{what}-{}-{}", std::process::id(), t.as_nanos())
}

/// The most stdin `exec` sends inline through the agent link.
pub const EXEC_STDIN_INLINE: usize = 16 << 10;

/// One side of `lab cp`: a host path or a guest path (`vm:PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpPath {
    /// On the host.
    Host(PathBuf),
    /// In the guest (`vm:PATH`).
    Guest(String),
}

impl CpPath {
    /// `vm:PATH` is the guest's; anything else the host's.
    pub fn parse(arg: &str) -> CpPath {
        match arg.strip_prefix("vm:") {
            Some(p) => CpPath::Guest(p.to_string()),
            None => CpPath::Host(PathBuf::from(arg)),
        }
    }
}

/// What `cp` did.
#[derive(Debug, Clone)]
pub struct Copied {
    /// Bytes copied.
    pub bytes: u64,
    /// How long it took (from the first byte read to the last written, both sides).
    pub took: Duration,
    /// Where it went (the final path).
    pub to: String,
}

/// How long the guest side of a copy may take.
pub const CP_TIMEOUT: Duration = Duration::from_secs(600);

/// `pcisim lab cp SRC DST`: copies one file between host and guest (exactly one side `vm:`),
/// through the VM's transfer share (9p, [`XFER_GUEST`]): the host writes or reads the state
/// directory's `xfer/`, the guest copies between it and the destination. A destination that is
/// a directory gets the source's file name.
pub fn cp(dir: &Path, src: &str, dst: &str, out: &mut dyn Write) -> Result<Copied> {
    let (src, dst) = (CpPath::parse(src), CpPath::parse(dst));
    let r = running(dir)?;
    let xfer = r.state.xfer.clone().ok_or_else(|| {
        msg("this VM was started without a transfer share (an older pcisim): `lab down` and `lab up` again")
    })?;
    // Unique names: the transfer share is mounted with the guest's cache (never a stale page).
    let tmp_name = unique_name("cp");
    let host_tmp = xfer.join(&tmp_name);
    let guest_tmp = format!("{XFER_GUEST}/{tmp_name}");
    let t = Instant::now();
    let res = match (&src, &dst) {
        (CpPath::Host(h), CpPath::Guest(g)) => {
            let name = h
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| msg(format!("{}: not a file name", h.display())))?;
            let bytes = fs::copy(h, &host_tmp)
                .map_err(|e| msg(format!("cannot read {}: {e}", h.display())))?;
            let mode = {
                use std::os::unix::fs::PermissionsExt;
                fs::metadata(h)
                    .map(|m| m.permissions().mode())
                    .unwrap_or(0o644)
            };
            let mut a = agent(&r.state)?;
            let o = a
                .run(
                    &[
                        "/bin/busybox".into(),
                        "sh".into(),
                        "-c".into(),
                        // dd with large blocks (busybox cp's 4 KiB reads would each be a 9p
                        // round trip), four at once on quarters of the file (about 1.5x the
                        // rate of one), then the size checked.
                        "d=$2; [ -d \"$d\" ] && d=${d%/}/$3; rm -f /tmp/.pcisim-cp.err; : >\"$d\" || exit 1; \
                         c=$((($5 + 4194303) / 4194304)); pids=; \
                         for k in 0 1 2 3; do dd if=\"$1\" of=\"$d\" bs=1M skip=$((k*c)) \
                         seek=$((k*c)) count=$c conv=notrunc 2>>/tmp/.pcisim-cp.err & pids=\"$pids $!\"; done; \
                         for p in $pids; do wait $p || { cat /tmp/.pcisim-cp.err >&2; exit 1; }; done; \
                         s=$(stat -c %s \"$d\"); [ \"$s\" = \"$5\" ] \
                         || { echo \"$d has $s bytes, not $5\" >&2; exit 1; }; \
                         rm -f /tmp/.pcisim-cp.err; chmod \"$4\" \"$d\" && echo \"$d\""
                            .into(),
                        "cp".into(),
                        guest_tmp.clone(),
                        g.clone(),
                        name,
                        format!("{:o}", mode & 0o7777),
                        bytes.to_string(),
                    ],
                    CP_TIMEOUT,
                )
                .map_err(lab);
            let _ = fs::remove_file(&host_tmp);
            let o = o?;
            if o.exit != Some(0) {
                return Err(msg(format!(
                    "copying into the guest's {g} failed: {}",
                    o.stderr.trim()
                )));
            }
            Ok((bytes, format!("vm:{}", o.stdout.trim())))
        }
        (CpPath::Guest(g), CpPath::Host(h)) => {
            let mut a = agent(&r.state)?;
            let o = a
                .run(
                    &[
                        "/bin/busybox".into(),
                        "sh".into(),
                        "-c".into(),
                        "dd if=\"$1\" of=\"$2\" bs=4M conv=fsync 2>/tmp/.pcisim-cp.err && stat -c %a \"$1\" \
                         || { cat /tmp/.pcisim-cp.err >&2; exit 1; }"
                            .into(),
                        "cp".into(),
                        g.clone(),
                        guest_tmp.clone(),
                    ],
                    CP_TIMEOUT,
                )
                .map_err(lab)?;
            if o.exit != Some(0) {
                let _ = fs::remove_file(&host_tmp);
                return Err(msg(format!(
                    "reading the guest's {g} failed: {}",
                    o.stderr.trim()
                )));
            }
            let mut to = h.clone();
            if to.is_dir() {
                let name = Path::new(g)
                    .file_name()
                    .ok_or_else(|| msg(format!("vm:{g}: not a file name")))?;
                to = to.join(name);
            }
            let bytes = fs::metadata(&host_tmp)
                .map_err(|e| msg(format!("{}: {e}", host_tmp.display())))?
                .len();
            if let Ok(mode) = u32::from_str_radix(o.stdout.trim(), 8) {
                use std::os::unix::fs::PermissionsExt;
                let _ = fs::set_permissions(&host_tmp, fs::Permissions::from_mode(mode));
            }
            // A rename where it can, else a copy (another file system).
            let moved =
                fs::rename(&host_tmp, &to).or_else(|_| fs::copy(&host_tmp, &to).map(|_| ()));
            let _ = fs::remove_file(&host_tmp);
            moved.map_err(|e| msg(format!("cannot write {}: {e}", to.display())))?;
            Ok((bytes, to.display().to_string()))
        }
        _ => Err(msg(
            "cp copies between host and guest: exactly one of SRC and DST is `vm:PATH` \
             (e.g. pcisim lab cp ./a.out vm:/tmp/ or pcisim lab cp vm:/tmp/log .)",
        )),
    };
    let (bytes, to) = res?;
    let took = t.elapsed();
    writeln!(
        out,
        "copied {bytes} bytes to {to} in {:.2} s ({:.1} MB/s)",
        took.as_secs_f64(),
        bytes as f64 / 1e6 / took.as_secs_f64().max(1e-6)
    )
    .map_err(io_out)?;
    Ok(Copied { bytes, took, to })
}

/// Restores the terminal's mode when dropped.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    fn enter(fd: i32) -> Option<RawMode> {
        // SAFETY: isatty/tcgetattr/tcsetattr on a descriptor, with a termios we own.
        unsafe {
            if libc::isatty(fd) != 1 {
                return None;
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(RawMode { fd, saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved in `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// The terminal size of `fd` (rows, cols), if it is a terminal.
pub fn window_size(fd: i32) -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills a winsize we own; a non-terminal fd gets an error.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 0 && ws.ws_col > 0)
            .then_some((ws.ws_row, ws.ws_col))
    }
}

/// Holds `console.lock` (flock) while a console is attached, so a second attach is refused.
struct ConsoleLock {
    _file: File,
}

impl ConsoleLock {
    fn take(dir: &Path) -> Result<ConsoleLock> {
        let path = dir.join("console.lock");
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| msg(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: flock on a descriptor we own; no memory effects.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut who = String::new();
            let _ = f.read_to_string(&mut who);
            return Err(msg(format!(
                "the console of this VM is already attached (pcisim pid {}): one attach at a \
                 time; leave that one with Ctrl-] (or use `pcisim lab exec`)",
                who.trim()
            )));
        }
        let _ = f.set_len(0);
        let _ = write!(f, "{}", std::process::id());
        Ok(ConsoleLock { _file: f })
    }
}

/// How long piped input's output is still read once the session's output has gone quiet.
const CONSOLE_IDLE: Duration = Duration::from_millis(1500);
/// The longest a piped session keeps reading after its input ended.
const CONSOLE_DRAIN_MAX: Duration = Duration::from_secs(60);

/// `pcisim lab console`: attaches stdin/stdout to the guest shell on ttyS2, its controlling
/// terminal (job control: Ctrl-C, Ctrl-Z reach the guest's foreground process). On a terminal:
/// raw mode, the guest terminal gets this one's size, Ctrl-] leaves. Piped input is sent as is;
/// the session ends once the input has ended and the output has been quiet for a moment. One
/// attach at a time.
pub fn console(dir: &Path) -> Result<()> {
    let state = load_state(dir)?;
    if !alive(state.qemu_pid, &state.dir) {
        return Err(msg(format!(
            "the lab VM in {} is not running any more: `pcisim lab down` cleans up",
            dir.display()
        )));
    }
    let _attached = ConsoleLock::take(dir)?;
    // The guest terminal's size: this terminal's (stty rows/cols on ttyS2 through the agent).
    if let Some((rows, cols)) = window_size(0).or_else(|| window_size(1)) {
        let _lock = Lock::take(dir)?;
        let set = agent(&state).and_then(|mut a| {
            guest_sh(
                &mut a,
                &format!("stty -F /dev/{CONSOLE_PORT} rows {rows} cols {cols}"),
                Duration::from_secs(10),
            )
        });
        match set {
            Ok(o) if o.exit == Some(0) => {}
            Ok(o) => crate::note!(
                "warning: setting the guest terminal size: {}",
                o.stderr.trim()
            ),
            Err(e) => crate::note!("warning: setting the guest terminal size: {e}"),
        }
    }
    let sock = UnixStream::connect(&state.console).map_err(|e| {
        msg(format!(
            "cannot connect to the console {}: {e}",
            state.console.display()
        ))
    })?;
    let raw = RawMode::enter(0);
    if raw.is_some() {
        crate::note!("attached to the guest shell ({CONSOLE_PORT}); Ctrl-] leaves\r");
    }
    let mut reader = sock.try_clone().map_err(|e| msg(e.to_string()))?;
    let last_output = std::sync::Arc::new(std::sync::Mutex::new(Instant::now()));
    let seen = std::sync::Arc::clone(&last_output);
    let pump = thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut stdout = io::stdout();
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || stdout.write_all(&buf[..n]).is_err() {
                break;
            }
            let _ = stdout.flush();
            if let Ok(mut t) = seen.lock() {
                *t = Instant::now();
            }
        }
    });
    let mut writer = sock;
    let interactive = raw.is_some();
    // A newline gets a fresh prompt on a terminal; piped input is sent exactly.
    if interactive {
        let _ = writer.write_all(b"\n");
    }
    let mut stdin = io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if interactive {
            if let Some(i) = chunk.iter().position(|&b| b == CONSOLE_ESCAPE) {
                let _ = writer.write_all(&chunk[..i]);
                break;
            }
        }
        if writer.write_all(chunk).is_err() {
            break;
        }
    }
    if !interactive {
        // Let the shell answer what was sent: until its output has been quiet for a moment.
        let ended = Instant::now();
        loop {
            thread::sleep(Duration::from_millis(100));
            let quiet = last_output
                .lock()
                .map(|t| t.elapsed() >= CONSOLE_IDLE)
                .unwrap_or(true);
            if (quiet && ended.elapsed() >= CONSOLE_IDLE) || ended.elapsed() >= CONSOLE_DRAIN_MAX {
                break;
            }
        }
    }
    let _ = writer.shutdown(std::net::Shutdown::Both);
    let _ = pump.join();
    drop(raw);
    if interactive {
        crate::note!("\ndetached from the guest shell");
    } else {
        // The reader may be gone: nothing to say then.
        let _ = writeln!(io::stdout());
    }
    Ok(())
}

/// `pcisim lab down`: powers the guest off, stops QEMU and the server, removes the state
/// directory (unless `keep`).
pub fn down(dir: &Path, keep: bool, out: &mut dyn Write) -> Result<()> {
    let state = load_state(dir)?;
    let _lock = Lock::take(dir)?;
    let t = Instant::now();
    let qemu = if alive(state.qemu_pid, &state.dir) {
        let powered =
            agent(&state).and_then(|mut a| a.poweroff(Duration::from_secs(30)).map_err(lab));
        match powered {
            Ok(()) if wait_dead(state.qemu_pid, &state.dir, POWEROFF_TIMEOUT) => {
                format!("guest powered off in {:.1} s", t.elapsed().as_secs_f64())
            }
            Ok(()) => format!(
                "QEMU still running {POWEROFF_TIMEOUT:?} after poweroff: {}",
                stop(state.qemu_pid, &state.dir, Duration::from_secs(5))
            ),
            Err(e) => format!(
                "poweroff failed ({e}): QEMU {}",
                stop(state.qemu_pid, &state.dir, Duration::from_secs(5))
            ),
        }
    } else {
        "QEMU was not running".to_string()
    };
    writeln!(out, "{qemu}").map_err(io_out)?;
    let server = stop(state.server_pid, &state.dir, Duration::from_secs(5));
    writeln!(out, "device server (pid {}): {server}", state.server_pid).map_err(io_out)?;
    if keep {
        let _ = fs::remove_file(state_file(dir));
        writeln!(out, "state removed; logs kept in {}", dir.display()).map_err(io_out)?;
    } else {
        fs::remove_dir_all(dir)
            .map_err(|e| msg(format!("cannot remove {}: {e}", dir.display())))?;
        writeln!(out, "removed {}", dir.display()).map_err(io_out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_manual_profile_layout_and_lookup() {
        let p = manual_profile();
        let l = p.layout(Path::new("/run/x")).unwrap();
        assert_eq!(l.root_ports.len(), 3);
        assert_eq!(l.free_ports, vec!["rp3".to_string()]);
        assert!(!l.device("gpu1").unwrap().at_boot);
        assert!(profile_by_name("gpu-hotplug").is_ok());
        let e = profile_by_name("nope").unwrap_err().to_string();
        assert!(e.contains("manual"), "{e}");
    }

    #[test]
    fn test_no_state_is_a_clear_error() {
        let e = load_state(Path::new("/nonexistent/pcisim-lab"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no lab VM is running"), "{e}");
    }

    #[test]
    fn test_alive_checks_the_command_line() {
        assert!(!alive(
            std::process::id(),
            Path::new("/definitely/not/here")
        ));
        assert!(!alive(u32::MAX, Path::new("/")));
    }
}
