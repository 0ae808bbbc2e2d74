//! Advanced Error Reporting extended capability, version 2, endpoint layout (PCIe Base 4.0
//! §7.8.4).
//!
//! ```text
//! +0x00  header (0x0001, v2)
//! +0x04  Uncorrectable Error Status     RW1CS
//! +0x08  Uncorrectable Error Mask       RWS
//! +0x0C  Uncorrectable Error Severity   RWS
//! +0x10  Correctable Error Status       RW1CS
//! +0x14  Correctable Error Mask         RWS
//! +0x18  Advanced Error Capabilities and Control
//! +0x1C  Header Log (4 dwords)          ROS
//! +0x2C  Root Error Command/Status, Error Source ID (root ports only: 0)
//! +0x38  TLP Prefix Log (4 dwords)      ROS
//! ```
//! Implemented error bits (others are reserved): uncorrectable Data Link Protocol (4),
//! Poisoned TLP (12), Flow Control Protocol (13), Completion Timeout (14), Completer Abort
//! (15), Unexpected Completion (16), Receiver Overflow (17), Malformed TLP (18), ECRC (19),
//! Unsupported Request (20), Uncorrectable Internal (22); correctable Receiver (0), Bad TLP
//! (6), Bad DLLP (7), REPLAY_NUM Rollover (8), Replay Timer Timeout (12), Advisory Non-Fatal
//! (13), Corrected Internal (14), Header Log Overflow (15).

use crate::caps::{ext_id, ExtCapability};
use crate::field::{Access, Field};

/// Uncorrectable Error Status.
pub const UNCOR_STATUS: u16 = 0x04;
/// Uncorrectable Error Mask.
pub const UNCOR_MASK: u16 = 0x08;
/// Uncorrectable Error Severity.
pub const UNCOR_SEVERITY: u16 = 0x0c;
/// Correctable Error Status.
pub const COR_STATUS: u16 = 0x10;
/// Correctable Error Mask.
pub const COR_MASK: u16 = 0x14;
/// Advanced Error Capabilities and Control.
pub const CAP_CONTROL: u16 = 0x18;
/// Header Log (16 bytes).
pub const HEADER_LOG: u16 = 0x1c;
/// TLP Prefix Log (16 bytes).
pub const TLP_PREFIX_LOG: u16 = 0x38;
/// Length of the capability.
pub const LEN: u16 = 0x48;

/// An uncorrectable error bit: name, bit, default severity (1 = fatal), default mask.
type UncorBit = (&'static str, u8, u32, u32);

const UNCOR_BITS: [UncorBit; 11] = [
    ("DataLinkProtocolError", 4, 1, 0),
    ("PoisonedTLP", 12, 0, 0),
    ("FlowControlProtocolError", 13, 1, 0),
    ("CompletionTimeout", 14, 0, 0),
    ("CompleterAbort", 15, 0, 0),
    ("UnexpectedCompletion", 16, 0, 0),
    ("ReceiverOverflow", 17, 1, 0),
    ("MalformedTLP", 18, 1, 0),
    ("ECRCError", 19, 0, 0),
    ("UnsupportedRequest", 20, 0, 0),
    ("UncorrectableInternalError", 22, 1, 1),
];

/// A correctable error bit: name, bit, default mask.
const COR_BITS: [(&str, u8, u32); 8] = [
    ("ReceiverError", 0, 0),
    ("BadTLP", 6, 0),
    ("BadDLLP", 7, 0),
    ("ReplayNumRollover", 8, 0),
    ("ReplayTimerTimeout", 12, 0),
    ("AdvisoryNonFatalError", 13, 1),
    ("CorrectedInternalError", 14, 1),
    ("HeaderLogOverflow", 15, 1),
];

/// The AER capability.
pub fn capability() -> ExtCapability {
    use Access::*;
    let mut fields = Vec::new();
    for (name, bit, severity, mask) in UNCOR_BITS {
        fields.push(Field::bit(name, UNCOR_STATUS, bit, W1cSticky));
        fields.push(Field::bit(name, UNCOR_MASK, bit, RwSticky).with_value(mask));
        fields.push(Field::bit(name, UNCOR_SEVERITY, bit, RwSticky).with_value(severity));
    }
    for (name, bit, mask) in COR_BITS {
        fields.push(Field::bit(name, COR_STATUS, bit, W1cSticky));
        fields.push(Field::bit(name, COR_MASK, bit, RwSticky).with_value(mask));
    }
    fields.extend([
        Field::new("AdvCap.FirstErrorPointer", CAP_CONTROL, 0..=4, RoSticky),
        Field::ro("AdvCap.ECRCGenerationCapable", CAP_CONTROL, 5..=5, 0),
        Field::ro("AdvCap.ECRCGenerationEnable", CAP_CONTROL, 6..=6, 0),
        Field::ro("AdvCap.ECRCCheckCapable", CAP_CONTROL, 7..=7, 0),
        Field::ro("AdvCap.ECRCCheckEnable", CAP_CONTROL, 8..=8, 0),
        Field::ro(
            "AdvCap.MultipleHeaderRecordingCapable",
            CAP_CONTROL,
            9..=9,
            0,
        ),
        Field::ro(
            "AdvCap.MultipleHeaderRecordingEnable",
            CAP_CONTROL,
            10..=10,
            0,
        ),
        Field::new("AdvCap.TLPPrefixLogPresent", CAP_CONTROL, 11..=11, RoSticky),
    ]);
    for dw in 0..4 {
        fields.push(Field::new(
            "HeaderLog",
            HEADER_LOG + 4 * dw,
            0..=31,
            RoSticky,
        ));
        fields.push(Field::new(
            "TLPPrefixLog",
            TLP_PREFIX_LOG + 4 * dw,
            0..=31,
            RoSticky,
        ));
    }
    ExtCapability {
        id: ext_id::AER,
        version: 2,
        len: LEN,
        fields,
    }
}
