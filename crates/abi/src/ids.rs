//! PCI identities of the two functions (docs/programming-model.md, "Identity"). These are the
//! defaults; a device option may override vendor and device ID, so a driver matching on them
//! (the guest NPU driver does) binds the default only.

abi_table! {
    /// The identity constants, for the C header.
    TABLE;
    /// Vendor ID of both functions (QEMU's and many emulators' test vendor 0x1234).
    VENDOR_ID: u16 = 0x1234;
    /// Device ID of the GPU function.
    GPU_DEVICE_ID: u16 = 0x0b10;
    /// Device ID of the NPU function.
    NPU_DEVICE_ID: u16 = 0x0b20;
    /// Class code of the GPU function: 0x0302 3D controller (no VGA, so no legacy ranges).
    GPU_CLASS_CODE: u32 = 0x03_0200;
    /// Class code of the NPU function: 0x1200 processing accelerator.
    NPU_CLASS_CODE: u32 = 0x12_0000;
    /// Revision ID of both functions.
    REVISION: u8 = 0x01;
    /// Subsystem vendor ID of both functions.
    SUBSYSTEM_VENDOR_ID: u16 = 0x1234;
    /// Subsystem ID of both functions.
    SUBSYSTEM_ID: u16 = 0x0001;
}
