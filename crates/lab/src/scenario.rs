//! The scenario catalogue and how a guest program's result becomes a verdict.
//!
//! A scenario is one guest program invocation (`pcisim-guest <sub> ...`) whose stdout is KTAP and
//! whose exit code is kselftest-style (0 pass, 1 fail, 4 skip). Names begin with the scenario id
//! and a space, so `--filter` (a substring of the name) selects by id (`E1`), by family (`E`) or by
//! topic (`msix`). A host-side scenario ([`Program::Host`]) is a Rust function that drives the VM
//! from the host between guest commands and names the VM profile it needs
//! ([`Scenario::profile`]).

use std::time::Duration;

use crate::agent::RunOutput;
use crate::dmesg::KernelReport;
use crate::ktap::{self, Directive, KtapError, KtapSummary};
use crate::server::DescribedDevice;

/// Where the guest binary lives in the initramfs.
pub const GUEST_BIN_PATH: &str = "/bin/pcisim-guest";

/// Which guest program a scenario runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// `pcisim-guest e1 --vendor V --device D --expect JSON`
    E1,
    /// `pcisim-guest e2 --vendor V --device D`
    E2,
    /// `pcisim-guest e3 --vendor V --device D`
    E3,
    /// `pcisim-guest e4 --vendor V --device D`
    E4,
    /// `pcisim-guest e5 --vendor V --device D`
    E5,
    /// A host-side scenario ([`crate::host`]): a Rust function drives QMP, the control socket
    /// and guest commands, in a VM of its own profile.
    Host(crate::host::HostProgram),
}

/// One entry of the catalogue.
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
    /// The guest kernel reports the scenario provokes on purpose (an expected failure, like a
    /// host scenario's expected journal violations): each must appear in its kernel log slice
    /// and no other may, and its result line says `# XFAIL` ([`crate::dmesg::judge`]). Each
    /// declaration says why in a comment.
    pub kernel_reports: &'static [KernelReport],
}

/// Every scenario, in suite order.
pub fn catalogue() -> Vec<Scenario> {
    vec![
        Scenario {
            id: "E1",
            name: "E1 enumeration",
            timeout: Duration::from_secs(120),
            program: Program::E1,
            kernel_reports: &[],
        },
        Scenario {
            id: "E2",
            name: "E2 bar-mmio",
            timeout: Duration::from_secs(120),
            program: Program::E2,
            kernel_reports: &[],
        },
        Scenario {
            id: "E3",
            name: "E3 msix-delivery",
            timeout: Duration::from_secs(120),
            program: Program::E3,
            kernel_reports: &[],
        },
        Scenario {
            id: "E4",
            name: "E4 gpu-ring",
            timeout: Duration::from_secs(180),
            program: Program::E4,
            kernel_reports: &[],
        },
        Scenario {
            id: "E5",
            name: "E5 bus-master-off",
            timeout: Duration::from_secs(120),
            program: Program::E5,
            kernel_reports: &[],
        },
        Scenario {
            id: "R0",
            name: "R0 two-function-enumeration",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::reset::R0),
            kernel_reports: &[],
        },
        Scenario {
            id: "R1",
            name: "R1 flr",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::reset::R1),
            kernel_reports: &[],
        },
        Scenario {
            id: "R2",
            name: "R2 flr-with-dma",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::reset::R2),
            kernel_reports: &[],
        },
        Scenario {
            id: "R2b",
            name: "R2b flr-dma-buggy-driver",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::reset::R2B),
            kernel_reports: &[],
        },
        Scenario {
            id: "R3",
            name: "R3 pm-reset",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::reset::R3),
            kernel_reports: &[],
        },
        Scenario {
            id: "R4",
            name: "R4 bus-reset",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::reset::R4),
            kernel_reports: &[],
        },
        Scenario {
            id: "R5",
            name: "R5 slot-reset",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::reset::R5),
            kernel_reports: &[],
        },
        Scenario {
            id: "R6",
            name: "R6 vfio-device-reset",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::reset::R6),
            kernel_reports: &[],
        },
        Scenario {
            id: "R7",
            name: "R7 hot-reset",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::reset::R7),
            kernel_reports: &[],
        },
        Scenario {
            // A reset that never completes keeps the guest's FLR waiting ~65 s.
            id: "R8",
            name: "R8 slow-failed-reset",
            timeout: Duration::from_secs(180),
            program: Program::Host(crate::reset::R8),
            // The guest's FLR waits for a device that never becomes ready: pci_dev_wait sleeps
            // in msleep (state D) up to 32.8 s at a time before it gives up after ~65 s, so
            // khungtaskd reports the writer of the sysfs `reset` (`blocked for more than 10
            // seconds`, at least once for the 32.8 s sleep). A real kernel complaint this
            // scenario provokes on purpose, not a bug.
            kernel_reports: &[KernelReport::HungTask],
        },
        Scenario {
            id: "R9",
            name: "R9 system-reset",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::reset::R9),
            kernel_reports: &[],
        },
        Scenario {
            id: "H1",
            name: "H1 hot-add",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::hotplug::H1),
            kernel_reports: &[],
        },
        Scenario {
            id: "H2",
            name: "H2 hot-remove",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::hotplug::H2),
            kernel_reports: &[],
        },
        Scenario {
            id: "H3",
            name: "H3 add-remove-cycles",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::hotplug::H3),
            kernel_reports: &[],
        },
        Scenario {
            id: "H4",
            name: "H4 remove-while-held",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::hotplug::H4),
            kernel_reports: &[],
        },
        Scenario {
            id: "H5",
            name: "H5 surprise-removal",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::hotplug::H5),
            kernel_reports: &[],
        },
        Scenario {
            id: "H6",
            name: "H6 gpu-npu-peer",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::hotplug::H6),
            kernel_reports: &[],
        },
        Scenario {
            id: "H6b",
            name: "H6b gpu-peer-ref-leak",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::hotplug::H6B),
            kernel_reports: &[],
        },
        Scenario {
            id: "H7",
            name: "H7 pciehp-add-remove",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::hotplug::H7),
            kernel_reports: &[],
        },
        Scenario {
            id: "M1",
            name: "M1 mm-vfio-exit",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::mm::M1),
            kernel_reports: &[],
        },
        Scenario {
            id: "M2",
            name: "M2 mm-vfio-sigkill",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::mm::M2),
            kernel_reports: &[],
        },
        Scenario {
            id: "M3",
            name: "M3 mm-vfio-fork",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::mm::M3),
            kernel_reports: &[],
        },
        Scenario {
            id: "M4",
            name: "M4 mm-vfio-scm-rights",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::mm::M4),
            kernel_reports: &[],
        },
        Scenario {
            id: "M5",
            name: "M5 mm-vfio-bar-mmap",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::mm::M5),
            kernel_reports: &[],
        },
        Scenario {
            id: "M9",
            name: "M9 dma-map-1g-pages",
            timeout: Duration::from_secs(1800),
            program: Program::Host(crate::dmamap::M9),
            kernel_reports: &[],
        },
        Scenario {
            id: "M6",
            name: "M6 sva-lifetimes",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::sva::M6),
            kernel_reports: &[],
        },
        Scenario {
            id: "M6b",
            name: "M6b sva-no-mm-release",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::sva::M6B),
            kernel_reports: &[],
        },
        Scenario {
            id: "M6c",
            name: "M6c sva-ack-without-drain",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::sva::M6C),
            kernel_reports: &[],
        },
        Scenario {
            id: "M7",
            name: "M7 sva-invalidation",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::sva::M7),
            kernel_reports: &[],
        },
        Scenario {
            id: "M7b",
            name: "M7b sva-skip-invalidate",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::sva::M7B),
            kernel_reports: &[],
        },
        Scenario {
            id: "K1",
            name: "K1 kernel-warn-caught",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::oracle::K1),
            // pcisim_oops WARNs on request: the kernel oracle must catch it.
            kernel_reports: &[KernelReport::Warning],
        },
        Scenario {
            // A task sleeps 3 hung task periods in state D.
            id: "K2",
            name: "K2 kernel-hung-task-caught",
            timeout: Duration::from_secs(120),
            program: Program::Host(crate::oracle::K2),
            // pcisim_oops sleeps uninterruptibly on request: khungtaskd must report it.
            kernel_reports: &[KernelReport::HungTask],
        },
    ]
}

/// The scenarios whose name contains `filter` (all of them without a filter).
pub fn select(filter: Option<&str>) -> Vec<Scenario> {
    catalogue()
        .into_iter()
        .filter(|s| filter.is_none_or(|f| s.name.contains(f)))
        .collect()
}

impl Scenario {
    /// The VM profile the scenario needs (the default one for guest programs).
    pub fn profile(&self) -> crate::profile::ProfileId {
        match self.program {
            Program::Host(h) => h.profile,
            _ => crate::profile::ProfileId::default(),
        }
    }

    /// The guest command line for this scenario against `device`.
    pub fn argv(&self, device: &DescribedDevice) -> Vec<String> {
        let d = &device.description;
        let mut argv = vec![
            GUEST_BIN_PATH.to_string(),
            match self.program {
                Program::E1 => "e1",
                Program::E2 => "e2",
                Program::E3 => "e3",
                Program::E4 => "e4",
                Program::E5 => "e5",
                // Not run: a host scenario's function decides what runs in the guest.
                Program::Host(h) => h.name,
            }
            .to_string(),
            "--vendor".into(),
            format!("{:#06x}", d.vendor_id),
            "--device".into(),
            format!("{:#06x}", d.device_id),
        ];
        if self.program == Program::E1 {
            argv.push("--expect".into());
            argv.push(d.raw.to_string());
        }
        argv
    }
}

/// The verdict on one scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every assertion held.
    Pass,
    /// Something failed; the reason is one line.
    Fail(String),
    /// The scenario could not run here; the reason says why.
    Skip(String),
}

/// Describes up to three failed subtests: `2 of 7 subtests failed: class (got 0), bars`.
fn failures_text(s: &KtapSummary) -> String {
    let names: Vec<String> = s
        .failures()
        .take(3)
        .map(|r| match &r.directive {
            Some(Directive::Reason(why)) if !why.is_empty() => format!("{} ({why})", r.name),
            _ => r.name.clone(),
        })
        .collect();
    let more = if s.failed() > 3 { ", ..." } else { "" };
    format!(
        "{} of {} subtests failed: {}{more}",
        s.failed(),
        s.results.len(),
        names.join(", ")
    )
}

fn skip_reason(s: &KtapSummary) -> String {
    s.skip_all
        .clone()
        .or_else(|| {
            s.results.iter().find_map(|r| match &r.directive {
                Some(Directive::Skip(why)) if !why.is_empty() => Some(why.clone()),
                _ => None,
            })
        })
        .unwrap_or_else(|| "skipped by the guest program".into())
}

/// Judges a guest program's result: its exit status and whether its stdout is KTAP that agrees.
/// Returns the verdict and the parsed KTAP (or why it is not KTAP).
pub fn evaluate(out: &RunOutput) -> (Verdict, Result<KtapSummary, KtapError>) {
    let parsed = ktap::parse(&out.stdout);
    let not_ktap = |e: &KtapError| format!("guest output is not valid KTAP: {e}");
    let verdict = if out.timed_out {
        Verdict::Fail(format!(
            "timed out in the guest after {:.1} s",
            out.elapsed_ms as f64 / 1000.0
        ))
    } else if let Some(signal) = out.signal {
        Verdict::Fail(format!("killed by signal {signal}"))
    } else {
        match (out.exit, &parsed) {
            (Some(0), Ok(s)) if s.failed() == 0 => Verdict::Pass,
            (Some(0), Ok(s)) => Verdict::Fail(format!("exit 0 but {}", failures_text(s))),
            (Some(1), Ok(s)) if s.failed() > 0 => Verdict::Fail(failures_text(s)),
            (Some(1), Ok(_)) => Verdict::Fail("exit 1 (no failed subtest reported)".into()),
            (Some(4), Ok(s)) => Verdict::Skip(skip_reason(s)),
            (Some(code), Ok(_)) => Verdict::Fail(format!("exit {code}")),
            (Some(0) | Some(4), Err(e)) => Verdict::Fail(not_ktap(e)),
            (Some(code), Err(e)) => Verdict::Fail(format!("exit {code}; {}", not_ktap(e))),
            (None, _) => Verdict::Fail("no exit status from the agent".into()),
        }
    };
    (verdict, parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::DeviceDescription;

    fn names(s: &[Scenario]) -> Vec<&str> {
        s.iter().map(|s| s.name).collect()
    }

    #[test]
    fn test_select_by_id_family_topic() {
        assert_eq!(
            names(&select(None)),
            [
                "E1 enumeration",
                "E2 bar-mmio",
                "E3 msix-delivery",
                "E4 gpu-ring",
                "E5 bus-master-off",
                "R0 two-function-enumeration",
                "R1 flr",
                "R2 flr-with-dma",
                "R2b flr-dma-buggy-driver",
                "R3 pm-reset",
                "R4 bus-reset",
                "R5 slot-reset",
                "R6 vfio-device-reset",
                "R7 hot-reset",
                "R8 slow-failed-reset",
                "R9 system-reset",
                "H1 hot-add",
                "H2 hot-remove",
                "H3 add-remove-cycles",
                "H4 remove-while-held",
                "H5 surprise-removal",
                "H6 gpu-npu-peer",
                "H6b gpu-peer-ref-leak",
                "H7 pciehp-add-remove",
                "M1 mm-vfio-exit",
                "M2 mm-vfio-sigkill",
                "M3 mm-vfio-fork",
                "M4 mm-vfio-scm-rights",
                "M5 mm-vfio-bar-mmap",
                "M9 dma-map-1g-pages",
                "M6 sva-lifetimes",
                "M6b sva-no-mm-release",
                "M6c sva-ack-without-drain",
                "M7 sva-invalidation",
                "M7b sva-skip-invalidate",
                "K1 kernel-warn-caught",
                "K2 kernel-hung-task-caught"
            ]
        );
        assert_eq!(
            select(Some("H"))
                .iter()
                .map(Scenario::profile)
                .collect::<Vec<_>>(),
            [
                [crate::profile::ProfileId::GpuHotplug; 5].as_slice(),
                &[crate::profile::ProfileId::GpuNpuHotplug; 2],
                &[crate::profile::ProfileId::GpuPciehp]
            ]
            .concat()
        );
        assert_eq!(names(&select(Some("R9"))), ["R9 system-reset"]);
        assert_eq!(
            select(Some("R0"))[0].profile(),
            crate::profile::ProfileId::GpuNpu
        );
        assert_eq!(
            select(Some("R9"))[0].profile(),
            crate::profile::ProfileId::Gpu
        );
        assert_eq!(names(&select(Some("E1"))), ["E1 enumeration"]);
        assert_eq!(select(Some("E")).len(), 5);
        assert_eq!(names(&select(Some("msix"))), ["E3 msix-delivery"]);
        assert_eq!(names(&select(Some("E5"))), ["E5 bus-master-off"]);
        assert_eq!(names(&select(Some("ring"))), ["E4 gpu-ring"]);
        assert_eq!(names(&select(Some("R4"))), ["R4 bus-reset"]);
        assert_eq!(
            select(Some("R8"))[0].profile(),
            crate::profile::ProfileId::GpuNsr
        );
        for s in catalogue() {
            assert!(s.name.starts_with(&format!("{} ", s.id)));
        }
        // Expected kernel reports are declared on purpose, by these scenarios only.
        let declared: Vec<(&str, &[KernelReport])> = catalogue()
            .iter()
            .filter(|s| !s.kernel_reports.is_empty())
            .map(|s| (s.id, s.kernel_reports))
            .collect();
        assert_eq!(
            declared,
            [
                ("R8", &[KernelReport::HungTask][..]),
                ("K1", &[KernelReport::Warning]),
                ("K2", &[KernelReport::HungTask])
            ]
        );
    }

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
        let all = catalogue();
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
