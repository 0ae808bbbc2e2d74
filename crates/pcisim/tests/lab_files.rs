//! End to end: `pcisim lab run` runs the scenario files of `scenarios/` (the catalogue's E2, R1,
//! R4, H1 and H2 re-expressed as TOML, docs/scenarios.md) for real, in one invocation (one VM
//! per profile), judged as the catalogue; files with a wrong expectation fail; a malformed file
//! is refused before anything boots, with an error naming the file and the line.

// Test code: a failed expectation in a helper is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod lab_support;
use lab_support::{one_vm, result_line};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/lab_files")
        .join(name)
}

fn pcisim(args: &[&str], paths: &[PathBuf]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_pcisim"))
        .args(args)
        .args(paths)
        .output()
        .expect("run pcisim");
    println!(
        "--- pcisim {args:?} {paths:?}: {}\n--- stdout:\n{}\n--- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The five files pass (each with its steps and counts as subtests), and in the same run the
/// two files with a wrong expectation fail with the reason: a declared violation that was not
/// journaled, a count that did not hold. Exit 1 (a scenario failed).
#[test]
fn lab_run_scenario_files_pass_and_wrong_expectations_fail() {
    let _one_vm = one_vm();
    let out = pcisim(
        &["lab", "run"],
        &[
            root().join("scenarios"),
            fixture("wrong-violation.toml"),
            fixture("wrong-count.toml"),
        ],
    );
    let ktap = String::from_utf8_lossy(&out.stdout);
    assert!(ktap.starts_with("KTAP version 1\n1..7\n"), "KTAP header");
    for name in [
        "F-E2 bar-mmio",
        "F-R1 flr",
        "F-R4 bus-reset",
        "F-H1 hot-add",
        "F-H2 hot-remove",
    ] {
        let line = result_line(&ktap, name).unwrap_or_else(|| panic!("no result for {name}"));
        assert!(
            line.starts_with("ok ") && line.ends_with(name),
            "{name} must pass: {line}"
        );
    }
    // The files' own checks ran as subtests (not only the guest programs).
    for sub in [
        "journaled gpu0: 1 reset_begin{kind=flr}",
        "journaled gpu0: 1 reset_begin{kind=device}",
        "journaled gpu1: 3 interrupt{outcome=delivered}",
        "ok 5 the server saw the client go",
    ] {
        assert!(ktap.contains(sub), "subtest {sub:?} missing");
    }
    let viol = result_line(&ktap, "X-VIOL expects-a-violation-that-does-not-happen").unwrap();
    assert!(
        viol.starts_with("not ok ")
            && viol.contains("expected violation not journaled: dma_during_reset on gpu0"),
        "{viol}"
    );
    let count = result_line(&ktap, "X-COUNT expects-a-reset-that-does-not-happen").unwrap();
    assert!(count.starts_with("not ok "), "{count}");
    assert!(
        ktap.contains("not ok 2 e2: journaled gpu0: 1 reset_begin{kind=flr} # 0 in the window"),
        "the failed count says what it saw"
    );
    // One VM per profile: gpu (F-E2, F-R4 and the two wrong files), gpu-hotplug, gpu-nsr.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lab: VM 1/3: profile gpu for"), "three VMs");
    assert!(
        stderr.contains("lab: VM 3/3: profile gpu-nsr for F-R1"),
        "three VMs"
    );
    assert_eq!(out.status.code(), Some(1), "a failed scenario exits 1");
}

/// A misspelt violation kind is refused at load time — before any VM boots, by `lab run` and
/// by `lab suite --scenarios` alike — with the file, the line and the valid kinds.
#[test]
fn lab_run_refuses_a_malformed_file_naming_the_line() {
    for args in [&["lab", "run"][..], &["lab", "suite", "--scenarios"][..]] {
        let out = pcisim(args, &[fixture("malformed.toml")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.stdout.is_empty(), "nothing ran");
        assert!(
            stderr.contains("malformed.toml"),
            "names the file: {stderr}"
        );
        assert!(stderr.contains("line 11"), "names the line: {stderr}");
        assert!(
            stderr.contains("unknown variant `dma_durring_reset`")
                && stderr.contains("dma_during_reset"),
            "says what is wrong: {stderr}"
        );
        assert_eq!(out.status.code(), Some(2), "refused: the run cannot start");
        assert!(!stderr.contains("guest booted"), "refused before boot");
    }
}

/// `lab suite --scenarios DIR` adds the files to the catalogue: `--filter F-E2` selects the file
/// alone (no catalogue name contains it), which runs and passes in the `gpu` VM.
#[test]
fn lab_suite_includes_a_directory_of_scenario_files() {
    let _one_vm = one_vm();
    let out = pcisim(
        &["lab", "suite", "--filter", "F-E2", "--scenarios"],
        &[root().join("scenarios")],
    );
    let ktap = String::from_utf8_lossy(&out.stdout);
    assert!(ktap.starts_with("KTAP version 1\n1..1\n"), "one scenario");
    assert!(ktap.contains("\nok 1 F-E2 bar-mmio\n"), "F-E2 passes");
    assert_eq!(out.status.code(), Some(0));
    // The VM's slowest vfio-user reply, read at its teardown (docs/protocol.md, "Reply
    // latency"): `lab: worst vfio-user reply: X ms (COMMAND on gpu0), N replies`.
    let progress = String::from_utf8_lossy(&out.stderr);
    let line = progress
        .lines()
        .find_map(|l| l.strip_prefix("lab: worst vfio-user reply: "))
        .expect("the VM's reply latency line");
    let (ms, rest) = line.split_once(" ms (").expect(line);
    let ms: f64 = ms.parse().expect(line);
    assert!(ms > 0.0 && ms < 5000.0, "{line}");
    let (what, replies) = rest.split_once("), ").expect(line);
    assert!(what.ends_with(" on gpu0"), "{line}");
    let replies: u64 = replies
        .strip_suffix(" replies")
        .expect(line)
        .parse()
        .expect(line);
    assert!(
        replies > 100,
        "a boot and a scenario are hundreds of requests: {line}"
    );
    assert!(
        progress
            .lines()
            .any(|l| l.starts_with("lab: worst vfio-user reply of the run: ")
                && l.ends_with(&format!("{replies} replies in 1 VM"))),
        "the run's line"
    );
}
