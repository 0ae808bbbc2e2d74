//! The seed corpus, built here from the wire formats and committed under `fuzz/seeds/<target>/`
//! (`PCISIM_FUZZ_WRITE_SEEDS=1 cargo test --manifest-path fuzz/Cargo.toml` rewrites the files;
//! the tests check that they are current and that every seed passes its harness).

use pcisim_devices::gpu::ring::{self, flag, op};
use pcisim_devices::npu::queue::Descriptor;
use pcisim_devices::npu::regs as n;
use pcisim_devices::npu::walk::{PTE_P, PTE_RW, PTE_US};
use pcisim_vfio_user::proto;

use crate::frame::{frame, version_frame};

/// The targets.
pub const TARGETS: [&str; 5] = ["frame", "config", "region", "gpu_ring", "npu_queue"];

/// The seeds of `target`: (file name, bytes).
pub fn all(target: &str) -> Vec<(String, Vec<u8>)> {
    match target {
        "frame" => frame_seeds(),
        "config" => config_seeds(),
        "region" => region_seeds(),
        "gpu_ring" => gpu_ring_seeds(),
        "npu_queue" => npu_queue_seeds(),
        _ => Vec::new(),
    }
}

fn le(parts: &[u64], widths: &[usize]) -> Vec<u8> {
    let mut v = Vec::new();
    for (p, w) in parts.iter().zip(widths) {
        v.extend_from_slice(&p.to_le_bytes()[..*w]);
    }
    v
}

fn frame_input(flags: u8, plan: &[u8], frames: &[Vec<u8>]) -> Vec<u8> {
    let mut v = vec![flags, plan.len() as u8];
    v.extend_from_slice(plan);
    for f in frames {
        v.extend_from_slice(f);
    }
    v
}

fn frame_seeds() -> Vec<(String, Vec<u8>)> {
    use proto::Command as C;
    let c = |x: C| x as u16;
    let session = vec![
        frame(1, c(C::DeviceGetInfo), 0, &le(&[16, 0, 0, 0], &[4; 4])),
        frame(
            2,
            c(C::DeviceGetRegionInfo),
            0,
            &le(&[32, 0, 0, 0, 0, 0], &[4, 4, 4, 4, 8, 8]),
        ),
        frame(
            3,
            c(C::DeviceGetRegionInfo),
            0,
            &le(&[32, 0, 2, 0, 0, 0], &[4, 4, 4, 4, 8, 8]),
        ),
        frame(
            4,
            c(C::DeviceGetRegionInfo),
            0,
            &le(&[64, 0, 2, 0, 0, 0], &[4, 4, 4, 4, 8, 8]),
        ),
        frame(5, c(C::DeviceGetIrqInfo), 0, &le(&[16, 0, 2, 0], &[4; 4])),
        frame(
            6,
            c(C::RegionWrite),
            0,
            &le(&[0x10, 0, 4, 0xdead_beef], &[8, 4, 4, 4]),
        ),
        frame(7, c(C::RegionRead), 0, &le(&[0x10, 0, 4], &[8, 4, 4])),
        frame(
            8,
            c(C::RegionWrite),
            proto::FLAG_NO_REPLY,
            &le(&[0, 7, 2, 0x0406], &[8, 4, 4, 2]),
        ),
        frame(
            9,
            c(C::RegionWriteMulti),
            0,
            &le(
                &[2, 0x20, 0, 4, 0x1122_3344, 0x24, 7, 2, 0x5566],
                &[8, 8, 4, 4, 8, 8, 4, 4, 8],
            ),
        ),
        frame(
            10,
            c(C::DeviceSetIrqs),
            0,
            &le(&[20, 0b100001, 2, 0, 0], &[4; 5]),
        ),
        frame(
            11,
            c(C::DeviceSetIrqs),
            0,
            &le(&[22, 0b010010, 0, 0, 1, 1], &[4, 4, 4, 4, 4, 1]),
        ),
        frame(12, c(C::DeviceReset), 0, &[]),
        frame(13, c(C::DmaUnmap), 0, &le(&[24, 2, 0, 0], &[4, 4, 8, 8])),
        frame(14, 99, 0, &[]),
        frame(15, c(C::DeviceFeature), 0, &[0; 8]),
    ];
    let dma = vec![
        frame(
            1,
            c(C::DmaMap),
            0,
            &le(&[32, 3, 0, 0x1_0000_0000, 0x4000], &[4, 4, 8, 8, 8]),
        ),
        frame(
            2,
            c(C::DmaMap),
            0,
            &le(&[32, 1, 0, 0x2000_0000, 0x1000], &[4, 4, 8, 8, 8]),
        ),
        frame(
            3,
            c(C::DmaUnmap),
            0,
            &le(&[24, 0, 0x1_0000_0000, 0x4000], &[4, 4, 8, 8]),
        ),
        frame(
            4,
            c(C::DmaUnmap),
            0,
            &le(&[24, 0, 0, 1 << 48], &[4, 4, 8, 8]),
        ),
    ];
    let irqs = vec![
        frame(
            1,
            c(C::DeviceSetIrqs),
            0,
            &le(&[20, 0b100100, 2, 0, 2], &[4; 5]),
        ),
        frame(
            2,
            c(C::DeviceSetIrqs),
            0,
            &le(&[20, 0b010100, 0, 0, 1], &[4; 5]),
        ),
        frame(
            3,
            c(C::DeviceSetIrqs),
            0,
            &le(&[20, 0b100100, 2, 1, 3], &[4; 5]),
        ),
    ];
    let mut oversize = frame(2, c(C::RegionWrite), 0, &le(&[0, 0, 0x20000], &[8, 4, 4]));
    oversize[4..8].copy_from_slice(&(0x20010u32).to_le_bytes());
    vec![
        ("version".into(), frame_input(0, &[], &[version_frame(1)])),
        ("session".into(), frame_input(1, &[], &session)),
        // Frame 0 is the VERSION the harness prepends; DMA_MAP 1 carries the memfd.
        (
            "dma-map-fd".into(),
            frame_input(1, &[0, 0x09, 0, 0, 0], &dma),
        ),
        (
            "set-irqs-eventfds".into(),
            frame_input(1, &[0, 2, 1, 0x82], &irqs),
        ),
        (
            "oversize-then-eof".into(),
            frame_input(
                1,
                &[0, 0x40],
                &[oversize, frame(3, 1, 0, &[])[..8].to_vec()],
            ),
        ),
        (
            "desync".into(),
            frame_input(1, &[], &[le(&[5, 9, 8, 0], &[2, 2, 4, 8])]),
        ),
    ]
}

/// A config op: write of `len` (encoded in bits 3..5) at a 12-bit offset.
fn cw(len_code: u8, off: u16, data: &[u8]) -> Vec<u8> {
    let mut v = vec![len_code << 3];
    v.extend_from_slice(&off.to_le_bytes());
    let mut d = data.to_vec();
    d.resize(8, 0);
    v.extend_from_slice(&d);
    v
}

fn config_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (dev, name) in [(0u8, "gpu"), (1, "gpu-msi"), (2, "npu"), (3, "npu-peer")] {
        let mut v = vec![dev];
        v.extend(cw(0, 0x04, &[0x06, 0x04, 0, 0])); // Command: memory, bus master, INTx off
        v.extend(cw(0, 0x04, &[0, 0, 0xff, 0xff])); // Status: W1C everything
        v.extend([5u8, 0, 0]); // client read of dword 0
        v.extend([6u8, 0]); // size BAR 0
        v.extend([6u8, 1]); // size BAR 2
        v.extend(cw(0, 0x10, &[0xff; 4]));
        v.extend(cw(0, 0x44, &[0x03, 0, 0, 0])); // PM at 0x40: D3hot
        v.extend(cw(0, 0x44, &[0x00, 0, 0, 0])); // back to D0: soft reset
        v.extend(cw(2, 0x4a, &[0x00, 0x80])); // DevCtl +1 guesses: Initiate FLR
        v.extend([7u8]); // DEVICE_RESET
        v.extend(cw(4, 0xffc, &[0xff; 8])); // 8 bytes straddling the end
        out.push((format!("{name}-basics"), v));
    }
    out
}

/// A region op: `index_code` (bits 0..2), write flag, length code (bits 4..6), u16 offset.
fn rop(index_code: u8, write: bool, len_code: u8, off: u16, data: &[u8]) -> Vec<u8> {
    let mut v = vec![index_code | (u8::from(write) << 3) | (len_code << 4)];
    v.extend_from_slice(&off.to_le_bytes());
    v.extend_from_slice(data);
    v
}

fn region_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (dev, name) in [(4u8, "gpu"), (5, "gpu-msi"), (6, "npu"), (7, "npu-peer")] {
        let mut v = vec![dev];
        v.extend(rop(0, false, 0, 0x000, &[])); // ID
        v.extend(rop(0, true, 0, 0x040, &[1, 2, 3, 4])); // scratch / CMD_PASID
        v.extend(rop(0, false, 0, 0x040, &[]));
        v.extend(rop(0, true, 2, 0x048, &[9, 8, 7, 6, 5, 4, 3, 2])); // qword
        v.extend(rop(0, true, 0, 0x3f0, &[0xff; 4])); // no register there
        v.extend(rop(0, true, 3, 0x041, &[0xff])); // byte write: ignored
        v.extend(rop(0, true, 0, 0x8000, &[0, 0, 0xe0, 0xfe])); // MSI-X table
        v.extend(rop(0, false, 0, 0xc000, &[])); // PBA
        v.extend(rop(0, true, 0, 0xc000, &[1, 0, 0, 0])); // PBA write: ignored
        v.extend(rop(0, false, 2, 0x7ffc, &[])); // straddles the table start
        v.extend(rop(3, true, 0, 0x100, &[0xaa; 4])); // VRAM
        v.extend(rop(3, false, 7, 0x0f0, &[0x00, 0x01])); // VRAM read of 240 bytes at 0x100
        v.extend(rop(4, true, 0, 0x004, &[0x00, 0, 0, 0])); // Memory Space off
        v.extend(rop(0, false, 0, 0x000, &[])); // all-ones now
        v.extend(rop(0, true, 0, 0x040, &[5, 5, 5, 5])); // dropped
        v.extend([5u8, 9, 0, 0]); // region 9: none
        out.push((format!("{name}-basics"), v));
    }
    out
}

fn gpu_ring_header(flags: u8, page: u16, size_sel: u8, tail: u16, toggles: [u8; 2]) -> Vec<u8> {
    let mut v = vec![flags];
    v.extend_from_slice(&page.to_le_bytes());
    v.push(size_sel);
    v.extend_from_slice(&tail.to_le_bytes());
    v.push(0); // fence vector
    v.push(1); // error vector
    v.extend_from_slice(&toggles);
    v
}

fn gpu_ring_seeds() -> Vec<(String, Vec<u8>)> {
    let ring_at = 0x1000usize;
    let cmds = [
        ring::encode(op::FILL, 0, 0x4000, 0xa5a5_5a5a, 0x2000),
        ring::encode(op::COPY, flag::DST_VRAM, 0x4000, 0x100, 0x1800),
        ring::encode(op::COPY, flag::SRC_VRAM, 0x200, 0x8010, 0x1000),
        ring::encode(op::COPY, 0, 0x8000, 0x8800, 0x1000),
        ring::encode(op::FILL, flag::DST_VRAM, 0, 7, 0x40),
        ring::encode(op::WRITE_FENCE, flag::FENCE_IRQ, 0x3000, 42, 0),
        ring::encode(op::INTERRUPT, 0, 3, 0, 0),
        ring::encode(op::NOP, 0, 0, 0, 0),
    ];
    let image = |cmds: &[[u8; 32]]| {
        let mut img = vec![0u8; 0x1000 + ring_at];
        for (k, c) in cmds.iter().enumerate() {
            img[ring_at + 32 * k..ring_at + 32 * (k + 1)].copy_from_slice(c);
        }
        img
    };
    let mut all = gpu_ring_header(0, 1, 3, cmds.len() as u16, [0xff, 0xff]);
    all.extend(image(&cmds));
    let faults = [
        ring::encode(op::COPY, 0, 0xe000, 0x100, 0x20), // read-only source: fine
        ring::encode(op::COPY, 0, 0x100, 0xe000, 0x20), // read-only destination: fault
    ];
    let mut fault = gpu_ring_header(0, 1, 1, 2, [0xff, 0xff]);
    fault.extend(image(&faults));
    let mut refused = gpu_ring_header(0, 1, 3, 3, [1, 0xff]);
    refused.extend(image(&cmds));
    let mut hole = gpu_ring_header(0, 0xf, 2, 1, [0xff, 0xff]);
    hole.extend(image(&cmds));
    vec![
        ("all-commands".into(), all),
        ("readonly-fault".into(), fault),
        ("bus-master-off".into(), refused),
        ("ring-in-hole".into(), hole),
    ]
}

/// Page tables in the image mapping VA 0x20_0000.. (8 pages) to PA 0x8000.. through a PML4 at
/// 0x1000, a PDPT at 0x2000, a PD at 0x3000 and a PT at 0x4000.
fn npu_image(descs: &[Descriptor]) -> Vec<u8> {
    let mut img = vec![0u8; 0xe000];
    let mut put = |at: usize, v: u64| img[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let f = PTE_P | PTE_RW | PTE_US;
    put(0x1000, 0x2000 | f);
    put(0x2000, 0x3000 | f);
    put(0x3000 + 8, 0x4000 | f);
    for k in 0..8u64 {
        put(0x4000 + 8 * k as usize, (0x8000 + 0x1000 * k) | f);
    }
    put(0x4000 + 8 * 8, 0xe000 | PTE_P | PTE_US); // read-only page
    for (k, d) in descs.iter().enumerate() {
        let at = 0x5000 + 64 * k;
        img[at..at + 64].copy_from_slice(&d.encode());
    }
    img
}

fn npu_header(flags: u8, tail: u16, binds: &[(u16, u16, u8)]) -> Vec<u8> {
    let mut v = vec![flags];
    v.extend_from_slice(&(0x5000u16 / 32).to_le_bytes());
    v.push(4); // 16 entries
    v.extend_from_slice(&tail.to_le_bytes());
    v.extend_from_slice(&(0x6000u16 / 32).to_le_bytes());
    v.push(4);
    v.push(0);
    v.extend_from_slice(&(0x7000u16 / 32).to_le_bytes());
    v.push(4);
    v.extend_from_slice(&[0x81, 0x82, 0x83]);
    for &(pasid, root, fl) in binds {
        v.extend_from_slice(&pasid.to_le_bytes());
        v.extend_from_slice(&root.to_le_bytes());
        v.push(fl);
    }
    v
}

fn npu_queue_seeds() -> Vec<(String, Vec<u8>)> {
    const VA: u64 = 0x20_0000;
    let d = |op: u8, src: u64, dst: u64, len: u64, crec: u64, tag: u64| Descriptor {
        op,
        flags: n::DESC_FLAG_IRQ,
        pasid: 5,
        src,
        dst,
        len,
        crec,
        tag,
        reserved_set: false,
    };
    let descs = [
        d(n::DESC_FILL, 0x0102_0304_0506_0708, VA, 0x1000, 0, 1),
        d(n::DESC_MEMCPY, VA, VA + 0x1800, 0x1800, VA + 0x7ff0, 2),
        d(n::DESC_COMPARE, VA, VA + 0x1800, 0x100, 0, 3),
        d(n::DESC_NOP, 0, 0, 0, 0, 4),
        d(n::DESC_FILL, 1, VA + 0x8000, 0x10, 0, 5), // read-only page: write fault
        d(n::DESC_MEMCPY, VA, 0x7f00_0000_0000, 0x10, 0, 6), // unmapped: fault
        d(9, 0, 0, 0, 0, 7),
    ];
    let mut basic = npu_header(1, descs.len() as u16, &[(5, 1, 0)]);
    basic.extend(npu_image(&descs));
    let mut unbind = npu_header(1 | 8 | 0x10, descs.len() as u16, &[(5, 1, 0)]);
    unbind.extend_from_slice(&5u16.to_le_bytes());
    unbind.extend(npu_image(&descs));
    let mut two = npu_header(2 | 4, 3, &[(5, 1, 0), (6, 1, 1)]);
    two.extend_from_slice(&5u16.to_le_bytes());
    two.extend_from_slice(&VA.to_le_bytes());
    two.extend_from_slice(&0x1000u64.to_le_bytes());
    two.extend(npu_image(&descs));
    vec![
        ("basic".into(), basic),
        ("unbind-abort".into(), unbind),
        ("two-pasids-invalidate".into(), two),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn test_seed_files_are_current() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
        let write = std::env::var_os("PCISIM_FUZZ_WRITE_SEEDS").is_some();
        for t in TARGETS {
            let dir = root.join(t);
            for (name, bytes) in all(t) {
                let path = dir.join(&name);
                if write {
                    std::fs::create_dir_all(&dir).unwrap();
                    std::fs::write(&path, &bytes).unwrap();
                } else {
                    let on_disk =
                        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    assert_eq!(on_disk, bytes, "{} is stale", path.display());
                }
            }
        }
    }
}
