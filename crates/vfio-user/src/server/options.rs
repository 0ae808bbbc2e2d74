//! What a device server is configured with and reports, shared by the server, the event loop
//! ([`crate::evloop`]) and the request handlers ([`crate::conn`]): [`ServerOptions`] and its
//! defaults, the protocol limits we advertise, [`ConnectionEnd`] and the per-connection
//! [`LogLimiter`]. A leaf: it names none of the modules that use it, so the server can construct
//! the event loop without a circle. Re-exported from [`crate::server`].

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::latency::ReplyLatency;
use crate::proto::HEADER_SIZE;

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
    /// `pcisim serve`'s control socket through [`crate::server::Server::reply_latency`]) sees the same
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
