//! GPU doorbell → MSI-X through the real vfio-user server, the rust-vmm client and real
//! eventfds: delivered when bound, pending in the PBA when not, delivered when bound later,
//! bindings kept across FLR.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pcisim_devices::gpu::{self, regs, GpuConfig, MSIX_PBA_OFFSET};
use pcisim_vfio_user::{irq_index, region, Server, ServerOptions};
use vfio_bindings::bindings::vfio::{VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

struct Harness {
    path: PathBuf,
    _dir: TempDir,
    pcie: u16,
}

fn start() -> Harness {
    let dir = TempDir::new_with_prefix("/tmp/pcisim-gpu").unwrap();
    let path = dir.as_path().join("gpu.sock");
    let ep = gpu::endpoint(&GpuConfig {
        vram_size: 1 << 20,
        ..GpuConfig::default()
    })
    .unwrap();
    let pcie = ep.cap_offsets().pcie.unwrap().0;
    let server = Server::bind(&path, Arc::new(Mutex::new(ep)), ServerOptions::default()).unwrap();
    std::thread::spawn(move || server.run());
    Harness {
        path,
        _dir: dir,
        pcie,
    }
}

const TRIGGER_EVENTFD: u32 = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;

fn bind(c: &mut vfio_user::Client, vector: u32, efd: Option<&EventFd>) {
    let fds: Vec<i32> = efd.map(|e| e.as_raw_fd()).into_iter().collect();
    c.set_irqs(irq_index::MSIX, TRIGGER_EVENTFD, vector, 1, &fds)
        .unwrap();
}

/// Memory Space and Bus Master on, as a driver sets them (again after every reset): BAR
/// accesses need decoding, and an MSI-X message is a memory write that needs bus mastering.
fn enable(c: &mut vfio_user::Client) {
    let mut b = [0u8; 2];
    c.region_read(region::CONFIG, 4, &mut b).unwrap();
    let cmd = u16::from_le_bytes(b);
    if cmd & 0x6 != 0x6 {
        c.region_write(region::CONFIG, 4, &(cmd | 0x6).to_le_bytes())
            .unwrap();
    }
}

fn rd(c: &mut vfio_user::Client, off: u64) -> u32 {
    enable(c);
    let mut b = [0u8; 4];
    c.region_read(0, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn wr(c: &mut vfio_user::Client, off: u64, v: u32) {
    enable(c);
    c.region_write(0, off, &v.to_le_bytes()).unwrap();
}

fn pba(c: &mut vfio_user::Client) -> u64 {
    enable(c);
    let mut b = [0u8; 8];
    c.region_read(0, u64::from(MSIX_PBA_OFFSET), &mut b)
        .unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn test_doorbell_bound_vector_signals_eventfd_and_counts() {
    let h = start();
    let mut c = vfio_user::Client::new(&h.path).unwrap();
    let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    bind(&mut c, 3, Some(&efd));
    wr(&mut c, regs::IRQ_DOORBELL, 3);
    assert_eq!(efd.read().unwrap(), 1);
    assert_eq!(rd(&mut c, regs::IRQ_LAST_ERROR), regs::IRQ_OK);
    assert_eq!(rd(&mut c, regs::IRQ_COUNT), 1);
    assert_eq!(pba(&mut c), 0);
}

#[test]
fn test_doorbell_unbound_vector_pending_then_delivered_on_bind() {
    let h = start();
    let mut c = vfio_user::Client::new(&h.path).unwrap();
    wr(&mut c, regs::IRQ_DOORBELL, 5);
    assert_eq!(rd(&mut c, regs::IRQ_LAST_ERROR), regs::IRQ_ERR_NOT_BOUND);
    assert_eq!(rd(&mut c, regs::IRQ_COUNT), 0);
    assert_eq!(pba(&mut c), 1 << 5);
    let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    bind(&mut c, 5, Some(&efd));
    assert_eq!(efd.read().unwrap(), 1, "pending vector delivered on bind");
    assert_eq!(pba(&mut c), 0, "pending bit cleared");
}

#[test]
fn test_doorbell_after_unbind_goes_to_pba() {
    let h = start();
    let mut c = vfio_user::Client::new(&h.path).unwrap();
    let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    bind(&mut c, 0, Some(&efd));
    bind(&mut c, 0, None);
    wr(&mut c, regs::IRQ_DOORBELL, 0);
    assert_eq!(rd(&mut c, regs::IRQ_LAST_ERROR), regs::IRQ_ERR_NOT_BOUND);
    assert!(efd.read().is_err(), "nothing signalled (EAGAIN)");
    assert_eq!(pba(&mut c), 1);
}

#[test]
fn test_flr_keeps_eventfd_bindings() {
    let h = start();
    let mut c = vfio_user::Client::new(&h.path).unwrap();
    let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    bind(&mut c, 15, Some(&efd));
    wr(&mut c, regs::SCRATCH, 0x55);
    let devctl = u64::from(h.pcie + pcisim_pci::caps::pcie::DEVCTL);
    c.region_write(region::CONFIG, devctl, &0x8000u16.to_le_bytes())
        .unwrap();
    assert_eq!(rd(&mut c, regs::SCRATCH), 0, "FLR reset the registers");
    wr(&mut c, regs::IRQ_DOORBELL, 15);
    assert_eq!(efd.read().unwrap(), 1, "binding survived the FLR");
}
