//! The control socket end to end: the real `pcisim serve --control` binary, the rust-vmm
//! `vfio_user::Client` as an independent vfio-user peer generating activity, and `pcisim ctl`
//! run as a process to read the journal back and inject faults.

// Test code: a failed expectation in a helper is a test failure.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pcisim_lab::vm::control::ControlClient;
use serde_json::Value;

/// vfio-user region index of config space.
const CONFIG: u32 = 7;
/// vfio-user IRQ index of MSI-X.
const MSIX: u32 = 2;
const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

mod support;

use support::{json_lines, unlinked_file, Serve, PCISIM};

/// `pcisim serve` with GPUs of the given ids and a control socket.
fn serve(ids: &[&str]) -> Serve {
    serve_with(ids, &[])
}

/// `pcisim serve` with GPUs of the given ids, a control socket and more arguments.
fn serve_with(ids: &[&str], extra: &[&str]) -> Serve {
    ids.iter()
        .fold(Serve::builder("ctl"), |b, id| b.gpu(id))
        .control()
        .args(extra)
        .start()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn of_type<'a>(records: &'a [Value], ty: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["type"] == ty).collect()
}

/// A client with memory space and bus mastering enabled (BAR accesses read all-ones otherwise).
fn client(socket: &Path) -> vfio_user::Client {
    let mut c = vfio_user::Client::new(socket).unwrap();
    c.region_write(CONFIG, 4, &6u16.to_le_bytes()).unwrap();
    c
}

fn config_read32(c: &mut vfio_user::Client, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(CONFIG, offset, &mut b).unwrap();
    u32::from_le_bytes(b)
}

#[test]
fn test_list_shows_device_and_whether_a_client_is_attached() {
    let s = serve(&["gpu0"]);
    let v = json(&s.ctl_ok(&["list"]));
    assert_eq!(v["ok"], true);
    let d = &v["devices"][0];
    assert_eq!(d["id"], "gpu0");
    assert_eq!(d["kind"], "gpu");
    assert_eq!(d["socket"], s.socket("gpu0").display().to_string());
    assert_eq!(d["vendor_id"], 0x1234);
    assert_eq!(d["device_id"], 0x0b10);
    assert_eq!(d["class_code"], 0x030200);
    assert_eq!(d["client"], false);

    let _client = vfio_user::Client::new(&s.socket("gpu0")).unwrap();
    let v = json(&s.ctl_ok(&["list"]));
    assert_eq!(v["devices"][0]["client"], true);

    // The text form: one line per device.
    let out = s.ctl(&["list"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("gpu0"), "{text}");
    assert!(text.contains("client attached"), "{text}");
    assert!(text.contains("1234:0b10 class 030200"), "{text}");

    // The socket is private to its owner.
    let mode = std::fs::metadata(s.control()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn test_journal_records_client_activity_and_dma_map() {
    let s = serve(&["gpu0"]);
    let mem = unlinked_file(s.dir(), 0x20000);
    let mut c = client(&s.socket("gpu0"));
    // Region accesses: a scratch register and config space.
    c.region_write(0, 0x40, &0xdead_beefu32.to_le_bytes())
        .unwrap();
    let mut b = [0u8; 4];
    c.region_read(0, 0x40, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
    assert_eq!(config_read32(&mut c, 0), 0x0b10_1234);
    // A DMA mapping backed by an fd, then its unmap.
    c.dma_map(0, 0x10_0000, 0x10000, mem.as_raw_fd()).unwrap();
    c.dma_unmap(0x10_0000, 0x10000).unwrap();

    let records = s.journal("gpu0");
    assert!(
        !of_type(&records, "client_connected").is_empty(),
        "{records:?}"
    );
    let maps = of_type(&records, "dma_mapped");
    assert_eq!(maps.len(), 1, "{records:?}");
    assert_eq!(maps[0]["iova"], 0x10_0000);
    assert_eq!(maps[0]["size"], 0x10000);
    assert_eq!(maps[0]["backed"], true);
    assert_eq!(maps[0]["device"], "gpu0");
    let unmaps = of_type(&records, "dma_unmapped");
    assert_eq!(unmaps.len(), 1, "{records:?}");
    assert_eq!(unmaps[0]["iova"], 0x10_0000);
    // Sequence numbers are consecutive from 1.
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1);
    }

    // --after skips what was already read.
    let map_seq = maps[0]["seq"].as_u64().unwrap().to_string();
    let later = json_lines(&s.ctl_ok(&["journal", "--device", "gpu0", "--after", &map_seq]));
    assert!(of_type(&later, "dma_mapped").is_empty());
    assert_eq!(of_type(&later, "dma_unmapped").len(), 1);

    // The readable form: seq, time in ms, device, event.
    let out = s.ctl(&["journal"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("dma_mapped"))
        .unwrap_or_else(|| panic!("no dma_mapped line in:\n{text}"));
    assert!(line.contains(" ms gpu0 "), "{line}");
    assert!(line.contains("iova=0x100000 size=0x10000"), "{line}");

    // Disconnecting is journaled too.
    c.shutdown().unwrap();
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = s.journal("gpu0");
        if !of_type(&records, "client_disconnected").is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no client_disconnected: {records:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn test_stats_count_interrupts_and_violations_are_empty() {
    let s = serve(&["gpu0"]);
    // Memory space and bus mastering on, an eventfd on MSI-X vector 3, ring its doorbell.
    let mut c = client(&s.socket("gpu0"));
    let efd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    c.set_irqs(
        MSIX,
        IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
        3,
        1,
        &[efd.as_raw_fd()],
    )
    .unwrap();
    c.region_write(0, 0x80, &3u32.to_le_bytes()).unwrap();

    let v = json(&s.ctl_ok(&["stats", "--device", "gpu0"]));
    let st = &v["stats"]["gpu0"];
    assert!(st["records"].as_u64().unwrap() >= 2, "{v}");
    assert!(st["interrupts"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(st["violations"], 0, "{v}");
    assert_eq!(st["last_seq"], st["records"], "{v}");
    let records = s.journal("gpu0");
    assert!(
        records
            .iter()
            .any(|r| r["type"] == "interrupt" && r["vector"] == 3),
        "{records:?}"
    );

    // A correct device found nothing wrong.
    assert_eq!(s.ctl_ok(&["violations", "--device", "gpu0"]), "[]\n");
    assert_eq!(s.ctl_ok(&["violations"]), "[]\n");
    let out = s.ctl(&["violations"]);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "gpu0: no violations\n"
    );
    let out = s.ctl(&["stats"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("gpu0: "), "{text}");
    assert!(text.contains("0 violations"), "{text}");

    // status: the device's own snapshot.
    let v = json(&s.ctl_ok(&["status", "--device", "gpu0"]));
    assert_eq!(v["device"], "gpu0");
    assert!(v["status"].is_object(), "{v}");
}

#[test]
fn test_inject_link_down_makes_config_read_all_ones() {
    let s = serve(&["gpu0"]);
    let mut c = vfio_user::Client::new(&s.socket("gpu0")).unwrap();
    assert_eq!(config_read32(&mut c, 0), 0x0b10_1234);

    let v = json(&s.ctl_ok(&["inject", "--device", "gpu0", "link-down"]));
    assert_eq!(v["ok"], true);
    assert_eq!(v["fault"], "link-down");
    // Surprise removal: the function answers all-ones.
    assert_eq!(config_read32(&mut c, 0), 0xffff_ffff);
    assert_eq!(config_read32(&mut c, 4), 0xffff_ffff);
    let records = s.journal("gpu0");
    assert!(
        records
            .iter()
            .any(|r| r["type"] == "link" && r["up"] == false),
        "{records:?}"
    );
    assert_eq!(of_type(&records, "fault_injected").len(), 1);

    // The link comes back with config space as before.
    let out = s.ctl(&["inject", "--device", "gpu0", "link-up"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "gpu0: injected link-up\n"
    );
    assert_eq!(config_read32(&mut c, 0), 0x0b10_1234);
}

#[test]
fn test_ctl_errors_are_clear_and_exit_1() {
    let s = serve(&["gpu0"]);
    let e = s.ctl_err(&["status", "--device", "gpu9"]);
    assert!(e.contains("unknown device \"gpu9\" (devices: gpu0)"), "{e}");
    let e = s.ctl_err(&["journal", "--device", "gpu9"]);
    assert!(e.contains("unknown device \"gpu9\" (devices: gpu0)"), "{e}");
    let e = s.ctl_err(&["inject", "--device", "gpu0", "melt"]);
    assert!(
        e.contains("unknown fault \"melt\" (known: link-down"),
        "{e}"
    );
    let e = s.ctl_err(&["inject", "--device", "gpu0", "dma-error=lots"]);
    assert!(e.contains("is not a number"), "{e}");

    // No server: the path is named and the cause given.
    let missing = s.dir().join("nothing.sock");
    let out = Command::new(PCISIM)
        .args(["ctl", "--control"])
        .arg(&missing)
        .arg("list")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(e.contains("Cannot connect to the control socket"), "{e}");
    assert!(e.contains("nothing.sock"), "{e}");
    // A socket nobody listens on: refused.
    let dead = s.dir().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    let out = Command::new(PCISIM)
        .args(["ctl", "--control"])
        .arg(&dead)
        .arg("list")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(e.contains("Connection refused"), "{e}");
    // No --control at all.
    let out = Command::new(PCISIM).args(["ctl", "list"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("--control PATH"));

    // The server is still fine.
    assert_eq!(json(&s.ctl_ok(&["list"]))["devices"][0]["id"], "gpu0");
}

#[test]
fn test_fault_arguments_are_validated_not_ignored() {
    // These used to be accepted (ok:true) with the argument silently ignored or misread.
    let s = serve(&["gpu0"]);
    for (fault, says) in [
        ("aer-uncorrectable=bogus", "is not fatal or nonfatal"),
        ("stuck-tp=bogus", "is not on or off"),
        ("dma-error=x", "is not a number"),
        ("slow-reset=abc", "is not a number"),
        ("link-down=now", "takes no argument"),
    ] {
        let e = s.ctl_err(&["inject", "--device", "gpu0", fault]);
        assert!(e.contains(says), "{fault}: {e}");
    }
    // Nothing was injected: the journal holds no fault record.
    let injected = s
        .journal("gpu0")
        .into_iter()
        .filter(|r| r["type"] == "fault_injected")
        .count();
    assert_eq!(injected, 0);
    // The valid forms still work (and are journaled: the instrument above can see one).
    s.ctl_ok(&["inject", "--device", "gpu0", "aer-uncorrectable=nonfatal"]);
    let injected = s
        .journal("gpu0")
        .into_iter()
        .filter(|r| r["type"] == "fault_injected")
        .count();
    assert_eq!(injected, 1);
}

#[test]
fn test_many_idle_control_clients_do_not_lock_out_ctl() {
    let s = serve(&["gpu0"]);
    // More idle connections than there are places (64), none sending anything.
    let idle: Vec<UnixStream> = (0..70)
        .map(|_| UnixStream::connect(s.control()).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(1200)); // all idle past the eviction threshold
    let start = Instant::now();
    let v = json(&s.ctl_ok(&["list"]));
    assert_eq!(v["devices"][0]["id"], "gpu0");
    // The lab's client, too.
    let mut c = ControlClient::connect(s.control()).unwrap();
    assert_eq!(c.list().unwrap()[0].id, "gpu0");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "ctl answered after {took:?}");
    // An evicted idle client sees its connection closed (EOF), not a hang.
    let mut closed = 0;
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut b = [0u8; 256];
        if matches!(std::io::Read::read(&mut c, &mut b), Ok(0)) {
            closed += 1;
        }
    }
    // (The 6 beyond 64 arrived while nobody was idle yet: they were refused at once; the
    // ctl process then took an evicted client's place and the lab client the place ctl left.)
    assert!(closed >= 1, "{closed} idle clients were disconnected");
}

#[test]
fn test_idle_control_client_times_out_and_an_active_one_stays() {
    let s = serve_with(&["gpu0"], &["--control-idle-timeout", "400"]);
    let mut idle = UnixStream::connect(s.control()).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut active = ControlClient::connect(s.control()).unwrap();
    let start = Instant::now();
    // The active client sends a request every 100 ms for a second: never idle for 400 ms.
    while start.elapsed() < Duration::from_secs(1) {
        assert_eq!(active.list().unwrap()[0].id, "gpu0");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut b = [0u8; 16];
    let n = std::io::Read::read(&mut idle, &mut b).expect("EOF, not a read timeout");
    assert_eq!(n, 0, "the idle client was disconnected");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(active.list().unwrap()[0].id, "gpu0");
}

/// Sends `line` on a raw connection and reads one response line.
fn raw_request(r: &mut BufReader<UnixStream>, w: &mut UnixStream, line: &str) -> Value {
    w.write_all(line.as_bytes()).unwrap();
    w.write_all(b"\n").unwrap();
    let mut resp = String::new();
    r.read_line(&mut resp).unwrap();
    json(&resp)
}

#[test]
fn test_bad_requests_get_errors_and_the_connection_keeps_serving() {
    let s = serve(&["gpu0"]);
    let stream = UnixStream::connect(s.control()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let err = |v: &Value| {
        assert_eq!(v["ok"], false, "{v}");
        v["error"].as_str().unwrap().to_string()
    };

    let v = raw_request(&mut r, &mut w, r#"{"op":"journal","device":"gpu9"}"#);
    assert_eq!(err(&v), "unknown device \"gpu9\" (devices: gpu0)");
    let v = raw_request(
        &mut r,
        &mut w,
        r#"{"op":"inject","device":"gpu0","fault":"melt"}"#,
    );
    assert!(err(&v).starts_with("unknown fault \"melt\""), "{v}");
    let v = raw_request(&mut r, &mut w, r#"{"op":"reboot"}"#);
    assert_eq!(
        err(&v),
        "unknown op \"reboot\" (ops: list, journal, violations, stats, status, inject)"
    );
    let v = raw_request(&mut r, &mut w, r#"{"op":"list""#);
    assert!(err(&v).starts_with("malformed JSON request"), "{v}");
    let v = raw_request(&mut r, &mut w, "\u{1}\u{2}garbage");
    assert!(err(&v).starts_with("malformed JSON request"), "{v}");
    let v = raw_request(&mut r, &mut w, "42");
    assert!(err(&v).contains("JSON object"), "{v}");
    let v = raw_request(
        &mut r,
        &mut w,
        r#"{"op":"journal","device":"gpu0","after":"x"}"#,
    );
    assert!(err(&v).contains("non-negative integer"), "{v}");
    // An over-long line is refused without being stored, and the stream stays in step.
    let v = raw_request(&mut r, &mut w, &"{".repeat(200_000));
    assert!(err(&v).contains("longer than 65536 bytes"), "{v}");

    // Same connection, still serving.
    let v = raw_request(&mut r, &mut w, r#"{"op":"list"}"#);
    assert_eq!(v["ok"], true);
    assert_eq!(v["devices"][0]["id"], "gpu0");
    let v = raw_request(&mut r, &mut w, r#"{"op":"journal","device":"gpu0"}"#);
    assert_eq!(v["ok"], true);
    assert!(v["records"].is_array());
}

#[test]
fn test_many_control_clients_at_once_while_the_device_serves() {
    let s = serve(&["gpu0"]);
    let control = s.control().to_path_buf();
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let control = control.clone();
            std::thread::spawn(move || {
                let mut c = ControlClient::connect(&control).unwrap();
                for i in 0..50 {
                    match i % 4 {
                        0 => assert_eq!(c.list().unwrap()[0].id, "gpu0"),
                        1 => drop(c.journal("gpu0", 0, Some(100)).unwrap()),
                        2 => drop(c.stats(None).unwrap()),
                        _ => drop(c.status("gpu0").unwrap()),
                    }
                }
            })
        })
        .collect();
    // Meanwhile the device keeps answering its vfio-user client promptly.
    let mut c = client(&s.socket("gpu0"));
    for i in 0..200u32 {
        c.region_write(0, 0x44, &i.to_le_bytes()).unwrap();
        let mut b = [0u8; 4];
        c.region_read(0, 0x44, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), i);
    }
    for t in readers {
        t.join().unwrap();
    }
}

#[test]
fn test_journal_follow_prints_new_records_as_they_happen() {
    let s = serve(&["gpu0"]);
    let mut follow = Command::new(PCISIM)
        .arg("ctl")
        .arg("--control")
        .arg(s.control())
        .args(["journal", "--follow", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Activity after `--follow` started.
    std::thread::sleep(Duration::from_millis(300));
    let mem = unlinked_file(s.dir(), 0x10000);
    let mut c = vfio_user::Client::new(&s.socket("gpu0")).unwrap();
    c.dma_map(0, 0x20_0000, 0x10000, mem.as_raw_fd()).unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let v = json(&line);
                if v["type"] == "dma_mapped" && v["iova"] == 0x20_0000 {
                    break true;
                }
                seen.push(line);
            }
            Err(_) => break false,
        }
    };
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(found, "--follow did not print the mapping; saw {seen:?}");
    assert!(
        seen.iter().any(|l| l.contains("client_connected")),
        "{seen:?}"
    );
}

#[test]
fn test_two_devices_are_listed_and_addressed_by_id() {
    let s = serve(&["gpu0", "gpu1"]);
    let v = json(&s.ctl_ok(&["list"]));
    let ids: Vec<&str> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gpu0", "gpu1"]);

    let _c = vfio_user::Client::new(&s.socket("gpu1")).unwrap();
    assert!(s.journal("gpu0").is_empty());
    assert_eq!(of_type(&s.journal("gpu1"), "client_connected").len(), 1);
    // Without --device the journal covers every device, each record naming its device.
    let all = json_lines(&s.ctl_ok(&["journal"]));
    assert!(all.iter().all(|r| r["device"] == "gpu1"), "{all:?}");
    assert!(!all.is_empty());
    // A device-scoped request needs the device when there are several.
    let e = s.ctl_err(&["status"]);
    assert!(e.contains("which device?"), "{e}");
    assert!(e.contains("gpu0, gpu1"), "{e}");
    let v = json(&s.ctl_ok(&["stats"]));
    assert!(v["stats"]["gpu0"].is_object() && v["stats"]["gpu1"].is_object());
}

#[test]
fn test_serve_refuses_a_live_control_socket() {
    let s = serve(&["gpu0"]);
    let out = Command::new(PCISIM)
        .arg("serve")
        .arg("--device")
        .arg(format!(
            "gpu:socket={},id=other",
            s.dir().join("other.sock").display()
        ))
        .arg("--control")
        .arg(s.control())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(e.contains("control socket"), "{e}");
    assert!(e.contains("in use"), "{e}");
    assert!(
        !s.dir().join("other.sock").exists(),
        "the refused server leaves no device socket behind"
    );
    // The first server is unharmed.
    assert_eq!(json(&s.ctl_ok(&["list"]))["devices"][0]["id"], "gpu0");
}

/// Every record `ctl --json journal` prints reads as a typed `pcisim_journal::Record` (the
/// wire form and the types agree), and `journal --timeline` draws them: one mark per reset
/// command record, the count in its summary line.
#[test]
fn test_journal_json_reads_as_typed_records_and_timeline_draws_them() {
    use pcisim_journal::{Event, Record, ResetKind};
    let s = serve(&["gpu0"]);
    let mut c = client(&s.socket("gpu0"));
    // A device reset: reset_begin/reset_end with kind "device".
    c.reset().unwrap();
    let text = s.ctl_ok(&["journal", "--device", "gpu0"]);
    let records: Vec<Record> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a Record ({e}): {l}")))
        .collect();
    assert!(
        records.iter().any(|r| r.event
            == Event::ResetBegin {
                kind: ResetKind::DeviceReset
            }),
        "{text}"
    );
    assert!(records.iter().any(|r| r.event == Event::ClientConnected));

    let svg = s.dir().join("gpu0.svg");
    let out = s.ctl(&[
        "journal",
        "--device",
        "gpu0",
        "--timeline",
        svg.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("gpu0: {} records, 0 guest events", records.len())),
        "{stdout}"
    );
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{svg}");
    assert_eq!(
        svg.matches(r#"<g class="mark cmd reset_begin""#).count(),
        1,
        "{svg}"
    );
}
