//! The DMA copy figure: GPU ring COPY commands from client memory to client memory, against
//! a memcpy between the same two memfds done by a thread waited on the same way
//! ([`MemcpyThread`]).

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use super::memory::{attach_client, dma_fd, memfd, Mapping};
use super::POLL;

/// The DMA figure's floor: a thread with its own mappings of the two memfds that memcpys
/// one into the other when asked, while the bench waits as it waits for the GPU (polling a
/// completion count with sleeps). Handing the copy to a thread in both cases means both see
/// the same wake-ups and the same scheduling on a busy machine: the figure differs from its
/// floor only by the device's own path.
pub(super) struct MemcpyThread {
    pub(super) go: std::sync::mpsc::Sender<()>,
    pub(super) done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub(super) asked: u64,
}

impl MemcpyThread {
    pub(super) fn start(
        src: &std::fs::File,
        dst: &std::fs::File,
        len: usize,
    ) -> Result<MemcpyThread> {
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
    pub(super) fn copy(&mut self) -> Result<f64> {
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
pub(super) fn dma_copy(len: usize, runs: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    use pcisim_devices::gpu::regs as r;
    use pcisim_devices::gpu::ring::{encode, op};
    use pcisim_vfio_user::dma::{PROT_READ, PROT_WRITE};
    use pcisim_vfio_user::{Device, DmaSpace};

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
    attach_client(&mut ep, &dma)?;
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
