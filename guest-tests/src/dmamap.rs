//! `dma-map-pages` (M9): a guest vfio user maps a large buffer in 4 KiB pages through the
//! vIOMMU, has the GPU write into its last page, and unmaps it.
//!
//! With small pages (shmem THP off, `MADV_NOHUGEPAGE`) every 4 KiB page of the buffer is an
//! IOMMU mapping of its own, and QEMU sends the server one DMA_MAP per page, each with an fd of
//! the guest's RAM: 262,144 for 1 GiB. A server that kept an fd per mapping hit its fd limit
//! after ~1000 (at `ulimit -n 1024`) and the guest's device silently lost memory. The host side
//! (crates/lab/src/mm.rs, M9) runs the server under that limit and watches its fds and RSS.
//!
//! Subtests: small pages for shmem; bind and open the device; set up the command ring; map the
//! buffer (timed); the GPU's WRITE_FENCE into the buffer's last 8 bytes lands there; unmap
//! (timed); release.

use std::ptr::NonNull;
use std::time::{Duration, Instant};

use crate::e1::setup_failure;
use crate::gpu::{self, encode_cmd};
use crate::ktap::{Ktap, Outcome};
use crate::pci;
use crate::ringdrv::RingDrv;
use crate::vdev::{bind, open_enabled, poll_reg, read_u64_reg, release, Binding, DmaBuffer};
use pcisim_guest_wire::{DeviceIds, DmaMapOptions};

const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
const RING_IOVA: u64 = 0x1000_0000;
/// The buffer's IOVA: 4 GiB, clear of the ring.
const BUF_IOVA: u64 = 0x1_0000_0000;
const FENCE: u64 = 0x5EED_0009_0000_0001;

/// A shared anonymous (shmem) buffer in small pages.
struct Buffer {
    ptr: NonNull<u8>,
    len: usize,
}

impl Buffer {
    fn new(len: usize) -> Result<Buffer, String> {
        // SAFETY: a new shared anonymous mapping (addr NULL) cannot alias existing memory; the
        // result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap {len} shared anonymous bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or("mmap returned NULL")?;
        let b = Buffer { ptr, len };
        // SAFETY: advice on our own mapping; failure only means huge pages may be used.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        // Touch every page so the pin does not fault them in one by one under the lock.
        for off in (0..len).step_by(4096) {
            // SAFETY: in bounds of our live mapping.
            unsafe { b.ptr.as_ptr().add(off).write_volatile(0x5a) };
        }
        Ok(b)
    }

    fn read_u64(&self, off: usize) -> u64 {
        let mut a = [0u8; 8];
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        for (i, x) in a.iter_mut().enumerate() {
            // SAFETY: callers pass `off + 8 <= len` (the last 8 bytes at most).
            *x = unsafe { self.ptr.as_ptr().add(off + i).read_volatile() };
        }
        u64::from_le_bytes(a)
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: our own mapping; its DMA mapping is gone (unmapped, or the container closed
        // and unpinned it) before the buffer drops.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The subtests, in the order they are reported (`*`: the buffer's size or IOVA).
const SUBTESTS: &[&str] = &[
    "shmem transparent huge pages off",
    "bind vfio-pci and open the device",
    "command ring set up",
    "map * MiB in 4 KiB pages",
    "the GPU's WRITE_FENCE lands in the last page (IOVA *)",
    "unmap * MiB",
    "release the device",
];

pub fn run(ids: DeviceIds, o: DmaMapOptions) -> i32 {
    let parsed = (|| -> Result<_, String> {
        let mib =
            usize::try_from(o.mib.unwrap_or(1024)).map_err(|_| "--mib: too large".to_string())?;
        if mib == 0 {
            return Err("--mib must be at least 1".into());
        }
        let (func, _) = pci::select_function(ids.vendor, ids.device, o.bdf.as_deref())?;
        Ok((func, mib))
    })();
    let (func, mib) = match parsed {
        Ok(p) => p,
        Err(e) => return setup_failure(&e),
    };
    let len = mib << 20;
    let pages = len / 4096;
    let mut k = Ktap::declared(SUBTESTS);

    // 1. Small pages for shmem.
    let before = std::fs::read_to_string(SHMEM_THP).unwrap_or_default();
    let r = std::fs::write(SHMEM_THP, "never")
        .map_err(|e| format!("write never to {SHMEM_THP}: {e}"))
        .and_then(|()| {
            let now = std::fs::read_to_string(SHMEM_THP).map_err(|e| e.to_string())?;
            if now.contains("[never]") {
                Ok(())
            } else {
                Err(format!("{SHMEM_THP} reads {now:?}"))
            }
        });
    let thp_ok = r.is_ok();
    k.check("shmem transparent huge pages off", r);
    if !thp_ok {
        return k.finish();
    }
    let restore = |k: &mut Ktap| {
        if let Some(mode) = before
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        {
            if let Err(e) = std::fs::write(SHMEM_THP, mode) {
                k.diag(&format!("restoring {SHMEM_THP} to {mode}: {e}"));
            }
        }
    };

    // 2. The device.
    let mut b = Binding::default();
    if let Err(e) = bind(&func, &mut b, &mut k) {
        k.result("bind vfio-pci and open the device", Outcome::Fail(e));
        let _ = release(&func, &b, None, false);
        restore(&mut k);
        return k.finish();
    }
    let v = match open_enabled(&func, &b, &mut k) {
        Ok(v) => v,
        Err(e) => {
            k.result("bind vfio-pci and open the device", Outcome::Fail(e));
            restore(&mut k);
            return k.finish();
        }
    };
    k.result("bind vfio-pci and open the device", Outcome::Pass);

    // 3. The ring.
    let ring = DmaBuffer::map(&v.container, RING_IOVA, 4096)
        .and_then(|buf| RingDrv::setup(&v, buf, 16, 0, 1, &mut k));
    let mut ring = match ring {
        Ok(r) => r,
        Err(e) => {
            k.result("command ring set up", Outcome::Fail(e));
            let _ = release(&func, &b, Some(v), false);
            restore(&mut k);
            return k.finish();
        }
    };
    k.result("command ring set up", Outcome::Pass);

    // 4. Map the buffer page by page (one VFIO_IOMMU_MAP_DMA; the vIOMMU does the rest).
    let buf = match Buffer::new(len) {
        Ok(buf) => buf,
        Err(e) => {
            k.result(&format!("map {mib} MiB in 4 KiB pages"), Outcome::Fail(e));
            drop(ring);
            let _ = release(&func, &b, Some(v), false);
            restore(&mut k);
            return k.finish();
        }
    };
    let t = Instant::now();
    // SAFETY: `buf` is our own mapping and outlives the DMA mapping (unmapped below, or the
    // container closes before `buf` drops).
    let mapped = unsafe {
        v.container
            .map_dma(buf.ptr.as_ptr() as u64, BUF_IOVA, len as u64)
    };
    let map_s = t.elapsed().as_secs_f64();
    if let Err(e) = mapped {
        k.result(&format!("map {mib} MiB in 4 KiB pages"), Outcome::Fail(e));
        drop(ring);
        let _ = release(&func, &b, Some(v), false);
        drop(buf);
        restore(&mut k);
        return k.finish();
    }
    k.diag(&format!(
        "mapped {mib} MiB ({pages} pages) at IOVA {BUF_IOVA:#x} in {map_s:.1} s"
    ));
    k.result(&format!("map {mib} MiB in 4 KiB pages"), Outcome::Pass);

    // 5. The GPU writes a fence into the last 8 bytes of the buffer.
    let last = BUF_IOVA + len as u64 - 8;
    let r = (|| -> Result<(), String> {
        ring.push(encode_cmd(gpu::op::WRITE_FENCE, 0, last, FENCE, 0))?;
        ring.doorbell(&v)?;
        let (_, done) = poll_reg(&v, gpu::RING_STATUS, Duration::from_secs(60), |s| {
            s != gpu::status::BUSY
        })?;
        let fence = read_u64_reg(&v, gpu::LAST_FENCE_LO)?;
        let seen = buf.read_u64(len - 8);
        if !done || fence != FENCE || seen != FENCE {
            return Err(format!(
                "ring done {done}, LAST_FENCE {fence:#x}, the buffer's last 8 bytes {seen:#x}; expected {FENCE:#x}"
            ));
        }
        Ok(())
    })();
    k.check(
        &format!("the GPU's WRITE_FENCE lands in the last page (IOVA {last:#x})"),
        r,
    );

    // 6. Unmap.
    let t = Instant::now();
    let r = v.container.unmap_dma(BUF_IOVA, len as u64);
    let unmap_s = t.elapsed().as_secs_f64();
    let r = r.and_then(|n| {
        if n == len as u64 {
            Ok(())
        } else {
            Err(format!("unmapped {n:#x} bytes, expected {len:#x}"))
        }
    });
    if r.is_ok() {
        k.diag(&format!("unmapped {mib} MiB in {unmap_s:.1} s"));
    }
    k.check(&format!("unmap {mib} MiB"), r);

    // 7. Release.
    drop(ring);
    let r = release(&func, &b, Some(v), false);
    drop(buf);
    restore(&mut k);
    k.check("release the device", r);
    k.finish()
}
