//! `pcisim`: serve emulated PCI functions over vfio-user, describe them, run the guest lab, and
//! measure the server.

#![deny(missing_docs)]

mod bench;
mod cli;
mod control;
mod ctl;
mod devices;
mod lab_cmds;
mod serve;
mod spec;

use cli::{Cli, Cmd, LabCmd};
use lab_cmds::{lab_kselftest, lab_manual};
use serve::{millis, serve, Access};

use anyhow::{Context, Result};
use clap::Parser;
use pcisim_lab::note;
use pcisim_lab::output::PipeSafe;

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
