//! `pcisim --version` names the commit the binary was built from, so a CI log or a bug report
//! says which pcisim judged the kernel.

use std::path::Path;
use std::process::Command;

#[test]
fn version_names_the_checked_out_commit() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let head = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .expect("git runs (the tests run in a checkout)");
    assert!(head.status.success(), "not a git checkout: {head:?}");
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert_eq!(head.len(), 12, "{head}");

    let out = Command::new(env!("CARGO_BIN_EXE_pcisim"))
        .arg("--version")
        .output()
        .expect("pcisim runs");
    assert!(out.status.success());
    let line = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        line.trim(),
        format!("pcisim {} (commit {head})", env!("CARGO_PKG_VERSION"))
    );
}
