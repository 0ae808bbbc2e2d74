//! `pcisim bench`: the server's figures, each next to a floor measured in the same run
//! (design.md §6). One line per figure:
//!
//! ```text
//! NAME VALUE UNIT floor=FLOOR_NAME:VALUE UNIT ratio=VALUE/FLOOR
//! ```
//!
//! Lines starting with `#` are comments (the machine, the parameters). docs/perf.md explains
//! every figure and holds the numbers of a reference run.
//!
//! - **Trapped region round trips** (`region_read_4b_rtt_*`, `region_write_4b_rtt_*`): a client
//!   sends a 4-byte REGION_READ of the GPU's ID register (or a REGION_WRITE of SCRATCH0) to a
//!   real server over its Unix socket and waits for the reply. The floor is a raw AF_UNIX
//!   ping-pong that moves the same bytes between two threads doing nothing else. Both are
//!   measured pinned (client and server on one core, as when a vCPU thread and the server share
//!   a core) and unpinned (the scheduler's choice, where cross-core wake-ups dominate). Median
//!   of all round trips.
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
//!   the fd, which the server cannot avoid. Mappings per second (higher is better).
//! - **Server RSS** (`server_rss_64_gpus`): a `pcisim serve` with 64 GPUs (256 MiB of VRAM
//!   each, never touched) against one with a single GPU.

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

/// One figure: `name value unit floor=floor_name:floor unit ratio=value/floor`.
fn line(name: &str, value: f64, unit: &str, floor_name: &str, floor: f64) -> Result<()> {
    say(format_args!(
        "{name} {} {unit} floor={floor_name}:{}{unit} ratio={:.2}",
        sig4(value),
        sig4(floor),
        value / floor.max(f64::MIN_POSITIVE),
    ))
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

/// Pin the calling thread to `cpu` (no-op if the call fails: the figure is then unpinned).
fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it; sched_setaffinity reads
    // it for the calling thread (pid 0) only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn unpin() {
    // SAFETY: as in `pin`, for the full CPU set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for c in 0..libc::CPU_SETSIZE as usize {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_unstable_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
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

/// A GPU served by a real server on a thread of this process; `pinned`: that thread on CPU 0.
fn start_server(dir: &Path, name: &str, pinned: bool) -> Result<PathBuf> {
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
    std::thread::spawn(move || {
        if pinned {
            pin(0);
        }
        let _ = server.run();
    });
    Ok(sock)
}

// ---- round trips -----------------------------------------------------------------------------

/// The floor's echo thread: answers every `req_len`-byte message with `reply_len` bytes.
fn echo_pair(pinned: bool, req_len: usize, reply_len: usize) -> Result<UnixStream> {
    let (a, mut b) = UnixStream::pair()?;
    std::thread::spawn(move || {
        if pinned {
            pin(0);
        }
        let mut req = vec![0u8; req_len];
        let reply = vec![0u8; reply_len];
        while b.read_exact(&mut req).is_ok() {
            if b.write_all(&reply).is_err() {
                break;
            }
        }
    });
    Ok(a)
}

/// Send `req`, read a `reply.len()`-byte reply; nanoseconds.
fn round_trip(s: &mut UnixStream, req: &[u8], reply: &mut [u8]) -> Result<u64> {
    let t = Instant::now();
    s.write_all(req)?;
    s.read_exact(reply)?;
    Ok(t.elapsed().as_nanos() as u64)
}

/// Round trips of `req` through a real server serving the GPU (replies of `reply_len`) and
/// through a raw AF_UNIX echo of the same sizes, in alternating blocks (so both see the same
/// machine load). Returns (server, floor) medians in ns.
fn server_rtt(
    dir: &Path,
    iters: usize,
    pinned: bool,
    req: &[u8],
    reply_len: usize,
) -> Result<(u64, u64)> {
    let name = format!("rtt-{pinned}-{}", req.len());
    let sock = start_server(dir, &name, pinned)?;
    let mut floor = echo_pair(pinned, req.len(), reply_len)?;
    if pinned {
        pin(0);
    }
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
    drop(c);
    drop(floor);
    unpin();
    let _ = std::fs::remove_file(&sock);
    Ok((median(srv), median(raw)))
}

fn region_rtts(dir: &Path, s: Scale) -> Result<()> {
    let read = read_request(gpu_regs::ID, 1);
    let write = write_request(gpu_regs::SCRATCH, 0x5eed, 0, 1);
    // Replies: header + offset/region/count (+ the data for a read).
    let (read_reply, write_reply) = (HEADER_SIZE + 20, HEADER_SIZE + 16);
    for pinned in [true, false] {
        let tag = if pinned { "pinned" } else { "unpinned" };
        for (what, req, reply_len) in [("read", &read, read_reply), ("write", &write, write_reply)]
        {
            let (v, f) = server_rtt(dir, s.rtt, pinned, req, reply_len)?;
            line(
                &format!("region_{what}_4b_rtt_{tag}"),
                v as f64,
                "ns",
                &format!("af_unix_pingpong_{}b_{}b_{tag}", req.len(), reply_len),
                f as f64,
            )?;
        }
    }
    Ok(())
}

/// REGION_WRITE_MULTI of `n` writes vs `n` posted writes and a flushing read. Returns
/// (multi ns, singles ns) per batch.
fn write_multi(dir: &Path, n: usize, batches: usize) -> Result<(u64, u64)> {
    let sock = start_server(dir, &format!("multi-{n}"), false)?;
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
        let dm = t.elapsed().as_nanos() as u64;
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
        let ds = t.elapsed().as_nanos() as u64;
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
    Ok((median(multi), median(singles)))
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
/// same pages. Returns (engine GB/s, memcpy GB/s), medians.
fn dma_copy(len: usize, runs: usize) -> Result<(f64, f64)> {
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
    Ok((gb / median(eng), gb / median(mem)))
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
    /// Translations per timed sample (descriptors queued back to back).
    pub const PER_SAMPLE: u64 = 4096;
}

/// One NPU with a bound PASID over a memfd image with real 4-level tables mapping `pages`
/// user pages at `VA`.
struct NpuRig {
    ep: pcisim_pci::Endpoint<pcisim_devices::npu::Npu>,
    atc_entries: u32,
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
fn npu_translate(runs: usize) -> Result<Vec<(&'static str, f64, String, f64)>> {
    use npu_layout::*;
    let atc = pcisim_devices::npu::NpuConfig::default().atc_entries;
    let k = (PER_SAMPLE / PAGES) as u32;
    // (checking, ATC entries): hit, miss, hit with checking.
    let configs = [(false, atc), (false, (PAGES / 2) as u32), (true, atc)];
    let mut rigs = Vec::new();
    for (checking, entries) in configs {
        let mut rig = NpuRig::new(PAGES, checking, entries)?;
        rig.fill(1, PAGES)?; // warm-up: pages and tables faulted in, ATC filled
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
        if rig.ep.journal().stats().violations != 0 {
            bail!("the NPU figure produced journal violations");
        }
        rates.push(per_sample / median(std::mem::take(secs)));
    }
    let (hit, miss, checking) = (rates[0], rates[1], rates[2]);
    let hit_name = "npu_translate_atc_hit".to_string();
    Ok(vec![
        (
            "npu_translate_atc_hit",
            hit,
            format!("memset_{PAGES}_pages"),
            per_sample / median(memset),
        ),
        ("npu_translate_atc_miss", miss, hit_name.clone(), hit),
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
/// as many `reply_len`-byte replies; seconds. An error reply is an error.
fn windows(
    s: &UnixStream,
    frames: &[Vec<u8>],
    fd: Option<&std::fs::File>,
    reply_len: usize,
) -> Result<f64> {
    let mut reply = vec![0u8; reply_len];
    let t = Instant::now();
    for w in frames.chunks(MAP_WINDOW as usize) {
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
    }
    Ok(t.elapsed().as_secs_f64())
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
/// the same traffic through the echo floor. Returns (map/s, unmap/s, floor map/s, floor
/// unmap/s).
fn dma_map_rates(dir: &Path, pages: u64) -> Result<(f64, f64, f64, f64)> {
    let sock = start_server(dir, "dma-map", false)?;
    let mem = memfd(pages * 4096)?;
    let (maps, unmaps) = map_frames(pages);
    let c = Client::connect(&sock)?;
    // Replies: a DMA_MAP reply is a header; a DMA_UNMAP reply echoes the 24-byte request.
    let (map_reply, unmap_reply) = (HEADER_SIZE, HEADER_SIZE + 24);
    let map_s = windows(&c.s, &maps, Some(&mem), map_reply)?;
    let unmap_s = windows(&c.s, &unmaps, None, unmap_reply)?;
    drop(c);
    let _ = std::fs::remove_file(&sock);
    let floor = fd_echo(maps[0].len(), map_reply)?;
    let floor_map_s = windows(&floor, &maps, Some(&mem), map_reply)?;
    drop(floor);
    let floor = fd_echo(unmaps[0].len(), unmap_reply)?;
    let floor_unmap_s = windows(&floor, &unmaps, None, unmap_reply)?;
    let n = pages as f64;
    Ok((n / map_s, n / unmap_s, n / floor_map_s, n / floor_unmap_s))
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
        "# {} round trips per region figure (median), {} batches per multi figure, \
         {} copies of {} MiB, {} NPU samples of {} translations; medians; \
         {} 4 KiB DMA maps then unmaps; ratio = value / floor",
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
            multi as f64,
            "ns",
            &format!("posted_region_writes_{n}_and_read"),
            singles as f64,
        )?;
    }
    let (engine, memcpy) = dma_copy(s.dma_len, s.dma_runs)?;
    line(
        &format!("dma_engine_copy_{}mib", s.dma_len >> 20),
        engine,
        "GB/s",
        "memcpy_same_pages",
        memcpy,
    )?;
    for (name, v, floor_name, floor) in npu_translate(s.npu_runs)? {
        line(name, v / 1e6, "Mpage/s", &floor_name, floor / 1e6)?;
    }
    let (map, unmap, floor_map, floor_unmap) = dma_map_rates(&dir.0, s.map_pages)?;
    line(
        "dma_map_4k",
        map,
        "maps/s",
        "af_unix_fd_echo_48b_16b",
        floor_map,
    )?;
    line(
        "dma_unmap_4k",
        unmap,
        "maps/s",
        "af_unix_echo_40b_40b",
        floor_unmap,
    )?;
    let one = server_rss(&dir.0, 1)?;
    let many = server_rss(&dir.0, s.rss_devices)?;
    line(
        &format!("server_rss_{}_gpus", s.rss_devices),
        many as f64,
        "KiB",
        "server_rss_1_gpu",
        one as f64,
    )?;
    Ok(())
}
