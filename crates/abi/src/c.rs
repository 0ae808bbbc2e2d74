//! The C view of the contract: the tables the guest driver's header
//! `guest-tests/kmod/pcisim_regs.h` is generated from, and the generator.
//!
//! The header is committed (the lab builds the module inside the guest's root, where there is no
//! cargo). `cargo run -p pcisim-abi --example c-header > guest-tests/kmod/pcisim_regs.h`
//! regenerates it; the test `c_header` fails while the committed file differs from
//! [`write_header`]'s output.

use core::fmt::{self, Write};

pub use crate::table::{Define, Field, Struct};

/// A group of defines sharing a C prefix.
#[derive(Debug, Clone, Copy)]
pub struct Section {
    /// A comment line above the group.
    pub title: &'static str,
    /// Prepended to every name in C.
    pub prefix: &'static str,
    /// The constants.
    pub defines: &'static [Define],
}

/// The sections of the header, in order.
pub const SECTIONS: &[Section] = &[
    Section {
        title: "PCI identities (defaults)",
        prefix: "PCISIM_",
        defines: crate::ids::TABLE,
    },
    Section {
        title: "GPU BAR0 register offsets",
        prefix: "GPU_REG_",
        defines: crate::gpu::regs::REGISTERS,
    },
    Section {
        title: "GPU BAR0 register values",
        prefix: "GPU_",
        defines: crate::gpu::regs::VALUES,
    },
    Section {
        title: "GPU command ring",
        prefix: "GPU_",
        defines: crate::gpu::ring::TABLE,
    },
    Section {
        title: "GPU command ring: opcodes",
        prefix: "GPU_OP_",
        defines: crate::gpu::ring::op::TABLE,
    },
    Section {
        title: "GPU command ring: flags",
        prefix: "GPU_FLAG_",
        defines: crate::gpu::ring::flag::TABLE,
    },
    Section {
        title: "GPU RING_CTRL bits",
        prefix: "GPU_RING_CTRL_",
        defines: crate::gpu::ring::ctrl::TABLE,
    },
    Section {
        title: "GPU RING_STATUS values",
        prefix: "GPU_RING_STATUS_",
        defines: crate::gpu::ring::status::TABLE,
    },
    Section {
        title: "GPU RING_ERROR codes",
        prefix: "GPU_ERR_",
        defines: crate::gpu::ring::err::TABLE,
    },
    Section {
        title: "NPU BAR0 register offsets",
        prefix: "NPU_REG_",
        defines: crate::npu::regs::REGISTERS,
    },
    Section {
        title: "NPU BAR0 register values and bit fields",
        prefix: "NPU_",
        defines: crate::npu::regs::VALUES,
    },
    Section {
        title: "NPU queue entries",
        prefix: "NPU_",
        defines: crate::npu::regs::QUEUE_VALUES,
    },
    Section {
        title: "NPU vendor-specific capability naming the GPU peer (offsets from the capability)",
        prefix: "PCISIM_VSEC_",
        defines: crate::npu::vsec::TABLE,
    },
];

/// The entry layouts of the header, in order.
pub const STRUCTS: &[Struct] = &[
    crate::gpu::ring::LAYOUT,
    crate::npu::queue::DESCRIPTOR_LAYOUT,
    crate::npu::queue::COMPLETION_LAYOUT,
    crate::npu::queue::FAULT_LAYOUT,
];

/// The header's file name in `guest-tests/kmod/`.
pub const HEADER_NAME: &str = "pcisim_regs.h";

/// The command that regenerates the header (from the repository root).
pub const REGENERATE: &str =
    "cargo run -p pcisim-abi --example c-header > guest-tests/kmod/pcisim_regs.h";

/// Writes `doc` as C comment text on one line: lines joined with spaces, Rust link brackets and
/// backticks dropped, `*/` defused.
fn write_doc(out: &mut impl Write, doc: &str) -> fmt::Result {
    let mut first = true;
    for line in doc.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !first {
            out.write_char(' ')?;
        }
        first = false;
        let mut prev = '\0';
        for ch in line.chars() {
            match ch {
                '`' | '[' | ']' => {}
                '/' if prev == '*' => out.write_str(" /")?,
                _ => out.write_char(ch)?,
            }
            prev = ch;
        }
    }
    Ok(())
}

fn c_type(size: usize) -> &'static str {
    match size {
        1 => "__u8",
        2 => "__u16",
        4 => "__u32",
        _ => "__u64",
    }
}

/// Writes the whole C header.
pub fn write_header(out: &mut impl Write) -> fmt::Result {
    out.write_str(
        "/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */\n\
         /*\n \
         * pcisim_regs.h - the register-level contract of pcisim's GPU and NPU functions.\n \
         *\n \
         * GENERATED from crates/abi (pcisim-abi); do not edit. Regenerate with\n \
         *   ",
    )?;
    out.write_str(REGENERATE)?;
    out.write_str(
        "\n \
         * The prose contract is docs/programming-model.md (GPU) and docs/npu.md (NPU).\n \
         * Entries are little-endian; these structs match them on a little-endian CPU.\n \
         */\n\
         #ifndef PCISIM_REGS_H\n\
         #define PCISIM_REGS_H\n\
         \n\
         #include <linux/stddef.h>\n\
         #include <linux/types.h>\n",
    )?;
    for s in SECTIONS {
        write!(out, "\n/* ---- {} ---- */\n", s.title)?;
        for d in s.defines {
            out.write_str("\n/* ")?;
            write_doc(out, d.doc)?;
            out.write_str(" */\n")?;
            if d.value > u64::from(u32::MAX) {
                writeln!(out, "#define {}{} 0x{:x}ull", s.prefix, d.name, d.value)?;
            } else {
                writeln!(out, "#define {}{} 0x{:x}u", s.prefix, d.name, d.value)?;
            }
        }
    }
    out.write_str("\n/* ---- entry layouts ---- */\n")?;
    for st in STRUCTS {
        out.write_str("\n/* ")?;
        write_doc(out, st.doc)?;
        writeln!(out, " ({} bytes) */", st.size)?;
        writeln!(out, "struct {} {{", st.name)?;
        for f in st.fields {
            write!(out, "\t{} {}", c_type(f.size), f.name)?;
            if f.count != 1 {
                write!(out, "[{}]", f.count)?;
            }
            out.write_str("; /* ")?;
            write_doc(out, f.doc)?;
            out.write_str(" */\n")?;
        }
        out.write_str("};\n")?;
        writeln!(
            out,
            "_Static_assert(sizeof(struct {}) == {}, \"{} size\");",
            st.name, st.size, st.name
        )?;
        for f in st.fields {
            writeln!(
                out,
                "_Static_assert(offsetof(struct {}, {}) == {}, \"{}.{} offset\");",
                st.name, f.name, f.offset, st.name, f.name
            )?;
        }
    }
    out.write_str("\n#endif /* PCISIM_REGS_H */\n")
}
