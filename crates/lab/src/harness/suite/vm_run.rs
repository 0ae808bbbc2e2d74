//! One VM of the run: its server, QEMU and guest up, its scenarios, its teardown and how the
//! server ended.

use super::*;

/// Starts a VM of `profile` (its device server, QEMU, the guest), runs `scenarios` in it and
/// tears it down. Returns whether the boot and teardown windows were read and clean and the
/// server exited cleanly (the scenarios' verdicts are counted in `report`).
pub(super) fn run_vm(
    opts: &SuiteOptions,
    env: &provision::ProvisionEnv,
    initrd: &Path,
    profile: &VmProfile,
    scenarios: &[Scenario],
    run: &RunDir,
    report: &mut Report<'_>,
) -> Result<bool, LabError> {
    let dir = run.join(&profile.name);
    fs::create_dir_all(&dir).map_err(|source| LabError::RunDir {
        path: dir.clone(),
        source,
    })?;
    let layout = profile.layout(&dir)?;
    let specs = profile.specs(&layout, &opts.device_opts);

    // The device server, with its control socket (journals, violations).
    let sockets: Vec<PathBuf> = layout.devices.iter().map(|d| d.socket.clone()).collect();
    let server_log = dir.join("server.log");
    let t = Instant::now();
    let server = match Server::start(
        &opts.pcisim_exe,
        &specs,
        &sockets,
        Some(&dir.join("control.sock")),
        &server_log,
    ) {
        Ok(s) => s,
        Err(e) => {
            show_tail(report, "server log", &server_log, 20)?;
            return Err(e.into());
        }
    };
    let described = server::describe(&opts.pcisim_exe, &specs, &dir.join("describe.log"))?;
    let mut devices = Vec::new();
    for d in &profile.devices {
        let found = described
            .iter()
            .find(|x| x.id == d.id)
            .cloned()
            .ok_or_else(|| ServerError::BadDescription(format!("no device with id {}", d.id)))?;
        devices.push(found);
    }
    let what: Vec<String> = devices
        .iter()
        .map(|d| {
            format!(
                "{} {:04x}:{:04x} class {:06x}",
                d.id, d.description.vendor_id, d.description.device_id, d.description.class_code
            )
        })
        .collect();
    report.line(&format!(
        "device server up in {:.1} s (pid {}): {} [{}]",
        secs(t),
        server.pid(),
        what.join(", "),
        specs.join(" ")
    ))?;
    let watch = JournalWatch::new(server.control()?).map_err(ServerError::from)?;

    // The VM.
    let listener = AgentListener::bind(&dir.join("agent.sock"))?;
    let config = boot::qemu_config(
        env,
        profile,
        &layout,
        initrd,
        &dir,
        listener.path(),
        opts.vm.clone(),
    );
    match config.shell_line() {
        Ok(line) => save(dir.join("qemu-cmdline.sh"), &format!("{line}\n")),
        Err(e) => warn!("{e}"),
    }
    let boot = Instant::now();
    let mut qemu = config.spawn(&dir.join("qemu.log"))?;
    let booted = boot_guest(&listener, &mut qemu, &dir).and_then(|(agent, uname)| {
        let transcript = File::create(dir.join("qmp.log"))
            .map_err(|e| warn!("no QMP transcript: {e}"))
            .ok();
        let qmp = Qmp::connect(&config.qmp_socket, CONNECT_TIMEOUT, transcript)?;
        Ok((agent, qmp, uname))
    });
    let (agent, qmp, uname) = match booted {
        Ok(x) => x,
        Err(e) => {
            if e.interrupt_signal().is_none() {
                show_console(report, &config.console_log)?;
                show_tail(report, "QEMU output", &dir.join("qemu.log"), 10)?;
                // Whether the guest spins or QEMU waits (on our server?): the threads say.
                if qemu.try_wait().ok().flatten().is_none() {
                    let file = dir.join("stall.txt");
                    let text = crate::vm::stall::describe_to(
                        &file,
                        &[(qemu.pid(), "QEMU"), (server.pid(), "device server")],
                    );
                    report.line(&format!("threads at the timeout ({}):", file.display()))?;
                    for l in text.lines() {
                        report.line(&format!("  {l}"))?;
                    }
                }
            }
            return Err(e);
        }
    };
    report.line(&format!(
        "guest booted in {:.1} s (QEMU start to agent ready), guest uname -r {uname}",
        secs(boot)
    ))?;
    let mut vm = Vm {
        profile: profile.clone(),
        layout,
        dir,
        devices,
        server,
        watch,
        qemu,
        agent,
        qmp,
    };
    let mut outside_clean = check_outside(&mut vm.watch, "boot", &vm.dir, report)?;
    // The kernel log up to here; each scenario's slice starts where the previous read ended.
    let mut kmsg = None;
    outside_clean &= check_boot_kernel(&mut vm.agent, &mut kmsg, &vm.dir, report)?;

    // The scenarios.
    let mut broken: Option<String> = None;
    for s in scenarios {
        run_scenario(s, &mut vm, &mut kmsg, &mut broken, run, report)?;
    }

    // Teardown: power off, QEMU exits, stop the server and check how it ended.
    let Vm {
        dir,
        mut server,
        mut watch,
        mut qemu,
        mut agent,
        qmp,
        ..
    } = vm;
    let mut ok = true;
    let t = Instant::now();
    let no_poweroff = scenarios
        .first()
        .and_then(|s| s.profile().cannot_power_off());
    if broken.is_none() && no_poweroff.is_none() {
        if let Err(e) = agent.poweroff(Duration::from_secs(30)) {
            warn!("poweroff: {e}");
            report.line(&format!("poweroff request failed: {e}"))?;
        }
    }
    if let Some(why) = no_poweroff {
        report.line(&format!("not powering the guest off ({why}): ending QEMU"))?;
        qemu.terminate(Duration::from_secs(5))?;
    } else {
        match qemu.wait_timeout(POWEROFF_TIMEOUT)? {
            Some(status) if status.success() => {
                report.line(&format!("guest powered off in {:.1} s", secs(t)))?
            }
            Some(status) => report.line(&format!(
                "QEMU exited with {} (see {})",
                describe_status(status),
                dir.join("qemu.log").display()
            ))?,
            None => {
                report.line(&format!(
                    "QEMU still running {POWEROFF_TIMEOUT:?} after poweroff: killing it"
                ))?;
                qemu.terminate(Duration::from_secs(5))?;
            }
        }
    }
    drop(qmp);
    drop(qemu);
    match server.exited() {
        None => {
            outside_clean &= check_outside(&mut watch, "teardown", &dir, report)?;
            match watch.summary() {
                Ok(lines) => {
                    for l in lines {
                        report.line(&format!("journal {l}"))?;
                    }
                }
                Err(e) => {
                    report.line(&format!("journal summary unavailable: {}", error_chain(&e)))?
                }
            }
            outside_clean &= latency::report_vm(&mut watch, &profile.name, report)?;
        }
        Some(status) => {
            // Nobody can vouch for what the devices did since the last scenario.
            outside_clean = false;
            let what = format!(
                "teardown: device journal unreadable: the device server exited ({status}) \
                 before the teardown window was read"
            );
            report.outside_failure(&what)?;
            report.line(&what)?;
        }
    }
    ok &= outside_clean;
    let exit = server.stop()?;
    if exit.ok() {
        report.line(&format!("device server exited cleanly ({})", exit.status))?;
    } else {
        ok = false;
        let mut what = format!("device server check failed: {}", exit.status);
        if !exit.panics.is_empty() {
            what.push_str(&format!("; panic: {}", exit.panics.join(" | ")));
        }
        report.outside_failure(&what)?;
        report.line(&what)?;
        show_tail(report, "server log", &server_log, 20)?;
    }
    Ok(ok)
}

/// Waits for QEMU to connect the agent port and for the agent's greeting.
pub(super) fn boot_guest(
    listener: &AgentListener,
    qemu: &mut ChildGuard,
    dir: &Path,
) -> Result<(Agent, String), LabError> {
    let console = dir.join("console.log");
    let mut watch = || {
        qemu.try_wait()
            .ok()
            .flatten()
            .map(|s| format!("QEMU exited ({})", describe_status(s)))
    };
    let boot_err = |source: AgentError| LabError::Boot {
        source,
        console: console.clone(),
    };
    let mut agent = listener
        .accept(CONNECT_TIMEOUT, &mut watch)
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
    Ok((agent, ready.kernel))
}
