//! `pcisim bench --quick` in its reduced (smoke) mode prints every figure of design.md §6 as
//! `NAME VALUE UNIT floor=FLOOR:VALUEUNIT ratio=R` with numbers that parse. Nothing here is
//! timed: the figures of a smoke run mean nothing, only their presence and shape are checked.

use std::process::Command;

/// The figures every run must print.
const FIGURES: &[&str] = &[
    "region_read_4b_rtt_pinned",
    "region_write_4b_rtt_pinned",
    "region_read_4b_rtt_unpinned",
    "region_write_4b_rtt_unpinned",
    "region_write_multi_16",
    "region_write_multi_200",
    "dma_engine_copy_1mib",
    "npu_translate_atc_miss",
    "npu_translate_atc_hit",
    "npu_translate_atc_hit_checking",
    "dma_map_4k",
    "dma_unmap_4k",
    "server_rss_64_gpus",
];

/// A parsed figure line.
#[derive(Debug)]
struct Figure {
    value: f64,
    unit: String,
    floor_name: String,
    floor: f64,
    ratio: f64,
}

fn parse(line: &str) -> Option<(String, Figure)> {
    let mut parts = line.split_whitespace();
    let name = parts.next()?.to_string();
    let value = parts.next()?.parse().ok()?;
    let unit = parts.next()?.to_string();
    let (floor_name, floor) = parts.next()?.strip_prefix("floor=")?.split_once(':')?;
    let floor = floor.strip_suffix(unit.as_str())?.parse().ok()?;
    let ratio = parts.next()?.strip_prefix("ratio=")?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((
        name,
        Figure {
            value,
            unit,
            floor_name: floor_name.to_string(),
            floor,
            ratio,
        },
    ))
}

#[test]
fn bench_quick_smoke_prints_every_figure_with_floor_and_ratio() {
    let out = Command::new(env!("CARGO_BIN_EXE_pcisim"))
        .args(["bench", "--quick", "--smoke"])
        .env("RUST_LOG", "error")
        .output()
        .expect("run pcisim bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pcisim bench failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.starts_with('#')).collect();
    let figures: Vec<(String, Figure)> = lines
        .iter()
        .map(|l| parse(l).unwrap_or_else(|| panic!("unparsable figure line {l:?}")))
        .collect();
    for want in FIGURES {
        let found: Vec<&Figure> = figures
            .iter()
            .filter(|(n, _)| n == want)
            .map(|(_, f)| f)
            .collect();
        assert_eq!(found.len(), 1, "{want}: expected one line in\n{stdout}");
        let f = found[0];
        assert!(
            f.value > 0.0 && f.floor > 0.0 && f.ratio > 0.0 && f.ratio.is_finite(),
            "{want}: {f:?}"
        );
        assert!(
            !f.unit.is_empty() && !f.floor_name.is_empty(),
            "{want}: {f:?}"
        );
        // The ratio is value / floor (to the two decimals printed).
        let expect = f.value / f.floor;
        assert!(
            (f.ratio - expect).abs() <= 0.01 + expect * 0.01,
            "{want}: ratio {} but value/floor = {expect}",
            f.ratio
        );
    }
    assert_eq!(
        figures.len(),
        FIGURES.len(),
        "unexpected lines in\n{stdout}"
    );
    assert!(
        stdout
            .lines()
            .next()
            .is_some_and(|l| l.starts_with("# pcisim bench: ")),
        "the first line names the machine"
    );
}

#[test]
fn figure_line_parser_rejects_malformed_lines() {
    assert!(parse("x 1.5 ns floor=y:2.0ns ratio=0.75").is_some());
    assert!(parse("x 1.5 ns floor=y:2.0ns").is_none());
    assert!(parse("x 1.5 ns floor=y:2.0GB/s ratio=0.75").is_none());
    assert!(parse("x abc ns floor=y:2.0ns ratio=0.75").is_none());
    assert!(parse("x 1.5 ns floor=y:2.0ns ratio=0.75 extra").is_none());
}

/// `pcisim bench | head -0`: the report's reader is gone before the first line. The bench stops
/// with exit 141 (as `lab suite` does), without the panic `println!` gives on EPIPE (exit 101).
#[test]
fn bench_whose_reader_went_away_exits_141_without_panic() {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pcisim"))
        .args(["bench", "--quick", "--smoke"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pcisim bench");
    drop(child.stdout.take());
    let o = child.wait_with_output().expect("wait for pcisim bench");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "bench panicked: {err}");
    assert_eq!(o.status.code(), Some(141), "status {}: {err}", o.status);
}
