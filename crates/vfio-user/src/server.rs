//! The server side of one device socket: accept a client, read frames, dispatch them to the
//! [`Device`], reply, and clean up when the client goes away — then accept the next client.
//!
//! Framing is strictly "frame first": a frame is decoded only once it is complete (header, the
//! whole payload and its fds), so a malformed payload never desynchronises the stream: it gets an
//! error reply and the next frame starts where the header said this one ends. Only a `size`
//! smaller than the header itself cannot be skipped; the connection is then closed. Frames are
//! read through a buffer ([`crate::reader`]): one `recvmsg` per request in the common case.
//!
//! Deadlines: a client must complete VERSION within [`ServerOptions::handshake_timeout`] and a
//! frame that has started to arrive must complete within [`ServerOptions::frame_timeout`];
//! otherwise the connection is closed and the device freed for the next client. A negotiated
//! client that simply sends nothing is legitimate (QEMU idles) and is never timed out.
//!
//! Log volume: `warn!` lines about one client's bad input are rate-limited per connection
//! ([`LogLimiter`]): a burst, then about one a second, each saying how many were suppressed.
//!
//! Access control: the socket file is created with mode [`ServerOptions::socket_mode`] (0600 by
//! default), and every connection's peer uid (SO_PEERCRED) must be the server's own effective
//! uid or one of [`ServerOptions::allowed_uids`]; other peers are closed at once (see
//! docs/security.md).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::device::{irq_index, ClientLink, Device};
use crate::dma::DmaSpace;
use crate::irq::Interrupts;
use crate::proto::{self, Limits, Request, Writer, HEADER_SIZE};
use crate::reader::{Deadlines, Event, FdLoss, Frame, FrameReader, ReadError};
use crate::sys;

pub use crate::sys::PeerCred;

/// Default permission bits of a device socket: only the owner may connect.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Reply buffers larger than this are not kept for the next request (a 1 MiB read reply would
/// otherwise stay allocated for the connection's lifetime).
const KEEP_REPLY_BUF: usize = 64 * 1024;

/// The page size we advertise (`pgsizes`): DMA ranges are aligned to it.
const PAGE_SIZE: u64 = 4096;

/// The smallest `max_data_xfer_size` a client may announce at VERSION: below one page a client
/// could not even read a config space in a handful of messages, and a tiny value (1, or 0)
/// is a broken or hostile client, not a constrained one.
pub const MIN_DATA_XFER_SIZE: u64 = 4096;

/// Default [`ServerOptions::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default [`ServerOptions::frame_timeout`] (QEMU's own `x-msg-timeout` is 5 s too).
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(5);

/// Tunables of a device server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Device name used in log messages.
    pub name: String,
    /// Largest REGION_READ/WRITE data transfer we accept (advertised as `max_data_xfer_size`).
    pub max_data_xfer_size: usize,
    /// Most fds we accept in one message (advertised as `max_msg_fds`).
    pub max_msg_fds: usize,
    /// Permission bits of the socket file ([`DEFAULT_SOCKET_MODE`], 0600, unless configured).
    pub socket_mode: u32,
    /// Users, besides the server's own effective uid, whose clients are served. A client of any
    /// other uid is refused at accept (closed, logged at `warn!`).
    pub allowed_uids: Vec<u32>,
    /// How long a client may take from connecting to a completed VERSION; then the connection
    /// is closed and the device serves the next client. `None`: no deadline.
    pub handshake_timeout: Option<Duration>,
    /// How long a frame may take to arrive once its first byte has (a stalled or trickled
    /// frame); then the connection is closed. An idle client *between* frames has no deadline.
    /// `None`: no deadline.
    pub frame_timeout: Option<Duration>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            name: "dev".into(),
            max_data_xfer_size: 1 << 20,
            max_msg_fds: 16,
            socket_mode: DEFAULT_SOCKET_MODE,
            allowed_uids: Vec::new(),
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
            frame_timeout: Some(DEFAULT_FRAME_TIMEOUT),
        }
    }
}

impl ServerOptions {
    /// Largest frame we read: the largest REGION_WRITE (header + 16 + data) or SET_IRQS with one
    /// bool per vector, whichever is larger; anything bigger is discarded with E2BIG.
    pub fn max_msg_size(&self) -> usize {
        HEADER_SIZE + 16 + self.max_data_xfer_size.max(64 * 1024)
    }
}

/// Errors setting up a server socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket's directory does not exist.
    #[error("Socket directory {0} does not exist")]
    NoDirectory(PathBuf),
    /// Another server is listening on the path.
    #[error("Socket {0} is in use by a live server")]
    InUse(PathBuf),
    /// Something that is not a socket exists at the path.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Binding or removing the socket failed.
    #[error("Cannot bind {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// How a connection ended.
#[derive(Debug)]
pub enum ConnectionEnd {
    /// The client closed the socket.
    Eof,
    /// A frame was too broken to skip (size < header), so the connection was closed.
    ProtocolError(String),
    /// A socket error.
    Io(io::Error),
    /// The client missed a deadline (handshake or a started frame): the connection was closed.
    TimedOut(String),
}

/// Bounds the `warn!` lines one source of bad input can write: a burst of [`LogLimiter::BURST`]
/// lines, then one more per second; what is held back is counted and reported with the next
/// line that passes (and by [`LogLimiter::take_suppressed`] at the end). 96k bad frames used
/// to write 13.9 MB of log; now a flood costs about one line a second.
#[derive(Debug)]
pub struct LogLimiter {
    tokens: u32,
    refilled: Instant,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter {
            tokens: Self::BURST,
            refilled: Instant::now(),
            suppressed: 0,
        }
    }
}

impl LogLimiter {
    /// Lines allowed at once before the rate limit applies.
    pub const BURST: u32 = 20;

    /// Whether the next line may be written. `Some(n)`: write it, and say that `n` lines were
    /// suppressed since the last one written; `None`: suppress it (it is counted).
    pub fn admit(&mut self) -> Option<u64> {
        let secs = self.refilled.elapsed().as_secs();
        if secs > 0 {
            self.tokens = self
                .tokens
                .saturating_add(u32::try_from(secs).unwrap_or(u32::MAX))
                .min(Self::BURST);
            self.refilled += Duration::from_secs(secs);
        }
        if self.tokens == 0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.suppressed))
    }

    /// Lines suppressed and not reported yet; resets the count.
    pub fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

/// ` [N similar messages suppressed]`, or nothing.
fn suppressed_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" [{n} similar messages suppressed]")
    }
}

/// One device served on one socket.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    file: SocketFile,
    device: Arc<Mutex<dyn Device>>,
    opts: ServerOptions,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("path", &self.path)
            .field("opts", &self.opts)
            .finish()
    }
}

fn lock<'a>(d: &'a Mutex<dyn Device + 'static>) -> MutexGuard<'a, dyn Device + 'static> {
    // Device state stays usable after a panic elsewhere; there is no invariant a half-finished
    // region access could break that a reset would not repair.
    d.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Create the listening socket at `path` with mode [`DEFAULT_SOCKET_MODE`] (0600), refusing to
/// steal a live server's socket and removing a stale one.
pub fn bind_socket(path: &Path) -> Result<UnixListener, ServerError> {
    bind_socket_with_mode(path, DEFAULT_SOCKET_MODE)
}

/// Create the listening socket at `path` whose file has exactly the permission bits `mode`
/// (never more permissive, not even between `bind` and `chmod`), refusing to steal a live
/// server's socket and removing a stale one.
pub fn bind_socket_with_mode(path: &Path, mode: u32) -> Result<UnixListener, ServerError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(ServerError::NoDirectory(dir.to_path_buf()));
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.to_path_buf()));
        }
        log::info!("removing stale socket {}", path.display());
        std::fs::remove_file(path).map_err(|source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    }
    sys::listen_unix(path, mode & 0o777).map_err(|source| ServerError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

/// The socket file a server bound, identified by the device and inode it had right after
/// `bind`, so that shutdown removes only what is still that socket: not a regular file someone
/// put at the path since, nor the live socket of a second server that took the path over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

/// What [`SocketFile::remove_if_ours`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The path still held our socket: it was unlinked.
    Removed,
    /// Nothing is at the path any more.
    Gone,
    /// Something else is at the path now (another file, another server's socket): left alone.
    NotOurs,
}

impl SocketFile {
    /// Record the identity of the socket file at `path` (call right after binding it).
    pub fn record(path: &Path) -> io::Result<SocketFile> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unlink the path if it still is the socket we bound (same st_dev and st_ino); leave
    /// anything else where it is. Logged at `info!` (removed) or `warn!` (not ours).
    pub fn remove_if_ours(&self) -> Removal {
        use std::os::unix::fs::MetadataExt;
        let m = match std::fs::symlink_metadata(&self.path) {
            Ok(m) => m,
            Err(_) => return Removal::Gone,
        };
        if !m.file_type().is_socket() || m.dev() != self.dev || m.ino() != self.ino {
            log::warn!(
                "{} is no longer the socket this server bound (now dev {} inode {}, a {}); \
                 left in place",
                self.path.display(),
                m.dev(),
                m.ino(),
                if m.file_type().is_socket() {
                    "socket"
                } else {
                    "non-socket file"
                }
            );
            return Removal::NotOurs;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => {
                log::info!("removed socket {}", self.path.display());
                Removal::Removed
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Removal::Gone,
            Err(e) => {
                log::warn!("cannot remove {}: {e}", self.path.display());
                Removal::NotOurs
            }
        }
    }
}

/// The credentials of the process at the other end of `stream` (SO_PEERCRED: recorded by the
/// kernel when the peer connected).
pub fn peer_credentials(stream: &UnixStream) -> io::Result<PeerCred> {
    sys::peer_cred(stream)
}

/// Whether the peer of a freshly accepted `stream` may talk to us: its uid is the server's
/// effective uid or one of `allowed`. A refused peer (or one whose credentials cannot be read)
/// is logged at `warn!` with its pid and uid, prefixed by `what`; the caller closes the stream
/// and keeps serving.
pub fn admit_peer(stream: &UnixStream, allowed: &[u32], what: &str) -> bool {
    let me = sys::euid();
    match sys::peer_cred(stream) {
        Ok(c) if c.uid == me || allowed.contains(&c.uid) => {
            log::debug!("{what}: peer pid {} uid {} admitted", c.pid, c.uid);
            true
        }
        Ok(c) => {
            log::warn!(
                "{what}: refused a client: pid {} uid {} gid {} (server uid {me}; allow with \
                 --allow-uid {})",
                c.pid,
                c.uid,
                c.gid,
                c.uid
            );
            false
        }
        Err(e) => {
            log::warn!("{what}: refused a client whose credentials cannot be read: {e}");
            false
        }
    }
}

impl Server {
    /// Bind `path` for `device`.
    pub fn bind(
        path: &Path,
        device: Arc<Mutex<dyn Device>>,
        opts: ServerOptions,
    ) -> Result<Server, ServerError> {
        let listener = bind_socket_with_mode(path, opts.socket_mode)?;
        let file = SocketFile::record(path).map_err(|source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Server {
            listener,
            path: path.to_path_buf(),
            file,
            device,
            opts,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The socket file as bound (for removing it at shutdown only if it is still ours).
    pub fn socket_file(&self) -> &SocketFile {
        &self.file
    }

    /// Serve clients one after another, forever. Transient accept failures (out of fds, an
    /// aborted connection, a signal) are logged and retried; only a listener that is no longer
    /// usable ends the loop.
    pub fn run(&self) -> io::Result<()> {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => {
                    if !admit_peer(&stream, &self.opts.allowed_uids, &self.opts.name) {
                        continue;
                    }
                    stream
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP) => {
                        return Err(e)
                    }
                    _ => {
                        log::warn!("{}: accept failed, retrying: {e}", self.opts.name);
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        continue;
                    }
                },
            };
            let end = self.serve_connection(stream);
            log::info!("{}: client disconnected ({end:?})", self.opts.name);
        }
    }

    /// Serve one client until it goes away, then release everything it gave us.
    pub fn serve_connection(&self, stream: UnixStream) -> ConnectionEnd {
        log::info!(
            "{}: client connected on {}",
            self.opts.name,
            self.path.display()
        );
        // What the device looks like does not change while it exists (the `Device` contract):
        // read it once per client, not on every access.
        let (counts, region_sizes): (Vec<u32>, Vec<u64>) = {
            let dev = lock(&self.device);
            (
                (0..irq_index::COUNT)
                    .map(|i| dev.irq_info(i).map_or(0, |info| info.count))
                    .collect(),
                (0..)
                    .map_while(|i| dev.region_info(i).map(|info| info.size))
                    .collect(),
            )
        };
        let mut conn = Connection {
            stream,
            device: &self.device,
            opts: &self.opts,
            dma: DmaSpace::new(),
            irqs: Interrupts::new(&counts),
            negotiated: false,
            client_max_xfer: self.opts.max_data_xfer_size,
            region_sizes,
            out: Vec::new(),
            warns: LogLimiter::default(),
        };
        let end = conn.run();
        let suppressed = conn.warns.take_suppressed();
        if suppressed > 0 {
            log::warn!(
                "{}: {suppressed} more messages about this client's bad input were suppressed",
                self.opts.name
            );
        }
        // Order matters: the device stops using the client's memory and eventfds first. A
        // connection that never negotiated (e.g. another server probing whether this socket is
        // live) never attached and leaves the device untouched.
        if conn.negotiated {
            lock(&self.device).detach();
        }
        let n = conn.dma.unmap_all().len();
        conn.irqs.clear();
        log::info!(
            "{}: released {n} DMA mappings and all interrupt eventfds",
            self.opts.name
        );
        end
    }
}

/// Why a request failed: the errno of the error reply plus a message for the log.
struct Failure {
    errno: i32,
    msg: String,
}

impl Failure {
    fn new(errno: i32, msg: impl Into<String>) -> Self {
        Failure {
            errno,
            msg: msg.into(),
        }
    }
}

impl From<proto::ProtoError> for Failure {
    fn from(e: proto::ProtoError) -> Self {
        Failure::new(e.errno(), e.to_string())
    }
}
impl From<crate::device::DeviceError> for Failure {
    fn from(e: crate::device::DeviceError) -> Self {
        Failure::new(e.errno(), e.to_string())
    }
}
impl From<crate::dma::DmaError> for Failure {
    fn from(e: crate::dma::DmaError) -> Self {
        Failure::new(e.errno(), e.to_string())
    }
}
impl From<crate::irq::IrqError> for Failure {
    fn from(e: crate::irq::IrqError) -> Self {
        Failure::new(e.errno(), e.to_string())
    }
}

/// Fds a reply carries (only DEVICE_GET_REGION_INFO of an mmap-able region has one).
type ReplyFds = Vec<Arc<OwnedFd>>;

struct Connection<'a> {
    stream: UnixStream,
    device: &'a Mutex<dyn Device + 'static>,
    opts: &'a ServerOptions,
    dma: DmaSpace,
    irqs: Interrupts,
    negotiated: bool,
    /// The client's `max_data_xfer_size`: bounds the data we return in one reply.
    client_max_xfer: usize,
    /// Size of each region, by index (read once per client; accesses are checked against it).
    region_sizes: Vec<u64>,
    /// The reply buffer, reused from one request to the next.
    out: Vec<u8>,
    /// Rate limit of this client's `warn!` lines.
    warns: LogLimiter,
}

impl Connection<'_> {
    fn run(&mut self) -> ConnectionEnd {
        let mut reader = FrameReader::new(self.opts.max_msg_size(), self.opts.max_msg_fds);
        reader.deadlines = Deadlines {
            handshake: self.opts.handshake_timeout.map(|t| Instant::now() + t),
            frame: self.opts.frame_timeout,
        };
        loop {
            if self.negotiated {
                reader.deadlines.handshake = None;
            }
            let frame = match reader.next(&self.stream) {
                Ok(Event::Frame(f)) => f,
                Ok(Event::Eof) => return ConnectionEnd::Eof,
                Ok(Event::Oversize(h)) => {
                    if let Some(n) = self.warns.admit() {
                        log::warn!(
                            "{}: message {} ({} bytes) exceeds {} bytes; discarded{}",
                            self.opts.name,
                            h.id,
                            h.size,
                            self.opts.max_msg_size(),
                            suppressed_note(n)
                        );
                    }
                    // Answered before the payload is drained: a client that lied about the size
                    // learns at once instead of waiting for bytes it will never send.
                    if !h.no_reply() {
                        if let Err(e) = self.send(&proto::error_frame(&h, libc::E2BIG), &[]) {
                            return ConnectionEnd::Io(e);
                        }
                    }
                    continue;
                }
                Err(ReadError::Io(e)) => return ConnectionEnd::Io(e),
                Err(ReadError::TimedOut(why)) => {
                    log::warn!(
                        "{}: closing the connection: {why}; the device is free for the next \
                         client",
                        self.opts.name
                    );
                    return ConnectionEnd::TimedOut(why);
                }
                Err(ReadError::Desync(h, why)) => {
                    // Reply so the client learns why, then close: we cannot find the next frame.
                    let _ = self.send(&proto::error_frame(&h, libc::EINVAL), &[]);
                    return ConnectionEnd::ProtocolError(why);
                }
            };
            if let Err(e) = self.handle(frame) {
                return ConnectionEnd::Io(e);
            }
        }
    }

    fn send(&self, frame: &[u8], fds: &[Arc<OwnedFd>]) -> io::Result<()> {
        if fds.is_empty() {
            return sys::send_with_fds(&self.stream, frame, &[]);
        }
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        sys::send_with_fds(&self.stream, frame, &borrowed)
    }

    fn handle(&mut self, frame: Frame<'_>) -> io::Result<()> {
        let header = frame.header;
        log::debug!(
            "{}: <- id={} cmd={} size={} flags={:#x} fds={}",
            self.opts.name,
            header.id,
            header.command,
            header.size,
            header.flags,
            frame.fds.len()
        );
        // The reply is built in place after room for its header: one buffer, one sendmsg.
        let mut w = Writer::with_buffer(std::mem::take(&mut self.out));
        w.bytes(&[0u8; HEADER_SIZE]);
        let result = self.dispatch(frame, &mut w);
        let mut out = w.finish();
        let sent = if header.no_reply() {
            // Never reply to NO_REPLY, not even with an error: the client is not waiting, and a
            // stray reply would be matched against a later request.
            if let Err(f) = result {
                if let Some(n) = self.warns.admit() {
                    log::warn!(
                        "{}: posted {}: {} (errno {}){}",
                        self.opts.name,
                        header.command,
                        f.msg,
                        f.errno,
                        suppressed_note(n)
                    );
                }
            }
            Ok(())
        } else {
            match result {
                Ok(fds) => {
                    let h = proto::reply_header(&header, out.len() - HEADER_SIZE);
                    if let Some(dst) = out.get_mut(..HEADER_SIZE) {
                        dst.copy_from_slice(&h.encode());
                    }
                    self.send(&out, &fds)
                }
                Err(f) => {
                    if let Some(n) = self.warns.admit() {
                        log::warn!(
                            "{}: command {} (id {}) failed: {} (errno {}){}",
                            self.opts.name,
                            header.command,
                            header.id,
                            f.msg,
                            f.errno,
                            suppressed_note(n)
                        );
                    }
                    self.send(&proto::error_frame(&header, f.errno), &[])
                }
            }
        };
        if out.capacity() <= KEEP_REPLY_BUF {
            self.out = out;
        }
        sent
    }

    fn limits(&self) -> Limits {
        Limits {
            max_data_xfer_size: self.opts.max_data_xfer_size,
        }
    }

    /// Execute one request; its reply payload is appended to `w`, and the fds it carries are
    /// returned.
    fn dispatch(&mut self, frame: Frame<'_>, w: &mut Writer) -> Result<ReplyFds, Failure> {
        let Frame {
            header,
            payload,
            mut fds,
            fds_truncated,
        } = frame;
        // Whatever fds did arrive are dropped (closed) with `fds` on every error path.
        match fds_truncated {
            None => {}
            Some(FdLoss::TableFull) => {
                return Err(Failure::new(
                    libc::EMFILE,
                    "fd table full (RLIMIT_NOFILE): control data truncated (MSG_CTRUNC), the \
                     fds sent with this message did not all arrive; those that did were closed",
                ))
            }
            Some(FdLoss::TooMany) => {
                return Err(Failure::new(
                    libc::EINVAL,
                    format!(
                        "control data truncated (MSG_CTRUNC): more than {} fds in one message; \
                         those that arrived were closed",
                        self.opts.max_msg_fds
                    ),
                ))
            }
            Some(FdLoss::Trickled) => {
                return Err(Failure::new(
                    libc::EINVAL,
                    format!(
                        "fds trickled with an incomplete frame beyond {} held; they were closed",
                        2 * self.opts.max_msg_fds
                    ),
                ))
            }
        }
        let req = proto::decode(&header, payload, &self.limits())?;
        if !self.negotiated && !matches!(req, Request::Version { .. }) {
            return Err(Failure::new(
                libc::EINVAL,
                "VERSION must be negotiated first",
            ));
        }
        // Commands that carry no fds must not come with any (they would be closed silently).
        let fd_ok = match &req {
            Request::DmaMap { .. } => fds.len() <= 1,
            Request::SetIrqs { flags, .. } => {
                fds.is_empty() || flags & proto::IRQ_SET_DATA_EVENTFD != 0
            }
            _ => fds.is_empty(),
        };
        if !fd_ok {
            return Err(Failure::new(
                libc::EINVAL,
                format!("unexpected {} fds", fds.len()),
            ));
        }
        match req {
            Request::Version { major, minor, caps } => self.version(major, minor, &caps, w),
            Request::DmaMap {
                flags,
                offset,
                iova,
                size,
            } => {
                let fd = fds.pop().map(|f| (f, offset));
                let backed = fd.is_some();
                self.dma.map(iova, size, flags, fd)?;
                lock(self.device).dma_mapped(&crate::dma::MappingInfo {
                    iova,
                    size,
                    prot: flags,
                    backed,
                });
                log::debug!(
                    "{}: DMA map {iova:#x}+{size:#x} prot={flags} fd={backed}",
                    self.opts.name
                );
                Ok(Vec::new())
            }
            Request::DmaUnmap {
                argsz,
                flags,
                iova,
                size,
            } => {
                let removed = if flags & proto::DMA_UNMAP_FLAG_ALL != 0 {
                    self.dma.unmap_all()
                } else {
                    // As the kernel (vfio_dma_do_unmap): a page-aligned, non-empty range.
                    if size == 0 || iova % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 {
                        return Err(Failure::new(
                            libc::EINVAL,
                            format!("DMA unmap {iova:#x}+{size:#x} is empty or not page aligned"),
                        ));
                    }
                    self.dma.unmap(iova, size)?
                };
                lock(self.device).dma_unmapped(&removed);
                log::debug!(
                    "{}: DMA unmap {iova:#x}+{size:#x}: {} mappings",
                    self.opts.name,
                    removed.len()
                );
                w.u32(argsz.min(24)).u32(flags).u64(iova).u64(size);
                Ok(Vec::new())
            }
            Request::GetInfo { .. } => {
                let dev = lock(self.device);
                let nregions = (0..64)
                    .take_while(|&i| dev.region_info(i).is_some())
                    .count() as u32;
                let nirqs = (0..64).take_while(|&i| dev.irq_info(i).is_some()).count() as u32;
                w.u32(16).u32(dev.device_flags()).u32(nregions).u32(nirqs);
                Ok(Vec::new())
            }
            Request::GetRegionInfo { argsz, index } => self.region_info(argsz, index, w),
            Request::GetIrqInfo { index, .. } => {
                let info = lock(self.device).irq_info(index).ok_or_else(|| {
                    Failure::new(libc::EINVAL, format!("no interrupt index {index}"))
                })?;
                w.u32(16).u32(info.flags).u32(index).u32(info.count);
                Ok(Vec::new())
            }
            Request::SetIrqs {
                flags,
                index,
                start,
                count,
                bools,
            } => {
                self.set_irqs(flags, index, start, count, &bools, fds)?;
                lock(self.device).irqs_changed(index);
                Ok(Vec::new())
            }
            Request::RegionRead {
                offset,
                region,
                count,
            } => {
                if count as usize > self.client_max_xfer {
                    return Err(Failure::new(
                        libc::E2BIG,
                        "read larger than the client accepts",
                    ));
                }
                self.check_region(region, offset, count as usize)?;
                // The device reads straight into the reply.
                w.u64(offset).u32(region).u32(count);
                lock(self.device).region_read(region, offset, w.zeroed(count as usize))?;
                Ok(Vec::new())
            }
            Request::RegionWrite {
                offset,
                region,
                data,
            } => {
                self.check_region(region, offset, data.len())?;
                lock(self.device).region_write(region, offset, &data)?;
                w.u64(offset).u32(region).u32(data.len() as u32);
                Ok(Vec::new())
            }
            Request::RegionWriteMulti { writes } => {
                // Every entry is checked before any is applied: a bad entry fails the whole
                // message and leaves the device untouched.
                for wr in &writes {
                    self.check_region(wr.region, wr.offset, wr.data.len())?;
                }
                let mut done = 0u64;
                for wr in &writes {
                    lock(self.device).region_write(wr.region, wr.offset, &wr.data)?;
                    done += 1;
                }
                w.u64(done);
                Ok(Vec::new())
            }
            Request::DeviceReset => {
                log::info!("{}: DEVICE_RESET from client", self.opts.name);
                lock(self.device).reset()?;
                Ok(Vec::new())
            }
        }
    }

    fn version(
        &mut self,
        major: u16,
        minor: u16,
        caps: &serde_json::Value,
        w: &mut Writer,
    ) -> Result<ReplyFds, Failure> {
        if self.negotiated {
            // The spec has VERSION as the first message only; renegotiating limits under a
            // live session (a smaller max_data_xfer_size with replies in flight) is refused.
            return Err(Failure::new(
                libc::EINVAL,
                "VERSION already negotiated on this connection; nothing renegotiated",
            ));
        }
        if major != proto::VERSION_MAJOR {
            return Err(Failure::new(
                libc::ENOTSUP,
                format!("protocol major {major} unsupported"),
            ));
        }
        let c = &caps["capabilities"];
        let mut client_max_xfer = self.opts.max_data_xfer_size;
        match &c["max_data_xfer_size"] {
            serde_json::Value::Null => {}
            v => match v.as_u64() {
                Some(x) if x >= MIN_DATA_XFER_SIZE => {
                    client_max_xfer = usize::try_from(x)
                        .unwrap_or(usize::MAX)
                        .min(self.opts.max_data_xfer_size);
                }
                _ => {
                    return Err(Failure::new(
                        libc::EINVAL,
                        format!(
                            "client max_data_xfer_size {v} is not a number of at least \
                             {MIN_DATA_XFER_SIZE}"
                        ),
                    ))
                }
            },
        }
        if let Some(p) = c["pgsizes"].as_u64() {
            if p & 4096 == 0 {
                return Err(Failure::new(
                    libc::EINVAL,
                    format!("client page sizes {p:#x} exclude 4 KiB"),
                ));
            }
        }
        log::info!(
            "{}: client speaks {major}.{minor}, caps {caps}",
            self.opts.name
        );
        let ours = serde_json::json!({
            "capabilities": {
                "max_msg_fds": self.opts.max_msg_fds,
                "max_data_xfer_size": self.opts.max_data_xfer_size,
                "pgsizes": 4096,
                "max_dma_maps": crate::dma::advertised_max_dma_maps(c["max_dma_maps"].as_u64()),
                "write_multiple": true,
            }
        });
        w.u16(proto::VERSION_MAJOR)
            .u16(proto::VERSION_MINOR)
            .bytes(ours.to_string().as_bytes())
            .bytes(&[0]);
        self.client_max_xfer = client_max_xfer;
        self.negotiated = true;
        lock(self.device).attach(ClientLink {
            irqs: self.irqs.clone(),
            dma: self.dma.clone(),
        });
        Ok(Vec::new())
    }

    fn check_region(&self, index: u32, offset: u64, len: usize) -> Result<(), Failure> {
        let size = *usize::try_from(index)
            .ok()
            .and_then(|i| self.region_sizes.get(i))
            .ok_or_else(|| Failure::new(libc::EINVAL, format!("no region {index}")))?;
        let end = offset.checked_add(len as u64);
        if len == 0 || end.is_none_or(|e| e > size) {
            return Err(Failure::new(
                libc::EINVAL,
                format!("region {index} access {offset:#x}+{len} outside its {size:#x} bytes"),
            ));
        }
        Ok(())
    }

    fn region_info(&self, argsz: u32, index: u32, w: &mut Writer) -> Result<ReplyFds, Failure> {
        let info = lock(self.device)
            .region_info(index)
            .ok_or_else(|| Failure::new(libc::EINVAL, format!("no region {index}")))?;
        let mut flags = 0;
        if info.flags.read {
            flags |= proto::REGION_INFO_FLAG_READ;
        }
        if info.flags.write {
            flags |= proto::REGION_INFO_FLAG_WRITE;
        }
        // The sparse-mmap capability: header (id, version, next) + nr_areas, reserved + areas.
        let mut cap = Writer::new();
        let mut file_offset = 0;
        let mut fds = Vec::new();
        if let (true, Some(m)) = (info.flags.mmap, info.mmap.as_ref()) {
            flags |= proto::REGION_INFO_FLAG_MMAP | proto::REGION_INFO_FLAG_CAPS;
            cap.u16(proto::REGION_INFO_CAP_SPARSE_MMAP).u16(1).u32(0);
            cap.u32(m.areas.len() as u32).u32(0);
            for a in &m.areas {
                cap.u64(a.offset).u64(a.size);
            }
            file_offset = m.file_offset;
            fds.push(m.fd.clone());
        }
        let cap = cap.finish();
        let full = 32 + cap.len() as u32;
        // cap_offset must point inside the structure the client will read (QEMU checks it even
        // on the short reply that only tells it how much room to allocate).
        let cap_offset = if cap.is_empty() { 0 } else { 32 };
        w.u32(full)
            .u32(flags)
            .u32(index)
            .u32(cap_offset)
            .u64(info.size)
            .u64(file_offset);
        if argsz >= full {
            w.bytes(&cap);
        } else {
            // Short reply: the client retries with argsz = full; the fd comes with that reply.
            fds.clear();
        }
        Ok(fds)
    }

    fn set_irqs(
        &self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        bools: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(), Failure> {
        let info = lock(self.device)
            .irq_info(index)
            .ok_or_else(|| Failure::new(libc::EINVAL, format!("no interrupt index {index}")))?;
        let data = flags
            & (proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_DATA_BOOL | proto::IRQ_SET_DATA_EVENTFD);
        let action = flags
            & (proto::IRQ_SET_ACTION_MASK
                | proto::IRQ_SET_ACTION_UNMASK
                | proto::IRQ_SET_ACTION_TRIGGER);
        log::debug!(
            "{}: SET_IRQS index={index} start={start} count={count} flags={flags:#x} fds={}",
            self.opts.name,
            fds.len()
        );
        // Disable the whole index (VFIO: DATA_NONE | ACTION_TRIGGER with count 0).
        if data == proto::IRQ_SET_DATA_NONE
            && action == proto::IRQ_SET_ACTION_TRIGGER
            && count == 0
            && start == 0
        {
            self.irqs.disable(index)?;
            return Ok(());
        }
        if start.checked_add(count).is_none_or(|end| end > info.count) || count == 0 {
            // (count 0 is only the disable form above; like libvfio-user, with start 0.)
            return Err(Failure::new(
                libc::EINVAL,
                format!("vectors {start}+{count} outside 0..{}", info.count),
            ));
        }
        let maskable = info.flags & proto::IRQ_INFO_MASKABLE != 0;
        match (data, action) {
            (proto::IRQ_SET_DATA_EVENTFD, proto::IRQ_SET_ACTION_TRIGGER) => {
                let set: Vec<Option<OwnedFd>> = if fds.is_empty() {
                    // QEMU de-assigns a run of vectors by sending it without fds.
                    (0..count).map(|_| None).collect()
                } else if fds.len() == count as usize {
                    if let Some(bad) = fds.iter().position(|f| !sys::is_eventfd(f)) {
                        return Err(Failure::new(
                            libc::EINVAL,
                            format!("fd {bad} is not an eventfd"),
                        ));
                    }
                    fds.into_iter().map(Some).collect()
                } else {
                    return Err(Failure::new(
                        libc::EINVAL,
                        format!("{} fds for {count} vectors", fds.len()),
                    ));
                };
                self.irqs.set_triggers(index, start, set)?;
            }
            (proto::IRQ_SET_DATA_EVENTFD, proto::IRQ_SET_ACTION_UNMASK) => {
                if !maskable || count != 1 || fds.len() > 1 {
                    return Err(Failure::new(
                        libc::EINVAL,
                        "unmask eventfd needs a maskable index, one vector, at most one fd",
                    ));
                }
                let fd = fds.into_iter().next();
                if fd.as_ref().is_some_and(|f| !sys::is_eventfd(f)) {
                    return Err(Failure::new(libc::EINVAL, "unmask fd is not an eventfd"));
                }
                self.irqs.set_unmask_fd(index, fd)?;
            }
            (proto::IRQ_SET_DATA_EVENTFD, _) => {
                return Err(Failure::new(
                    libc::ENOTSUP,
                    "mask eventfds are not supported",
                ));
            }
            (_, proto::IRQ_SET_ACTION_TRIGGER) => {
                // Loopback trigger from the client.
                for v in 0..count {
                    if data == proto::IRQ_SET_DATA_BOOL
                        && bools.get(v as usize).copied().unwrap_or(0) == 0
                    {
                        continue;
                    }
                    self.irqs.signal(index, start + v)?;
                }
            }
            (_, act) => {
                if !maskable {
                    return Err(Failure::new(
                        libc::EINVAL,
                        format!("interrupt index {index} is not maskable"),
                    ));
                }
                let which: Option<Vec<bool>> = (data == proto::IRQ_SET_DATA_BOOL)
                    .then(|| bools.iter().map(|&b| b != 0).collect());
                self.irqs.set_masked(
                    index,
                    start,
                    count,
                    which.as_deref(),
                    act == proto::IRQ_SET_ACTION_MASK,
                )?;
            }
        }
        Ok(())
    }
}
