//! `pcisim bench`: the server's figures, each next to a floor measured in the same run
//! (design.md §6). One line per figure:
//!
//! ```text
//! NAME VALUE UNIT floor=FLOOR_NAME:VALUE UNIT ratio=VALUE/FLOOR [min=MIN p50=P50 p99=P99] [bimodal]
//! ```
//!
//! VALUE and the floor are medians of their samples; `min`/`p50`/`p99` describe the figure's
//! samples in its unit (absent for a one-reading figure); `bimodal` marks a figure or floor
//! whose samples fall into two separate modes, explained by a `# warning:` line after it.
//! Lines starting with `#` are comments (the machine, the parameters, skipped figures and why,
//! warnings). docs/perf.md explains every figure and holds the numbers of a reference run.
//!
//! - **Trapped region round trips** (`region_read_4b_rtt_*`, `region_write_4b_rtt_*`): a client
//!   sends a 4-byte REGION_READ of the GPU's ID register (or a REGION_WRITE of SCRATCH0) to a
//!   real server over its Unix socket and waits for the reply. The floor is a raw AF_UNIX
//!   ping-pong that moves the same bytes between two threads doing nothing else. Both are
//!   measured pinned (`_pinned`: client, server and echo threads on one CPU, as when a vCPU
//!   thread and the server share a core) and cross-core (`_cross_core`: the client on one CPU,
//!   the server and the echo thread on another, so every round trip is two cross-CPU
//!   wake-ups), the floor always placed exactly as its figure. With one usable CPU the
//!   cross-core lines are skipped and a `#` line says so. Median of all round trips.
//! - **REGION_WRITE_MULTI** (`region_write_multi_N`): N 4-byte register writes as one
//!   REGION_WRITE_MULTI and its reply, against the same N writes as posted REGION_WRITEs
//!   (`NO_REPLY`) followed by one REGION_READ that flushes them (what QEMU does without
//!   `write_multiple`). Median per batch.
//! - **DMA engine copy** (`dma_engine_copy_*`): the GPU's command ring copies client memory to
//!   client memory (COPY, then a WRITE_FENCE the bench waits for), through its bus (gated,
//!   bounds-checked, journaled). The floor is a memcpy between the same two memfds (same
//!   pages, so page size effects cancel) done by a thread the bench hands the job to and waits
//!   for the same way, so both see the same wake-ups and scheduling. Median of the runs.
//! - **NPU translation** (`npu_translate_*`): the NPU engine runs FILL descriptors over
//!   process-virtual pages of a PASID whose 4-level page tables live in client memory; each
//!   4 KiB page needs one translation. ATC hits (the range fits the ATC, warm) against writing
//!   the same pages directly (memset); ATC misses (an ATC of half the range, swept in order:
//!   every page evicts an entry and walks the tables, four 8-byte DMA reads) against hits; hits
//!   in checking mode (the default: every hit re-walks the tables to catch stale
//!   translations) against hits. Samples alternate between the four. Median pages per second.
//! - **DMA map and unmap** (`dma_map_4k`, `dma_unmap_4k`): a client maps a memfd page by page,
//!   one DMA_MAP per 4 KiB page each carrying its own dup'd fd (what QEMU sends for a guest
//!   vfio user behind a vIOMMU), in windows of 256 requests before reading their replies,
//!   then unmaps page by page the same way. The floor is the same traffic through a raw
//!   AF_UNIX echo thread that only receives each message (and its fd), closes the fd and
//!   replies with the same number of bytes: the cost of the socket round trip and of passing
//!   the fd, which the server cannot avoid. Mappings per second, the median over the
//!   windows of 256 (higher is better).
//! - **Server RSS** (`server_rss_64_gpus`): a `pcisim serve` with 64 GPUs (256 MiB of VRAM
//!   each, never touched) against one with a single GPU. One reading: no distribution.
//!
//! The bench is split by figure family (`region`, `dma_copy`, `npu`, `dma_map`, `rss`), with
//! what they share: the statistics and report lines (`report`), thread placement
//! (`placement`), the vfio-user client and the echo floor (`client`) and client memory
//! (`memory`). This file holds the scale of a run and [`run`], which runs every family.

mod client;
mod dma_copy;
mod dma_map;
mod memory;
mod npu;
mod placement;
mod region;
mod report;
mod rss;

pub use report::ReaderGone;

use dma_copy::dma_copy;
use dma_map::{dma_map_rates, MAP_WINDOW};
use npu::{npu_layout, npu_translate};
use region::{region_rtts, write_multi};
use report::{line, say};
use rss::server_rss;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

/// Completion polling interval: sleeping, so the device's own thread keeps a core (the
/// machine may have only two); small against the tens of milliseconds a sample takes.
const POLL: Duration = Duration::from_micros(20);

/// How long each figure runs.
#[derive(Debug, Clone, Copy)]
struct Scale {
    /// Round trips per region figure.
    rtt: usize,
    /// Batches per REGION_WRITE_MULTI figure.
    batches: usize,
    /// Bytes per DMA copy, and copies.
    dma_len: usize,
    dma_runs: usize,
    /// Samples per NPU figure (each of `npu_layout::PER_SAMPLE` translations).
    npu_runs: usize,
    /// Devices of the big server in the RSS figure.
    rss_devices: usize,
    /// Pages mapped (and unmapped) one by one in the DMA map figures.
    map_pages: u64,
}

impl Scale {
    fn new(quick: bool, smoke: bool) -> Scale {
        if smoke {
            // For tests (debug builds): every line, tiny counts; the figures mean nothing.
            Scale {
                rtt: 200,
                batches: 5,
                dma_len: 1 << 20,
                dma_runs: 3,
                npu_runs: 2,
                rss_devices: 64,
                map_pages: 1024,
            }
        } else if quick {
            Scale {
                rtt: 20_000,
                batches: 200,
                dma_len: 64 << 20,
                dma_runs: 7,
                npu_runs: 10,
                rss_devices: 64,
                map_pages: 65_536,
            }
        } else {
            Scale {
                rtt: 200_000,
                batches: 2_000,
                dma_len: 64 << 20,
                dma_runs: 31,
                npu_runs: 100,
                rss_devices: 64,
                map_pages: 262_144,
            }
        }
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {kernel}")
}

/// Removes the bench's socket directory when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run every benchmark and print one line per figure. `smoke`: tiny counts, for tests.
pub fn run(quick: bool, smoke: bool) -> Result<()> {
    let s = Scale::new(quick, smoke);
    // The in-process servers log every client at `info`: keep the figures readable.
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let dir = TempDir(std::env::temp_dir().join(format!("pcisim-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    say(format_args!("# pcisim bench: {}", machine()))?;
    say(format_args!(
        "# {} round trips per region figure, {} batches per multi figure, \
         {} copies of {} MiB, {} NPU samples of {} translations, \
         {} 4 KiB DMA maps then unmaps in windows of {MAP_WINDOW}; value and floor are medians, \
         ratio = value / floor, min/p50/p99 of the figure's samples in its unit",
        s.rtt,
        s.batches,
        s.dma_runs,
        s.dma_len >> 20,
        s.npu_runs,
        npu_layout::PER_SAMPLE,
        s.map_pages
    ))?;
    region_rtts(&dir.0, s)?;
    for n in [16, 200] {
        let (multi, singles) = write_multi(&dir.0, n, s.batches)?;
        line(
            &format!("region_write_multi_{n}"),
            &multi,
            "ns",
            &format!("posted_region_writes_{n}_and_read"),
            &singles,
        )?;
    }
    let (engine, memcpy) = dma_copy(s.dma_len, s.dma_runs)?;
    line(
        &format!("dma_engine_copy_{}mib", s.dma_len >> 20),
        &engine,
        "GB/s",
        "memcpy_same_pages",
        &memcpy,
    )?;
    for (name, v, floor_name, floor) in npu_translate(s.npu_runs)? {
        let mega = |v: Vec<f64>| -> Vec<f64> { v.into_iter().map(|x| x / 1e6).collect() };
        line(name, &mega(v), "Mpage/s", &floor_name, &mega(floor))?;
    }
    let (map, unmap, floor_map, floor_unmap) = dma_map_rates(&dir.0, s.map_pages)?;
    line(
        "dma_map_4k",
        &map,
        "maps/s",
        "af_unix_fd_echo_48b_16b",
        &floor_map,
    )?;
    line(
        "dma_unmap_4k",
        &unmap,
        "maps/s",
        "af_unix_echo_40b_40b",
        &floor_unmap,
    )?;
    let one = server_rss(&dir.0, 1)?;
    let many = server_rss(&dir.0, s.rss_devices)?;
    line(
        &format!("server_rss_{}_gpus", s.rss_devices),
        &[many as f64],
        "KiB",
        "server_rss_1_gpu",
        &[one as f64],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::placement::{placements, Placement};
    use super::report::{bimodal, dist};

    /// A deterministic pseudo-random stream in [0, 1) (xorshift), so the samples are fixed.
    fn uniform(seed: u64) -> impl Iterator<Item = f64> {
        let mut x = seed | 1;
        std::iter::from_fn(move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Some((x >> 11) as f64 / (1u64 << 53) as f64)
        })
    }

    /// Approximately normal samples (sum of 12 uniforms) of mean `mu` and deviation `sd`.
    fn normal(seed: u64, n: usize, mu: f64, sd: f64) -> Vec<f64> {
        let mut u = uniform(seed);
        (0..n)
            .map(|_| mu + sd * ((&mut u).take(12).sum::<f64>() - 6.0))
            .collect()
    }

    fn sorted(mut v: Vec<f64>) -> Vec<f64> {
        v.sort_unstable_by(f64::total_cmp);
        v
    }

    #[test]
    fn test_bimodal_flags_two_separated_modes() {
        // The issue's case: a 10 µs mode and a 54 µs mode, 60/40.
        let mut v = normal(1, 600, 10_000.0, 500.0);
        v.extend(normal(2, 400, 54_000.0, 3_000.0));
        let m = bimodal(&sorted(v)).expect("two modes 5x apart are bimodal");
        assert!((9_000.0..11_000.0).contains(&m.low), "{m:?}");
        assert!((50_000.0..58_000.0).contains(&m.high), "{m:?}");
        assert!((m.high_share - 0.4).abs() < 0.02, "{m:?}");
        // A minority mode of 15 % still counts.
        let mut v = normal(3, 850, 9_000.0, 300.0);
        v.extend(normal(4, 150, 30_000.0, 1_000.0));
        assert!(bimodal(&sorted(v)).is_some());
    }

    #[test]
    fn test_bimodal_ignores_unimodal_tails_and_tight_splits() {
        // One wide normal mode.
        assert_eq!(bimodal(&sorted(normal(5, 1000, 9_600.0, 1_500.0))), None);
        // Uniform over 8..12 µs: flat, no valley.
        let u: Vec<f64> = uniform(6)
            .take(1000)
            .map(|x| 8_000.0 + 4_000.0 * x)
            .collect();
        assert_eq!(bimodal(&sorted(u)), None);
        // A 5 % tail of 10x outliers is a tail, not a mode.
        let mut v = normal(7, 950, 9_600.0, 300.0);
        v.extend(normal(8, 50, 96_000.0, 3_000.0));
        assert_eq!(bimodal(&sorted(v)), None);
        // Two clean modes 1.2x apart: separated, but too close to matter.
        let mut v = normal(9, 500, 10_000.0, 50.0);
        v.extend(normal(10, 500, 12_000.0, 50.0));
        assert_eq!(bimodal(&sorted(v)), None);
        // Too few samples to tell; constant samples.
        assert_eq!(bimodal(&[1.0, 1.0, 5.0, 5.0]), None);
        assert_eq!(bimodal(&[7.0; 100]), None);
    }

    #[test]
    fn test_dist_reports_min_median_p99() {
        let v: Vec<f64> = (1..=1000).rev().map(f64::from).collect();
        let d = dist(&v).expect("samples");
        assert_eq!((d.n, d.min, d.p50, d.p99), (1000, 1.0, 501.0, 990.0));
        assert_eq!(d.bimodal, None);
        assert_eq!(dist(&[]), None);
        let one = dist(&[3.5]).expect("one sample");
        assert_eq!((one.min, one.p50, one.p99), (3.5, 3.5, 3.5));
    }

    #[test]
    fn test_placements_skip_cross_core_on_one_cpu_with_a_reason() {
        let (p, why) = placements(&[3]);
        assert_eq!(p, vec![Placement::SameCore(3)]);
        assert!(why.is_some_and(|w| w.contains("cross-core figures skipped")));
        let (p, why) = placements(&[0, 1, 2]);
        assert_eq!(
            p,
            vec![
                Placement::SameCore(0),
                Placement::CrossCore {
                    client: 0,
                    server: 1
                }
            ]
        );
        assert_eq!(why, None);
        assert_eq!(placements(&[]).0, Vec::new());
    }
}
