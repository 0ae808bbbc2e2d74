//! A timeline picture of one scenario: the guest process's events and the device's journal on
//! one time axis, as an SVG a kernel developer can read ordering from (did the unbind drain
//! before the mm went away? did DMA through the PASID stop before the acknowledgement?).
//!
//! [`render_svg`] is pure: journal [`Record`]s (read from the control socket, or parsed from
//! `pcisim ctl journal --json` or `RUN/<ID>.journal.jsonl`) and guest events (`# t <ns> <text>` KTAP diagnostics, see
//! [`parse_guest_events`]) in, SVG text out. Lanes, top to bottom:
//!
//! - **process (guest)**: the guest program's events;
//! - **driver commands**: what the driver asked of the device and how it answered — `pasid_bind`,
//!   `invalidate`, `pasid_unbind_begin`, `pasid_drained`, `pasid_unbind_ack`, `pasid_released`
//!   (and resets, which drop every PASID);
//! - **device memory**: density strips, aggregated per pixel column (a DMA flood of thousands
//!   of records stays a few hundred path segments): DMA through a PASID, untagged queue DMA,
//!   page walks and translation faults;
//! - **violations**: checker violations (red) and the device's `stale_translation_used`
//!   observations (held by the checker until an invalidation or the unbind decides).
//!
//! Time is the device's (`t_ns` of each record). The guest's clock (CLOCK_MONOTONIC) is
//! unrelated to it, so guest events are placed by one anchor: the guest's `pasid N bound` event
//! (stamped when `open()` returned) sits at the journal's `pasid_bind` of PASID N. The BIND
//! happened somewhere inside the `open()` call, so the alignment is off by at most the call's
//! duration (bound stamp − open stamp); the picture says so in its caption. Without an anchor
//! the guest lane is drawn on its own clock, and the caption says that too.
//!
//! When the journal has an unbind, a second panel repeats the lanes zoomed on it (the unbind
//! → drain → acknowledgement → release sequence usually takes well under a millisecond of a
//! case that lasts hundreds).
//!
//! The lab writes `RUN/<ID>.timeline.svg` for the SVA kill cases (its `save_case_timeline`);
//! `pcisim ctl journal --timeline FILE` draws one from a running server.

use std::fmt::Write as _;

use crate::event::{Event, Record};

/// Picture width (px).
const WIDTH: f64 = 1400.0;
/// Left margin: lane titles.
const LEFT: f64 = 190.0;
/// Right margin.
const RIGHT: f64 = 30.0;
/// Plot width.
const PLOT_W: f64 = WIDTH - LEFT - RIGHT;
/// Label font size (monospace, so widths can be estimated).
const LABEL_PX: f64 = 11.0;
/// Advance of one monospace character at `LABEL_PX` (DejaVu Sans Mono: 0.602 em), rounded up.
const CHAR_W: f64 = 6.8;
/// Height of one label row.
const ROW_H: f64 = 14.0;
/// Height of the tick band at the top of a mark lane.
const TICK_H: f64 = 14.0;
/// Label rows per lane before labels are left out (their marks stay).
const MAX_ROWS: usize = 12;
/// Marks of one group closer than this (px) share a label.
const GROUP_PX: f64 = 24.0;
/// Width of one density bin (px).
const BIN_PX: f64 = 2.0;
/// Height of one density strip.
const STRIP_H: f64 = 28.0;
/// Caption characters per line (12 px DejaVu Sans averages ~6.5 px a character).
const CAPTION_CHARS: usize = 200;
/// Room for the memory lane's title above its strips.
const MEMORY_HEAD: f64 = 20.0;
/// Longest label (characters) before it is shortened.
const MAX_LABEL: usize = 60;

const GUEST_COLOR: &str = "#37474f";
const VIOLATION_COLOR: &str = "#d32f2f";
const STALE_COLOR: &str = "#ef9a9a";

/// A point event drawn as a tick with a label.
#[derive(Debug, Clone)]
struct Mark {
    /// Device time (ns).
    t: u64,
    label: String,
    /// Hover text (`<title>`).
    tip: String,
    color: &'static str,
    /// The record's sequence number (journal marks).
    seq: Option<u64>,
    /// CSS-ish class for tests and tools (`cmd pasid_bind`).
    class: String,
    /// Marks of the same group close together share one label (`<group> ×N`); None: always
    /// labelled on its own.
    group: Option<String>,
    /// How much later than drawn the event may really have happened (ns): a guest event's
    /// alignment error, drawn as a pale bar after its tick.
    late: u64,
}

/// What a density strip counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strip {
    PasidDma,
    QueueDma,
    Walks,
    Faults,
}

const STRIPS: [(Strip, &str, &str, bool); 4] = [
    (Strip::PasidDma, "DMA via PASID", "#1e88e5", true),
    (Strip::QueueDma, "queue DMA (untagged)", "#90a4ae", true),
    (Strip::Walks, "page walks", "#43a047", false),
    (Strip::Faults, "translation faults", "#fb8c00", false),
];

/// The guest's clock placed on the device's: `device_ns = guest_ns + offset_ns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The PASID whose binding anchors the clocks.
    pub pasid: u64,
    /// Sequence number of the journal's `pasid_bind`.
    pub bind_seq: u64,
    /// Device time of the `pasid_bind`.
    pub bind_t_ns: u64,
    /// Guest time of the `pasid N bound` event.
    pub bound_guest_ns: u64,
    /// Device time minus guest time.
    pub offset_ns: i64,
    /// How far off the placement can be: the `open()` call's duration (bound − open stamp),
    /// when the guest stamped the open.
    pub error_ns: Option<u64>,
}

impl Anchor {
    /// A guest time on the device's clock (saturating at 0).
    pub fn to_device(&self, guest_ns: u64) -> u64 {
        (guest_ns as i128 + self.offset_ns as i128).clamp(0, u64::MAX as i128) as u64
    }
}

/// The PASID in a guest event reading `... pasid N bound ...`.
fn bound_pasid(text: &str) -> Option<u64> {
    let mut rest = text;
    while let Some(i) = rest.find("pasid ") {
        rest = &rest[i + "pasid ".len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !digits.is_empty() && rest[digits.len()..].starts_with(" bound") {
            return digits.parse().ok();
        }
    }
    None
}

/// A record as one line of JSON (hover text).
fn json(r: &Record) -> String {
    serde_json::to_string(r).unwrap_or_default()
}

/// The event's `type` name (`pasid_bind`, `reset_begin`).
fn type_name(e: &Event) -> String {
    serde_json::to_value(e)
        .ok()
        .and_then(|v| v.get("type")?.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The record's PASID, if its event names one.
fn pasid_of(e: &Event) -> Option<u32> {
    match e {
        Event::Dma { pasid, .. } | Event::DmaFault { pasid, .. } => *pasid,
        Event::PasidBind { pasid, .. }
        | Event::PasidUnbindBegin { pasid }
        | Event::PasidDrained { pasid, .. }
        | Event::PasidUnbindAck { pasid }
        | Event::PasidReleased { pasid }
        | Event::Invalidate { pasid, .. }
        | Event::PageWalk { pasid, .. }
        | Event::StaleTranslationUsed { pasid, .. }
        | Event::TranslationFault { pasid, .. } => Some(*pasid),
        _ => None,
    }
}

/// Finds the anchor: the first guest `pasid N bound` event for which the journal has a
/// `pasid_bind` of PASID N (the first one). The open stamp is the nearest earlier guest event
/// that mentions `open`.
pub fn find_anchor(records: &[Record], guest: &[(u64, String)]) -> Option<Anchor> {
    for (i, (bound_t, text)) in guest.iter().enumerate() {
        let Some(pasid) = bound_pasid(text) else {
            continue;
        };
        let Some(bind) = records.iter().find(
            |r| matches!(r.event, Event::PasidBind { pasid: p, .. } if u64::from(p) == pasid),
        ) else {
            continue;
        };
        let bind_t = bind.t_ns;
        let open_t = guest
            .iter()
            .enumerate()
            .filter(|(j, (t, s))| *j != i && t <= bound_t && s.contains("open"))
            .map(|(_, (t, _))| *t)
            .max();
        return Some(Anchor {
            pasid,
            bind_seq: bind.seq,
            bind_t_ns: bind_t,
            bound_guest_ns: *bound_t,
            offset_ns: (bind_t as i128 - *bound_t as i128) as i64,
            error_ns: open_t.map(|o| bound_t - o),
        });
    }
    None
}

/// Guest events from text: `# t <ns> <text>` lines (KTAP diagnostics, indented or not) and
/// bare `<ns> <text>` lines; everything else is ignored.
pub fn parse_guest_events(text: &str) -> Vec<(u64, String)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("# t ").unwrap_or(l);
            let (ns, rest) = l.split_once(char::is_whitespace)?;
            Some((ns.parse().ok()?, rest.trim().to_string()))
        })
        .collect()
}

/// `64K`, `2M`, `all` for an invalidation length.
fn short_len(len: u64) -> String {
    match len {
        u64::MAX => "all".into(),
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{}G", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}M", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}K", n >> 10),
        n => n.to_string(),
    }
}

fn human(n: f64) -> String {
    if n >= 1048576.0 {
        format!("{:.1} MiB", n / 1048576.0)
    } else if n >= 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n:.0} B")
    }
}

fn shorten(s: &str) -> String {
    if s.chars().count() <= MAX_LABEL {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(MAX_LABEL - 1).collect();
        t.push('…');
        t
    }
}

/// `text` broken at spaces into lines of at most `max` characters (longer words stay whole).
fn wrap(text: &str, max: usize) -> Vec<String> {
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
fn esc(s: &str) -> String {
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

/// Everything to draw, on the device's clock.
#[derive(Debug, Default)]
struct Model {
    guest: Vec<Mark>,
    commands: Vec<Mark>,
    violations: Vec<Mark>,
    /// (device time, strip, amount).
    memory: Vec<(u64, Strip, u64)>,
    /// The device time the guest lane is pinned at (a dashed line across the process and
    /// command lanes).
    anchor: Option<u64>,
    /// Whether the guest lane is on the device clock (anchored, or empty).
    aligned: bool,
    /// 0 ms on the axis: the first event drawn.
    origin: u64,
}

impl Model {
    fn build(records: &[Record], guest: &[(u64, String)], anchor: Option<&Anchor>) -> Model {
        let mut m = Model {
            anchor: anchor.map(|a| a.bind_t_ns),
            aligned: anchor.is_some() || guest.is_empty(),
            ..Model::default()
        };
        for r in records {
            let t = r.t_ns;
            let seq = Some(r.seq);
            let pasid = pasid_of(&r.event);
            let p = pasid.map(|p| format!(" p{p}")).unwrap_or_default();
            let kind = type_name(&r.event);
            let command = match &r.event {
                Event::PasidBind { .. } => Some(("#2e7d32", format!("bind{p}"))),
                Event::Invalidate { va, len, .. } => {
                    Some(("#1565c0", format!("inval{p} {va:#x}+{}", short_len(*len))))
                }
                Event::PasidUnbindBegin { .. } => Some(("#ef6c00", format!("unbind_begin{p}"))),
                Event::PasidDrained { aborted, .. } => {
                    Some(("#6a1b9a", format!("drained{p} ({aborted} aborted)")))
                }
                Event::PasidUnbindAck { .. } => Some(("#00838f", format!("unbind_ack{p}"))),
                Event::PasidReleased { .. } => Some(("#212121", format!("released{p}"))),
                Event::ResetBegin { kind: k } | Event::ResetEnd { kind: k } => {
                    Some(("#795548", format!("{kind} {k}")))
                }
                _ => None,
            };
            if let Some((color, label)) = command {
                m.commands.push(Mark {
                    t,
                    tip: format!("#{} {} @ device {} ns", r.seq, json(r), t),
                    label,
                    color,
                    seq,
                    group: matches!(r.event, Event::Invalidate { .. }).then(|| format!("inval{p}")),
                    class: format!("cmd {kind}"),
                    late: 0,
                });
                continue;
            }
            match &r.event {
                Event::Dma { bytes, .. } => {
                    let strip = if pasid.is_some() {
                        Strip::PasidDma
                    } else {
                        Strip::QueueDma
                    };
                    m.memory.push((t, strip, *bytes));
                }
                Event::PageWalk { .. } => m.memory.push((t, Strip::Walks, 1)),
                Event::TranslationFault { .. } => m.memory.push((t, Strip::Faults, 1)),
                Event::Violation { kind: vk, detail } => {
                    m.violations.push(Mark {
                        t,
                        label: format!("VIOLATION {vk}"),
                        tip: format!("#{} {vk}: {detail}", r.seq),
                        color: VIOLATION_COLOR,
                        seq,
                        class: "violation".into(),
                        group: Some(format!("VIOLATION {vk}")),
                        late: 0,
                    });
                }
                Event::StaleTranslationUsed { va, .. } => m.violations.push(Mark {
                    t,
                    label: format!("stale use{p} {va:#x}"),
                    tip: format!("#{} {}", r.seq, json(r)),
                    color: STALE_COLOR,
                    seq,
                    class: "stale".into(),
                    group: Some(format!("stale use{p}")),
                    late: 0,
                }),
                _ => {}
            }
        }
        let first_guest = guest.iter().map(|(t, _)| *t).min().unwrap_or(0);
        let origin = records.iter().map(|r| r.t_ns).min().unwrap_or(0);
        for (g, text) in guest {
            let t = match anchor {
                Some(a) => a.to_device(*g),
                // Unaligned: the guest's first event at the device's first record.
                None => origin + (g - first_guest),
            };
            m.guest.push(Mark {
                t,
                label: text.clone(),
                tip: format!("guest {g} ns: {text}"),
                color: GUEST_COLOR,
                seq: None,
                class: "guest".into(),
                group: None,
                late: anchor.and_then(|a| a.error_ns).unwrap_or(0),
            });
        }
        m
    }

    fn span(&self) -> Option<(u64, u64)> {
        let ts = self
            .guest
            .iter()
            .chain(&self.commands)
            .chain(&self.violations)
            .map(|m| m.t)
            .chain(self.memory.iter().map(|(t, _, _)| *t));
        let (mut lo, mut hi) = (u64::MAX, 0);
        for t in ts {
            lo = lo.min(t);
            hi = hi.max(t);
        }
        (lo <= hi).then_some((lo, hi))
    }

    /// The window around the first unbind (begin → released), if it is much shorter than the
    /// whole span: the zoomed panel.
    fn focus(&self, lo: u64, hi: u64) -> Option<(u64, u64)> {
        let begin = self
            .commands
            .iter()
            .find(|m| m.class == "cmd pasid_unbind_begin")?;
        let end = self
            .commands
            .iter()
            .filter(|m| m.t >= begin.t)
            .find(|m| m.class == "cmd pasid_released")
            .map_or(begin.t, |m| m.t);
        let d = end - begin.t;
        // Room on both sides for what led to the unbind and what followed it.
        let pad = (d * 2).max(200_000);
        let (mut a, mut b) = (begin.t.saturating_sub(pad).max(lo), (end + pad).min(hi));
        // And the process's nearest events either side when they are close (the exit that
        // caused the unbind, the reap that followed it), so the zoom shows both clocks.
        let near = (hi - lo) / 16;
        if let Some(g) = self.guest.iter().map(|m| m.t).filter(|t| *t < a).max() {
            if a - g <= near {
                a = g.saturating_sub(pad / 4).max(lo);
            }
        }
        if let Some(g) = self.guest.iter().map(|m| m.t).filter(|t| *t > b).min() {
            if g - b <= near {
                b = (g + pad / 4).min(hi);
            }
        }
        ((b - a) * 4 < hi - lo).then_some((a, b))
    }
}

/// A 1-2-5 step giving about `n` ticks over `span` ns.
fn tick_step(span: u64, n: u64) -> u64 {
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
fn ms(t: u64, step: u64) -> String {
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
struct Scale {
    t0: u64,
    t1: u64,
}

impl Scale {
    fn x(&self, t: u64) -> f64 {
        let span = (self.t1 - self.t0).max(1) as f64;
        LEFT + (t.saturating_sub(self.t0) as f64 / span).min(1.0) * PLOT_W
    }
    fn contains(&self, t: u64) -> bool {
        (self.t0..=self.t1).contains(&t)
    }
}

/// Assigns label rows greedily in time order; returns (row, anchored at end) per mark, None for
/// a label left out (too many rows), and the rows used.
fn place_labels(xs: &[(f64, f64)]) -> (Vec<Option<(usize, bool)>>, usize) {
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
fn group_labels(visible: &[&Mark], scale: &Scale) -> Vec<Option<String>> {
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

/// A lane of marks.
#[derive(Clone, Copy)]
struct Lane<'m> {
    name: &'static str,
    /// The SVG group's class (`lane <class>`).
    class: &'static str,
    marks: &'m [Mark],
    /// A grey background.
    shade: bool,
    /// What an empty lane says.
    empty_note: &'static str,
}

/// Draws a lane of marks at `y`; returns its height.
fn mark_lane(svg: &mut String, y: f64, lane: &Lane<'_>, scale: &Scale) -> f64 {
    let Lane {
        name,
        class,
        marks,
        shade,
        empty_note,
    } = *lane;
    let mut visible: Vec<&Mark> = marks.iter().filter(|m| scale.contains(m.t)).collect();
    visible.sort_by_key(|m| m.t);
    let labels = group_labels(&visible, scale);
    let heads: Vec<usize> = (0..visible.len())
        .filter(|i| labels[*i].is_some())
        .collect();
    let spans: Vec<(f64, f64)> = heads
        .iter()
        .map(|&i| {
            let label = labels[i].as_deref().unwrap_or("");
            (
                scale.x(visible[i].t),
                label.chars().count() as f64 * CHAR_W + 2.0,
            )
        })
        .collect();
    let (head_rows, used) = place_labels(&spans);
    let omitted = head_rows.iter().filter(|r| r.is_none()).count();
    let mut rows = vec![None; visible.len()];
    for (&i, r) in heads.iter().zip(head_rows) {
        rows[i] = r;
    }
    let h = (TICK_H + 8.0 + used.max(1) as f64 * ROW_H + if omitted > 0 { ROW_H } else { 0.0 })
        .max(36.0);
    let _ = writeln!(svg, r#"<g class="lane {class}">"#);
    lane_frame(svg, y, h, name, shade);
    if visible.is_empty() {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" class="note">{}</text>"##,
            LEFT + 6.0,
            y + 22.0,
            esc(empty_note)
        );
    }
    let mut texts = String::new();
    for (i, (m, place)) in visible.iter().zip(&rows).enumerate() {
        let x = scale.x(m.t);
        let seq = m
            .seq
            .map(|s| format!(r#" data-seq="{s}""#))
            .unwrap_or_default();
        let _ = write!(
            svg,
            r#"<g class="mark {}"{seq}><title>{}</title><line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{}" stroke-width="2"/>"#,
            m.class,
            esc(&m.tip),
            y + 3.0,
            y + 3.0 + TICK_H,
            m.color
        );
        if m.late > 0 {
            let w = scale.x(m.t.saturating_add(m.late)) - x;
            let _ = write!(
                svg,
                r#"<rect x="{x:.1}" y="{:.1}" width="{w:.1}" height="{:.1}" class="uncertain"/>"#,
                y + 5.0,
                TICK_H - 4.0
            );
        }
        if let Some((row, end)) = place {
            let base = y + TICK_H + 6.0 + (*row as f64 + 1.0) * ROW_H - 3.0;
            let (tx, anchor) = if *end {
                (x - 2.0, "end")
            } else {
                (x + 2.0, "start")
            };
            let _ = write!(
                svg,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" class="leader"/>"##,
                y + 3.0 + TICK_H,
                base + 2.0,
            );
            // Labels go on top of every tick and leader line (their white halo keeps the
            // lines crossing them from striking them through).
            let _ = writeln!(
                texts,
                r##"<text x="{tx:.1}" y="{base:.1}" text-anchor="{anchor}" class="label" fill="{}">{}</text>"##,
                if m.color == STALE_COLOR {
                    "#c62828"
                } else {
                    m.color
                },
                esc(labels[i].as_deref().unwrap_or(""))
            );
        }
        svg.push_str("</g>\n");
    }
    svg.push_str(&texts);
    if omitted > 0 {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" class="note">{omitted} more label(s) left out (hover the marks, or see the zoomed panel)</text>"##,
            LEFT + 6.0,
            y + h - 5.0
        );
    }
    svg.push_str("</g>\n");
    h
}

fn lane_frame(svg: &mut String, y: f64, h: f64, name: &str, shade: bool) {
    let mut lines = name.lines();
    let _ = writeln!(
        svg,
        r##"<rect x="0" y="{y:.1}" width="{WIDTH}" height="{h:.1}" fill="{}"/><text x="10" y="{:.1}" class="lane-title">{}</text>"##,
        if shade { "#f4f6f8" } else { "#ffffff" },
        y + 17.0,
        esc(lines.next().unwrap_or(""))
    );
    // Further lines: a remark under the title.
    for (i, l) in lines.enumerate() {
        let _ = writeln!(
            svg,
            r##"<text x="10" y="{:.1}" class="lane-sub">{}</text>"##,
            y + 31.0 + i as f64 * 12.0,
            esc(l)
        );
    }
}

/// Draws the density strips at `y`; returns their height.
fn memory_lane(svg: &mut String, y: f64, model: &Model, scale: &Scale, shade: bool) -> f64 {
    let h = MEMORY_HEAD + STRIPS.len() as f64 * STRIP_H + 6.0;
    let bins = (PLOT_W / BIN_PX) as usize;
    let bin_ns = (scale.t1 - scale.t0).max(1) as f64 / bins as f64;
    svg.push_str("<g class=\"lane memory\">\n");
    lane_frame(svg, y, h, "device memory", shade);
    for (i, (strip, name, color, bytes)) in STRIPS.iter().enumerate() {
        // Below the lane title.
        let top = y + MEMORY_HEAD + i as f64 * STRIP_H;
        let mut counts = vec![0u64; bins];
        for (t, s, n) in &model.memory {
            if s == strip && scale.contains(*t) {
                let b = ((scale.x(*t) - LEFT) / BIN_PX) as usize;
                counts[b.min(bins - 1)] += n;
            }
        }
        let base = top + STRIP_H - 3.0;
        let max = counts.iter().copied().max().unwrap_or(0);
        let total: u64 = counts.iter().sum();
        let _ = writeln!(
            svg,
            r##"<text x="26" y="{:.1}" class="strip-title" fill="{color}">{name}</text><line x1="{LEFT}" y1="{base:.1}" x2="{:.1}" y2="{base:.1}" class="baseline"/>"##,
            top + 11.0,
            LEFT + PLOT_W
        );
        if max == 0 {
            continue;
        }
        // Square-root scale: a single walk still shows next to a burst.
        let mut d = String::new();
        for (b, &c) in counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let bh = ((c as f64 / max as f64).sqrt() * (STRIP_H - 5.0)).max(1.5);
            let _ = write!(
                d,
                "M{:.1} {base:.1}v-{bh:.1}h{BIN_PX}v{bh:.1}z",
                LEFT + b as f64 * BIN_PX
            );
        }
        let us = bin_ns / 1e3;
        let col = if us >= 10.0 {
            format!("{us:.0} µs")
        } else {
            format!("{us:.1} µs")
        };
        let per = if *bytes {
            format!(
                "{}, peak {} / {col}",
                human(total as f64),
                human(max as f64)
            )
        } else {
            format!("{total}, peak {max} / {col}")
        };
        // The figures under the strip's name, in the margin (not over the data).
        let _ = writeln!(
            svg,
            r##"<path class="density" d="{d}" fill="{color}"><title>{name}: total {per} column</title></path><text x="26" y="{:.1}" class="strip-note">{per}</text>"##,
            top + 22.0,
        );
    }
    svg.push_str("</g>\n");
    h
}

/// One panel (all lanes over `scale`) at `y`; returns its height.
fn panel(svg: &mut String, y: f64, title: &str, model: &Model, scale: &Scale) -> f64 {
    let origin = model.origin;
    let mut cy = y;
    let _ = writeln!(
        svg,
        r##"<text x="10" y="{:.1}" class="panel-title">{}</text>"##,
        cy + 16.0,
        esc(title)
    );
    cy += 24.0;
    let lanes_top = cy;
    let guest = Lane {
        name: if model.aligned {
            "process (guest)"
        } else {
            "process (guest)\nNOT aligned: own clock"
        },
        class: "guest",
        marks: &model.guest,
        shade: true,
        empty_note: "no guest events in this window",
    };
    cy += mark_lane(svg, cy, &guest, scale);
    let commands = Lane {
        name: "driver commands",
        class: "commands",
        marks: &model.commands,
        shade: false,
        empty_note: "no commands in this window",
    };
    cy += mark_lane(svg, cy, &commands, scale);
    if let Some(t) = model.anchor.filter(|t| scale.contains(*t)) {
        let x = scale.x(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{lanes_top:.1}" x2="{x:.1}" y2="{cy:.1}" class="anchor-line"><title>anchor: guest "pasid N bound" = journal pasid_bind</title></line>"##,
        );
    }
    cy += memory_lane(svg, cy, model, scale, true);
    let violations = Lane {
        name: "violations",
        class: "violations",
        marks: &model.violations,
        shade: false,
        empty_note: "none",
    };
    cy += mark_lane(svg, cy, &violations, scale);
    // Grid and axis.
    let step = tick_step(scale.t1 - scale.t0, 10);
    let first = (scale.t0.saturating_sub(origin)).div_ceil(step) * step + origin;
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" y1="{cy:.1}" x2="{:.1}" y2="{cy:.1}" stroke="#333" class="axis-line"/>"##,
        LEFT + PLOT_W
    );
    let mut t = first;
    while t <= scale.t1 {
        let x = scale.x(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{lanes_top:.1}" x2="{x:.1}" y2="{cy:.1}" class="grid"/><line x1="{x:.1}" y1="{cy:.1}" x2="{x:.1}" y2="{:.1}" stroke="#333"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" class="axis">{}</text>"##,
            cy + 5.0,
            cy + 18.0,
            ms(t - origin, step)
        );
        t += step;
    }
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="end" class="axis">ms (device clock)</text>"##,
        LEFT - 8.0,
        cy + 18.0
    );
    cy + 26.0 - y
}

/// Renders the timeline of `device_records` (one device's journal records) and `guest_events` ((guest CLOCK_MONOTONIC ns, text)) as SVG text.
/// See the module documentation for the lanes and the clock alignment.
pub fn render_svg(
    title: &str,
    device_records: &[Record],
    guest_events: &[(u64, String)],
) -> String {
    let anchor = find_anchor(device_records, guest_events);
    let mut model = Model::build(device_records, guest_events, anchor.as_ref());
    let (lo, hi) = model.span().unwrap_or((0, 1));
    let hi = hi.max(lo + 1);
    let origin = lo;
    model.origin = origin;
    let mut captions = vec![if device_records.is_empty() {
        format!(
            "No journal records, {} guest event(s); 0 ms = the first guest event.",
            guest_events.len()
        )
    } else {
        format!(
            "{} journal record(s), {} guest event(s); 0 ms = device t_ns {origin} (the first \
             event drawn).",
            device_records.len(),
            guest_events.len()
        )
    }];
    captions.push(match (&anchor, guest_events.is_empty()) {
        (_, true) => "No guest events: the process lane is empty.".to_string(),
        (Some(a), false) => format!(
            "Guest events (CLOCK_MONOTONIC) aligned to the device clock by one anchor: the guest's \
             \"pasid {} bound\" is placed at the journal's pasid_bind of pasid {} (#{}, the dashed green line). {}",
            a.pasid,
            a.pasid,
            a.bind_seq,
            match a.error_ns {
                Some(e) => format!(
                    "Alignment error ≤ {:.3} ms (the open() call: bound − open stamp): a guest event \
                     may really be up to that much later than drawn (the pale bar after its tick).",
                    e as f64 / 1e6
                ),
                None => "Alignment error unknown (no open stamp before it).".to_string(),
            }
        ),
        (None, false) => {
            "Guest events NOT aligned to the device clock (no guest \"pasid N bound\" \
             event with a pasid_bind of N in the journal): the process lane runs on its own clock, \
             its first event drawn at 0 ms."
                .to_string()
        }
    });
    let captions: Vec<String> = captions
        .iter()
        .flat_map(|c| wrap(c, CAPTION_CHARS))
        .collect();
    let mut body = String::new();
    let mut y = 40.0 + captions.len() as f64 * 16.0;
    let main = Scale { t0: lo, t1: hi };
    let focus = model.focus(lo, hi);
    let h = panel(
        &mut body,
        y,
        &format!("whole window: {} ms", ms(hi - lo, tick_step(hi - lo, 10))),
        &model,
        &main,
    );
    if let Some((a, b)) = focus {
        // Shade the zoomed window on the main panel.
        let (xa, xb) = (main.x(a), main.x(b));
        let _ = writeln!(
            body,
            r##"<rect x="{xa:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#ffd54f" fill-opacity="0.25" stroke="#f9a825" stroke-dasharray="3,2"><title>zoomed below</title></rect>"##,
            y + 24.0,
            (xb - xa).max(2.0),
            h - 50.0
        );
    }
    y += h + 10.0;
    if let Some((a, b)) = focus {
        let zoom = Scale { t0: a, t1: b };
        y += panel(
            &mut body,
            y,
            &format!(
                "zoomed on the unbind (shaded above): {} – {} ms",
                ms(a - origin, 1_000),
                ms(b - origin, 1_000)
            ),
            &model,
            &zoom,
        ) + 10.0;
    }
    // Legend.
    let legend: [(&str, &str); 14] = [
        (GUEST_COLOR, "guest process event"),
        ("#2e7d32", "bind"),
        ("#1565c0", "invalidate"),
        ("#ef6c00", "unbind_begin"),
        ("#6a1b9a", "drained"),
        ("#00838f", "unbind_ack"),
        ("#212121", "released"),
        ("#795548", "reset"),
        ("#1e88e5", "DMA via PASID"),
        ("#90a4ae", "queue DMA"),
        ("#43a047", "page walks"),
        ("#fb8c00", "translation faults"),
        (VIOLATION_COLOR, "violation"),
        (STALE_COLOR, "stale translation used (held)"),
    ];
    let mut lx = 10.0;
    y += 4.0;
    for (color, name) in legend {
        let w = 18.0 + name.chars().count() as f64 * 6.4 + 14.0;
        if lx + w > WIDTH - 10.0 {
            lx = 10.0;
            y += 18.0;
        }
        let _ = writeln!(
            body,
            r##"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{color}"/><text x="{:.1}" y="{:.1}" class="legend">{}</text>"##,
            y - 10.0,
            lx + 16.0,
            y,
            esc(name)
        );
        lx += w;
    }
    let height = y + 14.0;
    let mut svg = String::with_capacity(body.len() + 2048);
    let _ = writeln!(
        svg,
        r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" font-family="DejaVu Sans, Arial, sans-serif">
<style>
.label {{ font-family: 'DejaVu Sans Mono', monospace; font-size: {LABEL_PX}px; paint-order: stroke; stroke: #ffffff; stroke-width: 3px; stroke-linejoin: round; }}
.leader {{ stroke: #b0bec5; stroke-width: 0.8; stroke-dasharray: 2,2; }}
.lane-title {{ font-size: 13px; font-weight: bold; fill: #263238; }}
.strip-title {{ font-size: 11px; }}
.lane-sub {{ font-size: 10px; fill: #c62828; }}
.strip-note {{ font-size: 9px; fill: #78909c; }}
.uncertain {{ fill: #90a4ae; fill-opacity: 0.35; }}
.panel-title {{ font-size: 13px; font-weight: bold; fill: #455a64; }}
.note {{ font-size: 10px; fill: #78909c; }}
.axis {{ font-size: 11px; fill: #333333; }}
.grid {{ stroke: #cfd8dc; stroke-width: 0.6; }}
.baseline {{ stroke: #cfd8dc; stroke-width: 0.6; }}
.legend {{ font-size: 11px; fill: #333333; }}
.caption {{ font-size: 12px; fill: #37474f; }}
.anchor-line {{ stroke: #2e7d32; stroke-width: 1; stroke-dasharray: 5,3; }}
</style>
<rect width="100%" height="100%" fill="#ffffff"/>
<text x="10" y="24" font-size="17" font-weight="bold" fill="#212121">{}</text>"##,
        esc(title)
    );
    for (i, c) in captions.iter().enumerate() {
        let _ = writeln!(
            svg,
            r##"<text x="10" y="{:.1}" class="caption">{}</text>"##,
            44.0 + i as f64 * 16.0,
            esc(c)
        );
    }
    svg.push_str(&body);
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
#[path = "timeline_tests.rs"]
mod tests;
