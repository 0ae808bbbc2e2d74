//! What a scenario is and how a guest program's result becomes a verdict.
//!
//! A scenario is one guest program invocation (`pcisim-guest <sub> ...`) whose stdout is KTAP and
//! whose exit code is kselftest-style (0 pass, 1 fail, 4 skip). Names begin with the scenario id
//! and a space, so `--filter` (a substring of the name) selects by id (`E1`), by family (`E`) or by
//! topic (`msix`). A host-side scenario ([`Program::Host`]) is a Rust function that drives the VM
//! from the host between guest commands and names the VM profile it needs
//! ([`Scenario::profile`]).

use std::time::Duration;

use pcisim_guest_wire::{Options, Program as GuestProgram};
use pcisim_journal::ViolationKind;

use crate::harness::dmesg::KernelReport;
use crate::vm::profile::ProfileId;
use crate::vm::server::DescribedDevice;

pub use crate::harness::invocation::invocation;
pub use crate::harness::verdict::{evaluate, Verdict};
pub use pcisim_guest_wire::GUEST_BIN_PATH;

/// What a scenario runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// A guest program against the VM's first device: `pcisim-guest <program> --vendor V
    /// --device D` (and `--expect JSON`, its description, for E1); its KTAP is the scenario's.
    Guest(GuestProgram),
    /// A host-side scenario ([`crate::harness::host`]): a Rust function drives QMP, the control
    /// socket and guest commands, in a VM of its own profile.
    Host(crate::harness::host::HostProgram),
}

/// One entry of the catalogue ([`crate::scenarios::catalogue`]): what runs, where, for how
/// long, and which failures it provokes on purpose (its XFAIL declarations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// The id (`E1`).
    pub id: &'static str,
    /// The KTAP test name (`E1 enumeration`).
    pub name: &'static str,
    /// How long the guest program may run (TCG: a trapped MMIO access costs ~90 µs).
    pub timeout: Duration,
    /// What runs.
    pub program: Program,
    /// The VM profile the scenario runs in, declared by its catalogue entry (a guest program
    /// runs against the profile's first device; a host program's body names the profile's
    /// devices). A unit test holds it to the host program's own profile
    /// (`scenarios::tests::test_declared_profile_is_the_programs`).
    pub profile: ProfileId,
    /// The guest kernel reports the scenario provokes on purpose (an expected failure, like
    /// [`Scenario::violations`]): each must appear in its kernel log slice and no other may, and
    /// its result line says `# XFAIL` ([`crate::harness::dmesg::judge`]). Each declaration says
    /// why in a comment.
    pub kernel_reports: &'static [KernelReport],
    /// The journal violations the scenario provokes on purpose, as (device, kind): a
    /// deliberately buggy guest program proving the oracle catches the bug. The suite passes the
    /// scenario only if every declared violation was journaled and no other one, and marks its
    /// result line `# XFAIL` (an expected failure, never silent).
    pub violations: &'static [(&'static str, ViolationKind)],
    /// The scenario's correct twin, for an expected failure: the same program on the same
    /// profile without the bug, expecting nothing (a unit test holds the catalogue to it).
    pub twin: Twin,
    /// A kernel feature the scenario needs to be meaningful at all (M8c provokes a lockdep
    /// report: without lockdep there is nothing to catch). Where the guest kernel lacks it, the
    /// scenario's program reports SKIP with the reason, and the suite counts that skip as *not
    /// applicable to this kernel* (shown in the total line and in JUnit, not an incomplete run):
    /// a Debian kernel's run can still exit 0. Any other skip still counts as one.
    pub requires: Option<KernelFeature>,
}

/// A kernel feature a scenario needs ([`Scenario::requires`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFeature {
    /// Lockdep (`CONFIG_PROVE_LOCKING`, `/proc/lockdep_chains`): the debug kernel has it
    /// (`--kernel 6.12-debug`), Debian's kernels do not.
    Lockdep,
}

impl std::fmt::Display for KernelFeature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelFeature::Lockdep => {
                f.write_str("lockdep (CONFIG_PROVE_LOCKING; --kernel 6.12-debug has it)")
            }
        }
    }
}

/// An expected failure's correct twin ([`Scenario::twin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Twin {
    /// Not an expected failure: nothing to pair.
    None,
    /// The id of the scenario that runs the same program on the same profile, correctly.
    Of(&'static str),
    /// An expected failure that cannot have a correct twin; the text says why (the kernel
    /// oracle's self-tests provoke the report with a test module that is only the bug).
    Unpaired(&'static str),
}

impl Scenario {
    /// The XFAIL declarations' defaults: a scenario that expects no violation and no kernel
    /// report. Catalogue entries end with `..Scenario::NO_XFAIL` (its id, name, timeout and
    /// program are placeholders every entry overrides).
    pub const NO_XFAIL: Scenario = Scenario {
        id: "",
        name: "",
        timeout: Duration::ZERO,
        program: Program::Guest(GuestProgram::E1),
        profile: ProfileId::Gpu,
        kernel_reports: &[],
        violations: &[],
        twin: Twin::None,
        requires: None,
    };

    /// Whether the scenario provokes a failure on purpose (a violation or a kernel report).
    pub fn is_xfail(&self) -> bool {
        !self.kernel_reports.is_empty() || !self.violations.is_empty()
    }
}

/// A host scenario's context holds this much of its entry ([`crate::harness::host::HostCtx`]).
impl From<&Scenario> for crate::harness::host::ScenarioRef {
    fn from(s: &Scenario) -> Self {
        crate::harness::host::ScenarioRef {
            id: s.id,
            name: s.name,
            timeout: s.timeout,
        }
    }
}

impl Scenario {
    /// The VM profile the scenario needs ([`Scenario::profile`], the declared field).
    pub fn profile(&self) -> ProfileId {
        self.profile
    }

    /// The guest command line for this scenario against `device` (a host scenario's function
    /// decides what runs in the guest: its argv is the bare program name, never run).
    pub fn argv(&self, device: &DescribedDevice) -> Vec<String> {
        match self.program {
            // A catalogue guest program runs with no options (a unit test holds every entry to
            // a program that can); one that cannot gets its bare name and refuses it itself.
            Program::Guest(p) => match Options::bare(p) {
                Ok(o) => invocation(o, device).to_argv(),
                Err(e) => {
                    log::error!("{}: {e}", self.id);
                    vec![GUEST_BIN_PATH.to_string(), p.name().to_string()]
                }
            },
            Program::Host(h) => vec![GUEST_BIN_PATH.to_string(), h.name.to_string()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::ktap::KtapError;
    use crate::vm::agent::RunOutput;
    use crate::vm::server::DeviceDescription;

    #[test]
    fn test_argv_uses_described_ids_and_expect_json() {
        let dev = DescribedDevice {
            id: "gpu0".into(),
            kind: "gpu".into(),
            description: DeviceDescription {
                vendor_id: 0x1234,
                device_id: 0x0b10,
                class_code: 0x030200,
                raw: serde_json::json!({"vendor_id": 4660}),
            },
        };
        let all: Vec<Scenario> = [
            GuestProgram::E1,
            GuestProgram::E2,
            GuestProgram::E3,
            GuestProgram::E4,
            GuestProgram::E5,
        ]
        .into_iter()
        .map(|p| Scenario {
            id: "X",
            name: "X",
            program: Program::Guest(p),
            ..Scenario::NO_XFAIL
        })
        .collect();
        assert_eq!(
            all[0].argv(&dev),
            [
                "/bin/pcisim-guest",
                "e1",
                "--vendor",
                "0x1234",
                "--device",
                "0x0b10",
                "--expect",
                "{\"vendor_id\":4660}"
            ]
        );
        assert_eq!(
            all[2].argv(&dev),
            [
                "/bin/pcisim-guest",
                "e3",
                "--vendor",
                "0x1234",
                "--device",
                "0x0b10"
            ]
        );
        assert_eq!(all[3].argv(&dev)[1], "e4");
        assert_eq!(all[4].argv(&dev)[1], "e5");
    }

    fn run(exit: Option<i32>, stdout: &str) -> RunOutput {
        RunOutput {
            exit,
            stdout: stdout.into(),
            ..RunOutput::default()
        }
    }

    const PASS: &str = "KTAP version 1\n1..2\nok 1 a\nok 2 b\n";
    const FAIL: &str = "KTAP version 1\n1..2\nnot ok 1 class # got 0x000000\nok 2 b\n";
    const SKIP: &str = "KTAP version 1\n1..0 # SKIP no device 1234:0b10\n";

    #[test]
    fn test_evaluate_exit_codes() {
        assert_eq!(evaluate(&run(Some(0), PASS)).0, Verdict::Pass);
        assert_eq!(
            evaluate(&run(Some(1), FAIL)).0,
            Verdict::Fail("1 of 2 subtests failed: class (got 0x000000)".into())
        );
        assert_eq!(
            evaluate(&run(Some(4), SKIP)).0,
            Verdict::Skip("no device 1234:0b10".into())
        );
        assert!(
            matches!(evaluate(&run(Some(0), FAIL)).0, Verdict::Fail(r) if r.starts_with("exit 0 but"))
        );
        assert!(matches!(evaluate(&run(Some(1), PASS)).0, Verdict::Fail(_)));
        assert_eq!(
            evaluate(&run(Some(2), PASS)).0,
            Verdict::Fail("exit 2".into())
        );
    }

    #[test]
    fn test_evaluate_invalid_ktap_fails_even_with_exit_0() {
        let (v, parsed) = evaluate(&run(Some(0), "all good\n"));
        assert!(matches!(v, Verdict::Fail(r) if r.contains("not valid KTAP")));
        assert!(parsed.is_err());
        assert!(matches!(evaluate(&run(Some(4), "")).0, Verdict::Fail(_)));
        assert!(matches!(evaluate(&run(None, PASS)).0, Verdict::Fail(_)));
        // A guest program whose plan (its declared subtests) does not match what it reported
        // fails even if every result passed and it exited 0.
        let (v, parsed) = evaluate(&run(Some(0), "KTAP version 1\n1..3\nok 1 a\nok 2 b\n"));
        assert!(
            matches!(&v, Verdict::Fail(r) if r.contains("Plan 1..3 but 2 results")),
            "{v:?}"
        );
        assert!(matches!(
            parsed,
            Err(KtapError::PlanMismatch {
                plan: 3,
                results: 2
            })
        ));
    }

    #[test]
    fn test_evaluate_timeout_and_signal() {
        let mut out = run(None, "KTAP version 1\n1..3\nok 1 a\n");
        out.timed_out = true;
        out.elapsed_ms = 120_000;
        assert_eq!(
            evaluate(&out).0,
            Verdict::Fail("timed out in the guest after 120.0 s".into())
        );
        let mut out = run(None, "");
        out.signal = Some(11);
        assert_eq!(
            evaluate(&out).0,
            Verdict::Fail("killed by signal 11".into())
        );
    }
}
