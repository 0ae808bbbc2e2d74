//! INTx is a level-triggered, automasked interrupt (PCI Local Bus 3.0 §6.2.2,
//! `VFIO_IRQ_INFO_AUTOMASKED`): signalled when the line rises, masked by the device, signalled
//! again on the client's UNMASK while the line is still asserted; Status.Interrupt follows the
//! line; INTx Emulation Disable holds the message back. Through the real server and the rust-vmm
//! client, as QEMU drives it under TCG (SET_IRQS UNMASK messages).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use pcisim_pci::caps::pcie::PcieConfig;
use pcisim_pci::{Bar, Bus, EndpointBuilder, FunctionCtx, Identity, PciFunction, ResetKind};
use pcisim_vfio_user::{irq_index, region, Server, ServerOptions};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

/// BAR0+0: writing 1 asserts INTx, 0 deasserts it.
#[derive(Default)]
struct Line {
    bus: Option<Bus>,
}

impl PciFunction for Line {
    fn bar_read(&mut self, _: &mut FunctionCtx<'_>, _: u32, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn bar_write(&mut self, ctx: &mut FunctionCtx<'_>, _: u32, offset: u64, data: &[u8]) {
        if offset == 0 {
            ctx.bus().set_intx(data.first().copied().unwrap_or(0) != 0);
        }
    }
    fn reset(&mut self, _: ResetKind) {}
    fn attach_bus(&mut self, bus: Bus) {
        self.bus = Some(bus);
    }
}

fn start() -> (TempDir, std::path::PathBuf) {
    let dir = TempDir::new_with_prefix("/tmp/pcisim-intx").unwrap();
    let path = dir.as_path().join("dev.sock");
    let id = Identity {
        vendor_id: 0x1234,
        device_id: 0x0002,
        class_code: 0x12_0000,
        revision: 1,
        subsystem_vendor_id: 0x1234,
        subsystem_id: 1,
    };
    let ep = EndpointBuilder::new("intx", id)
        .bar(0, Bar::mem32(0x1000))
        .pcie(PcieConfig::default())
        .build(Line::default())
        .unwrap();
    let server = Server::bind(&path, Arc::new(Mutex::new(ep)), ServerOptions::default()).unwrap();
    std::thread::spawn(move || server.run());
    (dir, path)
}

fn command(c: &mut vfio_user::Client, v: u16) {
    c.region_write(region::CONFIG, 4, &v.to_le_bytes()).unwrap();
}

fn status(c: &mut vfio_user::Client) -> u16 {
    let mut b = [0u8; 2];
    c.region_read(region::CONFIG, 6, &mut b).unwrap();
    u16::from_le_bytes(b)
}

fn line(c: &mut vfio_user::Client, up: bool) {
    c.region_write(0, 0, &[u8::from(up), 0, 0, 0]).unwrap();
}

fn unmask(c: &mut vfio_user::Client) {
    c.set_irqs(
        irq_index::INTX,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
        0,
        1,
        &[],
    )
    .unwrap();
}

fn setup() -> (TempDir, vfio_user::Client, EventFd) {
    let (dir, path) = start();
    let mut c = vfio_user::Client::new(&path).unwrap();
    let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    c.set_irqs(
        irq_index::INTX,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[efd.as_raw_fd()],
    )
    .unwrap();
    command(&mut c, 0x0002); // memory space on; INTx needs no bus mastering
    (dir, c, efd)
}

#[test]
fn test_intx_rising_line_signals_once_then_automasked() {
    let (_d, mut c, efd) = setup();
    line(&mut c, true);
    assert_eq!(efd.read().unwrap(), 1);
    assert_ne!(
        status(&mut c) & (1 << 3),
        0,
        "Status.Interrupt follows the line"
    );
    line(&mut c, false);
    line(&mut c, true);
    assert!(
        efd.read().is_err(),
        "automasked: no second message before UNMASK"
    );
}

#[test]
fn test_intx_unmask_with_line_asserted_signals_again() {
    let (_d, mut c, efd) = setup();
    line(&mut c, true);
    assert_eq!(efd.read().unwrap(), 1);
    unmask(&mut c);
    assert_eq!(efd.read().unwrap(), 1, "level still asserted at unmask");
    line(&mut c, false);
    assert_eq!(status(&mut c) & (1 << 3), 0, "deasserted");
    unmask(&mut c);
    assert!(efd.read().is_err(), "nothing asserted, nothing signalled");
}

#[test]
fn test_intx_disable_holds_message_until_cleared() {
    let (_d, mut c, efd) = setup();
    command(&mut c, 0x0402); // INTx Emulation Disable
    line(&mut c, true);
    assert!(efd.read().is_err(), "held back by INTx Disable");
    assert_ne!(status(&mut c) & (1 << 3), 0, "but Status.Interrupt is set");
    command(&mut c, 0x0002);
    assert_eq!(efd.read().unwrap(), 1, "sent once INTx Disable is cleared");
}
