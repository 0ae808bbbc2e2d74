//! Test support shared by the server's socket-level tests (`connection.rs`, `security.rs`,
//! `evloop.rs`): a tiny device served by [`Server`] on a thread in a fresh directory, a capture
//! of the server's warnings, and raw vfio-user frames (header, VERSION, REGION_READ) sent over a
//! `UnixStream`.
//!
//! Each test file includes it with `mod support;`; not every file uses every item.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pcisim_vfio_user::proto::{self, Command, Header, HEADER_SIZE};
use pcisim_vfio_user::{
    ClientLink, Device, DeviceError, IrqInfo, RegionFlags, RegionInfo, Server, ServerOptions,
};

/// A device with region 0 of `region0` bytes and region 7 a 256-byte config space; a read
/// returns the low byte of each offset; it counts attaches; its reset takes `reset_delay`
/// (a reset waiting for in-flight DMA to drain).
pub struct Tiny {
    pub region0: u64,
    pub attaches: Arc<AtomicU32>,
    pub reset_delay: Duration,
}

impl Device for Tiny {
    fn device_flags(&self) -> u32 {
        proto::DEVICE_FLAGS_PCI
    }
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        (index < 9).then(|| RegionInfo {
            size: match index {
                0 => self.region0,
                7 => 256,
                _ => 0,
            },
            flags: RegionFlags {
                read: true,
                write: true,
                mmap: false,
            },
            mmap: None,
        })
    }
    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        (index < 5).then(IrqInfo::default)
    }
    fn region_read(&mut self, _: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (offset as usize + i) as u8;
        }
        Ok(())
    }
    fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> Result<(), DeviceError> {
        Ok(())
    }
    fn attach(&mut self, _: ClientLink) {
        self.attaches.fetch_add(1, Ordering::SeqCst);
    }
    fn detach(&mut self) {}
    fn reset(&mut self) -> Result<(), DeviceError> {
        std::thread::sleep(self.reset_delay);
        Ok(())
    }
}

// ---- captured log ----------------------------------------------------------------------------

static LOGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            LOGS.lock()
                .unwrap()
                .push(format!("{} {}", r.level(), r.args()));
        }
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

/// Captures warnings and errors of every logger user in this test process. Several tests call
/// it; only the first installs the logger.
pub fn capture_logs() {
    if log::set_logger(&CAPTURE).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

/// The captured warnings of the server named `name` (`ServerOptions::name`).
pub fn warnings_of(name: &str) -> Vec<String> {
    LOGS.lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with(&format!("WARN {name}:")))
        .cloned()
        .collect()
}

// ---- a served device ---------------------------------------------------------------------------

/// A [`Tiny`] served on a thread at `path`; the directory goes when this is dropped.
pub struct Served {
    /// The device socket.
    pub path: PathBuf,
    /// How many clients the device has been attached to.
    pub attaches: Arc<AtomicU32>,
    _dir: vmm_sys_util::tempdir::TempDir,
}

/// Serves a [`Tiny`] with a `region0`-byte region 0 at `dev.sock` in a fresh directory under
/// `/tmp/<prefix>…` of mode `dir_mode` (0o755: any user may reach the socket).
pub fn serve_tiny(
    prefix: &str,
    dir_mode: Option<u32>,
    region0: u64,
    opts: ServerOptions,
) -> Served {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix(format!("/tmp/{prefix}")).unwrap();
    if let Some(mode) = dir_mode {
        std::fs::set_permissions(dir.as_path(), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let path = dir.as_path().join("dev.sock");
    let attaches = Arc::new(AtomicU32::new(0));
    let dev = Tiny {
        region0,
        attaches: attaches.clone(),
        reset_delay: Duration::ZERO,
    };
    let server = Server::bind(&path, Arc::new(Mutex::new(dev)), opts).unwrap();
    std::thread::spawn(move || server.run());
    Served {
        path,
        attaches,
        _dir: dir,
    }
}

// ---- frames ------------------------------------------------------------------------------------

/// A frame: header (`id`, `cmd`, no flags) and payload.
pub fn frame(id: u16, cmd: u16, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        id,
        command: cmd,
        size: (HEADER_SIZE + payload.len()) as u32,
        flags: 0,
        error: 0,
    };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(payload);
    v
}

/// A VERSION payload: version 0.0 and the JSON capabilities `caps`.
pub fn version_payload(caps: &str) -> Vec<u8> {
    let mut p = proto::Writer::new();
    p.u16(0).u16(0).bytes(caps.as_bytes()).bytes(&[0]);
    p.finish()
}

/// A REGION_READ payload.
pub fn read_payload(region: u32, offset: u64, count: u32) -> Vec<u8> {
    let mut p = proto::Writer::new();
    p.u64(offset).u32(region).u32(count);
    p.finish()
}

/// A connection to `path` whose reads time out after `read_timeout`.
pub fn connect(path: &Path, read_timeout: Duration) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(read_timeout)).unwrap();
    s
}

/// One whole reply: its header and body.
pub fn recv(s: &mut UnixStream) -> (Header, Vec<u8>) {
    let mut hb = [0u8; HEADER_SIZE];
    s.read_exact(&mut hb).unwrap();
    let h = Header::parse(&hb);
    let mut body = vec![0u8; h.size as usize - HEADER_SIZE];
    s.read_exact(&mut body).unwrap();
    (h, body)
}

/// Sends one command and returns the reply's errno (0: success).
pub fn call(s: &mut UnixStream, cmd: Command, payload: &[u8]) -> u32 {
    s.write_all(&frame(1, cmd as u16, payload)).unwrap();
    let (h, _) = recv(s);
    if h.flags & proto::FLAG_ERROR != 0 {
        h.error
    } else {
        0
    }
}

/// VERSION with the capabilities `caps`; the reply's errno (0: success).
pub fn negotiate(s: &mut UnixStream, caps: &str) -> u32 {
    call(s, Command::Version, &version_payload(caps))
}
