//! The `pcisim lab` commands that are more than one call into the lab crate: the kernel's vfio
//! selftests (`lab kselftest vfio`) and the manual lab (`lab up/plug/unplug/exec/cp/console/
//! status/down`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use pcisim_lab::note;
use pcisim_lab::output::PipeSafe;

use crate::cli::{KernelArgs, LabCmd};

/// `pcisim lab kselftest vfio`: exit codes as `lab suite` (a selftest build failure is 2).
pub(crate) fn lab_kselftest(filter: Option<String>, kernel: KernelArgs, keep: bool) -> Result<i32> {
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
pub(crate) fn lab_manual(cmd: LabCmd) -> Result<i32> {
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
