//! The server side of one device socket: accept a client, read frames, dispatch them to the
//! [`Device`], reply, and clean up when the client goes away — then accept the next client.
//!
//! I/O runs on rust-vmm's `event-manager` ([`crate::evloop`]): the listener, the connection and
//! a timerfd for its deadlines are one subscriber of an epoll loop; [`Server::run`] runs that
//! loop on the calling thread (`pcisim serve` gives each device its own, see
//! docs/architecture.md). The request handlers are in [`crate::conn`].
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
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::device::Device;
use crate::latency::ReplyLatency;
use crate::proto::HEADER_SIZE;
use crate::sys;

pub use crate::sys::PeerCred;

/// Default permission bits of a device socket: only the owner may connect.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Reply buffers larger than this are not kept for the next request (a 1 MiB read reply would
/// otherwise stay allocated for the connection's lifetime).
pub(crate) const KEEP_REPLY_BUF: usize = 64 * 1024;

/// The page size we advertise (`pgsizes`): DMA ranges are aligned to it.
pub(crate) const PAGE_SIZE: u64 = 4096;

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
    /// Where the device's reply latencies are aggregated ([`crate::latency`]). Shared: every
    /// clone of these options (every connection, and whoever reads the figures, such as
    /// `pcisim serve`'s control socket through [`Server::reply_latency`]) sees the same
    /// aggregates; give each device options of its own (the default makes a fresh one).
    pub reply_latency: Arc<ReplyLatency>,
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
            reply_latency: Arc::default(),
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
pub(crate) fn suppressed_note(n: u64) -> String {
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

pub(crate) fn lock<'a>(d: &'a Mutex<dyn Device + 'static>) -> MutexGuard<'a, dyn Device + 'static> {
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

    /// The device's reply latencies (count, maximum, histogram), live while it serves.
    pub fn reply_latency(&self) -> Arc<ReplyLatency> {
        Arc::clone(&self.opts.reply_latency)
    }

    /// The socket file as bound (for removing it at shutdown only if it is still ours).
    pub fn socket_file(&self) -> &SocketFile {
        &self.file
    }

    /// Serve clients one after another, forever, on an event loop of this thread's own
    /// (the listener, the connection and its deadlines; see [`crate::evloop`]). A second
    /// client waits in the listen backlog until the first is gone. Transient accept failures
    /// (out of fds, an aborted connection) are logged and retried after 100 ms; only a listener
    /// that is no longer usable (or a failing epoll) ends the loop.
    pub fn run(&self) -> io::Result<()> {
        let endpoint = crate::evloop::DeviceEndpoint::new(
            Some(self.listener.try_clone()?),
            Arc::clone(&self.device),
            Arc::new(self.opts.clone()),
            self.path.clone(),
        )?;
        crate::evloop::run_endpoint(endpoint).map(|_| ())
    }

    /// Serve one already accepted client until it goes away (on an event loop of its own),
    /// then release everything it gave us. Used by the fuzz rig; [`Server::run`] serves the
    /// listener.
    pub fn serve_connection(&self, stream: UnixStream) -> ConnectionEnd {
        let opts = Arc::new(self.opts.clone());
        let run = crate::evloop::DeviceEndpoint::new(
            None,
            Arc::clone(&self.device),
            opts,
            self.path.clone(),
        )
        .and_then(|mut e| {
            e.adopt(stream);
            crate::evloop::run_endpoint(e)
        });
        match run {
            Ok(Some(end)) => end,
            Ok(None) => ConnectionEnd::Eof,
            Err(e) => ConnectionEnd::Io(e),
        }
    }
}
