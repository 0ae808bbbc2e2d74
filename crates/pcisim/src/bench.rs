//! `pcisim bench`: the server's figures, each next to a floor measured in the same run.
//!
//! Trapped REGION_READ round trip: a client sends a 4-byte REGION_READ of the GPU's ID register
//! to a real `pcisim` server over its Unix socket and waits for the reply. The floor is a raw
//! AF_UNIX ping-pong that moves the same bytes (32-byte request, 36-byte reply) between two
//! threads doing nothing else. Both are measured pinned (client and server on one core, as when
//! a vCPU thread and the server share a core) and unpinned (the scheduler's choice, where
//! cross-core wake-ups dominate).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use pcisim_vfio_user::proto::{self, Command, Header, HEADER_SIZE};

const REQ_LEN: usize = HEADER_SIZE + 16;
const REPLY_LEN: usize = HEADER_SIZE + 16 + 4;

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

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn read_request(offset: u64, id: u16) -> Vec<u8> {
    let mut p = proto::Writer::new();
    p.u64(offset).u32(0).u32(4);
    let h = Header {
        id,
        command: Command::RegionRead as u16,
        size: REQ_LEN as u32,
        flags: 0,
        error: 0,
    };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(&p.finish());
    v
}

/// Raw AF_UNIX ping-pong of the same sizes.
fn floor(iters: usize, pinned: bool) -> Result<u64> {
    let (mut a, mut b) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        if pinned {
            pin(0);
        }
        let mut req = [0u8; REQ_LEN];
        let reply = [0u8; REPLY_LEN];
        while b.read_exact(&mut req).is_ok() {
            b.write_all(&reply)?;
        }
        Ok(())
    });
    if pinned {
        pin(0);
    }
    let req = read_request(0, 1);
    let mut reply = [0u8; REPLY_LEN];
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        a.write_all(&req)?;
        a.read_exact(&mut reply)?;
        samples.push(t.elapsed().as_nanos() as u64);
    }
    drop(a);
    echo.join().map_err(|_| anyhow!("echo thread panicked"))??;
    unpin();
    Ok(median(samples))
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

/// Round trips through a real server serving the GPU.
fn server_rtt(iters: usize, pinned: bool) -> Result<u64> {
    let dir = std::env::temp_dir().join(format!("pcisim-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join(format!("gpu-{pinned}.sock"));
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
    if pinned {
        pin(0);
    }
    let mut s = UnixStream::connect(&sock).context("connecting to the bench server")?;
    // VERSION first.
    let mut p = proto::Writer::new();
    p.u16(0).u16(0).bytes(b"{}").bytes(&[0]);
    let body = p.finish();
    let h = Header {
        id: 0,
        command: Command::Version as u16,
        size: (HEADER_SIZE + body.len()) as u32,
        flags: 0,
        error: 0,
    };
    s.write_all(&h.encode())?;
    s.write_all(&body)?;
    let mut hb = [0u8; HEADER_SIZE];
    s.read_exact(&mut hb)?;
    let rh = Header::parse(&hb);
    let mut rest = vec![0u8; (rh.size as usize).saturating_sub(HEADER_SIZE)];
    s.read_exact(&mut rest)?;
    if rh.flags & proto::FLAG_ERROR != 0 {
        return Err(anyhow!("VERSION refused: errno {}", rh.error));
    }
    let req = read_request(0, 1);
    let mut reply = [0u8; REPLY_LEN];
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        s.write_all(&req)?;
        s.read_exact(&mut reply)?;
        samples.push(t.elapsed().as_nanos() as u64);
    }
    let id = u32::from_le_bytes([reply[32], reply[33], reply[34], reply[35]]);
    if Header::parse(&[
        reply[0], reply[1], reply[2], reply[3], reply[4], reply[5], reply[6], reply[7], reply[8],
        reply[9], reply[10], reply[11], reply[12], reply[13], reply[14], reply[15],
    ])
    .flags
        & proto::FLAG_ERROR
        != 0
    {
        return Err(anyhow!("REGION_READ failed"));
    }
    log::debug!("bench: GPU ID register read back as {id:#x}");
    drop(s);
    unpin();
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_dir(&dir);
    Ok(median(samples))
}

fn memfd(len: u64) -> Result<std::os::fd::OwnedFd> {
    let f = tempfile_in_shm()?;
    f.set_len(len)?;
    Ok(std::os::fd::OwnedFd::from(f))
}

fn tempfile_in_shm() -> Result<std::fs::File> {
    let path = std::env::temp_dir().join(format!(
        "pcisim-bench-mem-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(f)
}

/// DMA engine copy: the device copies `total` bytes between two client ranges through its
/// `Bus` (gated, bounds-checked, journaled), in 64 KiB chunks as the GPU engine does, versus a
/// plain memcpy of the same bytes in the same process. Returns (dma GB/s, memcpy GB/s).
fn dma_copy(total: usize) -> Result<(f64, f64)> {
    use pcisim_vfio_user::{ClientLink, Device, DmaSpace, Interrupts};
    const CHUNK: usize = 64 << 10;
    let mut ep = pcisim_devices::gpu::endpoint(&pcisim_devices::gpu::GpuConfig {
        vram_size: 1 << 20,
        ..Default::default()
    })?;
    let dma = DmaSpace::new();
    let (src, dst) = (0x1000_0000u64, 0x8000_0000u64);
    dma.map(src, total as u64, 3, Some((memfd(total as u64)?, 0)))?;
    dma.map(dst, total as u64, 3, Some((memfd(total as u64)?, 0)))?;
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
    let bus = ep.bus().clone();
    let mut buf = vec![0u8; CHUNK];
    // Touch everything once so page faults stay out of the figure.
    for off in (0..total).step_by(CHUNK) {
        bus.dma_write(src + off as u64, &buf)?;
        bus.dma_write(dst + off as u64, &buf)?;
    }
    let t = Instant::now();
    for off in (0..total).step_by(CHUNK) {
        bus.dma_read(src + off as u64, &mut buf)?;
        bus.dma_write(dst + off as u64, &buf)?;
    }
    let dma_s = t.elapsed().as_secs_f64();
    let violations = ep.journal().stats().violations;
    if violations != 0 {
        return Err(anyhow!(
            "the bench's DMA produced {violations} journal violations"
        ));
    }
    let a = vec![1u8; total];
    let mut b = vec![0u8; total];
    b.copy_from_slice(&a); // fault in
    let t = Instant::now();
    b.copy_from_slice(std::hint::black_box(&a));
    let mem_s = t.elapsed().as_secs_f64();
    std::hint::black_box(&b);
    let gb = total as f64 / 1e9;
    Ok((gb / dma_s, gb / mem_s))
}

/// Run every benchmark and print one line per figure.
pub fn run(quick: bool) -> Result<()> {
    let iters = if quick { 20_000 } else { 200_000 };
    println!("# pcisim bench: {iters} round trips per figure, median; ratio = value / floor");
    for pinned in [true, false] {
        let tag = if pinned { "pinned" } else { "unpinned" };
        // Warm up both paths once so page faults and thread start-up stay out of the figures.
        floor(iters / 10, pinned)?;
        let f = floor(iters, pinned)?;
        let v = server_rtt(iters, pinned)?;
        println!(
            "region_read_4b_rtt_{tag} {v} ns floor=af_unix_pingpong_{tag}:{f}ns ratio={:.2}",
            v as f64 / f.max(1) as f64
        );
    }
    let total = if quick { 64 << 20 } else { 256 << 20 };
    let (dma, mem) = dma_copy(total)?;
    println!(
        "dma_engine_copy_{}mib {dma:.2} GB/s floor=memcpy:{mem:.2}GB/s ratio={:.2}",
        total >> 20,
        dma / mem
    );
    Ok(())
}
