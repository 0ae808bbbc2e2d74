//! `--jobs N`: independent VMs at the same time.
//!
//! Each VM of the plan runs on a thread of its own (its own device server, QEMU, guest, agent,
//! QMP and `RUN/<profile>/` directory, exactly as one after another), started longest first (by
//! the scenarios' measured cost, [`select::cost`]) so the long waits (R8's 65 s FLR poll, H3's
//! cycles, H4's relayed requests) overlap with the short VMs instead of ending the run alone.
//! A VM's thread writes its KTAP into a buffer numbered from the VM's place in the plan; the main
//! thread prints the buffers in plan order as they become available, so the KTAP stream (its
//! order and numbers) is the same whatever the schedule. Progress lines are printed as they come,
//! prefixed with the VM's profile (`lab: [gpu-nsr] R8 slow-failed-reset: ok ...`).
//!
//! A VM that cannot be started stops the run as it does one VM at a time: VMs not yet started are
//! not started (their scenarios are `not ok`, "not run: ..."), the ones running finish, and the
//! first error is the run's. The children of a VM are spawned by that VM's thread, which outlives
//! them (`PR_SET_PDEATHSIG` is per thread, [`crate::vm::process`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};

use super::*;

/// Memory a VM costs besides its guest RAM (QEMU, the device server, page tables), in MiB.
const VM_OVERHEAD_MIB: u64 = 512;

/// The default `--jobs`: one VM more than there are cores, as many as the available memory
/// holds (each VM's guest RAM from its profile or `--memory`, plus [`VM_OVERHEAD_MIB`]), at most
/// one per VM of the plan, at least 1; 1 with `--gdb` (one gdbstub port). One more than the
/// cores because much of the suite waits rather than computes (R8's 65 s of the guest polling a
/// never-ready device, pciehp's 5 s button windows, H3's hot-plug round trips): on 2 cores three
/// VMs took the suite from ~181 s to ~140 s with no flake (docs/lab.md, "What a run does").
pub fn default_jobs(opts: &SuiteOptions, plan: &[(ProfileId, Vec<Scenario>)]) -> usize {
    if opts.vm.gdb.is_some() {
        return 1;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_vm = plan
        .iter()
        .map(|(id, _)| opts.vm.memory_mib.unwrap_or(id.profile().memory_mib))
        .max()
        .unwrap_or(1024)
        + VM_OVERHEAD_MIB;
    let by_memory = mem_available_mib().map_or(1, |m| (m / per_vm.max(1)) as usize);
    (cores + 1).min(by_memory).min(plan.len()).max(1)
}

/// `MemAvailable` from /proc/meminfo, in MiB.
fn mem_available_mib() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb / 1024)
}

/// The order VMs are started in: costliest first (boot + measured scenario costs), ties in plan
/// order.
pub fn start_order(plan: &[(ProfileId, Vec<Scenario>)]) -> Vec<usize> {
    let cost = |g: &[Scenario]| g.iter().map(select::cost).sum::<f64>();
    let mut order: Vec<usize> = (0..plan.len()).collect();
    order.sort_by(|&a, &b| {
        cost(&plan[b].1)
            .total_cmp(&cost(&plan[a].1))
            .then(a.cmp(&b))
    });
    order
}

/// What a VM's thread sends to the main thread.
enum Msg {
    /// A progress line (already prefixed).
    Line(String),
    /// The VM is done: its KTAP, its report's counters and cases, and how it went.
    Done(usize, Box<VmDone>),
}

struct VmDone {
    ktap: Vec<u8>,
    passed: usize,
    failed: usize,
    skipped: usize,
    not_applicable: usize,
    skipped_subtests: usize,
    cases: Vec<crate::harness::junit::Case>,
    outside: Vec<String>,
    replies: super::latency::Tally,
    /// `None`: not started (an earlier VM could not be).
    result: Option<Result<bool, LabError>>,
}

/// A `Write` that sends whole lines to the main thread with a prefix after `lab: `.
struct LineSender {
    tx: mpsc::Sender<Msg>,
    prefix: String,
    buf: Vec<u8>,
}

impl Write for LineSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            let line = match line.strip_prefix("lab: ") {
                Some(rest) => format!("lab: {}{rest}", self.prefix),
                None => format!("{}{line}", self.prefix),
            };
            // The main thread is gone only when the run is over; nothing to tell then.
            let _ = self.tx.send(Msg::Line(line));
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs the plan's VMs on up to `jobs` threads; writes their KTAP into `report` in plan order.
/// Returns as [`run_vm`] does for the whole run: whether everything outside the scenarios was
/// clean, or the first error (every scenario has a result line either way).
pub(super) fn run_concurrently(
    opts: &SuiteOptions,
    env: &provision::ProvisionEnv,
    initrd: &Path,
    plan: &[(ProfileId, Vec<Scenario>)],
    run: &RunDir,
    jobs: usize,
    report: &mut Report<'_>,
) -> Result<bool, LabError> {
    schedule(plan, jobs, report, &|_, profile, group, r| {
        run_vm(opts, env, initrd, profile, group, run, r)
    })
}

/// One VM of the plan, run by [`schedule`] on a worker thread: (its index in the plan, its
/// profile, its scenarios, its report) → as [`run_vm`].
type RunOne<'s> =
    dyn Fn(usize, &VmProfile, &[Scenario], &mut Report<'_>) -> Result<bool, LabError> + Sync + 's;

/// [`run_concurrently`] with the VM itself as a parameter (the tests run fake VMs).
fn schedule(
    plan: &[(ProfileId, Vec<Scenario>)],
    jobs: usize,
    report: &mut Report<'_>,
    run_one: &RunOne<'_>,
) -> Result<bool, LabError> {
    // Where each VM's KTAP numbers start.
    let mut first = Vec::with_capacity(plan.len());
    let mut next = report.next;
    for (_, group) in plan {
        first.push(next);
        next += group.len();
    }
    let order = start_order(plan);
    let names: Vec<String> = order
        .iter()
        .map(|&i| plan[i].0.profile().name.to_string())
        .collect();
    report.line(&format!(
        "{} VMs, {jobs} at a time, longest first: {}",
        plan.len(),
        names.join(" ")
    ))?;
    let queue = Mutex::new(order.into_iter().collect::<VecDeque<usize>>());
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<Msg>();
    let mut done: Vec<Option<Box<VmDone>>> = (0..plan.len()).map(|_| None).collect();
    let mut emitted = 0;
    let mut ok = true;
    let mut first_err: Option<LabError> = None;
    std::thread::scope(|scope| -> Result<(), LabError> {
        for _ in 0..jobs.min(plan.len()) {
            let tx = tx.clone();
            let (queue, stop, first) = (&queue, &stop, &first);
            scope.spawn(move || loop {
                let next = match queue.lock() {
                    Ok(mut q) => q.pop_front(),
                    Err(_) => None,
                };
                let Some(i) = next else { break };
                let (id, group) = &plan[i];
                let profile = id.profile();
                let mut progress = LineSender {
                    tx: tx.clone(),
                    prefix: format!("[{}] ", profile.name),
                    buf: Vec::new(),
                };
                let mut ktap = Vec::new();
                let vm_done = {
                    let mut r = Report::new(&mut ktap, &mut progress);
                    r.next = first[i];
                    let result = if stop.load(Ordering::SeqCst) {
                        None
                    } else {
                        let names: Vec<&str> = group.iter().map(|s| s.id).collect();
                        // The line names the VM itself: not prefixed, as one VM at a time.
                        let _ = tx.send(Msg::Line(format!(
                            "lab: VM {}/{}: profile {} for {}",
                            i + 1,
                            plan.len(),
                            profile.name,
                            names.join(" ")
                        )));
                        Some(run_one(i, &profile, group, &mut r))
                    };
                    let reason = match &result {
                        Some(Ok(_)) => None,
                        None => Some("not run: an earlier VM could not be started".to_string()),
                        Some(Err(e)) => {
                            stop.store(true, Ordering::SeqCst);
                            Some(match e.interrupt_signal() {
                                Some(s) => format!("not run: interrupted by signal {s}"),
                                None => format!("not run: {}", error_chain(e)),
                            })
                        }
                    };
                    if let Some(reason) = reason {
                        let start = r.next - first[i];
                        for s in group.iter().skip(start) {
                            let _ = r.scenario(
                                s,
                                &Verdict::Fail(reason.clone()),
                                &Nested::None,
                                &[],
                                Duration::ZERO,
                            );
                        }
                    }
                    VmDone {
                        ktap: Vec::new(),
                        passed: r.passed,
                        failed: r.failed,
                        skipped: r.skipped,
                        not_applicable: r.not_applicable,
                        skipped_subtests: r.skipped_subtests,
                        cases: std::mem::take(&mut r.cases),
                        outside: std::mem::take(&mut r.outside),
                        replies: std::mem::take(&mut r.replies),
                        result,
                    }
                };
                let _ = tx.send(Msg::Done(
                    i,
                    Box::new(VmDone {
                        ktap: std::mem::take(&mut ktap),
                        ..vm_done
                    }),
                ));
            });
        }
        drop(tx);
        // Print progress as it comes and each VM's KTAP once all VMs before it are printed.
        for msg in rx {
            match msg {
                Msg::Line(l) => {
                    writeln!(report.progress, "{l}")
                        .and_then(|_| report.progress.flush())
                        .map_err(LabError::Output)?;
                }
                Msg::Done(i, d) => done[i] = Some(d),
            }
            while let Some(d) = done.get_mut(emitted).and_then(Option::take) {
                let d = *d;
                report.ktap.raw(&d.ktap).map_err(LabError::Output)?;
                report.next += plan[emitted].1.len();
                report.passed += d.passed;
                report.failed += d.failed;
                report.skipped += d.skipped;
                report.not_applicable += d.not_applicable;
                report.skipped_subtests += d.skipped_subtests;
                report.cases.extend(d.cases);
                report.outside.extend(d.outside);
                report.replies.merge(d.replies);
                match d.result {
                    Some(Ok(clean)) => ok &= clean,
                    None => {}
                    Some(Err(e)) if first_err.is_none() => first_err = Some(e),
                    Some(Err(_)) => {}
                }
                emitted += 1;
            }
        }
        Ok(())
    })?;
    match first_err {
        Some(e) => Err(e),
        None => Ok(ok),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_longest_first_and_default_jobs() {
        let plan = plan_vms(&crate::scenarios::catalogue());
        let order = start_order(&plan);
        let names: Vec<String> = order
            .iter()
            .map(|&i| plan[i].0.profile().name.to_string())
            .collect();
        // H3 + H4 (gpu-hotplug) and R8 (gpu-nsr) are the long ones.
        assert_eq!(names[..2], ["gpu-hotplug", "gpu-nsr"], "{names:?}");
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..plan.len()).collect::<Vec<_>>());
        let opts = SuiteOptions::new("pcisim");
        let n = default_jobs(&opts, &plan);
        assert!(n >= 1 && n <= plan.len());
        // One VM more than the cores, unless memory or the plan is the bound.
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        assert!(n <= cores + 1, "{n} jobs on {cores} cores");
        let biggest = plan.iter().map(|(id, _)| id.profile().memory_mib).max();
        let room = mem_available_mib().unwrap_or(0) / (biggest.unwrap_or(1) + VM_OVERHEAD_MIB);
        if room as usize > cores && plan.len() > cores {
            assert_eq!(n, cores + 1, "memory holds {room} VMs");
        }
        let one = plan_vms(&crate::scenarios::select(Some("E1")));
        assert_eq!(default_jobs(&opts, &one), 1, "one VM, one job");
        let mut gdb = opts.clone();
        gdb.vm.gdb = Some(1234);
        assert_eq!(default_jobs(&gdb, &plan), 1);
    }

    /// Fake VMs of three profiles that finish in the reverse of plan order: the KTAP is still
    /// in plan order, numbered continuously, and every VM ran on its own thread at once.
    #[test]
    fn test_ktap_in_plan_order_whatever_finishes_first() {
        use crate::vm::profile::ProfileId;
        let all = crate::scenarios::catalogue();
        let pick = |ids: &[&str]| -> Vec<Scenario> {
            ids.iter()
                .map(|id| all.iter().find(|s| s.id == *id).unwrap().clone())
                .collect()
        };
        let plan = vec![
            (ProfileId::Gpu, pick(&["E1", "E2"])),
            (ProfileId::GpuNpu, pick(&["R0"])),
            (ProfileId::GpuNsr, pick(&["R1", "R3"])),
        ];
        let running = std::sync::atomic::AtomicUsize::new(0);
        let most = std::sync::atomic::AtomicUsize::new(0);
        let fake = |i: usize, _: &VmProfile, group: &[Scenario], r: &mut Report<'_>| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            // Plan order 0, 1, 2 finishes 2, 1, 0.
            std::thread::sleep(Duration::from_millis(300 * (3 - i as u64)));
            for s in group {
                r.scenario(s, &Verdict::Pass, &Nested::None, &[], Duration::ZERO)?;
            }
            running.fetch_sub(1, Ordering::SeqCst);
            Ok(true)
        };
        let mut ktap = Vec::new();
        let mut progress = Vec::new();
        let clean = {
            let mut r = Report::new(&mut ktap, &mut progress);
            let clean = schedule(&plan, 3, &mut r, &fake).unwrap();
            assert_eq!((r.passed, r.next), (5, 6));
            let names: Vec<&str> = r.cases.iter().map(|c| c.name.as_str()).collect();
            assert_eq!(names[0], "E1 enumeration");
            assert_eq!(names[4], "R3 pm-reset");
            clean
        };
        assert!(clean);
        assert_eq!(most.load(Ordering::SeqCst), 3, "three VMs at once");
        let ktap = String::from_utf8(ktap).unwrap();
        assert_eq!(
            ktap,
            "ok 1 E1 enumeration\nok 2 E2 bar-mmio\nok 3 R0 two-function-enumeration\n\
             ok 4 R1 flr\nok 5 R3 pm-reset\n"
        );
        let progress = String::from_utf8(progress).unwrap();
        // Progress came as it happened: the last VM of the plan finished first.
        let first_done = progress
            .lines()
            .find(|l| l.contains(": ok ("))
            .unwrap_or_default();
        assert!(
            first_done.starts_with("lab: [gpu-nsr] R1 flr: ok"),
            "{progress}"
        );
    }

    /// A VM that cannot start: the VMs not yet started are not started, their scenarios (and
    /// the failed VM's) are `not ok`, the error is the run's, and the KTAP is still complete.
    #[test]
    fn test_a_failed_vm_stops_the_rest_and_every_scenario_has_a_line() {
        use crate::vm::profile::ProfileId;
        let all = crate::scenarios::catalogue();
        let one = |id: &str| vec![all.iter().find(|s| s.id == id).unwrap().clone()];
        let plan = vec![
            (ProfileId::Gpu, one("E1")),
            (ProfileId::GpuNpu, one("R0")),
            (ProfileId::GpuNsr, one("R8")),
        ];
        // One job: R8's VM (the costliest) starts first and fails; the others never start.
        let started = Mutex::new(Vec::new());
        let fake = |i: usize, _: &VmProfile, _: &[Scenario], _: &mut Report<'_>| {
            started.lock().unwrap().push(i);
            Err(LabError::NoScenario("boot failed (fake)".into()))
        };
        let mut ktap = Vec::new();
        let mut progress = Vec::new();
        let result = {
            let mut r = Report::new(&mut ktap, &mut progress);
            let result = schedule(&plan, 1, &mut r, &fake);
            assert_eq!((r.failed, r.next), (3, 4));
            result
        };
        assert!(matches!(result, Err(LabError::NoScenario(_))));
        assert_eq!(*started.lock().unwrap(), [2]);
        let ktap = String::from_utf8(ktap).unwrap();
        let lines: Vec<&str> = ktap.lines().collect();
        assert_eq!(lines.len(), 3, "{ktap}");
        assert!(lines[0].starts_with("not ok 1 E1 enumeration # not run: an earlier VM"));
        assert!(lines[2].starts_with("not ok 3 R8 slow-failed-reset # not run: "));
    }

    #[test]
    fn test_line_sender_prefixes_whole_lines() {
        let (tx, rx) = mpsc::channel();
        let mut w = LineSender {
            tx,
            prefix: "[gpu] ".into(),
            buf: Vec::new(),
        };
        write!(w, "lab: E1 enumeration: ok\nlab: par").unwrap();
        write!(w, "tial\nguest says hi\n").unwrap();
        drop(w);
        let lines: Vec<String> = rx
            .iter()
            .map(|m| match m {
                Msg::Line(l) => l,
                Msg::Done(..) => panic!("no Done"),
            })
            .collect();
        assert_eq!(
            lines,
            [
                "lab: [gpu] E1 enumeration: ok",
                "lab: [gpu] partial",
                "[gpu] guest says hi"
            ]
        );
    }
}
