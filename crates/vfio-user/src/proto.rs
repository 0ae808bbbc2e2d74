//! The vfio-user wire format: header, commands and their payloads, decoded from a complete frame
//! by pure functions that never panic.
//!
//! Source: the vfio-user protocol specification (docs/devel/vfio-user.rst in QEMU) and QEMU
//! 11.1's client (`hw/vfio-user/protocol.h`, `device.c`, `proxy.c`). All integers are
//! little-endian. A message is a 16-byte [`Header`] followed by `size - 16` payload bytes; file
//! descriptors travel as SCM_RIGHTS ancillary data with the message.

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

/// Protocol major version we speak.
pub const VERSION_MAJOR: u16 = 0;
/// Protocol minor version we speak (QEMU 11.1 offers 0.0 and refuses a reply with minor > 0).
pub const VERSION_MINOR: u16 = 0;

/// `VFIO_DEVICE_FLAGS_RESET` (linux/vfio.h): the device supports DEVICE_RESET.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// `VFIO_DEVICE_FLAGS_PCI` (linux/vfio.h): the device is a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// `VFIO_REGION_INFO_FLAG_READ`.
pub const REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// `VFIO_REGION_INFO_FLAG_WRITE`.
pub const REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_REGION_INFO_FLAG_MMAP`.
pub const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// `VFIO_REGION_INFO_FLAG_CAPS`.
pub const REGION_INFO_FLAG_CAPS: u32 = 1 << 3;
/// `VFIO_REGION_INFO_CAP_SPARSE_MMAP`.
pub const REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;

/// `VFIO_IRQ_INFO_EVENTFD`.
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// `VFIO_IRQ_INFO_MASKABLE`.
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// `VFIO_IRQ_INFO_AUTOMASKED`.
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
/// `VFIO_IRQ_INFO_NORESIZE`.
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;

/// `VFIO_IRQ_SET_DATA_NONE`.
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// `VFIO_IRQ_SET_DATA_BOOL`.
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
/// `VFIO_IRQ_SET_DATA_EVENTFD`.
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// `VFIO_IRQ_SET_ACTION_MASK`.
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
/// `VFIO_IRQ_SET_ACTION_UNMASK`.
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
/// `VFIO_IRQ_SET_ACTION_TRIGGER`.
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
const IRQ_SET_DATA_MASK: u32 = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD;
const IRQ_SET_ACTION_MASK_ALL: u32 =
    IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER;

/// DMA_UNMAP flag: return a dirty bitmap (not supported: we do no migration).
pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// DMA_UNMAP flag: unmap everything (`VFIO_DMA_UNMAP_FLAG_ALL` in linux/vfio.h).
pub const DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

/// REGION_WRITE_MULTI: bytes of data in one coalesced write.
pub const MULTI_DATA: usize = 8;
/// REGION_WRITE_MULTI: most writes in one message (QEMU's `VFIO_USER_MULTI_MAX`).
pub const MULTI_MAX: u64 = 200;

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

/// Why a frame could not be decoded; each maps to the errno of the error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The payload is shorter than the command's fixed part, or longer than it may be.
    #[error("{command:?}: payload of {got} bytes, expected {expected}")]
    BadLength {
        /// The command.
        command: Command,
        /// Bytes received.
        got: usize,
        /// What was expected (human readable).
        expected: &'static str,
    },
    /// A field has a value the spec does not allow.
    #[error("{command:?}: invalid {field}")]
    BadField {
        /// The command.
        command: Command,
        /// Which field.
        field: &'static str,
    },
    /// The transfer is larger than negotiated.
    #[error("{command:?}: {count} bytes exceed the negotiated maximum of {max}")]
    TooBig {
        /// The command.
        command: Command,
        /// Bytes requested.
        count: u64,
        /// The limit.
        max: usize,
    },
    /// A command number we do not know.
    #[error("Unknown command {0}")]
    UnknownCommand(u16),
    /// A command we know but do not implement (or that is not valid client → server).
    #[error("{0:?} is not supported by this server")]
    Unsupported(Command),
    /// The VERSION JSON is malformed.
    #[error("VERSION: malformed capabilities JSON: {0}")]
    BadJson(String),
    /// The message is not a command.
    #[error("Message type {0:#x} is not a command")]
    NotACommand(u32),
    /// A command's header has flag bits set that a command may not carry: reserved bits, or
    /// `Error` (which only a reply may set).
    #[error("Header flags {0:#x} are not valid on a command")]
    BadHeaderFlags(u32),
}

impl ProtoError {
    /// The errno carried by the error reply. Never 0.
    pub fn errno(&self) -> i32 {
        match self {
            ProtoError::TooBig { .. } => libc::E2BIG,
            ProtoError::UnknownCommand(_) => libc::ENOSYS,
            // QEMU (like the kernel) treats ENOTTY from DEVICE_FEATURE as "feature absent".
            ProtoError::Unsupported(Command::DeviceFeature) => libc::ENOTTY,
            ProtoError::Unsupported(_) => libc::ENOTSUP,
            _ => libc::EINVAL,
        }
    }
}

/// A decoded command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// VERSION.
    Version {
        /// Client major version.
        major: u16,
        /// Client minor version.
        minor: u16,
        /// The client's capabilities (`{"capabilities":{...}}`), `Null` if absent.
        caps: serde_json::Value,
    },
    /// DMA_MAP.
    DmaMap {
        /// READ/WRITE flags.
        flags: u32,
        /// Offset into the fd.
        offset: u64,
        /// IOVA.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// DMA_UNMAP.
    DmaUnmap {
        /// argsz as sent (echoed in the reply).
        argsz: u32,
        /// Flags.
        flags: u32,
        /// IOVA.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// DEVICE_GET_INFO.
    GetInfo {
        /// Room the client has for the reply payload.
        argsz: u32,
    },
    /// DEVICE_GET_REGION_INFO.
    GetRegionInfo {
        /// Room the client has for the reply payload.
        argsz: u32,
        /// Region index.
        index: u32,
    },
    /// DEVICE_GET_IRQ_INFO.
    GetIrqInfo {
        /// Room the client has for the reply payload.
        argsz: u32,
        /// Interrupt index.
        index: u32,
    },
    /// DEVICE_SET_IRQS.
    SetIrqs {
        /// DATA_* | ACTION_* flags (exactly one of each).
        flags: u32,
        /// Interrupt index.
        index: u32,
        /// First vector.
        start: u32,
        /// Number of vectors.
        count: u32,
        /// DATA_BOOL: one byte per vector.
        bools: Vec<u8>,
    },
    /// REGION_READ.
    RegionRead {
        /// Offset in the region.
        offset: u64,
        /// Region index.
        region: u32,
        /// Bytes to read.
        count: u32,
    },
    /// REGION_WRITE.
    RegionWrite {
        /// Offset in the region.
        offset: u64,
        /// Region index.
        region: u32,
        /// The bytes.
        data: Vec<u8>,
    },
    /// REGION_WRITE_MULTI.
    RegionWriteMulti {
        /// The writes, in order.
        writes: Vec<MultiWrite>,
    },
    /// DEVICE_RESET.
    DeviceReset,
}

/// One write of a REGION_WRITE_MULTI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiWrite {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// The bytes (at most 8).
    pub data: Vec<u8>,
}

/// Little-endian cursor over a payload; every read is bounds-checked.
#[derive(Debug)]
pub struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `b`.
    pub fn new(b: &'a [u8]) -> Self {
        Reader { b, pos: 0 }
    }
    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.b.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    /// A u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2)
            .and_then(|s| s.try_into().ok())
            .map(u16::from_le_bytes)
    }
    /// A u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .and_then(|s| s.try_into().ok())
            .map(u32::from_le_bytes)
    }
    /// A u64.
    pub fn u64(&mut self) -> Option<u64> {
        self.bytes(8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
    }
    /// Bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.b.get(self.pos..).unwrap_or(&[])
    }
}

/// Limits a decode must respect (negotiated or fixed by the server).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest REGION_READ/REGION_WRITE data transfer.
    pub max_data_xfer_size: usize,
}

fn short(command: Command, got: usize, expected: &'static str) -> ProtoError {
    ProtoError::BadLength {
        command,
        got,
        expected,
    }
}

/// Decode a complete command frame's payload. Pure: never panics, never allocates more than the
/// payload's size (plus a bounded number of small vectors).
///
/// Payload lengths follow the kernel's `argsz` convention wherever the request is a VFIO ioctl
/// structure (DMA_MAP, DMA_UNMAP, DEVICE_GET_INFO, DEVICE_GET_REGION_INFO, DEVICE_GET_IRQ_INFO,
/// DEVICE_SET_IRQS): a payload at least as long as the structure is accepted and its tail
/// ignored, because clients other than QEMU (libvfio-user's, and anything built on the ioctl
/// structures) send a request as long as the reply they expect — e.g. DEVICE_GET_REGION_INFO
/// with 64 bytes after a first reply said `argsz` = 64. A shorter payload is EINVAL. Requests
/// that are not ioctl structures keep exact lengths: VERSION (its JSON runs to the end),
/// REGION_READ (16 bytes: it has no `argsz` and no ioctl behind it), REGION_WRITE (16 + `count`), REGION_WRITE_MULTI (8 + 24 × n) and
/// DEVICE_RESET (no payload).
pub fn decode(header: &Header, payload: &[u8], limits: &Limits) -> Result<Request, ProtoError> {
    if !header.is_command() {
        return Err(ProtoError::NotACommand(header.flags & FLAG_TYPE_MASK));
    }
    // The spec defines the type, No_reply and Error bits; a command may only carry No_reply.
    if header.flags & !(FLAG_TYPE_MASK | FLAG_NO_REPLY) != 0 {
        return Err(ProtoError::BadHeaderFlags(header.flags));
    }
    let cmd =
        Command::from_u16(header.command).ok_or(ProtoError::UnknownCommand(header.command))?;
    let mut r = Reader::new(payload);
    let len = payload.len();
    match cmd {
        Command::Version => {
            let (major, minor) = match (r.u16(), r.u16()) {
                (Some(a), Some(b)) => (a, b),
                _ => return Err(short(cmd, len, "at least 4 bytes")),
            };
            let caps = parse_caps(r.rest())?;
            Ok(Request::Version { major, minor, caps })
        }
        Command::DmaMap => {
            let f = (r.u32(), r.u32(), r.u64(), r.u64(), r.u64());
            // A longer payload is accepted and its tail ignored (see `decode`'s doc).
            let (Some(argsz), Some(flags), Some(offset), Some(iova), Some(size)) = f else {
                return Err(short(cmd, len, "at least 32 bytes"));
            };
            if (argsz as usize) < 32 {
                return Err(ProtoError::BadField {
                    command: cmd,
                    field: "argsz",
                });
            }
            if flags & !(crate::dma::PROT_READ | crate::dma::PROT_WRITE) != 0 {
                return Err(ProtoError::BadField {
                    command: cmd,
                    field: "flags",
                });
            }
            Ok(Request::DmaMap {
                flags,
                offset,
                iova,
                size,
            })
        }
        Command::DmaUnmap => {
            let f = (r.u32(), r.u32(), r.u64(), r.u64());
            let (Some(argsz), Some(flags), Some(iova), Some(size)) = f else {
                return Err(short(cmd, len, "at least 24 bytes"));
            };
            if (argsz as usize) < 24 {
                return Err(ProtoError::BadField {
                    command: cmd,
                    field: "argsz",
                });
            }
            if flags & !(DMA_UNMAP_FLAG_ALL | DMA_UNMAP_FLAG_GET_DIRTY_BITMAP) != 0 {
                return Err(ProtoError::BadField {
                    command: cmd,
                    field: "flags",
                });
            }
            if flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
                return Err(ProtoError::Unsupported(Command::DirtyPages));
            }
            if flags & DMA_UNMAP_FLAG_ALL != 0 && (iova != 0 || size != 0) {
                return Err(ProtoError::BadField {
                    command: cmd,
                    field: "address/size with UNMAP_ALL",
                });
            }
            Ok(Request::DmaUnmap {
                argsz,
                flags,
                iova,
                size,
            })
        }
        Command::DeviceGetInfo => {
            if len < 16 {
                return Err(short(cmd, len, "at least 16 bytes"));
            }
            let Some(argsz) = r.u32() else {
                return Err(short(cmd, len, "at least 16 bytes"));
            };
            if argsz < 16 {
                return Err(ProtoError::BadField {
                    command: cmd,
                    field: "argsz",
                });
            }
            Ok(Request::GetInfo { argsz })
        }
        Command::DeviceGetRegionInfo => {
            if len < 32 {
                return Err(short(cmd, len, "at least 32 bytes"));
            }
            let (Some(argsz), Some(_flags), Some(index)) = (r.u32(), r.u32(), r.u32()) else {
                return Err(short(cmd, len, "at least 32 bytes"));
            };
            if argsz < 32 {
                return Err(ProtoError::BadField {
                    command: cmd,
                    field: "argsz",
                });
            }
            Ok(Request::GetRegionInfo { argsz, index })
        }
        Command::DeviceGetIrqInfo => {
            if len < 16 {
                return Err(short(cmd, len, "at least 16 bytes"));
            }
            let (Some(argsz), Some(_flags), Some(index)) = (r.u32(), r.u32(), r.u32()) else {
                return Err(short(cmd, len, "at least 16 bytes"));
            };
            if argsz < 16 {
                return Err(ProtoError::BadField {
                    command: cmd,
                    field: "argsz",
                });
            }
            Ok(Request::GetIrqInfo { argsz, index })
        }
        Command::DeviceSetIrqs => {
            let f = (r.u32(), r.u32(), r.u32(), r.u32(), r.u32());
            let (Some(argsz), Some(flags), Some(index), Some(start), Some(count)) = f else {
                return Err(short(cmd, len, "at least 20 bytes"));
            };
            let data = flags & IRQ_SET_DATA_MASK;
            let action = flags & IRQ_SET_ACTION_MASK_ALL;
            let unknown = flags & !(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK_ALL);
            if unknown != 0 || data.count_ones() != 1 || action.count_ones() != 1 {
                return Err(ProtoError::BadField {
                    command: cmd,
                    field: "flags",
                });
            }
            // As the kernel (vfio_set_irqs_validate_and_prepare): the data is `count` elements
            // right after the structure, and whatever follows them is ignored. DATA_NONE and
            // DATA_EVENTFD carry no in-band data (eventfds travel as SCM_RIGHTS), so any tail
            // after the 20 bytes is ignored too.
            let rest = r.rest();
            let bools = if data == IRQ_SET_DATA_BOOL {
                match rest.get(..count as usize) {
                    Some(b) => b.to_vec(),
                    None => return Err(short(cmd, len, "20 bytes + one byte per vector")),
                }
            } else {
                Vec::new()
            };
            // argsz covers the structure and, for DATA_BOOL, the bools that follow it (QEMU
            // sends argsz = 20 + count; the kernel's rule is argsz - 20 >= count * data size).
            // Eventfds travel as SCM_RIGHTS, so for DATA_EVENTFD only the 20 bytes count
            // (QEMU sends 20; a client copying the ioctl's argsz may send 20 + 4 * count).
            let needed = if data == IRQ_SET_DATA_BOOL {
                20 + u64::from(count)
            } else {
                20
            };
            if u64::from(argsz) < needed {
                return Err(ProtoError::BadField {
                    command: cmd,
                    field: "argsz",
                });
            }
            Ok(Request::SetIrqs {
                flags,
                index,
                start,
                count,
                bools,
            })
        }
        Command::RegionRead => {
            if len != 16 {
                return Err(short(cmd, len, "16 bytes"));
            }
            let (Some(offset), Some(region), Some(count)) = (r.u64(), r.u32(), r.u32()) else {
                return Err(short(cmd, len, "16 bytes"));
            };
            if count as usize > limits.max_data_xfer_size {
                return Err(ProtoError::TooBig {
                    command: cmd,
                    count: count.into(),
                    max: limits.max_data_xfer_size,
                });
            }
            Ok(Request::RegionRead {
                offset,
                region,
                count,
            })
        }
        Command::RegionWrite => {
            let (Some(offset), Some(region), Some(count)) = (r.u64(), r.u32(), r.u32()) else {
                return Err(short(cmd, len, "at least 16 bytes"));
            };
            if count as usize > limits.max_data_xfer_size {
                return Err(ProtoError::TooBig {
                    command: cmd,
                    count: count.into(),
                    max: limits.max_data_xfer_size,
                });
            }
            let data = r.rest();
            if data.len() != count as usize {
                return Err(short(cmd, len, "16 bytes + count"));
            }
            Ok(Request::RegionWrite {
                offset,
                region,
                data: data.to_vec(),
            })
        }
        Command::RegionWriteMulti => {
            let Some(n) = r.u64() else {
                return Err(short(cmd, len, "at least 8 bytes"));
            };
            if n == 0 || n > MULTI_MAX {
                return Err(ProtoError::BadField {
                    command: cmd,
                    field: "wr_cnt",
                });
            }
            // QEMU sends the whole array of MULTI_MAX slots or just the used ones; accept both.
            let need = 24 * n as usize;
            if r.rest().len() < need
                || !(r.rest().len() - need).is_multiple_of(24)
                || r.rest().len() > 24 * MULTI_MAX as usize
            {
                return Err(short(cmd, len, "8 + 24 * wr_cnt bytes"));
            }
            let mut writes = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let (Some(offset), Some(region), Some(count), Some(data)) =
                    (r.u64(), r.u32(), r.u32(), r.bytes(MULTI_DATA))
                else {
                    return Err(short(cmd, len, "8 + 24 * wr_cnt bytes"));
                };
                if count == 0 || count as usize > MULTI_DATA {
                    return Err(ProtoError::BadField {
                        command: cmd,
                        field: "count",
                    });
                }
                let data = data.get(..count as usize).unwrap_or(&[]).to_vec();
                writes.push(MultiWrite {
                    offset,
                    region,
                    data,
                });
            }
            Ok(Request::RegionWriteMulti { writes })
        }
        Command::DeviceReset => {
            if len != 0 {
                return Err(short(cmd, len, "0 bytes"));
            }
            Ok(Request::DeviceReset)
        }
        Command::DeviceGetRegionIoFds
        | Command::DmaRead
        | Command::DmaWrite
        | Command::DirtyPages
        | Command::DeviceFeature
        | Command::MigDataRead
        | Command::MigDataWrite => Err(ProtoError::Unsupported(cmd)),
    }
}

fn parse_caps(rest: &[u8]) -> Result<serde_json::Value, ProtoError> {
    // The JSON string is NUL-terminated; tolerate a missing terminator and trailing padding.
    let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
    let text = rest.get(..end).unwrap_or(&[]);
    if text.iter().all(|c| c.is_ascii_whitespace()) {
        return Ok(serde_json::Value::Null);
    }
    let v: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| ProtoError::BadJson(e.to_string()))?;
    if !v.is_object() {
        return Err(ProtoError::BadJson("not a JSON object".into()));
    }
    Ok(v)
}

/// A little-endian payload builder for replies.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty payload.
    pub fn new() -> Self {
        Self::default()
    }
    /// Append a u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append a u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append a u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }
    /// Append `n` zero bytes and return them, for data produced in place (a region read).
    pub fn zeroed(&mut self, n: usize) -> &mut [u8] {
        let start = self.buf.len();
        self.buf.resize(start + n, 0);
        self.buf.get_mut(start..).unwrap_or(&mut [])
    }
    /// A writer appending to `buf` after clearing it: reuses its allocation.
    pub fn with_buffer(mut buf: Vec<u8>) -> Self {
        buf.clear();
        Writer { buf }
    }
    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// The payload.
    pub fn finish(self) -> Vec<u8> {
        self.buf
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
