//! KTAP v1: a writer with nesting for the suite's own output, and a small strict parser for the
//! guest programs' output (to count results and to reject output that is not KTAP).
//!
//! ```text
//! KTAP version 1
//! 1..2
//!   KTAP version 1          <- a guest program's own KTAP, nested by two spaces
//!   1..1
//!   ok 1 vendor id
//! ok 1 E1 enumeration
//! not ok 2 E2 bar-mmio # guest exit 1: 1 of 3 subtests failed (scratch)
//! ```

use std::io::{self, Write};

/// The first line of every KTAP v1 document.
pub const VERSION_LINE: &str = "KTAP version 1";

/// The outcome of one test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// `ok N name`
    Pass,
    /// `not ok N name # reason`
    Fail,
    /// `ok N name # SKIP reason`
    Skip,
}

/// One result line to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResult {
    /// 1-based test number.
    pub number: usize,
    /// The test's name (single line, no `#`).
    pub name: String,
    /// The outcome.
    pub status: Status,
    /// Why it failed or was skipped (optional for a pass).
    pub reason: Option<String>,
}

impl TestResult {
    /// The KTAP result line, without indentation or newline.
    pub fn line(&self) -> String {
        let name = one_line(&self.name).replace('#', "");
        let reason = self
            .reason
            .as_deref()
            .map(one_line)
            .filter(|r| !r.is_empty());
        match (&self.status, reason) {
            (Status::Pass, None) => format!("ok {} {name}", self.number),
            (Status::Pass, Some(r)) => format!("ok {} {name} # {r}", self.number),
            (Status::Fail, None) => format!("not ok {} {name}", self.number),
            (Status::Fail, Some(r)) => format!("not ok {} {name} # {r}", self.number),
            (Status::Skip, None) => format!("ok {} {name} # SKIP", self.number),
            (Status::Skip, Some(r)) => format!("ok {} {name} # SKIP {r}", self.number),
        }
    }
}

fn one_line(s: &str) -> String {
    s.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes KTAP lines at a nesting level (two spaces per level), flushing after each line so that a
/// reader sees results as they happen.
pub struct KtapWriter<'a> {
    out: &'a mut dyn Write,
    indent: usize,
}

impl<'a> KtapWriter<'a> {
    /// A writer for the top level.
    pub fn new(out: &'a mut dyn Write) -> Self {
        KtapWriter { out, indent: 0 }
    }

    /// A writer for subtests of the current level (indented two more spaces).
    pub fn nested(&mut self) -> KtapWriter<'_> {
        KtapWriter {
            out: &mut *self.out,
            indent: self.indent + 2,
        }
    }

    fn line(&mut self, text: &str) -> io::Result<()> {
        if text.is_empty() {
            writeln!(self.out)?;
        } else {
            writeln!(self.out, "{:indent$}{text}", "", indent = self.indent)?;
        }
        self.out.flush()
    }

    /// Writes already-formatted KTAP (another writer's output, e.g. a VM's buffered results)
    /// verbatim.
    pub fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.out.flush()
    }

    /// `KTAP version 1` and the plan `1..count`.
    pub fn header(&mut self, count: usize) -> io::Result<()> {
        self.line(VERSION_LINE)?;
        self.line(&format!("1..{count}"))
    }

    /// A result line.
    pub fn result(&mut self, result: &TestResult) -> io::Result<()> {
        self.line(&result.line())
    }

    /// A diagnostic: `# text`, one per line of `text`.
    pub fn diagnostic(&mut self, text: &str) -> io::Result<()> {
        for l in text.lines() {
            if l.is_empty() {
                self.line("#")?;
            } else {
                self.line(&format!("# {l}"))?;
            }
        }
        Ok(())
    }

    /// Copies a whole document (e.g. a guest program's KTAP) at this writer's level, line by
    /// line. Trailing blank lines are dropped.
    pub fn document(&mut self, text: &str) -> io::Result<()> {
        for l in text.trim_end().lines() {
            self.line(l.trim_end_matches('\r'))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------------

/// Why a document is not valid KTAP v1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KtapError {
    /// Nothing (or only blank lines).
    #[error("Empty output")]
    Empty,
    /// The first line is not `KTAP version 1`.
    #[error("First line is {0:?}, not \"KTAP version 1\"")]
    NoVersion(String),
    /// A top-level line that is neither a plan, a result nor a diagnostic.
    #[error("Line {line} is not KTAP: {text:?}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// No `1..N` line.
    #[error("No test plan (1..N)")]
    NoPlan,
    /// More than one plan at the top level.
    #[error("Line {0}: second test plan")]
    DuplicatePlan(usize),
    /// A result's number is not the next one.
    #[error("Line {line}: test number {found}, expected {expected}")]
    OutOfOrder {
        /// 1-based line number.
        line: usize,
        /// The number that should have come.
        expected: usize,
        /// The number that came.
        found: usize,
    },
    /// The plan promises a different number of results.
    #[error("Plan 1..{plan} but {results} results")]
    PlanMismatch {
        /// The planned count.
        plan: usize,
        /// The results seen.
        results: usize,
    },
}

/// A result's directive (the part after ` # `).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Directive {
    /// `# SKIP reason`
    Skip(String),
    /// `# TODO reason`
    Todo(String),
    /// Any other text, typically why a test failed.
    Reason(String),
}

/// A parsed top-level result line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedResult {
    /// `ok` (true) or `not ok` (false).
    pub ok: bool,
    /// The test number.
    pub number: usize,
    /// The test name.
    pub name: String,
    /// The directive, if any.
    pub directive: Option<Directive>,
}

impl ParsedResult {
    /// An `ok` line with a SKIP directive.
    pub fn is_skip(&self) -> bool {
        matches!(self.directive, Some(Directive::Skip(_)))
    }
}

/// A parsed KTAP document: the top-level plan and results (nested subtests are accepted but not
/// counted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KtapSummary {
    /// `N` of `1..N`.
    pub plan: usize,
    /// The reason of a `1..0 # SKIP reason` plan.
    pub skip_all: Option<String>,
    /// The top-level results in order.
    pub results: Vec<ParsedResult>,
}

impl KtapSummary {
    /// Results that passed (not skipped).
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.ok && !r.is_skip()).count()
    }

    /// Results that failed.
    pub fn failed(&self) -> usize {
        self.results.iter().filter(|r| !r.ok).count()
    }

    /// Results that were skipped.
    pub fn skipped(&self) -> usize {
        self.results.iter().filter(|r| r.ok && r.is_skip()).count()
    }

    /// The failed results.
    pub fn failures(&self) -> impl Iterator<Item = &ParsedResult> {
        self.results.iter().filter(|r| !r.ok)
    }
}

fn parse_directive(text: &str) -> Directive {
    let t = text.trim();
    let upper = t.to_ascii_uppercase();
    if upper == "SKIP" || upper.starts_with("SKIP ") {
        Directive::Skip(t[4..].trim().to_string())
    } else if upper == "TODO" || upper.starts_with("TODO ") {
        Directive::Todo(t[4..].trim().to_string())
    } else {
        Directive::Reason(t.to_string())
    }
}

/// `ok 3 name # SKIP why` → Some(result); `None` if the line is not a result line.
fn parse_result(line: &str) -> Option<ParsedResult> {
    let (ok, rest) = if let Some(r) = line.strip_prefix("not ok ") {
        (false, r)
    } else if let Some(r) = line.strip_prefix("ok ") {
        (true, r)
    } else {
        return None;
    };
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let number = rest[..digits].parse().ok()?;
    let rest = &rest[digits..];
    if !(rest.is_empty() || rest.starts_with(' ')) {
        return None;
    }
    let (name, directive) = match rest
        .find(" # ")
        .or_else(|| rest.strip_suffix(" #").map(str::len))
    {
        Some(i) => {
            let d = rest[i..].trim_start_matches([' ', '#']).trim();
            (&rest[..i], (!d.is_empty()).then(|| parse_directive(d)))
        }
        None => (rest, None),
    };
    let name = name.trim().trim_start_matches("- ").trim().to_string();
    Some(ParsedResult {
        ok,
        number,
        name,
        directive,
    })
}

/// `1..N [# SKIP reason]` → (N, reason).
fn parse_plan(line: &str) -> Option<(usize, Option<String>)> {
    let rest = line.strip_prefix("1..")?;
    let (count, comment) = match rest.split_once('#') {
        Some((c, d)) => (c.trim(), Some(d)),
        None => (rest.trim(), None),
    };
    let count = count.parse().ok()?;
    let skip = comment.and_then(|d| match parse_directive(d) {
        Directive::Skip(r) => Some(r),
        _ => None,
    });
    Some((count, skip))
}

/// Parses a KTAP v1 document strictly at the top level: the version line first, exactly one plan,
/// results numbered 1..N matching the plan, diagnostics (`#`) and blank lines anywhere, indented
/// lines (nested subtests) anywhere after the version line; nothing else.
pub fn parse(text: &str) -> Result<KtapSummary, KtapError> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r').trim_end()))
        .skip_while(|(_, l)| l.is_empty());
    let (_, first) = lines.next().ok_or(KtapError::Empty)?;
    if first != VERSION_LINE {
        return Err(KtapError::NoVersion(first.to_string()));
    }
    let mut plan: Option<(usize, Option<String>)> = None;
    let mut results: Vec<ParsedResult> = Vec::new();
    for (n, line) in lines {
        if line.is_empty()
            || line.starts_with(' ')
            || line.starts_with('\t')
            || line.starts_with('#')
        {
            continue;
        }
        if let Some(p) = parse_plan(line) {
            if plan.is_some() {
                return Err(KtapError::DuplicatePlan(n));
            }
            plan = Some(p);
        } else if let Some(r) = parse_result(line) {
            let expected = results.len() + 1;
            if r.number != expected {
                return Err(KtapError::OutOfOrder {
                    line: n,
                    expected,
                    found: r.number,
                });
            }
            results.push(r);
        } else {
            return Err(KtapError::BadLine {
                line: n,
                text: line.to_string(),
            });
        }
    }
    let (count, skip_all) = plan.ok_or(KtapError::NoPlan)?;
    if count != results.len() {
        return Err(KtapError::PlanMismatch {
            plan: count,
            results: results.len(),
        });
    }
    Ok(KtapSummary {
        plan: count,
        skip_all,
        results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(number: usize, name: &str, status: Status, reason: Option<&str>) -> TestResult {
        TestResult {
            number,
            name: name.into(),
            status,
            reason: reason.map(Into::into),
        }
    }

    #[test]
    fn test_writer_nests_guest_output_two_spaces() {
        let mut out = Vec::new();
        {
            let mut w = KtapWriter::new(&mut out);
            w.header(2).unwrap();
            w.nested()
                .document("KTAP version 1\n1..1\nok 1 vendor id\n\n")
                .unwrap();
            w.result(&result(1, "E1 enumeration", Status::Pass, None))
                .unwrap();
            w.nested().diagnostic("guest stderr:\nboom").unwrap();
            w.result(&result(
                2,
                "E2 bar-mmio",
                Status::Fail,
                Some("exit 1\nmore"),
            ))
            .unwrap();
            w.nested().nested().document("ok 1 deep").unwrap();
        }
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "KTAP version 1\n1..2\n  KTAP version 1\n  1..1\n  ok 1 vendor id\nok 1 E1 enumeration\n  # guest stderr:\n  # boom\nnot ok 2 E2 bar-mmio # exit 1 more\n    ok 1 deep\n"
        );
    }

    #[test]
    fn test_result_lines_for_each_status() {
        assert_eq!(
            result(3, "E3 msix-delivery", Status::Skip, Some("no MSI-X")).line(),
            "ok 3 E3 msix-delivery # SKIP no MSI-X"
        );
        assert_eq!(
            result(1, "a#b", Status::Skip, None).line(),
            "ok 1 ab # SKIP"
        );
        assert_eq!(result(1, "x", Status::Fail, None).line(), "not ok 1 x");
    }

    #[test]
    fn test_writer_output_parses_back() {
        let mut out = Vec::new();
        {
            let mut w = KtapWriter::new(&mut out);
            w.header(3).unwrap();
            w.nested()
                .document("KTAP version 1\n1..1\nnot ok 1 x # bad")
                .unwrap();
            w.result(&result(1, "E1 enumeration", Status::Fail, Some("bad")))
                .unwrap();
            w.result(&result(2, "E2 bar-mmio", Status::Pass, None))
                .unwrap();
            w.result(&result(3, "E3 msix-delivery", Status::Skip, Some("why")))
                .unwrap();
        }
        let s = parse(&String::from_utf8(out).unwrap()).unwrap();
        assert_eq!((s.plan, s.passed(), s.failed(), s.skipped()), (3, 1, 1, 1));
        assert_eq!(
            s.results[0].directive,
            Some(Directive::Reason("bad".into()))
        );
        assert_eq!(s.results[2].directive, Some(Directive::Skip("why".into())));
        assert_eq!(s.results[1].name, "E2 bar-mmio");
    }

    #[test]
    fn test_parse_guest_output_with_diagnostics_and_nesting() {
        let text = "\n# preamble\nKTAP version 1\n# device 0000:01:00.0\n1..3\nok 1 - vendor\n  KTAP version 1\n  1..1\n  not ok 1 inner\nnot ok 2 class # got 0x000000\nok 3 bars # SKIP no BAR2\n# totals: pass:1 fail:1 skip:1\n";
        // A leading comment before the version line is not KTAP.
        assert!(matches!(parse(text), Err(KtapError::NoVersion(_))));
        let text = text.replacen("\n# preamble\n", "", 1);
        let s = parse(&text).unwrap();
        assert_eq!(s.plan, 3);
        assert_eq!(s.results[0].name, "vendor");
        assert!(!s.results[1].ok);
        assert_eq!(s.failures().count(), 1);
        assert_eq!(s.skipped(), 1);
    }

    #[test]
    fn test_parse_rejects_invalid_documents() {
        assert_eq!(parse(""), Err(KtapError::Empty));
        assert_eq!(parse("\n\n"), Err(KtapError::Empty));
        assert!(matches!(
            parse("TAP version 13\n1..0\n"),
            Err(KtapError::NoVersion(_))
        ));
        assert_eq!(parse("KTAP version 1\nok 1 a\n"), Err(KtapError::NoPlan));
        assert_eq!(
            parse("KTAP version 1\n1..2\nok 1 a\n"),
            Err(KtapError::PlanMismatch {
                plan: 2,
                results: 1
            })
        );
        assert_eq!(
            parse("KTAP version 1\n1..2\nok 1 a\nok 3 b\n"),
            Err(KtapError::OutOfOrder {
                line: 4,
                expected: 2,
                found: 3
            })
        );
        assert_eq!(
            parse("KTAP version 1\n1..1\nhello\nok 1 a\n"),
            Err(KtapError::BadLine {
                line: 3,
                text: "hello".into()
            })
        );
        assert_eq!(
            parse("KTAP version 1\n1..1\nok 1 a\n1..1\n"),
            Err(KtapError::DuplicatePlan(4))
        );
        assert!(matches!(
            parse("KTAP version 1\n1..1\nokay 1 a\n"),
            Err(KtapError::BadLine { .. })
        ));
    }

    #[test]
    fn test_parse_skip_all_plan_and_plan_at_end() {
        let s = parse("KTAP version 1\n1..0 # SKIP no device\n").unwrap();
        assert_eq!(s.plan, 0);
        assert_eq!(s.skip_all.as_deref(), Some("no device"));
        let s = parse("KTAP version 1\nok 1 a\r\nok 2 b #\n1..2\n").unwrap();
        assert_eq!(s.passed(), 2);
        assert_eq!(s.results[1].name, "b");
    }
}
