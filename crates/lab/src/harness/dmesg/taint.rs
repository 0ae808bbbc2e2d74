//! The kernel's taint flags: their letters, what each means, and the bits the lab allows.

/// One taint flag of the kernel (`Documentation/admin-guide/tainted-kernels.rst`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaintFlag {
    /// Its bit in `/proc/sys/kernel/tainted`.
    pub bit: u32,
    /// Its letter in `Tainted:` lines.
    pub letter: char,
    /// What it means.
    pub meaning: &'static str,
}

pub(super) const TAINT_BAD_PAGE: u32 = 5;
pub(super) const TAINT_DIE: u32 = 7;
pub(super) const TAINT_WARN: u32 = 9;
pub(super) const TAINT_FIRMWARE_WORKAROUND: u32 = 11;
/// `O`: an out-of-tree module was loaded.
pub const TAINT_OOT_MODULE: u32 = 12;
/// `E`: an unsigned module was loaded.
pub const TAINT_UNSIGNED_MODULE: u32 = 13;
pub(super) const TAINT_SOFTLOCKUP: u32 = 14;

/// The kernel's taint flags, by bit.
pub const TAINT_FLAGS: &[TaintFlag] = &[
    TaintFlag {
        bit: 0,
        letter: 'P',
        meaning: "proprietary module loaded",
    },
    TaintFlag {
        bit: 1,
        letter: 'F',
        meaning: "module force loaded",
    },
    TaintFlag {
        bit: 2,
        letter: 'S',
        meaning: "kernel running on an out of specification system",
    },
    TaintFlag {
        bit: 3,
        letter: 'R',
        meaning: "module force unloaded",
    },
    TaintFlag {
        bit: 4,
        letter: 'M',
        meaning: "machine check exception",
    },
    TaintFlag {
        bit: 5,
        letter: 'B',
        meaning: "bad page referenced or unexpected page flags",
    },
    TaintFlag {
        bit: 6,
        letter: 'U',
        meaning: "taint requested by userspace",
    },
    TaintFlag {
        bit: 7,
        letter: 'D',
        meaning: "kernel died recently (oops or BUG)",
    },
    TaintFlag {
        bit: 8,
        letter: 'A',
        meaning: "ACPI table overridden",
    },
    TaintFlag {
        bit: 9,
        letter: 'W',
        meaning: "kernel issued a warning",
    },
    TaintFlag {
        bit: 10,
        letter: 'C',
        meaning: "staging driver loaded",
    },
    TaintFlag {
        bit: 11,
        letter: 'I',
        meaning: "workaround for a platform firmware bug applied",
    },
    TaintFlag {
        bit: 12,
        letter: 'O',
        meaning: "externally-built (out-of-tree) module loaded",
    },
    TaintFlag {
        bit: 13,
        letter: 'E',
        meaning: "unsigned module loaded",
    },
    TaintFlag {
        bit: 14,
        letter: 'L',
        meaning: "soft lockup occurred",
    },
    TaintFlag {
        bit: 15,
        letter: 'K',
        meaning: "kernel live patched",
    },
    TaintFlag {
        bit: 16,
        letter: 'X',
        meaning: "auxiliary taint (distribution-defined)",
    },
    TaintFlag {
        bit: 17,
        letter: 'T',
        meaning: "kernel built with the struct randomization plugin",
    },
    TaintFlag {
        bit: 18,
        letter: 'N',
        meaning: "an in-kernel test has been run",
    },
    TaintFlag {
        bit: 19,
        letter: 'J',
        meaning: "userspace used a mutating debug operation in fwctl",
    },
];

/// The letters of `bits` (`OE`); an unknown bit is shown as `?<bit>`.
pub fn taint_letters(bits: u64) -> String {
    (0..64)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| match TAINT_FLAGS.iter().find(|f| f.bit == b) {
            Some(f) => f.letter.to_string(),
            None => format!("?{b}"),
        })
        .collect()
}

/// `W (512: kernel issued a warning), O (4096: ...)`, or `none`.
pub fn describe_taint(bits: u64) -> String {
    let parts: Vec<String> = (0..64)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| match TAINT_FLAGS.iter().find(|f| f.bit == b) {
            Some(f) => format!("{} ({}: {})", f.letter, 1u64 << b, f.meaning),
            None => format!("bit {b} ({})", 1u64 << b),
        })
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// Parses `/proc/sys/kernel/tainted` (a decimal number and a newline).
pub fn parse_taint(text: &str) -> Result<u64, String> {
    let t = text.trim();
    t.parse::<u64>()
        .map_err(|e| format!("/proc/sys/kernel/tainted is not a number ({t:?}: {e})"))
}
