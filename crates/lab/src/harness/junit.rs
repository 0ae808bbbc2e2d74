//! JUnit XML for CI engines (`pcisim lab suite --junit FILE`): the same verdicts as the KTAP
//! stream, in the shape GitHub Actions, GitLab and Jenkins test reports read.
//!
//! ```text
//! <testsuites name="pcisim lab suite" tests= failures= errors="0" skipped= time=>
//!   <testsuite name="pcisim lab suite" ...>          one per run
//!     <properties> kernel, shard, filter, exit code
//!     <testcase name="E1 enumeration" classname="pcisim.lab.gpu" time="0.312"/>
//!     <testcase ...><failure message="exit 1: ...">the diagnostics</failure></testcase>
//!     <testcase ...><skipped message="no vfio"/></testcase>
//!     <testcase ...><properties><property name="xfail" value="..."/></properties></testcase>
//! ```
//!
//! An expected failure that happened exactly as declared (`ok N name # XFAIL ...`) is a passed
//! testcase with an `xfail` property (JUnit has no XFAIL). Failures outside any scenario (a
//! violation in a VM's boot or teardown window, a device server that did not exit cleanly) are
//! one more failed testcase, `outside scenarios`, so a CI report does not show green when the
//! exit code is 1. Written with a small escaping writer (no XML crate needed to write).

use std::fmt::Write as _;
use std::io;
use std::path::Path;
use std::time::Duration;

/// How one scenario ended, as JUnit sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Passed.
    Pass,
    /// Passed as an expected failure; the note says what was expected and seen.
    Xfail(String),
    /// Failed; the one-line reason.
    Fail(String),
    /// Skipped; why.
    Skip(String),
}

/// One testcase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// The KTAP test name (`E1 enumeration`).
    pub name: String,
    /// `pcisim.lab.<profile>`: the VM the scenario ran in.
    pub classname: String,
    /// Wall time of the scenario.
    pub time: Duration,
    /// The verdict.
    pub outcome: Outcome,
    /// The scenario's diagnostics (guest stderr tail, violations, kernel reports), the body of a
    /// failure and otherwise the testcase's `system-out`.
    pub diagnostics: Vec<String>,
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Run {
    /// The cases in KTAP order.
    pub cases: Vec<Case>,
    /// Wall time of the run.
    pub time: Duration,
    /// `(name, value)` properties of the testsuite (kernel, shard, filter, exit code).
    pub properties: Vec<(String, String)>,
    /// Failures outside any scenario (boot/teardown windows, server exits), one line each.
    pub outside: Vec<String>,
}

/// `text` escaped for an attribute or element body; characters XML 1.0 cannot carry (control
/// characters other than tab, newline, carriage return) become `?`.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

impl Run {
    /// The JUnit XML document.
    pub fn render(&self, suite: &str) -> String {
        let outside = !self.outside.is_empty();
        let tests = self.cases.len() + usize::from(outside);
        let failures = self
            .cases
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Fail(_)))
            .count()
            + usize::from(outside);
        let skipped = self
            .cases
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Skip(_)))
            .count();
        let time = self.time.as_secs_f64();
        let name = escape(suite);
        let mut x = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(x, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
        let _ = writeln!(
            x,
            r#"<testsuites name="{name}" tests="{tests}" failures="{failures}" errors="0" skipped="{skipped}" time="{time:.3}">"#
        );
        let _ = writeln!(
            x,
            r#"  <testsuite name="{name}" tests="{tests}" failures="{failures}" errors="0" skipped="{skipped}" time="{time:.3}">"#
        );
        if !self.properties.is_empty() {
            let _ = writeln!(x, "    <properties>");
            for (k, v) in &self.properties {
                let _ = writeln!(
                    x,
                    r#"      <property name="{}" value="{}"/>"#,
                    escape(k),
                    escape(v)
                );
            }
            let _ = writeln!(x, "    </properties>");
        }
        for c in &self.cases {
            let _ = write!(
                x,
                r#"    <testcase name="{}" classname="{}" time="{:.3}""#,
                escape(&c.name),
                escape(&c.classname),
                c.time.as_secs_f64()
            );
            let body = escape(&c.diagnostics.join("\n"));
            match &c.outcome {
                Outcome::Pass if c.diagnostics.is_empty() => {
                    let _ = writeln!(x, "/>");
                    continue;
                }
                Outcome::Pass => {
                    let _ = writeln!(x, ">");
                }
                Outcome::Xfail(note) => {
                    let _ = writeln!(x, ">");
                    let _ = writeln!(
                        x,
                        r#"      <properties><property name="xfail" value="{}"/></properties>"#,
                        escape(note)
                    );
                }
                Outcome::Fail(why) => {
                    let _ = writeln!(x, ">");
                    let _ = writeln!(
                        x,
                        r#"      <failure message="{}" type="failure">{body}</failure>"#,
                        escape(why)
                    );
                }
                Outcome::Skip(why) => {
                    let _ = writeln!(x, ">");
                    let _ = writeln!(x, r#"      <skipped message="{}"/>"#, escape(why));
                }
            }
            if !c.diagnostics.is_empty() && !matches!(c.outcome, Outcome::Fail(_)) {
                let _ = writeln!(x, "      <system-out>{body}</system-out>");
            }
            let _ = writeln!(x, "    </testcase>");
        }
        if outside {
            let first = self.outside.first().cloned().unwrap_or_default();
            let _ = writeln!(
                x,
                r#"    <testcase name="outside scenarios" classname="pcisim.lab" time="0.000">"#
            );
            let _ = writeln!(
                x,
                r#"      <failure message="{}" type="failure">{}</failure>"#,
                escape(&first),
                escape(&self.outside.join("\n"))
            );
            let _ = writeln!(x, "    </testcase>");
        }
        let _ = writeln!(x, "  </testsuite>");
        let _ = writeln!(x, "</testsuites>");
        x
    }

    /// Writes [`Run::render`] to `path` (through a temporary file renamed into place, so a
    /// reader never sees half a document).
    pub fn write(&self, suite: &str, path: &Path) -> io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, self.render(suite))?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(name: &str, outcome: Outcome, diagnostics: &[&str]) -> Case {
        Case {
            name: name.into(),
            classname: "pcisim.lab.gpu".into(),
            time: Duration::from_millis(1500),
            outcome,
            diagnostics: diagnostics.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn test_escape() {
        assert_eq!(
            escape("a<b>&\"c'\u{1}\td\n"),
            "a&lt;b&gt;&amp;&quot;c&apos;?\td\n"
        );
    }

    /// The document parses as XML and says what each case came to.
    #[test]
    fn test_render_parses_with_each_outcome() {
        let run = Run {
            cases: vec![
                case("E1 enumeration", Outcome::Pass, &[]),
                case(
                    "E2 bar-mmio",
                    Outcome::Fail("exit 1: <scratch> & more".into()),
                    &["E2 stderr (last lines):", "boom \u{7}"],
                ),
                case("E3 msix", Outcome::Skip("no vfio".into()), &[]),
                case(
                    "R2b flr-dma-buggy-driver",
                    Outcome::Xfail("XFAIL dma_during_reset journaled as expected".into()),
                    &["XFAIL (expected) VIOLATION dma_during_reset"],
                ),
            ],
            time: Duration::from_secs(12),
            properties: vec![("shard".into(), "1/2".into())],
            outside: vec!["teardown: 1 device-side violation".into()],
        };
        let xml = run.render("pcisim lab suite");
        let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}\n{xml}"));
        let suites = doc.root_element();
        assert_eq!(suites.tag_name().name(), "testsuites");
        let suite: Vec<_> = suites
            .children()
            .filter(|n| n.has_tag_name("testsuite"))
            .collect();
        assert_eq!(suite.len(), 1);
        let s = suite[0];
        assert_eq!(s.attribute("tests"), Some("5"));
        assert_eq!(s.attribute("failures"), Some("2"));
        assert_eq!(s.attribute("skipped"), Some("1"));
        assert_eq!(s.attribute("time"), Some("12.000"));
        let cases: Vec<_> = s
            .children()
            .filter(|n| n.has_tag_name("testcase"))
            .collect();
        assert_eq!(cases.len(), 5);
        assert_eq!(cases[0].attribute("time"), Some("1.500"));
        assert!(cases[0].children().all(|n| !n.is_element()));
        let failure = cases[1]
            .children()
            .find(|n| n.has_tag_name("failure"))
            .unwrap();
        assert_eq!(
            failure.attribute("message"),
            Some("exit 1: <scratch> & more")
        );
        assert_eq!(failure.text(), Some("E2 stderr (last lines):\nboom ?"));
        assert!(cases[2].children().any(|n| n.has_tag_name("skipped")));
        let xfail = cases[3]
            .descendants()
            .find(|n| n.has_tag_name("property"))
            .unwrap();
        assert_eq!(xfail.attribute("name"), Some("xfail"));
        assert!(cases[3].children().all(|n| !n.has_tag_name("failure")));
        assert_eq!(cases[4].attribute("name"), Some("outside scenarios"));
    }
}
