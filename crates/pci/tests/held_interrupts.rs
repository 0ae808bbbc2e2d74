//! Interrupts the function raised while it could not send them (D3hot, Bus Master clear), with
//! real eventfds bound through the real server's SET_IRQS: what a PM soft reset does to them,
//! what No_Soft_Reset=1 keeps, and how the journal records their later delivery.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use pcisim_journal::{Event, InterruptOutcome, Journal, Record};
use pcisim_pci::caps::msix::MsixConfig;
use pcisim_pci::caps::pcie::PcieConfig;
use pcisim_pci::caps::pm::{self, PmConfig};
use pcisim_pci::{
    Bar, Bus, EndpointBuilder, FunctionCtx, Identity, MsixOutcome, PciFunction, ResetKind,
};
use pcisim_vfio_user::{irq_index, Server, ServerOptions};
use vfio_bindings::bindings::vfio::{VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

/// A function with no registers of its own: the test raises its vectors through its bus, as an
/// engine thread would.
struct Quiet;

impl PciFunction for Quiet {
    fn bar_read(&mut self, _: &mut FunctionCtx<'_>, _: u32, _: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn bar_write(&mut self, _: &mut FunctionCtx<'_>, _: u32, _: u64, _: &[u8]) {}

    fn reset(&mut self, _: ResetKind) {}
}

const CONFIG: u32 = 7;
const PBA: u64 = 0x1800;
const VECTOR: u16 = 1;

struct Rig {
    _dir: TempDir,
    client: vfio_user::Client,
    bus: Bus,
    journal: Journal,
    pmcsr: u64,
    efd: EventFd,
}

fn start(no_soft_reset: bool) -> Rig {
    let dir = TempDir::new_with_prefix("/tmp/pcisim-held").unwrap();
    let path = dir.as_path().join("dev.sock");
    let id = Identity {
        vendor_id: 0x1234,
        device_id: 0x0001,
        class_code: 0x12_0000,
        revision: 1,
        subsystem_vendor_id: 0x1234,
        subsystem_id: 1,
    };
    let ep = EndpointBuilder::new("held", id)
        .bar(0, Bar::mem32(0x2000))
        .pm(PmConfig { no_soft_reset })
        .msix(MsixConfig {
            vectors: 4,
            table_bar: 0,
            table_offset: 0x1000,
            pba_bar: 0,
            pba_offset: PBA as u32,
        })
        .pcie(PcieConfig::default())
        .build(Quiet)
        .unwrap();
    let bus = ep.bus().clone();
    let journal = ep.journal().clone();
    let pmcsr = u64::from(ep.cap_offsets().pm.unwrap().reg(pm::PMCSR));
    let server = Server::bind(&path, Arc::new(Mutex::new(ep)), ServerOptions::default()).unwrap();
    std::thread::spawn(move || server.run());
    let mut client = vfio_user::Client::new(&path).unwrap();
    let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    client
        .set_irqs(
            irq_index::MSIX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            u32::from(VECTOR),
            1,
            &[efd.as_raw_fd()],
        )
        .unwrap();
    let mut rig = Rig {
        _dir: dir,
        client,
        bus,
        journal,
        pmcsr,
        efd,
    };
    rig.set_command(0x0006);
    rig
}

impl Rig {
    fn set_command(&mut self, v: u16) {
        self.client
            .region_write(CONFIG, 4, &v.to_le_bytes())
            .unwrap();
    }

    fn command(&mut self) -> u16 {
        let mut b = [0u8; 2];
        self.client.region_read(CONFIG, 4, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    fn set_power(&mut self, state: u16) {
        self.client
            .region_write(CONFIG, self.pmcsr, &state.to_le_bytes())
            .unwrap();
    }

    /// The function's own PBA, read by the test directly (a BAR read needs Memory Space on;
    /// it must not enable Bus Master, which would deliver what is pending).
    fn pending(&self) -> bool {
        self.bus
            .msix()
            .as_ref()
            .is_some_and(|m| m.is_pending(VECTOR))
    }

    /// The PBA as the client reads it through BAR0 (Memory Space on, Bus Master as it is).
    fn pba_read(&mut self) -> u64 {
        let cmd = self.command();
        self.set_command(cmd | 0x2);
        let mut b = [0u8; 8];
        self.client.region_read(0, PBA, &mut b).unwrap();
        u64::from_le_bytes(b)
    }

    /// Raise the vector while in D3hot: refused and held pending.
    fn hold_in_d3hot(&mut self) {
        self.set_power(3);
        assert_eq!(self.bus.raise_msix(VECTOR), MsixOutcome::Refused);
        assert!(self.pending(), "the refused vector is held in the PBA");
        assert!(self.efd.read().is_err(), "nothing signalled in D3hot");
    }

    fn records(&self) -> Vec<Record> {
        self.journal.since(0).0
    }
}

/// The journal index of the first record matching `f`.
fn position(recs: &[Record], f: impl Fn(&Event) -> bool) -> Option<usize> {
    recs.iter().position(|r| f(&r.event))
}

fn delivered(e: &Event) -> bool {
    matches!(e, Event::Interrupt { vector, outcome } if *vector == VECTOR
        && matches!(outcome, InterruptOutcome::Delivered | InterruptOutcome::DeliveredAfterHold))
}

/// PCI PM 1.2 §3.2.4 (PMCSR bit 3, No_Soft_Reset) and PCIe Base 6.0 §7.5.2.2: with
/// No_Soft_Reset clear a D3hot→D0 transition performs an internal reset and "Configuration
/// Context is lost"; the MSI-X Pending Bits are function state reset with it, as an FLR resets
/// them (§6.6.2). A vector held while in D3hot is therefore discarded, never sent on the way
/// through D0: no eventfd signal, no `delivered` interrupt record, PBA clear after the reset.
#[test]
fn test_pm_soft_reset_discards_vector_held_in_d3hot() {
    let mut rig = start(false);
    // The instrument: the bound vector is delivered while enabled.
    assert_eq!(rig.bus.raise_msix(VECTOR), MsixOutcome::Delivered);
    assert_eq!(rig.efd.read().unwrap(), 1);

    rig.hold_in_d3hot();
    rig.set_power(0);
    assert!(
        rig.efd.read().is_err(),
        "the soft reset must discard the held vector, not send it"
    );
    assert!(!rig.pending(), "PBA bit clear after the soft reset");
    assert_eq!(
        rig.command(),
        0,
        "the soft reset happened (Command cleared)"
    );
    // Re-enabled by the driver after the reset: still nothing to deliver.
    rig.set_command(0x0006);
    assert_eq!(rig.pba_read(), 0);
    assert!(rig.efd.read().is_err());

    let recs = rig.records();
    let d0 = position(&recs, |e| matches!(e, Event::Power { from: 3, to: 0 })).unwrap();
    let reset = position(&recs, |e| {
        matches!(
            e,
            Event::ResetBegin {
                kind: ResetKind::PmSoftReset
            }
        )
    })
    .unwrap();
    assert!(d0 < reset, "{recs:#?}");
    assert!(
        !recs[d0..].iter().any(|r| delivered(&r.event)),
        "no interrupt delivered after leaving D3hot: {recs:#?}"
    );
    assert_eq!(rig.journal.stats().violations, 0);
}

/// PCI PM 1.2 §3.2.4 / PCIe Base 6.0 §7.5.2.2: with No_Soft_Reset set the function keeps its
/// state across D3hot→D0 ("Configuration Context is preserved"): Bus Master is still set and
/// the vector held in D3hot is still pending, so it goes out on the return to D0 (PCIe Base 6.0
/// §6.1.4.5: a pending vector is sent once nothing holds it back).
#[test]
fn test_pm_no_soft_reset_delivers_vector_held_in_d3hot_on_return_to_d0() {
    let mut rig = start(true);
    rig.hold_in_d3hot();
    rig.set_power(0);
    assert_eq!(
        rig.efd.read().unwrap(),
        1,
        "held vector sent on return to D0"
    );
    assert!(!rig.pending(), "PBA bit clear once sent");
    assert_eq!(rig.command(), 0x0006, "state kept: no reset");
    let recs = rig.records();
    assert!(
        !recs
            .iter()
            .any(|r| matches!(r.event, Event::ResetBegin { .. })),
        "{recs:#?}"
    );
    let d0 = position(&recs, |e| matches!(e, Event::Power { from: 3, to: 0 })).unwrap();
    assert!(
        recs[d0..].iter().any(|r| delivered(&r.event)),
        "the delivery is journaled as an interrupt record: {recs:#?}"
    );
    assert_eq!(rig.journal.stats().violations, 0);
}
