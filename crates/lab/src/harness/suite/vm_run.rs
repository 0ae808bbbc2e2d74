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

    // The devices as the server describes them (`pcisim describe`, no server needed).
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
    report.line(&format!("devices: {}", what.join(", ")))?;

    // The server, QEMU and the guest: the one boot sequence, attached to this run.
    let booted = boot::Vm::boot::<LabError>(
        &boot::VmSpec {
            pcisim_exe: &opts.pcisim_exe,
            env,
            initrd,
            profile,
            layout: &layout,
            specs: &specs,
            dir: &dir,
            extra: opts.vm.clone(),
            lifetime: boot::Lifetime::Attached,
        },
        &mut |l| report.line(l),
        &mut |_| Ok(()),
    )?;
    report.line(&format!(
        "guest booted in {:.1} s (QEMU start to agent ready{}), guest uname -r {}",
        booted.boot_time.as_secs_f64(),
        booted
            .qemu_cpu
            .map(|c| format!("; QEMU CPU time {:.1} s", c.as_secs_f64()))
            .unwrap_or_default(),
        booted.ready.kernel
    ))?;
    let boot::Vm {
        server,
        qemu,
        agent,
        qmp,
        ..
    } = booted;
    let server_log = dir.join("server.log");
    let watch = JournalWatch::new(server.control()?).map_err(ServerError::from)?;
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
