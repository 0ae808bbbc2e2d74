//! The device socket's event loop: what a loop per device guarantees (a device whose handler
//! blocks does not stall another device), one client at a time (a second waits in the backlog),
//! and a reply the client does not read bounded by the frame deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pcisim_vfio_user::proto::{Command, Header, Writer, HEADER_SIZE};
use pcisim_vfio_user::{Server, ServerOptions};

mod support;
use support::Tiny;

/// Size of region 0.
const REGION: u64 = 4 << 20;

struct Served {
    path: PathBuf,
    _dir: vmm_sys_util::tempdir::TempDir,
}

fn serve(name: &str, reset_delay: Duration, frame_timeout: Duration) -> Served {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/pcisim-evloop").unwrap();
    let path = dir.as_path().join(format!("{name}.sock"));
    let opts = ServerOptions {
        name: name.into(),
        frame_timeout: Some(frame_timeout),
        ..Default::default()
    };
    let dev = Tiny {
        region0: REGION,
        attaches: Arc::default(),
        reset_delay,
    };
    let server = Server::bind(&path, Arc::new(Mutex::new(dev)), opts).unwrap();
    std::thread::spawn(move || server.run());
    Served { path, _dir: dir }
}

fn frame(id: u16, cmd: Command, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        id,
        command: cmd as u16,
        size: (HEADER_SIZE + payload.len()) as u32,
        flags: 0,
        error: 0,
    };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(payload);
    v
}

fn read_payload(region: u32, offset: u64, count: u32) -> Vec<u8> {
    let mut w = Writer::new();
    w.u64(offset).u32(region).u32(count);
    w.finish()
}

/// The reply to the request just sent: header and payload.
fn recv(s: &mut UnixStream) -> (Header, Vec<u8>) {
    let mut hb = [0u8; HEADER_SIZE];
    s.read_exact(&mut hb).unwrap();
    let h = Header::parse(&hb);
    let mut body = vec![0u8; h.size as usize - HEADER_SIZE];
    s.read_exact(&mut body).unwrap();
    (h, body)
}

fn connect(path: &PathBuf) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn negotiate(s: &mut UnixStream) {
    let mut w = Writer::new();
    w.u16(0).u16(0).bytes(b"{}").bytes(&[0]);
    s.write_all(&frame(1, Command::Version, &w.finish()))
        .unwrap();
    let (h, _) = recv(s);
    assert_eq!(h.error, 0, "VERSION refused");
}

fn region_read(s: &mut UnixStream, count: u32) -> Header {
    s.write_all(&frame(2, Command::RegionRead, &read_payload(0, 0, count)))
        .unwrap();
    recv(s).0
}

#[test]
fn test_a_device_whose_reset_blocks_does_not_stall_another_device() {
    let slow = serve("slow", Duration::from_secs(3), Duration::from_secs(5));
    let quick = serve("quick", Duration::ZERO, Duration::from_secs(5));
    let mut a = connect(&slow.path);
    negotiate(&mut a);
    let mut b = connect(&quick.path);
    negotiate(&mut b);
    // Device A's reset holds its loop for 3 s ...
    a.write_all(&frame(3, Command::DeviceReset, &[])).unwrap();
    let reset_sent = Instant::now();
    std::thread::sleep(Duration::from_millis(50));
    // ... while device B answers every request at once.
    let mut worst = Duration::ZERO;
    while reset_sent.elapsed() < Duration::from_millis(2000) {
        let t = Instant::now();
        assert_eq!(region_read(&mut b, 4).error, 0);
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        worst < Duration::from_millis(500),
        "device B's slowest round trip while A reset: {worst:?}"
    );
    // The instrument works: A's reset really was in progress all along.
    let (h, _) = recv(&mut a);
    assert_eq!(h.error, 0);
    assert!(
        reset_sent.elapsed() >= Duration::from_millis(2900),
        "{:?}",
        reset_sent.elapsed()
    );
    eprintln!("device B's slowest round trip during A's 3 s reset: {worst:?}");
}

#[test]
fn test_a_second_client_waits_in_the_backlog_until_the_first_leaves() {
    let s = serve("backlog", Duration::ZERO, Duration::from_secs(5));
    let mut first = connect(&s.path);
    negotiate(&mut first);
    // The second connects (the kernel completes it from the backlog) and asks ...
    let mut second = connect(&s.path);
    let mut w = Writer::new();
    w.u16(0).u16(0).bytes(b"{}").bytes(&[0]);
    second
        .write_all(&frame(1, Command::Version, &w.finish()))
        .unwrap();
    // ... but is not served while the first is connected.
    second
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut hb = [0u8; HEADER_SIZE];
    let early = second.read(&mut hb);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "{early:?}"
    );
    assert_eq!(region_read(&mut first, 4).error, 0, "the first is served");
    drop(first);
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (h, _) = recv(&mut second);
    assert_eq!(h.error, 0, "served once the first left");
    assert_eq!(region_read(&mut second, 4).error, 0);
}

#[test]
fn test_a_client_that_does_not_read_its_reply_is_dropped_at_the_frame_deadline() {
    // A 1 MiB reply does not fit the socket buffer: the send waits for the client, for at most
    // the frame deadline; then the connection ends and the device serves the next client.
    let s = serve("noread", Duration::ZERO, Duration::from_millis(300));
    let mut c = connect(&s.path);
    negotiate(&mut c);
    c.write_all(&frame(2, Command::RegionRead, &read_payload(0, 0, 1 << 20)))
        .unwrap();
    let start = Instant::now();
    let mut next = connect(&s.path);
    negotiate(&mut next);
    let served = start.elapsed();
    assert!(
        served >= Duration::from_millis(250) && served < Duration::from_secs(3),
        "next client served after {served:?}"
    );
    assert_eq!(region_read(&mut next, 4).error, 0);
    // The one that did not read gets part of its reply, then EOF: never a whole frame.
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert!(
        got.len() < HEADER_SIZE + (1 << 20) + 16,
        "{} bytes reached the client that did not read",
        got.len()
    );
}
