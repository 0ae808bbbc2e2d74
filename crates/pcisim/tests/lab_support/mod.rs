//! Shared by the tests that run the lab for real (`lab_suite.rs`, `lab_kernel.rs`,
//! `lab_files.rs`, `lab_debug_kernel.rs`): running `pcisim` with its output shown when a test
//! fails, one VM-booting command at a time per test binary, and finding a scenario's top-level
//! KTAP result line.
//!
//! Each test file includes it with `mod lab_support;`; not every file uses every item.

#![allow(dead_code, clippy::expect_used)]

use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

/// Tests of one binary run in parallel. One lab run at a time: a run already uses the machine's
/// cores (`--jobs`, one VM per core by default), and more TCG guests than cores slow each other
/// down past timeouts.
static VM: Mutex<()> = Mutex::new(());

/// Holds the one-VM-at-a-time lock (a panicked holder does not poison it for the others).
pub fn one_vm() -> MutexGuard<'static, ()> {
    VM.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `pcisim ARGS...` (no lock taken) and prints its status, stdout and stderr, which
/// cargo test shows when the test fails.
pub fn pcisim(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_pcisim"))
        .args(args)
        .output()
        .expect("run pcisim");
    println!(
        "--- pcisim {args:?}: {}\n--- stdout:\n{}\n--- stderr (progress):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `pcisim lab suite ARGS...`, one VM-booting command at a time.
pub fn lab_suite(args: &[&str]) -> Output {
    let _one_vm = one_vm();
    let mut all = vec!["lab", "suite"];
    all.extend_from_slice(args);
    pcisim(&all)
}

/// The top-level result line whose test name ends with `name` (`ok 3 F-H1 hot-add`, `E1
/// enumeration`), ignoring its directive.
pub fn result_line<'a>(ktap: &'a str, name: &str) -> Option<&'a str> {
    ktap.lines().find(|l| {
        (l.starts_with("ok ") || l.starts_with("not ok "))
            && l.split(" # ")
                .next()
                .is_some_and(|head| head.ends_with(name))
    })
}

/// The top-level result line of scenario `id` (`E1`: `ok 1 E1 enumeration`).
pub fn result_line_of<'a>(ktap: &'a str, id: &str) -> Option<&'a str> {
    ktap.lines().find(|l| {
        (l.starts_with("ok ") || l.starts_with("not ok "))
            && l.split(" # ")
                .next()
                .is_some_and(|head| head.contains(&format!(" {id} ")))
    })
}
