//! `pcisim lab suite`: provision, build, boot, run the selected scenarios, report KTAP.
//!
//! ```text
//! run dir ($XDG_RUNTIME_DIR or /tmp)/pcisim-lab-<pid>-<nonce>/
//!   provision.log guest-build.log kmod-build.log initramfs.cpio
//!   E1.stdout E1.stderr E1.journal.jsonl E1.dmesg ... R9.1.stdout (a host scenario's guest steps) ...
//!   <profile>/   one directory per VM (`gpu/`, `gpu-npu/`):
//!     server.log describe.log <device>.sock control.sock agent.sock qmp.sock qmp.log
//!     console.log qemu.log qemu-cmdline.sh agent.log boot.journal.jsonl boot.dmesg
//!     teardown.journal.jsonl
//!
//! provision.sh ─► cargo build guest-tests ─► guest kernel modules (guest-tests/kmod) ─► initramfs
//!   ─► for each VM profile the selected scenarios need (in order of first need):
//!        pcisim serve (--device per device, control.sock) ─► describe
//!        ─► listen agent.sock ─► QEMU (connects agent.sock, attaches the devices) ─► agent ready
//!        ─► QMP connected ─► journal check "boot" ─► kernel log of the boot (boot.dmesg)
//!        ─► for each of its scenarios (catalogue order):
//!             a guest program: agent run pcisim-guest <sub> ... ─► KTAP (nested) + verdict
//!             a host program: its function drives QMP/control/agent (crate::harness::host) ─► its subtests
//!             ─► journal check: the devices' records since the previous check
//!                ─► <ID>.journal.jsonl; any violation makes the scenario `not ok`
//!             ─► kernel log check: the guest's kmsg records since the previous read
//!                ─► <ID>.dmesg; any kernel report makes it `not ok` unless declared (crate::harness::dmesg)
//!        ─► agent poweroff ─► QEMU exits ─► journal check "teardown" ─► journal summary per device
//!        ─► SIGTERM server ─► clean exit, no panic in its log
//! ```
//!
//! The KTAP numbers follow the order the scenarios run in (VM by VM), continuously across VMs.
//! Journal windows are contiguous: each check reads from where the previous one ended, so a
//! violation is always attributed to the boot, a scenario or the teardown. A violation during
//! the boot or the teardown is reported as a top-level KTAP diagnostic and fails the run. A
//! scenario that leaves its VM unusable fails the VM's remaining scenarios; a VM that cannot be
//! started stops the run (what did not run is `not ok`).
//!
//! The run directory is removed after a fully successful run (unless `keep`), and kept, with its
//! path printed, otherwise.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, warn};

use crate::error::{error_chain, LabError};
use crate::harness::dmesg;
use crate::harness::host::{HostCtx, HostError, Vm};
use crate::harness::ktap::{KtapWriter, Status, TestResult};
use crate::harness::scenario::{self, Program, Scenario, Verdict};
use crate::vm::agent::{Agent, AgentError, KmsgMark, RunOutput};
use crate::vm::boot::{self, secs, tail_lines, Prepared};
use crate::vm::control::{JournalWatch, WindowReport};
use crate::vm::process::{describe_status, InterruptGuard};
use crate::vm::profile::{ProfileId, VmProfile};
use crate::vm::provision;
use crate::vm::server::{self, ServerError};
use pcisim_journal::ViolationKind;

pub mod jobs;
mod judge;
mod latency;
mod report;
mod rundir;
pub mod select;
mod vm_run;
use self::judge::*;
use self::report::*;
pub use self::rundir::*;
pub use self::select::{list_lines, selection, Shard};
use self::vm_run::*;

pub use crate::vm::boot::{AGENT_PORT, BOOT_TIMEOUT, CONNECT_TIMEOUT, POWEROFF_TIMEOUT};
/// The initramfs appender, where the vfio selftests' tests reach it.
pub use crate::vm::initramfs::append_archives;

/// What `pcisim lab suite` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuiteOptions {
    /// The `pcisim` binary (serves and describes the devices).
    pub pcisim_exe: PathBuf,
    /// Run only scenarios whose name contains this.
    pub filter: Option<String>,
    /// The guest kernel: a Debian series (`6.12`, `7.3`), a user's image or built tree.
    pub kernel: crate::kernel::KernelSource,
    /// Extra `k=v` options appended to the GPU device spec (e.g. a fault knob).
    pub device_opts: Vec<String>,
    /// Keep the run directory even after a successful run.
    pub keep: bool,
    /// Accept skipped scenarios: the run succeeds if every scenario that ran passed (and at
    /// least one ran). Without it a skip makes the run fail with [`EXIT_NOT_ALL_RAN`].
    pub allow_skip: bool,
    /// `--memory`, `--smp`, `--append`, `--qemu-arg`, `--gdb`, `--share` for every VM.
    pub vm: crate::vm::qemu::VmOptions,
    /// newc archives appended to the initramfs (the kernel unpacks concatenated archives):
    /// files a command adds to the guest (`lab kselftest`: the selftest binaries).
    pub extra_initramfs: Vec<PathBuf>,
    /// `--shard K/N`: run only the K-th of N cost-balanced parts of the selection
    /// ([`select::partition`]).
    pub shard: Option<Shard>,
    /// `--junit FILE`: also write the verdicts as JUnit XML ([`crate::harness::junit`]).
    pub junit: Option<PathBuf>,
    /// `--jobs N`: how many VMs run at the same time (`None`: [`jobs::default_jobs`], from the
    /// cores and the available memory).
    pub jobs: Option<usize>,
}

impl SuiteOptions {
    /// Defaults: every scenario, kernel 6.12, no extra device options, run dir removed on
    /// success, skips not accepted.
    pub fn new(pcisim_exe: impl Into<PathBuf>) -> Self {
        SuiteOptions {
            pcisim_exe: pcisim_exe.into(),
            filter: None,
            kernel: crate::kernel::KernelSource::default(),
            device_opts: Vec::new(),
            keep: false,
            allow_skip: false,
            vm: Default::default(),
            extra_initramfs: Vec::new(),
            shard: None,
            junit: None,
            jobs: None,
        }
    }
}

/// Exit code: every selected scenario passed (design.md §6).
pub const EXIT_PASS: i32 = 0;
/// Exit code: a scenario failed, or the boot/teardown journal windows or a server's exit were
/// not clean.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: the run could not be carried out (provisioning, build, boot, a broken VM).
pub const EXIT_INFRA: i32 = 2;
/// Exit code: not everything ran: the filter selected nothing, every scenario was skipped, or
/// (without `--allow-skip`) some were skipped and none failed.
pub const EXIT_NOT_ALL_RAN: i32 = 4;
/// Exit code when stdout or stderr lost its reader (128 + SIGPIPE, as if killed by it).
pub const EXIT_BROKEN_PIPE: i32 = 128 + libc::SIGPIPE;

/// What a suite run came to: the scenarios' verdicts and whether everything around them was
/// clean. [`SuiteOutcome::exit_code`] turns it into the command's exit code.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SuiteOutcome {
    /// Scenarios that passed (an expected failure that was journaled as expected included).
    pub passed: usize,
    /// Scenarios that failed (or did not run because their VM broke).
    pub failed: usize,
    /// Scenarios that were skipped.
    pub skipped: usize,
    /// Scenarios that skipped because this kernel lacks the feature they declare they need
    /// ([`Scenario::requires`]; M8c without lockdep): shown, not counted as an incomplete run.
    pub not_applicable: usize,
    /// Subtests reported skipped inside scenarios that passed (not-applicable steps a
    /// scenario chose, e.g. `--dirty off`): counted and shown, the scenario's verdict stands.
    pub skipped_subtests: usize,
    /// The boot and teardown journal windows were read and clean, and every device server
    /// exited cleanly.
    pub outside_clean: bool,
}

impl SuiteOutcome {
    /// The exit code (the `EXIT_*` constants): 1 if anything failed, else 4 if nothing
    /// passed or (unless `allow_skip`) anything was skipped, else 0.
    pub fn exit_code(&self, allow_skip: bool) -> i32 {
        if self.failed > 0 || !self.outside_clean {
            EXIT_FAILED
        } else if self.passed == 0 || (self.skipped > 0 && !allow_skip) {
            EXIT_NOT_ALL_RAN
        } else {
            EXIT_PASS
        }
    }
}

/// The exit code of a whole `lab suite` command: the outcome's, or for an error 4 (the
/// filter selected nothing), 128 + the signal (interrupted), [`EXIT_BROKEN_PIPE`] (the report's
/// reader went away) or 2 (infrastructure).
pub fn exit_code(result: &Result<SuiteOutcome, LabError>, allow_skip: bool) -> i32 {
    match result {
        Ok(o) => o.exit_code(allow_skip),
        Err(e) => match e.interrupt_signal() {
            Some(s) => 128 + s,
            None => match e {
                LabError::NoScenario(_) => EXIT_NOT_ALL_RAN,
                LabError::Output(io) if crate::output::is_broken_pipe(io) => EXIT_BROKEN_PIPE,
                _ => EXIT_INFRA,
            },
        },
    }
}

/// Runs `scenarios` ([`crate::scenarios::run_suite`] gives it the catalogue's) (`opts.filter` still
/// applies): scenarios that are not in the catalogue, such as a catalogue entry with other
/// declarations (the lab's own tests use it).
pub fn run_scenarios(
    opts: &SuiteOptions,
    scenarios: Vec<Scenario>,
    ktap_out: &mut dyn Write,
    progress: &mut dyn Write,
) -> Result<SuiteOutcome, LabError> {
    let started = Instant::now();
    let signals = InterruptGuard::install().map_err(LabError::Signals)?;
    let selected = selection(opts, scenarios);
    if selected.is_empty() {
        let what = match (&opts.filter, opts.shard) {
            (f, Some(k)) => format!("{} (shard {k})", f.clone().unwrap_or_default()),
            (f, None) => f.clone().unwrap_or_default(),
        };
        if let Some(path) = &opts.junit {
            write_junit(
                opts,
                path,
                Vec::new(),
                Vec::new(),
                started,
                EXIT_NOT_ALL_RAN,
                progress,
            )?;
        }
        return Err(LabError::NoScenario(what));
    }
    // One VM per distinct profile, in order of first need; the KTAP numbers follow the order
    // the scenarios run in.
    let plan = plan_vms(&selected);
    let scenarios: Vec<Scenario> = plan.iter().flat_map(|(_, g)| g.iter().cloned()).collect();
    let mut run = RunDir::create()?;
    let mut report = Report::new(ktap_out, progress);
    report
        .ktap
        .header(scenarios.len())
        .map_err(LabError::Output)?;
    report.line(&format!("run directory {}", run.path().display()))?;

    let result = run_in(opts, &run, &plan, &mut report);
    let result = match result {
        Err(e) => Err(match e.interrupt_signal() {
            Some(s) => LabError::Interrupted(s),
            None => e,
        }),
        ok => ok,
    };
    if let Err(e) = &result {
        // Keep the KTAP stream complete: what did not run is `not ok`.
        let reason = match e {
            LabError::Interrupted(s) => format!("not run: interrupted by signal {s}"),
            e => format!("not run: {}", error_chain(e)),
        };
        for s in scenarios.iter().skip(report.next - 1) {
            report.scenario(
                s,
                &Verdict::Fail(reason.clone()),
                &Nested::None,
                &[],
                Duration::ZERO,
            )?;
        }
    }
    let result = result.map(|outside_clean| SuiteOutcome {
        passed: report.passed,
        failed: report.failed,
        skipped: report.skipped,
        not_applicable: report.not_applicable,
        skipped_subtests: report.skipped_subtests,
        outside_clean,
    });
    if let Some(l) = latency::run_line(&report.replies) {
        report.line(&l)?;
    }
    report.line(&format!(
        "total {:.1} s: {} passed, {} failed, {} skipped{}{}",
        started.elapsed().as_secs_f64(),
        report.passed,
        report.failed,
        report.skipped,
        match report.not_applicable {
            0 => String::new(),
            n => format!(" ({n} not applicable to this kernel: it lacks a feature they need)"),
        },
        match report.skipped_subtests {
            0 => String::new(),
            n => format!(" ({n} subtest(s) skipped inside passing scenarios)"),
        }
    ))?;
    let code = exit_code(&result, opts.allow_skip);
    if let Ok(o) = &result {
        if code == EXIT_NOT_ALL_RAN {
            report.line(&if o.passed == 0 {
                format!("exit {code}: no scenario ran to a pass")
            } else {
                format!(
                    "exit {code}: {} scenario(s) skipped (--allow-skip accepts skips)",
                    o.skipped
                )
            })?;
        }
    }
    if let Some(path) = &opts.junit {
        let (cases, outside) = (report.cases.clone(), report.outside.clone());
        write_junit(opts, path, cases, outside, started, code, report.progress)?;
    }
    if code == EXIT_PASS && !opts.keep {
        run.set_remove(true);
    } else {
        report.line(&format!("kept run directory {}", run.path().display()))?;
    }
    drop(signals);
    result
}

/// Writes `--junit`'s file from what `report` recorded; says where on `progress`. A file that
/// cannot be written is an infrastructure error (CI would otherwise lose the report silently).
fn write_junit(
    opts: &SuiteOptions,
    path: &Path,
    cases: Vec<crate::harness::junit::Case>,
    outside: Vec<String>,
    started: Instant,
    code: i32,
    progress: &mut dyn Write,
) -> Result<(), LabError> {
    let mut properties = vec![
        ("kernel".to_string(), opts.kernel.describe()),
        ("exit_code".to_string(), code.to_string()),
    ];
    if let Some(f) = &opts.filter {
        properties.push(("filter".into(), f.clone()));
    }
    if let Some(k) = opts.shard {
        properties.push(("shard".into(), k.to_string()));
    }
    let run = crate::harness::junit::Run {
        cases,
        time: started.elapsed(),
        properties,
        outside,
    };
    run.write("pcisim lab suite", path)
        .map_err(|source| LabError::Junit {
            path: path.to_path_buf(),
            source,
        })?;
    writeln!(progress, "lab: JUnit report {}", path.display())
        .and_then(|_| progress.flush())
        .map_err(LabError::Output)
}

/// Groups `scenarios` by the profile they need: one group per distinct profile, in the order
/// each profile is first needed, each group in catalogue order.
pub fn plan_vms(scenarios: &[Scenario]) -> Vec<(ProfileId, Vec<Scenario>)> {
    let mut plan: Vec<(ProfileId, Vec<Scenario>)> = Vec::new();
    for s in scenarios {
        let id = s.profile();
        match plan.iter_mut().find(|(p, _)| *p == id) {
            Some((_, group)) => group.push(s.clone()),
            None => plan.push((id, vec![s.clone()])),
        }
    }
    plan
}

fn run_in(
    opts: &SuiteOptions,
    run: &RunDir,
    plan: &[(ProfileId, Vec<Scenario>)],
    report: &mut Report<'_>,
) -> Result<bool, LabError> {
    let profiles: Vec<_> = plan.iter().map(|(id, _)| id.profile()).collect();
    let Prepared { env, initrd, .. } = boot::prepare(
        &opts.kernel,
        &profiles,
        &opts.extra_initramfs,
        run.path(),
        &mut |l| report.line(l),
    )?;

    // 5. One VM per profile, in the order the scenarios need them (several at a time: the KTAP
    // still comes in this order).
    let jobs = opts
        .jobs
        .unwrap_or_else(|| jobs::default_jobs(opts, plan))
        .clamp(1, plan.len().max(1));
    if jobs > 1 {
        return jobs::run_concurrently(opts, &env, &initrd.path, plan, run, jobs, report);
    }
    let mut ok = true;
    for (i, (id, group)) in plan.iter().enumerate() {
        let profile = id.profile();
        if plan.len() > 1 {
            let names: Vec<&str> = group.iter().map(|s| s.id).collect();
            report.line(&format!(
                "VM {}/{}: profile {} for {}",
                i + 1,
                plan.len(),
                profile.name,
                names.join(" ")
            ))?;
        }
        ok &= run_vm(opts, &env, &initrd.path, &profile, group, run, report)?;
    }
    Ok(ok)
}

fn save(path: PathBuf, text: &str) {
    if let Err(e) = fs::write(&path, text) {
        warn!("cannot write {}: {e}", path.display());
    }
}

/// The last `n` non-empty lines of `text`.
fn last_lines(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

fn run_scenario(
    s: &Scenario,
    vm: &mut Vm,
    kmsg: &mut Option<KmsgMark>,
    broken: &mut Option<String>,
    run: &RunDir,
    report: &mut Report<'_>,
) -> Result<(), LabError> {
    if let Some(why) = broken.clone() {
        return report.scenario(s, &Verdict::Fail(why), &Nested::None, &[], Duration::ZERO);
    }
    // Where the scenario's kernel log slice starts (after a failed read: a fresh position).
    let kmsg_start = match kmsg {
        Some(_) => Ok(()),
        None => dmesg::mark(&mut vm.agent)
            .map(|m| *kmsg = Some(m))
            .map_err(|e| e.to_string()),
    };
    let t = Instant::now();
    let mut diagnostics = Vec::new();
    let mut expected: Vec<(String, ViolationKind)> = s
        .violations
        .iter()
        .map(|(device, kind)| (device.to_string(), *kind))
        .collect();
    let (mut verdict, nested) = match s.program {
        Program::Host(host) => {
            debug!("{}: host program {}", s.name, host.name);
            let (out, fatal) = {
                let mut ctx = HostCtx::new(vm, s, run.path(), &mut *report.progress);
                let result = (host.run)(&mut ctx);
                if let Some(sig) = result.as_ref().err().and_then(HostError::interrupt_signal) {
                    return Err(LabError::Interrupted(sig));
                }
                for v in ctx.expected_violations() {
                    if !expected.contains(&v) {
                        expected.push(v);
                    }
                }
                ctx.finish(result)
            };
            if let Some(why) = fatal {
                *broken = Some(why);
            }
            judge(s, &out, run, &mut diagnostics)
        }
        _ => {
            let device = vm
                .devices
                .first()
                .ok_or_else(|| ServerError::BadDescription("the VM has no device".into()))?;
            let argv = s.argv(device);
            debug!("{}: {argv:?}", s.name);
            match vm.agent.run(&argv, s.timeout) {
                Ok(out) => judge(s, &out, run, &mut diagnostics),
                Err(AgentError::Interrupted(sig)) => return Err(LabError::Interrupted(sig)),
                Err(e) => {
                    *broken = Some(format!("not run: the VM is unusable ({e})"));
                    (Verdict::Fail(format!("agent: {e}")), Nested::None)
                }
            }
        }
    };
    let elapsed = t.elapsed();
    let mut xfail = None;
    if let Some(status) = vm.server.exited() {
        let why = format!("device server died ({status})");
        verdict = Verdict::Fail(why.clone());
        for l in tail_lines(&vm.dir.join("server.log"), 10) {
            diagnostics.push(format!("server.log: {l}"));
        }
        *broken = Some(format!("not run: {why}"));
    } else {
        let journal = run.join(&format!("{}.journal.jsonl", s.id));
        let window = vm.watch.check(Some(&journal));
        (verdict, xfail) = if expected.is_empty() {
            (judge_journal(verdict, window, &mut diagnostics), None)
        } else {
            judge_expected(verdict, window, &expected, &mut diagnostics)
        };
    }
    // The guest kernel's log of the scenario (not read when the VM is unusable).
    let kernel_xfail = if broken.is_some() {
        *kmsg = None;
        diagnostics.push("kernel log not read: the VM is unusable".into());
        None
    } else {
        let (v, note) = judge_kernel(
            s,
            &mut vm.agent,
            kmsg,
            kmsg_start,
            &run.join(&format!("{}.dmesg", s.id)),
            verdict,
            &mut diagnostics,
        );
        verdict = v;
        note
    };
    let xfail = xfail_note(&verdict, xfail, kernel_xfail);
    report.scenario_noted(s, &verdict, &nested, &diagnostics, elapsed, xfail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_run_dir_unique_removed_only_on_request() {
        let a = RunDir::create().unwrap();
        let mut b = RunDir::create().unwrap();
        assert_ne!(a.path(), b.path());
        assert!(a.join("agent.sock").as_os_str().len() < 108);
        let (pa, pb) = (a.path().to_path_buf(), b.path().to_path_buf());
        b.set_remove(true);
        drop(a);
        drop(b);
        assert!(pa.is_dir());
        assert!(!pb.exists());
        fs::remove_dir_all(pa).unwrap();
    }

    #[test]
    fn test_tail_lines_and_last_lines() {
        let dir = RunDir::create().unwrap();
        let p = dir.join("log");
        fs::write(&p, "a\nb\r\nc\n").unwrap();
        assert_eq!(tail_lines(&p, 2), ["b", "c"]);
        assert_eq!(tail_lines(&p, 10), ["a", "b", "c"]);
        assert!(tail_lines(&dir.join("missing"), 2)[0].contains("cannot read"));
        assert_eq!(last_lines("x\n\ny\nz\n", 2), ["y", "z"]);
        let mut dir = dir;
        dir.set_remove(true);
    }

    fn violation_window() -> WindowReport {
        WindowReport {
            records: 10,
            lost: 0,
            violations: vec![crate::vm::control::Violation {
                device: "gpu0".into(),
                record: pcisim_journal::Record {
                    seq: 7,
                    t_ns: 1,
                    event: pcisim_journal::Event::Violation {
                        kind: ViolationKind::DmaAfterUnmap,
                        detail: "write 0x1000+4 after unmap".into(),
                    },
                },
            }],
            unretained: 0,
            degraded: Vec::new(),
        }
    }

    #[test]
    fn test_judge_expected_violation_passes_as_xfail_only_if_journaled() {
        let want = vec![("gpu0".to_string(), ViolationKind::DmaAfterUnmap)];
        let mut diags = Vec::new();
        let (v, note) = judge_expected(Verdict::Pass, Ok(violation_window()), &want, &mut diags);
        assert_eq!(v, Verdict::Pass);
        assert_eq!(
            note.as_deref(),
            Some("XFAIL dma_after_unmap journaled as expected (1 violation)")
        );
        assert!(diags[0].starts_with("XFAIL (expected) "), "{diags:?}");
        // Not journaled: the oracle missed the bug.
        let (v, note) = judge_expected(
            Verdict::Pass,
            Ok(WindowReport::default()),
            &want,
            &mut Vec::new(),
        );
        assert!(matches!(v, Verdict::Fail(r) if r.contains("the oracle missed the bug")));
        assert_eq!(note, None);
        // Another kind (or device) is still a failure.
        let other = vec![("gpu1".to_string(), ViolationKind::DmaAfterUnmap)];
        let (v, _) = judge_expected(
            Verdict::Pass,
            Ok(violation_window()),
            &other,
            &mut Vec::new(),
        );
        assert!(matches!(v, Verdict::Fail(r) if r.contains("1 device-side violation")));
        // A failing guest stays failed.
        let (v, note) = judge_expected(
            Verdict::Fail("exit 1".into()),
            Ok(violation_window()),
            &want,
            &mut Vec::new(),
        );
        assert_eq!(v, Verdict::Fail("exit 1".into()));
        assert_eq!(note, None);
    }

    #[test]
    fn test_xfail_notes_join_and_vanish_on_failure() {
        let j = Some("XFAIL dma_during_reset journaled as expected (1 violation)".to_string());
        let k = Some("XFAIL kernel hung_task reported as expected (2 reports)".to_string());
        assert_eq!(
            xfail_note(&Verdict::Pass, j.clone(), k.clone()).as_deref(),
            Some(
                "XFAIL dma_during_reset journaled as expected (1 violation); \
                 XFAIL kernel hung_task reported as expected (2 reports)"
            )
        );
        assert_eq!(xfail_note(&Verdict::Pass, None, k.clone()), k);
        assert_eq!(xfail_note(&Verdict::Pass, j.clone(), None), j);
        assert_eq!(xfail_note(&Verdict::Pass, None, None), None);
        // The kernel log failed a scenario whose journal XFAIL held: no XFAIL note.
        assert_eq!(
            xfail_note(&Verdict::Fail("guest kernel: ...".into()), j, None),
            None
        );
    }

    #[test]
    fn test_judge_journal_violation_fails_a_passing_scenario() {
        let mut diags = Vec::new();
        let v = judge_journal(Verdict::Pass, Ok(violation_window()), &mut diags);
        assert_eq!(
            v,
            Verdict::Fail("1 device-side violation (dma_after_unmap)".into())
        );
        assert_eq!(
            diags,
            ["VIOLATION dma_after_unmap: write 0x1000+4 after unmap [gpu0 #7]"]
        );
        // A guest failure keeps its reason; a skip with a violation is a failure.
        let v = judge_journal(
            Verdict::Fail("exit 1".into()),
            Ok(violation_window()),
            &mut Vec::new(),
        );
        assert_eq!(
            v,
            Verdict::Fail("exit 1; 1 device-side violation (dma_after_unmap)".into())
        );
        let v = judge_journal(
            Verdict::Skip("no vfio".into()),
            Ok(violation_window()),
            &mut Vec::new(),
        );
        assert!(matches!(v, Verdict::Fail(_)));
    }

    #[test]
    fn test_judge_journal_clean_or_unreadable() {
        let mut diags = Vec::new();
        let clean = WindowReport {
            records: 3,
            lost: 2,
            ..WindowReport::default()
        };
        assert_eq!(
            judge_journal(Verdict::Pass, Ok(clean), &mut diags),
            Verdict::Pass
        );
        assert_eq!(diags.len(), 1, "lost records are mentioned: {diags:?}");
        let err = crate::vm::control::ControlError::Closed(PathBuf::from("/run/control.sock"));
        let v = judge_journal(Verdict::Pass, Err(err), &mut Vec::new());
        assert!(matches!(v, Verdict::Fail(r) if r.starts_with("device journal unreadable")));
        let many = WindowReport {
            unretained: 3,
            ..violation_window()
        };
        assert_eq!(many.reason(), "4 device-side violations (dma_after_unmap)");
        assert_eq!(many.diagnostics().len(), 2);
    }

    #[test]
    fn test_degraded_window_fails_even_an_expected_failure() {
        let degraded = WindowReport {
            degraded: vec!["gpu0: VIOLATION checker_degraded: mapped set overflow (#9)".into()],
            ..WindowReport::default()
        };
        let mut diags = Vec::new();
        let v = judge_journal(Verdict::Pass, Ok(degraded.clone()), &mut diags);
        assert_eq!(
            v,
            Verdict::Fail("journal window incomplete: checker degraded (1 marker)".into())
        );
        assert_eq!(
            diags,
            ["DEGRADED gpu0: VIOLATION checker_degraded: mapped set overflow (#9)"]
        );
        // An XFAIL scenario whose expected violation was journaled still fails: the checker
        // was partly blind in its window.
        let want = vec![("gpu0".to_string(), ViolationKind::DmaAfterUnmap)];
        let w = WindowReport {
            degraded: degraded.degraded,
            ..violation_window()
        };
        let (v, note) = judge_expected(Verdict::Pass, Ok(w), &want, &mut Vec::new());
        assert!(
            matches!(&v, Verdict::Fail(r) if r.contains("checker degraded")),
            "{v:?}"
        );
        assert_eq!(note, None);
    }

    #[test]
    fn test_suite_exit_codes() {
        let all_passed = SuiteOutcome {
            passed: 3,
            outside_clean: true,
            ..SuiteOutcome::default()
        };
        assert_eq!(all_passed.exit_code(false), EXIT_PASS);
        assert_eq!(all_passed.exit_code(true), EXIT_PASS);
        // Subtests skipped inside passing scenarios are shown, not judged.
        let sub_skips = SuiteOutcome {
            skipped_subtests: 2,
            ..all_passed
        };
        assert_eq!(sub_skips.exit_code(false), EXIT_PASS);
        // A skipped scenario fails the run unless skips are allowed.
        let one_skipped = SuiteOutcome {
            skipped: 1,
            ..all_passed
        };
        assert_eq!(one_skipped.exit_code(false), EXIT_NOT_ALL_RAN);
        assert_eq!(one_skipped.exit_code(true), EXIT_PASS);
        // A scenario not applicable to this kernel (its declared feature is missing) is shown,
        // not an incomplete run.
        let not_applicable = SuiteOutcome {
            not_applicable: 1,
            ..all_passed
        };
        assert_eq!(not_applicable.exit_code(false), EXIT_PASS);
        // Everything skipped: nothing ran, even with --allow-skip.
        let all_skipped = SuiteOutcome {
            passed: 0,
            skipped: 3,
            ..all_passed
        };
        assert_eq!(all_skipped.exit_code(true), EXIT_NOT_ALL_RAN);
        assert_eq!(SuiteOutcome::default().exit_code(true), EXIT_FAILED);
        assert_eq!(
            SuiteOutcome {
                outside_clean: true,
                ..SuiteOutcome::default()
            }
            .exit_code(true),
            EXIT_NOT_ALL_RAN
        );
        // A failure wins over skips; an unclean boot/teardown window is a failure.
        let failed = SuiteOutcome {
            failed: 1,
            ..one_skipped
        };
        assert_eq!(failed.exit_code(true), EXIT_FAILED);
        let unclean = SuiteOutcome {
            outside_clean: false,
            ..all_passed
        };
        assert_eq!(unclean.exit_code(false), EXIT_FAILED);
        // Errors.
        assert_eq!(exit_code(&Ok(one_skipped), false), EXIT_NOT_ALL_RAN);
        assert_eq!(exit_code(&Err(LabError::Interrupted(15)), false), 143);
        assert_eq!(
            exit_code(&Err(LabError::NoScenario("Z9".into())), true),
            EXIT_NOT_ALL_RAN
        );
        let pipe = std::io::Error::from_raw_os_error(libc::EPIPE);
        assert_eq!(exit_code(&Err(LabError::Output(pipe)), false), 141);
        let dir = LabError::RunDir {
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert_eq!(exit_code(&Err(dir), true), EXIT_INFRA);
    }

    #[test]
    fn test_count_skipped_at_any_depth() {
        let ktap = "KTAP version 1\n1..3\n  KTAP version 1\n  1..2\n  ok 1 dirty # SKIP --dirty off\n  \
                    ok 2 x\nok 1 a\nok 2 b # SKIP no vfio\n    1..0 # SKIP none\nnot ok 3 c # SKIP-ish reason\n\
                    ok 4 skipper\n# SKIP in a diagnostic\n";
        assert_eq!(count_skipped(ktap), 3);
        assert_eq!(count_skipped("KTAP version 1\n1..1\nok 1 a\n"), 0);
    }

    /// A control server that answers `list` and then hangs up.
    fn vanishing_server() -> JournalWatch {
        use std::io::{BufRead, BufReader};
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut line = String::new();
            BufReader::new(b.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap();
            let mut w = b;
            w.write_all(b"{\"ok\":true,\"devices\":[{\"id\":\"gpu0\"}]}\n")
                .unwrap();
        });
        JournalWatch::new(crate::vm::control::ControlClient::from_stream(a)).unwrap()
    }

    #[test]
    fn test_unreadable_teardown_journal_is_a_failure() {
        let mut watch = vanishing_server();
        let dir = RunDir::create().unwrap();
        let mut ktap = Vec::new();
        let mut progress = Vec::new();
        {
            let mut r = Report::new(&mut ktap, &mut progress);
            let clean = check_outside(&mut watch, "teardown", dir.path(), &mut r).unwrap();
            assert!(
                !clean,
                "an unreadable teardown journal must not count as clean"
            );
        }
        let ktap = String::from_utf8(ktap).unwrap();
        assert!(
            ktap.starts_with("# teardown: device journal unreadable: "),
            "{ktap}"
        );
        let mut dir = dir;
        dir.set_remove(true);
    }

    fn sample(id: &'static str, name: &'static str) -> Scenario {
        Scenario {
            id,
            name,
            timeout: Duration::from_secs(1),
            program: Program::Guest(pcisim_guest_wire::Program::E1),
            ..Scenario::NO_XFAIL
        }
    }

    #[test]
    fn test_report_writes_nested_ktap_and_progress() {
        let mut ktap = Vec::new();
        let mut progress = Vec::new();
        {
            let mut r = Report::new(&mut ktap, &mut progress);
            r.ktap.header(2).unwrap();
            let all = [sample("E1", "E1 enumeration"), sample("E2", "E2 bar-mmio")];
            r.scenario(
                &all[0],
                &Verdict::Pass,
                &Nested::Ktap("KTAP version 1\n1..1\nok 1 ids\n".into()),
                &[],
                Duration::from_millis(1500),
            )
            .unwrap();
            r.scenario(
                &all[1],
                &Verdict::Fail("exit 3".into()),
                &Nested::Text("garbage".into()),
                &["E2 stderr (last lines):".into(), "boom".into()],
                Duration::ZERO,
            )
            .unwrap();
            assert_eq!((r.passed, r.failed, r.skipped), (1, 1, 0));
        }
        let ktap = String::from_utf8(ktap).unwrap();
        assert_eq!(
            ktap,
            "KTAP version 1\n1..2\n  KTAP version 1\n  1..1\n  ok 1 ids\nok 1 E1 enumeration\n  # garbage\n  # E2 stderr (last lines):\n  # boom\nnot ok 2 E2 bar-mmio # exit 3\n"
        );
        let parsed = crate::harness::ktap::parse(&ktap).unwrap();
        assert_eq!((parsed.passed(), parsed.failed()), (1, 1));
        assert_eq!(
            String::from_utf8(progress).unwrap(),
            "lab: E1 enumeration: ok (1.5 s)\nlab: E2 bar-mmio: FAIL (0.0 s): exit 3\n"
        );
    }
}
