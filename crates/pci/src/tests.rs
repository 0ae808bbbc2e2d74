//! Endpoint-level tests: each register rule against the specification section it implements.

use std::sync::{Arc, Mutex};

use pcisim_vfio_user::{region, ClientLink, Device, DeviceError, DmaSpace, Interrupts};

use crate::caps::ats::AtsConfig;
use crate::caps::msix::MsixConfig;
use crate::caps::pasid::PasidConfig;
use crate::caps::pcie::PcieConfig;
use crate::caps::pm::{PmConfig, PowerState};
use crate::caps::pri::PriConfig;
use crate::caps::{aer, ats, msix as msix_cap, pasid, pcie, pm, pri};
use crate::{
    Bar, ConfigEvent, Endpoint, EndpointBuilder, FunctionCtx, Identity, MsixOutcome, PciFunction,
    ResetKind,
};

#[derive(Debug, Default)]
struct Log {
    events: Vec<ConfigEvent>,
    resets: Vec<ResetKind>,
    outcomes: Vec<MsixOutcome>,
}

/// A function with one scratch register at BAR0+0 and a doorbell at BAR0+4.
#[derive(Debug, Default)]
struct Probe {
    scratch: u32,
    log: Arc<Mutex<Log>>,
}

impl PciFunction for Probe {
    fn bar_read(&mut self, _: &mut FunctionCtx<'_>, _bar: u32, offset: u64, data: &mut [u8]) {
        let v = if offset == 0 { self.scratch } else { 0 };
        for (i, b) in data.iter_mut().enumerate() {
            *b = (v >> (8 * i)) as u8;
        }
    }

    fn bar_write(&mut self, ctx: &mut FunctionCtx<'_>, _bar: u32, offset: u64, data: &[u8]) {
        let mut v = [0u8; 4];
        for (d, s) in v.iter_mut().zip(data) {
            *d = *s;
        }
        let v = u32::from_le_bytes(v);
        match offset {
            0 => self.scratch = v,
            4 => {
                let o = ctx.raise_msix(v as u16);
                self.log.lock().unwrap().outcomes.push(o);
            }
            _ => {}
        }
    }

    fn reset(&mut self, kind: ResetKind) {
        self.scratch = 0;
        self.log.lock().unwrap().resets.push(kind);
    }

    fn on_config_event(&mut self, ev: ConfigEvent) {
        self.log.lock().unwrap().events.push(ev);
    }
}

const ID: Identity = Identity {
    vendor_id: 0x1234,
    device_id: 0x0b10,
    class_code: 0x030200,
    revision: 1,
    subsystem_vendor_id: 0x1234,
    subsystem_id: 0x0001,
};

const MSIX: MsixConfig = MsixConfig {
    vectors: 16,
    table_bar: 0,
    table_offset: 0x8000,
    pba_bar: 0,
    pba_offset: 0xc000,
};

fn builder() -> EndpointBuilder {
    EndpointBuilder::new("test0", ID)
        .bar(0, Bar::mem64(0x10000))
        .bar(2, Bar::mem64(0x100000).prefetchable())
        .pm(PmConfig::default())
        .msix(MSIX)
        .pcie(PcieConfig::default())
        .aer()
        .ats(AtsConfig::default())
        .pasid(PasidConfig::default())
        .pri(PriConfig::default())
}

fn endpoint() -> (Endpoint<Probe>, Arc<Mutex<Log>>) {
    endpoint_with(builder())
}

fn endpoint_with(b: EndpointBuilder) -> (Endpoint<Probe>, Arc<Mutex<Log>>) {
    let probe = Probe::default();
    let log = probe.log.clone();
    (b.build(probe).unwrap(), log)
}

fn rd16(ep: &mut Endpoint<Probe>, off: u16) -> u16 {
    let mut b = [0u8; 2];
    ep.region_read(region::CONFIG, u64::from(off), &mut b)
        .unwrap();
    u16::from_le_bytes(b)
}

fn rd32(ep: &mut Endpoint<Probe>, off: u16) -> u32 {
    let mut b = [0u8; 4];
    ep.region_read(region::CONFIG, u64::from(off), &mut b)
        .unwrap();
    u32::from_le_bytes(b)
}

fn wr16(ep: &mut Endpoint<Probe>, off: u16, v: u16) {
    ep.region_write(region::CONFIG, u64::from(off), &v.to_le_bytes())
        .unwrap();
}

fn wr32(ep: &mut Endpoint<Probe>, off: u16, v: u32) {
    ep.region_write(region::CONFIG, u64::from(off), &v.to_le_bytes())
        .unwrap();
}

/// Memory Space and Bus Master on, as a driver sets them (again after every reset).
fn enable(ep: &mut Endpoint<Probe>) {
    let mut c = [0u8; 2];
    ep.region_read(region::CONFIG, 4, &mut c).unwrap();
    let cmd = u16::from_le_bytes(c);
    if cmd & 0x6 != 0x6 {
        ep.region_write(region::CONFIG, 4, &(cmd | 0x6).to_le_bytes())
            .unwrap();
    }
}

fn bar0_write(ep: &mut Endpoint<Probe>, off: u64, v: u32) {
    enable(ep);
    ep.region_write(0, off, &v.to_le_bytes()).unwrap();
}

fn bar0_read(ep: &mut Endpoint<Probe>, off: u64) -> u32 {
    enable(ep);
    let mut b = [0u8; 4];
    ep.region_read(0, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

// --- Type 0 header (PCIe Base 4.0 §7.5.1) ---

#[test]
fn test_header_identity_registers_read_only() {
    let (mut ep, _) = endpoint();
    assert_eq!(rd32(&mut ep, 0x00), 0x0b10_1234);
    assert_eq!(rd32(&mut ep, 0x08), 0x0302_0001);
    assert_eq!(rd32(&mut ep, 0x2c), 0x0001_1234);
    assert_eq!(ep.config().read_u8(0x3d), 1, "INTA");
    assert_eq!(ep.config().read_u8(0x0e), 0, "header type 0");
    wr32(&mut ep, 0x00, 0xffff_ffff);
    wr32(&mut ep, 0x08, 0xffff_ffff);
    wr32(&mut ep, 0x2c, 0xffff_ffff);
    assert_eq!(rd32(&mut ep, 0x00), 0x0b10_1234);
    assert_eq!(rd32(&mut ep, 0x08), 0x0302_0001);
    assert_eq!(rd32(&mut ep, 0x2c), 0x0001_1234);
}

#[test]
fn test_command_register_only_defined_bits_writable() {
    let (mut ep, log) = endpoint();
    wr16(&mut ep, 0x04, 0xffff);
    // IO, Memory, BusMaster, Parity Error Response, SERR, INTx Disable.
    assert_eq!(rd16(&mut ep, 0x04), 0b0000_0101_0100_0111);
    assert_eq!(
        log.lock().unwrap().events,
        [ConfigEvent::CommandChanged {
            old: 0,
            new: 0x0547
        }]
    );
}

#[test]
fn test_status_error_bits_w1c_caplist_ro() {
    let (mut ep, _) = endpoint();
    let caplist = 1 << 4;
    assert_eq!(
        rd16(&mut ep, 0x06),
        caplist,
        "only Capabilities List at power-on"
    );
    let errors: u16 = 0b1111_1001_0000_0000;
    ep.config_mut()
        .set_bits(0x06, u32::from(errors), u32::from(errors));
    // Interrupt Status follows the INTx line.
    ep.bus().set_intx(true);
    wr16(&mut ep, 0x06, 1 << 15 | 1 << 8 | 1 << 4 | 1 << 3);
    assert_eq!(
        rd16(&mut ep, 0x06),
        (errors & !(1 << 15 | 1 << 8)) | caplist | 1 << 3,
        "W1C clears only written ones; CapList and Interrupt Status are RO"
    );
}

#[test]
fn test_status_immediate_readiness_builder_option() {
    let (mut ep, _) = endpoint();
    assert_eq!(rd16(&mut ep, 0x06) & 1, 0, "default off");
    let (mut ep, _) = endpoint_with(builder().immediate_readiness(true));
    assert_eq!(rd16(&mut ep, 0x06) & 1, 1);
    wr16(&mut ep, 0x06, 0xffff);
    assert_eq!(rd16(&mut ep, 0x06) & 1, 1, "RO");
}

#[test]
fn test_bar_registers_size_probe_through_config_region() {
    let (mut ep, _) = endpoint();
    assert_eq!(rd32(&mut ep, 0x10), 0b100);
    assert_eq!(rd32(&mut ep, 0x18), 0b1100);
    for bar in 0..6u16 {
        wr32(&mut ep, 0x10 + 4 * bar, 0xffff_ffff);
    }
    assert_eq!(rd32(&mut ep, 0x10), 0xffff_0004);
    assert_eq!(rd32(&mut ep, 0x14), 0xffff_ffff);
    assert_eq!(rd32(&mut ep, 0x18), 0xfff0_000c);
    assert_eq!(rd32(&mut ep, 0x1c), 0xffff_ffff);
    assert_eq!(rd32(&mut ep, 0x20), 0, "unused BAR");
    assert_eq!(rd32(&mut ep, 0x24), 0, "unused BAR");
    assert_eq!(rd32(&mut ep, 0x30), 0, "no expansion ROM");
}

// --- Capability chain ---

#[test]
fn test_cap_chain_endpoint_offsets_in_order() {
    let (ep, _) = endpoint();
    let d = ep.describe();
    let std: Vec<_> = d.capabilities.iter().map(|c| (c.id, c.offset)).collect();
    assert_eq!(std, [(0x01, 0x40), (0x11, 0x48), (0x10, 0x54)]);
    let ext: Vec<_> = d
        .ext_capabilities
        .iter()
        .map(|c| (c.id, c.offset, c.version))
        .collect();
    assert_eq!(
        ext,
        [
            (0x01, 0x100, 2),
            (0x0f, 0x148, 1),
            (0x1b, 0x150, 1),
            (0x13, 0x158, 1)
        ]
    );
    let cs = ep.config();
    assert_eq!(cs.read_u8(0x34), 0x40);
    assert_eq!(cs.read_u16(0x40), 0x4801);
    assert_eq!(cs.read_u16(0x48), 0x5411);
    assert_eq!(cs.read_u16(0x54), 0x0010);
    assert_eq!(cs.read_u32(0x100) >> 20, 0x148);
    assert_eq!(cs.read_u32(0x158) >> 20, 0);
}

#[test]
fn test_vendor_specific_cap_bytes_read_only() {
    let (mut ep, _) = endpoint_with(builder().vendor_specific(b"peer"));
    let d = ep.describe();
    assert_eq!(
        d.capabilities.last().map(|c| (c.id, c.offset)),
        Some((0x09, 0x90))
    );
    assert_eq!(
        rd32(&mut ep, 0x90),
        0x7007_0009,
        "ID 9, last (next 0), length 7, 'p'"
    );
    wr32(&mut ep, 0x94, 0);
    let mut b = [0u8; 4];
    ep.region_read(region::CONFIG, 0x93, &mut b).unwrap();
    assert_eq!(&b, b"peer");
    assert_eq!(ep.config().read_u8(0x55), 0x90, "PCIe next points at it");
}

// --- PM (PCI PM 1.2 §3.2) ---

fn pm_at(ep: &Endpoint<Probe>) -> u16 {
    ep.cap_offsets().pm.unwrap().0
}

#[test]
fn test_pm_pmc_version3_ro() {
    let (mut ep, _) = endpoint();
    let pmc = pm_at(&ep) + pm::PMC;
    assert_eq!(rd16(&mut ep, pmc), 3);
    wr16(&mut ep, pmc, 0xffff);
    assert_eq!(rd16(&mut ep, pmc), 3);
}

#[test]
fn test_pm_pmcsr_power_state_rw_no_soft_reset_ro() {
    let (mut ep, log) = endpoint_with(builder().pm(PmConfig {
        no_soft_reset: true,
    }));
    let csr = pm_at(&ep) + pm::PMCSR;
    assert_eq!(rd16(&mut ep, csr), 1 << 3);
    wr16(&mut ep, csr, 0x7ff3 & !(1 << 3));
    assert_eq!(
        rd16(&mut ep, csr),
        1 << 3 | 3,
        "PowerState=D3hot, NSR stays"
    );
    wr16(&mut ep, csr, 1);
    assert_eq!(rd16(&mut ep, csr) & 3, 3, "D1 unsupported: write discarded");
    wr16(&mut ep, csr, 0);
    assert_eq!(rd16(&mut ep, csr) & 3, 0);
    let log = log.lock().unwrap();
    assert_eq!(
        log.events,
        [
            ConfigEvent::PowerState {
                from: PowerState::D0,
                to: PowerState::D3Hot
            },
            ConfigEvent::PowerState {
                from: PowerState::D3Hot,
                to: PowerState::D0
            }
        ]
    );
    assert!(
        log.resets.is_empty(),
        "No_Soft_Reset=1: no reset on D3hot->D0"
    );
}

#[test]
fn test_pm_pme_status_w1c() {
    let (mut ep, _) = endpoint();
    let csr = pm_at(&ep) + pm::PMCSR;
    ep.config_mut().set_bits(csr, 1 << 15, 1 << 15);
    wr16(&mut ep, csr, 0);
    assert_ne!(rd16(&mut ep, csr) & 1 << 15, 0);
    wr16(&mut ep, csr, 1 << 15);
    assert_eq!(rd16(&mut ep, csr) & 1 << 15, 0);
}

#[test]
fn test_pm_d3hot_to_d0_without_nsr_soft_resets() {
    let (mut ep, log) = endpoint();
    wr16(&mut ep, 0x04, 0x0006);
    bar0_write(&mut ep, 0, 0xdead_beef);
    let csr = pm_at(&ep) + pm::PMCSR;
    wr16(&mut ep, csr, 3);
    assert_eq!(rd16(&mut ep, 0x04), 0x0006, "entering D3hot keeps state");
    wr16(&mut ep, csr, 0);
    assert_eq!(rd16(&mut ep, 0x04), 0, "config restored");
    assert_eq!(bar0_read(&mut ep, 0), 0, "function reset");
    assert_eq!(log.lock().unwrap().resets, [ResetKind::PmSoftReset]);
}

// --- MSI-X capability (PCI 3.0 §6.8.2) ---

#[test]
fn test_msix_cap_layout_and_control_bits() {
    let (mut ep, log) = endpoint();
    let at = ep.cap_offsets().msix.unwrap().0;
    assert_eq!(rd16(&mut ep, at + msix_cap::MESSAGE_CONTROL), 15, "N-1");
    assert_eq!(rd32(&mut ep, at + msix_cap::TABLE), 0x8000);
    assert_eq!(rd32(&mut ep, at + msix_cap::PBA), 0xc000);
    wr16(&mut ep, at + msix_cap::MESSAGE_CONTROL, 0xffff);
    assert_eq!(rd16(&mut ep, at + msix_cap::MESSAGE_CONTROL), 0xc00f);
    wr32(&mut ep, at + msix_cap::TABLE, 0);
    assert_eq!(rd32(&mut ep, at + msix_cap::TABLE), 0x8000);
    assert_eq!(
        log.lock().unwrap().events,
        [ConfigEvent::MsixControl {
            enable: true,
            function_mask: true
        }]
    );
}

#[test]
fn test_msix_table_region_stores_entries() {
    let (mut ep, _) = endpoint();
    enable(&mut ep);
    let mut e = [0u8; 16];
    ep.region_read(0, 0x8010, &mut e).unwrap();
    assert_eq!(e[12], 1, "vector control mask set at reset");
    ep.region_write(0, 0x8010, &[0xaa; 16]).unwrap();
    ep.region_read(0, 0x8010, &mut e).unwrap();
    assert_eq!(&e[..12], &[0xaa; 12]);
    assert_eq!(&e[12..], &[0, 0, 0, 0]);
    assert!(matches!(
        ep.region_read(0, 0x80fc, &mut [0u8; 8]),
        Err(DeviceError::BadAccess { .. })
    ));
}

#[test]
fn test_msix_raise_without_client_pending_in_pba_region() {
    let (mut ep, log) = endpoint();
    bar0_write(&mut ep, 4, 5);
    bar0_write(&mut ep, 4, 16);
    assert_eq!(
        log.lock().unwrap().outcomes,
        [MsixOutcome::Pending, MsixOutcome::InvalidVector]
    );
    let mut pba = [0u8; 8];
    ep.region_read(0, 0xc000, &mut pba).unwrap();
    assert_eq!(u64::from_le_bytes(pba), 1 << 5);
    ep.region_write(0, 0xc000, &[0; 8]).unwrap();
    ep.region_read(0, 0xc000, &mut pba).unwrap();
    assert_eq!(u64::from_le_bytes(pba), 1 << 5, "PBA writes ignored");
}

#[test]
fn test_msix_unbound_vector_with_client_stays_pending_after_irqs_changed() {
    let (mut ep, log) = endpoint();
    let irqs = Interrupts::new(&[1, 0, 16, 1, 1]);
    ep.attach(ClientLink {
        irqs: irqs.clone(),
        dma: DmaSpace::new(),
    });
    bar0_write(&mut ep, 4, 7);
    assert_eq!(log.lock().unwrap().outcomes, [MsixOutcome::Pending]);
    ep.irqs_changed(pcisim_vfio_user::irq_index::MSIX);
    assert!(ep.msix().unwrap().is_pending(7));
    ep.detach();
    assert!(
        !ep.msix().unwrap().is_pending(7),
        "lost connection clears the PBA"
    );
}

// --- PCIe capability (PCIe Base 4.0 §7.5.3) ---

fn pcie_at(ep: &Endpoint<Probe>) -> u16 {
    ep.cap_offsets().pcie.unwrap().0
}

#[test]
fn test_pcie_caps_version2_endpoint() {
    let (mut ep, _) = endpoint();
    let at = pcie_at(&ep);
    assert_eq!(rd16(&mut ep, at + pcie::PCIE_CAPS), 0x0002);
    let devcap = rd32(&mut ep, at + pcie::DEVCAP);
    assert_eq!(devcap & 7, 1, "MPS 256B");
    assert_ne!(devcap & 1 << 15, 0, "RBER");
    assert_ne!(devcap & 1 << 28, 0, "FLR capable");
    let lnkcap = rd32(&mut ep, at + pcie::LNKCAP);
    assert_eq!(lnkcap & 0x3ff, 0x011, "x1, 2.5 GT/s");
    let lnksta = rd16(&mut ep, at + pcie::LNKSTA);
    assert_eq!(lnksta, 0x0011, "x1, 2.5 GT/s");
    assert_eq!(rd32(&mut ep, at + pcie::LNKCAP2), 0b10);
    assert_eq!(rd32(&mut ep, at + pcie::DEVCAP2), 0b1_0011);
    wr32(&mut ep, at + pcie::DEVCAP, 0);
    assert_eq!(rd32(&mut ep, at + pcie::DEVCAP), devcap, "RO");
}

/// PCIe Base 6.0 §7.5.3.6 (Link Capabilities, bit 20 Data Link Layer Link Active Reporting
/// Capable): "For Upstream Ports and components that do not support this optional capability,
/// this bit must be hardwired to 0b"; §7.5.3.8 (Link Status, bit 13 Data Link Layer Link
/// Active): implemented only when that capability bit is 1b, "otherwise, this bit must be
/// hardwired to 0b". An endpoint's port is an Upstream Port: both read 0, also after a write,
/// a reset and an injected link-down/up.
#[test]
fn test_pcie_endpoint_upstream_port_dll_link_active_reporting_and_dl_active_hardwired_zero() {
    let (mut ep, _) = endpoint();
    let at = pcie_at(&ep);
    let dllla_cap = 1u32 << 20;
    let dl_active = 1u16 << pcie::LNKSTA_DLL_LINK_ACTIVE;
    let check = |ep: &mut Endpoint<Probe>, when: &str| {
        let lnkcap = rd32(ep, at + pcie::LNKCAP);
        let lnksta = rd16(ep, at + pcie::LNKSTA);
        assert_eq!(lnkcap & dllla_cap, 0, "{when}: LnkCap {lnkcap:#010x}");
        assert_eq!(lnksta & dl_active, 0, "{when}: LnkSta {lnksta:#06x}");
        // The rest of the link registers are still there (the instrument reads real values).
        assert_eq!(lnkcap & 0x3ff, 0x011, "{when}: x1, 2.5 GT/s");
        assert_eq!(lnksta & 0x3ff, 0x011, "{when}: x1, 2.5 GT/s");
    };
    check(&mut ep, "at power-on");
    wr32(&mut ep, at + pcie::LNKCAP, dllla_cap);
    wr16(&mut ep, at + pcie::LNKSTA, dl_active);
    check(&mut ep, "after writing the bits");
    ep.reset_function(ResetKind::Flr);
    check(&mut ep, "after an FLR");
    crate::Controllable::inject(&mut ep, &crate::Fault::LinkDown).unwrap();
    crate::Controllable::inject(&mut ep, &crate::Fault::LinkUp).unwrap();
    check(&mut ep, "after link-down and link-up");
}

#[test]
fn test_pcie_devctl_rw_fields_and_flr_reads_zero() {
    let (mut ep, _) = endpoint();
    let at = pcie_at(&ep) + pcie::DEVCTL;
    assert_eq!(rd16(&mut ep, at), 0x2910, "RO, ExtTag, NoSnoop, MRRS 512B");
    wr16(&mut ep, at, 0x7fff);
    assert_eq!(
        rd16(&mut ep, at),
        0x79ff,
        "Phantom Functions and Aux Power PM are hardwired 0"
    );
}

#[test]
fn test_pcie_devsta_errors_w1c_transactions_pending_ro() {
    let (mut ep, _) = endpoint();
    let at = pcie_at(&ep) + pcie::DEVSTA;
    // Transactions Pending follows DMA in flight; the stuck fault holds it set.
    crate::Controllable::inject(
        &mut ep,
        &crate::Fault::StuckTransactionsPending { on: true },
    )
    .unwrap();
    ep.config_mut().set_bits(at, 0x0f, 0x0f);
    wr16(&mut ep, at, 0x0025);
    assert_eq!(rd16(&mut ep, at), 0x002a, "CED and FED cleared; TP is RO");
}

#[test]
fn test_pcie_devctl2_completion_timeout_rw() {
    let (mut ep, _) = endpoint();
    let at = pcie_at(&ep) + pcie::DEVCTL2;
    wr16(&mut ep, at, 0xffff);
    assert_eq!(rd16(&mut ep, at), 0x1f);
}

#[test]
fn test_flr_devctl_write_resets_config_msix_function_keeps_sticky() {
    let (mut ep, log) = endpoint();
    let aer_at = ep.cap_offsets().aer.unwrap().0;
    let devctl = pcie_at(&ep) + pcie::DEVCTL;
    wr16(&mut ep, 0x04, 0x0006);
    wr16(&mut ep, devctl, 0x0f);
    wr32(&mut ep, aer_at + aer::UNCOR_MASK, 0xffff_ffff);
    ep.config_mut()
        .set_bits(aer_at + aer::UNCOR_STATUS, 1 << 14, 1 << 14);
    let csr = pm_at(&ep) + pm::PMCSR;
    ep.config_mut().set_bits(csr, 1 << 15, 1 << 15);
    bar0_write(&mut ep, 0, 0x1234_5678);
    bar0_write(&mut ep, 4, 3);
    ep.region_write(0, 0x8000 + 12, &[0, 0, 0, 0]).unwrap();
    let irqs = Interrupts::new(&[1, 0, 16, 1, 1]);
    ep.attach(ClientLink {
        irqs,
        dma: DmaSpace::new(),
    });

    wr16(&mut ep, devctl, 0x800f);

    assert_eq!(rd16(&mut ep, 0x04), 0, "Command reset");
    assert_eq!(rd16(&mut ep, devctl), 0x2910, "DevCtl reset, IFLR reads 0");
    assert_eq!(
        rd16(&mut ep, csr) & 1 << 15,
        0,
        "PME_Status is not sticky here"
    );
    assert_eq!(
        rd32(&mut ep, aer_at + aer::UNCOR_STATUS),
        1 << 14,
        "sticky status survives"
    );
    assert_eq!(
        rd32(&mut ep, aer_at + aer::UNCOR_MASK),
        0x005f_f010,
        "sticky mask survives"
    );
    assert_eq!(bar0_read(&mut ep, 0), 0);
    assert!(!ep.msix().unwrap().is_pending(3), "PBA cleared");
    assert!(ep.msix().unwrap().entry_masked(0), "table masked");
    let log = log.lock().unwrap();
    assert_eq!(log.resets, [ResetKind::Flr]);
    // The driver re-enabled decoding after the FLR (Command 0 → 6) to check the BAR.
    let flr = log.events.iter().rposition(|e| *e == ConfigEvent::Flr);
    assert!(flr.is_some(), "the function saw the FLR");
    assert_eq!(
        log.events.get(flr.unwrap_or(0) + 1),
        Some(&ConfigEvent::CommandChanged { old: 0, new: 6 })
    );
}

#[test]
fn test_device_reset_and_detach_reset_kinds() {
    let (mut ep, log) = endpoint();
    let aer_at = ep.cap_offsets().aer.unwrap().0;
    wr32(&mut ep, aer_at + aer::COR_MASK, 0x1);
    ep.reset().unwrap();
    assert_eq!(
        rd32(&mut ep, aer_at + aer::COR_MASK),
        0x1,
        "hot reset keeps sticky"
    );
    ep.detach();
    assert_eq!(
        rd32(&mut ep, aer_at + aer::COR_MASK),
        0xe000,
        "lost connection is a power cycle"
    );
    assert_eq!(
        log.lock().unwrap().resets,
        [ResetKind::DeviceReset, ResetKind::LostConnection]
    );
}

// --- AER (PCIe Base 4.0 §7.8.4) ---

#[test]
fn test_aer_status_w1c_sticky_masks_rws_defaults() {
    let (mut ep, _) = endpoint();
    let at = ep.cap_offsets().aer.unwrap().0;
    assert_eq!(rd32(&mut ep, at) & 0xf_ffff, 0x2_0001, "ID 1 version 2");
    assert_eq!(rd32(&mut ep, at + aer::UNCOR_MASK), 1 << 22);
    assert_eq!(rd32(&mut ep, at + aer::UNCOR_SEVERITY), 0x0046_2010);
    assert_eq!(rd32(&mut ep, at + aer::COR_MASK), 0xe000);
    let cs = ep.config();
    assert_eq!(cs.w1cmask_u32(at + aer::UNCOR_STATUS), 0x005f_f010);
    assert_eq!(cs.w1cmask_u32(at + aer::COR_STATUS), 0xf1c1);
    assert_eq!(cs.sticky_u32(at + aer::UNCOR_STATUS), 0x005f_f010);
    assert_eq!(cs.wmask_u32(at + aer::UNCOR_SEVERITY), 0x005f_f010);
    assert_eq!(cs.sticky_u32(at + aer::COR_MASK), 0xf1c1);
    assert_eq!(cs.wmask_u32(at + aer::CAP_CONTROL), 0);
    ep.config_mut()
        .set_bits(at + aer::COR_STATUS, 0xf1c1, 0xf1c1);
    wr32(&mut ep, at + aer::COR_STATUS, 0x41);
    assert_eq!(rd32(&mut ep, at + aer::COR_STATUS), 0xf180);
}

// --- ATS, PASID, PRI (PCIe Base 4.0 §10.5.1, §7.8.8, §10.5.2) ---

#[test]
fn test_ats_control_enable_stu_rw() {
    let (mut ep, log) = endpoint();
    let at = ep.cap_offsets().ats.unwrap().0;
    assert_eq!(rd16(&mut ep, at + ats::CAPABILITY), 1 << 5);
    wr16(&mut ep, at + ats::CONTROL, 0xffff);
    assert_eq!(rd16(&mut ep, at + ats::CONTROL), 0x801f);
    assert_eq!(
        log.lock().unwrap().events,
        [ConfigEvent::AtsControl {
            enable: true,
            stu: 0x1f
        }]
    );
}

#[test]
fn test_pasid_capability_ro_control_rw() {
    let (mut ep, log) = endpoint();
    let at = ep.cap_offsets().pasid.unwrap().0;
    assert_eq!(rd16(&mut ep, at + pasid::CAPABILITY), 20 << 8 | 0b110);
    wr16(&mut ep, at + pasid::CAPABILITY, 0);
    assert_eq!(rd16(&mut ep, at + pasid::CAPABILITY), 20 << 8 | 0b110);
    wr16(&mut ep, at + pasid::CONTROL, 0xffff);
    assert_eq!(rd16(&mut ep, at + pasid::CONTROL), 0b111);
    assert_eq!(
        log.lock().unwrap().events,
        [ConfigEvent::PasidControl {
            enable: true,
            exec: true,
            privileged: true
        }]
    );
}

#[test]
fn test_pasid_unsupported_modes_not_writable() {
    let (mut ep, _) = endpoint_with(builder().pasid(PasidConfig {
        exec: false,
        privileged: false,
        max_width: 8,
    }));
    let at = ep.cap_offsets().pasid.unwrap().0;
    assert_eq!(rd16(&mut ep, at + pasid::CAPABILITY), 8 << 8);
    wr16(&mut ep, at + pasid::CONTROL, 0xffff);
    assert_eq!(rd16(&mut ep, at + pasid::CONTROL), 1);
}

#[test]
fn test_pri_enable_reset_stopped_and_allocation() {
    let (mut ep, log) = endpoint();
    let at = ep.cap_offsets().pri.unwrap().0;
    assert_eq!(rd16(&mut ep, at + pri::STATUS), 1 << 15 | 1 << 8, "stopped");
    assert_eq!(rd32(&mut ep, at + pri::CAPACITY), 32);
    wr32(&mut ep, at + pri::ALLOCATION, 16);
    assert_eq!(rd32(&mut ep, at + pri::ALLOCATION), 16);
    wr16(&mut ep, at + pri::CONTROL, 0b10);
    assert_eq!(rd16(&mut ep, at + pri::CONTROL), 0, "Reset reads 0");
    wr16(&mut ep, at + pri::CONTROL, 0b01);
    assert_eq!(rd16(&mut ep, at + pri::STATUS) & 1 << 8, 0, "running");
    ep.config_mut().set_bits(at + pri::STATUS, 0b11, 0b11);
    wr16(&mut ep, at + pri::STATUS, 0b01);
    assert_eq!(rd16(&mut ep, at + pri::STATUS) & 0b11, 0b10, "W1C");
    assert_eq!(
        log.lock().unwrap().events,
        [
            ConfigEvent::PriReset,
            ConfigEvent::PriControl { enable: true }
        ]
    );
}

// --- Device trait surface ---

#[test]
fn test_region_info_bars_config_rom_vga() {
    let (ep, _) = endpoint();
    let r0 = ep.region_info(0).unwrap();
    assert_eq!(r0.size, 0x10000);
    assert!(r0.flags.read && r0.flags.write && !r0.flags.mmap);
    assert_eq!(ep.region_info(1).unwrap().size, 0, "upper half of BAR0");
    assert_eq!(ep.region_info(2).unwrap().size, 0x100000);
    assert_eq!(ep.region_info(4).unwrap().size, 0);
    assert_eq!(ep.region_info(region::ROM).unwrap().size, 0);
    assert_eq!(ep.region_info(region::CONFIG).unwrap().size, 4096);
    assert_eq!(ep.region_info(region::VGA).unwrap().size, 0);
    assert!(ep.region_info(9).is_none());
}

#[test]
fn test_irq_info_counts_and_flags() {
    use vfio_bindings::bindings::vfio::*;
    let (ep, _) = endpoint();
    let i = |n| ep.irq_info(n).unwrap();
    assert_eq!(i(0).count, 1);
    assert_eq!(
        i(0).flags,
        VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED
    );
    assert_eq!(i(1).count, 0);
    assert_eq!(i(2).count, 16);
    assert_eq!(i(2).flags, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE);
    assert_eq!((i(3).count, i(3).flags), (1, VFIO_IRQ_INFO_EVENTFD));
    assert_eq!((i(4).count, i(4).flags), (1, VFIO_IRQ_INFO_EVENTFD));
    assert!(ep.irq_info(5).is_none());
    assert_eq!(
        ep.device_flags(),
        VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET
    );
}

#[test]
fn test_region_access_out_of_range_errors_never_panics() {
    let (mut ep, _) = endpoint();
    let mut b = [0u8; 8];
    assert!(matches!(
        ep.region_read(region::CONFIG, 4092, &mut b),
        Err(DeviceError::OutOfRange { .. })
    ));
    assert!(matches!(
        ep.region_write(region::CONFIG, u64::MAX, &b),
        Err(DeviceError::OutOfRange { .. })
    ));
    assert!(matches!(
        ep.region_read(region::CONFIG, 0, &mut []),
        Err(DeviceError::BadAccess { .. })
    ));
    assert!(matches!(
        ep.region_read(0, 0xfffc, &mut b),
        Err(DeviceError::OutOfRange { .. })
    ));
    assert!(matches!(
        ep.region_read(0, u64::MAX - 2, &mut b),
        Err(DeviceError::OutOfRange { .. })
    ));
    assert!(matches!(
        ep.region_write(1, 0, &b),
        Err(DeviceError::OutOfRange { .. })
    ));
    assert!(matches!(
        ep.region_write(region::ROM, 0, &b),
        Err(DeviceError::OutOfRange { .. })
    ));
    assert!(matches!(
        ep.region_write(42, 0, &b),
        Err(DeviceError::OutOfRange { .. })
    ));
    let mut all = vec![0u8; 4096];
    ep.region_read(region::CONFIG, 0, &mut all).unwrap();
    ep.region_write(region::CONFIG, 0, &all).unwrap();
}

/// `dma_mapped` records carry the mapping's protection (DMA_MAP's READ/WRITE flags), so a
/// reader can tell a read-only mapping from a writable one.
#[test]
fn test_dma_mapped_record_carries_protection() {
    use pcisim_vfio_user::dma::{MappingInfo, PROT_READ, PROT_WRITE};
    let (mut ep, _) = endpoint();
    for (iova, prot) in [
        (0x1000, PROT_READ),
        (0x2000, PROT_WRITE),
        (0x3000, PROT_READ | PROT_WRITE),
    ] {
        ep.dma_mapped(&MappingInfo {
            iova,
            size: 0x1000,
            prot,
            backed: true,
        });
    }
    let recs: Vec<serde_json::Value> = ep
        .journal()
        .since(0)
        .0
        .iter()
        .map(|r| serde_json::to_value(r).unwrap())
        .filter(|v| v["type"] == "dma_mapped")
        .collect();
    let prot: Vec<(u64, bool, bool)> = recs
        .iter()
        .map(|v| {
            (
                v["iova"].as_u64().unwrap(),
                v["read"].as_bool().unwrap(),
                v["write"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        prot,
        [
            (0x1000, true, false),
            (0x2000, false, true),
            (0x3000, true, true)
        ]
    );
}

/// A state change that closes the bus gate waits for accesses already through it; when that
/// drain times out (a wedged access), the journal's order around the change may be wrong, so
/// the endpoint journals a `checker_degraded` violation record: the reader's window is not
/// clean. A drain that completes journals nothing of the kind.
#[test]
fn test_drain_timeout_journals_checker_degraded() {
    use pcisim_journal::{Event, ViolationKind};
    let (mut ep, _) = endpoint();
    assert_eq!(
        crate::endpoint::DRAIN_LIMIT,
        std::time::Duration::from_secs(10)
    );
    ep.set_drain_limit(std::time::Duration::from_millis(50));
    wr16(&mut ep, 0x04, 0x0006);
    // Nothing in flight: clearing Bus Master drains at once.
    wr16(&mut ep, 0x04, 0x0002);
    assert_eq!(ep.journal().stats().degraded, 0);
    wr16(&mut ep, 0x04, 0x0006);
    // An access wedged in flight: the drain gives up after the limit.
    let bus = ep.bus().clone();
    let tx = bus.transaction();
    let t0 = std::time::Instant::now();
    wr16(&mut ep, 0x04, 0x0002);
    assert!(t0.elapsed() >= std::time::Duration::from_millis(50));
    drop(tx);
    let st = ep.journal().stats();
    assert_eq!((st.degraded, st.violations), (1, 1));
    let v = ep.journal().violations_since(0);
    assert_eq!(v.len(), 1);
    match &v[0].event {
        Event::Violation {
            kind: ViolationKind::CheckerDegraded,
            detail,
        } => assert!(detail.contains("drain timed out"), "{detail}"),
        other => panic!("expected checker_degraded, got {other:?}"),
    }
    // Journaled before the state change it concerns.
    let recs = ep.journal().since(0).0;
    let at = recs.iter().position(|r| r.seq == v[0].seq).unwrap();
    assert!(
        matches!(
            recs.get(at + 1).map(|r| &r.event),
            Some(Event::Command { new: 0x0002, .. })
        ),
        "{recs:#?}"
    );
}

#[test]
fn test_describe_json_shape() {
    let (ep, _) = endpoint();
    let v = serde_json::to_value(ep.describe()).unwrap();
    let expected = serde_json::json!({
        "vendor_id": 0x1234, "device_id": 0x0b10, "class_code": 0x030200, "revision": 1,
        "subsystem_vendor_id": 0x1234, "subsystem_id": 1,
        "bars": [
            {"index": 0, "size": 65536, "mem64": true, "prefetchable": false},
            {"index": 2, "size": 1048576, "mem64": true, "prefetchable": true}
        ],
        "capabilities": [
            {"id": 1, "offset": 64}, {"id": 17, "offset": 72}, {"id": 16, "offset": 84}
        ],
        "ext_capabilities": [
            {"id": 1, "offset": 256, "version": 2}, {"id": 15, "offset": 328, "version": 1},
            {"id": 27, "offset": 336, "version": 1}, {"id": 19, "offset": 344, "version": 1}
        ]
    });
    assert_eq!(v, expected);
}

#[test]
fn test_builder_invalid_msix_layout_rejected() {
    let probe = || Probe::default();
    let bad = |m: MsixConfig| {
        EndpointBuilder::new("x", ID)
            .bar(0, Bar::mem64(0x10000))
            .msix(m)
            .build(probe())
            .is_err()
    };
    assert!(bad(MsixConfig { vectors: 0, ..MSIX }));
    assert!(bad(MsixConfig {
        table_offset: 0xfff8,
        ..MSIX
    }));
    assert!(bad(MsixConfig {
        pba_offset: 0x8008,
        ..MSIX
    }));
    assert!(bad(MsixConfig {
        table_bar: 2,
        ..MSIX
    }));
    assert!(bad(MsixConfig {
        pba_offset: 0xc004,
        ..MSIX
    }));
    assert!(!bad(MSIX));
}
