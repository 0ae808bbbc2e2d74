//! `dma-stream`: H5 — a guest vfio user keeps the GPU's command ring streaming DMA into its own
//! memory while the host pulls the link (`pcisim ctl inject link-down`), and reports what it saw.
//!
//! The program binds the function to vfio-pci, binds its message interrupts (MSI by default,
//! as the hot-plugged GPU has: `--irq msi`; or MSI-X), maps a ring page, a fence page and a
//! [`BUF_LEN`] buffer through the vIOMMU and writes a static ring of [`ENTRIES`] commands: every
//! slot a FILL of the whole buffer with its own pattern, every [`FENCE_EVERY`]th a WRITE_FENCE
//! with its interrupt. It then keeps the ring full (RING_TAIL = HEAD - 1 every [`TICK`]: a few
//! hundred ms of work queued, so the engine is always busy), counting fence interrupts. Once
//! fences and interrupts flow it reports `streaming` and creates `--ready-file`.
//!
//! When a register read returns all-ones (or fails), the device is gone: the program reads the
//! registers once more, reports what it saw (`link-down-seen`), writes it to `--down-file` and
//! waits (at most `--down-wait-s`) for the ID register to read back. The register reads never
//! block. Then, with the link up again: the ring must have stopped on DMA_REFUSED (its next
//! access after the link went down was refused), the error interrupt held back while the link
//! was down is delivered once the function may send again (a config write makes the device
//! flush pending vectors), the ring works again after RING_CTRL.RESET, and everything is
//! unmapped and released. The program never releases the device while the link is down: the
//! kernel's reset on release would poll all-ones config space for a minute.

use crate::e1::setup_failure;
use crate::e3::{self, IrqMode};
use crate::e4::{gated, note_fail};
use crate::gpu::{self, encode_cmd};
use crate::ktap::{Ktap, Outcome};
use crate::pci::{self, Function};
use crate::ringdrv::{self, RingDrv, RingState};
use crate::sys;
use crate::vdev::{
    self, bind, enable_command, open_vfio, read_reg, release_and_report, write_reg, Binding,
    DmaBuffer, Vfio, PCI_COMMAND,
};
use pcisim_guest_wire::{DeviceIds, DmaStreamOptions};
use std::collections::BTreeMap;
use std::fs::File;
use std::time::{Duration, Instant};

const IOVA_BASE: u64 = 0x6000_0000;
const RING_IOVA: u64 = IOVA_BASE;
const FENCE_IOVA: u64 = IOVA_BASE + 0x1000;
const BUF_IOVA: u64 = IOVA_BASE + 0x100_0000;
/// The streamed buffer: every FILL covers it (64 MiB, the largest FILL: ~10 ms of engine time
/// per command and two journal records).
const BUF_LEN: usize = 64 << 20;
/// Ring slots (one 4 KiB page).
const ENTRIES: u32 = 128;
/// Slot `i` with `i % FENCE_EVERY == FENCE_EVERY - 1` is a WRITE_FENCE, the others FILLs.
const FENCE_EVERY: u32 = 8;
const FENCE_VECTOR: u32 = 0;
const ERROR_VECTOR: u32 = 1;
const PATTERN_BASE: u32 = 0x5354_0000;
const FENCE_BASE: u64 = 0x5354_5245_0000_0000;
/// How often the streaming loop tops the ring up.
const TICK: Duration = Duration::from_millis(20);
/// Fence interrupts to see before the stream counts as established.
const READY_FENCES: u64 = 2;
/// How long one interrupt may take to arrive.
const IRQ_TIMEOUT: Duration = Duration::from_secs(10);
const TESTS: usize = 14;

fn pattern(slot: u32) -> u32 {
    PATTERN_BASE | slot
}

fn fence_value(slot: u32) -> u64 {
    FENCE_BASE | u64::from(slot)
}

fn is_fence(slot: u32) -> bool {
    slot % FENCE_EVERY == FENCE_EVERY - 1
}

/// The command in `slot` of the static ring.
fn command(slot: u32) -> [u8; 32] {
    if is_fence(slot) {
        encode_cmd(
            gpu::op::WRITE_FENCE,
            gpu::flag::FENCE_IRQ,
            FENCE_IOVA,
            fence_value(slot),
            0,
        )
    } else {
        encode_cmd(
            gpu::op::FILL,
            0,
            BUF_IOVA,
            u64::from(pattern(slot)),
            BUF_LEN as u64,
        )
    }
}

struct Opts {
    func: Function,
    note: Option<String>,
    mode: IrqMode,
    ready_file: Option<String>,
    down_file: Option<String>,
    stream_for: Duration,
    down_wait: Duration,
}

fn parse(ids: DeviceIds, o: DmaStreamOptions) -> Result<Opts, String> {
    let (func, note) = pci::select_function(ids.vendor, ids.device, o.bdf.as_deref())?;
    Ok(Opts {
        func,
        note,
        mode: IrqMode::of(o.irq.unwrap_or(pcisim_guest_wire::IrqMode::Msi)),
        ready_file: o.ready_file,
        down_file: o.down_file,
        stream_for: Duration::from_secs(o.stream_s.unwrap_or(60)),
        down_wait: Duration::from_secs(o.down_wait_s.unwrap_or(30)),
    })
}

/// The message interrupts: eventfds by vector, and how vectors fold (MSI: a vector `v` goes
/// out as `v mod 2^MME`).
struct Irqs {
    fds: BTreeMap<u32, File>,
    fold: u32,
}

impl Irqs {
    fn open(v: &Vfio, mode: IrqMode, bdf: &str, k: &mut Ktap) -> Result<Irqs, String> {
        match mode {
            IrqMode::Msix => Ok(Irqs {
                fds: vdev::msix_eventfds(v, &[FENCE_VECTOR, ERROR_VECTOR], 2, k)?,
                fold: u32::MAX,
            }),
            IrqMode::Msi => {
                let fds = e3::msi_eventfds(v, bdf, k)?;
                let fold = fds.len() as u32;
                Ok(Irqs { fds, fold })
            }
        }
    }

    fn fd(&mut self, vector: u32) -> Result<&mut File, String> {
        let target = vector % self.fold;
        self.fds
            .get_mut(&target)
            .ok_or_else(|| format!("no eventfd for vector {target}"))
    }

    /// Takes every pending count; returns the total.
    fn drain(&mut self) -> Result<u64, String> {
        let mut n = 0;
        for f in self.fds.values_mut() {
            n += sys::eventfd_take(f)?;
        }
        Ok(n)
    }
}

/// The buffers the device reaches.
struct Bufs {
    ring: RingDrv,
    fence: DmaBuffer,
    buf: DmaBuffer,
}

fn map_and_setup(v: &Vfio, k: &mut Ktap) -> Result<(DmaBuffer, DmaBuffer, DmaBuffer), String> {
    let t0 = Instant::now();
    let ring = DmaBuffer::map(&v.container, RING_IOVA, 4096)?;
    let fence = DmaBuffer::map(&v.container, FENCE_IOVA, 4096)?;
    let buf = DmaBuffer::map(&v.container, BUF_IOVA, BUF_LEN)?;
    k.diag(&format!(
        "mapped the ring, the fence page and a {} MiB buffer through the vIOMMU in {} ms",
        BUF_LEN >> 20,
        t0.elapsed().as_millis()
    ));
    Ok((ring, fence, buf))
}

/// What the streaming loop saw.
#[derive(Debug, Default)]
struct Stream {
    fences: u64,
    last_good: Option<RingState>,
    /// Why the loop ended: the device's reads went all-ones or failed (`Some`), or not.
    gone: Option<String>,
    streamed_ms: u128,
}

/// Reads one BAR0 register; `Err` carries a failed read.
fn rd(v: &Vfio, off: u64) -> Result<u32, String> {
    read_reg(v, off)
}

/// Keeps the ring full and counts fence interrupts until the device disappears or `limit`
/// passes. Reports `streaming` (once established) on the way and creates the ready file.
fn stream(
    v: &Vfio,
    irqs: &mut Irqs,
    opts: &Opts,
    k: &mut Ktap,
    reported: &mut bool,
) -> Result<Stream, String> {
    let start = Instant::now();
    let mut s = Stream::default();
    let mut ticks = 0u64;
    loop {
        let id = match rd(v, gpu::ID) {
            Ok(x) => x,
            Err(e) => {
                s.gone = Some(format!("BAR0 read failed: {e}"));
                break;
            }
        };
        if id == u32::MAX {
            s.gone = Some("BAR0 ID reads 0xffffffff".into());
            break;
        }
        if id != gpu::ID_MAGIC {
            return Err(format!("BAR0 ID reads 0x{id:08x} while streaming"));
        }
        let st = match ringdrv::state(v) {
            Ok(st) => st,
            Err(e) => {
                s.gone = Some(format!("ring register read failed: {e}"));
                break;
            }
        };
        if st.head == u32::MAX || st.status == u32::MAX {
            s.gone = Some(format!("ring registers read all-ones ({st})"));
            break;
        }
        if st.status == gpu::status::ERROR {
            return Err(format!("the ring stopped while the link was up: {st}"));
        }
        write_reg(v, gpu::RING_TAIL, (st.head + ENTRIES - 1) % ENTRIES)?;
        s.last_good = Some(st);
        s.fences += irqs.drain()?;
        ticks += 1;
        if !*reported && s.fences >= READY_FENCES && st.completed > 0 {
            *reported = true;
            k.diag(&format!(
                "streaming after {} ms: {} fence interrupts, {st}",
                start.elapsed().as_millis(),
                s.fences
            ));
            k.result("streaming", Outcome::Pass);
            if let Some(p) = &opts.ready_file {
                std::fs::write(p, "streaming\n").map_err(|e| format!("write {p}: {e}"))?;
            }
        }
        if start.elapsed() >= opts.stream_for {
            break;
        }
        std::thread::sleep(TICK);
    }
    s.streamed_ms = start.elapsed().as_millis();
    k.diag(&format!(
        "streamed {} ms ({ticks} ticks), {} fence interrupts; last good ring state: {}",
        s.streamed_ms,
        s.fences,
        s.last_good.map_or("none".into(), |st| st.to_string())
    ));
    Ok(s)
}

/// Reads the registers a driver would look at, as they read now.
fn snapshot(v: &Vfio) -> Vec<(&'static str, Result<u32, String>)> {
    [
        ("ID", gpu::ID),
        ("HEAD", gpu::RING_HEAD),
        ("STATUS", gpu::RING_STATUS),
        ("ERROR", gpu::RING_ERROR),
        ("LAST_FENCE_LO", gpu::LAST_FENCE_LO),
        ("COMPLETED", gpu::CMDS_COMPLETED),
        ("IRQ_COUNT", gpu::IRQ_COUNT),
    ]
    .iter()
    .map(|(n, off)| (*n, rd(v, *off)))
    .collect()
}

/// Waits for the ID register to read the magic again; returns how long it took, or `None`
/// after `limit`. Counts the interrupts that arrive meanwhile.
fn wait_link_up(v: &Vfio, irqs: &mut Irqs, limit: Duration) -> Result<(Option<u128>, u64), String> {
    let t0 = Instant::now();
    let mut irqs_seen = 0;
    loop {
        irqs_seen += irqs.drain()?;
        if rd(v, gpu::ID).ok() == Some(gpu::ID_MAGIC) {
            return Ok((Some(t0.elapsed().as_millis()), irqs_seen));
        }
        if t0.elapsed() >= limit {
            return Ok((None, irqs_seen));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn check_stopped(v: &Vfio, k: &mut Ktap) -> Result<(), String> {
    let st = ringdrv::state(v)?;
    k.diag(&format!("after link-up: {st}"));
    let code = st.error & 0xff;
    let slot = (st.error >> 16) & 0xfff;
    let in_buf = (BUF_IOVA..BUF_IOVA + BUF_LEN as u64).contains(&st.fault_addr);
    let in_ring = (RING_IOVA..RING_IOVA + 4096).contains(&st.fault_addr);
    if st.status != gpu::status::ERROR || code != gpu::err::DMA_REFUSED {
        return Err(format!(
            "expected the ring stopped on DMA_REFUSED ({}): {st}",
            gpu::err::DMA_REFUSED
        ));
    }
    if !(in_buf || in_ring) || st.head != slot {
        return Err(format!(
            "DMA_REFUSED at slot {slot}, address 0x{:x}: not the failed slot or not the ring or buffer ({st})",
            st.fault_addr
        ));
    }
    k.diag(&format!(
        "the ring stopped on DMA_REFUSED at slot {slot} ({}), refused access at 0x{:x} ({})",
        if is_fence(slot) {
            "WRITE_FENCE"
        } else {
            "FILL"
        },
        st.fault_addr,
        if in_ring {
            "the command fetch".to_string()
        } else {
            format!("buffer +0x{:x}", st.fault_addr - BUF_IOVA)
        }
    ));
    Ok(())
}

/// The error interrupt raised when the ring stopped (while the link was down) was held back;
/// a config write lets the device send what is pending now that it may.
fn check_held_irq(v: &Vfio, irqs: &mut Irqs, k: &mut Ktap) -> Result<(), String> {
    let early = irqs.drain()?;
    if early > 0 {
        k.diag(&format!(
            "{early} interrupt(s) arrived between link-up and the config write"
        ));
    }
    let cmd = v.device.read_u16(&v.config, PCI_COMMAND)?;
    v.device.write_u16(&v.config, PCI_COMMAND, cmd)?;
    let t0 = Instant::now();
    let n = vdev::wait_eventfd(irqs.fd(ERROR_VECTOR)?, IRQ_TIMEOUT)?;
    if early == 0 && n == 0 {
        return Err(format!(
            "no error interrupt within {} s of the config write after link-up",
            IRQ_TIMEOUT.as_secs()
        ));
    }
    k.diag(&format!(
        "error interrupt: {} after the config write ({} us), {early} before it",
        n,
        t0.elapsed().as_micros()
    ));
    Ok(())
}

fn check_recovers(v: &Vfio, b: &mut Bufs, irqs: &mut Irqs, k: &mut Ktap) -> Result<(), String> {
    let st = b.ring.reset(v)?;
    if st.status != gpu::status::IDLE || st.head != 0 {
        return Err(format!(
            "RING_CTRL = RESET | ENABLE: not idle at slot 0: {st}"
        ));
    }
    irqs.drain()?;
    b.fence.fill(0, 8, 0)?;
    // Slots 0..FENCE_EVERY-1 are FILLs, then the first fence.
    write_reg(v, gpu::RING_TAIL, FENCE_EVERY)?;
    let t0 = Instant::now();
    let n = vdev::wait_eventfd(irqs.fd(FENCE_VECTOR)?, IRQ_TIMEOUT)?;
    let st = ringdrv::state(v)?;
    if n == 0 {
        return Err(format!(
            "no fence interrupt within {} s: {st}",
            IRQ_TIMEOUT.as_secs()
        ));
    }
    let fence_slot = FENCE_EVERY - 1;
    let want = fence_value(fence_slot);
    let got = b.fence.read_u64(0)?;
    if st.head != FENCE_EVERY || st.last_fence != want || got != want {
        return Err(format!(
            "after {FENCE_EVERY} commands: fence memory 0x{got:x}, expected 0x{want:x}; {st}"
        ));
    }
    let expect = gpu::fill32(pattern(fence_slot - 1), 4096);
    for off in [0, BUF_LEN / 2, BUF_LEN - 4096] {
        if b.buf.read(off, 4096)? != expect {
            return Err(format!(
                "buffer +0x{off:x} does not hold slot {}'s FILL pattern 0x{:08x}",
                fence_slot - 1,
                pattern(fence_slot - 1)
            ));
        }
    }
    k.diag(&format!(
        "after RING_CTRL.RESET: {} FILLs of {} MiB and a fence in {} ms; the buffer holds the last pattern",
        FENCE_EVERY - 1,
        BUF_LEN >> 20,
        t0.elapsed().as_millis()
    ));
    Ok(())
}

pub fn run(ids: DeviceIds, o: DmaStreamOptions) -> i32 {
    let opts = match parse(ids, o) {
        Ok(o) => o,
        Err(e) => return setup_failure(&e),
    };
    let mut k = Ktap::new(TESTS);
    k.diag(&format!(
        "H5 DMA stream on {} ({:?}): FILLs of {} MiB, a fence with its interrupt every {FENCE_EVERY} commands",
        opts.func.bdf,
        opts.mode,
        BUF_LEN >> 20
    ));
    if let Some(n) = &opts.note {
        k.diag(n);
    }
    let irq = match opts.mode {
        IrqMode::Msix => "msix",
        IrqMode::Msi => "msi",
    };
    let mut failed: Option<&'static str> = None;
    let mut binding = Binding::default();
    let r = bind(&opts.func, &mut binding, &mut k);
    let ok = k.check("vfio-bind", r);
    note_fail(&mut failed, "vfio-bind", ok);

    let mut vfio: Option<Vfio> = None;
    let ok = gated(&mut k, "vfio-open", failed, |k| {
        let group = binding.group.clone().unwrap_or_default();
        vfio = Some(open_vfio(&opts.func.bdf, &group, k)?);
        Ok(())
    });
    note_fail(&mut failed, "vfio-open", ok);
    let ok = gated(&mut k, "command-enable", failed, |k| match &vfio {
        Some(v) => enable_command(v, k),
        None => Err("no device".into()),
    });
    note_fail(&mut failed, "command-enable", ok);

    let mut irqs: Option<Irqs> = None;
    let enable_name = if opts.mode == IrqMode::Msi {
        "msi-enable"
    } else {
        "msix-enable"
    };
    let ok = gated(&mut k, enable_name, failed, |k| match &vfio {
        Some(v) => {
            irqs = Some(Irqs::open(v, opts.mode, &opts.func.bdf, k)?);
            Ok(())
        }
        None => Err("no device".into()),
    });
    note_fail(&mut failed, enable_name, ok);

    let mut mapped: Option<(DmaBuffer, DmaBuffer, DmaBuffer)> = None;
    let ok = gated(&mut k, "dma-map", failed, |k| match &vfio {
        Some(v) => {
            mapped = Some(map_and_setup(v, k)?);
            Ok(())
        }
        None => Err("no device".into()),
    });
    note_fail(&mut failed, "dma-map", ok);

    let mut bufs: Option<Bufs> = None;
    let ok = gated(&mut k, "ring-setup", failed, |k| {
        match (&vfio, mapped.take()) {
            (Some(v), Some((ring, fence, buf))) => {
                let mut r = RingDrv::setup(v, ring, ENTRIES, FENCE_VECTOR, ERROR_VECTOR, k)?;
                for slot in 0..ENTRIES {
                    r.push(command(slot))?;
                }
                bufs = Some(Bufs {
                    ring: r,
                    fence,
                    buf,
                });
                Ok(())
            }
            _ => Err("nothing mapped".into()),
        }
    });
    note_fail(&mut failed, "ring-setup", ok);

    // streaming, link-down-seen
    let mut reported = false;
    let mut seen: Option<Stream> = None;
    let mut stream_err = None;
    if failed.is_none() {
        if let (Some(v), Some(i)) = (&vfio, irqs.as_mut()) {
            match stream(v, i, &opts, &mut k, &mut reported) {
                Ok(s) => seen = Some(s),
                Err(e) => stream_err = Some(e),
            }
        }
    }
    if !reported {
        let ok = gated(&mut k, "streaming", failed, |_| {
            Err(stream_err.clone().unwrap_or_else(|| {
                format!(
                    "fewer than {READY_FENCES} fence interrupts or no command completed before the stream ended"
                )
            }))
        });
        note_fail(&mut failed, "streaming", ok);
    }
    // link-down-seen: what the program saw when the device went away.
    let gone = seen.as_ref().is_some_and(|s| s.gone.is_some());
    gated(&mut k, "link-down-seen", failed, |k| {
        if let Some(e) = &stream_err {
            return Err(e.clone());
        }
        let (Some(v), Some(s)) = (&vfio, &seen) else {
            return Err("no stream".into());
        };
        let Some(why) = &s.gone else {
            return Err(format!(
                "the device did not go away within {} s of streaming",
                opts.stream_for.as_secs()
            ));
        };
        let regs = snapshot(v);
        let text = format!(
            "after {} ms of streaming and {} fence interrupts: {why}; then {}",
            s.streamed_ms,
            s.fences,
            regs.iter()
                .map(|(n, r)| match r {
                    Ok(x) => format!("{n} 0x{x:08x}"),
                    Err(e) => format!("{n} error ({e})"),
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
        k.diag(&format!("link down: {text}"));
        if let Some(p) = &opts.down_file {
            std::fs::write(p, format!("{text}\n")).map_err(|e| format!("write {p}: {e}"))?;
        }
        let live: Vec<&str> = regs
            .iter()
            .filter(|(_, r)| *r != Ok(u32::MAX))
            .map(|(n, _)| *n)
            .collect();
        if live.is_empty() {
            Ok(())
        } else {
            Err(format!("not all-ones: {}", live.join(", ")))
        }
    });

    // link-up-seen: never release the device while the link is down (see the module doc).
    let name = "link-up-seen";
    let ok = match (&vfio, irqs.as_mut()) {
        (Some(v), Some(i)) if gone => {
            let r = wait_link_up(v, i, opts.down_wait).and_then(|(back, during)| {
                k.diag(&format!(
                    "{during} interrupt(s) reached the program while the link was down \
                     (sent before it went down or not: the device's journal says)"
                ));
                match back {
                    Some(ms) => {
                        k.diag(&format!("BAR0 ID reads the magic again after {ms} ms"));
                        Ok(())
                    }
                    None => Err(format!(
                        "the link did not come back within {} s",
                        opts.down_wait.as_secs()
                    )),
                }
            });
            k.check(name, r)
        }
        _ => {
            k.result(
                name,
                Outcome::Skip(
                    failed.map_or("the link never went down".into(), |f| format!("{f} failed")),
                ),
            );
            false
        }
    };
    note_fail(&mut failed, name, ok);

    let ok = gated(
        &mut k,
        "ring-stopped-dma-refused",
        failed,
        |k| match &vfio {
            Some(v) if gone => check_stopped(v, k),
            Some(_) => Err("the link never went down".into()),
            None => Err("no device".into()),
        },
    );
    note_fail(&mut failed, "ring-stopped-dma-refused", ok);
    gated(
        &mut k,
        "held-error-interrupt-after-link-up",
        failed,
        |k| match (&vfio, irqs.as_mut()) {
            (Some(v), Some(i)) => check_held_irq(v, i, k),
            _ => Err("no device".into()),
        },
    );
    gated(&mut k, "ring-recovers", failed, |k| {
        match (&vfio, bufs.as_mut(), irqs.as_mut()) {
            (Some(v), Some(b), Some(i)) => check_recovers(v, b, i, k),
            _ => Err("no ring".into()),
        }
    });

    // dma-unmap: always, once something was mapped and the link is up.
    let unmap = match (&vfio, bufs.as_mut()) {
        (Some(v), Some(b)) => (|| -> Result<(), String> {
            write_reg(v, gpu::RING_CTRL, gpu::ctrl::RESET)?;
            b.ring.buf.unmap(&v.container)?;
            b.fence.unmap(&v.container)?;
            b.buf.unmap(&v.container)
        })(),
        _ => Err("nothing mapped".into()),
    };
    if bufs.is_some() {
        k.check("dma-unmap", unmap);
    } else {
        k.result("dma-unmap", Outcome::Skip("nothing mapped".into()));
    }
    drop(bufs);

    let mut errs = Vec::new();
    if let (Some(v), Some(_)) = (&vfio, &irqs) {
        if let Err(e) = v.device.disable_irqs(opts.mode.index()) {
            errs.push(format!("disable {irq}: {e}"));
        }
    }
    release_and_report(&opts.func, &binding, vfio, false, errs, &mut k);
    drop(irqs);
    k.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_ring() {
        assert!(!is_fence(0));
        assert!(is_fence(FENCE_EVERY - 1));
        assert_eq!((0..ENTRIES).filter(|&s| is_fence(s)).count(), 16);
        let c = command(7);
        assert_eq!(c[0], gpu::op::WRITE_FENCE);
        assert_eq!(c[1], gpu::flag::FENCE_IRQ);
        let f = command(6);
        assert_eq!(f[0], gpu::op::FILL);
        assert_eq!(
            u64::from_le_bytes(f[24..32].try_into().unwrap()),
            BUF_LEN as u64
        );
        assert_eq!(
            u64::from_le_bytes(f[16..24].try_into().unwrap()),
            0x5354_0006
        );
        assert!(u64::from(ENTRIES) * gpu::CMD_SIZE <= 4096);
    }
}
