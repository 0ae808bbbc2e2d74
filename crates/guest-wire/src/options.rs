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
mod tests {
    use super::*;
    use crate::{DeviceIds, GuestProgram};

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    /// Representative values of every program's options: each with every option given, and
    /// each with only the required ones.
    fn samples() -> Vec<Options> {
        vec![
            Options::Agent(AgentOptions {
                port: s("/dev/ttyS1"),
            }),
            Options::Agent(AgentOptions { port: None }),
            Options::E1(E1Options {
                expect: Some(serde_json::json!({"vendor_id": 4660, "bars": [{"index": 0}]})),
                expect_file: None,
                bdf: s("0000:01:00.0"),
            }),
            Options::E1(E1Options {
                expect: None,
                expect_file: s("/tmp/d.json"),
                bdf: None,
            }),
            Options::E2(SelectOptions::at("0000:02:00.0")),
            Options::E4(SelectOptions { bdf: None }),
            Options::E5(SelectOptions::at("0000:01:00.0")),
            Options::E3(E3Options {
                vectors: Some(vec![0, 1, 5]),
                irq: Some(IrqMode::Msi),
                bdf: s("0000:02:00.0"),
            }),
            Options::E3(E3Options {
                vectors: None,
                irq: None,
                bdf: None,
            }),
            Options::Reset(ResetOptions {
                bdf: s("0000:01:00.0"),
                method: ResetMethod::Bus,
                dirty: Some(OnOff::Off),
                expect: Some(ResetExpect::Dead),
                offered: Some(vec![ResetMethod::Flr, ResetMethod::Pm, ResetMethod::Bus]),
                absent: Some(vec![ResetMethod::Pm]),
                min_ms: Some(1500),
                errno: Some(25),
                kmsg: s("Data Link Layer Link Active not set|giving up"),
            }),
            Options::Reset(ResetOptions {
                bdf: None,
                method: ResetMethod::PmCycle,
                dirty: None,
                expect: None,
                offered: None,
                absent: None,
                min_ms: None,
                errno: None,
                kmsg: None,
            }),
            Options::ResetVfio(ResetVfioOptions {
                bdf: s("0000:01:00.0"),
                op: VfioResetOp::SysfsFlr,
                ring: Some(OnOff::On),
            }),
            Options::ResetDma(ResetDmaOptions {
                bdf: None,
                mode: ResetDmaMode::Buggy,
                len: Some(1 << 20),
            }),
            Options::ResetHot(ResetHotOptions {
                bdf: "0000:01:00.0".into(),
                peer: "0000:01:00.1".into(),
                peer_vendor: Some(0x1234),
                peer_device: Some(0x0c10),
            }),
            Options::NpuPeer(NpuPeerOptions {
                bdf: s("0000:01:00.1"),
                present: YesNo::Yes,
            }),
            Options::VfioUser(VfioUserOptions {
                bdf: s("0000:02:00.0"),
                dma_kib: Some(64),
                req: Some(ReqMode::Release),
                ready_file: s("/tmp/ready"),
                wait_s: Some(120),
            }),
            Options::BarIo(BarIoOptions {
                bdf: "0000:02:00.0".into(),
                bar: Some(2),
                off: vec![0, 4, 0x100],
                write: Some(0xdead_beef),
            }),
            Options::DmaStream(DmaStreamOptions {
                bdf: s("0000:02:00.0"),
                irq: Some(IrqMode::Msix),
                ready_file: s("/tmp/r"),
                down_file: s("/tmp/d"),
                stream_s: Some(60),
                down_wait_s: Some(30),
            }),
            Options::MmTeardown(MmTeardownOptions {
                case: MmCase::BarMmap,
                bdf: s("0000:01:00.0"),
                iova: Some(0x4000_0000),
                buf_kib: Some(2048),
            }),
            Options::MmTeardownWorker(MmWorkerOptions {
                role: MmRole::Receiver,
                case: MmCase::Pass,
                bdf: s("0000:01:00.0"),
                group: s("3"),
                iova: 0x4000_0000,
                buf_kib: Some(2048),
            }),
            Options::DmaMapPages(DmaMapOptions {
                bdf: None,
                mib: Some(1024),
            }),
            Options::Sva(SvaOptions {
                bdf: "0000:01:00.1".into(),
                case: "fork".into(),
                lenient: Some(OnOff::On),
            }),
            Options::Userptr(UserptrOptions {
                bdf: "0000:01:00.0".into(),
                mode: UserptrMode::Pinned,
                unmap: Some(UnmapCall::Dontneed),
                mib: Some(4),
                repeat: Some(256),
                lenient: None,
            }),
        ]
    }

    #[test]
    fn test_every_programs_options_round_trip() {
        let samples = samples();
        for p in Program::ALL {
            assert!(
                samples.iter().any(|o| o.program() == *p),
                "no sample of {p}'s options"
            );
        }
        let ids = DeviceIds {
            vendor: 0x1234,
            device: 0x0b10,
        };
        for o in samples {
            let p = o.program();
            assert_eq!(Options::parse(p, &o.to_args()), Ok(o.clone()), "{o:?}");
            // Through a whole command line, with the ids where the program takes them.
            let mut g = GuestProgram::new(o.clone());
            if p.takes_device() {
                g = g.device(ids);
            }
            assert_eq!(GuestProgram::parse(&g.to_argv()), Ok(g.clone()), "{g:?}");
            // Every option the command line gives is one the program takes.
            for w in o.to_args().iter().filter(|w| w.starts_with("--")) {
                assert!(Options::flags(p).contains(&&w[2..]), "{p}: {w}");
            }
        }
    }

    #[test]
    fn test_the_words_on_the_command_line() {
        let g = GuestProgram::new(ResetOptions {
            bdf: s("0000:01:00.0"),
            method: ResetMethod::Bus,
            dirty: None,
            expect: Some(ResetExpect::Kept),
            offered: Some(vec![ResetMethod::Flr, ResetMethod::Bus]),
            absent: None,
            min_ms: None,
            errno: Some(25),
            kmsg: None,
        })
        .device(DeviceIds {
            vendor: 0x1234,
            device: 0x0b10,
        });
        assert_eq!(
            g.to_argv(),
            [
                "/bin/pcisim-guest",
                "reset",
                "--vendor",
                "0x1234",
                "--device",
                "0x0b10",
                "--bdf",
                "0000:01:00.0",
                "--method",
                "bus",
                "--expect",
                "kept",
                "--offered",
                "flr,bus",
                "--errno",
                "25"
            ]
        );
        // Any order, `=` forms, hex numbers.
        assert_eq!(
            GuestProgram::parse(&[
                "/bin/pcisim-guest",
                "reset",
                "--errno=25",
                "--method",
                "bus",
                "--device",
                "0x0b10",
                "--offered",
                "flr,bus",
                "--vendor=0x1234",
                "--expect",
                "kept",
                "--bdf",
                "0000:01:00.0",
            ]),
            Ok(g)
        );
        assert_eq!(
            Options::parse(
                Program::MmTeardownWorker,
                &["--role", "opener", "--case", "exit", "--iova", "0x40000000"]
            ),
            Ok(Options::MmTeardownWorker(MmWorkerOptions {
                role: MmRole::Opener,
                case: MmCase::Exit,
                bdf: None,
                group: None,
                iova: 0x4000_0000,
                buf_kib: None,
            }))
        );
    }

    #[test]
    fn test_wrong_options_are_refused_with_a_clear_error() {
        let e = Options::parse(Program::E3, &["--irqs", "msi"]).unwrap_err();
        assert_eq!(
            e,
            WireError::UnknownOption {
                program: "e3",
                option: "irqs".into(),
                accepted: E3Options::FLAGS,
            }
        );
        assert_eq!(
            e.to_string(),
            "e3: unknown option --irqs (it takes: --vectors --irq --bdf)"
        );
        let e = Options::parse(Program::E3, &["--irq", "msx"]).unwrap_err();
        assert_eq!(e.to_string(), "e3: --irq: \"msx\" is not one of msix, msi");
        assert_eq!(
            Options::parse(Program::Reset, &["--bdf", "x"]),
            Err(WireError::MissingOption {
                program: "reset",
                option: "method",
            })
        );
        assert_eq!(
            Options::bare(Program::Reset).unwrap_err().to_string(),
            "reset: missing required option --method"
        );
        assert!(Options::bare(Program::E1).is_ok());
        let bad = |p: Program, args: &[&str]| Options::parse(p, args).unwrap_err().to_string();
        assert_eq!(
            bad(Program::DmaMapPages, &["--mib", "lots"]),
            "dma-map-pages: --mib: \"lots\" is not a number"
        );
        assert_eq!(
            bad(
                Program::ResetHot,
                &["--bdf", "a", "--peer", "b", "--peer-vendor", "0x12345"]
            ),
            "reset-hot: --peer-vendor: \"0x12345\" is out of range"
        );
        assert_eq!(
            bad(Program::E2, &["--bdf", "a", "--bdf", "b"]),
            "e2: --bdf: given twice"
        );
        assert_eq!(bad(Program::E2, &["--bdf"]), "e2: --bdf: needs a value");
        assert_eq!(
            bad(Program::E2, &["0000:01:00.0"]),
            "e2: unexpected argument \"0000:01:00.0\" (options are --name value)"
        );
        assert_eq!(
            bad(Program::E1, &["--expect", "{"]),
            "e1: --expect: not JSON: EOF while parsing an object at line 1 column 1"
        );
        assert_eq!(
            bad(Program::Reset, &["--method", "flr", "--offered", "flr,warm"]),
            "reset: --offered: \"warm\" is not one of flr, af_flr, pm, bus, device_specific, acpi, cxl_bus, pm-cycle, sbr"
        );
        // The ids: required where the program takes them, refused where it does not.
        assert!(matches!(
            GuestProgram::parse(&["/bin/pcisim-guest", "e2", "--bdf", "x"]),
            Err(WireError::BadValue(m)) if m.contains("e2 needs --vendor V --device D")
        ));
        assert!(matches!(
            GuestProgram::parse(&["/bin/pcisim-guest", "e2", "--vendor", "1"]),
            Err(WireError::BadValue(_))
        ));
        assert!(matches!(
            GuestProgram::parse(&[
                "/bin/pcisim-guest", "sva", "--vendor", "1", "--device", "2", "--bdf", "x",
                "--case", "basic"
            ]),
            Err(WireError::BadValue(m)) if m.contains("sva takes no --vendor")
        ));
    }

    #[test]
    fn test_words_round_trip() {
        for m in ResetMethod::ALL {
            assert_eq!(ResetMethod::from_word(m.word()), Ok(*m));
        }
        assert_eq!(u64::from_word("0x10"), Ok(16));
        assert_eq!(Vec::<u32>::from_word(" 1, 2 ,"), Ok(vec![1, 2]));
        assert_eq!(Vec::<u32>::new().to_word(), "");
        assert_eq!(Vec::<u32>::from_word(""), Ok(vec![]));
        assert!(i32::from_word("x").is_err());
        assert!(OnOff::On.is_on() && !OnOff::Off.is_on());
    }
}
