//! E1: IDs, class, BARs and capabilities as the guest sees them, compared with
//! what the device advertises (`pcisim describe` output given as `--expect`).

use crate::ktap::{Ktap, Outcome};
use crate::pci::{self, Bar, Cap, DeviceView, ExtCap};
use pcisim_guest_wire::{DeviceIds, E1Options};
use std::borrow::Cow;
use std::collections::BTreeSet;

/// The expectation: the shared description type ([`pcisim_guest_wire::DeviceDescription`]).
/// Every field is required: a missing one is an error (the setup fails), never a silently
/// skipped check. Unknown fields are ignored (the describe output may grow).
pub type Expect = pcisim_guest_wire::DeviceDescription;

pub fn parse_expect(json: &str) -> Result<Expect, String> {
    serde_json::from_str(json).map_err(|e| format!("bad --expect JSON: {e}"))
}

/// One named comparison.
#[derive(Debug, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub outcome: Outcome,
}

fn compare_fields(fields: &[(&str, u64, u64, usize)]) -> Outcome {
    let mut wanted = Vec::new();
    let mut got = Vec::new();
    let mut bad = false;
    for (name, e, actual, width) in fields {
        if e != actual {
            bad = true;
        }
        wanted.push(format!("{name}=0x{e:0width$x}"));
        got.push(format!("{name}=0x{actual:0width$x}"));
    }
    if bad {
        Outcome::Fail(format!(
            "expected {}, got {}",
            wanted.join(" "),
            got.join(" ")
        ))
    } else {
        Outcome::Pass
    }
}

fn fmt_bar(b: Option<&Bar>) -> String {
    match b {
        None => "absent".into(),
        Some(b) => format!(
            "size=0x{:x} mem64={} prefetchable={}",
            b.size, b.mem64, b.prefetchable
        ),
    }
}

fn fmt_caps(c: &[Cap]) -> String {
    let v: Vec<String> = c
        .iter()
        .map(|c| format!("0x{:02x}@0x{:02x}", c.id, c.offset))
        .collect();
    format!("[{}]", v.join(" "))
}

fn fmt_ext_caps(c: &[ExtCap]) -> String {
    let v: Vec<String> = c
        .iter()
        .map(|c| format!("0x{:04x}v{}@0x{:03x}", c.id, c.version, c.offset))
        .collect();
    format!("[{}]", v.join(" "))
}

/// E1's subtests, in order: `ids`, `class`, one `barN` for every BAR either side has (or one
/// `bars` where neither has any), `capabilities`, `ext_capabilities`.
pub fn subtests(view: &DeviceView, exp: &Expect) -> Vec<Cow<'static, str>> {
    let indices = bar_indices(view, exp);
    let mut names: Vec<Cow<'static, str>> = vec!["ids".into(), "class".into()];
    if indices.is_empty() {
        names.push("bars".into());
    }
    names.extend(indices.iter().map(|i| Cow::Owned(format!("bar{i}"))));
    names.extend(["capabilities".into(), "ext_capabilities".into()]);
    names
}

/// The BAR numbers either side has, in order.
fn bar_indices(view: &DeviceView, exp: &Expect) -> BTreeSet<u32> {
    exp.bars
        .iter()
        .chain(view.bars.iter())
        .map(|b| b.index)
        .collect()
}

/// Compares a decoded view with the expectation; `cap_err`/`ext_err` are walk
/// errors, which fail the corresponding list.
pub fn compare(
    view: &DeviceView,
    cap_err: Option<&str>,
    ext_err: Option<&str>,
    exp: &Expect,
) -> Vec<Check> {
    let mut out = Vec::new();
    let mut push = |name: String, outcome: Outcome| out.push(Check { name, outcome });

    push(
        "ids".into(),
        compare_fields(&[
            ("vendor", exp.vendor_id.into(), view.vendor_id.into(), 4),
            ("device", exp.device_id.into(), view.device_id.into(), 4),
            (
                "subsystem_vendor",
                exp.subsystem_vendor_id.into(),
                view.subsystem_vendor_id.into(),
                4,
            ),
            (
                "subsystem",
                exp.subsystem_id.into(),
                view.subsystem_id.into(),
                4,
            ),
        ]),
    );
    push(
        "class".into(),
        compare_fields(&[
            ("class", exp.class_code.into(), view.class_code.into(), 6),
            ("revision", exp.revision.into(), view.revision.into(), 2),
        ]),
    );

    let bars = &exp.bars;
    let indices = bar_indices(view, exp);
    if indices.is_empty() {
        // Neither side has a BAR: still one asserted result.
        push("bars".into(), Outcome::Pass);
    }
    for i in indices {
        let e = bars.iter().find(|b| b.index == i);
        let g = view.bars.iter().find(|b| b.index == i);
        let outcome = if e == g {
            Outcome::Pass
        } else {
            Outcome::Fail(format!("expected {}, got {}", fmt_bar(e), fmt_bar(g)))
        };
        push(format!("bar{i}"), outcome);
    }

    let list_outcome = |equal: bool, err: Option<&str>, e: String, g: String| {
        if let Some(err) = err {
            Outcome::Fail(format!("{err}; expected {e}, got {g}"))
        } else if equal {
            Outcome::Pass
        } else {
            Outcome::Fail(format!("expected {e}, got {g}"))
        }
    };
    push(
        "capabilities".into(),
        list_outcome(
            exp.capabilities == view.capabilities,
            cap_err,
            fmt_caps(&exp.capabilities),
            fmt_caps(&view.capabilities),
        ),
    );
    push(
        "ext_capabilities".into(),
        list_outcome(
            exp.ext_capabilities == view.ext_capabilities,
            ext_err,
            fmt_ext_caps(&exp.ext_capabilities),
            fmt_ext_caps(&view.ext_capabilities),
        ),
    );
    out
}

/// A program that could not set up reports one failed `setup` subtest (its whole plan).
pub fn setup_failure(reason: &str) -> i32 {
    let mut k = Ktap::declared(&["setup"]);
    k.result("setup", Outcome::Fail(reason.to_string()));
    k.finish()
}

pub fn run(ids: DeviceIds, o: E1Options) -> i32 {
    let prepared = (|| -> Result<_, String> {
        let expect_text = match (&o.expect, &o.expect_file) {
            (Some(j), None) => j.to_string(),
            (None, Some(p)) => {
                std::fs::read_to_string(p).map_err(|e| format!("read --expect-file {p}: {e}"))?
            }
            _ => return Err("give exactly one of --expect JSON or --expect-file PATH".into()),
        };
        let expect = parse_expect(&expect_text)?;
        let (func, note) = pci::select_function(ids.vendor, ids.device, o.bdf.as_deref())?;
        let cfg_path = func.attr("config");
        let cfg =
            std::fs::read(&cfg_path).map_err(|e| format!("read {}: {e}", cfg_path.display()))?;
        let resources = func.resources()?;
        let (view, cap_err, ext_err) = pci::decode(&cfg, &resources)?;
        Ok((func, note, cfg.len(), expect, view, cap_err, ext_err))
    })();
    let (func, note, cfg_len, expect, view, cap_err, ext_err) = match prepared {
        Ok(p) => p,
        Err(e) => return setup_failure(&e),
    };

    let checks = compare(&view, cap_err.as_deref(), ext_err.as_deref(), &expect);
    let mut k = Ktap::declared_names(subtests(&view, &expect));
    k.diag(&format!("E1 enumeration of {}", func.bdf));
    if let Some(n) = note {
        k.diag(&n);
    }
    if cfg_len < 4096 {
        k.diag(&format!(
            "config space read gave {cfg_len} bytes (4096 expected as root on PCIe)"
        ));
    }
    match serde_json::to_string(&view) {
        Ok(j) => k.diag(&j),
        Err(e) => k.diag(&format!("cannot serialise the decoded view: {e}")),
    }
    for c in checks {
        k.result(&c.name, c.outcome);
    }
    k.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPECT: &str = r#"{"vendor_id":4660,"device_id":2832,"class_code":197120,"revision":1,
        "subsystem_vendor_id":4660,"subsystem_id":1,
        "bars":[{"index":0,"size":65536,"mem64":true,"prefetchable":false},
                {"index":2,"size":268435456,"mem64":true,"prefetchable":true}],
        "capabilities":[{"id":1,"offset":64},{"id":17,"offset":72},{"id":16,"offset":96}],
        "ext_capabilities":[{"id":1,"offset":256,"version":2},{"id":15,"offset":328,"version":1}],
        "name":"gpu0"}"#;

    fn view() -> DeviceView {
        DeviceView {
            vendor_id: 0x1234,
            device_id: 0x0b10,
            class_code: 0x030200,
            revision: 1,
            subsystem_vendor_id: 0x1234,
            subsystem_id: 1,
            bars: vec![
                Bar {
                    index: 0,
                    size: 65536,
                    mem64: true,
                    prefetchable: false,
                },
                Bar {
                    index: 2,
                    size: 268435456,
                    mem64: true,
                    prefetchable: true,
                },
            ],
            capabilities: vec![
                Cap { id: 1, offset: 64 },
                Cap { id: 17, offset: 72 },
                Cap { id: 16, offset: 96 },
            ],
            ext_capabilities: vec![
                ExtCap {
                    id: 1,
                    offset: 256,
                    version: 2,
                },
                ExtCap {
                    id: 15,
                    offset: 328,
                    version: 1,
                },
            ],
        }
    }

    fn names(c: &[Check]) -> Vec<&str> {
        c.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn all_match() {
        let e = parse_expect(EXPECT).unwrap();
        let c = compare(&view(), None, None, &e);
        assert_eq!(
            names(&c),
            vec![
                "ids",
                "class",
                "bar0",
                "bar2",
                "capabilities",
                "ext_capabilities"
            ]
        );
        assert!(c.iter().all(|c| c.outcome == Outcome::Pass), "{c:?}");
    }

    #[test]
    fn the_decoded_view_round_trips_as_an_expectation() {
        let j = serde_json::to_string(&view()).unwrap();
        let e = parse_expect(&j).unwrap();
        assert!(compare(&view(), None, None, &e)
            .iter()
            .all(|c| c.outcome == Outcome::Pass));
    }

    #[test]
    fn mismatches_are_reported() {
        let e = parse_expect(EXPECT).unwrap();
        let mut v = view();
        v.class_code = 0x120000;
        v.bars[1].prefetchable = false;
        v.bars.push(Bar {
            index: 4,
            size: 4096,
            mem64: false,
            prefetchable: false,
        });
        v.capabilities.swap(0, 1);
        v.ext_capabilities[1].version = 2;
        let c = compare(&v, None, None, &e);
        assert_eq!(
            names(&c),
            vec![
                "ids",
                "class",
                "bar0",
                "bar2",
                "bar4",
                "capabilities",
                "ext_capabilities"
            ]
        );
        assert_eq!(c[0].outcome, Outcome::Pass);
        assert_eq!(
            c[1].outcome,
            Outcome::Fail(
                "expected class=0x030200 revision=0x01, got class=0x120000 revision=0x01".into()
            )
        );
        assert_eq!(c[2].outcome, Outcome::Pass);
        assert!(matches!(&c[3].outcome, Outcome::Fail(r) if r.contains("prefetchable=true")));
        assert!(matches!(&c[4].outcome, Outcome::Fail(r) if r.starts_with("expected absent")));
        assert!(matches!(&c[5].outcome, Outcome::Fail(r) if r.contains("0x11@0x48")));
        assert!(matches!(&c[6].outcome, Outcome::Fail(_)));
    }

    #[test]
    fn missing_bar_and_walk_error() {
        let e = parse_expect(EXPECT).unwrap();
        let mut v = view();
        v.bars.remove(1);
        let c = compare(&v, Some("capability list loops back to 0x40"), None, &e);
        assert!(matches!(&c[3].outcome, Outcome::Fail(r) if r.ends_with("got absent")));
        assert!(matches!(&c[4].outcome, Outcome::Fail(r) if r.contains("loops")));
    }

    /// The full expectation without `field`.
    fn without(field: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(EXPECT).unwrap();
        v.as_object_mut().unwrap().remove(field).unwrap();
        v.to_string()
    }

    #[test]
    fn every_expectation_field_is_required() {
        for field in [
            "vendor_id",
            "device_id",
            "class_code",
            "revision",
            "subsystem_vendor_id",
            "subsystem_id",
            "bars",
            "capabilities",
            "ext_capabilities",
        ] {
            let e = parse_expect(&without(field)).unwrap_err();
            assert!(
                e.contains(&format!("missing field `{field}`")),
                "{field}: {e}"
            );
        }
        let e = parse_expect(r#"{"vendor_id":4660}"#).unwrap_err();
        assert!(e.starts_with("bad --expect JSON: missing field"), "{e}");
        assert!(parse_expect("{").is_err());
        assert!(parse_expect(r#"{"vendor_id":"x"}"#).is_err());
        // A null is not a value either.
        assert!(parse_expect(&EXPECT.replace(r#""revision":1"#, r#""revision":null"#)).is_err());
    }

    #[test]
    fn no_check_is_ever_skipped() {
        let e = parse_expect(EXPECT).unwrap();
        let mut v = view();
        v.bars.clear();
        let c = compare(&v, None, None, &e);
        assert!(
            c.iter().all(|c| !matches!(c.outcome, Outcome::Skip(_))),
            "{c:?}"
        );
        // No BAR on either side: one passing `bars` result, not nothing.
        let mut none = parse_expect(EXPECT).unwrap();
        none.bars.clear();
        let c = compare(&v, None, None, &none);
        assert_eq!(
            names(&c),
            ["ids", "class", "bars", "capabilities", "ext_capabilities"]
        );
        assert!(c.iter().all(|c| c.outcome == Outcome::Pass), "{c:?}");
    }

    /// The declared subtests are what `compare` reports, in order, for BARs on both sides, on
    /// one side only (a missing or an extra BAR) and on neither.
    #[test]
    fn declared_subtests_are_the_compared_names() {
        let e = parse_expect(EXPECT).unwrap();
        let mut no_bars = parse_expect(EXPECT).unwrap();
        no_bars.bars.clear();
        let mut bare = view();
        bare.bars.clear();
        let mut extra = view();
        extra.bars.push(Bar {
            index: 4,
            size: 4096,
            mem64: false,
            prefetchable: false,
        });
        for (v, x) in [
            (view(), &e),
            (bare.clone(), &e),
            (view(), &no_bars),
            (bare, &no_bars),
            (extra, &e),
        ] {
            let declared: Vec<String> = subtests(&v, x).iter().map(|c| c.to_string()).collect();
            assert_eq!(declared, names(&compare(&v, None, None, x)));
        }
    }
}
