//! `pcisim bench --quick` in its reduced (smoke) mode prints every figure of design.md §6 as
//! `NAME VALUE UNIT floor=FLOOR:VALUEUNIT ratio=R [min=MIN p50=P50 p99=P99] [bimodal]` with
//! numbers that parse. Nothing here is timed: the figures of a smoke run mean nothing, only
//! their presence and shape are checked.

use std::process::Command;

/// The figures every run must print.
const FIGURES: &[&str] = &[
    "region_read_4b_rtt_pinned",
    "region_write_4b_rtt_pinned",
    "region_read_4b_rtt_cross_core",
    "region_write_4b_rtt_cross_core",
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
    /// min, p50, p99 of the figure's samples, if it has several.
    dist: Option<(f64, f64, f64)>,
    bimodal: bool,
}

/// The figures that are one reading (no distribution columns).
const SINGLE_READING: &[&str] = &["server_rss_64_gpus"];

fn parse(line: &str) -> Option<(String, Figure)> {
    let mut parts = line.split_whitespace();
    let name = parts.next()?.to_string();
    let value = parts.next()?.parse().ok()?;
    let unit = parts.next()?.to_string();
    let (floor_name, floor) = parts.next()?.strip_prefix("floor=")?.split_once(':')?;
    let floor = floor.strip_suffix(unit.as_str())?.parse().ok()?;
    let ratio = parts.next()?.strip_prefix("ratio=")?.parse().ok()?;
    let mut rest: Vec<&str> = parts.collect();
    let bimodal = rest.last() == Some(&"bimodal");
    if bimodal {
        rest.pop();
    }
    let dist = match rest[..] {
        [] => None,
        [min, p50, p99] => {
            let field = |s: &str, k: &str| -> Option<f64> { s.strip_prefix(k)?.parse().ok() };
            Some((
                field(min, "min=")?,
                field(p50, "p50=")?,
                field(p99, "p99=")?,
            ))
        }
        _ => return None,
    };
    Some((
        name,
        Figure {
            value,
            unit,
            floor_name: floor_name.to_string(),
            floor,
            ratio,
            dist,
            bimodal,
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
        match f.dist {
            Some((min, p50, p99)) => {
                assert!(
                    0.0 < min && min <= p50 && p50 <= p99,
                    "{want}: distribution out of order: {f:?}"
                );
                assert!(
                    (p50 - f.value).abs() <= f.value * 1e-3,
                    "{want}: the value is the median: {f:?}"
                );
            }
            None => assert!(
                SINGLE_READING.contains(want),
                "{want}: no min/p50/p99: {f:?}"
            ),
        }
        if f.bimodal {
            assert!(
                stdout.contains(&format!("# warning: {want}: ")),
                "{want}: marked bimodal without a warning line"
            );
        }
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

/// On one CPU there is no cross-core figure, and the report says why instead of dropping the
/// lines silently; the same-core figures are still there.
#[test]
fn bench_on_one_cpu_skips_cross_core_with_a_reason() {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pcisim"));
    cmd.args(["bench", "--quick", "--smoke"])
        .env("RUST_LOG", "error");
    // SAFETY: between fork and exec the child only calls sched_getaffinity and
    // sched_setaffinity (async-signal-safe) on itself, over a cpu_set_t on its own stack.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            if libc::sched_getaffinity(0, size, &mut set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let first = (0..libc::CPU_SETSIZE as usize).find(|&c| libc::CPU_ISSET(c, &set));
            libc::CPU_ZERO(&mut set);
            libc::CPU_SET(first.unwrap_or(0), &mut set);
            if libc::sched_setaffinity(0, size, &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run pcisim bench on one CPU");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}: {stdout}", out.status);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("# cross-core figures skipped: ")),
        "no reason given for the missing cross-core figures:\n{stdout}"
    );
    assert!(!stdout.contains("_cross_core "), "{stdout}");
    for want in ["region_read_4b_rtt_pinned ", "region_write_4b_rtt_pinned "] {
        assert!(
            stdout.lines().any(|l| l.starts_with(want)),
            "{want}missing:\n{stdout}"
        );
    }
}

#[test]
fn figure_line_parser_rejects_malformed_lines() {
    assert!(parse("x 1.5 ns floor=y:2.0ns ratio=0.75").is_some());
    assert!(parse("x 1.5 ns floor=y:2.0ns").is_none());
    assert!(parse("x 1.5 ns floor=y:2.0GB/s ratio=0.75").is_none());
    assert!(parse("x abc ns floor=y:2.0ns ratio=0.75").is_none());
    assert!(parse("x 1.5 ns floor=y:2.0ns ratio=0.75 extra").is_none());
    let f = parse("x 1.5 ns floor=y:2.0ns ratio=0.75 min=1.2 p50=1.5 p99=9.0 bimodal")
        .expect("full line")
        .1;
    assert_eq!((f.dist, f.bimodal), (Some((1.2, 1.5, 9.0)), true));
    let f = parse("x 1.5 ns floor=y:2.0ns ratio=0.75 min=1.2 p50=1.5 p99=9.0")
        .expect("no marker")
        .1;
    assert!(!f.bimodal && f.dist.is_some());
    assert!(parse("x 1.5 ns floor=y:2.0ns ratio=0.75 bimodal").is_some_and(|(_, f)| f.bimodal));
    assert!(parse("x 1.5 ns floor=y:2.0ns ratio=0.75 min=1.2 p50=1.5").is_none());
    assert!(parse("x 1.5 ns floor=y:2.0ns ratio=0.75 p50=1.5 min=1.2 p99=9").is_none());
    assert!(parse("x 1.5 ns floor=y:2.0ns ratio=0.75 bimodal min=1.2 p50=1.5 p99=9").is_none());
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
