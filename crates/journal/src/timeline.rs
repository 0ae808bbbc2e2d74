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
//!
//! The module is split into the model (`model`: records and guest events → marks and strips,
//! the clock [`Anchor`]), the picture's geometry and text fitting (`layout`), the lane drawing
//! (`draw`), and [`render_svg`] here, which lays out the panels.

mod draw;
mod layout;
mod model;

pub use model::{find_anchor, parse_guest_events, Anchor};

use draw::panel;
use layout::{esc, ms, tick_step, wrap, Scale, CAPTION_CHARS, LABEL_PX, WIDTH};
use model::{Model, GUEST_COLOR, STALE_COLOR, VIOLATION_COLOR};
use std::fmt::Write as _;

use crate::event::Record;

// The unit tests (timeline_tests.rs, `use super::*`) also reach these helpers.
#[cfg(test)]
use crate::event::Event;
#[cfg(test)]
use layout::{place_labels, BIN_PX, PLOT_W};
#[cfg(test)]
use model::bound_pasid;

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
