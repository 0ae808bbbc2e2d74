//! Geometry and text fitting of the timeline picture: its dimensions, the time
//! [`Scale`], tick steps and their labels, label placement in rows and grouping of close
//! labels, and the small text helpers (human numbers, shortening, wrapping, SVG escaping).

use super::model::Mark;

/// Picture width (px).
pub(super) const WIDTH: f64 = 1400.0;
/// Left margin: lane titles.
pub(super) const LEFT: f64 = 190.0;
/// Right margin.
pub(super) const RIGHT: f64 = 30.0;
/// Plot width.
pub(super) const PLOT_W: f64 = WIDTH - LEFT - RIGHT;
/// Label font size (monospace, so widths can be estimated).
pub(super) const LABEL_PX: f64 = 11.0;
/// Advance of one monospace character at `LABEL_PX` (DejaVu Sans Mono: 0.602 em), rounded up.
pub(super) const CHAR_W: f64 = 6.8;
/// Height of one label row.
pub(super) const ROW_H: f64 = 14.0;
/// Height of the tick band at the top of a mark lane.
pub(super) const TICK_H: f64 = 14.0;
/// Label rows per lane before labels are left out (their marks stay).
pub(super) const MAX_ROWS: usize = 12;
/// Marks of one group closer than this (px) share a label.
pub(super) const GROUP_PX: f64 = 24.0;
/// Width of one density bin (px).
pub(super) const BIN_PX: f64 = 2.0;
/// Height of one density strip.
pub(super) const STRIP_H: f64 = 28.0;
/// Caption characters per line (12 px DejaVu Sans averages ~6.5 px a character).
pub(super) const CAPTION_CHARS: usize = 200;
/// Room for the memory lane's title above its strips.
pub(super) const MEMORY_HEAD: f64 = 20.0;
/// Longest label (characters) before it is shortened.
pub(super) const MAX_LABEL: usize = 60;

pub(super) fn human(n: f64) -> String {
    if n >= 1048576.0 {
        format!("{:.1} MiB", n / 1048576.0)
    } else if n >= 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n:.0} B")
    }
}

pub(super) fn shorten(s: &str) -> String {
    if s.chars().count() <= MAX_LABEL {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(MAX_LABEL - 1).collect();
        t.push('…');
        t
    }
}

/// `text` broken at spaces into lines of at most `max` characters (longer words stay whole).
pub(super) fn wrap(text: &str, max: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > max {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// XML text/attribute escaping.
pub(super) fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

/// A 1-2-5 step giving about `n` ticks over `span` ns.
pub(super) fn tick_step(span: u64, n: u64) -> u64 {
    let raw = (span / n.max(1)).max(1);
    let mut p = 1u64;
    while p.saturating_mul(10) <= raw {
        p *= 10;
    }
    for m in [1, 2, 5, 10] {
        if p * m >= raw {
            return p * m;
        }
    }
    p * 10
}

/// `12.5` (ms) with as many decimals as `step` needs.
pub(super) fn ms(t: u64, step: u64) -> String {
    let decimals = match step {
        s if s >= 1_000_000 => 0,
        s if s >= 100_000 => 1,
        s if s >= 10_000 => 2,
        s if s >= 1_000 => 3,
        _ => 6,
    };
    format!("{:.*}", decimals, t as f64 / 1e6)
}

/// A time window mapped onto the plot.
pub(super) struct Scale {
    pub(super) t0: u64,
    pub(super) t1: u64,
}

impl Scale {
    pub(super) fn x(&self, t: u64) -> f64 {
        let span = (self.t1 - self.t0).max(1) as f64;
        LEFT + (t.saturating_sub(self.t0) as f64 / span).min(1.0) * PLOT_W
    }
    pub(super) fn contains(&self, t: u64) -> bool {
        (self.t0..=self.t1).contains(&t)
    }
}

/// Assigns label rows greedily in time order; returns (row, anchored at end) per mark, None for
/// a label left out (too many rows), and the rows used.
pub(super) fn place_labels(xs: &[(f64, f64)]) -> (Vec<Option<(usize, bool)>>, usize) {
    let mut rows_end: Vec<f64> = Vec::new();
    let mut out = Vec::with_capacity(xs.len());
    for &(x, w) in xs {
        let end_anchor = x + w > LEFT + PLOT_W + RIGHT - 4.0;
        let (a, b) = if end_anchor { (x - w, x) } else { (x, x + w) };
        let row = rows_end.iter().position(|&e| e + 6.0 <= a);
        let row = match row {
            Some(r) => Some(r),
            None if rows_end.len() < MAX_ROWS => {
                rows_end.push(f64::MIN);
                Some(rows_end.len() - 1)
            }
            None => None,
        };
        if let Some(r) = row {
            rows_end[r] = b;
        }
        out.push(row.map(|r| (r, end_anchor)));
    }
    let used = rows_end.len();
    (out, used)
}

/// The label each mark gets, in `visible`'s (time) order: marks of the same group (e.g. 32
/// `stale_translation` violations) closer than `GROUP_PX` to the group's previous mark share
/// one label, `<group> ×N`, on the first; the others get none (their ticks and hover text stay).
pub(super) fn group_labels(visible: &[&Mark], scale: &Scale) -> Vec<Option<String>> {
    let mut labels: Vec<Option<String>> = visible.iter().map(|m| Some(shorten(&m.label))).collect();
    // group key -> (index of the labelled mark, x of the group's last mark, members)
    let mut open: Vec<(&str, usize, f64, usize)> = Vec::new();
    for (i, m) in visible.iter().enumerate() {
        let Some(key) = m.group.as_deref() else {
            continue;
        };
        let x = scale.x(m.t);
        match open.iter_mut().find(|g| g.0 == key) {
            Some(g) if x - g.2 <= GROUP_PX => {
                g.2 = x;
                g.3 += 1;
                labels[i] = None;
                labels[g.1] = Some(shorten(&format!("{key} ×{}", g.3)));
            }
            Some(g) => *g = (key, i, x, 1),
            None => open.push((key, i, x, 1)),
        }
    }
    labels
}
