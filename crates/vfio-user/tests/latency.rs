//! The reply latency a device server aggregates (`Server::reply_latency`, issue 15 §1): every
//! reply counted once (posted writes never), a slow reset or a held device lock shows up in the
//! maximum with its command, and the interval starts when the frame was complete, not when the
//! server got around to it (a request queued behind a slow one carries the wait).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pcisim_vfio_user::latency::LatencySnapshot;
use pcisim_vfio_user::proto::{self, Command, Header, HEADER_SIZE};
use pcisim_vfio_user::{ReplyLatency, Server, ServerOptions};

mod support;
use support::{
    call, capture_logs, connect, frame, negotiate, read_payload, recv, warnings_of, Tiny,
};

/// What a reset of the test device takes.
const RESET: Duration = Duration::from_millis(300);

struct Served {
    stream: UnixStream,
    device: Arc<Mutex<Tiny>>,
    latency: Arc<ReplyLatency>,
    _dir: vmm_sys_util::tempdir::TempDir,
}

/// A [`Tiny`] whose reset takes [`RESET`], served on a thread, with a negotiated client.
fn serve(name: &str) -> Served {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/pcisim-latency").unwrap();
    let path = dir.as_path().join("dev.sock");
    let device = Arc::new(Mutex::new(Tiny {
        region0: 4096,
        attaches: Arc::default(),
        reset_delay: RESET,
    }));
    let opts = ServerOptions {
        name: name.into(),
        ..Default::default()
    };
    let server = Server::bind(&path, device.clone(), opts).unwrap();
    let latency = server.reply_latency();
    std::thread::spawn(move || server.run());
    let mut stream = connect(&path, Duration::from_secs(10));
    assert_eq!(negotiate(&mut stream, "{}"), 0);
    Served {
        stream,
        device,
        latency,
        _dir: dir,
    }
}

/// A posted 4-byte REGION_WRITE (NO_REPLY).
fn posted_write(id: u16) -> Vec<u8> {
    let mut p = proto::Writer::new();
    p.u64(0).u32(0).u32(4).bytes(&[1, 2, 3, 4]);
    let payload = p.finish();
    let h = Header {
        id,
        command: Command::RegionWrite as u16,
        size: (HEADER_SIZE + payload.len()) as u32,
        flags: proto::FLAG_NO_REPLY,
        error: 0,
    };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(&payload);
    v
}

/// Waits until the peer has read everything written on `s` (SIOCOUTQ: the bytes of an
/// AF_UNIX socket's sent skbs the receiver has not consumed yet).
fn wait_read_by_peer(s: &UnixStream) {
    for _ in 0..10_000 {
        let mut n: libc::c_int = -1;
        // SAFETY: TIOCOUTQ writes one int to `n`, which lives across the call.
        let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
        assert_eq!(r, 0, "ioctl(TIOCOUTQ): {}", std::io::Error::last_os_error());
        if n == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("the server did not read the frame within 10 s");
}

/// The figures once `n` replies are counted. The server counts a reply after its `sendmsg`
/// returns, which may be after the client read it: wait (at most 10 s) for the count to get
/// there; the caller checks it is exactly `n`.
fn settled(l: &ReplyLatency, n: u64) -> LatencySnapshot {
    for _ in 0..10_000 {
        let s = l.snapshot();
        if s.replies >= n {
            return s;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    l.snapshot()
}

/// Replies counted in buckets from `ns` up.
fn at_least(s: &LatencySnapshot, ns: u64) -> u64 {
    s.histogram
        .iter()
        .filter(|b| b.from_ns >= ns)
        .map(|b| b.count)
        .sum()
}

#[test]
fn test_every_reply_counted_once_and_a_slow_reset_is_the_maximum() {
    capture_logs();
    let mut s = serve("lat-reset");
    // VERSION: one reply so far.
    assert_eq!(settled(&s.latency, 1).replies, 1);
    for _ in 0..5 {
        assert_eq!(
            call(&mut s.stream, Command::RegionRead, &read_payload(0, 0, 4)),
            0
        );
    }
    // Posted writes get no reply and are not counted; the read after them flushes them.
    for id in 0..3 {
        s.stream.write_all(&posted_write(10 + id)).unwrap();
    }
    assert_eq!(
        call(&mut s.stream, Command::RegionRead, &read_payload(0, 0, 4)),
        0
    );
    // An error reply is a reply too.
    assert_ne!(
        call(
            &mut s.stream,
            Command::RegionRead,
            &read_payload(0, 8192, 4)
        ),
        0
    );
    let before = settled(&s.latency, 8);
    assert_eq!(before.replies, 8, "{before:?}");
    assert_eq!(call(&mut s.stream, Command::DeviceReset, &[]), 0);
    let after = settled(&s.latency, 9);
    assert_eq!(after.replies, 9, "{after:?}");
    assert_eq!(after.histogram.iter().map(|b| b.count).sum::<u64>(), 9);
    assert!(
        after.max_ns >= RESET.as_nanos() as u64,
        "max {} ns after a {RESET:?} reset",
        after.max_ns
    );
    assert_eq!(after.max_command.as_deref(), Some("DEVICE_RESET"));
    assert!(after.max_at_unix_ms.is_some());
    assert!(after.total_ns >= after.max_ns);
    assert!(
        at_least(&after, RESET.as_nanos() as u64 / 2) >= 1,
        "{after:?}"
    );
    // The server's log says which reply was slow (SLOW_REPLY, 100 ms).
    let slow: Vec<String> = warnings_of("lat-reset")
        .into_iter()
        .filter(|l| l.contains("slow reply"))
        .collect();
    assert!(
        slow.iter()
            .any(|l| l.contains("slow reply: DEVICE_RESET (id 1) answered ")),
        "{slow:?}"
    );
}

#[test]
fn test_a_request_queued_behind_a_slow_one_carries_the_wait() {
    let mut s = serve("lat-queued");
    // Both frames arrive in one write: the read is complete when the reset starts, so its
    // reply comes a reset later than its frame.
    let mut both = frame(2, Command::DeviceReset as u16, &[]);
    both.extend(frame(3, Command::RegionRead as u16, &read_payload(0, 0, 4)));
    s.stream.write_all(&both).unwrap();
    let (reset, _) = recv(&mut s.stream);
    let (read, _) = recv(&mut s.stream);
    assert_eq!((reset.id, reset.error, read.id, read.error), (2, 0, 3, 0));
    let l = settled(&s.latency, 3);
    assert_eq!(l.replies, 3, "{l:?}");
    assert_eq!(
        at_least(&l, RESET.as_nanos() as u64 / 2),
        2,
        "the reset and the read queued behind it: {l:?}"
    );
}

#[test]
fn test_a_reply_held_up_by_the_device_lock_is_the_maximum() {
    let mut s = serve("lat-lock");
    let held = Duration::from_millis(400);
    let guard = s.device.lock().unwrap();
    s.stream
        .write_all(&frame(
            2,
            Command::RegionRead as u16,
            &read_payload(0, 0, 4),
        ))
        .unwrap();
    // Once the server has read the frame (it then waits for the lock), hold the lock `held`.
    wait_read_by_peer(&s.stream);
    std::thread::sleep(held);
    drop(guard);
    let (h, _) = recv(&mut s.stream);
    assert_eq!(h.error, 0);
    let l = settled(&s.latency, 2);
    assert_eq!(l.replies, 2, "{l:?}");
    assert!(l.max_ns >= held.as_nanos() as u64, "{l:?}");
    assert_eq!(l.max_command.as_deref(), Some("REGION_READ"));
}
