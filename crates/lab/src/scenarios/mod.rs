//! The scenarios' bodies, one file per family: [`reset`] (R), [`hotplug`] (H), [`mm`] (M1-M5),
//! [`sva`] (M6, M7), [`dmamap`] (M9) and [`oracle`] (K). The guest-only scenarios (E1-E5) have
//! no host body. Shared helpers live in [`crate::guestops`] or [`crate::harness`], never here,
//! and no family imports another.

use std::time::Duration;

use pcisim_journal::ViolationKind;

use std::io::Write;

use crate::error::LabError;
use crate::harness::dmesg::KernelReport;
use pcisim_guest_wire::Program as Guest;

use crate::harness::scenario::{KernelFeature, Program, Scenario, Twin};
use crate::harness::suite::{SuiteOptions, SuiteOutcome};
use crate::vm::profile::ProfileId;

pub mod dmamap;
pub mod hotplug;
pub mod mm;
pub mod oracle;
pub mod probe_reset;
pub mod reset;
pub mod sva;
pub mod userptr;

/// Every scenario, in suite order.
pub fn catalogue() -> Vec<Scenario> {
    vec![
        Scenario {
            id: "E1",
            name: "E1 enumeration",
            timeout: Duration::from_secs(120),
            program: Program::Guest(Guest::E1),
            profile: ProfileId::Gpu,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "E2",
            name: "E2 bar-mmio",
            timeout: Duration::from_secs(120),
            program: Program::Guest(Guest::E2),
            profile: ProfileId::Gpu,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "E3",
            name: "E3 msix-delivery",
            timeout: Duration::from_secs(120),
            program: Program::Guest(Guest::E3),
            profile: ProfileId::Gpu,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "E4",
            name: "E4 gpu-ring",
            timeout: Duration::from_secs(180),
            program: Program::Guest(Guest::E4),
            profile: ProfileId::Gpu,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "E5",
            name: "E5 bus-master-off",
            timeout: Duration::from_secs(120),
            program: Program::Guest(Guest::E5),
            profile: ProfileId::Gpu,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "R0",
            name: "R0 two-function-enumeration",
            timeout: Duration::from_secs(120),
            program: Program::Host(reset::R0),
            profile: ProfileId::GpuNpu,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "R1",
            name: "R1 flr",
            timeout: Duration::from_secs(120),
            program: Program::Host(reset::R1),
            profile: ProfileId::GpuNsr,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "R2",
            name: "R2 flr-with-dma",
            timeout: Duration::from_secs(120),
            program: Program::Host(reset::R2),
            profile: ProfileId::GpuNsr,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "R2b",
            name: "R2b flr-dma-buggy-driver",
            timeout: Duration::from_secs(120),
            program: Program::Host(reset::R2B),
            profile: ProfileId::GpuNsr,
            // The guest program writes Initiate FLR itself with the fill running: the writes in
            // flight land inside the reset and the checker must flag them.
            violations: &[("gpu0", ViolationKind::DmaDuringReset)],
            twin: Twin::Of("R2"),
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "R3",
            name: "R3 pm-reset",
            timeout: Duration::from_secs(120),
            program: Program::Host(reset::R3),
            profile: ProfileId::GpuNsr,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "R4",
            name: "R4 bus-reset",
            timeout: Duration::from_secs(120),
            program: Program::Host(reset::R4),
            profile: ProfileId::Gpu,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "R5",
            name: "R5 slot-reset",
            timeout: Duration::from_secs(120),
            program: Program::Host(reset::R5),
            profile: ProfileId::GpuNsr,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "R6",
            name: "R6 vfio-device-reset",
            timeout: Duration::from_secs(120),
            program: Program::Host(reset::R6),
            profile: ProfileId::GpuNsr,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "R7",
            name: "R7 hot-reset",
            timeout: Duration::from_secs(120),
            program: Program::Host(reset::R7),
            profile: ProfileId::GpuNpu,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            // A reset that never completes keeps the guest's FLR waiting ~65 s.
            id: "R8",
            name: "R8 slow-failed-reset",
            timeout: Duration::from_secs(180),
            program: Program::Host(reset::R8),
            profile: ProfileId::GpuNsr,
            // The guest's FLR waits for a device that never becomes ready: pci_dev_wait sleeps
            // in msleep (state D) up to 32.8 s at a time before it gives up after ~65 s, so
            // khungtaskd reports the writer of the sysfs `reset` (`blocked for more than 10
            // seconds`, at least once for the 32.8 s sleep). A real kernel complaint this
            // scenario provokes on purpose, not a bug.
            kernel_reports: &[KernelReport::HungTask],
            twin: Twin::Unpaired(
                "the hung task comes from the slow-reset fault the scenario injects, not from a \
                 bug in a guest program; R1 is the same FLR path without the fault",
            ),
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "R9",
            name: "R9 system-reset",
            timeout: Duration::from_secs(120),
            program: Program::Host(reset::R9),
            profile: ProfileId::Gpu,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "R10",
            name: "R10 probe-reset",
            timeout: Duration::from_secs(120),
            program: Program::Host(probe_reset::R10),
            profile: ProfileId::NpuProbeHang,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            // Waits up to 40 s for khungtaskd; nothing can run in its VM afterwards (R10, its
            // twin, runs there first).
            id: "R10b",
            name: "R10b probe-reset-deadlock",
            timeout: Duration::from_secs(180),
            program: Program::Host(probe_reset::R10B),
            profile: ProfileId::NpuProbeHang,
            // pci_reset_function() from probe sleeps forever in device_lock() (the driver core
            // holds the device lock around probe): khungtaskd reports insmod blocked for more
            // than 10 s. The deadlock this scenario provokes on purpose (seed 002). Lockdep does
            // not report it: dev->mutex is lockdep_set_novalidate_class() (drivers/base/core.c).
            kernel_reports: &[KernelReport::HungTask],
            twin: Twin::Of("R10"),
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "H1",
            name: "H1 hot-add",
            timeout: Duration::from_secs(120),
            program: Program::Host(hotplug::H1),
            profile: ProfileId::GpuHotplug,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "H2",
            name: "H2 hot-remove",
            timeout: Duration::from_secs(120),
            program: Program::Host(hotplug::H2),
            profile: ProfileId::GpuHotplug,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "H3",
            name: "H3 add-remove-cycles",
            timeout: Duration::from_secs(120),
            program: Program::Host(hotplug::H3),
            profile: ProfileId::GpuHotplug,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "H4",
            name: "H4 remove-while-held",
            timeout: Duration::from_secs(120),
            program: Program::Host(hotplug::H4),
            profile: ProfileId::GpuHotplug,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "H5",
            name: "H5 surprise-removal",
            timeout: Duration::from_secs(120),
            program: Program::Host(hotplug::H5),
            profile: ProfileId::GpuHotplug,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "H6",
            name: "H6 gpu-npu-peer",
            timeout: Duration::from_secs(120),
            program: Program::Host(hotplug::H6),
            profile: ProfileId::GpuNpuHotplug,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "H6b",
            name: "H6b gpu-peer-ref-leak",
            timeout: Duration::from_secs(120),
            program: Program::Host(hotplug::H6B),
            profile: ProfileId::GpuNpuHotplug,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "H7",
            name: "H7 pciehp-add-remove",
            timeout: Duration::from_secs(120),
            program: Program::Host(hotplug::H7),
            profile: ProfileId::GpuPciehp,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "M1",
            name: "M1 mm-vfio-exit",
            timeout: Duration::from_secs(120),
            program: Program::Host(mm::M1),
            profile: ProfileId::Gpu,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "M2",
            name: "M2 mm-vfio-sigkill",
            timeout: Duration::from_secs(120),
            program: Program::Host(mm::M2),
            profile: ProfileId::Gpu,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "M3",
            name: "M3 mm-vfio-fork",
            timeout: Duration::from_secs(120),
            program: Program::Host(mm::M3),
            profile: ProfileId::Gpu,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "M4",
            name: "M4 mm-vfio-scm-rights",
            timeout: Duration::from_secs(120),
            program: Program::Host(mm::M4),
            profile: ProfileId::Gpu,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "M5",
            name: "M5 mm-vfio-bar-mmap",
            timeout: Duration::from_secs(120),
            program: Program::Host(mm::M5),
            profile: ProfileId::Gpu,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "M9",
            name: "M9 dma-map-1g-pages",
            timeout: Duration::from_secs(1800),
            program: Program::Host(dmamap::M9),
            profile: ProfileId::GpuLarge,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "M6",
            name: "M6 sva-lifetimes",
            timeout: Duration::from_secs(120),
            program: Program::Host(sva::M6),
            profile: ProfileId::NpuSva,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "M6b",
            name: "M6b sva-no-mm-release",
            timeout: Duration::from_secs(120),
            program: Program::Host(sva::M6B),
            profile: ProfileId::NpuSva,
            // The driver ignores mm release: the device finds the PASID's tables torn down
            // by exit_mmap while it is still bound.
            violations: &[("npu0", ViolationKind::BindingOutlivedMm)],
            twin: Twin::Of("M6"),
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "M6c",
            name: "M6c sva-ack-without-drain",
            timeout: Duration::from_secs(120),
            program: Program::Host(sva::M6C),
            profile: ProfileId::NpuSva,
            // The driver returns from mm release without waiting for the drain: the address
            // space changes under the draining PASID.
            violations: &[("npu0", ViolationKind::DrainNotAwaited)],
            twin: Twin::Of("M6"),
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "M7",
            name: "M7 sva-invalidation",
            timeout: Duration::from_secs(120),
            program: Program::Host(sva::M7),
            profile: ProfileId::NpuSva,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "M7b",
            name: "M7b sva-skip-invalidate",
            timeout: Duration::from_secs(120),
            program: Program::Host(sva::M7B),
            profile: ProfileId::NpuSva,
            // The driver's invalidation callback does nothing: a missed invalidation.
            violations: &[("npu0", ViolationKind::StaleTranslation)],
            twin: Twin::Of("M7"),
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "M8",
            name: "M8 userptr-notifier",
            timeout: Duration::from_secs(180),
            program: Program::Host(userptr::M8),
            profile: ProfileId::GpuUserptr,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "M8b",
            name: "M8b userptr-no-fence-wait",
            timeout: Duration::from_secs(180),
            program: Program::Host(userptr::M8B),
            profile: ProfileId::GpuUserptr,
            // The driver's invalidation unmaps the userptr without waiting for the ring's fence:
            // the ring's next write hits the unmapped IOVA.
            violations: &[("gpu0", ViolationKind::DmaAfterUnmap)],
            twin: Twin::Of("M8"),
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "M8d",
            name: "M8d userptr-pinned",
            timeout: Duration::from_secs(180),
            program: Program::Host(userptr::M8D),
            profile: ProfileId::GpuUserptr,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            // Needs a lockdep kernel; elsewhere a SKIP with the reason (docs/userptr.md).
            id: "M8c",
            name: "M8c userptr-alloc-in-signalling",
            timeout: Duration::from_secs(180),
            program: Program::Host(userptr::M8C),
            profile: ProfileId::GpuUserptr,
            // A GFP_KERNEL allocation inside dma_fence_begin/end_signalling: lockdep's
            // `possible circular locking dependency` (dma_fence_map -> fs_reclaim, against the
            // fs_reclaim -> mmu notifier -> fence wait chain dma-resv.c primes at boot). The
            // bug this scenario provokes on purpose (seed 004). Not required when it skips.
            kernel_reports: &[KernelReport::Lockdep],
            twin: Twin::Of("M8"),
            requires: Some(KernelFeature::Lockdep),
            ..Scenario::NO_XFAIL
        },
        Scenario {
            // Last in `gpu-userptr`, after the M8 family: AER recovery through the GPU driver's
            // pci_error_handlers (docs/reset.md). The AER lines it provokes are no kernel report
            // the oracle judges (they are not splats); the scenario checks them itself.
            id: "R12",
            name: "R12 aer-recovery",
            timeout: Duration::from_secs(180),
            program: Program::Host(reset::R12),
            profile: ProfileId::GpuUserptr,
            ..Scenario::NO_XFAIL
        },
        Scenario {
            id: "K1",
            name: "K1 kernel-warn-caught",
            timeout: Duration::from_secs(120),
            program: Program::Host(oracle::K1),
            profile: ProfileId::Gpu,
            // pcisim_oops WARNs on request: the kernel oracle must catch it.
            kernel_reports: &[KernelReport::Warning],
            twin: Twin::Unpaired("an oracle self-test: its test module is only the bug"),
            ..Scenario::NO_XFAIL
        },
        Scenario {
            // A task sleeps 3 hung task periods in state D.
            id: "K2",
            name: "K2 kernel-hung-task-caught",
            timeout: Duration::from_secs(120),
            program: Program::Host(oracle::K2),
            profile: ProfileId::Gpu,
            // pcisim_oops sleeps uninterruptibly on request: khungtaskd must report it.
            kernel_reports: &[KernelReport::HungTask],
            twin: Twin::Unpaired("an oracle self-test: its test module is only the bug"),
            ..Scenario::NO_XFAIL
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

/// Runs the selected scenarios, each in a fresh VM of its profile, and writes KTAP to `ktap_out` and one-line progress
/// messages to `progress`. Returns what the run came to ([`SuiteOutcome`]; its
/// [`SuiteOutcome::exit_code`] says whether it succeeded). An `Err` means the run could not be
/// carried out (provisioning, build, boot, interrupt); the KTAP stream is still complete then
/// (the scenarios that did not run are `not ok`).
///
/// SIGINT/SIGTERM are caught for the duration of the call: the run stops, children are stopped and
/// reaped, and [`LabError::Interrupted`] is returned. Children also die with the lab if it is
/// killed (see [`crate::vm::process`]).
pub fn run_suite(
    opts: &SuiteOptions,
    ktap_out: &mut dyn Write,
    progress: &mut dyn Write,
) -> Result<SuiteOutcome, LabError> {
    crate::harness::suite::run_scenarios(opts, select(opts.filter.as_deref()), ktap_out, progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::profile::ProfileId;

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
                "R10 probe-reset",
                "R10b probe-reset-deadlock",
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
                "M8 userptr-notifier",
                "M8b userptr-no-fence-wait",
                "M8d userptr-pinned",
                "M8c userptr-alloc-in-signalling",
                "R12 aer-recovery",
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
                [crate::vm::profile::ProfileId::GpuHotplug; 5].as_slice(),
                &[crate::vm::profile::ProfileId::GpuNpuHotplug; 2],
                &[crate::vm::profile::ProfileId::GpuPciehp]
            ]
            .concat()
        );
        assert_eq!(names(&select(Some("R9"))), ["R9 system-reset"]);
        assert_eq!(
            names(&select(Some("R10"))),
            ["R10 probe-reset", "R10b probe-reset-deadlock"]
        );
        assert_eq!(
            select(Some("R10b"))[0].profile(),
            crate::vm::profile::ProfileId::NpuProbeHang
        );
        assert_eq!(
            select(Some("R0"))[0].profile(),
            crate::vm::profile::ProfileId::GpuNpu
        );
        assert_eq!(
            select(Some("R9"))[0].profile(),
            crate::vm::profile::ProfileId::Gpu
        );
        assert_eq!(names(&select(Some("E1"))), ["E1 enumeration"]);
        assert_eq!(select(Some("E")).len(), 5);
        assert_eq!(names(&select(Some("msix"))), ["E3 msix-delivery"]);
        assert_eq!(names(&select(Some("E5"))), ["E5 bus-master-off"]);
        assert_eq!(names(&select(Some("ring"))), ["E4 gpu-ring"]);
        assert_eq!(names(&select(Some("R4"))), ["R4 bus-reset"]);
        assert_eq!(
            select(Some("R8"))[0].profile(),
            crate::vm::profile::ProfileId::GpuNsr
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
                ("R10b", &[KernelReport::HungTask]),
                ("M8c", &[KernelReport::Lockdep]),
                ("K1", &[KernelReport::Warning]),
                ("K2", &[KernelReport::HungTask])
            ]
        );
    }

    /// Each entry's declared profile is the one the derivation it replaced gave: its host
    /// program's own profile, or the default (`gpu`) VM for a guest program, which runs against
    /// the VM's first device. The kselftest entries agree too.
    #[test]
    fn test_declared_profile_is_the_programs() {
        let mut all = catalogue();
        all.extend(crate::kselftest::scenarios());
        for s in &all {
            let derived = match s.program {
                Program::Host(h) => h.profile,
                Program::Guest(_) => ProfileId::default(),
            };
            assert_eq!(s.profile, derived, "{}", s.id);
            assert_eq!(s.profile(), s.profile, "{}", s.id);
        }
        assert!(all.iter().any(|s| s.profile == ProfileId::NpuSva));
    }

    /// A guest-program entry runs its program with no options: each one's program can (its
    /// typed options have no required one), so its command line is never a refused one.
    #[test]
    fn test_guest_entries_run_with_bare_options() {
        let mut guest = 0;
        for s in catalogue() {
            if let Program::Guest(p) = s.program {
                guest += 1;
                assert!(
                    pcisim_guest_wire::Options::bare(p).is_ok(),
                    "{}: {p} cannot run without options",
                    s.id
                );
            }
        }
        assert_eq!(guest, 5);
        assert!(pcisim_guest_wire::Options::bare(Guest::Reset).is_err());
    }

    #[test]
    fn test_plan_one_vm_per_profile_in_order_of_first_need() {
        let all = catalogue();
        let plan = crate::harness::suite::plan_vms(&all);
        let ids: Vec<(ProfileId, Vec<&str>)> = plan
            .iter()
            .map(|(p, g)| (*p, g.iter().map(|s| s.id).collect()))
            .collect();
        assert_eq!(ids[0].0, ProfileId::Gpu);
        assert!(ids[0].1.starts_with(&["E1", "E2", "E3"]));
        assert!(ids[0].1.contains(&"R9"));
        assert!(ids
            .iter()
            .any(|(p, g)| *p == ProfileId::GpuNpu && g.contains(&"R0")));
        // Every scenario exactly once, and each group in catalogue order.
        let n: usize = plan.iter().map(|(_, g)| g.len()).sum();
        assert_eq!(n, all.len());
        for (_, group) in &plan {
            let pos: Vec<usize> = group
                .iter()
                .map(|s| all.iter().position(|a| a.id == s.id).unwrap())
                .collect();
            assert!(pos.windows(2).all(|w| w[0] < w[1]), "{pos:?}");
        }
        // A filter that needs one profile boots one VM.
        assert_eq!(
            crate::harness::suite::plan_vms(&select(Some("R0"))).len(),
            1
        );
        assert!(crate::harness::suite::plan_vms(&[]).is_empty());
    }

    /// Every expected failure names a correct twin that exists, runs the same kind of program on
    /// the same profile and expects nothing (or says why it cannot have one); nothing else names
    /// a twin.
    #[test]
    fn test_every_xfail_scenario_has_a_correct_twin() {
        let all = catalogue();
        let mut paired = Vec::new();
        for s in &all {
            match s.twin {
                Twin::None => assert!(!s.is_xfail(), "{}: an XFAIL scenario without a twin", s.id),
                Twin::Unpaired(why) => {
                    assert!(s.is_xfail(), "{}: unpaired but not an XFAIL", s.id);
                    assert!(!why.is_empty(), "{}: unpaired without a reason", s.id);
                }
                Twin::Of(id) => {
                    assert!(s.is_xfail(), "{}: names a twin but expects nothing", s.id);
                    let t = all
                        .iter()
                        .find(|t| t.id == id)
                        .unwrap_or_else(|| panic!("{}: twin {id} is not in the catalogue", s.id));
                    assert!(!t.is_xfail(), "{}: twin {id} expects a failure too", s.id);
                    assert_eq!(t.twin, Twin::None, "{}: twin {id} names a twin", s.id);
                    assert_eq!(
                        t.profile(),
                        s.profile(),
                        "{}: twin {id} on another VM",
                        s.id
                    );
                    let same = match (t.program, s.program) {
                        (Program::Guest(a), Program::Guest(b)) => a == b,
                        (Program::Host(_), Program::Host(_)) => true,
                        _ => false,
                    };
                    assert!(same, "{}: twin {id} runs another program", s.id);
                    paired.push((s.id, id));
                }
            }
        }
        assert_eq!(
            paired,
            [
                ("R2b", "R2"),
                ("R10b", "R10"),
                ("M6b", "M6"),
                ("M6c", "M6"),
                ("M7b", "M7"),
                ("M8b", "M8"),
                ("M8c", "M8")
            ]
        );
        // The violations each buggy variant is held to.
        let declared: Vec<(&str, &[(&str, ViolationKind)])> = all
            .iter()
            .filter(|s| !s.violations.is_empty())
            .map(|s| (s.id, s.violations))
            .collect();
        assert_eq!(
            declared,
            [
                ("R2b", &[("gpu0", ViolationKind::DmaDuringReset)][..]),
                ("M6b", &[("npu0", ViolationKind::BindingOutlivedMm)]),
                ("M6c", &[("npu0", ViolationKind::DrainNotAwaited)]),
                ("M7b", &[("npu0", ViolationKind::StaleTranslation)]),
                ("M8b", &[("gpu0", ViolationKind::DmaAfterUnmap)])
            ]
        );
    }
}
