//! Connection rules: one VERSION per connection, a floor on the client's `max_data_xfer_size`,
//! deadlines on the handshake and on a started frame (an idle client has none), and a bounded
//! number of log lines however much bad input a client sends.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pcisim_vfio_user::proto::{self, Command, Header, HEADER_SIZE};
use pcisim_vfio_user::server::{LogLimiter, MIN_DATA_XFER_SIZE};
use pcisim_vfio_user::ServerOptions;

mod support;

use support::{
    call, capture_logs, frame, negotiate, read_payload, recv, serve_tiny, warnings_of, Served,
};

/// How long a test client waits for a reply.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A server (64 KiB region 0) whose warnings are captured.
fn serve(opts: ServerOptions) -> Served {
    capture_logs();
    serve_tiny("pcisim-conn", None, 65536, opts)
}

fn opts(name: &str, handshake_ms: u64, frame_ms: u64) -> ServerOptions {
    ServerOptions {
        name: name.into(),
        handshake_timeout: Some(Duration::from_millis(handshake_ms)),
        frame_timeout: Some(Duration::from_millis(frame_ms)),
        ..Default::default()
    }
}

fn connect(path: &Path) -> UnixStream {
    support::connect(path, READ_TIMEOUT)
}

/// Whether the server closed `s` (EOF) within `within`.
fn closed_within(s: &mut UnixStream, within: Duration) -> Option<Duration> {
    s.set_read_timeout(Some(within)).unwrap();
    let start = Instant::now();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None
            }
            Err(_) => return Some(start.elapsed()),
        }
    }
}

const EINVAL: u32 = libc::EINVAL as u32;
const E2BIG: u32 = libc::E2BIG as u32;
const MIB: &str = r#"{"capabilities":{"max_data_xfer_size":1048576}}"#;

// ---- VERSION rules -----------------------------------------------------------------------------

#[test]
fn test_second_version_is_einval_and_nothing_is_renegotiated() {
    let s = serve(opts("ver2", 5000, 5000));
    let mut c = connect(&s.path);
    assert_eq!(negotiate(&mut c, MIB), 0);
    // A second VERSION asking for 4 KiB transfers is refused ...
    assert_eq!(
        negotiate(&mut c, r#"{"capabilities":{"max_data_xfer_size":4096}}"#),
        EINVAL
    );
    assert_eq!(negotiate(&mut c, MIB), EINVAL, "even an identical one");
    // ... and changed nothing: an 8 KiB read still fits the first negotiation.
    assert_eq!(
        call(&mut c, Command::RegionRead, &read_payload(0, 0, 8192)),
        0
    );
    assert_eq!(s.attaches.load(Ordering::SeqCst), 1, "attached once");
}

#[test]
fn test_max_data_xfer_size_below_the_floor_is_refused_at_version() {
    assert_eq!(MIN_DATA_XFER_SIZE, 4096);
    let s = serve(opts("verfloor", 5000, 5000));
    let mut c = connect(&s.path);
    for bad in ["0", "1", "4095", "-1", "\"4096\"", "4096.5"] {
        let caps = format!(r#"{{"capabilities":{{"max_data_xfer_size":{bad}}}}}"#);
        assert_eq!(negotiate(&mut c, &caps), EINVAL, "max_data_xfer_size {bad}");
    }
    assert_eq!(
        s.attaches.load(Ordering::SeqCst),
        0,
        "a refused VERSION attaches nothing"
    );
    // The floor itself is fine, and then bounds our replies.
    assert_eq!(
        negotiate(&mut c, r#"{"capabilities":{"max_data_xfer_size":4096}}"#),
        0
    );
    assert_eq!(
        call(&mut c, Command::RegionRead, &read_payload(0, 0, 4096)),
        0
    );
    assert_eq!(
        call(&mut c, Command::RegionRead, &read_payload(0, 0, 4097)),
        E2BIG
    );
}

#[test]
fn test_first_version_with_major_1_is_enotsup() {
    let s = serve(opts("vermajor", 5000, 5000));
    let mut c = connect(&s.path);
    let mut p = proto::Writer::new();
    p.u16(1).u16(0).bytes(b"{}").bytes(&[0]);
    assert_eq!(
        call(&mut c, Command::Version, &p.finish()),
        libc::ENOTSUP as u32
    );
}

// ---- deadlines -----------------------------------------------------------------------------------

#[test]
fn test_client_that_never_sends_version_is_dropped_and_the_next_client_is_served() {
    let s = serve(opts("hs", 300, 5000));
    let start = Instant::now();
    let mut silent = connect(&s.path);
    // The next client queues behind the silent one (one client at a time per device).
    let mut next = connect(&s.path);
    assert_eq!(
        negotiate(&mut next, MIB),
        0,
        "served once the silent one is gone"
    );
    let served_after = start.elapsed();
    assert!(
        served_after >= Duration::from_millis(250) && served_after < Duration::from_secs(3),
        "served after {served_after:?}"
    );
    assert!(closed_within(&mut silent, Duration::from_secs(1)).is_some());
    assert!(warnings_of("hs")
        .iter()
        .any(|l| l.contains("handshake deadline")));
}

#[test]
fn test_client_that_sends_garbage_but_never_version_is_dropped_at_the_handshake_deadline() {
    // Refused requests (each answered EINVAL) do not extend the handshake.
    let s = serve(opts("hsspam", 300, 5000));
    let mut c = connect(&s.path);
    let start = Instant::now();
    let mut closed = false;
    while start.elapsed() < Duration::from_secs(3) {
        let f = frame(1, Command::RegionRead as u16, &read_payload(7, 0, 4));
        if c.write_all(&f).is_err() {
            closed = true;
            break;
        }
        let mut hb = [0u8; HEADER_SIZE];
        if c.read_exact(&mut hb).is_err() {
            closed = true;
            break;
        }
        assert_eq!(Header::parse(&hb).error, EINVAL, "before VERSION");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(closed, "closed within 3 s");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn test_client_that_stalls_mid_frame_is_dropped_and_the_next_client_is_served() {
    let s = serve(opts("stall", 5000, 300));
    let mut c = connect(&s.path);
    assert_eq!(negotiate(&mut c, MIB), 0);
    let f = frame(9, Command::RegionRead as u16, &read_payload(7, 0, 4));
    c.write_all(&f[..20]).unwrap(); // header and 4 of 16 payload bytes
    let closed = closed_within(&mut c, Duration::from_secs(3)).expect("closed");
    assert!(closed >= Duration::from_millis(250), "{closed:?}");
    let mut next = connect(&s.path);
    assert_eq!(negotiate(&mut next, MIB), 0);
    assert!(warnings_of("stall")
        .iter()
        .any(|l| l.contains("still incomplete")));
}

#[test]
fn test_client_that_trickles_a_frame_is_dropped_at_the_frame_deadline() {
    // One byte every 50 ms: every read makes progress, the frame never completes in time.
    let s = serve(opts("trickle", 5000, 300));
    let mut c = connect(&s.path);
    assert_eq!(negotiate(&mut c, MIB), 0);
    let f = frame(9, Command::RegionRead as u16, &read_payload(7, 0, 4));
    let start = Instant::now();
    let mut refused_at = None;
    for b in &f[..f.len() - 1] {
        if c.write_all(std::slice::from_ref(b)).is_err() {
            refused_at = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // 31 bytes take 1.5 s: the server must have hung up long before the last one.
    let ended = refused_at
        .or_else(|| closed_within(&mut c, Duration::from_secs(1)).map(|_| start.elapsed()))
        .expect("connection closed");
    assert!(ended < Duration::from_millis(1600), "{ended:?}");
    assert!(warnings_of("trickle")
        .iter()
        .any(|l| l.contains("still incomplete")));
}

#[test]
fn test_idle_negotiated_client_is_never_timed_out() {
    // QEMU idles between requests for as long as the guest leaves the device alone.
    let s = serve(opts("idle", 200, 200));
    let mut c = connect(&s.path);
    assert_eq!(negotiate(&mut c, MIB), 0);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(call(&mut c, Command::RegionRead, &read_payload(7, 0, 4)), 0);
    // And a frame that arrives whole after the idle time is served at once.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(call(&mut c, Command::RegionRead, &read_payload(7, 0, 4)), 0);
    assert!(warnings_of("idle").is_empty(), "{:?}", warnings_of("idle"));
}

// ---- log volume ----------------------------------------------------------------------------------

#[test]
fn test_ten_thousand_bad_frames_write_a_bounded_number_of_log_lines() {
    let name = "flood";
    let s = serve(opts(name, 5000, 5000));
    let mut c = connect(&s.path);
    assert_eq!(negotiate(&mut c, MIB), 0);
    let start = Instant::now();
    const N: usize = 10_000;
    // An unknown command, answered ENOSYS and logged at warn! every time before the limit.
    let bad = frame(3, 77, &[1, 2, 3, 4]);
    for _ in 0..N / 100 {
        let batch: Vec<u8> = bad.iter().copied().cycle().take(bad.len() * 100).collect();
        c.write_all(&batch).unwrap();
        for _ in 0..100 {
            let (h, _) = recv(&mut c);
            assert_eq!(h.error, libc::ENOSYS as u32);
        }
    }
    let elapsed = start.elapsed();
    drop(c);
    // The connection's end reports what was suppressed; wait for it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !warnings_of(name)
        .iter()
        .any(|l| l.contains("were suppressed"))
    {
        assert!(Instant::now() < deadline, "no final summary");
        std::thread::sleep(Duration::from_millis(10));
    }
    let lines = warnings_of(name);
    let failed: Vec<&String> = lines.iter().filter(|l| l.contains("failed")).collect();
    // The instrument works: the first BURST failures are logged in full.
    assert!(
        failed.len() >= LogLimiter::BURST as usize,
        "{}",
        failed.len()
    );
    let bound = LogLimiter::BURST as usize + elapsed.as_secs() as usize + 2;
    assert!(
        lines.len() <= bound,
        "{} lines for {N} bad frames in {elapsed:?} (bound {bound})",
        lines.len()
    );
    // Every bad frame is accounted for: logged, or counted in a suppressed note/summary.
    let count_in = |l: &str, before: &str| -> u64 {
        l.split(before)
            .next()
            .and_then(|head| head.rsplit(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let noted: u64 = failed
        .iter()
        .filter(|l| l.contains("similar messages suppressed"))
        .map(|l| count_in(l, " similar messages suppressed"))
        .sum();
    let summary: u64 = lines
        .iter()
        .filter(|l| l.contains("were suppressed"))
        .map(|l| count_in(l, " more messages"))
        .sum();
    assert_eq!(
        failed.len() as u64 + noted + summary,
        N as u64,
        "{lines:#?}"
    );
    eprintln!(
        "{N} bad frames in {elapsed:?}: {} log lines ({} suppressed)",
        lines.len(),
        noted + summary
    );
}
