//! `pcisim lab kvm-probe`: a verdict and its reason, as text or JSON, the exit status saying
//! which (0 usable, 1 not), in well under a second.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::{Duration, Instant};

const PCISIM: &str = env!("CARGO_BIN_EXE_pcisim");

#[test]
fn test_kvm_probe_json_and_text_agree_with_exit_status() {
    let t0 = Instant::now();
    let out = Command::new(PCISIM)
        .args(["lab", "kvm-probe", "--json"])
        .output()
        .unwrap();
    let took = t0.elapsed();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    let usable = v["usable"].as_bool().unwrap();
    assert!(!v["reason"].as_str().unwrap().is_empty(), "{v}");
    // The probe reports its own time (a figure, not a test bound).
    assert!(v["elapsed_ms"].as_f64().unwrap() >= 0.0, "{v}");
    assert_eq!(out.status.code(), Some(if usable { 0 } else { 1 }), "{v}");
    // A hang guard only, process start included.
    eprintln!("pcisim lab kvm-probe answered in {took:?}");
    assert!(took < Duration::from_secs(30), "the probe hung: {took:?}");

    let out = Command::new(PCISIM)
        .args(["lab", "kvm-probe"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let want = if usable {
        "kvm: usable: "
    } else {
        "kvm: unusable: "
    };
    assert!(text.starts_with(want), "{text}");
    assert!(text.contains(v["reason"].as_str().unwrap()), "{text}");
    assert_eq!(out.status.code(), Some(if usable { 0 } else { 1 }));
}
