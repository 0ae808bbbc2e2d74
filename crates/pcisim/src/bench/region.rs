//! The trapped region figures: REGION_READ/REGION_WRITE round trips of one 4-byte register
//! against the AF_UNIX echo floor, in every placement, and coalesced writes
//! (REGION_WRITE_MULTI, or posted writes flushed by a read).

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use pcisim_vfio_user::proto::{self, Header, HEADER_SIZE};

use super::client::{
    echo_pair, multi_request, read_request, round_trip, start_server, write_request, Client,
};
use super::placement::{allowed_cpus, placements, set_affinity, Placement};
use super::report::{line, say};
use super::Scale;

/// Round trips of `req` through a real server serving the GPU (replies of `reply_len`) and
/// through a raw AF_UNIX echo of the same sizes, in alternating blocks (so both see the same
/// machine load), client, server and echo threads placed by `at` (the floor exactly as the
/// figure). Returns (server, floor) samples in ns.
pub(super) fn server_rtt(
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

pub(super) fn region_rtts(dir: &Path, s: Scale) -> Result<()> {
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
pub(super) fn write_multi(dir: &Path, n: usize, batches: usize) -> Result<(Vec<f64>, Vec<f64>)> {
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
pub(super) mod gpu_regs {
    pub use pcisim_devices::gpu::regs::{ID, SCRATCH, SCRATCH_COUNT};
}
