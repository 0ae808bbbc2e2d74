//! Finding the reports in the kernel's log: which line opens which kind of report, the lines
//! and call trace that go with it.

use super::*;

/// A trigger line joins the report before it if it comes within this many lines of that
/// report's last trigger line (the lines of one splat).
pub const ABSORB_LINES: usize = 8;
/// How many lines of a report are kept (from its first trigger line).
pub(super) const REPORT_LINES: usize = 6;

/// The titles of lockdep's and RCU-lockdep's `WARNING: ...` splats.
pub(super) const LOCKDEP_TITLES: &[&str] = &[
    "possible recursive locking detected",
    "possible circular locking dependency detected",
    "inconsistent lock state",
    "suspicious RCU usage",
    "possible irq lock inversion dependency detected",
    "lock order detected",
    "bad unlock balance detected",
    "held lock freed",
    "lock held when returning to user space",
    "Nested lock was not taken",
    "bad contention detected",
    "lock held at task exit time",
    "locking correctness validator",
];

/// The report kind a kernel line announces, if any.
pub fn classify(line: &str) -> Option<KernelReport> {
    let m = line.trim();
    let starts = |p: &str| m.starts_with(p);
    if m.contains(" blocked for more than ") && m.contains(" seconds") {
        return Some(KernelReport::HungTask);
    }
    if starts("BUG: KASAN: ") {
        return Some(KernelReport::Kasan);
    }
    if starts("BUG: KFENCE: ") {
        return Some(KernelReport::Kfence);
    }
    if starts("UBSAN: ") {
        return Some(KernelReport::Ubsan);
    }
    if starts("refcount_t: ") {
        return Some(KernelReport::Refcount);
    }
    if starts("list_add corruption")
        || starts("list_del corruption")
        || starts("list_add double add")
    {
        return Some(KernelReport::ListCorruption);
    }
    if (starts("WARNING: ") || starts("INFO: ") || starts("[ BUG: "))
        && LOCKDEP_TITLES.iter().any(|t| m.contains(t))
    {
        return Some(KernelReport::Lockdep);
    }
    if starts("[ BUG: ") {
        return Some(KernelReport::Lockdep);
    }
    if starts("Oops: ")
        || starts("general protection fault")
        || m.contains("Internal error: Oops")
        || starts("Kernel panic - not syncing")
    {
        return Some(KernelReport::Oops);
    }
    if starts("kernel BUG at ") || starts("BUG: ") || m.contains("watchdog: BUG: ") {
        return Some(KernelReport::Bug);
    }
    if m.contains("[ cut here ]") || starts("WARNING: ") {
        return Some(KernelReport::Warning);
    }
    None
}

/// One report found in a kernel log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its kind.
    pub kind: KernelReport,
    /// Its first lines (from its first trigger line).
    pub lines: Vec<String>,
    /// The [`ALLOWED_LINES`] reason, if one of its trigger lines is known to be benign.
    pub allowed: Option<&'static str>,
    /// The taint bits its lines set themselves.
    pub(super) taints: u64,
}

impl Found {
    /// Its headline: the trigger line that gave it its kind (else its first line).
    pub fn headline(&self) -> &str {
        let of_kind = |l: &&String| classify(l) == Some(self.kind);
        self.lines
            .iter()
            .filter(of_kind)
            .find(|l| !l.contains("[ cut here ]"))
            .or_else(|| self.lines.iter().find(of_kind))
            .or(self.lines.first())
            .map_or("", String::as_str)
    }
}

/// Strips a `dmesg` prefix (`<4>`, `[   12.345678] `) from a line of dmesg text.
pub(super) fn strip_dmesg_prefix(line: &str) -> &str {
    let mut l = line.trim_end_matches('\r');
    if let Some(rest) = l.strip_prefix('<') {
        if let Some((n, rest)) = rest.split_once('>') {
            if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
                l = rest;
            }
        }
    }
    let t = l.trim_start();
    if let Some(rest) = t.strip_prefix('[') {
        if let Some((ts, rest)) = rest.split_once(']') {
            if ts.trim().bytes().all(|b| b.is_ascii_digit() || b == b'.') && !ts.trim().is_empty() {
                return rest.strip_prefix(' ').unwrap_or(rest);
            }
        }
    }
    l
}

/// How many frames of a report's call trace are kept.
pub(super) const TRACE_FRAMES: usize = 4;
/// How far after a report's first lines its `Call Trace:` is looked for (past a register dump).
pub(super) const TRACE_SEARCH: usize = 30;

/// The first frames of the call trace that begins within [`TRACE_SEARCH`] lines of `first`
/// (without the `? ` unreliable frames and the `<TASK>` markers), from line `end` on: where
/// the report came from.
pub(super) fn call_trace(lines: &[&str], first: usize, end: usize) -> Vec<String> {
    let Some(start) = lines
        .iter()
        .enumerate()
        .skip(first + 1)
        .take(TRACE_SEARCH)
        .find(|(_, l)| l.trim() == "Call Trace:")
        .map(|(i, _)| i)
    else {
        return Vec::new();
    };
    lines[(start + 1).max(end)..]
        .iter()
        .map(|l| l.trim())
        .take_while(|l| *l != "</TASK>" && classify(l).is_none())
        .filter(|l| !l.starts_with('<') && !l.starts_with("? ") && !l.is_empty())
        .take(TRACE_FRAMES)
        .map(str::to_string)
        .collect()
}

/// The reports in kernel log lines (message text; a `dmesg`/`dmesg -r` prefix is stripped).
pub fn scan<S: AsRef<str>>(lines: &[S]) -> Vec<Found> {
    let lines: Vec<&str> = lines
        .iter()
        .map(|l| strip_dmesg_prefix(l.as_ref()))
        .collect();
    // (report, index of its first line, index of its last trigger line)
    let mut found: Vec<(Found, usize, usize)> = Vec::new();
    // Whether the last report's splat ended (its stack trace or `end trace` line): a trigger
    // line after that starts a new report.
    let mut ended = false;
    for (i, line) in lines.iter().enumerate() {
        let Some(kind) = classify(line) else {
            let t = line.trim();
            ended |= t == "</TASK>"
                || t.starts_with("---[ end trace")
                || t.starts_with("---[ end Kernel panic");
            continue;
        };
        let allowed = ALLOWED_LINES
            .iter()
            .find(|a| line.contains(a.pattern))
            .map(|a| a.reason);
        if let Some((r, _, last)) = found.last_mut() {
            let joins = !ended
                && i - *last <= ABSORB_LINES
                && (kind.is_generic() || r.kind.is_generic() || kind == r.kind);
            if joins {
                r.kind = if !r.kind.is_generic() {
                    r.kind
                } else if !kind.is_generic() || kind.generic_rank() > r.kind.generic_rank() {
                    kind
                } else {
                    r.kind
                };
                r.taints |= kind.sets_taint();
                r.allowed = r.allowed.or(allowed);
                *last = i;
                continue;
            }
        }
        ended = false;
        found.push((
            Found {
                kind,
                lines: Vec::new(),
                allowed,
                taints: kind.sets_taint(),
            },
            i,
            i,
        ));
    }
    found
        .into_iter()
        .map(|(mut r, first, last)| {
            let end = (last + 1).max(first + REPORT_LINES).min(lines.len());
            r.lines = lines[first..end].iter().map(|l| l.to_string()).collect();
            r.lines.extend(
                call_trace(&lines, first, end)
                    .into_iter()
                    .map(|f| format!("  {f}")),
            );
            r
        })
        .collect()
}

/// The reports of a slice: those in the kernel's own records, then the taint bits set during
/// the slice that no report explains and that are not [`ALLOWED_TAINT`].
pub fn analyze(slice: &Slice) -> Vec<Found> {
    let lines: Vec<&str> = slice
        .records
        .iter()
        .filter(|r| r.facility == 0)
        .flat_map(|r| r.text.split('\n'))
        .collect();
    let mut found = scan(&lines);
    let by_lines = ALLOWED_LINES
        .iter()
        .filter(|a| a.taint != 0 && lines.iter().any(|l| l.contains(a.pattern)))
        .fold(0, |m, a| m | a.taint);
    let explained = found.iter().fold(by_lines, |m, f| m | f.taints);
    let new = slice.taint_after & !slice.taint_before & !explained & !allowed_taint_mask();
    if new != 0 {
        found.push(Found {
            kind: KernelReport::Taint(new),
            lines: vec![format!(
                "tainted {} → {}: new {}",
                slice.taint_before,
                slice.taint_after,
                describe_taint(new)
            )],
            allowed: None,
            taints: new,
        });
    }
    found
}
