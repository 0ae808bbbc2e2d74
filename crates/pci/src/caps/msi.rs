//! MSI capability (PCI Local Bus 3.0 §6.8.1) with a 64-bit Message Address and optional
//! per-vector masking, and the function's MSI state.
//!
//! ```text
//!  31                16 15     8 7      0
//! +--------------------+--------+--------+ +0x00
//! |  Message Control   |  next  |  0x05  |
//! +--------------------+--------+--------+ +0x04
//! |         Message Address [31:2]    |00| RW
//! +--------------------------------------+ +0x08
//! |       Message Upper Address          | RW
//! +--------------------+-----------------+ +0x0c
//! |   (reserved)  ¹    |  Message Data   | RW (16 bits)
//! +--------------------+-----------------+ +0x10  — only with per-vector masking —
//! |              Mask Bits               | RW, one bit per vector
//! +--------------------------------------+ +0x14
//! |             Pending Bits             | RO, set by the function
//! +--------------------------------------+ +0x18
//! ¹ outside the capability without per-vector masking (it is 0x0e bytes long then)
//! ```
//!
//! Message Control: MSI Enable bit 0 (RW); Multiple Message Capable bits 3:1 (RO, log2 of the
//! vectors requested); Multiple Message Enable bits 6:4 (RW, log2 of the vectors software
//! allocated); 64-bit Address Capable bit 7 (RO 1); Per-Vector Masking Capable bit 8 (RO).
//!
//! QEMU's `vfio-user-pci` emulates MSI for the guest: when the guest sets MSI Enable it binds
//! one eventfd per allocated vector (DEVICE_SET_IRQS on `VFIO_PCI_MSI_IRQ_INDEX`, count = 2^MME)
//! and unbinds them (count 0) when the guest clears it. It also forwards every config write to
//! the function, so the function's copy of the capability follows the guest's.
//!
//! Delivery ([`MsiState`]), as for MSI-X: a vector goes out (its eventfd is signalled) when MSI
//! is enabled, the vector is allocated and not masked, and its eventfd is bound; otherwise the
//! function latches it pending (the Pending Bits register with per-vector masking) and sends it
//! once that holds. With fewer vectors allocated than requested, the function may change only
//! the low MME bits of Message Data (§6.8.3.4): vector `v` goes out as `v mod 2^MME`.

use log::warn;
use pcisim_vfio_user::{irq_index, Interrupts, Signal};

use crate::caps::{id, Capability};
use crate::field::{Access, Field};
use crate::msix::MsixOutcome;

/// Message Control offset.
pub const MESSAGE_CONTROL: u16 = 0x02;
/// Message Address offset (bits 1:0 are reserved, 0).
pub const MESSAGE_ADDRESS: u16 = 0x04;
/// Message Upper Address offset.
pub const MESSAGE_UPPER_ADDRESS: u16 = 0x08;
/// Message Data offset (16 bits).
pub const MESSAGE_DATA: u16 = 0x0c;
/// Mask Bits offset (with per-vector masking).
pub const MASK_BITS: u16 = 0x10;
/// Pending Bits offset (with per-vector masking).
pub const PENDING_BITS: u16 = 0x14;
/// Message Control: MSI Enable bit.
pub const CONTROL_ENABLE: u8 = 0;
/// Message Control: Multiple Message Capable, bits 3:1.
pub const CONTROL_MMC_SHIFT: u8 = 1;
/// Message Control: Multiple Message Enable, bits 6:4.
pub const CONTROL_MME_SHIFT: u8 = 4;
/// Message Control: 64-bit Address Capable bit.
pub const CONTROL_64BIT: u8 = 7;
/// Message Control: Per-Vector Masking Capable bit.
pub const CONTROL_PER_VECTOR_MASK: u8 = 8;
/// Length of the capability with a 64-bit address and no per-vector masking.
pub const LEN_64: u16 = 0x0e;
/// Length of the capability with a 64-bit address and per-vector masking.
pub const LEN_64_MASK: u16 = 0x18;
/// Most vectors a function may request.
pub const MAX_VECTORS: u8 = 32;

/// How many MSI vectors the function requests and whether it can mask them one by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiConfig {
    /// Vectors requested (Multiple Message Capable): a power of two, 1..=32.
    pub vectors: u8,
    /// Per-Vector Masking Capable: Mask Bits and Pending Bits registers.
    pub per_vector_mask: bool,
}

impl MsiConfig {
    /// Whether `vectors` is a power of two in 1..=32.
    pub fn is_valid(&self) -> bool {
        self.vectors.is_power_of_two() && self.vectors <= MAX_VECTORS
    }

    /// Multiple Message Capable: log2 of the vectors (the caller validates them).
    pub fn mmc(&self) -> u8 {
        self.vectors.max(1).trailing_zeros() as u8
    }

    /// Length of the capability in bytes.
    pub fn cap_len(&self) -> u16 {
        if self.per_vector_mask {
            LEN_64_MASK
        } else {
            LEN_64
        }
    }

    /// Mask of the implemented vectors' bits (Mask Bits, Pending Bits).
    pub fn vector_mask(&self) -> u32 {
        match self.vectors {
            0 => 0,
            v if v >= 32 => u32::MAX,
            v => (1u32 << v) - 1,
        }
    }
}

/// The MSI capability. The caller validates `cfg` (see [`crate::EndpointBuilder`]).
pub fn capability(cfg: &MsiConfig) -> Capability {
    let mut fields = vec![
        Field::bit(
            "MessageControl.MSIEnable",
            MESSAGE_CONTROL,
            CONTROL_ENABLE,
            Access::Rw,
        ),
        Field::ro(
            "MessageControl.MultipleMessageCapable",
            MESSAGE_CONTROL,
            1..=3,
            u32::from(cfg.mmc() & 7),
        ),
        Field::new(
            "MessageControl.MultipleMessageEnable",
            MESSAGE_CONTROL,
            4..=6,
            Access::Rw,
        ),
        Field::ro(
            "MessageControl.64BitAddressCapable",
            MESSAGE_CONTROL,
            7..=7,
            1,
        ),
        Field::ro(
            "MessageControl.PerVectorMaskingCapable",
            MESSAGE_CONTROL,
            8..=8,
            u32::from(cfg.per_vector_mask),
        ),
        Field::ro("MessageAddress.Reserved", MESSAGE_ADDRESS, 0..=1, 0),
        Field::new("MessageAddress", MESSAGE_ADDRESS, 2..=31, Access::Rw),
        Field::new(
            "MessageUpperAddress",
            MESSAGE_UPPER_ADDRESS,
            0..=31,
            Access::Rw,
        ),
        Field::new("MessageData", MESSAGE_DATA, 0..=15, Access::Rw),
    ];
    if cfg.per_vector_mask {
        let top = cfg.vectors.clamp(1, MAX_VECTORS) - 1;
        fields.push(Field::new("MaskBits", MASK_BITS, 0..=top, Access::Rw));
        // Set by the function (MsiState); software cannot write it.
        fields.push(Field::ro("PendingBits", PENDING_BITS, 0..=top, 0));
    }
    Capability {
        id: id::MSI,
        len: cfg.cap_len(),
        fields,
    }
}

/// The MSI registers that decide delivery, as the function last saw them in its config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiControl {
    /// MSI Enable.
    pub enable: bool,
    /// Multiple Message Enable (log2 of the vectors allocated), as written.
    pub mme: u8,
    /// Mask Bits (0 without per-vector masking).
    pub mask: u32,
}

impl MsiControl {
    /// Decodes Message Control and Mask Bits.
    pub fn from_registers(control: u16, mask: u32) -> MsiControl {
        MsiControl {
            enable: control & (1 << CONTROL_ENABLE) != 0,
            mme: ((control >> CONTROL_MME_SHIFT) & 7) as u8,
            mask,
        }
    }
}

/// A function's MSI state: the control registers it follows and its pending vectors.
#[derive(Debug, Clone)]
pub struct MsiState {
    cfg: MsiConfig,
    control: MsiControl,
    pending: u32,
}

impl MsiState {
    /// State for `cfg`: disabled, nothing masked or pending.
    pub fn new(cfg: MsiConfig) -> MsiState {
        MsiState {
            cfg,
            control: MsiControl::default(),
            pending: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &MsiConfig {
        &self.cfg
    }

    /// Vectors requested (Multiple Message Capable).
    pub fn vectors(&self) -> u16 {
        u16::from(self.cfg.vectors)
    }

    /// The control registers as last set.
    pub fn control(&self) -> MsiControl {
        self.control
    }

    /// Follow a change of Message Control or Mask Bits. Mask bits of unimplemented vectors (and
    /// all of them without per-vector masking) are ignored.
    pub fn set_control(&mut self, control: MsiControl) {
        let mask = if self.cfg.per_vector_mask {
            control.mask & self.cfg.vector_mask()
        } else {
            0
        };
        self.control = MsiControl { mask, ..control };
    }

    /// Vectors software allocated: 2^min(MME, MMC).
    pub fn allocated(&self) -> u16 {
        1u16 << self.control.mme.min(self.cfg.mmc())
    }

    /// The vector that `vector` goes out as with the vectors allocated now (§6.8.3.4: the
    /// function may change only the low MME bits of Message Data).
    pub fn effective(&self, vector: u16) -> u16 {
        vector & (self.allocated() - 1)
    }

    /// Whether `vector` (an effective vector) is masked.
    pub fn is_masked(&self, vector: u16) -> bool {
        vector < 32 && self.control.mask & (1 << vector) != 0
    }

    /// Whether `vector` is pending.
    pub fn is_pending(&self, vector: u16) -> bool {
        vector < 32 && self.pending & (1 << vector) != 0
    }

    /// The Pending Bits register.
    pub fn pending_bits(&self) -> u32 {
        self.pending
    }

    /// Set or clear the pending bit of `vector`.
    pub fn set_pending(&mut self, vector: u16, on: bool) {
        if vector >= self.vectors() {
            return;
        }
        if on {
            self.pending |= 1 << vector;
        } else {
            self.pending &= !(1 << vector);
        }
    }

    /// Reset: disabled, nothing masked or pending (eventfd bindings are the client's).
    pub fn reset(&mut self) {
        self.control = MsiControl::default();
        self.pending = 0;
    }

    /// Raise `vector`: signal its (effective vector's) eventfd through `irqs` (no client:
    /// `None`) if MSI is enabled and the vector unmasked, else latch it pending (as raised
    /// while MSI is disabled, as its effective vector while masked).
    pub fn raise(&mut self, irqs: Option<&Interrupts>, vector: u16) -> MsixOutcome {
        if vector >= self.vectors() {
            return MsixOutcome::InvalidVector;
        }
        if !self.control.enable {
            // Latched as raised: the vectors allocated are known once MSI is enabled.
            self.set_pending(vector, true);
            return MsixOutcome::Pending;
        }
        let v = self.effective(vector);
        if self.is_masked(v) {
            self.set_pending(v, true);
            return MsixOutcome::Pending;
        }
        match irqs.map(|i| i.signal(irq_index::MSI, u32::from(v))) {
            Some(Ok(Signal::Delivered)) => MsixOutcome::Delivered,
            Some(Ok(Signal::NotBound | Signal::Masked)) | None => {
                self.set_pending(v, true);
                MsixOutcome::Pending
            }
            Some(Err(e)) => {
                warn!("MSI vector {v}: signalling failed, left pending: {e}");
                self.set_pending(v, true);
                MsixOutcome::Pending
            }
        }
    }

    /// Send the pending vectors that may go out now (enabled, allocated, unmasked, eventfd
    /// bound) and clear their pending bits. Returns the vectors sent (as raised), in order.
    pub fn deliver_pending(&mut self, irqs: &Interrupts) -> Vec<u16> {
        let mut delivered = Vec::new();
        if !self.control.enable {
            return delivered;
        }
        for v in 0..self.vectors() {
            if !self.is_pending(v) || self.is_masked(v) {
                continue;
            }
            // A vector latched when more were allocated goes out as its effective vector now.
            let out = self.effective(v);
            if self.is_masked(out) {
                continue;
            }
            match irqs.signal(irq_index::MSI, u32::from(out)) {
                Ok(Signal::Delivered) => {
                    self.set_pending(v, false);
                    delivered.push(v);
                }
                Ok(Signal::NotBound | Signal::Masked) => {}
                Err(e) => warn!("MSI vector {out}: delivering pending interrupt failed: {e}"),
            }
        }
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::CapChainBuilder;
    use crate::ConfigSpace;

    fn space(cfg: MsiConfig) -> (ConfigSpace, u16) {
        let mut b = CapChainBuilder::new();
        let at = b.add(capability(&cfg)).unwrap().0;
        (ConfigSpace::from_fields(&b.fields()).unwrap(), at)
    }

    /// PCI 3.0 §6.8.1, Figure 6-9 (64-bit, no masking): ID 0x05, Message Control with MMC and
    /// the 64-bit bit, address bits 1:0 reserved, 16-bit data, 0x0e bytes.
    #[test]
    fn test_msi_capability_layout_64bit() {
        let cfg = MsiConfig {
            vectors: 16,
            per_vector_mask: false,
        };
        assert_eq!(capability(&cfg).len, 0x0e);
        let (cs, at) = space(cfg);
        assert_eq!(at, 0x40);
        assert_eq!(cs.read_u8(at), 0x05, "capability ID");
        assert_eq!(cs.read_u8(at + 1), 0, "last in the chain");
        let mc = cs.read_u16(at + MESSAGE_CONTROL);
        assert_eq!(mc & 1, 0, "disabled at power-on");
        assert_eq!((mc >> 1) & 7, 4, "Multiple Message Capable: 16 vectors");
        assert_eq!((mc >> 4) & 7, 0, "Multiple Message Enable: 1 vector");
        assert_ne!(mc & (1 << 7), 0, "64-bit Address Capable");
        assert_eq!(mc & (1 << 8), 0, "no per-vector masking");
        // Writable: Enable and MME only; MMC, 64-bit and reserved bits read-only.
        assert_eq!(cs.wmask_u32(at) >> 16, 0x0071);
        assert_eq!(cs.wmask_u32(at + MESSAGE_ADDRESS), 0xffff_fffc);
        assert_eq!(cs.wmask_u32(at + MESSAGE_UPPER_ADDRESS), 0xffff_ffff);
        assert_eq!(cs.wmask_u32(at + MESSAGE_DATA), 0x0000_ffff);
        assert_eq!(cs.wmask_u32(at + MASK_BITS), 0, "no Mask Bits");
    }

    /// Figure 6-11 (64-bit with per-vector masking): Mask Bits RW for implemented vectors,
    /// Pending Bits read-only, 0x18 bytes.
    #[test]
    fn test_msi_capability_layout_per_vector_mask() {
        let cfg = MsiConfig {
            vectors: 4,
            per_vector_mask: true,
        };
        assert_eq!(capability(&cfg).len, 0x18);
        let (mut cs, at) = space(cfg);
        let mc = cs.read_u16(at + MESSAGE_CONTROL);
        assert_eq!((mc >> 1) & 7, 2, "Multiple Message Capable: 4 vectors");
        assert_ne!(mc & (1 << 8), 0, "Per-Vector Masking Capable");
        assert_eq!(cs.wmask_u32(at + MASK_BITS), 0xf, "one bit per vector");
        assert_eq!(cs.wmask_u32(at + PENDING_BITS), 0, "Pending Bits read-only");
        // A software write of all-ones: only the writable bits change.
        cs.write(u64::from(at), &[0xff; 0x18]).unwrap();
        assert_eq!(
            cs.read_u16(at + MESSAGE_CONTROL),
            0x0100 | 0x80 | 0x70 | 0x04 | 1
        );
        assert_eq!(cs.read_u32(at + MESSAGE_ADDRESS), 0xffff_fffc);
        assert_eq!(cs.read_u32(at + MESSAGE_DATA), 0xffff);
        assert_eq!(cs.read_u32(at + MASK_BITS), 0xf);
        assert_eq!(cs.read_u32(at + PENDING_BITS), 0);
        cs.reset();
        assert_eq!(
            cs.read_u16(at + MESSAGE_CONTROL) & 0x71,
            0,
            "reset disables"
        );
        let cfg32 = MsiConfig {
            vectors: 32,
            per_vector_mask: true,
        };
        let (cs, at) = space(cfg32);
        assert_eq!(cs.wmask_u32(at + MASK_BITS), u32::MAX);
        assert_eq!((cs.read_u16(at + MESSAGE_CONTROL) >> 1) & 7, 5);
    }

    #[test]
    fn test_msi_config_validity() {
        let c = |vectors| MsiConfig {
            vectors,
            per_vector_mask: false,
        };
        assert!(c(1).is_valid() && c(2).is_valid() && c(32).is_valid());
        assert!(!c(0).is_valid() && !c(3).is_valid() && !c(64).is_valid());
        assert_eq!(c(1).mmc(), 0);
        assert_eq!(c(8).mmc(), 3);
        assert_eq!(c(8).vector_mask(), 0xff);
        assert_eq!(c(32).vector_mask(), u32::MAX);
    }

    #[test]
    fn test_msi_builder_rejects_bad_counts_and_msi_with_msix() {
        use crate::caps::msix::MsixConfig;
        use crate::{Bar, BuildError, EndpointBuilder, FunctionCtx, Identity, PciFunction};
        struct Null;
        impl PciFunction for Null {
            fn bar_read(&mut self, _: &mut FunctionCtx<'_>, _: u32, _: u64, d: &mut [u8]) {
                d.fill(0);
            }
            fn bar_write(&mut self, _: &mut FunctionCtx<'_>, _: u32, _: u64, _: &[u8]) {}
            fn reset(&mut self, _: crate::ResetKind) {}
        }
        let id = Identity {
            vendor_id: 0x1234,
            device_id: 1,
            class_code: 0x12_0000,
            revision: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        };
        let b = || EndpointBuilder::new("t", id).bar(0, Bar::mem32(0x2000));
        let msi = |vectors| MsiConfig {
            vectors,
            per_vector_mask: true,
        };
        assert!(matches!(
            b().msi(msi(3)).build(Null),
            Err(BuildError::Msi(_))
        ));
        assert!(matches!(
            b().msi(msi(64)).build(Null),
            Err(BuildError::Msi(_))
        ));
        let msix = MsixConfig {
            vectors: 4,
            table_bar: 0,
            table_offset: 0x1000,
            pba_bar: 0,
            pba_offset: 0x1800,
        };
        assert!(matches!(
            b().msi(msi(4)).msix(msix).build(Null),
            Err(BuildError::Msi(_))
        ));
        let ep = b().msi(msi(32)).build(Null).unwrap();
        assert_eq!(ep.describe().capabilities[0].id, id::MSI);
        assert_eq!(ep.msi().map(|m| m.vectors()), Some(32));
        assert!(ep.msix().is_none());
    }

    fn state(per_vector_mask: bool) -> MsiState {
        MsiState::new(MsiConfig {
            vectors: 8,
            per_vector_mask,
        })
    }

    #[test]
    fn test_msi_disabled_latches_pending_and_enable_alone_does_not_send() {
        let irqs = Interrupts::new(&[1, 8, 0, 1, 1]);
        let mut s = state(false);
        assert_eq!(s.raise(Some(&irqs), 3), MsixOutcome::Pending);
        assert_eq!(s.raise(Some(&irqs), 8), MsixOutcome::InvalidVector);
        assert_eq!(s.effective(3), 0, "one vector allocated while disabled");
        assert!(s.is_pending(3), "latched as raised while disabled");
        s.set_control(MsiControl::from_registers(0x1 | (3 << 4), 0xff));
        assert_eq!(s.control().mask, 0, "no per-vector masking: mask ignored");
        assert_eq!(s.allocated(), 8);
        assert!(s.deliver_pending(&irqs).is_empty(), "no eventfd bound yet");
        assert!(s.is_pending(3));
        s.reset();
        assert_eq!(s.pending_bits(), 0);
        assert!(!s.control().enable);
    }

    #[test]
    fn test_msi_fewer_vectors_allocated_fold_into_low_bits() {
        let mut s = state(false);
        s.set_control(MsiControl::from_registers(0x1 | (1 << 4), 0));
        assert_eq!(s.allocated(), 2);
        assert_eq!(s.effective(5), 1);
        assert_eq!(s.effective(4), 0);
        // MME above MMC is clamped.
        s.set_control(MsiControl::from_registers(0x1 | (7 << 4), 0));
        assert_eq!(s.allocated(), 8);
    }

    #[test]
    fn test_msi_masked_vector_pending_until_unmasked() {
        let mut s = state(true);
        s.set_control(MsiControl::from_registers(0x1 | (3 << 4), 1 << 2));
        assert!(s.is_masked(2));
        assert_eq!(s.raise(None, 2), MsixOutcome::Pending);
        assert_eq!(s.pending_bits(), 1 << 2);
        assert_eq!(s.raise(None, 1), MsixOutcome::Pending, "no client: pending");
        assert_eq!(s.pending_bits(), 0b110);
    }
}
