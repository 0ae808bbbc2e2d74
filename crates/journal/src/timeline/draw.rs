//! Drawing the timeline's lanes into SVG text: the mark lanes (guest process, driver
//! commands, violations), the device-memory density strips and a whole panel (axis, lanes,
//! frames). `render_svg` composes panels from these.

use std::fmt::Write as _;

use super::layout::{
    esc, group_labels, human, ms, place_labels, tick_step, Scale, BIN_PX, CHAR_W, LEFT,
    MEMORY_HEAD, PLOT_W, ROW_H, STRIP_H, TICK_H, WIDTH,
};
use super::model::{Mark, Model, STALE_COLOR, STRIPS};

/// A lane of marks.
#[derive(Clone, Copy)]
pub(super) struct Lane<'m> {
    pub(super) name: &'static str,
    /// The SVG group's class (`lane <class>`).
    pub(super) class: &'static str,
    pub(super) marks: &'m [Mark],
    /// A grey background.
    pub(super) shade: bool,
    /// What an empty lane says.
    pub(super) empty_note: &'static str,
}

/// Draws a lane of marks at `y`; returns its height.
pub(super) fn mark_lane(svg: &mut String, y: f64, lane: &Lane<'_>, scale: &Scale) -> f64 {
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

pub(super) fn lane_frame(svg: &mut String, y: f64, h: f64, name: &str, shade: bool) {
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
pub(super) fn memory_lane(
    svg: &mut String,
    y: f64,
    model: &Model,
    scale: &Scale,
    shade: bool,
) -> f64 {
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
pub(super) fn panel(svg: &mut String, y: f64, title: &str, model: &Model, scale: &Scale) -> f64 {
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
