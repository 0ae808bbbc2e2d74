//! Runs a loaded scenario file ([`super::ScenarioFile`]) in a [`HostCtx`]: each step is a
//! subtest (a guest program's KTAP nested under it), each count a subtest of its own.

use std::thread;
use std::time::{Duration, Instant};

use pcisim_journal::Record;

use crate::guestops::{sh_output, sysfs};
use crate::harness::host::{HostCtx, HostError};
use crate::harness::scenario::Verdict;

use super::{loaded, Action, Count, ScenarioFile};

/// How long the guest has to enumerate a plugged device.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long QEMU has to report `DEVICE_DELETED`.
const DELETE_TIMEOUT: Duration = Duration::from_secs(30);

/// The [`crate::harness::host::HostProgram`] of every scenario file: interprets the loaded file
/// whose id is the running scenario's.
pub fn run_file(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let id = ctx.scenario().id;
    let file = loaded(id)
        .ok_or_else(|| HostError::Step(format!("no scenario file is loaded for {id}")))?;
    run(ctx, file)
}

fn run(ctx: &mut HostCtx<'_>, file: &ScenarioFile) -> Result<(), HostError> {
    for step in &file.steps {
        let marks = marks(ctx, &step.counts)?;
        let ok = do_step(ctx, &step.name, &step.action)?;
        if !ok {
            // A failed step leaves the guest in an unknown state: later steps would only fail
            // for it. Its subtest already says why.
            ctx.diag(&format!(
                "{}:{}: the step failed; the scenario's remaining steps are not run",
                file.path.display(),
                step.line
            ));
            return Ok(());
        }
        for (c, mark) in step.counts.iter().zip(marks) {
            let records = ctx.window(&c.device, mark)?.records;
            check_count(ctx, &format!("{}: ", step.name), c, &records);
        }
    }
    for c in &file.counts {
        let records = ctx.journal(&c.device)?;
        check_count(ctx, "scenario: ", c, &records);
    }
    Ok(())
}

/// The journal position of each count's device before a step.
fn marks(ctx: &mut HostCtx<'_>, counts: &[Count]) -> Result<Vec<u64>, HostError> {
    counts
        .iter()
        .map(|c| Ok(ctx.control().last_seq(&c.device)?))
        .collect()
}

/// `{bdf:ID}` → device `ID`'s guest BDF (from QMP `query-pci`).
fn expand(ctx: &mut HostCtx<'_>, s: &str) -> Result<String, HostError> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find("{bdf:") {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 5..];
        let end = tail
            .find('}')
            .ok_or_else(|| HostError::Step(format!("unterminated {{bdf: in {s:?}")))?;
        out.push_str(&ctx.bdf_of(&tail[..end])?);
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Carries out one step and records its subtest; `Ok(false)` if it failed.
fn do_step(ctx: &mut HostCtx<'_>, name: &str, action: &Action) -> Result<bool, HostError> {
    match action {
        Action::Guest {
            program,
            device,
            args,
        } => {
            let args = args
                .iter()
                .map(|a| expand(ctx, a))
                .collect::<Result<Vec<_>, _>>()?;
            let options = pcisim_guest_wire::Options::parse(*program, &args)
                .map_err(|e| HostError::Step(format!("{name}: {e}")))?;
            let argv = ctx.guest_argv(device, options)?;
            let verdict = ctx.guest_test(name, &argv)?;
            // A skipped guest program is not a failed step (the suite's verdict judges it).
            Ok(!matches!(verdict, Verdict::Fail(_)))
        }
        Action::Sh {
            script,
            exit,
            stdout,
        } => {
            let script = expand(ctx, script)?;
            let out = sh_output(ctx, &script)?;
            let mut why = Vec::new();
            if out.exit != Some(*exit) {
                why.push(format!("exit {:?}, expected {exit}", out.exit));
            }
            if let Some(want) = stdout {
                if !out.stdout.contains(want.as_str()) {
                    why.push(format!("stdout lacks {want:?}"));
                }
            }
            if !why.is_empty() {
                for l in out.stdout.lines().chain(out.stderr.lines()).take(10) {
                    ctx.diag(&format!("{name}: {l}"));
                }
            }
            Ok(ctx.check(name, why.is_empty(), why.join("; ")))
        }
        Action::Plug(id) => {
            let t = Instant::now();
            ctx.device_add(id)?;
            let bdf = ctx.bdf_of(id)?;
            let out = sh_output(ctx, &sysfs::wait_script(&bdf, true, PROBE_TIMEOUT))?;
            let took = t.elapsed();
            Ok(ctx.check(
                &format!("{name} (at {bdf}, {:.0} ms)", took.as_secs_f64() * 1000.0),
                out.exit == Some(0),
                format!(
                    "the guest did not enumerate {id} at {bdf} within {} s",
                    PROBE_TIMEOUT.as_secs()
                ),
            ))
        }
        Action::Unplug(id) => {
            let bdf = ctx.bdf_of(id)?;
            let result = ctx.device_del(id, DELETE_TIMEOUT);
            let r = result.and_then(|took| {
                let out = sh_output(ctx, &sysfs::wait_script(&bdf, false, PROBE_TIMEOUT))?;
                Ok((took, out.exit == Some(0)))
            });
            match r {
                Ok((took, gone)) => Ok(ctx.check(
                    &format!(
                        "{name} (DEVICE_DELETED in {:.0} ms)",
                        took.as_secs_f64() * 1000.0
                    ),
                    gone,
                    format!("{bdf} is still in the guest's sysfs"),
                )),
                Err(e) if e.is_fatal() => Err(e),
                Err(e) => {
                    ctx.fail(name, &e.to_string());
                    Ok(false)
                }
            }
        }
        Action::Inject { device, fault } => match ctx.inject(device, fault) {
            Ok(()) => {
                ctx.pass(name);
                Ok(true)
            }
            Err(e) if e.is_fatal() => Err(e),
            Err(e) => {
                ctx.fail(name, &e.to_string());
                Ok(false)
            }
        },
        Action::SystemReset => {
            let took = ctx.system_reset()?;
            ctx.pass(&format!(
                "{name} (agent back in {:.1} s)",
                took.as_secs_f64()
            ));
            Ok(true)
        }
        Action::Await { record, timeout } => {
            let c = record.clone();
            let found = ctx.wait_journal(&c.device, *timeout, |r| {
                count_matching(&c, std::slice::from_ref(r)).0 == 1
            })?;
            Ok(ctx.check(
                name,
                found.is_some(),
                format!("none within {} s", timeout.as_secs()),
            ))
        }
        Action::Wait { script, timeout } => {
            let script = expand(ctx, script)?;
            let deadline = Instant::now() + *timeout;
            loop {
                let out = sh_output(ctx, &script)?;
                if out.exit == Some(0) {
                    ctx.pass(name);
                    return Ok(true);
                }
                if Instant::now() >= deadline {
                    ctx.fail(
                        name,
                        &format!("still not true after {} s", timeout.as_secs()),
                    );
                    return Ok(false);
                }
                if let Some(s) = crate::vm::process::interrupted() {
                    return Err(HostError::Interrupted(s));
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// How many of `records` match `c` (type and field values), and the first field `c` names
/// that a record of its type does not have (a misspelt field: an error, not a count of 0).
pub fn count_matching(c: &Count, records: &[Record]) -> (u64, Option<String>) {
    let mut n = 0;
    let mut missing = None;
    for r in records {
        let Ok(v) = serde_json::to_value(&r.event) else {
            continue;
        };
        if v.get("type").and_then(|t| t.as_str()) != Some(c.record.as_str()) {
            continue;
        }
        let mut all = true;
        for (k, want) in &c.fields {
            match v.get(k) {
                Some(got) if got == want => {}
                Some(_) => all = false,
                None => {
                    all = false;
                    missing.get_or_insert_with(|| k.clone());
                }
            }
        }
        if all {
            n += 1;
        }
    }
    (n, missing)
}

fn check_count(ctx: &mut HostCtx<'_>, prefix: &str, c: &Count, records: &[Record]) {
    let (n, missing) = count_matching(c, records);
    let what = format!("{prefix}journaled {}", c.describe());
    match missing {
        Some(field) => ctx.fail(
            &what,
            &format!("a {} record has no field {field:?}", c.record),
        ),
        None => {
            ctx.check(
                &what,
                (c.min..=c.max).contains(&n),
                format!("{n} in the window of {} records", records.len()),
            );
        }
    }
}
