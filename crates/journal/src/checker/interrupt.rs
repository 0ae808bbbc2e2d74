//! Interrupt and reset-state rules: an MSI/MSI-X delivery while the link is down, during a
//! reset, in D3hot or without Bus Master (and not re-enabled since a reset), and INTx while
//! Interrupt Disable is set.

use super::{Checker, COMMAND_INTX_DISABLE, D3HOT};
use crate::event::{InterruptOutcome, ViolationKind};

impl Checker {
    pub(super) fn interrupt_violation(
        &self,
        vector: u16,
        outcome: &InterruptOutcome,
    ) -> Option<(ViolationKind, String)> {
        let what = format!("interrupt vector {vector} {outcome}");
        let why = if !self.link_up {
            "while the link is down".to_string()
        } else if let Some(kind) = self.in_reset {
            format!("during a {kind} reset (not yet ended)")
        } else if self.power == D3HOT {
            format!("while in D3hot (PowerState=3, {})", self.command_text())
        } else if !self.bus_master() {
            match self.awaiting_reenable {
                Some(kind) => format!(
                    "while {}, not re-enabled since a {kind} reset",
                    self.command_text()
                ),
                None => format!("while {}", self.command_text()),
            }
        } else {
            return None;
        };
        Some((
            ViolationKind::InterruptWhileDisabled,
            format!("{what} {why}"),
        ))
    }

    /// INTx is not a memory request: Bus Master does not gate it, Interrupt Disable does.
    pub(super) fn intx_violation(
        &self,
        outcome: &InterruptOutcome,
    ) -> Option<(ViolationKind, String)> {
        let why = if !self.link_up {
            "while the link is down".to_string()
        } else if let Some(kind) = self.in_reset {
            format!("during a {kind} reset (not yet ended)")
        } else if self.power == D3HOT {
            "while in D3hot (PowerState=3)".to_string()
        } else if self.command & COMMAND_INTX_DISABLE != 0 {
            format!(
                "while Command={:#06x} (Interrupt Disable set)",
                self.command
            )
        } else {
            return None;
        };
        Some((
            ViolationKind::InterruptWhileDisabled,
            format!("interrupt {outcome} {why}"),
        ))
    }
}
