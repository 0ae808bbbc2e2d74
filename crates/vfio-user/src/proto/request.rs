//! [`Request`], the decoded form of every command, and the [`Limits`] a decode respects. Every
//! family decoder (the sibling modules) returns a `Request`; [`super::decode`] dispatches to them.

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

/// Limits a decode must respect (negotiated or fixed by the server).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest REGION_READ/REGION_WRITE data transfer.
    pub max_data_xfer_size: usize,
}
