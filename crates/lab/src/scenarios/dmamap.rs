//! M9 `dma-map-1g-pages`, run on the host side ([`crate::harness::host`]) in the `gpu-2g` profile
//! (2 GiB of guest RAM, intel-iommu, guest vfio type1).
//!
//! A guest vfio user (`pcisim-guest dma-map-pages`, guest-tests/src/dmamap.rs) maps 1 GiB of
//! its own shmem in 4 KiB pages (shmem THP off): every page is an IOMMU mapping of its own and
//! reaches the server as a DMA_MAP with an fd of the guest's RAM, 262,144 of them. The GPU
//! writes into the last page, and the buffer is unmapped.
//!
//! The host lowers the server's `RLIMIT_NOFILE` to 1024 first (`prlimit`, the same as starting
//! it under `ulimit -n 1024`: the limit applies to every fd it opens from then on), samples the
//! server's open fds and RSS while the guest runs, and asserts that they stayed bounded: a
//! server that kept an fd per mapping stopped at ~1000 mappings, and every later DMA_MAP failed
//! while the guest's device silently lost memory (issue 11). It also checks, through the
//! journal's counters (which are never lost), that at least one `dma_mapped` and one
//! `dma_unmapped` record per page were journaled, with no DMA fault and no violation. The
//! journal's record ring (4096 records) cannot hold the scenario's half a million records: the
//! window is reported incomplete, and the counters are what is asserted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::host::{HostCtx, HostError, HostProgram};
use crate::vm::profile::ProfileId;
use crate::vm::server::{server_pid, usage, Usage};
use pcisim_guest_wire::DmaMapOptions;

/// `M9 dma-map-1g-pages`.
pub const M9: HostProgram = HostProgram {
    name: "m9-dma-map-1g-pages",
    profile: ProfileId::GpuLarge,
    run: m9,
};

/// The buffer the guest maps.
pub const MIB: u64 = 1024;
/// Its pages: one DMA_MAP each.
pub const PAGES: u64 = MIB << 8;
/// The server's fd limit during the scenario (a desktop's default).
pub const NOFILE: u64 = 1024;
/// The server may open this many fds more than before the guest started (QEMU reconnects
/// nothing here; eventfds for MSI-X vectors the guest enables are a handful).
pub const FD_SLACK: usize = 32;
/// RSS bound per mapping (docs/security.md states ~80 bytes).
pub const RSS_PER_MAPPING: u64 = 256;

/// What the sampler saw of the server.
#[derive(Debug, Clone, Copy, Default)]
struct Peak {
    fds: usize,
    rss_kb: u64,
    samples: u64,
}

/// Set `pid`'s RLIMIT_NOFILE (soft and hard) to `n`.
fn set_nofile(pid: u32, n: u64) -> Result<(), String> {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    let pid = libc::pid_t::try_from(pid).map_err(|e| e.to_string())?;
    // SAFETY: prlimit reads one rlimit from `lim`, which lives across the call, and writes
    // nothing (null old-limit pointer); it only changes the target process's limit.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    if r == 0 {
        Ok(())
    } else {
        Err(format!("prlimit: {}", std::io::Error::last_os_error()))
    }
}

/// The server's `Max open files` soft limit as `/proc/PID/limits` shows it.
fn nofile_of(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

fn counter(stats: &serde_json::Map<String, Value>, dev: &str, key: &str) -> u64 {
    stats
        .get(dev)
        .and_then(|d| d.get(key))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn m9(ctx: &mut HostCtx<'_>) -> Result<(), HostError> {
    let dev = "gpu0";
    let control = ctx.control().path().to_path_buf();
    let pid = server_pid(&control)
        .ok_or_else(|| HostError::Step(format!("no pcisim serve with {}", control.display())))?;
    set_nofile(pid, NOFILE).map_err(HostError::Step)?;
    let limit = nofile_of(pid);
    ctx.check(
        &format!("the server (pid {pid}) runs with RLIMIT_NOFILE {NOFILE}"),
        limit == Some(NOFILE),
        format!("/proc/{pid}/limits says {limit:?}"),
    );
    let (fds0, rss0) = usage(pid)
        .map(|u| (u.fds, u.rss_kib))
        .map_err(HostError::Step)?;
    let stats0 = ctx.control().stats(Some(dev))?;
    let bdf = ctx.bdf_of(dev)?;
    let argv = ctx.guest_argv(
        dev,
        DmaMapOptions {
            bdf: Some(bdf.clone()),
            mib: Some(MIB),
        },
    )?;
    // Sample the server while the guest maps, writes and unmaps.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = Peak::default();
            while !stop.load(Ordering::Acquire) {
                if let Ok(Usage {
                    fds, rss_kib: rss, ..
                }) = usage(pid)
                {
                    peak.fds = peak.fds.max(fds);
                    peak.rss_kb = peak.rss_kb.max(rss);
                    peak.samples += 1;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };
    let t = Instant::now();
    let verdict = ctx.guest_test(
        &format!(
            "guest: a vfio user maps {MIB} MiB in 4 KiB pages, the GPU writes its last page, unmap"
        ),
        &argv,
    );
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    let peak = sampler
        .join()
        .map_err(|_| HostError::Step("the sampler thread panicked".into()))?;
    verdict?;
    ctx.progress(&format!(
        "M9: guest program {secs:.1} s; server fds {fds0} -> peak {}, RSS {rss0} -> peak {} kB ({} samples)",
        peak.fds, peak.rss_kb, peak.samples
    ));
    ctx.check(
        &format!(
            "server fds stayed bounded (before {fds0}, peak {}, limit {NOFILE})",
            peak.fds
        ),
        peak.samples > 0 && peak.fds <= fds0 + FD_SLACK,
        format!(
            "peak {} > {fds0} + {FD_SLACK} ({} samples)",
            peak.fds, peak.samples
        ),
    );
    let bound_kb = PAGES * RSS_PER_MAPPING / 1024;
    let grown = peak.rss_kb.saturating_sub(rss0);
    ctx.check(
        &format!("server RSS stayed bounded (+{grown} kB, bound {bound_kb} kB)"),
        grown <= bound_kb,
        format!("RSS grew from {rss0} to {} kB", peak.rss_kb),
    );
    let stats1 = ctx.control().stats(Some(dev))?;
    let delta = |key: &str| counter(&stats1, dev, key).saturating_sub(counter(&stats0, dev, key));
    let records = delta("records");
    ctx.check(
        &format!("{dev}: journaled {records} records, at least a map and an unmap per page"),
        records >= 2 * PAGES,
        format!("{records} < {}", 2 * PAGES),
    );
    ctx.check(
        &format!("{dev}: no DMA fault or refusal, no violation"),
        delta("dma_faults") == 0 && delta("dma_refused") == 0 && delta("violations") == 0,
        format!(
            "dma_faults +{}, dma_refused +{}, violations +{}",
            delta("dma_faults"),
            delta("dma_refused"),
            delta("violations")
        ),
    );
    ctx.diag(&format!(
        "the journal ring keeps {} records: this window lost {} of its {records} (the counters above are complete)",
        4096,
        delta("dropped")
    ));
    Ok(())
}
