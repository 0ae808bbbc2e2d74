//! The pcisim lab: boots a real Linux guest under QEMU with pcisim's devices attached, runs the
//! guest-side scenario programs through an agent on the guest's second serial port, and reports
//! KTAP.
//!
//! The entry point is [`run_suite`] (behind `pcisim lab suite`):
//!
//! ```no_run
//! use pcisim_lab::{run_suite, SuiteOptions};
//!
//! let mut opts = SuiteOptions::new("target/debug/pcisim");
//! opts.filter = Some("E1".into());
//! let result = run_suite(&opts, &mut std::io::stdout(), &mut std::io::stderr());
//! // 0 all passed, 1 a failure, 2 infrastructure, 4 not everything ran (skips, unless
//! // `opts.allow_skip`).
//! std::process::exit(pcisim_lab::harness::suite::exit_code(&result, opts.allow_skip));
//! ```
//!
//! The building blocks are public for other lab commands and tests, in layers (each uses only
//! the ones below it; docs/architecture.md has the tree and how to add a scenario):
//! [`scenarios`] (the catalogue as data, and the scenarios' bodies) → [`harness`] (what a
//! scenario is, [`harness::host::HostCtx`], KTAP, the guest kernel's log as a second oracle, the
//! suite runner and its judges) → [`guestops`] (the one checked guest shell, sysfs waits, vfio
//! binding, driver loading) → [`vm`] (provisioning, guest and module builds, the initramfs, the
//! device server and its control socket, QEMU, QMP, the agent, processes and signals, VM
//! profiles, and [`vm::boot`], the one boot sequence). [`manual`] is `pcisim lab up`/`plug`/
//! `unplug`/`exec`/`console`/`status`/`down` (a VM left running for manual experiments),
//! [`kernel`] the guest kernel choice and its config check, [`kselftest`] the kernel's vfio
//! selftests as scenarios. Guest program names and invocations are typed
//! ([`pcisim_guest_wire`]).
//!
//! # Environment
//!
//! | variable | effect |
//! |---|---|
//! | `PCISIM_SCRIPTS` | the `qemu-scripts` directory (default: the repository's) |
//! | `PCISIM_CACHE` | where `provision.sh` keeps QEMU, the guest kernel and busybox (default `~/.cache/pcisim`) |
//! | `PCISIM_GUEST_BIN` | a prebuilt static `pcisim-guest` instead of building `guest-tests/` |
//! | `PCISIM_KMOD_SRC` | another guest kernel module source directory instead of `guest-tests/kmod/` |
//! | `XDG_RUNTIME_DIR` | where run directories go (else `/tmp`) |
//! | `RUST_LOG` | passed to the device server (default `info`; its log is `server.log`) |
//!
//! # The run directory
//!
//! Every run gets `pcisim-lab-<pid>-<nonce>/`, kept when anything failed (its path is printed):
//! `provision.log`, `guest-build.log`, `kmod-build.log`, `initramfs.cpio`, per scenario `<ID>.stdout`/`<ID>.stderr`
//! and `<ID>.journal.jsonl` (what the devices journaled during the scenario, one JSON record a
//! line; a host scenario's guest steps add `<ID>.<n>.stdout`/`.stderr`; the SVA kill cases add
//! `<ID>.timeline.svg`, see [`harness::timeline`]), `<ID>.dmesg` (the guest kernel's log during the
//! scenario, see [`harness::dmesg`]), and one directory per
//! VM, named after its profile (`gpu/`, `gpu-npu/`): `console.log` (the guest's ttyS0),
//! `qemu.log` (QEMU's stderr), `qemu-cmdline.sh`, `qmp.log` (the QMP transcript), `server.log`,
//! `describe.log`, `agent.log` (the agent link, `>` sent, `<` received), `boot.dmesg` (the
//! guest kernel's boot log), `boot.journal.jsonl`,
//! `teardown.journal.jsonl` and the sockets (`control.sock` is the server's control socket,
//! `<device>.sock` the devices', `qmp.sock` QEMU's QMP).

pub mod error;
pub mod guestops;
pub mod harness;
pub mod kernel;
pub mod kselftest;
pub mod manual;
pub mod output;
pub mod scenarios;
pub mod vm;

pub use error::LabError;
pub use harness::suite::SuiteOptions;
pub use scenarios::{catalogue, run_suite, select};
