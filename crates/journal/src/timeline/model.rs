//! The timeline's model: what to draw, on the device's clock. Journal [`Record`]s and guest
//! events become [`Mark`]s and density strips ([`Model`]); the guest clock is aligned to the
//! device's by an [`Anchor`] (the guest's `pasid N bound` at the journal's `pasid_bind`).
//! Pure data, no SVG: the picture is drawn from it by `draw` and `render_svg` (a mark's colour
//! and label text are the model's; where they go is `layout`'s, which reads [`Mark`]s).

use crate::event::{Event, Record};

/// Colour of a guest process event.
pub(super) const GUEST_COLOR: &str = "#37474f";
/// Colour of a violation.
pub(super) const VIOLATION_COLOR: &str = "#d32f2f";
/// Colour of a stale translation used (held).
pub(super) const STALE_COLOR: &str = "#ef9a9a";

/// `64K`, `2M`, `all` for an invalidation length.
pub(super) fn short_len(len: u64) -> String {
    match len {
        u64::MAX => "all".into(),
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{}G", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}M", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}K", n >> 10),
        n => n.to_string(),
    }
}

/// A point event drawn as a tick with a label.
#[derive(Debug, Clone)]
pub(super) struct Mark {
    /// Device time (ns).
    pub(super) t: u64,
    pub(super) label: String,
    /// Hover text (`<title>`).
    pub(super) tip: String,
    pub(super) color: &'static str,
    /// The record's sequence number (journal marks).
    pub(super) seq: Option<u64>,
    /// CSS-ish class for tests and tools (`cmd pasid_bind`).
    pub(super) class: String,
    /// Marks of the same group close together share one label (`<group> ×N`); None: always
    /// labelled on its own.
    pub(super) group: Option<String>,
    /// How much later than drawn the event may really have happened (ns): a guest event's
    /// alignment error, drawn as a pale bar after its tick.
    pub(super) late: u64,
}

/// What a density strip counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Strip {
    PasidDma,
    QueueDma,
    Walks,
    Faults,
}

pub(super) const STRIPS: [(Strip, &str, &str, bool); 4] = [
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
pub(super) fn bound_pasid(text: &str) -> Option<u64> {
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
pub(super) fn json(r: &Record) -> String {
    serde_json::to_string(r).unwrap_or_default()
}

/// The event's `type` name (`pasid_bind`, `reset_begin`).
pub(super) fn type_name(e: &Event) -> String {
    serde_json::to_value(e)
        .ok()
        .and_then(|v| v.get("type")?.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The record's PASID, if its event names one.
pub(super) fn pasid_of(e: &Event) -> Option<u32> {
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

/// Everything to draw, on the device's clock.
#[derive(Debug, Default)]
pub(super) struct Model {
    pub(super) guest: Vec<Mark>,
    pub(super) commands: Vec<Mark>,
    pub(super) violations: Vec<Mark>,
    /// (device time, strip, amount).
    pub(super) memory: Vec<(u64, Strip, u64)>,
    /// The device time the guest lane is pinned at (a dashed line across the process and
    /// command lanes).
    pub(super) anchor: Option<u64>,
    /// Whether the guest lane is on the device clock (anchored, or empty).
    pub(super) aligned: bool,
    /// 0 ms on the axis: the first event drawn.
    pub(super) origin: u64,
}

impl Model {
    pub(super) fn build(
        records: &[Record],
        guest: &[(u64, String)],
        anchor: Option<&Anchor>,
    ) -> Model {
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

    pub(super) fn span(&self) -> Option<(u64, u64)> {
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
    pub(super) fn focus(&self, lo: u64, hi: u64) -> Option<(u64, u64)> {
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
