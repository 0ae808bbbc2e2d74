//! GPU tests, named after the rule of docs/programming-model.md they check.

use std::fs::File;

use pcisim_pci::Endpoint;
use pcisim_vfio_user::{irq_index, region, ClientLink, Device, DmaSpace, Interrupts};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

use super::regs::*;
use super::*;

const VRAM: u64 = 1 << 20;

fn gpu() -> Endpoint<Gpu> {
    let mut ep = endpoint(&GpuConfig {
        vram_size: VRAM,
        ..GpuConfig::default()
    })
    .unwrap();
    enable(&mut ep);
    ep
}

/// Memory Space and Bus Master on, as a driver sets them (again after every reset): BAR
/// accesses reach the function only with decoding enabled.
fn enable(ep: &mut Endpoint<Gpu>) {
    let mut c = [0u8; 2];
    ep.region_read(7, 4, &mut c).unwrap();
    if u16::from_le_bytes(c) & 0x6 != 0x6 {
        let v = u16::from_le_bytes(c) | 0x6;
        ep.region_write(7, 4, &v.to_le_bytes()).unwrap();
    }
}

fn rd(ep: &mut Endpoint<Gpu>, off: u64) -> u32 {
    enable(ep);
    let mut b = [0u8; 4];
    ep.region_read(0, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn wr(ep: &mut Endpoint<Gpu>, off: u64, v: u32) {
    enable(ep);
    ep.region_write(0, off, &v.to_le_bytes()).unwrap();
}

fn window(ep: &mut Endpoint<Gpu>, offset: u64, len: u64) {
    enable(ep);
    ep.region_write(0, VRAM_OFFSET_LO, &offset.to_le_bytes())
        .unwrap();
    ep.region_write(0, VRAM_LENGTH_LO, &len.to_le_bytes())
        .unwrap();
}

fn result(ep: &mut Endpoint<Gpu>) -> u64 {
    let mut b = [0u8; 8];
    ep.region_read(0, VRAM_RESULT_LO, &mut b).unwrap();
    u64::from_le_bytes(b)
}

/// FNV-1a-64 written out independently of the implementation under test.
fn reference_fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 14695981039346656037;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(1099511628211);
    }
    h
}

/// The FILL formula of the programming model, written out independently.
fn reference_fill(seed: u32, i: u64) -> u8 {
    let x = (seed as u64).wrapping_add(i);
    (x.wrapping_mul(11400714819323198485) >> 56) as u8
}

#[test]
fn test_regs_identity_ro_values() {
    let mut ep = endpoint(&GpuConfig {
        vram_size: 8 << 30,
        ..GpuConfig::default()
    })
    .unwrap();
    let mut id = [0u8; 4];
    enable(&mut ep);
    ep.region_read(0, ID, &mut id).unwrap();
    assert_eq!(&id, b"PCSG");
    assert_eq!(rd(&mut ep, VERSION), 0x0001_0001);
    assert_eq!(rd(&mut ep, VRAM_SIZE_LO), 0);
    assert_eq!(rd(&mut ep, VRAM_SIZE_HI), 2);
    assert_eq!(rd(&mut ep, regs::MSIX_VECTORS), 16);
    for r in [
        ID,
        VERSION,
        VRAM_SIZE_LO,
        VRAM_SIZE_HI,
        regs::MSIX_VECTORS,
        IRQ_COUNT,
    ] {
        let before = rd(&mut ep, r);
        wr(&mut ep, r, 0x5a5a_5a5a);
        assert_eq!(rd(&mut ep, r), before, "register {r:#x} is RO");
    }
}

#[test]
fn test_regs_scratch_rw_reset_to_zero_on_flr() {
    let mut ep = gpu();
    for i in 0..16 {
        wr(&mut ep, SCRATCH + 4 * i, 0x1000 + i as u32);
    }
    for i in 0..16 {
        assert_eq!(rd(&mut ep, SCRATCH + 4 * i), 0x1000 + i as u32);
    }
    let devctl = ep.cap_offsets().pcie.unwrap().0 + pcisim_pci::caps::pcie::DEVCTL;
    ep.region_write(region::CONFIG, u64::from(devctl), &0x8000u16.to_le_bytes())
        .unwrap();
    for i in 0..16 {
        assert_eq!(rd(&mut ep, SCRATCH + 4 * i), 0);
    }
}

#[test]
fn test_regs_undefined_offsets_read_zero_ignore_writes() {
    let mut ep = gpu();
    for off in [
        0x014, 0x03c, 0x08c, 0x11c, 0x128, 0x7ffc, 0x8100, 0xc008, 0xfffc,
    ] {
        wr(&mut ep, off, 0xffff_ffff);
        assert_eq!(rd(&mut ep, off), 0, "offset {off:#x}");
    }
    assert_eq!(rd(&mut ep, IRQ_DOORBELL), 0, "WO reads 0");
    assert_eq!(rd(&mut ep, VRAM_CMD), 0, "WO reads 0");
}

#[test]
fn test_regs_8byte_access_is_two_halves_odd_sizes_ignored() {
    let mut ep = gpu();
    ep.region_write(0, VRAM_OFFSET_LO, &0x1122_3344_5566_7788u64.to_le_bytes())
        .unwrap();
    assert_eq!(rd(&mut ep, VRAM_OFFSET_LO), 0x5566_7788);
    assert_eq!(rd(&mut ep, VRAM_OFFSET_HI), 0x1122_3344);
    ep.region_write(0, SCRATCH, &[1, 2]).unwrap();
    ep.region_write(0, SCRATCH + 1, &[1, 2, 3, 4]).unwrap();
    assert_eq!(rd(&mut ep, SCRATCH), 0);
    let mut b = [0xffu8; 2];
    ep.region_read(0, ID, &mut b).unwrap();
    assert_eq!(b, [0, 0]);
}

#[test]
fn test_vram_checksum_matches_reference_fnv1a64() {
    let mut ep = gpu();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    ep.region_write(2, 4096, &data).unwrap();
    window(&mut ep, 4096, data.len() as u64);
    wr(&mut ep, VRAM_CMD, CMD_CHECKSUM);
    assert_eq!(rd(&mut ep, VRAM_STATUS), STATUS_OK);
    assert_eq!(result(&mut ep), reference_fnv(&data));
    window(&mut ep, 0, 0);
    wr(&mut ep, VRAM_CMD, CMD_CHECKSUM);
    assert_eq!(
        result(&mut ep),
        0xcbf2_9ce4_8422_2325,
        "empty window: offset basis"
    );
}

#[test]
fn test_vram_fill_matches_reference_formula() {
    let mut ep = gpu();
    let (start, len, seed) = (12_345u64, 150_000usize, 0xdead_beefu32);
    window(&mut ep, start, len as u64);
    wr(&mut ep, VRAM_SEED, seed);
    wr(&mut ep, VRAM_CMD, CMD_FILL);
    assert_eq!(rd(&mut ep, VRAM_STATUS), STATUS_OK);
    let mut got = vec![0u8; len + 2];
    ep.region_read(2, start - 1, &mut got).unwrap();
    assert_eq!(got[0], 0, "byte before the window untouched");
    assert_eq!(got[len + 1], 0, "byte after the window untouched");
    for (i, b) in got[1..=len].iter().enumerate() {
        assert_eq!(*b, reference_fill(seed, i as u64), "byte {i}");
    }
    assert_eq!(fill_byte(seed, 77), reference_fill(seed, 77));
    assert_eq!(
        fill_byte(u32::MAX, u64::MAX),
        reference_fill(u32::MAX, u64::MAX)
    );
}

#[test]
fn test_vram_window_out_of_range_status1_memory_untouched() {
    let mut ep = gpu();
    wr(&mut ep, VRAM_SEED, 1);
    for (offset, len) in [
        (VRAM - 4, 8),
        (VRAM, 1),
        (u64::MAX, 2),
        (1, u64::MAX),
        (0, VRAM + 1),
    ] {
        window(&mut ep, offset, len);
        wr(&mut ep, VRAM_CMD, CMD_FILL);
        assert_eq!(
            rd(&mut ep, VRAM_STATUS),
            STATUS_OUT_OF_RANGE,
            "fill {offset:#x}+{len:#x}"
        );
        wr(&mut ep, VRAM_CMD, CMD_CHECKSUM);
        assert_eq!(rd(&mut ep, VRAM_STATUS), STATUS_OUT_OF_RANGE);
    }
    let mut tail = [0xffu8; 4];
    ep.region_read(2, VRAM - 4, &mut tail).unwrap();
    assert_eq!(tail, [0; 4]);
    window(&mut ep, 0, VRAM);
    wr(&mut ep, VRAM_CMD, CMD_CHECKSUM);
    assert_eq!(
        rd(&mut ep, VRAM_STATUS),
        STATUS_OK,
        "whole VRAM is in range"
    );
    wr(&mut ep, VRAM_CMD, 3);
    assert_eq!(rd(&mut ep, VRAM_STATUS), STATUS_UNKNOWN_COMMAND);
}

#[test]
fn test_vram_trapped_access_out_of_range_errors() {
    let mut ep = gpu();
    let mut b = [0u8; 8];
    assert!(ep.region_read(2, VRAM - 4, &mut b).is_err());
    assert!(ep.region_write(2, VRAM, &b).is_err());
    assert!(ep.region_read(3, 0, &mut b).is_err());
}

#[test]
fn test_doorbell_unbound_vector_pending_in_pba_error2() {
    let mut ep = gpu();
    let irqs = Interrupts::new(&[1, 0, 16, 1, 1]);
    ep.attach(ClientLink {
        irqs,
        dma: DmaSpace::new(),
    });
    wr(&mut ep, IRQ_DOORBELL, 9);
    assert_eq!(rd(&mut ep, IRQ_LAST_ERROR), IRQ_ERR_NOT_BOUND);
    assert_eq!(rd(&mut ep, IRQ_COUNT), 0);
    let mut pba = [0u8; 8];
    ep.region_read(0, u64::from(MSIX_PBA_OFFSET), &mut pba)
        .unwrap();
    assert_eq!(u64::from_le_bytes(pba), 1 << 9);
    ep.irqs_changed(irq_index::MSIX);
    assert!(ep.msix().unwrap().is_pending(9), "still unbound");
}

#[test]
fn test_doorbell_vector_out_of_range_error1() {
    let mut ep = gpu();
    wr(&mut ep, IRQ_DOORBELL, 16);
    assert_eq!(rd(&mut ep, IRQ_LAST_ERROR), IRQ_ERR_VECTOR_RANGE);
    wr(&mut ep, IRQ_DOORBELL, 0x1_0000);
    assert_eq!(rd(&mut ep, IRQ_LAST_ERROR), IRQ_ERR_VECTOR_RANGE);
    let mut pba = [0u8; 8];
    ep.region_read(0, u64::from(MSIX_PBA_OFFSET), &mut pba)
        .unwrap();
    assert_eq!(pba, [0; 8]);
}

#[test]
fn test_vram_memfd_shared_with_second_mapping() {
    let mut ep = gpu();
    let info = ep.region_info(2).unwrap();
    assert_eq!(info.size, VRAM);
    assert!(info.flags.read && info.flags.write && info.flags.mmap);
    let mmap = info.mmap.unwrap();
    assert_eq!(mmap.file_offset, 0);
    assert_eq!(mmap.areas.len(), 1);
    assert_eq!((mmap.areas[0].offset, mmap.areas[0].size), (0, VRAM));
    let file = File::from(mmap.fd.try_clone().unwrap());
    assert_eq!(file.metadata().unwrap().len(), VRAM);
    let second = MmapRegion::<()>::from_file(FileOffset::new(file, 0), VRAM as usize).unwrap();

    ep.region_write(2, 0x1234, b"written by the server")
        .unwrap();
    let mut seen = [0u8; 21];
    second.get_slice(0x1234, 21).unwrap().copy_to(&mut seen[..]);
    assert_eq!(&seen, b"written by the server");

    second
        .get_slice(VRAM as usize - 6, 6)
        .unwrap()
        .copy_from(b"client");
    let mut back = [0u8; 6];
    ep.region_read(2, VRAM - 6, &mut back).unwrap();
    assert_eq!(&back, b"client");
    assert!(ep.region_info(0).unwrap().mmap.is_none(), "BAR0 is trapped");
}

#[test]
fn test_vram_survives_flr_discarded_on_lost_connection() {
    let mut ep = gpu();
    ep.region_write(2, 0, b"keep").unwrap();
    let devctl = ep.cap_offsets().pcie.unwrap().0 + pcisim_pci::caps::pcie::DEVCTL;
    ep.region_write(region::CONFIG, u64::from(devctl), &0x8000u16.to_le_bytes())
        .unwrap();
    ep.reset().unwrap();
    enable(&mut ep);
    let mut b = [0u8; 4];
    ep.region_read(2, 0, &mut b).unwrap();
    assert_eq!(&b, b"keep");
    ep.detach();
    enable(&mut ep);
    ep.region_read(2, 0, &mut b).unwrap();
    assert_eq!(b, [0; 4]);
}

#[test]
fn test_regs_reset_on_every_reset_kind() {
    let mut ep = gpu();
    let dirty = |ep: &mut Endpoint<Gpu>| {
        wr(ep, SCRATCH, 1);
        wr(ep, VRAM_SEED, 2);
        wr(ep, IRQ_DOORBELL, 99);
        window(ep, 8, 8);
        wr(ep, VRAM_CMD, CMD_CHECKSUM);
    };
    let clean = |ep: &mut Endpoint<Gpu>| {
        for r in [
            SCRATCH,
            VRAM_SEED,
            IRQ_LAST_ERROR,
            VRAM_OFFSET_LO,
            VRAM_LENGTH_LO,
        ] {
            assert_eq!(rd(ep, r), 0, "register {r:#x}");
        }
        assert_eq!(result(ep), 0);
    };
    dirty(&mut ep);
    ep.reset().unwrap();
    clean(&mut ep);
    dirty(&mut ep);
    ep.detach();
    clean(&mut ep);
    // PM soft reset: D3hot then D0 with No_Soft_Reset = 0.
    dirty(&mut ep);
    let pmcsr = ep.cap_offsets().pm.unwrap().0 + pcisim_pci::caps::pm::PMCSR;
    ep.region_write(region::CONFIG, u64::from(pmcsr), &3u16.to_le_bytes())
        .unwrap();
    ep.region_write(region::CONFIG, u64::from(pmcsr), &0u16.to_le_bytes())
        .unwrap();
    clean(&mut ep);
}

#[test]
fn test_no_soft_reset_keeps_regs_across_d3hot() {
    let mut ep = endpoint(&GpuConfig {
        vram_size: VRAM,
        no_soft_reset: true,
        ..GpuConfig::default()
    })
    .unwrap();
    wr(&mut ep, SCRATCH, 7);
    let pmcsr = ep.cap_offsets().pm.unwrap().0 + pcisim_pci::caps::pm::PMCSR;
    ep.region_write(region::CONFIG, u64::from(pmcsr), &3u16.to_le_bytes())
        .unwrap();
    ep.region_write(region::CONFIG, u64::from(pmcsr), &0u16.to_le_bytes())
        .unwrap();
    assert_eq!(rd(&mut ep, SCRATCH), 7);
}

#[test]
fn test_vram_size_must_be_power_of_two_at_least_4k() {
    for bad in [0, 2048, 4096 + 4096 * 2, 3 << 20] {
        let e = endpoint(&GpuConfig {
            vram_size: bad,
            ..GpuConfig::default()
        });
        assert!(
            matches!(e, Err(GpuError::Vram(VramError::BadSize(_)))),
            "{bad}"
        );
    }
    assert!(endpoint(&GpuConfig {
        vram_size: 4096,
        ..GpuConfig::default()
    })
    .is_ok());
}

#[test]
fn test_default_config_ids_and_256m_vram() {
    let ep = endpoint(&GpuConfig::default()).unwrap();
    assert_eq!(ep.region_info(2).unwrap().size, 256 << 20);
    let d = ep.describe();
    assert_eq!(
        (d.vendor_id, d.device_id, d.class_code),
        (0x1234, 0x0b10, 0x030200)
    );
}

#[test]
fn test_describe_gpu_json() {
    let ep = gpu();
    let v = serde_json::to_value(ep.describe()).unwrap();
    let expected = serde_json::json!({
        "vendor_id": 4660, "device_id": 2832, "class_code": 197120, "revision": 1,
        "subsystem_vendor_id": 4660, "subsystem_id": 1,
        "bars": [
            {"index": 0, "size": 65536, "mem64": true, "prefetchable": false},
            {"index": 2, "size": VRAM, "mem64": true, "prefetchable": true}
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
fn test_config_bars_report_gpu_types() {
    let mut ep = gpu();
    let mut b = [0u8; 4];
    ep.region_read(region::CONFIG, 0x10, &mut b).unwrap();
    assert_eq!(
        u32::from_le_bytes(b),
        0b0100,
        "BAR0: 64-bit, non-prefetchable"
    );
    ep.region_read(region::CONFIG, 0x18, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0b1100, "BAR2: 64-bit, prefetchable");
}
