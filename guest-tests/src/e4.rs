//! E4: GPU copy and fill through the command ring, fence + interrupt, and a malformed
//! command stopping the ring — driven from a guest vfio userspace driver with buffers
//! mapped through the (v)IOMMU.

use crate::e1::setup_failure;
use crate::gpu::{self, encode_cmd, fill32, SplitMix64};
use crate::ktap::{Ktap, Outcome};
use crate::pci::{self, Function};
use crate::ringdrv::{self, RingDrv};
use crate::vdev::{
    self, bind, enable_command, open_vfio, read_reg, read_u64_reg, release, wait_eventfd,
    write_reg, Binding, DmaBuffer, Vfio,
};
use pcisim_guest_wire::{DeviceIds, SelectOptions};
use std::collections::BTreeMap;
use std::fs::File;
use std::time::{Duration, Instant};

/// Where the test maps its buffers in the device's IOVA space.
pub const IOVA_BASE: u64 = 0x1000_0000;
const RING_IOVA: u64 = IOVA_BASE;
const FENCE_IOVA: u64 = IOVA_BASE + 0x1_0000;
const A_IOVA: u64 = IOVA_BASE + 0x10_0000;
const B_IOVA: u64 = IOVA_BASE + 0x20_0000;
const C_IOVA: u64 = IOVA_BASE + 0x30_0000;
const BUF_LEN: usize = 0x3_0000;
const RING_ENTRIES: u32 = 64;
const FENCE_VECTOR: u32 = 0;
const ERROR_VECTOR: u32 = 1;
const MSIX_MIN_VECTORS: u32 = 2;

/// Copies are a little over two 64 KiB engine chunks, odd-sized, at odd offsets.
const COPY_LEN: usize = 0x2_0000 + 0x1234 + 1;
const VRAM_OFF: u64 = 0x1_0003;
const B_OFF: usize = 5;
const C_OFF: usize = 0x777;
const FILL_OFF: usize = 0x2_4000;
const FILL_LEN: usize = 0x8000;
const FILL_PATTERN: u32 = 0xC0FF_EE11;
const FENCE_OFF: usize = 8;
const FENCE_VALUE: u64 = 0x5EED_0000_0000_0004;
const FENCE_VALUE2: u64 = 0x5EED_0000_0000_0006;
const SENTINEL: u8 = 0xEE;
const IRQ_TIMEOUT: Duration = Duration::from_secs(10);

/// The buffers of a run.
struct Bufs {
    fence: DmaBuffer,
    a: DmaBuffer,
    b: DmaBuffer,
    c: DmaBuffer,
}

fn map_bufs(v: &Vfio, k: &mut Ktap) -> Result<(DmaBuffer, Bufs), String> {
    let t0 = Instant::now();
    let ring = DmaBuffer::map(&v.container, RING_IOVA, 4096)?;
    let fence = DmaBuffer::map(&v.container, FENCE_IOVA, 4096)?;
    let a = DmaBuffer::map(&v.container, A_IOVA, BUF_LEN)?;
    let b = DmaBuffer::map(&v.container, B_IOVA, BUF_LEN)?;
    let c = DmaBuffer::map(&v.container, C_IOVA, BUF_LEN)?;
    k.diag(&format!(
        "mapped ring 0x{RING_IOVA:x}, fence 0x{FENCE_IOVA:x}, A 0x{A_IOVA:x}, B 0x{B_IOVA:x}, C 0x{C_IOVA:x} ({BUF_LEN:#x} bytes each) in {} ms",
        t0.elapsed().as_millis()
    ));
    Ok((ring, Bufs { fence, a, b, c }))
}

/// Checks `buf[off..off+want.len()] == want` and that `guard` bytes either side (inside the
/// buffer) still hold the sentinel.
fn check_range(buf: &DmaBuffer, off: usize, want: &[u8], guard: usize) -> Result<(), String> {
    let got = buf.read(off, want.len())?;
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        let diff = got.iter().zip(want).filter(|(g, w)| g != w).count();
        return Err(format!(
            "IOVA 0x{:x}: {diff} of {} bytes differ, first at +0x{i:x} (got 0x{:02x}, want 0x{:02x})",
            buf.iova + off as u64,
            want.len(),
            got[i],
            want[i]
        ));
    }
    let before = off.saturating_sub(guard);
    let after_end = (off + want.len() + guard).min(buf.len());
    let lo = buf.read(before, off - before)?;
    let hi = buf.read(off + want.len(), after_end - off - want.len())?;
    if lo.iter().chain(hi.iter()).any(|&b| b != SENTINEL) {
        return Err(format!(
            "bytes around IOVA 0x{:x}+0x{:x} were changed",
            buf.iova + off as u64,
            want.len()
        ));
    }
    Ok(())
}

/// FNV-1a-64 of a VRAM window computed by the device (VRAM_CMD = CHECKSUM).
pub fn vram_checksum(v: &Vfio, off: u64, len: u64) -> Result<u64, String> {
    write_reg(v, gpu::VRAM_OFFSET_LO, off as u32)?;
    write_reg(v, gpu::VRAM_OFFSET_HI, (off >> 32) as u32)?;
    write_reg(v, gpu::VRAM_LENGTH_LO, len as u32)?;
    write_reg(v, gpu::VRAM_LENGTH_HI, (len >> 32) as u32)?;
    write_reg(v, gpu::VRAM_CMD, gpu::CMD_CHECKSUM)?;
    let st = read_reg(v, gpu::VRAM_STATUS)?;
    if st != gpu::STATUS_OK {
        return Err(format!("VRAM_STATUS {st} after CHECKSUM"));
    }
    read_u64_reg(v, gpu::VRAM_RESULT_LO)
}

/// Everything E4 set up and checks.
struct Run {
    ring: RingDrv,
    bufs: Bufs,
    src: Vec<u8>,
    completed_before: u32,
}

fn submit(
    v: &Vfio,
    mut ring: RingDrv,
    bufs: Bufs,
    fds: &mut BTreeMap<u32, File>,
    k: &mut Ktap,
) -> Result<Run, Box<(String, RingDrv, Bufs)>> {
    match fill_and_submit(v, &mut ring, &bufs, fds, k) {
        Ok((src, completed_before)) => Ok(Run {
            ring,
            bufs,
            src,
            completed_before,
        }),
        Err(e) => Err(Box::new((e, ring, bufs))),
    }
}

fn fill_and_submit(
    v: &Vfio,
    ring: &mut RingDrv,
    bufs: &Bufs,
    fds: &mut BTreeMap<u32, File>,
    k: &mut Ktap,
) -> Result<(Vec<u8>, u32), String> {
    let mut src = vec![0u8; COPY_LEN];
    SplitMix64::new(0xE4).fill(&mut src);
    bufs.a.write(0, &src)?;
    bufs.b.fill(0, BUF_LEN, SENTINEL)?;
    bufs.c.fill(0, BUF_LEN, SENTINEL)?;
    for f in fds.values_mut() {
        crate::sys::eventfd_take(f)?;
    }
    let completed_before = read_reg(v, gpu::CMDS_COMPLETED)?;
    let len = COPY_LEN as u64;
    ring.push(encode_cmd(
        gpu::op::FILL,
        0,
        C_IOVA + FILL_OFF as u64,
        u64::from(FILL_PATTERN),
        FILL_LEN as u64,
    ))?;
    ring.push(encode_cmd(
        gpu::op::COPY,
        gpu::flag::DST_VRAM,
        A_IOVA,
        VRAM_OFF,
        len,
    ))?;
    ring.push(encode_cmd(
        gpu::op::COPY,
        gpu::flag::SRC_VRAM,
        VRAM_OFF,
        B_IOVA + B_OFF as u64,
        len,
    ))?;
    ring.push(encode_cmd(
        gpu::op::COPY,
        0,
        A_IOVA,
        C_IOVA + C_OFF as u64,
        len,
    ))?;
    ring.push(encode_cmd(
        gpu::op::WRITE_FENCE,
        gpu::flag::FENCE_IRQ,
        FENCE_IOVA + FENCE_OFF as u64,
        FENCE_VALUE,
        0,
    ))?;
    let t0 = Instant::now();
    ring.doorbell(v)?;
    let doorbell_us = t0.elapsed().as_micros();
    let fence_fd = fds
        .get_mut(&FENCE_VECTOR)
        .ok_or("no eventfd for the fence vector")?;
    let n = wait_eventfd(fence_fd, IRQ_TIMEOUT)?;
    let took = t0.elapsed();
    let st = ringdrv::state(v)?;
    k.diag(&format!(
        "5 commands ({} bytes moved): doorbell write {doorbell_us} us, fence interrupt after {} ms; {st}",
        FILL_LEN + 3 * COPY_LEN + 8,
        took.as_millis()
    ));
    if n == 0 {
        return Err(format!(
            "no fence interrupt within {}s: {st}",
            IRQ_TIMEOUT.as_secs()
        ));
    }
    if n != 1 {
        return Err(format!("fence eventfd count {n}, expected 1"));
    }
    Ok((src, completed_before))
}

fn check_fence(v: &Vfio, run: &Run, fds: &mut BTreeMap<u32, File>) -> Result<(), String> {
    let mut errs = Vec::new();
    let mem = run.bufs.fence.read_u64(FENCE_OFF)?;
    if mem != FENCE_VALUE {
        errs.push(format!("fence memory 0x{mem:x}, want 0x{FENCE_VALUE:x}"));
    }
    if run.bufs.fence.read_u64(0)? != 0 || run.bufs.fence.read_u64(16)? != 0 {
        errs.push("bytes next to the fence changed".into());
    }
    let st = ringdrv::state(v)?;
    if st.last_fence != FENCE_VALUE {
        errs.push(format!("LAST_FENCE 0x{:x}", st.last_fence));
    }
    if (st.head, st.tail, st.status) != (5, 5, gpu::status::IDLE) {
        errs.push(format!("ring not idle at slot 5: {st}"));
    }
    if st.completed != run.completed_before.wrapping_add(5) {
        errs.push(format!(
            "CMDS_COMPLETED {} -> {}, expected +5",
            run.completed_before, st.completed
        ));
    }
    for (vec, f) in fds.iter_mut() {
        let n = crate::sys::eventfd_take(f)?;
        if n != 0 {
            errs.push(format!("vector {vec} fired {n} more time(s)"));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

fn malformed(
    v: &Vfio,
    run: &mut Run,
    fds: &mut BTreeMap<u32, File>,
    k: &mut Ktap,
) -> Result<(), String> {
    let slot = run.ring.push(encode_cmd(0x7f, 0, 0, 0, 0))?;
    // A command after it must not run.
    run.ring.push(encode_cmd(
        gpu::op::WRITE_FENCE,
        gpu::flag::FENCE_IRQ,
        FENCE_IOVA + FENCE_OFF as u64,
        0xbad,
        0,
    ))?;
    let t0 = Instant::now();
    run.ring.doorbell(v)?;
    let err_fd = fds
        .get_mut(&ERROR_VECTOR)
        .ok_or("no eventfd for the error vector")?;
    let n = wait_eventfd(err_fd, IRQ_TIMEOUT)?;
    let st = ringdrv::state(v)?;
    k.diag(&format!(
        "bad opcode 0x7f at slot {slot}: error interrupt after {} ms; {st}",
        t0.elapsed().as_millis()
    ));
    let mut errs = Vec::new();
    if n != 1 {
        errs.push(format!("error eventfd count {n}, expected 1"));
    }
    if st.status != gpu::status::ERROR {
        errs.push(format!("RING_STATUS {}", st.status));
    }
    let want = gpu::ring_error(gpu::err::BAD_OPCODE, slot);
    if st.error != want {
        errs.push(format!("RING_ERROR 0x{:08x}, want 0x{want:08x}", st.error));
    }
    if st.head != slot {
        errs.push(format!(
            "RING_HEAD {} moved past the bad slot {slot}",
            st.head
        ));
    }
    if run.bufs.fence.read_u64(FENCE_OFF)? != FENCE_VALUE || st.last_fence != FENCE_VALUE {
        errs.push("the command after the bad one ran".into());
    }
    if let Some(f) = fds.get_mut(&FENCE_VECTOR) {
        let m = crate::sys::eventfd_take(f)?;
        if m != 0 {
            errs.push(format!("fence vector fired {m} time(s)"));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

fn recovers(
    v: &Vfio,
    run: &mut Run,
    fds: &mut BTreeMap<u32, File>,
    k: &mut Ktap,
) -> Result<(), String> {
    let st = run.ring.reset(v)?;
    k.diag(&format!("after RING_CTRL = RESET|ENABLE: {st}"));
    if (st.status, st.head, st.tail, st.error) != (gpu::status::IDLE, 0, 0, 0) {
        return Err(format!("ring not idle at slot 0 after reset: {st}"));
    }
    run.ring.push(encode_cmd(gpu::op::NOP, 0, 0, 0, 0))?;
    run.ring.push(encode_cmd(
        gpu::op::WRITE_FENCE,
        gpu::flag::FENCE_IRQ,
        FENCE_IOVA + FENCE_OFF as u64,
        FENCE_VALUE2,
        0,
    ))?;
    run.ring.doorbell(v)?;
    let f = fds
        .get_mut(&FENCE_VECTOR)
        .ok_or("no eventfd for the fence vector")?;
    let n = wait_eventfd(f, IRQ_TIMEOUT)?;
    let st = ringdrv::state(v)?;
    if n != 1 {
        return Err(format!("fence eventfd count {n} after the reset: {st}"));
    }
    let mem = run.bufs.fence.read_u64(FENCE_OFF)?;
    if mem != FENCE_VALUE2 || st.last_fence != FENCE_VALUE2 || st.head != 2 {
        return Err(format!("fence memory 0x{mem:x}; {st}"));
    }
    Ok(())
}

fn unmap_all(
    v: &Vfio,
    ring: Option<DmaBuffer>,
    bufs: Option<Bufs>,
    k: &mut Ktap,
) -> Result<(), String> {
    // Stop the ring first: nothing may touch the buffers once they are unmapped.
    write_reg(v, gpu::RING_CTRL, gpu::ctrl::RESET)?;
    let mut all: Vec<DmaBuffer> = Vec::new();
    all.extend(ring);
    if let Some(b) = bufs {
        all.extend([b.fence, b.a, b.b, b.c]);
    }
    let mut errs = Vec::new();
    for mut b in all {
        if let Err(e) = b.unmap(&v.container) {
            errs.push(e);
        }
    }
    k.diag("IOMMU mappings removed");
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

/// A function opened through guest vfio-pci for the ring programs.
pub struct Opened {
    /// How it was bound (for [`release`]).
    pub binding: Binding,
    /// The vfio container/group/device, if opening worked.
    pub vfio: Option<Vfio>,
    /// The eventfd of each requested MSI-X vector.
    pub fds: BTreeMap<u32, File>,
    /// MSI-X eventfds were set up (release must tear them down).
    pub irqs_on: bool,
}

/// The opening steps the ring programs share, as KTAP tests `vfio-bind`, `vfio-open`,
/// `command-enable` and `msix-enable`: bind the function to vfio-pci, open it, enable memory
/// decoding and bus mastering, and bind an eventfd to each of `vectors` (the device must offer
/// at least `min_vectors`). A failed step is recorded in `failed` and skips the ones after it.
pub fn open_ring_device(
    func: &Function,
    k: &mut Ktap,
    failed: &mut Option<&'static str>,
    vectors: &[u32],
    min_vectors: u32,
) -> Opened {
    let mut binding = Binding::default();
    let r = bind(func, &mut binding, k);
    let ok = k.check("vfio-bind", r);
    note_fail(failed, "vfio-bind", ok);

    let mut vfio: Option<Vfio> = None;
    let ok = gated(k, "vfio-open", *failed, |k| {
        let group = binding.group.clone().unwrap_or_default();
        vfio = Some(open_vfio(&func.bdf, &group, k)?);
        Ok(())
    });
    note_fail(failed, "vfio-open", ok);

    let ok = gated(k, "command-enable", *failed, |k| match &vfio {
        Some(v) => enable_command(v, k),
        None => Err("no device".into()),
    });
    note_fail(failed, "command-enable", ok);

    let mut fds: BTreeMap<u32, File> = BTreeMap::new();
    let ok = gated(k, "msix-enable", *failed, |k| match &vfio {
        Some(v) => {
            fds = vdev::msix_eventfds(v, vectors, min_vectors, k)?;
            Ok(())
        }
        None => Err("no device".into()),
    });
    note_fail(failed, "msix-enable", ok);
    Opened {
        binding,
        vfio,
        fds,
        irqs_on: ok,
    }
}

pub fn note_fail(failed: &mut Option<&'static str>, name: &'static str, ok: bool) {
    if !ok && failed.is_none() {
        *failed = Some(name);
    }
}

/// A test that runs only if `dep` (the name of a step it needs) passed.
pub fn gated(
    k: &mut Ktap,
    name: &str,
    dep: Option<&str>,
    f: impl FnOnce(&mut Ktap) -> Result<(), String>,
) -> bool {
    match dep {
        Some(d) => {
            k.result(name, Outcome::Skip(format!("{d} failed")));
            false
        }
        None => {
            let r = f(k);
            k.check(name, r)
        }
    }
}

pub fn run(ids: DeviceIds, o: SelectOptions) -> i32 {
    let prepared = pci::select_function(ids.vendor, ids.device, o.bdf.as_deref());
    let (func, note) = match prepared {
        Ok(p) => p,
        Err(e) => return setup_failure(&e),
    };
    run_on(&func, note)
}

const TESTS: [&str; 16] = [
    "vfio-bind",
    "vfio-open",
    "command-enable",
    "msix-enable",
    "dma-map",
    "ring-setup",
    "ring-submit",
    "fill-guest",
    "copy-guest-to-vram",
    "copy-vram-to-guest",
    "copy-guest-to-guest",
    "fence",
    "malformed-command",
    "ring-reset-recovers",
    "dma-unmap",
    "vfio-release",
];

fn run_on(func: &Function, note: Option<String>) -> i32 {
    let mut k = Ktap::new(TESTS.len());
    k.diag(&format!(
        "E4 GPU command ring through guest vfio-pci on {}",
        func.bdf
    ));
    if let Some(n) = note {
        k.diag(&n);
    }
    // The first failed step; later steps that need it are skipped.
    let mut failed: Option<&'static str> = None;
    let Opened {
        binding,
        vfio,
        mut fds,
        irqs_on,
    } = open_ring_device(
        func,
        &mut k,
        &mut failed,
        &[FENCE_VECTOR, ERROR_VECTOR],
        MSIX_MIN_VECTORS,
    );

    let mut mapped: Option<(DmaBuffer, Bufs)> = None;
    let ok = gated(&mut k, "dma-map", failed, |k| match &vfio {
        Some(v) => {
            mapped = Some(map_bufs(v, k)?);
            Ok(())
        }
        None => Err("no device".into()),
    });
    note_fail(&mut failed, "dma-map", ok);

    // What must be unmapped at the end, whatever happened.
    let mut ring_left: Option<RingDrv> = None;
    let mut raw_ring_left: Option<DmaBuffer> = None;
    let mut bufs_left: Option<Bufs> = None;
    let mut run: Option<Run> = None;
    match (&vfio, mapped.take()) {
        (Some(v), Some((ring_buf, bufs))) if failed.is_none() => {
            match RingDrv::setup(
                v,
                ring_buf,
                RING_ENTRIES,
                FENCE_VECTOR,
                ERROR_VECTOR,
                &mut k,
            ) {
                Ok(ring) => {
                    k.result("ring-setup", Outcome::Pass);
                    match submit(v, ring, bufs, &mut fds, &mut k) {
                        Ok(r) => {
                            run = Some(r);
                            k.result("ring-submit", Outcome::Pass);
                        }
                        Err(b) => {
                            let (e, ring, bufs) = *b;
                            k.result("ring-submit", Outcome::Fail(e));
                            note_fail(&mut failed, "ring-submit", false);
                            ring_left = Some(ring);
                            bufs_left = Some(bufs);
                        }
                    }
                }
                Err(e) => {
                    k.result("ring-setup", Outcome::Fail(e));
                    k.result("ring-submit", Outcome::Skip("ring-setup failed".into()));
                    note_fail(&mut failed, "ring-setup", false);
                    // The ring buffer moved into the failed setup and was dropped; its
                    // IOMMU mapping goes with the container.
                    bufs_left = Some(bufs);
                }
            }
        }
        (_, m) => {
            let why = format!("{} failed", failed.unwrap_or("dma-map"));
            k.result("ring-setup", Outcome::Skip(why.clone()));
            k.result("ring-submit", Outcome::Skip(why));
            if let Some((r, b)) = m {
                raw_ring_left = Some(r);
                bufs_left = Some(b);
            }
        }
    }

    let data_dep = if run.is_some() {
        None
    } else {
        Some(failed.unwrap_or("ring-submit"))
    };
    gated(&mut k, "fill-guest", data_dep, |_| match &run {
        Some(r) => check_range(&r.bufs.c, FILL_OFF, &fill32(FILL_PATTERN, FILL_LEN), 64),
        None => Err("no run".into()),
    });
    gated(&mut k, "copy-guest-to-vram", data_dep, |k| {
        match (&vfio, &run) {
            (Some(v), Some(r)) => {
                let want = gpu::fnv1a64(&r.src);
                let got = vram_checksum(v, VRAM_OFF, COPY_LEN as u64)?;
                k.diag(&format!(
                "VRAM 0x{VRAM_OFF:x}+0x{COPY_LEN:x}: device FNV-1a-64 0x{got:016x}, source 0x{want:016x}"
            ));
                if got == want {
                    Ok(())
                } else {
                    Err(format!("VRAM checksum 0x{got:016x}, want 0x{want:016x}"))
                }
            }
            _ => Err("no run".into()),
        }
    });
    gated(&mut k, "copy-vram-to-guest", data_dep, |_| match &run {
        Some(r) => check_range(&r.bufs.b, B_OFF, &r.src, 64),
        None => Err("no run".into()),
    });
    gated(&mut k, "copy-guest-to-guest", data_dep, |_| match &run {
        Some(r) => check_range(&r.bufs.c, C_OFF, &r.src, 64),
        None => Err("no run".into()),
    });
    gated(&mut k, "fence", data_dep, |_| match (&vfio, &run) {
        (Some(v), Some(r)) => check_fence(v, r, &mut fds),
        _ => Err("no run".into()),
    });
    let ok = gated(&mut k, "malformed-command", data_dep, |k| {
        match (&vfio, run.as_mut()) {
            (Some(v), Some(r)) => malformed(v, r, &mut fds, k),
            _ => Err("no run".into()),
        }
    });
    let dep = if ok {
        None
    } else {
        Some(data_dep.unwrap_or("malformed-command"))
    };
    gated(&mut k, "ring-reset-recovers", dep, |k| {
        match (&vfio, run.as_mut()) {
            (Some(v), Some(r)) => recovers(v, r, &mut fds, k),
            _ => Err("no run".into()),
        }
    });

    if let Some(r) = run {
        ring_left = Some(r.ring);
        bufs_left = Some(r.bufs);
    }
    let has_maps = ring_left.is_some() || bufs_left.is_some() || raw_ring_left.is_some();
    match (&vfio, has_maps) {
        (Some(v), true) => {
            let mut r = unmap_all(v, ring_left.map(|r| r.buf), bufs_left, &mut k);
            if let Some(mut b) = raw_ring_left {
                if let Err(e) = b.unmap(&v.container) {
                    r = Err(e);
                }
            }
            k.check("dma-unmap", r);
        }
        _ => k.result("dma-unmap", Outcome::Skip("nothing mapped".into())),
    }
    let r = release(func, &binding, vfio, irqs_on);
    drop(fds);
    k.check("vfio-release", r);
    k.finish()
}
