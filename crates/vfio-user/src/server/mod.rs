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

pub(crate) mod options;
pub(crate) mod peer;

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::device::Device;
use crate::latency::ReplyLatency;
use crate::sys;

pub use self::options::{
    ConnectionEnd, LogLimiter, ServerOptions, DEFAULT_FRAME_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_SOCKET_MODE, MIN_DATA_XFER_SIZE,
};
pub use self::peer::{admit_peer, peer_credentials};
pub use crate::sys::PeerCred;

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
