//! MSI-X delivery rule (crate `msix` docs) with real eventfds bound through the real server's
//! SET_IRQS: a bound eventfd is an enabled, unmasked vector; otherwise the PBA bit is set, and
//! pending vectors are delivered when the client binds them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use pcisim_pci::caps::msix::MsixConfig;
use pcisim_pci::caps::pcie::PcieConfig;
use pcisim_pci::{
    Bar, EndpointBuilder, FunctionCtx, Identity, MsixOutcome, PciFunction, ResetKind,
};
use pcisim_vfio_user::{irq_index, Server, ServerOptions};
use vfio_bindings::bindings::vfio::{VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

/// Writing `v` at BAR0+0 raises vector `v`; BAR0+4 reads back the outcome (0 delivered,
/// 1 pending, 2 invalid).
struct Doorbell {
    last: u32,
}

impl PciFunction for Doorbell {
    fn bar_read(&mut self, _: &mut FunctionCtx<'_>, _: u32, offset: u64, data: &mut [u8]) {
        let v = if offset == 4 { self.last } else { 0 };
        data.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (v >> (8 * i)) as u8);
    }

    fn bar_write(&mut self, ctx: &mut FunctionCtx<'_>, _: u32, offset: u64, data: &[u8]) {
        if offset == 0 {
            let v = data.first().copied().unwrap_or(0);
            self.last = match ctx.raise_msix(u16::from(v)) {
                MsixOutcome::Delivered => 0,
                MsixOutcome::Pending => 1,
                MsixOutcome::InvalidVector => 2,
                MsixOutcome::Refused => 3,
            };
        }
    }

    fn reset(&mut self, _: ResetKind) {
        self.last = 0;
    }
}

fn start() -> (TempDir, std::path::PathBuf) {
    let dir = TempDir::new_with_prefix("/tmp/pcisim-msix").unwrap();
    let path = dir.as_path().join("dev.sock");
    let id = Identity {
        vendor_id: 0x1234,
        device_id: 0x0001,
        class_code: 0x12_0000,
        revision: 1,
        subsystem_vendor_id: 0x1234,
        subsystem_id: 1,
    };
    let ep = EndpointBuilder::new("msix", id)
        .bar(0, Bar::mem32(0x2000))
        .msix(MsixConfig {
            vectors: 4,
            table_bar: 0,
            table_offset: 0x1000,
            pba_bar: 0,
            pba_offset: 0x1800,
        })
        .pcie(PcieConfig::default())
        .build(Doorbell { last: 0 })
        .unwrap();
    let server = Server::bind(&path, Arc::new(Mutex::new(ep)), ServerOptions::default()).unwrap();
    std::thread::spawn(move || server.run());
    (dir, path)
}

fn bind(c: &mut vfio_user::Client, vector: u32, efd: Option<&EventFd>) {
    let fds: Vec<i32> = efd.map(|e| e.as_raw_fd()).into_iter().collect();
    c.set_irqs(
        irq_index::MSIX,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        vector,
        1,
        &fds,
    )
    .unwrap();
}

/// Memory Space and Bus Master on, as a driver sets them.
fn enable(c: &mut vfio_user::Client) {
    let mut b = [0u8; 2];
    c.region_read(7, 4, &mut b).unwrap();
    let cmd = u16::from_le_bytes(b) | 0x6;
    c.region_write(7, 4, &cmd.to_le_bytes()).unwrap();
}

fn raise(c: &mut vfio_user::Client, v: u8) -> u32 {
    enable(c);
    c.region_write(0, 0, &[v, 0, 0, 0]).unwrap();
    let mut b = [0u8; 4];
    c.region_read(0, 4, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn pba(c: &mut vfio_user::Client) -> u64 {
    enable(c);
    let mut b = [0u8; 8];
    c.region_read(0, 0x1800, &mut b).unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn test_msix_bound_vector_delivered_unbound_pending_bind_delivers() {
    let (_dir, path) = start();
    let mut c = vfio_user::Client::new(&path).unwrap();
    let e1 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let e2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    bind(&mut c, 1, Some(&e1));

    assert_eq!(raise(&mut c, 1), 0, "bound: delivered");
    assert_eq!(e1.read().unwrap(), 1);
    assert_eq!(pba(&mut c), 0);

    assert_eq!(raise(&mut c, 2), 1, "unbound: pending");
    assert_eq!(raise(&mut c, 2), 1);
    assert_eq!(pba(&mut c), 1 << 2);

    bind(&mut c, 2, Some(&e2));
    assert_eq!(
        e2.read().unwrap(),
        1,
        "pending vector delivered once on bind"
    );
    assert_eq!(pba(&mut c), 0);

    bind(&mut c, 1, None);
    assert_eq!(raise(&mut c, 1), 1, "de-assigned: pending");
    assert!(e1.read().is_err());
    assert_eq!(pba(&mut c), 1 << 1);

    assert_eq!(raise(&mut c, 4), 2, "vector out of range");
}

#[test]
fn test_msix_pending_bit_not_delivered_to_other_vector_binding() {
    let (_dir, path) = start();
    let mut c = vfio_user::Client::new(&path).unwrap();
    assert_eq!(raise(&mut c, 3), 1);
    let e0 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    bind(&mut c, 0, Some(&e0));
    assert!(
        e0.read().is_err(),
        "binding vector 0 does not deliver vector 3"
    );
    assert_eq!(pba(&mut c), 1 << 3);
}
