//! MSI delivery (PCI Local Bus 3.0 §6.8.3, `caps::msi` docs) with real eventfds bound through the
//! real server's SET_IRQS on `VFIO_PCI_MSI_IRQ_INDEX`, driven the way QEMU drives it: the guest's
//! config writes to the MSI capability are forwarded to the function, then QEMU binds 2^MME
//! eventfds when MSI is enabled and unbinds them all (count 0) when it is disabled.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use pcisim_journal::{Event, InterruptOutcome, Journal, MessageKind, Refusal};
use pcisim_pci::caps::msi::{self, MsiConfig};
use pcisim_pci::caps::pcie::PcieConfig;
use pcisim_pci::{
    Bar, EndpointBuilder, FunctionCtx, Identity, MsixOutcome, PciFunction, ResetKind,
};
use pcisim_vfio_user::{irq_index, region, Server, ServerOptions};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_NORESIZE, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

/// The MSI capability is the first one: at 0x40.
const MSI: u64 = 0x40;
/// Vectors the function requests.
const VECTORS: u8 = 8;

/// Writing `v` at BAR0+0 raises vector `v` (through `raise_msix`, which raises MSI for a
/// function without MSI-X, as the GPU's engine does); BAR0+4 reads back the outcome (0
/// delivered, 1 pending, 2 invalid, 3 refused).
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

fn start(per_vector_mask: bool) -> (TempDir, std::path::PathBuf, Journal) {
    let dir = TempDir::new_with_prefix("/tmp/pcisim-msi").unwrap();
    let path = dir.as_path().join("dev.sock");
    let id = Identity {
        vendor_id: 0x1234,
        device_id: 0x0003,
        class_code: 0x12_0000,
        revision: 1,
        subsystem_vendor_id: 0x1234,
        subsystem_id: 1,
    };
    let ep = EndpointBuilder::new("msi", id)
        .bar(0, Bar::mem32(0x1000))
        .msi(MsiConfig {
            vectors: VECTORS,
            per_vector_mask,
        })
        .pcie(PcieConfig::default())
        .build(Doorbell { last: 0 })
        .unwrap();
    assert_eq!(ep.cap_offsets().msi.map(|o| u64::from(o.0)), Some(MSI));
    let journal = ep.journal().clone();
    let server = Server::bind(&path, Arc::new(Mutex::new(ep)), ServerOptions::default()).unwrap();
    std::thread::spawn(move || server.run());
    (dir, path, journal)
}

fn cfg_write(c: &mut vfio_user::Client, offset: u64, data: &[u8]) {
    c.region_write(region::CONFIG, offset, data).unwrap();
}

fn cfg_read32(c: &mut vfio_user::Client, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(region::CONFIG, offset, &mut b).unwrap();
    u32::from_le_bytes(b)
}

/// The Command register (Memory Space 0x2, Bus Master 0x4).
fn command(c: &mut vfio_user::Client, v: u16) {
    cfg_write(c, 4, &v.to_le_bytes());
}

/// What the guest writes to enable MSI with 2^mme vectors (address and data first).
fn msi_enable(c: &mut vfio_user::Client, mme: u16) {
    cfg_write(
        c,
        MSI + u64::from(msi::MESSAGE_ADDRESS),
        &0xfee0_0000u32.to_le_bytes(),
    );
    cfg_write(c, MSI + u64::from(msi::MESSAGE_UPPER_ADDRESS), &[0; 4]);
    cfg_write(
        c,
        MSI + u64::from(msi::MESSAGE_DATA),
        &0x4041u16.to_le_bytes(),
    );
    cfg_write(
        c,
        MSI + u64::from(msi::MESSAGE_CONTROL),
        &(1 | (mme << 4)).to_le_bytes(),
    );
}

fn msi_disable(c: &mut vfio_user::Client) {
    cfg_write(
        c,
        MSI + u64::from(msi::MESSAGE_CONTROL),
        &0u16.to_le_bytes(),
    );
}

/// QEMU's `vfio_enable_vectors`: one SET_IRQS binding every allocated vector.
fn bind_all(c: &mut vfio_user::Client, efds: &[EventFd]) {
    let fds: Vec<i32> = efds.iter().map(|e| e.as_raw_fd()).collect();
    c.set_irqs(
        irq_index::MSI,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        fds.len() as u32,
        &fds,
    )
    .unwrap();
}

/// QEMU's `vfio_disable_irqindex`: TRIGGER with DATA_NONE and count 0 unbinds the index.
fn unbind_all(c: &mut vfio_user::Client) {
    c.set_irqs(
        irq_index::MSI,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        0,
        &[],
    )
    .unwrap();
}

fn raise(c: &mut vfio_user::Client, v: u8) -> u32 {
    c.region_write(0, 0, &[v, 0, 0, 0]).unwrap();
    let mut b = [0u8; 4];
    c.region_read(0, 4, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn eventfds(n: usize) -> Vec<EventFd> {
    (0..n)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect()
}

/// How many times each eventfd fired since the last call (0 for none).
fn fired(efds: &[EventFd]) -> Vec<u64> {
    efds.iter().map(|e| e.read().unwrap_or(0)).collect()
}

fn outcomes(journal: &Journal) -> Vec<(u16, InterruptOutcome)> {
    journal
        .since(0)
        .0
        .iter()
        .filter_map(|r| match &r.event {
            Event::Interrupt { vector, outcome } => Some((*vector, outcome.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn test_msi_irq_info_reports_the_requested_vectors() {
    let (_d, path, _j) = start(false);
    let mut c = vfio_user::Client::new(&path).unwrap();
    let info = c.get_irq_info(irq_index::MSI).unwrap();
    assert_eq!(info.count, u32::from(VECTORS));
    assert_eq!(
        info.flags,
        VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
        "like vfio-pci's MSI"
    );
    assert_eq!(c.get_irq_info(irq_index::MSIX).unwrap().count, 0);
    let mc = cfg_read32(&mut c, MSI);
    assert_eq!(mc & 0xff, 0x05, "MSI capability ID");
    assert_eq!((mc >> 17) & 7, 3, "Multiple Message Capable: 8 vectors");
}

#[test]
fn test_msi_enabled_bound_vectors_delivered_folded_into_allocated() {
    let (_d, path, journal) = start(false);
    let mut c = vfio_user::Client::new(&path).unwrap();
    command(&mut c, 0x6);
    msi_enable(&mut c, 2); // 4 of the 8 vectors allocated
    let efds = eventfds(4);
    bind_all(&mut c, &efds);

    assert_eq!(raise(&mut c, 1), 0, "delivered");
    assert_eq!(fired(&efds), [0, 1, 0, 0]);
    assert_eq!(raise(&mut c, 6), 0, "delivered as vector 6 mod 4");
    assert_eq!(fired(&efds), [0, 0, 1, 0]);
    assert_eq!(raise(&mut c, 8), 2, "beyond the requested vectors");
    assert_eq!(fired(&efds), [0; 4]);
    assert_eq!(
        outcomes(&journal),
        [
            (1, InterruptOutcome::Delivered),
            (6, InterruptOutcome::Delivered)
        ],
        "journaled as MSI-X interrupts are; the invalid vector is not an interrupt"
    );
}

#[test]
fn test_msi_raised_while_disabled_sent_once_when_enabled_and_bound() {
    let (_d, path, _j) = start(false);
    let mut c = vfio_user::Client::new(&path).unwrap();
    command(&mut c, 0x6);
    assert_eq!(raise(&mut c, 3), 1, "MSI disabled: pending");
    msi_enable(&mut c, 3);
    let efds = eventfds(8);
    assert_eq!(fired(&efds), [0; 8]);
    bind_all(&mut c, &efds);
    assert_eq!(
        fired(&efds),
        [0, 0, 0, 1, 0, 0, 0, 0],
        "sent once on SET_IRQS, as raised"
    );
    bind_all(&mut c, &efds);
    assert_eq!(fired(&efds), [0; 8], "not twice");

    // QEMU's disable: config write, then the index unbound.
    msi_disable(&mut c);
    unbind_all(&mut c);
    assert_eq!(raise(&mut c, 0), 1, "disabled again: pending");
    assert_eq!(fired(&efds), [0; 8]);
}

#[test]
fn test_msi_bus_master_off_refused_then_sent_when_it_is_set() {
    let (_d, path, journal) = start(false);
    let mut c = vfio_user::Client::new(&path).unwrap();
    command(&mut c, 0x2);
    msi_enable(&mut c, 0);
    let efds = eventfds(1);
    bind_all(&mut c, &efds);
    assert_eq!(raise(&mut c, 0), 3, "Bus Master off: refused");
    assert_eq!(fired(&efds), [0]);
    command(&mut c, 0x6);
    assert_eq!(fired(&efds), [1], "sent when Bus Master is set");
    assert_eq!(
        outcomes(&journal),
        [
            (0, InterruptOutcome::Refused(Refusal::BusMasterDisabled)),
            (0, InterruptOutcome::DeliveredAfterHold)
        ],
        "the held vector's delivery is an interrupt record like any other"
    );
    // Followed by the typed summary of what was sent: one MSI vector.
    let (recs, _) = journal.since(0);
    let held = recs
        .iter()
        .position(|r| {
            matches!(
                r.event,
                Event::Interrupt {
                    outcome: InterruptOutcome::DeliveredAfterHold,
                    ..
                }
            )
        })
        .unwrap();
    assert_eq!(
        recs[held + 1].event,
        Event::PendingDelivered {
            kind: MessageKind::Msi,
            count: 1
        }
    );
}

#[test]
fn test_msi_masked_vector_pending_bit_then_sent_on_unmask() {
    let (_d, path, _j) = start(true);
    let mut c = vfio_user::Client::new(&path).unwrap();
    command(&mut c, 0x6);
    msi_enable(&mut c, 3);
    let efds = eventfds(8);
    bind_all(&mut c, &efds);
    let mask = MSI + u64::from(msi::MASK_BITS);
    let pending = MSI + u64::from(msi::PENDING_BITS);
    cfg_write(&mut c, mask, &(1u32 << 5).to_le_bytes());
    assert_eq!(raise(&mut c, 5), 1, "masked: pending");
    assert_eq!(fired(&efds), [0; 8]);
    assert_eq!(cfg_read32(&mut c, pending), 1 << 5, "Pending Bits");
    cfg_write(&mut c, pending, &[0xff; 4]);
    assert_eq!(
        cfg_read32(&mut c, pending),
        1 << 5,
        "Pending Bits are read-only"
    );
    cfg_write(&mut c, mask, &0u32.to_le_bytes());
    assert_eq!(fired(&efds), [0, 0, 0, 0, 0, 1, 0, 0], "sent on unmask");
    assert_eq!(cfg_read32(&mut c, pending), 0);
}

#[test]
fn test_msi_reset_disables_and_clears_pending_keeps_bindings() {
    let (_d, path, _j) = start(false);
    let mut c = vfio_user::Client::new(&path).unwrap();
    command(&mut c, 0x6);
    msi_enable(&mut c, 0);
    let efds = eventfds(1);
    bind_all(&mut c, &efds);
    msi_disable(&mut c);
    assert_eq!(raise(&mut c, 0), 1);
    c.reset().unwrap();
    assert_eq!(cfg_read32(&mut c, MSI) >> 16 & 1, 0, "MSI Enable cleared");
    // The guest restores its config after the reset; nothing latched before it goes out.
    command(&mut c, 0x6);
    msi_enable(&mut c, 0);
    assert_eq!(fired(&efds), [0]);
    assert_eq!(raise(&mut c, 0), 0, "the binding survived the reset");
    assert_eq!(fired(&efds), [1]);
}
