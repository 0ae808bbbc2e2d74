//! `pcisim lab up`: provisions, builds and boots a VM ([`crate::vm::boot::Vm::boot`] with
//! [`Lifetime::Detached`]: its server and QEMU outlive the command) and waits for the guest.

use super::*;

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
pub(super) struct Started {
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

pub(super) fn start(opts: &UpOptions, dir: &Path) -> Result<Started> {
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
    let mut state = LabState {
        profile: profile.name.clone(),
        dir: dir.to_path_buf(),
        server_pid: 0,
        qemu_pid: 0,
        control: dir.join("control.sock"),
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

    // The private transfer share of `lab cp`, after the user's.
    let xfer = dir.join("xfer");
    fs::create_dir_all(&xfer).map_err(|e| msg(format!("cannot create {}: {e}", xfer.display())))?;
    let mut extra = opts.vm.clone();
    extra.shares.push(Share {
        host: xfer,
        guest: XFER_GUEST.into(),
        cached: true,
    });

    // The one boot sequence, detached: each child is recorded in state.json as soon as it runs,
    // so that a VM whose `up` was killed can still be brought down.
    let vm = Vm::boot::<ManualError>(
        &VmSpec {
            pcisim_exe: &opts.pcisim_exe,
            env: &env,
            initrd: &initrd.path,
            profile,
            layout: &layout,
            specs: &specs,
            dir,
            extra,
            lifetime: Lifetime::Detached {
                console: state.console.clone(),
            },
        },
        &mut |l| {
            crate::note!("{l}");
            Ok(())
        },
        &mut |child| {
            match child {
                Spawned::Server(pid) => state.server_pid = pid,
                Spawned::Qemu(pid) => state.qemu_pid = pid,
            }
            save_state(&state)
        },
    )?;
    let Vm {
        server,
        qemu,
        mut agent,
        mut qmp,
        ready,
        boot_time: booted,
        ..
    } = vm;
    let shell = console_shell_script();
    let r = guest_sh(&mut agent, &shell, Duration::from_secs(10))?;
    if r.exit != Some(0) {
        crate::note!(
            "warning: the console shell did not start: {}",
            r.stderr.trim()
        );
    }
    drop(agent);
    let pci = qmp.query_pci().map_err(lab)?;
    drop(qmp);
    // From here on the VM outlives this command.
    server.release();
    qemu.release();

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
