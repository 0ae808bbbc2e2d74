//! The invariant checker behind [`crate::journal::Journal`]: a small state machine fed with every
//! event, answering which invariants (design.md §5) the event violates.

use crate::journal::{Event, Findings};

/// Checker state. (Work in progress: see the invariant list in `journal::ViolationKind`.)
#[derive(Debug, Default)]
pub struct Checker {}

impl Checker {
    /// The violations `event` commits, given everything seen before it.
    pub fn check(&mut self, event: &Event) -> Findings {
        let _ = event;
        Vec::new()
    }
}
