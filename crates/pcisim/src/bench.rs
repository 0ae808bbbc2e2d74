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

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use pcisim_vfio_user::proto::{self, Command, Header, HEADER_SIZE};

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

/// The distribution of a figure's samples, in the figure's unit.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Dist {
    /// Number of samples.
    n: usize,
    min: f64,
    p50: f64,
    p99: f64,
    /// Two well-separated modes (see [`bimodal`]).
    bimodal: Option<Modes>,
}

/// A figure's name, samples, floor name and floor samples, ready for [`line`].
type NamedFigure = (&'static str, Vec<f64>, String, Vec<f64>);

/// Per-window rates of the DMA map figures: (map/s, unmap/s, floor map/s, floor unmap/s).
type MapRates = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

/// Where the two modes of a bimodal sample lie.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Modes {
    /// Median of the lower mode, of the upper mode.
    low: f64,
    high: f64,
    /// Share of the samples in the upper mode.
    high_share: f64,
}

/// Samples below this count get no bimodality test (too few to tell a valley from noise).
const BIMODAL_MIN_SAMPLES: usize = 20;

/// `p`-quantile (0..=1) of sorted `v` (nearest rank).
fn quantile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The distribution of `samples` (positive, any order); None if there are none.
fn dist(samples: &[f64]) -> Option<Dist> {
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
fn bimodal(sorted: &[f64]) -> Option<Modes> {
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
fn line(name: &str, samples: &[f64], unit: &str, floor_name: &str, floor: &[f64]) -> Result<()> {
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
fn say(args: std::fmt::Arguments<'_>) -> Result<()> {
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
fn sig4(v: f64) -> String {
    let decimals = if v <= 0.0 || !v.is_finite() || v >= 1000.0 {
        0
    } else {
        (3 - v.log10().floor() as i32).clamp(0, 9) as usize
    };
    format!("{v:.decimals$}")
}

/// The CPUs this process may run on (its affinity mask when the bench started), in order.
fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size into it for
    // the calling thread (pid 0); CPU_ISSET reads inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

/// Restrict the calling thread to `cpus`. A failure is an error: a figure that says where it
/// ran must have run there.
fn set_affinity(cpus: &[usize]) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it (CPU_SET ignores
    // numbers past CPU_SETSIZE); sched_setaffinity reads it for the calling thread (pid 0).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pinning a bench thread to CPUs {cpus:?}"));
    }
    Ok(())
}

/// Where the threads of a round-trip figure run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Client, server and echo threads on one CPU (a vCPU thread and the server sharing a
    /// core): every round trip is two context switches on that CPU.
    SameCore(usize),
    /// The client on one CPU, the server (and the floor's echo thread) on another: every
    /// round trip is two cross-CPU wake-ups.
    CrossCore { client: usize, server: usize },
}

impl Placement {
    fn client(self) -> usize {
        match self {
            Placement::SameCore(c) => c,
            Placement::CrossCore { client, .. } => client,
        }
    }

    fn server(self) -> usize {
        match self {
            Placement::SameCore(c) => c,
            Placement::CrossCore { server, .. } => server,
        }
    }

    /// The figure names' suffix.
    fn tag(self) -> &'static str {
        match self {
            Placement::SameCore(_) => "pinned",
            Placement::CrossCore { .. } => "cross_core",
        }
    }
}

/// The placements of the round-trip figures given the CPUs the bench may use: same-core on
/// the first, cross-core on the first two — or, with one CPU, why there is no cross-core
/// figure.
fn placements(cpus: &[usize]) -> (Vec<Placement>, Option<String>) {
    match cpus {
        [] => (
            Vec::new(),
            Some("no CPU in the affinity mask: no round-trip figure".into()),
        ),
        [only] => (
            vec![Placement::SameCore(*only)],
            Some(format!(
                "cross-core figures skipped: the bench may run on one CPU only ({only}); \
                 run it where two are allowed"
            )),
        ),
        [a, b, ..] => (
            vec![
                Placement::SameCore(*a),
                Placement::CrossCore {
                    client: *a,
                    server: *b,
                },
            ],
            None,
        ),
    }
}

// ---- vfio-user frames ------------------------------------------------------------------------

fn frame(command: Command, flags: u32, id: u16, body: &[u8]) -> Vec<u8> {
    let h = Header {
        id,
        command: command as u16,
        size: (HEADER_SIZE + body.len()) as u32,
        flags,
        error: 0,
    };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(body);
    v
}

fn read_request(offset: u64, id: u16) -> Vec<u8> {
    let mut p = proto::Writer::new();
    p.u64(offset).u32(0).u32(4);
    frame(Command::RegionRead, 0, id, &p.finish())
}

fn write_request(offset: u64, value: u32, flags: u32, id: u16) -> Vec<u8> {
    let mut p = proto::Writer::new();
    p.u64(offset).u32(0).u32(4).u32(value);
    frame(Command::RegionWrite, flags, id, &p.finish())
}

/// REGION_WRITE_MULTI of 4-byte writes `(offset, value)` to BAR0.
fn multi_request(writes: &[(u64, u32)], id: u16) -> Vec<u8> {
    let mut p = proto::Writer::new();
    p.u64(writes.len() as u64);
    for &(offset, value) in writes {
        p.u64(offset).u32(0).u32(4).u32(value).u32(0);
    }
    frame(Command::RegionWriteMulti, 0, id, &p.finish())
}

/// A client connection that has done VERSION.
struct Client {
    s: UnixStream,
}

impl Client {
    fn connect(sock: &Path) -> Result<Client> {
        let mut s = UnixStream::connect(sock).context("connecting to the bench server")?;
        let mut p = proto::Writer::new();
        p.u16(0).u16(0).bytes(b"{}").bytes(&[0]);
        s.write_all(&frame(Command::Version, 0, 0, &p.finish()))?;
        let mut c = Client { s };
        c.reply()?;
        Ok(c)
    }

    /// Read one reply; an error reply is an error.
    fn reply(&mut self) -> Result<Vec<u8>> {
        let mut hb = [0u8; HEADER_SIZE];
        self.s.read_exact(&mut hb)?;
        let h = Header::parse(&hb);
        let mut body = vec![0u8; (h.size as usize).saturating_sub(HEADER_SIZE)];
        self.s.read_exact(&mut body)?;
        if h.flags & proto::FLAG_ERROR != 0 {
            bail!("command {} refused: errno {}", h.command, h.error);
        }
        Ok(body)
    }

    /// Command.Memory Space on (config region, offset 4), as a driver does before touching
    /// BAR0: without it the function drops BAR writes and reads all-ones.
    fn memory_space_on(&mut self) -> Result<()> {
        let mut p = proto::Writer::new();
        p.u64(4).u32(7).u32(2).u16(0x0002);
        self.s
            .write_all(&frame(Command::RegionWrite, 0, 9, &p.finish()))?;
        self.reply()?;
        Ok(())
    }

    fn read32(&mut self, offset: u64) -> Result<u32> {
        self.s.write_all(&read_request(offset, 1))?;
        let b = self.reply()?;
        let v = b
            .get(16..20)
            .ok_or_else(|| anyhow!("short REGION_READ reply"))?;
        Ok(u32::from_le_bytes([v[0], v[1], v[2], v[3]]))
    }
}

/// Spawn `body` on a thread restricted to `cpu` (if given) and wait until it is: a thread
/// that could not be pinned is an error, not a silently unpinned figure.
fn spawn_on(cpu: Option<usize>, body: impl FnOnce() + Send + 'static) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let pinned = cpu.map_or(Ok(()), |c| set_affinity(&[c]));
        let ok = pinned.is_ok();
        let _ = tx.send(pinned);
        if ok {
            body();
        }
    });
    rx.recv()
        .map_err(|_| anyhow!("a bench thread died before it started"))?
}

/// A GPU served by a real server on a thread of this process, on `cpu` if given.
fn start_server(dir: &Path, name: &str, cpu: Option<usize>) -> Result<PathBuf> {
    let sock = dir.join(format!("{name}.sock"));
    let spec = crate::spec::parse(&format!("gpu:socket={},vram=16M", sock.display()), 0)?;
    let built = crate::devices::build(&spec)?;
    let server = pcisim_vfio_user::Server::bind(
        &sock,
        built.device,
        pcisim_vfio_user::ServerOptions {
            name: "bench".into(),
            ..Default::default()
        },
    )?;
    spawn_on(cpu, move || {
        let _ = server.run();
    })?;
    Ok(sock)
}

// ---- round trips -----------------------------------------------------------------------------

/// The floor's echo thread (on `cpu` if given): answers every `req_len`-byte message with
/// `reply_len` bytes.
fn echo_pair(cpu: Option<usize>, req_len: usize, reply_len: usize) -> Result<UnixStream> {
    let (a, mut b) = UnixStream::pair()?;
    spawn_on(cpu, move || {
        let mut req = vec![0u8; req_len];
        let reply = vec![0u8; reply_len];
        while b.read_exact(&mut req).is_ok() {
            if b.write_all(&reply).is_err() {
                break;
            }
        }
    })?;
    Ok(a)
}

/// Send `req`, read a `reply.len()`-byte reply; nanoseconds.
fn round_trip(s: &mut UnixStream, req: &[u8], reply: &mut [u8]) -> Result<f64> {
    let t = Instant::now();
    s.write_all(req)?;
    s.read_exact(reply)?;
    Ok(t.elapsed().as_nanos() as f64)
}

/// Round trips of `req` through a real server serving the GPU (replies of `reply_len`) and
/// through a raw AF_UNIX echo of the same sizes, in alternating blocks (so both see the same
/// machine load), client, server and echo threads placed by `at` (the floor exactly as the
/// figure). Returns (server, floor) samples in ns.
fn server_rtt(
    dir: &Path,
    iters: usize,
    at: Placement,
    req: &[u8],
    reply_len: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let name = format!("rtt-{}-{}", at.tag(), req.len());
    let sock = start_server(dir, &name, Some(at.server()))?;
    let mut floor = echo_pair(Some(at.server()), req.len(), reply_len)?;
    let restore = allowed_cpus()?;
    set_affinity(&[at.client()])?;
    let result = (|| -> Result<(Vec<f64>, Vec<f64>)> {
        let mut c = Client::connect(&sock)?;
        c.memory_space_on()?;
        let mut reply = vec![0u8; reply_len];
        // Warm up both (first accesses, allocator, wake-up paths).
        for _ in 0..iters / 10 + 1 {
            round_trip(&mut c.s, req, &mut reply)?;
            round_trip(&mut floor, req, &mut reply)?;
        }
        let (mut srv, mut raw) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
        const BLOCK: usize = 500;
        let mut done = 0;
        while done < iters {
            let n = BLOCK.min(iters - done);
            for _ in 0..n {
                srv.push(round_trip(&mut c.s, req, &mut reply)?);
            }
            let h = Header::parse(reply[..HEADER_SIZE].try_into()?);
            if h.flags & proto::FLAG_ERROR != 0 || h.size as usize != reply_len {
                bail!("the server answered {h:?}, not a {reply_len}-byte reply");
            }
            for _ in 0..n {
                raw.push(round_trip(&mut floor, req, &mut reply)?);
            }
            done += n;
        }
        Ok((srv, raw))
    })();
    drop(floor);
    set_affinity(&restore)?;
    let _ = std::fs::remove_file(&sock);
    result
}

fn region_rtts(dir: &Path, s: Scale) -> Result<()> {
    let read = read_request(gpu_regs::ID, 1);
    let write = write_request(gpu_regs::SCRATCH, 0x5eed, 0, 1);
    // Replies: header + offset/region/count (+ the data for a read).
    let (read_reply, write_reply) = (HEADER_SIZE + 20, HEADER_SIZE + 16);
    let (places, skipped) = placements(&allowed_cpus()?);
    if let Some(why) = skipped {
        say(format_args!("# {why}"))?;
    }
    for at in places {
        let tag = at.tag();
        for (what, req, reply_len) in [("read", &read, read_reply), ("write", &write, write_reply)]
        {
            let (v, f) = server_rtt(dir, s.rtt, at, req, reply_len)?;
            line(
                &format!("region_{what}_4b_rtt_{tag}"),
                &v,
                "ns",
                &format!("af_unix_pingpong_{}b_{}b_{tag}", req.len(), reply_len),
                &f,
            )?;
        }
    }
    Ok(())
}

/// REGION_WRITE_MULTI of `n` writes vs `n` posted writes and a flushing read. Returns
/// (multi ns, singles ns) samples, one per batch.
fn write_multi(dir: &Path, n: usize, batches: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let sock = start_server(dir, &format!("multi-{n}"), None)?;
    let mut c = Client::connect(&sock)?;
    c.memory_space_on()?;
    let regs = |b: usize| -> Vec<(u64, u32)> {
        (0..n)
            .map(|i| {
                let reg = gpu_regs::SCRATCH + 4 * (i as u64 % gpu_regs::SCRATCH_COUNT);
                (reg, (b * n + i) as u32)
            })
            .collect()
    };
    let mut multi = Vec::with_capacity(batches);
    let mut singles = Vec::with_capacity(batches);
    for b in 0..batches + batches / 10 + 1 {
        let writes = regs(b);
        let m = multi_request(&writes, 2);
        let posted: Vec<u8> = writes
            .iter()
            .flat_map(|&(o, v)| write_request(o, v, proto::FLAG_NO_REPLY, 3))
            .collect();
        let flush = read_request(gpu_regs::SCRATCH, 4);
        let t = Instant::now();
        c.s.write_all(&m)?;
        let r = c.reply()?;
        let dm = t.elapsed().as_nanos() as f64;
        if r.get(..8)
            .map(|d| u64::from_le_bytes(d.try_into().unwrap_or([0; 8])))
            != Some(n as u64)
        {
            bail!("REGION_WRITE_MULTI did not apply {n} writes");
        }
        let t = Instant::now();
        c.s.write_all(&posted)?;
        c.s.write_all(&flush)?;
        c.reply()?;
        let ds = t.elapsed().as_nanos() as f64;
        // The first tenth warms up.
        if b > batches / 10 {
            multi.push(dm);
            singles.push(ds);
        }
    }
    // Both paths wrote the same values: each register holds the last batch's last write to it.
    let last = regs(batches + batches / 10);
    for k in 0..gpu_regs::SCRATCH_COUNT.min(n as u64) {
        let reg = gpu_regs::SCRATCH + 4 * k;
        let want = last.iter().rev().find(|w| w.0 == reg).map(|w| w.1);
        let got = c.read32(reg)?;
        if Some(got) != want {
            bail!("SCRATCH at {reg:#x} reads {got:#x}, expected {want:x?}");
        }
    }
    drop(c);
    let _ = std::fs::remove_file(&sock);
    Ok((multi, singles))
}

/// The GPU's BAR0 offsets the bench uses.
mod gpu_regs {
    pub use pcisim_devices::gpu::regs::{ID, SCRATCH, SCRATCH_COUNT};
}

// ---- client memory ---------------------------------------------------------------------------

/// A memfd of `len` bytes sealed against shrinking, as QEMU's memory backend makes them.
fn memfd(len: u64) -> Result<std::fs::File> {
    // SAFETY: the name is a valid NUL-terminated string; memfd_create touches no other memory.
    let raw = unsafe {
        libc::memfd_create(
            c"pcisim-bench".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: memfd_create returned a new fd that nothing else owns.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let f = std::fs::File::from(fd);
    f.set_len(len)?;
    // SAFETY: fcntl(F_ADD_SEALS) on our open memfd only changes its seals.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } < 0 {
        return Err(std::io::Error::last_os_error()).context("sealing the memfd");
    }
    Ok(f)
}

/// Our own shared mapping of a memfd (the floors touch exactly the pages the device does).
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(f: &std::fs::File, len: usize) -> Result<Mapping> {
        // SAFETY: a fresh shared mapping of `len` bytes of an fd that is at least that long
        // (we sized it); the kernel picks the address, nothing else is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap");
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// memcpy `len` bytes from `self` at 0 to `to` at 0.
    fn copy_to(&self, to: &Mapping, len: usize) {
        let len = len.min(self.len).min(to.len);
        // SAFETY: both ranges lie inside live mappings of distinct memfds, so they do not
        // overlap; no Rust reference to either exists (the device writes them through its own
        // mappings, never while the floor runs).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, to.ptr, len) };
        // The memory is only ever read by someone the compiler cannot see: keep every copy.
        std::hint::black_box(to.ptr);
    }

    /// memset `len` bytes at `at` to `v`.
    fn fill(&self, at: usize, len: usize, v: u8) {
        if at.checked_add(len).is_some_and(|e| e <= self.len) {
            // SAFETY: the range lies inside the live mapping (checked); no Rust reference to
            // it exists.
            unsafe { std::ptr::write_bytes(self.ptr.add(at), v, len) };
            std::hint::black_box(self.ptr);
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping `new` made, once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn dma_fd(f: &std::fs::File) -> Result<(OwnedFd, u64)> {
    Ok((OwnedFd::from(f.try_clone()?), 0))
}

/// The DMA figure's floor: a thread with its own mappings of the two memfds that memcpys
/// one into the other when asked, while the bench waits as it waits for the GPU (polling a
/// completion count with sleeps). Handing the copy to a thread in both cases means both see
/// the same wake-ups and the same scheduling on a busy machine: the figure differs from its
/// floor only by the device's own path.
struct MemcpyThread {
    go: std::sync::mpsc::Sender<()>,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    asked: u64,
}

impl MemcpyThread {
    fn start(src: &std::fs::File, dst: &std::fs::File, len: usize) -> Result<MemcpyThread> {
        use std::sync::atomic::Ordering;
        let (src, dst) = (src.try_clone()?, dst.try_clone()?);
        let (go, rx) = std::sync::mpsc::channel::<()>();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let d = done.clone();
        std::thread::spawn(move || {
            let maps = Mapping::new(&src, len).and_then(|s| Ok((s, Mapping::new(&dst, len)?)));
            let (s, t) = match maps {
                Ok(m) => {
                    let _ = ready_tx.send(Ok(()));
                    m
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            s.fill(0, len, 0x5a);
            while rx.recv().is_ok() {
                s.copy_to(&t, len);
                d.fetch_add(1, Ordering::Release);
            }
        });
        ready
            .recv()
            .map_err(|_| anyhow!("the memcpy thread died"))??;
        Ok(MemcpyThread { go, done, asked: 0 })
    }

    /// One memcpy of the whole range; seconds from the request to its completion.
    fn copy(&mut self) -> Result<f64> {
        use std::sync::atomic::Ordering;
        self.asked += 1;
        let t = Instant::now();
        self.go
            .send(())
            .map_err(|_| anyhow!("the memcpy thread died"))?;
        while self.done.load(Ordering::Acquire) < self.asked {
            std::thread::sleep(POLL);
        }
        Ok(t.elapsed().as_secs_f64())
    }
}

// ---- DMA engine copy -------------------------------------------------------------------------

/// The GPU ring copies `len` bytes client to client, `runs` times, against memcpy between the
/// same pages. Returns (engine GB/s, memcpy GB/s) samples, one per copy.
fn dma_copy(len: usize, runs: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    use pcisim_devices::gpu::regs as r;
    use pcisim_devices::gpu::ring::{encode, op};
    use pcisim_vfio_user::dma::{PROT_READ, PROT_WRITE};
    use pcisim_vfio_user::{ClientLink, Device, DmaSpace, Interrupts};

    const RING: u64 = 0x1000_0000;
    const FENCE: u64 = RING + 0x800;
    const SRC: u64 = 0x2000_0000;
    const DST: u64 = 0x8000_0000;
    const SLOTS: u32 = 16;
    let mut ep = pcisim_devices::gpu::endpoint(&pcisim_devices::gpu::GpuConfig {
        vram_size: 1 << 20,
        ..Default::default()
    })?;
    let (ring, src, dst) = (memfd(4096)?, memfd(len as u64)?, memfd(len as u64)?);
    let dma = DmaSpace::new();
    dma.map(RING, 4096, PROT_READ | PROT_WRITE, Some(dma_fd(&ring)?))?;
    dma.map(SRC, len as u64, PROT_READ, Some(dma_fd(&src)?))?;
    dma.map(DST, len as u64, PROT_READ | PROT_WRITE, Some(dma_fd(&dst)?))?;
    ep.attach(ClientLink {
        irqs: Interrupts::new(&[1, 0, 16, 1, 1]),
        dma: dma.clone(),
    });
    // Tell the device about the mappings as the server does (its journal checks every DMA
    // against them).
    for m in dma.mappings() {
        ep.dma_mapped(&m);
    }
    ep.region_write(7, 4, &0x0006u16.to_le_bytes())?;
    let mut wr = |off: u64, v: u32| ep.region_write(0, off, &v.to_le_bytes());
    wr(r::RING_BASE_LO, RING as u32)?;
    wr(r::RING_BASE_HI, (RING >> 32) as u32)?;
    wr(r::RING_SIZE, SLOTS)?;
    wr(r::RING_CTRL, pcisim_devices::gpu::ring::ctrl::ENABLE)?;
    let mut floor = MemcpyThread::start(&src, &dst, len)?;
    let mut tail = 0u32;
    let mut fence = 0u64;
    // One COPY and a WRITE_FENCE; wait for the fence. Returns seconds.
    let mut engine_copy = || -> Result<f64> {
        fence += 1;
        // File offsets of the slots (the ring is the whole of its memfd).
        let slot = |t: u32| u64::from(t % SLOTS) * 32;
        ring.write_at(&encode(op::COPY, 0, SRC, DST, len as u64), slot(tail))?;
        ring.write_at(&encode(op::WRITE_FENCE, 0, FENCE, fence, 0), slot(tail + 1))?;
        tail = (tail + 2) % SLOTS;
        let t = Instant::now();
        ep.region_write(0, r::RING_TAIL, &tail.to_le_bytes())?;
        let mut seen = [0u8; 8];
        loop {
            ring.read_at(&mut seen, FENCE - RING)?;
            if u64::from_le_bytes(seen) == fence {
                return Ok(t.elapsed().as_secs_f64());
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the GPU ring did not finish a {len}-byte COPY in 30 s");
            }
            std::thread::sleep(POLL);
        }
    };
    // Warm-up: every page mapped on both sides, in the server's mappings and ours.
    floor.copy()?;
    engine_copy()?;
    let (mut eng, mut mem) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        eng.push(engine_copy()?);
        mem.push(floor.copy()?);
    }
    let journal = ep.journal().stats();
    if journal.violations != 0 || journal.dma_faults != 0 || journal.dma_refused != 0 {
        bail!("the bench's DMA was not clean: {journal:?}");
    }
    let gb = len as f64 / 1e9;
    let rates = |secs: Vec<f64>| secs.into_iter().map(|t| gb / t).collect();
    Ok((rates(eng), rates(mem)))
}

// ---- NPU translation -------------------------------------------------------------------------

/// Client memory layout of the NPU figure (IOVA = offset in one memfd).
mod npu_layout {
    /// The PASID's PML4; its lower tables follow.
    pub const ROOT: u64 = 0x10_0000;
    pub const SQ: u64 = 0x20_0000;
    pub const CQ: u64 = 0x21_0000;
    pub const QSIZE: u32 = 64;
    /// Physical pages behind the virtual range.
    pub const DATA: u64 = 0x100_0000;
    /// The virtual range (1 GiB aligned: one PD, one PT per 512 pages).
    pub const VA: u64 = 0x7f00_0000_0000;
    pub const PASID: u32 = 5;
    pub const MEM: u64 = 0x200_0000;
    /// Most pages the image holds.
    pub const MAX_PAGES: u64 = (MEM - DATA) / 4096;
    /// Pages each FILL covers (fits the default ATC twice over).
    pub const PAGES: u64 = 256;
    /// Translations per timed sample (descriptors queued back to back): 63 FILLs of `PAGES`,
    /// as many as the queue holds. A sample also pays one doorbell wake-up of the engine and
    /// the completion poll's 20 µs sleeps (plus timer slack); with 16 FILLs (4096 pages,
    /// ~0.4 ms once the FILL ran at half memset speed) those were a tenth or more of it, which
    /// the memset floor does not pay.
    pub const PER_SAMPLE: u64 = 63 * PAGES;
}

/// One NPU with a bound PASID over a memfd image with real 4-level tables mapping `pages`
/// user pages at `VA`.
struct NpuRig {
    ep: pcisim_pci::Endpoint<pcisim_devices::npu::Npu>,
    atc_entries: u32,
    /// Checking mode on.
    checking: bool,
    /// Write runs before the timed samples.
    runs0: u64,
    mem: std::fs::File,
    map: Mapping,
    tail: u32,
    tag: u64,
}

impl NpuRig {
    fn new(pages: u64, checking: bool, atc_entries: u32) -> Result<NpuRig> {
        use npu_layout::*;
        use pcisim_devices::npu::regs as r;
        use pcisim_vfio_user::dma::{PROT_READ, PROT_WRITE};
        use pcisim_vfio_user::{ClientLink, Device, DmaSpace, Interrupts};

        if pages == 0 || pages > MAX_PAGES {
            bail!("the NPU figure maps 1..={MAX_PAGES} pages");
        }
        let mem = memfd(MEM)?;
        // 4-level tables: PML4 → PDPT → PD → one PT per 2 MiB, user + writable at every level.
        const FLAGS: u64 = 0x7; // P | R/W | U/S
        let idx = |va: u64, level: u32| (va >> (12 + 9 * (level - 1))) & 0x1ff;
        let entry = |table: u64, i: u64, v: u64| mem.write_at(&v.to_le_bytes(), table + 8 * i);
        let (pdpt, pd) = (ROOT + 0x1000, ROOT + 0x2000);
        entry(ROOT, idx(VA, 4), pdpt | FLAGS)?;
        entry(pdpt, idx(VA, 3), pd | FLAGS)?;
        for p in 0..pages {
            let va = VA + p * 4096;
            let pt = ROOT + 0x3000 + (p / 512) * 0x1000;
            if p % 512 == 0 {
                entry(pd, idx(va, 2), pt | FLAGS)?;
            }
            entry(pt, idx(va, 1), (DATA + p * 4096) | FLAGS)?;
        }
        let mut ep = pcisim_devices::npu::endpoint(&pcisim_devices::npu::NpuConfig {
            name: format!("bench-npu-{checking}-{atc_entries}"),
            checking,
            atc_entries,
            ..Default::default()
        })?;
        let dma = DmaSpace::new();
        dma.map(0, MEM, PROT_READ | PROT_WRITE, Some(dma_fd(&mem)?))?;
        ep.attach(ClientLink {
            irqs: Interrupts::new(&[1, 0, 16, 1, 1]),
            dma: dma.clone(),
        });
        for m in dma.mappings() {
            ep.dma_mapped(&m);
        }
        ep.region_write(7, 4, &0x0006u16.to_le_bytes())?;
        let map = Mapping::new(&mem, MEM as usize)?;
        let mut rig = NpuRig {
            ep,
            atc_entries,
            checking,
            runs0: 0,
            mem,
            map,
            tail: 0,
            tag: 0,
        };
        rig.wr(r::SQ_BASE_LO, SQ as u32)?;
        rig.wr(r::SQ_SIZE, QSIZE)?;
        rig.wr(r::CQ_BASE_LO, CQ as u32)?;
        rig.wr(r::CQ_SIZE, QSIZE)?;
        rig.wr(r::CONTROL, r::CONTROL_ENABLE)?;
        rig.wr(r::CMD_PASID, PASID)?;
        rig.wr(r::CMD_FLAGS, 0)?;
        rig.wr(r::CMD_ADDR_LO, ROOT as u32)?;
        rig.wr(r::CMD_ADDR_HI, 0)?;
        rig.wr(r::CMD_OP, r::OP_BIND)?;
        if rig.rd(r::CMD_STATUS)? & 0xff != r::CMD_OK {
            bail!("the NPU refused to bind PASID {PASID}");
        }
        Ok(rig)
    }

    fn wr(&mut self, off: u64, v: u32) -> Result<()> {
        use pcisim_vfio_user::Device;
        Ok(self.ep.region_write(0, off, &v.to_le_bytes())?)
    }

    fn rd(&mut self, off: u64) -> Result<u32> {
        use pcisim_vfio_user::Device;
        let mut b = [0u8; 4];
        self.ep.region_read(0, off, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// `k` FILL descriptors of the first `pages` pages, queued at once; returns the seconds
    /// from the doorbell to the last completion.
    fn fill(&mut self, k: u32, pages: u64) -> Result<f64> {
        use npu_layout::*;
        use pcisim_devices::npu::queue::{Completion, Descriptor};
        use pcisim_devices::npu::regs as r;
        if k == 0 || k >= QSIZE {
            bail!("1..{QSIZE} descriptors at a time");
        }
        let first = self.tail;
        for i in 0..k {
            self.tag += 1;
            let slot = (first + i) % QSIZE;
            self.mem.write_at(&[0u8; 32], CQ + u64::from(slot) * 32)?;
            let d = Descriptor {
                op: r::DESC_FILL,
                pasid: PASID,
                src: 0x0123_4567_89ab_cdef ^ self.tag,
                dst: VA,
                len: pages * 4096,
                tag: self.tag,
                ..Default::default()
            };
            self.mem
                .write_at(&d.encode(), SQ + u64::from(slot) * r::DESC_SIZE)?;
        }
        self.tail = (first + k) % QSIZE;
        let last = CQ + u64::from((first + k - 1) % QSIZE) * 32;
        let t = Instant::now();
        let tail = self.tail;
        self.wr(r::SQ_TAIL, tail)?;
        let mut raw = [0u8; 32];
        let done = loop {
            self.mem.read_at(&mut raw, last)?;
            if Completion::decode(&raw).is_some() {
                break t.elapsed().as_secs_f64();
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the NPU did not complete {k} FILLs in 60 s");
            }
            std::thread::sleep(POLL);
        };
        for i in 0..k {
            self.mem
                .read_at(&mut raw, CQ + u64::from((first + i) % QSIZE) * 32)?;
            let c = Completion::decode(&raw).ok_or_else(|| anyhow!("completion missing"))?;
            let tag = self.tag - u64::from(k - 1 - i);
            if (c.tag, c.status, c.result) != (tag, r::ST_OK, pages * 4096) {
                bail!("the NPU's FILL completed with {c:?}");
            }
        }
        self.wr(r::CQ_HEAD, tail)?;
        Ok(done)
    }

    /// (ATC hits, ATC misses) so far.
    fn atc(&mut self) -> Result<(u32, u32)> {
        use pcisim_devices::npu::regs as r;
        Ok((self.rd(r::ATC_HITS)?, self.rd(r::ATC_MISSES)?))
    }
}

/// The NPU figures, in pages (= translations) per second of FILL descriptors over `PAGES`
/// pages: ATC hits against writing the same pages directly (memset), ATC misses (an ATC of
/// half the range, swept in order: every translation evicts and walks) against hits, and hits
/// in checking mode against hits. The samples of the four alternate, so a busy machine slows
/// them alike. Returns (name, value, floor name, floor).
fn npu_translate(runs: usize) -> Result<Vec<NamedFigure>> {
    use npu_layout::*;
    let atc = pcisim_devices::npu::NpuConfig::default().atc_entries;
    let k = (PER_SAMPLE / PAGES) as u32;
    // (checking, ATC entries): hit, miss, hit with checking.
    let configs = [(false, atc), (false, (PAGES / 2) as u32), (true, atc)];
    let mut rigs = Vec::new();
    for (checking, entries) in configs {
        let mut rig = NpuRig::new(PAGES, checking, entries)?;
        rig.fill(1, PAGES)?; // warm-up: pages and tables faulted in, ATC filled
        rig.runs0 = rig.ep.function().shared().lock().coalesced_runs();
        let counters = rig.atc()?;
        rigs.push((rig, counters, Vec::with_capacity(runs)));
    }
    let mut memset = Vec::with_capacity(runs);
    for r in 0..runs {
        for (rig, _, secs) in rigs.iter_mut() {
            secs.push(rig.fill(k, PAGES)?);
        }
        let map = &rigs[0].0.map;
        let t = Instant::now();
        for _ in 0..k {
            map.fill(DATA as usize, (PAGES * 4096) as usize, r as u8);
        }
        memset.push(t.elapsed().as_secs_f64());
    }
    let per_sample = (PAGES * u64::from(k)) as f64;
    let mut rates = Vec::new();
    for (rig, (h0, m0), secs) in rigs.iter_mut() {
        let (h1, m1) = rig.atc()?;
        let n = PAGES * u64::from(k) * runs as u64;
        let (hits, misses) = (u64::from(h1 - *h0), u64::from(m1 - *m0));
        let want = if u64::from(rig.atc_entries) < PAGES {
            (0, n)
        } else {
            (n, 0)
        };
        if (hits, misses) != want {
            bail!("NPU figure not measuring what it says: {hits} hits, {misses} misses of {n}");
        }
        // Hits without checking mode go to the bus in write runs of 16 pages (the FILLs are
        // page-aligned); checking mode and misses go page by page.
        let runs = rig.ep.function().shared().lock().coalesced_runs() - rig.runs0;
        let pages_per_run = pcisim_devices::npu::engine::RUN_MAX / 4096;
        let want_runs = if !rig.checking && want.0 == n {
            n / pages_per_run
        } else {
            0
        };
        if runs != want_runs {
            bail!("NPU figure not measuring what it says: {runs} write runs, not {want_runs}");
        }
        if rig.ep.journal().stats().violations != 0 {
            bail!("the NPU figure produced journal violations");
        }
        rates.push(secs.iter().map(|t| per_sample / t).collect::<Vec<f64>>());
    }
    let memset: Vec<f64> = memset.iter().map(|t| per_sample / t).collect();
    let [hit, miss, checking]: [Vec<f64>; 3] = rates
        .try_into()
        .map_err(|_| anyhow!("three NPU configurations, three figures"))?;
    let hit_name = "npu_translate_atc_hit".to_string();
    Ok(vec![
        (
            "npu_translate_atc_hit",
            hit.clone(),
            format!("memset_{PAGES}_pages"),
            memset,
        ),
        (
            "npu_translate_atc_miss",
            miss,
            hit_name.clone(),
            hit.clone(),
        ),
        ("npu_translate_atc_hit_checking", checking, hit_name, hit),
    ])
}

// ---- DMA map / unmap ------------------------------------------------------------------------

/// Requests sent before their replies are read.
const MAP_WINDOW: u64 = 256;

/// Send `bytes` on `s` with `fd` (SCM_RIGHTS) if given.
fn send_with_fd(s: &UnixStream, bytes: &[u8], fd: Option<i32>) -> Result<()> {
    let mut cmsg = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: a msghdr over our own buffers (the kernel only reads the iovec's bytes); the
    // control message (one fd) fits in the 32-byte buffer (CMSG_SPACE(4) = 24).
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(fd) = fd {
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd);
        }
        libc::sendmsg(s.as_raw_fd(), &msg, 0)
    };
    if n != bytes.len() as isize {
        bail!("sendmsg: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Receive up to `buf.len()` bytes from `s` (as many as are there, at least one), closing every
/// fd that comes with them; 0 at end of stream.
fn recv_closing_fds(s: &UnixStream, buf: &mut [u8]) -> Result<usize> {
    let mut cmsg = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a msghdr over our own buffers; the kernel writes at most iov_len bytes and
    // msg_controllen bytes of control data into them, and CMSG_* walk what it wrote.
    let (n, fds) = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg);
        let n = libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        let mut fds = Vec::new();
        if n > 0 {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let k = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                    for i in 0..k {
                        fds.push(std::ptr::read_unaligned(
                            libc::CMSG_DATA(c).cast::<i32>().add(i),
                        ));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        (n, fds)
    };
    for fd in fds {
        // SAFETY: the kernel just installed `fd` in our table for us; we own it.
        drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
    if n < 0 {
        bail!("recvmsg: {}", std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Receive exactly `buf.len()` bytes (closing fds that come along); false at end of stream.
fn recv_exact_closing_fds(s: &UnixStream, buf: &mut [u8]) -> Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let n = recv_closing_fds(s, &mut buf[got..])?;
        if n == 0 {
            return Ok(false);
        }
        got += n;
    }
    Ok(true)
}

/// `pages` DMA_MAP frames (4 KiB page `k` of the memfd at IOVA `BASE + k * 4096`) and the
/// DMA_UNMAP frames undoing them.
fn map_frames(pages: u64) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    const BASE: u64 = 0x1_0000_0000;
    let rw = pcisim_vfio_user::dma::PROT_READ | pcisim_vfio_user::dma::PROT_WRITE;
    (0..pages)
        .map(|k| {
            let mut m = proto::Writer::new();
            m.u32(32)
                .u32(rw)
                .u64(k * 4096)
                .u64(BASE + k * 4096)
                .u64(4096);
            let mut u = proto::Writer::new();
            u.u32(24).u32(0).u64(BASE + k * 4096).u64(4096);
            (
                frame(Command::DmaMap, 0, 0, &m.finish()),
                frame(Command::DmaUnmap, 0, 0, &u.finish()),
            )
        })
        .unzip()
}

/// Send every frame (with a dup of `fd` each if given), `MAP_WINDOW` at a time before reading
/// as many `reply_len`-byte replies; the rate of each window (requests per second). An error
/// reply is an error.
fn windows(
    s: &UnixStream,
    frames: &[Vec<u8>],
    fd: Option<&std::fs::File>,
    reply_len: usize,
) -> Result<Vec<f64>> {
    let mut reply = vec![0u8; reply_len];
    let mut rates = Vec::with_capacity(frames.len() / MAP_WINDOW as usize + 1);
    for w in frames.chunks(MAP_WINDOW as usize) {
        let t = Instant::now();
        for f in w {
            let dup = fd.map(|f| f.try_clone()).transpose()?;
            send_with_fd(s, f, dup.as_ref().map(|d| d.as_raw_fd()))?;
        }
        for _ in w {
            if !recv_exact_closing_fds(s, &mut reply)? {
                bail!("the peer closed the connection");
            }
            let h = Header::parse(reply[..HEADER_SIZE].try_into()?);
            if h.flags & proto::FLAG_ERROR != 0 {
                bail!("command {} refused: errno {}", h.command, h.error);
            }
        }
        rates.push(w.len() as f64 / t.elapsed().as_secs_f64());
    }
    Ok(rates)
}

/// The echo floor of the map figure: reads whatever has arrived (as the server's reader does,
/// several messages per `recvmsg` when they are there), closes the fds that came with it, and
/// answers every complete `req_len`-byte message with `reply_len` bytes (a reply header with
/// the size filled in, so `windows` accepts it), all answers to one read in one write.
fn fd_echo(req_len: usize, reply_len: usize) -> Result<UnixStream> {
    let (a, b) = UnixStream::pair()?;
    std::thread::spawn(move || {
        let mut reply = Header {
            id: 0,
            command: Command::DmaMap as u16,
            size: reply_len as u32,
            flags: proto::FLAG_TYPE_REPLY,
            error: 0,
        }
        .encode()
        .to_vec();
        reply.resize(reply_len, 0);
        let mut buf = vec![0u8; 64 << 10];
        let mut pending = 0usize;
        let mut out = Vec::new();
        while let Ok(n) = recv_closing_fds(&b, &mut buf) {
            if n == 0 {
                break;
            }
            pending += n;
            out.clear();
            while pending >= req_len {
                pending -= req_len;
                out.extend_from_slice(&reply);
            }
            if (&b).write_all(&out).is_err() {
                break;
            }
        }
    });
    Ok(a)
}

/// Map `pages` 4 KiB pages one by one, then unmap them one by one, through a real server; and
/// the same traffic through the echo floor. Returns per-window rates (map/s, unmap/s, floor
/// map/s, floor unmap/s).
fn dma_map_rates(dir: &Path, pages: u64) -> Result<MapRates> {
    let sock = start_server(dir, "dma-map", None)?;
    let mem = memfd(pages * 4096)?;
    let (maps, unmaps) = map_frames(pages);
    let c = Client::connect(&sock)?;
    // Replies: a DMA_MAP reply is a header; a DMA_UNMAP reply echoes the 24-byte request.
    let (map_reply, unmap_reply) = (HEADER_SIZE, HEADER_SIZE + 24);
    let map = windows(&c.s, &maps, Some(&mem), map_reply)?;
    let unmap = windows(&c.s, &unmaps, None, unmap_reply)?;
    drop(c);
    let _ = std::fs::remove_file(&sock);
    let floor = fd_echo(maps[0].len(), map_reply)?;
    let floor_map = windows(&floor, &maps, Some(&mem), map_reply)?;
    drop(floor);
    let floor = fd_echo(unmaps[0].len(), unmap_reply)?;
    let floor_unmap = windows(&floor, &unmaps, None, unmap_reply)?;
    Ok((map, unmap, floor_map, floor_unmap))
}

// ---- server RSS ------------------------------------------------------------------------------

/// VmRSS (KiB) of a `pcisim serve` with `n` GPUs once all sockets are up.
fn server_rss(dir: &Path, n: usize) -> Result<u64> {
    // This very binary, even if a rebuild replaced the file meanwhile.
    let exe = PathBuf::from("/proc/self/exe");
    let sub = dir.join(format!("rss-{n}"));
    std::fs::create_dir_all(&sub)?;
    let socks: Vec<PathBuf> = (0..n).map(|i| sub.join(format!("g{i}.sock"))).collect();
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("serve");
    for (i, s) in socks.iter().enumerate() {
        cmd.arg("--device")
            .arg(format!("gpu:socket={},id=gpu{i}", s.display()));
    }
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting pcisim serve")?;
    let result = (|| -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !socks.iter().all(|s| s.exists()) {
            if let Some(st) = child.try_wait()? {
                bail!("pcisim serve with {n} devices exited: {st}");
            }
            if Instant::now() > deadline {
                bail!("pcisim serve with {n} devices did not bind its sockets in 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Let the threads settle, then read.
        std::thread::sleep(Duration::from_millis(200));
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no VmRSS in /proc/{}/status", child.id()))
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&sub);
    result
}

// ---- the run ---------------------------------------------------------------------------------

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
    use super::*;

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
