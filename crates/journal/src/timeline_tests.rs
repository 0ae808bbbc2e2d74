//! Tests of [`super`] (timeline.rs).

use super::*;
use crate::event::{Dir, ViolationKind};

/// A minimal XML well-formedness check: tags nest and match, attributes are quoted, text
/// has no raw `<` and only known entities after `&`. Returns the element names in order.
fn check_xml(s: &str) -> Result<Vec<String>, String> {
    let mut stack: Vec<String> = Vec::new();
    let mut names = Vec::new();
    let mut rest = s;
    let check_text = |t: &str| -> Result<(), String> {
        let mut r = t;
        while let Some(i) = r.find('&') {
            r = &r[i + 1..];
            let ok = ["amp;", "lt;", "gt;", "quot;", "apos;"]
                .iter()
                .any(|e| r.starts_with(e));
            if !ok {
                return Err(format!("bad entity near {:?}", &r[..r.len().min(20)]));
            }
        }
        if t.contains('>') {
            // Allowed in XML, but our escaper never emits it raw: a sign of a broken tag.
            return Err(format!("raw > in text {t:?}"));
        }
        Ok(())
    };
    while let Some(i) = rest.find('<') {
        check_text(&rest[..i])?;
        rest = &rest[i..];
        if rest.starts_with("<?") {
            let e = rest.find("?>").ok_or("unterminated <?")?;
            rest = &rest[e + 2..];
            continue;
        }
        let e = rest.find('>').ok_or("unterminated tag")?;
        let tag = &rest[1..e];
        rest = &rest[e + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack
                .pop()
                .ok_or(format!("</{name}> without an open tag"))?;
            if open != name.trim() {
                return Err(format!("<{open}> closed by </{name}>"));
            }
            continue;
        }
        let self_closing = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let name = tag
            .split_whitespace()
            .next()
            .ok_or("empty tag")?
            .to_string();
        // Attributes: name="value" pairs, values without '<'.
        let mut attrs = tag[name.len()..].trim();
        while !attrs.is_empty() {
            let eq = attrs
                .find("=\"")
                .ok_or(format!("unquoted attribute in <{tag}>"))?;
            let after = &attrs[eq + 2..];
            let close = after.find('"').ok_or("unterminated attribute")?;
            check_text(&after[..close])?;
            attrs = after[close + 1..].trim();
        }
        names.push(name.clone());
        if !self_closing {
            stack.push(name);
        }
    }
    check_text(rest.trim())?;
    if let Some(open) = stack.pop() {
        return Err(format!("<{open}> never closed"));
    }
    Ok(names)
}

/// The caption lines' text, joined (they are wrapped).
fn caption(svg: &str) -> String {
    svg.split(r#"class="caption">"#)
        .skip(1)
        .filter_map(|p| p.split("</text>").next())
        .collect::<Vec<_>>()
        .join(" ")
}

fn rec(seq: u64, t_ns: u64, event: Event) -> Record {
    Record { seq, t_ns, event }
}

fn dma(pasid: Option<u32>, bytes: u64) -> Event {
    Event::Dma {
        dir: Dir::Read,
        pasid,
        iova: 0,
        len: bytes,
        count: 1,
        bytes,
    }
}

fn violation(kind: ViolationKind, detail: &str) -> Event {
    Event::Violation {
        kind,
        detail: detail.to_string(),
    }
}

fn bind(pasid: u32) -> Event {
    Event::PasidBind { pasid, root: 0 }
}

/// A kill case in miniature: bind, DMA and walks, an invalidation, a stale use and its
/// violation, the unbind sequence; guest events with an open stamp 0.5 ms before bound.
fn sample() -> (Vec<Record>, Vec<(u64, String)>) {
    let ms = 1_000_000;
    let recs = vec![
        rec(10, 100 * ms, bind(1)),
        rec(11, 101 * ms, dma(Some(1), 4096)),
        rec(
            12,
            101 * ms + 10,
            Event::PageWalk {
                pasid: 1,
                va: 0,
                pa: None,
            },
        ),
        rec(
            13,
            110 * ms,
            Event::Invalidate {
                pasid: 1,
                va: 0x7f00_0000_0000,
                len: 65536,
            },
        ),
        rec(
            14,
            120 * ms,
            Event::StaleTranslationUsed {
                pasid: 1,
                va: 0x1000,
                cached_pa: 0,
                walked_pa: None,
            },
        ),
        rec(
            15,
            120 * ms + 5,
            violation(
                ViolationKind::StaleTranslation,
                "pasid 1 va 0x1000 <cached> & gone",
            ),
        ),
        rec(16, 150 * ms, Event::PasidUnbindBegin { pasid: 1 }),
        rec(
            17,
            150 * ms + 400_000,
            Event::PasidDrained {
                pasid: 1,
                aborted: 21,
            },
        ),
        rec(18, 150 * ms + 401_000, Event::PasidUnbindAck { pasid: 1 }),
        rec(19, 150 * ms + 402_000, Event::PasidReleased { pasid: 1 }),
        rec(
            20,
            151 * ms,
            Event::TranslationFault {
                pasid: 1,
                va: 0,
                write: false,
            },
        ),
        rec(21, 152 * ms, dma(None, 64)),
    ];
    let guest = vec![
        (
            5_000_000_000,
            "worker 173: open /dev/pcisim-npu (bind)".to_string(),
        ),
        (
            5_000_500_000,
            "worker 173: open returned, pasid 1 bound".to_string(),
        ),
        (
            5_001_000_000,
            "worker 173: 32 compares queued <&>".to_string(),
        ),
        (5_049_000_000, "SIGKILL sent to worker 173".to_string()),
        (5_060_000_000, "worker 173 reaped (Signaled(9))".to_string()),
    ];
    (recs, guest)
}

#[test]
fn test_svg_is_well_formed() {
    let (recs, guest) = sample();
    let svg = render_svg("M6 <kill> & co", &recs, &guest);
    let names = check_xml(&svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
    assert_eq!(names.first().map(String::as_str), Some("svg"));
    assert!(names.iter().filter(|n| *n == "text").count() > 20);
    // The escaped title, not the raw one.
    assert!(svg.contains("M6 &lt;kill&gt; &amp; co"));
    assert!(check_xml("<svg><g></svg>").is_err());
    assert!(check_xml("<svg><text>a & b</text></svg>").is_err());
}

#[test]
fn test_a_mark_per_command_event() {
    let (recs, guest) = sample();
    let svg = render_svg("t", &recs, &guest);
    for seq in [10, 13, 16, 17, 18, 19] {
        assert!(
            svg.matches(&format!(r#" data-seq="{seq}""#)).count() >= 1,
            "no mark for command #{seq}"
        );
    }
    let cmd_marks = svg.matches(r#"<g class="mark cmd "#).count();
    // The main panel has all six; the zoomed one the four of the unbind.
    assert_eq!(cmd_marks, 6 + 4, "{svg}");
    assert!(svg.contains("drained p1 (21 aborted)"));
    assert!(svg.contains("inval p1 0x7f0000000000+64K"));
}

#[test]
fn test_anchor_math() {
    let (mut recs, guest) = sample();
    // Another PASID bound earlier must not be taken.
    recs.insert(0, rec(9, 90_000_000, bind(2)));
    let a = find_anchor(&recs, &guest).expect("an anchor");
    assert_eq!(a.pasid, 1);
    assert_eq!(a.bind_seq, 10);
    assert_eq!(a.bind_t_ns, 100_000_000);
    assert_eq!(a.bound_guest_ns, 5_000_500_000);
    assert_eq!(a.offset_ns, 100_000_000 - 5_000_500_000);
    assert_eq!(a.error_ns, Some(500_000));
    // SIGKILL 48.5 ms after bound lands 48.5 ms after the bind.
    assert_eq!(a.to_device(5_049_000_000), 148_500_000);
    let svg = render_svg("t", &recs, &guest);
    let cap = caption(&svg);
    assert!(cap.contains("Alignment error ≤ 0.500 ms"), "{cap}");
    assert!(cap.contains("pasid_bind of pasid 1 (#10, the dashed green line)"));
    assert_eq!(
        svg.matches(r#"class="anchor-line""#).count(),
        1,
        "the anchor on the main panel"
    );
}

#[test]
fn test_unaligned_without_anchor() {
    let (recs, mut guest) = sample();
    guest.retain(|(_, t)| !t.contains("bound"));
    assert!(find_anchor(&recs, &guest).is_none());
    let svg = render_svg("t", &recs, &guest);
    assert!(caption(&svg).contains("Guest events NOT aligned"));
    assert!(svg.contains(r#"class="lane-sub">NOT aligned: own clock<"#));
    assert_eq!(svg.matches(r#"class="anchor-line""#).count(), 0);
    // A bound event of a PASID the journal never bound is no anchor either.
    let g = vec![(1, "open returned, pasid 9 bound".to_string())];
    assert!(find_anchor(&recs, &g).is_none());
}

#[test]
fn test_violation_in_violations_lane() {
    let (recs, guest) = sample();
    let svg = render_svg("t", &recs, &guest);
    let start = svg
        .find(r#"<g class="lane violations">"#)
        .expect("violations lane");
    let lane = &svg[start..];
    // Up to the axis that follows the last lane of the panel.
    let lane = &lane[..lane.find("class=\"axis-line\"").expect("lane end")];
    assert!(
        lane.contains(r#"<g class="mark violation" data-seq="15">"#),
        "{lane}"
    );
    assert!(lane.contains("VIOLATION stale_translation"));
    assert!(
        lane.contains(r#"data-seq="14""#),
        "the stale use is drawn too"
    );
    // And not in the commands lane.
    let cmds = &svg[svg.find(r#"<g class="lane commands">"#).expect("commands")..start];
    assert!(!cmds.contains("VIOLATION"));
}

#[test]
fn test_close_violations_share_a_label() {
    let mut recs = vec![rec(1, 0, bind(1))];
    for i in 0..20u64 {
        recs.push(rec(
            2 + i,
            50_000_000 + i * 1_000,
            violation(ViolationKind::StaleTranslation, ""),
        ));
    }
    recs.push(rec(
        30,
        100_000_000,
        violation(ViolationKind::PasidAfterUnbind, ""),
    ));
    let svg = render_svg("t", &recs, &[]);
    assert_eq!(svg.matches(r#"<g class="mark violation""#).count(), 21);
    assert_eq!(
        svg.matches("VIOLATION stale_translation ×20").count(),
        1,
        "{svg}"
    );
    assert_eq!(svg.matches(">VIOLATION stale_translation<").count(), 0);
    assert_eq!(svg.matches(">VIOLATION pasid_after_unbind<").count(), 1);
}

#[test]
fn test_density_not_one_rect_per_record() {
    let mut recs = vec![rec(1, 0, bind(1))];
    for i in 0..10_000u64 {
        recs.push(rec(2 + i, 1_000 + i * 10_000, dma(Some(1), 4096)));
    }
    let svg = render_svg("flood", &recs, &[]);
    check_xml(&svg).unwrap();
    assert!(svg.len() < 120_000, "{} bytes", svg.len());
    assert!(svg.matches("<rect").count() < 60);
    let density = svg
        .split(r#"<path class="density""#)
        .nth(1)
        .and_then(|p| p.split('"').nth(1))
        .expect("a density path");
    // One segment per 2-px column at most.
    assert!(density.matches('M').count() <= (PLOT_W / BIN_PX) as usize + 1);
    assert!(
        svg.contains("total 39.1 MiB"),
        "the strip reports the bytes"
    );
}

#[test]
fn test_parse_guest_events() {
    let text = "KTAP version 1\n1..3\n# t 123 worker 5: open /dev/pcisim-npu (bind)\n    # t 456 nested event\n# pasid 1\n789 bare line\nok 1 x\n# t notanumber y\n";
    assert_eq!(
        parse_guest_events(text),
        vec![
            (123, "worker 5: open /dev/pcisim-npu (bind)".to_string()),
            (456, "nested event".to_string()),
            (789, "bare line".to_string()),
        ]
    );
    assert_eq!(
        bound_pasid("worker 3: open returned, pasid 17 bound"),
        Some(17)
    );
    assert_eq!(bound_pasid("pasid x bound, pasid 4 bound"), Some(4));
    assert_eq!(bound_pasid("pasid 4 unbound"), None);
}

#[test]
fn test_tick_step_and_labels() {
    assert_eq!(tick_step(100_000_000, 10), 10_000_000);
    assert_eq!(tick_step(1_300_000, 10), 200_000);
    assert_eq!(ms(12_500_000, 1_000_000), "12");
    assert_eq!(ms(12_500_000, 100_000), "12.5");
    // Two labels at the same x go to different rows, in time order.
    let (rows, used) = place_labels(&[(300.0, 100.0), (300.0, 100.0), (500.0, 50.0)]);
    assert_eq!(
        rows,
        vec![Some((0, false)), Some((1, false)), Some((0, false))]
    );
    assert_eq!(used, 2);
    assert_eq!(wrap("aa bb cc", 5), vec!["aa bb", "cc"]);
    assert_eq!(wrap("toolongword x", 4), vec!["toolongword", "x"]);
}
