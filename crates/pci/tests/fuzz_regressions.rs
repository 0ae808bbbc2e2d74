//! Regressions found by the fuzz targets (docs/fuzzing.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::mpsc;
use std::time::Duration;

use pcisim_journal::{Event, InterruptOutcome};
use pcisim_pci::caps::msix::MsixConfig;
use pcisim_pci::caps::pcie::PcieConfig;
use pcisim_pci::{Bar, EndpointBuilder, FunctionCtx, Identity, PciFunction, ResetKind};
use pcisim_vfio_user::{region, ClientLink, Device, DmaSpace, Interrupts};

struct Null;

impl PciFunction for Null {
    fn bar_read(&mut self, _: &mut FunctionCtx<'_>, _: u32, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn bar_write(&mut self, _: &mut FunctionCtx<'_>, _: u32, _: u64, _: &[u8]) {}
    fn reset(&mut self, _: ResetKind) {}
}

fn identity() -> Identity {
    Identity {
        vendor_id: 0x1234,
        device_id: 0x0001,
        class_code: 0x120000,
        revision: 1,
        subsystem_vendor_id: 0x1234,
        subsystem_id: 1,
    }
}

/// `region` target, crash-2983e6c1 (a GPU whose ring engine raised its error vector while a
/// config write cleared Bus Master Enable, on a loaded host): the engine thread passed the bus
/// gate, was descheduled for more than the 100 ms the endpoint then waited for accesses in
/// flight, and its interrupt was journaled `pending` after the `command` event that cleared
/// Bus Master — an `interrupt_while_disabled` violation the device never committed. Fixed by
/// 5392858 (wait up to 10 s); this pins the order for an access that takes 300 ms.
#[test]
fn test_bus_master_clear_is_journaled_after_a_slow_access_already_past_the_gate() {
    let mut ep = EndpointBuilder::new("slow-access", identity())
        .bar(0, Bar::mem64(0x10000))
        .pcie(PcieConfig::default())
        .build(Null)
        .unwrap();
    ep.region_write(region::CONFIG, 4, &[0b110, 0]).unwrap();

    let bus = ep.bus().clone();
    let (through, gate) = mpsc::channel();
    let engine = std::thread::spawn(move || {
        // An access the gate let through while Bus Master was on...
        let _in_flight = bus.transaction();
        through.send(()).unwrap();
        // ...whose thread the host deschedules for longer than the old drain limit.
        std::thread::sleep(Duration::from_millis(300));
        bus.journal().record(Event::Note {
            text: "the access lands".into(),
        });
    });
    gate.recv().unwrap();
    ep.region_write(region::CONFIG, 4, &[0b010, 0]).unwrap();
    engine.join().unwrap();

    let (records, _) = ep.journal().since(0);
    let at = |f: &dyn Fn(&Event) -> bool| records.iter().position(|r| f(&r.event));
    let landed = at(&|e| matches!(e, Event::Note { text } if text == "the access lands"))
        .expect("the access is journaled");
    let cleared = at(&|e| matches!(e, Event::Command { old: 6, new: 2 }))
        .expect("the Bus Master clear is journaled");
    assert!(
        landed < cleared,
        "the Bus Master clear was journaled before the access it let through landed"
    );
    assert!(ep.journal().violations().is_empty());
}

/// `region` target, crash-a0d4864b (after 5392858; replayed with the journal's last records): a
/// GPU ring engine raised its error vector while the client went away. `detach` journaled
/// `client_disconnected` — from which the checker holds Bus Master off — before the bus gate
/// closed for the lost-connection reset, so the interrupt passed the gate, was latched pending
/// and journaled after it: `interrupt_while_disabled`, though nothing was sent to anyone. Here
/// the interrupt is raised from the presence listener, which runs in that window.
#[test]
fn test_interrupt_raised_as_the_client_leaves_is_not_journaled_after_it_left() {
    let mut ep = EndpointBuilder::new("leaving", identity())
        .bar(0, Bar::mem64(0x10000))
        .msix(MsixConfig {
            vectors: 4,
            table_bar: 0,
            table_offset: 0x8000,
            pba_bar: 0,
            pba_offset: 0xc000,
        })
        .pcie(PcieConfig::default())
        .build(Null)
        .unwrap();
    ep.attach(ClientLink {
        irqs: Interrupts::new(&[1, 0, 4, 1, 1]),
        dma: DmaSpace::new(),
    });
    ep.region_write(region::CONFIG, 4, &[0b110, 0]).unwrap();
    let bus = ep.bus().clone();
    ep.on_presence(Box::new(move |present| {
        if !present {
            bus.raise_msix(1);
        }
    }));
    ep.detach();

    let (records, _) = ep.journal().since(0);
    let left = records
        .iter()
        .position(|r| r.event == Event::ClientDisconnected)
        .expect("client_disconnected journaled");
    let late: Vec<_> = records[left..]
        .iter()
        .filter(|r| {
            matches!(&r.event, Event::Interrupt { outcome, .. }
                if !matches!(outcome, InterruptOutcome::Refused(_)))
        })
        .collect();
    assert!(
        late.is_empty(),
        "an interrupt went out (or was latched) after the client left: {late:?}"
    );
    assert!(
        ep.journal().violations().is_empty(),
        "{:?}",
        ep.journal().violations()
    );
}
