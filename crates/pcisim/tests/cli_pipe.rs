//! Issue 11 item 6 without a VM: no `pcisim` command panics when its reader goes away
//! (`pcisim ... | head -0`). Each command runs with stdout a pipe whose read end is already
//! closed, so its first write fails with EPIPE (Rust ignores SIGPIPE: `println!` would panic,
//! exit 101). Each must end by itself (a hang guard kills it after 60 s), with its ordinary
//! exit code, without a signal and without "panicked" on stderr. The VM side (`pcisim lab up`
//! keeps its detached VM when its stdout closes) is `lab_manual.rs`
//! `test_up_survives_its_stdout_closing`; `bench` is `bench.rs`.

// Test code: a failed expectation in a helper is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

mod support;

use support::{Serve, TestDir, PCISIM};

/// How a command ended with nobody reading its stdout.
struct Ended {
    status: ExitStatus,
    stderr: String,
}

/// Runs `pcisim ARGS` with stdout's reader gone before it starts; stderr captured, or also
/// closed when `close_stderr` (then error messages hit EPIPE too).
fn unread<S: AsRef<OsStr>>(args: &[S], close_stderr: bool) -> Ended {
    let mut child = Command::new(PCISIM)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pcisim");
    drop(child.stdout.take());
    let mut err_pipe = child.stderr.take();
    if close_stderr {
        drop(err_pipe.take());
    }
    // Drain stderr on a thread so a chatty command cannot block on it.
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = err_pipe {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    });
    // Hang guard, not a timing assertion: a command that never ends fails the test.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "pcisim {:?} still running 60 s after its reader went away",
                args.iter().map(|a| a.as_ref()).collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ended {
        status,
        stderr: reader.join().unwrap(),
    }
}

/// No panic, no signal, exit `code`.
fn assert_ended<S: AsRef<OsStr>>(args: &[S], close_stderr: bool, code: i32) {
    let what: Vec<&OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let e = unread(args, close_stderr);
    assert!(
        !e.stderr.contains("panicked"),
        "pcisim {what:?} panicked: {}",
        e.stderr
    );
    assert_eq!(e.status.signal(), None, "pcisim {what:?}: {}", e.status);
    assert_eq!(
        e.status.code(),
        Some(code),
        "pcisim {what:?} ({}): {}",
        e.status,
        e.stderr
    );
}

#[test]
fn test_ctl_commands_whose_reader_went_away_end_without_panic() {
    let s = Serve::builder("clipipe").gpu("gpu0").control().start();
    // Some journal records to print (the GPU's creation, a client's connect/disconnect).
    drop(support::negotiated(
        &s.socket("gpu0"),
        Duration::from_secs(10),
    ));
    let control = s.control().to_str().unwrap().to_string();
    for (json, cmd) in [
        (false, &["list"][..]),
        (true, &["list"]),
        (false, &["journal"]),
        (true, &["journal"]),
        (false, &["violations"]),
        (true, &["violations"]),
        (false, &["stats"]),
        (true, &["status", "--device", "gpu0"]),
        // Follows forever while its reader is there; its first write finds it gone.
        (false, &["journal", "--follow"]),
        (true, &["journal", "--follow"]),
    ] {
        let mut args = vec!["ctl", "--control", control.as_str()];
        if json {
            args.push("--json");
        }
        args.extend_from_slice(cmd);
        // A reader that went away is not an error: exit 0.
        assert_ended(&args, false, 0);
    }
    // The server is still serving its control socket.
    assert!(s.ctl_ok(&["list"]).contains("gpu0"));
}

#[test]
fn test_describe_and_lab_list_whose_reader_went_away_end_without_panic() {
    let dir = TestDir::new("clipipe-describe");
    let sock = dir.join("gpu0.sock");
    let device = format!("gpu:socket={}", sock.display());
    assert_ended(&["describe", "--device", device.as_str()], false, 0);
    assert_ended(&["lab", "suite", "--list"], false, 0);
}

#[test]
fn test_errors_with_stdout_and_stderr_gone_exit_1_without_panic() {
    // The error message itself hits EPIPE on stderr: still exit 1, no panic (101), no signal.
    let dir = TestDir::new("clipipe-err");
    let state = dir.join("no-vm");
    let state = state.to_str().unwrap();
    assert_ended(&["lab", "status", "--state", state], true, 1);
    assert_ended(&["lab", "status", "--state", state], false, 1);
    let missing = dir.join("missing.sock");
    let missing = missing.to_str().unwrap();
    assert_ended(&["ctl", "--control", missing, "list"], true, 1);
}
