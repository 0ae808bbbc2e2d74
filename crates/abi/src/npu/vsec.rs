//! The vendor-specific capability (PCI capability ID 0x09) an NPU carries when a GPU peer is
//! configured (docs/npu.md, "Vendor-specific capability (GPU peer)"). It is how a driver learns,
//! from configuration space alone, which GPU function the NPU works with:
//!
//! ```text
//! +0 u8 cap ID 0x09 | +1 u8 next | +2 u8 length (12) | +3 u8 kind (0x01 GPU peer)
//! +4 u32 peer id | +8 u16 peer vendor | +10 u16 peer device
//! ```

use crate::le;

abi_table! {
    /// The capability's numbers (for the C header).
    TABLE;
    /// PCI capability ID of a vendor-specific capability.
    CAP_ID: u8 = 0x09;
    /// Length of the capability in bytes, header included.
    LENGTH: u8 = 12;
    /// Offset of the kind byte (the first byte after the standard 3-byte header).
    KIND_OFFSET: u8 = 3;
    /// Kind: the capability names a GPU peer.
    KIND_GPU_PEER: u8 = 0x01;
    /// Offset of the peer ID (u32; pcisim derives it from the peer's socket path, never 0).
    PEER_ID_OFFSET: u8 = 4;
    /// Offset of the peer's vendor ID (u16).
    PEER_VENDOR_OFFSET: u8 = 8;
    /// Offset of the peer's device ID (u16).
    PEER_DEVICE_OFFSET: u8 = 10;
}

/// Bytes of the capability after its 3-byte header (ID, next, length).
pub const DATA_LEN: usize = LENGTH as usize - KIND_OFFSET as usize;

/// The GPU peer a capability names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCapability {
    /// Peer identity.
    pub id: u32,
    /// The peer's vendor ID.
    pub vendor_id: u16,
    /// The peer's device ID.
    pub device_id: u16,
}

impl PeerCapability {
    /// The capability's bytes after the 3-byte header (kind first), as the device builds it.
    pub fn data(&self) -> [u8; DATA_LEN] {
        let mut d = [0u8; DATA_LEN];
        let base = KIND_OFFSET as usize;
        d[0] = KIND_GPU_PEER;
        le::put_u32(&mut d, PEER_ID_OFFSET as usize - base, self.id);
        le::put_u16(&mut d, PEER_VENDOR_OFFSET as usize - base, self.vendor_id);
        le::put_u16(&mut d, PEER_DEVICE_OFFSET as usize - base, self.device_id);
        d
    }

    /// Parses a whole capability (from its ID byte on): None unless it is a vendor-specific
    /// capability of kind GPU peer, at least [`LENGTH`] bytes long.
    pub fn parse(cap: &[u8]) -> Option<PeerCapability> {
        if cap.len() < LENGTH as usize
            || cap[0] != CAP_ID
            || cap[2] < LENGTH
            || cap[KIND_OFFSET as usize] != KIND_GPU_PEER
        {
            return None;
        }
        Some(PeerCapability {
            id: le::u32_at(cap, PEER_ID_OFFSET as usize),
            vendor_id: le::u16_at(cap, PEER_VENDOR_OFFSET as usize),
            device_id: le::u16_at(cap, PEER_DEVICE_OFFSET as usize),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_peer_capability_layout_and_roundtrip() {
        let p = PeerCapability {
            id: 0x1122_3344,
            vendor_id: 0x1234,
            device_id: 0x0b10,
        };
        let d = p.data();
        assert_eq!(d, [0x01, 0x44, 0x33, 0x22, 0x11, 0x34, 0x12, 0x10, 0x0b]);
        let mut cap = [CAP_ID, 0x40, LENGTH, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        cap[3..].copy_from_slice(&d);
        assert_eq!(PeerCapability::parse(&cap), Some(p));
        let mut other_kind = cap;
        other_kind[3] = 2;
        assert_eq!(PeerCapability::parse(&other_kind), None);
        assert_eq!(PeerCapability::parse(&cap[..11]), None);
    }
}
