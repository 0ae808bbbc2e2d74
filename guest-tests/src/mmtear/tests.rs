//! Host-side unit tests of the layout, the report lines and the fd plumbing.

use super::ring::{slot_pattern, write_fd};
use super::supervisor::{wait_ended, Ended, Line};
use super::worker::{buf_len, pipe, read_within, seqpacket_pair};
use super::{
    tests, Case, Layout, DEFAULT_IOVA, MARK_WAITED, PATTERN_BASE, PATTERN_MASK, RING_ENTRIES,
};
use crate::sys;
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;
use std::time::Duration;

#[test]
fn layout_and_patterns() {
    let l = Layout {
        base: DEFAULT_IOVA,
        buf_len: 1 << 20,
    };
    assert_eq!(l.ring(), 0x5000_0000);
    assert_eq!(l.buf(), 0x5020_0000);
    assert_eq!(l.mark(MARK_WAITED), 0x5800_2000);
    // Every slot's pattern is recognised, and nothing else of the family is.
    for s in 0..RING_ENTRIES {
        assert_eq!(slot_pattern(s) & PATTERN_MASK, PATTERN_BASE);
    }
    assert_ne!(0x4D4C_0001 & PATTERN_MASK, PATTERN_BASE);
    assert_ne!((PATTERN_BASE | 0x80) & PATTERN_MASK, PATTERN_BASE);
    assert_eq!(buf_len(None).unwrap(), 16 << 20);
    assert!(buf_len(Some(3)).is_err());
    assert_eq!(buf_len(Some(8)).unwrap(), 8192);
    for c in [
        Case::Exit,
        Case::Kill,
        Case::Fork,
        Case::Pass,
        Case::BarMmap,
    ] {
        let t = tests(c);
        assert_eq!(t.first(), Some(&"vfio-bind"));
        assert_eq!(t.last(), Some(&"vfio-release"));
        assert!(t.contains(&"released-before-waitpid"));
    }
}

#[test]
fn report_lines_parse() {
    let l = Line::parse("child progress c0=10 c1=0x20 copy0=0x4d4d0001\n").unwrap();
    assert_eq!((l.role.as_str(), l.event.as_str()), ("child", "progress"));
    assert_eq!(l.num("c0").unwrap(), 10);
    assert_eq!(l.num("c1").unwrap(), 0x20);
    assert_eq!(l.get("copy0"), Some("0x4d4d0001"));
    // A key that is a prefix of another is not confused with it.
    assert!(l.get("c").is_none());
    assert!(l.num("missing").is_err());
    assert!(Line::parse("lonely").is_none());
    assert_eq!(Line::parse("opener ready").unwrap().rest, "");
}

#[test]
fn scm_rights_round_trip() {
    let (a, b) = seqpacket_pair().unwrap();
    let (r, w) = pipe().unwrap();
    sys::send_fds(a.as_fd(), &[w.as_raw_fd()]).unwrap();
    let got = sys::recv_fds(b.as_fd(), 3, Duration::from_secs(5)).unwrap();
    assert_eq!(got.len(), 1);
    // The received fd is the same pipe: a write through it arrives at `r`.
    write_fd(got[0].as_fd(), b"x").unwrap();
    assert_eq!(
        read_within(r.as_fd(), Duration::from_secs(5)).unwrap(),
        b"x"
    );
}

// The children are reaped by `wait_ended`, which is what is tested.
#[allow(clippy::zombie_processes)]
#[test]
fn wait_ended_reports_code_and_signal() {
    let c = Command::new("/bin/sh")
        .args(["-c", "exit 3"])
        .spawn()
        .unwrap();
    assert_eq!(
        wait_ended(c.id() as i32, Duration::from_secs(10)).unwrap(),
        Ended::Code(3)
    );
    let c2 = Command::new("/bin/sh")
        .args(["-c", "kill -9 $$"])
        .spawn()
        .unwrap();
    assert_eq!(
        wait_ended(c2.id() as i32, Duration::from_secs(10)).unwrap(),
        Ended::Signal(9)
    );
    // Already reaped: an error, not a hang.
    assert!(wait_ended(c.id() as i32, Duration::from_millis(10)).is_err());
}
