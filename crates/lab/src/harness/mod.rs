//! The test harness: what a scenario is and how one is run and judged, with no scenario of its
//! own.
//!
//! [`scenario`] (the [`scenario::Scenario`] record), [`verdict`] (verdicts from KTAP and exit
//! status; a leaf every judge uses),
//! [`host`] (the context a host-side scenario drives the VM through: subtests, guest commands,
//! QMP, journal windows), [`ktap`] (writer and parser), [`dmesg`] (the guest kernel's log as a
//! second oracle: report kinds, allowlist, verdict), [`suite`] (boots one VM per profile and
//! runs scenarios in it, judging each by its KTAP, its journal and its kernel log) and
//! [`timeline`] (a journal picture of one step); [`junit`] writes the suite's verdicts as JUnit
//! XML for CI engines.

pub mod dmesg;
pub mod file;
pub mod host;
mod invocation;
pub mod junit;
pub mod ktap;
pub mod scenario;
pub mod suite;
pub mod timeline;
pub mod verdict;
