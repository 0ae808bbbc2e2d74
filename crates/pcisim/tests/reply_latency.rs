//! The devices' vfio-user reply latency through the control socket (issue 15 §1): the real
//! `pcisim serve --control`, a raw vfio-user client, and `pcisim ctl stats` (JSON and text).

// Test code: a failed expectation in a helper is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use pcisim_vfio_user::proto::{self, Command};
use serde_json::Value;

mod support;

use support::{frame, negotiated, payload, read_reply, send_frame, Serve};

/// vfio-user region index of config space.
const CONFIG: u32 = 7;

fn stats(s: &Serve) -> Value {
    let text = s.ctl_ok(&["stats"]);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn test_stats_report_reply_latency_of_a_served_device() {
    let s = Serve::builder("latency")
        .gpu("gpu0")
        .gpu("gpu1")
        .control()
        .start();
    let v = stats(&s);
    for id in ["gpu0", "gpu1"] {
        let l = &v["stats"][id]["reply_latency"];
        assert_eq!(l["replies"], 0, "{v}");
        assert_eq!(l["max_command"], Value::Null, "{v}");
    }

    // VERSION, 10 config reads, a DEVICE_RESET and a refused read (an error reply): 13 replies.
    let mut c = negotiated(&s.socket("gpu0"), Duration::from_secs(10));
    let read = payload(|w| {
        w.u64(0).u32(CONFIG).u32(4);
    });
    for id in 0..10 {
        send_frame(&mut c, &frame(2 + id, Command::RegionRead, &read), &[]);
        let (h, _) = read_reply(&mut c).unwrap();
        assert_eq!(
            h.flags & proto::FLAG_ERROR,
            0,
            "read {id}: error {}",
            h.error
        );
    }
    send_frame(&mut c, &frame(20, Command::DeviceReset, &[]), &[]);
    let (h, _) = read_reply(&mut c).unwrap();
    assert_eq!(h.flags & proto::FLAG_ERROR, 0, "reset: error {}", h.error);
    let bad = payload(|w| {
        w.u64(0).u32(99).u32(4);
    });
    send_frame(&mut c, &frame(21, Command::RegionRead, &bad), &[]);
    let (h, _) = read_reply(&mut c).unwrap();
    assert_ne!(
        h.flags & proto::FLAG_ERROR,
        0,
        "a read of region 99 must fail"
    );

    // The server counts a reply once its sendmsg returned, which may be after we read it.
    let mut v = stats(&s);
    for _ in 0..100 {
        if v["stats"]["gpu0"]["reply_latency"]["replies"].as_u64() >= Some(13) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        v = stats(&s);
    }
    let l = &v["stats"]["gpu0"]["reply_latency"];
    assert_eq!(l["replies"], 13, "{v}");
    assert!(l["max_ns"].as_u64().unwrap() > 0, "{v}");
    assert!(
        l["total_ns"].as_u64().unwrap() >= l["max_ns"].as_u64().unwrap(),
        "{v}"
    );
    let command = l["max_command"].as_str().unwrap();
    assert!(
        ["VERSION", "REGION_READ", "DEVICE_RESET"].contains(&command),
        "{command}"
    );
    assert!(l["max_at_unix_ms"].as_u64().unwrap() > 1_700_000_000_000);
    let histogram = l["histogram"].as_array().unwrap();
    let counted: u64 = histogram.iter().map(|b| b["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, 13, "{v}");
    // The other device's figures are its own.
    assert_eq!(v["stats"]["gpu1"]["reply_latency"]["replies"], 0, "{v}");

    // The text form: after the journal counters.
    let out = s.ctl(&["stats"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let gpu0 = text.lines().find(|l| l.starts_with("gpu0:")).unwrap();
    assert!(gpu0.contains("; 13 vfio-user replies, slowest "), "{text}");
    assert!(gpu0.contains(&format!("({command}), mean ")), "{text}");
    let gpu1 = text.lines().find(|l| l.starts_with("gpu1:")).unwrap();
    assert!(gpu1.ends_with("; no vfio-user replies yet"), "{text}");
}
