//! E5: Bus Master Enable off ⇒ no DMA. With Command.Bus Master cleared (through the vfio
//! config region) the GPU must refuse to fetch or execute ring commands — the ring stops
//! with a DMA_REFUSED error, guest memory is untouched and no MSI-X message is sent; with
//! Bus Master set again the held-back error interrupt arrives, and after a ring reset the
//! same FILL works.

use crate::e1::setup_failure;
use crate::e4::{gated, note_fail, open_ring_device, Opened};
use crate::gpu::{self, fill32};
use crate::ktap::{all_ok, Ktap, Outcome};
use crate::pci::{self, Function};
use crate::ringdrv::{self, RingDrv};
use crate::sys;
use crate::vdev::{
    poll_reg, release, set_command, wait_eventfd, write_reg, DmaBuffer, Vfio, PCI_COMMAND_MASTER,
};
use pcisim_guest_wire::{DeviceIds, SelectOptions};
use std::collections::BTreeMap;
use std::fs::File;
use std::time::{Duration, Instant};

const IOVA_BASE: u64 = 0x1800_0000;
const RING_IOVA: u64 = IOVA_BASE;
const FENCE_IOVA: u64 = IOVA_BASE + 0x1_0000;
const BUF_IOVA: u64 = IOVA_BASE + 0x10_0000;
const BUF_LEN: usize = 0x1_0000;
const RING_ENTRIES: u32 = 16;
const FENCE_VECTOR: u32 = 0;
const ERROR_VECTOR: u32 = 1;
const PATTERN: u32 = 0x1234_5678;
const BEFORE: u8 = 0x5A;
const FENCE_VALUE: u64 = 0xE5E5_0000_0000_0001;
const TIMEOUT: Duration = Duration::from_secs(10);
/// How long "nothing happens" is watched for.
const QUIET: Duration = Duration::from_millis(300);

struct Maps {
    ring: Option<RingDrv>,
    fence: DmaBuffer,
    buf: DmaBuffer,
}

fn submit_fill(v: &Vfio, m: &mut Maps) -> Result<(), String> {
    let ring = m.ring.as_mut().ok_or("no ring")?;
    ring.push_fill_and_fence(
        1,
        BUF_IOVA,
        PATTERN,
        BUF_LEN as u64,
        FENCE_IOVA,
        FENCE_VALUE,
    )?;
    ring.doorbell(v)
}

fn refused(v: &Vfio, m: &mut Maps, k: &mut Ktap) -> Result<(), String> {
    m.buf.fill(0, BUF_LEN, BEFORE)?;
    let t0 = Instant::now();
    submit_fill(v, m)?;
    let (status, stopped) = poll_reg(v, gpu::RING_STATUS, TIMEOUT, |s| s == gpu::status::ERROR)?;
    let st = ringdrv::state(v)?;
    k.diag(&format!(
        "Bus Master off, FILL + fence submitted: ring stopped after {} ms; {st}",
        t0.elapsed().as_millis()
    ));
    let mut errs = Vec::new();
    if !stopped {
        errs.push(format!(
            "RING_STATUS {status} after {}s, expected {} (error)",
            TIMEOUT.as_secs(),
            gpu::status::ERROR
        ));
    }
    let want = gpu::ring_error(gpu::err::DMA_REFUSED, 0);
    if st.error != want {
        errs.push(format!("RING_ERROR 0x{:08x}, want 0x{want:08x}", st.error));
    }
    if st.fault_addr != RING_IOVA {
        errs.push(format!(
            "RING_FAULT_ADDR 0x{:x}, want the ring fetch at 0x{RING_IOVA:x}",
            st.fault_addr
        ));
    }
    if st.head != 0 || st.last_fence != 0 {
        errs.push(format!("commands ran: {st}"));
    }
    let data = m.buf.read(0, BUF_LEN)?;
    let changed = data.iter().filter(|&&b| b != BEFORE).count();
    if changed != 0 {
        errs.push(format!("{changed} bytes of the buffer changed"));
    }
    if m.fence.read_u64(0)? != 0 {
        errs.push("the fence was written".into());
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

fn quiet(v: &Vfio, fds: &mut BTreeMap<u32, File>, k: &mut Ktap) -> Result<(), String> {
    std::thread::sleep(QUIET);
    // The PBA (BAR0 0xC000) is the device's own: a held-back vector is pending there.
    match v.device.read_u32(&v.bar0, 0xC000) {
        Ok(p) => k.diag(&format!("MSI-X PBA while Bus Master is off: 0x{p:08x}")),
        Err(e) => k.diag(&format!("PBA not readable through vfio: {e}")),
    }
    let mut fired = Vec::new();
    for (vec, f) in fds.iter_mut() {
        let n = sys::eventfd_take(f)?;
        if n != 0 {
            fired.push(format!("vector {vec}: {n}"));
        }
    }
    if fired.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "MSI-X delivered with Bus Master off: {}",
            fired.join(", ")
        ))
    }
}

fn master_on(v: &Vfio, fds: &mut BTreeMap<u32, File>, k: &mut Ktap) -> Result<(), String> {
    let t0 = Instant::now();
    set_command(v, PCI_COMMAND_MASTER, 0, k)?;
    let f = fds.get_mut(&ERROR_VECTOR).ok_or("no error eventfd")?;
    let n = wait_eventfd(f, TIMEOUT)?;
    k.diag(&format!(
        "Bus Master on: held-back error interrupt count {n} after {} ms",
        t0.elapsed().as_millis()
    ));
    let mut errs = Vec::new();
    if n != 1 {
        errs.push(format!(
            "error vector delivered {n} time(s) once Bus Master was set, expected the one held back"
        ));
    }
    if let Some(f) = fds.get_mut(&FENCE_VECTOR) {
        let m = sys::eventfd_take(f)?;
        if m != 0 {
            errs.push(format!("fence vector fired {m} time(s)"));
        }
    }
    let st = ringdrv::state(v)?;
    if st.status != gpu::status::ERROR {
        errs.push(format!("the ring left its error state by itself: {st}"));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

fn ring_reset(v: &Vfio, m: &mut Maps, k: &mut Ktap) -> Result<(), String> {
    let ring = m.ring.as_mut().ok_or("no ring")?;
    let st = ring.reset(v)?;
    k.diag(&format!("after RING_CTRL = RESET|ENABLE: {st}"));
    if (st.status, st.head, st.tail, st.error, st.ctrl)
        != (gpu::status::IDLE, 0, 0, 0, gpu::ctrl::ENABLE)
    {
        return Err(format!("ring not idle and enabled at slot 0: {st}"));
    }
    Ok(())
}

fn works(
    v: &Vfio,
    m: &mut Maps,
    fds: &mut BTreeMap<u32, File>,
    k: &mut Ktap,
) -> Result<(), String> {
    let t0 = Instant::now();
    submit_fill(v, m)?;
    let f = fds.get_mut(&FENCE_VECTOR).ok_or("no fence eventfd")?;
    let n = wait_eventfd(f, TIMEOUT)?;
    let st = ringdrv::state(v)?;
    k.diag(&format!(
        "same FILL + fence with Bus Master on: fence interrupt after {} ms; {st}",
        t0.elapsed().as_millis()
    ));
    let mut errs = Vec::new();
    if n != 1 {
        errs.push(format!("fence eventfd count {n}, expected 1"));
    }
    let want = fill32(PATTERN, BUF_LEN);
    let got = m.buf.read(0, BUF_LEN)?;
    let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    if diff != 0 {
        errs.push(format!(
            "{diff} bytes of the buffer differ from the FILL pattern"
        ));
    }
    let fence = m.fence.read_u64(0)?;
    if fence != FENCE_VALUE || st.last_fence != FENCE_VALUE {
        errs.push(format!("fence memory 0x{fence:x}; {st}"));
    }
    if (st.status, st.head) != (gpu::status::IDLE, 2) {
        errs.push(format!("ring not idle at slot 2: {st}"));
    }
    if let Some(f) = fds.get_mut(&ERROR_VECTOR) {
        let e = sys::eventfd_take(f)?;
        if e != 0 {
            errs.push(format!("error vector fired {e} time(s)"));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

pub fn run(ids: DeviceIds, o: SelectOptions) -> i32 {
    let prepared = pci::select_function(ids.vendor, ids.device, o.bdf.as_deref());
    match prepared {
        Ok((func, note)) => run_on(&func, note),
        Err(e) => setup_failure(&e),
    }
}

const TESTS: usize = 14;

fn run_on(func: &Function, note: Option<String>) -> i32 {
    let mut k = Ktap::new(TESTS);
    k.diag(&format!(
        "E5 Bus Master Enable off => no DMA, on {}",
        func.bdf
    ));
    if let Some(n) = note {
        k.diag(&n);
    }
    let mut failed: Option<&'static str> = None;
    let Opened {
        binding,
        vfio,
        mut fds,
        irqs_on,
    } = open_ring_device(func, &mut k, &mut failed, &[FENCE_VECTOR, ERROR_VECTOR], 2);

    let mut ring_buf: Option<DmaBuffer> = None;
    let mut maps: Option<Maps> = None;
    let ok = gated(&mut k, "dma-map", failed, |k| match &vfio {
        Some(v) => {
            let ring = DmaBuffer::map(&v.container, RING_IOVA, 4096)?;
            let fence = DmaBuffer::map(&v.container, FENCE_IOVA, 4096)?;
            let buf = DmaBuffer::map(&v.container, BUF_IOVA, BUF_LEN)?;
            k.diag(&format!(
                "mapped ring 0x{RING_IOVA:x}, fence 0x{FENCE_IOVA:x}, buffer 0x{BUF_IOVA:x}+0x{BUF_LEN:x}"
            ));
            ring_buf = Some(ring);
            maps = Some(Maps {
                ring: None,
                fence,
                buf,
            });
            Ok(())
        }
        None => Err("no device".into()),
    });
    note_fail(&mut failed, "dma-map", ok);

    let ok = gated(&mut k, "ring-setup", failed, |k| {
        match (&vfio, maps.as_mut(), ring_buf.take()) {
            (Some(v), Some(m), Some(rb)) => {
                m.ring = Some(RingDrv::setup(
                    v,
                    rb,
                    RING_ENTRIES,
                    FENCE_VECTOR,
                    ERROR_VECTOR,
                    k,
                )?);
                Ok(())
            }
            _ => Err("nothing mapped".into()),
        }
    });
    note_fail(&mut failed, "ring-setup", ok);

    let ok = gated(&mut k, "bus-master-off", failed, |k| match &vfio {
        Some(v) => set_command(v, 0, PCI_COMMAND_MASTER, k).map(|_| ()),
        None => Err("no device".into()),
    });
    note_fail(&mut failed, "bus-master-off", ok);

    let ok = gated(&mut k, "fill-refused", failed, |k| {
        match (&vfio, maps.as_mut()) {
            (Some(v), Some(m)) => refused(v, m, k),
            _ => Err("nothing mapped".into()),
        }
    });
    note_fail(&mut failed, "fill-refused", ok);

    gated(&mut k, "no-msi-while-off", failed, |k| match &vfio {
        Some(v) => quiet(v, &mut fds, k),
        None => Err("no device".into()),
    });

    let ok = gated(&mut k, "bus-master-on", failed, |k| match &vfio {
        Some(v) => master_on(v, &mut fds, k),
        None => Err("no device".into()),
    });
    note_fail(&mut failed, "bus-master-on", ok);

    let ok = gated(&mut k, "ring-reset", failed, |k| {
        match (&vfio, maps.as_mut()) {
            (Some(v), Some(m)) => ring_reset(v, m, k),
            _ => Err("nothing mapped".into()),
        }
    });
    note_fail(&mut failed, "ring-reset", ok);

    gated(&mut k, "fill-works", failed, |k| {
        match (&vfio, maps.as_mut()) {
            (Some(v), Some(m)) => works(v, m, &mut fds, k),
            _ => Err("nothing mapped".into()),
        }
    });

    match (&vfio, maps, ring_buf) {
        (Some(v), m, rb) if m.is_some() || rb.is_some() => {
            let mut errs = Vec::new();
            // Stop the ring before its memory goes away.
            if let Err(e) = write_reg(v, gpu::RING_CTRL, gpu::ctrl::RESET) {
                errs.push(e);
            }
            let mut all: Vec<DmaBuffer> = rb.into_iter().collect();
            if let Some(m) = m {
                all.extend(m.ring.map(|r| r.buf));
                all.push(m.fence);
                all.push(m.buf);
            }
            for mut b in all {
                if let Err(e) = b.unmap(&v.container) {
                    errs.push(e);
                }
            }
            k.check("dma-unmap", all_ok(errs));
        }
        _ => k.result("dma-unmap", Outcome::Skip("nothing mapped".into())),
    }
    let r = release(func, &binding, vfio, irqs_on);
    drop(fds);
    k.check("vfio-release", r);
    k.finish()
}
