//! End to end: the manual-experiment commands for real: `pcisim lab up` leaves a VM running
//! after the command exits, `plug` hot-adds the MSI GPU (the guest sees it), `exec` runs in the
//! guest, `console` reaches the guest shell, `unplug` removes it, `down` leaves no process and no
//! state behind; and every command says clearly when something is wrong.

// Test code: a failed expectation in a helper is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

/// One VM at a time: two TCG guests on a two-core machine slow each other down past timeouts.
static VM: Mutex<()> = Mutex::new(());

fn lab(state: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_pcisim"))
        .arg("lab")
        .arg(args[0])
        .arg("--state")
        .arg(state)
        .args(&args[1..])
        .output()
        .expect("run pcisim lab");
    println!(
        "--- pcisim lab {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Processes whose command line mentions `dir`.
fn processes_using(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
        {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(&needle) {
            found.push(format!("{name}: {cmd}"));
        }
    }
    found
}

fn state_dir(tag: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/pcisim-lab-test-{tag}-{}", std::process::id()))
}

/// Brings the VM down even when an assertion failed half-way.
struct Down(PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        if self.0.join("state.json").exists() {
            let _ = lab(&self.0, &["down"]);
        }
    }
}

#[test]
fn test_without_a_vm_every_command_says_so() {
    let dir = state_dir("none");
    for args in [
        &["status"][..],
        &["plug", "gpu1"],
        &["unplug", "gpu1"],
        &["console"],
        &["down"],
        &["exec", "--", "true"],
    ] {
        let o = lab(&dir, args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&o).contains("no lab VM is running"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    let o = lab(&dir, &["up", "--profile", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unknown profile"), "{}", stderr(&o));
}

/// `pcisim lab ARGS --state DIR` with stdout (and, if `both`, stderr too) a pipe whose read
/// end is already closed: every write to it fails with EPIPE.
fn lab_unread(state: &Path, args: &[&str], both: bool) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pcisim"))
        .arg("lab")
        .arg(args[0])
        .arg("--state")
        .arg(state)
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if both {
            Stdio::piped()
        } else {
            Stdio::inherit()
        })
        .spawn()
        .expect("run pcisim lab");
    // The reader goes away before the command writes anything.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = child.wait().expect("wait for pcisim lab");
    println!(
        "--- pcisim lab {args:?} (stdout{} unread): {status}",
        if both { "+stderr" } else { "" }
    );
    Output {
        status,
        stdout: Vec::new(),
        stderr: Vec::new(),
    }
}

/// `pcisim lab up | head` used to panic (exit 101) and tear the "detached" VM down: the VM must
/// outlive its starter's output, and no command may panic on a broken pipe.
#[test]
fn test_up_survives_its_stdout_closing() {
    let _one_vm = VM.lock().unwrap_or_else(|e| e.into_inner());
    let dir = state_dir("epipe");
    let _down = Down(dir.clone());

    // stdout unread; stderr captured, to see that nothing panicked.
    let mut child = Command::new(env!("CARGO_BIN_EXE_pcisim"))
        .args(["lab", "up", "--state"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pcisim lab up");
    drop(child.stdout.take());
    let o = child.wait_with_output().expect("wait for pcisim lab up");
    println!(
        "--- pcisim lab up (stdout unread): {}\n{}",
        o.status,
        stderr(&o)
    );
    assert_ne!(
        o.status.code(),
        Some(101),
        "lab up panicked: {}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert_eq!(o.status.signal(), None, "killed by a signal");
    assert!(o.status.success(), "lab up failed: {}", stderr(&o));

    // The VM is up and stays up after its starter went.
    let o = lab(&dir, &["status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("lab VM (profile manual): running"),
        "{}",
        stdout(&o)
    );
    assert_eq!(
        processes_using(&dir).len(),
        2,
        "{:?}",
        processes_using(&dir)
    );

    // Nobody reads stdout nor stderr: status still answers (exit 0, no panic), and down still
    // brings everything down.
    let o = lab_unread(&dir, &["status"], true);
    assert_eq!(o.status.code(), Some(0));
    let o = lab_unread(&dir, &["down"], true);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        processes_using(&dir).is_empty(),
        "{:?}",
        processes_using(&dir)
    );
    assert!(!dir.exists());
}

#[test]
fn test_up_plug_exec_unplug_down() {
    let _one_vm = VM.lock().unwrap_or_else(|e| e.into_inner());
    let dir = state_dir("vm");
    let _down = Down(dir.clone());

    // up: returns with the VM left running.
    let o = lab(&dir, &["up"]);
    assert!(o.status.success());
    let text = stdout(&o);
    assert!(text.contains("lab VM up in"), "{text}");
    assert!(text.contains("gpu1   unplugged"), "{text}");
    assert!(text.contains("slot        3 (rp3) hot-add free"), "{text}");
    assert_eq!(
        processes_using(&dir).len(),
        2,
        "{:?}",
        processes_using(&dir)
    );
    let o = lab(&dir, &["up"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already running"), "{}", stderr(&o));

    // Clear errors.
    let o = lab(&dir, &["plug", "gpu9"]);
    assert!(
        stderr(&o).contains("unknown device \"gpu9\""),
        "{}",
        stderr(&o)
    );
    let o = lab(&dir, &["plug", "gpu1", "--slot", "1"]);
    assert!(
        stderr(&o).contains("slot 1 (rp1) is busy: gpu0"),
        "{}",
        stderr(&o)
    );
    let o = lab(&dir, &["plug", "gpu0"]);
    assert!(
        stderr(&o).contains("gpu0 is already plugged"),
        "{}",
        stderr(&o)
    );
    let o = lab(&dir, &["unplug", "gpu0"]);
    assert!(stderr(&o).contains("MSI-X"), "{}", stderr(&o));

    // plug: onto the free slot 3, the guest enumerates it.
    let o = lab(&dir, &["plug", "gpu1", "--slot", "3"]);
    assert!(o.status.success());
    let text = stdout(&o);
    assert!(text.contains("gpu1 plugged on rp3 at 0000:"), "{text}");
    let bdf = text.split(" at ").nth(1).unwrap()[..12].to_string();
    assert_eq!(bdf.len(), 12, "{bdf}");

    // The guest sees it (exec passes the exit status on).
    let sysfs = format!("/sys/bus/pci/devices/{bdf}/vendor");
    let o = lab(&dir, &["exec", "--", "cat", &sysfs]);
    assert!(o.status.success());
    assert_eq!(stdout(&o).trim(), "0x1234");
    let o = lab(&dir, &["exec", "--", "sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7));

    // The console shell.
    let mut c = Command::new(env!("CARGO_BIN_EXE_pcisim"))
        .args(["lab", "console", "--state"])
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(b"echo console-$((6*7)) on $(tty)\n")
        .unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success());
    assert!(
        stdout(&o).contains("console-42 on /dev/ttyS2"),
        "{}",
        stdout(&o)
    );

    // unplug: DEVICE_DELETED, and gone from the guest.
    let o = lab(&dir, &["unplug", "gpu1"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("DEVICE_DELETED"), "{}", stdout(&o));
    let o = lab(&dir, &["exec", "--", "test", "-e", &sysfs]);
    assert_eq!(o.status.code(), Some(1));
    let o = lab(&dir, &["status"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("gpu1   unplugged"), "{}", stdout(&o));

    // down: nothing left.
    let o = lab(&dir, &["down"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("guest powered off"), "{}", stdout(&o));
    assert!(
        processes_using(&dir).is_empty(),
        "{:?}",
        processes_using(&dir)
    );
    assert!(!dir.exists());
    let o = lab(&dir, &["status"]);
    assert_eq!(o.status.code(), Some(1));
}
