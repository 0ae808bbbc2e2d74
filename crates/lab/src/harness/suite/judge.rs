//! How a scenario's verdict is judged beyond its KTAP: the device journal (violations, expected
//! ones: XFAIL), the windows outside scenarios (boot, teardown) and the guest kernel's log.

use super::*;

/// Checks the devices' journals for a window outside any scenario (`boot`, `teardown`): saves
/// `RUN/<what>.journal.jsonl` and reports violations as top-level KTAP diagnostics. Returns
/// whether the window was read and clean: an unreadable journal is a failure (no evidence is
/// not evidence of no violation), reported the same way.
pub(super) fn check_outside(
    watch: &mut JournalWatch,
    what: &str,
    dir: &Path,
    report: &mut Report<'_>,
) -> Result<bool, LabError> {
    match watch.check(Some(&dir.join(format!("{what}.journal.jsonl")))) {
        Ok(w) if w.clean() => {
            note_lost(&w, what, report)?;
            Ok(true)
        }
        Ok(w) => {
            note_lost(&w, what, report)?;
            let head = format!("{what}: {}", w.reason());
            report.outside_failure(&head)?;
            report.line(&head)?;
            for d in w.diagnostics() {
                report.outside_failure(&d)?;
                report.line(&format!("  {d}"))?;
            }
            Ok(false)
        }
        Err(e) => {
            let head = format!("{what}: device journal unreadable: {}", error_chain(&e));
            warn!("{head}");
            report.outside_failure(&head)?;
            report.line(&head)?;
            Ok(false)
        }
    }
}

pub(super) fn note_lost(
    w: &WindowReport,
    what: &str,
    report: &mut Report<'_>,
) -> Result<(), LabError> {
    if w.lost > 0 {
        report.line(&format!(
            "{what}: {} journal records were dropped before they could be read (violations are kept apart)",
            w.lost
        ))?;
    }
    Ok(())
}

/// Reads the kernel log of the boot (`RUN/<profile>/boot.dmesg`) and judges it like a
/// scenario's with nothing expected: a report is a top-level KTAP diagnostic and fails the run.
/// Returns whether it was read and clean; `mark` is where the first scenario's slice starts.
pub(super) fn check_boot_kernel(
    agent: &mut Agent,
    mark: &mut Option<KmsgMark>,
    dir: &Path,
    report: &mut Report<'_>,
) -> Result<bool, LabError> {
    let path = dir.join("boot.dmesg");
    let slice = dmesg::read(agent, mark).map_err(|e| e.to_string());
    if let Ok(s) = &slice {
        save(path.clone(), &s.render("the boot"));
    }
    let mut diagnostics = Vec::new();
    let (verdict, _) = dmesg::judge(
        Verdict::Pass,
        slice.as_ref().map_err(String::as_str),
        &[],
        &path,
        &mut diagnostics,
    );
    let mut clean = true;
    if let Verdict::Fail(why) = verdict {
        clean = false;
        let head = format!("boot: {why}");
        report.outside_failure(&head)?;
        report.line(&head)?;
    }
    for d in diagnostics {
        report.ktap.diagnostic(&d).map_err(LabError::Output)?;
        report.line(&format!("  {d}"))?;
    }
    Ok(clean)
}

/// The scenario's kernel log slice, saved as `dmesg` (`RUN/<ID>.dmesg`) and judged against
/// its declared kernel reports ([`dmesg::judge`]). `mark` is where the slice starts (the
/// previous read's end); `start` says why there is none.
pub(super) fn judge_kernel(
    s: &Scenario,
    agent: &mut Agent,
    mark: &mut Option<KmsgMark>,
    start: Result<(), String>,
    dmesg: &Path,
    verdict: Verdict,
    diagnostics: &mut Vec<String>,
) -> (Verdict, Option<String>) {
    let slice = match start {
        Ok(()) => dmesg::read(agent, mark).map_err(|e| e.to_string()),
        Err(why) => {
            // Move the mark for the next scenario; this one has no start.
            *mark = dmesg::mark(agent).ok();
            Err(format!("no start position: {why}"))
        }
    };
    if let Ok(sl) = &slice {
        save(dmesg.to_path_buf(), &sl.render(s.name));
    }
    dmesg::judge(
        verdict,
        slice.as_ref().map_err(String::as_str),
        s.kernel_reports,
        dmesg,
        diagnostics,
    )
}

/// The note on a scenario's result line: its journal's and its kernel log's `XFAIL ...` notes,
/// joined, and only if it passed (a later failure voids an earlier expected failure's note).
pub(super) fn xfail_note(
    verdict: &Verdict,
    journal: Option<String>,
    kernel: Option<String>,
) -> Option<String> {
    match (journal, kernel) {
        _ if *verdict != Verdict::Pass => None,
        (Some(a), Some(b)) => Some(format!("{a}; {b}")),
        (a, b) => a.or(b),
    }
}

/// [`judge_journal`] for a scenario that provokes violations on purpose (a buggy guest
/// program, [`HostCtx::expect_violation`]): it passes only if every `expected` (device, kind)
/// was journaled and nothing else was; the expected ones are listed as `XFAIL` diagnostics and
/// the returned note (`XFAIL ...`) goes on its result line.
pub(super) fn judge_expected(
    verdict: Verdict,
    window: Result<WindowReport, crate::vm::control::ControlError>,
    expected: &[(String, ViolationKind)],
    diagnostics: &mut Vec<String>,
) -> (Verdict, Option<String>) {
    let w = match window {
        Ok(w) => w,
        Err(e) => return (judge_journal(verdict, Err(e), diagnostics), None),
    };
    let is_expected = |v: &crate::vm::control::Violation| {
        expected
            .iter()
            .any(|(d, k)| *d == v.device && Some(*k) == v.kind())
    };
    let (wanted, other): (Vec<_>, Vec<_>) = w.violations.iter().cloned().partition(is_expected);
    let missing: Vec<String> = expected
        .iter()
        .filter(|(d, k)| {
            !wanted
                .iter()
                .any(|v| v.device == *d && v.kind() == Some(*k))
        })
        .map(|(d, k)| format!("{k} on {d}"))
        .collect();
    for v in wanted.iter().take(3) {
        diagnostics.push(format!("XFAIL (expected) {}", v.line()));
    }
    if wanted.len() > 3 {
        diagnostics.push(format!(
            "XFAIL (expected) ... and {} more of the same",
            wanted.len() - 3
        ));
    }
    let rest = WindowReport {
        violations: other,
        ..w
    };
    let mut verdict = judge_journal(verdict, Ok(rest), diagnostics);
    if !missing.is_empty() {
        let why = format!(
            "expected violation not journaled: {} (the oracle missed the bug)",
            missing.join(", ")
        );
        verdict = match verdict {
            Verdict::Fail(r) => Verdict::Fail(format!("{r}; {why}")),
            Verdict::Pass | Verdict::Skip(_) => Verdict::Fail(why),
        };
    }
    let note = (verdict == Verdict::Pass).then(|| {
        let mut kinds: Vec<String> = wanted.iter().map(|v| v.kind_name()).collect();
        kinds.dedup();
        format!(
            "XFAIL {} journaled as expected ({} violation{})",
            kinds.join(", "),
            wanted.len(),
            if wanted.len() == 1 { "" } else { "s" }
        )
    });
    (verdict, note)
}

/// The guest's verdict, amended by what the devices journaled during the scenario: any
/// violation fails it (even if the guest said ok), and so does a journal that cannot be read
/// (no evidence is not evidence of no violation).
pub(super) fn judge_journal(
    verdict: Verdict,
    window: Result<WindowReport, crate::vm::control::ControlError>,
    diagnostics: &mut Vec<String>,
) -> Verdict {
    let (why, lines) = match window {
        Ok(w) => {
            if w.lost > 0 {
                diagnostics.push(format!(
                    "journal: {} records were dropped before they could be read",
                    w.lost
                ));
            }
            if w.clean() {
                return verdict;
            }
            (w.reason(), w.diagnostics())
        }
        Err(e) => {
            let why = format!("device journal unreadable: {}", error_chain(&e));
            (why.clone(), vec![why])
        }
    };
    diagnostics.extend(lines);
    match verdict {
        Verdict::Fail(r) => Verdict::Fail(format!("{r}; {why}")),
        Verdict::Pass | Verdict::Skip(_) => Verdict::Fail(why),
    }
}

pub(super) fn judge(
    s: &Scenario,
    out: &RunOutput,
    run: &RunDir,
    diagnostics: &mut Vec<String>,
) -> (Verdict, Nested) {
    save(run.join(&format!("{}.stdout", s.id)), &out.stdout);
    save(run.join(&format!("{}.stderr", s.id)), &out.stderr);
    let (verdict, parsed) = scenario::evaluate(out);
    let nested = match parsed {
        Ok(_) => Nested::Ktap(out.stdout.clone()),
        Err(_) if out.stdout.trim().is_empty() => Nested::None,
        Err(_) => Nested::Text(out.stdout.clone()),
    };
    if verdict != Verdict::Pass && !out.stderr.trim().is_empty() {
        diagnostics.push(format!("{} stderr (last lines):", s.id));
        diagnostics.extend(last_lines(&out.stderr, 15).into_iter().map(str::to_string));
    }
    (verdict, nested)
}
