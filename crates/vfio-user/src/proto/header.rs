//! Framing shared by every message: the 16-byte [`Header`], its flag bits, the [`Command`]
//! numbers, and the builders of reply and error frames. Kept apart from the per-command payload
//! decoders (the sibling modules) because the connection code needs only this part to cut and
//! answer frames.

use super::Reader;

/// Size of the message header.
pub const HEADER_SIZE: usize = 16;

/// Header flag bits 0..3: message type.
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// Message type: command.
pub const FLAG_TYPE_COMMAND: u32 = 0;
/// Message type: reply.
pub const FLAG_TYPE_REPLY: u32 = 1;
/// The sender expects no reply (posted write).
pub const FLAG_NO_REPLY: u32 = 0x10;
/// The reply is an error; `error` holds the errno.
pub const FLAG_ERROR: u32 = 0x20;

/// Command numbers (spec "Commands" table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    /// Version and capability negotiation.
    Version = 1,
    /// Announce client memory for DMA.
    DmaMap = 2,
    /// Withdraw client memory.
    DmaUnmap = 3,
    /// Device flags and counts.
    DeviceGetInfo = 4,
    /// One region's size, flags and mmap information.
    DeviceGetRegionInfo = 5,
    /// ioeventfd/ioregionfd setup (not supported).
    DeviceGetRegionIoFds = 6,
    /// One interrupt index's count and flags.
    DeviceGetIrqInfo = 7,
    /// Bind, mask, unmask, trigger interrupts.
    DeviceSetIrqs = 8,
    /// Read from a region.
    RegionRead = 9,
    /// Write to a region.
    RegionWrite = 10,
    /// Server → client DMA read.
    DmaRead = 11,
    /// Server → client DMA write.
    DmaWrite = 12,
    /// Reset the device.
    DeviceReset = 13,
    /// Deprecated dirty page tracking.
    DirtyPages = 14,
    /// Several small region writes in one message.
    RegionWriteMulti = 15,
    /// VFIO_DEVICE_FEATURE (migration features).
    DeviceFeature = 16,
    /// Migration data read.
    MigDataRead = 17,
    /// Migration data write.
    MigDataWrite = 18,
}

impl Command {
    /// The command with this number, if it is one.
    pub fn from_u16(v: u16) -> Option<Command> {
        use Command::*;
        Some(match v {
            1 => Version,
            2 => DmaMap,
            3 => DmaUnmap,
            4 => DeviceGetInfo,
            5 => DeviceGetRegionInfo,
            6 => DeviceGetRegionIoFds,
            7 => DeviceGetIrqInfo,
            8 => DeviceSetIrqs,
            9 => RegionRead,
            10 => RegionWrite,
            11 => DmaRead,
            12 => DmaWrite,
            13 => DeviceReset,
            14 => DirtyPages,
            15 => RegionWriteMulti,
            16 => DeviceFeature,
            17 => MigDataRead,
            18 => MigDataWrite,
            _ => return None,
        })
    }
}

/// The 16-byte message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Message id; a reply carries the id of its command.
    pub id: u16,
    /// Command number.
    pub command: u16,
    /// Total message size including this header.
    pub size: u32,
    /// Type and flag bits.
    pub flags: u32,
    /// errno of an error reply.
    pub error: u32,
}

impl Header {
    /// Decode a header.
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Header {
        let mut r = Reader::new(b);
        // The reader cannot run short: the array has exactly the header's size.
        Header {
            id: r.u16().unwrap_or(0),
            command: r.u16().unwrap_or(0),
            size: r.u32().unwrap_or(0),
            flags: r.u32().unwrap_or(0),
            error: r.u32().unwrap_or(0),
        }
    }

    /// Encode a header.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }

    /// Whether the sender asked for no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }

    /// Whether this is a command (as opposed to a reply).
    pub fn is_command(&self) -> bool {
        self.flags & FLAG_TYPE_MASK == FLAG_TYPE_COMMAND
    }
}

/// The header of a successful reply with `payload_len` payload bytes to the command `cmd`.
pub fn reply_header(cmd: &Header, payload_len: usize) -> Header {
    Header {
        id: cmd.id,
        command: cmd.command,
        size: (HEADER_SIZE + payload_len) as u32,
        flags: FLAG_TYPE_REPLY,
        error: 0,
    }
}

/// Build a complete reply frame (header + payload) to the command with header `cmd`.
pub fn reply_frame(cmd: &Header, payload: &[u8]) -> Vec<u8> {
    let h = reply_header(cmd, payload.len());
    let mut v = Vec::with_capacity(HEADER_SIZE + payload.len());
    v.extend_from_slice(&h.encode());
    v.extend_from_slice(payload);
    v
}

/// Build an error reply frame carrying `errno` (never 0: QEMU would read 0 as success).
pub fn error_frame(cmd: &Header, errno: i32) -> Vec<u8> {
    let errno = if errno <= 0 { libc::EIO } else { errno };
    Header {
        id: cmd.id,
        command: cmd.command,
        size: HEADER_SIZE as u32,
        flags: FLAG_TYPE_REPLY | FLAG_ERROR,
        error: errno as u32,
    }
    .encode()
    .to_vec()
}
