//! The suite's KTAP stream and progress lines, and what it shows of a VM that did not come up.

use super::*;

/// What a scenario contributes inside its KTAP block.
pub(super) enum Nested {
    /// Nothing (it did not run).
    None,
    /// Valid guest KTAP, nested verbatim.
    Ktap(String),
    /// Output that is not KTAP: shown as diagnostics so the stream stays valid.
    Text(String),
}

pub(super) struct Report<'a> {
    pub(super) ktap: KtapWriter<'a>,
    pub(super) progress: &'a mut dyn Write,
    pub(super) next: usize,
    pub(super) passed: usize,
    pub(super) failed: usize,
    pub(super) skipped: usize,
    /// Skips of scenarios whose required kernel feature this kernel lacks
    /// ([`crate::harness::scenario::Scenario::requires`]): not applicable, not incomplete.
    pub(super) not_applicable: usize,
    pub(super) skipped_subtests: usize,
    /// Every result written, for `--junit`.
    pub(super) cases: Vec<crate::harness::junit::Case>,
    /// Failures outside any scenario (boot/teardown windows, server exits), for `--junit`.
    pub(super) outside: Vec<String>,
    /// The vfio-user reply latencies read at the VMs' teardowns ([`super::latency`]).
    pub(super) replies: super::latency::Tally,
}

impl<'a> Report<'a> {
    /// A report that writes KTAP to `ktap` and progress lines to `progress`, numbering from 1.
    pub(super) fn new(ktap: &'a mut dyn Write, progress: &'a mut dyn Write) -> Self {
        Report {
            ktap: KtapWriter::new(ktap),
            progress,
            next: 1,
            passed: 0,
            failed: 0,
            skipped: 0,
            not_applicable: 0,
            skipped_subtests: 0,
            cases: Vec::new(),
            outside: Vec::new(),
            replies: Default::default(),
        }
    }

    /// A top-level KTAP diagnostic about something outside any scenario that fails the run
    /// (kept for `--junit`'s `outside scenarios` case).
    pub(super) fn outside_failure(&mut self, text: &str) -> Result<(), LabError> {
        self.outside.push(text.to_string());
        self.ktap.diagnostic(text).map_err(LabError::Output)
    }

    pub(super) fn line(&mut self, text: &str) -> Result<(), LabError> {
        writeln!(self.progress, "lab: {text}")
            .and_then(|_| self.progress.flush())
            .map_err(LabError::Output)
    }

    pub(super) fn scenario(
        &mut self,
        s: &Scenario,
        verdict: &Verdict,
        nested: &Nested,
        diagnostics: &[String],
        elapsed: Duration,
    ) -> Result<(), LabError> {
        self.scenario_noted(s, verdict, nested, diagnostics, elapsed, None)
    }

    /// [`Report::scenario`] with a note on a passing result line (`ok N name # note`).
    pub(super) fn scenario_noted(
        &mut self,
        s: &Scenario,
        verdict: &Verdict,
        nested: &Nested,
        diagnostics: &[String],
        elapsed: Duration,
        note: Option<String>,
    ) -> Result<(), LabError> {
        let number = self.next;
        self.next += 1;
        {
            let mut inner = self.ktap.nested();
            match nested {
                Nested::None => {}
                Nested::Ktap(text) => inner.document(text).map_err(LabError::Output)?,
                Nested::Text(text) => inner.diagnostic(text).map_err(LabError::Output)?,
            }
            for d in diagnostics {
                inner.diagnostic(d).map_err(LabError::Output)?;
            }
        }
        let (status, reason, word) = match verdict {
            Verdict::Pass => (Status::Pass, note, "ok"),
            Verdict::Fail(r) => (Status::Fail, Some(r.clone()), "FAIL"),
            Verdict::Skip(r) => (Status::Skip, Some(r.clone()), "SKIP"),
        };
        match status {
            Status::Pass => {
                self.passed += 1;
                if let Nested::Ktap(text) = nested {
                    self.skipped_subtests += count_skipped(text);
                }
            }
            Status::Fail => self.failed += 1,
            Status::Skip if s.requires.is_some() => self.not_applicable += 1,
            Status::Skip => self.skipped += 1,
        }
        self.ktap
            .result(&TestResult {
                number,
                name: s.name.to_string(),
                status,
                reason: reason.clone(),
            })
            .map_err(LabError::Output)?;
        self.cases.push(crate::harness::junit::Case {
            name: s.name.to_string(),
            classname: format!("pcisim.lab.{}", s.profile().profile().name),
            time: elapsed,
            outcome: match (verdict, &reason) {
                (Verdict::Pass, Some(note)) if note.contains("XFAIL") => {
                    crate::harness::junit::Outcome::Xfail(note.clone())
                }
                (Verdict::Pass, _) => crate::harness::junit::Outcome::Pass,
                (Verdict::Fail(r), _) => crate::harness::junit::Outcome::Fail(r.clone()),
                (Verdict::Skip(r), _) => crate::harness::junit::Outcome::Skip(r.clone()),
            },
            diagnostics: diagnostics.to_vec(),
        });
        let why = reason.map(|r| format!(": {r}")).unwrap_or_default();
        self.line(&format!(
            "{}: {word} ({:.1} s){why}",
            s.name,
            elapsed.as_secs_f64()
        ))
    }
}

/// Skipped results at any depth of a KTAP document (`ok N name # SKIP ...`, `1..0 # SKIP`).
pub(super) fn count_skipped(ktap: &str) -> usize {
    ktap.lines()
        .map(str::trim_start)
        .filter(|l| {
            let directive = l.split_once(" # ").map(|(_, d)| d.trim_start());
            let skip = directive
                .is_some_and(|d| d.get(..4).is_some_and(|w| w.eq_ignore_ascii_case("skip")));
            skip && (l.starts_with("ok ") || l.starts_with("1..0"))
        })
        .count()
}

/// Shows the last `n` lines of a log on the progress stream (not after an interrupt: the user
/// asked to stop, not for logs).
pub(super) fn show_tail(
    report: &mut Report<'_>,
    title: &str,
    path: &Path,
    n: usize,
) -> Result<(), LabError> {
    boot::show_tail(&mut |l| report.line(l), title, path, n)
}
