//! The typed contract between the lab (host) and `pcisim-guest` (the guest's multi-call binary).
//!
//! - [`Program`]: every guest subcommand, by the one name both sides use. The guest's `main`
//!   dispatches on it with an exhaustive `match` (a new program that is not dispatched does not
//!   compile), the lab names programs with it instead of strings.
//! - [`GuestProgram`]: one invocation (`pcisim-guest <program> [--vendor V --device D] [--expect
//!   JSON] args...`) with [`GuestProgram::to_argv`] and its inverse [`GuestProgram::parse`].
//! - [`DeviceDescription`]: what E1 compares, the shape `pcisim describe` prints for a device
//!   and the guest decodes from config space.
//!
//! - [`agent`]: the guest agent's JSON-lines replies and base64, read by the lab and written
//!   by the agent.
//!
//! Both workspaces use it: the root one as `pcisim-guest-wire`, `guest-tests/` by path.

pub mod agent;
pub mod options;

pub use options::*;

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where the guest binary lives in the initramfs.
pub const GUEST_BIN_PATH: &str = "/bin/pcisim-guest";

/// A `pcisim-guest` subcommand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Program {
    /// `agent`: the JSON-lines control channel on a serial port.
    Agent,
    /// `e1`: IDs, class, BARs and capabilities against the device's description.
    E1,
    /// `e2`: BAR0 registers and BAR2 VRAM through sysfs resource mappings.
    E2,
    /// `e3`: MSI-X (or MSI) delivery through a guest vfio-pci user.
    E3,
    /// `e4`: the GPU command ring.
    E4,
    /// `e5`: Bus Master Enable off.
    E5,
    /// `reset`: one reset of an unbound function through sysfs.
    Reset,
    /// `reset-vfio`: a reset while a guest vfio driver owns the function.
    ResetVfio,
    /// `reset-dma`: FLR with the ring's DMA in flight.
    ResetDma,
    /// `reset-hot`: `VFIO_DEVICE_PCI_HOT_RESET` on a two-function slot.
    ResetHot,
    /// `npu-peer`: the NPU's PEER_STATUS.
    NpuPeer,
    /// `vfio-user`: a guest vfio user mapping a DMA buffer (optionally holding the device).
    VfioUser,
    /// `bar-io`: 32-bit BAR reads and writes through sysfs.
    BarIo,
    /// `dma-stream`: the ring streaming FILLs until the device goes away.
    DmaStream,
    /// `mm-teardown`: a vfio user streaming DMA into its own buffer goes away.
    MmTeardown,
    /// `mm-teardown-worker`: `mm-teardown`'s helper process.
    MmTeardownWorker,
    /// `dma-map-pages`: many 4 KiB mappings through the vIOMMU.
    DmaMapPages,
    /// `sva`: process memory worked on by the NPU through the guest NPU driver.
    Sva,
    /// `userptr`: process memory filled by the GPU's ring through the guest GPU driver.
    Userptr,
}

impl Program {
    /// Every program.
    pub const ALL: &'static [Program] = &[
        Program::Agent,
        Program::E1,
        Program::E2,
        Program::E3,
        Program::E4,
        Program::E5,
        Program::Reset,
        Program::ResetVfio,
        Program::ResetDma,
        Program::ResetHot,
        Program::NpuPeer,
        Program::VfioUser,
        Program::BarIo,
        Program::DmaStream,
        Program::MmTeardown,
        Program::MmTeardownWorker,
        Program::DmaMapPages,
        Program::Sva,
        Program::Userptr,
    ];

    /// The subcommand's name (`reset-dma`).
    pub fn name(self) -> &'static str {
        match self {
            Program::Agent => "agent",
            Program::E1 => "e1",
            Program::E2 => "e2",
            Program::E3 => "e3",
            Program::E4 => "e4",
            Program::E5 => "e5",
            Program::Reset => "reset",
            Program::ResetVfio => "reset-vfio",
            Program::ResetDma => "reset-dma",
            Program::ResetHot => "reset-hot",
            Program::NpuPeer => "npu-peer",
            Program::VfioUser => "vfio-user",
            Program::BarIo => "bar-io",
            Program::DmaStream => "dma-stream",
            Program::MmTeardown => "mm-teardown",
            Program::MmTeardownWorker => "mm-teardown-worker",
            Program::DmaMapPages => "dma-map-pages",
            Program::Sva => "sva",
            Program::Userptr => "userptr",
        }
    }

    /// The program named `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Program> {
        Program::ALL.iter().copied().find(|p| p.name() == name)
    }
}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The PCI ids a guest program looks for (`--vendor V --device D`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceIds {
    /// PCI vendor id.
    pub vendor: u16,
    /// PCI device id.
    pub device: u16,
}

impl Program {
    /// Whether the program looks its function up by ids (`--vendor V --device D`, required);
    /// the others take a BDF or no device at all (and refuse the ids).
    pub fn takes_device(self) -> bool {
        !matches!(
            self,
            Program::Agent
                | Program::BarIo
                | Program::MmTeardownWorker
                | Program::Sva
                | Program::Userptr
        )
    }
}

/// One guest program invocation: the program with its typed options, and the device ids for
/// the programs that take them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestProgram {
    /// The device it looks for (`--vendor V --device D`): present exactly for the programs
    /// that take one ([`Program::takes_device`]).
    pub device: Option<DeviceIds>,
    /// The program and its options.
    pub options: Options,
}

/// Why an argv is not a guest program invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Fewer than two words, or the first is not the guest binary.
    NotGuest(String),
    /// No program of that name.
    UnknownProgram(String),
    /// A `--vendor`/`--device` value is missing or malformed, or the ids are missing where the
    /// program needs them (or given where it takes none).
    BadValue(String),
    /// An option the program does not take.
    UnknownOption {
        /// The program.
        program: &'static str,
        /// The option given (without `--`).
        option: String,
        /// The options it takes.
        accepted: &'static [&'static str],
    },
    /// An option the program needs is missing.
    MissingOption {
        /// The program.
        program: &'static str,
        /// The option (without `--`).
        option: &'static str,
    },
    /// An option's value is not one it takes (or is missing, or the option is given twice).
    BadOption {
        /// The program.
        program: &'static str,
        /// The option (without `--`).
        option: String,
        /// What is wrong.
        why: String,
    },
    /// A word that is no `--option`.
    Unexpected {
        /// The program.
        program: &'static str,
        /// The word.
        word: String,
    },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::NotGuest(w) => write!(f, "not a {GUEST_BIN_PATH} command line: {w}"),
            WireError::UnknownProgram(p) => write!(f, "no guest program {p:?}"),
            WireError::BadValue(w) => write!(f, "bad value: {w}"),
            WireError::UnknownOption {
                program,
                option,
                accepted,
            } => {
                let list: Vec<String> = accepted.iter().map(|a| format!("--{a}")).collect();
                write!(
                    f,
                    "{program}: unknown option --{option} (it takes: {})",
                    if list.is_empty() {
                        "none".to_string()
                    } else {
                        list.join(" ")
                    }
                )
            }
            WireError::MissingOption { program, option } => {
                write!(f, "{program}: missing required option --{option}")
            }
            WireError::BadOption {
                program,
                option,
                why,
            } => write!(f, "{program}: --{option}: {why}"),
            WireError::Unexpected { program, word } => {
                write!(
                    f,
                    "{program}: unexpected argument {word:?} (options are --name value)"
                )
            }
        }
    }
}

impl std::error::Error for WireError {}

impl GuestProgram {
    /// `options`' program, with no device ids yet.
    pub fn new(options: impl Into<Options>) -> GuestProgram {
        GuestProgram {
            device: None,
            options: options.into(),
        }
    }

    /// The program.
    pub fn program(&self) -> Program {
        self.options.program()
    }

    /// With `--vendor V --device D`.
    pub fn device(mut self, ids: DeviceIds) -> GuestProgram {
        self.device = Some(ids);
        self
    }

    /// The command line: `/bin/pcisim-guest <program> [--vendor 0x1234 --device 0x0b10]
    /// --option value...` (ids as `{:#06x}`, options in their struct's field order).
    pub fn to_argv(&self) -> Vec<String> {
        let mut argv = vec![
            GUEST_BIN_PATH.to_string(),
            self.program().name().to_string(),
        ];
        if let Some(d) = self.device {
            argv.extend([
                "--vendor".to_string(),
                format!("{:#06x}", d.vendor),
                "--device".to_string(),
                format!("{:#06x}", d.device),
            ]);
        }
        argv.extend(self.options.to_args());
        argv
    }

    /// The invocation `argv` is ([`GuestProgram::to_argv`]'s inverse): options in any order,
    /// `--name value` or `--name=value`; the ids are required where the program takes them
    /// and refused where it does not; an option the program does not take, a missing required
    /// one or a value of the wrong kind is an error that says which.
    pub fn parse<S: AsRef<str>>(argv: &[S]) -> Result<GuestProgram, WireError> {
        let words: Vec<&str> = argv.iter().map(AsRef::as_ref).collect();
        let (bin, name, rest) = match words.as_slice() {
            [bin, name, rest @ ..] => (*bin, *name, rest),
            _ => return Err(WireError::NotGuest(words.join(" "))),
        };
        if bin != GUEST_BIN_PATH {
            return Err(WireError::NotGuest(bin.to_string()));
        }
        let program =
            Program::from_name(name).ok_or_else(|| WireError::UnknownProgram(name.to_string()))?;
        Self::parse_program(program, rest)
    }

    /// [`GuestProgram::parse`] of the words after the program's name.
    pub fn parse_program<S: AsRef<str>>(
        program: Program,
        args: &[S],
    ) -> Result<GuestProgram, WireError> {
        let (mut vendor, mut device) = (None, None);
        let mut others: Vec<&str> = Vec::new();
        let mut it = args.iter().map(AsRef::as_ref);
        while let Some(w) = it.next() {
            let (flag, inline) = match w.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v)),
                _ => (w, None),
            };
            let slot = match flag {
                "--vendor" => &mut vendor,
                "--device" => &mut device,
                _ => {
                    others.push(w);
                    if inline.is_none() && w.starts_with("--") {
                        others.extend(it.next());
                    }
                    continue;
                }
            };
            let v = match inline {
                Some(v) => v,
                None => it
                    .next()
                    .ok_or_else(|| WireError::BadValue(format!("{flag} needs a value")))?,
            };
            if slot.replace(parse_id(v)?).is_some() {
                return Err(WireError::BadValue(format!("{flag} given twice")));
            }
        }
        let device = match (vendor, device, program.takes_device()) {
            (Some(vendor), Some(device), true) => Some(DeviceIds { vendor, device }),
            (None, None, false) => None,
            (_, _, true) => {
                return Err(WireError::BadValue(format!(
                    "{program} needs --vendor V --device D"
                )))
            }
            (_, _, false) => {
                return Err(WireError::BadValue(format!(
                    "{program} takes no --vendor/--device (it names its function by --bdf)"
                )))
            }
        };
        Ok(GuestProgram {
            device,
            options: Options::parse(program, &others)?,
        })
    }
}

/// A 16-bit id as `0x1234` (or decimal).
pub fn parse_id(s: &str) -> Result<u16, WireError> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| WireError::BadValue(format!("{s:?} is not a 16-bit id")))
}

/// One BAR as the guest kernel sized it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bar {
    /// BAR number.
    pub index: u32,
    /// Size in bytes.
    pub size: u64,
    /// 64-bit memory BAR.
    pub mem64: bool,
    /// Prefetchable.
    pub prefetchable: bool,
}

/// A standard capability: its ID and where it sits in config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cap {
    /// Capability ID.
    pub id: u8,
    /// Config space offset.
    pub offset: u16,
}

/// An extended capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtCap {
    /// Extended capability ID.
    pub id: u16,
    /// Config space offset.
    pub offset: u16,
    /// Its version.
    pub version: u8,
}

/// Everything E1 compares: the shape `pcisim describe` prints for one device (the lab's
/// expectation) and the guest decodes from config space (what it got). Every field is required
/// when parsing: a missing one is an error, never a silently skipped check; unknown fields are
/// ignored (the describe output may grow).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDescription {
    /// PCI vendor id.
    pub vendor_id: u16,
    /// PCI device id.
    pub device_id: u16,
    /// 24-bit class code.
    pub class_code: u32,
    /// Revision id.
    pub revision: u8,
    /// Subsystem vendor id.
    pub subsystem_vendor_id: u16,
    /// Subsystem id.
    pub subsystem_id: u16,
    /// The BARs.
    pub bars: Vec<Bar>,
    /// The standard capability list, in list order.
    pub capabilities: Vec<Cap>,
    /// The extended capability list, in list order.
    pub ext_capabilities: Vec<ExtCap>,
}

impl DeviceDescription {
    /// The field names, as serialized (every one must be in a description).
    pub const FIELDS: &'static [&'static str] = &[
        "vendor_id",
        "device_id",
        "class_code",
        "revision",
        "subsystem_vendor_id",
        "subsystem_id",
        "bars",
        "capabilities",
        "ext_capabilities",
    ];

    /// The ids a guest program looks for.
    pub fn ids(&self) -> DeviceIds {
        DeviceIds {
            vendor: self.vendor_id,
            device: self.device_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_program_names_round_trip_and_are_unique() {
        for p in Program::ALL {
            assert_eq!(Program::from_name(p.name()), Some(*p));
        }
        let mut names: Vec<&str> = Program::ALL.iter().map(|p| p.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Program::ALL.len());
        assert_eq!(Program::from_name("e6"), None);
    }

    #[test]
    fn test_parse_rejects_what_is_not_an_invocation() {
        assert!(matches!(
            GuestProgram::parse(&["/bin/busybox", "sh"]),
            Err(WireError::NotGuest(_))
        ));
        assert!(matches!(
            GuestProgram::parse(&["/bin/pcisim-guest"]),
            Err(WireError::NotGuest(_))
        ));
        assert_eq!(
            GuestProgram::parse(&["/bin/pcisim-guest", "e9"]),
            Err(WireError::UnknownProgram("e9".into()))
        );
        assert!(matches!(
            GuestProgram::parse(&["/bin/pcisim-guest", "e2", "--vendor", "x", "--device", "1"]),
            Err(WireError::BadValue(_))
        ));
    }

    #[test]
    fn test_description_fields_are_what_serializes_and_all_required() {
        let d = DeviceDescription {
            vendor_id: 0x1234,
            device_id: 0x0b10,
            class_code: 0x030200,
            revision: 1,
            subsystem_vendor_id: 0x1234,
            subsystem_id: 1,
            bars: vec![Bar {
                index: 0,
                size: 4096,
                mem64: false,
                prefetchable: false,
            }],
            capabilities: vec![Cap {
                id: 0x10,
                offset: 0x40,
            }],
            ext_capabilities: vec![],
        };
        let v = serde_json::to_value(&d).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = DeviceDescription::FIELDS.to_vec();
        keys.sort_unstable();
        want.sort_unstable();
        assert_eq!(keys, want);
        for f in DeviceDescription::FIELDS {
            let mut w = v.clone();
            w.as_object_mut().unwrap().remove(*f);
            let e = serde_json::from_value::<DeviceDescription>(w).unwrap_err();
            assert!(
                e.to_string().contains(&format!("missing field `{f}`")),
                "{e}"
            );
        }
        let mut extra = v.clone();
        extra["future"] = serde_json::json!(1);
        assert_eq!(
            serde_json::from_value::<DeviceDescription>(extra).unwrap(),
            d
        );
        assert_eq!(
            d.ids(),
            DeviceIds {
                vendor: 0x1234,
                device: 0x0b10
            }
        );
    }
}
