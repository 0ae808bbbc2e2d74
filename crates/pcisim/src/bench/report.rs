//! What every figure shares: the distribution of its samples ([`Dist`]: median, min, p50,
//! p99), the bimodality check, and the report line `NAME VALUE UNIT floor=… ratio=…` written
//! to stdout (a reader that went away is [`ReaderGone`], exit 141).

use std::io::Write;

use anyhow::{bail, Result};

/// The distribution of a figure's samples, in the figure's unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Dist {
    /// Number of samples.
    pub(super) n: usize,
    pub(super) min: f64,
    pub(super) p50: f64,
    pub(super) p99: f64,
    /// Two well-separated modes (see [`bimodal`]).
    pub(super) bimodal: Option<Modes>,
}

/// A figure's name, samples, floor name and floor samples, ready for [`line`].
pub(super) type NamedFigure = (&'static str, Vec<f64>, String, Vec<f64>);

/// Per-window rates of the DMA map figures: (map/s, unmap/s, floor map/s, floor unmap/s).
pub(super) type MapRates = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

/// Where the two modes of a bimodal sample lie.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Modes {
    /// Median of the lower mode, of the upper mode.
    pub(super) low: f64,
    pub(super) high: f64,
    /// Share of the samples in the upper mode.
    pub(super) high_share: f64,
}

/// Samples below this count get no bimodality test (too few to tell a valley from noise).
pub(super) const BIMODAL_MIN_SAMPLES: usize = 20;

/// `p`-quantile (0..=1) of sorted `v` (nearest rank).
pub(super) fn quantile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The distribution of `samples` (positive, any order); None if there are none.
pub(super) fn dist(samples: &[f64]) -> Option<Dist> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_unstable_by(f64::total_cmp);
    Some(Dist {
        n: v.len(),
        min: v[0],
        p50: v[v.len() / 2],
        p99: quantile(&v, 0.99),
        bimodal: bimodal(&v),
    })
}

/// Whether sorted positive samples fall into two well-separated modes.
///
/// Otsu's split on the logarithms (latencies and rates spread multiplicatively): the split
/// point that maximises the between-class variance, and its effectiveness
/// η = between-class variance / total variance. One normal mode gives η = 2/π ≈ 0.64, a
/// uniform spread 0.75, two equal normal modes 4 standard deviations apart 0.80 (their
/// mixture has a clear valley from 2 apart), two point masses 1. The sample is bimodal when
/// η ≥ 0.8, both classes hold at least 10 % of the samples (a tail of outliers is not a mode)
/// and the classes' medians differ by at least 1.5× (a tight unimodal sample split in two is
/// not bimodal, however clean the split). Needs [`BIMODAL_MIN_SAMPLES`].
pub(super) fn bimodal(sorted: &[f64]) -> Option<Modes> {
    let n = sorted.len();
    if n < BIMODAL_MIN_SAMPLES || sorted[0] <= 0.0 {
        return None;
    }
    let logs: Vec<f64> = sorted.iter().map(|x| x.ln()).collect();
    let total: f64 = logs.iter().sum();
    let mean = total / n as f64;
    let var: f64 = logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n as f64;
    if var <= 0.0 {
        return None;
    }
    // Split before index k: classes logs[..k] and logs[k..].
    let (lo_k, hi_k) = (n.div_ceil(10), n - n.div_ceil(10));
    let mut prefix = 0.0;
    let mut best = (0.0, 0usize);
    for (k, l) in logs.iter().enumerate().take(hi_k + 1) {
        if k >= lo_k {
            let (w0, w1) = (k as f64 / n as f64, (n - k) as f64 / n as f64);
            let (m0, m1) = (prefix / k as f64, (total - prefix) / (n - k) as f64);
            let between = w0 * w1 * (m0 - m1).powi(2);
            if between > best.0 {
                best = (between, k);
            }
        }
        prefix += l;
    }
    let (between, k) = best;
    if k == 0 || between / var < 0.8 {
        return None;
    }
    let (low, high) = (sorted[k / 2], sorted[k + (n - k) / 2]);
    (high >= 1.5 * low).then_some(Modes {
        low,
        high,
        high_share: (n - k) as f64 / n as f64,
    })
}

/// One figure: `name value unit floor=floor_name:floor unit ratio=value/floor`, then the
/// figure's `min= p50= p99=` (in its unit) when it has samples, and `bimodal` when the
/// figure's or the floor's samples are; a `#` warning line says which. `value` and `floor`
/// are the medians of their samples.
pub(super) fn line(
    name: &str,
    samples: &[f64],
    unit: &str,
    floor_name: &str,
    floor: &[f64],
) -> Result<()> {
    let (Some(d), Some(f)) = (dist(samples), dist(floor)) else {
        bail!("{name}: no samples");
    };
    let mut text = format!(
        "{name} {} {unit} floor={floor_name}:{}{unit} ratio={:.2}",
        sig4(d.p50),
        sig4(f.p50),
        d.p50 / f.p50.max(f64::MIN_POSITIVE),
    );
    if d.n > 1 {
        text += &format!(
            " min={} p50={} p99={}",
            sig4(d.min),
            sig4(d.p50),
            sig4(d.p99)
        );
    }
    let warnings: Vec<String> = [(name, &d), (floor_name, &f)]
        .into_iter()
        .filter_map(|(who, x)| {
            x.bimodal.map(|m| {
                format!(
                    "# warning: {name}: the samples of {who} are bimodal: {} of {} near {} {unit}, \
                     the rest near {} {unit}; its median stands for neither",
                    format_args!("{:.0}%", m.high_share * 100.0),
                    x.n,
                    sig4(m.high),
                    sig4(m.low),
                )
            })
        })
        .collect();
    if !warnings.is_empty() {
        text += " bimodal";
    }
    say(format_args!("{text}"))?;
    for w in warnings {
        say(format_args!("{w}"))?;
    }
    Ok(())
}

/// Writes one line of the report to stdout. A failed write (typically the reader went away:
/// `pcisim bench | head`) is an error that stops the run — the figures still to come would be
/// measured for nobody — instead of `println!`'s panic. [`ReaderGone`] marks a broken pipe.
pub(super) fn say(args: std::fmt::Arguments<'_>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .map_err(|e| {
            if pcisim_lab::output::is_broken_pipe(&e) {
                anyhow::Error::new(ReaderGone)
            } else {
                anyhow::Error::new(e).context("writing the bench report")
            }
        })
}

/// The report's reader went away (EPIPE on stdout): the bench stops; `pcisim` exits 141 as
/// the suite does.
#[derive(Debug, thiserror::Error)]
#[error("the report's reader went away")]
pub struct ReaderGone;

/// `v` with at least 4 significant digits (integers as they are).
pub(super) fn sig4(v: f64) -> String {
    let decimals = if v <= 0.0 || !v.is_finite() || v >= 1000.0 {
        0
    } else {
        (3 - v.log10().floor() as i32).clamp(0, 9) as usize
    };
    format!("{v:.decimals$}")
}
