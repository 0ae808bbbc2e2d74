//! [`ProtoError`]: why a frame could not be decoded, and the errno each reason answers with.
//! One type for every message family, so the connection turns any decode failure into an error
//! reply the same way.

use super::Command;

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

/// The error of a payload shorter (or longer) than `command` allows; `expected` says what it
/// should have been, for the log.
pub(super) fn short(command: Command, got: usize, expected: &'static str) -> ProtoError {
    ProtoError::BadLength {
        command,
        got,
        expected,
    }
}
