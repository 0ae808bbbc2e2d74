//! pcisim's journal: the device's testimony and the oracle that judges it.
//!
//! - [`event`]: the vocabulary — [`Event`], [`Record`], [`ViolationKind`], [`ResetKind`],
//!   [`InterruptOutcome`], … with stable serde names (the JSON of `pcisim ctl journal --json`
//!   and the control socket; docs/journal.md).
//! - [`Journal`]: a function's bounded record ring. It owns a [`Checker`] and feeds it every
//!   event before appending it, so a violation follows the event that caused it.
//! - [`checker`]: the invariant checker (design.md §5), a state machine over events.
//! - [`text`]: a record as one readable line.
//! - [`timeline`]: records (and a guest program's events) drawn as an SVG timeline, for
//!   `pcisim ctl journal --timeline` and the lab.
//!
//! Dependencies run one way: `event` ← `checker` ← `journal`; pcisim-pci produces events,
//! the server's control socket, `pcisim ctl` and the lab consume [`Record`]s.
#![deny(missing_docs)]

pub mod checker;
pub mod event;
mod journal;
pub mod text;
pub mod timeline;

pub use checker::{Checker, Findings};
pub use event::{
    Dir, Event, InterruptOutcome, IntxHold, MessageKind, Record, Refusal, ResetKind, RingErrorCode,
    Stats, UnknownOutcome, ViolationKind,
};
pub use journal::{Journal, DEFAULT_CAPACITY, MAX_VIOLATIONS};
