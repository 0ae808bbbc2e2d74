//! `pcisim`: serve emulated PCI functions over vfio-user, describe them, run the guest lab, and
//! measure the server.

#![deny(missing_docs)]

mod bench;
mod control;
mod ctl;
mod devices;
mod spec;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "pcisim",
    version,
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
        /// `gpu:socket=PATH[,vram=SIZE][,id=NAME][,irq=msix|msi][,no_soft_reset=on|off][,vendor=..][,device=..][,class=..]`
        /// or `npu:socket=PATH[,id=NAME][,peer=GPU_ID][,checking=on|off]`
        #[arg(long = "device", required = true)]
        devices: Vec<String>,
        /// Serve the control socket (journal, stats, status, fault injection) at this path.
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
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
        /// Fewer iterations (a few seconds in total).
        #[arg(long)]
        quick: bool,
    },
}

#[derive(Debug, Subcommand)]
enum LabCmd {
    /// Run the scenario catalogue in a fresh VM; KTAP on stdout, progress on stderr.
    Suite {
        /// Run only scenarios whose name contains this (e.g. `E1`, `E`, `msix`).
        #[arg(long)]
        filter: Option<String>,
        /// Guest kernel series.
        #[arg(long, default_value = "6.12")]
        kernel: String,
        /// Extra `key=value` options appended to every GPU's device spec in every VM (fault knobs).
        #[arg(long = "device-opt")]
        device_opts: Vec<String>,
        /// Keep the run directory (sockets, logs, initramfs) even on success.
        #[arg(long)]
        keep: bool,
    },
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_micros()
        .init();
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pcisim: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
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
        Cmd::Serve { devices, control } => serve(&parse_specs(&devices)?, control.as_deref()),
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
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(0)
        }
        Cmd::Lab { cmd } => match cmd {
            LabCmd::Suite {
                filter,
                kernel,
                device_opts,
                keep,
            } => {
                let opts = pcisim_lab::SuiteOptions {
                    pcisim_exe: std::env::current_exe().context("locating the pcisim binary")?,
                    filter,
                    kernel,
                    device_opts,
                    keep,
                };
                let mut out = std::io::stdout();
                let mut progress = std::io::stderr();
                match pcisim_lab::run_suite(&opts, &mut out, &mut progress) {
                    Ok(ok) => Ok(if ok { 0 } else { 1 }),
                    // Interrupted: the conventional 128 + signal, after the lab cleaned up.
                    Err(e) if e.interrupt_signal().is_some() => {
                        eprintln!("pcisim: {e}");
                        Ok(128 + e.interrupt_signal().unwrap_or(2))
                    }
                    Err(e) => Err(e.into()),
                }
            }
        },
        Cmd::Bench { quick } => {
            bench::run(quick)?;
            Ok(0)
        }
    }
}

fn serve(specs: &[spec::DeviceSpec], control_path: Option<&Path>) -> Result<i32> {
    // Build and bind everything first, so a bad option or a busy socket fails before any
    // device starts serving.
    let mut servers = Vec::new();
    let mut sockets: Vec<PathBuf> = Vec::new();
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
            ..Default::default()
        };
        let server = pcisim_vfio_user::Server::bind(&s.socket, built.device, opts)
            .with_context(|| format!("device {}", s.id))?;
        log::info!(
            "{}: {} serving on {}",
            s.id,
            s.kind.name(),
            s.socket.display()
        );
        sockets.push(s.socket.clone());
        servers.push(server);
    }
    let control = match control_path {
        Some(path) => match control::ControlServer::bind(path, controls) {
            Ok(c) => {
                log::info!("control socket on {}", c.path().display());
                Some(c)
            }
            Err(e) => {
                // Leave no device socket behind that nobody serves.
                for s in &sockets {
                    let _ = std::fs::remove_file(s);
                }
                return Err(e);
            }
        },
        None => None,
    };
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("installing signal handlers")?;
    for server in servers {
        let server = Arc::new(server);
        std::thread::Builder::new()
            .name(format!("serve-{}", server.path().display()))
            .spawn(move || {
                if let Err(e) = server.run() {
                    log::error!("{}: accept failed: {e}", server.path().display());
                }
            })
            .context("spawning a server thread")?;
    }
    if let Some(c) = control {
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || c.run())
            .context("spawning the control thread")?;
    }
    if let Some(sig) = signals.forever().next() {
        log::info!("signal {sig}: shutting down");
    }
    for s in sockets.iter().map(PathBuf::as_path).chain(control_path) {
        let _ = std::fs::remove_file(s);
    }
    Ok(0)
}
