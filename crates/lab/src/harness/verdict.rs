//! The verdict on one scenario, and how a guest program's result (exit status and KTAP) becomes
//! one. A leaf: the kernel-log oracle ([`crate::harness::dmesg`]), the host-scenario context
//! ([`crate::harness::host`]) and the suite all judge with it, and [`crate::harness::scenario`]
//! re-exports it, so none of them imports another for a verdict.

use crate::harness::ktap::{self, Directive, KtapError, KtapSummary};
use crate::vm::agent::RunOutput;

/// The verdict on one scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every assertion held.
    Pass,
    /// Something failed; the reason is one line.
    Fail(String),
    /// The scenario could not run here; the reason says why.
    Skip(String),
}

/// Describes up to three failed subtests: `2 of 7 subtests failed: class (got 0), bars`.
fn failures_text(s: &KtapSummary) -> String {
    let names: Vec<String> = s
        .failures()
        .take(3)
        .map(|r| match &r.directive {
            Some(Directive::Reason(why)) if !why.is_empty() => format!("{} ({why})", r.name),
            _ => r.name.clone(),
        })
        .collect();
    let more = if s.failed() > 3 { ", ..." } else { "" };
    format!(
        "{} of {} subtests failed: {}{more}",
        s.failed(),
        s.results.len(),
        names.join(", ")
    )
}

fn skip_reason(s: &KtapSummary) -> String {
    s.skip_all
        .clone()
        .or_else(|| {
            s.results.iter().find_map(|r| match &r.directive {
                Some(Directive::Skip(why)) if !why.is_empty() => Some(why.clone()),
                _ => None,
            })
        })
        .unwrap_or_else(|| "skipped by the guest program".into())
}

/// Judges a guest program's result: its exit status and whether its stdout is KTAP that agrees.
/// Returns the verdict and the parsed KTAP (or why it is not KTAP).
pub fn evaluate(out: &RunOutput) -> (Verdict, Result<KtapSummary, KtapError>) {
    let parsed = ktap::parse(&out.stdout);
    let not_ktap = |e: &KtapError| format!("guest output is not valid KTAP: {e}");
    let verdict = if out.timed_out {
        Verdict::Fail(format!(
            "timed out in the guest after {:.1} s",
            out.elapsed_ms as f64 / 1000.0
        ))
    } else if let Some(signal) = out.signal {
        Verdict::Fail(format!("killed by signal {signal}"))
    } else {
        match (out.exit, &parsed) {
            (Some(0), Ok(s)) if s.failed() == 0 => Verdict::Pass,
            (Some(0), Ok(s)) => Verdict::Fail(format!("exit 0 but {}", failures_text(s))),
            (Some(1), Ok(s)) if s.failed() > 0 => Verdict::Fail(failures_text(s)),
            (Some(1), Ok(_)) => Verdict::Fail("exit 1 (no failed subtest reported)".into()),
            (Some(4), Ok(s)) => Verdict::Skip(skip_reason(s)),
            (Some(code), Ok(_)) => Verdict::Fail(format!("exit {code}")),
            (Some(0) | Some(4), Err(e)) => Verdict::Fail(not_ktap(e)),
            (Some(code), Err(e)) => Verdict::Fail(format!("exit {code}; {}", not_ktap(e))),
            (None, _) => Verdict::Fail("no exit status from the agent".into()),
        }
    };
    (verdict, parsed)
}
