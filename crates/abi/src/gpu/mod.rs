//! The GPU function (docs/programming-model.md): BAR0 registers and the command ring.

pub mod regs;
pub mod ring;
