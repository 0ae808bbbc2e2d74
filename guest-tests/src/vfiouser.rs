//! `vfio-user`: a minimal guest vfio user of a hot-plugged function (H3, H4).
//!
//! Binds the function to vfio-pci, opens container, group and device, enables memory and bus
//! mastering, reads BAR0's ID through the vfio device and maps a DMA buffer through the vIOMMU
//! (each 4 KiB page reaches the server as a DMA_MAP). Then, by `--req`:
//!
//! - `off` (default): unmaps the buffer, closes everything and unbinds (H3's per-cycle user);
//! - `release`: binds an eventfd to the device request interrupt (`VFIO_PCI_REQ_IRQ_INDEX`),
//!   writes `ready` to `--ready-file`, and waits for the kernel's request (a `device_del` on the
//!   host): then closes everything and exits 0 (H4);
//! - `ignore`: the same, but it ignores every request and holds the device until killed (H4's
//!   uncooperative variant).

use crate::e1::setup_failure;
use crate::ktap::{Ktap, Outcome};
use crate::pci;
use crate::sys;
use crate::vdev::{bind, open_enabled, release, Binding, DmaBuffer};
use pcisim_guest_wire::{DeviceIds, ReqMode, VfioUserOptions};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

/// `VFIO_PCI_REQ_IRQ_INDEX` (INTx, MSI, MSI-X, ERR, REQ).
const VFIO_PCI_REQ_IRQ_INDEX: u32 = 4;
const DMA_IOVA: u64 = 0x4000_0000;

/// The subtests with `--req off`, in the order they are reported (`*`: the buffer's size and
/// IOVA; a step that fails is reported under its short name and ends the run).
const RELEASE: &[&str] = &[
    "bind vfio-pci|open the vfio device|open the vfio device, BAR0 ID reads back",
    "map a DMA buffer|map a * KiB DMA buffer at IOVA *",
    "unmap, close and unbind",
];

/// The subtests with `--req release` or `ignore`: the device is held, not released, and the
/// last one says whether the device request came.
const HOLD: &[&str] = &[
    RELEASE[0],
    RELEASE[1],
    "watch the device request eventfd|a device request arrived|the device request arrived after * ms; released the device",
];

pub fn run(ids: DeviceIds, o: VfioUserOptions) -> i32 {
    let parsed = (|| -> Result<_, String> {
        let kib = usize::try_from(o.dma_kib.unwrap_or(16))
            .map_err(|_| "--dma-kib: too large".to_string())?;
        let req = o.req.unwrap_or(ReqMode::Off).word().to_string();
        let wait = o.wait_s.unwrap_or(120);
        let (func, _) = pci::select_function(ids.vendor, ids.device, o.bdf.as_deref())?;
        Ok((func, kib, req, o.ready_file, wait))
    })();
    let (func, kib, req, ready, wait) = match parsed {
        Ok(p) => p,
        Err(e) => return setup_failure(&e),
    };
    let mut k = Ktap::declared(if req == "off" { RELEASE } else { HOLD });
    let mut b = Binding::default();
    if let Err(e) = bind(&func, &mut b, &mut k) {
        k.result("bind vfio-pci", Outcome::Fail(e));
        let _ = release(&func, &b, None, false);
        return k.finish();
    }
    let v = match open_enabled(&func, &b, &mut k) {
        Ok(v) => v,
        Err(e) => {
            k.result("open the vfio device", Outcome::Fail(e));
            return k.finish();
        }
    };
    k.result("open the vfio device, BAR0 ID reads back", Outcome::Pass);
    let mut buf = match DmaBuffer::map(&v.container, DMA_IOVA, kib * 1024) {
        Ok(buf) => buf,
        Err(e) => {
            k.result("map a DMA buffer", Outcome::Fail(e));
            let _ = release(&func, &b, Some(v), false);
            return k.finish();
        }
    };
    let _ = buf.fill(0, buf.len(), 0x5a);
    k.result(
        &format!("map a {kib} KiB DMA buffer at IOVA {DMA_IOVA:#x}"),
        Outcome::Pass,
    );
    if req == "off" {
        let r = buf.unmap(&v.container).and_then(|_| {
            drop(buf);
            release(&func, &b, Some(v), false)
        });
        k.check("unmap, close and unbind", r);
        return k.finish();
    }
    let mut efd = match sys::eventfd().and_then(|f| {
        v.device
            .set_irqs_eventfds(VFIO_PCI_REQ_IRQ_INDEX, 0, &[f.as_raw_fd()])?;
        Ok(f)
    }) {
        Ok(f) => f,
        Err(e) => {
            k.result("watch the device request eventfd", Outcome::Fail(e));
            return k.finish();
        }
    };
    if let Some(path) = &ready {
        if let Err(e) = std::fs::write(path, "ready\n") {
            k.diag(&format!("cannot write {path}: {e}"));
        }
    }
    k.diag(&format!(
        "holding {} (pid {}), watching the REQ eventfd ({req})",
        func.bdf,
        std::process::id()
    ));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(wait);
    let mut requests = 0u64;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match sys::wait_readable(efd.as_fd(), left.min(Duration::from_secs(1))) {
            Ok(true) => {
                let n = sys::eventfd_take(&mut efd).unwrap_or(0);
                requests += n;
                k.diag(&format!(
                    "REQ fired (count {n}) {} ms after ready",
                    t0.elapsed().as_millis()
                ));
                if req == "release" {
                    break;
                }
            }
            Ok(false) => {}
            Err(e) => {
                k.diag(&e);
                break;
            }
        }
    }
    if req == "release" && requests > 0 {
        // The device is going away: close it, no unbind (vfio-pci's remove is waiting).
        let _ = v.device.disable_irqs(VFIO_PCI_REQ_IRQ_INDEX);
        drop(buf);
        drop(efd);
        drop(v);
        k.result(
            &format!(
                "the device request arrived after {} ms; released the device",
                t0.elapsed().as_millis()
            ),
            Outcome::Pass,
        );
    } else {
        k.result(
            "a device request arrived",
            if requests > 0 {
                Outcome::Pass
            } else {
                Outcome::Fail(format!("none within {wait} s"))
            },
        );
    }
    k.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ktap::declared_name_matches;

    #[test]
    fn the_pass_path_names_are_declared() {
        let map = format!("map a 16 KiB DMA buffer at IOVA {DMA_IOVA:#x}");
        let released = "the device request arrived after 812 ms; released the device";
        for (plan, last) in [
            (RELEASE, "unmap, close and unbind"),
            (HOLD, released),
            (HOLD, "a device request arrived"),
        ] {
            let names = ["open the vfio device, BAR0 ID reads back", &map, last];
            assert_eq!(plan.len(), names.len());
            for (d, n) in plan.iter().zip(names) {
                assert!(declared_name_matches(d, n), "{d:?} {n:?}");
            }
        }
        assert!(!declared_name_matches(HOLD[2], "unmap, close and unbind"));
    }
}
