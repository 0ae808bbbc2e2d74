//! The GPU function (docs/programming-model.md): BAR0 registers, the command ring, the VRAM commands' formulas.

pub mod regs;
pub mod ring;
pub mod vram;
