//! `reset-hot`: `VFIO_DEVICE_PCI_HOT_RESET` on a two-function slot (R7).
//!
//! A hot reset is a bus or slot reset, so it resets every function behind the bridge; vfio-pci
//! allows it only if the caller owns all of them (every affected device bound to vfio-pci, in
//! the dev_set, and in a group the caller passes). The program binds function 0 alone to
//! vfio-pci and opens it: `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` lists both functions, and the
//! hot reset is refused (the errno is reported). Then it binds function 1 too, opens it (the
//! same group or its own, in the same container), dirties both functions' registers, raises
//! vector 2 on both, and the hot reset with every group succeeds: both functions' registers are
//! back at their defaults, config space restored (memory and bus mastering on), and vector 3
//! fires on both.
//!
//! The functions may be GPUs or NPUs (told apart by BAR0's ID register; `--peer-vendor` and
//! `--peer-device` name function 1's IDs when they differ from function 0's). A GPU raises a
//! vector through its IRQ_DOORBELL; an NPU through its command mailbox: CMD_IRQ routed to the
//! vector and an INVALIDATE, whose completion raises it.

use crate::e1::setup_failure;
use crate::gpu;
use crate::ktap::{all_ok, Ktap, Outcome};
use crate::npu;
use crate::pci;
use crate::reset::{check_dirty_state, dirty_set};
use crate::sys;
use crate::vdev::{
    bind, open_vfio, release, Binding, PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY,
};
use crate::vfio::{self, Container, Device, Group, RegionInfo};
use pcisim_guest_wire::{DeviceIds, ResetHotOptions};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

const MARK_BEFORE: u32 = 2;
const MARK_AFTER: u32 = 3;
const VECTORS: [u32; 2] = [MARK_BEFORE, MARK_AFTER];
const IRQ_TIMEOUT: Duration = Duration::from_secs(5);

/// What a function is (its BAR0 ID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gpu,
    Npu,
}

/// One opened function.
struct Dev {
    bdf: String,
    kind: Kind,
    device: Device,
    bar0: RegionInfo,
    config: RegionInfo,
    fds: BTreeMap<u32, File>,
}

impl Dev {
    fn new(bdf: &str, device: Device) -> Result<Dev, String> {
        let bar0 = device.region_info(vfio::VFIO_PCI_BAR0_REGION_INDEX)?;
        let config = device.region_info(vfio::VFIO_PCI_CONFIG_REGION_INDEX)?;
        Ok(Dev {
            bdf: bdf.to_string(),
            kind: Kind::Gpu,
            device,
            bar0,
            config,
            fds: BTreeMap::new(),
        })
    }

    fn rd(&self, off: u64) -> Result<u32, String> {
        self.device.read_u32(&self.bar0, off)
    }

    fn wr(&self, off: u64, v: u32) -> Result<(), String> {
        self.device.write_u32(&self.bar0, off, v)
    }

    fn command(&self) -> Result<u16, String> {
        self.device.read_u16(&self.config, PCI_COMMAND)
    }

    /// Memory and bus mastering on, eventfds on the marker vectors.
    fn enable(&mut self) -> Result<(), String> {
        let c = self.command()?;
        self.device.write_u16(
            &self.config,
            PCI_COMMAND,
            c | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER,
        )?;
        self.kind = match self.rd(gpu::ID)? {
            gpu::ID_MAGIC => Kind::Gpu,
            npu::ID_MAGIC => Kind::Npu,
            id => return Err(format!("{}: BAR0 ID 0x{id:08x}", self.bdf)),
        };
        let max = VECTORS.iter().copied().max().unwrap_or(0);
        for &v in &VECTORS {
            self.fds.insert(v, sys::eventfd()?);
        }
        let raw: Vec<i32> = (0..=max)
            .map(|i| self.fds.get(&i).map_or(-1, |f| f.as_raw_fd()))
            .collect();
        self.device
            .set_irqs_eventfds(vfio::VFIO_PCI_MSIX_IRQ_INDEX, 0, &raw)
    }

    /// Raises `vector` (GPU: the IRQ doorbell; NPU: a mailbox command with CMD_IRQ routed to
    /// it); its eventfd must fire.
    fn ring(&mut self, vector: u32) -> Result<u128, String> {
        for f in self.fds.values_mut() {
            sys::eventfd_take(f)?;
        }
        let t0 = Instant::now();
        match self.kind {
            Kind::Gpu => self.wr(gpu::IRQ_DOORBELL, vector)?,
            Kind::Npu => {
                for (off, v) in npu::irq_writes(vector) {
                    self.wr(off, v)?;
                }
            }
        }
        let f = self
            .fds
            .get_mut(&vector)
            .ok_or_else(|| format!("no eventfd for vector {vector}"))?;
        if !sys::wait_readable(f.as_fd(), IRQ_TIMEOUT)? {
            return Err(match self.kind {
                Kind::Gpu => format!(
                    "{}: vector {vector} did not fire (IRQ_LAST_ERROR {})",
                    self.bdf,
                    self.rd(gpu::IRQ_LAST_ERROR)?
                ),
                Kind::Npu => format!(
                    "{}: vector {vector} did not fire (CMD_STATUS 0x{:x}, CMD_SEQ {})",
                    self.bdf,
                    self.rd(npu::CMD_STATUS)?,
                    self.rd(npu::CMD_SEQ)?
                ),
            });
        }
        sys::eventfd_take(f)?;
        if self.kind == Kind::Npu {
            let st = self.rd(npu::CMD_STATUS)?;
            if st & (npu::CMD_BUSY | 0xff) != 0 {
                return Err(format!(
                    "{}: INVALIDATE ended with CMD_STATUS 0x{st:x}",
                    self.bdf
                ));
            }
        }
        Ok(t0.elapsed().as_micros())
    }

    fn dirty(&self) -> Result<(), String> {
        match self.kind {
            Kind::Gpu => {
                for (off, v, _) in dirty_set() {
                    self.wr(off, v)?;
                }
                check_dirty_state(false, |off| self.rd(off))
            }
            Kind::Npu => {
                for (off, v) in npu::dirty_set() {
                    self.wr(off, v)?;
                }
                npu::check_dirty_state(false, |off| self.rd(off))
            }
        }
    }

    /// The dirtied registers are back at their defaults.
    fn check_cleared(&self) -> Result<(), String> {
        match self.kind {
            Kind::Gpu => check_dirty_state(true, |off| self.rd(off)),
            Kind::Npu => npu::check_dirty_state(true, |off| self.rd(off)),
        }
    }

    fn close(self) {
        if !self.fds.is_empty() {
            let _ = self.device.disable_irqs(vfio::VFIO_PCI_MSIX_IRQ_INDEX);
        }
    }
}

fn group_of(b: &Binding) -> Result<String, String> {
    b.group.clone().ok_or_else(|| "no iommu group".to_string())
}

/// The subtests, in the order they are reported.
const SUBTESTS: &[&str] = &[
    "own-function-0",
    "hot-reset-info",
    "refused-one-owned",
    "own-function-1",
    "hot-reset-both-owned",
    "both-reset",
    "irq-after",
    "release",
];

pub fn run(ids: DeviceIds, o: ResetHotOptions) -> i32 {
    let prepared = (|| -> Result<_, String> {
        let peer_vendor = o.peer_vendor.unwrap_or(ids.vendor);
        let peer_device = o.peer_device.unwrap_or(ids.device);
        let (f0, _) = pci::select_function(ids.vendor, ids.device, Some(&o.bdf))?;
        let (f1, _) = pci::select_function(peer_vendor, peer_device, Some(&o.peer))?;
        for f in [&f0, &f1] {
            if let Some(d) = f.driver() {
                return Err(format!(
                    "{} is bound to {d}; the test needs it unbound",
                    f.bdf
                ));
            }
        }
        Ok((f0, f1))
    })();
    let (f0, f1) = match prepared {
        Ok(p) => p,
        Err(e) => return setup_failure(&e),
    };
    let mut k = Ktap::declared(SUBTESTS);
    k.diag(&format!(
        "VFIO_DEVICE_PCI_HOT_RESET on the slot of {} and {}",
        f0.bdf, f1.bdf
    ));
    let mut b0 = Binding::default();
    let mut b1 = Binding::default();
    let mut opened: Option<(Container, Group, Dev)> = None;
    let mut second: Option<(Option<Group>, Dev)> = None;

    // 1. Function 0 alone.
    let r = bind(&f0, &mut b0, &mut k)
        .and_then(|()| open_vfio(&f0.bdf, &group_of(&b0)?, &mut k))
        .and_then(|v| {
            let mut d = Dev::new(&f0.bdf, v.device)?;
            d.enable()?;
            opened = Some((v.container, v.group, d));
            Ok(())
        });
    let one = k.check("own-function-0", r);

    // 2. The affected devices, and the refusal while function 1 is not ours.
    match &opened {
        Some((_, group, d)) => {
            let r = d.device.hot_reset_info().and_then(|list| {
                let names: Vec<String> = list
                    .iter()
                    .map(|x| format!("{} (group {})", x.bdf(), x.group_id))
                    .collect();
                k.diag(&format!("hot reset affects: {}", names.join(", ")));
                let bdfs: Vec<String> = list.iter().map(|x| x.bdf()).collect();
                if bdfs.contains(&f0.bdf) && bdfs.contains(&f1.bdf) {
                    Ok(())
                } else {
                    Err(format!("{bdfs:?} does not list both functions"))
                }
            });
            k.check("hot-reset-info", r);
            let r = match d.device.hot_reset(&[group.as_raw_fd()]) {
                Ok(()) => Err("the hot reset succeeded with function 1 not owned".to_string()),
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(0);
                    k.diag(&format!(
                        "refused while {} is not bound to vfio-pci: {e} (errno {errno})",
                        f1.bdf
                    ));
                    if errno == libc::EINVAL {
                        Ok(())
                    } else {
                        Err(format!("refused with errno {errno}, expected EINVAL (22)"))
                    }
                }
            };
            k.check("refused-one-owned", r);
        }
        None => {
            k.result(
                "hot-reset-info",
                Outcome::Skip("own-function-0 failed".into()),
            );
            k.result(
                "refused-one-owned",
                Outcome::Skip("own-function-0 failed".into()),
            );
        }
    }

    // 3. Function 1 too: its own group in the same container, or the same group.
    if let Some((container, group0, _)) = opened.as_ref().filter(|_| one) {
        let r = bind(&f1, &mut b1, &mut k).and_then(|()| {
            let g1 = group_of(&b1)?;
            let same = b0.group.as_deref() == Some(g1.as_str());
            k.diag(&format!(
                "{} in iommu group {g1}: {} group as {}",
                f1.bdf,
                if same { "the same" } else { "another" },
                f0.bdf
            ));
            let (g, device) = if same {
                (None, group0.device(&f1.bdf)?)
            } else {
                let g = Group::open(&format!("/dev/vfio/{g1}"))?;
                g.set_container(container)?;
                let device = g.device(&f1.bdf)?;
                (Some(g), device)
            };
            let mut d = Dev::new(&f1.bdf, device)?;
            d.enable()?;
            second = Some((g, d));
            Ok(())
        });
        k.check("own-function-1", r);
    } else {
        k.result(
            "own-function-1",
            Outcome::Skip("own-function-0 failed".into()),
        );
    }

    // 4. The hot reset with both owned.
    match (&mut opened, &mut second) {
        (Some((_, group0, d0)), Some((g1, d1))) => {
            let r = (|| -> Result<(), String> {
                d0.dirty()?;
                d1.dirty()?;
                d0.ring(MARK_BEFORE)?;
                d1.ring(MARK_BEFORE)?;
                let mut fds = vec![group0.as_raw_fd()];
                if let Some(g) = g1.as_ref() {
                    fds.push(g.as_raw_fd());
                }
                let t0 = Instant::now();
                d0.device
                    .hot_reset(&fds)
                    .map_err(|e| format!("VFIO_DEVICE_PCI_HOT_RESET: {e}"))?;
                k.diag(&format!(
                    "latency_ms hot-reset {:.1}",
                    t0.elapsed().as_secs_f64() * 1000.0
                ));
                Ok(())
            })();
            let reset_ok = k.check("hot-reset-both-owned", r);
            let r = [&*d0, &*d1]
                .iter()
                .map(|d| {
                    d.check_cleared()
                        .map_err(|e| format!("{}: {e}", d.bdf))
                        .and_then(|()| {
                            let c = d.command()?;
                            let want = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
                            if c & want == want {
                                Ok(())
                            } else {
                                Err(format!("{}: Command 0x{c:04x} not restored", d.bdf))
                            }
                        })
                })
                .collect::<Result<Vec<()>, String>>()
                .map(|_| ());
            k.check(
                "both-reset",
                if reset_ok { r } else { Err("no reset".into()) },
            );
            let r = d0.ring(MARK_AFTER).and_then(|a| {
                let b = d1.ring(MARK_AFTER)?;
                k.diag(&format!(
                    "vector {MARK_AFTER} after the reset: {a} us and {b} us"
                ));
                Ok(())
            });
            k.check("irq-after", r);
        }
        _ => {
            for n in ["hot-reset-both-owned", "both-reset", "irq-after"] {
                k.result(n, Outcome::Skip("owning both functions failed".into()));
            }
        }
    }

    // Release: function 1's device (and group), then function 0's, then unbind both.
    let mut errs = Vec::new();
    if let Some((g1, d1)) = second.take() {
        d1.close();
        if let Some(g) = g1 {
            if let Err(e) = g.unset_container() {
                errs.push(e);
            }
        }
    }
    if let Some((container, group, d0)) = opened.take() {
        d0.close();
        if let Err(e) = group.unset_container() {
            errs.push(e);
        }
        drop(group);
        drop(container);
    }
    for (f, b) in [(&f1, &b1), (&f0, &b0)] {
        if b.override_written {
            if let Err(e) = release(f, b, None, false) {
                errs.push(e);
            }
        }
    }
    k.check("release", all_ok(errs));
    k.finish()
}
