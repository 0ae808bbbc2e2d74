//! End to end: `pcisim lab kselftest vfio` builds the kernel's vfio selftests from Debian's
//! linux-source-7.3 (cached by package version after the first run, ~1 min cold), boots a
//! `gpu-2g` VM (2 GiB, vIOMMU) and runs them against pcisim's GPU bound to vfio-pci, with
//! pcisim's driver for `vfio_pci_driver_test`.
//!
//! Real and not ignored, like lab_suite.rs: it is what shows that the upstream tests and our
//! device agree. It asserts that every V scenario ran and passed (V5b as the expected failure
//! it is), that each ran its tests in the IOMMU modes the guest kernel has, and that what could
//! not pass here is reported with its reason rather than dropped.

// Test code: a failed expectation in a helper is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::process::Command;

/// The top-level result line of `name` in a KTAP stream.
fn result_line<'a>(ktap: &'a str, name: &str) -> Option<&'a str> {
    ktap.lines().find(|l| {
        (l.starts_with("ok ") || l.starts_with("not ok "))
            && l.split(" # ")
                .next()
                .is_some_and(|head| head.ends_with(name))
    })
}

/// The nested block (lines indented by two spaces) right before the result line of `name`.
fn block<'a>(ktap: &'a str, name: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = ktap.lines().collect();
    let end = lines
        .iter()
        .position(|l| {
            (l.starts_with("ok ") || l.starts_with("not ok "))
                && l.split(" # ").next().is_some_and(|h| h.ends_with(name))
        })
        .unwrap_or_else(|| panic!("no result line for {name}"));
    let start = lines[..end]
        .iter()
        .rposition(|l| !l.starts_with(' '))
        .map_or(0, |i| i + 1);
    lines[start..end].to_vec()
}

#[test]
fn lab_kselftest_vfio_runs_every_listed_test() {
    let out = Command::new(env!("CARGO_BIN_EXE_pcisim"))
        .args(["lab", "kselftest", "vfio"])
        .output()
        .expect("run pcisim lab kselftest vfio");
    let ktap = String::from_utf8_lossy(&out.stdout);
    let progress = String::from_utf8_lossy(&out.stderr);
    println!(
        "--- {}\n--- stdout:\n{ktap}\n--- stderr:\n{progress}",
        out.status
    );

    let scenarios = pcisim_lab::kselftest::scenarios();
    assert!(
        ktap.starts_with(&format!("KTAP version 1\n1..{}\n", scenarios.len())),
        "KTAP header"
    );
    // The five upstream tests the issue lists, each in a scenario.
    for bin in [
        "vfio_pci_device_test",
        "vfio_dma_mapping_test",
        "vfio_dma_mapping_mmio_test",
        "vfio_pci_device_init_perf_test",
        "vfio_pci_driver_test",
    ] {
        assert!(
            scenarios.iter().any(|s| s.name.contains(bin)),
            "{bin} has a scenario"
        );
    }
    for s in &scenarios {
        let line = result_line(&ktap, s.name).unwrap_or_else(|| panic!("no line for {}", s.name));
        if s.id == "V5b" {
            // The three driver tests that DMA to an unmapped IOVA on purpose: the device must
            // have journaled exactly that (dma_outside_map), and nothing else.
            assert!(
                line.starts_with("ok ") && line.contains(" # XFAIL "),
                "{line}"
            );
        } else {
            assert!(
                line.starts_with("ok ") && line.ends_with(s.name),
                "{} must pass: {line}",
                s.name
            );
        }
        let body = block(&ktap, s.name);
        // The guest said which modes it ran, and the upstream binary's own KTAP is nested.
        let modes = body
            .iter()
            .find(|l| l.contains("IOMMU modes: "))
            .unwrap_or_else(|| panic!("{}: no IOMMU modes line", s.name));
        let type1 = modes.contains("IOMMU modes: type1 ");
        assert!(type1 || modes.contains("IOMMU modes: iommufd "), "{modes}");
        assert!(
            body.iter().any(|l| l.trim() == "KTAP version 1"),
            "{}: the selftest's KTAP is nested",
            s.name
        );
        // Every upstream subtest ran (ok), or is a skip that says why.
        for l in body
            .iter()
            .filter(|l| l.starts_with("    ok ") || l.starts_with("    not ok "))
        {
            let is_ok = l.starts_with("    ok ");
            assert!(is_ok || s.id == "V5b", "{}: {l}", s.name);
            if l.contains(" # SKIP") {
                assert!(
                    l.split(" # SKIP")
                        .nth(1)
                        .is_some_and(|r| !r.trim().is_empty()),
                    "a skip without a reason: {l}"
                );
            }
        }
        // The driver test's 1 GiB fixture buffers came from shmem huge pages (what keeps its
        // 14 fixtures affordable under TCG), or the kernel has no shmem THP and says so.
        if s.id.starts_with("V5") {
            assert!(
                body.iter().any(|l| l.starts_with("  ok ")
                    && (l.contains("buffers were in shmem huge pages")
                        || l.contains("a kernel without shmem THP"))),
                "{}: shmem huge pages",
                s.name
            );
        }
        // Tests with IOMMU-mode variants ran in the guest's modes and no other.
        if s.id != "V1" {
            assert!(
                body.iter()
                    .any(|l| l.starts_with("  ok ") && l.contains("none in the others")),
                "{}: mode check",
                s.name
            );
        }
    }
    // On a kernel without IOMMUFD (6.12) the type1 variants run; the overflow case is either
    // passed or reported with the kernel's reason.
    if ktap.contains("IOMMU modes: type1 ") {
        assert!(ktap.contains("vfio_type1v2_iommu"), "type1v2 variants ran");
        let overflow = ktap
            .lines()
            .find(|l| l.contains("vfio_dma_mapping_test overflow"))
            .expect("the overflow step is reported");
        assert!(
            overflow.starts_with("  ok ")
                && (!overflow.contains("# SKIP") || overflow.contains("returns EINVAL")),
            "{overflow}"
        );
    }
    assert_eq!(out.status.code(), Some(0), "exit code");
}
