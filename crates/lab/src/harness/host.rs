//! Host-side scenarios: a scenario written as a Rust function that drives the VM from the host
//! (QMP, the device server's control socket, the device journals) between and around guest
//! commands.
//!
//! A catalogue entry with `program: Program::Host(HOST_PROGRAM)` runs
//! [`HostProgram::run`] with a [`HostCtx`] in a VM of [`HostProgram::profile`]. The function
//! records subtests (`check`, `pass`, `fail`, `skip`, `guest_test`); they become the scenario's
//! nested KTAP, and the scenario's verdict is computed from them exactly as from a guest
//! program's KTAP. Returning `Err` records the error as a failed subtest and ends the scenario;
//! an error that leaves the VM unusable (QEMU gone, agent link dead) also stops the VM's other
//! scenarios. The device journals are checked after the scenario as for every other one: a
//! violation fails it.
//!
//! ```no_run
//! use pcisim_guest_wire::{E1Options, Options};
//! use pcisim_journal::ResetKind;
//! use pcisim_lab::harness::host::{find_record, is_reset_begin, HostCtx, HostError, HostProgram};
//! use pcisim_lab::vm::profile::ProfileId;
//!
//! fn reboot_keeps_gpu(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
//!     let t = ctx.system_reset()?;                      // QMP, then the agent greets again
//!     ctx.pass(&format!("guest back after system_reset in {:.1} s", t.as_secs_f64()));
//!     let records = ctx.journal("gpu0")?;                // what gpu0 journaled since the start
//!     let reset = find_record(&records, |e| is_reset_begin(e, ResetKind::DeviceReset));
//!     ctx.check("reset_begin kind=device journaled", reset.is_some(), "none");
//!     let argv = ctx.guest_argv("gpu0", Options::E1(E1Options::default()))?; // e1 --vendor ... --expect
//!     ctx.guest_test("e1 after the reboot", &argv)?;    // nested KTAP, verdict as a subtest
//!     Ok(())
//! }
//!
//! pub const EXAMPLE: HostProgram = HostProgram {
//!     name: "example",
//!     profile: ProfileId::Gpu,
//!     run: reboot_keeps_gpu,
//! };
//! ```
//!
//! and in the catalogue (`scenarios/mod.rs`): `Scenario { id: "R9", name: "R9 system-reset",
//! timeout: Duration::from_secs(120), program: Program::Host(reset::R9), profile: ProfileId::Gpu,
//! ..Scenario::NO_XFAIL }`.
//! `timeout` is the default for each guest command the function runs. A scenario that needs another machine adds
//! a [`ProfileId`] (and its [`VmProfile`] in `profile.rs`); the suite boots one VM per profile.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, warn};
use pcisim_journal::{Event, Record, ResetKind, ViolationKind};

use crate::guestops::{self, GuestShell, ShellError};
use crate::harness::invocation::invocation;
use crate::harness::ktap::{KtapWriter, Status, TestResult};
use crate::harness::verdict::{evaluate, Verdict};
use crate::vm::agent::{Agent, AgentError, RunOutput};
use crate::vm::control::{ControlClient, ControlError, JournalWatch, Window};
use crate::vm::process::{describe_status, ChildGuard, POLL};
use crate::vm::profile::{ProfileId, VmLayout, VmProfile};
use crate::vm::qemu::QemuError;
use crate::vm::qmp::{PciDeviceInfo, Qmp, QmpError};
use crate::vm::server::{DescribedDevice, Server};

/// How long the guest has to come back after a `system_reset` (a TCG boot takes ~4.5 s).
pub const REBOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long QEMU has to report a `RESET` after `system_reset` returned.
const RESET_EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A host-side scenario: its function and the VM it needs.
#[derive(Clone, Copy)]
pub struct HostProgram {
    /// A short name (for logs).
    pub name: &'static str,
    /// The VM it runs in.
    pub profile: ProfileId,
    /// What it does.
    pub run: fn(&mut HostCtx<'_>) -> Result<(), HostError>,
}

impl std::fmt::Debug for HostProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostProgram")
            .field("name", &self.name)
            .field("profile", &self.profile)
            .finish()
    }
}

/// Host programs are equal when their names and profiles are (function pointers are not
/// compared: their addresses are not meaningful).
impl PartialEq for HostProgram {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.profile == other.profile
    }
}

impl Eq for HostProgram {}

/// Why a host step could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The guest agent link failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// QMP failed or QEMU refused a command.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The device server's control socket failed or refused.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A device description could not be built.
    #[error(transparent)]
    Qemu(#[from] QemuError),
    /// QEMU exited.
    #[error("QEMU exited ({0})")]
    QemuExited(String),
    /// The profile has no such device.
    #[error("The VM has no device {0:?}")]
    NoDevice(String),
    /// A step went wrong in a way the scenario cannot go on from.
    #[error("{0}")]
    Step(String),
    /// The lab was interrupted.
    #[error("Interrupted by signal {0}")]
    Interrupted(i32),
}

impl From<ShellError> for HostError {
    fn from(e: ShellError) -> Self {
        HostError::Step(e.to_string())
    }
}

/// Guest operations ([`crate::guestops`]) run with the scenario's timeout, after checking that
/// QEMU is still there.
impl GuestShell for HostCtx<'_> {
    type Error = HostError;

    fn run_argv(&mut self, argv: &[String]) -> Result<RunOutput, HostError> {
        self.guest(argv)
    }
}

impl HostError {
    /// The signal, if this error means the lab was interrupted.
    pub fn interrupt_signal(&self) -> Option<i32> {
        match self {
            HostError::Agent(AgentError::Interrupted(s))
            | HostError::Qmp(QmpError::Interrupted(s))
            | HostError::Interrupted(s) => Some(*s),
            _ => None,
        }
    }

    /// Whether the VM is unusable after this error (its other scenarios are not run).
    pub fn is_fatal(&self) -> bool {
        match self {
            HostError::Agent(e) => {
                !matches!(e, AgentError::Remote { .. } | AgentError::Malformed { .. })
            }
            HostError::Qmp(e) => e.is_fatal(),
            HostError::QemuExited(_) | HostError::Interrupted(_) => true,
            HostError::Control(_)
            | HostError::Qemu(_)
            | HostError::NoDevice(_)
            | HostError::Step(_) => false,
        }
    }
}

/// A booted lab VM and what surrounds it.
pub struct Vm {
    /// Its profile.
    pub profile: VmProfile,
    /// Its root ports and devices.
    pub layout: VmLayout,
    /// Its directory (logs, sockets).
    pub dir: PathBuf,
    /// The devices as the server describes them, in the profile's order.
    pub devices: Vec<DescribedDevice>,
    /// The device server.
    pub server: Server,
    /// The journal windows.
    pub watch: JournalWatch,
    /// QEMU.
    pub qemu: ChildGuard,
    /// The guest agent.
    pub agent: Agent,
    /// QMP.
    pub qmp: Qmp,
}

impl Vm {
    /// The device with id `id`.
    pub fn device(&self, id: &str) -> Option<&DescribedDevice> {
        self.devices.iter().find(|d| d.id == id)
    }
}

/// One subtest of a host scenario.
#[derive(Debug, Clone)]
struct Sub {
    name: String,
    status: Status,
    reason: Option<String>,
    /// A guest program's KTAP, nested under the subtest.
    nested: Option<String>,
    /// Diagnostics shown before the result line.
    diags: Vec<String>,
}

/// What a host scenario's context knows of its catalogue entry. Built from the entry
/// ([`crate::harness::scenario::Scenario`], which converts itself): the entry names this module's
/// [`HostProgram`], so holding the entry here would make the two modules import each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScenarioRef {
    /// The id (`R9`).
    pub id: &'static str,
    /// The KTAP test name (`R9 system-reset`).
    pub name: &'static str,
    /// The default time each guest command may take.
    pub timeout: Duration,
}

/// What a host scenario works with. See the module documentation.
pub struct HostCtx<'a> {
    vm: &'a mut Vm,
    scenario: ScenarioRef,
    run_dir: &'a Path,
    progress: &'a mut dyn Write,
    subs: Vec<Sub>,
    diags: Vec<String>,
    skip_all: Option<String>,
    /// Per device: the journal position when the scenario started.
    start: Vec<(String, u64)>,
    steps: usize,
    /// Violations the scenario provokes on purpose: (device, kind).
    expected: Vec<(String, ViolationKind)>,
}

impl<'a> HostCtx<'a> {
    /// A context for `scenario` in `vm`; scenario files go to `run_dir`, progress lines to
    /// `progress`.
    pub fn new(
        vm: &'a mut Vm,
        scenario: impl Into<ScenarioRef>,
        run_dir: &'a Path,
        progress: &'a mut dyn Write,
    ) -> HostCtx<'a> {
        let start = vm
            .watch
            .devices()
            .into_iter()
            .map(|d| {
                let mark = vm.watch.mark(&d).unwrap_or(0);
                (d, mark)
            })
            .collect();
        HostCtx {
            vm,
            scenario: scenario.into(),
            run_dir,
            progress,
            subs: Vec::new(),
            diags: Vec::new(),
            skip_all: None,
            start,
            steps: 0,
            expected: Vec::new(),
        }
    }

    // -- the VM -----------------------------------------------------------------------------

    /// The scenario being run.
    pub fn scenario(&self) -> &ScenarioRef {
        &self.scenario
    }

    /// The VM's profile.
    pub fn profile(&self) -> &VmProfile {
        &self.vm.profile
    }

    /// The VM's root ports and devices (QEMU ids, buses, sockets).
    pub fn layout(&self) -> &VmLayout {
        &self.vm.layout
    }

    /// A device as the server describes it.
    pub fn device(&self, id: &str) -> Result<&DescribedDevice, HostError> {
        self.vm
            .device(id)
            .ok_or_else(|| HostError::NoDevice(id.to_string()))
    }

    /// The QMP session (events buffered since the VM booted).
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.vm.qmp
    }

    /// The device server's control socket (status, stats, raw requests).
    pub fn control(&mut self) -> &mut ControlClient {
        self.vm.watch.client()
    }

    /// The VM's directory (console.log, qemu.log, server.log, sockets).
    pub fn vm_dir(&self) -> &Path {
        &self.vm.dir
    }

    /// `Err(QemuExited)` if QEMU is gone.
    pub fn check_qemu(&mut self) -> Result<(), HostError> {
        match self.vm.qemu.try_wait() {
            Ok(Some(status)) => Err(HostError::QemuExited(describe_status(status))),
            Ok(None) => Ok(()),
            Err(e) => Err(HostError::QemuExited(e.to_string())),
        }
    }

    // -- reporting --------------------------------------------------------------------------

    /// A progress line (`lab: R9: text`) on the suite's progress stream.
    pub fn progress(&mut self, text: &str) {
        let line = format!("lab: {}: {text}\n", self.scenario.id);
        if self
            .progress
            .write_all(line.as_bytes())
            .and_then(|_| self.progress.flush())
            .is_err()
        {
            warn!("cannot write progress: {}", line.trim_end());
        }
    }

    /// A diagnostic line in the scenario's KTAP (before the next subtest).
    pub fn diag(&mut self, text: &str) {
        self.diags.push(text.to_string());
    }

    fn push(&mut self, name: &str, status: Status, reason: Option<String>, nested: Option<String>) {
        let diags = std::mem::take(&mut self.diags);
        self.subs.push(Sub {
            name: name.to_string(),
            status,
            reason,
            nested,
            diags,
        });
    }

    /// A passed subtest.
    pub fn pass(&mut self, name: &str) {
        self.push(name, Status::Pass, None, None);
    }

    /// A failed subtest.
    pub fn fail(&mut self, name: &str, reason: &str) {
        self.push(name, Status::Fail, Some(reason.to_string()), None);
    }

    /// A skipped subtest.
    pub fn skip(&mut self, name: &str, reason: &str) {
        self.push(name, Status::Skip, Some(reason.to_string()), None);
    }

    /// Passes `name` if `ok`, else fails it with `why_not`; returns `ok`.
    pub fn check(&mut self, name: &str, ok: bool, why_not: impl AsRef<str>) -> bool {
        if ok {
            self.pass(name);
        } else {
            self.fail(name, why_not.as_ref());
        }
        ok
    }

    /// Records the subtest `name` from `result` (its error is the reason it failed) and returns
    /// `result`: a step that is a check and ends the scenario when it fails.
    pub fn checked<T>(&mut self, name: &str, result: Result<T, HostError>) -> Result<T, HostError> {
        match &result {
            Ok(_) => self.pass(name),
            Err(e) => self.fail(name, &e.to_string()),
        }
        result
    }

    /// Declares at run time that `device` must journal a violation of `kind` during this
    /// scenario, in addition to the catalogue's [`crate::harness::scenario::Scenario::violations`] (which is where a
    /// catalogue scenario declares them, next to its twin; this is for scenario lists built
    /// elsewhere, such as the vfio selftests').
    pub fn expect_violation(&mut self, device: &str, kind: ViolationKind) {
        let v = (device.to_string(), kind);
        if !self.expected.contains(&v) {
            self.expected.push(v);
        }
    }

    /// The violations declared with [`HostCtx::expect_violation`].
    pub fn expected_violations(&self) -> Vec<(String, ViolationKind)> {
        self.expected.clone()
    }

    /// Marks the whole scenario skipped (unless a subtest failed): it cannot run here.
    pub fn skip_all(&mut self, reason: &str) {
        self.skip_all = Some(reason.to_string());
    }

    // -- the guest --------------------------------------------------------------------------

    /// Runs `argv` in the guest with the scenario's timeout.
    pub fn guest(&mut self, argv: &[String]) -> Result<RunOutput, HostError> {
        let timeout = self.scenario.timeout;
        self.guest_timeout(argv, timeout)
    }

    /// Runs `argv` in the guest; the agent kills it after `timeout`.
    pub fn guest_timeout(
        &mut self,
        argv: &[String],
        timeout: Duration,
    ) -> Result<RunOutput, HostError> {
        self.check_qemu()?;
        debug!("{}: guest {argv:?}", self.scenario.id);
        Ok(self.vm.agent.run(argv, timeout)?)
    }

    /// Runs `script` with the guest's busybox `sh -c` and returns its stdout; a non-zero exit
    /// is an error (with its stderr). [`crate::guestops::sh`] on this context.
    pub fn sh(&mut self, script: &str) -> Result<String, HostError> {
        guestops::sh(self, script)
    }

    /// The BDF the guest gave QEMU device `id` (from `query-pci`).
    pub fn bdf_of(&mut self, id: &str) -> Result<String, HostError> {
        self.qmp()
            .query_pci()?
            .iter()
            .find(|p| p.qdev_id == id)
            .map(PciDeviceInfo::bdf)
            .ok_or_else(|| HostError::Step(format!("{id} is not in query-pci")))
    }

    /// `pcisim-guest <program> [--vendor V --device D] options...` for the device `device`
    /// ([`invocation`]: its ids where the program takes them, `--expect` with its
    /// description for `e1`).
    pub fn guest_argv(
        &self,
        device: &str,
        options: impl Into<pcisim_guest_wire::Options>,
    ) -> Result<Vec<String>, HostError> {
        Ok(invocation(options.into(), self.device(device)?).to_argv())
    }

    /// Runs a KTAP guest program as the subtest `name`: its KTAP is nested under it and its
    /// verdict (exit code and KTAP, as for a guest scenario) is the subtest's. Its output is
    /// saved as `RUN/<ID>.<n>.stdout`/`.stderr`.
    pub fn guest_test(&mut self, name: &str, argv: &[String]) -> Result<Verdict, HostError> {
        self.guest_test_output(name, argv)
            .map(|(verdict, _)| verdict)
    }

    /// [`HostCtx::guest_test`] that also returns the program's output (e.g. to read figures
    /// it printed as KTAP diagnostics).
    pub fn guest_test_output(
        &mut self,
        name: &str,
        argv: &[String],
    ) -> Result<(Verdict, RunOutput), HostError> {
        let out = self.guest(argv)?;
        self.steps += 1;
        let base = format!("{}.{}", self.scenario.id, self.steps);
        save(&self.run_dir.join(format!("{base}.stdout")), &out.stdout);
        save(&self.run_dir.join(format!("{base}.stderr")), &out.stderr);
        let (verdict, parsed) = evaluate(&out);
        let nested = parsed.is_ok().then(|| out.stdout.clone());
        if parsed.is_err() && !out.stdout.trim().is_empty() {
            self.diags.extend(out.stdout.lines().map(str::to_string));
        }
        if verdict != Verdict::Pass && !out.stderr.trim().is_empty() {
            self.diags.push(format!("{name}: stderr (last lines):"));
            let lines: Vec<&str> = out
                .stderr
                .lines()
                .filter(|l| !l.trim().is_empty())
                .collect();
            self.diags.extend(
                lines[lines.len().saturating_sub(10)..]
                    .iter()
                    .map(|l| l.to_string()),
            );
        }
        let (status, reason) = match &verdict {
            Verdict::Pass => (Status::Pass, None),
            Verdict::Fail(r) => (Status::Fail, Some(r.clone())),
            Verdict::Skip(r) => (Status::Skip, Some(r.clone())),
        };
        self.push(name, status, reason, nested);
        Ok((verdict, out))
    }

    // -- host actions -----------------------------------------------------------------------

    /// QMP `system_reset` and waits until the guest agent greets again; returns the time from
    /// the command to the greeting.
    ///
    /// The lab runs QEMU with `-no-reboot`, which turns `system_reset` into a shutdown, so the
    /// reboot action is switched to `reset` first (QMP `set-action`) and back to `shutdown` once
    /// the guest is up (not earlier: SeaBIOS resets the machine once more right after a warm
    /// reset, ~50 ms later, which would then stop QEMU).
    pub fn system_reset(&mut self) -> Result<Duration, HostError> {
        self.check_qemu()?;
        self.vm.qmp.set_reboot_action("reset")?;
        let mark = self.vm.qmp.event_mark();
        let t = Instant::now();
        self.vm.qmp.system_reset()?;
        self.vm.qmp.wait_event_since(
            mark,
            "RESET",
            |e| e.data.get("guest") == Some(&serde_json::Value::Bool(false)),
            RESET_EVENT_TIMEOUT,
        )?;
        let Vm { agent, qemu, .. } = &mut *self.vm;
        let mut watch = || {
            qemu.try_wait()
                .ok()
                .flatten()
                .map(|s| format!("QEMU exited ({})", describe_status(s)))
        };
        let ready = agent.wait_ready(REBOOT_TIMEOUT, &mut watch)?;
        let took = t.elapsed();
        self.vm.qmp.set_reboot_action("shutdown")?;
        self.progress(&format!(
            "system_reset: agent ready again in {:.1} s (guest uptime {:.1} s)",
            took.as_secs_f64(),
            ready.uptime_ms as f64 / 1000.0
        ));
        Ok(took)
    }

    /// QMP `device_del id` and waits up to `timeout` for `DEVICE_DELETED`; returns how long it
    /// took.
    pub fn device_del(&mut self, id: &str, timeout: Duration) -> Result<Duration, HostError> {
        self.check_qemu()?;
        let t = Instant::now();
        self.vm.qmp.device_del(id, timeout)?;
        Ok(t.elapsed())
    }

    /// QMP `device_add` of the profile's device `id` (its JSON from the layout: socket, root
    /// port, function).
    pub fn device_add(&mut self, id: &str) -> Result<(), HostError> {
        self.check_qemu()?;
        let json = self
            .vm
            .layout
            .device(id)
            .ok_or_else(|| HostError::NoDevice(id.to_string()))?
            .json()?;
        Ok(self.vm.qmp.device_add(&json)?)
    }

    /// Injects `fault` into `device` through the control socket (`pcisim ctl inject`).
    pub fn inject(&mut self, device: &str, fault: &str) -> Result<(), HostError> {
        Ok(self.vm.watch.client().inject(device, fault)?)
    }

    /// Every record `device` journaled since the scenario started, oldest first. An
    /// incomplete window (records lost from the ring, the checker degraded) is an error
    /// ([`ControlError::Incomplete`]): the scenario fails rather than judge a window with holes.
    pub fn journal(&mut self, device: &str) -> Result<Vec<Record>, HostError> {
        let after = self
            .start
            .iter()
            .find(|(d, _)| d == device)
            .map(|(_, m)| *m)
            .ok_or_else(|| HostError::NoDevice(device.to_string()))?;
        Ok(self.window(device, after)?.records)
    }

    /// The complete journal window of `device` after `after` (a sequence number from
    /// [`ControlClient::last_seq`] or an earlier window's `next_after`); an incomplete one is
    /// an error, as for [`HostCtx::journal`].
    pub fn window(&mut self, device: &str, after: u64) -> Result<Window, HostError> {
        Ok(self.vm.watch.client().window(device, after)?)
    }

    /// Waits up to `timeout` for a record of `device` (since the scenario started) for which
    /// `pred` holds; `None` if none came.
    pub fn wait_journal(
        &mut self,
        device: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Record) -> bool,
    ) -> Result<Option<Record>, HostError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.journal(device)?.into_iter().find(|r| pred(r)) {
                return Ok(Some(r));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            if let Some(s) = crate::vm::process::interrupted() {
                return Err(HostError::Interrupted(s));
            }
            thread::sleep(POLL.max(Duration::from_millis(50)));
        }
    }

    // -- the result -------------------------------------------------------------------------

    /// Ends the scenario: `result` is what its function returned. Returns the guest-style
    /// output (KTAP on stdout, kselftest exit code) to judge, and whether the VM is unusable
    /// (with why).
    pub fn finish(mut self, result: Result<(), HostError>) -> (RunOutput, Option<String>) {
        let mut broken = None;
        if let Err(e) = result {
            let text = crate::error::error_chain(&e);
            if e.is_fatal() {
                broken = Some(format!("not run: the VM is unusable ({text})"));
            }
            self.fail("host step", &text);
        } else if !self.diags.is_empty() {
            // Trailing diagnostics go with a last informational subtest.
            self.pass("done");
        }
        if self.subs.is_empty() && self.skip_all.is_none() {
            self.fail("result", "the scenario recorded no subtest");
        }
        (render(&self.subs, self.skip_all.as_deref()), broken)
    }
}

/// The guest-style output of a host scenario: its subtests as KTAP, exit 1 if any failed, else 4
/// (`1..0 # SKIP reason`) if it skipped itself, else 0.
fn render(subs: &[Sub], skip_all: Option<&str>) -> RunOutput {
    let failed = subs.iter().any(|s| s.status == Status::Fail);
    let mut text = Vec::new();
    {
        let mut k = KtapWriter::new(&mut text);
        let written = (|| -> std::io::Result<()> {
            k.header(subs.len())?;
            for (i, s) in subs.iter().enumerate() {
                if let Some(n) = &s.nested {
                    k.nested().document(n)?;
                }
                for d in &s.diags {
                    k.diagnostic(d)?;
                }
                k.result(&TestResult {
                    number: i + 1,
                    name: s.name.clone(),
                    status: s.status.clone(),
                    reason: s.reason.clone(),
                })?;
            }
            Ok(())
        })();
        if let Err(e) = written {
            warn!("cannot build the host scenario's KTAP: {e}");
        }
    }
    let mut stdout = String::from_utf8_lossy(&text).into_owned();
    let exit = match skip_all {
        _ if failed => 1,
        Some(why) => {
            // A whole-scenario skip reads `1..0 # SKIP reason`; the subtests done before it are
            // not reported.
            stdout = format!("KTAP version 1\n1..0 # SKIP {why}\n");
            4
        }
        None => 0,
    };
    RunOutput {
        exit: Some(exit),
        stdout,
        ..RunOutput::default()
    }
}

fn save(path: &Path, text: &str) {
    if let Err(e) = fs::write(path, text) {
        warn!("cannot write {}: {e}", path.display());
    }
}

/// The first record whose event `pred` accepts.
pub fn find_record(records: &[Record], pred: impl Fn(&Event) -> bool) -> Option<&Record> {
    records.iter().find(|r| pred(&r.event))
}

/// How many records have an event `pred` accepts.
pub fn count_records(records: &[Record], pred: impl Fn(&Event) -> bool) -> usize {
    records.iter().filter(|r| pred(&r.event)).count()
}

/// A reset of `kind` began.
pub fn is_reset_begin(e: &Event, kind: ResetKind) -> bool {
    matches!(e, Event::ResetBegin { kind: k } if *k == kind)
}

/// The reset kinds journaled in `records` (one per `reset_begin`), and whether every reset
/// ended with a `reset_end` of its kind before the next began.
pub fn reset_kinds(records: &[Record]) -> (Vec<ResetKind>, bool) {
    let mut kinds = Vec::new();
    let mut open: Option<ResetKind> = None;
    let mut paired = true;
    for r in records {
        match r.event {
            Event::ResetBegin { kind } => {
                if open.is_some() {
                    paired = false;
                }
                kinds.push(kind);
                open = Some(kind);
            }
            Event::ResetEnd { kind } => {
                if open != Some(kind) {
                    paired = false;
                }
                open = None;
            }
            _ => {}
        }
    }
    (kinds, paired && open.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::scenario;

    #[test]
    fn test_find_and_count_records() {
        let rec = |seq, event| Record {
            seq,
            t_ns: seq,
            event,
        };
        let recs = vec![
            rec(
                1,
                Event::ResetBegin {
                    kind: ResetKind::Flr,
                },
            ),
            rec(
                2,
                Event::ResetBegin {
                    kind: ResetKind::DeviceReset,
                },
            ),
            rec(
                3,
                Event::ResetEnd {
                    kind: ResetKind::DeviceReset,
                },
            ),
            rec(
                4,
                Event::ResetBegin {
                    kind: ResetKind::DeviceReset,
                },
            ),
        ];
        assert_eq!(
            find_record(&recs, |e| is_reset_begin(e, ResetKind::DeviceReset)).map(|r| r.seq),
            Some(2)
        );
        assert_eq!(
            count_records(&recs, |e| is_reset_begin(e, ResetKind::DeviceReset)),
            2
        );
        assert_eq!(
            count_records(&recs, |e| matches!(e, Event::ResetBegin { .. })),
            3
        );
        assert!(find_record(&recs, |e| matches!(
            e,
            Event::ResetEnd {
                kind: ResetKind::PmSoftReset
            }
        ))
        .is_none());
    }

    #[test]
    fn test_host_program_equality_ignores_the_function() {
        fn a(_: &mut HostCtx<'_>) -> Result<(), HostError> {
            Ok(())
        }
        fn b(_: &mut HostCtx<'_>) -> Result<(), HostError> {
            Err(HostError::Step("b".into()))
        }
        let x = HostProgram {
            name: "x",
            profile: ProfileId::Gpu,
            run: a,
        };
        assert_eq!(x, HostProgram { run: b, ..x });
        assert_ne!(
            x,
            HostProgram {
                profile: ProfileId::GpuNpu,
                ..x
            }
        );
        assert!(format!("{x:?}").contains("\"x\""));
    }

    fn sub(name: &str, status: Status, reason: Option<&str>) -> Sub {
        Sub {
            name: name.into(),
            status,
            reason: reason.map(str::to_string),
            nested: None,
            diags: Vec::new(),
        }
    }

    #[test]
    fn test_render_nests_guest_ktap_and_judges_like_a_guest_program() {
        let mut e1 = sub("e1 after the reboot", Status::Pass, None);
        e1.nested = Some("KTAP version 1\n1..1\nok 1 ids\n".into());
        e1.diags = vec!["2 device resets".into()];
        let subs = vec![sub("agent ready", Status::Pass, None), e1];
        let out = render(&subs, None);
        assert_eq!(out.exit, Some(0));
        assert_eq!(
            out.stdout,
            "KTAP version 1\n1..2\nok 1 agent ready\n  KTAP version 1\n  1..1\n  ok 1 ids\n\
             # 2 device resets\nok 2 e1 after the reboot\n"
        );
        assert_eq!(scenario::evaluate(&out).0, Verdict::Pass);

        let mut failing = subs.clone();
        failing.push(sub("reset journaled", Status::Fail, Some("none")));
        let out = render(&failing, Some("ignored: a failure wins"));
        assert_eq!(out.exit, Some(1));
        assert_eq!(
            scenario::evaluate(&out).0,
            Verdict::Fail("1 of 3 subtests failed: reset journaled (none)".into())
        );

        let out = render(&subs, Some("no NPU in this build"));
        assert_eq!(out.exit, Some(4));
        assert_eq!(
            scenario::evaluate(&out).0,
            Verdict::Skip("no NPU in this build".into())
        );
    }

    #[test]
    fn test_fatal_errors() {
        assert!(HostError::QemuExited("exit 0".into()).is_fatal());
        assert!(HostError::Agent(AgentError::Closed("x".into())).is_fatal());
        assert!(HostError::Agent(AgentError::Rebooted("x".into())).is_fatal());
        assert!(!HostError::Agent(AgentError::Remote {
            op: "run".into(),
            message: "no".into()
        })
        .is_fatal());
        assert!(HostError::Qmp(QmpError::Closed("x".into())).is_fatal());
        assert!(!HostError::Qmp(QmpError::Command {
            command: "device_del".into(),
            class: "GenericError".into(),
            desc: "no".into()
        })
        .is_fatal());
        assert!(!HostError::Step("x".into()).is_fatal());
    }
}
