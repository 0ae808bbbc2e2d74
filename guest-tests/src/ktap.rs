//! KTAP v1 output (the kernel's test-anything format) with kselftest exit codes.
//!
//! ```text
//! KTAP version 1
//! 1..3
//! ok 1 ids
//! not ok 2 class # expected 0x030200, got 0x000000
//! ok 3 bar0 # SKIP not in the expectation
//! ```

use std::borrow::Cow;
use std::io::Write;

/// kselftest exit code: every test passed.
pub const EXIT_PASS: i32 = 0;
/// kselftest exit code: at least one test failed.
pub const EXIT_FAIL: i32 = 1;
/// kselftest exit code: everything was skipped.
pub const EXIT_SKIP: i32 = 4;

/// The result of one test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// Failed, with a one-line reason.
    Fail(String),
    /// Not run, with a one-line reason.
    Skip(String),
}

impl Outcome {
    /// `Pass` when `r` is `Ok`, `Fail(reason)` otherwise.
    pub fn from_result(r: Result<(), String>) -> Self {
        match r {
            Ok(()) => Outcome::Pass,
            Err(e) => Outcome::Fail(e),
        }
    }
}

/// Makes `s` safe for a single KTAP line: no newlines, no `#` (which would start a
/// directive), no control characters.
pub fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' | '\r' | '\t' => out.push(' '),
            '#' => out.push_str("(hash)"),
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    out.trim().to_string()
}

/// Formats one test line (without the trailing newline).
pub fn format_result(number: usize, name: &str, outcome: &Outcome) -> String {
    let name = sanitize(name);
    match outcome {
        Outcome::Pass => format!("ok {number} {name}"),
        Outcome::Fail(reason) => {
            let reason = sanitize(reason);
            if reason.is_empty() {
                format!("not ok {number} {name}")
            } else {
                format!("not ok {number} {name} # {reason}")
            }
        }
        Outcome::Skip(reason) => format!("ok {number} {name} # SKIP {}", sanitize(reason)),
    }
}

/// Ok if `errs` is empty, else one error with all of them joined by "; " (a step that
/// carries on past each failure and reports them together).
pub fn all_ok(errs: Vec<String>) -> Result<(), String> {
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

/// Formats a diagnostic: every line of `text` prefixed with `# `.
pub fn format_diag(text: &str) -> String {
    text.lines()
        .map(|l| format!("# {}", l.trim_end()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The exit code for a finished run.
pub fn exit_code(passed: usize, failed: usize, skipped: usize, planned: usize) -> i32 {
    let ran = passed + failed + skipped;
    if failed > 0 || ran != planned {
        EXIT_FAIL
    } else if passed == 0 && skipped > 0 {
        EXIT_SKIP
    } else {
        EXIT_PASS
    }
}

/// A KTAP reporter writing to stdout as tests complete (so a partial run is still
/// readable), counting outcomes for the exit code.
#[derive(Debug)]
pub struct Ktap {
    planned: usize,
    next: usize,
    passed: usize,
    failed: usize,
    skipped: usize,
    out: Vec<u8>,
    to_stdout: bool,
    /// The declared subtests (see [`Ktap::declared`]); empty for a plan counted by hand.
    subtests: Vec<Cow<'static, str>>,
    /// Results reported under a name their declaration does not allow, as diagnostics.
    undeclared: Vec<String>,
}

/// Whether `name` is one a declared subtest allows: the declaration is one or more patterns
/// separated by `|` (where an option picks the name: `"state-cleared|state-kept"`), each
/// literal except that `*` stands for any text (a name with a value in it: `"reset-*"`).
pub fn declared_name_matches(declaration: &str, name: &str) -> bool {
    declaration.split('|').any(|pattern| glob(pattern, name))
}

fn glob(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for m in middle {
        match rest.find(m) {
            Some(i) => rest = &rest[i + m.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// `subtests` as the owned-or-borrowed list [`Ktap::declared_names`] takes.
fn borrowed(subtests: &'static [&'static str]) -> Vec<Cow<'static, str>> {
    subtests.iter().map(|s| Cow::Borrowed(*s)).collect()
}

impl Ktap {
    /// Starts a run of `planned` tests and prints the header.
    pub fn new(planned: usize) -> Self {
        Self::with_sink(planned, true)
    }

    /// Starts a run whose plan is its declared subtests (one entry each, in the order they are
    /// reported: `const SUBTESTS: &[&str] = &["vfio-bind", "vfio-open", ...]`), so the plan is
    /// counted by the compiler, not by hand. An entry may allow several names
    /// ([`declared_name_matches`]). Every result is checked against its entry: one reported
    /// under another name fails the run (a diagnostic says which), so the declaration cannot
    /// drift from what the program does.
    pub fn declared(subtests: &'static [&'static str]) -> Self {
        Self::declared_names(borrowed(subtests))
    }

    /// [`Ktap::declared`] for a program whose subtests follow from its options (E3's one
    /// subtest per vector, E1's one per BAR): the program lists them before it runs them, the
    /// plan is their count and every result is checked against its entry in order.
    pub fn declared_names(subtests: Vec<Cow<'static, str>>) -> Self {
        let mut k = Self::new(subtests.len());
        k.subtests = subtests;
        k
    }

    fn with_sink(planned: usize, to_stdout: bool) -> Self {
        let mut k = Ktap {
            planned,
            next: 1,
            passed: 0,
            failed: 0,
            skipped: 0,
            out: Vec::new(),
            to_stdout,
            subtests: Vec::new(),
            undeclared: Vec::new(),
        };
        k.emit("KTAP version 1");
        k.emit(&format!("1..{planned}"));
        k
    }

    fn emit(&mut self, line: &str) {
        if self.to_stdout {
            let stdout = std::io::stdout();
            let mut lock = stdout.lock();
            // Nothing sensible can be done if stdout is gone; ignore the error.
            let _ = writeln!(lock, "{line}");
            let _ = lock.flush();
        } else {
            self.out.extend_from_slice(line.as_bytes());
            self.out.push(b'\n');
        }
    }

    /// Prints a `# ` diagnostic.
    pub fn diag(&mut self, text: &str) {
        let d = format_diag(text);
        if !d.is_empty() {
            self.emit(&d);
        }
    }

    /// Records and prints one test result.
    pub fn result(&mut self, name: &str, outcome: Outcome) {
        match &outcome {
            Outcome::Pass => self.passed += 1,
            Outcome::Fail(_) => self.failed += 1,
            Outcome::Skip(_) => self.skipped += 1,
        }
        if !self.subtests.is_empty() {
            match self.subtests.get(self.next - 1) {
                Some(d) if declared_name_matches(d, name) => {}
                Some(d) => self.undeclared.push(format!(
                    "subtest {} reported as {name:?}, declared as {d:?}",
                    self.next
                )),
                None => self.undeclared.push(format!(
                    "subtest {} {name:?} is beyond the {} declared",
                    self.next,
                    self.subtests.len()
                )),
            }
        }
        let line = format_result(self.next, name, &outcome);
        self.next += 1;
        self.emit(&line);
    }

    /// Shorthand: pass or fail from a `Result`.
    pub fn check(&mut self, name: &str, r: Result<(), String>) -> bool {
        let ok = r.is_ok();
        self.result(name, Outcome::from_result(r));
        ok
    }

    /// Like [`Ktap::check`], keeping the value: `Some` of it if `r` passed.
    pub fn check_value<T>(&mut self, name: &str, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => {
                self.result(name, Outcome::Pass);
                Some(v)
            }
            Err(e) => {
                self.result(name, Outcome::Fail(e));
                None
            }
        }
    }

    /// Prints a totals line and returns the kselftest exit code. Tests that were
    /// planned but never reported count as failures.
    pub fn finish(mut self) -> i32 {
        let missing = self.planned.saturating_sub(self.next - 1);
        if missing > 0 {
            self.diag(&format!("{missing} planned test(s) were not reported"));
        }
        for u in std::mem::take(&mut self.undeclared) {
            self.diag(&format!("not as declared: {u}"));
            self.failed += 1;
        }
        self.diag(&format!(
            "totals: pass:{} fail:{} skip:{}",
            self.passed, self.failed, self.skipped
        ));
        exit_code(self.passed, self.failed, self.skipped, self.planned)
    }

    #[cfg(test)]
    fn captured(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_ok_joins_every_error() {
        assert_eq!(all_ok(vec![]), Ok(()));
        assert_eq!(
            all_ok(vec!["a".into(), "b".into()]),
            Err("a; b".to_string())
        );
    }

    #[test]
    fn formats_lines() {
        assert_eq!(format_result(1, "ids", &Outcome::Pass), "ok 1 ids");
        assert_eq!(
            format_result(2, "class", &Outcome::Fail("expected 1, got 2".into())),
            "not ok 2 class # expected 1, got 2"
        );
        assert_eq!(
            format_result(3, "bar0", &Outcome::Skip("absent".into())),
            "ok 3 bar0 # SKIP absent"
        );
        assert_eq!(
            format_result(4, "x", &Outcome::Fail(String::new())),
            "not ok 4 x"
        );
    }

    #[test]
    fn sanitizes_reasons() {
        assert_eq!(
            format_result(1, "a", &Outcome::Fail("line1\nline2 # x".into())),
            "not ok 1 a # line1 line2 (hash) x"
        );
        assert_eq!(sanitize("a\u{1}b"), "a?b");
    }

    #[test]
    fn diag_prefixes_every_line() {
        assert_eq!(format_diag("a\nb  "), "# a\n# b");
        assert_eq!(format_diag(""), "");
    }

    #[test]
    fn declared_subtests_are_the_plan() {
        const SUBTESTS: &[&str] = &["bind", "open", "reset"];
        assert_eq!(Ktap::declared(SUBTESTS).planned, 3);
        let mut k = Ktap::with_sink(SUBTESTS.len(), false);
        for s in SUBTESTS {
            k.result(s, Outcome::Pass);
        }
        assert!(k.captured().starts_with("KTAP version 1\n1..3\n"));
        assert_eq!(k.finish(), EXIT_PASS);
        // A result under a name its entry does not allow: the run fails, and says why.
        let mut k = Ktap::with_sink(SUBTESTS.len(), false);
        k.subtests = borrowed(SUBTESTS);
        k.result("bind", Outcome::Pass);
        k.result("reset", Outcome::Pass);
        k.result("open", Outcome::Pass);
        assert_eq!(k.undeclared.len(), 2, "{:?}", k.undeclared);
        assert!(k.undeclared[0].contains("subtest 2 reported as \"reset\", declared as \"open\""));
        assert_eq!(k.finish(), EXIT_FAIL);
        // One more result than declared.
        const ONE: &[&str] = &["a"];
        let mut k = Ktap::with_sink(ONE.len(), false);
        k.subtests = borrowed(ONE);
        k.result("a", Outcome::Pass);
        k.result("b", Outcome::Pass);
        assert!(k.undeclared[0].contains("beyond the 1 declared"));
        assert_eq!(k.finish(), EXIT_FAIL);
        // One declared subtest not reported: a failure.
        let mut k = Ktap::with_sink(SUBTESTS.len(), false);
        k.result(SUBTESTS[0], Outcome::Pass);
        k.result(SUBTESTS[1], Outcome::Pass);
        assert_eq!(k.finish(), EXIT_FAIL);
    }

    #[test]
    fn declared_names_allow_alternatives_and_wildcards() {
        // (declaration, name, allowed)
        let cases = [
            ("dirty", "dirty", true),
            ("dirty", "dirty2", false),
            ("dirty", "dirt", false),
            ("state-cleared|state-kept", "state-kept", true),
            ("state-cleared|state-kept", "state-gone", false),
            ("reset-*", "reset-flr", true),
            ("reset-*", "irq-flr", false),
            (
                "map * MiB in 4 KiB pages",
                "map 64 MiB in 4 KiB pages",
                true,
            ),
            (
                "map * MiB in 4 KiB pages",
                "map 64 MiB in 2 MiB pages",
                false,
            ),
            ("a*b*c", "a-b-c", true),
            ("a*bc*c", "abc", false),
            ("x (IOVA *)", "x (IOVA 0x1000)", true),
        ];
        for (declaration, name, allowed) in cases {
            assert_eq!(
                declared_name_matches(declaration, name),
                allowed,
                "{declaration:?} {name:?}"
            );
        }
    }

    #[test]
    fn check_value_reports_and_keeps_the_value() {
        let mut k = Ktap::with_sink(2, false);
        assert_eq!(k.check_value("a", Ok(7)), Some(7));
        assert_eq!(k.check_value::<u8>("b", Err("bad".into())), None);
        assert_eq!(
            k.captured(),
            "KTAP version 1\n1..2\nok 1 a\nnot ok 2 b # bad\n"
        );
    }

    #[test]
    fn reporter_output_and_exit_codes() {
        let mut k = Ktap::with_sink(3, false);
        k.result("a", Outcome::Pass);
        k.diag("hello");
        k.result("b", Outcome::Fail("bad".into()));
        k.result("c", Outcome::Skip("why".into()));
        assert_eq!(
            k.captured(),
            "KTAP version 1\n1..3\nok 1 a\n# hello\nnot ok 2 b # bad\nok 3 c # SKIP why\n"
        );
        assert_eq!(k.finish(), EXIT_FAIL);

        let mut k = Ktap::with_sink(2, false);
        k.result("a", Outcome::Pass);
        k.result("b", Outcome::Skip("x".into()));
        assert_eq!(k.finish(), EXIT_PASS);

        let mut k = Ktap::with_sink(1, false);
        k.result("a", Outcome::Skip("x".into()));
        assert_eq!(k.finish(), EXIT_SKIP);

        // A planned test that never reported is a failure.
        let mut k = Ktap::with_sink(2, false);
        k.result("a", Outcome::Pass);
        assert_eq!(k.finish(), EXIT_FAIL);
    }
}
