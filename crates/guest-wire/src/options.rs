//! Every guest program's options as a typed value ([`Options`], one variant a program), written
//! as `--name value` words by [`Options::to_args`] and read back by [`Options::parse`].
//!
//! The lab builds an invocation from these structs and the guest program receives the parsed
//! struct: a misspelt option, a renamed field or a value of the wrong kind breaks the build of
//! whichever side names it, not a run. An option left `None` is left out of the command line
//! and the guest program applies its own default (documented on the field).
//!
//! The words: integers are written in decimal and read in decimal or `0x` hex; lists are
//! comma-separated; enums by the word their `word()` gives.

use std::fmt;

use crate::{Program, WireError};

/// A value one option word carries.
pub trait Word: Sized {
    /// The value as one command-line word.
    fn to_word(&self) -> String;
    /// The value `word` names; the error says what was expected (no option name: the caller
    /// adds it).
    fn from_word(word: &str) -> Result<Self, String>;
}

impl Word for String {
    fn to_word(&self) -> String {
        self.clone()
    }
    fn from_word(word: &str) -> Result<Self, String> {
        Ok(word.to_string())
    }
}

/// An unsigned number, decimal or `0x` hex.
fn parse_u64(word: &str) -> Result<u64, String> {
    let r = match word.strip_prefix("0x").or_else(|| word.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => word.parse(),
    };
    r.map_err(|_| format!("{word:?} is not a number"))
}

macro_rules! unsigned_word {
    ($($t:ty),*) => {$(
        impl Word for $t {
            fn to_word(&self) -> String {
                self.to_string()
            }
            fn from_word(word: &str) -> Result<Self, String> {
                let v = parse_u64(word)?;
                <$t>::try_from(v).map_err(|_| format!("{word:?} is out of range"))
            }
        }
    )*};
}
unsigned_word!(u16, u32, u64);

impl Word for i32 {
    fn to_word(&self) -> String {
        self.to_string()
    }
    fn from_word(word: &str) -> Result<Self, String> {
        word.parse()
            .map_err(|_| format!("{word:?} is not a (signed 32-bit) number"))
    }
}

impl Word for serde_json::Value {
    fn to_word(&self) -> String {
        self.to_string()
    }
    fn from_word(word: &str) -> Result<Self, String> {
        serde_json::from_str(word).map_err(|e| format!("not JSON: {e}"))
    }
}

/// A comma-separated list (elements must not contain commas; empty elements are dropped).
impl<T: Word> Word for Vec<T> {
    fn to_word(&self) -> String {
        self.iter().map(Word::to_word).collect::<Vec<_>>().join(",")
    }
    fn from_word(word: &str) -> Result<Self, String> {
        word.split(',')
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .map(T::from_word)
            .collect()
    }
}

/// An enum of fixed words: `word()`, `ALL`, and [`Word`].
macro_rules! word_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $word:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $var),+
        }

        impl $name {
            /// Every value.
            pub const ALL: &'static [$name] = &[$($name::$var),+];

            /// The command-line word.
            pub fn word(self) -> &'static str {
                match self {
                    $($name::$var => $word),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.word())
            }
        }

        impl Word for $name {
            fn to_word(&self) -> String {
                self.word().to_string()
            }
            fn from_word(word: &str) -> Result<Self, String> {
                $name::ALL.iter().copied().find(|v| v.word() == word).ok_or_else(|| {
                    let all: Vec<&str> = $name::ALL.iter().map(|v| v.word()).collect();
                    format!("{word:?} is not one of {}", all.join(", "))
                })
            }
        }
    };
}

word_enum! {
    /// `on` or `off`.
    OnOff { On = "on", Off = "off" }
}

impl OnOff {
    /// Whether it is `on`.
    pub fn is_on(self) -> bool {
        self == OnOff::On
    }
}

word_enum! {
    /// `yes` or `no`.
    YesNo { Yes = "yes", No = "no" }
}

word_enum! {
    /// The message interrupts a vfio user enables.
    IrqMode {
        /// MSI-X.
        Msix = "msix",
        /// MSI.
        Msi = "msi",
    }
}

word_enum! {
    /// A reset method: the kernel's `reset_method` names, and two the guest program does by
    /// hand.
    ResetMethod {
        /// Function Level Reset.
        Flr = "flr",
        /// Advanced Features FLR.
        AfFlr = "af_flr",
        /// PM soft reset (D3hot -> D0).
        Pm = "pm",
        /// Secondary bus reset (or pciehp's slot reset).
        Bus = "bus",
        /// A device-specific reset.
        DeviceSpecific = "device_specific",
        /// ACPI `_RST`.
        Acpi = "acpi",
        /// CXL bus reset.
        CxlBus = "cxl_bus",
        /// By hand: D0 -> D3hot -> D0 through the PM control register.
        PmCycle = "pm-cycle",
        /// By hand: remove, Secondary Bus Reset on the bridge, rescan.
        Sbr = "sbr",
    }
}

word_enum! {
    /// What a reset must leave of the registers `reset` dirtied.
    ResetExpect {
        /// Back to their defaults.
        Cleared = "cleared",
        /// Kept.
        Kept = "kept",
        /// The function does not come back (reads all-ones).
        Dead = "dead",
    }
}

word_enum! {
    /// How `reset-vfio` resets the function its vfio driver owns.
    VfioResetOp {
        /// `reset_method=flr` and `reset` through sysfs.
        SysfsFlr = "sysfs-flr",
        /// `VFIO_DEVICE_RESET`.
        Ioctl = "ioctl",
    }
}

word_enum! {
    /// `reset-dma`'s driver.
    ResetDmaMode {
        /// The kernel's path: Bus Master off, wait for Transactions Pending, then FLR.
        Correct = "correct",
        /// A buggy driver that writes Initiate FLR itself with the ring's DMA in flight.
        Buggy = "buggy",
    }
}

word_enum! {
    /// What `vfio-user` does with the device request (REQ) eventfd.
    ReqMode {
        /// Releases the device at the end, no REQ watch.
        Off = "off",
        /// Holds the device and releases it when the request arrives.
        Release = "release",
        /// Holds the device and ignores the request.
        Ignore = "ignore",
    }
}

word_enum! {
    /// How `mm-teardown`'s vfio user goes away.
    MmCase {
        /// It exits.
        Exit = "exit",
        /// It is killed (SIGKILL).
        Kill = "kill",
        /// It forks and the parent goes first.
        Fork = "fork",
        /// Its fds were passed over SCM_RIGHTS to another process.
        Pass = "pass",
        /// A BAR mmap outlives the fds.
        BarMmap = "bar-mmap",
    }
}

word_enum! {
    /// `mm-teardown-worker`'s role.
    MmRole {
        /// Opens the vfio device and streams.
        Opener = "opener",
        /// Receives the fds over SCM_RIGHTS.
        Receiver = "receiver",
    }
}

word_enum! {
    /// How `userptr` registers the process memory.
    UserptrMode {
        /// An mmu notifier: the unmap waits for the ring's fence.
        Tracked = "tracked",
        /// Pinned pages.
        Pinned = "pinned",
    }
}

word_enum! {
    /// How `userptr` takes the memory away.
    UnmapCall {
        /// `munmap`.
        Munmap = "munmap",
        /// `madvise(MADV_DONTNEED)`.
        Dontneed = "dontneed",
    }
}

/// Takes option `--flag`'s value out of `pairs` (one `(flag, value)` per given option).
fn take(pairs: &mut Vec<(String, String)>, flag: &str) -> Option<String> {
    let i = pairs.iter().position(|(f, _)| f == flag)?;
    Some(pairs.remove(i).1)
}

/// Option `--flag`'s value, read as a `T`.
fn value<T: Word>(program: Program, flag: &str, word: &str) -> Result<T, WireError> {
    T::from_word(word).map_err(|why| WireError::BadOption {
        program: program.name(),
        option: flag.to_string(),
        why,
    })
}

/// Splits `args` into `--flag value` / `--flag=value` pairs, refusing a word that is no
/// option, an option the program does not take (the error lists the ones it does), an option
/// without its value and an option given twice.
fn pairs<S: AsRef<str>>(
    program: Program,
    args: &[S],
    flags: &'static [&'static str],
) -> Result<Vec<(String, String)>, WireError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut it = args.iter().map(AsRef::as_ref);
    while let Some(word) = it.next() {
        let Some(rest) = word.strip_prefix("--") else {
            return Err(WireError::Unexpected {
                program: program.name(),
                word: word.to_string(),
            });
        };
        let (flag, v) = match rest.split_once('=') {
            Some((f, v)) => (f, v.to_string()),
            None => {
                let v = it.next().ok_or_else(|| WireError::BadOption {
                    program: program.name(),
                    option: rest.to_string(),
                    why: "needs a value".into(),
                })?;
                (rest, v.to_string())
            }
        };
        if !flags.contains(&flag) {
            return Err(WireError::UnknownOption {
                program: program.name(),
                option: flag.to_string(),
                accepted: flags,
            });
        }
        if out.iter().any(|(f, _)| f == flag) {
            return Err(WireError::BadOption {
                program: program.name(),
                option: flag.to_string(),
                why: "given twice".into(),
            });
        }
        out.push((flag.to_string(), v));
    }
    Ok(out)
}

/// A field's type: `req T` is a `T` the program needs, `opt T` an `Option<T>`.
macro_rules! field_ty {
    (req $t:ty) => { $t };
    (opt $t:ty) => { Option<$t> };
}

/// Writes a field's `--flag value` (nothing for an `opt` left `None`).
macro_rules! field_push {
    ($out:ident, req, $v:expr, $flag:literal) => {
        $out.extend([concat!("--", $flag).to_string(), Word::to_word($v)])
    };
    ($out:ident, opt, $v:expr, $flag:literal) => {
        if let Some(v) = $v {
            $out.extend([concat!("--", $flag).to_string(), Word::to_word(v)])
        }
    };
}

/// Reads a field from the pairs (a missing `req` is an error).
macro_rules! field_take {
    ($program:expr, $pairs:ident, req, $t:ty, $flag:literal) => {
        match take(&mut $pairs, $flag) {
            Some(w) => value::<$t>($program, $flag, &w)?,
            None => {
                return Err(WireError::MissingOption {
                    program: $program.name(),
                    option: $flag,
                })
            }
        }
    };
    ($program:expr, $pairs:ident, opt, $t:ty, $flag:literal) => {
        match take(&mut $pairs, $flag) {
            Some(w) => Some(value::<$t>($program, $flag, &w)?),
            None => None,
        }
    };
}

/// One program's options struct: each field `name: req|opt Type = "flag"`.
macro_rules! options_struct {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident : $kind:ident $t:ty = $flag:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name {
            $($(#[$fm])* pub $field: field_ty!($kind $t),)*
        }

        impl $name {
            /// The options' flags (without `--`).
            pub const FLAGS: &'static [&'static str] = &[$($flag),*];

            /// The `--flag value` words, in field order.
            pub fn to_args(&self) -> Vec<String> {
                #[allow(unused_mut)]
                let mut out = Vec::new();
                $(field_push!(out, $kind, &self.$field, $flag);)*
                out
            }

            /// [`Self::to_args`]'s inverse for `program`'s options (in any order, also as
            /// `--flag=value`).
            pub fn parse_args<S: AsRef<str>>(program: Program, args: &[S]) -> Result<Self, WireError> {
                #[allow(unused_mut)]
                let mut p = pairs(program, args, Self::FLAGS)?;
                Ok($name {
                    $($field: field_take!(program, p, $kind, $t, $flag),)*
                })
            }
        }
    };
}

options_struct! {
    /// `agent`'s options.
    #[derive(Default)]
    AgentOptions {
        /// The serial port (default `/dev/ttyS1`).
        port: opt String = "port",
    }
}

options_struct! {
    /// The options of a program that only picks its function (`e2`, `e4`, `e5`).
    #[derive(Default)]
    SelectOptions {
        /// The function's BDF, when several have the ids.
        bdf: opt String = "bdf",
    }
}

options_struct! {
    /// `e1`'s options: the expectation (one of the two) and the function.
    #[derive(Default)]
    E1Options {
        /// The device's description as `pcisim describe` printed it (the lab fills it in).
        expect: opt serde_json::Value = "expect",
        /// The description in a file instead.
        expect_file: opt String = "expect-file",
        /// The function's BDF.
        bdf: opt String = "bdf",
    }
}

options_struct! {
    /// `e3`'s options.
    #[derive(Default)]
    E3Options {
        /// The vectors to ring (default 0,1,5; none twice).
        vectors: opt Vec<u32> = "vectors",
        /// MSI-X or MSI (default MSI-X).
        irq: opt IrqMode = "irq",
        /// The function's BDF.
        bdf: opt String = "bdf",
    }
}

options_struct! {
    /// `reset`'s options.
    ResetOptions {
        /// The function's BDF.
        bdf: opt String = "bdf",
        /// The reset.
        method: req ResetMethod = "method",
        /// Dirty the registers before (default on).
        dirty: opt OnOff = "dirty",
        /// What the reset leaves (default cleared).
        expect: opt ResetExpect = "expect",
        /// Methods `reset_method` must offer.
        offered: opt Vec<ResetMethod> = "offered",
        /// Methods it must not offer.
        absent: opt Vec<ResetMethod> = "absent",
        /// The reset takes at least this long (ms).
        min_ms: opt u64 = "min-ms",
        /// The reset write fails with this errno.
        errno: opt i32 = "errno",
        /// Kernel log lines the reset must produce, `|`-separated.
        kmsg: opt String = "kmsg",
    }
}

options_struct! {
    /// `reset-vfio`'s options.
    ResetVfioOptions {
        /// The function's BDF.
        bdf: opt String = "bdf",
        /// How it resets.
        op: req VfioResetOp = "op",
        /// Run the command ring around the reset (default off).
        ring: opt OnOff = "ring",
    }
}

options_struct! {
    /// `reset-dma`'s options.
    ResetDmaOptions {
        /// The function's BDF.
        bdf: opt String = "bdf",
        /// The driver.
        mode: req ResetDmaMode = "mode",
        /// The fill's length in bytes (a non-zero multiple of 4 KiB; default the program's).
        len: opt u64 = "len",
    }
}

options_struct! {
    /// `reset-hot`'s options.
    ResetHotOptions {
        /// Function 0's BDF.
        bdf: req String = "bdf",
        /// Function 1's BDF.
        peer: req String = "peer",
        /// Function 1's vendor id (default function 0's).
        peer_vendor: opt u16 = "peer-vendor",
        /// Function 1's device id (default function 0's).
        peer_device: opt u16 = "peer-device",
    }
}

options_struct! {
    /// `npu-peer`'s options.
    NpuPeerOptions {
        /// The function's BDF.
        bdf: opt String = "bdf",
        /// Whether the peer is present.
        present: req YesNo = "present",
    }
}

options_struct! {
    /// `vfio-user`'s options.
    #[derive(Default)]
    VfioUserOptions {
        /// The function's BDF.
        bdf: opt String = "bdf",
        /// The DMA buffer in KiB (default 16).
        dma_kib: opt u64 = "dma-kib",
        /// The device request eventfd (default off).
        req: opt ReqMode = "req",
        /// A file it creates once the device is held.
        ready_file: opt String = "ready-file",
        /// How long it holds the device, in seconds (default 120).
        wait_s: opt u64 = "wait-s",
    }
}

options_struct! {
    /// `bar-io`'s options.
    BarIoOptions {
        /// The function's BDF.
        bdf: req String = "bdf",
        /// The BAR (default 0).
        bar: opt u32 = "bar",
        /// The offsets read (32 bits each), in order.
        off: req Vec<u64> = "off",
        /// A value written at the first offset before the reads.
        write: opt u32 = "write",
    }
}

options_struct! {
    /// `dma-stream`'s options.
    #[derive(Default)]
    DmaStreamOptions {
        /// The function's BDF.
        bdf: opt String = "bdf",
        /// MSI or MSI-X (default MSI).
        irq: opt IrqMode = "irq",
        /// A file it creates once the stream runs.
        ready_file: opt String = "ready-file",
        /// A file it creates once it saw the device go.
        down_file: opt String = "down-file",
        /// How long it streams at most, in seconds (default 60).
        stream_s: opt u64 = "stream-s",
        /// How long it waits for the device to come back, in seconds (default 30).
        down_wait_s: opt u64 = "down-wait-s",
    }
}

options_struct! {
    /// `mm-teardown`'s options.
    MmTeardownOptions {
        /// How the vfio user goes away.
        case: req MmCase = "case",
        /// The function's BDF.
        bdf: opt String = "bdf",
        /// The IOVA base (2 MiB aligned; default the program's).
        iova: opt u64 = "iova",
        /// The buffer in KiB (default the program's).
        buf_kib: opt u64 = "buf-kib",
    }
}

options_struct! {
    /// `mm-teardown-worker`'s options (`mm-teardown` starts it).
    MmWorkerOptions {
        /// Its role.
        role: req MmRole = "role",
        /// The case.
        case: req MmCase = "case",
        /// The function's BDF.
        bdf: opt String = "bdf",
        /// Its IOMMU group.
        group: opt String = "group",
        /// The IOVA base.
        iova: req u64 = "iova",
        /// The buffer in KiB.
        buf_kib: opt u64 = "buf-kib",
    }
}

options_struct! {
    /// `dma-map-pages`'s options.
    #[derive(Default)]
    DmaMapOptions {
        /// The function's BDF.
        bdf: opt String = "bdf",
        /// How many MiB it maps in 4 KiB pages (default 1024, at least 1).
        mib: opt u64 = "mib",
    }
}

options_struct! {
    /// `sva`'s options.
    SvaOptions {
        /// The NPU's BDF.
        bdf: req String = "bdf",
        /// The case (`basic`, `exit`, `kill`, `fork`, `scm`, `mmap`, `m7`; the program checks
        /// the name).
        case: req String = "case",
        /// Report the buggy driver's failures as diagnostics (default off).
        lenient: opt OnOff = "lenient",
    }
}

options_struct! {
    /// `userptr`'s options.
    UserptrOptions {
        /// The GPU's BDF.
        bdf: req String = "bdf",
        /// How the memory is registered.
        mode: req UserptrMode = "mode",
        /// How it is taken away (default munmap).
        unmap: opt UnmapCall = "unmap",
        /// The size in MiB (default 4).
        mib: opt u64 = "mib",
        /// FILLs queued (default 256).
        repeat: opt u32 = "repeat",
        /// Report the buggy driver's failures as skips (default off).
        lenient: opt OnOff = "lenient",
    }
}

/// Every program's options, one variant a program.
macro_rules! options_enum {
    ($($var:ident ($t:ty)),+ $(,)?) => {
        /// A guest program with its typed options.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Options {
            $(
                #[doc = concat!("`", stringify!($var), "`: [`", stringify!($t), "`].")]
                $var($t)
            ),+
        }

        impl Options {
            /// The program.
            pub fn program(&self) -> Program {
                match self {
                    $(Options::$var(_) => Program::$var),+
                }
            }

            /// The `--flag value` words.
            pub fn to_args(&self) -> Vec<String> {
                match self {
                    $(Options::$var(o) => o.to_args()),+
                }
            }

            /// `program`'s options from `args` ([`Options::to_args`]'s inverse).
            pub fn parse<S: AsRef<str>>(program: Program, args: &[S]) -> Result<Options, WireError> {
                Ok(match program {
                    $(Program::$var => Options::$var(<$t>::parse_args(program, args)?)),+
                })
            }

            /// The flags `program` takes (without `--`).
            pub fn flags(program: Program) -> &'static [&'static str] {
                match program {
                    $(Program::$var => <$t>::FLAGS),+
                }
            }
        }
    };
}

options_enum! {
    Agent(AgentOptions),
    E1(E1Options),
    E2(SelectOptions),
    E3(E3Options),
    E4(SelectOptions),
    E5(SelectOptions),
    Reset(ResetOptions),
    ResetVfio(ResetVfioOptions),
    ResetDma(ResetDmaOptions),
    ResetHot(ResetHotOptions),
    NpuPeer(NpuPeerOptions),
    VfioUser(VfioUserOptions),
    BarIo(BarIoOptions),
    DmaStream(DmaStreamOptions),
    MmTeardown(MmTeardownOptions),
    MmTeardownWorker(MmWorkerOptions),
    DmaMapPages(DmaMapOptions),
    Sva(SvaOptions),
    Userptr(UserptrOptions),
}

impl Options {
    /// `program` with no options given (every one at the program's default); an error names
    /// the option `program` cannot go without.
    pub fn bare(program: Program) -> Result<Options, WireError> {
        Options::parse::<&str>(program, &[])
    }
}

impl ResetOptions {
    /// `--method method` and nothing else (every other option at its default).
    pub fn new(method: ResetMethod) -> ResetOptions {
        ResetOptions {
            bdf: None,
            method,
            dirty: None,
            expect: None,
            offered: None,
            absent: None,
            min_ms: None,
            errno: None,
            kmsg: None,
        }
    }
}

impl UserptrOptions {
    /// `--bdf bdf --mode mode` and nothing else.
    pub fn new(bdf: &str, mode: UserptrMode) -> UserptrOptions {
        UserptrOptions {
            bdf: bdf.to_string(),
            mode,
            unmap: None,
            mib: None,
            repeat: None,
            lenient: None,
        }
    }
}

impl E1Options {
    /// The function at `bdf`, the expectation left to the lab.
    pub fn at(bdf: &str) -> E1Options {
        E1Options {
            bdf: Some(bdf.to_string()),
            ..E1Options::default()
        }
    }
}

impl SelectOptions {
    /// The function at `bdf`.
    pub fn at(bdf: &str) -> SelectOptions {
        SelectOptions {
            bdf: Some(bdf.to_string()),
        }
    }
}

/// `From` for the options types that belong to one program.
macro_rules! from_options {
    ($($t:ty => $var:ident),+ $(,)?) => {$(
        impl From<$t> for Options {
            fn from(o: $t) -> Options {
                Options::$var(o)
            }
        }
    )+};
}

from_options! {
    AgentOptions => Agent,
    E1Options => E1,
    E3Options => E3,
    ResetOptions => Reset,
    ResetVfioOptions => ResetVfio,
    ResetDmaOptions => ResetDma,
    ResetHotOptions => ResetHot,
    NpuPeerOptions => NpuPeer,
    VfioUserOptions => VfioUser,
    BarIoOptions => BarIo,
    DmaStreamOptions => DmaStream,
    MmTeardownOptions => MmTeardown,
    MmWorkerOptions => MmTeardownWorker,
    DmaMapOptions => DmaMapPages,
    SvaOptions => Sva,
    UserptrOptions => Userptr,
}

#[cfg(test)]
mod tests;
