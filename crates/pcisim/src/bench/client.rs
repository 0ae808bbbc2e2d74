//! The client side of the round-trip figures: vfio-user request frames, a minimal blocking
//! [`Client`] of a real server, a GPU server started on a thread of this process, and the raw
//! AF_UNIX echo that is the floor of a round trip.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use pcisim_vfio_user::proto::{self, Command, Header, HEADER_SIZE};

use super::placement::spawn_on;

pub(super) fn frame(command: Command, flags: u32, id: u16, body: &[u8]) -> Vec<u8> {
    let h = Header {
        id,
        command: command as u16,
        size: (HEADER_SIZE + body.len()) as u32,
        flags,
        error: 0,
    };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(body);
    v
}

pub(super) fn read_request(offset: u64, id: u16) -> Vec<u8> {
    let mut p = proto::Writer::new();
    p.u64(offset).u32(0).u32(4);
    frame(Command::RegionRead, 0, id, &p.finish())
}

pub(super) fn write_request(offset: u64, value: u32, flags: u32, id: u16) -> Vec<u8> {
    let mut p = proto::Writer::new();
    p.u64(offset).u32(0).u32(4).u32(value);
    frame(Command::RegionWrite, flags, id, &p.finish())
}

/// REGION_WRITE_MULTI of 4-byte writes `(offset, value)` to BAR0.
pub(super) fn multi_request(writes: &[(u64, u32)], id: u16) -> Vec<u8> {
    let mut p = proto::Writer::new();
    p.u64(writes.len() as u64);
    for &(offset, value) in writes {
        p.u64(offset).u32(0).u32(4).u32(value).u32(0);
    }
    frame(Command::RegionWriteMulti, 0, id, &p.finish())
}

/// A client connection that has done VERSION.
pub(super) struct Client {
    pub(super) s: UnixStream,
}

impl Client {
    pub(super) fn connect(sock: &Path) -> Result<Client> {
        let mut s = UnixStream::connect(sock).context("connecting to the bench server")?;
        let mut p = proto::Writer::new();
        p.u16(0).u16(0).bytes(b"{}").bytes(&[0]);
        s.write_all(&frame(Command::Version, 0, 0, &p.finish()))?;
        let mut c = Client { s };
        c.reply()?;
        Ok(c)
    }

    /// Read one reply; an error reply is an error.
    pub(super) fn reply(&mut self) -> Result<Vec<u8>> {
        let mut hb = [0u8; HEADER_SIZE];
        self.s.read_exact(&mut hb)?;
        let h = Header::parse(&hb);
        let mut body = vec![0u8; (h.size as usize).saturating_sub(HEADER_SIZE)];
        self.s.read_exact(&mut body)?;
        if h.flags & proto::FLAG_ERROR != 0 {
            bail!("command {} refused: errno {}", h.command, h.error);
        }
        Ok(body)
    }

    /// Command.Memory Space on (config region, offset 4), as a driver does before touching
    /// BAR0: without it the function drops BAR writes and reads all-ones.
    pub(super) fn memory_space_on(&mut self) -> Result<()> {
        let mut p = proto::Writer::new();
        p.u64(4).u32(7).u32(2).u16(0x0002);
        self.s
            .write_all(&frame(Command::RegionWrite, 0, 9, &p.finish()))?;
        self.reply()?;
        Ok(())
    }

    pub(super) fn read32(&mut self, offset: u64) -> Result<u32> {
        self.s.write_all(&read_request(offset, 1))?;
        let b = self.reply()?;
        let v = b
            .get(16..20)
            .ok_or_else(|| anyhow!("short REGION_READ reply"))?;
        Ok(u32::from_le_bytes([v[0], v[1], v[2], v[3]]))
    }
}

/// A GPU served by a real server on a thread of this process, on `cpu` if given.
pub(super) fn start_server(dir: &Path, name: &str, cpu: Option<usize>) -> Result<PathBuf> {
    let sock = dir.join(format!("{name}.sock"));
    let spec = crate::spec::parse(&format!("gpu:socket={},vram=16M", sock.display()), 0)?;
    let built = crate::devices::build(&spec)?;
    let server = pcisim_vfio_user::Server::bind(
        &sock,
        built.device,
        pcisim_vfio_user::ServerOptions {
            name: "bench".into(),
            ..Default::default()
        },
    )?;
    spawn_on(cpu, move || {
        let _ = server.run();
    })?;
    Ok(sock)
}

// ---- round trips -----------------------------------------------------------------------------

/// The floor's echo thread (on `cpu` if given): answers every `req_len`-byte message with
/// `reply_len` bytes.
pub(super) fn echo_pair(
    cpu: Option<usize>,
    req_len: usize,
    reply_len: usize,
) -> Result<UnixStream> {
    let (a, mut b) = UnixStream::pair()?;
    spawn_on(cpu, move || {
        let mut req = vec![0u8; req_len];
        let reply = vec![0u8; reply_len];
        while b.read_exact(&mut req).is_ok() {
            if b.write_all(&reply).is_err() {
                break;
            }
        }
    })?;
    Ok(a)
}

/// Send `req`, read a `reply.len()`-byte reply; nanoseconds.
pub(super) fn round_trip(s: &mut UnixStream, req: &[u8], reply: &mut [u8]) -> Result<f64> {
    let t = Instant::now();
    s.write_all(req)?;
    s.read_exact(reply)?;
    Ok(t.elapsed().as_nanos() as f64)
}
