//! The state directory of a running lab VM: its record (`state.json`), the lock, the detached
//! processes and the links to them (QMP, agent).

use super::*;

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
    pub(super) fn device(&self, id: &str) -> Result<&StateDevice> {
        self.devices.iter().find(|d| d.id == id).ok_or_else(|| {
            let ids: Vec<&str> = self.devices.iter().map(|d| d.id.as_str()).collect();
            msg(format!(
                "unknown device {id:?}: this VM's devices are {}",
                ids.join(", ")
            ))
        })
    }

    pub(super) fn device_json(&self, d: &StateDevice, bus: &str) -> Value {
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

pub(super) fn state_file(dir: &Path) -> PathBuf {
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
pub(super) struct Lock {
    _file: File,
}

impl Lock {
    pub(super) fn take(dir: &Path) -> Result<Lock> {
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
pub(super) struct Running {
    pub(super) state: LabState,
    _lock: Lock,
}

pub(super) fn running(dir: &Path) -> Result<Running> {
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

pub(super) fn qmp(state: &LabState) -> Result<Qmp> {
    let transcript = OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.dir.join("qmp.log"))
        .ok();
    Qmp::connect(&state.qmp, Duration::from_secs(5), transcript).map_err(lab)
}

pub(super) fn agent(state: &LabState) -> Result<Agent> {
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
pub(super) fn guest_sh(a: &mut Agent, script: &str, timeout: Duration) -> Result<RunOutput> {
    guestops::sh_output(&mut Timed { agent: a, timeout }, script).map_err(timed)
}

pub(super) fn timed(e: TimedError) -> ManualError {
    match e {
        TimedError::Agent(e) => lab(e),
        TimedError::Shell(e) => msg(e.to_string()),
    }
}

pub(super) fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Sends `sig` to `pid` if it is still ours (see [`alive`]).
pub(super) fn signal(pid: u32, dir: &Path, sig: libc::c_int) {
    if alive(pid, dir) {
        // SAFETY: kill has no memory effects; `alive` just checked the pid is ours.
        unsafe { libc::kill(pid as libc::pid_t, sig) };
    }
}

pub(super) fn wait_dead(pid: u32, dir: &Path, timeout: Duration) -> bool {
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
pub(super) fn stop(pid: u32, dir: &Path, grace: Duration) -> &'static str {
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

pub(super) fn io_out(e: io::Error) -> ManualError {
    msg(format!("cannot write the output: {e}"))
}

pub(super) fn save_state(state: &LabState) -> Result<()> {
    let path = state_file(&state.dir);
    let tmp = state.dir.join("state.json.tmp");
    let text = serde_json::to_string_pretty(state).map_err(|e| msg(e.to_string()))?;
    fs::write(&tmp, text + "\n")
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(|e| msg(format!("cannot write {}: {e}", path.display())))
}

pub(super) fn print_state(
    state: &LabState,
    pci: Option<&[PciDeviceInfo]>,
    out: &mut dyn Write,
) -> Result<()> {
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
