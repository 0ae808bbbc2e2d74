//! The vfio-user wire format: header, commands and their payloads, decoded from a complete frame
//! by pure functions that never panic.
//!
//! Source: the vfio-user protocol specification (docs/devel/vfio-user.rst in QEMU) and QEMU
//! 11.1's client (`hw/vfio-user/protocol.h`, `device.c`, `proxy.c`). All integers are
//! little-endian. A message is a 16-byte [`Header`] followed by `size - 16` payload bytes; file
//! descriptors travel as SCM_RIGHTS ancillary data with the message.
//!
//! The module is split by message family: the framing (header, command numbers,
//! reply and error frames), the [`Reader`]/[`Writer`] cursors, [`ProtoError`], [`decode`] with
//! the [`Request`] it yields, and one decoder module per family (VERSION; DMA_MAP/UNMAP; the
//! GET_*_INFO queries; SET_IRQS; region reads and writes). Every item is re-exported here, so
//! callers keep using `proto::Name`.

mod codec;
mod decode;
mod device_info;
mod dma_map;
mod error;
mod header;
mod negotiate;
mod region_access;
mod request;
mod set_irqs;

pub use codec::{Reader, Writer};
pub use decode::decode;
pub use device_info::*;
pub use dma_map::*;
pub use error::ProtoError;
pub use header::*;
pub use negotiate::*;
pub use region_access::*;
pub use request::{Limits, MultiWrite, Request};
pub use set_irqs::*;

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_data_xfer_size: 1 << 20,
    };

    fn hdr(cmd: Command, payload: usize) -> Header {
        Header {
            id: 7,
            command: cmd as u16,
            size: (16 + payload) as u32,
            flags: 0,
            error: 0,
        }
    }

    #[test]
    fn test_header_roundtrip() {
        let h = Header {
            id: 0xbeef,
            command: 9,
            size: 32,
            flags: 0x11,
            error: 22,
        };
        assert_eq!(Header::parse(&h.encode()), h);
    }

    #[test]
    fn test_version_with_caps_decodes() {
        let mut p = Writer::new();
        p.u16(0)
            .u16(0)
            .bytes(br#"{"capabilities":{"max_msg_fds":16}}"#)
            .bytes(&[0]);
        let p = p.finish();
        let r = decode(&hdr(Command::Version, p.len()), &p, &LIMITS).unwrap();
        let Request::Version { caps, .. } = r else {
            panic!()
        };
        assert_eq!(caps["capabilities"]["max_msg_fds"], 16);
    }

    #[test]
    fn test_version_bad_json_is_einval() {
        let p = [0u8, 0, 0, 0, b'{', b'x', 0];
        let e = decode(&hdr(Command::Version, p.len()), &p, &LIMITS).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
    }

    #[test]
    fn test_truncated_payloads_are_einval_for_every_command() {
        for c in [
            Command::DmaMap,
            Command::DmaUnmap,
            Command::DeviceGetInfo,
            Command::DeviceGetRegionInfo,
            Command::DeviceGetIrqInfo,
            Command::DeviceSetIrqs,
            Command::RegionRead,
            Command::RegionWrite,
            Command::RegionWriteMulti,
        ] {
            for n in 0..8 {
                let p = vec![0xffu8; n];
                let e = decode(&hdr(c, n), &p, &LIMITS).unwrap_err();
                assert_eq!(e.errno(), libc::EINVAL, "{c:?} with {n} bytes");
            }
        }
    }

    #[test]
    fn test_argsz_sized_payloads_are_accepted_and_the_tail_ignored() {
        let mut ri = Writer::new();
        ri.u32(64)
            .u32(0)
            .u32(2)
            .u32(0)
            .u64(0)
            .u64(0)
            .bytes(&[0xff; 32]);
        let ri = ri.finish();
        assert_eq!(
            decode(&hdr(Command::DeviceGetRegionInfo, ri.len()), &ri, &LIMITS),
            Ok(Request::GetRegionInfo {
                argsz: 64,
                index: 2
            })
        );
        let mut b = Writer::new();
        b.u32(22)
            .u32(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER)
            .u32(2)
            .u32(0)
            .u32(2)
            .bytes(&[1, 0, 7, 7]);
        let b = b.finish();
        let Ok(Request::SetIrqs { bools, .. }) =
            decode(&hdr(Command::DeviceSetIrqs, b.len()), &b, &LIMITS)
        else {
            panic!()
        };
        assert_eq!(bools, vec![1, 0], "exactly count bools, tail ignored");
        let mut rd = Writer::new();
        rd.u64(0).u32(0).u32(4).bytes(&[0]);
        let rd = rd.finish();
        assert!(decode(&hdr(Command::RegionRead, rd.len()), &rd, &LIMITS).is_err());
    }

    #[test]
    fn test_region_write_count_lie_is_einval() {
        let mut p = Writer::new();
        p.u64(0).u32(0).u32(8).u32(1);
        let p = p.finish();
        assert!(decode(&hdr(Command::RegionWrite, p.len()), &p, &LIMITS).is_err());
    }

    #[test]
    fn test_region_read_over_limit_is_e2big() {
        let mut p = Writer::new();
        p.u64(0).u32(0).u32((1 << 20) + 1);
        let p = p.finish();
        let e = decode(&hdr(Command::RegionRead, p.len()), &p, &LIMITS).unwrap_err();
        assert_eq!(e.errno(), libc::E2BIG);
    }

    #[test]
    fn test_unknown_command_is_enosys() {
        let h = Header {
            id: 1,
            command: 99,
            size: 16,
            flags: 0,
            error: 0,
        };
        assert_eq!(decode(&h, &[], &LIMITS).unwrap_err().errno(), libc::ENOSYS);
    }

    #[test]
    fn test_set_irqs_needs_one_data_and_one_action() {
        let mut p = Writer::new();
        p.u32(20)
            .u32(IRQ_SET_DATA_NONE | IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER)
            .u32(2)
            .u32(0)
            .u32(1);
        let p = p.finish();
        assert!(decode(&hdr(Command::DeviceSetIrqs, p.len()), &p, &LIMITS).is_err());
    }

    #[test]
    fn test_write_multi_decodes_and_bounds_counts() {
        let mut p = Writer::new();
        p.u64(2);
        p.u64(0x40).u32(0).u32(4).bytes(&[1, 2, 3, 4, 0, 0, 0, 0]);
        p.u64(0x44).u32(0).u32(2).bytes(&[5, 6, 0, 0, 0, 0, 0, 0]);
        let p = p.finish();
        let r = decode(&hdr(Command::RegionWriteMulti, p.len()), &p, &LIMITS).unwrap();
        let Request::RegionWriteMulti { writes } = r else {
            panic!()
        };
        assert_eq!(writes[1].data, vec![5, 6]);
        let mut bad = p.clone();
        bad[8 + 12] = 9; // count 9 > 8
        assert!(decode(&hdr(Command::RegionWriteMulti, bad.len()), &bad, &LIMITS).is_err());
    }

    #[test]
    fn test_device_feature_is_enotty() {
        let h = hdr(Command::DeviceFeature, 8);
        assert_eq!(
            decode(&h, &[0; 8], &LIMITS).unwrap_err().errno(),
            libc::ENOTTY
        );
    }

    #[test]
    fn test_decode_never_panics_on_garbage() {
        // A cheap deterministic sweep; the fuzz target covers this properly.
        let mut x: u64 = 0x1234_5678;
        for _ in 0..20000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let cmd = (x % 20) as u16;
            let n = ((x >> 8) % 64) as usize;
            let p: Vec<u8> = (0..n).map(|i| (x >> (i % 56)) as u8).collect();
            let h = Header {
                id: 0,
                command: cmd,
                size: (16 + n) as u32,
                flags: 0,
                error: 0,
            };
            let _ = decode(&h, &p, &LIMITS);
        }
    }
}
